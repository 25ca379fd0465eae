//! Device hotplug with the guest told: through Firecracker's API (`--enable-pci`), a disk
//! and a NIC are plugged into the kit's `minimal` guest after `InstanceStart`, show up
//! without a PCI rescan (ACPI PCI hotplug), are used and unplugged (the guest ejects them);
//! then the same across a snapshot and restore. Needs `VESSEL_E2E=1`; the NIC part needs a
//! TAP (root).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fcprocess::*;
use common::*;
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(15 * 60);
const STEP: Duration = Duration::from_secs(5 * 60);

/// A 1 MiB raw disk starting with `tag`.
fn tagged_disk(dir: &Path, name: &str, tag: &str) -> PathBuf {
    let path = dir.join(name);
    let mut data = tag.as_bytes().to_vec();
    data.resize(1 << 20, 0);
    std::fs::write(&path, data).unwrap();
    path
}

fn shell(v: &mut FcVessel, line: &str) {
    let stdin = v.stdin.as_mut().unwrap();
    stdin.write_all(line.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
}

/// Runs `line` on the guest's shell and waits for the console line `marker`.
fn guest(v: &mut FcVessel, line: &str, marker: &str) {
    let before = v.console().matches(marker).count();
    shell(v, line);
    v.wait_console(marker, STEP, |s| {
        s.lines().filter(|l| l.trim_end() == marker).count() > before
    });
}

fn fault(v: &Value) -> String {
    v["fault_message"].as_str().unwrap_or_default().to_string()
}

/// The guest waits for `dev` to appear, reads its tag and prints it (`SEEN <tag>`).
fn read_tag(dev: &str, len: usize) -> String {
    format!(
        "while [ ! -b {dev} ]; do sleep 1; done; echo SEEN $(head -c {len} {dev}) | tr -d '\\0'"
    )
}

/// A NIC on `tap` is plugged in, found by its MAC and brought up by the guest, then unplugged.
fn nic_in_and_out(c: &mut vessel_api::client::Client, v: &mut FcVessel, tap: &str) {
    let nic = json!({"iface_id": "net1", "host_dev_name": tap,
                     "guest_mac": "06:00:ac:10:00:02"});
    expect(c, "PUT", "/network-interfaces/net1", Some(nic), 204);
    guest(
        v,
        "while ! grep -qs 06:00:ac:10:00:02 /sys/class/net/*/address; do sleep 1; done; \
         for n in /sys/class/net/*; do grep -qs 06:00:ac:10:00:02 $n/address && ip link set ${n##*/} up && echo NIC-UP; done",
        "NIC-UP",
    );
    expect(c, "DELETE", "/network-interfaces/net1", None, 204);
    guest(
        v,
        "grep -qs 06:00:ac:10:00:02 /sys/class/net/*/address || echo NIC-GONE",
        "NIC-GONE",
    );
}

#[test]
fn disks_and_nics_plug_in_and_out_of_a_running_guest_and_survive_a_snapshot() {
    if std::env::var("VESSEL_E2E").ok().as_deref() != Some("1") {
        eprintln!("note: set VESSEL_E2E=1 to hot-plug devices into the minimal guest");
        return;
    }
    hotplug_scenario("minimal", BOOT);
}

/// The same with Debian's stock kernel (its `acpiphp` is built in), in the extended tests.
#[test]
fn debian_kernel_takes_hot_plugged_devices_too() {
    if std::env::var("VESSEL_E2E_DEBIAN").ok().as_deref() != Some("1") {
        eprintln!("note: set VESSEL_E2E_DEBIAN=1 (scripts/test.sh --extended) for Debian's kernel");
        return;
    }
    hotplug_scenario("debian", Duration::from_secs(60 * 60));
}

fn hotplug_scenario(image: &str, boot: Duration) {
    let Some((kernel, initrd)) = kit_image(image) else {
        return;
    };
    let dir = scratch(&format!("hotplug-{image}"));
    let one = tagged_disk(&dir, "one.img", "VESSEL-HOTPLUG-ONE");
    let two = tagged_disk(&dir, "two.img", "VESSEL-HOTPLUG-TWO");
    let mut v = FcVessel::start(&dir, "api", &["--id", "hotplug", "--enable-pci"]);
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
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    v.wait_console("VESSEL-GUEST-READY", boot, |s| {
        s.lines().any(|l| l.trim_end() == "VESSEL-GUEST-READY")
    });
    guest(&mut v, "echo SHELL-UP", "SHELL-UP");

    // A disk: it appears by itself and is read.
    let drive = |id: &str, path: &Path| {
        json!({"drive_id": id, "path_on_host": path, "is_root_device": false,
               "is_read_only": true})
    };
    expect(&mut c, "PUT", "/drives/one", Some(drive("one", &one)), 204);
    guest(&mut v, &read_tag("/dev/vda", 18), "SEEN VESSEL-HOTPLUG-ONE");
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["drives"][0]["drive_id"], "one", "{cfg}");
    // Bad input: an id in use, a root drive.
    let e = expect(&mut c, "PUT", "/drives/one", Some(drive("one", &two)), 400);
    assert_eq!(fault(&e), "Device ID in use");
    let mut root = drive("root", &two);
    root["is_root_device"] = json!(true);
    expect(&mut c, "PUT", "/drives/root", Some(root), 400);

    // A NIC on a TAP, when this host lets us make one.
    let tap = format!("vhp{}", std::process::id() % 100_000);
    let have_tap = sh(&format!("ip tuntap add name {tap} mode tap"));
    if have_tap {
        nic_in_and_out(&mut c, &mut v, &tap);
    } else {
        eprintln!("note: no TAP here (not root?); the NIC part is skipped");
    }

    // Unplug: the guest releases the disk, then it is gone from the guest and the config.
    expect(&mut c, "DELETE", "/drives/one", None, 204);
    guest(&mut v, "[ -b /dev/vda ] || echo DISK-GONE", "DISK-GONE");
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert!(
        cfg["drives"].as_array().is_none_or(|d| d.is_empty()),
        "{cfg}"
    );
    let e = expect(&mut c, "DELETE", "/drives/one", None, 400);
    assert_eq!(fault(&e), "Device not found");

    // pmem: a region and a device come and go; the next one goes after the gap. (The kit's
    // debian image does not load Debian's virtio_pmem/nd_pmem modules, and its busybox init
    // loads none on demand: `minimal` only.)
    let with_pmem = image == "minimal";
    if with_pmem {
        let pmem = |id: &str, path: &Path| json!({"id": id, "path_on_host": path, "root_device": false, "read_only": false});
        let pm1 = tagged_disk(&dir, "pm1.img", "VESSEL-HOTPLUG-PM1");
        let pm2 = tagged_disk(&dir, "pm2.img", "VESSEL-HOTPLUG-PM2");
        expect(&mut c, "PUT", "/pmem/pm1", Some(pmem("pm1", &pm1)), 204);
        guest(
            &mut v,
            &read_tag("/dev/pmem0", 18),
            "SEEN VESSEL-HOTPLUG-PM1",
        );
        expect(&mut c, "DELETE", "/pmem/pm1", None, 204);
        guest(&mut v, "[ -b /dev/pmem0 ] || echo PMEM-GONE", "PMEM-GONE");
        expect(&mut c, "PUT", "/pmem/pm2", Some(pmem("pm2", &pm2)), 204);
        guest(
            &mut v,
            &read_tag("/dev/pmem0", 18),
            "SEEN VESSEL-HOTPLUG-PM2",
        );
    }

    // A hot-plugged disk survives a snapshot: the restored guest still reads it, in the
    // same slot, and can unplug it there.
    expect(&mut c, "PUT", "/drives/two", Some(drive("two", &two)), 204);
    guest(&mut v, &read_tag("/dev/vda", 18), "SEEN VESSEL-HOTPLUG-TWO");
    let (state, mem) = (dir.join("hp.state"), dir.join("hp.mem"));
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    // A paused guest cannot answer an eject request.
    let e = expect(&mut c, "DELETE", "/drives/two", None, 400);
    assert!(fault(&e).contains("paused"), "{e}");
    expect(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": state, "mem_file_path": mem})),
        204,
    );
    v.kill();
    let mut w = FcVessel::start(&dir, "restored", &["--enable-pci"]);
    let mut c = w.client();
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
    let cfg = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(cfg["drives"][0]["drive_id"], "two", "{cfg}");
    if with_pmem {
        assert_eq!(cfg["pmem"][0]["id"], "pm2", "{cfg}");
        guest(
            &mut w,
            "echo 3 > /proc/sys/vm/drop_caches; echo PMEM-AGAIN $(head -c 18 /dev/pmem0)",
            "PMEM-AGAIN VESSEL-HOTPLUG-PM2",
        );
    }
    guest(
        &mut w,
        "echo 3 > /proc/sys/vm/drop_caches; echo AGAIN $(head -c 18 /dev/vda)",
        "AGAIN VESSEL-HOTPLUG-TWO",
    );
    expect(&mut c, "DELETE", "/drives/two", None, 204);
    guest(
        &mut w,
        "[ -b /dev/vda ] || echo GONE-AFTER-RESTORE",
        "GONE-AFTER-RESTORE",
    );
    // And a new one goes in after the restore, and a NIC comes and goes there too.
    expect(&mut c, "PUT", "/drives/one", Some(drive("one", &one)), 204);
    guest(&mut w, &read_tag("/dev/vda", 18), "SEEN VESSEL-HOTPLUG-ONE");
    if have_tap {
        nic_in_and_out(&mut c, &mut w, &tap);
    }
    if std::env::var_os("VESSEL_HOTPLUG_DEBUG").is_some() {
        eprintln!(
            "first console:\n{}\nrestored console:\n{}\nstderr:\n{}",
            v.console(),
            w.console(),
            w.stderr()
        );
    }
    shell(&mut w, "poweroff -f");
    assert_eq!(w.wait_exit(STEP), Some(0), "{}", w.stderr());
    if have_tap {
        sh(&format!("ip link delete {tap}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
