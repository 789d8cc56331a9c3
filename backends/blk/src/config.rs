//! Command line parsing and validation for `mic-blk`.
//!
//! [`Cli`] is the raw clap parser; [`BlkConfig::from_cli`] checks the values
//! and produces the validated configuration the daemon runs with. Nothing in
//! this module touches the socket path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use mic_backend_common::sandbox::{SandboxArgs, SandboxMode};
use mic_backend_common::SocketArgs;

use crate::limits::LimitArgs;

/// Largest queue size the split virtqueue format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest number of queues (one worker thread per queue; queue masks are u64).
pub const MAX_QUEUES: u16 = 64;
/// Length of a virtio-blk device ID (`VIRTIO_BLK_T_GET_ID`).
pub const SERIAL_LEN: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Largest number of I/O helper threads.
pub const MAX_IO_THREADS: usize = 64;
/// Default maximum queue size: the split-ring limit stock frontends use
/// (QEMU's vhost-user-blk-pci may configure 1024-entry rings), as
/// qemu-storage-daemon accepts. The frontend chooses the actual size.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Most data segments per request offered in `seg_max`. Independent of the
/// ring size the frontend picks (it may be smaller than the maximum); larger
/// requests use indirect descriptors.
pub const SEG_MAX: u32 = 254;
/// Upper bound of the default number of queues.
pub const DEFAULT_MAX_QUEUES: u16 = 8;
/// Default `--poll-us`: as long as cloud-hypervisor's block backend polls
/// (`poll_queue`), about one request's round trip through a sleeping
/// worker on a loaded host (`docs/benchmarks.md`).
pub const DEFAULT_POLL_US: u64 = 50;
/// Longest `--poll-us`: beyond a millisecond a worker burns a CPU for
/// requests that are no longer coming.
pub const MAX_POLL_US: u64 = 1000;

/// Raw command line of `mic-blk`.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "mic-blk",
    version,
    about = "vhost-user-blk backend serving a raw image file"
)]
pub struct Cli {
    /// Socket options shared by all backends.
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Raw disk image (regular file or block device). `--blk-file` is the
    /// name vhost-user.rst gives it.
    #[arg(long, value_name = "FILE", visible_alias = "blk-file")]
    pub image: PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO); writes fail with IOERR.
    /// `--read-only` is the name vhost-user.rst gives it.
    #[arg(long, visible_alias = "read-only")]
    pub readonly: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Device ID returned by GET_ID (at most 20 bytes of printable ASCII);
    /// default derived from the image path.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,
    /// Number of request queues, one worker thread each [default: number of
    /// host CPUs, at most 8].
    #[arg(long, value_name = "N")]
    pub num_queues: Option<u16>,
    /// Maximum size of each queue (power of two).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: u16,
    /// Helper threads that share large (>= 64 KiB) requests of a batch
    /// with the queue workers; 0 disables them [default: host CPUs, at most 4].
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,
    /// Microseconds a queue worker keeps polling its queue after the last
    /// request before it sleeps (0: never polls).
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u64,
    /// `--sandbox` (shared by all backends).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Rate limits and the stats socket (`limits.rs`).
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// vhost-user socket options.
    pub socket: SocketArgs,
    /// Image path.
    pub image: PathBuf,
    /// Read-only device.
    pub readonly: bool,
    /// Use O_DIRECT.
    pub direct: bool,
    /// GET_ID answer, zero padded to 20 bytes.
    pub serial: [u8; SERIAL_LEN],
    /// Number of queues.
    pub num_queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// I/O helper threads.
    pub io_threads: usize,
    /// How long a worker polls its queue after the last request.
    pub poll: Duration,
    /// Whether the daemon confines itself (`src/sandbox.rs`).
    pub sandbox: SandboxMode,
    /// Rate limits and the stats socket.
    pub limits: LimitArgs,
}

/// A configuration error (one line, printed before exiting).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// --num-queues out of range.
    #[error("--num-queues must be between 1 and {MAX_QUEUES}, got {0}")]
    NumQueues(u16),
    /// --queue-size not a power of two in range.
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    QueueSize(u16),
    /// --serial too long or not printable ASCII.
    #[error("--serial must be at most {SERIAL_LEN} bytes of printable ASCII, got {0:?}")]
    Serial(String),
    /// --io-threads out of range.
    #[error("--io-threads must be between 0 and {MAX_IO_THREADS}, got {0}")]
    IoThreads(usize),
    /// Empty path argument.
    #[error("{0} must not be empty")]
    EmptyPath(&'static str),
    /// `--socket-path`/`--fd` unusable (see `SocketArgs::validate`).
    #[error("{0}")]
    Socket(&'static str),
}

impl BlkConfig {
    /// Validate a parsed command line.
    pub fn from_cli(cli: Cli) -> Result<BlkConfig, ConfigError> {
        cli.socket.validate().map_err(ConfigError::Socket)?;
        if cli.image.as_os_str().is_empty() {
            return Err(ConfigError::EmptyPath("--image"));
        }
        let num_queues = cli.num_queues.unwrap_or_else(default_num_queues);
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(num_queues));
        }
        let qs = cli.queue_size;
        if !(2..=MAX_QUEUE_SIZE).contains(&qs) || !qs.is_power_of_two() {
            return Err(ConfigError::QueueSize(qs));
        }
        let io_threads = cli.io_threads.unwrap_or_else(default_io_threads);
        if io_threads > MAX_IO_THREADS {
            return Err(ConfigError::IoThreads(io_threads));
        }
        if cli
            .limits
            .stats_socket
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::EmptyPath("--stats-socket"));
        }
        let serial = match &cli.serial {
            Some(s) => parse_serial(s)?,
            None => default_serial(&cli.image),
        };
        Ok(BlkConfig {
            socket: cli.socket,
            image: cli.image,
            readonly: cli.readonly,
            direct: cli.direct,
            serial,
            num_queues,
            queue_size: qs,
            io_threads,
            poll: Duration::from_micros(cli.poll_us.min(MAX_POLL_US)),
            sandbox: cli.sandbox.sandbox,
            limits: cli.limits,
        })
    }
}

/// Default number of queues: host CPUs, capped at [`DEFAULT_MAX_QUEUES`].
pub fn default_num_queues() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(DEFAULT_MAX_QUEUES as usize) as u16)
        .unwrap_or(1)
}

/// Default number of I/O helper threads: the host CPUs beyond the two that
/// a queue worker and the vCPU driving it keep busy, at most 4. Handing a
/// request to a helper costs a thread wake-up; it pays only where that
/// helper has a CPU of its own (on a 2-CPU host, 128 KiB sequential I/O ran
/// at half the rate with 2 helpers than with none: `docs/benchmarks.md`).
pub fn default_io_threads() -> usize {
    io_threads_for(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// [`default_io_threads`] on a host with `cpus` CPUs.
fn io_threads_for(cpus: usize) -> usize {
    cpus.saturating_sub(2).min(4)
}

/// Check and zero-pad a user supplied serial.
pub fn parse_serial(s: &str) -> Result<[u8; SERIAL_LEN], ConfigError> {
    if s.len() > SERIAL_LEN || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(ConfigError::Serial(s.to_string()));
    }
    let mut out = [0u8; SERIAL_LEN];
    out[..s.len()].copy_from_slice(s.as_bytes());
    Ok(out)
}

/// Serial derived from the image path: `mic-` followed by 16 hex digits of
/// a FNV-1a hash of the (canonicalized, when possible) path. Stable for a
/// given image location, distinct for different images.
pub fn default_serial(image: &Path) -> [u8; SERIAL_LEN] {
    let path = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let s = format!("mic-{h:016x}");
    let mut out = [0u8; SERIAL_LEN];
    out.copy_from_slice(s.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_only_where_cpus_are_to_spare() {
        assert_eq!(io_threads_for(1), 0);
        assert_eq!(io_threads_for(2), 0);
        assert_eq!(io_threads_for(4), 2);
        assert_eq!(io_threads_for(64), 4);
    }

    fn parse(args: &[&str]) -> Result<BlkConfig, String> {
        let mut v = vec!["mic-blk"];
        v.extend_from_slice(args);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        BlkConfig::from_cli(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_defaults() {
        let c = parse(&["--socket-path", "/tmp/s", "--image", "/tmp/img"]).unwrap();
        assert_eq!(c.socket.socket_path, Some(PathBuf::from("/tmp/s")));
        assert!(!c.socket.client);
        assert_eq!(c.image, PathBuf::from("/tmp/img"));
        assert!(!c.readonly && !c.direct);
        assert_eq!(c.queue_size, DEFAULT_QUEUE_SIZE);
        assert!(c.num_queues >= 1 && c.num_queues <= DEFAULT_MAX_QUEUES);
        assert_eq!(&c.serial[..4], b"mic-");
        assert!(c.serial[4..].iter().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn all_options() {
        let c = parse(&[
            "--socket-path",
            "/s",
            "--image",
            "/i",
            "--readonly",
            "--direct",
            "--serial",
            "disk0",
            "--num-queues",
            "4",
            "--queue-size",
            "1024",
            "--io-threads",
            "0",
            "--client",
        ])
        .unwrap();
        assert!(c.readonly && c.direct && c.socket.client);
        assert_eq!(c.num_queues, 4);
        assert_eq!(c.queue_size, 1024);
        assert_eq!(c.io_threads, 0);
        assert_eq!(&c.serial[..5], b"disk0");
        assert!(c.serial[5..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_bad_values() {
        let base = ["--socket-path", "/s", "--image", "/i"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert!(with(&["--num-queues", "0"])
            .unwrap_err()
            .contains("--num-queues"));
        assert!(with(&["--num-queues", "65"]).is_err());
        assert!(with(&["--num-queues", "-1"]).is_err());
        assert!(with(&["--queue-size", "100"])
            .unwrap_err()
            .contains("power of two"));
        assert!(with(&["--queue-size", "1"]).is_err());
        assert!(with(&["--queue-size", "65536"]).is_err());
        assert!(with(&["--serial", "012345678901234567890"])
            .unwrap_err()
            .contains("--serial"));
        assert!(with(&["--serial", "bad\nid"]).is_err());
        assert!(with(&["--serial", "exactly-twenty-bytes"]).is_ok());
        assert!(with(&["--bogus"]).is_err());
        assert!(with(&["--io-threads", "65"])
            .unwrap_err()
            .contains("--io-threads"));
        assert!(parse(&["--image", "/i"]).is_err(), "socket path required");
        assert!(parse(&["--socket-path", "/s"]).is_err(), "image required");
        assert!(parse(&["--socket-path", "", "--image", "/i"]).is_err());
    }

    #[test]
    fn default_serial_is_stable_and_path_dependent() {
        let a = default_serial(Path::new("/nonexistent/a.img"));
        let b = default_serial(Path::new("/nonexistent/b.img"));
        assert_eq!(a, default_serial(Path::new("/nonexistent/a.img")));
        assert_ne!(a, b);
        assert_eq!(a.len(), SERIAL_LEN);
    }
}
