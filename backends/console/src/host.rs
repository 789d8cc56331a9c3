//! Host side of the console: a pseudo-terminal, a unix socket or stdio,
//! plus an optional log file.
//!
//! Output policy when nobody is attached:
//! * pty: the kernel keeps what fits in the pty buffer (a few KiB, shown to
//!   the next reader); beyond that output is dropped.
//! * unix socket: output is dropped while no client is attached.
//! * stdio: written to stdout (blocking).
//!
//! The log file always receives everything.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{debug, info, warn};
use mic_backend_common::worker::Worker;
use vmm_sys_util::epoll::EventSet;

use crate::config::ConsoleTarget;
use crate::logfile::LogFile;

/// Ctrl-]: leaves stdio mode when stdin is a terminal.
const ESCAPE: u8 = 0x1d;

/// Event id offset: console input readable.
pub const EV_INPUT: u64 = 0;
/// Event id offset: new client on the unix socket.
pub const EV_LISTEN: u64 = 1;

/// Events of an input descriptor: data, or the other end hanging up.
fn input_events() -> EventSet {
    EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

fn epoll_add(worker: Option<&Worker>, fd: RawFd, events: EventSet, id: u64) -> io::Result<()> {
    match worker {
        Some(w) => w.register(fd, events, id),
        None => Ok(()),
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a valid fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Terminal size (cols, rows) of a tty, if it has one.
fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a struct winsize.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
        return None;
    }
    (ws.ws_col != 0 && ws.ws_row != 0).then_some((ws.ws_col, ws.ws_row))
}

/// A new pseudo-terminal pair. The slave end is kept open so that the
/// master never reports a hang-up while no terminal program is attached.
struct Pty {
    master: File,
    _slave: File,
    path: PathBuf,
}

impl Pty {
    fn open() -> io::Result<Pty> {
        // SAFETY: posix_openpt returns a new fd or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor owned here.
        let master = unsafe { File::from_raw_fd(fd) };
        // SAFETY: valid master fd.
        if unsafe { libc::grantpt(fd) } < 0 || unsafe { libc::unlockpt(fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: buffer valid for its length.
        if unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ptsname_r NUL-terminated the buffer.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)?;
        mic_backend_common::terminal::make_raw(slave.as_raw_fd())?;
        set_nonblocking(fd)?;
        Ok(Pty {
            master,
            _slave: slave,
            path: PathBuf::from(path),
        })
    }
}

struct UnixConsole {
    listener: UnixListener,
    path: PathBuf,
    client: Option<UnixStream>,
}

struct Stdio {
    saved_termios: Option<libc::termios>,
    saved_flags: Option<libc::c_int>,
    eof: bool,
}

enum Kind {
    Pty(Pty),
    Unix(UnixConsole),
    Stdio(Stdio),
}

/// The host end of the console.
pub struct Host {
    kind: Kind,
    log: Option<LogFile>,
    /// The worker whose epoll set watches the input, while attached.
    worker: Option<Worker>,
    base: u64,
}

impl Host {
    /// Opens the host side. Errors here are configuration errors (reported
    /// before the vhost-user socket exists).
    pub fn open(
        target: &ConsoleTarget,
        log: Option<&Path>,
        log_max_size: Option<u64>,
    ) -> io::Result<Host> {
        let log = match log {
            Some(p) => Some(
                LogFile::open(p, log_max_size)
                    .map_err(|e| io::Error::new(e.kind(), format!("log {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let kind = match target {
            ConsoleTarget::Pty => {
                Kind::Pty(Pty::open().map_err(|e| io::Error::new(e.kind(), format!("pty: {e}")))?)
            }
            ConsoleTarget::Unix(p) => {
                if let Ok(md) = std::fs::symlink_metadata(p) {
                    if !md.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", p.display()),
                        ));
                    }
                    if UnixStream::connect(p).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use", p.display()),
                        ));
                    }
                    let _ = std::fs::remove_file(p);
                }
                let listener = UnixListener::bind(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                listener.set_nonblocking(true)?;
                Kind::Unix(UnixConsole {
                    listener,
                    path: p.clone(),
                    client: None,
                })
            }
            ConsoleTarget::Stdio => {
                let fd = libc::STDIN_FILENO;
                // SAFETY: isatty on a fd number.
                let saved_termios = if unsafe { libc::isatty(fd) } == 1 {
                    Some(mic_backend_common::terminal::make_raw(fd)?)
                } else {
                    None
                };
                let saved_flags = set_nonblocking(fd).ok();
                Kind::Stdio(Stdio {
                    saved_termios,
                    saved_flags,
                    eof: false,
                })
            }
        };
        Ok(Host {
            kind,
            log,
            worker: None,
            base: 0,
        })
    }

    /// The pty path, in pty mode.
    pub fn pty_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Pty(p) => Some(&p.path),
            _ => None,
        }
    }

    /// Whether the host side is a terminal with a size.
    pub fn has_size(&self) -> bool {
        !matches!(self.kind, Kind::Unix(_))
    }

    /// Current terminal size (cols, rows), if known.
    pub fn size(&self) -> Option<(u16, u16)> {
        match &self.kind {
            Kind::Pty(p) => winsize(p.master.as_raw_fd()),
            Kind::Stdio(_) => winsize(libc::STDOUT_FILENO).or_else(|| winsize(libc::STDIN_FILENO)),
            Kind::Unix(_) => None,
        }
    }

    fn input_fd(&self) -> Option<RawFd> {
        match &self.kind {
            Kind::Pty(p) => Some(p.master.as_raw_fd()),
            Kind::Unix(u) => u.client.as_ref().map(|c| c.as_raw_fd()),
            Kind::Stdio(s) => (!s.eof).then_some(libc::STDIN_FILENO),
        }
    }

    /// Registers the host descriptors with a worker's epoll set, with event
    /// ids `base + EV_*`.
    pub fn attach(&mut self, worker: Worker, base: u64) {
        self.base = base;
        let w = Some(&worker);
        if let Some(fd) = self.input_fd() {
            if let Err(e) = epoll_add(w, fd, input_events(), base + EV_INPUT) {
                // Regular files (stdin < file) cannot be polled.
                warn!("console input not watched: {e}");
                if let Kind::Stdio(s) = &mut self.kind {
                    s.eof = true;
                }
            }
        }
        if let Kind::Unix(u) = &self.kind {
            if let Err(e) = epoll_add(w, u.listener.as_raw_fd(), EventSet::IN, base + EV_LISTEN) {
                warn!("console listener not watched: {e}");
            }
        }
        self.worker = Some(worker);
    }

    /// Forgets the epoll set (its worker is gone).
    pub fn detach(&mut self) {
        self.worker = None;
    }

    /// Accepts a new client on the unix socket; it replaces the current one.
    pub fn accept(&mut self) {
        let Kind::Unix(u) = &mut self.kind else {
            return;
        };
        loop {
            match u.listener.accept() {
                Ok((c, _)) => {
                    if c.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if u.client.is_some() {
                        info!("console: new client replaces the attached one");
                    } else {
                        info!("console: client attached on {}", u.path.display());
                    }
                    let w = self.worker.as_ref();
                    if let Err(e) =
                        epoll_add(w, c.as_raw_fd(), input_events(), self.base + EV_INPUT)
                    {
                        warn!("console client not watched: {e}");
                    }
                    u.client = Some(c);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("console accept: {e}");
                    break;
                }
            }
        }
    }

    /// Reads console input. `None` when nothing is available now.
    pub fn read_input(&mut self, buf: &mut [u8]) -> Option<usize> {
        let r = match &mut self.kind {
            Kind::Pty(p) => (&p.master).read(buf),
            Kind::Unix(u) => u.client.as_mut()?.read(buf),
            Kind::Stdio(s) => {
                if s.eof {
                    return None;
                }
                // SAFETY: buffer valid for its length.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        };
        match r {
            Ok(0) => {
                self.input_closed("end of input");
                None
            }
            Ok(n) => {
                if let Kind::Stdio(Stdio {
                    saved_termios: Some(_),
                    ..
                }) = &self.kind
                {
                    // Raw mode disables Ctrl-C; Ctrl-] quits instead.
                    if let Some(i) = buf[..n].iter().position(|&b| b == ESCAPE) {
                        info!("console: Ctrl-] on stdin, shutting down");
                        // SAFETY: raising a signal in our own process; the
                        // daemon's handler turns it into a clean shutdown.
                        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                        return (i > 0).then_some(i);
                    }
                }
                Some(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => {
                // EIO on a pty master means no terminal is attached; that
                // cannot happen while we hold the slave, but be safe.
                debug!("console read: {e}");
                self.input_closed(&e.to_string());
                None
            }
        }
    }

    fn input_closed(&mut self, why: &str) {
        match &mut self.kind {
            Kind::Unix(u) => {
                if u.client.take().is_some() {
                    info!("console: client detached ({why})");
                }
            }
            Kind::Stdio(s) => {
                info!("console: stdin closed ({why})");
                s.eof = true;
            }
            Kind::Pty(_) => {}
        }
    }

    /// Writes card output to the host side and the log. Never blocks on a
    /// pty or socket: what does not fit is dropped.
    pub fn write_output(&mut self, data: &[u8]) {
        if let Some(l) = self.log.as_mut() {
            if let Err(e) = l.write(data) {
                debug!("console log: {e}");
            }
        }
        let mut drop_client = false;
        match &mut self.kind {
            Kind::Pty(p) => {
                let _ = write_some(&mut &p.master, data);
            }
            Kind::Unix(u) => {
                if let Some(c) = u.client.as_mut() {
                    if let Err(e) = write_some(c, data) {
                        debug!("console client write: {e}");
                        drop_client = true;
                    }
                }
            }
            Kind::Stdio(_) => {
                let mut out = io::stdout().lock();
                let _ = out.write_all(data);
                let _ = out.flush();
            }
        }
        if drop_client {
            self.input_closed("write error");
        }
    }
}

/// Writes what the descriptor takes without blocking; `Err` only for real
/// errors (a full buffer is not one).
fn write_some<W: Write>(w: &mut W, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match w.write(data) {
            Ok(0) => return Ok(()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Host {
    /// Restores stdin's terminal mode and flags (stdio mode) and removes the
    /// console socket (unix mode). Safe to call more than once.
    pub fn restore(&mut self) {
        match &mut self.kind {
            Kind::Stdio(s) => {
                if let Some(t) = s.saved_termios.take() {
                    // SAFETY: restoring the saved attributes of stdin.
                    unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
                }
                if let Some(f) = s.saved_flags.take() {
                    // SAFETY: restoring the saved file status flags.
                    unsafe { libc::fcntl(libc::STDIN_FILENO, libc::F_SETFL, f) };
                }
            }
            Kind::Unix(u) => {
                let _ = std::fs::remove_file(&u.path);
            }
            Kind::Pty(_) => {}
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.restore();
    }
}
