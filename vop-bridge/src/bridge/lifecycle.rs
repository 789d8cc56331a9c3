//! Attaching to the device (building a fresh page or adopting the card's),
//! the card's lifecycle events, and letting go of the device.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vmm_sys_util::epoll::EventSet;

use super::attached::Attached;
use super::device::DeviceEvent;
use super::Event;
use super::{Bridge, BridgeError, Detached, Ended, Report};
use crate::abi::{self, CardState};
use crate::backend::Backend;
use crate::card::{CardInput, CardTracker};
use crate::device_protocol::{Attachment, CardEvent, DeviceLink};
use crate::event_loop::{EventLoop, Flow, Token};
use crate::page::DevicePage;

/// How long to wait before attaching again after a failed attach.
const ATTACH_RETRY: Duration = Duration::from_millis(200);

impl Bridge {
    /// Tries the device socket once; attaches when it answers.
    pub(super) fn try_attach(&mut self, ev: &EventLoop) -> Result<Flow, BridgeError> {
        let path = &self.cfg.device_socket;
        let link = match DeviceLink::connect(path) {
            Ok(l) => l,
            Err(e) => {
                let d = &mut self.detached;
                if !d.warned && Instant::now() > d.warn_after {
                    warn!(
                        "still waiting for the device socket {}: {e}",
                        path.display()
                    );
                    d.warned = true;
                }
                return Ok(Flow::Continue);
            }
        };
        let a = match self.attach(ev, link) {
            Ok(a) => a,
            // The device may be going away (QEMU exiting): try again.
            Err(e) if e.is_link() => {
                warn!("attaching to the device failed: {}; retrying", Report(&e));
                self.detached.retry_at = Instant::now() + ATTACH_RETRY;
                return Ok(Flow::Continue);
            }
            Err(e) => return Err(e),
        };
        ev.add(
            a.link.as_raw_fd(),
            Token::Link { card: self.card_id },
            EventSet::IN,
        )?;
        self.attached = Some(a);
        self.next_check = Instant::now() + super::DEVICE_CHECK;
        // Messages queued while attaching come first.
        self.with_attached(ev, |_, _, _| Ok(None))
    }

    fn attach(&mut self, ev: &EventLoop, mut link: DeviceLink) -> Result<Attached, BridgeError> {
        let att = link.attach()?;
        let h = &att.hello;
        info!(
            "attached to card node {} (aperture {} KiB, vCPUs {})",
            h.node_id,
            att.aperture.size() >> 10,
            if h.running { "running" } else { "stopped" }
        );
        self.card = CardTracker::from_snapshot(h.running, h.card_state, h.shutdown_status);
        info!(
            "card state: {} ({})",
            self.card.state(),
            self.card.shutdown_status()
        );
        let aperture_id = Attached::aperture_id(&att)?;
        let page = match h.device_page_offset() {
            Some(off) => match self.adopt(&att, off) {
                Ok(page) => Ok(page),
                // The card writes SPAD14/15 at will: a page we cannot use is
                // replaced, never fatal (docs/architecture.md, "Reattaching").
                Err(e) if !e.is_link() => {
                    warn!(
                        "the card's device page at {off:#x} cannot be adopted: {}; \
                         publishing a fresh one",
                        Report(&e)
                    );
                    Err(fresh_page_offset(off))
                }
                Err(e) => return Err(e),
            },
            None => Err(abi::DP_DEFAULT_OFFSET),
        };
        let (page, adopted) = match page {
            Ok(page) => (page, true),
            Err(off) => (
                DevicePage::build(&att.aperture, off, h.node_id as u8)?,
                false,
            ),
        };
        self.history.push(Event::Attached { adopted });
        let mut a = Attached {
            link,
            att,
            page,
            aperture_id,
        };
        if adopted {
            // Reattach: resume devices the card is using.
            for i in 0..self.devices.len() {
                let driver_ok = a.driver_ok(self.slot(i)?);
                if let Err(e) = self.apply(ev, Some(&mut a), i, DeviceEvent::Resumed { driver_ok })
                {
                    error!(
                        "{}: cannot resume: {}",
                        self.devices[i].cfg.socket.display(),
                        Report(&e)
                    );
                }
            }
        } else {
            self.populate(&mut a)?;
            a.publish()?;
        }
        Ok(a)
    }

    /// Adopts the card's page: checks all of it against the configuration
    /// first, and only then places the devices (a refused page changes
    /// nothing).
    fn adopt(&mut self, att: &Attachment, offset: u64) -> Result<DevicePage, BridgeError> {
        let page = DevicePage::adopt(&att.aperture, offset)?;
        let live: Vec<_> = page
            .slots()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .collect();
        if live.len() != self.devices.len()
            || live
                .iter()
                .zip(&self.devices)
                .any(|((_, s), d)| s.device_type != d.cfg.kind.virtio_id())
        {
            return Err(BridgeError::PageMismatch {
                found: live.len(),
                configured: self.devices.len(),
            });
        }
        let mut configs = Vec::with_capacity(live.len());
        for ((slot, s), d) in live.iter().zip(&self.devices) {
            if let Some(b) = &d.backend {
                if b.card_queues() != s.rings.len() {
                    return Err(BridgeError::QueueMismatch {
                        socket: d.cfg.socket.clone(),
                        backend: b.card_queues(),
                        page: s.rings.len(),
                    });
                }
            }
            configs.push(page.config(&att.aperture, *slot)?);
        }
        for (((slot, _), d), config) in live.into_iter().zip(self.devices.iter_mut()).zip(configs) {
            d.state.apply(DeviceEvent::Placed(slot));
            d.last_config = config;
        }
        info!("adopted the card's device page at {offset:#x}");
        Ok(page)
    }

    /// Adds every device whose backend is connected to the page.
    fn populate(&mut self, a: &mut Attached) -> Result<(), BridgeError> {
        for d in self.devices.iter_mut() {
            let Some(b) = &d.backend else {
                continue;
            };
            let spec = b.spec(d.queue_size);
            let slot = a.page.add(&a.att.aperture, &spec)?;
            d.state.apply(DeviceEvent::Placed(slot));
            d.last_config = spec.config;
            let doorbell = a.page.slots()[slot].as_ref().map_or(0, |s| s.c2h_db);
            info!(
                "device {slot} ({}, {} queues of {}) on doorbell {doorbell}",
                d.cfg.kind.name(),
                spec.queue_sizes.len(),
                d.queue_size,
            );
        }
        Ok(())
    }

    /// Moves the card's state and logs the change.
    pub(super) fn set_state(&mut self, input: CardInput) {
        if let Some(s) = self.card.apply(input) {
            self.history
                .push(Event::State(s, self.card.shutdown_status()));
            crate::limited!(
                self.state_lines,
                ("card state", 0),
                info,
                "card state: {s} (shutdown status {})",
                self.card.shutdown_status()
            );
        }
    }

    /// The card started, stopped, powered off or was reset.
    pub(super) fn on_card_event(
        &mut self,
        ev: &EventLoop,
        a: &mut Attached,
        event: CardEvent,
    ) -> Result<Option<Ended>, BridgeError> {
        match event {
            CardEvent::Run => self.set_state(CardInput::Run),
            CardEvent::Stop => log::debug!("card paused"),
            CardEvent::Unknown(v) => log::debug!("unknown card event {v}"),
            CardEvent::PowerOff => {
                for i in 0..self.devices.len() {
                    let actions = self.devices[i].state.apply(DeviceEvent::PowerOff);
                    self.perform_logged(ev, Some(a), i, &actions);
                }
                self.set_state(CardInput::PowerOff);
                info!("card powered off ({})", self.card.shutdown_status());
                if self.cfg.exit_on_poweroff {
                    return Ok(Some(Ended::Exit));
                }
            }
            CardEvent::Reset => {
                self.set_state(CardInput::Reset);
                match self.rebuild(ev, a) {
                    Ok(()) => self.set_state(CardInput::PageRebuilt),
                    Err(e) => {
                        error!(
                            "rebuilding the device page after a reset failed: {}",
                            Report(&e)
                        );
                        self.set_state(CardInput::RebuildFailed);
                    }
                }
            }
        }
        Ok(None)
    }

    /// After a card reset: fresh backends (their device state reset), a fresh page.
    fn rebuild(&mut self, ev: &EventLoop, a: &mut Attached) -> Result<(), BridgeError> {
        self.reconnect_backends(ev)?;
        a.page = DevicePage::build(
            &a.att.aperture,
            abi::DP_DEFAULT_OFFSET,
            a.att.hello.node_id as u8,
        )?;
        self.populate(a)?;
        a.publish()
    }

    /// Reconnects every backend, so each serves the next card (or the next
    /// boot) from a clean device state. Hot-removed devices are dropped and
    /// the remaining ones renumbered.
    fn reconnect_backends(&mut self, ev: &EventLoop) -> Result<(), BridgeError> {
        let timeout = Duration::from_secs(self.cfg.connect_timeout);
        let removed: Vec<bool> = self.devices.iter().map(|d| d.state.removed()).collect();
        for i in 0..self.devices.len() {
            // The device forgot our eventfds (reset) or is gone (detach).
            let actions = self.devices[i].state.apply(DeviceEvent::CardReset);
            self.perform_logged(ev, None, i, &actions);
            // Indices change below: no fd may keep its old token.
            self.drop_backend(ev, i);
        }
        let mut keep = removed.iter().map(|r| !r);
        self.devices.retain(|_| keep.next().unwrap_or(true));
        for i in 0..self.devices.len() {
            let d = &mut self.devices[i];
            d.backend = Some(Backend::connect(d.cfg.kind, &d.cfg.socket, timeout)?);
            d.state
                .apply(DeviceEvent::BackendConnected { driver_ok: false });
            self.watch_backend(ev, i)?;
        }
        Ok(())
    }

    /// Lets go of the device link: stops every device, then either ends
    /// (`Exit`) or reconnects the backends and waits for the device again.
    pub(super) fn end(
        &mut self,
        ev: &EventLoop,
        mut a: Attached,
        how: Ended,
    ) -> Result<Flow, BridgeError> {
        ev.remove(a.link.as_raw_fd());
        for i in 0..self.devices.len() {
            let actions = self.devices[i].state.apply(DeviceEvent::Detached);
            self.perform_logged(ev, Some(&mut a), i, &actions);
        }
        drop(a);
        if how == Ended::Exit {
            return Ok(Flow::Stop);
        }
        info!("device detached; waiting for it to come back");
        self.history.push(Event::Detached);
        if let Err(e) = self.reconnect_backends(ev) {
            error!("reconnecting backends: {}", Report(&e));
        }
        self.detached = Detached::new(self.cfg.connect_timeout);
        self.try_attach(ev)
    }

    /// The card's state as the control socket reports it.
    pub(super) fn status_line(&self) -> String {
        format!(
            "state={} shutdown_status={}",
            self.card.state(),
            self.card.shutdown_status()
        )
    }

    /// Whether a closed link means the card is gone for good.
    pub(super) fn exits_on_close(&self) -> bool {
        self.card.state() == CardState::Ready && self.cfg.exit_on_poweroff
    }
}

/// Where a fresh page goes when the card's page at `rejected` could not be
/// adopted: never at the same offset, so the card sees the page move and
/// drops the devices it had (`docs/vop-abi.md` section 2).
fn fresh_page_offset(rejected: u64) -> u64 {
    if rejected == abi::DP_DEFAULT_OFFSET {
        abi::DP_DEFAULT_OFFSET + abi::DP_SIZE as u64
    } else {
        abi::DP_DEFAULT_OFFSET
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_page_never_reuses_the_rejected_offset() {
        assert_eq!(fresh_page_offset(0), abi::DP_DEFAULT_OFFSET);
        assert_eq!(fresh_page_offset(u64::MAX), abi::DP_DEFAULT_OFFSET);
        assert_ne!(
            fresh_page_offset(abi::DP_DEFAULT_OFFSET),
            abi::DP_DEFAULT_OFFSET
        );
        assert!(fresh_page_offset(abi::DP_DEFAULT_OFFSET).is_multiple_of(4096));
    }
}
