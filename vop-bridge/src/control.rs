//! The control socket: `micctl` talks to the bridge with one request line
//! per connection and reads the answer until the bridge closes it.
//!
//! | request | answer |
//! |---|---|
//! | `status` | `state=<state> shutdown_status=<status>` |
//! | `heartbeat` | `heartbeat=<count> age_ms=<ms> period_ms=<ms>`, or `heartbeat=none` before the card's first beat ([`crate::heartbeat`]) |
//! | `shutdown` | the same, after asking the card to power off |
//! | `devices` | one line per device: `<index> <type> <socket> <running|stopped|removing>` |
//! | `add <console\|blk\|net> <socket>` | `added device <index>` (hot add) |
//! | `remove <index>` | `removing device <index>` (hot removal; the card acknowledges) |
//! | `config <index>` | the device's config space as its backend reports it now (vhost-user `GET_CONFIG`), in hex |
//!
//! Failures answer `error: <why>`.
//!
//! A request line is at most [`MAX_REQUEST_LINE`] bytes and must arrive
//! within [`CLIENT_DEADLINE`] of connecting; the bridge reads it without
//! blocking, from its event loop ([`ControlServer::accept_client`],
//! [`ControlClient::read`]), holds at most [`MAX_CLIENTS`] connections at a
//! time, and closes a connection that breaks a limit without an answer
//! (`docs/architecture.md`, "Bounded waits").

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::warn;

use crate::config::DeviceKind;

/// A request read from the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Report the card's state.
    Status,
    /// Report the card's last heartbeat.
    Heartbeat,
    /// Ask the card to shut down.
    Shutdown,
    /// List the devices.
    Devices,
    /// The bridge's recent events, oldest first (`bridge/history.rs`).
    History,
    /// Hot-add a device served by the backend at a socket.
    Add(DeviceKind, PathBuf),
    /// Hot-remove a device.
    Remove(usize),
    /// Read a device's config space from its backend.
    Config(usize),
}

impl ControlRequest {
    /// Parses one request line.
    pub fn parse(line: &str) -> Option<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        Some(match words.as_slice() {
            ["status"] => ControlRequest::Status,
            ["heartbeat"] => ControlRequest::Heartbeat,
            ["shutdown"] => ControlRequest::Shutdown,
            ["devices"] => ControlRequest::Devices,
            ["history"] => ControlRequest::History,
            ["add", kind, socket] => {
                let kind = match *kind {
                    "console" => DeviceKind::Console,
                    "blk" => DeviceKind::Blk,
                    "net" => DeviceKind::Net,
                    "vsock" => DeviceKind::Vsock,
                    _ => return None,
                };
                ControlRequest::Add(kind, PathBuf::from(socket))
            }
            ["remove", index] => ControlRequest::Remove(index.parse().ok()?),
            ["config", index] => ControlRequest::Config(index.parse().ok()?),
            _ => return None,
        })
    }
}

/// The longest request line (with its newline) the bridge reads.
pub const MAX_REQUEST_LINE: usize = 4096;
/// How long a connection has to send its request line.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(2);
/// How many connections may wait for their request at once; more are
/// closed at once.
pub const MAX_CLIENTS: usize = 16;
/// How long writing an answer may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// The listening control socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

/// A connection waiting for its answer.
pub struct ControlConn(UnixStream);

impl ControlConn {
    /// Sends the answer and closes the connection.
    pub fn reply(mut self, text: &str) {
        // A client that does not read gets at most REPLY_TIMEOUT.
        if self.0.set_nonblocking(false).is_ok()
            && self.0.set_write_timeout(Some(REPLY_TIMEOUT)).is_ok()
        {
            let _ = self.0.write_all(text.as_bytes());
        }
    }
}

/// A connection whose request line is still arriving, read without
/// blocking.
pub struct ControlClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What reading a [`ControlClient`] gave.
#[derive(Debug)]
pub enum ClientRead {
    /// The line is not complete yet: wait for more.
    Pending,
    /// A request to answer on the connection (drop the client too: the
    /// connection closes when both are gone).
    Request(ControlRequest, ControlConn),
    /// The connection is finished (closed, over-long, or a bad request that
    /// was answered here).
    Done,
}

impl ControlClient {
    /// Reads what has arrived (never blocks).
    pub fn read(&mut self) -> ClientRead {
        let mut buf = [0u8; 512];
        loop {
            let room = MAX_REQUEST_LINE - self.line.len();
            let want = buf.len().min(room);
            if want == 0 {
                warn!("control socket: request line over {MAX_REQUEST_LINE} bytes; closed");
                return ClientRead::Done;
            }
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => return ClientRead::Done,
                Ok(n) => {
                    let got = &buf[..n];
                    if let Some(end) = got.iter().position(|&b| b == b'\n') {
                        self.line.extend_from_slice(&got[..end]);
                        return self.finish();
                    }
                    self.line.extend_from_slice(got);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return ClientRead::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return ClientRead::Done,
            }
        }
    }

    fn finish(&mut self) -> ClientRead {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        let stream = match self.stream.try_clone() {
            Ok(s) => s,
            Err(_) => return ClientRead::Done,
        };
        match ControlRequest::parse(&line) {
            Some(r) => ClientRead::Request(r, ControlConn(stream)),
            None => {
                warn!("control socket: unknown request {:?}", line.trim());
                ControlConn(stream).reply(UNKNOWN_REQUEST);
                ClientRead::Done
            }
        }
    }

    /// Whether the client had its time (it is then closed unanswered).
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }
}

impl AsRawFd for ControlClient {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl std::fmt::Debug for ControlConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ControlConn")
            .field(&self.0.as_raw_fd())
            .finish()
    }
}

/// The answer to a line that is no request.
const UNKNOWN_REQUEST: &str =
    "error: unknown request (status, heartbeat, shutdown, devices, history, add TYPE SOCKET, remove INDEX, \
     config INDEX)\n";

/// Listens on `path` without blocking, replacing a stale socket file but
/// never one a live `owner` (a bridge, micd) still serves.
pub fn bind_control(path: &Path, owner: &str) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running {owner}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl ControlServer {
    /// Listens on `path`, replacing a stale socket file but never a live one.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = bind_control(path, "bridge")?;
        Ok(ControlServer {
            listener,
            path: path.into(),
        })
    }

    /// Accepts one pending connection without reading from it (`None` when
    /// none is waiting). The caller watches it and calls
    /// [`ControlClient::read`] when it is readable.
    pub fn accept_client(&self) -> Option<ControlClient> {
        let (stream, _) = self.listener.accept().ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(ControlClient {
            stream,
            line: Vec::new(),
            deadline: Instant::now() + CLIENT_DEADLINE,
        })
    }

    /// Accepts one connection and reads its request (a bad request is
    /// answered here and yields `None`). This blocks for up to two seconds
    /// on a slow client; an event loop uses [`Self::accept_client`].
    pub fn accept(&self) -> Option<(ControlRequest, ControlConn)> {
        let (stream, _) = self.listener.accept().ok()?;
        stream.set_nonblocking(false).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut line = String::new();
        BufReader::new(&stream).take_line(&mut line)?;
        match ControlRequest::parse(&line) {
            Some(r) => Some((r, ControlConn(stream))),
            None => {
                warn!("control socket: unknown request {:?}", line.trim());
                ControlConn(stream).reply(UNKNOWN_REQUEST);
                None
            }
        }
    }
}

trait TakeLine {
    fn take_line(self, line: &mut String) -> Option<()>;
}

impl<R: BufRead> TakeLine for R {
    fn take_line(mut self, line: &mut String) -> Option<()> {
        self.read_line(line).ok().filter(|n| *n > 0).map(|_| ())
    }
}

impl AsRawFd for ControlServer {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to a bridge's control socket and returns its answer.
pub fn request(path: &Path, req: &str) -> std::io::Result<String> {
    request_timeout(path, req, Duration::from_secs(30))
}

/// Like [`request`], but gives up when the answer takes longer than
/// `timeout` (micd must never hang on a card's bridge).
pub fn request_timeout(path: &Path, req: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_requests() {
        assert_eq!(
            ControlRequest::parse("status\n"),
            Some(ControlRequest::Status)
        );
        assert_eq!(
            ControlRequest::parse(" shutdown "),
            Some(ControlRequest::Shutdown)
        );
        assert_eq!(ControlRequest::parse("reboot"), None);
        assert_eq!(
            ControlRequest::parse("heartbeat"),
            Some(ControlRequest::Heartbeat)
        );
        assert_eq!(
            ControlRequest::parse("add blk /run/b.sock"),
            Some(ControlRequest::Add(DeviceKind::Blk, "/run/b.sock".into()))
        );
        assert_eq!(
            ControlRequest::parse("add vsock /run/v.sock"),
            Some(ControlRequest::Add(DeviceKind::Vsock, "/run/v.sock".into()))
        );
        assert_eq!(ControlRequest::parse("add gpu /x"), None);
        assert_eq!(
            ControlRequest::parse("remove 2"),
            Some(ControlRequest::Remove(2))
        );
        assert_eq!(ControlRequest::parse("remove x"), None);
        assert_eq!(
            ControlRequest::parse("config 1"),
            Some(ControlRequest::Config(1))
        );
        assert_eq!(ControlRequest::parse("config"), None);
    }

    fn pair() -> (ControlClient, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (
            ControlClient {
                stream: a,
                line: Vec::new(),
                deadline: Instant::now() + CLIENT_DEADLINE,
            },
            b,
        )
    }

    #[test]
    fn a_trickled_line_is_assembled_without_blocking() {
        let (mut c, mut peer) = pair();
        assert!(matches!(c.read(), ClientRead::Pending));
        for b in b"sta" {
            peer.write_all(&[*b]).unwrap();
            assert!(matches!(c.read(), ClientRead::Pending));
        }
        peer.write_all(b"tus\n").unwrap();
        match c.read() {
            ClientRead::Request(r, conn) => {
                assert_eq!(r, ControlRequest::Status);
                conn.reply("ok\n");
            }
            other => panic!("{other:?}"),
        }
        drop(c);
        let mut answer = String::new();
        peer.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "ok\n");
    }

    #[test]
    fn a_line_without_end_is_cut_off_at_the_limit() {
        let (mut c, peer) = pair();
        let w = std::thread::spawn(move || {
            let mut peer = peer;
            // Fails once the bridge side closes.
            let _ = peer.write_all(&vec![b'x'; 1 << 20]);
        });
        let mut reads = 0;
        loop {
            match c.read() {
                ClientRead::Pending => std::thread::sleep(Duration::from_millis(1)),
                ClientRead::Done => break,
                ClientRead::Request(r, _) => panic!("{r:?}"),
            }
            reads += 1;
            assert!(reads < 10_000);
        }
        assert_eq!(c.line.len(), MAX_REQUEST_LINE);
        drop(c);
        w.join().unwrap();
    }

    #[test]
    fn an_unknown_request_is_answered_and_done() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"reboot now\n").unwrap();
        assert!(matches!(c.read(), ClientRead::Done));
        drop(c);
        let mut answer = String::new();
        peer.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("error: unknown request"), "{answer}");
        let (c, _peer) = pair();
        assert!(!c.expired(Instant::now()));
        assert!(c.expired(Instant::now() + CLIENT_DEADLINE));
    }

    #[test]
    fn round_trip_and_live_socket_refused() {
        let dir = std::env::temp_dir().join(format!("vop-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl");
        let server = ControlServer::bind(&path).unwrap();
        assert!(ControlServer::bind(&path).is_err());
        let p = path.clone();
        let client = std::thread::spawn(move || request(&p, "status").unwrap());
        let (req, conn) = loop {
            if let Some(x) = server.accept() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(req, ControlRequest::Status);
        conn.reply("state=online shutdown_status=nop\n");
        assert_eq!(client.join().unwrap(), "state=online shutdown_status=nop");
        drop(server);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
