//! virtio-blk and virtio-net served by an external vhost-user backend
//! (`--disk vhost_user=PATH`, `--net vhost_user=PATH`; e.g. `qemu-storage-daemon --export
//! type=vhost-user-blk`). The backend owns the device's features and configuration space
//! (read once with `GET_CONFIG`); Vessel passes through the device-specific features its
//! transports can carry and keeps the device single-queue (one request queue for a disk,
//! one receive and one transmit queue for a NIC).

use std::path::{Path, PathBuf};

use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

use super::{Connection, Running, VhostUserError};

/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Which device the backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Net,
}

impl Kind {
    fn device_type(self) -> u32 {
        match self {
            Kind::Block => device_type::BLOCK,
            Kind::Net => device_type::NET,
        }
    }

    fn queues(self) -> usize {
        match self {
            Kind::Block => 1,
            Kind::Net => 2,
        }
    }

    /// Bytes of configuration space read from the backend (`struct virtio_blk_config` up to
    /// its write-zeroes fields; `struct virtio_net_config` up to `mtu`).
    fn config_len(self) -> u32 {
        match self {
            Kind::Block => 60,
            Kind::Net => 12,
        }
    }

    /// The device-specific features (bits 0-23) passed through: all but multiqueue (and
    /// the net control queue, and block's writable cache mode, whose configuration writes
    /// Vessel does not forward).
    fn device_features(self) -> u64 {
        let low = (1u64 << 24) - 1;
        match self {
            // VIRTIO_BLK_F_MQ (12), VIRTIO_BLK_F_CONFIG_WCE (11).
            Kind::Block => low & !(1 << 12) & !(1 << 11),
            // VIRTIO_NET_F_CTRL_VQ (17) and everything that needs it (18-23: CTRL_RX,
            // CTRL_VLAN, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR).
            Kind::Net => low & !(0x7f << 17),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Block => "vhost-user-blk",
            Kind::Net => "vhost-user-net",
        }
    }
}

/// Why a vhost-user disk or NIC cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum GenericError {
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error("the vhost-user-blk backend at {} cannot give its configuration (it needs VHOST_USER_PROTOCOL_F_CONFIG)", .0.display())]
    NoConfig(PathBuf),
}

/// A virtio device whose queues and configuration an external vhost-user backend serves.
pub struct VhostUserDevice {
    kind: Kind,
    conn: Connection,
    running: Option<Running>,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    features: u64,
}

impl VhostUserDevice {
    /// Connects to the backend listening at `path` and reads its configuration.
    pub fn new(kind: Kind, path: &Path) -> Result<VhostUserDevice, GenericError> {
        let mut conn = Connection::connect(path, kind.queues())?;
        let len = kind.config_len();
        let config = match conn.frontend.get_config(
            0,
            len,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; len as usize],
        ) {
            Ok((_, payload)) => payload.to_vec(),
            // A NIC's configuration is optional (the MAC then comes from the driver).
            Err(_) if kind == Kind::Net => vec![0u8; len as usize],
            Err(e) => {
                log::warn!("{}: GET_CONFIG: {e}", kind.name());
                return Err(GenericError::NoConfig(path.to_path_buf()));
            }
        };
        let features = conn.virtio_features() & (features::COMMON | kind.device_features());
        Ok(VhostUserDevice {
            kind,
            conn,
            running: None,
            queue_sizes: vec![QUEUE_SIZE; kind.queues()],
            config,
            features,
        })
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queues = self.queue_sizes.len();
        let name = self.kind.name();
        super::activate(&mut self.conn, &mut self.running, queues, name, ctx)
    }

    fn reset(&mut self) -> bool {
        super::stop(&mut self.conn, &mut self.running);
        true
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }
}
