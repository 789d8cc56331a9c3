//! SIGINT and SIGTERM as a readable descriptor, so the one event loop notices
//! them like any other event. This belongs to the process, not to a card.
//!
//! A loop only notices a signal between events, and some steps wait on a
//! peer. [`StopSignals::watch`] therefore reads the signals on a thread of
//! its own: it cancels every armed socket deadline
//! ([`crate::watchdog::Watchdog::expire_all`] or whatever the caller passes),
//! tells the loop through an eventfd, and ends the process itself if the
//! loop has not finished within a grace period. A stop signal ends the
//! process within that period in every state (`docs/architecture.md`,
//! "Bounded waits").

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
    /// The watching thread or its eventfd could not be created.
    #[error("stop signal watcher")]
    Watcher(#[source] io::Error),
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

    /// Moves the signals to a thread of their own: on a stop signal it calls
    /// `on_signal`, makes the returned [`StopWatch`] readable, and if
    /// [`StopWatch::finished`] has not been called `grace` later, ends the
    /// process (exit status 0, as after a clean stop).
    ///
    /// Call this before starting other threads, from the thread that created
    /// the signals (the mask is inherited).
    pub fn watch(
        mut self,
        grace: Duration,
        on_signal: impl Fn() + Send + 'static,
    ) -> Result<StopWatch, SignalsError> {
        let notice = EventFd::new(EFD_NONBLOCK).map_err(SignalsError::Watcher)?;
        let tell = notice.try_clone().map_err(SignalsError::Watcher)?;
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        std::thread::Builder::new()
            .name("stop-signals".into())
            .spawn(move || {
                self.wait();
                on_signal();
                if let Err(e) = tell.write(1) {
                    warn!("telling the event loop about the stop signal: {e}");
                }
                std::thread::sleep(grace);
                if !done.load(Ordering::Acquire) {
                    warn!("still stopping {grace:?} after the signal; exiting now");
                    std::process::exit(0);
                }
            })
            .map_err(SignalsError::Watcher)?;
        Ok(StopWatch { notice, finished })
    }

    /// Blocks until a stop signal arrives (and consumes it).
    fn wait(&mut self) {
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that lives across the call.
            let n = unsafe { libc::poll(&mut pfd, 1, -1) };
            if n > 0 && self.pending() {
                return;
            }
        }
    }
}

/// The event loop's side of [`StopSignals::watch`].
pub struct StopWatch {
    notice: EventFd,
    finished: Arc<AtomicBool>,
}

impl StopWatch {
    /// Whether a stop signal arrived (consumes the notice).
    pub fn pending(&self) -> bool {
        matches!(self.notice.read(), Ok(n) if n > 0)
    }

    /// The process finished stopping: the watcher need not end it.
    pub fn finished(&self) {
        self.finished.store(true, Ordering::Release);
    }
}

impl AsRawFd for StopWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.notice.as_raw_fd()
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
