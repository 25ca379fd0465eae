//! Per-vCPU state at power-on: CPUID, MSRs, FPU, LAPIC, and the boot CPU's registers.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vessel_boot::{BootRegs, EntryMode, Gdt, Segment};
use vessel_kvm::regs::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use vessel_kvm::template::CpuTemplate;

use crate::error::{KvmContext, VcpuError, VmmError};

/// LAPIC register offsets and delivery modes used to wire LINT0/LINT1 as on a PC.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Set CPUID, MSRs, FPU and LAPIC of one vCPU (boot CPU or not); a custom CPU `template`
/// changes the CPUID and MSRs Vessel sets.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    num_cpus: u8,
    supported_cpuid: &CpuId,
    hide_pv: bool,
    template: Option<&CpuTemplate>,
) -> Result<(), VmmError> {
    set_cpuid(vcpu, id, num_cpus, supported_cpuid, hide_pv, template)?;
    set_power_on_state(vcpu, id, template)
}

fn vcpu_error(id: u8) -> impl Fn(VcpuError) -> VmmError {
    move |source| VmmError::Vcpu { cpu: id, source }
}

/// Set the CPUID of one vCPU, computed from what this host's KVM supports, with a custom CPU
/// `template` applied on top.
pub fn set_cpuid(
    vcpu: &VcpuFd,
    id: u8,
    num_cpus: u8,
    supported_cpuid: &CpuId,
    hide_pv: bool,
    template: Option<&CpuTemplate>,
) -> Result<(), VmmError> {
    let mut cpuid = vessel_kvm::cpuid::normalize(supported_cpuid, id, num_cpus, hide_pv);
    if let Some(t) = template {
        t.apply_cpuid(&mut cpuid)
            .map_err(|e| vcpu_error(id)(VcpuError::Template(e)))?;
    }
    vcpu.set_cpuid2(&cpuid).kvm("KVM_SET_CPUID2")
}

/// The MSRs (with a template's changes), FPU and LAPIC LINT wiring a vCPU has at power-on. A
/// restored vCPU skips this: its saved state sets all of them (the snapshot's MSR list holds
/// every boot MSR).
fn set_power_on_state(
    vcpu: &VcpuFd,
    id: u8,
    template: Option<&CpuTemplate>,
) -> Result<(), VmmError> {
    let fail = vcpu_error(id);
    let entries = vessel_kvm::msrs::boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(VmmError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).kvm("KVM_SET_MSRS")?;
    if set != entries.len() {
        return Err(fail(VcpuError::BootMsrs {
            set,
            total: entries.len(),
            first: entries[set].index,
        }));
    }

    if let Some(t) = template.filter(|t| !t.msrs.is_empty()) {
        let entries = t.msr_entries();
        let mut msrs = Msrs::from_entries(&entries).map_err(VmmError::MsrList)?;
        let read = vcpu.get_msrs(&mut msrs).kvm("KVM_GET_MSRS")?;
        if read != entries.len() {
            return Err(fail(VcpuError::TemplateMsrUnreadable(entries[read].index)));
        }
        t.apply_msrs(msrs.as_mut_slice());
        let set = vcpu.set_msrs(&msrs).kvm("KVM_SET_MSRS")?;
        if set != entries.len() {
            return Err(fail(VcpuError::TemplateMsrRefused {
                value: msrs.as_slice()[set].data,
                msr: entries[set].index,
            }));
        }
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).kvm("KVM_SET_FPU")?;

    let mut lapic = vcpu.get_lapic().kvm("KVM_GET_LAPIC")?;
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).kvm("KVM_SET_LAPIC")?;
    Ok(())
}

/// Put `mode` in the delivery-mode field (bits 8..11) of a LAPIC LVT register.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// Convert a boot-protocol segment into KVM's form.
pub fn kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Registers of the boot CPU at the kernel's entry point.
pub fn set_boot_registers(
    vcpu: &VcpuFd,
    regs: &BootRegs,
    gdt: &Gdt,
    cr3: u64,
) -> Result<(), VmmError> {
    let mut sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
    let code = kvm_segment(&gdt.code);
    let data = kvm_segment(&gdt.data);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment(&gdt.tss);
    sregs.gdt.base = gdt.base;
    sregs.gdt.limit = gdt.limit;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    match regs.mode {
        EntryMode::Long64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).kvm("KVM_SET_SREGS")?;

    let kregs = kvm_regs {
        rip: regs.rip,
        rsp: regs.rsp,
        rbp: regs.rsp,
        rsi: regs.rsi,
        rbx: regs.rbx,
        rflags: regs.rflags,
        ..Default::default()
    };
    vcpu.set_regs(&kregs).kvm("KVM_SET_REGS")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_is_set_without_touching_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // Masked (bit 16) with vector 0x30 and a stale NMI mode.
        let v: u32 = (1 << 16) | (APIC_MODE_NMI << 8) | 0x30;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[APIC_LVT0 + i] = *b as std::os::raw::c_char;
        }
        set_lvt(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[APIC_LVT0 + i] as u8;
        }
        assert_eq!(
            u32::from_le_bytes(b),
            (1 << 16) | (APIC_MODE_EXTINT << 8) | 0x30
        );
        assert!(regs[APIC_LVT1..APIC_LVT1 + 4].iter().all(|&x| x == 0));
    }

    #[test]
    fn segments_convert_field_by_field() {
        let s = Segment {
            selector: 0x10,
            base: 0,
            limit: 0xfffff,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
        };
        let k = kvm_segment(&s);
        assert_eq!(
            (k.selector, k.type_, k.present, k.l, k.g, k.s, k.db),
            (0x10, 0xb, 1, 1, 1, 1, 0)
        );
    }
}
