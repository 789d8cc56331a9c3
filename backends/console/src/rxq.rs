//! The receiveq: host input into the driver's buffers (virtio 1.2,
//! 5.3.6.1). Bytes are written in order, each chain filled as far as the
//! input goes; a chain with a device-readable descriptor or a buffer
//! outside guest memory is returned unused (length 0).

use mic_backend_common::guest::{writable_segments, write_segments};
use mic_backend_common::ring::RingGuard;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// What one [`fill`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// Bytes of the input placed in the ring.
    pub written: usize,
    /// Used entries were added (the driver may need a notification).
    pub used: bool,
    /// Malformed chains returned unused.
    pub bad_chains: u64,
}

/// Writes `data` into the chains the driver made available, until it is
/// all written or the ring has no buffers (or is broken); notifications are
/// on when it returns short.
pub fn fill(q: &mut Queue, mem: &GuestMemoryMmap, guard: &RingGuard, data: &[u8]) -> Fill {
    let mut f = Fill::default();
    while f.written < data.len() {
        let Some(chain) = guard.next(q, mem) else {
            if guard.more(q, mem) {
                continue;
            }
            break;
        };
        let head = chain.head_index();
        let n = match writable_segments(mem, chain) {
            Some(segs) => write_segments(mem, &segs, &data[f.written..]),
            None => {
                f.bad_chains += 1;
                0
            }
        };
        f.written += n;
        let _ = q.add_used(mem, head, n as u32);
        f.used = true;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::testing::{TestRing, BUFFERS};

    #[test]
    fn input_fills_buffers_in_order() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let h1 = ring.add(&[TestRing::inp(BUFFERS, 4)]);
        // Split, with an empty descriptor.
        let h2 = ring.add(&[
            TestRing::inp(BUFFERS + 0x100, 3),
            TestRing::inp(BUFFERS + 0x200, 0),
            TestRing::inp(BUFFERS + 0x300, 16),
        ]);
        let g = RingGuard::new(0);
        let f = fill(&mut q, &mem, &g, b"abcdefghij");
        assert_eq!(
            f,
            Fill {
                written: 10,
                used: true,
                bad_chains: 0
            }
        );
        assert_eq!(ring.used(), [(u32::from(h1), 4), (u32::from(h2), 6)]);
        assert_eq!(ring.read(BUFFERS, 4), b"abcd");
        assert_eq!(ring.read(BUFFERS + 0x100, 3), b"efg");
        assert_eq!(ring.read(BUFFERS + 0x300, 3), b"hij");
    }

    #[test]
    fn input_longer_than_the_buffers_waits() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.add(&[TestRing::inp(BUFFERS, 4)]);
        let g = RingGuard::new(0);
        let f = fill(&mut q, &mem, &g, b"abcdefghij");
        assert_eq!(f.written, 4);
        // A full (empty) ring: nothing more.
        let f = fill(&mut q, &mem, &g, b"efghij");
        assert_eq!(f, Fill::default());
        ring.add(&[TestRing::inp(BUFFERS + 0x100, 64)]);
        assert_eq!(fill(&mut q, &mem, &g, b"efghij").written, 6);
        assert_eq!(ring.read(BUFFERS + 0x100, 6), b"efghij");
    }

    #[test]
    fn a_full_ring_takes_what_it_holds() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        for i in 0..8 {
            ring.add(&[TestRing::inp(BUFFERS + 0x100 * i, 4)]);
        }
        let g = RingGuard::new(0);
        let data: Vec<u8> = (0..40).collect();
        let f = fill(&mut q, &mem, &g, &data);
        assert_eq!((f.written, f.used, f.bad_chains), (32, true, 0));
        assert_eq!(ring.used().len(), 8);
        assert!(ring.used().iter().all(|u| u.1 == 4));
        assert_eq!(ring.read(BUFFERS + 0x700, 4), [28, 29, 30, 31]);
        assert!(!g.is_broken());
    }

    #[test]
    fn malformed_buffers_go_back_empty() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let bad = [
            // Device-readable where the device writes.
            ring.add(&[TestRing::out(BUFFERS, 64)]),
            // Writable, then readable.
            ring.add(&[TestRing::inp(BUFFERS, 8), TestRing::out(BUFFERS, 8)]),
            // Zero-length.
            ring.add(&[TestRing::inp(BUFFERS, 0)]),
            // Outside guest memory.
            ring.add(&[TestRing::inp(1 << 40, 64)]),
        ];
        let good = ring.add(&[TestRing::inp(BUFFERS + 0x1000, 64)]);
        let g = RingGuard::new(0);
        let f = fill(&mut q, &mem, &g, b"xyz");
        assert_eq!((f.written, f.bad_chains), (3, 4));
        let mut want: Vec<(u32, u32)> = bad.iter().map(|h| (u32::from(*h), 0)).collect();
        want.push((u32::from(good), 3));
        assert_eq!(ring.used(), want);
    }

    #[test]
    fn nothing_to_write_takes_no_buffer() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.add(&[TestRing::inp(BUFFERS, 4)]);
        let g = RingGuard::new(0);
        assert_eq!(fill(&mut q, &mem, &g, b""), Fill::default());
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn a_broken_ring_takes_nothing() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.set_avail_idx(9);
        let g = RingGuard::new(0);
        assert_eq!(fill(&mut q, &mem, &g, b"abc"), Fill::default());
        assert!(g.is_broken());
    }
}
