//! Running a built VM: [`Vm::start`] installs the seccomp filters and signal handlers, starts
//! one thread per vCPU and returns a [`RunningVm`]; [`RunningVm::wait`] supervises it until the
//! guest, the user, a signal or the controller ends it, then joins the vCPUs and reports.
//! [`run`] does all of it for a configuration.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use vessel_devices::VmExitReason;

use crate::builder::Vm;
use crate::config::{Payload, VmConfig};
use crate::control::{Msg, RunControl, VmHandle};
use crate::error::{VcpuError, VmmError};
use crate::machine::Machine;
use crate::outcome::{since_spawn, ExitReason, VmOutcome, VmStats};
use crate::terminal;
use crate::vcpu::{kick_signal, VcpuReport, VcpuStop};

/// Set by the SIGINT/SIGTERM handler.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
extern "C" fn on_term(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(true, Ordering::Release);
}

/// A vCPU thread's name, Firecracker's `fc_vcpu <index>` (Kata Containers finds the vCPU
/// threads by it). At most 15 bytes, the kernel's limit, for any index (`fc_vcpu 255`).
pub fn vcpu_thread_name(id: u8) -> String {
    format!("fc_vcpu {id}")
}

/// Build the VM described by `config`, run it until it ends, and tear it down.
pub fn run(config: &VmConfig) -> Result<VmOutcome, VmmError> {
    Vm::build(config)?.start()?.wait()
}

/// The VMM's signal handlers (vCPU kicks, SIGINT and SIGTERM), before any thread that
/// receives them starts.
fn install_signal_handlers() -> Result<(), VmmError> {
    let handlers: [(i32, vmm_sys_util::signal::SignalHandler); 3] = [
        (kick_signal(), on_kick),
        (libc::SIGINT, on_term),
        (libc::SIGTERM, on_term),
    ];
    for (signal, handler) in handlers {
        vmm_sys_util::signal::register_signal_handler(signal, handler)
            .map_err(|source| VmmError::SignalHandler { signal, source })?;
    }
    Ok(())
}

/// Where the vCPU threads wait, their own filters installed, until the main thread has
/// installed its filter: no guest code runs before every VMM thread is filtered.
///
/// The vCPU threads start before the main thread's filter so that they carry only their own:
/// the kernel runs every filter a thread has on each of its syscalls, and a vCPU makes one
/// (`KVM_RUN`) per exit.
#[derive(Default)]
struct StartGate {
    open: Mutex<Option<bool>>,
    cv: Condvar,
}

impl StartGate {
    fn set(&self, go: bool) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = Some(go);
        self.cv.notify_all();
    }

    /// Whether the VM goes on (false: the start failed, the thread is to end).
    fn wait(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match *open {
                Some(go) => return go,
                None => open = self.cv.wait(open).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

impl Vm {
    /// Starts the vCPU threads (and, with a stdio console, the terminal). The VM runs until
    /// [`RunningVm::wait`] sees it end.
    pub fn start(self) -> Result<RunningVm, VmmError> {
        install_signal_handlers()?;
        let Vm {
            machine,
            vcpus,
            t0,
            kernel_source,
            start_paused,
            after_start,
        } = self;
        let stdio = machine.legacy.console_is_stdio();
        let raw = stdio.then(terminal::RawTerminal::enable).flatten();
        let quit = Arc::new(AtomicBool::new(false));

        let to_first_run = t0.elapsed();
        let since_spawn = since_spawn();
        let (tx, rx) = mpsc::channel::<Msg>();
        if start_paused {
            // Every vCPU parks before its first KVM_RUN.
            machine.pause.request();
        }
        let control = Arc::new(RunControl::new(start_paused, tx.clone()));
        let mut handles = Vec::new();
        let gate = Arc::new(StartGate::default());
        {
            let mut threads = control.lock_threads();
            for mut v in vcpus {
                let tx = tx.clone();
                let opened = gate.clone();
                let spawned =
                    thread::Builder::new()
                        .name(vcpu_thread_name(v.id))
                        .spawn(move || {
                            // Report even a panic: the supervisor counts one message per vCPU.
                            let id = v.id;
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                seccomp_vcpu(id)?;
                                if !opened.wait() {
                                    return Ok(VcpuStop::Stopped);
                                }
                                v.run()
                            }))
                            .unwrap_or_else(|_| {
                                Err(VmmError::Vcpu {
                                    cpu: id,
                                    source: VcpuError::Panicked,
                                })
                            });
                            let _ = tx.send(Msg::Vcpu(id, r, v.take_report()));
                        });
                match spawned {
                    Ok(h) => {
                        threads.push(h.as_pthread_t());
                        handles.push(h);
                    }
                    Err(e) => {
                        // End the vCPUs already started.
                        drop(threads);
                        gate.set(false);
                        control.end(&machine);
                        control.kick_all();
                        return Err(VmmError::Thread(e));
                    }
                }
            }
        }
        // The main thread's filter (the threads it starts from now on inherit it), then the
        // guest may run.
        let guarded = vessel_seccomp::apply(vessel_seccomp::ThreadKind::Vmm)
            .map_err(VmmError::Seccomp)
            .and_then(|()| match stdio {
                true => machine
                    .legacy
                    .start_stdin_pump(quit.clone(), machine.exit.clone()),
                false => Ok(()),
            });
        if let Err(e) = guarded {
            gate.set(false);
            control.end(&machine);
            return Err(e);
        }
        gate.set(true);
        drop(tx);
        for f in after_start {
            f();
        }
        Ok(RunningVm {
            handle: VmHandle {
                machine: machine.clone(),
                control,
            },
            supervisor: Some(Supervisor {
                machine,
                rx,
                handles,
                raw,
                quit,
                kernel_source,
                to_first_run,
                since_spawn,
            }),
        })
    }
}

/// A VM whose vCPUs run. [`RunningVm::wait`] supervises it until it ends and tears it down;
/// [`RunningVm::handle`] controls it meanwhile. Dropping it stops the VM and waits for it.
pub struct RunningVm {
    handle: VmHandle,
    supervisor: Option<Supervisor>,
}

/// What only the thread waiting for the VM holds.
struct Supervisor {
    // The vCPU threads hold the machine too: the guest never runs on memory or devices that
    // are gone.
    machine: Arc<Machine>,
    rx: mpsc::Receiver<Msg>,
    handles: Vec<thread::JoinHandle<()>>,
    raw: Option<terminal::RawTerminal>,
    /// Set by Ctrl-A x on the console.
    quit: Arc<AtomicBool>,
    kernel_source: Option<String>,
    to_first_run: Duration,
    since_spawn: Option<Duration>,
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            // The guest must not outlive its memory: stop it and join the vCPUs.
            let c = &self.handle.control;
            c.stop_requested.store(true, Ordering::Release);
            let _ = s.supervise(c);
        }
    }
}

impl RunningVm {
    /// A handle to control the VM from any thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Waits for the first vCPU to end, a device's request, the user, a signal or
    /// [`VmHandle::stop`]; then stops every vCPU, joins them and reports.
    pub fn wait(mut self) -> Result<VmOutcome, VmmError> {
        match self.supervisor.take() {
            Some(s) => s.supervise(&self.handle.control),
            None => Err(VmmError::AlreadyWaited),
        }
    }
}

/// The first reason to end the VM among the flags the supervisor watches.
fn requested_end(m: &Machine, c: &RunControl, quit: &AtomicBool) -> Option<ExitReason> {
    if let Some(r) = m.exit.reason() {
        return Some(match r {
            VmExitReason::PowerOff => ExitReason::PowerOff,
            VmExitReason::Reset => ExitReason::Reset,
        });
    }
    let flags = [
        (quit, ExitReason::UserQuit),
        (&SIGNALLED, ExitReason::Signal),
        (&c.migrated, ExitReason::Migrated),
        (&c.stop_requested, ExitReason::Stopped),
    ];
    flags
        .into_iter()
        .find(|(flag, _)| flag.load(Ordering::Acquire))
        .map(|(_, reason)| reason)
}

type VcpuResult = (Result<VcpuStop, VmmError>, VcpuReport);

impl Supervisor {
    fn supervise(self, control: &RunControl) -> Result<VmOutcome, VmmError> {
        let m = &self.machine;
        let config = &m.config;
        let tick =
            Duration::from_millis(config.profile_ms.unwrap_or(if m.nested { 20 } else { 100 }));
        let periodic_kicks = m.nested || config.profile_ms.is_some();
        let mut results: Vec<Option<VcpuResult>> = (0..m.vcpus()).map(|_| None).collect();
        let mut first_reason: Option<ExitReason> = None;
        let mut remaining = m.vcpus();
        // The control handle holds a sender too: count vCPU messages, not senders.
        while remaining > 0 {
            match self.rx.recv_timeout(tick) {
                Ok(Msg::Vcpu(id, r, rep)) => {
                    remaining -= 1;
                    if first_reason.is_none() {
                        first_reason = match &r {
                            Ok(VcpuStop::Guest(VmExitReason::PowerOff)) => {
                                Some(ExitReason::PowerOff)
                            }
                            Ok(VcpuStop::Guest(VmExitReason::Reset)) => Some(ExitReason::Reset),
                            _ => None,
                        };
                    }
                    if let Some(slot) = results.get_mut(id as usize) {
                        *slot = Some((r, rep));
                    }
                    control.end(m);
                    control.kick_all();
                }
                Ok(Msg::Wake) | Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(r) = requested_end(m, control, &self.quit) {
                        first_reason.get_or_insert(r);
                        control.end(m);
                    }
                    if periodic_kicks || m.stopping() {
                        control.kick_all();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        control.lock_threads().clear();
        for h in self.handles {
            let _ = h.join();
        }
        let wall = control.started.elapsed();
        m.legacy.flush();
        if let Some(fw) = &m.firmware {
            fw.sync();
        }
        drop(self.raw);

        let mut reports = Vec::new();
        let mut error = None;
        for (r, rep) in results.into_iter().flatten() {
            if let Err(e) = r {
                error.get_or_insert(e);
            }
            reports.push(rep);
        }
        // A guest request wins over a vCPU stopping with an error afterwards.
        if let (Some(e), None) = (error, first_reason) {
            return Err(e);
        }
        let profile = config.profile_ms.map(|ms| {
            let system_map = match &config.boot {
                Payload::Linux { system_map, .. } => system_map.as_deref(),
                Payload::Demo | Payload::Firmware(_) => None,
            };
            crate::profile::vm_profile(&reports, system_map, Duration::from_millis(ms))
        });
        let stats = VmStats {
            nested: m.nested,
            to_first_run: self.to_first_run,
            wall,
            vcpus: reports,
            unhandled_io: m.io_bus.unhandled(),
            unhandled_mmio: m.mmio_bus.unhandled(),
            profile,
            kernel: self.kernel_source,
            since_spawn: self.since_spawn,
            devices: m.virtio().stats_lines(),
        };
        Ok(VmOutcome {
            reason: first_reason.unwrap_or(ExitReason::Signal),
            stats,
        })
    }
}

/// Installs the vCPU filter on the calling (vCPU) thread, before its first `KVM_RUN`.
fn seccomp_vcpu(cpu: u8) -> Result<(), VmmError> {
    vessel_seccomp::apply(vessel_seccomp::ThreadKind::Vcpu).map_err(|e| VmmError::Vcpu {
        cpu,
        source: VcpuError::Seccomp(e),
    })
}

/// Starts helper thread `name` before the VM (it does not inherit the main thread's filter)
/// with the VMM filter installed first; fails closed: when the filter cannot be installed,
/// `f` never runs and the error is returned (see [`vessel_seccomp::spawn`]).
pub fn spawn_helper<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<Option<T>>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    vessel_seccomp::spawn(name, vessel_seccomp::ThreadKind::Vmm, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_carry_firecracker_s_names_whole() {
        assert_eq!(vcpu_thread_name(0), "fc_vcpu 0");
        // The kernel's view of a thread so named: nothing cut off, even for the last index.
        let name = vcpu_thread_name(u8::MAX);
        assert!(name.len() <= 15, "{name}");
        let comm = thread::Builder::new()
            .name(name.clone())
            .spawn(|| {
                // SAFETY: the gettid system call takes no arguments and cannot fail.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap()
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(comm.trim_end(), name);
    }
}
