//! Firecracker's custom CPU templates for x86_64 (`PUT /cpu-config`): bit-level changes to
//! CPUID leaves and to MSRs, applied on top of Vessel's CPUID policy ([`crate::cpuid`]) and
//! boot MSRs ([`crate::msrs`]) when the vCPUs are configured.
//!
//! A bitmap is `0b` followed by one character per bit, most significant first (32 for a
//! CPUID register, 64 for an MSR; `_` may separate groups): `0` clears the bit, `1` sets it,
//! `x` leaves it as Vessel's policy (CPUID) or KVM's initial value (MSRs) has it. A modifier
//! of a CPUID leaf that KVM does not offer, or of an MSR that KVM does not handle, is refused
//! when the template is checked ([`CpuTemplate::check`]) rather than added: the guest could
//! not rely on either. (Firecracker adds such a leaf.)

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId};
use serde::{Deserialize, Serialize};

/// What is wrong with a template, or with applying it on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("bitmap '{0}' does not start with 0b")]
    NoPrefix(String),
    #[error("bitmap '{bitmap}' has '{digit}': use 0, 1 or x for each bit")]
    BadDigit { bitmap: String, digit: char },
    #[error("bitmap '{bitmap}' has {got} bits, {bits} are needed (one 0, 1 or x per bit)")]
    Width { bitmap: String, got: u32, bits: u32 },
    #[error("'{0}' is not a 32-bit number (decimal, 0x hex or 0b binary)")]
    Number(String),
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf:#x} is not among those KVM offers on this host"
    )]
    LeafNotOffered { leaf: u32, subleaf: u32 },
    #[error("MSR {0:#x} is not one KVM handles on this host")]
    MsrNotHandled(u32),
    #[error("CPUID leaf {leaf:#x} subleaf {subleaf:#x} is missing")]
    LeafMissing { leaf: u32, subleaf: u32 },
}

/// Which bits a bitmap sets (`mask`) and to what (`value`, within `mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    pub mask: u64,
    pub value: u64,
}

impl Bitmap {
    /// Parses a bitmap of `bits` bits (32 or 64).
    pub fn parse(s: &str, bits: u32) -> Result<Bitmap, TemplateError> {
        let digits = s
            .strip_prefix("0b")
            .ok_or_else(|| TemplateError::NoPrefix(s.to_string()))?;
        let (mut mask, mut value, mut n) = (0u64, 0u64, 0u32);
        for c in digits.chars() {
            let (m, v) = match c {
                '_' => continue,
                '0' => (1, 0),
                '1' => (1, 1),
                'x' | 'X' => (0, 0),
                other => {
                    return Err(TemplateError::BadDigit {
                        bitmap: s.to_string(),
                        digit: other,
                    })
                }
            };
            n += 1;
            if n <= bits {
                mask = (mask << 1) | m;
                value = (value << 1) | v;
            }
        }
        if n != bits {
            return Err(TemplateError::Width {
                bitmap: s.to_string(),
                got: n,
                bits,
            });
        }
        Ok(Bitmap { mask, value })
    }

    /// `v` with the bitmap's bits set as it says.
    pub fn apply(&self, v: u64) -> u64 {
        (v & !self.mask) | (self.value & self.mask)
    }
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Changes to one CPUID leaf (and subleaf).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidModifier {
    pub leaf: u32,
    pub subleaf: u32,
    /// KVM's entry flags (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX` = 1, ...), as Firecracker sets them.
    pub flags: u32,
    pub registers: Vec<(Register, Bitmap)>,
}

/// Changes to one MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrModifier {
    pub addr: u32,
    pub bitmap: Bitmap,
}

/// A custom CPU template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTemplate {
    pub cpuid: Vec<CpuidModifier>,
    pub msrs: Vec<MsrModifier>,
}

/// A leaf, subleaf or MSR address: `0x` hexadecimal, `0b` binary or decimal.
pub fn parse_u32(s: &str) -> Result<u32, TemplateError> {
    let t = s.trim();
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u32::from_str_radix(&h.replace('_', ""), 16)
    } else if let Some(b) = t.strip_prefix("0b") {
        u32::from_str_radix(&b.replace('_', ""), 2)
    } else {
        t.parse()
    };
    r.map_err(|_| TemplateError::Number(s.to_string()))
}

/// KVM's entry for `leaf`/`subleaf`: subleaf 0 also names a leaf without subleaves.
fn find(
    entries: &mut [kvm_cpuid_entry2],
    leaf: u32,
    subleaf: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries.iter_mut().find(|e| {
        e.function == leaf
            && (e.index == subleaf
                || (subleaf == 0 && e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0))
    })
}

fn register(e: &mut kvm_cpuid_entry2, r: Register) -> &mut u32 {
    match r {
        Register::Eax => &mut e.eax,
        Register::Ebx => &mut e.ebx,
        Register::Ecx => &mut e.ecx,
        Register::Edx => &mut e.edx,
    }
}

impl CpuTemplate {
    /// Refuses modifiers of CPUID leaves absent from `supported` (`KVM_GET_SUPPORTED_CPUID`)
    /// and of MSRs absent from `msr_list` (`KVM_GET_MSR_INDEX_LIST`; MTRRs always pass).
    pub fn check(&self, supported: &CpuId, msr_list: &[u32]) -> Result<(), TemplateError> {
        let mut entries = supported.as_slice().to_vec();
        for m in &self.cpuid {
            if find(&mut entries, m.leaf, m.subleaf).is_none() {
                return Err(TemplateError::LeafNotOffered {
                    leaf: m.leaf,
                    subleaf: m.subleaf,
                });
            }
        }
        for m in &self.msrs {
            if !crate::msrs::is_mtrr(m.addr) && !msr_list.contains(&m.addr) {
                return Err(TemplateError::MsrNotHandled(m.addr));
            }
        }
        Ok(())
    }

    /// Applies the CPUID modifiers to a vCPU's table (after Vessel's policy). A leaf missing
    /// from `cpuid` is an error ([`Self::check`] catches it first).
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) -> Result<(), TemplateError> {
        let entries = cpuid.as_mut_slice();
        for m in &self.cpuid {
            let e = find(entries, m.leaf, m.subleaf).ok_or(TemplateError::LeafMissing {
                leaf: m.leaf,
                subleaf: m.subleaf,
            })?;
            e.flags = m.flags;
            for (r, b) in &m.registers {
                let reg = register(e, *r);
                *reg = b.apply(u64::from(*reg)) as u32;
            }
        }
        Ok(())
    }

    /// The MSRs the template changes, as entries to read from the vCPU before
    /// [`Self::apply_msrs`] changes them.
    pub fn msr_entries(&self) -> Vec<kvm_msr_entry> {
        self.msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.addr,
                ..Default::default()
            })
            .collect()
    }

    /// Applies the MSR modifiers to `entries` (values read from the vCPU).
    pub fn apply_msrs(&self, entries: &mut [kvm_msr_entry]) {
        for m in &self.msrs {
            for e in entries.iter_mut().filter(|e| e.index == m.addr) {
                e.data = m.bitmap.apply(e.data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits32(s: &str) -> String {
        format!("0b{s}")
    }

    #[test]
    fn bitmaps_set_clear_and_keep_bits() {
        // Bit 31 set, bit 0 cleared, bit 1 set, the rest kept.
        let s = bits32(&format!("1{}10", "x".repeat(29)));
        let b = Bitmap::parse(&s, 32).unwrap();
        assert_eq!(b.mask, 0x8000_0003);
        assert_eq!(b.value, 0x8000_0002);
        assert_eq!(b.apply(0x0000_0001), 0x8000_0002);
        assert_eq!(b.apply(0x7fff_fffd), 0xffff_fffe);
        // All x: nothing changes; all 0: everything cleared.
        let keep = Bitmap::parse(&bits32(&"x".repeat(32)), 32).unwrap();
        assert_eq!(keep.apply(0x1234_5678), 0x1234_5678);
        let zero = Bitmap::parse(&bits32(&"0".repeat(32)), 32).unwrap();
        assert_eq!(zero.apply(0xffff_ffff), 0);
        // Underscores separate groups; 64-bit MSR bitmaps.
        let s = format!("0b{}_{}", "x".repeat(32), "1".repeat(32));
        let b = Bitmap::parse(&s, 64).unwrap();
        assert_eq!(b.apply(0xdead_beef_0000_0000), 0xdead_beef_ffff_ffff);
    }

    #[test]
    fn malformed_bitmaps_are_refused_with_the_reason() {
        let e = Bitmap::parse(&"0".repeat(32), 32).unwrap_err();
        assert!(e.to_string().contains("0b"), "{e}");
        let e = Bitmap::parse(&bits32(&"0".repeat(31)), 32).unwrap_err();
        assert!(e.to_string().contains("31 bits, 32"), "{e}");
        let e = Bitmap::parse(&bits32(&"0".repeat(40)), 32).unwrap_err();
        assert!(e.to_string().contains("40 bits, 32 are needed"), "{e}");
        let e = Bitmap::parse(&bits32(&format!("2{}", "0".repeat(31))), 32).unwrap_err();
        assert!(e.to_string().contains("'2'"), "{e}");
        assert!(Bitmap::parse(&bits32(&"0".repeat(32)), 64).is_err());
    }

    #[test]
    fn numbers_parse_in_three_bases() {
        assert_eq!(parse_u32("0x8000_0001"), Ok(0x8000_0001));
        assert_eq!(parse_u32("0b101"), Ok(5));
        assert_eq!(parse_u32("7"), Ok(7));
        assert!(parse_u32("0x1_0000_0000").is_err());
        assert!(parse_u32("leaf").is_err());
    }

    fn entry(function: u32, index: u32, flags: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax,
            ebx: 0x11,
            ecx: 0x22,
            edx: 0x33,
            ..Default::default()
        }
    }

    fn table() -> CpuId {
        CpuId::from_entries(&[
            entry(0x1, 0, 0, 0x000a_0655),
            entry(0x7, 0, 1, 0x2),
            entry(0x7, 1, 1, 0x0),
        ])
        .unwrap()
    }

    #[test]
    fn cpuid_modifiers_change_the_entries_handed_to_kvm() {
        let set_bit0 = Bitmap::parse(&bits32(&format!("{}1", "x".repeat(31))), 32).unwrap();
        let clear_all = Bitmap::parse(&bits32(&"0".repeat(32)), 32).unwrap();
        let t = CpuTemplate {
            cpuid: vec![
                CpuidModifier {
                    leaf: 0x1,
                    subleaf: 0,
                    flags: 0,
                    registers: vec![(Register::Ecx, set_bit0), (Register::Edx, clear_all)],
                },
                CpuidModifier {
                    leaf: 0x7,
                    subleaf: 1,
                    flags: 1,
                    registers: vec![(Register::Eax, set_bit0)],
                },
            ],
            msrs: vec![],
        };
        let mut cpuid = table();
        t.check(&cpuid, &[]).unwrap();
        t.apply_cpuid(&mut cpuid).unwrap();
        let e = cpuid.as_slice();
        assert_eq!((e[0].eax, e[0].ecx, e[0].edx), (0x000a_0655, 0x23, 0));
        assert_eq!(e[1].eax, 0x2, "subleaf 0 untouched");
        assert_eq!(e[2].eax, 0x1, "subleaf 1 changed");
    }

    #[test]
    fn absent_leaves_and_msrs_are_refused() {
        let keep = Bitmap::parse(&bits32(&"x".repeat(32)), 32).unwrap();
        let t = CpuTemplate {
            cpuid: vec![CpuidModifier {
                leaf: 0x7,
                subleaf: 2,
                flags: 1,
                registers: vec![(Register::Eax, keep)],
            }],
            msrs: vec![],
        };
        let e = t.check(&table(), &[]).unwrap_err();
        assert!(e.to_string().contains("leaf 0x7 subleaf 0x2"), "{e}");
        assert!(t.apply_cpuid(&mut table()).is_err());
        let b = Bitmap::parse(&format!("0b{}", "x".repeat(64)), 64).unwrap();
        let t = CpuTemplate {
            cpuid: vec![],
            msrs: vec![MsrModifier {
                addr: 0x1234,
                bitmap: b,
            }],
        };
        assert!(t
            .check(&table(), &[0x10])
            .unwrap_err()
            .to_string()
            .contains("MSR 0x1234"));
        assert!(t.check(&table(), &[0x1234]).is_ok());
    }

    #[test]
    fn msr_modifiers_apply_to_the_values_read() {
        let b = Bitmap::parse(&format!("0b{}1", "x".repeat(63)), 64).unwrap();
        let t = CpuTemplate {
            cpuid: vec![],
            msrs: vec![MsrModifier {
                addr: 0x1a0,
                bitmap: b,
            }],
        };
        let mut entries = t.msr_entries();
        assert_eq!(entries.len(), 1);
        entries[0].data = 0x800;
        t.apply_msrs(&mut entries);
        assert_eq!(entries[0].data, 0x801);
    }
}
