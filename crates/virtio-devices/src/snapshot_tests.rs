//! Snapshot tests of every device through the virtio-mmio transport: the test plays the
//! driver (probe, requests), quiesces and saves the device, sends the state through JSON,
//! restores it into a device built afresh over the same guest memory, and checks that the
//! driver's next requests are served with the used rings carrying on where they were.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vessel_devices::BusDevice;
use vessel_memory::GuestMemoryMmap;
use vessel_virtio::common::status;
use vessel_virtio::mmio::MmioTransport;
use vessel_virtio::{features, MmioTransportState, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::net::testutil::{mem, Ring};

/// The driver's view of one device behind a virtio-mmio window.
struct Driver {
    t: MmioTransport,
}

impl Driver {
    fn new(dev: impl VirtioDevice + 'static, m: &GuestMemoryMmap) -> Driver {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        Driver {
            t: MmioTransport::new(Box::new(dev), m.clone(), irq).unwrap(),
        }
    }

    fn rd(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// Negotiates `features` and sets up queue `i` on `rings[i]` (`None`: left disabled).
    fn probe(&mut self, features: u64, rings: &[Option<&Ring>]) {
        let s = u32::from;
        self.wr(0x70, s(status::ACKNOWLEDGE | status::DRIVER));
        self.wr(0x24, 0);
        self.wr(0x20, features as u32);
        self.wr(0x24, 1);
        self.wr(0x20, (features >> 32) as u32);
        let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.wr(0x70, s(fok));
        assert_ne!(self.rd(0x70) as u8 & status::FEATURES_OK, 0);
        for (i, r) in rings.iter().enumerate() {
            let Some(r) = r else { continue };
            let (desc, avail, used) = r.addresses();
            self.wr(0x30, i as u32);
            self.wr(0x38, 64);
            self.wr(0x80, desc as u32);
            self.wr(0x90, avail as u32);
            self.wr(0xa0, used as u32);
            self.wr(0x44, 1);
        }
        self.wr(0x70, s(fok | status::DRIVER_OK));
        assert!(self.t.common().is_active(), "the device did not start");
    }

    fn kick(&mut self, queue: u32) {
        self.wr(0x50, queue);
    }

    /// Quiesces, saves and sends the state through JSON.
    fn snapshot(&mut self) -> MmioTransportState {
        self.t.quiesce().unwrap();
        let state = self.t.save_state().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    fn restore(
        dev: impl VirtioDevice + 'static,
        m: &GuestMemoryMmap,
        s: &MmioTransportState,
    ) -> Driver {
        let mut d = Driver::new(dev, m);
        d.t.restore_state(s).unwrap();
        assert!(
            d.t.common().is_active(),
            "the restored device did not start"
        );
        d
    }
}

/// Rings of 64 entries, 64 KiB apart from 0x1_0000; buffers from 0x40_0000.
fn ring(m: &GuestMemoryMmap, i: u64) -> Ring<'_> {
    Ring::new(m, 0x1_0000 * (i + 1), 64)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---- block ----

fn temp_path(what: &str) -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vessel-snap-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A write of sector 3, a snapshot, and a read of it from a device restored on the same
/// image. With `keep_source`, the first device still exists (paused, as a snapshot's source
/// or a migration's sender does) while the restored one reads.
fn block_write_snapshot_read(
    path: &std::path::Path,
    engine: crate::block::BlockEngine,
    keep_source: bool,
) {
    use crate::block::{Block, BlockParams};
    let open = || {
        Block::new(BlockParams {
            format: None,
            path: path.to_path_buf(),
            read_only: false,
            serial: None,
            engine,
        })
        .unwrap()
    };
    let m = mem();
    let mut q = ring(&m, 0);
    let mut d = Driver::new(open(), &m);
    d.probe(features::VERSION_1, &[Some(&q)]);
    // A write of sector 3 before the snapshot.
    let hdr = |at: u64, t: u32| {
        m.write_obj(t, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(3u64, GuestAddress(at + 8)).unwrap();
    };
    hdr(0x40_0000, 1);
    m.write_slice(&[0x5a; 512], GuestAddress(0x41_0000))
        .unwrap();
    m.write_obj(0xffu8, GuestAddress(0x42_0000)).unwrap();
    q.add(&[
        (0x40_0000, 16, false),
        (0x41_0000, 512, false),
        (0x42_0000, 1, true),
    ]);
    d.kick(0);
    assert_eq!(q.wait_used().1, 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x42_0000)).unwrap(), 0);
    let state = d.snapshot();
    let source = if keep_source {
        Some(d)
    } else {
        drop(d);
        None
    };

    let mut d = Driver::restore(open(), &m, &state);
    hdr(0x40_1000, 0);
    m.write_obj(0xffu8, GuestAddress(0x42_0001)).unwrap();
    q.add(&[
        (0x40_1000, 16, false),
        (0x43_0000, 512, true),
        (0x42_0001, 1, true),
    ]);
    d.kick(0);
    assert_eq!(q.wait_used().1, 513);
    assert_eq!(q.used_idx(), 2);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x42_0001)).unwrap(), 0);
    assert_eq!(q.read(0x43_0000, 512), vec![0x5a; 512]);
    drop(d);
    drop(source);
}

fn block_round_trip(engine: crate::block::BlockEngine) {
    use crate::block::{Block, BlockParams};
    let path = temp_path("blk");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    if let Err(crate::block::BlockError::IoUringUnavailable(e)) = Block::new(BlockParams {
        format: None,
        path: path.clone(),
        read_only: true,
        serial: None,
        engine,
    }) {
        eprintln!("skipping the io_uring engine: {e}");
        return;
    }
    block_write_snapshot_read(&path, engine, false);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn block_write_then_read_across_a_snapshot() {
    block_round_trip(crate::block::BlockEngine::Sync);
    block_round_trip(crate::block::BlockEngine::IoUring);
}

/// A qcow2 image caches its metadata: the quiesce of a snapshot writes it out, so a device
/// opened on the same image while the first still exists (a clone, a migration's receiver)
/// reads what the guest wrote before the snapshot (a new cluster, mapped in metadata the
/// image caches).
#[test]
fn a_qcow2_disk_is_consistent_on_disk_once_quiesced() {
    let path = temp_path("blk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64K")
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("note: qemu-img (Debian's qemu-utils) cannot make a qcow2 image here");
        return;
    }
    block_write_snapshot_read(&path, crate::block::BlockEngine::Auto, true);
    let _ = std::fs::remove_file(&path);
}

// ---- rng ----

#[test]
fn rng_carries_on_after_a_restore() {
    let m = mem();
    let mut q = ring(&m, 0);
    let mut d = Driver::new(crate::rng::Rng::new(), &m);
    d.probe(features::VERSION_1, &[Some(&q)]);
    q.add(&[(0x40_0000, 64, true)]);
    d.kick(0);
    assert_eq!(q.wait_used(), (0, 64));
    // Available but not kicked when the snapshot is taken.
    q.add(&[(0x40_1000, 32, true)]);
    let state = d.snapshot();
    drop(d);
    let mut d = Driver::restore(crate::rng::Rng::new(), &m, &state);
    assert_eq!(q.wait_used(), (1, 32));
    q.add(&[(0x40_2000, 16, true)]);
    d.kick(0);
    assert_eq!(q.wait_used(), (2, 16));
    assert_eq!(q.used_idx(), 3);
}

// ---- balloon ----

#[test]
fn balloon_keeps_its_sizes_and_returns_the_stats_buffer() {
    use crate::balloon::{feature, Balloon, BalloonParams, PAGE_SIZE};
    let cfg = BalloonParams {
        stats: true,
        deflate_on_oom: false,
        free_page_reporting: false,
        free_page_hinting: false,
    };
    let m = mem();
    let (mut inflate, deflate, mut stats) = (ring(&m, 0), ring(&m, 1), ring(&m, 2));
    let dev = Balloon::new(cfg).unwrap();
    let handle = dev.handle();
    handle.set_target_pages(300);
    let mut d = Driver::new(dev, &m);
    d.probe(
        features::VERSION_1 | feature::STATS_VQ,
        &[Some(&inflate), Some(&deflate), Some(&stats)],
    );
    // The driver reports its size and sends statistics (kept by the device).
    d.wr(0x104, 1);
    m.write_slice(&[4, 0, 0, 0x10, 0, 0, 0, 0, 0, 0], GuestAddress(0x48_0000))
        .unwrap();
    stats.add(&[(0x48_0000, 10, false)]);
    d.kick(2);
    wait_until("stats", || handle.latest_stats().is_some());
    assert_eq!(stats.used_idx(), 0);
    // Inflate page 0x600 before the snapshot.
    let fill = |pfn: u64| {
        m.write_slice(&[0x77; PAGE_SIZE as usize], GuestAddress(pfn * PAGE_SIZE))
            .unwrap()
    };
    fill(0x600);
    m.write_obj(0x600u32, GuestAddress(0x40_0000)).unwrap();
    inflate.add(&[(0x40_0000, 4, false)]);
    d.kick(0);
    assert_eq!(inflate.wait_used(), (0, 0));
    assert_eq!(inflate.read(0x60_0000, 8), vec![0; 8]);

    let state = d.snapshot();
    // The quiesce gave the statistics buffer back.
    assert_eq!(stats.wait_used(), (0, 0));
    drop(d);

    let dev = Balloon::new(cfg).unwrap();
    let handle = dev.handle();
    let mut d = Driver::restore(dev, &m, &state);
    assert_eq!(handle.target_pages(), 300);
    assert_eq!(handle.actual_pages(), 1);
    assert_eq!(d.rd(0x100), 300);
    assert_eq!(d.rd(0x104), 1);
    fill(0x601);
    m.write_obj(0x601u32, GuestAddress(0x40_1000)).unwrap();
    inflate.add(&[(0x40_1000, 4, false)]);
    d.kick(0);
    assert_eq!(inflate.wait_used(), (1, 0));
    assert_eq!(inflate.used_idx(), 2);
    assert_eq!(inflate.read(0x60_1000, 8), vec![0; 8]);
    assert_eq!(handle.counters().inflated_pages, 1);
    // The driver refills the statistics buffer: the restored device takes it.
    stats.add(&[(0x48_0000, 10, false)]);
    d.kick(2);
    wait_until("restored stats", || handle.latest_stats().is_some());
}

// ---- vsock ----

fn vsock_uds() -> std::path::PathBuf {
    let dir = temp_path("vsock");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("v.sock")
}

#[test]
fn vsock_keeps_connections_across_a_resume_and_resets_after_a_restore() {
    use crate::vsock::packet::{op, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
    use crate::vsock::{Vsock, VsockParams};
    const CID: u64 = 42;
    let uds = vsock_uds();
    let cfg = VsockParams {
        guest_cid: CID,
        uds_path: uds.clone(),
    };
    let m = mem();
    let (mut rx, mut tx, mut ev) = (ring(&m, 0), ring(&m, 1), ring(&m, 2));
    for i in 0..16 {
        rx.add(&[(0x40_0000 + i * 0x1000, 0x1000, true)]);
    }
    ev.add(&[(0x50_0000, 4, true)]);
    let mut d = Driver::new(Vsock::new(cfg.clone()).unwrap(), &m);
    d.probe(features::VERSION_1, &[Some(&rx), Some(&tx), Some(&ev)]);
    let recv = |rx: &mut Ring| -> Header {
        let (head, len) = rx.wait_used();
        let b = rx.read(0x40_0000 + u64::from(head) * 0x1000, len as usize);
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&b[..HDR_LEN]);
        Header::parse(&hb)
    };

    // A host connection to guest port 52, accepted by the guest.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let req = recv(&mut rx);
    assert_eq!(req.op, op::REQUEST);
    let resp = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 52,
        dst_port: req.src_port,
        type_: TYPE_STREAM,
        op: op::RESPONSE,
        buf_alloc: 64 * 1024,
        ..Header::default()
    };
    tx.write(0x60_0000, &resp.to_bytes());
    tx.add(&[(0x60_0000, HDR_LEN as u32, false)]);
    d.kick(1);
    let mut line = [0u8; 3];
    host.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK ");

    // Quiesce and resume in place: the connection carries on, no reset event.
    let _ = d.snapshot();
    d.t.resume();
    host.write_all(b"ping").unwrap();
    let data = loop {
        let h = recv(&mut rx);
        if h.op == op::RW {
            break h;
        }
    };
    assert_eq!(data.len, 4);
    assert_eq!(ev.used_idx(), 0);

    // Saved and restored in a "new process": the driver is told its connections are gone.
    let state = d.snapshot();
    drop(d);
    drop(host);
    let _d = Driver::restore(Vsock::new(cfg).unwrap(), &m, &state);
    assert_eq!(ev.wait_used(), (0, 4));
    assert_eq!(m.read_obj::<u32>(GuestAddress(0x50_0000)).unwrap(), 0);
    let _ = std::fs::remove_dir_all(uds.parent().unwrap());
}

// ---- net ----

#[test]
fn net_keeps_its_mac_and_carries_on_after_a_restore() {
    use crate::net::{Net, NetParams, VNET_HDR_LEN};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: needs root and /dev/net/tun");
        return;
    }
    let name = format!("vsn{}", std::process::id() % 100_000);
    // No MAC configured: each device picks a random one; the restored one must keep the
    // one the driver saw.
    let cfg = NetParams {
        tap: name,
        mac: None,
        queue_pairs: 1,
    };
    let m = mem();
    let (rx, mut tx) = (ring(&m, 0), ring(&m, 1));
    let dev = Net::new(cfg.clone()).unwrap();
    let mac = dev.mac();
    let mut d = Driver::new(dev, &m);
    d.probe(
        features::VERSION_1 | crate::net::feature::MAC,
        &[Some(&rx), Some(&tx)],
    );
    let frame_len = (VNET_HDR_LEN + 60) as u32;
    tx.add(&[(0x40_0000, frame_len, false)]);
    d.kick(1);
    assert_eq!(tx.wait_used(), (0, 0));
    let state = d.snapshot();
    drop(d);

    let mut d = Driver::restore(Net::new(cfg).unwrap(), &m, &state);
    let got: Vec<u8> = (0..6u64)
        .map(|i| {
            let mut b = [0u8; 1];
            d.t.read(0x100 + i, &mut b);
            b[0]
        })
        .collect();
    assert_eq!(got, mac);
    tx.add(&[(0x40_1000, frame_len, false)]);
    d.kick(1);
    assert_eq!(tx.wait_used().0, 1);
    assert_eq!(tx.used_idx(), 2);
}
