//! SIGINT and SIGTERM as a readable descriptor, so the one event loop notices
//! them like any other event. This belongs to the process, not to a card.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vmm_sys_util::signal::{block_signal, create_sigset, Error as SignalError};

/// The signals that stop the process.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Setting up the signal descriptor failed.
#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    /// The signals could not be blocked.
    /// (vmm-sys-util's signal error does not implement `std::error::Error`,
    /// so it is part of the message rather than a `source`.)
    #[error("cannot block signal {signal}: {cause}")]
    Block {
        /// The signal.
        signal: libc::c_int,
        /// Cause.
        cause: SignalError,
    },
    /// The signal set could not be built.
    #[error("cannot build the signal set")]
    Sigset(#[source] vmm_sys_util::errno::Error),
    /// `signalfd` failed.
    #[error("signalfd")]
    SignalFd(#[source] io::Error),
}

/// SIGINT/SIGTERM delivered through a signalfd (they are blocked for the
/// calling thread, so create this before starting other threads).
pub struct StopSignals {
    fd: File,
}

impl StopSignals {
    /// Blocks the stop signals and opens a non-blocking signalfd for them.
    pub fn new() -> Result<Self, SignalsError> {
        for signal in STOP_SIGNALS {
            match block_signal(signal) {
                Ok(()) | Err(SignalError::SignalAlreadyBlocked(_)) => {}
                Err(cause) => return Err(SignalsError::Block { signal, cause }),
            }
        }
        let set = create_sigset(&STOP_SIGNALS).map_err(SignalsError::Sigset)?;
        // vmm-sys-util blocks signals and builds the set, but has no signalfd
        // wrapper (its `signal` module is for handlers), so this one call is ours.
        // SAFETY: `set` is an initialised sigset; the call only reads it and
        // returns a new descriptor or -1.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(SignalsError::SignalFd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by signalfd and nothing else owns it.
        let fd = unsafe { File::from_raw_fd(fd) };
        Ok(StopSignals { fd })
    }

    /// Whether a stop signal is waiting (consumes it).
    pub fn pending(&mut self) -> bool {
        // One `struct signalfd_siginfo` is 128 bytes.
        let mut buf = [0u8; 128];
        matches!(self.fd.read(&mut buf), Ok(n) if n > 0)
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_signal_is_read_not_delivered() {
        // Blocking is per thread: this test's thread owns its mask.
        let mut s = StopSignals::new().unwrap();
        assert!(!s.pending());
        // SAFETY: raising a signal this thread has blocked queues it.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
        assert_eq!(rc, 0);
        assert!(s.pending());
        assert!(!s.pending());
        // Creating a second one with the signals already blocked works.
        assert!(StopSignals::new().is_ok());
    }
}
