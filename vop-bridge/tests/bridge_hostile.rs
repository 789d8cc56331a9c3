//! The bridge against peers and a card that misbehave (`docs/architecture.md`,
//! "Bounded waits" and "Reattaching"): a backend that never answers, control
//! clients that trickle or never end their line, a stop signal while a peer
//! stalls, device-page pointers the card broke, a card flooding doorbells
//! and a card that puts two devices on one MSI-X vector. Each test runs the real
//! `vop-bridge` binary; the card is QEMU under qtest where one is needed.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mic_test_support::*;
use vop_bridge::abi::{self, reg};
use vop_bridge::control;

/// The bridge binary built with this test.
fn bridge_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("vop-bridge")
}

/// A running bridge, killed when dropped.
struct Bridge {
    child: Child,
    log: PathBuf,
}

impl Bridge {
    fn start(dir: &TempDir, args: &[&std::ffi::OsStr]) -> Bridge {
        let log = dir.join("bridge.log");
        let child = Command::new(bridge_bin())
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn vop-bridge");
        Bridge { child, log }
    }

    /// Starts a bridge on device socket `dev` with its control socket at
    /// `ctl.sock` in `dir`, and `more` arguments.
    fn with_control(dir: &TempDir, dev: &Path, more: &[&std::ffi::OsStr]) -> (Bridge, PathBuf) {
        let ctl = dir.join("ctl.sock");
        let mut args = vec![
            os("--device-socket"),
            dev.as_os_str(),
            os("--control-socket"),
            ctl.as_os_str(),
        ];
        args.extend_from_slice(more);
        (Bridge::start(dir, &args), ctl)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the bridge to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A vhost-user "backend" that accepts connections and never reads or
/// answers; it keeps them open until dropped.
struct SilentBackend {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::Mutex<Vec<UnixStream>>>,
}

impl SilentBackend {
    fn new(path: PathBuf) -> SilentBackend {
        let l = UnixListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok((c, _)) = l.accept() {
                    a.lock().unwrap().push(c);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        SilentBackend {
            path,
            stop,
            accepted,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

impl Drop for SilentBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// A bridge whose console backend accepts and never answers, once the
/// bridge has connected to it.
fn bridge_on_silent_backend(dir: &TempDir) -> (SilentBackend, Bridge) {
    let backend = SilentBackend::new(dir.join("console.sock"));
    let dev = dir.join("dev.sock");
    let b = Bridge::start(
        dir,
        &[
            os("--device-socket"),
            dev.as_os_str(),
            os("--console"),
            backend.path.as_os_str(),
            os("--connect-timeout"),
            os("60"),
        ],
    );
    wait_until(Duration::from_secs(10), "the bridge to connect", || {
        backend.connections() > 0
    });
    (backend, b)
}

#[test]
fn a_backend_that_never_answers_is_given_up_not_waited_for() {
    let dir = TempDir::new("silent-backend");
    let (_backend, mut b) = bridge_on_silent_backend(&dir);
    // The handshake's first reply never comes: the bridge gives the backend
    // its reply deadline (5 s), not for ever, and fails like for a backend
    // that is not there.
    let st = b.wait_exit(Duration::from_secs(15));
    let st = st.unwrap_or_else(|| panic!("the bridge still waits: {}", b.log()));
    assert!(!st.success(), "{st}");
}

#[test]
fn sigterm_while_a_backend_stalls_ends_the_bridge_within_a_second() {
    let dir = TempDir::new("sigterm-stall");
    let (_backend, mut b) = bridge_on_silent_backend(&dir);
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.running(), "{}", b.log());
    let sent = Instant::now();
    b.signal(libc::SIGTERM);
    let st = b.wait_exit(Duration::from_secs(5));
    let took = sent.elapsed();
    assert!(st.is_some(), "the bridge ignored SIGTERM: {}", b.log());
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
}

#[test]
fn sigterm_ends_a_waiting_bridge_within_a_second() {
    // No device socket yet, one backend that does not exist yet: the bridge
    // waits for both.
    let dir = TempDir::new("sigterm-wait");
    let dev = dir.join("dev.sock");
    let sock = dir.join("missing.sock");
    let mut b = Bridge::start(
        &dir,
        &[
            os("--device-socket"),
            dev.as_os_str(),
            os("--blk"),
            sock.as_os_str(),
            os("--connect-timeout"),
            os("60"),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(b.running(), "{}", b.log());
    let sent = Instant::now();
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(5)).is_some(), "{}", b.log());
    assert!(sent.elapsed() < Duration::from_secs(1));
}

/// A bridge with no devices and no device yet: only its control socket.
fn control_only_bridge(dir: &TempDir) -> (Bridge, PathBuf) {
    let dev = dir.join("dev.sock");
    let (b, ctl) = Bridge::with_control(dir, &dev, &[]);
    wait_until(Duration::from_secs(10), "the control socket", || {
        ctl.exists()
    });
    (b, ctl)
}

/// `status` answered within a second.
fn status_is_prompt(ctl: &Path) {
    let start = Instant::now();
    let answer = control::request(ctl, "status").unwrap();
    let took = start.elapsed();
    assert!(answer.starts_with("state="), "{answer}");
    assert!(took < Duration::from_secs(1), "status took {took:?}");
}

#[test]
fn a_trickling_control_client_does_not_hold_the_bridge() {
    let dir = TempDir::new("ctl-trickle");
    let (mut b, ctl) = control_only_bridge(&dir);
    status_is_prompt(&ctl);

    // One byte a second, never a newline.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let p = ctl.clone();
    let trickler = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&p).unwrap();
        let mut closed_after = None;
        let start = Instant::now();
        while !s.load(Ordering::Relaxed) {
            if c.write_all(b"s").is_err() {
                closed_after = Some(start.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(1000));
        }
        closed_after
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        status_is_prompt(&ctl);
        std::thread::sleep(Duration::from_millis(500));
    }
    // The trickler had its deadline (2 s) and was closed.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let closed_after = trickler.join().unwrap();
    assert!(
        closed_after.is_some_and(|t| t < Duration::from_secs(5)),
        "the trickling client was kept: {closed_after:?}"
    );
    assert!(b.running(), "{}", b.log());
}

#[test]
fn a_control_line_without_end_is_cut_off() {
    let dir = TempDir::new("ctl-long");
    let (mut b, ctl) = control_only_bridge(&dir);
    let p = ctl.clone();
    let writer = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&p).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let start = Instant::now();
        // 1 MiB, no newline: the bridge closes the connection long before.
        let r = c.write_all(&vec![b'x'; 1 << 20]);
        let mut rest = Vec::new();
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let eof = c.read_to_end(&mut rest).is_ok();
        (r.is_err(), eof, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    status_is_prompt(&ctl);
    let (write_failed, eof, took) = writer.join().unwrap();
    assert!(
        write_failed,
        "1 MiB without a newline was taken ({took:?}, eof {eof})"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    status_is_prompt(&ctl);
    assert!(b.running(), "{}", b.log());
}

/// The card points SPAD14/15 at `offset`; the bridge (no devices) attaches
/// and must publish a fresh page at `expect` instead of giving up.
fn broken_page_is_replaced(offset: u64, expect: u64) {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    q.writel(card.reg(reg::spad(abi::SPAD_DP_LO)), offset as u32);
    q.writel(card.reg(reg::spad(abi::SPAD_DP_HI)), (offset >> 32) as u32);
    let dir = TempDir::new("broken-page");
    let dev = q.device_socket();
    let (mut b, ctl) = Bridge::with_control(&dir, &dev, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lo = q.readl(card.reg(reg::spad(abi::SPAD_DP_LO)));
        let hi = q.readl(card.reg(reg::spad(abi::SPAD_DP_HI)));
        if u64::from(hi) << 32 | u64::from(lo) == expect {
            break;
        }
        assert!(
            b.running(),
            "the bridge gave up on the card's page: {}",
            b.log()
        );
        assert!(Instant::now() < deadline, "no fresh page: {}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until(Duration::from_secs(10), "the control socket", || {
        ctl.exists()
    });
    status_is_prompt(&ctl);
    assert!(b.running(), "{}", b.log());
    // A restarted bridge adopts the fresh page.
    drop(b);
    std::fs::remove_file(&ctl).unwrap();
    let (mut b, _) = control_only_bridge(&dir);
    status_is_prompt(&ctl);
    let lo = q.readl(card.reg(reg::spad(abi::SPAD_DP_LO)));
    assert_eq!(u64::from(lo), expect & 0xffff_ffff);
    assert!(b.running(), "{}", b.log());
}

#[test]
fn a_page_offset_that_wraps_is_replaced() {
    broken_page_is_replaced(u64::MAX - 7, abi::DP_DEFAULT_OFFSET);
}

#[test]
fn a_page_without_magic_is_replaced_at_another_offset() {
    // The aperture is zeroed: no magic at the usual offset.
    broken_page_is_replaced(
        abi::DP_DEFAULT_OFFSET,
        abi::DP_DEFAULT_OFFSET + abi::DP_SIZE as u64,
    );
}

/// A card under qtest, a real mic-console and the bridge serving both.
struct ResetRig {
    q: Qemu,
    card: PciCard,
    console: Child,
    bridge: Bridge,
    ctl: PathBuf,
    _dir: TempDir,
}

impl ResetRig {
    fn start() -> ResetRig {
        let mut q = Qemu::start_with(&QemuArgs {
            qmp: true,
            ..QemuArgs::default()
        });
        let card = PciCard::setup(&mut q);
        let dir = TempDir::new("stall-reset");
        let sock = dir.join("console.sock");
        let bin = bridge_bin().with_file_name("mic-console");
        let console = Command::new(bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--unix")
            .arg(dir.join("con.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("console.log")).unwrap())
            .spawn()
            .expect("spawn mic-console");
        wait_until(Duration::from_secs(10), "mic-console's socket", || {
            sock.exists()
        });
        let dev = q.device_socket();
        let (bridge, ctl) = Bridge::with_control(&dir, &dev, &[os("--console"), sock.as_os_str()]);
        let mut rig = ResetRig {
            q,
            card,
            console,
            bridge,
            ctl,
            _dir: dir,
        };
        rig.wait_published();
        rig
    }

    fn wait_published(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.q.readl(self.card.reg(reg::spad(abi::SPAD_DP_LO))) == 0 {
            assert!(self.bridge.running(), "{}", self.bridge.log());
            assert!(Instant::now() < deadline, "{}", self.bridge.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the backend (SIGSTOP: its sockets stay open, nothing answers)
    /// and resets the card, so the bridge reconnects to the stalled backend
    /// from its reset handler.
    fn stall_backend_and_reset(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.console.id() as libc::pid_t, libc::SIGSTOP) };
        assert_eq!(rc, 0);
        self.q.qmp().execute("system_reset");
        // The bridge is in its reset handler now, waiting on the backend.
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Drop for ResetRig {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.console.id() as libc::pid_t, libc::SIGCONT) };
        let _ = self.console.kill();
        let _ = self.console.wait();
    }
}

#[test]
fn a_backend_stalled_during_a_card_reset_does_not_hang_the_bridge() {
    let mut rig = ResetRig::start();
    status_is_prompt(&rig.ctl);
    rig.stall_backend_and_reset();
    // The reconnection gives up at its deadline and the loop answers again.
    let start = Instant::now();
    let answer = control::request(&rig.ctl, "status");
    let took = start.elapsed();
    assert!(
        answer.as_ref().is_ok_and(|a| a.starts_with("state=")),
        "{answer:?}: {}",
        rig.bridge.log()
    );
    assert!(took < Duration::from_secs(10), "status took {took:?}");
    status_is_prompt(&rig.ctl);
    assert!(rig.bridge.running(), "{}", rig.bridge.log());
}

#[test]
fn sigterm_during_a_stalled_card_reset_ends_the_bridge_within_a_second() {
    let mut rig = ResetRig::start();
    rig.stall_backend_and_reset();
    let sent = Instant::now();
    rig.bridge.signal(libc::SIGTERM);
    let st = rig.bridge.wait_exit(Duration::from_secs(5));
    let took = sent.elapsed();
    assert!(
        st.is_some(),
        "the bridge ignored SIGTERM: {}",
        rig.bridge.log()
    );
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
}

/// Lines of the bridge's log per doorbell for one condition: the doorbell
/// number follows `prefix` in each line.
fn lines_per_doorbell(log: &str, prefix: &str) -> std::collections::BTreeMap<u32, u32> {
    let mut counts = std::collections::BTreeMap::new();
    for line in log.lines() {
        if let Some((_, rest)) = line.split_once(prefix) {
            let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
            *counts.entry(n.parse().unwrap()).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn a_card_flooding_doorbells_gets_a_budget_of_log_lines() {
    use vop_bridge::log_limit::{BURST, WINDOW};
    let mut rig = ResetRig::start();
    status_is_prompt(&rig.ctl);
    // Every doorbell, many times, with a value that is neither a kick nor
    // control: unowned doorbells and the console's own one log a warning
    // each time, as far as the limiter lets them.
    let rounds = 40;
    let start = Instant::now();
    for _ in 0..rounds {
        for n in 0..abi::NUM_DOORBELLS {
            rig.q.writel(rig.card.reg(reg::doorbell(n)), 0x1234_5678);
        }
    }
    let took = start.elapsed();
    // The bridge has read everything once it answers after the flood.
    std::thread::sleep(Duration::from_millis(500));
    status_is_prompt(&rig.ctl);
    assert!(rig.bridge.running(), "{}", rig.bridge.log());
    // Windows the flood touched (one, unless the machine was very slow).
    let windows = 1 + (took.as_millis() / WINDOW.as_millis()) as u32;
    let log = rig.bridge.log();
    let unowned = lines_per_doorbell(&log, "card rang doorbell ");
    // Every doorbell but the console's was logged, none beyond its budget.
    assert_eq!(
        unowned.len() as u32,
        abi::NUM_DOORBELLS - 1,
        "{unowned:?}\n{log}"
    );
    for (db, n) in &unowned {
        assert!(
            (1..=BURST * windows).contains(n),
            "doorbell {db}: {n} lines for {rounds} rings over {took:?}"
        );
    }
    let reserved_lines = log
        .lines()
        .filter(|l| l.contains("reserved doorbell value"))
        .count() as u32;
    assert!(
        (1..=BURST * windows).contains(&reserved_lines),
        "{reserved_lines} reserved-value lines for {rounds} rings over {took:?}"
    );
}

/// One device slot of the page as a stand-in card driver sees it.
struct StandinSlot {
    /// Guest-physical address of the descriptor.
    desc: u64,
    layout: abi::DescLayout,
}

impl StandinSlot {
    fn ctrl(&self, field: u64) -> u64 {
        self.desc + self.layout.ctrl() as u64 + field
    }

    /// Guest-physical address of queue `q`'s ring, and its size.
    fn ring(&self, q: &mut Qemu, vq: usize) -> (u64, u16) {
        let vqc = self.desc + self.layout.vqconfig(vq) as u64;
        (BAR2_ADDR + q.readq(vqc), q.readw(vqc + 16))
    }

    /// The used index of queue `vq`.
    fn used_idx(&self, q: &mut Qemu, vq: usize) -> u16 {
        let (ring, num) = self.ring(q, vq);
        q.readw(ring + abi::vring_used_offset(num, abi::RING_ALIGN) + 2)
    }
}

// `mic_device_ctrl` fields (docs/vop-abi.md 5.2).
const CTRL_CONFIG_CHANGE: u64 = 8;
const CTRL_GUEST_ACK: u64 = 10;
const CTRL_C2H_DB: u64 = 13;
const CTRL_H2C_DB: u64 = 14;

/// Plays the card driver (docs/vop-abi.md 7.1, 7.2) for every device in the
/// published page, putting all of them on MSI-X `vector`: something our
/// driver never does, but a card may. Returns the slots once every device
/// runs.
fn start_devices_on_one_vector(q: &mut Qemu, card: &PciCard, vector: u8) -> Vec<StandinSlot> {
    use virtio_bindings::virtio_config::*;
    let lo = q.poll_readl(
        card.reg(reg::spad(abi::SPAD_DP_LO)),
        Duration::from_secs(15),
        |v| v != 0,
    );
    let page = BAR2_ADDR + u64::from(lo);
    assert_eq!(q.readl(page), abi::MIC_MAGIC);
    q.writeb(page + 4, abi::CONTROL_VECTOR as u8); // h2c_config_db
    let mut slots = Vec::new();
    let mut off = std::mem::size_of::<abi::BootParam>() as u64;
    while q.readb(page + off) != 0 {
        let layout = abi::DescLayout {
            num_vq: q.readb(page + off + 1),
            feature_len: q.readb(page + off + 2),
            config_len: q.readb(page + off + 3),
        };
        let s = StandinSlot {
            desc: page + off,
            layout,
        };
        q.writeb(s.ctrl(CTRL_H2C_DB), vector);
        off += layout.total_size() as u64;
        slots.push(s);
    }
    q.writel(card.reg(reg::SHUTDOWN_STATUS), 0);
    q.writel(card.reg(reg::CARD_STATE), 2);
    for s in &slots {
        let db = card.reg(reg::doorbell(u32::from(q.readb(s.ctrl(CTRL_C2H_DB)))));
        let status = s.desc + abi::DescLayout::STATUS as u64;
        // Accept VERSION_1 only (byte 4 of the bitmap holds bits 32-39).
        let host = q.readb(s.desc + s.layout.host_features() as u64 + 4);
        let acked = s.desc + s.layout.acked_features() as u64;
        q.writeb(acked + 4, host & (1 << (VIRTIO_F_VERSION_1 - 32)));
        for st in [
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
        ] {
            q.writeb(status, st as u8);
            q.writel(db, abi::DOORBELL_CONTROL);
        }
    }
    slots
}

/// Posts `count` device-writable buffers of 256 bytes at `buf` on queue `vq`
/// and kicks it.
fn post_rx(q: &mut Qemu, card: &PciCard, s: &StandinSlot, vq: usize, buf: u64, count: u16) {
    let (ring, num) = s.ring(q, vq);
    let avail = ring + 16 * u64::from(num);
    for i in 0..count {
        let d = ring + 16 * u64::from(i);
        q.writeq(d, buf + 256 * u64::from(i));
        q.writel(d + 8, 256);
        q.writew(
            d + 12,
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
        );
        q.writew(d + 14, 0);
        q.writew(avail + 4 + 2 * u64::from(i), i);
    }
    q.writew(avail + 2, count);
    let db = u32::from(q.readb(s.ctrl(CTRL_C2H_DB)));
    q.writel(card.reg(reg::doorbell(db)), vq as u32);
}

/// A mic-console serving a console socket, with its host side on `unix`.
fn console_backend(dir: &TempDir, name: &str) -> (Child, PathBuf, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let unix = dir.join(format!("{name}-host.sock"));
    let child = Command::new(bridge_bin().with_file_name("mic-console"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--unix")
        .arg(&unix)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("spawn mic-console");
    wait_until(Duration::from_secs(10), "mic-console's socket", || {
        sock.exists() && unix.exists()
    });
    (child, sock, unix)
}

/// Waits until `vector` fired (its MSI-X message reached the sink).
fn fired(q: &mut Qemu, card: &PciCard, vector: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if card.take_fired(q).contains(&vector) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn removing_one_device_keeps_the_interrupts_of_another_on_its_vector() {
    const VECTOR: u8 = 5;
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    card.enable_msix(&mut q);
    let dir = TempDir::new("shared-vector");
    let (mut con_a, sock_a, host_a) = console_backend(&dir, "a");
    let (mut con_b, sock_b, host_b) = console_backend(&dir, "b");
    let dev = q.device_socket();
    let (mut b, ctl) = Bridge::with_control(
        &dir,
        &dev,
        &[
            os("--console"),
            sock_a.as_os_str(),
            os("--console"),
            sock_b.as_os_str(),
        ],
    );
    let slots = start_devices_on_one_vector(&mut q, &card, VECTOR);
    assert_eq!(slots.len(), 2, "{}", b.log());
    wait_until(Duration::from_secs(15), "both devices running", || {
        control::request(&ctl, "devices")
            .is_ok_and(|d| d.lines().filter(|l| l.contains(" running ")).count() == 2)
    });
    // Receive buffers: one on console A, two on console B.
    post_rx(&mut q, &card, &slots[0], 0, 0x20_0000, 1);
    post_rx(&mut q, &card, &slots[1], 0, 0x21_0000, 2);
    let mut a_in = UnixStream::connect(&host_a).unwrap();
    let mut b_in = UnixStream::connect(&host_b).unwrap();
    let _ = card.take_fired(&mut q);

    // Both devices interrupt on the shared vector.
    a_in.write_all(b"to-a").unwrap();
    assert!(
        fired(&mut q, &card, VECTOR.into(), Duration::from_secs(10)),
        "{}",
        b.log()
    );
    assert_eq!(slots[0].used_idx(&mut q, 0), 1);
    assert_eq!(q.read(0x20_0000, 4), b"to-a");
    b_in.write_all(b"to-b1").unwrap();
    assert!(
        fired(&mut q, &card, VECTOR.into(), Duration::from_secs(10)),
        "{}",
        b.log()
    );
    assert_eq!(slots[1].used_idx(&mut q, 0), 1);

    // Hot removal of A (docs/vop-abi.md 7.5): the card gives back its
    // vector use and acknowledges; the bridge unwires A.
    let answer = control::request(&ctl, "remove 0").unwrap();
    assert_eq!(answer, "removing device 0");
    wait_until(Duration::from_secs(10), "the removal request", || {
        q.readb(slots[0].ctrl(CTRL_CONFIG_CHANGE)) == abi::CONFIG_CHANGE_REMOVE
    });
    q.writeb(slots[0].ctrl(CTRL_H2C_DB), 0xff);
    q.writeb(slots[0].ctrl(CTRL_GUEST_ACK), 1);
    wait_until(Duration::from_secs(20), "device 0 removed", || {
        q.readb(slots[0].desc) == abi::TYPE_REMOVED as u8
    });
    let _ = card.take_fired(&mut q);

    // B's data still comes with its interrupt.
    b_in.write_all(b"to-b2").unwrap();
    wait_until(Duration::from_secs(10), "B's second buffer used", || {
        slots[1].used_idx(&mut q, 0) == 2
    });
    assert_eq!(q.read(0x21_0100, 5), b"to-b2");
    assert!(
        fired(&mut q, &card, VECTOR.into(), Duration::from_secs(5)),
        "device B's interrupt was lost with device A's removal: {}",
        b.log()
    );
    assert!(b.running());
    for c in [&mut con_a, &mut con_b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}
