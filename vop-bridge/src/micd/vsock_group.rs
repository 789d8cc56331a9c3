//! The vsock group: one `vhost-device-vsock` serving the virtio-vsock
//! devices of all the cards that reach each other by CID (`docs/vsock.md`,
//! "Card to card").
//!
//! vhost-device-vsock forwards a packet from one guest to another when
//! both are served by the same process and share a group (`groups=` of
//! `--vm`); SCIF let every node reach every other, so micd puts every card
//! with `vsock` and `vsock_peers` (the default) in one group, named
//! [`GROUP`], when there are two or more. Each card keeps its own
//! vhost-user socket and host-side UNIX socket (`uds-path`) in its
//! directory, as with a process of its own, so the agent, `micctl exec`
//! and host services see no difference. The process is shared the way the
//! card-to-card link's hub is (`shared.rs`): started before the cards,
//! adopted by a new micd, started again when it dies, while each card's
//! bridge reconnects to its socket.

use std::ffi::OsString;
use std::path::Path;

use super::launch::vsock_cid;
use super::layout::CardDir;
use super::process::ProcSpec;
use super::shared::{keep_running, Adopt, SharedError};

/// The one group micd's cards share.
pub const GROUP: &str = "mic";

/// The group's process for `cards` (at least two; `None` otherwise):
/// `vsock` is the vhost-device-vsock program.
pub fn process(vsock: &Path, state_dir: &Path, cards: &[u16]) -> Option<ProcSpec> {
    if cards.len() < 2 {
        return None;
    }
    let mut args: Vec<OsString> = Vec::new();
    for &i in cards {
        let dir = CardDir::new(state_dir, &format!("mic{i}"));
        args.push("--vm".into());
        args.push(
            format!(
                "guest-cid={},socket={},uds-path={},groups={GROUP}",
                vsock_cid(i),
                dir.vhost_socket("vsock").display(),
                dir.vsock_uds().display()
            )
            .into(),
        );
    }
    Some(spec(vsock, state_dir, args))
}

fn spec(vsock: &Path, state_dir: &Path, args: Vec<OsString>) -> ProcSpec {
    ProcSpec {
        name: "vsock-group".into(),
        program: vsock.to_path_buf(),
        args,
        log: state_dir.join("vsock-group.log"),
        pidfile: state_dir.join("vsock-group.pid"),
        env: vec![("RUST_LOG".into(), "info".into())],
    }
}

/// The pid of the group's process while it runs (for `micctl status`).
pub fn pid(vsock: &Path, state_dir: &Path) -> Option<u32> {
    spec(vsock, state_dir, Vec::new()).adopt().map(|p| p.pid())
}

/// Starts the group's process for `cards`, or adopts the one an earlier
/// micd left running, and keeps it running (`shared.rs`).
pub fn run(vsock: &Path, state_dir: &Path, cards: &[u16]) -> Result<(), SharedError> {
    match process(vsock, state_dir, cards) {
        // Its sockets are gone while the cards' bridges are connected.
        Some(spec) => keep_running(
            "the vsock group",
            spec,
            sockets(state_dir, cards),
            Adopt::Running,
        ),
        None => Ok(()),
    }
}

/// Every member's vhost-user socket, which the group's process creates.
pub fn sockets(state_dir: &Path, cards: &[u16]) -> Vec<std::path::PathBuf> {
    cards
        .iter()
        .map(|i| CardDir::new(state_dir, &format!("mic{i}")).vhost_socket("vsock"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn one_process_serves_every_member_in_one_group() {
        let v = Path::new("/v/vhost-device-vsock");
        assert!(process(v, Path::new("/s"), &[1]).is_none());
        let p = process(v, Path::new("/s"), &[0, 2]).unwrap();
        assert_eq!(p.program, v);
        assert_eq!(
            p.args,
            [
                "--vm",
                "guest-cid=3,socket=/s/mic0/vhost-vsock.sock,uds-path=/s/mic0/vsock.uds,groups=mic",
                "--vm",
                "guest-cid=5,socket=/s/mic2/vhost-vsock.sock,uds-path=/s/mic2/vsock.uds,groups=mic",
            ]
        );
        assert_eq!(p.pidfile, Path::new("/s/vsock-group.pid"));
        assert_eq!(
            sockets(Path::new("/s"), &[0, 2]),
            [
                PathBuf::from("/s/mic0/vhost-vsock.sock"),
                PathBuf::from("/s/mic2/vhost-vsock.sock")
            ]
        );
    }
}
