//! Where the memory BARs of bus 0 are now. A firmware (SeaBIOS, OVMF) or a guest kernel
//! reassigns BARs; [`BarMap`] follows every [`BarReprogram`] and serves the MMIO bus's
//! accesses that no fixed range claims (it is the bus's [`BusFallback`]), so that a device
//! answers at the address its BAR holds now.
//!
//! Lookups clone the device out of a read lock and access it after releasing the lock; moves
//! take the write lock briefly. Overlapping BARs (a guest may program two at one address) are
//! served by the first one mapped.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vessel_devices::BusFallback;

use crate::bus::{BarReprogram, PciDevice};

/// A device, one of its BARs and an offset in it.
type Target = (Arc<Mutex<dyn PciDevice>>, u8, u64);

struct Mapped {
    slot: u8,
    bar: u8,
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn PciDevice>>,
}

/// The memory BARs of bus 0 and where each answers now.
#[derive(Default)]
pub struct BarMap {
    bars: RwLock<Vec<Mapped>>,
}

impl BarMap {
    pub fn new() -> Self {
        BarMap::default()
    }

    /// Maps BAR `bar` of the function in `slot` at `base..base + len`.
    pub fn insert(&self, slot: u8, bar: u8, base: u64, len: u64, dev: Arc<Mutex<dyn PciDevice>>) {
        let mut bars = self.bars.write().unwrap_or_else(PoisonError::into_inner);
        bars.retain(|m| (m.slot, m.bar) != (slot, bar));
        bars.push(Mapped {
            slot,
            bar,
            base,
            len,
            dev,
        });
    }

    /// Unmaps every BAR of the function in `slot`; returns (BAR, where it was) for each.
    pub fn remove(&self, slot: u8) -> Vec<(u8, u64)> {
        let mut bars = self.bars.write().unwrap_or_else(PoisonError::into_inner);
        let gone = bars
            .iter()
            .filter(|m| m.slot == slot)
            .map(|m| (m.bar, m.base))
            .collect();
        bars.retain(|m| m.slot != slot);
        gone
    }

    /// Follows a move the guest made; false when that BAR is not mapped here.
    pub fn moved(&self, r: &BarReprogram) -> bool {
        let mut bars = self.bars.write().unwrap_or_else(PoisonError::into_inner);
        match bars.iter_mut().find(|m| (m.slot, m.bar) == (r.slot, r.bar)) {
            Some(m) => {
                m.base = r.new_base;
                true
            }
            None => false,
        }
    }

    /// Where BAR `bar` of `slot` answers now.
    pub fn base(&self, slot: u8, bar: u8) -> Option<u64> {
        let bars = self.bars.read().unwrap_or_else(PoisonError::into_inner);
        bars.iter()
            .find(|m| (m.slot, m.bar) == (slot, bar))
            .map(|m| m.base)
    }

    /// The device, BAR and offset that hold all of `addr..addr + len`.
    fn find(&self, addr: u64, len: usize) -> Option<Target> {
        let bars = self.bars.read().unwrap_or_else(PoisonError::into_inner);
        bars.iter().find_map(|m| {
            let offset = addr.checked_sub(m.base)?;
            let end = offset.checked_add(len as u64)?;
            (end <= m.len).then(|| (m.dev.clone(), m.bar, offset))
        })
    }
}

impl BusFallback for BarMap {
    fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((dev, bar, offset)) = self.find(addr, data.len()) else {
            return false;
        };
        dev.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bar_read(bar, offset, data);
        true
    }

    fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((dev, bar, offset)) = self.find(addr, data.len()) else {
            return false;
        };
        dev.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bar_write(bar, offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarInfo, BarMove};

    /// Answers reads with its BAR number and the offset's low byte; records writes.
    #[derive(Default)]
    struct Dev {
        writes: Vec<(u8, u64, Vec<u8>)>,
    }

    impl PciDevice for Dev {
        fn config_read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn config_write(&mut self, _offset: u64, _data: &[u8]) -> Vec<BarMove> {
            Vec::new()
        }
        fn bars(&self) -> Vec<BarInfo> {
            Vec::new()
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            data[0] = bar;
            data[1..].fill(offset as u8);
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
    }

    #[test]
    fn a_moved_bar_answers_at_its_new_address_only() {
        let dev = Arc::new(Mutex::new(Dev::default()));
        let map = BarMap::new();
        map.insert(3, 0, 0xd000_0000, 0x1000, dev.clone());
        let mut d = [0u8; 2];
        assert!(map.read(0xd000_0010, &mut d));
        assert_eq!(d, [0, 0x10]);
        assert!(map.moved(&BarReprogram {
            slot: 3,
            bar: 0,
            old_base: 0xd000_0000,
            new_base: 0xfeb0_0000,
            len: 0x1000,
        }));
        assert_eq!(map.base(3, 0), Some(0xfeb0_0000));
        assert!(!map.read(0xd000_0010, &mut d), "the old address is free");
        assert!(map.read(0xfeb0_0ffe, &mut d));
        assert_eq!(d, [0, 0xfe]);
        // Straddling the end of the BAR is not the BAR's.
        assert!(!map.read(0xfeb0_0fff, &mut d));
        assert!(map.write(0xfeb0_0004, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, 4, vec![7])]);
        // Unknown BARs are not moved; a wrap-around address is no BAR's.
        assert!(!map.moved(&BarReprogram {
            slot: 4,
            bar: 0,
            old_base: 0,
            new_base: 0,
            len: 16,
        }));
        assert!(!map.read(u64::MAX, &mut d));
    }
}
