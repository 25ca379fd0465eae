//! [`ApiBackend`]: `vessel_api::VmmBackend` on top of the core's [`Vm`] and [`VmHandle`].
//!
//! The backend lives on the VMM's main thread (the API server reaches it through
//! `vessel_api::backend::channel`). `InstanceStart` builds and starts the VM and hands
//! [`RunningVm::wait`] to a thread of its own; when the VM ends, [`ApiBackend::ended_event`]
//! becomes readable and [`ApiBackend::take_outcome`] returns how it ended.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use serde_json::{json, Map, Value};
use vessel_api::resources::FullVmConfig;
use vessel_api::types::MemoryHotplugStatus;
use vessel_api::types::{
    Balloon as ApiBalloon, BalloonHintingStatus, BalloonStartCmd, BalloonStats as ApiBalloonStats,
    Drive, Logger, MemoryBackendType, MigrateParams, NetworkInterface, PartialDrive,
    PartialNetworkInterface, PartialPmem, PluggedDevice, Pmem, RestoreHugePages, SerialDevice,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
};
use vessel_api::{ApiError, VmResources, VmmBackend};
use vessel_virtio_devices::balloon::BalloonHandle;
use vessel_virtio_devices::block::BlockHandle;
use vessel_virtio_devices::mem::MemHandle;
use vessel_virtio_devices::net::NetHandle;
use vessel_vmm::device_config::Transport;
use vessel_vmm::migration::{MigrateOptions, MigrationUrl};
use vessel_vmm::restore::{load_state, restore_with};
use vessel_vmm::snapshot::{SnapshotKind, SnapshotRequest};
use vessel_vmm::{
    ControlError, DeviceHandles, ErrorChain, PluggedRef, SerialTarget, Vm, VmConfig, VmHandle,
    VmOutcome, VmmError,
};
use vmm_sys_util::eventfd::EventFd;

use super::balloon::{balloon_stats, hinting_error, BalloonState, BALLOON_PAGES_PER_MIB};
use super::config::{
    apply_overrides, bucket_config, resources_to_config_on, unsupported, update_limiter,
};
use super::{cidata, cpu_config};
use crate::memfile::{is_process_local, MemFile};

#[path = "hotplug.rs"]
mod hotplug;

fn control_error(e: ControlError) -> ApiError {
    match e {
        ControlError::Ended => ApiError::Internal("the microVM has ended".into()),
        e => ApiError::Internal(e.to_string()),
    }
}

type LoggerHook = Box<dyn FnMut(&Logger) -> Result<(), ApiError> + Send>;

/// `VmmBackend` for a Vessel VM. See the module docs.
pub struct ApiBackend {
    base: VmConfig,
    vm: Option<VmHandle>,
    ended: EventFd,
    outcome: Option<mpsc::Receiver<Result<VmOutcome, VmmError>>>,
    /// Why a `PUT /snapshot/load` failed after its request was accepted: the process ends.
    failed_restore: Option<ApiError>,
    logger: Option<LoggerHook>,
    /// The resources the VM was started (or restored) with, as `GET /vm/config` shows them:
    /// stored in snapshots so that a restoring VMM serves them again.
    api_config: Option<FullVmConfig>,
    /// The started VM's balloon, if it has one.
    balloon: Option<BalloonState>,
    /// The started VM's virtio-mem device, if it has one.
    memory_hotplug: Option<MemHandle>,
    /// The started VM's disks, with their drive ids, in device order.
    drives: Vec<(String, BlockHandle)>,
    /// The started VM's network interfaces, with their ids, in device order.
    nets: Vec<(String, NetHandle)>,
    /// The started VM's pmem devices.
    pmem: super::pmem::PmemDevices,
    /// Where the devices go (virtio-mmio unless `--enable-pci`).
    transport: Transport,
    /// The started VM's cloud-init seed disk (`PUT /vessel/cloud-init`), held as long as
    /// the VM.
    seed: Option<MemFile>,
}

impl std::fmt::Debug for ApiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiBackend")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl ApiBackend {
    /// A backend whose VMs take the console, nested mode, profiling and appended kernel
    /// parameters from `base` (its boot source, size and devices are replaced by the API's).
    pub fn new(base: VmConfig) -> Result<ApiBackend, VmmError> {
        Ok(ApiBackend {
            base,
            vm: None,
            ended: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::EventFd {
                what: "the VM's end".into(),
                source,
            })?,
            outcome: None,
            failed_restore: None,
            logger: None,
            api_config: None,
            balloon: None,
            memory_hotplug: None,
            drives: Vec::new(),
            nets: Vec::new(),
            pmem: Default::default(),
            transport: Transport::Mmio,
            seed: None,
        })
    }

    /// Places the devices of the VMs it starts on `transport` (default virtio-mmio).
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Calls `hook` for `PUT /logger` (and a config file's `logger`).
    pub fn with_logger(
        mut self,
        hook: impl FnMut(&Logger) -> Result<(), ApiError> + Send + 'static,
    ) -> Self {
        self.logger = Some(Box::new(hook));
        self
    }

    /// Whether a VM has been started or restored.
    pub fn has_vm(&self) -> bool {
        self.vm.is_some()
    }

    /// Readable once the started VM has ended.
    pub fn ended_event(&self) -> &EventFd {
        &self.ended
    }

    /// How the VM ended, once it has (`None` before, and after the first call).
    pub fn take_outcome(&mut self) -> Option<Result<VmOutcome, VmmError>> {
        let r = self.outcome.as_ref()?.try_recv().ok()?;
        self.outcome = None;
        Some(r)
    }

    /// Why the snapshot load failed, once it has (then the process exits, as Firecracker's).
    pub fn take_failed_restore(&mut self) -> Option<ApiError> {
        self.failed_restore.take()
    }

    /// Starts `vm` and supervises it on a thread of its own until it ends. The thread starts
    /// once the VM has, so that it inherits the filter `start` installed on this thread (one
    /// filter fewer to install); if it cannot start, the VM it would have received is
    /// dropped, which stops it and joins its vCPUs, so a VM never runs unsupervised.
    fn start_supervised(&mut self, vm: Vm) -> Result<(), ApiError> {
        let (tx, rx) = mpsc::channel();
        let ended = self
            .ended
            .try_clone()
            .map_err(|e| ApiError::Internal(format!("eventfd: {e}")))?;
        let running = vm
            .start()
            .map_err(|e| ApiError::bad(format!("Start microvm error: {}", ErrorChain(&e))))?;
        let handle = running.handle();
        std::thread::Builder::new()
            .name("vm-wait".into())
            .spawn(move || {
                let _ = tx.send(running.wait());
                let _ = ended.write(1);
            })
            .map_err(|e| ApiError::Internal(format!("cannot start the VM supervisor: {e}")))?;
        self.vm = Some(handle);
        self.outcome = Some(rx);
        Ok(())
    }

    fn running(&self) -> Result<&VmHandle, ApiError> {
        self.vm.as_ref().ok_or(ApiError::NotSupportedPreBoot)
    }

    /// Records a device's limiters, changed by a PATCH, in the configuration snapshots and
    /// migrations carry (the running device already has them: a failure is only logged).
    fn record_limiters(&self, device: PluggedRef<'_>) {
        if let Some(vm) = &self.vm {
            if let Err(e) = vm.record_limiters(device) {
                log::warn!(
                    "the new rate limits are not recorded for snapshots: {}",
                    ErrorChain(&e)
                );
            }
        }
    }

    /// The started or restored VM's balloon, its statistics polled if configured.
    fn attach_balloon(&mut self, b: Option<(BalloonHandle, ApiBalloon)>) -> Result<(), ApiError> {
        if let (Some((handle, config)), Some(vm)) = (b, self.vm.clone()) {
            self.balloon = Some(BalloonState::start(vm, handle, config)?);
        }
        Ok(())
    }
}

impl VmmBackend for ApiBackend {
    fn validate(&mut self, resources: &VmResources) -> Result<(), ApiError> {
        unsupported(resources)?;
        super::taps::check_taps(resources)?;
        if let Some(c) = &resources.cpu_config {
            cpu_config::check_on_host(&cpu_config::from_api(c)?)?;
        }
        if let Some(seed) = &resources.cloud_init {
            cidata::check(seed)?;
        }
        Ok(())
    }

    fn start(&mut self, resources: &VmResources) -> Result<(), ApiError> {
        if self.vm.is_some() {
            return Err(ApiError::NotSupportedPostBoot);
        }
        unsupported(resources)?;
        if let (Some(t), None) = (resources.machine_config.cpu_template, &resources.cpu_config) {
            cpu_config::check_static(t, cpu_config::HostCpu::this_host())?;
        }
        let mut config = resources_to_config_on(resources, &self.base, self.transport)?;
        // The seed goes after the drives, so the drives keep their order (and handles).
        let seed = resources
            .cloud_init
            .as_ref()
            .map(|s| cidata::attach(s, &mut config, self.transport))
            .transpose()?;
        let start_err =
            |e: VmmError| ApiError::bad(format!("Start microvm error: {}", ErrorChain(&e)));
        let vm = Vm::build(&config).map_err(start_err)?;
        let handles = vm.device_handles();
        let drives = drive_handles(resources, &handles);
        let nets = net_handles(resources, &handles);
        let pmem = super::pmem::PmemDevices::new(resources, &handles.pmem);
        let balloon = handles.balloon.clone().zip(resources.balloon);
        let memory_hotplug = handles.memory_hotplug.clone();
        self.api_config = Some(resources.to_full_vm_config());
        self.start_supervised(vm)?;
        self.seed = seed;
        self.memory_hotplug = memory_hotplug;
        self.drives = drives;
        self.nets = nets;
        self.pmem = pmem;
        self.attach_balloon(balloon)
    }

    fn migrate(&mut self, p: &MigrateParams) -> Result<Value, ApiError> {
        let fail = |e: &(dyn std::error::Error + 'static)| {
            ApiError::bad(format!("Migration error: {}", ErrorChain(e)))
        };
        self.refuse_seed("Migration error")?;
        let url: MigrationUrl = p.destination.parse().map_err(|e| fail(&e))?;
        let mut opts = MigrateOptions::default();
        if let Some(ms) = p.downtime_ms {
            opts.downtime = std::time::Duration::from_millis(ms);
        }
        if let Some(r) = p.max_rounds {
            opts.max_rounds = r;
        }
        let stats = self.running()?.migrate(&url, &opts).map_err(|e| fail(&e))?;
        log::info!("migrated to {}: {stats:?}", p.destination);
        serde_json::to_value(stats).map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn snapshot_create(&mut self, p: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.refuse_seed("Create snapshot error")?;
        let req = SnapshotRequest {
            state: PathBuf::from(&p.snapshot_path),
            memory: PathBuf::from(&p.mem_file_path),
            kind: match p.snapshot_type {
                Some(SnapshotType::Diff) => SnapshotKind::Diff,
                _ => SnapshotKind::Full,
            },
            api: self.api_config.clone(),
        };
        let info = self
            .running()?
            .snapshot(&req)
            .map_err(|e| ApiError::bad(format!("Create snapshot error: {}", ErrorChain(&e))))?;
        log::info!(
            "snapshot {:?}: {} of {} MiB written in {:?} (devices {:?}, memory {:?})",
            info.kind,
            info.memory.written >> 20,
            info.memory.covered >> 20,
            info.total,
            info.devices_time,
            info.memory_time
        );
        Ok(())
    }

    fn snapshot_load(&mut self, p: &SnapshotLoadParams) -> Result<VmResources, ApiError> {
        if self.vm.is_some() {
            return Err(ApiError::NotSupportedPostBoot);
        }
        // As Firecracker: a restore that fails leaves a process not trusted to try again, so
        // the caller gets its answer and the process then exits (`take_failed_restore`).
        self.restore(p)
            .inspect_err(|e| self.failed_restore = Some(e.clone()))
    }

    fn pause(&mut self) -> Result<(), ApiError> {
        self.running()?.pause().map_err(control_error)
    }

    fn resume(&mut self) -> Result<(), ApiError> {
        self.running()?.resume().map_err(control_error)
    }

    fn send_ctrl_alt_del(&mut self) -> Result<(), ApiError> {
        self.running()?.ctrl_alt_del().map_err(|e| match e {
            ControlError::KeyboardFull => ApiError::bad(format!("SendCtrlAltDel: {e}")),
            e => control_error(e),
        })
    }

    fn stop(&mut self) -> Result<(), ApiError> {
        self.running()?.stop();
        Ok(())
    }

    fn metrics(&mut self) -> Result<Map<String, Value>, ApiError> {
        let mut m = Map::new();
        if let Some(vm) = &self.vm {
            let s = vm.stats();
            m.insert(
                "vessel_vm".into(),
                json!({
                    "vcpus": s.vcpus,
                    "uptime_ms": s.uptime.as_millis() as u64,
                    "pauses": s.pauses,
                    "unhandled_port_reads": s.unhandled_io.0,
                    "unhandled_port_writes": s.unhandled_io.1,
                    "unhandled_mmio_reads": s.unhandled_mmio.0,
                    "unhandled_mmio_writes": s.unhandled_mmio.1,
                }),
            );
            m.insert(
                "uart".into(),
                json!({"rate_limiter_dropped_bytes": s.serial_dropped_bytes}),
            );
            self.pmem.metrics(&mut m);
            super::devmetrics::block_metrics(&self.drives, &mut m);
            if let Some(b) = &self.balloon {
                b.metrics(&mut m);
            }
        }
        Ok(m)
    }

    fn configure_serial(&mut self, serial: &SerialDevice) -> Result<(), ApiError> {
        if let Some(path) = &serial.serial_out_path {
            self.base.serial = SerialTarget::File(PathBuf::from(path));
        }
        self.base.serial_limit = serial.rate_limiter.as_ref().map(bucket_config);
        Ok(())
    }

    fn configure_logger(&mut self, logger: &Logger) -> Result<(), ApiError> {
        match &mut self.logger {
            Some(hook) => hook(logger),
            None => Ok(()),
        }
    }

    fn hotplug_drive(&mut self, drive: &Drive) -> Result<(), ApiError> {
        self.plug_drive(drive)
    }

    fn hotplug_network_interface(&mut self, iface: &NetworkInterface) -> Result<(), ApiError> {
        self.plug_network_interface(iface)
    }

    fn hotplug_pmem(&mut self, pmem: &Pmem) -> Result<(), ApiError> {
        self.plug_pmem(pmem)
    }

    fn unplug(&mut self, device: &PluggedDevice) -> Result<(), ApiError> {
        self.unplug_device(device)
    }

    fn update_drive(&mut self, u: &PartialDrive) -> Result<(), ApiError> {
        self.running()?;
        self.patch_drive(u)?;
        // Snapshots and migrations carry the file and the limits the device has now.
        if let Some((_, disk)) = self.drives.iter().find(|(id, _)| *id == u.drive_id) {
            self.record_limiters(PluggedRef::Disk(disk));
        }
        if let Some(c) = &mut self.api_config {
            c.drives
                .iter_mut()
                .filter(|d| d.drive_id == u.drive_id)
                .for_each(|d| u.apply_to(d));
        }
        Ok(())
    }

    fn update_network_interface(&mut self, u: &PartialNetworkInterface) -> Result<(), ApiError> {
        self.running()?;
        self.patch_network_interface(u)?;
        if let Some((_, net)) = self.nets.iter().find(|(id, _)| *id == u.iface_id) {
            self.record_limiters(PluggedRef::Net(net));
        }
        if let Some(c) = &mut self.api_config {
            c.network_interfaces
                .iter_mut()
                .filter(|n| n.iface_id == u.iface_id)
                .for_each(|n| u.apply_to(n));
        }
        Ok(())
    }

    fn update_pmem(&mut self, u: &PartialPmem) -> Result<(), ApiError> {
        self.running()?;
        self.pmem.update(u)?;
        if let Some(h) = self.pmem.handle(&u.id) {
            self.record_limiters(PluggedRef::Pmem(h));
        }
        if let Some(c) = &mut self.api_config {
            c.pmem
                .iter_mut()
                .filter(|p| p.id == u.id)
                .for_each(|p| u.apply_to(p));
        }
        Ok(())
    }

    fn balloon_config(&mut self) -> Result<ApiBalloon, ApiError> {
        let b = self.running_balloon()?;
        Ok(ApiBalloon {
            amount_mib: b.handle.target_pages() / BALLOON_PAGES_PER_MIB,
            stats_polling_interval_s: b.interval_s.load(Ordering::Relaxed),
            ..b.config
        })
    }

    fn balloon_update(&mut self, amount_mib: u32) -> Result<(), ApiError> {
        self.running_balloon()?
            .handle
            .set_target_mib(u64::from(amount_mib));
        Ok(())
    }

    fn balloon_stats_interval(&mut self, seconds: u16) -> Result<(), ApiError> {
        let b = self.running_balloon()?;
        if b.interval_s.load(Ordering::Relaxed) == 0 || seconds == 0 {
            return Err(ApiError::bad(
                "Balloon update error: Cannot enable or disable the statistics after boot.",
            ));
        }
        b.interval_s.store(seconds, Ordering::Relaxed);
        Ok(())
    }

    fn balloon_stats(&mut self) -> Result<ApiBalloonStats, ApiError> {
        let b = self.running_balloon()?;
        if b.interval_s.load(Ordering::Relaxed) == 0 {
            return Err(ApiError::bad(
                "Balloon update error: Statistics for the balloon device are not enabled",
            ));
        }
        Ok(balloon_stats(&b.handle))
    }

    fn balloon_hinting_start(&mut self, cmd: BalloonStartCmd) -> Result<(), ApiError> {
        let h = &self.running_balloon()?.handle;
        h.start_hinting(cmd.acknowledge_on_stop)
            .map_err(hinting_error)
    }

    fn balloon_hinting_status(&mut self) -> Result<BalloonHintingStatus, ApiError> {
        let s = self
            .running_balloon()?
            .handle
            .hinting_status()
            .map_err(hinting_error)?;
        Ok(BalloonHintingStatus {
            host_cmd: s.host_cmd,
            guest_cmd: s.guest_cmd,
        })
    }

    fn balloon_hinting_stop(&mut self) -> Result<(), ApiError> {
        let h = &self.running_balloon()?.handle;
        h.stop_hinting().map_err(hinting_error)
    }

    fn memory_hotplug_status(&mut self) -> Result<MemoryHotplugStatus, ApiError> {
        Ok(super::memhp::status(self.running_memory_hotplug()?))
    }

    fn memory_hotplug_update(&mut self, requested_size_mib: u64) -> Result<(), ApiError> {
        super::memhp::update(self.running_memory_hotplug()?, requested_size_mib)
    }
}

/// The network interfaces' ids with their devices' handles (the devices are in the
/// resources' order).
/// The file-backed drives' handles by id: `resources_to_config` keeps their order (vhost-user
/// ones have no handle: their backend owns them).
fn drive_handles(resources: &VmResources, handles: &DeviceHandles) -> Vec<(String, BlockHandle)> {
    resources
        .drives
        .iter()
        .filter(|d| d.socket.is_none())
        .map(|d| d.drive_id.clone())
        .zip(handles.blocks.iter().cloned())
        .collect()
}

fn net_handles(resources: &VmResources, handles: &DeviceHandles) -> Vec<(String, NetHandle)> {
    resources
        .network_interfaces
        .iter()
        .map(|n| n.iface_id.clone())
        .zip(handles.nets.iter().cloned())
        .collect()
}

impl ApiBackend {
    /// `PUT /snapshot/load` once it is known that no VM runs.
    fn restore(&mut self, p: &SnapshotLoadParams) -> Result<VmResources, ApiError> {
        let load_err =
            |e: &dyn std::fmt::Display| ApiError::bad(format!("Load snapshot error: {e}"));
        let memory = match (&p.mem_file_path, &p.mem_backend) {
            (Some(f), _) => PathBuf::from(f),
            (None, Some(b)) if b.backend_type == MemoryBackendType::File => {
                PathBuf::from(&b.backend_path)
            }
            (None, Some(_)) => {
                return Err(ApiError::Unsupported("userfaultfd memory backends".into()))
            }
            (None, None) => return Err(load_err(&"no memory file")),
        };
        if matches!(p.huge_pages, Some(RestoreHugePages::Huge2M)) {
            return Err(ApiError::Unsupported("huge page backed memory".into()));
        }
        let snap = load_state::<FullVmConfig>(Path::new(&p.snapshot_path))
            .map_err(|e| load_err(&ErrorChain(&e)))?;
        let mut resources = snap
            .api
            .clone()
            .map(VmResources::recorded)
            .unwrap_or_default();
        // A memfd disk (a `vessel run --cloud-init` seed) was a descriptor of the process
        // that took the snapshot: here the same path names another file, or none.
        if let Some(d) = snap
            .config
            .devices
            .disks
            .iter()
            .find(|d| is_process_local(&d.path))
        {
            return Err(load_err(&format!(
                "the snapshot has a disk in the memory of the process that took it ({}, e.g. a cloud-init seed), which cannot be restored",
                d.path.display()
            )));
        }
        let mut config = snap.config.clone();
        config.serial = self.base.serial.clone();
        config.serial_limit = self.base.serial_limit;
        config.track_dirty_pages = p.track_dirty_pages || p.enable_diff_snapshots;
        resources.machine_config.track_dirty_pages = config.track_dirty_pages;
        apply_overrides(p, &mut config, &mut resources)?;
        let vm = restore_with(&snap, &config, &memory).map_err(|e| load_err(&ErrorChain(&e)))?;
        let vm = if p.resume_vm { vm } else { vm.paused() };
        let nets = net_handles(&resources, &vm.device_handles());
        let drives = drive_handles(&resources, &vm.device_handles());
        let pmem = super::pmem::PmemDevices::new(&resources, &vm.device_handles().pmem);
        pmem.set_limiters(&resources);
        let memory_hotplug = vm.device_handles().memory_hotplug;
        let balloon = vm.device_handles().balloon.zip(resources.balloon);
        self.api_config = Some(resources.to_full_vm_config());
        self.start_supervised(vm)?;
        self.nets = nets;
        self.drives = drives;
        self.pmem = pmem;
        self.memory_hotplug = memory_hotplug;
        self.attach_balloon(balloon)?;
        Ok(resources)
    }

    /// A post-boot drive update: a new backing file, then the rate limiter (on error
    /// nothing changed).
    fn patch_drive(&self, u: &PartialDrive) -> Result<(), ApiError> {
        if u.path_on_host.is_none() && u.rate_limiter.is_none() {
            return Ok(());
        }
        let Some((_, disk)) = self.drives.iter().find(|(id, _)| *id == u.drive_id) else {
            return Err(ApiError::bad(format!(
                "Drive config error: Unable to patch the block device: drive {} not found.",
                u.drive_id
            )));
        };
        if let Some(path) = &u.path_on_host {
            let fail = |e: &(dyn std::error::Error + 'static)| {
                ApiError::bad(format!(
                    "Drive config error: Unable to patch the block device: {}",
                    ErrorChain(e)
                ))
            };
            // Through the VM when there is one: it records the file for snapshots.
            let path = Path::new(path);
            let sectors = match &self.vm {
                Some(vm) => vm.replace_disk_file(disk, path).map_err(|e| fail(&e))?,
                None => disk.replace_backing_file(path).map_err(|e| fail(&e))?,
            };
            log::info!(
                "drive {}: now backed by {} ({sectors} sectors)",
                u.drive_id,
                path.display()
            );
        }
        if u.rate_limiter.is_some() {
            update_limiter(disk.rate_limiter(), &u.rate_limiter);
            log::info!(
                "drive {}: rate limiter now {:?}",
                u.drive_id,
                disk.rate_limiter().config()
            );
        }
        Ok(())
    }

    /// A post-boot network interface update: its rate limiters.
    fn patch_network_interface(&self, u: &PartialNetworkInterface) -> Result<(), ApiError> {
        let Some((_, net)) = self.nets.iter().find(|(id, _)| *id == u.iface_id) else {
            return Err(ApiError::bad(format!(
                "Network interface error: Invalid interface ID - not found: {}",
                u.iface_id
            )));
        };
        update_limiter(&net.rx, &u.rx_rate_limiter);
        update_limiter(&net.tx, &u.tx_rate_limiter);
        log::info!(
            "network interface {}: rate limiters now rx {:?}, tx {:?}",
            u.iface_id,
            net.rx.config(),
            net.tx.config()
        );
        Ok(())
    }

    /// Snapshots and migration carry disks by path, and the seed's path is a descriptor of
    /// this process: refused, rather than restored onto whatever that path names elsewhere.
    fn refuse_seed(&self, what: &str) -> Result<(), ApiError> {
        if self.seed.is_some() {
            return Err(ApiError::bad(format!(
                "{what}: the microVM has a cloud-init seed disk (PUT /vessel/cloud-init), which snapshots and migration do not carry."
            )));
        }
        Ok(())
    }

    fn running_memory_hotplug(&self) -> Result<&MemHandle, ApiError> {
        self.running()?;
        self.memory_hotplug.as_ref().ok_or_else(|| {
            ApiError::bad(
                "Memory hotplug update error: Failed perform action on device: Device not found",
            )
        })
    }

    fn running_balloon(&self) -> Result<&BalloonState, ApiError> {
        self.running()?;
        self.balloon
            .as_ref()
            .ok_or_else(|| ApiError::bad("Balloon config error: No balloon device found."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fc::config::resources_to_config;
    use crate::fc::config::tests::with_kernel;
    use serde_json::json;
    use vessel_api::types::{HugePages, NetworkInterface};
    use vessel_ratelimit::{BucketConfig, RateLimiter, RateLimiterConfig};

    #[test]
    fn rate_limiters_map_at_start_and_patches_reach_the_devices() {
        use vessel_virtio_devices::block::{Block, BlockEngine, BlockParams};
        let (kernel, mut r) = with_kernel("kernel-rl");
        r.set_drive(
            serde_json::from_value(json!({
                "drive_id": "d", "path_on_host": kernel, "is_root_device": false, "is_read_only": true,
                "rate_limiter": {"ops": {"size": 100, "one_time_burst": 7, "refill_time": 1000}}
            }))
            .unwrap(),
        )
        .unwrap();
        r.set_network_interface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: serde_json::from_value(
                json!({"bandwidth": {"size": 0, "refill_time": 0}}),
            )
            .unwrap(),
        })
        .unwrap();
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        let ops = BucketConfig {
            size: 100,
            one_time_burst: 7,
            refill_time_ms: 1000,
        };
        assert_eq!(
            c.devices.disks[0].rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(ops)
            })
        );
        // A limiter that limits nothing is no limiter.
        assert_eq!(c.devices.nets[0].tx_rate_limiter, None);
        assert_eq!(c.devices.nets[0].rx_rate_limiter, None);

        // Post-boot PATCHes go to the running devices' limiters.
        let img = std::env::temp_dir().join(format!("vessel-api-rl-{}.img", std::process::id()));
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let dev = Block::new(BlockParams {
            format: None,
            path: img.clone(),
            read_only: true,
            serial: None,
            engine: BlockEngine::Sync,
        })
        .unwrap();
        let net = NetHandle {
            rx: RateLimiter::unlimited().unwrap(),
            tx: RateLimiter::unlimited().unwrap(),
        };
        let mut b = ApiBackend::new(VmConfig::default()).unwrap();
        b.drives.push(("d".into(), dev.handle()));
        b.nets.push(("eth0".into(), net.clone()));
        let drive = |v: Value| -> PartialDrive { serde_json::from_value(v).unwrap() };
        let iface = |v: Value| -> PartialNetworkInterface { serde_json::from_value(v).unwrap() };
        let both = drive(json!({"drive_id": "d", "rate_limiter": {
            "bandwidth": {"size": 1000, "refill_time": 100},
            "ops": {"size": 100, "one_time_burst": 7, "refill_time": 1000}
        }}));
        // Without a running VM the trait refuses.
        assert_eq!(b.update_drive(&both), Err(ApiError::NotSupportedPreBoot));
        b.patch_drive(&both).unwrap();
        let l = dev.rate_limiter();
        let bw = BucketConfig {
            size: 1000,
            one_time_burst: 0,
            refill_time_ms: 100,
        };
        assert_eq!(
            l.config(),
            RateLimiterConfig {
                bandwidth: Some(bw),
                ops: Some(ops)
            }
        );
        assert!(l.try_consume(1, 1000));
        assert!(
            !l.try_consume(1, 1000),
            "the device's limiter enforces the patch"
        );
        // A bucket left out stays; size 0 removes one.
        b.patch_drive(&drive(
            json!({"drive_id": "d", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}),
        ))
        .unwrap();
        assert_eq!(
            l.config(),
            RateLimiterConfig {
                bandwidth: Some(bw),
                ops: None
            }
        );
        assert!(b
            .patch_drive(&drive(json!({"drive_id": "nope", "rate_limiter": {}})))
            .is_err());
        b.patch_network_interface(&iface(json!({
            "iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 5, "refill_time": 10}}
        })))
        .unwrap();
        assert_eq!(net.rx.config(), RateLimiterConfig::default());
        assert_eq!(
            net.tx.config().ops,
            Some(BucketConfig {
                size: 5,
                one_time_burst: 0,
                refill_time_ms: 10
            })
        );
        assert!(b
            .patch_network_interface(&iface(json!({"iface_id": "eth9"})))
            .is_err());
        let _ = std::fs::remove_file(img);
        let _ = std::fs::remove_file(kernel);
    }

    #[test]
    fn start_without_kernel_and_unsupported_features_are_refused() {
        let mut b = ApiBackend::new(VmConfig::default()).unwrap();
        let r = VmResources::default();
        assert!(matches!(b.start(&r), Err(ApiError::BadRequest(_))));
        let mut r = VmResources::default();
        r.machine_config.huge_pages = HugePages::Huge2M;
        assert!(matches!(b.validate(&r), Err(ApiError::Unsupported(_))));
        let mut r = VmResources::default();
        r.set_entropy(
            serde_json::from_value(json!({"rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(b.validate(&r), Ok(()), "a limiter that limits nothing");
        r.set_entropy(
            serde_json::from_value(json!({"rate_limiter": {"ops": {"size": 1, "refill_time": 9}}}))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            b.validate(&r),
            Ok(()),
            "entropy rate limiters are supported"
        );
        let mut r = VmResources::default();
        r.set_balloon(
            serde_json::from_value(json!({"amount_mib": 1, "deflate_on_oom": false,
                "free_page_hinting": true, "free_page_reporting": true}))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(b.validate(&r), Ok(()), "free page hinting and reporting");
        // Nothing started: control calls are pre-boot errors.
        assert_eq!(b.pause(), Err(ApiError::NotSupportedPreBoot));
        assert_eq!(b.stop(), Err(ApiError::NotSupportedPreBoot));
        assert_eq!(b.balloon_update(1), Err(ApiError::NotSupportedPreBoot));
        assert_eq!(
            b.balloon_hinting_start(Default::default()),
            Err(ApiError::NotSupportedPreBoot)
        );
        assert!(b.take_outcome().is_none());
        assert!(b.metrics().unwrap().is_empty());
    }

    #[test]
    fn a_seed_is_vetted_when_configured_and_keeps_snapshots_and_migration_away() {
        let mut b = ApiBackend::new(VmConfig::default()).unwrap();
        let mut r = VmResources::default();
        r.set_cloud_init(serde_json::from_value(json!({"user_data": "hello"})).unwrap())
            .unwrap();
        let e = b.validate(&r).unwrap_err();
        assert!(
            e.to_string()
                .contains("the user-data starts with \"hello\""),
            "{e}"
        );
        r.set_cloud_init(serde_json::from_value(json!({"user_data": "#cloud-config\n"})).unwrap())
            .unwrap();
        assert_eq!(b.validate(&r), Ok(()));
        // A VM holding a seed is neither snapshotted nor migrated.
        b.seed = Some(MemFile::new(c"vessel-test-seed", b"seed").unwrap());
        let snap: SnapshotCreateParams =
            serde_json::from_value(json!({"snapshot_path": "/s", "mem_file_path": "/m"})).unwrap();
        let e = b.snapshot_create(&snap).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Create snapshot error: the microVM has a cloud-init seed"),
            "{e}"
        );
        let e = b
            .migrate(&MigrateParams {
                destination: "unix:/nonexistent".into(),
                downtime_ms: None,
                max_rounds: None,
            })
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Migration error: the microVM has a cloud-init seed"),
            "{e}"
        );
    }
}
