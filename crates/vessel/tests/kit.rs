//! The guest kit end to end: real Linux boots to `VESSEL-GUEST-READY` and powers off with
//! status 0. `minimal` runs in CI (`VESSEL_E2E=1`, set by scripts/test.sh); `debian` runs in
//! the extended test command (`VESSEL_E2E_DEBIAN=1`, scripts/test.sh --extended).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Generous: guest kernel code is emulated on nested hosts (see README).
const MINIMAL_LIMIT: Duration = Duration::from_secs(15 * 60);
const DEBIAN_LIMIT: Duration = Duration::from_secs(60 * 60);

fn boot_kit(image: &str, cpus: u32, memory: &str, limit: Duration) {
    let Some((kernel, initrd)) = kit_image(image) else {
        return;
    };
    let dir = scratch(&format!("kit-{image}-{cpus}"));
    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cpus", &cpus.to_string(), "--memory", memory])
        .args(["--append", "vessel.poweroff", "--stats"])
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, limit);
    let took = t.elapsed();
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: String = console
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        out.status.success(),
        "{image} on {cpus} vCPUs failed: {}\nconsole tail:\n{tail}",
        text(&out.stderr)
    );
    assert!(
        console
            .lines()
            .any(|l| l.trim_end() == "VESSEL-GUEST-READY"),
        "{image} never got ready:\n{tail}"
    );
    if cpus > 1 {
        assert!(
            console.contains(&format!("Brought up 1 node, {cpus} CPUs")),
            "{image}: not all {cpus} vCPUs came up:\n{tail}"
        );
    }
    eprintln!(
        "{image} on {cpus} vCPU(s): ready and powered off in {:.1} s\n{}",
        took.as_secs_f64(),
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn minimal_boots_and_powers_off_on_one_vcpu() {
    boot_kit("minimal", 1, "128M", MINIMAL_LIMIT);
}

#[test]
fn minimal_boots_and_powers_off_on_two_vcpus() {
    boot_kit("minimal", 2, "128M", MINIMAL_LIMIT);
}

#[test]
fn debian_boots_and_powers_off() {
    if std::env::var("VESSEL_E2E_DEBIAN").is_ok_and(|v| v == "1") {
        boot_kit("debian", 2, "256M", DEBIAN_LIMIT);
    } else {
        eprintln!(
            "note: the debian boot runs in the extended test command (scripts/test.sh --extended)"
        );
    }
}

/// The `minimal` kernel and initramfs in a cloud-style disk (GPT, ext4 root, GRUB's
/// `grub.cfg`), as a qcow2 overlay: `vessel run --disk` with no kernel finds them in the
/// bootloader's configuration and boots them directly.
#[test]
fn minimal_boots_from_a_cloud_style_qcow2_disk_without_a_kernel() {
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    let dir = scratch("kit-disk-boot");
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::copy(&kernel, root.join("boot/vmlinuz-minimal")).unwrap();
    std::fs::copy(&initrd, root.join("boot/initrd.img-minimal")).unwrap();
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        format!(
            "set default=\"0\"\nmenuentry 'Vessel minimal' {{\n\tlinux /boot/vmlinuz-minimal {}\n\tinitrd /boot/initrd.img-minimal\n}}\n",
            vessel_vmm::DEFAULT_CMDLINE
        ),
    )
    .unwrap();
    let size =
        std::fs::metadata(&kernel).unwrap().len() + std::fs::metadata(&initrd).unwrap().len();
    let disk = vessel_diskboot::make::gpt_ext4_disk(&dir, &root, (size >> 20) + 16).unwrap();
    let overlay = dir.join("disk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&disk)
        .arg(&overlay)
        .status()
        .expect("qemu-img (Debian's qemu-utils) is needed");
    assert!(made.success());
    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.arg("run")
        .arg(format!("--disk=path={}", overlay.display()))
        .args(["--memory", "128M", "--append", "vessel.poweroff", "--stats"])
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, MINIMAL_LIMIT);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{console}");
    assert!(stderr.contains("booting 'Vessel minimal' from"), "{stderr}");
    assert!(
        console
            .lines()
            .any(|l| l.trim_end() == "VESSEL-GUEST-READY"),
        "never got ready:\n{console}"
    );
    eprintln!(
        "minimal from a qcow2 disk: ready and powered off in {:.1} s\n{stderr}",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
