//! Snapshot, restore and live-migration figures. Prints; asserts nothing.
//!
//! - restore of a 512 MiB, 1 vCPU guest to its first instruction (the first exit it makes
//!   after the restore), and to "guest ready" (a full sweep over a 64 MiB working set), with
//!   and without working-set prefetch;
//! - snapshot creation throughput (a 512 MiB guest whose memory is all non-zero) against
//!   `memcpy` of the same size;
//! - live migration of an idle 1 GiB guest to a receiver in this process: downtime, total
//!   time, bytes sent.
//!
//!   cargo bench -p vessel --bench snapshot

#[path = "../tests/common/tinyguest.rs"]
#[allow(dead_code)]
mod tinyguest;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use tinyguest::{elf, Guest};
use vessel_vmm::migration::{self, Connection, MigrateOptions, MigrationUrl};
use vessel_vmm::restore::{load_state, restore_prefetched, WorkingSet};
use vessel_vmm::snapshot::{NoApi, SnapshotKind, SnapshotRequest};
use vessel_vmm::{NestedMode, Payload, RunningVm, SerialTarget, Vm, VmConfig, VmHandle};

const RUNS: usize = 15;
const MIB: u64 = 1 << 20;
/// The working set the sweeping guest reads: 64 MiB at 64 MiB.
const WS_BASE: u64 = 64 * MIB;
const WS_PAGES: u32 = (64 * MIB / 4096) as u32;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(kernel: &Path, mem_mib: u64) -> VmConfig {
    VmConfig {
        boot: Payload::Linux {
            kernel: kernel.to_path_buf(),
            initrd: None,
            system_map: None,
        },
        cmdline: Some("console=ttyS0".into()),
        memory: mem_mib * MIB,
        serial: SerialTarget::Null,
        nested: NestedMode::Off,
        ..Default::default()
    }
}

/// `fill_mib` MiB of memory at 64 MiB made non-zero, then forever: an exit (a write to an
/// unhandled port, counted by the VMM), a read of every page of the working set when
/// `sweep`.
fn guest(fill_mib: u64, sweep: bool) -> Vec<u8> {
    let mut g = Guest::new();
    let a = &mut g.a;
    if fill_mib > 0 {
        a.mov(rdi, WS_BASE).unwrap();
        a.mov(rcx, fill_mib * MIB / 8).unwrap();
        a.mov(rax, 0x0101_0101_0101_0101u64).unwrap();
        a.rep().stosq().unwrap();
    }
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.out(0x99u32, al).unwrap();
    if sweep {
        let mut next = a.create_label();
        a.mov(rbx, WS_BASE).unwrap();
        a.mov(ecx, WS_PAGES).unwrap();
        a.set_label(&mut next).unwrap();
        a.mov(al, byte_ptr(rbx)).unwrap();
        a.add(rbx, 4096).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(next).unwrap();
    }
    a.jmp(top).unwrap();
    g.finish()
}

fn exits(h: &VmHandle) -> u64 {
    h.stats().unhandled_io.1
}

/// Waits until the guest has made `n` more exits; returns when it did.
fn wait_exits(h: &VmHandle, from: u64, n: u64) -> Instant {
    let t = Instant::now();
    loop {
        if exits(h) >= from + n {
            return Instant::now();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the guest is stuck");
        std::hint::spin_loop();
    }
}

/// Boots `code` and snapshots it after it ran a while; returns the state and memory paths.
fn snapshot_of(
    d: &Path,
    name: &str,
    code: Vec<u8>,
    mem_mib: u64,
    settle: u64,
) -> (PathBuf, PathBuf) {
    let kernel = d.join(format!("{name}.elf"));
    std::fs::write(&kernel, elf(&code)).unwrap();
    let vm = Vm::build(&config(&kernel, mem_mib))
        .unwrap()
        .start()
        .unwrap();
    let h = vm.handle();
    wait_exits(&h, 0, settle);
    h.pause().unwrap();
    let (state, mem) = (
        d.join(format!("{name}.state")),
        d.join(format!("{name}.mem")),
    );
    let info = h
        .snapshot(&SnapshotRequest::<NoApi> {
            state: state.clone(),
            memory: mem.clone(),
            kind: SnapshotKind::Full,
            api: None,
        })
        .unwrap();
    println!(
        "  snapshot of {name}: {} MiB written of {} MiB in {:.1} ms (state {:.2} ms, memory {:.1} ms)",
        info.memory.written >> 20,
        info.memory.covered >> 20,
        ms(info.total),
        ms(info.devices_time),
        ms(info.memory_time)
    );
    stop(vm);
    (state, mem)
}

fn stop(vm: RunningVm) {
    vm.handle().stop();
    let _ = vm.wait();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[v.len() - 1])
}

/// Restores `state`/`mem` and waits for `n` exits; returns (to first exit, to n-th exit).
fn restore_once(state: &Path, mem: &Path, ws: Option<&WorkingSet>, n: u64) -> (f64, f64) {
    let t0 = Instant::now();
    let snap = load_state::<NoApi>(state).unwrap();
    let mut cfg = snap.config.clone();
    cfg.serial = SerialTarget::Null;
    let vm = restore_prefetched(&snap, &cfg, mem, ws)
        .unwrap()
        .start()
        .unwrap();
    let h = vm.handle();
    let first = wait_exits(&h, 0, 1);
    let last = wait_exits(&h, 0, n);
    let r = (ms(first - t0), ms(last - t0));
    if ws.is_some() {
        // Give a recording thread its time.
        std::thread::sleep(Duration::from_millis(300));
    }
    stop(vm);
    r
}

/// Drops the page cache's copy of `path`, so a restore reads it from disk.
fn evict(path: &Path) {
    use std::os::unix::io::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: an advisory call on a descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn restore_figures(d: &Path) {
    println!("restore, 512 MiB, 1 vCPU (median / max of {RUNS}):");
    let (state, mem) = snapshot_of(d, "spin", guest(0, false), 512, 1000);
    let v: Vec<f64> = (0..RUNS)
        .map(|_| restore_once(&state, &mem, None, 1).0)
        .collect();
    let (m, x) = median(v);
    println!("  restore to first instruction: {m:.2} ms / {x:.2} ms");

    let (state, mem) = snapshot_of(d, "sweep", guest(64, true), 512, 3);
    let (mut first, mut ready) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (f, r) = restore_once(&state, &mem, None, 3);
        first.push(f);
        ready.push(r);
    }
    let ((fm, _), (rm, rx)) = (median(first), median(ready));
    println!(
        "  64 MiB working set, no prefetch: first instruction {fm:.2} ms, guest ready {rm:.2} ms (max {rx:.2})"
    );
    let ws = WorkingSet {
        path: d.join("sweep.ws"),
        record_after: Duration::from_millis(200),
    };
    let _ = std::fs::remove_file(&ws.path);
    restore_once(&state, &mem, Some(&ws), 3); // records
    let (mut first, mut ready) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (f, r) = restore_once(&state, &mem, Some(&ws), 3);
        first.push(f);
        ready.push(r);
    }
    let ((fm, _), (rm, rx)) = (median(first), median(ready));
    println!(
        "  64 MiB working set, prefetched: first instruction {fm:.2} ms, guest ready {rm:.2} ms (max {rx:.2})"
    );
    evict(&mem);
    let (f, r) = restore_once(&state, &mem, None, 3);
    println!("  memory file not in the page cache, no prefetch: first instruction {f:.2} ms, guest ready {r:.2} ms");
}

fn throughput(d: &Path) {
    use vessel_memory::vm_memory::{Bytes, GuestAddress};
    println!("snapshot memory write, 512 MiB of guest memory, all of it non-zero:");
    // Filled from the host: filling it from a ring-0 guest would be emulated here.
    let mem = vessel_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 512 << 20)]).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251 + 1) as u8).collect();
    for at in (0..512u64 << 20).step_by(1 << 20) {
        mem.write_slice(&pattern, GuestAddress(at)).unwrap();
    }
    let path = d.join("fill.mem");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let _ = std::fs::remove_file(&path);
        let t = Instant::now();
        // SAFETY: nothing else uses `mem`.
        let st = unsafe { vessel_snapshot::memory::write_full(&mem, &path) }.unwrap();
        best = best.min(ms(t.elapsed()));
        assert_eq!(st.written, 512 << 20);
    }
    let _ = std::fs::remove_file(&path);
    let src = vec![1u8; 512 << 20];
    let mut dst = vec![0u8; 512 << 20];
    let mut copy = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        copy = copy.min(ms(t.elapsed()));
    }
    let gbs = |t: f64| (512u64 << 20) as f64 / (t / 1e3) / 1e9;
    println!(
        "  write_full to {}: {best:.0} ms = {:.2} GB/s; memcpy of 512 MiB: {copy:.0} ms = {:.2} GB/s ({:.0}% of memcpy)",
        d.display(),
        gbs(best),
        gbs(copy),
        100.0 * gbs(best) / gbs(copy)
    );
}

fn migration_figures(d: &Path) {
    println!("live migration, idle 1 GiB guest, 1 vCPU, over a Unix socket in this process:");
    let kernel = d.join("idle.elf");
    let mut g = Guest::new();
    let mut l = g.a.create_label();
    g.a.set_label(&mut l).unwrap();
    g.a.out(0x99u32, al).unwrap();
    g.a.hlt().unwrap();
    g.a.jmp(l).unwrap();
    std::fs::write(&kernel, elf(&g.finish())).unwrap();
    for run in 0..3 {
        let vm = Vm::build(&config(&kernel, 1024)).unwrap().start().unwrap();
        let h = vm.handle();
        wait_exits(&h, 0, 1);
        let url = MigrationUrl::Unix(d.join(format!("m{run}.sock")));
        let u = url.clone();
        let receiver = std::thread::spawn(move || {
            let conn = Connection::accept(&u).unwrap();
            let incoming = migration::receive(conn, Some(SerialTarget::Null)).unwrap();
            let r = incoming.start().unwrap();
            stop(r);
        });
        while !matches!(&url, MigrationUrl::Unix(p) if p.exists()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let stats = h.migrate(&url, &MigrateOptions::default()).unwrap();
        let _ = vm.wait();
        receiver.join().unwrap();
        println!(
            "  downtime {:.2} ms, total {} ms, {} KiB sent ({} pages live, {} paused, {} rounds, {})",
            stats.downtime_us as f64 / 1e3,
            stats.total_ms,
            stats.bytes_sent >> 10,
            stats.pages_live,
            stats.pages_paused,
            stats.rounds,
            stats.converged
        );
    }
}

fn main() {
    let d = dir();
    restore_figures(&d);
    throughput(&d);
    migration_figures(&d);
    let _ = std::fs::remove_dir_all(&d);
}
