//! One device's backend, driven as a vhost-user frontend (`vhost` crate).
//!
//! The bridge connects to the backend, learns its features, queue count and
//! config space (which become the device descriptor), and when the card sets
//! `DRIVER_OK` hands it the memory table, the ring addresses and the kick and
//! call eventfds. After that the backend and QEMU talk through those eventfds
//! alone.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info};

use vhost::vhost_user::message::{FrontendReq, VhostUserConfigFlags};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::{virtio_blk, virtio_net};
use vmm_sys_util::eventfd::EventFd;

use crate::abi;
use crate::config::DeviceKind;
use crate::page::DeviceSpec;
use crate::watchdog::Watchdog;

/// How long the backend may take to answer one vhost-user request (or to
/// take one message of ours) before the bridge gives up on the connection
/// (`docs/architecture.md`, "Bounded waits"). Generous: GET_VRING_BASE waits
/// for requests in flight.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most queue pairs a network card gets: its rings and the control queue
/// fit in [`abi::MAX_VQS`].
pub const MAX_NET_PAIRS: u16 = (abi::MAX_VQS as u16 - 1) / 2;

mod device_config;
mod error;
mod features;
mod inflight;

pub use device_config::ConfigChangeFlag;
use device_config::{card_config_to_replay, config_len, multiqueue_units};
pub use error::{BackendError, Step};
use features::{
    bit, NET_CTRL_FEATURES, NET_SERVED_CTRL_FEATURES, VIRTIO_CONSOLE_F_MULTIPORT, WANTED_PROTOCOL,
};
pub use inflight::InflightRegion;

/// Where one ring is and which eventfds serve it.
pub struct RingSetup<'a> {
    /// Entries.
    pub num: u16,
    /// Descriptor table, in the memory table's userspace addresses.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Index to resume from (0 on a fresh start).
    pub base: u16,
    /// Kick eventfd (the card's doorbell write signals it).
    pub kick: &'a EventFd,
    /// Call eventfd (raises the device's MSI-X vector).
    pub call: &'a EventFd,
}

/// A connected vhost-user backend.
pub struct Backend {
    kind: DeviceKind,
    socket: PathBuf,
    frontend: Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: usize,
    config: Vec<u8>,
    requests: Option<FrontendReqHandler<ConfigChangeFlag>>,
    flag: Arc<ConfigChangeFlag>,
    started: bool,
    /// Rings handed over by the last start (what `stop` takes back).
    running: usize,
}

impl Backend {
    /// Runs one vhost-user request under [`REPLY_TIMEOUT`].
    fn call<T>(
        &mut self,
        req: FrontendReq,
        f: impl FnOnce(&mut Frontend) -> Result<T, vhost::Error>,
    ) -> Result<T, BackendError> {
        let guard = Watchdog::global().arm(self.frontend.as_raw_fd(), REPLY_TIMEOUT);
        let r = f(&mut self.frontend);
        let fired = guard.fired();
        drop(guard);
        r.map_err(|err| self.failed(Step::Request(req), err, fired))
    }

    /// The error for a failed step (a timeout when its deadline fired).
    fn failed(&self, step: Step, err: vhost::Error, fired: bool) -> BackendError {
        if fired {
            BackendError::Timeout {
                socket: self.socket.clone(),
                step,
                after: REPLY_TIMEOUT,
            }
        } else {
            BackendError::Vhost {
                socket: self.socket.clone(),
                step,
                err,
            }
        }
    }

    fn step_err(&self, step: Step) -> impl FnOnce(vhost::Error) -> BackendError + '_ {
        move |err| BackendError::Vhost {
            socket: self.socket.clone(),
            step,
            err,
        }
    }

    /// Connects (retrying for up to `timeout` while the socket is missing)
    /// and learns what the backend offers.
    pub fn connect(
        kind: DeviceKind,
        socket: &Path,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        let deadline = Instant::now() + timeout;
        let vhost_err = |step, err| BackendError::Vhost {
            socket: socket.into(),
            step,
            err,
        };
        let frontend = loop {
            match Frontend::connect(socket, abi::MAX_VQS as u64) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline && !Watchdog::global().stopping() => {
                    debug!("{}: {e}; retrying", socket.display());
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(vhost_err(Step::Connect, e)),
            }
        };
        let mut b = Backend {
            kind,
            socket: socket.into(),
            frontend,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            num_queues: 0,
            config: Vec::new(),
            requests: None,
            flag: Arc::new(ConfigChangeFlag::default()),
            started: false,
            running: 0,
        };
        b.handshake()?;
        info!(
            "{} backend {}: features {:#x}, {} queues",
            kind.name(),
            socket.display(),
            b.features,
            b.num_queues
        );
        Ok(b)
    }

    fn handshake(&mut self) -> Result<(), BackendError> {
        self.call(FrontendReq::SET_OWNER, |f| f.set_owner())?;
        self.features = self.call(FrontendReq::GET_FEATURES, |f| f.get_features())?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let theirs = self.call(FrontendReq::GET_PROTOCOL_FEATURES, |f| {
                f.get_protocol_features()
            })?;
            self.protocol = theirs & WANTED_PROTOCOL;
            let ours = self.protocol;
            self.call(FrontendReq::SET_PROTOCOL_FEATURES, |f| {
                f.set_protocol_features(ours)
            })?;
        }
        if self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            self.config = self.read_config()?;
        } else {
            self.config = vec![0; config_len(self.kind) as usize];
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            let mut h = FrontendReqHandler::new(self.flag.clone())
                .map_err(vhost::Error::VhostUserProtocol)
                .map_err(self.step_err(Step::BackendChannel))?;
            h.set_reply_ack_flag(self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
            self.call(FrontendReq::SET_BACKEND_REQ_FD, |f| {
                f.set_backend_request_fd(&h.get_tx_raw_fd())
            })?;
            self.requests = Some(h);
        }
        self.num_queues = self.queue_count()?;
        Ok(())
    }

    fn read_config(&mut self) -> Result<Vec<u8>, BackendError> {
        let len = config_len(self.kind);
        let buf = vec![0u8; len as usize];
        let (_, data) = self.call(FrontendReq::GET_CONFIG, |f| {
            f.get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
        })?;
        Ok(data)
    }

    /// Number of virtqueues the card gets, and the config adjusted to it.
    fn queue_count(&mut self) -> Result<usize, BackendError> {
        let has_config = self.protocol.contains(VhostUserProtocolFeatures::CONFIG);
        let offered = if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            Some(self.call(FrontendReq::GET_QUEUE_NUM, |f| f.get_queue_num())?)
        } else {
            None
        };
        let short = |needed: usize| BackendError::ShortConfig {
            socket: self.socket.clone(),
            len: self.config.len(),
            needed,
        };
        let n = match self.kind {
            DeviceKind::Console if self.features & bit(VIRTIO_CONSOLE_F_MULTIPORT) != 0 => {
                // MULTIPORT: port 0 rx/tx, control rx/tx, then 2 per extra port.
                let bytes = self.config.get(4..8).ok_or_else(|| short(8))?;
                let ports = u32::from_le_bytes(bytes.try_into().map_err(|_| short(8))?).max(1);
                let ports = ports.min(abi::MAX_VQS as u32 / 2 - 1);
                self.config[4..8].copy_from_slice(&ports.to_le_bytes());
                2 * (ports as usize + 1)
            }
            DeviceKind::Console => 2,
            DeviceKind::Blk if self.features & bit(virtio_blk::VIRTIO_BLK_F_MQ) != 0 => {
                let bytes = self.config.get(34..36).ok_or_else(|| short(36))?;
                let own = u16::from_le_bytes(bytes.try_into().map_err(|_| short(36))?);
                let q = multiqueue_units(has_config.then_some(own), offered, 1)
                    .clamp(1, abi::MAX_VQS as u16);
                self.config[34..36].copy_from_slice(&q.to_le_bytes());
                q as usize
            }
            DeviceKind::Blk => 1,
            DeviceKind::Net if self.features & bit(virtio_net::VIRTIO_NET_F_MQ) != 0 => {
                // max_virtqueue_pairs; the control queue takes one more.
                let bytes = self.config.get(8..10).ok_or_else(|| short(10))?;
                let own = u16::from_le_bytes(bytes.try_into().map_err(|_| short(10))?);
                let pairs =
                    multiqueue_units(has_config.then_some(own), offered, 2).clamp(1, MAX_NET_PAIRS);
                self.config[8..10].copy_from_slice(&pairs.to_le_bytes());
                2 * pairs as usize
            }
            DeviceKind::Net => 2,
            // rx, tx and the event queue (virtio 1.2, 5.10.2); the backend
            // gets all three, the event queue included, and the card's driver
            // refills it on every probe, so a card reset needs nothing more.
            DeviceKind::Vsock => 3,
        };
        if let Some(max) = offered.map(|m| usize::try_from(m).unwrap_or(usize::MAX)) {
            if max < n {
                return Err(BackendError::TooFewQueues {
                    socket: self.socket.clone(),
                    offered: max,
                    needed: n,
                });
            }
        }
        Ok(n)
    }

    /// Device kind.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Backend socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Number of virtqueues the backend serves.
    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// Whether the card gets a network control queue, which the bridge
    /// serves (`net_control.rs`): the backend has several queue pairs.
    pub fn has_net_control(&self) -> bool {
        self.kind == DeviceKind::Net
            && self.features & bit(virtio_net::VIRTIO_NET_F_MQ) != 0
            && self.num_queues > 2
    }

    /// Number of virtqueues the card gets: the backend's, and the network
    /// control queue after them.
    pub fn card_queues(&self) -> usize {
        self.num_queues + usize::from(self.has_net_control())
    }

    /// How many of the device's rings the backend runs with these acked
    /// features: a network card without `VIRTIO_NET_F_MQ` uses one pair.
    pub fn backend_queues(&self, acked: u64) -> usize {
        if self.kind == DeviceKind::Net && acked & bit(virtio_net::VIRTIO_NET_F_MQ) == 0 {
            self.num_queues.min(2)
        } else {
            self.num_queues
        }
    }

    /// Index of the network control queue with these acked features (it
    /// follows the rings the backend runs; virtio 1.2, 5.1.2), if any.
    pub fn net_control_queue(&self, acked: u64) -> Option<usize> {
        (self.has_net_control() && acked & bit(virtio_net::VIRTIO_NET_F_CTRL_VQ) != 0)
            .then(|| self.backend_queues(acked))
    }

    /// Whether the rings run.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Features offered to the card (`docs/vop-abi.md` section 5.5).
    pub fn card_features(&self) -> u64 {
        let mut f = self.features & !abi::UNSUPPORTED_FEATURES;
        if self.kind == DeviceKind::Net {
            f &= !NET_CTRL_FEATURES;
            if self.has_net_control() {
                f |= NET_SERVED_CTRL_FEATURES;
            }
        }
        f
    }

    /// Current config space.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// What the device page gets for this device.
    pub fn spec(&self, queue_size: u16) -> DeviceSpec {
        DeviceSpec {
            device_type: self.kind.virtio_id(),
            queue_sizes: vec![queue_size; self.card_queues()],
            features: self.card_features(),
            config: self.config.clone(),
        }
    }

    /// Sends (or resends) the memory table.
    pub fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegionInfo],
    ) -> Result<(), BackendError> {
        self.call(FrontendReq::SET_MEM_TABLE, |f| f.set_mem_table(regions))?;
        Ok(())
    }

    /// Whether the backend speaks vhost-user's protocol features (and so
    /// has rings that start disabled and take `SET_VRING_ENABLE`).
    fn has_protocol(&self) -> bool {
        !self.protocol.is_empty()
            || self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Starts the rings with the features the card acked, and enables the
    /// first `enabled` of them (the rest wait for [`Backend::enable_rings`]).
    pub fn start(
        &mut self,
        acked: u64,
        regions: &[VhostUserMemoryRegionInfo],
        rings: &[RingSetup<'_>],
        enabled: usize,
    ) -> Result<(), BackendError> {
        let proto = self.has_protocol();
        // The bridge's own features (the control queue) are not the backend's.
        let mut features = acked & self.card_features() & self.features;
        if proto {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.call(FrontendReq::SET_FEATURES, |f| f.set_features(features))?;
        self.set_mem_table(regions)?;
        for (q, r) in rings.iter().enumerate() {
            self.call(FrontendReq::SET_VRING_NUM, |f| f.set_vring_num(q, r.num))?;
            let addr = VringConfigData {
                queue_max_size: r.num,
                queue_size: r.num,
                flags: 0,
                desc_table_addr: r.desc,
                used_ring_addr: r.used,
                avail_ring_addr: r.avail,
                log_addr: None,
            };
            self.call(FrontendReq::SET_VRING_ADDR, |f| f.set_vring_addr(q, &addr))?;
            self.call(FrontendReq::SET_VRING_BASE, |f| f.set_vring_base(q, r.base))?;
            self.call(FrontendReq::SET_VRING_CALL, |f| f.set_vring_call(q, r.call))?;
            self.call(FrontendReq::SET_VRING_KICK, |f| f.set_vring_kick(q, r.kick))?;
        }
        self.started = true;
        self.running = rings.len();
        if proto {
            self.enable_rings(0..enabled.min(rings.len()), true)?;
        }
        Ok(())
    }

    /// Enables or disables running rings (`SET_VRING_ENABLE`): the queue
    /// pairs a network card chose through its control queue. A backend
    /// without protocol features runs every ring and ignores this.
    pub fn enable_rings(
        &mut self,
        rings: std::ops::Range<usize>,
        enable: bool,
    ) -> Result<(), BackendError> {
        if !self.has_protocol() {
            return Ok(());
        }
        let running = self.running;
        for q in rings.take_while(|&q| q < running) {
            self.call(FrontendReq::SET_VRING_ENABLE, |f| {
                f.set_vring_enable(q, enable)
            })?;
        }
        Ok(())
    }

    /// Stops the rings; returns where each stopped.
    pub fn stop(&mut self) -> Result<Vec<u32>, BackendError> {
        if !self.started {
            return Ok(Vec::new());
        }
        self.started = false;
        let proto = self.has_protocol();
        let mut bases = Vec::with_capacity(self.running);
        for q in 0..self.running {
            if proto {
                self.call(FrontendReq::SET_VRING_ENABLE, |f| {
                    f.set_vring_enable(q, false)
                })?;
            }
            bases.push(self.call(FrontendReq::GET_VRING_BASE, |f| f.get_vring_base(q))?);
        }
        Ok(bases)
    }

    /// Tells a backend the config choices the card made before it
    /// (re)connected (see [`card_config_to_replay`]); `page_config` is the
    /// device's config space in the page.
    pub fn replay_card_config(
        &mut self,
        acked: u64,
        page_config: &[u8],
    ) -> Result<(), BackendError> {
        match card_config_to_replay(self.kind, acked, page_config, &self.config) {
            Some((offset, byte)) => {
                info!(
                    "{}: write cache {} as the card chose",
                    self.socket.display(),
                    if byte == 0 { "off" } else { "on" }
                );
                self.set_config(offset, &[byte])
            }
            None => Ok(()),
        }
    }

    /// The config space as the backend reports it now (`GET_CONFIG`), not
    /// the bridge's copy; `None` when the backend has no config space to
    /// ask for (no `CONFIG` protocol feature).
    pub fn fetch_config(&mut self) -> Result<Option<Vec<u8>>, BackendError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(None);
        }
        self.read_config().map(Some)
    }

    /// Forwards config bytes the card wrote.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), BackendError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(());
        }
        self.call(FrontendReq::SET_CONFIG, |f| {
            f.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })?;
        let end = (offset as usize + data.len()).min(self.config.len());
        if (offset as usize) < end {
            self.config[offset as usize..end].copy_from_slice(&data[..end - offset as usize]);
        }
        Ok(())
    }

    /// Backend request channel fd, to poll (if the backend has one).
    pub fn request_fd(&self) -> Option<RawFd> {
        self.requests.as_ref().map(|h| h.as_raw_fd())
    }

    /// Handles one backend request; returns the new config space when the
    /// backend announced a config change.
    pub fn handle_request(&mut self) -> Result<Option<Vec<u8>>, BackendError> {
        if let Some(h) = self.requests.as_mut() {
            // Readable does not mean a whole message is there.
            let guard = Watchdog::global().arm(h.as_raw_fd(), REPLY_TIMEOUT);
            let r = h.handle_request();
            let fired = guard.fired();
            drop(guard);
            r.map_err(|err| {
                self.failed(
                    Step::BackendRequest,
                    vhost::Error::VhostUserProtocol(err),
                    fired,
                )
            })?;
        }
        if self.flag.take() && self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let mut cfg = self.read_config()?;
            // Keep the adjustments made for the card (queue counts).
            cfg.truncate(self.config.len());
            if self.kind == DeviceKind::Console && cfg.len() >= 8 {
                cfg[4..8].copy_from_slice(&self.config[4..8]);
            }
            if self.kind == DeviceKind::Blk && cfg.len() >= 36 {
                cfg[34..36].copy_from_slice(&self.config[34..36]);
            }
            if self.kind == DeviceKind::Net && cfg.len() >= 10 {
                cfg[8..10].copy_from_slice(&self.config[8..10]);
            }
            self.config = cfg.clone();
            return Ok(Some(cfg));
        }
        Ok(None)
    }

    /// The vhost-user socket fd (readable or hung up when the backend dies).
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}
