//! The project's test support: the one harness every test uses (as
//! cloud-hypervisor's `test_infra` is for its tests), a dev-dependency of
//! each crate.
//!
//! - [`temp`]: temporary directories;
//! - [`process`]: processes a test starts, stopped when it ends, and the
//!   CPU time a daemon uses;
//! - [`paths`]: where the workspace's programs, our QEMU, the card image
//!   and vhost-device-vsock are;
//! - [`wait`]: waiting for a condition with a deadline;
//! - [`data`]: random data, checksums, sparse images, log tails;
//! - [`shell`]: a shell on a card's console;
//! - [`card`]: one card booted with the real QEMU, card OS, backends and
//!   bridge;
//! - [`qtest`]: QEMU driven through qtest, the test playing the card OS;
//! - [`conventions`]: the vhost-user backend program conventions
//!   (`--print-capabilities`, `--fd`, descriptor files);
//! - [`frontend`]: a vhost-user frontend that drives a backend's
//!   virtqueues itself;
//! - [`peers`]: peers that connect to a daemon and stall;
//! - [`crash`]: a block backend killed under a checking load;
//! - [`stats`]: a daemon's stats socket.
//!
//! Everything is also re-exported at the crate root, but for the
//! frontend's `Error` and `Result`.

#![deny(missing_docs)]

pub mod card;
pub mod conventions;
pub mod crash;
pub mod data;
pub mod frontend;
pub mod paths;
pub mod peers;
pub mod process;
pub mod qtest;
pub mod shell;
pub mod stats;
pub mod temp;
pub mod wait;

pub use card::*;
pub use crash::*;
pub use data::*;
// The frontend's `Error` and `Result` stay in their module: a glob import
// of the crate must not shadow std's.
pub use frontend::{
    outside, vhost, vring_need_event, BackendRequests, Desc, FrontendOptions, GuestMem,
    TestFrontend, Used, VirtQueue, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
pub use paths::*;
pub use peers::*;
pub use process::*;
pub use qtest::*;
pub use shell::*;
pub use stats::*;
pub use temp::*;
pub use wait::*;
