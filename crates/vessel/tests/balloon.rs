//! The balloon with Linux's own driver (CI, `VESSEL_E2E=1`): the kit's `minimal` guest boots
//! through the Firecracker API with a balloon offering statistics, free page reporting and
//! free page hinting (Firecracker 1.16's `free_page_reporting`, `free_page_hinting`). The
//! driver inflates and deflates the balloon to the sizes asked; it reports free memory, which
//! Vessel drops; and a hinting run started through `/balloon/hinting/start` hints the guest's
//! free memory, which Vessel drops, and ends acknowledged.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fcprocess::*;
use common::*;
use serde_json::{json, Value};
use vessel_api::client::Client;

/// Polls `GET path` until `pred` holds for its body; panics with the console after `limit`.
fn wait_api(
    v: &FcVessel,
    c: &mut Client,
    path: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let body = expect(c, "GET", path, None, 200);
        if pred(&body) {
            return body;
        }
        assert!(
            t.elapsed() < limit,
            "GET {path} still {body} after {limit:?}; console:\n{}\nstderr:\n{}",
            tail(&v.console()),
            v.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Flushes the metrics and sums field `name` of the `balloon` group over every line so far
/// (each line counts what happened since the one before).
fn balloon_metric(c: &mut Client, metrics: &Path, name: &str) -> u64 {
    expect(c, "PUT", "/actions", action("FlushMetrics"), 204);
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| l["balloon"][name].as_u64())
        .sum()
}

#[test]
fn the_guests_balloon_driver_inflates_reports_and_hints() {
    let Some((kernel, initrd)) = e2e_minimal("boot the minimal guest with a balloon") else {
        return;
    };
    let dir = scratch("balloon");
    let metrics = dir.join("metrics.json");
    let mut v = FcVessel::start(&dir, "balloon", &[]);
    let mut c = v.client();
    configure(
        &mut c,
        json!({
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": vessel_vmm::DEFAULT_CMDLINE
        }),
        json!({"vcpu_count": 1, "mem_size_mib": 256}),
    );
    expect(
        &mut c,
        "PUT",
        "/balloon",
        Some(
            json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1,
                    "free_page_reporting": true, "free_page_hinting": true}),
        ),
        204,
    );
    expect(
        &mut c,
        "PUT",
        "/metrics",
        Some(json!({"metrics_path": metrics})),
        204,
    );
    // Hinting is a post-boot operation.
    let r = call(&mut c, "PATCH", "/balloon/hinting/start", None);
    assert_eq!(r.status, 400, "{}", r.text());
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("VESSEL-GUEST-READY", Duration::from_secs(15 * 60), |s| {
        s.lines().any(|l| l.trim_end() == "VESSEL-GUEST-READY")
    });

    // The driver inflates the balloon to the target, and deflates it again.
    expect(
        &mut c,
        "PATCH",
        "/balloon",
        Some(json!({"amount_mib": 8})),
        204,
    );
    let limit = Duration::from_secs(5 * 60);
    let stats = wait_api(&v, &mut c, "/balloon/statistics", limit, |s| {
        s["actual_mib"] == 8
    });
    assert_eq!(stats["target_pages"], 2048);
    assert!(
        stats["total_memory"].as_u64().unwrap_or(0) > 200 << 20,
        "the driver's statistics: {stats}"
    );
    assert!(balloon_metric(&mut c, &metrics, "inflate_count") > 0);
    expect(
        &mut c,
        "PATCH",
        "/balloon",
        Some(json!({"amount_mib": 0})),
        204,
    );
    wait_api(&v, &mut c, "/balloon/statistics", limit, |s| {
        s["actual_mib"] == 0
    });

    // Free page reporting: memory a process touched and freed (and the free memory of the
    // boot) is reported in 2 MiB blocks a couple of seconds after it is freed; Vessel drops it.
    v.stdin
        .as_mut()
        .unwrap()
        .write_all(
            b"dd if=/dev/zero of=/dev/null bs=4M count=1 2>/dev/null && echo TOUCHED-$((40+2))\n",
        )
        .unwrap();
    v.wait_console("the touch", limit, |s| {
        s.lines().any(|l| l.trim() == "TOUCHED-42")
    });
    let t = Instant::now();
    while balloon_metric(&mut c, &metrics, "free_page_report_freed") == 0 {
        assert!(
            t.elapsed() < limit,
            "no free page reported; stderr:\n{}",
            v.stderr()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(balloon_metric(&mut c, &metrics, "free_page_report_count") > 0);

    // Free page hinting: a run (no body: acknowledged when the driver stops) hints the guest's
    // free memory; the driver ends it and gets its memory back.
    let idle = expect(&mut c, "GET", "/balloon/hinting/status", None, 200);
    assert_eq!(idle, json!({"host_cmd": 0, "guest_cmd": null}));
    expect(&mut c, "PATCH", "/balloon/hinting/start", None, 204);
    wait_api(&v, &mut c, "/balloon/hinting/status", limit, |s| {
        *s == json!({"host_cmd": 1, "guest_cmd": 0})
    });
    let hinted = balloon_metric(&mut c, &metrics, "free_page_hint_freed");
    eprintln!(
        "hinted: {hinted} bytes in {} blocks; reported: {} bytes",
        balloon_metric(&mut c, &metrics, "free_page_hint_count"),
        balloon_metric(&mut c, &metrics, "free_page_report_freed")
    );
    assert!(
        hinted > 64 << 20,
        "{hinted} bytes hinted of a 256 MiB guest's free memory"
    );
    // A second run, stopped by the host: its id follows the first one's.
    expect(
        &mut c,
        "PATCH",
        "/balloon/hinting/start",
        Some(json!({"acknowledge_on_stop": false})),
        204,
    );
    wait_api(&v, &mut c, "/balloon/hinting/status", limit, |s| {
        *s == json!({"host_cmd": 3, "guest_cmd": 0})
    });
    expect(&mut c, "PATCH", "/balloon/hinting/stop", None, 204);
    assert_eq!(
        expect(&mut c, "GET", "/balloon/hinting/status", None, 200)["host_cmd"],
        1
    );

    // The guest still works with the memory it took back.
    v.stdin
        .as_mut()
        .unwrap()
        .write_all(b"dd if=/dev/zero of=/dev/null bs=4M count=1 2>/dev/null && echo AFTER-$((40+2))\npoweroff -f\n")
        .unwrap();
    assert_eq!(
        v.wait_exit(Duration::from_secs(5 * 60)),
        Some(0),
        "{}",
        v.stderr()
    );
    assert!(v.console().lines().any(|l| l.trim() == "AFTER-42"));
    let _ = std::fs::remove_dir_all(&dir);
}
