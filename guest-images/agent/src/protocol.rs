//! The agent protocol (`docs/vsock.md`, section "The agent protocol"): framed
//! messages with a bounded length, one request per connection.
//!
//! Every frame is an 8-byte header followed by its payload:
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 2    | magic `"MA"` (0x4d, 0x41)               |
//! | 2      | 1    | message kind ([`Kind`])                 |
//! | 3      | 1    | reserved, 0                             |
//! | 4      | 4    | payload length, little endian, at most [`MAX_PAYLOAD`] |
//!
//! This module is the one definition of the protocol; the card's agent and
//! the host's client (`vop-bridge`'s `agent_client`) both use it.

use std::io::{self, Read, Write};

/// The newest protocol version this build speaks (the host sends it in
/// [`Message::Hello`]). Version 2 added [`Message::ExecPty`].
pub const VERSION: u16 = 2;

/// The oldest version this build still speaks: the agent answers a host's
/// `Hello(v)` for any `v` from here to [`VERSION`], and the connection then
/// speaks `v` (`docs/vsock.md`, "Versions").
pub const MIN_VERSION: u16 = 1;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 5252;

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Header length.
pub const HEADER_LEN: usize = 8;

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"MA";

/// Message kinds (the header's third byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Both sides, first: the sender's protocol version.
    Hello = 1,
    /// Host: run a command.
    Exec = 2,
    /// Host: bytes for the command's stdin; empty closes it.
    Stdin = 3,
    /// Agent: bytes the command wrote to stdout.
    Stdout = 4,
    /// Agent: bytes the command wrote to stderr.
    Stderr = 5,
    /// Agent: the command ended.
    Exit = 6,
    /// Host: write a file (its bytes follow as [`Kind::Data`]).
    Put = 7,
    /// Host: read a file.
    Get = 8,
    /// Either side: file bytes; empty ends the file.
    Data = 9,
    /// Agent: the request is done.
    Ok = 10,
    /// Agent: a file's mode and size, before its bytes.
    FileInfo = 11,
    /// Host (version 2): run a command on a pseudo-terminal.
    ExecPty = 12,
    /// Either side: the request failed; the connection ends.
    Error = 15,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Exec,
            3 => Kind::Stdin,
            4 => Kind::Stdout,
            5 => Kind::Stderr,
            6 => Kind::Exit,
            7 => Kind::Put,
            8 => Kind::Get,
            9 => Kind::Data,
            10 => Kind::Ok,
            11 => Kind::FileInfo,
            12 => Kind::ExecPty,
            15 => Kind::Error,
            _ => return None,
        })
    }
}

/// Error codes carried by [`Message::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame that does not parse.
    Malformed = 1,
    /// A protocol version the receiver does not speak.
    Version = 2,
    /// A message that is valid but not expected here.
    Unexpected = 3,
    /// An operating system error (the message says which).
    Io = 4,
    /// The agent has too many connections.
    Busy = 5,
}

impl ErrorCode {
    /// The code for a number (unknown numbers read as [`ErrorCode::Malformed`]).
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            2 => ErrorCode::Version,
            3 => ErrorCode::Unexpected,
            4 => ErrorCode::Io,
            5 => ErrorCode::Busy,
            _ => ErrorCode::Malformed,
        }
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

impl ExitKind {
    /// The status a shell reports: the code, or 128 + the signal number.
    pub fn shell_status(self) -> i32 {
        match self {
            ExitKind::Exited(c) => c,
            ExitKind::Signaled(s) => 128 + s,
        }
    }
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Protocol version (payload: le16).
    Hello(u16),
    /// Command and arguments (payload: le32 count, then per argument le32
    /// length and bytes).
    Exec(Vec<Vec<u8>>),
    /// stdin bytes; empty is end of input.
    Stdin(Vec<u8>),
    /// stdout bytes.
    Stdout(Vec<u8>),
    /// stderr bytes.
    Stderr(Vec<u8>),
    /// Exit (payload: u8 0 = exited / 1 = signaled, 3 bytes 0, le32 value).
    Exit(ExitKind),
    /// Write `path` with `mode` (payload: le32 mode, path bytes).
    Put {
        /// Permission bits (`0o7777` at most).
        mode: u32,
        /// Absolute path on the card.
        path: Vec<u8>,
    },
    /// Read `path` (payload: path bytes).
    Get(Vec<u8>),
    /// File bytes; empty ends the file.
    Data(Vec<u8>),
    /// Done.
    Ok,
    /// A file's mode and size (payload: le32 mode, le64 size).
    FileInfo {
        /// Permission bits.
        mode: u32,
        /// Length in bytes.
        size: u64,
    },
    /// Failure (payload: le16 code, UTF-8 text).
    Error(ErrorCode, String),
    /// Command and arguments to run on a pseudo-terminal of this window
    /// size (payload: le16 rows, le16 columns, then [`Message::Exec`]'s).
    ExecPty {
        /// Window rows (0: unknown).
        rows: u16,
        /// Window columns (0: unknown).
        cols: u16,
        /// Command and arguments.
        argv: Vec<Vec<u8>>,
    },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("i/o")]
    Io(#[source] io::Error),
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The header's magic or reserved byte is wrong.
    #[error("bad frame header {0:02x?}")]
    BadHeader([u8; 4]),
    /// The header names a kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The header announces more than [`MAX_PAYLOAD`] bytes.
    #[error("frame of {0} bytes, more than {MAX_PAYLOAD}")]
    TooLong(u32),
    /// A message's payload does not match its kind.
    #[error("malformed {0:?} payload")]
    BadPayload(Kind),
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        ProtocolError::Io(e)
    }
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// An argv as [`Message::Exec`] carries it: le32 count, then per argument
/// le32 length and bytes.
fn encode_argv(argv: &[Vec<u8>]) -> Vec<u8> {
    let mut p = (argv.len() as u32).to_le_bytes().to_vec();
    for a in argv {
        p.extend_from_slice(&(a.len() as u32).to_le_bytes());
        p.extend_from_slice(a);
    }
    p
}

/// The argv of [`encode_argv`]; `None` unless it fills `p` exactly and has
/// a non-empty program name.
fn decode_argv(p: &[u8]) -> Option<Vec<Vec<u8>>> {
    let n = le_u32(p, 0)? as usize;
    let mut at = 4;
    let mut argv = Vec::new();
    for _ in 0..n {
        let len = le_u32(p, at)? as usize;
        at += 4;
        argv.push(p.get(at..at.checked_add(len)?)?.to_vec());
        at += len;
    }
    (at == p.len() && argv.first().is_some_and(|a| !a.is_empty())).then_some(argv)
}

impl Message {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Exec(_) => Kind::Exec,
            Message::Stdin(_) => Kind::Stdin,
            Message::Stdout(_) => Kind::Stdout,
            Message::Stderr(_) => Kind::Stderr,
            Message::Exit(_) => Kind::Exit,
            Message::Put { .. } => Kind::Put,
            Message::Get(_) => Kind::Get,
            Message::Data(_) => Kind::Data,
            Message::Ok => Kind::Ok,
            Message::FileInfo { .. } => Kind::FileInfo,
            Message::Error(..) => Kind::Error,
            Message::ExecPty { .. } => Kind::ExecPty,
        }
    }

    /// The payload bytes.
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Message::Hello(v) => v.to_le_bytes().to_vec(),
            Message::Exec(argv) => encode_argv(argv),
            Message::ExecPty { rows, cols, argv } => {
                let mut p = rows.to_le_bytes().to_vec();
                p.extend_from_slice(&cols.to_le_bytes());
                p.extend(encode_argv(argv));
                p
            }
            Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) | Message::Data(d) => {
                d.clone()
            }
            Message::Exit(e) => {
                let (how, v) = match e {
                    ExitKind::Exited(c) => (0u8, *c),
                    ExitKind::Signaled(s) => (1u8, *s),
                };
                let mut p = vec![how, 0, 0, 0];
                p.extend_from_slice(&v.to_le_bytes());
                p
            }
            Message::Put { mode, path } => {
                let mut p = mode.to_le_bytes().to_vec();
                p.extend_from_slice(path);
                p
            }
            Message::Get(path) => path.clone(),
            Message::Ok => Vec::new(),
            Message::FileInfo { mode, size } => {
                let mut p = mode.to_le_bytes().to_vec();
                p.extend_from_slice(&size.to_le_bytes());
                p
            }
            Message::Error(code, text) => {
                let mut p = (*code as u16).to_le_bytes().to_vec();
                // Cut long texts at a character boundary to fit one frame.
                let mut end = text.len().min(MAX_PAYLOAD - 2);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&text.as_bytes()[..end]);
                p
            }
        }
    }

    /// Decodes a payload of `kind`.
    pub fn decode(kind: Kind, p: &[u8]) -> Result<Message, ProtocolError> {
        let bad = || ProtocolError::BadPayload(kind);
        let exact = |n: usize| if p.len() == n { Ok(()) } else { Err(bad()) };
        Ok(match kind {
            Kind::Hello => {
                exact(2)?;
                Message::Hello(le_u16(p, 0).ok_or_else(bad)?)
            }
            Kind::Exec => Message::Exec(decode_argv(p).ok_or_else(bad)?),
            Kind::ExecPty => Message::ExecPty {
                rows: le_u16(p, 0).ok_or_else(bad)?,
                cols: le_u16(p, 2).ok_or_else(bad)?,
                argv: p.get(4..).and_then(decode_argv).ok_or_else(bad)?,
            },
            Kind::Stdin => Message::Stdin(p.to_vec()),
            Kind::Stdout => Message::Stdout(p.to_vec()),
            Kind::Stderr => Message::Stderr(p.to_vec()),
            Kind::Data => Message::Data(p.to_vec()),
            Kind::Exit => {
                exact(8)?;
                let v = le_u32(p, 4).ok_or_else(bad)? as i32;
                match p[0] {
                    0 => Message::Exit(ExitKind::Exited(v)),
                    1 => Message::Exit(ExitKind::Signaled(v)),
                    _ => return Err(bad()),
                }
            }
            Kind::Put => {
                let mode = le_u32(p, 0).ok_or_else(bad)?;
                if mode > 0o7777 || p.len() == 4 {
                    return Err(bad());
                }
                Message::Put {
                    mode,
                    path: p[4..].to_vec(),
                }
            }
            Kind::Get => {
                if p.is_empty() {
                    return Err(bad());
                }
                Message::Get(p.to_vec())
            }
            Kind::Ok => {
                exact(0)?;
                Message::Ok
            }
            Kind::FileInfo => {
                exact(12)?;
                Message::FileInfo {
                    mode: le_u32(p, 0).ok_or_else(bad)?,
                    size: le_u64(p, 4).ok_or_else(bad)?,
                }
            }
            Kind::Error => {
                let code = ErrorCode::from_u16(le_u16(p, 0).ok_or_else(bad)?);
                Message::Error(code, String::from_utf8_lossy(&p[2..]).into_owned())
            }
        })
    }

    /// Header and payload as one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let payload = self.payload();
        debug_assert!(payload.len() <= MAX_PAYLOAD);
        let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
        f.extend_from_slice(&MAGIC);
        f.push(self.kind() as u8);
        f.push(0);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&payload);
        f
    }
}

/// Writes one message as one frame. Data messages longer than
/// [`MAX_PAYLOAD`] must be split by the caller ([`write_chunked`]).
pub fn write_message(w: &mut impl Write, m: &Message) -> Result<(), ProtocolError> {
    if m.payload().len() > MAX_PAYLOAD {
        return Err(ProtocolError::TooLong(m.payload().len() as u32));
    }
    w.write_all(&m.encode())?;
    Ok(())
}

/// Writes `data` as frames of at most [`MAX_PAYLOAD`] bytes built by `wrap`.
pub fn write_chunked(
    w: &mut impl Write,
    data: &[u8],
    wrap: fn(Vec<u8>) -> Message,
) -> Result<(), ProtocolError> {
    for chunk in data.chunks(MAX_PAYLOAD) {
        write_message(w, &wrap(chunk.to_vec()))?;
    }
    Ok(())
}

/// Reads one frame. [`ProtocolError::Closed`] when the stream ends before
/// a header starts.
pub fn read_message(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if h[0..2] != MAGIC || h[3] != 0 {
        return Err(ProtocolError::BadHeader([h[0], h[1], h[2], h[3]]));
    }
    let kind = Kind::from_u8(h[2]).ok_or(ProtocolError::UnknownKind(h[2]))?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len as usize > MAX_PAYLOAD {
        return Err(ProtocolError::TooLong(len));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p)?;
    Message::decode(kind, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let bytes = m.encode();
        assert_eq!(read_message(&mut &bytes[..]).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Message::Hello(VERSION));
        round_trip(Message::Exec(vec![b"sh".to_vec(), b"-c".to_vec(), vec![]]));
        round_trip(Message::Stdin(vec![]));
        round_trip(Message::Stdout(vec![0, 255, 10]));
        round_trip(Message::Stderr(b"x".to_vec()));
        round_trip(Message::Exit(ExitKind::Exited(3)));
        round_trip(Message::Exit(ExitKind::Signaled(9)));
        round_trip(Message::Put {
            mode: 0o755,
            path: b"/tmp/f".to_vec(),
        });
        round_trip(Message::Get(b"/etc/inittab".to_vec()));
        round_trip(Message::Data(vec![7; MAX_PAYLOAD]));
        round_trip(Message::Ok);
        round_trip(Message::FileInfo {
            mode: 0o644,
            size: 1 << 40,
        });
        round_trip(Message::Error(ErrorCode::Io, "no such file".into()));
        round_trip(Message::ExecPty {
            rows: 24,
            cols: 80,
            argv: vec![b"tty".to_vec()],
        });
    }

    #[test]
    fn exec_pty_layout() {
        let f = Message::ExecPty {
            rows: 0x0102,
            cols: 0x0304,
            argv: vec![b"sh".to_vec()],
        }
        .encode();
        assert_eq!(
            f,
            [b'M', b'A', 12, 0, 14, 0, 0, 0, 2, 1, 4, 3, 1, 0, 0, 0, 2, 0, 0, 0, b's', b'h']
        );
    }

    #[test]
    fn header_layout() {
        let f = Message::Hello(0x0102).encode();
        assert_eq!(f, [b'M', b'A', 1, 0, 2, 0, 0, 0, 0x02, 0x01]);
    }

    #[test]
    fn exit_status_as_a_shell_reports_it() {
        assert_eq!(ExitKind::Exited(3).shell_status(), 3);
        assert_eq!(ExitKind::Signaled(9).shell_status(), 137);
    }

    #[test]
    fn malformed_frames_are_refused() {
        let read = |b: &[u8]| read_message(&mut &b[..]);
        assert!(matches!(read(b""), Err(ProtocolError::Closed)));
        assert!(matches!(
            read(b"GET / HTTP/1.0\r\n"),
            Err(ProtocolError::BadHeader(_))
        ));
        assert!(matches!(
            read(&[b'M', b'A', 99, 0, 0, 0, 0, 0]),
            Err(ProtocolError::UnknownKind(99))
        ));
        assert!(matches!(
            read(&[b'M', b'A', 9, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(ProtocolError::TooLong(u32::MAX))
        ));
        // A truncated payload.
        assert!(matches!(
            read(&[b'M', b'A', 9, 0, 4, 0, 0, 0, 1]),
            Err(ProtocolError::Io(_))
        ));
        // Payloads that do not fit their kind.
        assert!(Message::decode(Kind::Hello, &[1]).is_err());
        assert!(Message::decode(Kind::Exec, &[1, 0, 0, 0, 9, 0, 0, 0]).is_err());
        assert!(Message::decode(Kind::Exec, &[0, 0, 0, 0]).is_err());
        assert!(Message::decode(Kind::Exec, &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Message::decode(Kind::Exit, &[2, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Message::decode(Kind::ExecPty, &[24, 0, 80]).is_err());
        assert!(Message::decode(Kind::ExecPty, &[24, 0, 80, 0, 0, 0, 0, 0]).is_err());
        assert!(Message::decode(Kind::Put, &[0, 0, 1, 0, b'/']).is_err());
        assert!(Message::decode(Kind::Put, &[0xa4, 1, 0, 0]).is_err());
        assert!(Message::decode(Kind::Get, &[]).is_err());
        assert!(Message::decode(Kind::Ok, &[0]).is_err());
        assert!(Message::decode(Kind::FileInfo, &[0; 11]).is_err());
    }

    #[test]
    fn chunked_data_stays_within_bounds() {
        let data = vec![1u8; MAX_PAYLOAD * 2 + 5];
        let mut out = Vec::new();
        write_chunked(&mut out, &data, Message::Data).unwrap();
        let mut r = &out[..];
        let mut back = Vec::new();
        while let Ok(Message::Data(d)) = read_message(&mut r) {
            assert!(d.len() <= MAX_PAYLOAD);
            back.extend(d);
        }
        assert_eq!(back, data);
        let too_big = Message::Data(vec![0; MAX_PAYLOAD + 1]);
        assert!(write_message(&mut Vec::new(), &too_big).is_err());
    }

    #[test]
    fn long_error_texts_are_cut_to_one_frame() {
        let m = Message::Error(ErrorCode::Io, "é".repeat(MAX_PAYLOAD));
        let f = m.encode();
        assert!(f.len() <= HEADER_LEN + MAX_PAYLOAD);
        assert!(matches!(
            read_message(&mut &f[..]),
            Ok(Message::Error(ErrorCode::Io, _))
        ));
    }
}
