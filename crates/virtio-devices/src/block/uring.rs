//! The io_uring engine's ring: reads and writes submitted as `readv`/`writev` SQEs straight
//! into (out of) guest memory, flushes as `fsync(DATASYNC)`, completions signalled on an
//! eventfd registered with the ring (the worker's epoll watches it).
//!
//! One slot per request in flight, at most the queue size of them; a slot owns the iovec
//! array its SQE points to. The ring keeps its own clone of the guest memory map, and
//! dropping it waits for every request in flight, so no completion can write into guest
//! memory (or read a freed iovec array) once the ring is gone: the device's reset drops it
//! (with the worker) before it returns.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use vessel_memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{Disk, IOV_MAX};
use super::request::Seg;

/// Whether this kernel (and seccomp policy) lets us create a ring that supports the
/// operations we need.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(2)?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p)?;
    for code in [
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Fsync::CODE,
    ] {
        if !p.is_supported(code) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
    }
    Ok(())
}

/// `user_data` of cancellation requests (never a slot index).
const CANCEL_TAG: u64 = u64::MAX;

/// What a slot's request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// A request in flight.
struct Slot {
    head: u16,
    status: Option<GuestAddress>,
    kind: Kind,
    offset: u64,
    len: u64,
    /// The SQE's iovec array: pointers into guest memory. Not touched (so not moved or
    /// reallocated) between submission and completion.
    iovs: Vec<libc::iovec>,
}

/// A finished request, handed to the queue to publish.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub head: u16,
    pub status: Option<GuestAddress>,
    pub ok: bool,
    /// Bytes written into the driver's buffers (reads).
    pub written: u32,
    /// Bytes read (`Some(false)`) or written (`Some(true)`), for the counters.
    pub transferred: Option<(bool, u64)>,
}

/// Why a request could not be put in the ring: the caller runs it synchronously instead.
#[derive(Debug)]
pub enum NotQueued {
    /// A buffer could not be resolved in guest memory.
    BadBuffer,
    /// Too many iovecs for one SQE, or no room in the submission queue.
    Unsuitable,
}

/// The ring and its slots.
pub struct Uring {
    /// `None` once deliberately leaked (see `Drop`).
    ring: Option<IoUring>,
    event: EventFd,
    /// Keeps every guest memory region mapped while requests are in flight.
    mem: GuestMemoryMmap,
    disk: Arc<Disk>,
    /// Whether the disk's descriptor is registered with the ring (as file 0).
    fixed: bool,
    slots: Vec<Slot>,
    free: Vec<u16>,
}

// SAFETY: the raw iovec pointers in the slots point into guest memory that `mem` (moved
// along) keeps mapped; nothing about them is tied to the creating thread.
unsafe impl Send for Uring {}

impl Uring {
    /// A ring for up to `depth` requests in flight, signalling `event`-style completions.
    pub fn new(depth: u16, mem: GuestMemoryMmap, disk: Arc<Disk>) -> io::Result<Uring> {
        let depth = depth.max(1);
        // The completion queue is twice the submission queue: with at most `depth` requests
        // in flight it cannot overflow.
        let ring = IoUring::new(u32::from(depth))?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        // The disk's descriptor registered with the ring: each SQE then names it by index
        // and the kernel skips looking it up (and counting a reference) per request.
        let fixed = match disk.fd() {
            Some(fd) => ring.submitter().register_files(&[fd]).is_ok(),
            None => false,
        };
        let slots = (0..depth)
            .map(|_| Slot {
                head: 0,
                status: None,
                kind: Kind::Read,
                offset: 0,
                len: 0,
                iovs: Vec::new(),
            })
            .collect();
        Ok(Uring {
            ring: Some(ring),
            event,
            mem,
            disk,
            fixed,
            slots,
            free: (0..depth).rev().collect(),
        })
    }

    /// The eventfd signalled when completions are posted.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Empties the completion eventfd.
    pub fn consume_event(&self) {
        let _ = self.event.read();
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another request can be queued.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty() && self.ring.is_some()
    }

    /// Queues a read (`write == false`) or write of `segs` (checked to lie in guest memory)
    /// at `offset`. The SQE is not submitted until [`Uring::submit`].
    pub fn queue_rw(
        &mut self,
        head: u16,
        status: Option<GuestAddress>,
        write: bool,
        offset: u64,
        len: u64,
        segs: &[Seg],
    ) -> Result<(), NotQueued> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(NotQueued::Unsuitable);
        };
        let Some(&i) = self.free.last() else {
            return Err(NotQueued::Unsuitable);
        };
        let slot = &mut self.slots[usize::from(i)];
        slot.iovs.clear();
        for s in segs {
            if s.host != 0 {
                slot.iovs.push(libc::iovec {
                    iov_base: s.host as *mut libc::c_void,
                    iov_len: s.len as usize,
                });
                continue;
            }
            // A buffer spanning several guest memory regions.
            for piece in GuestMemoryBackend::get_slices(&self.mem, s.addr, s.len as usize) {
                let Ok(piece) = piece else {
                    slot.iovs.clear();
                    return Err(NotQueued::BadBuffer);
                };
                slot.iovs.push(libc::iovec {
                    iov_base: piece.ptr_guard_mut().as_ptr().cast(),
                    iov_len: piece.len(),
                });
            }
        }
        if slot.iovs.len() > IOV_MAX {
            slot.iovs.clear();
            return Err(NotQueued::Unsuitable);
        }
        // A qcow2 image has no descriptor to submit to: its requests run synchronously.
        let Some(fd) = self.disk.fd().map(types::Fd) else {
            slot.iovs.clear();
            return Err(NotQueued::Unsuitable);
        };
        let sqe = rw_sqe(fd, self.fixed, write, &slot.iovs, offset);
        let sqe = sqe.user_data(u64::from(i));
        // SAFETY: the SQE points to `slot.iovs` (or, for one buffer, to that buffer alone),
        // which is not touched again until the slot's completion has been reaped (`reap`) or
        // the ring has been drained (`Drop`), so the array stays valid and unmoved for as long
        // as the kernel may read it. Each iovec
        // points into a region of `self.mem` (the segments were resolved in the same guest
        // memory, whose regions are shared with this clone), and `self.mem` lives until
        // every request in flight has completed (`Drop` waits, or leaks it), so the kernel
        // never reads or writes unmapped or reused memory. The file descriptor belongs to
        // `self.disk`, also kept alive here.
        let pushed = unsafe { ring.submission().push(&sqe) };
        if pushed.is_err() {
            slot.iovs.clear();
            return Err(NotQueued::Unsuitable);
        }
        slot.head = head;
        slot.status = status;
        slot.kind = if write { Kind::Write } else { Kind::Read };
        slot.offset = offset;
        slot.len = len;
        self.free.pop();
        Ok(())
    }

    /// Queues an `fsync(DATASYNC)`.
    pub fn queue_flush(
        &mut self,
        head: u16,
        status: Option<GuestAddress>,
    ) -> Result<(), NotQueued> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(NotQueued::Unsuitable);
        };
        let Some(&i) = self.free.last() else {
            return Err(NotQueued::Unsuitable);
        };
        let Some(fd) = self.disk.fd().map(types::Fd) else {
            return Err(NotQueued::Unsuitable);
        };
        let sqe = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(u64::from(i));
        // SAFETY: an fsync SQE carries no buffer; the descriptor is kept open by `self.disk`.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            return Err(NotQueued::Unsuitable);
        }
        let slot = &mut self.slots[usize::from(i)];
        slot.iovs.clear();
        slot.head = head;
        slot.status = status;
        slot.kind = Kind::Flush;
        slot.offset = 0;
        slot.len = 0;
        self.free.pop();
        Ok(())
    }

    /// Submits the queued SQEs (one system call). Page-cache hits usually complete in it.
    pub fn submit(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        loop {
            match ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until at least one request completes (if any is in flight).
    pub fn wait(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        if self.free.len() == self.slots.len() {
            return Ok(());
        }
        match ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Hands every posted completion to `done`, in completion order, and frees its slot.
    /// Short transfers are finished synchronously first.
    pub fn reap(&mut self, mut done: impl FnMut(Finished)) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let mut n = 0;
        for cqe in ring.completion() {
            let Ok(i) = u16::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(usize::from(i)) else {
                continue;
            };
            let ok = match slot.kind {
                Kind::Flush => match cqe.result() {
                    r if r >= 0 => true,
                    r if r == -libc::EINTR || r == -libc::EAGAIN => self.disk.flush().is_ok(),
                    r => {
                        log::debug!(
                            "virtio-blk: flush failed: {}",
                            io::Error::from_raw_os_error(-r)
                        );
                        false
                    }
                },
                Kind::Read | Kind::Write => finish_rw(&self.disk, slot, cqe.result()),
            };
            slot.iovs.clear();
            let written = if ok && slot.kind == Kind::Read {
                slot.len as u32
            } else {
                0
            };
            let transferred = match slot.kind {
                Kind::Read if ok => Some((false, slot.len)),
                Kind::Write if ok => Some((true, slot.len)),
                _ => None,
            };
            done(Finished {
                head: slot.head,
                status: slot.status,
                ok,
                written,
                transferred,
            });
            self.free.push(i);
            n += 1;
        }
        n
    }

    /// Asks the kernel to cancel every request in flight (those already running on a regular
    /// file complete normally; reads waiting for a pipe or a slow device are cancelled).
    fn cancel_all(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut busy = vec![true; self.slots.len()];
        for &i in &self.free {
            busy[usize::from(i)] = false;
        }
        for (i, _) in busy.iter().enumerate().filter(|(_, b)| **b) {
            let sqe = opcode::AsyncCancel::new(i as u64)
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancel SQE carries no buffer.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                let _ = ring.submit();
                // SAFETY: as above.
                if unsafe { ring.submission().push(&sqe) }.is_err() {
                    break;
                }
            }
        }
        let _ = ring.submit();
    }

    /// Cancels and waits for every request in flight, dropping the results. Returns false
    /// (and gives up) when the kernel refuses to wait.
    fn drain(&mut self) -> bool {
        if self.in_flight() > 0 {
            self.cancel_all();
        }
        while self.in_flight() > 0 {
            let Some(ring) = self.ring.as_mut() else {
                return false;
            };
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    log::error!("virtio-blk: cannot wait for requests in flight: {e}");
                    return false;
                }
            }
            for cqe in ring.completion() {
                if let Ok(i) = u16::try_from(cqe.user_data()) {
                    if usize::from(i) < self.slots.len() {
                        self.slots[usize::from(i)].iovs.clear();
                        self.free.push(i);
                    }
                }
            }
        }
        true
    }
}

/// The SQE of a read or write of `iovs` at `offset`: a plain `Read`/`Write` for one buffer
/// (the kernel then imports no iovec array), `Readv`/`Writev` otherwise; naming the registered
/// file 0 when `fixed`.
fn rw_sqe(
    fd: types::Fd,
    fixed: bool,
    write: bool,
    iovs: &[libc::iovec],
    offset: u64,
) -> squeue::Entry {
    // A plain read or write takes a 32-bit length (a segment's always fits).
    let fits = |one: &libc::iovec| u32::try_from(one.iov_len).is_ok();
    macro_rules! on {
        ($target:expr) => {
            match (write, iovs) {
                (false, [one]) if fits(one) => {
                    opcode::Read::new($target, one.iov_base.cast(), one.iov_len as u32)
                        .offset(offset)
                        .build()
                }
                (true, [one]) if fits(one) => {
                    opcode::Write::new($target, one.iov_base.cast(), one.iov_len as u32)
                        .offset(offset)
                        .build()
                }
                (false, _) => opcode::Readv::new($target, iovs.as_ptr(), iovs.len() as u32)
                    .offset(offset)
                    .build(),
                (true, _) => opcode::Writev::new($target, iovs.as_ptr(), iovs.len() as u32)
                    .offset(offset)
                    .build(),
            }
        };
    }
    if fixed {
        on!(types::Fixed(0))
    } else {
        on!(fd)
    }
}

/// Completes a read or write whose CQE said `res`: finishes a short transfer synchronously.
fn finish_rw(disk: &Disk, slot: &mut Slot, res: i32) -> bool {
    let write = slot.kind == Kind::Write;
    let (done, retry) = if res >= 0 {
        (res as u64, true)
    } else if res == -libc::EINTR || res == -libc::EAGAIN {
        (0, true)
    } else {
        log::debug!(
            "virtio-blk: I/O at {} failed: {}",
            slot.offset,
            io::Error::from_raw_os_error(-res)
        );
        (0, false)
    };
    if done == slot.len {
        return true;
    }
    if !retry || done > slot.len {
        return false;
    }
    // Skip what was transferred and do the rest here.
    let mut skip = done as usize;
    let mut at = 0;
    while skip > 0 && at < slot.iovs.len() {
        let v = &mut slot.iovs[at];
        if skip < v.iov_len {
            // SAFETY: stays within the iovec's buffer since `skip < iov_len`.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(skip) }.cast();
            v.iov_len -= skip;
            skip = 0;
        } else {
            skip -= v.iov_len;
            at += 1;
        }
    }
    // SAFETY: the request completed in the ring, so the kernel no longer uses the iovecs; they
    // point into guest memory kept mapped by the ring's `mem` for this call.
    match unsafe { disk.transfer(&mut slot.iovs[at..], slot.offset + done, write) } {
        Ok(n) => done + n == slot.len,
        Err(e) => {
            log::debug!("virtio-blk: I/O at {} failed: {e}", slot.offset);
            false
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if !self.drain() {
            // The kernel may still write into guest memory or read the iovec arrays: keep
            // both (and the ring) alive for good rather than let it touch freed memory.
            std::mem::forget(self.ring.take());
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(self.mem.clone());
        }
    }
}
