//! Building a VM from a [`VmConfig`] and running it to the end.
//!
//! [`Vm::build`] sets everything up, [`Vm::start`] starts the vCPU threads and returns a
//! [`RunningVm`], whose [`VmHandle`] pauses, resumes, types Ctrl-Alt-Del or stops it from any
//! thread while [`RunningVm::wait`] supervises it to the end. [`run`] does all three.
//!
//! Order matters to KVM: the VM with its TSS and identity-map pages, guest memory, the
//! in-kernel irqchip and PIT, then the vCPUs (see [`crate::kvm_vm`] for why memory comes before
//! the irqchip). The boot image and tables are written before any vCPU runs.

use std::fs::File;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vessel_boot::{BootConfig, BootRegs, EntryMode};
use vessel_devices::i8042::I8042;
use vessel_devices::{Bus, ExitSignal, VmExitReason};
use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{addr, create_guest_memory, GuestLayout, GuestMemoryMmap};

use crate::config::{BootSource, NestedMode, VmConfig, DEFAULT_CMDLINE};
use crate::cpu;
use crate::devices::LegacyDevices;
use crate::error::{KvmContext, VmmError};
pub use crate::kvm_vm::register_memory;
use crate::profile;
use crate::terminal;
use crate::vcpu::{kick_signal, PauseGate, Vcpu, VcpuReport, VcpuShared, VcpuStop};

/// The most vCPUs a VM can have: APIC ids 0..=254 (255 is the xAPIC broadcast id).
pub const MAX_CPUS: usize = 255;

/// How the VM ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    pub reason: ExitReason,
    pub stats: VmStats,
}

/// The end of a VM as the user sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
    /// Ctrl-A x on the console.
    UserQuit,
    /// SIGINT or SIGTERM to the VMM.
    Signal,
    /// [`VmHandle::stop`].
    Stopped,
    /// Live-migrated to another process, which runs it now.
    Migrated,
}

/// Figures about a finished VM.
#[derive(Debug, Clone, Default)]
pub struct VmStats {
    pub nested: bool,
    /// From `run` being called to the boot vCPU's first `KVM_RUN`.
    pub to_first_run: Duration,
    /// From the moment given in `VESSEL_SPAWN_NS` (CLOCK_MONOTONIC, set by a benchmark just
    /// before it starts this process) to the first `KVM_RUN`.
    pub since_spawn: Option<Duration>,
    pub wall: Duration,
    pub vcpus: Vec<VcpuReport>,
    pub unhandled_io: (u64, u64),
    pub unhandled_mmio: (u64, u64),
    pub profile: Option<String>,
    /// How the kernel was loaded (e.g. decompressed on the host), for Linux guests.
    pub kernel: Option<String>,
    /// One line per virtio device that keeps statistics (disks: requests per wake-up).
    pub devices: Vec<String>,
}

impl VmStats {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if let Some(k) = &self.kernel {
            s += &format!("vessel: kernel: {k}\n");
        }
        if let Some(d) = self.since_spawn {
            s += &format!(
                "vessel: first KVM_RUN {:.3} ms after process spawn\n",
                d.as_secs_f64() * 1e3
            );
        }
        s += &format!(
            "vessel: first KVM_RUN after {:.2} ms, VM ran {:.3} s; nested fallback {}\n",
            self.to_first_run.as_secs_f64() * 1e3,
            self.wall.as_secs_f64(),
            if self.nested { "on" } else { "off" }
        );
        for (i, v) in self.vcpus.iter().enumerate() {
            s += &format!(
                "vessel: vCPU {i}: {} exits ({} port, {} mmio), {} kicks; {} syscalls redirected, {} faults stepped, {} instructions completed\n",
                v.exits, v.io_exits, v.mmio_exits, v.kicks, v.nested.syscalls, v.nested.faults_stepped, v.nested.completed
            );
        }
        s += &format!(
            "vessel: unhandled port reads/writes {}/{}, mmio {}/{}\n",
            self.unhandled_io.0, self.unhandled_io.1, self.unhandled_mmio.0, self.unhandled_mmio.1
        );
        for line in &self.devices {
            s += line;
            s.push('\n');
        }
        if let Some(p) = &self.profile {
            s += p;
        }
        s
    }
}

/// Set by the SIGINT/SIGTERM handler.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
extern "C" fn on_term(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(true, Ordering::Release);
}

fn open_file(path: &std::path::Path) -> Result<File, VmmError> {
    File::open(path).map_err(|source| VmmError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Time since the spawn instant a benchmark put in `VESSEL_SPAWN_NS`.
fn since_spawn() -> Option<Duration> {
    let t: u64 = std::env::var("VESSEL_SPAWN_NS").ok()?.parse().ok()?;
    Some(Duration::from_nanos(monotonic_ns().checked_sub(t)?))
}

/// Host RAM in bytes, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Check what can be checked before touching KVM.
pub fn validate(config: &VmConfig, max_vcpus: usize) -> Result<GuestLayout, VmmError> {
    if config.cpus == 0 {
        return Err(VmmError::NoCpus(0));
    }
    // APIC id 255 is the broadcast id: xAPIC guests can have at most 255 CPUs (0..=254).
    let max = max_vcpus.min(MAX_CPUS);
    if config.cpus as usize > max {
        return Err(VmmError::TooManyCpus {
            requested: config.cpus,
            max,
        });
    }
    let layout = GuestLayout::new(config.memory)?;
    if let Some(host) = host_memory() {
        if config.memory > host {
            return Err(VmmError::MemoryExceedsHost {
                requested: config.memory >> 20,
                host: host >> 20,
            });
        }
    }
    Ok(layout)
}

/// The command line the guest gets.
pub fn compose_cmdline(config: &VmConfig, nested_params: Option<&str>) -> String {
    let mut s = config
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if let Some(p) = nested_params {
        s.push(' ');
        s.push_str(p);
    }
    for a in &config.append {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Load what boots: returns the boot CPU's registers and, for Linux, how the kernel was
/// loaded.
fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    nested_params: Option<&str>,
    platform: &vessel_boot::PlatformDevices,
) -> Result<(BootRegs, Option<String>), VmmError> {
    match &config.boot {
        BootSource::Demo => {
            let code = crate::demo::code();
            mem.write_slice(&code, GuestAddress(addr::HIMEM_START))
                .map_err(|e| VmmError::Device(format!("demo guest: {e}")))?;
            let regs = BootRegs {
                rip: addr::HIMEM_START,
                rsp: addr::BOOT_STACK_POINTER,
                rsi: 0,
                rbx: 0,
                rflags: 2,
                mode: EntryMode::Long64,
            };
            Ok((regs, None))
        }
        BootSource::Linux { kernel, initrd, .. } => {
            let num_cpus = config.cpus as u8;
            let mut kf = open_file(kernel)?;
            let loaded = vessel_boot::load_kernel(mem, layout, &mut kf)?;
            let initrd = match initrd {
                Some(p) => Some(vessel_boot::load_initrd(
                    mem,
                    layout,
                    &loaded,
                    &mut open_file(p)?,
                )?),
                None => None,
            };
            let rsdp = vessel_boot::create_acpi_tables(mem, num_cpus, platform)?;
            vessel_boot::create_mptable(mem, num_cpus)?;
            let mut cmdline = compose_cmdline(config, nested_params);
            // Without ACPI the kernel cannot see the DSDT's virtio-mmio devices: name them on
            // the command line instead (kernels with VIRTIO_MMIO_CMDLINE_DEVICES).
            if cmdline.split_whitespace().any(|w| w == "acpi=off") {
                for d in &platform.virtio_mmio {
                    cmdline.push(' ');
                    cmdline += &vessel_virtio::mmio::cmdline_entry(d.base, d.irq);
                }
            }
            log::info!("kernel command line: {cmdline}");
            let cfg = BootConfig {
                cmdline: &cmdline,
                initrd,
                num_cpus,
                rsdp_addr: Some(rsdp),
                // Entropy for the guest's CRNG from the first instruction: without it, a guest
                // whose kernel code is emulated spends a large share of its boot mixing
                // entropy it never gets enough of.
                rng_seed: Some(vessel_boot::host_rng_seed()?),
            };
            let regs = vessel_boot::configure_boot(mem, layout, &loaded, &cfg)?;
            Ok((regs, Some(loaded.source().to_string())))
        }
    }
}

/// The kernel parameters for a nested host: the fixed set from `vessel_kvm::nested`, plus the
/// TSC frequency, which such a guest cannot calibrate (no PIT behind a hardware-reduced ACPI
/// platform, no kvmclock with `nopv`).
fn nested_params(vcpu: &kvm_ioctls::VcpuFd) -> String {
    let mut p = vessel_kvm::nested::nested_kernel_params();
    if let Ok(khz) = vcpu.get_tsc_khz() {
        p += &format!(" tsc_early_khz={khz}");
    }
    p
}

/// Build the VM described by `config`, run it until it ends, and tear it down.
pub fn run(config: &VmConfig) -> Result<VmOutcome, VmmError> {
    Vm::build(config)?.start()?.wait()
}

/// A VM built and ready to run: memory, devices, the boot image and the vCPUs are set up;
/// no vCPU has run yet.
pub struct Vm {
    config: VmConfig,
    t0: Instant,
    // Kept alive for as long as the VM runs (MSI routes, ioeventfds and irqfds are on it).
    _vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    devices: LegacyDevices,
    virtio: crate::virtio::VirtioManager,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: ExitSignal,
    stop: Arc<AtomicBool>,
    pause: Arc<PauseGate>,
    nested: bool,
    kernel_source: Option<String>,
    start_paused: bool,
    /// Run once the vCPU threads exist (e.g. recording a restored guest's working set).
    after_start: Vec<Box<dyn FnOnce() + Send>>,
    vmgenid: Option<crate::vmgenid::VmGenIdState>,
}

impl Vm {
    /// Builds the VM described by `config`, up to the first `KVM_RUN`.
    pub fn build(config: &VmConfig) -> Result<Vm, VmmError> {
        Vm::assemble(config, None)
    }

    /// Builds a VM from a snapshot (see [`crate::snapshot::restore`]): `config` is the
    /// snapshot's, `mem` its memory file mapped, `state` everything else.
    pub(crate) fn from_snapshot(
        config: &VmConfig,
        mem: GuestMemoryMmap,
        state: &crate::snapshot::VmSnapshot,
    ) -> Result<Vm, VmmError> {
        Vm::assemble(config, Some((mem, state)))
    }

    fn assemble(
        config: &VmConfig,
        restore: Option<(GuestMemoryMmap, &crate::snapshot::VmSnapshot)>,
    ) -> Result<Vm, VmmError> {
        let t0 = Instant::now();
        let boot_timer = config.boot_timer.then(vessel_devices::BootTimer::start);
        let kvm = vessel_kvm::system::open()?;
        vessel_kvm::system::check_capabilities(&kvm)?;
        let layout = validate(config, vessel_kvm::system::max_vcpus(&kvm))?;

        let nested = match (&restore, config.nested) {
            (Some((_, snap)), _) => snap.nested,
            (None, NestedMode::On) => true,
            (None, NestedMode::Off) => false,
            // The demo guest never leaves ring 0 and makes no system calls: no need to probe.
            (None, NestedMode::Auto) if matches!(config.boot, BootSource::Demo) => false,
            (None, NestedMode::Auto) => vessel_kvm::nested::probe_nested_host(&kvm)?,
        };
        let vm = Arc::new(crate::kvm_vm::create_vm(&kvm)?);
        let (mem, snapshot) = match restore {
            Some((mem, snap)) => (mem, Some(snap)),
            None => (create_guest_memory(&layout)?, None),
        };
        register_memory(&vm, &mem, config.track_dirty_pages)?;
        crate::kvm_vm::create_irqchip_and_pit(&vm)?;
        let mut fds = Vec::with_capacity(config.cpus as usize);
        for id in 0..config.cpus {
            fds.push(vm.create_vcpu(id as u64).kvm("KVM_CREATE_VCPU")?);
        }

        let exit = ExitSignal::new().map_err(|e| VmmError::Device(format!("exit eventfd: {e}")))?;
        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        if let Some(t) = boot_timer {
            mmio_bus
                .insert(
                    Arc::new(Mutex::new(t)),
                    vessel_memory::addr::BOOT_TIMER_START,
                    vessel_devices::boot_timer::BOOT_TIMER_LEN,
                )
                .map_err(|e| VmmError::Device(format!("boot timer: {e}")))?;
        }
        let devices = LegacyDevices::new(&vm, &mut io_bus, &config.serial, &exit)?;
        let virtio = crate::virtio::create(&vm, &mem, &mut io_bus, &mut mmio_bus, &config.devices)?;
        let io_bus = Arc::new(io_bus);
        let mmio_bus = Arc::new(mmio_bus);

        // A new guest gets its boot image and boot registers; a restored one has both in its
        // memory and vCPU state. The same goes for the VM generation ID.
        let vmgenid = match snapshot {
            Some(snap) => snap.vmgenid,
            None => crate::vmgenid::install(&config.boot, &mem)?,
        };
        let boot = match snapshot {
            Some(_) => None,
            None => {
                let nested_params = nested.then(|| nested_params(&fds[0]));
                let platform = vessel_boot::PlatformDevices {
                    vmgenid: vmgenid.map(|v| v.info()),
                    ..virtio.platform().clone()
                };
                let (regs, kernel_source) =
                    load_guest(config, &mem, &layout, nested_params.as_deref(), &platform)?;
                if let (Some(p), NestedMode::Auto) = (&nested_params, config.nested) {
                    eprintln!(
                        "vessel: this host's KVM is nested and emulates guest kernel mode: adding kernel parameters: {p}"
                    );
                }
                let gdt = vessel_boot::write_gdt(&mem, regs.mode)?;
                let cr3 = vessel_boot::write_identity_page_tables(&mem)?;
                Some((regs, gdt, cr3, kernel_source))
            }
        };

        // Restored vCPUs get their saved CPUID; only older state files without it need this.
        let supported = match snapshot {
            Some(snap) if snap.vcpus.iter().all(|v| v.cpuid.is_some()) => None,
            _ => Some(
                kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .kvm("KVM_GET_SUPPORTED_CPUID")?,
            ),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseGate::default());
        let shared = VcpuShared {
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            mem: mem.clone(),
            pause: pause.clone(),
        };
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for (id, fd) in fds.into_iter().enumerate() {
            let id = id as u8;
            match (&boot, snapshot) {
                // Only the CPUID, then the saved state: it overwrites the power-on MSRs, FPU
                // and LAPIC setup a new vCPU gets.
                (_, Some(snap)) => {
                    crate::snapshot::restore_vcpu(&fd, id, snap, supported.as_ref(), nested)?
                }
                (boot, None) => {
                    let supported = supported.as_ref().ok_or_else(|| {
                        VmmError::Device("no supported CPUID for a new vCPU".into())
                    })?;
                    cpu::configure_vcpu(
                        &fd,
                        id,
                        config.cpus as u8,
                        supported,
                        nested,
                        config.cpu_template.as_ref(),
                    )?;
                    if let (Some((regs, gdt, cr3, _)), 0) = (boot, id) {
                        cpu::set_boot_registers(&fd, regs, gdt, *cr3)?;
                    }
                }
            }
            vcpus.push(Vcpu::new(
                id,
                fd,
                shared.clone(),
                nested,
                config.profile_ms.is_some(),
            ));
        }
        if let Some(snap) = snapshot {
            crate::snapshot::restore_machine(&vm, &devices, &virtio, snap)?;
        }
        Ok(Vm {
            config: config.clone(),
            t0,
            _vm: vm,
            mem,
            vcpus,
            devices,
            virtio,
            io_bus,
            mmio_bus,
            exit,
            stop,
            pause,
            nested,
            kernel_source: boot.and_then(|b| b.3),
            start_paused: false,
            after_start: Vec::new(),
            vmgenid,
        })
    }

    /// Runs `f` once [`Vm::start`] has started the vCPUs.
    pub(crate) fn on_start(&mut self, f: Box<dyn FnOnce() + Send>) {
        self.after_start.push(f);
    }

    /// Starts the vCPUs parked: the VM is paused until [`VmHandle::resume`].
    pub fn paused(mut self) -> Self {
        self.start_paused = true;
        self
    }

    /// Starts the vCPU threads (and, with a stdio console, the terminal). The VM runs until
    /// [`RunningVm::wait`] sees it end.
    pub fn start(self) -> Result<RunningVm, VmmError> {
        // The VMM's filter, before any guest code runs (the stdin pump inherits it).
        vessel_seccomp::apply(vessel_seccomp::ThreadKind::Vmm)
            .map_err(|e| VmmError::Device(e.to_string()))?;
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmmError::Device(format!("signal handler: {e}")))?;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            vmm_sys_util::signal::register_signal_handler(sig, on_term)
                .map_err(|e| VmmError::Device(format!("signal handler: {e}")))?;
        }

        let raw = self
            .devices
            .console_is_stdio()
            .then(terminal::RawTerminal::enable)
            .flatten();
        let quit = Arc::new(AtomicBool::new(false));
        if self.devices.console_is_stdio() {
            self.devices
                .start_stdin_pump(quit.clone(), self.exit.clone())?;
        }

        let to_first_run = self.t0.elapsed();
        let since_spawn = since_spawn();
        let started = Instant::now();
        let (tx, rx) = mpsc::channel::<Msg>();
        if self.start_paused {
            // Every vCPU parks before its first KVM_RUN.
            self.pause.request();
        }
        let devices = Arc::new(self.devices);
        let virtio = Arc::new(Mutex::new(self.virtio));
        let control = Arc::new(Control {
            stop: self.stop.clone(),
            pause: self.pause.clone(),
            threads: Mutex::new(Vec::new()),
            i8042: devices.i8042(),
            state: AtomicU8::new(if self.start_paused {
                STATE_PAUSED
            } else {
                STATE_RUNNING
            }),
            stop_requested: AtomicBool::new(false),
            migrated: AtomicBool::new(false),
            wake: Mutex::new(tx.clone()),
            vcpus: self.vcpus.len(),
            started,
            io_bus: self.io_bus.clone(),
            mmio_bus: self.mmio_bus.clone(),
            pauses: AtomicU64::new(0),
            snap: crate::snapshot::Parts {
                vm: self._vm.clone(),
                mem: self.mem.clone(),
                devices: devices.clone(),
                virtio: virtio.clone(),
                config: self.config.clone(),
                nested: self.nested,
                vmgenid: self.vmgenid,
                lock: Mutex::new(()),
                devices_quiesced: AtomicBool::new(false),
            },
        });
        let mut handles = Vec::new();
        let Vm {
            config,
            vcpus,
            io_bus,
            mmio_bus,
            exit,
            stop,
            nested,
            kernel_source,
            _vm,
            mem,
            after_start,
            ..
        } = self;
        {
            let mut threads = control.lock_threads();
            for mut v in vcpus {
                let tx = tx.clone();
                let h = thread::Builder::new()
                    .name(format!("vcpu{}", v.id))
                    .spawn(move || {
                        // Report even a panic: the supervisor counts one message per vCPU.
                        let id = v.id;
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            seccomp_vcpu(id)?;
                            v.run()
                        }))
                        .unwrap_or_else(|_| {
                            Err(VmmError::Vcpu {
                                cpu: id,
                                reason: "the vCPU thread panicked".into(),
                            })
                        });
                        let _ = tx.send(Msg::Vcpu(id, r, v.take_report()));
                    })
                    .map_err(VmmError::Thread);
                let h = match h {
                    Ok(h) => h,
                    Err(e) => {
                        // Stop the vCPUs already running.
                        drop(threads);
                        control.end();
                        control.kick_all();
                        return Err(e);
                    }
                };
                threads.push(h.as_pthread_t());
                handles.push(h);
            }
        }
        drop(tx);
        for f in after_start {
            f();
        }
        Ok(RunningVm {
            control: control.clone(),
            inner: Some(RunningInner {
                config,
                control,
                rx,
                handles,
                devices,
                virtio,
                _vm,
                _mem: mem,
                raw,
                quit,
                io_bus,
                mmio_bus,
                exit,
                stop,
                nested,
                kernel_source,
                to_first_run,
                since_spawn,
            }),
        })
    }
}

/// Messages to the thread waiting for the VM.
enum Msg {
    /// A vCPU thread ended.
    Vcpu(u8, Result<VcpuStop, VmmError>, VcpuReport),
    /// Look at the control flags now.
    Wake,
}

const STATE_RUNNING: u8 = 0;
const STATE_PAUSED: u8 = 1;
const STATE_ENDED: u8 = 2;

/// The state of a started VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// The VM ended (or is ending): control calls fail.
    Ended,
}

/// What a [`VmHandle`] shares with the running VM.
struct Control {
    stop: Arc<AtomicBool>,
    pause: Arc<PauseGate>,
    /// The vCPU threads, to kick; emptied (under the lock) before they are joined.
    threads: Mutex<Vec<libc::pthread_t>>,
    i8042: Arc<Mutex<I8042>>,
    state: AtomicU8,
    stop_requested: AtomicBool,
    /// The VM was handed over by a live migration.
    migrated: AtomicBool,
    wake: Mutex<mpsc::Sender<Msg>>,
    vcpus: usize,
    started: Instant,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    pauses: AtomicU64,
    /// What a snapshot reads.
    snap: crate::snapshot::Parts,
}

impl Control {
    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<libc::pthread_t>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Interrupts `KVM_RUN` on every vCPU thread not yet joined.
    fn kick_all(&self) {
        for &t in self.lock_threads().iter() {
            // SAFETY: pthread_kill with the id of a thread that has not been joined (ids are
            // removed under this lock before the join), and a signal whose handler is
            // installed.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Ends the VM: vCPUs stop at their next exit, parked ones wake up.
    fn end(&self) {
        self.state.store(STATE_ENDED, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        self.pause.wake_all();
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

/// Controls a running VM from any thread. Cheap to clone.
#[derive(Clone)]
pub struct VmHandle {
    control: Arc<Control>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Live figures about a running VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveStats {
    pub vcpus: usize,
    pub uptime: Duration,
    /// Times the VM was paused.
    pub pauses: u64,
    pub unhandled_io: (u64, u64),
    pub unhandled_mmio: (u64, u64),
}

impl VmHandle {
    pub fn state(&self) -> RunState {
        match self.control.state.load(Ordering::Acquire) {
            STATE_RUNNING => RunState::Running,
            STATE_PAUSED => RunState::Paused,
            _ => RunState::Ended,
        }
    }

    fn require_alive(&self) -> Result<(), ControlError> {
        if self.control.stop.load(Ordering::Acquire) {
            return Err(ControlError::Ended);
        }
        Ok(())
    }

    /// Stops every vCPU out of `KVM_RUN` and parks it, then quiesces the virtio devices
    /// (in-flight requests finish); returns once all are stopped. If the devices cannot be
    /// quiesced, the vCPUs run again and the error is returned. Pausing a paused VM does
    /// nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.require_alive()?;
        let c = &self.control;
        if self.state() == RunState::Paused {
            return Ok(());
        }
        c.pause.request();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            // A kick that lands just before a vCPU enters KVM_RUN is lost: kick again until
            // every vCPU has parked.
            c.kick_all();
            if c.pause.wait_parked(c.vcpus, Duration::from_millis(10)) {
                break;
            }
            if c.stop.load(Ordering::Acquire) {
                c.pause.release();
                return Err(ControlError::Ended);
            }
            if Instant::now() >= deadline {
                c.pause.release();
                return Err(ControlError::PauseTimeout(PAUSE_TIMEOUT));
            }
        }
        // The device workers stop too, at a consistent point: every request they took is
        // finished and in its used ring, nothing half done.
        // If they cannot, the pause is undone (the devices run again already) and reported.
        if let Err(e) = crate::snapshot::quiesce_devices(&c.snap) {
            c.pause.release();
            return Err(ControlError::Devices(e.to_string()));
        }
        c.snap.devices_quiesced.store(true, Ordering::Release);
        c.pauses.fetch_add(1, Ordering::Relaxed);
        let _ = c.state.compare_exchange(
            STATE_RUNNING,
            STATE_PAUSED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        Ok(())
    }

    /// Lets the vCPUs run again. Resuming a running VM does nothing.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.require_alive()?;
        let c = &self.control;
        if c.snap.devices_quiesced.swap(false, Ordering::AcqRel) {
            crate::snapshot::resume_devices(&c.snap);
        }
        let _ = c.state.compare_exchange(
            STATE_PAUSED,
            STATE_RUNNING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        c.pause.release();
        Ok(())
    }

    /// Types Ctrl-Alt-Del on the guest's i8042 keyboard.
    pub fn ctrl_alt_del(&self) -> Result<(), ControlError> {
        self.require_alive()?;
        let sent = self
            .control
            .i8042
            .lock()
            .map(|mut k| k.send_ctrl_alt_del())
            .unwrap_or(false);
        if sent {
            Ok(())
        } else {
            Err(ControlError::KeyboardFull)
        }
    }

    /// Asks the VM to stop (it ends with [`ExitReason::Stopped`]); returns at once.
    pub fn stop(&self) {
        let c = &self.control;
        c.stop_requested.store(true, Ordering::Release);
        if let Ok(w) = c.wake.lock() {
            let _ = w.send(Msg::Wake);
        }
    }

    /// Takes a snapshot of the paused VM: memory to `req.memory`, everything else to
    /// `req.state` (see [`crate::snapshot`]). The VM stays paused.
    pub fn snapshot(
        &self,
        req: &crate::snapshot::SnapshotRequest,
    ) -> Result<crate::snapshot::SnapshotInfo, crate::snapshot::SnapshotFailure> {
        use crate::snapshot::SnapshotFailure;
        if self.control.stop.load(Ordering::Acquire) {
            return Err(SnapshotFailure::Ended);
        }
        if self.state() != RunState::Paused {
            return Err(SnapshotFailure::NotPaused);
        }
        let c = &self.control;
        crate::snapshot::take(&c.snap, &c.pause, c.vcpus, req)
    }

    /// Live-migrates the VM to the receiver listening at `url` (see [`crate::migration`]).
    /// On success the VM ends here with [`ExitReason::Migrated`]; on failure it goes on as
    /// it was.
    pub fn migrate(
        &self,
        url: &crate::migration::MigrationUrl,
        opts: &crate::migration::MigrateOptions,
    ) -> Result<crate::migration::MigrationStats, crate::migration::MigrationError> {
        use crate::migration::{Connection, MigrationError};
        if self.control.stop.load(Ordering::Acquire) {
            return Err(MigrationError::NotRunning);
        }
        let was_paused = self.state() == RunState::Paused;
        let mut conn = Connection::connect(url)?;
        let c = &self.control;
        let stats = crate::migration::send(
            &c.snap,
            &c.pause,
            c.vcpus,
            &mut conn,
            opts,
            || {
                self.pause()
                    .map_err(|e| MigrationError::State(e.to_string()))
            },
            || {
                if !was_paused {
                    self.resume()
                        .map_err(|e| MigrationError::State(e.to_string()))?;
                }
                Ok(())
            },
        )?;
        c.migrated.store(true, Ordering::Release);
        if let Ok(w) = c.wake.lock() {
            let _ = w.send(Msg::Wake);
        }
        Ok(stats)
    }

    /// Figures that can be read while the VM runs.
    pub fn stats(&self) -> LiveStats {
        let c = &self.control;
        LiveStats {
            vcpus: c.vcpus,
            uptime: c.started.elapsed(),
            pauses: c.pauses.load(Ordering::Relaxed),
            unhandled_io: c.io_bus.unhandled(),
            unhandled_mmio: c.mmio_bus.unhandled(),
        }
    }
}

/// A VM whose vCPUs run. [`RunningVm::wait`] supervises it until it ends and tears it down;
/// [`RunningVm::handle`] controls it meanwhile. Dropping it stops the VM and waits for it.
pub struct RunningVm {
    control: Arc<Control>,
    inner: Option<RunningInner>,
}

struct RunningInner {
    config: VmConfig,
    control: Arc<Control>,
    rx: mpsc::Receiver<Msg>,
    handles: Vec<thread::JoinHandle<()>>,
    devices: Arc<LegacyDevices>,
    // Dropped only after every vCPU thread is joined: the guest never runs on memory or
    // devices that are gone.
    virtio: Arc<Mutex<crate::virtio::VirtioManager>>,
    _vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    raw: Option<terminal::RawTerminal>,
    quit: Arc<AtomicBool>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: ExitSignal,
    stop: Arc<AtomicBool>,
    nested: bool,
    kernel_source: Option<String>,
    to_first_run: Duration,
    since_spawn: Option<Duration>,
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            // The guest must not outlive its memory: stop it and join the vCPUs.
            inner.control.stop_requested.store(true, Ordering::Release);
            let _ = inner.supervise();
        }
    }
}

impl RunningVm {
    /// A handle to control the VM from any thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            control: self.control.clone(),
        }
    }

    /// Waits for the first vCPU to end, a device's request, the user, a signal or
    /// [`VmHandle::stop`]; then stops every vCPU, joins them and reports.
    pub fn wait(mut self) -> Result<VmOutcome, VmmError> {
        match self.inner.take() {
            Some(i) => i.supervise(),
            None => Err(VmmError::Device("the VM was already waited for".into())),
        }
    }
}

impl RunningInner {
    fn supervise(self) -> Result<VmOutcome, VmmError> {
        let RunningInner {
            config,
            control,
            rx,
            handles,
            devices,
            virtio,
            _vm,
            _mem,
            raw,
            quit,
            io_bus,
            mmio_bus,
            exit,
            stop,
            nested,
            kernel_source,
            to_first_run,
            since_spawn,
        } = self;
        let tick =
            Duration::from_millis(config.profile_ms.unwrap_or(if nested { 20 } else { 100 }));
        let periodic_kicks = nested || config.profile_ms.is_some();
        let mut results: Vec<Option<(Result<VcpuStop, VmmError>, VcpuReport)>> =
            (0..config.cpus).map(|_| None).collect();
        let mut first_reason: Option<ExitReason> = None;
        let mut remaining = config.cpus as usize;
        // The control handle holds a sender too: count vCPU messages, not senders.
        while remaining > 0 {
            match rx.recv_timeout(tick) {
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
                    control.end();
                    control.kick_all();
                }
                Ok(Msg::Wake) | Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(r) = exit.reason() {
                        first_reason.get_or_insert(match r {
                            VmExitReason::PowerOff => ExitReason::PowerOff,
                            VmExitReason::Reset => ExitReason::Reset,
                        });
                        control.end();
                    }
                    if quit.load(Ordering::Acquire) {
                        first_reason.get_or_insert(ExitReason::UserQuit);
                        control.end();
                    }
                    if SIGNALLED.load(Ordering::Acquire) {
                        first_reason.get_or_insert(ExitReason::Signal);
                        control.end();
                    }
                    if control.migrated.load(Ordering::Acquire) {
                        first_reason.get_or_insert(ExitReason::Migrated);
                        control.end();
                    }
                    if control.stop_requested.load(Ordering::Acquire) {
                        first_reason.get_or_insert(ExitReason::Stopped);
                        control.end();
                    }
                    if periodic_kicks || stop.load(Ordering::Acquire) {
                        control.kick_all();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        control.lock_threads().clear();
        for h in handles {
            let _ = h.join();
        }
        let wall = control.started.elapsed();
        devices.flush();
        drop(raw);

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
        let profile = config.profile_ms.map(|_| {
            let samples: Vec<u64> = reports
                .iter()
                .flat_map(|r| r.samples.iter().copied())
                .collect();
            let map = match &config.boot {
                BootSource::Linux {
                    system_map: Some(p),
                    ..
                } => profile::SymbolMap::load(p).ok(),
                _ => None,
            };
            let period = Duration::from_millis(config.profile_ms.unwrap_or(10));
            let mut text = profile::report(&samples, map.as_ref(), 40);
            // The boot vCPU's samples over time show where each phase of a boot goes.
            if let Some(boot) = reports.first() {
                text += &profile::timeline(
                    &boot.samples,
                    period,
                    map.as_ref(),
                    Duration::from_secs(5),
                    3,
                );
            }
            text
        });
        let stats = VmStats {
            nested,
            to_first_run,
            wall,
            vcpus: reports,
            unhandled_io: io_bus.unhandled(),
            unhandled_mmio: mmio_bus.unhandled(),
            profile,
            kernel: kernel_source,
            since_spawn,
            devices: virtio.lock().map(|v| v.stats_lines()).unwrap_or_default(),
        };
        Ok(VmOutcome {
            reason: first_reason.unwrap_or(ExitReason::Signal),
            stats,
        })
    }
}

/// For the management API ([`crate::api`]).
impl Vm {
    /// The handles on the devices the API drives after start (balloon, disks). Clone what is
    /// needed before [`Vm::start`]; the handles stay valid while the VM runs.
    pub fn device_handles(&self) -> &crate::virtio_devices::DeviceHandles {
        &self.virtio.handles
    }
}

/// The VM generation ID (see [`crate::vmgenid`]).
impl Vm {
    /// A restored clone's new ID, announced to the guest; run after the irqchips are
    /// restored and before any vCPU runs.
    pub(crate) fn new_generation(&self) -> Result<(), VmmError> {
        if let Some(s) = &self.vmgenid {
            crate::vmgenid::regenerate(&self._vm, &self.mem, s)?;
        }
        Ok(())
    }
}

/// Installs the vCPU filter on the calling (vCPU) thread, before its first `KVM_RUN`.
fn seccomp_vcpu(cpu: u8) -> Result<(), VmmError> {
    vessel_seccomp::apply(vessel_seccomp::ThreadKind::Vcpu).map_err(|e| VmmError::Vcpu {
        cpu,
        reason: e.to_string(),
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
    fn cmdline_gets_nested_params_then_appended_words() {
        let mut c = VmConfig {
            append: vec!["vessel.poweroff".into()],
            ..Default::default()
        };
        assert_eq!(
            compose_cmdline(&c, Some("nopv")),
            format!("{DEFAULT_CMDLINE} nopv vessel.poweroff")
        );
        c.cmdline = Some("console=ttyS0".into());
        c.append.clear();
        assert_eq!(compose_cmdline(&c, None), "console=ttyS0");
    }

    #[test]
    fn impossible_configs_are_refused_before_kvm() {
        let c = VmConfig {
            cpus: 0,
            ..Default::default()
        };
        assert!(matches!(validate(&c, 8), Err(VmmError::NoCpus(0))));
        let c = VmConfig {
            cpus: 9,
            ..Default::default()
        };
        assert!(matches!(
            validate(&c, 8),
            Err(VmmError::TooManyCpus {
                requested: 9,
                max: 8
            })
        ));
        let c = VmConfig {
            cpus: 256,
            ..Default::default()
        };
        assert!(matches!(
            validate(&c, 4096),
            Err(VmmError::TooManyCpus { max: 255, .. })
        ));
        let c = VmConfig {
            memory: 1 << 20,
            ..Default::default()
        };
        assert!(matches!(validate(&c, 8), Err(VmmError::Memory(_))));
        let c = VmConfig {
            memory: 1 << 45,
            ..Default::default()
        };
        assert!(matches!(
            validate(&c, 8),
            Err(VmmError::MemoryExceedsHost { .. })
        ));
        assert!(validate(&VmConfig::default(), 8).is_ok());
    }
}
