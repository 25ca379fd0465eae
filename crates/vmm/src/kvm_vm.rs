//! The KVM VM object and the order of its set-up: `KVM_CREATE_VM` with its TSS and
//! identity-map pages, then guest memory, then the in-kernel interrupt controllers (and PIT,
//! see [`Irqchip`]); the vCPUs come after (KVM wants the irqchip before them).
//!
//! Memory goes in before the irqchip because the other order is slow on the hosts measured:
//! the first `KVM_SET_USER_MEMORY_REGION` after `KVM_CREATE_IRQCHIP` waits 4-8 ms in the
//! kernel whatever the size of the slot, while the same call before it takes 0.3-0.4 ms
//! (measured on this project's nested lab host: the whole set-up of a 512 MiB VM, irqchip,
//! PIT and one vCPU included, 0.5-0.8 ms in this order against 4.7-7.8 ms the other way; the
//! irqchip's creation sets up interrupt routing, whose SRCU grace period the memslot update
//! then waits for). Firecracker registers memory first too.

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vessel_memory::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vessel_memory::GuestMemoryMmap;

use crate::error::{KvmContext, VmmError};

/// KVM's TSS (3 pages) and identity-map page, just below the IO-APIC/LAPIC area, in the gap.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// A KVM VM with its TSS and identity-map pages: no memory, no irqchip, no vCPUs yet.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().kvm("KVM_CREATE_VM")?;
    vm.set_tss_address(KVM_TSS_ADDR).kvm("KVM_SET_TSS_ADDR")?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .kvm("KVM_SET_IDENTITY_MAP_ADDR")?;
    Ok(vm)
}

/// The interrupt controllers and timer KVM emulates for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irqchip {
    /// The PC's: PIC, IO-APIC and LAPICs, and the PIT. What guests get.
    Pc,
    /// The LAPICs alone (`KVM_CAP_SPLIT_IRQCHIP`), no PIT: for a guest that takes no
    /// interrupt from a device (the demo guest). Tearing the VM down then takes about 0.2 ms
    /// on the lab host instead of 14-27: each in-kernel PIC, IO-APIC and PIT device leaves
    /// KVM's I/O bus through an SRCU grace period of its own.
    LapicOnly,
}

/// The PIC's and IO-APIC's pins, for a split irqchip (KVM's IO-APIC has 24).
const SPLIT_IRQCHIP_PINS: u64 = 24;

/// `chip`'s interrupt controllers (and the PIT); after guest memory, before the vCPUs.
pub fn create_irqchip(vm: &VmFd, chip: Irqchip) -> Result<(), VmmError> {
    match chip {
        Irqchip::Pc => {
            vm.create_irq_chip().kvm("KVM_CREATE_IRQCHIP")?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).kvm("KVM_CREATE_PIT2")
        }
        Irqchip::LapicOnly => {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = SPLIT_IRQCHIP_PINS;
            vm.enable_cap(&cap)
                .kvm("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)")
        }
    }
}

/// Give KVM every region of guest memory, one slot each (slot `i` is region `i`), with
/// dirty-page logging when `log_dirty`.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmmError> {
    register_ram(vm, mem, usize::MAX, log_dirty)
}

/// [`register_memory`] for the first `ram_regions` regions only: the RAM (device-managed
/// memory after it is mapped by its device, see [`crate::hotplug`]).
pub fn register_ram(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    ram_regions: usize,
    log_dirty: bool,
) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate().take(ram_regions) {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, the slots do not overlap, and
        // `run` joins every vCPU thread before `mem` is unmapped, so the guest never runs
        // on memory that is gone.
        unsafe { vm.set_user_memory_region(r) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_memory::vm_memory::GuestAddress;

    #[test]
    fn memory_then_irqchip_then_vcpus_makes_a_complete_vm() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipping: no /dev/kvm");
            return;
        };
        let vm = create_vm(&kvm).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap();
        register_memory(&vm, &mem, true).unwrap();
        create_irqchip(&vm, Irqchip::Pc).unwrap();
        vm.create_vcpu(0).unwrap();
        // Dirty logging was asked for: KVM has a bitmap for each slot, of the slot's size.
        assert_eq!(vm.get_dirty_log(0, 2 << 20).unwrap().len(), 512 / 64);
        assert_eq!(vm.get_dirty_log(1, 1 << 20).unwrap().len(), 256 / 64);
        assert!(vm.get_dirty_log(2, 1 << 20).is_err(), "no third slot");
        // The irqchip and the PIT exist: their state can be read.
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        vm.get_pit2().unwrap();
        // A slot KVM refuses (slot 0 again, at another address and size) reports its error.
        let refused = GuestMemoryMmap::from_ranges(&[(GuestAddress(1 << 20), 1 << 20)]).unwrap();
        let e = register_memory(&vm, &refused, false).unwrap_err();
        assert!(e.to_string().contains("KVM_SET_USER_MEMORY_REGION"), "{e}");
    }

    #[test]
    fn a_lapic_only_vm_has_lapics_and_irqfds_but_no_pic_or_pit() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipping: no /dev/kvm");
            return;
        };
        let vm = create_vm(&kvm).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        register_memory(&vm, &mem, false).unwrap();
        create_irqchip(&vm, Irqchip::LapicOnly).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        // The vCPU's LAPIC is KVM's: the boot code configures its LINT pins.
        vcpu.get_lapic().unwrap();
        // The legacy devices' interrupt lines still register (they lead nowhere).
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&fd, 4).unwrap();
        // No PIC or IO-APIC, no PIT.
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        assert!(vm.get_irqchip(&mut chip).is_err());
        assert!(vm.get_pit2().is_err());
        // The PC's controllers cannot come on top of it.
        assert!(create_irqchip(&vm, Irqchip::Pc).is_err());
    }
}
