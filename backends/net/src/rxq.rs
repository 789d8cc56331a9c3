//! Placing one received packet (virtio-net header + frame) in the RX queue
//! (virtio 1.2, 5.1.6.3 and 5.1.6.4).
//!
//! Without `VIRTIO_NET_F_MRG_RXBUF` a packet goes into one chain. With it,
//! chains are gathered until the packet fits and `num_buffers` in the header
//! says how many were used. A chain with a readable descriptor or a buffer
//! outside guest memory is returned unused (length 0).

use mic_backend_common::guest::{writable_segments, write_segments, Segments};
use mic_backend_common::ring::{Pop, RingGuard};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::backend::HDR_LEN_V1;

/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS: usize = 10;

/// What became of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The packet is in the ring.
    Delivered,
    /// The packet was dropped: the next buffer cannot hold it, or all the
    /// buffers a full ring can hold together cannot.
    Dropped,
    /// Not enough buffers now. `seen` is the available index that was
    /// looked at: try again once the driver adds chains beyond it (see
    /// `RingGuard::notify_on_new_chains`). Also returned for a broken ring.
    NoBuffers {
        /// The driver's available index when the buffers ran out.
        seen: u16,
    },
}

/// Places `data` (a header of `hdr_len` bytes, then the frame) in the ring.
/// Returns the outcome and whether used entries were added (the driver may
/// need a notification).
pub fn deliver(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    data: &mut [u8],
    mrg: bool,
    hdr_len: usize,
) -> (RxOutcome, bool) {
    if mrg {
        deliver_mergeable(q, mem, guard, data)
    } else {
        deliver_single(q, mem, guard, data, hdr_len)
    }
}

fn deliver_single(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    data: &mut [u8],
    hdr_len: usize,
) -> (RxOutcome, bool) {
    let mut used = false;
    loop {
        let seen = q.next_avail();
        let chain = match guard.pop(q, mem) {
            Pop::Chain(c) => c,
            Pop::Empty | Pop::Broken => return (RxOutcome::NoBuffers { seen }, used),
        };
        let head = chain.head_index();
        let Some(segs) = writable_segments(mem, chain) else {
            let _ = q.add_used(mem, head, 0);
            used = true;
            continue;
        };
        let cap: usize = segs.iter().map(|s| s.1).sum();
        if cap < data.len() {
            // Buffer too small for this frame: keep the buffer.
            q.go_to_previous_position();
            return (RxOutcome::Dropped, used);
        }
        if hdr_len == HDR_LEN_V1 {
            data[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
        }
        let n = write_segments(mem, &segs, data);
        let _ = q.add_used(mem, head, n as u32);
        return (RxOutcome::Delivered, true);
    }
}

fn deliver_mergeable(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    data: &mut [u8],
) -> (RxOutcome, bool) {
    let mut used = false;
    let mut chains: Vec<(u16, Option<Segments>)> = Vec::new();
    let mut cap = 0usize;
    while cap < data.len() {
        let seen = q.next_avail();
        match guard.pop(q, mem) {
            Pop::Chain(chain) => {
                let head = chain.head_index();
                let segs = writable_segments(mem, chain);
                if segs.is_none() && chains.is_empty() {
                    // A malformed buffer at the front goes back unused.
                    let _ = q.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
                if let Some(s) = &segs {
                    cap += s.iter().map(|s| s.1).sum::<usize>();
                }
                chains.push((head, segs));
            }
            Pop::Empty | Pop::Broken => {
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                // Every buffer a full ring holds is not enough: waiting
                // for more would wait forever.
                if chains.len() >= usize::from(q.size()) {
                    return (RxOutcome::Dropped, used);
                }
                return (RxOutcome::NoBuffers { seen }, used);
            }
        }
    }
    let nbufs = chains.iter().filter(|c| c.1.is_some()).count() as u16;
    data[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&nbufs.to_le_bytes());
    // Malformed chains go back first, so that the packet's `num_buffers`
    // used entries follow each other.
    for (head, segs) in &chains {
        if segs.is_none() {
            let _ = q.add_used(mem, *head, 0);
        }
    }
    let mut off = 0;
    for (head, segs) in &chains {
        if let Some(segs) = segs {
            let n = write_segments(mem, segs, &data[off..]);
            off += n;
            let _ = q.add_used(mem, *head, n as u32);
        }
    }
    (RxOutcome::Delivered, true)
}
