//! Snapshots of a whole VM: what a state file holds ([`VmSnapshot`]), taking one from a
//! paused VM ([`crate::VmHandle::snapshot`]) and building a VM back from one ([`restore`]).
//!
//! A snapshot is two files: the state (vCPUs, KVM's irqchips/PIT/clock, the legacy devices,
//! every virtio device with its queue positions, and the VM's configuration, in
//! `vessel-snapshot`'s versioned, checksummed format) and the guest memory. Memory is written
//! first and the state file last, atomically, so a state file never names memory that is not
//! all there.
//!
//! A diff snapshot writes only the pages dirtied since the previous snapshot: KVM's dirty log
//! for the guest's own writes. It needs `track_dirty_pages`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vessel_kvm::snapshot::{msr_candidates, VcpuState, VmKvmState};
use vessel_memory::GuestMemoryMmap;
use vessel_snapshot::dirty::{DirtyBitmap, MemRegion};
use vessel_snapshot::memory::{self, WriteStats};
use vessel_snapshot::{read_state, write_state, SnapshotError};

use crate::config::{SerialTarget, VmConfig};
use crate::devices::{LegacyDevices, LegacyState};
use crate::error::VmmError;
use crate::vcpu::PauseGate;
use crate::virtio::{VirtioDeviceState, VirtioManager};
use crate::vm::Vm;
use crate::vmgenid::VmGenIdState;

/// What identifies a Vessel VM state file's payload.
pub const STATE_KIND: &str = "vessel-vm";
/// How long the vCPUs get to report their state.
const VCPU_STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything of a VM but its memory.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`STATE_KIND`].
    pub kind: String,
    /// The Vessel version that wrote it.
    pub vessel_version: String,
    /// The VM's configuration: the restored VM gets the same devices.
    pub config: VmConfig,
    /// Whether the nested-host fallback was on (it stays on).
    pub nested: bool,
    /// The guest memory regions, in memory-file order.
    pub memory: Vec<MemRegion>,
    pub vcpus: Vec<VcpuState>,
    pub kvm: VmKvmState,
    pub legacy: LegacyState,
    /// Virtio devices, in creation order.
    #[serde(default)]
    pub virtio: serde_json::Value,
    /// What the management API keeps about the VM (its resources), opaque here.
    #[serde(default)]
    pub api: Option<serde_json::Value>,
    /// The VM generation ID device (absent in files older than it, whose guests have none).
    #[serde(default)]
    pub vmgenid: Option<VmGenIdState>,
}

/// A full snapshot or the pages dirtied since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// Where to put a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub state: PathBuf,
    pub memory: PathBuf,
    pub kind: SnapshotKind,
    /// Stored as [`VmSnapshot::api`].
    pub api: Option<serde_json::Value>,
}

/// What taking a snapshot did, and how long each part took.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub kind: SnapshotKind,
    pub memory: WriteStats,
    /// Pages written by a diff snapshot.
    pub dirty_pages: Option<u64>,
    pub devices_time: Duration,
    pub memory_time: Duration,
    pub total: Duration,
}

/// Why a snapshot was not taken. The VM is left as it was (paused).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailure {
    #[error("the VM must be paused")]
    NotPaused,
    #[error("the VM has ended")]
    Ended,
    #[error("diff snapshots need dirty page tracking (track_dirty_pages)")]
    NoDirtyTracking,
    #[error("{0}")]
    File(#[from] SnapshotError),
    #[error("{0}")]
    State(String),
}

/// What the running VM shares with [`crate::VmHandle::snapshot`].
pub(crate) struct Parts {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub devices: Arc<LegacyDevices>,
    pub virtio: Arc<Mutex<VirtioManager>>,
    pub config: VmConfig,
    pub nested: bool,
    pub vmgenid: Option<VmGenIdState>,
    /// One snapshot at a time.
    pub lock: Mutex<()>,
    /// The virtio devices were quiesced by a pause (and are resumed with the vCPUs).
    pub devices_quiesced: std::sync::atomic::AtomicBool,
}

/// KVM's dirty log since its last read, as a bitmap over `regions` (slot `i` is region `i`).
pub(crate) fn kvm_dirty_log(
    vm: &VmFd,
    regions: &[MemRegion],
) -> Result<DirtyBitmap, SnapshotFailure> {
    let mut bits = DirtyBitmap::new(regions);
    for (slot, r) in regions.iter().enumerate() {
        let words = vm
            .get_dirty_log(slot as u32, r.size as usize)
            .map_err(|e| SnapshotFailure::State(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        bits.merge_words(slot, &words);
    }
    Ok(bits)
}

/// The pages written since the last call: KVM's dirty log (the guest's writes) and guest
/// memory's own bitmaps (the devices' writes). Both are reset.
pub(crate) fn dirty_pages(parts: &Parts) -> Result<DirtyBitmap, SnapshotFailure> {
    let regions = memory::layout(&parts.mem);
    let mut d = kvm_dirty_log(&parts.vm, &regions)?;
    d.merge(&memory::take_vmm_dirty(&parts.mem));
    Ok(d)
}

/// Brings every virtio device to a consistent stop (see `VirtioManager::quiesce_all`).
pub(crate) fn quiesce_devices(parts: &Parts) -> Result<(), SnapshotFailure> {
    let v = parts.virtio.lock().unwrap_or_else(|e| e.into_inner());
    v.quiesce_all().map_err(|e| {
        v.resume_all();
        SnapshotFailure::State(e.to_string())
    })
}

/// Lets the virtio devices run again after [`quiesce_devices`].
pub(crate) fn resume_devices(parts: &Parts) {
    parts
        .virtio
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .resume_all();
}

/// Everything of a paused VM whose devices are quiesced, but its memory.
pub(crate) fn capture(
    parts: &Parts,
    pause: &PauseGate,
    vcpus: usize,
    api: Option<serde_json::Value>,
) -> Result<VmSnapshot, SnapshotFailure> {
    let kvm = vessel_kvm::system::open().map_err(|e| SnapshotFailure::State(e.to_string()))?;
    let msrs = msr_candidates(&kvm).map_err(|e| SnapshotFailure::State(e.to_string()))?;
    let vcpu_states = pause
        .save_states(vcpus, msrs, VCPU_STATE_TIMEOUT)
        .map_err(SnapshotFailure::State)?;
    let kvm_state =
        VmKvmState::save(&parts.vm).map_err(|e| SnapshotFailure::State(e.to_string()))?;
    let virtio = parts
        .virtio
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .save_all()
        .map_err(|e| SnapshotFailure::State(e.to_string()))?;
    Ok(VmSnapshot {
        kind: STATE_KIND.into(),
        vessel_version: env!("CARGO_PKG_VERSION").into(),
        config: parts.config.clone(),
        nested: parts.nested,
        memory: memory::layout(&parts.mem),
        vcpus: vcpu_states,
        kvm: kvm_state,
        legacy: parts.devices.save_state(),
        virtio: serde_json::to_value(virtio).map_err(|e| SnapshotFailure::State(e.to_string()))?,
        api,
        vmgenid: parts.vmgenid,
    })
}

/// Takes a snapshot of a paused VM (every vCPU parked on `pause`).
pub(crate) fn take(
    parts: &Parts,
    pause: &PauseGate,
    vcpus: usize,
    req: &SnapshotRequest,
) -> Result<SnapshotInfo, SnapshotFailure> {
    let _one = parts.lock.lock().unwrap_or_else(|e| e.into_inner());
    if req.kind == SnapshotKind::Diff && !parts.config.track_dirty_pages {
        return Err(SnapshotFailure::NoDirtyTracking);
    }
    let t0 = Instant::now();
    // Devices a pause quiesced stay quiesced until the VM resumes.
    let by_pause = parts
        .devices_quiesced
        .load(std::sync::atomic::Ordering::Acquire);
    quiesce_devices(parts)?;
    let r = write_snapshot(parts, pause, vcpus, req, t0);
    if !by_pause {
        resume_devices(parts);
    }
    r
}

fn write_snapshot(
    parts: &Parts,
    pause: &PauseGate,
    vcpus: usize,
    req: &SnapshotRequest,
    t0: Instant,
) -> Result<SnapshotInfo, SnapshotFailure> {
    let state = capture(parts, pause, vcpus, req.api.clone())?;
    let devices_time = t0.elapsed();

    let t1 = Instant::now();
    let (stats, dirty_pages) = match req.kind {
        SnapshotKind::Full => {
            // The next diff is relative to this snapshot: drop what the logs hold.
            if parts.config.track_dirty_pages {
                kvm_dirty_log(&parts.vm, &state.memory)?;
            }
            memory::take_vmm_dirty(&parts.mem);
            // SAFETY: every vCPU is parked (save_states checked) and the device workers
            // are quiesced, so nothing writes guest memory while it is read.
            (
                unsafe { memory::write_full(&parts.mem, &req.memory) }?,
                None,
            )
        }
        SnapshotKind::Diff => {
            let dirty = dirty_pages(parts)?;
            let n = dirty.count();
            // SAFETY: as above.
            let st = unsafe { memory::write_diff(&parts.mem, &req.memory, &dirty) }?;
            (st, Some(n))
        }
    };
    let memory_time = t1.elapsed();
    write_state(&req.state, &state)?;
    Ok(SnapshotInfo {
        kind: req.kind,
        memory: stats,
        dirty_pages,
        devices_time,
        memory_time,
        total: t0.elapsed(),
    })
}

/// Reads and checks a state file.
pub fn load_state(path: &Path) -> Result<VmSnapshot, SnapshotError> {
    let s: VmSnapshot = read_state(path)?;
    if s.kind != STATE_KIND {
        return Err(SnapshotError::Mismatch(format!(
            "a '{}' state, not a Vessel VM",
            s.kind
        )));
    }
    if s.vcpus.len() != s.config.cpus as usize {
        return Err(SnapshotError::Mismatch(format!(
            "{} vCPU states for {} vCPUs",
            s.vcpus.len(),
            s.config.cpus
        )));
    }
    Ok(s)
}

/// Working-set prefetch: if `path` holds a working set, its pages are mapped before the
/// guest runs; if not, the pages the guest touches in its first `record_after` are written
/// there for the next restore.
#[derive(Debug, Clone)]
pub struct WorkingSet {
    pub path: PathBuf,
    pub record_after: Duration,
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub state: PathBuf,
    pub memory: PathBuf,
    /// Where the restored guest's console goes (the snapshot's own target otherwise).
    pub serial: Option<SerialTarget>,
    /// Turn dirty page tracking on or off for the restored VM.
    pub track_dirty_pages: Option<bool>,
    /// Prefetch (or record) the guest's working set.
    pub working_set: Option<WorkingSet>,
}

/// A VM rebuilt from a snapshot, not yet started, and the snapshot's state (its `api` part
/// is for the caller). Guest memory is the memory file mapped privately: pages load as the
/// guest touches them.
pub fn restore(req: &RestoreRequest) -> Result<(Vm, VmSnapshot), VmmError> {
    let snap = load_state(&req.state).map_err(snapshot_error)?;
    let mut config = snap.config.clone();
    if let Some(s) = &req.serial {
        config.serial = s.clone();
    }
    if let Some(t) = req.track_dirty_pages {
        config.track_dirty_pages = t;
    }
    let vm = restore_prefetched(&snap, &config, &req.memory, req.working_set.as_ref())?;
    Ok((vm, snap))
}

fn snapshot_error(e: SnapshotError) -> VmmError {
    VmmError::Device(format!("snapshot: {e}"))
}

/// Builds a VM from `snap` and the memory file `memory`, with `config` (the snapshot's
/// configuration, possibly with host-side changes: another console, TAP or vsock socket).
/// The guest-visible machine must stay the same: vCPU count, memory size and the list of
/// devices are checked against the snapshot.
pub fn restore_with(snap: &VmSnapshot, config: &VmConfig, memory: &Path) -> Result<Vm, VmmError> {
    restore_prefetched(snap, config, memory, None)
}

/// [`restore_with`], prefetching or recording the working set `ws`. The restored VM gets a
/// new VM generation ID: it is a clone, however many others run from the same files.
pub fn restore_prefetched(
    snap: &VmSnapshot,
    config: &VmConfig,
    memory: &Path,
    ws: Option<&WorkingSet>,
) -> Result<Vm, VmmError> {
    let c = &snap.config;
    let d = (&config.devices, &c.devices);
    if config.cpus != c.cpus
        || config.memory != c.memory
        || d.0.disks.len() != d.1.disks.len()
        || d.0.nets.len() != d.1.nets.len()
        || d.0.vsock.is_some() != d.1.vsock.is_some()
        || d.0.rng != d.1.rng
        || d.0.balloon.is_some() != d.1.balloon.is_some()
    {
        return Err(snapshot_error(SnapshotError::Mismatch(
            "the configuration changes the machine the snapshot was taken of".into(),
        )));
    }
    let mem = memory::map_private(&snap.memory, memory).map_err(snapshot_error)?;
    let mut record = None;
    if let Some(ws) = ws {
        match memory::load_working_set(&ws.path, &snap.memory) {
            Ok(set) => {
                // On a thread of its own: the VM is built and starts meanwhile, and the guest
                // faults in what it touches before the prefetch gets there.
                // It runs beside the guest: under the VMM's filter.
                let mem = mem.clone();
                let spawned = crate::vm::spawn_helper("prefetch", move || {
                    let n = memory::prefetch(&mem, &set);
                    log::info!("prefetched a working set of {} KiB", n >> 10);
                });
                if let Err(e) = spawned {
                    log::warn!("cannot prefetch the working set: {e}");
                }
            }
            Err(_) => record = Some(ws.clone()),
        }
    }
    let mut vm = Vm::from_snapshot(config, mem.clone(), snap)?;
    vm.new_generation()?;
    if let Some(ws) = record {
        vm.on_start(Box::new(move || {
            let spawned = std::thread::Builder::new()
                .name("working-set".into())
                .spawn(move || {
                    std::thread::sleep(ws.record_after);
                    match memory::resident_pages(&mem)
                        .and_then(|set| memory::save_working_set(&ws.path, &set).map(|_| set))
                    {
                        Ok(set) => log::info!(
                            "recorded a working set of {} pages in {}",
                            set.count(),
                            ws.path.display()
                        ),
                        Err(e) => log::warn!("cannot record the working set: {e}"),
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot record the working set: {e}");
            }
        }));
    }
    Ok(vm)
}

/// Loads vCPU `id`'s state into a new vCPU, its saved CPUID first. A state from before the
/// CPUID was saved gets it computed from `supported` (this host's), as a boot does.
pub(crate) fn restore_vcpu(
    fd: &VcpuFd,
    id: u8,
    snap: &VmSnapshot,
    supported: Option<&kvm_bindings::CpuId>,
    hide_pv: bool,
) -> Result<(), VmmError> {
    let state = snap.vcpus.get(id as usize).ok_or_else(|| VmmError::Vcpu {
        cpu: id,
        reason: "the snapshot has no state for this vCPU".into(),
    })?;
    if state.cpuid.is_none() {
        let supported = supported.ok_or_else(|| VmmError::Vcpu {
            cpu: id,
            reason: "no CPUID to restore it with".into(),
        })?;
        crate::cpu::set_cpuid(
            fd,
            id,
            snap.config.cpus as u8,
            supported,
            hide_pv,
            snap.config.cpu_template.as_ref(),
        )?;
    }
    state.restore(fd).map_err(|e| VmmError::Vcpu {
        cpu: id,
        reason: format!("restoring its state: {e}"),
    })
}

/// Loads KVM's devices and clock, the legacy devices and the virtio devices.
pub(crate) fn restore_machine(
    vm: &VmFd,
    devices: &LegacyDevices,
    virtio: &VirtioManager,
    snap: &VmSnapshot,
) -> Result<(), VmmError> {
    snap.kvm.restore(vm)?;
    devices.restore_state(&snap.legacy)?;
    let states: Vec<VirtioDeviceState> = match &snap.virtio {
        serde_json::Value::Null => Vec::new(),
        v => serde_json::from_value(v.clone())
            .map_err(|e| snapshot_error(SnapshotError::Parse(format!("virtio devices: {e}"))))?,
    };
    virtio.restore_all(&states)
}
