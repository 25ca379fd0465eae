//! The passt keeper: a small process that Vessel starts (a fork and exec of the vessel
//! binary itself, `vessel passt-keeper`) while it still may, before its seccomp filters
//! forbid `fork`, `execve`, `kill` and `wait4`. The keeper starts passt on one end of a new
//! socket pair and hands the other end to Vessel over a control socket (`SCM_RIGHTS`); when
//! passt exits it waits (1 s, 2 s, 4 s, ... at most 30 s; back to 1 s after a passt that
//! ran for a minute) and starts another. It exits, stopping passt, when the control socket
//! closes (the device, or Vessel, is gone), and the kernel sends it SIGTERM if Vessel dies
//! first (`PR_SET_PDEATHSIG`).
//!
//! The control socket is a `SOCK_SEQPACKET` pair; each message from the keeper is one of
//! - `F` and passt's process id (4 bytes, little-endian), with passt's socket attached;
//! - `E` and a UTF-8 message: passt could not be started (it is tried again later).

use std::io;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{PasstError, PasstProcess};

/// The first wait before starting passt again.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// The longest wait before starting passt again.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a passt must have run for the wait to start over from [`BACKOFF_START`].
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How long Vessel waits for the first passt.
const FIRST_TIMEOUT: Duration = Duration::from_secs(10);

/// The hidden subcommand of the vessel binary that runs [`keeper_main`].
pub const SUBCOMMAND: &str = "passt-keeper";

/// A message from the keeper.
#[derive(Debug)]
pub enum KeeperMsg {
    /// A new passt (its process id) and Vessel's end of its socket.
    Passt { pid: u32, sock: UnixStream },
    /// passt could not be started.
    Failed(String),
}

/// Vessel's end of the control socket.
#[derive(Debug)]
pub struct KeeperControl {
    fd: OwnedFd,
}

impl AsRawFd for KeeperControl {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A `SOCK_SEQPACKET` Unix socket pair, close-on-exec.
pub fn control_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`; the result is checked.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl KeeperControl {
    /// Wraps Vessel's end of the control socket.
    pub fn new(fd: OwnedFd) -> KeeperControl {
        KeeperControl { fd }
    }

    /// Receives one message: `Ok(None)` when none waits (`blocking` false) and
    /// `Err(UnexpectedEof)` once the keeper is gone.
    pub fn recv(&self, blocking: bool) -> io::Result<Option<KeeperMsg>> {
        let mut buf = [0u8; 512];
        // Room for one descriptor (CMSG_SPACE of an int), aligned for cmsghdr.
        let mut cbuf = [0u64; 4];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; every field used is set below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
            let flags = libc::MSG_CMSG_CLOEXEC | if blocking { 0 } else { libc::MSG_DONTWAIT };
            // SAFETY: `msg` points at `iov`, `buf` and `cbuf`, live for the call; the result
            // is checked.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, flags) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(None),
                    _ => return Err(e),
                }
            }
            // SAFETY: the control buffer was filled by the kernel; the CMSG_* helpers walk it
            // within `msg_controllen`.
            let fd = unsafe { take_fd(&msg) };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let data = &buf[..n as usize];
            return Ok(Some(match (data[0], fd) {
                (b'F', Some(fd)) if data.len() >= 5 => KeeperMsg::Passt {
                    pid: u32::from_le_bytes([data[1], data[2], data[3], data[4]]),
                    sock: UnixStream::from(fd),
                },
                (b'E', _) => KeeperMsg::Failed(String::from_utf8_lossy(&data[1..]).into_owned()),
                _ => KeeperMsg::Failed("the passt keeper sent a malformed message".into()),
            }));
        }
    }

    /// Waits up to `timeout` for the keeper's first message.
    fn recv_first(&self, timeout: Duration) -> io::Result<KeeperMsg> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd on our stack.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the passt keeper did not start passt in time",
            ));
        }
        self.recv(true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))
    }
}

/// The descriptor attached to `msg`, if any (others, which the keeper never sends, are
/// closed).
///
/// # Safety
/// `msg` must have been filled by `recvmsg`.
unsafe fn take_fd(msg: &libc::msghdr) -> Option<OwnedFd> {
    let mut found = None;
    // SAFETY: the caller's promise: every header CMSG_FIRSTHDR/CMSG_NXTHDR return lies in
    // the control buffer the kernel filled, each SCM_RIGHTS one carrying `count` descriptors
    // now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if found.is_none() {
                        found = Some(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    found
}

/// Sends `data` (with `fd` attached, if any) on the control socket.
pub(crate) fn send_msg(control: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic; the header and data fit in `cbuf` (32 bytes).
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at `iov`, `data` and `cbuf`, live for the call; MSG_NOSIGNAL
    // turns a closed peer into EPIPE; the result is checked.
    let n = unsafe { libc::sendmsg(control, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The keeper process Vessel started, and its end of the control socket.
#[derive(Debug)]
pub struct PasstKeeper {
    child: Child,
}

impl PasstKeeper {
    /// Starts the keeper with the command `make` builds for its end of the control socket
    /// (inherited under that number), and waits for the first passt.
    pub fn spawn(
        make: impl FnOnce(RawFd) -> Command,
    ) -> Result<(PasstKeeper, KeeperControl, u32, UnixStream), PasstError> {
        let (ours, theirs) = control_pair().map_err(PasstError::SocketPair)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = make(fd);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        super::inherit_fd_and_die_with_parent(&mut cmd, fd);
        let child = cmd.spawn().map_err(PasstError::Spawn)?;
        drop(theirs);
        let control = KeeperControl::new(ours);
        let keeper = PasstKeeper { child };
        match control.recv_first(FIRST_TIMEOUT) {
            Ok(KeeperMsg::Passt { pid, sock }) => Ok((keeper, control, pid, sock)),
            Ok(KeeperMsg::Failed(m)) if m == NOT_INSTALLED => Err(PasstError::NotInstalled),
            Ok(KeeperMsg::Failed(m)) => Err(PasstError::Spawn(io::Error::other(m))),
            Err(e) => Err(PasstError::Spawn(e)),
        }
    }

    /// The keeper's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the keeper has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

/// The command that runs the keeper in this binary (`vessel passt-keeper`), for passt with
/// `tcp_forwards`.
pub fn self_command(control_fd: RawFd, tcp_forwards: &[String]) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(SUBCOMMAND)
        .arg("--control-fd")
        .arg(control_fd.to_string());
    for f in tcp_forwards {
        cmd.arg("--tcp").arg(f);
    }
    cmd
}

/// What the keeper says when passt is not installed.
const NOT_INSTALLED: &str = "passt is not installed";

/// Whether the control socket was closed (Vessel is gone), waiting for it at most `wait`.
fn control_closed(control: RawFd, wait: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: control,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd on our stack.
    let r = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
    // Vessel never writes: readable means closed.
    r > 0 && pfd.revents != 0
}

/// Sleeps `d`, or less if the control socket closes (then true).
fn sleep_watching(control: RawFd, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if control_closed(control, left) {
            return true;
        }
    }
}

/// The keeper's loop (the `passt-keeper` subcommand): starts `passt_program` with
/// `tcp_forwards` again and again, handing each socket to Vessel on `control`, until
/// `control` closes. Returns the exit code.
pub fn keeper_main(control: RawFd, passt_program: &Path, tcp_forwards: &[String]) -> i32 {
    // SAFETY: plain integer arguments; the results are checked or harmless.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
            return 1;
        }
        // passt must not inherit the control socket.
        if libc::fcntl(control, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return 1;
        }
    }
    let mut backoff = BACKOFF_START;
    loop {
        let started = Instant::now();
        match PasstProcess::spawn_program(passt_program, tcp_forwards) {
            Ok((mut passt, sock)) => {
                let mut m = vec![b'F'];
                m.extend_from_slice(&passt.id().to_le_bytes());
                if send_msg(control, &m, Some(sock.as_raw_fd())).is_err() {
                    drop(sock);
                    passt.stop();
                    return 0;
                }
                drop(sock);
                loop {
                    if control_closed(control, Duration::from_millis(200)) {
                        passt.stop();
                        return 0;
                    }
                    if let Some(status) = passt.exit_status() {
                        let _ = writeln!(
                            io::stderr(),
                            "vessel passt-keeper: passt (pid {}) {status}",
                            passt.id()
                        );
                        break;
                    }
                }
            }
            Err(e) => {
                let text = match e {
                    PasstError::NotInstalled => NOT_INSTALLED.to_string(),
                    e => format!(
                        "{e}: {}",
                        std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
                    ),
                };
                let mut m = vec![b'E'];
                m.extend_from_slice(text.as_bytes());
                if send_msg(control, &m, None).is_err() {
                    return 0;
                }
            }
        }
        if started.elapsed() >= BACKOFF_RESET_AFTER {
            backoff = BACKOFF_START;
        }
        if sleep_watching(control, backoff) {
            return 0;
        }
        backoff = next_backoff(backoff);
    }
}

/// The wait after `d`: twice as long, at most [`BACKOFF_MAX`].
pub fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests;
