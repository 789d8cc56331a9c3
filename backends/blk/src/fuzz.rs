//! Fuzz target `blk_request` (`docs/fuzzing.md`): requests from a ring the
//! fuzzer builds, parsed and executed against a small image, as the queue
//! worker in [`crate::backend`] does.

use std::cell::RefCell;

use mic_backend_common::fuzz::{memory, ring, Input};
use mic_backend_common::ring::RingGuard;
use virtio_queue::QueueT;
use vmm_sys_util::tempdir::TempDir;

use crate::disk::Disk;
use crate::request::{process, Context, Scratch};

/// Sectors of the fuzz image.
const IMAGE_SECTORS: usize = 64;

/// A writable and a read-only image (two files: a writable image is
/// locked exclusively).
struct Images {
    rw: Disk,
    ro: Disk,
    // Last: removed after the disks are closed.
    _dir: TempDir,
}

thread_local! {
    static IMAGES: RefCell<Option<Images>> = const { RefCell::new(None) };
}

/// Runs the requests of a fuzz-built ring (see
/// [`mic_backend_common::fuzz::ring`]) against a 32 KiB image. Every used
/// length must stay within the chain's device-writable bytes (virtio 1.2,
/// 2.7.8).
///
/// Input: one option byte (bit 0: read-only image; bit 1: write-through),
/// then the ring.
pub fn request(data: &[u8]) {
    let mut input = Input::new(data);
    let opts = input.u8();
    let mem = memory();
    let (_ring, mut q) = ring(&mem, &mut input);
    IMAGES.with(|cell| {
        let mut cell = cell.borrow_mut();
        let images = cell.get_or_insert_with(|| {
            let prefix = std::env::temp_dir().join("mic-blk-fuzz-");
            let dir = TempDir::new_with_prefix(prefix).expect("temp dir");
            let open = |name: &str, readonly: bool| {
                let p = dir.as_path().join(name);
                std::fs::write(&p, vec![0x5a; IMAGE_SECTORS * 512]).expect("image");
                Disk::open(&p, readonly, false).expect("image")
            };
            Images {
                rw: open("rw.img", false),
                ro: open("ro.img", true),
                _dir: dir,
            }
        });
        let serial = *b"mic-blk-fuzz-serial0";
        let ctx = Context {
            disk: if opts & 1 != 0 {
                &images.ro
            } else {
                &images.rw
            },
            serial: &serial,
            writethrough: opts & 2 != 0,
        };
        let guard = RingGuard::new(0);
        let mut scratch = Scratch::default();
        loop {
            while let Some(chain) = guard.next(&mut q, &mem) {
                let head = chain.head_index();
                let writable: u64 = chain
                    .clone()
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len()))
                    .sum();
                let len = process(&mem, chain, &ctx, &mut scratch);
                assert!(
                    u64::from(len) <= writable,
                    "used length {len} over {writable} writable bytes"
                );
                let _ = q.add_used(&mem, head, len);
            }
            if !guard.more(&mut q, &mem) {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_corpus_replays() {
        let n =
            mic_backend_common::fuzz::replay(env!("CARGO_MANIFEST_DIR"), "blk_request", request);
        assert!(n > 0);
    }
}
