//! Memory hotplug end to end (CI, `VESSEL_E2E=1`): the kit's `minimal` guest boots through
//! the Firecracker API with a virtio-mem device (`PUT /hotplug/memory`); `PATCH
//! /hotplug/memory` raises the requested size, the guest's driver plugs it (the device's
//! plugged size reaches the request) and the guest's `MemTotal` grows by as much. A full
//! snapshot restored in a new process keeps the plugged memory (a diff snapshot is refused);
//! the restored guest allocates from it, then unplugs it all when asked for 0, and its
//! `MemTotal` is back where it started.
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::fcprocess::*;
use common::*;
use serde_json::json;

/// The `MemTotal` (kB) the guest prints after `tag` (`echo "TAG $(grep MemTotal ...)"`).
fn mem_total(v: &mut FcVessel, tag: &str) -> u64 {
    let cmd = format!("echo \"{tag} $(grep MemTotal /proc/meminfo)\"\n");
    v.stdin.as_mut().unwrap().write_all(cmd.as_bytes()).unwrap();
    let prefix = format!("{tag} MemTotal:");
    let find = |s: &str| {
        s.lines().find_map(|l| {
            let rest = l.trim().strip_prefix(&prefix)?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    v.wait_console(&prefix, Duration::from_secs(5 * 60), |s| find(s).is_some());
    find(&v.console()).unwrap()
}

/// The free pages of the zones plugged memory is onlined to (`Normal`, `Movable`), from the
/// guest's `/proc/zoneinfo`, printed after `tag`.
fn plugged_zone_free_pages(v: &mut FcVessel, tag: &str) -> u64 {
    let cmd = format!(
        "awk '/^Node/ {{ z = $4 }} /pages free/ && (z == \"Normal\" || z == \"Movable\") {{ n += $3 }} END {{ print \"{tag}\", n + 0 }}' /proc/zoneinfo\n"
    );
    v.stdin.as_mut().unwrap().write_all(cmd.as_bytes()).unwrap();
    let prefix = format!("{tag} ");
    let find = |s: &str| {
        s.lines()
            .find_map(|l| l.trim().strip_prefix(&prefix)?.trim().parse::<u64>().ok())
    };
    v.wait_console(tag, Duration::from_secs(5 * 60), |s| find(s).is_some());
    find(&v.console()).unwrap()
}

#[test]
fn hotplugged_memory_reaches_the_guest() {
    let Some((kernel, initrd)) = e2e_minimal("boot the minimal guest with hotpluggable memory")
    else {
        return;
    };
    let dir = scratch("memory-hotplug");
    let mut v = FcVessel::start(&dir, "memhp", &[]);
    let mut c = v.client();
    configure(
        &mut c,
        json!({
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            // Plugged blocks go to ZONE_MOVABLE, so that the guest can unplug them again.
            "boot_args": format!("{} memhp_default_state=online_movable", vessel_vmm::DEFAULT_CMDLINE)
        }),
        json!({"vcpu_count": 1, "mem_size_mib": 256, "track_dirty_pages": true}),
    );
    expect(
        &mut c,
        "PUT",
        "/hotplug/memory",
        Some(json!({"total_size_mib": 512})),
        204,
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("VESSEL-GUEST-READY", Duration::from_secs(15 * 60), |s| {
        s.lines().any(|l| l.trim_end() == "VESSEL-GUEST-READY")
    });
    let before = mem_total(&mut v, "MT-BEFORE");
    assert_eq!(
        expect(&mut c, "GET", "/hotplug/memory", None, 200),
        json!({"total_size_mib": 512, "block_size_mib": 2, "slot_size_mib": 128,
               "plugged_size_mib": 0, "requested_size_mib": 0})
    );
    // A size that is not a whole number of blocks is refused, in Firecracker's words.
    let r = call(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(json!({"requested_size_mib": 3})),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("Size 3145728 is invalid"), "{}", r.text());
    expect(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(json!({"requested_size_mib": 256})),
        204,
    );
    // The driver plugs asynchronously: wait until it has all of it.
    let t = Instant::now();
    loop {
        let s = expect(&mut c, "GET", "/hotplug/memory", None, 200);
        assert_eq!(s["requested_size_mib"], 256);
        if s["plugged_size_mib"] == 256 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5 * 60),
            "the guest plugged {} MiB of 256; console:\n{}\nstderr:\n{}",
            s["plugged_size_mib"],
            tail(&v.console()),
            v.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The kernel onlines the new memory blocks on its own: MemTotal grows by 256 MiB.
    let t = Instant::now();
    let mut n = 0;
    let after = loop {
        n += 1;
        let after = mem_total(&mut v, &format!("MT-AFTER{n}"));
        if after >= before + 250 * 1024 || t.elapsed() > Duration::from_secs(60) {
            break after;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        after >= before + 250 * 1024,
        "MemTotal {before} kB before, {after} kB after plugging 256 MiB"
    );
    // A full snapshot carries the plugged memory; a diff snapshot is refused, saying why.
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    let (state_file, mem_file) = (dir.join("state"), dir.join("mem"));
    let r = call(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({
            "snapshot_type": "Diff",
            "snapshot_path": dir.join("diff-state"),
            "mem_file_path": dir.join("diff-mem")
        })),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("hotpluggable memory"), "{}", r.text());
    expect(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": state_file, "mem_file_path": mem_file})),
        204,
    );
    v.kill();
    // Restored in a new process: the device has its blocks, the guest its memory.
    let mut v = FcVessel::start(&dir, "memhp-restored", &[]);
    let mut c = v.client();
    expect(
        &mut c,
        "PUT",
        "/snapshot/load",
        Some(json!({
            "snapshot_path": state_file,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file},
            "resume_vm": true
        })),
        204,
    );
    let s = expect(&mut c, "GET", "/hotplug/memory", None, 200);
    assert_eq!(
        (&s["plugged_size_mib"], &s["requested_size_mib"]),
        (&json!(256), &json!(256))
    );
    assert_eq!(
        expect(&mut c, "GET", "/vm/config", None, 200)["memory-hotplug"]["total_size_mib"],
        512
    );
    let restored = mem_total(&mut v, "MT-RESTORED");
    assert_eq!(restored, after, "MemTotal after the restore");
    // The restored guest uses its plugged memory. Plugged blocks are onlined above the boot
    // RAM's DMA32 zone, and page-cache and tmpfs pages come from the highest zone first: a
    // 16 MiB tmpfs file takes its pages from there. (Every page the guest's kernel clears or
    // copies is emulated on nested hosts, about 3 s per MiB: a small file keeps this short.)
    let free_before = plugged_zone_free_pages(&mut v, "ZF-BEFORE");
    v.stdin
        .as_mut()
        .unwrap()
        .write_all(
            b"dd if=/dev/zero of=/tmp/fill bs=1M count=16 2>/dev/null && echo FILL-$(du -k /tmp/fill | cut -f1)-OK\n",
        )
        .unwrap();
    v.wait_console("the fill", Duration::from_secs(5 * 60), |s| {
        s.lines().any(|l| l.trim() == "FILL-16384-OK")
    });
    let free_after = plugged_zone_free_pages(&mut v, "ZF-AFTER");
    eprintln!("free pages in the plugged memory's zones: {free_before} before the fill, {free_after} after");
    assert!(
        free_before >= free_after + 3500,
        "free pages in the plugged memory's zones: {free_before} before a 16 MiB file (4096 pages), {free_after} after"
    );
    // Unplug: the file goes, the host asks for nothing; the driver offlines its (movable)
    // blocks and unplugs them, and MemTotal is back where it started.
    v.stdin
        .as_mut()
        .unwrap()
        .write_all(b"rm /tmp/fill\n")
        .unwrap();
    expect(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(json!({"requested_size_mib": 0})),
        204,
    );
    let t = Instant::now();
    loop {
        let s = expect(&mut c, "GET", "/hotplug/memory", None, 200);
        if s["plugged_size_mib"] == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5 * 60),
            "the guest still has {} MiB plugged; console:\n{}\nstderr:\n{}",
            s["plugged_size_mib"],
            tail(&v.console()),
            v.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let unplugged = mem_total(&mut v, "MT-UNPLUGGED");
    assert_eq!(unplugged, before, "MemTotal after unplugging everything");
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
