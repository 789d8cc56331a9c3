//! Fuzz target `console` (`docs/fuzzing.md`): the console's four queue
//! paths on rings the fuzzer builds, as [`crate::backend`] runs them.

use std::collections::VecDeque;

use mic_backend_common::fuzz::{memory, ring, Input};
use mic_backend_common::ring::RingGuard;

use crate::control::{ctrl_msg, resize_msg, send, Control, CTRL_LEN};
use crate::rxq::fill;
use crate::txq::{drain_out, drain_out_pieces};

/// The transmitq's largest chain and piece, and the largest control
/// message, as in [`crate::backend`].
const TX_MAX_CHAIN: usize = 1 << 20;
const TX_CHUNK: usize = 64 * 1024;
const MAX_CTRL: usize = 64;

/// Runs one console queue path on a fuzz-built ring (see
/// [`mic_backend_common::fuzz::ring`]):
///
/// - 0, the transmitq: card output handed on in pieces, none longer than
///   the piece size;
/// - 1, the control transmitq: messages copied whole and parsed;
/// - 2, the receiveq: host input written into the card's buffers, never
///   more than there is;
/// - 3, the control receiveq: queued messages sent one per chain, each
///   either sent or still queued.
///
/// Input: option byte (bits 0-1: the path; bits 2-3: the piece size for
/// the transmitq, 1, 7, 4096 bytes or the daemon's 64 KiB; bits 4-7: control messages queued), a length (`u16`: the
/// host input for the receiveq), then the ring.
pub fn console(data: &[u8]) {
    let mut input = Input::new(data);
    let opts = input.u8();
    let len = usize::from(input.u16());
    let mem = memory();
    let (_ring, mut q) = ring(&mem, &mut input);
    let guard = RingGuard::new(usize::from(opts & 3));
    match opts & 3 {
        0 => {
            // The daemon's sizes, and small ones for the piece boundaries
            // (with a chain limit to match, so that one input does not
            // take a million pieces).
            let piece = [1, 7, 4096, TX_CHUNK][usize::from(opts >> 2 & 3)];
            let max = if piece == TX_CHUNK {
                TX_MAX_CHAIN
            } else {
                64 * piece
            };
            drain_out_pieces(&mut q, &mem, &guard, piece, max, |b, _| {
                if let Some(b) = b {
                    assert!(b.len() <= piece, "a piece over {piece} bytes");
                }
            });
        }
        1 => {
            drain_out(&mut q, &mem, &guard, MAX_CTRL, |b, _| {
                if let Some(b) = b {
                    assert!(b.len() <= MAX_CTRL);
                    let c = Control::parse(b);
                    assert_eq!(c.is_some(), b.len() >= CTRL_LEN);
                }
            });
        }
        2 => {
            let host: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = fill(&mut q, &mem, &guard, &host);
            assert!(f.written <= host.len());
        }
        _ => {
            let n = usize::from(opts >> 4);
            let mut out: VecDeque<Vec<u8>> = (0..n)
                .map(|i| {
                    if i % 3 == 2 {
                        resize_msg(80, 25)
                    } else {
                        ctrl_msg(i as u32, 1, 1)
                    }
                })
                .collect();
            send(&mut q, &mem, &guard, &mut out);
            assert!(out.len() <= n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_corpus_replays() {
        let n = mic_backend_common::fuzz::replay(env!("CARGO_MANIFEST_DIR"), "console", console);
        assert!(n > 0);
    }
}
