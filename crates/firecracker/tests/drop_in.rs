//! The `firecracker` binary: Firecracker mode alone. It serves Firecracker's API and log
//! lines as `vessel` does in that mode, and takes Firecracker's flags and nothing of the
//! `vessel` command's (no subcommands).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vessel_api::client::Client;

/// The binary under test: this package's, or the one `VESSEL_FIRECRACKER_BIN` names (the
/// extended test command checks the static build of `scripts/build-static.sh` so).
fn firecracker() -> Command {
    match std::env::var_os("VESSEL_FIRECRACKER_BIN") {
        Some(bin) => Command::new(bin),
        None => Command::new(env!("CARGO_BIN_EXE_firecracker")),
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-fc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_firecracker_binary_serves_firecracker_s_api_and_log_lines() {
    let dir = scratch("serve");
    let sock = dir.join("api.sock");
    let log = dir.join("fc.log");
    let metrics = dir.join("metrics.json");
    std::fs::File::create(&log).unwrap();
    std::fs::File::create(&metrics).unwrap();
    // With a metrics file, the metrics thread runs from the start too.
    let mut child = firecracker()
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "slim-1"])
        .args(["--log-path", log.to_str().unwrap(), "--level", "Info"])
        .args(["--metrics-path", metrics.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::new(&sock, Duration::from_secs(10));
    let root = c.request("GET", "/", None);
    let version = c.request("GET", "/version", None);
    // Every thread is up by now; the process must still be serving.
    std::thread::sleep(Duration::from_millis(200));
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        alive,
        "the process ended; log: {log_text}; stderr: {stderr}"
    );
    let root = root.unwrap_or_else(|e| panic!("GET /: {e}; stderr: {stderr}"));
    assert_eq!(root.status, 200);
    let info = root.json();
    assert_eq!(info["app_name"], "Firecracker");
    assert_eq!(info["id"], "slim-1");
    assert_eq!(info["state"], "Not started");
    let version = version.unwrap().json();
    assert_eq!(
        version["firecracker_version"],
        vessel_api::FIRECRACKER_API_VERSION
    );
    let log = log_text;
    let running = format!(
        "Running Firecracker v{}",
        vessel_api::FIRECRACKER_API_VERSION
    );
    assert!(log.contains(&running), "{log}");
    assert!(log.contains("API server started."), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn it_takes_firecracker_s_flags_and_none_of_vessel_s_commands() {
    let out = firecracker().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().next(),
        Some(format!("Firecracker v{}", vessel_api::FIRECRACKER_API_VERSION).as_str())
    );

    let help = firecracker().arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--api-sock") && help.contains("--config-file"),
        "{help}"
    );
    assert!(!help.contains("Commands:"), "{help}");

    // `vessel run` is not a Firecracker flag: a usage error, in one line.
    let run = firecracker().args(["run", "--cpus", "1"]).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.starts_with("firecracker: ") && err.contains("'run'"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
