//! The sandbox from outside (`backends/README.md`, "Sandbox"): a daemon
//! that makes a system call outside its list is killed by SIGSYS, and a
//! second daemon goes on serving I/O. The forbidden call comes from the
//! test-only hook of `mic-backend-common` (feature `test-hooks`, which the
//! dev-dependencies enable: `MIC_TEST_BLOCKED_CALL=N` makes the daemon call
//! `getppid` when its N-th frontend connects).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use mic_test_support::{wait_exit, Daemon, TestFrontend};

/// Starts mic-blk for `s` with the hook armed for its second connection
/// (the first is `wait_ready`'s probe).
fn spawn_hooked(s: &Setup, extra: &[&str]) -> Daemon {
    let child = Command::new(bin())
        .args(["--socket-path", s.socket.to_str().unwrap()])
        .args(["--image", s.image.to_str().unwrap()])
        .args(extra)
        .env("MIC_TEST_BLOCKED_CALL", "2")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        socket: s.socket.clone(),
    };
    d.wait_ready(TIMEOUT).unwrap();
    d
}

fn write_and_read_back(f: &mut TestFrontend, seed: u64) {
    let data = pattern(seed, 8192);
    assert_eq!(write(&mut f.queues[0], 8, &data), S_OK);
    let (st, back) = read(&mut f.queues[0], 8, data.len());
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
}

#[test]
fn blocked_call_kills_only_the_offending_daemon() {
    let good = Setup::new(1 << 20, 0);
    let bad = Setup::new(1 << 20, 0);
    let _g = good.spawn(&[]);
    let mut b = spawn_hooked(&bad, &[]);
    let mut f = connect(&good, 1);
    write_and_read_back(&mut f, 1);

    // The offending daemon dies of SIGSYS when the frontend connects; the
    // handshake fails with it.
    let _ = TestFrontend::connect(&bad.socket, 1);
    let status = wait_exit(&mut b.child, TIMEOUT).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    assert_eq!(status.code(), None);
    assert_eq!(bad.image_bytes(), vec![0; 1 << 20], "image untouched");

    // The other daemon, and its frontend, go on.
    write_and_read_back(&mut f, 2);
    drop(f);
    let mut f = connect(&good, 1);
    write_and_read_back(&mut f, 3);
}

#[test]
fn without_the_sandbox_the_same_call_is_harmless() {
    let s = Setup::new(1 << 20, 0);
    let mut d = spawn_hooked(&s, &["--sandbox", "none"]);
    let mut f = connect(&s, 1);
    write_and_read_back(&mut f, 4);
    drop(f);
    assert!(d.alive());
    let status = d
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
