//! The vhost-user virtio-net device.
//!
//! Queue layout: queue `2n` is the RX queue and `2n + 1` the TX queue of
//! pair `n`. Each pair is served by its own worker thread, which also owns
//! the pair's host side (one tap queue, or the stream port for pair 0).
//!
//! Everything read from the rings is treated as hostile: a chain with a
//! descriptor of the wrong direction, pointing outside guest memory, or
//! longer than the largest frame is returned to the guest unused and its
//! frame dropped.

use std::io;
use std::mem::offset_of;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, warn};
use mic_backend_common::guest::{vring_ready, GuestMem, MemorySlot};
use mic_backend_common::ratelimit::{per_minute, LogLimiter};
use mic_backend_common::ring::RingGuards;
use mic_backend_common::sandbox::ThreadKind;
use mic_backend_common::worker::Worker;
use mic_backend_common::{limited, PersistentBackend, WorkerExitEvents};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::limits::{Accounting, LimitedSink};
use crate::rxq::{self, RxOutcome};
use crate::stream::{self, StreamPort, MAX_FRAME};
use crate::tap::{TapQueue, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use crate::txq::{self, TxSink, MIN_FRAME};

type Vring = VringRwLock<GuestMem>;

/// Size of the virtio-net header with VERSION_1 or MRG_RXBUF.
pub const HDR_LEN_V1: usize = 12;
/// Size of the legacy virtio-net header without MRG_RXBUF.
pub const HDR_LEN_LEGACY: usize = 10;
/// Tap set-up failures: the frontend sets features once per connection.
static TAP_LINES: LogLimiter = per_minute();

/// Room for the largest packet plus its header.
const BUF_LEN: usize = HDR_LEN_V1 + MAX_FRAME;

/// Size of the configuration space we expose: mac, status,
/// max_virtqueue_pairs and mtu (no `VIRTIO_NET_F_SPEED_DUPLEX`, RSS or hash
/// reports).
const CONFIG_LEN: usize = offset_of!(virtio_net_config, speed);

/// `struct virtio_net_config` as bytes (`virtio-bindings` does not depend
/// on `vm-memory`, so the `ByteValued` impl lives here).
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ConfigSpace(virtio_net_config);

// SAFETY: `virtio_net_config` is `repr(C, packed)` plain integers: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Host side of a queue pair.
pub enum HostPort {
    /// One queue of a tap device.
    Tap(TapQueue),
    /// The stream transport (pair 0 only).
    Stream(StreamPort),
}

impl TxSink for HostPort {
    fn ready(&self) -> bool {
        match self {
            HostPort::Tap(_) => true,
            HostPort::Stream(s) => !s.tx_blocked(),
        }
    }

    fn send(&mut self, packet: &[u8], hdr_len: usize) -> bool {
        match self {
            HostPort::Tap(t) => match t.write_packet(packet) {
                Ok(_) => true,
                Err(e) => {
                    debug!("tap write: {e}");
                    false
                }
            },
            HostPort::Stream(s) => {
                s.send_frame(&packet[hdr_len..]);
                true
            }
        }
    }
}

struct PairState {
    host: HostPort,
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// Its queue of a multi-queue tap is detached: the driver disabled the
    /// pair (see [`NetBackend::follow_enable`]).
    tap_detached: bool,
}

/// Traffic counters, for logging and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames from the host dropped (no room, link down).
    pub rx_dropped: AtomicU64,
    /// Frames sent by the guest to the host.
    pub tx_frames: AtomicU64,
    /// Guest chains rejected as malformed or frames that could not be sent.
    pub tx_dropped: AtomicU64,
}

/// The virtio-net vhost-user backend.
pub struct NetBackend {
    queue_pairs: usize,
    queue_size: usize,
    features: u64,
    config: Vec<u8>,
    pairs: Vec<Mutex<PairState>>,
    acked: AtomicU64,
    event_idx: AtomicBool,
    mem: MemorySlot,
    exit: WorkerExitEvents,
    guards: RingGuards,
    /// Traffic counters.
    pub counters: Counters,
    /// Rate limits and per-queue stats (`limits.rs`).
    acct: Arc<Accounting>,
}

/// Offset of the rate-limit wakeup's event id from the host port's: the
/// stream port uses the ids just after the host port's (`stream::EV_*`).
const WAKEUP_OFFSET: u64 = 16;

impl NetBackend {
    /// Builds the device from its host ports (one per queue pair).
    pub fn new(ports: Vec<HostPort>, mac: [u8; 6], mtu: u16, queue_size: u16) -> io::Result<Self> {
        let queue_pairs = ports.len();
        if queue_pairs == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no host port"));
        }
        let is_tap = matches!(ports[0], HostPort::Tap(_));
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if is_tap {
            features |= bit(VIRTIO_NET_F_CSUM)
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN)
                | bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_ECN);
        }
        if queue_pairs > 1 {
            features |= bit(VIRTIO_NET_F_MQ);
        }
        let config = ConfigSpace(virtio_net_config {
            mac,
            status: (VIRTIO_NET_S_LINK_UP as u16).to_le(),
            max_virtqueue_pairs: (queue_pairs as u16).to_le(),
            mtu: mtu.to_le(),
            ..Default::default()
        })
        .as_slice()[..CONFIG_LEN]
            .to_vec();

        let pairs = ports
            .into_iter()
            .map(|host| {
                Mutex::new(PairState {
                    host,
                    rx_frame: vec![0; BUF_LEN],
                    rx_pending: None,
                    tx_buf: vec![0; BUF_LEN],
                    tap_detached: false,
                })
            })
            .collect();
        Ok(NetBackend {
            queue_pairs,
            queue_size: queue_size as usize,
            features,
            config,
            pairs,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            mem: MemorySlot::new(),
            exit: WorkerExitEvents::new(),
            guards: RingGuards::new(2 * queue_pairs),
            counters: Counters::default(),
            acct: Arc::new(Accounting::new(
                queue_pairs,
                Default::default(),
                Default::default(),
            )?),
        })
    }

    /// The device limited and counted by `acct` (made for as many queue
    /// pairs) instead of its own unlimited counters.
    pub fn with_accounting(mut self, acct: Arc<Accounting>) -> Self {
        self.acct = acct;
        self
    }

    /// Event id of the queue pairs' rate-limit wakeups.
    fn wakeup_event(&self) -> u64 {
        self.host_event() + WAKEUP_OFFSET
    }

    fn num_queues_total(&self) -> u64 {
        2 * self.queue_pairs as u64
    }

    /// Event id of the host port (tap queue or stream connection).
    fn host_event(&self) -> u64 {
        self.num_queues_total() + 1
    }

    fn pair(&self, i: usize) -> MutexGuard<'_, PairState> {
        self.pairs[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    fn hdr_len(&self) -> usize {
        let f = self.acked();
        if f & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
            HDR_LEN_V1
        } else {
            HDR_LEN_LEGACY
        }
    }

    fn apply_tap_features(&self, features: u64) {
        let hdr = if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
            HDR_LEN_V1
        } else {
            HDR_LEN_LEGACY
        };
        let mut offload = 0;
        if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
            offload |= TUN_F_CSUM;
            if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
                offload |= TUN_F_TSO4;
            }
            if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
                offload |= TUN_F_TSO6;
            }
            if features & bit(VIRTIO_NET_F_GUEST_ECN) != 0
                && offload & (TUN_F_TSO4 | TUN_F_TSO6) != 0
            {
                offload |= TUN_F_TSO_ECN;
            }
        }
        for i in 0..self.queue_pairs {
            let st = self.pair(i);
            if let HostPort::Tap(t) = &st.host {
                if let Err(e) = t.set_vnet_hdr_size(hdr as i32) {
                    limited!(TAP_LINES, warn, "tap queue {i}: TUNSETVNETHDRSZ {hdr}: {e}");
                }
                if let Err(e) = t.set_offload(offload) {
                    limited!(
                        TAP_LINES,
                        warn,
                        "tap queue {i}: TUNSETOFFLOAD {offload:#x}: {e}"
                    );
                }
            }
        }
        debug!("vnet header {hdr} bytes, tap offloads {offload:#x}");
    }

    fn read_host_frame(st: &mut PairState, hdr_len: usize) -> Option<usize> {
        loop {
            match &mut st.host {
                HostPort::Tap(t) => match t.read_packet(&mut st.rx_frame) {
                    Ok(Some(n)) if n >= hdr_len + MIN_FRAME => return Some(n),
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(e) => {
                        debug!("tap read: {e}");
                        return None;
                    }
                },
                HostPort::Stream(s) => {
                    let n = s.next_frame(&mut st.rx_frame[hdr_len..])?;
                    if n < MIN_FRAME {
                        continue;
                    }
                    st.rx_frame[..hdr_len].fill(0);
                    return Some(hdr_len + n);
                }
            }
        }
    }

    /// Keeps a multi-queue tap from steering packets to a pair the driver
    /// disabled (`SET_VRING_ENABLE`; a virtio-net driver uses the pairs it
    /// set through its control queue): the pair's tap queue is detached
    /// while its receive ring is started but disabled, and attached again
    /// when the ring is enabled. Pair 0 is always in use and stays attached;
    /// with no driver the queues stay as they are, and input waits in them.
    ///
    /// `vhost-user-backend` tells a backend nothing when a ring is enabled,
    /// so this runs where the ring's state matters: on the pair's receive
    /// events. A packet steered to a disabled pair is one; a ring being
    /// enabled with its kick pending (the frontend kicks every ring once
    /// when it starts them, and a driver kicks when it posts buffers) is the
    /// other.
    fn follow_enable(&self, pair: usize, st: &mut PairState, vring: &Vring) {
        let HostPort::Tap(tap) = &st.host else {
            return;
        };
        if pair == 0 || self.queue_pairs == 1 {
            return;
        }
        let (ready, enabled) = {
            let s = vring.get_ref();
            (virtio_queue::QueueT::ready(s.get_queue()), s.is_enabled())
        };
        if !ready || enabled != st.tap_detached {
            return;
        }
        match tap.set_attached(enabled) {
            Ok(()) => {
                st.tap_detached = !enabled;
                debug!(
                    "tap queue {pair} {}",
                    if enabled { "attached" } else { "detached" }
                );
            }
            Err(e) => warn!("tap queue {pair}: cannot follow the pair's enable: {e}"),
        }
    }

    fn process_rx(&self, pair: usize, st: &mut PairState, vring: &Vring) -> io::Result<()> {
        self.follow_enable(pair, st, vring);
        let hdr_len = self.hdr_len();
        let Some(mem) = self.mem.get() else {
            return Ok(());
        };
        if !vring_ready(vring) {
            // No frontend, or the queue is being set up: input stays queued
            // in the tap or socket (bounded by the kernel); enabling the
            // queue runs this again.
            return Ok(());
        }
        let guard = self.guards.get(2 * pair);
        let mrg = self.acked() & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut vr = vring.get_mut();
        let q = vr.get_queue_mut();
        let mut used_any = false;
        loop {
            let len = match st.rx_pending {
                Some(l) => l,
                // Over the rate limit: the frames stay on the host side
                // until the pair's wakeup fires (`limits.rs`).
                None if !self.acct.admit_rx(pair) => break,
                None => match Self::read_host_frame(st, hdr_len) {
                    Some(l) => {
                        self.acct.rx.charge(1, (l - hdr_len) as u64);
                        l
                    }
                    None => break,
                },
            };
            st.rx_pending = Some(len);
            let started = Instant::now();
            let (outcome, used) =
                rxq::deliver(q, &mem, guard, &mut st.rx_frame[..len], mrg, hdr_len);
            used_any |= used;
            let stats = self.acct.rx_stats(pair);
            match outcome {
                RxOutcome::Delivered => {
                    st.rx_pending = None;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    if let Some(q) = stats {
                        q.record_since((len - hdr_len) as u64, 0, false, started);
                    }
                }
                RxOutcome::Dropped => {
                    st.rx_pending = None;
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    if let Some(q) = stats {
                        q.record_failed(1);
                    }
                }
                RxOutcome::NoBuffers { seen } => {
                    // Ask for a kick when buffers arrive; go on if some
                    // arrived in the meantime. The frame stays pending.
                    if !guard.notify_on_new_chains(q, &mem, seen) {
                        break;
                    }
                }
            }
        }
        if used_any && vr.needs_notification().unwrap_or(true) {
            vr.signal_used_queue()?;
        }
        Ok(())
    }

    fn process_tx(&self, pair: usize, st: &mut PairState, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self.mem.get() else {
            return Ok(());
        };
        if !vring_ready(vring) {
            return Ok(());
        }
        let hdr_len = self.hdr_len();
        let mut vr = vring.get_mut();
        let mut sink = LimitedSink::new(&mut st.host, &self.acct.tx, self.acct.tx_stats(pair));
        let tally = txq::drain(
            vr.get_queue_mut(),
            &mem,
            self.guards.get(2 * pair + 1),
            &mut st.tx_buf,
            hdr_len,
            &mut sink,
        );
        // Over the rate limit: the chains stay in the ring until the
        // pair's wakeup fires.
        if let Some(wait) = sink.wait.get() {
            self.acct.stop(pair, 2 * pair + 1, wait);
        }
        if let Some(q) = self.acct.tx_stats(pair) {
            q.record_failed(tally.malformed);
        }
        let c = &self.counters;
        c.tx_frames.fetch_add(tally.sent, Ordering::Relaxed);
        c.tx_dropped
            .fetch_add(tally.lost + tally.malformed, Ordering::Relaxed);
        if tally.used && vr.needs_notification().unwrap_or(true) {
            vr.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.queue_pairs
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        self.apply_tap_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        for i in 0..self.queue_pairs {
            self.pair(i).rx_pending = None;
        }
        self.acked.store(0, Ordering::Release);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// The frontend stopped the ring (`GET_VRING_BASE`): a ring broken by
    /// the driver is served again once the frontend sets it up anew.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.guards.reset(queue_index);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        mic_backend_common::guest::read_config(&self.config, offset, size)
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.mem.set(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queue_pairs).map(|i| 0b11u64 << (2 * i)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.create()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // A worker thread narrows its seccomp filter once (its sandbox.rs).
        mic_backend_common::sandbox::enter(ThreadKind::Worker);
        if thread_id >= self.queue_pairs || vrings.len() < 2 {
            return Ok(());
        }
        let ev = u64::from(device_event);
        let host = self.host_event();
        let mut st = self.pair(thread_id);
        let st = &mut *st;
        match ev {
            0 => self.process_rx(thread_id, st, &vrings[0])?,
            1 => self.process_tx(thread_id, st, &vrings[1])?,
            e if e == host => {
                if let HostPort::Stream(s) = &mut st.host {
                    if evset.contains(EventSet::OUT) {
                        s.flush();
                    }
                    self.process_rx(thread_id, st, &vrings[0])?;
                    self.process_tx(thread_id, st, &vrings[1])?;
                } else {
                    self.process_rx(thread_id, st, &vrings[0])?;
                }
            }
            e if e == self.wakeup_event() => {
                if self.acct.woken(thread_id) {
                    self.process_rx(thread_id, st, &vrings[0])?;
                    self.process_tx(thread_id, st, &vrings[1])?;
                }
            }
            e if e > host => {
                if let HostPort::Stream(s) = &mut st.host {
                    s.handle_control_event(e - host);
                    let _ = stream::EV_CONN;
                    self.process_rx(thread_id, st, &vrings[0])?;
                    self.process_tx(thread_id, st, &vrings[1])?;
                }
            }
            _ => warn!("unexpected event {device_event}"),
        }
        Ok(())
    }
}

impl PersistentBackend for NetBackend {
    /// Registers the host ports with the workers' epoll sets (one epoll fd
    /// per worker thread, in thread order). Called for every new frontend.
    fn attach_workers(&self, workers: &[Worker]) {
        let ev = self.host_event();
        for (i, w) in workers.iter().enumerate().take(self.queue_pairs) {
            let mut st = self.pair(i);
            match &mut st.host {
                HostPort::Tap(t) => {
                    let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
                    if let Err(e) = w.register(t.as_raw_fd(), events, ev) {
                        warn!("cannot watch tap queue {i}: {e}");
                    }
                }
                HostPort::Stream(s) => s.attach(w.clone(), ev),
            }
        }
        if let Err(e) = self.acct.attach(workers, self.wakeup_event()) {
            warn!("cannot watch the rate-limit timers: {e}");
        }
    }

    /// Resets the device for a new frontend: pending frames are dropped,
    /// tap input queued for the previous one is discarded, features are
    /// forgotten, and the exit eventfds of the finished workers are closed.
    fn new_frontend(&self) {
        for i in 0..self.queue_pairs {
            let mut st = self.pair(i);
            st.rx_pending = None;
            let PairState { host, rx_frame, .. } = &mut *st;
            // Input queued for the previous guest is stale.
            match host {
                HostPort::Tap(t) => while let Ok(Some(_)) = t.read_packet(rx_frame) {},
                HostPort::Stream(s) => {
                    s.detach();
                    while s.next_frame(rx_frame).is_some() {}
                }
            }
        }
        self.acked.store(0, Ordering::Release);
        self.event_idx.store(false, Ordering::Release);
        // Until the next SET_FEATURES: no offloads, the legacy header.
        self.apply_tap_features(0);
        self.mem.clear();
        self.guards.reset_all();
        self.exit.close_all();
    }
}
