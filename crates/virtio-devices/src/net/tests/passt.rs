//! The worker on passt: frames both ways through a socket pair standing for passt, and
//! passt going away.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use vessel_virtio::{InterruptCause, VirtioDevice};
use vmm_sys_util::epoll::EventSet;

use super::*;

#[derive(Default)]
struct PasstPolls {
    polled: Vec<bool>,
    forgotten: usize,
    watched: usize,
    forgotten_fds: usize,
}

impl TapPoll for PasstPolls {
    fn set_tap_polled(&mut self, _: &Backend, _: u64, polled: bool) {
        self.polled.push(polled);
    }
    fn forget(&mut self, _: &Backend) {
        self.forgotten += 1;
    }
    fn watch(&mut self, _: &Backend, _: u64) {
        self.watched += 1;
    }
    fn forget_fd(&mut self, _: std::os::unix::io::RawFd) {
        self.forgotten_fds += 1;
    }
}

struct PasstSetup<'a> {
    rx: Ring<'a>,
    tx: Ring<'a>,
    h: NetHandler,
    peer: UnixStream,
    irq: Arc<TestIrq>,
    link: Arc<std::sync::atomic::AtomicBool>,
}

fn passt_setup(m: &GuestMemoryMmap, acked: u64) -> PasstSetup<'_> {
    let rx = Ring::new(m, RX_BASE, 16);
    let tx = Ring::new(m, TX_BASE, 16);
    let (ours, peer) = UnixStream::pair().unwrap();
    let stream = PasstStream::new(ours).unwrap();
    let backend = Backend::Passt(Arc::new(Mutex::new(stream)));
    let irq = Arc::new(TestIrq::default());
    let health = DeviceHealth::new(irq.clone());
    let pair = QueuePair::new(0, backend, Some(rx.active(0)), Some(tx.active(1)));
    let link = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let h = NetHandler::new(m.clone(), acked, irq.clone(), health, vec![pair], None)
        .with_link(link.clone());
    PasstSetup {
        rx,
        tx,
        h,
        peer,
        irq,
        link,
    }
}

fn framed(frame: &[u8]) -> Vec<u8> {
    let mut v = (frame.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

fn eth(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed))
        .collect()
}

#[test]
fn frames_from_passt_reach_the_guest_behind_a_plain_header() {
    let m = mem();
    let mut s = passt_setup(&m, feature::MRG_RXBUF | feature::STATUS);
    s.rx.write(0x10_0000, &[0xaa; 64]);
    let h1 = s.rx.add(&[(0x10_0000, 2048, true)]);
    let h2 = s.rx.add(&[(0x11_0000, 2048, true)]);
    let (f1, f2) = (eth(60, 1), eth(1514, 2));
    let mut bytes = framed(&f1);
    bytes.extend(framed(&f2));
    // The first frame whole, the second one split.
    s.peer.write_all(&bytes[..64 + 500]).unwrap();
    let mut polls = PasstPolls::default();
    s.h.process_rx(0, &mut polls);
    assert_eq!(s.rx.next_used(), Some((u32::from(h1), 12 + 60)));
    assert_eq!(s.rx.next_used(), None, "half a frame waits");
    let got = s.rx.read(0x10_0000, 12 + 60);
    let mut hdr = [0u8; 12];
    hdr[10] = 1; // num_buffers
    assert_eq!(&got[..12], &hdr);
    assert_eq!(&got[12..], &f1[..]);
    s.peer.write_all(&bytes[64 + 500..]).unwrap();
    s.h.passt_event(0, EventSet::IN, &mut polls);
    assert_eq!(s.rx.next_used(), Some((u32::from(h2), 12 + 1514)));
    assert_eq!(s.rx.read(0x11_0000 + 12, 1514), f2);
    assert_eq!(s.h.stats.rx_frames, 2);
    assert_eq!(s.h.stats.rx_bytes, 60 + 1514);
    assert!(s.irq.count() >= 2);
    assert!(s.link.load(std::sync::atomic::Ordering::Acquire));
}

#[test]
fn a_frame_waits_in_the_stream_until_the_guest_has_room() {
    let m = mem();
    let mut s = passt_setup(&m, feature::MRG_RXBUF);
    let f = eth(3000, 3);
    s.peer.write_all(&framed(&f)).unwrap();
    let mut polls = PasstPolls::default();
    s.rx.add(&[(0x10_0000, 2048, true)]);
    s.h.process_rx(0, &mut polls);
    assert_eq!(s.rx.next_used(), None, "3012 bytes do not fit in 2048");
    assert_eq!(polls.polled, vec![false]);
    s.rx.add(&[(0x11_0000, 2048, true)]);
    s.h.rx_kick(0, &mut polls);
    assert_eq!(s.rx.next_used().map(|u| u.1), Some(2048));
    assert_eq!(s.rx.next_used().map(|u| u.1), Some(3012 - 2048));
    assert_eq!(s.rx.read(0x10_0000 + 10, 2), vec![2, 0], "num_buffers");
    let mut got = s.rx.read(0x10_0000 + 12, 2048 - 12);
    got.extend(s.rx.read(0x11_0000, 3012 - 2048));
    assert_eq!(got, f);
}

#[test]
fn guest_frames_reach_passt_with_their_length_and_without_the_header() {
    let m = mem();
    let mut s = passt_setup(&m, 0);
    let mut f = vec![0u8; VNET_HDR_LEN];
    let body = eth(100, 4);
    f.extend_from_slice(&body);
    s.tx.write(0x10_0000, &f[..20]);
    s.tx.write(0x20_0000, &f[20..]);
    let head = s.tx.add(&[(0x10_0000, 20, false), (0x20_0000, 92, false)]);
    s.tx.write(0x30_0000, &f);
    s.tx.add(&[(0x30_0000, 112, false)]);
    s.h.process_tx(0);
    assert_eq!(s.tx.next_used(), Some((u32::from(head), 0)));
    let mut got = vec![0u8; 2 * 104];
    s.peer.read_exact(&mut got).unwrap();
    assert_eq!(got[..104], framed(&body)[..]);
    assert_eq!(got[104..], framed(&body)[..]);
    assert_eq!(s.h.stats.tx_frames, 2);
    assert_eq!(s.h.stats.tx_bytes, 200);
}

#[test]
fn when_passt_goes_away_the_link_goes_down_and_frames_are_dropped() {
    let m = mem();
    let mut s = passt_setup(&m, feature::STATUS);
    s.rx.add(&[(0x10_0000, 2048, true)]);
    drop(s.peer);
    let mut polls = PasstPolls::default();
    s.h.passt_event(0, EventSet::IN | EventSet::HANG_UP, &mut polls);
    s.h.passt_sync(&mut polls);
    assert_eq!(polls.forgotten, 1, "the socket leaves the epoll set");
    assert!(!s.link.load(std::sync::atomic::Ordering::Acquire));
    assert!(s
        .irq
        .causes
        .lock()
        .unwrap()
        .contains(&InterruptCause::Config));
    // Once only.
    s.h.passt_sync(&mut polls);
    assert_eq!(polls.forgotten, 1);
    // The guest still sends: its frames are completed and dropped.
    let f = vec![0u8; VNET_HDR_LEN + 60];
    s.tx.write(0x30_0000, &f);
    let head = s.tx.add(&[(0x30_0000, f.len() as u32, false)]);
    s.h.process_tx(0);
    assert_eq!(s.tx.next_used(), Some((u32::from(head), 0)));
    assert_eq!(s.h.stats.tx_errors, 1);
    assert_eq!(s.rx.next_used(), None);
}

#[test]
fn a_desynchronized_stream_takes_the_link_down() {
    let m = mem();
    let mut s = passt_setup(&m, 0);
    s.rx.add(&[(0x10_0000, 2048, true)]);
    s.peer
        .write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .unwrap();
    let mut polls = PasstPolls::default();
    s.h.passt_event(0, EventSet::IN, &mut polls);
    s.h.passt_sync(&mut polls);
    assert_eq!(polls.forgotten, 1);
    assert!(!s.link.load(std::sync::atomic::Ordering::Acquire));
    // Without F_STATUS the driver is not told.
    assert!(!s
        .irq
        .causes
        .lock()
        .unwrap()
        .contains(&InterruptCause::Config));
}

#[test]
fn passt_devices_offer_no_offloads_and_report_the_link() {
    let (ours, peer) = UnixStream::pair().unwrap();
    let net = Net::on_passt(
        PasstStream::new(ours).unwrap(),
        None,
        Some([2, 0, 0, 0, 0, 9]),
    )
    .unwrap();
    let f = net.avail_features();
    let offloads = feature::CSUM
        | feature::GUEST_CSUM
        | feature::GUEST_TSO4
        | feature::GUEST_TSO6
        | feature::GUEST_ECN
        | feature::GUEST_UFO
        | feature::HOST_TSO4
        | feature::HOST_TSO6
        | feature::HOST_ECN
        | feature::HOST_UFO;
    assert_eq!(f & offloads, 0);
    assert_eq!(f & (feature::MQ | feature::CTRL_VQ), 0);
    assert_ne!(f & feature::STATUS, 0);
    assert_eq!(net.queue_max_sizes().len(), 2);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), vn::VIRTIO_NET_S_LINK_UP as u16);
    net.link_up
        .store(false, std::sync::atomic::Ordering::Release);
    net.read_config(6, &mut status);
    assert_eq!(status, [0, 0]);
    assert_eq!(net.tap_name(), "");
    drop(peer);
}

#[test]
fn a_new_passt_from_the_keeper_replaces_the_dead_stream_and_the_link_comes_back() {
    use crate::net::passt::keeper::{control_pair, send_msg, KeeperControl};
    use std::os::unix::io::AsRawFd;
    use std::sync::atomic::Ordering;
    let m = mem();
    let mut s = passt_setup(&m, feature::STATUS);
    let (ours, keeper) = control_pair().unwrap();
    s.h = s.h.with_keeper(Some(Arc::new(KeeperControl::new(ours))));
    let irq = s.irq.clone();
    let configs = || {
        irq.causes
            .lock()
            .unwrap()
            .iter()
            .filter(|&&c| c == InterruptCause::Config)
            .count()
    };
    let mut polls = PasstPolls::default();
    // passt dies: the link goes down.
    drop(s.peer);
    s.h.passt_event(0, EventSet::IN | EventSet::HANG_UP, &mut polls);
    s.h.passt_sync(&mut polls);
    assert!(!s.link.load(Ordering::Acquire));
    assert_eq!(polls.forgotten, 1);
    assert_eq!(configs(), 1);
    // Nothing from the keeper yet.
    s.h.keeper_event(&mut polls);
    assert_eq!(polls.watched, 0);
    // The keeper sends a new passt's socket: the link comes back up.
    let (new_ours, mut peer) = UnixStream::pair().unwrap();
    send_msg(
        keeper.as_raw_fd(),
        &[b'F', 7, 0, 0, 0],
        Some(new_ours.as_raw_fd()),
    )
    .unwrap();
    drop(new_ours);
    s.h.keeper_event(&mut polls);
    s.h.passt_sync(&mut polls);
    assert!(s.link.load(Ordering::Acquire));
    assert_eq!(polls.watched, 1, "the new socket is watched");
    assert_eq!(polls.forgotten, 1, "the dead one was already forgotten");
    assert_eq!(configs(), 2);
    // Frames flow both ways through the new stream.
    let f = eth(60, 9);
    let h = s.rx.add(&[(0x10_0000, 2048, true)]);
    peer.write_all(&framed(&f)).unwrap();
    s.h.passt_event(0, EventSet::IN, &mut polls);
    assert_eq!(s.rx.next_used(), Some((u32::from(h), 12 + 60)));
    assert_eq!(s.rx.read(0x10_0000 + 12, 60), f);
    let mut t = vec![0u8; VNET_HDR_LEN];
    t.extend_from_slice(&eth(80, 3));
    s.tx.write(0x30_0000, &t);
    s.tx.add(&[(0x30_0000, t.len() as u32, false)]);
    s.h.process_tx(0);
    let mut got = vec![0u8; 84];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, framed(&t[VNET_HDR_LEN..]));
    // A failure to start passt is only logged; the keeper's end is forgotten once.
    send_msg(keeper.as_raw_fd(), b"Eno passt", None).unwrap();
    s.h.keeper_event(&mut polls);
    assert_eq!(polls.forgotten_fds, 0);
    drop(keeper);
    s.h.keeper_event(&mut polls);
    s.h.keeper_event(&mut polls);
    assert_eq!(polls.forgotten_fds, 1);
    assert!(s.link.load(Ordering::Acquire), "the live stream stays up");
}
