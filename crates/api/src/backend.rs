//! The boundary to the VMM: the [`VmmBackend`] trait, and [`Backend`], through which the
//! controller makes every call: `backend.call(|vmm| vmm.pause())` runs the closure against the
//! VMM, in place ([`Backend::Direct`]) or on the VMM's own thread ([`Backend::Channel`], with a
//! reply timeout). An endpoint is a model, a route row, a controller method and (when the VMM
//! is involved) one `VmmBackend` method: nothing forwards calls by hand.
//!
//! The VMM implements `VmmBackend` once, on an object that lives on its main thread (it need
//! not be `Send`). It hands the API server a [`ChannelBackend`]; each call becomes a
//! [`BackendJob`] sent over a channel, the `wake` callback is called (write an `EventFd` the
//! main loop polls), and the main loop runs the pending jobs against its object:
//!
//! ```ignore
//! let (backend, jobs) = vessel_api::backend::channel(move || { let _ = evt.write(1); });
//! // ... start the API server with `backend` ...
//! // main loop, when `evt` is readable:
//! while let Ok(job) = jobs.try_recv() { job.run(&mut vmm); }
//! ```
//!
//! The API threads only wait on the reply (with a timeout); vCPU threads are never involved.

use std::sync::{mpsc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::ApiError;
pub use crate::hotplug::PluggedDevice;
use crate::resources::VmResources;
use crate::types::*;

fn unsupported<T>(what: &str) -> Result<T, ApiError> {
    Err(ApiError::Unsupported(what.to_string()))
}

/// What the API needs from the VMM. Methods with a default answer "unsupported" (400), so a
/// VMM implements only what it has; the API checks the VM state before calling (e.g. `pause`
/// is only called on a running VM).
pub trait VmmBackend {
    /// Vets a candidate pre-boot configuration before the API commits it, so that features the
    /// VMM lacks are refused with a 400 at `PUT` time rather than at start.
    fn validate(&mut self, _resources: &VmResources) -> Result<(), ApiError> {
        Ok(())
    }
    /// Builds and boots the VM (`InstanceStart`). On success the VM is running.
    fn start(&mut self, resources: &VmResources) -> Result<(), ApiError>;
    /// Pauses the vCPUs.
    fn pause(&mut self) -> Result<(), ApiError> {
        unsupported("pausing the microVM")
    }
    /// Resumes the vCPUs.
    fn resume(&mut self) -> Result<(), ApiError> {
        unsupported("resuming the microVM")
    }
    /// Injects Ctrl-Alt-Del through the i8042 controller.
    fn send_ctrl_alt_del(&mut self) -> Result<(), ApiError> {
        unsupported("SendCtrlAltDel")
    }
    /// Ends the VM at once (`PUT /vessel/stop`); returns without waiting for it.
    fn stop(&mut self) -> Result<(), ApiError> {
        unsupported("stopping the microVM")
    }
    /// Live-migrates the VM (`PUT /vessel/migrate`); returns the migration's figures once
    /// the receiver runs the VM.
    fn migrate(&mut self, _params: &MigrateParams) -> Result<Value, ApiError> {
        unsupported("live migration")
    }
    /// The VMM's own metric groups, merged into the metrics line on each flush
    /// (e.g. `{"vcpu": {...}, "block": {...}}`).
    fn metrics(&mut self) -> Result<Map<String, Value>, ApiError> {
        Ok(Map::new())
    }
    /// Applies the logger configuration (`PUT /logger`, or the config file's `logger`).
    fn configure_logger(&mut self, _logger: &Logger) -> Result<(), ApiError> {
        Ok(())
    }
    /// `PUT /serial`: where the guest's serial output goes (before start; also used by a
    /// snapshot load).
    fn configure_serial(&mut self, _serial: &SerialDevice) -> Result<(), ApiError> {
        unsupported("serial output configuration")
    }
    /// Post-boot `PATCH /drives/{id}` (new backing file and/or rate limiter).
    fn update_drive(&mut self, _update: &PartialDrive) -> Result<(), ApiError> {
        unsupported("updating a drive after boot")
    }
    /// Post-boot `PATCH /network-interfaces/{id}` (rate limiters).
    fn update_network_interface(
        &mut self,
        _update: &PartialNetworkInterface,
    ) -> Result<(), ApiError> {
        unsupported("updating a network interface after boot")
    }
    /// Post-boot `PATCH /pmem/{id}` (rate limiter).
    fn update_pmem(&mut self, _update: &PartialPmem) -> Result<(), ApiError> {
        unsupported("updating a pmem device after boot")
    }
    /// Post-boot `PUT /drives/{id}`: hot-plugs the drive (a virtio-pci device). The API has
    /// checked that the id is new, that it is not a root device, and the body as before boot;
    /// on success it records the drive.
    fn hotplug_drive(&mut self, _drive: &Drive) -> Result<(), ApiError> {
        unsupported("hotplugging a drive")
    }
    /// Post-boot `PUT /network-interfaces/{id}`: hot-plugs the interface (as `hotplug_drive`).
    fn hotplug_network_interface(&mut self, _iface: &NetworkInterface) -> Result<(), ApiError> {
        unsupported("hotplugging a network interface")
    }
    /// Post-boot `PUT /pmem/{id}`: hot-plugs the pmem device (as `hotplug_drive`).
    fn hotplug_pmem(&mut self, _pmem: &Pmem) -> Result<(), ApiError> {
        unsupported("hotplugging a pmem device")
    }
    /// Post-boot `DELETE /drives|network-interfaces|pmem/{id}`: the guest is asked to release
    /// the device, which is removed once it has. The API has checked that the device exists
    /// and is not the root device; on success it forgets the device.
    fn unplug(&mut self, _device: &PluggedDevice) -> Result<(), ApiError> {
        unsupported("hot-unplugging a device")
    }
    /// Post-boot `GET /balloon`: the device's current configuration.
    fn balloon_config(&mut self) -> Result<Balloon, ApiError> {
        unsupported("the balloon device")
    }
    /// Post-boot `PATCH /balloon`.
    fn balloon_update(&mut self, _amount_mib: u32) -> Result<(), ApiError> {
        unsupported("the balloon device")
    }
    /// Post-boot `PATCH /balloon/statistics`.
    fn balloon_stats_interval(&mut self, _seconds: u16) -> Result<(), ApiError> {
        unsupported("balloon statistics")
    }
    /// Post-boot `GET /balloon/statistics`.
    fn balloon_stats(&mut self) -> Result<BalloonStats, ApiError> {
        unsupported("balloon statistics")
    }
    /// Post-boot `PATCH /balloon/hinting/start`.
    fn balloon_hinting_start(&mut self, _cmd: BalloonStartCmd) -> Result<(), ApiError> {
        unsupported("balloon free page hinting")
    }
    /// Post-boot `GET /balloon/hinting/status`.
    fn balloon_hinting_status(&mut self) -> Result<BalloonHintingStatus, ApiError> {
        unsupported("balloon free page hinting")
    }
    /// Post-boot `PATCH /balloon/hinting/stop`.
    fn balloon_hinting_stop(&mut self) -> Result<(), ApiError> {
        unsupported("balloon free page hinting")
    }
    /// Post-boot `GET /hotplug/memory`: the virtio-mem device's status.
    fn memory_hotplug_status(&mut self) -> Result<MemoryHotplugStatus, ApiError> {
        unsupported("memory hotplug")
    }
    /// Post-boot `PATCH /hotplug/memory`: the plugged size the guest is asked to reach.
    fn memory_hotplug_update(&mut self, _requested_size_mib: u64) -> Result<(), ApiError> {
        unsupported("memory hotplug")
    }
    /// `PUT /snapshot/create` on a paused VM.
    fn snapshot_create(&mut self, _params: &SnapshotCreateParams) -> Result<(), ApiError> {
        unsupported("snapshots")
    }
    /// `PUT /snapshot/load` on a fresh VMM; on success the VM exists, paused, or running
    /// when `params.resume_vm`. Returns the restored configuration.
    fn snapshot_load(&mut self, _params: &SnapshotLoadParams) -> Result<VmResources, ApiError> {
        unsupported("snapshots")
    }
}

type JobFn = Box<dyn FnOnce(&mut dyn VmmBackend) + Send>;

/// A call waiting for the VMM's thread. Run it with the VMM's backend object.
pub struct BackendJob(JobFn);

impl BackendJob {
    /// Runs the call and sends its result back to the waiting API thread.
    pub fn run(self, backend: &mut dyn VmmBackend) {
        (self.0)(backend)
    }
}

impl std::fmt::Debug for BackendJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendJob")
    }
}

/// Default time the API waits for the VMM to answer a call.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `PUT /vessel/migrate` may take.
pub const MIGRATION_REPLY_TIMEOUT: Duration = Duration::from_secs(3600);

/// How the controller reaches the VMM: every backend call is a closure run against the
/// [`VmmBackend`], in place ([`Backend::Direct`]) or on the VMM's own thread
/// ([`Backend::Channel`]). A new endpoint therefore needs no forwarding code here.
pub enum Backend {
    /// A backend the API threads call in place (tests, fuzzing, a VMM without a thread of
    /// its own).
    Direct(Mutex<Box<dyn VmmBackend + Send>>),
    /// A backend on the VMM's thread, reached through [`channel`].
    Channel(ChannelBackend),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Direct(_) => "Backend::Direct",
            Backend::Channel(_) => "Backend::Channel",
        })
    }
}

impl<B: VmmBackend + Send + 'static> From<Box<B>> for Backend {
    fn from(b: Box<B>) -> Self {
        Backend::Direct(Mutex::new(b))
    }
}

impl From<Box<dyn VmmBackend + Send>> for Backend {
    fn from(b: Box<dyn VmmBackend + Send>) -> Self {
        Backend::Direct(Mutex::new(b))
    }
}

impl From<ChannelBackend> for Backend {
    fn from(c: ChannelBackend) -> Self {
        Backend::Channel(c)
    }
}

impl Backend {
    /// Runs `f` against the VMM and returns its result; over the channel, fails with a 500
    /// when the VMM does not answer within its timeout or is gone.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn VmmBackend) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        match self {
            Backend::Direct(b) => Ok(f(&mut **b.lock().unwrap_or_else(|e| e.into_inner()))),
            Backend::Channel(c) => c.call(f),
        }
    }

    /// [`Self::call`] with its own reply timeout (live migration takes as long as the link
    /// needs); a direct call is not timed.
    pub fn call_within<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut dyn VmmBackend) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        match self {
            Backend::Direct(_) => self.call(f),
            Backend::Channel(c) => c.call_within(timeout, f),
        }
    }

    /// [`Self::call`] for a backend method that can fail: its error and the call's are one.
    pub fn try_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn VmmBackend) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.call(f)?
    }
}

/// Forwards calls to the VMM's thread. See the module docs.
pub struct ChannelBackend {
    jobs: mpsc::Sender<BackendJob>,
    wake: Box<dyn Fn() + Send>,
    timeout: Duration,
}

impl std::fmt::Debug for ChannelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelBackend")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A `ChannelBackend` and the receiver of its jobs. `wake` is called after each job is queued.
pub fn channel(wake: impl Fn() + Send + 'static) -> (ChannelBackend, mpsc::Receiver<BackendJob>) {
    let (tx, rx) = mpsc::channel();
    (
        ChannelBackend {
            jobs: tx,
            wake: Box::new(wake),
            timeout: DEFAULT_REPLY_TIMEOUT,
        },
        rx,
    )
}

impl ChannelBackend {
    /// Sets how long a call waits for the VMM before failing with a 500.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `f` on the VMM's thread and waits (up to the timeout) for its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn VmmBackend) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        self.call_within(self.timeout, f)
    }

    /// [`Self::call`] with its own reply timeout.
    pub fn call_within<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut dyn VmmBackend) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let job = BackendJob(Box::new(move |b| {
            // The API side may have timed out and gone; nothing to do then.
            let _ = reply_tx.send(f(b));
        }));
        self.jobs
            .send(job)
            .map_err(|_| ApiError::Internal("the VMM is no longer running".into()))?;
        (self.wake)();
        match reply_rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ApiError::Internal(format!(
                "the VMM did not answer within {} s",
                timeout.as_secs()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(ApiError::Internal("the VMM dropped the request".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Vmm {
        paused: bool,
    }
    impl VmmBackend for Vmm {
        fn start(&mut self, r: &VmResources) -> Result<(), ApiError> {
            if r.boot_source.is_none() {
                return Err(ApiError::bad("no kernel"));
            }
            Ok(())
        }
        fn pause(&mut self) -> Result<(), ApiError> {
            self.paused = true;
            Ok(())
        }
    }

    #[test]
    fn channel_runs_calls_on_the_vmm_thread() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        let (backend, jobs) = channel(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        let backend = Backend::from(backend);
        let vmm_thread = std::thread::spawn(move || {
            let mut vmm = Vmm { paused: false };
            for job in jobs.iter().take(3) {
                job.run(&mut vmm);
            }
            vmm.paused
        });
        assert_eq!(
            backend.try_call(|b| b.start(&VmResources::default())),
            Err(ApiError::bad("no kernel"))
        );
        assert_eq!(backend.try_call(|b| b.pause()), Ok(()));
        assert!(matches!(
            backend.try_call(|b| b.resume()),
            Err(ApiError::Unsupported(_))
        ));
        assert!(vmm_thread.join().unwrap_or(false));
        assert_eq!(wakes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn direct_calls_run_in_place() {
        let backend = Backend::from(Box::new(Vmm { paused: false }));
        assert_eq!(
            backend.try_call(|b| b.start(&VmResources::default())),
            Err(ApiError::bad("no kernel"))
        );
        assert_eq!(backend.try_call(|b| b.pause()), Ok(()));
        assert_eq!(
            backend.call_within(Duration::from_millis(1), |b| b.stop()),
            Ok(Err(ApiError::Unsupported("stopping the microVM".into())))
        );
    }

    #[test]
    fn channel_times_out_and_reports_a_gone_vmm() {
        let (backend, jobs) = channel(|| {});
        let backend = Backend::from(backend.with_timeout(Duration::from_millis(50)));
        // Nobody runs the job: the call times out.
        assert!(matches!(
            backend.try_call(|b| b.pause()),
            Err(ApiError::Internal(_))
        ));
        drop(jobs);
        assert!(matches!(
            backend.try_call(|b| b.pause()),
            Err(ApiError::Internal(_))
        ));
    }
}
