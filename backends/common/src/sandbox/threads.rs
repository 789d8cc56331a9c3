//! Narrower seccomp filters for the threads that handle what a guest or a
//! frontend sends: the vring worker threads (and `mic-blk`'s I/O helpers)
//! and the relay threads. The process-wide filter (`seccomp.rs`) is what
//! the daemon loop's thread needs (it creates sockets, directories and
//! threads for every frontend); a thread of one of these kinds adds, on
//! [`enter`], a second filter of its own kind. Filters stack: a call runs
//! only if every filter of the thread allows it.
//!
//! The threads' lists were taken the same way as the process's (`strace
//! -f` over the integration tests, grouped by thread name). Where a thread
//! kind must not open files, a third filter makes `openat` fail with
//! `EACCES` instead of ending the daemon: the C library opens
//! `/sys/devices/system/cpu/online` in whichever thread first needs a new
//! allocator arena, and a panic's backtrace reads the executable; both
//! cope with a refusal.
//!
//! The vhost-user request thread (started inside `vhost-user-backend`,
//! which offers no hook at its start) keeps the process-wide filter.

use std::cell::Cell;
use std::sync::OnceLock;

use log::error;
use seccompiler::BpfProgram;

use super::seccomp::{self, Allow};

/// Kinds of threads with filters of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vring worker thread, or another thread that processes requests
    /// for one (`mic-blk`'s I/O helpers).
    Worker,
    /// A control-channel relay thread (`relay.rs`).
    Relay,
}

/// The thread filters of a sandboxed daemon.
pub(crate) struct Programs {
    /// For [`ThreadKind::Worker`].
    pub(crate) worker: BpfProgram,
    /// For [`ThreadKind::Relay`].
    pub(crate) relay: BpfProgram,
    /// `openat` fails with `EACCES`; for a kind that opens no file.
    pub(crate) no_open: BpfProgram,
    /// Whether workers open files (then they do not get `no_open`).
    pub(crate) workers_open: bool,
}

/// Set once by [`super::apply`]; empty without the sandbox.
static PROGRAMS: OnceLock<Programs> = OnceLock::new();

thread_local! {
    /// Whether this thread has entered its kind already.
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Compiles the thread filters of a policy and keeps them for [`enter`].
pub(crate) fn prepare(worker: &[Allow], workers_open: bool) -> Result<(), seccomp::Error> {
    let programs = Programs {
        worker: seccomp::compile(worker)?,
        relay: seccomp::compile(&[seccomp::THREAD_BASE, seccomp::RELAY].concat())?,
        no_open: seccomp::compile_refusal(&[libc::SYS_openat], libc::EACCES)?,
        workers_open,
    };
    let _ = PROGRAMS.set(programs);
    Ok(())
}

/// Confines the calling thread to the list of its `kind`, once: later
/// calls from the same thread cost a thread-local load. Does nothing when
/// the daemon runs without the sandbox. Call it from the thread's own code
/// before it handles anything a peer sent.
pub fn enter(kind: ThreadKind) {
    if ENTERED.with(|e| e.replace(true)) {
        return;
    }
    let Some(p) = PROGRAMS.get() else {
        return;
    };
    let (program, no_open) = match kind {
        ThreadKind::Worker => (&p.worker, !p.workers_open),
        ThreadKind::Relay => (&p.relay, true),
    };
    // The kind's own list last: it does not allow adding filters.
    let mut result = Ok(());
    if no_open {
        result = seccompiler::apply_filter(&p.no_open);
    }
    if let Err(e) = result.and_then(|()| seccompiler::apply_filter(program)) {
        // The process-wide filter still holds.
        error!("cannot narrow the seccomp filter of a {kind:?} thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::tests::{in_child, run_child, CHILD_OK};

    /// In child processes: a worker thread that entered its kind goes on
    /// with its own list, is refused `openat` (EACCES), and is killed by a
    /// call the process-wide list allows but its own does not (`socket`),
    /// which the main thread may still make.
    #[test]
    fn worker_threads_are_narrower() {
        use std::os::unix::process::ExitStatusExt;
        let status = run_child("threads_child", &[]);
        assert_eq!(status.code(), Some(CHILD_OK), "{status:?}");
        let status = run_child("threads_socket_child", &[]);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    }

    /// Runs `f` in a worker thread of a sandboxed process, after the main
    /// thread made a socket.
    fn in_worker(f: fn()) {
        let p = super::super::Policy::new("mic-x", &crate::SocketArgs::inherited(3));
        super::super::apply(super::super::SandboxMode::On, &p).unwrap();
        drop(std::os::unix::net::UnixDatagram::unbound().unwrap());
        std::thread::spawn(move || {
            enter(ThreadKind::Worker);
            enter(ThreadKind::Worker);
            f()
        })
        .join()
        .unwrap();
    }

    #[test]
    fn threads_child() {
        if !in_child("threads_child") {
            return;
        }
        in_worker(|| {
            let e = std::fs::File::open("/").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EACCES));
            let v = vec![7u8; 1 << 20];
            assert_eq!(v.iter().map(|b| usize::from(*b)).sum::<usize>(), 7 << 20);
            std::process::exit(CHILD_OK);
        });
    }

    #[test]
    fn threads_socket_child() {
        if !in_child("threads_socket_child") {
            return;
        }
        in_worker(|| {
            // Not on a worker's list: ends the process.
            drop(std::os::unix::net::UnixDatagram::unbound());
            std::process::exit(0);
        });
    }
}
