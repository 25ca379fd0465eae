//! vhost-user devices end to end (CI, `VESSEL_E2E=1`), with the field's own backends:
//! - virtio-fs: the kit's `minimal` guest mounts two host directories with `mount -t
//!   virtiofs`: one served by a `virtiofsd` Vessel starts itself (`--fs tag=...,dir=...`, on
//!   PCI), one by a `virtiofsd` started beforehand (`--fs tag=...,socket=...`, on
//!   virtio-mmio). In each it reads a file the host wrote and writes one the host then reads.
//! - vhost-user-blk: the guest's only disk is exported by QEMU's `qemu-storage-daemon`
//!   (`--disk vhost_user=PATH`); the kit's init mounts it and runs its script, which writes a
//!   file the host then finds in the image.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(15 * 60);

const SCRIPT: &str = r#"
mkdir -p /share /ext
mount -t virtiofs hostshare /share && echo "FS-MOUNT $(grep ' /share ' /proc/mounts)"
echo "FS-HOST-FILE $(cat /share/from-host.txt)"
echo written-by-the-guest > /share/from-guest.txt
mkdir /share/made-by-guest && echo "FS-MKDIR ok"
echo "FS-LIST $(ls /share | tr '\n' ' ')"
mount -t virtiofs external /ext && echo "FS-EXT-MOUNT ok"
echo "FS-EXT-FILE $(cat /ext/external.txt)"
dd if=/dev/zero of=/ext/big.bin bs=1M count=8 2>/dev/null && echo "FS-EXT-BIG $(stat -c %s /ext/big.bin)"
echo guest-was-here > /ext/from-guest.txt
sync
umount /share && umount /ext && echo FS-DONE
"#;

fn virtiofsd() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let found = std::env::var_os("VESSEL_VIRTIOFSD")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/usr/libexec/virtiofsd"),
            home.join(".cache/vessel/tools/virtiofsd/bin/virtiofsd"),
        ])
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!("note: virtiofsd is not installed (scripts/install-deps.sh); test skipped");
    }
    found
}

/// A backend listening on `socket`; killed when dropped.
struct External(Child);

impl External {
    /// A `virtiofsd` sharing `dir`.
    fn virtiofsd(program: &Path, socket: &Path, dir: &Path) -> External {
        let mut cmd = Command::new(program);
        cmd.arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(dir)
            .args(["--sandbox", "none", "--log-level", "error"]);
        External::start(cmd, socket)
    }

    fn start(mut cmd: Command, socket: &Path) -> External {
        let child = cmd.stdin(Stdio::null()).spawn().expect("start the backend");
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the backend's socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        External(child)
    }
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn minimal_guest_mounts_host_directories_over_virtio_fs() {
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    let Some(program) = virtiofsd() else {
        if std::env::var_os("VESSEL_E2E").is_some() {
            panic!("virtiofsd is needed (scripts/install-deps.sh installs it)");
        }
        return;
    };
    let dir = scratch("virtiofs");
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("vessel-run"), SCRIPT).unwrap();
    let disk = ext4_image(&dir, &files, 16);
    let share = dir.join("share");
    let ext = dir.join("ext");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&ext).unwrap();
    std::fs::write(share.join("from-host.txt"), "written-by-the-host\n").unwrap();
    std::fs::write(
        ext.join("external.txt"),
        "served-by-an-external-virtiofsd\n",
    )
    .unwrap();
    let socket = dir.join("ext.sock");
    let _external = External::virtiofsd(&program, &socket, &ext);

    let console = dir.join("console.txt");
    let mut cmd = kit_run(&kernel, &initrd, &console);
    cmd.env("VESSEL_VIRTIOFSD", &program)
        .arg(format!("--disk=path={}", disk.display()))
        .arg(format!("--fs=tag=hostshare,dir={}", share.display()))
        .arg(format!(
            "--fs=tag=external,socket={},transport=mmio",
            socket.display()
        ));
    let t = Instant::now();
    let (console_text, tail) = run_guest(cmd, &console, LIMIT);
    eprintln!(
        "virtio-fs guest finished in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let line = |tag: &str| {
        console_text
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} line\n{tail}"))
            .trim()
            .to_string()
    };
    assert!(line("FS-MOUNT ").starts_with("hostshare /share virtiofs rw"));
    assert_eq!(line("FS-HOST-FILE "), "written-by-the-host");
    assert_eq!(line("FS-MKDIR "), "ok");
    assert_eq!(line("FS-EXT-MOUNT "), "ok");
    assert_eq!(line("FS-EXT-FILE "), "served-by-an-external-virtiofsd");
    assert_eq!(line("FS-EXT-BIG "), (8 << 20).to_string());
    assert!(console_text.contains("FS-DONE"), "{tail}");
    // What the guest wrote is in the host's directories.
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "written-by-the-guest\n"
    );
    assert!(share.join("made-by-guest").is_dir());
    assert_eq!(
        std::fs::read_to_string(ext.join("from-guest.txt")).unwrap(),
        "guest-was-here\n"
    );
    assert_eq!(
        std::fs::metadata(ext.join("big.bin")).unwrap().len(),
        8 << 20
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn minimal_guest_uses_a_disk_qemu_storage_daemon_serves_over_vhost_user() {
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("VESSEL_E2E").is_some() {
            panic!("qemu-storage-daemon is needed (scripts/install-deps.sh installs it)");
        }
        return;
    }
    let dir = scratch("vhost-user-blk");
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(
        files.join("vessel-run"),
        "echo \"VUB-SIZE $(cat /sys/block/vda/size)\"\necho from-the-guest > /mnt/guest.txt\nsync\n",
    )
    .unwrap();
    let disk = ext4_image(&dir, &files, 16);
    let socket = dir.join("blk.sock");
    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            disk.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    let backend = External::start(qsd, &socket);
    let console = dir.join("console.txt");
    let mut cmd = kit_run(&kernel, &initrd, &console);
    cmd.arg(format!("--disk=vhost_user={}", socket.display()));
    let (console_text, tail) = run_guest(cmd, &console, LIMIT);
    // The backend's configuration space reached the guest: 16 MiB in 512-byte sectors.
    assert!(console_text.contains("VUB-SIZE 32768"), "{tail}");
    assert!(console_text.contains("vessel-run exit status 0"), "{tail}");
    drop(backend);
    let got = Command::new("debugfs")
        .args(["-R", "cat /guest.txt"])
        .arg(&disk)
        .output()
        .expect("run debugfs");
    assert_eq!(text(&got.stdout), "from-the-guest\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Through Firecracker's API with the extension `PUT /vessel/fs/{id}`: a VM with a virtio-fs
/// device (a tiny guest that halts; the device is never activated) starts, and a snapshot of
/// it is refused with a clear reason while the VM keeps running.
#[test]
fn a_vm_with_virtio_fs_from_the_api_starts_and_refuses_snapshots() {
    use common::fcprocess::{action, configure, expect, FcVessel};
    use common::tinyguest::{elf, Guest};
    use serde_json::json;
    // Vessel finds virtiofsd where this test does (it inherits the environment).
    if virtiofsd().is_none() {
        if std::env::var_os("VESSEL_E2E").is_some() {
            panic!("virtiofsd is needed (scripts/install-deps.sh installs it)");
        }
        return;
    }
    let dir = scratch("vhost-user-api");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let kernel = dir.join("halt.elf");
    let mut g = Guest::new();
    g.a.cli().unwrap();
    let mut l = g.a.create_label();
    g.a.set_label(&mut l).unwrap();
    g.a.hlt().unwrap();
    g.a.jmp(l).unwrap();
    std::fs::write(&kernel, elf(&g.finish())).unwrap();
    let mut v = FcVessel::start(&dir, "api", &[]);
    let mut c = v.client();
    configure(
        &mut c,
        json!({"kernel_image_path": kernel}),
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    expect(
        &mut c,
        "PUT",
        "/vessel/fs/share",
        Some(json!({"id": "share", "tag": "hostshare", "shared_dir": share})),
        204,
    );
    expect(&mut c, "PUT", "/actions", action("InstanceStart"), 204);
    let config = expect(&mut c, "GET", "/vm/config", None, 200);
    assert_eq!(config["vessel-fs"][0]["tag"], "hostshare", "{config}");
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        204,
    );
    let refused = expect(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(
            json!({"snapshot_type": "Full", "snapshot_path": dir.join("s"), "mem_file_path": dir.join("m")}),
        ),
        400,
    );
    let why = refused["fault_message"].as_str().unwrap_or_default();
    assert!(
        why.contains("vhost-user device (virtio-fs 'hostshare')"),
        "{refused}"
    );
    assert!(!dir.join("m").exists(), "no memory file is written");
    expect(
        &mut c,
        "PATCH",
        "/vm",
        Some(json!({"state": "Resumed"})),
        204,
    );
    v.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
