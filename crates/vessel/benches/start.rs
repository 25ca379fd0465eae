//! VMM start and footprint. Prints figures; asserts nothing.
//!
//! - process spawn to the first `KVM_RUN` of the demo guest (the VMM reads the spawn instant
//!   from `VESSEL_SPAWN_NS`), and the demo guest end to end (spawn to exit), with seccomp
//!   filters (the default) and without (`--no-seccomp`);
//! - VMM memory overhead: RSS of a running 1 vCPU / 128 MiB VM minus the guest pages it touched,
//!   split into private dirty memory and clean pages (text and read-only data, shared with the
//!   page cache).
//!
//!   cargo bench -p vessel --bench start

#[path = "../tests/common/tinyguest.rs"]
#[allow(dead_code)]
mod tinyguest;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 30;

fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One start of the demo guest: (spawn -> first KVM_RUN, spawn -> exit), in ms.
fn start_once(extra: &[&str]) -> (f64, f64) {
    let t = Instant::now();
    let out = vessel()
        .args(["run", "--stats"])
        .args(extra)
        .env("VESSEL_SPAWN_NS", monotonic_ns().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run vessel");
    let whole = t.elapsed().as_secs_f64() * 1e3;
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let ms = err
        .lines()
        .find_map(|l| {
            l.strip_prefix("vessel: first KVM_RUN ")?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .expect("stats line");
    (ms, whole)
}

/// Start times with seccomp filters (the default) and without (`--no-seccomp`), the runs
/// interleaved so that both see the same machine load.
fn start_times() {
    let variants: [(&str, &[&str]); 2] = [("seccomp on", &[]), ("--no-seccomp", &["--no-seccomp"])];
    let mut first_run = vec![Vec::new(); variants.len()];
    let mut whole = vec![Vec::new(); variants.len()];
    for _ in 0..RUNS {
        for (i, (_, extra)) in variants.iter().enumerate() {
            let (f, w) = start_once(extra);
            first_run[i].push(f);
            whole[i].push(w);
        }
    }
    for (i, (label, _)) in variants.iter().enumerate() {
        println!(
            "start ({label}): spawn -> first guest instruction: median {:.2} ms, p90 {:.2} ms ({RUNS} runs)",
            percentile(&mut first_run[i], 0.5),
            percentile(&mut first_run[i], 0.9)
        );
        println!(
            "start ({label}): demo guest end to end (spawn -> exit): median {:.2} ms, p90 {:.2} ms",
            percentile(&mut whole[i], 0.5),
            percentile(&mut whole[i], 0.9)
        );
    }
}

/// KiB from smaps: (Rss of the process, Rss of its largest mapping (guest RAM), private dirty
/// of the process outside that mapping, clean pages (the binary's and libraries' text and
/// read-only data, shared with the page cache)).
fn rss(pid: u32) -> (u64, u64, u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest, mut size, mut dirty, mut guest_dirty, mut clean) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut cur_is_guest = false;
    for l in smaps.lines() {
        let mut f = l.split_whitespace();
        let key = f.next();
        let mut kib = || -> u64 { f.next().unwrap().parse().unwrap() };
        match key {
            Some("Size:") => {
                let cur_size = kib();
                cur_is_guest = cur_size > size;
                if cur_is_guest {
                    size = cur_size;
                }
            }
            Some("Rss:") => {
                let r = kib();
                total += r;
                if cur_is_guest {
                    guest = r;
                }
            }
            Some("Private_Dirty:") => {
                let d = kib();
                dirty += d;
                if cur_is_guest {
                    guest_dirty = d;
                }
            }
            Some("Shared_Clean:" | "Private_Clean:") => clean += kib(),
            _ => {}
        }
    }
    (total, guest, dirty - guest_dirty, clean)
}

fn footprint() {
    let dir = std::env::temp_dir().join(format!("vessel-bench-start-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A guest that says it is up, then spins.
    let mut g = tinyguest::Guest::new();
    g.print("up\n");
    let mut l = g.a.create_label();
    g.a.set_label(&mut l).unwrap();
    g.a.pause().unwrap();
    g.a.jmp(l).unwrap();
    let k = dir.join("spin.elf");
    std::fs::write(&k, tinyguest::elf(&g.finish())).unwrap();
    let mut child = vessel()
        .args([
            "run", "--memory", "128M", "--nested", "off", "--serial", "null", "--kernel",
        ])
        .arg(&k)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (total, guest, private_dirty, clean) = rss(child.id());
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "memory: 1 vCPU / 128 MiB guest: RSS {total} KiB, guest pages touched {guest} KiB, VMM overhead {} KiB ({:.2} MiB): private dirty {private_dirty} KiB, clean {clean} KiB (the binary's and libraries' pages, shared with the page cache)",
        total - guest,
        (total - guest) as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    start_times();
    footprint();
}
