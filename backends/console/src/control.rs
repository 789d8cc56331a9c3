//! The control queues of `VIRTIO_CONSOLE_F_MULTIPORT` (virtio 1.2, 5.3.6.2):
//! `struct virtio_console_control` messages, and their delivery on the
//! control receiveq.
//!
//! `virtio-bindings` 0.2 has no `virtio_console` module, so the feature
//! bits and control events are defined here, from the specification
//! (5.3.3 and 5.3.6.2; Linux's `include/uapi/linux/virtio_console.h`).

use std::collections::VecDeque;

use mic_backend_common::guest::{writable_segments, write_segments};
use mic_backend_common::ring::RingGuard;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

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

/// Size of `struct virtio_console_control`.
pub const CTRL_LEN: usize = 8;

/// One `struct virtio_console_control`: port id, event, value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Port the event is about.
    pub id: u32,
    /// `DEVICE_READY`, `PORT_READY`, ...
    pub event: u16,
    /// Event-specific value.
    pub value: u16,
}

impl Control {
    /// Parses a message from the driver; `None` if it is too short.
    pub fn parse(b: &[u8]) -> Option<Control> {
        let b: &[u8; CTRL_LEN] = b.get(..CTRL_LEN)?.try_into().ok()?;
        Some(Control {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }
}

/// A control message for the driver.
pub fn ctrl_msg(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(CTRL_LEN + 4);
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

/// RESIZE for port 0: `struct virtio_console_resize` follows, and Linux
/// reads rows before cols there.
pub fn resize_msg(cols: u16, rows: u16) -> Vec<u8> {
    let mut m = ctrl_msg(0, RESIZE, 0);
    m.extend_from_slice(&rows.to_le_bytes());
    m.extend_from_slice(&cols.to_le_bytes());
    m
}

/// What one [`send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Used entries were added (the driver may need a notification).
    pub used: bool,
    /// Chains returned unused: malformed, or too small for the message.
    pub bad_chains: u64,
}

/// Moves queued messages into the control receiveq, one per chain, in
/// order, until the queue is empty or the ring has no buffers left.
pub fn send(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    guard: &RingGuard,
    out: &mut VecDeque<Vec<u8>>,
) -> Sent {
    let mut s = Sent::default();
    while let Some(msg) = out.front() {
        let Some(chain) = guard.next(q, mem) else {
            if guard.more(q, mem) {
                continue;
            }
            break;
        };
        let head = chain.head_index();
        match writable_segments(mem, chain) {
            Some(segs) if segs.iter().map(|s| s.1).sum::<usize>() >= msg.len() => {
                let n = write_segments(mem, &segs, msg);
                let _ = q.add_used(mem, head, n as u32);
                out.pop_front();
            }
            _ => {
                s.bad_chains += 1;
                let _ = q.add_used(mem, head, 0);
            }
        }
        s.used = true;
    }
    s
}
