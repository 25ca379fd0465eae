//! The boundary to the VMM: the [`VmmBackend`] trait, and [`ChannelBackend`], which runs the
//! calls on the VMM's own thread.
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

use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::ApiError;
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

/// A [`VmmBackend`] that forwards each call to the VMM's thread. See the module docs.
pub struct ChannelBackend {
    jobs: mpsc::Sender<BackendJob>,
    wake: Box<dyn Fn() + Send>,
    timeout: Duration,
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

    fn call<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut dyn VmmBackend) -> Result<R, ApiError> + Send + 'static,
    ) -> Result<R, ApiError> {
        let timeout = self.timeout;
        self.call_within(timeout, f)
    }

    /// [`Self::call`] with its own reply timeout (live migration takes as long as the link
    /// needs).
    fn call_within<R: Send + 'static>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&mut dyn VmmBackend) -> Result<R, ApiError> + Send + 'static,
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
            Ok(r) => r,
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

impl VmmBackend for ChannelBackend {
    fn validate(&mut self, resources: &VmResources) -> Result<(), ApiError> {
        let r = resources.clone();
        self.call(move |b| b.validate(&r))
    }
    fn start(&mut self, resources: &VmResources) -> Result<(), ApiError> {
        let r = resources.clone();
        self.call(move |b| b.start(&r))
    }
    fn pause(&mut self) -> Result<(), ApiError> {
        self.call(|b| b.pause())
    }
    fn resume(&mut self) -> Result<(), ApiError> {
        self.call(|b| b.resume())
    }
    fn send_ctrl_alt_del(&mut self) -> Result<(), ApiError> {
        self.call(|b| b.send_ctrl_alt_del())
    }
    fn stop(&mut self) -> Result<(), ApiError> {
        self.call(|b| b.stop())
    }
    fn migrate(&mut self, params: &MigrateParams) -> Result<Value, ApiError> {
        let p = params.clone();
        self.call_within(MIGRATION_REPLY_TIMEOUT, move |b| b.migrate(&p))
    }
    fn metrics(&mut self) -> Result<Map<String, Value>, ApiError> {
        self.call(|b| b.metrics())
    }
    fn configure_logger(&mut self, logger: &Logger) -> Result<(), ApiError> {
        let l = logger.clone();
        self.call(move |b| b.configure_logger(&l))
    }
    fn update_drive(&mut self, update: &PartialDrive) -> Result<(), ApiError> {
        let u = update.clone();
        self.call(move |b| b.update_drive(&u))
    }
    fn update_network_interface(
        &mut self,
        update: &PartialNetworkInterface,
    ) -> Result<(), ApiError> {
        let u = update.clone();
        self.call(move |b| b.update_network_interface(&u))
    }
    fn balloon_config(&mut self) -> Result<Balloon, ApiError> {
        self.call(|b| b.balloon_config())
    }
    fn balloon_update(&mut self, amount_mib: u32) -> Result<(), ApiError> {
        self.call(move |b| b.balloon_update(amount_mib))
    }
    fn balloon_stats_interval(&mut self, seconds: u16) -> Result<(), ApiError> {
        self.call(move |b| b.balloon_stats_interval(seconds))
    }
    fn balloon_stats(&mut self) -> Result<BalloonStats, ApiError> {
        self.call(|b| b.balloon_stats())
    }
    fn snapshot_create(&mut self, params: &SnapshotCreateParams) -> Result<(), ApiError> {
        let p = params.clone();
        self.call(move |b| b.snapshot_create(&p))
    }
    fn snapshot_load(&mut self, params: &SnapshotLoadParams) -> Result<VmResources, ApiError> {
        let p = params.clone();
        self.call(move |b| b.snapshot_load(&p))
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
        let (mut backend, jobs) = channel(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        let vmm_thread = std::thread::spawn(move || {
            let mut vmm = Vmm { paused: false };
            for job in jobs.iter().take(3) {
                job.run(&mut vmm);
            }
            vmm.paused
        });
        assert_eq!(
            backend.start(&VmResources::default()),
            Err(ApiError::bad("no kernel"))
        );
        assert_eq!(backend.pause(), Ok(()));
        assert!(matches!(backend.resume(), Err(ApiError::Unsupported(_))));
        assert!(vmm_thread.join().unwrap_or(false));
        assert_eq!(wakes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn channel_times_out_and_reports_a_gone_vmm() {
        let (backend, jobs) = channel(|| {});
        let mut backend = backend.with_timeout(Duration::from_millis(50));
        // Nobody runs the job: the call times out.
        assert!(matches!(backend.pause(), Err(ApiError::Internal(_))));
        drop(jobs);
        assert!(matches!(backend.pause(), Err(ApiError::Internal(_))));
    }
}
