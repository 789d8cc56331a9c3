//! Rate limits and stats from outside (`backends/README.md`, "Rate limits"
//! and "Stats"), sandbox on: mic-net in stream mode with the test as its
//! peer, driven by the test frontend of `mic-test-support`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mic_test_support::ask;
use mic_test_support::{Daemon, Desc, FrontendOptions, TempDir, TestFrontend, VIRTIO_F_VERSION_1};

const BIN: &str = env!("CARGO_BIN_EXE_mic-net");
const T: Duration = Duration::from_secs(10);
/// The virtio-net header with VERSION_1.
const HDR: usize = 12;

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![seed; len];
    f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

struct Setup {
    _dir: TempDir,
    stats: PathBuf,
    _daemon: Daemon,
    peer: UnixStream,
    fe: TestFrontend,
}

/// mic-net on a stream whose peer is the test, with `extra` options and a
/// stats socket; a frontend connected with VERSION_1.
fn setup(extra: &[&str]) -> Setup {
    let dir = TempDir::new("net-limits");
    let sock = dir.path().join("net.sock");
    let stats = dir.path().join("stats.sock");
    let peer_path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&peer_path).unwrap();
    let stream = format!("unix:{}", peer_path.display());
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--stream",
        &stream,
        "--stats-socket",
        stats.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn(Path::new(BIN), &args, &sock).unwrap();
    let (peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    let fe = TestFrontend::connect_with(
        &sock,
        FrontendOptions {
            num_queues: 2,
            queue_size: 256,
            features: VIRTIO_F_VERSION_1,
            ..Default::default()
        },
    )
    .unwrap();
    Setup {
        _dir: dir,
        stats,
        _daemon: daemon,
        peer,
        fe,
    }
}

/// Reads frames from the peer side until it closes; counts their bytes.
fn drain_peer(peer: UnixStream, bytes: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut peer = peer;
        let mut len = [0u8; 4];
        let mut buf = vec![0u8; 65536];
        while peer.read_exact(&mut len).is_ok() {
            let n = u32::from_be_bytes(len) as usize;
            if peer.read_exact(&mut buf[..n]).is_err() {
                break;
            }
            bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    })
}

/// Sends `count` frames of `len` bytes on the TX queue, 32 at a time.
fn send_frames(fe: &mut TestFrontend, count: usize, len: usize) {
    let q = &mut fe.queues[1];
    let hdr = q.mem().alloc(HDR as u64, 16).unwrap();
    q.mem().fill(hdr, HDR, 0).unwrap();
    let body = q.mem().alloc(len as u64, 16).unwrap();
    q.mem().write(body, &frame(len, 7)).unwrap();
    let mut left = count;
    while left > 0 {
        let n = left.min(32);
        let heads: Vec<u16> = (0..n)
            .map(|_| {
                q.add_chain(&[Desc::out(hdr, HDR as u32), Desc::out(body, len as u32)])
                    .unwrap()
            })
            .collect();
        q.kick().unwrap();
        let mut pending = heads;
        while !pending.is_empty() {
            for u in q.wait_used(T).unwrap() {
                pending.retain(|h| *h != u.id);
            }
        }
        left -= n;
    }
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

#[test]
fn tx_bps_limit_holds_and_counts() {
    let mut s = setup(&["--tx-bps", "256Ki"]);
    let bytes = Arc::new(AtomicU64::new(0));
    let reader = drain_peer(s.peer.try_clone().unwrap(), bytes.clone());
    // The burst (256 KiB), then three seconds' worth, measured.
    send_frames(&mut s.fe, 256, 1024);
    let start = Instant::now();
    send_frames(&mut s.fe, 768, 1024);
    let rate = (768 * 1024) as f64 / start.elapsed().as_secs_f64();
    eprintln!("--tx-bps 256Ki: {rate:.0} B/s");
    assert!(within(rate, 262_144.0, 0.10), "{rate:.0} B/s");

    let v = ask(&s.stats, "stats");
    assert_eq!(v["device"], "mic-net");
    assert_eq!(v["limits"]["tx_bps"], 256 << 10);
    assert_eq!(v["limits"]["rx_bps"], 0);
    let tx0 = &v["queues"][1];
    assert_eq!(tx0["queue"], "tx0");
    assert_eq!(tx0["requests"], 1024, "{v}");
    assert_eq!(tx0["bytes_written"], 1024 * 1024);
    assert_eq!(tx0["errors"], 0);
    assert!(tx0["throttled"].as_u64().unwrap() > 0);
    // Every frame reached the peer.
    let deadline = Instant::now() + T;
    while bytes.load(Ordering::Relaxed) < 1024 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(bytes.load(Ordering::Relaxed), 1024 * 1024);

    // Lifting the limit at run time.
    let l = ask(&s.stats, "limit tx_bps=0");
    assert_eq!(l["limits"]["tx_bps"], 0);
    drop(s);
    reader.join().unwrap();
}

#[test]
fn rx_pps_limit_holds_and_counts() {
    let mut s = setup(&["--rx-pps", "200"]);
    // The peer sends 600 frames at once: the burst (200), then 200 a
    // second.
    let f = frame(100, 3);
    let mut out = Vec::new();
    for _ in 0..600 {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(&f);
    }
    s.peer.write_all(&out).unwrap();
    let q = &mut s.fe.queues[0];
    let bufs: Vec<u64> = (0..64).map(|_| q.mem().alloc(2048, 64).unwrap()).collect();
    let mut posted = std::collections::HashMap::new();
    for &a in &bufs {
        posted.insert(q.add_chain(&[Desc::inp(a, 2048)]).unwrap(), a);
    }
    q.kick().unwrap();
    let mut got = 0usize;
    let mut start = None;
    while got < 600 {
        for u in q.wait_used(T).unwrap() {
            let a = posted.remove(&u.id).unwrap();
            assert_eq!(q.mem().read(a + HDR as u64, f.len()).unwrap(), f);
            assert_eq!(u.len as usize, HDR + f.len());
            got += 1;
            if got == 200 {
                start = Some(Instant::now());
            }
            posted.insert(q.add_chain(&[Desc::inp(a, 2048)]).unwrap(), a);
        }
        q.kick().unwrap();
    }
    let rate = 400.0 / start.unwrap().elapsed().as_secs_f64();
    eprintln!("--rx-pps 200: {rate:.1} frames/s");
    assert!(within(rate, 200.0, 0.10), "{rate:.1} frames/s");
    let v = ask(&s.stats, "stats");
    let rx0 = &v["queues"][0];
    assert_eq!(rx0["queue"], "rx0");
    assert_eq!(rx0["requests"], 600, "{v}");
    assert_eq!(rx0["bytes_read"], 600 * f.len() as u64);
    assert!(rx0["throttled"].as_u64().unwrap() > 0);
    assert_eq!(v["limits"]["rx_pps"], 200);
    assert_eq!(v["limits"]["rx_pps_burst"], 200);
}
