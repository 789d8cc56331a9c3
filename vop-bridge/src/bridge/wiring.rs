//! Starting and stopping a device: the backend gets the memory table and the
//! rings, QEMU gets the kick and call eventfds (`docs/vop-abi.md` 7.2).

use std::os::fd::{AsRawFd, RawFd};

use log::{debug, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::attached::Attached;
use super::{Bridge, BridgeError, Report};
use crate::backend::RingSetup;
use crate::device_protocol::HostMessage;
use crate::event_loop::{EventLoop, Token};

/// The eventfds of a running device.
pub(super) struct Wiring {
    /// The device's interrupt vector (the call eventfds raise it).
    pub vector: u32,
    /// The device's card-to-host doorbell (the kick eventfds answer it).
    pub doorbell: u8,
    /// One kick eventfd per queue.
    pub kicks: Vec<EventFd>,
    /// One call eventfd per queue.
    pub calls: Vec<EventFd>,
}

impl Wiring {
    /// A kick and a call eventfd for each of `queues` queues.
    fn new(vector: u32, doorbell: u8, queues: usize) -> Result<Self, BridgeError> {
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| BridgeError::Os {
                what: "eventfd",
                source,
            })
        };
        let mut w = Wiring {
            vector,
            doorbell,
            kicks: Vec::with_capacity(queues),
            calls: Vec::with_capacity(queues),
        };
        for _ in 0..queues {
            w.kicks.push(eventfd()?);
            w.calls.push(eventfd()?);
        }
        Ok(w)
    }
}

/// The call eventfds other running devices have on `vector` (the card may
/// put several devices on one vector; `SET_VECTOR_FD` without an fd removes
/// every fd of the vector, so these go back after a device is unwired).
fn calls_sharing<'a>(
    wirings: impl Iterator<Item = (usize, Option<&'a Wiring>)>,
    vector: u32,
    except: usize,
) -> Vec<RawFd> {
    wirings
        .filter(|(j, _)| *j != except)
        .filter_map(|(_, w)| w.filter(|w| w.vector == vector))
        .flat_map(|w| w.calls.iter().map(|c| c.as_raw_fd()))
        .collect()
}

impl Bridge {
    /// Asks the device to forget device `i`'s eventfds, keeping the call
    /// eventfds of other devices on the same vector.
    pub(super) fn unwire(&self, a: &mut Attached, i: usize, w: &Wiring) {
        a.unwire(w);
        let others = calls_sharing(
            self.devices
                .iter()
                .enumerate()
                .map(|(j, d)| (j, d.wiring.as_ref())),
            w.vector,
            i,
        );
        for fd in others {
            if let Err(e) = a.link.send(&HostMessage::SetVectorFd {
                vector: w.vector,
                fd: Some(fd),
            }) {
                warn!("rewiring vector {}: {e}", w.vector);
            }
        }
    }

    /// Starts a device's backend (`docs/vop-abi.md` 7.2 step 3). `resume`
    /// continues from the rings' used indices (reattach, backend restart).
    /// Returns whether it started (`false`: no backend connected yet).
    pub(super) fn start_device(
        &mut self,
        a: &mut Attached,
        i: usize,
        resume: bool,
    ) -> Result<bool, BridgeError> {
        let slot_index = self.slot(i)?;
        let ap = &a.att.aperture;
        let slot = a.page.slots()[slot_index]
            .clone()
            .ok_or(BridgeError::NotPlaced(i))?;
        let vector = a
            .page
            .h2c_vdev_db(ap, slot_index)?
            .ok_or(BridgeError::NoVector(i))?;
        let base = a.aperture_hva().ok_or(BridgeError::ApertureUnmapped)?;
        let dev = &mut self.devices[i];
        let Some(backend) = dev.backend.as_mut() else {
            debug!("device {i}: backend not connected; will start when it returns");
            return Ok(false);
        };
        let acked = a.page.acked_features(ap, slot_index)?;
        let regions = a.vhost_regions();
        let w = Wiring::new(vector, slot.c2h_db, slot.rings.len())?;
        let mut setups = Vec::with_capacity(slot.rings.len());
        for (q, r) in slot.rings.iter().enumerate() {
            setups.push(RingSetup {
                num: r.num,
                desc: base + r.desc(),
                avail: base + r.avail(),
                used: base + r.used(),
                base: if resume {
                    a.page.used_idx(ap, slot_index, q)?
                } else {
                    0
                },
                kick: &w.kicks[q],
                call: &w.calls[q],
            });
        }
        // A reconnected backend starts from its defaults (mic-blk: writeback);
        // it learns the card's choices before its rings run.
        let page_config = a.page.config(ap, slot_index)?;
        backend.replay_card_config(acked, &page_config)?;
        // The in-flight region lives as long as the device's rings do: a
        // resume (backend restart, reattach) hands the kept one over, a
        // fresh start after the card reset the device asks for a new one.
        let kept = if resume { dev.inflight.take() } else { None };
        let queue_size = slot.rings.iter().map(|r| r.num).max().unwrap_or(0);
        dev.inflight = backend.share_inflight(kept, slot.rings.len() as u16, queue_size)?;
        backend.start(acked, &regions, &setups)?;
        for q in 0..slot.rings.len() {
            a.link.send(&HostMessage::SetDoorbellFd {
                doorbell: u32::from(slot.c2h_db),
                value: q as u32,
                fd: Some(w.kicks[q].as_raw_fd()),
            })?;
            a.link.send(&HostMessage::SetVectorFd {
                vector,
                fd: Some(w.calls[q].as_raw_fd()),
            })?;
        }
        a.link.sync()?;
        // Buffers posted before the rings started: look at them now.
        for k in &w.kicks {
            let _ = k.write(1);
        }
        crate::limited!(
            self.card_lines,
            ("device started", i as u32),
            info,
            "device {i} ({}) started: {} queues, features {acked:#x}, doorbell {}, vector {vector}",
            self.devices[i].name(),
            slot.rings.len(),
            slot.c2h_db
        );
        self.devices[i].wiring = Some(w);
        Ok(true)
    }

    /// Stops a device's rings and unwires its eventfds (`unwire`: tell the
    /// device; not needed after a reset, when it forgot them already).
    pub(super) fn stop_device(&mut self, a: Option<&mut Attached>, i: usize, unwire: bool) {
        let Some(w) = self.devices[i].wiring.take() else {
            return;
        };
        if let Some(b) = self.devices[i].backend.as_mut() {
            if let Err(e) = b.stop() {
                warn!("{}", Report(&e));
            }
        }
        if let (true, Some(a)) = (unwire, a) {
            self.unwire(a, i, &w);
            if let Err(e) = a.link.sync() {
                warn!("unwiring device {i}: {e}");
            }
        }
        drop(w);
        crate::limited!(
            self.card_lines,
            ("device stopped", i as u32),
            info,
            "device {i} ({}) stopped",
            self.devices[i].name()
        );
    }

    /// Watches device `i`'s backend socket and request channel.
    pub(super) fn watch_backend(&self, ev: &EventLoop, i: usize) -> Result<(), BridgeError> {
        let (card, device) = (self.card_id, i as u16);
        if let Some(b) = &self.devices[i].backend {
            ev.add(
                b.socket_fd(),
                Token::BackendSocket { card, device },
                EventSet::HANG_UP | EventSet::READ_HANG_UP,
            )?;
            if let Some(fd) = b.request_fd() {
                ev.add(fd, Token::BackendRequest { card, device }, EventSet::IN)?;
            }
        }
        Ok(())
    }

    /// Closes device `i`'s backend connection (its wiring goes with it).
    pub(super) fn drop_backend(&mut self, ev: &EventLoop, i: usize) {
        self.devices[i].wiring = None;
        if let Some(b) = self.devices[i].backend.take() {
            ev.remove(b.socket_fd());
            if let Some(fd) = b.request_fd() {
                ev.remove(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwiring_keeps_the_calls_of_devices_sharing_the_vector() {
        let a = Wiring::new(3, 0, 2).unwrap();
        let b = Wiring::new(3, 1, 1).unwrap();
        let c = Wiring::new(4, 2, 1).unwrap();
        let all = [Some(&a), Some(&b), None, Some(&c)];
        let it = || all.iter().copied().enumerate();
        // Unwiring a: b's call goes back, c is on another vector.
        assert_eq!(calls_sharing(it(), 3, 0), vec![b.calls[0].as_raw_fd()]);
        // Unwiring b: both of a's calls go back.
        assert_eq!(
            calls_sharing(it(), 3, 1),
            vec![a.calls[0].as_raw_fd(), a.calls[1].as_raw_fd()]
        );
        // Alone on its vector: nothing to restore.
        assert!(calls_sharing(it(), 4, 3).is_empty());
    }
}
