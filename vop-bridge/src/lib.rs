//! Host side of virtio-over-PCIe (VOP) for the emulated MIC X100 card.
//!
//! - [`abi`]: the card's registers and device page (`docs/vop-abi.md`).
//! - [`device_protocol`]: the link to the `mic-x100` QEMU device
//!   (`docs/device-protocol.md`).
//! - [`page`]: building and adopting the device page in the aperture.
//! - [`backend`]: one device's vhost-user backend.
//! - [`card`]: the card lifecycle.
//! - [`heartbeat`]: the card's heartbeat as the host follows it.
//! - [`bridge`]: one card's bridge tying them together, split by job.
//! - [`event_loop`]: the one wait loop and its [`event_loop::Token`]s.
//! - [`signals`]: the process's stop signals as a descriptor.
//! - [`watchdog`]: deadlines for blocking socket operations.
//! - [`log_limit`]: rate limits for log lines the card can cause.
//! - [`config`], [`control`]: configuration and the control socket.
//! - [`agent_client`]: the host's client of the card agent over vsock.
//! - [`micd`]: the host daemon that runs several cards.

pub mod abi;
pub mod agent_client;
pub mod backend;
pub mod bridge;
pub mod card;
pub mod config;
pub mod control;
pub mod device_protocol;
pub mod event_loop;
#[doc(hidden)]
pub mod fuzz;
pub mod heartbeat;
pub mod log_limit;
pub mod micd;
pub mod net_control;
pub mod page;
pub mod signals;
pub mod watchdog;
