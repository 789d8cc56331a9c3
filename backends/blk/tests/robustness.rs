//! Malformed guest requests, protocol garbage, reconnects and lifecycle.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::*;
use mic_test_support::vhost::VhostBackend;
use mic_test_support::{outside, Desc, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

#[test]
fn malformed_requests_get_errors_and_write_nothing() {
    let s = Setup::new(1 << 20, 0x33);
    let before = checksum(&s.image_bytes());
    let _d = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    let q = &mut f.queues[0];
    let r = Req::alloc(q, 4096);
    let m = q.mem().clone();
    m.write(r.data, &pattern(1, 4096)).unwrap();

    // Write whose data buffer is device-writable (wrong direction).
    m.write(r.hdr, &header(T_OUT, 0)).unwrap();
    let (st, _) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::inp(r.data, 4096),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!(st, S_IOERR);
    // Read with device-readable data buffer (wrong direction).
    m.write(r.hdr, &header(T_IN, 0)).unwrap();
    let (st, _) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::out(r.data, 4096),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!(st, S_IOERR);
    // Readable descriptor after a writable one.
    m.write(r.hdr, &header(T_OUT, 0)).unwrap();
    let (st, _) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::inp(r.status, 1),
            Desc::out(r.data, 4096),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!(st, S_IOERR);
    // Data descriptor outside guest memory.
    let (st, _) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::out(outside(&m), 4096),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!(st, S_IOERR);
    // Length running past the end of guest memory.
    let (st, _) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::out(m.size() - 512, 4096),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!(st, S_IOERR);
    // Sector beyond the end, and a request straddling the end.
    for sector in [2048u64, 2047, u64::MAX / 512] {
        m.write(r.hdr, &header(T_OUT, sector)).unwrap();
        let (st, _) = submit(
            q,
            &[
                Desc::out(r.hdr, 16),
                Desc::out(r.data, 1024),
                Desc::inp(r.status, 1),
            ],
            r.status,
        );
        assert_eq!(st, S_IOERR, "write at sector {sector}");
    }
    let (st, _) = read(q, 2047, 1024);
    assert_eq!(st, S_IOERR);
    // Not a whole number of sectors.
    m.write(r.hdr, &header(T_OUT, 0)).unwrap();
    let (st, _) = submit(
        q,
        &[
            Desc::out(r.hdr, 16),
            Desc::out(r.data, 100),
            Desc::inp(r.status, 1),
        ],
        r.status,
    );
    assert_eq!(st, S_IOERR);
    // Header too short.
    let (st, _) = submit(q, &[Desc::out(r.hdr, 8), Desc::inp(r.status, 1)], r.status);
    assert_eq!(st, S_IOERR);
    // Unknown request type.
    m.write(r.hdr, &header(0x1234, 0)).unwrap();
    let (st, _) = submit(q, &[Desc::out(r.hdr, 16), Desc::inp(r.status, 1)], r.status);
    assert_eq!(st, S_UNSUPP);
    // Chain whose `next` points beyond the descriptor table.
    m.write(r.hdr, &header(T_OUT, 0)).unwrap();
    m.write(r.status, &[0xff]).unwrap();
    let head = q
        .add_raw(
            &[
                Desc {
                    addr: r.hdr,
                    len: 16,
                    flags: VRING_DESC_F_NEXT,
                    next: 1,
                },
                Desc {
                    addr: r.data,
                    len: 4096,
                    flags: VRING_DESC_F_NEXT,
                    next: 2,
                },
                Desc {
                    addr: r.status,
                    len: 1,
                    flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    next: 9999,
                },
            ],
            true,
        )
        .unwrap();
    q.kick().unwrap();
    q.wait_for(head, TIMEOUT).unwrap();
    assert_eq!(m.read(r.status, 1).unwrap()[0], S_IOERR, "truncated chain");
    // A loop: descriptor pointing to itself.
    let head = q
        .add_raw(
            &[
                Desc {
                    addr: r.hdr,
                    len: 16,
                    flags: VRING_DESC_F_NEXT,
                    next: 1,
                },
                Desc {
                    addr: r.data,
                    len: 4096,
                    flags: VRING_DESC_F_NEXT,
                    next: 1,
                },
            ],
            true,
        )
        .unwrap();
    q.kick().unwrap();
    let used = q.wait_for(head, TIMEOUT).unwrap();
    assert_eq!(used.last().unwrap().len, 0, "no status byte -> used len 0");
    // Only a header, no writable byte at all.
    let head = q.add_chain(&[Desc::out(r.hdr, 16)]).unwrap();
    q.kick().unwrap();
    assert_eq!(q.wait_for(head, TIMEOUT).unwrap().last().unwrap().len, 0);

    // Nothing was written, and the device still works.
    assert_eq!(checksum(&s.image_bytes()), before);
    let data = pattern(5, 512);
    assert_eq!(write(q, 3, &data), S_OK);
    assert_eq!(read(q, 3, 512), (S_OK, data));
}

#[test]
fn reconnect_after_disconnect_and_garbage() {
    let s = Setup::new(1 << 20, 0);
    let mut d = s.spawn(&["--num-queues", "2"]);
    {
        let mut f = connect(&s, 2);
        assert_eq!(write(&mut f.queues[1], 0, &pattern(1, 4096)), S_OK);
        // Dropped with requests never completed: the next frontend starts fresh.
    }
    // Garbage on the vhost-user socket.
    for junk in [
        &b"\xff\xff\xff\xff garbage garbage garbage"[..],
        &[0u8; 3][..],
        &[0x01, 0, 0, 0, 0x01, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f][..],
    ] {
        let mut c = UnixStream::connect(&s.socket).unwrap();
        let _ = c.write_all(junk);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The daemon closes the connection (EOF) or keeps waiting; drop it.
        drop(c);
    }
    assert!(d.alive());
    // A new frontend works, and sees the first frontend's data.
    let mut f = connect(&s, 2);
    let (st, back) = read(&mut f.queues[0], 0, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(back, pattern(1, 4096));
    drop(f);
    let mut f = connect(&s, 1);
    assert_eq!(write(&mut f.queues[0], 8, &pattern(2, 512)), S_OK);
    assert!(d.alive());
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_socket() {
    let s = Setup::new(1 << 20, 0);
    let mut d = s.spawn(&["--num-queues", "1"]);
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut f = connect(&s, 1);
    assert_eq!(write(&mut f.queues[0], 0, &pattern(4, 512)), S_OK);
    // Shut down while a frontend is connected.
    let st = d.signal_and_wait(libc::SIGTERM, TIMEOUT).unwrap();
    assert!(st.success(), "exit status {st}");
    assert!(!s.socket.exists());
    drop(f);
    // SIGINT while idle.
    let mut d = s.spawn(&["--num-queues", "1"]);
    let st = d.signal_and_wait(libc::SIGINT, TIMEOUT).unwrap();
    assert!(st.success());
    assert!(!s.socket.exists());
}

#[test]
fn socket_in_use_and_stale_socket() {
    let s = Setup::new(1 << 20, 0);
    let image2 = s.dir.path().join("other.img");
    std::fs::write(&image2, vec![0u8; 4096]).unwrap();
    let mut d = s.spawn(&["--num-queues", "1"]);
    let out = Command::new(bin())
        .args([
            "--socket-path",
            s.socket.to_str().unwrap(),
            "--image",
            image2.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(d.alive(), "the live daemon is unaffected");
    let mut f = connect(&s, 1);
    assert_eq!(write(&mut f.queues[0], 0, &pattern(1, 512)), S_OK);
    drop(f);
    // Kill it hard: the socket file stays behind and is replaced next time.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    assert!(s.socket.exists());
    let _d2 = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    assert_eq!(read(&mut f.queues[0], 0, 512), (S_OK, pattern(1, 512)));
}

#[test]
fn bad_arguments_fail_before_socket() {
    let s = Setup::new(4096, 0);
    let sock = s.socket.to_str().unwrap();
    let img = s.image.to_str().unwrap();
    let missing = s.dir.path().join("missing.img");
    let cases: Vec<Vec<&str>> = vec![
        vec!["--socket-path", sock, "--image", missing.to_str().unwrap()],
        vec![
            "--socket-path",
            sock,
            "--image",
            s.dir.path().to_str().unwrap(),
        ],
        vec!["--socket-path", sock],
        vec!["--image", img],
        vec![
            "--socket-path",
            sock,
            "--image",
            img,
            "--queue-size",
            "1000",
        ],
        vec!["--socket-path", sock, "--image", img, "--num-queues", "0"],
        vec![
            "--socket-path",
            sock,
            "--image",
            img,
            "--serial",
            "this-serial-is-too-long",
        ],
        vec!["--socket-path", sock, "--image", img, "--bogus"],
    ];
    for args in cases {
        let out = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one error line, got {err:?}"
        );
        assert!(err.starts_with("mic-blk: "), "{err}");
        assert!(!s.socket.exists(), "{args:?} created the socket");
    }
}

#[test]
fn client_mode_connects_and_reconnects() {
    let s = Setup::new(1 << 20, 0);
    let child = Command::new(bin())
        .args([
            "--socket-path",
            s.socket.to_str().unwrap(),
            "--image",
            s.image.to_str().unwrap(),
            "--client",
            "--num-queues",
            "1",
        ])
        .spawn()
        .unwrap();
    let mut d = mic_test_support::Daemon {
        child,
        socket: s.socket.clone(),
    };
    // The frontend starts listening after the daemon: it keeps retrying.
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.alive());
    let listener = std::os::unix::net::UnixListener::bind(&s.socket).unwrap();
    for round in 0..2u64 {
        let (stream, _) = listener.accept().unwrap();
        let mut f =
            mic_test_support::TestFrontend::from_stream(stream, Default::default()).unwrap();
        let q = &mut f.queues[0];
        let data = pattern(round, 4096);
        assert_eq!(write(q, round * 8, &data), S_OK);
        assert_eq!(read(q, round * 8, 4096), (S_OK, data));
        // Dropping the frontend closes the connection; the daemon reconnects.
    }
    assert!(d.alive());
}

#[test]
fn device_state_is_reset_for_a_new_frontend() {
    let s = Setup::new(1 << 20, 0);
    let _d = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    f.set_config(32, &[0]).unwrap();
    assert_eq!(f.get_config(32, 1).unwrap(), vec![0]);
    // Leave a request un-kicked in the ring.
    let _ = f.queues[0].add_chain(&[Desc::out(f.mem.alloc(16, 16).unwrap(), 16)]);
    drop(f);
    let mut f = connect(&s, 1);
    assert_eq!(f.get_config(32, 1).unwrap(), vec![1], "write-back again");
    assert_eq!(write(&mut f.queues[0], 0, &pattern(8, 512)), S_OK);
    assert_eq!(read(&mut f.queues[0], 0, 512), (S_OK, pattern(8, 512)));
}

#[test]
fn corrupted_avail_ring_does_not_spin_or_crash() {
    let s = Setup::new(1 << 20, 0);
    let mut d = s.spawn(&["--num-queues", "2"]);
    let mut f = connect(&s, 2);
    // Queue 0: head index beyond the ring, then a sane request behind it.
    {
        let q = &mut f.queues[0];
        q.publish_raw_head(60000);
        q.kick_always().unwrap();
        let data = pattern(21, 512);
        assert_eq!(write(q, 1, &data), S_OK);
        assert_eq!(read(q, 1, 512), (S_OK, data));
    }
    // Queue 1: avail index far beyond what the ring can hold.
    {
        let q = &mut f.queues[1];
        q.corrupt_avail_idx(30000);
        q.kick_always().unwrap();
    }
    let pid = d.child.id();
    let t0 = mic_test_support::cpu_ticks(pid).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let used = mic_test_support::cpu_ticks(pid).unwrap() - t0;
    // A spinning worker would burn ~50 ticks (100 Hz) in 0.5 s.
    assert!(used < 20, "daemon burnt {used} ticks in 0.5 s");
    assert!(d.alive());
    // The other queue still works.
    let q = &mut f.queues[0];
    assert_eq!(write(q, 2, &pattern(22, 512)), S_OK);
    drop(f);
    // And a new frontend gets a clean device.
    let mut f = connect(&s, 2);
    assert_eq!(read(&mut f.queues[1], 1, 512), (S_OK, pattern(21, 512)));
}

/// A driver (or a bridge forwarding the card's writes) may write any range
/// of the configuration space. Read-only fields stay as they are, the
/// `writeback` byte takes effect wherever it is in the range, and the
/// connection keeps serving: its write-through choice is not lost.
#[test]
fn config_writes_of_any_range_keep_the_connection_and_wce() {
    let s = Setup::new(1 << 20, 0);
    let _d = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    let before = f.get_config(0, 60).unwrap();
    assert_eq!(before[32], 1, "write-back by default");

    // The whole config space, with the capacity changed and write-through.
    let mut cfg = before.clone();
    cfg[0..8].copy_from_slice(&7u64.to_le_bytes());
    cfg[32] = 0;
    f.set_config(0, &cfg).unwrap();
    let after = f.get_config(0, 60).unwrap();
    assert_eq!(&after[0..8], &before[0..8], "capacity is read-only");
    assert_eq!(after[32], 0, "write-through from a whole-space write");

    // A range that does not cover the writeback byte changes nothing.
    f.set_config(36, &[1, 2, 3, 4]).unwrap();
    f.set_config(200, &[9]).unwrap();
    assert_eq!(f.get_config(0, 60).unwrap(), after);

    // Same connection, still serving, still write-through.
    let q = &mut f.queues[0];
    let data = pattern(31, 4096);
    assert_eq!(write(q, 16, &data), S_OK);
    assert_eq!(&s.image_bytes()[8192..12288], &data[..]);
    assert_eq!(f.get_config(32, 1).unwrap(), vec![0]);

    // A range ending on the writeback byte switches back to write-back.
    f.set_config(30, &[0, 0, 1]).unwrap();
    assert_eq!(f.get_config(32, 1).unwrap(), vec![1]);
}

/// A peer that connects and never speaks (or stops in the middle of a
/// message) does not keep the next frontend waiting for long: the daemon
/// drops a peer whose first message does not arrive within two seconds, or
/// whose message does not complete within two seconds. (A peer that sent a
/// whole message is a frontend, and holds the device while connected, as
/// in any vhost-user backend: the last entry of `STALLED_PEERS`.)
#[test]
fn stalled_peers_do_not_block_the_next_frontend() {
    let s = Setup::new(1 << 20, 0);
    let mut d = s.spawn(&["--num-queues", "1"]);
    for (what, prelude) in &mic_test_support::STALLED_PEERS[..3] {
        let mut stalled = mic_test_support::stalled_peer(&s.socket, prelude).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel();
        let sock = s.socket.clone();
        let started = std::time::Instant::now();
        std::thread::spawn(move || {
            let mut f = mic_test_support::TestFrontend::connect(&sock, 1).unwrap();
            let st = write(&mut f.queues[0], 0, &pattern(5, 512));
            let _ = tx.send(st);
        });
        let st = rx
            .recv_timeout(Duration::from_secs(8))
            .unwrap_or_else(|_| panic!("{what}: the next frontend was not served"));
        assert_eq!(st, S_OK, "{what}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{what}: served after {:?}",
            started.elapsed()
        );
        // The stalled peer's connection was closed.
        stalled
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut rest = Vec::new();
        let closed = std::io::Read::read_to_end(&mut stalled, &mut rest).is_ok();
        assert!(closed, "{what}: the stalled peer is still connected");
    }
    assert!(d.alive());
}

/// SIGTERM ends the daemon within a second whatever a connected peer is
/// in the middle of (see `mic_test_support::STALLED_PEERS`).
#[test]
fn sigterm_ends_the_daemon_within_a_second_with_a_stalled_peer() {
    let s = Setup::new(1 << 20, 0);
    for (what, prelude) in mic_test_support::STALLED_PEERS {
        let mut d = s.spawn(&["--num-queues", "1"]);
        let st = mic_test_support::sigterm_with_stalled_peer(&mut d, prelude)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(st.success(), "{what}: exit status {st}");
        assert!(!s.socket.exists(), "{what}");
    }
}

/// A frontend that repeats actions the daemon or the crates below it log
/// (reconnecting, sending invalid requests, invalid queue sizes, breaking
/// a ring) leaves a bounded number of lines in the log.
#[test]
fn repeated_frontend_actions_do_not_flood_the_log() {
    let s = Setup::new(1 << 20, 0);
    let log = s.dir.path().join("stderr.log");
    let args = [
        "--socket-path",
        s.socket.to_str().unwrap(),
        "--image",
        s.image.to_str().unwrap(),
        "--num-queues",
        "1",
    ];
    let _d = mic_test_support::Daemon::spawn_logged(bin(), &args, &s.socket, &log).unwrap();
    let before = mic_test_support::log_lines(&log).unwrap();
    let f = connect(&s, 1);
    for _ in 0..100 {
        // An invalid queue size: virtio-queue logs an error each time.
        f.frontend.set_vring_num(0, 3).unwrap();
    }
    drop(f);
    for i in 0..30u8 {
        // An unknown request ends the connection: "connected" and
        // "dropped" each time.
        let mut c = UnixStream::connect(&s.socket).unwrap();
        c.write_all(&[200, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
        // A frontend that breaks its ring each time.
        if i % 3 == 0 {
            let mut f = connect(&s, 1);
            f.queues[0].corrupt_avail_idx(30000);
            f.queues[0].kick_always().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The daemon still serves.
    let mut f = connect(&s, 1);
    assert_eq!(write(&mut f.queues[0], 0, &pattern(9, 512)), S_OK);
    drop(f);
    std::thread::sleep(Duration::from_millis(200));
    let lines = mic_test_support::log_lines(&log).unwrap() - before;
    // The first lines of each kind still get through.
    assert!(
        (10..=40).contains(&lines),
        "{lines} log lines:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

/// The daemon's private relay socket exists only while a frontend
/// connects: a daemon killed while serving leaves nothing in the
/// temporary directory.
#[test]
fn a_killed_daemon_leaves_no_private_socket_behind() {
    let s = Setup::new(1 << 20, 0);
    let mut d = s.spawn(&["--num-queues", "1"]);
    let mut f = connect(&s, 1);
    assert_eq!(write(&mut f.queues[0], 0, &pattern(5, 512)), S_OK);
    let mine = format!(".mic-blk-{}-", d.child.id());
    let left = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
            .count()
    };
    assert_eq!(left(), 0, "a private socket directory while serving");
    d.signal_and_wait(libc::SIGKILL, TIMEOUT).unwrap();
    assert_eq!(left(), 0);
}
