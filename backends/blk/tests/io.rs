//! Data path tests: mic-blk driven over its real socket by the vu-test frontend.

mod common;

use common::*;
use vu_test::{Desc, TestFrontend};

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
        &[Desc::out(r.hdr, 16), Desc::inp(r.data, 20), Desc::inp(r.status, 1)],
        r.status,
    );
    assert_eq!((st, used), (S_OK, 21));
    let id = q.mem().read(r.data, 20).unwrap();
    assert_eq!(&id[..10], b"MIC-DISK-0");
    assert!(id[10..].iter().all(|&b| b == 0));
}
