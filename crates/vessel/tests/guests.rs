//! End-to-end tests with tiny guests built here: they check, from inside a real KVM guest, what
//! Vessel gives a kernel (zero page, command line, e820, serial, i8042 reset, CPUID, SMP).

mod common;

use std::time::Duration;

use common::tinyguest::{elf, Guest, LOAD_ADDR};
use common::*;
use iced_x86::code_asm::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Boot a tiny guest; returns (success, console text, stderr).
fn boot(name: &str, code: Vec<u8>, args: &[&str]) -> (bool, String, String) {
    let dir = scratch(name);
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let console = dir.join("console.txt");
    let mut cmd = vessel();
    cmd.args(["run", "--kernel"])
        .arg(&kernel)
        .arg(format!("--serial=file={}", console.display()))
        .args(["--stats"])
        .args(args);
    let out = run_with_timeout(cmd, LIMIT);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.success(), console, text(&out.stderr))
}

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim(), 16).unwrap_or_else(|_| panic!("not hex: {s:?}"))
}

/// A guest that prints its command line and the e820 map it was given, then powers off.
fn e820_guest() -> Vec<u8> {
    let mut g = Guest::new();
    g.a.mov(r12, rsi).unwrap(); // the zero page
    g.print("CMDLINE=");
    g.a.mov(esi, dword_ptr(r12 + 0x228)).unwrap(); // hdr.cmd_line_ptr
    g.print_rsi();
    g.print("\n");
    g.a.movzx(r13d, byte_ptr(r12 + 0x1e8)).unwrap(); // e820_entries
    g.a.lea(r14, ptr(r12 + 0x2d0)).unwrap(); // e820_table
    let mut next = g.a.create_label();
    let mut done = g.a.create_label();
    g.a.set_label(&mut next).unwrap();
    g.a.test(r13d, r13d).unwrap();
    g.a.jz(done).unwrap();
    g.print("E820 ");
    g.a.mov(rax, qword_ptr(r14)).unwrap();
    g.print_rax_hex();
    g.print(" ");
    g.a.mov(rax, qword_ptr(r14 + 8)).unwrap();
    g.print_rax_hex();
    g.print(" ");
    g.a.mov(eax, dword_ptr(r14 + 16)).unwrap();
    g.print_rax_hex();
    g.print("\n");
    g.a.add(r14, 20).unwrap();
    g.a.dec(r13d).unwrap();
    g.a.jmp(next).unwrap();
    g.a.set_label(&mut done).unwrap();
    g.print("END\n");
    g.power_off();
    g.finish()
}

fn e820_of(console: &str) -> Vec<(u64, u64, u64)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("E820 "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (parse_hex(f[0]), parse_hex(f[1]), parse_hex(f[2]))
        })
        .collect()
}

#[test]
fn guest_sees_its_command_line_and_e820_map() {
    let (ok, console, err) = boot(
        "e820",
        e820_guest(),
        &[
            "--memory",
            "64M",
            "--nested",
            "off",
            "--cmdline",
            "tiny guest says hi",
        ],
    );
    assert!(ok, "vessel failed: {err}\nconsole: {console}");
    assert!(
        console.contains("CMDLINE=tiny guest says hi\n"),
        "{console}"
    );
    assert!(console.contains("END"), "{console}");
    assert_eq!(
        e820_of(&console),
        vec![
            (0, 0x9fc00, 1),
            (0x9fc00, 0x10_0000 - 0x9fc00, 2),
            (0x10_0000, (64 << 20) - 0x10_0000, 1),
            (0xe000_0000, 0x10_0000, 2),
        ]
    );
}

#[test]
fn guest_larger_than_3g_gets_ram_above_4g() {
    let (ok, console, err) = boot(
        "e820-big",
        e820_guest(),
        &["--memory", "5G", "--nested", "off"],
    );
    assert!(ok, "vessel failed: {err}\nconsole: {console}");
    let map = e820_of(&console);
    assert_eq!(map.last(), Some(&(4 << 30, 2 << 30, 1)), "{console}");
    assert!(
        map.contains(&(0x10_0000, (3 << 30) - 0x10_0000, 1)),
        "{console}"
    );
    assert!(
        !map.iter()
            .any(|&(a, s, t)| t == 1 && a < (4 << 30) && a + s > (3 << 30)),
        "RAM in the MMIO gap: {console}"
    );
}

#[test]
fn serial_line_status_reads_transmitter_empty() {
    let mut g = Guest::new();
    g.print("LSR=");
    g.a.mov(dx, 0x3fdu32).unwrap();
    g.a.in_(al, dx).unwrap();
    g.a.movzx(eax, al).unwrap();
    g.print_rax_hex();
    g.print("\n");
    g.power_off();
    let (ok, console, err) = boot("lsr", g.finish(), &["--nested", "off"]);
    assert!(ok, "{err}");
    let lsr = parse_hex(console.trim().strip_prefix("LSR=").unwrap());
    assert_eq!(lsr & 0x60, 0x60, "THRE and TEMT set: {console}");
}

#[test]
fn i8042_reset_ends_the_vm_with_success() {
    let mut g = Guest::new();
    g.print("resetting\n");
    g.i8042_reset();
    let (ok, console, err) = boot("reset", g.finish(), &["--nested", "off"]);
    assert!(ok, "{err}");
    assert_eq!(console, "resetting\n");
    assert!(err.contains("the guest reset"), "{err}");
}

#[test]
fn cpuid_shows_the_topology_vessel_set() {
    // Leaf 1 EBX: [31:24] initial APIC id, [23:16] logical processor count = the vCPUs.
    // (On hosts that pass the real CPUID through, this still holds in guest kernel mode,
    // which is where tiny guests run.)
    let mut g = Guest::new();
    g.a.mov(eax, 1u32).unwrap();
    g.a.xor(ecx, ecx).unwrap();
    g.a.cpuid().unwrap();
    g.a.mov(eax, ebx).unwrap();
    g.print("LEAF1.EBX=");
    g.print_rax_hex();
    g.print("\n");
    g.power_off();
    let (ok, console, err) = boot("cpuid", g.finish(), &["--cpus", "3", "--nested", "off"]);
    assert!(ok, "{err}");
    let leaf1_ebx = parse_hex(console.trim().strip_prefix("LEAF1.EBX=").unwrap());
    assert_eq!((leaf1_ebx >> 16) & 0xff, 3, "logical count: {leaf1_ebx:#x}");
    assert_eq!(
        leaf1_ebx >> 24,
        0,
        "the boot vCPU has APIC id 0: {leaf1_ebx:#x}"
    );
}

/// The AP trampoline: real mode at 0x10000 (SIPI vector 0x10): count in, halt.
fn ap_trampoline() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.cli().unwrap();
    a.mov(ax, cs).unwrap();
    a.mov(ds, ax).unwrap();
    a.lock().inc(word_ptr(0x100)).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.hlt().unwrap();
    a.jmp(l).unwrap();
    a.assemble(0).unwrap()
}

#[test]
fn smp_guest_brings_up_every_vcpu() {
    const TRAMPOLINE: u64 = 0x10000;
    const COUNTER: u64 = TRAMPOLINE + 0x100;
    let tramp = ap_trampoline();
    let mut g = Guest::new();
    let tl = g.a.create_label();
    // Copy the trampoline to 0x10000 and clear the counter.
    g.a.lea(rsi, ptr(tl)).unwrap();
    g.a.mov(edi, TRAMPOLINE as u32).unwrap();
    g.a.mov(ecx, tramp.len() as u32).unwrap();
    g.a.rep().movsb().unwrap();
    g.a.mov(word_ptr(COUNTER), 0u32).unwrap();
    // Software-enable the local APIC (SVR), then INIT and SIPI (twice) to all but self
    // through the ICR.
    g.a.mov(edi, 0xfee0_00f0u32).unwrap();
    g.a.mov(dword_ptr(rdi), 0x1ffu32).unwrap();
    g.a.mov(edi, 0xfee0_0300u32).unwrap();
    g.a.mov(dword_ptr(rdi + 0x10), 0u32).unwrap();
    g.a.mov(dword_ptr(rdi), 0x000c_4500u32).unwrap();
    for _ in 0..2 {
        g.a.mov(dword_ptr(rdi + 0x10), 0u32).unwrap();
        g.a.mov(dword_ptr(rdi), 0x000c_4600u32 | (TRAMPOLINE >> 12) as u32)
            .unwrap();
    }
    // Wait (bounded by the TSC, ~10^10 cycles: the APs run on host threads that may need
    // scheduling) for all three.
    let mut wait = g.a.create_label();
    let mut report = g.a.create_label();
    g.a.rdtsc().unwrap();
    g.a.shl(rdx, 32).unwrap();
    g.a.or(rax, rdx).unwrap();
    g.a.mov(r9, rax).unwrap();
    g.a.mov(r10, 10_000_000_000u64).unwrap();
    g.a.add(r9, r10).unwrap();
    g.a.set_label(&mut wait).unwrap();
    g.a.pause().unwrap();
    g.a.movzx(eax, word_ptr(COUNTER)).unwrap();
    g.a.cmp(eax, 3u32).unwrap();
    g.a.jae(report).unwrap();
    g.a.rdtsc().unwrap();
    g.a.shl(rdx, 32).unwrap();
    g.a.or(rax, rdx).unwrap();
    g.a.cmp(rax, r9).unwrap();
    g.a.jb(wait).unwrap();
    g.a.set_label(&mut report).unwrap();
    g.a.movzx(eax, word_ptr(COUNTER)).unwrap();
    g.print("APS=");
    g.print_rax_hex();
    g.print("\n");
    g.power_off();
    let mut tl = tl;
    g.a.set_label(&mut tl).unwrap();
    g.a.db(&tramp).unwrap();
    let (ok, console, err) = boot("smp", g.finish(), &["--cpus", "4", "--nested", "off"]);
    assert!(ok, "{err}");
    let aps = parse_hex(
        console
            .lines()
            .find_map(|l| l.strip_prefix("APS="))
            .unwrap_or("bad"),
    );
    assert_eq!(aps, 3, "all three APs ran the trampoline: {console}\n{err}");
    let _ = LOAD_ADDR;
}
