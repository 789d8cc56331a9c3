//! What exists while the bridge is attached to the device (the link, the
//! mapped aperture and card RAM, the device page), and the steps that only
//! need those: publishing the page, raising the config doorbell, the page
//! writes of resets, removals and config changes.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use log::{debug, info};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::device::driver_ok;
use super::wiring::Wiring;
use super::BridgeError;
use crate::abi::{self, reg};
use crate::device_protocol::{Attachment, DeviceLink, HostMessage, ProtocolError};
use crate::page::{ctrl_field, DevicePage};

/// The link, the mapped memory and the device page of one attachment.
pub(super) struct Attached {
    pub link: DeviceLink,
    pub att: Attachment,
    pub page: DevicePage,
    /// Device and inode of the aperture's file, to find it in the memory table.
    pub aperture_id: (u64, u64),
}

impl Attached {
    /// Identifies the aperture's file (`fstat`).
    pub fn aperture_id(att: &Attachment) -> Result<(u64, u64), BridgeError> {
        let meta = att
            .aperture
            .file()
            .metadata()
            .map_err(|source| BridgeError::Os {
                what: "fstat",
                source,
            })?;
        Ok((meta.dev(), meta.ino()))
    }

    /// Tells the card where the page is (`docs/vop-abi.md` 7.1).
    pub fn publish(&mut self) -> Result<(), BridgeError> {
        let off = self.page.offset();
        self.link.send(&HostMessage::RegWrite {
            offset: reg::spad(abi::SPAD_DP_LO),
            value: off as u32,
        })?;
        self.link.send(&HostMessage::RegWrite {
            offset: reg::spad(abi::SPAD_DP_HI),
            value: (off >> 32) as u32,
        })?;
        self.link.sync()?;
        self.link
            .send(&HostMessage::RaiseVector(abi::CONTROL_VECTOR))?;
        info!("device page published at aperture offset {off:#x}");
        Ok(())
    }

    /// Raises the card's `h2c_config_db` (device added, removed, changed).
    pub fn notify_config(&mut self) -> Result<(), BridgeError> {
        match self.page.h2c_config_db(&self.att.aperture)? {
            Some(v) => self.link.send(&HostMessage::RaiseVector(v))?,
            None => debug!("the card has no config vector yet; it scans the page when it has one"),
        }
        Ok(())
    }

    /// Asks the card to power off (`docs/vop-abi.md` section 6).
    pub fn request_shutdown(&mut self) -> Result<(), ProtocolError> {
        self.link.send(&HostMessage::RegWrite {
            offset: reg::HOST_REQUEST,
            value: reg::HOST_REQUEST_SHUTDOWN,
        })?;
        self.link.sync()?;
        self.link
            .send(&HostMessage::RaiseVector(abi::CONTROL_VECTOR))
    }

    /// The slot whose card-to-host doorbell is `db`.
    pub fn slot_on_doorbell(&self, db: u32) -> Option<usize> {
        self.page
            .slots()
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| u32::from(s.c2h_db) == db))
    }

    /// Whether the card's driver runs the device in `slot`.
    pub fn driver_ok(&self, slot: usize) -> bool {
        self.page
            .status(&self.att.aperture, slot)
            .is_ok_and(driver_ok)
    }

    /// Where the aperture's offset 0 would be in the memory table, as
    /// `(guest physical address, userspace address)`, while the card has
    /// BAR2 mapped.
    fn aperture_base(&self) -> Option<(u64, u64)> {
        self.att.ram.memory().iter().find_map(|r| {
            let fo = r.file_offset()?;
            let m = fo.file().metadata().ok()?;
            ((m.dev(), m.ino()) == self.aperture_id).then(|| {
                (
                    r.start_addr().0.wrapping_sub(fo.start()),
                    (r.as_ptr() as u64).wrapping_sub(fo.start()),
                )
            })
        })
    }

    /// Base of the aperture in the memory table's userspace addresses.
    pub fn aperture_hva(&self) -> Option<u64> {
        self.aperture_base().map(|(_, hva)| hva)
    }

    /// Guest physical address of the aperture (BAR2), while the card has
    /// it mapped.
    pub fn aperture_gpa(&self) -> Option<u64> {
        self.aperture_base().map(|(gpa, _)| gpa)
    }

    /// The card's RAM as a vhost-user memory table.
    pub fn vhost_regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.att
            .ram
            .memory()
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                })
            })
            .collect()
    }

    /// Asks the device to forget a device's kick and call eventfds.
    pub fn unwire(&mut self, w: &Wiring) {
        for q in 0..w.kicks.len() {
            let _ = self.link.send(&HostMessage::SetDoorbellFd {
                doorbell: u32::from(w.doorbell),
                value: q as u32,
                fd: None,
            });
        }
        for vector in w.distinct_vectors() {
            let _ = self
                .link
                .send(&HostMessage::SetVectorFd { vector, fd: None });
        }
    }

    /// Completes the card's device reset in the page (`docs/vop-abi.md` 7.3).
    pub fn ack_device_reset(&mut self, i: usize, slot: usize) -> Result<(), BridgeError> {
        let ap = &self.att.aperture;
        self.page.reset_rings(ap, slot)?;
        self.page.set_status(ap, slot, 0)?;
        self.page
            .set_ctrl_byte(ap, slot, ctrl_field::VDEV_RESET, 0)?;
        self.page.set_ctrl_byte(ap, slot, ctrl_field::HOST_ACK, 1)?;
        // Logged by the caller, through the card's log limit.
        debug!("device {i} reset by the card");
        Ok(())
    }

    /// Hot removal, first half (`docs/vop-abi.md` 7.5): ask the card.
    pub fn ask_removal(&mut self, slot: usize) -> Result<(), BridgeError> {
        self.signal_change(slot, abi::CONFIG_CHANGE_REMOVE)
    }

    /// Clears the slot's `guest_ack`, sets its `config_change` to `what`
    /// and raises `h2c_config_db` (`docs/vop-abi.md` 7.5, 7.6).
    fn signal_change(&mut self, slot: usize, what: u8) -> Result<(), BridgeError> {
        let ap = &self.att.aperture;
        self.page
            .set_ctrl_byte(ap, slot, ctrl_field::GUEST_ACK, 0)?;
        self.page
            .set_ctrl_byte(ap, slot, ctrl_field::CONFIG_CHANGE, what)?;
        self.notify_config()
    }

    /// Whether the card acknowledged a removal.
    pub fn removal_acked(&self, slot: usize) -> bool {
        self.page
            .ctrl(&self.att.aperture, slot)
            .is_ok_and(|c| c.guest_ack != 0)
    }

    /// Hot removal, second half: the slot is cleared and marked removed.
    pub fn remove_slot(&mut self, slot: usize) -> Result<(), BridgeError> {
        let ap = &self.att.aperture;
        let _ = self
            .page
            .set_ctrl_byte(ap, slot, ctrl_field::CONFIG_CHANGE, 0);
        let _ = self.page.set_ctrl_byte(ap, slot, ctrl_field::GUEST_ACK, 0);
        self.page.remove(ap, slot)?;
        Ok(())
    }

    /// `docs/vop-abi.md` 7.6: new config, `config_change = 2`, raise
    /// `h2c_config_db`.
    pub fn config_changed(&mut self, slot: usize, cfg: &[u8]) -> Result<(), BridgeError> {
        self.page.write_config(&self.att.aperture, slot, cfg)?;
        self.signal_change(slot, abi::CONFIG_CHANGE_CONFIG)
    }

    /// Clears a config change the card acknowledged (`docs/vop-abi.md` 7.6).
    pub fn finish_config_change(&mut self, slot: usize) {
        let ap = &self.att.aperture;
        if let Ok(ctrl) = self.page.ctrl(ap, slot) {
            if ctrl.config_change == abi::CONFIG_CHANGE_CONFIG && ctrl.guest_ack != 0 {
                let _ = self
                    .page
                    .set_ctrl_byte(ap, slot, ctrl_field::CONFIG_CHANGE, 0);
                let _ = self.page.set_ctrl_byte(ap, slot, ctrl_field::GUEST_ACK, 0);
            }
        }
    }
}
