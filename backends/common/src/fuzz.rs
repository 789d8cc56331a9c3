//! Fuzz-target support (`docs/fuzzing.md`): reading structured values out
//! of a fuzzer's bytes, replaying a saved corpus in ordinary tests, and the
//! body of the `relay` target.
//!
//! Every target's body is an ordinary function in the crate it tests, so the
//! libFuzzer harnesses in `vop-bridge/fuzz/fuzz_targets/` are one line each
//! and the saved corpus runs in `cargo test` without libFuzzer. With the
//! `test-utils` feature, [`ring`] builds a driver's split ring from fuzz
//! input on [`crate::testing::TestRing`].

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A cursor over fuzz input: fixed-width little-endian values, zero once
/// the input is used up (so every input decodes to something).
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// The next `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// The next `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// The next `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// The next `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The saved corpus of fuzz target `target`: `vop-bridge/fuzz/corpus/TARGET`
/// (`manifest_dir` is the calling crate's `CARGO_MANIFEST_DIR`; every crate
/// of the workspace sits two levels or one below the top).
pub fn corpus_dir(manifest_dir: &str, target: &str) -> PathBuf {
    let mut top = Path::new(manifest_dir);
    while !top.join("vop-bridge/fuzz/corpus").is_dir() {
        top = top.parent().expect("the corpus is in the repository");
    }
    top.join("vop-bridge/fuzz/corpus").join(target)
}

/// Runs `body` over every file of a target's saved corpus (the replay in the
/// ordinary test suite); returns how many inputs ran. Panics when the corpus
/// is missing or empty: a corpus that silently disappeared replays nothing.
pub fn replay(manifest_dir: &str, target: &str, body: impl Fn(&[u8])) -> usize {
    let dir = corpus_dir(manifest_dir, target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for f in &files {
        let data = std::fs::read(f).expect("corpus file");
        body(&data);
    }
    files.len()
}

/// Fuzz target `relay`: a frontend sends `data` as its byte stream (with up
/// to three descriptors on its first bytes) through the vhost-user relay's
/// request pump, which forwards it to the daemon's side. The pump must end
/// (at the end of the stream, or on a message it refuses) without panicking
/// and forward only whole messages.
///
/// Input: one byte (descriptor count in its low two bits), then the stream.
pub fn relay(data: &[u8]) {
    let mut input = Input::new(data);
    let nfds = usize::from(input.u8() & 3);
    let stream = input.rest();

    let (frontend, front) = UnixStream::pair().expect("socketpair");
    let (back, daemon) = UnixStream::pair().expect("socketpair");
    let shutdown = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    // The daemon's side: read everything the pump forwards.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &daemon, &mut out);
        out
    });
    // Descriptors (sockets, like SET_BACKEND_REQ_FD's) ride on the first bytes.
    let extra: Vec<OwnedFd> = (0..nfds)
        .map(|_| OwnedFd::from(UnixStream::pair().expect("socketpair").0))
        .collect();
    let raw: Vec<_> = extra.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    if !stream.is_empty() {
        sent = frontend
            .send_with_fds(&[stream], &raw)
            .expect("send with fds");
    }
    (&frontend)
        .write_all(&stream[sent..])
        .expect("whole stream");
    frontend
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    drop(extra);

    let front_w = Arc::new(std::sync::Mutex::new(front.try_clone().expect("dup")));
    let hook: crate::relay::ChannelHook = Arc::new(|s: UnixStream| drop(s));
    // With in-flight tracking on, so the messages the relay serves itself
    // are fuzzed too.
    let inflight: crate::relay::InflightHook = Arc::new(drop);
    crate::relay::pump_requests(
        front,
        front_w,
        back,
        shutdown.as_raw_fd(),
        Some(hook),
        None,
        Some(inflight),
    );
    let out = reader.join().expect("reader");
    // Only whole messages reach the daemon.
    let mut at = 0;
    while at < out.len() {
        assert!(out.len() - at >= 12, "a partial header was forwarded");
        let size = u32::from_ne_bytes(out[at + 8..at + 12].try_into().unwrap()) as usize;
        assert!(out.len() - at - 12 >= size, "a partial body was forwarded");
        at += 12 + size;
    }
    assert!(out.len() <= stream.len(), "the relay made up bytes");
}

#[cfg(feature = "test-utils")]
pub use ring::*;

#[cfg(feature = "test-utils")]
mod ring {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::Input;
    use crate::testing::{TestRing, BUFFERS};

    /// Size of the buffer area after [`BUFFERS`] that fuzz descriptors
    /// mostly point into; guest memory ends half-way through it, so
    /// buffers also cross the end of memory.
    pub const WINDOW: u64 = 0x2_0000;

    /// Guest memory for a fuzz ring: two adjacent regions (buffers cross
    /// from one to the other), ending inside [`WINDOW`].
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), BUFFERS as usize + 0x8000),
            (GuestAddress(BUFFERS + 0x8000), 0x8000),
        ])
        .expect("fuzz memory")
    }

    /// Builds a driver's split ring in `mem` from fuzz input and returns it
    /// with the device's queue.
    ///
    /// Input: the ring size (`1 << (b % 9)`), a descriptor count, that many
    /// descriptors (addr `u32`: inside the buffer window unless its top bit
    /// is set; len `u32`: below 64 KiB unless its top bit is set; raw flags
    /// and `next`), a count of heads and the heads (raw, so out of range
    /// too), an optional raw available index, `EVENT_IDX` on or off, then
    /// bytes for the buffer window (indirect tables and data).
    pub fn ring<'m>(mem: &'m GuestMemoryMmap, input: &mut Input) -> (TestRing<'m>, Queue) {
        let size = 1u16 << (input.u8() % 9);
        let mut ring = TestRing::new(mem, size);
        let ndesc = u16::from(input.u8()).min(size);
        let descs: Vec<RawDescriptor> = (0..ndesc)
            .map(|_| {
                let a = input.u32();
                let addr = if a & 0x8000_0000 != 0 {
                    u64::from(a) << 32 | u64::from(a)
                } else {
                    BUFFERS + u64::from(a) % WINDOW
                };
                let l = input.u32();
                let len = if l & 0x8000_0000 != 0 { l } else { l & 0xffff };
                let flags = input.u16();
                let next = input.u16();
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        let nheads = u16::from(input.u8()).min(2 * size);
        for i in 0..nheads {
            let head = input.u16();
            ring.add_raw(0, if i == 0 { &descs } else { &[] }, head);
        }
        let flags = input.u8();
        if flags & 1 != 0 {
            ring.set_avail_idx(input.u16());
        }
        let mut q = ring.queue();
        q.set_event_idx(flags & 2 != 0);
        let window = input.bytes(WINDOW as usize);
        // Into the part of the window that is memory.
        let fits = window.len().min(0x1_0000);
        ring.write(BUFFERS, &window[..fits]);
        (ring, q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_reads_little_endian_and_zero_past_the_end() {
        let mut i = Input::new(&[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(i.u16(), 0x0201);
        assert_eq!(i.u32(), 0x0605_0403);
        assert_eq!(i.u32(), 7);
        assert!(i.is_empty());
        assert_eq!(i.u64(), 0);
    }

    #[test]
    fn relay_corpus_replays() {
        assert!(replay(env!("CARGO_MANIFEST_DIR"), "relay", relay) > 0);
    }
}
