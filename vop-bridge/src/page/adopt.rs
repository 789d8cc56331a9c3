//! Adopting a page the card already uses, when a host side reattaches: the
//! whole page is checked before anything of it is trusted.

use super::*;

impl DevicePage {
    /// Adopts a page the card already uses (a host side reattaching): checks
    /// it thoroughly and remembers its structure. Rings stay as they are.
    pub fn adopt(aperture: &Aperture, offset: u64) -> Result<Self, PageError> {
        let invalid = |why: String| PageError::Invalid { offset, why };
        // The card writes SPAD14/15 at will: the sum must not wrap.
        let page_end = offset.checked_add(abi::DP_SIZE as u64);
        if !offset.is_multiple_of(8) || page_end.is_none_or(|e| e > aperture.size()) {
            return Err(invalid("page outside the aperture".into()));
        }
        let bp: BootParam = aperture.read_obj(offset)?;
        if bp.magic != abi::MIC_MAGIC {
            return Err(invalid(format!("magic {:#x}", bp.magic)));
        }
        let mut page = DevicePage {
            offset,
            slots: Vec::new(),
            list_end: std::mem::size_of::<BootParam>(),
            ring_top: offset + abi::DP_SIZE as u64,
            aperture_size: aperture.size(),
        };
        let mut at = std::mem::size_of::<BootParam>();
        while at + std::mem::size_of::<DeviceDesc>() <= abi::DP_SIZE {
            let d: DeviceDesc = aperture.read_obj(offset + at as u64)?;
            if d.type_ == abi::TYPE_END {
                break;
            }
            let layout = DescLayout {
                num_vq: d.num_vq,
                feature_len: d.feature_len,
                config_len: d.config_len,
            };
            layout
                .check_limits()
                .map_err(|e| invalid(format!("descriptor at {at}: {e}")))?;
            if at + layout.total_size() > abi::DP_SIZE {
                return Err(invalid(abi::LayoutError::PastPage(at).to_string()));
            }
            if d.type_ == abi::TYPE_REMOVED {
                page.slots.push(None);
                at += layout.total_size();
                page.list_end = at;
                continue;
            }
            let base = offset + at as u64;
            let ctrl: DeviceCtrl = aperture.read_obj(base + layout.ctrl() as u64)?;
            if ctrl.c2h_vdev_db < 0 || ctrl.c2h_vdev_db as u32 >= abi::NUM_DOORBELLS {
                return Err(invalid(format!("doorbell {} at {at}", ctrl.c2h_vdev_db)));
            }
            // One doorbell per device (docs/vop-abi.md 4): a second owner
            // would take the first one's kicks.
            if page.used_doorbells().any(|d| d as i8 == ctrl.c2h_vdev_db) {
                return Err(invalid(format!(
                    "doorbell {} at {at} belongs to an earlier device",
                    ctrl.c2h_vdev_db
                )));
            }
            let mut rings = Vec::new();
            for i in 0..layout.num_vq as usize {
                let vq: VqConfig = aperture.read_obj(base + layout.vqconfig(i) as u64)?;
                abi::check_ring_size(vq.num).map_err(|e| invalid(e.to_string()))?;
                let r = Ring {
                    offset: vq.address,
                    num: vq.num,
                };
                let end = r.offset.checked_add(abi::ring_alloc_size(r.num));
                if !r.offset.is_multiple_of(4096)
                    || r.offset < offset + abi::DP_SIZE as u64
                    || end.is_none_or(|e| e > aperture.size())
                {
                    return Err(invalid(format!(
                        "ring {i} of descriptor {at} at {:#x}",
                        r.offset
                    )));
                }
                page.ring_top = page.ring_top.max(end.unwrap());
                rings.push(r);
            }
            page.slots.push(Some(Slot {
                desc_offset: at,
                device_type: d.type_ as u8,
                layout,
                rings,
                c2h_db: ctrl.c2h_vdev_db as u8,
            }));
            at += layout.total_size();
            page.list_end = at;
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::tests::{aperture, blk_spec};

    #[test]
    fn adopt_recovers_the_structure() {
        let ap = aperture(1 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        page.add(&ap, &blk_spec()).unwrap();
        let adopted = DevicePage::adopt(&ap, 0x1000).unwrap();
        assert_eq!(adopted.slots(), page.slots());
        assert_eq!(adopted.ring_top, page.ring_top);
    }

    #[test]
    fn adopt_rejects_malformed_pages() {
        let ap = aperture(1 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        page.add(&ap, &blk_spec()).unwrap();
        // Ring pointing outside the aperture.
        ap.write_obj(0x1000 + 32, 0xffff_0000u64).unwrap();
        assert!(DevicePage::adopt(&ap, 0x1000).is_err());
        ap.write_obj(0x1000 + 32, 0x2000u64).unwrap();
        assert!(DevicePage::adopt(&ap, 0x1000).is_ok());
        // Too many queues.
        ap.write_obj(0x1000 + 25, 200u8).unwrap();
        assert!(DevicePage::adopt(&ap, 0x1000).is_err());
        ap.write_obj(0x1000 + 25, 1u8).unwrap();
        // Bad magic.
        ap.write_obj(0x1000, 0u32).unwrap();
        assert!(DevicePage::adopt(&ap, 0x1000).is_err());
        // Page outside the aperture.
        assert!(DevicePage::adopt(&ap, (1 << 20) - 8).is_err());
        // An offset whose end wraps around (SPAD14/15 are the card's to write).
        assert!(matches!(
            DevicePage::adopt(&ap, u64::MAX - 7),
            Err(PageError::Invalid { .. })
        ));
    }

    #[test]
    fn adopt_rejects_two_devices_on_one_doorbell() {
        let ap = aperture(1 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        page.add(&ap, &blk_spec()).unwrap();
        let j = page.add(&ap, &blk_spec()).unwrap();
        assert!(DevicePage::adopt(&ap, 0x1000).is_ok());
        // The card points the second device at the first one's doorbell.
        let s = page.slots()[j].clone().unwrap();
        let db = 0x1000
            + (s.desc_offset + s.layout.ctrl() + std::mem::offset_of!(DeviceCtrl, c2h_vdev_db))
                as u64;
        assert_eq!(ap.read_obj::<u8>(db).unwrap(), 1);
        ap.write_obj(db, 0u8).unwrap();
        match DevicePage::adopt(&ap, 0x1000) {
            Err(PageError::Invalid { why, .. }) => assert!(why.contains("doorbell 0")),
            other => panic!(
                "adopted a page with a shared doorbell: {:?}",
                other.map(|p| p.slots)
            ),
        }
    }
}
