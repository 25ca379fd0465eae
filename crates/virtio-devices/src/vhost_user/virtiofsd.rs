//! Finding and starting `virtiofsd` (the virtio-fs vhost-user backend, `cargo install
//! virtiofsd`) for `--fs tag=NAME,dir=PATH`.
//!
//! Vessel binds a listening socket in a private temporary directory, connects to it, and
//! hands the listening descriptor to `virtiofsd --fd`: the connection is waiting when
//! `virtiofsd` starts, so nothing polls for a socket file, and the file is gone before the
//! guest runs. `virtiofsd` gets SIGTERM if Vessel dies, and exits by itself when its
//! connection closes.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Environment variable naming the `virtiofsd` to start (before the search path).
pub const VIRTIOFSD_ENV: &str = "VESSEL_VIRTIOFSD";

/// Why `virtiofsd` could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("virtiofsd is not installed (install it with `cargo install virtiofsd`, or set {VIRTIOFSD_ENV} to its path)")]
    NotInstalled,
    #[error("the shared directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot set up the socket for virtiofsd in {}", dir.display())]
    Socket {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where `virtiofsd` is: `$VESSEL_VIRTIOFSD`, the search path, Debian's
/// `/usr/libexec/virtiofsd`, or where Vessel's test script installs it
/// (`~/.cache/vessel/tools/virtiofsd/bin`).
pub fn locate() -> Result<PathBuf, VirtiofsdError> {
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/libexec/virtiofsd"));
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/vessel/tools/virtiofsd/bin/virtiofsd"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(VirtiofsdError::NotInstalled)
}

/// A `virtiofsd` Vessel started. It exits once its connection closes (when the device is
/// dropped, at the VM's end); it is not waited for here (the VMM's threads may not `wait4`
/// under their seccomp filters), and is reaped when Vessel exits.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    /// Starts `program` sharing `dir` (read-only if asked) and returns the connected socket.
    pub fn spawn(
        program: &Path,
        dir: &Path,
        read_only: bool,
    ) -> Result<(Virtiofsd, UnixStream), VirtiofsdError> {
        if !dir.is_dir() {
            return Err(VirtiofsdError::NotADirectory(dir.to_path_buf()));
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let private = std::env::temp_dir().join(format!(
            "vessel-virtiofsd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let socket_err = |source| VirtiofsdError::Socket {
            dir: private.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(socket_err)?;
        let path = private.join("fs.sock");
        let bound = UnixListener::bind(&path).and_then(|l| Ok((UnixStream::connect(&path)?, l)));
        // The file is not needed once the connection is queued.
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&private);
        let (ours, listener) = bound.map_err(socket_err)?;
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.arg(format!("--fd={fd}"))
            .arg("--shared-dir")
            .arg(dir)
            .args(["--cache", "auto", "--log-level", "error"]);
        if read_only {
            cmd.arg("--readonly");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Namespaces need privileges an ordinary user may not have.
            cmd.args(["--sandbox", "none"]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        crate::net::passt::inherit_fd_and_die_with_parent(&mut cmd, fd);
        let child = cmd.spawn().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => VirtiofsdError::NotInstalled,
            _ => VirtiofsdError::Spawn {
                program: program.to_path_buf(),
                source,
            },
        })?;
        // virtiofsd has its copy; if it dies before accepting, ours would keep the queued
        // connection alive.
        drop(listener);
        Ok((Virtiofsd { child }, ours))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}
