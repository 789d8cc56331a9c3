//! A daemon's stats socket (`--stats-socket`, `backends/README.md`,
//! "Stats"): one request line, one JSON answer line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Sends `line` (`stats`, `limit iops=N`...) and returns the answer, or
/// `None` when the socket does not answer within 5 s.
pub fn try_ask(socket: &Path, line: &str) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    writeln!(s, "{line}").ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    serde_json::from_str(&answer).ok()
}

/// [`try_ask`], panicking when the socket does not answer.
pub fn ask(socket: &Path, line: &str) -> Value {
    try_ask(socket, line).unwrap_or_else(|| panic!("no answer to {line:?} on {}", socket.display()))
}

/// The `requests` count of each named queue (`rx0`, `tx0`...) in a `stats`
/// answer.
pub fn queue_requests(stats: &Value) -> Vec<(String, u64)> {
    stats["queues"]
        .as_array()
        .map(|qs| {
            qs.iter()
                .map(|q| {
                    (
                        q["queue"].as_str().unwrap_or_default().to_string(),
                        q["requests"].as_u64().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn asks_one_line_and_reads_the_answer() {
        let dir = crate::TempDir::new("stats");
        let path = dir.join("stats.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(c.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line, "stats\n");
            let mut c = c;
            writeln!(
                c,
                r#"{{"queues":[{{"queue":"rx0","requests":7}},{{"queue":"tx0","requests":2}}]}}"#
            )
            .unwrap();
        });
        let v = ask(&path, "stats");
        server.join().unwrap();
        assert_eq!(
            queue_requests(&v),
            vec![("rx0".to_string(), 7), ("tx0".to_string(), 2)]
        );
        assert!(try_ask(&dir.join("none.sock"), "stats").is_none());
    }
}
