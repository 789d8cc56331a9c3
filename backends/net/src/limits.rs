//! `mic-net`'s rate limits and stats (`backends/README.md`, "Rate limits"
//! and "Stats"): per direction, frames per second and bytes per second,
//! each with a burst. `rx` is what the card receives (host to card, the
//! RX queues), `tx` what it sends (the TX queues). Bytes are frame bytes,
//! without the virtio-net header.
//!
//! A direction over its limit stops taking frames: RX leaves them in the
//! tap or the stream socket (the kernel holds them, and a stream peer is
//! slowed by its socket's flow control), TX leaves the driver's chains in
//! the ring. The pair's worker arms its [`Wakeup`], registered in its
//! epoll set, and goes back to waiting; the wakeup runs both queues of the
//! pair again.

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mic_backend_common::control::{NamedThrottle, Served};
use mic_backend_common::limited;
use mic_backend_common::ratelimit::{per_minute, LogLimiter};
use mic_backend_common::stats::{DeviceStats, QueueStats};
use mic_backend_common::throttle::{parse_count, Limits, Rate, Throttle};
use mic_backend_common::timer::Wakeup;
use mic_backend_common::worker::Worker;
use vmm_sys_util::epoll::EventSet;

use crate::txq::TxSink;

/// Failed timer set-ups.
static TIMER_LINES: LogLimiter = per_minute();

/// Rate-limit and stats options of `mic-net`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq, Default)]
pub struct LimitArgs {
    /// Limit what the card receives to N bytes per second (suffixes K, M,
    /// G, Ki, Mi, Gi).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub rx_bps: Option<u64>,
    /// Burst of --rx-bps [default: one second's worth].
    #[arg(long, value_name = "N", value_parser = parse_count, requires = "rx_bps")]
    pub rx_bps_burst: Option<u64>,
    /// Limit what the card receives to N frames per second.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub rx_pps: Option<u64>,
    /// Burst of --rx-pps [default: one second's worth].
    #[arg(long, value_name = "N", value_parser = parse_count, requires = "rx_pps")]
    pub rx_pps_burst: Option<u64>,
    /// Limit what the card sends to N bytes per second.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub tx_bps: Option<u64>,
    /// Burst of --tx-bps [default: one second's worth].
    #[arg(long, value_name = "N", value_parser = parse_count, requires = "tx_bps")]
    pub tx_bps_burst: Option<u64>,
    /// Limit what the card sends to N frames per second.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub tx_pps: Option<u64>,
    /// Burst of --tx-pps [default: one second's worth].
    #[arg(long, value_name = "N", value_parser = parse_count, requires = "tx_pps")]
    pub tx_pps_burst: Option<u64>,
    /// Serve the stats and change the limits on a UNIX socket at PATH
    /// (see backends/README.md, "Stats").
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,
}

fn rate(r: Option<u64>, burst: Option<u64>) -> Option<Rate> {
    r.filter(|&r| r > 0).map(|r| Rate::with_burst(r, burst))
}

impl LimitArgs {
    /// The limits of what the card receives.
    pub fn rx(&self) -> Limits {
        Limits {
            ops: rate(self.rx_pps, self.rx_pps_burst),
            bytes: rate(self.rx_bps, self.rx_bps_burst),
        }
    }

    /// The limits of what the card sends.
    pub fn tx(&self) -> Limits {
        Limits {
            ops: rate(self.tx_pps, self.tx_pps_burst),
            bytes: rate(self.tx_bps, self.tx_bps_burst),
        }
    }
}

/// Rate limits and stats of the device, for the daemon's life.
#[derive(Debug)]
pub struct Accounting {
    /// Host to card.
    pub rx: Arc<Throttle>,
    /// Card to host.
    pub tx: Arc<Throttle>,
    /// Queues `rx0`, `tx0`, `rx1`... in queue order.
    pub stats: Arc<DeviceStats>,
    /// One wakeup per queue pair (each pair has its worker thread).
    wakeups: Vec<Arc<Wakeup>>,
}

impl Accounting {
    /// Counters and wakeups for `pairs` queue pairs.
    pub fn new(pairs: usize, rx: Limits, tx: Limits) -> io::Result<Accounting> {
        let names = (0..pairs).flat_map(|i| [format!("rx{i}"), format!("tx{i}")]);
        Ok(Accounting {
            rx: Arc::new(Throttle::new(rx)),
            tx: Arc::new(Throttle::new(tx)),
            stats: Arc::new(DeviceStats::new("mic-net", names)),
            wakeups: (0..pairs)
                .map(|_| Wakeup::new().map(Arc::new))
                .collect::<io::Result<_>>()?,
        })
    }

    /// What the stats socket serves: `rx_bps`, `rx_pps`, `tx_bps`, `tx_pps`.
    pub fn served(&self) -> Served {
        let named = |prefix, throttle: &Arc<Throttle>| NamedThrottle {
            prefix,
            ops: "pps",
            throttle: throttle.clone(),
        };
        Served {
            stats: self.stats.clone(),
            wakeups: self.wakeups.clone(),
            throttles: vec![named("rx_", &self.rx), named("tx_", &self.tx)],
            tracks_inflight: false,
        }
    }

    /// Registers pair `i`'s wakeup with worker `i`'s epoll set as `event`.
    pub fn attach(&self, workers: &[Worker], event: u64) -> io::Result<()> {
        for (w, wake) in workers.iter().zip(&self.wakeups) {
            w.register(wake.as_raw_fd(), EventSet::IN, event)?;
        }
        Ok(())
    }

    /// Consumes pair `pair`'s wakeup; whether it had fired.
    pub fn woken(&self, pair: usize) -> bool {
        self.wakeups.get(pair).is_some_and(|w| w.consume())
    }

    /// The counters of pair `pair`'s RX queue.
    pub fn rx_stats(&self, pair: usize) -> Option<&QueueStats> {
        self.stats.queue(2 * pair)
    }

    /// The counters of pair `pair`'s TX queue.
    pub fn tx_stats(&self, pair: usize) -> Option<&QueueStats> {
        self.stats.queue(2 * pair + 1)
    }

    /// Stops queue `queue` of pair `pair` for `wait`: arms the pair's
    /// wakeup and counts the stop.
    pub fn stop(&self, pair: usize, queue: usize, wait: Duration) {
        if let Some(q) = self.stats.queue(queue) {
            q.record_throttled();
        }
        if let Some(Err(e)) = self.wakeups.get(pair).map(|w| w.arm(wait)) {
            limited!(
                TIMER_LINES,
                warn,
                "queue pair {pair}: cannot arm the throttle timer: {e}"
            );
        }
    }

    /// Whether pair `pair`'s RX queue may take a frame now; if not, it is
    /// stopped ([`Accounting::stop`]).
    pub fn admit_rx(&self, pair: usize) -> bool {
        match self.rx.admit() {
            None => true,
            Some(wait) => {
                self.stop(pair, 2 * pair, wait);
                false
            }
        }
    }
}

/// A TX sink limited by a throttle and counted: not ready while the
/// throttle holds frames back (the wait is kept for the caller), each frame
/// sent is charged and recorded.
pub struct LimitedSink<'a, S: TxSink> {
    /// The host side.
    pub sink: &'a mut S,
    /// The TX throttle.
    pub throttle: &'a Throttle,
    /// The TX queue's counters.
    pub stats: Option<&'a QueueStats>,
    /// Set when the throttle held frames back: how long to wait.
    pub wait: Cell<Option<Duration>>,
}

impl<'a, S: TxSink> LimitedSink<'a, S> {
    /// `sink` limited by `throttle`, counted in `stats`.
    pub fn new(sink: &'a mut S, throttle: &'a Throttle, stats: Option<&'a QueueStats>) -> Self {
        LimitedSink {
            sink,
            throttle,
            stats,
            wait: Cell::new(None),
        }
    }
}

impl<S: TxSink> TxSink for LimitedSink<'_, S> {
    fn ready(&self) -> bool {
        if !self.sink.ready() {
            return false;
        }
        match self.throttle.admit() {
            None => true,
            Some(w) => {
                self.wait.set(Some(w));
                false
            }
        }
    }

    fn send(&mut self, packet: &[u8], hdr_len: usize) -> bool {
        let started = Instant::now();
        let frame = packet.len().saturating_sub(hdr_len) as u64;
        self.throttle.charge(1, frame);
        let ok = self.sink.send(packet, hdr_len);
        if let Some(q) = self.stats {
            q.record_since(0, if ok { frame } else { 0 }, !ok, started);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitArgs,
    }

    #[test]
    fn options_per_direction() {
        let c = Cli::try_parse_from([
            "x",
            "--rx-bps",
            "1Mi",
            "--tx-pps",
            "100",
            "--tx-pps-burst",
            "10",
        ])
        .unwrap();
        assert_eq!(
            c.limits.rx(),
            Limits {
                ops: None,
                bytes: Some(Rate::per_second(1 << 20))
            }
        );
        assert_eq!(
            c.limits.tx().ops,
            Some(Rate {
                rate: 100,
                burst: 10
            })
        );
        assert!(Cli::try_parse_from(["x", "--rx-bps-burst", "1"]).is_err());
    }

    struct Sink(Vec<usize>);
    impl TxSink for Sink {
        fn send(&mut self, packet: &[u8], _hdr_len: usize) -> bool {
            self.0.push(packet.len());
            true
        }
    }

    #[test]
    fn limited_sink_holds_frames_back_and_counts() {
        let a = Accounting::new(
            1,
            Limits::default(),
            Limits {
                ops: Some(Rate::with_burst(10, Some(2))),
                bytes: None,
            },
        )
        .unwrap();
        let mut sink = Sink(Vec::new());
        let mut l = LimitedSink::new(&mut sink, &a.tx, a.tx_stats(0));
        for _ in 0..2 {
            assert!(l.ready());
            assert!(l.send(&[0; 12 + 60], 12));
        }
        assert!(!l.ready(), "burst used up");
        assert!(l.wait.get().unwrap() <= Duration::from_millis(100));
        let s = a.tx_stats(0).unwrap().snapshot();
        assert_eq!(
            (s.queue.as_str(), s.requests, s.bytes_written),
            ("tx0", 2, 120)
        );
        assert_eq!(sink.0, [72, 72]);
        // RX: unlimited.
        assert!(a.admit_rx(0));
        assert_eq!(a.served().limits()["tx_pps"], 10);
        assert_eq!(a.served().limits()["rx_bps"], 0);
    }
}
