//! The jail a VMM runs in, modelled on Firecracker's jailer and taking its flags: a per-VM
//! directory `<chroot-base-dir>/<exec-file name>/<id>/root` as the new root (`pivot_root`),
//! new mount, PID, IPC and UTS namespaces (and a network namespace joined with `--netns` or
//! created with `--new-net-ns`), cgroup v2 limits (v1 where that is all the host mounts) on
//! CPU, memory and PIDs, device nodes for `/dev/kvm`, `/dev/net/tun` and `/dev/userfaultfd`
//! only, rlimits, an unprivileged uid/gid with no_new_privs, then exec of the VMM.
//!
//! Used by the `vessel-jailer` binary and by `vessel jail` ([`run`]).
//!
//! The sequence ([`run`]): validate everything; put the exec file (and, for a dynamically
//! linked one, its loader and libraries) into the jail; create the cgroup(s) and write the
//! limits; set the rlimits; join `--netns`; unshare the namespaces; make the mounts private,
//! bind the jail on itself and the `--bind` paths into it; `pivot_root` into it and detach
//! the old root; make the device nodes and hand the jail root to the uid/gid; fork. The child
//! (PID 1 of the new PID namespace) joins the cgroup, drops to the uid/gid, and execs the VMM
//! with an empty environment. The parent writes `<exec-file name>.pid` in the jail, forwards
//! signals, waits, removes the cgroup and exits with the VMM's status (with `--daemonize` it
//! exits as soon as the VMM has exec'd, and the VMM runs in a session of its own with stdio
//! on `/dev/null`). A failure in the child before the exec reaches the jailer on a
//! close-on-exec pipe and becomes the jailer's error, daemonized or not.

use std::ffi::{CString, OsString};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clap::Args;

pub mod cgroup;
pub mod libs;
pub mod spec;
mod sys;

pub use cgroup::VersionChoice;
use spec::{Bind, CgroupSetting, ResourceLimit};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

/// The jailer's flags (Firecracker's, plus `--cpus`, `--memory`, `--pids`, `--bind` and
/// `--new-net-ns`). Everything after `--` goes to the VMM.
#[derive(Debug, Clone, Args)]
pub struct JailArgs {
    /// The VM's id: letters, digits and hyphens, at most 64. Names the jail directory, the
    /// cgroup and the hostname.
    #[arg(long)]
    pub id: String,
    /// The VMM binary, linked (or copied) into the jail and exec'd there. `vessel jail`
    /// defaults to the running `vessel`.
    #[arg(long)]
    pub exec_file: Option<PathBuf>,
    /// The user id the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// The group id the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// Where jails are built: the VM's root is <DIR>/<exec file name>/<id>/root.
    #[arg(long, default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (e.g. /var/run/netns/NAME), made with `ip netns add`.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// A new, empty network namespace instead (the VM then has vsock but no TAP).
    #[arg(long, conflicts_with = "netns")]
    pub new_net_ns: bool,
    /// Detach: new session, stdio on /dev/null, and the jailer exits once the VMM is started.
    #[arg(long)]
    pub daemonize: bool,
    /// Accepted for Firecracker compatibility: the VMM always starts in a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// A cgroup file and the value to write to it, e.g. cpuset.cpus=0-1 (repeatable).
    #[arg(long = "cgroup", value_name = "FILE=VALUE", value_parser = spec::parse_cgroup)]
    pub cgroups: Vec<CgroupSetting>,
    /// Which cgroup hierarchy: 2, 1, or auto (v2 when it has the controllers, else v1).
    #[arg(long, value_enum, default_value = "auto")]
    pub cgroup_version: VersionChoice,
    /// The cgroup the VM's cgroup <id> is made in, relative to the hierarchy's root (default:
    /// the exec file's name).
    #[arg(long)]
    pub parent_cgroup: Option<String>,
    /// CPU time limit, in CPUs (1.5 = one and a half CPUs' worth per period).
    #[arg(long, value_parser = spec::parse_cpus)]
    pub cpus: Option<f64>,
    /// Memory limit of the VMM process and the guest's RAM (e.g. 512M, 2G).
    #[arg(long, value_parser = spec::parse_size)]
    pub memory: Option<u64>,
    /// Limit on the number of tasks (processes and threads) in the VM's cgroup.
    #[arg(long)]
    pub pids: Option<u64>,
    /// A resource limit: fsize, no-file, nproc, memlock or core = VALUE (repeatable; no-file
    /// defaults to 2048).
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE", value_parser = spec::parse_resource_limit)]
    pub resource_limits: Vec<ResourceLimit>,
    /// Mount a host file or directory into the jail, read-only unless `:rw`
    /// (SRC[:DEST][:ro|rw]; DEST defaults to SRC). Repeatable.
    #[arg(long = "bind", value_name = "SRC[:DEST][:rw]", value_parser = spec::parse_bind)]
    pub binds: Vec<Bind>,
    /// Arguments for the VMM (after `--`). When they start with an option (Firecracker mode),
    /// the jailer puts `--id=<id> --start-time-us=.. --start-time-cpu-us=..` first, as
    /// Firecracker's jailer does; a subcommand such as `run` gets them as given.
    #[arg(last = true)]
    pub vmm_args: Vec<OsString>,
}

impl JailArgs {
    /// The chroot directory: `<chroot-base-dir>/<exec file name>/<id>/root`.
    pub fn chroot_dir(&self, exec_file: &Path) -> PathBuf {
        let name = exec_file.file_name().unwrap_or(exec_file.as_os_str());
        self.chroot_base_dir.join(name).join(&self.id).join("root")
    }
}

/// The device nodes the VMM may need, made in the jail when the host has them.
const DEVICES: &[&str] = &["/dev/kvm", "/dev/net/tun", "/dev/userfaultfd"];

/// Everything checked and computed before the host is touched.
struct Plan {
    exec_file: PathBuf,
    exec_name: String,
    chroot: PathBuf,
    cgroup_version: Option<cgroup::Version>,
    settings: Vec<CgroupSetting>,
    mounts: Vec<cgroup::CgroupMount>,
    parent_cgroup: PathBuf,
    rlimits: Vec<ResourceLimit>,
    argv: Vec<CString>,
}

fn plan(args: &JailArgs) -> Result<Plan, JailError> {
    spec::validate_id(&args.id)?;
    let exec_arg = args
        .exec_file
        .as_ref()
        .ok_or_else(|| JailError::Invalid("--exec-file is required".into()))?;
    let exec_file = fs::canonicalize(exec_arg)
        .map_err(io_err(format!("--exec-file {}", exec_arg.display())))?;
    if !fs::metadata(&exec_file)
        .map_err(io_err(format!("--exec-file {}", exec_file.display())))?
        .is_file()
    {
        return Err(JailError::Invalid(format!(
            "--exec-file {} is not a file",
            exec_file.display()
        )));
    }
    let exec_name = exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| JailError::Invalid("--exec-file needs a UTF-8 file name".into()))?
        .to_string();
    if args.uid == 0 || args.gid == 0 {
        return Err(JailError::Invalid(
            "--uid and --gid must not be 0: the VMM runs unprivileged".into(),
        ));
    }
    if !args.chroot_base_dir.is_absolute() {
        return Err(JailError::Invalid(
            "--chroot-base-dir must be an absolute path".into(),
        ));
    }
    let parent_cgroup = spec::validate_relative(
        "--parent-cgroup",
        args.parent_cgroup.as_deref().unwrap_or(&exec_name),
    )?;
    for b in &args.binds {
        if !b.source.exists() {
            return Err(JailError::Invalid(format!(
                "--bind {}: no such file or directory",
                b.source.display()
            )));
        }
    }

    // Cgroups: the version decides the file names of --cpus/--memory/--pids.
    let wants_limits = args.cpus.is_some() || args.memory.is_some() || args.pids.is_some();
    let (cgroup_version, settings, mounts) = if wants_limits || !args.cgroups.is_empty() {
        let text =
            fs::read_to_string("/proc/self/mounts").map_err(io_err("read /proc/self/mounts"))?;
        let mounts = cgroup::parse_mounts(&text);
        let mut needed = cgroup::controllers_of(&args.cgroups);
        for (on, c) in [
            (args.cpus.is_some(), "cpu"),
            (args.memory.is_some(), "memory"),
            (args.pids.is_some(), "pids"),
        ] {
            if on {
                needed.insert(c.to_string());
            }
        }
        let v = cgroup::choose_version(args.cgroup_version, &mounts, &needed)?;
        let mut settings = cgroup::limit_settings(v, args.cpus, args.memory, args.pids);
        settings.extend(args.cgroups.iter().cloned());
        (Some(v), settings, mounts)
    } else {
        (None, Vec::new(), Vec::new())
    };

    let mut rlimits = args.resource_limits.clone();
    if !rlimits.iter().any(|r| r.resource == libc::RLIMIT_NOFILE) {
        rlimits.push(ResourceLimit {
            resource: libc::RLIMIT_NOFILE,
            name: "no-file",
            value: spec::DEFAULT_NO_FILE,
        });
    }

    let mut argv = vec![CString::new(exec_name.as_str())
        .map_err(|_| JailError::Invalid("bad exec file name".into()))?];
    let firecracker_mode = args
        .vmm_args
        .first()
        .is_none_or(|a| a.as_bytes().starts_with(b"-"));
    if firecracker_mode {
        for a in [
            format!("--id={}", args.id),
            format!("--start-time-us={}", sys::monotonic_us()),
            format!("--start-time-cpu-us={}", sys::process_cpu_us()),
        ] {
            argv.push(CString::new(a).map_err(|_| JailError::Invalid("bad argument".into()))?);
        }
    }
    for a in &args.vmm_args {
        argv.push(
            CString::new(a.as_bytes())
                .map_err(|_| JailError::Invalid(format!("VMM argument {a:?} holds a NUL byte")))?,
        );
    }
    Ok(Plan {
        chroot: args.chroot_dir(&exec_file),
        exec_file,
        exec_name,
        cgroup_version,
        settings,
        mounts,
        parent_cgroup,
        rlimits,
        argv,
    })
}

/// Build the jail and run the VMM in it. Returns the exit status for the jailer: the VMM's
/// (128 + signal if a signal ended it), or 0 at once with `--daemonize`. Must run as root, on a
/// single thread (it forks).
pub fn run(args: &JailArgs) -> Result<i32, JailError> {
    let plan = plan(args)?;
    let threads = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Threads:")?.trim().parse::<u32>().ok())
    });
    if threads.is_some_and(|n| n > 1) {
        return Err(JailError::Invalid(
            "the jailer must run on a single thread (it forks)".into(),
        ));
    }
    // Nothing but stdio (and what the jailer opens below on purpose) reaches the VMM.
    sys::cloexec_from(3).map_err(io_err("mark descriptors close-on-exec"))?;

    // The jail directory, the exec file and what a dynamic one needs.
    let chroot = &plan.chroot;
    fs::create_dir_all(chroot).map_err(io_err(format!("create {}", chroot.display())))?;
    libs::link_or_copy(&plan.exec_file, &chroot.join(&plan.exec_name))?;
    for f in libs::runtime_files(&plan.exec_file)? {
        libs::link_or_copy(&f, &libs::under(chroot, &f))?;
    }

    // Cgroups, made and filled now; the VMM joins them from inside the jail.
    let cgroups = match plan.cgroup_version {
        Some(v) => cgroup::create(
            v,
            &plan.mounts,
            &plan.parent_cgroup,
            &args.id,
            &plan.settings,
        )?,
        None => Vec::new(),
    };

    for r in &plan.rlimits {
        sys::setrlimit(r.resource, r.value)
            .map_err(io_err(format!("--resource-limit {}={}", r.name, r.value)))?;
    }

    // What must be read from the host before it goes out of sight.
    let devices: Vec<(&str, u64)> = DEVICES
        .iter()
        .filter_map(|d| {
            let m = fs::metadata(d).ok()?;
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_char_device().then_some((*d, m.rdev()))
        })
        .collect();
    if !devices.iter().any(|(d, _)| *d == "/dev/kvm") {
        eprintln!("vessel-jailer: warning: the host has no /dev/kvm; the jail will have none");
    }
    let dev_null = if args.daemonize {
        Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/null")
                .map_err(io_err("open /dev/null"))?,
        )
    } else {
        None
    };
    if let Some(ns) = &args.netns {
        let f = fs::File::open(ns).map_err(io_err(format!("--netns {}", ns.display())))?;
        sys::setns(f.as_raw_fd(), libc::CLONE_NEWNET).map_err(io_err(format!(
            "join the network namespace {}",
            ns.display()
        )))?;
    }

    // The namespaces; the PID namespace applies to the child forked below.
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if args.new_net_ns {
        flags |= libc::CLONE_NEWNET;
    }
    sys::unshare(flags).map_err(io_err("unshare the namespaces"))?;
    sys::sethostname(&args.id).map_err(io_err("set the hostname"))?;

    enter_root(chroot, &args.binds)?;
    populate(&devices, args.uid, args.gid)?;

    // The child reports a failure before exec on this pipe; both ends are close-on-exec, so
    // end of file with nothing read means the exec went through.
    let (mut exec_status, exec_report) = std::io::pipe().map_err(io_err("create a pipe"))?;
    match sys::fork().map_err(io_err("fork"))? {
        sys::Fork::Child => {
            drop(exec_status);
            let e = child(
                &plan,
                &cgroups,
                dev_null.as_ref().map(|f| f.as_raw_fd()),
                args,
            );
            let mut report = exec_report;
            // Best effort: if the parent is gone there is nobody left to tell.
            let _ = report.write_all(e.to_string().as_bytes());
            // SAFETY: _exit ends this forked child without running the parent's exit handlers.
            unsafe { libc::_exit(126) }
        }
        sys::Fork::Parent(pid) => {
            drop(exec_report);
            let mut failure = String::new();
            let read = exec_status.read_to_string(&mut failure);
            if read.is_err() || !failure.is_empty() {
                // The child never became the VMM: reap it and say why.
                let _ = sys::wait_exit_code(pid);
                for cg in &cgroups {
                    remove_cgroup(cg);
                }
                return Err(match read {
                    Err(e) => io_err("read the VMM's exec status")(e),
                    Ok(_) => JailError::Invalid(failure),
                });
            }
            // The pid as the host sees it: the jailer's own PID namespace is the host's.
            let pid_file = Path::new("/").join(format!("{}.pid", plan.exec_name));
            fs::write(&pid_file, format!("{pid}\n"))
                .map_err(io_err(format!("write {}", pid_file.display())))?;
            if args.daemonize {
                // The VMM runs: it has exec'd, as its uid/gid, in its cgroups.
                return Ok(0);
            }
            sys::forward_signals_to(pid).map_err(io_err("install signal handlers"))?;
            let code = sys::wait_exit_code(pid).map_err(io_err("wait for the VMM"))?;
            for cg in &cgroups {
                remove_cgroup(cg);
            }
            Ok(code)
        }
    }
}

/// How long cleanup waits for a cgroup to become removable after the VMM exited: a v1
/// memory cgroup stays busy until the kernel has released its pages (RCU), which can take
/// seconds on a loaded host.
const CGROUP_REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes `cg` once its last task has gone, retrying while the kernel reports it busy (up to
/// [`CGROUP_REMOVE_WAIT`]); warns when it has to leave the directory behind.
fn remove_cgroup(cg: &cgroup::VmCgroup) {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        let e = match cg.remove() {
            Ok(()) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return,
            Err(e) => e,
        };
        if e.raw_os_error() != Some(libc::EBUSY) || start.elapsed() >= CGROUP_REMOVE_WAIT {
            eprintln!(
                "vessel-jailer: warning: cannot remove the cgroup {} ({e}); it is left behind",
                cg.path.display()
            );
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(100));
    }
}

/// Make `chroot` the root of this mount namespace, with the `--bind` paths mounted in it.
fn enter_root(chroot: &Path, binds: &[Bind]) -> Result<(), JailError> {
    let c = |p: &Path| sys::cstr(p).map_err(io_err(format!("path {}", p.display())));
    // Nothing mounted from here on propagates back to the host.
    sys::mount(None, c"/", None, libc::MS_PRIVATE | libc::MS_REC)
        .map_err(io_err("make the mounts private"))?;
    let root = c(chroot)?;
    sys::mount(Some(&root), &root, None, libc::MS_BIND | libc::MS_REC)
        .map_err(io_err(format!("bind {} on itself", chroot.display())))?;
    for b in binds {
        let target = libs::under(chroot, &b.dest);
        let is_dir = b.source.is_dir();
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        }
        if is_dir {
            fs::create_dir_all(&target)
        } else {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&target)
                .map(drop)
        }
        .map_err(io_err(format!("create {}", target.display())))?;
        let (src, dst) = (c(&b.source)?, c(&target)?);
        sys::mount(Some(&src), &dst, None, libc::MS_BIND | libc::MS_REC)
            .map_err(io_err(format!("--bind {}", b.source.display())))?;
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
        if !b.writable {
            flags |= libc::MS_RDONLY;
        }
        sys::mount(None, &dst, None, flags)
            .map_err(io_err(format!("--bind {}: remount", b.source.display())))?;
    }
    std::env::set_current_dir(chroot).map_err(io_err(format!("chdir {}", chroot.display())))?;
    let old = "old_root";
    match fs::create_dir(old) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create old_root")(e)),
    }
    sys::pivot_root(c".", c"old_root").map_err(io_err("pivot_root"))?;
    std::env::set_current_dir("/").map_err(io_err("chdir /"))?;
    sys::umount_detach(c"/old_root").map_err(io_err("unmount the old root"))?;
    fs::remove_dir("/old_root").map_err(io_err("remove old_root"))?;
    sys::chroot(c".").map_err(io_err("chroot"))
}

/// Inside the new root: the device nodes, `/run`, and the root itself handed to the VMM's
/// uid/gid (so it can create its API socket and files there).
fn populate(devices: &[(&str, u64)], uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::chown;
    for (path, rdev) in devices {
        let p = Path::new(path);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        }
        let _ = fs::remove_file(p);
        let cpath = sys::cstr(p).map_err(io_err(format!("path {path}")))?;
        sys::mknod_char(&cpath, 0o600, *rdev).map_err(io_err(format!("mknod {path}")))?;
        chown(p, Some(uid), Some(gid)).map_err(io_err(format!("chown {path}")))?;
    }
    fs::create_dir_all("/run").map_err(io_err("create /run"))?;
    for d in ["/run", "/"] {
        chown(d, Some(uid), Some(gid)).map_err(io_err(format!("chown {d}")))?;
    }
    Ok(())
}

/// The forked child, PID 1 of the new PID namespace: join the cgroups, detach if asked, drop
/// privileges, exec the VMM. Returns only on failure.
fn child(
    plan: &Plan,
    cgroups: &[cgroup::VmCgroup],
    dev_null: Option<i32>,
    args: &JailArgs,
) -> JailError {
    let run = || -> Result<std::convert::Infallible, JailError> {
        for cg in cgroups {
            cg.join()
                .map_err(io_err(format!("join the cgroup {}", cg.path.display())))?;
        }
        if let Some(null) = dev_null {
            sys::setsid().map_err(io_err("setsid"))?;
            for fd in 0..3 {
                sys::dup2(null, fd).map_err(io_err("redirect stdio to /dev/null"))?;
            }
        }
        sys::drop_privileges(args.uid, args.gid).map_err(io_err(format!(
            "switch to uid {} gid {}",
            args.uid, args.gid
        )))?;
        if !args.daemonize {
            sys::parent_death_signal(libc::SIGKILL)
                .map_err(io_err("set the parent-death signal"))?;
        }
        let path = sys::cstr(&Path::new("/").join(&plan.exec_name)).map_err(io_err("exec path"))?;
        let e = sys::execve(&path, &plan.argv, &[]);
        Err(io_err(format!("exec /{}", plan.exec_name))(e))
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The `vessel-jailer` and `vessel jail` entry point: run, and turn an error into one line.
pub fn main_with(args: &JailArgs) -> std::process::ExitCode {
    match run(args) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("vessel-jailer: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        jail: JailArgs,
    }

    fn parse(a: &[&str]) -> Result<JailArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("vessel-jailer").chain(a.iter().copied()))
            .map(|c| c.jail)
    }

    #[test]
    fn firecracker_flags_are_accepted() {
        let a = parse(&[
            "--id",
            "551e7604-e35c",
            "--exec-file",
            "/bin/sh",
            "--uid",
            "123",
            "--gid",
            "100",
            "--cgroup",
            "cpuset.mems=0",
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            "all/uvms",
            "--chroot-base-dir",
            "/tmp/j",
            "--netns",
            "/var/run/netns/x",
            "--resource-limit",
            "fsize=250000000",
            "--resource-limit",
            "no-file=1024",
            "--daemonize",
            "--new-pid-ns",
            "--",
            "--api-sock",
            "/run/api.sock",
        ])
        .unwrap();
        assert_eq!(a.cgroup_version, VersionChoice::V2);
        assert_eq!(a.cgroups.len(), 1);
        assert_eq!(a.resource_limits.len(), 2);
        assert!(a.daemonize && a.new_pid_ns);
        assert_eq!(a.vmm_args, ["--api-sock", "/run/api.sock"]);
        assert_eq!(
            a.chroot_dir(Path::new("/usr/bin/vessel")),
            PathBuf::from("/tmp/j/vessel/551e7604-e35c/root")
        );
        assert!(parse(&[
            "--id",
            "x",
            "--uid",
            "1",
            "--gid",
            "1",
            "--netns",
            "/n",
            "--new-net-ns"
        ])
        .is_err());
        assert!(parse(&["--id", "x", "--uid", "1", "--gid", "1", "--cgroup", "bad"]).is_err());
    }

    fn base(extra: &[&str]) -> JailArgs {
        let mut v = vec![
            "--id",
            "vm-1",
            "--exec-file",
            "/bin/sh",
            "--uid",
            "1000",
            "--gid",
            "1000",
        ];
        v.extend_from_slice(extra);
        parse(&v).unwrap()
    }

    #[test]
    fn vmm_arguments_follow_firecracker_or_a_subcommand() {
        let fc = plan(&base(&["--", "--api-sock", "/a.sock"])).unwrap();
        let args: Vec<String> = fc.argv.iter().map(|c| c.to_string_lossy().into()).collect();
        assert_eq!(args[0], fc.exec_name);
        assert_eq!(args[1], "--id=vm-1");
        assert!(args[2].starts_with("--start-time-us="));
        assert!(args[3].starts_with("--start-time-cpu-us="));
        assert_eq!(&args[4..], ["--api-sock", "/a.sock"]);
        let sub = plan(&base(&["--", "run", "--kernel", "/k"])).unwrap();
        let args: Vec<String> = sub
            .argv
            .iter()
            .map(|c| c.to_string_lossy().into())
            .collect();
        assert_eq!(&args[1..], ["run", "--kernel", "/k"]);
        // no-file defaults to 2048 unless given.
        assert!(sub
            .rlimits
            .iter()
            .any(|r| r.resource == libc::RLIMIT_NOFILE && r.value == 2048));
        let own = plan(&base(&["--resource-limit", "no-file=64"])).unwrap();
        assert_eq!(own.rlimits.len(), 1);
        assert_eq!(own.rlimits[0].value, 64);
    }

    #[test]
    fn bad_plans_are_refused_before_touching_the_host() {
        let refused = |a: JailArgs, what: &str| {
            let e = plan(&a).err().unwrap_or_else(|| panic!("{what} accepted"));
            assert!(e.to_string().contains(what), "{e} / {what}");
        };
        let mut a = base(&[]);
        a.uid = 0;
        refused(a, "must not be 0");
        let mut a = base(&[]);
        a.id = "../etc".into();
        refused(a, "--id");
        let mut a = base(&[]);
        a.exec_file = Some("/no/such/vmm".into());
        refused(a, "--exec-file");
        let mut a = base(&[]);
        a.exec_file = None;
        refused(a, "--exec-file is required");
        refused(base(&["--parent-cgroup", "../up"]), "--parent-cgroup");
        refused(base(&["--chroot-base-dir", "rel"]), "absolute");
        refused(base(&["--bind", "/no/such/kernel"]), "no such file");
    }
}
