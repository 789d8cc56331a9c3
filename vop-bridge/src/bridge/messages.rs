//! The device's messages (`docs/device-protocol.md`): register writes, the
//! card's lifecycle events, memory tables, and the control doorbells through
//! which the card's driver drives each device (`docs/vop-abi.md` 7.2, 7.3).

use log::{debug, error, info};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;

use super::attached::Attached;
use super::device::DeviceEvent;
use super::{Bridge, BridgeError, Ended, Report};
use crate::abi::{reg, DoorbellValue};
use crate::card::CardInput;
use crate::device_protocol::{CardRam, DeviceMessage, ProtocolError};
use crate::event_loop::EventLoop;

/// The first and last differing byte of two config spaces.
pub(super) fn changed_range(new: &[u8], old: &[u8]) -> Option<(usize, usize)> {
    let first = new.iter().zip(old).position(|(x, y)| x != y);
    let first = match first {
        Some(f) => f,
        // Same common prefix: a length change counts as a change of byte 0.
        None if new.len() != old.len() && !new.is_empty() => 0,
        None => return None,
    };
    let last = new
        .iter()
        .zip(old)
        .rposition(|(x, y)| x != y)
        .unwrap_or(first);
    Some((first, last))
}

impl Bridge {
    /// The device link is readable.
    pub(super) fn on_link(
        &mut self,
        ev: &EventLoop,
        a: &mut Attached,
    ) -> Result<Option<Ended>, BridgeError> {
        match a.link.recv() {
            Ok(m) => self.on_message(ev, a, m),
            Err(ProtocolError::Closed) => {
                info!("the device closed the connection");
                Ok(Some(if self.exits_on_close() {
                    Ended::Exit
                } else {
                    Ended::Detached
                }))
            }
            Err(e) => {
                error!("device link: {e}; reattaching");
                Ok(Some(Ended::Detached))
            }
        }
    }

    /// One message from the device.
    pub(super) fn on_message(
        &mut self,
        ev: &EventLoop,
        a: &mut Attached,
        m: DeviceMessage,
    ) -> Result<Option<Ended>, BridgeError> {
        match m {
            DeviceMessage::RegWrite { offset, value } => match offset {
                reg::CARD_STATE => self.set_state(CardInput::CardStateWritten(value)),
                reg::SHUTDOWN_STATUS => self.set_state(CardInput::ShutdownStatusWritten(value)),
                _ => debug!("card wrote {value:#x} to register {offset:#x}"),
            },
            DeviceMessage::Doorbell { doorbell, value } => {
                let Some(i) = self.device_on_doorbell(a, doorbell) else {
                    crate::limited!(
                        self.card_lines,
                        ("unowned doorbell", doorbell),
                        warn,
                        "card rang doorbell {doorbell} ({value:#x}), which no device owns"
                    );
                    return Ok(None);
                };
                match DoorbellValue::from(value) {
                    DoorbellValue::Control => {
                        if let Err(e) = self.device_control(ev, a, i) {
                            crate::limited!(
                                self.card_lines,
                                ("control doorbell", i as u32),
                                error,
                                "device {i} ({}): {}",
                                self.devices[i].name(),
                                Report(&e)
                            );
                        }
                    }
                    DoorbellValue::Kick(q) => self.device_kick(a, i, q),
                    DoorbellValue::Reserved(v) => {
                        crate::limited!(
                            self.card_lines,
                            ("reserved doorbell value", i as u32),
                            warn,
                            "device {i}: reserved doorbell value {v:#x} ignored"
                        )
                    }
                }
            }
            DeviceMessage::CardEvent(e) => return self.on_card_event(ev, a, e),
            DeviceMessage::MemTable(table) => {
                a.att.ram = CardRam::map(table)?;
                debug!("new memory table: {:?}", a.att.ram.table());
                let regions = a.vhost_regions();
                for d in self.devices.iter_mut().filter(|d| d.state.running()) {
                    if let Some(b) = d.backend.as_mut() {
                        if let Err(e) = b.set_mem_table(&regions) {
                            error!("{}", Report(&e));
                        }
                    }
                }
            }
            DeviceMessage::Error {
                request_type,
                errno,
                text,
            } => {
                error!("device refused request {request_type}: {text} (errno {errno})")
            }
            DeviceMessage::Hello(..) | DeviceMessage::Sync(_) => {}
            DeviceMessage::Unknown(t) => debug!("skipped device message type {t}"),
        }
        Ok(None)
    }

    /// The device whose slot owns card-to-host doorbell `db`.
    fn device_on_doorbell(&self, a: &Attached, db: u32) -> Option<usize> {
        let slot = a.slot_on_doorbell(db)?;
        self.devices
            .iter()
            .position(|d| d.state.slot() == Some(slot))
    }

    /// The card rang a device's control doorbell: a reset request, a config
    /// write or a status change.
    fn device_control(
        &mut self,
        ev: &EventLoop,
        a: &mut Attached,
        i: usize,
    ) -> Result<(), BridgeError> {
        let slot = self.slot(i)?;
        let ap = &a.att.aperture;
        let unused = crate::page::unused_fields(ap, &a.page, slot);
        if unused.used_address_updated {
            crate::limited!(
                self.card_lines,
                ("used_address_updated", i as u32),
                warn,
                "device {i}: card set used_address_updated; ignored (rings stay in the aperture)"
            );
        }
        for q in unused.used_address {
            crate::limited!(
                self.card_lines,
                ("used_address", i as u32),
                warn,
                "device {i} queue {q}: card wrote used_address; ignored"
            );
        }
        let ctrl = a.page.ctrl(ap, slot)?;
        if ctrl.vdev_reset != 0 {
            // docs/vop-abi.md 7.3
            return self.apply(ev, Some(a), i, DeviceEvent::VdevReset);
        }
        let status = a.page.status(ap, slot)?;
        if u32::from(status) & VIRTIO_CONFIG_S_FAILED != 0 {
            crate::limited!(
                self.card_lines,
                ("driver failed", i as u32),
                warn,
                "device {i}: the card's driver failed (status {status:#x})"
            );
        }
        let config = a.page.config(ap, slot)?;
        let d = &mut self.devices[i];
        if let Some((first, last)) = changed_range(&config, &d.last_config) {
            d.last_config = config.clone();
            // `changed_range` stays inside `config`; `get` keeps a slip from
            // ever panicking on card-sized data.
            if let (Some(b), Some(bytes)) = (d.backend.as_mut(), config.get(first..=last)) {
                b.set_config(first as u32, bytes)?;
            }
        }
        self.apply(ev, Some(a), i, DeviceEvent::Status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::changed_range;

    #[test]
    fn config_changes_are_bounded() {
        assert_eq!(changed_range(&[1, 2, 3, 4], &[1, 2, 3, 4]), None);
        assert_eq!(changed_range(&[1, 9, 3, 8], &[1, 2, 3, 4]), Some((1, 3)));
        assert_eq!(changed_range(&[0, 0, 7, 0], &[0, 0, 0, 0]), Some((2, 2)));
        assert_eq!(changed_range(&[1, 2], &[1, 2, 3]), Some((0, 0)));
        assert_eq!(changed_range(&[], &[1]), None);
        // An adopted slot with no config space against a longer last-known
        // config (a backend config change before a control doorbell).
        assert_eq!(changed_range(&[], &(0..60).collect::<Vec<u8>>()), None);
        for (new, old) in [(vec![9u8], vec![1u8, 2, 3]), (vec![1, 2, 3], vec![9])] {
            let (first, last) = changed_range(&new, &old).unwrap();
            assert!(first <= last && last < new.len(), "{new:?} vs {old:?}");
        }
    }
}
