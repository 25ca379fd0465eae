//! The pre-boot configuration of a VM (`VmResources`), its validation, and the Firecracker
//! `--config-file` format, which is also the body of `GET /vm/config`.
//!
//! Every setter validates its input against the rest of the configuration and changes nothing
//! when it fails, so a rejected API call leaves the resources as they were. The config file
//! goes through the same setters in the same order as a Firecracker client would call them.

use std::fs::File;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::types::*;

/// Default limit of the MMDS data store, in bytes of serialized JSON (as Firecracker).
pub const DEFAULT_MMDS_LIMIT: usize = 51200;

/// The MMDS data store, shared with the VMM's MMDS network stack once the VM runs.
#[derive(Debug, Clone)]
pub struct MmdsStore {
    inner: Arc<Mutex<Value>>,
    /// Whether a `PUT` (or `--metadata`) has created the store: until then `GET` reads `{}`
    /// and `PATCH` is refused, as Firecracker's.
    initialized: Arc<std::sync::atomic::AtomicBool>,
    limit: usize,
}

impl Default for MmdsStore {
    fn default() -> Self {
        Self::new(DEFAULT_MMDS_LIMIT)
    }
}

impl MmdsStore {
    /// An empty store (`{}`) holding at most `limit` bytes of JSON.
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Value::Object(Default::default()))),
            initialized: Arc::default(),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Value> {
        // A panic while holding the lock cannot leave the Value half-updated in a way that
        // matters more than losing the data, so recover the guard.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the most bytes of JSON the store holds (`--mmds-size-limit`).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// The store itself, for the VMM's MMDS network stack: what the API writes later is what
    /// the guest reads.
    pub fn shared(&self) -> Arc<Mutex<Value>> {
        self.inner.clone()
    }

    /// A copy of the whole store.
    pub fn get(&self) -> Value {
        self.lock().clone()
    }

    fn check(&self, v: &Value) -> Result<(), ApiError> {
        if !v.is_object() {
            return Err(ApiError::bad(
                "MMDS error: The MMDS data store contents must be a JSON object.",
            ));
        }
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > self.limit {
            return Err(ApiError::PayloadTooLarge(
                "MMDS error: The MMDS patch request doesn't fit.".to_string(),
            ));
        }
        Ok(())
    }

    /// Replaces the store.
    pub fn put(&self, v: Value) -> Result<(), ApiError> {
        self.check(&v)?;
        *self.lock() = v;
        self.initialized
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Applies a JSON merge patch (RFC 7396).
    pub fn patch(&self, patch: Value) -> Result<(), ApiError> {
        if !patch.is_object() {
            return Err(ApiError::bad(
                "MMDS error: The MMDS data store patch must be a JSON object.",
            ));
        }
        if !self.initialized.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::bad(
                "MMDS error: The MMDS data store is not initialized.",
            ));
        }
        let mut guard = self.lock();
        let mut next = guard.clone();
        merge_patch(&mut next, patch);
        self.check(&next)?;
        *guard = next;
        Ok(())
    }
}

/// RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        merge_patch(t.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other,
    }
}

/// `cpu-config` in a config file: inline, or the path of a JSON file holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CpuConfigSource {
    /// Path of a JSON file with a [`CpuConfig`].
    Path(String),
    /// The template itself.
    Inline(CpuConfig),
}

/// Firecracker's full VM configuration: the `--config-file` JSON and `GET /vm/config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct FullVmConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<CpuConfigSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    /// virtio-pmem devices (`PUT /pmem/{id}`).
    #[serde(default)]
    pub pmem: Vec<Pmem>,
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    /// Vessel extension: the `PUT /vessel/cloud-init` seed.
    #[serde(
        rename = "vessel-cloud-init",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cloud_init: Option<CloudInitSeed>,
    /// Vessel extension: virtio-fs devices (`PUT /vessel/fs/{id}`).
    #[serde(rename = "vessel-fs", default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsDevice>,
}

/// Everything configured before `InstanceStart`; the VMM builds the VM from it.
#[derive(Debug, Clone, Default)]
pub struct VmResources {
    /// Kernel, initrd, command line.
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory (defaults: 1 vCPU, 128 MiB).
    pub machine_config: MachineConfig,
    /// Custom CPU template.
    pub cpu_config: Option<CpuConfig>,
    /// Block devices; the root device, if any, first.
    pub drives: Vec<Drive>,
    /// Network devices, in the order they were added.
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock device.
    pub vsock: Option<Vsock>,
    /// The entropy device.
    pub entropy: Option<EntropyDevice>,
    /// The balloon device.
    pub balloon: Option<Balloon>,
    /// MMDS network configuration.
    pub mmds_config: Option<MmdsConfig>,
    /// MMDS contents (shared with the VMM's MMDS stack).
    pub mmds: MmdsStore,
    /// Logger configuration.
    pub logger: Option<Logger>,
    /// Metrics configuration.
    pub metrics: Option<MetricsConfig>,
    /// Vessel extension: a cloud-init seed disk, added after the drives at start (the VMM
    /// checks its user-data when it is set).
    pub cloud_init: Option<CloudInitSeed>,
    /// `PUT /serial` (not part of a config file or `GET /vm/config`, as Firecracker's).
    pub serial: Option<SerialDevice>,
    /// virtio-pmem devices, in the order they were added (`/dev/pmem0` first).
    pub pmem: Vec<Pmem>,
    /// Hotpluggable memory (virtio-mem).
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    /// Vessel extension: virtio-fs devices, in the order they were added.
    pub fs: Vec<FsDevice>,
}

fn check_file(what: &str, path: &str) -> Result<(), ApiError> {
    File::open(path)
        .map(|_| ())
        .map_err(|e| ApiError::bad(format!("{what} cannot be opened: {e} ({path})")))
}

/// What is wrong with `path` as a vhost-user backend's socket (`PATH is not a socket.`,
/// `PATH: <error>`), or `None` when it is one.
pub(crate) fn socket_problem(path: &str) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() => None,
        Ok(_) => Some(format!("{path} is not a socket.")),
        Err(e) => Some(format!("{path}: {e}")),
    }
}

pub(crate) fn check_rate_limiter(r: &Option<RateLimiter>) -> Result<(), ApiError> {
    if let Some(r) = r {
        for b in [r.bandwidth, r.ops].into_iter().flatten() {
            if b.size > 0 && b.refill_time == 0 {
                return Err(ApiError::bad(
                    "Cannot create RateLimiter: refill_time must be greater than 0 when size is not 0",
                ));
            }
        }
    }
    Ok(())
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

impl VmResources {
    /// True when nothing but the logger, metrics and MMDS contents has been configured
    /// (the state in which Firecracker accepts `PUT /snapshot/load`).
    pub fn is_pristine(&self) -> bool {
        self.boot_source.is_none()
            && self.machine_config == MachineConfig::default()
            && self.cpu_config.is_none()
            && self.drives.is_empty()
            && self.network_interfaces.is_empty()
            && self.vsock.is_none()
            && self.entropy.is_none()
            && self.balloon.is_none()
            && self.mmds_config.is_none()
            && self.cloud_init.is_none()
            && self.pmem.is_empty()
            && self.memory_hotplug.is_none()
            && self.fs.is_empty()
    }

    /// `PUT /boot-source`. The kernel and initrd must be readable.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), ApiError> {
        check_file("Boot source error: The kernel file", &b.kernel_image_path)?;
        if let Some(initrd) = &b.initrd_path {
            check_file("Boot source error: The initrd file", initrd)?;
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// Checks a machine configuration against the limits and the balloon.
    pub fn validate_machine_config(&self, m: &MachineConfig) -> Result<(), ApiError> {
        if m.vcpu_count == 0
            || m.vcpu_count > MAX_VCPUS
            || (m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 == 1)
        {
            return Err(ApiError::bad(format!(
                "Machine config error: The number of vCPUs must be greater than 0, less than {MAX_VCPUS} and must be 1 or an even number if SMT is enabled."
            )));
        }
        if m.mem_size_mib == 0
            || (m.huge_pages == HugePages::Huge2M && !m.mem_size_mib.is_multiple_of(2))
        {
            return Err(ApiError::bad(
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.",
            ));
        }
        if let Some(b) = &self.balloon {
            if b.amount_mib as usize > m.mem_size_mib {
                return Err(ApiError::bad(
                    "Machine config error: The memory size (MiB) is smaller than the previously set balloon device target size.",
                ));
            }
        }
        Ok(())
    }

    /// `PUT /machine-config`.
    pub fn set_machine_config(&mut self, m: MachineConfig) -> Result<(), ApiError> {
        self.validate_machine_config(&m)?;
        self.machine_config = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn update_machine_config(&mut self, u: &MachineConfigUpdate) -> Result<(), ApiError> {
        if u.is_empty() {
            return Err(ApiError::bad("Empty PATCH request."));
        }
        self.set_machine_config(u.apply(&self.machine_config))
    }

    /// `PUT /drives/{id}`: inserts or replaces a drive; at most one root device, kept first.
    /// A virtio-block drive without `is_read_only` is writable, as with Firecracker.
    pub fn set_drive(&mut self, mut d: Drive) -> Result<(), ApiError> {
        if let Some(socket) = &d.socket {
            // Firecracker's rule: a vhost-user-block drive has its socket and nothing of
            // a file's.
            if d.path_on_host.is_some() || d.is_read_only.is_some() || d.rate_limiter.is_some() {
                return Err(ApiError::bad(
                    "Drive config error: Unable to create the vhost-user-block device: Invalid configuration: a drive with `socket` takes no `path_on_host`, `is_read_only` or `rate_limiter`.",
                ));
            }
            if let Some(why) = socket_problem(socket) {
                return Err(ApiError::bad(format!(
                    "Drive config error: Unable to create the vhost-user-block device: {why}"
                )));
            }
            return self.insert_drive(d);
        }
        let Some(path) = &d.path_on_host else {
            return Err(ApiError::bad(
                "Drive config error: `path_on_host` is required for a virtio-block drive.",
            ));
        };
        check_file(
            "Drive config error: Unable to create the virtio block device: the file",
            path,
        )?;
        check_rate_limiter(&d.rate_limiter)?;
        d.is_read_only.get_or_insert(false);
        self.insert_drive(d)
    }

    /// Inserts a checked drive: at most one root device (kept first), replacing the one with
    /// the same id.
    fn insert_drive(&mut self, d: Drive) -> Result<(), ApiError> {
        if d.is_root_device && self.has_pmem_root() {
            return Err(ApiError::bad(
                "Drive config error: Attempt to add block as a root device while the root device defined as a pmem device",
            ));
        }
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(ApiError::bad(
                "Drive config error: A root block device already exists!",
            ));
        }
        self.drives.retain(|o| o.drive_id != d.drive_id);
        if d.is_root_device {
            self.drives.insert(0, d);
        } else {
            self.drives.push(d);
        }
        Ok(())
    }

    /// Validates a `PATCH /drives/{id}` against the configured drives.
    pub fn check_drive_update(&self, u: &PartialDrive) -> Result<(), ApiError> {
        if !self.drives.iter().any(|d| d.drive_id == u.drive_id) {
            return Err(ApiError::bad(format!(
                "Drive config error: Unable to patch the block device: drive {} not found. Please verify the request arguments.",
                u.drive_id
            )));
        }
        if let Some(p) = &u.path_on_host {
            check_file(
                "Drive config error: Unable to patch the block device: the file",
                p,
            )?;
        }
        check_rate_limiter(&u.rate_limiter)
    }

    /// Records a successful drive update (after the backend applied it).
    pub fn apply_drive_update(&mut self, u: &PartialDrive) {
        if let Some(d) = self.drives.iter_mut().find(|d| d.drive_id == u.drive_id) {
            u.apply_to(d);
        }
    }

    /// A valid guest MAC that no other interface has.
    pub fn check_guest_mac(&self, n: &NetworkInterface) -> Result<(), ApiError> {
        let Some(mac) = &n.guest_mac else {
            return Ok(());
        };
        let Some(parsed) = parse_mac(mac) else {
            return Err(ApiError::bad(format!(
                "Network interface error: Invalid guest MAC address: {mac}"
            )));
        };
        if self
            .network_interfaces
            .iter()
            .filter(|o| o.iface_id != n.iface_id)
            .any(|o| o.guest_mac.as_deref().and_then(parse_mac) == Some(parsed))
        {
            return Err(ApiError::bad(format!(
                "Network interface error: The MAC address is already in use: {mac}"
            )));
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: unique TAP names and MACs.
    pub fn set_network_interface(&mut self, n: NetworkInterface) -> Result<(), ApiError> {
        let others = || {
            self.network_interfaces
                .iter()
                .filter(|o| o.iface_id != n.iface_id)
        };
        if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
            return Err(ApiError::bad(format!(
                "Network interface error: Invalid host device name: {:?}",
                n.host_dev_name
            )));
        }
        if others().any(|o| o.host_dev_name == n.host_dev_name) {
            // Firecracker's words: its second open of the TAP fails with EBUSY.
            return Err(crate::error::tap_open_fault(
                &n.host_dev_name,
                &std::io::Error::from_raw_os_error(16),
                &format!("another interface uses TAP {}", n.host_dev_name),
            ));
        }
        self.check_guest_mac(&n)?;
        if let Some(mtu) = n.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(ApiError::bad(format!(
                    "Network interface error: MTU {mtu} is outside 68..=65535"
                )));
            }
        }
        check_rate_limiter(&n.rx_rate_limiter)?;
        check_rate_limiter(&n.tx_rate_limiter)?;
        match self
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(slot) => *slot = n,
            None => self.network_interfaces.push(n),
        }
        Ok(())
    }

    /// Validates a `PATCH /network-interfaces/{id}`.
    pub fn check_net_update(&self, u: &PartialNetworkInterface) -> Result<(), ApiError> {
        if !self
            .network_interfaces
            .iter()
            .any(|n| n.iface_id == u.iface_id)
        {
            return Err(ApiError::bad(format!(
                "Network interface error: Invalid interface ID - not found: {}",
                u.iface_id
            )));
        }
        check_rate_limiter(&u.rx_rate_limiter)?;
        check_rate_limiter(&u.tx_rate_limiter)
    }

    /// Records a successful network rate-limiter update.
    pub fn apply_net_update(&mut self, u: &PartialNetworkInterface) {
        if let Some(n) = self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == u.iface_id)
        {
            u.apply_to(n);
        }
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), ApiError> {
        if v.guest_cid < 3 {
            return Err(ApiError::bad(format!(
                "Vsock config error: Invalid guest CID {}: it must be at least 3",
                v.guest_cid
            )));
        }
        if v.uds_path.is_empty() {
            return Err(ApiError::bad("Vsock config error: `uds_path` is empty"));
        }
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: EntropyDevice) -> Result<(), ApiError> {
        check_rate_limiter(&e.rate_limiter)?;
        self.entropy = Some(e);
        Ok(())
    }

    /// `PUT /balloon`: the target may not exceed guest memory.
    pub fn set_balloon(&mut self, b: Balloon) -> Result<(), ApiError> {
        if b.amount_mib as usize > self.machine_config.mem_size_mib {
            return Err(ApiError::bad(
                "Balloon config error: Amount of pages requested is too large.",
            ));
        }
        self.balloon = Some(b);
        Ok(())
    }

    /// `PUT /mmds/config`: every interface must exist; the address must be link-local.
    pub fn set_mmds_config(&mut self, c: MmdsConfig) -> Result<(), ApiError> {
        if c.network_interfaces.is_empty() {
            return Err(ApiError::bad(
                "MMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty.",
            ));
        }
        if c.network_interfaces
            .iter()
            .any(|id| !self.network_interfaces.iter().any(|n| &n.iface_id == id))
        {
            return Err(ApiError::bad(
                "MMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.",
            ));
        }
        let addr = c.ipv4_address.unwrap_or(DEFAULT_MMDS_ADDR);
        let o = addr.octets();
        if !addr.is_link_local() || o[2] == 0 || o[2] == 255 {
            return Err(ApiError::bad(
                "MMDS config error: The MMDS IPv4 address is not link local.",
            ));
        }
        self.mmds_config = Some(c);
        Ok(())
    }

    /// The MMDS address the guest uses.
    pub fn mmds_address(&self) -> Option<Ipv4Addr> {
        self.mmds_config
            .as_ref()
            .map(|c| c.ipv4_address.unwrap_or(DEFAULT_MMDS_ADDR))
    }

    /// `PUT /cpu-config`.
    pub fn set_cpu_config(&mut self, c: CpuConfig) -> Result<(), ApiError> {
        self.cpu_config = Some(c);
        Ok(())
    }

    /// `PUT /vessel/cloud-init`: sets or replaces the seed.
    pub fn set_cloud_init(&mut self, c: CloudInitSeed) -> Result<(), ApiError> {
        self.cloud_init = Some(c);
        Ok(())
    }

    /// `PUT /hotplug/memory`, with Firecracker's checks and messages.
    pub fn set_memory_hotplug(&mut self, c: MemoryHotplugConfig) -> Result<(), ApiError> {
        let fail = |what: String| {
            Err(ApiError::bad(format!(
                "Memory hotplug config error: {what}"
            )))
        };
        let (min_block, min_slot) = (2, 128);
        if c.block_size_mib < min_block {
            return fail(format!("Block size must not be lower than {min_block} MiB"));
        }
        if !c.block_size_mib.is_power_of_two() {
            return fail("Block size must be a power of 2".into());
        }
        if c.slot_size_mib < min_slot {
            return fail(format!("Slot size must not be lower than {min_slot} MiB"));
        }
        if !c.slot_size_mib.is_multiple_of(c.block_size_mib) {
            return fail(format!(
                "Slot size must be a multiple of block size ({} MiB)",
                c.block_size_mib
            ));
        }
        if c.total_size_mib < c.slot_size_mib {
            return fail(format!(
                "Total size must not be lower than slot size ({} MiB)",
                c.slot_size_mib
            ));
        }
        if !c.total_size_mib.is_multiple_of(c.slot_size_mib) {
            return fail(format!(
                "Total size must be a multiple of slot size ({} MiB)",
                c.slot_size_mib
            ));
        }
        self.memory_hotplug = Some(c);
        Ok(())
    }

    /// Checks that the resources suffice to boot.
    pub fn validate_for_start(&self) -> Result<(), ApiError> {
        if self.boot_source.is_none() {
            return Err(ApiError::bad(
                "Start microvm error: Missing kernel configuration.",
            ));
        }
        self.validate_machine_config(&self.machine_config)
    }

    /// The configuration as `GET /vm/config` returns it.
    pub fn to_full_vm_config(&self) -> FullVmConfig {
        FullVmConfig {
            balloon: self.balloon,
            drives: self.drives.clone(),
            boot_source: self.boot_source.clone(),
            cpu_config: self.cpu_config.clone().map(CpuConfigSource::Inline),
            logger: self.logger.clone(),
            machine_config: Some(self.machine_config.clone()),
            metrics: self.metrics.clone(),
            mmds_config: self.mmds_config.clone(),
            network_interfaces: self.network_interfaces.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy,
            pmem: self.pmem.clone(),
            cloud_init: self.cloud_init.clone(),
            memory_hotplug: self.memory_hotplug,
            fs: self.fs.clone(),
        }
    }

    /// Builds resources from a Firecracker `--config-file` JSON, with the same validation as
    /// the API. `boot-source` is required. `metadata` (from `--metadata`) fills MMDS.
    pub fn from_config_json(json: &str, metadata: Option<&str>) -> Result<VmResources, ApiError> {
        let cfg: FullVmConfig =
            serde_json::from_str(json).map_err(|e| ApiError::bad(format!("Invalid JSON: {e}")))?;
        Self::from_full_vm_config(cfg, metadata)
    }

    /// Builds resources from Firecracker's full VM configuration (a parsed `--config-file`, or
    /// what a snapshot stored), with the same validation as the API.
    pub fn from_full_vm_config(
        cfg: FullVmConfig,
        metadata: Option<&str>,
    ) -> Result<VmResources, ApiError> {
        let mut r = VmResources {
            logger: cfg.logger,
            metrics: cfg.metrics,
            ..Default::default()
        };
        let Some(boot) = cfg.boot_source else {
            return Err(ApiError::bad("Invalid JSON: missing field `boot-source`"));
        };
        r.set_boot_source(boot)?;
        if let Some(m) = cfg.machine_config {
            r.set_machine_config(m)?;
        }
        match cfg.cpu_config {
            Some(CpuConfigSource::Inline(c)) => r.set_cpu_config(c)?,
            Some(CpuConfigSource::Path(p)) => {
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| ApiError::bad(format!("File operation error: {p}: {e}")))?;
                let c: CpuConfig = serde_json::from_str(&text)
                    .map_err(|e| ApiError::bad(format!("Invalid JSON in {p}: {e}")))?;
                r.set_cpu_config(c)?;
            }
            None => {}
        }
        for d in cfg.drives {
            r.set_drive(d)?;
        }
        for p in cfg.pmem {
            r.set_pmem(p)?;
        }
        for n in cfg.network_interfaces {
            r.set_network_interface(n)?;
        }
        if let Some(v) = cfg.vsock {
            r.set_vsock(v)?;
        }
        if let Some(e) = cfg.entropy {
            r.set_entropy(e)?;
        }
        if let Some(b) = cfg.balloon {
            r.set_balloon(b)?;
        }
        if let Some(m) = cfg.mmds_config {
            r.set_mmds_config(m)?;
        }
        if let Some(c) = cfg.cloud_init {
            r.set_cloud_init(c)?;
        }
        cfg.fs.into_iter().try_for_each(|f| r.set_fs(f))?;
        if let Some(h) = cfg.memory_hotplug {
            r.set_memory_hotplug(h)?;
        }
        if let Some(md) = metadata {
            r.put_metadata(md)?;
        }
        Ok(r)
    }

    /// The resources a snapshot recorded, taken as they were (the files they name may be
    /// gone or elsewhere now: the restored VM does not open them again), for `GET /vm/config`
    /// after a restore.
    pub fn recorded(cfg: FullVmConfig) -> VmResources {
        VmResources {
            boot_source: cfg.boot_source,
            machine_config: cfg.machine_config.unwrap_or_default(),
            cpu_config: match cfg.cpu_config {
                Some(CpuConfigSource::Inline(c)) => Some(c),
                _ => None,
            },
            drives: cfg.drives,
            network_interfaces: cfg.network_interfaces,
            vsock: cfg.vsock,
            entropy: cfg.entropy,
            balloon: cfg.balloon,
            mmds_config: cfg.mmds_config,
            logger: cfg.logger,
            metrics: cfg.metrics,
            cloud_init: cfg.cloud_init,
            pmem: cfg.pmem,
            memory_hotplug: cfg.memory_hotplug,
            fs: cfg.fs,
            ..Default::default()
        }
    }

    /// Fills MMDS from `--metadata`'s JSON text.
    pub fn put_metadata(&self, md: &str) -> Result<(), ApiError> {
        let v: Value = serde_json::from_str(md)
            .map_err(|e| ApiError::bad(format!("Invalid MMDS metadata JSON: {e}")))?;
        self.mmds.put(v)
    }

    /// [`Self::from_config_json`] on a file.
    pub fn from_config_file(
        path: &std::path::Path,
        metadata: Option<&str>,
    ) -> Result<VmResources, ApiError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ApiError::bad(format!("File operation error: {}: {e}", path.display())))?;
        Self::from_config_json(&text, metadata)
    }
}
