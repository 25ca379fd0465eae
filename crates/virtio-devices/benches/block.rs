//! virtio-blk throughput: a synthetic driver over plain guest memory drives the device model
//! directly (256-entry queue, indirect descriptors, 256 requests in flight per kick) on a
//! 256 MiB file in the page cache, against plain `pread`s of the same sizes into the same
//! destination buffers in the same run.
//!
//! Each case runs with both engines (`BlockEngine::Sync` and `BlockEngine::IoUring`, the
//! latter skipped where the host lacks io_uring):
//!
//! - "direct": the bench thread makes 256 requests available and runs the queue server
//!   (`Block::queue_server`, the worker's code without the thread) until they are done;
//! - "worker": the real worker thread, with the driver keeping the queue full, kicking only
//!   when `avail_event` asks for it, and reaping used entries as they come: gives the
//!   requests-per-wake-up figure.
//!
//! With Debian's `qemu-img` installed, the same data as a qcow2 image (`qemu-img convert`)
//! runs as a third row ("qcow2", the synchronous engine through imago), and `qemu-img bench`
//! reads both files (queue depth 256, page cache) for comparison: it reads sequentially only,
//! so its 4 KiB figure is a sequential one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::{
    ActivateContext, ActiveQueue, DeviceHealth, InterruptCause, VirtioDevice, VirtioInterrupt,
};
use vessel_virtio_devices::block::{Block, BlockEngine, BlockParams};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QSIZE: u16 = 256;
const FILE_SIZE: u64 = 256 << 20;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const AVAIL_EVENT: u64 = USED + 4 + 8 * QSIZE as u64;
const TABLES: u64 = 0x1_0000;
const HDRS: u64 = 0x2_0000;
const STATUS: u64 = 0x2_1000;
const DATA: u64 = 0x100_0000;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _: InterruptCause) -> std::io::Result<()> {
        Ok(())
    }
}

fn build_queue(m: &GuestMemoryMmap, req_size: u32) -> Queue {
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    for i in 0..u64::from(QSIZE) {
        let t = TABLES + i * 48;
        let descs = [
            Descriptor::new(HDRS + i * 16, 16, next, 1),
            Descriptor::new(DATA + i * u64::from(req_size), req_size, next | w, 2),
            Descriptor::new(STATUS + i, 1, w, 0),
        ];
        for (k, d) in descs.iter().enumerate() {
            m.write_obj(*d, GuestAddress(t + 16 * k as u64)).unwrap();
        }
        let head = Descriptor::new(t, 48, VRING_DESC_F_INDIRECT as u16, 0);
        m.write_obj(head, GuestAddress(DESC + i * 16)).unwrap();
        m.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDRS + i * 16))
            .unwrap();
    }
    for a in [AVAIL, AVAIL + 2, USED, USED + 2, AVAIL_EVENT] {
        m.write_obj(0u16, GuestAddress(a)).unwrap();
    }
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(true);
    q.set_ready(true);
    assert!(q.is_valid(m));
    q
}

fn ctx(m: &GuestMemoryMmap, q: Queue, kick: EventFd) -> ActivateContext {
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(NoIrq);
    ActivateContext {
        mem: m.clone(),
        acked_features: 0,
        queues: vec![ActiveQueue {
            queue: q,
            kick,
            index: 0,
        }],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq),
    }
}

/// The driver's store of `v` at guest address `at`: a plain store, as the guest's driver makes
/// (through vm-memory's checked accessors it would charge the device with tens of ns a
/// request that a guest does not spend in the VMM).
fn poke<T: Copy>(m: &GuestMemoryMmap, at: u64, v: T) {
    let s = GuestMemoryBackend::get_slice(m, GuestAddress(at), std::mem::size_of::<T>()).unwrap();
    let p = s.ptr_guard_mut().as_ptr().cast::<T>();
    assert!(p.is_aligned());
    // SAFETY: `p` points to `size_of::<T>()` bytes of guest memory (checked by get_slice),
    // aligned for `T`; the mapping outlives this call.
    unsafe { p.write_volatile(v) }
}

/// Offsets for `n` requests of `size` bytes: random and aligned, or sequential.
fn offsets(n: usize, size: u64, random: bool) -> Vec<u64> {
    let slots = FILE_SIZE / size;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n as u64)
        .map(|i| {
            if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % slots) * size
            } else {
                (i % slots) * size
            }
        })
        .collect()
}

/// Device, synchronous: returns the elapsed time.
fn run_sync(blk: &Block, m: &GuestMemoryMmap, size: u32, offs: &[u64]) -> (Duration, f64) {
    let q = build_queue(m, size);
    let mut server = blk
        .queue_server(ctx(m, q, EventFd::new(EFD_NONBLOCK).unwrap()))
        .unwrap();
    let mut avail_idx = 0u16;
    let mut calls = 0u64;
    let mut served = 0u64;
    let start = Instant::now();
    for chunk in offs.chunks(usize::from(QSIZE)) {
        for (i, off) in chunk.iter().enumerate() {
            let i = i as u64;
            poke(m, HDRS + i * 16 + 8, off / 512);
            let slot = u64::from(avail_idx.wrapping_add(i as u16) % QSIZE);
            poke(m, AVAIL + 4 + 2 * slot, i as u16);
        }
        avail_idx = avail_idx.wrapping_add(chunk.len() as u16);
        m.store(avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
        served += server.process_until_idle();
        calls += 1;
    }
    let t = start.elapsed();
    assert_eq!(served, offs.len() as u64);
    let st: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    (t, served as f64 / calls as f64)
}

/// Device with its worker thread: the driver keeps the queue full.
fn run_worker(blk: &mut Block, m: &GuestMemoryMmap, size: u32, offs: &[u64]) -> (Duration, f64) {
    let q = build_queue(m, size);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let before = blk.stats().snapshot();
    blk.activate(ctx(m, q, kick.try_clone().unwrap())).unwrap();
    let n = offs.len();
    let mut free: Vec<u16> = (0..QSIZE).rev().collect();
    let (mut posted, mut done) = (0usize, 0usize);
    let mut avail_idx = 0u16;
    let mut used_seen = 0u16;
    let start = Instant::now();
    while done < n {
        let old = avail_idx;
        while posted < n {
            let Some(id) = free.pop() else { break };
            let id64 = u64::from(id);
            poke(m, HDRS + id64 * 16 + 8, offs[posted] / 512);
            let slot = u64::from(avail_idx % QSIZE);
            poke(m, AVAIL + 4 + 2 * slot, id);
            avail_idx = avail_idx.wrapping_add(1);
            posted += 1;
        }
        if avail_idx != old {
            m.store(avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
                .unwrap();
            std::sync::atomic::fence(Ordering::SeqCst);
            let event: u16 = m
                .load(GuestAddress(AVAIL_EVENT), Ordering::Acquire)
                .unwrap();
            // vring_need_event
            if avail_idx.wrapping_sub(event).wrapping_sub(1) < avail_idx.wrapping_sub(old) {
                kick.write(1).unwrap();
            }
        }
        // Reap.
        let mut spins = 0u32;
        loop {
            let u: u16 = m.load(GuestAddress(USED + 2), Ordering::Acquire).unwrap();
            if u != used_seen {
                while used_seen != u {
                    let slot = u64::from(used_seen % QSIZE);
                    let id: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap();
                    free.push(id as u16);
                    used_seen = used_seen.wrapping_add(1);
                    done += 1;
                }
                break;
            }
            spins += 1;
            if spins > 100 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
    let t = start.elapsed();
    assert!(blk.reset());
    let after = blk.stats().snapshot();
    let reqs = after.requests - before.requests;
    let wakeups = after.wakeups - before.wakeups;
    assert_eq!(reqs, n as u64);
    (t, reqs as f64 / wakeups.max(1) as f64)
}

/// Plain `pread`s of the same sizes and offsets into the same destination buffers.
fn run_pread(file: &File, m: &GuestMemoryMmap, size: u32, offs: &[u64]) -> Duration {
    let fd = file.as_raw_fd();
    let base =
        GuestMemoryBackend::get_slice(m, GuestAddress(DATA), usize::from(QSIZE) * size as usize)
            .unwrap()
            .ptr_guard_mut()
            .as_ptr();
    let start = Instant::now();
    for (i, &off) in offs.iter().enumerate() {
        let slot = i % usize::from(QSIZE);
        // SAFETY: the destination lies in the guest memory mapping (checked by get_slice).
        let n = unsafe {
            libc::pread(
                fd,
                base.add(slot * size as usize).cast(),
                size as usize,
                off as libc::off_t,
            )
        };
        assert_eq!(n, size as isize);
    }
    start.elapsed()
}

fn report(
    name: &str,
    size: u32,
    n: usize,
    dev: Duration,
    pread: Duration,
    per_wake: f64,
    spread: f64,
) {
    let bytes = n as f64 * f64::from(size);
    let mbs = |d: Duration| bytes / d.as_secs_f64() / 1e6;
    let iops = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "{name:<38} {:>9.0} IOPS {:>7.0} MB/s | {:>5.1}% of pread (spread {spread:>4.1}%) | {per_wake:.1} req/wake-up",
        iops(dev),
        mbs(dev),
        100.0 * pread.as_secs_f64() / dev.as_secs_f64(),
    );
}

fn main() {
    let path = std::env::temp_dir().join(format!("vessel-blk-bench-{}.img", std::process::id()));
    {
        let f = File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
        for k in 0..FILE_SIZE >> 20 {
            f.write_all_at(&chunk, k << 20).unwrap();
        }
    }
    let file = File::open(&path).unwrap();
    let open = |engine| {
        Block::new(BlockParams {
            format: None,
            path: path.clone(),
            read_only: true,
            serial: None,
            engine,
        })
    };
    // BLK_BENCH_ENGINES=sync,io_uring,qcow2 picks engines (all by default); with it set,
    // `qemu-img bench` is skipped too (to profile one engine alone).
    let picked = std::env::var("BLK_BENCH_ENGINES").ok();
    let wanted = |e: &str| {
        picked
            .as_deref()
            .is_none_or(|p| p.split(',').any(|x| x == e))
    };
    let mut engines = Vec::new();
    if wanted("sync") {
        engines.push(("sync", open(BlockEngine::Sync).unwrap()));
    }
    if wanted("io_uring") {
        match open(BlockEngine::IoUring) {
            Ok(b) => engines.push(("io_uring", b)),
            Err(e) => println!("io_uring engine skipped: {e}"),
        }
    }
    let qcow2 = path.with_extension("qcow2");
    let converted = wanted("qcow2").then(|| {
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&path)
            .arg(&qcow2)
            .status()
    });
    if converted
        .as_ref()
        .is_some_and(|r| r.as_ref().is_ok_and(|s| s.success()))
    {
        let blk = Block::new(BlockParams {
            format: None,
            path: qcow2.clone(),
            read_only: true,
            serial: None,
            engine: BlockEngine::Auto,
        })
        .unwrap();
        engines.push(("qcow2", blk));
    } else if converted.is_some() {
        println!("qcow2 skipped: qemu-img (Debian's qemu-utils) is not installed");
    }
    let mem_size = DATA as usize + usize::from(QSIZE) * (1 << 20);
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
    // Warm the page cache and fault the guest memory in.
    let _ = run_pread(&file, &m, 1 << 20, &offsets(256, 1 << 20, false));

    let cases: [(&str, u32, bool, usize); 2] = [
        ("4 KiB random read", 4096, true, 256 * 400),
        ("1 MiB sequential read", 1 << 20, false, 256 * 8),
    ];
    let rounds: usize = std::env::var("BLK_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only = std::env::var("BLK_BENCH_ONLY").unwrap_or_default();
    println!(
        "virtio-blk, {} MiB file in the page cache, queue of {QSIZE}, best of {rounds} (spread = worst/best - 1)",
        FILE_SIZE >> 20
    );
    for (name, size, random, n) in cases {
        if !name.contains(only.as_str()) {
            continue;
        }
        let offs = offsets(n, u64::from(size), random);
        // Alternating rounds, to damp noise from a shared machine.
        let mut pr = Vec::new();
        let mut direct = vec![Vec::new(); engines.len()];
        let mut worker = vec![Vec::new(); engines.len()];
        for _ in 0..rounds {
            pr.push((run_pread(&file, &m, size, &offs), 0.0));
            for (k, (_, blk)) in engines.iter_mut().enumerate() {
                direct[k].push(run_sync(blk, &m, size, &offs));
                worker[k].push(run_worker(blk, &m, size, &offs));
            }
        }
        let (pbest, _, pspread) = best(&pr);
        println!(
            "{name:<22} pread                {:>9.0} IOPS {:>7.0} MB/s             (spread {:>4.1}%)",
            n as f64 / pbest.as_secs_f64(),
            n as f64 * f64::from(size) / pbest.as_secs_f64() / 1e6,
            pspread
        );
        for (k, (ename, _)) in engines.iter().enumerate() {
            for (mode, runs) in [("direct", &direct[k]), ("worker", &worker[k])] {
                let (t, per_wake, spread) = best(runs);
                report(
                    &format!("{name} {ename:>8} {mode}"),
                    size,
                    n,
                    t,
                    pbest,
                    per_wake,
                    spread,
                );
            }
        }
    }
    if qcow2.exists() && picked.is_none() {
        for (name, size, n) in [
            ("4 KiB sequential read", 4096u32, 256 * 400),
            ("1 MiB sequential read", 1 << 20, 256 * 8),
        ] {
            for (fmt, file) in [("raw", &path), ("qcow2", &qcow2)] {
                if let Some(t) = qemu_img_bench(fmt, file, size, n) {
                    println!(
                        "{name:<22} qemu-img bench {fmt:<5} {:>9.0} IOPS {:>7.0} MB/s",
                        n as f64 / t,
                        n as f64 * f64::from(size) / t / 1e6
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_file(&qcow2);
    for (ename, blk) in &engines {
        let st = blk.stats().snapshot();
        println!(
            "{ename} totals: {} requests, {} I/O submissions, {} wake-ups, {} interrupts",
            st.requests, st.io_submissions, st.wakeups, st.interrupts
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// Best time (with its requests-per-wake-up figure) and spread (worst / best - 1, in %).
fn best(runs: &[(Duration, f64)]) -> (Duration, f64, f64) {
    let b = runs.iter().min_by_key(|r| r.0).copied().unwrap_or_default();
    let w = runs.iter().map(|r| r.0).max().unwrap_or_default();
    let spread = 100.0 * (w.as_secs_f64() / b.0.as_secs_f64().max(1e-9) - 1.0);
    (b.0, b.1, spread)
}

/// Seconds `qemu-img bench` takes for `n` reads of `size` bytes (depth 256, page cache).
fn qemu_img_bench(fmt: &str, file: &std::path::Path, size: u32, n: usize) -> Option<f64> {
    let out = std::process::Command::new("qemu-img")
        .args(["bench", "-f", fmt, "-t", "writeback", "-d", "256"])
        .args(["-c", &n.to_string(), "-s", &size.to_string()])
        .arg(file)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "Run completed in 1.234 seconds."
    let line = text.lines().find(|l| l.starts_with("Run completed in"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
