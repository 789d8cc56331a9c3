//! The control socket: `micctl` asks the bridge for the card's state and
//! for a shutdown, one line per connection (`status` or `shutdown`); the
//! answer is one line, `state=<state> shutdown_status=<status>` or
//! `error: <why>`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::warn;

/// A request read from the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Report the card's state.
    Status,
    /// Ask the card to shut down.
    Shutdown,
}

impl ControlRequest {
    /// Parses one request line.
    pub fn parse(line: &str) -> Option<Self> {
        match line.trim() {
            "status" => Some(ControlRequest::Status),
            "shutdown" => Some(ControlRequest::Shutdown),
            _ => None,
        }
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
                ControlConn(stream).reply("error: unknown request (status, shutdown)\n");
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
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
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
