//! The card-to-card link for cards on passt (`docs/micd.md`, "Networking").
//!
//! Each passt is a user-mode stack of its own, so cards on passt have no
//! path to each other. As root, cards on taps go through the host's
//! routing, as MPSS did. Without root, micd joins them on one Ethernet
//! segment instead: QEMU's network hub, in a QEMU process with no machine
//! (`-machine none`), with one stream netdev per card (a unix socket
//! speaking the same length-prefixed frames as passt, which `mic-net
//! --stream` already talks). Every card gets a second virtio-net device on
//! that socket, with a MAC micd chooses ([`link_mac`]); the card takes the
//! interface with that MAC (`mic.link`) as the route to `172.31.0.0/16`,
//! so card N reaches card M at its usual address 172.31.(M+1).1.
//!
//! The hub is an existing component that needs no privilege and no tun
//! device; its cost is a copy through one more process, on a path that
//! carries only card-to-card traffic.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::layout::CardDir;
use super::process::ProcSpec;
use super::shared::{keep_running, Adopt, SharedError};

/// The MAC of card `index`'s link interface: locally administered, and
/// distinct from `mic-net`'s random `52:54:00:...` ones.
pub fn link_mac(index: u16) -> String {
    format!("02:6d:69:63:{:02x}:{:02x}", index >> 8, index & 0xff)
}

/// The hub joining the link sockets of `cards` (at least two; `None`
/// otherwise): each card's socket is its directory's
/// [`CardDir::link_socket`].
pub fn hub(qemu: &Path, state_dir: &Path, cards: &[u16]) -> Option<ProcSpec> {
    if cards.len() < 2 {
        return None;
    }
    let mut args: Vec<OsString> = [
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    for &i in cards {
        let sock = CardDir::new(state_dir, &format!("mic{i}")).link_socket();
        args.push("-netdev".into());
        args.push(
            format!(
                "stream,id=mic{i},server=on,addr.type=unix,addr.path={}",
                sock.display()
            )
            .into(),
        );
        args.push("-netdev".into());
        args.push(format!("hubport,id=port{i},hubid=0,netdev=mic{i}").into());
    }
    Some(ProcSpec {
        name: "link".into(),
        program: qemu.to_path_buf(),
        args,
        log: state_dir.join("link.log"),
        pidfile: state_dir.join("link.pid"),
        env: Vec::new(),
    })
}

/// Starts the hub for `cards`, or adopts the one an earlier micd left
/// running, and keeps it running (`shared.rs`; each card's `mic-net`
/// reconnects by itself).
pub fn run(qemu: &Path, state_dir: &Path, cards: &[u16]) -> Result<(), SharedError> {
    match hub(qemu, state_dir, cards) {
        Some(spec) => keep_running(
            "the card-to-card link",
            spec,
            sockets(state_dir, cards),
            Adopt::WithSockets,
        ),
        None => Ok(()),
    }
}

/// Every card's link socket, which the hub creates.
pub fn sockets(state_dir: &Path, cards: &[u16]) -> Vec<PathBuf> {
    cards
        .iter()
        .map(|i| CardDir::new(state_dir, &format!("mic{i}")).link_socket())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_unicast_local_and_distinct() {
        assert_eq!(link_mac(0), "02:6d:69:63:00:00");
        assert_eq!(link_mac(254), "02:6d:69:63:00:fe");
        let first = u8::from_str_radix(&link_mac(7)[..2], 16).unwrap();
        assert_eq!(first & 1, 0, "multicast");
        assert_eq!(first & 2, 2, "not locally administered");
    }

    #[test]
    fn one_hub_for_two_or_more_cards() {
        let q = Path::new("/q/qemu");
        assert!(hub(q, Path::new("/s"), &[0]).is_none());
        let h = hub(q, Path::new("/s"), &[0, 2]).unwrap();
        assert_eq!(h.program, q);
        let args: Vec<String> = h
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.windows(4).any(|w| w
            == [
                "-netdev",
                "stream,id=mic2,server=on,addr.type=unix,addr.path=/s/mic2/link.sock",
                "-netdev",
                "hubport,id=port2,hubid=0,netdev=mic2"
            ]));
        assert_eq!(h.pidfile, Path::new("/s/link.pid"));
        assert_eq!(
            sockets(Path::new("/s"), &[0, 2]),
            [
                PathBuf::from("/s/mic0/link.sock"),
                PathBuf::from("/s/mic2/link.sock")
            ]
        );
    }
}
