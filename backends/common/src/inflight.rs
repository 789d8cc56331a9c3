//! In-flight I/O tracking for split virtqueues: the shared region of
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, so that a device survives its
//! own crash with requests in flight.
//!
//! Specification: QEMU `docs/interop/vhost-user.rst`, "Inflight I/O
//! tracking" (split virtqueue) and the messages `VHOST_USER_GET_INFLIGHT_FD`
//! (31) and `VHOST_USER_SET_INFLIGHT_FD` (32) with their "Inflight
//! description" payload; how the daemons use it is in
//! `docs/inflight-io.md`.
//!
//! The region ([`InflightRegion`]) is a memfd the backend creates when the
//! frontend asks for it (`GET_INFLIGHT_FD`); the frontend keeps it and
//! hands it back with `SET_INFLIGHT_FD` every time it starts the device,
//! also to a backend started again after a crash. It holds one queue
//! region per virtqueue: a header ([`QueueRegionHeader`]) and one
//! [`DescStateSplit`] per descriptor-table entry. A queue's worker keeps its
//! queue region up to date through a [`QueueTracker`]:
//!
//! 1. a head taken from the available ring: its `counter` is set to the
//!    queue's next counter value, then `inflight` to 1 ([`QueueTracker::take`]);
//! 2. before its used entry is published: `next` of the head is set to
//!    `last_batch_head`, and `last_batch_head` to the head
//!    ([`QueueTracker::completing`]);
//! 3. after the used ring's `idx` moved: `inflight` of the head is set to
//!    0, then `used_idx` to the used ring's `idx` ([`QueueTracker::completed`]).
//!
//! When the queue starts with a region that may hold requests of an
//! earlier backend ([`QueueTracker::recover`]): if `used_idx` differs from
//! the used ring's `idx`, the backend died between steps 2 and 3 and the
//! last batch (`idx - used_idx` entries of the list from `last_batch_head`)
//! was completed, so those heads are cleared; `used_idx` is then set to
//! `idx`. Every head still marked in flight is resubmitted, oldest
//! `counter` first, and the device's next position in the available ring
//! is `idx` plus their number (every head taken was either used or is in
//! flight). Each device completes one request at a time here, so a batch
//! is a single head.
//!
//! The frontend does not read the region; its layout only has to be the
//! same for the backend that writes it and the backend that recovers from
//! it. Queue regions start on 64-byte boundaries ([`QUEUE_ALIGN`]), so that
//! every field is naturally aligned and two queues never share a cache
//! line. Fields are accessed as atomics (the memory is shared with the
//! frontend process), stores with release ordering: a step's stores are
//! visible before anything the device does after it, in particular before
//! the used ring's `idx` (which `virtio-queue` also stores with release
//! ordering) and, after a crash, to the next backend.

use std::fs::File;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::chain;

/// The header of one queue region (vhost-user.rst, `QueueRegionSplit`,
/// without its flexible `desc` array).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegionHeader {
    /// Feature flags of the region; 0.
    pub features: u64,
    /// Version of the region: [`REGION_VERSION`]; 0 is an uninitialised
    /// region.
    pub version: u16,
    /// Entries of the `desc` array: the queue size.
    pub desc_num: u16,
    /// Head of the list of the last batch of used heads.
    pub last_batch_head: u16,
    /// The used ring's `idx` once the last batch was completed.
    pub used_idx: u16,
}

/// The state of one descriptor-table entry (vhost-user.rst,
/// `DescStateSplit`); only meaningful for chain heads.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DescStateSplit {
    /// 1 while the chain is in flight.
    pub inflight: u8,
    /// Padding.
    pub padding: [u8; 5],
    /// Next head in the last batch's list.
    pub next: u16,
    /// When the head was taken (the queue's counter): the resubmission order.
    pub counter: u64,
}

/// The region version the spec defines.
pub const REGION_VERSION: u16 = 1;
/// Alignment of every queue region in the memfd.
pub const QUEUE_ALIGN: usize = 64;
/// Largest queue size of a split virtqueue (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues a region is made or accepted for: well above any device of
/// ours (mic-blk has at most 64), and a bound on what a frontend can make
/// the backend map.
pub const MAX_QUEUES: u16 = 256;

const HDR: usize = size_of::<QueueRegionHeader>();
const DESC: usize = size_of::<DescStateSplit>();

/// Bytes of one queue region for `queue_size` entries, padded to
/// [`QUEUE_ALIGN`].
pub fn queue_region_size(queue_size: u16) -> usize {
    (HDR + DESC * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes of the whole region: `num_queues` queue regions.
pub fn region_size(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_size(queue_size)
}

/// Why a region cannot be created or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The inflight description is not one this backend serves.
    #[error("invalid inflight description: {0}")]
    Description(&'static str),
    /// A queue region holds a version or size other than expected.
    #[error("queue {queue}: region version {version} for {desc_num} entries, expected version 1 for {queue_size}")]
    Region {
        /// The queue.
        queue: u16,
        /// Its region's version field.
        version: u16,
        /// Its region's `desc_num` field.
        desc_num: u16,
        /// The queue size of the description.
        queue_size: u16,
    },
    /// Creating, sizing or mapping the memfd failed.
    #[error("cannot {0} the inflight region: {1}")]
    Io(&'static str, #[source] std::io::Error),
}

/// The "Inflight description" payload of `GET_INFLIGHT_FD`,
/// `SET_INFLIGHT_FD` and the reply to `GET_INFLIGHT_FD`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Description {
    /// Bytes to map.
    pub mmap_size: u64,
    /// Offset of the region in the memfd.
    pub mmap_offset: u64,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Size of the virtqueues.
    pub queue_size: u16,
}

/// Bytes of the description's fields; frontends send the C struct with its
/// tail padding, 24 bytes (QEMU and the `vhost` crate alike).
pub const DESCRIPTION_LEN: usize = 20;

impl Description {
    /// Parses a message body: the fields in native byte order (vhost-user
    /// messages are in the host's byte order), padding ignored.
    pub fn parse(body: &[u8]) -> Option<Description> {
        if body.len() < DESCRIPTION_LEN {
            return None;
        }
        let u64_at = |o: usize| u64::from_ne_bytes(body[o..o + 8].try_into().unwrap());
        let u16_at = |o: usize| u16::from_ne_bytes(body[o..o + 2].try_into().unwrap());
        Some(Description {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16_at(16),
            queue_size: u16_at(18),
        })
    }

    /// The body of `len` bytes (at least [`DESCRIPTION_LEN`]; the rest is
    /// zero padding): replies use the length the frontend sent.
    pub fn encode(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len.max(DESCRIPTION_LEN)];
        v[0..8].copy_from_slice(&self.mmap_size.to_ne_bytes());
        v[8..16].copy_from_slice(&self.mmap_offset.to_ne_bytes());
        v[16..18].copy_from_slice(&self.num_queues.to_ne_bytes());
        v[18..20].copy_from_slice(&self.queue_size.to_ne_bytes());
        v
    }

    fn check(&self) -> Result<(), Error> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(Error::Description("number of queues"));
        }
        if self.queue_size == 0 || self.queue_size > MAX_QUEUE_SIZE {
            return Err(Error::Description("queue size"));
        }
        Ok(())
    }
}

/// A shared mapping of the region, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: &OwnedFd, len: usize, offset: u64) -> Result<Mapping, Error> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| Error::Description("mmap offset too large"))?;
        // SAFETY: a new shared mapping of `len` bytes of `fd`; it does not
        // overlap anything of ours, and the kernel checks the arguments.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io("map", std::io::Error::last_os_error()));
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap never returns NULL"),
            len,
        })
    }

    /// The atomic `T` at byte `off`.
    ///
    /// # Panics
    /// If `off` is out of the mapping or not aligned for `T` (callers
    /// compute offsets from the layout above, so neither happens).
    fn at<T>(&self, off: usize) -> &T {
        assert!(off + size_of::<T>() <= self.len && off.is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: in bounds and aligned (checked), the mapping is page
        // aligned and lives as long as `self`; atomics of u8/u16/u64 have
        // the size and alignment of the integers, and any bit pattern is a
        // valid value.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<T>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Mapping::new` with this length
        // and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A mapped in-flight region of `num_queues` queue regions.
#[derive(Debug)]
pub struct InflightRegion {
    map: Arc<Mapping>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// The answer to `GET_INFLIGHT_FD`: a new memfd holding an initialised
    /// region for `want`'s queues (the frontend's `num_queues` and
    /// `queue_size`), and its description.
    pub fn create(want: &Description) -> Result<(OwnedFd, Description), Error> {
        want.check()?;
        let size = region_size(want.num_queues, want.queue_size);
        // SAFETY: the name is a NUL-terminated string; the flags are valid.
        let fd = unsafe { libc::memfd_create(c"mic-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io("create", std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a new descriptor that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().map_err(|e| Error::Io("create", e))?)
            .set_len(size as u64)
            .map_err(|e| Error::Io("size", e))?;
        let desc = Description {
            mmap_size: size as u64,
            mmap_offset: 0,
            num_queues: want.num_queues,
            queue_size: want.queue_size,
        };
        // Initialise the headers now, so that the region is valid even if
        // the frontend hands it to another backend.
        InflightRegion::map(&fd, &desc)?;
        Ok((fd, desc))
    }

    /// Maps the region `SET_INFLIGHT_FD` hands over. Queue regions that
    /// were never initialised (version 0) are initialised; one with another
    /// version or size is refused.
    pub fn map(fd: &OwnedFd, desc: &Description) -> Result<InflightRegion, Error> {
        desc.check()?;
        let need = region_size(desc.num_queues, desc.queue_size);
        if desc.mmap_size < need as u64 {
            return Err(Error::Description(
                "mmap size smaller than the queue regions",
            ));
        }
        let region = InflightRegion {
            map: Arc::new(Mapping::new(fd, need, desc.mmap_offset)?),
            num_queues: desc.num_queues,
            queue_size: desc.queue_size,
        };
        for q in 0..desc.num_queues {
            let view = region.view(q);
            let version = view.version();
            if version == 0 {
                view.initialise();
            } else if version != REGION_VERSION || view.desc_num() != desc.queue_size {
                return Err(Error::Region {
                    queue: q,
                    version,
                    desc_num: view.desc_num(),
                    queue_size: desc.queue_size,
                });
            }
        }
        Ok(region)
    }

    /// Number of queue regions.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn view(&self, queue: u16) -> QueueView {
        QueueView {
            map: self.map.clone(),
            base: usize::from(queue) * queue_region_size(self.queue_size),
            desc_num: self.queue_size,
        }
    }

    /// The tracker of queue `queue`, if the region has one for it.
    pub fn tracker(&self, queue: u16) -> Option<QueueTracker> {
        (queue < self.num_queues).then(|| QueueTracker {
            q: self.view(queue),
            counter: 0,
            recovered: false,
        })
    }
}

/// One queue region.
#[derive(Debug)]
struct QueueView {
    map: Arc<Mapping>,
    base: usize,
    desc_num: u16,
}

impl QueueView {
    fn hdr<T>(&self, field: usize) -> &T {
        self.map.at(self.base + field)
    }

    fn desc<T>(&self, head: u16, field: usize) -> &T {
        self.map
            .at(self.base + HDR + DESC * usize::from(head) + field)
    }

    fn version(&self) -> u16 {
        self.hdr::<AtomicU16>(offset_of!(QueueRegionHeader, version))
            .load(Ordering::Acquire)
    }

    fn desc_num(&self) -> u16 {
        self.hdr::<AtomicU16>(offset_of!(QueueRegionHeader, desc_num))
            .load(Ordering::Acquire)
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        self.hdr(offset_of!(QueueRegionHeader, last_batch_head))
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.hdr(offset_of!(QueueRegionHeader, used_idx))
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.desc(head, offset_of!(DescStateSplit, inflight))
    }

    fn next(&self, head: u16) -> &AtomicU16 {
        self.desc(head, offset_of!(DescStateSplit, next))
    }

    fn counter(&self, head: u16) -> &AtomicU64 {
        self.desc(head, offset_of!(DescStateSplit, counter))
    }

    /// A fresh queue region: every entry idle, then the header.
    fn initialise(&self) {
        for h in 0..self.desc_num {
            self.inflight(h).store(0, Ordering::Relaxed);
            self.next(h).store(0, Ordering::Relaxed);
            self.counter(h).store(0, Ordering::Relaxed);
        }
        self.hdr::<AtomicU64>(offset_of!(QueueRegionHeader, features))
            .store(0, Ordering::Relaxed);
        self.last_batch_head().store(0, Ordering::Relaxed);
        self.used_idx().store(0, Ordering::Relaxed);
        self.hdr::<AtomicU16>(offset_of!(QueueRegionHeader, desc_num))
            .store(self.desc_num, Ordering::Relaxed);
        self.hdr::<AtomicU16>(offset_of!(QueueRegionHeader, version))
            .store(REGION_VERSION, Ordering::Release);
    }
}

/// A chain to resubmit at queue start.
#[derive(Debug)]
pub struct Resubmit {
    /// Its head index.
    pub head: u16,
    /// Its descriptors, as far as they can be read (see
    /// [`chain::descriptors`]).
    pub descs: Vec<Descriptor>,
}

/// Chains resubmitted since the process started, over all queues and
/// connections.
static RESUBMITTED: AtomicU64 = AtomicU64::new(0);

/// The number of chains resubmitted by this process so far.
pub fn resubmitted_total() -> u64 {
    RESUBMITTED.load(Ordering::Relaxed)
}

/// One queue's side of the tracking; owned by the queue's worker.
#[derive(Debug)]
pub struct QueueTracker {
    q: QueueView,
    counter: u64,
    recovered: bool,
}

impl QueueTracker {
    fn tracked(&self, head: u16) -> bool {
        head < self.q.desc_num
    }

    /// Step 1: `head` was taken from the available ring.
    pub fn take(&mut self, head: u16) {
        if !self.tracked(head) {
            return;
        }
        self.q.counter(head).store(self.counter, Ordering::Release);
        self.counter += 1;
        self.q.inflight(head).store(1, Ordering::Release);
    }

    /// Step 2: `head`'s used entry is about to be published.
    pub fn completing(&self, head: u16) {
        if !self.tracked(head) {
            return;
        }
        let last = self.q.last_batch_head();
        self.q
            .next(head)
            .store(last.load(Ordering::Relaxed), Ordering::Release);
        last.store(head, Ordering::Release);
    }

    /// Step 3: `head`'s used entry was published and the used ring's `idx`
    /// is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if self.tracked(head) {
            self.q.inflight(head).store(0, Ordering::Release);
        }
        self.q.used_idx().store(used_idx, Ordering::Release);
    }

    /// Whether the queue still has to recover (once per region).
    pub fn needs_recovery(&self) -> bool {
        !self.recovered
    }

    /// Recovery with the used ring's `idx` now `ring_used_idx`: repairs
    /// the last batch if the previous backend died while completing it and
    /// returns the heads still in flight, oldest first. Later heads get
    /// counter values after theirs.
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        self.recovered = true;
        let q = &self.q;
        let used = q.used_idx().load(Ordering::Acquire);
        if used != ring_used_idx {
            // The list has one entry per head of the batch; a frontend
            // that changed the region cannot make this loop longer than
            // the queue.
            let batch = ring_used_idx.wrapping_sub(used).min(q.desc_num);
            let mut head = q.last_batch_head().load(Ordering::Acquire);
            for _ in 0..batch {
                if head >= q.desc_num {
                    break;
                }
                q.inflight(head).store(0, Ordering::Release);
                head = q.next(head).load(Ordering::Acquire);
            }
            q.used_idx().store(ring_used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..q.desc_num)
            .filter(|&h| q.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (q.counter(h).load(Ordering::Acquire), h))
            .collect();
        heads.sort_unstable();
        self.counter = (0..q.desc_num)
            .map(|h| q.counter(h).load(Ordering::Acquire))
            .max()
            .map_or(0, |c| c.wrapping_add(1));
        heads.into_iter().map(|(_, h)| h).collect()
    }

    /// Recovery at queue start: [`QueueTracker::recover`] against `q`'s
    /// used ring, `q`'s next available position moved past the chains in
    /// flight, and those chains read back from the descriptor table (the
    /// available ring may no longer hold them). Returns them in the order
    /// to resubmit; the caller processes each and completes it as any
    /// other chain. Nothing to do (and `None`) while `q` is not ready.
    pub fn recover_queue(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Option<Vec<Resubmit>> {
        if !q.ready() {
            return None;
        }
        let Ok(used) = q.used_idx(mem, Ordering::Acquire) else {
            // An unreadable used ring: the device cannot complete anything
            // there anyway; the ring guard deals with the driver.
            self.recovered = true;
            return Some(Vec::new());
        };
        let heads = self.recover(used.0);
        q.set_next_avail(used.0.wrapping_add(heads.len() as u16));
        q.set_next_used(used.0);
        RESUBMITTED.fetch_add(heads.len() as u64, Ordering::Relaxed);
        let table = q.desc_table();
        let size = q.size();
        Some(
            heads
                .into_iter()
                .map(|head| Resubmit {
                    head,
                    descs: chain::descriptors(mem, table, size, head),
                })
                .collect(),
        )
    }
}

/// The trackers of a device's queues; empty until the frontend hands over
/// a region.
#[derive(Debug)]
pub struct Trackers(Vec<Mutex<Option<QueueTracker>>>);

impl Trackers {
    /// No tracking yet, for `num_queues` queues.
    pub fn new(num_queues: usize) -> Trackers {
        Trackers((0..num_queues).map(|_| Mutex::new(None)).collect())
    }

    /// Tracks every queue in `region` from now on; each recovers first.
    pub fn install(&self, region: &InflightRegion) {
        for (i, slot) in self.0.iter().enumerate() {
            *slot.lock().unwrap() = u16::try_from(i).ok().and_then(|i| region.tracker(i));
        }
    }

    /// Queue `queue`'s tracker, for its worker.
    ///
    /// # Panics
    /// If `queue` is not below the number given to [`Trackers::new`].
    pub fn lock(&self, queue: usize) -> MutexGuard<'_, Option<QueueTracker>> {
        self.0[queue].lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestRing, BUFFERS};

    fn want(num_queues: u16, queue_size: u16) -> Description {
        Description {
            num_queues,
            queue_size,
            ..Description::default()
        }
    }

    /// A region as the frontend keeps it, and a first backend's trackers.
    fn region(num_queues: u16, queue_size: u16) -> (OwnedFd, Description, InflightRegion) {
        let (fd, desc) = InflightRegion::create(&want(num_queues, queue_size)).unwrap();
        let r = InflightRegion::map(&fd, &desc).unwrap();
        (fd, desc, r)
    }

    /// The tracker a backend started again on the same region gets.
    fn restarted(fd: &OwnedFd, desc: &Description, queue: u16) -> QueueTracker {
        InflightRegion::map(fd, desc)
            .unwrap()
            .tracker(queue)
            .unwrap()
    }

    #[test]
    fn layout_is_the_specs() {
        // vhost-user.rst, "Inflight I/O tracking": QueueRegionSplit and
        // DescStateSplit, C layout.
        assert_eq!(size_of::<QueueRegionHeader>(), 16);
        assert_eq!(offset_of!(QueueRegionHeader, features), 0);
        assert_eq!(offset_of!(QueueRegionHeader, version), 8);
        assert_eq!(offset_of!(QueueRegionHeader, desc_num), 10);
        assert_eq!(offset_of!(QueueRegionHeader, last_batch_head), 12);
        assert_eq!(offset_of!(QueueRegionHeader, used_idx), 14);
        assert_eq!(size_of::<DescStateSplit>(), 16);
        assert_eq!(offset_of!(DescStateSplit, inflight), 0);
        assert_eq!(offset_of!(DescStateSplit, padding), 1);
        assert_eq!(offset_of!(DescStateSplit, next), 6);
        assert_eq!(offset_of!(DescStateSplit, counter), 8);
        assert_eq!(queue_region_size(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_size(1) % QUEUE_ALIGN, 0);
        assert_eq!(region_size(3, 256), 3 * queue_region_size(256));
    }

    #[test]
    fn description_round_trips_with_the_frontends_length() {
        let d = Description {
            mmap_size: 0x1_0000_0040,
            mmap_offset: 4096,
            num_queues: 3,
            queue_size: 256,
        };
        let b = d.encode(24);
        assert_eq!(b.len(), 24);
        assert_eq!(Description::parse(&b), Some(d));
        assert_eq!(Description::parse(&b[..20]), Some(d));
        assert_eq!(Description::parse(&b[..19]), None);
        assert_eq!(d.encode(0).len(), DESCRIPTION_LEN);
    }

    #[test]
    fn created_region_is_initialised_and_sized() {
        let (fd, desc, r) = region(2, 8);
        assert_eq!(desc.mmap_size, region_size(2, 8) as u64);
        assert_eq!(desc.mmap_offset, 0);
        assert_eq!((desc.num_queues, desc.queue_size), (2, 8));
        assert_eq!(r.num_queues(), 2);
        for q in 0..2 {
            let v = r.view(q);
            assert_eq!((v.version(), v.desc_num()), (1, 8));
        }
        let len = File::from(fd).metadata().unwrap().len();
        assert_eq!(len, desc.mmap_size);
        assert!(r.tracker(2).is_none());
    }

    #[test]
    fn bad_descriptions_and_regions_are_refused() {
        for (n, s) in [(0, 8), (1, 0), (MAX_QUEUES + 1, 8), (1, MAX_QUEUE_SIZE + 1)] {
            assert!(matches!(
                InflightRegion::create(&want(n, s)),
                Err(Error::Description(_))
            ));
        }
        let (fd, desc, _r) = region(1, 8);
        let short = Description {
            mmap_size: desc.mmap_size - 1,
            ..desc
        };
        assert!(InflightRegion::map(&fd, &short).is_err());
        // The same memfd described with another queue size.
        let other = Description {
            queue_size: 4,
            ..desc
        };
        assert!(matches!(
            InflightRegion::map(&fd, &other),
            Err(Error::Region { desc_num: 8, .. })
        ));
    }

    #[test]
    fn uninitialised_region_is_initialised_on_map() {
        // A zero-filled memfd of the right size, as a frontend could make.
        let (fd, desc, r) = region(1, 4);
        r.view(0)
            .hdr::<AtomicU16>(offset_of!(QueueRegionHeader, version))
            .store(0, Ordering::Release);
        r.view(0).inflight(2).store(1, Ordering::Release);
        let mut t = restarted(&fd, &desc, 0);
        assert_eq!(r.view(0).version(), 1);
        assert!(
            t.recover(0).is_empty(),
            "an uninitialised region holds nothing"
        );
    }

    #[test]
    fn take_and_complete_leave_nothing_in_flight() {
        let (fd, desc, r) = region(1, 8);
        let mut t = r.tracker(0).unwrap();
        t.take(3);
        t.take(5);
        assert_eq!(t.q.inflight(3).load(Ordering::Acquire), 1);
        assert_eq!(t.q.counter(5).load(Ordering::Acquire), 1);
        t.completing(3);
        t.completed(3, 1);
        t.completing(5);
        t.completed(5, 2);
        assert_eq!(t.q.last_batch_head().load(Ordering::Acquire), 5);
        assert_eq!(t.q.next(5).load(Ordering::Acquire), 3);
        let mut t2 = restarted(&fd, &desc, 0);
        assert!(t2.recover(2).is_empty());
    }

    #[test]
    fn heads_in_flight_are_resubmitted_in_counter_order() {
        let (fd, desc, r) = region(1, 8);
        let mut t = r.tracker(0).unwrap();
        // Taken 6, 1, 4, 2; 1 completed; crash.
        for h in [6, 1, 4, 2] {
            t.take(h);
        }
        t.completing(1);
        t.completed(1, 1);
        let mut t2 = restarted(&fd, &desc, 0);
        assert!(t2.needs_recovery());
        assert_eq!(t2.recover(1), [6, 4, 2]);
        assert!(!t2.needs_recovery());
        // New heads are ordered after the resubmitted ones.
        t2.take(7);
        assert_eq!(t2.q.counter(7).load(Ordering::Acquire), 4);
    }

    #[test]
    fn crash_after_take_before_completion_resubmits() {
        let (fd, desc, r) = region(1, 8);
        let mut t = r.tracker(0).unwrap();
        t.take(2);
        // Window: step 2 done, the used ring not yet written.
        t.completing(2);
        assert_eq!(restarted(&fd, &desc, 0).recover(0), [2]);
    }

    #[test]
    fn crash_after_used_idx_before_clear_does_not_resubmit() {
        let (fd, desc, r) = region(1, 8);
        let mut t = r.tracker(0).unwrap();
        t.take(2);
        t.take(3);
        t.completing(2);
        t.completed(2, 1);
        // Window: the used ring's idx moved to 2 for head 3, step 3 not
        // done: head 3 is still marked, `used_idx` is behind.
        t.completing(3);
        let mut t2 = restarted(&fd, &desc, 0);
        assert!(t2.recover(2).is_empty());
        assert_eq!(t2.q.used_idx().load(Ordering::Acquire), 2);
        assert_eq!(t2.q.inflight(3).load(Ordering::Acquire), 0);
    }

    #[test]
    fn crash_after_clear_before_used_idx_does_not_resubmit() {
        let (fd, desc, r) = region(1, 8);
        let mut t = r.tracker(0).unwrap();
        t.take(4);
        t.completing(4);
        // Window: inflight cleared, `used_idx` not yet stored.
        t.q.inflight(4).store(0, Ordering::Release);
        assert!(restarted(&fd, &desc, 0).recover(1).is_empty());
    }

    #[test]
    fn crash_before_take_is_marked_takes_the_chain_again() {
        // A head popped but not yet marked is not in flight: the next
        // backend's position leaves it in the available ring.
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let (fd, desc, r) = region(1, 8);
        let mut t = r.tracker(0).unwrap();
        let a = ring.add(&[TestRing::out(BUFFERS, 16)]);
        let b = ring.add(&[TestRing::out(BUFFERS + 0x100, 16)]);
        let c = q.pop_descriptor_chain(&mem).unwrap();
        t.take(c.head_index());
        let _unmarked = q.pop_descriptor_chain(&mem).unwrap();
        let mut t2 = restarted(&fd, &desc, 0);
        let mut q2 = ring.queue();
        let again = t2.recover_queue(&mut q2, &mem).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].head, a);
        assert_eq!(q2.next_avail(), 1);
        assert_eq!(q2.pop_descriptor_chain(&mem).unwrap().head_index(), b);
    }

    #[test]
    fn recover_queue_positions_the_ring_and_reads_the_chains() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let (fd, desc, r) = region(1, 8);
        let mut t = r.tracker(0).unwrap();
        let heads: Vec<u16> = (0..4)
            .map(|i| {
                ring.add(&[
                    TestRing::out(BUFFERS + 0x100 * i, 16),
                    TestRing::inp(BUFFERS + 0x100 * i + 0x80, 1),
                ])
            })
            .collect();
        for _ in 0..3 {
            let c = q.pop_descriptor_chain(&mem).unwrap();
            t.take(c.head_index());
        }
        // The second chain completes; the first and third are in flight.
        t.completing(heads[1]);
        q.add_used(&mem, heads[1], 1).unwrap();
        t.completed(heads[1], q.next_used());
        let before = resubmitted_total();
        let mut t2 = restarted(&fd, &desc, 0);
        let mut q2 = ring.queue();
        q2.set_next_used(1);
        let again = t2.recover_queue(&mut q2, &mem).unwrap();
        assert!(resubmitted_total() >= before + 2);
        let got: Vec<u16> = again.iter().map(|r| r.head).collect();
        assert_eq!(got, [heads[0], heads[2]]);
        let addrs: Vec<u64> = again[1].descs.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [BUFFERS + 0x200, BUFFERS + 0x280]);
        // used 1 + 2 in flight: the fourth chain is next.
        assert_eq!(q2.next_avail(), 3);
        assert_eq!(
            q2.pop_descriptor_chain(&mem).unwrap().head_index(),
            heads[3]
        );
    }

    #[test]
    fn a_corrupted_batch_list_stays_bounded() {
        let (fd, desc, r) = region(1, 4);
        let mut t = r.tracker(0).unwrap();
        t.take(1);
        t.completing(1);
        // A list that loops, an impossible batch size, a head out of range.
        t.q.next(1).store(1, Ordering::Release);
        assert!(restarted(&fd, &desc, 0).recover(60000).is_empty());
        t.q.last_batch_head().store(900, Ordering::Release);
        t.take(2);
        assert_eq!(restarted(&fd, &desc, 0).recover(3), [2]);
        // Heads past the region are not tracked.
        t.take(9);
        t.completing(9);
        t.completed(9, 4);
    }

    #[test]
    fn trackers_install_per_queue() {
        let (_fd, _desc, r) = region(2, 8);
        let ts = Trackers::new(3);
        assert!(ts.lock(0).is_none());
        ts.install(&r);
        assert!(ts.lock(0).as_ref().unwrap().needs_recovery());
        assert!(ts.lock(1).is_some());
        assert!(ts.lock(2).is_none(), "no region for the third queue");
    }
}
