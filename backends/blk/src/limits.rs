//! `mic-blk`'s rate limits and stats (`backends/README.md`, "Rate limits"
//! and "Stats"): the options, and the [`Accounting`] its queues share for
//! as long as the daemon runs (frontends come and go; the counters add up
//! and the limits stay).
//!
//! A queue asks [`Accounting::admit`] before it takes a request; while the
//! device's throttle has no tokens, the queue stops taking requests (those
//! it took complete), arms its [`Wakeup`] for the moment they return, and
//! its worker thread goes back to its epoll set; the wakeup, registered
//! there ([`Accounting::attach`]), runs the queue again.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use mic_backend_common::control::{NamedThrottle, Served};
use mic_backend_common::limited;
use mic_backend_common::ratelimit::{per_minute, LogLimiter};
use mic_backend_common::stats::DeviceStats;
use mic_backend_common::throttle::{parse_count, Limits, Rate, Throttle};
use mic_backend_common::timer::Wakeup;
use mic_backend_common::worker::Worker;
use vmm_sys_util::epoll::EventSet;

use crate::request::Scratch;

/// Failed timer set-ups: one per throttled batch at worst.
static TIMER_LINES: LogLimiter = per_minute();

/// Rate-limit and stats options of `mic-blk`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq, Default)]
pub struct LimitArgs {
    /// Limit the device to N requests per second (all queues together;
    /// suffixes K, M, G, Ki, Mi, Gi).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub iops: Option<u64>,
    /// Requests that may go at once after a quiet time [default: one
    /// second's worth, the --iops value].
    #[arg(long, value_name = "N", value_parser = parse_count, requires = "iops")]
    pub iops_burst: Option<u64>,
    /// Limit the device to N bytes of data per second (all queues
    /// together; suffixes K, M, G, Ki, Mi, Gi).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub bps: Option<u64>,
    /// Bytes that may go at once after a quiet time [default: one second's
    /// worth, the --bps value].
    #[arg(long, value_name = "N", value_parser = parse_count, requires = "bps")]
    pub bps_burst: Option<u64>,
    /// Serve the stats and change the limits on a UNIX socket at PATH
    /// (see backends/README.md, "Stats").
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,
}

impl LimitArgs {
    /// The limits asked for (0 is no limit).
    pub fn limits(&self) -> Limits {
        let rate = |r: Option<u64>, b| r.filter(|&r| r > 0).map(|r| Rate::with_burst(r, b));
        Limits {
            ops: rate(self.iops, self.iops_burst),
            bytes: rate(self.bps, self.bps_burst),
        }
    }
}

/// The event id of a worker's wakeup: the first id the worker's epoll set
/// leaves to the backend (`mic_backend_common::worker`).
pub fn wakeup_event(num_queues: u16) -> u16 {
    num_queues + 1
}

/// Rate limits and stats of the device, shared by its queues.
#[derive(Debug)]
pub struct Accounting {
    /// The device's limits.
    pub throttle: Arc<Throttle>,
    /// Per-queue counters.
    pub stats: Arc<DeviceStats>,
    /// One wakeup per queue (each queue has its worker thread).
    wakeups: Vec<Arc<Wakeup>>,
}

impl Accounting {
    /// Counters and wakeups for `num_queues` queues, limited by `limits`.
    pub fn new(num_queues: u16, limits: Limits) -> io::Result<Accounting> {
        Ok(Accounting {
            throttle: Arc::new(Throttle::new(limits)),
            stats: Arc::new(DeviceStats::new(
                "mic-blk",
                (0..num_queues).map(|q| q.to_string()),
            )),
            wakeups: (0..num_queues)
                .map(|_| Wakeup::new().map(Arc::new))
                .collect::<io::Result<_>>()?,
        })
    }

    /// What the stats socket serves: the counters, and the limits as
    /// `iops` and `bps`.
    pub fn served(&self) -> Served {
        Served {
            stats: self.stats.clone(),
            wakeups: self.wakeups.clone(),
            throttles: vec![NamedThrottle {
                prefix: "",
                ops: "iops",
                throttle: self.throttle.clone(),
            }],
            tracks_inflight: true,
        }
    }

    /// Registers each queue's wakeup with its worker's epoll set (worker
    /// `i` serves queue `i`), as event [`wakeup_event`].
    pub fn attach(&self, workers: &[Worker]) -> io::Result<()> {
        let id = u64::from(wakeup_event(self.wakeups.len() as u16));
        for (w, wake) in workers.iter().zip(&self.wakeups) {
            w.register(wake.as_raw_fd(), EventSet::IN, id)?;
        }
        Ok(())
    }

    /// Whether queue `queue` may take a request now. If not, its wakeup is
    /// armed for when it may, and the stop is counted.
    pub fn admit(&self, queue: usize) -> bool {
        let Some(wait) = self.throttle.admit() else {
            return true;
        };
        if let Some(q) = self.stats.queue(queue) {
            q.record_throttled();
        }
        match self.wakeups.get(queue).map(|w| w.arm(wait)) {
            Some(Ok(())) => false,
            Some(Err(e)) => {
                // Without a timer the queue would never resume: serve it.
                limited!(
                    TIMER_LINES,
                    warn,
                    "queue {queue}: cannot arm the throttle timer: {e}"
                );
                true
            }
            None => true,
        }
    }

    /// Consumes queue `queue`'s wakeup; whether it had fired.
    pub fn woken(&self, queue: usize) -> bool {
        self.wakeups.get(queue).is_some_and(|w| w.consume())
    }

    /// Charges a request taken from queue's ring, whose buffers add up to
    /// `buffers` bytes (the 16-byte header and the status byte are not
    /// data).
    pub fn charge(&self, buffers: u64) {
        self.throttle.charge(1, buffers.saturating_sub(17));
    }

    /// Counts the request that `scratch` just processed on queue `queue`.
    pub fn record(&self, queue: usize, scratch: &Scratch, started: Instant) {
        if let Some(q) = self.stats.queue(queue) {
            let ok = scratch.last_ok;
            let bytes = if ok { scratch.last_bytes } else { 0 };
            let (read, written) = if scratch.last_write {
                (0, bytes)
            } else {
                (bytes, 0)
            };
            q.record_since(read, written, !ok, started);
        }
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

    fn parse(args: &[&str]) -> Result<LimitArgs, clap::Error> {
        let mut v = vec!["mic-blk"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.limits)
    }

    #[test]
    fn options() {
        let a = parse(&["--iops", "500", "--bps", "10Mi", "--bps-burst", "1M"]).unwrap();
        assert_eq!(
            a.limits(),
            Limits {
                ops: Some(Rate::per_second(500)),
                bytes: Some(Rate {
                    rate: 10 << 20,
                    burst: 1_000_000
                }),
            }
        );
        assert_eq!(parse(&[]).unwrap().limits(), Limits::default());
        assert_eq!(parse(&["--iops", "0"]).unwrap().limits(), Limits::default());
        assert!(parse(&["--iops", "5x"]).is_err());
        assert!(
            parse(&["--iops-burst", "5"]).is_err(),
            "a burst needs its rate"
        );
    }

    #[test]
    fn a_throttled_queue_arms_its_wakeup() {
        let a = Accounting::new(
            2,
            Limits {
                ops: Some(Rate::with_burst(10, Some(1))),
                bytes: None,
            },
        )
        .unwrap();
        assert!(a.admit(1));
        a.charge(4096 + 17);
        assert!(!a.admit(1), "the bucket is empty");
        assert_eq!(a.stats.queue(1).unwrap().snapshot().throttled, 1);
        // 100 ms later the wakeup fires.
        let fd = a.wakeups[1].as_raw_fd();
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1);
        assert!(a.woken(1));
        assert!(!a.woken(0));
        assert!(a.admit(1));
        let served = a.served();
        assert_eq!(served.limits()["iops"], 10);
        assert_eq!(served.limits()["bps"], 0);
    }

    #[test]
    fn records_by_direction() {
        let a = Accounting::new(1, Limits::default()).unwrap();
        let mut s = Scratch::default();
        s.last_ok = true;
        s.last_bytes = 4096;
        a.record(0, &s, Instant::now());
        s.last_write = true;
        a.record(0, &s, Instant::now());
        s.last_ok = false;
        a.record(0, &s, Instant::now());
        let q = a.stats.queue(0).unwrap().snapshot();
        assert_eq!(
            (q.requests, q.bytes_read, q.bytes_written, q.errors),
            (3, 4096, 4096, 1)
        );
    }
}
