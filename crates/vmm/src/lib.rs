//! The VMM core: a VM built from a [`VmConfig`], one thread per vCPU running the exit loop, the
//! legacy device manager, and the nested-host fallback that completes in user space what the
//! host's KVM cannot run.
//!
//! It owns no policy about *where* things are (that is `vessel-memory`), *how Linux boots*
//! (`vessel-boot`), *what a device does* (`vessel-devices`) or *what KVM can do*
//! (`vessel-kvm`): it puts them together and runs them.

pub mod config;
pub mod cpu;
pub mod demo;
pub mod device_config;
mod devices;
pub mod error;
mod guest_access;
pub mod kvm_vm;
pub mod migration;
mod msi;
pub mod nested;
pub mod profile;
pub mod snapshot;
mod terminal;
mod vcpu;
mod virtio;
pub mod virtio_devices;
pub mod vm;
pub mod vmgenid;

pub use config::{BootSource, NestedMode, SerialTarget, VmConfig, DEFAULT_CMDLINE};
pub use error::VmmError;
pub use vm::{
    run, ControlError, ExitReason, LiveStats, RunState, RunningVm, Vm, VmHandle, VmOutcome, VmStats,
};
