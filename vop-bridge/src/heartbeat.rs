//! The card's heartbeat as the host sees it (`docs/vop-abi.md` 5.6): the
//! card bumps a count in the device page's heartbeat block every period;
//! the bridge samples it on its tick ([`HeartbeatMonitor`]) and reports the
//! last beat and its age on the control socket ([`HeartbeatReport`]), and
//! micd decides from that age whether the card hangs (`docs/micd.md`
//! section 4).
//!
//! The age is measured on the host, from the sample at which the bridge saw
//! the count change: the card's clock never enters it, and a machine whose
//! vCPUs stopped (a hang with interrupts off, a frozen QEMU) simply stops
//! changing the count. A count the bridge finds already set when it starts
//! (a restarted bridge adopting a running card) counts as seen then, so a
//! restart can delay a verdict but never cause one.

use std::fmt;
use std::time::{Duration, Instant};

use crate::page::Beat;

/// The heartbeat as the bridge reports it: the control socket's
/// `heartbeat` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatReport {
    /// No beat yet: the card has not beaten on this page (it is still
    /// booting, or its driver predates the heartbeat), the page offers no
    /// heartbeat block, or the bridge is not attached.
    None,
    /// The last beat the bridge saw.
    Beat {
        /// The card's count.
        count: u32,
        /// Milliseconds since the bridge saw the count change.
        age_ms: u64,
        /// The card's beat period in milliseconds.
        period_ms: u32,
    },
}

impl fmt::Display for HeartbeatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeartbeatReport::None => f.write_str("heartbeat=none"),
            HeartbeatReport::Beat {
                count,
                age_ms,
                period_ms,
            } => write!(f, "heartbeat={count} age_ms={age_ms} period_ms={period_ms}"),
        }
    }
}

impl HeartbeatReport {
    /// Parses a bridge's `heartbeat` answer (`None` for anything else, such
    /// as an `error:` line or an older bridge's refusal).
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let count = words.next()?.strip_prefix("heartbeat=")?;
        if count == "none" {
            return Some(HeartbeatReport::None);
        }
        let count = count.parse().ok()?;
        let (mut age_ms, mut period_ms) = (None, None);
        for w in words {
            match w.split_once('=') {
                Some(("age_ms", v)) => age_ms = v.parse().ok(),
                Some(("period_ms", v)) => period_ms = v.parse().ok(),
                _ => {}
            }
        }
        Some(HeartbeatReport::Beat {
            count,
            age_ms: age_ms?,
            period_ms: period_ms?,
        })
    }

    /// The age of the last beat; `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        match self {
            HeartbeatReport::None => None,
            HeartbeatReport::Beat { age_ms, .. } => Some(Duration::from_millis(*age_ms)),
        }
    }
}

/// The last change of the count the bridge saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    beat: Beat,
    at: Instant,
}

/// Follows the heartbeat block from sample to sample. Pure: the bridge
/// feeds it what it read and when.
#[derive(Clone, Debug, Default)]
pub struct HeartbeatMonitor {
    last: Option<Seen>,
}

impl HeartbeatMonitor {
    /// Takes one sample of the block: `None` when there is nothing to read
    /// (detached, or a page without the block). A count of 0 is a page the
    /// card has not beaten on yet (the host built it; the card never writes
    /// 0), so it, too, forgets the last beat.
    pub fn sample(&mut self, beat: Option<Beat>, now: Instant) {
        match beat {
            None | Some(Beat { count: 0, .. }) => self.last = None,
            Some(b) => match &mut self.last {
                Some(seen) if seen.beat.count == b.count => seen.beat.period_ms = b.period_ms,
                _ => self.last = Some(Seen { beat: b, at: now }),
            },
        }
    }

    /// The report at `now`.
    pub fn report(&self, now: Instant) -> HeartbeatReport {
        match self.last {
            None => HeartbeatReport::None,
            Some(Seen { beat, at }) => HeartbeatReport::Beat {
                count: beat.count,
                age_ms: u64::try_from(now.saturating_duration_since(at).as_millis())
                    .unwrap_or(u64::MAX),
                period_ms: beat.period_ms,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(count: u32) -> Option<Beat> {
        Some(Beat {
            count,
            period_ms: 500,
        })
    }

    #[test]
    fn age_counts_from_the_sample_that_saw_the_count_change() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut m = HeartbeatMonitor::default();
        assert_eq!(m.report(t0), HeartbeatReport::None);
        m.sample(beat(0), t0);
        assert_eq!(m.report(ms(100)), HeartbeatReport::None);
        m.sample(beat(1), ms(100));
        m.sample(beat(1), ms(400));
        assert_eq!(
            m.report(ms(450)),
            HeartbeatReport::Beat {
                count: 1,
                age_ms: 350,
                period_ms: 500
            }
        );
        m.sample(beat(2), ms(600));
        assert_eq!(m.report(ms(600)).age(), Some(Duration::ZERO));
        // A card that stops beating: the age grows with the host's clock.
        for t in (700..5000).step_by(100) {
            m.sample(beat(2), ms(t));
        }
        assert_eq!(m.report(ms(5000)).age(), Some(Duration::from_millis(4400)));
    }

    #[test]
    fn a_new_page_or_no_page_forgets_the_last_beat() {
        let t0 = Instant::now();
        let mut m = HeartbeatMonitor::default();
        m.sample(beat(9), t0);
        m.sample(beat(0), t0);
        assert_eq!(m.report(t0), HeartbeatReport::None);
        m.sample(beat(9), t0);
        m.sample(None, t0);
        assert_eq!(m.report(t0), HeartbeatReport::None);
        // A count already set when first read counts as seen then.
        m.sample(beat(41), t0 + Duration::from_secs(3));
        assert_eq!(
            m.report(t0 + Duration::from_secs(3)).age(),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn report_lines_round_trip() {
        let b = HeartbeatReport::Beat {
            count: 12,
            age_ms: 340,
            period_ms: 1000,
        };
        assert_eq!(b.to_string(), "heartbeat=12 age_ms=340 period_ms=1000");
        assert_eq!(HeartbeatReport::parse(&b.to_string()), Some(b));
        assert_eq!(
            HeartbeatReport::parse("heartbeat=none\n"),
            Some(HeartbeatReport::None)
        );
        assert_eq!(HeartbeatReport::None.to_string(), "heartbeat=none");
        assert_eq!(HeartbeatReport::parse("error: unknown request"), None);
        assert_eq!(HeartbeatReport::parse("heartbeat=3 age_ms=x"), None);
    }
}
