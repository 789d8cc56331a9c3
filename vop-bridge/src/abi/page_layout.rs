//! The device page: its constants, the upstream structs it is made of,
//! the split-ring arithmetic and feature bitmaps (`docs/vop-abi.md`
//! sections 4 and 5).

use std::mem::size_of;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config;
use vm_memory::ByteValued;

/// Device page magic (upstream `MIC_MAGIC`).
pub const MIC_MAGIC: u32 = 0xc0ff_ee00;
/// Size of the device page (upstream `MIC_DP_SIZE`).
pub const DP_SIZE: usize = 4096;
/// Aperture offset where `vop-bridge` places the device page.
pub const DP_DEFAULT_OFFSET: u64 = 0x1000;
/// Ring alignment (upstream `MIC_VIRTIO_RING_ALIGN`).
pub const RING_ALIGN: u64 = 4096;
/// Most virtqueues per device (upstream allowed 4).
pub const MAX_VQS: usize = 16;
/// Most entries per ring (upstream allowed 128).
pub const MAX_RING_ENTRIES: u16 = 1024;
/// Largest descriptor, `total_size` (upstream allowed 256).
pub const MAX_DESC_SIZE: usize = 1024;
/// Bytes per feature bitmap written by our host.
pub const FEATURE_LEN: u8 = 8;
/// Smallest `feature_len` the card accepts.
pub const MIN_FEATURE_LEN: u8 = 1;
/// Largest `feature_len` the card accepts.
pub const MAX_FEATURE_LEN: u8 = 32;
/// `config_change` value: the host removes the device.
pub const CONFIG_CHANGE_REMOVE: u8 = 1;
/// `config_change` value: the config space changed.
pub const CONFIG_CHANGE_CONFIG: u8 = 2;
/// `type` of a removed descriptor slot.
pub const TYPE_REMOVED: i8 = -1;
/// `type` that ends the descriptor list.
pub const TYPE_END: i8 = 0;
/// Page offset of the heartbeat block (ABI 1.1, `docs/vop-abi.md` 5.6):
/// the page's last 16 bytes; descriptors end before it.
pub const HEARTBEAT_OFFSET: usize = DP_SIZE - 16;
/// [`Heartbeat::magic`] of a page that offers the heartbeat ("\0HBT"; its
/// low byte is 0, so a descriptor scan that reaches it sees the list end).
pub const HEARTBEAT_MAGIC: u32 = 0x5442_4800;

/// `mic_bootparam`: the head of the device page (upstream 4.4+ layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootParam {
    /// [`MIC_MAGIC`].
    pub magic: u32,
    /// Vector the host raises on add/remove/config change; card-written.
    pub h2c_config_db: i8,
    /// Node id.
    pub node_id: u8,
    /// Unused (SCIF).
    pub h2c_scif_db: u8,
    /// Unused (SCIF).
    pub c2h_scif_db: u8,
    /// Unused (SCIF).
    pub scif_host_dma_addr: u64,
    /// Unused (SCIF).
    pub scif_card_dma_addr: u64,
}

/// `mic_device_desc`: the fixed head of a device descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceDesc {
    /// Virtio device id; 0 ends the list, -1 is a removed slot.
    pub type_: i8,
    /// Number of virtqueues.
    pub num_vq: u8,
    /// Bytes per feature bitmap.
    pub feature_len: u8,
    /// Bytes of config space.
    pub config_len: u8,
    /// Virtio device status, card-written.
    pub status: u8,
    /// Padding.
    pub pad: [u8; 3],
}

/// `mic_vqconfig`: where a virtqueue's ring is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VqConfig {
    /// Aperture offset of the ring allocation.
    pub address: u64,
    /// Must be 0 (the used ring stays in the aperture).
    pub used_address: u64,
    /// Ring size in entries.
    pub num: u16,
    /// The queue's own MSI-X vector (ABI 1.2, `docs/vop-abi.md` 5.7): the
    /// host writes [`VQ_VECTOR_OFFERED`], the card a vector or leaves it.
    pub h2c_vq_db: i8,
    /// Padding.
    pub pad: [u8; 5],
}

/// `h2c_vq_db` as a 1.2 host writes it: the card may give the queue a
/// vector of its own (`docs/vop-abi.md` 5.7). A 1.1 host leaves 0 there.
pub const VQ_VECTOR_OFFERED: i8 = -1;

/// `mic_device_ctrl`: a device's control block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceCtrl {
    /// Card cookie.
    pub vdev: u64,
    /// Host: 1 remove, 2 config changed.
    pub config_change: u8,
    /// Card: asks for a device reset.
    pub vdev_reset: u8,
    /// Card: acknowledges `config_change`.
    pub guest_ack: u8,
    /// Host: acknowledges `vdev_reset`.
    pub host_ack: u8,
    /// Unused, must stay 0.
    pub used_address_updated: u8,
    /// Host-allocated card-to-host doorbell.
    pub c2h_vdev_db: i8,
    /// Card-allocated MSI-X vector.
    pub h2c_vdev_db: i8,
    /// Padding.
    pub pad: u8,
}

/// `_mic_vring_info`: the trailer after each ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VringInfo {
    /// Unused; 0.
    pub avail_idx: u16,
    /// Padding.
    pub pad: u16,
    /// `MIC_MAGIC + type + vq_index`.
    pub magic: u32,
}

/// `mic_heartbeat`: the heartbeat block at [`HEARTBEAT_OFFSET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Heartbeat {
    /// Host: [`HEARTBEAT_MAGIC`] when the page offers the heartbeat.
    pub magic: u32,
    /// Card: its beat period in milliseconds.
    pub period_ms: u32,
    /// Card: beats so far; 0 until the first.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

// SAFETY: plain-old-data structs of integers with no implicit padding; every
// bit pattern is a valid value.
unsafe impl ByteValued for BootParam {}
// SAFETY: as above.
unsafe impl ByteValued for Heartbeat {}
// SAFETY: as above.
unsafe impl ByteValued for DeviceDesc {}
// SAFETY: as above.
unsafe impl ByteValued for VqConfig {}
// SAFETY: as above.
unsafe impl ByteValued for DeviceCtrl {}
// SAFETY: as above.
unsafe impl ByteValued for VringInfo {}

/// Rounds `v` up to a multiple of `a` (a power of two).
pub const fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// Offset of the used ring in a split ring of `num` entries whose used ring
/// is aligned to `align` (Linux `vring_init`: descriptor table, available
/// ring with its event word, then the used ring).
pub const fn vring_used_offset(num: u16, align: u64) -> u64 {
    let num = num as u64;
    align_up(16 * num + 2 * (3 + num), align)
}

/// Size of a split ring of `num` entries with the used ring aligned to `align`
/// (Linux `vring_size`).
pub const fn vring_size(num: u16, align: u64) -> u64 {
    vring_used_offset(num, align) + 2 * 3 + 8 * num as u64
}

/// Bytes the host allocates for one ring: the ring, its trailer, page aligned.
pub const fn ring_alloc_size(num: u16) -> u64 {
    align_up(
        vring_size(num, RING_ALIGN) + size_of::<VringInfo>() as u64,
        4096,
    )
}

/// Ring trailer magic for virtqueue `vq_index` of a device of `device_type`.
pub const fn vring_magic(device_type: u8, vq_index: u16) -> u32 {
    MIC_MAGIC
        .wrapping_add(device_type as u32)
        .wrapping_add(vq_index as u32)
}

/// Byte offsets of every part of one device descriptor, relative to its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescLayout {
    /// Number of virtqueues.
    pub num_vq: u8,
    /// Bytes per feature bitmap.
    pub feature_len: u8,
    /// Bytes of config space.
    pub config_len: u8,
}

impl DescLayout {
    /// Offset of the `status` byte.
    pub const STATUS: usize = std::mem::offset_of!(DeviceDesc, status);

    /// Offset of virtqueue `i`'s `mic_vqconfig`.
    pub fn vqconfig(&self, i: usize) -> usize {
        size_of::<DeviceDesc>() + size_of::<VqConfig>() * i
    }

    /// Offset of the host feature bitmap.
    pub fn host_features(&self) -> usize {
        self.vqconfig(self.num_vq as usize)
    }

    /// Offset of the acked feature bitmap.
    pub fn acked_features(&self) -> usize {
        self.host_features() + self.feature_len as usize
    }

    /// Offset of the config space.
    pub fn config(&self) -> usize {
        self.acked_features() + self.feature_len as usize
    }

    /// Size of the descriptor without its control block (`mic_desc_size`).
    pub fn desc_size(&self) -> usize {
        align_up(self.config() as u64 + self.config_len as u64, 8) as usize
    }

    /// Offset of the control block.
    pub fn ctrl(&self) -> usize {
        self.desc_size()
    }

    /// Size of the descriptor with its control block (`mic_total_desc_size`).
    pub fn total_size(&self) -> usize {
        self.desc_size() + size_of::<DeviceCtrl>()
    }

    /// Checks the layout against the limits of `docs/vop-abi.md` section 5.4.
    pub fn check_limits(&self) -> Result<(), LayoutError> {
        if self.num_vq == 0 || self.num_vq as usize > MAX_VQS {
            return Err(LayoutError::NumVq(self.num_vq));
        }
        if !(MIN_FEATURE_LEN..=MAX_FEATURE_LEN).contains(&self.feature_len) {
            return Err(LayoutError::FeatureLen(self.feature_len));
        }
        if self.total_size() > MAX_DESC_SIZE {
            return Err(LayoutError::TooLarge(self.total_size()));
        }
        Ok(())
    }
}

/// A device descriptor that breaks the ABI's limits.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// `num_vq` is 0 or above [`MAX_VQS`].
    #[error("num_vq {0} is outside 1..={MAX_VQS}")]
    NumVq(u8),
    /// `feature_len` is outside [`MIN_FEATURE_LEN`]..=[`MAX_FEATURE_LEN`].
    #[error("feature_len {0} is outside {MIN_FEATURE_LEN}..={MAX_FEATURE_LEN}")]
    FeatureLen(u8),
    /// The descriptor is larger than [`MAX_DESC_SIZE`].
    #[error("descriptor of {0} bytes exceeds {MAX_DESC_SIZE}")]
    TooLarge(usize),
    /// The descriptor runs past the end of the device page.
    #[error("descriptor at offset {0} runs past the device page")]
    PastPage(usize),
    /// A ring size is not a power of two in 1..=[`MAX_RING_ENTRIES`].
    #[error("ring size {0} is not a power of two up to {MAX_RING_ENTRIES}")]
    RingSize(u16),
}

/// Checks a ring size against the ABI limits.
pub fn check_ring_size(num: u16) -> Result<(), LayoutError> {
    if num == 0 || num > MAX_RING_ENTRIES || !num.is_power_of_two() {
        return Err(LayoutError::RingSize(num));
    }
    Ok(())
}

/// Encodes a 64-bit feature word into a bitmap of `len` bytes, byte `i`
/// holding bits `8i .. 8i+7`.
pub fn features_to_bytes(features: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i < 8 {
                (features >> (8 * i)) as u8
            } else {
                0
            }
        })
        .collect()
}

/// Decodes a feature bitmap (bits above 63 are ignored).
pub fn features_from_bytes(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .take(8)
        .enumerate()
        .fold(0, |acc, (i, b)| acc | (u64::from(*b) << (8 * i)))
}

/// Transport feature bits the host never offers to the card
/// (`docs/vop-abi.md` section 5.5).
pub const UNSUPPORTED_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | (1 << virtio_config::VIRTIO_F_ACCESS_PLATFORM)
    | (1 << virtio_config::VIRTIO_F_RING_PACKED)
    | (1 << virtio_config::VIRTIO_F_ORDER_PLATFORM)
    | (1 << virtio_config::VIRTIO_F_SR_IOV)
    | (1 << virtio_config::VIRTIO_F_NOTIFICATION_DATA)
    | (1 << virtio_config::VIRTIO_F_RING_RESET);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    #[test]
    fn bootparam_layout_matches_upstream() {
        assert_eq!(size_of::<BootParam>(), 24);
        assert_eq!(offset_of!(BootParam, magic), 0);
        assert_eq!(offset_of!(BootParam, h2c_config_db), 4);
        assert_eq!(offset_of!(BootParam, node_id), 5);
        assert_eq!(offset_of!(BootParam, h2c_scif_db), 6);
        assert_eq!(offset_of!(BootParam, c2h_scif_db), 7);
        assert_eq!(offset_of!(BootParam, scif_host_dma_addr), 8);
        assert_eq!(offset_of!(BootParam, scif_card_dma_addr), 16);
    }

    #[test]
    fn heartbeat_block_fills_the_end_of_the_page() {
        assert_eq!(size_of::<Heartbeat>(), 16);
        assert_eq!(offset_of!(Heartbeat, magic), 0);
        assert_eq!(offset_of!(Heartbeat, period_ms), 4);
        assert_eq!(offset_of!(Heartbeat, count), 8);
        assert_eq!(HEARTBEAT_OFFSET + size_of::<Heartbeat>(), DP_SIZE);
        // A scan that reaches the block reads its first byte as a type: the end.
        assert_eq!(HEARTBEAT_MAGIC.to_le_bytes()[0] as i8, TYPE_END);
    }

    #[test]
    fn device_desc_layout_matches_upstream() {
        assert_eq!(size_of::<DeviceDesc>(), 8);
        assert_eq!(offset_of!(DeviceDesc, type_), 0);
        assert_eq!(offset_of!(DeviceDesc, num_vq), 1);
        assert_eq!(offset_of!(DeviceDesc, feature_len), 2);
        assert_eq!(offset_of!(DeviceDesc, config_len), 3);
        assert_eq!(offset_of!(DeviceDesc, status), DescLayout::STATUS);
    }

    #[test]
    fn vqconfig_layout_matches_upstream() {
        assert_eq!(size_of::<VqConfig>(), 24);
        assert_eq!(offset_of!(VqConfig, address), 0);
        assert_eq!(offset_of!(VqConfig, used_address), 8);
        assert_eq!(offset_of!(VqConfig, num), 16);
        assert_eq!(offset_of!(VqConfig, h2c_vq_db), 18);
        assert_eq!(offset_of!(VqConfig, pad), 19);
    }

    #[test]
    fn device_ctrl_layout_matches_upstream() {
        assert_eq!(size_of::<DeviceCtrl>(), 16);
        assert_eq!(offset_of!(DeviceCtrl, vdev), 0);
        assert_eq!(offset_of!(DeviceCtrl, config_change), 8);
        assert_eq!(offset_of!(DeviceCtrl, vdev_reset), 9);
        assert_eq!(offset_of!(DeviceCtrl, guest_ack), 10);
        assert_eq!(offset_of!(DeviceCtrl, host_ack), 11);
        assert_eq!(offset_of!(DeviceCtrl, used_address_updated), 12);
        assert_eq!(offset_of!(DeviceCtrl, c2h_vdev_db), 13);
        assert_eq!(offset_of!(DeviceCtrl, h2c_vdev_db), 14);
    }

    #[test]
    fn vring_info_layout_matches_upstream() {
        assert_eq!(size_of::<VringInfo>(), 8);
        assert_eq!(offset_of!(VringInfo, avail_idx), 0);
        assert_eq!(offset_of!(VringInfo, magic), 4);
    }

    #[test]
    fn desc_sizes_match_upstream_formula() {
        // Upstream console: 2 vqs, 4-byte features, no config.
        let l = DescLayout {
            num_vq: 2,
            feature_len: 4,
            config_len: 0,
        };
        assert_eq!(l.host_features(), 56);
        assert_eq!(l.acked_features(), 60);
        assert_eq!(l.config(), 64);
        assert_eq!(l.desc_size(), 64);
        assert_eq!(l.total_size(), 80);
        // Our block device: 1 vq, 8-byte features, 60 bytes of config.
        let l = DescLayout {
            num_vq: 1,
            feature_len: 8,
            config_len: 60,
        };
        assert_eq!(l.config(), 48);
        assert_eq!(l.desc_size(), 112);
        assert_eq!(l.total_size(), 128);
        assert!(l.check_limits().is_ok());
        let l = DescLayout {
            num_vq: 17,
            feature_len: 8,
            config_len: 0,
        };
        assert_eq!(l.check_limits(), Err(LayoutError::NumVq(17)));
    }

    #[test]
    fn ring_sizes() {
        // Linux vring_size(128, 4096) = 4096 + 2054 ... checked by hand:
        // desc 2048 + avail 6+256 = 2310 -> 4096; used 6 + 1024 = 1030.
        assert_eq!(vring_size(128, 4096), 4096 + 1030);
        assert_eq!(ring_alloc_size(128), 8192);
        assert_eq!(vring_size(256, 4096), 8192 + 2054);
        assert_eq!(ring_alloc_size(256), 12288);
        assert!(check_ring_size(256).is_ok());
        assert!(check_ring_size(100).is_err());
        assert!(check_ring_size(2048).is_err());
        assert_eq!(vring_magic(3, 1), 0xc0ff_ee04);
    }

    #[test]
    fn feature_bitmaps_round_trip() {
        let f = (1u64 << 32) | (1 << 29) | 0x5;
        let b = features_to_bytes(f, 8);
        assert_eq!(b, vec![5, 0, 0, 0x20, 1, 0, 0, 0]);
        assert_eq!(features_from_bytes(&b), f);
        assert_eq!(features_to_bytes(f, 4), vec![5, 0, 0, 0x20]);
    }

    #[test]
    fn unsupported_features_are_the_spec_bits() {
        // docs/vop-abi.md section 5.5: bits 30, 33, 34, 36, 37, 38 and 40.
        let bits: Vec<u32> = (0..64)
            .filter(|b| UNSUPPORTED_FEATURES & (1 << b) != 0)
            .collect();
        assert_eq!(bits, vec![30, 33, 34, 36, 37, 38, 40]);
    }
}
