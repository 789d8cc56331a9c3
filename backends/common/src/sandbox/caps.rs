//! The capability part of the sandbox: once a daemon has opened what it
//! serves, it needs no capability at all (a tap's queues are open and
//! configured, the tap ioctls it still makes, `TUNSETVNETHDRSZ` and
//! `TUNSETOFFLOAD`, check none), so every set is emptied: bounding,
//! ambient, inheritable, effective and permitted (`capabilities(7)`).
//!
//! Capabilities are per thread: call [`drop_all`] before the daemon starts
//! threads, so that they start with none. Dropping the bounding set needs
//! `CAP_SETPCAP`; a daemon without it (not root) has nothing to drop there.

use caps::{CapSet, Capability, CapsHashSet};

/// Errors dropping capabilities.
#[derive(Debug, thiserror::Error)]
#[error("cannot drop capabilities: {0}")]
pub struct Error(#[source] caps::errors::CapsError);

/// Empties every capability set of the calling thread. Returns how many
/// capabilities were permitted before.
pub fn drop_all() -> Result<usize, Error> {
    let before = caps::read(None, CapSet::Permitted).map_err(Error)?.len();
    let bounding = caps::read(None, CapSet::Bounding).map_err(Error)?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(Error)? {
        for cap in bounding {
            caps::drop(None, CapSet::Bounding, cap).map_err(Error)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(Error)?;
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &CapsHashSet::new()).map_err(Error)?;
    }
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a child process: afterwards no set holds a capability.
    #[test]
    fn every_set_is_empty_afterwards() {
        let status = super::super::tests::run_child("caps_child", &[]);
        assert_eq!(
            status.code(),
            Some(super::super::tests::CHILD_OK),
            "{status:?}"
        );
    }

    #[test]
    fn caps_child() {
        if !super::super::tests::in_child("caps_child") {
            return;
        }
        let root = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap();
        drop_all().unwrap();
        for set in [
            CapSet::Ambient,
            CapSet::Inheritable,
            CapSet::Effective,
            CapSet::Permitted,
        ] {
            assert!(caps::read(None, set).unwrap().is_empty(), "{set:?}");
        }
        if root {
            assert!(caps::read(None, CapSet::Bounding).unwrap().is_empty());
        }
        std::process::exit(super::super::tests::CHILD_OK);
    }
}
