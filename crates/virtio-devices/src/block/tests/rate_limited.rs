//! The rate limiter on the block queue: a fake clock drives the limiter, the test plays the
//! driver (keeping requests outstanding) and the worker (firing the limiter's timer).

use super::*;
use crate::net::testutil::Ring;
use std::time::Duration;
use vessel_ratelimit::{BucketConfig, Clock, FakeClock, RateLimiter, RateLimiterConfig};

both_engines!(
    ops_limit_holds_and_the_queue_resumes_on_the_timer,
    bandwidth_limit_holds,
);

const RING: u64 = 0x10_0000;
const HDRS: u64 = 0x12_0000;
const STATUSES: u64 = 0x13_0000;
const BUFS: u64 = 0x14_0000;
const SLOTS: u64 = 32;
const OUTSTANDING: u64 = 16;

/// The driver's side: keeps `OUTSTANDING` reads of `len` bytes in the queue.
struct Driver<'a> {
    m: &'a GuestMemoryMmap,
    ring: Ring<'a>,
    len: u32,
    issued: u64,
    done: u64,
}

impl Driver<'_> {
    fn fill(&mut self, total: u64) {
        while self.issued - self.done < OUTSTANDING && self.issued < total {
            let slot = self.issued % SLOTS;
            let hdr = HDRS + slot * 16;
            header(self.m, hdr, VIRTIO_BLK_T_IN, slot * 16);
            self.ring.add(&[
                (hdr, 16, false),
                (BUFS + slot * 8192, self.len, true),
                (STATUSES + slot, 1, true),
            ]);
            self.issued += 1;
        }
    }

    fn collect(&mut self) {
        while let Some((_, len)) = self.ring.next_used() {
            assert_eq!(len, self.len + 1, "every read completes in full");
            self.done += 1;
        }
    }
}

fn limited(cfg: RateLimiterConfig) -> (Block, TempImage, RateLimiter, FakeClock) {
    let img = TempImage::new(1 << 20);
    let mut b = block(&img, true);
    let clock = FakeClock::new();
    let limiter = RateLimiter::with_clock(&cfg, Arc::new(clock.clone())).unwrap();
    b.set_rate_limiter(limiter.clone());
    (b, img, limiter, clock)
}

fn server_on<'a>(b: &Block, m: &'a GuestMemoryMmap) -> (QueueServer, Ring<'a>) {
    let ring = Ring::new(m, RING, 256);
    let irq = Arc::new(Irq::default());
    let ctx = ActivateContext {
        mem: m.clone(),
        acked_features: b.avail_features(),
        queues: vec![ring.active(0)],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq),
    };
    (b.queue_server(ctx).unwrap(), ring)
}

/// Serves `total` reads of `len` bytes, moving the fake clock `step` on (and firing the
/// limiter's timer) whenever the queue is throttled. Returns the fake time taken.
fn run(b: &Block, limiter: &RateLimiter, clock: &FakeClock, total: u64, len: u32) -> Duration {
    let m = mem();
    let (mut server, ring) = server_on(b, &m);
    let mut d = Driver {
        m: &m,
        ring,
        len,
        issued: 0,
        done: 0,
    };
    let step = Duration::from_millis(1);
    let mut rounds = 0;
    while d.done < total {
        rounds += 1;
        assert!(rounds < 10_000_000, "no progress");
        d.fill(total);
        server.process_until_idle();
        d.collect();
        if server.throttled() {
            assert!(limiter.is_blocked());
            clock.advance(step);
            limiter.on_timer();
        }
    }
    assert_eq!(server.in_flight(), 0);
    clock.now()
}

fn within(actual: f64, expected: f64, pct: f64) -> bool {
    (actual - expected).abs() <= expected * pct / 100.0
}

fn ops_limit_holds_and_the_queue_resumes_on_the_timer() {
    // 200 requests/s with a 20-request bucket.
    let cfg = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 20,
            one_time_burst: 0,
            refill_time_ms: 100,
        }),
    };
    let (b, _img, limiter, clock) = limited(cfg);
    // The first bucketful goes at once, then the queue waits for the timer.
    let m = mem();
    let (mut server, ring) = server_on(&b, &m);
    let mut d = Driver {
        m: &m,
        ring,
        len: 512,
        issued: 0,
        done: 0,
    };
    let mut served = 0;
    while !server.throttled() {
        assert!(d.issued < 40, "never throttled");
        d.fill(40);
        served += server.process_until_idle();
        d.collect();
    }
    assert_eq!(served, 20);
    // Kicks (and time) alone do not serve anything before the timer fires.
    clock.advance(Duration::from_millis(50));
    assert_eq!(server.process_until_idle(), 0);
    assert!(server.throttled());
    limiter.on_timer();
    // 50 ms refilled 10 requests.
    assert_eq!(server.process_until_idle(), 10);
    assert!(server.throttled());
    drop(server);

    // 1000 requests take (1000 - 20) / 200 s.
    let (b, _img, limiter, clock) = limited(cfg);
    let t = run(&b, &limiter, &clock, 1000, 512).as_secs_f64();
    assert!(within(t, 4.9, 2.0), "{t} s for 4.9 s");
}

fn bandwidth_limit_holds() {
    // 1 MB/s with a 64 KB bucket, 8 KiB reads; a generous ops limit that never binds.
    let cfg = RateLimiterConfig {
        bandwidth: Some(BucketConfig {
            size: 64_000,
            one_time_burst: 0,
            refill_time_ms: 64,
        }),
        ops: Some(BucketConfig::per_second(1_000_000)),
    };
    let (b, _img, limiter, clock) = limited(cfg);
    let total = 1000;
    let t = run(&b, &limiter, &clock, total, 8192).as_secs_f64();
    let expected = (total * 8192 - 64_000) as f64 / 1e6;
    assert!(within(t, expected, 2.0), "{t} s for {expected} s");
}

#[test]
fn worker_waits_for_the_limiter_timer() {
    // A real clock: 10 requests at 200/s with a 2-request bucket complete because the
    // worker watches the limiter's timer (no kick comes after the first).
    let img = TempImage::new(1 << 20);
    let mut b = block(&img, true);
    b.set_rate_limiter(
        RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 10,
            }),
        })
        .unwrap(),
    );
    let m = mem();
    let ring = Ring::new(&m, RING, 256);
    let q = ring.active(0);
    let kick = q.kick.try_clone().unwrap();
    let irq = Arc::new(Irq::default());
    b.activate(ActivateContext {
        mem: m.clone(),
        acked_features: b.avail_features(),
        queues: vec![q],
        interrupt: irq.clone(),
        health: DeviceHealth::new(irq),
    })
    .unwrap();
    let mut d = Driver {
        m: &m,
        ring,
        len: 512,
        issued: 0,
        done: 0,
    };
    d.fill(10);
    kick.write(1).unwrap();
    for _ in 0..10 {
        d.ring.wait_used();
    }
    assert_eq!(b.stats().snapshot().requests, 10);
    assert!(b.reset());
}

#[test]
fn handle_updates_reach_the_queue() {
    let cfg = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 4,
            one_time_burst: 0,
            refill_time_ms: 1000,
        }),
    };
    let (b, _img, limiter, _clock) = limited(cfg);
    let h = b.handle();
    let m = mem();
    let (mut server, ring) = server_on(&b, &m);
    let mut d = Driver {
        m: &m,
        ring,
        len: 512,
        issued: 0,
        done: 0,
    };
    d.fill(16);
    assert_eq!(server.process_until_idle(), 4);
    assert!(server.throttled());
    // Lifting the limit through the handle wakes the device (its timer fires at once).
    h.rate_limiter().update(
        vessel_ratelimit::BucketUpdate::Keep,
        vessel_ratelimit::BucketUpdate::Disable,
    );
    assert!(!limiter.is_limited());
    limiter.on_timer();
    assert_eq!(server.process_until_idle(), 12);
    assert!(!server.throttled());
}
