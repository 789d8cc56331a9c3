//! The control socket: `micctl` talks to the bridge with one request line
//! per connection and reads the answer until the bridge closes it.
//!
//! | request | answer |
//! |---|---|
//! | `status` | `state=<state> shutdown_status=<status>` |
//! | `shutdown` | the same, after asking the card to power off |
//! | `devices` | one line per device: `<index> <type> <socket> <running|stopped|removing>` |
//! | `add <console\|blk\|net> <socket>` | `added device <index>` (hot add) |
//! | `remove <index>` | `removing device <index>` (hot removal; the card acknowledges) |
//!
//! Failures answer `error: <why>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::warn;

use crate::config::DeviceKind;

/// A request read from the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Report the card's state.
    Status,
    /// Ask the card to shut down.
    Shutdown,
    /// List the devices.
    Devices,
    /// Hot-add a device served by the backend at a socket.
    Add(DeviceKind, PathBuf),
    /// Hot-remove a device.
    Remove(usize),
}

impl ControlRequest {
    /// Parses one request line.
    pub fn parse(line: &str) -> Option<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        Some(match words.as_slice() {
            ["status"] => ControlRequest::Status,
            ["shutdown"] => ControlRequest::Shutdown,
            ["devices"] => ControlRequest::Devices,
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
            _ => return None,
        })
    }
}

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
        let _ = self.0.write_all(text.as_bytes());
    }
}

impl ControlServer {
    /// Listens on `path`, replacing a stale socket file but never a live one.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running bridge", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            path: path.into(),
        })
    }

    /// Accepts one connection and reads its request (a bad request is
    /// answered here and yields `None`).
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
                ControlConn(stream).reply(
                    "error: unknown request (status, shutdown, devices, add TYPE SOCKET, remove INDEX)\n",
                );
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
