//! Firecracker's SIGXFSZ handling: a VMM that goes past its file size limit (the jailer's
//! `--resource-limit fsize=N`) does not die of the signal's default action but logs
//!
//! ```text
//! Shutting down VM after intercepting signal 25, code 0.
//! ```
//!
//! (to the log file, else stderr) and exits with Firecracker's status for it, 151. Installed
//! for the whole process at start in Firecracker mode; the VM's own handlers (SIGINT, SIGTERM,
//! the vCPU kick) leave it alone.
//!
//! The handler only formats into a buffer on its stack and calls `clock_gettime`,
//! `prctl(PR_GET_NAME)`, `write` and `exit_group`: async-signal-safe, and allowed by every
//! thread's seccomp filter. Firecracker also counts the signal in its `signals` metrics group
//! and flushes the metrics; Vessel has no such group, and formatting metrics is not
//! async-signal-safe.

use std::fmt::Write as _;
use std::sync::OnceLock;

/// Firecracker's exit status after intercepting SIGXFSZ (`FcExitCode::SIGXFSZ`).
pub const SIGXFSZ_EXIT: i32 = 151;

/// The instance id for the log line, set once before the handler is installed.
static INSTANCE_ID: OnceLock<String> = OnceLock::new();

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

/// The log line for `signo`/`code`, as the logger writes records: UTC time, then
/// `[instance id:thread name]`, then Firecracker's message.
fn format_line(
    out: &mut Line,
    now: libc::timespec,
    id: &str,
    thread: &[u8],
    signo: i32,
    code: i32,
) {
    let secs = now.tv_sec;
    let (y, mo, d) = crate::logger::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let thread = std::str::from_utf8(thread).unwrap_or("?");
    let _ = writeln!(
        out,
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:09} [{id}:{thread}] \
         Shutting down VM after intercepting signal {signo}, code {code}.",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.tv_nsec
    );
}

extern "C" fn on_sigxfsz(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let (signo, code) = if info.is_null() {
        (num, 0)
    } else {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        unsafe { ((*info).si_signo, (*info).si_code) }
    };
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
    format_line(&mut line, now, id, &name[..name_len], signo, code);
    let fd = crate::logger::raw_fd().unwrap_or(libc::STDERR_FILENO);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is a live local.
    unsafe {
        libc::write(fd, line.buf.as_ptr().cast(), line.len);
        libc::_exit(if signo == libc::SIGXFSZ {
            SIGXFSZ_EXIT
        } else {
            // Firecracker's UnexpectedError.
            2
        });
    }
}

/// Installs the SIGXFSZ handler for the process (instance `id` in its log line).
pub fn install(id: &str) -> Result<(), vmm_sys_util::errno::Error> {
    let _ = INSTANCE_ID.set(id.to_string());
    vmm_sys_util::signal::register_signal_handler(libc::SIGXFSZ, on_sigxfsz)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        format_line(&mut l, now, "vm-1", b"fc_api", libc::SIGXFSZ, 0);
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
        format_line(&mut l, now, &"x".repeat(600), b"t", 25, 0);
        assert_eq!(l.len, 512);
    }
}
