//! Test helpers shared by the net and vsock tests: guest memory, a mock driver-side ring
//! that can keep adding chains after the device took the queue, and a recording interrupt.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::{ActiveQueue, InterruptCause, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

#[derive(Default)]
pub struct TestIrq {
    pub causes: Mutex<Vec<InterruptCause>>,
}

impl VirtioInterrupt for TestIrq {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
        self.causes.lock().unwrap().push(cause);
        Ok(())
    }
}

impl TestIrq {
    pub fn count(&self) -> usize {
        self.causes.lock().unwrap().len()
    }
}

/// The driver's side of one split queue of `size` entries at `base` (descriptor table, then
/// available ring, then used ring). Written by hand rather than with `MockSplitQueue`, whose
/// ring layout overlaps the used ring with the end of the available ring.
pub struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    size: u16,
    used_seen: u16,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        for a in [avail, used] {
            mem.write_obj(0u32, GuestAddress(a)).unwrap();
        }
        Ring {
            mem,
            desc,
            avail,
            used,
            next_desc: 0,
            size,
            used_seen: 0,
        }
    }

    /// The guest addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// The device side of this ring, with event index off.
    pub fn active(&self, index: u16) -> ActiveQueue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        queue.set_ready(true);
        assert!(queue.is_valid(self.mem));
        ActiveQueue {
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            index,
        }
    }

    fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Publishes an available index (hostile drivers).
    pub fn set_avail_idx(&self, idx: u16) {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Makes a chain of `(address, length, device-writable)` buffers available; returns
    /// its head index.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { (idx + 1) % self.size };
            let d = self.desc + 16 * u64::from(idx);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        let avail = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(avail % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(avail.wrapping_add(1));
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        head
    }

    /// The head index the next `add` will use.
    pub fn next_head(&self) -> u16 {
        self.next_desc
    }

    pub fn used_idx(&self) -> u16 {
        let v = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        v
    }

    /// The next used entry (head, length), if the device added one.
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Waits (5 s at most) for the next used entry.
    pub fn wait_used(&mut self) -> (u32, u32) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = self.next_used() {
                return e;
            }
            assert!(Instant::now() < end, "timed out waiting for a used buffer");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}
