//! The bus: address ranges mapped to devices.
//!
//! One [`Bus`] serves the port I/O space and another the MMIO space. The ranges are kept
//! sorted and non-overlapping, so an access is a binary search followed by a call to the
//! device under its mutex; the access path neither allocates nor formats.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A device on a bus.
///
/// `offset` is relative to the base the device was inserted at. `data` has the width of the
/// guest's access (1, 2, 4 or 8 bytes); the bus only calls the device for accesses that lie
/// entirely inside its range, so `offset + data.len()` never exceeds the range length.
pub trait BusDevice: Send {
    /// Fill `data` with the value of the registers at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` to the registers at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// What serves the addresses no range of a [`Bus`] covers, before they count as unhandled:
/// ranges that move while the VM runs (the PCI BARs a guest or its firmware reprograms),
/// looked up by address.
pub trait BusFallback: Send + Sync {
    /// Reads `data.len()` bytes at `addr`; false when nothing is there.
    fn read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// Writes `data` at `addr`; false when nothing is there.
    fn write(&self, addr: u64, data: &[u8]) -> bool;
}

/// Why a device could not be inserted on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
    #[error("bus range at {base:#x} with length {len:#x} wraps past the end of the address space")]
    Overflow { base: u64, len: u64 },
    #[error(
        "bus range {base:#x}..{end:#x} overlaps the device at {existing_base:#x}..{existing_end:#x}",
        end = .base + .len,
        existing_end = .existing_base + .existing_len
    )]
    Overlap {
        base: u64,
        len: u64,
        existing_base: u64,
        existing_len: u64,
    },
}

struct BusRange {
    base: u64,
    /// One past the last address (never overflows: checked on insert).
    end: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each served by a device.
///
/// Accesses to addresses no device covers (or that straddle the end of a device's range) are
/// *unhandled*: reads return all-ones, writes are dropped, and both are counted (see
/// [`Bus::unhandled`]) rather than logged.
///
/// `Bus` is `Sync`: vCPU threads share it by reference (typically in an `Arc`); each access
/// locks only the device it reaches.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<BusRange>,
    fallback: Option<Arc<dyn BusFallback>>,
    unhandled_reads: AtomicU64,
    unhandled_writes: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Map `dev` at `base..base + len`.
    ///
    /// Fails if `len` is zero, if the range wraps past `u64::MAX`, or if it overlaps a range
    /// already on the bus. The same device may be inserted at several ranges.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // Index of the first range that starts after `base`.
        let idx = self.ranges.partition_point(|r| r.base <= base);
        let overlap = |r: &BusRange| BusError::Overlap {
            base,
            len,
            existing_base: r.base,
            existing_len: r.end - r.base,
        };
        if let Some(prev) = idx.checked_sub(1).map(|i| &self.ranges[i]) {
            if prev.end > base {
                return Err(overlap(prev));
            }
        }
        if let Some(next) = self.ranges.get(idx) {
            if next.base < end {
                return Err(overlap(next));
            }
        }
        self.ranges.insert(idx, BusRange { base, end, dev });
        Ok(())
    }

    /// Sends the accesses no range covers to `fallback` first (one per bus; a second call
    /// replaces the first).
    pub fn set_fallback(&mut self, fallback: Arc<dyn BusFallback>) {
        self.fallback = Some(fallback);
    }

    /// The device whose range holds all of `addr..addr + len`, and the offset of `addr` in it.
    #[inline]
    fn find(&self, addr: u64, len: usize) -> Option<(&BusRange, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let range = &self.ranges[idx];
        let offset = addr - range.base;
        let size = range.end - range.base;
        // `offset < size`, so this only fails for absurd `len`s.
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|last| last <= size && offset < size);
        fits.then_some((range, offset))
    }

    /// Read `data.len()` bytes at `addr`. Returns whether a device handled the access; if
    /// none did, `data` is filled with `0xff`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.dev).read(offset, data);
                true
            }
            None => {
                if self.fallback.as_ref().is_some_and(|f| f.read(addr, data)) {
                    return true;
                }
                data.fill(0xff);
                self.unhandled_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Write `data` at `addr`. Returns whether a device handled the access; if none did, the
    /// write is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.dev).write(offset, data);
                true
            }
            None => {
                if self.fallback.as_ref().is_some_and(|f| f.write(addr, data)) {
                    return true;
                }
                self.unhandled_writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// How many reads and writes no device handled, in that order.
    pub fn unhandled(&self) -> (u64, u64) {
        (
            self.unhandled_reads.load(Ordering::Relaxed),
            self.unhandled_writes.load(Ordering::Relaxed),
        )
    }
}

/// Lock a device, carrying on past a panic of another thread that held it: a device's state
/// is plain registers, and the VM is better served by a device that answers.
fn lock(dev: &Mutex<dyn BusDevice>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access and answers reads with `offset + i` in byte `i`.
    #[derive(Default)]
    struct Recorder {
        reads: Vec<(u64, usize)>,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_rejects_zero_len_overflow_and_overlap() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(recorder(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        // Same start, overlapping tail, overlapping head, containing, contained.
        for (base, len) in [
            (0x100, 1),
            (0xf8, 0x9),
            (0x10f, 4),
            (0x80, 0x100),
            (0x104, 2),
        ] {
            assert_eq!(
                bus.insert(recorder(), base, len),
                Err(BusError::Overlap {
                    base,
                    len,
                    existing_base: 0x100,
                    existing_len: 0x10
                }),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent on both sides is fine, and a range may end exactly at u64::MAX.
        bus.insert(recorder(), 0xf0, 0x10).unwrap();
        bus.insert(recorder(), 0x110, 0x10).unwrap();
        bus.insert(recorder(), u64::MAX - 1, 1).unwrap();
        let msg = bus.insert(recorder(), 0x118, 0x10).unwrap_err().to_string();
        assert_eq!(
            msg,
            "bus range 0x118..0x128 overlaps the device at 0x110..0x120"
        );
    }

    #[test]
    fn lookup_at_range_edges() {
        let mut bus = Bus::new();
        let a = recorder();
        let b = recorder();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x70, 2).unwrap();

        let mut byte = [0u8; 1];
        // First and last byte of each range.
        assert!(bus.read(0x70, &mut byte));
        assert_eq!(byte, [0]);
        assert!(bus.read(0x71, &mut byte));
        assert_eq!(byte, [1]);
        assert!(bus.write(0x3f8, &[0xaa]));
        assert!(bus.write(0x3ff, &[0xbb]));
        // One before and one after.
        assert!(!bus.read(0x6f, &mut byte));
        assert_eq!(byte, [0xff]);
        assert!(!bus.read(0x72, &mut byte));
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.write(0x400, &[1]));
        // A wide access that fits, and one that straddles the end of the range.
        let mut word = [0u8; 2];
        assert!(bus.read(0x70, &mut word));
        assert_eq!(word, [0, 1]);
        assert!(!bus.read(0x71, &mut word));
        assert_eq!(word, [0xff, 0xff]);
        let mut dword = [0u8; 4];
        assert!(bus.read(0x3fc, &mut dword));
        assert_eq!(dword, [4, 5, 6, 7]);
        assert!(!bus.write(0x3fe, &[0; 4]));

        assert_eq!(a.lock().unwrap().reads, vec![(0, 1), (1, 1), (0, 2)]);
        let b = b.lock().unwrap();
        assert_eq!(b.reads, vec![(4, 4)]);
        assert_eq!(b.writes, vec![(0, vec![0xaa]), (7, vec![0xbb])]);
        assert_eq!(bus.unhandled(), (3, 3));
    }

    #[test]
    fn unknown_addresses_read_all_ones_and_are_counted() {
        let bus = Bus::new();
        let mut data = [0u8; 8];
        assert!(!bus.read(0xd000_0000, &mut data));
        assert_eq!(data, [0xff; 8]);
        assert!(!bus.read(0, &mut data[..4]));
        assert!(!bus.write(0x80, &[0x12]));
        assert_eq!(bus.unhandled(), (2, 1));
    }

    /// Serves 0x9000..0x9010 with 0x5a, like a BAR that moved there.
    struct Moved;
    impl BusFallback for Moved {
        fn read(&self, addr: u64, data: &mut [u8]) -> bool {
            let hit = (0x9000..0x9010).contains(&addr);
            if hit {
                data.fill(0x5a);
            }
            hit
        }
        fn write(&self, addr: u64, _data: &[u8]) -> bool {
            (0x9000..0x9010).contains(&addr)
        }
    }

    #[test]
    fn the_fallback_serves_only_what_no_range_covers_and_misses_still_count() {
        let mut bus = Bus::new();
        let r = recorder();
        bus.insert(r.clone(), 0x9000, 4).unwrap();
        bus.set_fallback(Arc::new(Moved));
        let mut d = [0u8; 2];
        // A fixed range wins over the fallback.
        assert!(bus.read(0x9000, &mut d));
        assert_eq!(d, [0, 1]);
        assert!(bus.read(0x9008, &mut d));
        assert_eq!(d, [0x5a, 0x5a]);
        assert!(bus.write(0x9008, &d));
        assert_eq!(bus.unhandled(), (0, 0));
        assert!(!bus.read(0xa000, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert!(!bus.write(0xa000, &d));
        assert_eq!(bus.unhandled(), (1, 1));
        assert_eq!(r.lock().unwrap().reads.len(), 1);
    }

    #[test]
    fn many_ranges_in_any_insert_order() {
        let mut bus = Bus::new();
        let devs: Vec<_> = (0..16).map(|_| recorder()).collect();
        // Insert in a scrambled order: range i covers 0x1000*i .. 0x1000*i + 0x100.
        for i in [7usize, 3, 12, 0, 15, 9, 1, 14, 4, 11, 6, 2, 13, 8, 5, 10] {
            bus.insert(devs[i].clone(), 0x1000 * i as u64, 0x100)
                .unwrap();
        }
        for (i, dev) in devs.iter().enumerate() {
            let base = 0x1000 * i as u64;
            assert!(bus.write(base + 0xff, &[i as u8]));
            assert!(!bus.write(base + 0x100, &[i as u8]));
            assert_eq!(dev.lock().unwrap().writes, vec![(0xff, vec![i as u8])]);
        }
        assert_eq!(bus.unhandled(), (0, 16));
    }

    #[test]
    fn bus_is_shareable_between_threads() {
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<Bus>();
    }
}
