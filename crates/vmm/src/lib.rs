//! The VMM core: a [`Machine`] built from a [`VmConfig`] (or a snapshot), one thread per vCPU
//! running the exit loop, the legacy and virtio device managers, snapshots and live
//! migration, and the nested-host fallback that completes in user space what the host's KVM
//! cannot run. It speaks no HTTP: management APIs drive it through [`Vm`] and [`VmHandle`].
//!
//! Read it top-down:
//! - [`config`]: what a VM is made of; [`payload`]: what a new VM boots (or [`firmware`],
//!   which boots it);
//! - [`builder`]: [`builder::build_for_boot`] and [`builder::build_from_snapshot`] make a
//!   [`Vm`] (a [`Machine`] and its vCPUs) over shared steps;
//! - [`running`]: [`Vm::start`] and the supervisor; [`control`]: [`VmHandle`] (pause, resume,
//!   stop, snapshot, migrate); [`vcpu`]: the exit loop;
//! - [`snapshot`] (the state file and taking one), [`restore`] (building a VM back from
//!   one) and [`migration`] (send and receive).
//!
//! It owns no policy about *where* things are (that is `vessel-memory`), *how Linux boots*
//! (`vessel-boot`), *what a device does* (`vessel-devices`, `vessel-virtio-devices`) or
//! *what KVM can do* (`vessel-kvm`): it puts them together and runs them.

pub mod builder;
pub mod config;
pub mod control;
pub mod cpu;
pub mod demo;
pub mod device_config;
pub mod device_factory;
mod device_manager;
pub mod error;
pub mod firmware;
mod guest_access;
pub mod hotplug;
pub mod kvm_vm;
mod legacy;
pub mod machine;
pub mod migration;
mod msi;
pub mod nested;
pub mod outcome;
pub mod payload;
mod pci_host;
mod pci_hotplug;
pub mod pmem;
pub mod profile;
pub mod restore;
pub mod running;
mod serial_out;
pub mod snapshot;
mod terminal;
mod vcpu;
pub mod vmgenid;

pub use builder::Vm;
pub use config::{NestedMode, Payload, SerialTarget, VmConfig, DEFAULT_CMDLINE};
pub use control::{ControlError, LiveStats, RunState, VmHandle};
pub use device_factory::DeviceHandles;
pub use device_manager::hotplug::{HotplugError, Pluggable, Plugged, PluggedRef};
pub use error::{ErrorChain, VmmError};
pub use machine::Machine;
pub use outcome::{monotonic_ns, ExitReason, VmOutcome, VmStats};
pub use running::{run, spawn_helper, RunningVm};
