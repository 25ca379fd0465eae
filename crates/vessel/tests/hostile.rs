//! The hostile-guest suite: tiny guests (see `common/tinyguest.rs`) that do what a malicious
//! kernel would: write garbage to every legacy I/O port and into the virtio-mmio, PCI ECAM and
//! `0xcf8` configuration windows, storm the VMM with exits, touch unmapped MMIO and guest
//! physical addresses far outside RAM, and hand virtio-blk (MMIO and PCI) virtqueues whose
//! descriptor chains loop or point outside memory.
//!
//! For each: the VMM stays up and ends the VM the way the guest asked (power-off after it
//! printed its marker), or with a clear reason; it never panics or dies on a signal. A benign
//! VM started alongside each hostile one runs to completion with its exact output.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::tinyguest::{elf, Guest};
use common::*;
use iced_x86::code_asm::*;

const LIMIT: Duration = Duration::from_secs(60);
const VIRTIO_MMIO_START: u64 = 0xd000_0000;
const PCI_ECAM_START: u64 = 0xe000_0000;
const DONE: &str = "hostile guest done\n";
/// Where the guests put their virtqueues (guest RAM, above the code).
const QUEUE: u64 = 0x30_0000;

fn boot(dir: &Path, name: &str, code: Vec<u8>, args: &[String]) -> (Output, String) {
    let kernel = dir.join(format!("{name}.elf"));
    std::fs::write(&kernel, elf(&code)).unwrap();
    let console = dir.join(format!("{name}.txt"));
    let mut cmd = vessel();
    cmd.args(["run", "--nested", "off", "--memory", "64", "--kernel"])
        .arg(&kernel)
        .arg(format!("--serial=file={}", console.display()))
        .args(args);
    let out = run_with_timeout(cmd, LIMIT);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    (out, console)
}

fn benign() -> Vec<u8> {
    let mut g = Guest::new();
    g.a.mov(ecx, 2000u32).unwrap();
    let mut l = g.a.create_label();
    g.a.set_label(&mut l).unwrap();
    g.a.out(0x80u8 as u32, al).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(l).unwrap();
    g.print("benign ok\n");
    g.power_off();
    g.finish()
}

/// Boots the hostile guest and, at the same time, a benign one; checks the benign VM is
/// unaffected and the VMM of the hostile one neither panicked nor died on a signal. Returns
/// the hostile VM's outcome.
fn hostile(name: &str, code: Vec<u8>, args: &[String]) -> (Output, String) {
    let dir = scratch(&format!("hostile-{name}"));
    let witness_dir = dir.clone();
    let witness = std::thread::spawn(move || boot(&witness_dir, "benign", benign(), &[]));
    let (out, console) = boot(&dir, name, code, args);
    let (w_out, w_console) = witness.join().unwrap();
    assert!(
        w_out.status.success() && w_console == "benign ok\n",
        "the VM beside {name} was affected: {:?} {w_console:?} {}",
        w_out.status,
        text(&w_out.stderr)
    );
    let err = text(&out.stderr);
    eprintln!("--- {name}: {:?}, console {console:?}\n{err}", out.status);
    assert!(
        out.status.code().is_some(),
        "{name}: the VMM died on a signal ({:?}): {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{name}: the VMM panicked: {err}");
    let _ = std::fs::remove_dir_all(&dir);
    (out, console)
}

/// The guest printed its marker and powered off: the VMM served everything and stayed up.
fn assert_completed(name: &str, (out, console): (Output, String)) {
    assert!(
        out.status.success() && console.ends_with(DONE),
        "{name}: {:?}, console {console:?}, stderr {}",
        out.status,
        text(&out.stderr)
    );
}

/// Emits: if `edx` is within any of `ranges` (inclusive), jump to `skip`.
fn skip_ranges(a: &mut CodeAssembler, ranges: &[(u32, u32)], skip: CodeLabel) {
    for &(lo, hi) in ranges {
        let mut next = a.create_label();
        a.cmp(edx, lo).unwrap();
        a.jb(next).unwrap();
        a.cmp(edx, hi).unwrap();
        a.jbe(skip).unwrap();
        a.set_label(&mut next).unwrap();
        a.nop().unwrap();
    }
}

#[test]
fn garbage_to_every_legacy_port() {
    let mut g = Guest::new();
    let a = &mut g.a;
    // Ports whose garbage ends the VM by design (i8042 reset, ACPI sleep and reset) or would
    // garble the console this test reads (COM1).
    let skip = [(0x64, 0x64), (0x3f8, 0x3ff), (0x600, 0x63f), (0xcf9, 0xcf9)];
    a.xor(ecx, ecx).unwrap();
    let mut top = a.create_label();
    let mut next = a.create_label();
    a.set_label(&mut top).unwrap();
    a.mov(edx, ecx).unwrap();
    skip_ranges(a, &skip, next);
    a.mov(eax, ecx).unwrap();
    a.imul_3(eax, eax, 0x9e37_79b9u32 as i32).unwrap();
    a.out(dx, al).unwrap();
    a.out(dx, ax).unwrap();
    a.out(dx, eax).unwrap();
    a.in_(al, dx).unwrap();
    a.in_(eax, dx).unwrap();
    a.set_label(&mut next).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, 0x1_0000).unwrap();
    a.jb(top).unwrap();
    g.print(DONE);
    g.power_off();
    assert_completed("ports", hostile("ports", g.finish(), &[]));
}

/// Writes a pseudo-random dword to every `stride`-th dword of [`start`, `start + len`), reading
/// each back first.
fn scribble(a: &mut CodeAssembler, start: u64, len: u64, stride: u32) {
    a.mov(rbx, start).unwrap();
    a.mov(r8, start + len).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.mov(eax, dword_ptr(rbx)).unwrap();
    a.mov(eax, ebx).unwrap();
    a.imul_3(eax, eax, 0x9e37_79b9u32 as i32).unwrap();
    a.mov(dword_ptr(rbx), eax).unwrap();
    a.add(rbx, stride as i32).unwrap();
    a.cmp(rbx, r8).unwrap();
    a.jb(l).unwrap();
}

fn devices(dir_name: &str) -> (std::path::PathBuf, Vec<String>) {
    let dir = scratch(dir_name);
    let mut args = Vec::new();
    for (i, t) in ["mmio", "pci"].iter().enumerate() {
        let img = dir.join(format!("disk{i}.img"));
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        args.push(format!("--disk=path={},transport={t}", img.display()));
    }
    args.push("--rng=transport=mmio".into());
    args.push("--rng=transport=pci".into());
    (dir, args)
}

#[test]
fn garbage_to_virtio_mmio_and_pci_config_windows() {
    let (dir, mut args) = devices("hostile-windows-disks");
    args.truncate(3);
    let mut g = Guest::new();
    let a = &mut g.a;
    // Every register and the first config bytes of the first eight virtio-mmio windows (the
    // devices and empty slots).
    for w in 0..8 {
        scribble(a, VIRTIO_MMIO_START + w * 0x1000, 0x200, 4);
    }
    // Configuration space of every device on bus 0 through ECAM (function 0, standard header).
    for dev in 0..32u64 {
        scribble(a, PCI_ECAM_START + (dev << 15), 0x100, 4);
    }
    // And through 0xcf8/0xcfc.
    a.xor(ecx, ecx).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.mov(eax, ecx).unwrap();
    a.and(eax, 0xfffcu32 as i32).unwrap();
    a.or(eax, 0x8000_0000u32 as i32).unwrap();
    a.mov(edx, 0xcf8u32).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(edx, 0xcfcu32).unwrap();
    a.in_(eax, dx).unwrap();
    a.mov(eax, ecx).unwrap();
    a.imul_3(eax, eax, 0x9e37_79b9u32 as i32).unwrap();
    a.out(dx, eax).unwrap();
    a.add(ecx, 4).unwrap();
    a.cmp(ecx, 32 << 11).unwrap();
    a.jb(l).unwrap();
    g.print(DONE);
    g.power_off();
    let r = hostile("windows", g.finish(), &args);
    let _ = std::fs::remove_dir_all(dir);
    assert_completed("windows", r);
}

#[test]
fn exit_storm_and_unmapped_mmio() {
    let mut g = Guest::new();
    let a = &mut g.a;
    a.mov(ecx, 100_000u32).unwrap();
    a.mov(rbx, 0xc000_0000u64).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.out(0x80u8 as u32, al).unwrap();
    a.mov(eax, dword_ptr(rbx)).unwrap();
    a.mov(dword_ptr(rbx + 0x10), ecx).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(l).unwrap();
    // Unmapped guest-physical addresses inside the identity map: past the end of RAM, the
    // MMIO gap, an absent HPET, the last page below 4 GiB.
    for addr in [
        64u64 << 20,
        (64 << 20) + 0x1234,
        0xbfff_f000,
        0xfed0_0000,
        0xffff_f000,
    ] {
        a.mov(rbx, addr).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
        a.mov(qword_ptr(rbx), rax).unwrap();
    }
    g.print(DONE);
    g.power_off();
    assert_completed("storm", hostile("storm", g.finish(), &[]));
}

#[test]
fn far_outside_ram_then_a_triple_fault() {
    let mut g = Guest::new();
    let a = &mut g.a;
    // Map VA 4 GiB (PDPT entry 4) to guest-physical 64 GiB through a new page directory of
    // 2 MiB pages, then read and write there: far outside RAM and any device.
    let pd = 0x38_0000u64;
    // The PML4's first entry points at the boot PDPT.
    a.mov(rax, cr3).unwrap();
    a.and(rax, -4096i32).unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    a.and(rax, -4096i32).unwrap();
    a.mov(rbx, pd | 3).unwrap();
    a.mov(qword_ptr(rax + 4 * 8), rbx).unwrap();
    a.mov(rdi, pd).unwrap();
    a.mov(rbx, (64u64 << 30) | 0x83).unwrap();
    a.mov(qword_ptr(rdi), rbx).unwrap();
    a.mov(rax, cr3).unwrap();
    a.mov(cr3, rax).unwrap();
    a.mov(rbx, 4u64 << 30).unwrap();
    a.mov(rax, qword_ptr(rbx)).unwrap();
    a.mov(qword_ptr(rbx + 0x800), rax).unwrap();
    g.print(DONE);
    // Then a page fault with no IDT: a triple fault, which a PC answers with a reset.
    g.a.mov(rbx, 1u64 << 46).unwrap();
    g.a.mov(qword_ptr(rbx), rax).unwrap();
    g.a.hlt().unwrap();
    let (out, console) = hostile("far", g.finish(), &[]);
    assert_eq!(console, DONE, "{}", text(&out.stderr));
    assert!(
        out.status.success(),
        "the triple fault ends the VM as a reset: {:?} {}",
        out.status,
        text(&out.stderr)
    );
}

/// The descriptor chains a hostile driver hands the device, each laid out at `QUEUE` and made
/// available as head `case`: 0 loops (0 -> 1 -> 0), 1 points outside guest memory, 2 claims
/// a huge available index.
fn write_chains(a: &mut CodeAssembler) {
    let desc = |a: &mut CodeAssembler, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        a.mov(rdi, QUEUE + 16 * i).unwrap();
        a.mov(rax, addr).unwrap();
        a.mov(qword_ptr(rdi), rax).unwrap();
        a.mov(dword_ptr(rdi + 8), len).unwrap();
        a.mov(word_ptr(rdi + 12), flags as u32).unwrap();
        a.mov(word_ptr(rdi + 14), next as u32).unwrap();
    };
    // Loop: 0 -> 1 -> 0 ...
    desc(a, 0, QUEUE + 0x4000, 16, 1, 1);
    desc(a, 1, QUEUE + 0x5000, 512, 1, 0);
    // Out of memory: header far away, data of 256 MiB past RAM, status byte in RAM.
    desc(a, 2, 0xffff_ffff_0000_0000, 16, 1, 3);
    desc(a, 3, 0x7fff_ffff_f000, 0x1000_0000, 3, 4);
    desc(a, 4, QUEUE + 0x6000, 1, 2, 0);
    // avail: flags 0, idx 2, ring [0, 2].
    a.mov(rdi, QUEUE + 0x1000).unwrap();
    a.mov(dword_ptr(rdi), 2u32 << 16).unwrap();
    a.mov(dword_ptr(rdi + 4), 2u32 << 16).unwrap();
}

/// Sets the available index to a value far ahead of the ring.
/// Waits (a bounded spin) until the device has returned both chains of [`write_chains`],
/// then leaves the used index in `eax`.
fn wait_used(a: &mut CodeAssembler) {
    a.mov(rdi, QUEUE + 0x2000).unwrap();
    a.mov(ecx, 50_000_000u32).unwrap();
    let mut l = a.create_label();
    let mut out = a.create_label();
    a.set_label(&mut l).unwrap();
    a.movzx(eax, word_ptr(rdi + 2)).unwrap();
    a.cmp(eax, 2).unwrap();
    a.je(out).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(l).unwrap();
    a.set_label(&mut out).unwrap();
    a.nop().unwrap();
}

fn bogus_avail_idx(a: &mut CodeAssembler) {
    a.mov(rdi, QUEUE + 0x1000).unwrap();
    a.mov(word_ptr(rdi + 2), 0x8000u32).unwrap();
}

#[test]
fn virtqueues_that_loop_or_point_outside_memory() {
    let (dir, args) = devices("hostile-vq-disks");
    let args = args[..2].to_vec();
    let mut g = Guest::new();
    let a = &mut g.a;
    let mut mmio_done = a.create_label();
    let mut pci_done = a.create_label();

    // virtio-mmio: find the block device's window (magic "virt", device id 2).
    a.mov(rbx, VIRTIO_MMIO_START).unwrap();
    let mut scan = a.create_label();
    let mut found = a.create_label();
    let mut next = a.create_label();
    a.set_label(&mut scan).unwrap();
    a.cmp(dword_ptr(rbx), 0x7472_6976).unwrap();
    a.jne(next).unwrap();
    a.cmp(dword_ptr(rbx + 8), 2).unwrap();
    a.je(found).unwrap();
    a.set_label(&mut next).unwrap();
    a.add(rbx, 0x1000).unwrap();
    a.mov(rax, VIRTIO_MMIO_START + 32 * 0x1000).unwrap();
    a.cmp(rbx, rax).unwrap();
    a.jb(scan).unwrap();
    a.jmp(mmio_done).unwrap();
    a.set_label(&mut found).unwrap();
    for round in 0..2 {
        let m = |off: u32| dword_ptr(rbx + off);
        a.mov(m(0x70), 0u32).unwrap(); // reset
        a.mov(m(0x70), 3u32).unwrap(); // ACKNOWLEDGE | DRIVER
        a.mov(m(0x24), 1u32).unwrap();
        a.mov(m(0x20), 1u32).unwrap(); // VIRTIO_F_VERSION_1
        a.mov(m(0x24), 0u32).unwrap();
        a.mov(m(0x20), 0u32).unwrap();
        a.mov(m(0x70), 0xbu32).unwrap(); // FEATURES_OK
        a.mov(m(0x30), 0u32).unwrap(); // queue 0
        a.mov(m(0x38), 8u32).unwrap();
        a.mov(m(0x80), QUEUE as u32).unwrap();
        a.mov(m(0x84), 0u32).unwrap();
        a.mov(m(0x90), (QUEUE + 0x1000) as u32).unwrap();
        a.mov(m(0x94), 0u32).unwrap();
        a.mov(m(0xa0), (QUEUE + 0x2000) as u32).unwrap();
        a.mov(m(0xa4), 0u32).unwrap();
        a.mov(m(0x44), 1u32).unwrap(); // QueueReady
        write_chains(a);
        if round == 1 {
            bogus_avail_idx(a);
        }
        a.mov(m(0x70), 0xfu32).unwrap(); // DRIVER_OK
        for _ in 0..4 {
            a.mov(m(0x50), 0u32).unwrap(); // QueueNotify
        }
        if round == 0 {
            wait_used(a);
            a.mov(r9, rax).unwrap();
        }
        a.mov(eax, m(0x60)).unwrap();
        a.mov(m(0x64), eax).unwrap();
        a.mov(eax, m(0x70)).unwrap();
    }
    a.mov(dword_ptr(rbx + 0x70), 0u32).unwrap();
    g.print("mmio used ");
    g.a.mov(rax, r9).unwrap();
    g.print_rax_hex();
    g.print("\n");
    let a = &mut g.a;
    a.set_label(&mut mmio_done).unwrap();

    // virtio-pci: find the modern virtio-blk (1af4:1042) on bus 0 through 0xcf8.
    a.xor(ecx, ecx).unwrap();
    let mut pscan = a.create_label();
    let mut pfound = a.create_label();
    a.set_label(&mut pscan).unwrap();
    a.mov(eax, ecx).unwrap();
    a.shl(eax, 11).unwrap();
    a.or(eax, 0x8000_0000u32 as i32).unwrap();
    a.mov(esi, eax).unwrap();
    a.mov(edx, 0xcf8u32).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(edx, 0xcfcu32).unwrap();
    a.in_(eax, dx).unwrap();
    a.cmp(eax, 0x1042_1af4u32 as i32).unwrap();
    a.je(pfound).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, 32).unwrap();
    a.jb(pscan).unwrap();
    a.jmp(pci_done).unwrap();
    a.set_label(&mut pfound).unwrap();
    // Memory decoding on; BAR0 (64-bit) -> rbx.
    let cfg = |a: &mut CodeAssembler, off: u32| {
        a.mov(eax, esi).unwrap();
        a.or(eax, off as i32).unwrap();
        a.mov(edx, 0xcf8u32).unwrap();
        a.out(dx, eax).unwrap();
        a.mov(edx, 0xcfcu32).unwrap();
    };
    cfg(a, 0x04);
    a.mov(eax, 0x6u32).unwrap();
    a.out(dx, eax).unwrap();
    cfg(a, 0x14);
    a.in_(eax, dx).unwrap();
    a.mov(ebx, eax).unwrap();
    a.shl(rbx, 32).unwrap();
    cfg(a, 0x10);
    a.in_(eax, dx).unwrap();
    a.and(eax, -16i32).unwrap();
    a.or(rbx, rax).unwrap();
    for round in 0..2 {
        let c8 = |off: u32| byte_ptr(rbx + off);
        let c16 = |off: u32| word_ptr(rbx + off);
        let c32 = |off: u32| dword_ptr(rbx + off);
        a.mov(c8(0x14), 0u32).unwrap(); // reset
        a.mov(c8(0x14), 3u32).unwrap();
        a.mov(c32(0x08), 1u32).unwrap();
        a.mov(c32(0x0c), 1u32).unwrap(); // VIRTIO_F_VERSION_1
        a.mov(c32(0x08), 0u32).unwrap();
        a.mov(c32(0x0c), 0u32).unwrap();
        a.mov(c8(0x14), 0xbu32).unwrap();
        a.mov(c16(0x16), 0u32).unwrap(); // queue_select
        a.mov(c16(0x18), 8u32).unwrap(); // queue_size
        a.mov(c32(0x20), QUEUE as u32).unwrap();
        a.mov(c32(0x24), 0u32).unwrap();
        a.mov(c32(0x28), (QUEUE + 0x1000) as u32).unwrap();
        a.mov(c32(0x2c), 0u32).unwrap();
        a.mov(c32(0x30), (QUEUE + 0x2000) as u32).unwrap();
        a.mov(c32(0x34), 0u32).unwrap();
        a.mov(c16(0x1c), 1u32).unwrap(); // queue_enable
        write_chains(a);
        if round == 1 {
            bogus_avail_idx(a);
        }
        a.mov(c8(0x14), 0xfu32).unwrap(); // DRIVER_OK
        for _ in 0..4 {
            a.mov(word_ptr(rbx + 0x3000), 0u32).unwrap(); // notify queue 0
        }
        if round == 0 {
            wait_used(a);
            a.mov(r9, rax).unwrap();
        }
        a.mov(al, c8(0x14)).unwrap();
    }
    a.mov(byte_ptr(rbx + 0x14), 0u32).unwrap();
    g.print("pci used ");
    g.a.mov(rax, r9).unwrap();
    g.print_rax_hex();
    g.print("\n");
    let a = &mut g.a;
    a.set_label(&mut pci_done).unwrap();
    a.nop().unwrap();
    g.print(DONE);
    g.power_off();
    let r = hostile("virtqueues", g.finish(), &args);
    let _ = std::fs::remove_dir_all(dir);
    // Both chains of the first round came back (with an error status, or empty) on each
    // transport; the second round's ring index broke the device, which the VMM reported.
    let used = "0000000000000002";
    assert_eq!(
        r.1,
        format!("mmio used {used}\npci used {used}\n{DONE}"),
        "{}",
        text(&r.0.stderr)
    );
    assert!(
        text(&r.0.stderr).contains("invalid available ring index"),
        "{}",
        text(&r.0.stderr)
    );
    assert_completed("virtqueues", r);
}
