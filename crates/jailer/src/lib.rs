//! The jail a VMM runs in, modelled on Firecracker's jailer and taking its flags: a per-VM
//! directory `<chroot-base-dir>/<exec-file name>/<id>/root` as the new root (`pivot_root`),
//! new mount, IPC and UTS namespaces (a PID namespace with `--new-pid-ns`, and a network
//! namespace joined with `--netns` or created with `--new-net-ns`), cgroup v2 limits (v1
//! where that is all the host mounts) on CPU, memory and PIDs, device nodes for `/dev/kvm`,
//! `/dev/net/tun` and `/dev/userfaultfd` only, rlimits, an unprivileged uid/gid with
//! no_new_privs, then exec of the VMM.
//!
//! Used by the `vessel-jailer` binary and by `vessel jail` ([`run`]).
//!
//! The sequence ([`run`]): validate everything; copy the exec file (owned by the uid/gid, as
//! Firecracker does) and, for a dynamically linked one, its loader and libraries into the jail,
//! never writing through a link planted there ([`place`]); create the cgroup(s) and write the
//! limits; set the rlimits; join `--netns`; unshare the namespaces; make the mounts private,
//! bind the jail on itself and the `--bind` paths into it; `pivot_root` into it and detach the
//! old root; make `/`, `/dev`, `/dev/net` and `/run` mode 0700 owned by the uid/gid, and the
//! device nodes. Then Firecracker's process model ([`launch`]): the jailer execs the VMM
//! itself (its pid in `<exec-file name>.pid`), or with `--new-pid-ns` forks it into a new PID
//! namespace, writes its pid and exits; `--daemonize` first double-forks into a new session
//! with stdio on `/dev/null`. No jailer process stays beside the VMM, and nothing removes the
//! cgroup afterwards (the integrator's job, as with Firecracker). The process that execs joins
//! the cgroups, drops to the uid/gid and execs with an empty environment; a failure before the
//! exec in a forked process reaches the jailer on a close-on-exec pipe and becomes its error.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clap::Args;

pub mod cgroup;
mod launch;
pub mod libs;
pub mod place;
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
    /// Start the VMM in a new PID namespace (as its PID 1): the jailer forks it, writes its pid
    /// to <exec file name>.pid in the jail and exits. Without it the jailer becomes the VMM.
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
    // Firecracker's messages.
    let exec_arg = args.exec_file.as_ref().ok_or_else(|| {
        JailError::Invalid(
            "Failed to parse arguments: Argument 'exec-file' required, but not found.".into(),
        )
    })?;
    let exec_file = fs::canonicalize(exec_arg).map_err(io_err(format!(
        "Failed to canonicalize path {}",
        exec_arg.display()
    )))?;
    if !exec_file.is_file() {
        return Err(JailError::Invalid(format!(
            "{} is not a file",
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

/// Build the jail and start the VMM in it. Without `--new-pid-ns` or `--daemonize` this
/// process becomes the VMM and the call does not return unless something failed; otherwise
/// it returns `Ok` once the VMM runs, and the caller exits 0. Must run as root, on a single
/// thread (it may fork).
pub fn run(args: &JailArgs) -> Result<(), JailError> {
    let mut plan = plan(args)?;
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

    // The jail directory, made as Firecracker's jailer makes it (`create_dir_all`: the levels
    // get the umask's mode; the root becomes 0700 and the uid's once inside, see populate).
    let base = &args.chroot_base_dir;
    fs::create_dir_all(base).map_err(io_err(format!(
        "Failed to create directory {}",
        base.display()
    )))?;
    let base = fs::canonicalize(base).map_err(io_err(format!(
        "Failed to canonicalize path {}",
        base.display()
    )))?;
    plan.chroot = base.join(&plan.exec_name).join(&args.id).join("root");
    let chroot = &plan.chroot;
    fs::create_dir_all(chroot).map_err(io_err(format!(
        "Failed to create directory {}",
        chroot.display()
    )))?;
    // The exec file is copied, not linked, and owned by the uid/gid (Firecracker's way); the
    // loader and libraries stay root's.
    let root = place::JailDir::open(chroot)?;
    place::copy_into(
        &plan.exec_file,
        &root,
        OsStr::new(&plan.exec_name),
        Some((args.uid, args.gid)),
    )?;
    for f in libs::runtime_files(&plan.exec_file)? {
        let real = fs::canonicalize(&f).map_err(io_err(format!(
            "Failed to canonicalize path {}",
            f.display()
        )))?;
        let (Some(dir), Some(name)) = (f.parent(), f.file_name()) else {
            continue;
        };
        place::copy_into(&real, &root.subdir(dir)?, name, None)?;
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
                .map_err(io_err("Failed to open /dev/null"))?,
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

    // The namespaces (the PID namespace, with --new-pid-ns, is made where the VMM is forked).
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if args.new_net_ns {
        flags |= libc::CLONE_NEWNET;
    }
    sys::unshare(flags).map_err(io_err("unshare the namespaces"))?;
    sys::sethostname(&args.id).map_err(io_err("set the hostname"))?;

    enter_root(&root, &args.binds)?;
    drop(root);
    populate(&devices, args.uid, args.gid)?;
    launch::launch(&plan, args, &cgroups, dev_null)
}

/// Make `root` the root of this mount namespace, with the `--bind` paths mounted in it (their
/// mount points made without following links).
fn enter_root(root: &place::JailDir, binds: &[Bind]) -> Result<(), JailError> {
    let chroot = root.path();
    let c = |p: &Path| sys::cstr(p).map_err(io_err(format!("path {}", p.display())));
    // Nothing mounted from here on propagates back to the host.
    sys::mount(None, c"/", None, libc::MS_PRIVATE | libc::MS_REC)
        .map_err(io_err("make the mounts private"))?;
    let croot = c(chroot)?;
    sys::mount(Some(&croot), &croot, None, libc::MS_BIND | libc::MS_REC)
        .map_err(io_err(format!("bind {} on itself", chroot.display())))?;
    // The bind of the jail on itself is a new mount: reopen the root to reach into it.
    let root = place::JailDir::open(chroot)?;
    for b in binds {
        let rel = b.dest.strip_prefix("/").unwrap_or(&b.dest);
        let (dir, name) = match (rel.parent(), rel.file_name()) {
            (Some(d), Some(n)) => (root.subdir(d)?, n),
            _ => {
                return Err(JailError::Invalid(format!(
                    "--bind {}: {} cannot be a mount point",
                    b.source.display(),
                    b.dest.display()
                )))
            }
        };
        let target = dir.mount_point(name, b.source.is_dir())?;
        let src = c(&b.source)?;
        sys::mount(
            Some(&src),
            &place::fd_path(&target),
            None,
            libc::MS_BIND | libc::MS_REC,
        )
        .map_err(io_err(format!("--bind {}", b.source.display())))?;
        // The mount itself, reached through the name (which now leads into it).
        let mounted = dir.reopen(name)?;
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
        if !b.writable {
            flags |= libc::MS_RDONLY;
        }
        sys::mount(None, &place::fd_path(&mounted), None, flags)
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

/// The directories Firecracker's jailer makes in the jail and hands to the VMM's uid/gid with
/// mode 0700 (`/run` holds the API socket by default).
const FOLDERS: [&str; 4] = ["/", "/dev", "/dev/net", "/run"];

/// Inside the new root: [`FOLDERS`] (never through a link) and the device nodes, each
/// `crw-------` and the VMM's.
fn populate(devices: &[(&str, u64)], uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::lchown;
    let top = place::JailDir::open(Path::new("/"))?;
    for f in FOLDERS {
        top.subdir(Path::new(f))?.set_mode_owner(0o700, uid, gid)?;
    }
    for (path, rdev) in devices {
        let p = Path::new(path);
        if let Some(dir) = p.parent() {
            top.subdir(dir)?;
        }
        // Whatever is there (a node of a previous run, a link) goes; unlink follows nothing.
        let _ = fs::remove_file(p);
        let cpath = sys::cstr(p).map_err(io_err(format!("path {path}")))?;
        sys::mknod_char(&cpath, 0o600, *rdev).map_err(io_err(format!(
            "Failed to create {path} via mknod inside the jail"
        )))?;
        lchown(p, Some(uid), Some(gid))
            .map_err(io_err(format!("Failed to change owner for {path}")))?;
    }
    Ok(())
}

/// The `vessel-jailer` and `vessel jail` entry point: run, and turn an error into one line.
/// Returns only where the jailer does not become the VMM: success once the VMM runs (with
/// `--new-pid-ns` or `--daemonize`), or a failure.
pub fn main_with(args: &JailArgs) -> std::process::ExitCode {
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
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
        refused(a, "Invalid instance ID: Invalid char (.) at position 0");
        let mut a = base(&[]);
        a.exec_file = Some("/no/such/vmm".into());
        refused(
            a,
            "Failed to canonicalize path /no/such/vmm: No such file or directory (os error 2)",
        );
        let mut a = base(&[]);
        a.exec_file = Some("/tmp".into());
        refused(a, "/tmp is not a file");
        let mut a = base(&[]);
        a.exec_file = None;
        refused(
            a,
            "Failed to parse arguments: Argument 'exec-file' required, but not found.",
        );
        let mut a = base(&[]);
        a.id = String::new();
        refused(
            a,
            "Invalid instance ID: Invalid len (0);  the length must be between 1 and 64",
        );
        refused(base(&["--parent-cgroup", "../up"]), "--parent-cgroup");
        refused(base(&["--chroot-base-dir", "rel"]), "absolute");
        refused(base(&["--bind", "/no/such/kernel"]), "no such file");
    }
}
