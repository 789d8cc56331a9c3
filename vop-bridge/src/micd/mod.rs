//! `micd`, the host daemon for several cards (mpssd's role;
//! `docs/micd.md`): per card it runs QEMU, the bridge and the backends,
//! drives the COSM lifecycle and answers `micctl`.
//!
//! - [`config`]: the TOML file, one table per card;
//! - [`lifecycle`]: the per-card state machine, pure;
//! - [`backoff`]: the wait before booting again a card that fails early;
//! - [`heartbeat`]: when a silent card counts as crashed, pure;
//! - [`launch`]: what runs for a card, as command lines;
//! - [`process`]: starting, adopting and stopping one process;
//! - [`running`]: a running card's processes, together;
//! - [`layout`]: the state directory;
//! - [`network`]: the address plan;
//! - [`link`]: the card-to-card link for cards on passt;
//! - [`vsock_group`]: one vsock backend for the cards that reach each
//!   other by CID;
//! - [`shared`]: starting and watching a process several cards use;
//! - [`overlay`]: the user's files appended to the card's initramfs;
//! - [`record`]: what a new micd needs to adopt a running card;
//! - [`supervisor`]: one thread per card that ties them together;
//! - [`protocol`], [`server`]: the control socket;
//! - [`console`]: a terminal on a card's console (`micctl console`).

pub mod backoff;
pub mod config;
pub mod console;
pub mod heartbeat;
pub mod launch;
pub mod layout;
pub mod lifecycle;
pub mod link;
pub mod network;
pub mod overlay;
pub mod process;
pub mod protocol;
pub mod record;
pub mod running;
pub mod server;
pub mod shared;
pub mod supervisor;
pub mod vsock_group;

/// An error with its causes, one after the other (`a: b: c`).
pub fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}
