use super::*;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::{ActiveQueue, DeviceHealth, InterruptCause, VirtioInterrupt};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Where data buffers start in the test guest memory (the rings are below).
const DATA: u64 = 0x1_0000;
const MEM_SIZE: usize = 0x20_0000;
/// A status byte's address for most tests.
const STATUS: u64 = 0x1_F000;
const HDR: u64 = 0x1_E000;

#[derive(Default)]
struct Irq {
    causes: Mutex<Vec<InterruptCause>>,
}

impl VirtioInterrupt for Irq {
    fn trigger(&self, cause: InterruptCause) -> io::Result<()> {
        self.causes.lock().unwrap().push(cause);
        Ok(())
    }
}

/// A temporary image file, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(size: u64) -> TempImage {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vessel-blk-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&path).unwrap();
        // A recognisable pattern: byte i of sector s is (s + i) as u8.
        let mut buf = vec![0u8; size as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((i / 512) + (i % 512)) as u8;
        }
        f.write_all_at(&buf, 0).unwrap();
        TempImage(path)
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        std::fs::File::open(&self.0)
            .unwrap()
            .read_exact_at(&mut v, off)
            .unwrap();
        v
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(off: u64, len: usize) -> Vec<u8> {
    (off as usize..off as usize + len)
        .map(|i| ((i / 512) + (i % 512)) as u8)
        .collect()
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

thread_local! {
    /// The engine `block` uses: each test runs in its own thread.
    static ENGINE: std::cell::Cell<BlockEngine> = const { std::cell::Cell::new(BlockEngine::Sync) };
}

fn engine() -> BlockEngine {
    ENGINE.with(|e| e.get())
}

fn block(img: &TempImage, read_only: bool) -> Block {
    let b = Block::new(BlockParams {
        format: None,
        path: img.0.clone(),
        read_only,
        serial: Some("vessel-test-disk".into()),
        engine: engine(),
    })
    .unwrap();
    assert_eq!(b.engine(), engine());
    b
}

/// Whether this host can run the io_uring tests (a kernel without io_uring, or a seccomp
/// policy that forbids it, skips them with a message).
fn uring_available() -> bool {
    match uring::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("io_uring unavailable ({e}): skipping an io_uring test");
            false
        }
    }
}

/// Runs each named test body (a plain `fn`) once per engine.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod sync_engine {
            $(
                #[test]
                fn $name() {
                    super::ENGINE.with(|e| e.set(super::BlockEngine::Sync));
                    super::$name();
                }
            )*
        }
        mod io_uring_engine {
            $(
                #[test]
                fn $name() {
                    if !super::uring_available() {
                        return;
                    }
                    super::ENGINE.with(|e| e.set(super::BlockEngine::IoUring));
                    super::$name();
                }
            )*
        }
    };
}

both_engines!(
    read_split_over_descriptors,
    data_sharing_the_status_descriptor_is_read_into,
    write_reaches_the_file,
    adjacent_requests_are_merged,
    merged_group_with_a_failing_request_isolates_it,
    flush_and_get_id,
    discard_and_write_zeroes_zero_the_file,
    discard_with_unknown_flags_is_unsupported_and_past_end_fails,
    read_only_rejects_writes,
    unknown_request_type_is_unsupported,
    malformed_requests_get_an_error_status,
    chains_without_a_usable_status_byte_are_returned_empty,
    header_outside_memory_and_huge_lengths,
    looping_chain_terminates,
    indirect_chain_is_served,
    broken_ring_marks_the_device_broken_without_serving,
    worker_serves_kicks_and_reset_stops_it,
    replaced_backing_file_serves_requests_and_capacity,
);

/// A descriptor: address, length, device-writable.
type D = (u64, u32, bool);

fn header(m: &GuestMemoryMmap, at: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Lays out `chains` in a fresh queue (consecutive descriptors, NEXT flags set within a
/// chain), serves them synchronously and returns the used entries (id, len).
fn serve(blk: &Block, m: &GuestMemoryMmap, chains: &[&[D]]) -> Vec<(u32, u32)> {
    let mut raw = Vec::new();
    for c in chains {
        for (i, &(addr, len, w)) in c.iter().enumerate() {
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = raw.len() as u16 + 1;
            if i + 1 < c.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            raw.push(RawDescriptor::from(SplitDescriptor::new(
                addr, len, flags, next,
            )));
        }
    }
    serve_raw(blk, m, &raw, chains.len())
}

fn serve_raw(blk: &Block, m: &GuestMemoryMmap, raw: &[RawDescriptor], n: usize) -> Vec<(u32, u32)> {
    let vq = MockSplitQueue::new(m, 64);
    vq.add_desc_chains(raw, 0).unwrap();
    let q: Queue = vq.create_queue().unwrap();
    let irq = Arc::new(Irq::default());
    let ctx = ActivateContext {
        mem: m.clone(),
        acked_features: blk.avail_features(),
        queues: vec![ActiveQueue {
            queue: q,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            index: 0,
        }],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq.clone()),
    };
    let mut server = blk.queue_server(ctx).unwrap();
    let done = server.process_until_idle();
    assert_eq!(done as usize, n);
    assert_eq!(server.in_flight(), 0);
    (0..n)
        .map(|i| {
            let e = vq.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
    m.read_obj(GuestAddress(at)).unwrap()
}

/// Sets the status byte to a value no request produces, to see it being written.
fn poison(m: &GuestMemoryMmap, at: u64) {
    m.write_obj(0xaau8, GuestAddress(at)).unwrap();
}

#[test]
fn open_errors_are_clear() {
    let missing = Block::new(BlockParams {
        format: None,
        path: "/nonexistent/vessel.img".into(),
        read_only: false,
        serial: None,
        engine: BlockEngine::Sync,
    });
    assert!(matches!(missing, Err(BlockError::Open { .. })));
    let dir = Block::new(BlockParams {
        format: None,
        path: std::env::temp_dir(),
        read_only: true,
        serial: None,
        engine: BlockEngine::Sync,
    });
    assert!(matches!(
        dir,
        Err(BlockError::NotAFileOrBlockDevice { .. }) | Err(BlockError::Open { .. })
    ));
    let img = TempImage::new(100);
    let tiny = Block::new(BlockParams {
        format: None,
        path: img.0.clone(),
        read_only: false,
        serial: None,
        engine: BlockEngine::Sync,
    });
    // Less than a sector (or nothing): a disk of no sectors, which refuses every access.
    let tiny = tiny.unwrap();
    assert_eq!(tiny.capacity(), 0);
    let zero = TempImage::new(0);
    let empty = Block::new(BlockParams {
        format: None,
        path: zero.0.clone(),
        read_only: false,
        serial: None,
        engine: BlockEngine::Sync,
    })
    .unwrap();
    assert_eq!(empty.capacity(), 0);
    let img = TempImage::new(4096);
    let long = Block::new(BlockParams {
        format: None,
        path: img.0.clone(),
        read_only: false,
        serial: Some("x".repeat(21)),
        engine: BlockEngine::Sync,
    });
    assert!(matches!(long, Err(BlockError::SerialTooLong(_))));
}

#[test]
fn size_rounds_down_and_config_space() {
    let img = TempImage::new(8 * 512 + 100);
    let b = block(&img, false);
    assert_eq!(b.capacity(), 8);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut w = [0u8; 4];
    b.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), SEG_MAX);
    b.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512);
    b.read_config(40, &mut w);
    assert_eq!(u32::from_le_bytes(w), MAX_DISCARD_SEG);
    let mut one = [0u8; 1];
    b.read_config(56, &mut one);
    assert_eq!(one[0], 1);
    assert_eq!(b.device_type(), 2);
    assert_eq!(b.queue_max_sizes(), &[256]);
    let f = b.avail_features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & features::COMMON, features::COMMON);
    let ro = block(&img, true);
    assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.avail_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn default_serial_is_derived_from_the_file() {
    let img = TempImage::new(4096);
    let b = Block::new(BlockParams {
        format: None,
        path: img.0.clone(),
        read_only: true,
        serial: None,
        engine: BlockEngine::Sync,
    })
    .unwrap();
    let s = b.serial();
    assert!(s.starts_with(b"vb"));
    assert!(s.iter().any(|&c| c != 0 && c != b'v' && c != b'b'));
    // Same file, same serial.
    let b2 = block(&img, true);
    assert_ne!(b2.serial(), s); // an explicit serial wins
    let b3 = Block::new(BlockParams {
        format: None,
        path: img.0.clone(),
        read_only: false,
        serial: None,
        engine: BlockEngine::Sync,
    })
    .unwrap();
    assert_eq!(b3.serial(), s);
}

fn read_split_over_descriptors() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 3);
    poison(&m, STATUS);
    let used = serve(
        &b,
        &m,
        &[&[
            (HDR, 16, false),
            (DATA, 1024, true),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ]],
    );
    assert_eq!(used, vec![(0, 1536 + 1)]);
    assert_eq!(status(&m, STATUS), S_OK);
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(3 * 512, 1024));
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(got, pattern(5 * 512, 512));
    let st = b.stats().snapshot();
    assert_eq!(st.requests, 1);
    assert_eq!(st.bytes_read, 1536);
}

fn data_sharing_the_status_descriptor_is_read_into() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 1);
    // One writable descriptor of 513 bytes: 512 data bytes then the status byte.
    let used = serve(&b, &m, &[&[(HDR, 16, false), (DATA, 513, true)]]);
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(status(&m, DATA + 512), S_OK);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(512, 512));
}

fn write_reaches_the_file() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 10);
    m.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
    poison(&m, STATUS);
    let used = serve(
        &b,
        &m,
        &[&[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]],
    );
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(img.read(10 * 512, 1024), vec![0x5a; 1024]);
    // Neighbours untouched.
    assert_eq!(img.read(9 * 512, 512), pattern(9 * 512, 512));
    assert_eq!(img.read(12 * 512, 512), pattern(12 * 512, 512));
    assert_eq!(b.stats().snapshot().bytes_written, 1024);
}

fn adjacent_requests_are_merged() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    // Four reads of sectors 0..2, 2..4, 4..6 and 20..22: the first three merge.
    let sectors = [0u64, 2, 4, 20];
    let mut chains: Vec<Vec<D>> = Vec::new();
    for (i, &s) in sectors.iter().enumerate() {
        let h = HDR + 16 * i as u64;
        header(&m, h, VIRTIO_BLK_T_IN, s);
        chains.push(vec![
            (h, 16, false),
            (DATA + 0x1000 * i as u64, 1024, true),
            (STATUS + i as u64, 1, true),
        ]);
    }
    let refs: Vec<&[D]> = chains.iter().map(|c| c.as_slice()).collect();
    let used = serve(&b, &m, &refs);
    assert_eq!(used.len(), 4);
    for (i, &s) in sectors.iter().enumerate() {
        assert_eq!(status(&m, STATUS + i as u64), S_OK);
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA + 0x1000 * i as u64))
            .unwrap();
        assert_eq!(got, pattern(s * 512, 1024), "request {i}");
    }
    // The synchronous engine merges; io_uring submits one SQE per request.
    let want = if engine() == BlockEngine::Sync { 2 } else { 4 };
    assert_eq!(b.stats().snapshot().io_submissions, want);
}

fn merged_group_with_a_failing_request_isolates_it() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    // Two contiguous writes; they merge. Both must succeed and land.
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    header(&m, HDR + 16, VIRTIO_BLK_T_OUT, 1);
    m.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    m.write_slice(&[2; 512], GuestAddress(DATA + 512)).unwrap();
    serve(
        &b,
        &m,
        &[
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            &[
                (HDR + 16, 16, false),
                (DATA + 512, 512, false),
                (STATUS + 1, 1, true),
            ],
        ],
    );
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(status(&m, STATUS + 1), S_OK);
    assert_eq!(img.read(0, 512), vec![1; 512]);
    assert_eq!(img.read(512, 512), vec![2; 512]);
    let want = if engine() == BlockEngine::Sync { 1 } else { 2 };
    assert_eq!(b.stats().snapshot().io_submissions, want);
}

fn flush_and_get_id() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    header(&m, HDR + 16, VIRTIO_BLK_T_GET_ID, 0);
    m.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    poison(&m, STATUS);
    poison(&m, STATUS + 1);
    let used = serve(
        &b,
        &m,
        &[
            &[(HDR, 16, false), (STATUS, 1, true)],
            &[
                (HDR + 16, 16, false),
                (DATA, 20, true),
                (STATUS + 1, 1, true),
            ],
        ],
    );
    // io_uring publishes in completion order: the flush may finish after GET_ID.
    let mut used = used;
    used.sort_unstable();
    assert_eq!(used, vec![(0, 1), (2, 21)]);
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(status(&m, STATUS + 1), S_OK);
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..16], b"vessel-test-disk");
    assert_eq!(&id[16..], &[0, 0, 0, 0]);
}

fn dwz_segment(m: &GuestMemoryMmap, at: u64, sector: u64, n: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&s, GuestAddress(at)).unwrap();
}

fn discard_and_write_zeroes_zero_the_file() {
    let img = TempImage::new(256 * 1024);
    let b = block(&img, false);
    let m = mem();
    // Discard sectors 8..16 and 40..48 (two segments), write zeroes 100..104 (no unmap) and
    // 200..208 (unmap).
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    dwz_segment(&m, DATA, 8, 8, 0);
    dwz_segment(&m, DATA + 16, 40, 8, 0);
    header(&m, HDR + 16, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dwz_segment(&m, DATA + 32, 100, 4, 0);
    header(&m, HDR + 32, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dwz_segment(&m, DATA + 48, 200, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    serve(
        &b,
        &m,
        &[
            &[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)],
            &[
                (HDR + 16, 16, false),
                (DATA + 32, 16, false),
                (STATUS + 1, 1, true),
            ],
            &[
                (HDR + 32, 16, false),
                (DATA + 48, 16, false),
                (STATUS + 2, 1, true),
            ],
        ],
    );
    for i in 0..3 {
        assert_eq!(status(&m, STATUS + i), S_OK);
    }
    assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 256 * 1024);
    for (s, n) in [(8u64, 8usize), (40, 8), (100, 4), (200, 8)] {
        assert_eq!(img.read(s * 512, n * 512), vec![0; n * 512], "sector {s}");
        // The sectors around are untouched.
        assert_eq!(img.read((s - 1) * 512, 512), pattern((s - 1) * 512, 512));
        let after = (s + n as u64) * 512;
        assert_eq!(img.read(after, 512), pattern(after, 512));
    }
}

fn discard_with_unknown_flags_is_unsupported_and_past_end_fails() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    dwz_segment(&m, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    header(&m, HDR + 16, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dwz_segment(&m, DATA + 16, 120, 16, 0); // 128 sectors on the disk: past the end
    header(&m, HDR + 32, VIRTIO_BLK_T_DISCARD, 0);
    dwz_segment(&m, DATA + 32, u64::MAX, u32::MAX, 0);
    serve(
        &b,
        &m,
        &[
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
            &[
                (HDR + 16, 16, false),
                (DATA + 16, 16, false),
                (STATUS + 1, 1, true),
            ],
            &[
                (HDR + 32, 16, false),
                (DATA + 32, 16, false),
                (STATUS + 2, 1, true),
            ],
        ],
    );
    assert_eq!(status(&m, STATUS), S_UNSUPP);
    assert_eq!(status(&m, STATUS + 1), S_IOERR);
    assert_eq!(status(&m, STATUS + 2), S_IOERR);
    assert_eq!(img.read(0, 64 * 1024), pattern(0, 64 * 1024));
}

fn read_only_rejects_writes() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, true);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    header(&m, HDR + 16, VIRTIO_BLK_T_DISCARD, 0);
    dwz_segment(&m, DATA + 0x1000, 0, 8, 0);
    header(&m, HDR + 32, VIRTIO_BLK_T_IN, 0);
    header(&m, HDR + 48, VIRTIO_BLK_T_FLUSH, 0);
    m.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    serve(
        &b,
        &m,
        &[
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            &[
                (HDR + 16, 16, false),
                (DATA + 0x1000, 16, false),
                (STATUS + 1, 1, true),
            ],
            &[
                (HDR + 32, 16, false),
                (DATA + 0x2000, 512, true),
                (STATUS + 2, 1, true),
            ],
            &[(HDR + 48, 16, false), (STATUS + 3, 1, true)],
        ],
    );
    assert_eq!(status(&m, STATUS), S_IOERR);
    assert_eq!(status(&m, STATUS + 1), S_IOERR);
    assert_eq!(status(&m, STATUS + 2), S_OK);
    assert_eq!(status(&m, STATUS + 3), S_OK);
    assert_eq!(img.read(0, 4096), pattern(0, 4096));
}

fn unknown_request_type_is_unsupported() {
    let img = TempImage::new(4096);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, 0x1234, 0);
    header(&m, HDR + 16, VIRTIO_BLK_T_SECURE_ERASE, 0);
    serve(
        &b,
        &m,
        &[
            &[(HDR, 16, false), (STATUS, 1, true)],
            &[
                (HDR + 16, 16, false),
                (DATA, 16, false),
                (STATUS + 1, 1, true),
            ],
        ],
    );
    assert_eq!(status(&m, STATUS), S_UNSUPP);
    assert_eq!(status(&m, STATUS + 1), S_UNSUPP);
}

fn malformed_requests_get_an_error_status() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    let cap = 128u64;
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    header(&m, HDR + 0x100, VIRTIO_BLK_T_IN, cap - 1); // 2 sectors from the last one
    header(&m, HDR + 0x200, VIRTIO_BLK_T_IN, u64::MAX / 512); // offset overflows with len
    header(&m, HDR + 0x300, VIRTIO_BLK_T_IN, u64::MAX); // sector * 512 overflows
    header(&m, HDR + 0x400, VIRTIO_BLK_T_OUT, 0);
    header(&m, HDR + 0x500, VIRTIO_BLK_T_GET_ID, 0);
    header(&m, HDR + 0x600, VIRTIO_BLK_T_IN, cap); // zero-length read at the end: fine
    let chains: [&[D]; 10] = [
        // 0: header too short.
        &[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)],
        // 1: header in a device-writable descriptor.
        &[(HDR, 16, true), (DATA, 512, true), (STATUS + 1, 1, true)],
        // 2: read into a driver-readable buffer (wrong direction).
        &[(HDR, 16, false), (DATA, 512, false), (STATUS + 2, 1, true)],
        // 3: past the end of the disk.
        &[
            (HDR + 0x100, 16, false),
            (DATA, 1024, true),
            (STATUS + 3, 1, true),
        ],
        // 4: offset + length overflows.
        &[
            (HDR + 0x200, 16, false),
            (DATA, 1024, true),
            (STATUS + 4, 1, true),
        ],
        // 5: sector * 512 overflows.
        &[
            (HDR + 0x300, 16, false),
            (DATA, 512, true),
            (STATUS + 5, 1, true),
        ],
        // 6: write from a device-writable buffer (wrong direction).
        &[
            (HDR + 0x400, 16, false),
            (DATA, 512, true),
            (STATUS + 6, 1, true),
        ],
        // 7: not a whole number of sectors.
        &[(HDR, 16, false), (DATA, 100, true), (STATUS + 7, 1, true)],
        // 8: GET_ID with no buffer for the id.
        &[(HDR + 0x500, 16, false), (STATUS + 8, 1, true)],
        // 9: data buffer outside guest memory.
        &[
            (HDR, 16, false),
            (MEM_SIZE as u64 - 256, 512, true),
            (STATUS + 9, 1, true),
        ],
    ];
    for i in 0..10 {
        poison(&m, STATUS + i);
    }
    let used = serve(&b, &m, &chains);
    for i in 0..10u64 {
        assert_eq!(status(&m, STATUS + i), S_IOERR, "chain {i}");
        assert_eq!(used[i as usize].1, 1, "chain {i}");
    }
    let ok = serve(&b, &m, &[&[(HDR + 0x600, 16, false), (STATUS, 1, true)]]);
    assert_eq!(ok, vec![(0, 1)]);
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(img.read(0, 64 * 1024), pattern(0, 64 * 1024));
}

fn chains_without_a_usable_status_byte_are_returned_empty() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    m.write_slice(&[0x33; 512], GuestAddress(DATA)).unwrap();
    let far = 1u64 << 40;
    let chains: [&[D]; 5] = [
        // No status descriptor at all: the last descriptor is driver-readable.
        &[(HDR, 16, false), (DATA, 512, false)],
        // Only the header.
        &[(HDR, 16, false)],
        // Status byte outside guest memory.
        &[(HDR, 16, false), (DATA, 512, false), (far, 1, true)],
        // Zero-length status descriptor.
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 0, true)],
        // Status address that wraps around.
        &[(HDR, 16, false), (DATA, 512, false), (u64::MAX, 2, true)],
    ];
    let used = serve(&b, &m, &chains);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![0; 5]);
    // Nothing was written.
    assert_eq!(img.read(0, 512), pattern(0, 512));
}

fn header_outside_memory_and_huge_lengths() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let chains: [&[D]; 3] = [
        // Header outside guest memory.
        &[(1 << 40, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        // A data buffer of almost 4 GiB.
        &[
            (HDR, 16, false),
            (DATA, u32::MAX - 1024, true),
            (STATUS + 1, 1, true),
        ],
        // A data buffer whose end wraps the address space.
        &[
            (HDR, 16, false),
            (u64::MAX - 100, 512, true),
            (STATUS + 2, 1, true),
        ],
    ];
    let used = serve(&b, &m, &chains);
    for i in 0..3 {
        assert_eq!(status(&m, STATUS + i), S_IOERR, "chain {i}");
        assert_eq!(used[i as usize].1, 1);
    }
}

fn looping_chain_terminates() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    // 0 -> 1 -> 2 -> 1 -> 2 ...
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, next | w, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, next | w, 1)),
    ];
    let used = serve_raw(&b, &m, &raw, 1);
    assert_eq!(used, vec![(0, 0)]);
    // Next index outside the table.
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, next | w, 999)),
    ];
    let used = serve_raw(&b, &m, &raw, 1);
    assert_eq!(used, vec![(0, 0)]);
}

fn indirect_chain_is_served() {
    let img = TempImage::new(64 * 1024);
    let b = block(&img, false);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 2);
    let table = 0x1_8000u64;
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let descs = [
        SplitDescriptor::new(HDR, 16, next, 1),
        SplitDescriptor::new(DATA, 512, next | w, 2),
        SplitDescriptor::new(STATUS, 1, w, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        m.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let raw = [RawDescriptor::from(SplitDescriptor::new(
        table,
        48,
        virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        0,
    ))];
    poison(&m, STATUS);
    let used = serve_raw(&b, &m, &raw, 1);
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(status(&m, STATUS), S_OK);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(1024, 512));
}

fn broken_ring_marks_the_device_broken_without_serving() {
    let img = TempImage::new(4096);
    let b = block(&img, false);
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let q: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(1000);
    let irq = Arc::new(Irq::default());
    let health = DeviceHealth::new(irq.clone());
    let ctx = ActivateContext {
        mem: m.clone(),
        acked_features: 0,
        queues: vec![ActiveQueue {
            queue: q,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            index: 0,
        }],
        interrupt: irq.clone(),
        health: health.clone(),
    };
    let mut server = b.queue_server(ctx).unwrap();
    assert_eq!(server.process(), 0);
    assert!(health.is_broken());
    assert_eq!(server.process(), 0);
}

fn wait_used(q: &MockSplitQueue<'_, GuestMemoryMmap>, want: u16) {
    // Bounded wait for the worker thread; not a timing assertion.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while q.used().idx().load() != want {
        assert!(
            std::time::Instant::now() < deadline,
            "worker did not complete"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn worker_serves_kicks_and_reset_stops_it() {
    let img = TempImage::new(64 * 1024);
    let mut b = block(&img, false);
    let stats = b.stats();
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let q: Queue = vq.create_queue().unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Irq::default());
    b.activate(ActivateContext {
        mem: m.clone(),
        acked_features: b.avail_features(),
        queues: vec![ActiveQueue {
            queue: q,
            kick: kick.try_clone().unwrap(),
            index: 0,
        }],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq.clone()),
    })
    .unwrap();
    header(&m, HDR, VIRTIO_BLK_T_IN, 4);
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, next | w, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, w, 0)),
    ];
    vq.add_desc_chains(&raw, 0).unwrap();
    kick.write(1).unwrap();
    wait_used(&vq, 1);
    assert_eq!(status(&m, STATUS), S_OK);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(2048, 512));
    assert!(irq
        .causes
        .lock()
        .unwrap()
        .contains(&InterruptCause::Queue(0)));
    let st = stats.snapshot();
    assert_eq!(st.requests, 1);
    assert!(st.wakeups >= 1);
    assert!(b.reset());
    assert!(b.worker.is_none());
}

/// An io_uring block device whose "disk" is a pipe: reads stay in flight until the test
/// writes into the pipe. Returns the device, the pipe's write end and a second handle on its
/// read end.
fn pipe_block() -> Option<(Block, std::fs::File, std::fs::File, TempImage)> {
    if !uring_available() {
        return None;
    }
    ENGINE.with(|e| e.set(BlockEngine::IoUring));
    let img = TempImage::new(64 * 1024);
    let mut b = block(&img, false);
    let (r, w) = std::io::pipe().unwrap();
    let r = std::fs::File::from(std::os::fd::OwnedFd::from(r));
    let w = std::fs::File::from(std::os::fd::OwnedFd::from(w));
    let r2 = r.try_clone().unwrap();
    b.disk = Arc::new(disk::Disk::from_file(r, 64 * 1024, false));
    Some((b, w, r2, img))
}

/// Queue context over `vq` with a fresh interrupt.
fn ctx_for(b: &Block, m: &GuestMemoryMmap, q: Queue, kick: EventFd) -> ActivateContext {
    let irq = Arc::new(Irq::default());
    ActivateContext {
        mem: m.clone(),
        acked_features: b.avail_features(),
        queues: vec![ActiveQueue {
            queue: q,
            kick,
            index: 0,
        }],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq),
    }
}

/// Where request `i`'s 512-byte read buffer lies.
fn rbuf(i: u64) -> u64 {
    DATA + 0x200 * i
}

/// `n` single-descriptor chains (indirect tables at 0x1_8000) reading 512 bytes at sector 0
/// into `rbuf(i)`, status at `STATUS + i`; chain `i` has head `i`.
fn read_chains(m: &GuestMemoryMmap, n: u64) -> Vec<RawDescriptor> {
    header(m, HDR, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let mut raw = Vec::new();
    for i in 0..n {
        poison(m, STATUS + i);
        m.write_slice(&[0xaa; 512], GuestAddress(rbuf(i))).unwrap();
        let table = 0x1_8000 + 48 * i;
        let descs = [
            SplitDescriptor::new(HDR, 16, next, 1),
            SplitDescriptor::new(rbuf(i), 512, next | w, 2),
            SplitDescriptor::new(STATUS + i, 1, w, 0),
        ];
        for (k, d) in descs.iter().enumerate() {
            m.write_obj(*d, GuestAddress(table + 16 * k as u64))
                .unwrap();
        }
        raw.push(RawDescriptor::from(SplitDescriptor::new(
            table,
            48,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        )));
    }
    raw
}

/// A split queue laid out by hand (the mock's layout overlaps its rings above ~8 entries):
/// descriptor table at 0, available ring at 0x1000, used ring at 0x2000.
struct TestRing<'a> {
    m: &'a GuestMemoryMmap,
    size: u16,
    avail: u16,
}

impl<'a> TestRing<'a> {
    fn new(m: &'a GuestMemoryMmap, size: u16, descs: &[RawDescriptor]) -> (TestRing<'a>, Queue) {
        for (i, d) in descs.iter().enumerate() {
            m.write_obj(*d, GuestAddress(16 * i as u64)).unwrap();
        }
        for a in [0x1000u64, 0x1002, 0x2000, 0x2002] {
            m.write_obj(0u16, GuestAddress(a)).unwrap();
        }
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(m));
        (TestRing { m, size, avail: 0 }, q)
    }

    /// Makes `head` available.
    fn push(&mut self, head: u16) {
        let slot = u64::from(self.avail % self.size);
        self.m
            .write_obj(head, GuestAddress(0x1004 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.m.write_obj(self.avail, GuestAddress(0x1002)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.m.read_obj(GuestAddress(0x2002)).unwrap()
    }

    /// Used entry `i` (id, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = 0x2004 + 8 * u64::from(i % self.size);
        (
            self.m.read_obj(GuestAddress(at)).unwrap(),
            self.m.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

#[test]
fn io_uring_many_in_flight_bounded_by_the_queue_size() {
    let Some((b, mut w, _r, _img)) = pipe_block() else {
        return;
    };
    let m = mem();
    // 16 reads fill a 16-entry queue; they wait for the pipe.
    let (mut vq, q) = TestRing::new(&m, 16, &read_chains(&m, 16));
    for i in 0..16 {
        vq.push(i);
    }
    let mut server = b
        .queue_server(ctx_for(&b, &m, q, EventFd::new(EFD_NONBLOCK).unwrap()))
        .unwrap();
    assert_eq!(server.process(), 0);
    assert_eq!(server.in_flight(), 16);
    assert_eq!(vq.used_idx(), 0);
    // A hostile driver makes the same 16 heads available again while they are in flight:
    // the server must not take more than the queue size.
    for i in 0..16u16 {
        vq.push(i);
    }
    assert_eq!(server.process(), 0);
    assert_eq!(server.in_flight(), 16);
    assert_eq!(server.queue().next_avail(), 16);
    // Feed the first 16 reads: block k (0-based) is filled with k + 1.
    for k in 0..16u8 {
        w.write_all(&[k + 1; 512]).unwrap();
    }
    // Their completions free the slots, which takes the 16 re-published heads.
    let mut done = 0;
    while done < 16 {
        done += server.process_until_idle_or(16 - done);
    }
    assert_eq!(server.queue().next_avail(), 32);
    assert_eq!(vq.used_idx(), 16);
    let mut seen: Vec<u8> = (0..16)
        .map(|i| {
            let (id, len) = vq.used(i);
            assert_eq!(len, 513);
            let mut got = [0u8; 512];
            m.read_slice(&mut got, GuestAddress(rbuf(u64::from(id))))
                .unwrap();
            assert!(got.iter().all(|&x| x == got[0]), "a torn block");
            got[0]
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=16).collect::<Vec<u8>>());
    assert_eq!(server.in_flight(), 16);
    for k in 0..16u8 {
        w.write_all(&[k + 101; 512]).unwrap();
    }
    assert_eq!(server.process_until_idle(), 16);
    assert_eq!(vq.used_idx(), 32);
    assert_eq!(b.stats().snapshot().requests, 32);
}

#[test]
fn io_uring_completes_out_of_order() {
    let Some((b, mut w, _r, _img)) = pipe_block() else {
        return;
    };
    let m = mem();
    // Two reads that wait for the pipe, then a GET_ID that completes at once.
    let mut raw = read_chains(&m, 2);
    header(&m, HDR + 16, VIRTIO_BLK_T_GET_ID, 0);
    poison(&m, STATUS + 2);
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    raw.push(RawDescriptor::from(SplitDescriptor::new(
        HDR + 16,
        16,
        next,
        3,
    )));
    raw.push(RawDescriptor::from(SplitDescriptor::new(
        0x1_C000,
        20,
        next | wr,
        4,
    )));
    raw.push(RawDescriptor::from(SplitDescriptor::new(
        STATUS + 2,
        1,
        wr,
        0,
    )));
    let vq = MockSplitQueue::new(&m, 16);
    vq.add_desc_chains(&raw, 0).unwrap();
    let q: Queue = vq.create_queue().unwrap();
    let mut server = b
        .queue_server(ctx_for(&b, &m, q, EventFd::new(EFD_NONBLOCK).unwrap()))
        .unwrap();
    assert_eq!(server.process(), 1);
    assert_eq!(server.in_flight(), 2);
    // The last request submitted is the first one used; the reads' status bytes are not
    // written yet.
    let e = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((e.id(), e.len()), (2, 21));
    assert_eq!(status(&m, STATUS + 2), S_OK);
    assert_eq!(status(&m, STATUS), 0xaa);
    assert_eq!(status(&m, STATUS + 1), 0xaa);
    w.write_all(&[7; 1024]).unwrap();
    assert_eq!(server.process_until_idle(), 2);
    let mut ids: Vec<u32> = (1..3)
        .map(|i| vq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1]);
    for i in 0..2 {
        assert_eq!(status(&m, STATUS + i), S_OK);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(rbuf(i))).unwrap();
        assert_eq!(got, [7; 512]);
    }
}

#[test]
fn io_uring_reset_with_requests_in_flight_leaves_guest_memory_alone() {
    let Some((mut b, mut w, r, _img)) = pipe_block() else {
        return;
    };
    let stats = b.stats();
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let q: Queue = vq.create_queue().unwrap();
    b.activate(ctx_for(&b, &m, q, kick.try_clone().unwrap()))
        .unwrap();
    vq.add_desc_chains(&read_chains(&m, 4), 0).unwrap();
    kick.write(1).unwrap();
    // Bounded wait for the worker to submit the four reads; not a timing assertion.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stats.snapshot().io_submissions < 4 {
        assert!(std::time::Instant::now() < deadline, "reads not submitted");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Reset cancels the reads and returns; nothing is published or written afterwards.
    assert!(b.reset());
    assert_eq!(vq.used().idx().load(), 0);
    w.write_all(&[0x42; 2048]).unwrap();
    // The data is still in the pipe: no read survived the reset to consume it.
    let flags = {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own; no memory passed.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETFL) }
    };
    {
        use std::os::fd::AsRawFd;
        // SAFETY: as above; the ring that used this file is gone.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    }
    let mut back = vec![0u8; 2048];
    (&r).read_exact(&mut back).unwrap();
    assert_eq!(back, vec![0x42; 2048]);
    for i in 0..4 {
        assert_eq!(status(&m, STATUS + i), 0xaa);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(rbuf(i))).unwrap();
        assert_eq!(got, [0xaa; 512]);
    }
    assert_eq!(stats.snapshot().requests, 0);
}

#[test]
fn io_uring_quiesce_completes_requests_in_flight() {
    let Some((mut b, mut w, _r, _img)) = pipe_block() else {
        return;
    };
    let stats = b.stats();
    let m = mem();
    let (mut vq, q) = TestRing::new(&m, 16, &read_chains(&m, 4));
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    b.activate(ctx_for(&b, &m, q, kick.try_clone().unwrap()))
        .unwrap();
    for i in 0..4 {
        vq.push(i);
    }
    kick.write(1).unwrap();
    // Bounded wait for the worker to submit the four reads; not a timing assertion.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stats.snapshot().io_submissions < 4 {
        assert!(std::time::Instant::now() < deadline, "reads not submitted");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(vq.used_idx(), 0);
    // The quiesce waits for the reads: feed them from another thread once it has started
    // (if the data came first, the worker would complete them itself, which is fine too).
    let feeder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        for _ in 0..4 {
            w.write_all(&[0x42; 512]).unwrap();
        }
        w
    });
    assert!(b.quiesce());
    assert!(b.worker.is_none());
    let _w = feeder.join().unwrap();
    // Every request popped was completed and published: the used index is the available one.
    assert_eq!(vq.used_idx(), 4);
    for i in 0..4u16 {
        let (id, len) = vq.used(i);
        assert_eq!(len, 513);
        assert_eq!(status(&m, STATUS + u64::from(id)), S_OK);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(rbuf(u64::from(id))))
            .unwrap();
        assert_eq!(got, [0x42; 512]);
    }
    assert_eq!(stats.snapshot().requests, 4);
}

fn config_capacity(b: &Block) -> u64 {
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    u64::from_le_bytes(c)
}

fn replaced_backing_file_serves_requests_and_capacity() {
    let old = TempImage::new(64 * 1024);
    let new = TempImage::new(256 * 1024);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&new.0)
        .unwrap()
        .write_all_at(&[0x5a; 512], 200 * 512)
        .unwrap();
    let b = block(&old, false);
    let h = b.handle();
    assert_eq!((h.capacity(), config_capacity(&b)), (128, 128));
    let m = mem();
    let read_200 = |b: &Block| {
        header(&m, HDR, VIRTIO_BLK_T_IN, 200);
        poison(&m, STATUS);
        serve(
            b,
            &m,
            &[&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]],
        );
        status(&m, STATUS)
    };
    // Past the end of the old image.
    assert_eq!(read_200(&b), S_IOERR);
    // A file that cannot be opened changes nothing.
    let missing = std::env::temp_dir().join("vessel-blk-test-no-such-image");
    assert!(h.replace_backing_file(&missing).is_err());
    assert_eq!(config_capacity(&b), 128);
    assert_eq!(h.replace_backing_file(&new.0).unwrap(), 512);
    assert_eq!((b.capacity(), config_capacity(&b)), (512, 512));
    assert_eq!(read_200(&b), S_OK);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, vec![0x5a; 512]);
    // Writes go to the new file; the old one is untouched.
    header(&m, HDR, VIRTIO_BLK_T_OUT, 1);
    m.write_slice(&[0xc3; 512], GuestAddress(DATA)).unwrap();
    serve(
        &b,
        &m,
        &[&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]],
    );
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(new.read(512, 512), vec![0xc3; 512]);
    assert_eq!(old.read(512, 512), pattern(512, 512));
}

#[test]
fn replacing_the_backing_file_of_a_running_device_raises_a_config_interrupt() {
    let old = TempImage::new(64 * 1024);
    let new = TempImage::new(128 * 1024);
    let mut b = block(&old, true);
    let h = b.handle();
    // Not running: no interrupt to raise.
    assert_eq!(h.replace_backing_file(&new.0).unwrap(), 256);
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let irq = Arc::new(Irq::default());
    b.activate(ActivateContext {
        mem: m.clone(),
        acked_features: b.avail_features(),
        queues: vec![ActiveQueue {
            queue: vq.create_queue().unwrap(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            index: 0,
        }],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq.clone()),
    })
    .unwrap();
    assert_eq!(h.replace_backing_file(&old.0).unwrap(), 128);
    assert_eq!(config_capacity(&b), 128);
    let configs = || {
        irq.causes
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == InterruptCause::Config)
            .count()
    };
    assert_eq!(configs(), 1);
    assert!(b.reset());
    h.replace_backing_file(&new.0).unwrap();
    assert_eq!(configs(), 1);
    // The device stays read-only on its new file.
    assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
}

mod rate_limited;

/// A qcow2 overlay over a raw image serves the queue as the raw image would: reads see the
/// backing file, writes stay in the overlay, past-the-end requests fail; the engine is the
/// synchronous one whatever was asked.
#[test]
fn a_qcow2_overlay_serves_the_queue() {
    let base = TempImage::new(64 * 1024);
    let top = TempImage(base.0.with_extension("qcow2"));
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base.0)
        .arg(&top.0)
        .status();
    if !created.is_ok_and(|s| s.success()) {
        eprintln!("note: qemu-img (Debian's qemu-utils) cannot make a qcow2 image here");
        return;
    }
    let b = Block::new(BlockParams {
        format: None,
        path: top.0.clone(),
        read_only: false,
        serial: None,
        engine: BlockEngine::Auto,
    })
    .unwrap();
    assert_eq!(b.engine(), BlockEngine::Sync);
    assert_eq!(b.capacity(), 128);
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 10);
    m.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
    header(&m, HDR + 16, VIRTIO_BLK_T_IN, 9);
    header(&m, HDR + 32, VIRTIO_BLK_T_IN, 127);
    for i in 0..3 {
        poison(&m, STATUS + i);
    }
    let used = serve(
        &b,
        &m,
        &[
            &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
            &[
                (HDR + 16, 16, false),
                (DATA + 0x1000, 2048, true),
                (STATUS + 1, 1, true),
            ],
            // Two sectors from the last one: past the end.
            &[
                (HDR + 32, 16, false),
                (DATA + 0x2000, 1024, true),
                (STATUS + 2, 1, true),
            ],
        ],
    );
    assert_eq!(used.len(), 3);
    assert_eq!((status(&m, STATUS), status(&m, STATUS + 1)), (S_OK, S_OK));
    assert_eq!(status(&m, STATUS + 2), S_IOERR);
    let mut got = vec![0u8; 2048];
    m.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
    let mut want = pattern(9 * 512, 2048);
    want[512..1536].fill(0x5a);
    assert_eq!(
        got, want,
        "the backing file's sectors with the write over them"
    );
    assert_eq!(
        base.read(10 * 512, 1024),
        pattern(10 * 512, 1024),
        "the backing file is untouched"
    );
}
