//! The VOP ABI of the emulated X100 card as Rust types: the BAR0 register map,
//! doorbell values, card states and the device page layout.
//!
//! `docs/vop-abi.md` is the specification. The code's definition is the C
//! header `guest-images/driver/mic_x100_vop.h`, shared by the card driver and
//! the QEMU device; this module mirrors it, and `tests/abi_header.rs` compiles
//! the header and fails when a constant, struct size or field offset here
//! differs from it. Virtio's own constants come from `virtio-bindings`.
//!
//! - [`reg`]: the BAR0 registers;
//! - [`state`]: card states and shutdown status;
//! - [`page_layout`]: the device page, rings and feature bitmaps.

pub mod page_layout;
pub mod reg;
pub mod state;

pub use page_layout::*;
pub use state::{CardState, ShutdownStatus};

/// PCI vendor id of the card (Intel).
pub const PCI_VENDOR_ID: u16 = 0x8086;
/// PCI device id of the card (an X100 id).
pub const PCI_DEVICE_ID: u16 = 0x2250;
/// PCI class code (co-processor).
pub const PCI_CLASS: u16 = 0x0b40;
/// BAR holding the registers.
pub const BAR_REGS: u8 = 0;
/// BAR holding the aperture (host memory shared with the card).
pub const BAR_APERTURE: u8 = 2;
/// BAR holding the MSI-X table and PBA.
pub const BAR_MSIX: u8 = 4;
/// Size of the register BAR.
pub const REGS_SIZE: u64 = 4096;

/// Number of scratchpads.
pub const NUM_SPADS: u32 = 16;
/// Number of card-to-host doorbells.
pub const NUM_DOORBELLS: u32 = 32;
/// Number of MSI-X vectors (host-to-card doorbells).
pub const NUM_VECTORS: u32 = 32;
/// Scratchpad holding the device page offset, low half (upstream `MIC_DPLO_SPAD`).
pub const SPAD_DP_LO: u32 = 14;
/// Scratchpad holding the device page offset, high half (upstream `MIC_DPHI_SPAD`).
pub const SPAD_DP_HI: u32 = 15;
/// MSI-X vector reserved for control: page published, host request.
pub const CONTROL_VECTOR: u32 = 0;

/// Doorbell value meaning "re-read this device's status, control block and config".
pub const DOORBELL_CONTROL: u32 = 0x8000_0000;
/// Largest doorbell value that is a kick (the virtqueue index).
pub const DOORBELL_KICK_MAX: u32 = 0xffff;

/// What a value written to a card-to-host doorbell means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellValue {
    /// Virtqueue `index` of the doorbell's device has new buffers.
    Kick(u16),
    /// Re-read status, control block and config space.
    Control,
    /// A reserved value: logged and ignored.
    Reserved(u32),
}

impl From<u32> for DoorbellValue {
    fn from(value: u32) -> Self {
        match value {
            0..=DOORBELL_KICK_MAX => DoorbellValue::Kick(value as u16),
            DOORBELL_CONTROL => DoorbellValue::Control,
            other => DoorbellValue::Reserved(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_values() {
        assert_eq!(DoorbellValue::from(3), DoorbellValue::Kick(3));
        assert_eq!(DoorbellValue::from(0xffff), DoorbellValue::Kick(0xffff));
        assert_eq!(DoorbellValue::from(0x8000_0000), DoorbellValue::Control);
        assert_eq!(
            DoorbellValue::from(0x1_0000),
            DoorbellValue::Reserved(0x1_0000)
        );
    }
}
