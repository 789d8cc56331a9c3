//! The README's main command: `scripts/run-card` boots a card with console,
//! disk and network, takes the console from stdin, and ends when the card
//! powers off.

mod card;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use card::{wait_for, workspace, TempDir, BOOT_TIMEOUT};

#[test]
fn run_card_boots_takes_console_input_and_ends_on_poweroff() {
    let dir = TempDir::new("run-card");
    let work = dir.0.join("work");
    let mut child = Command::new(workspace().join("scripts/run-card"))
        .args([
            "--net",
            "passt",
            "--disk-size",
            "64M",
            "--memory",
            "512",
            "--cpus",
            "1",
        ])
        .arg("--workdir")
        .arg(&work)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("run-card.err")).unwrap())
        .spawn()
        .unwrap();
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
