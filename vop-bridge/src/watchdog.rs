//! Deadlines for blocking socket operations.
//!
//! The `vhost` crate's frontend reads its replies with blocking `recvmsg`
//! and retries `EAGAIN` for ever, so a socket timeout (`SO_RCVTIMEO`) only
//! turns an endless wait into an endless retry loop. The one way to bound a
//! request is from outside: while an operation runs, its socket is *armed*
//! with a deadline, and a watchdog thread shuts the socket down
//! (`shutdown(2)`) when the deadline passes. The blocked call then sees end
//! of file and fails; the caller learns from [`Armed::fired`] that the cause
//! was the deadline. The socket is unusable afterwards, as a peer that stops
//! answering is gone for the bridge (`docs/architecture.md`, "Bounded
//! waits").
//!
//! When the process is told to stop, [`Watchdog::expire_all`] fires every
//! armed deadline at once and makes later ones short, so no stalled peer
//! holds the exit.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long an operation may take once the process is stopping.
pub const STOPPING_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    armed: HashMap<u64, Entry>,
    next_id: u64,
    stopping: bool,
}

struct Entry {
    fd: RawFd,
    deadline: Instant,
    fired: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (plain inserts/removes).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The deadlines of armed sockets and the thread that enforces them.
pub struct Watchdog {
    shared: Arc<Shared>,
}

/// One armed operation; dropping it disarms the deadline.
#[must_use = "the deadline is disarmed when this is dropped"]
pub struct Armed<'a> {
    watchdog: &'a Watchdog,
    id: u64,
}

impl Watchdog {
    /// A watchdog with its own thread.
    pub fn new() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("deadlines".into())
            .spawn(move || run(&s))?;
        Ok(Watchdog { shared })
    }

    /// The process's watchdog (its thread starts on first use).
    ///
    /// # Panics
    /// When the thread cannot be started (the process is out of threads or
    /// memory), on first use.
    pub fn global() -> &'static Watchdog {
        static GLOBAL: OnceLock<Watchdog> = OnceLock::new();
        GLOBAL.get_or_init(|| Watchdog::new().expect("cannot start the deadline thread"))
    }

    /// Arms `fd` for `timeout` (shorter once the process is stopping).
    ///
    /// `fd` must stay open until the returned guard is dropped: the watchdog
    /// calls `shutdown(2)` on it until then, and on nothing afterwards.
    pub fn arm(&self, fd: RawFd, timeout: Duration) -> Armed<'_> {
        let mut st = self.shared.lock();
        let timeout = if st.stopping {
            timeout.min(STOPPING_TIMEOUT)
        } else {
            timeout
        };
        let id = st.next_id;
        st.next_id += 1;
        st.armed.insert(
            id,
            Entry {
                fd,
                deadline: Instant::now() + timeout,
                fired: false,
            },
        );
        drop(st);
        self.shared.wake.notify_one();
        Armed { watchdog: self, id }
    }

    /// Fires every armed deadline now, and bounds later ones by
    /// [`STOPPING_TIMEOUT`] (the process is stopping).
    pub fn expire_all(&self) {
        let mut st = self.shared.lock();
        st.stopping = true;
        let now = Instant::now();
        for e in st.armed.values_mut() {
            e.deadline = e.deadline.min(now);
        }
        drop(st);
        self.shared.wake.notify_one();
    }

    /// Whether [`Watchdog::expire_all`] was called.
    pub fn stopping(&self) -> bool {
        self.shared.lock().stopping
    }
}

impl Armed<'_> {
    /// Whether the deadline passed and the socket was shut down.
    pub fn fired(&self) -> bool {
        self.watchdog
            .shared
            .lock()
            .armed
            .get(&self.id)
            .is_some_and(|e| e.fired)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // Once removed under the lock, the thread can no longer touch the fd.
        self.watchdog.shared.lock().armed.remove(&self.id);
    }
}

/// The watchdog thread: sleeps until the earliest deadline and shuts down
/// the sockets whose deadline passed.
fn run(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        let now = Instant::now();
        for e in st.armed.values_mut().filter(|e| !e.fired) {
            if e.deadline <= now {
                // SAFETY: the fd is open: its guard is alive (it removes the
                // entry under this lock before its owner may close the fd),
                // and shutdown(2) only changes the socket's state.
                unsafe { libc::shutdown(e.fd, libc::SHUT_RDWR) };
                e.fired = true;
            }
        }
        let next = st
            .armed
            .values()
            .filter(|e| !e.fired)
            .map(|e| e.deadline)
            .min();
        st = match next {
            Some(d) => {
                let wait = d.saturating_duration_since(Instant::now());
                shared
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_read_that_overruns_its_deadline_ends() {
        let wd = Watchdog::new().unwrap();
        let (mut a, _b) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let guard = wd.arm(a.as_raw_fd(), Duration::from_millis(150));
        let mut buf = [0u8; 1];
        // The peer never writes: only the deadline ends this read.
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        assert!(guard.fired());
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_disarmed_socket_is_left_alone() {
        let wd = Watchdog::new().unwrap();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let guard = wd.arm(a.as_raw_fd(), Duration::from_millis(50));
        assert!(!guard.fired());
        drop(guard);
        std::thread::sleep(Duration::from_millis(150));
        use std::io::Write;
        b.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).unwrap(), 1);
    }

    #[test]
    fn stopping_fires_armed_deadlines_and_shortens_new_ones() {
        let wd = Arc::new(Watchdog::new().unwrap());
        let (mut a, _b) = UnixStream::pair().unwrap();
        let (mut c, _d) = UnixStream::pair().unwrap();
        let guard = wd.arm(a.as_raw_fd(), Duration::from_secs(3600));
        let start = Instant::now();
        let w = wd.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.expire_all();
        });
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        assert!(guard.fired());
        t.join().unwrap();
        assert!(wd.stopping());
        let g2 = wd.arm(c.as_raw_fd(), Duration::from_secs(3600));
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert!(g2.fired());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
