//! Disk images with an EFI System Partition (vfat), laid out as distributions lay them out
//! (systemd-boot's loader entries and kernels on the ESP; GRUB's stub `grub.cfg` on the ESP
//! and the real one on the ext4 root), made here (`make::gpt_esp_disk`, and `mkfs.fat` with
//! mtools where installed), then read by `find_linux`.

use std::path::{Path, PathBuf};
use std::process::Command;

use vessel_diskboot::{find_linux, make, DiskBootError};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-vfat-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(root: &Path, path: &str, data: &[u8]) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn run(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Runs `cmd`: `false` when it is not installed, a panic when it fails.
fn tool(cmd: &mut Command, what: &str) -> bool {
    match cmd.output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => {
            eprintln!("note: {what} is not installed");
            false
        }
    }
}

/// An ESP as systemd-boot lays it out: loader entries naming kernels under the machine id.
fn systemd_boot_esp(dir: &Path) -> PathBuf {
    let esp = dir.join("esp");
    write(&esp, "EFI/systemd/systemd-bootx64.efi", b"MZ");
    write(&esp, "loader/loader.conf", b"timeout 3\n");
    write(
        &esp,
        "loader/entries/0123abcd-6.10.0.conf",
        b"title Old Linux\nlinux /0123abcd/6.10.0/linux\n",
    );
    write(
        &esp,
        "loader/entries/0123abcd-6.11.4.conf",
        b"title Fedora Linux (6.11.4)\nversion 6.11.4\nlinux /0123abcd/6.11.4/linux\ninitrd /0123abcd/6.11.4/initrd\noptions root=UUID=1 ro\noptions quiet\n",
    );
    write(&esp, "0123abcd/6.10.0/linux", b"OLD-KERNEL");
    write(&esp, "0123abcd/6.11.4/linux", &kernel());
    write(&esp, "0123abcd/6.11.4/initrd", b"INITRD-ON-THE-ESP");
    esp
}

/// A kernel of several clusters.
fn kernel() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 253) as u8).collect()
}

#[test]
fn an_esp_with_loader_entries_boots_on_its_own_and_is_not_written() {
    let dir = scratch("bls");
    let disk = make::gpt_esp_disk(&dir, &systemd_boot_esp(&dir), 8, None).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let b = find_linux(&disk).unwrap();
    assert_eq!(b.title, "Fedora Linux (6.11.4)");
    assert_eq!(b.kernel, kernel());
    assert_eq!(b.initrd.as_deref(), Some(&b"INITRD-ON-THE-ESP"[..]));
    assert_eq!(b.cmdline, "root=UUID=1 ro quiet");
    assert_eq!(
        b.found_in,
        "partition 1 (vfat): /loader/entries/0123abcd-6.11.4.conf"
    );
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "scanning changed the image"
    );

    let overlay = dir.join("overlay.qcow2");
    if run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&disk)
        .arg(&overlay))
    {
        let top = std::fs::read(&overlay).unwrap();
        assert_eq!(find_linux(&overlay).unwrap(), b);
        assert!(std::fs::read(&overlay).unwrap() == top);
    } else {
        eprintln!("note: qemu-img (qemu-utils) is not installed: qcow2 not tried");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A root with a kernel, an initrd and the `grub.cfg` naming them.
fn root_with_grub(dir: &Path, grub_cfg: bool) -> PathBuf {
    let root = dir.join("root");
    write(&root, "boot/vmlinuz-6.1.0-test", b"KERNEL-ON-EXT4");
    write(&root, "boot/initrd.img-6.1.0-test", b"INITRD-ON-EXT4");
    write(&root, "etc/hostname", b"test\n");
    if grub_cfg {
        write(
            &root,
            "boot/grub/grub.cfg",
            b"set default=\"0\"\nmenuentry 'Debian GNU/Linux' {\n\tlinux /boot/vmlinuz-6.1.0-test root=LABEL=root ro\n\tinitrd /boot/initrd.img-6.1.0-test\n}\n",
        );
    }
    root
}

/// `make::gpt_esp_disk` with an ext4 root; `None` without mkfs.ext4.
fn esp_and_root(dir: &Path, esp: &Path, root: &Path) -> Option<PathBuf> {
    match make::gpt_esp_disk(dir, esp, 4, Some((root, 8))) {
        Ok(d) => Some(d),
        Err(e @ make::MakeError::NoMkfs(_)) => {
            eprintln!("note: {e}");
            None
        }
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn an_esp_grub_stub_does_not_hide_the_real_grub_cfg() {
    let dir = scratch("stub");
    let esp = dir.join("esp");
    // What Debian's and Ubuntu's ESPs hold: a grub.cfg that finds the root and loads its own.
    write(&esp, "EFI/debian/grubx64.efi", b"MZ");
    write(
        &esp,
        "EFI/debian/grub.cfg",
        b"search.fs_uuid 0f4c1b2e-0000-4000-8000-000000000001 root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n",
    );
    let Some(disk) = esp_and_root(&dir, &esp, &root_with_grub(&dir, true)) else {
        return;
    };
    let b = find_linux(&disk).unwrap();
    assert_eq!(b.title, "Debian GNU/Linux");
    assert_eq!(b.kernel, b"KERNEL-ON-EXT4");
    assert_eq!(b.initrd.as_deref(), Some(&b"INITRD-ON-EXT4"[..]));
    assert_eq!(b.cmdline, "root=LABEL=root ro");
    assert_eq!(b.found_in, "partition 2 (ext4): /boot/grub/grub.cfg");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_esp_grub_cfg_with_entries_boots_kernels_from_the_root() {
    let dir = scratch("espcfg");
    let esp = dir.join("esp");
    write(
        &esp,
        "EFI/fedora/grub.cfg",
        b"menuentry 'Fedora' {\n\tlinuxefi /boot/vmlinuz-6.1.0-test root=LABEL=root\n\tinitrdefi /boot/initrd.img-6.1.0-test\n}\n",
    );
    let Some(disk) = esp_and_root(&dir, &esp, &root_with_grub(&dir, false)) else {
        return;
    };
    let b = find_linux(&disk).unwrap();
    assert_eq!(
        (b.title.as_str(), &b.kernel[..]),
        ("Fedora", &b"KERNEL-ON-EXT4"[..])
    );
    assert_eq!(b.initrd.as_deref(), Some(&b"INITRD-ON-EXT4"[..]));
    assert_eq!(b.found_in, "partition 1 (vfat): /EFI/fedora/grub.cfg");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fat_partition_with_nothing_to_boot_is_named_in_the_error() {
    let dir = scratch("nothing");
    let esp = dir.join("esp");
    write(&esp, "EFI/BOOT/BOOTX64.EFI", b"MZ");
    // A stub with no entry, and a loader entry naming no kernel.
    write(&esp, "EFI/BOOT/grub.cfg", b"configfile /x/grub.cfg\n");
    write(&esp, "loader/entries/a.conf", b"title nothing\n");
    let disk = make::gpt_esp_disk(&dir, &esp, 4, None).unwrap();
    let e = find_linux(&disk).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(&e, DiskBootError::NoLinux { looked, .. }
            if looked == &["partition 1 (vfat): no grub.cfg or loader entry"]),
        "{text}"
    );
    assert!(text.contains("through firmware"), "{text}");

    // A loader entry whose kernel is missing names it.
    write(&esp, "loader/entries/b.conf", b"linux /gone/linux\n");
    let sub = dir.join("b");
    std::fs::create_dir_all(&sub).unwrap();
    let disk = make::gpt_esp_disk(&sub, &esp, 4, None).unwrap();
    let e = find_linux(&disk).unwrap_err();
    assert!(
        matches!(&e, DiskBootError::Read { what, .. } if what == "the kernel /gone/linux"),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cloud_init_seed_is_a_vfat_disk_with_nothing_to_boot() {
    let dir = scratch("seed");
    let seed = vessel_diskboot::cloudinit::build_seed(
        &vessel_diskboot::cloudinit::SeedConfig::new(b"#cloud-config\n".to_vec()),
    )
    .unwrap();
    let path = dir.join("seed.img");
    std::fs::write(&path, &seed).unwrap();
    let text = find_linux(&path).unwrap_err().to_string();
    assert!(
        text.contains("(looked at: partition 0 (vfat): no grub.cfg or loader entry)"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn filesystems_made_by_mkfs_fat_read_as_fat12_16_and_32() {
    let dir = scratch("mkfs");
    let esp = systemd_boot_esp(&dir);
    for (bits, kib) in [("12", 2048), ("16", 16384), ("32", 40960)] {
        let img = dir.join(format!("fat{bits}.img"));
        let mut mkfs = Command::new("mkfs.fat");
        mkfs.args(["-F", bits, "-n", "ESP", "-C"])
            .arg(&img)
            .arg(kib.to_string());
        let mut mcopy = Command::new("mcopy");
        mcopy.args(["-s", "-i"]).arg(&img);
        for e in ["EFI", "loader", "0123abcd"] {
            mcopy.arg(esp.join(e));
        }
        mcopy.arg("::/");
        if !tool(&mut mkfs, "mkfs.fat (dosfstools)") || !tool(&mut mcopy, "mcopy (mtools)") {
            break;
        }
        let before = std::fs::read(&img).unwrap();
        let b = find_linux(&img).unwrap();
        assert_eq!(b.kernel, kernel(), "FAT{bits}");
        assert_eq!(b.initrd.as_deref(), Some(&b"INITRD-ON-THE-ESP"[..]));
        assert_eq!(
            b.found_in,
            "partition 0 (vfat): /loader/entries/0123abcd-6.11.4.conf"
        );
        assert!(std::fs::read(&img).unwrap() == before);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
