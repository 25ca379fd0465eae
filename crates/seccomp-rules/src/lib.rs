//! The syscalls each kind of Vessel thread may make, and their compilation to one seccomp BPF
//! program per kind (a binary search by syscall number, [`layout`]).
//!
//! Pure: nothing here installs a filter (`vessel-seccomp` does). That lets `vessel-seccomp`'s
//! build script compile the built-in programs when Vessel is built, so that a thread only
//! installs its program at run time: compiling the API thread's took about 0.1 ms of a cold
//! start, on the path to the API's first answer. The one value known only at run time, the
//! process's id (a thread may signal only its own process), is a parameter: the build uses
//! [`PID_PLACEHOLDER`] and the installer puts the id in its place.

mod layout;
mod rules;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use seccompiler::sock_filter;

/// Errors building the built-in programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp rules")]
    Backend(#[from] seccompiler::BackendError),
    #[error("seccomp rules")]
    Seccompiler(#[from] seccompiler::Error),
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
}

/// The process id the build compiles into the programs, where the one rule that names the
/// process (signals go only to it) compares with it: no syscall argument any rule checks
/// has this value, and no process has it (Linux's ids stay below 2^22). The installer
/// replaces it in every comparison ([`with_pid`]).
pub const PID_PLACEHOLDER: u32 = 0x7ead_beef;

/// `program` with `pid` in place of [`PID_PLACEHOLDER`] wherever a jump compares with it.
pub fn with_pid(mut program: BpfProgram, pid: u32) -> BpfProgram {
    /// `BPF_JMP | BPF_JEQ | BPF_K`: the comparison seccompiler writes for an equality.
    const JEQ_K: u16 = 0x15;
    for i in program
        .iter_mut()
        .filter(|i| i.code == JEQ_K && i.k == PID_PLACEHOLDER)
    {
        i.k = pid;
    }
    program
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
pub fn filter(kind: ThreadKind, action: Action, pid: u32) -> Result<SeccompFilter, Error> {
    Ok(SeccompFilter::new(
        rules::rules(kind, pid)?,
        mismatch(action),
        SeccompAction::Allow,
        target_arch()?,
    )?)
}

/// The built-in filter of `kind`, compiled to BPF as one program that finds the syscall by
/// binary search ([`layout`]), where `clone3` fails with ENOSYS (its flags are in memory,
/// out of a filter's reach) so that the C library starts threads with `clone`, whose flags
/// the rules check.
pub fn compile(kind: ThreadKind, action: Action, pid: u32) -> Result<BpfProgram, Error> {
    layout::program(
        rules::rules(kind, pid)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_to_bpf() {
        for kind in ThreadKind::all() {
            for action in [Action::Kill, Action::Log] {
                let p = compile(kind, action, 1).unwrap();
                // More than the architecture check and a default: the rules are there.
                assert!(p.len() > 50, "{kind:?}: {} instructions", p.len());
                // The kernel's limit for one program.
                assert!(p.len() < 4096, "{kind:?}: {} instructions", p.len());
            }
        }
        assert!(!clone3_enosys().unwrap().is_empty());
    }

    #[test]
    fn no_list_has_a_forbidden_syscall() {
        for kind in ThreadKind::all() {
            let r = rules::rules(kind, 1).unwrap();
            for call in rules::FORBIDDEN {
                assert!(!r.contains_key(call), "{kind:?} allows syscall {call}");
            }
            // What every thread needs.
            for call in [libc::SYS_futex, libc::SYS_exit, libc::SYS_rt_sigreturn] {
                assert!(r.contains_key(&call), "{kind:?} lacks syscall {call}");
            }
        }
        // Lists differ where threads differ.
        let vcpu = rules::rules(ThreadKind::Vcpu, 1).unwrap();
        let rng = rules::rules(ThreadKind::Device(DeviceKind::Rng), 1).unwrap();
        let api = rules::rules(ThreadKind::Api, 1).unwrap();
        assert!(vcpu.contains_key(&libc::SYS_io_uring_setup));
        assert!(!rng.contains_key(&libc::SYS_io_uring_setup));
        assert!(!rng.contains_key(&libc::SYS_socket));
        assert!(!vcpu.contains_key(&libc::SYS_openat));
        assert!(api.contains_key(&libc::SYS_accept4));
    }

    /// The placeholder is the only value replaced, and every comparison with the process id
    /// gets the id: a program compiled with the placeholder and given the id is the program
    /// compiled with the id, for every kind.
    #[test]
    fn the_pid_placeholder_stands_for_the_process_id_alone() {
        for kind in ThreadKind::all() {
            for pid in [1, 4242, 4_194_303] {
                let ahead = compile(kind, Action::Kill, PID_PLACEHOLDER).unwrap();
                let now = compile(kind, Action::Kill, pid).unwrap();
                assert!(
                    ahead.iter().any(|i| i.k == PID_PLACEHOLDER),
                    "{kind:?}: the process id is in no comparison"
                );
                assert_eq!(with_pid(ahead, pid), now, "{kind:?}, pid {pid}");
            }
        }
    }
}
