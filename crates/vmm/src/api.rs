//! The VMM side of the management API: [`ApiBackend`] implements `vessel_api::VmmBackend`
//! on top of [`Vm`] and [`VmHandle`], and [`resources_to_config`] maps the API's pre-boot
//! `VmResources` (or a Firecracker `--config-file`) to a [`VmConfig`].
//!
//! The backend lives on the VMM's main thread (the API server reaches it through
//! `vessel_api::backend::channel`). `InstanceStart` builds and starts the VM and hands
//! [`RunningVm::wait`] to a thread of its own; when the VM ends, [`ApiBackend::ended_event`]
//! becomes readable and [`ApiBackend::take_outcome`] returns how it ended.
//!
//! Firecracker's devices are all virtio-mmio, so API-configured devices use the MMIO
//! transport.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use vessel_api::types::{
    Balloon as ApiBalloon, BalloonStats as ApiBalloonStats, BootSource as ApiBootSource,
    CpuTemplate, HugePages, Logger, MemoryBackendType, MigrateParams, MmdsVersion, PartialDrive,
    PartialNetworkInterface, RateLimiter as ApiRateLimiter, RestoreHugePages, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType, TokenBucket as ApiTokenBucket, DEFAULT_MMDS_ADDR,
};
use vessel_api::{ApiError, VmResources, VmmBackend};
use vessel_ratelimit::{BucketConfig, BucketUpdate, RateLimiter, RateLimiterConfig};
use vessel_virtio_devices::balloon::{stat_tag, BalloonHandle, PAGE_SIZE as BALLOON_PAGE};
use vessel_virtio_devices::block::BlockHandle;
use vessel_virtio_devices::net::NetHandle;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BootSource, VmConfig, DEFAULT_CMDLINE};
use crate::device_config::{
    BalloonConfig, DeviceConfigs, DiskConfig, NetConfig, Transport, VsockConfig,
};
use crate::error::VmmError;
use crate::migration::{MigrateOptions, MigrationUrl};
use crate::snapshot::{SnapshotKind, SnapshotRequest};
use crate::vm::{ControlError, RunState, RunningVm, Vm, VmHandle, VmOutcome};

/// The virtio-blk serial (device id) is at most 20 bytes.
const BLK_SERIAL_MAX: usize = 20;

/// The kernel command line for `boot`: `boot_args`, or Vessel's default, plus the root
/// device parameters Firecracker adds for a root drive (`root=/dev/vda` or
/// `root=PARTUUID=...`, then `ro` or `rw`).
pub fn kernel_cmdline(resources: &VmResources, boot: &ApiBootSource) -> String {
    let mut s = boot
        .boot_args
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if let Some(root) = resources.drives.iter().find(|d| d.is_root_device) {
        let dev = match &root.partuuid {
            Some(u) => format!("PARTUUID={u}"),
            // The root drive is placed first, so it is the first virtio-blk disk.
            None => "/dev/vda".to_string(),
        };
        let mode = if root.is_read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        s += &format!(" root={dev} {mode}");
    }
    s
}

/// Maps API resources to a VM configuration. `base` supplies what the API does not
/// describe (console, nested mode, profiling, boot timer); every device is placed on
/// virtio-mmio.
pub fn resources_to_config(r: &VmResources, base: &VmConfig) -> Result<VmConfig, ApiError> {
    resources_to_config_on(r, base, Transport::Mmio)
}

/// [`resources_to_config`] with every device on `transport` (`--enable-pci`: PCI).
pub fn resources_to_config_on(
    r: &VmResources,
    base: &VmConfig,
    transport: Transport,
) -> Result<VmConfig, ApiError> {
    let Some(boot) = &r.boot_source else {
        return Err(ApiError::bad(
            "Start microvm error: Missing kernel configuration.",
        ));
    };
    let mut disks = Vec::with_capacity(r.drives.len());
    for d in &r.drives {
        let Some(path) = &d.path_on_host else {
            return Err(ApiError::bad(format!(
                "Drive config error: drive {} has no `path_on_host`.",
                d.drive_id
            )));
        };
        disks.push(DiskConfig {
            path: PathBuf::from(path),
            read_only: d.is_read_only.unwrap_or(false),
            // Firecracker answers VIRTIO_BLK_T_GET_ID with the drive id.
            serial: (d.drive_id.len() <= BLK_SERIAL_MAX).then(|| d.drive_id.clone()),
            transport,
            rate_limiter: limiter_config(&d.rate_limiter),
        });
    }
    let mmds = mmds(r);
    let mut nets = Vec::with_capacity(r.network_interfaces.len());
    for n in &r.network_interfaces {
        let mac = match &n.guest_mac {
            Some(m) => Some(vessel_api::resources::parse_mac(m).ok_or_else(|| {
                ApiError::bad(format!(
                    "Network interface config error: invalid MAC address {m}"
                ))
            })?),
            None => None,
        };
        nets.push(NetConfig {
            tap: n.host_dev_name.clone(),
            mac,
            queue_pairs: 1,
            transport,
            rx_rate_limiter: limiter_config(&n.rx_rate_limiter),
            tx_rate_limiter: limiter_config(&n.tx_rate_limiter),
            mmds: mmds
                .as_ref()
                .filter(|(_, ifaces)| ifaces.contains(&n.iface_id))
                .map(|(m, _)| m.clone()),
        });
    }
    let vsock = r.vsock.as_ref().map(|v| VsockConfig {
        cid: u64::from(v.guest_cid),
        uds: PathBuf::from(&v.uds_path),
        transport,
    });
    let balloon = r.balloon.as_ref().map(|b| BalloonConfig {
        size_mib: u64::from(b.amount_mib),
        stats: b.stats_polling_interval_s > 0,
        deflate_on_oom: b.deflate_on_oom,
        transport,
    });
    let m = &r.machine_config;
    Ok(VmConfig {
        boot: BootSource::Linux {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            system_map: None,
        },
        cmdline: Some(kernel_cmdline(r, boot)),
        append: base.append.clone(),
        cpus: u32::from(m.vcpu_count),
        memory: (m.mem_size_mib as u64) << 20,
        serial: base.serial.clone(),
        nested: base.nested,
        profile_ms: base.profile_ms,
        devices: DeviceConfigs {
            disks,
            nets,
            vsock,
            rng: r.entropy.map(|_| transport),
            balloon,
        },
        track_dirty_pages: m.track_dirty_pages,
        boot_timer: base.boot_timer,
        cpu_template: r
            .cpu_config
            .as_ref()
            .map(crate::cpu_config::from_api)
            .transpose()?,
    })
}

/// The VM's MMDS (reading the API's store, so the guest sees later `PUT`/`PATCH /mmds`) and
/// the interfaces that reach it, when `mmds_config` is set.
fn mmds(r: &VmResources) -> Option<(vessel_mmds::Mmds, &[String])> {
    let c = r.mmds_config.as_ref()?;
    let options = vessel_mmds::MmdsOptions {
        version: match c.version {
            MmdsVersion::V1 => vessel_mmds::Version::V1,
            MmdsVersion::V2 => vessel_mmds::Version::V2,
        },
        imds_compat: c.imds_compat,
        ipv4: c.ipv4_address.unwrap_or(DEFAULT_MMDS_ADDR),
    };
    Some((
        vessel_mmds::Mmds::new(r.mmds.shared(), options),
        &c.network_interfaces,
    ))
}

/// What Vessel cannot do yet among what the API accepts: refused when configured, with the
/// spec's 400, rather than at `InstanceStart`.
fn unsupported(r: &VmResources) -> Result<(), ApiError> {
    let m = &r.machine_config;
    if m.cpu_template.is_some_and(|t| t != CpuTemplate::None) {
        return Err(ApiError::Unsupported("static CPU templates".into()));
    }
    if m.huge_pages != HugePages::None {
        return Err(ApiError::Unsupported("huge page backed memory".into()));
    }
    if r.entropy
        .is_some_and(|e| limiter_config(&e.rate_limiter).is_some())
    {
        return Err(ApiError::Unsupported("entropy device rate limiters".into()));
    }
    if r.balloon
        .is_some_and(|b| b.free_page_hinting || b.free_page_reporting)
    {
        return Err(ApiError::Unsupported(
            "balloon free page hinting and reporting".into(),
        ));
    }
    Ok(())
}

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
    logger: Option<LoggerHook>,
    /// The resources the VM was started (or restored) with, as `GET /vm/config` shows them:
    /// stored in snapshots so that a restoring VMM serves them again.
    api_config: Option<Value>,
    /// The started VM's balloon, if it has one.
    balloon: Option<BalloonState>,
    /// The started VM's disks, with their drive ids, in device order.
    drives: Vec<(String, BlockHandle)>,
    /// The started VM's network interfaces, with their ids, in device order.
    nets: Vec<(String, NetHandle)>,
    /// Where the devices go (virtio-mmio unless `--enable-pci`).
    transport: Transport,
}

/// A running balloon: its handle, how it was configured, and the statistics polling interval
/// its poller thread reads.
struct BalloonState {
    handle: BalloonHandle,
    config: ApiBalloon,
    interval_s: Arc<AtomicU16>,
}

/// Balloon pages per MiB.
const BALLOON_PAGES_PER_MIB: u32 = (1 << 20) / BALLOON_PAGE as u32;

/// Asks the balloon driver for fresh statistics every `interval_s` seconds (read again each
/// round, so `PATCH /balloon/statistics` takes effect at once) until the VM ends.
fn poll_balloon_stats(vm: VmHandle, balloon: BalloonHandle, interval_s: Arc<AtomicU16>) {
    let mut last = Instant::now();
    while vm.state() != RunState::Ended {
        thread::sleep(Duration::from_millis(100));
        let every = Duration::from_secs(u64::from(interval_s.load(Ordering::Relaxed)));
        if !every.is_zero() && last.elapsed() >= every {
            balloon.request_stats();
            last = Instant::now();
        }
    }
}

/// The API's view of the balloon's figures.
fn balloon_stats(h: &BalloonHandle) -> ApiBalloonStats {
    let (target, actual) = (h.target_pages(), h.actual_pages());
    let mut s = ApiBalloonStats {
        target_pages: target,
        actual_pages: actual,
        target_mib: target / BALLOON_PAGES_PER_MIB,
        actual_mib: actual / BALLOON_PAGES_PER_MIB,
        ..Default::default()
    };
    for (tag, value) in h.latest_stats().map(|l| l.entries).unwrap_or_default() {
        let slot = match tag {
            stat_tag::SWAP_IN => &mut s.swap_in,
            stat_tag::SWAP_OUT => &mut s.swap_out,
            stat_tag::MAJFLT => &mut s.major_faults,
            stat_tag::MINFLT => &mut s.minor_faults,
            stat_tag::MEMFREE => &mut s.free_memory,
            stat_tag::MEMTOT => &mut s.total_memory,
            stat_tag::AVAIL => &mut s.available_memory,
            stat_tag::CACHES => &mut s.disk_caches,
            stat_tag::HTLB_PGALLOC => &mut s.hugetlb_allocations,
            stat_tag::HTLB_PGFAIL => &mut s.hugetlb_failures,
            stat_tag::OOM_KILLS => &mut s.oom_kill,
            stat_tag::ALLOC_STALL => &mut s.alloc_stall,
            stat_tag::ASYNC_SCAN => &mut s.async_scan,
            stat_tag::DIRECT_SCAN => &mut s.direct_scan,
            stat_tag::ASYNC_RECLAIM => &mut s.async_reclaim,
            stat_tag::DIRECT_RECLAIM => &mut s.direct_reclaim,
            _ => continue,
        };
        *slot = Some(value);
    }
    s
}

fn bucket_config(b: &ApiTokenBucket) -> BucketConfig {
    BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    }
}

/// An API rate limiter as the device configuration stores it (`None` when it limits
/// nothing).
fn limiter_config(r: &Option<ApiRateLimiter>) -> Option<RateLimiterConfig> {
    let c = r.map(|r| RateLimiterConfig {
        bandwidth: r.bandwidth.as_ref().map(bucket_config),
        ops: r.ops.as_ref().map(bucket_config),
    })?;
    (!c.is_unlimited()).then_some(c)
}

/// Applies a `PATCH`'s rate limiter to a running device's: a bucket that is given replaces
/// the current one (a new, full bucket; size or refill time 0 removes the limit), one that
/// is not stays as it is.
fn update_limiter(l: &RateLimiter, u: &Option<ApiRateLimiter>) {
    if let Some(u) = u {
        l.update(
            BucketUpdate::from_patch(u.bandwidth.as_ref().map(bucket_config)),
            BucketUpdate::from_patch(u.ops.as_ref().map(bucket_config)),
        );
    }
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
            ended: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmmError::Device(format!("eventfd: {e}")))?,
            outcome: None,
            logger: None,
            api_config: None,
            balloon: None,
            drives: Vec::new(),
            nets: Vec::new(),
            transport: Transport::Mmio,
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

    /// Readable once the started VM has ended.
    pub fn ended_event(&self) -> &EventFd {
        &self.ended
    }

    /// The control handle of the started VM.
    pub fn handle(&self) -> Option<&VmHandle> {
        self.vm.as_ref()
    }

    /// How the VM ended, once it has (`None` before, and after the first call).
    pub fn take_outcome(&mut self) -> Option<Result<VmOutcome, VmmError>> {
        let r = self.outcome.as_ref()?.try_recv().ok()?;
        self.outcome = None;
        Some(r)
    }

    /// Starts `vm` and supervises it on a thread of its own until it ends. The thread exists
    /// before the vCPUs run, so a VM is never left without its supervisor.
    fn start_supervised(&mut self, vm: Vm) -> Result<(), ApiError> {
        let (vm_tx, vm_rx) = mpsc::channel::<RunningVm>();
        let (tx, rx) = mpsc::channel();
        let ended = self
            .ended
            .try_clone()
            .map_err(|e| ApiError::Internal(format!("eventfd: {e}")))?;
        // Its filter is on before the VM starts; without it, the VM does not start.
        crate::vm::spawn_helper("vm-wait", move || {
            if let Ok(running) = vm_rx.recv() {
                let _ = tx.send(running.wait());
                let _ = ended.write(1);
            }
        })
        .map_err(|e| ApiError::Internal(format!("cannot start the VM supervisor: {e}")))?;
        let running = vm
            .start()
            .map_err(|e| ApiError::bad(format!("Start microvm error: {e}")))?;
        self.vm = Some(running.handle());
        // The thread only ends after receiving; if it is somehow gone, dropping the VM here
        // stops and joins it.
        vm_tx
            .send(running)
            .map_err(|_| ApiError::Internal("the VM supervisor is gone".into()))?;
        self.outcome = Some(rx);
        Ok(())
    }

    fn running(&self) -> Result<&VmHandle, ApiError> {
        self.vm.as_ref().ok_or(ApiError::NotSupportedPreBoot)
    }
}

impl VmmBackend for ApiBackend {
    fn validate(&mut self, resources: &VmResources) -> Result<(), ApiError> {
        unsupported(resources)?;
        if let Some(c) = &resources.cpu_config {
            crate::cpu_config::check_on_host(&crate::cpu_config::from_api(c)?)?;
        }
        Ok(())
    }

    fn start(&mut self, resources: &VmResources) -> Result<(), ApiError> {
        if self.vm.is_some() {
            return Err(ApiError::NotSupportedPostBoot);
        }
        unsupported(resources)?;
        let config = resources_to_config_on(resources, &self.base, self.transport)?;
        let start_err = |e: VmmError| ApiError::bad(format!("Start microvm error: {e}"));
        let vm = Vm::build(&config).map_err(start_err)?;
        let handles = vm.device_handles();
        // `resources_to_config` keeps the drives' order.
        let drives: Vec<(String, BlockHandle)> = resources
            .drives
            .iter()
            .map(|d| d.drive_id.clone())
            .zip(handles.blocks.iter().cloned())
            .collect();
        let nets = net_handles(resources, &vm);
        let balloon = handles.balloon.clone().zip(resources.balloon);
        self.api_config = serde_json::to_value(resources.to_vm_config()).ok();
        self.start_supervised(vm)?;
        self.drives = drives;
        self.nets = nets;
        if let (Some((handle, config)), Some(vm)) = (balloon, self.vm.clone()) {
            let interval_s = Arc::new(AtomicU16::new(config.stats_polling_interval_s));
            if config.stats_polling_interval_s > 0 {
                let (h, i) = (handle.clone(), interval_s.clone());
                thread::Builder::new()
                    .name("balloon-stats".into())
                    .spawn(move || poll_balloon_stats(vm, h, i))
                    .map_err(|e| ApiError::Internal(format!("cannot start a thread: {e}")))?;
            }
            self.balloon = Some(BalloonState {
                handle,
                config,
                interval_s,
            });
        }
        Ok(())
    }

    fn migrate(&mut self, p: &MigrateParams) -> Result<Value, ApiError> {
        let fail = |e: String| ApiError::bad(format!("Migration error: {e}"));
        let url: MigrationUrl = p.destination.parse().map_err(fail)?;
        let mut opts = MigrateOptions::default();
        if let Some(ms) = p.downtime_ms {
            opts.downtime = std::time::Duration::from_millis(ms);
        }
        if let Some(r) = p.max_rounds {
            opts.max_rounds = r;
        }
        let stats = self
            .running()?
            .migrate(&url, &opts)
            .map_err(|e| fail(e.to_string()))?;
        log::info!("migrated to {}: {stats:?}", p.destination);
        serde_json::to_value(stats).map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn snapshot_create(&mut self, p: &SnapshotCreateParams) -> Result<(), ApiError> {
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
            .map_err(|e| ApiError::bad(format!("Create snapshot error: {e}")))?;
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
        let load_err = |e: String| ApiError::bad(format!("Load snapshot error: {e}"));
        let memory = match (&p.mem_file_path, &p.mem_backend) {
            (Some(f), _) => PathBuf::from(f),
            (None, Some(b)) if b.backend_type == MemoryBackendType::File => {
                PathBuf::from(&b.backend_path)
            }
            (None, Some(_)) => {
                return Err(ApiError::Unsupported("userfaultfd memory backends".into()))
            }
            (None, None) => return Err(load_err("no memory file".into())),
        };
        if matches!(p.huge_pages, Some(RestoreHugePages::Huge2M)) {
            return Err(ApiError::Unsupported("huge page backed memory".into()));
        }
        let snap = crate::snapshot::load_state(std::path::Path::new(&p.snapshot_path))
            .map_err(|e| load_err(e.to_string()))?;
        let mut resources = snap
            .api
            .as_ref()
            .and_then(|v| VmResources::from_config_json(&v.to_string(), None).ok())
            .unwrap_or_default();
        let mut config = snap.config.clone();
        config.serial = self.base.serial.clone();
        config.track_dirty_pages = p.track_dirty_pages || p.enable_diff_snapshots;
        resources.machine_config.track_dirty_pages = config.track_dirty_pages;
        apply_overrides(p, &mut config, &mut resources)?;
        let vm = crate::snapshot::restore_with(&snap, &config, &memory)
            .map_err(|e| load_err(e.to_string()))?;
        let vm = if p.resume_vm { vm } else { vm.paused() };
        let nets = net_handles(&resources, &vm);
        self.api_config = serde_json::to_value(resources.to_vm_config()).ok();
        self.start_supervised(vm)?;
        self.nets = nets;
        Ok(resources)
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
        }
        Ok(m)
    }

    fn configure_logger(&mut self, logger: &Logger) -> Result<(), ApiError> {
        match &mut self.logger {
            Some(hook) => hook(logger),
            None => Ok(()),
        }
    }

    fn update_drive(&mut self, u: &PartialDrive) -> Result<(), ApiError> {
        self.running()?;
        self.patch_drive(u)
    }

    fn update_network_interface(&mut self, u: &PartialNetworkInterface) -> Result<(), ApiError> {
        self.running()?;
        self.patch_network_interface(u)
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
}

/// The network interfaces' ids with their devices' handles (the devices are in the
/// resources' order).
fn net_handles(resources: &VmResources, vm: &Vm) -> Vec<(String, NetHandle)> {
    resources
        .network_interfaces
        .iter()
        .map(|n| n.iface_id.clone())
        .zip(vm.device_handles().nets.iter().cloned())
        .collect()
}

impl ApiBackend {
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
            let sectors = disk.replace_backing_file(Path::new(path)).map_err(|e| {
                ApiError::bad(format!(
                    "Drive config error: Unable to patch the block device: {e}"
                ))
            })?;
            log::info!(
                "drive {}: now backed by {path} ({sectors} sectors)",
                u.drive_id
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

    fn running_balloon(&self) -> Result<&BalloonState, ApiError> {
        self.running()?;
        self.balloon
            .as_ref()
            .ok_or_else(|| ApiError::bad("Balloon config error: No balloon device found."))
    }
}

/// `PUT /snapshot/load`'s host-side changes (the TAPs, the vsock socket and the guest's CID)
/// applied to the snapshot's configuration and API resources.
fn apply_overrides(
    p: &SnapshotLoadParams,
    config: &mut VmConfig,
    resources: &mut VmResources,
) -> Result<(), ApiError> {
    let load_err = |e: String| ApiError::bad(format!("Load snapshot error: {e}"));
    for o in &p.network_overrides {
        let at = resources
            .network_interfaces
            .iter()
            .position(|n| n.iface_id == o.iface_id)
            .ok_or_else(|| {
                load_err(format!(
                    "the snapshot has no network interface {}",
                    o.iface_id
                ))
            })?;
        if let Some(n) = config.devices.nets.get_mut(at) {
            n.tap = o.host_dev_name.clone();
        }
        resources.network_interfaces[at].host_dev_name = o.host_dev_name.clone();
    }
    if let Some(o) = &p.vsock_override {
        match (&mut config.devices.vsock, &mut resources.vsock) {
            (Some(v), r) => {
                v.uds = PathBuf::from(&o.uds_path);
                if let Some(cid) = o.guest_cid {
                    // The controller checked the range; the device checks it again.
                    v.cid = u64::from(cid);
                }
                if let Some(r) = r {
                    r.uds_path = o.uds_path.clone();
                    if let Some(cid) = o.guest_cid {
                        r.guest_cid = cid;
                    }
                }
            }
            (None, _) => return Err(load_err("the snapshot has no vsock device".into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_api::types::{
        Balloon, BootSource as ApiBoot, Drive, EntropyDevice, MachineConfig, NetworkInterface,
        Vsock,
    };

    fn file(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("vessel-api-map-{}-{name}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        p.display().to_string()
    }

    fn drive(id: &str, path: &str, root: bool, ro: bool) -> Drive {
        serde_json::from_value(json!({
            "drive_id": id, "path_on_host": path, "is_root_device": root, "is_read_only": ro
        }))
        .unwrap()
    }

    /// Resources booting a kernel file `name` (made here) with the default command line.
    fn with_kernel(name: &str) -> (String, VmResources) {
        let kernel = file(name);
        let mut r = VmResources::default();
        r.set_boot_source(ApiBoot {
            kernel_image_path: kernel.clone(),
            initrd_path: None,
            boot_args: None,
        })
        .unwrap();
        (kernel, r)
    }

    #[test]
    fn resources_map_to_an_mmio_vm() {
        let kernel = file("kernel");
        let disk = file("disk");
        let mut r = VmResources::default();
        r.set_boot_source(ApiBoot {
            kernel_image_path: kernel.clone(),
            initrd_path: None,
            boot_args: Some("console=ttyS0 quiet".into()),
        })
        .unwrap();
        r.set_machine_config(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            ..Default::default()
        })
        .unwrap();
        r.set_drive(drive("scratch", &disk, false, false)).unwrap();
        r.set_drive(drive("rootfs", &disk, true, true)).unwrap();
        r.set_network_interface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:ac:10:00:02".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })
        .unwrap();
        r.set_vsock(Vsock {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
            vsock_id: None,
        })
        .unwrap();
        r.set_entropy(EntropyDevice::default()).unwrap();
        r.set_balloon(Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: false,
            free_page_reporting: false,
        })
        .unwrap();
        let base = VmConfig {
            append: vec!["vessel.poweroff".into()],
            ..Default::default()
        };
        let c = resources_to_config(&r, &base).unwrap();
        assert_eq!(
            c.boot,
            BootSource::Linux {
                kernel: kernel.clone().into(),
                initrd: None,
                system_map: None
            }
        );
        // The root drive comes first, read-only, and names the root device.
        assert_eq!(
            c.cmdline.as_deref(),
            Some("console=ttyS0 quiet root=/dev/vda ro")
        );
        assert_eq!(c.append, ["vessel.poweroff"]);
        assert_eq!((c.cpus, c.memory), (2, 256 << 20));
        let d = &c.devices;
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].serial.as_deref(), Some("rootfs"));
        assert!(d.disks[0].read_only);
        assert!(!d.disks[1].read_only);
        assert_eq!(d.nets[0].tap, "tap0");
        assert_eq!(d.nets[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(d.vsock.as_ref().map(|v| v.cid), Some(3));
        assert_eq!(d.rng, Some(Transport::Mmio));
        let b = d.balloon.as_ref().unwrap();
        assert_eq!((b.size_mib, b.stats, b.deflate_on_oom), (64, true, true));
        assert!(d.disks.iter().all(|d| d.transport == Transport::Mmio));
        assert!(d.nets.iter().all(|d| d.transport == Transport::Mmio));
        let _ = std::fs::remove_file(kernel);
        let _ = std::fs::remove_file(disk);
    }

    #[test]
    fn default_cmdline_and_partuuid_root() {
        let (kernel, mut r) = with_kernel("kernel2");
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        assert_eq!(c.cmdline.as_deref(), Some(DEFAULT_CMDLINE));
        let mut d = drive("root", &kernel, true, false);
        d.partuuid = Some("1234-01".into());
        r.set_drive(d).unwrap();
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        assert_eq!(
            c.cmdline.unwrap(),
            format!("{DEFAULT_CMDLINE} root=PARTUUID=1234-01 rw")
        );
        let _ = std::fs::remove_file(kernel);
    }

    #[test]
    fn balloon_figures_in_api_units() {
        let dev = vessel_virtio_devices::balloon::Balloon::new(Default::default()).unwrap();
        let h = dev.handle();
        h.set_target_mib(12);
        let s = balloon_stats(&h);
        assert_eq!((s.target_pages, s.target_mib), (12 * 256, 12));
        assert_eq!((s.actual_pages, s.actual_mib, s.free_memory), (0, 0, None));
    }

    #[test]
    fn mmds_config_reaches_the_named_interfaces_and_shares_the_store() {
        let (kernel, mut r) = with_kernel("kernel-mmds");
        for (id, tap) in [("eth0", "tap0"), ("eth1", "tap1")] {
            r.set_network_interface(NetworkInterface {
                iface_id: id.into(),
                host_dev_name: tap.into(),
                guest_mac: None,
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .unwrap();
        }
        r.set_mmds_config(
            serde_json::from_value(json!({
                "version": "V2", "network_interfaces": ["eth1"],
                "ipv4_address": "169.254.170.2", "imds_compat": true
            }))
            .unwrap(),
        )
        .unwrap();
        let mut b = ApiBackend::new(VmConfig::default()).unwrap();
        assert_eq!(b.validate(&r), Ok(()), "MMDS is supported");
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        let nets = &c.devices.nets;
        assert!(nets[0].mmds.is_none());
        let m = nets[1].mmds.as_ref().expect("eth1 has MMDS");
        let o = m.options();
        assert_eq!(o.version, vessel_mmds::Version::V2);
        assert!(o.imds_compat);
        assert_eq!(o.ipv4, std::net::Ipv4Addr::new(169, 254, 170, 2));
        // The guest reads what the API writes after the VM was built.
        r.mmds.put(json!({"k": "v"})).unwrap();
        let req = b"GET /k HTTP/1.1\r\n\r\n";
        let vessel_mmds::Served::Response { response, .. } =
            m.serve(req, std::time::Instant::now())
        else {
            panic!("no response");
        };
        assert!(
            String::from_utf8_lossy(&response).starts_with("HTTP/1.1 401"),
            "V2"
        );
        let put = b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n";
        let vessel_mmds::Served::Response { response, .. } =
            m.serve(put, std::time::Instant::now())
        else {
            panic!("no response");
        };
        let text = String::from_utf8_lossy(&response).into_owned();
        let token = text.rsplit("\r\n\r\n").next().unwrap();
        let get = format!("GET /k HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
        let vessel_mmds::Served::Response { response, .. } =
            m.serve(get.as_bytes(), std::time::Instant::now())
        else {
            panic!("no response");
        };
        let text = String::from_utf8_lossy(&response).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nv"),
            "{text}"
        );
        let _ = std::fs::remove_file(kernel);
    }

    #[test]
    fn rate_limiters_map_at_start_and_patches_reach_the_devices() {
        use vessel_virtio_devices::block::{Block, BlockConfig, BlockEngine};
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
        let dev = Block::new(BlockConfig {
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
    fn snapshot_load_overrides_give_a_clone_its_own_vsock_socket_and_cid() {
        let (kernel, mut r) = with_kernel("kernel-clone");
        let uds =
            std::env::temp_dir().join(format!("vessel-api-clone-{}.sock", std::process::id()));
        r.set_vsock(Vsock {
            guest_cid: 3,
            uds_path: "/tmp/original.sock".into(),
            vsock_id: None,
        })
        .unwrap();
        let load = |o: Value| -> SnapshotLoadParams {
            serde_json::from_value(json!({
                "snapshot_path": "/s", "mem_file_path": "/m", "vsock_override": o
            }))
            .unwrap()
        };
        let snap_config = resources_to_config(&r, &VmConfig::default()).unwrap();

        let (mut c, mut res) = (snap_config.clone(), r.clone());
        apply_overrides(
            &load(json!({"uds_path": uds.display().to_string(), "guest_cid": 42})),
            &mut c,
            &mut res,
        )
        .unwrap();
        let v = c.devices.vsock.as_ref().unwrap();
        assert_eq!((v.cid, v.uds.as_path()), (42, uds.as_path()));
        let rv = res.vsock.as_ref().unwrap();
        assert_eq!(
            (rv.guest_cid, rv.uds_path.as_str()),
            (42, uds.to_str().unwrap())
        );
        // The device built from it reports the new CID in its configuration space.
        let (devices, _) = crate::virtio_devices::build(&c.devices).unwrap();
        let mut cid = [0u8; 8];
        devices[0].device.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 42);
        drop(devices);

        // Without guest_cid, only the socket changes.
        let (mut c, mut res) = (snap_config.clone(), r.clone());
        apply_overrides(
            &load(json!({"uds_path": "/tmp/other.sock"})),
            &mut c,
            &mut res,
        )
        .unwrap();
        assert_eq!(c.devices.vsock.as_ref().unwrap().cid, 3);
        assert_eq!(res.vsock.as_ref().unwrap().guest_cid, 3);

        // A snapshot without vsock has nothing to override.
        let (plain_kernel, plain) = with_kernel("kernel-clone-plain");
        let mut c = resources_to_config(&plain, &VmConfig::default()).unwrap();
        let mut res = plain.clone();
        let e = apply_overrides(
            &load(json!({"uds_path": "/tmp/x", "guest_cid": 5})),
            &mut c,
            &mut res,
        )
        .unwrap_err();
        assert!(format!("{e:?}").contains("no vsock device"), "{e:?}");
        let _ = std::fs::remove_file(kernel);
        let _ = std::fs::remove_file(plain_kernel);
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
        assert!(matches!(b.validate(&r), Err(ApiError::Unsupported(_))));
        // Nothing started: control calls are pre-boot errors.
        assert_eq!(b.pause(), Err(ApiError::NotSupportedPreBoot));
        assert_eq!(b.stop(), Err(ApiError::NotSupportedPreBoot));
        assert_eq!(b.balloon_update(1), Err(ApiError::NotSupportedPreBoot));
        assert!(b.take_outcome().is_none());
        assert!(b.metrics().unwrap().is_empty());
    }
}
