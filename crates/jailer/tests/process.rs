//! `vessel-jailer` around a dynamically linked program (`/bin/sleep`), in Firecracker's jailer's
//! process model: plainly the jailer becomes the program (the pid file holds the jailer's own
//! pid); with `--new-pid-ns` it forks it into a new PID namespace, writes its pid and exits;
//! with `--daemonize` it returns at once and the program runs in a session of its own with
//! stdio on /dev/null. Also: the jail's directories and exec file (modes, owners), links
//! planted where the jailer writes (refused, their targets untouched), Firecracker's messages,
//! and a program that cannot be exec'd makes the daemonizing jailer fail with the reason.
//! Needs root (skipped otherwise).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> bool {
    // SAFETY: geteuid takes no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/bin/sleep").exists() {
        eprintln!("skipping: needs root and /bin/sleep");
    }
    root && Path::new("/bin/sleep").exists()
}

/// A fresh chroot base for one test.
fn base(name: &str) -> PathBuf {
    let b = std::env::temp_dir().join(format!("vessel-jailer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&b);
    b
}

/// `vessel-jailer` for `/bin/sleep` as uid/gid `uid`, jails under `base`.
fn jailer(id: &str, uid: u32, base: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vessel-jailer"));
    c.args(["--id", id, "--exec-file", "/bin/sleep"])
        .args(["--uid", &uid.to_string(), "--gid", &uid.to_string()])
        .arg("--chroot-base-dir")
        .arg(base);
    c
}

fn status_field(pid: i32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn read_pid(root: &Path) -> i32 {
    std::fs::read_to_string(root.join("sleep.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Kills `pid` and waits until it is gone (reaped by whoever its parent is).
fn kill_and_wait(pid: i32) {
    // SAFETY: kill with a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until("the program to go", || {
        (!std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ")))
        .then_some(())
    });
}

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
    // A session of its own (the double fork's), which it does not lead: it can never get a
    // controlling terminal.
    let our_stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let our_sid = our_stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(3);
    assert_ne!(Some(after_comm[3]), our_sid, "session id: {stat}");
    assert_ne!(after_comm[3], pid.to_string(), "session id: {stat}");
    let null = std::fs::metadata("/dev/null").unwrap().rdev();
    for fd in 0..3 {
        let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(m.rdev(), null, "fd {fd}");
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cg.contains(&format!("/sleep/{id}")), "{cg}");
    // The pid file holds the program's pid as the host sees it; it is PID 1 of its own
    // namespace, and no jailer process is its parent any more.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    assert_eq!(status_field(pid, "Name"), "sleep");
    let ppid: i32 = status_field(pid, "PPid").parse().unwrap();
    assert!(
        !std::fs::read_to_string(format!("/proc/{ppid}/cmdline"))
            .unwrap_or_default()
            .contains("vessel-jailer"),
        "the program's parent {ppid} is a jailer"
    );

    // Firecracker's chroot hierarchy: the jail's root, /dev, /dev/net and /run are
    // drwx------ and the uid/gid's; the exec file is a copy (one link), the uid/gid's, with
    // the source's mode; /dev/kvm is crw------- and the uid/gid's.
    for d in ["", "dev", "dev/net", "run"] {
        let m = std::fs::symlink_metadata(root.join(d)).unwrap();
        assert!(m.is_dir(), "/{d}");
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (0o700, 40125, 40125),
            "/{d}"
        );
    }
    let exe = std::fs::metadata(root.join("sleep")).unwrap();
    let src = std::fs::metadata("/bin/sleep").unwrap();
    assert_eq!(
        (exe.mode(), exe.uid(), exe.gid(), exe.nlink()),
        (src.mode(), 40125, 40125, 1)
    );
    if Path::new("/dev/kvm").exists() {
        let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
        assert_eq!((kvm.mode() & 0o7777, kvm.uid()), (0o600, 40125));
    }
    // The levels above the root are the jailer's (root), as create_dir_all made them.
    let id_dir = std::fs::metadata(root.parent().unwrap()).unwrap();
    assert_eq!(id_dir.uid(), 0);

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
        .args(["--daemonize"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the jailer succeeded: {stderr}");
    assert!(
        stderr.contains("exec /not-a-program") && stderr.contains("ermission denied"),
        "{stderr}"
    );
    // No pid file for a VMM that never ran.
    let root = base
        .join("jails")
        .join("not-a-program")
        .join(&id)
        .join("root");
    assert!(!root.join("not-a-program.pid").exists());
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn the_jailer_becomes_the_program_without_new_pid_ns() {
    if !root() {
        return;
    }
    let base = base("plain");
    let id = format!("plain-{}", std::process::id());
    let mut child = jailer(&id, 40127, &base)
        .args(["--", "30"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let root = base.join("sleep").join(&id).join("root");
    let jailer_pid = child.id() as i32;
    // The pid file holds the jailer's own pid, and that process is now the program.
    wait_until("the program to exec", || {
        (std::fs::read_to_string(format!("/proc/{jailer_pid}/status"))
            .is_ok_and(|s| s.contains("Name:\tsleep")))
        .then_some(())
    });
    assert_eq!(read_pid(&root), jailer_pid);
    assert_eq!(
        status_field(jailer_pid, "Uid"),
        "40127\t40127\t40127\t40127"
    );
    // No PID namespace of its own without --new-pid-ns (Firecracker's default).
    assert_eq!(status_field(jailer_pid, "NSpid"), jailer_pid.to_string());
    // Its exit status is the program's: here, killed by SIGTERM.
    // SAFETY: kill with a pid and a signal number.
    unsafe { libc::kill(jailer_pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn with_new_pid_ns_the_jailer_writes_the_pid_and_exits() {
    if !root() {
        return;
    }
    let base = base("pidns");
    let id = format!("pidns-{}", std::process::id());
    // The program inherits the jailer's stdio: a file rather than a pipe nobody would close.
    std::fs::create_dir_all(&base).unwrap();
    let err = base.join("stderr");
    let status = jailer(&id, 40128, &base)
        .args(["--new-pid-ns", "--", "30"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let root = base.join("sleep").join(&id).join("root");
    let pid = read_pid(&root);
    assert_eq!(status_field(pid, "Name"), "sleep");
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    assert_eq!(status_field(pid, "Uid"), "40128\t40128\t40128\t40128");
    kill_and_wait(pid);
    let _ = std::fs::remove_dir_all(&base);
}

/// Plants `make(target, at)` at `name` in a fresh jail, runs the jailer, and checks that it
/// fails with `message` and leaves the target alone.
fn planted(name: &str, link: &str, make: fn(&Path, &Path), message: impl Fn(&Path) -> String) {
    let base = base(&format!("planted-{link}-{}", name.replace('.', "-")));
    let id = format!("planted-{}", std::process::id());
    let root = base.join("sleep").join(&id).join("root");
    std::fs::create_dir_all(&root).unwrap();
    let target = base.join("precious");
    std::fs::write(&target, "precious\n").unwrap();
    make(&target, &root.join(name));
    let out = jailer(&id, 40129, &base)
        .args(["--", "30"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the jailer ran: {stderr}");
    let want = message(&root.join(name));
    assert!(stderr.contains(&want), "{stderr} (wanted {want})");
    let t = std::fs::metadata(&target).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    assert_eq!((t.uid(), t.mode() & 0o777), (0, 0o644));
    let _ = std::fs::remove_dir_all(&base);
}

fn symlink(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

fn hard_link(target: &Path, at: &Path) {
    std::fs::hard_link(target, at).unwrap();
}

#[test]
fn links_planted_in_the_jail_are_refused_with_firecracker_s_messages() {
    if !root() {
        return;
    }
    // SAFETY: umask only sets the mask; the test files get 0644.
    unsafe { libc::umask(0o022) };
    // At the exec file's destination (Firecracker's suite: test_exec_destination_path_is_*).
    planted("sleep", "sym", symlink, |p| {
        format!(
            "Failed to open {}: Too many levels of symbolic links",
            p.display()
        )
    });
    planted("sleep", "hard", hard_link, |p| {
        format!("Detected hard link at: {}", p.display())
    });
    // At the pid file, written from inside the jail.
    planted("sleep.pid", "sym", symlink, |_| {
        "Failed to open file /sleep.pid: Too many levels of symbolic links".into()
    });
    planted("sleep.pid", "hard", hard_link, |_| {
        "Detected hard link at: /sleep.pid".into()
    });
    // A linked directory on the way to a library is not followed.
    planted(
        "lib",
        "dir",
        |t, at| symlink(t.parent().unwrap(), at),
        |p| format!("Failed to open {}", p.display()),
    );
}

#[test]
fn firecracker_s_messages_for_a_bad_id_or_exec_file() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vessel-jailer"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&[
        "--id",
        "",
        "--exec-file",
        "/bin/sh",
        "--uid",
        "1",
        "--gid",
        "1",
    ]);
    assert!(
        e.contains("Invalid instance ID: Invalid len (0);  the length must be between 1 and 64"),
        "{e}"
    );
    let e = run(&["--id", "x", "--uid", "1", "--gid", "1"]);
    assert!(
        e.contains("Failed to parse arguments: Argument 'exec-file' required, but not found."),
        "{e}"
    );
    let e = run(&[
        "--id",
        "x",
        "--exec-file",
        "/no/such/vmm",
        "--uid",
        "1",
        "--gid",
        "1",
    ]);
    assert!(
        e.contains(
            "Failed to canonicalize path /no/such/vmm: No such file or directory (os error 2)"
        ),
        "{e}"
    );
}
