//! The README's main command: `scripts/run-card` boots a card with console,
//! disk and network, takes the console from stdin, and ends when the card
//! powers off.

mod card;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use card::{wait_for, workspace, TempDir, BOOT_TIMEOUT};

/// Starts `scripts/run-card ARGS` for a small card (64 MiB disk, 512 MiB,
/// one CPU) with its work directory in `dir` and the console on a pipe;
/// returns the child and the work directory.
fn start_run_card(dir: &TempDir, args: &[&str]) -> (Child, PathBuf) {
    let work = dir.0.join("work");
    let child = Command::new(workspace().join("scripts/run-card"))
        .args(args)
        .args(["--disk-size", "64M", "--memory", "512", "--cpus", "1"])
        .arg("--workdir")
        .arg(&work)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("run-card.err")).unwrap())
        .spawn()
        .unwrap();
    (child, work)
}

#[test]
fn run_card_boots_takes_console_input_and_ends_on_poweroff() {
    let dir = TempDir::new("run-card");
    let (mut child, work) = start_run_card(&dir, &["--net", "passt"]);
    let console_log = work.join("console.log");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let serial = work.join("serial.log");
    wait_for(
        BOOT_TIMEOUT + Duration::from_secs(120),
        "the card to come online",
        || {
            read(&serial)
                .contains("mic-card: online devices=net,blk,console")
                .then_some(())
        },
    );
    let mut stdin = child.stdin.take().unwrap();
    // The shell on the console may still be starting: repeat until it answers.
    wait_for(Duration::from_secs(60), "the console shell", || {
        stdin
            .write_all(b"echo RUN-CARD-$((6*7)) $(cat /sys/block/vda/size) $(cat /sys/class/net/eth0/address)\n")
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        read(&console_log)
            .contains("RUN-CARD-42 131072 ")
            .then_some(())
    });
    assert!(work.join("disk.img").exists(), "no disk image was created");
    stdin.write_all(b"poweroff\n").unwrap();
    let status = wait_for(Duration::from_secs(120), "run-card to end", || {
        child.try_wait().unwrap()
    });
    let err = read(&dir.0.join("run-card.err"));
    assert!(status.success(), "run-card failed: {err}");
    assert!(
        err.contains("card state: ready (shutdown status poweroff)"),
        "{err}"
    );
}

/// `--bzimage` boots the compressed kernel through SeaBIOS, the ordinary
/// way; with `--net none` the card waits for no network and comes online
/// with the disk and the console the host attached.
#[test]
fn run_card_boots_the_bzimage_and_waits_only_for_attached_devices() {
    let dir = TempDir::new("run-card-bzimage");
    let (mut child, work) = start_run_card(&dir, &["--bzimage", "--net", "none"]);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let serial = work.join("serial.log");
    let online = wait_for(BOOT_TIMEOUT, "the card to come online", || {
        let s = read(&serial);
        let line = s.lines().find(|l| l.starts_with("mic-card: online "))?;
        Some(line.to_string())
    });
    // Not after mic.wait's 30 s with whatever was there: with what was attached.
    assert_eq!(online, "mic-card: online devices=blk,console");
    let mut stdin = child.stdin.take().unwrap();
    let console_log = work.join("console.log");
    wait_for(Duration::from_secs(60), "the console shell", || {
        stdin
            .write_all(b"echo BZIMAGE-$((6*7)) $(cat /sys/block/vda/size) $(ls /sys/class/net)\n")
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        read(&console_log)
            .contains("BZIMAGE-42 131072 lo\r\n")
            .then_some(())
    });
    stdin.write_all(b"poweroff\n").unwrap();
    let status = wait_for(Duration::from_secs(120), "run-card to end", || {
        child.try_wait().unwrap()
    });
    let err = read(&dir.0.join("run-card.err"));
    assert!(status.success(), "run-card failed: {err}");
}

/// `--overlay DIR`: the directory's files are in the card, its
/// `/etc/mic/rc.d/` script ran at boot, and the agent reads both.
#[test]
fn run_card_adds_an_overlay_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("run-card-overlay");
    let overlay = dir.0.join("overlay");
    std::fs::create_dir_all(overlay.join("etc/mic/rc.d")).unwrap();
    std::fs::create_dir_all(overlay.join("opt/user")).unwrap();
    std::fs::write(overlay.join("opt/user/data"), "user data 42\n").unwrap();
    let script = overlay.join("etc/mic/rc.d/10-mark");
    std::fs::write(
        &script,
        "#!/bin/sh\necho rc.d-ran-$((6*7)) >/run/overlay-mark\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let overlay_arg = overlay.to_str().unwrap().to_string();
    let (mut child, work) = start_run_card(&dir, &["--net", "none", "--overlay", &overlay_arg]);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let serial = work.join("serial.log");
    wait_for(BOOT_TIMEOUT, "the card to come online", || {
        read(&serial).contains("mic-card: online ").then_some(())
    });
    assert!(
        read(&serial).contains("mic-card: rc.d 10-mark exit 0"),
        "{}",
        read(&serial)
    );
    let out = Command::new(card::bin("micctl"))
        .arg("-s")
        .arg(work.join("vsock.uds"))
        .args(["exec", "--", "cat", "/opt/user/data", "/run/overlay-mark"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "user data 42\nrc.d-ran-42\n"
    );
    // The image's own files are still there.
    let out = Command::new(card::bin("micctl"))
        .arg("-s")
        .arg(work.join("vsock.uds"))
        .args(["exec", "--", "test", "-x", "/sbin/mic-agent"])
        .status()
        .unwrap();
    assert!(out.success());
    // Through the agent, not the console (its shell may still be starting);
    // the agent goes down with the card, so its status is not the point.
    let _ = Command::new(card::bin("micctl"))
        .arg("-s")
        .arg(work.join("vsock.uds"))
        .args(["exec", "--", "poweroff"])
        .status();
    let status = wait_for(Duration::from_secs(120), "run-card to end", || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "{}", read(&dir.0.join("run-card.err")));
}
