//! Virtqueue fuzzing for every virtio device: the input lays out descriptor tables and
//! available rings (chains that loop, point outside guest memory, nest indirect tables, claim
//! huge lengths), fills the buffers, and the device is activated, kicked on every queue and
//! reset, the way a guest driver would drive it.
//!
//! Each device is built once per process and activated again for every input (its `reset`
//! stops the worker, as a driver's reset does).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use vessel_memory::GuestMemoryMmap;
use vessel_virtio::{
    ActivateContext, ActiveQueue, DeviceHealth, InterruptCause, VirtioDevice, VirtioInterrupt,
};
use vessel_virtio_devices::balloon::{Balloon, BalloonParams};
use vessel_virtio_devices::block::{Block, BlockEngine, BlockParams};
use vessel_virtio_devices::console::Console;
use vessel_virtio_devices::net::{Net, Tap};
use vessel_virtio_devices::pmem::{Pmem, PmemParams};
use vessel_virtio_devices::rng::Rng;
use vessel_virtio_devices::vsock::{Vsock, VsockParams};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM of the device harness.
const MEM_SIZE: u64 = 0x10_0000;
/// Where queue `i` lives: descriptor table, available ring, used ring in one page each.
const QUEUE_AREA: u64 = 0x1000;
/// Where the input's buffer contents go.
const DATA: u64 = 0x8_0000;
/// Largest queue the harness sets up.
const MAX_QUEUE: u16 = 32;
/// How long the harness waits for a device's worker to take a kick (a bound, not a timing
/// assertion: a worker that never takes one is reported by the caller as a hang).
const KICK_WAIT: Duration = Duration::from_secs(2);

/// The devices under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Block,
    Net,
    Vsock,
    Rng,
    Balloon,
    Console,
    Pmem,
}

struct NullIrq;

impl VirtioInterrupt for NullIrq {
    fn trigger(&self, _: InterruptCause) -> io::Result<()> {
        Ok(())
    }
}

struct Harness {
    dev: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
}

fn build(kind: Kind) -> Option<Box<dyn VirtioDevice>> {
    let pid = std::process::id();
    let dev: Box<dyn VirtioDevice> = match kind {
        Kind::Block => {
            let path = std::env::temp_dir().join(format!("vessel-fuzz-{pid}.img"));
            std::fs::write(&path, vec![0u8; 1 << 20]).ok()?;
            let b = Block::new(BlockParams {
                format: None,
                path: path.clone(),
                read_only: false,
                serial: None,
                engine: BlockEngine::Sync,
            })
            .ok()?;
            // The open file keeps the image alive.
            let _ = std::fs::remove_file(&path);
            Box::new(b)
        }
        Kind::Net => {
            let tap = match Tap::open(&format!("vfz{}", pid % 100_000), false) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!(
                        "virtio_net: no TAP device ({}); the target does nothing",
                        vessel_virtio::ErrorChain(&e)
                    );
                    return None;
                }
            };
            Box::new(Net::with_taps(vec![tap], None).ok()?)
        }
        Kind::Vsock => {
            let uds_path = std::env::temp_dir().join(format!("vessel-fuzz-vsock-{pid}.sock"));
            Box::new(
                Vsock::new(VsockParams {
                    guest_cid: 3,
                    uds_path,
                })
                .ok()?,
            )
        }
        Kind::Rng => Box::new(Rng::new()),
        Kind::Balloon => Box::new(
            Balloon::new(BalloonParams {
                stats: true,
                deflate_on_oom: true,
                free_page_reporting: true,
                free_page_hinting: true,
            })
            .ok()?,
        ),
        Kind::Console => Box::new(Console::new(Box::new(io::sink()), None, Some((80, 25))).ok()?),
        Kind::Pmem => {
            let path = std::env::temp_dir().join(format!("vessel-fuzz-{pid}.pmem"));
            std::fs::write(&path, vec![0u8; 1 << 20]).ok()?;
            let p = Pmem::new(&PmemParams {
                path: path.clone(),
                read_only: false,
            })
            .ok()?;
            // The mapping keeps the file alive.
            let _ = std::fs::remove_file(&path);
            Box::new(p)
        }
    };
    Some(dev)
}

fn harness(kind: Kind) -> &'static Mutex<Option<Harness>> {
    static H: [OnceLock<Mutex<Option<Harness>>>; 7] = [const { OnceLock::new() }; 7];
    H[kind as usize].get_or_init(|| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory for the device harness");
        Mutex::new(build(kind).map(|dev| Harness { dev, mem }))
    })
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u32,
    len: u16,
    /// Bits 0-2: NEXT, WRITE, INDIRECT. Bit 5: `next` unreduced (may be past the table).
    /// Bit 6: a huge length. Bit 7: an address far outside guest memory.
    flags: u8,
    next: u8,
}

#[derive(Arbitrary, Debug)]
struct QueueInput {
    descs: Vec<Desc>,
    /// Heads made available.
    avail: Vec<u8>,
    /// An available index that disagrees with the ring (else the number of heads).
    bogus_avail_idx: Option<u16>,
    /// Enable the queue at all.
    disabled: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    config_writes: Vec<(u8, Vec<u8>)>,
    queues: Vec<QueueInput>,
    /// Kick the queues this many extra times (a driver notifying again).
    rekicks: u8,
    fill: Vec<u8>,
}

fn desc_bytes(d: &Desc, size: u16) -> [u8; 16] {
    let mut addr = u64::from(d.addr) % (MEM_SIZE + MEM_SIZE / 2);
    if d.flags & 0x80 != 0 {
        addr = u64::MAX - u64::from(d.addr);
    }
    let mut len = u32::from(d.len);
    if d.flags & 0x40 != 0 {
        len = u32::MAX - len;
    }
    let flags = u16::from(d.flags & 7);
    let next = if d.flags & 0x20 != 0 {
        u16::from(d.next)
    } else {
        u16::from(d.next) % size
    };
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

fn readable(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// What one input did to the device: for the replay test, which checks that the seeds
/// reach the device's request handling.
#[derive(Debug, Default)]
pub struct Report {
    /// Whether the device was activated (an input can fail earlier, by design).
    pub activated: bool,
    /// Chains the device returned on its queues (the used rings' indices at the end).
    pub used: u32,
}

/// Runs one input against the device of `kind`.
pub fn run(kind: Kind, data: &[u8]) {
    let _ = run_reported(kind, data);
}

/// [`run`], telling what happened; `None` when the input does not decode or the device is
/// not available on this host (`virtio_net` without a TAP).
pub fn run_reported(kind: Kind, data: &[u8]) -> Option<Report> {
    let inp = Input::arbitrary(&mut Unstructured::new(data)).ok()?;
    let mut guard = harness(kind).lock().ok()?;
    let h = guard.as_mut()?;
    let mut report = Report::default();
    let mem = &h.mem;
    // A clean guest for every input (reproducible findings).
    let _ = mem.write_slice(&vec![0u8; MEM_SIZE as usize], GuestAddress(0));
    let fill = &inp.fill[..inp.fill.len().min((MEM_SIZE - DATA) as usize)];
    let _ = mem.write_slice(fill, GuestAddress(DATA));

    for (off, bytes) in inp.config_writes.iter().take(8) {
        h.dev.write_config(u64::from(*off), bytes);
        let mut back = vec![0u8; bytes.len().min(256)];
        h.dev.read_config(u64::from(*off), &mut back);
    }

    let acked = h.dev.avail_features() & (inp.features | 1 << 32);
    let event_idx = acked & (1 << 29) != 0;
    let max_sizes: Vec<u16> = h.dev.queue_max_sizes().to_vec();
    let mut queues = Vec::new();
    let mut kicks = Vec::new();
    let mut kick_index = Vec::new();
    let mut used_rings = Vec::new();
    for (i, &max) in max_sizes.iter().enumerate() {
        let q_in = inp.queues.get(i);
        if q_in.is_some_and(|q| q.disabled) {
            continue;
        }
        let size = max.clamp(1, MAX_QUEUE).next_power_of_two().min(max);
        let base = QUEUE_AREA * 3 * (i as u64 + 1);
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        let mut n_avail = 0u16;
        if let Some(q) = q_in {
            for (j, d) in q.descs.iter().take(usize::from(size)).enumerate() {
                let _ = mem.write_slice(&desc_bytes(d, size), GuestAddress(desc + 16 * j as u64));
            }
            for (j, &head) in q.avail.iter().take(usize::from(size)).enumerate() {
                let at = GuestAddress(avail + 4 + 2 * j as u64);
                let _ = mem.write_obj(u16::from(head), at);
                n_avail += 1;
            }
            let idx = q.bogus_avail_idx.unwrap_or(n_avail);
            let _ = mem.write_obj(idx, GuestAddress(avail + 2));
        }
        let Ok(mut queue) = Queue::new(max) else {
            continue;
        };
        queue.set_size(size);
        if queue
            .try_set_desc_table_address(GuestAddress(desc))
            .is_err()
            || queue
                .try_set_avail_ring_address(GuestAddress(avail))
                .is_err()
            || queue.try_set_used_ring_address(GuestAddress(used)).is_err()
        {
            continue;
        }
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        used_rings.push(used);
        let Ok(kick) = EventFd::new(EFD_NONBLOCK) else {
            continue;
        };
        let Ok(ours_kick) = kick.try_clone() else {
            continue;
        };
        kicks.push(ours_kick);
        kick_index.push(i as u16);
        queues.push(ActiveQueue {
            queue,
            kick,
            index: i as u16,
        });
    }
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(NullIrq);
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: acked,
        queues,
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq),
    };
    if h.dev.activate(ctx).is_err() {
        h.dev.reset();
        return Some(report);
    }
    report.activated = true;
    // Queues a device leaves alone by design (the balloon's statistics and reporting queues
    // when their features were not negotiated) are not waited on.
    let watched = match kind {
        Kind::Balloon => {
            let stats = acked & vessel_virtio_devices::balloon::feature::STATS_VQ != 0;
            let reporting = acked & vessel_virtio_devices::balloon::feature::REPORTING != 0;
            2 + usize::from(stats) + usize::from(reporting)
        }
        _ => usize::MAX,
    };
    let kicks: Vec<EventFd> = kicks
        .into_iter()
        .zip(kick_index)
        .filter(|(_, i)| usize::from(*i) < watched)
        .map(|(k, _)| k)
        .collect();
    for _ in 0..=(inp.rekicks % 4) {
        for k in &kicks {
            let _ = k.write(1);
        }
        let deadline = Instant::now() + KICK_WAIT;
        while kicks.iter().any(readable) {
            if Instant::now() > deadline {
                panic!("{kind:?}: the device worker did not take a kick within {KICK_WAIT:?}");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    // Stops and joins the worker: whatever the kick started has finished.
    h.dev.reset();
    for used in used_rings {
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap_or(0);
        report.used += u32::from(idx);
    }
    Some(report)
}
