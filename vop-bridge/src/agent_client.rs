//! The host's client of the card agent (`mic-agent`; `docs/vsock.md`).
//!
//! It reaches the agent through `vhost-device-vsock`'s host UNIX socket, the
//! hybrid scheme Firecracker introduced: connect to the socket, send
//! `CONNECT <port>\n`, read `OK <host port>\n`, and the stream then carries
//! the card port's bytes. The protocol itself is `mic_agent::protocol`, the
//! one definition both sides use.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mic_agent::protocol::{
    read_message, write_message, ErrorCode, Message, ProtocolError, MAX_PAYLOAD, MIN_VERSION,
    VERSION,
};
pub use mic_agent::protocol::{ExitKind, AGENT_PORT};

/// How long the hybrid handshake and the hello may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The backend's UNIX socket could not be reached.
    #[error("connecting to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        err: io::Error,
    },
    /// The backend did not confirm `CONNECT` (no agent listening, or no card).
    #[error("the vsock backend refused port {port}: {answer:?}")]
    Refused {
        /// The card port.
        port: u32,
        /// What it answered (empty when it closed the connection).
        answer: String,
    },
    /// A frame could not be read or written.
    #[error("agent protocol")]
    Protocol(#[from] ProtocolError),
    /// The agent answered with an error message.
    #[error("the agent: {1} ({0:?})")]
    Agent(ErrorCode, String),
    /// The agent sent a message that does not belong here.
    #[error("unexpected {0:?} from the agent")]
    Unexpected(mic_agent::protocol::Kind),
    /// A local file operation failed.
    #[error("{}", path.display())]
    Local {
        /// The local file.
        path: PathBuf,
        /// Cause.
        #[source]
        err: io::Error,
    },
    /// The socket failed outside a frame.
    #[error("i/o")]
    Io(#[from] io::Error),
    /// The request needs a newer agent protocol than the card's agent
    /// speaks (an older card image).
    #[error("the card agent speaks protocol version {agent}; this needs {needed}")]
    Version {
        /// What the connection speaks.
        agent: u16,
        /// What the request needs.
        needed: u16,
    },
}

fn unexpected(m: Message) -> AgentError {
    match m {
        Message::Error(code, text) => AgentError::Agent(code, text),
        m => AgentError::Unexpected(m.kind()),
    }
}

/// Connects to `port` of the card behind `uds` (a `vhost-device-vsock`
/// `uds-path`), the hybrid way. The stream carries the port's bytes.
pub fn connect_port(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let connect_err = |err| AgentError::Connect {
        path: uds.into(),
        err,
    };
    let mut s = UnixStream::connect(uds).map_err(connect_err)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line belongs to the card's port.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
        }
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    if !answer.starts_with("OK ") {
        return Err(AgentError::Refused { port, answer });
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// A connection to the agent, past its hello; good for one request.
pub struct AgentClient {
    stream: UnixStream,
    /// The protocol version the agent answered with.
    version: u16,
}

impl AgentClient {
    /// Connects to the agent's port behind `uds` and exchanges hellos.
    pub fn connect(uds: &Path) -> Result<Self, AgentError> {
        Self::connect_port(uds, AGENT_PORT)
    }

    /// Connects like [`AgentClient::connect`], trying again for up to
    /// `wait` while the backend refuses the port: the card reports
    /// `online` from its driver a moment before its init starts the agent.
    pub fn connect_when_up(uds: &Path, wait: std::time::Duration) -> Result<Self, AgentError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Self::connect(uds) {
                Err(AgentError::Refused { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                r => return r,
            }
        }
    }

    /// The same on another port.
    pub fn connect_port(uds: &Path, port: u32) -> Result<Self, AgentError> {
        let mut stream = connect_port(uds, port)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        write_message(&mut stream, &Message::Hello(VERSION))?;
        let version = match read_message(&mut stream)? {
            Message::Hello(v) if (MIN_VERSION..=VERSION).contains(&v) => v,
            m => return Err(unexpected(m)),
        };
        stream.set_read_timeout(None)?;
        Ok(AgentClient { stream, version })
    }

    /// The protocol version this connection speaks.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Runs `argv` on the card: `stdin` is sent (and then its end) while
    /// its stdout and stderr go to `stdout` and `stderr`. Returns how the
    /// command ended.
    pub fn exec(
        self,
        argv: &[impl AsRef<[u8]>],
        stdin: impl Read + Send + 'static,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitKind, AgentError> {
        let argv = argv.iter().map(|a| a.as_ref().to_vec()).collect();
        self.run(Message::Exec(argv), stdin, stdout, stderr)
    }

    /// Runs `argv` on a pseudo-terminal in the card of `rows` x `cols`
    /// (0: unknown): `stdin` goes to the terminal (its end becomes Ctrl-D),
    /// and what the command writes to it, stdout and stderr alike, to
    /// `stdout`. Needs protocol version 2.
    pub fn exec_tty(
        self,
        argv: &[impl AsRef<[u8]>],
        (rows, cols): (u16, u16),
        stdin: impl Read + Send + 'static,
        stdout: &mut dyn Write,
    ) -> Result<ExitKind, AgentError> {
        if self.version < 2 {
            return Err(AgentError::Version {
                agent: self.version,
                needed: 2,
            });
        }
        let argv = argv.iter().map(|a| a.as_ref().to_vec()).collect();
        let req = Message::ExecPty { rows, cols, argv };
        self.run(req, stdin, stdout, &mut io::sink())
    }

    fn run(
        mut self,
        request: Message,
        mut stdin: impl Read + Send + 'static,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitKind, AgentError> {
        write_message(&mut self.stream, &request)?;
        let mut tx = self.stream.try_clone()?;
        // stdin on a thread of its own: a command may print before it reads.
        // When it ends early (the command is done) the thread is left to
        // finish or fail on its own.
        std::thread::spawn(move || -> Result<(), ProtocolError> {
            let mut buf = vec![0u8; MAX_PAYLOAD];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                write_message(&mut tx, &Message::Stdin(buf[..n].to_vec()))?;
                if n == 0 {
                    return Ok(());
                }
            }
        });
        loop {
            match read_message(&mut self.stream)? {
                Message::Stdout(d) => stdout.write_all(&d)?,
                Message::Stderr(d) => stderr.write_all(&d)?,
                Message::Exit(e) => {
                    stdout.flush()?;
                    stderr.flush()?;
                    return Ok(e);
                }
                m => return Err(unexpected(m)),
            }
        }
    }

    /// Copies `reader` to `path` on the card with permission bits `mode`.
    pub fn put(mut self, reader: &mut dyn Read, path: &str, mode: u32) -> Result<(), AgentError> {
        let put = Message::Put {
            mode: mode & 0o7777,
            path: path.as_bytes().to_vec(),
        };
        write_message(&mut self.stream, &put)?;
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if let Err(e) = write_message(&mut self.stream, &Message::Data(buf[..n].to_vec())) {
                // The agent may have refused the file and closed: its
                // reason beats the broken pipe.
                return Err(match read_message(&mut self.stream) {
                    Ok(m) => unexpected(m),
                    Err(_) => e.into(),
                });
            }
            if n == 0 {
                break;
            }
        }
        match read_message(&mut self.stream)? {
            Message::Ok => Ok(()),
            m => Err(unexpected(m)),
        }
    }

    /// Copies `path` on the card to `writer`; returns its permission bits.
    pub fn get(mut self, path: &str, writer: &mut dyn Write) -> Result<u32, AgentError> {
        write_message(&mut self.stream, &Message::Get(path.as_bytes().to_vec()))?;
        let (mode, size) = match read_message(&mut self.stream)? {
            Message::FileInfo { mode, size } => (mode, size),
            m => return Err(unexpected(m)),
        };
        let mut got = 0u64;
        loop {
            match read_message(&mut self.stream)? {
                Message::Data(d) if d.is_empty() => break,
                Message::Data(d) => {
                    got += d.len() as u64;
                    writer.write_all(&d)?;
                }
                m => return Err(unexpected(m)),
            }
        }
        writer.flush()?;
        if got != size {
            return Err(AgentError::Agent(
                ErrorCode::Io,
                format!("{path} changed while it was read: {got} of {size} bytes"),
            ));
        }
        Ok(mode)
    }
}

/// Copies a host file to the card, keeping its permission bits.
pub fn copy_to_card(uds: &Path, local: &Path, remote: &str) -> Result<(), AgentError> {
    let local_err = |err| AgentError::Local {
        path: local.into(),
        err,
    };
    let mut f = File::open(local).map_err(local_err)?;
    let mode = f.metadata().map_err(local_err)?.permissions().mode();
    AgentClient::connect(uds)?.put(&mut f, remote, mode)
}

/// Copies a card file to the host, keeping its permission bits; the host
/// file appears whole or not at all.
pub fn copy_from_card(uds: &Path, remote: &str, local: &Path) -> Result<(), AgentError> {
    let local_err = |err| AgentError::Local {
        path: local.into(),
        err,
    };
    let mut tmp = local.as_os_str().to_owned();
    tmp.push(".micctl-part");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(local_err)?;
    let result =
        AgentClient::connect(uds).and_then(|c| c.get(remote, &mut io::BufWriter::new(&mut f)));
    let mode = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(local_err)?;
    std::fs::rename(&tmp, local).map_err(local_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn read_line(r: &mut impl BufRead) -> io::Result<String> {
        let mut s = String::new();
        r.read_line(&mut s)?;
        Ok(s)
    }

    /// A stand-in for vhost-device-vsock's host socket: answers the hybrid
    /// handshake, then serves the agent's session on the stream.
    fn fake_backend(dir: &Path) -> PathBuf {
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut r = io::BufReader::new(s.try_clone().unwrap());
                let line = read_line(&mut r).unwrap();
                if line != format!("CONNECT {AGENT_PORT}\n") {
                    continue; // closes: the way the backend refuses
                }
                s.write_all(b"OK 1073741824\n").unwrap();
                std::thread::spawn(move || mic_agent::session::serve(s));
            }
        });
        path
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-client-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn exec_through_the_hybrid_handshake() {
        let d = scratch("exec");
        let uds = fake_backend(&d);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exit = AgentClient::connect(&uds)
            .unwrap()
            .exec(
                &["sh", "-c", "tr a-z A-Z; echo e >&2; exit 3"],
                io::Cursor::new(b"abc".to_vec()),
                &mut out,
                &mut err,
            )
            .unwrap();
        assert_eq!((out.as_slice(), err.as_slice()), (&b"ABC"[..], &b"e\n"[..]));
        assert_eq!(exit.shell_status(), 3);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exec_tty_runs_on_a_terminal() {
        let d = scratch("tty");
        let uds = fake_backend(&d);
        let client = AgentClient::connect(&uds).unwrap();
        assert_eq!(client.version(), VERSION);
        let mut out = Vec::new();
        let exit = client
            .exec_tty(
                &["sh", "-c", "test -t 0 && stty size && exit 7"],
                (25, 90),
                io::empty(),
                &mut out,
            )
            .unwrap();
        assert_eq!(exit.shell_status(), 7);
        assert_eq!(out, b"25 90\r\n");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_refused_port_is_an_error() {
        let d = scratch("refused");
        let uds = fake_backend(&d);
        assert!(matches!(
            AgentClient::connect_port(&uds, 1),
            Err(AgentError::Refused { port: 1, .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn copies_keep_bytes_and_mode() {
        let d = scratch("cp");
        let uds = fake_backend(&d);
        let src = d.join("src");
        let data: Vec<u8> = (0..500_000u32).map(|i| (i * 13) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
        let remote = d.join("remote");
        copy_to_card(&uds, &src, remote.to_str().unwrap()).unwrap();
        let back = d.join("back");
        copy_from_card(&uds, remote.to_str().unwrap(), &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
        let mode = std::fs::metadata(&back).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        let missing = copy_from_card(&uds, "/nonexistent/f", &d.join("m"));
        assert!(matches!(missing, Err(AgentError::Agent(ErrorCode::Io, _))));
        assert!(!d.join("m").exists() && !d.join("m.micctl-part").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
