//! How long micd waits before booting a card again that keeps failing
//! before it comes online (a kernel that panics at once, a ramdisk that
//! cannot mount): without a wait, the `reboot` policy would boot such a
//! card as fast as QEMU starts, for ever. Pure; the supervisor applies it
//! (`docs/micd.md`, "Lifecycle").

use std::time::Duration;

/// The longest wait between two boots.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Consecutive boots that ended before the card came online.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootBackoff {
    failed: u32,
}

impl BootBackoff {
    /// The card came online: the next failure starts over.
    pub fn online(&mut self) {
        self.failed = 0;
    }

    /// A boot ended before the card came online; returns how long to wait
    /// before booting it again on the policy's behalf: 1 s after the
    /// first such boot, doubling up to [`MAX_DELAY`].
    pub fn failed(&mut self) -> Duration {
        self.failed = self.failed.saturating_add(1);
        let secs = 1u64 << (self.failed - 1).min(6);
        Duration::from_secs(secs).min(MAX_DELAY)
    }

    /// Consecutive boots that ended before online.
    pub fn failures(&self) -> u32 {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_a_minute_and_starts_over_once_online() {
        let mut b = BootBackoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.failed().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.failures(), 9);
        b.online();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(), Duration::from_secs(1));
    }
}
