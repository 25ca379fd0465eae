//! virtio-fs (device type 26, virtio 1.2 section 5.11) on a vhost-user backend: the guest
//! mounts a host directory with `mount -t virtiofs TAG /mnt`, and `virtiofsd` serves the FUSE
//! requests from the queues. The VMM serves only the configuration space (`tag[36]` and
//! `num_request_queues`) and forwards the backend's interrupts.

use std::path::PathBuf;

use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};

use super::virtiofsd::{Virtiofsd, VirtiofsdError};
use super::{Connection, Running, VhostUserError};

/// The size of each queue (the driver may choose less).
pub const QUEUE_SIZE: u16 = 1024;
/// The longest tag (`tag[36]`, NUL-padded).
pub const TAG_MAX: usize = 36;
/// The most request queues a device may have.
pub const MAX_REQUEST_QUEUES: u16 = 16;

/// Where the device's backend is (also the VM configuration's `--fs` backend).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsBackend {
    /// A vhost-user backend already listening on this socket.
    Socket(PathBuf),
    /// Vessel starts `virtiofsd` sharing this directory.
    Dir { path: PathBuf, read_only: bool },
}

/// How to create a virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsParams {
    /// The name the guest mounts.
    pub tag: String,
    pub backend: FsBackend,
    /// Request queues (besides the high-priority queue).
    pub request_queues: u16,
}

/// Why a virtio-fs device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the tag must be 1 to {TAG_MAX} bytes with no NUL: {0:?}")]
    BadTag(String),
    #[error("the number of request queues must be 1 to {MAX_REQUEST_QUEUES}: {0}")]
    BadQueues(u16),
    #[error("cannot start virtiofsd")]
    Virtiofsd(#[source] VirtiofsdError),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
}

/// The virtio-fs device.
pub struct Fs {
    tag: String,
    request_queues: u16,
    queue_sizes: Vec<u16>,
    conn: Connection,
    running: Option<Running>,
    /// The `virtiofsd` Vessel started, if it did; declared after `conn` so that the
    /// connection closes (and `virtiofsd` exits) before it is reaped.
    _process: Option<Virtiofsd>,
}

impl Fs {
    /// Connects to (or starts) the backend and negotiates with it.
    pub fn new(params: &FsParams) -> Result<Fs, FsError> {
        let tag = &params.tag;
        if tag.is_empty() || tag.len() > TAG_MAX || tag.contains('\0') {
            return Err(FsError::BadTag(tag.clone()));
        }
        let q = params.request_queues;
        if q == 0 || q > MAX_REQUEST_QUEUES {
            return Err(FsError::BadQueues(q));
        }
        let queues = 1 + usize::from(q);
        let (conn, process) = match &params.backend {
            FsBackend::Socket(path) => (Connection::connect(path, queues)?, None),
            FsBackend::Dir { path, read_only } => {
                let program = super::virtiofsd::locate().map_err(FsError::Virtiofsd)?;
                let (process, sock) =
                    Virtiofsd::spawn(&program, path, *read_only).map_err(FsError::Virtiofsd)?;
                log::info!(
                    "virtio-fs {tag}: started {} (pid {}) sharing {}",
                    program.display(),
                    process.id(),
                    path.display()
                );
                (Connection::from_stream(sock, queues)?, Some(process))
            }
        };
        Ok(Fs {
            tag: tag.clone(),
            request_queues: q,
            queue_sizes: vec![QUEUE_SIZE; queues],
            conn,
            running: None,
            _process: process,
        })
    }

    /// The configuration space: the tag, NUL-padded, then `num_request_queues`.
    fn config(&self) -> [u8; TAG_MAX + 4] {
        let mut c = [0u8; TAG_MAX + 4];
        c[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        c[TAG_MAX..].copy_from_slice(&u32::from(self.request_queues).to_le_bytes());
        c
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        // What the backend does, of what Vessel's transports support.
        self.conn.virtio_features() & features::COMMON
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queues = self.queue_sizes.len();
        super::activate(&mut self.conn, &mut self.running, queues, "virtio-fs", ctx)
    }

    fn reset(&mut self) -> bool {
        super::stop(&mut self.conn, &mut self.running);
        true
    }

    fn name(&self) -> &'static str {
        "virtio-fs"
    }
}

#[cfg(test)]
mod tests;
