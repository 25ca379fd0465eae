//! Test helpers shared by the net and vsock tests: guest memory, a mock driver-side ring
//! that can keep adding chains after the device took the queue, and a recording interrupt.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vessel_virtio::{ActiveQueue, InterruptCause, VirtioInterrupt};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
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

/// The driver's side of one split queue of `size` entries at `base`.
pub struct Ring<'a> {
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    next_desc: u16,
    size: u16,
    used_seen: u16,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Ring {
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            mem,
            next_desc: 0,
            size,
            used_seen: 0,
        }
    }

    /// The device side of this ring, with event index off.
    pub fn active(&self, index: u16) -> ActiveQueue {
        let queue: Queue = self.vq.create_queue().unwrap();
        ActiveQueue {
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            index,
        }
    }

    /// Makes a chain of `(address, length, device-writable)` buffers available; returns
    /// its head index.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let mut descs = Vec::new();
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { (idx + 1) % self.size };
            descs.push((idx, SplitDescriptor::new(addr, len, flags, next)));
        }
        for (idx, d) in &descs {
            self.vq
                .desc_table()
                .store(*idx, RawDescriptor::from(*d))
                .unwrap();
        }
        let avail = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(avail % self.size))
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(avail.wrapping_add(1));
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// The next used entry (head, length), if the device added one.
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let e = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from(self.used_seen % self.size))
            .unwrap()
            .load();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((e.id(), e.len()))
    }

    /// Waits (5 s at most) for the next used entry.
    pub fn wait_used(&mut self) -> (u32, u32) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            std::sync::atomic::fence(Ordering::SeqCst);
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
