//! The device page and the rings in the aperture (`docs/vop-abi.md` section 5).
//!
//! The host writes the page's structure (descriptor heads, ring
//! configuration, host features, `c2h_vdev_db`) once and keeps its own copy of
//! it in [`Slot`]s; afterwards it reads only the fields the card owns (status,
//! acked features, config space, control-block bytes) at offsets it computed
//! itself, so nothing the card writes can redirect the host outside the page
//! or the rings.

use std::sync::atomic::{fence, Ordering};

use log::warn;

use vm_memory::Bytes;

use crate::abi::{
    self, BootParam, DescLayout, DeviceCtrl, DeviceDesc, Heartbeat, VqConfig, VringInfo,
};
use crate::device_protocol::{Aperture, ProtocolError};

mod adopt;
mod fields;

pub use fields::{check_unused_fields, ctrl_field, unused_fields, UnusedFields};

/// Errors building or adopting a device page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The aperture could not be accessed.
    #[error(transparent)]
    Aperture(#[from] ProtocolError),
    /// A descriptor breaks the ABI limits.
    #[error("device descriptor: {0}")]
    Layout(#[from] abi::LayoutError),
    /// No room left in the page or the aperture.
    #[error("no room for the device in the {0}")]
    NoRoom(&'static str),
    /// No card-to-host doorbell left.
    #[error("all {} card-to-host doorbells are in use", abi::NUM_DOORBELLS)]
    NoDoorbell,
    /// The page found in the aperture is not a valid device page.
    #[error("invalid device page at {offset:#x}: {why}")]
    Invalid {
        /// Aperture offset of the page.
        offset: u64,
        /// What is wrong.
        why: String,
    },
}

/// What the host offers for one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Virtio device id.
    pub device_type: u8,
    /// Ring sizes, one per virtqueue.
    pub queue_sizes: Vec<u16>,
    /// Device features offered to the card.
    pub features: u64,
    /// Initial config space.
    pub config: Vec<u8>,
}

/// One virtqueue's ring in the aperture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Aperture offset of the ring allocation.
    pub offset: u64,
    /// Entries.
    pub num: u16,
}

impl Ring {
    /// Offset of the descriptor table.
    pub fn desc(&self) -> u64 {
        self.offset
    }

    /// Offset of the available ring.
    pub fn avail(&self) -> u64 {
        self.offset + 16 * u64::from(self.num)
    }

    /// Offset of the used ring.
    pub fn used(&self) -> u64 {
        self.offset + abi::vring_used_offset(self.num, abi::RING_ALIGN)
    }

    /// Offset of the ring's trailer (`_mic_vring_info`).
    pub fn info(&self) -> u64 {
        self.offset + abi::vring_size(self.num, abi::RING_ALIGN)
    }
}

/// What the card last wrote into the heartbeat block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// Beats so far; 0 before the first.
    pub count: u32,
    /// The card's beat period in milliseconds.
    pub period_ms: u32,
}

/// A device descriptor the host wrote, as the host remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Page offset of the descriptor.
    pub desc_offset: usize,
    /// Virtio device id.
    pub device_type: u8,
    /// Layout of the descriptor.
    pub layout: DescLayout,
    /// The rings.
    pub rings: Vec<Ring>,
    /// Card-to-host doorbell of the device.
    pub c2h_db: u8,
}

/// The device page in the aperture and the rings it points to.
pub struct DevicePage {
    offset: u64,
    slots: Vec<Option<Slot>>,
    /// Page offset where the next descriptor goes.
    list_end: usize,
    /// Next free byte of the ring area (rings are allocated upwards from the
    /// page; a reset rebuilds the page and starts over).
    ring_top: u64,
    aperture_size: u64,
}

impl DevicePage {
    /// Builds an empty page at aperture `offset` (rings go after it).
    pub fn build(aperture: &Aperture, offset: u64, node_id: u8) -> Result<Self, PageError> {
        let zero = vec![0u8; abi::DP_SIZE];
        aperture.write(offset, &zero)?;
        aperture.write_obj(
            offset,
            BootParam {
                magic: abi::MIC_MAGIC,
                h2c_config_db: -1,
                node_id,
                ..Default::default()
            },
        )?;
        // The heartbeat block (ABI 1.1): offered, no beat yet.
        aperture.write_obj(
            offset + abi::HEARTBEAT_OFFSET as u64,
            Heartbeat {
                magic: abi::HEARTBEAT_MAGIC,
                ..Default::default()
            },
        )?;
        Ok(DevicePage {
            offset,
            slots: Vec::new(),
            list_end: std::mem::size_of::<BootParam>(),
            ring_top: offset + abi::DP_SIZE as u64,
            aperture_size: aperture.size(),
        })
    }

    /// Aperture offset of the page.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The descriptors, by slot index (`None` for removed ones).
    pub fn slots(&self) -> &[Option<Slot>] {
        &self.slots
    }

    fn used_doorbells(&self) -> impl Iterator<Item = u8> + '_ {
        self.slots.iter().flatten().map(|s| s.c2h_db)
    }

    /// Adds a device (`docs/vop-abi.md` 7.4). Returns its slot index.
    pub fn add(&mut self, aperture: &Aperture, spec: &DeviceSpec) -> Result<usize, PageError> {
        let layout = DescLayout {
            num_vq: u8::try_from(spec.queue_sizes.len())
                .map_err(|_| abi::LayoutError::NumVq(u8::MAX))?,
            feature_len: abi::FEATURE_LEN,
            config_len: u8::try_from(spec.config.len())
                .map_err(|_| PageError::NoRoom("config space"))?,
        };
        layout.check_limits()?;
        for &n in &spec.queue_sizes {
            abi::check_ring_size(n)?;
        }
        let c2h_db = (0..abi::NUM_DOORBELLS as u8)
            .find(|d| !self.used_doorbells().any(|u| u == *d))
            .ok_or(PageError::NoDoorbell)?;

        // New descriptors go at the end of the list: removed slots keep their
        // bytes (`type = -1`) because descriptor sizes differ.
        let desc_offset = self.list_end;
        // Descriptors end before the heartbeat block, whose first byte (0)
        // terminates a full list.
        if desc_offset + layout.total_size() > abi::HEARTBEAT_OFFSET {
            return Err(PageError::NoRoom("device page"));
        }

        let mut rings = Vec::with_capacity(spec.queue_sizes.len());
        for &num in &spec.queue_sizes {
            let size = abi::ring_alloc_size(num);
            if self.ring_top + size > self.aperture_size {
                return Err(PageError::NoRoom("aperture"));
            }
            rings.push(Ring {
                offset: self.ring_top,
                num,
            });
            self.ring_top += size;
        }

        let base = self.offset + desc_offset as u64;
        aperture.write(base, &vec![0u8; layout.total_size()])?;
        aperture.write_obj(
            base,
            DeviceDesc {
                type_: 0,
                num_vq: layout.num_vq,
                feature_len: layout.feature_len,
                config_len: layout.config_len,
                ..Default::default()
            },
        )?;
        for (i, r) in rings.iter().enumerate() {
            aperture.write_obj(
                base + layout.vqconfig(i) as u64,
                VqConfig {
                    address: r.offset,
                    num: r.num,
                    h2c_vq_db: abi::VQ_VECTOR_OFFERED,
                    ..Default::default()
                },
            )?;
            init_ring(aperture, r, spec.device_type, i as u16)?;
        }
        aperture.write(
            base + layout.host_features() as u64,
            &abi::features_to_bytes(spec.features, layout.feature_len as usize),
        )?;
        aperture.write(base + layout.config() as u64, &spec.config)?;
        aperture.write_obj(
            base + layout.ctrl() as u64,
            DeviceCtrl {
                c2h_vdev_db: c2h_db as i8,
                h2c_vdev_db: -1,
                ..Default::default()
            },
        )?;
        fence(Ordering::Release);
        aperture.write_obj(base, spec.device_type as i8)?;

        self.list_end = desc_offset + layout.total_size();
        self.slots.push(Some(Slot {
            desc_offset,
            device_type: spec.device_type,
            layout,
            rings,
            c2h_db,
        }));
        Ok(self.slots.len() - 1)
    }

    /// Marks a slot removed (`type = -1`) after the card acknowledged removal.
    pub fn remove(&mut self, aperture: &Aperture, index: usize) -> Result<(), PageError> {
        if let Some(Some(s)) = self.slots.get(index) {
            aperture.write_obj(self.offset + s.desc_offset as u64, abi::TYPE_REMOVED)?;
            self.slots[index] = None;
        }
        Ok(())
    }

    /// The card's last beat in the page's heartbeat block
    /// (`docs/vop-abi.md` 5.6): `None` when the page offers no heartbeat
    /// (a page an ABI 1.0 host built and this bridge adopted).
    pub fn heartbeat(&self, aperture: &Aperture) -> Result<Option<Beat>, PageError> {
        let block = aperture.slice(
            self.offset + abi::HEARTBEAT_OFFSET as u64,
            std::mem::size_of::<Heartbeat>(),
        )?;
        // Each field is one aligned 32-bit load: the card writes them with
        // single stores while the host reads.
        let load = |field: usize| {
            block
                .load::<u32>(field, Ordering::Acquire)
                .map_err(|e| PageError::Aperture(ProtocolError::Map(e.to_string())))
        };
        if load(std::mem::offset_of!(Heartbeat, magic))? != abi::HEARTBEAT_MAGIC {
            return Ok(None);
        }
        Ok(Some(Beat {
            count: load(std::mem::offset_of!(Heartbeat, count))?,
            period_ms: load(std::mem::offset_of!(Heartbeat, period_ms))?,
        }))
    }

    fn slot(&self, index: usize) -> &Slot {
        self.slots[index].as_ref().expect("live slot")
    }

    fn field(&self, index: usize, off: usize) -> u64 {
        self.offset + (self.slot(index).desc_offset + off) as u64
    }
}

fn init_ring(aperture: &Aperture, r: &Ring, device_type: u8, vq: u16) -> Result<(), PageError> {
    aperture.write(r.offset, &vec![0u8; abi::ring_alloc_size(r.num) as usize])?;
    aperture.write_obj(
        r.info(),
        VringInfo {
            magic: abi::vring_magic(device_type, vq),
            ..Default::default()
        },
    )?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    /// A zeroed aperture of `size` bytes.
    pub(super) fn aperture(size: u64) -> Aperture {
        // SAFETY: memfd_create with a valid name; we own the returned fd.
        let fd = unsafe { libc::memfd_create(c"test-aperture".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, owned descriptor.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        Aperture::map(f, size).unwrap()
    }

    /// A virtio-blk device with one queue.
    pub(super) fn blk_spec() -> DeviceSpec {
        DeviceSpec {
            device_type: 2,
            queue_sizes: vec![256],
            features: 1 << 32 | 1 << 29,
            config: (0..60).collect(),
        }
    }

    #[test]
    fn built_page_matches_the_abi_bytes() {
        let ap = aperture(1 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        let i = page.add(&ap, &blk_spec()).unwrap();
        let j = page
            .add(
                &ap,
                &DeviceSpec {
                    device_type: 3,
                    queue_sizes: vec![128, 128],
                    features: 1 << 32,
                    config: vec![],
                },
            )
            .unwrap();
        assert_eq!((i, j), (0, 1));
        let mut raw = vec![0u8; 4096];
        ap.read(0x1000, &mut raw).unwrap();
        assert_eq!(&raw[0..4], &abi::MIC_MAGIC.to_le_bytes());
        assert_eq!(raw[4] as i8, -1);
        assert_eq!(raw[5], 1);
        // First descriptor at 24: type 2, 1 vq, 8-byte features, 60 bytes config.
        assert_eq!(&raw[24..29], &[2, 1, 8, 60, 0]);
        // vqconfig: ring right after the page.
        assert_eq!(u64::from_le_bytes(raw[32..40].try_into().unwrap()), 0x2000);
        assert_eq!(u16::from_le_bytes(raw[48..50].try_into().unwrap()), 256);
        // host features at 24 + 32, config at 24 + 48, ctrl at 24 + 112.
        assert_eq!(&raw[56..64], &[0, 0, 0, 0x20, 1, 0, 0, 0]);
        assert_eq!(raw[72..132], (0..60).collect::<Vec<u8>>()[..]);
        assert_eq!(raw[24 + 112 + 13], 0); // c2h_vdev_db
        assert_eq!(raw[24 + 112 + 14] as i8, -1); // h2c_vdev_db
                                                  // Second descriptor at 24 + 128 with doorbell 1; list ends after it.
        assert_eq!(&raw[152..157], &[3, 2, 8, 0, 0]);
        let second_total = DescLayout {
            num_vq: 2,
            feature_len: 8,
            config_len: 0,
        }
        .total_size();
        assert_eq!(raw[152 + second_total - 16 + 13], 1);
        assert_eq!(raw[152 + second_total], 0);
        // Ring trailer magic.
        let r = page.slots()[1].as_ref().unwrap().rings[1];
        let info: VringInfo = ap.read_obj(r.info()).unwrap();
        assert_eq!(info.magic, abi::vring_magic(3, 1));
        assert_eq!(
            r.offset,
            0x2000 + abi::ring_alloc_size(256) + abi::ring_alloc_size(128)
        );
    }

    #[test]
    fn limits_and_room_are_enforced() {
        let ap = aperture(64 << 10);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        let mut s = blk_spec();
        s.queue_sizes = vec![100];
        assert!(matches!(page.add(&ap, &s), Err(PageError::Layout(_))));
        s.queue_sizes = vec![1024; 4];
        assert!(matches!(
            page.add(&ap, &s),
            Err(PageError::NoRoom("aperture"))
        ));
        s.queue_sizes = vec![256];
        assert!(page.add(&ap, &s).is_ok());
    }

    #[test]
    fn the_heartbeat_block_is_offered_and_read() {
        let ap = aperture(1 << 20);
        let page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        let hb: Heartbeat = ap.read_obj(0x1000 + 4080).unwrap();
        assert_eq!((hb.magic, hb.period_ms, hb.count), (0x5442_4800, 0, 0));
        assert_eq!(
            page.heartbeat(&ap).unwrap(),
            Some(Beat {
                count: 0,
                period_ms: 0
            })
        );
        // The card's writes, as the driver makes them.
        ap.write_obj(0x1000 + 4084, 500u32).unwrap();
        ap.write_obj(0x1000 + 4088, 7u32).unwrap();
        assert_eq!(
            page.heartbeat(&ap).unwrap(),
            Some(Beat {
                count: 7,
                period_ms: 500
            })
        );
        // A page without the block (an ABI 1.0 host's, adopted): no heartbeat.
        ap.write_obj(0x1000 + 4080, 0u32).unwrap();
        let adopted = DevicePage::adopt(&ap, 0x1000).unwrap();
        assert_eq!(adopted.heartbeat(&ap).unwrap(), None);
    }

    #[test]
    fn descriptors_end_before_the_heartbeat_block() {
        let ap = aperture(8 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        // Large descriptors: 16 queues of 1 entry, 255 bytes of config.
        let big = DeviceSpec {
            device_type: 3,
            queue_sizes: vec![1; 16],
            features: 0,
            config: vec![0; 255],
        };
        let mut n = 0;
        while page.add(&ap, &big).is_ok() {
            n += 1;
        }
        let total = page.slots()[0].as_ref().unwrap().layout.total_size();
        let end = page.slots().last().unwrap().as_ref().unwrap().desc_offset + total;
        assert_eq!(n, (4080 - 24) / total);
        assert!(end <= 4080 && end + total > 4080);
        let hb: Heartbeat = ap.read_obj(0x1000 + 4080).unwrap();
        assert_eq!(hb.magic, abi::HEARTBEAT_MAGIC);
    }

    #[test]
    fn removed_slot_is_marked() {
        let ap = aperture(1 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        page.add(&ap, &blk_spec()).unwrap();
        page.remove(&ap, 0).unwrap();
        let t: i8 = ap.read_obj(0x1000 + 24).unwrap();
        assert_eq!(t, -1);
        let adopted = DevicePage::adopt(&ap, 0x1000).unwrap();
        assert_eq!(adopted.slots(), &[None]);
    }
}
