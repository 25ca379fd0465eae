//! Exit-handling cost: a guest that reads the i8042 status port N times, run through Vessel's
//! whole VMM (bus lookup, device lock, exit loop), against a bare `KVM_RUN` loop in this
//! process that answers the same port with a constant. Prints figures; asserts nothing.
//!
//!   cargo bench -p vessel --bench exits

#[path = "../tests/common/bare.rs"]
mod bare;
#[path = "../tests/common/tinyguest.rs"]
#[allow(dead_code)]
mod tinyguest;

use std::time::Duration;

use bare::bare_once;
use tinyguest::elf;
use vessel_vmm::{NestedMode, Payload, SerialTarget, VmConfig};

const EXITS: u32 = 100_000;
const REPS: usize = 5;

fn guest(n: u32) -> Vec<u8> {
    bare::port_reader(n, false)
}

fn vessel_once(path: &std::path::Path) -> Duration {
    let cfg = VmConfig {
        boot: Payload::Linux {
            kernel: path.to_path_buf(),
            initrd: None,
            system_map: None,
        },
        cmdline: Some(String::new()),
        memory: 64 << 20,
        serial: SerialTarget::Null,
        nested: NestedMode::Off,
        ..Default::default()
    };
    vessel_vmm::run(&cfg).expect("vessel run").stats.wall
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("vessel-bench-exits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let zero = dir.join("zero.elf");
    let many = dir.join("many.elf");
    std::fs::write(&zero, elf(&guest(0))).unwrap();
    std::fs::write(&many, elf(&guest(EXITS))).unwrap();

    let v0 = median((0..REPS).map(|_| vessel_once(&zero)).collect());
    let vn = median((0..REPS).map(|_| vessel_once(&many)).collect());
    let b0 = median((0..REPS).map(|_| bare_once(&guest(0))).collect());
    let bn = median((0..REPS).map(|_| bare_once(&guest(EXITS))).collect());
    let per = |a: Duration, b: Duration| (a.saturating_sub(b)).as_secs_f64() * 1e6 / EXITS as f64;
    let vessel_us = per(vn, v0);
    let bare_us = per(bn, b0);
    println!("exits: {EXITS} i8042 status reads, median of {REPS}");
    println!(
        "exits: vessel     total {:8.1} ms  per exit {:6.2} us",
        vn.as_secs_f64() * 1e3,
        vessel_us
    );
    println!(
        "exits: bare loop  total {:8.1} ms  per exit {:6.2} us",
        bn.as_secs_f64() * 1e3,
        bare_us
    );
    println!(
        "exits: vessel / bare = {:.3} ({:+.1}%)",
        vessel_us / bare_us,
        (vessel_us / bare_us - 1.0) * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
