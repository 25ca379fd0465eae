//! The virtio-mem device's bookkeeping, free of queues and memory: which blocks of the
//! device-managed region are plugged, the sizes in its configuration space, and the answer
//! to each request with what the host must do about it (map or unmap KVM slots, discard
//! pages). Every range a driver sends is checked here; a hostile one gets an error answer.

use super::wire::{Request, Response, State};

/// The region a virtio-mem device manages, and its granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemGeometry {
    /// Guest physical start of the region (a multiple of `block_size`).
    pub addr: u64,
    /// Size of the region (a multiple of `slot_size`).
    pub region_size: u64,
    /// The unit the driver plugs and unplugs (a power of two).
    pub block_size: u64,
    /// The unit the host maps into the guest (a multiple of `block_size`).
    pub slot_size: u64,
}

/// Why a geometry cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid virtio-mem region {0:?}: sizes must be non-zero, the block size a power of two dividing the slot size and the address, the slot size dividing the region size")]
pub struct BadGeometry(pub MemGeometry);

impl MemGeometry {
    /// Checks the invariants the bookkeeping relies on.
    pub fn check(self) -> Result<Self, BadGeometry> {
        let ok = self.block_size.is_power_of_two()
            && self.slot_size >= self.block_size
            && self.slot_size.is_multiple_of(self.block_size)
            && self.region_size >= self.slot_size
            && self.region_size.is_multiple_of(self.slot_size)
            && self.addr.is_multiple_of(self.block_size)
            && self.addr.checked_add(self.region_size).is_some()
            && usize::try_from(self.region_size / self.block_size).is_ok();
        ok.then_some(self).ok_or(BadGeometry(self))
    }

    /// Number of blocks in the region.
    pub fn blocks(&self) -> usize {
        // `check` made sure it fits.
        (self.region_size / self.block_size) as usize
    }

    /// Number of KVM slots covering the region.
    pub fn slots(&self) -> usize {
        (self.region_size / self.slot_size) as usize
    }

    fn blocks_per_slot(&self) -> usize {
        (self.slot_size / self.block_size) as usize
    }
}

/// What the host must do after a request was accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Guest physical ranges `(start, len)` whose host pages are to be dropped.
    pub discard: Vec<(u64, u64)>,
    /// KVM slots (by index in the region) to map (`true`) or unmap (`false`).
    pub slots: Vec<(usize, bool)>,
}

/// Why the host refuses a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Firecracker's words.
    #[error(
        "Size {0} is invalid: it must be a multiple of block size and less than the total size"
    )]
    InvalidSize(u64),
    /// No driver has set the device up yet (or it reset it): Firecracker's words.
    #[error("Device is not active")]
    NotActive,
}

/// The device's state: the plugged bitmap and the sizes of the configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    geometry: MemGeometry,
    plugged: Vec<bool>,
    plugged_size: u64,
    requested_size: u64,
    usable_region_size: u64,
}

impl Blocks {
    /// A region with nothing plugged and nothing requested.
    pub fn new(geometry: MemGeometry) -> Result<Self, BadGeometry> {
        let geometry = geometry.check()?;
        Ok(Blocks {
            plugged: vec![false; geometry.blocks()],
            geometry,
            plugged_size: 0,
            requested_size: 0,
            usable_region_size: 0,
        })
    }

    pub fn geometry(&self) -> MemGeometry {
        self.geometry
    }

    pub fn plugged_size(&self) -> u64 {
        self.plugged_size
    }

    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    pub fn usable_region_size(&self) -> u64 {
        self.usable_region_size
    }

    /// Whether block `i` is plugged.
    pub fn is_plugged(&self, i: usize) -> bool {
        self.plugged.get(i).copied().unwrap_or(false)
    }

    /// The virtio-mem configuration space (virtio 1.2 section 5.15.4), little-endian.
    pub fn config_bytes(&self) -> [u8; 56] {
        let g = &self.geometry;
        let mut c = [0u8; 56];
        c[0..8].copy_from_slice(&g.block_size.to_le_bytes());
        // node_id (8..10) and padding stay 0: no VIRTIO_MEM_F_ACPI_PXM.
        c[16..24].copy_from_slice(&g.addr.to_le_bytes());
        c[24..32].copy_from_slice(&g.region_size.to_le_bytes());
        c[32..40].copy_from_slice(&self.usable_region_size.to_le_bytes());
        c[40..48].copy_from_slice(&self.plugged_size.to_le_bytes());
        c[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        c
    }

    /// The host asks the driver to reach `size` bytes plugged. The usable region grows (in
    /// whole slots) to hold it; it never shrinks but on the driver's `UNPLUG_ALL`.
    pub fn set_requested_size(&mut self, size: u64) -> Result<(), SizeError> {
        let g = &self.geometry;
        if !size.is_multiple_of(g.block_size) || size > g.region_size {
            return Err(SizeError::InvalidSize(size));
        }
        self.requested_size = size;
        self.usable_region_size = self.usable_region_size.max(self.usable_for(size));
        Ok(())
    }

    fn usable_for(&self, size: u64) -> u64 {
        // `size <= region_size`, a multiple of `slot_size`: no overflow, no growth past it.
        size.next_multiple_of(self.geometry.slot_size)
    }

    /// Answers one request; on success, also what the host must do.
    pub fn handle(&mut self, req: Request) -> (Response, Effects) {
        match req {
            Request::Plug { addr, nb_blocks } => match self.range(addr, nb_blocks) {
                None => (Response::Error, Effects::default()),
                Some(r) => self.plug(r),
            },
            Request::Unplug { addr, nb_blocks } => match self.range(addr, nb_blocks) {
                None => (Response::Error, Effects::default()),
                Some(r) => self.unplug(r),
            },
            Request::UnplugAll => self.unplug_all(),
            Request::State { addr, nb_blocks } => match self.range(addr, nb_blocks) {
                None => (Response::Error, Effects::default()),
                Some(r) => (Response::Ack(Some(self.state_of(r))), Effects::default()),
            },
            Request::Unknown(_) => (Response::Error, Effects::default()),
        }
    }

    /// The blocks `addr` and `nb_blocks` name, if they are a non-empty, aligned range
    /// inside the usable region.
    fn range(&self, addr: u64, nb_blocks: u16) -> Option<std::ops::Range<usize>> {
        let g = &self.geometry;
        let off = addr.checked_sub(g.addr)?;
        if nb_blocks == 0 || !off.is_multiple_of(g.block_size) {
            return None;
        }
        let len = u64::from(nb_blocks).checked_mul(g.block_size)?;
        if off.checked_add(len)? > self.usable_region_size {
            return None;
        }
        let first = usize::try_from(off / g.block_size).ok()?;
        Some(first..first + usize::from(nb_blocks))
    }

    fn state_of(&self, r: std::ops::Range<usize>) -> State {
        let n = r.len();
        match self.plugged[r].iter().filter(|p| **p).count() {
            0 => State::Unplugged,
            k if k == n => State::Plugged,
            _ => State::Mixed,
        }
    }

    fn bytes(&self, blocks: usize) -> u64 {
        blocks as u64 * self.geometry.block_size
    }

    /// The slots touching blocks `r`.
    fn slots_of(&self, r: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        let per = self.geometry.blocks_per_slot();
        r.start / per..(r.end - 1) / per + 1
    }

    fn slot_in_use(&self, slot: usize) -> bool {
        let per = self.geometry.blocks_per_slot();
        self.plugged[slot * per..(slot + 1) * per]
            .iter()
            .any(|p| *p)
    }

    fn plug(&mut self, r: std::ops::Range<usize>) -> (Response, Effects) {
        if self.state_of(r.clone()) != State::Unplugged {
            return (Response::Error, Effects::default());
        }
        if self.plugged_size + self.bytes(r.len()) > self.requested_size {
            // Not now: the host wants no more memory plugged.
            return (Response::Nack, Effects::default());
        }
        let newly_mapped: Vec<(usize, bool)> = self
            .slots_of(&r)
            .filter(|&s| !self.slot_in_use(s))
            .map(|s| (s, true))
            .collect();
        self.plugged[r.clone()].fill(true);
        self.plugged_size += self.bytes(r.len());
        (
            Response::Ack(None),
            Effects {
                discard: Vec::new(),
                slots: newly_mapped,
            },
        )
    }

    /// Undoes an accepted plug of `addr`/`nb_blocks` the host could not carry out.
    pub fn undo_plug(&mut self, addr: u64, nb_blocks: u16) {
        if let Some(r) = self.range(addr, nb_blocks) {
            self.plugged[r.clone()].fill(false);
            self.plugged_size -= self.bytes(r.len());
        }
    }

    fn unplug(&mut self, r: std::ops::Range<usize>) -> (Response, Effects) {
        if self.state_of(r.clone()) != State::Plugged {
            return (Response::Error, Effects::default());
        }
        self.plugged[r.clone()].fill(false);
        self.plugged_size -= self.bytes(r.len());
        let g = self.geometry;
        let start = g.addr + r.start as u64 * g.block_size;
        let slots = self
            .slots_of(&r)
            .filter(|&s| !self.slot_in_use(s))
            .map(|s| (s, false))
            .collect();
        (
            Response::Ack(None),
            Effects {
                discard: vec![(start, self.bytes(r.len()))],
                slots,
            },
        )
    }

    fn unplug_all(&mut self) -> (Response, Effects) {
        let g = self.geometry;
        let slots: Vec<(usize, bool)> = (0..g.slots())
            .filter(|&s| self.slot_in_use(s))
            .map(|s| (s, false))
            .collect();
        let discard = slots
            .iter()
            .map(|&(s, _)| (g.addr + s as u64 * g.slot_size, g.slot_size))
            .collect();
        self.plugged.fill(false);
        self.plugged_size = 0;
        // The usable region shrinks to what the current request needs.
        self.usable_region_size = self.usable_for(self.requested_size);
        (Response::Ack(None), Effects { discard, slots })
    }

    /// The plugged bitmap as runs of plugged blocks `(first, count)`, for snapshots.
    pub fn plugged_runs(&self) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.plugged.len() {
            if self.plugged[i] {
                let start = i;
                while i < self.plugged.len() && self.plugged[i] {
                    i += 1;
                }
                runs.push((start, i - start));
            } else {
                i += 1;
            }
        }
        runs
    }

    /// The same region with a saved state: the requested size, the usable region and the
    /// plugged runs `(first block, count)` (as [`Self::plugged_runs`] gives them). Checked
    /// against the region: a state file is input like any other.
    pub fn restored(
        &self,
        requested_size: u64,
        usable_region_size: u64,
        runs: &[(u64, u64)],
    ) -> Result<Blocks, String> {
        let g = self.geometry;
        let mut b = Blocks::new(g).map_err(|e| e.to_string())?;
        b.set_requested_size(requested_size)
            .map_err(|e| e.to_string())?;
        if usable_region_size > g.region_size
            || !usable_region_size.is_multiple_of(g.slot_size)
            || usable_region_size < b.usable_region_size
        {
            return Err(format!("usable region of {usable_region_size} bytes"));
        }
        b.usable_region_size = usable_region_size;
        for &(first, count) in runs {
            let end = first.checked_add(count).filter(|&e| e <= g.blocks() as u64);
            let Some(end) = end.filter(|_| count > 0) else {
                return Err(format!("plugged blocks {first}+{count}"));
            };
            // Both within `blocks()`, a usize.
            let r = first as usize..end as usize;
            if b.plugged[r.clone()].iter().any(|p| *p) {
                return Err(format!("plugged blocks {first}+{count} overlap"));
            }
            if end * g.block_size > usable_region_size {
                return Err(format!(
                    "plugged blocks {first}+{count} past the usable region"
                ));
            }
            b.plugged[r.clone()].fill(true);
            b.plugged_size += b.bytes(r.len());
        }
        Ok(b)
    }

    /// The slots that hold plugged blocks (to map when a device is rebuilt with state).
    pub fn slots_in_use(&self) -> Vec<usize> {
        (0..self.geometry.slots())
            .filter(|&s| self.slot_in_use(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 4 << 30;

    fn blocks() -> Blocks {
        // 512 MiB in 2 MiB blocks and 128 MiB slots.
        Blocks::new(MemGeometry {
            addr: BASE,
            region_size: 512 * MIB,
            block_size: 2 * MIB,
            slot_size: 128 * MIB,
        })
        .unwrap()
    }

    fn plug(addr: u64, nb_blocks: u16) -> Request {
        Request::Plug { addr, nb_blocks }
    }

    fn unplug(addr: u64, nb_blocks: u16) -> Request {
        Request::Unplug { addr, nb_blocks }
    }

    fn state(addr: u64, nb_blocks: u16) -> Request {
        Request::State { addr, nb_blocks }
    }

    fn u64_at(c: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(c[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn geometry_is_checked() {
        let good = blocks().geometry();
        for bad in [
            MemGeometry {
                block_size: 3 * MIB,
                ..good
            },
            MemGeometry {
                slot_size: MIB,
                ..good
            },
            MemGeometry {
                region_size: 100 * MIB,
                ..good
            },
            MemGeometry {
                addr: BASE + MIB,
                ..good
            },
            MemGeometry {
                addr: u64::MAX - 2 * MIB + 1,
                ..good
            },
            MemGeometry {
                region_size: 0,
                ..good
            },
        ] {
            assert_eq!(Blocks::new(bad), Err(BadGeometry(bad)));
        }
        assert_eq!(good.blocks(), 256);
        assert_eq!(good.slots(), 4);
    }

    #[test]
    fn config_space_reflects_the_sizes() {
        let mut b = blocks();
        b.set_requested_size(130 * MIB).unwrap();
        let c = b.config_bytes();
        assert_eq!(u64_at(&c, 0), 2 * MIB);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 0);
        assert_eq!(u64_at(&c, 16), BASE);
        assert_eq!(u64_at(&c, 24), 512 * MIB);
        // Usable grows in whole slots.
        assert_eq!(u64_at(&c, 32), 256 * MIB);
        assert_eq!(u64_at(&c, 40), 0);
        assert_eq!(u64_at(&c, 48), 130 * MIB);
    }

    #[test]
    fn requested_sizes_are_checked() {
        let mut b = blocks();
        assert_eq!(
            b.set_requested_size(3 * MIB),
            Err(SizeError::InvalidSize(3 * MIB))
        );
        assert_eq!(
            b.set_requested_size(514 * MIB),
            Err(SizeError::InvalidSize(514 * MIB))
        );
        assert_eq!(
            SizeError::InvalidSize(3).to_string(),
            "Size 3 is invalid: it must be a multiple of block size and less than the total size"
        );
        b.set_requested_size(512 * MIB).unwrap();
        assert_eq!(b.usable_region_size(), 512 * MIB);
        // Lowering the request keeps the usable region.
        b.set_requested_size(0).unwrap();
        assert_eq!(b.usable_region_size(), 512 * MIB);
    }

    #[test]
    fn plug_state_unplug() {
        let mut b = blocks();
        b.set_requested_size(256 * MIB).unwrap();
        // Two blocks straddling the first slot boundary map both slots.
        let at = BASE + 126 * MIB;
        let (r, e) = b.handle(plug(at, 2));
        assert_eq!(r, Response::Ack(None));
        assert_eq!(e.slots, vec![(0, true), (1, true)]);
        assert!(e.discard.is_empty());
        assert_eq!(b.plugged_size(), 4 * MIB);
        assert!(b.is_plugged(63) && b.is_plugged(64) && !b.is_plugged(65));
        assert_eq!(
            b.handle(state(at, 2)).0,
            Response::Ack(Some(State::Plugged))
        );
        assert_eq!(b.handle(state(at, 3)).0, Response::Ack(Some(State::Mixed)));
        assert_eq!(
            b.handle(state(BASE, 1)).0,
            Response::Ack(Some(State::Unplugged))
        );
        // A plug next to them in slot 1 maps nothing new.
        let (r, e) = b.handle(plug(at + 4 * MIB, 1));
        assert_eq!((r, e.slots), (Response::Ack(None), vec![]));
        // Unplugging the first block empties slot 0 only.
        let (r, e) = b.handle(unplug(at, 1));
        assert_eq!(r, Response::Ack(None));
        assert_eq!(e.discard, vec![(at, 2 * MIB)]);
        assert_eq!(e.slots, vec![(0, false)]);
        assert_eq!(b.plugged_size(), 4 * MIB);
        assert_eq!(b.plugged_runs(), vec![(64, 2)]);
        assert_eq!(b.slots_in_use(), vec![1]);
    }

    #[test]
    fn plugging_past_the_request_is_refused_for_now() {
        let mut b = blocks();
        b.set_requested_size(4 * MIB).unwrap();
        assert_eq!(b.handle(plug(BASE, 2)).0, Response::Ack(None));
        assert_eq!(b.handle(plug(BASE + 2 * 2 * MIB, 1)).0, Response::Nack);
        assert_eq!(b.plugged_size(), 4 * MIB);
    }

    #[test]
    fn bad_ranges_get_errors_and_change_nothing() {
        let mut b = blocks();
        b.set_requested_size(128 * MIB).unwrap();
        assert_eq!(b.handle(plug(BASE, 1)).0, Response::Ack(None));
        let before = b.clone();
        for req in [
            // Unaligned, empty, below the region, past the usable region, overflowing.
            plug(BASE + 4096, 1),
            plug(BASE + 2 * MIB, 0),
            plug(BASE - 2 * MIB, 1),
            plug(BASE + 128 * MIB, 1),
            plug(BASE + 126 * MIB, 2),
            plug(u64::MAX - 2 * MIB + 1, 1),
            plug(0, u16::MAX),
            state(BASE + 600 * MIB, 1),
            state(BASE, 0),
            unplug(u64::MAX, u16::MAX),
            // Plugging a plugged block, unplugging an unplugged or mixed range.
            plug(BASE, 1),
            unplug(BASE + 2 * MIB, 1),
            unplug(BASE, 2),
            Request::Unknown(9),
        ] {
            let (r, e) = b.handle(req);
            assert_eq!(r, Response::Error, "{req:?}");
            assert_eq!(e, Effects::default(), "{req:?}");
            assert_eq!(b, before, "{req:?}");
        }
    }

    #[test]
    fn unplug_all_empties_and_shrinks_the_usable_region() {
        let mut b = blocks();
        b.set_requested_size(512 * MIB).unwrap();
        assert_eq!(b.handle(plug(BASE, 1)).0, Response::Ack(None));
        assert_eq!(b.handle(plug(BASE + 300 * MIB, 3)).0, Response::Ack(None));
        b.set_requested_size(100 * MIB).unwrap();
        let (r, e) = b.handle(Request::UnplugAll);
        assert_eq!(r, Response::Ack(None));
        assert_eq!(e.slots, vec![(0, false), (2, false)]);
        assert_eq!(
            e.discard,
            vec![(BASE, 128 * MIB), (BASE + 256 * MIB, 128 * MIB)]
        );
        assert_eq!(b.plugged_size(), 0);
        assert_eq!(b.usable_region_size(), 128 * MIB);
        assert!(b.plugged_runs().is_empty());
        // Nothing plugged: nothing to do, still an ACK.
        assert_eq!(
            b.handle(Request::UnplugAll),
            (Response::Ack(None), Effects::default())
        );
    }

    #[test]
    fn saved_state_comes_back_and_bad_state_is_refused() {
        let mut b = blocks();
        b.set_requested_size(300 * MIB).unwrap();
        assert_eq!(b.handle(plug(BASE, 3)).0, Response::Ack(None));
        assert_eq!(b.handle(plug(BASE + 256 * MIB, 2)).0, Response::Ack(None));
        let runs: Vec<(u64, u64)> = b
            .plugged_runs()
            .iter()
            .map(|&(f, c)| (f as u64, c as u64))
            .collect();
        assert_eq!(runs, vec![(0, 3), (128, 2)]);
        let fresh = blocks();
        let back = fresh
            .restored(b.requested_size(), b.usable_region_size(), &runs)
            .unwrap();
        assert_eq!(back, b);
        assert_eq!(back.slots_in_use(), vec![0, 2]);
        for (req, usable, runs) in [
            (3 * MIB, 384 * MIB, vec![]),
            (300 * MIB, 100 * MIB, vec![]),
            (300 * MIB, 1024 * MIB, vec![]),
            (300 * MIB, 384 * MIB, vec![(0, 0)]),
            (300 * MIB, 384 * MIB, vec![(255, 2)]),
            (300 * MIB, 384 * MIB, vec![(u64::MAX, 2)]),
            (300 * MIB, 384 * MIB, vec![(0, 3), (2, 1)]),
            (300 * MIB, 384 * MIB, vec![(200, 1)]),
        ] {
            assert!(
                fresh.restored(req, usable, &runs).is_err(),
                "{req} {usable} {runs:?}"
            );
        }
    }

    #[test]
    fn an_undone_plug_leaves_the_blocks_unplugged() {
        let mut b = blocks();
        b.set_requested_size(8 * MIB).unwrap();
        assert_eq!(b.handle(plug(BASE, 4)).0, Response::Ack(None));
        b.undo_plug(BASE, 4);
        assert_eq!(b.plugged_size(), 0);
        assert_eq!(
            b.handle(state(BASE, 4)).0,
            Response::Ack(Some(State::Unplugged))
        );
    }
}
