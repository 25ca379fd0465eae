//! The jail end to end: `vessel jail --new-pid-ns` starts a tiny guest in a jail and exits
//! (Firecracker's process model: no jailer stays beside the VMM), and the test checks from the
//! host that the VMM (the pid in the pid file) runs in its own mount, PID, IPC and UTS
//! namespaces, in a cgroup with the limits set, as the unprivileged uid/gid with no
//! capabilities, with the jail directory (0700, the uid's) as its root and only the jail's
//! device nodes, that the guest ran, and that SIGTERM stops it.
//!
//! Needs root and /dev/kvm (skipped with a note otherwise).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::tinyguest::{elf, Guest};
use common::*;

const UID: u32 = 40123;
const GID: u32 = 40124;
const MARK: &str = "JAILED-GUEST-OK";

fn can_jail() -> bool {
    // SAFETY: geteuid takes no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: the jail test needs root and /dev/kvm");
        return false;
    }
    true
}

/// Prints the mark, then halts with interrupts off: the VM stays up, idle, until killed.
fn idle_guest() -> Vec<u8> {
    let mut g = Guest::new();
    g.print(MARK);
    g.print("\n");
    let mut l = g.a.create_label();
    g.a.set_label(&mut l).unwrap();
    g.a.hlt().unwrap();
    g.a.jmp(l).unwrap();
    elf(&g.finish())
}

/// Kills the VMM if the test fails.
struct Reap(u32);
impl Drop for Reap {
    fn drop(&mut self) {
        // SAFETY: kill with a pid and a signal number.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| !s.contains("State:\tZ"))
}

fn wait_for<T>(what: &str, vmm: u32, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(alive(vmm), "the VMM exited before {what}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The file `file` of controller `controller`'s cgroup of `pid`, found from /proc/PID/cgroup
/// and the host's cgroup mounts (v1: the hierarchy with that controller; v2: the unified one).
fn cgroup_file(pid: u32, controller: &str, file: &str) -> (PathBuf, String) {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let v1 = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    });
    let (path, mount) = match v1 {
        Some(path) => {
            let mount = mounts
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
                .map(|f| f[1].to_string())
                .expect("a v1 mount for the controller");
            (path, mount)
        }
        None => {
            let path = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("a v2 cgroup line")
                .to_string();
            let mount = mounts
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f[2] == "cgroup2")
                .map(|f| f[1].to_string())
                .expect("a cgroup2 mount");
            (path, mount)
        }
    };
    let dir = Path::new(&mount).join(path.trim_start_matches('/'));
    let value = std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.join(file).display()));
    (dir, value.trim().to_string())
}

fn uses_v1(pid: u32, controller: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .any(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|x| x == controller))
        })
}

#[test]
fn vm_runs_in_the_jail_with_its_namespaces_cgroup_and_uid() {
    if !can_jail() {
        return;
    }
    let dir = scratch("jail");
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, idle_guest()).unwrap();
    let base = dir.join("jails");
    let id = format!("jail-test-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let err = dir.join("stderr");
    let status = vessel()
        .args(["jail", "--id", &id, "--new-pid-ns"])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(&base)
        .args(["--memory", "512M", "--cpus", "0.5", "--pids", "32"])
        .args(["--resource-limit", "no-file=512"])
        .arg("--bind")
        .arg(format!("{}:/guest.elf", kernel.display()))
        .args([
            "--",
            "run",
            "--kernel",
            "/guest.elf",
            "--serial=file=/console.txt",
        ])
        // The VMM inherits them: files, not pipes that would stay open after the jailer.
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    // The jailer exits once the VMM has exec'd, leaving its pid in the pid file.
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let chroot = base.join("vessel").join(&id).join("root");
    let pid: u32 = std::fs::read_to_string(chroot.join("vessel.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _reap = Reap(pid);
    assert_eq!(status_field(pid, "Name"), "vessel");
    let console = chroot.join("console.txt");
    wait_for("the guest's output", pid, || {
        std::fs::read_to_string(&console)
            .ok()
            .filter(|t| t.contains(MARK))
    });

    // Namespaces: new mount, PID, IPC and UTS; the network one is the host's (no --netns).
    let ns = |p: &str, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).unwrap();
    for n in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(ns(&pid.to_string(), n), ns("self", n), "{n} namespace");
    }
    assert_eq!(ns(&pid.to_string(), "net"), ns("self", "net"));
    // PID 1 of its namespace.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));

    // Unprivileged: every uid and gid dropped, no capabilities, no way back.
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(status_field(pid, "Groups"), GID.to_string());
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // The cgroup limits, read from the cgroup the kernel says the VMM is in.
    let suffix = format!("vessel/{id}");
    let (mem_dir, mem) = if uses_v1(pid, "memory") {
        cgroup_file(pid, "memory", "memory.limit_in_bytes")
    } else {
        cgroup_file(pid, "memory", "memory.max")
    };
    assert!(mem_dir.ends_with(&suffix), "{}", mem_dir.display());
    assert_eq!(mem, (512u64 << 20).to_string());
    let (_, pids) = cgroup_file(pid, "pids", "pids.max");
    assert_eq!(pids, "32");
    if uses_v1(pid, "cpu") {
        assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_quota_us").1, "50000");
        assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_period_us").1, "100000");
    } else {
        assert_eq!(cgroup_file(pid, "cpu", "cpu.max").1, "50000 100000");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile.split_whitespace().collect::<Vec<_>>()[3..5],
        ["512", "512"]
    );

    // Its root is the jail: the same directory, and nothing of the host's tree in it.
    let root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let jail = std::fs::metadata(&chroot).unwrap();
    assert_eq!((root.dev(), root.ino()), (jail.dev(), jail.ino()));
    assert_eq!(
        (jail.uid(), jail.gid(), jail.mode() & 0o7777),
        (UID, GID, 0o700)
    );
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    for host_only in ["etc", "proc", "sys", "home", "usr/bin", "old_root"] {
        assert!(
            !proc_root.join(host_only).exists(),
            "{host_only} in the jail"
        );
    }
    // Device nodes: /dev/kvm (owned by the VMM's user) and the other allowed ones only.
    let mut devs: Vec<String> = std::fs::read_dir(proc_root.join("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    assert!(
        devs.iter()
            .all(|d| ["kvm", "net", "userfaultfd"].contains(&d.as_str())),
        "{devs:?}"
    );
    let kvm = std::fs::metadata(proc_root.join("dev/kvm")).unwrap();
    assert_eq!((kvm.uid(), kvm.mode() & 0o777), (UID, 0o600));
    // The guest's console is a file the VMM made, as its user, inside the jail.
    let c = std::fs::metadata(&console).unwrap();
    assert_eq!((c.uid(), c.gid()), (UID, GID));

    // SIGTERM reaches the VMM (PID 1 in its namespace, with a handler for it): it stops the
    // VM and exits. As with Firecracker's jailer, nothing removes the cgroup: the test does.
    // SAFETY: kill with a pid and a signal number.
    let sent = unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the VMM did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(mem_dir.exists(), "the cgroup {} is left", mem_dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for mount in mounts.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        matches!(f[2], "cgroup" | "cgroup2").then(|| PathBuf::from(f[1]))
    }) {
        let d = mount.join(&suffix);
        let start = Instant::now();
        // A v1 memory cgroup stays busy a moment after its last task.
        while d.exists() && std::fs::remove_dir(&d).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "cannot remove {}",
                d.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn jail_refuses_root_and_bad_ids() {
    let out = vessel()
        .args(["jail", "--id", "x", "--uid", "0", "--gid", "0", "--", "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("must not be 0"),
        "{}",
        text(&out.stderr)
    );
    let out = vessel()
        .args([
            "jail", "--id", "a/b", "--uid", "5", "--gid", "5", "--", "run",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Invalid instance ID: Invalid char (/) at position 1"),
        "{}",
        text(&out.stderr)
    );
}
