//! Control-channel relay that reorders early `SET_VRING_ENABLE` messages.
//!
//! What QEMU does: its vhost-user network client (`-netdev vhost-user`)
//! sends `VHOST_USER_SET_VRING_ENABLE` for the rings as soon as the backend
//! offers `VHOST_USER_F_PROTOCOL_FEATURES`, before it sends
//! `VHOST_USER_SET_FEATURES`. The backend-side request handler of the
//! `vhost` crate (0.18) only accepts `SET_VRING_ENABLE` once that feature bit
//! has been acknowledged by `SET_FEATURES`; otherwise the request fails, and
//! a failed request ends the connection, so stock QEMU could never attach.
//!
//! Why a relay: the check sits inside the `vhost` crate, below
//! `VhostUserBackend`, so the daemon cannot accept the message itself. The
//! daemon loop ([`crate::run_daemon`]) therefore never hands the frontend's
//! socket to `VhostUserDaemon` directly: the daemon connects to a private
//! socket of this process ([`PrivateSocket`]), and two threads ([`Relay`])
//! copy messages between that connection and the frontend's.
//!
//! What it changes: nothing but the order of early `SET_VRING_ENABLE`
//! messages. Such a message received before `SET_FEATURES` is held back and
//! replayed, in the order received and without the need-reply flag, right
//! after `SET_FEATURES` has been forwarded; if the frontend asked for a
//! reply (`REPLY_ACK`), the relay sends the success reply itself. At most
//! [`MAX_HELD_ENABLES`] are held; one more ends the connection. Every other
//! message, its file descriptors, and everything the daemon sends back pass
//! unchanged and in order. Only the control channel goes through the relay;
//! guest memory, rings, kick and call eventfds and the backend request
//! channel are shared directly between frontend and daemon, so the data path
//! is not affected. All three daemons (`mic-blk`, `mic-net`, `mic-console`)
//! run the same loop and get the same treatment.
//!
//! The backend request channel: when the daemon asks for it, the relay hands
//! it a duplicate of the socket that `SET_BACKEND_REQ_FD` carries (the
//! message itself passes unchanged). The `vhost` crate (0.18) gives the
//! device that socket only wrapped in `vhost::vhost_user::Backend`, which
//! cannot send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`; a device that
//! announces config changes writes them on the duplicate (see
//! [`crate::PersistentBackend::backend_channel`]).
//!
//! Tests: the unit tests below cover the reordering and descriptor passing;
//! `tests/early_enable.rs` serves a frontend that enables rings before
//! `SET_FEATURES` through [`crate::serve`] with a minimal device, and
//! `mic-net`'s integration tests (`early_vring_enable_like_qemu`) do the
//! same against the real daemon.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::debug;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserU64, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempdir::TempDir;

use crate::poll_in;

/// The vhost-user message header (vhost-user specification, "Message
/// Specification"): request, flags, payload size, in native byte order.
/// `vhost` 0.18 has this type (`VhostUserMsgHeader`) but keeps it private
/// to the crate; the request codes and flags are its public ones.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Header {
    request: u32,
    flags: u32,
    size: u32,
}

// SAFETY: three `u32`s, no padding; any bit pattern is a valid value.
unsafe impl ByteValued for Header {}

const HDR_LEN: usize = std::mem::size_of::<Header>();
/// Protocol version 1 in the flags' version bits.
const VERSION_1: u32 = 0x1;

impl Header {
    fn new(request: FrontendReq, flags: VhostUserHeaderFlag, size: u32) -> Header {
        Header {
            request: request.into(),
            flags: VERSION_1 | flags.bits(),
            size,
        }
    }

    /// The request, if it is one `vhost` knows.
    fn request(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }
}

/// One vhost-user message: header, body, and attached descriptors.
struct Msg {
    hdr: Header,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn new(hdr: Header, body: &[u8]) -> Msg {
        Msg {
            hdr,
            body: body.to_vec(),
            fds: Vec::new(),
        }
    }
}

fn io_error(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Receives the header with its descriptors, then the body; `None` when
/// the peer closed the connection. (`ScmSocket` receives without
/// `MSG_CMSG_CLOEXEC`; the daemons never exec, so nothing leaks.)
fn recv_msg(sock: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = Header::default();
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HDR_LEN {
        let buf = &mut hdr.as_mut_slice()[got..];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let mut raw = [0 as RawFd; MAX_ATTACHED_FD_ENTRIES];
        // SAFETY: the iovec covers the rest of `hdr`, plain bytes that any
        // value may be written to.
        let (n, nfds) = match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io_error(e)),
        };
        // SAFETY: recv_with_fds passed these descriptors to us; nothing
        // else owns them.
        fds.extend(
            raw[..nfds]
                .iter()
                .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) }),
        );
        if n == 0 {
            return Ok(None);
        }
        got += n;
    }
    let size = hdr.size as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too large",
        ));
    }
    let mut body = vec![0; size];
    (&*sock).read_exact(&mut body)?;
    Ok(Some(Msg { hdr, body, fds }))
}

/// Sends a message; its descriptors go with its first bytes.
fn send_msg(sock: &UnixStream, msg: &Msg) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HDR_LEN + msg.body.len());
    bytes.extend_from_slice(msg.hdr.as_slice());
    bytes.extend_from_slice(&msg.body);
    let fds: Vec<RawFd> = msg
        .fds
        .iter()
        .take(MAX_ATTACHED_FD_ENTRIES)
        .map(AsRawFd::as_raw_fd)
        .collect();
    let sent = loop {
        match sock.send_with_fds(&[&bytes[..]], &fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io_error(e)),
        }
    };
    // SIGPIPE: the process never dies of it, Rust's runtime ignores it.
    (&*sock).write_all(&bytes[sent..])
}

/// SET_VRING_ENABLE as replayed after SET_FEATURES: same body, no reply.
fn enable_msg(body: &[u8]) -> Msg {
    Msg::new(
        Header::new(
            FrontendReq::SET_VRING_ENABLE,
            VhostUserHeaderFlag::empty(),
            body.len() as u32,
        ),
        body,
    )
}

/// The success reply (`REPLY_ACK`: a u64 0) to a held SET_VRING_ENABLE.
fn enable_ack() -> Msg {
    let ok = VhostUserU64::new(0);
    Msg::new(
        Header::new(
            FrontendReq::SET_VRING_ENABLE,
            VhostUserHeaderFlag::REPLY,
            std::mem::size_of::<VhostUserU64>() as u32,
        ),
        ok.as_slice(),
    )
}

/// Most `SET_VRING_ENABLE` messages held back before `SET_FEATURES`; one
/// more ends the connection. A frontend enables each ring once or a few
/// times (QEMU: once per ring), and a device has at most 64 queues (mic-blk's
/// `--num-queues` limit), so this only stops a peer that would otherwise
/// grow the daemon's memory without bound.
pub(crate) const MAX_HELD_ENABLES: usize = 512;

/// Receives a duplicate of the backend request channel's socket.
pub(crate) type ChannelHook = Arc<dyn Fn(UnixStream) + Send + Sync>;

/// How long a frontend that the daemon accepted may stay silent before its
/// first message: a peer that connects and never speaks is dropped after
/// this, so that it does not keep the next frontend waiting (frontends such
/// as QEMU and the bridge send `GET_FEATURES` right after connecting).
pub(crate) const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the rest of a message may take once its first bytes arrived,
/// and how long a message to the frontend may wait for it to read: a peer
/// that stops in the middle of a message, or stops reading, is dropped.
pub(crate) const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Frontend to backend: forwards messages, holding back early enables.
/// With `first_message`, a frontend that sends nothing for that long after
/// connecting is disconnected.
pub(crate) fn pump_requests(
    front: UnixStream,
    front_w: Arc<Mutex<UnixStream>>,
    back: UnixStream,
    shutdown_fd: RawFd,
    channel_hook: Option<ChannelHook>,
    first_message: Option<Duration>,
) {
    crate::sandbox::enter(crate::sandbox::ThreadKind::Relay);
    let mut features_seen = false;
    let mut held: Vec<Msg> = Vec::new();
    let mut deadline = first_message.map(|t| Instant::now() + t);
    let result: io::Result<()> = (|| {
        // Both timeouts hold for the socket, so for `front_w` too. Reads
        // only start once poll() saw data, so the read timeout bounds the
        // rest of a message, not the wait for the next one.
        front.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
        front.set_write_timeout(Some(MESSAGE_TIMEOUT))?;
        loop {
            let wait_ms = deadline.map_or(-1, |d| {
                let left = d.saturating_duration_since(Instant::now());
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
            });
            match poll_in(&[shutdown_fd, front.as_raw_fd()], wait_ms) {
                Some(0) => return Ok(()),
                Some(_) => {}
                None if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no message from the frontend",
                    ));
                }
                None => continue,
            }
            let Some(msg) = recv_msg(&front)? else {
                return Ok(());
            };
            deadline = None;
            match msg.hdr.request() {
                Some(FrontendReq::SET_VRING_ENABLE) if !features_seen => {
                    if held.len() >= MAX_HELD_ENABLES {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "too many SET_VRING_ENABLE before SET_FEATURES",
                        ));
                    }
                    debug!("holding SET_VRING_ENABLE received before SET_FEATURES");
                    if msg.hdr.need_reply() {
                        send_msg(&front_w.lock().unwrap(), &enable_ack())?;
                    }
                    held.push(enable_msg(&msg.body));
                }
                Some(FrontendReq::SET_BACKEND_REQ_FD) => {
                    if let (Some(hook), [fd]) = (&channel_hook, &msg.fds[..]) {
                        match fd.try_clone() {
                            Ok(dup) => hook(UnixStream::from(dup)),
                            Err(e) => debug!("cannot duplicate the backend request channel: {e}"),
                        }
                    }
                    send_msg(&back, &msg)?;
                }
                Some(FrontendReq::SET_FEATURES) => {
                    send_msg(&back, &msg)?;
                    features_seen = true;
                    for m in held.drain(..) {
                        send_msg(&back, &m)?;
                    }
                }
                _ => send_msg(&back, &msg)?,
            }
        }
    })();
    if let Err(e) = result {
        debug!("vhost-user relay (requests): {e}");
    }
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = back.shutdown(std::net::Shutdown::Both);
}

/// Backend to frontend: forwards replies and backend messages.
fn pump_replies(back: UnixStream, front_w: Arc<Mutex<UnixStream>>) {
    crate::sandbox::enter(crate::sandbox::ThreadKind::Relay);
    let result: io::Result<()> = (|| {
        while let Some(msg) = recv_msg(&back)? {
            let w = front_w.lock().unwrap();
            send_msg(&w, &msg)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        debug!("vhost-user relay (replies): {e}");
    }
    let w = front_w.lock().unwrap();
    let _ = w.shutdown(std::net::Shutdown::Both);
    let _ = back.shutdown(std::net::Shutdown::Both);
}

/// A private socket the daemon connects to, in a 0700 directory of its own
/// (`mkdtemp`; removed again when dropped).
pub(crate) struct PrivateSocket {
    path: String,
    listener: UnixListener,
    // Last: removed after the listener is closed.
    _dir: TempDir,
}

impl PrivateSocket {
    /// Creates the directory and binds the socket; `name` prefixes the
    /// directory's name.
    pub(crate) fn new(name: &str) -> io::Result<PrivateSocket> {
        let prefix = std::env::temp_dir().join(format!(".{name}-{}-", std::process::id()));
        let dir = TempDir::new_with_prefix(prefix).map_err(io_error)?;
        let path = dir.as_path().join("vu.sock");
        let listener = UnixListener::bind(&path)?;
        Ok(PrivateSocket {
            path: path.to_string_lossy().into_owned(),
            listener,
            _dir: dir,
        })
    }

    /// Path for `VhostUserDaemon::start_client`.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The daemon's end of the connection, once it has connected.
    pub(crate) fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().map(|(s, _)| s)
    }
}

/// The two relay threads of one frontend connection.
pub(crate) struct Relay {
    requests: JoinHandle<()>,
    replies: JoinHandle<()>,
}

impl Relay {
    /// Relays between the frontend's connection `front` and the daemon's
    /// `back` until either side closes, or `shutdown_fd` becomes readable;
    /// then both connections are shut down. `channel_hook` gets a duplicate
    /// of every backend request channel the frontend sets up.
    pub(crate) fn start(
        front: UnixStream,
        back: UnixStream,
        shutdown_fd: RawFd,
        channel_hook: Option<ChannelHook>,
        first_message: Option<Duration>,
    ) -> io::Result<Relay> {
        let front_w = Arc::new(Mutex::new(front.try_clone()?));
        let back2 = back.try_clone()?;
        let fw = front_w.clone();
        let requests = std::thread::Builder::new()
            .name("vu-relay-req".into())
            .spawn(move || {
                pump_requests(front, fw, back, shutdown_fd, channel_hook, first_message)
            })?;
        let replies = std::thread::Builder::new()
            .name("vu-relay-rep".into())
            .spawn(move || pump_replies(back2, front_w))?;
        Ok(Relay { requests, replies })
    }

    /// Waits for both threads (after the connection has ended).
    pub(crate) fn join(self) {
        let _ = self.requests.join();
        let _ = self.replies.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Wire values, from the vhost-user specification.
    const SET_FEATURES: u32 = 2;
    const SET_VRING_ENABLE: u32 = 18;
    const SET_BACKEND_REQ_FD: u32 = 21;
    const FLAG_VERSION: u32 = 0x1;
    const FLAG_REPLY: u32 = 0x4;
    const FLAG_NEED_REPLY: u32 = 0x8;

    /// A message from its wire bytes.
    fn parse(bytes: &[u8], fds: Vec<OwnedFd>) -> Msg {
        let mut hdr = Header::default();
        hdr.as_mut_slice().copy_from_slice(&bytes[..HDR_LEN]);
        Msg {
            hdr,
            body: bytes[HDR_LEN..].to_vec(),
            fds,
        }
    }

    /// A message's wire bytes.
    fn wire(m: &Msg) -> Vec<u8> {
        let mut v = m.hdr.as_slice().to_vec();
        v.extend_from_slice(&m.body);
        v
    }

    /// A relay pumping requests on its own thread: the frontend's end, the
    /// daemon's end, the thread, and the shutdown socket's write side (kept
    /// open for the relay's lifetime).
    fn pumped(
        hook: Option<ChannelHook>,
    ) -> (
        UnixStream,
        UnixStream,
        std::thread::JoinHandle<()>,
        UnixStream,
    ) {
        let (fe, front) = UnixStream::pair().unwrap();
        let (back, be) = UnixStream::pair().unwrap();
        let (sd_r, sd_w) = UnixStream::pair().unwrap();
        let fw = Arc::new(Mutex::new(front.try_clone().unwrap()));
        let t = std::thread::spawn(move || {
            pump_requests(front, fw, back, sd_r.as_raw_fd(), hook, None)
        });
        (fe, be, t, sd_w)
    }

    #[test]
    fn private_socket_directory_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let p = PrivateSocket::new("mic-relay-test").unwrap();
        let path = std::path::PathBuf::from(p.path());
        let dir = path.parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(path.exists());
        drop(p);
        assert!(!dir.exists());
    }

    #[test]
    fn crate_codes_match_the_wire_values() {
        assert_eq!(u32::from(FrontendReq::SET_FEATURES), SET_FEATURES);
        assert_eq!(u32::from(FrontendReq::SET_VRING_ENABLE), SET_VRING_ENABLE);
        assert_eq!(
            u32::from(FrontendReq::SET_BACKEND_REQ_FD),
            SET_BACKEND_REQ_FD
        );
        assert_eq!(VhostUserHeaderFlag::REPLY.bits(), FLAG_REPLY);
        assert_eq!(VhostUserHeaderFlag::NEED_REPLY.bits(), FLAG_NEED_REPLY);
        assert_eq!(HDR_LEN, 12);
    }

    fn msg(req: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut v = req.to_le_bytes().to_vec();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn early_enable_is_held_until_set_features() {
        let (mut fe, mut be, t, _sd_w) = pumped(None);
        let enable = msg(
            SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &[0, 0, 0, 0, 1, 0, 0, 0],
        );
        fe.write_all(&msg(1, FLAG_VERSION, &[])).unwrap();
        fe.write_all(&enable).unwrap();
        // The relay acknowledges the held message itself.
        let mut reply = [0u8; 20];
        fe.read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_le_bytes(reply[0..4].try_into().unwrap()),
            SET_VRING_ENABLE
        );
        assert_eq!(
            u32::from_le_bytes(reply[4..8].try_into().unwrap()),
            FLAG_VERSION | FLAG_REPLY
        );
        assert_eq!(&reply[12..20], &[0u8; 8]);
        let feats = msg(SET_FEATURES, FLAG_VERSION, &(1u64 << 30).to_le_bytes());
        fe.write_all(&feats).unwrap();
        // Backend sees GET_FEATURES, SET_FEATURES, then the enable (no
        // reply requested).
        let mut got = vec![0u8; 12 + 20 + 20];
        be.read_exact(&mut got).unwrap();
        assert_eq!(&got[..12], &msg(1, FLAG_VERSION, &[])[..]);
        assert_eq!(&got[12..32], &feats[..]);
        assert_eq!(
            &got[32..],
            &msg(SET_VRING_ENABLE, FLAG_VERSION, &[0, 0, 0, 0, 1, 0, 0, 0])[..]
        );
        drop(fe);
        t.join().unwrap();
    }

    #[test]
    fn too_many_early_enables_end_the_connection() {
        let (mut fe, mut be, t, _sd_w) = pumped(None);
        let enable = msg(SET_VRING_ENABLE, FLAG_VERSION, &[0, 0, 0, 0, 1, 0, 0, 0]);
        for _ in 0..MAX_HELD_ENABLES {
            fe.write_all(&enable).unwrap();
        }
        // Up to the limit, nothing happens: the frontend may go on.
        fe.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(fe.read(&mut b).is_err(), "connection still open");
        // One more: the relay closes both sides without forwarding any.
        let _ = fe.write_all(&enable);
        fe.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(fe.read(&mut b).unwrap(), 0, "frontend side closed");
        be.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            be.read(&mut b).unwrap(),
            0,
            "daemon side closed, nothing sent"
        );
        t.join().unwrap();
    }

    #[test]
    fn backend_request_channel_is_shared_with_the_hook() {
        let got: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let g = got.clone();
        let hook: ChannelHook = Arc::new(move |s| *g.lock().unwrap() = Some(s));
        let (fe, be, t, _sd_w) = pumped(Some(hook));
        let (mut chan_front, chan_back) = UnixStream::pair().unwrap();
        let m = parse(
            &msg(SET_BACKEND_REQ_FD, FLAG_VERSION, &[]),
            vec![OwnedFd::from(chan_back)],
        );
        send_msg(&fe, &m).unwrap();
        // The message and its descriptor reach the daemon unchanged.
        let r = recv_msg(&be).unwrap().unwrap();
        assert_eq!(wire(&r), wire(&m));
        assert_eq!(r.fds.len(), 1);
        // The hook's duplicate is the same channel.
        let mut dup = got.lock().unwrap().take().expect("hook called");
        std::io::Write::write_all(&mut dup, b"ping").unwrap();
        let mut b = [0u8; 4];
        chan_front.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        drop(fe);
        t.join().unwrap();
    }

    #[test]
    fn descriptors_pass_through() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let m = parse(
            &msg(13, FLAG_VERSION, &0u64.to_le_bytes()),
            vec![OwnedFd::from(f)],
        );
        send_msg(&a, &m).unwrap();
        let r = recv_msg(&b).unwrap().unwrap();
        assert_eq!(wire(&r), wire(&m));
        assert_eq!(r.fds.len(), 1);
    }
}
