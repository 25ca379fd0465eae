//! The virtio-mmio transport (virtio 1.2, section 4.2; version 2 register layout only).
//!
//! A 4 KiB register window per device, one edge-triggered interrupt line (an irqfd), and the
//! queue notify register at offset 0x50 (which the VMM also binds to an ioeventfd per queue, so
//! notifications rarely reach this code). Everything but register decoding lives in
//! [`VirtioCommon`].

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vessel_devices::BusDevice;
use vessel_memory::GuestMemoryMmap;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::common::VirtioCommon;
use crate::device::{InterruptCause, VirtioDevice, VirtioInterrupt};
use crate::state::{MmioTransportState, StateError};

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue notify register (the ioeventfd address is base + this).
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "VSSL", little-endian.
pub const VENDOR_ID: u32 = 0x4c53_5356;
const CONFIG_OFFSET: u64 = 0x100;

const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// The interrupt of an MMIO device: the interrupt status register plus an irqfd.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, cause: InterruptCause) -> io::Result<()> {
        let bit = match cause {
            InterruptCause::Queue(_) => INT_USED_RING,
            InterruptCause::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.write(1)
    }
}

/// A virtio device behind an MMIO register window.
pub struct MmioTransport {
    common: VirtioCommon,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    /// `irq` is the event the VMM registers as the irqfd of the device's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> io::Result<Self> {
        let interrupt = Arc::new(MmioInterrupt::new(irq));
        let common = VirtioCommon::new(device, mem, interrupt.clone())?;
        Ok(MmioTransport { common, interrupt })
    }

    pub fn common(&self) -> &VirtioCommon {
        &self.common
    }

    /// Stops the device at a consistent point for a snapshot (see
    /// [`VirtioCommon::quiesce`]); the registers stay.
    pub fn quiesce(&mut self) -> Result<(), StateError> {
        self.common.quiesce()
    }

    /// The transport's state (the device must be quiesced or not running).
    pub fn save_state(&self) -> Result<MmioTransportState, StateError> {
        Ok(MmioTransportState {
            common: self.common.save_state()?,
            interrupt_status: self.interrupt.status(),
        })
    }

    /// Starts a quiesced device again (see [`VirtioCommon::resume`]).
    pub fn resume(&mut self) {
        self.common.resume();
    }

    /// Puts a saved state into this freshly built transport (see
    /// [`VirtioCommon::restore_state`]); a pending interrupt status is raised again.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), StateError> {
        self.common.restore_state(&state.common)?;
        let pending = state.interrupt_status & (INT_USED_RING | INT_CONFIG);
        if pending != 0 {
            self.interrupt.status.fetch_or(pending, Ordering::AcqRel);
            if let Err(e) = self.interrupt.irq.write(1) {
                log::warn!("virtio-mmio: cannot raise a restored interrupt: {e}");
            }
        }
        Ok(())
    }

    /// The queue notification events (register each as an ioeventfd at
    /// `base + NOTIFY_OFFSET` with the queue index as datamatch).
    pub fn queue_kicks(&self) -> &[EventFd] {
        self.common.queue_kicks()
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let c = &self.common;
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => c.device_type(),
            0x00c => VENDOR_ID,
            0x010 => c.device_features(),
            0x034 => u32::from(c.queue_max_size()),
            0x044 => u32::from(c.queue_ready()),
            0x060 => self.interrupt.status(),
            0x070 => u32::from(c.status()),
            0x0fc => c.config_generation(),
            // SHMLen and SHMBase: no device has shared memory regions; all ones says "no
            // such region" (virtio 1.2 section 4.2.2). Zero would be a region of length 0,
            // which Linux's virtio-fs tries to reserve, and fails the probe.
            0x0b0..=0x0bf => u32::MAX,
            _ => {
                log::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let c = &mut self.common;
        match offset {
            0x014 => c.set_device_features_sel(v),
            0x020 => c.write_driver_features(v),
            0x024 => c.set_driver_features_sel(v),
            0x030 => c.set_queue_select(v as u16),
            0x038 => {
                c.configure_queue(|q| q.set_size(v as u16));
            }
            0x044 => {
                c.configure_queue(|q| q.set_ready(v == 1));
            }
            0x050 => c.notify_queue(v),
            0x064 => self.interrupt.ack(v),
            0x070 => c.set_status(v as u8),
            0x080 => {
                c.configure_queue(|q| q.set_desc_table_address(Some(v), None));
            }
            0x084 => {
                c.configure_queue(|q| q.set_desc_table_address(None, Some(v)));
            }
            0x090 => {
                c.configure_queue(|q| q.set_avail_ring_address(Some(v), None));
            }
            0x094 => {
                c.configure_queue(|q| q.set_avail_ring_address(None, Some(v)));
            }
            0x0a0 => {
                c.configure_queue(|q| q.set_used_ring_address(Some(v), None));
            }
            0x0a4 => {
                c.configure_queue(|q| q.set_used_ring_address(None, Some(v)));
            }
            _ => log::debug!("virtio-mmio: write of register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.common.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.common.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// The kernel command-line form of a device, for kernels built with
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (the DSDT describes the devices too).
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::status;
    use crate::common::tests::{mem, FakeDevice};
    use crate::device::features;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(FakeDevice::new()), mem(), irq.try_clone().unwrap())
            .unwrap();
        (t, irq)
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 4);
        assert_eq!(rd(&mut t, 0xc), VENDOR_ID);
        // Unaligned or narrow register accesses read zero and do not panic.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x70, &[1, 2]);
        assert_eq!(rd(&mut t, 0x70), 0);
        // Shared memory region 0 does not exist: its length and base read as all ones.
        wr(&mut t, 0xac, 0);
        for reg in [0xb0, 0xb4, 0xb8, 0xbc] {
            assert_eq!(rd(&mut t, reg), u32::MAX, "{reg:#x}");
        }
    }

    #[test]
    fn full_driver_sequence() {
        let (mut t, irq) = transport();
        wr(
            &mut t,
            0x70,
            u32::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1);
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, features::RING_EVENT_IDX as u32);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        assert_ne!(rd(&mut t, 0x70) as u8 & status::FEATURES_OK, 0);
        wr(&mut t, 0x30, 0);
        assert_eq!(rd(&mut t, 0x34), 16);
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x80, 0x4000);
        wr(&mut t, 0x84, 0);
        wr(&mut t, 0x90, 0x5000);
        wr(&mut t, 0xa0, 0x6000);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(
            &mut t,
            0x70,
            u32::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
        );
        assert!(t.common().is_active());
        // A notification through the register reaches the queue's event.
        wr(&mut t, 0x50, 0);
        assert_eq!(t.queue_kicks()[0].read().unwrap(), 1);
        // Interrupt status, set by the device, cleared by the driver's ack.
        t.interrupt.trigger(InterruptCause::Queue(0)).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut t, 0x60), INT_USED_RING);
        wr(&mut t, 0x64, INT_USED_RING);
        assert_eq!(rd(&mut t, 0x60), 0);
        // Reset.
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert!(!t.common().is_active());
    }

    #[test]
    fn config_space_any_width() {
        let (mut t, _) = transport();
        let mut b = [0u8; 2];
        t.read(0x101, &mut b);
        assert_eq!(b, [0xbb, 0xcc]);
        t.write(0x100, &[0x11]);
        let mut b = [0u8; 1];
        t.read(0x100, &mut b);
        assert_eq!(b, [0x11]);
        assert_eq!(rd(&mut t, 0xfc), 1, "config generation moved");
    }

    #[test]
    fn cmdline_form() {
        assert_eq!(
            cmdline_entry(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
