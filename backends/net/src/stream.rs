//! QEMU `-netdev stream` transport.
//!
//! Frames travel over a unix or TCP stream socket, each one preceded by its
//! length as a 4-byte big-endian integer. There is no virtio-net header on
//! the wire, so no offloads can be used: every frame is complete.
//!
//! As a server (`--listen`) one peer is served at a time; a new peer
//! replaces the current one. As a client the port reconnects every second
//! while the peer is away.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use log::{debug, info, warn};
use mic_backend_common::worker::Worker;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::StreamAddr;

/// Largest frame accepted from or sent to the peer (matches QEMU's limit).
pub const MAX_FRAME: usize = 65536 + 4096;
/// Bytes of queued output above which TX from the guest pauses.
const TX_HIGH_WATER: usize = 256 * 1024;
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Event id offsets (added to the base given to [`StreamPort::attach`]).
pub const EV_CONN: u64 = 0;
/// Listening socket readable.
pub const EV_LISTEN: u64 = 1;
/// Reconnect timer expired.
pub const EV_TIMER: u64 = 2;

trait Conn: Read + Write + AsRawFd + Send {}
impl Conn for UnixStream {}
impl Conn for TcpStream {}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Box::new(s)
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                debug!("stream peer {peer}");
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        })
    }
}

/// Events of the connection: data, room to write, the peer hanging up.
fn conn_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

fn epoll_add(worker: Option<&Worker>, fd: RawFd, events: EventSet, id: u64) {
    if let Some(w) = worker {
        if let Err(e) = w.register(fd, events, id) {
            warn!("stream: cannot watch descriptor {fd}: {e}");
        }
    }
}

/// A stream socket carrying length-prefixed Ethernet frames.
pub struct StreamPort {
    addr: StreamAddr,
    listener: Option<Listener>,
    conn: Option<Box<dyn Conn>>,
    timer: Option<TimerFd>,
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// The worker whose epoll set watches the port, while attached.
    worker: Option<Worker>,
    base: u64,
}

impl StreamPort {
    /// Binds (`listen`) or connects to `addr`.
    ///
    /// A listening socket that cannot be bound is an error; a peer that
    /// cannot be reached yet is not (the port keeps retrying).
    pub fn new(addr: StreamAddr, listen: bool) -> io::Result<Self> {
        let mut port = StreamPort {
            addr,
            listener: None,
            conn: None,
            timer: None,
            rbuf: vec![0; 2 * (MAX_FRAME + 4)],
            rpos: 0,
            rlen: 0,
            wbuf: Vec::new(),
            wpos: 0,
            worker: None,
            base: 0,
        };
        if listen {
            port.listener = Some(port.bind()?);
            info!("stream: listening on {}", port.addr);
        } else {
            port.timer = Some(TimerFd::new()?);
            if let Err(e) = port.connect() {
                warn!("stream: {} not reachable yet ({e}), retrying", port.addr);
                port.arm_timer();
            }
        }
        Ok(port)
    }

    fn bind(&self) -> io::Result<Listener> {
        let l = match &self.addr {
            StreamAddr::Unix(p) => {
                if let Ok(md) = fs::symlink_metadata(p) {
                    if md.file_type().is_socket() && UnixStream::connect(p).is_err() {
                        let _ = fs::remove_file(p);
                    }
                }
                let l = UnixListener::bind(p).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {}: {e}", p.display()))
                })?;
                l.set_nonblocking(true)?;
                Listener::Unix(l)
            }
            StreamAddr::Tcp(a) => {
                let l = TcpListener::bind(a.as_str())
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
                l.set_nonblocking(true)?;
                Listener::Tcp(l)
            }
        };
        Ok(l)
    }

    fn connect(&mut self) -> io::Result<()> {
        let conn: Box<dyn Conn> = match &self.addr {
            StreamAddr::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_nonblocking(true)?;
                Box::new(s)
            }
            StreamAddr::Tcp(a) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for sa in a.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        info!("stream: connected to {}", self.addr);
        self.set_conn(conn);
        Ok(())
    }

    fn set_conn(&mut self, conn: Box<dyn Conn>) {
        self.rpos = 0;
        self.rlen = 0;
        self.wbuf.clear();
        self.wpos = 0;
        epoll_add(
            self.worker.as_ref(),
            conn.as_raw_fd(),
            conn_events(),
            self.base + EV_CONN,
        );
        self.conn = Some(conn);
        if let Some(t) = self.timer.as_mut() {
            let _ = t.clear();
        }
    }

    fn arm_timer(&mut self) {
        if let Some(t) = self.timer.as_mut() {
            if let Err(e) = t.reset(RECONNECT_INTERVAL, Some(RECONNECT_INTERVAL)) {
                warn!("stream: cannot arm reconnect timer: {e}");
            }
        }
    }

    fn disconnect(&mut self, why: &str) {
        if self.conn.take().is_some() {
            info!("stream: peer {} gone ({why})", self.addr);
            self.rpos = 0;
            self.rlen = 0;
            self.wbuf.clear();
            self.wpos = 0;
            self.arm_timer();
        }
    }

    /// Registers the port's descriptors with a worker's epoll set, using
    /// event ids `base + EV_*`.
    pub fn attach(&mut self, worker: Worker, base: u64) {
        self.base = base;
        let w = Some(&worker);
        if let Some(c) = &self.conn {
            epoll_add(w, c.as_raw_fd(), conn_events(), base + EV_CONN);
        }
        if let Some(l) = &self.listener {
            epoll_add(w, l.fd(), EventSet::IN, base + EV_LISTEN);
        }
        if let Some(t) = &self.timer {
            epoll_add(w, t.as_raw_fd(), EventSet::IN, base + EV_TIMER);
        }
        self.worker = Some(worker);
    }

    /// Forgets the epoll set (its worker is gone).
    pub fn detach(&mut self) {
        self.worker = None;
    }

    /// Whether a peer is connected.
    #[cfg(test)]
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Handles the listening socket or the reconnect timer.
    pub fn handle_control_event(&mut self, offset: u64) {
        match offset {
            EV_LISTEN => loop {
                let Some(l) = &self.listener else { return };
                match l.accept() {
                    Ok(c) => {
                        if self.conn.is_some() {
                            info!("stream: new peer replaces the current one");
                        } else {
                            info!("stream: peer connected on {}", self.addr);
                        }
                        self.conn = None;
                        self.set_conn(c);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("stream: accept: {e}");
                        break;
                    }
                }
            },
            EV_TIMER => {
                if let Some(t) = self.timer.as_mut() {
                    let _ = t.wait();
                }
                if self.conn.is_none() {
                    if let Err(e) = self.connect() {
                        debug!("stream: reconnect to {}: {e}", self.addr);
                    }
                }
            }
            _ => {}
        }
    }

    /// Returns the next complete frame, copied into `out`, or `None` when no
    /// complete frame is available right now.
    pub fn next_frame(&mut self, out: &mut [u8]) -> Option<usize> {
        loop {
            let avail = self.rlen - self.rpos;
            if avail >= 4 {
                let b = &self.rbuf[self.rpos..self.rpos + 4];
                let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len > MAX_FRAME {
                    self.disconnect("frame length out of range");
                    return None;
                }
                if avail >= 4 + len {
                    let start = self.rpos + 4;
                    self.rpos = start + len;
                    if self.rpos == self.rlen {
                        self.rpos = 0;
                        self.rlen = 0;
                    }
                    if len > out.len() {
                        continue;
                    }
                    out[..len].copy_from_slice(&self.rbuf[start..start + len]);
                    return Some(len);
                }
            }
            // Need more bytes: compact and read.
            if self.rpos > 0 {
                self.rbuf.copy_within(self.rpos..self.rlen, 0);
                self.rlen -= self.rpos;
                self.rpos = 0;
            }
            let conn = self.conn.as_mut()?;
            match conn.read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => {
                    self.disconnect("end of stream");
                    return None;
                }
                Ok(n) => self.rlen += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.disconnect(&e.to_string());
                    return None;
                }
            }
        }
    }

    /// Whether queued output is above the high-water mark (the guest's TX
    /// should wait for the socket to drain).
    pub fn tx_blocked(&self) -> bool {
        self.conn.is_some() && self.wbuf.len() - self.wpos >= TX_HIGH_WATER
    }

    /// Queues one frame for the peer (dropped when no peer is connected).
    pub fn send_frame(&mut self, frame: &[u8]) {
        if self.conn.is_none() || frame.len() > MAX_FRAME {
            return;
        }
        if self.wpos > 0 && self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        self.wbuf
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.wbuf.extend_from_slice(frame);
        self.flush();
    }

    /// Writes as much queued output as the socket takes.
    pub fn flush(&mut self) {
        while self.wpos < self.wbuf.len() {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn.write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    self.disconnect("write returned 0");
                    return;
                }
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.disconnect(&e.to_string());
                    return;
                }
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        } else if self.wpos > TX_HIGH_WATER {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
    }
}

impl Drop for StreamPort {
    fn drop(&mut self) {
        if let (Some(Listener::Unix(_)), StreamAddr::Unix(p)) = (&self.listener, &self.addr) {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (StreamPort, UnixStream) {
        // Removed when this returns: the connection outlives the path.
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(
            std::env::temp_dir().join("mic-net-stream-"),
        )
        .unwrap();
        let path = dir.as_path().join(format!("s{}", rand_suffix()));
        let mut port = StreamPort::new(StreamAddr::Unix(path.clone()), true).unwrap();
        let peer = UnixStream::connect(&path).unwrap();
        port.handle_control_event(EV_LISTEN);
        assert!(port.connected());
        (port, peer)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn framing_roundtrip() {
        let (mut port, mut peer) = pair();
        let mut out = vec![0u8; MAX_FRAME];
        assert_eq!(port.next_frame(&mut out), None);

        // Two frames in one write, then one split across writes.
        let mut bytes = Vec::new();
        for f in [&b"hello-frame-1"[..], &b"frame2"[..]] {
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(f);
        }
        peer.write_all(&bytes).unwrap();
        peer.write_all(&[0, 0, 0]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(port.next_frame(&mut out), Some(13));
        assert_eq!(&out[..13], b"hello-frame-1");
        assert_eq!(port.next_frame(&mut out), Some(6));
        assert_eq!(&out[..6], b"frame2");
        assert_eq!(port.next_frame(&mut out), None);
        peer.write_all(&[3, b'a', b'b', b'c']).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(port.next_frame(&mut out), Some(3));
        assert_eq!(&out[..3], b"abc");

        port.send_frame(b"xyz");
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, &[0, 0, 0, 3, b'x', b'y', b'z']);
    }

    #[test]
    fn oversized_frame_disconnects() {
        let (mut port, mut peer) = pair();
        peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut out = vec![0u8; MAX_FRAME];
        assert_eq!(port.next_frame(&mut out), None);
        assert!(!port.connected());
    }

    #[test]
    fn peer_eof_disconnects() {
        let (mut port, peer) = pair();
        drop(peer);
        std::thread::sleep(Duration::from_millis(20));
        let mut out = vec![0u8; MAX_FRAME];
        assert_eq!(port.next_frame(&mut out), None);
        assert!(!port.connected());
    }
}
