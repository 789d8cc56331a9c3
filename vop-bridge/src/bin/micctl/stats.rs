//! `micctl stats CARD` and `micctl limit CARD BACKEND KEY=N...`: the stats
//! sockets micd gives the card's `mic-blk` and `mic-net` daemons
//! (`--stats-socket`, beside their vhost-user sockets in the card's
//! directory; `backends/README.md`, "Stats" and "Rate limits").

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vop_bridge::micd::launch::EXTERNAL;
use vop_bridge::micd::layout::stats_socket_name;
use vop_bridge::micd::protocol::CardStatus;

/// How long a backend may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The card's backends that serve stats, with their stats sockets.
pub fn stats_sockets(card: &CardStatus) -> Vec<(String, PathBuf)> {
    card.devices
        .iter()
        .filter(|d| (d.kind == "blk" || d.kind == "net") && d.backend != EXTERNAL)
        .map(|d| {
            let sock = Path::new(&d.socket).with_file_name(stats_socket_name(&d.backend));
            (d.backend.clone(), sock)
        })
        .collect()
}

/// Sends one command line to a stats socket; its JSON answer.
pub fn ask(socket: &Path, line: &str) -> io::Result<Value> {
    let c = UnixStream::connect(socket)?;
    c.set_read_timeout(Some(TIMEOUT))?;
    c.set_write_timeout(Some(TIMEOUT))?;
    writeln!(&c, "{line}")?;
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(io::Error::other)
}

/// The limits of a `stats` or `limit` answer as `key=N ...`, sorted,
/// bursts left out (0: unlimited).
fn limits_line(limits: &Value) -> String {
    let Some(m) = limits.as_object() else {
        return String::new();
    };
    let mut parts: Vec<String> = m
        .iter()
        .filter(|(k, _)| !k.ends_with("_burst"))
        .map(|(k, v)| match v.as_u64() {
            Some(0) => format!("{k}=unlimited"),
            Some(n) => {
                let burst = m.get(&format!("{k}_burst")).and_then(Value::as_u64);
                format!("{k}={n} (burst {})", burst.unwrap_or(n))
            }
            None => format!("{k}={v}"),
        })
        .collect();
    parts.sort();
    parts.join(", ")
}

fn micros(v: &Value) -> String {
    format!("{:.1}us", v.as_u64().unwrap_or(0) as f64 / 1000.0)
}

/// A backend's `stats` answer as text: one line for the backend, one per
/// queue.
pub fn render(backend: &str, v: &Value) -> String {
    let mut out = format!("{backend}: limits {}\n", limits_line(&v["limits"]));
    for q in v["queues"].as_array().into_iter().flatten() {
        let l = &q["latency_ns"];
        out.push_str(&format!(
            "  queue {}: {} requests, {} bytes read, {} bytes written, {} errors, throttled {} times, latency p50 {} p90 {} p99 {}\n",
            q["queue"].as_str().unwrap_or("?"),
            q["requests"],
            q["bytes_read"],
            q["bytes_written"],
            q["errors"],
            q["throttled"],
            micros(&l["p50"]),
            micros(&l["p90"]),
            micros(&l["p99"]),
        ));
    }
    out
}

/// Whether the card's backends run.
fn running(card: &CardStatus) -> Result<(), (i32, String)> {
    if card.state == "ready" {
        return Err((
            3,
            format!("{} is ready: its backends are not running", card.name),
        ));
    }
    Ok(())
}

/// `micctl stats CARD [--json]`: every backend's stats; the exit code.
pub fn show(card: &CardStatus, json: bool) -> i32 {
    if let Err((code, msg)) = running(card) {
        eprintln!("micctl: {msg}");
        return code;
    }
    let mut code = 0;
    let mut all = serde_json::Map::new();
    for (backend, sock) in stats_sockets(card) {
        match ask(&sock, "stats") {
            Ok(v) if json => {
                all.insert(backend, v);
            }
            Ok(v) => print!("{}", render(&backend, &v)),
            Err(e) => {
                eprintln!("micctl: {backend}: {}: {e}", sock.display());
                code = 1;
            }
        }
    }
    if json {
        let out = serde_json::json!({ "card": card.name, "backends": all });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    code
}

/// `micctl limit CARD BACKEND KEY=N...`: changes a backend's limits and
/// prints them; the exit code.
pub fn limit(card: &CardStatus, backend: &str, settings: &[String]) -> i32 {
    if let Err((code, msg)) = running(card) {
        eprintln!("micctl: {msg}");
        return code;
    }
    let Some((_, sock)) = stats_sockets(card).into_iter().find(|(b, _)| b == backend) else {
        eprintln!(
            "micctl: {} has no backend {backend} with rate limits",
            card.name
        );
        return 2;
    };
    match ask(&sock, &format!("limit {}", settings.join(" "))) {
        Ok(v) if v["error"].is_string() => {
            eprintln!("micctl: {backend}: {}", v["error"].as_str().unwrap_or(""));
            2
        }
        Ok(v) => {
            println!("{backend}: limits {}", limits_line(&v["limits"]));
            0
        }
        Err(e) => {
            eprintln!("micctl: {backend}: {}: {e}", sock.display());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vop_bridge::micd::protocol::DeviceStatus;

    fn device(kind: &str, backend: &str, socket: &str) -> DeviceStatus {
        DeviceStatus {
            kind: kind.into(),
            backend: backend.into(),
            socket: socket.into(),
            pid: None,
            restarts: 0,
            image: None,
        }
    }

    #[test]
    fn sockets_beside_the_vhost_sockets() {
        let card = CardStatus {
            devices: vec![
                device("console", "console", "/s/mic0/vhost-console.sock"),
                device("blk", "blk0", "/s/mic0/vhost-blk0.sock"),
                device("net", "net", "/s/mic0/vhost-net.sock"),
                device("blk", EXTERNAL, "/q/blk.sock"),
            ],
            ..Default::default()
        };
        assert_eq!(
            stats_sockets(&card),
            [
                ("blk0".to_string(), PathBuf::from("/s/mic0/stats-blk0.sock")),
                ("net".to_string(), PathBuf::from("/s/mic0/stats-net.sock")),
            ]
        );
    }

    #[test]
    fn text_has_a_line_per_queue() {
        let v = serde_json::json!({
            "device": "mic-blk",
            "limits": {"iops": 500, "iops_burst": 50, "bps": 0, "bps_burst": 0},
            "queues": [
                {"queue": "0", "requests": 7, "bytes_read": 4096, "bytes_written": 0,
                 "errors": 1, "throttled": 2,
                 "latency_ns": {"p50": 1500, "p90": 2000, "p99": 9000, "max": 9000}},
                {"queue": "1", "requests": 0, "bytes_read": 0, "bytes_written": 0,
                 "errors": 0, "throttled": 0,
                 "latency_ns": {"p50": 0, "p90": 0, "p99": 0, "max": 0}}
            ]
        });
        let text = render("blk0", &v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "blk0: limits bps=unlimited, iops=500 (burst 50)");
        assert!(lines[1].starts_with("  queue 0: 7 requests, 4096 bytes read"));
        assert!(lines[1].ends_with("p50 1.5us p90 2.0us p99 9.0us"));
    }
}
