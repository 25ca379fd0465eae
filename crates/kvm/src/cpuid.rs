//! The per-vCPU CPUID table: KVM's supported CPUID shaped into what a Vessel guest sees.
//!
//! Policy, leaf by leaf:
//! - 0x1: initial APIC id = vCPU id, logical processor count and HTT for SMP, the hypervisor
//!   bit set; features the VMM does not emulate cleared (MONITOR/MWAIT, VMX/SMX, Debug Store,
//!   PDCM, thermal/power: EST, TM, TM2, ACPI, PBE, xTPR). TSC-deadline stays as KVM reports it.
//! - 0x4 (Intel) / 0x8000_001D (AMD): caches; L1/L2 private to a core (one thread per core),
//!   L3 shared by all vCPUs; 0x4 also gives cores per package = vCPU count.
//! - 0x6: no power management; only ARAT (the APIC timer keeps running) is kept.
//! - 0xA: no PMU (all zero); AMD's core/NB/LLC counter extensions and 0x8000_0022 too.
//! - 0xB and 0x1F: x2APIC topology of one package of `num_vcpus` cores with one thread each;
//!   EDX = x2APIC id = vCPU id.
//! - 0x8000_0001: SVM cleared (no nested virtualization).
//! - 0x8000_0008 (AMD): NC = vCPUs - 1, ApicIdCoreIdSize to match.
//! - 0x8000_001E (AMD): extended APIC id = vCPU id, compute unit = vCPU id, one thread per unit.
//! - 0x4000_0000: "KVMKVMKVM\0\0\0" and the highest hypervisor leaf.
//! - 0x4000_0001: KVM's paravirt features, less those that need a hypercall when `hide_pv`.
//! - 0x8000_0002..4: the host's brand string, kept: guests print it and users recognise their
//!   CPU in it; a made-up name would hide which microarchitecture a performance figure came from.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};

// Leaf 0x1 ECX.
const ECX_DTES64: u32 = 1 << 2;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_DS_CPL: u32 = 1 << 4;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_XTPR: u32 = 1 << 14;
const ECX_PDCM: u32 = 1 << 15;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 0x1 EDX.
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI: u32 = 1 << 22;
const EDX_HTT: u32 = 1 << 28;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
// Leaf 0x6 EAX.
const EAX_ARAT: u32 = 1 << 2;
// Leaf 0x8000_0001 ECX.
const EXT_ECX_SVM: u32 = 1 << 2;
const EXT_ECX_PERFCTR_CORE: u32 = 1 << 23;
const EXT_ECX_PERFCTR_NB: u32 = 1 << 24;
const EXT_ECX_PERFCTR_LLC: u32 = 1 << 28;
// Leaf 0x4000_0001 EAX (Linux uapi asm/kvm_para.h).
const KVM_FEATURE_MMU_OP: u32 = 1 << 2;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 1 << 16;
const KVM_PV_HYPERCALL_FEATURES: u32 = KVM_FEATURE_MMU_OP
    | KVM_FEATURE_PV_UNHALT
    | KVM_FEATURE_PV_SEND_IPI
    | KVM_FEATURE_PV_SCHED_YIELD
    | KVM_FEATURE_HC_MAP_GPA_RANGE;

const HYPERVISOR_BASE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// x2APIC topology level types (leaf 0xB/0x1F ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    Amd,
    Other,
}

/// The CPUID table for vCPU `vcpu_id` of a VM with `num_vcpus` vCPUs, built from
/// `supported` (`KVM_GET_SUPPORTED_CPUID`) by the policy in the module documentation.
///
/// With `hide_pv`, leaf 0x4000_0001 offers no paravirtual feature that needs a hypercall (PV
/// unhalt/kick, PV IPIs, PV sched-yield, map-GPA-range) and no realtime hint: for nested hosts
/// where `vmcall`/`vmmcall` from the guest kernel never complete. The MSR-based ones (kvmclock,
/// steal time, PV EOI, async PF) stay.
pub fn normalize(supported: &CpuId, vcpu_id: u8, num_vcpus: u8, hide_pv: bool) -> CpuId {
    let num_vcpus = u32::from(num_vcpus.max(1));
    let id = u32::from(vcpu_id);
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let vendor = vendor(&entries);

    for e in entries.iter_mut() {
        match e.function {
            0x1 => leaf_1(e, id, num_vcpus),
            0x4 if vendor == Vendor::Intel => cache_leaf(e, num_vcpus, true),
            0x6 => {
                e.eax &= EAX_ARAT;
                (e.ebx, e.ecx, e.edx) = (0, 0, 0);
            }
            0xa | 0x8000_0022 => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            0x8000_0001 => {
                e.ecx &= !(EXT_ECX_SVM
                    | EXT_ECX_PERFCTR_CORE
                    | EXT_ECX_PERFCTR_NB
                    | EXT_ECX_PERFCTR_LLC);
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(num_vcpus) << 12) | (num_vcpus - 1);
            }
            0x8000_001d if vendor == Vendor::Amd => cache_leaf(e, num_vcpus, false),
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = id;
                e.ebx = id & 0xff; // compute unit id; threads per unit - 1 = 0
                e.ecx = 0; // node 0, one node per package
                e.edx = 0;
            }
            HYPERVISOR_BASE => {
                e.eax = e.eax.max(KVM_CPUID_FEATURES);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            KVM_CPUID_FEATURES if hide_pv => {
                e.eax &= !KVM_PV_HYPERCALL_FEATURES;
                e.edx = 0; // KVM_HINTS_REALTIME
            }
            _ => {}
        }
    }
    for leaf in [0xb, 0x1f] {
        x2apic_topology(&mut entries, leaf, id, num_vcpus);
    }

    // `supported` came as a CpuId, so it had at most KVM_MAX_CPUID_ENTRIES entries, and
    // x2apic_topology adds entries only while there is room.
    CpuId::from_entries(&entries).expect("CPUID table within KVM_MAX_CPUID_ENTRIES")
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` items: ceil(log2(n)), 0 for n <= 1.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn leaf_1(e: &mut kvm_cpuid_entry2, id: u32, num_vcpus: u32) {
    e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (num_vcpus.min(0xff) << 16);
    e.ecx &= !(ECX_DTES64
        | ECX_MONITOR
        | ECX_DS_CPL
        | ECX_VMX
        | ECX_SMX
        | ECX_EST
        | ECX_TM2
        | ECX_XTPR
        | ECX_PDCM);
    e.ecx |= ECX_HYPERVISOR;
    e.edx &= !(EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE | EDX_HTT);
    if num_vcpus > 1 {
        e.edx |= EDX_HTT;
    }
}

/// Intel leaf 0x4 / AMD leaf 0x8000_001D subleaf: who shares the cache, and (Intel) how many
/// cores the package has.
fn cache_leaf(e: &mut kvm_cpuid_entry2, num_vcpus: u32, intel: bool) {
    let cache_type = e.eax & 0x1f;
    if cache_type == 0 {
        return; // no more caches
    }
    let level = (e.eax >> 5) & 0x7;
    let sharing = if level >= 3 { num_vcpus - 1 } else { 0 };
    e.eax = (e.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
    if intel {
        e.eax = (e.eax & !(0x3f << 26)) | (((num_vcpus - 1) & 0x3f) << 26);
    }
}

/// Rewrites leaf 0xB or 0x1F, when the table has it, as subleaf 0 = SMT (one thread),
/// subleaf 1 = core (`num_vcpus`), subleaf 2 = end of list. Subleaves the table lacks are added
/// only while it stays within KVM_MAX_CPUID_ENTRIES.
fn x2apic_topology(entries: &mut Vec<kvm_cpuid_entry2>, leaf: u32, id: u32, num_vcpus: u32) {
    let existing = entries.iter().filter(|e| e.function == leaf).count();
    if existing == 0 {
        return;
    }
    entries.retain(|e| e.function != leaf);
    let room = KVM_MAX_CPUID_ENTRIES - entries.len();
    let core_shift = bits_for(num_vcpus);
    let levels = [
        (0, 1, LEVEL_SMT),
        (core_shift, num_vcpus, LEVEL_CORE),
        (0, 0, 0),
    ];
    for (index, (shift, count, level_type)) in (0u32..).zip(levels).take(room) {
        entries.push(kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: count,
            ecx: (level_type << 8) | index,
            edx: id,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// "GenuineIntel" / "AuthenticAMD" as leaf-0 EBX, ECX, EDX.
    const INTEL: [u32; 3] = [0x756e_6547, 0x6c65_746e, 0x4965_6e69];
    const AMD: [u32; 3] = [0x6874_7541, 0x444d_4163, 0x6974_6e65];

    fn synthetic(vendor: [u32; 3]) -> CpuId {
        let all = u32::MAX;
        CpuId::from_entries(&[
            entry(0, 0, [0x1f, vendor[0], vendor[1], vendor[2]]),
            entry(1, 0, [0x000a_0f11, 0x0010_0800, all & !ECX_HYPERVISOR, all]),
            // L1d, L2, L3 and the end marker.
            entry(4, 0, [0x0000_0121, 0, 0, 0]),
            entry(4, 1, [0x0000_0143, 0, 0, 0]),
            entry(4, 2, [0x0000_0163, 0, 0, 0]),
            entry(4, 3, [0, 0, 0, 0]),
            entry(6, 0, [0x7, 0x1, 0x9, 0]),
            entry(0xa, 0, [0x0708_3002, 0, 0, 0x603]),
            entry(0xb, 0, [1, 2, 0x100, 9]),
            entry(0x1f, 0, [1, 2, 0x100, 9]),
            entry(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            entry(0x4000_0001, 0, [0x01ff_ffff, 0, 0, 1]),
            entry(0x8000_0001, 0, [0, 0, all, 0]),
            entry(
                0x8000_0002,
                0,
                [0x2044_4d41, 0x43595045, 0x3437_3720, 0x3120_3335],
            ),
            entry(0x8000_0008, 0, [0x3030, 0, 0x0003_7003, 0]),
            entry(0x8000_001d, 0, [0x0000_0121, 0, 0, 0]),
            entry(0x8000_001d, 1, [0x0000_0163, 0, 0, 0]),
            entry(0x8000_001e, 0, [0, 0x0100, 0x0300, 0]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let out = normalize(&synthetic(INTEL), 2, 4, false);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand index kept");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        for bit in [
            ECX_MONITOR,
            ECX_VMX,
            ECX_SMX,
            ECX_PDCM,
            ECX_DTES64,
            ECX_DS_CPL,
        ] {
            assert_eq!(l1.ecx & bit, 0, "ecx bit {bit:#x} cleared");
        }
        assert_eq!(l1.edx & EDX_DS, 0);
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC-deadline kept");
        assert_ne!(l1.ecx & (1 << 23), 0, "POPCNT kept");
        let up = normalize(&synthetic(INTEL), 0, 1, false);
        assert_eq!(find(&up, 1, 0).edx & EDX_HTT, 0, "no HTT with one vCPU");
    }

    #[test]
    fn intel_cache_leaves_share_l3_only() {
        let out = normalize(&synthetic(INTEL), 1, 4, false);
        let sharing = |i| (find(&out, 4, i).eax >> 14) & 0xfff;
        let cores = |i| (find(&out, 4, i).eax >> 26) + 1;
        assert_eq!((sharing(0), sharing(1), sharing(2)), (0, 0, 3));
        assert_eq!((cores(0), cores(2)), (4, 4));
        assert_eq!(find(&out, 4, 2).eax & 0xff, 0x63, "type and level kept");
        assert_eq!(find(&out, 4, 3).eax, 0, "end marker untouched");
    }

    #[test]
    fn x2apic_topology_has_smt_core_and_end_levels() {
        let out = normalize(&synthetic(INTEL), 5, 6, false);
        for leaf in [0xb, 0x1f] {
            let smt = find(&out, leaf, 0);
            let core = find(&out, leaf, 1);
            let end = find(&out, leaf, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            assert_eq!((end.ebx, end.ecx >> 8, end.edx), (0, 0, 5));
            assert_ne!(smt.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
            assert_eq!(
                out.as_slice().iter().filter(|e| e.function == leaf).count(),
                3
            );
        }
    }

    #[test]
    fn amd_topology_leaves() {
        let out = normalize(&synthetic(AMD), 3, 4, false);
        let l8 = find(&out, 0x8000_0008, 0);
        assert_eq!(l8.ecx & 0xff, 3, "NC = vCPUs - 1");
        assert_eq!((l8.ecx >> 12) & 0xf, 2, "ApicIdCoreIdSize");
        assert_eq!((l8.ecx >> 16) & 3, 3, "PerfTscSize kept");
        let l1e = find(&out, 0x8000_001e, 0);
        assert_eq!((l1e.eax, l1e.ebx, l1e.ecx), (3, 3, 0));
        let l1d = |i| (find(&out, 0x8000_001d, i).eax >> 14) & 0xfff;
        assert_eq!((l1d(0), l1d(1)), (0, 3));
        let l4 = find(&out, 4, 0);
        assert_eq!(l4.eax, 0x121, "leaf 4 is Intel's: left alone on AMD");
        assert_eq!(find(&out, 0x8000_0001, 0).ecx & EXT_ECX_SVM, 0);
        assert_eq!(find(&out, 0x8000_0001, 0).ecx & EXT_ECX_PERFCTR_CORE, 0);
    }

    #[test]
    fn power_pmu_and_brand() {
        let out = normalize(&synthetic(INTEL), 0, 2, false);
        let l6 = find(&out, 6, 0);
        assert_eq!((l6.eax, l6.ebx, l6.ecx, l6.edx), (EAX_ARAT, 0, 0, 0));
        let la = find(&out, 0xa, 0);
        assert_eq!((la.eax, la.ebx, la.ecx, la.edx), (0, 0, 0, 0));
        let brand = find(&out, 0x8000_0002, 0);
        assert_eq!(brand.eax, 0x2044_4d41, "host brand string kept");
    }

    #[test]
    fn hypervisor_leaves_and_hide_pv() {
        let sig = |c: &CpuId| {
            let e = find(c, HYPERVISOR_BASE, 0);
            let mut s = Vec::new();
            for r in [e.ebx, e.ecx, e.edx] {
                s.extend_from_slice(&r.to_le_bytes());
            }
            (e.eax, s)
        };
        let all = normalize(&synthetic(INTEL), 0, 1, false);
        assert_eq!(sig(&all), (0x4000_0001, b"KVMKVMKVM\0\0\0".to_vec()));
        assert_eq!(find(&all, KVM_CPUID_FEATURES, 0).eax, 0x01ff_ffff);

        let no_hc = normalize(&synthetic(INTEL), 0, 1, true);
        let f = find(&no_hc, KVM_CPUID_FEATURES, 0);
        assert_eq!(f.eax & KVM_PV_HYPERCALL_FEATURES, 0);
        assert_ne!(f.eax & 1, 0, "kvmclock (MSR-based) kept");
        assert_ne!(f.eax & (1 << 5), 0, "steal time kept");
        assert_eq!(f.edx, 0, "no realtime hint");
        assert_eq!(sig(&no_hc).1, b"KVMKVMKVM\0\0\0".to_vec());
    }

    #[test]
    fn a_full_table_stays_within_kvm_limit() {
        // 255 filler leaves plus one leaf-0xB subleaf: only one more subleaf fits.
        let mut entries: Vec<kvm_cpuid_entry2> = (0..255)
            .map(|i| entry(0x8000_1000 + i, 0, [0; 4]))
            .collect();
        entries.push(entry(0xb, 0, [1, 2, 0x100, 0]));
        let full = CpuId::from_entries(&entries).unwrap();
        let out = normalize(&full, 1, 2, false);
        assert_eq!(out.as_slice().len(), KVM_MAX_CPUID_ENTRIES);
        assert_eq!(find(&out, 0xb, 0).edx, 1);
    }

    #[test]
    fn bits_for_rounds_up() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 255].map(bits_for),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }

    /// On a host with /dev/kvm: KVM's real table, normalized for vCPUs 0..3 of 4, and accepted
    /// by KVM_SET_CPUID2.
    #[test]
    fn real_supported_cpuid_for_four_vcpus() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("/dev/kvm not openable: skipping");
            return;
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        for id in 0..4u8 {
            let out = normalize(&supported, id, 4, true);
            let l1 = find(&out, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            if out.as_slice().iter().any(|e| e.function == 0xb) {
                assert_eq!(find(&out, 0xb, 0).edx, u32::from(id));
                assert_eq!(find(&out, 0xb, 1).ebx, 4);
            }
            if vendor(out.as_slice()) == Vendor::Amd {
                assert_eq!(find(&out, 0x8000_0008, 0).ecx & 0xff, 3);
                assert_eq!(find(&out, 0x8000_001e, 0).eax, u32::from(id));
            }
            let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
            vcpu.set_cpuid2(&out).unwrap();
            let back = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            assert_eq!(
                find(&back, 1, 0).ebx >> 24,
                u32::from(id),
                "KVM kept our table"
            );
        }
    }
}
