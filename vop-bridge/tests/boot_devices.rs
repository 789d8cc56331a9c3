//! Boot tests: the card OS boots on the emulated X100 and uses its console
//! and disk over VOP, served by the real daemons through the real bridge.

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use mic_test_support::{
    has_thread, image, load_result, load_script_command, resubmitted, sha256_range, sum_in,
    wait_doing_io, wait_for, Blk, Card, CardOptions, TempDir,
};

const MIB: u64 = 1 << 20;
const CMD: Duration = Duration::from_secs(120);

#[test]
fn card_boots_online_and_console_answers() {
    let mut card = Card::boot(CardOptions::default());
    assert_eq!(card.run("echo $((6 * 7))", CMD), "42");
    let st = card.status().unwrap();
    assert_eq!(st, "state=online shutdown_status=nop");
    // The console really is the virtio console: the card says so.
    assert_eq!(card.console_run("tty", CMD), "/dev/hvc0");
    // The console, and vsock for the card agent (the harness's default).
    let devices = card.devices();
    let kinds: Vec<_> = devices
        .iter()
        .map(|l| {
            let w: Vec<_> = l.split_whitespace().collect();
            (w[0], w[1], w[3], w[4])
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("0", "console", "running", "reconnects=0"),
            ("1", "vsock", "running", "reconnects=0")
        ],
        "{devices:?}"
    );
}

#[test]
fn disk_data_round_trips_and_survives_a_hard_kill() {
    let tmp = mic_test_support::TempDir::new("disk");
    let img = image(tmp.path(), "disk.img", 96 * MIB);
    // Host data at 64 MiB that the card must read back unchanged.
    let host_data: Vec<u8> = (0..16 * MIB)
        .map(|i| (i * 2654435761 % 251) as u8)
        .collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(64 * MIB)).unwrap();
        f.write_all(&host_data).unwrap();
    }
    let host_sum = sha256_range(&img, 64 * MIB, 16 * MIB);

    let mut card = Card::boot(CardOptions {
        blk: Blk::MicBlk(img.clone()),
        expect: "console,blk",
        ..Default::default()
    });
    let sectors = card.run("cat /sys/block/vda/size", CMD);
    assert_eq!(sectors, (96 * MIB / 512).to_string());

    // The card writes 32 MiB of pseudo-random data; the host checks the bytes.
    let out = card.run(
        "dd if=/dev/urandom of=/tmp/w bs=1M count=32 2>/dev/null && sha256sum /tmp/w && \
         dd if=/tmp/w of=/dev/vda bs=1M oflag=direct 2>/dev/null && rm /tmp/w",
        CMD,
    );
    let card_sum = sum_in(&out);
    assert_eq!(
        sha256_range(&img, 0, 32 * MIB),
        card_sum,
        "image bytes differ from what the card wrote"
    );

    // The card reads what the host put there.
    let out = card.run(
        "dd if=/dev/vda bs=1M skip=64 count=16 iflag=direct 2>/dev/null | sha256sum",
        CMD,
    );
    assert_eq!(
        sum_in(&out),
        host_sum,
        "the card read other bytes than the host wrote"
    );

    // Written through the page cache, then sync, then a power cut: nothing lost.
    let out = card.run(
        "dd if=/dev/urandom of=/tmp/s bs=1M count=8 2>/dev/null && sha256sum /tmp/s && \
         dd if=/tmp/s of=/dev/vda bs=1M seek=40 2>/dev/null && sync",
        CMD,
    );
    let synced = sum_in(&out);
    card.kill_qemu();
    assert_eq!(
        sha256_range(&img, 40 * MIB, 8 * MIB),
        synced,
        "synced data lost"
    );
}

#[test]
fn third_party_backend_serves_the_disk() {
    let tmp = mic_test_support::TempDir::new("qsd");
    let img = image(tmp.path(), "disk.img", 64 * MIB);
    let mut card = Card::boot(CardOptions {
        blk: Blk::Qsd(img.clone()),
        expect: "console,blk",
        ..Default::default()
    });
    let out = card.run(
        "dd if=/dev/urandom of=/tmp/w bs=1M count=16 2>/dev/null && sha256sum /tmp/w && \
         dd if=/tmp/w of=/dev/vda bs=1M seek=8 oflag=direct 2>/dev/null && sync",
        CMD,
    );
    assert_eq!(sha256_range(&img, 8 * MIB, 16 * MIB), sum_in(&out));
    let out = card.run(
        "dd if=/dev/vda bs=1M skip=8 count=16 iflag=direct 2>/dev/null | sha256sum",
        CMD,
    );
    assert_eq!(sum_in(&out), sha256_range(&img, 8 * MIB, 16 * MIB));
}

/// The `wce` byte of `struct virtio_blk_config` (virtio 1.2 5.2.4,
/// `writeback`; 1 = write-back cache, 0 = write-through).
const BLK_WCE: usize = 32;

/// The block device's config space as its backend reports it now, through
/// the bridge's `config` request (the device is index 1: console first).
fn backend_wce(card: &Card) -> u8 {
    let hex = vop_bridge::control::request(&card.path("ctl.sock"), "config 1").unwrap();
    assert!(!hex.starts_with("error"), "{hex}");
    u8::from_str_radix(&hex[2 * BLK_WCE..2 * BLK_WCE + 2], 16).unwrap()
}

#[test]
fn write_through_chosen_by_the_card_survives_a_backend_restart() {
    let tmp = mic_test_support::TempDir::new("wce");
    let img = image(tmp.path(), "disk.img", 32 * MIB);
    let mut card = Card::boot(CardOptions {
        blk: Blk::MicBlk(img.clone()),
        expect: "console,blk",
        ..Default::default()
    });
    // mic-blk starts with its write cache on; the card turns it off through
    // virtio-blk's cache_type attribute (a config write of `wce`).
    assert_eq!(card.run("cat /sys/block/vda/cache_type", CMD), "write back");
    assert_eq!(backend_wce(&card), 1);
    card.run("echo 'write through' > /sys/block/vda/cache_type", CMD);
    assert_eq!(
        card.run("cat /sys/block/vda/cache_type", CMD),
        "write through"
    );
    assert_eq!(
        backend_wce(&card),
        0,
        "the card's choice did not reach mic-blk"
    );

    // A new mic-blk starts in writeback; the bridge tells it the card's
    // choice before its rings run.
    card.restart_blk(Duration::from_millis(500));
    let ctl = card.path("ctl.sock");
    wait_for(Duration::from_secs(60), "mic-blk to be back", || {
        let devices = vop_bridge::control::request(&ctl, "devices").ok()?;
        let blk = devices.lines().find(|l| l.starts_with("1 "))?.to_owned();
        (blk.ends_with(" running reconnects=1") && backend_wce_ready(&card)).then_some(())
    });
    assert_eq!(
        backend_wce(&card),
        0,
        "the restarted mic-blk runs writeback"
    );
    assert_eq!(
        card.run("cat /sys/block/vda/cache_type", CMD),
        "write through"
    );

    // The disk works on the new backend.
    let out = card.run(
        "dd if=/dev/urandom of=/tmp/w bs=1M count=4 2>/dev/null && sha256sum /tmp/w && \
         dd if=/tmp/w of=/dev/vda bs=1M seek=8 oflag=direct 2>/dev/null",
        CMD,
    );
    assert_eq!(sha256_range(&img, 8 * MIB, 4 * MIB), sum_in(&out));
}

/// Whether the bridge can read the block backend's config (it is connected).
fn backend_wce_ready(card: &Card) -> bool {
    vop_bridge::control::request(&card.path("ctl.sock"), "config 1")
        .is_ok_and(|a| a.len() >= 2 * (BLK_WCE + 1) && !a.starts_with("error"))
}

/// mic-blk killed (SIGKILL) 20 times while the card writes and reads its
/// disk with checksums (`mic_test_support::crash`): the bridge keeps the
/// in-flight region across the restarts (`docs/architecture.md`, "Backend
/// restarts"), each new mic-blk resubmits what the dead one had in flight,
/// and the card sees no I/O error and no wrong data.
#[test]
fn sigkilled_mic_blk_resubmits_in_flight_requests_under_the_bridge() {
    const KILLS: usize = 20;
    let tmp = TempDir::new("inflight-vop");
    let img = image(tmp.path(), "disk.img", 64 * MIB);
    let stats = tmp.join("stats.sock");
    let mut card = Card::boot(CardOptions {
        blk: Blk::MicBlk(img),
        // O_DIRECT: requests wait for the host's disk, so kills find some
        // in flight.
        blk_args: ["--direct", "--io-threads", "2", "--stats-socket"]
            .iter()
            .map(|a| a.to_string())
            .chain([stats.display().to_string()])
            .collect(),
        expect: "console,blk",
        ..Default::default()
    });
    card.run("dmesg -c > /dev/null", CMD);
    card.run(&load_script_command(), CMD);
    card.run("sh /tmp/load.sh </dev/null >/tmp/load.log 2>&1 &", CMD);

    // At least KILLS kills, and on (up to three times as many) until the
    // new daemons have found a request in flight: when a kill lands is up
    // to the scheduler.
    let mut total = 0;
    let mut kills = 0;
    while kills < KILLS || (total == 0 && kills < 3 * KILLS) {
        kills += 1;
        wait_doing_io(card.blk_pid().unwrap(), Duration::from_secs(5));
        total += resubmitted(&stats).unwrap_or(0);
        card.restart_blk(Duration::ZERO);
        // The bridge reconnects: the new daemon relays its control channel.
        let pid = card.blk_pid().unwrap();
        wait_for(Duration::from_secs(30), "the bridge to reconnect", || {
            has_thread(pid, "vu-relay-req").then_some(())
        });
    }

    // Let the last daemon serve a whole round, then stop the load.
    wait_for(CMD, "a round of the load", || {
        card.run("cat /tmp/result 2>/dev/null || true", CMD)
            .contains("ok=")
            .then_some(())
    });
    card.run("touch /tmp/stop", CMD);
    let result = wait_for(CMD, "the load to stop", || {
        let out = card.run("cat /tmp/result", CMD);
        out.contains("done").then_some(out)
    });
    total += resubmitted(&stats).unwrap_or(0);
    let (ok, bad) = load_result(&result);
    let ioerrs: u64 = card
        .run("dmesg | grep -c 'I/O error' || true", CMD)
        .trim()
        .parse()
        .unwrap();
    eprintln!("card: ok={ok} bad={bad} I/O errors={ioerrs}; {kills} kills, resubmitted {total}");
    assert!(ok > 0, "no round completed");
    assert_eq!(bad, 0, "a read-back differed or a dd failed");
    assert_eq!(ioerrs, 0, "the card saw I/O errors");
    assert!(total > 0, "no kill caught a request in flight");
    assert!(
        card.history()
            .iter()
            .filter(|e| e.as_str() == "backend 1 back")
            .count()
            >= KILLS
    );
}
