//! Helpers shared by the mic-blk integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use mic_test_support::{Daemon, Desc, TempDir, TestFrontend, VirtQueue};
use virtio_bindings::virtio_blk;

pub const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;
pub const S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mic-blk"))
}

/// A scratch directory with an image of `size` bytes filled by `fill`.
pub struct Setup {
    pub dir: TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
}

impl Setup {
    pub fn new(size: usize, fill: u8) -> Setup {
        let dir = TempDir::new("blk-test");
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![fill; size]).unwrap();
        let socket = dir.path().join("blk.sock");
        Setup { dir, image, socket }
    }

    pub fn spawn(&self, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--socket-path",
            self.socket.to_str().unwrap(),
            "--image",
            self.image.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::spawn(bin(), &args, &self.socket).unwrap()
    }

    pub fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

/// Simple deterministic pattern generator.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn header(t: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Guest buffers for one request on a queue.
pub struct Req {
    pub hdr: u64,
    pub data: u64,
    pub status: u64,
}

impl Req {
    pub fn alloc(q: &VirtQueue, data_len: usize) -> Req {
        let m = q.mem();
        Req {
            hdr: m.alloc(16, 16).unwrap(),
            data: m.alloc(data_len.max(1) as u64, 4096).unwrap(),
            status: m.alloc(1, 1).unwrap(),
        }
    }
}

/// Post a request and wait for its completion; returns (status, used len).
pub fn submit(q: &mut VirtQueue, descs: &[Desc], status_addr: u64) -> (u8, u32) {
    q.mem().write(status_addr, &[0xff]).unwrap();
    let head = q.add_chain(descs).unwrap();
    q.kick().unwrap();
    let used = q.wait_for(head, TIMEOUT).unwrap();
    let u = used.iter().find(|u| u.id == head).unwrap();
    (q.mem().read(status_addr, 1).unwrap()[0], u.len)
}

pub fn write(q: &mut VirtQueue, sector: u64, data: &[u8]) -> u8 {
    let r = Req::alloc(q, data.len());
    q.mem().write(r.hdr, &header(T_OUT, sector)).unwrap();
    q.mem().write(r.data, data).unwrap();
    submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::out(r.data, data.len() as u32),
            Desc::inp(r.status, 1),
        ],
        r.status,
    )
    .0
}

pub fn read(q: &mut VirtQueue, sector: u64, len: usize) -> (u8, Vec<u8>) {
    let r = Req::alloc(q, len);
    q.mem().write(r.hdr, &header(T_IN, sector)).unwrap();
    q.mem().fill(r.data, len, 0xa5).unwrap();
    let (st, used) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::inp(r.data, len as u32),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    if st == S_OK {
        assert_eq!(used as usize, len + 1, "used length of a read");
    }
    (st, q.mem().read(r.data, len).unwrap())
}

pub fn simple(q: &mut VirtQueue, t: u32) -> u8 {
    let r = Req::alloc(q, 0);
    q.mem().write(r.hdr, &header(t, 0)).unwrap();
    submit(q, &[Desc::out(r.hdr, 16), Desc::inp(r.status, 1)], r.status).0
}

/// Discard or write-zeroes one range.
pub fn discard(q: &mut VirtQueue, t: u32, sector: u64, num: u32, flags: u32) -> u8 {
    let r = Req::alloc(q, 16);
    q.mem().write(r.hdr, &header(t, 0)).unwrap();
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&num.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    q.mem().write(r.data, &seg).unwrap();
    submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::out(r.data, 16),
            Desc::inp(r.status, 1),
        ],
        r.status,
    )
    .0
}

pub fn connect(s: &Setup, queues: usize) -> TestFrontend {
    TestFrontend::connect(&s.socket, queues).unwrap()
}
