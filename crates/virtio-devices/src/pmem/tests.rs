use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use vessel_ratelimit::{BucketConfig, BucketUpdate, FakeClock, RateLimiterConfig};
use vessel_virtio::InterruptCause;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestAddress;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::rng::testing::*;

const MIB: u64 = 1 << 20;

/// A backing file of `len` bytes, each byte its offset's low 8 bits.
fn backing(len: u64) -> TempFile {
    let t = TempFile::new().unwrap();
    let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
    t.as_file().write_all(&data).unwrap();
    t
}

fn params(t: &TempFile, read_only: bool) -> PmemParams {
    PmemParams {
        path: t.as_path().to_path_buf(),
        read_only,
    }
}

/// Reads `len` bytes of the mapping at `offset`.
fn read_mapping(m: &PmemMapping, offset: u64, len: usize) -> Vec<u8> {
    assert!(offset + len as u64 <= m.len());
    let mut v = vec![0u8; len];
    // SAFETY: `offset..offset + len` lies inside the live mapping (checked above); the
    // bytes are copied out, nothing else writes them meanwhile.
    unsafe {
        std::ptr::copy_nonoverlapping((m.host_addr() + offset) as *const u8, v.as_mut_ptr(), len)
    };
    v
}

/// Writes `data` into the mapping at `offset` (as the guest's stores would).
fn write_mapping(m: &PmemMapping, offset: u64, data: &[u8]) {
    assert!(!m.read_only() && offset + data.len() as u64 <= m.len());
    // SAFETY: the writable mapping covers `offset..offset + len` (checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            (m.host_addr() + offset) as *mut u8,
            data.len(),
        )
    };
}

#[test]
fn bad_backing_files_are_refused_with_firecrackers_words() {
    let e = Pmem::new(&PmemParams {
        path: "/nonexistent/pmem.img".into(),
        read_only: false,
    })
    .err()
    .unwrap();
    assert!(matches!(e, PmemError::Open { .. }), "{e}");
    assert!(e.to_string().starts_with("Error accessing backing file"));
    let empty = TempFile::new().unwrap();
    let e = Pmem::new(&params(&empty, false)).err().unwrap();
    assert!(
        e.to_string().starts_with("Error backing file size is 0"),
        "{e}"
    );
    let dir = std::env::temp_dir();
    let e = Pmem::new(&PmemParams {
        path: dir,
        read_only: true,
    })
    .err()
    .unwrap();
    assert!(matches!(e, PmemError::NotAFile { .. }), "{e}");
}

#[test]
fn regions_are_2mib_multiples_and_the_config_space_reports_them() {
    for (file, region) in [(MIB, 2 * MIB), (2 * MIB, 2 * MIB), (2 * MIB + 1, 4 * MIB)] {
        let t = backing(file);
        let mut d = Pmem::new(&params(&t, false)).unwrap();
        d.set_guest_address(512 << 30);
        let r = d.region();
        assert_eq!(
            (r.guest_addr, r.size, r.read_only),
            (512 << 30, region, false)
        );
        assert_eq!(d.mapping().file_len(), file);
        let mut c = [0u8; 16];
        d.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), 512 << 30);
        assert_eq!(u64::from_le_bytes(c[8..].try_into().unwrap()), region);
        let mut size = [0u8; 8];
        d.read_config(8, &mut size);
        assert_eq!(u64::from_le_bytes(size), region);
        assert_eq!(d.stats.cfg_fails.load(Ordering::Relaxed), 0);
        // Past the end: zeros, counted as Firecracker counts it.
        d.read_config(12, &mut size);
        assert_eq!(&size[4..], &[0; 4]);
        assert_eq!(d.stats.cfg_fails.load(Ordering::Relaxed), 1);
    }
}

#[test]
fn the_mapping_shows_the_file_and_writes_reach_it_on_flush() {
    let t = backing(MIB + 100);
    let ro = PmemMapping::open(t.as_path(), true).unwrap();
    assert!(ro.read_only());
    assert_eq!(read_mapping(&ro, 0x1234, 4), vec![0x34, 0x35, 0x36, 0x37]);
    // Past the end of the file: the anonymous padding, zero.
    assert_eq!(read_mapping(&ro, MIB + 4096, 8), vec![0; 8]);

    let rw = PmemMapping::open(t.as_path(), false).unwrap();
    write_mapping(&rw, 0x10, b"written by the guest");
    rw.flush().unwrap();
    let on_disk = std::fs::read(t.as_path()).unwrap();
    assert_eq!(on_disk.len() as u64, MIB + 100, "the file keeps its size");
    assert_eq!(&on_disk[0x10..0x24], b"written by the guest");
    // Both mappings share the file's pages.
    assert_eq!(read_mapping(&ro, 0x10, 7), b"written".to_vec());
}

/// A flush request at `first`: type at 0x8_0000 + 0x100 * first, status after it.
fn flush_request(m: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, first: u16) -> u64 {
    let req = 0x8_0000 + 0x100 * u64::from(first);
    m.write_obj(REQ_TYPE_FLUSH, GuestAddress(req)).unwrap();
    m.write_obj(0x5555_5555u32, GuestAddress(req + 0x10))
        .unwrap();
    add_chain(vq, first, &[(req, 4, false), (req + 0x10, 4, true)]);
    req + 0x10
}

fn status(m: &GuestMemoryMmap, at: u64) -> u32 {
    m.read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn malformed_requests_are_refused_and_valid_ones_flush_once() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 32);
    m.write_obj(7u32, GuestAddress(0x9_0000)).unwrap();
    m.write_obj(0u32, GuestAddress(0x9_0100)).unwrap();
    let cases: &[(&[Buf], RequestError)] = &[
        (
            &[(0x9_0100, 4, true), (0x9_0200, 4, true)],
            RequestError::WriteOnlyRequest,
        ),
        (
            &[(0x9_0100, 8, false), (0x9_0200, 4, true)],
            RequestError::RequestLength(8),
        ),
        (
            &[(0x9_0000, 4, false), (0x9_0200, 4, true)],
            RequestError::UnknownType(7),
        ),
        (&[(0x9_0100, 4, false)], RequestError::NoStatus),
        (
            &[(0x9_0100, 4, false), (0x9_0200, 4, false)],
            RequestError::ReadOnlyStatus,
        ),
        (
            &[(0x9_0100, 4, false), (0x9_0200, 2, true)],
            RequestError::StatusLength(2),
        ),
        (
            &[(0x9_0100, 4, false), (0x20_0000, 4, true)],
            RequestError::WriteStatus,
        ),
        (
            &[(0x20_0000, 4, false), (0x9_0200, 4, true)],
            RequestError::ReadRequest,
        ),
    ];
    let mut first = 0;
    for (bufs, _) in cases {
        add_chain(&vq, first, bufs);
        first += bufs.len() as u16;
    }
    let mut q: Queue = vq.create_queue().unwrap();
    for (bufs, want) in cases {
        let chain = q.iter(&m).unwrap().next().unwrap();
        let mut flushed = false;
        let r = serve(&m, chain, || {
            flushed = true;
            STATUS_OK
        });
        assert_eq!(r, Err(want.clone()), "{bufs:?}");
        assert!(!flushed, "{bufs:?} must not flush");
    }
    let at = flush_request(&m, &vq, 20);
    let chain = q.iter(&m).unwrap().next().unwrap();
    serve(&m, chain, || STATUS_FAILED).unwrap();
    assert_eq!(status(&m, at), u32::MAX, "-1: the flush failed");
}

/// An activated device over `t` with `vq`'s queue; returns it, its kick and its interrupt.
fn running(
    t: &TempFile,
    m: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    limiter: Option<RateLimiter>,
) -> (Pmem, vmm_sys_util::eventfd::EventFd, Arc<CountingInterrupt>) {
    let mut dev = Pmem::new(&params(t, false)).unwrap();
    if let Some(l) = limiter {
        dev.set_rate_limiter(l);
    }
    assert_eq!(dev.device_type(), 27);
    let irq = Arc::new(CountingInterrupt::default());
    let aq = active_queue(vq, 0);
    let kick = aq.kick.try_clone().unwrap();
    dev.activate(context(m, features::COMMON, vec![aq], &irq))
        .unwrap();
    (dev, kick, irq)
}

#[test]
fn the_device_answers_flushes_after_writing_the_file_back() {
    let t = backing(4096);
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let (dev, kick, irq) = running(&t, &m, &vq, None);
    write_mapping(&dev.mapping(), 0, b"guest data");
    let a = flush_request(&m, &vq, 0);
    let b = flush_request(&m, &vq, 2);
    // A broken request in the same batch gets nothing; the others still flush.
    add_chain(&vq, 4, &[(0x9_0000, 4, true)]);
    kick.write(1).unwrap();
    wait_until("the flushes", || vq.used().idx().load() == 3);
    assert_eq!(used(&vq), vec![(0, 4), (2, 4), (4, 0)]);
    assert_eq!((status(&m, a), status(&m, b)), (STATUS_OK, STATUS_OK));
    assert_eq!(&std::fs::read(t.as_path()).unwrap()[..10], b"guest data");
    wait_until("the interrupt", || irq.count(InterruptCause::Queue(0)) >= 1);
    let h = dev.handle();
    assert_eq!(h.stats.event_fails.load(Ordering::Relaxed), 1);
    assert!(h.stats.queue_event_count.load(Ordering::Relaxed) >= 1);
}

#[test]
fn the_rate_limiter_holds_flushes_back_until_lifted() {
    let t = backing(4096);
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let clock = FakeClock::new();
    // One flush per 100 s of the fake clock, which does not move.
    let ops = BucketConfig {
        size: 1,
        one_time_burst: 0,
        refill_time_ms: 100_000,
    };
    let l = RateLimiter::with_clock(
        &RateLimiterConfig {
            bandwidth: None,
            ops: Some(ops),
        },
        Arc::new(clock),
    )
    .unwrap();
    let (dev, kick, _irq) = running(&t, &m, &vq, Some(l));
    flush_request(&m, &vq, 0);
    kick.write(1).unwrap();
    wait_until("the first flush", || vq.used().idx().load() == 1);
    let h = dev.handle();
    flush_request(&m, &vq, 2);
    kick.write(1).unwrap();
    wait_until("the throttle", || {
        h.stats
            .rate_limiter_throttled_events
            .load(Ordering::Relaxed)
            >= 1
    });
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vq.used().idx().load(), 1, "the second batch waits");
    // PATCH /pmem/{id} lifting the limit wakes the device at once.
    h.limiter.update(BucketUpdate::Keep, BucketUpdate::Disable);
    wait_until("the second flush", || vq.used().idx().load() == 2);
    assert!(h.stats.rate_limiter_event_count.load(Ordering::Relaxed) >= 1);
}

#[test]
fn device_state_keeps_the_region_and_refuses_another() {
    let t = backing(MIB);
    let mut d = Pmem::new(&params(&t, true)).unwrap();
    d.set_guest_address(514 << 30);
    let s = d.save_device_state();
    assert_eq!(
        s,
        DeviceState::Pmem(PmemState {
            start: 514 << 30,
            size: 2 * MIB
        })
    );
    let json = serde_json::to_string(&s).unwrap();
    let back: DeviceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let mut again = Pmem::new(&params(&t, true)).unwrap();
    again.set_guest_address(514 << 30);
    again.restore_device_state(&back).unwrap();
    // Rebuilt elsewhere (another configuration) or from a file that grew: refused.
    again.set_guest_address(516 << 30);
    let e = again.restore_device_state(&back).unwrap_err();
    assert!(
        e.to_string().contains("did the backing file change size"),
        "{e}"
    );
    assert!(again.restore_device_state(&DeviceState::None).is_err());
}

#[test]
fn missing_queue_fails_activation() {
    let t = backing(4096);
    let m = mem();
    let irq = Arc::new(CountingInterrupt::default());
    let mut dev = Pmem::new(&params(&t, false)).unwrap();
    assert!(matches!(
        dev.activate(context(&m, 0, vec![], &irq)),
        Err(ActivateError::MissingQueue(0))
    ));
    assert_eq!(dev.handle().stats.activate_fails.load(Ordering::Relaxed), 1);
}
