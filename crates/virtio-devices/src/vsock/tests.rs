//! End-to-end tests: the device runs in its worker thread; the test plays the guest driver
//! on mock queues and the host side with Unix sockets. Every wait has a timeout.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::*;
use crate::net::testutil::{mem, Ring, TestIrq};
use vessel_memory::GuestMemoryMmap;
use vessel_virtio::{ActivateContext, DeviceHealth};
use vmm_sys_util::eventfd::EventFd;

const CID: u64 = 42;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x80_0000;
const TIMEOUT: Duration = Duration::from_secs(5);

fn temp_uds() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vessel-vsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("v.sock")
}

struct Guest<'a> {
    rx: Ring<'a>,
    tx: Ring<'a>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    tx_next: u64,
    health: DeviceHealth,
    dev: Vsock,
    uds: PathBuf,
}

impl<'a> Guest<'a> {
    fn start(m: &'a GuestMemoryMmap) -> Guest<'a> {
        let uds = temp_uds();
        let mut dev = Vsock::new(VsockParams {
            guest_cid: CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        let tx = Ring::new(m, 0x2_0000, 64);
        let ev = Ring::new(m, 0x3_0000, 64);
        let mut rx = Ring::new(m, 0x1_0000, 64);
        // Chain `i` uses the buffer at `RX_BUF + i * 0x1000`.
        for i in 0..32 {
            rx.add(&[(RX_BUF + i * 0x1000, 0x1000, true)]);
        }
        let irq = Arc::new(TestIrq::default());
        let health = DeviceHealth::new(irq.clone());
        let (rq, tq, eq) = (rx.active(0), tx.active(1), ev.active(2));
        let rx_kick = rq.kick.try_clone().unwrap();
        let tx_kick = tq.kick.try_clone().unwrap();
        dev.activate(ActivateContext {
            mem: m.clone(),
            acked_features: dev.avail_features(),
            queues: vec![rq, tq, eq],
            interrupt: irq,
            health: health.clone(),
        })
        .unwrap();
        Guest {
            rx,
            tx,
            rx_kick,
            tx_kick,
            tx_next: 0,
            health,
            dev,
            uds,
        }
    }

    /// Waits for the next packet on the receive queue.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (head, len) = self.rx.wait_used();
        assert!(len as usize >= HDR_LEN, "short packet ({len} bytes)");
        let addr = RX_BUF + u64::from(head) * 0x1000;
        let b = self.rx.read(addr, len as usize);
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&b[..HDR_LEN]);
        let h = Header::parse(&hb);
        assert_eq!(h.len as usize, len as usize - HDR_LEN);
        // Give a buffer back (the one that goes with the next head).
        let next = RX_BUF + u64::from(self.rx.next_head()) * 0x1000;
        self.rx.add(&[(next, 0x1000, true)]);
        self.rx_kick.write(1).unwrap();
        (h, b[HDR_LEN..].to_vec())
    }

    fn no_packet(&mut self) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(self.rx.next_used(), None);
    }

    /// Sends raw bytes as one packet chain and waits until the device completed it.
    fn send_raw(&mut self, bufs: &[(&[u8], bool)]) {
        let mut descs = Vec::new();
        for (data, w) in bufs {
            let addr = TX_BUF + self.tx_next;
            self.tx.write(addr, data);
            self.tx_next = (self.tx_next + 0x1_0000) % 0x40_0000;
            descs.push((addr, data.len() as u32, *w));
        }
        self.tx.add(&descs);
        self.tx_kick.write(1).unwrap();
        assert_eq!(self.tx.wait_used().1, 0);
    }

    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        let hb = h.to_bytes();
        if data.is_empty() {
            self.send_raw(&[(&hb, false)]);
        } else {
            self.send_raw(&[(&hb, false), (data, false)]);
        }
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 65536,
        fwd_cnt: 0,
        ..Header::default()
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn accept_within(l: &UnixListener) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(_) => {
                assert!(Instant::now() < end, "no connection came");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[test]
fn host_initiated_connection_relays_both_ways() {
    let m = mem();
    let mut g = Guest::start(&m);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();

    let (req, _) = g.recv();
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, CID, 1234)
    );
    assert_eq!(req.type_, TYPE_STREAM);
    let host_port = req.src_port;

    g.send(guest_hdr(1234, host_port, op::RESPONSE), &[]);
    let ok = format!("OK {host_port}\n");
    assert_eq!(read_exactly(&mut client, ok.len()), ok.as_bytes());

    // Host → guest.
    client.write_all(b"hello from the host").unwrap();
    let (h, data) = g.recv();
    assert_eq!(h.op, op::RW);
    assert_eq!((h.src_port, h.dst_port), (host_port, 1234));
    assert_eq!(data, b"hello from the host");
    assert_eq!(h.buf_alloc, muxer::CONN_BUF);

    // Guest → host, split over two descriptors.
    let mut hdr = guest_hdr(1234, host_port, op::RW);
    hdr.len = 11;
    let hb = hdr.to_bytes();
    g.send_raw(&[
        (&hb[..20], false),
        (&[&hb[20..], &b"hello guest"[..]].concat(), false),
    ]);
    assert_eq!(read_exactly(&mut client, 11), b"hello guest");

    // The guest asks for credit: the answer counts the 11 bytes forwarded.
    g.send(guest_hdr(1234, host_port, op::CREDIT_REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.fwd_cnt), (op::CREDIT_UPDATE, 11));

    // The guest closes: RST back, and the client sees the end.
    let mut sd = guest_hdr(1234, host_port, op::SHUTDOWN);
    sd.flags = shutdown::BOTH;
    g.send(sd, &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, op::RST);
    let mut b = [0u8; 1];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(client.read(&mut b).unwrap(), 0);
    assert!(!g.health.is_broken());
}

#[test]
fn guest_refusing_a_host_connection_closes_it() {
    let m = mem();
    let mut g = Guest::start(&m);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, op::REQUEST);
    g.send(guest_hdr(99, req.src_port, op::RST), &[]);
    let mut b = [0u8; 8];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(client.read(&mut b).unwrap(), 0, "no OK line, just the end");
}

#[test]
fn device_returns_credit_as_the_host_consumes() {
    let m = mem();
    let mut g = Guest::start(&m);
    let mut path = g.uds.clone().into_os_string();
    path.push("_5002");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(guest_hdr(701, 5002, op::REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.buf_alloc, h.fwd_cnt),
        (op::RESPONSE, muxer::CONN_BUF, 0)
    );
    let mut server = accept_within(&listener);
    let chunk: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..5 {
        g.send(guest_hdr(701, 5002, op::RW), &chunk);
    }
    // A quarter of the buffer forwarded: the device tells the guest without being asked.
    let (h, _) = g.recv();
    assert_eq!(h.op, op::CREDIT_UPDATE);
    assert!(h.fwd_cnt >= muxer::CONN_BUF / 4, "fwd_cnt {}", h.fwd_cnt);
    let got = read_exactly(&mut server, 5 * chunk.len());
    assert!(got.chunks(chunk.len()).all(|c| c == &chunk[..]));
}

#[test]
fn guest_respects_credit() {
    let m = mem();
    let mut g = Guest::start(&m);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    let (req, _) = g.recv();
    let port = req.src_port;
    // A guest with a 10-byte buffer.
    let mut resp = guest_hdr(7, port, op::RESPONSE);
    resp.buf_alloc = 10;
    g.send(resp, &[]);
    read_exactly(&mut client, format!("OK {port}\n").len());
    client.write_all(b"0123456789abcdef").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"0123456789"[..]));
    // Out of credit: the device asks for more instead of sending.
    let (h, _) = g.recv();
    assert_eq!(h.op, op::CREDIT_REQUEST);
    g.no_packet();
    // The guest consumed everything: the rest flows.
    let mut cu = guest_hdr(7, port, op::CREDIT_UPDATE);
    cu.buf_alloc = 10;
    cu.fwd_cnt = 10;
    g.send(cu, &[]);
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"abcdef"[..]));
}

#[test]
fn guest_initiated_connection_and_host_close() {
    let m = mem();
    let mut g = Guest::start(&m);
    let mut path = g.uds.clone().into_os_string();
    path.push("_5000");
    let listener = UnixListener::bind(&path).unwrap();

    g.send(guest_hdr(777, 5000, op::REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, op::RESPONSE);
    assert_eq!((h.src_port, h.dst_port, h.dst_cid), (5000, 777, CID));
    let mut server = accept_within(&listener);

    g.send(guest_hdr(777, 5000, op::RW), b"ping");
    assert_eq!(read_exactly(&mut server, 4), b"ping");
    server.write_all(b"pong").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"pong"[..]));

    // The host side closes: the guest is told nothing more comes.
    drop(server);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::BOTH));
    g.send(guest_hdr(777, 5000, op::RST), &[]);
    g.no_packet();
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let m = mem();
    let mut g = Guest::start(&m);
    g.send(guest_hdr(778, 6000, op::REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, op::RST);
    assert_eq!(
        (h.src_port, h.dst_port, h.src_cid, h.dst_cid),
        (6000, 778, HOST_CID, CID)
    );
}

#[test]
fn hostile_packets_do_not_hurt() {
    let m = mem();
    let mut g = Guest::start(&m);
    // Unknown connection: reset.
    g.send(guest_hdr(1, 2, op::RW), b"data");
    assert_eq!(g.recv().0.op, op::RST);
    // An RST for an unknown connection is not answered.
    g.send(guest_hdr(1, 2, op::RST), &[]);
    // Spoofed source CID, or not for the host: dropped silently.
    let mut h = guest_hdr(1, 2, op::REQUEST);
    h.src_cid = 99;
    g.send(h, &[]);
    let mut h = guest_hdr(1, 2, op::REQUEST);
    h.dst_cid = 77;
    g.send(h, &[]);
    g.no_packet();
    // Length larger than the chain: reset.
    let mut h = guest_hdr(3, 4, op::RW);
    h.len = 1000;
    g.send_raw(&[(&h.to_bytes(), false), (b"short", false)]);
    assert_eq!(g.recv().0.op, op::RST);
    // Absurd length.
    let mut h = guest_hdr(3, 4, op::RW);
    h.len = u32::MAX;
    g.send_raw(&[(&h.to_bytes(), false)]);
    assert_eq!(g.recv().0.op, op::RST);
    // Unknown op, unknown type.
    g.send(guest_hdr(5, 6, 99), &[]);
    assert_eq!(g.recv().0.op, op::RST);
    let mut h = guest_hdr(5, 6, op::REQUEST);
    h.type_ = 2;
    g.send(h, &[]);
    assert_eq!(g.recv().0.op, op::RST);
    // Header cut short, device-writable buffers, buffers outside memory: dropped.
    g.send_raw(&[(&[0u8; 20], false)]);
    g.send_raw(&[(&guest_hdr(1, 2, op::RW).to_bytes(), true)]);
    g.tx.add(&[(0x4000_0000, 44, false)]);
    g.tx_kick.write(1).unwrap();
    assert_eq!(g.tx.wait_used().1, 0);
    g.no_packet();
    // Still working.
    g.send(guest_hdr(9, 9000, op::REQUEST), &[]);
    assert_eq!(g.recv().0.op, op::RST);
    assert!(!g.health.is_broken());

    // Bad host clients: garbage instead of CONNECT, or too long a line; both are closed.
    let mut c = UnixStream::connect(&g.uds).unwrap();
    c.write_all(b"HELLO\n").unwrap();
    let mut b = [0u8; 8];
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(c.read(&mut b).unwrap(), 0);
    let mut c = UnixStream::connect(&g.uds).unwrap();
    c.write_all(&[b'7'; 100]).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    // Closed with unread data: a reset rather than an orderly end.
    match c.read(&mut b) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    g.no_packet();
}

#[test]
fn reset_closes_connections() {
    let m = mem();
    let mut g = Guest::start(&m);
    let mut path = g.uds.clone().into_os_string();
    path.push("_5001");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(guest_hdr(700, 5001, op::REQUEST), &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    let mut server = accept_within(&listener);
    assert!(g.dev.reset());
    let mut b = [0u8; 1];
    server.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(
        server.read(&mut b).unwrap(),
        0,
        "the connection must be closed"
    );
}

#[test]
fn only_an_empty_device_state_is_restored() {
    let mut dev = Vsock::new(VsockParams {
        guest_cid: 3,
        uds_path: temp_uds(),
    })
    .unwrap();
    assert_eq!(dev.save_device_state(), DeviceState::None);
    let console = DeviceState::Console(vessel_virtio::ConsoleState { cols: 1, rows: 1 });
    assert_eq!(
        dev.restore_device_state(&console),
        Err(DeviceStateError::Kind {
            device: "virtio-vsock",
            saved: "a virtio-console"
        })
    );
    assert!(!dev.reset_on_activate);
    dev.restore_device_state(&DeviceState::None).unwrap();
    assert!(dev.reset_on_activate);
}

#[test]
fn config_and_construction() {
    let uds = temp_uds();
    assert!(matches!(
        Vsock::new(VsockParams {
            guest_cid: 2,
            uds_path: uds.clone()
        }),
        Err(VsockError::BadCid(2))
    ));
    assert!(matches!(
        Vsock::new(VsockParams {
            guest_cid: 1 << 32,
            uds_path: uds.clone()
        }),
        Err(VsockError::BadCid(_))
    ));
    // VMADDR_CID_ANY, which Kata's runtime-rs configures.
    let any = Vsock::new(VsockParams {
        guest_cid: u64::from(u32::MAX),
        uds_path: uds.clone(),
    })
    .unwrap();
    let mut cfg = [0u8; 8];
    any.read_config(0, &mut cfg);
    assert_eq!(cfg, u64::from(u32::MAX).to_le_bytes());
    drop(any);
    std::fs::write(&uds, b"not a socket").unwrap();
    assert!(matches!(
        Vsock::new(VsockParams {
            guest_cid: 3,
            uds_path: uds.clone()
        }),
        Err(VsockError::NotASocket { .. })
    ));
    std::fs::remove_file(&uds).unwrap();
    let dev = Vsock::new(VsockParams {
        guest_cid: 0x1_0000_0003 & 0xffff_ffff,
        uds_path: uds.clone(),
    })
    .unwrap();
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, 3u64.to_le_bytes());
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(dev.device_type(), 19);
    // A stale socket file is replaced.
    drop(dev);
    let _l = UnixListener::bind(&uds).unwrap();
    assert!(Vsock::new(VsockParams {
        guest_cid: 3,
        uds_path: uds
    })
    .is_ok());
}

/// Whether `fd` has an event pending (a kick nobody took yet).
fn pending(fd: &EventFd) -> bool {
    use std::os::unix::io::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Found by fuzzing (fuzz/, target virtio_vsock): once a hostile driver broke a ring, the
/// worker returned without taking later kicks, and its level-triggered epoll spun the thread
/// at full speed for the rest of the VM's life. Kicks sent to a broken device are drained.
#[test]
fn broken_device_drains_kicks_instead_of_spinning() {
    let m = mem();
    let g = Guest::start(&m);
    let (_, avail, _) = g.tx.addresses();
    // An available index far ahead of the ring: the device marks itself broken.
    vm_memory::Bytes::write_obj(&m, 1000u16, vm_memory::GuestAddress(avail + 2)).unwrap();
    g.tx_kick.write(1).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !g.health.is_broken() {
        assert!(
            Instant::now() < deadline,
            "the device never noticed the broken ring"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for kick in [&g.tx_kick, &g.rx_kick] {
        kick.write(1).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while pending(kick) {
            assert!(
                Instant::now() < deadline,
                "a kick to the broken device stays pending (the worker spins on it)"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
