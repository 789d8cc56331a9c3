//! Boot tests for the card's network: the card OS boots on the emulated X100
//! and reaches the host over its VOP virtio-net device, served by `mic-net`
//! through the real bridge.
//!
//! Two host sides are checked with the same traffic (ping both ways, 16 MiB
//! over TCP both ways with checksums):
//!
//! - `mic-net --tap`: the tap lives in a private network namespace;
//! - `mic-net --stream`: `mic-net` connects to a relay in this file that
//!   speaks QEMU's `-netdev stream` framing and forwards the frames to and
//!   from a tap in a private network namespace.
//!
//! Needs root (network namespaces, taps).

// The shared harness names a variant after its enum (`Blk::MicBlk`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mic_test_support::{rand_u64, sum_in, tail, wait_for, Card, CardOptions, Net, TempDir};

const MIB: usize = 1 << 20;
/// Bytes sent in each direction.
const TRANSFER: usize = 16 * MIB;
const CARD_IP: &str = "172.31.1.1";
const HOST_IP: &str = "172.31.1.254";
const HOST_CIDR: &str = "172.31.1.254/24";
/// A short command on the card.
const CMD: Duration = Duration::from_secs(60);
/// A 16 MiB transfer under TCG on a loaded two-core machine.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the first ping may take (link up, ARP).
const FIRST_PING: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Host side: network namespace, commands and sockets inside it.

/// A network namespace (`ip netns`), deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("mict-{:08x}", rand_u64() as u32);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip netns add {name} failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    fn name(&self) -> &str {
        &self.0
    }

    /// Runs a program inside the namespace; returns (stdout+stderr, success).
    fn exec(&self, args: &[&str]) -> (String, bool) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ip netns exec");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s += &String::from_utf8_lossy(&out.stderr);
        (s, out.status.success())
    }

    /// Runs a program inside the namespace that must succeed.
    fn must(&self, args: &[&str]) -> String {
        let (out, ok) = self.exec(args);
        assert!(ok, "`{}` in {} failed: {out}", args.join(" "), self.0);
        out
    }

    /// The namespace's interfaces, addresses, neighbours and counters.
    fn state(&self) -> String {
        let mut s = String::new();
        for args in [&["ip", "-s", "link"][..], &["ip", "addr"], &["ip", "neigh"]] {
            s += &format!("$ {}\n{}\n", args.join(" "), self.exec(args).0);
        }
        s
    }

    /// Runs `f` on a thread that has joined the namespace: sockets and taps
    /// it creates belong to the namespace, wherever they are used later.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) on a descriptor we own; only this thread moves.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- host namespace {} ---\n{}", self.0, self.state());
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Prints the tail of a log file if the test fails.
struct LogOnPanic(&'static str, PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("--- {} ---\n{}", self.0, tail(&log, 40));
        }
    }
}

/// The host's ping: iputils if installed, else busybox's.
fn ping_cmd() -> Vec<&'static str> {
    let have_ping = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("ping").is_file()))
        .unwrap_or(false);
    if have_ping {
        vec!["ping"]
    } else {
        vec!["busybox", "ping"]
    }
}

/// sha256 of `data`, via the system's sha256sum.
fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    sum_in(&String::from_utf8_lossy(&out.stdout))
}

/// Waits until `fd` is readable (or hung up); false on timeout.
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives across the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    r > 0
}

// ---------------------------------------------------------------------------
// The stream peer: QEMU `-netdev stream` framing <-> a tap in a namespace.

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Largest frame the relay accepts from `mic-net` (as QEMU).
const MAX_FRAME: usize = 65536 + 4096;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates tap `name` (no packet information, no vnet header) in the calling
/// thread's network namespace.
fn open_tap(name: &str) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Frame counters of the relay.
#[derive(Default)]
struct RelayStats {
    peers: AtomicU64,
    to_tap: AtomicU64,
    from_tap: AtomicU64,
    tap_write_errors: AtomicU64,
}

/// Serves a unix socket for `mic-net --stream`, relaying its frames to and
/// from a tap in a network namespace.
struct StreamRelay {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    stats: Arc<RelayStats>,
    thread: Option<JoinHandle<()>>,
}

impl StreamRelay {
    /// Creates tap `tap` in `ns` with the host address, and listens on
    /// `socket`.
    fn start(ns: &Netns, tap: &str, socket: PathBuf) -> StreamRelay {
        let t = tap.to_string();
        let tap_file = ns
            .run(move || open_tap(&t))
            .unwrap_or_else(|e| panic!("creating tap {tap} in {}: {e}", ns.name()));
        ns.must(&["ip", "addr", "add", HOST_CIDR, "dev", tap]);
        ns.must(&["ip", "link", "set", tap, "up"]);
        let listener = UnixListener::bind(&socket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::spawn(move || relay(listener, tap_file, &s, &st));
        StreamRelay {
            socket,
            stop,
            stats,
            thread: Some(thread),
        }
    }

    fn stats(&self) -> String {
        let s = &self.stats;
        format!(
            "stream relay: peers={} frames to tap={} from tap={} tap write errors={}",
            s.peers.load(Ordering::Relaxed),
            s.to_tap.load(Ordering::Relaxed),
            s.from_tap.load(Ordering::Relaxed),
            s.tap_write_errors.load(Ordering::Relaxed),
        )
    }
}

impl Drop for StreamRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        if std::thread::panicking() {
            eprintln!("--- {} ---", self.stats());
        }
    }
}

/// The relay's loop: one peer at a time (a new one replaces the current
/// one), frames from the peer written to the tap, frames read from the tap
/// sent to the peer (dropped while there is none).
fn relay(listener: UnixListener, mut tap: File, stop: &AtomicBool, stats: &RelayStats) {
    let mut peer: Option<UnixStream> = None;
    let mut inbuf: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; MAX_FRAME + 4];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = vec![
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Some(p) = &peer {
            fds.push(libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: poll(2) on pollfds that live across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n <= 0 {
            continue;
        }
        // Peer -> tap.
        if fds.len() > 2 && fds[2].revents != 0 {
            let p = peer.as_mut().unwrap();
            match p.read(&mut buf) {
                Ok(0) | Err(_) => peer = None,
                Ok(n) => {
                    inbuf.extend_from_slice(&buf[..n]);
                    let mut off = 0;
                    while inbuf.len() - off >= 4 {
                        let len =
                            u32::from_be_bytes(inbuf[off..off + 4].try_into().unwrap()) as usize;
                        if len > MAX_FRAME {
                            eprintln!("stream relay: frame of {len} bytes from mic-net");
                            peer = None;
                            break;
                        }
                        if inbuf.len() - off - 4 < len {
                            break;
                        }
                        let frame = &inbuf[off + 4..off + 4 + len];
                        if tap.write(frame).is_ok() {
                            stats.to_tap.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.tap_write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        off += 4 + len;
                    }
                    inbuf.drain(..off);
                }
            }
        }
        // Tap -> peer.
        if fds[1].revents & libc::POLLIN != 0 {
            if let Ok(n) = tap.read(&mut buf[4..]) {
                buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
                if let Some(p) = &mut peer {
                    if p.write_all(&buf[..4 + n]).is_ok() {
                        stats.from_tap.fetch_add(1, Ordering::Relaxed);
                    } else {
                        peer = None;
                    }
                }
            }
        }
        // A new peer replaces the current one.
        if fds[0].revents & libc::POLLIN != 0 {
            if let Ok((s, _)) = listener.accept() {
                stats.peers.fetch_add(1, Ordering::Relaxed);
                peer = Some(s);
                inbuf.clear();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The checks, the same for every host side.

/// Card and host state, for a failure message.
fn diagnostics(card: &mut Card, ns: &Netns) -> String {
    let (card_state, _) = card.run_status(
        "ip addr; ip -s link; ip neigh; ip route; dmesg | tail -n 20",
        CMD,
    );
    format!(
        "--- card ---\n{card_state}\n--- host namespace {} ---\n{}",
        ns.name(),
        ns.state()
    )
}

/// Whether ping's summary reports no loss (busybox and iputils both print
/// ", 0% packet loss").
fn no_loss(out: &str) -> bool {
    out.contains(" 0% packet loss") && !out.contains("100% packet loss")
}

/// Ping both ways: the first ping is retried (link up, ARP), then three
/// pings each way must all be answered.
fn check_ping(card: &mut Card, ns: &Netns) {
    let t = Instant::now();
    let first = wait_for(FIRST_PING, "a first ping from the card to the host", || {
        let (out, code) = card.run_status(&format!("ping -c 1 -W 1 {HOST_IP}"), CMD);
        (code == 0).then_some(out)
    });
    println!("first ping after {:?}: {first}", t.elapsed());

    let (out, code) = card.run_status(&format!("ping -c 3 -W 2 {HOST_IP}"), CMD);
    if code != 0 || !no_loss(&out) {
        panic!(
            "card -> host ping failed (exit {code}):\n{out}\n{}",
            diagnostics(card, ns)
        );
    }

    let mut ping = ping_cmd();
    let mut first = ping.clone();
    first.extend(["-c", "1", "-W", "1", CARD_IP]);
    wait_for(FIRST_PING, "a first ping from the host to the card", || {
        ns.exec(&first).1.then_some(())
    });
    ping.extend(["-c", "3", "-W", "2", CARD_IP]);
    let (out, ok) = ns.exec(&ping);
    if !ok || !no_loss(&out) {
        panic!(
            "host -> card ping failed:\n{out}\n{}",
            diagnostics(card, ns)
        );
    }
}

/// The card sends 16 MiB of random data to a TCP listener in the host's
/// namespace; the host's checksum must match the card's.
fn check_card_to_host(card: &mut Card, ns: &Netns) {
    let listener = ns
        .run(|| TcpListener::bind((HOST_IP, 0)))
        .expect("listening in the host namespace");
    let port = listener.local_addr().unwrap().port();
    let receiver = std::thread::spawn(move || -> io::Result<Vec<u8>> {
        if !readable(listener.as_raw_fd(), TRANSFER_TIMEOUT) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
        }
        let (mut s, peer) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut data = Vec::with_capacity(TRANSFER);
        s.read_to_end(&mut data)?;
        println!("received {} bytes from {peer}", data.len());
        Ok(data)
    });

    let out = card.run(
        &format!(
            "dd if=/dev/urandom of=/tmp/out bs=1M count={} 2>/dev/null && sha256sum /tmp/out",
            TRANSFER / MIB
        ),
        CMD,
    );
    let card_sum = sum_in(&out);

    let t = Instant::now();
    let (out, code) = card.run_status(&format!("nc {HOST_IP} {port} < /tmp/out"), TRANSFER_TIMEOUT);
    let took = t.elapsed();
    let data = receiver.join().unwrap();
    let data = match data {
        Ok(d) if code == 0 => d,
        r => panic!(
            "card -> host transfer failed: card nc exit {code} ({out}), host side {:?}\n{}",
            r.map(|d| d.len()),
            diagnostics(card, ns)
        ),
    };
    assert_eq!(
        data.len(),
        TRANSFER,
        "the host received {} of {TRANSFER} bytes",
        data.len()
    );
    assert_eq!(
        sha256(&data),
        card_sum,
        "the host received other bytes than the card sent"
    );
    println!(
        "card -> host: {} MiB in {took:.1?} ({:.1} MiB/s)",
        TRANSFER / MIB,
        (TRANSFER / MIB) as f64 / took.as_secs_f64()
    );
    card.run("rm /tmp/out", CMD);
}

/// The host sends 16 MiB of random data to a listener on the card; the
/// card's checksum must match the host's.
fn check_host_to_card(card: &mut Card, ns: &Netns) {
    let mut data = vec![0u8; TRANSFER];
    File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let host_sum = sha256(&data);
    let port = 5002;

    // The card's nc writes its exit status to /tmp/nc.rc when done. The
    // background job holds none of the command's output open, so the
    // agent's exec returns at once.
    card.run(
        &format!(
            "rm -f /tmp/in /tmp/nc.rc; \
             (nc -l -p {port} </dev/null >/tmp/in 2>/tmp/nc.err; echo $? >/tmp/nc.rc) \
             </dev/null >/dev/null 2>&1 & \
             echo listening"
        ),
        CMD,
    );

    let t = Instant::now();
    let sent = ns.run(move || -> io::Result<usize> {
        let addr = SocketAddr::from((CARD_IP.parse::<Ipv4Addr>().unwrap(), port));
        // Refused until the card's nc listens.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        s.set_write_timeout(Some(Duration::from_secs(120)))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        s.write_all(&data)?;
        s.shutdown(Shutdown::Write)?;
        // The card closes once it has read everything.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(data.len())
    });
    let took = t.elapsed();
    if let Err(e) = &sent {
        let (nc, _) = card.run_status("cat /tmp/nc.rc /tmp/nc.err; ls -l /tmp/in", CMD);
        panic!(
            "host -> card transfer failed: {e}\ncard: {nc}\n{}",
            diagnostics(card, ns)
        );
    }

    let rc = card.run(
        "while [ ! -s /tmp/nc.rc ]; do sleep 1; done; cat /tmp/nc.rc /tmp/nc.err",
        TRANSFER_TIMEOUT,
    );
    assert_eq!(rc.lines().next(), Some("0"), "the card's nc failed: {rc}");
    let out = card.run("wc -c < /tmp/in; sha256sum /tmp/in", CMD);
    let size = out.lines().next().unwrap_or_default().trim().to_string();
    assert_eq!(
        size,
        TRANSFER.to_string(),
        "the card received {size} of {TRANSFER} bytes"
    );
    assert_eq!(
        sum_in(&out),
        host_sum,
        "the card received other bytes than the host sent"
    );
    println!(
        "host -> card: {} MiB in {took:.1?} ({:.1} MiB/s)",
        TRANSFER / MIB,
        (TRANSFER / MIB) as f64 / took.as_secs_f64()
    );
    card.run("rm /tmp/in /tmp/nc.rc /tmp/nc.err", CMD);
}

/// Everything a host side must carry: pings both ways, 16 MiB each way.
fn check_network(card: &mut Card, ns: &Netns) {
    let t = Instant::now();
    check_ping(card, ns);
    check_card_to_host(card, ns);
    check_host_to_card(card, ns);
    println!("network checks took {:.1?}", t.elapsed());
}

fn boot(net: Net) -> Card {
    let t = Instant::now();
    let card = Card::boot(CardOptions {
        net,
        expect: "console,net",
        ..Default::default()
    });
    println!("card online after {:.1?}", t.elapsed());
    card
}

/// Whether the card configured its network interface.
fn assert_card_net_up(card: &Card) {
    let serial = card.serial();
    assert!(
        serial.contains(&format!("net up eth0 {CARD_IP}/24")),
        "the card did not configure eth0:\n{}",
        tail(&serial, 30)
    );
}

#[test]
fn tap_network_carries_pings_and_data_both_ways() {
    let ns = Netns::new();
    let mut card = boot(Net::Tap {
        name: "mic0".into(),
        netns: ns.name().into(),
    });
    let _log = LogOnPanic("mic-net", card.path("mic-net.log"));
    assert_card_net_up(&card);
    // mic-net created the tap in the namespace with the host address.
    let addr = ns.must(&["ip", "-4", "addr", "show", "dev", "mic0"]);
    assert!(addr.contains(HOST_CIDR), "{addr}");
    check_network(&mut card, &ns);
}

#[test]
fn stream_network_carries_pings_and_data_both_ways() {
    let ns = Netns::new();
    let dir = TempDir::new("stream-peer");
    let relay = StreamRelay::start(&ns, "mic0", dir.join("peer.sock"));
    let mut card = boot(Net::Stream(relay.socket.clone()));
    let _log = LogOnPanic("mic-net", card.path("mic-net.log"));
    assert_card_net_up(&card);
    check_network(&mut card, &ns);
    assert!(
        relay.stats.peers.load(Ordering::Relaxed) >= 1,
        "{}",
        relay.stats()
    );
    println!("{}", relay.stats());
}

// ---------------------------------------------------------------------------
// Multiqueue: two queue pairs on a card with two CPUs (`docs/vop-abi.md`
// 5.7 and 5.8).

/// Bytes each of the card's two senders sends.
const MQ_TRANSFER: usize = 4 * MIB;

/// A listener in the host's namespace that returns the checksum of what
/// one connection sent.
fn sink(ns: &Netns) -> (u16, JoinHandle<io::Result<(usize, String)>>) {
    let listener = ns
        .run(|| TcpListener::bind((HOST_IP, 0)))
        .expect("listening in the host namespace");
    let port = listener.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        if !readable(listener.as_raw_fd(), TRANSFER_TIMEOUT) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
        }
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut data = Vec::with_capacity(MQ_TRANSFER);
        s.read_to_end(&mut data)?;
        Ok((data.len(), sha256(&data)))
    });
    (port, h)
}

/// The card's interrupt counts of its network device's queues that have a
/// vector of their own (`mic_x100_vop-vdevN-qM` in /proc/interrupts),
/// by queue.
fn queue_interrupts(card: &mut Card) -> Vec<(u32, u64)> {
    let dev = card.run("basename $(readlink /sys/class/net/eth0/device)", CMD);
    let index = dev.trim().trim_start_matches("virtio").to_string();
    let table = card.run("cat /proc/interrupts", CMD);
    let tag = format!("mic_x100_vop-vdev{index}-q");
    table
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().last()?;
            let q: u32 = name.strip_prefix(&tag)?.parse().ok()?;
            // "IRQ: count-per-CPU... chip hwirq-type name"
            let counts: u64 = l
                .split_whitespace()
                .skip(1)
                .map_while(|c| c.parse::<u64>().ok())
                .sum();
            Some((q, counts))
        })
        .collect()
}

/// Boots a card with two CPUs and `mic-net --num-queue-pairs 2`, sends
/// from each CPU at once, and returns the card and mic-net's stats.
fn multiqueue_card(ns: &Netns, stats: &std::path::Path, cmdline: &str) -> Card {
    let card = Card::boot(CardOptions {
        net: Net::Tap {
            name: "mic0".into(),
            netns: ns.name().into(),
        },
        net_args: vec![
            "--num-queue-pairs".into(),
            "2".into(),
            "--stats-socket".into(),
            stats.to_str().unwrap().into(),
        ],
        smp: 2,
        cmdline: cmdline.into(),
        expect: "console,net",
        ..Default::default()
    });
    assert_card_net_up(&card);
    card
}

/// Two transfers at once, one pinned to each of the card's CPUs; both
/// must arrive whole.
fn send_from_both_cpus(card: &mut Card, ns: &Netns) {
    let out = card.run(
        &format!(
            "dd if=/dev/urandom of=/tmp/a bs=1M count={n} 2>/dev/null; \
             dd if=/dev/urandom of=/tmp/b bs=1M count={n} 2>/dev/null; \
             sha256sum /tmp/a /tmp/b",
            n = MQ_TRANSFER / MIB
        ),
        CMD,
    );
    let sums: Vec<String> = out.lines().map(sum_in).collect();
    let (p0, h0) = sink(ns);
    let (p1, h1) = sink(ns);
    let (out, code) = card.run_status(
        &format!(
            "taskset 1 nc {HOST_IP} {p0} < /tmp/a & a=$!; \
             taskset 2 nc {HOST_IP} {p1} < /tmp/b & b=$!; \
             wait $a && wait $b"
        ),
        TRANSFER_TIMEOUT,
    );
    assert_eq!(code, 0, "the card's senders failed: {out}");
    for (h, sum) in [(h0, &sums[0]), (h1, &sums[1])] {
        let (len, got) = h.join().unwrap().expect("a transfer from the card");
        assert_eq!(len, MQ_TRANSFER);
        assert_eq!(
            &got, sum,
            "the host received other bytes than the card sent"
        );
    }
    card.run("rm /tmp/a /tmp/b", CMD);
}

#[test]
fn multiqueue_network_carries_traffic_on_every_pair_with_its_own_vectors() {
    let ns = Netns::new();
    let dir = TempDir::new("mq");
    let stats = dir.join("net-stats.sock");
    let mut card = multiqueue_card(&ns, &stats, "");
    let _log = LogOnPanic("mic-net", card.path("mic-net.log"));
    check_ping(&mut card, &ns);
    // The card's driver took both pairs through the control queue.
    let queues = card.run("ls /sys/class/net/eth0/queues | sort | tr '\\n' ' '", CMD);
    assert_eq!(queues.trim(), "rx-0 rx-1 tx-0 tx-1", "{queues}");

    send_from_both_cpus(&mut card, &ns);

    // Every queue of both pairs carried frames (mic-net's counters).
    let requests = mic_test_support::queue_requests(&mic_test_support::ask(&stats, "stats"));
    for name in ["rx0", "tx0", "rx1", "tx1"] {
        let n = requests
            .iter()
            .find(|(q, _)| q == name)
            .map_or(0, |(_, n)| *n);
        assert!(n > 0, "queue {name} carried nothing: {requests:?}");
    }
    // Each of the four queues has its own vector, and both receive queues'
    // vectors fired.
    let irqs = queue_interrupts(&mut card);
    let queues: Vec<u32> = irqs.iter().map(|(q, _)| *q).collect();
    assert_eq!(queues, vec![0, 1, 2, 3], "per-queue vectors: {irqs:?}");
    for rx in [0, 2] {
        assert!(
            irqs.iter().any(|&(q, n)| q == rx && n > 0),
            "receive queue {rx}'s vector never fired: {irqs:?}"
        );
    }
}

#[test]
fn multiqueue_network_shares_one_vector_when_the_card_asks() {
    let ns = Netns::new();
    let dir = TempDir::new("mq-shared");
    let stats = dir.join("net-stats.sock");
    let mut card = multiqueue_card(&ns, &stats, "mic_x100_vop.queue_vectors=0");
    let _log = LogOnPanic("mic-net", card.path("mic-net.log"));
    check_ping(&mut card, &ns);
    send_from_both_cpus(&mut card, &ns);
    assert!(
        queue_interrupts(&mut card).is_empty(),
        "the queues got vectors of their own"
    );
    let requests = mic_test_support::queue_requests(&mic_test_support::ask(&stats, "stats"));
    for name in ["rx1", "tx1"] {
        assert!(
            requests.iter().any(|(q, n)| q == name && *n > 0),
            "queue {name} carried nothing: {requests:?}"
        );
    }
}
