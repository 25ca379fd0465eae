//! What a virtio device is, seen from its transport: the [`VirtioDevice`] trait that every
//! device (block, net, vsock, rng, balloon, console, pmem) implements once, and the
//! [`ActivateContext`] a transport hands it when the driver sets `DRIVER_OK`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::state::{DeviceState, DeviceStateError};

/// Device type ids (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
    pub const PMEM: u32 = 27;
}

/// Feature bits every device of ours may offer (the device-independent ones).
pub mod features {
    /// `VIRTIO_F_VERSION_1`: modern (non-legacy) device. Every Vessel device offers it.
    pub const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    /// `VIRTIO_RING_F_EVENT_IDX`: used/avail event suppression.
    pub const RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    /// `VIRTIO_RING_F_INDIRECT_DESC`: indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 =
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// `VIRTIO_F_IN_ORDER` is not offered; `VIRTIO_F_ACCESS_PLATFORM` neither (no IOMMU).
    pub const COMMON: u64 = VERSION_1 | RING_EVENT_IDX | RING_INDIRECT_DESC;
}

/// Why a device raises its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptCause {
    /// The device put buffers in the used ring of this queue.
    Queue(u16),
    /// The device configuration (or the device status, e.g. `DEVICE_NEEDS_RESET`) changed.
    Config,
}

/// How a device interrupts the driver: implemented by each transport (an irqfd plus the
/// interrupt status register for MMIO, an MSI-X vector per queue for PCI).
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt for `cause`.
    fn trigger(&self, cause: InterruptCause) -> io::Result<()>;
}

/// Shared between a transport and a running device: lets the device's worker mark the device
/// broken (the transport then shows `DEVICE_NEEDS_RESET` in the status and raises a config
/// interrupt), as virtio 1.2 section 2.1.2 allows when the driver misbehaves.
#[derive(Clone)]
pub struct DeviceHealth {
    broken: Arc<AtomicBool>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl DeviceHealth {
    pub fn new(interrupt: Arc<dyn VirtioInterrupt>) -> Self {
        DeviceHealth {
            broken: Arc::new(AtomicBool::new(false)),
            interrupt,
        }
    }

    /// Marks the device as needing a reset, logs why (once) and tells the driver.
    pub fn mark_broken(&self, why: &dyn std::fmt::Display) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            log::warn!("virtio device needs reset: {why}");
            if let Err(e) = self.interrupt.trigger(InterruptCause::Config) {
                log::warn!("cannot raise the config interrupt: {e}");
            }
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    pub(crate) fn clear(&self) {
        self.broken.store(false, Ordering::Release);
    }

    /// Marks the device broken without telling the driver (a restored device that was
    /// already broken when it was saved: the driver was told then).
    pub(crate) fn set_broken_quietly(&self) {
        self.broken.store(true, Ordering::Release);
    }
}

/// One queue handed to an activated device.
pub struct ActiveQueue {
    /// The queue as the driver configured it (addresses checked against guest memory, event
    /// index set from the negotiated features).
    pub queue: Queue,
    /// Written (by KVM through an ioeventfd, or by the transport) when the driver notifies.
    pub kick: EventFd,
    /// Index of the queue within the device.
    pub index: u16,
}

/// Everything a device needs to run, handed over when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// Features the driver accepted (a subset of what the device offered).
    pub acked_features: u64,
    /// The queues the driver made ready, in queue-index order. Queues the driver left
    /// disabled are absent (a device that needs them fails activation).
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub health: DeviceHealth,
}

impl ActivateContext {
    /// Takes the queue with `index` out of the context, if the driver enabled it.
    pub fn take_queue(&mut self, index: u16) -> Option<ActiveQueue> {
        let at = self.queues.iter().position(|q| q.index == index)?;
        Some(self.queues.remove(at))
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is required but was not enabled by the driver")]
    MissingQueue(u16),
    #[error("cannot start the device worker")]
    Worker(#[source] io::Error),
    /// The device's host backend (a TAP, a file) refused what activation asked of it.
    #[error("{what}")]
    Backend {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A virtio device, independent of its transport.
///
/// The transport owns the registers (features, status, queue configuration) through
/// [`crate::VirtioCommon`]; the device only says what it offers, serves its configuration
/// space and, once activated, processes its queues, usually in a worker thread of its own
/// (see [`crate::worker`]).
pub trait VirtioDevice: Send {
    /// The virtio device id (see [`device_type`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Every feature the device offers, device-independent bits included (usually
    /// [`features::COMMON`] plus device-specific ones).
    fn avail_features(&self) -> u64;

    /// Reads the device configuration space at `offset`. Bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space. Read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// Starts the device with the queues the driver set up.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Stops the device (its worker ends) so that it can be activated again. Returns false
    /// if the device cannot be reset; the driver then sees the reset fail.
    fn reset(&mut self) -> bool;

    /// A short name for logs and thread names ("virtio-blk").
    fn name(&self) -> &'static str;

    /// Stops the device's worker at a consistent point for a snapshot, like
    /// [`VirtioDevice::reset`] but keeping what the driver set up (the transport keeps its
    /// registers and activates the device again with the same queues).
    ///
    /// When this returns, the device holds no chain it popped without completing it: every
    /// request in flight has been finished and put in the used ring (or the chain given
    /// back), so each queue's next available and next used positions equal `used->idx` in
    /// guest memory. The default stops the device with `reset`, which is right for devices
    /// that never keep a chain across events and keep nothing worth carrying over.
    fn quiesce(&mut self) -> bool {
        self.reset()
    }

    /// Device-specific state for a snapshot (taken after [`VirtioDevice::quiesce`]):
    /// whatever the driver changed or saw that the device's construction does not give back.
    fn save_device_state(&self) -> DeviceState {
        DeviceState::None
    }

    /// Puts back what [`VirtioDevice::save_device_state`] saved, into a device built from the
    /// same configuration, before it is activated. Must not change anything on error. The
    /// default takes only [`DeviceState::None`].
    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::None => Ok(()),
            other => Err(DeviceStateError::kind(self.name(), other)),
        }
    }
}

/// Copies `data.len()` bytes of a configuration structure at `offset`, zero past its end.
/// Every device uses this to serve [`VirtioDevice::read_config`].
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&config, 10, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
