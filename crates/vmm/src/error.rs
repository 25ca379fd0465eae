//! The VMM's errors: one line each, naming what went wrong and, where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] vessel_kvm::KvmError),
    #[error(transparent)]
    Memory(#[from] vessel_memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] vessel_boot::BootError),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} vCPUs requested: at least 1 is needed")]
    NoCpus(u32),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyCpus { requested: u32, max: usize },
    #[error("{requested} MiB of guest memory requested but this host has only {host} MiB")]
    MemoryExceedsHost { requested: u64, host: u64 },
    #[error("KVM call {call} failed: {source}")]
    KvmCall {
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("device setup failed: {0}")]
    Device(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("vCPU {cpu}: {reason}")]
    Vcpu { cpu: u8, reason: String },
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
