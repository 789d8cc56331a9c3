//! Per-queue statistics a user can read (`backends/README.md`, "Stats"):
//! requests, bytes read and written, errors, how often the queue waited
//! for its rate limit, and latency percentiles.
//!
//! The data path only adds to atomics ([`QueueStats::record`]: a few
//! relaxed `fetch_add`s, no lock); a reader ([`QueueStats::snapshot`])
//! sees counts that may be a request apart from each other, never torn
//! values. Latencies go into a log-linear histogram: every power of two of
//! nanoseconds is split into eight buckets, so a percentile, reported as
//! its bucket's upper bound, is at most 12.5% above the true value.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Sub-buckets per power of two (as a shift).
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Buckets covering every `u64` of nanoseconds.
const BUCKETS: usize = (64 - SUB_BITS as usize) * SUB + SUB;

/// The histogram bucket of `ns`.
fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros();
    let sub = (ns >> (msb - SUB_BITS)) as usize & (SUB - 1);
    (msb - SUB_BITS + 1) as usize * SUB + sub
}

/// The largest value of bucket `i`.
fn upper_bound(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let msb = (i / SUB) as u32 + SUB_BITS - 1;
    let sub = (i % SUB) as u64;
    let width = 1u64 << (msb - SUB_BITS);
    // The last bucket ends at u64::MAX.
    ((SUB as u64 + sub) << (msb - SUB_BITS)).saturating_add(width - 1)
}

/// Latency percentiles in nanoseconds (0 when nothing was measured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest latency seen (its bucket's upper bound).
    pub max: u64,
}

/// The counters of one queue.
#[derive(Debug)]
pub struct QueueStats {
    name: String,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    throttled: AtomicU64,
    latency: Box<[AtomicU64]>,
}

/// What [`QueueStats::snapshot`] read: one entry of the `queues` array of
/// the stats socket's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueSnapshot {
    /// The queue's name (`0`, `rx0`, `tx0`...).
    pub queue: String,
    /// Requests completed.
    pub requests: u64,
    /// Bytes moved from the device to the driver (disk reads, frames
    /// received by the card).
    pub bytes_read: u64,
    /// Bytes moved from the driver to the device (disk writes, frames sent
    /// by the card).
    pub bytes_written: u64,
    /// Requests completed with an error (I/O error, unsupported or
    /// malformed request, dropped frame).
    pub errors: u64,
    /// Times the queue stopped taking requests for its rate limit.
    pub throttled: u64,
    /// Time from taking a request off the ring to completing it.
    pub latency_ns: Percentiles,
}

impl QueueStats {
    /// Zeroed counters for queue `name`.
    pub fn new(name: impl Into<String>) -> QueueStats {
        QueueStats {
            name: name.into(),
            requests: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts one completed request.
    pub fn record(&self, bytes_read: u64, bytes_written: u64, error: bool, latency: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if bytes_read != 0 {
            self.bytes_read.fetch_add(bytes_read, Relaxed);
        }
        if bytes_written != 0 {
            self.bytes_written.fetch_add(bytes_written, Relaxed);
        }
        if error {
            self.errors.fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency[bucket(ns)].fetch_add(1, Relaxed);
    }

    /// [`QueueStats::record`] with the latency since `started`.
    pub fn record_since(&self, bytes_read: u64, bytes_written: u64, error: bool, started: Instant) {
        self.record(bytes_read, bytes_written, error, started.elapsed());
    }

    /// Counts `n` requests that failed before any work was timed (a
    /// malformed chain, a frame dropped for want of buffers).
    pub fn record_failed(&self, n: u64) {
        if n != 0 {
            self.requests.fetch_add(n, Relaxed);
            self.errors.fetch_add(n, Relaxed);
        }
    }

    /// Counts one stop for the rate limit.
    pub fn record_throttled(&self) {
        self.throttled.fetch_add(1, Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> QueueSnapshot {
        let counts: Vec<u64> = self.latency.iter().map(|c| c.load(Relaxed)).collect();
        QueueSnapshot {
            queue: self.name.clone(),
            requests: self.requests.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
            latency_ns: percentiles(&counts),
        }
    }
}

/// The percentiles of a histogram's counts.
fn percentiles(counts: &[u64]) -> Percentiles {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return Percentiles::default();
    }
    // The smallest bucket below which at least `p` of the samples lie.
    let at = |p: f64| {
        let rank = ((total as f64 * p).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper_bound(i);
            }
        }
        upper_bound(counts.len() - 1)
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

impl QueueSnapshot {
    /// One log line (the `SIGUSR1` dump).
    pub fn line(&self) -> String {
        let l = &self.latency_ns;
        format!(
            "queue {}: {} requests, {} bytes read, {} bytes written, {} errors, throttled {} times, latency p50 {} p90 {} p99 {} max {}",
            self.queue,
            self.requests,
            self.bytes_read,
            self.bytes_written,
            self.errors,
            self.throttled,
            micros(l.p50),
            micros(l.p90),
            micros(l.p99),
            micros(l.max)
        )
    }
}

fn micros(ns: u64) -> String {
    format!("{:.1}us", ns as f64 / 1000.0)
}

/// The queues of a device, for as long as the daemon runs (frontends come
/// and go; the counters add up).
#[derive(Debug)]
pub struct DeviceStats {
    device: &'static str,
    started: Instant,
    queues: Vec<QueueStats>,
}

impl DeviceStats {
    /// Counters for the queues named `names` of daemon `device`.
    pub fn new<S: Into<String>>(
        device: &'static str,
        names: impl IntoIterator<Item = S>,
    ) -> DeviceStats {
        DeviceStats {
            device,
            started: Instant::now(),
            queues: names.into_iter().map(QueueStats::new).collect(),
        }
    }

    /// The daemon's name.
    pub fn device(&self) -> &'static str {
        self.device
    }

    /// Seconds since the counters started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Queue `i`'s counters.
    pub fn queue(&self, i: usize) -> Option<&QueueStats> {
        self.queues.get(i)
    }

    /// Every queue's counters now.
    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        self.queues.iter().map(QueueStats::snapshot).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_bound_their_values() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket(ns);
            assert!(b >= last, "{ns}");
            assert!(b < BUCKETS);
            last = b;
            let ub = upper_bound(b);
            assert!(ub >= ns, "{ns} -> {b} -> {ub}");
            // Within 12.5% above.
            assert!(ub - ns <= ns / 8, "{ns} -> {ub}");
            if b > 0 {
                assert!(upper_bound(b - 1) < ns, "{ns}");
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(upper_bound(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn counts_and_percentiles() {
        let q = QueueStats::new("0");
        // 100 requests: 1..=100 µs.
        for us in 1..=100u64 {
            q.record(4096, 0, us == 100, Duration::from_micros(us));
        }
        q.record(0, 512, false, Duration::from_micros(50));
        q.record_throttled();
        q.record_failed(0);
        let s = q.snapshot();
        assert_eq!(s.queue, "0");
        assert_eq!(s.requests, 101);
        assert_eq!(s.bytes_read, 100 * 4096);
        assert_eq!(s.bytes_written, 512);
        assert_eq!(s.errors, 1);
        assert_eq!(s.throttled, 1);
        let within = |got: u64, want_us: u64| {
            let want = want_us * 1000;
            assert!(got >= want && got - want <= want / 8, "{got} vs {want}");
        };
        within(s.latency_ns.p50, 50);
        within(s.latency_ns.p90, 90);
        within(s.latency_ns.p99, 99);
        within(s.latency_ns.max, 100);
        let line = s.line();
        assert!(line.starts_with("queue 0: 101 requests"), "{line}");
        q.record_failed(2);
        let s = q.snapshot();
        assert_eq!((s.requests, s.errors), (103, 3));
        within(s.latency_ns.p50, 50);
    }

    #[test]
    fn empty_and_json() {
        let d = DeviceStats::new("mic-x", ["rx0", "tx0"]);
        let s = d.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].latency_ns, Percentiles::default());
        let v = serde_json::to_value(&s[0]).unwrap();
        assert_eq!(v["queue"], "rx0");
        assert_eq!(v["requests"], 0);
        assert_eq!(v["latency_ns"]["p99"], 0);
        assert!(d.queue(2).is_none());
        assert_eq!(d.device(), "mic-x");
    }

    #[test]
    fn concurrent_records_add_up() {
        let q = std::sync::Arc::new(QueueStats::new("0"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        q.record(1, 2, false, Duration::from_nanos(700));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = q.snapshot();
        assert_eq!(
            (s.requests, s.bytes_read, s.bytes_written),
            (40_000, 40_000, 80_000)
        );
    }
}
