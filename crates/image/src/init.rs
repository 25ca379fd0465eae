//! The initramfs shared by both images: busybox, the `/init` script from
//! guest/init.sh, the kernel modules to load and their load order, written as
//! an uncompressed newc cpio archive.

use crate::cpio::CpioWriter;
use crate::ImageError;

/// The `/init` script (guest/init.sh), embedded at compile time.
pub const INIT_SCRIPT: &str = include_str!("../../../guest/init.sh");

/// The line `/init` prints on the console when the guest is up.
pub const READY_LINE: &str = "VESSEL-GUEST-READY";

/// Where the module load order lives in the initramfs: one file name per
/// line, relative to [`MODULES_DIR`], dependencies first.
pub const MODULE_LIST: &str = "etc/vessel-modules";

/// Where module files live in the initramfs.
pub const MODULES_DIR: &str = "lib/modules";

/// Directories of the initramfs, parents first, with their permissions.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("lib", 0o755),
    ("lib/modules", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
];

/// A kernel module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsModule {
    /// Module name (e.g. `virtio_pci`); the file is `<name>.ko`.
    pub name: String,
    /// Uncompressed ELF contents.
    pub data: Vec<u8>,
}

/// The file name a module gets in [`MODULES_DIR`].
pub fn module_file_name(name: &str) -> String {
    format!("{name}.ko")
}

/// Builds the initramfs: `busybox` is the static busybox binary, `modules`
/// are in load order (dependencies first; empty when everything is built in).
pub fn build_initramfs(busybox: &[u8], modules: &[InitramfsModule]) -> Result<Vec<u8>, ImageError> {
    let mut w = CpioWriter::new(Vec::new());
    for (dir, perm) in DIRS {
        w.dir(dir, *perm)?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, busybox)?;
    // /init's interpreter is /bin/busybox; sh is handy before --install.
    w.symlink("bin/sh", "busybox")?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    let mut list = String::new();
    for m in modules {
        let file = module_file_name(&m.name);
        w.file(&format!("{MODULES_DIR}/{file}"), 0o644, &m.data)?;
        list.push_str(&file);
        list.push('\n');
    }
    w.file(MODULE_LIST, 0o644, list.as_bytes())?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{parse, S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};

    #[test]
    fn init_script_contract() {
        let s = INIT_SCRIPT;
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("/bin/busybox --install -s"));
        for mount in [
            "mount -t proc proc /proc",
            "mount -t sysfs sysfs /sys",
            "mount -t devtmpfs devtmpfs /dev",
        ] {
            assert!(s.contains(mount), "missing {mount}");
        }
        assert!(s.contains(&format!("/{MODULE_LIST}")));
        assert!(s.contains(&format!("insmod \"/{MODULES_DIR}/$mod\"")));
        assert!(s.contains(&format!("echo {READY_LINE} >/dev/console")));
        assert!(s.contains("mount -t ext4"));
        assert!(s.contains("sh /mnt/vessel-run"));
        assert!(s.contains("vessel.poweroff"));
        assert!(s.contains("poweroff -f"));
        // The ready line comes after module loading and before the disk.
        let ready = s.find(&format!("echo {READY_LINE}")).unwrap();
        assert!(s.find("insmod").unwrap() < ready);
        assert!(ready < s.rfind("sh /mnt/vessel-run").unwrap());
    }

    #[test]
    fn init_script_parses_as_posix_shell() {
        let Some(sh) = crate::tools::find_program("sh") else {
            return;
        };
        let out = std::process::Command::new(sh)
            .args(["-n", "-c", INIT_SCRIPT])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn initramfs_layout() {
        let modules = [
            InitramfsModule {
                name: "virtio_ring".into(),
                data: b"ring".to_vec(),
            },
            InitramfsModule {
                name: "virtio".into(),
                data: b"virtio!".to_vec(),
            },
        ];
        let archive = build_initramfs(b"BUSYBOX", &modules).unwrap();
        let entries = parse(&archive).unwrap();
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        for (dir, _) in DIRS {
            assert_eq!(get(dir).file_type(), S_IFDIR);
        }
        for must in ["proc", "sys", "dev", "mnt", "tmp", "root", "etc"] {
            assert_eq!(get(must).file_type(), S_IFDIR);
        }
        assert_eq!(get("tmp").mode, S_IFDIR | 0o1777);
        assert_eq!(get("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("dev/null").rdev, (1, 3));
        assert_eq!(get("bin/busybox").mode, S_IFREG | 0o755);
        assert_eq!(get("bin/busybox").data, b"BUSYBOX");
        assert_eq!(get("bin/sh").file_type(), S_IFLNK);
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert_eq!(get("init").data, INIT_SCRIPT.as_bytes());
        assert_eq!(get(MODULE_LIST).data, b"virtio_ring.ko\nvirtio.ko\n");
        assert_eq!(get("lib/modules/virtio.ko").data, b"virtio!");
        assert_eq!(get("lib/modules/virtio_ring.ko").mode, S_IFREG | 0o644);
        // Every entry's parent directory comes before it.
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                let p = entries.iter().position(|x| x.name == parent).unwrap();
                assert!(p < i, "{} before its parent", e.name);
            }
        }
    }

    #[test]
    fn initramfs_without_modules_has_empty_list() {
        let entries = parse(&build_initramfs(b"bb", &[]).unwrap()).unwrap();
        let list = entries.iter().find(|e| e.name == MODULE_LIST).unwrap();
        assert!(list.data.is_empty());
        assert!(!entries.iter().any(|e| e.name.ends_with(".ko")));
    }
}
