//! Boot test: the card's console on a pty (`mic-console --pty
//! --no-multiport`); resizing the host terminal reaches the card's hvc0
//! through the vhost-user config-change path and the bridge.

use std::time::Duration;

use mic_test_support::{wait_for, Card, CardOptions, ConsoleMode};

const CMD: Duration = Duration::from_secs(120);
const RESIZE: Duration = Duration::from_secs(60);

/// Waits until the card's hvc0 reports `rows cols`.
fn wait_card_size(card: &mut Card, rows: u16, cols: u16) {
    let want = format!("{rows} {cols}");
    let mut last = String::new();
    let deadline = std::time::Instant::now() + RESIZE;
    while std::time::Instant::now() < deadline {
        last = card.run("stty size < /dev/hvc0", CMD);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("the card reports {last:?}, not {want:?}");
}

fn config_changes(card: &Card) -> usize {
    card.history()
        .iter()
        .filter(|e| *e == "config 0 changed")
        .count()
}

#[test]
fn pty_resize_reaches_the_card() {
    let mut card = Card::boot(CardOptions {
        console: ConsoleMode::Pty,
        ..Default::default()
    });
    assert_eq!(card.console_run("tty", CMD), "/dev/hvc0");
    let devices = card.devices();
    assert!(
        devices[0].starts_with("0 console ") && devices[0].contains(" running "),
        "{devices:?}"
    );

    card.set_console_size(37, 111);
    wait_card_size(&mut card, 37, 111);
    wait_for(
        Duration::from_secs(10),
        "the bridge to pass the config change on",
        || (config_changes(&card) >= 1).then_some(()),
    );
    // The console still works.
    assert_eq!(card.run("echo $((6 * 7))", CMD), "42");

    // A second change once the bridge's once-a-second tick has finished the
    // first one's handshake (`config_change` and `guest_ack` back to 0): the
    // card handles a change only while `guest_ack` is 0.
    std::thread::sleep(Duration::from_secs(3));
    card.set_console_size(25, 90);
    wait_card_size(&mut card, 25, 90);
    wait_for(
        Duration::from_secs(10),
        "the bridge's second config change",
        || (config_changes(&card) >= 2).then_some(()),
    );
    assert_eq!(card.run("echo ok", CMD), "ok");
}
