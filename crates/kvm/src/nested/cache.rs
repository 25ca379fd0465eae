//! The nested-host probe's answer, kept for the rest of the host's boot.
//!
//! [`probe_nested_host`] builds a scratch VM and times guest code: about 0.8 ms of wall and CPU
//! time on the lab host, paid by every VM build, which Firecracker does not pay (a third of
//! the difference in CPU time per microVM life). Its answer is a property of the host's KVM:
//! it holds until the host reboots or its KVM module is loaded again. So the answer is kept in
//! a file with the host's boot ID and the identity of `/dev/kvm` (the device node is created
//! anew when a KVM module registers it); a record with another key is probed again.
//!
//! The file lives in `/run/vessel` for root and `$XDG_RUNTIME_DIR/vessel` for other users:
//! directories only its owner can write, and a record is trusted only from a file owned by the
//! reader that nobody else may write. Anything that fails (no such directory, as in a jail; a
//! damaged record) falls back to probing; a write that fails is only logged.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

use super::probe::probe_nested_host;
use crate::error::KvmError;

const FILE: &str = "nested-host";
const VERSION: &str = "v1";

/// What identifies the host's KVM for as long as the probe's answer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostKey(String);

impl HostKey {
    fn read() -> Option<HostKey> {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let kvm = std::fs::metadata("/dev/kvm").ok()?;
        Some(HostKey(format!(
            "{} {} {} {}.{}",
            boot.trim(),
            kvm.rdev(),
            kvm.ino(),
            kvm.ctime(),
            kvm.ctime_nsec()
        )))
    }
}

/// The directory of the record for this user.
fn default_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/run/vessel"));
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")?;
    Some(Path::new(&runtime).join("vessel"))
}

/// [`probe_nested_host`], answered from the record in `/run/vessel` (or
/// `$XDG_RUNTIME_DIR/vessel`) when it was made on this boot of this host's KVM.
pub fn probe_nested_host_cached(kvm: &Kvm) -> Result<bool, KvmError> {
    match default_dir() {
        Some(dir) => cached_in(&dir, kvm, HostKey::read()),
        None => probe_nested_host(kvm),
    }
}

fn cached_in(dir: &Path, kvm: &Kvm, key: Option<HostKey>) -> Result<bool, KvmError> {
    let Some(key) = key else {
        return probe_nested_host(kvm);
    };
    let path = dir.join(FILE);
    if let Some(answer) = recorded(&path, &key) {
        log::debug!("nested host: {answer} (recorded in {})", path.display());
        return Ok(answer);
    }
    let answer = probe_nested_host(kvm)?;
    if let Err(e) = record(dir, &path, &key, answer) {
        log::debug!(
            "nested host: cannot record the probe in {}: {e}",
            path.display()
        );
    }
    Ok(answer)
}

/// The answer recorded at `path` for `key`, from a file only this user can have written.
fn recorded(path: &Path, key: &HostKey) -> Option<bool> {
    let meta = std::fs::metadata(path).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if meta.uid() != unsafe { libc::geteuid() } || meta.mode() & 0o022 != 0 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.strip_suffix('\n')?;
    let rest = line.strip_prefix(VERSION)?.strip_prefix(' ')?;
    let (recorded_key, answer) = rest.rsplit_once(' ')?;
    if recorded_key != key.0 {
        return None;
    }
    match answer {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Writes the record whole (a temporary file renamed over the old one).
fn record(dir: &Path, path: &Path, key: &HostKey, answer: bool) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!("{FILE}.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = writeln!(f, "{VERSION} {} {}", key.0, u8::from(answer))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-nested-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn key(s: &str) -> HostKey {
        HostKey(s.into())
    }

    #[test]
    fn a_record_answers_for_its_own_key_only() {
        let dir = scratch("key");
        let path = dir.join(FILE);
        record(&dir, &path, &key("boot-a 1 2 3.4"), true).unwrap();
        assert_eq!(recorded(&path, &key("boot-a 1 2 3.4")), Some(true));
        // Another boot, or /dev/kvm created again: probe again.
        assert_eq!(recorded(&path, &key("boot-b 1 2 3.4")), None);
        assert_eq!(recorded(&path, &key("boot-a 1 2 3.5")), None);
        // A new record replaces the old one, and leaves no temporary file behind.
        record(&dir, &path, &key("boot-b 1 2 3.4"), false).unwrap();
        assert_eq!(recorded(&path, &key("boot-b 1 2 3.4")), Some(false));
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        // The directory and the file are this user's alone.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_or_writable_records_are_not_trusted() {
        let dir = scratch("damaged");
        let path = dir.join(FILE);
        let k = key("boot 1 2 3.4");
        record(&dir, &path, &k, true).unwrap();
        for text in [
            "",
            "v1 boot 1 2 3.4 1",
            "v1 boot 1 2 3.4 2\n",
            "v0 boot 1 2 3.4 1\n",
            "v1 boot 1 2 3.4\n",
        ] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(recorded(&path, &k), None, "{text:?}");
        }
        std::fs::write(&path, "v1 boot 1 2 3.4 1\n").unwrap();
        assert_eq!(recorded(&path, &k), Some(true));
        // Writable by the group or others: somebody else may have written it.
        let perms = |m| std::os::unix::fs::PermissionsExt::from_mode(m);
        std::fs::set_permissions(&path, perms(0o620)).unwrap();
        assert_eq!(recorded(&path, &k), None);
        std::fs::set_permissions(&path, perms(0o602)).unwrap();
        assert_eq!(recorded(&path, &k), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_probe_runs_once_per_key() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipping: no /dev/kvm");
            return;
        };
        let dir = scratch("probe");
        let k = HostKey::read().expect("boot id and /dev/kvm");
        let probed = cached_in(&dir, &kvm, Some(k.clone())).unwrap();
        assert_eq!(recorded(&dir.join(FILE), &k), Some(probed));
        // A record that says otherwise is what the next build believes: it was not probed.
        record(&dir, &dir.join(FILE), &k, !probed).unwrap();
        assert_eq!(cached_in(&dir, &kvm, Some(k.clone())).unwrap(), !probed);
        // Without a key (no boot ID or /dev/kvm to read), always the probe.
        assert_eq!(cached_in(&dir, &kvm, None).unwrap(), probed);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
