//! Helper threads fail closed: a thread started with [`vessel_seccomp::spawn`] that cannot
//! install its filter never runs its body, and the caller gets the error. (A test binary of
//! its own: `configure` is once per process.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vessel_seccomp::{Policy, ThreadKind};

#[test]
fn a_thread_that_cannot_install_its_filter_never_runs() {
    // An empty program for the API threads: installing it fails (seccompiler refuses an empty
    // filter before the kernel sees it). The VMM threads have none: they install nothing.
    let map = HashMap::from([("api".to_string(), Vec::new())]);
    vessel_seccomp::configure(Policy::Custom(map)).unwrap();

    let ran = Arc::new(AtomicBool::new(false));
    let r = vessel_seccomp::spawn("api-helper", ThreadKind::Api, {
        let ran = ran.clone();
        move || ran.store(true, Ordering::SeqCst)
    });
    let err = r.expect_err("a thread without its filter was started");
    assert!(
        err.to_string().contains("api-helper") && err.to_string().contains("filter"),
        "{err}"
    );
    // `spawn` joined the thread before answering: its body never ran.
    assert!(!ran.load(Ordering::SeqCst));

    // A thread whose filter installs runs its body and hands back its result.
    let h = vessel_seccomp::spawn("vmm-helper", ThreadKind::Vmm, || 42).unwrap();
    assert_eq!(h.join().unwrap(), Some(42));
}
