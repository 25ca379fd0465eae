//! Vessel's KVM layer: opening `/dev/kvm` and checking its capabilities, the per-vCPU CPUID
//! and boot MSR policy, and what a nested host needs: detecting one
//! ([`nested::probe_nested_host`]), the guest kernel parameters that keep the guest off
//! instructions its emulator lacks ([`nested::nested_kernel_params`]), reading emulation
//! failures out of `kvm_run` ([`exit`]) and completing those instructions in user space
//! ([`emulate`]), with a readable account of the vCPU for error reports ([`diagnose`]); and
//! Firecracker's custom CPU templates ([`template`]); the x86 register bits ([`regs`]).

pub mod cpuid;
pub mod diagnose;
pub mod emulate;
pub mod error;
pub mod exit;
pub mod msrs;
pub mod nested;
pub mod regs;
mod scratch_vm;
pub mod snapshot;
pub mod state;
pub mod system;
pub mod template;

pub use error::KvmError;
pub use state::CpuState;
