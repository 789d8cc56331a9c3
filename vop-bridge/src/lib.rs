//! Host side of virtio-over-PCIe (VOP) for the emulated MIC X100 card.
//!
//! - [`abi`]: the card's registers and device page (`docs/vop-abi.md`).
//! - [`device_protocol`]: the link to the `mic-x100` QEMU device
//!   (`docs/device-protocol.md`).

pub mod abi;
pub mod device_protocol;
