//! The vhost-user backend program conventions (QEMU
//! `docs/interop/vhost-user.rst`, "Backend program conventions"):
//! `--print-capabilities` checked against `vhost-user.json`, the daemon
//! served through `--fd` by the test frontend and by stock QEMU's
//! `vhost-user-blk-pci`, and the installed descriptor.

mod common;

use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use common::*;
use mic_test_support::conventions::{
    check_capabilities, install_and_check, print_capabilities, spawn_with_fd,
};
use mic_test_support::{Qemu, QemuArgs, TestFrontend};

#[test]
fn capabilities_follow_the_schema() {
    let caps = check_capabilities(&print_capabilities(bin(), &[])).unwrap();
    assert_eq!(caps.kind, "block");
    assert_eq!(caps.features, ["read-only", "blk-file"]);
    // Other options and arguments are ignored, even invalid ones.
    let again = print_capabilities(bin(), &["--image", "/nonexistent", "--bogus"]);
    assert_eq!(check_capabilities(&again).unwrap(), caps);
}

#[test]
fn served_through_an_inherited_socket() {
    let s = Setup::new(1 << 20, 0);
    let listener = UnixListener::bind(&s.socket).unwrap();
    let args = ["--image", s.image.to_str().unwrap(), "--num-queues", "1"];
    let mut daemon = spawn_with_fd(bin(), &args, &listener, 7, &s.dir.join("log"));
    let mut fe = TestFrontend::connect(&s.socket, 1).unwrap();
    let data = pattern(7, 8192);
    assert_eq!(write(&mut fe.queues[0], 16, &data), S_OK);
    let (st, back) = read(&mut fe.queues[0], 16, data.len());
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    assert_eq!(&s.image_bytes()[16 * 512..16 * 512 + data.len()], &data[..]);
    drop(fe);
    // A second frontend on the same inherited socket.
    let mut fe = TestFrontend::connect(&s.socket, 1).unwrap();
    assert_eq!(read(&mut fe.queues[0], 16, 512).1, data[..512]);
    drop(fe);
    let st = daemon.signal_and_wait(libc::SIGTERM, TIMEOUT).unwrap();
    assert!(st.success(), "{st}");
    assert!(
        s.socket.exists(),
        "the inherited socket's file is the parent's"
    );
}

#[test]
fn spec_option_names_read_only_and_blk_file() {
    let s = Setup::new(1 << 20, 0x5a);
    let listener = UnixListener::bind(&s.socket).unwrap();
    let args = [
        "--blk-file",
        s.image.to_str().unwrap(),
        "--read-only",
        "--num-queues",
        "1",
    ];
    let _daemon = spawn_with_fd(bin(), &args, &listener, 5, &s.dir.join("log"));
    let mut fe = TestFrontend::connect(&s.socket, 1).unwrap();
    let ro = 1u64 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
    assert_ne!(fe.offered_features & ro, 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(write(&mut fe.queues[0], 0, &[1u8; 512]), S_IOERR);
    assert_eq!(read(&mut fe.queues[0], 0, 512), (S_OK, vec![0x5a; 512]));
    assert_eq!(s.image_bytes(), vec![0x5a; 1 << 20]);
}

#[test]
fn bad_fd_is_one_line_and_a_failure() {
    let s = Setup::new(4096, 0);
    let img = s.image.to_str().unwrap();
    let sock = s.socket.to_str().unwrap();
    for args in [
        vec!["--image", img, "--fd", "2"],
        vec!["--image", img, "--fd", "99"],
        vec!["--image", img, "--fd", "3", "--socket-path", sock],
        vec!["--image", img, "--fd", "3", "--client"],
        vec!["--image", img],
    ] {
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // A unix stream socket that is not listening, passed as descriptor 3.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let l: UnixListener = {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `a` is an open socket we own; the listener takes it over
        // only to pass it to the child, where it is refused.
        unsafe { UnixListener::from_raw_fd(a.into_raw_fd()) }
    };
    let mut p = spawn_with_fd(bin(), &["--image", img], &l, 3, &s.dir.join("log3"));
    let st = p.wait_exit(TIMEOUT).unwrap();
    assert!(!st.success());
    let log = std::fs::read_to_string(s.dir.join("log3")).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");
}

#[test]
fn installed_descriptor() {
    let d = install_and_check(bin());
    assert_eq!(d.kind, "block");
}

/// Stock QEMU's vhost-user-blk-pci on a daemon the test started through
/// `--fd`: the device only realizes after the vhost-user handshake and
/// GET_CONFIG, so QEMU running with the device in `query-pci` means it
/// was served.
#[test]
fn stock_qemu_vhost_user_blk_pci_through_fd() {
    let s = Setup::new(4 << 20, 0);
    let listener = UnixListener::bind(&s.socket).unwrap();
    let args = ["--image", s.image.to_str().unwrap(), "--num-queues", "1"];
    let mut daemon = spawn_with_fd(bin(), &args, &listener, 4, &s.dir.join("log"));
    let qemu = Qemu::start_with(&QemuArgs {
        qmp: true,
        chardev: false,
        device: Some(
            "vhost-user-blk-pci,chardev=vub,num-queues=1,disable-legacy=on,id=vub0".into(),
        ),
        extra: vec![
            "-chardev".into(),
            format!("socket,id=vub,path={}", s.socket.display()),
        ],
        ..Default::default()
    });
    let reply = qemu.qmp().execute("query-pci");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let devices: Vec<(u64, u64)> = v["return"][0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"]["vendor"].as_u64().unwrap(),
                d["id"]["device"].as_u64().unwrap(),
            )
        })
        .collect();
    // Red Hat's virtio vendor ID, modern virtio-blk (virtio 1.2, 4.1.2.1).
    assert!(devices.contains(&(0x1af4, 0x1042)), "{devices:?}");
    assert!(daemon.alive(), "the daemon still serves");
    drop(qemu);
    std::thread::sleep(Duration::from_millis(100));
    assert!(daemon.alive(), "the daemon outlives its frontend");
}
