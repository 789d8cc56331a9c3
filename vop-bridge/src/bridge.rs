//! The bridge's control loop: attaches to the `mic-x100` device, owns the
//! device page, wires each backend's rings to the card's doorbells and
//! vectors, and follows the card's lifecycle. It never touches the data path:
//! once a device runs, kicks and interrupts go between QEMU and the backend
//! through eventfds alone.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::abi::{self, reg, CardState, DoorbellValue};
use crate::backend::{Backend, BackendError, RingSetup};
use crate::card::{CardInput, CardTracker};
use crate::config::{BridgeConfig, DeviceConfig, DeviceKind};
use crate::control::{ControlRequest, ControlServer};
use crate::device_protocol::{
    Attachment, CardEvent, CardRam, DeviceLink, DeviceMessage, HostMessage, ProtocolError,
};
use crate::page::{ctrl_field, DevicePage};

/// Virtio status bit `DRIVER_OK`.
const STATUS_DRIVER_OK: u8 = 4;
/// Virtio status bit `FAILED`.
const STATUS_FAILED: u8 = 0x80;

const TOKEN_LINK: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_BACKEND_REQ: u64 = 0x100;
const TOKEN_BACKEND_HUP: u64 = 0x200;

/// Errors that end the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The device link failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A backend could not be used.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The device page could not be built.
    #[error("device page: {0}")]
    Page(#[from] crate::page::PageError),
    /// The page found in the aperture does not match the configuration.
    #[error("{0}")]
    Mismatch(String),
    /// System call failure.
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
}

/// The eventfds of a running device.
struct Wiring {
    vector: u32,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

/// One configured device.
struct Device {
    cfg: DeviceConfig,
    queue_size: u16,
    backend: Option<Backend>,
    slot: Option<usize>,
    wiring: Option<Wiring>,
    last_config: Vec<u8>,
    /// The host asked the card to let go of the device (hot removal).
    removing_since: Option<Instant>,
    /// Hot-removed: kept only so indices stay stable until the next reset.
    removed: bool,
}

/// How long the card has to acknowledge a removal (upstream waited 15 s).
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(15);

/// How serving one attachment ended.
enum Ended {
    /// Asked to stop (signal), or the card powered off with `exit_on_poweroff`.
    Exit,
    /// The device went away; attach again.
    Detached,
}

/// The bridge for one card.
pub struct Bridge {
    cfg: BridgeConfig,
    devices: Vec<Device>,
    epoll: Epoll,
    signals: SignalFd,
    control: Option<ControlServer>,
    card: CardTracker,
}

/// Everything that exists while attached to the device.
struct Attached {
    link: DeviceLink,
    att: Attachment,
    page: DevicePage,
    aperture_id: (u64, u64),
}

impl Bridge {
    /// Connects to every backend and prepares the loop.
    pub fn new(cfg: BridgeConfig) -> Result<Self, BridgeError> {
        let timeout = Duration::from_secs(cfg.connect_timeout);
        let mut devices = Vec::with_capacity(cfg.devices.len());
        for d in &cfg.devices {
            let backend = Backend::connect(d.kind, &d.socket, timeout)?;
            devices.push(Device {
                cfg: d.clone(),
                queue_size: d.queue_size.unwrap_or(cfg.queue_size),
                last_config: backend.config().to_vec(),
                backend: Some(backend),
                slot: None,
                wiring: None,
                removing_since: None,
                removed: false,
            });
        }
        let epoll = Epoll::new().map_err(|e| BridgeError::Os("epoll", e))?;
        let signals = SignalFd::new().map_err(|e| BridgeError::Os("signalfd", e))?;
        let control = match &cfg.control_socket {
            Some(p) => {
                Some(ControlServer::bind(p).map_err(|e| BridgeError::Os("control socket", e))?)
            }
            None => None,
        };
        let b = Bridge {
            cfg,
            devices,
            epoll,
            signals,
            control,
            card: CardTracker::from_snapshot(false, 0, 0),
        };
        b.watch(b.signals.fd(), TOKEN_SIGNAL, EventSet::IN)?;
        if let Some(c) = &b.control {
            b.watch(c.as_raw_fd(), TOKEN_CONTROL, EventSet::IN)?;
        }
        for i in 0..b.devices.len() {
            b.watch_backend(i)?;
        }
        Ok(b)
    }

    fn watch(&self, fd: RawFd, token: u64, events: EventSet) -> Result<(), BridgeError> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(|e| BridgeError::Os("epoll_ctl", e))
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn watch_backend(&self, i: usize) -> Result<(), BridgeError> {
        if let Some(b) = &self.devices[i].backend {
            self.watch(
                b.socket_fd(),
                TOKEN_BACKEND_HUP + i as u64,
                EventSet::HANG_UP | EventSet::READ_HANG_UP,
            )?;
            if let Some(fd) = b.request_fd() {
                self.watch(fd, TOKEN_BACKEND_REQ + i as u64, EventSet::IN)?;
            }
        }
        Ok(())
    }

    fn drop_backend(&mut self, i: usize) {
        if let Some(b) = self.devices[i].backend.take() {
            self.unwatch(b.socket_fd());
            if let Some(fd) = b.request_fd() {
                self.unwatch(fd);
            }
        }
    }

    /// Runs until a signal, or until the card powers off with `exit_on_poweroff`.
    pub fn run(&mut self) -> Result<(), BridgeError> {
        loop {
            let link = match self.connect_device()? {
                Some(l) => l,
                None => return Ok(()),
            };
            let mut a = match self.attach(link) {
                Ok(a) => a,
                // The device may be going away (QEMU exiting): try again.
                Err(BridgeError::Protocol(e)) => {
                    warn!("attaching to the device failed: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.watch(a.link.as_raw_fd(), TOKEN_LINK, EventSet::IN)?;
            let ended = self.serve(&mut a);
            self.unwatch(a.link.as_raw_fd());
            for i in 0..self.devices.len() {
                self.stop_device(&mut a, i, false);
                self.devices[i].slot = None;
            }
            match ended? {
                Ended::Exit => return Ok(()),
                Ended::Detached => {
                    info!("device detached; waiting for it to come back");
                    if let Err(e) = self.reconnect_backends() {
                        error!("reconnecting backends: {e}");
                    }
                }
            }
        }
    }

    /// Connects to the device socket; `None` when a signal asked us to stop.
    fn connect_device(&mut self) -> Result<Option<DeviceLink>, BridgeError> {
        let path = self.cfg.device_socket.clone();
        let first_deadline = Instant::now() + Duration::from_secs(self.cfg.connect_timeout);
        let mut warned = false;
        loop {
            match DeviceLink::connect(&path) {
                Ok(l) => return Ok(Some(l)),
                Err(e) => {
                    if !warned && Instant::now() > first_deadline {
                        warn!(
                            "still waiting for the device socket {}: {e}",
                            path.display()
                        );
                        warned = true;
                    }
                }
            }
            if self.signals.pending() {
                return Ok(None);
            }
            self.poll_backends_and_control(Duration::from_millis(100))?;
        }
    }

    fn attach(&mut self, mut link: DeviceLink) -> Result<Attached, BridgeError> {
        let att = link.attach()?;
        let h = &att.hello;
        info!(
            "attached to card node {} (aperture {} KiB, vCPUs {})",
            h.node_id,
            att.aperture.size() >> 10,
            if h.running { "running" } else { "stopped" }
        );
        self.card = CardTracker::from_snapshot(h.running, h.card_state, h.shutdown_status);
        info!(
            "card state: {} ({})",
            self.card.state(),
            self.card.shutdown_status()
        );
        let meta = att
            .aperture
            .file()
            .metadata()
            .map_err(|e| BridgeError::Os("fstat", e))?;
        let aperture_id = (meta.dev(), meta.ino());
        let page = match h.device_page_offset() {
            Some(off) => self.adopt(&att, off)?,
            None => DevicePage::build(&att.aperture, abi::DP_DEFAULT_OFFSET, h.node_id as u8)?,
        };
        let mut a = Attached {
            link,
            att,
            page,
            aperture_id,
        };
        if a.att.hello.device_page_offset().is_some() {
            // Reattach: resume devices the card is using.
            for i in 0..self.devices.len() {
                let slot = self.devices[i].slot.expect("adopted");
                if a.page.status(&a.att.aperture, slot)? & STATUS_DRIVER_OK != 0 {
                    if let Err(e) = self.start_device(&mut a, i, true) {
                        error!(
                            "{}: cannot resume: {e}",
                            self.devices[i].cfg.socket.display()
                        );
                    }
                }
            }
        } else {
            self.populate(&mut a)?;
            self.publish(&mut a)?;
        }
        Ok(a)
    }

    fn adopt(&mut self, att: &Attachment, offset: u64) -> Result<DevicePage, BridgeError> {
        let page = DevicePage::adopt(&att.aperture, offset)?;
        let live: Vec<_> = page
            .slots()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .collect();
        if live.len() != self.devices.len()
            || live
                .iter()
                .zip(&self.devices)
                .any(|((_, s), d)| s.device_type != d.cfg.kind.virtio_id())
        {
            return Err(BridgeError::Mismatch(format!(
                "the card uses a device page with {} devices that does not match this \
                 configuration ({} devices); reset the card or use the same devices",
                live.len(),
                self.devices.len()
            )));
        }
        for ((slot, s), d) in live.into_iter().zip(self.devices.iter_mut()) {
            d.slot = Some(slot);
            d.last_config = page.config(&att.aperture, slot)?;
            if let Some(b) = &d.backend {
                if b.num_queues() != s.rings.len() {
                    return Err(BridgeError::Mismatch(format!(
                        "{}: {} queues, the card's page has {}",
                        d.cfg.socket.display(),
                        b.num_queues(),
                        s.rings.len()
                    )));
                }
            }
        }
        info!("adopted the card's device page at {offset:#x}");
        Ok(page)
    }

    /// Adds every device whose backend is connected to the page.
    fn populate(&mut self, a: &mut Attached) -> Result<(), BridgeError> {
        for d in self.devices.iter_mut() {
            if let Some(b) = &d.backend {
                let spec = b.spec(d.queue_size);
                d.slot = Some(a.page.add(&a.att.aperture, &spec)?);
                d.last_config = spec.config;
                info!(
                    "device {} ({}, {} queues of {}) on doorbell {}",
                    d.slot.unwrap(),
                    d.cfg.kind.name(),
                    spec.queue_sizes.len(),
                    d.queue_size,
                    a.page.slots()[d.slot.unwrap()].as_ref().unwrap().c2h_db
                );
            }
        }
        Ok(())
    }

    fn publish(&mut self, a: &mut Attached) -> Result<(), BridgeError> {
        let off = a.page.offset();
        a.link.send(&HostMessage::RegWrite {
            offset: reg::spad(abi::SPAD_DP_LO),
            value: off as u32,
        })?;
        a.link.send(&HostMessage::RegWrite {
            offset: reg::spad(abi::SPAD_DP_HI),
            value: (off >> 32) as u32,
        })?;
        a.link.sync()?;
        a.link
            .send(&HostMessage::RaiseVector(abi::CONTROL_VECTOR))?;
        info!("device page published at aperture offset {off:#x}");
        Ok(())
    }

    fn serve(&mut self, a: &mut Attached) -> Result<Ended, BridgeError> {
        let mut events = vec![EpollEvent::default(); 16];
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        loop {
            // Messages queued while waiting for a SYNC come first.
            while a.link.has_pending() {
                let m = a.link.recv()?;
                if let Some(end) = self.on_message(a, m)? {
                    return Ok(end);
                }
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            let n = self
                .epoll
                .wait(wait.as_millis() as i32, &mut events)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        Ok(0)
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| BridgeError::Os("epoll_wait", e))?;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_LINK => {
                        let m = match a.link.recv() {
                            Ok(m) => m,
                            Err(ProtocolError::Closed) => {
                                info!("the device closed the connection");
                                if self.card.state() == CardState::Ready
                                    && self.cfg.exit_on_poweroff
                                {
                                    return Ok(Ended::Exit);
                                }
                                return Ok(Ended::Detached);
                            }
                            Err(e) => {
                                error!("device link: {e}; reattaching");
                                return Ok(Ended::Detached);
                            }
                        };
                        if let Some(end) = self.on_message(a, m)? {
                            return Ok(end);
                        }
                    }
                    TOKEN_SIGNAL => {
                        info!("signal received; stopping");
                        return Ok(Ended::Exit);
                    }
                    TOKEN_CONTROL => self.on_control(Some(a)),
                    t if t >= TOKEN_BACKEND_HUP => {
                        self.on_backend_gone(a, (t - TOKEN_BACKEND_HUP) as usize)
                    }
                    t if t >= TOKEN_BACKEND_REQ => {
                        self.on_backend_request(a, (t - TOKEN_BACKEND_REQ) as usize)
                    }
                    _ => {}
                }
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + Duration::from_secs(1);
                self.tick(a);
            }
        }
    }

    /// While detached: keep the control socket answering and notice signals.
    fn poll_backends_and_control(&mut self, wait: Duration) -> Result<(), BridgeError> {
        let mut events = vec![EpollEvent::default(); 8];
        let n = self
            .epoll
            .wait(wait.as_millis() as i32, &mut events)
            .unwrap_or(0);
        for ev in &events[..n] {
            if ev.data() == TOKEN_CONTROL {
                self.on_control(None);
            }
        }
        Ok(())
    }

    fn set_state(&mut self, input: CardInput) {
        if let Some(s) = self.card.apply(input) {
            info!(
                "card state: {s} (shutdown status {})",
                self.card.shutdown_status()
            );
        }
    }

    fn on_message(
        &mut self,
        a: &mut Attached,
        m: DeviceMessage,
    ) -> Result<Option<Ended>, BridgeError> {
        match m {
            DeviceMessage::RegWrite { offset, value } => match offset {
                reg::CARD_STATE => self.set_state(CardInput::CardStateWritten(value)),
                reg::SHUTDOWN_STATUS => self.set_state(CardInput::ShutdownStatusWritten(value)),
                _ => debug!("card wrote {value:#x} to register {offset:#x}"),
            },
            DeviceMessage::Doorbell { doorbell, value } => {
                let Some(i) = self.device_on_doorbell(a, doorbell) else {
                    warn!("card rang doorbell {doorbell} ({value:#x}), which no device owns");
                    return Ok(None);
                };
                match DoorbellValue::from(value) {
                    DoorbellValue::Control => self.on_device_control(a, i),
                    DoorbellValue::Kick(q) => {
                        debug!("kick of queue {q} of device {i} before it started")
                    }
                    DoorbellValue::Reserved(v) => {
                        warn!("device {i}: reserved doorbell value {v:#x} ignored")
                    }
                }
            }
            DeviceMessage::CardEvent(ev) => return self.on_card_event(a, ev),
            DeviceMessage::MemTable(table) => {
                a.att.ram = CardRam::map(table)?;
                debug!("new memory table: {:?}", a.att.ram.table());
                let regions = self.vhost_regions(a);
                for d in self.devices.iter_mut().filter(|d| d.wiring.is_some()) {
                    if let Some(b) = d.backend.as_mut() {
                        if let Err(e) = b.set_mem_table(&regions) {
                            error!("{e}");
                        }
                    }
                }
            }
            DeviceMessage::Error {
                request_type,
                errno,
                text,
            } => {
                error!("device refused request {request_type}: {text} (errno {errno})")
            }
            DeviceMessage::Hello(..) | DeviceMessage::Sync(_) => {}
            DeviceMessage::Unknown(t) => debug!("skipped device message type {t}"),
        }
        Ok(None)
    }

    fn device_on_doorbell(&self, a: &Attached, db: u32) -> Option<usize> {
        self.devices.iter().position(|d| {
            d.slot
                .and_then(|s| a.page.slots()[s].as_ref())
                .is_some_and(|s| u32::from(s.c2h_db) == db)
        })
    }

    fn on_card_event(
        &mut self,
        a: &mut Attached,
        ev: CardEvent,
    ) -> Result<Option<Ended>, BridgeError> {
        match ev {
            CardEvent::Run => self.set_state(CardInput::Run),
            CardEvent::Stop => debug!("card paused"),
            CardEvent::Unknown(v) => debug!("unknown card event {v}"),
            CardEvent::PowerOff => {
                for i in 0..self.devices.len() {
                    self.stop_device(a, i, false);
                }
                self.set_state(CardInput::PowerOff);
                info!("card powered off ({})", self.card.shutdown_status());
                if self.cfg.exit_on_poweroff {
                    return Ok(Some(Ended::Exit));
                }
            }
            CardEvent::Reset => {
                self.set_state(CardInput::Reset);
                match self.rebuild(a) {
                    Ok(()) => self.set_state(CardInput::PageRebuilt),
                    Err(e) => {
                        error!("rebuilding the device page after a reset failed: {e}");
                        self.set_state(CardInput::RebuildFailed);
                    }
                }
            }
        }
        Ok(None)
    }

    /// After a card reset: fresh backends (their device state reset), a fresh page.
    fn rebuild(&mut self, a: &mut Attached) -> Result<(), BridgeError> {
        self.reconnect_backends()?;
        a.page = DevicePage::build(
            &a.att.aperture,
            abi::DP_DEFAULT_OFFSET,
            a.att.hello.node_id as u8,
        )?;
        self.populate(a)?;
        self.publish(a)
    }

    /// Reconnects every backend, so each serves the next card (or the next
    /// boot) from a clean device state. Hot-removed devices are dropped and
    /// the remaining ones renumbered.
    fn reconnect_backends(&mut self) -> Result<(), BridgeError> {
        let timeout = Duration::from_secs(self.cfg.connect_timeout);
        for i in 0..self.devices.len() {
            self.drop_backend(i);
        }
        self.devices.retain(|d| !d.removed);
        for i in 0..self.devices.len() {
            let d = &mut self.devices[i];
            d.removing_since = None;
            // The device forgot our eventfds (reset) or is gone (detach).
            d.wiring = None;
            d.slot = None;
            d.backend = Some(Backend::connect(d.cfg.kind, &d.cfg.socket, timeout)?);
            self.watch_backend(i)?;
        }
        Ok(())
    }

    fn on_device_control(&mut self, a: &mut Attached, i: usize) {
        if let Err(e) = self.device_control(a, i) {
            error!("device {i} ({}): {e}", self.devices[i].cfg.kind.name());
        }
    }

    fn device_control(&mut self, a: &mut Attached, i: usize) -> Result<(), BridgeError> {
        let slot = self.devices[i]
            .slot
            .expect("device on a doorbell has a slot");
        let ap = &a.att.aperture;
        crate::page::check_unused_fields(ap, &a.page, slot);
        let ctrl = a.page.ctrl(ap, slot)?;
        if ctrl.vdev_reset != 0 {
            // docs/vop-abi.md 7.3
            self.stop_device(a, i, true);
            let ap = &a.att.aperture;
            a.page.reset_rings(ap, slot)?;
            a.page.set_status(ap, slot, 0)?;
            a.page.set_ctrl_byte(ap, slot, ctrl_field::VDEV_RESET, 0)?;
            a.page.set_ctrl_byte(ap, slot, ctrl_field::HOST_ACK, 1)?;
            info!("device {i} reset by the card");
            return Ok(());
        }
        let status = a.page.status(ap, slot)?;
        if status & STATUS_FAILED != 0 {
            warn!("device {i}: the card's driver failed (status {status:#x})");
        }
        let config = a.page.config(ap, slot)?;
        if config != self.devices[i].last_config {
            let old = std::mem::replace(&mut self.devices[i].last_config, config.clone());
            let first = config
                .iter()
                .zip(&old)
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            let last = config
                .iter()
                .zip(&old)
                .rposition(|(x, y)| x != y)
                .unwrap_or(first);
            if let Some(b) = self.devices[i].backend.as_mut() {
                b.set_config(first as u32, &config[first..=last])?;
            }
        }
        let running = self.devices[i].wiring.is_some();
        if status & STATUS_DRIVER_OK != 0 && !running {
            self.start_device(a, i, false)?;
        } else if status == 0 && running {
            self.stop_device(a, i, true);
        }
        Ok(())
    }

    /// Base of the aperture in the memory table's userspace addresses.
    fn aperture_hva(&self, a: &Attached) -> Option<u64> {
        a.att.ram.memory().iter().find_map(|r| {
            let fo = r.file_offset()?;
            let m = fo.file().metadata().ok()?;
            ((m.dev(), m.ino()) == a.aperture_id)
                .then(|| (r.as_ptr() as u64).wrapping_sub(fo.start()))
        })
    }

    fn vhost_regions(&self, a: &Attached) -> Vec<VhostUserMemoryRegionInfo> {
        a.att
            .ram
            .memory()
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                })
            })
            .collect()
    }

    /// Starts a device's backend (`docs/vop-abi.md` 7.2 step 3). `resume`
    /// continues from the rings' used indices (reattach, backend restart).
    fn start_device(
        &mut self,
        a: &mut Attached,
        i: usize,
        resume: bool,
    ) -> Result<(), BridgeError> {
        let slot_index = self.devices[i].slot.expect("slot");
        let ap = &a.att.aperture;
        let slot = a.page.slots()[slot_index].clone().expect("live slot");
        let Some(vector) = a.page.h2c_vdev_db(ap, slot_index)? else {
            return Err(BridgeError::Mismatch(format!(
                "device {i}: DRIVER_OK without a valid interrupt vector"
            )));
        };
        let Some(base) = self.aperture_hva(a) else {
            return Err(BridgeError::Mismatch(
                "the card has not mapped the aperture (BAR2); cannot start devices".into(),
            ));
        };
        if self.devices[i].backend.is_none() {
            debug!("device {i}: backend not connected; will start when it returns");
            return Ok(());
        }
        let acked = a.page.acked_features(ap, slot_index)?;
        let regions = self.vhost_regions(a);
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in &slot.rings {
            kicks.push(EventFd::new(EFD_NONBLOCK).map_err(|e| BridgeError::Os("eventfd", e))?);
            calls.push(EventFd::new(EFD_NONBLOCK).map_err(|e| BridgeError::Os("eventfd", e))?);
        }
        let mut setups = Vec::with_capacity(slot.rings.len());
        for (q, r) in slot.rings.iter().enumerate() {
            setups.push(RingSetup {
                num: r.num,
                desc: base + r.desc(),
                avail: base + r.avail(),
                used: base + r.used(),
                base: if resume {
                    a.page.used_idx(ap, slot_index, q)?
                } else {
                    0
                },
                kick: &kicks[q],
                call: &calls[q],
            });
        }
        let backend = self.devices[i].backend.as_mut().unwrap();
        backend.start(acked, &regions, &setups)?;
        for q in 0..slot.rings.len() {
            a.link.send(&HostMessage::SetDoorbellFd {
                doorbell: u32::from(slot.c2h_db),
                value: q as u32,
                fd: Some(kicks[q].as_raw_fd()),
            })?;
            a.link.send(&HostMessage::SetVectorFd {
                vector,
                fd: Some(calls[q].as_raw_fd()),
            })?;
        }
        a.link.sync()?;
        // Buffers posted before the rings started: look at them now.
        for k in &kicks {
            let _ = k.write(1);
        }
        info!(
            "device {i} ({}) started: {} queues, features {acked:#x}, doorbell {}, vector {vector}",
            self.devices[i].cfg.kind.name(),
            slot.rings.len(),
            slot.c2h_db
        );
        self.devices[i].wiring = Some(Wiring {
            vector,
            kicks,
            calls,
        });
        Ok(())
    }

    /// Stops a device's rings and unwires its eventfds (`unwire`: tell the
    /// device; not needed after a reset, when it forgot them already).
    fn stop_device(&mut self, a: &mut Attached, i: usize, unwire: bool) {
        let Some(w) = self.devices[i].wiring.take() else {
            return;
        };
        if let Some(b) = self.devices[i].backend.as_mut() {
            if let Err(e) = b.stop() {
                warn!("{e}");
            }
        }
        if unwire {
            self.unwire(a, i, &w);
            if let Err(e) = a.link.sync() {
                warn!("unwiring device {i}: {e}");
            }
        }
        drop(w.calls);
        info!("device {i} ({}) stopped", self.devices[i].cfg.kind.name());
    }

    /// Asks the device to forget a device's kick and call eventfds.
    fn unwire(&self, a: &mut Attached, i: usize, w: &Wiring) {
        if let Some(slot) = self.devices[i].slot.and_then(|s| a.page.slots()[s].clone()) {
            for q in 0..w.kicks.len() {
                let _ = a.link.send(&HostMessage::SetDoorbellFd {
                    doorbell: u32::from(slot.c2h_db),
                    value: q as u32,
                    fd: None,
                });
            }
        }
        let _ = a.link.send(&HostMessage::SetVectorFd {
            vector: w.vector,
            fd: None,
        });
    }

    fn on_backend_gone(&mut self, a: &mut Attached, i: usize) {
        error!(
            "{} backend {} went away; its device stalls until the backend is back",
            self.devices[i].cfg.kind.name(),
            self.devices[i].cfg.socket.display()
        );
        let was_running = self.devices[i].wiring.is_some();
        // Its rings are gone with it; unwire so kicks come to us meanwhile.
        if let Some(w) = self.devices[i].wiring.take() {
            self.unwire(a, i, &w);
        }
        self.drop_backend(i);
        if was_running {
            debug!("device {i} will resume from the rings' used indices");
        }
    }

    fn on_backend_request(&mut self, a: &mut Attached, i: usize) {
        let Some(b) = self.devices[i].backend.as_mut() else {
            return;
        };
        match b.handle_request() {
            Ok(Some(cfg)) => {
                if let Some(slot) = self.devices[i].slot {
                    match self.config_changed(a, slot, &cfg) {
                        Ok(()) => info!(
                            "device {i} ({}): config change passed to the card",
                            self.devices[i].cfg.kind.name()
                        ),
                        Err(e) => error!("config change of device {i}: {e}"),
                    }
                    self.devices[i].last_config = cfg;
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!("{e}");
                let fd = b.request_fd().unwrap_or(-1);
                self.unwatch(fd);
            }
        }
    }

    /// `docs/vop-abi.md` 7.6: new config, `config_change = 2`, raise `h2c_config_db`.
    fn config_changed(
        &mut self,
        a: &mut Attached,
        slot: usize,
        cfg: &[u8],
    ) -> Result<(), BridgeError> {
        let ap = &a.att.aperture;
        a.page.write_config(ap, slot, cfg)?;
        a.page.set_ctrl_byte(ap, slot, ctrl_field::GUEST_ACK, 0)?;
        a.page.set_ctrl_byte(
            ap,
            slot,
            ctrl_field::CONFIG_CHANGE,
            abi::CONFIG_CHANGE_CONFIG,
        )?;
        self.notify_config(a)
    }

    /// Once a second: finish acknowledged config changes, bring back backends.
    fn tick(&mut self, a: &mut Attached) {
        for i in 0..self.devices.len() {
            if let Some(since) = self.devices[i].removing_since {
                self.check_removal(a, i, since);
            }
            let Some(slot) = self.devices[i].slot else {
                continue;
            };
            if let Ok(ctrl) = a.page.ctrl(&a.att.aperture, slot) {
                if ctrl.config_change == abi::CONFIG_CHANGE_CONFIG && ctrl.guest_ack != 0 {
                    let _ =
                        a.page
                            .set_ctrl_byte(&a.att.aperture, slot, ctrl_field::CONFIG_CHANGE, 0);
                    let _ = a
                        .page
                        .set_ctrl_byte(&a.att.aperture, slot, ctrl_field::GUEST_ACK, 0);
                }
            }
            if self.devices[i].backend.is_none() && !self.devices[i].removed {
                let d = &self.devices[i];
                match Backend::connect(d.cfg.kind, &d.cfg.socket, Duration::ZERO) {
                    Ok(b) => {
                        info!(
                            "{} backend {} is back",
                            d.cfg.kind.name(),
                            d.cfg.socket.display()
                        );
                        self.devices[i].backend = Some(b);
                        if let Err(e) = self.watch_backend(i) {
                            error!("{e}");
                        }
                        let running = a
                            .page
                            .status(&a.att.aperture, slot)
                            .is_ok_and(|s| s & STATUS_DRIVER_OK != 0);
                        if running {
                            if let Err(e) = self.start_device(a, i, true) {
                                error!("resuming device {i}: {e}");
                            }
                        }
                    }
                    Err(e) => debug!("{e}"),
                }
            }
        }
    }

    fn on_control(&mut self, a: Option<&mut Attached>) {
        let Some(server) = &self.control else {
            return;
        };
        let Some((req, conn)) = server.accept() else {
            return;
        };
        let status = |b: &Bridge| {
            format!(
                "state={} shutdown_status={}",
                b.card.state(),
                b.card.shutdown_status()
            )
        };
        let reply = match (req, a) {
            (ControlRequest::Status, _) => Ok(status(self)),
            (ControlRequest::Devices, _) => Ok(self.device_list()),
            (_, None) => Err("the card is not attached".to_string()),
            (ControlRequest::Shutdown, Some(a)) => self.request_shutdown(a).map(|_| status(self)),
            (ControlRequest::Add(kind, socket), Some(a)) => self.hot_add(a, kind, socket),
            (ControlRequest::Remove(i), Some(a)) => self.hot_remove(a, i),
        };
        conn.reply(&match reply {
            Ok(text) => format!("{text}\n"),
            Err(e) => format!("error: {e}\n"),
        });
    }

    fn device_list(&self) -> String {
        let lines: Vec<String> = self
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.removed)
            .map(|(i, d)| {
                let state = if d.removing_since.is_some() {
                    "removing"
                } else if d.wiring.is_some() {
                    "running"
                } else {
                    "stopped"
                };
                format!(
                    "{i} {} {} {state}",
                    d.cfg.kind.name(),
                    d.cfg.socket.display()
                )
            })
            .collect();
        lines.join("\n")
    }

    /// Hot add (`docs/vop-abi.md` 7.4): the page gets the descriptor, the
    /// card is told through `h2c_config_db`.
    fn hot_add(
        &mut self,
        a: &mut Attached,
        kind: DeviceKind,
        socket: PathBuf,
    ) -> Result<String, String> {
        let backend =
            Backend::connect(kind, &socket, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let queue_size = self.cfg.queue_size;
        let spec = backend.spec(queue_size);
        let slot = a
            .page
            .add(&a.att.aperture, &spec)
            .map_err(|e| e.to_string())?;
        let i = self.devices.len();
        self.devices.push(Device {
            cfg: DeviceConfig {
                kind,
                socket,
                queue_size: None,
            },
            queue_size,
            backend: Some(backend),
            slot: Some(slot),
            wiring: None,
            last_config: spec.config,
            removing_since: None,
            removed: false,
        });
        self.watch_backend(i).map_err(|e| e.to_string())?;
        self.notify_config(a).map_err(|e| e.to_string())?;
        info!("device {i} ({}) hot-added", kind.name());
        Ok(format!("added device {i}"))
    }

    /// Hot removal (`docs/vop-abi.md` 7.5), first half: ask the card.
    fn hot_remove(&mut self, a: &mut Attached, i: usize) -> Result<String, String> {
        let d = self
            .devices
            .get(i)
            .filter(|d| !d.removed)
            .ok_or_else(|| format!("no device {i}"))?;
        if d.removing_since.is_some() {
            return Err(format!("device {i} is being removed already"));
        }
        let slot = d
            .slot
            .ok_or_else(|| format!("device {i} is not in the device page"))?;
        let ap = &a.att.aperture;
        let set = |f, v| {
            a.page
                .set_ctrl_byte(ap, slot, f, v)
                .map_err(|e| e.to_string())
        };
        set(ctrl_field::GUEST_ACK, 0)?;
        set(ctrl_field::CONFIG_CHANGE, abi::CONFIG_CHANGE_REMOVE)?;
        self.notify_config(a).map_err(|e| e.to_string())?;
        self.devices[i].removing_since = Some(Instant::now());
        info!("removing device {i}; waiting for the card");
        Ok(format!("removing device {i}"))
    }

    /// Hot removal, second half: once the card acknowledged (or the wait
    /// timed out), stop the backend and mark the slot removed.
    fn check_removal(&mut self, a: &mut Attached, i: usize, since: Instant) {
        let Some(slot) = self.devices[i].slot else {
            return;
        };
        let acked = a
            .page
            .ctrl(&a.att.aperture, slot)
            .is_ok_and(|c| c.guest_ack != 0);
        if !acked && since.elapsed() < REMOVAL_TIMEOUT {
            return;
        }
        if !acked {
            warn!("the card did not acknowledge removing device {i}; removing it anyway");
        }
        self.stop_device(a, i, true);
        let ap = &a.att.aperture;
        let _ = a.page.set_ctrl_byte(ap, slot, ctrl_field::CONFIG_CHANGE, 0);
        let _ = a.page.set_ctrl_byte(ap, slot, ctrl_field::GUEST_ACK, 0);
        if let Err(e) = a.page.remove(ap, slot) {
            error!("marking device {i} removed: {e}");
        }
        self.drop_backend(i);
        let d = &mut self.devices[i];
        d.slot = None;
        d.removing_since = None;
        d.removed = true;
        info!("device {i} ({}) removed", d.cfg.kind.name());
    }

    /// Raises the card's `h2c_config_db` (device added, removed, changed).
    fn notify_config(&self, a: &mut Attached) -> Result<(), BridgeError> {
        match a.page.h2c_config_db(&a.att.aperture)? {
            Some(v) => a.link.send(&HostMessage::RaiseVector(v))?,
            None => debug!("the card has no config vector yet; it scans the page when it has one"),
        }
        Ok(())
    }

    fn request_shutdown(&mut self, a: &mut Attached) -> Result<(), String> {
        let mut go = || -> Result<(), ProtocolError> {
            a.link.send(&HostMessage::RegWrite {
                offset: reg::HOST_REQUEST,
                value: reg::HOST_REQUEST_SHUTDOWN,
            })?;
            a.link.sync()?;
            a.link.send(&HostMessage::RaiseVector(abi::CONTROL_VECTOR))
        };
        go().map_err(|e| e.to_string())?;
        self.set_state(CardInput::ShutdownRequested);
        info!("shutdown requested");
        Ok(())
    }
}

/// SIGINT/SIGTERM delivered through a signalfd.
struct SignalFd {
    fd: File,
}

impl SignalFd {
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain libc calls on a local, initialised sigset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(SignalFd {
                fd: File::from_raw_fd(fd),
            })
        }
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether a signal is waiting (consumes it).
    fn pending(&self) -> bool {
        let mut buf = [0u8; 128];
        // SAFETY: reading into a local buffer of the right size.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        n > 0
    }
}
