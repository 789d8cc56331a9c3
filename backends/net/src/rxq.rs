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

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::testing::{TestRing, BUFFERS};

    use crate::backend::HDR_LEN_LEGACY;

    /// A packet with a zero V1 header and a frame of `len` bytes.
    fn packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN_V1];
        p.extend((0..len).map(|i| (i * 7) as u8));
        p
    }

    fn num_buffers(h: &[u8]) -> u16 {
        u16::from_le_bytes([h[NUM_BUFFERS], h[NUM_BUFFERS + 1]])
    }

    #[test]
    fn one_buffer_per_packet() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let h = ring.add(&[TestRing::inp(BUFFERS, 2048)]);
        let g = RingGuard::new(0);
        let mut p = packet(100);
        let r = deliver(&mut q, &mem, &g, &mut p, false, HDR_LEN_V1);
        assert_eq!(r, (RxOutcome::Delivered, true));
        assert_eq!(ring.used(), [(u32::from(h), p.len() as u32)]);
        let got = ring.read(BUFFERS, p.len());
        assert_eq!(num_buffers(&got), 1);
        assert_eq!(got[HDR_LEN_V1..], p[HDR_LEN_V1..]);
    }

    #[test]
    fn legacy_header_has_no_num_buffers() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.add(&[TestRing::inp(BUFFERS, 2048)]);
        let g = RingGuard::new(0);
        let mut p = vec![0xaa; HDR_LEN_LEGACY + 60];
        p[..HDR_LEN_LEGACY].fill(0);
        let r = deliver(&mut q, &mem, &g, &mut p, false, HDR_LEN_LEGACY);
        assert_eq!(r.0, RxOutcome::Delivered);
        assert_eq!(ring.read(BUFFERS, p.len()), p);
    }

    #[test]
    fn a_chain_of_several_buffers_takes_one_packet() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        // Header buffer, an empty one, then two pieces for the frame.
        ring.add(&[
            TestRing::inp(BUFFERS, HDR_LEN_V1 as u32),
            TestRing::inp(BUFFERS + 0x100, 0),
            TestRing::inp(BUFFERS + 0x1000, 50),
            TestRing::inp(BUFFERS + 0x2000, 1000),
        ]);
        let g = RingGuard::new(0);
        let mut p = packet(200);
        assert_eq!(
            deliver(&mut q, &mem, &g, &mut p, false, HDR_LEN_V1).0,
            RxOutcome::Delivered
        );
        let mut got = ring.read(BUFFERS, HDR_LEN_V1);
        got.extend(ring.read(BUFFERS + 0x1000, 50));
        got.extend(ring.read(BUFFERS + 0x2000, 150));
        assert_eq!(got[HDR_LEN_V1..], p[HDR_LEN_V1..]);
        assert_eq!(ring.used()[0].1, p.len() as u32);
    }

    #[test]
    fn a_buffer_too_small_drops_the_packet_and_stays() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let h = ring.add(&[TestRing::inp(BUFFERS, 100)]);
        let g = RingGuard::new(0);
        let mut big = packet(200);
        assert_eq!(
            deliver(&mut q, &mem, &g, &mut big, false, HDR_LEN_V1),
            (RxOutcome::Dropped, false)
        );
        assert!(ring.used().is_empty());
        let mut small = packet(60);
        assert_eq!(
            deliver(&mut q, &mem, &g, &mut small, false, HDR_LEN_V1).0,
            RxOutcome::Delivered
        );
        assert_eq!(ring.used(), [(u32::from(h), small.len() as u32)]);
    }

    #[test]
    fn malformed_buffers_go_back_empty() {
        for mrg in [false, true] {
            let mem = TestRing::memory();
            let mut ring = TestRing::new(&mem, 8);
            let mut q = ring.queue();
            // Device-readable, zero-length, outside guest memory, then good.
            let bad = [
                ring.add(&[TestRing::out(BUFFERS, 2048)]),
                ring.add(&[TestRing::inp(BUFFERS, 0)]),
                ring.add(&[TestRing::inp(1 << 40, 2048)]),
            ];
            let good = ring.add(&[TestRing::inp(BUFFERS + 0x1000, 2048)]);
            let g = RingGuard::new(0);
            let mut p = packet(100);
            let r = deliver(&mut q, &mem, &g, &mut p, mrg, HDR_LEN_V1);
            assert_eq!(r, (RxOutcome::Delivered, true), "mrg {mrg}");
            let used = ring.used();
            assert_eq!(
                used,
                [
                    (u32::from(bad[0]), 0),
                    (u32::from(bad[1]), 0),
                    (u32::from(bad[2]), 0),
                    (u32::from(good), p.len() as u32)
                ],
                "mrg {mrg}"
            );
        }
    }

    #[test]
    fn an_empty_ring_has_no_buffers() {
        for mrg in [false, true] {
            let mem = TestRing::memory();
            let ring = TestRing::new(&mem, 8);
            let mut q = ring.queue();
            let g = RingGuard::new(0);
            let mut p = packet(100);
            let r = deliver(&mut q, &mem, &g, &mut p, mrg, HDR_LEN_V1);
            assert_eq!(r, (RxOutcome::NoBuffers { seen: 0 }, false));
            assert!(!g.is_broken());
        }
    }

    #[test]
    fn mergeable_packet_spreads_over_buffers() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let heads: Vec<u16> = (0..4)
            .map(|i| ring.add(&[TestRing::inp(BUFFERS + 0x1000 * i, 512)]))
            .collect();
        let g = RingGuard::new(0);
        let mut p = packet(1200);
        assert_eq!(
            deliver(&mut q, &mem, &g, &mut p, true, HDR_LEN_V1),
            (RxOutcome::Delivered, true)
        );
        // 1212 bytes: 512 + 512 + 188; the fourth buffer stays posted.
        assert_eq!(
            ring.used(),
            [
                (u32::from(heads[0]), 512),
                (u32::from(heads[1]), 512),
                (u32::from(heads[2]), 188)
            ]
        );
        let mut got = Vec::new();
        for (i, len) in [(0u64, 512), (1, 512), (2, 188)] {
            got.extend(ring.read(BUFFERS + 0x1000 * i, len));
        }
        assert_eq!(num_buffers(&got), 3);
        assert_eq!(got[HDR_LEN_V1..], p[HDR_LEN_V1..]);
        assert_eq!(q.next_avail(), 3);
    }

    #[test]
    fn too_few_mergeable_buffers_are_put_back() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.add(&[TestRing::inp(BUFFERS, 512)]);
        ring.add(&[TestRing::inp(BUFFERS + 0x1000, 512)]);
        let g = RingGuard::new(0);
        let mut p = packet(1200);
        let r = deliver(&mut q, &mem, &g, &mut p, true, HDR_LEN_V1);
        assert_eq!(r, (RxOutcome::NoBuffers { seen: 2 }, false));
        assert_eq!(q.next_avail(), 0, "both buffers put back");
        assert!(ring.used().is_empty());
        // One more buffer and the packet fits.
        ring.add(&[TestRing::inp(BUFFERS + 0x2000, 512)]);
        let r = deliver(&mut q, &mem, &g, &mut p, true, HDR_LEN_V1);
        assert_eq!(r.0, RxOutcome::Delivered);
        assert_eq!(ring.used().len(), 3);
    }

    #[test]
    fn a_full_ring_too_small_for_the_packet_drops_it() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 4);
        let mut q = ring.queue();
        for i in 0..4 {
            ring.add(&[TestRing::inp(BUFFERS + 0x1000 * i, 64)]);
        }
        let g = RingGuard::new(0);
        let mut p = packet(1000);
        let r = deliver(&mut q, &mem, &g, &mut p, true, HDR_LEN_V1);
        assert_eq!(r, (RxOutcome::Dropped, false));
        assert_eq!(q.next_avail(), 0, "buffers kept for the next packet");
        let mut small = packet(100);
        let r = deliver(&mut q, &mem, &g, &mut small, true, HDR_LEN_V1);
        assert_eq!(r.0, RxOutcome::Delivered);
        assert_eq!(ring.used().len(), 2);
    }

    #[test]
    fn a_broken_ring_has_no_buffers_and_stays_broken() {
        for mrg in [false, true] {
            let mem = TestRing::memory();
            let mut ring = TestRing::new(&mem, 8);
            let mut q = ring.queue();
            ring.set_avail_idx(100);
            let g = RingGuard::new(0);
            let mut p = packet(100);
            let r = deliver(&mut q, &mem, &g, &mut p, mrg, HDR_LEN_V1);
            assert!(matches!(r.0, RxOutcome::NoBuffers { .. }));
            assert!(g.is_broken());
            // What the worker does next: no retry.
            assert!(!g.notify_on_new_chains(&mut q, &mem, 0));
        }
    }
}
