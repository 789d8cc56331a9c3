//! The features the bridge asks of a backend and keeps from the card.

use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_net;

/// Protocol features the bridge uses when the backend has them.
pub(super) const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::BACKEND_REQ)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);

/// virtio-net features that need a control virtqueue, which vhost-user leaves
/// to the frontend. The bridge serves the control queue for
/// [`NET_SERVED_CTRL_FEATURES`] alone (`net_control.rs`) and withholds the
/// rest.
pub(super) const NET_CTRL_FEATURES: u64 = bit(virtio_net::VIRTIO_NET_F_CTRL_VQ)
    | bit(virtio_net::VIRTIO_NET_F_CTRL_RX)
    | bit(virtio_net::VIRTIO_NET_F_CTRL_VLAN)
    | bit(virtio_net::VIRTIO_NET_F_CTRL_RX_EXTRA)
    | bit(virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE)
    | bit(virtio_net::VIRTIO_NET_F_MQ)
    | bit(virtio_net::VIRTIO_NET_F_CTRL_MAC_ADDR)
    | bit(virtio_net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | bit(virtio_net::VIRTIO_NET_F_RSS)
    | bit(virtio_net::VIRTIO_NET_F_HASH_REPORT);

/// What the bridge's control queue serves: multiqueue (`VQ_PAIRS_SET`).
/// Offered only when the backend has `VIRTIO_NET_F_MQ` and several pairs.
pub(super) const NET_SERVED_CTRL_FEATURES: u64 =
    bit(virtio_net::VIRTIO_NET_F_CTRL_VQ) | bit(virtio_net::VIRTIO_NET_F_MQ);

/// virtio-console `VIRTIO_CONSOLE_F_MULTIPORT` (virtio 1.2, 5.3.3);
/// virtio-bindings has no virtio_console module, so the bit is stated here.
pub(super) const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;

/// A feature bit number as a mask.
pub(super) const fn bit(n: u32) -> u64 {
    1 << n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_control_queue_features_are_withheld() {
        // The same bits as the virtio spec's 5.1.3 numbers.
        assert_eq!(
            NET_CTRL_FEATURES,
            (1 << 17)
                | (1 << 18)
                | (1 << 19)
                | (1 << 20)
                | (1 << 21)
                | (1 << 22)
                | (1 << 23)
                | (1 << 2)
                | (1 << 60)
                | (1 << 57)
        );
    }
}
