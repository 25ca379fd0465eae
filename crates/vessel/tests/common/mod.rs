//! Shared helpers for the end-to-end tests: run the `vessel` binary, build tiny guests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod fcprocess;
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

/// Paths of a guest-kit image. With `VESSEL_E2E=1` (scripts/test.sh sets it) the image is
/// built when missing and a failure to build fails the test; otherwise a test that needs an
/// image that is not cached yet is skipped with a note.
pub fn kit_image(name: &str) -> Option<(PathBuf, PathBuf)> {
    let required = std::env::var("VESSEL_E2E").is_ok_and(|v| v == "1");
    let cached = vessel_image::cache_dir()
        .join("images")
        .join(name)
        .join("stamp");
    if !required && !cached.exists() {
        eprintln!(
            "note: image {name} is not built; scripts/test.sh (VESSEL_E2E=1) builds and boots it"
        );
        return None;
    }
    let out = vessel()
        .args(["image", "build", name])
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
        _ => panic!("image {name} is not available: {}", text(&out.stderr)),
    }
}

/// The kit's `minimal` kernel and initramfs for an end-to-end test, or `None` when end-to-end
/// tests are off (with a note: "set VESSEL_E2E=1 to `what`").
pub fn e2e_minimal(what: &str) -> Option<(PathBuf, PathBuf)> {
    if std::env::var("VESSEL_E2E").ok().as_deref() != Some("1") {
        eprintln!("note: set VESSEL_E2E=1 to {what}");
        return None;
    }
    kit_image("minimal")
}

/// Collects everything `r` yields, as it comes, into a shared string.
pub fn collect_output(
    mut r: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let o = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

/// Runs `cmd` with `sh -c`; true if it succeeded.
pub fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .is_ok_and(|s| s.success())
}

/// An ext4 image of `size_mib` MiB named `disk.ext4` in `dir`, holding `files`
/// (mkfs.ext4 -d).
pub fn ext4_image(dir: &Path, files: &Path, size_mib: u64) -> PathBuf {
    let img = dir.join("disk.ext4");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size_mib << 20).unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(files)
        .arg(&img)
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(out.status.success(), "mkfs.ext4: {}", text(&out.stderr));
    img
}

/// `vessel run` of the kit's kernel and initramfs with 128 MiB that powers off after the
/// init's script, its console going to `console`; add devices and run it with [`run_guest`].
pub fn kit_run(kernel: &Path, initrd: &Path, console: &Path) -> Command {
    let mut cmd = vessel();
    cmd.args(["run", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "128M", "--append", "vessel.poweroff"])
        .arg(format!("--serial=file={}", console.display()));
    cmd
}

/// Runs a guest to its end (within `limit`) and asserts that `vessel` succeeded; returns the
/// console's text and its last 40 lines (for assertion messages).
pub fn run_guest(cmd: Command, console: &Path, limit: Duration) -> (String, String) {
    let out = run_with_timeout(cmd, limit);
    let console_text = std::fs::read_to_string(console).unwrap_or_default();
    let tail: Vec<&str> = console_text.lines().rev().take(40).collect();
    let tail: String = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "vessel failed: {}\nconsole tail:\n{tail}",
        text(&out.stderr)
    );
    (console_text, tail)
}
