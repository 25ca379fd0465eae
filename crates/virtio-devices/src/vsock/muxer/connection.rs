//! One connection between a guest port and a host Unix stream: its state and credit
//! accounting ([`Conn`]), and the [`Muxer`]'s handling of what happens on it: the guest's
//! packets for it (the state machine: REQUEST, RESPONSE, RW, SHUTDOWN, RST, credit) and its
//! host stream becoming readable or writable.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use vessel_virtio::worker::next_chain;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::{Muxer, Poll, CONN_BUF, MAX_CONNS};
use crate::vsock::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, TYPE_STREAM};

/// What identifies a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key {
    /// Our (host) port.
    pub(super) local: u32,
    /// The guest's port.
    pub(super) peer: u32,
}

/// Where a connection is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

/// One connection: its host stream, the credit both sides gave, and guest data not yet
/// written to the host.
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) stream: UnixStream,
    pub(super) state: State,
    /// Events currently registered for the stream.
    pub(super) events: EventSet,
    /// Whether the stream is in the epoll set (it is left out while nothing is wanted, so
    /// that a hang-up is not reported over and over).
    pub(super) registered: bool,
    /// The guest's receive buffer and how much it consumed (from its headers).
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub(super) tx_cnt: Wrapping<u32>,
    /// Bytes received from the guest and written to the host stream.
    pub(super) fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub(super) fwd_cnt_sent: Wrapping<u32>,
    /// Guest data the host stream did not take yet.
    pub(super) to_host: VecDeque<u8>,
    /// Waiting for a receive buffer.
    pub(super) rx_wait: bool,
    /// The host side closed (or failed): nothing more to read.
    pub(super) host_eof: bool,
    /// The guest's SHUTDOWN flags.
    pub(super) peer_shutdown: u32,
    pub(super) credit_update_queued: bool,
}

impl Conn {
    pub(super) fn new(id: u64, stream: UnixStream, state: State, peer: &Header) -> Conn {
        Conn {
            id,
            stream,
            state,
            events: EventSet::empty(),
            registered: false,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: Wrapping(peer.fwd_cnt),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            to_host: VecDeque::new(),
            rx_wait: false,
            host_eof: false,
            peer_shutdown: 0,
            credit_update_queued: false,
        }
    }

    /// Bytes the guest can still take.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub(super) fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & shutdown::RCV == 0
            && !self.rx_wait
            && self.peer_credit() > 0
        {
            ev |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }
}

impl Muxer {
    pub(super) fn handle_guest_packet(&mut self, h: Header, data: &[u8], poll: &mut dyn Poll) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            // Spoofed or misrouted: not ours to answer.
            self.stats.dropped_packets += 1;
            return;
        }
        if h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.queue_rst_for(&h);
            }
            return;
        }
        let key = Key {
            local: h.dst_port,
            peer: h.src_port,
        };
        if h.op == op::REQUEST {
            self.guest_connect(key, &h, poll);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != op::RST {
                self.queue_rst_for(&h);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        match (h.op, c.state) {
            (op::RESPONSE, State::LocalInit) => {
                c.state = State::Established;
                let reply = format!("OK {}\n", key.local);
                // The client just connected and waits for this line: its socket buffer is
                // empty, so a short write means it is gone.
                if c.stream.write_all(reply.as_bytes()).is_err() {
                    self.close(key, poll);
                    self.queue_rst_for(&h);
                    return;
                }
            }
            (op::RW, State::Established) => {
                if c.peer_shutdown & shutdown::SEND != 0
                    || c.to_host.len() + data.len() > CONN_BUF as usize
                {
                    // Data after SHUTDOWN, or more than the credit we gave: hostile.
                    self.close(key, poll);
                    self.queue_rst_for(&h);
                    return;
                }
                c.to_host.extend(data);
                self.flush_to_host(key, poll);
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => {
                let hdr = self.conn_header(key, op::CREDIT_UPDATE);
                self.queue_ctrl(hdr);
            }
            (op::SHUTDOWN, State::Established) => {
                c.peer_shutdown |= h.flags & shutdown::BOTH;
                if c.peer_shutdown == shutdown::BOTH {
                    // The guest is done both ways: close and confirm with a reset.
                    self.close(key, poll);
                    self.queue_rst_for(&h);
                    return;
                }
                if c.peer_shutdown & shutdown::SEND != 0 && c.to_host.is_empty() {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            (op::RST, _) => {
                self.close(key, poll);
                return;
            }
            _ => {
                // Unknown op, or one that makes no sense in this state.
                self.close(key, poll);
                self.queue_rst_for(&h);
                return;
            }
        }
        self.update_poll(key, poll);
    }

    fn guest_connect(&mut self, key: Key, h: &Header, poll: &mut dyn Poll) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
            self.queue_rst_for(h);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local));
        let stream = match connect_nonblocking(std::path::Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("virtio-vsock: guest connect to {path:?}: {e}");
                self.queue_rst_for(h);
                return;
            }
        };
        let id = self.alloc_id();
        self.conns
            .insert(key, Conn::new(id, stream, State::Established, h));
        self.ids.insert(id, key);
        self.update_poll(key, poll);
        let resp = self.conn_header(key, op::RESPONSE);
        self.queue_ctrl(resp);
    }

    /// Writes buffered guest data to the host stream.
    pub(super) fn flush_to_host(&mut self, key: Key, poll: &mut dyn Poll) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // The host side is gone.
                    let h = self.conn_header(key, op::RST);
                    self.close(key, poll);
                    self.stats.resets_sent += 1;
                    self.queue_ctrl(h);
                    return;
                }
            }
        }
        if c.to_host.is_empty() && c.peer_shutdown & shutdown::SEND != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        // Tell the guest about freed space once a good part of its buffer is free again.
        if (c.fwd_cnt - c.fwd_cnt_sent).0 >= CONN_BUF / 4 && !c.credit_update_queued {
            c.credit_update_queued = true;
            let h = self.conn_header(key, op::CREDIT_UPDATE);
            self.queue_ctrl(h);
        }
        self.update_poll(key, poll);
    }

    pub(super) fn conn_event(&mut self, key: Key, events: EventSet, poll: &mut dyn Poll) {
        if events.contains(EventSet::OUT) {
            self.flush_to_host(key, poll);
        }
        let readable = events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        if readable && c.state == State::LocalInit {
            // The client went away (or talked) before the guest answered: a hang-up
            // aborts the connection; data waits until then.
            if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                let h = self.conn_header(key, op::RST);
                self.close(key, poll);
                self.stats.resets_sent += 1;
                self.queue_ctrl(h);
            }
            return;
        }
        if readable && c.events.contains(EventSet::IN) {
            self.host_to_guest(key, poll);
        }
        self.update_poll(key, poll);
    }

    /// Moves data from a host stream into receive buffers while credit and buffers last.
    pub(super) fn host_to_guest(&mut self, key: Key, poll: &mut dyn Poll) {
        let mut delivered = false;
        for _ in 0..64 {
            // Control packets go first: they may carry the credit the guest waits for.
            self.flush_ctrl();
            let Some(c) = self.conns.get_mut(&key) else {
                break;
            };
            let credit = c.peer_credit() as usize;
            if credit == 0 {
                let h = self.conn_header(key, op::CREDIT_REQUEST);
                self.queue_ctrl(h);
                break;
            }
            let Ok(chain) = next_chain(&mut self.rx.queue, &self.mem, &self.health, &"vsock rx")
            else {
                return;
            };
            let Some(chain) = chain else {
                if let Ok(true) = self.rx.queue.enable_notification(&self.mem) {
                    continue; // the driver added buffers meanwhile
                }
                c.rx_wait = true;
                if !self.rx_waiters.contains(&key) {
                    self.rx_waiters.push(key);
                }
                break;
            };
            let head = chain.head_index();
            let Ok(mut w) = chain.writer(&self.mem) else {
                self.stats.dropped_packets += 1;
                delivered |= self.rx.queue.add_used(&self.mem, head, 0).is_ok();
                continue;
            };
            let room = w.available_bytes();
            if room <= HDR_LEN {
                self.stats.dropped_packets += 1;
                delivered |= self.rx.queue.add_used(&self.mem, head, 0).is_ok();
                continue;
            }
            let max = (room - HDR_LEN).min(credit).min(self.scratch.len());
            let n = match c.stream.read(&mut self.scratch[..max]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rx.queue.go_to_previous_position();
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.rx.queue.go_to_previous_position();
                    continue;
                }
                Err(_) => 0,
            };
            let mut h = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local,
                dst_port: key.peer,
                type_: TYPE_STREAM,
                buf_alloc: CONN_BUF,
                fwd_cnt: c.fwd_cnt.0,
                ..Header::default()
            };
            c.fwd_cnt_sent = c.fwd_cnt;
            c.credit_update_queued = false;
            if n == 0 {
                // The host closed its side: no more data from us.
                c.host_eof = true;
                h.op = op::SHUTDOWN;
                h.flags = shutdown::BOTH;
            } else {
                h.op = op::RW;
                h.len = n as u32;
                c.tx_cnt += Wrapping(n as u32);
            }
            let ok = w.write_all(&h.to_bytes()).is_ok() && w.write_all(&self.scratch[..n]).is_ok();
            let len = if ok { (HDR_LEN + n) as u32 } else { 0 };
            if let Err(e) = self.rx.queue.add_used(&self.mem, head, len) {
                self.health.mark_broken(&format_args!("vsock rx: {e}"));
                return;
            }
            delivered = true;
            if n == 0 {
                break;
            }
        }
        if delivered {
            self.notify_rx();
        }
        self.update_poll(key, poll);
    }
}

/// Connects to a Unix stream socket without ever blocking: a listener whose backlog is full
/// refuses (`EAGAIN`) instead of stalling the worker.
fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::{FromRawFd, OwnedFd};
    // SAFETY: all-zero is a valid `sockaddr_un`.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a `sockaddr_un` of the size given; the result is checked.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_accounts_for_in_flight_bytes() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Header::default()
        };
        let mut c = Conn::new(1, a, State::Established, &peer);
        assert_eq!(c.peer_credit(), 1000);
        c.tx_cnt = Wrapping(600);
        assert_eq!(c.peer_credit(), 400);
        c.peer_fwd_cnt = Wrapping(500);
        assert_eq!(c.peer_credit(), 900);
        // Counters wrap.
        c.tx_cnt = Wrapping(10);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 9);
        assert_eq!(c.peer_credit(), 980);
        // A guest claiming to have consumed more than we sent gets no credit.
        c.peer_fwd_cnt = Wrapping(20);
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.wanted_events().contains(EventSet::IN));
    }
}
