//! virtio-rng (entropy device, virtio 1.2 section 5.4): one request queue; every
//! device-writable buffer of a chain is filled with bytes from the host's `getrandom(2)`,
//! written straight into guest memory. At most [`MAX_BYTES_PER_REQUEST`] bytes per chain, so a
//! huge chain from a hostile driver cannot stall the worker. An optional rate limiter
//! (Firecracker's entropy `rate_limiter`: bytes and requests) leaves a request that does not
//! fit in the queue until its timer fires.

use std::io;
use std::os::unix::io::AsRawFd;

use vessel_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use vessel_ratelimit::{RateLimiter, RateLimiterConfig};
use vessel_virtio::worker::{consume, drain_queue_while, EventHandler, Worker, WorkerControl};
use vessel_virtio::{
    device_type, features, ActivateContext, ActivateError, ActiveQueue, DeviceHealth, VirtioDevice,
    VirtioInterrupt,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets (the rest of its buffers stay untouched).
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// The virtio entropy device.
pub struct Rng {
    worker: Option<Worker>,
    limiter: RateLimiter,
}

const KICK_TOKEN: u64 = 0;
const LIMITER_TOKEN: u64 = 1;

impl Rng {
    /// A device with no rate limit.
    pub fn new() -> Self {
        Rng {
            worker: None,
            limiter: RateLimiter::unlimited().expect("a timerfd for the rate limiter"),
        }
    }

    /// A device limited by `limit` (bytes handed out and requests), if given.
    pub fn with_limiter(limit: Option<&RateLimiterConfig>) -> io::Result<Self> {
        let limiter = match limit {
            Some(c) => RateLimiter::new(c)?,
            None => RateLimiter::unlimited()?,
        };
        Ok(Rng {
            worker: None,
            limiter,
        })
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker = None;
        let queue = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
        let fds = [
            (queue.kick.as_raw_fd(), KICK_TOKEN, EventSet::IN),
            (self.limiter.as_raw_fd(), LIMITER_TOKEN, EventSet::IN),
        ];
        let handler = RngHandler {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            health: ctx.health,
            limiter: self.limiter.clone(),
        };
        let worker = Worker::spawn("virtio-rng", &fds, handler).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
        true
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }
}

struct RngHandler {
    mem: GuestMemoryMmap,
    queue: ActiveQueue,
    interrupt: std::sync::Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    limiter: RateLimiter,
}

impl RngHandler {
    fn process(&mut self) {
        let (mem, limiter) = (&self.mem, &self.limiter);
        drain_queue_while(
            &mut self.queue.queue,
            self.queue.index,
            mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| {
                if limiter.is_limited() {
                    let bytes = writable_len(chain.clone()).min(MAX_BYTES_PER_REQUEST as u64);
                    if !limiter.try_consume(1, bytes) {
                        return None;
                    }
                }
                Some(fill_chain(mem, chain, MAX_BYTES_PER_REQUEST))
            },
        );
    }
}

impl EventHandler for RngHandler {
    fn handle_event(&mut self, token: u64, _: EventSet, _: &mut WorkerControl) -> io::Result<()> {
        if token == LIMITER_TOKEN {
            self.limiter.on_timer();
        } else {
            consume(&self.queue.kick);
        }
        self.process();
        Ok(())
    }
}

/// The bytes a chain's device-writable buffers hold.
fn writable_len(chain: DescriptorChain<&GuestMemoryMmap>) -> u64 {
    chain
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum()
}

/// Fills the device-writable buffers of `chain` with random bytes, at most `cap` in all, and
/// returns how many were written (a prefix of the writable part). Readable buffers are
/// skipped; a buffer outside guest memory ends the request.
fn fill_chain(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, cap: usize) -> u32 {
    let mut written = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            continue;
        }
        let want = (desc.len() as usize).min(cap - written);
        if want == 0 {
            break;
        }
        let n = fill_guest(mem, desc.addr(), want);
        written += n;
        if n < want {
            break;
        }
    }
    // `written <= cap`, far below u32::MAX.
    u32::try_from(written).unwrap_or(u32::MAX)
}

/// Writes `len` random bytes at `addr`, across regions if needed; returns how many were
/// written before the end of guest memory (or a `getrandom` failure).
fn fill_guest(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> usize {
    let mut done = 0;
    for slice in mem.get_slices(addr, len) {
        let Ok(slice) = slice else { break };
        let n = getrandom_into(&slice);
        done += n;
        if n < slice.len() {
            break;
        }
    }
    done
}

fn getrandom_into<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> usize {
    let guard = slice.ptr_guard_mut();
    let base = guard.as_ptr();
    let len = slice.len();
    let mut done = 0;
    while done < len {
        // SAFETY: `base..base + len` is guest memory mapped by `slice`, which stays mapped
        // while `guard` lives; `getrandom` writes at most `len - done` bytes from
        // `base + done`. Guest memory is only ever accessed through raw pointers and
        // volatile copies, never through Rust references, so concurrent guest writes do not
        // alias anything.
        let r = unsafe { libc::getrandom(base.add(done).cast(), len - done, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("virtio-rng: getrandom failed: {e}");
            break;
        }
        if r == 0 {
            break;
        }
        // `r` is positive and at most `len - done`.
        done += r as usize;
    }
    slice.bitmap().mark_dirty(0, done);
    done
}

/// Helpers shared by the tests of the devices in this crate's small-device modules.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use vessel_memory::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use vessel_virtio::{
        ActivateContext, ActiveQueue, DeviceHealth, InterruptCause, VirtioInterrupt,
    };

    /// Records every interrupt.
    #[derive(Default)]
    pub struct CountingInterrupt {
        pub causes: Mutex<Vec<InterruptCause>>,
    }

    impl VirtioInterrupt for CountingInterrupt {
        fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
            self.causes.lock().unwrap().push(cause);
            Ok(())
        }
    }

    impl CountingInterrupt {
        pub fn count(&self, cause: InterruptCause) -> usize {
            self.causes
                .lock()
                .unwrap()
                .iter()
                .filter(|c| **c == cause)
                .count()
        }
    }

    /// 1 MiB of guest memory at 0 (queues live in the first pages; buffers from 0x8_0000).
    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Where the mock queue `n` of a device lives (well apart from each other).
    pub fn queue_base(n: u16) -> GuestAddress {
        GuestAddress(u64::from(n) * 0x1000)
    }

    /// One buffer of a chain: (guest address, length, device-writable).
    pub type Buf = (u64, u32, bool);

    /// Puts one chain made of `bufs` in the descriptor table from `first` and makes it
    /// available.
    pub fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, bufs: &[Buf]) {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let last = i + 1 == bufs.len();
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        vq.add_desc_chains(&descs, first).unwrap();
    }

    /// The used entries of a mock queue so far: (head, len).
    pub fn used(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// A queue handed to a device, with its kick event.
    pub fn active_queue(vq: &MockSplitQueue<GuestMemoryMmap>, index: u16) -> ActiveQueue {
        let queue: Queue = vq.create_queue().unwrap();
        ActiveQueue {
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            index,
        }
    }

    /// An activation context over `mem` with `queues`.
    pub fn context(
        mem: &GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
        irq: &Arc<CountingInterrupt>,
    ) -> ActivateContext {
        ActivateContext {
            mem: mem.clone(),
            acked_features,
            queues,
            interrupt: irq.clone(),
            health: DeviceHealth::new(irq.clone()),
        }
    }

    /// Waits (up to a generous bound, not a timing assertion) until `cond` holds.
    pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vessel_virtio::worker::drain_queue;
    use vessel_virtio::InterruptCause;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::Bytes;

    fn first_chain<'a>(
        q: &mut Queue,
        m: &'a GuestMemoryMmap,
    ) -> DescriptorChain<&'a GuestMemoryMmap> {
        q.iter(m).unwrap().next().unwrap()
    }

    #[test]
    fn fills_writable_buffers_only() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&[0u8; 0x300], GuestAddress(0x8_0000))
            .unwrap();
        m.write_slice(&[0xaau8; 0x100], GuestAddress(0x9_0000))
            .unwrap();
        // A readable buffer (ignored: wrong direction) then two writable ones.
        add_chain(
            &vq,
            0,
            &[
                (0x9_0000, 0x100, false),
                (0x8_0000, 0x100, true),
                (0x8_0100, 0x200, true),
            ],
        );
        let mut q: Queue = vq.create_queue().unwrap();
        let c = first_chain(&mut q, &m);
        assert_eq!(fill_chain(&m, c, MAX_BYTES_PER_REQUEST), 0x300);
        let out = read_bytes(&m, 0x8_0000, 0x300);
        // 768 random bytes are all zero with probability 2^-6144.
        assert!(out.iter().any(|&b| b != 0));
        // Two 256-byte halves that are equal would mean the same bytes were copied twice.
        assert_ne!(out[..0x100], out[0x100..0x200]);
        assert_eq!(read_bytes(&m, 0x9_0000, 0x100), vec![0xaa; 0x100]);
    }

    #[test]
    fn caps_bytes_per_request() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        add_chain(&vq, 0, &[(0x8_0000, 0x8_0000, true)]);
        let mut q: Queue = vq.create_queue().unwrap();
        let c = first_chain(&mut q, &m);
        assert_eq!(fill_chain(&m, c, 0x1000), 0x1000);
        // Past the cap, guest memory is untouched.
        assert_eq!(read_bytes(&m, 0x8_1000, 0x1000), vec![0; 0x1000]);
    }

    #[test]
    fn hostile_chains_do_not_panic() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Past the end of memory, straddling its end, overflowing the address space, and
        // only readable buffers.
        add_chain(&vq, 0, &[(0x20_0000, 0x100, true)]);
        add_chain(&vq, 1, &[(0x10_0000 - 0x10, 0x100, true)]);
        add_chain(&vq, 2, &[(u64::MAX - 4, u32::MAX, true)]);
        add_chain(&vq, 3, &[(0x8_0000, 0x100, false)]);
        let mut q: Queue = vq.create_queue().unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let health = DeviceHealth::new(irq.clone());
        let d = drain_queue(&mut q, 0, &m, irq.as_ref(), &health, |c| {
            fill_chain(&m, c, MAX_BYTES_PER_REQUEST)
        });
        assert_eq!(d.completed, 4);
        // Only the straddling buffer gets its in-memory 16 bytes.
        assert_eq!(used(&vq), vec![(0, 0), (1, 0x10), (2, 0), (3, 0)]);
        assert!(!health.is_broken());
    }

    #[test]
    fn device_serves_kicks_and_resets() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let irq = Arc::new(CountingInterrupt::default());
        let aq = active_queue(&vq, 0);
        let kick = aq.kick.try_clone().unwrap();
        let mut dev = Rng::new();
        assert_eq!(dev.device_type(), 4);
        dev.activate(context(&m, features::COMMON, vec![aq], &irq))
            .unwrap();
        add_chain(&vq, 0, &[(0x8_0000, 64, true)]);
        kick.write(1).unwrap();
        wait_until("the rng request", || vq.used().idx().load() == 1);
        assert_eq!(used(&vq), vec![(0, 64)]);
        wait_until("the interrupt", || irq.count(InterruptCause::Queue(0)) == 1);
        assert!(dev.reset());
        assert!(dev.worker.is_none());
        // After reset nothing serves the queue.
        add_chain(&vq, 1, &[(0x8_1000, 64, true)]);
        kick.write(1).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn a_rate_limited_request_waits_in_the_queue_for_the_timer() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let irq = Arc::new(CountingInterrupt::default());
        let aq = active_queue(&vq, 0);
        let kick = aq.kick.try_clone().unwrap();
        // 64 bytes per 300 ms.
        let limit = RateLimiterConfig {
            bandwidth: Some(vessel_ratelimit::BucketConfig {
                size: 64,
                one_time_burst: 0,
                refill_time_ms: 300,
            }),
            ops: None,
        };
        let mut dev = Rng::with_limiter(Some(&limit)).unwrap();
        dev.activate(context(&m, features::COMMON, vec![aq], &irq))
            .unwrap();
        add_chain(&vq, 0, &[(0x8_0000, 64, true)]);
        add_chain(&vq, 1, &[(0x8_1000, 64, true)]);
        let t = Instant::now();
        kick.write(1).unwrap();
        wait_until("the first request", || vq.used().idx().load() >= 1);
        // The second does not fit the bucket: it stays available, unanswered...
        std::thread::sleep(Duration::from_millis(50));
        if t.elapsed() < Duration::from_millis(250) {
            assert_eq!(vq.used().idx().load(), 1);
        }
        // ...until the bucket refills and the timer serves it, with no new kick.
        wait_until("the second request", || vq.used().idx().load() == 2);
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(used(&vq), vec![(0, 64), (1, 64)]);
    }

    #[test]
    fn missing_queue_fails_activation() {
        let m = mem();
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev = Rng::new();
        assert!(matches!(
            dev.activate(context(&m, 0, vec![], &irq)),
            Err(ActivateError::MissingQueue(0))
        ));
    }
}
