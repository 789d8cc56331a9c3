//! Offsets and values of the BAR0 registers (`docs/vop-abi.md` section 2).

/// `MAGIC`: reads [`MAGIC_VALUE`].
pub const MAGIC: u32 = 0x000;
/// `ABI_VERSION`: `major << 16 | minor`.
pub const ABI_VERSION: u32 = 0x004;
/// `FAMILY`: reads [`FAMILY_X100`].
pub const FAMILY: u32 = 0x008;
/// `STEPPING`: the card's stepping.
pub const STEPPING: u32 = 0x00c;
/// `NODE_ID`: the card's node id.
pub const NODE_ID: u32 = 0x010;
/// `NUM_SPADS`: number of scratchpads.
pub const NUM_SPADS: u32 = 0x014;
/// `NUM_DOORBELLS`: number of card-to-host doorbells.
pub const NUM_DOORBELLS: u32 = 0x018;
/// `NUM_VECTORS`: number of MSI-X vectors.
pub const NUM_VECTORS: u32 = 0x01c;
/// `APERTURE_SIZE_LO`: aperture size, low half.
pub const APERTURE_SIZE_LO: u32 = 0x020;
/// `APERTURE_SIZE_HI`: aperture size, high half.
pub const APERTURE_SIZE_HI: u32 = 0x024;
/// `CARD_STATE`: what the card says of itself.
pub const CARD_STATE: u32 = 0x040;
/// `SHUTDOWN_STATUS`: why the card stops.
pub const SHUTDOWN_STATUS: u32 = 0x044;
/// `HOST_REQUEST`: a request from the host to the card.
pub const HOST_REQUEST: u32 = 0x048;
/// First scratchpad; scratchpad `i` is at `SPAD_BASE + 4 * i`.
pub const SPAD_BASE: u32 = 0x100;
/// First doorbell; doorbell `n` is at `DOORBELL_BASE + 4 * n`.
pub const DOORBELL_BASE: u32 = 0x200;

/// Value of the `MAGIC` register ("MICX").
pub const MAGIC_VALUE: u32 = 0x5843_494d;
/// ABI version this crate implements (1.1: the heartbeat block; 1.2: a
/// vector per queue).
pub const ABI_VERSION_VALUE: u32 = 0x0001_0002;
/// Value of the `FAMILY` register for an X100.
pub const FAMILY_X100: u32 = 100;
/// Stepping A0.
pub const STEPPING_A0: u32 = 0x00;
/// Stepping B0.
pub const STEPPING_B0: u32 = 0x10;
/// Stepping B1.
pub const STEPPING_B1: u32 = 0x11;
/// Stepping C0, the default.
pub const STEPPING_C0: u32 = 0x20;
/// `HOST_REQUEST` value: no request.
pub const HOST_REQUEST_NONE: u32 = 0;
/// `HOST_REQUEST` value asking the card to shut down.
pub const HOST_REQUEST_SHUTDOWN: u32 = 1;

/// Offset of scratchpad `i`.
pub const fn spad(i: u32) -> u32 {
    SPAD_BASE + 4 * i
}

/// Offset of doorbell `n`.
pub const fn doorbell(n: u32) -> u32 {
    DOORBELL_BASE + 4 * n
}

/// Whether `offset` is a register both card and host may write.
pub fn is_writable(offset: u32) -> bool {
    matches!(offset, CARD_STATE | SHUTDOWN_STATUS | HOST_REQUEST)
        || (SPAD_BASE..SPAD_BASE + 4 * super::NUM_SPADS).contains(&offset)
            && offset.is_multiple_of(4)
}

#[cfg(test)]
mod tests {
    use crate::abi::{reg, SPAD_DP_HI, SPAD_DP_LO};
    #[test]
    fn register_offsets_match_spec() {
        assert_eq!(reg::MAGIC_VALUE.to_le_bytes(), *b"MICX");
        assert_eq!(reg::spad(SPAD_DP_LO), 0x138);
        assert_eq!(reg::spad(SPAD_DP_HI), 0x13c);
        assert_eq!(reg::doorbell(31), 0x27c);
        assert!(reg::is_writable(reg::CARD_STATE));
        assert!(reg::is_writable(reg::spad(15)));
        assert!(!reg::is_writable(reg::spad(16)));
        assert!(!reg::is_writable(reg::spad(1) + 2));
        assert!(!reg::is_writable(reg::MAGIC));
        assert!(!reg::is_writable(reg::doorbell(0)));
    }
}
