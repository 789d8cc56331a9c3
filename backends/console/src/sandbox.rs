//! What `mic-console` may do once sandboxed (`mic_backend_common::sandbox`;
//! `backends/README.md`, "Sandbox"), on top of what every daemon needs:
//!
//! - a pty or stdio terminal (opened at startup): its size
//!   (`TIOCGWINSZ`, checked by a timer), its settings (`TCGETS`, and
//!   `TCSETS*` to restore a stdio terminal on exit); with `--pty`,
//!   `/dev/ptmx` and the daemon's own `/dev/pts/N` stay readable and
//!   writable (nothing reopens them today);
//! - `--unix PATH`: the socket's directory, to remove the socket on exit
//!   (it is bound at startup and clients are accepted on it);
//! - `--log FILE`: the log's directory, to append to the log, create a new
//!   one and rename the full one to `FILE.1` (`rename`);
//! - worker threads: the above but the directories (the transmit worker
//!   writes and rotates the log, the receive worker accepts `--unix`
//!   clients, the control worker checks the size); they open files only
//!   with `--log`;
//! - with `--stdio`, Ctrl-] ends the daemon by signalling itself (`kill`
//!   of its own pid, allowed to every daemon).

use std::path::Path;

use mic_backend_common::sandbox::{parent_dir, Allow, PathAccess, Policy};

use crate::config::{ConsoleConfig, ConsoleTarget};

/// The terminal's size and settings (`host.rs`, `terminal.rs`) and the
/// size timer (`backend.rs`).
const TERMINAL: &[Allow] = &[
    Allow::Ioctl(libc::TIOCGWINSZ),
    Allow::Ioctl(libc::TCGETS),
    Allow::Ioctl(libc::TCSETS),
    Allow::Ioctl(libc::TCSETSW),
    Allow::Ioctl(libc::TCSETSF),
    Allow::Call(libc::SYS_timerfd_create),
    Allow::Call(libc::SYS_timerfd_settime),
    Allow::Call(libc::SYS_timerfd_gettime),
];

/// The workers: the receive worker reads the host side and accepts a new
/// `--unix` client; the control worker checks the terminal size.
const WORKER: &[Allow] = &[
    Allow::Call(libc::SYS_accept4),
    Allow::Call(libc::SYS_shutdown),
    Allow::Call(libc::SYS_recvfrom),
    Allow::Call(libc::SYS_sendto),
    Allow::Ioctl(libc::FIONBIO),
];

/// Log rotation (`logfile.rs`).
const LOG: &[Allow] = &[Allow::Call(libc::SYS_rename)];

/// `mic-console`'s sandbox policy for `cfg`; `pty` is the pseudo-terminal
/// the daemon opened for `--pty`.
pub fn policy(cfg: &ConsoleConfig, pty: Option<&Path>) -> Policy {
    let mut p = Policy::new("mic-console", &cfg.socket);
    p.allow_calls(TERMINAL);
    p.allow_worker_calls(TERMINAL);
    p.allow_worker_calls(WORKER);
    match &cfg.target {
        ConsoleTarget::Pty => {
            p.allow_path("/dev/ptmx", PathAccess::ReadWriteFile);
            if let Some(pts) = pty {
                p.allow_path(pts, PathAccess::ReadWriteFile);
            }
        }
        ConsoleTarget::Unix(path) => {
            p.allow_path(parent_dir(path), PathAccess::SocketDir);
        }
        ConsoleTarget::Stdio => {}
    }
    if let Some(log) = &cfg.log {
        p.allow_calls(LOG);
        // The transmit worker writes and rotates the log.
        p.allow_worker_calls(LOG);
        p.workers_open_files();
        p.allow_path(parent_dir(log), PathAccess::LogDir);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConsoleArgs;
    use clap::Parser;

    fn cfg(args: &[&str]) -> ConsoleConfig {
        let mut v = vec!["mic-console", "--socket-path", "/run/c.sock"];
        v.extend_from_slice(args);
        ConsoleConfig::from_args(ConsoleArgs::try_parse_from(v).unwrap()).unwrap()
    }

    #[test]
    fn per_target_and_log() {
        let pty = policy(&cfg(&["--pty"]), Some(Path::new("/dev/pts/7")));
        assert!(pty.has_path(Path::new("/dev/pts/7"), PathAccess::ReadWriteFile));
        assert!(pty.has_path(Path::new("/dev/ptmx"), PathAccess::ReadWriteFile));
        assert!(!pty.syscalls.contains(&Allow::Call(libc::SYS_rename)));
        let unix = policy(&cfg(&["--unix", "/u/con", "--log", "/l/card.log"]), None);
        assert!(unix.has_path(Path::new("/u"), PathAccess::SocketDir));
        assert!(unix.has_path(Path::new("/l"), PathAccess::LogDir));
        assert!(unix.has_path(Path::new("/run"), PathAccess::SocketDir));
        assert!(unix.syscalls.contains(&Allow::Call(libc::SYS_rename)));
        assert!(unix
            .worker_syscalls
            .contains(&Allow::Call(libc::SYS_rename)));
        assert!(unix.workers_open_files);
        assert!(!pty.workers_open_files);
        let stdio = policy(&cfg(&["--stdio"]), None);
        assert_eq!(stdio.paths.len(), 2, "temporary and socket directories");
    }
}
