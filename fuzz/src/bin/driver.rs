//! The stable in-process fuzz driver: for each target, replays its corpus
//! (`fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`), then feeds it mutated corpus inputs and random inputs for the
//! given time, and prints the runs. No coverage feedback (that needs `cargo fuzz`); inputs
//! that made a target panic are written to `fuzz/artifacts/<target>/` and the driver exits 1.
//!
//! `fuzz-driver SECONDS [TARGET...]` (all targets when none is named).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static WORKER_PANICKED: AtomicBool = AtomicBool::new(false);

/// A run that takes longer than this is a hang: the watchdog saves its input and aborts.
const HANG: Duration = Duration::from_secs(20);

/// The run in progress, for the watchdog: target, input, start.
static CURRENT: Mutex<Option<(&'static str, Vec<u8>, Instant)>> = Mutex::new(None);

/// xorshift64*: enough randomness for mutation, no dependency.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
    u64::MAX - 1,
];

fn mutate(r: &mut Rand, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let n = 1 + r.below(8);
    for _ in 0..n {
        match r.below(8) {
            0 if !input.is_empty() => {
                let i = r.below(input.len());
                input[i] ^= 1 << r.below(8);
            }
            1 if !input.is_empty() => {
                let i = r.below(input.len());
                input[i] = r.next() as u8;
            }
            2 => {
                let i = r.below(input.len() + 1);
                let k = 1 + r.below(16);
                for _ in 0..k {
                    input.insert(i.min(input.len()), r.next() as u8);
                }
            }
            3 if !input.is_empty() => {
                let i = r.below(input.len());
                let k = (1 + r.below(16)).min(input.len() - i);
                input.drain(i..i + k);
            }
            4 if input.len() >= 8 => {
                let i = r.below(input.len() - 7);
                let v = INTERESTING[r.below(INTERESTING.len())];
                let w = [1usize, 2, 4, 8][r.below(4)];
                input[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            5 if !corpus.is_empty() => {
                // Splice with another corpus input.
                let other = &corpus[r.below(corpus.len())];
                if !other.is_empty() {
                    let a = r.below(other.len());
                    let b = a + r.below(other.len() - a + 1);
                    let at = r.below(input.len() + 1);
                    input.splice(at..at, other[a..b].iter().copied());
                }
            }
            6 if input.len() > 1 => {
                // Copy a block within the input.
                let a = r.below(input.len());
                let b = (a + 1 + r.below(32)).min(input.len());
                let chunk = input[a..b].to_vec();
                let at = r.below(input.len());
                for (k, &c) in chunk.iter().enumerate() {
                    if at + k < input.len() {
                        input[at + k] = c;
                    }
                }
            }
            _ => input.truncate(r.below(input.len() + 1)),
        }
    }
    input.truncate(1 << 16);
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            if let Ok(b) = std::fs::read(&p) {
                v.push(b);
            }
        }
    }
    v
}

fn save_crash(root: &Path, target: &str, input: &[u8]) -> PathBuf {
    let dir = root.join("artifacts").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let p = dir.join(format!("crash-{h:016x}"));
    let _ = std::fs::write(&p, input);
    p
}

/// Runs the target on one input; false when it panicked (on this thread or a worker).
fn run_one(name: &'static str, f: fn(&[u8]), input: &[u8]) -> bool {
    if let Ok(mut c) = CURRENT.lock() {
        *c = Some((name, input.to_vec(), Instant::now()));
    }
    let ok = catch_unwind(AssertUnwindSafe(|| f(input))).is_ok();
    let panicked = WORKER_PANICKED.swap(false, Ordering::SeqCst);
    ok && !panicked
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let wanted: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        WORKER_PANICKED.store(true, Ordering::SeqCst);
        default_hook(info);
    }));
    let watchdog_root = root.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let Ok(c) = CURRENT.lock() else { continue };
        if let Some((name, input, start)) = c.as_ref() {
            if start.elapsed() > HANG {
                let p = save_crash(&watchdog_root, name, input);
                eprintln!("{name}: an input ran for over {HANG:?} (a hang), saved to {p:?}");
                std::process::abort();
            }
        }
    });
    let mut failed = false;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    for &(name, f) in vessel_fuzz::TARGETS {
        if !wanted.is_empty() && !wanted.contains(&name) {
            continue;
        }
        let mut corpus = load_corpus(&root.join("seeds").join(name));
        corpus.extend(load_corpus(&root.join("regressions").join(name)));
        let mut r = Rand(seed ^ name.len() as u64);
        let start = Instant::now();
        let mut runs = 0u64;
        let mut crashes = 0u64;
        for input in &corpus {
            runs += 1;
            if !run_one(name, f, input) {
                crashes += 1;
                eprintln!(
                    "{name}: corpus input crashed: {:?}",
                    save_crash(&root, name, input)
                );
            }
        }
        let budget = Duration::from_secs_f64(secs);
        while start.elapsed() < budget && crashes < 5 {
            let mut input = if corpus.is_empty() || r.below(8) == 0 {
                (0..r.below(512)).map(|_| r.next() as u8).collect()
            } else {
                corpus[r.below(corpus.len())].clone()
            };
            mutate(&mut r, &mut input, &corpus);
            runs += 1;
            if !run_one(name, f, &input) {
                crashes += 1;
                eprintln!(
                    "{name}: crash saved to {:?}",
                    save_crash(&root, name, &input)
                );
            }
        }
        let t = start.elapsed().as_secs_f64();
        println!(
            "{name:16} runs {runs:>9}  time {t:6.1} s  {:>9.0} runs/s  crashes {crashes}",
            runs as f64 / t.max(1e-9)
        );
        failed |= crashes > 0;
    }
    if failed {
        std::process::exit(1);
    }
}
