//! `mic-agent`: the card's agent, reached by the host over virtio-vsock on
//! VOP (`docs/vsock.md`).
//!
//! - [`protocol`]: the framed, versioned protocol (the one definition,
//!   shared with the host's client in `vop-bridge`).
//! - [`session`]: one connection served: hello, then exec, put or get.
//! - [`pty`]: pseudo-terminals for commands run with `micctl exec -t`.
//! - [`vsock`]: AF_VSOCK sockets on the card.

pub mod protocol;
pub mod pty;
pub mod session;
pub mod vsock;
