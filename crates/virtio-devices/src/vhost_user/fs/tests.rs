//! virtio-fs against the real `virtiofsd` (installed by the test script; these tests need it
//! when `VESSEL_E2E` is set and are skipped with a message otherwise), over mock queues in
//! `memfd`-backed guest memory: a FUSE_INIT request goes through the backend and its answer
//! comes back in the used ring with an interrupt.

use std::sync::Arc;

use vessel_memory::{create_guest_memory_backed, Backing, GuestLayout, GuestMemoryMmap};
use vessel_virtio::{InterruptCause, VirtioDevice};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::rng::testing::*;

fn have_virtiofsd() -> bool {
    match crate::vhost_user::virtiofsd::locate() {
        Ok(_) => true,
        Err(e) if std::env::var_os("VESSEL_E2E").is_some() => panic!("{e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn shared_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-fs-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fs_on(dir: &std::path::Path) -> Fs {
    Fs::new(&FsParams {
        tag: "hostshare".into(),
        backend: FsBackend::Dir {
            path: dir.to_path_buf(),
            read_only: false,
        },
        request_queues: 1,
    })
    .unwrap()
}

fn shared_mem() -> GuestMemoryMmap {
    create_guest_memory_backed(&GuestLayout::new(16 << 20).unwrap(), &[], Backing::Shared).unwrap()
}

const FUSE_INIT: u32 = 26;
const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x11_0000;

/// A FUSE_INIT request (header and `fuse_init_in` of protocol 7.31).
fn fuse_init(unique: u64) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&(40u32 + 16).to_le_bytes()); // len
    r.extend_from_slice(&FUSE_INIT.to_le_bytes()); // opcode
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    r.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
    r.extend_from_slice(&7u32.to_le_bytes()); // major
    r.extend_from_slice(&31u32.to_le_bytes()); // minor
    r.extend_from_slice(&0x2_0000u32.to_le_bytes()); // max_readahead
    r.extend_from_slice(&0u32.to_le_bytes()); // flags
    r
}

#[test]
fn a_fuse_request_goes_through_virtiofsd_and_is_answered() {
    if !have_virtiofsd() {
        return;
    }
    let dir = shared_dir("init");
    let mut dev = fs_on(&dir);
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_ne!(dev.avail_features() & features::VERSION_1, 0);
    // The configuration space: the tag, NUL-padded to 36 bytes, then one request queue.
    let mut config = [0xffu8; 44];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..9], b"hostshare");
    assert!(config[9..36].iter().all(|&b| b == 0));
    assert_eq!(&config[36..40], &1u32.to_le_bytes());
    assert_eq!(&config[40..], &[0; 4], "past the end reads as zero");

    let mem = shared_mem();
    let hiprio = MockSplitQueue::create(&mem, queue_base(0), 16);
    let requests = MockSplitQueue::create(&mem, queue_base(4), 16);
    let irq = Arc::new(CountingInterrupt::default());
    let queues = vec![active_queue(&hiprio, 0), active_queue(&requests, 1)];
    let kick = queues[1].kick.try_clone().unwrap();
    dev.activate(context(&mem, dev.avail_features(), queues, &irq))
        .unwrap();

    mem.write_slice(&fuse_init(0x77), GuestAddress(REQ))
        .unwrap();
    add_chain(&requests, 0, &[(REQ, 56, false), (REPLY, 256, true)]);
    kick.write(1).unwrap();
    wait_until("the FUSE_INIT answer", || !used(&requests).is_empty());
    wait_until("the request queue's interrupt", || {
        irq.count(InterruptCause::Queue(1)) > 0
    });
    let (head, len) = used(&requests)[0];
    assert_eq!(head, 0);
    let out = read_bytes(&mem, REPLY, len as usize);
    assert!(len >= 16 + 24, "{len} bytes");
    assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), len);
    assert_eq!(
        i32::from_le_bytes(out[4..8].try_into().unwrap()),
        0,
        "error"
    );
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 0x77);
    assert_eq!(
        u32::from_le_bytes(out[16..20].try_into().unwrap()),
        7,
        "major"
    );
    assert_eq!(irq.count(InterruptCause::Queue(0)), 0);

    // A reset stops the backend's queues; the device can be activated again.
    assert!(dev.reset());
    let queues = vec![active_queue(&hiprio, 0), active_queue(&requests, 1)];
    dev.activate(context(&mem, dev.avail_features(), queues, &irq))
        .unwrap();
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backend_that_dies_marks_the_device_broken() {
    if !have_virtiofsd() {
        return;
    }
    let dir = shared_dir("death");
    let mut dev = fs_on(&dir);
    let pid = dev._process.as_ref().unwrap().id();
    let mem = shared_mem();
    let hiprio = MockSplitQueue::create(&mem, queue_base(0), 16);
    let requests = MockSplitQueue::create(&mem, queue_base(4), 16);
    let irq = Arc::new(CountingInterrupt::default());
    let ctx = context(
        &mem,
        dev.avail_features(),
        vec![active_queue(&hiprio, 0), active_queue(&requests, 1)],
        &irq,
    );
    let health = ctx.health.clone();
    dev.activate(ctx).unwrap();
    assert!(!health.is_broken());
    // SAFETY: kill takes plain integers; the child is not reaped, so the pid is its own.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    wait_until("the device to be marked broken", || health.is_broken());
    wait_until("the config interrupt", || {
        irq.count(InterruptCause::Config) > 0
    });
    // Stopping a device whose backend is gone neither hangs nor panics.
    assert!(dev.reset());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn private_guest_memory_is_refused_at_activation() {
    if !have_virtiofsd() {
        return;
    }
    let dir = shared_dir("private");
    let mut dev = fs_on(&dir);
    let mem = mem();
    let hiprio = MockSplitQueue::create(&mem, queue_base(0), 16);
    let requests = MockSplitQueue::create(&mem, queue_base(4), 16);
    let irq = Arc::new(CountingInterrupt::default());
    let queues = vec![active_queue(&hiprio, 0), active_queue(&requests, 1)];
    let err = dev
        .activate(context(&mem, dev.avail_features(), queues, &irq))
        .unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("not shared memory"), "{chain}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_parameters_are_refused_before_anything_starts() {
    let params = |tag: &str, q: u16, dir: &str| FsParams {
        tag: tag.into(),
        backend: FsBackend::Dir {
            path: dir.into(),
            read_only: false,
        },
        request_queues: q,
    };
    let err = |p: FsParams| Fs::new(&p).err().unwrap().to_string();
    assert!(err(params("", 1, "/tmp")).contains("tag must be 1 to 36 bytes"));
    assert!(err(params(&"x".repeat(37), 1, "/tmp")).contains("tag must be"));
    assert!(err(params("a\0b", 1, "/tmp")).contains("tag must be"));
    assert!(err(params("ok", 0, "/tmp")).contains("request queues must be 1 to 16"));
    assert!(err(params("ok", 17, "/tmp")).contains("request queues"));
    // A socket nobody listens on.
    let e = Fs::new(&FsParams {
        tag: "ok".into(),
        backend: FsBackend::Socket("/nonexistent/vessel-fs.sock".into()),
        request_queues: 1,
    })
    .err()
    .unwrap();
    assert!(
        e.to_string()
            .contains("cannot connect to the vhost-user backend at /nonexistent/vessel-fs.sock"),
        "{e}"
    );
    // A program that is not there, and a directory that is not one.
    use crate::vhost_user::virtiofsd::{Virtiofsd, VirtiofsdError};
    let missing = Virtiofsd::spawn(
        std::path::Path::new("/nonexistent/virtiofsd"),
        std::path::Path::new("/tmp"),
        false,
    );
    assert!(matches!(missing, Err(VirtiofsdError::NotInstalled)));
    assert!(VirtiofsdError::NotInstalled
        .to_string()
        .contains("cargo install virtiofsd"));
    let not_dir = Virtiofsd::spawn(
        std::path::Path::new("/bin/true"),
        std::path::Path::new("/nonexistent/share"),
        false,
    );
    assert!(matches!(not_dir, Err(VirtiofsdError::NotADirectory(_))));
}
