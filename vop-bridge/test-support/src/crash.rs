//! A block backend's crash under load (`docs/inflight-io.md`): the card's
//! checking load, and what the test reads of the backend while it kills it.
//!
//! Used by mic-blk's test under stock QEMU (`backends/blk/tests/
//! crash_recovery.rs`) and the bridge's under VOP (`vop-bridge/tests/
//! boot_devices.rs`), which give the card the same load and kill the
//! backend the same way.

use std::path::Path;
use std::time::{Duration, Instant};

/// The card's load: four writers at once, each writing 1 MiB of fresh
/// random data with O_DIRECT in 64 KiB requests and a flush (`fsync`) to
/// its own area of `/dev/vda`, then reading it back with O_DIRECT and
/// comparing checksums, until `/tmp/stop` exists. Counts go to
/// `/tmp/result` as `ok=N bad=N`, and `done` once stopped; a failed dd
/// counts as bad. (No single quotes: [`load_script_command`] quotes it.)
pub const LOAD: &str = r#"
ok=0; bad=0; n=0
while [ ! -e /tmp/stop ]; do
  dd if=/dev/urandom of=/tmp/src bs=64k count=16 2>/dev/null
  want=$(sha256sum < /tmp/src | cut -d" " -f1)
  for j in 0 1 2 3; do
    dd if=/tmp/src of=/dev/vda bs=64k seek=$(( (n % 8) * 64 + j * 16 )) oflag=direct conv=notrunc,fsync 2>/dev/null > /tmp/st$j || echo fail > /tmp/st$j &
  done
  wait
  for j in 0 1 2 3; do
    got=$(dd if=/dev/vda bs=64k skip=$(( (n % 8) * 64 + j * 16 )) count=16 iflag=direct 2>/dev/null | sha256sum | cut -d" " -f1)
    if [ "$got" = "$want" ] && [ ! -s /tmp/st$j ]; then ok=$((ok+1)); else bad=$((bad+1)); fi
  done
  n=$((n+1))
  echo "ok=$ok bad=$bad" > /tmp/result.new && mv /tmp/result.new /tmp/result
done
echo done >> /tmp/result
"#;

/// A shell command that writes [`LOAD`] to `/tmp/load.sh` on the card.
pub fn load_script_command() -> String {
    assert!(!LOAD.contains('\''));
    let lines: Vec<String> = LOAD.trim().lines().map(|l| format!("'{l}'")).collect();
    format!("printf '%s\\n' {} > /tmp/load.sh", lines.join(" "))
}

/// The `ok=` and `bad=` counts of a `/tmp/result` the load wrote.
pub fn load_result(result: &str) -> (u64, u64) {
    let line = result
        .lines()
        .find(|l| l.trim_start().starts_with("ok="))
        .unwrap_or_else(|| panic!("no result line: {result}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("ok="), field("bad="))
}

/// The `resubmitted` count of the mic-blk whose stats socket is `stats`
/// (`stats` on it, `backends/README.md`, "Stats"), if it answers.
pub fn resubmitted(stats: &Path) -> Option<u64> {
    crate::stats::try_ask(stats, "stats")?["resubmitted"].as_u64()
}

/// Whether a thread of `pid` is blocked in the kernel (state `D`, proc(5)):
/// a worker waiting for the image, with a request in flight.
pub fn doing_io(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            // The state follows the parenthesised command name.
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('D'))
        })
    })
}

/// Waits until [`doing_io`] for `pid`, or `at_most`: when to kill the
/// backend to catch a request in flight.
pub fn wait_doing_io(pid: u32, at_most: Duration) {
    let deadline = Instant::now() + at_most;
    while !doing_io(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Whether `pid` has a thread named `name`.
pub fn has_thread(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks
            .flatten()
            .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_line_is_read_back() {
        assert_eq!(load_result("ok=12 bad=0\ndone\n"), (12, 0));
        assert_eq!(load_result("noise\nok=3 bad=1"), (3, 1));
    }

    #[test]
    fn this_process_has_its_main_thread_and_is_not_blocked() {
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(has_thread(me, comm.trim()));
        assert!(!has_thread(me, "no-such-thread"));
        assert!(!doing_io(u32::MAX));
    }

    #[test]
    fn the_script_command_quotes_every_line() {
        let c = load_script_command();
        assert!(c.starts_with("printf '%s\\n' 'ok=0; bad=0; n=0' "));
        assert!(c.ends_with("> /tmp/load.sh"));
    }
}
