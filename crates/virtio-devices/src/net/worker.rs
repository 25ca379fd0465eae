//! The virtio-net worker: RX (TAP readable → guest receive buffers, merged when negotiated),
//! TX (transmit queue kick → `writev` to the TAP) and the control queue (in `ctrl`); with
//! passt instead of a TAP, the framing of `passt` (in `worker/passt.rs`).
//!
//! Frames never go through an intermediate buffer: each descriptor of a chain is turned into
//! an `iovec` pointing into guest memory and the TAP is read or written with one
//! `readv`/`writev`. When the guest has no receive buffers the TAP is taken out of the epoll
//! set until the driver kicks the receive queue again, so a full guest never busy-loops us.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use vessel_ratelimit::RateLimiter;
use vessel_virtio::worker::{
    consume, drain_queue, next_chain, notify_if_needed, EventHandler, WorkerControl,
};
use vessel_virtio::{ActiveQueue, DeviceHealth, VirtioInterrupt};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::passt::keeper::KeeperControl;
use super::{feature, lock_stream, Backend, PasstStream, VNET_HDR_LEN};

mod buffers;
mod copy;
mod ctrl;
mod mmds;
mod passt;
pub(super) use buffers::read_iovs;
use buffers::{collect_iovs, gather_rx_buffers, write_iovs, Gathered, IoVecs, RxBuffers};
pub(super) use mmds::MmdsPath;

/// Largest frame a guest may send: a 64 KiB GSO frame plus Ethernet/VLAN header and ours.
const MAX_TX_LEN: usize = 65_562 + VNET_HDR_LEN;
/// Receive capacity gathered before reading a frame when GSO frames may arrive.
const RX_GSO_CAPACITY: usize = 65_562 + VNET_HDR_LEN;
/// Receive capacity gathered before reading a frame otherwise (1518-byte VLAN frame).
const RX_MTU_CAPACITY: usize = 1518 + VNET_HDR_LEN;
/// Frames handled per event before going back to epoll (fairness between queues).
const BUDGET: usize = 256;

/// Epoll tokens of the worker's descriptors.
pub(super) struct Tokens;

impl Tokens {
    pub(super) const CTRL: u64 = 1 << 40;
    pub(super) const RX_LIMITER: u64 = (1 << 40) + 1;
    pub(super) const TX_LIMITER: u64 = (1 << 40) + 2;
    /// The passt keeper's control socket (new passt sockets).
    pub(super) const KEEPER: u64 = (1 << 40) + 3;
    pub(super) fn rx_kick(pair: u64) -> u64 {
        4 * pair
    }
    pub(super) fn tx_kick(pair: u64) -> u64 {
        4 * pair + 1
    }
    pub(super) fn tap(pair: u64) -> u64 {
        4 * pair + 2
    }
}

/// One RX/TX queue pair and its TAP queue (or passt).
pub(super) struct QueuePair {
    pub(super) index: u16,
    pub(super) backend: Backend,
    pub(super) rx: Option<ActiveQueue>,
    pub(super) tx: Option<ActiveQueue>,
    /// Whether the TAP is in the epoll set (false while the guest has no receive buffers).
    tap_polled: bool,
    /// Whether the driver uses this pair (multiqueue: `VQ_PAIRS_SET`).
    enabled: bool,
}

impl QueuePair {
    pub(super) fn new(
        index: u16,
        backend: Backend,
        rx: Option<ActiveQueue>,
        tx: Option<ActiveQueue>,
    ) -> Self {
        QueuePair {
            index,
            backend,
            tap_polled: rx.is_some() && index == 0,
            enabled: index == 0,
            rx,
            tx,
        }
    }

    /// Whether the pair is used from the start: only the first, unless the driver of a
    /// restored device had already asked for more with `VQ_PAIRS_SET`.
    pub(super) fn start_enabled(mut self, on: bool) -> Self {
        self.enabled = on;
        self.tap_polled = self.rx.is_some() && on;
        self
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Chains completed with length 0 because they were malformed.
    pub bad_chains: u64,
    /// Frames the TAP refused.
    pub tx_errors: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Rx {
    Delivered,
    TapEmpty,
    NoBuffers,
    Broken,
}

pub(super) struct NetHandler {
    mem: GuestMemoryMmap,
    mrg_rxbuf: bool,
    mq: bool,
    rx_capacity: usize,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    pub(super) pairs: Vec<QueuePair>,
    ctrl: Option<ActiveQueue>,
    iovs: IoVecs,
    /// (head, length, first iovec) of the chains gathered for the frame being received.
    rx_chains: Vec<(u16, usize, usize)>,
    pub(super) stats: NetStats,
    /// MMDS, when the interface has it.
    pub(super) mmds: Option<MmdsPath>,
    /// Rate limiters of the frames received and sent (MMDS frames are not limited).
    pub(super) rx_limiter: Option<RateLimiter>,
    pub(super) tx_limiter: Option<RateLimiter>,
    /// The device's link status (passt: down once passt is gone).
    link_up: Option<Arc<AtomicBool>>,
    /// Whether the frames go to passt, and the link went down since.
    passt: bool,
    passt_down: bool,
    /// The keeper that sends a new passt's socket after one dies (`--net user`).
    keeper: Option<Arc<KeeperControl>>,
    /// Whether the driver reads the link status (`VIRTIO_NET_F_STATUS`).
    status: bool,
}

impl NetHandler {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        acked: u64,
        interrupt: Arc<dyn VirtioInterrupt>,
        health: DeviceHealth,
        pairs: Vec<QueuePair>,
        ctrl: Option<ActiveQueue>,
    ) -> Self {
        let gso = feature::GUEST_TSO4 | feature::GUEST_TSO6 | feature::GUEST_UFO;
        let passt = pairs.iter().any(|p| p.backend.is_passt());
        NetHandler {
            mem,
            mrg_rxbuf: acked & feature::MRG_RXBUF != 0,
            mq: acked & feature::MQ != 0,
            rx_capacity: if acked & gso != 0 {
                RX_GSO_CAPACITY
            } else {
                RX_MTU_CAPACITY
            },
            interrupt,
            health,
            pairs,
            ctrl,
            iovs: IoVecs::new(),
            rx_chains: Vec::new(),
            stats: NetStats::default(),
            mmds: None,
            rx_limiter: None,
            tx_limiter: None,
            link_up: None,
            passt,
            passt_down: false,
            keeper: None,
            status: acked & feature::STATUS != 0,
        }
    }

    /// Keeps the device's link status here (passt takes it down when it goes away).
    pub(super) fn with_link(mut self, link_up: Arc<AtomicBool>) -> Self {
        self.link_up = Some(link_up);
        self
    }

    /// Takes new passt sockets from this keeper (watched as `Tokens::KEEPER`).
    pub(super) fn with_keeper(mut self, keeper: Option<Arc<KeeperControl>>) -> Self {
        self.keeper = keeper;
        self
    }

    /// Rate-limits received and sent frames; a limiter's timer must reach
    /// [`NetHandler::on_limiter_timer`] (the worker watches it as `Tokens::RX_LIMITER` and
    /// `Tokens::TX_LIMITER`).
    pub(super) fn with_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Self {
        self.rx_limiter = Some(rx);
        self.tx_limiter = Some(tx);
        self
    }

    /// A limiter's timer fired: serve what it held back on every pair in use.
    pub(super) fn on_limiter_timer(&mut self, token: u64, ctl: &mut dyn TapPoll) {
        for p in 0..self.pairs.len() {
            if !self.pairs[p].enabled {
                continue;
            }
            if token == Tokens::TX_LIMITER {
                self.process_tx(p);
                continue;
            }
            // The TAP was taken out of the epoll set while receiving was throttled.
            let pair = &mut self.pairs[p];
            if pair.rx.is_some() && !pair.tap_polled {
                ctl.set_tap_polled(&pair.backend, Tokens::tap(u64::from(pair.index)), true);
                pair.tap_polled = true;
            }
            self.process_rx(p, ctl);
        }
    }

    /// Receives one frame from the TAP of pair `p` into the guest's receive buffers.
    fn rx_frame(&mut self, p: usize) -> Rx {
        if self.passt {
            return self.rx_frame_passt(p);
        }
        let mem = &self.mem;
        let pair = &mut self.pairs[p];
        let Some(rxq) = pair.rx.as_mut() else {
            return Rx::TapEmpty;
        };
        let q = &mut rxq.queue;
        let qindex = rxq.index;
        let need = if self.mrg_rxbuf { self.rx_capacity } else { 1 };
        match gather_rx_buffers(
            &mut RxBuffers {
                q,
                qindex,
                mem,
                mrg_rxbuf: self.mrg_rxbuf,
                iovs: &mut self.iovs,
                chains: &mut self.rx_chains,
                bad_chains: &mut self.stats.bad_chains,
                health: &self.health,
            },
            need,
        ) {
            Gathered::Ready(_) => {}
            Gathered::NoBuffers => return Rx::NoBuffers,
            Gathered::Broken => return Rx::Broken,
        };
        let iovs = &mut self.iovs;
        let chains = &mut self.rx_chains;
        // SAFETY: every iovec points into mapped guest memory (see `collect_iovs`) and the
        // count is bounded by `MAX_IOVS`; the result is checked.
        let n = unsafe {
            libc::readv(
                pair.backend.as_raw_fd(),
                iovs.0.as_ptr(),
                iovs.0.len() as libc::c_int,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("virtio-net: reading the TAP: {e}");
            }
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            return Rx::TapEmpty;
        }
        let n = n as usize;
        // Hand the frame out across as many chains as it filled.
        let mut left = n;
        let mut used = 0usize;
        for &(_, len, _) in chains.iter() {
            if left == 0 && used > 0 {
                break;
            }
            left = left.saturating_sub(len);
            used += 1;
        }
        for _ in used..chains.len() {
            q.go_to_previous_position();
        }
        // num_buffers (the last field of virtio_net_hdr_v1): the TAP leaves it alone.
        let first_iov = chains[0].2;
        write_iovs(&iovs.0[first_iov..], 10, &(used as u16).to_le_bytes());
        let mut left = n;
        for &(head, len, _) in &chains[..used] {
            let this = left.min(len);
            left -= this;
            if let Err(e) = q.add_used(mem, head, this as u32) {
                self.health
                    .mark_broken(&format_args!("queue {qindex}: {e}"));
                return Rx::Broken;
            }
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += n.saturating_sub(VNET_HDR_LEN) as u64;
        Rx::Delivered
    }

    /// Moves frames from the TAP of pair `p` to the guest until either runs dry.
    pub(super) fn process_rx(&mut self, p: usize, ctl: &mut dyn TapPoll) {
        if !self.pairs[p].enabled || self.pairs[p].rx.is_none() || self.health.is_broken() {
            return;
        }
        if p == 0 {
            self.mmds_rx();
        }
        let bad_before = self.stats.bad_chains;
        let mut delivered = 0;
        let mut budget = BUDGET;
        while budget > 0 {
            // A frame's size is only known once read: it takes one operation and a byte
            // now, the rest of its bytes (maybe into debt) once received.
            let limiter = self.rx_limiter.as_ref().filter(|l| l.is_limited()).cloned();
            if let Some(l) = &limiter {
                if !l.try_consume(1, 1) {
                    // Stop reading the TAP until the limiter's timer fires.
                    let pair = &mut self.pairs[p];
                    if pair.tap_polled {
                        ctl.set_tap_polled(
                            &pair.backend,
                            Tokens::tap(u64::from(pair.index)),
                            false,
                        );
                        pair.tap_polled = false;
                    }
                    break;
                }
            }
            let bytes_before = self.stats.rx_bytes;
            let got = self.rx_frame(p);
            if let Some(l) = &limiter {
                match got {
                    Rx::Delivered => {
                        l.force_consume(0, (self.stats.rx_bytes - bytes_before).saturating_sub(1))
                    }
                    _ => l.refund(1, 1),
                }
            }
            match got {
                Rx::Delivered => {
                    delivered += 1;
                    budget -= 1;
                }
                Rx::TapEmpty | Rx::Broken => break,
                Rx::NoBuffers => {
                    let pair = &mut self.pairs[p];
                    let Some(rxq) = pair.rx.as_mut() else { break };
                    match enable_notification_past_avail(&mut rxq.queue, &self.mem) {
                        Ok(true) => continue, // the driver added buffers meanwhile
                        Ok(false) => {
                            // Wait for the driver's kick instead of spinning on the TAP.
                            if pair.tap_polled {
                                ctl.set_tap_polled(
                                    &pair.backend,
                                    Tokens::tap(u64::from(pair.index)),
                                    false,
                                );
                                pair.tap_polled = false;
                            }
                            break;
                        }
                        Err(e) => {
                            self.health
                                .mark_broken(&format_args!("queue {}: {e}", rxq.index));
                            break;
                        }
                    }
                }
            }
        }
        if delivered > 0 || self.stats.bad_chains != bad_before {
            if let Some(rxq) = self.pairs[p].rx.as_mut() {
                notify_if_needed(
                    &mut rxq.queue,
                    rxq.index,
                    &self.mem,
                    self.interrupt.as_ref(),
                );
            }
        }
    }

    /// The driver added receive buffers to pair `p`.
    pub(super) fn rx_kick(&mut self, p: usize, ctl: &mut dyn TapPoll) {
        let pair = &mut self.pairs[p];
        let Some(rxq) = pair.rx.as_mut() else { return };
        consume(&rxq.kick);
        if !pair.enabled {
            return;
        }
        if pair.tap_polled {
            // We are not waiting for buffers: spare the driver its kicks.
            let _ = rxq.queue.disable_notification(&self.mem);
        } else {
            ctl.set_tap_polled(&pair.backend, Tokens::tap(u64::from(pair.index)), true);
            pair.tap_polled = true;
        }
        self.process_rx(p, ctl);
    }

    /// Sends every frame the driver queued on pair `p`.
    pub(super) fn process_tx(&mut self, p: usize) {
        if self
            .tx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_limited)
        {
            self.process_tx_limited(p);
            self.mmds_rx();
            return;
        }
        let mem = &self.mem;
        let pair = &mut self.pairs[p];
        let Some(txq) = pair.tx.as_mut() else { return };
        consume(&txq.kick);
        let tap = &pair.backend;
        let iovs = &mut self.iovs;
        let stats = &mut self.stats;
        let mmds = &mut self.mmds;
        drain_queue(
            &mut txq.queue,
            txq.index,
            mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| {
                iovs.0.clear();
                let len = collect_iovs(mem, chain, false, iovs);
                transmit(tap, iovs, len, stats, mmds);
                0
            },
        );
        self.passt_flush(p);
        self.mmds_rx();
    }

    /// `process_tx` under a rate limiter: `drain_queue`'s loop, asking the limiter before
    /// each frame (one operation, its bytes past our header); a refused frame stays in the
    /// queue until the limiter's timer fires.
    fn process_tx_limited(&mut self, p: usize) {
        let mem = &self.mem;
        let pair = &mut self.pairs[p];
        let Some(txq) = pair.tx.as_mut() else { return };
        let Some(limiter) = &self.tx_limiter else {
            return;
        };
        consume(&txq.kick);
        let (q, index, health) = (&mut txq.queue, txq.index, &self.health);
        if health.is_broken() {
            return;
        }
        let mut sent = 0;
        'serve: loop {
            if let Err(e) = q.disable_notification(mem) {
                health.mark_broken(&format_args!("queue {index}: {e}"));
                return;
            }
            loop {
                let chain = match next_chain(q, mem, health, &format_args!("queue {index}")) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => return,
                };
                let head = chain.head_index();
                self.iovs.0.clear();
                let len = collect_iovs(mem, chain, false, &mut self.iovs);
                let bytes = len.map_or(0, |l| l.saturating_sub(VNET_HDR_LEN)) as u64;
                if !limiter.try_consume(1, bytes) {
                    q.go_to_previous_position();
                    break 'serve;
                }
                transmit(
                    &pair.backend,
                    &self.iovs,
                    len,
                    &mut self.stats,
                    &mut self.mmds,
                );
                if let Err(e) = q.add_used(mem, head, 0) {
                    health.mark_broken(&format_args!("queue {index}: {e}"));
                    return;
                }
                sent += 1;
            }
            match q.enable_notification(mem) {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => break,
                Err(e) => {
                    health.mark_broken(&format_args!("queue {index}: {e}"));
                    return;
                }
            }
        }
        if sent > 0 {
            notify_if_needed(q, index, mem, self.interrupt.as_ref());
        }
        self.passt_flush(p);
    }
}

/// Sends one frame of `len` bytes (`None`: a malformed chain) gathered in `iovs` to the TAP
/// (or queues it for passt, without its header), or to MMDS when it is for MMDS.
fn transmit(
    backend: &Backend,
    iovs: &IoVecs,
    len: Option<usize>,
    stats: &mut NetStats,
    mmds: &mut Option<MmdsPath>,
) {
    match len {
        // Frames for MMDS stay here.
        Some(len) if len <= MAX_TX_LEN && mmds.as_mut().is_some_and(|m| m.divert(&iovs.0, len)) => {
        }
        Some(len) if (VNET_HDR_LEN..=MAX_TX_LEN).contains(&len) => {
            let tap = match backend {
                Backend::Tap(tap) => tap,
                Backend::Passt(s) => return passt::transmit(s, iovs, len, stats),
            };
            // SAFETY: the iovecs point into mapped guest memory (see `collect_iovs`), at most
            // `MAX_IOVS` of them; the result is checked.
            let n = unsafe {
                libc::writev(
                    tap.as_raw_fd(),
                    iovs.0.as_ptr(),
                    iovs.0.len() as libc::c_int,
                )
            };
            if n < 0 {
                log::debug!("virtio-net: TAP write: {}", io::Error::last_os_error());
                stats.tx_errors += 1;
            } else {
                stats.tx_frames += 1;
                stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
            }
        }
        _ => stats.bad_chains += 1,
    }
}

/// Asks the driver to notify once it makes buffers available beyond those already there
/// (even those the device looked at and put back because they were not enough). Returns
/// true if the driver added buffers meanwhile.
fn enable_notification_past_avail(
    q: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    let saved = q.next_avail();
    let avail = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    // `enable_notification` publishes (and compares with) the next index to serve: make
    // that the current available index for the call.
    q.set_next_avail(avail.0);
    let r = q.enable_notification(mem);
    q.set_next_avail(saved);
    r
}

/// How the handler starts and stops watching a TAP or passt (the worker's epoll, or a test
/// double).
pub(super) trait TapPoll {
    /// Watches (or stops watching) the backend for frames; passt's socket is also watched
    /// for room to write while it has bytes queued.
    fn set_tap_polled(&mut self, backend: &Backend, token: u64, polled: bool);
    /// Stops watching the backend at all (passt is gone).
    fn forget(&mut self, backend: &Backend);
    /// Watches a backend that is not in the set (passt's new socket) for frames.
    fn watch(&mut self, _backend: &Backend, _token: u64) {}
    /// Stops watching a descriptor (the passt keeper's, once it is gone).
    fn forget_fd(&mut self, _fd: std::os::unix::io::RawFd) {}
}

impl TapPoll for WorkerControl {
    fn set_tap_polled(&mut self, backend: &Backend, token: u64, polled: bool) {
        let mut events = if polled {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        if let Backend::Passt(s) = backend {
            let mut s = lock_stream(s);
            s.out_polled = s.wants_out();
            if s.out_polled {
                events |= EventSet::OUT;
            }
        }
        if let Err(e) = self.modify(backend.as_raw_fd(), token, events) {
            log::warn!("virtio-net: cannot change TAP polling: {e}");
        }
    }

    fn forget(&mut self, backend: &Backend) {
        if let Err(e) = self.remove(backend.as_raw_fd()) {
            log::warn!("virtio-net: cannot stop polling passt: {e}");
        }
    }

    fn watch(&mut self, backend: &Backend, token: u64) {
        if let Err(e) = self.add(backend.as_raw_fd(), token, EventSet::IN) {
            log::warn!("virtio-net: cannot poll the new passt: {e}");
        }
    }

    fn forget_fd(&mut self, fd: std::os::unix::io::RawFd) {
        if let Err(e) = self.remove(fd) {
            log::warn!("virtio-net: cannot stop polling the passt keeper: {e}");
        }
    }
}

impl EventHandler for NetHandler {
    fn handle_event(
        &mut self,
        token: u64,
        events: EventSet,
        ctl: &mut WorkerControl,
    ) -> io::Result<()> {
        if token == Tokens::CTRL {
            self.process_ctrl(ctl);
            return Ok(());
        }
        if token == Tokens::KEEPER {
            self.keeper_event(ctl);
            self.passt_sync(ctl);
            return Ok(());
        }
        if token == Tokens::RX_LIMITER || token == Tokens::TX_LIMITER {
            let l = if token == Tokens::RX_LIMITER {
                &self.rx_limiter
            } else {
                &self.tx_limiter
            };
            if let Some(l) = l {
                l.on_timer();
            }
            self.on_limiter_timer(token, ctl);
            if self.passt {
                self.passt_sync(ctl);
            }
            return Ok(());
        }
        let p = (token / 4) as usize;
        if p >= self.pairs.len() {
            return Ok(());
        }
        match token % 4 {
            0 => self.rx_kick(p, ctl),
            1 => self.process_tx(p),
            2 if self.passt => self.passt_event(p, events, ctl),
            2 => self.process_rx(p, ctl),
            _ => {}
        }
        if self.passt {
            self.passt_sync(ctl);
        }
        Ok(())
    }
}
