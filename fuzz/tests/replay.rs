//! Replays every seed and regression input through its target (`cargo test` in fuzz/): the
//! inputs that once crashed a target stay fixed without a fuzzing toolchain.

use std::path::Path;

#[test]
fn seeds_and_regressions_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut ran = 0;
    for &(name, target) in vessel_fuzz::TARGETS {
        for dir in ["seeds", "regressions"] {
            let Ok(rd) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in rd {
                let path = entry.unwrap().path();
                let input = std::fs::read(&path).unwrap();
                eprintln!("{name}: {}", path.display());
                target(&input);
                ran += 1;
            }
        }
    }
    assert!(
        ran > 0,
        "no seed or regression input found under {}",
        root.display()
    );
}
