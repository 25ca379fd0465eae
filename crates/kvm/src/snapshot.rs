//! Saving and restoring what KVM holds of a VM: each vCPU's architectural state
//! ([`VcpuState`]) and the in-kernel devices and clock ([`VmKvmState`]). The VMM's snapshot
//! code stores these (they are `serde` types) next to its own devices' state.
//!
//! Restore order matters, and follows what the kernel expects: CPUID first (the saved one;
//! a state file from before it was saved leaves it to the caller, who sets it when the vCPU
//! is created), then the MP state, registers, special registers, XSAVE, XCRs, debug
//! registers, the local APIC, the MSRs (TSC first, so that the TSC deadline is read against
//! the restored counter) and last the pending events.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::error::KvmError;
use crate::msrs::index;

/// IA32_TSC: restored first among the MSRs.
const MSR_IA32_TSC: u32 = 0x10;
/// KVM accepts at most this many MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS`.
const MSR_BATCH: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// Everything KVM keeps about one vCPU that a restored guest needs.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value), IA32_TSC first.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, when KVM reports one.
    pub tsc_khz: Option<u32>,
    /// The CPUID the vCPU was given (`KVM_GET_CPUID2`), set again on restore so the guest
    /// keeps the CPU it booted on. Absent from state files of earlier Vessels: their restore
    /// computes the CPUID from the host as a boot does.
    #[serde(default)]
    pub cpuid: Option<Vec<kvm_cpuid_entry2>>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The in-kernel interrupt controllers, PIT and clock of a VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmKvmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmKvmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// The MSRs a snapshot asks for: every MSR KVM lists as saved or emulated, plus the MTRRs
/// KVM emulates without listing them, IA32_TSC first. [`VcpuState::save`] leaves out those a
/// vCPU cannot read.
pub fn msr_candidates(kvm: &Kvm) -> Result<Vec<u32>, KvmError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut out: Vec<u32> = vec![MSR_IA32_TSC];
    // MTRRs (not MTRRcap, 0xfe, which is read-only): default type, 8 variable pairs, the
    // fixed-range ones.
    let mtrrs = [index::MTRR_DEF_TYPE]
        .into_iter()
        .chain(0x200..0x210)
        .chain([0x250, 0x258, 0x259])
        .chain(0x268..0x270);
    for i in listed.as_slice().iter().copied().chain(mtrrs) {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    Ok(out)
}

/// Reads `indices`, skipping any that KVM refuses (it stops a batch at the first).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, KvmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::TooManyEntries {
            what: "MSR list",
            len: entries.len(),
            max: MSR_BATCH,
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Entry `n` failed: skip it.
        rest = &rest[(n + 1).min(rest.len())..];
        if n == batch.len() {
            continue;
        }
        if let Some(i) = batch.get(n) {
            log::debug!("MSR {i:#x} is not readable: left out of the snapshot");
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread is outside `KVM_RUN`).
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, KvmError> {
        // KVM_GET_MP_STATE first: it flushes pending APIC events into the state read after.
        let mp_state = vcpu
            .get_mp_state()
            .map_err(KvmError::ioctl("KVM_GET_MP_STATE"))?;
        Ok(VcpuState {
            mp_state,
            regs: vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(KvmError::ioctl("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(KvmError::ioctl("KVM_GET_XCRS"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?,
            msrs: read_msrs(vcpu, msr_indices)?,
            events: vcpu
                .get_vcpu_events()
                .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: vcpu.get_tsc_khz().ok().filter(|&k| k > 0),
            cpuid: Some(
                vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(KvmError::ioctl("KVM_GET_CPUID2"))?
                    .as_slice()
                    .to_vec(),
            )
            .filter(|c| !c.is_empty()),
        })
    }

    /// Loads this state into a freshly created vCPU: its saved CPUID first, or, for a state
    /// without one ([`VcpuState::cpuid`] `None`), the caller has set the CPUID already.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        if let Some(entries) = &self.cpuid {
            let cpuid = CpuId::from_entries(entries).map_err(|_| KvmError::TooManyEntries {
                what: "CPUID",
                len: entries.len(),
                max: KVM_MAX_CPUID_ENTRIES,
            })?;
            vcpu.set_cpuid2(&cpuid)
                .map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
        }
        if let Some(khz) = self.tsc_khz {
            // A host with another TSC frequency needs TSC scaling; without it the guest
            // keeps running on the host's rate, which its clocksource re-calibrates.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = vcpu.set_tsc_khz(khz) {
                    log::warn!("cannot set the guest TSC to {khz} kHz: {e}");
                }
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` as KVM_GET_XSAVE returned it; the
        // 4 KiB legacy layout is all this ioctl reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(KvmError::ioctl("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(KvmError::ioctl("KVM_SET_LAPIC"))?;
        write_msrs(vcpu, &self.msrs)?;
        // KVM_SET_VCPU_EVENTS writes nmi.pending and interrupt.shadow only with
        // VALID_NMI_PENDING and VALID_SHADOW (else a pending NMI is dropped). KVM_GET_VCPU_EVENTS
        // fills both and flags them itself, with SMM (and PAYLOAD or TRIPLE_FAULT when those
        // capabilities are on, which a SET on a VM without them refuses): keep its flags, and
        // set the two this restore depends on whatever the file says. Never
        // VALID_SIPI_VECTOR: GET reports sipi_vector as 0 ("never valid when reporting"),
        // which would overwrite the LAPIC's.
        let mut events = self.events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW;
        vcpu.set_vcpu_events(&events)
            .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Writes `msrs` in order; an MSR this KVM refuses is logged and skipped.
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), KvmError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let kmsrs = Msrs::from_entries(&entries).map_err(|_| KvmError::TooManyEntries {
            what: "MSR list",
            len: entries.len(),
            max: MSR_BATCH,
        })?;
        let n = vcpu
            .set_msrs(&kmsrs)
            .map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
        if let Some((i, v)) = batch.get(n) {
            log::warn!("KVM refused MSR {i:#x} = {v:#x} on restore: skipped");
        }
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(KvmError::ioctl("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl VmKvmState {
    /// Reads the irqchips, the PIT and the clock of a VM whose vCPUs are all stopped.
    pub fn save(vm: &VmFd) -> Result<VmKvmState, KvmError> {
        let mut clock = vm.get_clock().map_err(KvmError::ioctl("KVM_GET_CLOCK"))?;
        // Only `clock` is meaningful to KVM_SET_CLOCK; the flags describe the reading.
        clock.flags = 0;
        Ok(VmKvmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(KvmError::ioctl("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Loads this state into a VM that has its irqchip and PIT created.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmError> {
        vm.set_pit2(&self.pit)
            .map_err(KvmError::ioctl("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock)
            .map_err(KvmError::ioctl("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(KvmError::ioctl("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm() -> Option<Kvm> {
        Kvm::new().ok()
    }

    #[test]
    fn vcpu_state_round_trips_through_a_new_vm() {
        let Some(kvm) = kvm() else { return };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let indices = msr_candidates(&kvm).unwrap();
        assert_eq!(indices.first(), Some(&MSR_IA32_TSC));
        assert!(indices.contains(&index::LSTAR));
        // The vCPU's CPUID, with a mark only this test puts there: leaf 0x4000_0000's EBX.
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let hv = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == 0x4000_0000)
            .expect("KVM lists its signature leaf");
        hv.ebx = 0x7e57_c1d0;
        vcpu.set_cpuid2(&cpuid).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x1000;
        vcpu.set_regs(&regs).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr0 |= 1;
        vcpu.set_sregs(&sregs).unwrap();
        write_msrs(&vcpu, &[(index::LSTAR, 0xffff_ffff_8100_0000)]).unwrap();
        let state = VcpuState::save(&vcpu, &indices).unwrap();
        // Unreadable candidates were left out; the rest came back.
        assert!(state.msrs.len() > 10 && state.msrs.len() <= indices.len());
        assert_eq!(state.msrs[0].0, MSR_IA32_TSC);

        // Through serde, as the snapshot file carries it.
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        // A state file from before the CPUID was saved still loads, without one.
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(old.as_object_mut().unwrap().remove("cpuid").is_some());
        let old: VcpuState = serde_json::from_value(old).unwrap();
        assert!(old.cpuid.is_none());

        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        let vcpu2 = vm2.create_vcpu(0).unwrap();
        back.restore(&vcpu2).unwrap();
        let r = vcpu2.get_regs().unwrap();
        assert_eq!((r.rax, r.rip), (0x1234_5678, 0x1000));
        // The saved CPUID, not one computed here.
        let back_cpuid = vcpu2.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let hv2 = back_cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x4000_0000)
            .unwrap();
        assert_eq!(hv2.ebx, 0x7e57_c1d0);
        let leaves = |c: &[kvm_cpuid_entry2]| -> Vec<(u32, u32, u32, u32, u32, u32)> {
            c.iter()
                .map(|e| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx))
                .collect()
        };
        assert_eq!(
            leaves(back_cpuid.as_slice()),
            leaves(back.cpuid.as_deref().unwrap())
        );
        assert_eq!(vcpu2.get_sregs().unwrap().cr0 & 1, 1);
        let lstar = read_msrs(&vcpu2, &[index::LSTAR]).unwrap();
        assert_eq!(lstar, [(index::LSTAR, 0xffff_ffff_8100_0000)]);
    }

    #[test]
    fn a_pending_nmi_and_the_interrupt_shadow_survive_restore() {
        let Some(kvm) = kvm() else { return };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut ev = vcpu.get_vcpu_events().unwrap();
        ev.nmi.pending = 1;
        // KVM_X86_SHADOW_INT_MOV_SS: the instruction after a MOV SS.
        ev.interrupt.shadow = 1;
        ev.flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW;
        vcpu.set_vcpu_events(&ev).unwrap();
        let state = VcpuState::save(&vcpu, &[MSR_IA32_TSC]).unwrap();
        assert_eq!(state.events.nmi.pending, 1);
        let mut state: VcpuState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        // Restore writes both whatever flags the saving kernel reported.
        state.events.flags &= !(KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW);

        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        let vcpu2 = vm2.create_vcpu(0).unwrap();
        state.restore(&vcpu2).unwrap();
        let back = vcpu2.get_vcpu_events().unwrap();
        assert_eq!(back.nmi.pending, 1, "the pending NMI is restored");
        assert_eq!(back.interrupt.shadow, 1);
    }

    /// Restore skips the boot-time MSR setup: the snapshot must hold every MSR it sets.
    #[test]
    fn snapshots_cover_the_boot_msrs() {
        let Some(kvm) = kvm() else { return };
        let candidates = msr_candidates(&kvm).unwrap();
        for m in crate::msrs::boot_msrs() {
            assert!(candidates.contains(&m.index), "MSR {:#x}", m.index);
        }
    }

    #[test]
    fn vm_state_round_trips() {
        let Some(kvm) = kvm() else { return };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .unwrap();
        let mut state = VmKvmState::save(&vm).unwrap();
        // Redirection entry 4 of the IO-APIC: vector 0x34, unmasked.
        // SAFETY: chip 2 is the IO-APIC, so `ioapic` is the union member KVM filled.
        unsafe { state.ioapic.chip.ioapic.redirtbl[4].bits = 0x34 };
        let json = serde_json::to_string(&state).unwrap();
        let back: VmKvmState = serde_json::from_str(&json).unwrap();
        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        vm2.create_pit2(kvm_bindings::kvm_pit_config::default())
            .unwrap();
        back.restore(&vm2).unwrap();
        let again = VmKvmState::save(&vm2).unwrap();
        // SAFETY: as above, chip 2 is the IO-APIC.
        let bits = unsafe { again.ioapic.chip.ioapic.redirtbl[4].bits };
        assert_eq!(bits, 0x34);
    }
}
