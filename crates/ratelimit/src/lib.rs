//! Token-bucket rate limiters for the I/O devices, with Firecracker's semantics.
//!
//! - [`TokenBucket`]: `size` tokens refilled continuously over `refill_time_ms` (so
//!   `size / refill_time` tokens per millisecond), starting full, plus a `one_time_burst`
//!   that is spent first and never refills. A request larger than the bucket is let through
//!   once the bucket is full and leaves it in debt, so that the long-run rate still holds.
//!   A bucket of size 0 (or a refill time of 0) is no limit at all.
//! - [`RateLimiter`]: a bandwidth bucket (bytes) and an operations bucket, shared between a
//!   device's worker thread and the host's handle (`Clone`; updates from the API take effect
//!   at the next request). When a request does not fit, the limiter arms its timer file
//!   descriptor ([`RateLimiter::as_raw_fd`], registered in the worker's epoll) for the moment
//!   enough tokens are back, and refuses every request until the worker calls
//!   [`RateLimiter::on_timer`]; the device leaves the request in its queue meanwhile.
//! - [`Clock`]: where the time comes from; [`MonotonicClock`] in the VMM, [`FakeClock`] in
//!   tests, which then call `on_timer` themselves after moving the clock on.

use std::fmt;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// A monotonic time source: the time since some fixed origin.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// The host's monotonic clock (the one the timer file descriptor runs on).
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that only moves when told to (tests). Clones share the time.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    pub fn new() -> FakeClock {
        FakeClock::default()
    }

    /// Moves the clock `d` forward.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// One bucket's configuration (Firecracker's `TokenBucket`, with `refill_time` in ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens the bucket holds (bytes or operations); 0: no limit.
    pub size: u64,
    /// Extra tokens available once, spent before the bucket's.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket; 0: no limit.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// `rate` tokens per second, with a bucket of one second's worth.
    pub fn per_second(rate: u64) -> BucketConfig {
        BucketConfig {
            size: rate,
            one_time_burst: 0,
            refill_time_ms: 1000,
        }
    }

    /// Whether this bucket limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 || self.refill_time_ms == 0
    }
}

/// A rate limiter's configuration: bytes and operations (absent: not limited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<BucketConfig>,
}

impl RateLimiterConfig {
    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        [self.bandwidth, self.ops]
            .iter()
            .all(|b| b.is_none_or(|b| b.is_unlimited()))
    }
}

/// What an update does to one bucket (Firecracker's `PATCH` semantics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave the bucket as it is.
    #[default]
    Keep,
    /// Remove the limit.
    Disable,
    /// Replace the bucket with a new, full one.
    Set(BucketConfig),
}

impl BucketUpdate {
    /// A `PATCH`'s bucket: absent keeps the current one, size or refill time 0 removes it.
    pub fn from_patch(b: Option<BucketConfig>) -> BucketUpdate {
        match b {
            None => BucketUpdate::Keep,
            Some(b) if b.is_unlimited() => BucketUpdate::Disable,
            Some(b) => BucketUpdate::Set(b),
        }
    }
}

/// Bucket sizes and refill times are clamped here so that products of two stay far from
/// `i128`'s limits (2^62 bytes or nanoseconds is beyond any real configuration).
const CLAMP: u64 = 1 << 62;

fn clamp(v: u64) -> i128 {
    i128::from(v.min(CLAMP))
}

/// A token bucket (see the crate documentation). The budget is kept in token-nanoseconds
/// (tokens × refill time) so that refilling loses nothing to rounding.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    size: i128,
    refill_ns: i128,
    /// Budget × `refill_ns`; negative while in debt.
    credit: i128,
    burst: u64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket, or `None` for a configuration that limits nothing.
    pub fn new(config: BucketConfig, now: Duration) -> Option<TokenBucket> {
        if config.is_unlimited() {
            return None;
        }
        let size = clamp(config.size);
        let refill_ns = clamp(config.refill_time_ms.saturating_mul(1_000_000));
        Some(TokenBucket {
            config,
            size,
            refill_ns,
            credit: size * refill_ns,
            burst: config.one_time_burst,
            last: now,
        })
    }

    pub fn config(&self) -> BucketConfig {
        self.config
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let ns = i128::try_from(elapsed.as_nanos())
            .unwrap_or(i128::MAX)
            .min(clamp(CLAMP));
        let full = self.size * self.refill_ns;
        self.credit = self.credit.saturating_add(ns * self.size).min(full);
    }

    /// Credit a request of `tokens` needs: what the one-time burst does not cover, at most a
    /// full bucket.
    fn needed(&self, tokens: u64) -> i128 {
        clamp(tokens.saturating_sub(self.burst)).min(self.size) * self.refill_ns
    }

    /// Whether `tokens` may be taken now.
    pub fn has(&mut self, tokens: u64, now: Duration) -> bool {
        self.refill(now);
        self.credit >= self.needed(tokens)
    }

    /// Takes `tokens` if [`TokenBucket::has`] them; returns whether it did.
    pub fn try_consume(&mut self, tokens: u64, now: Duration) -> bool {
        if !self.has(tokens, now) {
            return false;
        }
        self.take(tokens);
        true
    }

    /// Takes `tokens` whatever the budget (it may go into debt): for work already done.
    pub fn force_consume(&mut self, tokens: u64, now: Duration) {
        self.refill(now);
        self.take(tokens);
    }

    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        let rest = clamp(tokens - from_burst);
        self.credit = self.credit.saturating_sub(rest * self.refill_ns);
    }

    /// Gives back `tokens` taken for work that was not done (never beyond a full bucket).
    pub fn refund(&mut self, tokens: u64, now: Duration) {
        self.refill(now);
        let full = self.size * self.refill_ns;
        self.credit = self
            .credit
            .saturating_add(clamp(tokens) * self.refill_ns)
            .min(full);
    }

    /// How long until `tokens` may be taken (zero if they may now).
    pub fn wait_for(&mut self, tokens: u64, now: Duration) -> Duration {
        self.refill(now);
        let short = self.needed(tokens) - self.credit;
        if short <= 0 {
            return Duration::ZERO;
        }
        // Rounded up: at that time the credit covers the request.
        let ns = (short + self.size - 1) / self.size;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Tokens available now (the one-time burst's included; 0 while in debt).
    pub fn available(&mut self, now: Duration) -> u64 {
        self.refill(now);
        let budget = u64::try_from(self.credit.max(0) / self.refill_ns).unwrap_or(u64::MAX);
        budget.saturating_add(self.burst)
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.burst
    }
}

/// The shortest timer armed: below this, waking up costs more than the precision gains.
const MIN_WAIT: Duration = Duration::from_micros(50);

struct State {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// A request did not fit: every request is refused until the timer fires.
    blocked: bool,
    timer: TimerFd,
}

struct Inner {
    state: Mutex<State>,
    /// Whether any bucket is set (read without the lock on every request).
    limited: AtomicBool,
    /// The timer's descriptor (owned by `state.timer`).
    timer_fd: RawFd,
    clock: Arc<dyn Clock>,
}

/// A device's rate limiter (see the crate documentation): clones share it.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config())
            .field("blocked", &self.is_blocked())
            .finish()
    }
}

impl RateLimiter {
    /// Whether `other` is this limiter (a clone of it), not just one with the same limits.
    pub fn same(&self, other: &RateLimiter) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A limiter on the host's monotonic clock.
    pub fn new(config: &RateLimiterConfig) -> io::Result<RateLimiter> {
        RateLimiter::with_clock(config, Arc::new(MonotonicClock::default()))
    }

    /// A limiter that limits nothing until updated.
    pub fn unlimited() -> io::Result<RateLimiter> {
        RateLimiter::new(&RateLimiterConfig::default())
    }

    /// A limiter reading the time from `clock`.
    pub fn with_clock(
        config: &RateLimiterConfig,
        clock: Arc<dyn Clock>,
    ) -> io::Result<RateLimiter> {
        let timer = TimerFd::new()?;
        let timer_fd = timer.as_raw_fd();
        // SAFETY: F_SETFL on a descriptor we own; no memory is involved. Non-blocking, so
        // that reading a timer that an update re-armed meanwhile never blocks the worker.
        let r = unsafe { libc::fcntl(timer_fd, libc::F_SETFL, libc::O_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let now = clock.now();
        let bandwidth = config.bandwidth.and_then(|b| TokenBucket::new(b, now));
        let ops = config.ops.and_then(|b| TokenBucket::new(b, now));
        let limited = bandwidth.is_some() || ops.is_some();
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    bandwidth,
                    ops,
                    blocked: false,
                    timer,
                }),
                limited: AtomicBool::new(limited),
                timer_fd,
                clock,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.inner.limited.load(Ordering::Acquire)
    }

    /// Takes one request's `ops` and `bytes` if both buckets have them. Otherwise takes
    /// nothing, arms the timer for when they will and returns false; until the timer fires
    /// ([`RateLimiter::on_timer`]) every request is refused.
    pub fn try_consume(&self, ops: u64, bytes: u64) -> bool {
        if !self.is_limited() {
            return true;
        }
        let now = self.inner.clock.now();
        let mut s = self.lock();
        if s.blocked {
            return false;
        }
        let fits = s.ops.as_mut().is_none_or(|b| b.has(ops, now))
            && s.bandwidth.as_mut().is_none_or(|b| b.has(bytes, now));
        if fits {
            if let Some(b) = &mut s.ops {
                b.take(ops);
            }
            if let Some(b) = &mut s.bandwidth {
                b.take(bytes);
            }
            return true;
        }
        let wait = [
            s.ops.as_mut().map(|b| b.wait_for(ops, now)),
            s.bandwidth.as_mut().map(|b| b.wait_for(bytes, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO)
        .max(MIN_WAIT);
        match s.timer.reset(wait, None) {
            Ok(()) => {
                s.blocked = true;
                false
            }
            Err(e) => {
                // Without a timer nothing would wake the device: let the request through.
                log::warn!("rate limiter: cannot arm the timer: {e}");
                true
            }
        }
    }

    /// Takes `ops` and `bytes` for work already done, even into debt (a received frame
    /// whose size was only known once read).
    pub fn force_consume(&self, ops: u64, bytes: u64) {
        if !self.is_limited() {
            return;
        }
        let now = self.inner.clock.now();
        let mut s = self.lock();
        if let Some(b) = &mut s.ops {
            b.force_consume(ops, now);
        }
        if let Some(b) = &mut s.bandwidth {
            b.force_consume(bytes, now);
        }
    }

    /// Gives back tokens taken for work that was not done.
    pub fn refund(&self, ops: u64, bytes: u64) {
        if !self.is_limited() {
            return;
        }
        let now = self.inner.clock.now();
        let mut s = self.lock();
        if let Some(b) = &mut s.ops {
            b.refund(ops, now);
        }
        if let Some(b) = &mut s.bandwidth {
            b.refund(bytes, now);
        }
    }

    /// Whether requests are refused until the timer fires.
    pub fn is_blocked(&self) -> bool {
        self.is_limited() && self.lock().blocked
    }

    /// The worker calls this when the timer's descriptor is readable (tests call it after
    /// moving a fake clock on): requests are tried again.
    pub fn on_timer(&self) {
        let mut s = self.lock();
        // Non-blocking: an expiry count or EAGAIN (an update re-armed it), both fine.
        let _ = s.timer.wait();
        s.blocked = false;
    }

    /// Replaces or removes either bucket (new buckets start full). A blocked device is
    /// woken at once to try again under the new limits.
    pub fn update(&self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = self.inner.clock.now();
        let mut s = self.lock();
        let apply = |slot: &mut Option<TokenBucket>, u: BucketUpdate| match u {
            BucketUpdate::Keep => {}
            BucketUpdate::Disable => *slot = None,
            BucketUpdate::Set(c) => *slot = TokenBucket::new(c, now),
        };
        apply(&mut s.bandwidth, bandwidth);
        apply(&mut s.ops, ops);
        self.inner
            .limited
            .store(s.bandwidth.is_some() || s.ops.is_some(), Ordering::Release);
        if s.blocked {
            if let Err(e) = s.timer.reset(Duration::from_nanos(1), None) {
                log::warn!("rate limiter: cannot wake the device: {e}");
                s.blocked = false;
            }
        }
    }

    /// Replaces both buckets with `config`'s (absent ones: no limit).
    pub fn set_config(&self, config: &RateLimiterConfig) {
        let set = |b: Option<BucketConfig>| match b {
            Some(b) if !b.is_unlimited() => BucketUpdate::Set(b),
            _ => BucketUpdate::Disable,
        };
        self.update(set(config.bandwidth), set(config.ops));
    }

    /// The current configuration.
    pub fn config(&self) -> RateLimiterConfig {
        let s = self.lock();
        RateLimiterConfig {
            bandwidth: s.bandwidth.as_ref().map(TokenBucket::config),
            ops: s.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// Tokens available now in (bandwidth, ops); `None` for a bucket that is not set.
    pub fn available(&self) -> (Option<u64>, Option<u64>) {
        let now = self.inner.clock.now();
        let mut s = self.lock();
        (
            s.bandwidth.as_mut().map(|b| b.available(now)),
            s.ops.as_mut().map(|b| b.available(now)),
        )
    }
}

impl AsRawFd for RateLimiter {
    /// The timer's descriptor, readable when a blocked device should try again.
    fn as_raw_fd(&self) -> RawFd {
        self.inner.timer_fd
    }
}

#[cfg(test)]
mod tests;
