//! The descriptors of a chain given by its head index.
//!
//! A device normally takes chains from the available ring through
//! `virtio-queue`, which builds them from the ring's entries. A chain taken
//! by an earlier backend and resubmitted after a restart (see
//! [`crate::inflight`]) is known only by its head: the available ring may
//! hold other heads by now, and `virtio-queue` 0.18 builds chains only from
//! the ring. [`descriptors`] walks the descriptor table from the head with
//! the rules of virtio 1.2, 2.7.5 (The Virtqueue Descriptor Table) and
//! 2.7.5.3 (Indirect Descriptors), as `virtio-queue` does, so a device
//! sees the same descriptors as when the chain was first taken:
//!
//! - a chain follows `next` while `VIRTQ_DESC_F_NEXT` is set, and has at
//!   most as many descriptors as its table has entries;
//! - a descriptor with `VIRTQ_DESC_F_INDIRECT` refers to a table of
//!   `len / 16` descriptors (`len` a multiple of 16), whose chain starts at
//!   its entry 0 and replaces the rest of the chain; an indirect table must
//!   not refer to another.
//!
//! A descriptor that cannot be read, a `next` outside its table or a
//! malformed indirect table ends the chain there: the device gets the
//! descriptors before it, as with `virtio-queue`'s iterator.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes of one descriptor.
const DESC_LEN: u64 = 16;

/// The descriptors of the chain at `head` of the descriptor table at
/// guest address `table` with `size` entries; indirect tables are followed.
pub fn descriptors(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let (mut table, mut size, mut index) = (table, size, head);
    let mut indirect = false;
    let mut ttl = size;
    while ttl > 0 && index < size {
        ttl -= 1;
        let Some(addr) = table.checked_add(u64::from(index) * DESC_LEN) else {
            break;
        };
        let Ok(d) = mem.read_obj::<Descriptor>(GuestAddress(addr)) else {
            break;
        };
        if d.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            let entries = u64::from(d.len()) / DESC_LEN;
            if indirect
                || !u64::from(d.len()).is_multiple_of(DESC_LEN)
                || entries > u64::from(u16::MAX)
            {
                break;
            }
            table = d.addr().0;
            size = entries as u16;
            index = 0;
            ttl = size;
            indirect = true;
            continue;
        }
        let next = (d.flags() & VRING_DESC_F_NEXT as u16 != 0).then(|| d.next());
        out.push(d);
        match next {
            Some(n) => index = n,
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestRing, BUFFERS};
    use virtio_queue::QueueT;

    /// The chain `virtio-queue` builds for the next available entry, and
    /// ours for the same head.
    fn both(ring: &TestRing, mem: &GuestMemoryMmap) -> (Vec<Descriptor>, Vec<Descriptor>) {
        let mut q = ring.queue();
        let c = q.pop_descriptor_chain(mem).unwrap();
        let ours = descriptors(mem, q.desc_table(), q.size(), c.head_index());
        (c.collect(), ours)
    }

    fn addrs(d: &[Descriptor]) -> Vec<u64> {
        d.iter().map(|d| d.addr().0).collect()
    }

    #[test]
    fn direct_chain_matches_virtio_queue() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        ring.add(&[
            TestRing::out(BUFFERS, 16),
            TestRing::inp(BUFFERS + 0x100, 512),
            TestRing::inp(BUFFERS + 0x400, 1),
        ]);
        let (theirs, ours) = both(&ring, &mem);
        assert_eq!(addrs(&ours), [BUFFERS, BUFFERS + 0x100, BUFFERS + 0x400]);
        assert_eq!(addrs(&ours), addrs(&theirs));
        assert!(ours[1].is_write_only());
    }

    #[test]
    fn indirect_table_is_followed() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let itable = BUFFERS + 0x8000;
        let entries = [
            Descriptor::new(BUFFERS, 16, VRING_DESC_F_NEXT as u16, 1),
            Descriptor::new(BUFFERS + 0x200, 1, 2, 0),
        ];
        for (i, e) in entries.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(itable + 16 * i as u64))
                .unwrap();
        }
        let ind = virtio_queue::desc::RawDescriptor::from(Descriptor::new(
            itable,
            32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        ring.add_raw(5, &[ind], 5);
        let (theirs, ours) = both(&ring, &mem);
        assert_eq!(addrs(&ours), [BUFFERS, BUFFERS + 0x200]);
        assert_eq!(addrs(&ours), addrs(&theirs));
    }

    #[test]
    fn malformed_chains_end_where_they_break() {
        let mem = TestRing::memory();
        let ring = TestRing::new(&mem, 4);
        let q = ring.queue();
        let t = q.desc_table();
        let put = |i: u64, d: Descriptor| mem.write_obj(d, GuestAddress(t + 16 * i)).unwrap();
        // A loop: 0 -> 1 -> 0 ... stops after the table's size.
        put(0, Descriptor::new(BUFFERS, 1, VRING_DESC_F_NEXT as u16, 1));
        put(1, Descriptor::new(BUFFERS, 1, VRING_DESC_F_NEXT as u16, 0));
        assert_eq!(descriptors(&mem, t, 4, 0).len(), 4);
        // `next` outside the table.
        put(2, Descriptor::new(BUFFERS, 1, VRING_DESC_F_NEXT as u16, 9));
        assert_eq!(descriptors(&mem, t, 4, 2).len(), 1);
        // An indirect table of a length that is not a multiple of 16.
        put(
            3,
            Descriptor::new(BUFFERS, 20, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert!(descriptors(&mem, t, 4, 3).is_empty());
        // A head outside the table, and a table outside guest memory.
        assert!(descriptors(&mem, t, 4, 4).is_empty());
        assert!(descriptors(&mem, u64::MAX - 8, 4, 0).is_empty());
    }

    #[test]
    fn nested_indirect_tables_are_refused() {
        let mem = TestRing::memory();
        let ring = TestRing::new(&mem, 4);
        let t = ring.queue().desc_table();
        let inner = BUFFERS + 0x9000;
        mem.write_obj(
            Descriptor::new(inner, 16, VRING_DESC_F_INDIRECT as u16, 0),
            GuestAddress(inner),
        )
        .unwrap();
        mem.write_obj(
            Descriptor::new(inner, 16, VRING_DESC_F_INDIRECT as u16, 0),
            GuestAddress(t),
        )
        .unwrap();
        assert!(descriptors(&mem, t, 4, 0).is_empty());
    }
}
