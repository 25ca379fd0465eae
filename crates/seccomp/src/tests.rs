use super::*;

/// Runs `body` in a forked child after installing `programs` there; returns how the child
/// ended: `Ok(exit code)` or `Err(signal)`. The child only makes raw syscalls (no
/// allocation, no locks) between the fork and its `_exit`.
fn in_child(programs: &[BpfProgram], body: impl FnOnce() -> i32) -> Result<i32, i32> {
    // SAFETY: the child makes only async-signal-safe calls (prctl, seccomp, the syscalls in
    // `body`, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        for p in programs {
            if seccompiler::apply_filter(p).is_err() {
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(100) };
            }
        }
        let code = body();
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waitpid writes the status of our child into a local.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}

fn programs(kind: ThreadKind, action: Action) -> Vec<BpfProgram> {
    builtin(kind, action).unwrap()
}

/// execve of a missing path: ENOENT when allowed.
fn try_execve() -> i32 {
    let path = c"/nonexistent/vessel-seccomp-test";
    // SAFETY: execve of a missing path fails; null argv/envp are never read.
    let r = unsafe {
        libc::syscall(
            libc::SYS_execve,
            path.as_ptr(),
            std::ptr::null::<*const libc::c_char>(),
            std::ptr::null::<*const libc::c_char>(),
        )
    };
    if r == -1 {
        7
    } else {
        8
    }
}

/// What the build compiled is what compiling now gives, for this process, for every kind;
/// and there is a program for every kind (this is no cross build).
#[test]
fn the_programs_compiled_by_the_build_are_the_ones_compiled_now() {
    for kind in ThreadKind::all() {
        let ahead = compiled_ahead(kind, Action::Kill)
            .unwrap_or_else(|| panic!("{kind:?}: the build compiled no program"));
        assert_eq!(ahead, compile(kind, Action::Kill).unwrap(), "{kind:?}");
        assert_eq!(
            builtin(kind, Action::Kill).unwrap(),
            vec![ahead],
            "{kind:?}"
        );
    }
    assert!(compiled_ahead(ThreadKind::Api, Action::Log).is_none());
    assert_eq!(ahead::AHEAD.len(), ThreadKind::all().len());
}

#[test]
fn a_forbidden_syscall_kills_every_kind_of_thread() {
    for kind in ThreadKind::all() {
        let p = programs(kind, Action::Kill);
        assert_eq!(in_child(&p, try_execve), Err(libc::SIGSYS), "{kind:?}");
    }
}

#[test]
fn allowed_syscalls_go_through() {
    for kind in ThreadKind::all() {
        let p = programs(kind, Action::Kill);
        let r = in_child(&p, || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: plain syscalls on locals; fd 2 may be anything, the result is unused.
            unsafe {
                libc::getpid();
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
                libc::write(2, c"".as_ptr().cast(), 0);
                // glibc starts threads with clone3: the stacked filter answers ENOSYS.
                if libc::syscall(libc::SYS_clone3, 0usize, 0usize) != -1
                    || *libc::__errno_location() != libc::ENOSYS
                {
                    return 9;
                }
            }
            0
        });
        assert_eq!(r, Ok(0), "{kind:?}");
    }
}

#[test]
fn fork_is_refused_threads_are_not() {
    let p = programs(ThreadKind::Vcpu, Action::Kill);
    // clone without CLONE_THREAD is a fork.
    let r = in_child(&p, || {
        // SAFETY: a fork-style clone; if it ran, the grandchild exits at once.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid == 0 {
            // SAFETY: the grandchild ends at once.
            unsafe { libc::_exit(0) };
        }
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
    // A clone with CLONE_THREAD passes the filter (it fails on its invalid arguments:
    // CLONE_THREAD needs CLONE_SIGHAND and CLONE_VM).
    let r = in_child(&p, || {
        // SAFETY: the kernel refuses these flags (EINVAL) before creating anything.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::CLONE_THREAD as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        // SAFETY: reads this thread's errno.
        if r == -1 && unsafe { *libc::__errno_location() } == libc::EINVAL {
            0
        } else {
            9
        }
    });
    assert_eq!(r, Ok(0));
}

#[test]
fn ioctls_are_checked_by_number() {
    let p = programs(ThreadKind::Vcpu, Action::Kill);
    // KVM_RUN on a closed descriptor: allowed by the filter, EBADF from the kernel.
    let kvm_run = 0xae80u64;
    let r = in_child(&p, || {
        // SAFETY: an ioctl on a descriptor that is not open fails with EBADF.
        let r = unsafe { libc::ioctl(-1, kvm_run as _, 0usize) };
        if r == -1 {
            0
        } else {
            9
        }
    });
    assert_eq!(r, Ok(0));
    // TIOCSTI (push input into a terminal) is no KVM ioctl.
    let r = in_child(&p, || {
        // SAFETY: as above.
        unsafe { libc::ioctl(-1, libc::TIOCSTI as _, 0usize) };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
}

#[test]
fn socket_families_are_checked() {
    let p = programs(ThreadKind::Device(DeviceKind::Vsock), Action::Kill);
    let r = in_child(&p, || {
        // SAFETY: socket creates a descriptor that the child's exit closes.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            0
        } else {
            9
        }
    });
    assert_eq!(r, Ok(0));
    let r = in_child(&p, || {
        // SAFETY: as above.
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
}

#[test]
fn log_mode_lets_violations_through() {
    let p = programs(ThreadKind::Vcpu, Action::Log);
    assert_eq!(in_child(&p, try_execve), Ok(7));
}

#[test]
fn signals_only_to_this_process() {
    let p = programs(ThreadKind::Vcpu, Action::Kill);
    // The child's pid differs from the one the filter was built with (the parent's).
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let r = in_child(&p, || {
        // SAFETY: signal 0 to the parent's main thread checks only.
        unsafe { libc::syscall(libc::SYS_tgkill, parent, parent, 0) };
        0
    });
    assert_eq!(r, Ok(0));
    let r = in_child(&p, || {
        // SAFETY: as above, to ourselves (not the pid the filter names).
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::getpid(), 0) };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
}

const FILE: &str = r#"{
    "vmm": { "mismatch_action": "kill_process", "match_action": "allow",
             "filter": [ { "syscall": "exit_group" }, { "syscall": "write" } ] },
    "api": { "mismatch_action": "kill_process", "match_action": "allow",
             "filter": [ { "syscall": "exit_group" } ] },
    "vcpu": { "mismatch_action": "kill_process", "match_action": "allow",
             "filter": [ { "syscall": "ioctl",
                           "args": [ { "index": 1, "type": "dword", "op": "eq", "val": 44672 } ] },
                         { "syscall": "exit_group" } ] },
    "virtio-rng": { "mismatch_action": "kill_process", "match_action": "allow",
             "filter": [ { "syscall": "getrandom" }, { "syscall": "exit_group" } ] }
}"#;

#[test]
fn filter_files_compile() {
    let Policy::Custom(map) = Policy::from_json(FILE.as_bytes()).unwrap() else {
        panic!("not a custom policy");
    };
    assert_eq!(map.len(), 4);
    // The vCPU program kills on anything but KVM_RUN and exit_group.
    let vcpu = vec![map["vcpu"].clone()];
    assert_eq!(in_child(&vcpu, try_execve), Err(libc::SIGSYS));
    let r = in_child(&vcpu, || {
        // SAFETY: KVM_RUN on a closed descriptor fails with EBADF.
        unsafe { libc::ioctl(-1, 0xae80 as _, 0usize) };
        3
    });
    assert_eq!(r, Ok(3));

    let missing = FILE.replace("\"api\"", "\"apx\"");
    let e = Policy::from_json(missing.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("'api'") || e.to_string().contains("apx"));
    let unknown = FILE.replace("virtio-rng", "virtio-gpu");
    let e = Policy::from_json(unknown.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("virtio-gpu"), "{e}");
    assert!(Policy::from_json(&b"{ not json"[..]).is_err());
}

#[test]
fn worker_names_map_to_kinds() {
    assert_eq!(
        DeviceKind::from_worker_name("virtio-blk"),
        DeviceKind::Block
    );
    assert_eq!(DeviceKind::from_worker_name("virtio-net"), DeviceKind::Net);
    assert_eq!(
        DeviceKind::from_worker_name("virtio-vsock"),
        DeviceKind::Vsock
    );
    assert_eq!(
        DeviceKind::from_worker_name("virtio-pmem"),
        DeviceKind::Pmem
    );
    assert_eq!(DeviceKind::from_worker_name("counter"), DeviceKind::Other);
    for k in ThreadKind::all() {
        assert_eq!(ThreadKind::from_key(k.key()), Some(k));
    }
}

#[test]
fn unconfigured_apply_does_nothing() {
    // This test binary never calls `configure`.
    assert!(!enabled());
    apply(ThreadKind::Vcpu).unwrap();
    // Still allowed: this thread has no filter.
    assert_eq!(try_execve(), 7);
}

#[test]
fn the_net_worker_may_receive_a_new_passt_socket_with_recvmsg() {
    /// recvmsg on a descriptor that is not open: EBADF when allowed.
    fn try_recvmsg() -> i32 {
        // SAFETY: recvmsg on -1 fails with EBADF before reading the zeroed msghdr.
        let r = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            libc::recvmsg(-1, &mut msg, libc::MSG_DONTWAIT)
        };
        // SAFETY: reads this thread's errno.
        if r == -1 && unsafe { *libc::__errno_location() } == libc::EBADF {
            0
        } else {
            9
        }
    }
    let net = programs(ThreadKind::Device(DeviceKind::Net), Action::Kill);
    assert_eq!(in_child(&net, try_recvmsg), Ok(0));
    // Not the entropy device's worker.
    let rng = programs(ThreadKind::Device(DeviceKind::Rng), Action::Kill);
    assert_eq!(in_child(&rng, try_recvmsg), Err(libc::SIGSYS));
}

#[test]
fn the_pmem_worker_may_msync_and_others_may_not() {
    /// msync of an unaligned address: EINVAL when allowed.
    fn try_msync() -> i32 {
        // SAFETY: msync checks the address's alignment (1 is not page-aligned) before
        // touching any mapping.
        let r = unsafe { libc::msync(std::ptr::dangling_mut::<u8>().cast(), 1, libc::MS_SYNC) };
        // SAFETY: reads this thread's errno.
        if r == -1 && unsafe { *libc::__errno_location() } == libc::EINVAL {
            0
        } else {
            9
        }
    }
    let pmem = programs(ThreadKind::Device(DeviceKind::Pmem), Action::Kill);
    assert_eq!(in_child(&pmem, try_msync), Ok(0));
    let rng = programs(ThreadKind::Device(DeviceKind::Rng), Action::Kill);
    assert_eq!(in_child(&rng, try_msync), Err(libc::SIGSYS));
}

#[test]
fn the_mem_worker_may_set_memory_slots_and_nothing_else_of_kvm() {
    fn ioctl(nr: u64) -> impl FnOnce() -> i32 {
        move || {
            // SAFETY: an ioctl on a descriptor that is not open fails with EBADF.
            let r = unsafe { libc::ioctl(-1, nr as _, 0usize) };
            if r == -1 {
                0
            } else {
                9
            }
        }
    }
    let set_user_memory_region = 0x4020_ae46u64;
    let kvm_run = 0xae80u64;
    assert_eq!(DeviceKind::from_worker_name("virtio-mem"), DeviceKind::Mem);
    assert_eq!(
        DeviceKind::from_worker_name("virtio-fs"),
        DeviceKind::VhostUser
    );
    assert_eq!(
        DeviceKind::from_worker_name("vhost-user-blk"),
        DeviceKind::VhostUser
    );
    let mem = programs(ThreadKind::Device(DeviceKind::Mem), Action::Kill);
    assert_eq!(in_child(&mem, ioctl(set_user_memory_region)), Ok(0));
    assert_eq!(in_child(&mem, ioctl(kvm_run)), Err(libc::SIGSYS));
    // Other workers may not touch the VM's memory map.
    let rng = programs(ThreadKind::Device(DeviceKind::Rng), Action::Kill);
    assert_eq!(
        in_child(&rng, ioctl(set_user_memory_region)),
        Err(libc::SIGSYS)
    );
}

/// Firecracker's compiled filters (what `seccompiler-bin` writes) give the same programs as
/// the JSON they were compiled from; anything else is refused in Firecracker's words.
#[test]
fn compiled_filter_files_load_as_firecracker_writes_them() {
    let Policy::Custom(json) = Policy::from_json(FILE.as_bytes()).unwrap() else {
        panic!("not a custom policy");
    };
    let as_u64 = |f: &seccompiler::sock_filter| {
        u64::from(f.code) | u64::from(f.jt) << 16 | u64::from(f.jf) << 24 | u64::from(f.k) << 32
    };
    let compiled: std::collections::BTreeMap<String, Vec<u64>> = json
        .iter()
        .map(|(k, p)| (k.to_uppercase(), p.iter().map(as_u64).collect()))
        .collect();
    let bytes = bitcode::serialize(&compiled).unwrap();
    let dir = std::env::temp_dir().join(format!("vessel-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("filters.bpf");
    std::fs::write(&path, &bytes).unwrap();
    let Policy::Custom(map) = Policy::from_file(&path).unwrap() else {
        panic!("not a custom policy");
    };
    // Keys are lower-cased, as Firecracker does.
    assert_eq!(map, json);
    let vcpu = vec![map["vcpu"].clone()];
    assert_eq!(in_child(&vcpu, try_execve), Err(libc::SIGSYS));

    std::fs::write(&path, b"Invalid BPF!").unwrap();
    let e = Policy::from_file(&path).unwrap_err();
    assert!(matches!(e, Error::Deserialize(_)), "{e}");
    assert_eq!(e.to_string(), "Filter deserialization failed");
    // The JSON text still reads as JSON, leading blanks and all.
    std::fs::write(&path, format!("\n  {FILE}")).unwrap();
    assert!(matches!(Policy::from_file(&path), Ok(Policy::Custom(_))));
    let _ = std::fs::remove_dir_all(&dir);
}
