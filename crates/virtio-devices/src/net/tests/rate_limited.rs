//! The receive and transmit rate limiters, on a fake clock: the test plays the driver, the
//! peer on the fake TAP, and the worker (firing a limiter's timer when the clock moves on).

use super::*;
use crate::net::worker::Tokens;
use std::time::Duration;
use vessel_ratelimit::{BucketConfig, Clock, FakeClock, RateLimiter, RateLimiterConfig};

const STEP: Duration = Duration::from_millis(1);
const OUTSTANDING: u64 = 8;

fn limited<'a>(
    m: &'a GuestMemoryMmap,
    rx: RateLimiterConfig,
    tx: RateLimiterConfig,
) -> (Setup<'a>, RateLimiter, RateLimiter, FakeClock) {
    let mut s = setup(m, 0);
    let clock = FakeClock::new();
    let rx = RateLimiter::with_clock(&rx, Arc::new(clock.clone())).unwrap();
    let tx = RateLimiter::with_clock(&tx, Arc::new(clock.clone())).unwrap();
    s.h.rx_limiter = Some(rx.clone());
    s.h.tx_limiter = Some(tx.clone());
    (s, rx, tx, clock)
}

fn within(actual: f64, expected: f64, pct: f64) -> bool {
    (actual - expected).abs() <= expected * pct / 100.0
}

fn bucket(size: u64, refill_time_ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms,
        }),
    }
}

fn bandwidth(size: u64, refill_time_ms: u64) -> RateLimiterConfig {
    let RateLimiterConfig { ops, .. } = bucket(size, refill_time_ms);
    RateLimiterConfig {
        bandwidth: ops,
        ops: None,
    }
}

/// Sends `total` frames of `len` bytes through the transmit queue; returns the fake time
/// it took.
fn transmit(
    s: &mut Setup,
    tx: &RateLimiter,
    clock: &FakeClock,
    total: u64,
    len: usize,
) -> Duration {
    let f = frame(len, 4);
    let (mut queued, mut sent, mut received) = (0u64, 0u64, 0u64);
    let mut polls = Polls::default();
    let mut rounds = 0;
    while received < total {
        rounds += 1;
        assert!(rounds < 1_000_000, "no progress");
        while queued - sent < OUTSTANDING && queued < total {
            let at = 0x10_0000 + (queued % 16) * 0x1_0000;
            s.tx.write(at, &f);
            s.tx.add(&[(at, f.len() as u32, false)]);
            queued += 1;
        }
        s.h.process_tx(0);
        while s.tx.next_used().is_some() {
            sent += 1;
        }
        while let Some(got) = recv(&s.peer) {
            assert_eq!(got, f);
            received += 1;
        }
        if tx.is_blocked() {
            // A kick alone does not send anything while the limiter holds the queue.
            s.h.process_tx(0);
            assert!(s.tx.next_used().is_none());
            clock.advance(STEP);
            tx.on_timer();
            s.h.on_limiter_timer(Tokens::TX_LIMITER, &mut polls);
            while s.tx.next_used().is_some() {
                sent += 1;
            }
        }
    }
    assert_eq!(s.h.stats.tx_frames, total);
    clock.now()
}

#[test]
fn tx_bandwidth_limit_holds_and_resumes_on_the_timer() {
    let m = mem();
    // 100 kB/s, 10 kB bucket, 1000-byte frames (our header not counted).
    let (mut s, _rx, tx, clock) = limited(&m, RateLimiterConfig::default(), bandwidth(10_000, 100));
    let t = transmit(&mut s, &tx, &clock, 500, 1000).as_secs_f64();
    assert!(within(t, 4.9, 2.0), "{t} s for 4.9 s");
}

#[test]
fn tx_ops_limit_holds() {
    let m = mem();
    // 1000 frames/s, 20-frame bucket.
    let (mut s, _rx, tx, clock) = limited(&m, RateLimiterConfig::default(), bucket(20, 20));
    let t = transmit(&mut s, &tx, &clock, 2020, 60).as_secs_f64();
    assert!(within(t, 2.0, 2.0), "{t} s for 2 s");
}

/// Receives `total` frames of `len` bytes from the TAP; returns the fake time it took.
fn receive(s: &mut Setup, rx: &RateLimiter, clock: &FakeClock, total: u64, len: usize) -> Duration {
    let f = frame(len, 8);
    let (mut sent, mut buffers, mut delivered) = (0u64, 0u64, 0u64);
    let mut polls = Polls::default();
    let mut polled = true;
    let mut rounds = 0;
    while delivered < total {
        rounds += 1;
        assert!(rounds < 1_000_000, "no progress");
        let mut added = false;
        while buffers - delivered < OUTSTANDING {
            s.rx.add(&[(0x10_0000 + (buffers % 16) * 0x1000, 2048, true)]);
            buffers += 1;
            added = true;
        }
        while sent - delivered < OUTSTANDING && sent < total {
            send(&s.peer, &f);
            sent += 1;
        }
        if added && !polled {
            // The driver's kick for its new buffers.
            s.h.rx_kick(0, &mut polls);
        } else if polled {
            // The TAP is readable.
            s.h.process_rx(0, &mut polls);
        }
        while let Some((_, n)) = s.rx.next_used() {
            assert_eq!(n as usize, f.len());
            delivered += 1;
        }
        polled = polls.0.last().copied().unwrap_or(true);
        if rx.is_blocked() {
            assert!(!polled, "the TAP is not read while throttled");
            clock.advance(STEP);
            rx.on_timer();
            s.h.on_limiter_timer(Tokens::RX_LIMITER, &mut polls);
            polled = polls.0.last().copied().unwrap_or(true);
            while s.rx.next_used().is_some() {
                delivered += 1;
            }
        }
    }
    assert_eq!(s.h.stats.rx_frames, total);
    clock.now()
}

#[test]
fn rx_ops_limit_holds_and_polling_resumes_on_the_timer() {
    let m = mem();
    // 200 frames/s, 10-frame bucket.
    let (mut s, rx, _tx, clock) = limited(&m, bucket(10, 50), RateLimiterConfig::default());
    let t = receive(&mut s, &rx, &clock, 1010, 100).as_secs_f64();
    assert!(within(t, 5.0, 2.0), "{t} s for 5 s");
}

#[test]
fn rx_bandwidth_limit_holds_with_frames_counted_after_reading() {
    let m = mem();
    // 500 kB/s, 5 kB bucket, 1500-byte frames: each frame is admitted on one byte and
    // charged in full once read (the bucket goes into debt).
    let (mut s, rx, _tx, clock) = limited(&m, bandwidth(5_000, 10), RateLimiterConfig::default());
    let total = 1000;
    let t = receive(&mut s, &rx, &clock, total, 1500).as_secs_f64();
    let expected = (total * 1500 - 5_000) as f64 / 500_000.0;
    assert!(within(t, expected, 2.0), "{t} s for {expected} s");
}

#[test]
fn handle_updates_reach_the_device() {
    let m = mem();
    let (mut s, rx, tx, _clock) = limited(&m, RateLimiterConfig::default(), bucket(2, 1000));
    let mut net = Net::with_taps(vec![fake_tap().0], None).unwrap();
    net.set_rate_limiters(rx.clone(), tx.clone());
    let h = net.handle();
    let f = frame(60, 1);
    for i in 0..5 {
        s.tx.write(0x10_0000 + i * 0x1000, &f);
        s.tx.add(&[(0x10_0000 + i * 0x1000, f.len() as u32, false)]);
    }
    s.h.process_tx(0);
    assert_eq!(s.h.stats.tx_frames, 2);
    assert!(tx.is_blocked());
    // Lifting the transmit limit through the handle wakes the device.
    h.tx.update(
        vessel_ratelimit::BucketUpdate::Keep,
        vessel_ratelimit::BucketUpdate::Disable,
    );
    tx.on_timer();
    s.h.on_limiter_timer(Tokens::TX_LIMITER, &mut Polls::default());
    assert_eq!(s.h.stats.tx_frames, 5);
    assert_eq!(h.rx.config(), RateLimiterConfig::default());
}
