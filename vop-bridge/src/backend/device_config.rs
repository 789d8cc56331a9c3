//! A device's config space as the bridge handles it: how much to ask the
//! backend for, what to replay to a fresh backend, and the backend's own
//! config-change notices.

use std::sync::atomic::{AtomicBool, Ordering};

use vhost::vhost_user::{HandlerResult, VhostUserFrontendReqHandler};
use virtio_bindings::virtio_blk;

use super::features::bit;
use crate::config::DeviceKind;

/// Config space sizes the bridge asks for.
pub(super) fn config_len(kind: DeviceKind) -> u32 {
    match kind {
        // cols, rows, max_nr_ports, emerg_wr
        DeviceKind::Console => 12,
        // struct virtio_blk_config up to write_zeroes_may_unmap + padding
        DeviceKind::Blk => 60,
        // mac, status, max_virtqueue_pairs, mtu
        DeviceKind::Net => 12,
        // guest_cid (le64; virtio 1.2, 5.10.4)
        DeviceKind::Vsock => 8,
    }
}

/// How many queues (block) or queue pairs (network) a multiqueue device
/// gives the card, before the bridge's own limit: the count in the
/// backend's config space (`config_count`: `num_queues` or
/// `max_virtqueue_pairs`) when it has one (protocol feature `CONFIG`),
/// otherwise what its `GET_QUEUE_NUM` offers (`queue_num`, with protocol
/// feature `MQ`), `per` queues to the unit. A backend without a config
/// space leaves that field to its frontend, as QEMU's `queues=` and
/// cloud-hypervisor's `num_queues` set it (cloud-hypervisor's
/// `vhost_user_net` has no config space unless given a MAC or an MTU).
pub(super) fn multiqueue_units(config_count: Option<u16>, queue_num: Option<u64>, per: u64) -> u16 {
    match (config_count, queue_num) {
        (Some(n), _) => n,
        (None, Some(q)) => u16::try_from(q / per).unwrap_or(u16::MAX),
        (None, None) => 1,
    }
}

/// The write-cache byte of a block device's config space (virtio 1.2
/// 5.2.4, `writeback`; `wce` in virtio-bindings).
pub(super) const BLK_WCE_OFFSET: usize = std::mem::offset_of!(virtio_blk::virtio_blk_config, wce);

/// The config bytes a fresh backend must be told so it serves the card as
/// the card configured it: a block device's write-cache mode when the card
/// acked `VIRTIO_BLK_F_CONFIG_WCE` and the page's byte (what the card last
/// wrote) differs from the backend's (a backend starts in writeback).
pub(super) fn card_config_to_replay(
    kind: DeviceKind,
    acked: u64,
    page_config: &[u8],
    backend_config: &[u8],
) -> Option<(u32, u8)> {
    if kind != DeviceKind::Blk || acked & bit(virtio_blk::VIRTIO_BLK_F_CONFIG_WCE) == 0 {
        return None;
    }
    let card = *page_config.get(BLK_WCE_OFFSET)?;
    (backend_config.get(BLK_WCE_OFFSET) != Some(&card)).then_some((BLK_WCE_OFFSET as u32, card))
}

/// Records backend-initiated config changes (vhost-user `CONFIG_CHANGE_MSG`).
#[derive(Default)]
pub struct ConfigChangeFlag(AtomicBool);

impl ConfigChangeFlag {
    /// Returns and clears the flag.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl VhostUserFrontendReqHandler for ConfigChangeFlag {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.store(true, Ordering::Release);
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_without_config_space_offers_what_its_queue_count_says() {
        // Its own config space decides when it has one.
        assert_eq!(multiqueue_units(Some(3), Some(16), 2), 3);
        // cloud-hypervisor's vhost_user_net, num_queues=4: two pairs.
        assert_eq!(multiqueue_units(None, Some(4), 2), 2);
        assert_eq!(multiqueue_units(None, Some(5), 2), 2);
        assert_eq!(multiqueue_units(None, Some(4), 1), 4);
        // Neither: one.
        assert_eq!(multiqueue_units(None, None, 2), 1);
        assert_eq!(multiqueue_units(None, Some(u64::MAX), 1), u16::MAX);
    }

    #[test]
    fn the_cards_write_cache_choice_is_replayed_to_a_fresh_backend() {
        let wce = 1u64 << virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
        assert_eq!(BLK_WCE_OFFSET, 32);
        let mut page = vec![0u8; 60];
        let mut fresh = vec![0u8; 60];
        fresh[32] = 1; // a new mic-blk starts in writeback
                       // The card chose write-through: tell the backend.
        assert_eq!(
            card_config_to_replay(DeviceKind::Blk, wce, &page, &fresh),
            Some((32, 0))
        );
        // The same mode already: nothing to send.
        page[32] = 1;
        assert_eq!(
            card_config_to_replay(DeviceKind::Blk, wce, &page, &fresh),
            None
        );
        // Without CONFIG_WCE acked, or for another device, or a short page.
        page[32] = 0;
        assert_eq!(
            card_config_to_replay(DeviceKind::Blk, 0, &page, &fresh),
            None
        );
        assert_eq!(
            card_config_to_replay(DeviceKind::Net, wce, &page, &fresh),
            None
        );
        assert_eq!(
            card_config_to_replay(DeviceKind::Blk, wce, &[], &fresh),
            None
        );
    }
}
