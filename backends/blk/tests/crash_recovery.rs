//! mic-blk survives its own crash with requests in flight (in-flight I/O
//! tracking, `docs/inflight-io.md`): the card OS boots under stock QEMU
//! with `vhost-user-blk-pci` on a reconnecting chardev, as in
//! `vop-bridge/tests/stock_frontends.rs`, and writes and reads its disk in
//! a loop, checking every read-back against what it wrote, while the test
//! SIGKILLs mic-blk 20 times and starts it again on the same socket. The
//! guest must see no I/O error and every checksum must match, and the
//! daemons must have resubmitted requests that were in flight.
//!
//! Needs the project's QEMU and card image (`MIC_QEMU`, `MIC_CARD_DIR`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mic_test_support::{
    bin, card_boot_args, has_thread, image, load_result, load_script_command, qemu, resubmitted,
    serial_shell_online, wait_doing_io, wait_for, Daemon, Process, TempDir,
};

const MIB: u64 = 1 << 20;
const KILLS: usize = 20;
const CMD: Duration = Duration::from_secs(120);

fn start_blk(dir: &TempDir, img: &Path, n: usize) -> Daemon {
    let sock = dir.join("blk.sock");
    let stats = dir.join("stats.sock");
    Daemon::spawn_logged(
        &bin("mic-blk"),
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--stats-socket",
            stats.to_str().unwrap(),
            "--num-queues",
            "1",
            "--io-threads",
            "2",
            "--direct",
        ],
        &sock,
        &dir.join(format!("mic-blk-{n}.log")),
    )
    .expect("mic-blk starts")
}

#[test]
fn sigkilled_mic_blk_resubmits_in_flight_requests_under_stock_qemu() {
    let dir = TempDir::new("inflight");
    let img = image(dir.path(), "disk.img", 64 * MIB);
    let stats = dir.join("stats.sock");
    let mut blk = start_blk(&dir, &img, 0);

    let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    let _vm = Process::from_child(
        Command::new(qemu())
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "512"])
            .args(["-nodefaults", "-no-user-config"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-machine", "q35,memory-backend=mem"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vb,path={},reconnect-ms=1000",
                dir.join("blk.sock").display()
            ))
            .args(["-device", "vhost-user-blk-pci,chardev=vb,num-queues=1"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser,path={},server=on,wait=off",
                dir.join("serial.sock").display()
            ))
            .args(["-serial", "chardev:ser"])
            .args(card_boot_args("mic.expect=blk"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut shell = serial_shell_online(&dir.join("serial.sock"));
    shell.run("dmesg -c > /dev/null", CMD);
    shell.run(&load_script_command(), CMD);
    shell.run("(sh /tmp/load.sh > /tmp/load.log 2>&1 &)", CMD);

    // At least KILLS kills, and on (up to three times as many) until the
    // new daemons have found a request in flight: when a kill lands is up
    // to the scheduler.
    let mut total = 0;
    let mut n = 0;
    while n < KILLS || (total == 0 && n < 3 * KILLS) {
        n += 1;
        // Kill while a worker waits for the image (mic-blk runs with
        // O_DIRECT, so requests block in the host's disk: a request in
        // flight), or after a few seconds of whatever the guest does.
        wait_doing_io(blk.child.id(), Duration::from_secs(5));
        total += resubmitted(&stats).unwrap_or(0);
        blk.signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
            .expect("mic-blk dies");
        blk = start_blk(&dir, &img, n);
        // QEMU reconnects within a second: the daemon then relays its
        // control channel (a thread per direction, see the relay module).
        let pid = blk.child.id();
        wait_for(Duration::from_secs(30), "QEMU to reconnect", || {
            has_thread(pid, "vu-relay-req").then_some(())
        });
    }

    // Let the last daemon serve a whole round, then stop the load.
    wait_for(CMD, "a round of the load", || {
        shell
            .run("cat /tmp/result 2>/dev/null", CMD)
            .contains("ok=")
            .then_some(())
    });
    shell.run("touch /tmp/stop", CMD);
    let result = wait_for(CMD, "the load to stop", || {
        let out = shell.run("cat /tmp/result", CMD);
        out.contains("done").then_some(out)
    });
    total += resubmitted(&stats).unwrap_or(0);

    let (ok, bad) = load_result(&result);
    let ioerrs = shell.run("dmesg | grep -c 'I/O error' || true", CMD);
    let ioerrs: u64 = ioerrs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no count: {ioerrs}"));
    eprintln!("guest: ok={ok} bad={bad} I/O errors={ioerrs}; resubmitted {total}");
    assert!(ok > 0, "no round completed");
    assert_eq!(bad, 0, "a read-back differed or a dd failed");
    assert_eq!(ioerrs, 0, "the guest saw I/O errors");
    assert!(total > 0, "no kill caught a request in flight");
}
