//! The messages' wire layouts: `#[repr(C, packed)]` mirrors of the header's
//! `struct mic_msg_*`, little-endian fields.

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
