//! What the jail costs at VMM start. Prints figures; asserts nothing. Needs root.
//!
//! - the demo guest (`vessel run`) bare, in a jail, and in a jail with cgroup limits: time
//!   from spawn to the guest's first console line and to the VMM's exit;
//! - the jail alone: `vessel jail` around `/bin/true` (spawn to exit).
//!
//!   cargo bench -p vessel --bench jail

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const RUNS: usize = 20;

fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Spawn to the first stdout line and to exit, in ms.
fn time(mut cmd: Command) -> (f64, f64) {
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let first = t.elapsed().as_secs_f64() * 1e3;
    let status = child.wait().unwrap();
    let whole = t.elapsed().as_secs_f64() * 1e3;
    assert!(status.success(), "{status}");
    (first, whole)
}

fn jail(base: &Path, id: &str, limits: bool) -> Command {
    let mut c = vessel();
    c.args(["jail", "--id", id, "--uid", "40123", "--gid", "40123"])
        .arg("--chroot-base-dir")
        .arg(base);
    if limits {
        c.args(["--memory", "512M", "--cpus", "1", "--pids", "64"]);
    }
    c
}

fn report(name: &str, first: &mut [f64], whole: &mut [f64]) {
    println!(
        "{name:<34} first line p50 {:7.2} ms p90 {:7.2} ms | exit p50 {:7.2} ms p90 {:7.2} ms",
        percentile(first, 0.5),
        percentile(first, 0.9),
        percentile(whole, 0.5),
        percentile(whole, 0.9)
    );
}

fn main() {
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/kvm").exists() {
        println!("jail bench: needs root and /dev/kvm; skipped");
        return;
    }
    let base = std::env::temp_dir().join(format!("vessel-jail-bench-{}", std::process::id()));
    let kinds = [
        "bare vessel run",
        "vessel jail -- run",
        "vessel jail (cgroup limits) -- run",
    ];
    let mut first = vec![Vec::new(); 3];
    let mut whole = vec![Vec::new(); 3];
    // Interleaved so that drift on a shared host hits every kind alike; one warm-up round.
    for i in 0..=RUNS {
        for k in 0..3 {
            let id = format!("bench-{i}-{k}");
            let mut cmd = match k {
                0 => vessel(),
                _ => jail(&base, &id, k == 2),
            };
            if k > 0 {
                cmd.arg("--");
            }
            cmd.arg("run");
            let (f, w) = time(cmd);
            if i > 0 {
                first[k].push(f);
                whole[k].push(w);
            }
        }
    }
    println!("jail bench: {RUNS} runs each, demo guest (1 vCPU, 128 MiB)");
    for k in 0..3 {
        report(kinds[k], &mut first[k], &mut whole[k]);
    }
    let mut alone = Vec::new();
    for i in 0..=RUNS {
        let mut c = jail(&base, &format!("true-{i}"), true);
        c.args(["--exec-file", "/bin/true"]);
        let t = Instant::now();
        let s = c.stdout(Stdio::null()).status().unwrap();
        assert!(s.success(), "{s}");
        if i > 0 {
            alone.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "{:<34} exit p50 {:7.2} ms p90 {:7.2} ms",
        "vessel jail (limits) -- /bin/true",
        percentile(&mut alone, 0.5),
        percentile(&mut alone, 0.9)
    );
    let _ = std::fs::remove_dir_all(&base);
}
