//! The crate's error type for everything that talks to `/dev/kvm`.

use thiserror::Error;

/// What can go wrong while opening, checking or probing KVM.
#[derive(Debug, Error)]
pub enum KvmError {
    /// `/dev/kvm` is absent.
    #[error("/dev/kvm does not exist: is the kvm module loaded and virtualization enabled?")]
    DeviceMissing,
    /// `/dev/kvm` exists but this process may not open it.
    #[error("no permission to open /dev/kvm: add your user to the kvm group or run as root")]
    PermissionDenied,
    /// `/dev/kvm` could not be opened for another reason.
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel speaks a KVM API other than the stable version 12.
    #[error("KVM API version is {0}, Vessel needs version 12")]
    ApiVersion(i32),
    /// A capability Vessel relies on is not offered by this kernel.
    #[error("KVM lacks capability {0}, which Vessel needs")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl, by its KVM name.
        op: &'static str,
        /// The errno it returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A CPUID or MSR table would not fit KVM's fixed-size array.
    #[error("{what} has {len} entries, more than the {max} KVM accepts")]
    TooManyEntries {
        /// Which table.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Mapping memory for a throwaway probe guest failed.
    #[error("cannot map probe guest memory")]
    Mmap(#[source] std::io::Error),
    /// The probe guest did something other than what it was written to do.
    #[error("probe guest stopped unexpectedly: {0}")]
    Probe(String),
}

impl KvmError {
    /// Wraps an ioctl errno with the name of the ioctl that returned it.
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |source| KvmError::Ioctl { op, source }
    }
}
