//! Controlling a running VM from any thread: [`VmHandle`] pauses and resumes it (an explicit
//! state machine: running, paused, ended), types Ctrl-Alt-Del, stops it, snapshots it and
//! live-migrates it. What it shares with the supervisor ([`crate::running`]) is
//! [`RunControl`]; everything else is the [`Machine`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::machine::Machine;
use crate::migration::{self, Connection, MigrateOptions, MigrationError, MigrationStats};
use crate::snapshot::{self, SnapshotFailure, SnapshotInfo, SnapshotRequest};
use crate::vcpu::{kick_signal, VcpuReport, VcpuStop};
use crate::VmmError;

/// The state of a started VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// The VM ended (or is ending): control calls fail.
    Ended,
}

impl RunState {
    fn from_u8(v: u8) -> RunState {
        match v {
            0 => RunState::Running,
            1 => RunState::Paused,
            _ => RunState::Ended,
        }
    }
}

/// Messages to the supervisor thread.
pub(crate) enum Msg {
    /// A vCPU thread ended.
    Vcpu(u8, Result<VcpuStop, VmmError>, VcpuReport),
    /// Look at the control flags now.
    Wake,
}

/// What the controller shares with the supervisor of a started VM.
pub(crate) struct RunControl {
    /// The vCPU threads, to kick; emptied (under the lock) before they are joined.
    pub threads: Mutex<Vec<libc::pthread_t>>,
    state: AtomicU8,
    pub stop_requested: AtomicBool,
    /// The VM was handed over by a live migration.
    pub migrated: AtomicBool,
    pub wake: Mutex<mpsc::Sender<Msg>>,
    pub started: Instant,
    pauses: AtomicU64,
}

impl RunControl {
    pub fn new(paused: bool, wake: mpsc::Sender<Msg>) -> RunControl {
        let state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        RunControl {
            threads: Mutex::new(Vec::new()),
            state: AtomicU8::new(state as u8),
            stop_requested: AtomicBool::new(false),
            migrated: AtomicBool::new(false),
            wake: Mutex::new(wake),
            started: Instant::now(),
            pauses: AtomicU64::new(0),
        }
    }

    pub fn lock_threads(&self) -> MutexGuard<'_, Vec<libc::pthread_t>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Interrupts `KVM_RUN` on every vCPU thread not yet joined.
    pub fn kick_all(&self) {
        for &t in self.lock_threads().iter() {
            // SAFETY: pthread_kill with the id of a thread that has not been joined (ids are
            // removed under this lock before the join), and a signal whose handler is
            // installed.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Ends the VM: vCPUs stop at their next exit, parked ones wake up.
    pub fn end(&self, m: &Machine) {
        self.state.store(RunState::Ended as u8, Ordering::Release);
        m.stop.store(true, Ordering::Release);
        m.pause.wake_all();
    }

    /// Has the supervisor look at the flags now.
    pub fn wake(&self) {
        if let Ok(w) = self.wake.lock() {
            let _ = w.send(Msg::Wake);
        }
    }

    fn state(&self) -> RunState {
        RunState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn transition(&self, from: RunState, to: RunState) {
        let _ =
            self.state
                .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Errors of VM control calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is not running")]
    Ended,
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("the guest's keyboard buffer is full (the guest does not read its keyboard)")]
    KeyboardFull,
    #[error("the devices could not be stopped, the VM runs on: {0}")]
    Devices(String),
}

/// How long [`VmHandle::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Live figures about a running VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveStats {
    pub vcpus: usize,
    pub uptime: Duration,
    /// Times the VM was paused.
    pub pauses: u64,
    pub unhandled_io: (u64, u64),
    pub unhandled_mmio: (u64, u64),
    /// Serial output bytes dropped (over `serial_limit`, or a full FIFO).
    pub serial_dropped_bytes: u64,
}

/// Controls a running VM from any thread. Cheap to clone.
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) machine: Arc<Machine>,
    pub(crate) control: Arc<RunControl>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl VmHandle {
    pub fn state(&self) -> RunState {
        self.control.state()
    }

    fn require_alive(&self) -> Result<(), ControlError> {
        if self.machine.stopping() {
            return Err(ControlError::Ended);
        }
        Ok(())
    }

    /// Plugs a disk or a NIC into the running VM's PCI bus and tells the guest (ACPI PCI
    /// hotplug: a Linux guest binds its driver by itself); returns its slot and handles.
    pub fn plug(
        &self,
        what: crate::Pluggable,
    ) -> Result<(u8, crate::Plugged), crate::HotplugError> {
        let _one = self.device_change()?;
        self.machine.virtio().plug(what)
    }

    /// Switches a disk to another backing file (`BlockHandle::replace_backing_file`: the
    /// guest is told the new capacity) and records it for snapshots and migrations; returns
    /// the new capacity in sectors.
    pub fn replace_disk_file(
        &self,
        disk: &vessel_virtio_devices::block::BlockHandle,
        path: &std::path::Path,
    ) -> Result<u64, crate::HotplugError> {
        let _one = self.device_change()?;
        self.machine.virtio().replace_disk_file(disk, path)
    }

    /// Records the rate limiters of a disk, NIC or pmem device, changed through its handle,
    /// for snapshots and migrations.
    pub fn record_limiters(
        &self,
        device: crate::PluggedRef<'_>,
    ) -> Result<(), crate::HotplugError> {
        let _one = self.device_change()?;
        self.machine.virtio().record_limiters(device)
    }

    /// One device change at a time, and none during a snapshot or migration; none once the
    /// VM has ended.
    fn device_change(&self) -> Result<MutexGuard<'_, ()>, crate::HotplugError> {
        if self.machine.stopping() {
            return Err(crate::HotplugError::Ended);
        }
        Ok(self
            .machine
            .snapshot_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner()))
    }

    /// Unplugs a device: at once when no driver holds it; otherwise the guest is asked to
    /// release it and it is removed once the guest has ejected it, which must happen within
    /// `timeout` (the guest's refusal or silence leaves it in place and is reported).
    pub fn unplug(
        &self,
        target: crate::PluggedRef<'_>,
        timeout: Duration,
    ) -> Result<(), crate::HotplugError> {
        let _one = self.device_change()?;
        let running = self.state() == RunState::Running;
        let started = self.machine.virtio().unplug_begin(target, running)?;
        crate::device_manager::hotplug::finish_unplug(&self.machine.virtio, started, timeout)
    }

    /// Stops every vCPU out of `KVM_RUN` and parks it, then quiesces the virtio devices
    /// (in-flight requests finish); returns once all are stopped. If the devices cannot be
    /// quiesced, the vCPUs run again and the error is returned. Pausing a paused VM does
    /// nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.require_alive()?;
        let (m, c) = (&self.machine, &self.control);
        if self.state() == RunState::Paused {
            return Ok(());
        }
        m.pause.request();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            // A kick that lands just before a vCPU enters KVM_RUN is lost: kick again until
            // every vCPU has parked.
            c.kick_all();
            if m.pause.wait_parked(m.vcpus(), Duration::from_millis(10)) {
                break;
            }
            if m.stopping() {
                m.pause.release();
                return Err(ControlError::Ended);
            }
            if Instant::now() >= deadline {
                m.pause.release();
                return Err(ControlError::PauseTimeout(PAUSE_TIMEOUT));
            }
        }
        // The device workers stop too, at a consistent point: every request they took is
        // finished and in its used ring, nothing half done.
        // If they cannot, the pause is undone (the devices run again already) and reported.
        if let Err(e) = snapshot::quiesce_devices(m) {
            m.pause.release();
            let text = crate::error::ErrorChain(&e).to_string();
            return Err(ControlError::Devices(text));
        }
        m.devices_quiesced.store(true, Ordering::Release);
        c.pauses.fetch_add(1, Ordering::Relaxed);
        c.transition(RunState::Running, RunState::Paused);
        Ok(())
    }

    /// Lets the vCPUs run again. Resuming a running VM does nothing.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.require_alive()?;
        let m = &self.machine;
        if m.devices_quiesced.swap(false, Ordering::AcqRel) {
            snapshot::resume_devices(m);
        }
        self.control.transition(RunState::Paused, RunState::Running);
        m.pause.release();
        Ok(())
    }

    /// Types Ctrl-Alt-Del on the guest's i8042 keyboard.
    pub fn ctrl_alt_del(&self) -> Result<(), ControlError> {
        self.require_alive()?;
        if self.machine.legacy.send_ctrl_alt_del() {
            Ok(())
        } else {
            Err(ControlError::KeyboardFull)
        }
    }

    /// Asks the VM to stop (it ends with [`crate::ExitReason::Stopped`]); returns at once.
    pub fn stop(&self) {
        let c = &self.control;
        c.stop_requested.store(true, Ordering::Release);
        c.wake();
    }

    /// Takes a snapshot of the paused VM: memory to `req.memory`, everything else to
    /// `req.state` (see [`crate::snapshot`]), with `req.api` as the API's record. The VM
    /// stays paused.
    pub fn snapshot<A: serde::Serialize + Clone>(
        &self,
        req: &SnapshotRequest<A>,
    ) -> Result<SnapshotInfo, SnapshotFailure> {
        if self.machine.stopping() {
            return Err(SnapshotFailure::Ended);
        }
        if self.state() != RunState::Paused {
            return Err(SnapshotFailure::NotPaused);
        }
        snapshot::take(&self.machine, req)
    }

    /// Live-migrates the VM to the receiver listening at `url` (see [`crate::migration`]).
    /// On success the VM ends here with [`crate::ExitReason::Migrated`]; on failure it goes
    /// on as it was.
    pub fn migrate(
        &self,
        url: &migration::MigrationUrl,
        opts: &MigrateOptions,
    ) -> Result<MigrationStats, MigrationError> {
        if self.machine.stopping() {
            return Err(MigrationError::NotRunning);
        }
        crate::snapshot::refuse_memory_hotplug(&self.machine)?;
        crate::snapshot::refuse_unsupported(&self.machine)?;
        let was_paused = self.state() == RunState::Paused;
        let mut conn = Connection::connect(url)?;
        let stats = migration::send::send(
            &self.machine,
            &mut conn,
            opts,
            || self.pause().map_err(MigrationError::Control),
            || {
                if !was_paused {
                    self.resume().map_err(MigrationError::Control)?;
                }
                Ok(())
            },
        )?;
        self.control.migrated.store(true, Ordering::Release);
        self.control.wake();
        Ok(stats)
    }

    /// Figures that can be read while the VM runs.
    pub fn stats(&self) -> LiveStats {
        let m = &self.machine;
        LiveStats {
            vcpus: m.vcpus(),
            uptime: self.control.started.elapsed(),
            pauses: self.control.pauses.load(Ordering::Relaxed),
            unhandled_io: m.io_bus.unhandled(),
            unhandled_mmio: m.mmio_bus.unhandled(),
            serial_dropped_bytes: m.legacy.serial_dropped_bytes(),
        }
    }
}
