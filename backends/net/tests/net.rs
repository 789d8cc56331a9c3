//! Integration tests: the real `mic-net` binary driven over its vhost-user
//! socket by the test frontend of `mic-test-support`.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mic_test_support::{
    Daemon, Desc, FrontendOptions, TempDir, TestFrontend, VirtQueue,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
};

const BIN: &str = env!("CARGO_BIN_EXE_mic-net");
const T: Duration = Duration::from_secs(5);
const MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
const NET_F_MAC: u64 = 1 << VIRTIO_NET_F_MAC;
const NET_F_MQ: u64 = 1 << VIRTIO_NET_F_MQ;
const NET_F_CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8).wrapping_mul(7);
    }
    f
}

/// The test plays the stream peer: it listens, the daemon connects.
struct Peer {
    listener: UnixListener,
    conn: Option<UnixStream>,
}

impl Peer {
    fn new(path: &Path) -> Peer {
        let listener = UnixListener::bind(path).unwrap();
        Peer {
            listener,
            conn: None,
        }
    }

    fn accept(&mut self) {
        self.listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + T;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(T)).unwrap();
                    self.conn = Some(s);
                    return;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("daemon did not connect to the stream peer: {e}"),
            }
        }
    }

    fn send(&mut self, f: &[u8]) {
        let c = self.conn.as_mut().unwrap();
        c.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
        c.write_all(f).unwrap();
    }

    fn recv(&mut self) -> Vec<u8> {
        let c = self.conn.as_mut().unwrap();
        let mut l = [0u8; 4];
        c.read_exact(&mut l).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(l) as usize];
        c.read_exact(&mut f).unwrap();
        f
    }
}

struct Setup {
    _dir: TempDir,
    sock: PathBuf,
    daemon: Daemon,
    peer: Peer,
}

fn stream_setup(extra: &[&str]) -> Setup {
    let dir = TempDir::new("net-test");
    let sock = dir.path().join("net.sock");
    let peer_path = dir.path().join("peer.sock");
    let mut peer = Peer::new(&peer_path);
    let stream = format!("unix:{}", peer_path.display());
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--stream",
        &stream,
        "--mac",
        "52:54:00:00:00:02",
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn(Path::new(BIN), &args, &sock).unwrap();
    peer.accept();
    Setup {
        _dir: dir,
        sock,
        daemon,
        peer,
    }
}

fn connect(sock: &Path, features: u64, queues: usize) -> TestFrontend {
    TestFrontend::connect_with(
        sock,
        FrontendOptions {
            num_queues: queues,
            queue_size: 256,
            features,
            ..Default::default()
        },
    )
    .unwrap()
}

fn hdr_len(fe: &TestFrontend) -> usize {
    if fe.acked_features & (VIRTIO_F_VERSION_1 | MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// RX buffers posted and not yet used (head -> guest address), and used
/// entries fetched from the ring but not consumed yet.
#[derive(Default)]
struct Pool {
    bufs: HashMap<u16, u64>,
    backlog: VecDeque<mic_test_support::Used>,
}

impl Pool {
    fn new() -> Pool {
        Pool::default()
    }

    fn len(&self) -> usize {
        self.bufs.len()
    }

    fn next_used(&mut self, q: &mut VirtQueue) -> mic_test_support::Used {
        if self.backlog.is_empty() {
            self.backlog.extend(q.wait_used(T).unwrap());
        }
        self.backlog.pop_front().unwrap()
    }
}

/// Posts `n` RX buffers of `size` bytes, recording them in `pool`.
fn post_rx(q: &mut VirtQueue, n: usize, size: u32, pool: &mut Pool) {
    for _ in 0..n {
        let a = q.mem().alloc(size as u64, 64).unwrap();
        let head = q.add_chain(&[Desc::inp(a, size)]).unwrap();
        pool.bufs.insert(head, a);
    }
    q.kick().unwrap();
}

/// Sends `f` (with a zero vnet header) on the TX queue and waits for completion.
fn send_tx(fe: &mut TestFrontend, txq: usize, f: &[u8]) {
    let hl = hdr_len(fe);
    let q = &mut fe.queues[txq];
    let hdr = q.mem().alloc(hl as u64, 16).unwrap();
    q.mem().fill(hdr, hl, 0).unwrap();
    let body = q.mem().alloc(f.len() as u64, 16).unwrap();
    q.mem().write(body, f).unwrap();
    let head = q
        .add_chain(&[Desc::out(hdr, hl as u32), Desc::out(body, f.len() as u32)])
        .unwrap();
    q.kick().unwrap();
    q.wait_for(head, T).unwrap();
}

/// Waits for one received packet, reassembling merged buffers.
fn recv_rx(fe: &mut TestFrontend, rxq: usize, pool: &mut Pool) -> (Vec<u8>, u16) {
    let (_, f, n) = recv_rx_full(fe, rxq, pool);
    (f, n)
}

/// Like [`recv_rx`], also returning the virtio-net header.
fn recv_rx_full(fe: &mut TestFrontend, rxq: usize, pool: &mut Pool) -> (Vec<u8>, Vec<u8>, u16) {
    let hl = hdr_len(fe);
    let q = &mut fe.queues[rxq];
    let take = |pool: &mut Pool, q: &mut VirtQueue| {
        let u = pool.next_used(q);
        let a = pool
            .bufs
            .remove(&u.id)
            .unwrap_or_else(|| panic!("used id {} was not posted", u.id));
        q.mem().read(a, u.len as usize).unwrap()
    };
    let mut pkt = take(pool, q);
    let nbufs = if hl == 12 {
        u16::from_le_bytes([pkt[10], pkt[11]])
    } else {
        1
    };
    for _ in 1..nbufs {
        pkt.extend(take(pool, q));
    }
    (pkt[..hl].to_vec(), pkt[hl..].to_vec(), nbufs)
}

/// Waits until every head in `heads` has been used.
fn wait_all(q: &mut VirtQueue, heads: &[u16]) {
    let mut left: Vec<u16> = heads.to_vec();
    while !left.is_empty() {
        for u in q.wait_used(T).unwrap() {
            left.retain(|h| *h != u.id);
        }
    }
}

/// Like [`recv_rx`], skipping frames the host stack sends on its own
/// (IPv6 router solicitations and the like).
fn recv_rx_test_frame(fe: &mut TestFrontend, rxq: usize, pool: &mut Pool) -> Vec<u8> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if pool.len() < 4 {
            post_rx(&mut fe.queues[rxq], 4, 2048, pool);
        }
        let (f, _) = recv_rx(fe, rxq, pool);
        if f.len() >= 14 && f[12..14] == [0x88, 0xb5] {
            return f;
        }
        eprintln!(
            "skipping frame of {} bytes: {:02x?}",
            f.len(),
            &f[..f.len().min(16)]
        );
    }
    panic!("no test frame received");
}

fn roundtrip(s: &mut Setup, fe: &mut TestFrontend, seed: u8) {
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 1, 2048, &mut bufs);
    let f = frame(100, seed);
    s.peer.send(&f);
    let (got, n) = recv_rx(fe, 0, &mut bufs);
    assert_eq!(n, 1);
    assert_eq!(got, f, "RX frame content");
    let f2 = frame(300, seed.wrapping_add(1));
    send_tx(fe, 1, &f2);
    assert_eq!(s.peer.recv(), f2, "TX frame content");
}

#[test]
fn stream_both_directions_with_vnet_features() {
    let mut s = stream_setup(&[]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    assert_ne!(fe.acked_features & MRG_RXBUF, 0);
    assert_ne!(fe.acked_features & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_eq!(
        fe.offered_features & NET_F_CSUM,
        0,
        "stream offers no offloads"
    );
    assert_eq!(fe.offered_features & NET_F_MQ, 0);
    assert_ne!(fe.offered_features & VIRTIO_RING_F_INDIRECT_DESC, 0);
    // Config space: MAC, LINK_UP, 1 pair, MTU 1500.
    let cfg = fe.get_config(0, 12).unwrap();
    assert_eq!(&cfg[0..6], &[0x52, 0x54, 0, 0, 0, 2]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    for i in 0..5 {
        roundtrip(&mut s, &mut fe, i * 10);
    }
}

#[test]
fn stream_legacy_header_no_features() {
    let mut s = stream_setup(&[]);
    // No VERSION_1, no MRG_RXBUF, no PROTOCOL_FEATURES: 10-byte header.
    let mut fe = connect(&s.sock, NET_F_MAC, 2);
    assert_eq!(hdr_len(&fe), 10);
    assert_eq!(fe.acked_features & VHOST_USER_F_PROTOCOL_FEATURES, 0);
    roundtrip(&mut s, &mut fe, 3);
    // Without MRG_RXBUF a frame larger than the buffer is dropped, the next
    // one that fits is delivered.
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 1, 1024, &mut bufs);
    s.peer.send(&frame(4000, 1));
    let small = frame(200, 9);
    s.peer.send(&small);
    let (got, _) = recv_rx(&mut fe, 0, &mut bufs);
    assert_eq!(got, small);
}

#[test]
fn stream_large_frames_span_merged_buffers() {
    let mut s = stream_setup(&["--mtu", "9000"]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 32, 1024, &mut bufs);
    let big = frame(9014, 42);
    s.peer.send(&big);
    let (got, n) = recv_rx(&mut fe, 0, &mut bufs);
    assert_eq!(n as usize, (9014usize + 12).div_ceil(1024));
    assert_eq!(got, big);
    // And a jumbo TX frame split over several descriptors (indirect too).
    let hl = hdr_len(&fe);
    let q = &mut fe.queues[1];
    let big2 = frame(9000, 7);
    let a = q.mem().alloc((hl + big2.len()) as u64, 16).unwrap();
    q.mem().fill(a, hl, 0).unwrap();
    q.mem().write(a + hl as u64, &big2).unwrap();
    let descs: Vec<Desc> = (0..(hl + big2.len()).div_ceil(1000))
        .map(|i| {
            let off = i * 1000;
            let len = (hl + big2.len() - off).min(1000);
            Desc::out(a + off as u64, len as u32)
        })
        .collect();
    let head = q.add_indirect(&descs).unwrap();
    q.kick().unwrap();
    q.wait_for(head, T).unwrap();
    assert_eq!(s.peer.recv(), big2);
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let mut s = stream_setup(&[]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    let outside = mic_test_support::outside(&fe.mem);
    let q = &mut fe.queues[1];
    let ok = q.mem().alloc(2048, 16).unwrap();
    q.mem().fill(ok, 2048, 0).unwrap();
    let mut heads = vec![
        // Descriptor outside guest memory.
        q.add_chain(&[Desc::out(outside, 100)]).unwrap(),
        // Straddling the end of guest memory.
        q.add_chain(&[Desc::out(q.mem().size() - 8, 100)]).unwrap(),
        // Wrong direction (device-writable in a TX chain).
        q.add_chain(&[Desc::out(ok, 12), Desc::inp(ok + 12, 100)])
            .unwrap(),
        // Far too long.
        q.add_chain(&[Desc::out(ok, 12), Desc::out(0, 0x7fff_ffff)])
            .unwrap(),
        // Too short to be a frame.
        q.add_chain(&[Desc::out(ok, 4)]).unwrap(),
    ];
    // A loop in the descriptor chain (next points back to itself).
    heads.push(
        q.add_raw(
            &[Desc {
                addr: ok,
                len: 64,
                flags: mic_test_support::VRING_DESC_F_NEXT,
                next: 0,
            }],
            true,
        )
        .unwrap(),
    );
    q.kick().unwrap();
    wait_all(q, &heads);
    // Malformed RX chain (device-readable buffer) is returned unused.
    let rq = &mut fe.queues[0];
    let a = rq.mem().alloc(2048, 16).unwrap();
    let bad = rq.add_chain(&[Desc::out(a, 2048)]).unwrap();
    rq.kick().unwrap();
    s.peer.send(&frame(100, 1));
    let used = rq.wait_for(bad, T).unwrap();
    assert!(used.iter().any(|u| u.id == bad && u.len == 0));
    // The frame waits for a good buffer.
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 1, 2048, &mut bufs);
    assert_eq!(recv_rx(&mut fe, 0, &mut bufs).0, frame(100, 1));
    // Nothing bad reached the peer, and the device still works.
    assert!(s.daemon.alive());
    let f = frame(64, 5);
    send_tx(&mut fe, 1, &f);
    assert_eq!(s.peer.recv(), f);
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 4, 2048, &mut bufs);
    let f = frame(80, 6);
    s.peer.send(&f);
    assert_eq!(recv_rx(&mut fe, 0, &mut bufs).0, f);
}

#[test]
fn frontend_reconnect_and_garbage() {
    let mut s = stream_setup(&[]);
    {
        let mut fe = connect(&s.sock, u64::MAX, 2);
        roundtrip(&mut s, &mut fe, 1);
    }
    // Garbage on the vhost-user socket.
    {
        let mut g = UnixStream::connect(&s.sock).unwrap();
        let _ = g.write_all(&[0xffu8; 37]);
        let _ = g.write_all(b"GET / HTTP/1.0\r\n\r\n");
    }
    {
        let mut g = UnixStream::connect(&s.sock).unwrap();
        // A valid header announcing a huge payload, then hang up.
        let mut h = Vec::new();
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
        let _ = g.write_all(&h);
    }
    assert!(s.daemon.alive());
    // Second and third frontends work with fresh device state (legacy
    // header after a VERSION_1 frontend, then VERSION_1 again).
    {
        let mut fe = connect(&s.sock, NET_F_MAC, 2);
        roundtrip(&mut s, &mut fe, 2);
    }
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 3);
    assert!(s.daemon.alive());
}

#[test]
fn stream_peer_reconnects() {
    let mut s = stream_setup(&[]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 1);
    // The peer goes away; the daemon reconnects.
    s.peer.conn = None;
    s.peer.accept();
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 4, 2048, &mut bufs);
    let f = frame(128, 77);
    s.peer.send(&f);
    assert_eq!(recv_rx(&mut fe, 0, &mut bufs).0, f);
}

#[test]
fn stream_listen_mode() {
    let dir = TempDir::new("net-test");
    let sock = dir.path().join("net.sock");
    let peer_path = dir.path().join("peer.sock");
    let stream = format!("unix:{}", peer_path.display());
    let mut d = Daemon::spawn(
        Path::new(BIN),
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--stream",
            &stream,
            "--listen",
        ],
        &sock,
    )
    .unwrap();
    let mut fe = connect(&sock, u64::MAX, 2);
    let mut c = UnixStream::connect(&peer_path).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 4, 2048, &mut bufs);
    let f = frame(90, 1);
    c.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
    c.write_all(&f).unwrap();
    assert_eq!(recv_rx(&mut fe, 0, &mut bufs).0, f);
    let f2 = frame(91, 2);
    send_tx(&mut fe, 1, &f2);
    let mut l = [0u8; 4];
    c.read_exact(&mut l).unwrap();
    let mut got = vec![0u8; u32::from_be_bytes(l) as usize];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, f2);
    assert!(d.alive());
}

fn run_bad(args: &[&str], sock: &Path) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line for {args:?}: {err}");
    assert!(lines[0].starts_with("mic-net: error: "), "{err}");
    assert!(!sock.exists(), "socket must not be created for {args:?}");
}

#[test]
fn bad_arguments_fail_before_the_socket() {
    let dir = TempDir::new("net-test");
    let sock = dir.path().join("net.sock");
    let s = sock.to_str().unwrap();
    run_bad(&[], &sock);
    run_bad(&["--socket-path", s], &sock);
    run_bad(
        &["--socket-path", s, "--tap", "a", "--stream", "unix:/x"],
        &sock,
    );
    run_bad(&["--socket-path", s, "--stream", "bogus"], &sock);
    run_bad(
        &["--socket-path", s, "--stream", "unix:/x", "--mac", "1:2:3"],
        &sock,
    );
    run_bad(
        &["--socket-path", s, "--tap", "t", "--queue-size", "1000"],
        &sock,
    );
    run_bad(&["--socket-path", s, "--tap", "t", "--frobnicate"], &sock);
    // Listening on an unusable stream address.
    run_bad(
        &[
            "--socket-path",
            s,
            "--stream",
            "unix:/nonexistent/dir/x",
            "--listen",
        ],
        &sock,
    );
    // A tap name that exists but is not a tap (loopback).
    run_bad(&["--socket-path", s, "--tap", "lo"], &sock);
}

#[test]
fn sigterm_exits_cleanly_and_removes_socket() {
    let mut s = stream_setup(&[]);
    let _fe = connect(&s.sock, u64::MAX, 2);
    let st = s.daemon.signal_and_wait(libc::SIGTERM, T).unwrap();
    assert!(st.success(), "{st}");
    assert!(!s.sock.exists());
}

// ---- tap mode, inside a network namespace ----

struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: tap tests need root (CAP_NET_ADMIN)");
            return None;
        }
        let name = format!("micnet-{}-{}", std::process::id(), rand_u32());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIP: cannot create a network namespace (ip netns add)");
            return None;
        }
        Some(Netns(name))
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            use std::os::unix::io::AsRawFd;
            // SAFETY: setns on a valid namespace fd, for this thread only.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: valid buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_ne_bytes(b)
}

fn ifindex(name: &str) -> i32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) as i32 }
}

/// A raw AF_PACKET socket bound to an interface (in the calling thread's netns).
struct RawSock(i32);

impl RawSock {
    fn bind(ifname: &str) -> RawSock {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(fd >= 0);
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto as u16;
        sa.sll_ifindex = ifindex(ifname);
        assert!(sa.sll_ifindex > 0);
        // SAFETY: valid sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0);
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: valid timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        RawSock(fd)
    }

    fn send(&self, f: &[u8]) {
        // SAFETY: valid buffer.
        let n = unsafe { libc::send(self.0, f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
    }

    /// Receives frames until one with our test ethertype arrives.
    fn recv_test_frame(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 70000];
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            // SAFETY: valid buffer.
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n >= 0, "recv: {}", std::io::Error::last_os_error());
            let n = n as usize;
            if n >= 14 && buf[12..14] == [0x88, 0xb5] {
                return buf[..n].to_vec();
            }
        }
        panic!("no test frame on the tap");
    }
}

impl Drop for RawSock {
    fn drop(&mut self) {
        // SAFETY: owned fd.
        unsafe { libc::close(self.0) };
    }
}

fn tap_daemon(ns: &Netns, dir: &TempDir, sock: &Path, extra: &[&str]) -> Daemon {
    let _ = dir;
    let mut args = vec![
        "netns",
        "exec",
        &ns.0,
        BIN,
        "--socket-path",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Daemon::spawn(Path::new("ip"), &args, sock).unwrap()
}

#[test]
fn tap_both_directions_in_netns() {
    let Some(ns) = Netns::new() else { return };
    let dir = TempDir::new("net-tap");
    let sock = dir.path().join("net.sock");
    let mut d = tap_daemon(&ns, &dir, &sock, &["--tap", "mic0", "--host-ip", "auto"]);
    // The host address follows the X100 convention.
    let addrs = Command::new("ip")
        .args(["-n", &ns.0, "-4", "addr", "show", "dev", "mic0"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout).to_string();
    assert!(addrs.contains("172.31.1.254/24"), "{addrs}");
    assert!(addrs.contains("UP"), "{addrs}");

    for features in [u64::MAX, NET_F_MAC] {
        let mut fe = connect(&sock, features, 2);
        if features == u64::MAX {
            assert_ne!(fe.acked_features & NET_F_CSUM, 0, "tap offers offloads");
        }
        let raw = ns.run(|| RawSock::bind("mic0"));
        // Guest -> tap.
        let f = frame(200, 11);
        send_tx(&mut fe, 1, &f);
        assert_eq!(raw.recv_test_frame(), f);
        // Tap -> guest.
        let mut bufs = Pool::new();
        post_rx(&mut fe.queues[0], 8, 2048, &mut bufs);
        let f = frame(333, 12);
        raw.send(&f);
        assert_eq!(recv_rx_test_frame(&mut fe, 0, &mut bufs), f);
        // Malformed chain dropped, the daemon goes on.
        let q = &mut fe.queues[1];
        let h = q
            .add_chain(&[Desc::out(mic_test_support::outside(&fe.mem), 64)])
            .unwrap();
        q.kick().unwrap();
        q.wait_for(h, T).unwrap();
        assert!(d.alive());
    }
}

#[test]
fn tap_multiqueue_in_netns() {
    let Some(ns) = Netns::new() else { return };
    let dir = TempDir::new("net-tap");
    let sock = dir.path().join("net.sock");
    let _d = tap_daemon(
        &ns,
        &dir,
        &sock,
        &["--tap", "mq0", "--num-queue-pairs", "2"],
    );
    let mut fe = connect(&sock, u64::MAX, 4);
    assert_ne!(fe.acked_features & NET_F_MQ, 0);
    assert_eq!(fe.queue_num().unwrap(), 4);
    let cfg = fe.get_config(8, 2).unwrap();
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 2);
    let raw = ns.run(|| RawSock::bind("mq0"));
    for (i, txq) in [1usize, 3].into_iter().enumerate() {
        let f = frame(150 + i, 20 + i as u8);
        send_tx(&mut fe, txq, &f);
        assert_eq!(raw.recv_test_frame(), f, "TX on queue {txq}");
    }
    // RX: the kernel picks the queue; buffers on both RX queues.
    let mut b0 = Pool::new();
    post_rx(&mut fe.queues[0], 32, 2048, &mut b0);
    let mut b2 = Pool::new();
    post_rx(&mut fe.queues[2], 32, 2048, &mut b2);
    let f = frame(222, 5);
    raw.send(&f);
    let deadline = Instant::now() + T;
    let got = loop {
        let mut seen = None;
        if let Some(u) = fe.queues[0].pop_used() {
            seen = Some(fe.mem.read(b0.bufs[&u.id], u.len as usize).unwrap());
        } else if let Some(u) = fe.queues[2].pop_used() {
            seen = Some(fe.mem.read(b2.bufs[&u.id], u.len as usize).unwrap());
        }
        match seen {
            // Skip frames the host stack sends by itself.
            Some(p) if p.len() >= 26 && p[24..26] == [0x88, 0xb5] => break p,
            Some(_) => continue,
            None => {}
        }
        assert!(Instant::now() < deadline, "no RX on either queue");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(&got[12..], &f[..]);
}

#[test]
fn tap_bad_existing_device() {
    let Some(ns) = Netns::new() else { return };
    let dir = TempDir::new("net-tap");
    let sock = dir.path().join("net.sock");
    // A tun (not tap) device of that name exists.
    let ok = Command::new("ip")
        .args([
            "-n", &ns.0, "tuntap", "add", "mode", "tun", "name", "notatap",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip tuntap add");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            BIN,
            "--socket-path",
            sock.to_str().unwrap(),
            "--tap",
            "notatap",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("notatap"), "{err}");
    assert!(!sock.exists());
}

fn vu_msg(req: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut v = req.to_le_bytes().to_vec();
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn vu_reply_u64(s: &mut UnixStream) -> u64 {
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    u64::from_le_bytes(r[12..20].try_into().unwrap())
}

/// QEMU's vhost-user net client enables rings before SET_FEATURES; the
/// daemon must keep the connection (and honour the enable afterwards).
#[test]
fn early_vring_enable_like_qemu() {
    let mut s = stream_setup(&[]);
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(&vu_msg(1, 1, &[])).unwrap(); // GET_FEATURES
    let feats = vu_reply_u64(&mut c);
    assert_ne!(feats & VHOST_USER_F_PROTOCOL_FEATURES, 0);
    c.write_all(&vu_msg(15, 1, &[])).unwrap(); // GET_PROTOCOL_FEATURES
    let _ = vu_reply_u64(&mut c);
    c.write_all(&vu_msg(16, 1, &0x9u64.to_le_bytes())).unwrap(); // MQ | REPLY_ACK
    c.write_all(&vu_msg(3, 1, &[])).unwrap(); // SET_OWNER
                                              // SET_VRING_ENABLE(0, 1) and (1, 1), the second asking for a reply.
    c.write_all(&vu_msg(18, 1, &[0, 0, 0, 0, 1, 0, 0, 0]))
        .unwrap();
    c.write_all(&vu_msg(18, 1 | 8, &[1, 0, 0, 0, 1, 0, 0, 0]))
        .unwrap();
    assert_eq!(vu_reply_u64(&mut c), 0, "enable acknowledged");
    c.write_all(&vu_msg(2, 1, &feats.to_le_bytes())).unwrap(); // SET_FEATURES
    c.write_all(&vu_msg(17, 1, &[])).unwrap(); // GET_QUEUE_NUM
    assert_eq!(vu_reply_u64(&mut c), 2, "connection still served");
    drop(c);
    // A regular frontend still works afterwards.
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 9);
}

/// Rootless networking through passt (skipped when passt is not installed):
/// an ARP request from the guest is answered by passt.
#[test]
fn passt_answers_arp() {
    let have_passt = Command::new("passt")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_passt {
        eprintln!("SKIP: passt not installed");
        return;
    }
    let dir = TempDir::new("net-passt");
    // passt drops privileges when started as root; let it create its socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let psock = dir.path().join("passt.sock");
    let mut passt = Command::new("passt")
        .args(["-f", "-q", "-s", psock.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _k = Kill(&mut passt);
    let sock = dir.path().join("net.sock");
    let stream = format!("unix:{}", psock.display());
    // mic-net keeps retrying until passt's socket exists.
    let _d = Daemon::spawn(
        Path::new(BIN),
        &["--socket-path", sock.to_str().unwrap(), "--stream", &stream],
        &sock,
    )
    .unwrap();
    let mut fe = connect(&sock, u64::MAX, 2);
    let mut pool = Pool::new();
    post_rx(&mut fe.queues[0], 16, 2048, &mut pool);
    let mac = [0x52, 0x54, 0, 0, 0, 2];
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&[0, 0, 0, 0]); // probe: sender 0.0.0.0
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 1, 2, 3]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no ARP reply from passt");
        // passt may not be connected yet: repeat the request.
        send_tx(&mut fe, 1, &arp);
        if pool.backlog.is_empty() {
            match fe.queues[0].wait_used(Duration::from_millis(200)) {
                Ok(u) => pool.backlog.extend(u),
                Err(_) => continue,
            }
        }
        let (f, _) = recv_rx(&mut fe, 0, &mut pool);
        if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
            assert_eq!(&f[0..6], &mac, "reply to our MAC");
            assert_eq!(
                &f[28..32],
                &[10, 1, 2, 3],
                "sender is the requested address"
            );
            break;
        }
    }
}

fn ip_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + UDP frame with an incomplete (pseudo-header only) UDP
/// checksum, as a driver using checksum offload sends it.
fn udp_frame_partial_csum(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    // Pseudo-header sum, not inverted: the device completes it.
    let mut ph = Vec::new();
    ph.extend_from_slice(&src);
    ph.extend_from_slice(&dst);
    ph.extend_from_slice(&[0, 17]);
    ph.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&(!ip_checksum(&ph)).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Checksum offload through the tap: the guest sends UDP with
/// NEEDS_CSUM (an incomplete checksum the host stack must not reject) and
/// receives host UDP with the header the tap produced.
#[test]
fn tap_checksum_offload_in_netns() {
    let Some(ns) = Netns::new() else { return };
    let dir = TempDir::new("net-tap");
    let sock = dir.path().join("net.sock");
    let _d = tap_daemon(
        &ns,
        &dir,
        &sock,
        &[
            "--tap",
            "mic3",
            "--host-ip",
            "auto",
            "--mac",
            "52:54:00:00:00:02",
        ],
    );
    let guest_mac = [0x52, 0x54, 0, 0, 0, 2];
    let ok = Command::new("ip")
        .args([
            "-n",
            &ns.0,
            "neigh",
            "replace",
            "172.31.4.1",
            "lladdr",
            "52:54:00:00:00:02",
            "dev",
            "mic3",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut fe = connect(&sock, u64::MAX, 2);
    assert_ne!(fe.acked_features & NET_F_CSUM, 0);
    assert_ne!(
        fe.acked_features & (1 << VIRTIO_NET_F_GUEST_CSUM),
        0,
        "GUEST_CSUM"
    );
    let host = ns.run(|| {
        let s = std::net::UdpSocket::bind("172.31.4.254:5001").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s
    });
    // Guest -> host with NEEDS_CSUM.
    let payload = b"offload-tx payload";
    let f = udp_frame_partial_csum(
        [0xff; 6],
        guest_mac,
        [172, 31, 4, 1],
        [172, 31, 4, 254],
        5001,
        payload,
    );
    {
        let q = &mut fe.queues[1];
        let mut hdr = [0u8; 12];
        hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        hdr[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset
        let a = q.mem().alloc(12 + f.len() as u64, 16).unwrap();
        q.mem().write(a, &hdr).unwrap();
        q.mem().write(a + 12, &f).unwrap();
        let h = q.add_chain(&[Desc::out(a, 12 + f.len() as u32)]).unwrap();
        q.kick().unwrap();
        q.wait_for(h, T).unwrap();
    }
    let mut buf = [0u8; 128];
    let (n, from) = host
        .recv_from(&mut buf)
        .expect("host received the offloaded UDP packet");
    assert_eq!(&buf[..n], payload);
    assert_eq!(from.to_string(), "172.31.4.1:4000");

    // Host -> guest: the tap hands over a partial checksum with NEEDS_CSUM.
    let mut pool = Pool::new();
    post_rx(&mut fe.queues[0], 16, 2048, &mut pool);
    host.send_to(b"offload-rx", "172.31.4.1:6000").unwrap();
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "no UDP frame for the guest");
        if pool.len() < 4 {
            post_rx(&mut fe.queues[0], 8, 2048, &mut pool);
        }
        let (hdr, f, _) = recv_rx_full(&mut fe, 0, &mut pool);
        if f.len() >= 42
            && f[12..14] == [0x08, 0x00]
            && f[23] == 17
            && f[36..38] == 6000u16.to_be_bytes()
        {
            assert_eq!(&f[42..], b"offload-rx");
            assert_eq!(hdr[0] & 1, 1, "NEEDS_CSUM passed through: {hdr:?}");
            assert_eq!(u16::from_le_bytes([hdr[6], hdr[7]]), 34, "csum_start");
            assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 6, "csum_offset");
            break;
        }
    }
}

/// `--client`: the daemon connects to a listening frontend and reconnects
/// after the frontend goes away.
#[test]
fn client_mode_connects_and_reconnects() {
    let dir = TempDir::new("net-test");
    let sock = dir.path().join("front.sock");
    let peer_path = dir.path().join("peer.sock");
    let _peer = Peer::new(&peer_path);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let stream = format!("unix:{}", peer_path.display());
    let mut child = Command::new(BIN)
        .args([
            "--socket-path",
            sock.to_str().unwrap(),
            "--stream",
            &stream,
            "--client",
        ])
        .spawn()
        .unwrap();
    for round in 0..2 {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        c.write_all(&vu_msg(1, 1, &[])).unwrap();
        let f = vu_reply_u64(&mut c);
        assert_ne!(f & VIRTIO_F_VERSION_1, 0, "round {round}");
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = mic_test_support::wait_exit(&mut child, T).unwrap();
    assert!(st.success());
}

/// Attaching to a persistent tap created beforehand (`ip tuntap add`).
#[test]
fn tap_existing_device_in_netns() {
    let Some(ns) = Netns::new() else { return };
    let dir = TempDir::new("net-tap");
    let sock = dir.path().join("net.sock");
    let ok = Command::new("ip")
        .args([
            "-n", &ns.0, "tuntap", "add", "mode", "tap", "vnet_hdr", "name", "pre0",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip tuntap add");
    let _d = tap_daemon(&ns, &dir, &sock, &["--tap", "pre0"]);
    let mut fe = connect(&sock, u64::MAX, 2);
    let raw = ns.run(|| RawSock::bind("pre0"));
    let f = frame(180, 31);
    send_tx(&mut fe, 1, &f);
    assert_eq!(raw.recv_test_frame(), f);
}

/// CPU ticks the daemon uses in one second.
fn ticks_in_one_second(d: &Daemon) -> u64 {
    mic_test_support::ticks_in_one_second(d.child.id())
}

#[test]
fn tx_avail_index_past_the_ring_does_not_spin() {
    let mut s = stream_setup(&[]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 1);
    fe.queues[1].corrupt_avail_idx(30000);
    fe.queues[1].kick_always().unwrap();
    let used = ticks_in_one_second(&s.daemon);
    assert!(
        used < mic_test_support::IDLE_TICKS,
        "daemon burnt {used} ticks in 1 s"
    );
    // The RX queue is still served.
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 1, 2048, &mut bufs);
    let f = frame(100, 5);
    s.peer.send(&f);
    assert_eq!(recv_rx(&mut fe, 0, &mut bufs).0, f);
    // Kicks on the broken ring cost nothing either.
    for _ in 0..100 {
        fe.queues[1].kick_always().unwrap();
    }
    assert!(ticks_in_one_second(&s.daemon) < mic_test_support::IDLE_TICKS);
    drop(fe);
    // A new frontend gets both queues back.
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 2);
    assert!(s.daemon.alive());
}

#[test]
fn rx_avail_index_past_the_ring_does_not_spin() {
    let mut s = stream_setup(&[]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 1);
    fe.queues[0].corrupt_avail_idx(30000);
    fe.queues[0].kick_always().unwrap();
    // A frame from the host makes the worker look at the broken ring.
    s.peer.send(&frame(100, 6));
    let used = ticks_in_one_second(&s.daemon);
    assert!(
        used < mic_test_support::IDLE_TICKS,
        "daemon burnt {used} ticks in 1 s"
    );
    // The TX queue is still served.
    let f = frame(300, 7);
    send_tx(&mut fe, 1, &f);
    assert_eq!(s.peer.recv(), f);
    drop(fe);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 2);
    assert!(s.daemon.alive());
}

#[test]
fn merged_rx_buffers_too_small_for_the_frame_wait_without_spinning() {
    let mut s = stream_setup(&["--mtu", "9000"]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    assert_ne!(fe.acked_features & MRG_RXBUF, 0);
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 2, 1024, &mut bufs);
    let big = frame(9014, 8);
    s.peer.send(&big);
    let used = ticks_in_one_second(&s.daemon);
    assert!(
        used < mic_test_support::IDLE_TICKS,
        "daemon burnt {used} ticks in 1 s"
    );
    assert!(fe.queues[0].no_used_within(Duration::from_millis(10)));
    // More buffers: the driver is asked to kick for them (EVENT_IDX), and
    // the frame arrives whole.
    post_rx(&mut fe.queues[0], 8, 1024, &mut bufs);
    let (got, n) = recv_rx(&mut fe, 0, &mut bufs);
    assert_eq!(n as usize, (9014usize + 12).div_ceil(1024));
    assert_eq!(got, big);
    assert!(s.daemon.alive());
}

#[test]
fn frame_larger_than_a_full_ring_of_merged_buffers_is_dropped() {
    let mut s = stream_setup(&["--mtu", "9000"]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    let size = fe.queues[0].size() as usize;
    let mut bufs = Pool::new();
    // A full ring of 16-byte buffers holds 4 KiB.
    post_rx(&mut fe.queues[0], size, 16, &mut bufs);
    s.peer.send(&frame(9014, 9));
    let small = frame(60, 10);
    s.peer.send(&small);
    let (got, n) = recv_rx(&mut fe, 0, &mut bufs);
    assert_eq!(got, small, "the oversized frame was dropped");
    assert_eq!(n as usize, (60usize + 12).div_ceil(16));
    assert!(ticks_in_one_second(&s.daemon) < mic_test_support::IDLE_TICKS);
}

/// SIGTERM ends the daemon within a second whatever state a peer left it
/// in: a vhost-user peer stalled at any point (`mic_test_support::STALLED_PEERS`),
/// or a frontend whose rings are broken while the stream peer is gone.
#[test]
fn sigterm_ends_the_daemon_within_a_second_in_any_state() {
    for (what, prelude) in mic_test_support::STALLED_PEERS {
        let mut s = stream_setup(&[]);
        let st = mic_test_support::sigterm_with_stalled_peer(&mut s.daemon, prelude)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(st.success(), "{what}: exit status {st}");
        assert!(!s.sock.exists(), "{what}");
    }
    let mut s = stream_setup(&[]);
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 1);
    for q in [0, 1] {
        fe.queues[q].corrupt_avail_idx(30000);
        fe.queues[q].kick_always().unwrap();
    }
    // The stream peer goes away: the daemon is waiting to reconnect.
    s.peer.conn = None;
    std::thread::sleep(Duration::from_millis(200));
    let st = s
        .daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(1))
        .unwrap();
    assert!(st.success(), "exit status {st}");
    assert!(!s.sock.exists());
}

/// Kicks on broken rings, and frames arriving for a broken receive ring,
/// leave one line per ring in the log: the daemon does not ask
/// `virtio-queue` for chains of a ring it knows is broken (which would log
/// an error per call).
#[test]
fn kicks_on_broken_rings_do_not_log_per_kick() {
    let dir = TempDir::new("net-test");
    let sock = dir.path().join("net.sock");
    let peer_path = dir.path().join("peer.sock");
    let stderr = dir.path().join("stderr.log");
    let mut peer = Peer::new(&peer_path);
    let stream = format!("unix:{}", peer_path.display());
    let args = ["--socket-path", sock.to_str().unwrap(), "--stream", &stream];
    let d = Daemon::spawn_logged(Path::new(BIN), &args, &sock, &stderr).unwrap();
    peer.accept();
    let mut s = Setup {
        _dir: dir,
        sock,
        daemon: d,
        peer,
    };
    let mut fe = connect(&s.sock, u64::MAX, 2);
    roundtrip(&mut s, &mut fe, 1);
    let before = mic_test_support::log_lines(&stderr).unwrap();
    for q in [0, 1] {
        fe.queues[q].corrupt_avail_idx(30000);
    }
    for i in 0..100u8 {
        fe.queues[0].kick_always().unwrap();
        fe.queues[1].kick_always().unwrap();
        if i % 10 == 0 {
            s.peer.send(&frame(100, i));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let lines = mic_test_support::log_lines(&stderr).unwrap() - before;
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines:\n{}",
        std::fs::read_to_string(&stderr).unwrap()
    );
    assert!(s.daemon.alive());
}

/// `--print-capabilities` against QEMU's vhost-user.json: type `net`,
/// which has no features (so no `features` member), other options ignored.
#[test]
fn capabilities_follow_the_schema() {
    use mic_test_support::conventions::{check_capabilities, print_capabilities};
    let caps = check_capabilities(&print_capabilities(Path::new(BIN), &[])).unwrap();
    assert_eq!(caps.kind, "net");
    assert!(caps.features.is_empty());
    let again = print_capabilities(Path::new(BIN), &["--tap", "x", "--stream", "bogus"]);
    assert_eq!(check_capabilities(&again).unwrap(), caps);
}

/// Served through `--fd`: a listening socket the test bound and passed as
/// descriptor 5; frames both ways in stream mode.
#[test]
fn served_through_an_inherited_socket() {
    use mic_test_support::conventions::spawn_with_fd;
    let dir = TempDir::new("net-fd");
    let sock = dir.join("net.sock");
    let peer_path = dir.join("peer.sock");
    let mut peer = Peer::new(&peer_path);
    let stream = format!("unix:{}", peer_path.display());
    let listener = UnixListener::bind(&sock).unwrap();
    let args = ["--stream", &stream, "--mac", "52:54:00:00:00:02"];
    let mut p = spawn_with_fd(Path::new(BIN), &args, &listener, 5, &dir.join("stderr"));
    peer.accept();
    let mut fe = connect(&sock, u64::MAX, 2);
    let mut bufs = Pool::new();
    post_rx(&mut fe.queues[0], 1, 2048, &mut bufs);
    let f = frame(100, 1);
    peer.send(&f);
    assert_eq!(recv_rx(&mut fe, 0, &mut bufs).0, f, "RX frame content");
    let f2 = frame(300, 2);
    send_tx(&mut fe, 1, &f2);
    assert_eq!(peer.recv(), f2, "TX frame content");
    drop(fe);
    let st = p.signal_and_wait(libc::SIGTERM, T).unwrap();
    assert!(st.success(), "{st}");
}

#[test]
fn installed_descriptor() {
    let d = mic_test_support::conventions::install_and_check(Path::new(BIN));
    assert_eq!(d.kind, "net");
}
