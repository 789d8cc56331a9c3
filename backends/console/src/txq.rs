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
