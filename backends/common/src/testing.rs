//! A driver's side of a split virtqueue in plain guest memory, for unit
//! tests of queue handling (feature `test-utils`).
//!
//! The descriptor table and the available ring are `virtio-queue`'s
//! `MockSplitQueue`'s (at guest address 0); this type adds what the device
//! tests need on top: chains placed anywhere in the descriptor table, an
//! available index that wraps like a real driver's, a raw index for hostile
//! drivers, and the used ring and `avail_event` read back.
//!
//! The used ring is placed here, not by the mock: `MockSplitQueue` 0.18
//! puts it `size` bytes after the start of the available ring's entries
//! (`SplitQueueRing::end` counts entries, not bytes), so for rings of more
//! than two entries it overlaps the available ring (virtio 1.2, 2.7.2: the
//! available ring takes `6 + 2 * size` bytes).

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// First guest address free for buffers (the rings sit below it).
pub const BUFFERS: u64 = 0x10_0000;

/// A driver-side split virtqueue.
pub struct TestRing<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    size: u16,
    used_addr: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestRing<'a> {
    /// 16 MiB of guest memory at address 0.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("test memory")
    }

    /// A ring of `size` entries at address 0 of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        let mock = MockSplitQueue::new(mem, size);
        let avail_end = mock.avail_addr().0 + 6 + 2 * u64::from(size);
        let used_addr = avail_end.next_multiple_of(4);
        let ring = TestRing {
            mock,
            mem,
            size,
            used_addr,
            next_desc: 0,
            avail_idx: 0,
        };
        // Used ring header and entries, and `avail_event`, all zero.
        ring.write(used_addr, &vec![0; 6 + 8 * usize::from(size)]);
        ring
    }

    /// The device's queue for this ring (ready, addresses set).
    pub fn queue(&self) -> Queue {
        let mut q: Queue = self.mock.create_queue().expect("test queue");
        q.set_used_ring_address(
            Some(self.used_addr as u32),
            Some((self.used_addr >> 32) as u32),
        );
        q
    }

    /// A device-readable descriptor (driver to device).
    pub fn out(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    /// A device-writable descriptor (device to driver).
    pub fn inp(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    /// Links `descs` into one chain in the next free table slots (wrapping
    /// around the table), makes it available and returns its head.
    pub fn add(&mut self, descs: &[RawDescriptor]) -> u16 {
        let n = descs.len() as u16;
        let first = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let idx = (first + i as u16) % self.size;
            let (flags, next) = if i as u16 + 1 < n {
                (d.flags() | VRING_DESC_F_NEXT as u16, (idx + 1) % self.size)
            } else {
                (d.flags() & !(VRING_DESC_F_NEXT as u16), 0)
            };
            self.store_desc(idx, SplitDescriptor::new(d.addr().0, d.len(), flags, next));
        }
        self.next_desc = (first + n) % self.size;
        self.publish(first);
        first
    }

    /// Stores `descs` as they are (flags and `next` untouched) from table
    /// slot `at`, and makes `head` available.
    pub fn add_raw(&mut self, at: u16, descs: &[RawDescriptor], head: u16) {
        for (i, d) in descs.iter().enumerate() {
            self.store_desc(at + i as u16, SplitDescriptor::from(*d));
        }
        self.publish(head);
    }

    fn store_desc(&self, idx: u16, d: SplitDescriptor) {
        self.mock
            .desc_table()
            .store(idx, RawDescriptor::from(d))
            .expect("descriptor slot");
    }

    fn publish(&mut self, head: u16) {
        let slot = 4 + 2 * u64::from(self.avail_idx % self.size);
        self.write_u16(self.mock.avail_addr().0 + slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_u16(self.mock.avail_addr().0 + 2, self.avail_idx);
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY`: the device asks
    /// for no notifications).
    pub fn used_flags(&self) -> u16 {
        self.read_u16(self.used_addr)
    }

    /// Overwrites the available index (a hostile or confused driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write_u16(self.mock.avail_addr().0 + 2, idx);
    }

    /// The used entries so far: (head, length), oldest first (while fewer
    /// than the ring size were used).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let used = self.used_addr;
        let n = self.read_u16(used + 2);
        (0..n)
            .map(|i| {
                let e = used + 4 + 8 * u64::from(i % self.size);
                (self.read_u32(e), self.read_u32(e + 4))
            })
            .collect()
    }

    /// The device's `avail_event` (written with `EVENT_IDX`).
    pub fn avail_event(&self) -> u16 {
        self.read_u16(self.used_addr + 4 + 8 * u64::from(self.size))
    }

    /// Writes `data` to guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write");
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }

    fn write_u16(&self, addr: u64, v: u16) {
        self.write(addr, &v.to_le_bytes());
    }

    fn read_u16(&self, addr: u64) -> u16 {
        u16::from_le_bytes(self.read(addr, 2).try_into().unwrap())
    }

    fn read_u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.read(addr, 4).try_into().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_ring_does_not_overlap_the_available_ring() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let heads: Vec<u16> = (0..8)
            .map(|i| ring.add(&[TestRing::out(BUFFERS + i, 1)]))
            .collect();
        for h in &heads {
            let c = q.pop_descriptor_chain(&mem).unwrap();
            assert_eq!(c.head_index(), *h);
            q.add_used(&mem, *h, 1).unwrap();
        }
        let used: Vec<u32> = ring.used().iter().map(|u| u.0).collect();
        assert_eq!(used, (0..8).collect::<Vec<u32>>());
    }

    #[test]
    fn chains_wrap_around_the_table_and_the_ring() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 4);
        let mut q = ring.queue();
        for round in 0..3u64 {
            let head = ring.add(&[
                TestRing::out(BUFFERS + round, 1),
                TestRing::inp(BUFFERS + 0x100, 1),
                TestRing::inp(BUFFERS + 0x200, 1),
            ]);
            let c = q.pop_descriptor_chain(&mem).unwrap();
            assert_eq!(c.head_index(), head);
            let addrs: Vec<u64> = c.map(|d| d.addr().0).collect();
            assert_eq!(addrs, [BUFFERS + round, BUFFERS + 0x100, BUFFERS + 0x200]);
            q.add_used(&mem, head, 7).unwrap();
        }
        assert_eq!(ring.used(), [(0, 7), (3, 7), (2, 7)]);
    }
}
