//! Vessel against Firecracker, side by side, through Firecracker's API (prints figures;
//! asserts nothing). Each figure is measured for Vessel (`vessel --api-sock`) and, when
//! `FIRECRACKER` names a Firecracker binary, for it in the same run, alternating the two; each
//! line gives both medians, their spread (p10-p90) and the ratio Vessel / Firecracker.
//!
//! - start: process spawn to the API socket answering `GET /` (median of 15);
//! - memory: RSS and private dirty (`/proc/PID/smaps_rollup`) while a 64 MiB tiny guest that
//!   wrote 16 pages sits halted;
//! - restore: the round trip of `PUT /snapshot/load` (resume on) of that guest, in a new
//!   process, from a full snapshot each VMM took of it;
//! - exits: 100,000 i8042 port reads by the guest, whole process (from `InstanceStart` to the
//!   process's exit on the guest's i8042 reset, less the same with no reads), per exit, and
//!   the bare `KVM_RUN` loop of this process for reference;
//! - density: microVMs whose guest resets at once, each a whole life (spawn, configure,
//!   `InstanceStart`, the process's exit), 50 one after another and 10 at once (VMs per
//!   second, and per core); and 10 tiny guests running at once, each VMM's proportional
//!   resident set (`Pss`) and private dirty memory, the per-VM overhead.
//!
//!   FIRECRACKER=/path/to/firecracker cargo bench -p vessel --bench compare
//!
//! `COMPARE_ONLY=start,memory,restore,exits,density` measures those figures only.
//! `COMPARE_MAPPINGS=1` also prints each memory run's private dirty memory by mapping.
//! `VESSEL_B=/path/to/vessel` measures a second Vessel binary beside this one (an A/B of a
//! build option or a change); every figure is then given against the last binary measured.
//! `VESSEL_B_ARGS="--no-seccomp"` gives that binary more arguments (space-separated): with
//! `--no-seccomp`, it runs as the glibc build of Firecracker does, without filters.

#[path = "../tests/common/bare.rs"]
mod bare;
#[path = "../tests/common/tinyguest.rs"]
#[allow(dead_code)]
mod tinyguest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use serde_json::json;
use tinyguest::{elf, Guest};
use vessel_api::client::Client;

const STARTS: usize = 15;
const RUNS: usize = 5;
const EXITS: u32 = 100_000;
/// Density: lives one after another (over the rounds), and VMs at once.
const LIVES: usize = 50;
const AT_ONCE: usize = 10;
const DENSITY_ROUNDS: usize = 5;

struct Vmm {
    name: &'static str,
    bin: PathBuf,
    /// Arguments before `--api-sock`.
    args: Vec<String>,
}

fn spawn(v: &Vmm, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    Command::new(&v.bin)
        .args(&v.args)
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", v.bin.display()))
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Spawn to the first `GET /` answered 200, polling every 50 µs. The caller stops the child.
#[allow(clippy::zombie_processes)]
fn time_to_api(v: &Vmm, sock: &Path) -> (Duration, Child) {
    let t = Instant::now();
    let child = spawn(v, sock);
    loop {
        let answer = Client::new(sock, Duration::from_secs(2)).request("GET", "/", None);
        if answer.is_ok_and(|r| r.status == 200) {
            return (t.elapsed(), child);
        }
        if t.elapsed() > Duration::from_secs(10) {
            stop(child);
            panic!("{}: no API", v.name);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn put(c: &mut Client, path: &str, body: serde_json::Value) -> Duration {
    let t = Instant::now();
    let r = c
        .request("PUT", path, Some(&body.to_string()))
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
    assert!(r.status < 300, "PUT {path}: {} {}", r.status, r.text());
    t.elapsed()
}

/// A started VMM running the guest `kernel` in 64 MiB; returns when `InstanceStart` was
/// answered.
fn boot(v: &Vmm, sock: &Path, kernel: &Path) -> (Child, Instant) {
    let (_, child) = time_to_api(v, sock);
    let mut c = Client::new(sock, Duration::from_secs(10));
    put(&mut c, "/boot-source", json!({"kernel_image_path": kernel}));
    put(
        &mut c,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    let t = Instant::now();
    put(&mut c, "/actions", json!({"action_type": "InstanceStart"}));
    (child, t)
}

/// A guest that writes one byte in each of 16 pages from 2 MiB, then halts for good.
fn touching_guest() -> Vec<u8> {
    let mut g = Guest::new();
    let a = &mut g.a;
    a.mov(rdi, 0x20_0000u64).unwrap();
    a.mov(ecx, 16u32).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.mov(byte_ptr(rdi), 1u32).unwrap();
    a.add(rdi, 4096i32).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(l).unwrap();
    a.cli().unwrap();
    let mut h = a.create_label();
    a.set_label(&mut h).unwrap();
    a.hlt().unwrap();
    a.jmp(h).unwrap();
    g.finish()
}

fn exiting_guest(n: u32) -> Vec<u8> {
    bare::port_reader(n, true)
}

/// `Rss` and `Private_Dirty` of `pid`, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let [rss, dirty] = rollup(pid, ["Rss:", "Private_Dirty:"]);
    (rss, dirty)
}

/// The fields `names` of `/proc/PID/smaps_rollup`, in KiB (0 for one that is missing).
fn rollup<const N: usize>(pid: u32, names: [&str; N]) -> [u64; N] {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    names.map(|name| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    })
}

/// Private dirty memory and RSS by mapping (`/proc/PID/smaps`): the file or `[heap]`,
/// `[stack]`, `anon` (thread stacks, malloc arenas, guest memory), largest first.
fn dirty_by_mapping(pid: u32) -> Vec<(String, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut sums: Vec<(String, u64, u64)> = Vec::new();
    let mut name = String::new();
    for l in s.lines() {
        let mut words = l.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, perms, offset, dev, inode, [path].
            let perms = words.next().unwrap_or("");
            name = match words.nth(3) {
                Some(path) => format!("{path} {perms}"),
                // Anonymous mappings by size: thread stacks, malloc arenas, guest memory.
                None => {
                    let (a, b) = first.split_once('-').unwrap_or(("0", "0"));
                    let len = |x| u64::from_str_radix(x, 16).unwrap_or(0);
                    format!("anon {perms} of {} KiB", (len(b) - len(a)) / 1024)
                }
            };
        } else if first == "Private_Dirty:" || first == "Rss:" {
            let kib: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let (dirty, rss) = if first == "Rss:" { (0, kib) } else { (kib, 0) };
            match sums.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, d, r)) => {
                    *d += dirty;
                    *r += rss;
                }
                None => sums.push((name.clone(), dirty, rss)),
            }
        }
    }
    sums.retain(|(_, d, r)| *d > 0 || *r > 0);
    sums.sort_by_key(|s| std::cmp::Reverse((s.1, s.2)));
    sums
}

/// The pages of the guest's memory (the largest anonymous mapping) that are present, as
/// guest-physical ranges (`/proc/PID/pagemap`, needs root for the frame numbers but not for
/// the present bit).
fn guest_pages(pid: u32) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let Some((start, end)) = maps
        .lines()
        .filter(|l| l.split_whitespace().count() == 5)
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .max_by_key(|(a, b)| b - a)
    else {
        return String::new();
    };
    let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else {
        return String::new();
    };
    let pages = ((end - start) / 4096) as usize;
    let mut buf = vec![0u8; pages * 8];
    if f.seek(SeekFrom::Start(start / 4096 * 8)).is_err() || f.read_exact(&mut buf).is_err() {
        return String::new();
    }
    let present: Vec<usize> = (0..pages)
        .filter(|i| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap()) >> 63 == 1)
        .collect();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for p in present {
        match ranges.last_mut() {
            Some((_, e)) if *e + 1 == p => *e = p,
            _ => ranges.push((p, p)),
        }
    }
    ranges
        .iter()
        .map(|(a, b)| format!("{:#x}+{}", a * 4096, b - a + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The names of a process's threads.
fn threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

fn snapshot_load(v: &Vmm, dir: &Path, kernel: &Path) -> Duration {
    let sock = dir.join(format!("{}-snap.sock", v.name));
    let (state, mem) = (
        dir.join(format!("{}.state", v.name)),
        dir.join(format!("{}.mem", v.name)),
    );
    let (child, _) = boot(v, &sock, kernel);
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Client::new(&sock, Duration::from_secs(30));
    let r = c
        .request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))
        .unwrap();
    assert!(r.status < 300, "{}: pause: {}", v.name, r.text());
    put(
        &mut c,
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}),
    );
    stop(child);
    let (_, child) = time_to_api(v, &sock);
    let mut c = Client::new(&sock, Duration::from_secs(30));
    let t = put(
        &mut c,
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}),
    );
    stop(child);
    t
}

/// A whole microVM life: spawn, configure, `InstanceStart`, the guest's reset ending the
/// process. Returns the CPU time the process used (user and system), in ms.
fn life(v: &Vmm, sock: &Path, kernel: &Path) -> f64 {
    let (child, _) = boot(v, sock, kernel);
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage, which wait4 fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into locals.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as i32, "wait4");
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e3 + tv.tv_usec as f64 / 1e3;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// `lives` microVM lives one after another, then `at_once` at the same time: VMs per second
/// each way, and the mean CPU time of a life one after another (ms).
fn density(v: &Vmm, dir: &Path, kernel: &Path, lives: usize, at_once: usize) -> (f64, f64, f64) {
    let sock = dir.join(format!("{}-density.sock", v.name));
    let t = Instant::now();
    let cpu: f64 = (0..lives).map(|_| life(v, &sock, kernel)).sum();
    let serial = lives as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..at_once {
            let sock = dir.join(format!("{}-density-{i}.sock", v.name));
            s.spawn(move || life(v, &sock, kernel));
        }
    });
    (
        serial,
        at_once as f64 / t.elapsed().as_secs_f64(),
        cpu / lives as f64,
    )
}

/// `n` VMMs at once, each running the touching guest: the mean of their `Pss` and
/// `Private_Dirty`, in KiB.
fn overhead(v: &Vmm, dir: &Path, kernel: &Path, n: usize) -> (f64, f64) {
    let children: Vec<Child> = (0..n)
        .map(|i| boot(v, &dir.join(format!("{}-many-{i}.sock", v.name)), kernel).0)
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (mut pss, mut dirty) = (0.0, 0.0);
    for c in &children {
        let [p, d] = rollup(c.id(), ["Pss:", "Private_Dirty:"]);
        pss += p as f64;
        dirty += d as f64;
    }
    for c in children {
        stop(c);
    }
    (pss / n as f64, dirty / n as f64)
}

/// From `InstanceStart` to the process's exit (the guest's reset).
fn run_to_exit(v: &Vmm, sock: &Path, kernel: &Path) -> Duration {
    let (mut child, t) = boot(v, sock, kernel);
    child.wait().unwrap();
    t.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median, p10 and p90.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

fn line(what: &str, unit: &str, figures: &[(&str, Vec<f64>)]) {
    let mut s = format!("{what}:");
    let mut medians = Vec::new();
    for (name, v) in figures {
        let (m, lo, hi) = stats(v.clone());
        medians.push(m);
        s += &format!("  {name} {m:.2} {unit} ({lo:.2}-{hi:.2})");
    }
    // Each figure against the last one (Firecracker's when it is measured).
    if let [first @ .., last] = &medians[..] {
        for (i, m) in first.iter().enumerate() {
            s += &format!("  ratio {} {:.2}", figures[i].0, m / last);
        }
    }
    println!("{s}");
}

fn main() {
    // A binary just built has dirty pages in the page cache, which smaps counts as the
    // process's private dirty memory until they are written back.
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    let mut vmms = vec![Vmm {
        name: "vessel",
        bin: PathBuf::from(env!("CARGO_BIN_EXE_vessel")),
        args: Vec::new(),
    }];
    if let Some(b) = std::env::var_os("VESSEL_B") {
        vmms.push(Vmm {
            name: "vessel-b",
            bin: PathBuf::from(b),
            args: std::env::var("VESSEL_B_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect(),
        });
    }
    if let Some(fc) = std::env::var_os("FIRECRACKER") {
        vmms.push(Vmm {
            name: "firecracker",
            bin: PathBuf::from(fc),
            args: Vec::new(),
        });
    } else {
        println!("(no FIRECRACKER=/path given: Vessel's figures only)");
    }
    let dir = std::env::temp_dir().join(format!("vessel-bench-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let touching = dir.join("touching.elf");
    std::fs::write(&touching, elf(&touching_guest())).unwrap();
    let (none, many) = (dir.join("exits-0.elf"), dir.join("exits-n.elf"));
    std::fs::write(&none, elf(&exiting_guest(0))).unwrap();
    std::fs::write(&many, elf(&exiting_guest(EXITS))).unwrap();
    let sock = dir.join("api.sock");
    let only = std::env::var("COMPARE_ONLY").ok();
    let wanted = |s: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == s));
    let each = |f: &mut dyn FnMut(&Vmm) -> f64, runs: usize| -> Vec<(&str, Vec<f64>)> {
        let mut out: Vec<(&str, Vec<f64>)> = vmms.iter().map(|v| (v.name, Vec::new())).collect();
        for _ in 0..runs {
            for (i, v) in vmms.iter().enumerate() {
                out[i].1.push(f(v));
            }
        }
        out
    };

    if wanted("start") {
        let start = each(
            &mut |v| {
                let (t, child) = time_to_api(v, &sock);
                stop(child);
                ms(t)
            },
            STARTS,
        );
        line("start to API (GET / answered)", "ms", &start);
    }

    if wanted("memory") {
        let mut private = Vec::new();
        let rss = each(
            &mut |v| {
                let (child, _) = boot(v, &sock, &touching);
                std::thread::sleep(Duration::from_millis(300));
                let (rss, dirty) = memory(child.id());
                if std::env::var_os("COMPARE_MAPPINGS").is_some() {
                    println!("{}: private dirty and RSS by mapping (KiB)", v.name);
                    for (name, dirty, rss) in dirty_by_mapping(child.id()) {
                        println!("  {dirty:>6} {rss:>6} {name}");
                    }
                    println!("  threads: {}", threads(child.id()).join(", "));
                    println!("  guest pages present: {}", guest_pages(child.id()));
                }
                stop(child);
                private.push((v.name, dirty as f64));
                rss as f64
            },
            RUNS,
        );
        line("RSS, 64 MiB guest that wrote 16 pages", "KiB", &rss);
        let dirty: Vec<(&str, Vec<f64>)> = vmms
            .iter()
            .map(|v| {
                let xs = private.iter().filter(|p| p.0 == v.name).map(|p| p.1);
                (v.name, xs.collect())
            })
            .collect();
        line("private dirty, same guest", "KiB", &dirty);
    }

    if wanted("restore") {
        let load = each(&mut |v| ms(snapshot_load(v, &dir, &touching)), RUNS);
        line("PUT /snapshot/load (resume) round trip", "ms", &load);
    }

    if wanted("exits") {
        let exits = each(
            &mut |v| {
                let base = run_to_exit(v, &sock, &none);
                let full = run_to_exit(v, &sock, &many);
                full.saturating_sub(base).as_secs_f64() * 1e6 / f64::from(EXITS)
            },
            RUNS,
        );
        line("port-I/O exit, whole process", "us", &exits);
        let bare: Vec<f64> = (0..RUNS)
            .map(|_| {
                let full = bare::bare_once(&exiting_guest(EXITS));
                let base = bare::bare_once(&exiting_guest(0));
                full.saturating_sub(base).as_secs_f64() * 1e6 / f64::from(EXITS)
            })
            .collect();
        let (b, _, _) = stats(bare.clone());
        line("port-I/O exit, bare KVM_RUN loop", "us", &[("bare", bare)]);
        for (name, v) in &exits {
            println!("  {name} / bare = {:.2}", stats(v.clone()).0 / b);
        }
    }

    if wanted("density") {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let (mut serial, mut parallel, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..DENSITY_ROUNDS {
            for v in &vmms {
                let (a, b, c) = density(v, &dir, &none, LIVES / DENSITY_ROUNDS, AT_ONCE);
                serial.push((v.name, a));
                parallel.push((v.name, b));
                cpu.push((v.name, c));
            }
        }
        let by_vmm = |xs: &[(&str, f64)], scale: f64| -> Vec<(&str, Vec<f64>)> {
            vmms.iter()
                .map(|v| {
                    let mine = xs.iter().filter(|x| x.0 == v.name).map(|x| x.1 * scale);
                    (v.name, mine.collect())
                })
                .collect()
        };
        line(
            &format!("microVM lives one after another ({LIVES} in {DENSITY_ROUNDS} rounds)"),
            "VMs/s",
            &by_vmm(&serial, 1.0),
        );
        line(
            "CPU time of one microVM life (user + system)",
            "ms",
            &by_vmm(&cpu, 1.0),
        );
        line(
            &format!("microVM lives {AT_ONCE} at once, per core ({cores} cores)"),
            "VMs/s",
            &by_vmm(&parallel, 1.0 / cores),
        );
        let mut per_vm = Vec::new();
        for _ in 0..DENSITY_ROUNDS {
            for v in &vmms {
                let (pss, dirty) = overhead(v, &dir, &touching, AT_ONCE);
                per_vm.push((v.name, pss, dirty));
            }
        }
        let pick = |f: fn(&(&str, f64, f64)) -> f64| -> Vec<(&str, Vec<f64>)> {
            vmms.iter()
                .map(|v| {
                    let mine = per_vm.iter().filter(|x| x.0 == v.name).map(f);
                    (v.name, mine.collect())
                })
                .collect()
        };
        line(
            &format!("per-VM Pss, {AT_ONCE} tiny guests at once"),
            "KiB",
            &pick(|x| x.1),
        );
        line(
            &format!("per-VM private dirty, {AT_ONCE} tiny guests at once"),
            "KiB",
            &pick(|x| x.2),
        );
    }

    let _ = std::fs::remove_dir_all(&dir);
}
