//! Fuzz targets `net_tx` and `net_rx` (`docs/fuzzing.md`): the TX drain and
//! RX delivery on rings the fuzzer builds, as the queue workers in
//! [`crate::backend`] run them.

use mic_backend_common::fuzz::{memory, ring, Input};
use mic_backend_common::ring::RingGuard;

use crate::backend::{HDR_LEN_LEGACY, HDR_LEN_V1};
use crate::rxq::{deliver, RxOutcome};
use crate::stream::MAX_FRAME;
use crate::txq::{drain, TxSink, MIN_FRAME};

/// The largest packet, as the backend's buffers hold it.
const BUF_LEN: usize = HDR_LEN_V1 + MAX_FRAME;

/// A sink that checks every packet and may stop taking them.
struct CheckSink {
    hdr_len: usize,
    /// Packets it takes before it reports not ready.
    ready_for: u32,
    /// Every other packet is lost.
    lossy: bool,
    taken: u64,
}

impl TxSink for CheckSink {
    fn ready(&self) -> bool {
        self.taken < u64::from(self.ready_for)
    }

    fn send(&mut self, packet: &[u8], hdr_len: usize) -> bool {
        assert_eq!(hdr_len, self.hdr_len);
        assert!(
            packet.len() >= hdr_len + MIN_FRAME,
            "a runt packet was sent"
        );
        assert!(
            packet.len() <= BUF_LEN,
            "a packet over the largest was sent"
        );
        self.taken += 1;
        !(self.lossy && self.taken % 2 == 0)
    }
}

/// Fuzz target `net_tx`: drains a fuzz-built ring (see
/// [`mic_backend_common::fuzz::ring`]) into a checking sink. Only well-formed
/// packets reach it, and the tally counts each one.
///
/// Input: option byte (bit 0: legacy 10-byte header; bit 1: a lossy sink),
/// the number of packets the sink takes before it stops being ready (255:
/// all), then the ring.
pub fn tx(data: &[u8]) {
    let mut input = Input::new(data);
    let opts = input.u8();
    let ready_for = match input.u8() {
        255 => u32::MAX,
        n => u32::from(n),
    };
    let hdr_len = if opts & 1 != 0 {
        HDR_LEN_LEGACY
    } else {
        HDR_LEN_V1
    };
    let mem = memory();
    let (_ring, mut q) = ring(&mem, &mut input);
    let guard = RingGuard::new(1);
    let mut buf = vec![0u8; BUF_LEN];
    let mut sink = CheckSink {
        hdr_len,
        ready_for,
        lossy: opts & 2 != 0,
        taken: 0,
    };
    let tally = drain(&mut q, &mem, &guard, &mut buf, hdr_len, &mut sink);
    assert_eq!(tally.sent + tally.lost, sink.taken);
}

/// Fuzz target `net_rx`: delivers packets into a fuzz-built ring until it
/// has no buffers. A delivered packet's used entries add up to its length.
///
/// Input: option byte (bit 0: `MRG_RXBUF`; bit 1: legacy header without
/// it; bits 4-7: packets less one), the frame length (`u16`, up to the
/// largest frame), then the ring.
pub fn rx(data: &[u8]) {
    let mut input = Input::new(data);
    let opts = input.u8();
    let mrg = opts & 1 != 0;
    let hdr_len = if !mrg && opts & 2 != 0 {
        HDR_LEN_LEGACY
    } else {
        HDR_LEN_V1
    };
    let packets = 1 + usize::from(opts >> 4);
    let frame = usize::from(input.u16()).min(MAX_FRAME);
    let mem = memory();
    let (ring, mut q) = ring(&mem, &mut input);
    let guard = RingGuard::new(0);
    for p in 0..packets {
        let mut pkt = vec![p as u8; hdr_len + frame];
        let before = ring.used().len();
        let (outcome, _) = deliver(&mut q, &mem, &guard, &mut pkt, mrg, hdr_len);
        match outcome {
            RxOutcome::Delivered => {
                let used = ring.used();
                let total: u64 = used[before..].iter().map(|u| u64::from(u.1)).sum();
                assert_eq!(total, pkt.len() as u64, "delivered bytes");
            }
            RxOutcome::Dropped => {}
            RxOutcome::NoBuffers { .. } => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::fuzz::replay;

    #[test]
    fn saved_corpora_replay() {
        assert!(replay(env!("CARGO_MANIFEST_DIR"), "net_tx", tx) > 0);
        assert!(replay(env!("CARGO_MANIFEST_DIR"), "net_rx", rx) > 0);
    }
}
