//! The `debian` image: Debian's stock kernel (`linux-image-amd64` resolved
//! to its versioned package), its System.map, and an initramfs holding the
//! kernel's own virtio and ext4 modules in load order.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cache::{
    content_hash, copy_atomic, ensure_dir, remove_path, write_atomic, ImageDirs, Stamp,
    LAYOUT_VERSION,
};
use crate::deb::{self, Apt};
use crate::error::IoContext;
use crate::init::{build_initramfs, InitramfsModule, INIT_SCRIPT};
use crate::modules::{
    drop_btf, drop_ftrace_callsites, read_module, resolve, strip_signature, ModuleIndex,
};
use crate::tools::{check_needs, APT_TOOLS};
use crate::{ImageError, ImagePaths};

/// The metapackage that names the current stock kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// The modules the guest loads, in the order wanted; their dependencies are
/// added (first) from the kernel's own metadata. `crc32c_generic` is listed
/// because ext4 and jbd2 only soft-depend on it (`softdep=pre:
/// crypto-crc32c`) and the guest has no modprobe to resolve that alias.
pub const WANTED_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "vmw_vsock_virtio_transport",
    "crc32c_generic",
    "ext4",
];

/// The stamp entries that must match for the cached image to be reused.
fn recipe() -> Vec<(&'static str, String)> {
    vec![
        ("layout", LAYOUT_VERSION.to_string()),
        ("init", content_hash(INIT_SCRIPT.as_bytes())),
        (
            "modules.wanted",
            content_hash(WANTED_MODULES.join(",").as_bytes()),
        ),
        // Modules go into the initramfs without their signatures (see
        // `modules::strip_signature`).
        ("modules.signatures", "stripped".to_string()),
        ("modules.btf", "dropped".to_string()),
        // And without their ftrace call-site tables (`modules::drop_ftrace_callsites`).
        ("modules.ftrace", "dropped".to_string()),
    ]
}

fn up_to_date(dirs: &ImageDirs) -> bool {
    let recipe = recipe();
    let expected: Vec<(&str, &str)> = recipe.iter().map(|(k, v)| (*k, v.as_str())).collect();
    dirs.outputs_exist() && Stamp::load(&dirs.stamp()).matches(&expected)
}

/// True for a real System.map: Debian's image package ships a one-line
/// placeholder ("The real System.map is in the linux-image-<version>-dbg
/// package") in its place.
fn is_real_system_map(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string(path) else {
        return false;
    };
    !text.contains("The real System.map is in") && text.lines().take(100).count() == 100
}

/// The single file in `dir` whose name starts with `prefix`.
fn one_file(dir: &Path, prefix: &str, package: &str) -> Result<PathBuf, ImageError> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ctx("read directory", dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    if found.len() != 1 {
        return Err(ImageError::Package {
            package: package.to_string(),
            reason: format!(
                "expected one {prefix}* in {}, found {}",
                dir.display(),
                found.len()
            ),
        });
    }
    Ok(found.remove(0))
}

/// Builds (or returns the cached) debian image under `root`.
pub(crate) fn build(root: &Path, log: &mut dyn FnMut(&str)) -> Result<ImagePaths, ImageError> {
    let dirs = ImageDirs::new(root, "debian", "vmlinuz");
    if up_to_date(&dirs) {
        log(&format!("debian: up to date in {}", dirs.image.display()));
        return Ok(dirs.paths());
    }
    check_needs(APT_TOOLS)?;
    ensure_dir(&dirs.image)?;
    remove_path(&dirs.stamp())?;
    remove_path(&dirs.work)?;
    ensure_dir(&dirs.work)?;

    let mut apt = Apt::new(log);
    let debs = dirs.work.join("debs");
    let meta = apt.download(KERNEL_METAPACKAGE, &debs)?;
    let kernel_pkg =
        deb::kernel_package_of(KERNEL_METAPACKAGE, &deb::field(&meta.path, "Depends")?)?;
    let kernel_deb = apt.download(&kernel_pkg, &debs)?;
    let kroot = dirs.work.join("kernel");
    apt.log(&format!("unpacking {kernel_pkg} {}", kernel_deb.version));
    deb::extract(&kernel_deb, &kroot)?;

    let boot = kroot.join("boot");
    let vmlinuz = one_file(&boot, "vmlinuz-", &kernel_pkg)?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    let system_map = boot.join(format!("System.map-{release}"));
    let system_map = is_real_system_map(&system_map).then_some(system_map);
    if system_map.is_none() {
        apt.log(&format!(
            "debian: {kernel_pkg} ships only a placeholder System.map (the real one is in \
             {kernel_pkg}-dbg): the image has none"
        ));
    }

    let modules_root = kroot.join("lib/modules").join(&release);
    let mut index = ModuleIndex::load(&modules_root)?;
    let res = resolve(&mut index, WANTED_MODULES)?;
    for name in &res.missing {
        apt.log(&format!(
            "debian: kernel {release} has no module {name}: skipped"
        ));
    }
    for (module, dep) in &res.missing_deps {
        apt.log(&format!(
            "debian: module {module} needs {dep}, which is missing"
        ));
    }
    for (module, dep) in &res.cycles {
        apt.log(&format!(
            "debian: dependency cycle {module} -> {dep} broken"
        ));
    }
    let mut modules = Vec::with_capacity(res.order.len());
    let mut stripped = 0;
    for m in &res.order {
        let mut data = read_module(&modules_root.join(&m.path))?;
        stripped += usize::from(strip_signature(&mut data));
        drop_btf(&mut data);
        drop_ftrace_callsites(&mut data);
        modules.push(InitramfsModule {
            name: m.name.clone(),
            data,
        });
    }
    let names: Vec<&str> = res.order.iter().map(|m| m.name.as_str()).collect();
    apt.log(&format!(
        "debian: {} modules ({stripped} signatures stripped, BTF and ftrace call sites dropped: at \
         load the kernel would hash and RSA-verify each, parse the vmlinux BTF and look up the \
         symbol of every call site, minutes where guest kernel code is emulated): {}",
        names.len(),
        names.join(" ")
    ));

    let (busybox, busybox_deb) = deb::busybox(&mut apt, &dirs.work)?;
    let initrd = build_initramfs(&busybox, &modules)?;

    copy_atomic(&vmlinuz, &dirs.kernel())?;
    match &system_map {
        Some(map) => copy_atomic(map, &dirs.system_map())?,
        None => remove_path(&dirs.system_map())?,
    }
    write_atomic(&dirs.initrd(), &initrd)?;

    let mut stamp = Stamp::new();
    for (k, v) in recipe() {
        stamp.set(k, v);
    }
    stamp.set("image", "debian");
    stamp.set(
        "kernel.package",
        format!("{} {}", kernel_deb.name, kernel_deb.version),
    );
    stamp.set("kernel.release", release.as_str());
    stamp.set(
        "busybox.package",
        format!("{} {}", busybox_deb.name, busybox_deb.version),
    );
    stamp.set(
        "system_map",
        if system_map.is_some() { "yes" } else { "no" },
    );
    stamp.set("modules", names.join(","));
    stamp.set("modules.missing", res.missing.join(","));
    write_atomic(&dirs.stamp(), stamp.render().as_bytes())?;

    // The unpacked kernel is large and cheap to fetch again.
    remove_path(&dirs.work)?;
    apt.log(&format!(
        "debian: built {release} in {} (initrd {} KiB)",
        dirs.image.display(),
        initrd.len() / 1024
    ));
    Ok(dirs.paths())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_modules_cover_the_brief() {
        for m in [
            "virtio_pci",
            "virtio_mmio",
            "virtio_blk",
            "virtio_net",
            "virtio_console",
            "virtio_rng",
            "virtio_balloon",
            "vmw_vsock_virtio_transport",
            "ext4",
        ] {
            assert!(WANTED_MODULES.contains(&m), "{m}");
        }
    }

    #[test]
    fn debian_placeholder_system_map_is_not_real() {
        let dir = std::env::temp_dir().join(format!("vessel-sysmap-{}", std::process::id()));
        ensure_dir(&dir).unwrap();
        let placeholder = dir.join("placeholder");
        fs::write(
            &placeholder,
            "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n",
        )
        .unwrap();
        assert!(!is_real_system_map(&placeholder));
        let real = dir.join("real");
        let text: String = (0..200)
            .map(|i| format!("ffffffff81{i:06x} T sym_{i}\n"))
            .collect();
        fs::write(&real, text).unwrap();
        assert!(is_real_system_map(&real));
        assert!(!is_real_system_map(&dir.join("missing")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cached_image_needs_outputs_and_matching_stamp() {
        let root = std::env::temp_dir().join(format!("vessel-debian-cache-{}", std::process::id()));
        let dirs = ImageDirs::new(&root, "debian", "vmlinuz");
        ensure_dir(&dirs.image).unwrap();
        for p in [dirs.kernel(), dirs.initrd()] {
            fs::write(p, b"x").unwrap();
        }
        assert!(!up_to_date(&dirs), "no stamp yet");
        let mut stamp = Stamp::new();
        for (k, v) in recipe() {
            stamp.set(k, v);
        }
        fs::write(dirs.stamp(), stamp.render()).unwrap();
        assert!(up_to_date(&dirs));
        // build() returns the cached paths without touching apt.
        let mut lines = Vec::new();
        let paths = build(&root, &mut |l| lines.push(l.to_string())).unwrap();
        assert_eq!(paths.kernel, root.join("images/debian/vmlinuz"));
        assert_eq!(paths.initrd, root.join("images/debian/initrd.cpio"));
        assert_eq!(paths.system_map, None, "no System.map file");
        assert!(lines[0].contains("up to date"), "{lines:?}");
        // A changed init script (different hash) invalidates it.
        stamp.set("init", "0000000000000000");
        fs::write(dirs.stamp(), stamp.render()).unwrap();
        assert!(!up_to_date(&dirs));
        fs::remove_dir_all(&root).unwrap();
    }
}
