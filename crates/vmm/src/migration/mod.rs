//! Live migration between two Vessel processes, over a Unix or TCP socket.
//!
//! The sender ([`crate::VmHandle::migrate`], [`send`]) turns on KVM's dirty log, sends every non-zero
//! page while the guest runs, then re-sends the pages dirtied meanwhile, round after round,
//! until the pages left would go out within the downtime target, or the dirty set stops
//! shrinking (the guest dirties as fast as we send), or a round limit. Then it pauses the
//! guest, sends the last dirty pages and the VM state, and waits for the receiver's `Ack`:
//! only then does the source VM stop. Any failure before the `Ack` (the receiver dies, the
//! connection breaks, the receiver refuses the state) leaves the source running as before.
//!
//! The receiver ([`receive::receive`]) builds guest memory from the sender's layout, writes the pages
//! as they come, builds the VM from the state exactly as a snapshot restore does, starts it
//! and answers `Ack`. The wire format is `vessel_snapshot::stream`.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vessel_snapshot::dirty::MemRegion;
use vessel_snapshot::stream::FrameType;
use vessel_snapshot::SnapshotError;

use crate::config::VmConfig;
use crate::control::ControlError;
use crate::error::VmmError;
use crate::snapshot::SnapshotFailure;

pub mod receive;
pub mod send;

pub use receive::{receive, Incoming};

/// Where the receiver listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(String),
}

/// Not a migration address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a migration address: use unix:PATH or tcp:HOST:PORT")]
pub struct BadMigrationUrl(pub String);

impl std::str::FromStr for MigrationUrl {
    type Err = BadMigrationUrl;
    fn from_str(s: &str) -> Result<Self, BadMigrationUrl> {
        if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(MigrationUrl::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:").filter(|a| a.contains(':')) {
            Ok(MigrationUrl::Tcp(a.to_string()))
        } else {
            Err(BadMigrationUrl(s.to_string()))
        }
    }
}

/// A connected migration stream.
pub enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.read(buf),
            Connection::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.write(buf),
            Connection::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.flush(),
            Connection::Tcp(s) => s.flush(),
        }
    }
}

impl Connection {
    /// Connects to a listening receiver.
    pub fn connect(url: &MigrationUrl) -> io::Result<Connection> {
        Ok(match url {
            MigrationUrl::Unix(p) => Connection::Unix(UnixStream::connect(p)?),
            MigrationUrl::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Connection::Tcp(s)
            }
        })
    }

    /// Listens on `url` and accepts one sender.
    pub fn accept(url: &MigrationUrl) -> io::Result<Connection> {
        Ok(match url {
            MigrationUrl::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)?;
                let (s, _) = l.accept()?;
                let _ = std::fs::remove_file(p);
                Connection::Unix(s)
            }
            MigrationUrl::Tcp(a) => {
                let (s, _) = TcpListener::bind(a)?.accept()?;
                s.set_nodelay(true)?;
                Connection::Tcp(s)
            }
        })
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_read_timeout(t),
            Connection::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

/// How to migrate.
#[derive(Debug, Clone, Copy)]
pub struct MigrateOptions {
    /// The longest pause the guest should see.
    pub downtime: Duration,
    /// Pre-copy rounds at most before stopping the guest anyway.
    pub max_rounds: u32,
    /// How long to wait for the receiver's answer once the state is sent.
    pub ack_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime: Duration::from_millis(10),
            max_rounds: 30,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStats {
    /// Pre-copy rounds after the first full pass.
    pub rounds: u32,
    /// Bytes put on the wire.
    pub bytes_sent: u64,
    /// Pages sent while the guest ran, and while it was paused.
    pub pages_live: u64,
    pub pages_paused: u64,
    /// From the guest's pause to the receiver's `Ack`.
    pub downtime_us: u64,
    pub total_ms: u64,
    /// Why pre-copy ended: "target", "not converging" or "round limit".
    pub converged: String,
}

/// Why a migration failed. On the sender, the source VM is running (or paused, if it was)
/// as before; on the receiver, the sender was told and keeps its VM.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the VM is not running")]
    NotRunning,
    #[error("migration connection")]
    Io(#[from] io::Error),
    #[error("the receiver refused the VM: {0}")]
    Refused(String),
    #[error("the receiver sent an unexpected {0:?} frame")]
    UnexpectedAnswer(FrameType),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotFailure),
    #[error("the VM state")]
    Encode(#[source] SnapshotError),
    #[error("reading guest memory")]
    ReadMemory(#[source] vessel_memory::vm_memory::GuestMemoryError),
    #[error("KVM's dirty log")]
    DirtyLog(#[source] Box<VmmError>),
    // The receiver's side.
    #[error("the stream does not start with a hello")]
    NoHello,
    #[error("the hello does not parse")]
    BadHello(#[source] serde_json::Error),
    #[error("protocol version {0} (this Vessel speaks {PROTOCOL_VERSION})")]
    Version(u32),
    #[error("guest memory for the sender's layout")]
    Memory(#[source] vessel_memory::vm_memory::mmap::FromRangesError),
    #[error("pages at {gpa:#x}")]
    Pages {
        gpa: u64,
        #[source]
        source: vessel_memory::vm_memory::GuestMemoryError,
    },
    #[error("unexpected {0:?} frame")]
    UnexpectedFrame(FrameType),
    #[error("the state does not decode")]
    Decode(#[source] SnapshotError),
    #[error("the state's memory layout differs from the hello's")]
    LayoutMismatch,
    #[error("the sender is gone before the hand-over")]
    SenderGone(#[source] io::Error),
}

/// The first frame: what the receiver needs to build memory before pages arrive.
#[derive(Serialize, Deserialize)]
struct Hello {
    version: u32,
    config: VmConfig,
    regions: Vec<MemRegion>,
}

const PROTOCOL_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4000".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Tcp("127.0.0.1:4000".into()))
        );
        for bad in ["", "unix:", "tcp:host", "http://x", "/tmp/m.sock"] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
    }
}
