//! The VMM's errors: one line each, naming what went wrong and, where it helps, what to do.
//! Each variant keeps what caused it as its `source`; the message never repeats it. Print an
//! error for a user with [`ErrorChain`], which appends every source (`a: b: c`).

use std::path::PathBuf;

use crate::migration::MigrationError;
use crate::restore::RestoreError;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] vessel_kvm::KvmError),
    #[error(transparent)]
    Memory(#[from] vessel_memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] vessel_boot::BootError),
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error("fw_cfg: cannot add {what}")]
    FwCfg {
        what: String,
        #[source]
        source: vessel_devices::fw_cfg::FwCfgError,
    },
    #[error("cannot build the ACPI table-loader script")]
    TableLoader(#[source] vessel_devices::fw_cfg::loader::LoaderError),
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} vCPUs requested: at least 1 is needed")]
    NoCpus(u32),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyCpus { requested: u32, max: usize },
    #[error("{requested} MiB of guest memory requested but this host has only {host} MiB")]
    MemoryExceedsHost { requested: u64, host: u64 },
    #[error("KVM call {call} failed")]
    KvmCall {
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create an eventfd for {what}")]
    EventFd {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot place {what} on its bus")]
    Bus {
        what: String,
        #[source]
        source: vessel_devices::BusError,
    },
    #[error("guest memory at {addr:#x}: cannot {what}")]
    GuestMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vessel_memory::vm_memory::GuestMemoryError,
    },
    #[error("snapshot: VM generation ID at {addr:#x} with interrupt {irq}: not an 8-byte aligned address and an IO-APIC pin")]
    BadVmGenId { addr: u64, irq: u32 },
    #[error("out of MSI routes")]
    OutOfMsiRoutes,
    #[error("cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("cannot build the MSI routing table")]
    RoutingTable(#[source] vmm_sys_util::fam::Error),
    #[error("cannot install the VMM's seccomp filter")]
    Seccomp(#[source] vessel_seccomp::Error),
    #[error("cannot install the handler of signal {signal}")]
    SignalHandler {
        signal: i32,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("device setup failed")]
    Device(#[from] crate::device_manager::DeviceError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("vCPU {cpu}")]
    Vcpu {
        cpu: u8,
        #[source]
        source: VcpuError,
    },
    #[error("snapshot")]
    Restore(#[from] RestoreError),
    #[error("migration")]
    Migration(#[from] MigrationError),
    #[error("the VM was already waited for")]
    AlreadyWaited,
}

/// Why a vCPU thread ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    #[error("unexpected debug exit at {0:#x}")]
    UnexpectedDebug(u64),
    #[error("unexpected exit reason {0}")]
    UnexpectedExit(u32),
    #[error("the guest crashed (KVM system event)")]
    GuestCrashed,
    #[error("unexpected KVM system event {0}")]
    UnexpectedSystemEvent(u32),
    #[error("the guest halted with no way to wake up")]
    Halted,
    #[error(
        "KVM could not enter the guest (hardware entry failure {reason:#x} on host CPU {cpu})"
    )]
    FailEntry { reason: u64, cpu: u32 },
    #[error("unexpected exit {0}")]
    Unhandled(String),
    #[error("KVM accepted only {set} of {total} boot MSRs (the first refused is {first:#x})")]
    BootMsrs {
        set: usize,
        total: usize,
        first: u32,
    },
    #[error("CPU template")]
    Template(#[source] vessel_kvm::template::TemplateError),
    #[error("CPU template: KVM cannot read MSR {0:#x}")]
    TemplateMsrUnreadable(u32),
    #[error("CPU template: KVM refused the value {value:#x} for MSR {msr:#x}")]
    TemplateMsrRefused { value: u64, msr: u32 },
    #[error("{what}\n{diagnosis}")]
    Diagnosed { what: String, diagnosis: String },
    #[error("the vCPU thread panicked")]
    Panicked,
    #[error("the snapshot has no state for this vCPU")]
    NoSavedState,
    #[error("no CPUID to restore it with")]
    NoCpuid,
    #[error("restoring its state")]
    Restore(#[source] vessel_kvm::KvmError),
    #[error("cannot install its seccomp filter")]
    Seccomp(#[source] vessel_seccomp::Error),
    #[error(transparent)]
    Setup(Box<VmmError>),
}

/// Attach the name of a KVM ioctl to its error.
pub(crate) trait KvmContext<T> {
    fn kvm(self, call: &'static str) -> Result<T, VmmError>;
}

impl<T> KvmContext<T> for Result<T, kvm_ioctls::Error> {
    fn kvm(self, call: &'static str) -> Result<T, VmmError> {
        self.map_err(|source| VmmError::KvmCall { call, source })
    }
}

/// An error and all its sources on one line, `a: b: c`: what a user reads.
pub use vessel_virtio::ErrorChain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_every_source_once() {
        let e = VmmError::Open {
            path: "/nope".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(e.to_string(), "cannot open /nope");
        let text = ErrorChain(&e).to_string();
        assert!(
            text.starts_with("cannot open /nope: No such file or directory"),
            "{text}"
        );
        let e = VmmError::Vcpu {
            cpu: 1,
            source: VcpuError::Halted,
        };
        assert_eq!(
            ErrorChain(&e).to_string(),
            "vCPU 1: the guest halted with no way to wake up"
        );
    }
}
