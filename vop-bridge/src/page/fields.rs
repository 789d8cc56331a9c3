//! The fields of the page the card owns (status, acked features, config
//! space, control-block bytes, doorbells, used indices), read and written at
//! offsets the host computed itself, and the fields that must stay zero.

use super::*;

impl DevicePage {
    /// `h2c_config_db` as the card set it (`None` while -1 or out of range).
    pub fn h2c_config_db(&self, aperture: &Aperture) -> Result<Option<u32>, PageError> {
        let v: i8 = aperture.read_obj(self.offset + 4)?;
        Ok((v >= 0 && (v as u32) < abi::NUM_VECTORS).then_some(v as u32))
    }

    /// The device status the card wrote.
    pub fn status(&self, aperture: &Aperture, index: usize) -> Result<u8, PageError> {
        Ok(aperture.read_obj(self.field(index, DescLayout::STATUS))?)
    }

    /// Writes the device status (the host does so only on reset).
    pub fn set_status(&self, aperture: &Aperture, index: usize, v: u8) -> Result<(), PageError> {
        Ok(aperture.write_obj(self.field(index, DescLayout::STATUS), v)?)
    }

    /// Features the card acked.
    pub fn acked_features(&self, aperture: &Aperture, index: usize) -> Result<u64, PageError> {
        let l = self.slot(index).layout;
        let mut b = vec![0u8; l.feature_len as usize];
        aperture.read(self.field(index, l.acked_features()), &mut b)?;
        Ok(abi::features_from_bytes(&b))
    }

    /// The config space as it is in the page.
    pub fn config(&self, aperture: &Aperture, index: usize) -> Result<Vec<u8>, PageError> {
        let l = self.slot(index).layout;
        let mut b = vec![0u8; l.config_len as usize];
        aperture.read(self.field(index, l.config()), &mut b)?;
        Ok(b)
    }

    /// Writes config space bytes (a config change from the backend).
    pub fn write_config(
        &self,
        aperture: &Aperture,
        index: usize,
        data: &[u8],
    ) -> Result<(), PageError> {
        let l = self.slot(index).layout;
        let n = data.len().min(l.config_len as usize);
        Ok(aperture.write(self.field(index, l.config()), &data[..n])?)
    }

    /// The control block.
    pub fn ctrl(&self, aperture: &Aperture, index: usize) -> Result<DeviceCtrl, PageError> {
        let l = self.slot(index).layout;
        Ok(aperture.read_obj(self.field(index, l.ctrl()))?)
    }

    /// Writes one byte of the control block (`field` is its offset in it).
    pub fn set_ctrl_byte(
        &self,
        aperture: &Aperture,
        index: usize,
        field: usize,
        v: u8,
    ) -> Result<(), PageError> {
        let l = self.slot(index).layout;
        Ok(aperture.write_obj(self.field(index, l.ctrl() + field), v)?)
    }

    /// The card's MSI-X vector for a device (`None` while unset or out of range).
    pub fn h2c_vdev_db(&self, aperture: &Aperture, index: usize) -> Result<Option<u32>, PageError> {
        let v = self.ctrl(aperture, index)?.h2c_vdev_db;
        Ok((v >= 0 && (v as u32) < abi::NUM_VECTORS).then_some(v as u32))
    }

    /// The vector each of a device's queues raises: its own vector where the
    /// card gave it one (`h2c_vq_db`, ABI 1.2, `docs/vop-abi.md` 5.7), else
    /// the device's (`h2c_vdev_db`). `None` while the device has no vector.
    pub fn queue_vectors(
        &self,
        aperture: &Aperture,
        index: usize,
    ) -> Result<Option<Vec<u32>>, PageError> {
        let Some(shared) = self.h2c_vdev_db(aperture, index)? else {
            return Ok(None);
        };
        let s = self.slot(index);
        let base = self.offset + s.desc_offset as u64;
        let mut vectors = Vec::with_capacity(s.rings.len());
        for i in 0..s.rings.len() {
            let vq: VqConfig = aperture.read_obj(base + s.layout.vqconfig(i) as u64)?;
            // Vector 0 is the control vector, never a queue's; a 1.1 host's
            // page has 0 here and the card leaves it.
            let own = (vq.h2c_vq_db > 0 && (vq.h2c_vq_db as u32) < abi::NUM_VECTORS)
                .then_some(vq.h2c_vq_db as u32);
            vectors.push(own.unwrap_or(shared));
        }
        Ok(Some(vectors))
    }

    /// Zeroes a device's rings and rewrites their trailers (device reset).
    pub fn reset_rings(&self, aperture: &Aperture, index: usize) -> Result<(), PageError> {
        let s = self.slot(index);
        for (i, r) in s.rings.iter().enumerate() {
            init_ring(aperture, r, s.device_type, i as u16)?;
        }
        Ok(())
    }

    /// The available index of a ring (how far the card has posted).
    pub fn avail_idx(&self, aperture: &Aperture, index: usize, q: usize) -> Result<u16, PageError> {
        let r = self.slot(index).rings[q];
        Ok(aperture.read_obj(r.avail() + 2)?)
    }

    /// The used index of a ring (where a restarted backend resumes).
    pub fn used_idx(&self, aperture: &Aperture, index: usize, q: usize) -> Result<u16, PageError> {
        let r = self.slot(index).rings[q];
        Ok(aperture.read_obj(r.used() + 2)?)
    }
}

/// Offsets of control-block bytes, for [`DevicePage::set_ctrl_byte`].
pub mod ctrl_field {
    use crate::abi::DeviceCtrl;
    use std::mem::offset_of;

    /// `config_change`.
    pub const CONFIG_CHANGE: usize = offset_of!(DeviceCtrl, config_change);
    /// `vdev_reset`.
    pub const VDEV_RESET: usize = offset_of!(DeviceCtrl, vdev_reset);
    /// `guest_ack`.
    pub const GUEST_ACK: usize = offset_of!(DeviceCtrl, guest_ack);
    /// `host_ack`.
    pub const HOST_ACK: usize = offset_of!(DeviceCtrl, host_ack);
}

/// Fields the ABI says must stay zero that the card set anyway.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnusedFields {
    /// `used_address_updated` in the control block.
    pub used_address_updated: bool,
    /// Queues whose `used_address` is not zero.
    pub used_address: Vec<usize>,
}

/// Reads the fields of a device the ABI says must stay zero.
pub fn unused_fields(aperture: &Aperture, page: &DevicePage, index: usize) -> UnusedFields {
    let s = page.slot(index);
    let mut found = UnusedFields::default();
    if let Ok(ctrl) = page.ctrl(aperture, index) {
        found.used_address_updated = ctrl.used_address_updated != 0;
    }
    let base = page.offset + s.desc_offset as u64;
    for i in 0..s.rings.len() {
        if let Ok(vq) = aperture.read_obj::<VqConfig>(base + s.layout.vqconfig(i) as u64) {
            if vq.used_address != 0 {
                found.used_address.push(i);
            }
        }
    }
    found
}

/// Logs the fields of a control block that the ABI says must stay zero
/// (every time: the bridge goes through [`unused_fields`] and a rate limit).
pub fn check_unused_fields(aperture: &Aperture, page: &DevicePage, index: usize) {
    let found = unused_fields(aperture, page, index);
    if found.used_address_updated {
        warn!(
            "device {index}: card set used_address_updated; ignored (rings stay in the aperture)"
        );
    }
    for i in found.used_address {
        warn!("device {index} queue {i}: card wrote used_address; ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::tests::{aperture, blk_spec};

    #[test]
    fn queues_raise_their_own_vector_or_the_devices() {
        let ap = aperture(1 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        let mut spec = blk_spec();
        spec.queue_sizes = vec![64; 3];
        page.add(&ap, &spec).unwrap();
        let s = page.slots()[0].clone().unwrap();
        let vq = |i: usize| 0x1000 + s.desc_offset as u64 + s.layout.vqconfig(i) as u64;
        let ctrl = 0x1000 + s.desc_offset as u64 + s.layout.ctrl() as u64;
        // The page offers a vector per queue.
        for i in 0..3 {
            let c: VqConfig = ap.read_obj(vq(i)).unwrap();
            assert_eq!(c.h2c_vq_db, abi::VQ_VECTOR_OFFERED);
        }
        // The card's device vector 4; queue 1 gets 9, queue 2 a value out of
        // range (shared), queue 0 the control vector (never a queue's).
        ap.write_obj(ctrl + 14, 4i8).unwrap();
        ap.write_obj(vq(1) + 18, 9i8).unwrap();
        ap.write_obj(vq(2) + 18, 40i8).unwrap();
        ap.write_obj(vq(0) + 18, 0i8).unwrap();
        assert_eq!(page.queue_vectors(&ap, 0).unwrap(), Some(vec![4, 9, 4]));
    }

    #[test]
    fn card_fields_are_read_from_computed_offsets() {
        let ap = aperture(1 << 20);
        let mut page = DevicePage::build(&ap, 0x1000, 1).unwrap();
        page.add(&ap, &blk_spec()).unwrap();
        // The card acks features, sets status and its vector.
        ap.write(0x1000 + 24 + 8 + 24 + 8, &[0, 0, 0, 0x20, 1, 0, 0, 0])
            .unwrap();
        ap.write_obj(0x1000 + 24 + 4, 0x0fu8).unwrap();
        ap.write_obj(0x1000 + 24 + 112 + 14, 5i8).unwrap();
        assert_eq!(page.acked_features(&ap, 0).unwrap(), 1 << 32 | 1 << 29);
        assert_eq!(page.status(&ap, 0).unwrap(), 0x0f);
        assert_eq!(page.h2c_vdev_db(&ap, 0).unwrap(), Some(5));
        ap.write_obj(0x1000 + 24 + 112 + 14, 77i8).unwrap();
        assert_eq!(page.h2c_vdev_db(&ap, 0).unwrap(), None);
        assert_eq!(page.queue_vectors(&ap, 0).unwrap(), None);
        // A card that rewrites num_vq cannot change what the host uses.
        ap.write_obj(0x1000 + 25, 16u8).unwrap();
        assert_eq!(page.slots()[0].as_ref().unwrap().rings.len(), 1);
    }
}
