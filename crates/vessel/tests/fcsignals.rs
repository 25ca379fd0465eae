//! Firecracker's SIGXFSZ handling (its suite's `test_negative_file_size_limit`): a VMM in
//! Firecracker mode that writes past its file size limit logs `Shutting down VM after
//! intercepting signal 25, code 0.` to its log and exits with Firecracker's status, 151,
//! instead of dying of the signal. Boots a tiny guest (needs /dev/kvm).

mod common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use common::fcprocess::*;
use common::tinyguest::{elf, Guest};
use common::*;
use serde_json::json;

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
    let mut g = Guest::new();
    g.print("UP\n");
    let mut l = g.a.create_label();
    g.a.set_label(&mut l).unwrap();
    g.a.hlt().unwrap();
    g.a.jmp(l).unwrap();
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(&g.finish())).unwrap();

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
