//! [`Wakeup`]: a one-shot timer (a `timerfd`) in a worker thread's epoll
//! set, for a queue that waits for its rate limit's tokens
//! ([`crate::throttle`]) instead of spinning or sleeping in its thread.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A non-blocking, close-on-exec `CLOCK_MONOTONIC` timerfd.
#[derive(Debug)]
pub struct Wakeup {
    fd: OwnedFd,
}

impl Wakeup {
    /// A disarmed timer.
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Wakeup { fd })
    }

    /// Arms the timer to fire once, `after` from now (at least 1 ns: a
    /// zero value would disarm it). Re-arming replaces the deadline.
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec; no old value is asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry (call it when the descriptor is readable, or the
    /// level-triggered epoll set reports it again); returns whether the
    /// timer had fired.
    pub fn consume(&self) -> bool {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into `n`; the descriptor is non-blocking.
        let rc = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut n as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        rc == 8 && n > 0
    }
}

impl AsRawFd for Wakeup {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_after_its_deadline() {
        let w = Wakeup::new().unwrap();
        assert!(!w.consume(), "disarmed");
        w.arm(Duration::from_millis(1)).unwrap();
        assert_eq!(crate::poll_in(&[w.as_raw_fd()], 5000), Some(0));
        assert!(w.consume());
        assert!(!w.consume(), "one shot");
        // Re-arming replaces the deadline.
        w.arm(Duration::from_secs(3600)).unwrap();
        w.arm(Duration::ZERO).unwrap();
        assert_eq!(crate::poll_in(&[w.as_raw_fd()], 5000), Some(0));
        assert!(w.consume());
    }
}
