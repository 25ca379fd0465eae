//! The request and response bodies of the API, as serde types.
//!
//! Each type mirrors a definition of `openapi.json` (its [`Schema::NAME`]); the route table
//! records that name so a test can check the table, the types and the document agree. Request
//! types reject unknown fields, as Firecracker does. Optional fields are left out of responses
//! when unset (the document has no `null`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

mod balloon;

pub use balloon::*;

/// Ties a Rust type to the definition that documents it in `openapi.json`.
pub trait Schema {
    /// The key under `definitions` in `openapi.json`.
    const NAME: &'static str;
}

macro_rules! schema {
    ($($ty:ty => $name:literal),* $(,)?) => {
        $(impl Schema for $ty { const NAME: &'static str = $name; })*
    };
}

schema! {
    BootSource => "BootSource",
    MachineConfig => "MachineConfiguration",
    MachineConfigUpdate => "MachineConfigurationUpdate",
    Drive => "Drive",
    PartialDrive => "PartialDrive",
    NetworkInterface => "NetworkInterface",
    PartialNetworkInterface => "PartialNetworkInterface",
    Vsock => "Vsock",
    EntropyDevice => "EntropyDevice",
    SerialDevice => "SerialDevice",
    Balloon => "Balloon",
    BalloonUpdate => "BalloonUpdate",
    BalloonStatsUpdate => "BalloonStatsUpdate",
    BalloonStats => "BalloonStats",
    BalloonStartCmd => "BalloonStartCmd",
    BalloonHintingStatus => "BalloonHintingStatus",
    InstanceActionInfo => "InstanceActionInfo",
    Vm => "Vm",
    SnapshotCreateParams => "SnapshotCreateParams",
    SnapshotLoadParams => "SnapshotLoadParams",
    Logger => "Logger",
    MetricsConfig => "Metrics",
    MmdsConfig => "MmdsConfig",
    CpuConfig => "CpuConfig",
    InstanceInfo => "InstanceInfo",
    VersionInfo => "FirecrackerVersion",
    ErrorBody => "Error",
    crate::resources::FullVmConfig => "FullVmConfiguration",
    crate::fcconfig::ExportedVmConfig => "FullVmConfiguration",
    serde_json::Value => "MmdsContentsObject",
    MigrateParams => "MigrateParams",
    CloudInitSeed => "CloudInitSeed",
    MemoryHotplugConfig => "MemoryHotplugConfig",
    MemoryHotplugSizeUpdate => "MemoryHotplugSizeUpdate",
    MemoryHotplugStatus => "MemoryHotplugStatus",
}

pub use crate::fs::FsDevice;
pub use crate::hotplug::PluggedDevice;
pub use crate::memory_hotplug::{
    MemoryHotplugConfig, MemoryHotplugSizeUpdate, MemoryHotplugStatus,
};
pub use crate::pmem::{PartialPmem, Pmem};

fn is_false(b: &bool) -> bool {
    !*b
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image (ELF vmlinux, or bzImage as a Vessel extension).
    pub kernel_image_path: String,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Static CPU templates (deprecated in Firecracker). Vessel stores the choice and lets the
/// backend refuse it at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// `madvise(MADV_HUGEPAGE)`.
    Transparent,
    /// hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Huge2M,
}

/// Default vCPU count before any `PUT /machine-config`.
pub const DEFAULT_VCPU_COUNT: u8 = 1;
/// Default memory size before any `PUT /machine-config`.
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;
/// Most vCPUs a VM may have (as Firecracker).
pub const MAX_VCPUS: u8 = 32;

/// `GET|PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1..=32 (1 or even with SMT).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: bool,
    /// Static CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking (for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge page backing.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: DEFAULT_VCPU_COUNT,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// `PATCH /machine-config`: every field optional, at least one present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct MachineConfigUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// True when no field is set (Firecracker answers 400 to such a PATCH).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `base` with the fields present in this update replaced.
    pub fn apply(&self, base: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            cpu_template: match self.cpu_template {
                Some(t) => Some(t),
                None => base.cpu_template,
            },
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            huge_pages: self.huge_pages.unwrap_or(base.huge_pages),
        }
    }
}

/// A token bucket of a rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Bucket size (bytes or ops).
    pub size: u64,
    /// Initial extra budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket.
    pub refill_time: u64,
}

/// An I/O rate limiter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// `old` after a `PATCH` with `patch`: a bucket given replaces the current one (size or
    /// refill time 0 removes it), one left out stays; with no bucket left, no limiter.
    pub fn patched(old: Option<RateLimiter>, patch: Option<RateLimiter>) -> Option<RateLimiter> {
        let Some(new) = patch else {
            return old;
        };
        let old = old.unwrap_or_default();
        let bucket = |o: Option<TokenBucket>, n: Option<TokenBucket>| match n {
            None => o,
            Some(b) if b.size == 0 || b.refill_time == 0 => None,
            Some(b) => Some(b),
        };
        let r = RateLimiter {
            bandwidth: bucket(old.bandwidth, new.bandwidth),
            ops: bucket(old.ops, new.ops),
        };
        (r.bandwidth.is_some() || r.ops.is_some()).then_some(r)
    }
}

/// Block device cache mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests are ignored.
    #[default]
    Unsafe,
    /// Flush requests are honoured.
    Writeback,
}

/// Block device I/O engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Unique id, equal to the path's `{drive_id}`.
    pub drive_id: String,
    /// Partition UUID of the root partition (root device only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// This drive is the root device.
    pub is_root_device: bool,
    /// Cache mode.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Read-only (required for virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Backing file (required for virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// vhost-user-block socket: the drive is served by the backend listening there (and
    /// has no `path_on_host`, `is_read_only` or `rate_limiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}` (post-boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Id of an existing drive.
    pub drive_id: String,
    /// New backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// New rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl PartialDrive {
    /// `d` after this update: the new file, the limiter patched.
    pub fn apply_to(&self, d: &mut Drive) {
        if let Some(p) = &self.path_on_host {
            d.path_on_host = Some(p.clone());
        }
        d.rate_limiter = RateLimiter::patched(d.rate_limiter, self.rate_limiter);
    }
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Unique id, equal to the path's `{iface_id}`.
    pub iface_id: String,
    /// Host TAP device name.
    pub host_dev_name: String,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest (68..=65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}` (post-boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl PartialNetworkInterface {
    /// `n` after this update: the limiters patched.
    pub fn apply_to(&self, n: &mut NetworkInterface) {
        n.rx_rate_limiter = RateLimiter::patched(n.rx_rate_limiter, self.rx_rate_limiter);
        n.tx_rate_limiter = RateLimiter::patched(n.tx_rate_limiter, self.tx_rate_limiter);
    }
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest CID, at least 3.
    pub guest_cid: u32,
    /// Host Unix socket proxying the device.
    pub uds_path: String,
    /// Deprecated id, accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /serial`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// File or named pipe the guest's serial output is written to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Bytes of output per refill period; the excess is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// Requested run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Requested state.
    pub state: VmState,
}

/// Snapshot kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Pages dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where to write guest memory.
    pub mem_file_path: String,
    /// Where to write the VM state.
    pub snapshot_path: String,
    /// Full (default) or Diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Backend of restored guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file.
    File,
    /// A userfaultfd handler listening on a Unix socket.
    Uffd,
}

/// `SnapshotLoadParams.mem_backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// File path or socket path.
    pub backend_path: String,
}

/// `SnapshotLoadParams.network_overrides[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `SnapshotLoadParams.vsock_override`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The restored device's host socket.
    pub uds_path: String,
    /// Vessel extension: the restored guest's new CID (a clone's own address); the driver
    /// reads it again on the transport reset that follows every restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cid: Option<u32>,
}

/// Huge page choice on restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum RestoreHugePages {
    Snapshot,
    None,
    Transparent,
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_diff_snapshots: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub clock_realtime: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<RestoreHugePages>,
}

/// Log levels of `PUT /logger`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum LogLevel {
    #[serde(alias = "error", alias = "ERROR")]
    Error,
    #[serde(alias = "warning", alias = "WARNING", alias = "Warn", alias = "warn")]
    Warning,
    #[serde(alias = "info", alias = "INFO")]
    Info,
    #[serde(alias = "debug", alias = "DEBUG")]
    Debug,
    #[serde(alias = "trace", alias = "TRACE")]
    Trace,
    #[serde(alias = "off", alias = "OFF")]
    Off,
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or FIFO the JSON lines are appended to.
    pub metrics_path: String,
    /// Emit the instance id as a top-level `id` field.
    #[serde(default, skip_serializing_if = "is_false")]
    pub emit_id: bool,
    /// Operator key-value pairs emitted under `properties`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// MMDS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain GETs.
    #[default]
    V1,
    /// Session tokens.
    V2,
}

/// Default MMDS address.
pub const DEFAULT_MMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// `PUT /mmds/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 (default) or V2.
    #[serde(default)]
    pub version: MmdsVersion,
    /// Interfaces on which the guest reaches MMDS (at least one, all configured).
    pub network_interfaces: Vec<String>,
    /// MMDS address, link-local (default 169.254.169.254).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer text/plain regardless of Accept, like EC2 IMDS.
    #[serde(default, skip_serializing_if = "is_false")]
    pub imds_compat: bool,
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// `CpuConfig.cpuid_modifiers[].modifiers[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct CpuidRegisterModifier {
    pub register: CpuidRegister,
    pub bitmap: String,
}

/// `CpuConfig.cpuid_modifiers[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct CpuidLeafModifier {
    pub leaf: String,
    pub subleaf: String,
    pub flags: i32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// `CpuConfig.msr_modifiers[]` and `reg_modifiers[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RegisterModifier {
    pub addr: String,
    pub bitmap: String,
}

/// `CpuConfig.vcpu_features[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct VcpuFeatures {
    pub index: i32,
    pub bitmap: String,
}

/// `PUT /cpu-config`: a custom CPU template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct CpuConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<RegisterModifier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<RegisterModifier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<VcpuFeatures>,
}

/// The instance state of `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Not booted yet.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The `--id` of the instance.
    pub id: String,
    /// Run state.
    pub state: InstanceState,
    /// The Firecracker API version served ([`crate::controller::FIRECRACKER_API_VERSION`]).
    pub vmm_version: String,
    /// Always "Firecracker", so that Firecracker clients accept the answer.
    pub app_name: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The Firecracker API version served ([`crate::controller::FIRECRACKER_API_VERSION`]).
    pub firecracker_version: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub fault_message: String,
}

/// `PUT /vessel/migrate` (extension): live-migrate the running VM to a receiver
/// (`vessel migrate receive --listen ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParams {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub destination: String,
    /// The longest pause the guest should see, in milliseconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Pre-copy rounds at most (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
}

/// `PUT /vessel/cloud-init` (extension): a cloud-init NoCloud seed disk (`cidata`) that the
/// VM gets as its last, read-only drive. The strings are the files' contents. The user-data
/// is required: the CLI's default (a fresh password, the host user's SSH keys) is not offered
/// here, as a `204` has nowhere to report the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitSeed {
    /// The `user-data` file; it must start with a header cloud-init recognises
    /// (`#cloud-config`, `#!`, ...).
    pub user_data: String,
    /// The `meta-data` file; default: a random instance id and the hostname `vessel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<String>,
    /// The `network-config` file (cloud-init's network configuration, version 1 or 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}
