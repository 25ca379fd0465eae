//! The `log` backend. Until a log path is configured, one line per record on stderr
//! (`vessel[warn]: message`). Once configured (`--log-path`, `PUT /logger`, a config file's
//! `logger`), records are appended to that file or FIFO (opened without blocking, as the
//! metrics sink) in Firecracker's format:
//!
//! ```text
//! 2024-05-01T12:00:00.123456789 [INSTANCE_ID:THREAD:LEVEL:FILE:LINE] message
//! ```
//!
//! where `:LEVEL` appears with `show_level` and `:FILE:LINE` with `show_log_origin` (UTC time).
//! A `module` filter keeps only records whose module path starts with it.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// What `PUT /logger` (or the process flags) can set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub show_level: bool,
    pub show_origin: bool,
    /// Only records from modules whose path starts with this.
    pub module: Option<String>,
}

struct State {
    file: Option<File>,
    options: Options,
    instance_id: String,
}

struct Logger {
    state: Mutex<State>,
}

impl Logger {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut state = self.lock();
        if let Some(m) = &state.options.module {
            if !r.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        if state.file.is_none() {
            // Not eprintln!, which panics when stderr's reader is gone (a runtime that spawned
            // the VMM and exited): the line is lost, the VMM goes on.
            let _ = writeln!(
                std::io::stderr(),
                "vessel[{}]: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
            return;
        }
        let line = format_line(&state, r, SystemTime::now());
        if let Some(f) = state.file.as_mut() {
            // A full FIFO drops the line rather than blocking the VMM.
            let _ = f.write_all(line.as_bytes());
        }
    }
    fn flush(&self) {}
}

static LOGGER: Logger = Logger {
    state: Mutex::new(State {
        file: None,
        options: Options {
            show_level: false,
            show_origin: false,
            module: None,
        },
        instance_id: String::new(),
    }),
};

/// The descriptor of the log file, -1 until one is configured: for a signal handler, which
/// cannot take the logger's lock (see `fc::signals`).
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

/// The configured log file's descriptor, written to directly by signal handlers.
pub fn raw_fd() -> Option<i32> {
    Some(LOG_FD.load(Ordering::Acquire)).filter(|fd| *fd >= 0)
}

/// `days` since 1970-01-01 as (year, month, day) in the proleptic Gregorian calendar.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn` (UTC).
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, mo, day) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_nanos()
    )
}

fn format_line(state: &State, r: &log::Record, now: SystemTime) -> String {
    let thread = std::thread::current();
    let mut tag = format!(
        "{}:{}",
        state.instance_id,
        thread.name().unwrap_or("unnamed")
    );
    if state.options.show_level {
        tag.push(':');
        tag.push_str(r.level().as_str());
    }
    if state.options.show_origin {
        tag.push_str(&format!(
            ":{}:{}",
            r.file().unwrap_or("?"),
            r.line().unwrap_or(0)
        ));
    }
    format!("{} [{tag}] {}\n", timestamp(now), r.args())
}

pub fn init(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// The instance id in file records (`--id`).
pub fn set_instance_id(id: &str) {
    LOGGER.lock().instance_id = id.to_string();
}

/// The format options of file records.
pub fn options() -> Options {
    LOGGER.lock().options.clone()
}

/// Sets the format options of file records.
pub fn set_options(options: Options) {
    LOGGER.lock().options = options;
}

/// Whether records go to a log file (else to stderr).
pub fn has_file() -> bool {
    LOGGER.lock().file.is_some()
}

/// Sends further records to `path` (appended). A FIFO is opened read-write and non-blocking,
/// so opening it never waits for a reader and a full FIFO never blocks the VMM.
pub fn set_path(path: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut state = LOGGER.lock();
    LOG_FD.store(f.as_raw_fd(), Ordering::Release);
    state.file = Some(f);
    Ok(())
}

/// A name that is not one of Firecracker's log levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a log level (error, warning, info, debug, trace, off)")]
pub struct LevelError(pub String);

/// Firecracker's level names (any case): Error, Warning, Info, Debug, Trace, Off.
pub fn parse_level(s: &str) -> Result<log::LevelFilter, LevelError> {
    match s.to_ascii_lowercase().as_str() {
        "warning" => Ok(log::LevelFilter::Warn),
        other => other.parse().map_err(|_| LevelError(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_time() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        // 2024-02-29T23:59:58.5 UTC (a leap day).
        let t = UNIX_EPOCH + Duration::new(1_709_251_198, 500_000_000);
        assert_eq!(timestamp(t), "2024-02-29T23:59:58.500000000");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(t), "2000-02-29T00:00:00.000000000");
    }

    #[test]
    fn lines_follow_firecracker_s_format() {
        let mut state = State {
            file: None,
            options: Options::default(),
            instance_id: "vm1".into(),
        };
        let args = format_args!("hello {}", 42);
        let record = log::Record::builder()
            .args(args)
            .level(log::Level::Warn)
            .file(Some("src/x.rs"))
            .line(Some(7))
            .build();
        let t = UNIX_EPOCH + Duration::from_secs(60);
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        assert_eq!(
            format_line(&state, &record, t),
            format!("1970-01-01T00:01:00.000000000 [vm1:{name}] hello 42\n")
        );
        state.options.show_level = true;
        state.options.show_origin = true;
        assert_eq!(
            format_line(&state, &record, t),
            format!("1970-01-01T00:01:00.000000000 [vm1:{name}:WARN:src/x.rs:7] hello 42\n")
        );
    }

    #[test]
    fn firecracker_level_names_parse() {
        assert_eq!(parse_level("Warning"), Ok(log::LevelFilter::Warn));
        assert_eq!(parse_level("OFF"), Ok(log::LevelFilter::Off));
        assert_eq!(parse_level("Debug"), Ok(log::LevelFilter::Debug));
        assert!(parse_level("loud").is_err());
    }
}
