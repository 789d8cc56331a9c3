//! Data path tests: mic-blk driven over its real socket by the test frontend (mic-test-support).

mod common;

use common::*;
use mic_test_support::{Desc, TestFrontend};

#[test]
fn write_read_patterns() {
    let s = Setup::new(4 << 20, 0);
    let _d = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    let q = &mut f.queues[0];
    let mut expected = vec![0u8; 4 << 20];
    for (i, (sector, len)) in [(0u64, 512usize), (7, 4096), (100, 128 << 10), (8191, 512)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, len);
        assert_eq!(write(q, sector, &data), S_OK);
        expected[sector as usize * 512..][..len].copy_from_slice(&data);
        let (st, back) = read(q, sector, len);
        assert_eq!(st, S_OK);
        assert_eq!(checksum(&back), checksum(&data));
    }
    assert_eq!(simple(q, T_FLUSH), S_OK);
    // Whole disk through the frontend and through the file.
    let (st, all) = read(q, 0, 4 << 20);
    assert_eq!(st, S_OK);
    assert_eq!(checksum(&all), checksum(&expected));
    assert_eq!(checksum(&s.image_bytes()), checksum(&expected));
}

#[test]
fn get_id_and_config() {
    let s = Setup::new(1 << 20, 0);
    let _d = s.spawn(&["--serial", "MIC-DISK-0", "--num-queues", "2"]);
    let mut f: TestFrontend = connect(&s, 2);
    assert_eq!(f.queue_num().unwrap(), 2);
    let cfg = f.get_config(0, 60).unwrap();
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2);
    let q = &mut f.queues[1];
    let r = Req::alloc(q, 20);
    q.mem().write(r.hdr, &header(T_GET_ID, 0)).unwrap();
    let (st, used) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::inp(r.data, 20),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!((st, used), (S_OK, 21));
    let id = q.mem().read(r.data, 20).unwrap();
    assert_eq!(&id[..10], b"MIC-DISK-0");
    assert!(id[10..].iter().all(|&b| b == 0));
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let s = Setup::new(1 << 20, 0x5a);
    let _d = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    let q = &mut f.queues[0];
    // Discard 8 sectors at 16, write-zeroes with unmap at 64, without at 128.
    assert_eq!(discard(q, T_DISCARD, 16, 8, 0), S_OK);
    assert_eq!(discard(q, T_WRITE_ZEROES, 64, 16, 1), S_OK);
    assert_eq!(discard(q, T_WRITE_ZEROES, 128, 3, 0), S_OK);
    for (sector, n) in [(16u64, 8usize), (64, 16), (128, 3)] {
        let (st, data) = read(q, sector, n * 512);
        assert_eq!(st, S_OK);
        assert!(data.iter().all(|&b| b == 0), "sector {sector} zeroed");
        // Neighbours untouched.
        let (_, before) = read(q, sector - 1, 512);
        let (_, after) = read(q, sector + n as u64, 512);
        assert!(before.iter().chain(after.iter()).all(|&b| b == 0x5a));
    }
    // Beyond the end / bad flags are refused and change nothing.
    assert_eq!(discard(q, T_WRITE_ZEROES, 2047, 2, 0), S_IOERR);
    assert_eq!(discard(q, T_DISCARD, 0, 1, 1), S_UNSUPP);
    assert_eq!(discard(q, T_WRITE_ZEROES, 0, 1, 0x80), S_UNSUPP);
    let img = s.image_bytes();
    assert!(img[..512].iter().all(|&b| b == 0x5a));
    assert!(img[2047 * 512..].iter().all(|&b| b == 0x5a));
}

#[test]
fn readonly_refuses_writes() {
    let s = Setup::new(1 << 20, 0x11);
    let before = checksum(&s.image_bytes());
    let _d = s.spawn(&["--readonly", "--num-queues", "1"]);
    let mut f = connect(&s, 1);
    assert!(
        f.offered_features & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO) != 0,
        "VIRTIO_BLK_F_RO offered"
    );
    let q = &mut f.queues[0];
    assert_eq!(write(q, 0, &pattern(9, 4096)), S_IOERR);
    assert_eq!(discard(q, T_WRITE_ZEROES, 0, 8, 0), S_UNSUPP);
    assert_eq!(discard(q, T_DISCARD, 0, 8, 0), S_UNSUPP);
    assert_eq!(simple(q, T_FLUSH), S_OK);
    let (st, data) = read(q, 0, 4096);
    assert_eq!(st, S_OK);
    assert!(data.iter().all(|&b| b == 0x11));
    assert_eq!(checksum(&s.image_bytes()), before);
}

#[test]
fn indirect_descriptors_and_event_idx_off() {
    let s = Setup::new(1 << 20, 0);
    let _d = s.spawn(&["--num-queues", "1"]);
    // Frontend without EVENT_IDX.
    let mut f = TestFrontend::connect_with(
        &s.socket,
        mic_test_support::FrontendOptions {
            features: !mic_test_support::VIRTIO_RING_F_EVENT_IDX,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        f.acked_features & mic_test_support::VIRTIO_RING_F_EVENT_IDX,
        0
    );
    let q = &mut f.queues[0];
    let data = pattern(77, 8192);
    let r = Req::alloc(q, 8192);
    q.mem().write(r.hdr, &header(T_OUT, 10)).unwrap();
    q.mem().write(r.data, &data).unwrap();
    q.mem().write(r.status, &[0xff]).unwrap();
    let head = q
        .add_indirect(&[
            Desc::out(r.hdr, 16),
            Desc::out(r.data, 4096),
            Desc::out(r.data + 4096, 4096),
            Desc::inp(r.status, 1),
        ])
        .unwrap();
    q.kick().unwrap();
    q.wait_for(head, TIMEOUT).unwrap();
    assert_eq!(q.mem().read(r.status, 1).unwrap()[0], S_OK);
    let (st, back) = read(q, 10, 8192);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
}

#[test]
fn many_requests_in_flight() {
    let s = Setup::new(4 << 20, 0);
    let _d = s.spawn(&["--num-queues", "1", "--queue-size", "64"]);
    let mut f = TestFrontend::connect_with(
        &s.socket,
        mic_test_support::FrontendOptions {
            queue_size: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let q = &mut f.queues[0];
    // 21 writes of 8 sectors posted at once (3 descriptors each), one kick.
    let mut heads = Vec::new();
    let mut reqs = Vec::new();
    for i in 0..21u64 {
        let r = Req::alloc(q, 4096);
        q.mem().write(r.hdr, &header(T_OUT, i * 8)).unwrap();
        q.mem().write(r.data, &pattern(i, 4096)).unwrap();
        q.mem().write(r.status, &[0xff]).unwrap();
        heads.push(
            q.add_chain(&[
                Desc::out(r.hdr, 16),
                Desc::out(r.data, 4096),
                Desc::inp(r.status, 1),
            ])
            .unwrap(),
        );
        reqs.push(r);
    }
    q.kick().unwrap();
    let mut done = 0;
    while done < heads.len() {
        done += q.wait_used(TIMEOUT).unwrap().len();
    }
    for r in &reqs {
        assert_eq!(q.mem().read(r.status, 1).unwrap()[0], S_OK);
    }
    let img = s.image_bytes();
    for i in 0..21usize {
        assert_eq!(&img[i * 4096..][..4096], &pattern(i as u64, 4096)[..]);
    }
}

#[test]
fn multiqueue_in_parallel() {
    let s = Setup::new(8 << 20, 0);
    let _d = s.spawn(&["--num-queues", "4"]);
    let mut f = connect(&s, 4);
    std::thread::scope(|sc| {
        for (qi, q) in f.queues.iter_mut().enumerate() {
            sc.spawn(move || {
                // Each queue owns a 2 MiB slice of the disk.
                let base = qi as u64 * 4096;
                for i in 0..32u64 {
                    let data = pattern(qi as u64 * 1000 + i, 16384);
                    assert_eq!(write(q, base + i * 32, &data), S_OK);
                    let (st, back) = read(q, base + i * 32, 16384);
                    assert_eq!(st, S_OK);
                    assert_eq!(checksum(&back), checksum(&data));
                }
            });
        }
    });
    let img = s.image_bytes();
    for qi in 0..4u64 {
        for i in 0..32u64 {
            let off = ((qi * 4096 + i * 32) * 512) as usize;
            assert_eq!(
                checksum(&img[off..off + 16384]),
                checksum(&pattern(qi * 1000 + i, 16384))
            );
        }
    }
}

#[test]
fn writethrough_mode_via_config_wce() {
    let s = Setup::new(1 << 20, 0);
    let _d = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    assert_eq!(
        f.get_config(32, 1).unwrap(),
        vec![1],
        "write-back by default"
    );
    f.set_config(32, &[0]).unwrap();
    assert_eq!(f.get_config(32, 1).unwrap(), vec![0]);
    let q = &mut f.queues[0];
    let data = pattern(3, 4096);
    assert_eq!(write(q, 8, &data), S_OK);
    assert_eq!(&s.image_bytes()[4096..8192], &data[..]);
}

#[test]
fn direct_io_aligned_and_bounced() {
    let s = Setup::new(2 << 20, 0x77);
    let _d = s.spawn(&["--direct", "--num-queues", "1"]);
    let mut f = connect(&s, 1);
    let cfg = f.get_config(20, 4).unwrap();
    let blk_size = u32::from_le_bytes(cfg.try_into().unwrap()) as usize;
    assert!(blk_size >= 512 && blk_size.is_power_of_two());
    let q = &mut f.queues[0];
    // Aligned buffers: straight O_DIRECT.
    let data = pattern(11, 64 << 10);
    assert_eq!(write(q, 128, &data), S_OK);
    assert_eq!(read(q, 128, 64 << 10), (S_OK, data.clone()));
    // Guest buffers at odd addresses/lengths: bounce buffer path.
    let r = Req::alloc(q, 16384);
    let odd = pattern(12, 8192);
    q.mem().write(r.hdr, &header(T_OUT, 256)).unwrap();
    q.mem().write(r.data + 3, &odd[..1000]).unwrap();
    q.mem().write(r.data + 5000, &odd[1000..]).unwrap();
    let (st, _) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::out(r.data + 3, 1000),
            Desc::out(r.data + 5000, 8192 - 1000),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!(st, S_OK);
    q.mem().write(r.hdr, &header(T_IN, 256)).unwrap();
    let (st, used) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::inp(r.data + 1, 4097),
            Desc::inp(r.data + 8000, 8192 - 4097),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!((st, used), (S_OK, 8193));
    let mut back = q.mem().read(r.data + 1, 4097).unwrap();
    back.extend(q.mem().read(r.data + 8000, 8192 - 4097).unwrap());
    assert_eq!(back, odd);
    // A single 512-byte sector (unaligned file range when blk_size > 512).
    let one = pattern(13, 512);
    assert_eq!(write(q, 1, &one), S_OK);
    assert_eq!(read(q, 1, 512), (S_OK, one.clone()));
    assert_eq!(simple(q, T_FLUSH), S_OK);
    let img = s.image_bytes();
    assert_eq!(&img[512..1024], &one[..]);
    assert_eq!(&img[128 * 512..][..64 << 10], &data[..]);
    assert_eq!(&img[256 * 512..][..8192], &odd[..]);
    assert!(img[1024..128 * 512].iter().all(|&b| b == 0x77));
}

/// Batches of large requests (shared with the I/O helper threads), mixed
/// with small ones, in both directions.
#[test]
fn large_requests_in_flight() {
    let s = Setup::new(8 << 20, 0);
    let _d = s.spawn(&["--num-queues", "1", "--io-threads", "2"]);
    let mut f = connect(&s, 1);
    let q = &mut f.queues[0];
    let sizes = [
        128usize << 10,
        4096,
        256 << 10,
        64 << 10,
        512,
        128 << 10,
        1 << 20,
        8192,
    ];
    let mut offsets = Vec::new();
    let mut off = 0u64;
    for &len in &sizes {
        offsets.push(off);
        off += len as u64 / 512 + 8;
    }
    for round in 0..3u64 {
        // Writes, all posted before one kick.
        let mut reqs = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let r = Req::alloc(q, len);
            q.mem().write(r.hdr, &header(T_OUT, offsets[i])).unwrap();
            q.mem()
                .write(r.data, &pattern(round * 100 + i as u64, len))
                .unwrap();
            q.mem().write(r.status, &[0xff]).unwrap();
            q.add_chain(&[
                Desc::out(r.hdr, 16),
                Desc::out(r.data, len as u32),
                Desc::inp(r.status, 1),
            ])
            .unwrap();
            reqs.push(r);
        }
        q.kick().unwrap();
        let mut n = 0;
        while n < sizes.len() {
            n += q.wait_used(TIMEOUT).unwrap().len();
        }
        for r in &reqs {
            assert_eq!(q.mem().read(r.status, 1).unwrap()[0], S_OK);
        }
        // Reads, all posted before one kick.
        let mut reads = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let r = Req::alloc(q, len);
            q.mem().write(r.hdr, &header(T_IN, offsets[i])).unwrap();
            q.mem().write(r.status, &[0xff]).unwrap();
            let head = q
                .add_chain(&[
                    Desc::out(r.hdr, 16),
                    Desc::inp(r.data, len as u32),
                    Desc::inp(r.status, 1),
                ])
                .unwrap();
            reads.push((head, r, len));
        }
        q.kick().unwrap();
        let mut used = Vec::new();
        while used.len() < sizes.len() {
            used.extend(q.wait_used(TIMEOUT).unwrap());
        }
        for (i, (head, r, len)) in reads.iter().enumerate() {
            assert_eq!(q.mem().read(r.status, 1).unwrap()[0], S_OK);
            let u = used.iter().find(|u| u.id == *head).unwrap();
            assert_eq!(u.len as usize, len + 1);
            let back = q.mem().read(r.data, *len).unwrap();
            assert_eq!(
                checksum(&back),
                checksum(&pattern(round * 100 + i as u64, *len))
            );
        }
    }
    let img = s.image_bytes();
    for (i, &len) in sizes.iter().enumerate() {
        let o = offsets[i] as usize * 512;
        assert_eq!(
            checksum(&img[o..o + len]),
            checksum(&pattern(200 + i as u64, len))
        );
    }
}
