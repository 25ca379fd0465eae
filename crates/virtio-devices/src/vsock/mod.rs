//! virtio-vsock (device type 19) with a Unix-socket host side, following Firecracker's
//! convention:
//!
//! - host-initiated: a host process connects to the Unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; once the guest accepts, the device answers `OK <host_port>\n` and
//!   relays bytes both ways;
//! - guest-initiated: a guest connection to host port `P` connects to the Unix socket
//!   `<uds_path>_<P>`; the guest gets a reset if nothing listens there.
//!
//! Streams only, with the credit-based flow control of virtio 1.2 section 5.10.6.3. The
//! listener and every connection live in the device worker's epoll set. Reset closes every
//! connection (the worker and everything it owns is dropped); a quiesce keeps them for the
//! resume; a device restored from a snapshot sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, as
//! its host-side connections did not survive.
//!
//! - [`packet`]: the 44-byte packet header;
//! - `muxer`: connections, their state machine and the queue processing.

mod muxer;
pub mod packet;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vessel_virtio::worker::Worker;
use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, DeviceState,
    DeviceStateError, VirtioDevice,
};
use vmm_sys_util::epoll::EventSet;

use muxer::{Muxer, Tokens};

/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;

/// What to build a virtio-vsock device from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockParams {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// Path of the host-side Unix socket (and prefix of `<uds_path>_<port>`).
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or too large (use 3..=4294967295)")]
    BadCid(u64),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
}

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    queue_sizes: [u16; 3],
    worker: Option<Worker>,
    /// The connections of a quiesced device, for its next activation.
    parked: Option<Muxer>,
    /// Restored from a snapshot: the next activation tells the driver its connections are
    /// gone (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`).
    reset_on_activate: bool,
}

impl Vsock {
    /// Listens on `uds_path` (replacing a stale socket file there).
    ///
    /// The CID may be 2^32 - 1 (`VMADDR_CID_ANY`), as in Firecracker: Kata Containers'
    /// runtime-rs configures that, and the guest's listeners on any CID still match.
    pub fn new(cfg: VsockParams) -> Result<Vsock, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cfg.guest_cid));
        }
        let listener = listen(&cfg.uds_path)?;
        Ok(Vsock {
            guest_cid: cfg.guest_cid,
            uds_path: cfg.uds_path,
            listener: Arc::new(listener),
            queue_sizes: [QUEUE_SIZE; 3],
            worker: None,
            parked: None,
            reset_on_activate: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let err = |source| VsockError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let l = UnixListener::bind(path).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker = None;
        let rx = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
        let tx = ctx.take_queue(1).ok_or(ActivateError::MissingQueue(1))?;
        // The event queue carries only transport-reset events, sent after a restore.
        let evq = ctx.take_queue(2);
        let evq_kick = match &evq {
            Some(q) => Some(q.kick.try_clone().map_err(ActivateError::Worker)?),
            None => None,
        };
        let mut fds = vec![
            (rx.kick.as_raw_fd(), Tokens::RX_KICK, EventSet::IN),
            (tx.kick.as_raw_fd(), Tokens::TX_KICK, EventSet::IN),
            (self.listener.as_raw_fd(), Tokens::LISTENER, EventSet::IN),
        ];
        if let Some(q) = &evq {
            fds.push((q.kick.as_raw_fd(), Tokens::EVT_KICK, EventSet::IN));
        }
        let mut muxer = match self.parked.take() {
            // Started again after a quiesce: the connections carry on.
            Some(mut m) => {
                m.rebind(ctx.mem, rx, tx, evq, ctx.interrupt, ctx.health);
                fds.extend(m.watched_fds());
                m
            }
            None => Muxer::new(
                ctx.mem,
                self.guest_cid,
                self.uds_path.clone(),
                self.listener.clone(),
                rx,
                tx,
                evq,
                ctx.interrupt,
                ctx.health,
            ),
        };
        let reset = std::mem::take(&mut self.reset_on_activate);
        if reset {
            muxer.request_transport_reset();
        }
        self.worker =
            Some(Worker::spawn("virtio-vsock", &fds, muxer).map_err(ActivateError::Worker)?);
        if let (true, Some(k)) = (reset, evq_kick) {
            k.write(1).map_err(ActivateError::Worker)?;
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Dropping the worker drops the muxer and closes every connection.
        self.worker = None;
        self.parked = None;
        self.reset_on_activate = false;
        true
    }

    fn quiesce(&mut self) -> bool {
        // The muxer never keeps a chain between events; keep it (and the host connections)
        // for the activation that resumes the device.
        if let Some(mut w) = self.worker.take() {
            self.parked = w.quiesce::<Muxer>();
        }
        true
    }

    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        if *state != DeviceState::None {
            return Err(DeviceStateError::kind(self.name(), state));
        }
        // The host side of every connection is gone with the old process.
        self.reset_on_activate = true;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        self.parked = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests;
