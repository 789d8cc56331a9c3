//! The bridge's errors. Each keeps its cause as a `source`; [`Report`]
//! prints the whole chain for the log.

use std::error::Error;
use std::fmt;
use std::path::PathBuf;

use crate::backend::BackendError;
use crate::device_protocol::ProtocolError;
use crate::event_loop::EventLoopError;
use crate::net_control::ControlQueueError;
use crate::page::PageError;
use crate::signals::SignalsError;

/// Errors of the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The device link failed.
    #[error("device link")]
    Link(#[from] ProtocolError),
    /// A backend could not be used.
    #[error("backend")]
    Backend(#[from] BackendError),
    /// Reading or writing the device page failed.
    #[error("device page")]
    Page(#[from] PageError),
    /// A network device's control queue could not be served.
    #[error("the card's network commands")]
    NetControl(#[from] ControlQueueError),
    /// The event loop failed.
    #[error("event loop")]
    EventLoop(#[from] EventLoopError),
    /// The stop signals could not be set up.
    #[error("signals")]
    Signals(#[from] SignalsError),
    /// The control socket could not be opened.
    #[error("control socket {path}")]
    ControlSocket {
        /// Its path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{what}")]
    Os {
        /// The call.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The page found in the aperture does not match the configuration.
    #[error(
        "the card uses a device page with {found} devices that does not match this \
         configuration ({configured} devices); reset the card or use the same devices"
    )]
    PageMismatch {
        /// Devices in the card's page.
        found: usize,
        /// Devices configured.
        configured: usize,
    },
    /// A backend's queue count does not match the adopted page.
    #[error("{socket}: {backend} queues, the card's page has {page}", socket = .socket.display())]
    QueueMismatch {
        /// Backend socket.
        socket: PathBuf,
        /// Queues the backend has.
        backend: usize,
        /// Queues in the page.
        page: usize,
    },
    /// The device has no slot in the device page.
    #[error("device {0} is not in the device page")]
    NotPlaced(usize),
    /// The card set `DRIVER_OK` but gave the device no interrupt vector.
    #[error("device {0}: DRIVER_OK without a valid interrupt vector")]
    NoVector(usize),
    /// The card has not mapped its aperture, so ring addresses cannot be
    /// translated for the backend.
    #[error("the card has not mapped the aperture (BAR2); cannot start devices")]
    ApertureUnmapped,
}

impl BridgeError {
    /// Whether the error came from the device link (the device may be going
    /// away; attaching again can help).
    pub fn is_link(&self) -> bool {
        matches!(self, BridgeError::Link(_))
    }
}

/// Displays an error with its chain of causes: `outer: cause: root`.
pub struct Report<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_shows_the_chain() {
        let e = BridgeError::Os {
            what: "eventfd",
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        let text = Report(&e).to_string();
        assert!(text.starts_with("eventfd: "), "{text}");
        assert!(e.source().is_some());
        let e = BridgeError::from(ProtocolError::Closed);
        assert!(e.is_link());
        assert!(e.source().is_some());
        assert!(!BridgeError::ApertureUnmapped.is_link());
    }

    #[test]
    fn mismatch_names_both_counts() {
        let e = BridgeError::PageMismatch {
            found: 2,
            configured: 3,
        };
        let text = e.to_string();
        assert!(
            text.contains("2 devices") && text.contains("(3 devices)"),
            "{text}"
        );
        let e = BridgeError::QueueMismatch {
            socket: "/run/b.sock".into(),
            backend: 2,
            page: 1,
        };
        assert_eq!(
            e.to_string(),
            "/run/b.sock: 2 queues, the card's page has 1"
        );
    }
}
