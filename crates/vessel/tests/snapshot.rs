//! Snapshots and live migration end to end, through Firecracker's API: a tiny guest that
//! counts in memory and in a register is snapshotted (full, then diff), killed, and restored
//! in new processes; the count goes on from where it stopped. It is live-migrated to a
//! `vessel migrate receive` process and goes on counting there; a receiver that breaks off
//! mid-way leaves it running on the source. A restored guest keeps the CPUID saved with it.
//! Damaged and foreign snapshot files are refused with a clear error and the VMM stays up.
//! Clones restored from one snapshot each get a fresh VM generation ID and the vsock CID their
//! restore call names.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fcprocess::*;
use common::tinyguest::{elf, Guest};
use common::*;
use iced_x86::code_asm::*;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(90);
/// Where the guest keeps its memory counter (identity-mapped, above the guest's code).
const COUNTER: u64 = 0x30_0000;

/// CPUID leaf 0x8000_0002 (the first brand-string characters): it means nothing to KVM, so a
/// test can mark it in a state file.
const BRAND_LEAF: u32 = 0x8000_0002;

/// A guest that forever increments a counter in memory and one in r12, printing
/// `TICK <memory> <register> <CPUID 0x8000_0002 EAX>` after each.
fn counter_guest() -> Vec<u8> {
    let mut g = Guest::new();
    let mut tick = g.a.create_label();
    let mut delay = g.a.create_label();
    g.a.xor(r12d, r12d).unwrap();
    g.a.mov(r13, COUNTER).unwrap();
    g.a.mov(qword_ptr(r13), 0).unwrap();
    g.a.set_label(&mut tick).unwrap();
    g.a.inc(qword_ptr(r13)).unwrap();
    g.a.inc(r12).unwrap();
    g.print("TICK ");
    g.a.mov(rax, qword_ptr(r13)).unwrap();
    g.print_rax_hex();
    g.print(" ");
    g.a.mov(rax, r12).unwrap();
    g.print_rax_hex();
    g.print(" ");
    g.a.mov(eax, BRAND_LEAF).unwrap();
    g.a.xor(ecx, ecx).unwrap();
    g.a.cpuid().unwrap();
    g.a.mov(eax, eax).unwrap(); // zero-extended into rax
    g.print_rax_hex();
    g.print("\n");
    g.a.mov(ecx, 300_000u32).unwrap();
    g.a.set_label(&mut delay).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(delay).unwrap();
    g.a.jmp(tick).unwrap();
    g.finish()
}

/// The (memory, register) counts of every tick line.
fn counts(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("TICK "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let m = u64::from_str_radix(w.next()?, 16).ok()?;
            let r = u64::from_str_radix(w.next()?, 16).ok()?;
            Some((m, r))
        })
        .collect()
}

/// The CPUID brand words of every tick line.
fn brands(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("TICK "))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(2)?, 16).ok())
        .collect()
}

fn last_count(v: &FcVessel) -> u64 {
    let c = counts(&v.console());
    let (m, r) = *c.last().expect("no tick yet");
    assert_eq!(m, r, "memory and register counters disagree");
    m
}

/// Pauses and waits for the console to settle; returns the last count printed.
fn pause(v: &FcVessel) -> u64 {
    let mut c = v.client();
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    let mut last = v.console();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = v.console();
        if now == last {
            break;
        }
        last = now;
    }
    last_count(v)
}

fn create(v: &FcVessel, state: &Path, mem: &Path, kind: &str) {
    let mut c = v.client();
    expect(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({
            "snapshot_type": kind,
            "snapshot_path": state,
            "mem_file_path": mem,
        })),
        204,
    );
}

/// A new process restores `state` + `mem` and resumes; returns it.
fn restore(dir: &Path, name: &str, state: &Path, mem: &Path) -> FcVessel {
    let v = FcVessel::start(dir, name, &[]);
    let mut c = v.client();
    expect(
        &mut c,
        "PUT",
        "/snapshot/load",
        Some(json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
        })),
        204,
    );
    assert_eq!(state_of(&v), "Running");
    v
}

fn state_of(v: &FcVessel) -> String {
    state(&mut v.client())
}

#[test]
fn full_and_diff_snapshots_restore_in_new_processes_and_the_count_goes_on() {
    let dir = scratch("snapshot-counter");
    let (full_state, full_mem) = (dir.join("full.state"), dir.join("full.mem"));
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));

    let a = start_counter(&dir, "a", json!({"track_dirty_pages": true}));
    let mut c = a.client();
    // Not paused yet: refused.
    let e = expect(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": full_state, "mem_file_path": full_mem})),
        400,
    );
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("save/restore unavailable while running"),
        "{e}"
    );

    let at_full = pause(&a);
    create(&a, &full_state, &full_mem, "Full");
    assert_eq!(state_of(&a), "Paused");
    // The source goes on after its snapshot.
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Resumed"})),
        204,
    );
    a.wait_console("ticks after the snapshot", LIMIT, |s| {
        counts(s).last().is_some_and(|l| l.0 >= at_full + 3)
    });
    let at_diff = pause(&a);
    create(&a, &diff_state, &diff_mem, "Diff");
    drop(a); // killed

    // The diff file holds only what changed: much less than the 64 MiB of memory.
    use std::os::unix::fs::MetadataExt;
    let diff_blocks = std::fs::metadata(&diff_mem).unwrap().blocks() * 512;
    assert!(diff_blocks < 8 << 20, "diff allocates {diff_blocks} bytes");

    // Restore the full snapshot: the count resumes right after `at_full`.
    let b = restore(&dir, "b", &full_state, &full_mem);
    b.wait_console("ticks after restore", LIMIT, |s| counts(s).len() >= 2);
    let after = counts(&b.console());
    assert_eq!(
        after[0],
        (at_full + 1, at_full + 1),
        "{}",
        tail(&b.console())
    );
    drop(b);

    // Layer the diff on (a copy of) the full memory: restores at `at_diff`.
    let layered = dir.join("layered.mem");
    std::fs::copy(&full_mem, &layered).unwrap();
    let out = run_with_timeout(
        {
            let mut cmd = vessel();
            cmd.args(["snapshot", "rebase", "--base"])
                .arg(&layered)
                .arg("--diff")
                .arg(&diff_mem);
            cmd
        },
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d = restore(&dir, "d", &diff_state, &layered);
    d.wait_console("ticks after the diff restore", LIMIT, |s| {
        counts(s).len() >= 2
    });
    let after = counts(&d.console());
    assert_eq!(
        after[0],
        (at_diff + 1, at_diff + 1),
        "{}",
        tail(&d.console())
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites a state file through `edit` (checksum and header redone).
fn edit_state(from: &Path, to: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        vessel_snapshot::format::decode(&std::fs::read(from).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(to, vessel_snapshot::format::encode(&v).unwrap()).unwrap();
}

/// The restored guest runs on the CPUID saved in the snapshot, not on one computed from the
/// host again: a mark put into the state file's CPUID is what the guest reads after restore.
/// A state file without a CPUID (as earlier Vessels wrote) restores with the host's.
#[test]
fn a_restored_guest_keeps_the_saved_cpuid() {
    const MARK: u32 = 0x7e57_c1d0;
    let dir = scratch("snapshot-cpuid");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let a = start_counter(&dir, "a", json!({}));
    let host = *brands(&a.console()).last().unwrap();
    assert_ne!(host, MARK as u64);
    pause(&a);
    create(&a, &state, &mem, "Full");
    drop(a);

    let marked = dir.join("marked.state");
    edit_state(&state, &marked, |v| {
        let entries = v["vcpus"][0]["cpuid"]
            .as_array_mut()
            .expect("the state holds the vCPU's CPUID");
        // kvm_cpuid_entry2 as bytes: function, index, flags, eax, ...
        let leaf = entries
            .iter_mut()
            .find(|e| e.as_array().unwrap()[..4] == BRAND_LEAF.to_le_bytes().map(|b| json!(b)))
            .expect("the brand-string leaf");
        for (i, b) in MARK.to_le_bytes().iter().enumerate() {
            leaf[12 + i] = json!(b);
        }
    });
    let b = restore(&dir, "b", &marked, &mem);
    b.wait_console("ticks after restore", LIMIT, |s| brands(s).len() >= 2);
    assert!(
        brands(&b.console()).iter().all(|&w| w == MARK as u64),
        "{}",
        tail(&b.console())
    );
    drop(b);

    let old = dir.join("old.state");
    edit_state(&state, &old, |v| {
        for cpu in v["vcpus"].as_array_mut().unwrap() {
            cpu.as_object_mut().unwrap().remove("cpuid");
        }
    });
    let c = restore(&dir, "c", &old, &mem);
    c.wait_console("ticks after restoring an old state", LIMIT, |s| {
        brands(s).len() >= 2
    });
    assert!(
        brands(&c.console()).iter().all(|&w| w == host),
        "{}",
        tail(&c.console())
    );
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A damaged snapshot is answered with Firecracker's 400, and then, as Firecracker, the
/// process exits with status 1 and says why on stderr: a failed restore is not retried. A
/// request the VMM refuses before it tries to restore leaves it up.
#[test]
fn damaged_snapshots_are_refused_then_the_vmm_exits() {
    let dir = scratch("snapshot-bad");
    let junk = dir.join("junk");
    std::fs::write(&junk, b"not a snapshot at all, and longer than a header").unwrap();
    let short = dir.join("short");
    std::fs::write(&short, b"").unwrap();
    let mem = dir.join("mem");
    std::fs::write(&mem, vec![0u8; 4096]).unwrap();
    for (i, (state, what)) in [
        (dir.join("missing"), "No such file"),
        (junk.clone(), "not a Vessel snapshot"),
        // Firecracker's words for a file with no room for its checksum.
        (short.clone(), "IO Error: File too short to contain CRC"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut v = FcVessel::start(&dir, &format!("v{i}"), &[]);
        let mut c = v.client();
        // Refused before any restore is tried: the VMM stays up.
        let e = expect(
            &mut c,
            "PUT",
            "/snapshot/load",
            Some(
                json!({"snapshot_path": state, "mem_file_path": mem, "mem_backend": {"backend_type": "File", "backend_path": mem}}),
            ),
            400,
        );
        assert!(
            e["fault_message"]
                .as_str()
                .unwrap()
                .starts_with("too many fields"),
            "{e}"
        );
        assert_eq!(state_of(&v), "Not started");
        let e = expect(
            &mut c,
            "PUT",
            "/snapshot/load",
            Some(json!({"snapshot_path": state, "mem_file_path": mem})),
            400,
        );
        let m = e["fault_message"].as_str().unwrap();
        assert!(m.starts_with("Load snapshot error"), "{m}");
        assert!(m.contains(what), "{m}");
        assert_eq!(v.wait_exit(Duration::from_secs(10)), Some(1));
        let err = v.stderr();
        assert!(
            err.contains("Failed to build MicroVM: Loading snapshot failed."),
            "{err}"
        );
        assert!(err.contains(what), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the counter guest in a new Firecracker-mode process.
fn start_counter(dir: &Path, name: &str, extra_config: serde_json::Value) -> FcVessel {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(&counter_guest())).unwrap();
    let v = FcVessel::start(dir, name, &[]);
    let mut c = v.client();
    let mut mc = json!({"vcpu_count": 1, "mem_size_mib": 64});
    if let (Some(m), Some(e)) = (mc.as_object_mut(), extra_config.as_object()) {
        m.extend(e.clone());
    }
    configure(
        &mut c,
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
        mc,
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("ticks", LIMIT, |s| counts(s).len() >= 3);
    v
}

/// The VM generation ID (`vessel_memory::addr::VMGENID_START`, 16 bytes) and the guest CID
/// in the configuration space of the first virtio-mmio device (the only one: vsock).
const VMGENID: u64 = 0xf_f000;
const VSOCK_CID: u64 = 0xd000_0000 + 0x100;

/// A guest that forever prints `ID <generation id, two words> <vsock CID>`.
fn identity_guest() -> Vec<u8> {
    let mut g = Guest::new();
    let mut again = g.a.create_label();
    let mut delay = g.a.create_label();
    g.a.set_label(&mut again).unwrap();
    g.print("ID ");
    g.a.mov(r13, VMGENID).unwrap();
    g.a.mov(rax, qword_ptr(r13)).unwrap();
    g.print_rax_hex();
    g.a.mov(rax, qword_ptr(r13 + 8)).unwrap();
    g.print_rax_hex();
    g.print(" ");
    g.a.mov(r13, VSOCK_CID).unwrap();
    g.a.mov(eax, dword_ptr(r13)).unwrap();
    g.print_rax_hex();
    g.print("\n");
    g.a.mov(ecx, 300_000u32).unwrap();
    g.a.set_label(&mut delay).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(delay).unwrap();
    g.a.jmp(again).unwrap();
    g.finish()
}

/// The (generation ID, CID) of every complete `ID` line.
fn identities(console: &str) -> Vec<(String, u64)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("ID "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let id = w.next().filter(|id| id.len() == 32)?;
            let cid = u64::from_str_radix(w.next().filter(|c| c.len() == 16)?, 16).ok()?;
            Some((id.to_string(), cid))
        })
        .collect()
}

/// The last identity printed, once at least three lines are there (the first one after a
/// restore may have been read before the snapshot).
fn identity(v: &FcVessel) -> (String, u64) {
    v.wait_console("identity lines", LIMIT, |s| identities(s).len() >= 3);
    identities(&v.console()).pop().unwrap()
}

#[test]
fn clones_of_one_snapshot_get_fresh_generation_ids_and_their_own_vsock_cids() {
    let dir = scratch("snapshot-clones");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let kernel = dir.join("identity.elf");
    std::fs::write(&kernel, elf(&identity_guest())).unwrap();
    let a = FcVessel::start(&dir, "a", &[]);
    let mut c = a.client();
    configure(
        &mut c,
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    expect(
        &mut c,
        "PUT",
        "/vsock",
        Some(json!({"guest_cid": 3, "uds_path": dir.join("a.vsock")})),
        204,
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    let (original, cid) = identity(&a);
    assert_eq!(cid, 3, "{}", tail(&a.console()));
    assert_ne!(original, "0".repeat(32), "a random ID at first boot");
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    create(&a, &state, &mem, "Full");
    drop(a);
    // A restore does not read the kernel again (a clone in another jail has none).
    std::fs::remove_file(&kernel).unwrap();

    // Two clones of the same files, running side by side.
    let clone = |name: &str, cid: u32| {
        let v = FcVessel::start(&dir, name, &[]);
        let mut c = v.client();
        expect(
            &mut c,
            "PUT",
            "/snapshot/load",
            Some(json!({
                "snapshot_path": state,
                "mem_backend": {"backend_type": "File", "backend_path": mem},
                "vsock_override": {"uds_path": dir.join(format!("{name}.vsock")), "guest_cid": cid},
                "resume_vm": true,
            })),
            204,
        );
        let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
        assert_eq!(cfg["vsock"]["guest_cid"], cid, "{cfg}");
        // The whole recorded configuration, in Firecracker's shape.
        assert_eq!(cfg["machine-config"]["mem_size_mib"], 64, "{cfg}");
        assert_eq!(
            cfg["boot-source"],
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0", "initrd_path": null}),
            "{cfg}"
        );
        assert_eq!(cfg["drives"], json!([]), "{cfg}");
        v
    };
    let b = clone("b", 7);
    let d = clone("d", 8);
    let (b_id, b_cid) = identity(&b);
    let (d_id, d_cid) = identity(&d);
    assert_eq!((b_cid, d_cid), (7, 8), "each clone reads its own CID");
    assert_ne!(b_id, original, "{}", tail(&b.console()));
    assert_ne!(d_id, original, "{}", tail(&d.console()));
    assert_ne!(b_id, d_id, "the clones have different generation IDs");
    drop(b);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn live_migration_moves_a_running_guest_to_another_process() {
    use std::process::Stdio;
    let dir = scratch("migrate");
    let src = start_counter(&dir, "src", json!({}));
    let addr = dir.join("migrate.sock");
    let mut dst = vessel();
    dst.args(["migrate", "receive", "--listen"])
        .arg(format!("unix:{}", addr.display()))
        .args(["--serial", "stdio"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut dst = dst.spawn().unwrap();
    let dst_out = collect_output(dst.stdout.take().unwrap());
    let t = std::time::Instant::now();
    while !addr.exists() {
        assert!(t.elapsed() < LIMIT, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = last_count(&src);
    let mut c = src.client();
    let stats = expect(
        &mut c,
        "PUT",
        "/vessel/migrate",
        Some(json!({"destination": format!("unix:{}", addr.display()), "downtime_ms": 50})),
        200,
    );
    assert!(stats["bytes_sent"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["downtime_us"].as_u64().is_some(), "{stats}");
    // The source hands over and exits with success.
    let mut src = src;
    let t = std::time::Instant::now();
    let code = loop {
        if let Some(s) = src.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(t.elapsed() < LIMIT, "the source did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(code, Some(0), "source stderr: {}", src.stderr());
    let handed_over = last_count(&src);
    assert!(handed_over >= before);
    // The destination counts on from exactly where the source stopped.
    let t = std::time::Instant::now();
    loop {
        let c = counts(&dst_out.lock().unwrap());
        if c.len() >= 2 {
            assert_eq!(c[0], (handed_over + 1, handed_over + 1), "{c:?}");
            break;
        }
        assert!(t.elapsed() < LIMIT, "no ticks on the destination");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = dst.kill();
    let _ = dst.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_receiver_that_breaks_off_leaves_the_source_running() {
    use std::io::Read;
    let dir = scratch("migrate-abort");
    let src = start_counter(&dir, "src", json!({}));
    let addr = dir.join("broken.sock");
    let listener = std::os::unix::net::UnixListener::bind(&addr).unwrap();
    // A receiver that reads a little and dies, as a killed destination would.
    let breaker = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = s.read_exact(&mut buf);
    });
    let mut c = src.client();
    let e = expect(
        &mut c,
        "PUT",
        "/vessel/migrate",
        Some(json!({"destination": format!("unix:{}", addr.display())})),
        400,
    );
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .starts_with("Migration error"),
        "{e}"
    );
    breaker.join().unwrap();
    assert_eq!(state_of(&src), "Running");
    let now = last_count(&src);
    src.wait_console("ticks after the failed migration", LIMIT, |s| {
        counts(s).last().is_some_and(|l| l.0 >= now + 2)
    });
    // Nobody listening at all: refused at once, still running.
    expect(
        &mut c,
        "PUT",
        "/vessel/migrate",
        Some(json!({"destination": format!("unix:{}", dir.join("nobody").display())})),
        400,
    );
    assert_eq!(state_of(&src), "Running");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `VESSEL_E2E=1`: the kit's `minimal` Linux with a virtio-blk disk, switched after boot
/// to another file with new limits (`PATCH /drives`), is snapshotted while idle, killed, and
/// restored in a new process: the restore opens the file the guest was using, its shell
/// answers, reads the disk, writes it, and the write is on that file after power-off (the
/// first file untouched).
#[test]
fn minimal_linux_with_a_disk_survives_snapshot_and_restore() {
    use std::io::Write;
    if std::env::var("VESSEL_E2E").ok().as_deref() != Some("1") {
        eprintln!("note: set VESSEL_E2E=1 to snapshot the minimal guest");
        return;
    }
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    let dir = scratch("snapshot-minimal");
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..21].copy_from_slice(b"VESSEL-SNAPSHOT-DISK\n");
    std::fs::write(&disk, &image).unwrap();
    // The disk the drive is switched to after boot: the restore must open this one.
    let patched = dir.join("patched.img");
    image[..21].copy_from_slice(b"VESSEL-PATCHED-DISK\n\n");
    std::fs::write(&patched, &image).unwrap();
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));

    let a = FcVessel::start(&dir, "a", &[]);
    let mut c = a.client();
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
        "/drives/data",
        Some(json!({
            "drive_id": "data", "path_on_host": disk,
            "is_root_device": false, "is_read_only": false
        })),
        204,
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    a.wait_console("VESSEL-GUEST-READY", Duration::from_secs(15 * 60), |s| {
        s.lines().any(|l| l.trim_end() == "VESSEL-GUEST-READY")
    });
    expect(
        &mut c,
        "PATCH",
        "/drives/data",
        Some(json!({
            "drive_id": "data", "path_on_host": patched,
            "rate_limiter": {"ops": {"size": 1000, "refill_time": 100}}
        })),
        204,
    );
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    create(&a, &state, &mem, "Full");
    drop(a);

    let mut b = restore(&dir, "b", &state, &mem);
    let drive = &expect(&mut b.client(), "GET", "/vm/config", None, 200)["drives"][0];
    assert_eq!(drive["path_on_host"], json!(patched));
    assert_eq!(drive["rate_limiter"]["ops"]["size"], 1000);
    let say = |b: &mut FcVessel, line: &str| {
        b.stdin
            .as_mut()
            .unwrap()
            .write_all(line.as_bytes())
            .unwrap()
    };
    // Markers computed by the shell, so the terminal's echo of the command never matches.
    // Caches dropped: the guest read the first sector of the old file at boot.
    say(
        &mut b,
        "echo 3 > /proc/sys/vm/drop_caches; head -c 20 /dev/vda; echo; echo SHELL-$((1+1))-OK\n",
    );
    b.wait_console(
        "the shell after the restore",
        Duration::from_secs(5 * 60),
        |s| s.contains("SHELL-2-OK"),
    );
    assert!(
        b.console().contains("VESSEL-PATCHED-DISK"),
        "{}",
        tail(&b.console())
    );
    say(
        &mut b,
        "echo restored-write | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null; echo WROTE-$((40+2))\n",
    );
    b.wait_console("the disk write", Duration::from_secs(5 * 60), |s| {
        s.contains("WROTE-42")
    });
    say(&mut b, "poweroff -f\n");
    assert_eq!(
        b.wait_exit(Duration::from_secs(5 * 60)),
        Some(0),
        "{}",
        b.stderr()
    );
    let after = std::fs::read(&patched).unwrap();
    assert_eq!(&after[4096..4096 + 15], b"restored-write\n");
    assert_eq!(&after[..20], b"VESSEL-PATCHED-DISK\n");
    // The file the drive left is untouched.
    let old = std::fs::read(&disk).unwrap();
    assert_eq!(&old[..21], b"VESSEL-SNAPSHOT-DISK\n");
    assert!(old[21..].iter().all(|&b| b == 0));
    let _ = std::fs::remove_dir_all(&dir);
}
