//! A bare `KVM_RUN` loop in this process, the floor the exit benchmarks compare a VMM with:
//! a tiny guest in 64 MiB, entered in long mode, whose port reads get a constant and whose
//! write to port 0x600 (ACPI S5) or 0x64 (the i8042 reset) ends the loop.

use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{create_guest_memory, GuestLayout};

use iced_x86::code_asm::*;

use crate::tinyguest::{Guest, LOAD_ADDR};

/// A guest that reads the i8042 status port `n` times, then powers off (ACPI S5) or, with
/// `reset`, resets through the i8042 (which Firecracker also ends the VM on).
pub fn port_reader(n: u32, reset: bool) -> Vec<u8> {
    let mut g = Guest::new();
    let mut l = g.a.create_label();
    let mut done = g.a.create_label();
    g.a.mov(ecx, n).unwrap();
    g.a.test(ecx, ecx).unwrap();
    g.a.jz(done).unwrap();
    g.a.set_label(&mut l).unwrap();
    g.a.in_(al, 0x64u32).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(l).unwrap();
    g.a.set_label(&mut done).unwrap();
    if reset {
        g.i8042_reset();
    } else {
        g.power_off();
    }
    g.finish()
}

/// Runs `code` to its power-off or reset; the time spent in the loop.
pub fn bare_once(code: &[u8]) -> Duration {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    let layout = GuestLayout::new(64 << 20).unwrap();
    let mem = create_guest_memory(&layout).unwrap();
    vessel_vmm::kvm_vm::register_memory(&vm, &mem, false).unwrap();
    mem.write_slice(code, GuestAddress(LOAD_ADDR)).unwrap();
    let gdt = vessel_boot::write_gdt(&mem, vessel_boot::EntryMode::Long64).unwrap();
    let pml4 = vessel_boot::write_identity_page_tables(&mem).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let regs = vessel_boot::BootRegs {
        rip: LOAD_ADDR,
        rsp: 0x8ff0,
        rsi: 0,
        rbx: 0,
        rflags: 2,
        mode: vessel_boot::EntryMode::Long64,
    };
    vessel_vmm::cpu::set_boot_registers(&vcpu, &regs, &gdt, pml4).unwrap();
    let t = Instant::now();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoIn(_, data) => data[0] = 0x1c,
            VcpuExit::IoOut(0x600, _) | VcpuExit::IoOut(0x64, _) => break,
            VcpuExit::IoOut(..) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    t.elapsed()
}
