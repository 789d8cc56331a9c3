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
//! reply (`REPLY_ACK`), the relay sends the success reply itself. Every other
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

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::debug;

use crate::poll_in;

const HDR_LEN: usize = 12;
const MAX_BODY: usize = 0x1000;
const MAX_FDS: usize = 32;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One vhost-user message: header + body, and attached descriptors.
struct Msg {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn field(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.bytes[4 * i..4 * i + 4].try_into().unwrap())
    }
    fn request(&self) -> u32 {
        self.field(0)
    }
    fn flags(&self) -> u32 {
        self.field(1)
    }
}

/// Receives the header with its descriptors, then the body.
fn recv_msg(sock: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HDR_LEN {
        let mut iov = libc::iovec {
            iov_base: hdr[got..].as_mut_ptr().cast(),
            iov_len: HDR_LEN - got,
        };
        // Room for MAX_FDS descriptors (u64 aligned).
        let mut cbuf = [0u64; (MAX_FDS * 4 + 16) / 8 + 2];
        // SAFETY: msghdr is plain data.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: msghdr points at live buffers.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: walking the control messages recvmsg filled in.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        if n == 0 {
            return Ok(None);
        }
        got += n as usize;
    }
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    if size > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too large",
        ));
    }
    let mut bytes = hdr.to_vec();
    bytes.resize(HDR_LEN + size, 0);
    (&*sock).read_exact(&mut bytes[HDR_LEN..])?;
    Ok(Some(Msg { bytes, fds }))
}

/// Sends a message with its descriptors.
fn send_msg(sock: &UnixStream, msg: &Msg) -> io::Result<()> {
    let mut sent = 0;
    while sent < msg.bytes.len() {
        let mut iov = libc::iovec {
            iov_base: msg.bytes[sent..].as_ptr() as *mut libc::c_void,
            iov_len: msg.bytes.len() - sent,
        };
        let mut cbuf = [0u64; (MAX_FDS * 4 + 16) / 8 + 2];
        // SAFETY: msghdr is plain data.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if sent == 0 && !msg.fds.is_empty() {
            let n = msg.fds.len().min(MAX_FDS);
            // SAFETY: the control buffer is large enough for n descriptors.
            unsafe {
                let space = libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32);
                mh.msg_control = cbuf.as_mut_ptr().cast();
                mh.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((n * std::mem::size_of::<RawFd>()) as u32) as _;
                let data = libc::CMSG_DATA(c) as *mut RawFd;
                for (i, fd) in msg.fds.iter().take(n).enumerate() {
                    std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
                }
            }
        }
        // SAFETY: msghdr points at live buffers.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

fn enable_msg(body: &[u8]) -> Msg {
    let mut bytes = Vec::with_capacity(HDR_LEN + body.len());
    bytes.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
    bytes.extend_from_slice(&FLAG_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(body);
    Msg {
        bytes,
        fds: Vec::new(),
    }
}

/// Receives a duplicate of the backend request channel's socket.
pub(crate) type ChannelHook = Arc<dyn Fn(UnixStream) + Send + Sync>;

/// Frontend to backend: forwards messages, holding back early enables.
fn pump_requests(
    front: UnixStream,
    front_w: Arc<Mutex<UnixStream>>,
    back: UnixStream,
    shutdown_fd: RawFd,
    channel_hook: Option<ChannelHook>,
) {
    let mut features_seen = false;
    let mut held: Vec<Msg> = Vec::new();
    let result: io::Result<()> = (|| loop {
        if poll_in(&[shutdown_fd, front.as_raw_fd()], -1) == Some(0) {
            return Ok(());
        }
        let Some(msg) = recv_msg(&front)? else {
            return Ok(());
        };
        match msg.request() {
            SET_VRING_ENABLE if !features_seen => {
                debug!("holding SET_VRING_ENABLE received before SET_FEATURES");
                if msg.flags() & FLAG_NEED_REPLY != 0 {
                    let mut reply = Vec::with_capacity(HDR_LEN + 8);
                    reply.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                    reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                    reply.extend_from_slice(&8u32.to_le_bytes());
                    reply.extend_from_slice(&0u64.to_le_bytes());
                    let w = front_w.lock().unwrap();
                    send_msg(
                        &w,
                        &Msg {
                            bytes: reply,
                            fds: Vec::new(),
                        },
                    )?;
                }
                held.push(enable_msg(&msg.bytes[HDR_LEN..]));
            }
            SET_BACKEND_REQ_FD => {
                if let (Some(hook), [fd]) = (&channel_hook, &msg.fds[..]) {
                    match fd.try_clone() {
                        Ok(dup) => hook(UnixStream::from(dup)),
                        Err(e) => debug!("cannot duplicate the backend request channel: {e}"),
                    }
                }
                send_msg(&back, &msg)?;
            }
            SET_FEATURES => {
                send_msg(&back, &msg)?;
                features_seen = true;
                for m in held.drain(..) {
                    send_msg(&back, &m)?;
                }
            }
            _ => send_msg(&back, &msg)?,
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
/// (removed again when dropped).
pub(crate) struct PrivateSocket {
    dir: PathBuf,
    path: String,
    listener: UnixListener,
}

impl PrivateSocket {
    /// Creates the directory and binds the socket; `name` prefixes the
    /// directory's name.
    pub(crate) fn new(name: &str) -> io::Result<PrivateSocket> {
        let mut rnd = [0u8; 8];
        // SAFETY: valid buffer.
        unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
        let dir = std::env::temp_dir().join(format!(
            ".{name}-{}-{:016x}",
            std::process::id(),
            u64::from_ne_bytes(rnd)
        ));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("vu.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(e);
            }
        };
        Ok(PrivateSocket {
            dir,
            path: path.to_string_lossy().into_owned(),
            listener,
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

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_dir(&self.dir);
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
    ) -> io::Result<Relay> {
        let front_w = Arc::new(Mutex::new(front.try_clone()?));
        let back2 = back.try_clone()?;
        let fw = front_w.clone();
        let requests = std::thread::Builder::new()
            .name("vu-relay-req".into())
            .spawn(move || pump_requests(front, fw, back, shutdown_fd, channel_hook))?;
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
    use std::io::Write;

    fn msg(req: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut v = req.to_le_bytes().to_vec();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn early_enable_is_held_until_set_features() {
        let (mut fe, front) = UnixStream::pair().unwrap();
        let (back, mut be) = UnixStream::pair().unwrap();
        let (sd_r, _sd_w) = UnixStream::pair().unwrap();
        let fw = Arc::new(Mutex::new(front.try_clone().unwrap()));
        let t = std::thread::spawn(move || pump_requests(front, fw, back, sd_r.as_raw_fd(), None));
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
    fn backend_request_channel_is_shared_with_the_hook() {
        let (fe, front) = UnixStream::pair().unwrap();
        let (back, be) = UnixStream::pair().unwrap();
        let (sd_r, _sd_w) = UnixStream::pair().unwrap();
        let fw = Arc::new(Mutex::new(front.try_clone().unwrap()));
        let got: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let g = got.clone();
        let hook: ChannelHook = Arc::new(move |s| *g.lock().unwrap() = Some(s));
        let t = std::thread::spawn(move || {
            pump_requests(front, fw, back, sd_r.as_raw_fd(), Some(hook))
        });
        let (mut chan_front, chan_back) = UnixStream::pair().unwrap();
        let m = Msg {
            bytes: msg(SET_BACKEND_REQ_FD, FLAG_VERSION, &[]),
            fds: vec![OwnedFd::from(chan_back)],
        };
        send_msg(&fe, &m).unwrap();
        // The message and its descriptor reach the daemon unchanged.
        let r = recv_msg(&be).unwrap().unwrap();
        assert_eq!(r.bytes, m.bytes);
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
        let f = fs::File::open("/dev/null").unwrap();
        let m = Msg {
            bytes: msg(13, FLAG_VERSION, &0u64.to_le_bytes()),
            fds: vec![OwnedFd::from(f)],
        };
        send_msg(&a, &m).unwrap();
        let r = recv_msg(&b).unwrap().unwrap();
        assert_eq!(r.bytes, m.bytes);
        assert_eq!(r.fds.len(), 1);
    }
}
