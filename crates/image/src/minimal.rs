//! The `minimal` image: upstream Linux from Debian's `linux-source-6.1`,
//! configured with `make tinyconfig` plus guest/minimal.config, everything
//! built in, booted as the ELF vmlinux (its 64-bit entry; it also has a PVH note). Its
//! initramfs has the same layout as debian's, with no modules.
//!
//! The same build also yields `bzImage` (LZ4-compressed, cheap to decompress
//! where guest kernel code is emulated) for firmware boot through a boot
//! loader such as GRUB, which cannot load an ELF vmlinux.
//!
//! The `kata` image is the same kernel with guest/kata.config added (what
//! Kata Containers' agent needs as init: cgroups, namespaces, devpts, MBR
//! partitions); it has its own source and build trees.
//!
//! The source tree and the `O=` build tree stay under `work/<image>` so a
//! changed fragment rebuilds incrementally; a changed init script only
//! rebuilds the initramfs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{
    content_hash, copy_atomic, ensure_dir, remove_path, rename_into_place, write_atomic, ImageDirs,
    Stamp, LAYOUT_VERSION,
};
use crate::deb::{self, Apt};
use crate::error::IoContext;
use crate::init::{build_initramfs, INIT_SCRIPT};
use crate::kconfig::{check_fragment, KATA_FRAGMENT, MINIMAL_FRAGMENT};
use crate::tools::{check_needs, run, run_logged, APT_TOOLS, KERNEL_TOOLS};
use crate::{ImageError, ImagePaths};

/// The Debian package holding the kernel source tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// A kernel built this way: tinyconfig plus Vessel's fragments, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flavour {
    /// The image's name (its cache folders).
    pub name: &'static str,
    /// The fragments merged over tinyconfig, in order.
    pub fragments: &'static [&'static str],
}

/// The `minimal` image.
pub(crate) const MINIMAL: Flavour = Flavour {
    name: "minimal",
    fragments: &[MINIMAL_FRAGMENT],
};

/// The `kata` image: minimal plus what Kata Containers' agent needs.
pub(crate) const KATA: Flavour = Flavour {
    name: "kata",
    fragments: &[MINIMAL_FRAGMENT, KATA_FRAGMENT],
};

impl Flavour {
    /// The fragments as one text (for minimal, exactly guest/minimal.config,
    /// so its cached kernels stay valid).
    fn fragment(self) -> String {
        self.fragments.join("\n")
    }
}

/// The stamp entries the kernel depends on.
fn kernel_recipe(flavour: Flavour) -> Vec<(&'static str, String)> {
    vec![
        ("layout", LAYOUT_VERSION.to_string()),
        ("config", content_hash(flavour.fragment().as_bytes())),
    ]
}

/// The stamp entries the initramfs depends on.
fn initrd_recipe() -> Vec<(&'static str, String)> {
    vec![
        ("layout", LAYOUT_VERSION.to_string()),
        ("init", content_hash(INIT_SCRIPT.as_bytes())),
    ]
}

fn matches(stamp: &Stamp, recipe: &[(&'static str, String)]) -> bool {
    let expected: Vec<(&str, &str)> = recipe.iter().map(|(k, v)| (*k, v.as_str())).collect();
    stamp.matches(&expected)
}

/// True when the stamp's kernel recipe is current and every kernel output
/// (vmlinux, System.map, bzImage) is in place; a cache from before bzImage
/// existed rebuilds the kernel.
fn kernel_cached(flavour: Flavour, stamp: &Stamp, dirs: &ImageDirs) -> bool {
    matches(stamp, &kernel_recipe(flavour))
        && dirs.kernel().is_file()
        && dirs.system_map().is_file()
        && dirs.bzimage().is_file()
}

/// Parallel jobs for make.
fn jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A `make` in the kernel tree with a clean, explicit environment.
fn make(src: &Path, build: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=x86_64");
    for var in [
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "KCONFIG_CONFIG",
        "KBUILD_OUTPUT",
        "CROSS_COMPILE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Unpacks linux-source into `work/linux-source` once per package version.
fn ensure_source(apt: &mut Apt<'_>, work: &Path) -> Result<(PathBuf, String), ImageError> {
    let src = work.join("linux-source");
    let marker = work.join("source.version");
    if src.join("Makefile").is_file() {
        if let Ok(version) = fs::read_to_string(&marker) {
            if !version.trim().is_empty() {
                return Ok((src, version.trim().to_string()));
            }
        }
    }
    remove_path(&marker)?;
    let debs = work.join("debs");
    let deb = apt.download(SOURCE_PACKAGE, &debs)?;
    let pkg = work.join("source-pkg");
    apt.log(&format!("unpacking {SOURCE_PACKAGE} {}", deb.version));
    deb::extract(&deb, &pkg)?;
    let usr_src = pkg.join("usr/src");
    let tarball = fs::read_dir(&usr_src)
        .ctx("read directory", &usr_src)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-source-") && n.contains(".tar"))
        })
        .ok_or_else(|| ImageError::Package {
            package: SOURCE_PACKAGE.to_string(),
            reason: "no usr/src/linux-source-*.tar.* in the package".to_string(),
        })?;
    let unpack = work.join("source-unpack");
    remove_path(&unpack)?;
    ensure_dir(&unpack)?;
    apt.log(&format!("tar -xf {}", tarball.display()));
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpack))?;
    let top = fs::read_dir(&unpack)
        .ctx("read directory", &unpack)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("Makefile").is_file())
        .ok_or_else(|| ImageError::Package {
            package: SOURCE_PACKAGE.to_string(),
            reason: "the tarball has no top directory with a Makefile".to_string(),
        })?;
    remove_path(&src)?;
    fs::rename(&top, &src).ctx("rename", &src)?;
    // The old build tree belongs to the old source.
    remove_path(&work.join("build"))?;
    remove_path(&unpack)?;
    remove_path(&pkg)?;
    remove_path(&debs)?;
    write_atomic(&marker, deb.version.as_bytes())?;
    Ok((src, deb.version))
}

/// Configures and builds vmlinux and bzImage; returns the kernel release.
fn build_kernel(
    flavour: Flavour,
    apt: &mut Apt<'_>,
    dirs: &ImageDirs,
) -> Result<(String, String), ImageError> {
    let name = flavour.name;
    check_needs(KERNEL_TOOLS)?;
    let (src, version) = ensure_source(apt, &dirs.work)?;
    let build = dirs.work.join("build");
    ensure_dir(&build)?;
    let log_file = dirs.work.join("build.log");
    remove_path(&log_file)?;
    let text = flavour.fragment();
    let fragment = dirs.work.join(format!("vessel-{name}.config"));
    write_atomic(&fragment, text.as_bytes())?;

    apt.log(&format!(
        "{name}: make tinyconfig + Vessel's fragments + olddefconfig"
    ));
    run_logged(make(&src, &build).arg("tinyconfig"), &log_file)?;
    run_logged(
        Command::new("sh")
            .arg(src.join("scripts/kconfig/merge_config.sh"))
            .args(["-m", ".config"])
            .arg(&fragment)
            .current_dir(&build),
        &log_file,
    )?;
    run_logged(make(&src, &build).arg("olddefconfig"), &log_file)?;
    let config_path = build.join(".config");
    let config = fs::read_to_string(&config_path).ctx("read", &config_path)?;
    let dropped = check_fragment(&text, &config);
    if !dropped.is_empty() {
        return Err(ImageError::ConfigNotApplied {
            config: config_path,
            options: dropped.join(", "),
        });
    }

    let jobs = jobs();
    apt.log(&format!(
        "{name}: make -j{jobs} vmlinux bzImage (several minutes; log: {})",
        log_file.display()
    ));
    run_logged(
        make(&src, &build)
            .arg(format!("-j{jobs}"))
            .args(["vmlinux", "bzImage"]),
        &log_file,
    )?;

    let release_file = build.join("include/config/kernel.release");
    let release = fs::read_to_string(&release_file)
        .ctx("read", &release_file)?
        .trim()
        .to_string();

    // Symbols stay available in System.map; the PVH note survives stripping.
    let tmp = dirs
        .image
        .join(format!(".vmlinux.strip-{}", std::process::id()));
    let stripped = run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp)
        .arg(build.join("vmlinux")));
    if let Err(e) = stripped {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    rename_into_place(&tmp, &dirs.kernel())?;
    copy_atomic(&build.join("System.map"), &dirs.system_map())?;
    copy_atomic(&build.join("arch/x86/boot/bzImage"), &dirs.bzimage())?;
    Ok((release, version))
}

/// Builds (or returns the cached) image of `flavour` under `root`.
pub(crate) fn build(
    flavour: Flavour,
    root: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<ImagePaths, ImageError> {
    let name = flavour.name;
    let dirs = ImageDirs::new(root, name, "vmlinux");
    let old = Stamp::load(&dirs.stamp());
    let kernel_ok = kernel_cached(flavour, &old, &dirs);
    let initrd_ok = matches(&old, &initrd_recipe()) && dirs.initrd().is_file();
    if kernel_ok && initrd_ok {
        log(&format!("{name}: up to date in {}", dirs.image.display()));
        return Ok(dirs.paths());
    }
    check_needs(APT_TOOLS)?;
    ensure_dir(&dirs.image)?;
    ensure_dir(&dirs.work)?;
    remove_path(&dirs.stamp())?;

    let mut apt = Apt::new(log);
    let mut stamp = Stamp::new();
    stamp.set("image", name);
    if kernel_ok {
        apt.log(&format!("{name}: kernel up to date"));
        for key in ["kernel.release", "kernel.source"] {
            if let Some(v) = old.get(key) {
                stamp.set(key, v);
            }
        }
    } else {
        let (release, version) = build_kernel(flavour, &mut apt, &dirs)?;
        stamp.set("kernel.release", release);
        stamp.set("kernel.source", format!("{SOURCE_PACKAGE} {version}"));
    }
    for (k, v) in kernel_recipe(flavour) {
        stamp.set(k, v);
    }
    // With a valid kernel in place, record it now: an interrupted initramfs
    // build then does not cost a kernel rebuild.
    write_atomic(&dirs.stamp(), stamp.render().as_bytes())?;

    if initrd_ok {
        for key in ["init", "busybox.package"] {
            if let Some(v) = old.get(key) {
                stamp.set(key, v);
            }
        }
    } else {
        let bb_work = dirs.work.join("busybox-pkg");
        let (busybox, busybox_deb) = deb::busybox(&mut apt, &bb_work)?;
        write_atomic(&dirs.initrd(), &build_initramfs(&busybox, &[])?)?;
        remove_path(&bb_work)?;
        stamp.set(
            "busybox.package",
            format!("{} {}", busybox_deb.name, busybox_deb.version),
        );
    }
    for (k, v) in initrd_recipe() {
        stamp.set(k, v);
    }
    write_atomic(&dirs.stamp(), stamp.render().as_bytes())?;
    apt.log(&format!(
        "{name}: built {} in {}",
        stamp.get("kernel.release").unwrap_or("?"),
        dirs.image.display()
    ));
    Ok(dirs.paths())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_track_config_and_init() {
        let k = kernel_recipe(MINIMAL);
        assert!(k.contains(&("config", content_hash(MINIMAL_FRAGMENT.as_bytes()))));
        let kata = kernel_recipe(KATA);
        assert!(kata.contains(&(
            "config",
            content_hash(format!("{MINIMAL_FRAGMENT}\n{KATA_FRAGMENT}").as_bytes())
        )));
        assert_ne!(k, kata, "kata's kernel is not minimal's");
        assert!(
            !k.iter().any(|(key, _)| *key == "init"),
            "init changes keep the kernel"
        );
        let i = initrd_recipe();
        assert!(i.contains(&("init", content_hash(INIT_SCRIPT.as_bytes()))));
        assert!(!i.iter().any(|(key, _)| *key == "config"));
    }

    #[test]
    fn make_command_is_out_of_tree_and_clean() {
        let cmd = make(Path::new("/src"), Path::new("/b"));
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["-C", "/src", "O=/b", "ARCH=x86_64"]);
        assert!(cmd.get_envs().any(|(k, v)| k == "MAKEFLAGS" && v.is_none()));
    }

    #[test]
    fn cached_minimal_image_is_returned_without_building() {
        let root =
            std::env::temp_dir().join(format!("vessel-minimal-cache-{}", std::process::id()));
        let dirs = ImageDirs::new(&root, "minimal", "vmlinux");
        ensure_dir(&dirs.image).unwrap();
        for p in [
            dirs.kernel(),
            dirs.initrd(),
            dirs.system_map(),
            dirs.bzimage(),
        ] {
            fs::write(p, b"x").unwrap();
        }
        let mut stamp = Stamp::new();
        for (k, v) in kernel_recipe(MINIMAL).into_iter().chain(initrd_recipe()) {
            stamp.set(k, v);
        }
        fs::write(dirs.stamp(), stamp.render()).unwrap();
        let mut lines = Vec::new();
        let paths = build(MINIMAL, &root, &mut |l| lines.push(l.to_string())).unwrap();
        assert_eq!(paths.kernel, root.join("images/minimal/vmlinux"));
        assert_eq!(
            paths.system_map,
            Some(root.join("images/minimal/System.map"))
        );
        assert_eq!(paths.bzimage, Some(root.join("images/minimal/bzImage")));
        assert!(lines[0].contains("up to date"), "{lines:?}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn cache_without_bzimage_is_not_up_to_date() {
        let root = std::env::temp_dir().join(format!("vessel-minimal-nobz-{}", std::process::id()));
        let dirs = ImageDirs::new(&root, "minimal", "vmlinux");
        ensure_dir(&dirs.image).unwrap();
        for p in [dirs.kernel(), dirs.initrd(), dirs.system_map()] {
            fs::write(p, b"x").unwrap();
        }
        let mut stamp = Stamp::new();
        for (k, v) in kernel_recipe(MINIMAL).into_iter().chain(initrd_recipe()) {
            stamp.set(k, v);
        }
        fs::write(dirs.stamp(), stamp.render()).unwrap();
        // An old cache (vmlinux only) must rebuild the kernel.
        let old = Stamp::load(&dirs.stamp());
        assert!(!kernel_cached(MINIMAL, &old, &dirs));
        assert!(!kernel_cached(KATA, &old, &dirs), "another flavour's stamp");
        assert_eq!(dirs.paths().bzimage, None);
        fs::write(dirs.bzimage(), b"x").unwrap();
        assert!(kernel_cached(MINIMAL, &old, &dirs));
        assert_eq!(dirs.paths().bzimage, Some(dirs.bzimage()));
        fs::remove_dir_all(&root).unwrap();
    }
}
