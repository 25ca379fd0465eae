//! seccomp-bpf filters for each kind of Vessel thread, written with `seccompiler`.
//!
//! The process chooses a [`Policy`] once ([`configure`]; the `vessel` binary does it from
//! its flags, on by default); every thread then calls [`apply`] with its [`ThreadKind`]
//! before it does anything for the guest: the VMM's main thread when the VM starts (before
//! the first vCPU), each vCPU thread before its first `KVM_RUN`, each device worker before
//! its first event, the API server's threads as they start. Without [`configure`] (unit
//! tests, libraries), [`apply`] does nothing.
//!
//! A syscall outside a thread's list kills the whole process (`SECCOMP_RET_KILL_PROCESS`),
//! or with [`Action::Log`] is allowed and logged by the kernel (audit log / dmesg). A
//! Firecracker-style JSON file ([`Policy::from_json`]) replaces the built-in filters.

mod layout;
mod rules;

use std::collections::HashMap;
use std::io::Read;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use seccompiler::BpfProgram as Program;

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp")]
    Backend(#[from] seccompiler::BackendError),
    #[error("seccomp")]
    Seccompiler(#[from] seccompiler::Error),
    #[error("seccomp filter file: {0}")]
    File(String),
    #[error("seccomp: this architecture ({0}) has no filters")]
    Arch(&'static str),
    /// A built-in list that does not fit one program.
    #[error("seccomp: a filter of {0} instructions is over the kernel's limit of 4096")]
    TooLong(usize),
    /// A syscall number no filter can compare with.
    #[error("seccomp: syscall number {0} is out of range")]
    SyscallNumber(i64),
    /// seccompiler's checks of a syscall's arguments that jump outside themselves.
    #[error("seccomp: the argument checks of syscall {0} do not stand alone")]
    LooseChecks(i64),
    /// A compiled filter file (Firecracker's `seccompiler-bin` output) that does not decode.
    #[error("Filter deserialization failed")]
    Deserialize(#[source] bitcode::Error),
}

/// The devices whose workers have filters of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Block,
    Net,
    Vsock,
    Rng,
    Balloon,
    Console,
    Pmem,
    /// virtio-mem: maps and unmaps KVM memory slots.
    Mem,
    /// A vhost-user device (virtio-fs, vhost-user disks and NICs): only forwards the
    /// backend's interrupts.
    VhostUser,
    /// A worker Vessel does not name: what any device may need.
    Other,
}

impl DeviceKind {
    /// The named kinds (all but `Other`).
    pub const NAMED: [DeviceKind; 9] = [
        DeviceKind::Block,
        DeviceKind::Net,
        DeviceKind::Vsock,
        DeviceKind::Rng,
        DeviceKind::Balloon,
        DeviceKind::Console,
        DeviceKind::Pmem,
        DeviceKind::Mem,
        DeviceKind::VhostUser,
    ];

    /// The kind of a worker thread, from its name (`virtio-blk`, `virtio-net`, ...).
    pub fn from_worker_name(name: &str) -> DeviceKind {
        match name.strip_prefix("virtio-").unwrap_or(name) {
            "blk" | "block" => DeviceKind::Block,
            "net" => DeviceKind::Net,
            "vsock" => DeviceKind::Vsock,
            "rng" => DeviceKind::Rng,
            "balloon" => DeviceKind::Balloon,
            "console" => DeviceKind::Console,
            "pmem" => DeviceKind::Pmem,
            "mem" => DeviceKind::Mem,
            "fs" => DeviceKind::VhostUser,
            n if n.starts_with("vhost-user") => DeviceKind::VhostUser,
            _ => DeviceKind::Other,
        }
    }
}

/// The kinds of thread, each with its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The VMM's main thread once the VM starts, and its helpers (stdin, vm-wait, metrics,
    /// balloon statistics).
    Vmm,
    /// The API server's threads (accept and one per connection).
    Api,
    /// A vCPU's exit loop.
    Vcpu,
    /// A virtio device's worker.
    Device(DeviceKind),
}

impl ThreadKind {
    /// Every kind.
    pub fn all() -> Vec<ThreadKind> {
        let mut v = vec![ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu];
        v.extend(DeviceKind::NAMED.map(ThreadKind::Device));
        v.push(ThreadKind::Device(DeviceKind::Other));
        v
    }

    /// The key of this kind in a filter file: Firecracker's `vmm`, `api` and `vcpu`, and
    /// Vessel's `virtio-blk`, `virtio-net`, ... (which fall back to `vmm`).
    pub fn key(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device(d) => match d {
                DeviceKind::Block => "virtio-blk",
                DeviceKind::Net => "virtio-net",
                DeviceKind::Vsock => "virtio-vsock",
                DeviceKind::Rng => "virtio-rng",
                DeviceKind::Balloon => "virtio-balloon",
                DeviceKind::Console => "virtio-console",
                DeviceKind::Pmem => "virtio-pmem",
                DeviceKind::Mem => "virtio-mem",
                DeviceKind::VhostUser => "vhost-user",
                DeviceKind::Other => "virtio",
            },
        }
    }

    /// Parses a key (see [`ThreadKind::key`]).
    pub fn from_key(key: &str) -> Option<ThreadKind> {
        ThreadKind::all().into_iter().find(|k| k.key() == key)
    }
}

/// What a syscall outside the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    /// Kill the process (`SECCOMP_RET_KILL_PROCESS`; it dies of SIGSYS).
    #[default]
    Kill,
    /// Allow it, and have the kernel log it (`SECCOMP_RET_LOG`): for finding what a filter
    /// misses.
    Log,
}

/// The filters a process installs.
#[derive(Debug, Clone)]
pub enum Policy {
    /// No filters (`--no-seccomp`).
    Off,
    /// Vessel's built-in filters.
    Builtin(Action),
    /// Filters read from a Firecracker-style JSON file, by key.
    Custom(HashMap<String, BpfProgram>),
}

impl Policy {
    /// Compiles a Firecracker-style JSON filter file (seccompiler's format: one object per
    /// thread kind, each with `mismatch_action`, `match_action` and `filter`). It must have
    /// `vmm`, `api` and `vcpu`; device workers use their own key when present, else `vmm`.
    pub fn from_json(reader: impl Read) -> Result<Policy, Error> {
        let map = seccompiler::compile_from_json(reader, target_arch()?)?;
        Policy::checked(map)
    }

    /// Filters compiled by Firecracker's `seccompiler-bin`: a bitcode-encoded map of thread
    /// kind to BPF program, each instruction one `u64` (a `sock_filter` as it lies in
    /// memory: code, jt, jf, k, little-endian). The same keys are required as in JSON.
    pub fn from_compiled(bytes: &[u8]) -> Result<Policy, Error> {
        let map: HashMap<String, Vec<u64>> =
            bitcode::deserialize(bytes).map_err(Error::Deserialize)?;
        let map = map
            .into_iter()
            .map(|(k, prog)| {
                let prog = prog
                    .into_iter()
                    .map(|i| seccompiler::sock_filter {
                        code: i as u16,
                        jt: (i >> 16) as u8,
                        jf: (i >> 24) as u8,
                        k: (i >> 32) as u32,
                    })
                    .collect();
                (k.to_lowercase(), prog)
            })
            .collect();
        Policy::checked(map)
    }

    fn checked(map: HashMap<String, BpfProgram>) -> Result<Policy, Error> {
        for key in ["vmm", "api", "vcpu"] {
            if !map.contains_key(key) {
                return Err(Error::File(format!("no '{key}' filter")));
            }
        }
        if let Some(k) = map.keys().find(|k| ThreadKind::from_key(k).is_none()) {
            return Err(Error::File(format!("unknown thread kind '{k}'")));
        }
        Ok(Policy::Custom(map))
    }

    /// Reads `path`: JSON ([`Policy::from_json`]) when it starts with `{`, else
    /// Firecracker's compiled format ([`Policy::from_compiled`]). At most 1 MiB is read.
    pub fn from_file(path: &std::path::Path) -> Result<Policy, Error> {
        const LIMIT: u64 = 1 << 20;
        let f = std::fs::File::open(path)
            .map_err(|e| Error::File(format!("{}: {e}", path.display())))?;
        let mut bytes = Vec::new();
        f.take(LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::File(format!("{}: {e}", path.display())))?;
        if bytes.len() as u64 > LIMIT {
            return Err(Error::File(format!(
                "{}: larger than {LIMIT} bytes",
                path.display()
            )));
        }
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Policy::from_json(bytes.as_slice()),
            _ => Policy::from_compiled(&bytes),
        }
    }
}

fn target_arch() -> Result<TargetArch, Error> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| Error::Arch(std::env::consts::ARCH))
}

fn mismatch(action: Action) -> SeccompAction {
    match action {
        Action::Kill => SeccompAction::KillProcess,
        Action::Log => SeccompAction::Log,
    }
}

/// The built-in filter of `kind`, as seccompiler's rules (its own compilation is a chain of
/// every syscall in turn; [`compile`] gives what is installed).
pub fn filter(kind: ThreadKind, action: Action) -> Result<SeccompFilter, Error> {
    Ok(SeccompFilter::new(
        rules::rules(kind, std::process::id())?,
        mismatch(action),
        SeccompAction::Allow,
        target_arch()?,
    )?)
}

/// The built-in filter of `kind`, compiled to BPF as one program that finds the syscall by
/// binary search ([`layout`]), where `clone3` fails with ENOSYS (its flags are in memory,
/// out of a filter's reach) so that the C library starts threads with `clone`, whose flags
/// the rules check.
pub fn compile(kind: ThreadKind, action: Action) -> Result<BpfProgram, Error> {
    layout::program(
        rules::rules(kind, std::process::id())?,
        &[(libc::SYS_clone3, SeccompAction::Errno(libc::ENOSYS as u32))],
        mismatch(action),
        SeccompAction::Allow,
        target_arch()?,
    )
}

/// What the `clone3` answer used to be: a filter of its own, stacked under each built-in one
/// (the layout's tests compare against it).
#[cfg(test)]
fn clone3_enosys() -> Result<BpfProgram, Error> {
    let rules = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    Ok(SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch()?,
    )?
    .try_into()?)
}

/// What each thread kind installs: built-in filters are compiled when a thread of that kind
/// first needs them (a plain `vessel run` compiles two of the eleven), a file's at
/// [`configure`].
enum Installed {
    Builtin {
        action: Action,
        programs: HashMap<ThreadKind, OnceLock<Result<Vec<BpfProgram>, String>>>,
    },
    Custom(HashMap<ThreadKind, BpfProgram>),
}

impl Installed {
    fn programs(&self, kind: ThreadKind) -> Result<Vec<BpfProgram>, Error> {
        match self {
            Installed::Builtin { action, programs } => {
                let Some(cell) = programs.get(&kind) else {
                    return Ok(Vec::new());
                };
                cell.get_or_init(|| builtin(kind, *action).map_err(|e| e.to_string()))
                    .clone()
                    .map_err(Error::File)
            }
            Installed::Custom(map) => Ok(map.get(&kind).cloned().into_iter().collect()),
        }
    }
}

fn builtin(kind: ThreadKind, action: Action) -> Result<Vec<BpfProgram>, Error> {
    Ok(vec![compile(kind, action)?])
}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();
static SELFTEST: OnceLock<ThreadKind> = OnceLock::new();

thread_local! {
    /// Whether this thread installed its filter (a second `apply` does nothing).
    static APPLIED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Chooses `policy` for every thread kind. Call once, before any thread applies its
/// filter; a second call is an error.
pub fn configure(policy: Policy) -> Result<(), Error> {
    let installed = match policy {
        Policy::Off => None,
        Policy::Builtin(action) => Some(Installed::Builtin {
            action,
            programs: ThreadKind::all()
                .into_iter()
                .map(|k| (k, OnceLock::new()))
                .collect(),
        }),
        Policy::Custom(map) => {
            let mut programs = HashMap::new();
            for kind in ThreadKind::all() {
                if let Some(p) = map.get(kind.key()).or_else(|| map.get("vmm")) {
                    programs.insert(kind, p.clone());
                }
            }
            Some(Installed::Custom(programs))
        }
    };
    if installed.is_some() {
        size_malloc_arenas();
    }
    INSTALLED
        .set(installed)
        .map_err(|_| Error::File("seccomp is already configured".into()))
}

/// glibc's malloc sizes its pool of arenas lazily: the first thread that needs a new arena
/// once there are more than eight reads `/sys/devices/system/cpu/online` (`openat`), which
/// no filtered thread may do, so a device worker started late (after a guest reset, with
/// enough threads about) died of SIGSYS. Setting the pool's size up front, before any thread
/// is filtered, means malloc never looks. Two arenas: the main thread's and one that the
/// other threads share. glibc's default (one per thread, up to eight per CPU) gave each
/// vCPU, worker and API thread a heap of its own, most of it touched once: 2 arenas left a
/// running tiny guest's VMM 65 KiB less private dirty memory (1 arena: 80 KiB), and the
/// threads rarely allocate once the VM runs.
fn size_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        const ARENAS: i32 = 2;
        // SAFETY: mallopt only sets a malloc parameter; it takes plain integers.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) } != 1 {
            log::warn!("seccomp: cannot set malloc's arena count");
        }
    }
}

/// Whether [`configure`] chose filters (not `Off`, not unconfigured).
pub fn enabled() -> bool {
    matches!(INSTALLED.get(), Some(Some(_)))
}

/// Installs `kind`'s filter on the calling thread (and the threads it starts later). Does
/// nothing without [`configure`], with [`Policy::Off`] (but for [`set_selftest`]'s call),
/// or when this thread already has its filter.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let Some(installed) = INSTALLED.get() else {
        return Ok(());
    };
    if APPLIED.with(|a| a.replace(true)) {
        return Ok(());
    }
    if let Some(installed) = installed {
        for p in installed.programs(kind)? {
            seccompiler::apply_filter(&p)?;
        }
    }
    if SELFTEST.get() == Some(&kind) {
        selftest_violation(kind);
    }
    Ok(())
}

/// Starts thread `name`, which installs `kind`'s filter before it runs `f`, and fails closed:
/// when the filter cannot be installed, the thread ends without running `f` and the error is
/// returned here (so the caller stops, instead of leaving an unfiltered thread behind). For
/// helper threads started before the VMM's main thread installs its own filter (threads
/// started after it inherit it).
pub fn spawn<F, T>(
    name: &str,
    kind: ThreadKind,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<Option<T>>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (filtered_tx, filtered) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let r = apply(kind);
            let ok = r.is_ok();
            let _ = filtered_tx.send(r);
            ok.then(f)
        })?;
    let r = filtered
        .recv()
        .map_err(|_| std::io::Error::other(format!("{name}: the thread ended")))?;
    if let Err(e) = r {
        let _ = thread.join();
        return Err(std::io::Error::other(format!(
            "{name}: cannot install the thread's filter ({e})"
        )));
    }
    Ok(thread)
}

/// [`apply`] for a device worker named `name` (see [`DeviceKind::from_worker_name`]).
pub fn apply_worker(name: &str) -> Result<(), Error> {
    apply(ThreadKind::Device(DeviceKind::from_worker_name(name)))
}

/// For tests: the first thread of `kind` makes a forbidden syscall (`execve` of a path that
/// does not exist) right after installing its filter. With filters on, the process dies of
/// SIGSYS; without, the call fails with ENOENT and nothing happens.
pub fn set_selftest(kind: ThreadKind) {
    let _ = SELFTEST.set(kind);
}

fn selftest_violation(kind: ThreadKind) {
    let path = c"/nonexistent/vessel-seccomp-selftest";
    // SAFETY: execve of a path that does not exist fails with ENOENT (when the filter lets
    // it through at all); the null argv and envp are never read.
    let r = unsafe {
        libc::syscall(
            libc::SYS_execve,
            path.as_ptr(),
            std::ptr::null::<*const libc::c_char>(),
            std::ptr::null::<*const libc::c_char>(),
        )
    };
    log::warn!(
        "seccomp selftest ({}): execve returned {r} ({}), the filter let it through",
        kind.key(),
        std::io::Error::last_os_error()
    );
}

#[cfg(test)]
mod tests;
