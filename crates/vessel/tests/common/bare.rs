//! A bare `KVM_RUN` loop in this process, the floor the exit benchmarks compare a VMM with:
//! a tiny guest in 64 MiB, entered in long mode, whose port reads get a constant and whose
//! write to port 0x600 (ACPI S5) or 0x64 (the i8042 reset) ends the loop.

use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{create_guest_memory, GuestLayout};

use crate::tinyguest::LOAD_ADDR;

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
