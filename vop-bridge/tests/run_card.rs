//! The README's main command: `scripts/run-card` boots a card with console,
//! disk and network through micd, takes the console from stdin, and ends
//! when the card powers off.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mic_test_support::{wait_for, workspace, TempDir, BOOT_TIMEOUT};

/// Starts `scripts/run-card ARGS` for small cards (64 MiB disk, 512 MiB,
/// one CPU) with its work directory (micd's state directory) in `dir` and
/// the console on a pipe; returns the child and the work directory.
fn start_run_card(dir: &TempDir, args: &[&str]) -> (Child, PathBuf) {
    let work = dir.join("work");
    let child = Command::new(workspace().join("scripts/run-card"))
        .args(args)
        .args(["--disk-size", "64M", "--memory", "512", "--cpus", "1"])
        .arg("--workdir")
        .arg(&work)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("run-card.err")).unwrap())
        .spawn()
        .unwrap();
    (child, work)
}

/// Every card as micd reports it (`micctl status --json`): name, state
/// and QEMU's pid.
fn card_states(work: &std::path::Path) -> Vec<(String, String, Option<u64>)> {
    let out = Command::new(workspace().join("target/release/micctl"))
        .arg("-s")
        .arg(work.join("micd.sock"))
        .args(["status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["cards"]
        .as_array()
        .map(|cards| {
            cards
                .iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                    (s("name"), s("state"), c["qemu_pid"].as_u64())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Two cards through micd; mic0's console on stdin; poweroff in mic0 ends
/// the session and shuts mic1 down too.
#[test]
fn run_card_boots_takes_console_input_and_ends_on_poweroff() {
    let dir = TempDir::new("run-card");
    let (mut child, work) = start_run_card(&dir, &["--net", "passt", "--cards", "2"]);
    let console_log = work.join("mic0/console.log");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let serial = work.join("mic0/serial.log");
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
    assert!(
        work.join("mic0/disk0.img").exists(),
        "no disk image was created"
    );
    let qemus = wait_for(BOOT_TIMEOUT, "both cards online", || {
        let s = card_states(&work);
        let names: Vec<_> = s.iter().map(|c| (c.0.as_str(), c.1.as_str())).collect();
        (names == [("mic0", "online"), ("mic1", "online")])
            .then(|| s.iter().filter_map(|c| c.2).collect::<Vec<_>>())
    });
    assert_eq!(qemus.len(), 2, "micd shows no QEMU pid of a running card");
    stdin.write_all(b"poweroff\n").unwrap();
    let status = wait_for(Duration::from_secs(120), "run-card to end", || {
        child.try_wait().unwrap()
    });
    let err = read(&dir.join("run-card.err"));
    assert!(status.success(), "run-card failed: {err}");
    assert!(
        err.contains("card state: ready (shutdown status poweroff)"),
        "{err}"
    );
    // mic1 was shut down with the session: no QEMU of either card is left,
    // nor the link's hub, nor the vsock group's backend.
    let shared =
        ["link.pid", "vsock-group.pid"].map(|f| read(&work.join(f)).trim().parse::<u64>().unwrap());
    for pid in qemus.into_iter().chain(shared) {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still runs"
        );
    }
}

/// `--bzimage` boots the compressed kernel through SeaBIOS, the ordinary
/// way; with `--net none` the card waits for no network and comes online
/// with the disk and the console the host attached.
#[test]
fn run_card_boots_the_bzimage_and_waits_only_for_attached_devices() {
    let dir = TempDir::new("run-card-bzimage");
    let (mut child, work) = start_run_card(&dir, &["--bzimage", "--net", "none"]);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let serial = work.join("mic0/serial.log");
    let online = wait_for(BOOT_TIMEOUT, "the card to come online", || {
        let s = read(&serial);
        let line = s.lines().find(|l| l.starts_with("mic-card: online "))?;
        Some(line.to_string())
    });
    // Not after mic.wait's 30 s with whatever was there: with what was attached.
    assert_eq!(online, "mic-card: online devices=blk,console");
    let mut stdin = child.stdin.take().unwrap();
    let console_log = work.join("mic0/console.log");
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
    let err = read(&dir.join("run-card.err"));
    assert!(status.success(), "run-card failed: {err}");
}

/// `--overlay DIR`: the directory's files are in the card, its
/// `/etc/mic/rc.d/` script ran at boot, and the agent reads both.
#[test]
fn run_card_adds_an_overlay_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("run-card-overlay");
    let overlay = dir.join("overlay");
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
    let serial = work.join("mic0/serial.log");
    wait_for(BOOT_TIMEOUT, "the card to come online", || {
        read(&serial).contains("mic-card: online ").then_some(())
    });
    assert!(
        read(&serial).contains("mic-card: rc.d 10-mark exit 0"),
        "{}",
        read(&serial)
    );
    let out = Command::new(mic_test_support::bin("micctl"))
        .arg("-s")
        .arg(work.join("micd.sock"))
        .args([
            "exec",
            "mic0",
            "--",
            "cat",
            "/opt/user/data",
            "/run/overlay-mark",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "user data 42\nrc.d-ran-42\n"
    );
    // The image's own files are still there.
    let out = Command::new(mic_test_support::bin("micctl"))
        .arg("-s")
        .arg(work.join("micd.sock"))
        .args(["exec", "mic0", "--", "test", "-x", "/sbin/mic-agent"])
        .status()
        .unwrap();
    assert!(out.success());
    // Through the agent, not the console (its shell may still be starting);
    // the agent goes down with the card, so its status is not the point.
    let _ = Command::new(mic_test_support::bin("micctl"))
        .arg("-s")
        .arg(work.join("micd.sock"))
        .args(["exec", "mic0", "--", "poweroff"])
        .status();
    let status = wait_for(Duration::from_secs(120), "run-card to end", || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "{}", read(&dir.join("run-card.err")));
}
