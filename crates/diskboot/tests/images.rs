//! Disk images made here the way cloud images are laid out (a GPT disk with an ext4 root
//! holding `/boot` and GRUB's configuration, `mkfs.ext4 -d`, no loop devices), then read by
//! `find_linux`, raw and as a qcow2 overlay.

use std::path::{Path, PathBuf};
use std::process::Command;

use vessel_diskboot::{find_linux, DiskBootError};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-diskboot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// A GPT disk of `fs_mib` MiB of ext4 made from `root`; `None` without mkfs.ext4.
fn gpt_disk(dir: &Path, root: &Path, fs_mib: u64) -> Option<PathBuf> {
    match vessel_diskboot::make::gpt_ext4_disk(dir, root, fs_mib) {
        Ok(d) => Some(d),
        Err(e @ vessel_diskboot::make::MakeError::NoMkfs(_)) => {
            eprintln!("note: {e}");
            None
        }
        Err(e) => panic!("{e:?}"),
    }
}

/// A root with a kernel, two initrds and a `grub.cfg` naming them.
fn root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::write(root.join("boot/vmlinuz-6.1.0-test"), b"KERNEL-BYTES").unwrap();
    std::fs::write(root.join("boot/initrd.img-6.1.0-test"), b"INITRD-ONE").unwrap();
    std::fs::write(root.join("boot/extra.img"), b"INITRD-TWO").unwrap();
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        "set default=\"0\"\nmenuentry 'Test Linux' {\n\tsearch --set=root --fs-uuid 1\n\tlinux /boot/vmlinuz-6.1.0-test root=/dev/vda1 console=ttyS0 $vt_handoff\n\tinitrd /boot/initrd.img-6.1.0-test /boot/extra.img\n}\n",
    )
    .unwrap();
    root
}

#[test]
fn a_gpt_image_boots_its_grub_default_raw_and_as_qcow2() {
    let dir = scratch("gpt");
    let Some(disk) = gpt_disk(&dir, &root(&dir), 8) else {
        eprintln!("note: mkfs.ext4 (e2fsprogs) is not installed");
        return;
    };
    let b = find_linux(&disk).unwrap();
    assert_eq!(b.title, "Test Linux");
    assert_eq!(b.kernel, b"KERNEL-BYTES");
    assert_eq!(b.initrd.as_deref(), Some(&b"INITRD-ONEINITRD-TWO"[..]));
    assert_eq!(b.cmdline, "root=/dev/vda1 console=ttyS0");
    assert!(b.found_in.contains("/boot/grub/grub.cfg"), "{}", b.found_in);

    // The same disk as a qcow2 overlay over it.
    let overlay = dir.join("overlay.qcow2");
    if run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&disk)
        .arg(&overlay))
    {
        assert_eq!(find_linux(&overlay).unwrap(), b);
    } else {
        eprintln!("note: qemu-img (qemu-utils) is not installed: qcow2 not tried");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bare_filesystem_with_loader_entries_boots_its_newest_entry() {
    let dir = scratch("bls");
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("loader/entries")).unwrap();
    std::fs::write(root.join("vmlinuz-1"), b"OLD").unwrap();
    std::fs::write(root.join("vmlinuz-2"), b"NEW").unwrap();
    std::fs::write(
        root.join("loader/entries/a-1.conf"),
        "title One\nlinux /vmlinuz-1\noptions quiet\n",
    )
    .unwrap();
    std::fs::write(
        root.join("loader/entries/a-2.conf"),
        "title Two\nlinux /vmlinuz-2\noptions root=LABEL=x\n",
    )
    .unwrap();
    let fs = dir.join("fs.ext4");
    if !run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&fs)
        .arg("4M"))
    {
        eprintln!("note: mkfs.ext4 (e2fsprogs) is not installed");
        return;
    }
    let b = find_linux(&fs).unwrap();
    assert_eq!((b.title.as_str(), &b.kernel[..]), ("Two", &b"NEW"[..]));
    assert_eq!(b.initrd, None);
    assert_eq!(b.cmdline, "root=LABEL=x");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn images_without_a_bootable_linux_say_what_was_looked_at() {
    let dir = scratch("none");
    // An ext4 root without any bootloader configuration.
    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("etc")).unwrap();
    let Some(disk) = gpt_disk(&dir, &empty, 4) else {
        eprintln!("note: mkfs.ext4 (e2fsprogs) is not installed");
        return;
    };
    let e = find_linux(&disk).unwrap_err();
    assert!(matches!(e, DiskBootError::NoLinux { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("no grub.cfg or loader entry"), "{text}");
    assert!(text.contains("through firmware"), "{text}");
    // Zeros: no partition table, no filesystem.
    let zeros = dir.join("zeros.img");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    let text = find_linux(&zeros).unwrap_err().to_string();
    assert!(text.contains("not ext2/3/4"), "{text}");
    // A grub.cfg naming a kernel that is not there.
    let broken = dir.join("broken");
    std::fs::create_dir_all(broken.join("boot/grub")).unwrap();
    std::fs::write(
        broken.join("boot/grub/grub.cfg"),
        "menuentry 'Gone' {\n linux /boot/vmlinuz-gone\n}\n",
    )
    .unwrap();
    let sub = dir.join("b");
    std::fs::create_dir_all(&sub).unwrap();
    let disk = gpt_disk(&sub, &broken, 4).unwrap();
    let e = find_linux(&disk).unwrap_err();
    assert!(
        matches!(&e, DiskBootError::Read { what, .. } if what.contains("vmlinuz-gone")),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
