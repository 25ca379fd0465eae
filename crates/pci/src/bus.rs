//! PCI bus 0: the [`PciDevice`] trait, the host bridge in slot 0, and configuration access
//! through the legacy ports 0xcf8/0xcfc ([`PciConfigIo`]) and through ECAM
//! ([`PciConfigMmio`]), both `vessel_devices::BusDevice`s.
//!
//! Only bus 0 exists, with function 0 of each slot and the other functions of a
//! multi-function slot ([`PciBus::add_function`]); everything else reads all-ones, like an
//! empty slot on real hardware.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vessel_devices::BusDevice;

use crate::config::{BarInfo, BarMove, ConfigSpace, PciIds, EXTENDED_CONFIG_SPACE_SIZE};

/// Slots on bus 0 (slot 0 is the host bridge).
pub const NUM_SLOTS: usize = 32;
/// First port of the legacy configuration mechanism (address at 0xcf8, data at 0xcfc).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Number of ports [`PciConfigIo`] covers.
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// Size of the ECAM window of one bus (we have only bus 0).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Host bridge identity: Intel vendor id, host bridge class (0x06/0x00).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// The i440FX host bridge (82441FX PMC) that SeaBIOS and OVMF recognise as QEMU's `pc`
/// machine.
pub const I440FX_DEVICE_ID: u16 = 0x1237;
/// The i440FX's PAM registers (shadow RAM control of 0xc0000..0x100000): 0x59..0x60.
const I440FX_PAM: std::ops::Range<u64> = 0x59..0x60;

/// A function on the PCI bus.
pub trait PciDevice: Send {
    /// Reads its configuration space at `offset` (0..4096; any width).
    fn config_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space; returns the BARs the write moved.
    fn config_write(&mut self, offset: u64, data: &[u8]) -> Vec<BarMove>;
    /// Its BARs and where they are now (by default none: a function with registers only).
    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }
    /// Reads BAR `bar` at `offset` (relative to the BAR's base).
    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    /// Writes BAR `bar` at `offset`.
    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

/// The guest moved BAR `bar` of the function in `slot` from `old_base` to `new_base`: the VMM
/// moves the MMIO bus range (and the ioeventfds) of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarReprogram {
    pub slot: u8,
    pub bar: u8,
    pub old_base: u64,
    pub new_base: u64,
    pub len: u64,
}

/// Why a device could not be put on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PciBusError {
    #[error("Could not find an available device slot on the PCI bus.")]
    Full,
    #[error("PCI slot {0} is taken or does not exist")]
    SlotInUse(u8),
    #[error("PCI function {slot:02x}.{func} is taken, does not exist, or its slot is empty")]
    FunctionInUse { slot: u8, func: u8 },
}

/// The host bridge: identity registers only.
pub struct HostBridge {
    config: ConfigSpace,
    /// The i440FX's PAM registers; `None` for Vessel's own bridge.
    pam: Option<[u8; 7]>,
}

impl HostBridge {
    /// Vessel's own host bridge (8086:0d57), for guests booted without firmware.
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(PciIds {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class: 0x06,
                subclass: 0x00,
                ..PciIds::default()
            }),
            pam: None,
        }
    }

    /// An i440FX (8086:1237, revision 2), the identity SeaBIOS and OVMF look for. Its PAM
    /// registers read back what the firmware writes; guest memory below 1 MiB is always RAM
    /// whatever they say (the firmware copies itself there, which RAM allows).
    pub fn i440fx() -> Self {
        HostBridge {
            config: ConfigSpace::new(PciIds {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: I440FX_DEVICE_ID,
                revision: 2,
                class: 0x06,
                subclass: 0x00,
                ..PciIds::default()
            }),
            pam: Some([0; 7]),
        }
    }

    /// The PAM registers `offset..offset + len` covers, as (first index in the access,
    /// first PAM register, count); `None` for Vessel's bridge or an access beside them.
    fn pam_window(&self, offset: u64, len: usize) -> Option<(usize, usize, usize)> {
        self.pam.as_ref()?;
        let end = offset.checked_add(len as u64)?;
        let start = offset.max(I440FX_PAM.start);
        let stop = end.min(I440FX_PAM.end);
        (start < stop).then(|| {
            (
                (start - offset) as usize,
                (start - I440FX_PAM.start) as usize,
                (stop - start) as usize,
            )
        })
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
        if let (Some((at, reg, n)), Some(pam)) = (self.pam_window(offset, data.len()), &self.pam) {
            data[at..at + n].copy_from_slice(&pam[reg..reg + n]);
        }
    }
    fn config_write(&mut self, offset: u64, data: &[u8]) -> Vec<BarMove> {
        if let (Some((at, reg, n)), Some(pam)) =
            (self.pam_window(offset, data.len()), &mut self.pam)
        {
            pam[reg..reg + n].copy_from_slice(&data[at..at + n]);
        }
        self.config.write(offset, data)
    }
}

type ReprogramHandler = Box<dyn Fn(&BarReprogram) + Send>;
type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: up to 31 functions behind the host bridge.
pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    /// Functions 1..7 of multi-function slots: (slot, function, device).
    functions: Vec<(u8, u8, SharedDevice)>,
    on_reprogram: Option<ReprogramHandler>,
}

/// Whether `len` bytes at `reg` stay inside one function's 4 KiB.
fn fits_function(reg: u64, len: usize) -> bool {
    reg.checked_add(len as u64)
        .is_some_and(|end| end <= EXTENDED_CONFIG_SPACE_SIZE as u64)
}

fn lock(dev: &Mutex<dyn PciDevice>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PciBus {
    /// A bus with Vessel's host bridge in slot 0.
    pub fn new() -> Self {
        Self::with_host_bridge(HostBridge::new())
    }

    /// A bus with `bridge` in slot 0.
    pub fn with_host_bridge(bridge: HostBridge) -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; NUM_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        PciBus {
            slots,
            functions: Vec::new(),
            on_reprogram: None,
        }
    }

    /// Puts `dev` in the first free slot and returns the slot.
    pub fn add_device(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciBusError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciBusError::Full)?;
        self.slots[slot] = Some(dev);
        Ok(slot as u8)
    }

    /// Puts `dev` in `slot` (1..=31).
    pub fn add_device_at(
        &mut self,
        slot: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciBusError> {
        match self.slots.get_mut(usize::from(slot)) {
            Some(s @ None) => {
                *s = Some(dev);
                Ok(())
            }
            _ => Err(PciBusError::SlotInUse(slot)),
        }
    }

    /// Adds function `func` (1..=7) to `slot`, whose function 0 (added first, with its
    /// multi-function bit set) is already there.
    pub fn add_function(
        &mut self,
        slot: u8,
        func: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciBusError> {
        let taken = self
            .functions
            .iter()
            .any(|(s, f, _)| (*s, *f) == (slot, func));
        if !(1..8).contains(&func) || self.device(slot).is_none() || taken {
            return Err(PciBusError::FunctionInUse { slot, func });
        }
        self.functions.push((slot, func, dev));
        Ok(())
    }

    /// Takes the function out of `slot` (1..=31; the host bridge stays), with the slot's
    /// other functions: the slot reads all-ones from now on.
    pub fn remove_device(&mut self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        if slot == 0 {
            return None;
        }
        self.functions.retain(|(s, _, _)| *s != slot);
        self.slots.get_mut(usize::from(slot))?.take()
    }

    pub fn device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots.get(usize::from(slot)).cloned().flatten()
    }

    /// Calls `f` for every BAR the guest moves (after the config write that moved it, with
    /// this bus locked but no device locked: `f` must not access the PCI bus).
    pub fn set_reprogram_handler(&mut self, f: impl Fn(&BarReprogram) + Send + 'static) {
        self.on_reprogram = Some(Box::new(f));
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        match (bus, func) {
            (0, 0) => self.slots.get(usize::from(dev))?.as_ref(),
            (0, _) => self
                .functions
                .iter()
                .find(|(s, f, _)| (*s, *f) == (dev, func))
                .map(|(_, _, d)| d),
            _ => None,
        }
    }

    /// Reads the configuration space of `bus:dev.func` at `reg`; all-ones if there is no
    /// such function or the access runs past its 4 KiB.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: u64, data: &mut [u8]) {
        let fits = fits_function(reg, data.len());
        match self.function(bus, dev, func) {
            Some(d) if fits => lock(d).config_read(reg, data),
            _ => data.fill(0xff),
        }
    }

    /// Writes the configuration space of `bus:dev.func`; returns (and reports to the handler)
    /// the BARs the write moved.
    pub fn config_write(
        &self,
        bus: u8,
        dev: u8,
        func: u8,
        reg: u64,
        data: &[u8],
    ) -> Vec<BarReprogram> {
        let fits = fits_function(reg, data.len());
        let Some(d) = self.function(bus, dev, func).filter(|_| fits) else {
            return Vec::new();
        };
        let moves = lock(d).config_write(reg, data);
        let reprograms: Vec<_> = moves
            .into_iter()
            .map(|m| BarReprogram {
                slot: dev,
                bar: m.bar,
                old_base: m.old_base,
                new_base: m.new_base,
                len: m.len,
            })
            .collect();
        if let Some(f) = &self.on_reprogram {
            for r in &reprograms {
                f(r);
            }
        }
        reprograms
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

fn lock_bus(bus: &Mutex<PciBus>) -> MutexGuard<'_, PciBus> {
    bus.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Configuration mechanism #1: the address register at port 0xcf8 (32-bit accesses only) and
/// the data window at 0xcfc-0xcff (any width). Insert it on the port bus at
/// [`PCI_CONFIG_IO_PORT`] with length [`PCI_CONFIG_IO_LEN`].
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
}

const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    /// The function and register the address register selects, plus `offset` in the data
    /// window; `None` when configuration cycles are disabled.
    fn target(&self, offset: u64) -> Option<(u8, u8, u8, u64)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        // Bits 27:24 extend the register number past 0xff (AMD's extension, which Linux's
        // PCI_CONF1_EXT_ADDRESS uses).
        let reg = u64::from((a >> 16) & 0xf00 | a & 0xfc) + offset;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            reg,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if offset == 0 && len == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if offset >= 4 && offset + len <= 8 {
            match self.target(offset - 4) {
                Some((b, d, f, reg)) => lock_bus(&self.bus).config_read(b, d, f, reg, data),
                None => data.fill(0xff),
            }
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if offset == 0 {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                // Bits 1:0 are reserved and read back zero.
                self.address = u32::from_le_bytes(bytes) & !0x3;
            }
        } else if offset >= 4 && offset + len <= 8 {
            if let Some((b, d, f, reg)) = self.target(offset - 4) {
                lock_bus(&self.bus).config_write(b, d, f, reg, data);
            }
        }
    }
}

/// Enhanced configuration access (ECAM): one 1 MiB window for bus 0 where function
/// `dev.func` has its 4 KiB at `dev << 15 | func << 12`. Insert it on the MMIO bus at the base
/// the ACPI MCFG table gives, with length [`ECAM_BUS_SIZE`].
pub struct PciConfigMmio {
    bus: Arc<Mutex<PciBus>>,
}

impl PciConfigMmio {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigMmio { bus }
    }

    fn decode(offset: u64) -> (u8, u8, u8, u64) {
        (
            ((offset >> 20) & 0xff) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            offset & 0xfff,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = Self::decode(offset);
        lock_bus(&self.bus).config_read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = Self::decode(offset);
        lock_bus(&self.bus).config_write(b, d, f, reg, data);
    }
}

/// Serves one BAR of a [`PciDevice`] on the MMIO bus, for devices that do not implement
/// `BusDevice` themselves. Insert it at the BAR's base with the BAR's size.
pub struct PciBarRegion {
    dev: Arc<Mutex<dyn PciDevice>>,
    bar: u8,
}

impl PciBarRegion {
    pub fn new(dev: Arc<Mutex<dyn PciDevice>>, bar: u8) -> Self {
        PciBarRegion { dev, bar }
    }
}

impl BusDevice for PciBarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, BarSpec};

    /// A function with one 64-bit BAR whose bytes are plain memory.
    struct TestDevice {
        config: ConfigSpace,
        mem: Vec<u8>,
    }

    impl TestDevice {
        fn new(base: u64) -> Self {
            let mut config = ConfigSpace::new(PciIds {
                vendor_id: 0x1234,
                device_id: 0x5678,
                class: 0xff,
                ..PciIds::default()
            });
            config
                .add_bar(
                    0,
                    BarSpec {
                        size: 0x1000,
                        kind: BarKind::Memory64,
                        prefetchable: false,
                    },
                    base,
                )
                .unwrap();
            TestDevice {
                config,
                mem: vec![0; 0x1000],
            }
        }
    }

    impl PciDevice for TestDevice {
        fn config_read(&mut self, offset: u64, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: u64, data: &[u8]) -> Vec<BarMove> {
            self.config.write(offset, data)
        }
        fn bars(&self) -> Vec<BarInfo> {
            self.config.bars()
        }
        fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.mem[o..o + data.len()]);
        }
        fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.mem[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn setup() -> (Arc<Mutex<PciBus>>, PciConfigIo, PciConfigMmio) {
        let mut bus = PciBus::new();
        let dev = Arc::new(Mutex::new(TestDevice::new(0xe000_0000)));
        assert_eq!(bus.add_device(dev).unwrap(), 1);
        let bus = Arc::new(Mutex::new(bus));
        let io = PciConfigIo::new(bus.clone());
        let mmio = PciConfigMmio::new(bus.clone());
        (bus, io, mmio)
    }

    fn cf8(dev: u8, func: u8, reg: u8) -> u32 {
        CONFIG_ENABLE | u32::from(dev) << 11 | u32::from(func) << 8 | u32::from(reg)
    }

    fn io_read(io: &mut PciConfigIo, dev: u8, func: u8, reg: u8, len: usize) -> Vec<u8> {
        io.write(0, &cf8(dev, func, reg & 0xfc).to_le_bytes());
        let mut d = vec![0u8; len];
        io.read(4 + u64::from(reg & 3), &mut d);
        d
    }

    fn ecam(dev: u8, func: u8, reg: u64) -> u64 {
        u64::from(dev) << 15 | u64::from(func) << 12 | reg
    }

    #[test]
    fn host_bridge_in_slot_0() {
        let (_, mut io, mut mmio) = setup();
        assert_eq!(io_read(&mut io, 0, 0, 0, 4), [0x86, 0x80, 0x57, 0x0d]);
        assert_eq!(io_read(&mut io, 0, 0, 0x8, 4), [0, 0, 0, 0x06]);
        let mut d = [0u8; 4];
        mmio.read(ecam(0, 0, 0), &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
    }

    #[test]
    fn an_i440fx_bridge_keeps_its_pam_registers_and_nothing_else_of_what_is_written() {
        let mut b = HostBridge::i440fx();
        let mut d = [0u8; 4];
        b.config_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1237_8086);
        // SeaBIOS writes PAM0..PAM6 as two dwords at 0x58 and 0x5c.
        b.config_write(0x58, &[0xaa, 0x30, 0x33, 0x33]);
        b.config_write(0x5c, &[0x33, 0x33, 0x33, 0x33]);
        b.config_read(0x58, &mut d);
        assert_eq!(d, [0, 0x30, 0x33, 0x33], "0x58 is not a PAM register");
        b.config_read(0x5c, &mut d);
        assert_eq!(d, [0x33; 4], "0x5c..=0x5f are PAM3..PAM6");
        b.config_write(0x60, &[0x44]);
        b.config_read(0x60, &mut d);
        assert_eq!(d[0], 0, "0x60 is not a PAM register");
        let mut one = [0u8; 1];
        b.config_read(0x59, &mut one);
        assert_eq!(one, [0x30]);
        // Vessel's own bridge has no PAM registers.
        let mut v = HostBridge::new();
        v.config_write(0x59, &[0x30]);
        v.config_read(0x59, &mut one);
        assert_eq!(one, [0]);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let (_, mut io, mut mmio) = setup();
        for (dev, func) in [(2u8, 0u8), (31, 0), (1, 1), (0, 7)] {
            assert_eq!(io_read(&mut io, dev, func, 0, 4), [0xff; 4]);
            let mut d = [0u8; 2];
            mmio.read(ecam(dev, func, 0), &mut d);
            assert_eq!(d, [0xff; 2]);
            mmio.write(ecam(dev, func, 4), &[0xff, 0xff]);
        }
        // Another bus number in the address register.
        io.write(0, &(cf8(1, 0, 0) | 1 << 16).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Configuration cycles disabled.
        io.write(0, &(cf8(1, 0, 0) & !CONFIG_ENABLE).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn address_register() {
        let (_, mut io, _) = setup();
        // Linux's type-1 probe: a byte write to 0xcfb must not disturb the address.
        io.write(0, &0x8000_0000u32.to_le_bytes());
        io.write(3, &[1]);
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        io.write(0, &0x8000_0803u32.to_le_bytes());
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0800, "low bits are reserved");
        // Narrow reads of the address register read all-ones.
        let mut b = [0u8; 2];
        io.read(0, &mut b);
        assert_eq!(b, [0xff; 2]);
    }

    #[test]
    fn cf8_and_ecam_agree() {
        let (_, mut io, mut mmio) = setup();
        for reg in 0u8..=0xff {
            for len in [1usize, 2, 4] {
                if usize::from(reg & 3) + len > 4 {
                    continue;
                }
                let a = io_read(&mut io, 1, 0, reg, len);
                let mut b = vec![0u8; len];
                mmio.read(ecam(1, 0, u64::from(reg)), &mut b);
                assert_eq!(a, b, "reg {reg:#x} len {len}");
            }
        }
        // A write through one is seen through the other.
        io.write(0, &cf8(1, 0, 0x3c).to_le_bytes());
        io.write(4, &[0x0b]);
        let mut b = [0u8; 1];
        mmio.read(ecam(1, 0, 0x3c), &mut b);
        assert_eq!(b, [0x0b]);
        mmio.write(ecam(1, 0, 0x0c), &[0x10]);
        assert_eq!(io_read(&mut io, 1, 0, 0x0c, 1), [0x10]);
        // Both reach the extended space (zero for a conventional function), cf8 through
        // bits 27:24 of the address.
        let mut d = [0x55u8; 4];
        mmio.read(ecam(1, 0, 0x100), &mut d);
        assert_eq!(d, [0; 4]);
        io.write(0, &(cf8(1, 0, 0x00) | 1 << 24).to_le_bytes());
        let mut d = [0x55u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0; 4], "register 0x100, not the ids at 0");
    }

    #[test]
    fn bar_reprogram_is_reported() {
        let (bus, mut io, mut mmio) = setup();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.lock()
            .unwrap()
            .set_reprogram_handler(move |r| s.lock().unwrap().push(*r));
        // Sizing through cf8 reports nothing.
        io.write(0, &cf8(1, 0, 0x10).to_le_bytes());
        io.write(4, &u32::MAX.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_f004);
        io.write(4, &0xe000_0000u32.to_le_bytes());
        assert!(seen.lock().unwrap().is_empty());
        // A move through ECAM is.
        mmio.write(ecam(1, 0, 0x10), &0xe010_0000u32.to_le_bytes());
        let expected = BarReprogram {
            slot: 1,
            bar: 0,
            old_base: 0xe000_0000,
            new_base: 0xe010_0000,
            len: 0x1000,
        };
        assert_eq!(*seen.lock().unwrap(), vec![expected]);
        let dev = bus.lock().unwrap().device(1).unwrap();
        assert_eq!(dev.lock().unwrap().bars()[0].base, 0xe010_0000);
        // Returned as well as reported.
        let r = bus
            .lock()
            .unwrap()
            .config_write(0, 1, 0, 0x10, &0xe000_0000u32.to_le_bytes());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].new_base, 0xe000_0000);
    }

    #[test]
    fn slots() {
        let mut bus = PciBus::new();
        let dev = || -> Arc<Mutex<dyn PciDevice>> { Arc::new(Mutex::new(HostBridge::new())) };
        assert_eq!(bus.add_device_at(0, dev()), Err(PciBusError::SlotInUse(0)));
        assert_eq!(
            bus.add_device_at(32, dev()),
            Err(PciBusError::SlotInUse(32))
        );
        bus.add_device_at(5, dev()).unwrap();
        assert_eq!(bus.add_device_at(5, dev()), Err(PciBusError::SlotInUse(5)));
        for expected in (1..32u8).filter(|&s| s != 5) {
            assert_eq!(bus.add_device(dev()), Ok(expected));
        }
        assert_eq!(bus.add_device(dev()), Err(PciBusError::Full));
    }

    #[test]
    fn bar_region_forwards() {
        let dev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(TestDevice::new(0)));
        let mut region = PciBarRegion::new(dev, 0);
        region.write(0x10, &[1, 2, 3]);
        let mut d = [0u8; 4];
        region.read(0xf, &mut d);
        assert_eq!(d, [0, 1, 2, 3]);
    }

    #[test]
    fn odd_accesses_never_panic() {
        let (_, mut io, mut mmio) = setup();
        for off in 0..8u64 {
            for len in [1usize, 2, 3, 4, 8] {
                if off + len as u64 > 8 {
                    continue;
                }
                io.write(0, &cf8(1, 0, 0xfc).to_le_bytes());
                let mut d = vec![0u8; len];
                io.read(off, &mut d);
                io.write(off, &d);
            }
        }
        for reg in [0u64, 1, 0xfff, 0xffe, 0xffd, 0x100] {
            for len in [1usize, 2, 4, 8] {
                let mut d = vec![0u8; len];
                mmio.read(ecam(1, 0, reg), &mut d);
                mmio.write(ecam(1, 0, reg), &d);
                if reg + len as u64 > 0x1000 {
                    assert!(d.iter().all(|&b| b == 0xff), "past the function's 4 KiB");
                }
            }
        }
        let mut d = [0u8; 4];
        mmio.read(ECAM_BUS_SIZE - 4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
