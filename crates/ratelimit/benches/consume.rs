//! Cost of asking a limiter per request (what a device pays for each chain): without any
//! limit (an atomic load) and with both buckets set and never refusing (a lock, a clock read
//! and the arithmetic). Prints nanoseconds per call.

use std::hint::black_box;
use std::time::Instant;

use vessel_ratelimit::{BucketConfig, RateLimiter, RateLimiterConfig};

fn per_call(l: &RateLimiter, n: u32) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        black_box(l.try_consume(black_box(1), black_box(4096)));
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let n = 5_000_000;
    let unlimited = RateLimiter::unlimited().expect("timerfd");
    let huge = BucketConfig::per_second(u64::MAX >> 2);
    let limited = RateLimiter::new(&RateLimiterConfig {
        bandwidth: Some(huge),
        ops: Some(huge),
    })
    .expect("timerfd");
    // Warm up.
    per_call(&unlimited, n / 10);
    per_call(&limited, n / 10);
    println!(
        "try_consume, no limit:      {:6.1} ns/call",
        per_call(&unlimited, n)
    );
    println!(
        "try_consume, both buckets:  {:6.1} ns/call",
        per_call(&limited, n)
    );
}
