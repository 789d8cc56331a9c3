//! The stats socket (`--stats-socket PATH`) and the `SIGUSR1` dump
//! (`backends/README.md`, "Stats" and "Rate limits").
//!
//! One thread ("stats") serves both. The socket takes one client at a
//! time and speaks lines: `stats` answers one JSON object (the device's
//! queues and limits), `limit KEY=N ...` changes rate limits at run time
//! and answers the new limits; an error answers `{"error": "..."}` and
//! changes nothing. `SIGUSR1` writes one log line per queue.
//!
//! `SIGUSR1` is blocked in every thread and read from a `signalfd` by the
//! stats thread: no other thread is interrupted by it (no `EINTR` in the
//! vhost-user threads or the relay). [`StatsServer::start`] therefore runs
//! before any other thread of the daemon starts, so that they inherit the
//! blocked signal.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::stats::{DeviceStats, QueueSnapshot};
use crate::throttle::{Change, Limits, Throttle};
use crate::timer::Wakeup;

/// Longest command line taken.
const MAX_LINE: u64 = 4096;
/// A client that sends nothing for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// One throttle of a device with the names of its limits: `{prefix}{ops}`
/// and `{prefix}bps`, each with `_burst` (`iops`, `bps_burst`,
/// `rx_pps`...).
#[derive(Debug, Clone)]
pub struct NamedThrottle {
    /// Prefix of the keys (`""`, `"rx_"`, `"tx_"`).
    pub prefix: &'static str,
    /// Name of the operations limit (`"iops"`, `"pps"`).
    pub ops: &'static str,
    /// The throttle.
    pub throttle: Arc<Throttle>,
}

/// What the stats thread reports on and changes.
#[derive(Debug, Clone)]
pub struct Served {
    /// The device's counters.
    pub stats: Arc<DeviceStats>,
    /// Its throttles.
    pub throttles: Vec<NamedThrottle>,
    /// The wakeups of the queues that wait on those throttles: armed to
    /// fire at once after a change, so that a queue waiting under the old
    /// limits goes by the new ones without delay.
    pub wakeups: Vec<Arc<Wakeup>>,
    /// The device tracks in-flight requests (`inflight.rs`): `stats`
    /// reports how many it resubmitted after restarts.
    pub tracks_inflight: bool,
}

/// A field of a throttle's [`Change`].
#[derive(Debug, Clone, Copy)]
enum Field {
    Ops,
    OpsBurst,
    Bytes,
    BytesBurst,
}

/// The answer to `stats`.
#[derive(Debug, Serialize)]
struct StatsAnswer {
    device: &'static str,
    uptime_s: f64,
    limits: Map<String, Value>,
    queues: Vec<QueueSnapshot>,
    /// Requests found in flight and submitted again at a queue's start,
    /// over the daemon's life (devices that track in-flight requests).
    #[serde(skip_serializing_if = "Option::is_none")]
    resubmitted: Option<u64>,
}

impl Served {
    /// Every limit by name: its rate, and its burst, 0 where unlimited.
    pub fn limits(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for t in &self.throttles {
            let Limits { ops, bytes } = t.throttle.limits();
            for (name, rate) in [(t.ops, ops), ("bps", bytes)] {
                let key = format!("{}{name}", t.prefix);
                m.insert(key.clone(), rate.map_or(0, |r| r.rate).into());
                m.insert(format!("{key}_burst"), rate.map_or(0, |r| r.burst).into());
            }
        }
        m
    }

    /// The answer to `stats`.
    pub fn stats_json(&self) -> Value {
        let a = StatsAnswer {
            device: self.stats.device(),
            uptime_s: (self.stats.uptime().as_secs_f64() * 1000.0).round() / 1000.0,
            limits: self.limits(),
            queues: self.stats.snapshot(),
            resubmitted: self
                .tracks_inflight
                .then(crate::inflight::resubmitted_total),
        };
        serde_json::to_value(a).unwrap_or(Value::Null)
    }

    /// Applies `limit KEY=N ...` (the words after `limit`): all or nothing.
    /// Keys are the names of [`Served::limits`] (`-` may stand for `_`);
    /// `N` takes the suffixes of [`crate::throttle::parse_count`]; a rate
    /// of 0 removes the limit, a burst of 0 restores the default.
    pub fn apply_limits(&self, words: &[&str]) -> Result<Map<String, Value>, String> {
        if words.is_empty() {
            return Err("limit needs KEY=N arguments".into());
        }
        let mut changes = vec![Change::default(); self.throttles.len()];
        for w in words {
            let (key, value) = w
                .split_once('=')
                .ok_or_else(|| format!("{w:?} is not KEY=N"))?;
            let key = key.replace('-', "_");
            let n = crate::throttle::parse_count(value)?;
            let (i, field) = self
                .field(&key)
                .ok_or_else(|| format!("unknown limit {key:?}"))?;
            let c = &mut changes[i];
            *match field {
                Field::Ops => &mut c.ops,
                Field::OpsBurst => &mut c.ops_burst,
                Field::Bytes => &mut c.bytes,
                Field::BytesBurst => &mut c.bytes_burst,
            } = Some(n);
        }
        let now = Instant::now();
        for (t, c) in self.throttles.iter().zip(changes) {
            t.throttle.change_at(c, now);
        }
        for w in &self.wakeups {
            if let Err(e) = w.arm(Duration::ZERO) {
                warn!("cannot wake a throttled queue: {e}");
            }
        }
        let limits = self.limits();
        info!("limits now {}", Value::Object(limits.clone()));
        Ok(limits)
    }

    /// The throttle and the field that limit `key` names.
    fn field(&self, key: &str) -> Option<(usize, Field)> {
        self.throttles.iter().enumerate().find_map(|(i, t)| {
            let rest = key.strip_prefix(t.prefix)?;
            let (name, burst) = match rest.strip_suffix("_burst") {
                Some(n) => (n, true),
                None => (rest, false),
            };
            let field = match (name == t.ops, name == "bps", burst) {
                (true, _, false) => Field::Ops,
                (true, _, true) => Field::OpsBurst,
                (_, true, false) => Field::Bytes,
                (_, true, true) => Field::BytesBurst,
                _ => return None,
            };
            Some((i, field))
        })
    }

    /// The answer to one command line.
    pub fn answer(&self, line: &str) -> Value {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.split_first() {
            Some((&"stats", [])) => self.stats_json(),
            Some((&"limit", args)) => match self.apply_limits(args) {
                Ok(l) => serde_json::json!({ "limits": l }),
                Err(e) => serde_json::json!({ "error": e }),
            },
            Some((cmd, _)) => {
                serde_json::json!({ "error": format!("unknown command {cmd:?} (stats, limit)") })
            }
            None => serde_json::json!({ "error": "empty command" }),
        }
    }

    /// Logs one line per queue (the `SIGUSR1` dump).
    pub fn log_stats(&self) {
        let limits = self.limits();
        info!(
            "stats: {} up {:.1}s, limits {}",
            self.stats.device(),
            self.stats.uptime().as_secs_f64(),
            Value::Object(limits)
        );
        for q in self.stats.snapshot() {
            info!("stats: {}", q.line());
        }
    }
}

/// Errors starting the stats thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path is in use, not a socket, or cannot be bound.
    #[error("--stats-socket {0}: {1}")]
    Socket(PathBuf, #[source] io::Error),
    /// Blocking `SIGUSR1`, its signalfd or the thread failed.
    #[error("cannot set up the stats thread: {0}")]
    Setup(#[source] io::Error),
}

/// The stats thread; the socket file is removed when this is dropped.
#[derive(Debug)]
pub struct StatsServer {
    socket: Option<(PathBuf, (u64, u64))>,
}

impl StatsServer {
    /// Blocks `SIGUSR1` (see the module documentation: call it before any
    /// other thread starts), binds the socket at `path` if given (mode
    /// 0600; a stale socket is replaced, a live one or a file that is not
    /// a socket is an error), and starts the thread serving `served`.
    pub fn start(path: Option<&Path>, served: Served) -> Result<StatsServer, Error> {
        let signal = sigusr1_fd().map_err(Error::Setup)?;
        let (listener, socket) = match path {
            Some(p) => {
                let l = bind(p).map_err(|e| Error::Socket(p.to_path_buf(), e))?;
                let meta =
                    fs::symlink_metadata(p).map_err(|e| Error::Socket(p.to_path_buf(), e))?;
                info!("stats socket {}", p.display());
                (Some(l), Some((p.to_path_buf(), (meta.dev(), meta.ino()))))
            }
            None => (None, None),
        };
        std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || serve(&signal, listener.as_ref(), &served))
            .map_err(Error::Setup)?;
        Ok(StatsServer { socket })
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        if let Some((path, ident)) = &self.socket {
            if let Ok(meta) = fs::symlink_metadata(path) {
                if (meta.dev(), meta.ino()) == *ident {
                    let _ = fs::remove_file(path);
                }
            }
        }
    }
}

/// Blocks `SIGUSR1` in the calling thread (and the threads it starts
/// later) and returns a signalfd for it.
fn sigusr1_fd() -> io::Result<OwnedFd> {
    // SAFETY: `set` is initialised by sigemptyset before use; the calls
    // only read it; no old mask is asked for.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Binds a listening socket at `path` with mode 0600 (the rules of the
/// vhost-user socket, `Endpoint::listen`).
fn bind(path: &Path) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "in use by a running daemon",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => fs::remove_file(path)?,
            Err(e) => return Err(e),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: umask only changes the process's file mode creation mask;
    // the daemon has no other thread yet (see `StatsServer::start`).
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restores the previous mask.
    unsafe { libc::umask(old) };
    let l = bound?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The stats thread's loop.
fn serve(signal: &OwnedFd, listener: Option<&UnixListener>, served: &Served) {
    let mut fds = vec![signal.as_raw_fd()];
    if let Some(l) = listener {
        fds.push(l.as_raw_fd());
    }
    loop {
        match crate::poll_in(&fds, -1) {
            Some(0) => {
                // Drain the pending signal(s), then dump once.
                while read_siginfo(signal) {}
                served.log_stats();
            }
            Some(_) => {
                let Some(l) = listener else { continue };
                match l.accept() {
                    Ok((client, _)) => {
                        if let Err(e) = client_session(client, served) {
                            log::debug!("stats client: {e}");
                        }
                    }
                    Err(e) => {
                        warn!("stats socket: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            None => {}
        }
    }
}

/// Reads one `signalfd_siginfo` from the non-blocking signalfd; false
/// once none is left.
fn read_siginfo(fd: &OwnedFd) -> bool {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: reads at most `info.len()` bytes into `info`.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    n == info.len() as isize
}

/// Serves one client until it closes, sends an overlong line, or is quiet
/// for [`CLIENT_TIMEOUT`].
fn client_session(client: UnixStream, served: &Served) -> io::Result<()> {
    client.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    client.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut out = client.try_clone()?;
    let mut reader = BufReader::new(client);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            writeln!(out, "{}", serde_json::json!({ "error": "line too long" }))?;
            return Ok(());
        }
        let answer = served.answer(line.trim());
        writeln!(out, "{answer}")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::Rate;

    fn served() -> Served {
        let stats = Arc::new(DeviceStats::new("mic-x", ["rx0", "tx0"]));
        let rx = Arc::new(Throttle::new(Limits {
            ops: None,
            bytes: Some(Rate::per_second(1000)),
        }));
        let tx = Arc::new(Throttle::new(Limits::default()));
        Served {
            stats,
            wakeups: vec![Arc::new(Wakeup::new().unwrap())],
            throttles: vec![
                NamedThrottle {
                    prefix: "rx_",
                    ops: "pps",
                    throttle: rx,
                },
                NamedThrottle {
                    prefix: "tx_",
                    ops: "pps",
                    throttle: tx,
                },
            ],
            tracks_inflight: false,
        }
    }

    #[test]
    fn stats_answer_has_queues_and_limits() {
        let s = served();
        s.stats
            .queue(1)
            .unwrap()
            .record(0, 100, false, Duration::from_micros(3));
        let v = s.answer("stats");
        assert_eq!(v["device"], "mic-x");
        assert_eq!(v["queues"][1]["queue"], "tx0");
        assert_eq!(v["queues"][1]["requests"], 1);
        assert_eq!(v["queues"][1]["bytes_written"], 100);
        assert_eq!(v["limits"]["rx_bps"], 1000);
        assert_eq!(v["limits"]["rx_bps_burst"], 1000);
        assert_eq!(v["limits"]["tx_pps"], 0);
        assert!(v["uptime_s"].as_f64().unwrap() >= 0.0);
    }

    #[test]
    fn limit_changes_all_or_nothing() {
        let s = served();
        let v = s.answer("limit tx-pps=2K rx_bps=0 tx_bps_burst=64Ki tx_bps=1Mi");
        let l = &v["limits"];
        assert_eq!(l["tx_pps"], 2000);
        assert_eq!(l["tx_pps_burst"], 2000);
        assert_eq!(l["rx_bps"], 0);
        assert_eq!(l["tx_bps"], 1 << 20);
        assert_eq!(l["tx_bps_burst"], 64 << 10);
        assert!(!s.throttles[0].throttle.active());
        // The queues waiting on the old limits are woken.
        assert_eq!(crate::poll_in(&[s.wakeups[0].as_raw_fd()], 5000), Some(0));
        assert!(s.wakeups[0].consume());
        // One bad word: nothing changes.
        for bad in [
            "limit tx_pps=5 bogus=1",
            "limit tx_pps=x",
            "limit tx_pps",
            "limit",
            "limit iops=1",
        ] {
            let v = s.answer(bad);
            assert!(v["error"].is_string(), "{bad}: {v}");
        }
        assert_eq!(s.limits()["tx_pps"], 2000);
        assert!(s.answer("frobnicate")["error"].is_string());
        assert!(s.answer("")["error"].is_string());
        assert!(s.answer("stats now")["error"].is_string());
    }

    #[test]
    fn socket_serves_lines_and_is_removed() {
        let prefix = std::env::temp_dir().join("mic-control-");
        let d = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap();
        let p = d.as_path().join("stats.sock");
        let server = StatsServer::start(Some(&p), served()).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second daemon on the same path is refused.
        assert!(matches!(
            StatsServer::start(Some(&p), served()),
            Err(Error::Socket(..))
        ));
        let c = UnixStream::connect(&p).unwrap();
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        writeln!(w, "limit tx_pps=10\nstats").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["limits"]["tx_pps"], 10);
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["limits"]["tx_pps"], 10);
        assert_eq!(v["queues"].as_array().unwrap().len(), 2);
        drop((w, r));
        drop(server);
        assert!(!p.exists());
    }
}
