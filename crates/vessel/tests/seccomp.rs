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
    assert!(!text(&out.stdout).contains("Hello"), "{}", text(&out.stdout));
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
    let out = run(&["run", "--seccomp-filter", &file, "--seccomp-selftest", "vcpu"]);
    assert!(killed_by_sigsys(&out), "{:?}", out.status);
    // ...and its VMM filter answers EPERM.
    let out = run(&["run", "--seccomp-filter", &file, "--seccomp-selftest", "vmm"]);
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
    assert!(text(&out.stderr).contains("seccomp"), "{}", text(&out.stderr));
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
    let _ = std::fs::remove_dir_all(&dir);
}
