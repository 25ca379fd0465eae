//! The passt backend: user-mode networking through a `passt` process, over its qemu-style
//! stream protocol (a Unix stream socket carrying, for each frame, a 4-byte big-endian length
//! and then a plain Ethernet frame: no virtio-net header, no offloads).
//!
//! - [`PasstStream`]: the framing on a non-blocking socket (a receive buffer that frames may
//!   reach split or several at a time; a send buffer so a partial write never interleaves
//!   two frames);
//! - [`PasstProcess`]: a passt that Vessel starts on one end of a socket pair. passt exits
//!   when the other end closes (the device is dropped with the VM), and the kernel sends it
//!   SIGTERM if the thread that started it dies first (`PR_SET_PDEATHSIG`). Vessel never
//!   signals or reaps it itself: its seccomp filters forbid `kill`, and `wait4` is not
//!   needed by anything else (a process running one VM leaves the zombie to init).

use super::worker::read_iovs;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Largest length a frame from passt may announce: more means the stream lost its framing.
pub const MAX_FRAME_LEN: usize = 65_550;
/// Bytes the receive buffer holds: at least one whole frame and its length.
const RX_BUF_LEN: usize = 256 * 1024;
/// Pending bytes past which a queued frame is sent right away instead of at the end of the
/// transmit batch.
const TX_FLUSH_AT: usize = 64 * 1024;
/// Pending bytes past which frames are dropped (passt is not reading).
const TX_MAX_PENDING: usize = 1024 * 1024;

/// Why passt could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("passt is not installed (install Debian's `passt` package: apt-get install passt)")]
    NotInstalled,
    #[error("cannot start passt")]
    Spawn(#[source] io::Error),
    #[error("cannot create the socket pair for passt")]
    SocketPair(#[source] io::Error),
    #[error("cannot connect to passt's socket {path:?}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why the stream with passt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// passt closed its end (it exited).
    Closed,
    /// A frame announced this length: the stream is desynchronized.
    Desync(u32),
    /// The socket failed.
    Failed(io::ErrorKind),
}

impl fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamEnd::Closed => write!(f, "passt closed the connection"),
            StreamEnd::Desync(n) => write!(f, "passt sent a frame length of {n} (stream lost)"),
            StreamEnd::Failed(k) => write!(f, "the socket to passt failed ({k})"),
        }
    }
}

/// Frames dropped on the way, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PasstStats {
    /// Frames from passt with a length of 0.
    pub rx_dropped: u64,
    /// Guest frames dropped because passt was gone or not reading.
    pub tx_dropped: u64,
}

/// The framing of a connection to passt.
#[derive(Debug)]
pub struct PasstStream {
    sock: UnixStream,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    tx_start: usize,
    end: Option<StreamEnd>,
    pub stats: PasstStats,
    /// Whether the worker watches the socket for room to write (kept by the worker).
    pub(crate) out_polled: bool,
}

impl PasstStream {
    /// Wraps a connected stream socket (made non-blocking).
    pub fn new(sock: UnixStream) -> io::Result<PasstStream> {
        sock.set_nonblocking(true)?;
        Ok(PasstStream {
            sock,
            rx: vec![0; RX_BUF_LEN],
            rx_start: 0,
            rx_end: 0,
            tx: Vec::new(),
            tx_start: 0,
            end: None,
            stats: PasstStats::default(),
            out_polled: false,
        })
    }

    /// Connects to a passt listening on `path` (`passt --socket PATH`).
    pub fn connect(path: &Path) -> Result<PasstStream, PasstError> {
        let connect_err = |source| PasstError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let sock = UnixStream::connect(path).map_err(connect_err)?;
        PasstStream::new(sock).map_err(connect_err)
    }

    /// Why the stream ended, once it has.
    pub fn end(&self) -> Option<StreamEnd> {
        self.end
    }

    /// Ends the stream (passt hung up): nothing more is read or sent.
    pub fn close(&mut self) {
        self.finish(StreamEnd::Closed);
    }

    fn finish(&mut self, end: StreamEnd) -> StreamEnd {
        *self.end.get_or_insert(end)
    }

    /// Makes sure the next frame is whole in the receive buffer (reading the socket as
    /// needed) and returns its length; `None` while it has not all arrived. Frames of length
    /// 0 are skipped and counted.
    pub fn peek_frame(&mut self) -> Result<Option<usize>, StreamEnd> {
        if let Some(end) = self.end {
            return Err(end);
        }
        loop {
            let avail = self.rx_end - self.rx_start;
            if avail >= 4 {
                let mut be = [0u8; 4];
                be.copy_from_slice(&self.rx[self.rx_start..self.rx_start + 4]);
                let len = u32::from_be_bytes(be);
                if len == 0 {
                    self.rx_start += 4;
                    self.stats.rx_dropped += 1;
                    continue;
                }
                if len as usize > MAX_FRAME_LEN {
                    return Err(self.finish(StreamEnd::Desync(len)));
                }
                if avail >= 4 + len as usize {
                    return Ok(Some(len as usize));
                }
            }
            // Keep what is left of a frame at the front and read behind it.
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            match self.sock.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(self.finish(StreamEnd::Closed)),
                Ok(n) => self.rx_end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.finish(StreamEnd::Failed(e.kind()))),
            }
        }
    }

    /// The frame [`PasstStream::peek_frame`] found (empty when there is none).
    pub fn frame(&self) -> &[u8] {
        if self.rx_end - self.rx_start < 4 {
            return &[];
        }
        let mut be = [0u8; 4];
        be.copy_from_slice(&self.rx[self.rx_start..self.rx_start + 4]);
        let len = be.iter().fold(0usize, |a, &b| a << 8 | usize::from(b));
        let start = self.rx_start + 4;
        &self.rx[start..(start + len).min(self.rx_end)]
    }

    /// Moves past the frame [`PasstStream::peek_frame`] found.
    pub fn consume_frame(&mut self) {
        let len = self.frame().len();
        self.rx_start += 4 + len;
    }

    /// Queues a frame of `len` bytes found `skip` bytes into the guest buffers `iovs` (past
    /// the virtio-net header); false when it was dropped. Sent by [`PasstStream::flush`],
    /// or right away once enough is pending.
    pub fn queue_frame(&mut self, iovs: &[libc::iovec], skip: usize, len: usize) -> bool {
        if self.end.is_some() || self.tx.len() - self.tx_start > TX_MAX_PENDING {
            self.stats.tx_dropped += 1;
            return false;
        }
        let at = self.tx.len();
        self.tx.extend_from_slice(&(len as u32).to_be_bytes());
        self.tx.resize(at + 4 + len, 0);
        let copied = read_iovs(iovs, skip, &mut self.tx[at + 4..]);
        debug_assert_eq!(copied, len);
        if self.tx.len() - self.tx_start >= TX_FLUSH_AT {
            let _ = self.flush();
        }
        true
    }

    /// Queues one frame held in `frame`.
    pub fn queue_bytes(&mut self, frame: &[u8]) -> bool {
        let iov = libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        };
        self.queue_frame(&[iov], 0, frame.len())
    }

    /// Whether queued bytes wait for room in the socket.
    pub fn wants_out(&self) -> bool {
        self.end.is_none() && self.tx_start < self.tx.len()
    }

    /// Sends what is queued, as far as the socket takes it (what it does not take waits for
    /// the next call).
    pub fn flush(&mut self) -> Result<(), StreamEnd> {
        if let Some(end) = self.end {
            return Err(end);
        }
        while self.tx_start < self.tx.len() {
            let buf = &self.tx[self.tx_start..];
            // SAFETY: sends from `buf`, which is live for the call; MSG_NOSIGNAL turns a
            // closed peer into EPIPE instead of SIGPIPE; the result is checked.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                        return Err(self.finish(StreamEnd::Closed))
                    }
                    k => return Err(self.finish(StreamEnd::Failed(k))),
                }
            }
            self.tx_start += n as usize;
        }
        if self.tx_start == self.tx.len() {
            self.tx.clear();
            self.tx_start = 0;
        } else if self.tx_start > TX_MAX_PENDING {
            self.tx.drain(..self.tx_start);
            self.tx_start = 0;
        }
        Ok(())
    }
}

impl AsRawFd for PasstStream {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.sock.as_raw_fd()
    }
}

/// Makes the child `cmd` starts keep `fd` open across its exec (clears `FD_CLOEXEC`) and
/// get SIGTERM when the thread that started it exits (`PR_SET_PDEATHSIG`): passt and its
/// keeper both start this way.
pub(crate) fn inherit_fd_and_die_with_parent(cmd: &mut Command, fd: std::os::unix::io::RawFd) {
    let pre_exec = move || {
        // SAFETY: fcntl and prctl are async-signal-safe and take plain integers; `fd` is open
        // in the child (inherited on fork).
        unsafe {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe calls and allocates nothing.
    unsafe {
        cmd.pre_exec(pre_exec);
    }
}

/// A passt that Vessel started; it exits once its socket's other end is closed.
#[derive(Debug)]
pub struct PasstProcess {
    child: Child,
}

impl PasstProcess {
    /// Starts `passt` on one end of a new socket pair and returns the other end.
    /// `tcp_forwards` are passt `-t` specifications (`HOSTPORT:GUESTPORT`).
    pub fn spawn(tcp_forwards: &[String]) -> Result<(PasstProcess, UnixStream), PasstError> {
        PasstProcess::spawn_program(Path::new("passt"), tcp_forwards)
    }

    /// [`PasstProcess::spawn`] with another program (tests).
    pub fn spawn_program(
        program: &Path,
        tcp_forwards: &[String],
    ) -> Result<(PasstProcess, UnixStream), PasstError> {
        let (ours, theirs) = UnixStream::pair().map_err(PasstError::SocketPair)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.arg("--fd")
            .arg(fd.to_string())
            .arg("--foreground")
            .arg("--quiet");
        for f in tcp_forwards {
            cmd.arg("-t").arg(f);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        inherit_fd_and_die_with_parent(&mut cmd, fd);
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PasstError::NotInstalled,
            _ => PasstError::Spawn(e),
        })?;
        // passt has its copy; ours would keep the connection open after passt exits.
        drop(theirs);
        Ok((PasstProcess { child }, ours))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether passt has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// How passt ended, once it has (reaping it).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops passt (SIGTERM) and reaps it: only where the filters allow it (the keeper).
    pub fn stop(&mut self) {
        // SAFETY: kill takes plain integers; the child is not reaped yet, so its pid is ours.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

pub mod keeper;

#[cfg(test)]
mod tests;
