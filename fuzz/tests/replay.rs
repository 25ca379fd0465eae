//! Replays every seed and regression input through its target (`cargo test` in fuzz/): the
//! inputs that once crashed a target stay fixed without a fuzzing toolchain.
//!
//! Beyond "it returned", it checks what the inputs are for: every target has inputs and
//! every one of them ran, each regression input is replayed, no input makes its target hold
//! more than [`ALLOC_LIMIT`] of heap (a counting allocator; the `snapshot_frame` finding
//! allocated 64 MiB for a 9-byte header), and every `virtio_*` seed gets the device to return
//! at least one chain (the seeds reach request handling, not just the first gate).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Heap one input may make its target hold at once, above what was held before it.
const ALLOC_LIMIT: usize = 16 << 20;

/// The system allocator, counting the bytes held and their peak.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are only
// bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (that is, the system's) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = HELD.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn seeds_and_regressions_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Every regression directory names a target (a misspelt one would never be replayed).
    for dir in inputs(&root.join("regressions")) {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            vessel_fuzz::TARGETS.iter().any(|(t, _)| *t == name),
            "regressions/{name} is not a target"
        );
    }
    let mut regressions = 0;
    for &(name, target) in vessel_fuzz::TARGETS {
        let device = vessel_fuzz::DEVICE_TARGETS
            .iter()
            .find(|(t, _)| *t == name)
            .map(|&(_, k)| k);
        let mut ran = 0;
        for dir in ["seeds", "regressions"] {
            for path in inputs(&root.join(dir).join(name)) {
                let input = std::fs::read(&path).unwrap();
                let before = HELD.load(Ordering::Relaxed);
                PEAK.store(before, Ordering::Relaxed);
                let report = match device {
                    Some(kind) => vessel_fuzz::devices::run_reported(kind, &input),
                    None => {
                        target(&input);
                        None
                    }
                };
                let grew = PEAK.load(Ordering::Relaxed).saturating_sub(before);
                eprintln!("{name}: {} (peak heap +{grew} bytes)", path.display());
                assert!(
                    grew <= ALLOC_LIMIT,
                    "{}: the target held {grew} bytes of heap",
                    path.display()
                );
                if let (Some(kind), "seeds") = (device, dir) {
                    match report {
                        // No TAP on this host: the net device is not there to check.
                        None if kind == vessel_fuzz::devices::Kind::Net => {}
                        r => {
                            let r = r.unwrap_or_else(|| {
                                panic!("{}: the seed does not decode", path.display())
                            });
                            assert!(
                                r.activated && r.used > 0,
                                "{}: the device returned no chain ({r:?})",
                                path.display()
                            );
                        }
                    }
                }
                ran += 1;
                if dir == "regressions" {
                    regressions += 1;
                }
            }
        }
        assert!(ran > 0, "{name}: no seed or regression input");
    }
    // The two findings so far (fuzz/README.md): both kept.
    for path in ["virtio_vsock", "snapshot_frame"] {
        assert!(
            !inputs(&root.join("regressions").join(path)).is_empty(),
            "regressions/{path} is empty"
        );
    }
    assert_eq!(
        regressions,
        inputs(&root.join("regressions"))
            .iter()
            .map(|d| inputs(d).len())
            .sum::<usize>(),
        "every regression input is replayed"
    );
}
