//! The connection to one `mic-x100` device: framed messages with file
//! descriptors, and `SYNC` with the messages that arrive meanwhile.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

/// How many messages [`DeviceLink::sync`] queues while it waits. Identical
/// `DOORBELL`s are queued once (the host learns nothing from a repeat, and
/// the device coalesces them too, `docs/device-protocol.md` "Flow
/// control"); more distinct ones than this end the link
/// ([`ProtocolError::Flood`]), and the bridge attaches again.
pub const MAX_QUEUED: usize = 1024;

/// The connection to one `mic-x100` device.
pub struct DeviceLink {
    stream: UnixStream,
    pending: VecDeque<DeviceMessage>,
    next_token: u64,
}

impl AsRawFd for DeviceLink {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl DeviceLink {
    /// Connects to a device socket that QEMU listens on.
    pub fn connect(path: &Path) -> Result<Self> {
        Ok(Self::from_stream(UnixStream::connect(path)?))
    }

    /// Connects, retrying for up to `timeout` while the socket is missing or refuses.
    pub fn connect_retry(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ok(Self::from_stream(s)),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Wraps a connected stream (for a host side that listens).
    pub fn from_stream(stream: UnixStream) -> Self {
        DeviceLink {
            stream,
            pending: VecDeque::new(),
            next_token: 1,
        }
    }

    /// Sends one message.
    pub fn send(&self, m: &HostMessage) -> Result<()> {
        let (bytes, fds) = m.encode();
        let n = self
            .stream
            .send_with_fds(&[&bytes[..]], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if n != bytes.len() {
            // Control messages are small; a short write means the peer went away.
            return Err(ProtocolError::Closed);
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes, collecting fds that arrive with them.
    fn read_exact_fds(&self, buf: &mut [u8], fds: &mut Vec<File>) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let mut raw = [-1; MAX_FDS];
            let mut iov = [libc::iovec {
                iov_base: buf[done..].as_mut_ptr().cast(),
                iov_len: buf.len() - done,
            }];
            // SAFETY: the iovec points into `buf`, which we borrow mutably.
            let r = unsafe { self.stream.recv_with_fds(&mut iov, &mut raw) };
            let (n, nfds) = match r {
                Ok(v) => v,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::ECONNRESET => return Err(ProtocolError::Closed),
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
            };
            // SAFETY: recvmsg handed us ownership of these fds.
            fds.extend(
                raw[..nfds]
                    .iter()
                    .map(|&fd| unsafe { File::from_raw_fd(fd) }),
            );
            if n == 0 {
                return Err(ProtocolError::Closed);
            }
            done += n;
        }
        Ok(())
    }

    /// Receives the next message (queued messages first), blocking.
    pub fn recv(&mut self) -> Result<DeviceMessage> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        self.recv_wire()
    }

    /// Whether messages are queued locally (the socket may hold more).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn recv_wire(&mut self) -> Result<DeviceMessage> {
        let mut fds = Vec::new();
        let mut header = wire::MsgHeader::default();
        self.read_exact_fds(header.as_mut_slice(), &mut fds)?;
        let ty = u32::from(header.type_);
        let size = u32::from(header.size) as usize;
        if size > MAX_PAYLOAD {
            return Err(malformed("header", format!("payload of {size} bytes")));
        }
        let mut payload = vec![0u8; size];
        self.read_exact_fds(&mut payload, &mut fds)?;
        DeviceMessage::decode(ty, &payload, fds)
    }

    /// Sets a read timeout on the socket (`None` blocks).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        Ok(self.stream.set_read_timeout(t)?)
    }

    /// Sends `SYNC` and waits for its answer; messages received meanwhile are
    /// queued for [`DeviceLink::recv`]. An `ERROR` received meanwhile is
    /// returned as [`ProtocolError::Refused`] (and not queued).
    pub fn sync(&mut self) -> Result<()> {
        let token = self.next_token;
        self.next_token += 1;
        self.send(&HostMessage::Sync(token))?;
        let mut refused = None;
        loop {
            match self.recv_wire()? {
                DeviceMessage::Sync(t) if t == token => break,
                DeviceMessage::Error {
                    request_type,
                    errno,
                    text,
                } => {
                    refused.get_or_insert(ProtocolError::Refused {
                        request_type,
                        errno,
                        text,
                    });
                }
                other => self.queue(other)?,
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// Queues a message for [`DeviceLink::recv`], bounded by [`MAX_QUEUED`].
    fn queue(&mut self, m: DeviceMessage) -> Result<()> {
        if let DeviceMessage::Doorbell { doorbell, value } = m {
            let repeat = self.pending.iter().any(|p| {
                matches!(p, DeviceMessage::Doorbell { doorbell: d, value: v }
                    if (*d, *v) == (doorbell, value))
            });
            if repeat {
                return Ok(());
            }
        }
        if self.pending.len() >= MAX_QUEUED {
            return Err(ProtocolError::Flood);
        }
        self.pending.push_back(m);
        Ok(())
    }

    /// Sends a request and waits until the device has processed it.
    pub fn request(&mut self, m: &HostMessage) -> Result<()> {
        self.send(m)?;
        self.sync()
    }

    /// Performs the attach handshake: receives `HELLO` and the first
    /// `MEM_TABLE`, maps both, and answers `HELLO`.
    pub fn attach(&mut self) -> Result<Attachment> {
        let (hello, aperture_file) = match self.recv()? {
            DeviceMessage::Hello(h, f) => (h, f),
            other => return Err(malformed("HELLO", format!("got {other:?} first"))),
        };
        let aperture = Aperture::map(aperture_file, hello.aperture_size)?;
        let table = match self.recv()? {
            DeviceMessage::MemTable(t) => t,
            other => return Err(malformed("MEM_TABLE", format!("got {other:?}"))),
        };
        let ram = CardRam::map(table)?;
        self.send(&HostMessage::Hello)?;
        Ok(Attachment {
            hello,
            aperture,
            ram,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi;
    use crate::device_protocol::messages::tests::{frame, sample_hello};
    use std::io::Write;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn link_receives_messages_with_fds_and_queues_around_sync() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut link = DeviceLink::from_stream(ours);
        // A device-side writer: HELLO with an fd, then a doorbell, then SYNC 1.
        let ev = EventFd::new(0).unwrap();
        theirs
            .send_with_fds(
                &[&frame(msg::HELLO, &sample_hello().encode())[..]],
                &[ev.as_raw_fd()],
            )
            .unwrap();
        theirs
            .write_all(&frame(msg::DOORBELL, &[1, 0, 0, 0, 0, 0, 0, 0x80]))
            .unwrap();
        theirs
            .write_all(&frame(msg::SYNC, &1u64.to_le_bytes()))
            .unwrap();
        link.sync().unwrap();
        match link.recv().unwrap() {
            DeviceMessage::Hello(h, f) => {
                assert_eq!(h.node_id, 1);
                // The fd is the same eventfd: writing through it is seen here.
                let mut f = f;
                f.write_all(&1u64.to_ne_bytes()).unwrap();
                assert_eq!(ev.read().unwrap(), 1);
            }
            other => panic!("{other:?}"),
        }
        match link.recv().unwrap() {
            DeviceMessage::Doorbell { doorbell, value } => {
                assert_eq!((doorbell, value), (1, abi::DOORBELL_CONTROL))
            }
            other => panic!("{other:?}"),
        }
        drop(theirs);
        assert!(matches!(link.recv(), Err(ProtocolError::Closed)));
    }

    #[test]
    fn sync_queues_a_bounded_number_of_messages() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut link = DeviceLink::from_stream(ours);
        let writer = std::thread::spawn(move || {
            let mut theirs = theirs;
            // Repeats of one doorbell are queued once...
            for _ in 0..3 * MAX_QUEUED {
                theirs
                    .write_all(&frame(msg::DOORBELL, &[2, 0, 0, 0, 9, 0, 0, 0]))
                    .unwrap();
            }
            theirs
                .write_all(&frame(msg::SYNC, &1u64.to_le_bytes()))
                .unwrap();
            // ...distinct ones up to the bound.
            for i in 0..2 * MAX_QUEUED as u32 {
                let mut p = 3u32.to_le_bytes().to_vec();
                p.extend_from_slice(&(0x1000_0000 | i).to_le_bytes());
                if theirs.write_all(&frame(msg::DOORBELL, &p)).is_err() {
                    return;
                }
            }
            let _ = theirs.write_all(&frame(msg::SYNC, &2u64.to_le_bytes()));
            // Hold the socket until the reader is done.
            let mut b = [0u8; 1];
            let _ = std::io::Read::read(&mut theirs, &mut b);
        });
        link.sync().unwrap();
        assert_eq!(link.pending.len(), 1);
        link.recv().unwrap();
        assert!(matches!(link.sync(), Err(ProtocolError::Flood)));
        assert_eq!(link.pending.len(), MAX_QUEUED);
        drop(link);
        writer.join().unwrap();
    }

    #[test]
    fn oversized_payload_is_an_error() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut link = DeviceLink::from_stream(ours);
        theirs.write_all(&[4, 0, 0, 0, 1, 0x10, 0, 0]).unwrap();
        assert!(matches!(link.recv(), Err(ProtocolError::Malformed { .. })));
    }
}
