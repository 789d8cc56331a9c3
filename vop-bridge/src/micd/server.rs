//! micd's control socket and what each request does (`docs/micd.md`,
//! "Control protocol"). Every connection gets a thread of its own with
//! read and write timeouts, so a slow client or a busy card holds up no
//! one else.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::warn;

use super::config::card_index;
use super::layout::private_socket;
use super::lifecycle::Op;
use super::protocol::{ErrorKind, ErrorReply, Request, Response};
use super::supervisor::{CardHandle, CommandError};
use crate::control::request_timeout;

/// How long a card's supervisor may take to take a command (it may be
/// starting a card's processes).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of each log `log` returns.
const LOG_TAIL: u64 = 1 << 20;

/// Every card micd manages.
pub struct Cards {
    cards: BTreeMap<u16, CardHandle>,
}

impl Cards {
    /// Cards by index.
    pub fn new(cards: BTreeMap<u16, CardHandle>) -> Self {
        Cards { cards }
    }

    /// Resolves names (`all` or none: every card).
    fn select(&self, names: &[String]) -> Result<Vec<&CardHandle>, Response> {
        if names.is_empty() || names.iter().any(|n| n == "all") {
            return Ok(self.cards.values().collect());
        }
        names
            .iter()
            .map(|n| {
                card_index(n)
                    .and_then(|i| self.cards.get(&i))
                    .ok_or_else(|| self.unknown(n))
            })
            .collect()
    }

    fn unknown(&self, name: &str) -> Response {
        let known: Vec<_> = self.cards.values().map(|c| c.name().to_string()).collect();
        Response::error(
            ErrorKind::UnknownCard,
            Some(name),
            format!("no card {name} (cards: {})", known.join(", ")),
        )
    }

    fn one(&self, name: &str) -> Result<&CardHandle, Response> {
        card_index(name)
            .and_then(|i| self.cards.get(&i))
            .ok_or_else(|| self.unknown(name))
    }

    /// Carries out one request.
    pub fn handle(&self, req: Request) -> Response {
        match self.dispatch(req) {
            Ok(r) | Err(r) => r,
        }
    }

    fn dispatch(&self, req: Request) -> Result<Response, Response> {
        Ok(match req {
            Request::Status { cards } => Response {
                ok: true,
                cards: self.select(&cards)?.iter().map(|c| c.status()).collect(),
                ..Default::default()
            },
            Request::Boot { cards } => self.op(Op::Boot, &cards)?,
            Request::Shutdown { cards } => self.op(Op::Shutdown, &cards)?,
            Request::Reset { cards } => self.op(Op::Reset, &cards)?,
            Request::Config { card, settings } => {
                let c = self.one(&card)?;
                match c.config(settings, COMMAND_TIMEOUT) {
                    Ok(()) => Response {
                        ok: true,
                        cards: vec![c.status()],
                        ..Default::default()
                    },
                    Err(e) => Response::error(error_kind(&e), Some(&card), e.to_string()),
                }
            }
            Request::Log { card } => {
                let c = self.one(&card)?;
                let mut text = String::new();
                for (what, path) in [
                    ("serial", c.dir().serial_log()),
                    ("console", c.dir().console_log()),
                ] {
                    text += &format!("==> {card} {what}: {} <==\n", path.display());
                    text += &tail(&path, LOG_TAIL);
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                }
                Response {
                    ok: true,
                    text: Some(text),
                    ..Default::default()
                }
            }
            Request::Bridge { card, line } => {
                let c = self.one(&card)?;
                // A hot removal waits up to 15 s for the card.
                match request_timeout(&c.dir().bridge_socket(), &line, Duration::from_secs(20)) {
                    Ok(a) if a.starts_with("error") => {
                        Response::error(ErrorKind::Failed, Some(&card), format!("{card}: {a}"))
                    }
                    Ok(a) => Response {
                        ok: true,
                        text: Some(a),
                        ..Default::default()
                    },
                    Err(e) => Response::error(
                        ErrorKind::Failed,
                        Some(&card),
                        format!("{card}: the bridge does not answer ({e}); is the card running?"),
                    ),
                }
            }
        })
    }

    fn op(&self, op: Op, names: &[String]) -> Result<Response, Response> {
        let cards = self.select(names)?;
        let mut errors = Vec::new();
        for c in &cards {
            if let Err(e) = c.op(op, COMMAND_TIMEOUT) {
                let message = match &e {
                    CommandError::Refused(r) => format!("{} {r}", c.name()),
                    e => format!("{}: {e}", c.name()),
                };
                errors.push(ErrorReply {
                    kind: error_kind(&e),
                    card: Some(c.name().into()),
                    message,
                });
            }
        }
        Ok(Response {
            ok: errors.is_empty(),
            errors,
            cards: cards.iter().map(|c| c.status()).collect(),
            text: None,
        })
    }
}

fn error_kind(e: &CommandError) -> ErrorKind {
    match e {
        CommandError::Refused(_) | CommandError::NotReady(_) => ErrorKind::Refused,
        CommandError::Invalid(_) => ErrorKind::Invalid,
        CommandError::NoAnswer => ErrorKind::Failed,
    }
}

/// The last `max` bytes of a file (empty if it does not exist).
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The listening control socket.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Listens on `path` (mode 0600), replacing a stale socket but never a
    /// live micd's.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = crate::control::bind_control(path, "micd")?;
        private_socket(path)?;
        Ok(ControlSocket {
            listener,
            path: path.into(),
        })
    }

    /// Accepts every pending connection, each answered on its own thread.
    pub fn accept_all(&self, cards: &Arc<Cards>) {
        while let Ok((stream, _)) = self.listener.accept() {
            let cards = cards.clone();
            let spawned = std::thread::Builder::new()
                .name("micd-client".into())
                .spawn(move || serve(stream, &cards));
            if let Err(e) = spawned {
                warn!("cannot start a client thread: {e}");
            }
        }
    }
}

fn serve(stream: UnixStream, cards: &Cards) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => cards.handle(req),
        Err(e) => Response::error(ErrorKind::Invalid, None, format!("not a micd request: {e}")),
    };
    let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
    out.push('\n');
    let _ = (&stream).write_all(out.as_bytes());
}

impl AsRawFd for ControlSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::micd::protocol::call;

    #[test]
    fn no_cards_status_unknown_card_and_garbage() {
        let dir = std::env::temp_dir().join(format!("micd-server-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("micd.sock");
        let sock = ControlSocket::bind(&path).unwrap();
        assert!(ControlSocket::bind(&path).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let cards = Arc::new(Cards::new(BTreeMap::new()));
        let c2 = cards.clone();
        let p = path.clone();
        let client = std::thread::spawn(move || {
            let t = Duration::from_secs(5);
            let a = call(&p, &Request::Status { cards: vec![] }, t).unwrap();
            let b = call(
                &p,
                &Request::Boot {
                    cards: vec!["mic3".into()],
                },
                t,
            )
            .unwrap();
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(b"status\n").unwrap();
            let mut raw = String::new();
            BufReader::new(&s).read_line(&mut raw).unwrap();
            (a, b, raw)
        });
        let (a, b, raw) = loop {
            sock.accept_all(&c2);
            if client.is_finished() {
                break client.join().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(a.ok && a.cards.is_empty());
        assert!(!b.ok);
        assert_eq!(b.errors[0].kind, ErrorKind::UnknownCard);
        let r: Response = serde_json::from_str(&raw).unwrap();
        assert_eq!(r.errors[0].kind, ErrorKind::Invalid);
        drop(sock);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tail_of_a_file() {
        let p = std::env::temp_dir().join(format!("micd-tail-{}", std::process::id()));
        std::fs::write(&p, "0123456789").unwrap();
        assert_eq!(tail(&p, 4), "6789");
        assert_eq!(tail(&p, 100), "0123456789");
        std::fs::remove_file(&p).unwrap();
        assert_eq!(tail(&p, 4), "");
    }
}
