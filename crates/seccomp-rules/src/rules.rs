//! The syscalls each kind of thread may make, as seccompiler rules.
//!
//! Every list is an allow-list: anything else ends the process (or is logged). The lists are
//! generous where a syscall is harmless (memory, time, polling, I/O on descriptors the thread
//! already holds) and leave out what would let an attacker who controls a thread leave the
//! process's sandbox: `execve`, `fork` (a `clone` without `CLONE_THREAD`), `ptrace`,
//! `process_vm_*`, `mount`, `setns`/`unshare`, `bpf`, `kexec_*`, `*_module`,
//! `open_by_handle_at`, `userfaultfd`, `perf_event_open`, `keyctl`, `setuid` and friends.
//!
//! Threads inherit their creator's filters and the kernel applies every filter a thread has
//! (the strictest answer wins). vCPU threads activate devices, so they start the device
//! workers and create what activation needs (an io_uring, TAP offloads): the vCPU list
//! includes what the workers need; each worker's own filter narrows it to its device.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule};

use crate::{DeviceKind, Error, ThreadKind};

/// Syscall number to its rules (empty: allowed with any arguments; otherwise one of the
/// rules must match).
pub(crate) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// KVM's ioctl type byte (`KVMIO`).
const KVMIO: u64 = 0xae;
/// The TUN ioctls Vessel uses.
const TUNSETIFF: u64 = 0x4004_54ca;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const TUNGETVNETHDRSZ: u64 = 0x8004_54d7;
const TUNSETQUEUE: u64 = 0x4004_54d9;
const TUNGETIFF: u64 = 0x8004_54d2;
/// `BLKGETSIZE64` and `BLKSSZGET`: a disk on a block device.
const BLKGETSIZE64: u64 = 0x8008_1272;
const BLKSSZGET: u64 = 0x1268;
/// `KVM_SET_USER_MEMORY_REGION` (`_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`):
/// virtio-mem maps and unmaps the slots of its region.
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;

fn cond(arg: u8, len: Len, op: Op, val: u64) -> Result<SeccompCondition, Error> {
    Ok(SeccompCondition::new(arg, len, op, val)?)
}

/// One rule: every condition must hold.
fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    Ok(SeccompRule::new(conds)?)
}

/// Rules for a syscall whose 32-bit argument `arg` must be one of `vals`.
fn one_of(arg: u8, vals: &[u64]) -> Result<Vec<SeccompRule>, Error> {
    vals.iter()
        .map(|&v| rule(vec![cond(arg, Len::Dword, Op::Eq, v)?]))
        .collect()
}

/// A list being built: unconditional syscalls and argument-checked ones.
struct List(Rules);

impl List {
    fn new() -> List {
        List(BTreeMap::new())
    }

    /// Allows `calls` with any arguments (an existing argument check is lifted).
    fn any(&mut self, calls: &[i64]) -> &mut Self {
        for &c in calls {
            self.0.insert(c, Vec::new());
        }
        self
    }

    /// Allows `call` when one of `rules` matches (added to its rules, unless the call is
    /// already allowed with any arguments).
    fn when(&mut self, call: i64, rules: Vec<SeccompRule>) -> &mut Self {
        match self.0.get_mut(&call) {
            Some(r) if r.is_empty() => {}
            Some(r) => r.extend(rules),
            None => {
                self.0.insert(call, rules);
            }
        }
        self
    }
}

/// What every thread does: memory, time, futexes, signals returning, polling, eventfds,
/// I/O on the descriptors it holds, starting threads (not processes), stacking a filter of
/// its own, exiting.
fn base(l: &mut List, pid: u32) -> Result<(), Error> {
    use libc::*;
    l.any(&[
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_close,
        SYS_lseek,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_fcntl,
        SYS_dup,
        SYS_dup3,
        SYS_futex,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_gettimeofday,
        SYS_mmap,
        SYS_munmap,
        SYS_mprotect,
        SYS_mremap,
        SYS_brk,
        SYS_madvise,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        SYS_getrandom,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_ppoll,
        SYS_eventfd2,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        SYS_set_robust_list,
        SYS_rseq,
        // Threads: glibc tries clone3 first; the compiled program answers it ENOSYS (its
        // flags are in memory, out of the filter's reach), so glibc falls back to clone.
        SYS_clone3,
    ]);
    #[cfg(target_arch = "x86_64")]
    l.any(&[SYS_epoll_wait, SYS_poll, SYS_dup2, SYS_time]);
    // clone: threads only (no fork).
    l.when(
        SYS_clone,
        vec![rule(vec![cond(
            0,
            Len::Dword,
            Op::MaskedEq(CLONE_THREAD as u64),
            CLONE_THREAD as u64,
        )?])?],
    );
    // Signals only to this process's own threads (vCPU kicks, abort).
    l.when(
        SYS_tgkill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, u64::from(pid))?])?],
    );
    l.when(
        SYS_prctl,
        one_of(
            0,
            &[
                PR_SET_NAME as u64,
                PR_GET_NAME as u64,
                PR_SET_NO_NEW_PRIVS as u64,
                PR_GET_NO_NEW_PRIVS as u64,
                PR_SET_VMA as u64,
            ],
        )?,
    );
    // A thread may narrow itself further (a worker started by a vCPU thread does).
    l.when(SYS_seccomp, one_of(0, &[SECCOMP_SET_MODE_FILTER as u64])?);
    // Non-blocking and close-on-exec through ioctl (the standard library's way).
    l.when(SYS_ioctl, one_of(1, &[FIONBIO, FIOCLEX])?);
    Ok(())
}

/// Any KVM ioctl (the type byte is KVMIO): on a vCPU, the VM or /dev/kvm.
fn kvm_ioctls(l: &mut List) -> Result<(), Error> {
    l.when(
        libc::SYS_ioctl,
        vec![rule(vec![cond(
            1,
            Len::Dword,
            Op::MaskedEq(0xff00),
            KVMIO << 8,
        )?])?],
    );
    Ok(())
}

/// The TAP ioctls (activation sets offloads and the vnet header size).
fn tap_ioctls(l: &mut List) -> Result<(), Error> {
    l.when(
        libc::SYS_ioctl,
        one_of(
            1,
            &[
                TUNSETIFF,
                TUNGETIFF,
                TUNSETOFFLOAD,
                TUNSETVNETHDRSZ,
                TUNGETVNETHDRSZ,
                TUNSETQUEUE,
            ],
        )?,
    );
    Ok(())
}

/// Sockets of `domains`, and everything done on a socket already held.
fn sockets(l: &mut List, domains: &[i32]) -> Result<(), Error> {
    use libc::*;
    l.any(&[
        SYS_connect,
        SYS_accept4,
        SYS_bind,
        SYS_listen,
        SYS_getsockname,
        SYS_getpeername,
        SYS_getsockopt,
        SYS_setsockopt,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_shutdown,
    ]);
    #[cfg(target_arch = "x86_64")]
    l.any(&[SYS_accept]);
    let domains: Vec<u64> = domains.iter().map(|&d| d as u64).collect();
    l.when(SYS_socket, one_of(0, &domains)?);
    l.when(SYS_socketpair, one_of(0, &[AF_UNIX as u64])?);
    Ok(())
}

/// The block engine: io_uring (created at activation), flushes, discards.
fn block_io(l: &mut List) {
    use libc::*;
    l.any(&[
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fallocate,
        SYS_ftruncate,
    ]);
}

/// Opening, creating and replacing files (snapshots, logs, metrics, disks, sockets' paths).
fn files(l: &mut List) {
    use libc::*;
    l.any(&[
        SYS_openat,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_renameat,
        SYS_renameat2,
        SYS_unlinkat,
        SYS_mkdirat,
        SYS_readlinkat,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_getdents64,
        SYS_statfs,
        SYS_fstatfs,
        SYS_getcwd,
        SYS_pipe2,
        SYS_flock,
    ]);
    #[cfg(target_arch = "x86_64")]
    l.any(&[
        SYS_open,
        SYS_stat,
        SYS_lstat,
        SYS_access,
        SYS_rename,
        SYS_unlink,
        SYS_mkdir,
        SYS_readlink,
        SYS_pipe,
    ]);
}

/// What a device's worker needs beyond [`base`].
fn device(l: &mut List, kind: DeviceKind) -> Result<(), Error> {
    match kind {
        DeviceKind::Block => {
            block_io(l);
            l.when(libc::SYS_ioctl, one_of(1, &[BLKGETSIZE64, BLKSSZGET])?);
        }
        // TAP reads and writes are in `base`; MMDS answers are built in memory. passt's
        // stream socket is read with `recv` (std's `UnixStream::read`) and written with
        // `send` (MSG_NOSIGNAL: a gone passt is EPIPE, never SIGPIPE): `recvfrom`, `sendto`.
        // A new passt's socket comes from the passt keeper with SCM_RIGHTS: `recvmsg`.
        DeviceKind::Net => {
            tap_ioctls(l)?;
            l.any(&[libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_recvmsg]);
        }
        // Guest connections reach Unix sockets on the host.
        DeviceKind::Vsock => sockets(l, &[libc::AF_UNIX])?,
        // getrandom is in `base`.
        DeviceKind::Rng => {}
        // madvise (giving pages back) is in `base`; punching holes in file-backed memory:
        DeviceKind::Balloon => {
            l.any(&[libc::SYS_fallocate]);
        }
        // Reads and writes on the console's descriptors are in `base`.
        DeviceKind::Console => {}
        // A flush writes the mapped backing file back.
        DeviceKind::Pmem => {
            l.any(&[libc::SYS_msync]);
        }
        // Slots in and out of the VM; madvise (dropping unplugged blocks) is in `base`.
        DeviceKind::Mem => {
            l.when(libc::SYS_ioctl, one_of(1, &[KVM_SET_USER_MEMORY_REGION])?);
        }
        // Reads the backend's call events and raises interrupts (eventfd writes): `base`.
        // Activation and reset talk to the backend on the vCPU's thread.
        DeviceKind::VhostUser => {}
        // A device Vessel does not name: what any device may need.
        DeviceKind::Other => {
            for k in DeviceKind::NAMED {
                device(l, k)?;
            }
        }
    }
    Ok(())
}

/// The rules of thread kind `kind` in a process whose id is `pid`.
pub(crate) fn rules(kind: ThreadKind, pid: u32) -> Result<Rules, Error> {
    use libc::*;
    let mut l = List::new();
    base(&mut l, pid)?;
    match kind {
        ThreadKind::Vcpu => {
            // The exit loop, interrupts, MSI routing, ioeventfds: KVM ioctls.
            kvm_ioctls(&mut l)?;
            // Devices activate and reset on the vCPU that wrote their registers: they
            // create rings and workers (whose own filters narrow this list).
            device(&mut l, DeviceKind::Other)?;
        }
        ThreadKind::Device(d) => device(&mut l, d)?,
        ThreadKind::Api => {
            // The socket's connections, the logger's and metrics' files, drive paths.
            sockets(&mut l, &[AF_UNIX])?;
            files(&mut l);
        }
        ThreadKind::Vmm => {
            // Everything a running VM's main thread does: pause/resume, snapshots and
            // migration (files, Unix and TCP sockets), device updates, the terminal.
            kvm_ioctls(&mut l)?;
            device(&mut l, DeviceKind::Other)?;
            sockets(&mut l, &[AF_UNIX, AF_INET, AF_INET6])?;
            files(&mut l);
            l.any(&[
                SYS_rt_sigaction,
                SYS_sched_setaffinity,
                SYS_prlimit64,
                SYS_getrlimit,
                SYS_uname,
                SYS_sysinfo,
                SYS_getuid,
                SYS_geteuid,
                SYS_getgid,
                SYS_getegid,
            ]);
            l.when(
                SYS_ioctl,
                one_of(1, &[TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ])?,
            );
        }
    }
    Ok(l.0)
}

/// The syscalls no thread may make, whatever its kind (checked by the tests).
#[cfg(test)]
pub(crate) const FORBIDDEN: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_bpf,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_userfaultfd,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_setuid,
    libc::SYS_reboot,
    libc::SYS_kill,
    libc::SYS_tkill,
];
