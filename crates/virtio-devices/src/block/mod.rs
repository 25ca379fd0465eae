//! virtio-block (device type 2) backed by a raw image file or a host block device.
//!
//! - [`Block`]: the [`VirtioDevice`]: features, configuration space, activation (one queue of
//!   up to 256 entries served by a worker thread) and reset;
//! - `disk`: the opened image and its operations (vectored I/O, flush, discard, zeroing);
//! - `request`: parsing and checking descriptor chains into requests;
//! - `queue`: serving the queue: batches of requests, vectored I/O done directly between the
//!   file and guest memory (no bounce buffers), completion and interrupts, with either engine
//!   ([`BlockEngine`]): synchronous (merged `preadv`/`pwritev` in the worker thread) or io_uring;
//! - `uring`: the io_uring ring, its in-flight slots and completion eventfd.
//!
//! A rate limiter (`vessel_ratelimit`, one operation per request and the data bytes of
//! reads and writes) is checked before each chain is taken: a refused chain stays in the
//! queue until the limiter's timer, watched by the worker, fires.
//!
//! Every request is finished (data in the page cache, or on disk for `FLUSH`) before its used
//! entry is published. With io_uring, used entries are published in completion order and a
//! reset waits for every request in flight before it returns; a quiesce (for snapshots)
//! waits for them too and publishes their results. Counters for the VMM are in
//! [`BlockStats`].

mod disk;
mod qcow2;
mod queue;
mod request;
#[cfg(test)]
mod tests;
mod uring;

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vessel_ratelimit::RateLimiter;
use vessel_virtio::worker::{consume, EventHandler, Worker, WorkerControl};
use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, InterruptCause,
    VirtioDevice, VirtioInterrupt,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use disk::{Disk, DiskFormat, SERIAL_BYTES};
pub use qcow2::MAX_CHAIN;
#[doc(hidden)]
pub use queue::QueueServer;

/// Bytes per virtio-blk sector (fixed by the specification).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the (single) request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request we announce (`seg_max`): a full queue minus the header
/// and status descriptors (the Linux driver uses indirect descriptors above that anyway).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors per discard or write-zeroes segment (4 GiB - 512).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;
/// Length of the configuration space we serve (up to `write_zeroes_may_unmap` and padding).
const CONFIG_LEN: usize = 60;

/// How to open a block device's backing image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockParams {
    /// A raw or qcow2 image file, or a host block device.
    pub path: PathBuf,
    /// The image's format; `None`: detected from its header.
    pub format: Option<DiskFormat>,
    /// Open read-only and offer `VIRTIO_BLK_F_RO`; writes fail with an I/O error.
    pub read_only: bool,
    /// What `GET_ID` returns (at most 20 bytes); by default one derived from the file's device
    /// and inode numbers.
    pub serial: Option<String>,
    /// How requests are executed.
    pub engine: BlockEngine,
}

/// How a block device executes requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BlockEngine {
    /// io_uring when the host kernel (and seccomp policy) allows it, else synchronous.
    #[default]
    Auto,
    /// io_uring; creating the device fails if the host does not provide it.
    IoUring,
    /// Synchronous vectored I/O in the device's worker thread.
    Sync,
}

/// Why a block device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the disk image {path} is neither a regular file nor a block device")]
    NotAFileOrBlockDevice { path: PathBuf },
    #[error("cannot find the size of the disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("block device serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
    #[error("io_uring is not available on this host")]
    IoUringUnavailable(#[source] io::Error),
    #[error("cannot create the rate limiter's timer")]
    RateLimiter(#[source] io::Error),
    #[error("the qcow2 image {path} cannot be used")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Counters of a block device, shared with the VMM (all relaxed atomics).
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Requests completed (used entries published).
    pub requests: AtomicU64,
    /// Times the worker woke up for a queue kick.
    pub wakeups: AtomicU64,
    /// Interrupts raised for the queue.
    pub interrupts: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Vectored reads/writes issued (fewer than read/write requests when merged).
    pub io_submissions: AtomicU64,
    /// Requests completed with a status other than OK.
    pub errors: AtomicU64,
}

/// A copy of [`BlockStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatsSnapshot {
    pub requests: u64,
    pub wakeups: u64,
    pub interrupts: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub io_submissions: u64,
    pub errors: u64,
}

impl BlockStats {
    pub fn snapshot(&self) -> BlockStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStatsSnapshot {
            requests: l(&self.requests),
            wakeups: l(&self.wakeups),
            interrupts: l(&self.interrupts),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            io_submissions: l(&self.io_submissions),
            errors: l(&self.errors),
        }
    }
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    /// `IoUring` or `Sync`, never `Auto`.
    engine: BlockEngine,
    /// What the configuration asked for (`Auto` falls back to `Sync` if a ring cannot be
    /// created at activation).
    requested: BlockEngine,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    stats: Arc<BlockStats>,
    queue_sizes: [u16; 1],
    worker: Option<Worker>,
    /// The running device's interrupt (for configuration changes through a [`BlockHandle`]).
    interrupt: RunningInterrupt,
    /// Limits the requests taken from the queue (none until configured).
    limiter: RateLimiter,
}

type RunningInterrupt = Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>;

/// The host's side of a block device: cheap to clone, usable from any thread, before and
/// after activation.
#[derive(Clone)]
pub struct BlockHandle {
    disk: Arc<Disk>,
    interrupt: RunningInterrupt,
    limiter: RateLimiter,
    stats: Arc<BlockStats>,
}

impl std::fmt::Debug for BlockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHandle")
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl BlockHandle {
    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Switches the device to another backing file (opened as the current one: read-only or
    /// not), updates the capacity in the configuration space and, if the device is running,
    /// raises a configuration-change interrupt so the driver reads it again. Requests
    /// submitted from now on use the new file. Returns the new capacity in sectors; on error
    /// nothing changed.
    pub fn replace_backing_file(&self, path: &Path) -> Result<u64, BlockError> {
        let new = Disk::open(path, self.disk.read_only(), None, None)?;
        self.disk
            .replace_with(new)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let irq = self
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger(InterruptCause::Config) {
                log::warn!("virtio-blk: cannot raise the config interrupt: {e}");
            }
        }
        Ok(self.capacity())
    }

    /// The device's rate limiter: updates take effect at the next request, also while the
    /// device runs.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The device's counters.
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }
}

impl Block {
    /// Opens the image. Sizes that are not a whole number of sectors are rounded down (with a
    /// warning).
    pub fn new(cfg: BlockParams) -> Result<Block, BlockError> {
        let disk = Disk::open(&cfg.path, cfg.read_only, cfg.serial.as_deref(), cfg.format)?;
        // A qcow2 image's requests need its metadata: they run on the worker, synchronously.
        let engine = match (disk.format(), cfg.engine) {
            (DiskFormat::Qcow2, _) => BlockEngine::Sync,
            (DiskFormat::Raw, engine) => engine,
        };
        let engine = match engine {
            BlockEngine::Sync => BlockEngine::Sync,
            BlockEngine::IoUring => {
                uring::probe().map_err(BlockError::IoUringUnavailable)?;
                BlockEngine::IoUring
            }
            BlockEngine::Auto => match uring::probe() {
                Ok(()) => BlockEngine::IoUring,
                Err(e) => {
                    log::info!(
                        "{}: io_uring unavailable ({e}); using synchronous I/O",
                        cfg.path.display()
                    );
                    BlockEngine::Sync
                }
            },
        };
        let mut avail_features = features::COMMON
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if cfg.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(disk.size() / SECTOR_SIZE).to_le_bytes()); // capacity
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Ok(Block {
            disk: Arc::new(disk),
            engine,
            requested: cfg.engine,
            avail_features,
            config,
            stats: Arc::new(BlockStats::default()),
            queue_sizes: [QUEUE_SIZE],
            worker: None,
            interrupt: Arc::default(),
            limiter: RateLimiter::unlimited().map_err(BlockError::RateLimiter)?,
        })
    }

    /// The device's counters; the VMM may keep this and read it at any time.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// The host's control of this device (backing file swaps).
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            disk: self.disk.clone(),
            interrupt: self.interrupt.clone(),
            limiter: self.limiter.clone(),
            stats: self.stats.clone(),
        }
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

    fn set_interrupt(&self, irq: Option<Arc<dyn VirtioInterrupt>>) {
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = irq;
    }

    /// The engine in use: [`BlockEngine::IoUring`] or [`BlockEngine::Sync`].
    pub fn engine(&self) -> BlockEngine {
        self.engine
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// The serial `GET_ID` returns, NUL-padded.
    pub fn serial(&self) -> &[u8; SERIAL_BYTES] {
        self.disk.serial()
    }

    /// Builds the queue server the worker would run, for driving the device synchronously
    /// (benchmarks, tests): call [`QueueServer::process`] after making buffers available.
    #[doc(hidden)]
    pub fn queue_server(&self, mut ctx: ActivateContext) -> Result<QueueServer, ActivateError> {
        let q = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
        self.server(q.queue, 0, ctx)
    }

    fn server(
        &self,
        queue: virtio_queue::Queue,
        index: u16,
        ctx: ActivateContext,
    ) -> Result<QueueServer, ActivateError> {
        let ring = match self.engine {
            BlockEngine::IoUring => {
                let depth = virtio_queue::QueueT::size(&queue);
                match uring::Uring::new(depth, ctx.mem.clone(), self.disk.clone()) {
                    Ok(r) => Some(r),
                    Err(e) if self.requested == BlockEngine::Auto => {
                        log::warn!(
                            "virtio-blk: cannot create an io_uring ({e}); using synchronous I/O"
                        );
                        None
                    }
                    Err(e) => return Err(ActivateError::Worker(e)),
                }
            }
            _ => None,
        };
        Ok(QueueServer::new(
            queue,
            index,
            ctx.mem,
            ctx.interrupt,
            ctx.health,
            self.disk.clone(),
            self.stats.clone(),
        )
        .with_ring(ring)
        .with_limiter(self.limiter.clone()))
    }
}

/// The worker's event handler: the one queue's kick, the rate limiter's timer and, with
/// io_uring, the completion eventfd.
struct BlockHandler {
    kick: EventFd,
    server: QueueServer,
    limiter: RateLimiter,
}

const KICK_TOKEN: u64 = 0;
const COMPLETION_TOKEN: u64 = 1;
const LIMITER_TOKEN: u64 = 2;

impl EventHandler for BlockHandler {
    fn handle_event(
        &mut self,
        token: u64,
        _events: EventSet,
        _ctl: &mut WorkerControl,
    ) -> io::Result<()> {
        if token == KICK_TOKEN {
            consume(&self.kick);
            self.server.stats().wakeups.fetch_add(1, Ordering::Relaxed);
            self.server.process();
        } else if token == COMPLETION_TOKEN {
            self.server.on_completion_event();
        } else if token == LIMITER_TOKEN {
            self.limiter.on_timer();
            self.server.process();
        }
        Ok(())
    }

    fn quiesce(&mut self) {
        // On the worker thread: its exit would cancel the io_uring requests it submitted.
        self.server.finish_in_flight();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The capacity follows the backing file (see `BlockHandle::replace_backing_file`).
        let mut config = self.config;
        config[..8].copy_from_slice(&self.capacity().to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker = None;
        let q = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
        let kick = q.kick;
        let kick_fd = kick.as_raw_fd();
        let first_kick = kick.try_clone().map_err(ActivateError::Worker)?;
        let irq = ctx.interrupt.clone();
        let server = self.server(q.queue, q.index, ctx)?;
        self.set_interrupt(Some(irq));
        let mut fds = vec![
            (kick_fd, KICK_TOKEN, EventSet::IN),
            (self.limiter.as_raw_fd(), LIMITER_TOKEN, EventSet::IN),
        ];
        if let Some(fd) = server.completion_fd() {
            fds.push((fd, COMPLETION_TOKEN, EventSet::IN));
        }
        let limiter = self.limiter.clone();
        let handler = BlockHandler {
            kick,
            server,
            limiter,
        };
        let worker = Worker::spawn(self.name(), &fds, handler).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        // Serve whatever the driver made available before the kick event was watched.
        first_kick.write(1).map_err(ActivateError::Worker)?;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Dropping the worker stops and joins its thread, which drops the queue server: with
        // io_uring that waits for every request in flight (their results are dropped), so
        // no completion writes into guest memory once this returns.
        self.worker = None;
        self.set_interrupt(None);
        true
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn quiesce(&mut self) -> bool {
        // Unlike a reset, requests in flight are completed and published, not dropped.
        if let Some(mut w) = self.worker.take() {
            // The handler finishes the requests in flight (see `BlockHandler::quiesce`).
            if w.quiesce::<BlockHandler>().is_none() {
                log::warn!("virtio-blk: the worker had stopped before the quiesce");
            }
        }
        // A qcow2 image caches its metadata: write it out, so that a process restoring a
        // snapshot of this VM (or receiving it by migration) reads the image as it is now.
        if self.disk.format() == DiskFormat::Qcow2 {
            // The worker is stopped either way: a failure is reported, not a reason to keep
            // the device half-stopped.
            if let Err(e) = self.disk.flush() {
                log::warn!("virtio-blk: cannot flush the qcow2 image: {e}");
            }
        }
        true
    }
}
