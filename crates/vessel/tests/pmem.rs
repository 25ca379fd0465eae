//! virtio-pmem end to end (CI, `VESSEL_E2E=1`): the kit's `minimal` kernel boots with no
//! initramfs from a root file system on a pmem device (`root=on` puts `root=/dev/pmem0 rw` on
//! the command line; `rootflags=dax` mounts it with DAX), on virtio-mmio. Its init (the kit's
//! busybox and a script) mounts a second pmem device, on PCI, with `-o dax`, reads a file the
//! host wrote there, writes one and syncs (the guest's flush); reads a third, read-only device
//! and writes to it (the writes are dropped); and powers off. The host then reads the guest's
//! file from the backing file and finds the read-only one unchanged.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(15 * 60);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
echo "PMEM-ROOT $(grep ' / ' /proc/mounts | grep -v rootfs)"
mkdir -p /data
mount -t ext4 -o dax /dev/pmem1 /data && echo "PMEM-DATA $(grep ' /data ' /proc/mounts)"
echo "PMEM-HOST-FILE $(cat /data/from-host.txt)"
echo written-by-the-guest > /data/from-guest.txt
sync
umount /data
echo "PMEM-RO $(head -c 16 /dev/pmem2)"
# Writes to the read-only device exit to the VMM, which drops them: the guest reads the file.
dd if=/dev/zero of=/dev/pmem2 bs=4096 count=1 oflag=direct 2>/dev/null
echo "PMEM-RO-AFTER-WRITE $(head -c 16 /dev/pmem2)"
echo "PMEM-SIZES $(cat /sys/block/pmem0/size) $(cat /sys/block/pmem1/size) $(cat /sys/block/pmem2/size)"
echo PMEM-DONE
sync
poweroff -f
"#;

/// An ext4 file system with 4 KiB blocks (DAX needs the page size) holding `files`.
fn ext4_4k(img: &Path, files: &Path, size_mib: u64) {
    let f = std::fs::File::create(img).unwrap();
    f.set_len(size_mib << 20).unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(files)
        .arg(img)
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(out.status.success(), "mkfs.ext4: {}", text(&out.stderr));
}

/// The kit's static busybox, from its initramfs.
fn kit_busybox(initrd: &Path) -> Vec<u8> {
    let archive = std::fs::read(initrd).unwrap();
    vessel_image::cpio::parse(&archive)
        .unwrap()
        .into_iter()
        .find(|e| e.name.trim_start_matches('/') == "bin/busybox")
        .expect("bin/busybox in the kit's initramfs")
        .data
}

fn read_from_image(img: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(img)
        .output()
        .expect("run debugfs");
    text(&out.stdout)
}

#[test]
fn minimal_guest_boots_from_pmem_with_dax_and_shares_files_with_the_host() {
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    let dir = scratch("pmem");
    let root_files = dir.join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root_files.join(d)).unwrap();
    }
    let busybox = root_files.join("bin/busybox");
    std::fs::write(&busybox, kit_busybox(&initrd)).unwrap();
    std::fs::write(root_files.join("init"), INIT).unwrap();
    assert!(sh(&format!(
        "chmod 755 {} {}",
        busybox.display(),
        root_files.join("init").display()
    )));
    let root = dir.join("root.ext4");
    ext4_4k(&root, &root_files, 24);

    let data_files = dir.join("data");
    std::fs::create_dir_all(&data_files).unwrap();
    std::fs::write(data_files.join("from-host.txt"), "written-by-the-host\n").unwrap();
    let data = dir.join("data.ext4");
    // 5 MiB, not a multiple of 2 MiB: the region is 6 MiB, anonymous memory past the file.
    ext4_4k(&data, &data_files, 5);

    let ro = dir.join("ro.img");
    let mut ro_bytes = b"READ-ONLY-PMEM!!".to_vec();
    ro_bytes.resize(4096, 0x77);
    std::fs::write(&ro, &ro_bytes).unwrap();

    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", "128M"])
        .args(["--append", "rootflags=dax rootwait init=/init"])
        // virtio-mmio devices are probed first: the root device is /dev/pmem0.
        .arg(format!(
            "--pmem=path={},root=on,transport=mmio",
            root.display()
        ))
        .arg(format!(
            "--pmem=path={},transport=pci,iops=1000",
            data.display()
        ))
        .arg(format!(
            "--pmem=path={},readonly=on,transport=pci",
            ro.display()
        ))
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, LIMIT);
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = console_text.lines().rev().take(60).collect();
    let tail: String = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "vessel failed: {}\nconsole tail:\n{tail}",
        text(&out.stderr)
    );
    eprintln!("pmem guest finished in {:.1} s", t.elapsed().as_secs_f64());
    let line = |tag: &str| {
        console_text
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} line\n{tail}"))
            .trim()
            .to_string()
    };
    // The kernel mounted the root file system from /dev/pmem0, read-write, with DAX.
    let root_line = line("PMEM-ROOT ");
    assert!(root_line.contains(" / ext4 rw"), "{root_line}");
    assert!(root_line.contains("dax"), "{root_line}");
    let data_line = line("PMEM-DATA ");
    assert!(
        data_line.starts_with("/dev/pmem1 /data ext4 rw"),
        "{data_line}"
    );
    assert!(data_line.contains("dax"), "{data_line}");
    assert_eq!(line("PMEM-HOST-FILE "), "written-by-the-host");
    assert_eq!(line("PMEM-RO "), "READ-ONLY-PMEM!!");
    assert_eq!(line("PMEM-RO-AFTER-WRITE "), "READ-ONLY-PMEM!!");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("of read-only pmem device 2; its writes are dropped"),
        "{stderr}"
    );
    // Regions are the files' sizes rounded up to 2 MiB (in 512-byte sectors).
    assert_eq!(line("PMEM-SIZES "), "49152 12288 4096");
    assert!(console_text.contains("PMEM-DONE"), "{tail}");
    // The guest's file is in the backing file; the read-only one is untouched.
    assert_eq!(
        read_from_image(&data, "/from-guest.txt"),
        "written-by-the-guest\n"
    );
    assert_eq!(std::fs::read(&ro).unwrap(), ro_bytes);
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 5 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}
