//! Host side of the protocol between the `mic-x100` QEMU device and the host
//! (`docs/device-protocol.md`): message encoding and decoding, the socket link
//! with file-descriptor passing, and the shared mappings the device hands over
//! (the aperture and the card's RAM).
//!
//! The protocol's code definition is the C header
//! `guest-images/driver/mic_x100_vop.h`; the payload structs in [`wire`] and
//! the constants here mirror it, checked by `tests/abi_header.rs`.
//!
//! - [`wire`]: the payloads' packed layouts;
//! - [`messages`]: the messages, decoded and encoded;
//! - [`link`]: the socket, with file descriptors, and `SYNC`;
//! - [`shared`]: the aperture and the card's RAM, mapped.

use std::io;
use std::mem::size_of;

mod link;
mod messages;
mod shared;
pub mod wire;

pub use link::{DeviceLink, MAX_QUEUED};
pub use messages::{CardEvent, DeviceHello, DeviceMessage, HostMessage, MemRegion};
pub use shared::{Aperture, Attachment, CardRam};

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
