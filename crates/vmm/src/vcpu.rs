//! One vCPU thread: `KVM_RUN` and the exit loop.
//!
//! The exit path is allocation-free and takes only the lock of the device it touches. Port and
//! MMIO exits go to the buses; everything the nested-host fallback needs goes to
//! [`NestedVcpu`]; the VMM's main thread stops a vCPU by setting `stop` and kicking the thread
//! with [`KICK_SIGNAL`] so that `KVM_RUN` returns. Pausing is the same kick, after which the
//! thread parks on the [`PauseGate`] until it is released.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vessel_devices::{ExitSignal, VmExitReason};
use vessel_kvm::snapshot::VcpuState;

use crate::error::{VcpuError, VmmError};
use crate::machine::Machine;
use crate::nested::{NestedStats, NestedVcpu};

/// The signal that interrupts `KVM_RUN` (a real-time signal with an empty handler).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Why a vCPU thread ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for it (power-off, reset), through a device or KVM.
    Guest(VmExitReason),
    /// The VMM stopped it.
    Stopped,
}

/// What the run loop does after one exit.
#[derive(Debug)]
enum Next {
    Continue,
    Stop(VcpuStop),
    Fail(VcpuError),
}

/// Where vCPU threads park while the VM is paused.
///
/// The exit loop only loads [`PauseGate::requested`] (one atomic) per exit; the VMM sets it,
/// kicks every vCPU out of `KVM_RUN`, and waits in [`PauseGate::wait_parked`] until each has
/// parked on the condition variable. [`PauseGate::release`] lets them go.
///
/// Parked vCPUs also serve state requests: [`PauseGate::save_states`] asks each to read its
/// own registers (a vCPU's state is read on its own thread, outside `KVM_RUN`).
#[derive(Debug, Default)]
pub struct PauseGate {
    requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// How many vCPU threads are parked.
    parked: usize,
    /// A state request is open.
    saving: bool,
    /// The MSRs to read.
    msrs: Arc<Vec<u32>>,
    /// One slot per vCPU, filled by the vCPU.
    saved: Vec<Option<Result<VcpuState, vessel_kvm::KvmError>>>,
}

impl PauseGate {
    /// Whether vCPUs should park at their next exit.
    #[inline]
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks vCPUs to park (the caller kicks them out of `KVM_RUN`).
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// Lets parked vCPUs run again.
    pub fn release(&self) {
        let _guard = self.lock();
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Wakes parked vCPUs so they see `stop` (the VM is ending).
    pub fn wake_all(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks the calling vCPU thread until released or until `stop` is set, answering state
    /// requests with `save` meanwhile.
    fn park(
        &self,
        stop: &AtomicBool,
        id: usize,
        mut save: impl FnMut(&[u32]) -> Result<VcpuState, vessel_kvm::KvmError>,
    ) {
        let mut st = self.lock();
        st.parked += 1;
        self.changed.notify_all();
        loop {
            if st.saving && st.saved.get(id).is_some_and(|s| s.is_none()) {
                let msrs = st.msrs.clone();
                let r = save(&msrs);
                st.saved[id] = Some(r);
                self.changed.notify_all();
            }
            if !self.requested() || stop.load(Ordering::Acquire) {
                break;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for at least `count` vCPUs to be parked; true if they are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |st| st.parked < count)
            .unwrap_or_else(|e| e.into_inner());
        guard.parked >= count
    }

    /// Has each of the `count` parked vCPUs read its state (with `msrs`); returns them in vCPU
    /// order. The vCPUs must all be parked (the VM paused).
    pub fn save_states(
        &self,
        count: usize,
        msrs: Vec<u32>,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, VcpuStateError> {
        let st = self.lock();
        // A VM started paused may still be on its way to the gate.
        let (mut st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.parked < count)
            .unwrap_or_else(|e| e.into_inner());
        if st.parked < count {
            return Err(VcpuStateError::NotPaused);
        }
        st.saving = true;
        st.msrs = Arc::new(msrs);
        st.saved = (0..count).map(|_| None).collect();
        self.changed.notify_all();
        let (mut st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.saved.iter().any(Option::is_none))
            .unwrap_or_else(|e| e.into_inner());
        st.saving = false;
        let saved = std::mem::take(&mut st.saved);
        let mut out = Vec::with_capacity(count);
        for (i, s) in saved.into_iter().enumerate() {
            match s {
                Some(Ok(v)) => out.push(v),
                Some(Err(source)) => return Err(VcpuStateError::Read { cpu: i, source }),
                None => return Err(VcpuStateError::Timeout { cpu: i, timeout }),
            }
        }
        Ok(out)
    }
}

/// Why [`PauseGate::save_states`] got no state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("the vCPUs are not all paused")]
    NotPaused,
    #[error("vCPU {cpu}")]
    Read {
        cpu: usize,
        #[source]
        source: vessel_kvm::KvmError,
    },
    #[error("vCPU {cpu} did not report its state in {timeout:?}")]
    Timeout { cpu: usize, timeout: Duration },
}

/// Counters a vCPU keeps about its own run.
#[derive(Debug, Default, Clone)]
pub struct VcpuReport {
    pub exits: u64,
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub kicks: u64,
    pub nested: NestedStats,
    /// Guest RIPs sampled at kicks, when profiling.
    pub samples: Vec<u64>,
}

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    machine: Arc<Machine>,
    nested: Option<NestedVcpu>,
    profile: bool,
    pub report: VcpuReport,
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd, machine: Arc<Machine>, nested: bool, profile: bool) -> Self {
        Vcpu {
            id,
            fd,
            machine,
            nested: nested.then(NestedVcpu::new),
            profile,
            report: VcpuReport {
                samples: if profile {
                    Vec::with_capacity(1 << 16)
                } else {
                    Vec::new()
                },
                ..Default::default()
            },
        }
    }

    fn fail(&self, source: VcpuError) -> VmmError {
        VmmError::Vcpu {
            cpu: self.id,
            source,
        }
    }

    /// Run until the guest or the VMM ends the VM.
    pub fn run(&mut self) -> Result<VcpuStop, VmmError> {
        loop {
            if self.machine.stopping() {
                return Ok(VcpuStop::Stopped);
            }
            if self.machine.pause.requested() {
                // The state read while parked must be whole: finish the last exit first.
                match self.complete_last_exit()? {
                    Next::Continue => {}
                    Next::Stop(s) => return Ok(s),
                    Next::Fail(reason) => return Err(self.fail(reason)),
                }
                let fd = &self.fd;
                let m = &self.machine;
                m.pause
                    .park(&m.stop, self.id as usize, |msrs| VcpuState::save(fd, msrs));
                continue;
            }
            let next = match self.fd.run() {
                Ok(exit) => {
                    self.report.exits += 1;
                    match handle_exit(exit, &self.machine, &mut self.report) {
                        Some(n) => n,
                        None => self.slow_exit()?,
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.report.kicks += 1;
                    if self.profile {
                        if let Ok(regs) = self.fd.get_regs() {
                            if self.report.samples.len() < self.report.samples.capacity() {
                                self.report.samples.push(regs.rip);
                            }
                        }
                    }
                    Next::Continue
                }
                Err(e) => Next::Fail(VcpuError::Run(e)),
            };
            match next {
                Next::Continue => {}
                Next::Stop(s) => return Ok(s),
                Next::Fail(reason) => return Err(self.fail(reason)),
            }
            if let Some(n) = self.nested.as_mut() {
                n.maybe_recheck(&self.fd, &self.machine.mem)
                    .map_err(|e| self.fail(VcpuError::Setup(Box::new(e))))?;
            }
        }
    }

    /// Has KVM finish the operation of the last exit, without running the guest any further.
    ///
    /// KVM completes a port-I/O or MMIO exit (the data of an IN or MMIO read into its register,
    /// RIP past the instruction, the next fragment of a string or split access) only on the
    /// next `KVM_RUN`; until then the registers show the instruction not done, and a snapshot
    /// taken then would run an OUT or MMIO write again after restore, or lose an IN's data.
    /// `KVM_RUN` with `immediate_exit` set completes what is pending and returns `EINTR` before
    /// any guest instruction runs (KVM's API documentation, `immediate_exit` and "the
    /// corresponding operations are complete ... only after userspace has re-entered the kernel
    /// with KVM_RUN"); an exit it returns instead (a further fragment) is handled and the
    /// completion goes on.
    ///
    /// Done on every park rather than only after an I/O exit: a pause is rare, the extra
    /// `KVM_RUN` with nothing pending costs a few microseconds, it covers every exit KVM
    /// completes lazily, and the exit path keeps no per-exit bookkeeping.
    fn complete_last_exit(&mut self) -> Result<Next, VmmError> {
        loop {
            self.fd.set_kvm_immediate_exit(1);
            let next = match self.fd.run() {
                Ok(exit) => {
                    self.report.exits += 1;
                    handle_exit(exit, &self.machine, &mut self.report)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Ok(Next::Continue);
                }
                Err(e) => Some(Next::Fail(VcpuError::Run(e))),
            };
            self.fd.set_kvm_immediate_exit(0);
            let next = match next {
                Some(n) => n,
                None => self.slow_exit()?,
            };
            if !matches!(next, Next::Continue) {
                return Ok(next);
            }
        }
    }

    /// Exits that need the vCPU itself (registers, the nested fallback). Re-runs `KVM_RUN`'s
    /// exit decoding through `kvm_run`, which still holds the last exit.
    fn slow_exit(&mut self) -> Result<Next, VmmError> {
        let reason = self.fd.get_kvm_run().exit_reason;
        let id = self.id;
        let with_cpu = |e: VmmError| match e {
            VmmError::Vcpu { source, .. } => VmmError::Vcpu { cpu: id, source },
            e => VmmError::Vcpu {
                cpu: id,
                source: VcpuError::Setup(Box::new(e)),
            },
        };
        match reason {
            kvm_bindings::KVM_EXIT_DEBUG => {
                // SAFETY: the exit reason is KVM_EXIT_DEBUG, so the `debug` member is the one
                // KVM filled; it holds plain integers.
                let pc = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.debug.arch.pc };
                match self.nested.as_mut() {
                    Some(n) => n
                        .on_debug(&self.fd, &self.machine.mem, pc)
                        .map_err(with_cpu)?,
                    None => return Ok(Next::Fail(VcpuError::UnexpectedDebug(pc))),
                }
                Ok(Next::Continue)
            }
            kvm_bindings::KVM_EXIT_INTERNAL_ERROR => {
                let rom = self.machine.firmware.as_ref().map(|f| f.memory());
                // Without the fallback on, a completion is still fine: keep going.
                let mut fresh;
                let n = match self.nested.as_mut() {
                    Some(n) => n,
                    None => {
                        fresh = NestedVcpu::new();
                        &mut fresh
                    }
                };
                n.on_internal_error(&mut self.fd, &self.machine.mem, rom)
                    .map_err(with_cpu)?;
                Ok(Next::Continue)
            }
            other => Ok(Next::Fail(VcpuError::UnexpectedExit(other))),
        }
    }

    /// Everything this vCPU counted, ready for the VM's report.
    pub fn take_report(&mut self) -> VcpuReport {
        if let Some(n) = &self.nested {
            self.report.nested = n.stats;
        }
        std::mem::take(&mut self.report)
    }
}

/// Handle the exits that need only the buses; `None` for those that need the vCPU.
fn handle_exit(exit: VcpuExit<'_>, shared: &Machine, report: &mut VcpuReport) -> Option<Next> {
    Some(match exit {
        VcpuExit::IoIn(port, data) => {
            report.io_exits += 1;
            shared.io_bus.read(port as u64, data);
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            report.io_exits += 1;
            shared.io_bus.write(port as u64, data);
            guest_request(&shared.exit)
        }
        VcpuExit::MmioRead(addr, data) => {
            report.mmio_exits += 1;
            shared.mmio_bus.read(addr, data);
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            report.mmio_exits += 1;
            shared.mmio_bus.write(addr, data);
            guest_request(&shared.exit)
        }
        VcpuExit::Shutdown => {
            // A triple fault: a PC resets.
            log::info!("the guest triple-faulted: resetting");
            Next::Stop(VcpuStop::Guest(VmExitReason::Reset))
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VcpuStop::Guest(VmExitReason::PowerOff)),
            KVM_SYSTEM_EVENT_RESET => Next::Stop(VcpuStop::Guest(VmExitReason::Reset)),
            KVM_SYSTEM_EVENT_CRASH => Next::Fail(VcpuError::GuestCrashed),
            other => Next::Fail(VcpuError::UnexpectedSystemEvent(other)),
        },
        VcpuExit::Hlt => Next::Fail(VcpuError::Halted),
        VcpuExit::FailEntry(reason, cpu) => Next::Fail(VcpuError::FailEntry { reason, cpu }),
        VcpuExit::Intr => Next::Continue,
        VcpuExit::Debug(_) | VcpuExit::InternalError => return None,
        other => Next::Fail(VcpuError::Unhandled(format!("{other:?}"))),
    })
}

/// After a guest write: did a device ask to end the VM?
fn guest_request(exit: &ExitSignal) -> Next {
    match exit.reason() {
        Some(r) => Next::Stop(VcpuStop::Guest(r)),
        None => Next::Continue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_devices::Bus;
    use vessel_memory::GuestMemoryMmap;

    /// A stand-in for the exit loop: parks whenever asked, counts its iterations.
    fn spawn_loop(
        gate: Arc<PauseGate>,
        stop: Arc<AtomicBool>,
        count: Arc<std::sync::atomic::AtomicU64>,
        id: usize,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            if gate.requested() {
                gate.park(&stop, id, |msrs| Ok(fake_state(id as u64, msrs.len())));
                continue;
            }
            count.fetch_add(1, Ordering::Relaxed);
            std::thread::yield_now();
        })
    }

    /// A vCPU state with `rax` = the vCPU's id and one MSR per requested index.
    fn fake_state(id: u64, msrs: usize) -> VcpuState {
        VcpuState {
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rax: id,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![(0, 0); msrs],
            events: Default::default(),
            tsc_khz: None,
            cpuid: None,
        }
    }

    #[test]
    fn parked_threads_report_their_state_in_order() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|i| spawn_loop(gate.clone(), stop.clone(), count.clone(), i))
            .collect();
        // Not paused: refused rather than read from running vCPUs.
        assert!(gate
            .save_states(3, vec![1], Duration::from_millis(50))
            .is_err());
        gate.request();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        let states = gate
            .save_states(3, vec![1, 2], Duration::from_secs(10))
            .unwrap();
        let ids: Vec<u64> = states.iter().map(|s| s.regs.rax).collect();
        assert_eq!(ids, [0, 1, 2]);
        assert!(states.iter().all(|s| s.msrs.len() == 2));
        // A second request is answered too.
        assert_eq!(
            gate.save_states(3, vec![], Duration::from_secs(10))
                .unwrap()
                .len(),
            3
        );
        stop.store(true, Ordering::Release);
        gate.wake_all();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn pause_gate_parks_and_releases_every_thread() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Vec<_> = (0..3)
            .map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)))
            .collect();
        let threads: Vec<_> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| spawn_loop(gate.clone(), stop.clone(), c.clone(), i))
            .collect();
        gate.request();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        // Parked threads make no progress.
        let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        std::thread::sleep(Duration::from_millis(50));
        let after: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(before, after);
        gate.release();
        // Released, they run again.
        for (c, b) in counts.iter().zip(&before) {
            while c.load(Ordering::Relaxed) == *b {
                std::thread::yield_now();
            }
        }
        // Paused again, `stop` plus a wake ends them.
        gate.request();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        stop.store(true, Ordering::Release);
        gate.wake_all();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A port (and MMIO byte) that answers reads with 0x42, records writes, and asks the vCPUs to pause on
    /// each access: the vCPU parks right after handling the exit, with KVM's part of it
    /// (the IN's data into AL, RIP past the instruction) still to do.
    struct PausingPort {
        gate: Arc<PauseGate>,
        reads: Arc<std::sync::atomic::AtomicU64>,
        writes: Arc<Mutex<Vec<u8>>>,
    }

    impl vessel_devices::BusDevice for PausingPort {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
            self.reads.fetch_add(1, Ordering::Release);
            self.gate.request();
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().extend_from_slice(data);
            self.gate.request();
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A vCPU paused right after a port or MMIO exit reports the instruction done: an IN's or
    /// MMIO read's data in AL and RIP past it, an OUT's RIP past it (a snapshot taken there
    /// would otherwise lose the data read, or run the OUT again after restore).
    #[test]
    fn a_vcpu_paused_after_an_io_exit_saves_the_instruction_completed() {
        use vessel_memory::vm_memory::{Bytes, GuestAddress};
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("note: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000)]).unwrap();
        // Real mode at 0x1000: in al, dx; inc al; out dx, al; mov al, [0xc000] (MMIO); jmp $.
        let code = [0xec, 0xfe, 0xc0, 0xee, 0xa0, 0x00, 0xc0, 0xeb, 0xfe];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        crate::kvm_vm::register_memory(&vm, &mem, false).unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        fd.set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rdx: 0x500,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();

        let gate = Arc::new(PauseGate::default());
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let mut io_bus = Bus::new();
        let port = PausingPort {
            gate: gate.clone(),
            reads: reads.clone(),
            writes: writes.clone(),
        };
        let port = Arc::new(Mutex::new(port));
        io_bus.insert(port.clone(), 0x500, 1).unwrap();
        let mut mmio_bus = Bus::new();
        mmio_bus.insert(port, 0xc000, 1).unwrap();
        let machine = Arc::new(Machine::for_test(vm, mem, io_bus, mmio_bus, gate.clone()));
        let mut vcpu = Vcpu::new(0, fd, machine.clone(), false, false);
        let thread = std::thread::spawn(move || vcpu.run().map_err(|e| e.to_string()));
        let saved = |gate: &PauseGate| {
            gate.save_states(1, Vec::new(), Duration::from_secs(10))
                .unwrap()
        };

        wait_for("the IN", || reads.load(Ordering::Acquire) == 1);
        let s = saved(&gate);
        assert_eq!(
            (s[0].regs.rip, s[0].regs.rax & 0xff),
            (0x1001, 0x42),
            "the IN is completed before the state is read"
        );
        gate.release();
        wait_for("the OUT", || !writes.lock().unwrap().is_empty());
        let s = saved(&gate);
        assert_eq!(s[0].regs.rip, 0x1004, "the OUT is completed too");
        assert_eq!(*writes.lock().unwrap(), [0x43]);
        gate.release();
        wait_for("the MMIO read", || reads.load(Ordering::Acquire) == 2);
        let s = saved(&gate);
        assert_eq!(
            (s[0].regs.rip, s[0].regs.rax & 0xff),
            (0x1007, 0x42),
            "and the MMIO read"
        );
        // Parked, it ends on `stop` without running the guest again.
        machine.stop.store(true, Ordering::Release);
        gate.wake_all();
        assert_eq!(thread.join().unwrap(), Ok(VcpuStop::Stopped));
        assert_eq!(*writes.lock().unwrap(), [0x43]);
        drop(machine);
    }

    #[test]
    fn pause_gate_wait_gives_up() {
        let gate = PauseGate::default();
        gate.request();
        // Nobody parks.
        assert!(!gate.wait_parked(1, Duration::from_millis(20)));
    }
}
