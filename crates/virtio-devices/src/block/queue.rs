//! Serving one virtio-blk queue, with either engine.
//!
//! - Synchronous: pop every available chain, parse them all, run them with adjacent reads (or
//!   writes) of contiguous sectors merged into one vectored `preadv`/`pwritev` straight between
//!   the file and guest memory, then publish the used entries (only after the I/O finished)
//!   and interrupt the driver if event-index suppression allows.
//! - io_uring (`super::uring`): reads, writes and flushes become SQEs (at most one per queue
//!   entry in flight), submitted in one system call per batch; their used entries are
//!   published as their completions are reaped, in completion order. Requests with nothing to
//!   transfer (errors, `GET_ID`) and discard/write-zeroes run synchronously as above.
//!
//! The core's `drain_queue` completes each chain before looking at the next, which rules out
//! merging and asynchronous completion; this loop has the same notification logic (disable,
//! drain, re-enable and re-check, `notify_if_needed`) around batches instead.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use vessel_ratelimit::RateLimiter;
use vessel_virtio::worker::notify_if_needed;
use vessel_virtio::{DeviceHealth, VirtioInterrupt};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::{Disk, IOV_MAX};
use super::request::{disk_range, parse, Op, Request, Seg, DWZ_SEGMENT_LEN};
use super::uring::{Finished, NotQueued, Uring};
use super::{BlockStats, SECTOR_SIZE};

/// Reusable iovec storage. It holds pointers into guest memory only during one
/// [`QueueServer::transfer`] call and is emptied before that returns.
struct IovBuf(Vec<libc::iovec>);

// SAFETY: the vector is empty between calls (see `transfer`), so no pointer ever crosses
// threads; only the allocation does.
unsafe impl Send for IovBuf {}

/// Serves one queue of a block device; the worker calls [`QueueServer::process`] on each
/// kick. `#[doc(hidden)]`-public so that the benchmark can drive it without the thread.
pub struct QueueServer {
    queue: Queue,
    index: u16,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    disk: Arc<Disk>,
    stats: Arc<BlockStats>,
    descs: Vec<Descriptor>,
    segs: Vec<Seg>,
    reqs: Vec<Request>,
    iovs: IovBuf,
    /// The io_uring engine's ring; `None` for the synchronous engine.
    ring: Option<Uring>,
    /// The device's rate limiter (shared with its handle).
    limiter: Option<RateLimiter>,
    /// The limiter refused the last chain looked at (left in the queue): stop serving until
    /// its timer fires.
    throttled: bool,
}

impl QueueServer {
    pub(crate) fn new(
        queue: Queue,
        index: u16,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        health: DeviceHealth,
        disk: Arc<Disk>,
        stats: Arc<BlockStats>,
    ) -> QueueServer {
        let size = usize::from(queue.size());
        QueueServer {
            queue,
            index,
            mem,
            interrupt,
            health,
            disk,
            stats,
            descs: Vec::with_capacity(size),
            segs: Vec::with_capacity(size * 2),
            reqs: Vec::with_capacity(size),
            iovs: IovBuf(Vec::with_capacity(IOV_MAX)),
            ring: None,
            limiter: None,
            throttled: false,
        }
    }

    /// Rate-limits the requests taken from the queue.
    pub(crate) fn with_limiter(mut self, limiter: RateLimiter) -> QueueServer {
        self.limiter = Some(limiter);
        self
    }

    /// Whether the rate limiter stopped the last `process` (the rest of the queue waits for
    /// its timer).
    pub fn throttled(&self) -> bool {
        self.throttled
    }

    /// Uses `ring` (the io_uring engine) instead of synchronous I/O.
    pub(crate) fn with_ring(mut self, ring: Option<Uring>) -> QueueServer {
        self.ring = ring;
        self
    }

    /// The io_uring completion eventfd, when this server uses the io_uring engine.
    pub fn completion_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.ring.as_ref().map(Uring::event_fd)
    }

    /// Requests submitted to io_uring and not completed yet (0 for the synchronous engine).
    pub fn in_flight(&self) -> usize {
        self.ring.as_ref().map_or(0, Uring::in_flight)
    }

    /// Called on the completion eventfd: empties it and serves completions (and whatever
    /// their freed slots let through).
    pub fn on_completion_event(&mut self) -> u64 {
        if let Some(r) = &self.ring {
            r.consume_event();
        }
        self.process()
    }

    /// Waits for completions until at least `want` more requests have completed or nothing
    /// is in flight; returns how many completed. For tests.
    #[cfg(test)]
    pub fn process_until_idle_or(&mut self, want: u64) -> u64 {
        let mut n = self.process();
        while n < want && self.in_flight() > 0 && !self.health.is_broken() {
            if let Some(r) = &mut self.ring {
                if r.wait().is_err() {
                    break;
                }
            }
            n += self.process();
        }
        n
    }

    /// Serves until nothing is in flight (blocking on io_uring completions); returns how many
    /// requests were completed. For the benchmark and tests.
    pub fn process_until_idle(&mut self) -> u64 {
        let mut n = self.process();
        while self.in_flight() > 0 && !self.health.is_broken() {
            if let Some(r) = &mut self.ring {
                if let Err(e) = r.wait() {
                    self.health
                        .mark_broken(&format_args!("virtio-blk: io_uring wait: {e}"));
                    break;
                }
            }
            n += self.process();
        }
        n
    }

    /// Waits for every io_uring request in flight and publishes each (status, used entry,
    /// interrupt if due) without popping anything new: afterwards the queue holds no chain
    /// that was popped and not completed. For a quiesce; returns how many completed.
    pub fn finish_in_flight(&mut self) -> u64 {
        let mut n = 0;
        while self.in_flight() > 0 {
            if let Some(r) = &mut self.ring {
                if let Err(e) = r.wait() {
                    log::error!("virtio-blk: cannot wait for requests in flight: {e}");
                    break;
                }
                r.consume_event();
            }
            n += self.reap();
        }
        if n > 0 {
            self.notify();
        }
        n
    }

    /// The queue, for tests and the benchmark's synthetic driver.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Serves every available request (io_uring: submits them, and publishes whatever has
    /// completed); returns how many were completed.
    pub fn process(&mut self) -> u64 {
        if self.ring.is_some() {
            self.process_async()
        } else {
            self.process_sync()
        }
    }

    fn process_sync(&mut self) -> u64 {
        let mut completed = 0u64;
        if self.health.is_broken() {
            return 0;
        }
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                return self.broken(e, completed);
            }
            loop {
                match self.pop_batch() {
                    Ok(0) if self.throttled => return completed,
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return self.broken(e, completed),
                }
                self.execute();
                match self.complete() {
                    Ok(n) => completed += n,
                    Err(e) => return self.broken(e, completed),
                }
                // Interrupt per batch (event-index suppression keeps this cheap) so that the
                // driver can refill while the next batch runs.
                if notify_if_needed(&mut self.queue, self.index, &self.mem, &*self.interrupt) {
                    self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
                }
                if self.throttled {
                    // The limiter's timer brings us back; notifications stay as they are.
                    return completed;
                }
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return self.broken(e, completed),
            }
        }
        completed
    }

    fn broken(&self, e: virtio_queue::Error, completed: u64) -> u64 {
        self.health
            .mark_broken(&format_args!("virtio-blk queue {}: {e}", self.index));
        completed
    }

    /// The io_uring engine: reap completions, then pop chains while there are free slots,
    /// queue their I/O, run the rest synchronously, submit, reap again, notify.
    fn process_async(&mut self) -> u64 {
        let mut completed = self.reap();
        if self.health.is_broken() {
            return completed;
        }
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                return self.broken(e, completed);
            }
            loop {
                let (popped, room) = match self.pop_async() {
                    Ok(x) => x,
                    Err(e) => return self.broken(e, completed),
                };
                if !self.reqs.is_empty() {
                    self.execute();
                    match self.complete() {
                        Ok(n) => completed += n,
                        Err(e) => return self.broken(e, completed),
                    }
                }
                if let Some(r) = &mut self.ring {
                    if let Err(e) = r.submit() {
                        self.health
                            .mark_broken(&format_args!("virtio-blk: io_uring submit: {e}"));
                        return completed;
                    }
                }
                // Page-cache hits have usually completed during the submission.
                completed += self.reap();
                if self.health.is_broken() {
                    return completed;
                }
                if !room || self.throttled {
                    // All slots busy (or the limiter refused): completions (its timer) will
                    // bring us back here; leave the rest of the ring (and notifications)
                    // alone until then.
                    self.notify();
                    return completed;
                }
                if popped == 0 {
                    break;
                }
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return self.broken(e, completed),
            }
        }
        self.notify();
        completed
    }

    /// Pops chains while the ring has free slots, queueing reads, writes and flushes; the
    /// others are left in `reqs` to run synchronously. Returns how many chains were popped and
    /// whether there is still room in the ring.
    fn pop_async(&mut self) -> Result<(usize, bool), virtio_queue::Error> {
        self.reqs.clear();
        self.segs.clear();
        let Some(ring) = self.ring.as_mut() else {
            return Ok((0, false));
        };
        let mem = &self.mem;
        self.throttled = false;
        let mut iter = self.queue.iter(mem)?;
        let mut popped = 0;
        while ring.has_room() {
            let Some(chain) = iter.next() else { break };
            let at = self.segs.len();
            let mut r = parse(chain, mem, &self.disk, &mut self.descs, &mut self.segs);
            if !admit(self.limiter.as_ref(), &r) {
                self.segs.truncate(at);
                self.throttled = true;
                break;
            }
            popped += 1;
            let queued = match r.op {
                Op::In | Op::Out => ring.queue_rw(
                    r.head,
                    r.status,
                    r.op == Op::Out,
                    r.offset,
                    r.len,
                    &self.segs[r.segs.clone()],
                ),
                Op::Flush if !self.disk.read_only() => ring.queue_flush(r.head, r.status),
                _ => Err(NotQueued::Unsuitable),
            };
            match queued {
                Ok(()) => {
                    self.segs.truncate(at);
                    if matches!(r.op, Op::In | Op::Out) {
                        self.stats.io_submissions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(NotQueued::BadBuffer) => {
                    r.op = Op::Done;
                    r.code = VIRTIO_BLK_S_IOERR as u8;
                    self.reqs.push(r);
                }
                Err(NotQueued::Unsuitable) => self.reqs.push(r),
            }
        }
        if self.throttled {
            // Leave the refused chain for when the limiter's timer fires.
            self.queue.go_to_previous_position();
        }
        Ok((popped, self.ring.as_ref().is_some_and(Uring::has_room)))
    }

    /// Publishes every posted io_uring completion.
    fn reap(&mut self) -> u64 {
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let (queue, mem, stats) = (&mut self.queue, &self.mem, &self.stats);
        let mut failed = None;
        let n = ring.reap(|f: Finished| {
            let code = if f.ok {
                VIRTIO_BLK_S_OK as u8
            } else {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                VIRTIO_BLK_S_IOERR as u8
            };
            if let Some((write, bytes)) = f.transferred {
                let c = if write {
                    &stats.bytes_written
                } else {
                    &stats.bytes_read
                };
                c.fetch_add(bytes, Ordering::Relaxed);
            }
            let used = publish_status(mem, f.status, code, f.written);
            if failed.is_none() {
                if let Err(e) = queue.add_used(mem, f.head, used) {
                    failed = Some(e);
                }
            }
        }) as u64;
        self.stats.requests.fetch_add(n, Ordering::Relaxed);
        if let Some(e) = failed {
            self.broken(e, 0);
        }
        n
    }

    fn notify(&mut self) {
        if notify_if_needed(&mut self.queue, self.index, &self.mem, &*self.interrupt) {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Pops and parses every available chain.
    fn pop_batch(&mut self) -> Result<usize, virtio_queue::Error> {
        self.reqs.clear();
        self.segs.clear();
        let mem = &self.mem;
        self.throttled = false;
        let mut iter = self.queue.iter(mem)?;
        for chain in &mut iter {
            let at = self.segs.len();
            let r = parse(chain, mem, &self.disk, &mut self.descs, &mut self.segs);
            if !admit(self.limiter.as_ref(), &r) {
                self.segs.truncate(at);
                self.throttled = true;
                break;
            }
            self.reqs.push(r);
        }
        if self.throttled {
            // Leave the refused chain for when the limiter's timer fires.
            self.queue.go_to_previous_position();
        }
        Ok(self.reqs.len())
    }

    /// Runs the batch's requests in order, merging runs of contiguous reads or writes.
    fn execute(&mut self) {
        let mut i = 0;
        while i < self.reqs.len() {
            let op = self.reqs[i].op;
            match op {
                Op::In | Op::Out => {
                    let mut j = i + 1;
                    let mut end = self.reqs[i].offset + self.reqs[i].len;
                    let mut nsegs = self.reqs[i].segs.len();
                    while let Some(r) = self.reqs.get(j) {
                        if r.op != op || r.offset != end || nsegs + r.segs.len() > IOV_MAX {
                            break;
                        }
                        end += r.len;
                        nsegs += r.segs.len();
                        j += 1;
                    }
                    if !self.transfer(i..j) && j - i > 1 {
                        // Find out which request failed.
                        for k in i..j {
                            self.transfer(k..k + 1);
                        }
                    }
                    i = j;
                }
                Op::Flush => {
                    let r = if self.disk.read_only() {
                        Ok(())
                    } else {
                        self.disk.flush()
                    };
                    self.reqs[i].code = status_of(&r);
                    i += 1;
                }
                Op::GetId => {
                    self.get_id(i);
                    i += 1;
                }
                Op::Discard | Op::WriteZeroes => {
                    self.discard_or_zero(i);
                    i += 1;
                }
                Op::Done => i += 1,
            }
        }
    }

    /// Reads or writes requests `range` (contiguous on disk, all `In` or all `Out`) in one
    /// vectored call. Returns false on failure (every request of the range then has IOERR).
    fn transfer(&mut self, range: std::ops::Range<usize>) -> bool {
        let write = self.reqs[range.start].op == Op::Out;
        let offset = self.reqs[range.start].offset;
        let iovs = &mut self.iovs.0;
        iovs.clear();
        let mut total = 0u64;
        let mut ok = true;
        'build: for r in &self.reqs[range.clone()] {
            for s in &self.segs[r.segs.clone()] {
                if s.host != 0 {
                    iovs.push(libc::iovec {
                        iov_base: s.host as *mut libc::c_void,
                        iov_len: s.len as usize,
                    });
                    continue;
                }
                // A segment spanning several guest memory regions.
                for slice in GuestMemoryBackend::get_slices(&self.mem, s.addr, s.len as usize) {
                    let Ok(slice) = slice else {
                        ok = false;
                        break 'build;
                    };
                    iovs.push(libc::iovec {
                        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                        iov_len: slice.len(),
                    });
                }
            }
            total += r.len;
        }
        if ok {
            // SAFETY: every iovec points into a guest memory region of `self.mem`, which
            // stays mapped for this call (we hold a reference); the ranges were checked to lie
            // in guest memory. Guest memory may be written concurrently by the guest, which is
            // fine for a byte copy done by the kernel.
            let r = unsafe { self.disk.transfer(iovs, offset, write) };
            ok = match r {
                Ok(n) => n == total,
                Err(e) => {
                    log::debug!("virtio-blk: I/O at {offset} failed: {e}");
                    false
                }
            };
        }
        iovs.clear();
        self.stats.io_submissions.fetch_add(1, Ordering::Relaxed);
        if ok {
            let counter = if write {
                &self.stats.bytes_written
            } else {
                &self.stats.bytes_read
            };
            counter.fetch_add(total, Ordering::Relaxed);
        }
        for r in &mut self.reqs[range] {
            if ok {
                r.code = VIRTIO_BLK_S_OK as u8;
                if !write {
                    r.written = r.len as u32;
                }
            } else {
                r.code = VIRTIO_BLK_S_IOERR as u8;
                r.written = 0;
            }
        }
        ok
    }

    fn get_id(&mut self, i: usize) {
        let serial = self.disk.serial();
        let mut done = 0usize;
        let r = &mut self.reqs[i];
        for s in &self.segs[r.segs.clone()] {
            if done == serial.len() {
                break;
            }
            let n = (s.len as usize).min(serial.len() - done);
            if self
                .mem
                .write_slice(&serial[done..done + n], s.addr)
                .is_err()
            {
                r.code = VIRTIO_BLK_S_IOERR as u8;
                return;
            }
            done += n;
        }
        r.written = done as u32;
        r.code = VIRTIO_BLK_S_OK as u8;
    }

    /// Reads `buf.len()` bytes at logical offset `at` of request `i`'s data.
    fn read_data(&self, i: usize, mut at: u64, buf: &mut [u8]) -> bool {
        let mut filled = 0usize;
        for s in &self.segs[self.reqs[i].segs.clone()] {
            let len = u64::from(s.len);
            if at >= len {
                at -= len;
                continue;
            }
            let n = ((len - at) as usize).min(buf.len() - filled);
            let Some(addr) = s.addr.checked_add(at) else {
                return false;
            };
            if self
                .mem
                .read_slice(&mut buf[filled..filled + n], addr)
                .is_err()
            {
                return false;
            }
            filled += n;
            at = 0;
            if filled == buf.len() {
                return true;
            }
        }
        false
    }

    fn discard_or_zero(&mut self, i: usize) {
        let zeroes = self.reqs[i].op == Op::WriteZeroes;
        let count = self.reqs[i].len / DWZ_SEGMENT_LEN;
        let mut code = VIRTIO_BLK_S_OK;
        for k in 0..count {
            let mut e = [0u8; DWZ_SEGMENT_LEN as usize];
            if !self.read_data(i, k * DWZ_SEGMENT_LEN, &mut e) {
                code = VIRTIO_BLK_S_IOERR;
                break;
            }
            let sector = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            let sectors = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
            let flags = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
            let allowed = if zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                code = VIRTIO_BLK_S_UNSUPP;
                break;
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let Some(off) = disk_range(sector, len, &self.disk) else {
                code = VIRTIO_BLK_S_IOERR;
                break;
            };
            if len == 0 {
                continue;
            }
            let r = if zeroes {
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                self.disk.write_zeroes(off, len, unmap)
            } else {
                self.disk.discard(off, len)
            };
            if status_of(&r) != VIRTIO_BLK_S_OK as u8 {
                code = VIRTIO_BLK_S_IOERR;
                break;
            }
        }
        self.reqs[i].code = code as u8;
    }

    /// Writes every status byte and publishes the used entries.
    fn complete(&mut self) -> Result<u64, virtio_queue::Error> {
        let mut n = 0;
        for r in &self.reqs {
            let used = publish_status(&self.mem, r.status, r.code, r.written);
            if r.code != VIRTIO_BLK_S_OK as u8 {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            self.queue.add_used(&self.mem, r.head, used)?;
            n += 1;
        }
        self.stats.requests.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// The device's counters.
    pub(crate) fn stats(&self) -> &BlockStats {
        &self.stats
    }
}

/// Whether the rate limiter lets request `r` through (taking its tokens): one operation, and
/// its data bytes for reads and writes (Firecracker's accounting).
fn admit(limiter: Option<&RateLimiter>, r: &Request) -> bool {
    let Some(l) = limiter else { return true };
    let bytes = match r.op {
        Op::In | Op::Out => r.len,
        _ => 0,
    };
    l.try_consume(1, bytes)
}

/// Writes the status byte (if the chain has one); returns the used length.
fn publish_status(
    mem: &GuestMemoryMmap,
    status: Option<GuestAddress>,
    code: u8,
    written: u32,
) -> u32 {
    let Some(st) = status else { return 0 };
    let ok = GuestMemoryBackend::get_slice(mem, st, 1).and_then(|s| Ok(s.write_obj(code, 0)?));
    if ok.is_ok() {
        written.saturating_add(1)
    } else {
        0
    }
}

fn status_of(r: &std::io::Result<()>) -> u8 {
    match r {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => {
            log::debug!("virtio-blk: request failed: {e}");
            VIRTIO_BLK_S_IOERR as u8
        }
    }
}
