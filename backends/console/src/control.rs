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

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::testing::{TestRing, BUFFERS};

    #[test]
    fn messages_parse_and_build() {
        let m = ctrl_msg(3, PORT_OPEN, 1);
        assert_eq!(m, [3, 0, 0, 0, 6, 0, 1, 0]);
        assert_eq!(
            Control::parse(&m),
            Some(Control {
                id: 3,
                event: PORT_OPEN,
                value: 1
            })
        );
        // Longer is fine (the rest is ignored), shorter is not.
        assert!(Control::parse(&resize_msg(80, 25)).is_some());
        assert_eq!(Control::parse(&m[..7]), None);
        // RESIZE: rows, then cols.
        assert_eq!(resize_msg(80, 25)[8..], [25, 0, 80, 0]);
    }

    #[test]
    fn queued_messages_go_one_per_chain() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let h1 = ring.add(&[TestRing::inp(BUFFERS, 64)]);
        // Split over two descriptors.
        let h2 = ring.add(&[
            TestRing::inp(BUFFERS + 0x100, 4),
            TestRing::inp(BUFFERS + 0x200, 60),
        ]);
        let mut out: VecDeque<Vec<u8>> = [
            ctrl_msg(0, DEVICE_ADD, 0),
            resize_msg(132, 43),
            ctrl_msg(0, PORT_OPEN, 1),
        ]
        .into();
        let g = RingGuard::new(2);
        let s = send(&mut q, &mem, &g, &mut out);
        assert_eq!(
            s,
            Sent {
                used: true,
                bad_chains: 0
            }
        );
        assert_eq!(ring.used(), [(u32::from(h1), 8), (u32::from(h2), 12)]);
        assert_eq!(ring.read(BUFFERS, 8), ctrl_msg(0, DEVICE_ADD, 0));
        let mut second = ring.read(BUFFERS + 0x100, 4);
        second.extend(ring.read(BUFFERS + 0x200, 8));
        assert_eq!(second, resize_msg(132, 43));
        // The third waits for a buffer.
        assert_eq!(out, [ctrl_msg(0, PORT_OPEN, 1)]);
    }

    #[test]
    fn chains_too_small_or_malformed_are_skipped() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        let bad = [
            // Smaller than the message.
            ring.add(&[TestRing::inp(BUFFERS, CTRL_LEN as u32 - 1)]),
            // Device-readable.
            ring.add(&[TestRing::out(BUFFERS, 64)]),
            // Zero-length.
            ring.add(&[TestRing::inp(BUFFERS, 0)]),
        ];
        let good = ring.add(&[TestRing::inp(BUFFERS + 0x100, 64)]);
        let mut out: VecDeque<Vec<u8>> = [ctrl_msg(0, CONSOLE_PORT, 1)].into();
        let g = RingGuard::new(2);
        let s = send(&mut q, &mem, &g, &mut out);
        assert_eq!(s.bad_chains, 3);
        assert!(out.is_empty());
        let mut want: Vec<(u32, u32)> = bad.iter().map(|h| (u32::from(*h), 0)).collect();
        want.push((u32::from(good), CTRL_LEN as u32));
        assert_eq!(ring.used(), want);
    }

    #[test]
    fn a_broken_ring_keeps_the_messages() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, 8);
        let mut q = ring.queue();
        ring.set_avail_idx(200);
        let mut out: VecDeque<Vec<u8>> = [ctrl_msg(0, DEVICE_ADD, 0)].into();
        let g = RingGuard::new(2);
        assert_eq!(send(&mut q, &mem, &g, &mut out), Sent::default());
        assert_eq!(out.len(), 1);
        assert!(g.is_broken());
    }
}
