//! The vsock worker: multiplexes guest packets onto host Unix-socket connections.
//!
//! Each connection is keyed by (host port, guest port). Packets for the guest are either
//! control packets (queued in `ctrl`, sent as soon as the driver gives receive buffers) or
//! data read from a host stream straight into a receive buffer when the stream is readable,
//! the guest has credit for it and a receive buffer is available. A stream whose data cannot
//! move (no credit, no buffer) is taken out of the epoll set until that changes, so nothing
//! busy-loops.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::worker::{consume, next_chain, notify_if_needed, EventHandler, WorkerControl};
use vessel_virtio::{ActiveQueue, DeviceHealth, VirtioInterrupt};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

use super::packet::{op, Header, HDR_LEN, HOST_CID, TYPE_STREAM};

mod connection;
use connection::{Conn, Key, State};

/// Receive buffer we advertise per connection (bytes the guest may send ahead).
pub const CONN_BUF: u32 = 256 * 1024;
/// Largest payload accepted in one guest packet.
const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Most connections (and pending host connections) at a time.
const MAX_CONNS: usize = 1024;
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Control packets waiting for receive buffers, at most.
const MAX_CTRL_PENDING: usize = 4096;

pub(super) struct Tokens;

impl Tokens {
    pub(super) const RX_KICK: u64 = 0;
    pub(super) const TX_KICK: u64 = 1;
    pub(super) const EVT_KICK: u64 = 2;
    pub(super) const LISTENER: u64 = 3;
    /// Connections and pending host connections: `FIRST_ID + id`.
    const FIRST_ID: u64 = 16;
}

/// A host connection that has not sent its `CONNECT <port>\n` line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct VsockStats {
    pub dropped_packets: u64,
    pub resets_sent: u64,
}

pub(super) struct Muxer {
    mem: GuestMemoryMmap,
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    rx: ActiveQueue,
    tx: ActiveQueue,
    evq: Option<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    conns: HashMap<Key, Conn>,
    ids: HashMap<u64, Key>,
    pending: HashMap<u64, PendingHost>,
    next_id: u64,
    next_local_port: u32,
    /// Control packets for the guest, oldest first.
    ctrl: VecDeque<Header>,
    /// Streams waiting for receive buffers.
    rx_waiters: Vec<Key>,
    scratch: Vec<u8>,
    /// A `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` is to be sent on the event queue.
    reset_pending: bool,
    pub(super) stats: VsockStats,
}

/// What registering descriptors goes through (the worker's epoll, or a test double).
pub(super) trait Poll {
    fn add(&mut self, fd: i32, token: u64, events: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: i32, token: u64, events: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: i32) -> io::Result<()>;
}

impl Poll for WorkerControl {
    fn add(&mut self, fd: i32, token: u64, events: EventSet) -> io::Result<()> {
        WorkerControl::add(self, fd, token, events)
    }
    fn modify(&mut self, fd: i32, token: u64, events: EventSet) -> io::Result<()> {
        WorkerControl::modify(self, fd, token, events)
    }
    fn remove(&mut self, fd: i32) -> io::Result<()> {
        WorkerControl::remove(self, fd)
    }
}

impl Muxer {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemoryMmap,
        guest_cid: u64,
        uds_path: PathBuf,
        listener: Arc<UnixListener>,
        rx: ActiveQueue,
        tx: ActiveQueue,
        evq: Option<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        health: DeviceHealth,
    ) -> Muxer {
        Muxer {
            mem,
            guest_cid,
            uds_path,
            listener,
            rx,
            tx,
            evq,
            interrupt,
            health,
            conns: HashMap::new(),
            ids: HashMap::new(),
            pending: HashMap::new(),
            next_id: 0,
            next_local_port: FIRST_LOCAL_PORT,
            ctrl: VecDeque::new(),
            rx_waiters: Vec::new(),
            scratch: vec![0u8; MAX_PKT_PAYLOAD],
            reset_pending: false,
            stats: VsockStats::default(),
        }
    }

    /// Takes the queues (and the rest of the activation context) of a device started
    /// again after a quiesce, keeping every connection.
    pub(super) fn rebind(
        &mut self,
        mem: GuestMemoryMmap,
        rx: ActiveQueue,
        tx: ActiveQueue,
        evq: Option<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        health: DeviceHealth,
    ) {
        self.mem = mem;
        self.rx = rx;
        self.tx = tx;
        self.evq = evq;
        self.interrupt = interrupt;
        self.health = health;
    }

    /// The connection descriptors to watch, as they were registered (for a new worker after
    /// a quiesce): pending host connections and connections in the epoll set.
    pub(super) fn watched_fds(&self) -> Vec<(std::os::unix::io::RawFd, u64, EventSet)> {
        let pending = self
            .pending
            .iter()
            .map(|(id, p)| (p.stream.as_raw_fd(), Tokens::FIRST_ID + id, EventSet::IN));
        let conns = self
            .conns
            .values()
            .filter(|c| c.registered)
            .map(|c| (c.stream.as_raw_fd(), Tokens::FIRST_ID + c.id, c.events));
        pending.chain(conns).collect()
    }

    /// Sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` as soon as the event queue has a buffer
    /// (call before the worker starts, then kick the event queue): the driver drops its
    /// connections and reads the guest CID again. For a restored device, whose host-side
    /// connections did not survive.
    pub(super) fn request_transport_reset(&mut self) {
        self.reset_pending = true;
    }

    fn send_transport_reset(&mut self) {
        let Some(q) = self.evq.as_mut() else {
            return;
        };
        let Ok(chain) = next_chain(&mut q.queue, &self.mem, &self.health, &"vsock event queue")
        else {
            return;
        };
        let Some(chain) = chain else {
            // No buffer yet: the driver's next kick brings us back.
            return;
        };
        let head = chain.head_index();
        // struct virtio_vsock_event { le32 id; }, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0.
        let written = chain
            .writer(&self.mem)
            .ok()
            .filter(|w| w.available_bytes() >= 4)
            .is_some_and(|mut w| w.write_all(&0u32.to_le_bytes()).is_ok());
        let len = if written { 4 } else { 0 };
        if let Err(e) = q.queue.add_used(&self.mem, head, len) {
            self.health
                .mark_broken(&format_args!("vsock event queue: {e}"));
            return;
        }
        if len == 4 {
            self.reset_pending = false;
        }
        notify_if_needed(&mut q.queue, q.index, &self.mem, self.interrupt.as_ref());
    }

    fn alloc_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Header of a packet from the host side of connection `key`, with our credit.
    fn conn_header(&self, key: Key, op: u16) -> Header {
        let (buf_alloc, fwd_cnt) = self
            .conns
            .get(&key)
            .map(|c| (CONN_BUF, c.fwd_cnt.0))
            .unwrap_or((0, 0));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            type_: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    fn queue_ctrl(&mut self, mut h: Header) {
        if let Some(c) = self.conns.get_mut(&Key {
            local: h.src_port,
            peer: h.dst_port,
        }) {
            c.fwd_cnt_sent = Wrapping(h.fwd_cnt);
        }
        if self.ctrl.len() >= MAX_CTRL_PENDING {
            log::warn!("virtio-vsock: too many control packets pending; dropping one");
            self.stats.dropped_packets += 1;
            return;
        }
        h.len = 0;
        self.ctrl.push_back(h);
    }

    fn queue_rst_for(&mut self, pkt: &Header) {
        let mut h = pkt.reply(op::RST);
        h.src_cid = HOST_CID;
        self.stats.resets_sent += 1;
        self.queue_ctrl(h);
    }

    fn close(&mut self, key: Key, poll: &mut dyn Poll) {
        if let Some(c) = self.conns.remove(&key) {
            if c.registered {
                let _ = poll.remove(c.stream.as_raw_fd());
            }
            self.ids.remove(&c.id);
        }
    }

    /// Brings the stream's epoll registration in line with what the connection can do.
    fn update_poll(&mut self, key: Key, poll: &mut dyn Poll) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.wanted_events();
        let fd = c.stream.as_raw_fd();
        let token = Tokens::FIRST_ID + c.id;
        let r = if want.is_empty() {
            if !c.registered {
                return;
            }
            c.registered = false;
            poll.remove(fd)
        } else if !c.registered {
            c.registered = true;
            poll.add(fd, token, want)
        } else if want != c.events {
            poll.modify(fd, token, want)
        } else {
            Ok(())
        };
        c.events = want;
        if let Err(e) = r {
            log::warn!("virtio-vsock: epoll: {e}");
        }
    }

    // ---- guest → host ----

    pub(super) fn process_tx(&mut self, poll: &mut dyn Poll) {
        consume(&self.tx.kick);
        let mut completed = 0u32;
        loop {
            let Ok(chain) = next_chain(&mut self.tx.queue, &self.mem, &self.health, &"vsock tx")
            else {
                return;
            };
            let Some(chain) = chain else {
                match self.tx.queue.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.health.mark_broken(&format_args!("vsock tx: {e}"));
                        return;
                    }
                }
            };
            let head = chain.head_index();
            let packet = chain.reader(&self.mem).ok().and_then(|mut r| {
                let mut hb = [0u8; HDR_LEN];
                r.read_exact(&mut hb).ok()?;
                let h = Header::parse(&hb);
                let len = h.len as usize;
                if len > MAX_PKT_PAYLOAD || r.available_bytes() < len {
                    return Some((h, None));
                }
                let mut data = vec![0u8; len];
                r.read_exact(&mut data).ok()?;
                Some((h, Some(data)))
            });
            match packet {
                Some((h, Some(data))) => self.handle_guest_packet(h, &data, poll),
                Some((h, None)) => {
                    // Bad length: refuse the connection rather than guess.
                    self.stats.dropped_packets += 1;
                    if h.src_cid == self.guest_cid && h.dst_cid == HOST_CID {
                        self.close(
                            Key {
                                local: h.dst_port,
                                peer: h.src_port,
                            },
                            poll,
                        );
                        if h.op != op::RST {
                            self.queue_rst_for(&h);
                        }
                    }
                }
                None => self.stats.dropped_packets += 1,
            }
            if let Err(e) = self.tx.queue.add_used(&self.mem, head, 0) {
                self.health.mark_broken(&format_args!("vsock tx: {e}"));
                return;
            }
            completed += 1;
        }
        if completed > 0 {
            notify_if_needed(
                &mut self.tx.queue,
                self.tx.index,
                &self.mem,
                self.interrupt.as_ref(),
            );
        }
        self.flush_ctrl();
    }

    // ---- host → guest ----

    fn accept(&mut self, poll: &mut dyn Poll) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() + self.conns.len() >= MAX_CONNS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: the client sees its connection close
                    }
                    let id = self.alloc_id();
                    if poll
                        .add(stream.as_raw_fd(), Tokens::FIRST_ID + id, EventSet::IN)
                        .is_ok()
                    {
                        self.pending.insert(
                            id,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("virtio-vsock: accept: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line of a pending host connection, byte by byte so
    /// that nothing after the line is consumed.
    fn pending_readable(&mut self, id: u64, poll: &mut dyn Poll) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        let mut byte = [0u8; 1];
        let line = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(std::mem::take(&mut p.line)),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Err(()),
            }
        };
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        let _ = poll.remove(p.stream.as_raw_fd());
        let port = line.ok().and_then(|l| parse_connect(&l));
        let Some(port) = port else {
            return; // dropping the stream closes it
        };
        let local = self.alloc_local_port(port);
        let key = Key { local, peer: port };
        let fake = Header {
            buf_alloc: 0,
            fwd_cnt: 0,
            ..Header::default()
        };
        self.conns
            .insert(key, Conn::new(id, p.stream, State::LocalInit, &fake));
        self.ids.insert(id, key);
        self.update_poll(key, poll);
        let req = self.conn_header(key, op::REQUEST);
        self.queue_ctrl(req);
        self.flush_ctrl();
    }

    fn alloc_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&Key { local: p, peer }) {
                return p;
            }
        }
    }

    fn notify_rx(&mut self) {
        notify_if_needed(
            &mut self.rx.queue,
            self.rx.index,
            &self.mem,
            self.interrupt.as_ref(),
        );
    }

    /// Sends queued control packets while receive buffers last.
    fn flush_ctrl(&mut self) {
        let mut delivered = false;
        while let Some(h) = self.ctrl.front().copied() {
            let Ok(chain) = next_chain(&mut self.rx.queue, &self.mem, &self.health, &"vsock rx")
            else {
                return;
            };
            let Some(chain) = chain else {
                if let Ok(true) = self.rx.queue.enable_notification(&self.mem) {
                    continue; // the driver added buffers meanwhile
                }
                break;
            };
            let head = chain.head_index();
            let len = match chain.writer(&self.mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    if w.write_all(&h.to_bytes()).is_ok() {
                        self.ctrl.pop_front();
                        if let Some(c) = self.conns.get_mut(&Key {
                            local: h.src_port,
                            peer: h.dst_port,
                        }) {
                            if h.op == op::CREDIT_UPDATE {
                                c.credit_update_queued = false;
                            }
                        }
                        HDR_LEN as u32
                    } else {
                        0
                    }
                }
                _ => {
                    self.stats.dropped_packets += 1;
                    0
                }
            };
            if let Err(e) = self.rx.queue.add_used(&self.mem, head, len) {
                self.health.mark_broken(&format_args!("vsock rx: {e}"));
                return;
            }
            delivered = true;
        }
        if delivered {
            self.notify_rx();
        }
    }

    pub(super) fn rx_kick(&mut self, poll: &mut dyn Poll) {
        consume(&self.rx.kick);
        self.flush_ctrl();
        for key in std::mem::take(&mut self.rx_waiters) {
            if let Some(c) = self.conns.get_mut(&key) {
                c.rx_wait = false;
            }
            self.update_poll(key, poll);
        }
    }

    pub(super) fn handle(&mut self, token: u64, events: EventSet, poll: &mut dyn Poll) {
        if self.health.is_broken() {
            self.drop_event_while_broken(token, poll);
            return;
        }
        match token {
            Tokens::RX_KICK => self.rx_kick(poll),
            Tokens::TX_KICK => self.process_tx(poll),
            Tokens::EVT_KICK => {
                if let Some(q) = &self.evq {
                    consume(&q.kick);
                }
                if self.reset_pending {
                    self.send_transport_reset();
                }
            }
            Tokens::LISTENER => self.accept(poll),
            t if t >= Tokens::FIRST_ID => {
                let id = t - Tokens::FIRST_ID;
                if self.pending.contains_key(&id) {
                    self.pending_readable(id, poll);
                } else if let Some(&key) = self.ids.get(&id) {
                    self.conn_event(key, events, poll);
                }
            }
            _ => {}
        }
        self.flush_ctrl();
    }
}

impl Muxer {
    /// A broken device serves nothing until the driver resets it, but the event that fired
    /// must still be taken: the worker's epoll is level-triggered, and an event left pending
    /// (a kick a hostile driver sent after breaking a ring) would spin the worker thread at
    /// full speed for the rest of the VM's life. Kicks are drained; sockets are no longer
    /// watched (a reset starts a fresh worker with everything it needs).
    fn drop_event_while_broken(&mut self, token: u64, poll: &mut dyn Poll) {
        let fd = match token {
            Tokens::RX_KICK => {
                consume(&self.rx.kick);
                return;
            }
            Tokens::TX_KICK => {
                consume(&self.tx.kick);
                return;
            }
            Tokens::EVT_KICK => {
                if let Some(q) = &self.evq {
                    consume(&q.kick);
                }
                return;
            }
            Tokens::LISTENER => Some(self.listener.as_raw_fd()),
            t if t >= Tokens::FIRST_ID => {
                let id = t - Tokens::FIRST_ID;
                match self.pending.get(&id) {
                    Some(p) => Some(p.stream.as_raw_fd()),
                    None => self
                        .ids
                        .get(&id)
                        .and_then(|k| self.conns.get(k))
                        .map(|c| c.stream.as_raw_fd()),
                }
            }
            _ => None,
        };
        if let Some(fd) = fd {
            let _ = poll.remove(fd);
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped). As in Firecracker, the keyword's
/// case does not matter, words are split on any whitespace and only the first two are read:
/// Kata Containers' runtime-rs sends `connect 1024`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let mut words = std::str::from_utf8(line).ok()?.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

impl EventHandler for Muxer {
    fn handle_event(
        &mut self,
        token: u64,
        events: EventSet,
        ctl: &mut WorkerControl,
    ) -> io::Result<()> {
        self.handle(token, events, ctl);
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod unit {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(
            parse_connect(b"connect 1024"),
            Some(1024),
            "Kata's runtime-rs"
        );
        assert_eq!(parse_connect(b"Connect  7 "), Some(7));
        assert_eq!(
            parse_connect(b"CONNECT 1 2"),
            Some(1),
            "Firecracker reads two words"
        );
        assert_eq!(parse_connect(b"CONNECTX 1"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
