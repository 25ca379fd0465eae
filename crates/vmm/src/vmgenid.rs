//! The VM generation ID (Microsoft's "Virtual Machine Generation ID", what Linux's `vmgenid`
//! driver reads): 16 random bytes at [`addr::VMGENID_START`], which the DSDT describes
//! (`vessel_boot::VmGenIdInfo`) next to an ACPI generic event device on [`ports::GED_IRQ`].
//!
//! A new Linux guest gets a random ID. Every VM restored from a snapshot gets a fresh one,
//! written into its own (private, copy-on-write) memory, and an edge on the generic event
//! device's interrupt, whose `_EVT` notifies the guest: clones of one snapshot tell
//! themselves apart (Linux reseeds its RNG on the change). A live migration keeps the ID:
//! that is the same VM moving, not a copy.

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vessel_boot::VmGenIdInfo;
use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{addr, ports, GuestMemoryMmap};

use crate::config::Payload;
use crate::error::VmmError;

/// A VM generation ID, as the guest reads it.
pub type GenerationId = [u8; addr::VMGENID_SIZE as usize];

/// Where a VM's generation ID is and which interrupt announces a new one (kept in snapshots:
/// a state file without it is of a VM that has no such device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    /// Guest-physical address of the ID.
    pub addr: u64,
    /// The generic event device's GSI.
    pub irq: u32,
}

impl VmGenIdState {
    /// What the ACPI tables describe.
    pub fn info(&self) -> VmGenIdInfo {
        VmGenIdInfo {
            addr: self.addr,
            irq: self.irq,
        }
    }

    /// Refuses what a damaged or hostile state file could hold.
    fn check(&self) -> Result<(), VmmError> {
        if !self.addr.is_multiple_of(8) || self.irq >= ports::MSI_GSI_START {
            return Err(VmmError::BadVmGenId {
                addr: self.addr,
                irq: self.irq,
            });
        }
        Ok(())
    }
}

/// A new Linux guest booting `boot` gets a random ID in `mem`.
pub(crate) fn install(
    boot: &Payload,
    mem: &GuestMemoryMmap,
) -> Result<Option<VmGenIdState>, VmmError> {
    // The demo guest has no ACPI tables; a firmware owns the BIOS area the ID would use.
    if matches!(boot, Payload::Demo | Payload::Firmware(_)) {
        return Ok(None);
    }
    let s = VmGenIdState {
        addr: addr::VMGENID_START,
        irq: ports::GED_IRQ,
    };
    write_new(mem, &s)?;
    Ok(Some(s))
}

/// Writes a fresh random ID.
fn write_new(mem: &GuestMemoryMmap, s: &VmGenIdState) -> Result<GenerationId, VmmError> {
    let mut id = GenerationId::default();
    vessel_boot::host_random(&mut id)?;
    mem.write_slice(&id, GuestAddress(s.addr))
        .map_err(|source| VmmError::GuestMemory {
            what: "write the VM generation ID",
            addr: s.addr,
            source,
        })?;
    Ok(id)
}

/// The ID the guest reads now.
#[cfg(test)]
fn read(mem: &GuestMemoryMmap, s: &VmGenIdState) -> Result<GenerationId, VmmError> {
    let mut id = GenerationId::default();
    mem.read_slice(&mut id, GuestAddress(s.addr))
        .map_err(|source| VmmError::GuestMemory {
            what: "read the VM generation ID",
            addr: s.addr,
            source,
        })?;
    Ok(id)
}

/// Gives a restored VM a new ID and tells the guest (the irqchips must already hold the
/// snapshot's state, or the edge would be lost with the state that replaces them).
pub(crate) fn regenerate(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    s: &VmGenIdState,
) -> Result<GenerationId, VmmError> {
    s.check()?;
    let id = write_new(mem, s)?;
    crate::legacy::edge(vm, s.irq)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
    use vessel_memory::{create_guest_memory, GuestLayout};

    const VECTOR: u32 = 0x41;
    /// Local APIC registers: spurious-interrupt vector (bit 8 enables the APIC), and the
    /// interrupt request register (eight 32-bit words, 16 bytes apart).
    const APIC_SVR: usize = 0xf0;
    const APIC_IRR: usize = 0x200;

    fn reg(regs: &[std::os::raw::c_char], at: usize) -> u32 {
        let b: Vec<u8> = regs[at..at + 4].iter().map(|&c| c as u8).collect();
        u32::from_le_bytes(b.try_into().unwrap())
    }

    fn vector_requested(vcpu: &kvm_ioctls::VcpuFd) -> bool {
        let l = vcpu.get_lapic().unwrap();
        let word = reg(&l.regs, APIC_IRR + (VECTOR as usize / 32) * 0x10);
        word & (1 << (VECTOR % 32)) != 0
    }

    #[test]
    fn a_new_guest_gets_a_random_id_and_a_restore_a_fresh_one_with_an_interrupt() {
        let mem = create_guest_memory(&GuestLayout::new(64 << 20).unwrap()).unwrap();
        let linux = Payload::Linux {
            kernel: "/k".into(),
            initrd: None,
            system_map: None,
        };
        assert_eq!(install(&Payload::Demo, &mem).unwrap(), None);
        let s = install(&linux, &mem)
            .unwrap()
            .expect("a Linux guest has one");
        assert_eq!((s.addr, s.irq), (addr::VMGENID_START, ports::GED_IRQ));
        let first = read(&mem, &s).unwrap();
        assert_ne!(first, GenerationId::default());

        // A VM with the in-kernel irqchip whose guest routed the GED's pin to vector VECTOR
        // on vCPU 0, with its local APIC enabled.
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: chip 2 is the IO-APIC, so `ioapic` is the union member KVM filled. Fixed
        // delivery, physical destination APIC 0, edge-triggered, unmasked.
        unsafe { chip.chip.ioapic.redirtbl[s.irq as usize].bits = u64::from(VECTOR) };
        vm.set_irqchip(&chip).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        let svr = (reg(&lapic.regs, APIC_SVR) | 0x1ff).to_le_bytes();
        for (i, b) in svr.iter().enumerate() {
            lapic.regs[APIC_SVR + i] = *b as std::os::raw::c_char;
        }
        vcpu.set_lapic(&lapic).unwrap();
        assert!(!vector_requested(&vcpu));

        let second = regenerate(&vm, &mem, &s).unwrap();
        assert_eq!(read(&mem, &s).unwrap(), second);
        assert_ne!(second, first);
        assert!(
            vector_requested(&vcpu),
            "the GED interrupt reached the vCPU"
        );
        let third = regenerate(&vm, &mem, &s).unwrap();
        assert_ne!(third, second);
    }

    #[test]
    fn hostile_state_is_refused() {
        let mem = create_guest_memory(&GuestLayout::new(64 << 20).unwrap()).unwrap();
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        for (addr, irq) in [(0xf_f001, ports::GED_IRQ), (0xf_f000, 24), (1 << 40, 3)] {
            let s = VmGenIdState { addr, irq };
            let e = regenerate(&vm, &mem, &s).unwrap_err().to_string();
            assert!(e.contains("generation ID"), "{e}");
        }
    }
}
