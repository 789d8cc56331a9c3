//! The protocol's messages: what the device sends, decoded, and what the
//! host sends, encoded (`docs/device-protocol.md`).

use std::fs::File;
use std::mem::size_of;
use std::os::fd::RawFd;

use vm_memory::ByteValued;

use super::{event, malformed, msg, wire, ProtocolError, Result};
use super::{HEADER_SIZE, HELLO_FLAG_RUNNING, MAX_MEM_REGIONS, VERSION};
use crate::abi;

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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::device_protocol::{msg, DEVICE_HELLO_SIZE};

    /// One message as the device frames it.
    pub(in crate::device_protocol) fn frame(ty: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = ty.to_le_bytes().to_vec();
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A device's `HELLO` with a page at 0x1000.
    pub(in crate::device_protocol) fn sample_hello() -> DeviceHello {
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
}
