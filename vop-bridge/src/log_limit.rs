//! A small per-source limiter for log lines the card can cause at will
//! (`docs/architecture.md`, "Bounded waits"): each source may log a burst of
//! lines per window; further lines in that window are counted, not written,
//! and the next line written says how many were left out.
//!
//! Each source's budget is the daemons' limiter
//! (`mic_backend_common::ratelimit`); this adds the table of sources.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mic_backend_common::ratelimit::LogLimiter as OneSource;

/// What may log on its own: a kind of event and the device (or other index)
/// it is about.
pub type Source = (&'static str, u32);

/// Lines one source may write per window.
pub const BURST: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Sources remembered at most (the card picks the indices); when full, the
/// oldest windows are forgotten first.
const MAX_SOURCES: usize = 256;

/// Per-source line budgets: one [`mic_backend_common::ratelimit::LogLimiter`]
/// (the daemons' "first `burst` lines per window, then a count") per source.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    sources: HashMap<Source, OneSource>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(BURST, WINDOW)
    }
}

impl LogLimiter {
    /// `burst` lines per `window` for each source.
    pub fn new(burst: u32, window: Duration) -> Self {
        LogLimiter {
            burst,
            window,
            sources: HashMap::new(),
        }
    }

    /// Whether `source` may write a line at `now`: `Some(n)` when it may,
    /// `n` lines having been left out since its last one; `None` when not.
    pub fn allow_at(&mut self, source: Source, now: Instant) -> Option<u64> {
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_SOURCES {
            self.sources.retain(|_, l| !l.idle_at(now));
            if self.sources.len() >= MAX_SOURCES {
                // Every source is busy: the newcomer shares their silence.
                return None;
            }
        }
        let (burst, window) = (self.burst, self.window);
        self.sources
            .entry(source)
            .or_insert_with(|| OneSource::new(burst, window))
            .check_at(now)
    }

    /// [`Self::allow_at`] now.
    pub fn allow(&mut self, source: Source) -> Option<u64> {
        self.allow_at(source, Instant::now())
    }
}

/// Logs at `level` through a [`LogLimiter`]:
/// `limited!(limiter, ("doorbell", 3), warn, "text {}", x)`.
#[macro_export]
macro_rules! limited {
    ($limiter:expr, $source:expr, $level:ident, $($arg:tt)+) => {
        match $limiter.allow($source) {
            Some(0) => log::$level!($($arg)+),
            Some(n) => log::$level!("{} ({n} similar lines left out)", format_args!($($arg)+)),
            None => {}
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_silence_then_a_count() {
        let mut l = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let s = ("doorbell", 7);
        let written: Vec<_> = (0..1000).map(|_| l.allow_at(s, t0)).collect();
        assert_eq!(&written[..3], &[Some(0); 3]);
        assert!(written[3..].iter().all(Option::is_none));
        // Still inside the window.
        assert_eq!(l.allow_at(s, t0 + Duration::from_secs(9)), None);
        // The next window's first line reports what was left out.
        assert_eq!(l.allow_at(s, t0 + Duration::from_secs(10)), Some(998));
        assert_eq!(l.allow_at(s, t0 + Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn sources_have_their_own_budgets() {
        let mut l = LogLimiter::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow_at(("a", 0), t0), Some(0));
        assert_eq!(l.allow_at(("a", 0), t0), None);
        assert_eq!(l.allow_at(("a", 1), t0), Some(0));
        assert_eq!(l.allow_at(("b", 0), t0), Some(0));
    }

    #[test]
    fn the_card_cannot_grow_the_table() {
        let mut l = LogLimiter::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..10_000 {
            l.allow_at(("reserved", i), t0);
        }
        assert!(l.sources.len() <= MAX_SOURCES);
        // Old windows make room again.
        assert_eq!(
            l.allow_at(("reserved", 99_999), t0 + Duration::from_secs(11)),
            Some(0)
        );
    }
}
