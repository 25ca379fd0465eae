//! Data safety: a VMM killed with SIGKILL in the middle of a stream of guest writes leaves
//! every write it acknowledged after a flush in the disk image.
//!
//! The test runs the block device in a child process (this test binary again, running the
//! ignored `writer_child` test): it plays the guest driver over guest memory, issuing rounds
//! of 4 KiB writes (each block tagged with its round and index) followed by a FLUSH, and
//! prints `acked N` once round N's writes and flush are all acknowledged with `VIRTIO_BLK_S_OK`.
//! The parent kills the child with SIGKILL mid-stream (while later rounds are in flight) and
//! checks that the image holds every block of every acknowledged round.
//!
//! SIGKILL does not discard the host's page cache, so what this catches is a device that
//! acknowledges before the data reached the file (buffered in the VMM, or an io_uring
//! completion reported early). Durability against a host power cut rests on FLUSH issuing
//! `fdatasync`, which the unit tests of the block device cover.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::{ActivateContext, ActiveQueue, DeviceHealth, InterruptCause, VirtioInterrupt};
use vessel_virtio_devices::block::{Block, BlockEngine, BlockParams};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BLOCK: usize = 4096;
/// Writes per round, then one flush.
const PER_ROUND: u64 = 8;
const DISK: u64 = 64 << 20;
const ROUNDS: u64 = DISK / (PER_ROUND * BLOCK as u64);
/// The parent kills the child once this many rounds were acknowledged.
const KILL_AFTER: u64 = 40;
const CHILD_ENV: &str = "VESSEL_DATA_SAFETY_CHILD";

const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _: InterruptCause) -> std::io::Result<()> {
        Ok(())
    }
}

/// The content of block `i` of round `r`: its tag repeated, distinct from every other block
/// and from the zeroes of a fresh image.
fn pattern(r: u64, i: u64) -> Vec<u8> {
    let tag = (r << 16 | i) ^ 0x5a5a_0000_0000_0000;
    tag.to_le_bytes().repeat(BLOCK / 8)
}

fn engine_from_env() -> BlockEngine {
    match std::env::var("VESSEL_DATA_SAFETY_ENGINE").as_deref() {
        Ok("io_uring") => BlockEngine::IoUring,
        _ => BlockEngine::Sync,
    }
}

/// The child: the device and a driver writing rounds until it is killed.
#[test]
#[ignore = "run by data_safety_after_sigkill in a child process"]
fn writer_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let blk = Block::new(BlockParams {
        format: None,
        path: PathBuf::from(path),
        read_only: false,
        serial: None,
        engine: engine_from_env(),
    })
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    for r in 0..ROUNDS {
        // Eight writes, then a flush: nine chains of (header, [data], status).
        let mut raw = Vec::new();
        let mut n = 0u16;
        for i in 0..=PER_ROUND {
            let hdr = HDR + 16 * i;
            let status = STATUS + i;
            let flush = i == PER_ROUND;
            let (req, sector) = if flush {
                (VIRTIO_BLK_T_FLUSH, 0)
            } else {
                (VIRTIO_BLK_T_OUT, (r * PER_ROUND + i) * (BLOCK as u64 / 512))
            };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            raw.push(RawDescriptor::from(Descriptor::new(hdr, 16, F_NEXT, n + 1)));
            n += 1;
            if !flush {
                let data = DATA + i * BLOCK as u64;
                mem.write_slice(&pattern(r, i), GuestAddress(data)).unwrap();
                raw.push(RawDescriptor::from(Descriptor::new(
                    data,
                    BLOCK as u32,
                    F_NEXT,
                    n + 1,
                )));
                n += 1;
            }
            raw.push(RawDescriptor::from(Descriptor::new(status, 1, F_WRITE, 0)));
            n += 1;
        }
        // The flush goes to the device only after the writes were acknowledged, as a driver
        // that wants them durable does.
        let (writes, flush) = raw.split_at(raw.len() - 2);
        serve(&blk, &mem, writes, PER_ROUND as usize);
        for i in 0..PER_ROUND {
            let s: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(u32::from(s), VIRTIO_BLK_S_OK, "write {i} of round {r}");
        }
        serve(&blk, &mem, flush, 1);
        let s: u8 = mem.read_obj(GuestAddress(STATUS + PER_ROUND)).unwrap();
        assert_eq!(u32::from(s), VIRTIO_BLK_S_OK, "flush of round {r}");
        println!("acked {r}");
    }
    // The image is full: wait to be killed.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Puts the chains in `raw` (consecutive descriptors, `NEXT` set within a chain) in a fresh
/// queue from descriptor 0 and has the device serve all `n` of them.
fn serve(blk: &Block, mem: &GuestMemoryMmap, raw: &[RawDescriptor], n: usize) {
    let descs: Vec<RawDescriptor> = raw
        .iter()
        .enumerate()
        .map(|(j, d)| {
            let d = Descriptor::from(*d);
            let next = if d.flags() & F_NEXT != 0 {
                j as u16 + 1
            } else {
                0
            };
            RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), d.flags(), next))
        })
        .collect();
    let vq = MockSplitQueue::new(mem, 64);
    vq.add_desc_chains(&descs, 0).unwrap();
    let q: Queue = vq.create_queue().unwrap();
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(NoIrq);
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: vessel_virtio::VirtioDevice::avail_features(blk),
        queues: vec![ActiveQueue {
            queue: q,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            index: 0,
        }],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq),
    };
    let mut server = blk.queue_server(ctx).unwrap();
    let done = server.process_until_idle();
    assert_eq!(done as usize, n, "requests completed");
}

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(DISK).unwrap();
    p
}

fn run_and_kill(engine: &str) {
    let dir = std::env::temp_dir().join(format!(
        "vessel-data-safety-{}-{engine}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = image(&dir);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &img)
        .env("VESSEL_DATA_SAFETY_ENGINE", engine)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut acked: Option<u64> = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if let Some(r) = line.strip_prefix("acked ") {
            acked = Some(r.trim().parse().unwrap());
            if acked >= Some(KILL_AFTER) {
                break;
            }
        }
    }
    // SIGKILL while the child is already writing the next rounds.
    // SAFETY: kill(2) on the child's pid, which has not been reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the child was still writing when killed: {status:?}"
    );
    let acked = acked.expect("the child acknowledged no round");
    let f = std::fs::File::open(&img).unwrap();
    let mut buf = vec![0u8; BLOCK];
    for r in 0..=acked {
        for i in 0..PER_ROUND {
            f.read_exact_at(&mut buf, (r * PER_ROUND + i) * BLOCK as u64)
                .unwrap();
            assert!(
                buf == pattern(r, i),
                "{engine}: block {i} of acknowledged round {r} (of {acked}) is not on disk"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn data_safety_after_sigkill_sync_engine() {
    run_and_kill("sync");
}

#[test]
fn data_safety_after_sigkill_io_uring_engine() {
    let dir = std::env::temp_dir().join(format!("vessel-ds-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let probe = Block::new(BlockParams {
        format: None,
        path: image(&dir),
        read_only: false,
        serial: None,
        engine: BlockEngine::IoUring,
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = probe {
        eprintln!("io_uring unavailable ({e}): skipping");
        return;
    }
    run_and_kill("io_uring");
}
