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
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use log::{debug, info, warn};
use mic_backend_common::guest::{
    read_config, vring_ready, writable_segments, write_segments, GuestMem, MemorySlot,
};
use mic_backend_common::{PersistentBackend, WorkerExitEvents};
use vhost::vhost_user::message::{BackendReq, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

use crate::host::{Host, EV_INPUT, EV_LISTEN};

type Vring = VringRwLock<GuestMem>;

/// VIRTIO_CONSOLE_F_SIZE: console size in config space.
pub const F_SIZE: u32 = 0;
/// VIRTIO_CONSOLE_F_MULTIPORT: control queues and several ports.
pub const F_MULTIPORT: u32 = 1;
/// VIRTIO_CONSOLE_F_EMERG_WRITE: emergency write through config space.
pub const F_EMERG_WRITE: u32 = 2;

/// Control event: driver is ready (driver to device).
pub const DEVICE_READY: u16 = 0;
/// Control event: a port was added (device to driver).
pub const DEVICE_ADD: u16 = 1;
/// Control event: port is ready (driver to device).
pub const PORT_READY: u16 = 3;
/// Control event: port is a console (device to driver).
pub const CONSOLE_PORT: u16 = 4;
/// Control event: console resize (device to driver).
pub const RESIZE: u16 = 5;
/// Control event: port opened or closed (both directions).
pub const PORT_OPEN: u16 = 6;

/// Largest control message accepted from the driver.
const MAX_CTRL: usize = 64;
/// Largest TX chain copied at once; longer chains are processed in pieces.
const TX_CHUNK: usize = 64 * 1024;
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
    out: VecDeque<Vec<u8>>,
    device_ready: bool,
    port_ready: bool,
    guest_open: bool,
    /// The size the driver last learnt: from a `RESIZE` message with
    /// `MULTIPORT`, from the config space (read or announced) without.
    last_size: Option<(u16, u16)>,
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
    size_timer: Mutex<Option<TimerFd>>,
    channel: Mutex<RequestChannel>,
    /// Traffic counters.
    pub counters: Counters,
}

/// RESIZE for port 0. Linux reads rows before cols here.
fn resize_msg(cols: u16, rows: u16) -> Vec<u8> {
    let mut m = ctrl_msg(0, RESIZE, 0);
    m.extend_from_slice(&rows.to_le_bytes());
    m.extend_from_slice(&cols.to_le_bytes());
    m
}

fn ctrl_msg(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(8);
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

/// Copies a driver-to-device chain (readable descriptors only) into `buf`,
/// at most `buf.len()` bytes. `None` for a malformed chain.
fn read_chain(
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

fn signal(vr: &mut VringState<GuestMem>) -> io::Result<()> {
    if vr.needs_notification().unwrap_or(true) {
        vr.signal_used_queue()?;
    }
    Ok(())
}

/// Drains every driver-to-device chain of a queue: hands each chain's bytes
/// to `each` (`None` for a malformed chain), returns it used with length 0,
/// and signals the driver once at the end.
fn drain_out(
    mem: &GuestMemoryMmap,
    vr: &mut VringState<GuestMem>,
    max: usize,
    mut each: impl FnMut(Option<&[u8]>, u16),
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut used = false;
    loop {
        let _ = vr.disable_notification();
        while let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let ok = read_chain(mem, chain, &mut buf, max).is_some();
            each(ok.then_some(&buf[..]), head);
            let _ = vr.add_used(head, 0);
            used = true;
        }
        match vr.enable_notification() {
            Ok(true) => continue,
            _ => break,
        }
    }
    if used {
        signal(vr)?;
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
            ctrl.out.push_back(resize_msg(cols, rows));
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
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_le_bytes());
        msg[4..8].copy_from_slice(&1u32.to_le_bytes());
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
        warn!("backend request channel: {e}; config changes are no longer announced");
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
            let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(&*mem) else {
                match vr.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let n = match writable_segments(&mem, chain) {
                Some(segs) => write_segments(&mem, &segs, &rx.pending[rx.off..]),
                None => {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            rx.off += n;
            self.counters
                .rx_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            let _ = vr.add_used(head, n as u32);
            used = true;
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
        drain_out(
            &mem,
            &mut vring.get_mut(),
            TX_CHUNK,
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
        )?;
        Ok(())
    }

    /// Control messages from the driver (queue 3), answers on queue 2.
    fn process_ctrl(&self, c_ivq: &Vring, c_ovq: &Vring) -> io::Result<()> {
        let Some(mem) = self.mem.get() else {
            return Ok(());
        };
        let mut ctrl = self.ctrl.lock().unwrap();
        if vring_ready(c_ovq) {
            drain_out(
                &mem,
                &mut c_ovq.get_mut(),
                MAX_CTRL,
                |bytes, _| match bytes {
                    Some(b) if b.len() >= 8 => {
                        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        let event = u16::from_le_bytes([b[4], b[5]]);
                        let value = u16::from_le_bytes([b[6], b[7]]);
                        self.control_event(&mut ctrl, id, event, value);
                    }
                    _ => {
                        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                    }
                },
            )?;
        }
        if vring_ready(c_ivq) && !ctrl.out.is_empty() {
            let mut vr = c_ivq.get_mut();
            let mut used = false;
            while let Some(msg) = ctrl.out.front() {
                let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(&*mem) else {
                    if let Ok(true) = vr.enable_notification() {
                        continue;
                    }
                    break;
                };
                let head = chain.head_index();
                match writable_segments(&mem, chain) {
                    Some(segs) if segs.iter().map(|s| s.1).sum::<usize>() >= msg.len() => {
                        let n = write_segments(&mem, &segs, msg);
                        let _ = vr.add_used(head, n as u32);
                        ctrl.out.pop_front();
                    }
                    _ => {
                        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                        let _ = vr.add_used(head, 0);
                    }
                }
                used = true;
            }
            if used {
                signal(&mut vr)?;
            }
        }
        Ok(())
    }

    fn control_event(&self, ctrl: &mut CtrlState, id: u32, event: u16, value: u16) {
        debug!("control: port {id} event {event} value {value}");
        match event {
            DEVICE_READY => {
                if value != 1 {
                    warn!("driver failed to initialise the console device");
                    return;
                }
                ctrl.device_ready = true;
                ctrl.out.push_back(ctrl_msg(0, DEVICE_ADD, 0));
            }
            PORT_READY if id == 0 => {
                if value != 1 {
                    warn!("driver failed to add console port 0");
                    return;
                }
                ctrl.port_ready = true;
                ctrl.out.push_back(ctrl_msg(0, CONSOLE_PORT, 1));
                if self.acked.load(Ordering::Acquire) & bit(F_SIZE) != 0 {
                    if let Some((cols, rows)) = self.host().size() {
                        ctrl.last_size = Some((cols, rows));
                        ctrl.out.push_back(resize_msg(cols, rows));
                    }
                }
                ctrl.out.push_back(ctrl_msg(0, PORT_OPEN, 1));
            }
            PORT_OPEN if id == 0 => {
                ctrl.guest_open = value != 0;
                info!(
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
            warn!("backend request channel without its socket: config changes are not announced");
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
        self.exit.close_all();
    }

    /// Registers the host side with the receive worker's epoll set. Called
    /// for every new frontend, with the epoll fds in worker order.
    fn attach_workers(&self, epoll_fds: &[RawFd]) {
        if let Some(fd) = epoll_fds.first() {
            self.host().attach(*fd, self.nq() + 1);
        }
        // The last worker watches the terminal size: the control queues'
        // with MULTIPORT, the transmitq's without.
        let watch_size = self.host().has_size();
        let worker = self.queues_per_thread().len() - 1;
        if let (true, Some(fd)) = (watch_size, epoll_fds.get(worker)) {
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
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: self.nq() + 1 + EV_SIZE_TIMER,
                };
                // SAFETY: plain epoll_ctl on descriptors owned by this process.
                unsafe { libc::epoll_ctl(*fd, libc::EPOLL_CTL_ADD, timer.as_raw_fd(), &mut ev) };
            }
        }
    }

    /// Keeps the frontend's backend request channel until
    /// `set_backend_req_fd` confirms it.
    fn backend_channel(&self, channel: UnixStream) {
        self.channel.lock().unwrap().pending = Some(channel);
    }
}
