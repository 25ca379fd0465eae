//! API benchmark (prints figures; not a test): process start to the API socket accepting
//! (`vessel --api-sock`, Firecracker-compatible mode), in wall time and in the process's CPU
//! time (all threads, from `wait4`); the round trip of `GET /` and
//! `PUT /machine-config` on a kept-alive connection before start; and, with a tiny guest
//! whose vCPU spins (`jmp $`), `GET /`, `GET /vm/config` and `PATCH /vm` Paused+Resumed
//! pairs while it runs.
//!
//! `cargo bench -p vessel --bench api`

use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vessel_api::client::Client;

#[allow(dead_code)]
#[path = "../tests/common/tinyguest.rs"]
mod tinyguest;

const STARTS: usize = 30;
const REQUESTS: usize = 2000;
const PAUSE_PAIRS: usize = 300;

fn spawn(sock: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vessel")
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Ends `c` with SIGKILL (no cleanup runs) and returns the CPU time (user + system, all its
/// threads) it used, from `wait4`'s resource usage.
fn kill_and_cpu_time(mut c: Child) -> Duration {
    let _ = c.kill();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it and the status for our child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own unreaped child, writing to the two locals.
    let r = unsafe { libc::wait4(c.id() as libc::pid_t, &mut status, 0, &mut ru) };
    assert_eq!(r, c.id() as libc::pid_t, "wait4 failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Spawn to the first successful `connect`, polling every 50 µs; and the CPU time the process
/// used until then (it is killed at once: idle, waiting for requests, it uses no more).
fn time_to_socket(sock: &std::path::Path) -> (Duration, Duration) {
    let _ = std::fs::remove_file(sock);
    let t = Instant::now();
    let child = spawn(sock);
    let accepted = loop {
        if UnixStream::connect(sock).is_ok() {
            break Some(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    let cpu = kill_and_cpu_time(child);
    (accepted.expect("the API socket never accepted"), cpu)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what} ({} samples): median {:.1} µs, p99 {:.1} µs",
        times.len(),
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6
    );
}

fn time_requests(
    c: &mut Client,
    n: usize,
    requests: &[(&str, &str, Option<&str>)],
) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            for (method, path, body) in requests {
                let r = c.request(method, path, *body).expect("request");
                assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.text());
            }
            t.elapsed()
        })
        .collect()
}

/// Round trips while a guest keeps its vCPU busy.
fn running_guest(dir: &std::path::Path) {
    let sock = dir.join("running.sock");
    let kernel = dir.join("spin.elf");
    // jmp $
    std::fs::write(&kernel, tinyguest::elf(&[0xeb, 0xfe])).unwrap();
    let _ = std::fs::remove_file(&sock);
    let child = spawn(&sock);
    let mut c = Client::new(&sock, Duration::from_secs(10));
    let t = Instant::now();
    while c.request("GET", "/", None).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(1));
    }
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    for (method, path, body) in [
        ("PUT", "/boot-source", Some(boot.as_str())),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        ),
    ] {
        let r = c.request(method, path, body).expect("request");
        assert!(r.status < 300, "{path}: {}", r.text());
    }
    let get = [("GET", "/", None)];
    report(
        "running guest: GET / round trip",
        time_requests(&mut c, REQUESTS, &get),
    );
    let config = [("GET", "/vm/config", None)];
    report(
        "running guest: GET /vm/config round trip",
        time_requests(&mut c, REQUESTS, &config),
    );
    let pairs = [
        ("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        ("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)),
    ];
    report(
        "running guest: PATCH /vm Paused + Resumed pair",
        time_requests(&mut c, PAUSE_PAIRS, &pairs),
    );
    stop(child);
}

fn main() {
    let dir = std::env::temp_dir().join(format!("vessel-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");

    let (mut starts, mut cpu): (Vec<Duration>, Vec<Duration>) =
        (0..STARTS).map(|_| time_to_socket(&sock)).unzip();
    starts.sort();
    cpu.sort();
    println!(
        "process start to API socket accepting ({STARTS} runs): median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
        ms(percentile(&starts, 0.5)),
        ms(percentile(&starts, 0.9)),
        ms(starts[0])
    );
    // Firecracker publishes 8 CPU ms for the same span (its "process startup time").
    println!(
        "CPU time of the process until then ({STARTS} runs): median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
        ms(percentile(&cpu, 0.5)),
        ms(percentile(&cpu, 0.9)),
        ms(cpu[0])
    );

    let _ = std::fs::remove_file(&sock);
    let child = spawn(&sock);
    let mut c = Client::new(&sock, Duration::from_secs(5));
    let t = Instant::now();
    while c.request("GET", "/", None).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(1));
    }
    for (what, method, path, body) in [
        ("GET /", "GET", "/", None),
        (
            "PUT /machine-config",
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        ),
    ] {
        let mut times = Vec::with_capacity(REQUESTS);
        for _ in 0..REQUESTS {
            let t = Instant::now();
            let r = c.request(method, path, body).expect("request");
            times.push(t.elapsed());
            assert!(r.status < 300, "{what}: {}", r.status);
        }
        times.sort();
        println!(
            "{what} round trip ({REQUESTS} on one connection): median {:.1} µs, p99 {:.1} µs",
            percentile(&times, 0.5).as_secs_f64() * 1e6,
            percentile(&times, 0.99).as_secs_f64() * 1e6
        );
    }
    stop(child);
    running_guest(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}
