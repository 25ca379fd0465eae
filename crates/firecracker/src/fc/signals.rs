//! Firecracker's signal handling. A VMM that takes SIGBUS, SIGSEGV, SIGXFSZ (past its file
//! size limit: the jailer's `--resource-limit fsize=N`), SIGXCPU, SIGHUP, SIGILL or SIGSYS
//! does not die of the signal's default action but logs
//!
//! ```text
//! Shutting down VM after intercepting signal 25, code 0.
//! ```
//!
//! (to the log file, else stderr), counts it in the metrics (`signals.sigxfsz` and friends,
//! `seccomp.num_faults` for SIGSYS), has a last metrics line written when a metrics file is
//! configured, and exits with Firecracker's status for it (151 for SIGXFSZ). SIGPIPE is
//! logged (`Received signal 13, code 0.`) and counted, and the process goes on; when that log
//! line itself meets a closed pipe (the reader of stderr is gone: a runtime that spawned the
//! VMM exited), the SIGPIPE it raises is taken as its echo, neither logged nor counted (each
//! would raise the next one: the thread looped in the handler, its request never answered and
//! SIGTERM never acted on). Installed for
//! the whole process at start in Firecracker mode; the VM's own handlers (SIGINT, SIGTERM,
//! the vCPU kick) are other signals.
//!
//! The handlers only format into a buffer on their stack, update atomics and call
//! `clock_gettime`, `gettid`, `prctl(PR_GET_NAME)`, `write`, `clock_nanosleep` and
//! `exit_group`: async-signal-safe, and allowed by every thread's seccomp filter. The last
//! metrics line is not written by the handler (formatting it is not async-signal-safe): the
//! metrics thread is woken through an eventfd to write it without asking the VMM thread
//! (which may be the one in the handler), and the handler waits for it, at most
//! [`FLUSH_WAIT_MS`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use vessel_api::Metrics;

/// Firecracker's exit status after intercepting SIGXFSZ (`FcExitCode::SIGXFSZ`).
pub const SIGXFSZ_EXIT: i32 = 151;

/// Firecracker's exit status for each intercepted signal (`FcExitCode`); SIGSYS is
/// `BadSyscall` when the kernel's seccomp sent it.
fn exit_status(signo: i32, code: i32) -> i32 {
    match signo {
        libc::SIGBUS => 149,
        libc::SIGSEGV => 150,
        libc::SIGXFSZ => SIGXFSZ_EXIT,
        libc::SIGXCPU => 154,
        libc::SIGHUP => 156,
        libc::SIGILL => 157,
        libc::SIGSYS if code == SYS_SECCOMP => 148,
        // Firecracker's UnexpectedError.
        _ => 2,
    }
}

/// `si_code` of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

/// The signals that end the process after their line.
const FATAL: [i32; 7] = [
    libc::SIGBUS,
    libc::SIGSEGV,
    libc::SIGXFSZ,
    libc::SIGXCPU,
    libc::SIGHUP,
    libc::SIGILL,
    libc::SIGSYS,
];

/// How long a handler waits for the last metrics line before the process exits anyway.
pub const FLUSH_WAIT_MS: u32 = 1000;

/// The instance id for the log line, set once before the handlers are installed.
static INSTANCE_ID: OnceLock<String> = OnceLock::new();
/// The metrics the handlers count in.
static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
/// The eventfd that wakes the metrics thread for a last line (-1: no metrics thread).
static FLUSH_FD: AtomicI32 = AtomicI32::new(-1);
/// The metrics thread's id: a signal taken there cannot wait for that thread.
static FLUSHER_TID: AtomicI32 = AtomicI32::new(0);
/// How many last lines the metrics thread wrote on request.
static FLUSHED: AtomicU64 = AtomicU64::new(0);
/// Set when the SIGPIPE handler's own log line met a closed pipe: the next SIGPIPE is its echo.
static SIGPIPE_ECHO: AtomicBool = AtomicBool::new(false);

/// A line built on the stack; what does not fit is cut off.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The log line with `message`, as the logger writes records: UTC time, then
/// `[instance id:thread name]`, then Firecracker's message.
fn format_line(
    out: &mut Line,
    now: libc::timespec,
    id: &str,
    thread: &[u8],
    message: std::fmt::Arguments<'_>,
) {
    let secs = now.tv_sec;
    let (y, mo, d) = crate::logger::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let thread = std::str::from_utf8(thread).unwrap_or("?");
    let _ = writeln!(
        out,
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:09} [{id}:{thread}] {message}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.tv_nsec
    );
}

/// Writes one log line (async-signal-safe); false when the write failed with EPIPE.
fn log_line(message: std::fmt::Arguments<'_>) -> bool {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime is async-signal-safe and writes into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the local buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    let id = INSTANCE_ID
        .get()
        .map_or("anonymous-instance", String::as_str);
    format_line(&mut line, now, id, &name[..name_len], message);
    let fd = crate::logger::raw_fd().unwrap_or(libc::STDERR_FILENO);
    // A handler must leave errno as the code it interrupted had it.
    let saved = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: write(2) is async-signal-safe; the buffer is a live local.
    let written = unsafe { libc::write(fd, line.buf.as_ptr().cast(), line.len) };
    let broken = written < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE);
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's life.
    unsafe { *libc::__errno_location() = saved };
    !broken
}

/// The signal number and code of a handler's call.
fn signal_of(num: libc::c_int, info: *mut libc::siginfo_t) -> (i32, i32) {
    if info.is_null() {
        (num, 0)
    } else {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        unsafe { ((*info).si_signo, (*info).si_code) }
    }
}

/// Wakes the metrics thread for a last line and waits for it (at most [`FLUSH_WAIT_MS`]),
/// unless there is no metrics thread or this is it.
fn last_metrics_line() {
    let fd = FLUSH_FD.load(Ordering::SeqCst);
    if fd < 0 || gettid() == FLUSHER_TID.load(Ordering::SeqCst) {
        return;
    }
    let before = FLUSHED.load(Ordering::SeqCst);
    let one = 1u64.to_ne_bytes();
    // SAFETY: write(2) of 8 bytes from a local to an eventfd; async-signal-safe.
    unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    let ms = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };
    for _ in 0..FLUSH_WAIT_MS {
        if FLUSHED.load(Ordering::SeqCst) != before {
            return;
        }
        // SAFETY: nanosleep reads the local timespec; async-signal-safe.
        unsafe { libc::nanosleep(&ms, std::ptr::null_mut()) };
    }
}

extern "C" fn on_fatal(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let (signo, code) = signal_of(num, info);
    if let Some(m) = METRICS.get() {
        m.signals.record_fatal(signo);
    }
    log_line(format_args!(
        "Shutting down VM after intercepting signal {signo}, code {code}."
    ));
    if signo == libc::SIGSYS && code == SYS_SECCOMP && !info.is_null() {
        // SAFETY: for a seccomp SIGSYS the kernel fills siginfo's `_sigsys` member; the
        // syscall number is the int at offset 24 (Firecracker's SI_OFF_SYSCALL, 6 ints).
        let syscall = unsafe { *(info as *const i32).add(6) };
        log_line(format_args!(
            "Shutting down VM after intercepting a bad syscall ({syscall})."
        ));
    }
    last_metrics_line();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(exit_status(signo, code)) };
}

extern "C" fn on_sigpipe(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if SIGPIPE_ECHO.swap(false, Ordering::SeqCst) {
        return;
    }
    let (signo, code) = signal_of(num, info);
    if let Some(m) = METRICS.get() {
        m.signals.sigpipe.inc();
    }
    if !log_line(format_args!("Received signal {signo}, code {code}.")) {
        SIGPIPE_ECHO.store(true, Ordering::SeqCst);
    }
}

fn register(
    signo: i32,
    handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value to fill in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as usize;
    // On the thread's alternate stack where it has one (a stack overflow's SIGSEGV).
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: sigemptyset/sigfillset initialise the mask we own. Blocking every signal
    // while a handler runs keeps the handlers from interrupting one another.
    unsafe { libc::sigfillset(&mut sa.sa_mask) };
    // SAFETY: the handlers only do async-signal-safe things (module docs).
    if unsafe { libc::sigaction(signo, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Installs the handlers for the process (instance `id` in their log lines).
pub fn install(id: &str) -> std::io::Result<()> {
    let _ = INSTANCE_ID.set(id.to_string());
    for signo in FATAL {
        register(signo, on_fatal)?;
    }
    register(libc::SIGPIPE, on_sigpipe)
}

/// The handlers count in `metrics` from now on.
pub fn count_in(metrics: Arc<Metrics>) {
    let _ = METRICS.set(metrics);
}

/// The calling thread's id, from the system call itself: in a static link-time-optimized
/// build, glibc's `gettid` wrapper can end up a weak reference (the standard library declares
/// it weak), which nothing resolves, and calling it jumps to address 0.
fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Called on the metrics thread: signal handlers wake it through `fd` for a last line.
pub fn set_flusher(fd: i32) {
    FLUSHER_TID.store(gettid(), Ordering::SeqCst);
    FLUSH_FD.store(fd, Ordering::SeqCst);
}

/// Called by the metrics thread once the last line a handler asked for is written.
pub fn flushed() {
    FLUSHED.fetch_add(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_firecracker_s() {
        assert_eq!(exit_status(libc::SIGBUS, 0), 149);
        assert_eq!(exit_status(libc::SIGSEGV, 0), 150);
        assert_eq!(exit_status(libc::SIGXFSZ, 0), 151);
        assert_eq!(exit_status(libc::SIGXCPU, 0), 154);
        assert_eq!(exit_status(libc::SIGHUP, 0), 156);
        assert_eq!(exit_status(libc::SIGILL, 0), 157);
        assert_eq!(exit_status(libc::SIGSYS, SYS_SECCOMP), 148);
        // A SIGSYS sent by kill(2) is not a seccomp fault.
        assert_eq!(exit_status(libc::SIGSYS, 0), 2);
    }

    #[test]
    fn the_line_carries_firecracker_s_message() {
        let mut l = Line {
            buf: [0; 512],
            len: 0,
        };
        // 2024-05-01T12:00:00.000000123
        let now = libc::timespec {
            tv_sec: 1_714_564_800,
            tv_nsec: 123,
        };
        format_line(
            &mut l,
            now,
            "vm-1",
            b"fc_api",
            format_args!(
                "Shutting down VM after intercepting signal {}, code 0.",
                libc::SIGXFSZ
            ),
        );
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "2024-05-01T12:00:00.000000123 [vm-1:fc_api] Shutting down VM after \
             intercepting signal 25, code 0.\n"
        );
        // An over-long line is cut, not overrun.
        let mut l = Line {
            buf: [0; 512],
            len: 0,
        };
        format_line(&mut l, now, &"x".repeat(600), b"t", format_args!("m"));
        assert_eq!(l.len, 512);
    }
}
