//! What `mic-blk` may do once sandboxed (`mic_backend_common::sandbox`;
//! `backends/README.md`, "Sandbox"): on top of what every daemon needs,
//! the image, read and written (read only with `--readonly`) through the
//! descriptors opened at startup, synced, and with holes punched
//! (`DISCARD`, `WRITE_ZEROES`); the rate limits' timers and the stats
//! thread (`limits.rs`).

use mic_backend_common::sandbox::{parent_dir, Allow, PathAccess, Policy};

use crate::config::BlkConfig;

/// The image I/O of the queue workers and the I/O helper threads
/// (`disk.rs`): positioned reads and writes, vectored or not, `fdatasync`
/// for `FLUSH` and write-through, `fallocate` for discard and write-zeroes.
const IMAGE_IO: &[Allow] = &[
    Allow::Call(libc::SYS_pread64),
    Allow::Call(libc::SYS_pwrite64),
    Allow::Call(libc::SYS_preadv),
    Allow::Call(libc::SYS_pwritev),
    Allow::Call(libc::SYS_fdatasync),
    Allow::Call(libc::SYS_fsync),
    Allow::Call(libc::SYS_fallocate),
];

/// In-flight tracking (`mic_backend_common::inflight`): the relay makes the
/// region (a memfd of the size the frontend's queues need) when the
/// frontend asks for one, and maps whatever region the frontend hands back.
const INFLIGHT_REGION: &[Allow] = &[
    Allow::Call(libc::SYS_memfd_create),
    Allow::Call(libc::SYS_ftruncate),
];

/// Rate limits and stats (`limits.rs`, `mic_backend_common::control`).
const LIMITS: &[Allow] = &[
    // A throttled queue arms its wakeup (a timerfd created at startup).
    Allow::Call(libc::SYS_timerfd_settime),
    // The stats thread reads SIGUSR1 from a signalfd, created once the
    // sandbox is on.
    Allow::Call(libc::SYS_signalfd4),
];

/// What a worker thread adds for the rate limits: arming its wakeup.
const WORKER_LIMITS: &[Allow] = &[Allow::Call(libc::SYS_timerfd_settime)];

/// `mic-blk`'s sandbox policy for `cfg`.
pub fn policy(cfg: &BlkConfig) -> Policy {
    let mut p = Policy::new("mic-blk", &cfg.socket);
    p.allow_calls(IMAGE_IO);
    p.allow_calls(INFLIGHT_REGION);
    p.allow_relay_calls(INFLIGHT_REGION);
    // Workers and I/O helpers: the image I/O, and no file opened.
    p.allow_worker_calls(IMAGE_IO);
    let access = if cfg.readonly {
        PathAccess::ReadFile
    } else {
        PathAccess::ReadWriteFile
    };
    p.allow_path(&cfg.image, access);
    p.allow_calls(LIMITS);
    // A worker arms its queue's wakeup when the rate limit stops it.
    p.allow_worker_calls(WORKER_LIMITS);
    // The stats socket is bound (a stale one replaced) once the sandbox is
    // on, and removed on exit.
    if let Some(stats) = &cfg.limits.stats_socket {
        p.allow_path(parent_dir(stats), PathAccess::SocketDir);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use clap::Parser;
    use std::path::Path;

    fn cfg(args: &[&str]) -> BlkConfig {
        let mut v = vec![
            "mic-blk",
            "--socket-path",
            "/run/b.sock",
            "--image",
            "/i/d.img",
        ];
        v.extend_from_slice(args);
        BlkConfig::from_cli(Cli::try_parse_from(v).unwrap()).unwrap()
    }

    #[test]
    fn image_and_socket_directory() {
        let p = policy(&cfg(&[]));
        assert!(p.has_path(Path::new("/i/d.img"), PathAccess::ReadWriteFile));
        assert!(p.has_path(Path::new("/run"), PathAccess::SocketDir));
        assert!(p.syscalls.contains(&Allow::Call(libc::SYS_fallocate)));
        assert!(p.worker_syscalls.contains(&Allow::Call(libc::SYS_pwritev)));
        assert!(!p.worker_syscalls.contains(&Allow::Socket(libc::AF_UNIX)));
        assert!(p
            .relay_syscalls
            .contains(&Allow::Call(libc::SYS_memfd_create)));
        assert!(!p
            .worker_syscalls
            .contains(&Allow::Call(libc::SYS_memfd_create)));
        assert!(!p.workers_open_files);
        assert!(p.tcp.is_empty());
        let stats = policy(&cfg(&["--stats-socket", "/st/s.sock"]));
        assert!(stats.has_path(Path::new("/st"), PathAccess::SocketDir));
        let ro = policy(&cfg(&["--readonly"]));
        assert!(ro.has_path(Path::new("/i/d.img"), PathAccess::ReadFile));
        assert!(p.syscalls.contains(&Allow::Call(libc::SYS_timerfd_settime)));
        assert!(p
            .worker_syscalls
            .contains(&Allow::Call(libc::SYS_timerfd_settime)));
        let s = policy(&cfg(&["--stats-socket", "/run/mic/s.sock"]));
        assert!(s.has_path(Path::new("/run/mic"), PathAccess::SocketDir));
    }
}
