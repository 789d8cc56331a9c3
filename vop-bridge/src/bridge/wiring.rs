//! Starting and stopping a device: the backend gets the memory table and the
//! rings, QEMU gets the kick and call eventfds (`docs/vop-abi.md` 7.2).

use std::os::fd::{AsRawFd, RawFd};

use log::{debug, warn};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::attached::Attached;
use super::{Bridge, BridgeError, Report};
use crate::backend::RingSetup;
use crate::device_protocol::HostMessage;
use crate::event_loop::{EventLoop, Token};
use crate::net_control::{ControlQueue, RingOffsets};

/// The queue pairs a running network card uses, seen from its rings: the
/// leading pairs whose receive queue has buffers posted (at least one).
/// `avail_idx(q)` reads ring `q`'s available index; `queues` is the number
/// of receive and transmit rings.
fn pairs_in_use(
    avail_idx: impl Fn(usize) -> Result<u16, crate::page::PageError>,
    queues: usize,
) -> u16 {
    let posted = (0..queues / 2)
        .take_while(|p| avail_idx(2 * p).is_ok_and(|idx| idx != 0))
        .count();
    posted.max(1) as u16
}

/// The eventfds of a running device.
pub(super) struct Wiring {
    /// Each queue's interrupt vector (its call eventfd raises it): the
    /// queue's own or the device's (`docs/vop-abi.md` 5.7).
    pub vectors: Vec<u32>,
    /// The device's card-to-host doorbell (the kick eventfds answer it).
    pub doorbell: u8,
    /// One kick eventfd per queue.
    pub kicks: Vec<EventFd>,
    /// One call eventfd per queue.
    pub calls: Vec<EventFd>,
}

impl Wiring {
    /// A kick and a call eventfd for each queue, one per entry of `vectors`.
    fn new(vectors: Vec<u32>, doorbell: u8) -> Result<Self, BridgeError> {
        let queues = vectors.len();
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| BridgeError::Os {
                what: "eventfd",
                source,
            })
        };
        let mut w = Wiring {
            vectors,
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

    /// The queues' call eventfds with their vectors.
    fn calls_by_vector(&self) -> impl Iterator<Item = (u32, RawFd)> + '_ {
        self.vectors
            .iter()
            .zip(&self.calls)
            .map(|(v, c)| (*v, c.as_raw_fd()))
    }

    /// The distinct vectors its queues raise.
    pub fn distinct_vectors(&self) -> Vec<u32> {
        let mut v = self.vectors.clone();
        v.sort_unstable();
        v.dedup();
        v
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
        .filter_map(|(_, w)| w)
        .flat_map(|w| w.calls_by_vector().filter(|(v, _)| *v == vector))
        .map(|(_, fd)| fd)
        .collect()
}

impl Bridge {
    /// Asks the device to forget device `i`'s eventfds, keeping the call
    /// eventfds of other devices on the same vector.
    pub(super) fn unwire(&self, a: &mut Attached, i: usize, w: &Wiring) {
        a.unwire(w);
        for vector in w.distinct_vectors() {
            let others = calls_sharing(
                self.devices
                    .iter()
                    .enumerate()
                    .map(|(j, d)| (j, d.wiring.as_ref())),
                vector,
                i,
            );
            for fd in others {
                if let Err(e) = a.link.send(&HostMessage::SetVectorFd {
                    vector,
                    fd: Some(fd),
                }) {
                    warn!("rewiring vector {vector}: {e}");
                }
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
        let vectors = a
            .page
            .queue_vectors(ap, slot_index)?
            .ok_or(BridgeError::NoVector(i))?;
        let base = a.aperture_hva().ok_or(BridgeError::ApertureUnmapped)?;
        let dev = &mut self.devices[i];
        let Some(backend) = dev.backend.as_mut() else {
            debug!("device {i}: backend not connected; will start when it returns");
            return Ok(false);
        };
        let acked = a.page.acked_features(ap, slot_index)?;
        let regions = a.vhost_regions();
        let queues = backend.backend_queues(acked).min(slot.rings.len());
        let w = Wiring::new(vectors[..queues].to_vec(), slot.c2h_db)?;
        let mut setups = Vec::with_capacity(queues);
        for (q, r) in slot.rings.iter().enumerate().take(queues) {
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
        dev.inflight = backend.share_inflight(kept, queues as u16, queue_size)?;
        // The network control queue: the bridge serves it (net_control.rs),
        // and the backend runs the queue pairs the card chose through it.
        dev.net_control = match backend.net_control_queue(acked) {
            Some(c) if c < slot.rings.len() => {
                let r = slot.rings[c];
                let position = if resume {
                    a.page.used_idx(ap, slot_index, c)?
                } else {
                    0
                };
                Some(ControlQueue::new(
                    c,
                    r.num,
                    RingOffsets {
                        desc: r.desc(),
                        avail: r.avail(),
                        used: r.used(),
                    },
                    acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
                    position,
                ))
            }
            _ => None,
        };
        let enabled = if dev.net_control.is_some() && acked & (1 << VIRTIO_NET_F_MQ) != 0 {
            if !resume || dev.net_pairs == 0 {
                // Fresh: the first pair until the card sets more (virtio
                // 1.2, 5.1.6.5.5). A bridge that takes over a running card
                // does not know what it set: the pairs with receive
                // buffers posted are the ones in use.
                dev.net_pairs = if resume {
                    pairs_in_use(|q| a.page.avail_idx(ap, slot_index, q), queues)
                } else {
                    1
                };
            }
            2 * usize::from(dev.net_pairs)
        } else {
            queues
        };
        backend.start(acked, &regions, &setups, enabled)?;
        for (q, &vector) in w.vectors.iter().enumerate() {
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
            "device {i} ({}) started: {} queues, features {acked:#x}, doorbell {}, vector by queue {:?}",
            self.devices[i].name(),
            queues,
            slot.c2h_db,
            w.vectors
        );
        self.devices[i].wiring = Some(w);
        Ok(true)
    }

    /// Stops a device's rings and unwires its eventfds (`unwire`: tell the
    /// device; not needed after a reset, when it forgot them already).
    pub(super) fn stop_device(&mut self, a: Option<&mut Attached>, i: usize, unwire: bool) {
        self.devices[i].net_control = None;
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
    fn pairs_in_use_are_those_with_receive_buffers() {
        let rings = |idx: [u16; 6]| move |q: usize| Ok(idx[q]);
        assert_eq!(pairs_in_use(rings([256, 3, 0, 0, 0, 0]), 6), 1);
        assert_eq!(pairs_in_use(rings([256, 3, 256, 0, 0, 0]), 6), 2);
        assert_eq!(pairs_in_use(rings([256, 0, 256, 0, 256, 9]), 6), 3);
        // Nothing posted yet: the first pair, as on a fresh start.
        assert_eq!(pairs_in_use(rings([0; 6]), 6), 1);
    }

    #[test]
    fn queues_keep_their_own_vectors() {
        let w = Wiring::new(vec![5, 6, 5, 9], 0).unwrap();
        assert_eq!(w.kicks.len(), 4);
        assert_eq!(w.distinct_vectors(), vec![5, 6, 9]);
        let all = [Some(&w)];
        assert_eq!(
            calls_sharing(all.iter().copied().enumerate(), 5, 7),
            vec![w.calls[0].as_raw_fd(), w.calls[2].as_raw_fd()]
        );
    }

    #[test]
    fn unwiring_keeps_the_calls_of_devices_sharing_the_vector() {
        let a = Wiring::new(vec![3, 3], 0).unwrap();
        let b = Wiring::new(vec![3], 1).unwrap();
        let c = Wiring::new(vec![4], 2).unwrap();
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
