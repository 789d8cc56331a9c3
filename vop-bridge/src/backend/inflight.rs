//! In-flight I/O tracking (vhost-user `INFLIGHT_SHMFD`, vhost-user
//! specification, "Inflight I/O tracking"): the region a backend records its
//! requests in, which the bridge keeps for it across the backend's
//! restarts.
//!
//! A backend that offers the protocol feature allocates the region when the
//! bridge asks (`GET_INFLIGHT_FD`, with the queue count and size) and marks
//! in it every request it takes from a ring and clears it once completed.
//! The bridge, as QEMU's `vhost-user-blk` does, holds the region's
//! descriptor and hands it to each new connection (`SET_INFLIGHT_FD`)
//! before the rings start: a backend that died with requests in flight
//! finds them there and submits them again, and the card never sees them
//! lost. The region belongs to one life of the device: after a device
//! reset by the card (a fresh start, not a resume) it is dropped and a new
//! one asked for. The bridge never reads the region; its layout is the
//! backend's business (`backends/common/src/inflight.rs` for mic-blk).

use std::fs::File;
use std::os::fd::AsRawFd;

use vhost::vhost_user::message::{FrontendReq, VhostUserInflight};
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};

use super::{Backend, BackendError};

/// A backend's in-flight region: its descriptor and where it lies in it.
pub struct InflightRegion {
    info: VhostUserInflight,
    file: File,
}

impl InflightRegion {
    /// Queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.info.num_queues
    }

    /// Ring size the region was made for.
    pub fn queue_size(&self) -> u16 {
        self.info.queue_size
    }

    /// Whether it was made for `num_queues` rings of `queue_size` entries.
    fn fits(&self, num_queues: u16, queue_size: u16) -> bool {
        self.num_queues() == num_queues && self.queue_size() == queue_size
    }
}

impl Backend {
    /// Whether the backend tracks in-flight requests.
    pub fn tracks_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// Gives the backend its in-flight region before its rings start:
    /// `kept` (from an earlier connection of this device life) when it
    /// fits, otherwise a new one the backend allocates. Returns the region
    /// to keep, `None` when the backend does not track in-flight requests.
    pub fn share_inflight(
        &mut self,
        kept: Option<InflightRegion>,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightRegion>, BackendError> {
        if !self.tracks_inflight() {
            return Ok(None);
        }
        let region = match kept.filter(|r| r.fits(num_queues, queue_size)) {
            Some(r) => r,
            None => {
                let ask = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues,
                    queue_size,
                };
                let (info, file) =
                    self.call(FrontendReq::GET_INFLIGHT_FD, |f| f.get_inflight_fd(&ask))?;
                InflightRegion {
                    info: VhostUserInflight {
                        num_queues,
                        queue_size,
                        ..info
                    },
                    file,
                }
            }
        };
        let fd = region.file.as_raw_fd();
        let info = region.info;
        self.call(FrontendReq::SET_INFLIGHT_FD, |f| {
            f.set_inflight_fd(&info, fd)
        })?;
        Ok(Some(region))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_fits_only_the_rings_it_was_made_for() {
        let r = InflightRegion {
            info: VhostUserInflight {
                mmap_size: 4096,
                mmap_offset: 0,
                num_queues: 2,
                queue_size: 256,
            },
            file: File::open("/dev/null").unwrap(),
        };
        assert!(r.fits(2, 256));
        assert!(!r.fits(1, 256));
        assert!(!r.fits(2, 128));
        assert_eq!((r.num_queues(), r.queue_size()), (2, 256));
    }
}
