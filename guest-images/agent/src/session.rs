//! One connection to the agent: the hello, then one request (exec, put or
//! get), as `docs/vsock.md` ("The agent protocol") describes. Anything
//! malformed or out of order is answered with [`Message::Error`] and ends
//! the connection; nothing a peer sends can stop the agent.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::protocol::{
    read_message, write_message, ErrorCode, ExitKind, Message, ProtocolError, MAX_PAYLOAD,
    MIN_VERSION, VERSION,
};
use crate::pty::{MasterReader, Pty};

/// A connection the agent serves (a vsock stream on the card, a UNIX
/// stream in the unit tests).
pub trait Conn: Read + Write + Send + Sized + 'static {
    /// A second handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Ends both directions, waking a reader blocked on the other handle.
    fn shutdown(&self) -> io::Result<()>;
}

impl Conn for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }

    fn shutdown(&self) -> io::Result<()> {
        std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Reading or writing a frame failed.
    #[error("protocol")]
    Protocol(#[from] ProtocolError),
    /// The peer sent something valid but unexpected, or a version we do
    /// not speak (it has been told).
    #[error("refused: {0}")]
    Refused(String),
    /// A local operation failed (the peer has been told).
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        err: io::Error,
    },
}

/// Serves one connection to its end.
pub fn serve<C: Conn>(mut conn: C) -> Result<(), SessionError> {
    let result = serve_inner(&mut conn);
    if let Err(e) = &result {
        let (code, text) = match e {
            SessionError::Protocol(ProtocolError::Closed | ProtocolError::Io(_)) => {
                // The peer is gone or the stream broke: nobody to tell.
                let _ = conn.shutdown();
                return result;
            }
            SessionError::Protocol(p) => (ErrorCode::Malformed, p.to_string()),
            SessionError::Refused(_) => {
                let _ = conn.shutdown();
                return result;
            }
            SessionError::Io { what, err } => (ErrorCode::Io, format!("{what}: {err}")),
        };
        let _ = write_message(&mut conn, &Message::Error(code, text));
    }
    let _ = conn.shutdown();
    result
}

fn refuse<C: Conn>(conn: &mut C, code: ErrorCode, text: String) -> SessionError {
    let _ = write_message(conn, &Message::Error(code, text.clone()));
    SessionError::Refused(text)
}

fn serve_inner<C: Conn>(conn: &mut C) -> Result<(), SessionError> {
    // The host's version, if this agent speaks it, is the connection's.
    let version = match read_message(conn)? {
        Message::Hello(v) if (MIN_VERSION..=VERSION).contains(&v) => {
            write_message(conn, &Message::Hello(v))?;
            v
        }
        Message::Hello(v) => {
            return Err(refuse(
                conn,
                ErrorCode::Version,
                format!(
                    "version {v} is not supported; this agent speaks {MIN_VERSION} to {VERSION}"
                ),
            ))
        }
        m => {
            return Err(refuse(
                conn,
                ErrorCode::Unexpected,
                format!("{:?} before Hello", m.kind()),
            ))
        }
    };
    match read_message(conn)? {
        Message::Exec(argv) => exec(conn, argv, None),
        Message::ExecPty { rows, cols, argv } if version >= 2 => {
            exec(conn, argv, Some((rows, cols)))
        }
        Message::Put { mode, path } => put(conn, mode, &path),
        Message::Get(path) => get(conn, &path),
        m => Err(refuse(
            conn,
            ErrorCode::Unexpected,
            format!("{:?} is not a request", m.kind()),
        )),
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SessionError {
    let what = what.into();
    move |err| SessionError::Io { what, err }
}

fn card_path(conn: &mut impl Conn, raw: &[u8]) -> Result<PathBuf, SessionError> {
    let p = Path::new(std::ffi::OsStr::from_bytes(raw));
    if !p.is_absolute() || raw.contains(&0) {
        return Err(refuse(
            conn,
            ErrorCode::Unexpected,
            format!("{} is not an absolute path", p.display()),
        ));
    }
    Ok(p.into())
}

/// Copies `r` into frames built by `wrap` until it ends; sends nothing at
/// its end (the caller decides how the stream is closed).
fn pump<W: Write>(
    r: &mut impl Read,
    w: &Mutex<W>,
    wrap: fn(Vec<u8>) -> Message,
) -> Result<(), SessionError> {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading the command's output")(e)),
        };
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
        write_message(&mut *w, &wrap(buf[..n].to_vec()))?;
    }
}

/// Kills the child when dropped before it was reaped (the host went away).
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A started command and the ends the agent relays.
struct Started {
    child: Child,
    /// Where the host's input goes.
    stdin: Option<Box<dyn Write + Send>>,
    /// The command's output (with a pty: the master, stdout and stderr
    /// together).
    stdout: Option<Box<dyn Read + Send>>,
    /// Its stderr (none with a pty).
    stderr: Option<Box<dyn Read + Send>>,
    /// What the end of the host's input becomes: closing the pipe, or with
    /// a pty this byte (VEOF, Ctrl-D), which ends input at a line's start.
    eof: Option<u8>,
}

/// Ctrl-D: the default VEOF character.
const VEOF_BYTE: u8 = 0x04;

/// Starts `argv` with pipes, or on a pty of `pty`'s window size.
fn start(argv: &[&std::ffi::OsStr], pty: Option<(u16, u16)>) -> io::Result<Started> {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    let Some((rows, cols)) = pty else {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn Write + Send>);
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        return Ok(Started {
            child,
            stdin,
            stdout,
            stderr,
            eof: None,
        });
    };
    let (child, master) = Pty::open(rows, cols)?.spawn(cmd)?;
    Ok(Started {
        child,
        stdin: Some(Box::new(master.try_clone()?)),
        stdout: Some(Box::new(MasterReader(master))),
        stderr: None,
        eof: Some(VEOF_BYTE),
    })
}

fn exec<C: Conn>(
    conn: &mut C,
    argv: Vec<Vec<u8>>,
    pty: Option<(u16, u16)>,
) -> Result<(), SessionError> {
    let args: Vec<&std::ffi::OsStr> = argv
        .iter()
        .map(|a| std::ffi::OsStr::from_bytes(a))
        .collect();
    let Started {
        child,
        mut stdin,
        mut stdout,
        mut stderr,
        eof,
    } = match start(&args, pty) {
        Ok(s) => s,
        Err(e) => {
            let what = format!("running {}", args[0].to_string_lossy());
            return Err(io_err(what)(e));
        }
    };
    let pid = child.id() as libc::pid_t;
    let mut reaper = Reaper(Some(child));
    // Set (under the lock) once the child is about to be reaped; until then
    // its pid cannot be reused, so the input thread may kill it.
    let reaping = Arc::new(Mutex::new(false));
    let reaping2 = reaping.clone();

    let writer = Arc::new(Mutex::new(conn.try_clone().map_err(io_err("dup"))?));
    let mut reader = conn.try_clone().map_err(io_err("dup"))?;
    // The host's frames: stdin bytes, then its end. Anything else, or the
    // host going away, ends the command (the Reaper kills it).
    let input = std::thread::spawn(move || -> Result<(), SessionError> {
        let r = exec_input(&mut reader, &mut stdin, eof);
        let reaping = reaping2.lock().unwrap_or_else(|p| p.into_inner());
        if !*reaping {
            // SAFETY: kill(2) on our own child, not yet reaped (see `reaping`).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        r
    });
    let w2 = writer.clone();
    let err_pump = std::thread::spawn(move || match &mut stderr {
        Some(e) => pump(e, &w2, Message::Stderr),
        None => Ok(()),
    });
    let out = match &mut stdout {
        Some(o) => pump(o, &writer, Message::Stdout),
        None => Ok(()),
    };
    let err = err_pump
        .join()
        .unwrap_or_else(|_| Err(SessionError::Refused("stderr pump panicked".into())));
    if input.is_finished() {
        // The host went away or misbehaved before the command ended.
        if let Ok(Err(e)) = input.join() {
            return Err(e);
        }
        return Err(SessionError::Refused("the host ended the exec".into()));
    }
    out?;
    err?;
    *reaping.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let status = match reaper.0.take() {
        Some(mut c) => c.wait().map_err(io_err("waiting for the command"))?,
        None => return Err(SessionError::Refused("no child".into())),
    };
    let exit = match (status.code(), status.signal()) {
        (Some(c), _) => ExitKind::Exited(c),
        (None, Some(s)) => ExitKind::Signaled(s),
        (None, None) => ExitKind::Exited(-1),
    };
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    write_message(&mut *w, &Message::Exit(exit))?;
    // Wakes the input thread (its read returns the end of the stream).
    let _ = w.shutdown();
    drop(w);
    let _ = input.join();
    Ok(())
}

/// The host's frames during an exec: stdin bytes, then their end. Returns
/// when the host goes away or sends anything else.
fn exec_input<C: Conn>(
    reader: &mut C,
    stdin: &mut Option<Box<dyn Write + Send>>,
    eof: Option<u8>,
) -> Result<(), SessionError> {
    loop {
        match read_message(reader)? {
            Message::Stdin(d) if d.is_empty() => match (eof, stdin.as_mut()) {
                (Some(b), Some(s)) => {
                    let _ = s.write_all(&[b]);
                }
                _ => *stdin = None,
            },
            Message::Stdin(d) => {
                if let Some(s) = stdin {
                    // A command that closed its stdin just loses input.
                    if s.write_all(&d).is_err() {
                        *stdin = None;
                    }
                }
            }
            m => return Err(SessionError::Refused(format!("{:?} during exec", m.kind()))),
        }
    }
}

/// A temporary file beside the target, removed unless it was renamed into
/// place (a host that disconnects mid-transfer leaves nothing behind).
struct PartFile(Option<PathBuf>);

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn put<C: Conn>(conn: &mut C, mode: u32, raw: &[u8]) -> Result<(), SessionError> {
    let path = card_path(conn, raw)?;
    let mut tmp = path.clone().into_os_string();
    tmp.push(format!(".mic-agent-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let what = format!("writing {}", path.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(what.clone()))?;
    let mut part = PartFile(Some(tmp.clone()));
    loop {
        match read_message(conn)? {
            Message::Data(d) if d.is_empty() => break,
            Message::Data(d) => f.write_all(&d).map_err(io_err(what.clone()))?,
            m => {
                return Err(refuse(
                    conn,
                    ErrorCode::Unexpected,
                    format!("{:?} during put", m.kind()),
                ))
            }
        }
    }
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(what.clone()))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io_err(what))?;
    part.0 = None;
    write_message(conn, &Message::Ok)?;
    Ok(())
}

fn get<C: Conn>(conn: &mut C, raw: &[u8]) -> Result<(), SessionError> {
    let path = card_path(conn, raw)?;
    let what = format!("reading {}", path.display());
    let mut f = File::open(&path).map_err(io_err(what.clone()))?;
    let meta = f.metadata().map_err(io_err(what.clone()))?;
    if !meta.is_file() {
        return Err(SessionError::Io {
            what,
            err: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    write_message(
        conn,
        &Message::FileInfo {
            mode: meta.permissions().mode() & 0o7777,
            size: meta.len(),
        },
    )?;
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        let n = f.read(&mut buf).map_err(io_err(what.clone()))?;
        write_message(conn, &Message::Data(buf[..n].to_vec()))?;
        if n == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Kind, MAGIC};
    use std::os::unix::net::UnixStream;

    fn start() -> (
        UnixStream,
        std::thread::JoinHandle<Result<(), SessionError>>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        (a, std::thread::spawn(move || serve(b)))
    }

    fn hello(s: &mut UnixStream) {
        write_message(s, &Message::Hello(VERSION)).unwrap();
        assert_eq!(read_message(s).unwrap(), Message::Hello(VERSION));
    }

    fn run(argv: &[&str], stdin: &[u8]) -> (Vec<u8>, Vec<u8>, ExitKind) {
        let (mut s, t) = start();
        hello(&mut s);
        let argv = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
        write_message(&mut s, &Message::Exec(argv)).unwrap();
        for c in stdin.chunks(MAX_PAYLOAD) {
            write_message(&mut s, &Message::Stdin(c.to_vec())).unwrap();
        }
        write_message(&mut s, &Message::Stdin(vec![])).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exit = loop {
            match read_message(&mut s).unwrap() {
                Message::Stdout(d) => out.extend(d),
                Message::Stderr(d) => err.extend(d),
                Message::Exit(e) => break e,
                m => panic!("unexpected {m:?}"),
            }
        };
        t.join().unwrap().unwrap();
        (out, err, exit)
    }

    #[test]
    fn exec_streams_and_status() {
        let (out, err, exit) = run(&["sh", "-c", "cat; echo oops >&2; exit 3"], b"in\n");
        assert_eq!(out, b"in\n");
        assert_eq!(err, b"oops\n");
        assert_eq!(exit, ExitKind::Exited(3));
        let (_, _, exit) = run(&["sh", "-c", "kill -9 $$"], b"");
        assert_eq!(exit.shell_status(), 137);
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let (out, _, exit) = run(&["cat"], &big);
        assert_eq!(out, big);
        assert_eq!(exit, ExitKind::Exited(0));
    }

    #[test]
    fn exec_of_a_missing_program_is_an_error_message() {
        let (mut s, t) = start();
        hello(&mut s);
        write_message(&mut s, &Message::Exec(vec![b"/nonexistent/x".to_vec()])).unwrap();
        assert!(matches!(
            read_message(&mut s).unwrap(),
            Message::Error(ErrorCode::Io, _)
        ));
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn put_then_get_keeps_bytes_and_mode() {
        let dir = std::env::temp_dir().join(format!("mic-agent-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut s, t) = start();
        hello(&mut s);
        let p = path.as_os_str().as_bytes().to_vec();
        write_message(
            &mut s,
            &Message::Put {
                mode: 0o751,
                path: p.clone(),
            },
        )
        .unwrap();
        crate::protocol::write_chunked(&mut s, &data, Message::Data).unwrap();
        write_message(&mut s, &Message::Data(vec![])).unwrap();
        assert_eq!(read_message(&mut s).unwrap(), Message::Ok);
        t.join().unwrap().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o751);

        let (mut s, t) = start();
        hello(&mut s);
        write_message(&mut s, &Message::Get(p)).unwrap();
        assert_eq!(
            read_message(&mut s).unwrap(),
            Message::FileInfo {
                mode: 0o751,
                size: data.len() as u64
            }
        );
        let mut back = Vec::new();
        loop {
            match read_message(&mut s).unwrap() {
                Message::Data(d) if d.is_empty() => break,
                Message::Data(d) => back.extend(d),
                m => panic!("unexpected {m:?}"),
            }
        }
        assert_eq!(back, data);
        t.join().unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_put_cut_short_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("mic-agent-c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let (mut s, t) = start();
        hello(&mut s);
        let p = path.as_os_str().as_bytes().to_vec();
        write_message(
            &mut s,
            &Message::Put {
                mode: 0o644,
                path: p,
            },
        )
        .unwrap();
        write_message(&mut s, &Message::Data(vec![1; 1000])).unwrap();
        drop(s);
        assert!(t.join().unwrap().is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_gets_an_error_message() {
        let (mut s, t) = start();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(matches!(
            read_message(&mut s).unwrap(),
            Message::Error(ErrorCode::Malformed, _)
        ));
        assert!(t.join().unwrap().is_err());

        let (mut s, t) = start();
        s.write_all(&[
            MAGIC[0],
            MAGIC[1],
            Kind::Data as u8,
            0,
            0xff,
            0xff,
            0xff,
            0x7f,
        ])
        .unwrap();
        assert!(matches!(
            read_message(&mut s).unwrap(),
            Message::Error(ErrorCode::Malformed, _)
        ));
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn wrong_version_and_order_are_refused() {
        let (mut s, t) = start();
        write_message(&mut s, &Message::Hello(VERSION + 1)).unwrap();
        assert!(matches!(
            read_message(&mut s).unwrap(),
            Message::Error(ErrorCode::Version, _)
        ));
        assert!(t.join().unwrap().is_err());

        let (mut s, t) = start();
        write_message(&mut s, &Message::Get(b"/etc/passwd".to_vec())).unwrap();
        assert!(matches!(
            read_message(&mut s).unwrap(),
            Message::Error(ErrorCode::Unexpected, _)
        ));
        assert!(t.join().unwrap().is_err());

        let (mut s, t) = start();
        hello(&mut s);
        write_message(&mut s, &Message::Get(b"relative".to_vec())).unwrap();
        assert!(matches!(
            read_message(&mut s).unwrap(),
            Message::Error(ErrorCode::Unexpected, _)
        ));
        assert!(t.join().unwrap().is_err());
    }

    /// Runs a request on a connection that said `Hello(version)`; returns
    /// stdout, and the exit or the error that ended it.
    fn exec_pty_as(version: u16, argv: &[&str], stdin: &[u8]) -> (Vec<u8>, Message) {
        let (mut s, t) = start();
        write_message(&mut s, &Message::Hello(version)).unwrap();
        assert_eq!(read_message(&mut s).unwrap(), Message::Hello(version));
        let argv = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
        let req = Message::ExecPty {
            rows: 40,
            cols: 132,
            argv,
        };
        write_message(&mut s, &req).unwrap();
        // The agent may have refused the request and closed already.
        let _ = write_message(&mut s, &Message::Stdin(stdin.to_vec()));
        let _ = write_message(&mut s, &Message::Stdin(vec![]));
        let mut out = Vec::new();
        let end = loop {
            match read_message(&mut s).unwrap() {
                Message::Stdout(d) => out.extend(d),
                m => break m,
            }
        };
        let _ = t.join().unwrap();
        (out, end)
    }

    #[test]
    fn exec_pty_runs_on_a_terminal_and_returns_the_status() {
        let (out, end) = exec_pty_as(
            VERSION,
            &[
                "sh",
                "-c",
                "tty; stty size; test -t 0 && read l && echo got:$l; exit 5",
            ],
            b"line\n",
        );
        assert_eq!(end, Message::Exit(ExitKind::Exited(5)));
        let out = String::from_utf8(out).unwrap();
        // The terminal echoes the input, anywhere among the output lines.
        let lines: Vec<_> = out.lines().map(str::trim_end).collect();
        assert!(lines.iter().any(|l| l.starts_with("/dev/pts/")), "{out:?}");
        assert!(lines.contains(&"40 132"), "{out:?}");
        assert!(lines.contains(&"line"), "{out:?}");
        assert!(lines.contains(&"got:line"), "{out:?}");
        // The end of the host's input is Ctrl-D: cat sees the end.
        let (out, end) = exec_pty_as(VERSION, &["cat"], b"");
        assert_eq!(end, Message::Exit(ExitKind::Exited(0)));
        assert_eq!(out, b"");
    }

    #[test]
    fn version_1_is_still_spoken_without_exec_pty() {
        assert_eq!(MIN_VERSION, 1);
        let (out, _, exit) = run(&["echo", "v2"], b"");
        assert_eq!((out.as_slice(), exit), (&b"v2\n"[..], ExitKind::Exited(0)));
        let (out, end) = exec_pty_as(1, &["tty"], b"");
        assert!(out.is_empty());
        assert!(
            matches!(end, Message::Error(ErrorCode::Unexpected, _)),
            "{end:?}"
        );
    }
}
