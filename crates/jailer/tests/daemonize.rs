//! `vessel-jailer` with Firecracker's `--daemonize` around a dynamically linked program
//! (`/bin/sleep`): the jailer returns at once, the program runs in the jail with its loader and
//! libraries, in a session of its own with stdio on /dev/null, in a new network namespace,
//! under the pids limit; and a program that cannot be exec'd makes the daemonizing jailer fail
//! with the reason instead of returning 0. Needs root (skipped otherwise).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn daemonized_program_runs_detached_in_the_jail() {
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/bin/sleep").exists() {
        eprintln!("skipping: needs root and /bin/sleep");
        return;
    }
    let base = std::env::temp_dir().join(format!("vessel-jailer-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let id = format!("daemon-{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_vessel-jailer"))
        .args(["--id", &id, "--exec-file", "/bin/sleep"])
        .args(["--uid", "40125", "--gid", "40125", "--chroot-base-dir"])
        .arg(&base)
        .args(["--daemonize", "--new-net-ns", "--new-pid-ns", "--pids", "8"])
        .args(["--", "30"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = base.join("sleep").join(&id).join("root");
    let pid: i32 = std::fs::read_to_string(root.join("sleep.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The jailer has exited once the program exec'd: it is there, as the unprivileged user.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("Uid:\t40125\t40125\t40125\t40125"),
        "{status}"
    );
    // Its loader and libraries were put into the jail.
    assert!(root.join("sleep").is_file());
    assert!(std::fs::read_dir(&root).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("lib")));
    // Own session, stdio on /dev/null, its own network namespace.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(after_comm[3], pid.to_string(), "session id: {stat}");
    let null = std::fs::metadata("/dev/null").unwrap().rdev();
    for fd in 0..3 {
        let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(m.rdev(), null, "fd {fd}");
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cg.contains(&format!("/sleep/{id}")), "{cg}");

    // SAFETY: kill with a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until("the program to go", || {
        (!std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ")))
        .then_some(())
    });
    // With --daemonize, cleaning up is the caller's job (as with Firecracker's jailer).
    for line in cg.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if path.ends_with(&id) {
            let dir = if ctl.is_empty() {
                format!("/sys/fs/cgroup{path}")
            } else {
                format!("/sys/fs/cgroup/{ctl}{path}")
            };
            wait_until("the cgroup to empty", || std::fs::remove_dir(&dir).ok());
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn daemonize_reports_a_program_that_cannot_be_execed() {
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    let base = std::env::temp_dir().join(format!("vessel-jailer-noexec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // A plain text file without execute permission: execve fails with EACCES in the child.
    let exe = base.join("files").join("not-a-program");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::write(&exe, "just text\n").unwrap();
    let id = format!("noexec-{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_vessel-jailer"))
        .args(["--id", &id, "--exec-file"])
        .arg(&exe)
        .args(["--uid", "40126", "--gid", "40126", "--chroot-base-dir"])
        .arg(base.join("jails"))
        .args(["--daemonize", "--pids", "8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the jailer succeeded: {stderr}");
    assert!(
        stderr.contains("exec /not-a-program") && stderr.contains("ermission denied"),
        "{stderr}"
    );
    // No pid file for a VMM that never ran, and the cgroup is gone again.
    let root = base
        .join("jails")
        .join("not-a-program")
        .join(&id)
        .join("root");
    assert!(!root.join("not-a-program.pid").exists());
    let cgroup_left = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - cgroup"))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .any(|mnt| walk_has(Path::new(&mnt), &id));
    assert!(!cgroup_left, "a cgroup named {id} is left");
    let _ = std::fs::remove_dir_all(&base);
}

/// Whether a directory named `name` is somewhere under `dir` (two levels deep at most: the
/// jailer's cgroups are `<parent>/<id>` under a hierarchy's root).
fn walk_has(dir: &Path, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        p.is_dir()
            && (e.file_name() == name
                || std::fs::read_dir(&p)
                    .map(|sub| sub.flatten().any(|s| s.file_name() == name))
                    .unwrap_or(false))
    })
}
