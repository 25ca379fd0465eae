use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use super::testutil::{mem, Ring, TestIrq};
use super::worker::{NetHandler, QueuePair, TapPoll};
use super::*;
use vessel_memory::GuestMemoryMmap;
use vessel_virtio::DeviceHealth;

/// A datagram socket pair: one end plays the TAP, the test holds the other.
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

fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: reads `data.len()` bytes from `data`.
    let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(n, data.len() as isize, "{}", io::Error::last_os_error());
}

fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
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
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

#[derive(Default)]
struct Polls(Vec<bool>);

impl TapPoll for Polls {
    fn forget(&mut self, _: &Backend) {}
    fn set_tap_polled(&mut self, _: &Backend, _: u64, polled: bool) {
        self.0.push(polled);
    }
}

const RX_BASE: u64 = 0x1_0000;
const TX_BASE: u64 = 0x2_0000;
const CTRL_BASE: u64 = 0x3_0000;

struct Setup<'a> {
    rx: Ring<'a>,
    tx: Ring<'a>,
    h: NetHandler,
    peer: OwnedFd,
    irq: Arc<TestIrq>,
    health: DeviceHealth,
}

fn setup(m: &GuestMemoryMmap, acked: u64) -> Setup<'_> {
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
    let h = NetHandler::new(
        m.clone(),
        acked,
        irq.clone(),
        health.clone(),
        vec![pair],
        None,
    );
    Setup {
        rx,
        tx,
        h,
        peer,
        irq,
        health,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    // A virtio_net_hdr_v1 (no offloads) followed by `len` bytes of frame.
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

#[test]
fn tx_gathers_the_chain_into_one_frame() {
    let m = mem();
    let mut s = setup(&m, 0);
    let f = frame(100, 1);
    // Header and the first 30 bytes in one buffer, the rest in another.
    s.tx.write(0x10_0000, &f[..42]);
    s.tx.write(0x20_0000, &f[42..]);
    let head = s.tx.add(&[(0x10_0000, 42, false), (0x20_0000, 70, false)]);
    s.h.process_tx(0);
    assert_eq!(recv(&s.peer).unwrap(), f);
    assert_eq!(s.tx.next_used(), Some((u32::from(head), 0)));
    assert_eq!(s.h.stats.tx_frames, 1);
    assert_eq!(s.h.stats.tx_bytes, 100);
    assert_eq!(s.irq.count(), 1);
}

#[test]
fn tx_drops_hostile_chains() {
    let m = mem();
    let mut s = setup(&m, 0);
    s.tx.add(&[(0x10_0000, 8, false)]); // shorter than the header
    s.tx.add(&[(0x10_0000, 40, false), (0x11_0000, 40, true)]); // device-writable part
    s.tx.add(&[(0x2000_0000, 64, false)]); // outside guest memory
    s.tx.add(&[(0xff_fff0, 64, false)]); // runs past the end of guest memory
    s.tx.add(&[(0x10_0000, 100_000, false)]); // larger than any frame
    s.h.process_tx(0);
    for _ in 0..5 {
        assert_eq!(s.tx.next_used().unwrap().1, 0);
    }
    assert!(recv(&s.peer).is_none(), "nothing may reach the TAP");
    assert_eq!(s.h.stats.bad_chains, 5);
    assert!(!s.health.is_broken());
    // The queue still works.
    let f = frame(60, 3);
    s.tx.write(0x10_0000, &f);
    s.tx.add(&[(0x10_0000, f.len() as u32, false)]);
    s.h.process_tx(0);
    assert_eq!(recv(&s.peer).unwrap(), f);
}

#[test]
fn rx_fills_one_chain_and_sets_num_buffers() {
    let m = mem();
    let mut s = setup(&m, 0);
    // Garbage where num_buffers goes: the device must overwrite it.
    s.rx.write(0x10_0000, &[0xaa; 64]);
    let head = s.rx.add(&[(0x10_0000, 40, true), (0x20_0000, 1600, true)]);
    let f = frame(60, 9);
    send(&s.peer, &f);
    let mut polls = Polls::default();
    s.h.process_rx(0, &mut polls);
    assert_eq!(s.rx.next_used(), Some((u32::from(head), f.len() as u32)));
    let mut got = s.rx.read(0x10_0000, 40);
    got.extend(s.rx.read(0x20_0000, f.len() - 40));
    assert_eq!(&got[10..12], &[1, 0], "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(s.h.stats.rx_frames, 1);
    assert_eq!(s.irq.count(), 1);
    // The only buffer is used: the TAP is left alone until the driver adds more.
    assert_eq!(polls.0, vec![false]);
}

#[test]
fn rx_merges_buffers_for_a_large_frame() {
    let m = mem();
    let mut s = setup(&m, feature::MRG_RXBUF);
    let heads: Vec<u16> = (0..4)
        .map(|i| s.rx.add(&[(0x10_0000 + i * 0x1000, 512, true)]))
        .collect();
    let f = frame(1000, 5); // 1012 bytes: two 512-byte buffers
    send(&s.peer, &f);
    let mut polls = Polls::default();
    s.h.process_rx(0, &mut polls);
    assert_eq!(s.rx.next_used(), Some((u32::from(heads[0]), 512)));
    assert_eq!(s.rx.next_used(), Some((u32::from(heads[1]), 500)));
    assert_eq!(s.rx.next_used(), None);
    let mut got = s.rx.read(0x10_0000, 512);
    got.extend(s.rx.read(0x10_1000, 500));
    assert_eq!(&got[10..12], &[2, 0], "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    // The two unused buffers stay available. With only 1024 bytes the device waits for
    // more (a 1518-byte frame would not fit).
    let f2 = frame(100, 6);
    send(&s.peer, &f2);
    s.h.process_rx(0, &mut polls);
    assert_eq!(s.rx.next_used(), None);
    assert_eq!(polls.0, vec![false]);
    s.rx.add(&[(0x10_4000, 1024, true)]);
    s.h.rx_kick(0, &mut polls);
    assert_eq!(polls.0, vec![false, true]);
    assert_eq!(s.rx.next_used(), Some((u32::from(heads[2]), 112)));
    assert_eq!(s.rx.read(0x10_2000 + 10, 2), vec![1, 0]);
}

#[test]
fn rx_without_buffers_stops_polling_until_a_kick() {
    let m = mem();
    let mut s = setup(&m, 0);
    let f = frame(80, 2);
    send(&s.peer, &f);
    let mut polls = Polls::default();
    s.h.process_rx(0, &mut polls);
    assert_eq!(polls.0, vec![false]);
    assert_eq!(s.rx.next_used(), None);
    // A kick with still nothing: polling resumes then stops again, no frame lost.
    s.h.rx_kick(0, &mut polls);
    assert_eq!(polls.0, vec![false, true, false]);
    let head = s.rx.add(&[(0x10_0000, 2048, true)]);
    s.h.rx_kick(0, &mut polls);
    // Delivered, and the ring is empty again.
    assert_eq!(polls.0, vec![false, true, false, true, false]);
    assert_eq!(s.rx.next_used(), Some((u32::from(head), f.len() as u32)));
}

#[test]
fn rx_skips_hostile_chains() {
    let m = mem();
    let mut s = setup(&m, 0);
    let bad1 = s.rx.add(&[(0x10_0000, 2048, false)]); // device-readable
    let bad2 = s.rx.add(&[(0x10_0000, 6, true)]); // shorter than the header
    let bad3 = s.rx.add(&[(0x4000_0000, 2048, true)]); // outside memory
    let good = s.rx.add(&[(0x20_0000, 2048, true)]);
    let f = frame(64, 4);
    send(&s.peer, &f);
    let mut polls = Polls::default();
    s.h.process_rx(0, &mut polls);
    assert_eq!(s.rx.next_used(), Some((u32::from(bad1), 0)));
    assert_eq!(s.rx.next_used(), Some((u32::from(bad2), 0)));
    assert_eq!(s.rx.next_used(), Some((u32::from(bad3), 0)));
    assert_eq!(s.rx.next_used(), Some((u32::from(good), f.len() as u32)));
    assert_eq!(s.rx.read(0x20_0000 + 12, 64), f[12..].to_vec());
    assert!(!s.health.is_broken());
}

#[test]
fn broken_ring_marks_the_device() {
    let m = mem();
    let mut s = setup(&m, 0);
    s.rx.set_avail_idx(500);
    send(&s.peer, &frame(10, 0));
    let mut polls = Polls::default();
    s.h.process_rx(0, &mut polls);
    assert!(s.health.is_broken());
}

fn ctrl_setup(m: &GuestMemoryMmap) -> (NetHandler, Ring<'_>, Ring<'_>, Ring<'_>) {
    let rx0 = Ring::new(m, RX_BASE, 16);
    let rx1 = Ring::new(m, TX_BASE, 16);
    let ctrl = Ring::new(m, CTRL_BASE, 16);
    let (t0, _) = fake_tap();
    let (t1, _) = fake_tap();
    let irq = Arc::new(TestIrq::default());
    let health = DeviceHealth::new(irq.clone());
    let pairs = vec![
        QueuePair::new(0, Backend::Tap(Arc::new(t0)), Some(rx0.active(0)), None),
        QueuePair::new(1, Backend::Tap(Arc::new(t1)), Some(rx1.active(2)), None),
    ];
    let acked = feature::CTRL_VQ | feature::MQ;
    let h = NetHandler::new(m.clone(), acked, irq, health, pairs, Some(ctrl.active(4)));
    (h, rx0, rx1, ctrl)
}

fn ctrl_cmd(ctrl: &mut Ring, class: u8, cmd: u8, data: &[u8]) -> u16 {
    let mut b = vec![class, cmd];
    b.extend_from_slice(data);
    ctrl.write(0x30_0000, &b);
    ctrl.write(0x31_0000, &[0xee]);
    ctrl.add(&[(0x30_0000, b.len() as u32, false), (0x31_0000, 1, true)])
}

#[test]
fn ctrl_queue_sets_queue_pairs() {
    let m = mem();
    let (mut h, _rx0, _rx1, mut ctrl) = ctrl_setup(&m);
    let mut polls = Polls::default();
    let ok = vn::VIRTIO_NET_OK as u8;
    let err = vn::VIRTIO_NET_ERR as u8;
    let mq = vn::VIRTIO_NET_CTRL_MQ as u8;
    let set = vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;

    for (pairs, want) in [(2u16, ok), (3, err), (0, err), (1, ok)] {
        let head = ctrl_cmd(&mut ctrl, mq, set, &pairs.to_le_bytes());
        h.process_ctrl(&mut polls);
        assert_eq!(ctrl.next_used(), Some((u32::from(head), 1)), "{pairs}");
        assert_eq!(ctrl.read(0x31_0000, 1), vec![want], "{pairs}");
    }
    // Pair 1 was started (polled) then stopped again.
    assert_eq!(polls.0, vec![true, false]);

    // Filters are accepted, unknown classes refused.
    ctrl_cmd(&mut ctrl, vn::VIRTIO_NET_CTRL_RX as u8, 0, &[1]);
    h.process_ctrl(&mut polls);
    assert_eq!(ctrl.next_used().unwrap().1, 1);
    assert_eq!(ctrl.read(0x31_0000, 1), vec![ok]);
    ctrl_cmd(&mut ctrl, 99, 0, &[]);
    h.process_ctrl(&mut polls);
    assert_eq!(ctrl.next_used().unwrap().1, 1);
    assert_eq!(ctrl.read(0x31_0000, 1), vec![err]);
    // Truncated VQ_PAIRS_SET: no argument.
    ctrl_cmd(&mut ctrl, mq, set, &[]);
    h.process_ctrl(&mut polls);
    assert_eq!(ctrl.read(0x31_0000, 1), vec![err]);
    assert_eq!(ctrl.next_used().unwrap().1, 1);

    // No status byte, or no command at all: dropped with length 0.
    ctrl.write(0x30_0000, &[mq, set, 1, 0]);
    ctrl.add(&[(0x30_0000, 4, false)]);
    ctrl.add(&[(0x31_0000, 1, true)]);
    h.process_ctrl(&mut polls);
    assert_eq!(ctrl.next_used().unwrap().1, 0);
    assert_eq!(ctrl.next_used().unwrap().1, 0);
}

#[test]
fn features_and_config() {
    let f1 = offered_features(1);
    assert_eq!(f1 & (feature::CTRL_VQ | feature::MQ), 0);
    assert_ne!(f1 & feature::MRG_RXBUF, 0);
    assert_ne!(f1 & vessel_virtio::features::VERSION_1, 0);
    let f4 = offered_features(4);
    assert_eq!(
        f4 & (feature::CTRL_VQ | feature::MQ),
        feature::CTRL_VQ | feature::MQ
    );

    use tap::offload;
    assert_eq!(tap_offload_flags(0), 0);
    // TSO without checksum offload makes no sense: nothing.
    assert_eq!(tap_offload_flags(feature::GUEST_TSO4), 0);
    assert_eq!(
        tap_offload_flags(feature::GUEST_CSUM | feature::GUEST_TSO4 | feature::GUEST_TSO6),
        offload::CSUM | offload::TSO4 | offload::TSO6
    );
    assert_eq!(
        tap_offload_flags(feature::GUEST_CSUM | feature::GUEST_ECN),
        offload::CSUM
    );

    let (t0, _p0) = fake_tap();
    let (t1, _p1) = fake_tap();
    let mac = [0x02, 1, 2, 3, 4, 5];
    let net = Net::with_taps(vec![t0, t1], Some(mac)).unwrap();
    assert_eq!(net.queue_max_sizes().len(), 5);
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac);
    assert_eq!(&cfg[6..8], &[1, 0], "link up");
    assert_eq!(&cfg[8..10], &[2, 0], "max_virtqueue_pairs");

    let (t, _p) = fake_tap();
    assert!(matches!(
        Net::with_taps(vec![t], Some([1, 0, 0, 0, 0, 0])),
        Err(NetError::MulticastMac(_))
    ));
    let (t, _p) = fake_tap();
    let net = Net::with_taps(vec![t], None).unwrap();
    assert_eq!(net.mac()[0] & 3, 2, "unicast, locally administered");
    assert_eq!(net.queue_max_sizes().len(), 2);
}

#[test]
fn bad_tap_names_and_queue_counts_are_refused() {
    assert!(matches!(
        Tap::open("a-name-far-too-long", false),
        Err(TapError::BadName(_))
    ));
    assert!(matches!(
        Net::new(NetParams {
            tap: "x".into(),
            mac: None,
            queue_pairs: 0
        }),
        Err(NetError::QueuePairs(0))
    ));
}

#[test]
fn saved_device_state_is_checked_before_it_is_applied() {
    let (t, _p) = fake_tap();
    let mut net = Net::with_taps(vec![t], Some([2, 0, 0, 0, 0, 1])).unwrap();
    let net_state = |mac, active_pairs| DeviceState::Net(NetState { mac, active_pairs });
    assert_eq!(net.save_device_state(), net_state([2, 0, 0, 0, 0, 1], 1));
    assert_eq!(
        net.restore_device_state(&net_state([3, 0, 0, 0, 0, 2], 1)),
        Err(DeviceStateError::NotUnicast([3, 0, 0, 0, 0, 2]))
    );
    for pairs in [0, 2] {
        assert_eq!(
            net.restore_device_state(&net_state([2, 0, 0, 0, 0, 2], pairs)),
            Err(DeviceStateError::ActivePairs {
                saved: pairs,
                max: 1
            })
        );
    }
    assert!(matches!(
        net.restore_device_state(&DeviceState::None),
        Err(DeviceStateError::Kind { .. })
    ));
    // Nothing was applied.
    assert_eq!(net.mac(), [2, 0, 0, 0, 0, 1]);
    net.restore_device_state(&net_state([2, 0, 0, 0, 0, 2], 1))
        .unwrap();
    assert_eq!(net.mac(), [2, 0, 0, 0, 0, 2]);
    let mut cfg = [0u8; 6];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 0, 0, 0, 0, 2]);
}

mod real_tap {
    //! Tests on a real TAP: need root and /dev/net/tun; skipped (with a message) otherwise.

    use super::*;
    use std::process::Command;
    use vessel_virtio::{ActivateContext, VirtioDevice};

    const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

    fn tap_available() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: needs root and /dev/net/tun");
            return false;
        }
        true
    }

    fn ifindex(name: &str) -> i32 {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: `c` is a NUL-terminated string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert!(i > 0, "no interface {name}");
        i as i32
    }

    /// A packet socket on `name` seeing (and sending) frames of our ethertype only.
    fn packet_socket(name: &str) -> (OwnedFd, libc::sockaddr_ll) {
        let proto = ETHERTYPE.to_be();
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `fd` was just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex(name);
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: `sll` is a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        (fd, sll)
    }

    fn eth_frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend_from_slice(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    fn link_up(name: &str) {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let st = Command::new("ip")
            .args(["link", "set", "dev", name, "up"])
            .status()
            .expect("run ip");
        assert!(st.success());
    }

    #[test]
    fn frames_flow_both_ways_through_a_real_tap() {
        if !tap_available() {
            return;
        }
        let name = format!("vst{}", std::process::id() % 100_000);
        let mut net = Net::new(NetParams {
            tap: name.clone(),
            mac: Some([0x02, 0, 0, 0, 0, 0x42]),
            queue_pairs: 1,
        })
        .unwrap();
        assert_eq!(net.tap_name(), name);
        link_up(&name);
        let (pkt, sll) = packet_socket(&name);

        let m = mem();
        let mut rx = Ring::new(&m, RX_BASE, 16);
        let mut tx = Ring::new(&m, TX_BASE, 16);
        let irq = Arc::new(TestIrq::default());
        let rxq = rx.active(0);
        let txq = tx.active(1);
        let tx_kick = txq.kick.try_clone().unwrap();
        let rx_kick = rxq.kick.try_clone().unwrap();
        let acked = offered_features(1);
        net.activate(ActivateContext {
            mem: m.clone(),
            acked_features: acked,
            queues: vec![rxq, txq],
            interrupt: irq.clone(),
            health: DeviceHealth::new(irq.clone()),
        })
        .unwrap();

        // Guest → host.
        let out = eth_frame(net.mac(), b"guest to host via vessel");
        let mut chain = vec![0u8; VNET_HDR_LEN];
        chain.extend_from_slice(&out);
        tx.write(0x10_0000, &chain);
        tx.add(&[(0x10_0000, chain.len() as u32, false)]);
        tx_kick.write(1).unwrap();
        assert_eq!(tx.wait_used().1, 0);
        let mut buf = vec![0u8; 2048];
        let got = loop {
            // SAFETY: writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n > 0, "no frame on the TAP: {}", io::Error::last_os_error());
            if buf[..n as usize] == out[..] {
                break n;
            }
        };
        assert_eq!(got as usize, out.len());

        // Host → guest: buffers first (merged buffers: 4 × 1 KiB, enough for a GSO-less
        // frame only when TSO is off, so give plenty).
        for i in 0..8 {
            rx.add(&[(0x40_0000 + i * 0x1_0000, 0x1_0000, true)]);
        }
        rx_kick.write(1).unwrap();
        let inbound = eth_frame([0x02, 0, 0, 0, 0, 0x99], b"host to guest via vessel");
        // SAFETY: `sll` is a sockaddr_ll of the size given; reads `inbound.len()` bytes.
        let n = unsafe {
            libc::sendto(
                pkt.as_raw_fd(),
                inbound.as_ptr().cast(),
                inbound.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, inbound.len() as isize, "{}", io::Error::last_os_error());
        // Skip anything else the host stack may send on a fresh link.
        let mut found = false;
        for _ in 0..8 {
            let (head, len) = rx.wait_used();
            let addr = 0x40_0000 + u64::from(head) * 0x1_0000;
            let data = rx.read(addr, len as usize);
            assert!(len as usize >= VNET_HDR_LEN);
            assert_eq!(&data[10..12], &[1, 0], "num_buffers");
            if data[VNET_HDR_LEN..] == inbound[..] {
                found = true;
                break;
            }
        }
        assert!(found, "the frame never reached the guest");
        assert!(net.reset());
    }

    #[test]
    fn multiqueue_tap_opens_one_fd_per_pair() {
        if !tap_available() {
            return;
        }
        let name = format!("vsm{}", std::process::id() % 100_000);
        let net = Net::new(NetParams {
            tap: name.clone(),
            mac: None,
            queue_pairs: 2,
        })
        .unwrap();
        assert_eq!(net.queue_pairs(), 2);
        assert_eq!(net.backends.len(), 2);
        // Detaching and re-attaching a queue works on a multi-queue TAP.
        net.backends[1].set_queue_enabled(false).unwrap();
        net.backends[1].set_queue_enabled(true).unwrap();
        // The same name as a single-queue TAP is refused while it exists.
        assert!(matches!(
            Tap::open(&name, false),
            Err(TapError::Busy { .. })
        ));
    }
}

mod passt;
mod rate_limited;
