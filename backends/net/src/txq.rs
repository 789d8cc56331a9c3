//! Draining the TX queue: every chain is one packet (virtio-net header +
//! frame) for the host side (virtio 1.2, 5.1.6.2).
//!
//! A chain with a device-writable descriptor, a buffer outside guest memory,
//! a broken `next` link, or more bytes than the largest packet is returned
//! (used, length 0) and its packet dropped.

use mic_backend_common::ring::RingGuard;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

/// Smallest Ethernet frame accepted (a bare header).
pub const MIN_FRAME: usize = 14;

/// Where the packets go.
pub trait TxSink {
    /// Whether the sink takes packets now; draining stops (notifications
    /// on) while it does not.
    fn ready(&self) -> bool {
        true
    }
    /// Sends one packet (`hdr_len` bytes of header, then the frame);
    /// false if it was lost.
    fn send(&mut self, packet: &[u8], hdr_len: usize) -> bool;
}

/// What one drain did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxTally {
    /// Used entries were added (the driver may need a notification).
    pub used: bool,
    /// Packets the sink took.
    pub sent: u64,
    /// Packets the sink lost.
    pub lost: u64,
    /// Chains dropped as malformed or too short.
    pub malformed: u64,
}

/// Sends every packet the driver made available to `sink`, using `buf`
/// (sized for the largest packet) to gather it.
pub fn drain(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    buf: &mut [u8],
    hdr_len: usize,
    sink: &mut impl TxSink,
) -> TxTally {
    let mut tally = TxTally::default();
    'outer: loop {
        let _ = q.disable_notification(mem);
        loop {
            if !sink.ready() {
                // Resumed when the sink drains.
                break 'outer;
            }
            let Some(chain) = guard.next(q, mem) else {
                break;
            };
            let head = chain.head_index();
            match read_chain(mem, chain, buf) {
                Some(n) if n >= hdr_len + MIN_FRAME => {
                    if sink.send(&buf[..n], hdr_len) {
                        tally.sent += 1;
                    } else {
                        tally.lost += 1;
                    }
                }
                _ => {
                    log::debug!("tx: dropping malformed chain {head}");
                    tally.malformed += 1;
                }
            }
            let _ = q.add_used(mem, head, 0);
            tally.used = true;
        }
        if !guard.more(q, mem) {
            break;
        }
    }
    let _ = q.enable_notification(mem);
    tally
}

/// Copies a TX chain into `buf`; `None` if the chain is malformed (writable
/// descriptor, outside guest memory, or larger than `buf`).
pub fn read_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Option<usize> {
    let mut off = 0usize;
    let mut more = false;
    for d in chain {
        more = d.has_next();
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        let end = off.checked_add(len)?;
        if end > buf.len() {
            return None;
        }
        if len > 0 {
            mem.read_slice(&mut buf[off..end], d.addr()).ok()?;
        }
        off = end;
    }
    (!more).then_some(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::testing::{TestRing, BUFFERS};
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

    use crate::backend::HDR_LEN_V1;

    const BUF: usize = 2048;

    /// Records what it is sent; `ready` and `fail` steer it.
    #[derive(Default)]
    struct Sink {
        sent: Vec<Vec<u8>>,
        not_ready: bool,
        fail: bool,
    }

    impl TxSink for Sink {
        fn ready(&self) -> bool {
            !self.not_ready
        }
        fn send(&mut self, packet: &[u8], hdr_len: usize) -> bool {
            self.sent.push(packet[hdr_len..].to_vec());
            !self.fail
        }
    }

    fn packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN_V1];
        p.extend((0..len).map(|i| i as u8));
        p
    }

    #[test]
    fn one_descriptor_and_split_packets_are_sent_whole() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 16);
        let mut q = ring.queue();
        let p1 = packet(100);
        ring.write(BUFFERS, &p1);
        let h1 = ring.add(&[TestRing::out(BUFFERS, p1.len() as u32)]);
        // Header, an empty descriptor, then the frame in two pieces.
        let p2 = packet(300);
        ring.write(BUFFERS + 0x1000, &p2);
        let h2 = ring.add(&[
            TestRing::out(BUFFERS + 0x1000, HDR_LEN_V1 as u32),
            TestRing::out(BUFFERS + 0x3000, 0),
            TestRing::out(BUFFERS + 0x1000 + HDR_LEN_V1 as u64, 100),
            TestRing::out(BUFFERS + 0x1000 + HDR_LEN_V1 as u64 + 100, 200),
        ]);
        let g = RingGuard::new(1);
        let mut sink = Sink::default();
        let mut buf = vec![0u8; BUF];
        let t = drain(&mut q, &mem, &g, &mut buf, HDR_LEN_V1, &mut sink);
        assert_eq!(
            t,
            TxTally {
                used: true,
                sent: 2,
                lost: 0,
                malformed: 0
            }
        );
        assert_eq!(
            sink.sent,
            [p1[HDR_LEN_V1..].to_vec(), p2[HDR_LEN_V1..].to_vec()]
        );
        assert_eq!(ring.used(), [(u32::from(h1), 0), (u32::from(h2), 0)]);
    }

    #[test]
    fn malformed_chains_are_used_and_dropped() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 16);
        let mut q = ring.queue();
        ring.write(BUFFERS, &packet(BUF));
        let bad = [
            // A device-writable descriptor in a TX chain.
            ring.add(&[
                TestRing::out(BUFFERS, HDR_LEN_V1 as u32),
                TestRing::inp(BUFFERS + 0x100, 64),
            ]),
            // Only device-writable.
            ring.add(&[TestRing::inp(BUFFERS, 64)]),
            // Shorter than a header and an Ethernet header.
            ring.add(&[TestRing::out(BUFFERS, (HDR_LEN_V1 + MIN_FRAME - 1) as u32)]),
            // All zero-length.
            ring.add(&[TestRing::out(BUFFERS, 0)]),
            // Larger than the largest packet.
            ring.add(&[
                TestRing::out(BUFFERS, BUF as u32),
                TestRing::out(BUFFERS, 1),
            ]),
            // Outside guest memory.
            ring.add(&[TestRing::out(1 << 40, 64)]),
        ];
        // `next` beyond the descriptor table.
        ring.add_raw(
            12,
            &[RawDescriptor::from(SplitDescriptor::new(
                BUFFERS,
                64,
                VRING_DESC_F_NEXT as u16,
                999,
            ))],
            12,
        );
        let g = RingGuard::new(1);
        let mut sink = Sink::default();
        let mut buf = vec![0u8; BUF];
        let t = drain(&mut q, &mem, &g, &mut buf, HDR_LEN_V1, &mut sink);
        assert_eq!(t.malformed, 7);
        assert_eq!(t.sent, 0);
        assert!(sink.sent.is_empty());
        let used: Vec<u32> = ring.used().iter().map(|u| u.0).collect();
        let mut want: Vec<u32> = bad.iter().map(|h| u32::from(*h)).collect();
        want.push(12);
        assert_eq!(used, want);
        assert!(ring.used().iter().all(|u| u.1 == 0));
    }

    #[test]
    fn a_sink_that_is_not_ready_leaves_the_chains() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.write(BUFFERS, &packet(60));
        ring.add(&[TestRing::out(BUFFERS, (HDR_LEN_V1 + 60) as u32)]);
        let g = RingGuard::new(1);
        let mut sink = Sink {
            not_ready: true,
            ..Default::default()
        };
        let mut buf = vec![0u8; BUF];
        let t = drain(&mut q, &mem, &g, &mut buf, HDR_LEN_V1, &mut sink);
        assert_eq!(t, TxTally::default());
        assert!(ring.used().is_empty());
        // Ready again: the packet goes, and a lost one is counted.
        sink.not_ready = false;
        sink.fail = true;
        let t = drain(&mut q, &mem, &g, &mut buf, HDR_LEN_V1, &mut sink);
        assert_eq!((t.sent, t.lost), (0, 1));
        assert_eq!(ring.used().len(), 1);
    }

    #[test]
    fn a_broken_ring_ends_the_drain() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.set_avail_idx(9);
        let g = RingGuard::new(1);
        let mut sink = Sink::default();
        let mut buf = vec![0u8; BUF];
        let t = drain(&mut q, &mem, &g, &mut buf, HDR_LEN_V1, &mut sink);
        assert_eq!(t, TxTally::default());
        assert!(g.is_broken());
        assert_eq!(q.next_avail(), 0);
    }
}
