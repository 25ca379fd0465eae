//! MMDS through the device: the guest's frames for MMDS stay out of the TAP and the answers
//! land in its receive buffers.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, NetSlice, PacketBuilder,
    SlicedPacket, TransportSlice,
};
use vessel_mmds::{Mmds, MmdsOptions, MMDS_MAC};
use vessel_virtio::DeviceHealth;

use super::super::{NetHandler, QueuePair, TapPoll};
use super::*;
use crate::net::testutil::{mem, Ring, TestIrq};
use crate::net::{feature, Backend, Tap};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
const GUEST_IP: [u8; 4] = [172, 16, 0, 2];
const MMDS_IP: [u8; 4] = [169, 254, 169, 254];
const RX_BASE: u64 = 0x1_0000;
const TX_BASE: u64 = 0x2_0000;

struct NoPoll;

impl TapPoll for NoPoll {
    fn set_tap_polled(&mut self, _: &Backend, _: u64, _: bool) {}
    fn forget(&mut self, _: &Backend) {}
}

fn fake_tap() -> (Tap, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors; the result is checked.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (Tap::from_fd(a, "fake0"), b)
}

fn tap_got(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    // SAFETY: writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

struct Setup<'a> {
    rx: Ring<'a>,
    tx: Ring<'a>,
    h: NetHandler,
    peer: OwnedFd,
    /// Next free TX buffer address.
    tx_addr: u64,
}

fn setup(m: &vessel_memory::GuestMemoryMmap, acked: u64, store: serde_json::Value) -> Setup<'_> {
    let rx = Ring::new(m, RX_BASE, 16);
    let tx = Ring::new(m, TX_BASE, 16);
    let (tap, peer) = fake_tap();
    let irq = Arc::new(TestIrq::default());
    let health = DeviceHealth::new(irq.clone());
    let pair = QueuePair::new(
        0,
        Backend::Tap(Arc::new(tap)),
        Some(rx.active(0)),
        Some(tx.active(1)),
    );
    let mut h = NetHandler::new(m.clone(), acked, irq, health, vec![pair], None);
    let mmds = Mmds::new(Arc::new(Mutex::new(store)), MmdsOptions::default());
    h.mmds = Some(MmdsPath::new(vessel_mmds::MmdsStack::new(mmds)));
    Setup {
        rx,
        tx,
        h,
        peer,
        tx_addr: 0x10_0000,
    }
}

impl Setup<'_> {
    /// The guest transmits `frame` (a virtio header is put in front).
    fn transmit(&mut self, frame: &[u8]) {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(frame);
        let addr = self.tx_addr;
        self.tx_addr += 0x1_0000;
        self.tx.write(addr, &f);
        self.tx.add(&[(addr, f.len() as u32, false)]);
        self.h.process_tx(0);
        assert!(self.tx.next_used().is_some());
    }

    /// Frames delivered into receive buffers at `addrs` (one 2 KiB buffer each).
    fn received(&mut self, addrs: &[u64]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rx.next_used() {
            let addr = addrs[head as usize];
            let data = self.rx.read(addr, len as usize);
            assert_eq!(&data[..10], &[0; 10], "a plain virtio header");
            assert_eq!(&data[10..12], &[1, 0], "num_buffers");
            out.push(data[VNET_HDR_LEN..].to_vec());
        }
        out
    }
}

fn arp_request() -> Vec<u8> {
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: GUEST_MAC,
        sender_ipv4: GUEST_IP,
        target_mac: [0; 6],
        target_ipv4: MMDS_IP,
    };
    let mut f = Ethernet2Header {
        source: GUEST_MAC,
        destination: [0xff; 6],
        ether_type: EtherType::ARP,
    }
    .to_bytes()
    .to_vec();
    f.extend_from_slice(&arp.to_bytes());
    f
}

fn tcp(seq: u32, ack: Option<u32>, syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(GUEST_MAC, MMDS_MAC)
        .ipv4(GUEST_IP, MMDS_IP, 64)
        .tcp(40000, 80, seq, 64000);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut f = Vec::new();
    b.write(&mut f, payload).unwrap();
    f
}

/// (seq, fin, payload) of an MMDS segment.
fn segment(f: &[u8]) -> (u32, bool, Vec<u8>) {
    let p = SlicedPacket::from_ethernet(f).unwrap();
    let Some(NetSlice::Ipv4(_)) = p.net else {
        panic!("not IPv4")
    };
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP")
    };
    (t.sequence_number(), t.fin(), t.payload().to_vec())
}

#[test]
fn arp_for_mmds_is_answered_and_other_frames_reach_the_tap() {
    let m = mem();
    let mut s = setup(&m, 0, serde_json::json!({}));
    let addrs: Vec<u64> = (0..4).map(|i| 0x40_0000 + i * 0x1000).collect();
    for &a in &addrs {
        s.rx.add(&[(a, 2048, true)]);
    }
    s.transmit(&arp_request());
    assert!(
        tap_got(&s.peer).is_none(),
        "the ARP request stays out of the TAP"
    );
    let got = s.received(&addrs);
    assert_eq!(got.len(), 1);
    let eth = Ethernet2Header::from_slice(&got[0]).unwrap().0;
    assert_eq!((eth.source, eth.destination), (MMDS_MAC, GUEST_MAC));
    assert_eq!(eth.ether_type, EtherType::ARP);

    // Anything else goes to the TAP as before.
    let mut other = arp_request();
    other[38..42].copy_from_slice(&[172, 16, 0, 1]);
    s.transmit(&other);
    let on_tap = tap_got(&s.peer).unwrap();
    assert_eq!(&on_tap[VNET_HDR_LEN..], &other[..]);
    assert!(s.received(&addrs).is_empty());
}

#[test]
fn an_http_request_through_the_device() {
    let m = mem();
    let mut s = setup(&m, 0, serde_json::json!({"latest": {"id": "i-42"}}));
    let addrs: Vec<u64> = (0..16).map(|i| 0x40_0000 + i * 0x1000).collect();
    for &a in &addrs[..8] {
        s.rx.add(&[(a, 2048, true)]);
    }
    s.transmit(&tcp(100, None, true, &[]));
    let got = s.received(&addrs);
    assert_eq!(got.len(), 1, "SYN-ACK");
    let (iss, _, _) = segment(&got[0]);
    s.transmit(&tcp(101, Some(iss + 1), false, &[]));
    let req = b"GET /latest/id HTTP/1.1\r\nConnection: close\r\n\r\n";
    s.transmit(&tcp(101, Some(iss + 1), false, req));
    let got = s.received(&addrs);
    assert_eq!(got.len(), 2, "the response and a FIN");
    let (seq, fin, payload) = segment(&got[0]);
    assert_eq!(seq, iss + 1);
    assert!(!fin);
    let text = String::from_utf8(payload).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\ni-42"), "{text}");
    assert!(segment(&got[1]).1);
    assert!(tap_got(&s.peer).is_none(), "nothing reached the TAP");
}

#[test]
fn frames_wait_for_receive_buffers() {
    let m = mem();
    let mut s = setup(&m, 0, serde_json::json!({}));
    s.transmit(&arp_request());
    assert!(s.rx.next_used().is_none(), "no buffers yet");
    let addr = 0x40_0000;
    s.rx.add(&[(addr, 2048, true)]);
    s.h.rx_kick(0, &mut NoPoll);
    assert_eq!(s.received(&[addr]).len(), 1);
}

#[test]
fn merged_buffers_split_a_frame() {
    let m = mem();
    let mut s = setup(&m, feature::MRG_RXBUF, serde_json::json!({}));
    let addrs = [0x40_0000u64, 0x41_0000];
    for &a in &addrs {
        s.rx.add(&[(a, 40, true)]);
    }
    // 12 + 42 bytes of ARP reply: two 40-byte buffers.
    s.transmit(&arp_request());
    let (h0, l0) = s.rx.next_used().unwrap();
    let (h1, l1) = s.rx.next_used().unwrap();
    assert_eq!((h0, l0, h1, l1), (0, 40, 1, 14));
    let mut data = s.rx.read(addrs[0], 40);
    data.extend(s.rx.read(addrs[1], 14));
    assert_eq!(&data[10..12], &[2, 0], "num_buffers");
    let eth = Ethernet2Header::from_slice(&data[VNET_HDR_LEN..])
        .unwrap()
        .0;
    assert_eq!(eth.source, MMDS_MAC);
}
