//! The bridge's recent events, answered to `history` on the control
//! socket: what an admin or a test queries to see what happened (a page
//! adopted, a backend lost and back, the card's state changes), rather
//! than reading the log, which is rate-limited and worded for people.

use std::collections::VecDeque;
use std::fmt;

use crate::abi::{CardState, ShutdownStatus};

/// Events kept; older ones are dropped (a card's boot makes about five).
pub const HISTORY_LEN: usize = 64;

/// One event, one line of `history`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Attached to the device; `adopted`: the card's page was taken over
    /// rather than a fresh one published.
    Attached {
        /// The page was adopted.
        adopted: bool,
    },
    /// The device link went away.
    Detached,
    /// The card's state or shutdown status changed.
    State(CardState, ShutdownStatus),
    /// Device `index`'s backend went away.
    BackendLost(usize),
    /// Device `index`'s backend is back.
    BackendBack(usize),
    /// Device `index`'s backend changed its config space and the card was
    /// told.
    ConfigChanged(usize),
    /// Device `index` was removed; `acked`: the card acknowledged it.
    Removed {
        /// The device.
        index: usize,
        /// The card let go of it in time.
        acked: bool,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Attached { adopted: true } => write!(f, "attached adopted"),
            Event::Attached { adopted: false } => write!(f, "attached published"),
            Event::Detached => write!(f, "detached"),
            Event::State(s, st) => write!(f, "state {s} {st}"),
            Event::BackendLost(i) => write!(f, "backend {i} lost"),
            Event::BackendBack(i) => write!(f, "backend {i} back"),
            Event::ConfigChanged(i) => write!(f, "config {i} changed"),
            Event::Removed { index, acked: true } => write!(f, "removed {index} acked"),
            Event::Removed {
                index,
                acked: false,
            } => write!(f, "removed {index} unacked"),
        }
    }
}

/// The last [`HISTORY_LEN`] events.
#[derive(Debug, Default)]
pub struct History(VecDeque<Event>);

impl History {
    /// Records `e`, dropping the oldest event when full.
    pub fn push(&mut self, e: Event) {
        if self.0.len() == HISTORY_LEN {
            self.0.pop_front();
        }
        self.0.push_back(e);
    }

    /// One line per event, oldest first.
    pub fn lines(&self) -> String {
        let lines: Vec<String> = self.0.iter().map(Event::to_string).collect();
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_oldest_first_and_bounded() {
        let mut h = History::default();
        h.push(Event::Attached { adopted: false });
        h.push(Event::State(CardState::Online, ShutdownStatus::Nop));
        h.push(Event::Removed {
            index: 2,
            acked: true,
        });
        assert_eq!(
            h.lines(),
            "attached published\nstate online nop\nremoved 2 acked"
        );
        for i in 0..100 {
            h.push(Event::BackendLost(i));
        }
        let lines = h.lines();
        assert_eq!(lines.lines().count(), HISTORY_LEN);
        assert!(lines.ends_with("backend 99 lost"));
    }
}
