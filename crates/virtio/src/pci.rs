//! The virtio-pci transport (virtio 1.2, section 4.1): modern device only.
//!
//! One function per device: vendor 0x1af4, device 0x1040 + virtio type, revision 1. A single
//! 64-bit memory BAR (BAR0, [`BAR0_SIZE`]) holds every structure, each in its own page:
//!
//! | offset   | structure                                                  |
//! |----------|------------------------------------------------------------|
//! | `0x0000` | common configuration ([`VirtioCommon`] does the work)        |
//! | `0x1000` | ISR status (read clears)                                     |
//! | `0x2000` | device configuration                                         |
//! | `0x3000` | notifications: queue `i` at `+4 * i` (an ioeventfd each)     |
//! | `0x4000` | MSI-X table (up to 512 vectors)                              |
//! | `0x6000` | MSI-X pending bit array                                      |
//!
//! Interrupts go through MSI-X only: vector 0.. as the driver assigns them to the
//! configuration change and to each queue; a cause whose vector is `VIRTIO_MSI_NO_VECTOR` is
//! dropped (there is no INTx).

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use vessel_devices::BusDevice;
use vessel_memory::GuestMemoryMmap;
use vessel_pci::{
    BarInfo, BarKind, BarMove, BarSpec, ConfigError, ConfigSpace, MsiController, Msix, MsixError,
    MsixLocation, PciDevice, PciIds,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::common::VirtioCommon;
use crate::device::{device_type, InterruptCause, VirtioDevice, VirtioInterrupt};
use crate::state::{PciStateError, StateError, VirtioPciState};

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern devices have id 0x1040 + virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id of our functions (as QEMU's modern devices).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// `VIRTIO_MSI_NO_VECTOR`.
pub const NO_VECTOR: u16 = 0xffff;

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x8000;
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of `struct virtio_pci_common_cfg` (up to `queue_device`).
pub const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_LEN: u64 = 0x1000;
/// Queue `i` is notified at `NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * i`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_TABLE_SPACE: u64 = 0x2000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const MSIX_PBA_SPACE: u64 = 0x1000;
/// The most MSI-X vectors (queues + 1) the BAR layout has room for.
pub const MAX_VECTORS: u16 = (MSIX_TABLE_SPACE / 16) as u16;

/// `cfg_type` of the virtio vendor capabilities.
mod cap_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Why a virtio-pci function could not be built (VMM-side problems, never guest input).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("cannot create the queue events")]
    Io(#[from] io::Error),
    #[error("{0} queues do not fit the MSI-X table")]
    TooManyQueues(usize),
    #[error("configuration space")]
    Config(#[from] ConfigError),
    #[error("MSI-X")]
    Msix(#[from] MsixError),
}

/// (class, subclass, prog-if) for a virtio device type.
pub fn class_code(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        device_type::BLOCK => (0x01, 0x80, 0x00),
        device_type::NET => (0x02, 0x00, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}

/// The interrupt of a virtio-pci function: the ISR byte plus the MSI-X vector the driver
/// chose for each cause.
pub struct VirtioPciInterrupt {
    msix: Msix,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Box<[AtomicU16]>,
}

impl VirtioPciInterrupt {
    fn new(msix: Msix, queues: usize) -> Self {
        VirtioPciInterrupt {
            msix,
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        }
    }

    fn queue_vector(&self, q: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(q))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in self.queue_vectors.iter() {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, cause: InterruptCause) -> io::Result<()> {
        let (bit, vector) = match cause {
            InterruptCause::Queue(q) => (ISR_QUEUE, self.queue_vector(q)),
            InterruptCause::Config => (ISR_CONFIG, self.config_vector.load(Ordering::Acquire)),
        };
        self.isr.fetch_or(bit, Ordering::AcqRel);
        if vector == NO_VECTOR {
            return Ok(());
        }
        self.msix.trigger(vector)
    }
}

/// A virtio device behind a virtio-pci function.
///
/// It is both the [`PciDevice`] (put it on the `PciBus`) and the `BusDevice` of BAR0 (put it
/// on the MMIO bus at [`VirtioPciDevice::bar0`] with length [`BAR0_SIZE`]).
pub struct VirtioPciDevice {
    common: VirtioCommon,
    config: ConfigSpace,
    msix: Msix,
    interrupt: Arc<VirtioPciInterrupt>,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability (BAR access through config space).
    pci_cfg_cap: usize,
}

/// Offset of `pci_cfg_data` in the `VIRTIO_PCI_CAP_PCI_CFG` capability.
const PCI_CFG_DATA: usize = 16;

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

impl VirtioPciDevice {
    /// Wraps `device` with BAR0 at `bar0` (a base the VMM allocated, aligned to
    /// [`BAR0_SIZE`]); `msi` delivers the function's MSI-X vectors.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiController>,
        bar0: u64,
    ) -> Result<Self, VirtioPciError> {
        let queues = device.queue_max_sizes().len();
        let vectors = u16::try_from(queues + 1)
            .ok()
            .filter(|&v| v <= MAX_VECTORS)
            .ok_or(VirtioPciError::TooManyQueues(queues))?;
        let msix = Msix::new(
            vectors,
            MsixLocation {
                bar: 0,
                offset: MSIX_TABLE_OFFSET as u32,
            },
            MsixLocation {
                bar: 0,
                offset: MSIX_PBA_OFFSET as u32,
            },
            msi,
        )?;
        let dtype = device.device_type();
        let (class, subclass, prog_if) = class_code(dtype);
        let mut config = ConfigSpace::new(PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(dtype as u16),
            revision: 1,
            class,
            subclass,
            prog_if,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.add_bar(
            0,
            BarSpec {
                size: BAR0_SIZE,
                kind: BarKind::Memory64,
                prefetchable: false,
            },
            bar0,
        )?;
        config.add_msix(&msix)?;
        for (ty, offset, len) in [
            (cap_type::COMMON, COMMON_CFG_OFFSET, COMMON_CFG_LEN),
            (cap_type::ISR, ISR_OFFSET, 1),
            (cap_type::DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
        ] {
            config.add_capability(
                vessel_pci::config::cap_id::VENDOR_SPECIFIC,
                &virtio_cap_body(16, ty, offset, len),
                &[],
            )?;
        }
        let mut notify = virtio_cap_body(20, cap_type::NOTIFY, NOTIFY_OFFSET, NOTIFY_LEN).to_vec();
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(vessel_pci::config::cap_id::VENDOR_SPECIFIC, &notify, &[])?;
        // The access window: bar, offset, length and data are the driver's to write.
        let mut pci_cfg = virtio_cap_body(20, cap_type::PCI_CFG, 0, 0).to_vec();
        pci_cfg.extend_from_slice(&[0; 4]);
        let mut writable = [0xffu8; 18];
        writable[..2].fill(0);
        writable[3..6].fill(0);
        let pci_cfg_cap = config.add_capability(
            vessel_pci::config::cap_id::VENDOR_SPECIFIC,
            &pci_cfg,
            &writable,
        )?;

        let interrupt = Arc::new(VirtioPciInterrupt::new(msix.clone(), queues));
        let common = VirtioCommon::new(device, mem, interrupt.clone())?;
        Ok(VirtioPciDevice {
            common,
            config,
            msix,
            interrupt,
            pci_cfg_cap,
        })
    }

    /// Stops the device at a consistent point for a snapshot (see
    /// [`VirtioCommon::quiesce`]); the registers, config space and MSI-X table stay.
    pub fn quiesce(&mut self) -> Result<(), StateError> {
        self.common.quiesce()
    }

    /// The function's state (the device must be quiesced or not running).
    pub fn save_state(&self) -> Result<VirtioPciState, StateError> {
        let mut common = self.common.save_state()?;
        for (i, q) in common.queues.iter_mut().enumerate() {
            q.vector = self.interrupt.queue_vector(i as u16);
        }
        Ok(VirtioPciState {
            common,
            config: self.config.save_state(),
            msix: self.msix.save_state(),
            isr: self.interrupt.isr.load(Ordering::Acquire),
            config_vector: self.interrupt.config_vector.load(Ordering::Acquire),
        })
    }

    /// The driver's status register (0: no driver, or it reset the device).
    pub fn driver_status(&self) -> u8 {
        self.common.status()
    }

    /// Resets the device as a driver writing status 0 would (its workers stop), before it
    /// is taken off the bus.
    pub fn shut_down(&mut self) {
        self.common.set_status(0);
    }

    /// Starts a quiesced device again (see [`VirtioCommon::resume`]).
    pub fn resume(&mut self) {
        self.common.resume();
    }

    /// Puts a saved state into this freshly built function (built from the same device
    /// configuration at the same BAR address): configuration space, MSI-X table (every
    /// deliverable vector is announced to the [`MsiController`] again, which re-creates the
    /// VMM's routes), vectors, then the device (see [`VirtioCommon::restore_state`]). Every
    /// vector of a ready queue is raised once, in case an interrupt was lost with the old
    /// process (a spurious one is harmless). A state that does not fit changes nothing.
    pub fn restore_state(&mut self, state: &VirtioPciState) -> Result<(), StateError> {
        let name = self.common.device().name();
        let pci = |source: PciStateError| StateError::Pci { name, source };
        let vectors = self.msix.num_vectors();
        let vector_ok = |v: u16| v < vectors || v == crate::state::NO_VECTOR;
        if !vector_ok(state.config_vector) {
            return Err(pci(PciStateError::ConfigVector(state.config_vector)));
        }
        if let Some(q) = state.common.queues.iter().find(|q| !vector_ok(q.vector)) {
            return Err(pci(PciStateError::QueueVector(q.vector)));
        }
        if state.common.queues.len() != self.interrupt.queue_vectors.len() {
            return Err(StateError::QueueCount {
                name,
                saved: state.common.queues.len(),
                actual: self.interrupt.queue_vectors.len(),
            });
        }
        let config_before = self.config.save_state();
        let msix_before = self.msix.save_state();
        self.config
            .restore_state(&state.config)
            .map_err(|e| pci(e.into()))?;
        if let Err(e) = self.msix.restore_state(&state.msix) {
            let _ = self.config.restore_state(&config_before);
            return Err(pci(e.into()));
        }
        let irq = &self.interrupt;
        irq.config_vector
            .store(state.config_vector, Ordering::Release);
        for (slot, q) in irq.queue_vectors.iter().zip(&state.common.queues) {
            slot.store(q.vector, Ordering::Release);
        }
        irq.isr.store(state.isr, Ordering::Release);
        if let Err(e) = self.common.restore_state(&state.common) {
            self.interrupt.reset();
            let _ = self.msix.restore_state(&msix_before);
            let _ = self.config.restore_state(&config_before);
            return Err(e);
        }
        if self.common.is_active() {
            for q in state.common.queues.iter().filter(|q| q.ready) {
                if q.vector != crate::state::NO_VECTOR {
                    if let Err(e) = self.msix.trigger(q.vector) {
                        log::warn!("{name}: cannot raise restored vector {}: {e}", q.vector);
                    }
                }
            }
        }
        Ok(())
    }

    /// The BAR access the `VIRTIO_PCI_CAP_PCI_CFG` window selects, if the driver set up a
    /// valid one: (offset in BAR0, length).
    fn pci_cfg_access(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u32(cap + 4) as u8;
        let offset = u64::from(self.config.read_u32(cap + 8));
        let len = self.config.read_u32(cap + 12) as usize;
        let valid = bar == 0
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= BAR0_SIZE;
        valid.then_some((offset, len))
    }

    fn touches_pci_cfg_data(&self, offset: u64, len: usize) -> bool {
        let start = (self.pci_cfg_cap + PCI_CFG_DATA) as u64;
        offset < start + 4 && start < offset.saturating_add(len as u64)
    }

    pub fn common(&self) -> &VirtioCommon {
        &self.common
    }

    pub fn interrupt(&self) -> &Arc<VirtioPciInterrupt> {
        &self.interrupt
    }

    pub fn msix(&self) -> &Msix {
        &self.msix
    }

    /// Number of MSI-X vectors: one per queue plus one for configuration changes.
    pub fn num_msix_vectors(&self) -> u16 {
        self.msix.num_vectors()
    }

    /// Where BAR0 is now (it moves if the guest reprograms it; see `BarReprogram`).
    pub fn bar0(&self) -> u64 {
        self.config.bar(0).map_or(0, |b| b.base)
    }

    /// The queue notification events, in queue order: register event `i` as an ioeventfd
    /// (any length, no datamatch) at [`VirtioPciDevice::notify_address`]`(i)`.
    pub fn queue_kicks(&self) -> &[EventFd] {
        self.common.queue_kicks()
    }

    /// The guest-physical address where the driver notifies queue `queue`.
    pub fn notify_address(&self, queue: u16) -> Option<u64> {
        (queue < self.common.num_queues()).then(|| {
            self.bar0() + NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * u64::from(queue)
        })
    }

    /// The common configuration structure as the driver reads it.
    fn common_cfg(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let c = &self.common;
        let q = c.queue_select();
        let exists = q < c.num_queues();
        let mut b = [0u8; COMMON_CFG_LEN as usize];
        put(&mut b, 0x00, &c.device_features_sel().to_le_bytes());
        put(&mut b, 0x04, &c.device_features().to_le_bytes());
        put(&mut b, 0x08, &c.driver_features_sel().to_le_bytes());
        put(&mut b, 0x0c, &c.driver_features().to_le_bytes());
        let config_vector = self.interrupt.config_vector.load(Ordering::Acquire);
        put(&mut b, 0x10, &config_vector.to_le_bytes());
        put(&mut b, 0x12, &c.num_queues().to_le_bytes());
        b[0x14] = c.status();
        b[0x15] = c.config_generation() as u8;
        put(&mut b, 0x16, &q.to_le_bytes());
        put(&mut b, 0x18, &c.queue_size().to_le_bytes());
        put(&mut b, 0x1a, &self.interrupt.queue_vector(q).to_le_bytes());
        put(&mut b, 0x1c, &u16::from(c.queue_ready()).to_le_bytes());
        let notify_off = if exists { q } else { 0 };
        put(&mut b, 0x1e, &notify_off.to_le_bytes());
        put(&mut b, 0x20, &c.queue_desc().to_le_bytes());
        put(&mut b, 0x28, &c.queue_avail().to_le_bytes());
        put(&mut b, 0x30, &c.queue_used().to_le_bytes());
        b
    }

    /// A vector the driver may use: one the table has, or `NO_VECTOR` (which is also what a
    /// rejected choice reads back as).
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix.num_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let Some(dst) = raw.get_mut(..data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        let v = u64::from_le_bytes(raw);
        let (v32, v16) = (v as u32, v as u16);
        let c = &mut self.common;
        match (offset, data.len()) {
            (0x00, 4) => c.set_device_features_sel(v32),
            (0x08, 4) => c.set_driver_features_sel(v32),
            (0x0c, 4) => c.write_driver_features(v32),
            (0x10, 2) => {
                let v = self.valid_vector(v16);
                self.interrupt.config_vector.store(v, Ordering::Release);
            }
            (0x14, 1) => {
                c.set_status(v as u8);
                if v == 0 && c.status() == 0 {
                    self.interrupt.reset();
                }
            }
            (0x16, 2) => c.set_queue_select(v16),
            (0x18, 2) => {
                c.configure_queue(|q| q.set_size(v16));
            }
            (0x1a, 2) => {
                let q = usize::from(c.queue_select());
                let v = self.valid_vector(v16);
                if let Some(slot) = self.interrupt.queue_vectors.get(q) {
                    slot.store(v, Ordering::Release);
                }
            }
            (0x1c, 2) => {
                c.configure_queue(|q| q.set_ready(v16 == 1));
            }
            (0x20..=0x37, 4 | 8)
                if offset.is_multiple_of(4) && (data.len() == 4 || offset.is_multiple_of(8)) =>
            {
                let field = (offset - 0x20) / 8;
                let (lo, hi) = match (data.len(), offset % 8) {
                    (8, _) => (Some(v32), Some((v >> 32) as u32)),
                    (_, 0) => (Some(v32), None),
                    _ => (None, Some(v32)),
                };
                c.configure_queue(|q: &mut Queue| match field {
                    0 => q.set_desc_table_address(lo, hi),
                    1 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                });
            }
            _ => log::debug!(
                "virtio-pci: {}-byte write of common config at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

/// The bytes of a `struct virtio_pci_cap` after the id and next pointer.
fn virtio_cap_body(cap_len: u8, cfg_type: u8, offset: u64, len: u64) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0] = cap_len;
    b[1] = cfg_type;
    b[2] = 0; // BAR0
    b[3] = 0; // id
    b[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
    b[10..14].copy_from_slice(&(len as u32).to_le_bytes());
    b
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
        if !self.touches_pci_cfg_data(offset, data.len()) {
            return;
        }
        // Reading pci_cfg_data reads the BAR (with its side effects, e.g. the ISR).
        let mut window = [0u8; 4];
        if let Some((bar_off, len)) = self.pci_cfg_access() {
            self.bar_read(0, bar_off, &mut window[..len]);
        }
        let start = (self.pci_cfg_cap + PCI_CFG_DATA) as u64;
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(w) = offset
                .checked_add(i as u64)
                .and_then(|o| o.checked_sub(start))
                .and_then(|k| window.get(k as usize))
            {
                *b = *w;
            }
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Vec<BarMove> {
        let moves = self.config.write(offset, data);
        if self.touches_pci_cfg_data(offset, data.len()) {
            if let Some((bar_off, len)) = self.pci_cfg_access() {
                let window = self
                    .config
                    .read_u32(self.pci_cfg_cap + PCI_CFG_DATA)
                    .to_le_bytes();
                self.bar_write(0, bar_off, &window[..len]);
            }
        }
        moves
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < ISR_OFFSET => {
                let cfg = self.common_cfg();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = cfg.get(o as usize + i).copied().unwrap_or(0);
                }
            }
            ISR_OFFSET => {
                // Reading the ISR clears it.
                if let Some(b) = data.first_mut() {
                    *b = self.interrupt.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.common.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_TABLE_SPACE).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PBA_SPACE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_LEN => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.common.write_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                let rel = o - NOTIFY_OFFSET;
                let mult = u64::from(NOTIFY_OFF_MULTIPLIER);
                if rel.is_multiple_of(mult) {
                    // Out-of-range queues are ignored by `notify_queue`.
                    self.common.notify_queue((rel / mult) as u32);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_TABLE_SPACE).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PBA_SPACE).contains(&o) => {
                self.msix.write_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => log::debug!("virtio-pci: write to BAR0 at {offset:#x} ignored"),
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read(0, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write(0, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::status;
    use crate::common::tests::{mem, FakeDevice};
    use crate::device::features;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use vessel_pci::config::{cap_id, reg};
    use vessel_pci::MsiMessage;

    const BAR0: u64 = 0x1_0000_0000;

    #[derive(Default)]
    struct Controller {
        updates: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        triggers: Mutex<Vec<u16>>,
    }

    impl MsiController for Controller {
        fn update(&self, vector: u16, msg: Option<MsiMessage>) {
            self.updates.lock().unwrap().push((vector, msg));
        }
        fn trigger(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
            assert_eq!(msg.address, 0xfee0_0000, "the routed message");
            self.triggers.lock().unwrap().push(vector);
            Ok(())
        }
    }

    impl Controller {
        fn take_triggers(&self) -> Vec<u16> {
            std::mem::take(&mut self.triggers.lock().unwrap())
        }
    }

    struct Harness {
        dev: VirtioPciDevice,
        ctl: Arc<Controller>,
        activations: Arc<AtomicUsize>,
        queues_seen: Arc<Mutex<Vec<u16>>>,
    }

    fn harness() -> Harness {
        let fake = FakeDevice::new();
        let activations = fake.activations.clone();
        let queues_seen = fake.queues_seen.clone();
        let ctl = Arc::new(Controller::default());
        let dev = VirtioPciDevice::new(Box::new(fake), mem(), ctl.clone(), BAR0).unwrap();
        Harness {
            dev,
            ctl,
            activations,
            queues_seen,
        }
    }

    impl Harness {
        fn cfg32(&mut self, off: usize) -> u32 {
            let mut b = [0u8; 4];
            self.dev.config_read(off as u64, &mut b);
            u32::from_le_bytes(b)
        }
        fn cfg_write(&mut self, off: usize, data: &[u8]) -> Vec<BarMove> {
            self.dev.config_write(off as u64, data)
        }
        fn rd(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.read(off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn wr(&mut self, off: u64, len: usize, v: u64) {
            self.dev.write(off, &v.to_le_bytes()[..len]);
        }
        /// The virtio capabilities as (cfg_type, bar, offset, length, extra dword).
        fn virtio_caps(&mut self) -> Vec<(u8, u8, u32, u32, u32)> {
            let mut caps = Vec::new();
            let mut off = self.cfg32(reg::CAPABILITIES) as u8 as usize;
            while off != 0 {
                let head = self.cfg32(off);
                if head as u8 == cap_id::VENDOR_SPECIFIC {
                    let w1 = self.cfg32(off + 4);
                    let extra = if (head >> 16) as u8 >= 20 {
                        self.cfg32(off + 16)
                    } else {
                        0
                    };
                    caps.push((
                        (head >> 24) as u8,
                        w1 as u8,
                        self.cfg32(off + 8),
                        self.cfg32(off + 12),
                        extra,
                    ));
                }
                off = (head >> 8) as u8 as usize;
            }
            caps
        }
        fn msix_cap(&mut self) -> usize {
            let mut off = self.cfg32(reg::CAPABILITIES) as u8 as usize;
            while off != 0 {
                if self.cfg32(off) as u8 == cap_id::MSIX {
                    return off;
                }
                off = (self.cfg32(off) >> 8) as u8 as usize;
            }
            panic!("no MSI-X capability");
        }
        fn program_vector(&mut self, v: u64, data: u32) {
            let e = MSIX_TABLE_OFFSET + 16 * v;
            self.wr(e, 4, 0xfee0_0000);
            self.wr(e + 4, 4, 0);
            self.wr(e + 8, 4, u64::from(data));
            self.wr(e + 12, 4, 0);
        }
        fn status(&mut self) -> u8 {
            self.rd(0x14, 1) as u8
        }
    }

    #[test]
    fn identity_and_capabilities() {
        let mut h = harness();
        assert_eq!(h.cfg32(0), 0x1044_1af4, "rng is type 4");
        assert_eq!(h.cfg32(8), 0xff00_0001, "class ff, revision 1");
        assert_eq!(h.cfg32(0x2c), 0x1100_1af4);
        assert_eq!(h.cfg32(0x10), BAR0 as u32 | 0x4);
        assert_eq!(h.cfg32(0x14), (BAR0 >> 32) as u32);
        assert_ne!(h.cfg32(4) >> 16 & 0x10, 0, "capability list");
        let caps = h.virtio_caps();
        assert_eq!(
            caps,
            vec![
                (cap_type::COMMON, 0, 0, 0x38, 0),
                (cap_type::ISR, 0, 0x1000, 1, 0),
                (cap_type::DEVICE, 0, 0x2000, 0x1000, 0),
                (cap_type::NOTIFY, 0, 0x3000, 0x1000, NOTIFY_OFF_MULTIPLIER),
                (cap_type::PCI_CFG, 0, 0, 0, 0),
            ]
        );
        let m = h.msix_cap();
        assert_eq!(h.cfg32(m) >> 16, 2, "table size 3 (queues + 1), disabled");
        assert_eq!(h.cfg32(m + 4), 0x4000, "table in BAR0 at 0x4000");
        assert_eq!(h.cfg32(m + 8), 0x6000);
        assert_eq!(h.dev.num_msix_vectors(), 3);
        assert_eq!(h.dev.notify_address(1), Some(BAR0 + 0x3004));
        assert_eq!(h.dev.notify_address(2), None);
        assert_eq!(h.dev.bars()[0].spec.size, BAR0_SIZE);
    }

    #[test]
    fn class_codes() {
        assert_eq!(class_code(device_type::BLOCK), (0x01, 0x80, 0));
        assert_eq!(class_code(device_type::NET), (0x02, 0, 0));
        assert_eq!(class_code(device_type::VSOCK), (0xff, 0, 0));
    }

    #[test]
    fn bar0_sizing_and_move() {
        let mut h = harness();
        h.cfg_write(reg::COMMAND, &[0, 0]);
        h.cfg_write(0x10, &u32::MAX.to_le_bytes());
        h.cfg_write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(h.cfg32(0x10), !(BAR0_SIZE as u32 - 1) | 0x4);
        assert_eq!(h.cfg32(0x14), u32::MAX);
        h.cfg_write(0x10, &0xe000_0000u32.to_le_bytes());
        h.cfg_write(0x14, &[0; 4]);
        let moves = h.cfg_write(reg::COMMAND, &[2, 0]);
        assert_eq!(
            moves,
            vec![BarMove {
                bar: 0,
                old_base: BAR0,
                new_base: 0xe000_0000,
                len: BAR0_SIZE
            }]
        );
        assert_eq!(h.dev.bar0(), 0xe000_0000);
        assert_eq!(h.dev.notify_address(0), Some(0xe000_3000));
    }

    /// The Linux virtio_pci_modern probe and virtio_dev_probe, register by register.
    #[test]
    fn linux_driver_sequence() {
        let mut h = harness();
        // pci_enable_device + bus mastering, then MSI-X: mask the function, program, enable.
        h.cfg_write(reg::COMMAND, &(0x6u16).to_le_bytes());
        let m = h.msix_cap();
        h.cfg_write(m + 2, &0xc002u16.to_le_bytes());
        for v in 0..3 {
            h.program_vector(v, 0x30 + v as u32);
        }
        h.cfg_write(m + 2, &0x8002u16.to_le_bytes());
        assert_eq!(h.cfg32(m) >> 16, 0x8002);
        assert_eq!(
            h.ctl.updates.lock().unwrap().len(),
            3,
            "three vectors routed"
        );

        // Reset, ACKNOWLEDGE, DRIVER.
        h.wr(0x14, 1, 0);
        assert_eq!(h.status(), 0);
        h.wr(0x14, 1, u64::from(status::ACKNOWLEDGE));
        h.wr(0x14, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        // Features, both halves.
        h.wr(0x00, 4, 0);
        assert_eq!(h.rd(0x04, 4), (features::COMMON | 1 << 5) & 0xffff_ffff);
        h.wr(0x00, 4, 1);
        assert_eq!(h.rd(0x00, 4), 1);
        assert_eq!(h.rd(0x04, 4), 1, "VERSION_1");
        h.wr(0x08, 4, 0);
        h.wr(0x0c, 4, features::RING_EVENT_IDX | 1 << 5);
        h.wr(0x08, 4, 1);
        h.wr(0x0c, 4, 1);
        assert_eq!(h.rd(0x0c, 4), 1);
        h.wr(
            0x14,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        assert_ne!(h.status() & status::FEATURES_OK, 0);
        // Config vector, read back.
        h.wr(0x10, 2, 0);
        assert_eq!(h.rd(0x10, 2), 0);
        assert_eq!(h.rd(0x12, 2), 2, "num_queues");
        // Queues.
        for q in 0..2u64 {
            h.wr(0x16, 2, q);
            let max = h.rd(0x18, 2);
            assert_eq!(max, [16, 8][q as usize]);
            assert_eq!(h.rd(0x1c, 2), 0, "not enabled yet");
            h.wr(0x18, 2, 8);
            let base = 0x4000 + q * 0x4000;
            // vp_iowrite64_twopart: low then high dword.
            h.wr(0x20, 4, base);
            h.wr(0x24, 4, 0);
            h.wr(0x28, 4, base + 0x1000);
            h.wr(0x2c, 4, 0);
            h.wr(0x30, 8, base + 0x2000);
            h.wr(0x1a, 2, q + 1);
            assert_eq!(h.rd(0x1a, 2), q + 1);
            assert_eq!(h.rd(0x1e, 2), q, "queue_notify_off");
            assert_eq!(h.rd(0x18, 2), 8);
            assert_eq!(h.rd(0x20, 8), base);
            assert_eq!(h.rd(0x28, 4), base + 0x1000);
            assert_eq!(h.rd(0x30, 8), base + 0x2000);
        }
        for q in 0..2u64 {
            h.wr(0x16, 2, q);
            h.wr(0x1c, 2, 1);
            assert_eq!(h.rd(0x1c, 2), 1);
        }
        h.wr(
            0x14,
            1,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
        );
        assert_eq!(h.activations.load(Ordering::SeqCst), 1);
        assert_eq!(*h.queues_seen.lock().unwrap(), vec![0, 1]);
        assert!(h.dev.common().is_active());

        // A notification that missed the ioeventfd reaches the queue's event.
        h.wr(NOTIFY_OFFSET + 4, 2, 1);
        assert_eq!(h.dev.queue_kicks()[1].read().unwrap(), 1);
        h.wr(NOTIFY_OFFSET + 2, 2, 0);
        h.wr(NOTIFY_OFFSET + 0x100, 2, 0);

        // Interrupts go to the vectors the driver chose, and set the ISR.
        let irq = h.dev.interrupt().clone();
        irq.trigger(InterruptCause::Queue(1)).unwrap();
        irq.trigger(InterruptCause::Queue(0)).unwrap();
        irq.trigger(InterruptCause::Config).unwrap();
        assert_eq!(h.ctl.take_triggers(), vec![2, 1, 0]);
        assert_eq!(h.rd(ISR_OFFSET, 1), 3);
        assert_eq!(h.rd(ISR_OFFSET, 1), 0, "read clears");

        // Reset: the device stops, vectors go back to NO_VECTOR.
        h.wr(0x14, 1, 0);
        assert_eq!(h.status(), 0);
        assert!(!h.dev.common().is_active());
        assert_eq!(h.rd(0x10, 2), u64::from(NO_VECTOR));
        h.wr(0x16, 2, 0);
        assert_eq!(h.rd(0x1a, 2), u64::from(NO_VECTOR));
        assert_eq!(h.rd(0x18, 2), 16, "size back to the maximum");
        irq.trigger(InterruptCause::Queue(0)).unwrap();
        assert!(h.ctl.take_triggers().is_empty());
    }

    #[test]
    fn invalid_vectors_read_back_no_vector_and_drop() {
        let mut h = harness();
        let m = h.msix_cap();
        h.program_vector(0, 0x30);
        h.cfg_write(m + 2, &0x8000u16.to_le_bytes());
        h.wr(0x10, 2, 3);
        assert_eq!(h.rd(0x10, 2), u64::from(NO_VECTOR));
        h.wr(0x16, 2, 7);
        h.wr(0x1a, 2, 0);
        assert_eq!(h.rd(0x1a, 2), u64::from(NO_VECTOR), "no such queue");
        assert_eq!(h.rd(0x18, 2), 0, "no such queue");
        let irq = h.dev.interrupt().clone();
        irq.trigger(InterruptCause::Config).unwrap();
        irq.trigger(InterruptCause::Queue(9)).unwrap();
        assert!(h.ctl.take_triggers().is_empty());
        assert_eq!(h.rd(ISR_OFFSET, 1), 3, "the ISR still records the causes");
    }

    #[test]
    fn masked_vector_pends_until_unmasked() {
        let mut h = harness();
        let m = h.msix_cap();
        h.cfg_write(m + 2, &0x8000u16.to_le_bytes());
        h.wr(0x16, 2, 0);
        h.wr(0x1a, 2, 1);
        // Vector 1 is still masked (reset state): the trigger pends.
        h.dev.interrupt().trigger(InterruptCause::Queue(0)).unwrap();
        assert!(h.ctl.take_triggers().is_empty());
        assert_eq!(h.rd(MSIX_PBA_OFFSET, 8), 0b10);
        // Reading the table through the BAR shows the mask bit.
        assert_eq!(h.rd(MSIX_TABLE_OFFSET + 16 + 12, 4), 1);
        h.program_vector(1, 0x31);
        assert_eq!(h.ctl.take_triggers(), vec![1]);
        assert_eq!(h.rd(MSIX_PBA_OFFSET, 8), 0);
        assert_eq!(h.rd(MSIX_TABLE_OFFSET + 16 + 8, 4), 0x31);
    }

    #[test]
    fn device_config_region() {
        let mut h = harness();
        assert_eq!(h.rd(DEVICE_CFG_OFFSET, 4), 0xddcc_bbaa);
        assert_eq!(h.rd(DEVICE_CFG_OFFSET + 1, 2), 0xccbb);
        let gen = h.rd(0x15, 1);
        h.wr(DEVICE_CFG_OFFSET + 2, 1, 0x11);
        assert_eq!(h.rd(DEVICE_CFG_OFFSET, 4), 0xdd11_bbaa);
        assert_eq!(h.rd(0x15, 1), gen + 1, "config generation");
    }

    #[test]
    fn pci_cfg_window_reaches_bar0() {
        let mut h = harness();
        let cap = h.dev.pci_cfg_cap;
        let select = |h: &mut Harness, off: u32, len: u32| {
            h.cfg_write(cap + 8, &off.to_le_bytes());
            h.cfg_write(cap + 12, &len.to_le_bytes());
        };
        // Device config through the window.
        select(&mut h, DEVICE_CFG_OFFSET as u32, 4);
        assert_eq!(h.cfg32(cap + 16), 0xddcc_bbaa);
        // A status write through the window.
        select(&mut h, 0x14, 1);
        h.cfg_write(cap + 16, &[status::ACKNOWLEDGE]);
        assert_eq!(h.status(), status::ACKNOWLEDGE);
        assert_eq!(h.cfg32(cap + 16) as u8, status::ACKNOWLEDGE);
        // ISR read through the window clears it.
        h.dev.interrupt().trigger(InterruptCause::Config).unwrap();
        select(&mut h, ISR_OFFSET as u32, 1);
        assert_eq!(h.cfg32(cap + 16), 2);
        assert_eq!(h.cfg32(cap + 16), 0);
        // Invalid selections (bad length, misaligned, past the BAR, other BAR) do nothing.
        for (off, len) in [(0x14u32, 3u32), (0x15, 2), (BAR0_SIZE as u32, 4), (0x14, 0)] {
            select(&mut h, off, len);
            h.cfg_write(cap + 16, &[0; 4]);
            assert_eq!(h.status(), status::ACKNOWLEDGE);
        }
        select(&mut h, 0x14, 1);
        h.cfg_write(cap + 4, &[2]);
        h.cfg_write(cap + 16, &[0]);
        assert_eq!(h.status(), status::ACKNOWLEDGE);
        assert_eq!(
            h.cfg32(cap) >> 24,
            u32::from(cap_type::PCI_CFG),
            "type is read-only"
        );
    }

    #[test]
    fn odd_accesses_never_panic() {
        let mut h = harness();
        let offsets = [
            0u64, 1, 3, 0x13, 0x15, 0x1d, 0x22, 0x36, 0x37, 0x38, 0xfff, 0x1000, 0x1001, 0x2fff,
            0x3001, 0x3ffe, 0x4000, 0x400d, 0x402f, 0x5fff, 0x6000, 0x6007, 0x7ff8,
        ];
        for off in offsets {
            for len in [1usize, 2, 3, 4, 8] {
                if off + len as u64 > BAR0_SIZE {
                    continue;
                }
                let mut d = vec![0u8; len];
                h.dev.read(off, &mut d);
                h.dev.write(off, &vec![0xff; len]);
                h.dev.write(off, &d);
                h.dev.bar_read(1, off, &mut d);
                assert!(d.iter().all(|&b| b == 0xff), "BAR 1 does not exist");
                h.dev.bar_write(3, off, &d);
            }
        }
        h.dev.read(0, &mut []);
        h.dev.read(ISR_OFFSET, &mut []);
        h.dev.write(0, &[]);
        // Every config offset, every width, all-ones and zeros (the pci_cfg window included).
        for off in (0u64..0x104).chain([0xfff, u64::MAX - 1]) {
            for len in [1usize, 2, 4] {
                let mut d = vec![0u8; len];
                h.dev.config_read(off, &mut d);
                h.dev.config_write(off, &vec![0xff; len]);
                h.dev.config_read(off, &mut d);
                h.dev.config_write(off, &vec![0; len]);
            }
        }
    }

    /// The probe of `linux_driver_sequence`, condensed: MSI-X on, vectors 0..3 programmed,
    /// features, both queues with vectors 1 and 2, DRIVER_OK.
    fn probe(h: &mut Harness) {
        h.cfg_write(reg::COMMAND, &(0x6u16).to_le_bytes());
        let m = h.msix_cap();
        for v in 0..3 {
            h.program_vector(v, 0x30 + v as u32);
        }
        h.cfg_write(m + 2, &0x8002u16.to_le_bytes());
        h.wr(0x14, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        h.wr(0x08, 4, 1);
        h.wr(0x0c, 4, 1);
        h.wr(
            0x14,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        h.wr(0x10, 2, 0);
        for q in 0..2u64 {
            h.wr(0x16, 2, q);
            h.wr(0x18, 2, 8);
            let base = 0x4000 + q * 0x4000;
            h.wr(0x20, 8, base);
            h.wr(0x28, 8, base + 0x1000);
            h.wr(0x30, 8, base + 0x2000);
            h.wr(0x1a, 2, q + 1);
            h.wr(0x1c, 2, 1);
        }
        h.wr(
            0x14,
            1,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
        );
    }

    #[test]
    fn state_round_trip_restores_registers_vectors_and_routes() {
        let mut h = harness();
        probe(&mut h);
        assert!(h.dev.common().is_active());
        h.wr(0x16, 2, 1);
        h.dev.quiesce().unwrap();
        let state = h.dev.save_state().unwrap();
        assert_eq!(
            state
                .common
                .queues
                .iter()
                .map(|q| q.vector)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        let json = serde_json::to_string(&state).unwrap();
        let state: VirtioPciState = serde_json::from_str(&json).unwrap();

        let mut fresh = harness();
        fresh.dev.restore_state(&state).unwrap();
        assert!(fresh.dev.common().is_active());
        assert_eq!(fresh.activations.load(Ordering::SeqCst), 1);
        assert_eq!(*fresh.queues_seen.lock().unwrap(), vec![0, 1]);
        // The three vectors were routed again, and each ready queue's raised once.
        let mut routed: Vec<u16> = fresh
            .ctl
            .updates
            .lock()
            .unwrap()
            .iter()
            .filter(|u| u.1.is_some())
            .map(|u| u.0)
            .collect();
        routed.sort();
        assert_eq!(routed, vec![0, 1, 2]);
        assert_eq!(fresh.ctl.take_triggers(), vec![1, 2]);
        // The driver reads back what it wrote.
        for off in [
            0x00u64, 0x08, 0x10, 0x14, 0x16, 0x18, 0x1a, 0x1c, 0x20, 0x28, 0x30,
        ] {
            assert_eq!(fresh.rd(off, 2), h.rd(off, 2), "common config {off:#x}");
        }
        for off in (0..0x100).step_by(4) {
            assert_eq!(fresh.cfg32(off), h.cfg32(off), "config space {off:#x}");
        }
        for off in (0..48).step_by(4) {
            assert_eq!(
                fresh.rd(MSIX_TABLE_OFFSET + off, 4),
                h.rd(MSIX_TABLE_OFFSET + off, 4)
            );
        }
        // Interrupts go out on the restored vectors.
        let irq = fresh.dev.interrupt().clone();
        irq.trigger(InterruptCause::Queue(1)).unwrap();
        irq.trigger(InterruptCause::Config).unwrap();
        assert_eq!(fresh.ctl.take_triggers(), vec![2, 0]);
    }

    #[test]
    fn mismatched_pci_states_change_nothing() {
        let mut h = harness();
        probe(&mut h);
        h.dev.quiesce().unwrap();
        let state = h.dev.save_state().unwrap();
        let mut fresh = harness();
        let before = fresh.dev.save_state().unwrap();
        let mut bad_vector = state.clone();
        bad_vector.common.queues[0].vector = 7;
        assert!(matches!(
            fresh.dev.restore_state(&bad_vector),
            Err(StateError::Pci { .. })
        ));
        let mut bad_msix = state.clone();
        bad_msix.msix.table.pop();
        assert!(matches!(
            fresh.dev.restore_state(&bad_msix),
            Err(StateError::Pci { .. })
        ));
        // Fails in the common part, after the PCI parts were applied: rolled back.
        let mut bad_type = state.clone();
        bad_type.common.device_type = 1;
        assert!(matches!(
            fresh.dev.restore_state(&bad_type),
            Err(StateError::DeviceType { .. })
        ));
        assert_eq!(fresh.dev.save_state().unwrap(), before);
        assert!(!fresh.dev.common().is_active());
    }
}
