//! virtio-balloon (traditional memory balloon, virtio 1.2 section 5.5).
//!
//! Queues, numbered densely over the ones that exist (an optional queue whose feature was
//! not negotiated takes no index, as Linux and the spec number them): inflateq (0),
//! deflateq (1), statsq (with `VIRTIO_BALLOON_F_STATS_VQ`), free_page_vq (with
//! `VIRTIO_BALLOON_F_FREE_PAGE_HINT`, see [`hinting`]), reporting_vq (with
//! `VIRTIO_BALLOON_F_REPORTING`). Inflated pages (4 KiB PFNs), hinted blocks and reported
//! free ranges are dropped from the host with `madvise(MADV_DONTNEED)`;
//! the guest gets zero pages back when it touches them again. `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`
//! is offered on request. The host drives the balloon through a [`BalloonHandle`]: target
//! size (raising a config interrupt), the size the driver reports, and memory statistics.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

mod hinting;
mod pages;

pub use hinting::{HintingError, HintingStatus, CMD_ID_DONE, CMD_ID_STOP};

use hinting::Hinting;
pub(crate) use pages::read_driver_bytes;
use pages::{deflate_chain, inflate_chain, parse_stats, report_chain};
use vessel_memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vessel_virtio::worker::{
    consume, drain_queue, next_chain, notify_if_needed, EventHandler, Worker, WorkerControl,
};
use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, ActiveQueue,
    BalloonState, DeviceHealth, DeviceState, DeviceStateError, InterruptCause, VirtioDevice,
    VirtioInterrupt,
};

/// Balloon feature bits (virtio 1.2 section 5.5.3).
pub mod feature {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    pub const PAGE_POISON: u64 = 1 << 4;
    pub const REPORTING: u64 = 1 << 5;
}

/// Memory statistics tags (virtio 1.2 section 5.5.6.3, plus the later Linux ones).
pub mod stat_tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILLS: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
    pub const ASYNC_SCAN: u16 = 12;
    pub const DIRECT_SCAN: u16 = 13;
    pub const ASYNC_RECLAIM: u16 = 14;
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// Balloon pages are always 4 KiB, whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most PFNs read from one inflate/deflate chain (Linux sends at most 256); the rest of a
/// longer chain is ignored, so a hostile chain cannot stall the worker.
pub const MAX_PFNS_PER_CHAIN: usize = 64 * 1024;
/// The most bytes read from one statistics buffer (a tag/value entry is 10 bytes).
const MAX_STATS_BYTES: usize = 4096;
const STAT_ENTRY_SIZE: usize = 10;

const INFLATEQ: u16 = 0;
const DEFLATEQ: u16 = 1;

const TOKEN_INFLATE: u64 = 0;
const TOKEN_DEFLATE: u64 = 1;
const TOKEN_STATS: u64 = 2;
const TOKEN_REPORTING: u64 = 3;
const TOKEN_STATS_REQUEST: u64 = 4;
const TOKEN_HINTING: u64 = 5;
/// The configuration space: num_pages, actual, free_page_hint_cmd_id.
const CONFIG_SIZE: usize = 12;

/// Which optional features the balloon offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonParams {
    /// Offer the statistics queue (`VIRTIO_BALLOON_F_STATS_VQ`).
    pub stats: bool,
    /// Let the guest deflate on its own under memory pressure (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`).
    pub deflate_on_oom: bool,
    /// Offer free page reporting (`VIRTIO_BALLOON_F_REPORTING`).
    pub free_page_reporting: bool,
    /// Offer free page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`), run by the host.
    pub free_page_hinting: bool,
}

/// The latest memory statistics the driver sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// (tag, value) in the order the driver first sent each tag; a repeated tag keeps its
    /// last value. See [`stat_tag`].
    pub entries: Vec<(u16, u64)>,
    /// Counts updates: 1 for the first statistics the driver sent, 2 for the next...
    pub seq: u64,
}

impl BalloonStats {
    /// The value of `tag`, if the driver sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.entries.iter().find(|e| e.0 == tag).map(|e| e.1)
    }
}

/// What the balloon has done so far (pages are 4 KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages inflated and dropped from the host.
    pub inflated_pages: u64,
    /// Pages the driver took back.
    pub deflated_pages: u64,
    /// Pages (PFNs or reported ranges) outside guest memory, ignored.
    pub invalid_pages: u64,
    /// Pages `madvise` refused to drop.
    pub discard_failures: u64,
    /// Bytes ignored: unreadable or wrong-direction buffers, trailing partial entries, bytes
    /// past the per-chain cap.
    pub malformed_bytes: u64,
    /// Bytes of free memory the driver reported and the host dropped.
    pub reported_bytes: u64,
    /// Bytes of free memory the driver hinted in a hinting run and the host dropped.
    pub hinted_bytes: u64,
    /// Bytes hinted under a run that was over or not the host's current one: kept.
    pub stale_hint_bytes: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Chains served on inflateq.
    pub inflate_chains: u64,
    /// Chains served on deflateq.
    pub deflate_chains: u64,
    /// Free ranges the driver reported.
    pub reported_ranges: u64,
    /// Free blocks the driver hinted in a hinting run.
    pub hinted_ranges: u64,
}

struct State {
    /// The target size in pages (`num_pages`).
    num_pages: u32,
    /// The size the driver says the balloon has (`actual`).
    actual: u32,
    stats: Option<BalloonStats>,
    counters: BalloonCounters,
    hinting: Hinting,
    /// The running device's interrupt, for configuration changes.
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

struct Shared {
    state: Mutex<State>,
    /// Free page hinting is offered.
    hinting: bool,
    /// Written by the host to ask the worker to give the statistics buffer back.
    stats_request: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain counters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the configuration space with `f` and tells the running driver.
    fn change_config<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, irq) = {
            let mut s = self.lock();
            let out = f(&mut s);
            (out, s.interrupt.clone())
        };
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger(InterruptCause::Config) {
                log::warn!("virtio-balloon: cannot raise the config interrupt: {e}");
            }
        }
        out
    }

    /// [`Self::change_config`] on the hinting state, if hinting is offered.
    fn change_hinting(&self, f: impl FnOnce(&mut Hinting)) -> Result<(), HintingError> {
        if !self.hinting {
            return Err(HintingError::NotEnabled);
        }
        self.change_config(|s| f(&mut s.hinting));
        Ok(())
    }
}

/// The host's side of a balloon: cheap to clone, usable from any thread, before and after
/// activation.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    /// Asks the guest to make the balloon `pages` 4 KiB pages big, and tells it through a
    /// config interrupt if the device is running.
    pub fn set_target_pages(&self, pages: u32) {
        self.0.change_config(|s| s.num_pages = pages);
    }

    /// Starts a free page hinting run: the driver hints its free memory, which the host
    /// drops, and holds it until [`Self::stop_hinting`] (at once with `ack_on_stop`).
    pub fn start_hinting(&self, ack_on_stop: bool) -> Result<(), HintingError> {
        self.0.change_hinting(|h| h.start(ack_on_stop))
    }

    /// Ends the hinting run: the driver takes its hinted memory back.
    pub fn stop_hinting(&self) -> Result<(), HintingError> {
        self.0.change_hinting(|h| h.host_cmd = CMD_ID_DONE)
    }

    /// The command ids the host and the driver sent last.
    pub fn hinting_status(&self) -> Result<HintingStatus, HintingError> {
        if !self.0.hinting {
            return Err(HintingError::NotEnabled);
        }
        Ok(self.0.lock().hinting.status())
    }

    /// [`Self::set_target_pages`] in MiB (saturating at 16 TiB).
    pub fn set_target_mib(&self, mib: u64) {
        let pages = mib.saturating_mul(PAGES_PER_MIB).min(u64::from(u32::MAX));
        // Just clamped to the u32 range.
        self.set_target_pages(u32::try_from(pages).unwrap_or(u32::MAX));
    }

    /// The target the host set, in pages.
    pub fn target_pages(&self) -> u32 {
        self.0.lock().num_pages
    }

    /// The balloon size the driver reported, in pages.
    pub fn actual_pages(&self) -> u32 {
        self.0.lock().actual
    }

    /// The balloon size the driver reported, in MiB (rounded down).
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.actual_pages()) / PAGES_PER_MIB
    }

    /// The latest statistics, if the driver sent any.
    pub fn latest_stats(&self) -> Option<BalloonStats> {
        self.0.lock().stats.clone()
    }

    /// Asks the driver for fresh statistics: the statistics buffer the device holds goes back
    /// to the driver, which refills it; [`Self::latest_stats`] then shows a higher `seq`.
    pub fn request_stats(&self) {
        if let Err(e) = self.0.stats_request.write(1) {
            log::warn!("virtio-balloon: cannot signal a statistics request: {e}");
        }
    }

    pub fn counters(&self) -> BalloonCounters {
        self.0.lock().counters
    }
}

/// The virtio memory balloon.
pub struct Balloon {
    avail_features: u64,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    worker: Option<Worker>,
}

impl Balloon {
    pub fn new(config: BalloonParams) -> io::Result<Self> {
        let mut avail_features = features::COMMON;
        let mut queues = 2;
        if config.stats {
            avail_features |= feature::STATS_VQ;
            queues += 1;
        }
        if config.free_page_hinting {
            avail_features |= feature::FREE_PAGE_HINT;
            queues += 1;
        }
        if config.free_page_reporting {
            avail_features |= feature::REPORTING;
            queues += 1;
        }
        if config.deflate_on_oom {
            avail_features |= feature::DEFLATE_ON_OOM;
        }
        Ok(Balloon {
            avail_features,
            queue_sizes: vec![QUEUE_SIZE; queues],
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    num_pages: 0,
                    actual: 0,
                    stats: None,
                    counters: BalloonCounters::default(),
                    hinting: Hinting::idle(0),
                    interrupt: None,
                }),
                hinting: config.free_page_hinting,
                stats_request: EventFd::new(EFD_NONBLOCK)?,
            }),
            worker: None,
        })
    }

    /// The host's control of this balloon.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    /// See [`BalloonHandle::set_target_pages`].
    pub fn set_target_pages(&self, pages: u32) {
        self.handle().set_target_pages(pages);
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let s = self.shared.lock();
        let mut c = [0u8; CONFIG_SIZE];
        c[..4].copy_from_slice(&s.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&s.actual.to_le_bytes());
        c[8..].copy_from_slice(&s.hinting.host_cmd.to_le_bytes());
        c
    }

    /// Stops the worker and forgets the running device's interrupt.
    fn stop(&mut self) {
        self.worker = None;
        self.shared.lock().interrupt = None;
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is writable.
        let mut s = self.shared.lock();
        let mut actual = s.actual.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if (4..8).contains(&at) {
                actual[(at - 4) as usize] = b;
            }
        }
        s.actual = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop();
        let acked = ctx.acked_features & self.avail_features;
        let inflate = ctx
            .take_queue(INFLATEQ)
            .ok_or(ActivateError::MissingQueue(INFLATEQ))?;
        let deflate = ctx
            .take_queue(DEFLATEQ)
            .ok_or(ActivateError::MissingQueue(DEFLATEQ))?;
        let mut next = 2;
        let stats = if acked & feature::STATS_VQ != 0 {
            let q = ctx
                .take_queue(next)
                .ok_or(ActivateError::MissingQueue(next))?;
            next += 1;
            Some(q)
        } else {
            None
        };
        let hinting = if acked & feature::FREE_PAGE_HINT != 0 {
            let q = ctx
                .take_queue(next)
                .ok_or(ActivateError::MissingQueue(next))?;
            next += 1;
            Some(q)
        } else {
            None
        };
        let reporting = if acked & feature::REPORTING != 0 {
            Some(
                ctx.take_queue(next)
                    .ok_or(ActivateError::MissingQueue(next))?,
            )
        } else {
            None
        };

        consume(&self.shared.stats_request);
        let mut fds = vec![
            (inflate.kick.as_raw_fd(), TOKEN_INFLATE, EventSet::IN),
            (deflate.kick.as_raw_fd(), TOKEN_DEFLATE, EventSet::IN),
            (
                self.shared.stats_request.as_raw_fd(),
                TOKEN_STATS_REQUEST,
                EventSet::IN,
            ),
        ];
        if let Some(q) = &stats {
            fds.push((q.kick.as_raw_fd(), TOKEN_STATS, EventSet::IN));
        }
        if let Some(q) = &hinting {
            fds.push((q.kick.as_raw_fd(), TOKEN_HINTING, EventSet::IN));
        }
        if let Some(q) = &reporting {
            fds.push((q.kick.as_raw_fd(), TOKEN_REPORTING, EventSet::IN));
        }
        let handler = BalloonHandler {
            mem: ctx.mem,
            interrupt: ctx.interrupt.clone(),
            health: ctx.health,
            inflate,
            deflate,
            stats,
            hinting,
            reporting,
            held_stats: None,
            shared: self.shared.clone(),
        };
        let worker =
            Worker::spawn("virtio-balloon", &fds, handler).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        self.shared.lock().interrupt = Some(ctx.interrupt);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        // The driver starts over with an empty balloon and no hinting run; the host's target
        // stays.
        let mut s = self.shared.lock();
        s.actual = 0;
        s.hinting = Hinting::idle(s.hinting.last_cmd_id);
        true
    }

    fn name(&self) -> &'static str {
        "virtio-balloon"
    }

    fn quiesce(&mut self) -> bool {
        // The statistics buffer goes back to the driver (length 0), which sends fresh
        // statistics in a new one once the device runs again; the sizes stay.
        if let Some(mut w) = self.worker.take() {
            if let Some(mut h) = w.quiesce::<BalloonHandler>() {
                h.give_back_stats();
            }
        }
        self.shared.lock().interrupt = None;
        true
    }

    fn save_device_state(&self) -> DeviceState {
        let s = self.shared.lock();
        DeviceState::Balloon(BalloonState {
            num_pages: s.num_pages,
            actual: s.actual,
            hint_cmd_id: s.hinting.last_cmd_id,
        })
    }

    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Balloon(BalloonState {
            num_pages,
            actual,
            hint_cmd_id,
        }) = *state
        else {
            return Err(DeviceStateError::kind(self.name(), state));
        };
        let mut s = self.shared.lock();
        s.num_pages = num_pages;
        s.actual = actual;
        // As Firecracker does: a restored VM has no hinting run, and the driver may take
        // back what it held for one.
        s.hinting = Hinting::idle(hint_cmd_id);
        Ok(())
    }
}

/// The queues whose chains carry guest pages, each served the same way (every chain used
/// with length 0 once its pages are handled); only what is done with the pages differs.
#[derive(Debug, Clone, Copy)]
enum PageQueue {
    /// inflateq: PFNs the driver gave up, dropped from the host.
    Inflate,
    /// deflateq: PFNs the driver takes back.
    Deflate,
    /// reporting_vq: free page ranges, dropped from the host.
    Report,
}

impl PageQueue {
    fn serve(
        self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        counters: &mut BalloonCounters,
    ) {
        match self {
            PageQueue::Inflate => inflate_chain(mem, chain, counters),
            PageQueue::Deflate => deflate_chain(mem, chain, counters),
            PageQueue::Report => report_chain(mem, chain, counters),
        }
    }
}

struct BalloonHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    inflate: ActiveQueue,
    deflate: ActiveQueue,
    stats: Option<ActiveQueue>,
    hinting: Option<ActiveQueue>,
    reporting: Option<ActiveQueue>,
    /// The statistics buffer the device keeps until the host wants fresh statistics.
    held_stats: Option<u16>,
    shared: Arc<Shared>,
}

impl EventHandler for BalloonHandler {
    fn handle_event(&mut self, token: u64, _: EventSet, _: &mut WorkerControl) -> io::Result<()> {
        match token {
            TOKEN_INFLATE => self.process_pages(PageQueue::Inflate),
            TOKEN_DEFLATE => self.process_pages(PageQueue::Deflate),
            TOKEN_STATS => self.process_stats(),
            TOKEN_REPORTING => self.process_pages(PageQueue::Report),
            TOKEN_STATS_REQUEST => self.return_stats_buffer(),
            TOKEN_HINTING => self.process_hints(),
            _ => {}
        }
        Ok(())
    }
}

impl BalloonHandler {
    /// Serves every chain the driver made available on one of the page queues.
    fn process_pages(&mut self, kind: PageQueue) {
        let q = match kind {
            PageQueue::Inflate => Some(&mut self.inflate),
            PageQueue::Deflate => Some(&mut self.deflate),
            PageQueue::Report => self.reporting.as_mut(),
        };
        let Some(q) = q else {
            return;
        };
        consume(&q.kick);
        let mem = &self.mem;
        let mut counters = BalloonCounters::default();
        drain_queue(
            &mut q.queue,
            q.index,
            mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| {
                kind.serve(mem, chain, &mut counters);
                0
            },
        );
        self.add_counters(&counters);
    }

    /// Serves free_page_vq; once the driver ends a run and the host asked for it, tells the
    /// driver it may take its hinted memory back.
    fn process_hints(&mut self) {
        let Some(q) = self.hinting.as_mut() else {
            return;
        };
        consume(&q.kick);
        let (mem, shared) = (&self.mem, &self.shared);
        let mut counters = BalloonCounters::default();
        let mut ended = None;
        drain_queue(
            &mut q.queue,
            q.index,
            mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| {
                if let Some(e) = shared.lock().hinting.serve(mem, chain, &mut counters) {
                    ended = Some(e);
                }
                0
            },
        );
        self.add_counters(&counters);
        let ack = ended == Some(true) && {
            let h = &shared.lock().hinting;
            h.ack_on_stop && h.host_cmd > CMD_ID_DONE
        };
        if ack {
            shared.change_config(|s| s.hinting.host_cmd = CMD_ID_DONE);
        }
    }

    /// Takes every statistics buffer the driver made available, keeping the last one.
    fn process_stats(&mut self) {
        let Some(q) = self.stats.as_mut() else {
            return;
        };
        consume(&q.kick);
        let mut returned = false;
        loop {
            if self.health.is_broken() {
                return;
            }
            let Ok(chain) = next_chain(&mut q.queue, &self.mem, &self.health, &"statsq") else {
                return;
            };
            let Some(chain) = chain else {
                match q.queue.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.health.mark_broken(&format_args!("statsq: {e}"));
                        return;
                    }
                }
            };
            let head = chain.head_index();
            let (entries, malformed) = parse_stats(chain);
            {
                let mut s = self.shared.lock();
                s.counters.stats_updates += 1;
                s.counters.malformed_bytes += malformed;
                let seq = s.counters.stats_updates;
                s.stats = Some(BalloonStats { entries, seq });
            }
            // A driver that sends a second buffer gets the first one back.
            if let Some(old) = self.held_stats.replace(head) {
                if let Err(e) = q.queue.add_used(&self.mem, old, 0) {
                    self.health.mark_broken(&format_args!("statsq: {e}"));
                    return;
                }
                returned = true;
            }
        }
        if returned {
            notify_if_needed(&mut q.queue, q.index, &self.mem, self.interrupt.as_ref());
        }
    }

    /// Gives the held statistics buffer back so that the driver refills it.
    fn return_stats_buffer(&mut self) {
        consume(&self.shared.stats_request);
        self.give_back_stats();
    }

    fn give_back_stats(&mut self) {
        let Some(q) = self.stats.as_mut() else {
            return;
        };
        if self.health.is_broken() {
            return;
        }
        let Some(head) = self.held_stats.take() else {
            // The driver has not sent statistics yet; when it does, they are fresh.
            return;
        };
        if let Err(e) = q.queue.add_used(&self.mem, head, 0) {
            self.health.mark_broken(&format_args!("statsq: {e}"));
            return;
        }
        notify_if_needed(&mut q.queue, q.index, &self.mem, self.interrupt.as_ref());
    }

    fn add_counters(&self, c: &BalloonCounters) {
        let mut s = self.shared.lock();
        let t = &mut s.counters;
        t.inflated_pages += c.inflated_pages;
        t.deflated_pages += c.deflated_pages;
        t.invalid_pages += c.invalid_pages;
        t.discard_failures += c.discard_failures;
        t.malformed_bytes += c.malformed_bytes;
        t.reported_bytes += c.reported_bytes;
        t.hinted_bytes += c.hinted_bytes;
        t.stale_hint_bytes += c.stale_hint_bytes;
        t.inflate_chains += c.inflate_chains;
        t.deflate_chains += c.deflate_chains;
        t.reported_ranges += c.reported_ranges;
        t.hinted_ranges += c.hinted_ranges;
    }
}

#[cfg(test)]
mod tests {
    use super::pages::{discard_range, Discarded};
    use super::*;
    use crate::rng::testing::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;

    fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
        pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    fn pattern(m: &GuestMemoryMmap, pfn: u64, byte: u8) {
        m.write_slice(&[byte; PAGE_SIZE as usize], GuestAddress(pfn << PAGE_SHIFT))
            .unwrap();
    }

    fn page(m: &GuestMemoryMmap, pfn: u64) -> Vec<u8> {
        read_bytes(m, pfn << PAGE_SHIFT, PAGE_SIZE as usize)
    }

    fn run_one(
        m: &GuestMemoryMmap,
        bufs: &[Buf],
        f: impl FnOnce(DescriptorChain<&GuestMemoryMmap>, &mut BalloonCounters),
    ) -> BalloonCounters {
        let vq = MockSplitQueue::new(m, 16);
        add_chain(&vq, 0, bufs);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(m).unwrap().next().unwrap();
        let mut c = BalloonCounters::default();
        f(chain, &mut c);
        c
    }

    #[test]
    fn inflate_drops_pages() {
        let m = mem();
        for pfn in 0x90..0x94 {
            pattern(&m, pfn, 0xab);
        }
        // 0x90, 0x91 (a run), 0x93 and one PFN far outside memory, then 2 stray bytes.
        let mut list = pfn_bytes(&[0x90, 0x91, 0x93, 0x10_0000]);
        list.extend_from_slice(&[1, 2]);
        m.write_slice(&list, GuestAddress(0x8_0000)).unwrap();
        let c = run_one(&m, &[(0x8_0000, list.len() as u32, false)], |ch, c| {
            inflate_chain(&m, ch, c)
        });
        assert_eq!(page(&m, 0x90), vec![0; 4096]);
        assert_eq!(page(&m, 0x91), vec![0; 4096]);
        assert_eq!(page(&m, 0x93), vec![0; 4096]);
        // Not in the list: untouched.
        assert_eq!(page(&m, 0x92), vec![0xab; 4096]);
        assert_eq!(c.inflated_pages, 3);
        assert_eq!(c.invalid_pages, 1);
        assert_eq!(c.malformed_bytes, 2);
    }

    #[test]
    fn pfns_split_across_buffers() {
        let m = mem();
        pattern(&m, 0xa0, 0x11);
        pattern(&m, 0xa1, 0x22);
        pattern(&m, 0xa2, 0x33);
        let list = pfn_bytes(&[0xa0, 0xa2]);
        // The first PFN split 3 + 1 + 4 across buffers, with a writable buffer in between
        // (wrong direction: ignored).
        m.write_slice(&list[..3], GuestAddress(0x8_0000)).unwrap();
        m.write_slice(&list[3..], GuestAddress(0x8_1000)).unwrap();
        let c = run_one(
            &m,
            &[
                (0x8_0000, 3, false),
                (0x8_2000, 16, true),
                (0x8_1000, 5, false),
            ],
            |ch, c| inflate_chain(&m, ch, c),
        );
        assert_eq!(page(&m, 0xa0), vec![0; 4096]);
        assert_eq!(page(&m, 0xa1), vec![0x22; 4096]);
        assert_eq!(page(&m, 0xa2), vec![0; 4096]);
        assert_eq!(c.inflated_pages, 2);
        assert_eq!(c.malformed_bytes, 16);
    }

    #[test]
    fn hostile_pfn_lists() {
        let m = mem();
        pattern(&m, 0xf0, 0x5a);
        // A list outside memory, one that runs past its end with a u32::MAX length, and one
        // at the top of the address space: nothing is read, nothing dropped.
        for bufs in [
            [(0x20_0000u64, 8u32, false)],
            [(0xf_0000, u32::MAX, false)],
            [(u64::MAX - 3, 8, false)],
        ] {
            let c = run_one(&m, &bufs, |ch, c| inflate_chain(&m, ch, c));
            assert_eq!(c.inflated_pages, 0);
            assert!(c.malformed_bytes > 0);
        }
        assert_eq!(page(&m, 0xf0), vec![0x5a; 4096]);
        // The largest PFN: outside memory.
        m.write_slice(&pfn_bytes(&[u32::MAX]), GuestAddress(0x8_0000))
            .unwrap();
        let c = run_one(&m, &[(0x8_0000, 4, false)], |ch, c| {
            inflate_chain(&m, ch, c)
        });
        assert_eq!((c.inflated_pages, c.invalid_pages), (0, 1));
        let c = run_one(&m, &[(0x8_0000, 4, false)], |ch, c| {
            deflate_chain(&m, ch, c)
        });
        assert_eq!((c.deflated_pages, c.invalid_pages), (0, 1));
    }

    #[test]
    fn pfn_list_is_capped() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        pattern(&m, 0x7ff, 0x77);
        // MAX_PFNS_PER_CHAIN PFNs of page 0x400, then PFN 0x7ff past the cap.
        let mut list = pfn_bytes(&vec![0x400; MAX_PFNS_PER_CHAIN]);
        list.extend(pfn_bytes(&[0x7ff]));
        m.write_slice(&list, GuestAddress(0x10_0000)).unwrap();
        let c = run_one(&m, &[(0x10_0000, list.len() as u32, false)], |ch, c| {
            inflate_chain(&m, ch, c)
        });
        assert_eq!(c.malformed_bytes, 4);
        assert_eq!(page(&m, 0x7ff), vec![0x77; 4096]);
    }

    #[test]
    fn discard_range_across_regions_and_holes() {
        // Two regions with a hole between them.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        m.write_slice(&[0xcc; 0x2000], GuestAddress(0xf_e000))
            .unwrap();
        m.write_slice(&[0xdd; 0x2000], GuestAddress(0x20_0000))
            .unwrap();
        // The last page of the first region, the hole, the first page of the second.
        let d = discard_range(&m, 0xf_f000, 0x10_2000);
        assert_eq!(
            d,
            Discarded {
                done: 0x2000,
                outside: 0x10_0000,
                failed: 0
            }
        );
        assert_eq!(read_bytes(&m, 0xf_e000, 0x1000), vec![0xcc; 0x1000]);
        assert_eq!(read_bytes(&m, 0xf_f000, 0x1000), vec![0; 0x1000]);
        assert_eq!(read_bytes(&m, 0x20_0000, 0x1000), vec![0; 0x1000]);
        assert_eq!(read_bytes(&m, 0x20_1000, 0x1000), vec![0xdd; 0x1000]);
        // Overflowing the address space.
        let d = discard_range(&m, !0xfff, 0x10_0000);
        assert_eq!(d.done, 0);
        assert_eq!(d.outside, 0x10_0000);
    }

    #[test]
    fn stats_parsing() {
        let m = mem();
        let mut buf = Vec::new();
        for (tag, val) in [
            (stat_tag::MEMFREE, 1u64 << 30),
            (stat_tag::MEMTOT, 2 << 30),
            (stat_tag::MEMFREE, 12345),
            (99, 7),
        ] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&val.to_le_bytes());
        }
        buf.extend_from_slice(&[9, 9, 9]); // a partial entry
        m.write_slice(&buf, GuestAddress(0x8_0000)).unwrap();
        // Split across two buffers in the middle of an entry.
        let vq = MockSplitQueue::new(&m, 16);
        add_chain(
            &vq,
            0,
            &[
                (0x8_0000, 15, false),
                (0x8_000f, buf.len() as u32 - 15, false),
            ],
        );
        let mut q: Queue = vq.create_queue().unwrap();
        let (entries, ignored) = parse_stats(q.iter(&m).unwrap().next().unwrap());
        assert_eq!(
            entries,
            vec![
                (stat_tag::MEMFREE, 12345),
                (stat_tag::MEMTOT, 2 << 30),
                (99, 7)
            ]
        );
        assert_eq!(ignored, 3);
    }

    #[test]
    fn reporting_drops_whole_pages_only() {
        let m = mem();
        for pfn in 0xb0..0xb4 {
            pattern(&m, pfn, 0x42);
        }
        // 0xb0_800..0xb3_800: only pages 0xb1 and 0xb2 are whole. A readable buffer and one
        // outside memory are ignored.
        let c = run_one(
            &m,
            &[
                (0xb_0000, 0x1000, false),
                (0xb_0800, 0x3000, true),
                (0x40_0000, 0x2000, true),
            ],
            |ch, c| report_chain(&m, ch, c),
        );
        assert_eq!(page(&m, 0xb0), vec![0x42; 4096]);
        assert_eq!(page(&m, 0xb1), vec![0; 4096]);
        assert_eq!(page(&m, 0xb2), vec![0; 4096]);
        assert_eq!(page(&m, 0xb3), vec![0x42; 4096]);
        assert_eq!(c.reported_bytes, 0x2000);
        assert_eq!(c.malformed_bytes, 0x1000);
        assert_eq!(c.invalid_pages, 2);
    }

    #[test]
    fn config_space() {
        let mut b = Balloon::new(BalloonParams::default()).unwrap();
        let h = b.handle();
        h.set_target_mib(3);
        let mut d = [0u8; 8];
        b.read_config(0, &mut d);
        assert_eq!(d[..4], (3u32 * 256).to_le_bytes());
        // The driver writes `actual`; `num_pages` is read-only.
        b.write_config(0, &[0xff; 4]);
        b.write_config(4, &512u32.to_le_bytes());
        assert_eq!(h.actual_pages(), 512);
        assert_eq!(h.actual_mib(), 2);
        assert_eq!(h.target_pages(), 768);
        // Byte writes and writes past the end.
        b.write_config(7, &[1]);
        b.write_config(u64::MAX, &[1, 2]);
        assert_eq!(h.actual_pages(), 512 | (1 << 24));
        h.set_target_mib(u64::MAX);
        assert_eq!(h.target_pages(), u32::MAX);
    }

    #[test]
    fn features_and_queue_count() {
        let b = Balloon::new(BalloonParams::default()).unwrap();
        assert_eq!(b.queue_max_sizes().len(), 2);
        assert_eq!(b.avail_features() & 0xff, 0);
        let b = Balloon::new(BalloonParams {
            stats: true,
            deflate_on_oom: true,
            free_page_reporting: true,
            free_page_hinting: false,
        })
        .unwrap();
        assert_eq!(b.queue_max_sizes().len(), 4);
        assert_eq!(
            b.avail_features() & 0xff,
            feature::STATS_VQ | feature::DEFLATE_ON_OOM | feature::REPORTING
        );
    }

    struct Running<'a> {
        vqs: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
        kicks: Vec<EventFd>,
        irq: Arc<CountingInterrupt>,
        dev: Balloon,
    }

    fn start(m: &GuestMemoryMmap, cfg: BalloonParams, acked: u64, queues: u16) -> Running<'_> {
        let vqs: Vec<_> = (0..queues)
            .map(|i| MockSplitQueue::create(m, queue_base(i), 16))
            .collect();
        let aqs: Vec<_> = vqs
            .iter()
            .enumerate()
            .map(|(i, vq)| active_queue(vq, i as u16))
            .collect();
        let kicks = aqs.iter().map(|q| q.kick.try_clone().unwrap()).collect();
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev = Balloon::new(cfg).unwrap();
        dev.activate(context(m, acked, aqs, &irq)).unwrap();
        Running {
            vqs,
            kicks,
            irq,
            dev,
        }
    }

    #[test]
    fn running_balloon_inflates_and_reports_stats() {
        let m = mem();
        let cfg = BalloonParams {
            stats: true,
            deflate_on_oom: false,
            free_page_reporting: true,
            free_page_hinting: false,
        };
        let acked = features::COMMON | feature::STATS_VQ | feature::REPORTING;
        let mut r = start(&m, cfg, acked, 4);
        let h = r.dev.handle();

        // The host sets a target: config interrupt.
        h.set_target_mib(1);
        assert_eq!(r.irq.count(InterruptCause::Config), 1);

        // Inflate one page.
        pattern(&m, 0x90, 0xab);
        m.write_slice(&pfn_bytes(&[0x90]), GuestAddress(0x8_0000))
            .unwrap();
        add_chain(&r.vqs[0], 0, &[(0x8_0000, 4, false)]);
        r.kicks[0].write(1).unwrap();
        wait_until("inflate", || r.vqs[0].used().idx().load() == 1);
        assert_eq!(page(&m, 0x90), vec![0; 4096]);
        assert_eq!(h.counters().inflated_pages, 1);

        // Deflate it.
        add_chain(&r.vqs[1], 0, &[(0x8_0000, 4, false)]);
        r.kicks[1].write(1).unwrap();
        wait_until("deflate", || r.vqs[1].used().idx().load() == 1);
        assert_eq!(h.counters().deflated_pages, 1);

        // Statistics: kept, not returned, until the host asks.
        let mut st = Vec::new();
        st.extend_from_slice(&stat_tag::MEMFREE.to_le_bytes());
        st.extend_from_slice(&4096u64.to_le_bytes());
        m.write_slice(&st, GuestAddress(0x8_1000)).unwrap();
        add_chain(&r.vqs[2], 0, &[(0x8_1000, 10, false)]);
        r.kicks[2].write(1).unwrap();
        wait_until("stats", || h.latest_stats().is_some());
        let s = h.latest_stats().unwrap();
        assert_eq!((s.get(stat_tag::MEMFREE), s.seq), (Some(4096), 1));
        assert_eq!(r.vqs[2].used().idx().load(), 0);
        h.request_stats();
        wait_until("stats buffer back", || r.vqs[2].used().idx().load() == 1);
        assert_eq!(used(&r.vqs[2]), vec![(0, 0)]);
        // The driver refills it.
        m.write_slice(&8192u64.to_le_bytes(), GuestAddress(0x8_1002))
            .unwrap();
        add_chain(&r.vqs[2], 0, &[(0x8_1000, 10, false)]);
        r.kicks[2].write(1).unwrap();
        wait_until("fresh stats", || {
            h.latest_stats().is_some_and(|s| s.seq == 2)
        });
        assert_eq!(h.latest_stats().unwrap().get(stat_tag::MEMFREE), Some(8192));

        // Free page reporting on queue 3.
        pattern(&m, 0xc0, 0x99);
        add_chain(&r.vqs[3], 0, &[(0xc_0000, 0x1000, true)]);
        r.kicks[3].write(1).unwrap();
        wait_until("report", || r.vqs[3].used().idx().load() == 1);
        assert_eq!(page(&m, 0xc0), vec![0; 4096]);
        assert_eq!(h.counters().reported_bytes, 0x1000);

        // Reset: the worker stops, the target stays, no more interrupts.
        r.dev.write_config(4, &7u32.to_le_bytes());
        assert!(r.dev.reset());
        assert!(r.dev.worker.is_none());
        assert_eq!(h.actual_pages(), 0);
        h.set_target_mib(2);
        assert_eq!(r.irq.count(InterruptCause::Config), 1);
        assert_eq!(h.target_pages(), 512);
    }

    #[test]
    fn reporting_queue_follows_absent_stats_queue() {
        let m = mem();
        let cfg = BalloonParams {
            stats: true,
            deflate_on_oom: false,
            free_page_reporting: true,
            free_page_hinting: false,
        };
        // The driver did not take the statistics queue: reporting is queue 2.
        let acked = features::COMMON | feature::REPORTING;
        let r = start(&m, cfg, acked, 3);
        pattern(&m, 0xc0, 0x99);
        add_chain(&r.vqs[2], 0, &[(0xc_0000, 0x1000, true)]);
        r.kicks[2].write(1).unwrap();
        wait_until("report", || r.vqs[2].used().idx().load() == 1);
        assert_eq!(page(&m, 0xc0), vec![0; 4096]);
        assert!(r.dev.handle().latest_stats().is_none());
    }

    #[test]
    fn a_hinting_run_drops_hinted_memory_and_acknowledges_the_drivers_stop() {
        let m = mem();
        let cfg = BalloonParams {
            stats: false,
            deflate_on_oom: false,
            free_page_reporting: true,
            free_page_hinting: true,
        };
        let b = Balloon::new(cfg).unwrap();
        assert_eq!(b.queue_max_sizes().len(), 4);
        // free_page_vq is queue 2 (no statistics queue), reporting_vq queue 3.
        let acked = features::COMMON | feature::FREE_PAGE_HINT | feature::REPORTING;
        let r = start(&m, cfg, acked, 4);
        let h = r.dev.handle();
        let idle = HintingStatus {
            host_cmd: CMD_ID_STOP,
            guest_cmd: None,
        };
        assert_eq!(h.hinting_status(), Ok(idle));
        h.start_hinting(true).unwrap();
        assert_eq!(r.irq.count(InterruptCause::Config), 1);
        let mut id = [0u8; 4];
        r.dev.read_config(8, &mut id);
        assert_eq!(u32::from_le_bytes(id), 2);
        // The driver takes the run, hints a page, then says it has no more.
        pattern(&m, 0xc0, 0x99);
        m.write_slice(&2u32.to_le_bytes(), GuestAddress(0x8_0000))
            .unwrap();
        m.write_slice(&CMD_ID_STOP.to_le_bytes(), GuestAddress(0x8_0010))
            .unwrap();
        let chains: [Buf; 3] = [
            (0x8_0000, 4, false),
            (0xc_0000, 0x1000, true),
            (0x8_0010, 4, false),
        ];
        for (i, buf) in chains.iter().enumerate() {
            add_chain(&r.vqs[2], i as u16, &[*buf]);
            r.kicks[2].write(1).unwrap();
            wait_until("hint", || {
                usize::from(r.vqs[2].used().idx().load()) == i + 1
            });
        }
        assert_eq!(page(&m, 0xc0), vec![0; 4096]);
        assert_eq!(h.counters().hinted_bytes, 0x1000);
        // acknowledge_on_stop: the driver may take its memory back.
        wait_until("done", || {
            h.hinting_status().is_ok_and(|s| s.host_cmd == CMD_ID_DONE)
        });
        assert_eq!(h.hinting_status().unwrap().guest_cmd, Some(CMD_ID_STOP));
        assert_eq!(r.irq.count(InterruptCause::Config), 2);
        // Reporting still works on the queue after it.
        pattern(&m, 0xd0, 0x77);
        add_chain(&r.vqs[3], 0, &[(0xd_0000, 0x1000, true)]);
        r.kicks[3].write(1).unwrap();
        wait_until("report", || r.vqs[3].used().idx().load() == 1);
        assert_eq!(h.counters().reported_bytes, 0x1000);

        // A restored device has no run; its next run follows the saved one.
        let mut restored = Balloon::new(cfg).unwrap();
        restored
            .restore_device_state(&r.dev.save_device_state())
            .unwrap();
        let h2 = restored.handle();
        assert_eq!(h2.hinting_status(), Ok(idle));
        h2.start_hinting(false).unwrap();
        assert_eq!(h2.hinting_status().unwrap().host_cmd, 3);
        h2.stop_hinting().unwrap();
        assert_eq!(h2.hinting_status().unwrap().host_cmd, CMD_ID_DONE);
        // Without hinting offered, every request is refused.
        let plain = Balloon::new(BalloonParams::default()).unwrap().handle();
        assert_eq!(plain.start_hinting(true), Err(HintingError::NotEnabled));
        assert_eq!(plain.stop_hinting(), Err(HintingError::NotEnabled));
        assert_eq!(plain.hinting_status(), Err(HintingError::NotEnabled));
    }

    #[test]
    fn missing_queues_fail_activation() {
        let m = mem();
        let irq = Arc::new(CountingInterrupt::default());
        let vq = MockSplitQueue::new(&m, 16);
        let mut dev = Balloon::new(BalloonParams {
            stats: true,
            ..Default::default()
        })
        .unwrap();
        let qs = vec![active_queue(&vq, 0), active_queue(&vq, 1)];
        assert!(matches!(
            dev.activate(context(&m, feature::STATS_VQ, qs, &irq)),
            Err(ActivateError::MissingQueue(2))
        ));
        assert!(matches!(
            dev.activate(context(&m, 0, vec![], &irq)),
            Err(ActivateError::MissingQueue(0))
        ));
    }
}
