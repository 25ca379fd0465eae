//! The model-specific registers a VMM sets on each vCPU before the first run.
//!
//! `IA32_TSC` is deliberately absent: KVM starts every vCPU's TSC at 0 when the vCPU is created
//! and keeps the vCPUs of a VM synchronised; writing it again from user space, at a slightly
//! different moment for each vCPU, can only add skew (Linux then marks the TSC unstable).
//! Snapshot restore, which must set it, is a different path.

use kvm_bindings::kvm_msr_entry;
use kvm_ioctls::Kvm;

use crate::error::KvmError;

/// MSR numbers, as the Intel SDM and AMD APM name them.
pub mod index {
    /// SYSENTER target CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER target RSP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER target RIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous feature enables.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// Default memory type and MTRR enable.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// SYSCALL/SYSRET segment selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit SYSCALL target.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode SYSCALL target.
    pub const CSTAR: u32 = 0xc000_0083;
    /// RFLAGS mask applied by SYSCALL.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// The GS base SWAPGS exchanges with.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// The value RDTSCP and RDPID return.
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// IA32_MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// MTRRdefType: E (MTRRs enabled, bit 11) with default type write-back (6).
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// The MSRs and values Vessel sets on every vCPU at boot: the SYSENTER/SYSCALL entry points and
/// kernel GS base cleared (the guest kernel programs them), fast strings on, and MTRRs enabled
/// with write-back as the default memory type (so the guest's PAT and ioremap see normal RAM).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (index::IA32_SYSENTER_CS, 0),
        (index::IA32_SYSENTER_ESP, 0),
        (index::IA32_SYSENTER_EIP, 0),
        (index::STAR, 0),
        (index::LSTAR, 0),
        (index::CSTAR, 0),
        (index::SYSCALL_MASK, 0),
        (index::KERNEL_GS_BASE, 0),
        (index::IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (index::MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// [`boot_msrs`] less those this KVM does not handle, judged by `KVM_GET_MSR_INDEX_LIST`.
pub fn msr_list_supported(kvm: &Kvm) -> Result<Vec<kvm_msr_entry>, KvmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(filter_supported(boot_msrs(), list.as_slice()))
}

/// Keeps the entries whose MSR is in `supported`, or is an MTRR: KVM always emulates the MTRRs
/// (0xFE, 0x200..=0x2FF) but leaves them out of `KVM_GET_MSR_INDEX_LIST`.
fn filter_supported(entries: Vec<kvm_msr_entry>, supported: &[u32]) -> Vec<kvm_msr_entry> {
    entries
        .into_iter()
        .filter(|e| is_mtrr(e.index) || supported.contains(&e.index))
        .collect()
}

pub(crate) fn is_mtrr(index: u32) -> bool {
    index == 0xfe || (0x200..=0x2ff).contains(&index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::Msrs;

    #[test]
    fn boot_values() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(index::MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(index::IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(index::LSTAR), Some(0));
        assert_eq!(get(0x10), None, "IA32_TSC is left to KVM");
        assert_eq!(msrs.len(), 10);
    }

    #[test]
    fn filter_keeps_listed_msrs_and_mtrrs() {
        let kept = filter_supported(boot_msrs(), &[index::LSTAR, index::STAR]);
        let indices: Vec<u32> = kept.iter().map(|e| e.index).collect();
        assert_eq!(indices, [index::STAR, index::LSTAR, index::MTRR_DEF_TYPE]);
    }

    /// On a host with /dev/kvm: every supported boot MSR is accepted by a real vCPU and reads
    /// back with its value.
    #[test]
    fn real_vcpu_accepts_the_supported_boot_msrs() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("/dev/kvm not openable: skipping");
            return;
        };
        let entries = msr_list_supported(&kvm).unwrap();
        assert!(entries.iter().any(|e| e.index == index::LSTAR));
        assert!(entries.iter().any(|e| e.index == index::MTRR_DEF_TYPE));
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let msrs = Msrs::from_entries(&entries).unwrap();
        assert_eq!(vcpu.set_msrs(&msrs).unwrap(), entries.len(), "all written");
        let mut back = Msrs::from_entries(&entries).unwrap();
        for e in back.as_mut_slice() {
            e.data = 0xdead;
        }
        assert_eq!(vcpu.get_msrs(&mut back).unwrap(), entries.len());
        for (want, got) in entries.iter().zip(back.as_slice()) {
            assert_eq!(want.data, got.data, "MSR {:#x}", want.index);
        }
    }
}
