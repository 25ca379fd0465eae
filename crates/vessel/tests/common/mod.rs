//! Shared helpers for the end-to-end tests: run the `vessel` binary, build tiny guests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod tinyguest;

pub fn vessel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vessel"));
    c.stdin(Stdio::null());
    c
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run a command with a time limit (a hung VMM fails the test instead of hanging CI).
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn vessel");
    let pid = child.id();
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for vessel"),
        Err(_) => {
            // SAFETY-free: kill by pid through the shell-less libc call is not available here;
            // use the kill command.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!(
                "vessel did not finish within {:?} (started {:?} ago)",
                limit,
                start.elapsed()
            );
        }
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Paths of a guest-kit image, when the tests are asked to use one (`VESSEL_E2E=1`) or it is
/// already cached. `None` means: skip (with a note) — CI sets `VESSEL_E2E=1`, which turns a
/// missing image into a failure.
pub fn kit_image(name: &str) -> Option<(PathBuf, PathBuf)> {
    let required = std::env::var("VESSEL_E2E").is_ok_and(|v| v == "1");
    let out = vessel()
        .args(["image", "build", name])
        .env("VESSEL_IMAGE_NO_BUILD", if required { "0" } else { "1" })
        .output()
        .expect("run vessel image build");
    let s = text(&out.stdout);
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(PathBuf::from)
    };
    match (out.status.success(), get("kernel"), get("initrd")) {
        (true, Some(k), Some(i)) if Path::new(&k).exists() => Some((k, i)),
        _ if required => panic!(
            "VESSEL_E2E=1 but image {name} is not available: {}",
            text(&out.stderr)
        ),
        _ => {
            eprintln!("note: image {name} not built; set VESSEL_E2E=1 (scripts/test.sh does) to build and boot it");
            None
        }
    }
}
