//! Driver-to-device queues (the transmitq and the control transmitq):
//! every chain's bytes are handed over and the chain returned used with
//! length 0 (virtio 1.2, 5.3.6.1).
//!
//! A chain with a device-writable descriptor, a buffer outside guest
//! memory, a broken `next` link or more than `max` bytes is malformed.

use mic_backend_common::ring::RingGuard;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// Copies a driver-to-device chain (readable descriptors only) into `buf`,
/// at most `max` bytes. `None` for a malformed chain.
pub fn read_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut Vec<u8>,
    max: usize,
) -> Option<()> {
    buf.clear();
    let mut more = false;
    for d in chain {
        more = d.has_next();
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), len) || buf.len() + len > max {
            return None;
        }
        let start = buf.len();
        buf.resize(start + len, 0);
        mem.read_slice(&mut buf[start..], d.addr()).ok()?;
    }
    (!more).then_some(())
}

/// Drains every driver-to-device chain of a queue: hands each chain's bytes
/// to `each` (`None` for a malformed chain) with the chain's head, and
/// returns it used with length 0. Returns whether any chain was used (the
/// driver may need a notification).
pub fn drain_out(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    max: usize,
    mut each: impl FnMut(Option<&[u8]>, u16),
) -> bool {
    let mut buf = Vec::new();
    let mut used = false;
    loop {
        let _ = q.disable_notification(mem);
        while let Some(chain) = guard.next(q, mem) {
            let head = chain.head_index();
            let ok = read_chain(mem, chain, &mut buf, max).is_some();
            each(ok.then_some(&buf[..]), head);
            let _ = q.add_used(mem, head, 0);
            used = true;
        }
        if !guard.more(q, mem) {
            break;
        }
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::testing::{TestRing, BUFFERS};

    /// A chain's bytes (`None`: malformed) and its head.
    type Seen = (Option<Vec<u8>>, u16);

    /// Drains the ring, returning every chain's bytes with its head.
    fn drain_all(
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        g: &RingGuard,
        max: usize,
    ) -> (bool, Vec<Seen>) {
        let mut got = Vec::new();
        let used = drain_out(q, mem, g, max, |b, h| got.push((b.map(<[u8]>::to_vec), h)));
        (used, got)
    }

    #[test]
    fn chains_are_read_whole_and_in_order() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.write(BUFFERS, b"hello, world");
        let h1 = ring.add(&[TestRing::out(BUFFERS, 5)]);
        // Split over three descriptors, one of them empty.
        let h2 = ring.add(&[
            TestRing::out(BUFFERS + 5, 2),
            TestRing::out(BUFFERS + 0x100, 0),
            TestRing::out(BUFFERS + 7, 5),
        ]);
        let g = RingGuard::new(1);
        let (used, got) = drain_all(&mut q, &mem, &g, 64);
        assert!(used);
        assert_eq!(
            got,
            [
                (Some(b"hello".to_vec()), h1),
                (Some(b", world".to_vec()), h2)
            ]
        );
        assert_eq!(ring.used(), [(u32::from(h1), 0), (u32::from(h2), 0)]);
    }

    #[test]
    fn malformed_chains_are_reported_and_used() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let heads = [
            // Device-writable where the device reads.
            ring.add(&[TestRing::inp(BUFFERS, 8)]),
            // Readable, then writable.
            ring.add(&[TestRing::out(BUFFERS, 8), TestRing::inp(BUFFERS, 8)]),
            // Outside guest memory.
            ring.add(&[TestRing::out(1 << 40, 8)]),
            // More than `max` bytes, split.
            ring.add(&[TestRing::out(BUFFERS, 40), TestRing::out(BUFFERS, 40)]),
        ];
        // Zero-length: empty, not malformed.
        let empty = ring.add(&[TestRing::out(BUFFERS, 0)]);
        let g = RingGuard::new(1);
        let (_, got) = drain_all(&mut q, &mem, &g, 64);
        let mut want: Vec<Seen> = heads.iter().map(|h| (None, *h)).collect();
        want.push((Some(Vec::new()), empty));
        assert_eq!(got, want);
        assert_eq!(ring.used().len(), 5);
    }

    #[test]
    fn a_broken_ring_ends_the_drain() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.set_avail_idx(0x8000);
        let g = RingGuard::new(1);
        let (used, got) = drain_all(&mut q, &mem, &g, 64);
        assert!(!used);
        assert!(got.is_empty());
        assert!(g.is_broken());
    }
}
