//! The type-0 configuration space of one PCI function: identity registers, command/status,
//! memory BARs with sizing semantics, the capability list, interrupt line/pin.
//!
//! Registers are kept as bytes with a per-byte mask of the bits the guest may write; BARs are
//! kept apart (their read-back value depends on the size), and the MSI-X message control word
//! is forwarded to the function's [`Msix`] when written. Every access is byte-wise, so any
//! width and any alignment work and none can panic.

use crate::msix::Msix;

/// Size of the conventional configuration space (the part a type-0 header lives in).
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of the configuration space of a function as ECAM exposes it.
pub const EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Register offsets in a type-0 header.
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    pub const PROG_IF: usize = 0x09;
    pub const SUBCLASS: usize = 0x0a;
    pub const CLASS: usize = 0x0b;
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    pub const LATENCY_TIMER: usize = 0x0d;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const ROM_BAR: usize = 0x30;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// Where the capability list starts.
    pub const FIRST_CAPABILITY: usize = 0x40;
}

/// Command register bits.
pub mod command {
    pub const IO_SPACE: u16 = 1 << 0;
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    pub const SERR: u16 = 1 << 8;
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Every bit a guest may change.
    pub const WRITABLE: u16 =
        IO_SPACE | MEMORY_SPACE | BUS_MASTER | PARITY_ERROR_RESPONSE | SERR | INTX_DISABLE;
}

/// Status register bit: the function has a capability list.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Capability ids.
pub mod cap_id {
    pub const VENDOR_SPECIFIC: u8 = 0x09;
    pub const MSIX: u8 = 0x11;
}

/// The identity of a function: what the read-only header registers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The address width of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Anywhere below 4 GiB; one BAR register.
    Memory32,
    /// Anywhere in the 64-bit space; takes two BAR registers (this one and the next).
    Memory64,
}

/// What a BAR looks like: its size (a power of two, at least 16 bytes), width and whether
/// reads have no side effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// A BAR as it is now: where the guest (or the VMM at creation) put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    pub index: u8,
    /// The address the device answers at (the last non-sizing address the guest programmed
    /// while memory decoding was on, or the address given at creation).
    pub base: u64,
    pub spec: BarSpec,
}

/// The guest moved a BAR of this function: the VMM must move the bus range (and any
/// ioeventfds inside it) from `old_base` to `new_base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub bar: u8,
    pub old_base: u64,
    pub new_base: u64,
    pub len: u64,
}

/// Why a function's configuration space could not be built (a VMM bug, never guest input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is already in use")]
    BarInUse(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    #[error("BAR base {base:#x} is not aligned to its size {size:#x}")]
    BarAlignment { base: u64, size: u64 },
    #[error("32-bit BAR at {base:#x} with size {size:#x} does not fit below 4 GiB")]
    BarAbove4G { base: u64, size: u64 },
    #[error("capability of {0} bytes does not fit in the configuration space")]
    CapabilitySpace(usize),
    #[error("an MSI-X capability was already added")]
    MsixTwice,
    #[error("a device register at {off:#x} of {len} bytes is outside 0x40..0x100 or overlaps a capability")]
    RegisterPlace { off: usize, len: usize },
}

/// A BAR's registers in a [`ConfigSpaceState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BarRegisterState {
    pub index: u8,
    /// The address the BAR registers hold.
    pub addr: u64,
    /// The address the device answers at.
    pub committed: u64,
    /// Whether the guest was sizing the BAR.
    pub sizing: bool,
}

/// What the guest wrote into a function's configuration space, for a snapshot: the header
/// and capability bytes, and the BAR registers. Identity registers, BAR sizes and the
/// capability layout are not part of it (they come from the function's construction).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSpaceState {
    /// The 256 header bytes.
    pub bytes: Vec<u8>,
    pub bars: Vec<BarRegisterState>,
}

/// Why a saved configuration space does not fit this function.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigStateError {
    #[error("the saved configuration space has {0} bytes instead of 256")]
    Length(usize),
    #[error("the saved configuration space has BARs {saved:?}, the function has {actual:?}")]
    Bars { saved: Vec<u8>, actual: Vec<u8> },
    #[error("saved BAR {0} address {1:#x} is not aligned to the BAR's size")]
    BarAlignment(u8, u64),
}

#[derive(Debug, Clone, Copy)]
struct BarState {
    spec: BarSpec,
    /// The address as the BAR registers hold it (may be mid-sizing or mid-update).
    addr: u64,
    /// The address the device answers at.
    committed: u64,
    /// The last write to one of the BAR's registers was all-ones: the guest is sizing it.
    sizing: bool,
}

impl BarState {
    fn mask(&self) -> u64 {
        !(self.spec.size - 1)
    }

    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.spec.kind == BarKind::Memory64 {
            f |= 0b100;
        }
        if self.spec.prefetchable {
            f |= 0b1000;
        }
        f
    }
}

#[derive(Debug, Clone, Copy)]
enum BarSlot {
    Unused,
    Bar(BarState),
    /// The upper half of the 64-bit BAR in the previous slot.
    Upper,
}

/// The configuration space of one PCI function (type-0 header).
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bits of each byte the guest may write (BARs excluded: see `bars`).
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS],
    /// Where the next capability goes.
    next_cap: usize,
    /// Offset of the byte pointing to the last capability's successor.
    last_link: usize,
    /// Offset of the MSI-X capability and the table it controls.
    msix: Option<(usize, Msix)>,
}

fn range_overlaps(a: usize, alen: usize, b: usize, blen: usize) -> bool {
    a < b + blen && b < a + alen
}

impl ConfigSpace {
    /// A header with `ids`, no BARs, no capabilities, no interrupt pin, decoding off.
    pub fn new(ids: PciIds) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [BarSlot::Unused; NUM_BARS],
            next_cap: reg::FIRST_CAPABILITY,
            last_link: reg::CAPABILITIES,
            msix: None,
        };
        c.set_u16(reg::VENDOR_ID, ids.vendor_id);
        c.set_u16(reg::DEVICE_ID, ids.device_id);
        c.bytes[reg::REVISION] = ids.revision;
        c.bytes[reg::PROG_IF] = ids.prog_if;
        c.bytes[reg::SUBCLASS] = ids.subclass;
        c.bytes[reg::CLASS] = ids.class;
        c.set_u16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        c.set_u16(reg::SUBSYSTEM_ID, ids.subsystem_id);
        c.set_writable_u16(reg::COMMAND, command::WRITABLE);
        c.writable[reg::CACHE_LINE_SIZE] = 0xff;
        c.writable[reg::LATENCY_TIMER] = 0xff;
        c.writable[reg::INTERRUPT_LINE] = 0xff;
        c
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_writable_u16(&mut self, off: usize, v: u16) {
        self.writable[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// The value of a 16-bit register (BAR registers excluded).
    pub fn read_u16(&self, off: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(off as u64, &mut b);
        u16::from_le_bytes(b)
    }

    /// The value of a 32-bit register.
    pub fn read_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(off as u64, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn command(&self) -> u16 {
        self.read_u16(reg::COMMAND)
    }

    fn memory_decode(&self) -> bool {
        self.command() & command::MEMORY_SPACE != 0
    }

    /// Sets the interrupt pin register (1 = INTA#..4 = INTD#, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[reg::INTERRUPT_PIN] = pin;
    }

    /// Marks the function as one of several in its slot (header type bit 7), so that a
    /// guest scanning the bus looks at functions 1..7 too.
    pub fn set_multifunction(&mut self) {
        self.bytes[reg::HEADER_TYPE] |= 0x80;
    }

    /// A device-specific register at `off` (past the standard header, before any
    /// capability): its value, and the bits of each byte the guest may change.
    pub fn define_register(
        &mut self,
        off: usize,
        value: &[u8],
        writable: &[u8],
    ) -> Result<(), ConfigError> {
        let end = off.checked_add(value.len());
        if off < reg::FIRST_CAPABILITY
            || value.len() != writable.len()
            || end.is_none_or(|e| e > CONFIG_SPACE_SIZE)
            || range_overlaps(
                off,
                value.len(),
                reg::FIRST_CAPABILITY,
                self.next_cap - reg::FIRST_CAPABILITY,
            )
        {
            return Err(ConfigError::RegisterPlace {
                off,
                len: value.len(),
            });
        }
        self.bytes[off..off + value.len()].copy_from_slice(value);
        self.writable[off..off + value.len()].copy_from_slice(writable);
        Ok(())
    }

    /// Places memory BAR `index` at `base` (the firmware's assignment) and turns memory
    /// decoding on, as firmware does for the functions it assigned.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec, base: u64) -> Result<(), ConfigError> {
        let wide = spec.kind == BarKind::Memory64;
        let free = |i: usize| matches!(self.bars.get(i), Some(BarSlot::Unused));
        if !free(index) || (wide && !free(index + 1)) {
            return Err(ConfigError::BarInUse(index));
        }
        if !spec.size.is_power_of_two() || spec.size < 16 {
            return Err(ConfigError::BarSize(spec.size));
        }
        if base & (spec.size - 1) != 0 {
            return Err(ConfigError::BarAlignment {
                base,
                size: spec.size,
            });
        }
        if !wide && base.checked_add(spec.size).is_none_or(|end| end > 1 << 32) {
            return Err(ConfigError::BarAbove4G {
                base,
                size: spec.size,
            });
        }
        self.bars[index] = BarSlot::Bar(BarState {
            spec,
            addr: base,
            committed: base,
            sizing: false,
        });
        if wide {
            self.bars[index + 1] = BarSlot::Upper;
        }
        let cmd = self.command() | command::MEMORY_SPACE;
        self.set_u16(reg::COMMAND, cmd);
        Ok(())
    }

    /// Every BAR in index order.
    pub fn bars(&self) -> Vec<BarInfo> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                BarSlot::Bar(b) => Some(BarInfo {
                    index: i as u8,
                    base: b.committed,
                    spec: b.spec,
                }),
                _ => None,
            })
            .collect()
    }

    /// The BAR with `index`, if it is one (not the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        match self.bars.get(index) {
            Some(BarSlot::Bar(b)) => Some(BarInfo {
                index: index as u8,
                base: b.committed,
                spec: b.spec,
            }),
            _ => None,
        }
    }

    /// Appends a capability with `id` and `body` (the bytes after the id and next pointer);
    /// `writable` gives, byte by byte, the bits of the body the guest may write (missing bytes
    /// are read-only). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let off = self.next_cap;
        let len = 2 + body.len();
        if off + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        for (w, m) in self.writable[off + 2..off + len].iter_mut().zip(writable) {
            *w = *m;
        }
        self.bytes[self.last_link] = off as u8;
        self.last_link = off + 1;
        self.next_cap = (off + len + 3) & !3;
        let status = self.read_u16(reg::STATUS) | STATUS_CAPABILITIES;
        self.set_u16(reg::STATUS, status);
        Ok(off)
    }

    /// Appends the MSI-X capability of `msix`; writes to its message control word reach it.
    pub fn add_msix(&mut self, msix: &Msix) -> Result<usize, ConfigError> {
        if self.msix.is_some() {
            return Err(ConfigError::MsixTwice);
        }
        let body = msix.capability_body();
        // Only the enable and function mask bits of message control are writable.
        let off = self.add_capability(cap_id::MSIX, &body, &[0x00, 0xc0])?;
        self.msix = Some((off, msix.clone()));
        Ok(off)
    }

    /// Offsets of every capability with `id`, walking the list as a driver does.
    pub fn find_capabilities(&self, id: u8) -> Vec<usize> {
        let mut found = Vec::new();
        let mut off = usize::from(self.bytes[reg::CAPABILITIES]);
        // A list longer than the space can hold is a loop.
        for _ in 0..CONFIG_SPACE_SIZE / 4 {
            if off < reg::FIRST_CAPABILITY || off + 2 > CONFIG_SPACE_SIZE {
                break;
            }
            if self.bytes[off] == id {
                found.push(off);
            }
            off = usize::from(self.bytes[off + 1]);
        }
        found
    }

    /// What the guest wrote, for a snapshot (see [`ConfigSpaceState`]).
    pub fn save_state(&self) -> ConfigSpaceState {
        let bars = self
            .bars
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                BarSlot::Bar(b) => Some(BarRegisterState {
                    index: i as u8,
                    addr: b.addr,
                    committed: b.committed,
                    sizing: b.sizing,
                }),
                _ => None,
            })
            .collect();
        ConfigSpaceState {
            bytes: self.bytes.to_vec(),
            bars,
        }
    }

    /// Puts back what [`ConfigSpace::save_state`] saved, into a function built the same way.
    /// Only the bits the guest may write are taken from the state; nothing changes when the
    /// state does not fit (other BARs, bad length or alignment). The MSI-X message control
    /// bits are not forwarded to the [`Msix`]: restore it from its own state.
    pub fn restore_state(&mut self, state: &ConfigSpaceState) -> Result<(), ConfigStateError> {
        if state.bytes.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigStateError::Length(state.bytes.len()));
        }
        let actual: Vec<u8> = self.bars().iter().map(|b| b.index).collect();
        let saved: Vec<u8> = state.bars.iter().map(|b| b.index).collect();
        if actual != saved {
            return Err(ConfigStateError::Bars { saved, actual });
        }
        for b in &state.bars {
            if let BarSlot::Bar(cur) = self.bars[usize::from(b.index)] {
                let mut mask = cur.mask();
                if cur.spec.kind == BarKind::Memory32 {
                    mask &= 0xffff_ffff;
                }
                if (b.addr | b.committed) & !mask != 0 {
                    return Err(ConfigStateError::BarAlignment(b.index, b.addr));
                }
            }
        }
        for (i, byte) in self.bytes.iter_mut().enumerate() {
            let w = self.writable[i];
            *byte = (*byte & !w) | (state.bytes[i] & w);
        }
        for b in &state.bars {
            if let BarSlot::Bar(cur) = &mut self.bars[usize::from(b.index)] {
                cur.addr = b.addr;
                cur.committed = b.committed;
                cur.sizing = b.sizing;
            }
        }
        Ok(())
    }

    /// The byte at `off` as the guest reads it.
    fn byte(&self, off: usize) -> u8 {
        if !(reg::BAR0..reg::BAR0 + 4 * NUM_BARS).contains(&off) {
            return self.bytes.get(off).copied().unwrap_or(0);
        }
        let slot = (off - reg::BAR0) / 4;
        let dword = self.bar_register(slot);
        dword.to_le_bytes()[(off - reg::BAR0) % 4]
    }

    fn bar_register(&self, slot: usize) -> u32 {
        match self.bars[slot] {
            BarSlot::Unused => 0,
            BarSlot::Bar(b) => (b.addr as u32 & !0xf) | b.flags(),
            BarSlot::Upper => match self.bars[slot - 1] {
                BarSlot::Bar(b) => (b.addr >> 32) as u32,
                _ => 0,
            },
        }
    }

    /// Reads `data.len()` bytes at `offset`. Bytes past the header (the extended space, which
    /// a conventional function does not implement) read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .map_or(0, |o| self.byte(o));
        }
    }

    /// Writes `data` at `offset`, honouring read-only bits. Returns the BARs this write moved
    /// (see [`BarMove`]): a BAR moves when its address changes while memory decoding is on, or
    /// when decoding is turned back on after the BAR was rewritten; writing all-ones (sizing)
    /// never moves a BAR.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<BarMove> {
        let mut moves = Vec::new();
        let Ok(start) = usize::try_from(offset) else {
            return moves;
        };
        if start >= CONFIG_SPACE_SIZE {
            return moves;
        }
        let data = &data[..data.len().min(CONFIG_SPACE_SIZE - start)];
        let decode_before = self.memory_decode();
        let bar_area = reg::BAR0..reg::BAR0 + 4 * NUM_BARS;
        let mut bar_dwords: [Option<[u8; 4]>; NUM_BARS] = [None; NUM_BARS];
        for (i, &v) in data.iter().enumerate() {
            let off = start + i;
            if bar_area.contains(&off) {
                let slot = (off - reg::BAR0) / 4;
                let dw = bar_dwords[slot].get_or_insert(self.bar_register(slot).to_le_bytes());
                dw[(off - reg::BAR0) % 4] = v;
            } else {
                let w = self.writable[off];
                self.bytes[off] = (self.bytes[off] & !w) | (v & w);
            }
        }
        let mut touched = [false; NUM_BARS];
        for (slot, dw) in bar_dwords.iter().enumerate() {
            if let Some(dw) = dw {
                if let Some(owner) = self.write_bar_register(slot, u32::from_le_bytes(*dw)) {
                    touched[owner] = true;
                }
            }
        }
        if self.memory_decode() {
            for (slot, touched) in touched.iter().enumerate() {
                if *touched || !decode_before {
                    self.commit_bar(slot, &mut moves);
                }
            }
        }
        if let Some((cap, msix)) = &self.msix {
            if range_overlaps(start, data.len(), cap + 2, 2) {
                msix.set_message_control(self.read_u16(cap + 2));
            }
        }
        moves
    }

    /// Updates the BAR behind register `slot`; returns the index of that BAR.
    fn write_bar_register(&mut self, slot: usize, value: u32) -> Option<usize> {
        let owner = match self.bars[slot] {
            BarSlot::Unused => return None,
            BarSlot::Bar(_) => slot,
            BarSlot::Upper => slot - 1,
        };
        let BarSlot::Bar(b) = &mut self.bars[owner] else {
            return None;
        };
        let mask = b.mask();
        if owner == slot {
            let low = u64::from(value) & mask & 0xffff_fff0;
            b.addr = (b.addr & !0xffff_ffff) | low;
        } else {
            let high = (u64::from(value) << 32) & mask;
            b.addr = (b.addr & 0xffff_ffff) | high;
        }
        b.sizing = value == u32::MAX;
        Some(owner)
    }

    /// Makes the programmed address of BAR `slot` the one the device answers at, recording
    /// the move if it changed and the guest is not sizing the BAR.
    fn commit_bar(&mut self, slot: usize, moves: &mut Vec<BarMove>) {
        if let BarSlot::Bar(b) = &mut self.bars[slot] {
            if !b.sizing && b.addr != b.committed {
                moves.push(BarMove {
                    bar: slot as u8,
                    old_base: b.committed,
                    new_base: b.addr,
                    len: b.spec.size,
                });
                b.committed = b.addr;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: 0x01,
            subclass: 0x80,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    fn mem64(size: u64) -> BarSpec {
        BarSpec {
            size,
            kind: BarKind::Memory64,
            prefetchable: false,
        }
    }

    fn mem32(size: u64, prefetchable: bool) -> BarSpec {
        BarSpec {
            size,
            kind: BarKind::Memory32,
            prefetchable,
        }
    }

    fn wr32(c: &mut ConfigSpace, off: usize, v: u32) -> Vec<BarMove> {
        c.write(off as u64, &v.to_le_bytes())
    }

    #[test]
    fn identity_registers_are_read_only() {
        let mut c = ConfigSpace::new(ids());
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8), 0x0180_0001);
        assert_eq!(c.read_u32(0x2c), 0x1100_1af4);
        assert_eq!(c.read_u16(reg::HEADER_TYPE), 0);
        for off in [0usize, 8, 0x2c, 0x30, 0x34] {
            let before = c.read_u32(off);
            wr32(&mut c, off, 0xdead_beef);
            assert_eq!(c.read_u32(off), before, "register {off:#x}");
        }
        // No BAR: reads 0 and sizing yields 0 (not implemented).
        wr32(&mut c, reg::BAR0, u32::MAX);
        assert_eq!(c.read_u32(reg::BAR0), 0);
    }

    #[test]
    fn writable_bits_only() {
        let mut c = ConfigSpace::new(ids());
        c.write(reg::COMMAND as u64, &[0xff, 0xff]);
        assert_eq!(c.command(), command::WRITABLE);
        c.write(reg::STATUS as u64, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::STATUS), 0);
        c.write(reg::INTERRUPT_LINE as u64, &[0x0b, 0x04]);
        assert_eq!(c.read_u16(reg::INTERRUPT_LINE), 0x000b, "pin is read-only");
        c.set_interrupt_pin(1);
        assert_eq!(c.read_u16(reg::INTERRUPT_LINE), 0x010b);
    }

    #[test]
    fn bar_sizing_32_bit() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(1, mem32(0x1000, true), 0xc000_2000).unwrap();
        assert_eq!(c.read_u32(0x14), 0xc000_2008, "address | prefetchable");
        assert_ne!(c.command() & command::MEMORY_SPACE, 0);
        // Sizing with decoding on, as some guests do: no move reported.
        assert!(wr32(&mut c, 0x14, u32::MAX).is_empty());
        assert_eq!(c.read_u32(0x14), 0xffff_f008);
        assert!(wr32(&mut c, 0x14, 0xc000_2000).is_empty());
        assert_eq!(c.read_u32(0x14), 0xc000_2008);
        // Low bits of the address are not writable.
        wr32(&mut c, 0x14, 0xc000_2fff);
        assert_eq!(c.read_u32(0x14), 0xc000_2008);
    }

    #[test]
    fn bar_sizing_64_bit() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(0, mem64(0x4000), 0x1_0000_8000).unwrap();
        assert_eq!(c.read_u32(0x10), 0x0000_8004);
        assert_eq!(c.read_u32(0x14), 1);
        // Linux sizes with decoding off, one half at a time.
        c.write(reg::COMMAND as u64, &[0, 0]);
        assert!(wr32(&mut c, 0x10, u32::MAX).is_empty());
        assert_eq!(c.read_u32(0x10), 0xffff_c004);
        assert!(wr32(&mut c, 0x10, 0x8000).is_empty());
        assert!(wr32(&mut c, 0x14, u32::MAX).is_empty());
        assert_eq!(c.read_u32(0x14), u32::MAX);
        assert!(wr32(&mut c, 0x14, 1).is_empty());
        assert!(c.write(reg::COMMAND as u64, &[2, 0]).is_empty());
        assert_eq!(c.bar(0).unwrap().base, 0x1_0000_8000);
        // A BAR larger than 4 GiB: the low half has no writable address bits.
        c.add_bar(2, mem64(1 << 33), 0x4_0000_0000).unwrap();
        wr32(&mut c, 0x18, u32::MAX);
        wr32(&mut c, 0x1c, u32::MAX);
        assert_eq!(c.read_u32(0x18), 0x4);
        assert_eq!(c.read_u32(0x1c), 0xffff_fffe);
        // BAR 1 and 3 are upper halves: not BARs on their own.
        assert!(c.bar(1).is_none());
        assert_eq!(c.bars().len(), 2);
    }

    #[test]
    fn bar_validation() {
        let mut c = ConfigSpace::new(ids());
        assert_eq!(
            c.add_bar(5, mem64(0x1000), 0),
            Err(ConfigError::BarInUse(5))
        );
        assert_eq!(
            c.add_bar(6, mem32(0x1000, false), 0),
            Err(ConfigError::BarInUse(6))
        );
        assert_eq!(
            c.add_bar(0, mem32(0x1800, false), 0),
            Err(ConfigError::BarSize(0x1800))
        );
        assert_eq!(
            c.add_bar(0, mem32(8, false), 0),
            Err(ConfigError::BarSize(8))
        );
        assert!(matches!(
            c.add_bar(0, mem32(0x1000, false), 0x800),
            Err(ConfigError::BarAlignment { .. })
        ));
        assert!(matches!(
            c.add_bar(0, mem32(0x1000, false), 1 << 32),
            Err(ConfigError::BarAbove4G { .. })
        ));
        c.add_bar(0, mem64(0x1000), 0).unwrap();
        assert_eq!(
            c.add_bar(1, mem32(0x1000, false), 0),
            Err(ConfigError::BarInUse(1))
        );
    }

    #[test]
    fn bar_moves_are_reported() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(0, mem64(0x4000), 0xe000_0000).unwrap();
        c.add_bar(2, mem32(0x1000, false), 0xe001_0000).unwrap();
        // A 32-bit BAR rewritten with decoding on moves at once.
        assert_eq!(
            wr32(&mut c, 0x18, 0xe002_0000),
            vec![BarMove {
                bar: 2,
                old_base: 0xe001_0000,
                new_base: 0xe002_0000,
                len: 0x1000
            }]
        );
        // A 64-bit BAR rewritten with decoding off (as Linux does) moves once, when
        // decoding comes back on.
        c.write(reg::COMMAND as u64, &[0, 0]);
        assert!(wr32(&mut c, 0x10, 0x4000).is_empty());
        assert!(wr32(&mut c, 0x14, 0x2).is_empty());
        assert_eq!(c.bar(0).unwrap().base, 0xe000_0000);
        let moves = c.write(reg::COMMAND as u64, &[2, 0]);
        assert_eq!(
            moves,
            vec![BarMove {
                bar: 0,
                old_base: 0xe000_0000,
                new_base: 0x2_0000_4000,
                len: 0x4000
            }]
        );
        assert_eq!(c.bar(0).unwrap().base, 0x2_0000_4000);
        // A single 8-byte write of both halves (ECAM) moves it once.
        let moves = c.write(0x10, &0x3_0000_8000u64.to_le_bytes());
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].new_base, 0x3_0000_8000);
    }

    #[test]
    fn capability_chain_walk() {
        let mut c = ConfigSpace::new(ids());
        assert_eq!(c.read_u16(reg::STATUS) & STATUS_CAPABILITIES, 0);
        let a = c
            .add_capability(cap_id::VENDOR_SPECIFIC, &[14, 1, 2, 3], &[])
            .unwrap();
        let b = c.add_capability(0x05, &[0xaa; 5], &[0, 0xff]).unwrap();
        let d = c
            .add_capability(cap_id::VENDOR_SPECIFIC, &[3, 9], &[])
            .unwrap();
        assert_eq!((a, b, d), (0x40, 0x48, 0x50));
        assert_ne!(c.read_u16(reg::STATUS) & STATUS_CAPABILITIES, 0);
        // Walk the list by hand through read().
        let mut seen = Vec::new();
        let mut off = c.read_u32(reg::CAPABILITIES) as u8 as usize;
        while off != 0 {
            seen.push((off, c.read_u16(off) as u8));
            off = usize::from(c.read_u16(off) >> 8);
        }
        assert_eq!(seen, vec![(0x40, 0x09), (0x48, 0x05), (0x50, 0x09)]);
        assert_eq!(
            c.find_capabilities(cap_id::VENDOR_SPECIFIC),
            vec![0x40, 0x50]
        );
        // Capability bodies are read-only but for the bits given as writable.
        c.write(0x48, &[0; 8]);
        assert_eq!(
            c.read_u32(0x48),
            0x00aa_5005,
            "id, next, RO byte, cleared byte"
        );
        assert_eq!(c.read_u32(0x4c), 0x00aa_aaaa, "body ends at 0x4f");
        // The list runs out of room rather than past the end.
        let err = c.add_capability(1, &[0; 200], &[]).unwrap_err();
        assert_eq!(err, ConfigError::CapabilitySpace(202));
    }

    #[test]
    fn odd_widths_and_offsets_never_panic() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(0, mem64(0x1000), 0x1000).unwrap();
        c.add_capability(cap_id::VENDOR_SPECIFIC, &[4, 0], &[0xff, 0xff])
            .unwrap();
        for off in [
            0u64,
            1,
            3,
            0xe,
            0x13,
            0x25,
            0xfd,
            0xff,
            0x100,
            0xfff,
            u64::MAX - 2,
        ] {
            for len in [1usize, 2, 3, 4, 8] {
                let mut d = vec![0x55u8; len];
                c.read(off, &mut d);
                c.write(off, &d);
                c.write(off, &vec![0xff; len]);
            }
        }
        // Reads past the header are zero.
        let mut d = [0x55u8; 4];
        c.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
        // A 2-byte read straddling vendor and device ids.
        let mut d = [0u8; 2];
        c.read(1, &mut d);
        assert_eq!(d, [0x1a, 0x42]);
    }

    #[test]
    fn state_round_trip_keeps_guest_writes_only() {
        let build = || {
            let mut c = ConfigSpace::new(ids());
            c.add_bar(0, mem64(0x4000), 0x1_0000_8000).unwrap();
            c.add_capability(cap_id::VENDOR_SPECIFIC, &[1, 2, 3, 4], &[0, 0xff])
                .unwrap();
            c
        };
        let mut a = build();
        a.write(reg::COMMAND as u64, &[0x06, 0]);
        a.write(reg::INTERRUPT_LINE as u64, &[0x0b]);
        a.write(0x43, &[0x5a]);
        // The guest moves BAR 0 (decoding off, then on).
        a.write(reg::COMMAND as u64, &[0, 0]);
        wr32(&mut a, 0x10, 0x2_0000);
        wr32(&mut a, 0x14, 0);
        a.write(reg::COMMAND as u64, &[0x06, 0]);
        let state = a.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let state: ConfigSpaceState = serde_json::from_str(&json).unwrap();

        let mut b = build();
        b.restore_state(&state).unwrap();
        for off in (0..CONFIG_SPACE_SIZE).step_by(4) {
            assert_eq!(b.read_u32(off), a.read_u32(off), "register {off:#x}");
        }
        assert_eq!(b.bars(), a.bars());
        assert_eq!(b.bar(0).unwrap().base, 0x2_0000);

        // Read-only bytes are not taken from a state, whatever it says.
        let mut forged = state.clone();
        forged.bytes[reg::VENDOR_ID] = 0x12;
        let mut c = build();
        c.restore_state(&forged).unwrap();
        assert_eq!(c.read_u16(reg::VENDOR_ID), 0x1af4);
    }

    #[test]
    fn mismatched_states_are_refused_untouched() {
        let mut a = ConfigSpace::new(ids());
        a.add_bar(0, mem64(0x4000), 0x1_0000_8000).unwrap();
        let good = a.save_state();
        let mut other = ConfigSpace::new(ids());
        other.add_bar(2, mem64(0x4000), 0x1_0000_8000).unwrap();
        let before = other.save_state();
        assert!(matches!(
            other.restore_state(&good),
            Err(ConfigStateError::Bars { .. })
        ));
        assert_eq!(other.save_state(), before);
        let mut short = good.clone();
        short.bytes.truncate(10);
        assert_eq!(a.restore_state(&short), Err(ConfigStateError::Length(10)));
        let mut odd = good.clone();
        odd.bars[0].committed = 0x1_0000_8010;
        assert!(matches!(
            a.restore_state(&odd),
            Err(ConfigStateError::BarAlignment(0, _))
        ));
        assert_eq!(a.bar(0).unwrap().base, 0x1_0000_8000);
    }
}
