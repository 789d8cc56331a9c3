//! Log lines that a guest or a frontend can trigger, rate-limited.
//!
//! A card or a peer that repeats an action (a broken ring, a failed
//! driver, a reconnect, an invalid vhost-user request) must not be able to
//! fill the host's logs. Every such line at `info`, `warn` or `error` goes
//! through a [`LogLimiter`]: in each interval the first `burst` lines are
//! written, the rest are counted, and the first line written after them
//! says how many were left out. The `limited!` macro wraps a `log` call.
//! Lines that the crates below the daemons (`virtio-queue`, `vhost`,
//! `vhost-user-backend`) write at `warn` or `error` go through one shared
//! limiter as well (see [`crate::init_logging`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// "First `burst` lines per interval, then a count of the rest".
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Start of the current interval (none before the first line).
    since: Option<Instant>,
    /// Lines written in the current interval.
    written: u32,
    /// Lines left out since the last line written.
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter writing the first `burst` lines of every `interval`.
    pub const fn new(burst: u32, interval: Duration) -> LogLimiter {
        LogLimiter {
            burst,
            interval,
            state: Mutex::new(State {
                since: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether to write a line now: `Some(n)` to write it (`n` lines were
    /// left out before it), `None` to leave it out.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`LogLimiter::check`] at time `now`.
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while
        // counting; the counts are still usable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = match s.since {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= self.interval,
        };
        if expired {
            s.since = Some(now);
            s.written = 0;
        }
        if s.written < self.burst {
            s.written += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

impl LogLimiter {
    /// Whether the limiter's interval has run out at `now`; keyed
    /// limiters forget such entries to bound their tables (a count of
    /// lines left out goes with it).
    pub fn idle_at(&self, now: Instant) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.since
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval)
    }
}

/// Logs like `log::$level!` through a [`LogLimiter`]: lines beyond the
/// limiter's burst are left out, and the next line written reports how
/// many were.
///
/// ```ignore
/// static BAD_CHAIN: LogLimiter = LogLimiter::new(5, Duration::from_secs(60));
/// limited!(BAD_CHAIN, warn, "queue {q}: bad chain");
/// ```
#[macro_export]
macro_rules! limited {
    ($limiter:expr, $level:ident, $($arg:tt)+) => {
        if let Some(left_out) = $limiter.check() {
            if left_out == 0 {
                ::log::$level!($($arg)+);
            } else {
                ::log::$level!(
                    "{} ({left_out} similar lines left out)",
                    format_args!($($arg)+)
                );
            }
        }
    };
}

/// The limits most lines use: 5 lines a minute.
pub const fn per_minute() -> LogLimiter {
    LogLimiter::new(5, Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_once_its_interval_ran_out() {
        let l = LogLimiter::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(l.idle_at(t0), "never used");
        assert_eq!(l.check_at(t0), Some(0));
        assert!(!l.idle_at(t0 + Duration::from_secs(9)));
        assert!(l.idle_at(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn first_burst_then_one_line_with_the_count_per_interval() {
        let l = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(l.check_at(at(0)), Some(0));
        assert_eq!(l.check_at(at(1)), Some(0));
        assert_eq!(l.check_at(at(2)), Some(0));
        for s in 3..10 {
            assert_eq!(l.check_at(at(s)), None, "second {s}");
        }
        // A new interval: the first line carries the count.
        assert_eq!(l.check_at(at(10)), Some(7));
        assert_eq!(l.check_at(at(11)), Some(0));
        assert_eq!(l.check_at(at(12)), Some(0));
        assert_eq!(l.check_at(at(13)), None);
        // Long quiet: the next interval starts with the line that comes.
        assert_eq!(l.check_at(at(100)), Some(1));
    }

    #[test]
    fn a_flood_writes_a_bounded_number_of_lines() {
        let l = per_minute();
        let t0 = Instant::now();
        // 10000 lines over ten minutes: 5 a minute get through.
        let written = (0..10_000u64)
            .filter(|i| l.check_at(t0 + Duration::from_millis(i * 60)).is_some())
            .count();
        assert_eq!(written, 50);
    }

    #[test]
    fn zero_burst_writes_nothing() {
        let l = LogLimiter::new(0, Duration::from_secs(1));
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
    }
}
