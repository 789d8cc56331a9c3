//! Rate limits of a device: token buckets for operations (IOPS, packets
//! per second) and bytes per second, each with a burst
//! (`backends/README.md`, "Rate limits").
//!
//! A queue asks [`Throttle::admit`] before it takes a request from its
//! ring, and [`Throttle::charge`]s the request once it has taken it (only
//! then is its size known). A bucket may go into debt by one request: a
//! request larger than the burst is still served once the bucket is full,
//! and the requests after it wait until the debt is paid back. The long-run
//! rate is the configured rate whatever the request sizes. While a bucket
//! is empty `admit` answers how long to wait; the queue arms a timer
//! ([`crate::timer::Wakeup`]) for that and takes nothing until it fires.
//!
//! The bucket is written here rather than taken from a crate
//! (`governor`, for one, implements GCRA): a limit changes at run time in
//! place, keeping what the bucket holds (`limit` on the stats socket); a
//! request may be larger than the burst (a 1 MiB write under a 512 KiB
//! burst); and the queue needs the exact deadline at which the next request
//! may go, to arm its timer. Time is passed in (`now`), so the tests run on
//! a clock of their own.
//!
//! Amounts are kept in units of 1/1e9 token (exact integer arithmetic: a
//! rate of `r` tokens per second adds `r` units per nanosecond).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Units per token.
const UNIT: i128 = 1_000_000_000;

/// One limit: `rate` tokens per second, at most `burst` tokens at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rate {
    /// Tokens per second (at least 1).
    pub rate: u64,
    /// Bucket size in tokens (at least 1).
    pub burst: u64,
}

impl Rate {
    /// `rate` per second with the default burst: one second's worth.
    pub fn per_second(rate: u64) -> Rate {
        Rate {
            rate: rate.max(1),
            burst: rate.max(1),
        }
    }

    /// `rate` per second, bursts of `burst` (the default burst if `None`
    /// or 0).
    pub fn with_burst(rate: u64, burst: Option<u64>) -> Rate {
        let mut r = Rate::per_second(rate);
        if let Some(b) = burst.filter(|&b| b > 0) {
            r.burst = b;
        }
        r
    }
}

/// A token bucket with debt (see the module documentation).
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: Rate,
    /// Tokens held, in units; negative while in debt.
    level: i128,
    /// When `level` was last brought up to date.
    at: Instant,
}

impl Bucket {
    /// A full bucket for `rate` at `now`.
    pub fn new(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            rate,
            level: i128::from(rate.burst) * UNIT,
            at: now,
        }
    }

    /// The limit.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn capacity(&self) -> i128 {
        i128::from(self.rate.burst) * UNIT
    }

    /// Adds what flowed in since the last update, up to the burst.
    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.at).as_nanos() as i128;
        if ns > 0 {
            let added = ns.saturating_mul(i128::from(self.rate.rate));
            self.level = self.level.saturating_add(added).min(self.capacity());
            self.at = now;
        }
    }

    /// `None` if a request may be taken at `now` (the bucket holds at least
    /// one token), else how long until it does.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        let missing = UNIT - self.level;
        if missing <= 0 {
            return None;
        }
        // Round up: at the deadline the token is there.
        let ns = (missing + i128::from(self.rate.rate) - 1) / i128::from(self.rate.rate);
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Takes `tokens` at `now` (the level may go below zero).
    pub fn take(&mut self, tokens: u64, now: Instant) {
        self.refill(now);
        self.level -= i128::from(tokens) * UNIT;
    }

    /// Tokens held at `now` (negative: debt), rounded down.
    pub fn level(&mut self, now: Instant) -> i64 {
        self.refill(now);
        i64::try_from(self.level.div_euclid(UNIT)).unwrap_or(i64::MIN)
    }

    /// Changes the limit in place: what the bucket holds is kept (up to the
    /// new burst).
    pub fn set_rate(&mut self, rate: Rate, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.level = self.level.min(self.capacity());
    }
}

/// The limits of a [`Throttle`]; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Operations (requests, packets) per second.
    pub ops: Option<Rate>,
    /// Bytes per second.
    pub bytes: Option<Rate>,
}

/// A change of some of a [`Throttle`]'s limits (the `limit` command of the
/// stats socket): `Some(0)` for a rate removes the limit; a burst of
/// `Some(0)` restores the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// New operations per second.
    pub ops: Option<u64>,
    /// New operations burst.
    pub ops_burst: Option<u64>,
    /// New bytes per second.
    pub bytes: Option<u64>,
    /// New bytes burst.
    pub bytes_burst: Option<u64>,
}

#[derive(Debug)]
struct Buckets {
    ops: Option<Bucket>,
    bytes: Option<Bucket>,
}

/// The rate limits of a device (or of one direction of it): an operations
/// bucket and a bytes bucket, shared by its queues. Without limits nothing
/// is locked ([`Throttle::admit`] and [`Throttle::charge`] read one atomic).
#[derive(Debug)]
pub struct Throttle {
    /// Whether any limit is set.
    active: AtomicBool,
    buckets: Mutex<Buckets>,
}

impl Throttle {
    /// A throttle with `limits`, full buckets.
    pub fn new(limits: Limits) -> Throttle {
        let t = Throttle {
            active: AtomicBool::new(false),
            buckets: Mutex::new(Buckets {
                ops: None,
                bytes: None,
            }),
        };
        t.set_limits_at(limits, Instant::now());
        t
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // The buckets stay consistent even if a holder panicked.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any limit is set.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// `None` if the queue may take a request now, else how long to wait.
    pub fn admit(&self) -> Option<Duration> {
        if !self.active() {
            return None;
        }
        self.admit_at(Instant::now())
    }

    /// [`Throttle::admit`] at `now`: the longer wait of the two buckets.
    pub fn admit_at(&self, now: Instant) -> Option<Duration> {
        let mut b = self.lock();
        let ops = b.ops.as_mut().and_then(|k| k.wait(now));
        let bytes = b.bytes.as_mut().and_then(|k| k.wait(now));
        ops.max(bytes)
    }

    /// Accounts for a request taken: `ops` operations of `bytes` bytes.
    pub fn charge(&self, ops: u64, bytes: u64) {
        if self.active() {
            self.charge_at(ops, bytes, Instant::now());
        }
    }

    /// [`Throttle::charge`] at `now`.
    pub fn charge_at(&self, ops: u64, bytes: u64, now: Instant) {
        let mut b = self.lock();
        if let Some(k) = b.ops.as_mut() {
            k.take(ops, now);
        }
        if let Some(k) = b.bytes.as_mut() {
            k.take(bytes, now);
        }
    }

    /// The current limits.
    pub fn limits(&self) -> Limits {
        let b = self.lock();
        Limits {
            ops: b.ops.as_ref().map(Bucket::rate),
            bytes: b.bytes.as_ref().map(Bucket::rate),
        }
    }

    /// Replaces the limits at `now`; buckets that stay limited keep their
    /// level, new ones start full.
    pub fn set_limits_at(&self, limits: Limits, now: Instant) {
        let mut b = self.lock();
        let set = |slot: &mut Option<Bucket>, rate: Option<Rate>| match (slot.as_mut(), rate) {
            (Some(k), Some(r)) => k.set_rate(r, now),
            (_, r) => *slot = r.map(|r| Bucket::new(r, now)),
        };
        set(&mut b.ops, limits.ops);
        set(&mut b.bytes, limits.bytes);
        self.active
            .store(b.ops.is_some() || b.bytes.is_some(), Ordering::Relaxed);
    }

    /// Applies `change` (see [`Change`]) at `now`; returns the new limits.
    pub fn change_at(&self, change: Change, now: Instant) -> Limits {
        let old = self.limits();
        let merge = |old: Option<Rate>, rate: Option<u64>, burst: Option<u64>| {
            let rate = match rate {
                Some(0) => return None,
                Some(r) => r,
                None => old?.rate,
            };
            let burst = match burst {
                Some(b) => Some(b),
                // A new rate without a burst keeps an explicit burst only
                // if the rate is unchanged.
                None => old.filter(|o| o.rate == rate).map(|o| o.burst),
            };
            Some(Rate::with_burst(rate, burst))
        };
        let new = Limits {
            ops: merge(old.ops, change.ops, change.ops_burst),
            bytes: merge(old.bytes, change.bytes, change.bytes_burst),
        };
        self.set_limits_at(new, now);
        new
    }

    /// [`Throttle::change_at`] now.
    pub fn change(&self, change: Change) -> Limits {
        self.change_at(change, Instant::now())
    }
}

/// Parses a count with an optional suffix: `K`, `M`, `G` (powers of
/// 1000) or `Ki`, `Mi`, `Gi` (powers of 1024): `500`, `10M`, `4Ki`.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("K", 1_000),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|d| (d, *m)))
    .unwrap_or((t, 1));
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a count (digits, then K, M, G, Ki, Mi or Gi)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs a queue that takes a request whenever the throttle admits one,
    /// on a fake clock, for `secs` seconds; returns the requests taken.
    fn drive(t: &Throttle, start: Instant, secs: u64, bytes: u64) -> u64 {
        let end = start + Duration::from_secs(secs);
        let mut now = start;
        let mut taken = 0;
        while now < end {
            match t.admit_at(now) {
                None => {
                    t.charge_at(1, bytes, now);
                    taken += 1;
                }
                Some(d) => {
                    assert!(d > Duration::ZERO);
                    now += d;
                }
            }
        }
        taken
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Rate::with_burst(100, Some(10)), t0);
        for _ in 0..10 {
            assert_eq!(b.wait(t0), None);
            b.take(1, t0);
        }
        // Empty: one token comes every 10 ms.
        assert_eq!(b.wait(t0), Some(ms(10)));
        assert_eq!(b.wait(t0 + ms(4)), Some(ms(6)));
        assert_eq!(b.wait(t0 + ms(10)), None);
        // Idle for long: full again, never more.
        assert_eq!(b.level(t0 + Duration::from_secs(60)), 10);
    }

    #[test]
    fn iops_limit_holds_over_time() {
        let t0 = Instant::now();
        let t = Throttle::new(Limits {
            ops: Some(Rate::per_second(500)),
            bytes: None,
        });
        t.set_limits_at(t.limits(), t0);
        // One second's burst, then one every 2 ms (the one due at 10 s is
        // past the end).
        assert_eq!(drive(&t, t0, 10, 4096), 500 + 10 * 500 - 1);
    }

    #[test]
    fn large_requests_go_into_debt() {
        let t0 = Instant::now();
        let t = Throttle::new(Limits::default());
        t.set_limits_at(
            Limits {
                ops: None,
                bytes: Some(Rate::with_burst(1 << 20, Some(64 << 10))),
            },
            t0,
        );
        // 1 MiB requests under a 64 KiB burst at 1 MiB/s: one a second.
        let n = drive(&t, t0, 20, 1 << 20);
        assert!((20..=21).contains(&n), "{n}");
    }

    #[test]
    fn change_at_run_time_keeps_the_level() {
        let t0 = Instant::now();
        let t = Throttle::new(Limits::default());
        assert!(!t.active());
        assert_eq!(t.admit(), None);
        let l = t.change_at(
            Change {
                ops: Some(100),
                ops_burst: Some(1),
                ..Default::default()
            },
            t0,
        );
        assert_eq!(
            l.ops,
            Some(Rate {
                rate: 100,
                burst: 1
            })
        );
        assert!(t.active());
        t.charge_at(1, 0, t0);
        assert_eq!(t.admit_at(t0), Some(ms(10)));
        // Raising the rate: the empty bucket fills faster, not at once.
        let l = t.change_at(
            Change {
                ops: Some(1000),
                ..Default::default()
            },
            t0,
        );
        assert_eq!(l.ops, Some(Rate::per_second(1000)));
        assert_eq!(t.admit_at(t0), Some(ms(1)));
        // Only the burst: the rate stays.
        let l = t.change_at(
            Change {
                ops_burst: Some(5),
                bytes: Some(1 << 20),
                ..Default::default()
            },
            t0,
        );
        assert_eq!(
            l.ops,
            Some(Rate {
                rate: 1000,
                burst: 5
            })
        );
        assert_eq!(l.bytes, Some(Rate::per_second(1 << 20)));
        // 0 removes a limit.
        let l = t.change_at(
            Change {
                ops: Some(0),
                bytes: Some(0),
                ..Default::default()
            },
            t0,
        );
        assert_eq!(l, Limits::default());
        assert!(!t.active());
    }

    #[test]
    fn waits_are_exact_for_odd_rates() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Rate::with_burst(3, Some(1)), t0);
        b.take(1, t0);
        // 1/3 s, rounded up to the nanosecond.
        assert_eq!(b.wait(t0), Some(Duration::from_nanos(333_333_334)));
        assert_eq!(b.wait(t0 + Duration::from_nanos(333_333_334)), None);
    }

    #[test]
    fn counts_with_suffixes() {
        assert_eq!(parse_count("500"), Ok(500));
        assert_eq!(parse_count("10K"), Ok(10_000));
        assert_eq!(parse_count("10k"), Ok(10_000));
        assert_eq!(parse_count("3M"), Ok(3_000_000));
        assert_eq!(parse_count("1G"), Ok(1_000_000_000));
        assert_eq!(parse_count("4Ki"), Ok(4096));
        assert_eq!(parse_count("2Mi"), Ok(2 << 20));
        assert_eq!(parse_count("1Gi"), Ok(1 << 30));
        assert!(parse_count("").is_err());
        assert!(parse_count("1T").is_err());
        assert!(parse_count("-1").is_err());
        assert!(parse_count("99999999999G").is_err());
    }
}
