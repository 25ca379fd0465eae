//! Where the guest's COM1 output goes when it is a file or FIFO (Firecracker's `PUT /serial`):
//! opened without blocking, so a FIFO nobody reads never stalls the vCPU (bytes that do not
//! fit are dropped), and optionally rate limited by a token bucket of bytes, whose excess is
//! dropped and counted (Firecracker's `uart.rate_limiter_dropped_bytes`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vessel_ratelimit::{BucketConfig, Clock, MonotonicClock, TokenBucket};

/// A non-blocking, optionally rate-limited serial sink.
pub struct SerialOut<W, C: Clock = MonotonicClock> {
    out: W,
    limit: Option<TokenBucket>,
    clock: C,
    dropped: Arc<AtomicU64>,
}

/// Opens `path` for appending (created if missing) without blocking: a FIFO must have a
/// reader already, as with Firecracker.
pub fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

impl<W: Write> SerialOut<W, MonotonicClock> {
    /// Writes to `out`, limited by `limit` when given.
    pub fn new(out: W, limit: Option<BucketConfig>) -> Self {
        Self::with_clock(out, limit, MonotonicClock::default())
    }
}

impl<W: Write, C: Clock> SerialOut<W, C> {
    /// As [`SerialOut::new`], on `clock`.
    pub fn with_clock(out: W, limit: Option<BucketConfig>, clock: C) -> Self {
        let limit = limit.and_then(|c| TokenBucket::new(c, clock.now()));
        SerialOut {
            out,
            limit,
            clock,
            dropped: Arc::default(),
        }
    }

    /// The count of bytes dropped so far (over the rate, or not accepted by the file).
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }

    fn drop_bytes(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl<W: Write, C: Clock> Write for SerialOut<W, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(bucket) = &mut self.limit {
            if !bucket.try_consume(buf.len() as u64, self.clock.now()) {
                self.drop_bytes(buf.len());
                return Ok(buf.len());
            }
        }
        match self.out.write(buf) {
            Ok(n) => {
                // The rest did not fit (a full FIFO): dropped, the guest is not held up.
                self.drop_bytes(buf.len() - n);
                Ok(buf.len())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.drop_bytes(buf.len());
                Ok(buf.len())
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.flush() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vessel_ratelimit::FakeClock;

    #[test]
    fn bytes_over_the_rate_are_dropped_and_counted() {
        let clock = FakeClock::new();
        let limit = BucketConfig {
            size: 10,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        let mut out = SerialOut::with_clock(Vec::new(), Some(limit), clock.clone());
        let dropped = out.dropped();
        assert_eq!(out.write(b"0123456789").unwrap(), 10);
        assert_eq!(out.write(b"abc").unwrap(), 3);
        assert_eq!(out.out, b"0123456789");
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        // A second later the bucket is full again.
        clock.advance(Duration::from_secs(1));
        out.write_all(b"abc").unwrap();
        assert_eq!(out.out, b"0123456789abc");
    }

    #[test]
    fn a_fifo_with_no_reader_is_refused_and_a_full_one_drops() {
        let dir = std::env::temp_dir().join(format!("vessel-serial-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No reader: ENXIO at once rather than a hang.
        assert_eq!(open(&fifo).unwrap_err().raw_os_error(), Some(libc::ENXIO));
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut out = SerialOut::new(open(&fifo).unwrap(), None);
        let dropped = out.dropped();
        // Far more than a pipe holds: the guest's writes all "succeed", the excess is dropped.
        let chunk = [b'x'; 4096];
        for _ in 0..64 {
            assert_eq!(out.write(&chunk).unwrap(), chunk.len());
        }
        assert!(dropped.load(Ordering::Relaxed) > 0);
        drop(reader);
        let _ = std::fs::remove_dir_all(dir);
    }
}
