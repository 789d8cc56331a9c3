//! What can go wrong talking to a backend, and at which step.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use vhost::vhost_user::message::FrontendReq;

/// The step of talking to a backend that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Connecting to its socket.
    Connect,
    /// A vhost-user request (vhost's own request numbers).
    Request(FrontendReq),
    /// Setting up the backend request channel.
    BackendChannel,
    /// Reading a request on the backend request channel.
    BackendRequest,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Connect => f.write_str("connect"),
            // FrontendReq's variants are named as in the vhost-user spec.
            Step::Request(r) => write!(f, "{r:?}"),
            Step::BackendChannel => f.write_str("backend request channel"),
            Step::BackendRequest => f.write_str("backend request"),
        }
    }
}

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A vhost-user step failed.
    #[error("{}: {step}", socket.display())]
    Vhost {
        /// Backend socket.
        socket: PathBuf,
        /// What failed.
        step: Step,
        /// Cause.
        #[source]
        err: vhost::Error,
    },
    /// The backend's config space is too short for the fields the bridge
    /// adjusts.
    #[error("{}: config space of {len} bytes, {needed} needed", socket.display())]
    ShortConfig {
        /// Backend socket.
        socket: PathBuf,
        /// Bytes the backend returned.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The backend did not answer in time; the connection was shut down.
    #[error("{}: {step}: no answer within {after:?}", socket.display())]
    Timeout {
        /// Backend socket.
        socket: PathBuf,
        /// What was waiting.
        step: Step,
        /// The deadline.
        after: Duration,
    },
    /// The backend offers fewer queues than the device needs.
    #[error("{}: offers {offered} queues, {needed} needed", socket.display())]
    TooFewQueues {
        /// Backend socket.
        socket: PathBuf,
        /// What `GET_QUEUE_NUM` answered.
        offered: usize,
        /// What the device's config asks for.
        needed: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn steps_name_the_vhost_user_request() {
        assert_eq!(
            Step::Request(FrontendReq::SET_VRING_ADDR).to_string(),
            "SET_VRING_ADDR"
        );
        assert_eq!(Step::Connect.to_string(), "connect");
        let e = BackendError::Vhost {
            socket: "/run/b.sock".into(),
            step: Step::Request(FrontendReq::GET_FEATURES),
            err: vhost::Error::InvalidOperation,
        };
        assert_eq!(e.to_string(), "/run/b.sock: GET_FEATURES");
        assert!(e.source().is_some());
    }
}
