//! The vhost-user-blk backend: features, configuration space and the
//! per-queue worker loop.
//!
//! One [`BlkBackend`] is created per frontend connection (state such as the
//! acked features and the write-cache mode starts fresh); the [`Disk`] is
//! shared between connections. Every queue has its own worker thread
//! (`queues_per_thread`), and each worker owns reusable request buffers.
//!
//! In-flight I/O is tracked in the frontend's region when it hands one over
//! (`mic_backend_common::inflight`): a head is marked when it is taken from
//! the ring (`RingGuard::next`), and cleared around its used entry
//! (`add_used`); the first time a queue is served with a new region, the
//! requests an earlier backend left in flight are executed again before
//! anything else (`resubmit`).

use std::io;
use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mic_backend_common::guest::vring_ready;
use mic_backend_common::inflight::{InflightRegion, QueueTracker, Trackers};
use mic_backend_common::limited;
use mic_backend_common::ratelimit::{per_minute, LogLimiter};
use mic_backend_common::ring::RingGuards;
use mic_backend_common::sandbox::ThreadKind;
use mic_backend_common::{InflightTracking, WorkerExitEvents};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::config::SEG_MAX;
use crate::disk::Disk;
use crate::limits::{wakeup_event, Accounting};
use crate::pool::{Batch, IoPool};
use crate::request::{self, Context, Scratch, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};

/// Requests whose buffers add up to at least this many bytes may be handed
/// to the I/O helper pool.
const OFFLOAD_BYTES: u64 = 64 << 10;

/// Failed used-ring notifications: the call eventfd is the frontend's, and a
/// broken one fails once per request.
static SIGNAL_LINES: LogLimiter = per_minute();

/// Resubmission lines: a frontend can reconnect in a loop.
static RESUBMIT_LINES: LogLimiter = per_minute();

type GM = GuestMemoryAtomic<GuestMemoryMmap>;

/// Transfers at least this large signal completion without waiting for the
/// end of the batch.
const EARLY_SIGNAL_BYTES: u64 = 32 << 10;

/// Size of the virtio-blk configuration space we expose: everything before
/// the secure-erase fields (no `VIRTIO_BLK_F_SECURE_ERASE`).
pub const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);
/// Offset of the `writeback` byte (`wce`) in the configuration space.
pub const CONFIG_WRITEBACK_OFFSET: u32 = offset_of!(virtio_blk_config, wce) as u32;

/// `struct virtio_blk_config` as bytes (`virtio-bindings` does not depend
/// on `vm-memory`, so the `ByteValued` impl lives here).
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ConfigSpace(virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` plain integers: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

/// Device parameters shared by all connections.
#[derive(Debug, Clone)]
pub struct BlkParams {
    /// GET_ID answer.
    pub serial: [u8; 20],
    /// Number of queues.
    pub num_queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// I/O helper threads for large requests (0: none).
    pub io_threads: usize,
    /// How long a worker polls its queue after the last request before it
    /// sleeps (0: it sleeps at once; `RingGuard::poll`).
    pub poll: Duration,
}

/// The vhost-user-blk backend for one frontend connection.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    disk: Arc<Disk>,
    params: BlkParams,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    /// Config-space `writeback` value (1 = write-back cache, 0 = write-through).
    writeback: AtomicBool,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    scratch: Vec<Mutex<Scratch>>,
    pool: Option<IoPool>,
    exit: WorkerExitEvents,
    guards: RingGuards,
    inflight: Trackers,
    /// Rate limits and stats (`limits.rs`), shared with later connections.
    acct: Arc<Accounting>,
}

const fn bit(b: u32) -> u64 {
    1u64 << b
}

impl BlkBackend {
    /// A backend serving `disk` with `params`, no rate limits, counters of
    /// its own.
    pub fn new(disk: Arc<Disk>, params: BlkParams) -> io::Result<BlkBackend> {
        let acct = Arc::new(Accounting::new(params.num_queues, Default::default())?);
        Self::with_accounting(disk, params, acct)
    }

    /// A backend serving `disk` with `params`, limited and counted by
    /// `acct` (the daemon keeps one for all connections).
    pub fn with_accounting(
        disk: Arc<Disk>,
        params: BlkParams,
        acct: Arc<Accounting>,
    ) -> io::Result<BlkBackend> {
        let scratch = (0..params.num_queues)
            .map(|_| Mutex::new(Scratch::default()))
            .collect();
        let guards = RingGuards::new(usize::from(params.num_queues));
        let inflight = Trackers::new(usize::from(params.num_queues));
        let pool = match params.io_threads {
            0 => None,
            n => Some(IoPool::new(n)?),
        };
        Ok(BlkBackend {
            inner: Arc::new(Inner {
                disk,
                params,
                acked_features: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(true),
                mem: Mutex::new(None),
                scratch,
                pool,
                exit: WorkerExitEvents::new(),
                guards,
                inflight,
                acct,
            }),
        })
    }

    /// Virtio features offered.
    pub fn device_features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.disk.readonly() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// Whether writes must be synced individually: the driver disabled the
    /// write cache (CONFIG_WCE) or cannot flush at all (no FLUSH).
    pub fn writethrough(&self) -> bool {
        let acked = self.inner.acked_features.load(Ordering::Relaxed);
        if acked & bit(VIRTIO_BLK_F_FLUSH) == 0 {
            return true;
        }
        acked & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0 && !self.inner.writeback.load(Ordering::Relaxed)
    }

    /// The configuration space (`struct virtio_blk_config`, little endian).
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let p = &self.inner.params;
        let disk = &self.inner.disk;
        let bs = disk.block_size();
        let mut c = virtio_blk_config {
            capacity: disk.sectors().to_le(),
            seg_max: u32::from(p.queue_size.saturating_sub(2).max(1))
                .min(SEG_MAX)
                .to_le(),
            blk_size: bs.to_le(),
            min_io_size: 1u16.to_le(), // in blocks
            wce: u8::from(self.inner.writeback.load(Ordering::Relaxed)),
            num_queues: p.num_queues.to_le(),
            ..Default::default()
        };
        if !disk.readonly() {
            c.max_discard_sectors = MAX_DISCARD_SECTORS.to_le();
            c.max_discard_seg = MAX_DISCARD_SEG.to_le();
            c.discard_sector_alignment = (bs / 512).to_le();
            c.max_write_zeroes_sectors = MAX_DISCARD_SECTORS.to_le();
            c.max_write_zeroes_seg = MAX_DISCARD_SEG.to_le();
            c.write_zeroes_may_unmap = 1;
        }
        let mut out = [0u8; CONFIG_LEN];
        out.copy_from_slice(&ConfigSpace(c).as_slice()[..CONFIG_LEN]);
        out
    }

    fn process_vring(&self, vring: &VringRwLock, thread_id: usize) {
        let Some(atomic) = self.inner.mem.lock().unwrap().clone() else {
            debug!("queue event before SET_MEM_TABLE");
            return;
        };
        let mem_arc = atomic.memory().into_inner();
        let mem: &GuestMemoryMmap = &mem_arc;
        let Some(scratch) = self.inner.scratch.get(thread_id) else {
            return;
        };
        let mut scratch = scratch.lock().unwrap();
        let writethrough = self.writethrough();
        let ctx = Context {
            disk: &self.inner.disk,
            serial: &self.inner.params.serial,
            writethrough,
        };
        let pool = self.inner.pool.as_ref();
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        // Each worker serves one queue: its thread index is the queue's.
        let guard = self.inner.guards.get(thread_id);
        let acct = &self.inner.acct;
        let mut throttled = false;
        let mut state = vring.get_mut();
        let mut tracker = self.inner.inflight.lock(thread_id);
        if let Some(t) = tracker.as_mut().filter(|t| t.needs_recovery()) {
            Self::resubmit(t, &mut state, mem, &ctx, &mut scratch);
        }
        loop {
            if event_idx {
                let _ = state.get_queue_mut().disable_notification(mem);
            }
            let mut completed = false;
            // The first large request of a batch is kept for this thread;
            // further large ones go to the helper pool.
            let mut local_large = None;
            let mut batch = None;
            loop {
                // Over the rate limit: take nothing more until the queue's
                // wakeup fires (`limits.rs`).
                if !acct.admit(thread_id) {
                    throttled = true;
                    break;
                }
                let Some(chain) = guard.next(state.get_queue_mut(), mem) else {
                    break;
                };
                let started = Instant::now();
                let bytes: u64 = if pool.is_some() || acct.throttle.active() {
                    chain.clone().map(|d| u64::from(d.len())).sum()
                } else {
                    0
                };
                acct.charge(bytes);
                if let Some(t) = tracker.as_mut() {
                    t.take(chain.head_index());
                }
                if let Some(pool) = pool {
                    if bytes >= OFFLOAD_BYTES {
                        if local_large.is_none() {
                            local_large = Some((chain, started));
                            continue;
                        }
                        let head = chain.head_index();
                        let descs: Vec<_> = chain.collect();
                        let b = batch.get_or_insert_with(Batch::new).clone();
                        b.add();
                        let m = mem_arc.clone();
                        let disk = self.inner.disk.clone();
                        let serial = self.inner.params.serial;
                        let acct = acct.clone();
                        pool.spawn(Box::new(move |s| {
                            let ctx = Context {
                                disk: &disk,
                                serial: &serial,
                                writethrough,
                            };
                            let len = request::process(&*m, descs.into_iter(), &ctx, s);
                            acct.record(thread_id, s, started);
                            b.done(head, len);
                        }));
                        continue;
                    }
                }
                let head = chain.head_index();
                let len = request::process(mem, chain, &ctx, &mut scratch);
                acct.record(thread_id, &scratch, started);
                Self::add_used(&mut state, mem, tracker.as_ref(), head, len);
                completed = true;
                // After a large transfer, tell the driver right away if it
                // asked for a notification, so it can refill the ring while
                // we work on the rest of the batch. Small requests are
                // cheaper than a notification: those are batched.
                if event_idx
                    && scratch.last_bytes >= EARLY_SIGNAL_BYTES
                    && Self::signal_if_needed(&mut state, mem)
                {
                    completed = false;
                }
            }
            if let Some((chain, started)) = local_large.take() {
                let head = chain.head_index();
                let len = request::process(mem, chain, &ctx, &mut scratch);
                acct.record(thread_id, &scratch, started);
                Self::add_used(&mut state, mem, tracker.as_ref(), head, len);
                completed = true;
            }
            if let (Some(b), Some(pool)) = (batch.take(), pool) {
                // Help with what the helpers have not started yet.
                while pool.run_one(&mut scratch) {}
                for (head, len) in b.wait() {
                    Self::add_used(&mut state, mem, tracker.as_ref(), head, len);
                }
                completed = true;
            }
            if completed {
                Self::signal_if_needed(&mut state, mem);
            }
            // A throttled queue leaves notifications off: its wakeup, not
            // the driver, runs it again.
            if throttled {
                break;
            }
            // A request soon after the last one is taken without a kick.
            if guard.poll(state.get_queue_mut(), mem, self.inner.params.poll) {
                continue;
            }
            // Re-enable notifications; loop if the driver added requests
            // in the meantime. A driver that moved the avail index to an
            // impossible value gets no further service (and no busy loop)
            // until the frontend resets the ring (see `RingGuard`).
            if !guard.more(state.get_queue_mut(), mem) {
                break;
            }
        }
    }

    /// Publishes `head`'s used entry, keeping the in-flight region (if
    /// any) in step (`inflight` module: steps 2 and 3).
    fn add_used(
        state: &mut VringState<GM>,
        mem: &GuestMemoryMmap,
        tracker: Option<&QueueTracker>,
        head: u16,
        len: u32,
    ) {
        if let Some(t) = tracker {
            t.completing(head);
        }
        let q = state.get_queue_mut();
        if let Err(e) = q.add_used(mem, head, len) {
            // Guest-controlled (bad head index): not worth more than debug.
            debug!("cannot add used entry for head {head}: {e}");
        }
        if let Some(t) = tracker {
            t.completed(head, q.next_used());
        }
    }

    /// Executes again the requests an earlier backend left in flight (the
    /// queue's first service with a new region), oldest first, and tells
    /// the driver. Resubmitted writes and reads write the same bytes
    /// again, so a request that had partly or fully run completes as if it
    /// had run once.
    fn resubmit(
        t: &mut QueueTracker,
        state: &mut VringState<GM>,
        mem: &GuestMemoryMmap,
        ctx: &Context,
        scratch: &mut Scratch,
    ) {
        let Some(chains) = t.recover_queue(state.get_queue_mut(), mem) else {
            return;
        };
        if chains.is_empty() {
            return;
        }
        limited!(
            RESUBMIT_LINES,
            info,
            "resubmitting {} request(s) left in flight",
            chains.len()
        );
        for c in chains {
            let len = request::process(mem, c.descs.into_iter(), ctx, scratch);
            Self::add_used(state, mem, Some(t), c.head, len);
        }
        if let Err(e) = state.signal_used_queue() {
            limited!(SIGNAL_LINES, warn, "cannot signal the used queue: {e}");
        }
    }

    /// Signal the driver if it wants a notification; returns whether it did.
    fn signal_if_needed(state: &mut VringState<GM>, mem: &GuestMemoryMmap) -> bool {
        let notify = state
            .get_queue_mut()
            .needs_notification(mem)
            .unwrap_or(true);
        if notify {
            if let Err(e) = state.signal_used_queue() {
                limited!(SIGNAL_LINES, warn, "cannot signal the used queue: {e}");
            }
        }
        notify
    }
}

impl InflightTracking for BlkBackend {
    fn set_inflight_region(&self, region: InflightRegion) {
        self.inner.inflight.install(&region);
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.params.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.inner.params.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.device_features()
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.inner.acked_features.store(0, Ordering::Relaxed);
        self.inner.writeback.store(true, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// The frontend stopped the ring (`GET_VRING_BASE`): a ring broken by
    /// the driver is served again once the frontend sets it up anew.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.inner.guards.reset(queue_index);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&cfg[start..end]);
        out
    }

    /// A write to the configuration space (virtio 1.2, 5.2.4): only the
    /// `writeback` byte is writable. A write of any range is accepted: the
    /// `writeback` byte takes effect if the range covers it, every other
    /// byte is read-only and ignored. Refusing the write would end the
    /// connection (`vhost` 0.18 closes it on any `SET_CONFIG` error), and
    /// with it the driver's write-through choice, so a card that writes
    /// more than that byte (or a bridge that forwards a wider range) must
    /// not be able to cause that.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let Some(at) = CONFIG_WRITEBACK_OFFSET
            .checked_sub(offset)
            .and_then(|i| buf.get(i as usize))
        else {
            debug!(
                "ignoring a write of {} read-only config bytes at {offset}",
                buf.len()
            );
            return Ok(());
        };
        // The driver writes 0 (write-through) or 1 (write-back); anything
        // else is taken as write-back, the device's default.
        let wb = *at != 0;
        debug!(
            "write cache {}",
            if wb { "write-back" } else { "write-through" }
        );
        if !wb {
            // Switching to write-through: make earlier writes durable.
            let _ = self.inner.disk.flush();
        }
        self.inner.writeback.store(wb, Ordering::Relaxed);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.inner.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.params.num_queues)
            .map(|i| 1u64 << i)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.inner.exit.create()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // A worker thread narrows its seccomp filter once (its sandbox.rs).
        mic_backend_common::sandbox::enter(ThreadKind::Worker);
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?}");
            return Ok(());
        }
        // The queue's rate-limit wakeup: worker `i` serves queue `i`.
        if device_event == wakeup_event(self.inner.params.num_queues) {
            if self.inner.acct.woken(thread_id) {
                if let Some(vring) = vrings.get(thread_id).filter(|v| vring_ready(v)) {
                    self.process_vring(vring, thread_id);
                }
            }
            return Ok(());
        }
        // Each worker owns exactly one queue, at index 0 of its vrings.
        match vrings.get(device_event as usize) {
            Some(vring) => self.process_vring(vring, thread_id),
            None => warn!("event for unknown queue {device_event}"),
        }
        // Errors caused by the guest never stop the worker.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(readonly: bool) -> (BlkBackend, vmm_sys_util::tempdir::TempDir) {
        let prefix = std::env::temp_dir().join("mic-blk-be-");
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap();
        let p = dir.as_path().join("img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let disk = Arc::new(Disk::open(&p, readonly, false).unwrap());
        (
            BlkBackend::new(
                disk,
                BlkParams {
                    serial: [b'x'; 20],
                    num_queues: 3,
                    queue_size: 128,
                    io_threads: 1,
                    poll: Duration::ZERO,
                },
            )
            .unwrap(),
            dir,
        )
    }

    #[test]
    fn features_and_config() {
        let (b, dir) = backend(false);
        let f = b.features();
        assert!(f & bit(VIRTIO_BLK_F_RO) == 0);
        assert!(f & bit(VIRTIO_BLK_F_DISCARD) != 0);
        let c = b.get_config(0, CONFIG_LEN as u32);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        assert_eq!(c[32], 1);
        // The layout of `struct virtio_blk_config` (virtio 1.2, 5.2.4).
        assert_eq!((CONFIG_LEN, CONFIG_WRITEBACK_OFFSET), (60, 32));
        assert_eq!(
            u32::from_le_bytes(c[36..40].try_into().unwrap()),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_DISCARD_SEG
        );
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 1);
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
        // Writethrough selection.
        assert!(b.writethrough(), "no FLUSH acked -> writethrough");
        b.acked_features(bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_CONFIG_WCE));
        assert!(!b.writethrough());
        b.set_config(CONFIG_WRITEBACK_OFFSET, &[0]).unwrap();
        assert!(b.writethrough());
        assert_eq!(b.get_config(CONFIG_WRITEBACK_OFFSET, 1), vec![0]);
        // Read-only bytes are ignored, the writeback byte is taken from any
        // range that covers it.
        b.set_config(0, &[1, 2, 3, 4]).unwrap();
        assert_eq!(b.get_config(0, 8), 2048u64.to_le_bytes().to_vec());
        let mut whole = b.get_config(0, CONFIG_LEN as u32);
        whole[32] = 1;
        b.set_config(0, &whole).unwrap();
        assert!(!b.writethrough());
        b.set_config(u32::MAX, &[0; 4]).unwrap();
        assert!(!b.writethrough());
        // Reads past the config space are zero padded.
        assert_eq!(b.get_config(100, 8), vec![0; 8]);
        drop(dir);

        let (ro, dir) = backend(true);
        assert!(ro.features() & bit(VIRTIO_BLK_F_RO) != 0);
        assert!(ro.features() & bit(VIRTIO_BLK_F_DISCARD) == 0);
        drop(dir);
    }
}
