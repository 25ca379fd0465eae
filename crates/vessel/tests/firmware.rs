//! Booting through firmware: Debian's SeaBIOS runs on Vessel's fw_cfg, i440FX and BAR
//! reassignment, reads a virtio-blk disk, and boots GRUB from the kit's cloud-style disk
//! (`scripts/make-boot-disk.sh`); the same disk also boots directly from its `grub.cfg`.
//! The SeaBIOS tests need Debian's `seabios` (scripts/install-deps.sh); the GRUB ones the
//! `minimal` kit image (`VESSEL_E2E=1`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// OVMF runs about 1 G instructions before it boots anything: 15-17 minutes where guest
/// kernel mode is emulated (see README), then GRUB and the kernel.
const UEFI_LIMIT: Duration = Duration::from_secs(50 * 60);
const FIRMWARE_LIMIT: Duration = Duration::from_secs(120);
/// Generous: guest kernel code is emulated on nested hosts (see README).
const MINIMAL_LIMIT: Duration = Duration::from_secs(15 * 60);

fn have_seabios() -> bool {
    let there = Path::new(SEABIOS).exists();
    if !there {
        eprintln!("note: {SEABIOS} is missing (Debian's seabios); skipping");
    }
    there
}

/// A 4 MiB disk of zeros: no boot sector, no partition, no Linux.
fn empty_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("empty.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    disk
}

/// The OVMF boots run in the extended tests only (`VESSEL_E2E_UEFI=1`, which
/// `scripts/test.sh --extended` sets).
fn uefi_extended() -> bool {
    if !std::env::var("VESSEL_E2E_UEFI").is_ok_and(|v| v == "1") {
        eprintln!("note: OVMF takes 15+ minutes on nested hosts: VESSEL_E2E_UEFI=1 boots it");
        return false;
    }
    assert!(
        Path::new(OVMF_CODE).exists(),
        "{OVMF_CODE} is missing: scripts/install-deps.sh installs Debian's ovmf"
    );
    true
}

fn console_text(path: &Path) -> String {
    // SeaBIOS's serial console draws with escape sequences; keep the words.
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .replace('\x1b', "")
}

/// A disk with no boot sector and no Linux: Vessel says it cannot boot it directly, falls
/// back to SeaBIOS, which finds the virtio disk behind the BAR it assigned, reads it, says
/// it is not bootable, and resets, which ends the VM.
#[test]
fn a_disk_with_nothing_to_boot_falls_back_to_seabios_which_says_so() {
    if !have_seabios() {
        return;
    }
    let dir = scratch("fw-empty");
    let disk = empty_disk(&dir);
    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.arg("run")
        .arg(format!("--disk=path={}", disk.display()))
        .args(["--memory", "128M", "--log-level", "debug", "--stats"])
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, FIRMWARE_LIMIT);
    let stderr = text(&out.stderr);
    let console = console_text(&console);
    assert!(
        stderr.contains("has no Linux Vessel can boot directly"),
        "{stderr}"
    );
    assert!(stderr.contains("falling back to firmware"), "{stderr}");
    assert!(stderr.contains("the guest reset"), "{stderr}");
    // The firmware's own log (port 0x402) shows the platform it found.
    for line in [
        "Found QEMU fw_cfg",
        "QEMU fw_cfg DMA interface supported",
        "init bdf=00:00.0 id=8086:1237",
        "found virtio-blk at 00:01.0",
        "using modern (1.0) virtio mode",
        "via xsdt",
    ] {
        assert!(
            stderr.contains(line),
            "no {line:?} in the firmware log:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("BAR 0 moved from"),
        "SeaBIOS moves the BAR: {stderr}"
    );
    assert!(console.contains("SeaBIOS"), "{console}");
    assert!(
        console.contains("Boot failed: not a bootable disk"),
        "SeaBIOS read the disk: {console}"
    );
    eprintln!(
        "SeaBIOS to 'no bootable device' and reset: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--firmware` with a missing image, or an image of a size no firmware has, is refused
/// before any VM is made.
#[test]
fn bad_firmware_images_are_refused_with_a_reason() {
    let dir = scratch("fw-bad");
    let out = vessel()
        .args(["run", "--firmware", "/nonexistent/bios.bin"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("/nonexistent/bios.bin is missing") && e.contains("seabios"),
        "{e}"
    );
    let odd = dir.join("odd.bin");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let out = vessel()
        .args(["run", "--memory", "64M", "--firmware"])
        .arg(&odd)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("is 1000 bytes"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A UEFI-style firmware of the test's own (64 KiB of code, the shape of OVMF's split
/// images, with a 64 KiB variable-store template beside it): from the reset vector it goes
/// to 32-bit protected mode, programs "VESSEL" into its variable store through the flash's
/// command interface (`0x10`, byte), reads the PM base from the PIIX4 power-management
/// function (00:01.3, register 0x40) through ports 0xcf8/0xcfc, and powers off with an S5
/// write to that base's PM1 control register.
/// What [`tiny_uefi`] does after programming its flash.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    PowerOff,
    /// Halts, interrupts off, for ever.
    Halt,
    /// Copies the kernel command line fw_cfg has (key 0x15) to COM1, then powers off.
    EchoCmdline,
}

fn tiny_uefi(dir: &Path, then: Then) -> PathBuf {
    use iced_x86::code_asm::*;
    const SIZE: usize = 64 << 10;
    const VARS_BASE: u32 = ((1u64 << 32) - 2 * SIZE as u64) as u32;
    let rom = |off: usize| 0xffff_0000u32 + off as u32;
    let (code32_at, gdt_at, start_at) = (0xfe00usize, 0xff00usize, 0xff80usize);
    let mut img = vec![0xf4u8; SIZE];
    let mut a = CodeAssembler::new(32).unwrap();
    let body = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(ax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(edi, VARS_BASE + 0x100)?;
        for b in b"VESSEL" {
            a.mov(byte_ptr(edi), 0x10)?;
            a.mov(byte_ptr(edi), *b as u32)?;
            a.inc(edi)?;
        }
        a.mov(byte_ptr(edi), 0xff)?;
        if then == Then::Halt {
            a.cli()?;
            return a.hlt();
        }
        if then == Then::EchoCmdline {
            let (mut next, mut done) = (a.create_label(), a.create_label());
            a.mov(dx, 0x510)?;
            a.mov(ax, 0x15)?;
            a.out(dx, ax)?;
            a.set_label(&mut next)?;
            a.mov(dx, 0x511)?;
            a.in_(al, dx)?;
            a.test(al, al)?;
            a.jz(done)?;
            a.mov(dx, 0x3f8)?;
            a.out(dx, al)?;
            a.jmp(next)?;
            a.set_label(&mut done)?;
        }
        a.mov(eax, 0x8000_0b40u32)?;
        a.mov(dx, 0xcf8)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfc)?;
        a.in_(eax, dx)?;
        a.and(eax, 0xffc0)?;
        a.add(eax, 4)?;
        a.mov(edx, eax)?;
        a.mov(ax, 0x3400)?; // SLP_EN | S5 << 10
        a.out(dx, ax)?;
        a.hlt()
    };
    body(&mut a).unwrap();
    let code32 = a.assemble(u64::from(rom(code32_at))).unwrap();
    img[code32_at..code32_at + code32.len()].copy_from_slice(&code32);
    // The GDT (null, flat 32-bit code, flat data) and its descriptor for lgdt. The
    // descriptors are marked accessed already, as firmware GDTs in ROM are: the CPU would
    // otherwise write that bit into read-only memory when it loads them.
    let gdtr_at = gdt_at;
    let table_at = gdt_at + 0x10;
    img[gdtr_at..gdtr_at + 2].copy_from_slice(&23u16.to_le_bytes());
    img[gdtr_at + 2..gdtr_at + 6].copy_from_slice(&rom(table_at).to_le_bytes());
    for (i, d) in [0u64, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .enumerate()
    {
        img[table_at + 8 * i..table_at + 8 * i + 8].copy_from_slice(&d.to_le_bytes());
    }
    // 16-bit: cli; o32 lgdt cs:[gdtr]; CR0.PE; jmp dword 0x08:code32.
    let mut start = vec![0xfa, 0x66, 0x2e, 0x0f, 0x01, 0x16];
    start.extend_from_slice(&(gdtr_at as u16).to_le_bytes());
    start.extend_from_slice(&[0x0f, 0x20, 0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0]);
    start.extend_from_slice(&[0x66, 0xea]);
    start.extend_from_slice(&rom(code32_at).to_le_bytes());
    start.extend_from_slice(&0x08u16.to_le_bytes());
    img[start_at..start_at + start.len()].copy_from_slice(&start);
    // The reset vector, 16 bytes below the top: jmp short start.
    let rel = start_at as i64 - (0xfff0 + 2);
    img[0xfff0] = 0xeb;
    img[0xfff1] = rel as i8 as u8;
    let code = dir.join("TINY_CODE.fd");
    std::fs::write(&code, img).unwrap();
    std::fs::write(dir.join("TINY_VARS.fd"), vec![0xffu8; SIZE]).unwrap();
    code
}

/// What OVMF relies on, with a firmware small enough for CI: the code image at the top of
/// 4 GiB with its variable store as flash right below, a per-VM copy of the template that
/// keeps what the firmware programmed after the VM stops, the PIIX4 PM function telling
/// where the PM registers are, and an S5 power-off there.
#[test]
fn a_uefi_firmware_programs_its_own_variable_store_and_powers_off() {
    let dir = scratch("fw-tiny-uefi");
    let code = tiny_uefi(&dir, Then::PowerOff);
    let store = dir.join("store.fd");
    for run in 0..2 {
        let out = vessel()
            .args(["run", "--memory", "64M", "--stats", "--firmware"])
            .arg(&code)
            .arg("--firmware-vars")
            .arg(&store)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "run {run}: {stderr}");
        assert!(stderr.contains("the guest powered off"), "{stderr}");
        let vars = std::fs::read(&store).unwrap();
        assert_eq!(vars.len(), 64 << 10, "the store keeps its size");
        assert_eq!(&vars[0x100..0x106], b"VESSEL");
        assert!(vars[..0x100]
            .iter()
            .chain(&vars[0x106..])
            .all(|&b| b == 0xff));
    }
    let template = std::fs::read(dir.join("TINY_VARS.fd")).unwrap();
    assert!(
        template.iter().all(|&b| b == 0xff),
        "the template is never written"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Takes a full snapshot of the paused `vm` into `dir`, stops it, runs `between`, and
/// restores it (its console to `serial`, else the snapshot's).
fn snapshot_stop_restore(
    vm: vessel_vmm::running::RunningVm,
    dir: &Path,
    serial: Option<vessel_vmm::SerialTarget>,
    between: impl FnOnce(),
) -> (vessel_vmm::Vm, vessel_vmm::snapshot::VmSnapshot) {
    use vessel_vmm::restore::{restore, RestoreRequest};
    use vessel_vmm::snapshot::{NoApi, SnapshotKind, SnapshotRequest};
    let (state, memory) = (dir.join("vm.state"), dir.join("vm.mem"));
    let h = vm.handle();
    h.snapshot(&SnapshotRequest::<NoApi> {
        state: state.clone(),
        memory: memory.clone(),
        kind: SnapshotKind::Full,
        api: None,
    })
    .unwrap();
    h.stop();
    vm.wait().unwrap();
    between();
    restore(&RestoreRequest {
        state,
        memory,
        serial,
        track_dirty_pages: None,
        working_set: None,
    })
    .unwrap()
}

/// `--firmware` with `--kernel`: the firmware gets the kernel, initramfs and command line
/// through fw_cfg (QEMU's `-kernel`, what OVMF's kernel loader reads); the command line is
/// composed as for a direct boot (here `--cmdline` plus `--append`). A kernel that is not a
/// bzImage is refused: fw_cfg hands over its setup and the rest separately.
#[test]
fn a_firmware_reads_the_kernel_command_line_from_fw_cfg() {
    let dir = scratch("fw-tiny-kernel");
    let code = tiny_uefi(&dir, Then::EchoCmdline);
    let mut bzimage = vec![0u8; 4096];
    bzimage[0x1f1] = 1;
    bzimage[0x202..0x206].copy_from_slice(b"HdrS");
    let (kernel, elf) = (dir.join("bzImage"), dir.join("vmlinux"));
    std::fs::write(&kernel, &bzimage).unwrap();
    std::fs::write(&elf, b"\x7fELF not a bzImage").unwrap();
    let console = dir.join("console.txt");
    let run = |k: &Path| {
        vessel()
            .args(["run", "--memory", "64M", "--stats", "--nested", "off"])
            .arg("--firmware")
            .arg(&code)
            .arg(format!(
                "--firmware-vars={}",
                dir.join("store.fd").display()
            ))
            .arg("--kernel")
            .arg(k)
            .args(["--cmdline", "console=ttyS0 from=fw_cfg", "--append", "x=1"])
            .arg(format!("--serial=file={}", console.display()))
            .output()
            .unwrap()
    };
    let out = run(&kernel);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("the guest powered off"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "console=ttyS0 from=fw_cfg x=1"
    );
    let out = run(&elf);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("bzImage"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A UEFI guest's snapshot holds its variable store: a VM whose firmware has programmed
/// its flash is snapshotted; the store file is then overwritten (as by another VM using
/// it); the restore puts the snapshot's variables back in the store.
#[test]
fn a_uefi_snapshot_keeps_the_variable_store() {
    use vessel_vmm::firmware::Firmware;
    use vessel_vmm::{Payload, Vm, VmConfig};

    let dir = scratch("fw-uefi-snapshot");
    let code = tiny_uefi(&dir, Then::Halt);
    let store = dir.join("store.fd");
    let fw = Firmware::resolve(code.to_str().unwrap())
        .unwrap()
        .with_vars_store(store.clone())
        .unwrap();
    let config = VmConfig {
        boot: Payload::Firmware(fw),
        memory: 64 << 20,
        ..Default::default()
    };
    let programmed = |p: &Path| std::fs::read(p).is_ok_and(|v| &v[0x100..0x106] == b"VESSEL");
    let vm = Vm::build(&config).unwrap().start().unwrap();
    let h = vm.handle();
    let t = Instant::now();
    while !programmed(&store) {
        assert!(
            t.elapsed() < FIRMWARE_LIMIT,
            "the firmware never wrote its flash"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    h.pause().unwrap();
    let (restored, snap) = snapshot_stop_restore(vm, &dir, None, || {
        std::fs::write(&store, vec![0xffu8; 64 << 10]).unwrap();
    });
    assert!(
        snap.firmware_flash.is_some(),
        "the state file holds the flash"
    );
    assert!(programmed(&store), "the restore put the variables back");
    let running = restored.start().unwrap();
    running.handle().stop();
    running.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The kit's cloud-style disk: GPT with a BIOS boot partition, an ESP and an ext4 root
/// holding the minimal kernel (bzImage) and initramfs, GRUB for BIOS and EFI, as a qcow2
/// overlay on a qcow2 base. `None` when the kit is not built and not required.
fn boot_disk(dir: &Path) -> Option<PathBuf> {
    boot_disk_of(dir, "minimal")
}

/// [`boot_disk`] with the kernel and initramfs of kit image `image` (`minimal`: its LZ4
/// bzImage; `debian`: Debian's own `vmlinuz`).
fn boot_disk_of(dir: &Path, image: &str) -> Option<PathBuf> {
    kit_image(image)?;
    let out = vessel().args(["image", "build", image]).output().unwrap();
    let stdout = text(&out.stdout);
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).map(str::to_string))
    };
    let bzimage = line("bzimage=")
        .or_else(|| line("kernel="))
        .expect("vessel image build prints bzimage= or kernel=");
    let initrd = line("initrd=").expect("and initrd=");
    // Through firmware, the command line is GRUB's: on a nested host it must carry the
    // parameters Vessel otherwise adds itself.
    let params = vessel().args(["image", "kernel-params"]).output().unwrap();
    assert!(params.status.success(), "{}", text(&params.stderr));
    let cmdline = format!(
        "{} vessel.poweroff {}",
        vessel_vmm::DEFAULT_CMDLINE,
        text(&params.stdout).trim()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-boot-disk.sh");
    let cache = vessel_image::cache_dir().join(match image {
        "minimal" => "images/boot-disk".to_string(),
        other => format!("images/boot-disk-{other}"),
    });
    let made = Command::new("sh")
        .arg(&script)
        .args([bzimage, initrd])
        .arg(&cache)
        .arg(&cmdline)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let base = cache.join("base.qcow2");
    // A fresh overlay of our own: the guest writes to it, the cached base stays.
    let disk = dir.join("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(ok.success());
    Some(disk)
}

fn assert_ready(out: &std::process::Output, console: &str) {
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{console}");
    assert!(
        stderr.contains("the guest powered off"),
        "{stderr}\n{console}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.trim_end() == "VESSEL-GUEST-READY"),
        "never got ready:\n{console}\n{stderr}"
    );
}

/// (b) of the issue: SeaBIOS boots GRUB from the disk (boot.img, core.img in the BIOS boot
/// partition), GRUB reads its grub.cfg from ext4 and boots the bzImage, which runs to
/// `VESSEL-GUEST-READY` and powers off.
#[test]
fn minimal_boots_through_seabios_and_grub_from_a_qcow2_overlay() {
    if !have_seabios() {
        return;
    }
    let dir = scratch("fw-grub");
    let Some(disk) = boot_disk(&dir) else {
        return;
    };
    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.args(["run", "--firmware", "bios", "--memory", "256M", "--stats"])
        .arg(format!("--disk=path={}", disk.display()))
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, MINIMAL_LIMIT);
    let console = console_text(&console);
    assert_ready(&out, &console);
    assert!(console.contains("SeaBIOS"), "{console}");
    assert!(console.contains("Booting from Hard Disk"), "{console}");
    eprintln!(
        "minimal through SeaBIOS and GRUB: ready and powered off in {:.1} s\n{}",
        t.elapsed().as_secs_f64(),
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same disk through OVMF: the UEFI firmware finds the ESP on the virtio disk (its PCI
/// BAR placed by OVMF above 4 GiB), runs GRUB's `BOOTX64.EFI`, which boots the kernel; the
/// boot manager's entries land in the VM's own variable store (flash), which outlives the
/// run, and the template stays as it was.
#[test]
fn minimal_boots_through_ovmf_and_grub_and_its_variables_persist() {
    if !uefi_extended() {
        return;
    }
    let dir = scratch("fw-uefi");
    let Some(disk) = boot_disk(&dir) else {
        return;
    };
    let template = std::fs::read(OVMF_VARS).unwrap();
    let (store, console) = (dir.join("vars.fd"), dir.join("console.txt"));
    let mut cmd = vessel();
    cmd.args(["run", "--firmware", "uefi", "--memory", "256M", "--stats"])
        .arg(format!("--firmware-vars={}", store.display()))
        .arg(format!("--disk=path={}", disk.display()))
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, UEFI_LIMIT);
    let console = console_text(&console);
    assert_ready(&out, &console);
    let vars = std::fs::read(&store).unwrap();
    assert_eq!(vars.len(), template.len());
    assert_ne!(vars, template, "OVMF wrote no variable");
    let boot_order: Vec<u8> = "BootOrder"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    assert!(
        vars.windows(boot_order.len()).any(|w| w == boot_order),
        "no BootOrder variable in the store"
    );
    assert_eq!(std::fs::read(OVMF_VARS).unwrap(), template);
    eprintln!(
        "minimal through OVMF and GRUB: ready and powered off in {:.1} s\n{}",
        t.elapsed().as_secs_f64(),
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's stock kernel and the kit's Debian initramfs in the same kind of disk, through
/// OVMF and GRUB (extended: `VESSEL_E2E_DEBIAN=1` and `VESSEL_E2E_UEFI=1`).
#[test]
fn debian_boots_through_ovmf_and_grub() {
    if !std::env::var("VESSEL_E2E_DEBIAN").is_ok_and(|v| v == "1") || !uefi_extended() {
        eprintln!("note: Debian through OVMF runs in the extended test command");
        return;
    }
    let dir = scratch("fw-uefi-debian");
    let Some(disk) = boot_disk_of(&dir, "debian") else {
        return;
    };
    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.args(["run", "--firmware", "uefi", "--memory", "512M", "--stats"])
        .arg(format!("--firmware-vars={}", dir.join("vars.fd").display()))
        .arg(format!("--disk=path={}", disk.display()))
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    // The slowest extended test: besides OVMF, Debian's kernel is xz-compressed and GRUB
    // leaves its decompression to the kernel's own decompressor, which runs emulated on a
    // nested host (Vessel decompresses on the host when it boots a kernel itself).
    let out = run_with_timeout(cmd, Duration::from_secs(4 * 60 * 60));
    let console = console_text(&console);
    assert_ready(&out, &console);
    assert!(
        console.contains("efi: EFI v2"),
        "Linux found UEFI: {console}"
    );
    eprintln!(
        "Debian through OVMF and GRUB: ready and powered off in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// (a) of the issue: the same disk with no kernel and no firmware boots directly from its
/// grub.cfg (the kernel there is a bzImage).
#[test]
fn the_same_disk_boots_directly_from_its_grub_cfg() {
    let dir = scratch("fw-direct");
    let Some(disk) = boot_disk(&dir) else {
        return;
    };
    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.args(["run", "--memory", "256M", "--stats"])
        .arg(format!("--disk=path={}", disk.display()))
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, MINIMAL_LIMIT);
    let console = console_text(&console);
    assert_ready(&out, &console);
    assert!(
        text(&out.stderr).contains("booting 'Vessel minimal' from"),
        "{}",
        text(&out.stderr)
    );
    eprintln!(
        "minimal directly from the GRUB disk: ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VM paused in the middle of SeaBIOS (right after its banner, before it has looked at the
/// disk), snapshotted, stopped, and restored: the restored firmware goes on from where it
/// was: it finds the virtio disk at the BAR it had moved (served there again after the
/// restore), reads it, says it is not bootable and resets. The firmware image is mapped again
/// from its file; the shadowed BIOS area comes back with guest memory.
#[test]
fn a_vm_snapshotted_in_the_middle_of_seabios_goes_on_after_restore() {
    use vessel_vmm::device_config::{DeviceConfigs, DiskConfig, Transport};
    use vessel_vmm::firmware::Firmware;
    use vessel_vmm::{ExitReason, Payload, SerialTarget, Vm, VmConfig};

    if !have_seabios() {
        return;
    }
    let dir = scratch("fw-snapshot");
    let disk = empty_disk(&dir);
    let (before, after) = (dir.join("before.txt"), dir.join("after.txt"));
    let config = VmConfig {
        boot: Payload::Firmware(Firmware::resolve("bios").unwrap()),
        memory: 64 << 20,
        serial: SerialTarget::File(before.clone()),
        devices: DeviceConfigs {
            disks: vec![DiskConfig {
                path: disk.clone(),
                format: None,
                read_only: true,
                serial: None,
                transport: Transport::Pci,
                rate_limiter: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    let vm = Vm::build(&config).unwrap().start().unwrap();
    let h = vm.handle();
    let t = Instant::now();
    while !console_text(&before).contains("SeaBIOS (version") {
        assert!(t.elapsed() < FIRMWARE_LIMIT, "SeaBIOS never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    h.pause().unwrap();
    let so_far = console_text(&before);
    assert!(
        !so_far.contains("Boot failed"),
        "paused too late to test anything: {so_far}"
    );
    let (restored, _) =
        snapshot_stop_restore(vm, &dir, Some(SerialTarget::File(after.clone())), || {});
    let running = restored.start().unwrap();
    let h = running.handle();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(FIRMWARE_LIMIT);
        h.stop();
    });
    let outcome = running.wait().unwrap();
    let console = console_text(&after);
    assert_eq!(outcome.reason, ExitReason::Reset, "{console}");
    assert!(
        console.contains("Boot failed: not a bootable disk"),
        "the restored SeaBIOS read the disk: {console}"
    );
    drop(watchdog);
    let _ = std::fs::remove_dir_all(&dir);
}
