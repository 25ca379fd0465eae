//! The command line end to end: the demo guest, and bad input answered with one clear line.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn demo_guest_prints_hello_and_exits_zero() {
    let mut cmd = vessel();
    cmd.arg("run");
    let out = run_with_timeout(cmd, LIMIT);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello from a Vessel VM\r\n");
}

/// Run `vessel` with `args`; it must fail with exactly one line on stderr containing `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let mut cmd = vessel();
    cmd.args(args);
    let out = run_with_timeout(cmd, LIMIT);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err:?}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: more than one line: {err}"
    );
}

#[test]
fn missing_kernel_is_one_line() {
    fails_with(
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let d = scratch("notkernel");
    let p = d.join("notakernel");
    std::fs::write(&p, vec![0x5au8; 64 * 1024]).unwrap();
    fails_with(
        &["run", "--kernel", p.to_str().unwrap()],
        "not a Linux kernel",
    );
    let e = d.join("empty");
    std::fs::write(&e, b"").unwrap();
    fails_with(&["run", "--kernel", e.to_str().unwrap()], "empty");
}

#[test]
fn truncated_bzimage_is_refused() {
    // A setup header that promises more protected-mode code than the file holds.
    let d = scratch("truncated");
    let mut img = vec![0u8; 0x1000];
    img[0x1f1] = 4; // setup_sects
    img[0x1fe] = 0x55;
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x1f4..0x1f8].copy_from_slice(&0x10000u32.to_le_bytes()); // syssize: 1 MiB
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x236..0x238].copy_from_slice(&3u16.to_le_bytes()); // xloadflags: 64-bit
    let p = d.join("bzImage");
    std::fs::write(&p, &img).unwrap();
    let mut cmd = vessel();
    cmd.args(["run", "--kernel", p.to_str().unwrap()]);
    let out = run_with_timeout(cmd, LIMIT);
    assert!(!out.status.success());
    assert_ne!(
        out.status.code(),
        Some(101),
        "panicked: {}",
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stderr).trim_end().lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn impossible_cpu_counts_are_refused() {
    fails_with(&["run", "--cpus", "0"], "at least 1");
    fails_with(&["run", "--cpus", "1000"], "at most");
}

#[test]
fn bad_memory_sizes_are_refused() {
    fails_with(&["run", "--memory", "lots"], "not a size");
    fails_with(&["run", "--memory", "1M"], "too small");
    fails_with(&["run", "--memory", "64T"], "MiB");
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let d = scratch("bigrd");
    let k = d.join("vmlinux");
    std::fs::write(&k, common::tinyguest::elf(&[0xf4])).unwrap();
    let rd = d.join("initrd");
    let f = std::fs::File::create(&rd).unwrap();
    f.set_len(64 << 20).unwrap();
    fails_with(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            rd.to_str().unwrap(),
            "--memory",
            "32M",
            "--nested",
            "off",
        ],
        "initrd",
    );
}

#[test]
fn bad_serial_target_is_refused() {
    fails_with(&["run", "--serial", "tty9"], "serial target");
}

/// Any Firecracker flag on its own selects Firecracker mode (which then reports what is wrong
/// with it); a bare `vessel` prints help.
#[test]
fn any_firecracker_flag_selects_firecracker_mode() {
    fails_with(
        &["--metadata", "/nonexistent/md.json"],
        "Unable to open or read from the mmds content file",
    );
    fails_with(&["--log-path", "/nonexistent/dir/log"], "log file");
    let out = run_with_timeout(vessel(), LIMIT);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("Usage: vessel"),
        "{}",
        text(&out.stdout)
    );
}

/// `--cloud-init` refuses what cloud-init would ignore, before any VM is made: a user-data
/// file that is not cloud-config or a script, a missing file, an unknown option.
#[test]
fn cloud_init_seeds_that_cloud_init_would_ignore_are_refused() {
    let dir = std::env::temp_dir().join(format!("vessel-cli-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ud = dir.join("user-data");
    std::fs::write(&ud, "hello: world\n").unwrap();
    let arg = format!("--cloud-init=user-data={}", ud.display());
    fails_with(&["run", &arg], "#cloud-config");
    fails_with(
        &["run", "--cloud-init=user-data=/nonexistent/ud"],
        "/nonexistent/ud",
    );
    fails_with(
        &["run", "--cloud-init=vendor=/x"],
        "unknown cloud-init option",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_pmem_devices_are_one_line() {
    let d = scratch("pmem-cli");
    let empty = d.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let e = format!("--pmem=path={}", empty.display());
    fails_with(&["run", &e], "Error backing file size is 0");
    fails_with(
        &["run", "--pmem=path=/nonexistent/pmem.img"],
        "Error accessing backing file /nonexistent/pmem.img: No such file",
    );
    fails_with(
        &["run", "--pmem=path=/a,root=on", "--pmem=path=/b,root=on"],
        "--pmem: only one device may be the root device",
    );
    fails_with(
        &["run", "--pmem=path=/a,dax=on"],
        "--pmem: unknown option 'dax'",
    );
}
