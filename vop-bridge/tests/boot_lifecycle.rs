//! Boot tests of the card lifecycle: power-off, reboot, crash and a
//! host-requested shutdown as the bridge reports them, and a bridge that
//! restarts and reattaches to a running card.

use std::time::Duration;

use mic_test_support::{image, sha256_range, sum_in, Blk, Card, CardOptions, BOOT_TIMEOUT};

const MIB: u64 = 1 << 20;
const CMD: Duration = Duration::from_secs(120);

fn card_with_disk(tmp: &mic_test_support::TempDir) -> (Card, std::path::PathBuf) {
    let img = image(tmp.path(), "disk.img", 32 * MIB);
    let card = Card::boot(CardOptions {
        blk: Blk::MicBlk(img.clone()),
        expect: "console,blk",
        ..Default::default()
    });
    (card, img)
}

/// Writes 1 MiB of fresh random data at `mib` on the card's disk and checks
/// the host sees exactly those bytes.
fn disk_works(card: &mut Card, img: &std::path::Path, mib: u64) {
    let out = card.run(
        &format!(
            "dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null && sha256sum /tmp/p && \
             dd if=/tmp/p of=/dev/vda bs=1M seek={mib} oflag=direct 2>/dev/null"
        ),
        CMD,
    );
    assert_eq!(sha256_range(img, mib * MIB, MIB), sum_in(&out));
}

#[test]
fn poweroff_is_reported() {
    let mut card = Card::boot(CardOptions::default());
    card.type_text("poweroff\n");
    card.wait_qemu_exit(Duration::from_secs(120));
    let st = card.wait_state("ready", Duration::from_secs(30));
    assert_eq!(st, "state=ready shutdown_status=poweroff");
    let h = card.history();
    assert!(
        h.iter().any(|e| e == "state shutting_down poweroff"),
        "{h:?}"
    );
}

#[test]
fn host_requested_shutdown_powers_the_card_off() {
    let card = Card::boot(CardOptions::default());
    let reply = vop_bridge::control::request(&card.path("ctl.sock"), "shutdown").unwrap();
    assert!(reply.starts_with("state=shutting_down"), "{reply}");
    let mut card = card;
    card.wait_qemu_exit(Duration::from_secs(120));
    assert_eq!(
        card.wait_state("ready", Duration::from_secs(30)),
        "state=ready shutdown_status=poweroff"
    );
    assert!(card.serial().contains("mic-card: shutting down"));
}

#[test]
fn reboot_restarts_and_devices_work_again() {
    let tmp = mic_test_support::TempDir::new("reboot");
    let (mut card, img) = card_with_disk(&tmp);
    disk_works(&mut card, &img, 1);
    card.type_text("reboot\n");
    card.wait_event("state shutting_down restart", BOOT_TIMEOUT);
    let h = card.wait_event("state resetting", BOOT_TIMEOUT);
    let restart = h.iter().position(|e| e == "state shutting_down restart");
    let reset = h
        .iter()
        .position(|e| mic_test_support::event_is(e, "state resetting"));
    assert!(
        matches!((restart, reset), (Some(a), Some(b)) if a < b),
        "{h:?}"
    );
    // Online again, on a new boot, with working devices.
    mic_test_support::wait_for(BOOT_TIMEOUT, "a second boot", || {
        (card.serial().matches("mic-card: online").count() >= 2).then_some(())
    });
    card.wait_state("online", BOOT_TIMEOUT);
    card.wait_shell();
    let boots = card.run("cat /proc/sys/kernel/random/boot_id", CMD);
    assert_eq!(boots.len(), 36, "{boots}");
    disk_works(&mut card, &img, 2);
    // The first boot's data is still there, read by the new boot.
    let out = card.run(
        "dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | sha256sum",
        CMD,
    );
    assert_eq!(sum_in(&out), sha256_range(&img, MIB, MIB));
    // Back online, the card cleared its shutdown status.
    assert!(card.status().unwrap().ends_with("shutdown_status=nop"));
}

#[test]
fn crash_is_reported_and_the_card_comes_back() {
    let mut card = Card::boot(CardOptions::default());
    card.type_text("echo c > /proc/sysrq-trigger\n");
    card.wait_event("state shutting_down crashed", BOOT_TIMEOUT);
    // panic=-1 reboots the card; it comes back online.
    mic_test_support::wait_for(BOOT_TIMEOUT, "a second boot", || {
        (card.serial().matches("mic-card: online").count() >= 2).then_some(())
    });
    card.wait_state("online", BOOT_TIMEOUT);
    card.wait_shell();
    assert_eq!(card.run("echo back", CMD), "back");
}

#[test]
fn bridge_restart_reattaches_without_rebooting_the_card() {
    let tmp = mic_test_support::TempDir::new("reattach");
    let (mut card, img) = card_with_disk(&tmp);
    let boot_id = card.run("cat /proc/sys/kernel/random/boot_id", CMD);
    disk_works(&mut card, &img, 1);
    card.kill_bridge();
    card.start_bridge();
    card.wait_state("online", Duration::from_secs(30));
    // The new bridge adopted the card's page rather than publishing a
    // fresh one: same boot, working console and disk.
    assert_eq!(
        card.history().first().map(String::as_str),
        Some("attached adopted")
    );
    assert_eq!(
        card.run("cat /proc/sys/kernel/random/boot_id", CMD),
        boot_id
    );
    disk_works(&mut card, &img, 3);
    assert_eq!(card.serial().matches("mic-card: online").count(), 1);
}

#[test]
fn block_backend_that_dies_mid_write_loses_nothing() {
    let tmp = mic_test_support::TempDir::new("blk-dies");
    let (mut card, img) = card_with_disk(&tmp);
    // A 16 MiB write, slowed down so the backend dies in the middle of it.
    let out = card.run(
        "dd if=/dev/urandom of=/tmp/w bs=1M count=16 2>/dev/null && sha256sum /tmp/w",
        CMD,
    );
    let sum = sum_in(&out);
    card.type_text(
        "(for i in $(seq 0 15); do dd if=/tmp/w of=/dev/vda bs=1M skip=$i seek=$((i+8)) count=1 \
         oflag=direct 2>/dev/null; sleep 0.2; done; echo WRITE-DONE-$((40+2))) &\n",
    );
    std::thread::sleep(Duration::from_secs(1));
    card.restart_blk(Duration::from_secs(2));
    mic_test_support::wait_for(Duration::from_secs(180), "the write to finish", || {
        card.console_output()
            .contains("WRITE-DONE-42")
            .then_some(())
    });
    // The backend did go away mid-write and came back once.
    let blk: Vec<String> = card
        .devices()
        .into_iter()
        .filter(|l| l.split_whitespace().nth(1) == Some("blk"))
        .collect();
    assert_eq!(blk.len(), 1, "{blk:?}");
    assert!(blk[0].ends_with(" running reconnects=1"), "{blk:?}");
    assert_eq!(
        sha256_range(&img, 8 * MIB, 16 * MIB),
        sum,
        "bytes lost or corrupted"
    );
    // And the disk keeps working.
    disk_works(&mut card, &img, 30);
}

#[test]
fn hot_add_and_removal_of_a_disk() {
    let tmp = mic_test_support::TempDir::new("hotplug");
    let (mut card, img) = card_with_disk(&tmp);
    // A second disk served by its own mic-blk, added while the card runs.
    let img2 = image(tmp.path(), "hot.img", 16 * MIB);
    let sock2 = tmp.join("hot.sock");
    let mut blk2 = std::process::Command::new(mic_test_support::bin("mic-blk"))
        .arg("--socket-path")
        .arg(&sock2)
        .arg("--image")
        .arg(&img2)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    mic_test_support::wait_for(Duration::from_secs(20), "the second mic-blk", || {
        sock2.exists().then_some(())
    });
    let ctl = card.path("ctl.sock");
    let reply =
        vop_bridge::control::request(&ctl, &format!("add blk {}", sock2.display())).unwrap();
    assert_eq!(reply, "added device 3");
    mic_test_support::wait_for(Duration::from_secs(120), "vdb on the card", || {
        let (out, _) = card.run_status("cat /sys/block/vdb/size", CMD);
        (out == (16 * MIB / 512).to_string()).then_some(())
    });
    let out = card.run(
        "dd if=/dev/urandom of=/tmp/h bs=1M count=4 2>/dev/null && sha256sum /tmp/h && \
         dd if=/tmp/h of=/dev/vdb bs=1M oflag=direct 2>/dev/null",
        CMD,
    );
    assert_eq!(sha256_range(&img2, 0, 4 * MIB), sum_in(&out));
    let list = vop_bridge::control::request(&ctl, "devices").unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("3 blk ") && l.contains(" running ")),
        "{list}"
    );

    // Remove it again (device 3: after the console, the disk and vsock):
    // the card lets go, the bridge marks the slot removed.
    assert_eq!(
        vop_bridge::control::request(&ctl, "remove 3").unwrap(),
        "removing device 3"
    );
    // The card let go in time (`acked`), not the bridge's deadline.
    card.wait_event("removed 3 acked", Duration::from_secs(60));
    let (_, code) = card.run_status("test -e /sys/block/vdb", CMD);
    assert_ne!(code, 0, "vdb is still there");
    let list = vop_bridge::control::request(&ctl, "devices").unwrap();
    assert!(!list.contains("\n3 "), "{list}");
    // The first disk is untouched and still works.
    disk_works(&mut card, &img, 5);
    let _ = blk2.kill();
    let _ = blk2.wait();
}

#[test]
fn a_new_qemu_is_served_by_the_same_bridge_and_backends() {
    let tmp = mic_test_support::TempDir::new("new-qemu");
    let (mut card, img) = card_with_disk(&tmp);
    let first_boot = card.run("cat /proc/sys/kernel/random/boot_id", CMD);
    card.kill_qemu();
    card.wait_event("detached", Duration::from_secs(30));
    card.start_qemu();
    card.wait_online();
    assert_ne!(
        card.run("cat /proc/sys/kernel/random/boot_id", CMD),
        first_boot
    );
    disk_works(&mut card, &img, 4);
}
