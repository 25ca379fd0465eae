//! Starting the VMM once the jail is built, in Firecracker's jailer's process model: no jailer
//! process stays beside the VMM.
//!
//! - Plainly, the jailer writes its own pid to `/<exec name>.pid` and execs the VMM: the
//!   process the caller started becomes the VMM (same pid, its exit status the VMM's).
//! - With `--new-pid-ns`, it forks into a new PID namespace; the child (PID 1 there) execs the
//!   VMM, and the parent writes the child's pid (as the host sees it) to the pid file and
//!   exits 0. A jailer that leads its session makes the child lead a new one, so that its own
//!   exit sends the VMM no SIGHUP.
//! - With `--daemonize`, first a double fork: the child calls setsid(), the grandchild puts
//!   stdio on `/dev/null` and goes on as above; the caller's process exits 0 once the VMM runs.
//!
//! Unlike Firecracker's jailer, a failure before the exec is never lost in a forked process:
//! each fork's parent reads a close-on-exec pipe to its end, so it returns either once the VMM
//! has exec'd (the pipe closes) or with the child's error.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{PipeReader, PipeWriter, Read, Write};
use std::os::fd::AsRawFd;

use crate::cgroup::VmCgroup;
use crate::place::{self, JailDir};
use crate::{io_err, sys, JailArgs, JailError, Plan};

/// Starts the VMM. Returns `Ok` only in a process that is not the VMM and should now exit 0
/// (the caller's process with `--daemonize` or `--new-pid-ns`).
pub(crate) fn launch(
    plan: &Plan,
    args: &JailArgs,
    cgroups: &[VmCgroup],
    dev_null: Option<File>,
) -> Result<(), JailError> {
    let mut report = None;
    if let Some(null) = &dev_null {
        let (reader, writer) = std::io::pipe().map_err(io_err("create a pipe"))?;
        match sys::fork().map_err(io_err("Failed to daemonize"))? {
            sys::Fork::Parent(child) => {
                drop(writer);
                let r = read_report(reader);
                // The child exits as soon as it has forked the daemon.
                let _ = sys::wait_exit_code(child);
                return r;
            }
            sys::Fork::Child => {
                drop(reader);
                report = Some(writer);
            }
        }
        if let Err(e) = detach(null) {
            fail(report, e);
        }
    }
    let started = if args.new_pid_ns {
        exec_in_new_pid_ns(plan, args, cgroups, report.is_some())
    } else {
        exec_here(plan, args, cgroups)
    };
    match (report, started) {
        (None, r) => r,
        (Some(_), Ok(())) => exit(0),
        (Some(w), Err(e)) => fail(Some(w), e),
    }
}

/// `_exit`: a forked process leaves without running the parent's exit handlers.
fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; nothing of this process is needed after it.
    unsafe { libc::_exit(code) }
}

/// In a forked process: hand `e` to the parent on `report`, and exit.
fn fail(report: Option<PipeWriter>, e: JailError) -> ! {
    if let Some(mut w) = report {
        // Best effort: if the parent is gone there is nobody left to tell.
        let _ = w.write_all(e.to_string().as_bytes());
    }
    exit(1)
}

/// Reads the pipe to its end: nothing means the other side exec'd (or exited) cleanly.
fn read_report(mut r: PipeReader) -> Result<(), JailError> {
    let mut failure = String::new();
    r.read_to_string(&mut failure)
        .map_err(io_err("read the VMM's exec status"))?;
    if failure.is_empty() {
        Ok(())
    } else {
        Err(JailError::Invalid(failure))
    }
}

/// The rest of the double fork, in its first child: a new session, then the grandchild (not
/// a session leader, so it can never get a controlling terminal) goes on with stdio on
/// `/dev/null`.
fn detach(null: &File) -> Result<(), JailError> {
    sys::setsid().map_err(io_err("Failed to daemonize: setsid"))?;
    match sys::fork().map_err(io_err("Failed to daemonize"))? {
        sys::Fork::Parent(_) => exit(0),
        sys::Fork::Child => {}
    }
    for fd in 0..3 {
        sys::dup2(null.as_raw_fd(), fd).map_err(io_err("Failed to duplicate fd"))?;
    }
    Ok(())
}

fn pid_file_name(plan: &Plan) -> String {
    format!("{}.pid", plan.exec_name)
}

/// Without a new PID namespace: this process writes its pid and becomes the VMM.
fn exec_here(plan: &Plan, args: &JailArgs, cgroups: &[VmCgroup]) -> Result<(), JailError> {
    let root = JailDir::open(std::path::Path::new("/"))?;
    let name = pid_file_name(plan);
    place::write_pid_file(&root, OsStr::new(&name), std::process::id() as libc::pid_t)?;
    let e = exec_vmm(plan, args, cgroups);
    // The VMM never ran: no pid file for it.
    let _ = std::fs::remove_file(root.path().join(&name));
    Err(e)
}

/// With `--new-pid-ns`: fork into a new PID namespace, wait for the child's exec, write its
/// pid. Returns in the parent, which then exits.
fn exec_in_new_pid_ns(
    plan: &Plan,
    args: &JailArgs,
    cgroups: &[VmCgroup],
    daemonized: bool,
) -> Result<(), JailError> {
    // A daemonized jailer is never a session leader (the double fork made sure of it).
    let leader = !daemonized && sys::is_session_leader().map_err(io_err("getsid"))?;
    sys::unshare(libc::CLONE_NEWPID).map_err(io_err("unshare the PID namespace"))?;
    let (reader, mut writer) = std::io::pipe().map_err(io_err("create a pipe"))?;
    match sys::fork().map_err(io_err("Failed cloning into a new child process"))? {
        sys::Fork::Child => {
            drop(reader);
            let e = if leader {
                match sys::setsid() {
                    Ok(()) => exec_vmm(plan, args, cgroups),
                    Err(e) => io_err("Failed to daemonize: setsid")(e),
                }
            } else {
                exec_vmm(plan, args, cgroups)
            };
            let _ = writer.write_all(e.to_string().as_bytes());
            exit(1)
        }
        sys::Fork::Parent(pid) => {
            drop(writer);
            if let Err(e) = read_report(reader) {
                let _ = sys::wait_exit_code(pid);
                return Err(e);
            }
            let root = JailDir::open(std::path::Path::new("/"))?;
            if let Err(e) = place::write_pid_file(&root, OsStr::new(&pid_file_name(plan)), pid) {
                // A VMM nobody can find is stopped rather than left behind.
                let _ = sys::kill(pid, libc::SIGKILL);
                let _ = sys::wait_exit_code(pid);
                return Err(e);
            }
            Ok(())
        }
    }
}

/// Join the cgroups, drop to the uid/gid, exec the VMM with an empty environment. Returns
/// only on failure.
fn exec_vmm(plan: &Plan, args: &JailArgs, cgroups: &[VmCgroup]) -> JailError {
    let run = || -> Result<std::convert::Infallible, JailError> {
        for cg in cgroups {
            cg.join()
                .map_err(io_err(format!("join the cgroup {}", cg.path.display())))?;
        }
        sys::drop_privileges(args.uid, args.gid).map_err(io_err(format!(
            "switch to uid {} gid {}",
            args.uid, args.gid
        )))?;
        let path = sys::cstr(&std::path::Path::new("/").join(&plan.exec_name))
            .map_err(io_err("exec path"))?;
        let e = sys::execve(&path, &plan.argv, &[]);
        Err(io_err(format!("exec /{}", plan.exec_name))(e))
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
