//! The capability part of the sandbox: once a daemon has opened what it
//! serves, it needs no capability (a tap's queues are open and configured,
//! and the tap ioctls it still makes, `TUNSETVNETHDRSZ` and
//! `TUNSETOFFLOAD`, check none), so every set is emptied: bounding,
//! ambient, inheritable, effective and permitted (`capabilities(7)`). A
//! policy may keep some of those the daemon has (`mic-net` on a unix stream
//! peer keeps `CAP_DAC_OVERRIDE`, see its `sandbox.rs`).
//!
//! Capabilities are per thread: call [`drop_all`] before the daemon starts
//! threads, so that they start with none. Dropping the bounding set needs
//! `CAP_SETPCAP`; a daemon without it (not root) has nothing to drop there.

use caps::{CapSet, Capability, CapsHashSet};

/// Errors dropping capabilities.
#[derive(Debug, thiserror::Error)]
#[error("cannot drop capabilities: {0}")]
pub struct Error(#[source] caps::errors::CapsError);

/// Empties every capability set of the calling thread but for the
/// capabilities of `keep` that it has (those stay permitted and
/// effective, and in the bounding set). Returns how many capabilities
/// were dropped from the permitted set.
pub fn drop_all(keep: &[Capability]) -> Result<usize, Error> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(Error)?;
    let kept: CapsHashSet = permitted
        .iter()
        .copied()
        .filter(|c| keep.contains(c))
        .collect();
    let bounding = caps::read(None, CapSet::Bounding).map_err(Error)?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(Error)? {
        for cap in bounding.iter().filter(|c| !keep.contains(c)) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(Error)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(Error)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(Error)?;
    caps::set(None, CapSet::Effective, &kept).map_err(Error)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(Error)?;
    Ok(permitted.len() - kept.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a child process: afterwards no set holds a capability but the
    /// one kept (when the process had it: as root).
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
        let keep = Capability::CAP_DAC_OVERRIDE;
        drop_all(&[keep]).unwrap();
        for set in [CapSet::Ambient, CapSet::Inheritable] {
            assert!(caps::read(None, set).unwrap().is_empty(), "{set:?}");
        }
        let only_kept = |set| {
            let left = caps::read(None, set).unwrap();
            assert!(left.iter().all(|c| *c == keep), "{set:?}: {left:?}");
            assert_eq!(left.contains(&keep), root, "{set:?}");
        };
        only_kept(CapSet::Effective);
        only_kept(CapSet::Permitted);
        if root {
            only_kept(CapSet::Bounding);
        }
        std::process::exit(super::super::tests::CHILD_OK);
    }
}
