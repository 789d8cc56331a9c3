//! micd's side of the card heartbeat (`docs/micd.md` section 4, COSM's
//! `heartbeat_enable`): when a card that has beaten stays silent for the
//! card's `heartbeat_timeout`, it is declared crashed
//! ([`super::lifecycle::Input::HeartbeatMissed`]).
//!
//! What counts: the beats the card's bridge reports
//! ([`crate::heartbeat::HeartbeatReport`], aged on the host's clock). The
//! check is armed by the first beat of a boot. Before it (a card still
//! booting, a card whose driver predates the heartbeat) there is nothing to
//! miss, so only a card that has beaten can be declared crashed by it; a
//! card that never comes up is a matter for `micctl reset`.

use std::time::Duration;

use super::lifecycle::CardState;
use super::protocol::HeartbeatStatus;
use crate::heartbeat::HeartbeatReport;

/// One card's heartbeat settings, as the check needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatCheck {
    /// Whether a missed heartbeat is acted on (`heartbeat`).
    pub enabled: bool,
    /// How long a card may stay silent (`heartbeat_timeout`).
    pub timeout: Duration,
}

impl HeartbeatCheck {
    /// Whether the card in `state`, whose bridge reported `last` (`None`
    /// when the bridge did not answer), missed its heartbeat: only while
    /// `booting` or `online`, only after a first beat, and only when the
    /// last one is older than the timeout.
    pub fn missed(&self, state: CardState, last: Option<&HeartbeatReport>) -> bool {
        self.enabled
            && matches!(state, CardState::Booting | CardState::Online)
            && last
                .and_then(HeartbeatReport::age)
                .is_some_and(|age| age > self.timeout)
    }

    /// The heartbeat for `micctl status` (`docs/micd.md` section 8).
    pub fn status(&self, last: Option<&HeartbeatReport>) -> HeartbeatStatus {
        let beat = match last {
            Some(&HeartbeatReport::Beat {
                count,
                age_ms,
                period_ms,
            }) => Some((count, age_ms, period_ms)),
            _ => None,
        };
        HeartbeatStatus {
            enabled: self.enabled,
            timeout_s: self.timeout.as_secs(),
            count: beat.map(|b| b.0),
            age_ms: beat.map(|b| b.1),
            period_ms: beat.map(|b| b.2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK: HeartbeatCheck = HeartbeatCheck {
        enabled: true,
        timeout: Duration::from_secs(5),
    };

    fn aged(ms: u64) -> HeartbeatReport {
        HeartbeatReport::Beat {
            count: 3,
            age_ms: ms,
            period_ms: 1000,
        }
    }

    #[test]
    fn a_beat_older_than_the_timeout_is_missed_while_booting_or_online() {
        for state in [CardState::Booting, CardState::Online] {
            assert!(!CHECK.missed(state, Some(&aged(5000))));
            assert!(CHECK.missed(state, Some(&aged(5001))));
        }
        for state in [
            CardState::Ready,
            CardState::ShuttingDown,
            CardState::Resetting,
            CardState::ResetFailed,
        ] {
            assert!(!CHECK.missed(state, Some(&aged(60_000))), "{state}");
        }
    }

    #[test]
    fn nothing_is_missed_before_the_first_beat_without_an_answer_or_disabled() {
        assert!(!CHECK.missed(CardState::Online, Some(&HeartbeatReport::None)));
        assert!(!CHECK.missed(CardState::Online, None));
        let off = HeartbeatCheck {
            enabled: false,
            ..CHECK
        };
        assert!(!off.missed(CardState::Online, Some(&aged(60_000))));
    }

    #[test]
    fn status_shows_the_settings_and_the_last_beat() {
        let s = CHECK.status(Some(&aged(250)));
        assert_eq!(
            (s.enabled, s.timeout_s, s.count, s.age_ms, s.period_ms),
            (true, 5, Some(3), Some(250), Some(1000))
        );
        let s = CHECK.status(Some(&HeartbeatReport::None));
        assert_eq!((s.count, s.age_ms, s.period_ms), (None, None, None));
    }
}
