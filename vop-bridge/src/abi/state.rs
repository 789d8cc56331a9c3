//! The card's state and shutdown status as the host tracks them
//! (`docs/vop-abi.md` section 6).

use std::fmt;

/// Card state as the host tracks it (upstream `MIC_READY` .. `MIC_RESET_FAILED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CardState {
    /// Powered, not running.
    Ready = 0,
    /// Running, not yet online.
    Booting = 1,
    /// The card's driver is up.
    Online = 2,
    /// The card is halting, powering off, restarting or crashed.
    ShuttingDown = 3,
    /// The card was reset; the host rebuilds the device page.
    Resetting = 4,
    /// The device page could not be rebuilt after a reset.
    ResetFailed = 5,
}

impl CardState {
    /// Name as shown to users (upstream sysfs `state` spelling).
    pub fn name(self) -> &'static str {
        match self {
            CardState::Ready => "ready",
            CardState::Booting => "booting",
            CardState::Online => "online",
            CardState::ShuttingDown => "shutting_down",
            CardState::Resetting => "resetting",
            CardState::ResetFailed => "reset_failed",
        }
    }
}

impl TryFrom<u32> for CardState {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, u32> {
        Ok(match value {
            0 => CardState::Ready,
            1 => CardState::Booting,
            2 => CardState::Online,
            3 => CardState::ShuttingDown,
            4 => CardState::Resetting,
            5 => CardState::ResetFailed,
            other => return Err(other),
        })
    }
}

impl fmt::Display for CardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the card stopped (upstream `MIC_NOP` .. `MIC_RESTART`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ShutdownStatus {
    /// Nothing to report.
    Nop = 0,
    /// The card panicked.
    Crashed = 1,
    /// The card halted.
    Halted = 2,
    /// The card powered off.
    PowerOff = 3,
    /// The card is rebooting.
    Restart = 4,
}

impl ShutdownStatus {
    /// Name as shown to users (upstream sysfs `shutdown_status` spelling).
    pub fn name(self) -> &'static str {
        match self {
            ShutdownStatus::Nop => "nop",
            ShutdownStatus::Crashed => "crashed",
            ShutdownStatus::Halted => "halted",
            ShutdownStatus::PowerOff => "poweroff",
            ShutdownStatus::Restart => "restart",
        }
    }
}

impl TryFrom<u32> for ShutdownStatus {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, u32> {
        Ok(match value {
            0 => ShutdownStatus::Nop,
            1 => ShutdownStatus::Crashed,
            2 => ShutdownStatus::Halted,
            3 => ShutdownStatus::PowerOff,
            4 => ShutdownStatus::Restart,
            other => return Err(other),
        })
    }
}

impl fmt::Display for ShutdownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for v in 0..6 {
            assert_eq!(CardState::try_from(v).unwrap() as u32, v);
        }
        assert!(CardState::try_from(6).is_err());
        assert_eq!(CardState::ShuttingDown.name(), "shutting_down");
        for v in 0..5 {
            assert_eq!(ShutdownStatus::try_from(v).unwrap() as u32, v);
        }
        assert_eq!(ShutdownStatus::PowerOff.to_string(), "poweroff");
    }
}
