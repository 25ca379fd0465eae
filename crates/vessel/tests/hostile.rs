//! The hostile-guest suite: tiny guests (see `common/tinyguest.rs`) that do what a malicious
//! kernel would: write garbage to every legacy I/O port and into the virtio-mmio, PCI ECAM and
//! `0xcf8` configuration windows, storm the VMM with exits and with interrupts, touch
//! unmapped MMIO and guest physical addresses far outside RAM, hand virtio-blk (MMIO and PCI)
//! virtqueues whose descriptor chains loop or point outside memory, and touch all their RAM
//! while handing every device requests with lengths of 4 GiB.
//!
//! For each: the VMM stays up and ends the VM the way the guest asked (power-off after it
//! printed its marker), or with a clear reason; it never panics or dies on a signal, and its
//! own memory stays bounded. A witness VM runs beside each hostile one for the whole time the
//! hostile guest is active, checking its own work as it goes, and stops when told.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::fcprocess::*;
use common::tinyguest::{elf, Guest};
use common::*;
use iced_x86::code_asm::*;
use serde_json::json;

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

/// The witness guest: rounds of work it checks itself (fill a buffer, exit to the VMM a few
/// hundred times, verify the buffer), a `tick` after each good round; a byte on its console
/// input makes it print `witness stopped` and power off; a bad round, `witness corrupt`.
fn witness_code() -> Vec<u8> {
    const BUF: u64 = 0x40_0000;
    const WORDS: u32 = 4096;
    let mut g = Guest::new();
    let mut top = g.a.create_label();
    let mut bad = g.a.create_label();
    let mut stop = g.a.create_label();
    g.a.xor(r12, r12).unwrap();
    g.a.set_label(&mut top).unwrap();
    let a = &mut g.a;
    a.inc(r12).unwrap();
    // Fill: word i of round r is r ^ i.
    a.mov(rbx, BUF).unwrap();
    a.mov(ecx, WORDS).unwrap();
    let mut fill = a.create_label();
    a.set_label(&mut fill).unwrap();
    a.mov(rax, r12).unwrap();
    a.xor(rax, rcx).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.add(rbx, 8).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(fill).unwrap();
    // Exits to the VMM.
    a.mov(ecx, 200u32).unwrap();
    let mut exits = a.create_label();
    a.set_label(&mut exits).unwrap();
    a.out(0x80u8 as u32, al).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(exits).unwrap();
    // Verify.
    a.mov(rbx, BUF).unwrap();
    a.mov(ecx, WORDS).unwrap();
    let mut verify = a.create_label();
    a.set_label(&mut verify).unwrap();
    a.mov(rax, r12).unwrap();
    a.xor(rax, rcx).unwrap();
    a.cmp(qword_ptr(rbx), rax).unwrap();
    a.jne(bad).unwrap();
    a.add(rbx, 8).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(verify).unwrap();
    g.print("tick\n");
    // COM1 line status: data ready means the test says stop.
    let a = &mut g.a;
    a.mov(dx, 0x3fdu32).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 1).unwrap();
    a.jnz(stop).unwrap();
    a.jmp(top).unwrap();
    a.set_label(&mut stop).unwrap();
    a.nop().unwrap();
    g.print("witness stopped\n");
    g.power_off();
    g.a.set_label(&mut bad).unwrap();
    g.a.nop().unwrap();
    g.print("witness corrupt\n");
    g.power_off();
    g.finish()
}

/// A benign VM (Firecracker mode) that works beside the hostile ones until told to stop.
struct Witness {
    vm: FcVessel,
}

impl Witness {
    /// Boots the witness in `dir` and waits for its first tick.
    fn start(dir: &Path) -> Witness {
        let kernel = dir.join("witness.elf");
        std::fs::write(&kernel, elf(&witness_code())).unwrap();
        let vm = FcVessel::start(dir, "witness", &[]);
        let mut c = vm.client();
        configure(
            &mut c,
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
            json!({"vcpu_count": 1, "mem_size_mib": 32}),
        );
        expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
        let w = Witness { vm };
        w.wait_ticks(1);
        w
    }

    fn ticks(&self) -> usize {
        self.vm.console().matches("tick\n").count()
    }

    /// Waits until the witness has done `n` good rounds (bounded by [`LIMIT`]).
    fn wait_ticks(&self, n: usize) {
        self.vm.wait_console("the witness's rounds", LIMIT, |s| {
            s.contains("corrupt") || s.matches("tick\n").count() >= n
        });
        assert!(
            !self.vm.console().contains("corrupt"),
            "the witness found its memory changed"
        );
    }

    /// Checks the witness is still there and still working, then tells it to stop and checks
    /// it stopped on its own, having only ever done good rounds.
    fn finish(mut self, name: &str) {
        assert!(
            self.vm.child.try_wait().unwrap().is_none(),
            "the witness beside {name} ended early: {}",
            self.vm.stderr()
        );
        self.wait_ticks(self.ticks() + 2);
        let stdin = self.vm.stdin.as_mut().unwrap();
        stdin.write_all(b"q").unwrap();
        stdin.flush().unwrap();
        let code = self.vm.wait_exit(LIMIT);
        let console = self.vm.console();
        assert_eq!(
            code,
            Some(0),
            "the witness beside {name}: {}",
            self.vm.stderr()
        );
        let lines: Vec<&str> = console.lines().collect();
        assert_eq!(lines.last(), Some(&"witness stopped"), "{console}");
        assert!(
            lines[..lines.len() - 1].iter().all(|l| *l == "tick"),
            "the VM beside {name} was affected: {console}"
        );
    }
}

/// Boots the hostile guest while a witness VM works beside it; checks the witness worked
/// through it and after, and the VMM of the hostile one neither panicked nor died on a
/// signal. Returns the hostile VM's outcome.
fn hostile(name: &str, code: Vec<u8>, args: &[String]) -> (Output, String) {
    let dir = scratch(&format!("hostile-{name}"));
    let witness = Witness::start(&dir);
    let before = witness.ticks();
    let (out, console) = boot(&dir, name, code, args);
    let during = witness.ticks() - before;
    witness.finish(name);
    let err = text(&out.stderr);
    eprintln!(
        "--- {name}: {:?}, console {console:?} (the witness did {during} rounds meanwhile)\n{err}",
        out.status
    );
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

/// Waits until the device has returned both chains of [`write_chains`] (however long that
/// takes on a loaded host; the test's limit bounds it), or has marked itself as needing a
/// reset (`status`: its device status register, bit 0x40), then leaves the used index in
/// `eax`.
fn wait_used(a: &mut CodeAssembler, status: AsmMemoryOperand) {
    a.mov(rdi, QUEUE + 0x2000).unwrap();
    let mut l = a.create_label();
    let mut out = a.create_label();
    a.set_label(&mut l).unwrap();
    a.movzx(eax, word_ptr(rdi + 2)).unwrap();
    a.cmp(eax, 2).unwrap();
    a.je(out).unwrap();
    a.test(status, 0x40).unwrap();
    a.jnz(out).unwrap();
    a.pause().unwrap();
    a.jmp(l).unwrap();
    a.set_label(&mut out).unwrap();
    a.movzx(eax, word_ptr(rdi + 2)).unwrap();
}

/// Sets the available index to a value far ahead of the ring.
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
            wait_used(a, m(0x70));
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
            wait_used(a, c8(0x14));
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

// --- virtio-mmio drivers for the storm and pressure guests -------------------------------
// Devices the API configures are virtio-mmio. Each device gets a region of guest RAM for its
// queues: queue q at `region + q * 0x8000` (descriptors; available ring at +0x1000, used ring
// at +0x2000, headers and small buffers at +0x4000).

/// virtio device ids.
const RNG: u32 = 4;
const BLOCK: u32 = 2;
const BALLOON: u32 = 5;
const VSOCK: u32 = 19;
/// Where huge writable buffers start: far above every queue, so what a device writes there
/// cannot clobber the rings.
const BIG: u64 = 0x100_0000;

fn qbase(region: u64, q: u64) -> u64 {
    region + q * 0x8000
}

/// Finds the virtio-mmio window of device `id` (into `rbx`); jumps to `missing` when none.
fn mmio_find(a: &mut CodeAssembler, id: u32, missing: CodeLabel) {
    a.mov(rbx, VIRTIO_MMIO_START).unwrap();
    let mut scan = a.create_label();
    let mut found = a.create_label();
    let mut next = a.create_label();
    a.set_label(&mut scan).unwrap();
    a.cmp(dword_ptr(rbx), 0x7472_6976).unwrap();
    a.jne(next).unwrap();
    a.cmp(dword_ptr(rbx + 8), id as i32).unwrap();
    a.je(found).unwrap();
    a.set_label(&mut next).unwrap();
    a.add(rbx, 0x1000).unwrap();
    a.mov(rax, VIRTIO_MMIO_START + 32 * 0x1000).unwrap();
    a.cmp(rbx, rax).unwrap();
    a.jb(scan).unwrap();
    a.jmp(missing).unwrap();
    a.set_label(&mut found).unwrap();
    a.nop().unwrap();
}

/// Resets the device at `rbx`, accepts VERSION_1 and `features_lo`, and sets up `queues`
/// queues of 8 in `region`; DRIVER_OK comes later ([`mmio_go`]).
fn mmio_init(a: &mut CodeAssembler, features_lo: u32, queues: u64, region: u64) {
    let m = |off: u32| dword_ptr(rbx + off);
    a.mov(m(0x70), 0u32).unwrap();
    a.mov(m(0x70), 3u32).unwrap();
    a.mov(m(0x24), 1u32).unwrap();
    a.mov(m(0x20), 1u32).unwrap();
    a.mov(m(0x24), 0u32).unwrap();
    a.mov(m(0x20), features_lo).unwrap();
    a.mov(m(0x70), 0xbu32).unwrap();
    for q in 0..queues {
        let b = qbase(region, q);
        a.mov(m(0x30), q as u32).unwrap();
        a.mov(m(0x38), 8u32).unwrap();
        a.mov(m(0x80), b as u32).unwrap();
        a.mov(m(0x84), 0u32).unwrap();
        a.mov(m(0x90), (b + 0x1000) as u32).unwrap();
        a.mov(m(0x94), 0u32).unwrap();
        a.mov(m(0xa0), (b + 0x2000) as u32).unwrap();
        a.mov(m(0xa4), 0u32).unwrap();
        a.mov(m(0x44), 1u32).unwrap();
    }
}

fn mmio_go(a: &mut CodeAssembler) {
    a.mov(dword_ptr(rbx + 0x70), 0xfu32).unwrap();
}

fn mmio_notify(a: &mut CodeAssembler, q: u32) {
    a.mov(dword_ptr(rbx + 0x50), q).unwrap();
}

/// Descriptor `i` of the table at `base`.
fn put_desc(a: &mut CodeAssembler, base: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    a.mov(rdi, base + 16 * i).unwrap();
    a.mov(rax, addr).unwrap();
    a.mov(qword_ptr(rdi), rax).unwrap();
    a.mov(dword_ptr(rdi + 8), len).unwrap();
    a.mov(word_ptr(rdi + 12), flags as u32).unwrap();
    a.mov(word_ptr(rdi + 14), next as u32).unwrap();
}

/// Makes `heads` available on the queue at `base` (from an empty ring).
fn post(a: &mut CodeAssembler, base: u64, heads: &[u16]) {
    a.mov(rdi, base + 0x1000).unwrap();
    for (i, &h) in heads.iter().enumerate() {
        a.mov(word_ptr(rdi + 4 + 2 * i as u32), h as u32).unwrap();
    }
    a.mov(word_ptr(rdi + 2), heads.len() as u32).unwrap();
}

/// Writes `bytes` at guest address `at`.
fn put_bytes(a: &mut CodeAssembler, at: u64, bytes: &[u8]) {
    a.mov(rdi, at).unwrap();
    for (i, c) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        a.mov(dword_ptr(rdi + 4 * i as u32), u32::from_le_bytes(w))
            .unwrap();
    }
}

/// Waits until the queue at `base` has returned `n` chains, or the device at `rbx` has marked
/// itself as needing a reset (either is an answer; the test's limit bounds the wait).
fn wait_used_or_broken(a: &mut CodeAssembler, base: u64, n: u32) {
    a.mov(rdi, base + 0x2000).unwrap();
    let mut l = a.create_label();
    let mut out = a.create_label();
    a.set_label(&mut l).unwrap();
    a.movzx(eax, word_ptr(rdi + 2)).unwrap();
    a.cmp(eax, n as i32).unwrap();
    a.jae(out).unwrap();
    a.test(dword_ptr(rbx + 0x70), 0x40).unwrap();
    a.jnz(out).unwrap();
    a.pause().unwrap();
    a.jmp(l).unwrap();
    a.set_label(&mut out).unwrap();
    a.nop().unwrap();
}

/// The VMM's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib << 10
}

/// Guest RAM of the storm and pressure VMs, and what the VMM may hold beyond it (the jail's
/// recommended allowance, docs/threat-model.md).
const GUEST_MIB: u64 = 64;
const VMM_ALLOWANCE: u64 = 64 << 20;

fn assert_memory_bounded(name: &str, vm: &FcVessel) {
    let peak = peak_rss(vm.child.id());
    eprintln!(
        "--- {name}: VMM peak RSS {} MiB with {GUEST_MIB} MiB of guest RAM",
        peak >> 20
    );
    assert!(
        peak <= (GUEST_MIB << 20) + VMM_ALLOWANCE,
        "{name}: the VMM's peak RSS is {} MiB for {GUEST_MIB} MiB of guest RAM",
        peak >> 20
    );
}

/// Starts a Firecracker-mode VMM in `dir` for `code`, with `setup` for its devices.
fn start_fc(
    dir: &Path,
    name: &str,
    code: Vec<u8>,
    setup: impl FnOnce(&mut vessel_api::client::Client),
) -> FcVessel {
    let kernel = dir.join(format!("{name}.elf"));
    std::fs::write(&kernel, elf(&code)).unwrap();
    let vm = FcVessel::start(dir, name, &[]);
    let mut c = vm.client();
    configure(
        &mut c,
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
        json!({"vcpu_count": 1, "mem_size_mib": GUEST_MIB}),
    );
    setup(&mut c);
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    vm
}

/// Stops `vm` through its API and checks it ended cleanly.
fn stop_cleanly(name: &str, mut vm: FcVessel) {
    let mut c = vm.client();
    expect(&mut c, "PUT", "/vessel/stop", None, 204);
    assert_eq!(vm.wait_exit(LIMIT), Some(0), "{name}: {}", vm.stderr());
    assert!(!vm.stderr().contains("panicked"), "{name}: {}", vm.stderr());
}

/// An interrupt storm: the guest keeps the entropy device's queue full of 16-byte buffers, so
/// that its worker returns chains and raises the interrupt as fast as it can, acknowledges
/// every interrupt (an exit to the VMM each time), and runs the LAPIC timer at its shortest
/// period. Meanwhile the VMM answers its API (pause, resume, configuration), the witness VM
/// beside it keeps working, the VMM's memory stays bounded, and the storm is stopped cleanly
/// in the middle.
#[test]
fn interrupt_storm_from_a_refilled_queue() {
    let dir = scratch("hostile-irq-storm");
    let witness = Witness::start(&dir);
    const REGION: u64 = 0x30_0000;
    let q = qbase(REGION, 0);
    let mut g = Guest::new();
    let mut missing = g.a.create_label();
    let a = &mut g.a;
    // The local APIC's timer: enabled, divide by 1, periodic, count 1 (KVM clamps it to its
    // shortest period). Interrupts stay off in the guest: they pend, as a storm's would.
    a.mov(rdi, 0xfee0_0000u64).unwrap();
    a.mov(dword_ptr(rdi + 0xf0), 0x1ffu32).unwrap();
    a.mov(dword_ptr(rdi + 0x3e0), 0xbu32).unwrap();
    a.mov(dword_ptr(rdi + 0x320), 0x2_0030u32).unwrap();
    a.mov(dword_ptr(rdi + 0x380), 1u32).unwrap();
    mmio_find(a, RNG, missing);
    mmio_init(a, 0, 1, REGION);
    for i in 0..8 {
        put_desc(a, q, i, q + 0x4000 + 16 * i, 16, 2, 0);
    }
    mmio_go(a);
    g.print("storm on\n");
    let a = &mut g.a;
    // r12: the available index; r14: the last 1024-boundary reported.
    a.xor(r12, r12).unwrap();
    a.xor(r14, r14).unwrap();
    let mut top = a.create_label();
    let mut ack = a.create_label();
    let mut fill = a.create_label();
    let mut quiet = a.create_label();
    a.set_label(&mut top).unwrap();
    // Room in the ring: used + 8 - avail.
    a.mov(rdi, q + 0x2000).unwrap();
    a.movzx(edx, word_ptr(rdi + 2)).unwrap();
    a.add(edx, 8).unwrap();
    a.sub(edx, r12d).unwrap();
    a.and(edx, 0xffff).unwrap();
    a.jz(ack).unwrap();
    a.mov(rdi, q + 0x1000).unwrap();
    a.set_label(&mut fill).unwrap();
    a.mov(ecx, r12d).unwrap();
    a.and(ecx, 7).unwrap();
    a.mov(word_ptr(rdi + rcx * 2 + 4), cx).unwrap();
    a.inc(r12d).unwrap();
    a.dec(edx).unwrap();
    a.jnz(fill).unwrap();
    a.mov(word_ptr(rdi + 2), r12w).unwrap();
    mmio_notify(a, 0);
    a.set_label(&mut ack).unwrap();
    a.mov(eax, dword_ptr(rbx + 0x60)).unwrap();
    a.mov(dword_ptr(rbx + 0x64), eax).unwrap();
    // A line every 1024 buffers: the storm goes on.
    a.mov(eax, r12d).unwrap();
    a.and(eax, !0x3ffu32 as i32).unwrap();
    a.cmp(eax, r14d).unwrap();
    a.je(quiet).unwrap();
    a.mov(r14d, eax).unwrap();
    g.print(".\n");
    let a = &mut g.a;
    a.set_label(&mut quiet).unwrap();
    a.jmp(top).unwrap();
    a.set_label(&mut missing).unwrap();
    a.nop().unwrap();
    g.print("no entropy device\n");
    g.power_off();

    let vm = start_fc(&dir, "storm", g.finish(), |c| {
        expect(c, "PUT", "/entropy", Some(json!({})), 204);
    });
    // A line per 1024 buffers returned (each followed by an interrupt).
    const LINES: usize = 32;
    let lines = |s: &str| s.matches(".\n").count();
    vm.wait_console("the storm", LIMIT, |s| {
        lines(s) >= LINES || s.contains("no ")
    });
    assert!(!vm.console().contains("no "), "{}", vm.console());
    let ticks = witness.ticks();
    // The storming VM's VMM answers, pauses and resumes it...
    let mut c = vm.client();
    assert_eq!(state(&mut c), "Running");
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["machine-config"]["mem_size_mib"], GUEST_MIB);
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    assert_eq!(state(&mut c), "Paused");
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Resumed"})),
        204,
    );
    let n = lines(&vm.console());
    vm.wait_console("the storm after resuming", LIMIT, |s| lines(s) >= n + LINES);
    // ...the witness works on through it...
    witness.wait_ticks(ticks + 3);
    // ...its memory stays bounded, and it stops cleanly in the middle of the storm.
    assert_memory_bounded("storm", &vm);
    eprintln!(
        "--- storm: {} x 1024 buffers returned",
        lines(&vm.console())
    );
    stop_cleanly("storm", vm);
    witness.finish("storm");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Memory exhaustion: the guest writes every page of its RAM, then hands each device requests
/// whose lengths would make a VMM that trusted them allocate gigabytes: entropy buffers and
/// block reads and writes of 4 GiB, a discard with a 4 GiB segment list, vsock packets that
/// claim 4 GiB payloads, balloon page lists of 4 GiB. Each device answers (returns the
/// chains, or marks itself as needing a reset); the VMM's peak RSS stays within guest RAM
/// plus its allowance, and it keeps running (the API answers, it stops cleanly).
#[test]
fn memory_exhaustion_and_huge_device_requests() {
    let dir = scratch("hostile-memory");
    let witness = Witness::start(&dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.join("vsock.sock");
    let huge = 0xffff_f000u32;

    let mut g = Guest::new();
    // Every page of RAM above the guest's code and queues.
    let a = &mut g.a;
    a.mov(rbx, 0x40_0000u64).unwrap();
    a.mov(r8, (GUEST_MIB << 20) - 0x1000).unwrap();
    let mut touch = a.create_label();
    a.set_label(&mut touch).unwrap();
    a.mov(qword_ptr(rbx), rbx).unwrap();
    a.add(rbx, 0x1000).unwrap();
    a.cmp(rbx, r8).unwrap();
    a.jbe(touch).unwrap();
    g.print("ram touched\n");

    // Entropy: two 4 GiB buffers, one in one descriptor, one over two.
    let region = 0x30_0000u64;
    let mut next = g.a.create_label();
    let a = &mut g.a;
    mmio_find(a, RNG, next);
    mmio_init(a, 0, 1, region);
    let q = qbase(region, 0);
    put_desc(a, q, 0, BIG, huge, 2, 0);
    put_desc(a, q, 1, BIG, huge, 3, 2);
    put_desc(a, q, 2, BIG, huge, 2, 0);
    post(a, q, &[0, 1]);
    mmio_go(a);
    mmio_notify(a, 0);
    wait_used_or_broken(a, q, 2);
    g.print("rng answered\n");
    g.a.set_label(&mut next).unwrap();
    g.a.nop().unwrap();

    // Block (DISCARD and WRITE_ZEROES offered): a read and a write of 4 GiB, a discard whose
    // segment list claims 4 GiB.
    let region = 0x32_0000u64;
    let mut next = g.a.create_label();
    let a = &mut g.a;
    mmio_find(a, BLOCK, next);
    mmio_init(a, 1 << 13 | 1 << 14, 1, region);
    let q = qbase(region, 0);
    let hdr = |t: u32| [t.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat();
    put_bytes(a, q + 0x4000, &hdr(0));
    put_bytes(a, q + 0x4010, &hdr(1));
    put_bytes(a, q + 0x4020, &hdr(11));
    for (chain, (hdr_at, data_flags)) in [(0x4000u64, 3u16), (0x4010, 1), (0x4020, 1)]
        .into_iter()
        .enumerate()
    {
        let i = chain as u64 * 3;
        put_desc(a, q, i, q + hdr_at, 16, 1, (i + 1) as u16);
        put_desc(a, q, i + 1, BIG, huge, data_flags, (i + 2) as u16);
        put_desc(a, q, i + 2, q + 0x4100 + chain as u64, 1, 2, 0);
    }
    post(a, q, &[0, 3, 6]);
    mmio_go(a);
    mmio_notify(a, 0);
    wait_used_or_broken(a, q, 3);
    g.print("block answered\n");
    g.a.set_label(&mut next).unwrap();
    g.a.nop().unwrap();

    // vsock: rx buffers of 4 GiB; on tx, a connection request to a port nobody serves and a
    // data packet whose header claims a 4 GiB payload behind a 4 GiB descriptor.
    let region = 0x34_0000u64;
    let mut next = g.a.create_label();
    let a = &mut g.a;
    mmio_find(a, VSOCK, next);
    mmio_init(a, 0, 3, region);
    let (rx, tx) = (qbase(region, 0), qbase(region, 1));
    put_desc(a, rx, 0, BIG, huge, 2, 0);
    put_desc(a, rx, 1, BIG, huge, 2, 0);
    post(a, rx, &[0, 1]);
    let pkt = |op: u16, len: u32| {
        let mut p = Vec::new();
        p.extend_from_slice(&3u64.to_le_bytes());
        p.extend_from_slice(&2u64.to_le_bytes());
        p.extend_from_slice(&1234u32.to_le_bytes());
        p.extend_from_slice(&5000u32.to_le_bytes());
        p.extend_from_slice(&len.to_le_bytes());
        p.extend_from_slice(&1u16.to_le_bytes());
        p.extend_from_slice(&op.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p
    };
    put_bytes(a, tx + 0x4000, &pkt(1, u32::MAX));
    put_bytes(a, tx + 0x4040, &pkt(5, u32::MAX));
    put_desc(a, tx, 0, tx + 0x4000, 44, 0, 0);
    put_desc(a, tx, 1, tx + 0x4040, 44, 1, 2);
    put_desc(a, tx, 2, BIG, huge, 0, 0);
    post(a, tx, &[0, 1]);
    mmio_go(a);
    mmio_notify(a, 0);
    mmio_notify(a, 1);
    wait_used_or_broken(a, tx, 2);
    g.print("vsock answered\n");
    g.a.set_label(&mut next).unwrap();
    g.a.nop().unwrap();

    // Balloon: inflate and deflate lists of 4 GiB (a billion page numbers). The first 64 Ki
    // numbers (what the device reads of a list, at most) name a page outside RAM: the guest
    // would otherwise give away its own code and rings.
    let region = 0x36_0000u64;
    let mut next = g.a.create_label();
    let a = &mut g.a;
    a.mov(rdi, BIG).unwrap();
    a.mov(ecx, 0x1_0000u32).unwrap();
    a.mov(eax, u32::MAX).unwrap();
    a.rep().stosd().unwrap();
    mmio_find(a, BALLOON, next);
    mmio_init(a, 0, 2, region);
    let (inflate, deflate) = (qbase(region, 0), qbase(region, 1));
    put_desc(a, inflate, 0, BIG, huge, 0, 0);
    post(a, inflate, &[0]);
    put_desc(a, deflate, 0, BIG, huge, 0, 0);
    post(a, deflate, &[0]);
    mmio_go(a);
    mmio_notify(a, 0);
    wait_used_or_broken(a, inflate, 1);
    mmio_notify(a, 1);
    wait_used_or_broken(a, deflate, 1);
    g.print("balloon answered\n");
    g.a.set_label(&mut next).unwrap();
    g.a.nop().unwrap();
    g.print(DONE);
    // Stay (halted) for the test to look at the VMM.
    let a = &mut g.a;
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();

    let vm = start_fc(&dir, "memory", g.finish(), |c| {
        expect(c, "PUT", "/entropy", Some(json!({})), 204);
        expect(
            c,
            "PUT",
            "/drives/disk",
            Some(
                json!({"drive_id": "disk", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
            ),
            204,
        );
        expect(
            c,
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": 3, "uds_path": uds})),
            204,
        );
        expect(
            c,
            "PUT",
            "/balloon",
            Some(json!({"amount_mib": 0, "deflate_on_oom": false})),
            204,
        );
    });
    let mut vm = vm;
    let t = std::time::Instant::now();
    while !vm.console().contains(DONE) {
        if let Some(status) = vm.child.try_wait().unwrap() {
            panic!(
                "the VMM ended ({status:?}); console {}; stderr {}",
                vm.console(),
                vm.stderr()
            );
        }
        assert!(
            t.elapsed() < LIMIT,
            "waited {LIMIT:?}; console {}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let console = vm.console();
    for dev in ["rng", "block", "vsock", "balloon"] {
        assert!(
            console.contains(&format!("{dev} answered\n")),
            "no {dev} device? {console}"
        );
    }
    assert!(console.starts_with("ram touched\n"), "{console}");
    let mut c = vm.client();
    assert_eq!(state(&mut c), "Running");
    assert_memory_bounded("memory", &vm);
    eprintln!("--- memory: {}", vm.stderr());
    stop_cleanly("memory", vm);
    witness.finish("memory");
    let _ = std::fs::remove_dir_all(&dir);
}
