//! Debian packages: `apt-get download` into a work directory (running
//! `apt-get update` once if the package lists are missing), reading control
//! fields with `dpkg-deb -f`, and unpacking with `dpkg-deb -x`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{ensure_dir, remove_path};
use crate::error::IoContext;
use crate::tools::{run, run_stdout};
use crate::ImageError;

/// A downloaded package file.
#[derive(Debug, Clone)]
pub(crate) struct Deb {
    /// Package name.
    pub name: String,
    /// Its version (from the control file).
    pub version: String,
    /// The .deb file.
    pub path: PathBuf,
}

/// Talks to apt; remembers whether `apt-get update` already ran.
pub(crate) struct Apt<'a> {
    log: &'a mut dyn FnMut(&str),
    updated: bool,
}

/// True when apt's error means the package lists are missing or stale.
fn lists_missing(err: &ImageError) -> bool {
    let text = err.to_string();
    [
        "Unable to locate package",
        "No packages found",
        "has no installation candidate",
        "Failed to fetch",
        "404",
    ]
    .iter()
    .any(|s| text.contains(s))
}

impl<'a> Apt<'a> {
    pub fn new(log: &'a mut dyn FnMut(&str)) -> Self {
        Apt {
            log,
            updated: false,
        }
    }

    /// Forwards a progress line to the caller's log.
    pub fn log(&mut self, line: &str) {
        (self.log)(line);
    }

    /// Downloads `package` into `dir` (created; emptied of older .debs of
    /// this package first) and reads its version.
    pub fn download(&mut self, package: &str, dir: &Path) -> Result<Deb, ImageError> {
        ensure_dir(dir)?;
        for old in debs_of(dir, package)? {
            remove_path(&old)?;
        }
        self.log(&format!("apt-get download {package}"));
        let attempt = |dir: &Path| {
            run(Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(dir))
        };
        if let Err(err) = attempt(dir) {
            if self.updated || !lists_missing(&err) {
                return Err(err);
            }
            self.log("package lists missing or stale: apt-get update");
            run(Command::new("apt-get").args(["update", "-q"]))?;
            self.updated = true;
            attempt(dir)?;
        }
        let mut found = debs_of(dir, package)?;
        let path = match (found.pop(), found.is_empty()) {
            (Some(p), true) => p,
            _ => {
                return Err(ImageError::Package {
                    package: package.to_string(),
                    reason: format!(
                        "apt-get download did not leave exactly one .deb in {}",
                        dir.display()
                    ),
                })
            }
        };
        let version = field(&path, "Version")?;
        Ok(Deb {
            name: package.to_string(),
            version,
            path,
        })
    }
}

/// The `.deb` files of `package` in `dir` (`<package>_<version>_<arch>.deb`).
fn debs_of(dir: &Path, package: &str) -> Result<Vec<PathBuf>, ImageError> {
    let prefix = format!("{package}_");
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .ctx("read directory", dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// A control field of a .deb (`dpkg-deb -f`).
pub(crate) fn field(deb: &Path, name: &str) -> Result<String, ImageError> {
    let out = run_stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?;
    Ok(out.trim().to_string())
}

/// Unpacks a .deb's files into `dest` (created fresh).
pub(crate) fn extract(deb: &Deb, dest: &Path) -> Result<(), ImageError> {
    remove_path(dest)?;
    ensure_dir(dest)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb.path).arg(dest))?;
    Ok(())
}

/// The package that provides the guest's busybox.
pub(crate) const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Downloads and unpacks busybox-static under `work`; returns the static
/// binary and the package.
pub(crate) fn busybox(apt: &mut Apt<'_>, work: &Path) -> Result<(Vec<u8>, Deb), ImageError> {
    let deb = apt.download(BUSYBOX_PACKAGE, &work.join("debs"))?;
    let root = work.join("busybox");
    extract(&deb, &root)?;
    let bin = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::Package {
            package: BUSYBOX_PACKAGE.to_string(),
            reason: "no bin/busybox in the package".to_string(),
        })?;
    let data = fs::read(&bin).ctx("read", &bin)?;
    Ok((data, deb))
}

/// The package names in a `Depends:` value, first alternative of each.
pub(crate) fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|clause| clause.split('|').next())
        .filter_map(|alt| alt.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name).to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

/// The versioned kernel package a `linux-image-<flavour>` metapackage
/// depends on, e.g. `linux-image-6.1.0-56-amd64`.
pub(crate) fn kernel_package_of(meta: &str, depends: &str) -> Result<String, ImageError> {
    depends_names(depends)
        .into_iter()
        .find(|n| n.starts_with("linux-image-") && n != meta)
        .ok_or_else(|| ImageError::Package {
            package: meta.to_string(),
            reason: format!("no linux-image-* package in Depends: {depends:?}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_parsing() {
        assert_eq!(
            depends_names("linux-image-6.1.0-56-amd64 (= 6.1.192-2), foo | bar, baz:any (>= 1)"),
            ["linux-image-6.1.0-56-amd64", "foo", "baz"]
        );
        assert!(depends_names("").is_empty());
    }

    #[test]
    fn metapackage_resolution() {
        assert_eq!(
            kernel_package_of(
                "linux-image-amd64",
                "linux-image-6.1.0-56-amd64 (= 6.1.192-2)"
            )
            .unwrap(),
            "linux-image-6.1.0-56-amd64"
        );
        assert_eq!(
            kernel_package_of(
                "linux-image-amd64",
                "initramfs-tools | linux-initramfs-tool, linux-image-6.12.1-amd64"
            )
            .unwrap(),
            "linux-image-6.12.1-amd64"
        );
        let err = kernel_package_of("linux-image-amd64", "linux-image-amd64, kmod").unwrap_err();
        assert!(
            err.to_string().contains("no linux-image-* package"),
            "{err}"
        );
    }

    #[test]
    fn missing_lists_are_recognised() {
        let err = |detail: &str| ImageError::Command {
            command: "apt-get download x".into(),
            detail: detail.into(),
        };
        assert!(lists_missing(&err(
            "exit status: 100: E: Unable to locate package x"
        )));
        assert!(lists_missing(&err("E: No packages found")));
        assert!(!lists_missing(&err("E: Could not open lock file")));
    }
}
