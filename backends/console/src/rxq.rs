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
