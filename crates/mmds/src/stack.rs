//! The guest's side of MMDS on one network interface: a tiny Ethernet endpoint that owns
//! the MMDS IPv4 address and a MAC address of its own.
//!
//! The net device offers it every frame the guest transmits ([`MmdsStack::intercept`]); it
//! keeps those that are for MMDS (ARP requests for the MMDS address, IPv4/TCP to its port
//! 80) and queues its answers, which the device delivers into the guest's receive queue
//! ([`MmdsStack::pop_frame`]) before anything from the TAP.
//!
//! TCP is the least a server on a lossless virtual link needs: SYN/SYN-ACK (with the
//! guest's MSS), in-order data, cumulative ACKs, the guest's receive window, FIN both ways
//! and RST for segments that belong to no connection. No timers: everything happens in
//! answer to a guest frame or as the guest takes frames, and a guest retransmission is
//! answered with an ACK (or the SYN-ACK again). Every buffer is bounded: at most
//! [`MAX_CONNECTIONS`] connections (a new one evicts the least recently used), a request
//! of at most [`MAX_REQUEST_LEN`] bytes, one response at a time per connection, and
//! [`MAX_CONTROL_FRAMES`] queued ARP/SYN/RST frames. Checksums of received frames are not
//! checked: a guest with checksum offload sends partial ones, and the link cannot corrupt.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Instant;

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, IpNumber, LinkSlice, NetSlice,
    PacketBuilder, SlicedPacket, TcpOptionElement, TcpSlice, TransportSlice,
};

use crate::service::{random_u32, Mmds, Served, MAX_REQUEST_LEN};

/// The MAC address MMDS answers from (locally administered, unicast).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x6d, 0x6d, 0x64, 0x73, 0x01];
/// Most TCP connections at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Most ARP replies, SYN-ACKs, ACKs and RSTs waiting for the guest.
pub const MAX_CONTROL_FRAMES: usize = 64;
/// Largest frame [`MmdsStack::pop_frame`] produces (Ethernet header included).
pub const MAX_FRAME_LEN: usize = 1514;
/// The TCP port MMDS listens on.
pub const HTTP_PORT: u16 = 80;

/// Largest segment payload we send (an Ethernet MTU of 1500).
const MAX_MSS: u16 = 1460;
/// What TCP assumes when the SYN carries no MSS option.
const DEFAULT_MSS: u16 = 536;
const TTL: u8 = 64;
const ETH_HDR: usize = 14;

/// Sequence-number comparison (RFC 793 arithmetic): `a < b`.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// SYN-ACK sent, waiting for the handshake's ACK.
    SynReceived,
    Established,
}

/// One TCP connection from the guest.
struct Conn {
    guest_mac: [u8; 6],
    guest_ip: [u8; 4],
    guest_port: u16,
    state: State,
    /// Our initial sequence number (the SYN's).
    iss: u32,
    /// The guest's initial sequence number.
    irs: u32,
    /// Next sequence number expected from the guest.
    rcv_nxt: u32,
    /// Oldest unacknowledged sequence number of ours (the byte at `send[send_start]`, or
    /// our FIN once all data is acknowledged).
    snd_una: u32,
    /// The guest's receive window, from its latest segment.
    peer_wnd: u16,
    mss: u16,
    /// Request bytes received and not yet answered.
    request: Vec<u8>,
    /// The response being sent: `send[send_start..]` is unacknowledged.
    send: Vec<u8>,
    send_start: usize,
    /// Bytes of `send[send_start..]` sent at least once.
    sent: usize,
    /// Close once the response is sent (`Connection: close`, an error, or the guest's FIN).
    close_after_send: bool,
    fin_sent: bool,
    fin_acked: bool,
    peer_fin: bool,
    /// An ACK is owed to the guest.
    ack_due: bool,
    /// The SYN-ACK must be (re)sent.
    syn_ack_due: bool,
    last_used: u64,
}

/// What an acknowledgment number meant.
enum Acked {
    Fine,
    /// Acknowledges what we never sent: answer with an ACK, ignore the segment.
    Ahead,
    /// Not the handshake's ACK: reset.
    Bad,
}

impl Conn {
    /// The sequence number of our next new byte (or FIN).
    fn snd_nxt(&self) -> u32 {
        self.snd_una
            .wrapping_add(self.sent as u32)
            .wrapping_add(u32::from(self.fin_sent && !self.fin_acked))
    }

    fn on_ack(&mut self, ack: u32) -> Acked {
        if self.state == State::SynReceived {
            if ack != self.iss.wrapping_add(1) {
                return Acked::Bad;
            }
            self.state = State::Established;
            self.syn_ack_due = false;
            return Acked::Fine;
        }
        if seq_lt(self.snd_nxt(), ack) {
            return Acked::Ahead;
        }
        if seq_lt(self.snd_una, ack) {
            let n = ack.wrapping_sub(self.snd_una) as usize;
            let data = n.min(self.sent);
            self.send_start += data;
            self.sent -= data;
            self.snd_una = self.snd_una.wrapping_add(data as u32);
            if n > data && self.fin_sent && !self.fin_acked {
                self.fin_acked = true;
                self.snd_una = self.snd_una.wrapping_add(1);
            }
            if self.send_start == self.send.len() {
                self.send.clear();
                self.send_start = 0;
            }
        }
        Acked::Fine
    }

    fn unsent(&self) -> usize {
        self.send.len() - self.send_start - self.sent
    }

    fn window(&self) -> u16 {
        u16::try_from(MAX_REQUEST_LEN.saturating_sub(self.request.len())).unwrap_or(u16::MAX)
    }

    /// Our FIN is due: everything was sent and there is nothing more to say.
    fn fin_due(&self) -> bool {
        !self.fin_sent
            && self.state == State::Established
            && (self.close_after_send || self.peer_fin)
            && self.unsent() == 0
            && self.send.len() == self.send_start + self.sent
    }

    fn has_output(&self) -> bool {
        self.syn_ack_due || self.ack_due || self.fin_due() || self.sendable() > 0
    }

    /// Payload bytes that may go out now (unsent, within the guest's window).
    fn sendable(&self) -> usize {
        if self.state != State::Established {
            return 0;
        }
        let in_flight = self.sent;
        let room = usize::from(self.peer_wnd).saturating_sub(in_flight);
        self.unsent().min(room)
    }

    /// Whether both sides are done.
    fn finished(&self) -> bool {
        self.fin_acked && self.peer_fin
    }
}

/// Counters, for tests and statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StackStats {
    /// Frames taken from the guest.
    pub intercepted: u64,
    /// Frames given to the guest.
    pub delivered: u64,
    /// HTTP responses produced.
    pub responses: u64,
    /// Resets sent.
    pub resets: u64,
    /// Control frames dropped because the queue was full.
    pub dropped: u64,
}

/// The MMDS endpoint of one network interface. See the module docs.
pub struct MmdsStack {
    mmds: Mmds,
    ip: [u8; 4],
    conns: Vec<Conn>,
    control: VecDeque<Vec<u8>>,
    /// Connection to look at first for data (round robin).
    next_conn: usize,
    clock: u64,
    stats: StackStats,
}

/// A finished frame, built in a fixed buffer.
fn build(builder: PacketBuilder2, payload: &[u8], out: &mut [u8]) -> Option<usize> {
    let cap = out.len();
    let mut w: &mut [u8] = out;
    builder.write(&mut w, payload).ok()?;
    Some(cap - w.len())
}

type PacketBuilder2 = etherparse::PacketBuilderStep<etherparse::TcpHeader>;

impl MmdsStack {
    /// An endpoint answering for `mmds` at its configured address.
    pub fn new(mmds: Mmds) -> MmdsStack {
        let ip = mmds.options().ipv4.octets();
        MmdsStack {
            mmds,
            ip,
            conns: Vec::new(),
            control: VecDeque::new(),
            next_conn: 0,
            clock: 0,
            stats: StackStats::default(),
        }
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip)
    }

    pub fn stats(&self) -> StackStats {
        self.stats
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether the first bytes of a frame (at least the first 42, or the whole frame) may be
    /// for MMDS: a cheap test so that the device copies only those frames whole.
    pub fn may_intercept(&self, head: &[u8]) -> bool {
        if head.len() < ETH_HDR + 20 {
            return false;
        }
        match [head[12], head[13]] {
            // ARP: target protocol address at 24 bytes into the packet.
            [0x08, 0x06] => head.get(ETH_HDR + 24..ETH_HDR + 28) == Some(&self.ip[..]),
            // IPv4: destination at 16 bytes into the header.
            [0x08, 0x00] => head[ETH_HDR + 16..ETH_HDR + 20] == self.ip,
            _ => false,
        }
    }

    /// Offers a frame the guest transmits (Ethernet header first, no virtio header). Returns
    /// true when it was for MMDS: it is consumed and must not reach the TAP.
    pub fn intercept(&mut self, frame: &[u8]) -> bool {
        if !self.may_intercept(frame) {
            return false;
        }
        let Ok(p) = SlicedPacket::from_ethernet(frame) else {
            return false;
        };
        let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
            return false;
        };
        if !p.link_exts.is_empty() {
            return false;
        }
        let src_mac = eth.source();
        let taken = match (&p.net, &p.transport) {
            (Some(NetSlice::Arp(arp)), _) => match arp.to_packet().try_eth_ipv4() {
                Ok(a) if a.target_ipv4 == self.ip => {
                    if a.operation == ArpOperation::REQUEST {
                        self.arp_reply(&a);
                    }
                    true
                }
                _ => false,
            },
            (Some(NetSlice::Ipv4(ip)), transport) => {
                let h = ip.header();
                if h.destination() != self.ip || h.protocol() != IpNumber::TCP {
                    false
                } else if ip.is_payload_fragmented() {
                    // Our MSS keeps the guest from fragmenting; a fragment is dropped.
                    true
                } else {
                    match transport {
                        Some(TransportSlice::Tcp(tcp)) if tcp.destination_port() == HTTP_PORT => {
                            self.tcp(src_mac, h.source(), tcp);
                            true
                        }
                        _ => false,
                    }
                }
            }
            _ => false,
        };
        if taken {
            self.stats.intercepted += 1;
        }
        taken
    }

    /// Whether frames are waiting for the guest.
    pub fn has_frames(&self) -> bool {
        !self.control.is_empty() || self.conns.iter().any(Conn::has_output)
    }

    /// Writes the next frame for the guest into `buf` (at least [`MAX_FRAME_LEN`] bytes) and
    /// returns its length.
    pub fn pop_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        while let Some(f) = self.control.pop_front() {
            if let Some(dst) = buf.get_mut(..f.len()) {
                dst.copy_from_slice(&f);
                self.stats.delivered += 1;
                return Some(f.len());
            }
        }
        let n = self.conns.len();
        for i in 0..n {
            let c = (self.next_conn + i) % n;
            if let Some(len) = self.segment(c, buf) {
                self.next_conn = (c + 1) % n;
                self.stats.delivered += 1;
                return Some(len);
            }
        }
        None
    }

    fn push_control(&mut self, frame: Vec<u8>) {
        if self.control.len() >= MAX_CONTROL_FRAMES {
            self.stats.dropped += 1;
            return;
        }
        self.control.push_back(frame);
    }

    fn arp_reply(&mut self, req: &ArpEthIpv4Packet) {
        let reply = ArpEthIpv4Packet {
            operation: ArpOperation::REPLY,
            sender_mac: MMDS_MAC,
            sender_ipv4: self.ip,
            target_mac: req.sender_mac,
            target_ipv4: req.sender_ipv4,
        };
        let eth = Ethernet2Header {
            source: MMDS_MAC,
            destination: req.sender_mac,
            ether_type: EtherType::ARP,
        };
        let mut f = Vec::with_capacity(ETH_HDR + ArpEthIpv4Packet::LEN);
        f.extend_from_slice(&eth.to_bytes());
        f.extend_from_slice(&reply.to_bytes());
        self.push_control(f);
    }

    /// A reset answering `tcp` from a guest address no connection owns.
    fn reset(&mut self, mac: [u8; 6], ip: [u8; 4], tcp: &TcpSlice<'_>) {
        let b = PacketBuilder::ethernet2(MMDS_MAC, mac).ipv4(self.ip, ip, TTL);
        let b = if tcp.ack() {
            b.tcp(HTTP_PORT, tcp.source_port(), tcp.acknowledgment_number(), 0)
                .rst()
        } else {
            let len = tcp.payload().len() as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
            b.tcp(HTTP_PORT, tcp.source_port(), 0, 0)
                .rst()
                .ack(tcp.sequence_number().wrapping_add(len))
        };
        let mut f = vec![0u8; b.size(0)];
        if build(b, &[], &mut f).is_some() {
            self.stats.resets += 1;
            self.push_control(f);
        }
    }

    fn tcp(&mut self, mac: [u8; 6], ip: [u8; 4], tcp: &TcpSlice<'_>) {
        self.clock += 1;
        let port = tcp.source_port();
        let found = self
            .conns
            .iter()
            .position(|c| c.guest_ip == ip && c.guest_port == port);
        if tcp.rst() {
            if let Some(i) = found {
                self.remove(i);
            }
            return;
        }
        let i = match found {
            Some(i) if tcp.syn() && !tcp.ack() => {
                if self.conns[i].state == State::SynReceived
                    && self.conns[i].irs == tcp.sequence_number()
                {
                    // The guest did not get our SYN-ACK.
                    self.conns[i].syn_ack_due = true;
                    return;
                }
                // A new connection on the same port: the old one is gone.
                self.remove(i);
                self.accept(mac, ip, tcp);
                return;
            }
            Some(i) => i,
            None if tcp.syn() && !tcp.ack() => {
                self.accept(mac, ip, tcp);
                return;
            }
            None => {
                self.reset(mac, ip, tcp);
                return;
            }
        };
        if tcp.syn() {
            // SYN-ACK from the guest, or SYN on an open connection: not ours to accept.
            self.conns[i].ack_due = true;
            return;
        }
        let clock = self.clock;
        let c = &mut self.conns[i];
        c.last_used = clock;
        c.guest_mac = mac;
        if !tcp.ack() {
            // Every segment after the SYN carries an ACK (RFC 793).
            return;
        }
        match c.on_ack(tcp.acknowledgment_number()) {
            Acked::Fine => {}
            Acked::Ahead => {
                c.ack_due = true;
                return;
            }
            Acked::Bad => {
                self.reset(mac, ip, tcp);
                return;
            }
        }
        let c = &mut self.conns[i];
        c.peer_wnd = tcp.window_size();
        self.receive(i, tcp);
        self.serve(i);
        let c = &self.conns[i];
        if c.finished() && !c.ack_due {
            self.remove(i);
        }
    }

    /// Takes the payload and FIN of an in-order segment.
    fn receive(&mut self, i: usize, tcp: &TcpSlice<'_>) {
        let c = &mut self.conns[i];
        let payload = tcp.payload();
        let seq = tcp.sequence_number();
        if payload.is_empty() && !tcp.fin() {
            return;
        }
        // Anything but the next bytes (a retransmission, a gap) earns an ACK of where we are.
        c.ack_due = true;
        if c.peer_fin {
            return;
        }
        let end = seq.wrapping_add(payload.len() as u32);
        if seq_lt(c.rcv_nxt, seq) || seq_lt(end, c.rcv_nxt) {
            return;
        }
        let skip = c.rcv_nxt.wrapping_sub(seq) as usize;
        let fresh = payload.get(skip..).unwrap_or(&[]);
        let room = MAX_REQUEST_LEN.saturating_sub(c.request.len());
        let take = fresh.len().min(room);
        c.request.extend_from_slice(&fresh[..take]);
        c.rcv_nxt = c.rcv_nxt.wrapping_add(take as u32);
        if tcp.fin() && take == fresh.len() {
            c.peer_fin = true;
            c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
        }
    }

    /// Answers the next complete request, once the previous response is acknowledged.
    fn serve(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if !c.send.is_empty() || c.close_after_send || c.fin_sent || c.request.is_empty() {
            return;
        }
        match self.mmds.serve(&c.request, Instant::now()) {
            Served::Incomplete => {
                if c.peer_fin {
                    // The guest will send no more: a truncated request gets no answer.
                    c.request.clear();
                }
            }
            Served::Response {
                response,
                consumed,
                close,
            } => {
                c.request.drain(..consumed.min(c.request.len()));
                c.send = response;
                c.send_start = 0;
                c.sent = 0;
                c.close_after_send = close;
                if close {
                    c.request.clear();
                }
                self.stats.responses += 1;
            }
        }
    }

    fn accept(&mut self, mac: [u8; 6], ip: [u8; 4], syn: &TcpSlice<'_>) {
        if self.conns.len() >= MAX_CONNECTIONS {
            // The least recently used connection makes room (it gets a reset).
            if let Some(lru) = (0..self.conns.len()).min_by_key(|&i| self.conns[i].last_used) {
                let old = self.remove(lru);
                self.reset_conn(&old);
            }
        }
        let mss = syn
            .options_iterator()
            .find_map(|o| match o {
                Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                _ => None,
            })
            .unwrap_or(DEFAULT_MSS)
            .clamp(64, MAX_MSS);
        let iss = random_u32();
        self.conns.push(Conn {
            guest_mac: mac,
            guest_ip: ip,
            guest_port: syn.source_port(),
            state: State::SynReceived,
            iss,
            irs: syn.sequence_number(),
            rcv_nxt: syn.sequence_number().wrapping_add(1),
            snd_una: iss.wrapping_add(1),
            peer_wnd: syn.window_size(),
            mss,
            request: Vec::new(),
            send: Vec::new(),
            send_start: 0,
            sent: 0,
            close_after_send: false,
            fin_sent: false,
            fin_acked: false,
            peer_fin: false,
            ack_due: false,
            syn_ack_due: true,
            last_used: self.clock,
        });
    }

    fn remove(&mut self, i: usize) -> Conn {
        let c = self.conns.swap_remove(i);
        if self.next_conn >= self.conns.len() {
            self.next_conn = 0;
        }
        c
    }

    fn reset_conn(&mut self, c: &Conn) {
        let b = PacketBuilder::ethernet2(MMDS_MAC, c.guest_mac)
            .ipv4(self.ip, c.guest_ip, TTL)
            .tcp(HTTP_PORT, c.guest_port, c.snd_nxt(), 0)
            .rst()
            .ack(c.rcv_nxt);
        let mut f = vec![0u8; b.size(0)];
        if build(b, &[], &mut f).is_some() {
            self.stats.resets += 1;
            self.push_control(f);
        }
    }

    /// The next segment of connection `i`, if it has one to send.
    fn segment(&mut self, i: usize, buf: &mut [u8]) -> Option<usize> {
        let ip = self.ip;
        let c = &mut self.conns[i];
        let (mac, guest_ip, port) = (c.guest_mac, c.guest_ip, c.guest_port);
        let base = |seq: u32, wnd: u16| {
            PacketBuilder::ethernet2(MMDS_MAC, mac)
                .ipv4(ip, guest_ip, TTL)
                .tcp(HTTP_PORT, port, seq, wnd)
        };
        let wnd = c.window();
        if c.syn_ack_due {
            let b = base(c.iss, wnd)
                .syn()
                .ack(c.rcv_nxt)
                .options(&[TcpOptionElement::MaximumSegmentSize(MAX_MSS)])
                .ok()?;
            let n = build(b, &[], buf)?;
            c.syn_ack_due = false;
            return Some(n);
        }
        let len = c
            .sendable()
            .min(usize::from(c.mss))
            .min(buf.len().saturating_sub(ETH_HDR + 40));
        if len > 0 {
            let start = c.send_start + c.sent;
            let seq = c.snd_una.wrapping_add(c.sent as u32);
            let mut b = base(seq, wnd).ack(c.rcv_nxt);
            if len == c.unsent() {
                b = b.psh();
            }
            let n = build(b, &c.send[start..start + len], buf)?;
            c.sent += len;
            c.ack_due = false;
            return Some(n);
        }
        if c.fin_due() {
            let seq = c.snd_nxt();
            let n = build(base(seq, wnd).fin().ack(c.rcv_nxt), &[], buf)?;
            c.fin_sent = true;
            c.ack_due = false;
            return Some(n);
        }
        if c.ack_due {
            let n = build(base(c.snd_nxt(), wnd).ack(c.rcv_nxt), &[], buf)?;
            c.ack_due = false;
            let done = c.finished();
            if done {
                self.remove(i);
            }
            return Some(n);
        }
        None
    }
}

#[cfg(test)]
mod tests;
