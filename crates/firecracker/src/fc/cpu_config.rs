//! `PUT /cpu-config` (a Firecracker custom CPU template) to a
//! [`vessel_kvm::template::CpuTemplate`]: the API's strings parsed, the parts Vessel does not
//! apply refused (aarch64's `reg_modifiers` and `vcpu_features`, `kvm_capabilities`), and the
//! template checked against this host's KVM, so that a bad template is a 400 when it is put
//! rather than a failed `InstanceStart`.

use vessel_api::types::{CpuConfig, CpuTemplate as ApiCpuTemplate, CpuidRegister};
use vessel_api::ApiError;
use vessel_kvm::template::{parse_u32, Bitmap, CpuTemplate, CpuidModifier, MsrModifier, Register};

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad(format!("CPU template error: {e}"))
}

/// The template `c` describes (x86_64), its syntax checked.
pub fn from_api(c: &CpuConfig) -> Result<CpuTemplate, ApiError> {
    if !c.reg_modifiers.is_empty() || !c.vcpu_features.is_empty() {
        return Err(bad(
            "reg_modifiers and vcpu_features are for aarch64; this host is x86_64",
        ));
    }
    if !c.kvm_capabilities.is_empty() {
        return Err(ApiError::Unsupported(
            "kvm_capabilities in CPU templates".into(),
        ));
    }
    let mut t = CpuTemplate::default();
    for m in &c.cpuid_modifiers {
        let leaf = parse_u32(&m.leaf).map_err(|e| bad(format!("leaf: {e}")))?;
        let subleaf = parse_u32(&m.subleaf).map_err(|e| bad(format!("subleaf: {e}")))?;
        let flags = u32::try_from(m.flags)
            .map_err(|_| bad(format!("leaf {leaf:#x}: flags {} is negative", m.flags)))?;
        let mut registers = Vec::with_capacity(m.modifiers.len());
        for r in &m.modifiers {
            let bitmap = Bitmap::parse(&r.bitmap, 32)
                .map_err(|e| bad(format!("leaf {leaf:#x} subleaf {subleaf:#x}: {e}")))?;
            let register = match r.register {
                CpuidRegister::Eax => Register::Eax,
                CpuidRegister::Ebx => Register::Ebx,
                CpuidRegister::Ecx => Register::Ecx,
                CpuidRegister::Edx => Register::Edx,
            };
            registers.push((register, bitmap));
        }
        t.cpuid.push(CpuidModifier {
            leaf,
            subleaf,
            flags,
            registers,
        });
    }
    for m in &c.msr_modifiers {
        let addr = parse_u32(&m.addr).map_err(|e| bad(format!("MSR addr: {e}")))?;
        let bitmap =
            Bitmap::parse(&m.bitmap, 64).map_err(|e| bad(format!("MSR {addr:#x}: {e}")))?;
        t.msrs.push(MsrModifier { addr, bitmap });
    }
    Ok(t)
}

/// Refuses modifiers of CPUID leaves or MSRs this host's KVM does not offer.
pub fn check_on_host(t: &CpuTemplate) -> Result<(), ApiError> {
    let internal = |e: String| ApiError::Internal(format!("CPU template check: {e}"));
    let kvm = vessel_kvm::system::open().map_err(|e| internal(e.to_string()))?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| internal(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let msrs = kvm
        .get_msr_index_list()
        .map_err(|e| internal(format!("KVM_GET_MSR_INDEX_LIST: {e}")))?;
    t.check(&supported, msrs.as_slice()).map_err(bad)
}

/// A host processor as Firecracker names the ones its static templates are made for: the
/// vendor string of CPUID leaf 0 and the signature (family, model, stepping) of leaf 1's EAX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    pub vendor: [u8; 12],
    /// CPUID.1:EAX without its reserved bits (stepping, model, family, extended model and
    /// family).
    pub signature: u32,
}

const INTEL: &[u8; 12] = b"GenuineIntel";
const AMD: &[u8; 12] = b"AuthenticAMD";
const SKYLAKE: u32 = 0x0005_0654;
const CASCADE_LAKE: u32 = 0x0005_0657;
const ICE_LAKE: u32 = 0x0006_06a6;
const MILAN: u32 = 0x00a0_0f11;

impl HostCpu {
    /// This host's processor.
    pub fn this_host() -> HostCpu {
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&l0.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&l0.ecx.to_le_bytes());
        HostCpu {
            vendor,
            signature: l1.eax & 0x0fff_3fff,
        }
    }
}

/// A static CPU template (`cpu_template` in `/machine-config`) at `InstanceStart`, as
/// Firecracker judges it: each is made for one vendor and a few processor models, and refused
/// elsewhere in Firecracker's words. Vessel does not carry Firecracker's masks for them: on a
/// processor they are made for, it says so (a custom template, `PUT /cpu-config`, can
/// describe the same CPUID and MSR changes).
pub fn check_static(t: ApiCpuTemplate, host: HostCpu) -> Result<(), ApiError> {
    let (vendor, models): (&[u8; 12], &[u32]) = match t {
        ApiCpuTemplate::None => return Ok(()),
        ApiCpuTemplate::C3 | ApiCpuTemplate::T2 => (INTEL, &[SKYLAKE, CASCADE_LAKE, ICE_LAKE]),
        ApiCpuTemplate::T2S => (INTEL, &[SKYLAKE, CASCADE_LAKE]),
        ApiCpuTemplate::T2CL => (INTEL, &[CASCADE_LAKE, ICE_LAKE]),
        ApiCpuTemplate::T2A => (AMD, &[MILAN]),
        ApiCpuTemplate::V1N1 => {
            return Err(bad("V1N1 is an aarch64 template; this host is x86_64"))
        }
    };
    let start = |why: &str| ApiError::bad(format!("Start microvm error: {why}"));
    if host.vendor != *vendor {
        return Err(start(
            "CPU vendor mismatched between actual CPU and CPU template.",
        ));
    }
    if !models.contains(&host.signature) {
        return Err(start(
            "The current CPU model is not permitted to apply the CPU template.",
        ));
    }
    Err(ApiError::Unsupported(format!(
        "the static CPU template {t:?} (describe it as a custom template with PUT /cpu-config)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> CpuConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn templates_parse_and_bad_ones_say_why() {
        let ones = format!("0b{}", "1".repeat(32));
        let t = from_api(&config(json!({
            "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": ones}]}],
            "msr_modifiers": [{"addr": "0x1a0", "bitmap": format!("0b{}", "x".repeat(64))}]
        })))
        .unwrap();
        assert_eq!(t.cpuid[0].leaf, 1);
        assert_eq!(t.cpuid[0].registers[0].1.mask, 0xffff_ffff);
        assert_eq!(t.msrs[0].addr, 0x1a0);

        let short = config(json!({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0",
            "flags": 0, "modifiers": [{"register": "eax", "bitmap": "0b101"}]}]}));
        let e = from_api(&short).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("3 bits, 32 are needed"), "{e}");
        let bad_leaf = config(json!({"cpuid_modifiers": [{"leaf": "one", "subleaf": "0",
            "flags": 0, "modifiers": []}]}));
        assert!(from_api(&bad_leaf)
            .unwrap_err()
            .to_string()
            .contains("leaf"));
        let msr = config(json!({"msr_modifiers": [{"addr": "0x10", "bitmap": ones}]}));
        assert!(from_api(&msr)
            .unwrap_err()
            .to_string()
            .contains("64 are needed"));
        let arm = config(json!({"reg_modifiers": [{"addr": "0x1", "bitmap": "0b1"}]}));
        assert!(from_api(&arm).unwrap_err().to_string().contains("aarch64"));
    }

    #[test]
    fn an_unknown_register_does_not_deserialize() {
        let r = serde_json::from_value::<CpuConfig>(json!({"cpuid_modifiers": [{"leaf": "0x1",
            "subleaf": "0x0", "flags": 0, "modifiers": [{"register": "esi", "bitmap": "0b1"}]}]}));
        assert!(r.unwrap_err().to_string().contains("esi"));
    }

    #[test]
    fn static_templates_are_judged_by_vendor_and_model() {
        let rome = HostCpu {
            vendor: *AMD,
            signature: 0x0083_0f10,
        };
        let cascade = HostCpu {
            vendor: *INTEL,
            signature: CASCADE_LAKE,
        };
        assert!(check_static(ApiCpuTemplate::None, rome).is_ok());
        let e = check_static(ApiCpuTemplate::C3, rome).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Start microvm error: CPU vendor mismatched between actual CPU and CPU template."
        );
        let e = check_static(ApiCpuTemplate::T2A, rome).unwrap_err();
        assert!(e.to_string().contains("CPU model is not permitted"), "{e}");
        let e = check_static(
            ApiCpuTemplate::T2S,
            HostCpu {
                signature: ICE_LAKE,
                ..cascade
            },
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("CPU model is not permitted"));
        let e = check_static(ApiCpuTemplate::T2CL, cascade).unwrap_err();
        assert!(matches!(e, ApiError::Unsupported(_)), "{e}");
        assert!(check_static(ApiCpuTemplate::V1N1, cascade).is_err());
        let here = HostCpu::this_host();
        assert!(
            here.vendor == *INTEL || here.vendor == *AMD,
            "{:?}",
            here.vendor
        );
    }

    /// On a host with /dev/kvm: leaf 0x1 is there, leaf 0x4fff_ffff is not.
    #[test]
    fn the_host_check_knows_kvm_s_leaves() {
        if vessel_kvm::system::open().is_err() {
            eprintln!("/dev/kvm not openable: skipping");
            return;
        }
        let keep = Bitmap::parse(&format!("0b{}", "x".repeat(32)), 32).unwrap();
        let mut t = CpuTemplate {
            cpuid: vec![CpuidModifier {
                leaf: 1,
                subleaf: 0,
                flags: 0,
                registers: vec![(Register::Eax, keep)],
            }],
            msrs: vec![],
        };
        check_on_host(&t).unwrap();
        t.cpuid[0].leaf = 0x4fff_ffff;
        let e = check_on_host(&t).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("0x4fffffff"), "{e}");
    }
}
