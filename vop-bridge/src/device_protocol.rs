//! Host side of the protocol between the `mic-x100` QEMU device and the host
//! (`docs/device-protocol.md`): message encoding and decoding, the socket link
//! with file-descriptor passing, and the shared mappings the device hands over
//! (the aperture and the card's RAM).
//!
//! The protocol's code definition is the C header
//! `guest-images/driver/mic_x100_vop.h`; the payload structs in [`wire`] and
//! the constants here mirror it, checked by `tests/abi_header.rs`.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{
    ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    VolatileMemory, VolatileSlice,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::abi;

/// Protocol version this crate speaks (`major << 16 | minor`).
pub const VERSION: u32 = 0x0001_0000;
/// Largest payload of one message.
pub const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors carried by one message.
pub const MAX_FDS: usize = 16;
/// Size of a message header.
pub const HEADER_SIZE: usize = size_of::<wire::MsgHeader>();
/// Size of the `HELLO` payload the device sends (version 1.0).
pub const DEVICE_HELLO_SIZE: usize = size_of::<wire::DeviceHello>();
/// Most regions in a `MEM_TABLE`.
pub const MAX_MEM_REGIONS: usize = 16;
/// Most bytes of text in an `ERROR`.
pub const ERROR_TEXT_MAX: usize = 256;
/// `HELLO` flag: the vCPUs are running.
pub const HELLO_FLAG_RUNNING: u32 = 1;

/// `CARD_EVENT` values.
pub mod event {
    /// System reset.
    pub const RESET: u32 = 1;
    /// The machine is shutting down.
    pub const POWEROFF: u32 = 2;
    /// The vCPUs started or resumed.
    pub const RUN: u32 = 3;
    /// The vCPUs paused.
    pub const STOP: u32 = 4;
}

/// The messages' wire layouts: `#[repr(C, packed)]` mirrors of the header's
/// `struct mic_msg_*`, little-endian fields.
pub mod wire {
    use vm_memory::{ByteValued, Le32, Le64};

    use crate::abi::NUM_SPADS;

    /// `struct mic_msg_hdr`: starts every message.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct MsgHeader {
        /// Message type.
        pub type_: Le32,
        /// Payload bytes that follow.
        pub size: Le32,
    }

    /// `struct mic_msg_device_hello`: the device's `HELLO`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct DeviceHello {
        /// Protocol version.
        pub version: Le32,
        /// Card node id.
        pub node_id: Le32,
        /// Aperture size in bytes.
        pub aperture_size: Le64,
        /// Number of scratchpads.
        pub num_spads: Le32,
        /// Number of card-to-host doorbells.
        pub num_doorbells: Le32,
        /// Number of MSI-X vectors.
        pub num_vectors: Le32,
        /// Bit 0: the vCPUs are running.
        pub flags: Le32,
        /// `CARD_STATE`.
        pub card_state: Le32,
        /// `SHUTDOWN_STATUS`.
        pub shutdown_status: Le32,
        /// `HOST_REQUEST`.
        pub host_request: Le32,
        /// Padding.
        pub pad: Le32,
        /// Scratchpads.
        pub spads: [Le32; NUM_SPADS as usize],
    }

    /// `struct mic_msg_host_hello`: the host side's `HELLO`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct HostHello {
        /// Protocol version.
        pub version: Le32,
    }

    /// `struct mic_msg_mem_region`: one region of a `MEM_TABLE`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct MemRegion {
        /// Guest physical address.
        pub gpa: Le64,
        /// Length.
        pub size: Le64,
        /// Offset in the region's fd.
        pub fd_offset: Le64,
    }

    /// `struct mic_msg_mem_table`: head of a `MEM_TABLE`; `count`
    /// [`MemRegion`]s follow.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct MemTable {
        /// Number of regions.
        pub count: Le32,
        /// Padding.
        pub pad: Le32,
    }

    /// `struct mic_msg_reg_write`: `REG_WRITE`, both directions.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct RegWrite {
        /// BAR0 offset.
        pub offset: Le32,
        /// Value.
        pub value: Le32,
    }

    /// `struct mic_msg_doorbell`: `DOORBELL`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Doorbell {
        /// Doorbell index.
        pub doorbell: Le32,
        /// Value written.
        pub value: Le32,
    }

    /// `struct mic_msg_card_event`: `CARD_EVENT`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct CardEvent {
        /// One of [`super::event`].
        pub event: Le32,
    }

    /// `struct mic_msg_set_doorbell_fd`: `SET_DOORBELL_FD`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SetDoorbellFd {
        /// Doorbell index.
        pub doorbell: Le32,
        /// Value to match.
        pub value: Le32,
    }

    /// `struct mic_msg_set_vector_fd`: `SET_VECTOR_FD`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SetVectorFd {
        /// MSI-X vector.
        pub vector: Le32,
        /// Padding.
        pub pad: Le32,
    }

    /// `struct mic_msg_raise_vector`: `RAISE_VECTOR`.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct RaiseVector {
        /// MSI-X vector.
        pub vector: Le32,
    }

    /// `struct mic_msg_sync`: `SYNC`, both directions.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Sync {
        /// Token, echoed.
        pub token: Le64,
    }

    /// `struct mic_msg_error`: head of an `ERROR`; text follows.
    #[repr(C, packed)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Error {
        /// Type of the failed request.
        pub request_type: Le32,
        /// Positive errno.
        pub error: Le32,
    }

    // SAFETY: packed structs of little-endian integers: no padding, and every
    // bit pattern is a valid value.
    unsafe impl ByteValued for MsgHeader {}
    // SAFETY: as above.
    unsafe impl ByteValued for DeviceHello {}
    // SAFETY: as above.
    unsafe impl ByteValued for HostHello {}
    // SAFETY: as above.
    unsafe impl ByteValued for MemRegion {}
    // SAFETY: as above.
    unsafe impl ByteValued for MemTable {}
    // SAFETY: as above.
    unsafe impl ByteValued for RegWrite {}
    // SAFETY: as above.
    unsafe impl ByteValued for Doorbell {}
    // SAFETY: as above.
    unsafe impl ByteValued for CardEvent {}
    // SAFETY: as above.
    unsafe impl ByteValued for SetDoorbellFd {}
    // SAFETY: as above.
    unsafe impl ByteValued for SetVectorFd {}
    // SAFETY: as above.
    unsafe impl ByteValued for RaiseVector {}
    // SAFETY: as above.
    unsafe impl ByteValued for Sync {}
    // SAFETY: as above.
    unsafe impl ByteValued for Error {}

    /// Reads a `T` from the start of `p`; `None` when `p` is too short.
    pub fn read<T: ByteValued>(p: &[u8]) -> Option<T> {
        T::from_slice(p.get(..size_of::<T>())?).copied()
    }
}

/// Message type numbers.
pub mod msg {
    /// `HELLO`, both directions.
    pub const HELLO: u32 = 1;
    /// `MEM_TABLE`, device to host.
    pub const MEM_TABLE: u32 = 2;
    /// `REG_WRITE`, both directions.
    pub const REG_WRITE: u32 = 3;
    /// `DOORBELL`, device to host.
    pub const DOORBELL: u32 = 4;
    /// `CARD_EVENT`, device to host.
    pub const CARD_EVENT: u32 = 5;
    /// `SET_DOORBELL_FD`, host to device.
    pub const SET_DOORBELL_FD: u32 = 6;
    /// `SET_VECTOR_FD`, host to device.
    pub const SET_VECTOR_FD: u32 = 7;
    /// `RAISE_VECTOR`, host to device.
    pub const RAISE_VECTOR: u32 = 8;
    /// `SYNC`, both directions.
    pub const SYNC: u32 = 10;
    /// `ERROR`, device to host.
    pub const ERROR: u32 = 11;
}

/// Errors of the device link.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Socket I/O failed.
    #[error("device socket: {0}")]
    Io(#[from] io::Error),
    /// The device closed the connection.
    #[error("the device closed the connection")]
    Closed,
    /// A message was malformed.
    #[error("malformed {kind} message: {why}")]
    Malformed {
        /// Message name.
        kind: &'static str,
        /// What was wrong.
        why: String,
    },
    /// The device speaks another major version.
    #[error("device speaks protocol version {0:#x}, we speak {VERSION:#x}")]
    Version(u32),
    /// The device refused a request.
    #[error("device refused request type {request_type}: {text} (errno {errno})")]
    Refused {
        /// Type of the refused request.
        request_type: u32,
        /// Positive errno.
        errno: u32,
        /// The device's explanation.
        text: String,
    },
    /// Mapping shared memory failed.
    #[error("mapping shared memory: {0}")]
    Map(String),
    /// Waited too long for an answer.
    #[error("timed out waiting for the device")]
    Timeout,
    /// The device sent more distinct messages than the link queues while
    /// waiting for a `SYNC` answer.
    #[error("the device sent over {MAX_QUEUED} messages before answering SYNC")]
    Flood,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ProtocolError>;

fn malformed(kind: &'static str, why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        kind,
        why: why.into(),
    }
}

/// The device's `HELLO`: its identity and a snapshot of its registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHello {
    /// Protocol version of the device.
    pub version: u32,
    /// Card node id.
    pub node_id: u32,
    /// Aperture size in bytes.
    pub aperture_size: u64,
    /// Number of scratchpads.
    pub num_spads: u32,
    /// Number of card-to-host doorbells.
    pub num_doorbells: u32,
    /// Number of MSI-X vectors.
    pub num_vectors: u32,
    /// The vCPUs are running.
    pub running: bool,
    /// `CARD_STATE` register.
    pub card_state: u32,
    /// `SHUTDOWN_STATUS` register.
    pub shutdown_status: u32,
    /// `HOST_REQUEST` register.
    pub host_request: u32,
    /// Scratchpads.
    pub spads: [u32; abi::NUM_SPADS as usize],
}

impl DeviceHello {
    /// Aperture offset of the published device page, if any.
    pub fn device_page_offset(&self) -> Option<u64> {
        let off = u64::from(self.spads[abi::SPAD_DP_HI as usize]) << 32
            | u64::from(self.spads[abi::SPAD_DP_LO as usize]);
        (off != 0).then_some(off)
    }

    /// Encodes the payload, as the device does.
    pub fn encode(&self) -> Vec<u8> {
        let running = if self.running { HELLO_FLAG_RUNNING } else { 0 };
        wire::DeviceHello {
            version: self.version.into(),
            node_id: self.node_id.into(),
            aperture_size: self.aperture_size.into(),
            num_spads: self.num_spads.into(),
            num_doorbells: self.num_doorbells.into(),
            num_vectors: self.num_vectors.into(),
            flags: running.into(),
            card_state: self.card_state.into(),
            shutdown_status: self.shutdown_status.into(),
            host_request: self.host_request.into(),
            pad: 0.into(),
            spads: self.spads.map(Into::into),
        }
        .as_slice()
        .to_vec()
    }

    fn decode(p: &[u8]) -> Result<Self> {
        let w: wire::DeviceHello =
            wire::read(p).ok_or_else(|| malformed("HELLO", format!("{} bytes", p.len())))?;
        let spads = w.spads;
        Ok(DeviceHello {
            version: w.version.into(),
            node_id: w.node_id.into(),
            aperture_size: w.aperture_size.into(),
            num_spads: w.num_spads.into(),
            num_doorbells: w.num_doorbells.into(),
            num_vectors: w.num_vectors.into(),
            running: u32::from(w.flags) & HELLO_FLAG_RUNNING != 0,
            card_state: w.card_state.into(),
            shutdown_status: w.shutdown_status.into(),
            host_request: w.host_request.into(),
            spads: spads.map(Into::into),
        })
    }
}

/// One region of the card's RAM table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region's bytes in its fd.
    pub fd_offset: u64,
}

/// Power events of the card (`CARD_EVENT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardEvent {
    /// System reset (including a guest reboot).
    Reset,
    /// The machine is shutting down.
    PowerOff,
    /// The vCPUs started or resumed.
    Run,
    /// The vCPUs paused.
    Stop,
    /// An event this version does not know.
    Unknown(u32),
}

impl From<u32> for CardEvent {
    fn from(v: u32) -> Self {
        match v {
            event::RESET => CardEvent::Reset,
            event::POWEROFF => CardEvent::PowerOff,
            event::RUN => CardEvent::Run,
            event::STOP => CardEvent::Stop,
            other => CardEvent::Unknown(other),
        }
    }
}

/// A message from the device.
#[derive(Debug)]
pub enum DeviceMessage {
    /// Identity and register snapshot, with the aperture fd.
    Hello(DeviceHello, File),
    /// The card's RAM table, one fd per region.
    MemTable(Vec<(MemRegion, File)>),
    /// The card wrote a register.
    RegWrite {
        /// BAR0 offset.
        offset: u32,
        /// Value written.
        value: u32,
    },
    /// The card wrote a doorbell value no eventfd matched.
    Doorbell {
        /// Doorbell index.
        doorbell: u32,
        /// Value written.
        value: u32,
    },
    /// A power event.
    CardEvent(CardEvent),
    /// Answer to [`HostMessage::Sync`].
    Sync(u64),
    /// A request failed.
    Error {
        /// Type of the failed request.
        request_type: u32,
        /// Positive errno.
        errno: u32,
        /// Explanation.
        text: String,
    },
    /// A message type this version does not know (skipped).
    Unknown(u32),
}

/// Reads the payload struct `T` of a message of kind `kind`.
fn payload<T: ByteValued>(kind: &'static str, p: &[u8]) -> Result<T> {
    wire::read(p).ok_or_else(|| {
        malformed(
            kind,
            format!("{} payload bytes, need {}", p.len(), size_of::<T>()),
        )
    })
}

impl DeviceMessage {
    /// Decodes a message of type `ty` with its payload and the fds that came
    /// with it. Fds the message does not use are closed.
    pub fn decode(ty: u32, p: &[u8], mut fds: Vec<File>) -> Result<Self> {
        Ok(match ty {
            msg::HELLO => {
                let hello = DeviceHello::decode(p)?;
                if hello.version >> 16 != VERSION >> 16 {
                    return Err(ProtocolError::Version(hello.version));
                }
                if fds.is_empty() {
                    return Err(malformed("HELLO", "no aperture fd"));
                }
                DeviceMessage::Hello(hello, fds.swap_remove(0))
            }
            msg::MEM_TABLE => {
                let head: wire::MemTable = payload("MEM_TABLE", p)?;
                let count = u32::from(head.count) as usize;
                if count > MAX_MEM_REGIONS {
                    return Err(malformed("MEM_TABLE", format!("{count} regions")));
                }
                let entries = &p[size_of::<wire::MemTable>()..];
                let regions = entries
                    .chunks(size_of::<wire::MemRegion>())
                    .take(count)
                    .map(|e| payload::<wire::MemRegion>("MEM_TABLE", e))
                    .collect::<Result<Vec<_>>>()?;
                if regions.len() < count {
                    return Err(malformed(
                        "MEM_TABLE",
                        format!("{count} regions announced, {} described", regions.len()),
                    ));
                }
                if fds.len() < count {
                    return Err(malformed(
                        "MEM_TABLE",
                        format!("{count} regions but {} fds", fds.len()),
                    ));
                }
                let regions = regions.into_iter().map(|r| MemRegion {
                    gpa: r.gpa.into(),
                    size: r.size.into(),
                    fd_offset: r.fd_offset.into(),
                });
                DeviceMessage::MemTable(regions.zip(fds.drain(..count)).collect())
            }
            msg::REG_WRITE => {
                let m: wire::RegWrite = payload("REG_WRITE", p)?;
                DeviceMessage::RegWrite {
                    offset: m.offset.into(),
                    value: m.value.into(),
                }
            }
            msg::DOORBELL => {
                let m: wire::Doorbell = payload("DOORBELL", p)?;
                DeviceMessage::Doorbell {
                    doorbell: m.doorbell.into(),
                    value: m.value.into(),
                }
            }
            msg::CARD_EVENT => {
                let m: wire::CardEvent = payload("CARD_EVENT", p)?;
                DeviceMessage::CardEvent(u32::from(m.event).into())
            }
            msg::SYNC => {
                let m: wire::Sync = payload("SYNC", p)?;
                DeviceMessage::Sync(m.token.into())
            }
            msg::ERROR => {
                let m: wire::Error = payload("ERROR", p)?;
                DeviceMessage::Error {
                    request_type: m.request_type.into(),
                    errno: m.error.into(),
                    text: String::from_utf8_lossy(&p[size_of::<wire::Error>()..])
                        .trim_end_matches('\0')
                        .into(),
                }
            }
            other => DeviceMessage::Unknown(other),
        })
    }
}

/// A message from the host to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMessage {
    /// Our protocol version.
    Hello,
    /// Store a register value.
    RegWrite {
        /// BAR0 offset.
        offset: u32,
        /// Value.
        value: u32,
    },
    /// Register (with `fd`) or remove (without) a doorbell eventfd.
    SetDoorbellFd {
        /// Doorbell index.
        doorbell: u32,
        /// Value to match.
        value: u32,
        /// The eventfd.
        fd: Option<RawFd>,
    },
    /// Add (with `fd`) an interrupt eventfd, or remove every fd of the vector.
    SetVectorFd {
        /// MSI-X vector.
        vector: u32,
        /// The eventfd.
        fd: Option<RawFd>,
    },
    /// Raise a vector once.
    RaiseVector(u32),
    /// Ask for a [`DeviceMessage::Sync`] with this token.
    Sync(u64),
}

impl HostMessage {
    /// Type number of this message.
    pub fn type_number(&self) -> u32 {
        match self {
            HostMessage::Hello => msg::HELLO,
            HostMessage::RegWrite { .. } => msg::REG_WRITE,
            HostMessage::SetDoorbellFd { .. } => msg::SET_DOORBELL_FD,
            HostMessage::SetVectorFd { .. } => msg::SET_VECTOR_FD,
            HostMessage::RaiseVector(_) => msg::RAISE_VECTOR,
            HostMessage::Sync(_) => msg::SYNC,
        }
    }

    /// Encodes the message (header and payload) and the fds it carries.
    pub fn encode(&self) -> (Vec<u8>, Vec<RawFd>) {
        let mut fds = Vec::new();
        let payload = match *self {
            HostMessage::Hello => wire::HostHello {
                version: VERSION.into(),
            }
            .as_slice()
            .to_vec(),
            HostMessage::RegWrite { offset, value } => wire::RegWrite {
                offset: offset.into(),
                value: value.into(),
            }
            .as_slice()
            .to_vec(),
            HostMessage::SetDoorbellFd {
                doorbell,
                value,
                fd,
            } => {
                fds.extend(fd);
                wire::SetDoorbellFd {
                    doorbell: doorbell.into(),
                    value: value.into(),
                }
                .as_slice()
                .to_vec()
            }
            HostMessage::SetVectorFd { vector, fd } => {
                fds.extend(fd);
                wire::SetVectorFd {
                    vector: vector.into(),
                    pad: 0.into(),
                }
                .as_slice()
                .to_vec()
            }
            HostMessage::RaiseVector(vector) => wire::RaiseVector {
                vector: vector.into(),
            }
            .as_slice()
            .to_vec(),
            HostMessage::Sync(token) => wire::Sync {
                token: token.into(),
            }
            .as_slice()
            .to_vec(),
        };
        let header = wire::MsgHeader {
            type_: self.type_number().into(),
            size: (payload.len() as u32).into(),
        };
        let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
        bytes.extend_from_slice(header.as_slice());
        bytes.extend_from_slice(&payload);
        (bytes, fds)
    }
}

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

/// What the host learns and maps when it attaches to a device.
pub struct Attachment {
    /// The device's identity and register snapshot.
    pub hello: DeviceHello,
    /// The aperture, mapped.
    pub aperture: Aperture,
    /// The card's RAM, mapped.
    pub ram: CardRam,
}

/// The aperture: host memory the card sees through BAR2.
pub struct Aperture {
    region: MmapRegion,
}

impl Aperture {
    /// Maps `size` bytes of the aperture fd, shared.
    pub fn map(file: File, size: u64) -> Result<Self> {
        let size = usize::try_from(size).map_err(|_| ProtocolError::Map("aperture size".into()))?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| ProtocolError::Map(format!("aperture: {e}")))?;
        Ok(Aperture { region })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.size() as u64
    }

    /// The aperture fd.
    pub fn file(&self) -> &File {
        self.region.file_offset().expect("file-backed").file()
    }

    /// A volatile view of `len` bytes at `offset`.
    pub fn slice(&self, offset: u64, len: usize) -> Result<VolatileSlice<'_>> {
        let offset = usize::try_from(offset).map_err(|_| ProtocolError::Map("offset".into()))?;
        self.region
            .get_slice(offset, len)
            .map_err(|e| ProtocolError::Map(format!("aperture range: {e}")))
    }

    /// Reads a plain-old-data value at `offset`.
    pub fn read_obj<T: ByteValued>(&self, offset: u64) -> Result<T> {
        self.slice(offset, std::mem::size_of::<T>())?
            .read_obj(0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Writes a plain-old-data value at `offset`.
    pub fn write_obj<T: ByteValued>(&self, offset: u64, v: T) -> Result<()> {
        self.slice(offset, std::mem::size_of::<T>())?
            .write_obj(v, 0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.slice(offset, buf.len())?
            .read_slice(buf, 0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.slice(offset, buf.len())?
            .write_slice(buf, 0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }
}

/// The card's RAM (and the aperture while BAR2 is mapped), as the device's
/// latest `MEM_TABLE` describes it, mapped into this process.
pub struct CardRam {
    memory: GuestMemoryMmap,
    table: Vec<MemRegion>,
}

impl CardRam {
    /// Maps every region of a `MEM_TABLE`.
    pub fn map(table: Vec<(MemRegion, File)>) -> Result<Self> {
        let mut regions = Vec::with_capacity(table.len());
        let mut descr = Vec::with_capacity(table.len());
        for (r, file) in table {
            let size = usize::try_from(r.size).map_err(|_| ProtocolError::Map("size".into()))?;
            let mapping = MmapRegion::from_file(FileOffset::new(file, r.fd_offset), size)
                .map_err(|e| ProtocolError::Map(format!("region at {:#x}: {e}", r.gpa)))?;
            let region = GuestRegionMmap::with_arc(Arc::new(mapping), GuestAddress(r.gpa))
                .ok_or_else(|| ProtocolError::Map(format!("region at {:#x} overflows", r.gpa)))?;
            regions.push(region);
            descr.push(r);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| ProtocolError::Map(format!("memory table: {e}")))?;
        Ok(CardRam {
            memory,
            table: descr,
        })
    }

    /// The mapped memory, addressed by card physical address.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The table as the device sent it.
    pub fn table(&self) -> &[MemRegion] {
        &self.table
    }

    /// Reads card memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Writes card memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.memory
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::eventfd::EventFd;

    fn frame(ty: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = ty.to_le_bytes().to_vec();
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn sample_hello() -> DeviceHello {
        let mut spads = [0; 16];
        spads[14] = 0x1000;
        spads[3] = 7;
        DeviceHello {
            version: VERSION,
            node_id: 1,
            aperture_size: 1 << 20,
            num_spads: 16,
            num_doorbells: 32,
            num_vectors: 32,
            running: true,
            card_state: 2,
            shutdown_status: 0,
            host_request: 0,
            spads,
        }
    }

    #[test]
    fn hello_round_trips_and_finds_the_page() {
        let h = sample_hello();
        let bytes = h.encode();
        assert_eq!(bytes.len(), DEVICE_HELLO_SIZE);
        let d = DeviceHello::decode(&bytes).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.device_page_offset(), Some(0x1000));
        let w: wire::DeviceHello = wire::read(&bytes).unwrap();
        assert_eq!(u32::from(w.spads[3]), 7);
        assert_eq!(bytes[48 + 4 * 3], 7);
    }

    #[test]
    fn host_messages_encode_per_spec() {
        let (b, fds) = HostMessage::RegWrite {
            offset: 0x138,
            value: 0x1000,
        }
        .encode();
        assert_eq!(b, frame(3, &[0x38, 1, 0, 0, 0, 0x10, 0, 0]));
        assert!(fds.is_empty());
        let (b, fds) = HostMessage::SetDoorbellFd {
            doorbell: 2,
            value: 5,
            fd: Some(9),
        }
        .encode();
        assert_eq!(b, frame(6, &[2, 0, 0, 0, 5, 0, 0, 0]));
        assert_eq!(fds, vec![9]);
        let (b, _) = HostMessage::Sync(0x0102).encode();
        assert_eq!(b, frame(10, &[2, 1, 0, 0, 0, 0, 0, 0]));
        let (b, _) = HostMessage::Hello.encode();
        assert_eq!(b, frame(1, &[0, 0, 1, 0]));
    }

    #[test]
    fn short_payloads_are_rejected() {
        assert!(DeviceMessage::decode(msg::REG_WRITE, &[0; 4], vec![]).is_err());
        assert!(DeviceMessage::decode(msg::HELLO, &[0; 100], vec![]).is_err());
        let mut t = vec![2, 0, 0, 0, 0, 0, 0, 0];
        t.extend_from_slice(&[0; 24]);
        // Two regions announced, one described.
        assert!(DeviceMessage::decode(msg::MEM_TABLE, &t, vec![]).is_err());
    }

    #[test]
    fn mem_table_and_error_decode_per_spec() {
        let mut p = vec![2, 0, 0, 0, 0, 0, 0, 0];
        for (gpa, size, fo) in [(0u64, 0xa_0000u64, 0u64), (0xc_0000, 0x1000, 0xc_0000)] {
            p.extend_from_slice(&gpa.to_le_bytes());
            p.extend_from_slice(&size.to_le_bytes());
            p.extend_from_slice(&fo.to_le_bytes());
        }
        let fds = vec![
            File::open("/dev/null").unwrap(),
            File::open("/dev/null").unwrap(),
        ];
        match DeviceMessage::decode(msg::MEM_TABLE, &p, fds).unwrap() {
            DeviceMessage::MemTable(t) => {
                let regions: Vec<MemRegion> = t.into_iter().map(|(r, _)| r).collect();
                assert_eq!(
                    regions,
                    vec![
                        MemRegion {
                            gpa: 0,
                            size: 0xa_0000,
                            fd_offset: 0
                        },
                        MemRegion {
                            gpa: 0xc_0000,
                            size: 0x1000,
                            fd_offset: 0xc_0000
                        }
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        // Two regions but one fd.
        let fds = vec![File::open("/dev/null").unwrap()];
        assert!(DeviceMessage::decode(msg::MEM_TABLE, &p, fds).is_err());

        let mut e = vec![7, 0, 0, 0, 22, 0, 0, 0];
        e.extend_from_slice(b"vector 77 out of range");
        match DeviceMessage::decode(msg::ERROR, &e, vec![]).unwrap() {
            DeviceMessage::Error {
                request_type,
                errno,
                text,
            } => {
                assert_eq!((request_type, errno), (7, 22));
                assert_eq!(text, "vector 77 out of range");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            DeviceMessage::decode(msg::CARD_EVENT, &event::POWEROFF.to_le_bytes(), vec![]),
            Ok(DeviceMessage::CardEvent(CardEvent::PowerOff))
        ));
    }

    #[test]
    fn wrong_major_version_is_refused() {
        let mut h = sample_hello();
        h.version = 0x0002_0000;
        let f = File::open("/dev/null").unwrap();
        assert!(matches!(
            DeviceMessage::decode(msg::HELLO, &h.encode(), vec![f]),
            Err(ProtocolError::Version(0x0002_0000))
        ));
    }

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
