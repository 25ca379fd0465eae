//! virtio-net (device type 1) backed by a TAP interface: one TAP queue (file descriptor) per
//! virtqueue pair, frames moved with `readv`/`writev` straight between the TAP and guest
//! memory (the 12-byte `virtio_net_hdr_v1` is shared with the TAP's `IFF_VNET_HDR`), merged
//! receive buffers, checksum/TSO offloads, and a control queue for multiqueue. Or backed by
//! passt (user-mode networking, one queue pair, no offloads), see [`passt`].
//!
//! - [`tap`]: opening `/dev/net/tun` and the TAP ioctls;
//! - [`passt`]: the passt stream protocol and the passt process Vessel may start;
//! - `worker`: the queue processing (RX, TX, control queue) in the device's worker thread,
//!   and the MMDS detour (`worker/mmds.rs`) for interfaces that serve it.
//!
//! Receive and transmit rate limiters (`vessel_ratelimit`, shared by every queue pair; a
//! [`NetHandle`] updates them while the device runs): a refused transmit frame stays in its
//! queue and the TAP is not read until the limiter's timer fires.

pub mod passt;
pub mod tap;
mod worker;

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vessel_ratelimit::RateLimiter;
use vessel_virtio::worker::Worker;
use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, DeviceState,
    DeviceStateError, NetState, VirtioDevice,
};
use virtio_bindings::virtio_net as vn;
use vmm_sys_util::epoll::EventSet;

pub use passt::{PasstError, PasstProcess, PasstStream};
pub use tap::{Tap, TapError};

use worker::{MmdsPath, NetHandler, QueuePair, Tokens};

/// Size of the header in front of every frame (`virtio_net_hdr_v1`, `num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;
/// Size of each virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// Most queue pairs a device may have (one TAP queue each).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// Feature bits of virtio-net (section 5.1.3).
pub mod feature {
    use super::vn;
    pub const CSUM: u64 = 1 << vn::VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
    pub const MAC: u64 = 1 << vn::VIRTIO_NET_F_MAC;
    pub const GUEST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
    pub const GUEST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO6;
    pub const GUEST_ECN: u64 = 1 << vn::VIRTIO_NET_F_GUEST_ECN;
    pub const GUEST_UFO: u64 = 1 << vn::VIRTIO_NET_F_GUEST_UFO;
    pub const HOST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO4;
    pub const HOST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO6;
    pub const HOST_ECN: u64 = 1 << vn::VIRTIO_NET_F_HOST_ECN;
    pub const HOST_UFO: u64 = 1 << vn::VIRTIO_NET_F_HOST_UFO;
    pub const MRG_RXBUF: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;
    pub const STATUS: u64 = 1 << vn::VIRTIO_NET_F_STATUS;
    pub const CTRL_VQ: u64 = 1 << vn::VIRTIO_NET_F_CTRL_VQ;
    pub const MQ: u64 = 1 << vn::VIRTIO_NET_F_MQ;
}

/// What to build a virtio-net device from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetParams {
    /// TAP interface name (attached to if it exists, created otherwise).
    pub tap: String,
    /// Guest MAC address; a random locally administered one when absent.
    pub mac: Option<[u8; 6]>,
    /// Number of RX/TX queue pairs (1 to [`MAX_QUEUE_PAIRS`]).
    pub queue_pairs: u16,
}

/// Where a passt-backed device finds passt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasstSource {
    /// Start passt (it exits when the device is dropped), with these `-t` port forwards
    /// (`HOSTPORT:GUESTPORT`).
    Spawn { tcp_forwards: Vec<String> },
    /// Connect to a passt started with `passt --socket PATH`.
    Socket(PathBuf),
}

/// Where a device's frames go: a TAP queue, or the stream to passt.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Tap(Arc<Tap>),
    Passt(Arc<Mutex<PasstStream>>),
}

impl Backend {
    pub(crate) fn is_passt(&self) -> bool {
        matches!(self, Backend::Passt(_))
    }

    /// Enables or disables a TAP queue (passt has only one).
    pub(crate) fn set_queue_enabled(&self, on: bool) -> Result<(), TapError> {
        match self {
            Backend::Tap(t) => t.set_queue_enabled(on),
            Backend::Passt(_) => Ok(()),
        }
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Backend::Tap(t) => t.as_raw_fd(),
            Backend::Passt(s) => lock_stream(s).as_raw_fd(),
        }
    }
}

/// The stream to passt, also after a panic while it was held (its state stays consistent:
/// every update is a few plain assignments).
pub(crate) fn lock_stream(s: &Mutex<PasstStream>) -> MutexGuard<'_, PasstStream> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a virtio-net device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Passt(#[from] PasstError),
    #[error("queue_pairs must be between 1 and {MAX_QUEUE_PAIRS}, not {0}")]
    QueuePairs(u16),
    #[error("MAC {0:02x?} is a multicast address")]
    MulticastMac([u8; 6]),
    #[error("cannot create a rate limiter's timer")]
    RateLimiter(#[source] std::io::Error),
}

/// A random, unicast, locally administered MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: writes at most `mac.len()` bytes into `mac`; the result is checked below.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // Fall back on something that differs between processes and calls.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let v = (t as u64) ^ (u64::from(std::process::id()) << 24);
        mac.copy_from_slice(&v.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & !0x01) | 0x02;
    mac
}

/// Features the device offers for `queue_pairs` queue pairs.
pub fn offered_features(queue_pairs: u16) -> u64 {
    let mut f = features::COMMON
        | feature::MAC
        | feature::STATUS
        | feature::CSUM
        | feature::GUEST_CSUM
        | feature::GUEST_TSO4
        | feature::GUEST_TSO6
        | feature::GUEST_ECN
        | feature::HOST_TSO4
        | feature::HOST_TSO6
        | feature::HOST_ECN
        | feature::MRG_RXBUF;
    if queue_pairs > 1 {
        f |= feature::CTRL_VQ | feature::MQ;
    }
    f
}

/// Features the device offers with passt: no offloads (passt takes and gives complete,
/// checksummed frames), one queue pair.
pub fn passt_features() -> u64 {
    features::COMMON | feature::MAC | feature::STATUS | feature::MRG_RXBUF
}

/// The TAP offload flags matching what the driver accepted to receive.
pub fn tap_offload_flags(acked: u64) -> u32 {
    use tap::offload;
    let mut flags = 0;
    if acked & feature::GUEST_CSUM != 0 {
        flags |= offload::CSUM;
        if acked & feature::GUEST_TSO4 != 0 {
            flags |= offload::TSO4;
        }
        if acked & feature::GUEST_TSO6 != 0 {
            flags |= offload::TSO6;
        }
        if acked & feature::GUEST_ECN != 0 && flags & (offload::TSO4 | offload::TSO6) != 0 {
            flags |= offload::TSO_ECN;
        }
        if acked & feature::GUEST_UFO != 0 {
            flags |= offload::UFO;
        }
    }
    flags
}

/// A virtio-net device on a TAP or passt.
pub struct Net {
    mac: [u8; 6],
    queue_pairs: u16,
    backends: Vec<Backend>,
    /// The passt Vessel started, if it did.
    passt: Option<PasstProcess>,
    /// The keeper that starts passt (again), and the socket it sends passt's sockets on.
    keeper: Option<(
        passt::keeper::PasstKeeper,
        Arc<passt::keeper::KeeperControl>,
    )>,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    config: [u8; 12],
    /// `VIRTIO_NET_S_LINK_UP` of the configuration (down while passt is gone).
    link_up: Arc<AtomicBool>,
    /// Queue pairs the driver uses (`VQ_PAIRS_SET`), kept across a quiesce or a restore.
    active_pairs: u16,
    worker: Option<Worker>,
    mmds: Option<vessel_mmds::Mmds>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
}

/// The host's control of a net device: its rate limiters (updates take effect at the next
/// frame, also while the device runs).
#[derive(Debug, Clone)]
pub struct NetHandle {
    pub rx: RateLimiter,
    pub tx: RateLimiter,
}

impl Net {
    /// Opens (or creates) the TAP, one queue per queue pair.
    pub fn new(cfg: NetParams) -> Result<Net, NetError> {
        if cfg.queue_pairs == 0 || cfg.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(NetError::QueuePairs(cfg.queue_pairs));
        }
        let taps = Tap::open_queues(&cfg.tap, usize::from(cfg.queue_pairs))?;
        Net::with_taps(taps, cfg.mac)
    }

    /// Builds the device on already opened TAP queues (one per queue pair).
    pub fn with_taps(taps: Vec<Tap>, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        let backends = taps
            .into_iter()
            .map(|t| Backend::Tap(Arc::new(t)))
            .collect();
        Net::with_backends(backends, mac)
    }

    /// Builds the device on passt: started by a keeper process (this binary's
    /// `passt-keeper` subcommand, which starts passt again when it dies and exits when the
    /// device is dropped), or reached at its socket (not restarted).
    pub fn with_passt(source: &PasstSource, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        match source {
            PasstSource::Spawn { tcp_forwards } => {
                Net::with_passt_keeper(|fd| passt::keeper::self_command(fd, tcp_forwards), mac)
            }
            PasstSource::Socket(path) => Net::on_passt(PasstStream::connect(path)?, None, mac),
        }
    }

    /// Builds the device on passt started by the keeper that `make` runs (see
    /// [`passt::keeper::PasstKeeper::spawn`]).
    pub fn with_passt_keeper(
        make: impl FnOnce(RawFd) -> std::process::Command,
        mac: Option<[u8; 6]>,
    ) -> Result<Net, NetError> {
        let (keeper, control, pid, sock) = passt::keeper::PasstKeeper::spawn(make)?;
        log::info!(
            "virtio-net: passt started (pid {pid}, keeper pid {})",
            keeper.id()
        );
        let stream = PasstStream::new(sock).map_err(PasstError::Spawn)?;
        let mut net = Net::on_passt(stream, None, mac)?;
        net.keeper = Some((keeper, Arc::new(control)));
        Ok(net)
    }

    /// Builds the device on a connected passt stream.
    pub fn on_passt(
        stream: PasstStream,
        process: Option<PasstProcess>,
        mac: Option<[u8; 6]>,
    ) -> Result<Net, NetError> {
        let backend = Backend::Passt(Arc::new(Mutex::new(stream)));
        let mut net = Net::with_backends(vec![backend], mac)?;
        net.passt = process;
        net.avail_features = passt_features();
        Ok(net)
    }

    fn with_backends(backends: Vec<Backend>, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        let queue_pairs = u16::try_from(backends.len()).unwrap_or(u16::MAX);
        if queue_pairs == 0 || queue_pairs > MAX_QUEUE_PAIRS {
            return Err(NetError::QueuePairs(queue_pairs));
        }
        let mac = match mac {
            Some(m) if m[0] & 1 != 0 => return Err(NetError::MulticastMac(m)),
            Some(m) => m,
            None => random_mac(),
        };
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * usize::from(queue_pairs)];
        if queue_pairs > 1 {
            queue_sizes.push(64); // control queue
        }
        // virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (unused: no F_MTU).
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
        Ok(Net {
            mac,
            queue_pairs,
            backends,
            passt: None,
            keeper: None,
            queue_sizes,
            avail_features: offered_features(queue_pairs),
            config,
            link_up: Arc::new(AtomicBool::new(true)),
            active_pairs: 1,
            worker: None,
            mmds: None,
            rx_limiter: RateLimiter::unlimited().map_err(NetError::RateLimiter)?,
            tx_limiter: RateLimiter::unlimited().map_err(NetError::RateLimiter)?,
        })
    }

    /// The device's rate limiters.
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            rx: self.rx_limiter.clone(),
            tx: self.tx_limiter.clone(),
        }
    }

    /// Uses these rate limiters instead (ones on another clock, for tests); handles taken
    /// before keep the old ones.
    pub fn set_rate_limiters(&mut self, rx: RateLimiter, tx: RateLimiter) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    /// Serves MMDS on this interface: the guest's frames for the MMDS address are answered
    /// by a `vessel_mmds::MmdsStack` (a new one each time the driver activates the device)
    /// and never reach the TAP.
    pub fn set_mmds(&mut self, mmds: Option<vessel_mmds::Mmds>) {
        self.mmds = mmds;
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP's name ("" on passt).
    pub fn tap_name(&self) -> &str {
        match self.backends.first() {
            Some(Backend::Tap(t)) => t.name(),
            _ => "",
        }
    }

    /// Whether the link is up (it goes down while passt is gone).
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    pub fn queue_pairs(&self) -> u16 {
        self.queue_pairs
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = self.config;
        if self.link_up() {
            config[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        }
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker = None;
        let acked = ctx.acked_features;
        let offload = tap_offload_flags(acked);
        let multi = self.queue_pairs > 1;
        let mut pairs = Vec::new();
        for (p, backend) in self.backends.iter().enumerate() {
            let rx_idx = (2 * p) as u16;
            let rx = ctx.take_queue(rx_idx);
            let tx = ctx.take_queue(rx_idx + 1);
            if p == 0 {
                if rx.is_none() {
                    return Err(ActivateError::MissingQueue(0));
                }
                if tx.is_none() {
                    return Err(ActivateError::MissingQueue(1));
                }
            }
            if let Backend::Tap(tap) = backend {
                tap.set_offload(offload)
                    .map_err(|e| ActivateError::Backend {
                        what: "cannot set the TAP offloads",
                        source: e.into(),
                    })?;
            }
            let on = p < usize::from(self.active_pairs.max(1));
            if multi {
                // Only the first pair receives until the driver asks for more.
                backend
                    .set_queue_enabled(on)
                    .map_err(|e| ActivateError::Backend {
                        what: "cannot enable or disable a TAP queue",
                        source: e.into(),
                    })?;
            }
            pairs.push(QueuePair::new(p as u16, backend.clone(), rx, tx).start_enabled(on));
        }
        let ctrl = if acked & feature::CTRL_VQ != 0 {
            ctx.take_queue(2 * self.queue_pairs)
        } else {
            None
        };
        let mut fds = Vec::new();
        for pair in &pairs {
            let p = u64::from(pair.index);
            if let Some(q) = &pair.rx {
                fds.push((q.kick.as_raw_fd(), Tokens::rx_kick(p), EventSet::IN));
            }
            if let Some(q) = &pair.tx {
                fds.push((q.kick.as_raw_fd(), Tokens::tx_kick(p), EventSet::IN));
            }
            if pair.rx.is_some() {
                // Pairs other than the first wait for `VQ_PAIRS_SET`.
                let ev = if p < u64::from(self.active_pairs.max(1)) {
                    EventSet::IN
                } else {
                    EventSet::empty()
                };
                fds.push((pair.backend.as_raw_fd(), Tokens::tap(p), ev));
            }
        }
        if let Some(q) = &ctrl {
            fds.push((q.kick.as_raw_fd(), Tokens::CTRL, EventSet::IN));
        }
        let keeper = self.keeper.as_ref().map(|(_, c)| c.clone());
        if let Some(c) = &keeper {
            fds.push((c.as_raw_fd(), Tokens::KEEPER, EventSet::IN));
        }
        fds.push((
            self.rx_limiter.as_raw_fd(),
            Tokens::RX_LIMITER,
            EventSet::IN,
        ));
        fds.push((
            self.tx_limiter.as_raw_fd(),
            Tokens::TX_LIMITER,
            EventSet::IN,
        ));
        let mut handler = NetHandler::new(ctx.mem, acked, ctx.interrupt, ctx.health, pairs, ctrl)
            .with_limiters(self.rx_limiter.clone(), self.tx_limiter.clone())
            .with_link(self.link_up.clone())
            .with_keeper(keeper);
        handler.mmds = self
            .mmds
            .clone()
            .map(|m| MmdsPath::new(vessel_mmds::MmdsStack::new(m)));
        let worker = Worker::spawn("virtio-net", &fds, handler).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.worker = None;
        self.active_pairs = 1;
        if self.queue_pairs > 1 {
            for backend in &self.backends {
                let _ = backend.set_queue_enabled(true);
            }
        }
        true
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn quiesce(&mut self) -> bool {
        // The worker never keeps a chain between events (receive buffers it cannot fill
        // are put back); only the number of pairs in use is worth keeping.
        if let Some(mut w) = self.worker.take() {
            if let Some(h) = w.quiesce::<NetHandler>() {
                let n = h.pairs.iter().filter(|p| p.enabled()).count();
                self.active_pairs = u16::try_from(n).unwrap_or(1).max(1);
            }
        }
        true
    }

    fn save_device_state(&self) -> DeviceState {
        // The TAP is reopened by name; the MAC may have been random.
        DeviceState::Net(NetState {
            mac: self.mac,
            active_pairs: self.active_pairs,
        })
    }

    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Net(NetState { mac, active_pairs }) = *state else {
            return Err(DeviceStateError::kind(self.name(), state));
        };
        if mac[0] & 1 != 0 {
            return Err(DeviceStateError::NotUnicast(mac));
        }
        if !(1..=self.queue_pairs).contains(&active_pairs) {
            return Err(DeviceStateError::ActivePairs {
                saved: active_pairs,
                max: self.queue_pairs,
            });
        }
        self.mac = mac;
        self.config[..6].copy_from_slice(&mac);
        self.active_pairs = active_pairs;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
