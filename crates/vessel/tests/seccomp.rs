//! seccomp end to end: a forbidden syscall from a filtered thread kills the whole process
//! (SIGSYS), `--no-seccomp` and `--seccomp-log` let it through, `--seccomp-filter FILE`
//! installs the file's filters, and Firecracker mode filters its API thread.
//!
//! The hidden `--seccomp-selftest KIND` flag makes the first thread of KIND call `execve`
//! on a path that does not exist right after installing its filter (ENOENT when allowed).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::tinyguest::{elf, Guest};
use common::*;
use iced_x86::code_asm::*;

const LIMIT: Duration = Duration::from_secs(60);

fn run(args: &[&str]) -> Output {
    let mut cmd = vessel();
    cmd.args(args);
    run_with_timeout(cmd, LIMIT)
}

fn killed_by_sigsys(out: &Output) -> bool {
    out.status.signal() == Some(libc::SIGSYS)
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_kills_the_process() {
    let out = run(&["run", "--seccomp-selftest", "vcpu"]);
    assert!(
        killed_by_sigsys(&out),
        "{:?} stderr: {}",
        out.status,
        text(&out.stderr)
    );
    // The guest never ran: the filter was on before the first KVM_RUN.
    assert!(
        !text(&out.stdout).contains("Hello"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_forbidden_syscall_on_the_vmm_thread_kills_the_process() {
    let out = run(&["run", "--seccomp-selftest", "vmm"]);
    assert!(killed_by_sigsys(&out), "{:?}", out.status);
}

#[test]
fn without_seccomp_or_in_log_mode_the_same_call_goes_through() {
    for flag in ["--no-seccomp", "--seccomp-log"] {
        let out = run(&["run", flag, "--seccomp-selftest", "vcpu"]);
        assert!(out.status.success(), "{flag}: {:?}", out.status);
        assert_eq!(text(&out.stdout), "Hello from a Vessel VM\r\n", "{flag}");
        assert!(
            text(&out.stderr).contains("the filter let it through"),
            "{flag}: {}",
            text(&out.stderr)
        );
    }
    // Filters on, no violation: the demo guest runs as always.
    let out = run(&["run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn filter_file(dir: &Path, vmm_execve: &str, vcpu_execve: &str) -> String {
    // Everything is allowed but execve, which gets the given action.
    let one = |action: &str| {
        format!(
            r#"{{ "mismatch_action": "allow", "match_action": {action},
                  "filter": [ {{ "syscall": "execve" }} ] }}"#
        )
    };
    let body = format!(
        r#"{{ "vmm": {}, "api": {}, "vcpu": {} }}"#,
        one(vmm_execve),
        one(r#""kill_process""#),
        one(vcpu_execve)
    );
    let path = dir.join("filters.json");
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn a_filter_file_replaces_the_builtin_filters() {
    let dir = scratch("seccomp-file");
    let file = filter_file(&dir, r#"{ "errno": 1 }"#, r#""kill_process""#);
    // The file's vCPU filter kills on execve...
    let out = run(&[
        "run",
        "--seccomp-filter",
        &file,
        "--seccomp-selftest",
        "vcpu",
    ]);
    assert!(killed_by_sigsys(&out), "{:?}", out.status);
    // ...and its VMM filter answers EPERM.
    let out = run(&[
        "run",
        "--seccomp-filter",
        &file,
        "--seccomp-selftest",
        "vmm",
    ]);
    assert!(out.status.success(), "{:?}", out.status);
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    // A file that is not a filter file is one clear error.
    std::fs::write(dir.join("bad.json"), r#"{ "vmm": 3 }"#).unwrap();
    let bad = dir.join("bad.json");
    let out = run(&["run", "--seccomp-filter", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("seccomp"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny guest that prints and powers off.
fn hello_kernel(dir: &Path) -> String {
    let mut g = Guest::new();
    g.print("HELLO\n");
    g.power_off();
    let path = dir.join("guest.elf");
    std::fs::write(&path, elf(&g.finish())).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn firecracker_mode_filters_its_threads() {
    let dir = scratch("seccomp-fc");
    let kernel = hello_kernel(&dir);
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{ "boot-source": {{ "kernel_image_path": "{kernel}", "boot_args": "console=ttyS0" }},
                  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": 32 }} }}"#
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    // Filters on (the default): the VM runs to its power-off.
    let out = run(&["--config-file", &config, "--no-api"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("HELLO"), "{}", text(&out.stdout));
    // The vCPU thread is filtered in Firecracker mode too.
    let out = run(&[
        "--config-file",
        &config,
        "--no-api",
        "--seccomp-selftest",
        "vcpu",
    ]);
    assert!(killed_by_sigsys(&out), "{:?}", out.status);
    // So is the API thread, as soon as it starts.
    let sock = dir.join("api.sock");
    let out = run(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        &config,
        "--seccomp-selftest",
        "api",
    ]);
    assert!(killed_by_sigsys(&out), "{:?}", out.status);
    // Firecracker's --no-seccomp turns them off.
    let out = run(&[
        "--config-file",
        &config,
        "--no-api",
        "--no-seccomp",
        "--seccomp-selftest",
        "vcpu",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A filter file that is neither JSON nor Firecracker's compiled format: Firecracker's
    // error in the log, after its first line, and no VM.
    let bpf = dir.join("bpf.out");
    std::fs::write(&bpf, b"Invalid BPF!").unwrap();
    let log = dir.join("fc.log");
    std::fs::write(&log, b"").unwrap();
    let out = run(&[
        "--config-file",
        &config,
        "--no-api",
        "--log-path",
        log.to_str().unwrap(),
        "--level",
        "Info",
        "--seccomp-filter",
        bpf.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("HELLO"),
        "{}",
        text(&out.stdout)
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let running = logged.find("Running Firecracker").expect(&logged);
    let failed = logged
        .find("Seccomp error: Filter deserialization failed")
        .expect(&logged);
    assert!(running < failed, "{logged}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that prints `TICK` forever.
fn ticker_kernel(dir: &Path) -> String {
    let mut g = Guest::new();
    let mut tick = g.a.create_label();
    let mut delay = g.a.create_label();
    g.a.set_label(&mut tick).unwrap();
    g.print("TICK\n");
    g.a.mov(ecx, 300_000u32).unwrap();
    g.a.set_label(&mut delay).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(delay).unwrap();
    g.a.jmp(tick).unwrap();
    let path = dir.join("ticker.elf");
    std::fs::write(&path, elf(&g.finish())).unwrap();
    path.to_string_lossy().into_owned()
}

/// `(comm, Seccomp mode, Seccomp_filters)` of each thread of `pid`.
fn thread_filters(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let num = |name: &str| field(name).parse::<u32>().unwrap_or(0);
        out.push((field("Name:"), num("Seccomp:"), num("Seccomp_filters:")));
    }
    out
}

/// Every thread of a running VM is filtered, and a vCPU thread carries its own filter only
/// (the kernel runs each filter a thread has on every syscall; a vCPU makes one per exit).
#[test]
fn each_thread_is_filtered_and_a_vcpu_by_its_own_filter_alone() {
    use common::fcprocess::*;
    use serde_json::json;

    let dir = scratch("seccomp-threads");
    let kernel = ticker_kernel(&dir);
    let mut vm = FcVessel::start(&dir, "vm", &[]);
    let mut c = vm.client();
    configure(
        &mut c,
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
        json!({"vcpu_count": 2, "mem_size_mib": 32}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    vm.wait_console("ticks", LIMIT, |s| s.matches("TICK").count() >= 2);
    let threads = thread_filters(vm.child.id());
    let vcpus: Vec<_> = threads
        .iter()
        .filter(|t| t.0.starts_with("fc_vcpu"))
        .collect();
    assert_eq!(vcpus.len(), 2, "{threads:?}");
    for (name, mode, filters) in &threads {
        // Mode 2 is filtered.
        assert_eq!(*mode, 2, "{name} is not filtered: {threads:?}");
        assert!(*filters >= 1, "{threads:?}");
    }
    for (_, _, filters) in vcpus {
        assert_eq!(*filters, 1, "{threads:?}");
    }
    let main = threads
        .iter()
        .find(|t| t.0 == "firecracker" || t.0 == "vessel")
        .unwrap_or_else(|| panic!("{threads:?}"));
    assert_eq!(main.2, 1, "{threads:?}");
    let _ = vm.child.kill();
    let _ = vm.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Live migration over TCP between two filtered processes: snapshots of memory, dirty
/// logging, sockets on the VMM thread; neither process meets its filter.
#[test]
fn live_migration_runs_under_the_filters() {
    use common::fcprocess::*;
    use serde_json::json;
    use std::process::{Command, Stdio};

    let dir = scratch("seccomp-migrate");
    let kernel = ticker_kernel(&dir);
    let mut src = FcVessel::start(&dir, "src", &[]);
    let mut c = src.client();
    configure(
        &mut c,
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    src.wait_console("ticks", LIMIT, |s| s.matches("TICK").count() >= 3);

    // A free port: bind, read it, let go. Someone else may take it before the receiver
    // binds it (the receiver then exits, or the source reaches the wrong listener): start
    // over with another port, a few times.
    let console = dir.join("dst.console");
    let mut attempt = 0;
    let (mut dst, r) = loop {
        attempt += 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("tcp:127.0.0.1:{port}");
        let mut dst = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(["migrate", "receive", "--listen", &addr, "--serial"])
            .arg(format!("file={}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Retry until the receiver listens, or is gone.
        let t = std::time::Instant::now();
        let r = loop {
            let r = call(
                &mut c,
                "PUT",
                "/vessel/migrate",
                Some(json!({"destination": addr, "downtime_ms": 50})),
            );
            if r.status < 300 || t.elapsed() > LIMIT || dst.try_wait().unwrap().is_some() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if r.status < 300 || attempt == 5 {
            break (dst, r);
        }
        let _ = dst.kill();
        let _ = dst.wait();
    };
    assert!(r.status < 300, "{}: {}", r.status, r.text());
    // The source ends cleanly; the receiver goes on ticking.
    let status = src.child.wait().unwrap();
    assert!(status.success(), "source: {status:?}: {}", src.stderr());
    let t = std::time::Instant::now();
    while std::fs::read_to_string(&console)
        .unwrap_or_default()
        .matches("TICK")
        .count()
        < 3
    {
        assert!(t.elapsed() < LIMIT, "the migrated guest does not tick");
        assert!(dst.try_wait().unwrap().is_none(), "the receiver ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dst.try_wait().unwrap().is_none(), "the receiver ended");
    let _ = dst.kill();
    let status = dst.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    src.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
