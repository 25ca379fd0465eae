//! Firecracker compatibility, the adapter between the HTTP API (`vessel-api`) and the VMM core
//! (`vessel-vmm`), which speaks no HTTP:
//!
//! - [`backend`]: [`backend::ApiBackend`], the `VmmBackend` the API server calls, on top of
//!   the core's `Vm` and `VmHandle`;
//! - [`config`]: Firecracker's pre-boot `VmResources` (or `--config-file`) to the core's
//!   `VmConfig`;
//! - [`cpu_config`]: Firecracker custom CPU templates to `vessel_kvm` templates;
//! - `balloon`: the running balloon's state, statistics poller and figures;
//! - [`cidata`]: the `PUT /vessel/cloud-init` seed disk;
//! - [`signals`]: Firecracker's SIGXFSZ handler (log, exit 151);
//! - `taps`: TAPs checked when configured, refused in Firecracker's words.
//! - `devmetrics`: per-device counters in Firecracker's metrics groups (`block`, `pmem`);
//! - `memhp`: hotpluggable memory (`/hotplug/memory`) in the API's terms.
//!
//! Firecracker's devices are all virtio-mmio, so API-configured devices use the MMIO
//! transport unless `--enable-pci`.

pub mod backend;
mod balloon;
pub mod cidata;
pub mod config;
pub mod cpu_config;
mod devmetrics;
mod memhp;
mod pmem;
pub mod signals;
mod taps;

pub use backend::ApiBackend;
