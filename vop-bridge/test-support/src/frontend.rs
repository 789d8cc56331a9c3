//! A vhost-user test frontend.
//!
//! [`TestFrontend`] connects to a vhost-user backend socket, shares memfd
//! backed "guest" memory with it through `SET_MEM_TABLE`, and builds and
//! drives split virtqueues itself: it places the descriptor table, available
//! and used rings in that memory, posts descriptor chains (direct or
//! indirect, well-formed or deliberately broken), kicks through the kick
//! eventfd and waits on the call eventfd for used entries. `VIRTIO_RING_F_EVENT_IDX`
//! is used when both sides offer it (and the caller allows it).
//!
//! With [`FrontendOptions::backend_requests`] the frontend also negotiates
//! `VHOST_USER_PROTOCOL_F_BACKEND_REQ` and sets up the backend request
//! channel ([`BackendRequests`]), on which it counts config-change
//! notifications.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use vhost;

// Feature and descriptor-flag masks, from `virtio-bindings`' bit numbers
// and values (the rings store descriptor flags as `u16`).

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 =
    vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Descriptor flag: another descriptor follows (`next` is valid).
pub const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Errors of the test frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vhost-user request failed.
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// An OS call failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// Guest memory access failed (address outside the memory).
    #[error("guest memory: {0}")]
    Memory(String),
    /// Out of guest memory or free descriptors.
    #[error("out of {0}")]
    Exhausted(&'static str),
    /// Timed out waiting for the backend.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// memfd-backed guest memory, one region starting at guest address 0,
/// with a simple bump allocator.
pub struct GuestMem {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
    next: AtomicU64,
}

impl GuestMem {
    /// Create `size` bytes of guest memory backed by a memfd.
    pub fn new(size: u64) -> Result<Arc<GuestMem>> {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"mic-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a new memfd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(|e| Error::Memory(e.to_string()))?;
        Ok(Arc::new(GuestMem {
            mem,
            file,
            size,
            // Keep page 0 unused so that address 0 is never a valid buffer.
            next: AtomicU64::new(4096),
        }))
    }

    /// Total size in bytes (guest addresses are `0..size`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view of the guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Allocate `len` bytes aligned to `align` (a power of two); returns the
    /// guest address. Memory is never freed (use [`GuestMem::mark`]/
    /// [`GuestMem::release`] for scratch areas).
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64> {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (cur + align - 1) & !(align - 1);
            let end = start
                .checked_add(len)
                .ok_or(Error::Exhausted("guest memory"))?;
            if end > self.size {
                return Err(Error::Exhausted("guest memory"));
            }
            match self
                .next
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(start),
                Err(v) => cur = v,
            }
        }
    }

    /// Current allocation mark.
    pub fn mark(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Free everything allocated after `mark` (single-threaded use only).
    pub fn release(&self, mark: u64) {
        self.next.store(mark, Ordering::Relaxed);
    }

    /// Write bytes at a guest address.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Read `len` bytes at a guest address.
    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_into(gpa, &mut v)?;
        Ok(v)
    }

    /// Read into `buf` from a guest address.
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Fill `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<()> {
        self.write(gpa, &vec![byte; len])
    }

    fn store_u16(&self, gpa: u64, v: u16) {
        self.mem
            .store(v, GuestAddress(gpa), Ordering::Release)
            .expect("ring address inside guest memory");
    }

    fn load_u16(&self, gpa: u64) -> u16 {
        self.mem
            .load(GuestAddress(gpa), Ordering::Acquire)
            .expect("ring address inside guest memory")
    }

    fn host_addr(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }
}

/// One descriptor as the test writes it into a descriptor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*` flags; NEXT is managed by the chain helpers unless
    /// the raw interface is used.
    pub flags: u16,
    /// Index of the next descriptor (raw interface only).
    pub next: u16,
}

impl Desc {
    /// A buffer the device reads (driver -> device).
    pub fn out(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A buffer the device writes (device -> driver).
    pub fn inp(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        }
    }
}

/// A used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the completed chain.
    pub id: u16,
    /// Bytes the device wrote into the chain.
    pub len: u32,
}

/// A split virtqueue driven by the test.
pub struct VirtQueue {
    /// Queue index.
    pub index: usize,
    size: u16,
    mem: Arc<GuestMem>,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    event_idx: bool,
    free: VecDeque<u16>,
    /// Descriptor indices (and indirect table flag) owned by each head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    /// Avail index at the last kick.
    kicked_idx: u16,
    /// Total kicks sent (for tests of notification suppression).
    pub kicks: u64,
}

impl VirtQueue {
    fn new(index: usize, size: u16, mem: Arc<GuestMem>, event_idx: bool) -> Result<VirtQueue> {
        let n = size as u64;
        let desc = mem.alloc(16 * n, 4096)?;
        let avail = mem.alloc(6 + 2 * n, 4096)?;
        let used = mem.alloc(6 + 8 * n, 4096)?;
        Ok(VirtQueue {
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            event_idx,
            free: (0..size).collect(),
            chains: vec![Vec::new(); size as usize],
            avail_idx: 0,
            last_used: 0,
            kicked_idx: 0,
            kicks: 0,
            mem,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Number of free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Guest memory shared with the backend.
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    fn write_desc(&self, table: u64, i: u16, d: &Desc) -> Result<()> {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write(table + 16 * i as u64, &b)
    }

    /// Post a well-formed chain of direct descriptors; returns the head index.
    /// The chain is made available but not kicked (see [`VirtQueue::kick`]).
    pub fn add_chain(&mut self, descs: &[Desc]) -> Result<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return Err(Error::Exhausted("descriptors"));
        }
        let ids: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop_front().unwrap())
            .collect();
        for (k, d) in descs.iter().enumerate() {
            let mut d = *d;
            if k + 1 < descs.len() {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = ids[k + 1];
            } else {
                d.flags &= !VRING_DESC_F_NEXT;
                d.next = 0;
            }
            self.write_desc(self.desc, ids[k], &d)?;
        }
        let head = ids[0];
        self.chains[head as usize] = ids;
        self.publish(head);
        Ok(head)
    }

    /// Post a chain through one indirect descriptor table (allocated in
    /// guest memory and never reused); returns the head index.
    pub fn add_indirect(&mut self, descs: &[Desc]) -> Result<u16> {
        let table = self.mem.alloc(16 * descs.len().max(1) as u64, 16)?;
        for (k, d) in descs.iter().enumerate() {
            let mut d = *d;
            if k + 1 < descs.len() {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = k as u16 + 1;
            }
            self.write_desc(table, k as u16, &d)?;
        }
        let head = self
            .free
            .pop_front()
            .ok_or(Error::Exhausted("descriptors"))?;
        self.write_desc(
            self.desc,
            head,
            &Desc {
                addr: table,
                len: 16 * descs.len() as u32,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            },
        )?;
        self.chains[head as usize] = vec![head];
        self.publish(head);
        Ok(head)
    }

    /// Post descriptors exactly as given (flags and `next` untouched) into
    /// consecutive free descriptor slots starting at `descs` order; `next`
    /// values are relative indices into `descs` and get translated to slot
    /// numbers when `translate_next` is true. Used to build malformed chains.
    pub fn add_raw(&mut self, descs: &[Desc], translate_next: bool) -> Result<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return Err(Error::Exhausted("descriptors"));
        }
        let ids: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop_front().unwrap())
            .collect();
        for (k, d) in descs.iter().enumerate() {
            let mut d = *d;
            if translate_next {
                d.next = *ids.get(d.next as usize).unwrap_or(&d.next);
            }
            self.write_desc(self.desc, ids[k], &d)?;
        }
        let head = ids[0];
        self.chains[head as usize] = ids;
        self.publish(head);
        Ok(head)
    }

    fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        self.mem.store_u16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        self.mem.store_u16(self.avail + 2, self.avail_idx);
    }

    /// Overwrite the avail ring's index without adding entries (for tests
    /// of drivers that corrupt their ring).
    pub fn corrupt_avail_idx(&mut self, idx: u16) {
        fence(Ordering::Release);
        self.mem.store_u16(self.avail + 2, idx);
    }

    /// Put an arbitrary head index into the next avail slot and publish it
    /// (for tests of out-of-range heads).
    pub fn publish_raw_head(&mut self, head: u16) {
        self.publish(head);
    }

    /// Notify the backend (subject to its notification suppression);
    /// returns whether the kick eventfd was written.
    pub fn kick(&mut self) -> Result<bool> {
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            // avail_event lives after the used ring.
            let avail_event = self.mem.load_u16(self.used + 4 + 8 * self.size as u64);
            vring_need_event(avail_event, self.avail_idx, self.kicked_idx)
        } else {
            self.mem.load_u16(self.used) & 1 == 0
        };
        if needed {
            self.kick.write(1)?;
            self.kicks += 1;
        }
        self.kicked_idx = self.avail_idx;
        Ok(needed)
    }

    /// Kick unconditionally.
    pub fn kick_always(&mut self) -> Result<()> {
        self.kick.write(1)?;
        self.kicks += 1;
        self.kicked_idx = self.avail_idx;
        Ok(())
    }

    /// Pop one used entry if available (frees its descriptors).
    pub fn pop_used(&mut self) -> Option<Used> {
        let used_idx = self.mem.load_u16(self.used + 2);
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        let mut b = [0u8; 8];
        self.mem.read_into(slot, &mut b).ok()?;
        self.last_used = self.last_used.wrapping_add(1);
        let id = u32::from_le_bytes(b[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(b[4..8].try_into().unwrap());
        let id16 = id as u16;
        if (id16 as usize) < self.chains.len() {
            let ids = std::mem::take(&mut self.chains[id16 as usize]);
            self.free.extend(ids);
        }
        Some(Used { id: id16, len })
    }

    /// Wait until at least one used entry is available and return all that
    /// are, or time out.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            while let Some(u) = self.pop_used() {
                out.push(u);
            }
            if !out.is_empty() {
                return Ok(out);
            }
            if self.event_idx {
                // Ask for a notification at the next used entry.
                let used_event = self.avail + 4 + 2 * self.size as u64;
                self.mem.store_u16(used_event, self.last_used);
            }
            fence(Ordering::SeqCst);
            if self.mem.load_u16(self.used + 2) != self.last_used {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout("used ring entries"));
            }
            let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.call.read();
        }
    }

    /// Wait for the completion of one specific head (other completions are
    /// returned too, in order).
    pub fn wait_for(&mut self, head: u16, timeout: Duration) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = self.wait_used(left)?;
            let done = got.iter().any(|u| u.id == head);
            out.extend(got);
            if done {
                return Ok(out);
            }
        }
    }

    /// True if no used entry arrives within `wait` (for "must not complete"
    /// checks).
    pub fn no_used_within(&mut self, wait: Duration) -> bool {
        matches!(self.wait_used(wait), Err(Error::Timeout(_)))
    }

    /// The call eventfd (the backend signals it on used-ring updates).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
}

/// `vring_need_event` from the virtio spec.
pub fn vring_need_event(event_idx: u16, new_idx: u16, old_idx: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old_idx)
}

/// Options for [`TestFrontend::connect_with`].
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Number of queues to set up.
    pub num_queues: usize,
    /// Size of each queue.
    pub queue_size: u16,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Virtio feature bits the frontend is willing to ack (intersected with
    /// the backend's offer).
    pub features: u64,
    /// How long to keep retrying the connection.
    pub connect_timeout: Duration,
    /// Set up the backend request channel (`SET_BACKEND_REQ_FD`) when the
    /// backend offers `BACKEND_REQ`; see [`TestFrontend::backend_requests`].
    pub backend_requests: bool,
    /// Ask for the backend's in-flight region (`GET_INFLIGHT_FD`, then
    /// `SET_INFLIGHT_FD`, before the rings) when it offers
    /// `INFLIGHT_SHMFD`, as QEMU's `vhost-user-blk` does.
    pub inflight: bool,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            num_queues: 1,
            queue_size: 128,
            mem_size: 64 << 20,
            features: u64::MAX,
            connect_timeout: Duration::from_secs(10),
            backend_requests: false,
            inflight: false,
        }
    }
}

/// Counts what the backend sends on the backend request channel.
#[derive(Debug, Default)]
struct RequestCounter {
    config_changes: AtomicU64,
}

impl VhostUserFrontendReqHandler for RequestCounter {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.config_changes.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// The frontend's side of the backend request channel. Messages are read
/// only while the test waits in [`BackendRequests::wait_config_change`] or
/// [`BackendRequests::poll`]; replies are sent when the backend asks for
/// them (`REPLY_ACK`).
pub struct BackendRequests {
    handler: FrontendReqHandler<RequestCounter>,
    counter: Arc<RequestCounter>,
}

impl BackendRequests {
    /// Config-change notifications (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`)
    /// received so far.
    pub fn config_changes(&self) -> u64 {
        self.counter.config_changes.load(Ordering::SeqCst)
    }

    /// Waits up to `wait` for one request and handles it; false if none came.
    fn handle_one(&mut self, wait: Duration) -> Result<bool> {
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd: self.handler.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return Ok(false);
        }
        self.handler
            .handle_request()
            .map_err(|e| Error::Vhost(vhost::Error::VhostUserProtocol(e)))?;
        Ok(true)
    }

    /// Handles the backend's requests that arrive within `wait`; returns
    /// how many were handled.
    pub fn poll(&mut self, wait: Duration) -> Result<usize> {
        let deadline = Instant::now() + wait;
        let mut n = 0;
        while self.handle_one(deadline.saturating_duration_since(Instant::now()))? {
            n += 1;
        }
        Ok(n)
    }

    /// Handles requests until the count of config changes exceeds `seen`;
    /// returns the new count.
    pub fn wait_config_change(&mut self, seen: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.config_changes();
            if n > seen {
                return Ok(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout("a config-change notification"));
            }
            self.handle_one(left)?;
        }
    }
}

/// A connected and fully set up vhost-user frontend.
pub struct TestFrontend {
    /// The vhost-user connection.
    pub frontend: Frontend,
    /// Guest memory shared with the backend.
    pub mem: Arc<GuestMem>,
    /// The virtqueues, ready for use.
    pub queues: Vec<VirtQueue>,
    /// Virtio features offered by the backend.
    pub offered_features: u64,
    /// Virtio features acked.
    pub acked_features: u64,
    /// Protocol features acked.
    pub protocol_features: VhostUserProtocolFeatures,
    /// The backend request channel, if asked for
    /// ([`FrontendOptions::backend_requests`]) and negotiated.
    pub backend_requests: Option<BackendRequests>,
    /// The backend's in-flight region, if asked for
    /// ([`FrontendOptions::inflight`]) and negotiated.
    pub inflight: Option<File>,
}

impl TestFrontend {
    /// Connect with default options and `num_queues` queues.
    pub fn connect(path: &Path, num_queues: usize) -> Result<TestFrontend> {
        Self::connect_with(
            path,
            FrontendOptions {
                num_queues,
                ..Default::default()
            },
        )
    }

    /// Connect and run the whole setup sequence: owner, features, protocol
    /// features, memory table, then every queue (num, addr, base, call,
    /// kick, enable).
    pub fn connect_with(path: &Path, opts: FrontendOptions) -> Result<TestFrontend> {
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    log::debug!("connect {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Self::from_stream(stream, opts)
    }

    /// Run the setup sequence over an already connected stream (for
    /// backends started with `--client` that connect to the test).
    pub fn from_stream(stream: UnixStream, opts: FrontendOptions) -> Result<TestFrontend> {
        let mut frontend = Frontend::from_stream(stream, opts.num_queues as u64);
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let theirs = frontend.get_protocol_features()?;
            let mut ours = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            if opts.backend_requests {
                ours |= VhostUserProtocolFeatures::BACKEND_REQ;
            }
            if opts.inflight {
                ours |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            protocol = ours & theirs;
            frontend.set_protocol_features(protocol)?;
        }
        let acked = offered & opts.features;
        frontend.set_features(acked)?;
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;

        let mem = GuestMem::new(opts.mem_size)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: opts.mem_size,
            userspace_addr: mem.host_addr(0),
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        };
        frontend.set_mem_table(&[region])?;

        let mut backend_requests = None;
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let counter = Arc::new(RequestCounter::default());
            let mut handler = FrontendReqHandler::new(counter.clone())
                .map_err(|e| Error::Vhost(vhost::Error::VhostUserProtocol(e)))?;
            handler.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
            frontend.set_backend_request_fd(&handler.get_tx_raw_fd())?;
            backend_requests = Some(BackendRequests { handler, counter });
        }

        let mut inflight = None;
        if protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            let ask = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: opts.num_queues as u16,
                queue_size: opts.queue_size,
            };
            let (info, file) = frontend.get_inflight_fd(&ask)?;
            let info = VhostUserInflight {
                num_queues: ask.num_queues,
                queue_size: ask.queue_size,
                ..info
            };
            frontend.set_inflight_fd(&info, file.as_raw_fd())?;
            inflight = Some(file);
        }

        let mut queues = Vec::new();
        for i in 0..opts.num_queues {
            let q = VirtQueue::new(i, opts.queue_size, mem.clone(), event_idx)?;
            frontend.set_vring_num(i, opts.queue_size)?;
            frontend.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: mem.host_addr(q.desc),
                    used_ring_addr: mem.host_addr(q.used),
                    avail_ring_addr: mem.host_addr(q.avail),
                    log_addr: None,
                },
            )?;
            frontend.set_vring_base(i, 0)?;
            frontend.set_vring_call(i, &q.call)?;
            frontend.set_vring_kick(i, &q.kick)?;
            queues.push(q);
        }
        if acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            for i in 0..opts.num_queues {
                frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(TestFrontend {
            frontend,
            mem,
            queues,
            offered_features: offered,
            acked_features: acked,
            protocol_features: protocol,
            backend_requests,
            inflight,
        })
    }

    /// Read `size` bytes of device configuration space at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, data) =
            self.frontend
                .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)?;
        Ok(data)
    }

    /// Write device configuration space at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)?;
        Ok(())
    }

    /// Ask the backend for its number of queues (needs MQ).
    pub fn queue_num(&mut self) -> Result<u64> {
        Ok(self.frontend.get_queue_num()?)
    }

    /// Stop queue `i` (`GET_VRING_BASE`); returns the backend's next avail index.
    pub fn stop_queue(&mut self, i: usize) -> Result<u32> {
        Ok(self.frontend.get_vring_base(i)?)
    }
}

/// Guest addresses at or beyond the end of guest memory, for negative tests.
pub fn outside(mem: &GuestMem) -> u64 {
    mem.size() + 0x1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Backend asked for a kick when avail idx passes 5.
        assert!(vring_need_event(5, 6, 5));
        assert!(!vring_need_event(7, 6, 5));
        // Wrap-around.
        assert!(vring_need_event(u16::MAX, 0, u16::MAX));
    }

    #[test]
    fn guest_memory_alloc_and_access() {
        let m = GuestMem::new(1 << 20).unwrap();
        let a = m.alloc(100, 4096).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a >= 4096, "page 0 stays unused");
        let mark = m.mark();
        let b = m.alloc(10, 16).unwrap();
        assert!(b >= a + 100);
        m.release(mark);
        assert_eq!(m.alloc(10, 16).unwrap(), b);
        m.write(a, b"hello").unwrap();
        assert_eq!(m.read(a, 5).unwrap(), b"hello");
        assert!(m.read(outside(&m), 1).is_err());
        assert!(m.alloc(2 << 20, 1).is_err());
    }
}
