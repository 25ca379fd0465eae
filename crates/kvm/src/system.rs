//! Opening `/dev/kvm` and checking that the kernel offers what Vessel relies on.

use std::ffi::CStr;

use kvm_ioctls::{Cap, Kvm};

use crate::error::KvmError;

/// The only stable KVM API version.
const KVM_API_VERSION: i32 = 12;

/// The capabilities Vessel cannot run without, with the names the errors use.
const REQUIRED: &[(Cap, &str)] = &[
    // Guest RAM is user memory mapped into slots.
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    // The in-kernel local APICs, IOAPIC and PICs.
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    // The in-kernel i8254 PIT.
    (Cap::Pit2, "KVM_CAP_PIT2"),
    // Saving and restoring the PIT (snapshots).
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    // Real-mode support on Intel hosts without unrestricted guest.
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    // KVM_SET_CPUID2, the per-vCPU CPUID table.
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    // Device interrupts and doorbells as eventfds.
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    // Kicking a vCPU out of KVM_RUN without a signal race.
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    // Injecting exceptions the VMM completes (#BP, #UD, #PF) and saving pending events.
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    // Starting application processors and saving their run state.
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    // The guest's TSC-deadline timer, which Linux prefers over the APIC one-shot.
    (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
    // The kvmclock paravirtual clock (snapshot/restore of its reference).
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    // Where an emulation failure came from (instruction bytes, exit info).
    (Cap::InternalErrorData, "KVM_CAP_INTERNAL_ERROR_DATA"),
];

/// Opens `/dev/kvm` and checks it speaks API version 12.
pub fn open() -> Result<Kvm, KvmError> {
    open_path(c"/dev/kvm")
}

fn open_path(path: &CStr) -> Result<Kvm, KvmError> {
    let kvm = Kvm::new_with_path(path).map_err(open_error)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version));
    }
    Ok(kvm)
}

/// Tells a missing device and a permission problem apart from other open failures.
fn open_error(e: kvm_ioctls::Error) -> KvmError {
    match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::DeviceMissing,
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
        _ => KvmError::Open(e),
    }
}

/// Checks every capability Vessel relies on; the error names the first one missing.
pub fn check_capabilities(kvm: &Kvm) -> Result<(), KvmError> {
    first_missing(|cap| kvm.check_extension(cap))
        .map_or(Ok(()), |name| Err(KvmError::MissingCapability(name)))
}

fn first_missing(mut has: impl FnMut(Cap) -> bool) -> Option<&'static str> {
    REQUIRED
        .iter()
        .find(|(cap, _)| !has(*cap))
        .map(|(_, name)| *name)
}

/// The most vCPUs one VM may have: `KVM_CAP_MAX_VCPUS`, else the recommended `KVM_CAP_NR_VCPUS`.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_has_its_own_message() {
        let err = open_path(c"/dev/vessel-no-such-kvm").unwrap_err();
        assert!(matches!(err, KvmError::DeviceMissing), "{err:?}");
        assert_eq!(
            err.to_string(),
            "/dev/kvm does not exist: is the kvm module loaded and virtualization enabled?"
        );
    }

    #[test]
    fn permission_denied_has_its_own_message() {
        let err = open_error(kvm_ioctls::Error::new(libc::EACCES));
        assert!(matches!(err, KvmError::PermissionDenied), "{err:?}");
        assert!(matches!(
            open_error(kvm_ioctls::Error::new(libc::EMFILE)),
            KvmError::Open(_)
        ));
        assert_eq!(
            KvmError::PermissionDenied.to_string(),
            "no permission to open /dev/kvm: add your user to the kvm group or run as root"
        );
    }

    #[test]
    fn a_non_kvm_file_is_an_open_or_version_error() {
        // /dev/null opens but answers no KVM ioctl.
        match open_path(c"/dev/null") {
            Err(KvmError::ApiVersion(_)) | Err(KvmError::Open(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_first_missing_capability_is_named() {
        assert_eq!(first_missing(|_| true), None);
        assert_eq!(
            first_missing(|cap| cap != Cap::Irqfd),
            Some("KVM_CAP_IRQFD")
        );
        let err = KvmError::MissingCapability("KVM_CAP_IRQFD");
        assert_eq!(
            err.to_string(),
            "KVM lacks capability KVM_CAP_IRQFD, which Vessel needs"
        );
    }

    #[test]
    fn real_kvm_opens_and_has_everything() {
        let kvm = match open() {
            Ok(kvm) => kvm,
            Err(e @ (KvmError::DeviceMissing | KvmError::PermissionDenied)) => {
                eprintln!("skipping: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        check_capabilities(&kvm).unwrap();
        assert!(max_vcpus(&kvm) >= 1);
        assert!(max_vcpus(&kvm) >= kvm.get_nr_vcpus());
    }
}
