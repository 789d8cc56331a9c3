//! The example CI job for users' own card software
//! (`scripts/examples/ci-card-test`, `docs/ci-example.md`): it boots a card
//! through micd with an overlay, runs a test in the card through the agent,
//! returns the test's exit status and collects the card's log on failure.
//! Each test boots one card; run with `--test-threads=1` on a two-core
//! machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mic_test_support::{bin, TempDir};

/// Runs the example job with `args`, on this build's binaries, QEMU and
/// card image.
fn ci_card_test(args: &[&std::ffi::OsStr]) -> Output {
    let bin_dir = bin("micd").parent().unwrap().to_path_buf();
    Command::new(mic_test_support::workspace().join("scripts/examples/ci-card-test"))
        .args(args)
        .env("MIC_BIN_DIR", bin_dir)
        .env("MIC_QEMU", mic_test_support::qemu())
        .env("MIC_CARD_DIR", mic_test_support::card_dir())
        .output()
        .unwrap()
}

/// The example overlay (`scripts/examples/ci-overlay`) copied into `dir`,
/// plus a test that fails on purpose: it leaves a line in the card's log
/// and exits 3.
fn overlay_with_failing_test(dir: &Path) -> PathBuf {
    let overlay = dir.join("overlay");
    let status = Command::new("cp")
        .arg("-a")
        .arg(mic_test_support::workspace().join("scripts/examples/ci-overlay"))
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(status.success());
    let test = overlay.join("opt/ci/fail-on-purpose");
    std::fs::write(
        &test,
        "#!/bin/sh\necho 'not ok - on purpose'\n\
         echo CI-FAILED-ON-PURPOSE-$((6*7)) >/dev/console\nexit 3\n",
    )
    .unwrap();
    let mut perm = std::fs::metadata(&test).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&test, perm).unwrap();
    overlay
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The example overlay's own tests pass: status 0, their output comes back
/// (its start-up script ran at boot in the card), and no log is collected.
#[test]
fn ci_example_passes_with_the_example_overlay() {
    let dir = TempDir::new("ci-pass");
    let log = dir.join("card.log");
    let overlay = mic_test_support::workspace().join("scripts/examples/ci-overlay");
    let out = ci_card_test(&["--log".as_ref(), log.as_os_str(), overlay.as_os_str()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(
        stdout,
        "ok - test -s /run/ci/setup-done\n\
         ok - grep -qw vmw_vsock_virtio_transport /proc/modules\n\
         ok - test mic0 = mic0\n"
    );
    assert!(!log.exists(), "a log was collected for a passing job");
}

/// A test that fails on purpose: its status (3) is the job's, and the
/// card's log is collected, with what the test wrote to the card's console
/// and the overlay's start-up script's mark.
#[test]
fn ci_example_returns_a_failing_status_and_the_log() {
    let dir = TempDir::new("ci-fail");
    let overlay = overlay_with_failing_test(dir.path());
    // As a cpio archive, the other form an overlay takes.
    let cpio = dir.join("overlay.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . -mindepth 1 | cpio --quiet -o -H newc -R 0:0 >\"$2\"")
        .arg("sh")
        .arg(&overlay)
        .arg(&cpio)
        .status()
        .unwrap();
    assert!(status.success());
    let log = dir.join("card.log");
    let out = ci_card_test(&[
        "--log".as_ref(),
        log.as_os_str(),
        cpio.as_os_str(),
        "--".as_ref(),
        "/opt/ci/fail-on-purpose".as_ref(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert_eq!(stdout, "not ok - on purpose\n");
    let log = std::fs::read_to_string(&log).expect("the card's log was collected");
    assert!(log.contains("CI-FAILED-ON-PURPOSE-42"), "{log}");
    assert!(log.contains("mic-card: rc.d 10-ci-setup exit 0"), "{log}");
}
