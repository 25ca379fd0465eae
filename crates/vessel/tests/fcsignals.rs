//! Firecracker's signal handling (its suite's `test_signals.py` and
//! `test_negative_file_size_limit`): a VMM in Firecracker mode that writes past its file size
//! limit logs `Shutting down VM after intercepting signal 25, code 0.` to its log and exits
//! with Firecracker's status, 151, instead of dying of the signal; SIGBUS, SIGSEGV, SIGXCPU,
//! SIGHUP, SIGILL and SIGSYS the same way with their statuses, a last metrics line counting
//! the signal; SIGPIPE is logged and counted and the VM goes on. Boots a tiny guest (needs
//! /dev/kvm).

mod common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use common::fcprocess::*;
use common::tinyguest::{elf, Guest};
use common::*;
use serde_json::{json, Value};
use vessel_api::client::Client;

const LIMIT: Duration = Duration::from_secs(60);
/// The file size limit: smaller than one metrics line.
const FSIZE: u64 = 64;

#[test]
fn exceeding_the_file_size_limit_logs_and_exits_151() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: needs /dev/kvm");
        return;
    }
    let dir = scratch("sigxfsz");
    // The log goes to a FIFO (no file size limit applies to it); the metrics to a file.
    let fifo = dir.join("log.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut log = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let metrics = dir.join("metrics.json");
    let kernel = halting_guest(&dir);

    let mut v = FcVessel::start(
        &dir,
        "xfsz",
        &[
            "--id",
            "xfsz-test",
            "--log-path",
            fifo.to_str().unwrap(),
            "--level",
            "Info",
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--metrics-period-ms",
            "50",
        ],
    );
    // As the jailer's --resource-limit fsize=64 would have set it.
    let lim = libc::rlimit {
        rlim_cur: FSIZE,
        rlim_max: FSIZE,
    };
    // SAFETY: prlimit reads the struct we pass and writes nothing (null old limit).
    let r = unsafe {
        libc::prlimit(
            v.child.id() as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let mut c = v.client();
    expect(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({ "kernel_image_path": kernel })),
        204,
    );
    // Once the VM runs, the metrics line written at InstanceStart goes past the limit: the
    // process ends while answering (the answer may or may not get out first).
    let body = action("InstanceStart").unwrap().to_string();
    if let Ok(r) = c.request("PUT", "/actions", Some(&body)) {
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let code = v.wait_exit(LIMIT);
    assert_eq!(code, Some(151), "{}", v.stderr());
    let mut text = String::new();
    let _ = log.read_to_string(&mut text);
    assert!(
        text.lines().any(|l| l.contains("[xfsz-test:")
            && l.ends_with("Shutting down VM after intercepting signal 25, code 0.")),
        "{text}"
    );
    // The write stopped at the limit.
    assert_eq!(std::fs::metadata(&metrics).unwrap().len(), FSIZE);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny guest that prints `UP` and halts, written to `dir`.
fn halting_guest(dir: &std::path::Path) -> std::path::PathBuf {
    let mut g = Guest::new();
    g.print("UP\n");
    let mut l = g.a.create_label();
    g.a.set_label(&mut l).unwrap();
    g.a.hlt().unwrap();
    g.a.jmp(l).unwrap();
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(&g.finish())).unwrap();
    kernel
}

/// A running VM with a log file and a metrics file, after its first metrics line.
fn running(
    dir: &std::path::Path,
    name: &str,
) -> (FcVessel, std::path::PathBuf, std::path::PathBuf) {
    let (log, metrics) = (dir.join("log"), dir.join("metrics.json"));
    let kernel = halting_guest(dir);
    let v = FcVessel::start(
        dir,
        name,
        &[
            "--id",
            "signal-test",
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
    );
    let mut c = v.client();
    configure(
        &mut c,
        json!({ "kernel_image_path": kernel }),
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("UP", LIMIT, |s| s.contains("UP"));
    assert_eq!(lines(&metrics).len(), 1);
    (v, log, metrics)
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn send(v: &FcVessel, signo: i32) {
    // SAFETY: kill sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(v.child.id() as libc::pid_t, signo) }, 0);
}

#[test]
fn intercepted_signals_log_count_and_exit_with_firecracker_s_status() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: needs /dev/kvm");
        return;
    }
    for (signo, name, status) in [
        (libc::SIGBUS, "sigbus", 149),
        (libc::SIGSEGV, "sigsegv", 150),
        (libc::SIGXCPU, "sigxcpu", 154),
        (libc::SIGHUP, "sighup", 156),
        (libc::SIGILL, "sigill", 157),
        // Not from seccomp (kill): Firecracker's unexpected-error status.
        (libc::SIGSYS, "num_faults", 2),
    ] {
        let dir = scratch(&format!("signal-{name}"));
        let (mut v, log, metrics) = running(&dir, name);
        send(&v, signo);
        assert_eq!(v.wait_exit(LIMIT), Some(status), "{name}: {}", v.stderr());
        let text = std::fs::read_to_string(&log).unwrap();
        let line = format!("Shutting down VM after intercepting signal {signo}, code 0.");
        assert!(
            text.lines()
                .any(|l| l.contains("[signal-test:") && l.ends_with(&line)),
            "{name}: {text}"
        );
        // The last line counts it.
        let m = lines(&metrics);
        assert_eq!(m.len(), 2, "{name}: {m:?}");
        let group = if signo == libc::SIGSYS {
            "seccomp"
        } else {
            "signals"
        };
        assert_eq!(m[1][group][name], 1, "{name}: {}", m[1]);
        assert_eq!(m[0][group][name], 0, "{name}: {}", m[0]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn sigpipe_is_logged_and_counted_and_the_vm_goes_on() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: needs /dev/kvm");
        return;
    }
    let dir = scratch("signal-sigpipe");
    let (mut v, log, metrics) = running(&dir, "sigpipe");
    send(&v, libc::SIGPIPE);
    let mut c = v.client();
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("Received signal 13, code 0.")
    {
        assert!(t.elapsed() < LIMIT, "{}", v.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(state(&mut c), "Running");
    // Counted once: in the next line, not the one after.
    expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
    expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
    let m = lines(&metrics);
    assert_eq!(m.len(), 3, "{m:?}");
    assert_eq!(m[1]["signals"]["sigpipe"], 1, "{}", m[1]);
    assert_eq!(m[2]["signals"]["sigpipe"], 0, "{}", m[2]);
    v.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Before the VM starts too, a signal's last metrics line is written when there is a
/// metrics file.
#[test]
fn a_signal_before_the_vm_starts_still_gets_its_metrics_line() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: needs /dev/kvm");
        return;
    }
    let dir = scratch("signal-preboot");
    let metrics = dir.join("metrics.json");
    let mut v = FcVessel::start(
        &dir,
        "preboot",
        &["--metrics-path", metrics.to_str().unwrap()],
    );
    let mut c = v.client();
    assert_eq!(state(&mut c), "Not started");
    send(&v, libc::SIGHUP);
    assert_eq!(v.wait_exit(LIMIT), Some(156), "{}", v.stderr());
    let m = lines(&metrics);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["signals"]["sighup"], 1, "{}", m[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A runtime that spawned the VMM with its stderr on a pipe may be gone before it (Kata's
/// shim, after a failed start): every log line then meets a closed pipe and raises SIGPIPE,
/// whose handler's own line raised the next one. The thread looped in the handler: its
/// request was never answered and SIGTERM never ended the process. Needs no /dev/kvm.
#[test]
fn a_closed_stderr_pipe_neither_hangs_the_api_nor_keeps_the_process() {
    let dir = scratch("signal-closed-stderr");
    let sock = dir.join("api.sock");
    let mut child = vessel()
        .arg("--api-sock")
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed() < LIMIT, "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = Client::new(&sock, Duration::from_secs(10));
    // Each refusal is logged (to the closed pipe), and still answered.
    for _ in 0..3 {
        let body = json!({"guest_cid": 1, "uds_path": dir.join("v.sock")});
        expect(&mut c, "PUT", "/vsock", Some(body), 400);
    }
    assert_eq!(state(&mut c), "Not started");
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("SIGTERM did not end it");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.code().is_some(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
