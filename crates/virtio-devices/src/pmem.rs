//! virtio-pmem (device type 27, virtio 1.2 section 5.19): a host file mapped into the guest as
//! persistent memory, as Firecracker 1.16 has it.
//!
//! - [`PmemMapping`]: the backing file mapped `MAP_SHARED` (read-only with `PROT_READ`), its
//!   length rounded up to 2 MiB with anonymous memory past the end of the file. The VMM
//!   registers it as a KVM memory slot of its own ([`Pmem::region`]), read-only for a
//!   read-only device: guest loads and stores reach the file's pages directly, and a write
//!   to a read-only region exits to the VMM as an MMIO write, which is dropped.
//! - [`Pmem`]: the [`VirtioDevice`]: its configuration space is `{start: u64, size: u64}`, the
//!   region's guest-physical address and length; its one queue takes `FLUSH` requests (a
//!   4-byte type 0, then a 4-byte device-writable status) answered after an `msync(MS_SYNC)`
//!   of the file's pages, one per batch of requests (every request of a batch gets its
//!   result).
//! - A rate limiter (`vessel_ratelimit`) throttles the flushes as Firecracker's does: each
//!   batch costs one operation and the file's size in bytes; a refused batch stays in the
//!   queue until the limiter's timer fires.
//!
//! The contents live in the host file, never in a snapshot's memory file: a snapshot keeps
//! the region's address and size ([`vessel_virtio::PmemState`]), and a restore maps the same
//! file again at the same place.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vessel_memory::addr::PMEM_ALIGN;
use vessel_memory::GuestMemoryMmap;
use vessel_ratelimit::RateLimiter;
use vessel_virtio::worker::{consume, drain_queue, EventHandler, Worker, WorkerControl};
use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, ActiveQueue,
    DeviceHealth, DeviceState, DeviceStateError, PmemState, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;

/// Size of the request queue (Firecracker's).
pub const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_PMEM_REQ_TYPE_FLUSH`, the only request.
const REQ_TYPE_FLUSH: u32 = 0;
/// The status of a flush: 0 done, -1 (as a little-endian 32-bit value) failed.
const STATUS_OK: u32 = 0;
const STATUS_FAILED: u32 = u32::MAX;
/// Bytes of the request and of the status.
const REQ_LEN: u32 = 4;
/// Bytes of the configuration space: `start` and `size`.
const CONFIG_LEN: u64 = 16;

const KICK_TOKEN: u64 = 0;
const LIMITER_TOKEN: u64 = 1;

/// How to open a pmem device's backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmemParams {
    /// A regular file (or a host block device).
    pub path: PathBuf,
    /// Open and map it read-only; the guest's writes are dropped.
    pub read_only: bool,
}

/// Why a pmem device cannot be created. The texts start as Firecracker's do.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("Error accessing backing file {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Error backing file size is 0: {}", path.display())]
    Empty { path: PathBuf },
    #[error("Error accessing backing file {}: not a regular file or block device", path.display())]
    NotAFile { path: PathBuf },
    #[error("Error accessing backing file {}: {size} bytes is too large", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("cannot map the backing file {}", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Error creating rate limiter")]
    RateLimiter(#[source] io::Error),
}

/// The backing file mapped into the VMM: `len` bytes (the file's size rounded up to 2 MiB)
/// from `ptr`, the file's pages first and anonymous private pages after them. Unmapped when
/// dropped; the VMM keeps the device (and so this) for as long as KVM may map the region.
#[derive(Debug)]
pub struct PmemMapping {
    ptr: *mut libc::c_void,
    len: u64,
    file_len: u64,
    read_only: bool,
    /// Held so the mapping's file stays the one that was opened.
    _file: File,
}

// SAFETY: the mapping is plain memory owned by this value until it is dropped; the pointer is
// never dereferenced through Rust references (the guest and `msync` use it), so sharing it
// between threads aliases nothing.
unsafe impl Send for PmemMapping {}
// SAFETY: as above: `&PmemMapping` only hands out the address and calls `msync`.
unsafe impl Sync for PmemMapping {}

impl PmemMapping {
    /// Opens `path` and maps it (see the type's documentation).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, PmemError> {
        let open_err = |source| PmemError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(PmemError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        // A block device's size is where its end is; a file's too.
        let file_len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if file_len == 0 {
            return Err(PmemError::Empty {
                path: path.to_path_buf(),
            });
        }
        let too_large = || PmemError::TooLarge {
            path: path.to_path_buf(),
            size: file_len,
        };
        let len = file_len
            .checked_next_multiple_of(PMEM_ALIGN)
            .ok_or_else(too_large)?;
        let map_len = usize::try_from(len).map_err(|_| too_large())?;
        let file_map_len = usize::try_from(file_len).map_err(|_| too_large())?;
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        let map_err = |source| PmemError::Map {
            path: path.to_path_buf(),
            source,
        };
        // SAFETY: a new anonymous mapping at an address the kernel chooses; no existing
        // memory is touched. The result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        let mapping = PmemMapping {
            ptr,
            len,
            file_len,
            read_only,
            _file: file,
        };
        // SAFETY: replaces the first `file_map_len` bytes of the anonymous mapping made just
        // above (owned by `mapping`, used by nothing yet) with the file's pages; MAP_FIXED
        // only ever lands inside that mapping. The result is checked; on failure `mapping`'s
        // drop unmaps the whole range.
        let r = unsafe {
            libc::mmap(
                ptr,
                file_map_len,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                mapping._file.as_raw_fd(),
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        Ok(mapping)
    }

    /// Where the mapping is in the VMM's address space.
    pub fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The region's length: the file's size rounded up to 2 MiB.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: an empty file is refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing file's size.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Writes the file's dirty pages back and waits for them (`msync(MS_SYNC)`).
    pub fn flush(&self) -> io::Result<()> {
        // The file part was mapped from a whole number of pages; msync takes that length.
        let len = usize::try_from(self.file_len).map_err(io::Error::other)?;
        // SAFETY: `ptr..ptr + file_len` is the file mapping this value owns; msync reads
        // page state only.
        let r = unsafe { libc::msync(self.ptr, len, libc::MS_SYNC) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for PmemMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the mapping made in `open`, unmapped only here. The VMM
        // drops devices after every vCPU thread has ended, so no guest access follows.
        unsafe {
            libc::munmap(self.ptr, self.len as usize);
        }
    }
}

/// Where the VMM registers a device's region with KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmemRegion {
    /// Guest-physical address (2 MiB aligned).
    pub guest_addr: u64,
    /// Length in bytes (a multiple of 2 MiB).
    pub size: u64,
    /// Address of the mapping in the VMM.
    pub host_addr: u64,
    /// Register it read-only (`KVM_MEM_READONLY`).
    pub read_only: bool,
}

/// Counters of a pmem device, with Firecracker's names (relaxed atomics, cumulative).
#[derive(Debug, Default)]
pub struct PmemStats {
    pub activate_fails: AtomicU64,
    pub cfg_fails: AtomicU64,
    pub event_fails: AtomicU64,
    pub queue_event_count: AtomicU64,
    pub rate_limiter_throttled_events: AtomicU64,
    pub rate_limiter_event_count: AtomicU64,
}

impl PmemStats {
    /// `(name, value)` of every counter, in Firecracker's order.
    pub fn values(&self) -> [(&'static str, u64); 6] {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("activate_fails", l(&self.activate_fails)),
            ("cfg_fails", l(&self.cfg_fails)),
            ("event_fails", l(&self.event_fails)),
            ("queue_event_count", l(&self.queue_event_count)),
            (
                "rate_limiter_throttled_events",
                l(&self.rate_limiter_throttled_events),
            ),
            (
                "rate_limiter_event_count",
                l(&self.rate_limiter_event_count),
            ),
        ]
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the VMM keeps of a running device: its rate limiter (the API's `PATCH /pmem/{id}`)
/// and its counters.
#[derive(Debug, Clone)]
pub struct PmemHandle {
    pub limiter: RateLimiter,
    pub stats: Arc<PmemStats>,
}

/// The virtio-pmem device.
pub struct Pmem {
    mapping: Arc<PmemMapping>,
    /// Guest-physical address of the region (set by the VMM before the device is placed).
    start: u64,
    limiter: RateLimiter,
    stats: Arc<PmemStats>,
    worker: Option<Worker>,
}

impl Pmem {
    /// Opens and maps the backing file. The region has no guest address until
    /// [`Pmem::set_guest_address`].
    pub fn new(params: &PmemParams) -> Result<Pmem, PmemError> {
        let mapping = PmemMapping::open(&params.path, params.read_only)?;
        Ok(Pmem {
            mapping: Arc::new(mapping),
            start: 0,
            limiter: RateLimiter::unlimited().map_err(PmemError::RateLimiter)?,
            stats: Arc::default(),
            worker: None,
        })
    }

    /// Places the region at guest-physical `start` (2 MiB aligned, outside RAM: the VMM's
    /// choice), which the configuration space reports.
    pub fn set_guest_address(&mut self, start: u64) {
        self.start = start;
    }

    /// What the VMM registers with KVM.
    pub fn region(&self) -> PmemRegion {
        PmemRegion {
            guest_addr: self.start,
            size: self.mapping.len(),
            host_addr: self.mapping.host_addr(),
            read_only: self.mapping.read_only(),
        }
    }

    /// The mapping, for whoever must keep it alive as long as KVM maps it.
    pub fn mapping(&self) -> Arc<PmemMapping> {
        self.mapping.clone()
    }

    /// The device's rate limiter (the one its handle updates).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Uses `limiter` instead (one on another clock, for tests); handles taken before keep
    /// the old one.
    pub fn set_rate_limiter(&mut self, limiter: RateLimiter) {
        self.limiter = limiter;
    }

    pub fn handle(&self) -> PmemHandle {
        PmemHandle {
            limiter: self.limiter.clone(),
            stats: self.stats.clone(),
        }
    }

    fn config(&self) -> [u8; CONFIG_LEN as usize] {
        let mut c = [0u8; CONFIG_LEN as usize];
        c[..8].copy_from_slice(&self.start.to_le_bytes());
        c[8..].copy_from_slice(&self.mapping.len().to_le_bytes());
        c
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        device_type::PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if offset.saturating_add(data.len() as u64) > CONFIG_LEN {
            inc(&self.stats.cfg_fails);
        }
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker = None;
        let Some(queue) = ctx.take_queue(0) else {
            inc(&self.stats.activate_fails);
            return Err(ActivateError::MissingQueue(0));
        };
        let first_kick = queue.kick.try_clone().map_err(ActivateError::Worker)?;
        let fds = [
            (queue.kick.as_raw_fd(), KICK_TOKEN, EventSet::IN),
            (self.limiter.as_raw_fd(), LIMITER_TOKEN, EventSet::IN),
        ];
        let handler = PmemHandler {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            health: ctx.health,
            mapping: self.mapping.clone(),
            limiter: self.limiter.clone(),
            stats: self.stats.clone(),
        };
        let worker = Worker::spawn(self.name(), &fds, handler).map_err(|e| {
            inc(&self.stats.activate_fails);
            ActivateError::Worker(e)
        })?;
        self.worker = Some(worker);
        // Serve whatever the driver made available before the kick event was watched.
        first_kick.write(1).map_err(ActivateError::Worker)?;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Dropping the worker stops and joins its thread. A flush is synchronous: nothing is
        // left in flight.
        self.worker = None;
        true
    }

    fn name(&self) -> &'static str {
        "virtio-pmem"
    }

    fn save_device_state(&self) -> DeviceState {
        DeviceState::Pmem(PmemState {
            start: self.start,
            size: self.mapping.len(),
        })
    }

    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Pmem(s) = *state else {
            return Err(DeviceStateError::kind(self.name(), state));
        };
        // The device was rebuilt from the same configuration: the region must be where the
        // driver found it, with the same size (the guest maps it as memory).
        if s.start != self.start || s.size != self.mapping.len() {
            return Err(DeviceStateError::PmemRegion {
                saved_start: s.start,
                saved_size: s.size,
                start: self.start,
                size: self.mapping.len(),
            });
        }
        Ok(())
    }
}

/// The worker's side: the queue, the mapping to flush, the limiter.
struct PmemHandler {
    mem: GuestMemoryMmap,
    queue: ActiveQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    mapping: Arc<PmemMapping>,
    limiter: RateLimiter,
    stats: Arc<PmemStats>,
}

impl PmemHandler {
    /// Whether the driver has made chains available that were not served yet.
    fn has_requests(&self) -> bool {
        let q = &self.queue.queue;
        match q.avail_idx(&self.mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            // A ring outside memory: let `drain_queue` find it and mark the device broken.
            Err(_) => true,
        }
    }

    /// Serves every available request with one flush, if the limiter lets the batch through.
    fn process(&mut self) {
        if self.health.is_broken() || !self.has_requests() {
            return;
        }
        // One batch: one operation, and the file's bytes written back at most.
        if !self.limiter.try_consume(1, self.mapping.file_len()) {
            inc(&self.stats.rate_limiter_throttled_events);
            return;
        }
        let mut result = None;
        let (mem, mapping, stats) = (&self.mem, &self.mapping, &self.stats);
        drain_queue(
            &mut self.queue.queue,
            self.queue.index,
            mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| match serve(mem, chain, || {
                *result.get_or_insert_with(|| match mapping.flush() {
                    Ok(()) => STATUS_OK,
                    Err(e) => {
                        log::warn!("virtio-pmem: cannot write the backing file back: {e}");
                        STATUS_FAILED
                    }
                })
            }) {
                Ok(()) => REQ_LEN,
                Err(e) => {
                    log::warn!("virtio-pmem: {e}");
                    inc(&stats.event_fails);
                    0
                }
            },
        );
    }
}

/// Why a request was refused (answered with nothing written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum RequestError {
    #[error("the request descriptor is device-writable")]
    WriteOnlyRequest,
    #[error("the request descriptor has {0} bytes instead of 4")]
    RequestLength(u32),
    #[error("cannot read the request")]
    ReadRequest,
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("the request has no status descriptor")]
    NoStatus,
    #[error("the status descriptor is not device-writable")]
    ReadOnlyStatus,
    #[error("the status descriptor has {0} bytes instead of 4")]
    StatusLength(u32),
    #[error("cannot write the status")]
    WriteStatus,
}

/// Checks one request (virtio 1.2 section 5.19.6) and writes the status `flush` gives.
fn serve(
    mem: &GuestMemoryMmap,
    mut chain: DescriptorChain<&GuestMemoryMmap>,
    flush: impl FnOnce() -> u32,
) -> Result<(), RequestError> {
    // `DescriptorChain` ends at a descriptor it cannot read: that is a short chain.
    let req = chain.next().ok_or(RequestError::NoStatus)?;
    if req.is_write_only() {
        return Err(RequestError::WriteOnlyRequest);
    }
    if req.len() != REQ_LEN {
        return Err(RequestError::RequestLength(req.len()));
    }
    let kind: u32 = mem
        .read_obj(req.addr())
        .map_err(|_| RequestError::ReadRequest)?;
    let kind = u32::from_le(kind);
    if kind != REQ_TYPE_FLUSH {
        return Err(RequestError::UnknownType(kind));
    }
    let status = chain.next().ok_or(RequestError::NoStatus)?;
    if !status.is_write_only() {
        return Err(RequestError::ReadOnlyStatus);
    }
    if status.len() != REQ_LEN {
        return Err(RequestError::StatusLength(status.len()));
    }
    // No flush for a status nobody can read.
    if !mem.check_range(status.addr(), REQ_LEN as usize) {
        return Err(RequestError::WriteStatus);
    }
    mem.write_obj(flush().to_le(), status.addr())
        .map_err(|_| RequestError::WriteStatus)
}

impl EventHandler for PmemHandler {
    fn handle_event(&mut self, token: u64, _: EventSet, _: &mut WorkerControl) -> io::Result<()> {
        if token == KICK_TOKEN {
            consume(&self.queue.kick);
            inc(&self.stats.queue_event_count);
            if self.limiter.is_blocked() {
                inc(&self.stats.rate_limiter_throttled_events);
                return Ok(());
            }
        } else if token == LIMITER_TOKEN {
            inc(&self.stats.rate_limiter_event_count);
            self.limiter.on_timer();
        }
        self.process();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
