//! The vhost-user virtio-console device.
//!
//! Queues: 0 = receiveq of port 0 (host to card), 1 = transmitq of port 0
//! (card to host); with `VIRTIO_CONSOLE_F_MULTIPORT` also 2 = control
//! receiveq (device to driver) and 3 = control transmitq (driver to device).
//! Port 0 is the only port and is announced as the console port, so Linux's
//! virtio_console brings it up as hvc0.
//!
//! Worker threads: one for queue 0 (which also reads the host side), one for
//! queue 1, one for the two control queues (a control exchange needs both).
//!
//! Terminal size changes (pty and stdio, checked twice a second by the last
//! worker): with `MULTIPORT` they go to the driver as `RESIZE` control
//! messages; without it the config space changes and the frontend is told
//! with `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend request
//! channel, so that it can pass a config-change interrupt to the driver.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use log::{debug, info, warn};
use mic_backend_common::guest::{read_config, vring_ready, GuestMem, MemorySlot};
use mic_backend_common::ratelimit::{per_minute, LogLimiter};
use mic_backend_common::ring::RingGuards;
use mic_backend_common::sandbox::ThreadKind;
use mic_backend_common::worker::Worker;
use mic_backend_common::{limited, PersistentBackend, WorkerExitEvents};
use vhost::vhost_user::message::{BackendReq, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

use crate::control::{
    self, ctrl_msg, resize_msg, Control, CONSOLE_PORT, DEVICE_ADD, DEVICE_READY, F_EMERG_WRITE,
    F_MULTIPORT, F_SIZE, PORT_OPEN, PORT_READY,
};
use crate::host::{Host, EV_INPUT, EV_LISTEN};
use crate::{rxq, txq};

/// Lines the card's driver can cause once per control message.
static DRIVER_LINES: LogLimiter = per_minute();
/// Lines a frontend can cause once per connection.
static FRONTEND_LINES: LogLimiter = per_minute();

type Vring = VringRwLock<GuestMem>;

/// Most control messages waiting for the driver's buffers (the handshake
/// needs four: `DEVICE_ADD`, `CONSOLE_PORT`, `RESIZE`, `PORT_OPEN`).
const MAX_PENDING_CTRL: usize = 32;
/// Largest control message accepted from the driver.
const MAX_CTRL: usize = 64;
/// Largest TX chain copied at once; longer chains are processed in pieces.
const TX_CHUNK: usize = 64 * 1024;
/// Largest TX chain passed on; a longer one is dropped as malformed (Linux's
/// virtio_console writes at most 32 KiB per buffer). Bounds the time a
/// worker spends on one chain while it holds the queue.
const TX_MAX_CHAIN: usize = 1 << 20;
/// Host input read per step.
const RX_CHUNK: usize = 4096;
/// How often the terminal size is checked for changes.
const SIZE_POLL: std::time::Duration = std::time::Duration::from_millis(500);
/// Event id offset (from the first backend event) of the size timer.
const EV_SIZE_TIMER: u64 = 2;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

struct RxState {
    pending: Vec<u8>,
    off: usize,
    buf: Vec<u8>,
}

struct CtrlState {
    /// Messages waiting for control receive buffers; see [`CtrlState::queue`].
    out: VecDeque<Vec<u8>>,
    device_ready: bool,
    port_ready: bool,
    guest_open: bool,
    /// The size the driver last learnt: from a `RESIZE` message with
    /// `MULTIPORT`, from the config space (read or announced) without.
    last_size: Option<(u16, u16)>,
}

impl CtrlState {
    /// Queues a message for the driver. At most [`MAX_PENDING_CTRL`] wait:
    /// a driver that keeps asking (`DEVICE_READY`, `PORT_READY`) without
    /// posting control receive buffers cannot grow the queue; further
    /// messages are dropped (and counted in `dropped`).
    fn queue(&mut self, msg: Vec<u8>, dropped: &AtomicU64) {
        if self.out.len() < MAX_PENDING_CTRL {
            self.out.push_back(msg);
        } else {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The backend request channel of the current frontend.
#[derive(Default)]
struct RequestChannel {
    /// Duplicate of the channel's socket, received from the daemon loop
    /// before the `vhost` crate hands over the channel itself.
    pending: Option<UnixStream>,
    /// The channel as handed over by `set_backend_req_fd`, kept for the
    /// connection's lifetime.
    backend: Option<Backend>,
    /// Where config changes are announced (the same socket as `backend`'s).
    sock: Option<UnixStream>,
}

/// Traffic counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes delivered to the card.
    pub rx_bytes: AtomicU64,
    /// Bytes written by the card.
    pub tx_bytes: AtomicU64,
    /// Malformed chains returned unused.
    pub bad_chains: AtomicU64,
    /// Control messages dropped because [`MAX_PENDING_CTRL`] were waiting.
    pub dropped_ctrl: AtomicU64,
}

/// The virtio-console vhost-user backend.
pub struct ConsoleBackend {
    multiport: bool,
    queue_size: usize,
    features: u64,
    host: Mutex<Host>,
    rx: Mutex<RxState>,
    ctrl: Mutex<CtrlState>,
    acked: AtomicU64,
    mem: MemorySlot,
    exit: WorkerExitEvents,
    guards: RingGuards,
    size_timer: Mutex<Option<TimerFd>>,
    channel: Mutex<RequestChannel>,
    /// Traffic counters.
    pub counters: Counters,
}

fn signal(vr: &mut VringState<GuestMem>) -> io::Result<()> {
    if vr.needs_notification().unwrap_or(true) {
        vr.signal_used_queue()?;
    }
    Ok(())
}

impl ConsoleBackend {
    /// Builds the device around its host side.
    pub fn new(host: Host, multiport: bool, queue_size: u16) -> Self {
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(F_EMERG_WRITE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if host.has_size() {
            features |= bit(F_SIZE);
        }
        if multiport {
            features |= bit(F_MULTIPORT);
        }
        ConsoleBackend {
            multiport,
            queue_size: queue_size as usize,
            features,
            host: Mutex::new(host),
            rx: Mutex::new(RxState {
                pending: Vec::new(),
                off: 0,
                buf: vec![0; RX_CHUNK],
            }),
            ctrl: Mutex::new(CtrlState {
                out: VecDeque::new(),
                device_ready: false,
                port_ready: false,
                guest_open: false,
                last_size: None,
            }),
            size_timer: Mutex::new(None),
            channel: Mutex::new(RequestChannel::default()),
            acked: AtomicU64::new(0),
            mem: MemorySlot::new(),
            exit: WorkerExitEvents::new(),
            guards: RingGuards::new(if multiport { 4 } else { 2 }),
            counters: Counters::default(),
        }
    }

    /// The host side.
    pub fn host(&self) -> MutexGuard<'_, Host> {
        self.host.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nq(&self) -> u64 {
        if self.multiport {
            4
        } else {
            2
        }
    }

    /// Passes a change of the terminal size on to the driver: a RESIZE
    /// control message with `MULTIPORT`, a config change without.
    fn check_size(&self) {
        if let Some(t) = self.size_timer.lock().unwrap().as_mut() {
            let _ = t.wait();
        }
        if !self.multiport {
            self.check_config_size();
            return;
        }
        let size = self.host().size();
        let mut ctrl = self.ctrl.lock().unwrap();
        if size.is_none() || size == ctrl.last_size {
            return;
        }
        let old = ctrl.last_size.replace(size.unwrap());
        if old.is_some() && ctrl.port_ready && self.acked.load(Ordering::Acquire) & bit(F_SIZE) != 0
        {
            let (cols, rows) = size.unwrap();
            debug!("console resized to {cols}x{rows}");
            ctrl.queue(resize_msg(cols, rows), &self.counters.dropped_ctrl);
        }
    }

    /// Without `MULTIPORT`: announces a config change when the size in
    /// config space differs from what the frontend last read or was told.
    /// Nothing is announced before the frontend has read the config, or
    /// when the driver does not use the size.
    fn check_config_size(&self) {
        let size = self.config_size();
        let mut ctrl = self.ctrl.lock().unwrap();
        if ctrl.last_size.map_or(true, |known| known == size)
            || self.acked.load(Ordering::Acquire) & bit(F_SIZE) == 0
        {
            return;
        }
        ctrl.last_size = Some(size);
        drop(ctrl);
        let (cols, rows) = size;
        if self.announce_config_change() {
            info!("console resized to {cols}x{rows}: config change announced");
        } else {
            debug!("console resized to {cols}x{rows}; no backend request channel");
        }
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` to the frontend, without
    /// asking for a reply (the worker never waits for the frontend); false
    /// without a usable channel.
    fn announce_config_change(&self) -> bool {
        let mut ch = self.channel.lock().unwrap();
        let Some(sock) = ch.sock.as_ref() else {
            return false;
        };
        // Header only: request, flags (protocol version 1), body size 0.
        // Written by hand: `vhost` 0.18 keeps its message header type private
        // and its `Backend` has no config-change request.
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_le_bytes());
        msg[4..8].copy_from_slice(&1u32.to_le_bytes());
        // send(2) with MSG_DONTWAIT rather than a write on a non-blocking
        // socket: the file description (and its O_NONBLOCK) is shared with
        // the `Backend` the crate holds, which expects a blocking socket.
        // SAFETY: send(2) of a valid buffer on a socket we own.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n == msg.len() as isize {
            return true;
        }
        let e = if n < 0 {
            io::Error::last_os_error().to_string()
        } else {
            format!("short write ({n} bytes)")
        };
        limited!(
            FRONTEND_LINES,
            warn,
            "backend request channel: {e}; config changes are no longer announced"
        );
        ch.sock = None;
        false
    }

    /// (cols, rows) as config space reports them: 80x25 while unknown.
    fn config_size(&self) -> (u16, u16) {
        self.host().size().unwrap_or((80, 25))
    }

    fn config(&self) -> [u8; 12] {
        let (cols, rows) = self.config_size();
        if !self.multiport {
            // What the frontend knows now; later changes are announced.
            self.ctrl.lock().unwrap().last_size = Some((cols, rows));
        }
        let mut c = [0u8; 12];
        c[0..2].copy_from_slice(&cols.to_le_bytes());
        c[2..4].copy_from_slice(&rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    /// Host input to queue 0.
    fn process_rx(&self, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self.mem.get() else {
            return Ok(());
        };
        if !vring_ready(vring) {
            return Ok(());
        }
        let guard = self.guards.get(0);
        let mut rx = self.rx.lock().unwrap();
        let rx = &mut *rx;
        let mut vr = vring.get_mut();
        let mut used = false;
        loop {
            if rx.off == rx.pending.len() {
                let n = match self.host().read_input(&mut rx.buf) {
                    Some(n) => n,
                    None => break,
                };
                rx.pending.clear();
                rx.pending.extend_from_slice(&rx.buf[..n]);
                rx.off = 0;
            }
            let f = rxq::fill(vr.get_queue_mut(), &mem, guard, &rx.pending[rx.off..]);
            rx.off += f.written;
            used |= f.used;
            let c = &self.counters;
            c.rx_bytes.fetch_add(f.written as u64, Ordering::Relaxed);
            c.bad_chains.fetch_add(f.bad_chains, Ordering::Relaxed);
            if rx.off < rx.pending.len() {
                // Out of buffers: the rest waits for the next kick.
                break;
            }
        }
        if used {
            signal(&mut vr)?;
        }
        Ok(())
    }

    /// Card output from queue 1 to the host side.
    fn process_tx(&self, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self.mem.get() else {
            return Ok(());
        };
        if !vring_ready(vring) {
            return Ok(());
        }
        let mut vr = vring.get_mut();
        let used = txq::drain_out_pieces(
            vr.get_queue_mut(),
            &mem,
            self.guards.get(1),
            TX_CHUNK,
            TX_MAX_CHAIN,
            |bytes, head| match bytes {
                Some(b) => {
                    self.counters
                        .tx_bytes
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    self.host().write_output(b);
                }
                None => {
                    debug!("tx: dropping malformed chain {head}");
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
            },
        );
        if used {
            signal(&mut vr)?;
        }
        Ok(())
    }

    /// Control messages from the driver (queue 3), answers on queue 2.
    fn process_ctrl(&self, c_ivq: &Vring, c_ovq: &Vring) -> io::Result<()> {
        let Some(mem) = self.mem.get() else {
            return Ok(());
        };
        let mut ctrl = self.ctrl.lock().unwrap();
        if vring_ready(c_ovq) {
            let mut vr = c_ovq.get_mut();
            let used = txq::drain_out(
                vr.get_queue_mut(),
                &mem,
                self.guards.get(3),
                MAX_CTRL,
                |bytes, _| match bytes.and_then(Control::parse) {
                    Some(c) => self.control_event(&mut ctrl, c),
                    None => {
                        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                    }
                },
            );
            if used {
                signal(&mut vr)?;
            }
        }
        if vring_ready(c_ivq) && !ctrl.out.is_empty() {
            let mut vr = c_ivq.get_mut();
            let sent = control::send(vr.get_queue_mut(), &mem, self.guards.get(2), &mut ctrl.out);
            self.counters
                .bad_chains
                .fetch_add(sent.bad_chains, Ordering::Relaxed);
            if sent.used {
                signal(&mut vr)?;
            }
        }
        Ok(())
    }

    fn control_event(&self, ctrl: &mut CtrlState, msg: Control) {
        let Control { id, event, value } = msg;
        debug!("control: port {id} event {event} value {value}");
        match event {
            DEVICE_READY => {
                if value != 1 {
                    limited!(
                        DRIVER_LINES,
                        warn,
                        "driver failed to initialise the console device"
                    );
                    return;
                }
                ctrl.device_ready = true;
                ctrl.queue(ctrl_msg(0, DEVICE_ADD, 0), &self.counters.dropped_ctrl);
            }
            PORT_READY if id == 0 => {
                if value != 1 {
                    limited!(DRIVER_LINES, warn, "driver failed to add console port 0");
                    return;
                }
                ctrl.port_ready = true;
                ctrl.queue(ctrl_msg(0, CONSOLE_PORT, 1), &self.counters.dropped_ctrl);
                if self.acked.load(Ordering::Acquire) & bit(F_SIZE) != 0 {
                    if let Some((cols, rows)) = self.host().size() {
                        ctrl.last_size = Some((cols, rows));
                        ctrl.queue(resize_msg(cols, rows), &self.counters.dropped_ctrl);
                    }
                }
                ctrl.queue(ctrl_msg(0, PORT_OPEN, 1), &self.counters.dropped_ctrl);
            }
            PORT_OPEN if id == 0 => {
                ctrl.guest_open = value != 0;
                limited!(
                    DRIVER_LINES,
                    info,
                    "console port {}",
                    if ctrl.guest_open { "opened" } else { "closed" }
                );
            }
            _ => debug!("control: ignoring event {event} for port {id}"),
        }
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.nq() as usize
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let mut ch = self.channel.lock().unwrap();
        ch.backend = Some(backend);
        ch.sock = ch.pending.take();
        if ch.sock.is_none() {
            limited!(
                FRONTEND_LINES,
                warn,
                "backend request channel without its socket: config changes are not announced"
            );
        }
    }

    fn reset_device(&self) {
        let mut c = self.ctrl.lock().unwrap();
        c.out.clear();
        c.device_ready = false;
        c.guest_open = false;
        c.port_ready = false;
        if self.multiport {
            c.last_size = None;
        }
        // Without MULTIPORT the frontend keeps the config it read, so
        // changes after a reset are still announced.
    }

    fn set_event_idx(&self, _enabled: bool) {}

    /// The frontend stopped the ring (`GET_VRING_BASE`): a ring broken by
    /// the driver is served again once the frontend sets it up anew.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.guards.reset(queue_index);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.config(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // emerg_wr (offset 8): one character written by the driver.
        if offset == 8 && !buf.is_empty() {
            self.host().write_output(&buf[..1]);
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.mem.set(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        if self.multiport {
            vec![0b0001, 0b0010, 0b1100]
        } else {
            vec![0b01, 0b10]
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.create()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // A worker thread narrows its seccomp filter once (its sandbox.rs).
        mic_backend_common::sandbox::enter(ThreadKind::Worker);
        let ev = u64::from(device_event);
        let base = self.nq() + 1;
        match (thread_id, ev) {
            (0, 0) => self.process_rx(&vrings[0]),
            (0, e) if e == base + EV_INPUT => self.process_rx(&vrings[0]),
            (0, e) if e == base + EV_LISTEN => {
                self.host().accept();
                self.process_rx(&vrings[0])
            }
            (1, 0) => self.process_tx(&vrings[0]),
            (1, e) if e == base + EV_SIZE_TIMER && !self.multiport => {
                self.check_size();
                Ok(())
            }
            (2, 0 | 1) if vrings.len() == 2 => self.process_ctrl(&vrings[0], &vrings[1]),
            (2, e) if e == base + EV_SIZE_TIMER && vrings.len() == 2 => {
                self.check_size();
                self.process_ctrl(&vrings[0], &vrings[1])
            }
            _ => {
                warn!("unexpected event {device_event} on worker {thread_id}");
                Ok(())
            }
        }
    }
}

impl PersistentBackend for ConsoleBackend {
    /// Resets the device state for a new frontend (host side kept).
    fn new_frontend(&self) {
        self.host().detach();
        {
            let mut c = self.ctrl.lock().unwrap();
            c.out.clear();
            c.device_ready = false;
            c.guest_open = false;
            c.port_ready = false;
            c.last_size = None;
        }
        *self.channel.lock().unwrap() = RequestChannel::default();
        self.acked.store(0, Ordering::Release);
        self.mem.clear();
        self.guards.reset_all();
        self.exit.close_all();
    }

    /// Registers the host side with the receive worker's epoll set. Called
    /// for every new frontend, with the epoll fds in worker order.
    fn attach_workers(&self, workers: &[Worker]) {
        if let Some(w) = workers.first() {
            self.host().attach(w.clone(), self.nq() + 1);
        }
        // The last worker watches the terminal size: the control queues'
        // with MULTIPORT, the transmitq's without.
        let watch_size = self.host().has_size();
        let worker = self.queues_per_thread().len() - 1;
        if let (true, Some(w)) = (watch_size, workers.get(worker)) {
            let mut t = self.size_timer.lock().unwrap();
            if t.is_none() {
                match TimerFd::new() {
                    Ok(mut timer) => {
                        if let Err(e) = timer.reset(SIZE_POLL, Some(SIZE_POLL)) {
                            warn!("console size timer: {e}");
                        }
                        *t = Some(timer);
                    }
                    Err(e) => warn!("console size timer: {e}"),
                }
            }
            if let Some(timer) = t.as_ref() {
                let id = self.nq() + 1 + EV_SIZE_TIMER;
                if let Err(e) = w.register(timer.as_raw_fd(), EventSet::IN, id) {
                    warn!("console size timer not watched: {e}");
                }
            }
        }
    }

    /// Keeps the frontend's backend request channel until
    /// `set_backend_req_fd` confirms it.
    fn backend_channel(&self, channel: UnixStream) {
        self.channel.lock().unwrap().pending = Some(channel);
    }
}
