//! The virtio-net control queue, which the bridge serves itself
//! (`docs/vop-abi.md` 5.8).
//!
//! vhost-user leaves a network device's control queue to the frontend: the
//! backend gets the receive and transmit queues only, and QEMU's virtio-net
//! answers the control queue in QEMU. The bridge is the frontend here, so
//! it answers it. This is the one queue whose chains the bridge reads; it
//! carries configuration, never packets.
//!
//! The bridge offers `VIRTIO_NET_F_CTRL_VQ` only with `VIRTIO_NET_F_MQ`, so
//! the one command with an effect is `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`
//! (virtio 1.2, 5.1.6.5.5): the caller enables that many queue pairs in the
//! backend (`SET_VRING_ENABLE`). Every other command is answered
//! `VIRTIO_NET_ERR`, as a device without the command's feature does.
//!
//! The queue's position is the state kept between kicks; each kick builds a
//! `virtio_queue::Queue` on it, at the ring's current guest address (the
//! aperture may move when the card reprograms BAR2).

use std::io::Read;
use std::mem::size_of;

use virtio_bindings::virtio_net::{
    virtio_net_ctrl_hdr, virtio_net_ctrl_mq, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

/// A command from the card's control queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: use this many queue pairs.
    SetQueuePairs(u16),
    /// A command the device does not offer; answered `VIRTIO_NET_ERR`.
    Unsupported {
        /// `class` of the header.
        class: u8,
        /// `cmd` of the header.
        command: u8,
    },
}

/// Why a kick could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ControlQueueError {
    /// The ring's size or addresses are unusable, or its available index
    /// is out of range (a confused or hostile card).
    #[error("network control queue")]
    Queue(#[from] virtio_queue::Error),
}

/// What one kick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Chains answered (each with a status byte when it had room for one).
    pub commands: usize,
    /// Chains that were not a well-formed command (answered without data).
    pub malformed: usize,
    /// The driver wants an interrupt for the used buffers.
    pub notify: bool,
}

/// Where a ring lives, as offsets from the aperture's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingOffsets {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// The control queue of one running network device.
#[derive(Debug)]
pub struct ControlQueue {
    /// Its index among the device's queues (`2 * max_virtqueue_pairs`).
    pub index: usize,
    size: u16,
    ring: RingOffsets,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
}

impl ControlQueue {
    /// A queue of `size` entries at `ring`, resuming at `position` (0 on a
    /// fresh start; the used index when the bridge takes over a running
    /// device: the bridge answers each command before it returns, so
    /// nothing is in flight between kicks).
    pub fn new(index: usize, size: u16, ring: RingOffsets, event_idx: bool, position: u16) -> Self {
        ControlQueue {
            index,
            size,
            ring,
            event_idx,
            next_avail: position,
            next_used: position,
        }
    }

    /// Serves what the card made available: each command goes to `apply`,
    /// whose answer (`true`: done) becomes the status byte. `base` is the
    /// aperture's guest address. At most one ring's worth of chains is
    /// served per call; the card kicks again for more.
    pub fn serve<M: GuestMemory>(
        &mut self,
        mem: &M,
        base: u64,
        mut apply: impl FnMut(Command) -> bool,
    ) -> Result<Served, ControlQueueError> {
        let mut q = Queue::new(self.size)?;
        q.try_set_desc_table_address(GuestAddress(base + self.ring.desc))?;
        q.try_set_avail_ring_address(GuestAddress(base + self.ring.avail))?;
        q.try_set_used_ring_address(GuestAddress(base + self.ring.used))?;
        q.set_event_idx(self.event_idx);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_ready(true);

        let mut served = Served::default();
        let mut chains = Vec::new();
        for chain in q.iter(mem)?.take(usize::from(self.size)) {
            chains.push(chain);
        }
        for chain in chains {
            let head = chain.head_index();
            let status = match parse(mem, chain.clone()) {
                Some(cmd) if apply(cmd) => VIRTIO_NET_OK as u8,
                Some(_) => VIRTIO_NET_ERR as u8,
                None => {
                    served.malformed += 1;
                    VIRTIO_NET_ERR as u8
                }
            };
            let written = write_status(mem, chain, status);
            q.add_used(mem, head, written)?;
            served.commands += 1;
        }
        if served.commands > 0 {
            served.notify = q.needs_notification(mem)?;
        }
        // With EVENT_IDX: ask for a kick on the next command.
        q.enable_notification(mem)?;
        self.next_avail = q.next_avail();
        self.next_used = q.next_used();
        Ok(served)
    }
}

/// The command in a chain: the header, then the command's data, in
/// driver-to-device buffers. `None` when the chain is malformed.
fn parse<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>) -> Option<Command> {
    let mut r = chain.reader(mem).ok()?;
    // `virtio_net_ctrl_hdr` is { class: u8, cmd: u8 }.
    let mut hdr = [0u8; size_of::<virtio_net_ctrl_hdr>()];
    r.read_exact(&mut hdr).ok()?;
    let [class, command] = hdr;
    if u32::from(class) == VIRTIO_NET_CTRL_MQ
        && u32::from(command) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
    {
        // `virtio_net_ctrl_mq` is { virtqueue_pairs: le16 }.
        let mut mq = [0u8; size_of::<virtio_net_ctrl_mq>()];
        r.read_exact(&mut mq).ok()?;
        return Some(Command::SetQueuePairs(u16::from_le_bytes(mq)));
    }
    Some(Command::Unsupported { class, command })
}

/// Writes the status byte into the chain's first device-writable byte;
/// returns the bytes written (0 when the chain has no room for it).
fn write_status<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>, status: u8) -> u32 {
    match chain.writer(mem) {
        Ok(mut w) if w.available_bytes() > 0 => u32::from(w.write_obj(status).is_ok()),
        _ => 0,
    }
}

// Compile-time checks that the bindings' structs are what 5.1.6.5 says.
const _: () = assert!(size_of::<virtio_net_ctrl_hdr>() == 2);
const _: () = assert!(size_of::<virtio_net_ctrl_mq>() == 2);

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::testing::{TestRing, BUFFERS};
    use vm_memory::{Bytes, GuestMemoryMmap};

    const SIZE: u16 = 16;

    fn queue(ring: &TestRing<'_>) -> ControlQueue {
        let q = ring.queue();
        ControlQueue::new(
            4,
            SIZE,
            RingOffsets {
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
            },
            false,
            0,
        )
    }

    /// Puts a command (header, data) and a status byte in guest memory at
    /// `at` and makes the chain available.
    fn command(
        mem: &GuestMemoryMmap,
        ring: &mut TestRing<'_>,
        at: u64,
        class: u8,
        cmd: u8,
        data: &[u8],
    ) -> u64 {
        mem.write_slice(&[class, cmd], GuestAddress(at)).unwrap();
        mem.write_slice(data, GuestAddress(at + 2)).unwrap();
        let status = at + 0x100;
        mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        let mut descs = vec![TestRing::out(at, 2)];
        if !data.is_empty() {
            descs.push(TestRing::out(at + 2, data.len() as u32));
        }
        descs.push(TestRing::inp(status, 1));
        ring.add(&descs);
        status
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn queue_pairs_set_is_applied_and_acknowledged() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, SIZE);
        let mut cq = queue(&ring);
        let s1 = command(&mem, &mut ring, BUFFERS, 4, 0, &3u16.to_le_bytes());
        let s2 = command(&mem, &mut ring, BUFFERS + 0x1000, 4, 0, &9u16.to_le_bytes());
        let mut seen = Vec::new();
        let served = cq
            .serve(&mem, 0, |c| {
                seen.push(c);
                c == Command::SetQueuePairs(3)
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![Command::SetQueuePairs(3), Command::SetQueuePairs(9)]
        );
        assert_eq!(served.commands, 2);
        assert_eq!(served.malformed, 0);
        assert!(served.notify);
        assert_eq!(status(&mem, s1), VIRTIO_NET_OK as u8);
        assert_eq!(status(&mem, s2), VIRTIO_NET_ERR as u8);
        assert_eq!(ring.used().len(), 2);
        assert!(ring.used().iter().all(|&(_, len)| len == 1));
    }

    #[test]
    fn other_commands_are_refused_without_applying() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, SIZE);
        let mut cq = queue(&ring);
        // VIRTIO_NET_CTRL_RX / PROMISC on.
        let s = command(&mem, &mut ring, BUFFERS, 0, 0, &[1]);
        let mut seen = Vec::new();
        cq.serve(&mem, 0, |c| {
            seen.push(c);
            true
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![Command::Unsupported {
                class: 0,
                command: 0
            }]
        );
        // The caller's answer decides; a caller refuses what it does not know.
        assert_eq!(status(&mem, s), VIRTIO_NET_OK as u8);
    }

    #[test]
    fn malformed_chains_are_answered_and_skipped() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, SIZE);
        let mut cq = queue(&ring);
        // VQ_PAIRS_SET without its data.
        let s = command(&mem, &mut ring, BUFFERS, 4, 0, &[]);
        // A whole command in one buffer, and no room for the status.
        mem.write_slice(&[4, 0, 2, 0], GuestAddress(BUFFERS + 0x2000))
            .unwrap();
        ring.add(&[TestRing::out(BUFFERS + 0x2000, 4)]);
        // A buffer outside guest memory.
        ring.add(&[TestRing::out(1 << 40, 2), TestRing::inp(BUFFERS, 1)]);
        let mut applied = 0;
        let served = cq
            .serve(&mem, 0, |_| {
                applied += 1;
                true
            })
            .unwrap();
        assert_eq!(applied, 1, "only the one-buffer command parses");
        assert_eq!(served.commands, 3);
        assert_eq!(served.malformed, 2);
        assert_eq!(status(&mem, s), VIRTIO_NET_ERR as u8);
        let used = ring.used();
        assert_eq!(used.len(), 3);
        assert_eq!(used[1].1, 0, "no room for the status");
    }

    #[test]
    fn position_is_kept_between_kicks() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, SIZE);
        let mut cq = queue(&ring);
        for round in 0..3u16 {
            for k in 0..SIZE - 1 {
                let at = BUFFERS + u64::from(k) * 0x200;
                command(&mem, &mut ring, at, 4, 0, &(round + 1).to_le_bytes());
            }
            let served = cq.serve(&mem, 0, |_| true).unwrap();
            assert_eq!(served.commands, usize::from(SIZE - 1));
        }
        assert_eq!(cq.next_used, 3 * (SIZE - 1));
        // Nothing new: nothing served.
        assert_eq!(cq.serve(&mem, 0, |_| true).unwrap().commands, 0);
    }

    #[test]
    fn an_available_index_out_of_range_is_an_error() {
        let mem = TestRing::memory();
        let mut ring = TestRing::new(&mem, SIZE);
        let mut cq = queue(&ring);
        ring.set_avail_idx(SIZE + 5);
        assert!(cq.serve(&mem, 0, |_| true).is_err());
    }
}
