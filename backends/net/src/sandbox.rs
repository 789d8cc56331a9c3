//! What `mic-net` may do once sandboxed (`mic_backend_common::sandbox`;
//! `backends/README.md`, "Sandbox"), on top of what every daemon needs:
//!
//! - on a tap: the tap's queues were opened and configured at startup;
//!   afterwards the daemon only sets their vnet header size and offloads
//!   when a driver's features arrive (`TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`),
//!   and a worker detaches or attaches its queue of a multi-queue tap as
//!   the driver disables or enables the pair (`TUNSETQUEUE`).
//!   `/dev/net/tun` stays readable and writable (nothing reopens it today).
//! - on a stream: the reconnect timer (`timerfd`); for `tcp:HOST:PORT`,
//!   TCP sockets to that port (Landlock), reconnecting with the name
//!   resolved again each time (reading `/etc`: `hosts`, `nsswitch.conf`,
//!   `resolv.conf`; UDP for DNS). A `unix:` peer is connected to by path,
//!   which Landlock (up to ABI 7) does not restrict; a listening stream
//!   socket was bound at startup.
//! - worker threads (each owns a queue pair and its tap queue or the
//!   stream connection): a tap worker only moves frames (`read`, `write`,
//!   `readv`, `writev`); a stream worker also reconnects or accepts a new
//!   peer and uses its timer; only with `tcp:` may it open files (for
//!   name resolution).
//! - connecting to a `unix:` peer keeps `CAP_DAC_OVERRIDE` (when the
//!   daemon has it, as root): passt started as root runs as `nobody`, and
//!   its socket (mode 0755) takes a connect only from its owner or a
//!   process with that capability; the daemon reconnects whenever passt
//!   restarts.
//! - rate limits and stats (`limits.rs`): the queue pairs' throttle timers
//!   (`timerfd`, created at startup), the stats thread's `signalfd` for
//!   `SIGUSR1`, and the stats socket in its directory.

use std::path::Path;

use mic_backend_common::sandbox::{parent_dir, Allow, Capability, PathAccess, Policy, TcpRule};

use crate::config::{NetConfig, NetTransport, StreamAddr};

/// The tap ioctls made after startup (`tap.rs`).
const TAP: &[Allow] = &[
    Allow::Ioctl(libc::TUNSETVNETHDRSZ),
    Allow::Ioctl(libc::TUNSETOFFLOAD),
];

/// What a tap worker adds: following its pair's enable (`backend.rs`).
const TAP_WORKER: &[Allow] = &[Allow::Ioctl(libc::TUNSETQUEUE)];

/// The stream port's reconnect and accept timer (`stream.rs`).
const STREAM: &[Allow] = &[
    Allow::Call(libc::SYS_timerfd_create),
    Allow::Call(libc::SYS_timerfd_settime),
    Allow::Call(libc::SYS_timerfd_gettime),
];

/// Rate limits and stats (`limits.rs`, `mic_backend_common::control`).
const LIMITS: &[Allow] = &[
    // A throttled queue pair arms its wakeup (a timerfd).
    Allow::Call(libc::SYS_timerfd_settime),
    // The stats thread reads SIGUSR1 from a signalfd, created once the
    // sandbox is on.
    Allow::Call(libc::SYS_signalfd4),
];

/// What a worker thread adds for the rate limits: arming its wakeup.
const WORKER_LIMITS: &[Allow] = &[Allow::Call(libc::SYS_timerfd_settime)];

/// TCP streams: IPv4 and IPv6 sockets, and what the C library's name
/// resolution does (the `nscd` socket, DNS over UDP).
const TCP: &[Allow] = &[
    Allow::Socket(libc::AF_INET),
    Allow::Socket(libc::AF_INET6),
    Allow::Call(libc::SYS_getsockname),
    Allow::Call(libc::SYS_getpeername),
    Allow::Call(libc::SYS_sendmmsg),
    Allow::Call(libc::SYS_uname),
];

/// A worker with a stream peer: it reconnects, accepts a new peer with
/// `--listen`, and moves frames over the connection (`stream.rs`).
const STREAM_WORKER: &[Allow] = &[
    Allow::Socket(libc::AF_UNIX),
    Allow::Call(libc::SYS_connect),
    Allow::Call(libc::SYS_accept4),
    Allow::Call(libc::SYS_shutdown),
    Allow::Call(libc::SYS_recvfrom),
    Allow::Call(libc::SYS_sendto),
    Allow::Call(libc::SYS_recvmsg),
    Allow::Call(libc::SYS_sendmsg),
    Allow::Call(libc::SYS_getsockopt),
    Allow::Call(libc::SYS_setsockopt),
    Allow::Ioctl(libc::FIONBIO),
];

/// The port of `host:port` (the last `:`, so `[::1]:80` works too).
fn port(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// `mic-net`'s sandbox policy for `cfg`.
pub fn policy(cfg: &NetConfig) -> Policy {
    let mut p = Policy::new("mic-net", &cfg.socket);
    match &cfg.transport {
        NetTransport::Tap { .. } => {
            p.allow_calls(TAP);
            p.allow_calls(TAP_WORKER);
            p.allow_worker_calls(TAP_WORKER);
            p.allow_path("/dev/net/tun", PathAccess::ReadWriteFile);
        }
        NetTransport::Stream { addr, listen } => {
            p.allow_calls(STREAM);
            p.allow_worker_calls(STREAM);
            p.allow_worker_calls(STREAM_WORKER);
            if let (StreamAddr::Unix(_), false) = (addr, listen) {
                p.keep_capability(Capability::CAP_DAC_OVERRIDE);
            }
            if let StreamAddr::Tcp(a) = addr {
                p.allow_calls(TCP);
                // Name resolution in the worker that reconnects.
                p.allow_worker_calls(TCP);
                p.workers_open_files();
                p.allow_path("/etc", PathAccess::ReadTree);
                if let Some(port) = port(a) {
                    p.allow_tcp(if *listen {
                        TcpRule::Bind(port)
                    } else {
                        TcpRule::Connect(port)
                    });
                }
            }
        }
    }
    p.allow_calls(LIMITS);
    // A worker arms its queue's wakeup when the rate limit stops it.
    p.allow_worker_calls(WORKER_LIMITS);
    // The stats socket is bound (a stale one replaced) once the sandbox is
    // on, and removed on exit.
    if let Some(stats) = &cfg.limits.stats_socket {
        p.allow_path(parent_dir(stats), PathAccess::SocketDir);
    }
    // Tests and odd hosts: only paths that exist can be rules.
    p.paths.retain(|r| Path::new(&r.path).exists());
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetArgs;
    use clap::Parser;

    fn cfg(args: &[&str]) -> NetConfig {
        let mut v = vec!["mic-net", "--socket-path", "/run/n.sock"];
        v.extend_from_slice(args);
        NetConfig::from_args(NetArgs::try_parse_from(v).unwrap()).unwrap()
    }

    #[test]
    fn per_transport() {
        let tap = policy(&cfg(&["--tap", "mic0"]));
        assert!(tap.syscalls.contains(&Allow::Ioctl(libc::TUNSETOFFLOAD)));
        assert!(tap.tcp.is_empty());
        assert!(!tap
            .worker_syscalls
            .contains(&Allow::Call(libc::SYS_connect)));
        assert!(!tap.workers_open_files);
        let unix = policy(&cfg(&["--stream", "unix:/x/p.sock"]));
        assert!(!unix.syscalls.contains(&Allow::Socket(libc::AF_INET)));
        assert!(unix.tcp.is_empty());
        assert_eq!(unix.keep_caps, [Capability::CAP_DAC_OVERRIDE]);
        assert!(tap.keep_caps.is_empty());
        let tcp = policy(&cfg(&["--stream", "tcp:localhost:5555"]));
        assert!(tcp.syscalls.contains(&Allow::Socket(libc::AF_INET6)));
        assert_eq!(tcp.tcp, [TcpRule::Connect(5555)]);
        assert!(tcp.worker_syscalls.contains(&Allow::Socket(libc::AF_INET)));
        assert!(tcp.workers_open_files);
        let l = policy(&cfg(&["--stream", "tcp:[::1]:7", "--listen"]));
        assert_eq!(l.tcp, [TcpRule::Bind(7)]);
        assert!(tap
            .syscalls
            .contains(&Allow::Call(libc::SYS_timerfd_settime)));
        assert!(tap
            .worker_syscalls
            .contains(&Allow::Call(libc::SYS_timerfd_settime)));
        let s = policy(&cfg(&["--tap", "mic0", "--stats-socket", "/tmp/s.sock"]));
        assert!(s.has_path(Path::new("/tmp"), PathAccess::SocketDir));
    }
}
