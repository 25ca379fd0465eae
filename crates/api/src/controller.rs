//! The API's state machine: the pre-boot resources, the instance state, and what each
//! operation does before and after `InstanceStart`, calling the [`VmmBackend`] when the VM is
//! involved. The HTTP layer ([`crate::routes`]) only decodes requests into these calls, so the
//! VMM can also drive a controller directly (`--config-file --no-api`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::backend::{Backend, MIGRATION_REPLY_TIMEOUT};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::resources::VmResources;
use crate::types::*;

mod hotplug;
mod pmem;

/// The application name Firecracker clients expect in `GET /`.
pub const APP_NAME: &str = "Firecracker";

/// The Firecracker API version Vessel implements: `info.version` of `openapi.json` (a test
/// keeps them equal). `GET /version`, `GET /` and `vessel --version` report it where
/// Firecracker reports its own version, so clients that gate features on it (Kata
/// Containers requires >= 0.21.1) judge the API they talk to.
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

/// Owns the configuration and the instance state; one per VM.
pub struct ApiController {
    resources: VmResources,
    state: InstanceState,
    backend: Backend,
    id: String,
    vessel_version: String,
    metrics: Arc<Metrics>,
    metrics_sink: Option<File>,
    /// Called once a metrics file is configured (the VMM starts what writes to it).
    on_metrics_file: Option<Box<dyn FnMut() + Send>>,
    /// The VMM's cumulative counters (`group.field`) at the previous metrics line: each line
    /// has what happened since, as Firecracker's; the Prometheus endpoint has the totals.
    vmm_flushed: HashMap<String, u64>,
}

impl std::fmt::Debug for ApiController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiController")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ApiController {
    /// A controller for a fresh VM named `id`; `vessel_version` is the implementation's own
    /// version, reported next to [`FIRECRACKER_API_VERSION`] (the `vessel_version` extension).
    /// `backend` is a boxed [`crate::VmmBackend`] (called in place) or a
    /// [`crate::ChannelBackend`] (called on the VMM's thread).
    pub fn new(
        backend: impl Into<Backend>,
        id: impl Into<String>,
        vessel_version: impl Into<String>,
    ) -> Self {
        Self {
            resources: VmResources::default(),
            state: InstanceState::NotStarted,
            backend: backend.into(),
            id: id.into(),
            vessel_version: vessel_version.into(),
            metrics: Arc::new(Metrics::new()),
            metrics_sink: None,
            on_metrics_file: None,
            vmm_flushed: HashMap::new(),
        }
    }

    /// Calls `f` once a metrics file is configured (`PUT /metrics`, a config file's
    /// `metrics`), after it is opened.
    pub fn on_metrics_file(&mut self, f: impl FnMut() + Send + 'static) {
        self.on_metrics_file = Some(Box::new(f));
    }

    fn metrics_file_configured(&mut self) {
        if let Some(f) = &mut self.on_metrics_file {
            f();
        }
    }

    /// Adopts resources built elsewhere (the `--config-file`): applies their logger and
    /// metrics configuration, and has the backend vet them.
    pub fn with_resources(mut self, resources: VmResources) -> Result<Self, ApiError> {
        let r = resources.clone();
        self.backend.try_call(move |b| b.validate(&r))?;
        if let Some(l) = resources.logger.clone() {
            self.backend.try_call(move |b| b.configure_logger(&l))?;
        }
        if let Some(m) = &resources.metrics {
            self.metrics_sink = Some(open_metrics_sink(&m.metrics_path)?);
            self.metrics_file_configured();
        }
        self.resources = resources;
        Ok(self)
    }

    /// The API metrics (shared with the server).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The configuration so far.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// The instance state.
    pub fn state(&self) -> InstanceState {
        self.state
    }

    fn require_preboot(&self) -> Result<(), ApiError> {
        if self.state == InstanceState::NotStarted {
            Ok(())
        } else {
            Err(ApiError::NotSupportedPostBoot)
        }
    }

    fn require_started(&self) -> Result<(), ApiError> {
        if self.state == InstanceState::NotStarted {
            Err(ApiError::NotSupportedPreBoot)
        } else {
            Ok(())
        }
    }

    /// Applies a pre-boot change to a copy of the resources, has the backend vet the result,
    /// then commits it. Nothing changes on error.
    fn configure(
        &mut self,
        f: impl FnOnce(&mut VmResources) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        self.require_preboot()?;
        let mut next = self.resources.clone();
        f(&mut next)?;
        let candidate = next.clone();
        self.backend.try_call(move |b| b.validate(&candidate))?;
        self.resources = next;
        Ok(())
    }

    /// `GET /`.
    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.id.clone(),
            state: self.state,
            vmm_version: FIRECRACKER_API_VERSION.to_string(),
            app_name: APP_NAME.to_string(),
        }
    }

    /// `GET /version`.
    pub fn version(&self) -> VersionInfo {
        VersionInfo {
            firecracker_version: FIRECRACKER_API_VERSION.to_string(),
        }
    }

    /// `GET /machine-config`.
    pub fn machine_config(&self) -> MachineConfig {
        self.resources.machine_config.clone()
    }

    /// `PUT /machine-config`.
    pub fn put_machine_config(&mut self, m: MachineConfig) -> Result<(), ApiError> {
        self.configure(|r| r.set_machine_config(m))
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine_config(&mut self, u: MachineConfigUpdate) -> Result<(), ApiError> {
        self.configure(|r| r.update_machine_config(&u))
    }

    /// `PUT /boot-source`.
    pub fn put_boot_source(&mut self, b: BootSource) -> Result<(), ApiError> {
        self.configure(|r| r.set_boot_source(b))
    }

    /// `PUT /cpu-config`.
    pub fn put_cpu_config(&mut self, c: CpuConfig) -> Result<(), ApiError> {
        self.configure(|r| r.set_cpu_config(c))
    }

    /// `PUT /drives/{id}`: configures a drive before boot, hot-plugs one after.
    pub fn put_drive(&mut self, d: Drive) -> Result<(), ApiError> {
        if self.hotplugs() {
            return self.hotplug_drive(d);
        }
        self.configure(|r| r.set_drive(d))
    }

    /// `PATCH /drives/{id}` (post-boot).
    pub fn patch_drive(&mut self, u: PartialDrive) -> Result<(), ApiError> {
        self.require_started()?;
        self.resources.check_drive_update(&u)?;
        let update = u.clone();
        self.backend.try_call(move |b| b.update_drive(&update))?;
        self.resources.apply_drive_update(&u);
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: configures an interface before boot, hot-plugs one
    /// after.
    pub fn put_network_interface(&mut self, n: NetworkInterface) -> Result<(), ApiError> {
        if self.hotplugs() {
            return self.hotplug_network_interface(n);
        }
        self.require_preboot()?;
        // A MAC in use elsewhere is refused and nothing changes. Past that point, as with
        // Firecracker, an update releases the interface it replaces before the new one is
        // made: if the new one cannot be made, the old one is gone, its TAP and MAC free.
        self.resources.check_guest_mac(&n)?;
        let id = n.iface_id.clone();
        let r = self.configure(|r| r.set_network_interface(n));
        if r.is_err() {
            self.resources
                .network_interfaces
                .retain(|o| o.iface_id != id);
        }
        r
    }

    /// `PATCH /network-interfaces/{id}` (post-boot).
    pub fn patch_network_interface(&mut self, u: PartialNetworkInterface) -> Result<(), ApiError> {
        self.require_started()?;
        self.resources.check_net_update(&u)?;
        let update = u.clone();
        self.backend
            .try_call(move |b| b.update_network_interface(&update))?;
        self.resources.apply_net_update(&u);
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn put_vsock(&mut self, v: Vsock) -> Result<(), ApiError> {
        self.configure(|r| r.set_vsock(v))
    }

    /// `PUT /entropy`.
    pub fn put_entropy(&mut self, e: EntropyDevice) -> Result<(), ApiError> {
        self.configure(|r| r.set_entropy(e))
    }

    /// `PUT /serial` (pre-boot): the VMM keeps it for the start or a snapshot load.
    pub fn put_serial(&mut self, s: SerialDevice) -> Result<(), ApiError> {
        self.require_preboot()?;
        let serial = s.clone();
        self.backend
            .try_call(move |b| b.configure_serial(&serial))?;
        self.resources.serial = Some(s);
        Ok(())
    }

    /// `PUT /hotplug/memory` (pre-boot).
    pub fn put_memory_hotplug(&mut self, c: MemoryHotplugConfig) -> Result<(), ApiError> {
        self.configure(|r| r.set_memory_hotplug(c))
    }

    /// `GET /hotplug/memory` (post-boot, as Firecracker).
    pub fn get_memory_hotplug(&mut self) -> Result<MemoryHotplugStatus, ApiError> {
        self.require_started()?;
        self.require_memory_hotplug("Internal VMM error")?;
        self.backend.try_call(|b| b.memory_hotplug_status())
    }

    /// `PATCH /hotplug/memory` (post-boot).
    pub fn patch_memory_hotplug(&mut self, u: MemoryHotplugSizeUpdate) -> Result<(), ApiError> {
        self.require_started()?;
        self.require_memory_hotplug("Memory hotplug update error")?;
        let mib = u.requested_size_mib;
        self.backend.try_call(move |b| b.memory_hotplug_update(mib))
    }

    /// Firecracker's answer when there is no virtio-mem device.
    fn require_memory_hotplug(&self, what: &str) -> Result<(), ApiError> {
        match self.resources.memory_hotplug {
            Some(_) => Ok(()),
            None => Err(ApiError::bad(format!(
                "{what}: Failed perform action on device: Device not found"
            ))),
        }
    }

    /// `PUT /balloon` (pre-boot).
    pub fn put_balloon(&mut self, b: Balloon) -> Result<(), ApiError> {
        self.configure(|r| r.set_balloon(b))
    }

    /// `GET /balloon`: the configuration before boot, the device's state after.
    pub fn get_balloon(&mut self) -> Result<Balloon, ApiError> {
        if self.state == InstanceState::NotStarted {
            self.resources
                .balloon
                .ok_or_else(|| ApiError::bad("Balloon config error: No balloon device found."))
        } else {
            if self.resources.balloon.is_none() {
                return Err(ApiError::bad(
                    "Balloon config error: No balloon device found.",
                ));
            }
            self.backend.try_call(|b| b.balloon_config())
        }
    }

    fn require_balloon(&self) -> Result<Balloon, ApiError> {
        self.resources
            .balloon
            .ok_or_else(|| ApiError::bad("Balloon update error: No balloon device found."))
    }

    /// `PATCH /balloon` (post-boot).
    pub fn patch_balloon(&mut self, u: BalloonUpdate) -> Result<(), ApiError> {
        self.require_started()?;
        self.require_balloon()?;
        if u.amount_mib as usize > self.resources.machine_config.mem_size_mib {
            return Err(ApiError::bad(
                "Balloon update error: Amount of pages requested is too large.",
            ));
        }
        let amount_mib = u.amount_mib;
        self.backend
            .try_call(move |b| b.balloon_update(amount_mib))?;
        if let Some(b) = &mut self.resources.balloon {
            b.amount_mib = u.amount_mib;
        }
        Ok(())
    }

    /// `GET /balloon/statistics` (post-boot, statistics enabled).
    pub fn balloon_stats(&mut self) -> Result<BalloonStats, ApiError> {
        self.require_started()?;
        let b = self.require_balloon()?;
        if b.stats_polling_interval_s == 0 {
            return Err(ApiError::bad(
                "Balloon update error: Statistics for the balloon device are not enabled",
            ));
        }
        self.backend.try_call(|b| b.balloon_stats())
    }

    /// `PATCH /balloon/statistics` (post-boot; statistics cannot be turned on or off).
    pub fn patch_balloon_stats(&mut self, u: BalloonStatsUpdate) -> Result<(), ApiError> {
        self.require_started()?;
        let b = self.require_balloon()?;
        if (b.stats_polling_interval_s == 0) != (u.stats_polling_interval_s == 0) {
            return Err(ApiError::bad(
                "Balloon update error: Cannot enable or disable the statistics after boot.",
            ));
        }
        let seconds = u.stats_polling_interval_s;
        self.backend
            .try_call(move |b| b.balloon_stats_interval(seconds))?;
        if let Some(b) = &mut self.resources.balloon {
            b.stats_polling_interval_s = u.stats_polling_interval_s;
        }
        Ok(())
    }

    /// `PATCH /balloon/hinting/start` (post-boot).
    pub fn balloon_hinting_start(&mut self, cmd: BalloonStartCmd) -> Result<(), ApiError> {
        self.require_started()?;
        self.require_balloon()?;
        self.backend.try_call(move |b| b.balloon_hinting_start(cmd))
    }

    /// `GET /balloon/hinting/status` (post-boot).
    pub fn balloon_hinting_status(&mut self) -> Result<BalloonHintingStatus, ApiError> {
        self.require_started()?;
        self.require_balloon()?;
        self.backend.try_call(|b| b.balloon_hinting_status())
    }

    /// `PATCH /balloon/hinting/stop` (post-boot).
    pub fn balloon_hinting_stop(&mut self) -> Result<(), ApiError> {
        self.require_started()?;
        self.require_balloon()?;
        self.backend.try_call(|b| b.balloon_hinting_stop())
    }

    /// `PUT /actions`.
    pub fn action(&mut self, a: InstanceActionInfo) -> Result<(), ApiError> {
        match a.action_type {
            ActionType::InstanceStart => self.start(),
            ActionType::SendCtrlAltDel => {
                self.require_started()?;
                self.backend.try_call(|b| b.send_ctrl_alt_del())
            }
            ActionType::FlushMetrics => {
                self.require_started()?;
                self.flush_metrics()
            }
        }
    }

    /// `PUT /vessel/cloud-init` (extension, pre-boot): the seed disk the VM gets at start;
    /// a second call replaces the first.
    pub fn put_cloud_init(&mut self, c: CloudInitSeed) -> Result<(), ApiError> {
        self.configure(|r| r.set_cloud_init(c))
    }

    /// `PUT /vessel/fs/{id}` (extension, pre-boot): a virtio-fs device the VM gets at start;
    /// a second call with the same id replaces it.
    pub fn put_fs(&mut self, f: FsDevice) -> Result<(), ApiError> {
        self.configure(|r| r.set_fs(f))
    }

    /// `PUT /vessel/stop` (extension): ends the started VM at once.
    pub fn stop(&mut self) -> Result<(), ApiError> {
        self.require_started()?;
        self.backend.try_call(|b| b.stop())
    }

    /// `PUT /vessel/migrate` (extension): live-migrates the started VM.
    pub fn migrate(&mut self, p: MigrateParams) -> Result<Value, ApiError> {
        self.require_started()?;
        self.backend
            .call_within(MIGRATION_REPLY_TIMEOUT, move |b| b.migrate(&p))?
    }

    /// `InstanceStart`: validates the resources and has the backend boot the VM.
    pub fn start(&mut self) -> Result<(), ApiError> {
        self.require_preboot()?;
        self.resources.validate_for_start()?;
        let r = self.resources.clone();
        self.backend.try_call(move |b| b.start(&r))?;
        self.state = InstanceState::Running;
        // As Firecracker: a first metrics line as soon as the VM runs (tools wait for it). The
        // VM is running: a write that fails is logged, not an error of the start.
        if let Err(e) = self.flush_metrics() {
            log::warn!("{e}");
        }
        Ok(())
    }

    /// `PATCH /vm`.
    pub fn patch_vm(&mut self, vm: Vm) -> Result<(), ApiError> {
        self.require_started()?;
        match vm.state {
            VmState::Paused => {
                self.backend.try_call(|b| b.pause())?;
                self.state = InstanceState::Paused;
            }
            VmState::Resumed => {
                self.backend.try_call(|b| b.resume())?;
                self.state = InstanceState::Running;
            }
        }
        Ok(())
    }

    /// `PUT /snapshot/create` (the VM must be paused).
    pub fn snapshot_create(&mut self, p: SnapshotCreateParams) -> Result<(), ApiError> {
        self.require_started()?;
        if self.state != InstanceState::Paused {
            return Err(ApiError::bad(
                "Create snapshot error: Cannot save the microVM state: save/restore unavailable while running (pause the microVM first).",
            ));
        }
        if p.snapshot_type == Some(SnapshotType::Diff)
            && !self.resources.machine_config.track_dirty_pages
        {
            return Err(ApiError::bad(
                "Create snapshot error: Diff snapshots require track_dirty_pages.",
            ));
        }
        self.backend.try_call(move |b| b.snapshot_create(&p))
    }

    /// `PUT /snapshot/load` (only on a fresh VMM).
    pub fn snapshot_load(&mut self, p: SnapshotLoadParams) -> Result<(), ApiError> {
        self.require_preboot()?;
        if !self.resources.is_pristine() {
            return Err(ApiError::bad(
                "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        // Firecracker's words for both cases.
        match (&p.mem_file_path, &p.mem_backend) {
            (Some(_), Some(_)) => return Err(ApiError::bad(
                "too many fields: either `mem_backend` or `mem_file_path` exclusively is required.",
            )),
            (None, None) => {
                return Err(ApiError::bad(
                    "missing field: either `mem_backend` or `mem_file_path` is required.",
                ))
            }
            _ => {}
        }
        if let Some(cid) = p.vsock_override.as_ref().and_then(|o| o.guest_cid) {
            // 0-2 are the hypervisor, local and host addresses; u32::MAX is VMADDR_CID_ANY.
            if cid < 3 || cid == u32::MAX {
                return Err(ApiError::bad(format!(
                    "Load snapshot error: Invalid guest CID {cid} in vsock_override: it must be 3 or more, and below 4294967295."
                )));
            }
        }
        let params = p.clone();
        let mut restored = self.backend.try_call(move |b| b.snapshot_load(&params))?;
        restored.logger = self.resources.logger.take();
        restored.metrics = self.resources.metrics.take();
        restored.mmds = self.resources.mmds.clone();
        self.resources = restored;
        self.state = if p.resume_vm {
            InstanceState::Running
        } else {
            InstanceState::Paused
        };
        Ok(())
    }

    /// `PUT /logger` (pre-boot).
    pub fn put_logger(&mut self, l: Logger) -> Result<(), ApiError> {
        self.require_preboot()?;
        let logger = l.clone();
        self.backend
            .try_call(move |b| b.configure_logger(&logger))?;
        self.resources.logger = Some(l);
        Ok(())
    }

    /// `PUT /metrics` (pre-boot, once).
    pub fn put_metrics(&mut self, m: MetricsConfig) -> Result<(), ApiError> {
        self.open_metrics(&m.metrics_path)?;
        self.resources.metrics = Some(m);
        Ok(())
    }

    /// `--metrics-path`: the same file as `PUT /metrics` would open, but, as with
    /// Firecracker, not part of the configuration (`GET /vm/config` shows `metrics: null`).
    pub fn metrics_from_command_line(&mut self, path: &str) -> Result<(), ApiError> {
        self.open_metrics(path)
    }

    fn open_metrics(&mut self, path: &str) -> Result<(), ApiError> {
        self.require_preboot()?;
        if self.metrics_sink.is_some() {
            return Err(ApiError::bad(
                "Metrics error: Reinitialization of metrics not allowed.",
            ));
        }
        self.metrics_sink = Some(open_metrics_sink(path)?);
        self.metrics_file_configured();
        Ok(())
    }

    /// The metrics line (API and VMM groups) as JSON.
    fn metrics_json_with(&mut self, extra: Map<String, Value>) -> Value {
        let m = self.resources.metrics.as_ref();
        self.metrics.json_line(
            m.filter(|m| m.emit_id).map(|_| self.id.as_str()),
            m.and_then(|m| m.properties.as_ref()),
            extra,
        )
    }

    /// Writes one metrics line to the configured metrics path (`FlushMetrics`; the VMM may
    /// also call it periodically). Without a metrics path this does nothing.
    pub fn flush_metrics(&mut self) -> Result<(), ApiError> {
        self.write_metrics(true)
    }

    /// Writes a metrics line without asking the VMM for its groups (they are zeros): for a
    /// process going down on a signal, whose VMM thread may be the one that took it.
    pub fn flush_metrics_without_vmm(&mut self) -> Result<(), ApiError> {
        self.write_metrics(false)
    }

    fn write_metrics(&mut self, with_vmm: bool) -> Result<(), ApiError> {
        if self.metrics_sink.is_none() {
            return Ok(());
        }
        let extra = if with_vmm {
            let totals = self.backend.try_call(|b| b.metrics()).unwrap_or_default();
            since_previous_line(&mut self.vmm_flushed, totals)
        } else {
            Map::new()
        };
        let mut line = self.metrics_json_with(extra).to_string();
        line.push('\n');
        if let Some(f) = &mut self.metrics_sink {
            f.write_all(line.as_bytes())
                .map_err(|e| ApiError::Internal(format!("Metrics error: write failed: {e}")))?;
        }
        Ok(())
    }

    /// `GET /vessel/metrics`: cumulative counters in the Prometheus text format.
    pub fn prometheus(&mut self) -> String {
        let extra = self.backend.try_call(|b| b.metrics()).unwrap_or_default();
        // Vessel's own version: Firecracker's clients validate `GET /` and `GET /version`
        // against Firecracker's schema, so it is reported here (and by `vessel --version`).
        format!(
            "# TYPE vessel_build_info gauge\nvessel_build_info{{version=\"{}\"}} 1\n{}",
            self.vessel_version,
            self.metrics.prometheus(&extra)
        )
    }

    /// `GET|PUT|PATCH /mmds`.
    pub fn mmds(&self) -> &crate::resources::MmdsStore {
        &self.resources.mmds
    }

    /// The MMDS store, to set its limit (`--mmds-size-limit`).
    pub fn mmds_mut(&mut self) -> &mut crate::resources::MmdsStore {
        &mut self.resources.mmds
    }

    /// `PUT /mmds/config` (pre-boot).
    pub fn put_mmds_config(&mut self, c: MmdsConfig) -> Result<(), ApiError> {
        self.configure(|r| r.set_mmds_config(c))
    }

    /// `GET /vm/config`.
    pub fn vm_config(&self) -> crate::resources::FullVmConfig {
        self.resources.to_full_vm_config()
    }
}

/// Opens the metrics file or FIFO for appending, without blocking on a FIFO with no reader.
fn open_metrics_sink(path: &str) -> Result<File, ApiError> {
    // Read-write, so that opening a FIFO never waits for (or fails without) a reader.
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ApiError::bad(format!("Metrics error: Cannot open {path}: {e}")))
}

/// The VMM's counters as a metrics line reports them: each number (`group.field`) less what
/// it was at the previous line (`flushed`, updated), or all of it when it went down (a device
/// replaced by another under the same name). Nested objects (Firecracker's aggregates) pass
/// as they are.
fn since_previous_line(
    flushed: &mut HashMap<String, u64>,
    totals: Map<String, Value>,
) -> Map<String, Value> {
    totals
        .into_iter()
        .map(|(group, fields)| {
            let Value::Object(fields) = fields else {
                return (group, fields);
            };
            let fields = fields
                .into_iter()
                .map(|(k, v)| match v.as_u64() {
                    Some(now) => {
                        let before = flushed.insert(format!("{group}.{k}"), now).unwrap_or(0);
                        let d = if now >= before { now - before } else { now };
                        (k, d.into())
                    }
                    None => (k, v),
                })
                .collect();
            (group, Value::Object(fields))
        })
        .collect()
}

#[cfg(test)]
mod since_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_get_what_changed_and_a_restarted_counter_counts_from_zero() {
        let mut flushed = HashMap::new();
        let totals = |n: u64, agg: u64| {
            let v =
                json!({"pmem_a": {"queue_event_count": n}, "block": {"read_agg": {"sum_us": agg}}});
            v.as_object().unwrap().clone()
        };
        let first = since_previous_line(&mut flushed, totals(5, 9));
        assert_eq!(first["pmem_a"]["queue_event_count"], 5);
        let second = since_previous_line(&mut flushed, totals(8, 9));
        assert_eq!(second["pmem_a"]["queue_event_count"], 3);
        // Aggregates pass as they are.
        assert_eq!(second["block"]["read_agg"]["sum_us"], 9);
        // A device replaced under the same id starts again from 0.
        let third = since_previous_line(&mut flushed, totals(2, 9));
        assert_eq!(third["pmem_a"]["queue_event_count"], 2);
    }
}
