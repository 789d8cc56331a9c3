//! The card lifecycle as the host tracks it (`docs/vop-abi.md` section 6).

use crate::abi::{CardState, ShutdownStatus};

/// Something that moves the card's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardInput {
    /// The vCPUs started or resumed.
    Run,
    /// The card was reset.
    Reset,
    /// The machine is powering off.
    PowerOff,
    /// The card wrote `CARD_STATE`.
    CardStateWritten(u32),
    /// The card wrote `SHUTDOWN_STATUS`.
    ShutdownStatusWritten(u32),
    /// The host asked the card to shut down.
    ShutdownRequested,
    /// The host rebuilt the device page after a reset.
    PageRebuilt,
    /// The host could not rebuild the device page.
    RebuildFailed,
}

/// Card state and shutdown status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardTracker {
    state: CardState,
    status: ShutdownStatus,
    running: bool,
}

impl CardTracker {
    /// Starts from the device's register snapshot (`HELLO`).
    pub fn from_snapshot(running: bool, card_state: u32, shutdown_status: u32) -> Self {
        let status = ShutdownStatus::try_from(shutdown_status).unwrap_or(ShutdownStatus::Nop);
        let state = match (running, CardState::try_from(card_state)) {
            (false, _) => CardState::Ready,
            (true, Ok(CardState::Online)) => CardState::Online,
            (true, Ok(CardState::ShuttingDown)) => CardState::ShuttingDown,
            (true, _) => CardState::Booting,
        };
        CardTracker {
            state,
            status,
            running,
        }
    }

    /// Current state.
    pub fn state(&self) -> CardState {
        self.state
    }

    /// Last shutdown status.
    pub fn shutdown_status(&self) -> ShutdownStatus {
        self.status
    }

    /// Applies an input; returns the new state when it changed.
    pub fn apply(&mut self, input: CardInput) -> Option<CardState> {
        let old = self.state;
        match input {
            CardInput::Run => {
                self.running = true;
                if self.state == CardState::Ready {
                    self.state = CardState::Booting;
                }
            }
            CardInput::Reset => self.state = CardState::Resetting,
            CardInput::PageRebuilt => {
                if self.state == CardState::Resetting {
                    self.state = if self.running {
                        CardState::Booting
                    } else {
                        CardState::Ready
                    };
                }
            }
            CardInput::RebuildFailed => self.state = CardState::ResetFailed,
            CardInput::PowerOff => {
                self.running = false;
                self.state = CardState::Ready;
            }
            CardInput::CardStateWritten(v) => match CardState::try_from(v) {
                Ok(CardState::Online) => self.state = CardState::Online,
                Ok(CardState::ShuttingDown) => self.state = CardState::ShuttingDown,
                _ => {}
            },
            CardInput::ShutdownStatusWritten(v) => {
                if let Ok(s) = ShutdownStatus::try_from(v) {
                    self.status = s;
                }
            }
            CardInput::ShutdownRequested => {
                if matches!(self.state, CardState::Online | CardState::Booting) {
                    self.state = CardState::ShuttingDown;
                }
            }
        }
        (self.state != old).then_some(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sets_the_starting_state() {
        assert_eq!(
            CardTracker::from_snapshot(false, 2, 0).state(),
            CardState::Ready
        );
        assert_eq!(
            CardTracker::from_snapshot(true, 0, 0).state(),
            CardState::Booting
        );
        assert_eq!(
            CardTracker::from_snapshot(true, 2, 0).state(),
            CardState::Online
        );
        let t = CardTracker::from_snapshot(true, 3, 1);
        assert_eq!(t.state(), CardState::ShuttingDown);
        assert_eq!(t.shutdown_status(), ShutdownStatus::Crashed);
    }

    #[test]
    fn boot_reboot_poweroff() {
        let mut t = CardTracker::from_snapshot(false, 0, 0);
        assert_eq!(t.apply(CardInput::Run), Some(CardState::Booting));
        assert_eq!(t.apply(CardInput::ShutdownStatusWritten(0)), None);
        assert_eq!(
            t.apply(CardInput::CardStateWritten(2)),
            Some(CardState::Online)
        );
        // Reboot: status first, then state, then the reset.
        t.apply(CardInput::ShutdownStatusWritten(4));
        assert_eq!(
            t.apply(CardInput::CardStateWritten(3)),
            Some(CardState::ShuttingDown)
        );
        assert_eq!(t.shutdown_status(), ShutdownStatus::Restart);
        assert_eq!(t.apply(CardInput::Reset), Some(CardState::Resetting));
        assert_eq!(t.apply(CardInput::PageRebuilt), Some(CardState::Booting));
        assert_eq!(t.shutdown_status(), ShutdownStatus::Restart);
        assert_eq!(
            t.apply(CardInput::CardStateWritten(2)),
            Some(CardState::Online)
        );
        // Power off.
        t.apply(CardInput::ShutdownStatusWritten(3));
        t.apply(CardInput::CardStateWritten(3));
        assert_eq!(t.apply(CardInput::PowerOff), Some(CardState::Ready));
        assert_eq!(t.shutdown_status(), ShutdownStatus::PowerOff);
    }

    #[test]
    fn crash_and_failed_rebuild() {
        let mut t = CardTracker::from_snapshot(true, 2, 0);
        t.apply(CardInput::ShutdownStatusWritten(1));
        t.apply(CardInput::CardStateWritten(3));
        assert_eq!(t.state(), CardState::ShuttingDown);
        assert_eq!(t.shutdown_status(), ShutdownStatus::Crashed);
        t.apply(CardInput::Reset);
        assert_eq!(
            t.apply(CardInput::RebuildFailed),
            Some(CardState::ResetFailed)
        );
    }

    #[test]
    fn host_request_and_garbage_writes() {
        let mut t = CardTracker::from_snapshot(true, 2, 0);
        assert_eq!(t.apply(CardInput::CardStateWritten(77)), None);
        assert_eq!(t.apply(CardInput::ShutdownStatusWritten(99)), None);
        assert_eq!(t.shutdown_status(), ShutdownStatus::Nop);
        assert_eq!(
            t.apply(CardInput::ShutdownRequested),
            Some(CardState::ShuttingDown)
        );
    }
}
