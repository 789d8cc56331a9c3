//! Guest memory and virtqueue helpers shared by the device backends.
//!
//! Everything read from the rings is guest-controlled: the helpers check
//! descriptor directions and guest-memory ranges and report a malformed
//! chain as `None` instead of touching memory outside the guest's.

use std::sync::RwLock;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};

/// Guest memory as seen by a backend.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The guest buffers of one descriptor chain: (address, length).
pub type Segments = Vec<(GuestAddress, usize)>;

/// The guest memory of the current frontend, if it has sent its memory table.
#[derive(Debug, Default)]
pub struct MemorySlot(RwLock<Option<GuestMem>>);

impl MemorySlot {
    /// An empty slot (no frontend memory yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores the frontend's memory (`VhostUserBackend::update_memory`).
    pub fn set(&self, mem: GuestMem) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
    }

    /// Forgets the memory of a frontend that went away.
    pub fn clear(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A snapshot of the current memory, `None` before the memory table.
    pub fn get(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.memory())
    }
}

/// Whether the frontend has set the ring up and enabled it.
pub fn vring_ready(vring: &VringRwLock<GuestMem>) -> bool {
    let s = vring.get_ref();
    s.get_queue().ready() && s.is_enabled()
}

/// Collects the writable segments of a device-to-driver chain; `None` if the
/// chain is malformed (a readable descriptor, a buffer outside guest memory,
/// a loop or a chain longer than the queue) or has no room at all.
pub fn writable_segments(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<Segments> {
    let mut segs = Vec::new();
    let mut total: usize = 0;
    let mut more = false;
    for d in chain {
        more = d.has_next();
        if !d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), len) {
            return None;
        }
        total = total.checked_add(len)?;
        segs.push((d.addr(), len));
    }
    // A chain that still points on after the walk stopped loops, is longer
    // than the queue, or points outside the descriptor table.
    (total > 0 && !more).then_some(segs)
}

/// Copies `data` into the segments in order; returns the bytes written
/// (less than `data.len()` if the segments are too small).
pub fn write_segments(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], data: &[u8]) -> usize {
    let mut off = 0;
    for (addr, len) in segs {
        if off == data.len() {
            break;
        }
        let n = (*len).min(data.len() - off);
        if mem.write_slice(&data[off..off + n], *addr).is_err() {
            break;
        }
        off += n;
    }
    off
}

/// A `VhostUserBackend::get_config` answer: `size` bytes of `config` from
/// `offset`, zero beyond its end.
pub fn read_config(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = offset as usize;
    if start < config.len() {
        let n = (config.len() - start).min(out.len());
        out[..n].copy_from_slice(&config[start..start + n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_config_clips_and_pads() {
        let cfg = [1u8, 2, 3, 4];
        assert_eq!(read_config(&cfg, 0, 4), vec![1, 2, 3, 4]);
        assert_eq!(read_config(&cfg, 2, 4), vec![3, 4, 0, 0]);
        assert_eq!(read_config(&cfg, 8, 2), vec![0, 0]);
        assert_eq!(read_config(&cfg, u32::MAX, 1), vec![0]);
    }
}
