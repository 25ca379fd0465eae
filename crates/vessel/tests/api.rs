//! Firecracker-compatible mode end to end: `vessel --api-sock` (and `--config-file
//! --no-api`) with a tiny guest that counts on the serial console, configured, started,
//! paused, resumed and ended through the socket; the `vessel api` client; and, with
//! `VESSEL_E2E=1`, a session with the kit's `minimal` Linux guest.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fcprocess::*;
use common::tinyguest::{elf, Guest};
use common::*;
use iced_x86::code_asm::*;
use serde_json::{json, Value};
use vessel_api::client::Client;

const LIMIT: Duration = Duration::from_secs(60);

/// A guest that prints `TICK <n>` forever (or until `max_ticks`, then powers off), and
/// between ticks polls the i8042: each keyboard byte is printed as `KEY <hex>`; after the
/// last byte of Ctrl-Alt-Del (Ctrl released, 0x9d) it resets through the i8042, as Linux
/// with `reboot=k` does.
fn ticker(max_ticks: Option<u32>) -> Vec<u8> {
    let mut g = Guest::new();
    let mut tick = g.a.create_label();
    let mut poll = g.a.create_label();
    let mut delay = g.a.create_label();
    g.a.xor(r12d, r12d).unwrap();
    g.a.set_label(&mut tick).unwrap();
    g.a.inc(r12).unwrap();
    g.print("TICK ");
    g.a.mov(rax, r12).unwrap();
    g.print_rax_hex();
    g.print("\n");
    if let Some(max) = max_ticks {
        let mut go_on = g.a.create_label();
        g.a.cmp(r12d, max).unwrap();
        g.a.jb(go_on).unwrap();
        g.print("DONE\n");
        g.power_off();
        g.a.set_label(&mut go_on).unwrap();
    }
    g.a.mov(ecx, 2_000_000u32).unwrap();
    g.a.set_label(&mut delay).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(delay).unwrap();
    // Keyboard bytes waiting?
    g.a.set_label(&mut poll).unwrap();
    g.a.in_(al, 0x64u32).unwrap();
    g.a.test(al, 1u32).unwrap();
    g.a.jz(tick).unwrap();
    g.a.in_(al, 0x60u32).unwrap();
    g.a.movzx(eax, al).unwrap();
    g.print("KEY ");
    g.print_rax_hex();
    g.print("\n");
    g.a.cmp(eax, 0x9du32).unwrap();
    g.a.jne(poll).unwrap();
    g.print("CTRL-ALT-DEL\n");
    g.i8042_reset();
    g.finish()
}

fn write_kernel(dir: &Path, code: Vec<u8>) -> PathBuf {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    kernel
}

/// A `vessel` process in Firecracker mode with id `api-test`, serving `DIR/api.sock`.
fn start_vessel(dir: &Path, extra: &[&str]) -> FcVessel {
    let mut args = vec!["--id", "api-test"];
    args.extend_from_slice(extra);
    FcVessel::start(dir, "api", &args)
}

fn ticks(console: &str) -> usize {
    console.lines().filter(|l| l.starts_with("TICK ")).count()
}

/// Pause stops the guest: once the console has stopped growing, it stays still.
fn assert_no_progress(v: &FcVessel) {
    let mut last = v.console();
    // Let what was written before the pause reach us.
    let t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = v.console();
        if now == last {
            break;
        }
        assert!(t.elapsed() < LIMIT, "the console never stopped growing");
        last = now;
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ticks(&v.console()),
        ticks(&last),
        "a paused guest made progress"
    );
}

/// The names of process `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn api_configures_starts_pauses_resumes_and_ctrl_alt_del_resets() {
    let dir = scratch("api-session");
    let kernel = write_kernel(&dir, ticker(None));
    let mut v = start_vessel(&dir, &[]);
    let mut c = v.client();

    assert_eq!(state(&mut c), "Not started");
    // Nothing to boot yet.
    let e = expect(&mut c, "PUT", "/actions", action("InstanceStart"), 400);
    assert!(
        e["fault_message"]
            .as_str()
            .is_some_and(|m| m.contains("kernel")),
        "{e}"
    );
    // Control calls before start.
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        400,
    );
    expect(&mut c, "PUT", "/actions", action("SendCtrlAltDel"), 400);

    configure(
        &mut c,
        json!({
            "kernel_image_path": kernel,
            "boot_args": "console=ttyS0 reboot=k"
        }),
        json!({"vcpu_count": 2, "mem_size_mib": 64}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    assert_eq!(state(&mut c), "Running");
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 3);
    // No metrics file: no thread writes periodic metrics.
    let names = thread_names(v.child.id());
    assert!(names.iter().any(|n| n == "fc_vcpu 1"), "{names:?}");
    assert!(!names.iter().any(|n| n == "metrics"), "{names:?}");

    // Pre-boot calls are refused once running.
    let e = expect(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({ "kernel_image_path": kernel })),
        400,
    );
    assert!(e["fault_message"].is_string(), "{e}");
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 400);

    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    assert_eq!(state(&mut c), "Paused");
    assert_no_progress(&v);
    let paused_at = ticks(&v.console());

    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Resumed"})),
        204,
    );
    assert_eq!(state(&mut c), "Running");
    v.wait_console("ticks after resume", LIMIT, |s| ticks(s) >= paused_at + 3);

    // Ctrl-Alt-Del reaches the guest's keyboard; it resets and the process exits 0.
    expect(&mut c, "PUT", "/actions", action("SendCtrlAltDel"), 204);
    let code = v.wait_exit(LIMIT);
    let console = v.console();
    assert_eq!(code, Some(0), "stderr: {}", v.stderr());
    let keys: Vec<u64> = console
        .lines()
        .filter_map(|l| l.strip_prefix("KEY "))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .collect();
    assert_eq!(keys, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
    assert!(console.contains("CTRL-ALT-DEL\n"), "{}", tail(&console));
    // The process removed its socket on the way out.
    assert!(!v.sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_vessel_api_client_drives_a_vm() {
    let dir = scratch("api-cli");
    let kernel = write_kernel(&dir, ticker(None));
    let mut v = start_vessel(&dir, &[]);
    let sock = v.sock.to_str().unwrap().to_string();
    let api = |args: &[&str]| {
        let out = vessel()
            .args(["api", "--sock", &sock])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, _) = api(&["status"]);
    assert!(
        ok && out.contains("Not started") && out.contains("api-test"),
        "{out}"
    );
    // Errors show the status and the fault message, and fail.
    let (ok, _, err) = api(&["start"]);
    assert!(
        !ok && err.contains("HTTP 400") && err.contains("kernel"),
        "{err}"
    );
    let body = json!({"kernel_image_path": kernel}).to_string();
    let (ok, _, err) = api(&["put", "/boot-source", &body]);
    assert!(ok, "{err}");
    let (ok, out, _) = api(&["get", "/vm/config"]);
    assert!(ok && out.contains("guest.elf"), "{out}");
    let (ok, _, err) = api(&[
        "put",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": false}"#,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = api(&["start"]);
    assert!(ok, "{err}");
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);
    let (ok, _, err) = api(&["pause"]);
    assert!(ok, "{err}");
    let (_, out, _) = api(&["status"]);
    assert!(out.contains("Paused"), "{out}");
    assert_no_progress(&v);
    let paused_at = ticks(&v.console());
    // A paused VM snapshots; `--describe-snapshot` reads the state file's format version.
    let mem = dir.join("mem").to_str().unwrap().to_string();
    let st = dir.join("state").to_str().unwrap().to_string();
    let (ok, _, err) = api(&["snapshot", "create", "--mem", &mem, "--state", &st]);
    assert!(ok, "{err}");
    assert!(std::fs::metadata(&mem).unwrap().len() >= 32 << 20);
    let out = vessel()
        .args(["--describe-snapshot", &st])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("v{}.0.0\n", vessel_snapshot::FORMAT_VERSION)
    );
    // Loading is for a fresh VMM only.
    let (ok, _, err) = api(&["snapshot", "load", "--mem", &mem, "--state", &st]);
    assert!(!ok && err.contains("HTTP 400"), "{err}");
    let (ok, _, err) = api(&["resume"]);
    assert!(ok, "{err}");
    v.wait_console("ticks after resume", LIMIT, |s| ticks(s) > paused_at);
    let (ok, out, _) = api(&["metrics"]);
    assert!(ok && out.contains("vessel_vm"), "{out}");
    let (ok, _, err) = api(&["balloon", "set", "6"]);
    assert!(ok, "{err}");
    let (ok, out, _) = api(&["balloon", "show"]);
    assert!(ok && out.contains("\"amount_mib\": 6"), "{out}");
    // Statistics were not enabled before boot.
    let (ok, _, err) = api(&["balloon", "stats"]);
    assert!(!ok && err.contains("not enabled"), "{err}");
    // Nor was free page hinting.
    for hint in ["hint-start", "hint-status", "hint-stop"] {
        let (ok, _, err) = api(&["balloon", hint]);
        assert!(
            !ok && err.contains("Attempting to use hinting when not enabled"),
            "{hint}: {err}"
        );
    }
    // Ctrl-Alt-Del resets this guest: poweroff returns once the process is gone.
    let (ok, out, err) = api(&["poweroff"]);
    assert!(ok && out.contains("powered off"), "{out} {err}");
    assert!(!v.sock.exists());
    assert_eq!(v.wait_exit(LIMIT), Some(0), "{}", v.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_file_boots_without_the_api() {
    let dir = scratch("api-config-file");
    let kernel = write_kernel(&dir, ticker(Some(3)));
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        json!({
            "boot-source": { "kernel_image_path": kernel, "boot_args": "console=ttyS0" },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 32 },
            "drives": [],
            "network-interfaces": []
        })
        .to_string(),
    )
    .unwrap();
    let mut cmd = vessel();
    cmd.arg("--config-file").arg(&config).arg("--no-api");
    let out = run_with_timeout(cmd, LIMIT);
    let console = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(ticks(&console), 3, "{console}");
    assert!(console.contains("DONE\n"), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_file_with_the_api_serves_a_running_vm() {
    let dir = scratch("api-config-file-sock");
    let kernel = write_kernel(&dir, ticker(None));
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        json!({
            "boot-source": { "kernel_image_path": kernel },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 32 }
        })
        .to_string(),
    )
    .unwrap();
    let mut v = start_vessel(&dir, &["--config-file", config.to_str().unwrap()]);
    let mut c = v.client();
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);
    assert_eq!(state(&mut c), "Running");
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 32);
    expect(&mut c, "PUT", "/actions", action("SendCtrlAltDel"), 204);
    assert_eq!(v.wait_exit(LIMIT), Some(0), "{}", v.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_files_and_flags_fail_with_one_line() {
    let dir = scratch("api-bad-config");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}"#,
    )
    .unwrap();
    let log = dir.join("fc.log");
    let out = run_with_timeout(
        {
            let mut c = vessel();
            c.arg("--config-file")
                .arg(&config)
                .arg("--no-api")
                .arg("--log-path")
                .arg(&log)
                .args(["--level", "Info"]);
            c
        },
        LIMIT,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("boot-source"),
        "{}",
        text(&out.stderr)
    );
    // The log file says it in Firecracker's words, then how the process ended.
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = logged.lines().collect();
    assert!(lines[0].contains("] Running Firecracker v"), "{logged}");
    assert!(
        logged.contains("Configuration for VMM from one single json failed"),
        "{logged}"
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.ends_with("] Firecracker exiting with error. exit_code=1")),
        "{logged}"
    );
    // --metadata: a missing file and one that is not JSON, in Firecracker's words.
    let sock = dir.join("md.sock");
    for (file, want) in [
        (
            dir.join("missing.json"),
            "Unable to open or read from the mmds content file",
        ),
        (
            dir.join("bad.json"),
            "MMDS error: metadata provided not valid json",
        ),
    ] {
        std::fs::write(dir.join("bad.json"), "{\"a\": ").unwrap();
        let out = run_with_timeout(
            {
                let mut c = vessel();
                c.arg("--api-sock").arg(&sock).arg("--metadata").arg(&file);
                c
            },
            LIMIT,
        );
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(want), "{}", text(&out.stderr));
    }
    let out = run_with_timeout(
        {
            let mut c = vessel();
            c.arg("--no-api");
            c
        },
        LIMIT,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--config-file"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `PUT /serial`: the guest's serial output goes to a file, cut by its rate limiter, and each
/// metrics line counts the bytes dropped since the one before (as Firecracker's counters).
#[test]
fn serial_output_to_a_file_with_a_rate_limiter() {
    let dir = scratch("api-serial");
    let kernel = write_kernel(&dir, ticker(None));
    let (out, metrics) = (dir.join("serial.out"), dir.join("metrics.json"));
    let v = start_vessel(&dir, &[]);
    let mut c = v.client();
    // 24 bytes, then nothing for 100 s: the first two ticks' lines at most.
    expect(
        &mut c,
        "PUT",
        "/serial",
        Some(json!({"serial_out_path": out, "rate_limiter": {"size": 24, "refill_time": 100_000}})),
        204,
    );
    expect(
        &mut c,
        "PUT",
        "/metrics",
        Some(json!({ "metrics_path": metrics })),
        204,
    );
    configure(
        &mut c,
        json!({ "kernel_image_path": kernel }),
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    let dropped = |line: &str| -> u64 {
        let m: Value = serde_json::from_str(line).unwrap();
        m["uart"]["rate_limiter_dropped_bytes"].as_u64().unwrap()
    };
    // Ticks go on (8 bytes and more each) until some are dropped.
    let t = Instant::now();
    let mut total = 0;
    while total == 0 {
        assert!(t.elapsed() < LIMIT, "nothing dropped: {}", v.stderr());
        std::thread::sleep(Duration::from_millis(200));
        expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
        let lines = std::fs::read_to_string(&metrics).unwrap();
        total = lines.lines().map(dropped).sum::<u64>();
    }
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.starts_with("TICK "), "{written:?}");
    assert!(written.len() <= 24, "{written:?}");
    // Paused, the guest prints nothing: the next lines count nothing more.
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
    let n = std::fs::read_to_string(&metrics).unwrap().lines().count();
    expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
    let lines = wait_lines(&metrics, n + 1, &v);
    assert_eq!(dropped(lines.lines().last().unwrap()), 0, "{lines}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), written);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `path` holds at least `n` lines.
fn wait_lines(path: &Path, n: usize, v: &FcVessel) -> String {
    let t = Instant::now();
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.lines().count() >= n {
            return s;
        }
        assert!(
            t.elapsed() < LIMIT,
            "{} has fewer than {n} lines: {s}\nstderr: {}",
            path.display(),
            v.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn disk(dir: &Path, name: &str, mib: u64) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p.to_str().unwrap().to_string()
}

fn fault(v: &Value) -> &str {
    v["fault_message"].as_str().unwrap_or_default()
}

/// After `InstanceStart`: a drive switches to another backing file and gets a rate limiter,
/// the balloon's target and statistics interval change through the running
/// device, metrics are written periodically, and `vessel api poweroff --force` stops the VM.
#[test]
fn post_boot_drive_balloon_and_periodic_metrics() {
    let dir = scratch("api-post-boot");
    let kernel = write_kernel(&dir, ticker(None));
    let (first, second) = (disk(&dir, "a.img", 1), disk(&dir, "b.img", 2));
    let metrics = dir.join("metrics.json");
    let mut v = start_vessel(&dir, &["--metrics-period-ms", "100"]);
    let mut c = v.client();
    let put = |c: &mut Client, path: &str, body: Value| expect(c, "PUT", path, Some(body), 204);
    put(
        &mut c,
        "/boot-source",
        json!({ "kernel_image_path": kernel }),
    );
    put(
        &mut c,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    put(
        &mut c,
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": first, "is_root_device": false, "is_read_only": false}),
    );
    put(
        &mut c,
        "/balloon",
        json!({"amount_mib": 4, "deflate_on_oom": false, "stats_polling_interval_s": 1}),
    );
    put(&mut c, "/metrics", json!({ "metrics_path": metrics }));
    // Before start, nothing is written periodically.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read_to_string(&metrics).unwrap_or_default(), "");
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);

    // Drives.
    let patch = |c: &mut Client, path: &str, body: Value, status: u16| {
        expect(c, "PATCH", path, Some(body), status)
    };
    patch(
        &mut c,
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": second}),
        204,
    );
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["drives"][0]["path_on_host"], second.as_str(), "{cfg}");
    let e = patch(
        &mut c,
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": dir.join("missing.img")}),
        400,
    );
    assert!(!fault(&e).is_empty(), "{e}");
    // The refused update changed nothing.
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["drives"][0]["path_on_host"], second.as_str(), "{cfg}");
    assert!(cfg["drives"][0]["rate_limiter"].is_null(), "{cfg}");
    // A rate limiter reaches the running device.
    patch(
        &mut c,
        "/drives/scratch",
        json!({"drive_id": "scratch", "rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}}),
        204,
    );
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(
        cfg["drives"][0]["rate_limiter"]["bandwidth"]["size"], 1000000,
        "{cfg}"
    );
    patch(
        &mut c,
        "/drives/other",
        json!({"drive_id": "other", "path_on_host": second}),
        400,
    );

    // Balloon.
    patch(&mut c, "/balloon", json!({"amount_mib": 8}), 204);
    let b = expect(&mut c, "GET", "/balloon", None, 200);
    assert_eq!(
        (
            b["amount_mib"].as_u64(),
            b["stats_polling_interval_s"].as_u64()
        ),
        (Some(8), Some(1)),
        "{b}"
    );
    let st = expect(&mut c, "GET", "/balloon/statistics", None, 200);
    assert_eq!(st["target_mib"], 8, "{st}");
    assert_eq!(st["target_pages"], 8 * 256, "{st}");
    // The tiny guest has no balloon driver: nothing inflated.
    assert_eq!(st["actual_pages"], 0, "{st}");
    patch(
        &mut c,
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 5}),
        204,
    );
    let b = expect(&mut c, "GET", "/balloon", None, 200);
    assert_eq!(b["stats_polling_interval_s"], 5, "{b}");
    let e = patch(
        &mut c,
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 0}),
        400,
    );
    assert!(fault(&e).contains("statistics"), "{e}");
    patch(&mut c, "/balloon", json!({"amount_mib": 1000}), 400);

    // Metrics lines keep coming without FlushMetrics.
    let lines = wait_lines(&metrics, 3, &v);
    for l in lines.lines() {
        let m: Value = serde_json::from_str(l).unwrap();
        assert!(m["utc_timestamp_ms"].is_u64(), "{l}");
    }

    // Stop through the CLI.
    let out = run_with_timeout(
        {
            let mut cmd = vessel();
            cmd.args(["api", "--sock"])
                .arg(&v.sock)
                .args(["poweroff", "--force"]);
            cmd
        },
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("stopped"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(v.wait_exit(LIMIT), Some(0), "{}", v.stderr());
    assert!(!v.sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--log-path` with `--show-level`, then `PUT /logger`: records land in the file in
/// Firecracker's format with their level (and origin once asked); the level filters.
#[test]
fn logger_writes_levelled_lines_to_the_log_path() {
    let dir = scratch("api-logger");
    let log = dir.join("vessel.log");
    let v = start_vessel(
        &dir,
        &[
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
            "--show-level",
        ],
    );
    let mut c = v.client();
    expect(&mut c, "GET", "/version", None, 200);
    expect(
        &mut c,
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 32})),
        204,
    );
    let s = std::fs::read_to_string(&log).unwrap();
    // Firecracker's lines, which its tools and tests wait for: the first line, the socket
    // listening, and each request (with its body, escaped as Firecracker writes it).
    let first = s.lines().next().unwrap_or("");
    assert!(
        first.ends_with(&format!(
            "[api-test:main:INFO] Running Firecracker v{}",
            vessel_api::FIRECRACKER_API_VERSION
        )),
        "{s}"
    );
    assert!(
        s.lines().any(|l| l.ends_with(":INFO] API server started.")),
        "{s}"
    );
    assert!(
        s.lines()
            .any(|l| l.contains("[api-test:vessel-api-conn:INFO] ")
                && l.ends_with("received a Get request on \"/version\".")),
        "{s}"
    );
    assert!(
        s.lines().any(|l| l.contains(
            r#"The API server received a Put request on "/machine-config" with body "{\""#
        ) && l.contains(r#"\"mem_size_mib\":32"#)
            && l.ends_with(r#"}"."#)),
        "{s}"
    );
    // Durations are logged at Debug only.
    assert!(!s.contains("Total previous API call duration"), "{s}");
    // Now warnings only, with their origin, to a second file.
    let log2 = dir.join("vessel2.log");
    expect(
        &mut c,
        "PUT",
        "/logger",
        Some(json!({"log_path": log2, "level": "Warning", "show_log_origin": true})),
        204,
    );
    expect(&mut c, "GET", "/version", None, 200);
    let e = expect(
        &mut c,
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 0, "mem_size_mib": 64})),
        400,
    );
    let s = std::fs::read_to_string(&log2).unwrap();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 1, "{s}");
    let l = lines[0];
    assert!(
        l.contains(":WARN:") && l.contains("routes.rs:") && l.contains(fault(&e)),
        "{l}"
    );
    // YYYY-MM-DDTHH:MM:SS.nnnnnnnnn [
    assert_eq!(l.as_bytes()[10], b'T', "{l}");
    assert_eq!(&l[29..31], " [", "{l}");
    // A FIFO nobody reads opens without blocking, and logging to it never blocks the VMM.
    let fifo = dir.join("log.fifo");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    expect(
        &mut c,
        "PUT",
        "/logger",
        Some(json!({"log_path": fifo, "level": "Trace"})),
        204,
    );
    for _ in 0..2000 {
        call(&mut c, "GET", "/", None);
    }
    assert_eq!(state(&mut c), "Not started");
    let _ = std::fs::remove_dir_all(&dir);
}

fn kill(v: &FcVessel, sig: i32) {
    // SAFETY: signals our own child by its pid.
    assert_eq!(unsafe { libc::kill(v.child.id() as i32, sig) }, 0);
}

/// SIGTERM before `InstanceStart` and SIGINT while the VM runs: the process ends and removes
/// its API socket.
#[test]
fn signals_remove_the_api_socket_before_and_after_start() {
    let dir = scratch("api-signals");
    let mut v = start_vessel(&dir, &[]);
    assert_eq!(state(&mut v.client()), "Not started");
    kill(&v, libc::SIGTERM);
    assert_eq!(v.wait_exit(LIMIT), Some(128 + libc::SIGTERM));
    assert!(!v.sock.exists(), "the socket outlived the process");

    let kernel = write_kernel(&dir, ticker(None));
    let mut v = start_vessel(&dir, &[]);
    let mut c = v.client();
    expect(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({ "kernel_image_path": kernel })),
        204,
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);
    kill(&v, libc::SIGINT);
    assert_eq!(v.wait_exit(LIMIT), Some(143), "{}", v.stderr());
    assert!(!v.sock.exists(), "the socket outlived the process");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The kit's `minimal` Linux guest through the socket: configure, start, pause, resume,
/// metrics, Ctrl-Alt-Del, and power-off from its console. (The minimal kernel has no i8042
/// keyboard driver, so Ctrl-Alt-Del is delivered but does not reboot it; the tiny-guest test
/// above checks the reset path.)
#[test]
fn minimal_linux_session_through_the_socket() {
    if std::env::var("VESSEL_E2E").ok().as_deref() != Some("1") {
        eprintln!("note: set VESSEL_E2E=1 to boot the minimal guest through the API");
        return;
    }
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    let dir = scratch("api-minimal");
    let metrics = dir.join("metrics.json");
    let mut v = start_vessel(&dir, &[]);
    let mut c = v.client();
    configure(
        &mut c,
        json!({
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": vessel_vmm::DEFAULT_CMDLINE
        }),
        json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    expect(
        &mut c,
        "PUT",
        "/metrics",
        Some(json!({ "metrics_path": metrics })),
        204,
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    assert_eq!(state(&mut c), "Running");
    v.wait_console("VESSEL-GUEST-READY", Duration::from_secs(15 * 60), |s| {
        s.lines().any(|l| l.trim_end() == "VESSEL-GUEST-READY")
    });
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    assert_eq!(state(&mut c), "Paused");
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Resumed"})),
        204,
    );
    assert_eq!(state(&mut c), "Running");
    expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
    let line = std::fs::read_to_string(&metrics).unwrap();
    // The last line is ours (a periodic flush may have written one before).
    let m: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert!(m["utc_timestamp_ms"].is_u64(), "{line}");
    // Firecracker's schema only; Vessel's own figures are in its Prometheus metrics.
    assert!(m.get("vessel_vm").is_none(), "{line}");
    assert!(m["vcpu"].is_object() && m["signals"].is_object(), "{line}");
    let prom = call(&mut c, "GET", "/vessel/metrics", None).text();
    assert!(prom.contains("vessel_vessel_vm_pauses 1"), "{prom}");
    expect(&mut c, "PUT", "/actions", action("SendCtrlAltDel"), 204);
    // The guest's shell on the console powers it off.
    let stdin = v.stdin.as_mut().unwrap();
    stdin.write_all(b"echo API-SHELL-OK\n").unwrap();
    v.wait_console("the shell", Duration::from_secs(5 * 60), |s| {
        s.contains("API-SHELL-OK\r\n") || s.contains("API-SHELL-OK\n")
    });
    v.stdin
        .as_mut()
        .unwrap()
        .write_all(b"poweroff -f\n")
        .unwrap();
    assert_eq!(
        v.wait_exit(Duration::from_secs(5 * 60)),
        Some(0),
        "{}",
        v.stderr()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What tools parse from Firecracker's process: `--version`'s first line (Kata Containers:
/// second word, 'v' stripped, a semantic version of at least 0.21.1), `--snapshot-version`.
#[test]
fn version_flags_answer_as_firecracker_s() {
    let out = vessel().arg("--version").output().unwrap();
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    let first = stdout.lines().next().unwrap_or("");
    let version = first
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .trim_start_matches('v');
    assert_eq!(version, vessel_api::FIRECRACKER_API_VERSION, "{stdout}");
    let n: Vec<u32> = version.split('.').map(|x| x.parse().unwrap()).collect();
    assert!(
        n.len() == 3 && (n[0], n[1], n[2]) >= (0, 21, 1),
        "{version}"
    );
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
    let out = vessel().arg("--snapshot-version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        format!("v{}.0.0\n", vessel_snapshot::FORMAT_VERSION)
    );
    let out = vessel()
        .args(["--describe-snapshot", "/etc/hostname"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not a Vessel snapshot"));
}

/// `--metrics-path` opens the metrics sink as `PUT /metrics` would; `--mmds-size-limit` bounds
/// the store; `--module` keeps only the named module's records; `GET /version` reports the
/// API version and Vessel's own; `PUT /cpu-config` checks templates and boots with a good one.
#[test]
fn metrics_path_mmds_limit_and_module_flags() {
    let dir = scratch("api-flags");
    let metrics = dir.join("metrics.json");
    let log = dir.join("vessel.log");
    let mut v = start_vessel(
        &dir,
        &[
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--mmds-size-limit",
            "64",
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
            "--module",
            "vessel_vmm",
        ],
    );
    let mut c = v.client();
    let ver = expect(&mut c, "GET", "/version", None, 200);
    assert_eq!(
        ver,
        json!({"firecracker_version": vessel_api::FIRECRACKER_API_VERSION})
    );
    // Vessel's own version is in its Prometheus metrics.
    let prom = call(&mut c, "GET", "/vessel/metrics", None).text();
    assert!(
        prom.contains(&format!(
            "vessel_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{prom}"
    );
    // The metrics sink is already configured.
    let e = expect(
        &mut c,
        "PUT",
        "/metrics",
        Some(json!({"metrics_path": dir.join("other.json")})),
        400,
    );
    assert!(fault(&e).contains("Reinitialization"), "{e}");
    // As with Firecracker, a metrics file given on the command line is not part of the
    // configuration.
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["metrics"], serde_json::Value::Null, "{cfg}");
    expect(&mut c, "PUT", "/mmds", Some(json!({"a": "b"})), 204);
    let big = json!({"a": "x".repeat(64)});
    expect(&mut c, "PUT", "/mmds", Some(big), 413);
    // A custom CPU template: malformed ones are refused with the reason, a good one boots.
    let leaf1 = |bitmap: &str| {
        json!({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": "ecx", "bitmap": bitmap}]}]})
    };
    let e = expect(&mut c, "PUT", "/cpu-config", Some(leaf1("0b1x")), 400);
    assert!(fault(&e).contains("2 bits, 32 are needed"), "{e}");
    let e = expect(
        &mut c,
        "PUT",
        "/cpu-config",
        Some(leaf1(&format!("0b{}", "y".repeat(32)))),
        400,
    );
    assert!(fault(&e).contains("'y'"), "{e}");
    let absent = json!({"cpuid_modifiers": [{"leaf": "0x4fffffff", "subleaf": "0x0",
        "flags": 0, "modifiers": []}]});
    let e = expect(&mut c, "PUT", "/cpu-config", Some(absent), 400);
    assert!(fault(&e).contains("not among those KVM offers"), "{e}");
    // Leaf 1 ECX bit 31 (hypervisor) set, the rest as Vessel has it.
    let good = leaf1(&format!("0b1{}", "x".repeat(31)));
    expect(&mut c, "PUT", "/cpu-config", Some(good.clone()), 204);
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["cpu-config"], good, "{cfg}");
    let kernel = write_kernel(&dir, ticker(None));
    configure(
        &mut c,
        json!({"kernel_image_path": kernel}),
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);
    expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
    let m = std::fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
    let api = &line["api_server"];
    for gauge in ["process_startup_time_us", "process_startup_time_cpu_us"] {
        assert!(api[gauge].as_u64().is_some_and(|n| n > 0), "{gauge}: {m}");
    }
    expect(&mut c, "PUT", "/actions", action("SendCtrlAltDel"), 204);
    assert_eq!(v.wait_exit(LIMIT), Some(0), "{}", v.stderr());
    // The API's records (module vessel_api) are filtered out of the log.
    let s = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!s.contains("received a Get request"), "{s}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--boot-timer`: the guest writing 123 at 0xc000_0000 logs Firecracker's boot time line
/// at info level; other values and offsets are ignored.
#[test]
fn boot_timer_logs_the_guest_boot_time() {
    let dir = scratch("api-boot-timer");
    let mut g = Guest::new();
    g.a.mov(rdi, 0xc000_0000u64).unwrap();
    g.a.mov(byte_ptr(rdi), 122u32).unwrap();
    g.a.mov(byte_ptr(rdi + 1), 123u32).unwrap();
    g.a.mov(byte_ptr(rdi), 123u32).unwrap();
    g.print("TIMED\n");
    g.power_off();
    let kernel = write_kernel(&dir, g.finish());
    let log = dir.join("vessel.log");
    let mut v = start_vessel(
        &dir,
        &[
            "--boot-timer",
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
        ],
    );
    let mut c = v.client();
    configure(
        &mut c,
        json!({"kernel_image_path": kernel}),
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    assert_eq!(v.wait_exit(LIMIT), Some(0), "{}", v.stderr());
    assert!(v.console().contains("TIMED"), "{}", v.console());
    let s = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| l.contains("Guest-boot-time"))
        .collect();
    assert_eq!(lines.len(), 1, "{s}");
    let words: Vec<&str> = lines[0].split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Guest-boot-time").unwrap();
    // Guest-boot-time = US us MS ms, CPU_US CPU us CPU_MS CPU ms
    assert_eq!(&words[at + 1..at + 2], ["="], "{}", lines[0]);
    let us: u64 = words[at + 2].parse().unwrap();
    let ms: u64 = words[at + 4].parse().unwrap();
    let cpu_us: u64 = words[at + 6].parse().unwrap();
    assert_eq!(ms, us / 1000, "{}", lines[0]);
    assert_eq!(
        (words[at + 3], words[at + 7], words[at + 8]),
        ("us", "CPU", "us")
    );
    assert!(us > 0 && cpu_us > 0, "{}", lines[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// How many of `pid`'s descriptors are the cloud-init seed's memfd.
fn seed_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("/memfd:vessel-cidata"))
        .count()
}

/// `PUT /vessel/cloud-init`: a user-data cloud-init would ignore and unknown fields are 400s
/// at `PUT` time; at `InstanceStart` the seed becomes one more disk (its memfd, opened by the
/// block device); after start it is refused like the other pre-boot resources, it shows in
/// `GET /vm/config`, and a snapshot of the VM is refused.
#[test]
fn cloud_init_seed_through_the_api() {
    let dir = scratch("api-cidata");
    let kernel = write_kernel(&dir, ticker(None));
    let data = disk(&dir, "data.img", 1);
    let mut v = start_vessel(&dir, &[]);
    let mut c = v.client();
    let pid = v.child.id();
    configure(
        &mut c,
        json!({ "kernel_image_path": kernel }),
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    expect(
        &mut c,
        "PUT",
        "/drives/data",
        Some(
            json!({"drive_id": "data", "path_on_host": data, "is_root_device": false, "is_read_only": true}),
        ),
        204,
    );
    let put = |c: &mut Client, body: Value, status: u16| {
        expect(c, "PUT", "/vessel/cloud-init", Some(body), status)
    };
    let e = put(&mut c, json!({"user_data": "hello: world\n"}), 400);
    assert!(
        fault(&e).starts_with(
            "Cloud-init seed error: the user-data starts with \"hello: world\", which cloud-init does not recognise"
        ),
        "{e}"
    );
    let e = put(
        &mut c,
        json!({"user_data": "#cloud-config\n", "vendor_data": "x"}),
        400,
    );
    assert!(fault(&e).contains("unknown field `vendor_data`"), "{e}");
    put(
        &mut c,
        json!({"user_data": "#cloud-config\nusers: []\n"}),
        204,
    );
    // The second replaces the first.
    let seed = json!({
        "user_data": "#cloud-config\npassword: hunter2\n",
        "meta_data": "instance-id: i-1\nlocal-hostname: seeded\n"
    });
    put(&mut c, seed.clone(), 204);
    assert_eq!(seed_fds(pid), 0, "the seed is built at start");

    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);
    // The backend's memfd, and the block device's own descriptor of it.
    assert!(seed_fds(pid) >= 2, "fds: {}", seed_fds(pid));
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["vessel-cloud-init"], seed, "{cfg}");
    assert_eq!(cfg["drives"].as_array().map(Vec::len), Some(1), "{cfg}");

    let e = put(&mut c, seed.clone(), 400);
    assert_eq!(
        fault(&e),
        "The requested operation is not supported after starting the microVM."
    );
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    let e = expect(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": dir.join("s"), "mem_file_path": dir.join("m")})),
        400,
    );
    assert!(fault(&e).contains("cloud-init seed"), "{e}");
    assert!(!dir.join("s").exists());
    expect(&mut c, "PUT", "/vessel/stop", None, 204);
    assert_eq!(v.wait_exit(LIMIT), Some(0), "{}", v.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A FIFO with a reader thread collecting what is written to it.
fn fifo_reader(path: &Path) -> std::sync::Arc<std::sync::Mutex<String>> {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Read and write: the open does not wait for a writer (the reader never sees an end).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    collect_output(f)
}

/// What Kata Containers' Firecracker driver does: logger and metrics on FIFOs, a read-only
/// root drive and 0-byte placeholder drives (the container's disk is put in one later with
/// `PATCH /drives`), vsock with a hybrid-vsock socket, vCPU threads found by the name
/// `fc_vcpu N`, and SIGTERM to stop it.
#[test]
fn a_kata_shaped_configuration_runs() {
    let dir = scratch("api-kata");
    let kernel = write_kernel(&dir, ticker(None));
    let root = disk(&dir, "root.img", 1);
    let placeholder = dir.join("drive_0.img");
    std::fs::write(&placeholder, b"").unwrap();
    let container = disk(&dir, "container.img", 2);
    let (log, metrics) = (dir.join("log.fifo"), dir.join("metrics.fifo"));
    let log_out = fifo_reader(&log);
    let metrics_out = fifo_reader(&metrics);
    let mut v = start_vessel(&dir, &[]);
    let mut c = v.client();
    let put = |c: &mut Client, path: &str, body: Value| expect(c, "PUT", path, Some(body), 204);
    put(
        &mut c,
        "/logger",
        json!({"log_path": log, "level": "Debug", "show_level": true, "show_log_origin": true}),
    );
    put(&mut c, "/metrics", json!({ "metrics_path": metrics }));
    put(
        &mut c,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    put(
        &mut c,
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
    );
    put(
        &mut c,
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": root, "is_root_device": false, "is_read_only": true}),
    );
    put(
        &mut c,
        "/drives/drive_0",
        json!({"drive_id": "drive_0", "path_on_host": placeholder, "is_root_device": false, "is_read_only": false}),
    );
    put(
        &mut c,
        "/vsock",
        json!({"guest_cid": 3, "uds_path": dir.join("kata.hvsock")}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);
    // A metrics line at InstanceStart, in Firecracker's schema.
    let t = Instant::now();
    while !metrics_out.lock().unwrap().contains('\n') {
        assert!(t.elapsed() < LIMIT, "no metrics line at start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = metrics_out
        .lock()
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let line: Value = serde_json::from_str(&first).unwrap();
    assert!(
        line["block"].is_object() && line["signals"].is_object(),
        "{line}"
    );
    // The container's disk goes into the placeholder, in runtime-rs's words (its limiter is
    // null when none is configured).
    expect(
        &mut c,
        "PATCH",
        "/drives/drive_0",
        Some(json!({"drive_id": "drive_0", "path_on_host": container, "rate_limiter": null})),
        204,
    );
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(
        cfg["drives"][1]["path_on_host"],
        container.as_str(),
        "{cfg}"
    );
    // Kata finds the vCPU threads by name. A metrics file: periodic lines have their thread.
    let names = thread_names(v.child.id());
    assert!(names.iter().any(|n| n == "fc_vcpu 0"), "{names:?}");
    assert!(names.iter().any(|n| n == "metrics"), "{names:?}");
    // The log FIFO has Firecracker's lines (read by another thread: give it time).
    let patch_line = r#"The API server received a Patch request on "/drives/drive_0" with body"#;
    let t = Instant::now();
    while !log_out.lock().unwrap().contains(patch_line) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let logged = log_out.lock().unwrap().clone();
    assert!(logged.contains(patch_line), "{logged}");
    // SIGTERM ends it.
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(v.child.id() as i32, libc::SIGTERM) };
    assert!(v.wait_exit(LIMIT).is_some(), "{}", v.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TAP is opened when it is configured, as Firecracker does: a multi-queue TAP (which a
/// single-queue open cannot attach to) and a TAP another interface uses are refused at
/// `PUT /network-interfaces` in Firecracker's words.
#[test]
fn unusable_taps_are_refused_when_configured() {
    let dir = scratch("api-taps");
    let tap = format!("vmq{}", std::process::id() % 100_000);
    if !sh(&format!("ip tuntap add name {tap} mode tap multi_queue")) {
        eprintln!("skipped: cannot create a TAP here (needs CAP_NET_ADMIN)");
        return;
    }
    let v = start_vessel(&dir, &[]);
    let mut c = v.client();
    let e = expect(
        &mut c,
        "PUT",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0", "host_dev_name": tap})),
        400,
    );
    let want = format!(
        "Could not create the network device: Open tap device failed: Error while creating ifreq structure: Invalid argument (os error 22). Invalid TUN/TAP Backend provided by {tap}. Check our documentation on setting up the network devices."
    );
    assert!(fault(&e).contains(&want), "{e}");
    sh(&format!("ip link delete {tap}"));
    // A single-queue TAP is fine once; a second interface on it is refused.
    let single = format!("vsq{}", std::process::id() % 100_000);
    assert!(sh(&format!("ip tuntap add name {single} mode tap")));
    expect(
        &mut c,
        "PUT",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0", "host_dev_name": single})),
        204,
    );
    let e = expect(
        &mut c,
        "PUT",
        "/network-interfaces/eth1",
        Some(json!({"iface_id": "eth1", "host_dev_name": single})),
        400,
    );
    assert!(
        fault(&e).contains("Could not create the network device: Open tap device failed"),
        "{e}"
    );
    sh(&format!("ip link delete {single}"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// virtio-pmem through the socket, as Firecracker's suite uses it: an empty backing file
/// fails `InstanceStart` with Firecracker's words and changes nothing; with real files the VM
/// starts (the regions are mapped into KVM), `PATCH /pmem/{id}` reaches the running device,
/// `GET /vm/config` shows the devices, and the metrics carry the `pmem` groups.
#[test]
fn pmem_devices_start_patch_and_count() {
    let dir = scratch("api-pmem");
    let kernel = write_kernel(&dir, ticker(None));
    let empty = disk(&dir, "empty.img", 0);
    let (data, ro) = (disk(&dir, "data.img", 1), disk(&dir, "ro.img", 3));
    let metrics = dir.join("metrics.json");
    let mut v = start_vessel(&dir, &[]);
    let mut c = v.client();
    configure(
        &mut c,
        json!({ "kernel_image_path": kernel }),
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    let put = |c: &mut Client, id: &str, body: Value| {
        expect(c, "PUT", &format!("/pmem/{id}"), Some(body), 204)
    };
    put(&mut c, "data", json!({"id": "data", "path_on_host": empty}));
    expect(
        &mut c,
        "PUT",
        "/metrics",
        Some(json!({ "metrics_path": metrics })),
        204,
    );
    let e = expect(&mut c, "PUT", "/actions", action("InstanceStart"), 400);
    assert!(
        fault(&e).starts_with("Start microvm error: ")
            && fault(&e).contains("Error backing file size is 0"),
        "{e}"
    );
    assert_eq!(state(&mut c), "Not started");
    put(
        &mut c,
        "data",
        json!({"id": "data", "path_on_host": data,
               "rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}}),
    );
    put(
        &mut c,
        "ro",
        json!({"id": "ro", "path_on_host": ro, "read_only": true}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("ticks", LIMIT, |s| ticks(s) >= 1);
    let patch = |c: &mut Client, id: &str, body: Value, status: u16| {
        expect(c, "PATCH", &format!("/pmem/{id}"), Some(body), status)
    };
    patch(
        &mut c,
        "data",
        json!({"id": "data", "rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}),
        204,
    );
    let e = patch(&mut c, "nope", json!({"id": "nope"}), 400);
    assert!(fault(&e).contains("not found"), "{e}");
    expect(
        &mut c,
        "PUT",
        "/pmem/late",
        Some(json!({"id": "late", "path_on_host": data})),
        400,
    );
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(
        cfg["pmem"],
        json!([
            {"id": "data", "path_on_host": data, "root_device": false, "read_only": false,
             "rate_limiter": {"bandwidth": {"size": 4096, "one_time_burst": null, "refill_time": 100},
                              "ops": {"size": 10, "one_time_burst": null, "refill_time": 1000}}},
            {"id": "ro", "path_on_host": ro, "root_device": false, "read_only": true,
             "rate_limiter": null}
        ]),
        "{cfg}"
    );
    expect(&mut c, "PUT", "/actions", action("FlushMetrics"), 204);
    let lines = wait_lines(&metrics, 1, &v);
    let m: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    for group in ["pmem", "pmem_data", "pmem_ro"] {
        assert_eq!(m[group]["event_fails"], 0, "{group}: {m}");
    }
    // Counts are since the previous line (one is written at InstanceStart): all of them.
    let total = |group: &str, key: &str| -> u64 {
        lines
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|l| l[group][key].as_u64())
            .sum()
    };
    assert_eq!(total("put_api_requests", "pmem_count"), 4, "{lines}");
    assert_eq!(total("put_api_requests", "pmem_fails"), 1, "{lines}");
    assert_eq!(total("patch_api_requests", "pmem_count"), 2, "{lines}");
    assert_eq!(total("patch_api_requests", "pmem_fails"), 1, "{lines}");

    // A snapshot keeps the devices: a new process maps the same files at the same places.
    let (state, mem) = (dir.join("pmem.state"), dir.join("pmem.mem"));
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    expect(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": state, "mem_file_path": mem})),
        204,
    );
    v.kill();
    let load = json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    let w = FcVessel::start(&dir, "restored", &[]);
    let mut c = w.client();
    expect(&mut c, "PUT", "/snapshot/load", Some(load.clone()), 204);
    let restored = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(restored["pmem"], cfg["pmem"], "{restored}");
    w.wait_console("ticks after the restore", LIMIT, |s| ticks(s) >= 1);
    patch(
        &mut c,
        "data",
        json!({"id": "data", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}),
        204,
    );
    drop(w);
    // A backing file that changed size would move what the guest mapped: refused.
    std::fs::File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    let x = FcVessel::start(&dir, "refused", &[]);
    let e = expect(&mut x.client(), "PUT", "/snapshot/load", Some(load), 400);
    assert!(
        fault(&e).contains("did the backing file change size"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
