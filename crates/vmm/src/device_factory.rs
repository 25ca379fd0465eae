//! Turns the configured virtio devices into device models (`vessel-virtio-devices`), with
//! the transport each goes on.

use std::sync::Arc;
use vessel_virtio::VirtioDevice;

use vessel_virtio_devices::vhost_user::fs;
use vessel_virtio_devices::{balloon, block, net, pmem, rng, vsock};

use crate::device_config::{
    DeviceConfigs, DiskConfig, NetConfig, PasstConfig, PmemConfig, Transport,
};
use crate::device_manager::DeviceError;

/// Which list of [`DeviceConfigs`] a device comes from, in the order they are built
/// (a VM's devices are always in this order, hot-plugged ones too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Disk,
    Net,
    Vsock,
    Rng,
    Balloon,
    Pmem,
    VhostUser,
    Fs,
    /// The virtio-mem device (hotpluggable memory), added last.
    Memory,
}

/// A device model and where it goes.
pub struct PlannedDevice {
    pub device: Box<dyn VirtioDevice>,
    pub role: Role,
    pub transport: Transport,
    /// A virtio-pmem device's region, which KVM must map before the guest runs.
    pub pmem_region: Option<pmem::PmemRegion>,
}

/// Handles the VMM keeps on running devices (for the API and statistics).
#[derive(Default, Clone)]
pub struct DeviceHandles {
    pub balloon: Option<balloon::BalloonHandle>,
    /// Per-disk statistics, in `--disk` order.
    pub disks: Vec<Arc<block::BlockStats>>,
    /// Per-disk control (backing file swaps, rate limiter), in `--disk` order.
    pub blocks: Vec<block::BlockHandle>,
    /// Per-interface control (rate limiters), in `--net` order.
    pub nets: Vec<net::NetHandle>,
    /// Per-pmem-device control (rate limiter) and counters, in `--pmem` order.
    pub pmem: Vec<pmem::PmemHandle>,
    /// The virtio-mem device's control (requested size, status).
    pub memory_hotplug: Option<vessel_virtio_devices::mem::MemHandle>,
}

fn planned(device: impl VirtioDevice + 'static, role: Role, transport: Transport) -> PlannedDevice {
    PlannedDevice {
        device: Box::new(device),
        role,
        transport,
        pmem_region: None,
    }
}

/// A disk's handles: its statistics and its control.
pub struct DiskHandles {
    pub stats: Arc<block::BlockStats>,
    pub control: block::BlockHandle,
}

/// The virtio-blk device of `d`.
pub fn disk(d: &DiskConfig) -> Result<(PlannedDevice, DiskHandles), DeviceError> {
    let dev = block::Block::new(block::BlockParams {
        format: d.format,
        path: d.path.clone(),
        read_only: d.read_only,
        serial: d.serial.clone(),
        engine: block::BlockEngine::Auto,
    })
    .map_err(|e| DeviceError::setup(format!("--disk {}", d.path.display()), e))?;
    if let Some(r) = &d.rate_limiter {
        dev.rate_limiter().set_config(r);
    }
    let handles = DiskHandles {
        stats: dev.stats(),
        control: dev.handle(),
    };
    Ok((planned(dev, Role::Disk, d.transport), handles))
}

/// The virtio-net device of `n`.
pub fn net(n: &NetConfig) -> Result<(PlannedDevice, net::NetHandle), DeviceError> {
    let mut dev = match &n.passt {
        None => net::Net::new(net::NetParams {
            tap: n.tap.clone(),
            mac: n.mac,
            queue_pairs: n.queue_pairs,
        })
        .map_err(|e| DeviceError::setup(format!("--net tap={}", n.tap), e))?,
        Some(PasstConfig::Spawn { tcp_forwards }) => {
            let tcp_forwards = tcp_forwards
                .iter()
                .map(|f| format!("{}:{}", f.host, f.guest))
                .collect();
            let source = net::PasstSource::Spawn { tcp_forwards };
            net::Net::with_passt(&source, n.mac).map_err(|e| DeviceError::setup("--net user", e))?
        }
        Some(PasstConfig::Socket(path)) => {
            let source = net::PasstSource::Socket(path.clone());
            net::Net::with_passt(&source, n.mac).map_err(|e| {
                DeviceError::setup(format!("--net passt,socket={}", path.display()), e)
            })?
        }
    };
    dev.set_mmds(n.mmds.clone());
    let h = dev.handle();
    if let Some(r) = &n.rx_rate_limiter {
        h.rx.set_config(r);
    }
    if let Some(r) = &n.tx_rate_limiter {
        h.tx.set_config(r);
    }
    Ok((planned(dev, Role::Net, n.transport), h))
}

/// The virtio-pmem device of `p`, its region placed by `placer` (where `p` says, if it
/// says).
pub fn pmem_device(
    p: &PmemConfig,
    placer: &mut crate::pmem::Placer,
) -> Result<(PlannedDevice, pmem::PmemHandle), DeviceError> {
    let what = || format!("Cannot create pmem device {}", p.path.display());
    let mut dev = pmem::Pmem::new(&pmem::PmemParams {
        path: p.path.clone(),
        read_only: p.read_only,
    })
    .map_err(|e| DeviceError::setup(what(), e))?;
    let at = placer
        .place_at(p.guest_addr, dev.region().size)
        .map_err(|e| DeviceError::setup(what(), e))?;
    dev.set_guest_address(at);
    if let Some(r) = &p.rate_limiter {
        dev.rate_limiter().set_config(r);
    }
    let handle = dev.handle();
    let region = dev.region();
    let planned = PlannedDevice {
        pmem_region: Some(region),
        ..planned(dev, Role::Pmem, p.transport)
    };
    Ok((planned, handle))
}

/// The device models for `configs`, in a stable order (disks, nets, vsock, rng, balloon,
/// pmem, vhost-user, fs); pmem regions are placed by `placer` (in the guest layout's device
/// memory).
pub fn build(
    configs: &DeviceConfigs,
    placer: &mut crate::pmem::Placer,
) -> Result<(Vec<PlannedDevice>, DeviceHandles), DeviceError> {
    let mut out = Vec::new();
    let mut handles = DeviceHandles::default();
    for d in &configs.disks {
        let (dev, handle) = disk(d)?;
        handles.disks.push(handle.stats.clone());
        handles.blocks.push(handle.control);
        out.push(dev);
    }
    for n in &configs.nets {
        let (dev, handle) = net(n)?;
        handles.nets.push(handle);
        out.push(dev);
    }
    if let Some(v) = &configs.vsock {
        let dev = vsock::Vsock::new(vsock::VsockParams {
            guest_cid: v.cid,
            uds_path: v.uds.clone(),
        })
        .map_err(|e| DeviceError::setup(format!("--vsock uds={}", v.uds.display()), e))?;
        out.push(planned(dev, Role::Vsock, v.transport));
    }
    if let Some(t) = configs.rng {
        let dev = rng::Rng::with_limiter(configs.rng_rate_limiter.as_ref())
            .map_err(|e| DeviceError::setup("virtio-rng rate limiter", e))?;
        out.push(planned(dev, Role::Rng, t));
    }
    if let Some(b) = &configs.balloon {
        let dev = balloon::Balloon::new(balloon::BalloonParams {
            stats: b.stats,
            deflate_on_oom: b.deflate_on_oom,
            free_page_reporting: b.free_page_reporting,
            free_page_hinting: b.free_page_hinting,
        })
        .map_err(|e| DeviceError::setup("virtio-balloon", e))?;
        let handle = dev.handle();
        handle.set_target_mib(b.size_mib);
        handles.balloon = Some(handle);
        out.push(planned(dev, Role::Balloon, b.transport));
    }
    for p in &configs.pmem {
        let (dev, handle) = pmem_device(p, placer)?;
        handles.pmem.push(handle);
        out.push(dev);
    }
    for v in &configs.vhost_user {
        use crate::device_config::VhostUserKind;
        use vessel_virtio_devices::vhost_user::generic::{Kind, VhostUserDevice};
        let (kind, what) = match v.kind {
            VhostUserKind::Block => (Kind::Block, "--disk"),
            VhostUserKind::Net => (Kind::Net, "--net"),
        };
        let dev = VhostUserDevice::new(kind, &v.socket).map_err(|e| {
            DeviceError::setup(format!("{what} vhost_user={}", v.socket.display()), e)
        })?;
        out.push(planned(dev, Role::VhostUser, v.transport));
    }
    for f in &configs.fs {
        let dev = fs::Fs::new(&fs::FsParams {
            tag: f.tag.clone(),
            backend: f.backend.clone(),
            request_queues: f.request_queues,
        })
        .map_err(|e| DeviceError::setup(format!("--fs tag={}", f.tag), e))?;
        out.push(planned(dev, Role::Fs, f.transport));
    }
    Ok((out, handles))
}
