use super::*;

const MS: Duration = Duration::from_millis(1);

fn bucket(size: u64, burst: u64, refill_ms: u64) -> BucketConfig {
    BucketConfig {
        size,
        one_time_burst: burst,
        refill_time_ms: refill_ms,
    }
}

#[test]
fn bucket_starts_full_and_refills_continuously() {
    let mut b = TokenBucket::new(bucket(1000, 0, 100), Duration::ZERO).unwrap();
    assert_eq!(b.available(Duration::ZERO), 1000);
    assert!(b.try_consume(1000, Duration::ZERO));
    assert!(!b.try_consume(1, Duration::ZERO));
    // 10 tokens per ms, exactly, also across odd steps.
    assert_eq!(b.available(MS), 10);
    assert_eq!(b.available(Duration::from_micros(1550)), 15);
    assert!(b.try_consume(15, Duration::from_micros(1550)));
    assert_eq!(b.available(Duration::from_micros(1650)), 1);
    // Never beyond the size.
    assert_eq!(b.available(Duration::from_secs(10)), 1000);
}

#[test]
fn wait_for_says_when_a_request_fits() {
    let mut b = TokenBucket::new(bucket(1000, 0, 100), Duration::ZERO).unwrap();
    assert_eq!(b.wait_for(500, Duration::ZERO), Duration::ZERO);
    assert!(b.try_consume(1000, Duration::ZERO));
    let w = b.wait_for(300, Duration::ZERO);
    assert_eq!(w, 30 * MS);
    assert!(!b.has(300, w - Duration::from_nanos(1)));
    assert!(b.has(300, w));
}

#[test]
fn one_time_burst_is_spent_first_and_never_refills() {
    let mut b = TokenBucket::new(bucket(100, 250, 1000), Duration::ZERO).unwrap();
    assert_eq!(b.available(Duration::ZERO), 350);
    assert!(b.try_consume(200, Duration::ZERO));
    assert_eq!(b.one_time_burst(), 50);
    // The bucket itself was not touched.
    assert_eq!(b.available(Duration::ZERO), 150);
    // 80 = the 50 left of the burst + 30 of the bucket.
    assert!(b.try_consume(80, Duration::ZERO));
    assert_eq!(b.one_time_burst(), 0);
    assert_eq!(b.available(Duration::ZERO), 70);
    assert_eq!(b.available(Duration::from_secs(100)), 100);
}

#[test]
fn size_or_refill_zero_is_no_limit() {
    assert!(TokenBucket::new(bucket(0, 10, 100), Duration::ZERO).is_none());
    assert!(TokenBucket::new(bucket(10, 0, 0), Duration::ZERO).is_none());
    let l = RateLimiter::with_clock(
        &RateLimiterConfig {
            bandwidth: Some(bucket(0, 0, 100)),
            ops: Some(bucket(5, 0, 0)),
        },
        Arc::new(FakeClock::new()),
    )
    .unwrap();
    assert!(!l.is_limited());
    for _ in 0..10_000 {
        assert!(l.try_consume(1, u64::MAX));
    }
    assert!(!l.is_blocked());
    assert_eq!(l.config(), RateLimiterConfig::default());
}

#[test]
fn requests_larger_than_the_bucket_wait_for_a_full_bucket_and_leave_debt() {
    let mut b = TokenBucket::new(bucket(100, 0, 100), Duration::ZERO).unwrap();
    assert!(b.try_consume(10, Duration::ZERO));
    // 250 > size: needs a full bucket, 10 ms away (one token per ms).
    assert!(!b.has(250, Duration::ZERO));
    assert_eq!(b.wait_for(250, Duration::ZERO), 10 * MS);
    assert!(b.try_consume(250, 10 * MS));
    // 150 tokens of debt: 150 ms until empty, then 10 ms for 10 tokens.
    assert_eq!(b.available(10 * MS), 0);
    assert_eq!(b.wait_for(10, 10 * MS), 160 * MS);
    assert!(!b.has(10, 169 * MS));
    assert!(b.has(10, 170 * MS));
}

#[test]
fn huge_values_do_not_overflow() {
    let mut b = TokenBucket::new(bucket(u64::MAX, u64::MAX, u64::MAX), Duration::ZERO).unwrap();
    assert!(b.try_consume(u64::MAX, Duration::ZERO));
    b.force_consume(u64::MAX, Duration::ZERO);
    b.force_consume(u64::MAX, Duration::ZERO);
    b.refund(u64::MAX, Duration::MAX);
    let _ = b.wait_for(u64::MAX, Duration::MAX);
    let _ = b.available(Duration::MAX);
    let mut b = TokenBucket::new(bucket(1, 0, 1), Duration::ZERO).unwrap();
    for _ in 0..1000 {
        b.force_consume(u64::MAX, Duration::ZERO);
    }
    assert!(b.wait_for(1, Duration::ZERO) > Duration::from_secs(100 * 365 * 86_400));
}

fn limiter(cfg: RateLimiterConfig) -> (RateLimiter, FakeClock) {
    let clock = FakeClock::new();
    let l = RateLimiter::with_clock(&cfg, Arc::new(clock.clone())).unwrap();
    (l, clock)
}

#[test]
fn limiter_needs_both_buckets_and_takes_nothing_on_refusal() {
    let (l, _clock) = limiter(RateLimiterConfig {
        bandwidth: Some(bucket(1000, 0, 1000)),
        ops: Some(bucket(10, 0, 1000)),
    });
    assert!(l.try_consume(1, 900));
    // Ops would fit, bytes would not: neither is taken.
    assert!(!l.try_consume(1, 200));
    assert!(l.is_blocked());
    assert_eq!(l.available(), (Some(100), Some(9)));
    // Blocked until the timer fires, even for what would fit.
    assert!(!l.try_consume(1, 1));
    l.on_timer();
    assert!(!l.is_blocked());
    assert!(l.try_consume(1, 100));
    assert_eq!(l.available(), (Some(0), Some(8)));
}

#[test]
fn limiter_timer_is_armed_for_when_tokens_are_back() {
    // A real clock: the timer descriptor becomes readable once enough tokens are back.
    let l = RateLimiter::new(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(1000, 0, 1000)), // one op per ms
    })
    .unwrap();
    let mut n = 0;
    while l.try_consume(1, 0) {
        n += 1;
    }
    assert!(n >= 1000, "{n}");
    assert!(l.is_blocked());
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the result is checked.
    let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(r, 1, "the timer fired");
    l.on_timer();
    assert!(l.try_consume(1, 0));
    // Reading a timer that has not expired does not block.
    l.on_timer();
}

#[test]
fn updates_replace_or_remove_buckets_and_wake_a_blocked_device() {
    let (l, _clock) = limiter(RateLimiterConfig {
        bandwidth: Some(bucket(100, 0, 1000)),
        ops: Some(bucket(10, 0, 1000)),
    });
    assert!(l.try_consume(1, 100));
    assert!(!l.try_consume(1, 100));
    assert!(l.is_blocked());
    // Only the bandwidth bucket changes; the update wakes the device (timer fires at once).
    l.update(
        BucketUpdate::from_patch(Some(bucket(5000, 0, 1000))),
        BucketUpdate::from_patch(None),
    );
    assert_eq!(
        l.config(),
        RateLimiterConfig {
            bandwidth: Some(bucket(5000, 0, 1000)),
            ops: Some(bucket(10, 0, 1000)),
        }
    );
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the result is checked.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
    l.on_timer();
    assert!(l.try_consume(1, 4000));
    // The ops bucket kept its state: 8 left.
    assert_eq!(l.available(), (Some(1000), Some(8)));
    // Size 0 removes a bucket; removing both removes every limit.
    l.update(
        BucketUpdate::from_patch(Some(bucket(0, 0, 0))),
        BucketUpdate::Disable,
    );
    assert!(!l.is_limited());
    assert!(l.try_consume(1000, u64::MAX));
    // And a limit can be set on a limiter that had none.
    l.update(BucketUpdate::Keep, BucketUpdate::Set(bucket(1, 0, 1000)));
    assert!(l.try_consume(1, 0));
    assert!(!l.try_consume(1, 0));
}

/// Drives `limiter` like a device worker under a fake clock: requests of `bytes` are
/// served while they fit; when refused, the clock moves to the next `step` and the
/// "timer" fires. Returns the fake time at which the `n`th request went through.
fn time_for(n: u64, bytes: u64, step: Duration, l: &RateLimiter, clock: &FakeClock) -> Duration {
    let mut served = 0;
    while served < n {
        if l.try_consume(1, bytes) {
            served += 1;
        } else {
            clock.advance(step);
            l.on_timer();
        }
    }
    clock.now()
}

fn within(actual: f64, expected: f64, pct: f64) -> bool {
    (actual - expected).abs() <= expected * pct / 100.0
}

#[test]
fn bandwidth_limit_holds_within_a_few_percent() {
    // 1 MB/s, 100 KB bucket, 4 KiB requests: 10 MB takes (10 MB - 100 KB) / 1 MB/s.
    let (l, clock) = limiter(RateLimiterConfig {
        bandwidth: Some(bucket(100_000, 0, 100)),
        ops: None,
    });
    let n = 10_000_000 / 4096;
    let t = time_for(n, 4096, MS, &l, &clock).as_secs_f64();
    let expected = (n * 4096 - 100_000) as f64 / 1e6;
    assert!(within(t, expected, 2.0), "{t} s, expected {expected} s");
    let rate = (n * 4096) as f64 / t;
    println!("bandwidth: {rate:.0} B/s for a 1e6 B/s limit over {t:.2} s (fake clock)");
}

#[test]
fn ops_limit_holds_within_a_few_percent_with_a_burst() {
    // 500 ops/s, a 50-op bucket and a 1000-op one-time burst: 6050 ops take 10 s.
    let (l, clock) = limiter(RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(50, 1000, 100)),
    });
    // The burst and the bucket go at once.
    let t0 = time_for(1050, 0, MS, &l, &clock);
    assert_eq!(t0, Duration::ZERO);
    let t = time_for(5000, 0, Duration::from_micros(700), &l, &clock).as_secs_f64();
    assert!(within(t, 10.0, 2.0), "{t} s");
}

#[test]
fn configs_serialize_like_the_vmm_stores_them() {
    let c = RateLimiterConfig {
        bandwidth: Some(bucket(1, 2, 3)),
        ops: None,
    };
    let s = serde_json::to_string(&c).unwrap();
    assert_eq!(
        s,
        r#"{"bandwidth":{"size":1,"one_time_burst":2,"refill_time_ms":3}}"#
    );
    assert_eq!(serde_json::from_str::<RateLimiterConfig>(&s).unwrap(), c);
    assert_eq!(
        serde_json::from_str::<RateLimiterConfig>("{}").unwrap(),
        RateLimiterConfig::default()
    );
    assert!(RateLimiterConfig::default().is_unlimited());
    assert!(!c.is_unlimited());
    assert_eq!(BucketConfig::per_second(7), bucket(7, 0, 1000));
}
