//! A device's backend going away, coming back, and its requests (vhost-user
//! `CONFIG_CHANGE_MSG`).

use std::time::Duration;

use log::{debug, error, info, warn};

use super::attached::Attached;
use super::device::DeviceEvent;
use super::Event;
use super::{Bridge, Report};
use crate::backend::Backend;
use crate::event_loop::EventLoop;

impl Bridge {
    /// Device `i`'s backend socket hung up: its device stalls until the
    /// backend is back.
    pub(super) fn on_backend_gone(&mut self, ev: &EventLoop, a: Option<&mut Attached>, i: usize) {
        let Some(d) = self.devices.get(i) else {
            return;
        };
        error!(
            "{} backend {} went away; its device stalls until the backend is back",
            d.name(),
            d.cfg.socket.display()
        );
        let was_running = d.state.running();
        self.history.push(Event::BackendLost(i));
        let actions = self.devices[i].state.apply(DeviceEvent::BackendLost);
        self.perform_logged(ev, a, i, &actions);
        // Whatever the state said, the socket is dead: stop watching it.
        self.drop_backend(ev, i);
        if was_running {
            debug!("device {i} will resume from the rings' used indices");
        }
    }

    /// Device `i`'s backend sent a request; a config change goes to the card.
    pub(super) fn on_backend_request(
        &mut self,
        ev: &EventLoop,
        a: Option<&mut Attached>,
        i: usize,
    ) {
        let Some(d) = self.devices.get_mut(i) else {
            return;
        };
        let Some(b) = d.backend.as_mut() else {
            return;
        };
        match b.handle_request() {
            Ok(Some(cfg)) => {
                if let (Some(slot), Some(a)) = (d.state.slot(), a) {
                    match a.config_changed(slot, &cfg) {
                        Ok(()) => {
                            info!(
                                "device {i} ({}): config change passed to the card",
                                d.name()
                            );
                            self.history.push(Event::ConfigChanged(i));
                        }
                        Err(e) => error!("config change of device {i}: {}", Report(&e)),
                    }
                    d.last_config = cfg;
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!("{}", Report(&e));
                if let Some(fd) = b.request_fd() {
                    ev.remove(fd);
                }
            }
        }
    }

    /// Tries device `i`'s backend again; resumes the device if the card runs it.
    pub(super) fn reconnect(&mut self, ev: &EventLoop, a: Option<&mut Attached>, i: usize) {
        let d = &self.devices[i];
        match Backend::connect(d.cfg.kind, &d.cfg.socket, Duration::ZERO) {
            Ok(b) => {
                info!(
                    "{} backend {} is back",
                    d.cfg.kind.name(),
                    d.cfg.socket.display()
                );
                self.devices[i].backend = Some(b);
                self.devices[i].reconnects += 1;
                self.history.push(Event::BackendBack(i));
                if let Err(e) = self.watch_backend(ev, i) {
                    error!("{}", Report(&e));
                }
                let driver_ok = match (a.as_deref(), self.devices[i].state.slot()) {
                    (Some(a), Some(slot)) => a.driver_ok(slot),
                    _ => false,
                };
                if let Err(e) = self.apply(ev, a, i, DeviceEvent::BackendConnected { driver_ok }) {
                    error!("resuming device {i}: {}", Report(&e));
                }
            }
            Err(e) => debug!("{}", Report(&e)),
        }
    }
}
