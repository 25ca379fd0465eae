use super::*;
use crate::service::{MmdsOptions, Version};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const GUEST_IP: [u8; 4] = [172, 16, 0, 2];
const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

fn stack_with(version: Version, store: Value) -> MmdsStack {
    let mmds = Mmds::new(
        Arc::new(Mutex::new(store)),
        MmdsOptions {
            version,
            ..Default::default()
        },
    );
    MmdsStack::new(mmds)
}

fn stack() -> MmdsStack {
    stack_with(
        Version::V1,
        json!({"latest": {"meta-data": {"ami-id": "ami-1234"}}}),
    )
}

fn pop_all(s: &mut MmdsStack) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; MAX_FRAME_LEN];
    while let Some(n) = s.pop_frame(&mut buf) {
        out.push(buf[..n].to_vec());
        assert!(out.len() < 10_000, "pop_frame never runs dry");
    }
    assert!(!s.has_frames(), "has_frames agrees with pop_frame");
    out
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: GUEST_MAC,
        sender_ipv4: GUEST_IP,
        target_mac: [0; 6],
        target_ipv4: target,
    };
    let eth = Ethernet2Header {
        source: GUEST_MAC,
        destination: [0xff; 6],
        ether_type: EtherType::ARP,
    };
    let mut f = eth.to_bytes().to_vec();
    f.extend_from_slice(&arp.to_bytes());
    f
}

/// A segment as the guest sees it.
#[derive(Debug)]
struct Seg {
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    psh: bool,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

fn parse_seg(f: &[u8], port: u16) -> Seg {
    let p = SlicedPacket::from_ethernet(f).expect("a valid frame");
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!("not Ethernet")
    };
    assert_eq!(eth.source(), MMDS_MAC);
    assert_eq!(eth.destination(), GUEST_MAC);
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip.header().source(), MMDS_IP);
    assert_eq!(ip.header().destination(), GUEST_IP);
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    assert_eq!((t.source_port(), t.destination_port()), (HTTP_PORT, port));
    // Our checksums are complete: the guest checks them.
    let sum = t
        .calc_checksum_ipv4(ip.header().source(), ip.header().destination())
        .unwrap();
    assert_eq!(sum, t.checksum(), "TCP checksum");
    assert_eq!(
        ip.header().to_header().calc_header_checksum(),
        ip.header().header_checksum()
    );
    Seg {
        seq: t.sequence_number(),
        ack: t.ack().then(|| t.acknowledgment_number()),
        syn: t.syn(),
        fin: t.fin(),
        rst: t.rst(),
        psh: t.psh(),
        window: t.window_size(),
        mss: t.options_iterator().find_map(|o| match o {
            Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
            _ => None,
        }),
        payload: t.payload().to_vec(),
    }
}

/// The guest end of one connection.
struct Guest {
    port: u16,
    seq: u32,
    /// Next byte expected from MMDS.
    rcv: u32,
    window: u16,
    received: Vec<u8>,
    got_fin: bool,
}

impl Guest {
    fn new(port: u16) -> Guest {
        Guest {
            port,
            seq: 1000,
            rcv: 0,
            window: 64240,
            received: Vec::new(),
            got_fin: false,
        }
    }

    fn frame(&self, flags: &str, payload: &[u8], options: &[TcpOptionElement]) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(GUEST_MAC, MMDS_MAC)
            .ipv4(GUEST_IP, MMDS_IP, 64)
            .tcp(self.port, HTTP_PORT, self.seq, self.window);
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('A') {
            b = b.ack(self.rcv);
        }
        if flags.contains('F') {
            b = b.fin();
        }
        if flags.contains('R') {
            b = b.rst();
        }
        if !options.is_empty() {
            b = b.options(options).unwrap();
        }
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    fn send(&mut self, s: &mut MmdsStack, flags: &str, payload: &[u8]) {
        let f = self.frame(flags, payload, &[]);
        assert!(s.intercept(&f), "MMDS takes the segment");
        self.seq = self
            .seq
            .wrapping_add(payload.len() as u32)
            .wrapping_add(u32::from(flags.contains('F')));
    }

    /// Opens the connection: SYN, SYN-ACK, ACK.
    fn connect(&mut self, s: &mut MmdsStack, mss: u16) {
        let syn = self.frame("S", &[], &[TcpOptionElement::MaximumSegmentSize(mss)]);
        assert!(s.intercept(&syn));
        self.seq += 1;
        let out = pop_all(s);
        assert_eq!(out.len(), 1);
        let sa = parse_seg(&out[0], self.port);
        assert!(sa.syn && !sa.rst && !sa.fin);
        assert_eq!(sa.ack, Some(self.seq));
        assert_eq!(sa.mss, Some(1460));
        assert_eq!(usize::from(sa.window), MAX_REQUEST_LEN);
        self.rcv = sa.seq.wrapping_add(1);
        self.send(s, "A", &[]);
        assert!(pop_all(s).is_empty(), "the handshake's ACK needs no answer");
    }

    /// Takes MMDS's segments in order, acknowledging each batch, until it stops sending.
    fn receive_all(&mut self, s: &mut MmdsStack) {
        loop {
            let out = pop_all(s);
            if out.is_empty() {
                return;
            }
            for f in &out {
                let seg = parse_seg(f, self.port);
                assert!(!seg.rst, "unexpected reset");
                assert_eq!(seg.seq, self.rcv, "in order");
                assert_eq!(seg.ack, Some(self.seq));
                assert!(seg.payload.len() <= 1460);
                self.received.extend_from_slice(&seg.payload);
                self.rcv = self.rcv.wrapping_add(seg.payload.len() as u32);
                if seg.fin {
                    self.got_fin = true;
                    self.rcv = self.rcv.wrapping_add(1);
                }
            }
            self.send(s, "A", &[]);
        }
    }
}

fn body_of(response: &[u8]) -> (u16, String) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(n) = r.parse(response).unwrap() else {
        panic!("partial response")
    };
    (
        r.code.unwrap(),
        String::from_utf8_lossy(&response[n..]).into_owned(),
    )
}

#[test]
fn answers_arp_for_its_address_only() {
    let mut s = stack();
    assert!(s.intercept(&arp_request(MMDS_IP)));
    let out = pop_all(&mut s);
    assert_eq!(out.len(), 1);
    let eth = Ethernet2Header::from_slice(&out[0]).unwrap().0;
    assert_eq!(
        (eth.source, eth.destination, eth.ether_type),
        (MMDS_MAC, GUEST_MAC, EtherType::ARP)
    );
    let reply = ArpPacketSliceOwned::parse(&out[0][14..]);
    assert_eq!(reply.operation, ArpOperation::REPLY);
    assert_eq!((reply.sender_mac, reply.sender_ipv4), (MMDS_MAC, MMDS_IP));
    assert_eq!((reply.target_mac, reply.target_ipv4), (GUEST_MAC, GUEST_IP));

    assert!(!s.intercept(&arp_request([172, 16, 0, 1])));
    assert!(pop_all(&mut s).is_empty());
}

/// Parses an Ethernet/IPv4 ARP packet.
struct ArpPacketSliceOwned;

impl ArpPacketSliceOwned {
    fn parse(b: &[u8]) -> ArpEthIpv4Packet {
        etherparse::ArpPacket::from_slice(b)
            .unwrap()
            .try_eth_ipv4()
            .unwrap()
    }
}

#[test]
fn other_traffic_goes_to_the_tap() {
    let mut s = stack();
    let frames = [
        // TCP to another address.
        {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(GUEST_MAC, [2; 6])
                .ipv4(GUEST_IP, [172, 16, 0, 1], 64)
                .tcp(40000, 80, 1, 100)
                .syn()
                .write(&mut f, &[])
                .unwrap();
            f
        },
        // UDP and another TCP port on the MMDS address.
        {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(GUEST_MAC, MMDS_MAC)
                .ipv4(GUEST_IP, MMDS_IP, 64)
                .udp(40000, 80)
                .write(&mut f, b"x")
                .unwrap();
            f
        },
        {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(GUEST_MAC, MMDS_MAC)
                .ipv4(GUEST_IP, MMDS_IP, 64)
                .tcp(40000, 22, 1, 100)
                .syn()
                .write(&mut f, &[])
                .unwrap();
            f
        },
        // IPv6.
        {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(GUEST_MAC, MMDS_MAC)
                .ipv6([1; 16], [2; 16], 64)
                .tcp(40000, 80, 1, 100)
                .write(&mut f, &[])
                .unwrap();
            f
        },
    ];
    for f in &frames {
        assert!(!s.intercept(f));
    }
    assert!(pop_all(&mut s).is_empty());
    assert_eq!(s.stats().intercepted, 0);
}

#[test]
fn a_whole_v1_exchange() {
    let mut s = stack();
    let mut g = Guest::new(40000);
    g.connect(&mut s, 1460);
    assert_eq!(s.connections(), 1);
    g.send(
        &mut s,
        "A",
        b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
    );
    // The response, then FIN (Connection: close).
    let out = pop_all(&mut s);
    assert_eq!(out.len(), 2, "one data segment and a FIN");
    let data = parse_seg(&out[0], g.port);
    assert_eq!(data.seq, g.rcv);
    assert_eq!(data.ack, Some(g.seq));
    assert!(data.psh);
    let (status, body) = body_of(&data.payload);
    assert_eq!((status, body.as_str()), (200, "ami-1234"));
    let fin = parse_seg(&out[1], g.port);
    assert!(fin.fin && fin.payload.is_empty());
    assert_eq!(fin.seq, g.rcv.wrapping_add(data.payload.len() as u32));
    g.rcv = fin.seq.wrapping_add(1);
    // The guest acknowledges everything and closes its side; MMDS acknowledges the FIN and
    // forgets the connection.
    g.send(&mut s, "AF", &[]);
    let out = pop_all(&mut s);
    assert_eq!(out.len(), 1);
    let last = parse_seg(&out[0], g.port);
    assert_eq!(last.ack, Some(g.seq));
    assert!(!last.fin && !last.rst);
    assert_eq!(s.connections(), 0);
    assert_eq!(s.stats().responses, 1);
}

#[test]
fn the_guest_closing_first_gets_the_response_then_a_fin() {
    let mut s = stack();
    let mut g = Guest::new(40001);
    g.connect(&mut s, 1460);
    // HTTP/1.1 without Connection: close, then the guest's FIN in the same segment.
    g.send(&mut s, "AF", b"GET /latest HTTP/1.1\r\n\r\n");
    g.receive_all(&mut s);
    let (status, body) = body_of(&g.received);
    assert_eq!((status, body.as_str()), (200, "meta-data/"));
    assert!(g.got_fin);
    assert_eq!(s.connections(), 0);
}

#[test]
fn v2_token_and_get_on_one_connection() {
    let mut s = stack_with(Version::V2, json!({"k": "v"}));
    let mut g = Guest::new(40002);
    g.connect(&mut s, 1460);
    g.send(&mut s, "A", b"GET /k HTTP/1.1\r\n\r\n");
    g.receive_all(&mut s);
    assert_eq!(body_of(&g.received).0, 401);
    g.received.clear();
    g.send(
        &mut s,
        "A",
        b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
    );
    g.receive_all(&mut s);
    let (status, token) = body_of(&g.received);
    assert_eq!(status, 200);
    g.received.clear();
    let req = format!("GET /k HTTP/1.1\r\nX-metadata-token: {token}\r\nConnection: close\r\n\r\n");
    g.send(&mut s, "A", req.as_bytes());
    g.receive_all(&mut s);
    assert_eq!(body_of(&g.received), (200, "v".to_string()));
    assert!(g.got_fin);
}

#[test]
fn large_responses_respect_mss_and_window() {
    let big: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut s = stack_with(Version::V1, json!({ "big": big }));
    let mut g = Guest::new(40003);
    g.window = 2000;
    g.connect(&mut s, 536);
    g.send(&mut s, "A", b"GET /big HTTP/1.0\r\n\r\n");
    let mut in_flight_max = 0;
    loop {
        let out = pop_all(&mut s);
        if out.is_empty() {
            break;
        }
        let mut batch = 0;
        for f in &out {
            let seg = parse_seg(f, g.port);
            assert!(seg.payload.len() <= 536, "MSS respected");
            assert_eq!(seg.seq, g.rcv);
            batch += seg.payload.len();
            g.received.extend_from_slice(&seg.payload);
            g.rcv = g
                .rcv
                .wrapping_add(seg.payload.len() as u32 + u32::from(seg.fin));
            g.got_fin |= seg.fin;
        }
        in_flight_max = in_flight_max.max(batch);
        g.send(&mut s, "A", &[]);
    }
    assert!(in_flight_max <= 2000, "window respected: {in_flight_max}");
    assert_eq!(body_of(&g.received), (200, big));
    assert!(g.got_fin);
}

#[test]
fn a_zero_window_stalls_until_the_guest_opens_it() {
    let mut s = stack();
    let mut g = Guest::new(40004);
    g.connect(&mut s, 1460);
    g.window = 0;
    g.send(&mut s, "A", b"GET /latest HTTP/1.0\r\n\r\n");
    // Only the ACK of the request.
    let out = pop_all(&mut s);
    assert_eq!(out.len(), 1);
    assert!(parse_seg(&out[0], g.port).payload.is_empty());
    g.window = 1000;
    g.send(&mut s, "A", &[]);
    g.receive_all(&mut s);
    assert_eq!(body_of(&g.received).0, 200);
}

#[test]
fn retransmissions_are_acknowledged_not_served_twice() {
    let mut s = stack();
    let mut g = Guest::new(40005);
    // A SYN retransmitted before the SYN-ACK arrived gets the same SYN-ACK.
    let syn = g.frame("S", &[], &[]);
    assert!(s.intercept(&syn));
    assert!(s.intercept(&syn));
    let out = pop_all(&mut s);
    assert_eq!(out.len(), 1, "pending SYN-ACK not duplicated in the queue");
    let first = parse_seg(&out[0], g.port).seq;
    assert!(s.intercept(&syn));
    let again = pop_all(&mut s);
    assert_eq!(parse_seg(&again[0], g.port).seq, first);
    g.seq += 1;
    g.rcv = first.wrapping_add(1);
    g.send(&mut s, "A", &[]);

    let req = b"GET /latest HTTP/1.1\r\n\r\n";
    g.send(&mut s, "A", req);
    g.receive_all(&mut s);
    let once = g.received.clone();
    // The same bytes again (the guest missed our ACK): an ACK, no second response.
    g.seq = g.seq.wrapping_sub(req.len() as u32);
    g.send(&mut s, "A", req);
    let out = pop_all(&mut s);
    assert_eq!(out.len(), 1);
    let ack = parse_seg(&out[0], g.port);
    assert!(ack.payload.is_empty());
    assert_eq!(ack.ack, Some(g.seq));
    assert_eq!(s.stats().responses, 1);
    assert_eq!(body_of(&once).0, 200);
}

#[test]
fn segments_of_no_connection_are_reset() {
    let mut s = stack();
    let mut g = Guest::new(40006);
    g.rcv = 5555;
    g.send(&mut s, "A", b"GET / HTTP/1.1\r\n\r\n");
    let out = pop_all(&mut s);
    assert_eq!(out.len(), 1);
    let rst = parse_seg(&out[0], g.port);
    assert!(rst.rst);
    assert_eq!(
        rst.seq, 5555,
        "RST takes the sequence number the segment acknowledged"
    );
    // A FIN without ACK: reset acknowledging it.
    let f = g.frame("F", &[], &[]);
    assert!(s.intercept(&f));
    let rst = parse_seg(&pop_all(&mut s)[0], g.port);
    assert!(rst.rst);
    assert_eq!(rst.ack, Some(g.seq.wrapping_add(1)));
    // A reset is never answered.
    let f = g.frame("R", &[], &[]);
    assert!(s.intercept(&f));
    assert!(pop_all(&mut s).is_empty());
    assert_eq!(s.connections(), 0);
}

#[test]
fn the_guest_resetting_ends_the_connection() {
    let mut s = stack();
    let mut g = Guest::new(40007);
    g.connect(&mut s, 1460);
    g.send(&mut s, "R", &[]);
    assert_eq!(s.connections(), 0);
    assert!(pop_all(&mut s).is_empty());
}

#[test]
fn connections_are_bounded_and_the_oldest_goes() {
    let mut s = stack();
    let mut guests: Vec<Guest> = (0..MAX_CONNECTIONS as u16)
        .map(|i| Guest::new(41000 + i))
        .collect();
    for g in &mut guests {
        g.connect(&mut s, 1460);
    }
    assert_eq!(s.connections(), MAX_CONNECTIONS);
    let mut late = Guest::new(42000);
    let syn = late.frame("S", &[], &[]);
    assert!(s.intercept(&syn));
    assert_eq!(s.connections(), MAX_CONNECTIONS);
    let out = pop_all(&mut s);
    let segs: Vec<(u16, Seg)> = out
        .iter()
        .map(|f| {
            let t = SlicedPacket::from_ethernet(f).unwrap();
            let Some(TransportSlice::Tcp(t)) = t.transport else {
                panic!()
            };
            let port = t.destination_port();
            (port, parse_seg(f, port))
        })
        .collect();
    assert!(
        segs.iter().any(|(p, s)| *p == 41000 && s.rst),
        "the oldest is reset"
    );
    assert!(segs.iter().any(|(p, s)| *p == 42000 && s.syn));
    late.seq += 1;
    // The evicted guest's next segment is reset.
    guests[0].send(&mut s, "A", b"GET / HTTP/1.1\r\n\r\n");
    let out = pop_all(&mut s);
    assert!(parse_seg(&out[0], 41000).rst);
}

#[test]
fn requests_larger_than_the_limit_get_413_and_close() {
    let mut s = stack();
    let mut g = Guest::new(40008);
    g.connect(&mut s, 1460);
    let mut req = b"GET /latest HTTP/1.1\r\nX-Pad: ".to_vec();
    req.resize(MAX_REQUEST_LEN + 2000, b'a');
    // The guest sends what the window allows; MMDS takes no more than its limit.
    let mut off = 0;
    while off < req.len() {
        let n = (req.len() - off).min(1460);
        let f = g.frame("A", &req[off..off + n], &[]);
        assert!(s.intercept(&f));
        let out = pop_all(&mut s);
        let mut advanced = false;
        for f in &out {
            let seg = parse_seg(f, g.port);
            if let Some(a) = seg.ack {
                if a != g.seq {
                    let took = a.wrapping_sub(g.seq);
                    g.seq = a;
                    off += took as usize;
                    advanced = true;
                }
            }
            g.received.extend_from_slice(&seg.payload);
            g.rcv = g
                .rcv
                .wrapping_add(seg.payload.len() as u32 + u32::from(seg.fin));
            g.got_fin |= seg.fin;
        }
        if g.got_fin || !advanced {
            break;
        }
    }
    assert!(off <= MAX_REQUEST_LEN, "took {off} bytes");
    assert_eq!(body_of(&g.received).0, 413);
    assert!(g.got_fin);
}

#[test]
fn hostile_frames_never_panic() {
    let mut s = stack();
    // Every truncation of valid frames.
    let mut g = Guest::new(40009);
    let valid = [
        arp_request(MMDS_IP),
        g.frame("S", &[], &[TcpOptionElement::MaximumSegmentSize(1460)]),
        g.frame("A", b"GET / HTTP/1.1\r\n\r\n", &[]),
    ];
    for f in &valid {
        for n in 0..=f.len() {
            let _ = s.intercept(&f[..n]);
        }
    }
    let _ = pop_all(&mut s);
    // Corrupt each byte of a request segment in turn.
    g.connect(&mut s, 1460);
    let f = g.frame("A", b"GET / HTTP/1.1\r\n\r\n", &[]);
    for i in 0..f.len() {
        for v in [0u8, 0xff, 0x45, 0x50] {
            let mut bad = f.clone();
            bad[i] = v;
            let _ = s.intercept(&bad);
        }
        let _ = pop_all(&mut s);
    }
    // Random bytes, with the MMDS address and ethertype planted so they get parsed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let len = (next() % 200) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if f.len() >= 42 {
            match next() % 3 {
                0 => {
                    f[12..14].copy_from_slice(&[0x08, 0x06]);
                    f[38..42].copy_from_slice(&MMDS_IP);
                }
                _ => {
                    f[12..14].copy_from_slice(&[0x08, 0x00]);
                    f[14] = 0x45;
                    f[23] = 6;
                    f[30..34].copy_from_slice(&MMDS_IP);
                    if f.len() > 38 {
                        f[36..38].copy_from_slice(&80u16.to_be_bytes());
                    }
                }
            }
        }
        let _ = s.intercept(&f);
        if next() % 4 == 0 {
            let _ = pop_all(&mut s);
        }
    }
    assert!(s.connections() <= MAX_CONNECTIONS);
    // A small buffer gets no frame rather than a cut one.
    assert!(s.intercept(&arp_request(MMDS_IP)));
    let mut tiny = [0u8; 10];
    assert_eq!(s.pop_frame(&mut tiny), None);
}

#[test]
fn control_frames_are_bounded() {
    let mut s = stack();
    for _ in 0..MAX_CONTROL_FRAMES * 4 {
        assert!(s.intercept(&arp_request(MMDS_IP)));
    }
    assert_eq!(pop_all(&mut s).len(), MAX_CONTROL_FRAMES);
    assert_eq!(s.stats().dropped as usize, MAX_CONTROL_FRAMES * 3);
}
