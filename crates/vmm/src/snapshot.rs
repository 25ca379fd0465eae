//! Snapshots of a whole VM: what a state file holds ([`VmSnapshot`]) and taking one from a
//! paused [`Machine`] ([`crate::VmHandle::snapshot`]). Building a VM back from one is
//! [`crate::restore`].
//!
//! A snapshot is two files: the state (vCPUs, KVM's irqchips/PIT/clock, the legacy devices,
//! every virtio device with its queue positions, and the VM's configuration, in
//! `vessel-snapshot`'s versioned, checksummed format) and the guest memory. Memory is written
//! first and the state file last, atomically, so a state file never names memory that is not
//! all there.
//!
//! Every part of the state is typed: each device's state type lives beside the device's
//! code. A management API may store its own typed record of the VM with it
//! ([`VmSnapshot::api`]); the core never looks inside.
//!
//! A diff snapshot writes only the pages dirtied since the previous snapshot: KVM's dirty log
//! for the guest's own writes. It needs `track_dirty_pages`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vessel_kvm::snapshot::{msr_candidates, VcpuState, VmKvmState};
use vessel_snapshot::dirty::{DirtyBitmap, MemRegion};
use vessel_snapshot::memory::{self, WriteStats};
use vessel_snapshot::{write_state, SnapshotError};

use crate::config::VmConfig;
use crate::device_manager::{DeviceError, VirtioDeviceState};
use crate::legacy::LegacyState;
use crate::machine::Machine;
use crate::vcpu::VcpuStateError;
use crate::vmgenid::VmGenIdState;

/// What identifies a Vessel VM state file's payload.
pub const STATE_KIND: &str = "vessel-vm";
/// How long the vCPUs get to report their state.
const VCPU_STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything of a VM but its memory. `A` is what a management API keeps about the VM
/// (Firecracker's full VM configuration, for the Firecracker API); [`NoApi`] where there is
/// none.
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "A: Serialize", deserialize = "A: DeserializeOwned"))]
pub struct VmSnapshot<A = NoApi> {
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
    pub virtio: Vec<VirtioDeviceState>,
    /// What the management API keeps about the VM (its resources).
    #[serde(default = "none")]
    pub api: Option<A>,
    /// The VM generation ID device (absent in files older than it, whose guests have none).
    #[serde(default)]
    pub vmgenid: Option<VmGenIdState>,
    /// A UEFI guest's variable store (its flash), when it has one.
    #[serde(default)]
    pub firmware_flash: Option<vessel_devices::PflashState>,
}

fn none<A>() -> Option<A> {
    None
}

/// The API part of a state file for a writer or reader without an API (the CLI, migration):
/// written as nothing, and whatever a file holds there is skipped when read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoApi;

impl Serialize for NoApi {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

impl<'de> Deserialize<'de> for NoApi {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| NoApi)
    }
}

/// A full snapshot or the pages dirtied since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// Where to put a snapshot, and the API's record to store with it.
#[derive(Debug, Clone)]
pub struct SnapshotRequest<A = NoApi> {
    pub state: PathBuf,
    pub memory: PathBuf,
    pub kind: SnapshotKind,
    /// Stored as [`VmSnapshot::api`].
    pub api: Option<A>,
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
    #[error(transparent)]
    File(#[from] SnapshotError),
    #[error("cannot open KVM")]
    Kvm(#[source] vessel_kvm::KvmError),
    #[error("KVM_GET_DIRTY_LOG")]
    DirtyLog(#[source] kvm_ioctls::Error),
    #[error("cannot read the vCPUs' state")]
    Vcpus(#[source] VcpuStateError),
    #[error("cannot save KVM's VM state")]
    KvmState(#[source] vessel_kvm::KvmError),
    #[error("the virtio devices")]
    Devices(#[source] DeviceError),
    #[error("snapshots and live migration of a VM with a vhost-user device ({0}) are not supported: its backend's state is outside Vessel")]
    VhostUser(String),
    #[error("diff snapshots and live migration of a VM with hotpluggable memory (virtio-mem) are not supported yet: take a full snapshot")]
    MemoryHotplug,
    #[error("snapshots and live migration need the PC's interrupt controllers, which the demo guest's VM does not have")]
    NoPcIrqchip,
}

/// Refuses to snapshot or migrate a VM without the PC's interrupt controllers (whose state a
/// snapshot holds) or with a vhost-user device.
pub(crate) fn refuse_unsupported(m: &Machine) -> Result<(), SnapshotFailure> {
    if m.irqchip != crate::kvm_vm::Irqchip::Pc {
        return Err(SnapshotFailure::NoPcIrqchip);
    }
    refuse_vhost_user(m)
}

/// Refuses to snapshot or migrate a VM with a vhost-user device.
fn refuse_vhost_user(m: &Machine) -> Result<(), SnapshotFailure> {
    match m.config.devices.first_vhost_user() {
        Some(what) => Err(SnapshotFailure::VhostUser(what)),
        None => Ok(()),
    }
}

/// Refuses what needs KVM's dirty log of every memory slot (diff snapshots, migration) for
/// a VM with hotpluggable memory: its region is mapped slot by slot as the guest plugs it,
/// outside the log. A full snapshot carries it (the region is part of guest memory, and the
/// virtio-mem device saves which blocks are plugged).
pub(crate) fn refuse_memory_hotplug(m: &Machine) -> Result<(), SnapshotFailure> {
    match m.config.devices.memory_hotplug {
        Some(_) => Err(SnapshotFailure::MemoryHotplug),
        None => Ok(()),
    }
}

/// KVM's dirty log since its last read, as a bitmap over `regions` (slot `i` is region `i`).
pub(crate) fn kvm_dirty_log(
    vm: &VmFd,
    regions: &[MemRegion],
) -> Result<DirtyBitmap, SnapshotFailure> {
    let words = regions
        .iter()
        .enumerate()
        .map(|(slot, r)| vm.get_dirty_log(slot as u32, r.size as usize))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SnapshotFailure::DirtyLog)?;
    Ok(DirtyBitmap::from_words(regions, words))
}

/// The pages written since the last call: KVM's dirty log (the guest's writes) and guest
/// memory's own bitmaps (the devices' writes). Both are reset.
pub(crate) fn dirty_pages(m: &Machine) -> Result<DirtyBitmap, SnapshotFailure> {
    let regions = memory::layout(&m.mem);
    let mut d = kvm_dirty_log(&m.vm, &regions)?;
    memory::take_vmm_dirty_into(&m.mem, &mut d);
    Ok(d)
}

/// Brings every virtio device to a consistent stop (see `VirtioManager::quiesce_all`); on
/// failure they run again.
pub(crate) fn quiesce_devices(m: &Machine) -> Result<(), SnapshotFailure> {
    let v = m.virtio();
    v.quiesce_all().map_err(|e| {
        v.resume_all();
        SnapshotFailure::Devices(e)
    })
}

/// Lets the virtio devices run again after [`quiesce_devices`].
pub(crate) fn resume_devices(m: &Machine) {
    m.virtio().resume_all();
}

/// Everything of a paused machine whose devices are quiesced, but its memory.
pub(crate) fn capture<A>(m: &Machine, api: Option<A>) -> Result<VmSnapshot<A>, SnapshotFailure> {
    refuse_unsupported(m)?;
    let kvm = vessel_kvm::system::open().map_err(SnapshotFailure::Kvm)?;
    let msrs = msr_candidates(&kvm).map_err(SnapshotFailure::Kvm)?;
    let vcpus = m
        .pause
        .save_states(m.vcpus(), msrs, VCPU_STATE_TIMEOUT)
        .map_err(SnapshotFailure::Vcpus)?;
    let kvm = VmKvmState::save(&m.vm).map_err(SnapshotFailure::KvmState)?;
    let virtio = m.virtio().save_all().map_err(SnapshotFailure::Devices)?;
    Ok(VmSnapshot {
        kind: STATE_KIND.into(),
        vessel_version: env!("CARGO_PKG_VERSION").into(),
        config: m.current_config(),
        nested: m.nested,
        memory: memory::layout(&m.mem),
        vcpus,
        kvm,
        legacy: m.legacy.save_state(),
        virtio,
        api,
        vmgenid: m.vmgenid,
        firmware_flash: m.firmware.as_ref().and_then(|f| f.flash_state()),
    })
}

/// Takes a snapshot of a paused machine (every vCPU parked).
pub(crate) fn take<A: Serialize + Clone>(
    m: &Machine,
    req: &SnapshotRequest<A>,
) -> Result<SnapshotInfo, SnapshotFailure> {
    let _one = m.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
    refuse_unsupported(m)?;
    if req.kind == SnapshotKind::Diff {
        refuse_memory_hotplug(m)?;
    }
    if req.kind == SnapshotKind::Diff && !m.config.track_dirty_pages {
        return Err(SnapshotFailure::NoDirtyTracking);
    }
    let t0 = Instant::now();
    // Devices a pause quiesced stay quiesced until the VM resumes.
    let by_pause = m.devices_quiesced.load(Ordering::Acquire);
    quiesce_devices(m)?;
    let r = write_snapshot(m, req, t0);
    if !by_pause {
        resume_devices(m);
    }
    r
}

fn write_snapshot<A: Serialize + Clone>(
    m: &Machine,
    req: &SnapshotRequest<A>,
    t0: Instant,
) -> Result<SnapshotInfo, SnapshotFailure> {
    let state = capture(m, req.api.clone())?;
    let devices_time = t0.elapsed();

    let t1 = Instant::now();
    let (stats, dirty_pages) = match req.kind {
        SnapshotKind::Full => {
            // The next diff is relative to this snapshot: drop what the logs hold (a VM
            // with hotpluggable memory takes no diffs, and its region has no log).
            if m.config.track_dirty_pages && m.config.devices.memory_hotplug.is_none() {
                kvm_dirty_log(&m.vm, &state.memory)?;
            }
            memory::take_vmm_dirty(&m.mem);
            // SAFETY: `capture` above had every vCPU report its state from the pause gate
            // (so all are parked) and `take` quiesced the device workers: nothing writes
            // guest memory while `write_full` reads it.
            let st = unsafe { memory::write_full(&m.mem, &req.memory) }?;
            (st, None)
        }
        SnapshotKind::Diff => {
            let dirty = dirty_pages(m)?;
            let n = dirty.count();
            // SAFETY: the vCPUs are parked and the device workers quiesced (see the full
            // case): nothing writes guest memory while `write_diff` reads the dirty pages.
            let st = unsafe { memory::write_diff(&m.mem, &req.memory, &dirty) }?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Record {
        name: String,
    }

    #[test]
    fn the_api_part_is_typed_and_skipped_by_readers_without_an_api() {
        #[derive(Serialize, Deserialize)]
        struct Holder<A> {
            #[serde(default = "none")]
            api: Option<A>,
        }
        let text = serde_json::to_string(&Holder {
            api: Some(Record { name: "vm".into() }),
        })
        .unwrap();
        let typed: Holder<Record> = serde_json::from_str(&text).unwrap();
        assert_eq!(typed.api, Some(Record { name: "vm".into() }));
        let skipped: Holder<NoApi> = serde_json::from_str(&text).unwrap();
        assert_eq!(skipped.api, Some(NoApi));
        let absent: Holder<Record> = serde_json::from_str("{}").unwrap();
        assert_eq!(absent.api, None);
        let null: Holder<Record> = serde_json::from_str(r#"{"api": null}"#).unwrap();
        assert_eq!(null.api, None);
    }
}
