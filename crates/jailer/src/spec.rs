//! Parsing and validation of the jailer's flags, before anything on the host is touched: the
//! VM id, sizes, `--cgroup FILE=VALUE`, `--resource-limit RES=VALUE` and `--bind SRC[:DEST][:rw]`.

use std::path::{Component, Path, PathBuf};

use crate::JailError;

fn invalid(msg: impl Into<String>) -> JailError {
    JailError::Invalid(msg.into())
}

/// A VM id: 1 to 64 ASCII letters, digits and hyphens (Firecracker's rule, which also takes
/// other Unicode letters). It becomes a path component and a cgroup name, so nothing else is
/// allowed. The messages are Firecracker's.
pub fn validate_id(id: &str) -> Result<(), JailError> {
    if id.is_empty() || id.len() > 64 {
        return Err(invalid(format!(
            "Invalid instance ID: Invalid len ({});  the length must be between 1 and 64",
            id.len()
        )));
    }
    if let Some((i, c)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_alphanumeric() && *c != '-')
    {
        return Err(invalid(format!(
            "Invalid instance ID: Invalid char ({c}) at position {i} (--id may hold ASCII \
             letters, digits and hyphens)"
        )));
    }
    Ok(())
}

/// A relative path with only normal components (no `..`, no root): `--parent-cgroup`.
pub fn validate_relative(what: &str, p: &str) -> Result<PathBuf, JailError> {
    let path = Path::new(p);
    if p.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid(format!(
            "{what} {p:?} must be a relative path without `..`"
        )));
    }
    Ok(path.to_path_buf())
}

/// A size in bytes: a number with an optional binary suffix K, M, G or T (`KiB`, `MB` ... are
/// read the same way).
pub fn parse_size(s: &str) -> Result<u64, JailError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| invalid(format!("{s:?} is not a size")))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(invalid(format!(
                "{s:?} is not a size (suffixes: K, M, G, T)"
            )))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| invalid(format!("{s:?} is too large")))
}

/// `--cpus`: a positive number of CPUs (fractions allowed), turned into a CFS quota.
pub fn parse_cpus(s: &str) -> Result<f64, JailError> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.01..=4096.0).contains(&v) => Ok(v),
        _ => Err(invalid(format!(
            "--cpus {s:?} must be a number of CPUs between 0.01 and 4096"
        ))),
    }
}

/// One `--cgroup FILE=VALUE` setting, e.g. `memory.max=512M`, `cpuset.cpus=0-1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    pub file: String,
    pub value: String,
}

impl CgroupSetting {
    /// The controller a file belongs to: what comes before the first dot (`memory` for
    /// `memory.max`); `None` for the core `cgroup.*` files.
    pub fn controller(&self) -> Option<&str> {
        match self.file.split_once('.') {
            Some(("cgroup", _)) => None,
            Some((c, _)) => Some(c),
            None => None,
        }
    }
}

/// Parse `FILE=VALUE`. The file must be `controller.name` (no path separators: it is joined to
/// the VM's cgroup directory), the value one line.
pub fn parse_cgroup(s: &str) -> Result<CgroupSetting, JailError> {
    let (file, value) = s
        .split_once('=')
        .ok_or_else(|| invalid(format!("--cgroup {s:?} must be FILE=VALUE")))?;
    let ok_name = file
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    let dotted = matches!(file.split_once('.'), Some((a, b)) if !a.is_empty() && !b.is_empty());
    if !ok_name || !dotted || file.contains("..") {
        return Err(invalid(format!(
            "--cgroup file {file:?} must look like controller.name (e.g. memory.max)"
        )));
    }
    if value.is_empty() || value.contains('\n') {
        return Err(invalid(format!(
            "--cgroup {file}: the value must be one non-empty line"
        )));
    }
    Ok(CgroupSetting {
        file: file.to_string(),
        value: value.to_string(),
    })
}

/// One `--resource-limit RES=VALUE`: Firecracker's `fsize` and `no-file`, plus `nproc`,
/// `memlock` and `core`. Both the soft and the hard limit are set to the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimit {
    pub resource: libc::__rlimit_resource_t,
    pub name: &'static str,
    pub value: u64,
}

/// The limit the jailer sets when none is given (Firecracker's default): 2048 open files.
pub const DEFAULT_NO_FILE: u64 = 2048;

pub fn parse_resource_limit(s: &str) -> Result<ResourceLimit, JailError> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| invalid(format!("--resource-limit {s:?} must be RESOURCE=VALUE")))?;
    let (resource, name) = match name {
        "fsize" => (libc::RLIMIT_FSIZE, "fsize"),
        "no-file" => (libc::RLIMIT_NOFILE, "no-file"),
        "nproc" => (libc::RLIMIT_NPROC, "nproc"),
        "memlock" => (libc::RLIMIT_MEMLOCK, "memlock"),
        "core" => (libc::RLIMIT_CORE, "core"),
        _ => {
            return Err(invalid(format!(
            "--resource-limit {name:?}: known resources are fsize, no-file, nproc, memlock, core"
        )))
        }
    };
    let value = value.parse::<u64>().map_err(|_| {
        invalid(format!(
            "--resource-limit {name}: {value:?} is not a number"
        ))
    })?;
    Ok(ResourceLimit {
        resource,
        name,
        value,
    })
}

/// One `--bind SRC[:DEST][:rw]`: a host file or directory mounted into the jail (read-only
/// unless `rw`), at DEST inside the jail (default: the same path as on the host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub dest: PathBuf,
    pub writable: bool,
}

pub fn parse_bind(s: &str) -> Result<Bind, JailError> {
    let mut parts: Vec<&str> = s.split(':').collect();
    let writable = match parts.last() {
        Some(&"rw") if parts.len() > 1 => {
            parts.pop();
            true
        }
        Some(&"ro") if parts.len() > 1 => {
            parts.pop();
            false
        }
        _ => false,
    };
    let (source, dest) = match parts.as_slice() {
        [src] => (*src, *src),
        [src, dst] => (*src, *dst),
        _ => return Err(invalid(format!("--bind {s:?} must be SRC[:DEST][:ro|rw]"))),
    };
    let abs_normal = |p: &str| {
        let path = Path::new(p);
        path.is_absolute()
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && path.components().count() > 1
    };
    if !abs_normal(source) || !abs_normal(dest) {
        return Err(invalid(format!(
            "--bind {s:?}: both paths must be absolute, without `..`, and not `/`"
        )));
    }
    Ok(Bind {
        source: PathBuf::from(source),
        dest: PathBuf::from(dest),
        writable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("551e7604-e35c-42b3-b825-416853441234").is_ok());
        // Firecracker's messages, word for word (its suite matches them).
        assert_eq!(
            validate_id("").unwrap_err().to_string(),
            "Invalid instance ID: Invalid len (0);  the length must be between 1 and 64"
        );
        assert!(validate_id(&"a".repeat(65))
            .unwrap_err()
            .to_string()
            .starts_with("Invalid instance ID: Invalid len (65);"));
        assert!(validate_id("ab/c")
            .unwrap_err()
            .to_string()
            .starts_with("Invalid instance ID: Invalid char (/) at position 2"));
        assert!(validate_id(&"a".repeat(64)).is_ok());
        for bad in ["../x", "a/b", "a b", "a.b", "a_b"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            validate_relative("p", "all/vms").unwrap(),
            PathBuf::from("all/vms")
        );
        for bad in ["", "/abs", "a/../b", ".."] {
            assert!(validate_relative("p", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("1.5").unwrap(), 1.5);
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cgroup_settings() {
        let s = parse_cgroup("cpuset.cpus=0-1").unwrap();
        assert_eq!(s.file, "cpuset.cpus");
        assert_eq!(s.value, "0-1");
        assert_eq!(s.controller(), Some("cpuset"));
        assert_eq!(
            parse_cgroup("cpu.max=50000 100000").unwrap().value,
            "50000 100000"
        );
        assert_eq!(parse_cgroup("cgroup.freeze=0").unwrap().controller(), None);
        for bad in [
            "memory.max",
            "memory=1",
            "../memory.max=1",
            "a/b.c=1",
            ".max=1",
            "memory.=1",
            "memory.max=",
            "memory.max=1\n2",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resource_limits() {
        let r = parse_resource_limit("no-file=1024").unwrap();
        assert_eq!((r.resource, r.value), (libc::RLIMIT_NOFILE, 1024));
        assert_eq!(
            parse_resource_limit("fsize=250000000").unwrap().resource,
            libc::RLIMIT_FSIZE
        );
        assert!(parse_resource_limit("stack=1").is_err());
        assert!(parse_resource_limit("fsize=big").is_err());
        assert!(parse_resource_limit("fsize").is_err());
    }

    #[test]
    fn binds() {
        assert_eq!(
            parse_bind("/srv/k/vmlinux").unwrap(),
            Bind {
                source: "/srv/k/vmlinux".into(),
                dest: "/srv/k/vmlinux".into(),
                writable: false
            }
        );
        let b = parse_bind("/var/disk.img:/disk.img:rw").unwrap();
        assert_eq!(b.dest, PathBuf::from("/disk.img"));
        assert!(b.writable);
        assert!(!parse_bind("/a:/b:ro").unwrap().writable);
        for bad in [
            "rel",
            "/a:rel",
            "/a:/../etc",
            "/",
            "/a:/",
            "/a:/b:/c",
            "/a:/b:xx",
        ] {
            assert!(parse_bind(bad).is_err(), "{bad}");
        }
    }
}
