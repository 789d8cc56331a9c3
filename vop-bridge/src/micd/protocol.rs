//! micd's control protocol: one JSON object per line, one request per
//! connection, one response line back (`docs/micd.md`, "Control
//! protocol"). [`CardStatus`] is also what `micctl status --json` prints.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request to micd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The status of these cards (none or `all`: every card).
    Status {
        /// Card names.
        #[serde(default)]
        cards: Vec<String>,
    },
    /// Boot cards from `ready`.
    Boot {
        /// Card names, or `all`.
        cards: Vec<String>,
    },
    /// Shut `online` cards down.
    Shutdown {
        /// Card names, or `all`.
        cards: Vec<String>,
    },
    /// Reset cards.
    Reset {
        /// Card names, or `all`.
        cards: Vec<String>,
    },
    /// Change a card's configuration (`key=value` each).
    Config {
        /// Card name.
        card: String,
        /// Settings.
        settings: Vec<String>,
    },
    /// The card's serial and console history.
    Log {
        /// Card name.
        card: String,
    },
    /// A request line for the card's bridge (`devices`, `add ...`,
    /// `remove ...`); its answer comes back as `text`.
    Bridge {
        /// Card name.
        card: String,
        /// The bridge request (`vop_bridge::control`).
        line: String,
    },
}

/// Why a request (or part of it) failed; `micctl`'s exit code follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The card's state does not allow the transition (exit code 3).
    Refused,
    /// No such card (exit code 4).
    UnknownCard,
    /// A malformed request or value (exit code 2).
    Invalid,
    /// Something failed while doing it (exit code 1).
    Failed,
}

impl ErrorKind {
    /// `micctl`'s exit code for this error.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failed => 1,
            ErrorKind::Invalid => 2,
            ErrorKind::Refused => 3,
            ErrorKind::UnknownCard => 4,
        }
    }
}

/// One error, with the card it concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The card, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
    /// One line for the user (`mic0 is online: shut it down or reset it first`).
    pub message: String,
}

/// A device of a card and its backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// `console`, `blk` or `net`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The backend process (`console`, `blk0`, `net`).
    pub backend: String,
    /// Its vhost-user socket.
    pub socket: String,
    /// Its pid while the card runs.
    pub pid: Option<u32>,
    /// How many times micd restarted it during this boot.
    pub restarts: u32,
    /// The disk image (`blk` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A card's network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    /// `passt`, `tap` or `none`.
    pub mode: String,
    /// The card's address (`172.31.1.1/24`), if it has a network.
    pub card_ip: Option<String>,
    /// The host's address on the card's link.
    pub host_ip: Option<String>,
}

/// A card's heartbeat (`docs/micd.md` sections 4 and 8).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// Whether micd declares the card crashed when its heartbeat stops.
    pub enabled: bool,
    /// Seconds without a beat before that.
    pub timeout_s: u64,
    /// The card's beat count; null before the first beat of this boot.
    pub count: Option<u32>,
    /// Milliseconds since the host saw the count change; null before the
    /// first beat.
    pub age_ms: Option<u64>,
    /// The card's beat period in milliseconds; null before the first beat.
    pub period_ms: Option<u32>,
}

/// One card as micd sees it. Field names and meanings are stable
/// (`docs/micd.md`, "Status JSON"); fields may be added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardStatus {
    /// `micN`.
    pub name: String,
    /// COSM state: ready, booting, online, shutting_down, resetting, reset_failed.
    pub state: String,
    /// nop, crashed, halted, poweroff, restart.
    pub shutdown_status: String,
    /// The last shutdown status other than nop (kept across resets).
    pub last_shutdown_status: String,
    /// reboot or stay-down.
    pub policy: String,
    /// Boots at micd start.
    pub autoboot: bool,
    /// Always `x100`.
    pub family: String,
    /// The device's stepping (`C0`).
    pub stepping: String,
    /// SCIF node (N+1 for micN).
    pub node: u16,
    /// Boots micd started since it first saw the card.
    pub boots: u64,
    /// Boots in a row that ended before the card came online; micd waits
    /// longer before each next one (`backoff.rs`).
    #[serde(default)]
    pub failed_boots: u32,
    /// Seconds until micd boots the card again, while it waits.
    #[serde(default)]
    pub next_boot_in_s: Option<u64>,
    /// Seconds since the current boot started (0 while ready).
    pub uptime_s: u64,
    /// Card memory, MiB.
    pub memory: u32,
    /// Card CPUs.
    pub cpus: u32,
    /// The kernel.
    pub firmware: String,
    /// The image's initramfs.
    pub ramdisk: String,
    /// The overlay appended to it, if any (`docs/micd.md`, "Overlays").
    pub overlay: Option<String>,
    /// The whole kernel command line of the (next) boot.
    pub cmdline: String,
    /// Devices in page order.
    pub devices: Vec<DeviceStatus>,
    /// Network.
    pub network: NetStatus,
    /// QEMU's pid while the card runs.
    pub qemu_pid: Option<u32>,
    /// The bridge's pid while the card runs.
    pub bridge_pid: Option<u32>,
    /// How many times micd restarted the bridge during this boot.
    pub bridge_restarts: u32,
    /// The card's state directory.
    pub dir: String,
    /// The card's console as a unix socket (while it runs).
    pub console_socket: Option<String>,
    /// The card's vsock CID (node + 2), if it has virtio-vsock.
    pub vsock_cid: Option<u32>,
    /// The vsock backend's host socket (`uds-path`) while the card runs:
    /// `micctl exec` and `cp` reach the card agent through it.
    pub vsock_socket: Option<String>,
    /// The last thing that went wrong starting or stopping the card.
    pub last_error: Option<String>,
    /// The heartbeat.
    #[serde(default)]
    pub heartbeat: HeartbeatStatus,
}

/// micd's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether everything asked for was done.
    pub ok: bool,
    /// What failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ErrorReply>,
    /// The cards concerned, after the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cards: Vec<CardStatus>,
    /// Text (a log, or a bridge's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Response {
    /// A response with one error.
    pub fn error(kind: ErrorKind, card: Option<&str>, message: String) -> Self {
        Response {
            ok: false,
            errors: vec![ErrorReply {
                kind,
                card: card.map(str::to_string),
                message,
            }],
            ..Default::default()
        }
    }
}

/// Talking to micd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or read.
    #[error("{path}")]
    Io {
        /// The socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not micd's JSON (the answer as it came).
    #[error("not micd's answer: {0}")]
    NotMicd(String),
}

/// Sends one request to micd at `path` and reads its answer, waiting at
/// most `timeout` for it.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| io(e.into()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|_| ClientError::NotMicd(answer.trim_end().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_on_the_wire() {
        let r = Request::Boot {
            cards: vec!["mic0".into(), "mic1".into()],
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"boot","cards":["mic0","mic1"]}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status { cards: vec![] }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        let c: Request =
            serde_json::from_str(r#"{"cmd":"config","card":"mic1","settings":["memory=512"]}"#)
                .unwrap();
        assert_eq!(
            c,
            Request::Config {
                card: "mic1".into(),
                settings: vec!["memory=512".into()]
            }
        );
    }

    #[test]
    fn responses_on_the_wire() {
        let r = Response::error(ErrorKind::Refused, Some("mic0"), "mic0 is online".into());
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"ok":false,"errors":[{"kind":"refused","card":"mic0","message":"mic0 is online"}]}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
        let ok: Response = serde_json::from_str(r#"{"ok":true}"#).unwrap();
        assert!(ok.ok && ok.cards.is_empty());
        assert_eq!(ErrorKind::Refused.exit_code(), 3);
        assert_eq!(ErrorKind::UnknownCard.exit_code(), 4);
    }
}
