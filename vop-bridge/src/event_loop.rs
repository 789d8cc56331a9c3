//! One wait loop for the bridge's file descriptors, in the shape of
//! cloud-hypervisor's `EpollHelper`: an [`EventLoop`] waits on an epoll set
//! and hands each ready descriptor's [`Token`] to an [`EventHandler`], which
//! may add and remove descriptors while it runs.
//!
//! The loop does not own what it watches. A process that serves one card
//! (`vop-bridge`) registers its stop signals and one [`crate::bridge::Bridge`];
//! a process that serves several can register several bridges, telling them
//! apart by [`Token::card`].

use std::io;
use std::os::fd::RawFd;

use log::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What a ready descriptor is (the epoll event's data word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// SIGINT/SIGTERM arrived (the process's, not a card's).
    Signal,
    /// A card's control socket has a connection.
    Control {
        /// Which card (`0` in `vop-bridge`).
        card: u16,
    },
    /// The card's device link has a message.
    Link {
        /// Which card.
        card: u16,
    },
    /// The card's periodic tick expired.
    Tick {
        /// Which card.
        card: u16,
    },
    /// A control connection has bytes of its request (or hung up).
    ControlClient {
        /// Which card.
        card: u16,
        /// The bridge's number for the connection.
        client: u16,
    },
    /// A device's vhost-user socket hung up.
    BackendSocket {
        /// Which card.
        card: u16,
        /// Index of the device.
        device: u16,
    },
    /// A device's backend sent a request on its backend request channel.
    BackendRequest {
        /// Which card.
        card: u16,
        /// Index of the device.
        device: u16,
    },
}

/// Kind numbers in the low byte of an encoded token.
mod kind {
    pub const SIGNAL: u64 = 1;
    pub const CONTROL: u64 = 2;
    pub const LINK: u64 = 3;
    pub const TICK: u64 = 4;
    pub const BACKEND_SOCKET: u64 = 5;
    pub const BACKEND_REQUEST: u64 = 6;
    pub const CONTROL_CLIENT: u64 = 7;
}

impl Token {
    /// Encodes the token as an epoll data word: kind in bits 0..8, card in
    /// bits 8..24, device in bits 24..40.
    pub fn to_data(self) -> u64 {
        let (k, card, device) = match self {
            Token::Signal => (kind::SIGNAL, 0, 0),
            Token::Control { card } => (kind::CONTROL, card, 0),
            Token::Link { card } => (kind::LINK, card, 0),
            Token::Tick { card } => (kind::TICK, card, 0),
            Token::BackendSocket { card, device } => (kind::BACKEND_SOCKET, card, device),
            Token::BackendRequest { card, device } => (kind::BACKEND_REQUEST, card, device),
            Token::ControlClient { card, client } => (kind::CONTROL_CLIENT, card, client),
        };
        k | u64::from(card) << 8 | u64::from(device) << 24
    }

    /// Decodes an epoll data word; `None` for words no token encodes.
    pub fn from_data(data: u64) -> Option<Self> {
        if data >> 40 != 0 {
            return None;
        }
        let card = (data >> 8) as u16;
        let device = (data >> 24) as u16;
        let no_device = device == 0;
        Some(match data & 0xff {
            kind::SIGNAL if card == 0 && no_device => Token::Signal,
            kind::CONTROL if no_device => Token::Control { card },
            kind::LINK if no_device => Token::Link { card },
            kind::TICK if no_device => Token::Tick { card },
            kind::BACKEND_SOCKET => Token::BackendSocket { card, device },
            kind::BACKEND_REQUEST => Token::BackendRequest { card, device },
            kind::CONTROL_CLIENT => Token::ControlClient {
                card,
                client: device,
            },
            _ => return None,
        })
    }

    /// The card the token belongs to (`None` for the process's own).
    pub fn card(self) -> Option<u16> {
        match self {
            Token::Signal => None,
            Token::Control { card }
            | Token::Link { card }
            | Token::Tick { card }
            | Token::BackendSocket { card, .. }
            | Token::BackendRequest { card, .. }
            | Token::ControlClient { card, .. } => Some(card),
        }
    }
}

/// Whether the loop goes on after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Wait for the next event.
    Continue,
    /// Return from [`EventLoop::run`].
    Stop,
}

/// Reacts to ready descriptors.
pub trait EventHandler {
    /// Why handling can fail (and the loop end).
    type Error: From<EventLoopError>;

    /// Handles one ready descriptor. `events` is what epoll reported.
    fn handle_event(
        &mut self,
        ev: &EventLoop,
        token: Token,
        events: EventSet,
    ) -> Result<Flow, Self::Error>;
}

/// The epoll set failed.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// `epoll_create1` failed.
    #[error("cannot create the epoll set")]
    Create(#[source] io::Error),
    /// `epoll_ctl(EPOLL_CTL_ADD)` failed.
    #[error("cannot watch fd {fd} for {token:?}")]
    Add {
        /// The descriptor.
        fd: RawFd,
        /// Its token.
        token: Token,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `epoll_wait` failed.
    #[error("waiting for events")]
    Wait(#[source] io::Error),
}

/// The epoll set and its wait loop.
pub struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    /// Creates an empty set.
    pub fn new() -> Result<Self, EventLoopError> {
        Ok(EventLoop {
            epoll: Epoll::new().map_err(EventLoopError::Create)?,
        })
    }

    /// Watches `fd` for `events`, reporting it as `token`.
    pub fn add(&self, fd: RawFd, token: Token, events: EventSet) -> Result<(), EventLoopError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(events, token.to_data()),
            )
            .map_err(|source| EventLoopError::Add { fd, token, source })
    }

    /// Stops watching `fd` (a descriptor that is not watched is ignored).
    pub fn remove(&self, fd: RawFd) {
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            debug!("unwatching fd {fd}: {e}");
        }
    }

    /// Waits once (at most `timeout_ms`, `-1` for ever) and dispatches what
    /// is ready; returns [`Flow::Stop`] as soon as the handler does.
    pub fn run_once<H: EventHandler>(
        &self,
        handler: &mut H,
        timeout_ms: i32,
    ) -> Result<Flow, H::Error> {
        let mut events = [EpollEvent::default(); 16];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(EventLoopError::Wait(e).into()),
        };
        for ev in &events[..n] {
            let Some(token) = Token::from_data(ev.data()) else {
                debug!("event with unknown data {:#x} ignored", ev.data());
                continue;
            };
            if handler.handle_event(self, token, ev.event_set())? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Dispatches events until the handler returns [`Flow::Stop`] or fails.
    pub fn run<H: EventHandler>(&self, handler: &mut H) -> Result<(), H::Error> {
        while self.run_once(handler, -1)? == Flow::Continue {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn tokens_round_trip() {
        let all = [
            Token::Signal,
            Token::Control { card: 0 },
            Token::Link { card: 7 },
            Token::Tick { card: u16::MAX },
            Token::BackendSocket { card: 1, device: 0 },
            Token::BackendSocket {
                card: 0,
                device: 31,
            },
            Token::BackendRequest { card: 3, device: 2 },
            Token::ControlClient { card: 0, client: 0 },
            Token::ControlClient {
                card: 2,
                client: u16::MAX,
            },
        ];
        for t in all {
            assert_eq!(Token::from_data(t.to_data()), Some(t), "{t:?}");
        }
        // Distinct tokens get distinct words.
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.to_data(), b.to_data());
            }
        }
        assert_eq!(Token::Link { card: 7 }.card(), Some(7));
        assert_eq!(Token::Signal.card(), None);
    }

    #[test]
    fn words_no_token_encodes_are_refused() {
        assert_eq!(Token::from_data(0), None);
        assert_eq!(Token::from_data(99), None);
        assert_eq!(Token::from_data(1 << 40 | kind::LINK), None);
        // Kinds without a device carry none.
        assert_eq!(Token::from_data(kind::LINK | 1 << 24), None);
        assert_eq!(Token::from_data(kind::SIGNAL | 1 << 8), None);
    }

    struct Counter {
        seen: Vec<Token>,
        stop_after: usize,
    }

    impl EventHandler for Counter {
        type Error = EventLoopError;
        fn handle_event(
            &mut self,
            _: &EventLoop,
            token: Token,
            events: EventSet,
        ) -> Result<Flow, EventLoopError> {
            assert!(events.contains(EventSet::IN));
            self.seen.push(token);
            Ok(if self.seen.len() >= self.stop_after {
                Flow::Stop
            } else {
                Flow::Continue
            })
        }
    }

    #[test]
    fn dispatches_ready_fds_until_stopped() {
        let el = EventLoop::new().unwrap();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let ta = Token::Link { card: 1 };
        let tb = Token::BackendRequest { card: 1, device: 4 };
        el.add(a.as_raw_fd(), ta, EventSet::IN).unwrap();
        el.add(b.as_raw_fd(), tb, EventSet::IN).unwrap();
        let mut h = Counter {
            seen: Vec::new(),
            stop_after: 2,
        };
        assert_eq!(el.run_once(&mut h, 0).unwrap(), Flow::Continue);
        assert!(h.seen.is_empty());
        b.write(1).unwrap();
        a.write(1).unwrap();
        el.run(&mut h).unwrap();
        h.seen.sort_by_key(|t| t.to_data());
        assert_eq!(h.seen, [ta, tb]);
        // A removed fd is no longer reported; adding it twice fails.
        el.remove(a.as_raw_fd());
        h.seen.clear();
        assert_eq!(el.run_once(&mut h, 0).unwrap(), Flow::Continue);
        assert_eq!(h.seen, [tb]);
        assert!(matches!(
            el.add(b.as_raw_fd(), tb, EventSet::IN),
            Err(EventLoopError::Add { .. })
        ));
    }
}
