//! Answers to the control socket's requests (the protocol is in
//! [`crate::control`]).

use std::os::fd::AsRawFd;
use std::time::Instant;

use log::{debug, info, warn};
use vmm_sys_util::epoll::EventSet;

use super::attached::Attached;
use super::{Bridge, BridgeError, Report};
use crate::backend::BackendError;
use crate::card::CardInput;
use crate::control::{ClientRead, ControlRequest, MAX_CLIENTS};
use crate::device_protocol::ProtocolError;
use crate::event_loop::{EventLoop, Token};

/// Why a control request failed (answered as `error: <why>`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request needs the card and the bridge is not attached.
    #[error("the card is not attached")]
    NotAttached,
    /// No device has that index.
    #[error("no device {0}")]
    NoDevice(usize),
    /// The device is being removed already.
    #[error("device {0} is being removed already")]
    RemovalPending(usize),
    /// The device has no slot in the page.
    #[error("device {0} is not in the device page")]
    NotPlaced(usize),
    /// The device's backend is not connected.
    #[error("device {0} has no backend connected")]
    NoBackend(usize),
    /// The device's backend does not share its config space.
    #[error("device {0}'s backend has no config space to read")]
    NoConfig(usize),
    /// The backend could not be used.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The device link failed.
    #[error(transparent)]
    Link(#[from] ProtocolError),
    /// Something else in the bridge failed.
    #[error(transparent)]
    Bridge(#[from] BridgeError),
}

/// The answer line for a request's outcome.
pub(super) fn reply_text(reply: Result<String, ControlError>) -> String {
    match reply {
        Ok(text) => format!("{text}\n"),
        Err(e) => format!("error: {}\n", Report(&e)),
    }
}

impl Bridge {
    /// The control socket has connections: accept them and watch each one
    /// for its request line (never reading here, so a slow client cannot
    /// hold the loop).
    pub(super) fn on_control(&mut self, ev: &EventLoop) {
        loop {
            let Some(server) = &self.control else {
                return;
            };
            let Some(client) = server.accept_client() else {
                return;
            };
            if self.clients.len() >= MAX_CLIENTS {
                warn!("control socket: {MAX_CLIENTS} connections pending; one refused");
                continue;
            }
            let mut id = self.next_client;
            while self.clients.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            self.next_client = id.wrapping_add(1);
            let token = Token::ControlClient {
                card: self.card_id,
                client: id,
            };
            if let Err(e) = ev.add(client.as_raw_fd(), token, EventSet::IN) {
                warn!("control socket: {}", Report(&e));
                continue;
            }
            self.clients.insert(id, client);
        }
    }

    /// A control connection is readable: answer it once its line is in.
    pub(super) fn on_control_client(&mut self, ev: &EventLoop, a: Option<&mut Attached>, id: u16) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        match client.read() {
            ClientRead::Pending => {}
            ClientRead::Done => self.drop_client(ev, id),
            ClientRead::Request(req, conn) => {
                self.drop_client(ev, id);
                let reply = self.answer(ev, a, req);
                conn.reply(&reply_text(reply));
            }
        }
    }

    /// Closes control connections that had their time.
    pub(super) fn expire_clients(&mut self, ev: &EventLoop, now: Instant) {
        let late: Vec<u16> = self
            .clients
            .iter()
            .filter(|(_, c)| c.expired(now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            debug!("control socket: connection {id} sent no request in time; closed");
            self.drop_client(ev, id);
        }
    }

    fn drop_client(&mut self, ev: &EventLoop, id: u16) {
        if let Some(c) = self.clients.remove(&id) {
            ev.remove(c.as_raw_fd());
        }
    }

    fn answer(
        &mut self,
        ev: &EventLoop,
        a: Option<&mut Attached>,
        req: ControlRequest,
    ) -> Result<String, ControlError> {
        match (req, a) {
            (ControlRequest::Status, _) => Ok(self.status_line()),
            (ControlRequest::Heartbeat, _) => Ok(self.heartbeat.report(Instant::now()).to_string()),
            (ControlRequest::Devices, _) => Ok(self.device_list()),
            (ControlRequest::History, _) => Ok(self.history.lines()),
            (ControlRequest::Config(i), _) => self.backend_config(i),
            (_, None) => Err(ControlError::NotAttached),
            (ControlRequest::Shutdown, Some(a)) => {
                a.request_shutdown()?;
                self.set_state(CardInput::ShutdownRequested);
                info!("shutdown requested");
                Ok(self.status_line())
            }
            (ControlRequest::Add(kind, socket), Some(a)) => {
                let i = self.hot_add(ev, a, kind, socket)?;
                Ok(format!("added device {i}"))
            }
            (ControlRequest::Remove(i), Some(a)) => {
                self.hot_remove(ev, a, i)?;
                Ok(format!("removing device {i}"))
            }
        }
    }

    /// `config <index>`: the backend's config space, asked for now, in hex
    /// (what a restarted backend runs with, e.g. mic-blk's write cache).
    fn backend_config(&mut self, i: usize) -> Result<String, ControlError> {
        let device = self.devices.get_mut(i).ok_or(ControlError::NoDevice(i))?;
        let backend = device.backend.as_mut().ok_or(ControlError::NoBackend(i))?;
        let config = backend.fetch_config()?.ok_or(ControlError::NoConfig(i))?;
        Ok(config.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// `devices`: `<index> <type> <socket> <running|stopped|removing>
    /// reconnects=<n>`, `n` being how many times the device's backend came
    /// back after going away.
    fn device_list(&self) -> String {
        let lines: Vec<String> = self
            .devices
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let state = d.state.describe()?;
                Some(format!(
                    "{i} {} {} {state} reconnects={}",
                    d.name(),
                    d.cfg.socket.display(),
                    d.reconnects
                ))
            })
            .collect();
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_one_line_each() {
        assert_eq!(reply_text(Ok("added device 3".into())), "added device 3\n");
        assert_eq!(
            reply_text(Err(ControlError::NotAttached)),
            "error: the card is not attached\n"
        );
        assert_eq!(
            reply_text(Err(ControlError::RemovalPending(2))),
            "error: device 2 is being removed already\n"
        );
        assert_eq!(
            reply_text(Err(ControlError::NoDevice(9))),
            "error: no device 9\n"
        );
    }

    #[test]
    fn wrapped_errors_keep_their_cause() {
        let e = ControlError::from(BridgeError::Os {
            what: "eventfd",
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        });
        let text = reply_text(Err(e));
        assert!(text.starts_with("error: eventfd: "), "{text}");
        assert_eq!(text.matches('\n').count(), 1);
    }
}
