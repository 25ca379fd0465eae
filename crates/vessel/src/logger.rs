//! A minimal `log` backend: one line per record, prefixed with the level, on stderr or, once
//! configured (`--log-path`, `PUT /logger`), appended to a file or FIFO.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

struct Logger {
    file: Mutex<Option<File>>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!(
            "vessel[{}]: {}\n",
            r.level().as_str().to_lowercase(),
            r.args()
        );
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        match file.as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => eprint!("{line}"),
        }
    }
    fn flush(&self) {}
}

static LOGGER: Logger = Logger {
    file: Mutex::new(None),
};

pub fn init(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Sends further records to `path` (appended; a FIFO is opened without blocking on it).
pub fn set_path(path: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    *LOGGER.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

/// Firecracker's level names (any case): Error, Warning, Info, Debug, Trace, Off.
pub fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    match s.to_ascii_lowercase().as_str() {
        "warning" => Ok(log::LevelFilter::Warn),
        other => other.parse().map_err(|_| {
            format!("'{s}' is not a log level (error, warn, info, debug, trace, off)")
        }),
    }
}
