//! Draining the TX queue: every chain is one packet (virtio-net header +
//! frame) for the host side (virtio 1.2, 5.1.6.2).
//!
//! A chain with a device-writable descriptor, a buffer outside guest memory,
//! a broken `next` link, or more bytes than the largest packet is returned
//! (used, length 0) and its packet dropped.

use mic_backend_common::ring::RingGuard;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

/// Smallest Ethernet frame accepted (a bare header).
pub const MIN_FRAME: usize = 14;

/// Where the packets go.
pub trait TxSink {
    /// Whether the sink takes packets now; draining stops (notifications
    /// on) while it does not.
    fn ready(&self) -> bool {
        true
    }
    /// Sends one packet (`hdr_len` bytes of header, then the frame);
    /// false if it was lost.
    fn send(&mut self, packet: &[u8], hdr_len: usize) -> bool;
}

/// What one drain did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxTally {
    /// Used entries were added (the driver may need a notification).
    pub used: bool,
    /// Packets the sink took.
    pub sent: u64,
    /// Packets the sink lost.
    pub lost: u64,
    /// Chains dropped as malformed or too short.
    pub malformed: u64,
}

/// Sends every packet the driver made available to `sink`, using `buf`
/// (sized for the largest packet) to gather it.
pub fn drain(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    buf: &mut [u8],
    hdr_len: usize,
    sink: &mut impl TxSink,
) -> TxTally {
    let mut tally = TxTally::default();
    'outer: loop {
        let _ = q.disable_notification(mem);
        loop {
            if !sink.ready() {
                // Resumed when the sink drains.
                break 'outer;
            }
            let Some(chain) = guard.next(q, mem) else {
                break;
            };
            let head = chain.head_index();
            match read_chain(mem, chain, buf) {
                Some(n) if n >= hdr_len + MIN_FRAME => {
                    if sink.send(&buf[..n], hdr_len) {
                        tally.sent += 1;
                    } else {
                        tally.lost += 1;
                    }
                }
                _ => {
                    log::debug!("tx: dropping malformed chain {head}");
                    tally.malformed += 1;
                }
            }
            let _ = q.add_used(mem, head, 0);
            tally.used = true;
        }
        if !guard.more(q, mem) {
            break;
        }
    }
    let _ = q.enable_notification(mem);
    tally
}

/// Copies a TX chain into `buf`; `None` if the chain is malformed (writable
/// descriptor, outside guest memory, or larger than `buf`).
pub fn read_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Option<usize> {
    let mut off = 0usize;
    let mut more = false;
    for d in chain {
        more = d.has_next();
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        let end = off.checked_add(len)?;
        if end > buf.len() {
            return None;
        }
        if len > 0 {
            mem.read_slice(&mut buf[off..end], d.addr()).ok()?;
        }
        off = end;
    }
    (!more).then_some(off)
}
