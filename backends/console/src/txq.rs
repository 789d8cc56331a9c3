//! Driver-to-device queues (the transmitq and the control transmitq):
//! every chain's bytes are handed over and the chain returned used with
//! length 0 (virtio 1.2, 5.3.6.1).
//!
//! A chain with a device-writable descriptor, a buffer outside guest
//! memory, a broken `next` link or more than `max` bytes is malformed.
//! Control messages are copied whole ([`drain_out`]); card output is handed
//! on in pieces of bounded size ([`drain_out_pieces`]), so a long chain
//! needs no buffer of its length.

use mic_backend_common::ring::RingGuard;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

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

/// The chain's length if it is well formed: readable descriptors only,
/// each inside guest memory, at most `max` bytes in all, and no `next`
/// link left dangling. Reads no data.
fn chain_len(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max: usize,
) -> Option<usize> {
    let mut total = 0usize;
    let mut more = false;
    for d in chain {
        more = d.has_next();
        let len = d.len() as usize;
        if d.is_write_only() || (len != 0 && !mem.check_range(d.addr(), len)) {
            return None;
        }
        total = total.checked_add(len).filter(|&t| t <= max)?;
    }
    (!more).then_some(total)
}

/// Drains the transmitq: every chain of at most `max` bytes is handed to
/// `each` in pieces of at most `piece` bytes, in order (a chain with no data
/// as one empty piece); a malformed or longer chain once as `None`. Each
/// chain is returned used with length 0. Returns whether any chain was used.
///
/// The chain is checked whole before any of it is handed on, so a chain
/// that turns out malformed produces no output.
pub fn drain_out_pieces(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    piece: usize,
    max: usize,
    mut each: impl FnMut(Option<&[u8]>, u16),
) -> bool {
    let mut buf = Vec::with_capacity(piece.min(max));
    let mut used = false;
    loop {
        let _ = q.disable_notification(mem);
        while let Some(chain) = guard.next(q, mem) {
            let head = chain.head_index();
            match chain_len(mem, chain.clone(), max) {
                Some(_) => {
                    if !copy_pieces(mem, chain, &mut buf, piece, |b| each(Some(b), head)) {
                        each(None, head);
                    }
                }
                None => each(None, head),
            }
            let _ = q.add_used(mem, head, 0);
            used = true;
        }
        if !guard.more(q, mem) {
            break;
        }
    }
    used
}

/// Copies a checked chain's bytes through `buf`, handing on every `piece`
/// bytes (and the rest, or one empty piece for an empty chain). False if
/// guest memory could not be read.
fn copy_pieces(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut Vec<u8>,
    piece: usize,
    mut out: impl FnMut(&[u8]),
) -> bool {
    buf.clear();
    let mut handed = false;
    for d in chain {
        let mut done = 0usize;
        let len = d.len() as usize;
        while done < len {
            let n = (len - done).min(piece - buf.len());
            let start = buf.len();
            buf.resize(start + n, 0);
            let Some(addr) = d.addr().checked_add(done as u64) else {
                return false;
            };
            if mem.read_slice(&mut buf[start..], addr).is_err() {
                return false;
            }
            done += n;
            if buf.len() == piece {
                out(buf);
                handed = true;
                buf.clear();
            }
        }
    }
    if !buf.is_empty() || !handed {
        out(buf);
    }
    true
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
    fn long_chains_come_in_pieces_and_overlong_ones_are_malformed() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 16);
        let mut q = ring.queue();
        let data: Vec<u8> = (0..100u8).collect();
        ring.write(BUFFERS, &data);
        // 100 bytes over three descriptors (one empty), pieces of 16.
        let h1 = ring.add(&[
            TestRing::out(BUFFERS, 30),
            TestRing::out(BUFFERS + 0x400, 0),
            TestRing::out(BUFFERS + 30, 70),
        ]);
        // Exactly one piece, then an empty chain.
        let h2 = ring.add(&[TestRing::out(BUFFERS, 16)]);
        let h3 = ring.add(&[TestRing::out(BUFFERS, 0)]);
        // Over `max`, or well formed only up to a writable descriptor.
        let h4 = ring.add(&[TestRing::out(BUFFERS, 100), TestRing::out(BUFFERS, 29)]);
        let h5 = ring.add(&[TestRing::out(BUFFERS, 40), TestRing::inp(BUFFERS, 8)]);
        let g = RingGuard::new(1);
        let mut got: Vec<Seen> = Vec::new();
        let used = drain_out_pieces(&mut q, &mem, &g, 16, 128, |b, h| {
            got.push((b.map(<[u8]>::to_vec), h))
        });
        assert!(used);
        let mut want: Vec<Seen> = data.chunks(16).map(|c| (Some(c.to_vec()), h1)).collect();
        want.push((Some(data[..16].to_vec()), h2));
        want.push((Some(Vec::new()), h3));
        want.push((None, h4));
        want.push((None, h5));
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
