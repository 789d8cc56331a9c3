//! Integration tests: the real `mic-console` binary driven over its
//! vhost-user socket by the test frontend of `mic-test-support`.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mic_test_support::{Daemon, Desc, FrontendOptions, TempDir, TestFrontend, VirtQueue};

const BIN: &str = env!("CARGO_BIN_EXE_mic-console");
const T: Duration = Duration::from_secs(5);
const F_SIZE: u64 = 1;
const F_MULTIPORT: u64 = 2;

fn connect(sock: &Path, features: u64, queues: usize) -> TestFrontend {
    TestFrontend::connect_with(
        sock,
        FrontendOptions {
            num_queues: queues,
            queue_size: 64,
            features,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Card output: writes `data` on the transmit queue.
fn card_write(fe: &mut TestFrontend, q: usize, data: &[u8]) {
    let q = &mut fe.queues[q];
    let a = q.mem().alloc(data.len() as u64, 8).unwrap();
    q.mem().write(a, data).unwrap();
    let h = q.add_chain(&[Desc::out(a, data.len() as u32)]).unwrap();
    q.kick().unwrap();
    q.wait_for(h, T).unwrap();
}

/// Card input: posts one receive buffer per call and collects `len` bytes.
fn card_read(fe: &mut TestFrontend, q: usize, len: usize) -> Vec<u8> {
    let q = &mut fe.queues[q];
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while got.len() < len {
        assert!(Instant::now() < deadline, "card input timed out: {got:?}");
        let a = q.mem().alloc(256, 8).unwrap();
        let h = q.add_chain(&[Desc::inp(a, 256)]).unwrap();
        q.kick().unwrap();
        for u in q.wait_for(h, T).unwrap() {
            assert_eq!(u.id, h);
            got.extend(q.mem().read(a, u.len as usize).unwrap());
        }
    }
    got
}

fn read_exactly<R: Read>(r: &mut R, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).unwrap();
    b
}

fn unix_daemon(dir: &TempDir, extra: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let sock = dir.path().join("con.sock");
    let csock = dir.path().join("console");
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--unix",
        csock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let d = Daemon::spawn(Path::new(BIN), &args, &sock).unwrap();
    (d, sock, csock)
}

fn attach(csock: &Path) -> UnixStream {
    let c = UnixStream::connect(csock).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c
}

#[test]
fn unix_socket_both_ways_reattach_and_log() {
    let dir = TempDir::new("console-test");
    let log = dir.path().join("console.log");
    let (mut d, sock, csock) = unix_daemon(&dir, &["--log", log.to_str().unwrap()]);
    // X100 mode: two queues, no features.
    let mut fe = connect(&sock, 0, 2);
    assert_eq!(fe.acked_features, 0);
    let mut c = attach(&csock);
    // Give the daemon a moment to register the client: probe with output
    // until it arrives.
    let deadline = Instant::now() + T;
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    loop {
        card_write(&mut fe, 1, b"#");
        let mut b = [0u8; 1];
        if c.read_exact(&mut b).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "client never attached");
    }
    c.set_read_timeout(Some(T)).unwrap();
    card_write(&mut fe, 1, b"Linux version 2.6.38 (mic)\r\n");
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.trim_start_matches('#').starts_with("Linux version"),
        "{line:?}"
    );
    c.write_all(b"root\n").unwrap();
    assert_eq!(card_read(&mut fe, 0, 5), b"root\n");

    // Detach, output while detached is dropped, reattach works.
    drop(r);
    drop(c);
    card_write(&mut fe, 1, b"lost\n");
    let mut c = attach(&csock);
    c.write_all(b"again").unwrap();
    assert_eq!(card_read(&mut fe, 0, 5), b"again");
    card_write(&mut fe, 1, b"hello");
    assert_eq!(read_exactly(&mut c, 5), b"hello");
    assert!(d.alive());

    // The log has everything the card wrote, detached or not.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("Linux version 2.6.38 (mic)\r\n"), "{text:?}");
    assert!(text.contains("lost\n"));
    assert!(text.ends_with("hello"));
}

#[test]
fn pty_both_ways_and_size() {
    let dir = TempDir::new("console-test");
    let sock = dir.path().join("con.sock");
    let mut child = Command::new(BIN)
        .args(["--socket-path", sock.to_str().unwrap(), "--pty"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pts = line
        .trim()
        .strip_prefix("mic-console: console on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(pts.starts_with("/dev/pts/"), "{pts}");
    let mut d = Daemon {
        child,
        socket: sock.clone(),
    };
    d.wait_ready(T).unwrap();

    let mut tty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&pts)
        .unwrap();
    // Set a terminal size on the pty; the device reports it.
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    use std::os::unix::io::AsRawFd;
    // SAFETY: valid winsize on a tty fd.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);

    let mut fe = connect(&sock, u64::MAX, 4);
    assert_ne!(fe.acked_features & F_SIZE, 0);
    let cfg = fe.get_config(0, 8).unwrap();
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 132);
    assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 40);
    assert_eq!(u32::from_le_bytes([cfg[4], cfg[5], cfg[6], cfg[7]]), 1);

    card_write(&mut fe, 1, b"login: ");
    assert_eq!(read_exactly(&mut tty, 7), b"login: ");
    tty.write_all(b"micuser\r").unwrap();
    // Raw mode: no line discipline translation, bytes arrive as written.
    assert_eq!(card_read(&mut fe, 0, 8), b"micuser\r");

    // Multiport handshake reports the size, and later changes of it.
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 0, 1));
    assert_eq!(ctrl_recv(&mut fe.queues[2], 1)[0].1, 1);
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 3, 1));
    let m = ctrl_recv(&mut fe.queues[2], 3);
    assert_eq!(m[0].1, 4, "CONSOLE_PORT: {m:?}");
    assert_eq!(m[1].1, 5, "RESIZE: {m:?}");
    assert_eq!(
        m[1].3,
        [40u16.to_le_bytes(), 132u16.to_le_bytes()].concat(),
        "rows, cols"
    );
    assert_eq!(m[2].1, 6, "PORT_OPEN: {m:?}");
    let ws = libc::winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid winsize on a tty fd.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    let m = ctrl_recv(&mut fe.queues[2], 1);
    assert_eq!(m[0].1, 5, "RESIZE after the change: {m:?}");
    assert_eq!(m[0].3, [30u16.to_le_bytes(), 100u16.to_le_bytes()].concat());
}

/// Spawns `mic-console --pty` with `extra` options; returns the daemon and
/// the pty's slave, opened without becoming the controlling terminal.
fn pty_daemon(dir: &TempDir, extra: &[&str]) -> (Daemon, std::fs::File) {
    let sock = dir.path().join("con.sock");
    let mut child = Command::new(BIN)
        .args(["--socket-path", sock.to_str().unwrap(), "--pty"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pts = line
        .trim()
        .strip_prefix("mic-console: console on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let mut d = Daemon {
        child,
        socket: sock,
    };
    d.wait_ready(T).unwrap();
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&pts)
        .unwrap();
    (d, tty)
}

fn set_size(tty: &std::fs::File, rows: u16, cols: u16) {
    use std::os::unix::io::AsRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid winsize on a tty fd.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
}

/// (cols, rows) from the device's config space.
fn config_size(fe: &mut TestFrontend) -> (u16, u16) {
    let cfg = fe.get_config(0, 4).unwrap();
    (
        u16::from_le_bytes([cfg[0], cfg[1]]),
        u16::from_le_bytes([cfg[2], cfg[3]]),
    )
}

#[test]
fn two_queue_resize_is_announced_as_a_config_change() {
    let dir = TempDir::new("console-test");
    // A new pty has no size yet: config space says 80x25.
    let (d, mut tty) = pty_daemon(&dir, &["--no-multiport"]);
    let mut fe = TestFrontend::connect_with(
        &d.socket,
        FrontendOptions {
            num_queues: 2,
            queue_size: 64,
            backend_requests: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(fe.acked_features & F_SIZE, 0);
    assert_eq!(fe.acked_features & F_MULTIPORT, 0);
    assert!(fe
        .protocol_features
        .contains(mic_test_support::vhost::vhost_user::VhostUserProtocolFeatures::BACKEND_REQ));
    assert_eq!(config_size(&mut fe), (80, 25));

    // No change, no notification.
    let mut req = fe.backend_requests.take().expect("backend request channel");
    assert_eq!(req.poll(Duration::from_millis(1200)).unwrap(), 0);

    set_size(&tty, 30, 100);
    assert_eq!(req.wait_config_change(0, T).unwrap(), 1);
    assert_eq!(config_size(&mut fe), (100, 30));

    // A second change is announced as well, exactly once.
    set_size(&tty, 50, 120);
    assert_eq!(req.wait_config_change(1, T).unwrap(), 2);
    assert_eq!(config_size(&mut fe), (120, 50));
    assert_eq!(req.poll(Duration::from_millis(1200)).unwrap(), 0);
    assert_eq!(req.config_changes(), 2);

    // The console still carries bytes both ways.
    card_write(&mut fe, 1, b"ok\r\n");
    assert_eq!(read_exactly(&mut tty, 4), b"ok\r\n");
    tty.write_all(b"x").unwrap();
    assert_eq!(card_read(&mut fe, 0, 1), b"x");
}

#[test]
fn multiport_resize_uses_the_control_queue_only() {
    let dir = TempDir::new("console-test");
    let (d, tty) = pty_daemon(&dir, &[]);
    set_size(&tty, 40, 132);
    let mut fe = TestFrontend::connect_with(
        &d.socket,
        FrontendOptions {
            num_queues: 4,
            queue_size: 64,
            backend_requests: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(config_size(&mut fe), (132, 40));
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 0, 1));
    assert_eq!(ctrl_recv(&mut fe.queues[2], 1)[0].1, 1);
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 3, 1));
    assert_eq!(ctrl_recv(&mut fe.queues[2], 3).len(), 3);
    set_size(&tty, 30, 100);
    let m = ctrl_recv(&mut fe.queues[2], 1);
    assert_eq!(m[0].1, 5, "RESIZE after the change: {m:?}");
    let req = fe
        .backend_requests
        .as_mut()
        .expect("backend request channel");
    assert_eq!(req.poll(Duration::from_millis(800)).unwrap(), 0);
}

fn ctrl_msg(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

/// Reads control messages from the control receive queue until `n` arrived.
fn ctrl_recv(q: &mut VirtQueue, n: usize) -> Vec<(u32, u16, u16, Vec<u8>)> {
    let mut bufs = Vec::new();
    for _ in 0..n {
        let a = q.mem().alloc(64, 8).unwrap();
        bufs.push((q.add_chain(&[Desc::inp(a, 64)]).unwrap(), a));
    }
    q.kick().unwrap();
    let mut msgs = Vec::new();
    let deadline = Instant::now() + T;
    while msgs.len() < n {
        assert!(Instant::now() < deadline, "control messages: got {msgs:?}");
        for u in q.wait_used(T).unwrap() {
            let a = bufs.iter().find(|b| b.0 == u.id).unwrap().1;
            let m = q.mem().read(a, u.len as usize).unwrap();
            let id = u32::from_le_bytes(m[0..4].try_into().unwrap());
            let ev = u16::from_le_bytes(m[4..6].try_into().unwrap());
            let val = u16::from_le_bytes(m[6..8].try_into().unwrap());
            msgs.push((id, ev, val, m[8..].to_vec()));
        }
    }
    msgs
}

fn ctrl_send(q: &mut VirtQueue, m: &[u8]) {
    let a = q.mem().alloc(m.len() as u64, 8).unwrap();
    q.mem().write(a, m).unwrap();
    let h = q.add_chain(&[Desc::out(a, m.len() as u32)]).unwrap();
    q.kick().unwrap();
    q.wait_for(h, T).unwrap();
}

#[test]
fn multiport_control_handshake() {
    let dir = TempDir::new("console-test");
    let (_d, sock, csock) = unix_daemon(&dir, &[]);
    let mut fe = connect(&sock, u64::MAX, 4);
    assert_ne!(fe.acked_features & F_MULTIPORT, 0);
    assert_eq!(fe.acked_features & F_SIZE, 0, "a socket has no size");
    assert_eq!(fe.queue_num().unwrap(), 4);
    let cfg = fe.get_config(4, 4).unwrap();
    assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 1);

    // Malformed control chains are dropped.
    let q = &mut fe.queues[3];
    let h = q
        .add_chain(&[Desc::out(mic_test_support::outside(&fe.mem), 8)])
        .unwrap();
    q.kick().unwrap();
    q.wait_for(h, T).unwrap();

    // DEVICE_READY -> PORT_ADD (DEVICE_ADD) for port 0.
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 0, 1));
    let m = ctrl_recv(&mut fe.queues[2], 1);
    assert_eq!((m[0].0, m[0].1), (0, 1), "{m:?}");
    // PORT_READY -> CONSOLE_PORT, PORT_OPEN.
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 3, 1));
    let m = ctrl_recv(&mut fe.queues[2], 2);
    assert_eq!((m[0].0, m[0].1, m[0].2), (0, 4, 1), "{m:?}");
    assert_eq!((m[1].0, m[1].1, m[1].2), (0, 6, 1), "{m:?}");
    // Guest opens the port.
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 6, 1));

    // Data on port 0.
    let mut c = attach(&csock);
    c.write_all(b"ls\n").unwrap();
    assert_eq!(card_read(&mut fe, 0, 3), b"ls\n");
    let deadline = Instant::now() + T;
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    loop {
        card_write(&mut fe, 1, b"x");
        let mut b = [0u8; 1];
        if c.read_exact(&mut b).is_ok() {
            assert_eq!(&b, b"x");
            break;
        }
        assert!(Instant::now() < deadline);
    }
}

#[test]
fn reconnect_garbage_and_malformed_chains() {
    let dir = TempDir::new("console-test");
    let (mut d, sock, csock) = unix_daemon(&dir, &[]);
    {
        let mut fe = connect(&sock, u64::MAX, 4);
        // Malformed TX chains: outside memory, wrong direction.
        let out = mic_test_support::outside(&fe.mem);
        let q = &mut fe.queues[1];
        let a = q.mem().alloc(64, 8).unwrap();
        let h1 = q.add_chain(&[Desc::out(out, 16)]).unwrap();
        let h2 = q.add_chain(&[Desc::inp(a, 16)]).unwrap();
        q.kick().unwrap();
        let mut left = vec![h1, h2];
        while !left.is_empty() {
            for u in q.wait_used(T).unwrap() {
                left.retain(|h| *h != u.id);
            }
        }
        // Malformed RX chain (device-readable) comes back empty.
        let mut c = attach(&csock);
        let q = &mut fe.queues[0];
        let a = q.mem().alloc(64, 8).unwrap();
        let h = q.add_chain(&[Desc::out(a, 64)]).unwrap();
        q.kick().unwrap();
        c.write_all(b"z").unwrap();
        let u = q.wait_for(h, T).unwrap();
        assert!(u.iter().any(|u| u.id == h && u.len == 0));
        assert_eq!(card_read(&mut fe, 0, 1), b"z");
    }
    for g in [
        &[0xffu8; 40][..],
        b"\x01\x00\x00\x00\x01\x00\x00\x00\xf0\xff\xff\xff",
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(g);
    }
    assert!(d.alive());
    // A new frontend (X100 style this time) works.
    let mut fe = connect(&sock, 0, 2);
    let mut c = attach(&csock);
    c.write_all(b"after").unwrap();
    assert_eq!(card_read(&mut fe, 0, 5), b"after");
    assert!(d.alive());
}

#[test]
fn stdio_mode() {
    let dir = TempDir::new("console-test");
    let sock = dir.path().join("con.sock");
    let mut child = Command::new(BIN)
        .args(["--socket-path", sock.to_str().unwrap(), "--stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut d = Daemon {
        child,
        socket: sock.clone(),
    };
    d.wait_ready(T).unwrap();
    let mut fe = connect(&sock, 0, 2);
    card_write(&mut fe, 1, b"to stdout");
    assert_eq!(read_exactly(&mut stdout, 9), b"to stdout");
    stdin.write_all(b"from stdin").unwrap();
    assert_eq!(card_read(&mut fe, 0, 10), b"from stdin");
    let st = d.signal_and_wait(libc::SIGTERM, T).unwrap();
    assert!(st.success(), "{st}");
    assert!(!sock.exists());
}

#[test]
fn bad_arguments_fail_before_the_socket() {
    let dir = TempDir::new("console-test");
    let sock = dir.path().join("con.sock");
    let s = sock.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--socket-path", s],
        vec!["--socket-path", s, "--pty", "--stdio"],
        vec!["--socket-path", s, "--pty", "--queue-size", "7"],
        vec!["--socket-path", s, "--unix", "/nonexistent/dir/c"],
        vec!["--socket-path", s, "--pty", "--log", "/nonexistent/dir/log"],
        vec!["--socket-path", s, "--bogus"],
    ];
    for args in cases {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<_> = err.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "one error line for {args:?}: {err}");
        assert!(lines[0].starts_with("mic-console: error: "), "{err}");
        assert!(!sock.exists());
    }
}

fn lflag(fd: i32) -> libc::tcflag_t {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    t.c_lflag
}

/// stdio on a terminal: raw mode while running, Ctrl-] quits, the terminal
/// mode is restored on exit.
#[test]
fn stdio_terminal_raw_mode_and_escape() {
    use std::os::unix::io::{AsRawFd, FromRawFd};
    let dir = TempDir::new("console-test");
    let sock = dir.path().join("con.sock");
    // SAFETY: plain pty allocation; results checked.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(master >= 0);
    // SAFETY: valid master fd.
    unsafe {
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
    }
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: buffer valid for its length.
    let rc = unsafe { libc::ptsname_r(master, name.as_mut_ptr(), name.len()) };
    assert_eq!(rc, 0);
    // SAFETY: NUL-terminated by ptsname_r.
    let pts = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&pts)
        .unwrap();
    // SAFETY: master is a valid fd owned from here on.
    let mut master = unsafe { std::fs::File::from_raw_fd(master) };
    assert_ne!(lflag(slave.as_raw_fd()) & libc::ICANON, 0);
    let child = Command::new(BIN)
        .args(["--socket-path", sock.to_str().unwrap(), "--stdio"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        socket: sock.clone(),
    };
    d.wait_ready(T).unwrap();
    assert_eq!(
        lflag(slave.as_raw_fd()) & libc::ICANON,
        0,
        "raw while running"
    );
    let mut fe = connect(&sock, 0, 2);
    master.write_all(b"typed").unwrap();
    assert_eq!(card_read(&mut fe, 0, 5), b"typed");
    master.write_all(&[0x1d]).unwrap();
    let st = mic_test_support::wait_exit(&mut d.child, T).unwrap();
    assert!(st.success(), "{st}");
    assert_ne!(
        lflag(slave.as_raw_fd()) & libc::ICANON,
        0,
        "terminal mode restored"
    );
    assert!(!sock.exists());
}

/// CPU ticks the daemon uses in one second.
fn ticks_in_one_second(d: &Daemon) -> u64 {
    mic_test_support::ticks_in_one_second(d.child.id())
}

/// Attaches a client and waits until card output reaches it.
fn attach_and_sync(fe: &mut TestFrontend, csock: &Path) -> UnixStream {
    let mut c = attach(csock);
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        card_write(fe, 1, b"#");
        let mut b = [0u8; 1];
        if c.read_exact(&mut b).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "client never attached");
    }
    c.set_read_timeout(Some(T)).unwrap();
    c
}

#[test]
fn broken_transmit_and_control_rings_do_not_spin() {
    let dir = TempDir::new("console-test");
    let (mut d, sock, csock) = unix_daemon(&dir, &[]);
    let mut fe = connect(&sock, u64::MAX, 4);
    assert_ne!(fe.acked_features & F_MULTIPORT, 0);
    // DEVICE_READY: the device now has a message for the control
    // receiveq, which has no buffers yet.
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 0, 1));
    for q in [2, 1, 3] {
        fe.queues[q].corrupt_avail_idx(30000);
        fe.queues[q].kick_always().unwrap();
    }
    let used = ticks_in_one_second(&d);
    assert!(
        used < mic_test_support::IDLE_TICKS,
        "daemon burnt {used} ticks in 1 s"
    );
    // The receiveq is still served.
    let mut c = attach(&csock);
    c.write_all(b"still").unwrap();
    assert_eq!(card_read(&mut fe, 0, 5), b"still");
    drop(c);
    drop(fe);
    // A new frontend gets every queue back.
    let mut fe = connect(&sock, u64::MAX, 4);
    ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 0, 1));
    let m = ctrl_recv(&mut fe.queues[2], 1);
    assert_eq!((m[0].0, m[0].1), (0, 1), "{m:?}");
    let mut c = attach_and_sync(&mut fe, &csock);
    card_write(&mut fe, 1, b"back");
    assert_eq!(read_exactly(&mut c, 4), b"back");
    assert!(d.alive());
}

#[test]
fn broken_receive_ring_does_not_spin() {
    let dir = TempDir::new("console-test");
    let (mut d, sock, csock) = unix_daemon(&dir, &[]);
    let mut fe = connect(&sock, 0, 2);
    let mut c = attach_and_sync(&mut fe, &csock);
    fe.queues[0].corrupt_avail_idx(30000);
    fe.queues[0].kick_always().unwrap();
    // Host input makes the worker look at the broken ring.
    c.write_all(b"abc").unwrap();
    let used = ticks_in_one_second(&d);
    assert!(
        used < mic_test_support::IDLE_TICKS,
        "daemon burnt {used} ticks in 1 s"
    );
    // The transmitq is still served.
    card_write(&mut fe, 1, b"out");
    assert_eq!(read_exactly(&mut c, 3), b"out");
    drop(fe);
    // A new frontend gets the input that waited, then new input.
    let mut fe = connect(&sock, 0, 2);
    c.write_all(b"after").unwrap();
    assert_eq!(card_read(&mut fe, 0, 8), b"abcafter");
    assert!(d.alive());
}

/// SIGTERM ends the daemon within a second whatever state a peer left it
/// in: a vhost-user peer stalled at any point (`mic_test_support::STALLED_PEERS`),
/// or a frontend whose rings are all broken with a console client attached.
#[test]
fn sigterm_ends_the_daemon_within_a_second_in_any_state() {
    for (what, prelude) in mic_test_support::STALLED_PEERS {
        let dir = TempDir::new("console-test");
        let (mut d, sock, _) = unix_daemon(&dir, &[]);
        let st = mic_test_support::sigterm_with_stalled_peer(&mut d, prelude)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(st.success(), "{what}: exit status {st}");
        assert!(!sock.exists(), "{what}");
    }
    let dir = TempDir::new("console-test");
    let (mut d, sock, csock) = unix_daemon(&dir, &[]);
    let mut fe = connect(&sock, u64::MAX, 4);
    let _c = attach_and_sync(&mut fe, &csock);
    for q in 0..4 {
        fe.queues[q].corrupt_avail_idx(30000);
        fe.queues[q].kick_always().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let st = d
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(1))
        .unwrap();
    assert!(st.success(), "exit status {st}");
    assert!(!sock.exists());
}

/// Card output in chains longer than the 64 KiB the daemon copies at once
/// is passed on whole, in order (it is split into pieces, not dropped).
#[test]
fn long_transmit_chains_are_passed_on_whole() {
    let dir = TempDir::new("console-test");
    let log = dir.path().join("console.log");
    let (mut d, sock, _) = unix_daemon(&dir, &["--log", log.to_str().unwrap()]);
    let mut fe = connect(&sock, 0, 2);
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let q = &mut fe.queues[1];
    let a = q.mem().alloc(data.len() as u64, 8).unwrap();
    q.mem().write(a, &data).unwrap();
    // Three descriptors of 50000 bytes: 150000 bytes in one chain.
    let descs: Vec<Desc> = (0..3).map(|i| Desc::out(a + i * 50_000, 50_000)).collect();
    let h = q.add_chain(&descs).unwrap();
    q.kick().unwrap();
    q.wait_for(h, T).unwrap();
    card_write(&mut fe, 1, b"end");
    let mut want = data.clone();
    want.extend_from_slice(b"end");
    assert!(std::fs::read(&log).unwrap() == want, "log differs");
    assert!(d.alive());
}

/// With `--log-max-size`, the log is rotated to one `.1` file: neither file
/// exceeds the limit, and together they end with the latest output.
#[test]
fn log_is_rotated_at_its_maximum_size() {
    let dir = TempDir::new("console-test");
    let log = dir.path().join("console.log");
    let old = dir.path().join("console.log.1");
    let (mut d, sock, _) = unix_daemon(
        &dir,
        &["--log", log.to_str().unwrap(), "--log-max-size", "64K"],
    );
    let mut fe = connect(&sock, 0, 2);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    for part in data.chunks(10_000) {
        card_write(&mut fe, 1, part);
    }
    let new = std::fs::read(&log).unwrap();
    let prev = std::fs::read(&old).unwrap();
    assert!(new.len() <= 64 << 10, "log has {} bytes", new.len());
    assert_eq!(prev.len(), 64 << 10, "rotated log");
    let mut both = prev;
    both.extend_from_slice(&new);
    assert!(data.ends_with(&both), "the logs hold the latest output");
    assert!(d.alive());
}

/// A card that repeats control messages (a ready device, a failed driver)
/// leaves a bounded number of log lines, and the replies waiting for
/// control receive buffers stay bounded (32) however many it asks for.
#[test]
fn repeated_control_messages_are_bounded_in_log_and_memory() {
    let dir = TempDir::new("console-test");
    let sock = dir.path().join("con.sock");
    let csock = dir.path().join("console");
    let stderr = dir.path().join("stderr.log");
    let args = [
        "--socket-path",
        sock.to_str().unwrap(),
        "--unix",
        csock.to_str().unwrap(),
    ];
    let _d = Daemon::spawn_logged(Path::new(BIN), &args, &sock, &stderr).unwrap();
    let mut fe = connect(&sock, u64::MAX, 4);
    let before = mic_test_support::log_lines(&stderr).unwrap();
    for _ in 0..100 {
        // DEVICE_READY, ready: the device answers DEVICE_ADD each time.
        ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 0, 1));
        // DEVICE_READY, failed: the daemon notes the driver failed.
        ctrl_send(&mut fe.queues[3], &ctrl_msg(0, 0, 0));
    }
    let lines = mic_test_support::log_lines(&stderr).unwrap() - before;
    assert!(
        (1..=10).contains(&lines),
        "{lines} log lines:\n{}",
        std::fs::read_to_string(&stderr).unwrap()
    );
    // Only the first 32 answers waited for buffers.
    let q = &mut fe.queues[2];
    for _ in 0..60 {
        let a = q.mem().alloc(64, 8).unwrap();
        q.add_chain(&[Desc::inp(a, 64)]).unwrap();
    }
    q.kick().unwrap();
    let mut got = 0;
    while let Ok(used) = q.wait_used(Duration::from_millis(500)) {
        got += used.len();
    }
    assert_eq!(got, 32);
}

/// `--print-capabilities` against QEMU's vhost-user.json: type `console`,
/// which has no features (so no `features` member), other options ignored.
#[test]
fn capabilities_follow_the_schema() {
    use mic_test_support::conventions::{check_capabilities, print_capabilities};
    let caps = check_capabilities(&print_capabilities(Path::new(BIN), &[])).unwrap();
    assert_eq!(caps.kind, "console");
    assert!(caps.features.is_empty());
    let again = print_capabilities(Path::new(BIN), &["--pty", "--stdio", "--bogus"]);
    assert_eq!(check_capabilities(&again).unwrap(), caps);
}

/// Served through `--fd`: a listening socket the test bound and passed as
/// descriptor 6; bytes both ways and the log.
#[test]
fn served_through_an_inherited_socket() {
    use mic_test_support::conventions::spawn_with_fd;
    let dir = TempDir::new("console-fd");
    let sock = dir.join("con.sock");
    let csock = dir.join("console");
    let log = dir.join("console.log");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let args = [
        "--unix",
        csock.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ];
    let mut d = spawn_with_fd(Path::new(BIN), &args, &listener, 6, &dir.join("stderr"));
    let mut fe = connect(&sock, 0, 2);
    card_write(&mut fe, 1, b"from the card");
    let mut c = attach(&csock);
    c.write_all(b"to the card").unwrap();
    assert_eq!(card_read(&mut fe, 0, 11), b"to the card");
    let deadline = Instant::now() + T;
    while std::fs::read(&log).unwrap() != b"from the card" {
        assert!(Instant::now() < deadline, "the log never got the output");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(fe);
    let st = d.signal_and_wait(libc::SIGTERM, T).unwrap();
    assert!(st.success(), "{st}");
}

#[test]
fn installed_descriptor() {
    let d = mic_test_support::conventions::install_and_check(Path::new(BIN));
    assert_eq!(d.kind, "console");
}
