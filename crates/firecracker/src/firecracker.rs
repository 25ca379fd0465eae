//! Firecracker-compatible mode: `vessel --api-sock PATH [--config-file FILE] ...` behaves as
//! `firecracker` does, so tools that start Firecracker can start Vessel.
//!
//! The main thread owns the VMM backend and serves its calls (the API server's threads queue
//! them and wake it through an eventfd); the VM's supervisor runs on a thread of its own and
//! wakes the main thread when the guest ends, at which point the process exits (0 for a
//! power-off or reset, as Firecracker).

use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use clap::Args;
use vessel_api::types::{LogLevel, Logger};
use vessel_api::{ApiController, ApiError, ApiThread, ServerConfig, VmResources, VmmBackend};
use vessel_vmm::device_config::Transport;
use vessel_vmm::{ExitReason, SerialTarget, VmConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::fc::ApiBackend;
use crate::logger;

/// Why Firecracker mode could not run (printed as `vessel: ` and the error's chain).
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// `--level` is not a level.
    #[error(transparent)]
    Level(#[from] logger::LevelError),
    /// `--log-path` cannot be opened.
    #[error("cannot open the log file {}", .path.display())]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: std::io::Error,
    },
    /// `--no-api` without a configuration to boot.
    #[error("--no-api needs --config-file")]
    NoApiWithoutConfig,
    /// `--metadata` cannot be read (Firecracker's words, then the file).
    #[error("Unable to open or read from the mmds content file {}", .path.display())]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// `--metadata` is not JSON.
    #[error("MMDS error: metadata provided not valid json")]
    MetadataJson(#[source] serde_json::Error),
    /// `--metadata` does not fit the MMDS store (Firecracker's words, with the store's reason
    /// as Firecracker words it).
    #[error("Populating MMDS from file failed: {reason}")]
    MetadataPut {
        /// Why the store refused it.
        reason: String,
    },
    /// An eventfd could not be made or cloned.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The handlers of the signals Firecracker intercepts could not be installed.
    #[error("signal handlers")]
    FatalSignalHandlers(#[source] std::io::Error),
    /// `PUT /snapshot/load` failed: the process is not trusted to go on (Firecracker's
    /// words).
    #[error("Failed to build MicroVM: Loading snapshot failed.")]
    Restore(#[source] ApiError),
    /// `--seccomp-filter` (or another seccomp flag) could not be used (Firecracker's words,
    /// then why).
    #[error("Seccomp error: {reason}")]
    Seccomp {
        /// Why the filters could not be set up.
        reason: String,
    },
    /// `--metrics-path` was refused.
    #[error("--metrics-path")]
    MetricsPath(#[source] ApiError),
    /// The API socket cannot be served.
    #[error("Failed to open the API socket at: {}. Check that it is not already used.", .path.display())]
    Serve {
        /// The socket path.
        path: PathBuf,
        /// Why it cannot be served.
        #[source]
        source: std::io::Error,
    },
    /// `--config-file` does not describe a VM (Firecracker's words, then the file).
    #[error("Configuration for VMM from one single json failed: {}", .path.display())]
    ConfigFile {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ApiError,
    },
    /// The VM described by `--config-file` did not start.
    #[error("Failed to build MicroVM from Json: Could not Start MicroVM from one single json")]
    ConfigStart(#[source] ApiError),
    /// A helper thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// The VMM failed (making the backend, or running the VM).
    #[error(transparent)]
    Vmm(#[from] vessel_vmm::VmmError),
    /// `--describe-snapshot`'s file has no readable format version.
    #[error(transparent)]
    Snapshot(#[from] vessel_snapshot::format::SnapshotError),
}

/// Where Firecracker listens when given no `--api-sock`.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// How often metrics are written to the metrics path without a `FlushMetrics` (as
/// Firecracker), in milliseconds.
const METRICS_PERIOD_MS: u64 = 60_000;

/// Firecracker's process flags (no subcommand).
#[derive(Args, Debug, Default)]
pub struct FirecrackerArgs {
    /// Firecracker mode: serve Firecracker's API on this Unix socket [default: /run/firecracker.socket].
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Firecracker mode: boot from this Firecracker JSON configuration.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Firecracker mode: serve no API (needs --config-file).
    #[arg(long)]
    pub no_api: bool,
    /// Firecracker mode: the microVM's id.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Firecracker mode: write logs to this file or FIFO.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Firecracker mode: log level (Error, Warning, Info, Debug, Trace, Off).
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// Firecracker mode: show each record's level in the log file.
    #[arg(long)]
    pub show_level: bool,
    /// Firecracker mode: show each record's source file and line in the log file.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Firecracker mode: the guest writing 123 at 0xc000_0000 logs its boot time (Info).
    #[arg(long)]
    pub boot_timer: bool,
    /// Firecracker mode: write metrics to this file or FIFO (as PUT /metrics).
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Firecracker mode: log only records from modules whose path starts with this.
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Firecracker mode: JSON file with the initial MMDS contents.
    #[arg(long, value_name = "FILE")]
    pub metadata: Option<PathBuf>,
    /// Firecracker mode: largest API request body, in bytes [default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub http_api_max_payload_size: Option<usize>,
    /// Firecracker mode: largest MMDS store, in bytes of JSON [default: the
    /// --http-api-max-payload-size given, else 51200].
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// Firecracker mode: put the microVM's devices on PCI rather than virtio-mmio.
    #[arg(long)]
    pub enable_pci: bool,
    /// Print the snapshot data format version this Vessel writes, and exit.
    #[arg(long)]
    pub snapshot_version: bool,
    /// Print the data format version of this snapshot state file, and exit.
    #[arg(long, value_name = "FILE")]
    pub describe_snapshot: Option<PathBuf>,
    // Set by Firecracker's jailer and launchers: when the process started (monotonic clock)
    // and the CPU time spent before it, for the api_server startup metrics.
    #[arg(long, hide = true)]
    pub start_time_us: Option<u64>,
    #[arg(long, hide = true)]
    pub start_time_cpu_us: Option<u64>,
    #[arg(long, hide = true)]
    pub parent_cpu_time_us: Option<u64>,
    /// Period of the metrics written without a `FlushMetrics`, in milliseconds (tests).
    #[arg(long, hide = true, default_value_t = METRICS_PERIOD_MS)]
    pub metrics_period_ms: u64,
}

fn level_filter(l: LogLevel) -> log::LevelFilter {
    match l {
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warning => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
        LogLevel::Off => log::LevelFilter::Off,
    }
}

/// `PUT /logger` and a config file's `logger`: what is given changes, the rest stays.
fn configure_logger(l: &Logger) -> Result<(), ApiError> {
    if let Some(p) = &l.log_path {
        logger::set_path(p)
            .map_err(|e| ApiError::bad(format!("Logger error: cannot open {p}: {e}")))?;
    }
    if let Some(level) = l.level {
        log::set_max_level(level_filter(level));
    }
    let mut o = logger::options();
    o.show_level = l.show_level.unwrap_or(o.show_level);
    o.show_origin = l.show_log_origin.unwrap_or(o.show_origin);
    if let Some(m) = &l.module {
        o.module = Some(m.clone()).filter(|m| !m.is_empty());
    }
    logger::set_options(o);
    Ok(())
}

/// The eventfd the SIGINT/SIGTERM handler writes (-1 until installed).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
/// The signal that arrived.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL.store(sig, Ordering::SeqCst);
    let one: u64 = 1;
    // SAFETY: write(2) is async-signal-safe; it reads 8 bytes from a live local. A closed or
    // invalid descriptor only makes it fail.
    unsafe {
        libc::write(
            SIGNAL_FD.load(Ordering::SeqCst),
            (&one as *const u64).cast(),
            8,
        )
    };
}

/// Until the VM starts (which installs its own handlers, ending the VM on these signals),
/// SIGINT and SIGTERM wake the main loop, which ends the process cleanly (the API socket
/// is removed).
fn install_signal_handlers(wake: &EventFd) -> Result<(), FirecrackerError> {
    let fd = wake.try_clone().map_err(FirecrackerError::EventFd)?;
    SIGNAL_FD.store(fd.as_raw_fd(), Ordering::SeqCst);
    // The handler writes it for the rest of the process.
    std::mem::forget(fd);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(FirecrackerError::SignalHandler)?;
    }
    Ok(())
}

/// The exit status of a process ended by `sig`, as a shell reports it.
fn signal_exit(sig: i32) -> ExitCode {
    ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)))
}

fn lock(ctl: &Mutex<ApiController>) -> std::sync::MutexGuard<'_, ApiController> {
    ctl.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `fds` has a readable descriptor or `timeout` passes.
/// Waits until one of `fds` is readable, or `timeout_ms` passed (-1: no limit); false on
/// the timeout.
fn poll_readable(fds: &[i32], timeout_ms: i32) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll reads and writes the pollfd array we own, of the length we pass.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) != 0 }
}

/// How long the main thread waits with nothing to do before it gives back the start's pages
/// ([`crate::trim::release_pages`]): done at once, it competed with the first requests (their
/// thread faulted the dropped code back in and waited for malloc's lock), 1-2 ms of the time
/// to the first answer.
const TRIM_WHEN_IDLE_MS: i32 = 20;

/// `--snapshot-version` and `--describe-snapshot FILE`: Firecracker prints a data format
/// version and exits. Vessel's state format is one integer N, printed as `vN.0.0` so that the
/// answer parses as the semantic version Firecracker prints.
pub fn print_and_exit(args: &FirecrackerArgs) -> Option<Result<ExitCode, FirecrackerError>> {
    if args.snapshot_version {
        println!("v{}.0.0", vessel_snapshot::FORMAT_VERSION);
        return Some(Ok(ExitCode::SUCCESS));
    }
    let path = args.describe_snapshot.as_ref()?;
    Some(
        vessel_snapshot::format::read_format_version(path)
            .map(|v| {
                println!("v{v}.0.0");
                ExitCode::SUCCESS
            })
            .map_err(FirecrackerError::from),
    )
}

/// `clock` (CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID) in microseconds.
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; on failure it stays zero.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec.max(0) as u64) * 1_000_000 + (ts.tv_nsec.max(0) as u64) / 1000
}

/// Firecracker's api_server startup gauges, once the socket listens: wall time since
/// `--start-time-us` (the launcher's monotonic clock; else since `main` began, `started_us`),
/// and the process's CPU time less `--start-time-cpu-us` plus `--parent-cpu-time-us`.
fn report_startup(metrics: &vessel_api::Metrics, args: &FirecrackerArgs, started_us: u64) {
    let wall =
        clock_us(libc::CLOCK_MONOTONIC).saturating_sub(args.start_time_us.unwrap_or(started_us));
    let cpu = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
        .saturating_sub(args.start_time_cpu_us.unwrap_or(0))
        + args.parent_cpu_time_us.unwrap_or(0);
    metrics.server.set_process_startup(wall, cpu);
    log::info!("API server listening: process startup {wall} us, {cpu} CPU us");
}

/// Runs Firecracker mode ([`run`]) and, as Firecracker, logs how it ended: the error's chain
/// and `Firecracker exiting with error. exit_code=N`, or `Firecracker exiting successfully`.
/// The error still goes to stderr too.
pub fn main(args: FirecrackerArgs, started_us: u64, seccomp_failure: Option<String>) -> ExitCode {
    match run(args, started_us, seccomp_failure) {
        Ok(code) => {
            if code == ExitCode::SUCCESS {
                log::info!("Firecracker exiting successfully. exit_code=0");
            }
            code
        }
        Err(e) => {
            let chain = vessel_vmm::ErrorChain(&e).to_string();
            let _ = writeln!(std::io::stderr(), "vessel: {chain}");
            // Without a log file, records go to stderr, which has the error already.
            if logger::has_file() {
                log::error!("{chain}");
                log::error!("Firecracker exiting with error. exit_code=1");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs Firecracker mode to the end of the VM; `started_us` is when `main` began
/// (CLOCK_MONOTONIC, microseconds).
pub fn run(
    args: FirecrackerArgs,
    started_us: u64,
    seccomp_failure: Option<String>,
) -> Result<ExitCode, FirecrackerError> {
    // The API's accept thread installs its seccomp filter while the rest is set up.
    let api_thread = match args.no_api || seccomp_failure.is_some() {
        true => None,
        false => Some(ApiThread::spawn().map_err(FirecrackerError::Thread)?),
    };
    if let Some(level) = &args.level {
        log::set_max_level(logger::parse_level(level)?);
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| "anonymous-instance".to_string());
    logger::set_instance_id(&id);
    crate::fc::signals::install(&id).map_err(FirecrackerError::FatalSignalHandlers)?;
    logger::set_options(logger::Options {
        show_level: args.show_level,
        show_origin: args.show_log_origin,
        module: args.module.clone().filter(|m| !m.is_empty()),
    });
    if let Some(p) = &args.log_path {
        logger::set_path(&p.to_string_lossy()).map_err(|source| FirecrackerError::LogFile {
            path: p.clone(),
            source,
        })?;
    }
    if args.no_api && args.config_file.is_none() {
        return Err(FirecrackerError::NoApiWithoutConfig);
    }
    // As Firecracker: the MMDS store may be as large as an API request unless told.
    let mmds_limit = args
        .mmds_size_limit
        .or(args.http_api_max_payload_size)
        .unwrap_or(vessel_api::resources::DEFAULT_MMDS_LIMIT);
    log::info!(
        "Running Firecracker v{}",
        vessel_api::FIRECRACKER_API_VERSION
    );
    if let Some(reason) = seccomp_failure {
        return Err(FirecrackerError::Seccomp { reason });
    }
    let metadata = match &args.metadata {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| FirecrackerError::Metadata {
                path: p.clone(),
                source,
            })?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(FirecrackerError::MetadataJson)?,
            )
        }
        None => None,
    };
    // The guest console is the process's stdin/stdout, as Firecracker's.
    let base = VmConfig {
        serial: SerialTarget::Stdio,
        boot_timer: args.boot_timer,
        ..Default::default()
    };
    let transport = if args.enable_pci {
        Transport::Pci
    } else {
        Transport::Mmio
    };
    let mut backend = ApiBackend::new(base)?
        .with_transport(transport)
        .with_logger(configure_logger);

    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(FirecrackerError::EventFd)?;
    let signalled = EventFd::new(libc::EFD_NONBLOCK).map_err(FirecrackerError::EventFd)?;
    install_signal_handlers(&signalled)?;
    let waker = wake.try_clone().map_err(FirecrackerError::EventFd)?;
    let (channel, jobs) = vessel_api::backend::channel(move || {
        let _ = waker.write(1);
    });
    let ctl = Arc::new(Mutex::new(ApiController::new(
        channel,
        id,
        env!("CARGO_PKG_VERSION"),
    )));
    lock(&ctl).mmds_mut().set_limit(mmds_limit);
    // The thread that writes periodic metrics lines (and the last one when a signal ends
    // the process) exists once there is a metrics file to write them to.
    let weak = Arc::downgrade(&ctl);
    let period = Duration::from_millis(args.metrics_period_ms.max(1));
    lock(&ctl).on_metrics_file(move || {
        if let Some(ctl) = weak.upgrade() {
            if let Err(e) = start_metrics_timer(ctl, period) {
                log::error!("{}", vessel_vmm::ErrorChain(&e));
            }
        }
    });
    // The store itself (clones share it), filled from --metadata once the server runs.
    let mmds = lock(&ctl).resources().mmds.clone();
    if let Some(p) = &args.metrics_path {
        lock(&ctl)
            .metrics_from_command_line(&p.to_string_lossy())
            .map_err(FirecrackerError::MetricsPath)?;
    }

    // Once the server runs, its threads hold the controller while the main thread answers
    // their calls: from here on the main thread must not lock it.
    let metrics = lock(&ctl).metrics().clone();
    crate::fc::signals::count_in(metrics.clone());

    let _server = match api_thread {
        None => None,
        Some(thread) => {
            let path = args
                .api_sock
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK));
            let mut config = ServerConfig::default();
            if let Some(n) = args.http_api_max_payload_size {
                config.limits.max_body_bytes = n;
            }
            Some(thread.start(&path, ctl.clone(), config).map_err(|source| {
                FirecrackerError::Serve {
                    path: path.clone(),
                    source,
                }
            })?)
        }
    };

    if !args.no_api {
        log::info!("API server started.");
    }
    report_startup(&metrics, &args, started_us);
    // As Firecracker: the metadata goes in once the API server runs (so a failure follows
    // `API server started.`), before any request is served.
    if let (None, Some(md)) = (&args.config_file, &metadata) {
        put_metadata(&mmds, md)?;
    }
    // What parsed the flags, compiled the filters and started the server is not run again:
    // its pages go once the main thread has been idle a moment (below), and again once the
    // VM runs (what built it, and the main thread's stack below its loop, are not used again).
    let mut trim_pending = true;
    let mut vm_trimmed = false;

    // Boot from the config file on a helper thread: the controller's calls reach the backend
    // through the main thread, which must be serving them.
    let (failed_tx, failed) = mpsc::channel::<FirecrackerError>();
    if let Some(path) = args.config_file.clone() {
        let ctl = ctl.clone();
        let wake = wake.try_clone().map_err(FirecrackerError::EventFd)?;
        vessel_vmm::spawn_helper("config-file", move || {
            let r = VmResources::from_config_file(&path, None)
                .map_err(|source| FirecrackerError::ConfigFile {
                    path: path.clone(),
                    source,
                })
                .and_then(|mut res| {
                    res.mmds.set_limit(mmds_limit);
                    if let Some(md) = &metadata {
                        put_metadata(&res.mmds, md)?;
                    }
                    boot_config(&ctl, res).map_err(FirecrackerError::ConfigStart)
                });
            match r {
                Ok(()) => log::info!(
                    "Successfully started microvm that was configured from one single json"
                ),
                Err(e) => {
                    let _ = failed_tx.send(e);
                    let _ = wake.write(1);
                }
            }
        })
        .map_err(FirecrackerError::Thread)?;
    }
    loop {
        let fds = [
            wake.as_raw_fd(),
            backend.ended_event().as_raw_fd(),
            signalled.as_raw_fd(),
        ];
        let timeout = if trim_pending { TRIM_WHEN_IDLE_MS } else { -1 };
        if !poll_readable(&fds, timeout) {
            crate::trim::release_pages();
            trim_pending = false;
            continue;
        }
        let _ = wake.read();
        if signalled.read().is_ok() {
            let sig = SIGNAL.load(Ordering::SeqCst);
            log::info!("stopped by signal {sig} before the microVM started");
            return Ok(signal_exit(sig));
        }
        while let Ok(job) = jobs.try_recv() {
            job.run(&mut backend);
        }
        if !vm_trimmed && backend.has_vm() {
            vm_trimmed = true;
            trim_pending = true;
        }
        if let Ok(e) = failed.try_recv() {
            return Err(e);
        }
        if let Some(e) = backend.take_failed_restore() {
            // Dropping the server on the way out lets the failed request's answer go first.
            return Err(FirecrackerError::Restore(e));
        }
        if let Some(outcome) = backend.take_outcome() {
            let outcome = outcome?;
            log::info!("the microVM ended: {:?}", outcome.reason);
            return Ok(match outcome.reason {
                ExitReason::PowerOff
                | ExitReason::Reset
                | ExitReason::Stopped
                | ExitReason::Migrated => ExitCode::SUCCESS,
                ExitReason::UserQuit => ExitCode::from(130),
                ExitReason::Signal => ExitCode::from(143),
            });
        }
    }
}

/// Fills the MMDS store from `--metadata`.
fn put_metadata(
    store: &vessel_api::MmdsStore,
    md: &serde_json::Value,
) -> Result<(), FirecrackerError> {
    store
        .put(md.clone())
        .map_err(|e| FirecrackerError::MetadataPut {
            reason: e.to_string().trim_start_matches("MMDS error: ").to_string(),
        })?;
    log::info!("Successfully added metadata to mmds from file");
    Ok(())
}

/// Adopts the config file's resources and starts the VM.
fn boot_config(ctl: &Mutex<ApiController>, res: VmResources) -> Result<(), ApiError> {
    // `with_resources` consumes the controller: swap in the configured one.
    let mut guard = lock(ctl);
    let placeholder = ApiController::new(Box::new(NoBackend), "", "");
    let current = std::mem::replace(&mut *guard, placeholder);
    // On error the process exits: the controller is not needed again.
    *guard = current.with_resources(res)?;
    guard.start()
}

/// Stands in for the backend while the controller is swapped (never called).
struct NoBackend;

impl VmmBackend for NoBackend {
    fn start(&mut self, _: &VmResources) -> Result<(), ApiError> {
        Err(ApiError::Internal("no VMM".into()))
    }
}

/// Writes a metrics line every `period` once the VM has started (started when a metrics
/// file is configured), and a last one when a signal handler about to end the process asks
/// for it through the thread's eventfd. A thread of its own: the periodic flush asks the
/// backend for its metrics, which the main loop answers.
fn start_metrics_timer(
    ctl: Arc<Mutex<ApiController>>,
    period: Duration,
) -> Result<(), FirecrackerError> {
    let last = EventFd::new(libc::EFD_NONBLOCK).map_err(FirecrackerError::EventFd)?;
    vessel_vmm::spawn_helper("metrics", move || metrics_loop(&ctl, period, &last))
        .map(drop)
        .map_err(FirecrackerError::Thread)
}

fn metrics_loop(ctl: &Mutex<ApiController>, period: Duration, last: &EventFd) {
    crate::fc::signals::set_flusher(last.as_raw_fd());
    let period_ms = i32::try_from(period.as_millis()).unwrap_or(i32::MAX);
    loop {
        let woken = poll_readable(&[last.as_raw_fd()], period_ms) && last.read().is_ok();
        let mut c = lock(ctl);
        if woken {
            // The VMM thread may be the one in the handler: its groups are left out.
            if let Err(e) = c.flush_metrics_without_vmm() {
                log::warn!("{e}");
            }
            crate::fc::signals::flushed();
        } else if c.state() != vessel_api::types::InstanceState::NotStarted {
            if let Err(e) = c.flush_metrics() {
                log::warn!("{e}");
            }
        }
    }
}
