use std::time::{Duration, Instant};

use super::*;
use crate::net::passt::tests::{dhcp_discover, passt_installed, wait_dhcp_reply};
use crate::net::PasstStream;

const ENTRY: &str = "net::passt::keeper::tests::keeper_process";
const FD_VAR: &str = "VESSEL_TEST_PASST_KEEPER_FD";
const PROGRAM_VAR: &str = "VESSEL_TEST_PASST_KEEPER_PROGRAM";

/// Not a test: the keeper itself, when this test binary is started as one (by
/// [`test_keeper`]) with the control socket's number in the environment.
#[test]
fn keeper_process() {
    let Ok(fd) = std::env::var(FD_VAR) else {
        return;
    };
    let program = std::env::var(PROGRAM_VAR).unwrap_or_else(|_| "passt".into());
    std::process::exit(keeper_main(fd.parse().unwrap(), Path::new(&program), &[]));
}

/// This test binary, run as a keeper of `program`.
fn test_keeper(program: &str) -> impl FnOnce(RawFd) -> Command + '_ {
    move |fd| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([ENTRY, "--exact", "--nocapture", "--test-threads=1"])
            .env(FD_VAR, fd.to_string())
            .env(PROGRAM_VAR, program);
        c
    }
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is as good as gone: its parent reaps it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn backoff_doubles_up_to_thirty_seconds() {
    let mut d = BACKOFF_START;
    let mut seen = vec![d.as_secs()];
    for _ in 0..7 {
        d = next_backoff(d);
        seen.push(d.as_secs());
    }
    assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30, 30]);
}

#[test]
fn a_killed_passt_is_replaced_and_the_new_stream_works() {
    if !passt_installed() {
        eprintln!("skipped: passt is not installed (apt-get install passt)");
        return;
    }
    let (mut keeper, control, pid, sock) = PasstKeeper::spawn(test_keeper("passt")).unwrap();
    let mut s = PasstStream::new(sock).unwrap();
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x60];
    assert!(s.queue_bytes(&dhcp_discover(mac, 1)));
    s.flush().unwrap();
    assert_eq!(
        wait_dhcp_reply(&mut s, 1),
        2,
        "DHCPOFFER from the first passt"
    );
    assert!(pid_alive(pid));

    // SAFETY: kill takes plain integers; `pid` is the keeper's child, alive above.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let started = Instant::now();
    wait_until("the old stream did not end", 5, || s.peek_frame().is_err());
    let mut next = None;
    wait_until("no new passt within 5 s", 5, || {
        match control.recv(false).unwrap() {
            Some(KeeperMsg::Passt { pid, sock }) => next = Some((pid, sock)),
            Some(KeeperMsg::Failed(m)) => panic!("the keeper failed: {m}"),
            None => {}
        }
        next.is_some()
    });
    let (pid2, sock2) = next.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "restarted after the backoff"
    );
    assert_ne!(pid2, pid);
    let mut s2 = PasstStream::new(sock2).unwrap();
    assert!(s2.queue_bytes(&dhcp_discover(mac, 2)));
    s2.flush().unwrap();
    assert_eq!(
        wait_dhcp_reply(&mut s2, 2),
        2,
        "DHCPOFFER from the new passt"
    );

    // Closing the control socket ends the keeper, which stops passt.
    drop(control);
    wait_until("the keeper outlived its control socket", 5, || {
        keeper.has_exited()
    });
    wait_until("passt outlived its keeper", 5, || !pid_alive(pid2));
}

#[test]
fn a_missing_passt_is_named_by_the_keeper() {
    let r = PasstKeeper::spawn(test_keeper("/nonexistent/passt"));
    assert!(matches!(r, Err(PasstError::NotInstalled)), "{r:?}");
}
