//! The bridge for one card: attaches to the `mic-x100` device, owns the
//! device page, wires each backend's rings to the card's doorbells and
//! vectors, and follows the card's lifecycle. It never touches the data path:
//! once a device runs, kicks and interrupts go between QEMU and the backend
//! through eventfds alone. The one queue it reads is a network device's
//! control queue, which vhost-user leaves to the frontend (`net_queue`).
//!
//! A [`Bridge`] owns neither the process's signals nor the event loop: it
//! registers its descriptors with an [`EventLoop`] and handles the tokens
//! that carry its card number, so one process can hold several.
//!
//! By job:
//! - [`device`]: per-device state, pure and unit-tested;
//! - `lifecycle`: attaching, adopting, card events, detaching;
//! - `messages`: the device's messages and the control doorbells;
//! - `wiring`: starting and stopping a device's rings;
//! - `net_queue`: the network control queue, the one queue the bridge
//!   serves itself;
//! - `backends`: backend loss, reconnection and requests;
//! - `hotplug`: hot add and removal;
//! - `requests`: answering the control socket;
//! - `attached`: what exists while attached, and helpers on it.

mod attached;
mod backends;
pub mod device;
mod error;
mod history;
mod hotplug;
mod lifecycle;
mod messages;
mod net_queue;
mod requests;
mod wiring;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{debug, error};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::abi::{CardState, ShutdownStatus};
use crate::backend::{Backend, InflightRegion};
use crate::card::CardTracker;
use crate::config::{BridgeConfig, DeviceConfig};
use crate::control::{ControlClient, ControlServer};
use crate::event_loop::{EventLoop, Flow, Token};
use crate::heartbeat::HeartbeatMonitor;
use crate::log_limit::LogLimiter;
use crate::net_control::ControlQueue;

use attached::Attached;
use device::{DeviceAction, DeviceEvent, DeviceState};
pub use error::{BridgeError, Report};
use history::{Event, History};
use wiring::Wiring;

/// How often the tick timer fires (also how often a detached bridge tries
/// the device socket again).
const TICK: Duration = Duration::from_millis(100);
/// How often devices are checked (removals, config acks, backend returns).
const DEVICE_CHECK: Duration = Duration::from_secs(1);

/// Card state lines per log window.
const STATE_LINES: u32 = 30;

/// One configured device.
struct Device {
    cfg: DeviceConfig,
    queue_size: u16,
    backend: Option<Backend>,
    wiring: Option<Wiring>,
    /// The backend's in-flight region, kept across its restarts for this
    /// life of the device (`backend/inflight.rs`).
    inflight: Option<InflightRegion>,
    /// A running network device's control queue (`net_control.rs`).
    net_control: Option<ControlQueue>,
    /// Queue pairs the card enabled through it (0: not known yet); kept
    /// across backend restarts.
    net_pairs: u16,
    last_config: Vec<u8>,
    state: DeviceState,
    /// Times its backend came back after going away (`devices` shows it).
    reconnects: u32,
}

impl Device {
    fn name(&self) -> &'static str {
        self.cfg.kind.name()
    }
}

/// Why the bridge let go of the device link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The card powered off with `exit_on_poweroff`.
    Exit,
    /// The device went away; attach again.
    Detached,
}

/// While detached: when to try the device socket and whether we complained.
struct Detached {
    warn_after: Instant,
    warned: bool,
    retry_at: Instant,
}

/// The bridge for one card.
pub struct Bridge {
    card_id: u16,
    cfg: BridgeConfig,
    devices: Vec<Device>,
    control: Option<ControlServer>,
    /// Control connections whose request line is still arriving.
    clients: HashMap<u16, ControlClient>,
    next_client: u16,
    card: CardTracker,
    tick: TimerFd,
    next_check: Instant,
    attached: Option<Attached>,
    detached: Detached,
    /// Lines the card causes with each doorbell or page write.
    card_lines: LogLimiter,
    /// Card state changes (a real boot makes a handful in a few seconds).
    state_lines: LogLimiter,
    /// Recent events, for `history`.
    history: History,
    /// The card's heartbeat, sampled on every tick.
    heartbeat: HeartbeatMonitor,
}

impl Bridge {
    /// Connects to every backend and opens the control socket. `card_id`
    /// tags the bridge's tokens (see [`Token::card`]).
    pub fn new(cfg: BridgeConfig, card_id: u16) -> Result<Self, BridgeError> {
        let timeout = Duration::from_secs(cfg.connect_timeout);
        let mut devices = Vec::with_capacity(cfg.devices.len());
        for d in &cfg.devices {
            let backend = Backend::connect(d.kind, &d.socket, timeout)?;
            devices.push(Device {
                cfg: d.clone(),
                queue_size: d.queue_size.unwrap_or(cfg.queue_size),
                last_config: backend.config().to_vec(),
                backend: Some(backend),
                wiring: None,
                inflight: None,
                net_control: None,
                net_pairs: 0,
                state: DeviceState::new(true),
                reconnects: 0,
            });
        }
        let control = match &cfg.control_socket {
            Some(p) => {
                Some(
                    ControlServer::bind(p).map_err(|source| BridgeError::ControlSocket {
                        path: p.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let tick = TimerFd::new().map_err(|e| BridgeError::Os {
            what: "timerfd",
            source: e.into(),
        })?;
        let detached = Detached::new(cfg.connect_timeout);
        Ok(Bridge {
            card_id,
            cfg,
            devices,
            control,
            clients: HashMap::new(),
            next_client: 0,
            card: CardTracker::from_snapshot(false, 0, 0),
            tick,
            next_check: Instant::now() + DEVICE_CHECK,
            attached: None,
            detached,
            card_lines: LogLimiter::default(),
            state_lines: LogLimiter::new(STATE_LINES, crate::log_limit::WINDOW),
            history: History::default(),
            heartbeat: HeartbeatMonitor::default(),
        })
    }

    /// The card's state and last shutdown status.
    pub fn card_state(&self) -> (CardState, ShutdownStatus) {
        (self.card.state(), self.card.shutdown_status())
    }

    /// Whether the bridge is attached to the device.
    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    /// Registers the bridge's descriptors with `ev`, starts its tick and
    /// tries the device socket once.
    pub fn register(&mut self, ev: &EventLoop) -> Result<Flow, BridgeError> {
        let card = self.card_id;
        self.tick
            .reset(TICK, Some(TICK))
            .map_err(|e| BridgeError::Os {
                what: "timerfd_settime",
                source: e.into(),
            })?;
        ev.add(self.tick.as_raw_fd(), Token::Tick { card }, EventSet::IN)?;
        if let Some(c) = &self.control {
            ev.add(c.as_raw_fd(), Token::Control { card }, EventSet::IN)?;
        }
        for i in 0..self.devices.len() {
            self.watch_backend(ev, i)?;
        }
        self.try_attach(ev)
    }

    /// Handles one of the bridge's tokens.
    pub fn handle_event(&mut self, ev: &EventLoop, token: Token) -> Result<Flow, BridgeError> {
        match token {
            Token::Link { .. } => self.with_attached(ev, |b, ev, a| b.on_link(ev, a)),
            Token::Tick { .. } => self.on_tick(ev),
            Token::Control { .. } => {
                self.on_control(ev);
                Ok(Flow::Continue)
            }
            Token::ControlClient { client, .. } => {
                let mut a = self.attached.take();
                self.on_control_client(ev, a.as_mut(), client);
                self.attached = a;
                Ok(Flow::Continue)
            }
            Token::BackendSocket { device, .. } => {
                let mut a = self.attached.take();
                self.on_backend_gone(ev, a.as_mut(), usize::from(device));
                self.attached = a;
                Ok(Flow::Continue)
            }
            Token::BackendRequest { device, .. } => {
                let mut a = self.attached.take();
                self.on_backend_request(ev, a.as_mut(), usize::from(device));
                self.attached = a;
                Ok(Flow::Continue)
            }
            Token::Signal => Ok(Flow::Continue),
        }
    }

    /// Stops every device's rings (the process is exiting).
    pub fn stop(&mut self, ev: &EventLoop) {
        if let Some(a) = self.attached.take() {
            ev.remove(a.link.as_raw_fd());
        }
        for i in 0..self.devices.len() {
            let actions = self.devices[i].state.apply(DeviceEvent::Detached);
            self.perform_logged(ev, None, i, &actions);
        }
    }

    /// Runs `f` on the attachment, then any messages that arrived while it
    /// waited for a `SYNC`; ends the attachment when `f` says so.
    fn with_attached(
        &mut self,
        ev: &EventLoop,
        f: impl FnOnce(&mut Self, &EventLoop, &mut Attached) -> Result<Option<Ended>, BridgeError>,
    ) -> Result<Flow, BridgeError> {
        let Some(mut a) = self.attached.take() else {
            return Ok(Flow::Continue);
        };
        let mut ended = detach_on_link_error(f(self, ev, &mut a))?;
        while ended.is_none() && a.link.has_pending() {
            ended = match a.link.recv() {
                Ok(m) => detach_on_link_error(self.on_message(ev, &mut a, m))?,
                Err(e) => detach_on_link_error(Err(e.into()))?,
            };
        }
        match ended {
            None => {
                self.attached = Some(a);
                Ok(Flow::Continue)
            }
            Some(how) => self.end(ev, a, how),
        }
    }

    fn on_tick(&mut self, ev: &EventLoop) -> Result<Flow, BridgeError> {
        if let Err(e) = self.tick.wait() {
            debug!("tick: {e}");
        }
        let now = Instant::now();
        self.sample_heartbeat(now);
        self.expire_clients(ev, now);
        let mut flow = Flow::Continue;
        if self.attached.is_none() && now >= self.detached.retry_at {
            flow = self.try_attach(ev)?;
        }
        if now >= self.next_check {
            self.next_check = now + DEVICE_CHECK;
            let mut a = self.attached.take();
            self.check_devices(ev, a.as_mut(), now);
            self.attached = a;
        }
        Ok(flow)
    }

    /// Reads the page's heartbeat block (`docs/vop-abi.md` 5.6): straight
    /// from the aperture, so a card whose machine stopped cannot hide it.
    fn sample_heartbeat(&mut self, now: Instant) {
        let beat = self.attached.as_ref().and_then(|a| {
            a.page
                .heartbeat(&a.att.aperture)
                .map_err(|e| debug!("heartbeat block: {e}"))
                .ok()
                .flatten()
        });
        self.heartbeat.sample(beat, now);
    }

    /// Once a second: finish removals and acknowledged config changes,
    /// bring back backends.
    fn check_devices(&mut self, ev: &EventLoop, mut a: Option<&mut Attached>, now: Instant) {
        for i in 0..self.devices.len() {
            let state = self.devices[i].state;
            let removal_acked = match (&a, state.slot()) {
                (Some(a), Some(slot)) if state.removal() != device::Removal::No => {
                    a.removal_acked(slot)
                }
                _ => false,
            };
            let actions = self.devices[i].state.apply(DeviceEvent::Tick {
                now,
                removal_acked,
                attached: a.is_some(),
            });
            self.perform_logged(ev, a.as_deref_mut(), i, &actions);
            if let (Some(a), Some(slot)) = (a.as_deref_mut(), self.devices[i].state.slot()) {
                a.finish_config_change(slot);
            }
        }
    }

    /// Feeds an event to device `i` and carries out what it asks.
    fn apply(
        &mut self,
        ev: &EventLoop,
        a: Option<&mut Attached>,
        i: usize,
        event: DeviceEvent,
    ) -> Result<(), BridgeError> {
        let actions = self.devices[i].state.apply(event);
        self.perform(ev, a, i, &actions)
    }

    /// [`Self::perform`], logging a failure.
    fn perform_logged(
        &mut self,
        ev: &EventLoop,
        a: Option<&mut Attached>,
        i: usize,
        actions: &[DeviceAction],
    ) {
        if let Err(e) = self.perform(ev, a, i, actions) {
            error!("device {i} ({}): {}", self.devices[i].name(), Report(&e));
        }
    }

    /// Carries out a device's actions in order (those that need the device
    /// link are skipped while detached).
    fn perform(
        &mut self,
        ev: &EventLoop,
        mut a: Option<&mut Attached>,
        i: usize,
        actions: &[DeviceAction],
    ) -> Result<(), BridgeError> {
        for &act in actions {
            match (act, a.as_deref_mut()) {
                (DeviceAction::Start { resume }, Some(a)) => {
                    if self.start_device(a, i, resume)? {
                        self.devices[i].state.apply(DeviceEvent::Started);
                    }
                }
                (DeviceAction::Stop { unwire }, a) => self.stop_device(a, i, unwire),
                (DeviceAction::Unwire, a) => {
                    if let Some(w) = self.devices[i].wiring.take() {
                        if let Some(a) = a {
                            self.unwire(a, i, &w);
                        }
                    }
                }
                (DeviceAction::DropBackend, _) => self.drop_backend(ev, i),
                (DeviceAction::AckReset, Some(a)) => {
                    a.ack_device_reset(i, self.slot(i)?)?;
                    crate::limited!(
                        self.card_lines,
                        ("device reset", i as u32),
                        info,
                        "device {i} reset by the card"
                    );
                }
                (DeviceAction::AskRemoval, Some(a)) => a.ask_removal(self.slot(i)?)?,
                (DeviceAction::ClearSlot { slot, acked }, Some(a)) => {
                    self.clear_slot(a, i, slot, acked)
                }
                (DeviceAction::Reconnect, a) => self.reconnect(ev, a, i),
                (act, None) => debug!("device {i}: {act:?} skipped while detached"),
            }
        }
        Ok(())
    }

    /// The slot of a device that must have one.
    fn slot(&self, i: usize) -> Result<usize, BridgeError> {
        self.devices[i]
            .state
            .slot()
            .ok_or(BridgeError::NotPlaced(i))
    }
}

/// A failed device link (closed, flooded, malformed) ends the attachment,
/// never the bridge: it attaches again.
fn detach_on_link_error(
    r: Result<Option<Ended>, BridgeError>,
) -> Result<Option<Ended>, BridgeError> {
    match r {
        Err(e) if e.is_link() => {
            error!("device link: {}; reattaching", Report(&e));
            Ok(Some(Ended::Detached))
        }
        r => r,
    }
}

impl Detached {
    fn new(connect_timeout: u64) -> Self {
        let now = Instant::now();
        Detached {
            warn_after: now + Duration::from_secs(connect_timeout),
            warned: false,
            retry_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_protocol::ProtocolError;

    #[test]
    fn link_errors_detach_and_others_stay_errors() {
        let r = detach_on_link_error(Err(ProtocolError::Flood.into()));
        assert_eq!(r.unwrap(), Some(Ended::Detached));
        let r = detach_on_link_error(Err(BridgeError::ApertureUnmapped));
        assert!(matches!(r, Err(BridgeError::ApertureUnmapped)));
        assert_eq!(detach_on_link_error(Ok(None)).unwrap(), None);
    }
}
