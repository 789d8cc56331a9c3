//! Taking chains from a driver's available ring without trusting it.
//!
//! `virtio-queue`'s `pop_descriptor_chain` returns `None` both for an empty
//! ring and for a ring whose available index the driver moved more than the
//! queue size past the device's position (virtio 1.2, 2.7.13: the driver
//! never makes more than `queue size` entries available at once), and it
//! logs an error each time. `enable_notification` meanwhile keeps answering
//! "more work" for such a ring, so the usual drain loop
//! (`pop` until `None`, then loop while `enable_notification` is true) spins
//! forever, logging once per turn.
//!
//! [`RingGuard`] is the one place where the daemons take chains: it tells the
//! two cases apart, stops serving a broken ring (logged once), and serves it
//! again only after the frontend has reset it (`GET_VRING_BASE`, which
//! `vhost-user-backend` passes on as `VhostUserBackend::stop_vring`) or a new
//! frontend has connected. The worker thread then sleeps in epoll like for
//! an idle ring; kicks on the broken ring cost one atomic load each.

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// Broken-ring lines: a frontend can reset a ring and the driver break it
/// again, or a new frontend come, in a loop.
static BROKEN_RING_LINES: crate::ratelimit::LogLimiter = crate::ratelimit::per_minute();

/// Why a ring stopped being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breakage {
    /// The available index is more than the queue size ahead of the
    /// device's position.
    AvailIndex {
        /// The driver's available index.
        avail: u16,
        /// The device's next position in the available ring.
        next: u16,
    },
    /// The available ring could not be read from guest memory.
    Unreadable,
}

/// What [`RingGuard::pop`] found.
#[derive(Debug)]
pub enum Pop<'m> {
    /// The next chain the driver made available.
    Chain(DescriptorChain<&'m GuestMemoryMmap>),
    /// Nothing available (or the queue is not set up).
    Empty,
    /// The ring is broken and not served until it is reset.
    Broken,
}

/// One queue's guard against a driver that corrupts its available ring.
#[derive(Debug)]
pub struct RingGuard {
    index: usize,
    broken: AtomicBool,
}

impl RingGuard {
    /// A guard for queue `index` (used in the log line).
    pub fn new(index: usize) -> Self {
        RingGuard {
            index,
            broken: AtomicBool::new(false),
        }
    }

    /// Whether the ring is currently not served.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Serves the ring again: the frontend reset it, or a new one came.
    pub fn reset(&self) {
        self.broken.store(false, Ordering::Release);
    }

    fn mark(&self, why: Breakage) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            crate::limited!(
                BROKEN_RING_LINES,
                warn,
                "queue {}: broken available ring ({why:?}); not served until the frontend resets it",
                self.index
            );
        }
    }

    /// The next available chain, telling an empty ring from a broken one.
    pub fn pop<'m>(&self, q: &mut Queue, mem: &'m GuestMemoryMmap) -> Pop<'m> {
        if self.is_broken() {
            return Pop::Broken;
        }
        if !q.ready() {
            return Pop::Empty;
        }
        let avail = match q.avail_idx(mem, Ordering::Acquire) {
            Ok(i) => i,
            Err(_) => {
                self.mark(Breakage::Unreadable);
                return Pop::Broken;
            }
        };
        let next = Wrapping(q.next_avail());
        if avail == next {
            return Pop::Empty;
        }
        if (avail - next).0 > q.size() {
            self.mark(Breakage::AvailIndex {
                avail: avail.0,
                next: next.0,
            });
            return Pop::Broken;
        }
        // `iter` re-reads the index; a driver that moved it in between is
        // caught there. `next` only fails to produce a chain for an entry
        // it cannot read (the index was seen ahead of us above).
        match q.iter(mem) {
            Ok(mut it) => match it.next() {
                Some(chain) => Pop::Chain(chain),
                None => {
                    self.mark(Breakage::Unreadable);
                    Pop::Broken
                }
            },
            Err(virtio_queue::Error::QueueNotReady) => Pop::Empty,
            Err(_) => {
                let now = q.avail_idx(mem, Ordering::Acquire).map_or(avail.0, |i| i.0);
                self.mark(Breakage::AvailIndex {
                    avail: now,
                    next: next.0,
                });
                Pop::Broken
            }
        }
    }

    /// [`RingGuard::pop`] as an `Option`: `None` when empty or broken.
    pub fn next<'m>(
        &self,
        q: &mut Queue,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        match self.pop(q, mem) {
            Pop::Chain(c) => Some(c),
            Pop::Empty | Pop::Broken => None,
        }
    }

    /// Re-enables notifications after a drain; true if the driver made more
    /// chains available meanwhile (drain again). Never true for a broken
    /// ring, so a drain loop ends.
    pub fn more(&self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if self.is_broken() {
            return false;
        }
        matches!(q.enable_notification(mem), Ok(true))
    }

    /// Busy-polls the ring for up to `window` with the driver's
    /// notifications off, after a drain: true as soon as the driver made a
    /// chain available. A request that arrives within the window costs the
    /// driver no notification and the worker no wake-up, which on a host
    /// where waking a thread costs tens of microseconds is most of a
    /// request's latency at queue depth 1. (cloud-hypervisor's block
    /// backend polls the same way with its `poll_queue`, 50 µs.) When it
    /// returns false, notifications are still off: re-enable them with
    /// [`RingGuard::more`] before sleeping.
    pub fn poll(&self, q: &mut Queue, mem: &GuestMemoryMmap, window: Duration) -> bool {
        if self.is_broken() || window.is_zero() {
            return false;
        }
        let _ = q.disable_notification(mem);
        let deadline = Instant::now() + window;
        loop {
            if Self::avail_idx(q, mem).is_some_and(|i| i != q.next_avail()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// For a device that found the chains now available too few for its
    /// next element (mergeable RX buffers): asks the driver to notify when
    /// it adds *more* chains, rather than for the ones already there.
    /// Returns true if it added some since `seen` (the available index the
    /// device looked at), so the device should try again now.
    ///
    /// With `EVENT_IDX`, `virtio-queue` publishes the device's position as
    /// `avail_event`; the device's position is before the chains it put
    /// back, so a driver would not notify for new ones (virtio 1.2,
    /// 2.7.10). The position is moved to `seen` for the write and restored.
    pub fn notify_on_new_chains(&self, q: &mut Queue, mem: &GuestMemoryMmap, seen: u16) -> bool {
        if self.is_broken() {
            return false;
        }
        let next = q.next_avail();
        q.set_next_avail(seen);
        let armed = q.enable_notification(mem);
        q.set_next_avail(next);
        matches!(armed, Ok(true))
    }

    /// The driver's available index now (for [`Self::notify_on_new_chains`]).
    pub fn avail_idx(q: &Queue, mem: &GuestMemoryMmap) -> Option<u16> {
        q.avail_idx(mem, Ordering::Acquire).ok().map(|i| i.0)
    }
}

/// The guards of all queues of a device, indexed by queue.
#[derive(Debug)]
pub struct RingGuards(Vec<RingGuard>);

impl RingGuards {
    /// Guards for `n` queues.
    pub fn new(n: usize) -> Self {
        RingGuards((0..n).map(RingGuard::new).collect())
    }

    /// The guard of queue `index`.
    ///
    /// # Panics
    /// If `index` is not below the number of queues given to [`Self::new`].
    pub fn get(&self, index: usize) -> &RingGuard {
        &self.0[index]
    }

    /// Serves queue `index` again (`VhostUserBackend::stop_vring`).
    pub fn reset(&self, index: u32) {
        if let Some(g) = self.0.get(index as usize) {
            g.reset();
        }
    }

    /// Serves every queue again (new frontend).
    pub fn reset_all(&self) {
        self.0.iter().for_each(RingGuard::reset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestRing;
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn empty_ring_is_not_broken() {
        let mem = TestRing::memory();
        let ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let g = RingGuard::new(0);
        assert!(matches!(g.pop(&mut q, &mem), Pop::Empty));
        assert!(!g.more(&mut q, &mem));
        assert!(!g.is_broken());
    }

    #[test]
    fn polling_sees_a_chain_made_available_during_the_window() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let g = RingGuard::new(0);
        // Nothing comes: false after the window, notifications still off.
        assert!(!g.poll(&mut q, &mem, Duration::from_millis(2)));
        assert_eq!(ring.used_flags(), VRING_USED_F_NO_NOTIFY as u16);
        assert!(!g.more(&mut q, &mem));
        assert_eq!(ring.used_flags(), 0);
        // Already there: true at once.
        let a = ring.add(&[TestRing::out(0x1000, 4)]);
        assert!(g.poll(&mut q, &mem, Duration::from_secs(60)));
        assert_eq!(g.next(&mut q, &mem).unwrap().head_index(), a);
        // Made available by another thread while polling: the chain is
        // written first, its available index published from the thread.
        ring.add(&[TestRing::out(0x2000, 4)]);
        ring.set_avail_idx(1);
        let avail_idx = GuestAddress(q.avail_ring() + 2);
        let m = &mem;
        std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                m.write_obj(2u16, avail_idx).unwrap();
            });
            assert!(g.poll(&mut q, &mem, Duration::from_secs(60)));
        });
        assert!(g.next(&mut q, &mem).is_some());
        // A zero window never polls.
        assert!(!g.poll(&mut q, &mem, Duration::ZERO));
    }

    #[test]
    fn chains_come_in_order() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let a = ring.add(&[TestRing::out(0x1000, 4)]);
        let b = ring.add(&[TestRing::inp(0x2000, 4)]);
        let g = RingGuard::new(0);
        assert_eq!(g.next(&mut q, &mem).unwrap().head_index(), a);
        assert_eq!(g.next(&mut q, &mem).unwrap().head_index(), b);
        assert!(g.next(&mut q, &mem).is_none());
        assert!(!g.is_broken());
    }

    #[test]
    fn avail_index_past_the_ring_breaks_it_until_reset() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let g = RingGuard::new(3);
        ring.set_avail_idx(30000);
        // What made the daemons spin: the queue itself says "more".
        assert!(matches!(q.enable_notification(&mem), Ok(true)));
        assert!(q.pop_descriptor_chain(&mem).is_none());
        // The guard ends the loop instead.
        assert!(matches!(g.pop(&mut q, &mem), Pop::Broken));
        assert!(g.is_broken());
        assert!(!g.more(&mut q, &mem));
        // Still broken after the driver repairs the index: the frontend
        // must reset the ring.
        ring.set_avail_idx(0);
        ring.add(&[TestRing::out(0x1000, 4)]);
        assert!(matches!(g.pop(&mut q, &mem), Pop::Broken));
        g.reset();
        assert!(g.next(&mut q, &mem).is_some());
    }

    #[test]
    fn exactly_a_full_ring_is_fine() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 4);
        let mut q = ring.queue();
        for i in 0..4 {
            ring.add(&[TestRing::out(0x1000 + 0x100 * i, 4)]);
        }
        let g = RingGuard::new(0);
        for _ in 0..4 {
            assert!(g.next(&mut q, &mem).is_some());
        }
        assert!(matches!(g.pop(&mut q, &mem), Pop::Empty));
        assert!(!g.is_broken());
    }

    #[test]
    fn unreadable_avail_ring_is_broken() {
        let mem = TestRing::memory();
        let ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        // Move the available ring outside guest memory.
        q.set_avail_ring_address(Some(0xffff_f000), Some(0xf));
        let g = RingGuard::new(0);
        assert!(matches!(g.pop(&mut q, &mem), Pop::Broken));
    }

    #[test]
    fn notify_on_new_chains_sets_avail_event_past_the_put_back_chains() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        q.set_event_idx(true);
        ring.add(&[TestRing::inp(0x1000, 4)]);
        ring.add(&[TestRing::inp(0x2000, 4)]);
        let g = RingGuard::new(0);
        // Take both, find them too small, put them back.
        assert!(g.next(&mut q, &mem).is_some());
        assert!(g.next(&mut q, &mem).is_some());
        q.go_to_previous_position();
        q.go_to_previous_position();
        let seen = RingGuard::avail_idx(&q, &mem).unwrap();
        assert!(!g.notify_on_new_chains(&mut q, &mem, seen));
        assert_eq!(ring.avail_event(), 2, "notify when entry 2 is added");
        assert_eq!(q.next_avail(), 0, "position restored");
        ring.add(&[TestRing::inp(0x3000, 4)]);
        assert!(g.notify_on_new_chains(&mut q, &mem, seen));
    }

    #[test]
    fn guards_reset_by_queue() {
        let gs = RingGuards::new(2);
        gs.get(0).mark(Breakage::Unreadable);
        gs.get(1).mark(Breakage::Unreadable);
        gs.reset(0);
        gs.reset(7);
        assert!(!gs.get(0).is_broken());
        assert!(gs.get(1).is_broken());
        gs.reset_all();
        assert!(!gs.get(1).is_broken());
    }
}
