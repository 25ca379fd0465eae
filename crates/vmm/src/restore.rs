//! Restoring a VM from snapshot files: reading and checking the state file ([`load_state`]),
//! checking that a configuration keeps the machine the snapshot was taken of, mapping the
//! memory file, prefetching (or recording) the guest's working set, and handing the rest to
//! [`crate::builder::build_from_snapshot`]. A restored VM is a clone: it gets a new VM
//! generation ID, however many others run from the same files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use vessel_snapshot::memory;
use vessel_snapshot::{read_state, SnapshotError};

use crate::builder::{self, Vm};
use crate::config::{SerialTarget, VmConfig};
use crate::device_manager::DeviceError;
use crate::error::VmmError;
use crate::snapshot::{VmSnapshot, STATE_KIND};

/// Why a snapshot could not be built back into a VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    File(#[from] SnapshotError),
    #[error("the configuration changes the machine the snapshot was taken of")]
    MachineChanged,
    #[error("KVM's VM state")]
    Kvm(#[source] vessel_kvm::KvmError),
    #[error("the legacy devices")]
    Legacy(#[source] vessel_devices::SavedStateError),
    #[error("the firmware's variable store")]
    Firmware(#[source] crate::firmware::FirmwareError),
    #[error("the virtio devices")]
    Devices(#[source] DeviceError),
}

/// Reads and checks a state file; `A` is the API part's type ([`crate::snapshot::NoApi`] to
/// skip it).
pub fn load_state<A: DeserializeOwned>(path: &Path) -> Result<VmSnapshot<A>, SnapshotError> {
    let s: VmSnapshot<A> = read_state(path)?;
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

/// A VM rebuilt from a snapshot, not yet started, and the snapshot's state. Guest memory is
/// the memory file mapped privately: pages load as the guest touches them.
pub fn restore(req: &RestoreRequest) -> Result<(Vm, VmSnapshot), VmmError> {
    let snap: VmSnapshot = load_state(&req.state).map_err(RestoreError::File)?;
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

/// Builds a VM from `snap` and the memory file `memory`, with `config` (the snapshot's
/// configuration, possibly with host-side changes: another console, TAP or vsock socket).
/// The guest-visible machine must stay the same: vCPU count, memory size and the list of
/// devices are checked against the snapshot.
pub fn restore_with<A>(
    snap: &VmSnapshot<A>,
    config: &VmConfig,
    memory: &Path,
) -> Result<Vm, VmmError> {
    restore_prefetched(snap, config, memory, None)
}

/// Whether `config` describes the machine `snap` was taken of (host-side changes allowed).
fn same_machine(config: &VmConfig, snap: &VmConfig) -> bool {
    let d = (&config.devices, &snap.devices);
    config.cpus == snap.cpus
        && config.memory == snap.memory
        && d.0.disks.len() == d.1.disks.len()
        && d.0.nets.len() == d.1.nets.len()
        && d.0.vsock.is_some() == d.1.vsock.is_some()
        && d.0.rng == d.1.rng
        && d.0.balloon.is_some() == d.1.balloon.is_some()
        && d.0.pmem.len() == d.1.pmem.len()
        && d.0
            .pmem
            .iter()
            .zip(&d.1.pmem)
            .all(|(a, b)| a.read_only == b.read_only)
        && d.0.memory_hotplug == d.1.memory_hotplug
}

/// [`restore_with`], prefetching or recording the working set `ws`. The restored VM gets a
/// new VM generation ID: it is a clone, however many others run from the same files.
pub fn restore_prefetched<A>(
    snap: &VmSnapshot<A>,
    config: &VmConfig,
    memory: &Path,
    ws: Option<&WorkingSet>,
) -> Result<Vm, VmmError> {
    if !same_machine(config, &snap.config) {
        return Err(RestoreError::MachineChanged.into());
    }
    let mem = memory::map_private(&snap.memory, memory).map_err(RestoreError::File)?;
    let mut record = None;
    if let Some(ws) = ws {
        match memory::load_working_set(&ws.path, &snap.memory) {
            Ok(set) => {
                // On a thread of its own: the VM is built and starts meanwhile, and the guest
                // faults in what it touches before the prefetch gets there.
                // It runs beside the guest: under the VMM's filter.
                let mem = mem.clone();
                let spawned = crate::running::spawn_helper("prefetch", move || {
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
    let mut vm = builder::build_from_snapshot(config, mem.clone(), snap)?;
    vm.new_generation()?;
    if let Some(ws) = record {
        vm.on_start(Box::new(move || record_working_set(mem, ws)));
    }
    Ok(vm)
}

/// After `ws.record_after`, writes the pages the guest has touched to `ws.path`, from a thread
/// of its own.
fn record_working_set(mem: vessel_memory::GuestMemoryMmap, ws: WorkingSet) {
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
}
