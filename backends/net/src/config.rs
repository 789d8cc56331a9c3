//! Command-line parsing and validation for `mic-net`.
//!
//! Everything that can be checked without touching the system is checked
//! here, so that a bad argument is reported before any socket or tap device
//! is created.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::Parser;
use mic_backend_common::sandbox::{SandboxArgs, SandboxMode};
use mic_backend_common::SocketArgs;

use crate::limits::LimitArgs;

/// Largest number of queue pairs accepted on the command line.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Largest virtqueue size accepted on the command line.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Raw command line of `mic-net`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "mic-net",
    version,
    about = "vhost-user virtio-net backend for the MIC X100 card (tap or stream transport)"
)]
pub struct NetArgs {
    /// vhost-user socket options shared by all backends (--socket-path or
    /// --fd, --client, --print-capabilities).
    #[command(flatten)]
    pub socket: SocketArgs,

    /// Tap device to attach to: an existing tap or a new one with this name (e.g. mic0).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "stream",
        required_unless_present = "stream"
    )]
    pub tap: Option<String>,

    /// Address the tap is given and brought up with: A.B.C.D/PREFIX, or `auto`
    /// for the X100 convention (micN -> 172.31.(N+1).254/24).
    #[arg(long, value_name = "ADDR", requires = "tap")]
    pub host_ip: Option<String>,

    /// QEMU `-netdev stream` transport: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub stream: Option<String>,

    /// Listen on the stream address instead of connecting to it.
    #[arg(long, requires = "stream")]
    pub listen: bool,

    /// MAC address reported to the guest (default: random, locally administered).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// MTU reported to the guest (and set on a tap device).
    #[arg(long, default_value_t = 1500)]
    pub mtu: u16,

    /// Number of RX/TX queue pairs (tap only; one tap queue per pair).
    #[arg(long, default_value_t = 1)]
    pub num_queue_pairs: u16,

    /// Maximum size of each virtqueue.
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,

    /// `--sandbox` (shared by all backends).
    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// Rate limits and the stats socket (`limits.rs`).
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// A stream transport endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAddr {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP endpoint, `host:port`.
    Tcp(String),
}

impl fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            StreamAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Address configuration of a tap device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIp {
    /// Host-side address.
    pub addr: Ipv4Addr,
    /// Prefix length (0..=32).
    pub prefix: u8,
}

/// Where the frames go on the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetTransport {
    /// A tap device.
    Tap {
        /// Interface name.
        name: String,
        /// Optional address to assign.
        host_ip: Option<HostIp>,
    },
    /// A QEMU-style length-prefixed stream.
    Stream {
        /// Peer or listening address.
        addr: StreamAddr,
        /// Act as server.
        listen: bool,
    },
}

/// Validated configuration of `mic-net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// vhost-user socket options.
    pub socket: SocketArgs,
    /// Host side transport.
    pub transport: NetTransport,
    /// MAC address in config space.
    pub mac: [u8; 6],
    /// MTU in config space.
    pub mtu: u16,
    /// Number of queue pairs.
    pub queue_pairs: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Whether the daemon confines itself (`src/sandbox.rs`).
    pub sandbox: SandboxMode,
    /// Rate limits and the stats socket.
    pub limits: LimitArgs,
}

/// A configuration error, reported as one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// MAC address not in `xx:xx:xx:xx:xx:xx` form or multicast.
    #[error("invalid MAC address '{0}' (expected a unicast xx:xx:xx:xx:xx:xx)")]
    Mac(String),
    /// Stream address is malformed.
    #[error("invalid stream address '{0}' (expected unix:PATH or tcp:HOST:PORT)")]
    Stream(String),
    /// Host address is malformed.
    #[error("invalid host address '{0}' (expected A.B.C.D/PREFIX or auto)")]
    HostIp(String),
    /// `--host-ip auto` used with a name that is not micN.
    #[error("--host-ip auto needs a tap named micN (got '{0}')")]
    AutoHostIp(String),
    /// Tap name unusable.
    #[error("invalid tap name '{0}' (1 to 15 characters, no '/' or whitespace)")]
    TapName(String),
    /// MTU out of range.
    #[error("invalid MTU {0} (68..=65535)")]
    Mtu(u16),
    /// Queue pairs out of range.
    #[error("invalid number of queue pairs {0} (1..={MAX_QUEUE_PAIRS})")]
    QueuePairs(u16),
    /// Stream mode with several queue pairs.
    #[error("--stream supports a single queue pair")]
    StreamQueuePairs,
    /// `--listen` without `--stream`.
    #[error("--listen only applies to --stream")]
    ListenWithoutStream,
    /// Queue size not a power of two in range.
    #[error("invalid queue size {0} (power of two, 2..={MAX_QUEUE_SIZE})")]
    QueueSize(u16),
    /// `--socket-path`/`--fd` unusable (see `SocketArgs::validate`).
    #[error("{0}")]
    Socket(&'static str),
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let err = || ConfigError::Mac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(err)?;
        if p.len() != 2 {
            return Err(err());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(err());
    }
    Ok(mac)
}

/// Formats a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `unix:PATH` or `tcp:HOST:PORT`.
pub fn parse_stream_addr(s: &str) -> Result<StreamAddr, ConfigError> {
    let err = || ConfigError::Stream(s.to_string());
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(err());
        }
        return Ok(StreamAddr::Unix(PathBuf::from(p)));
    }
    if let Some(a) = s.strip_prefix("tcp:") {
        let (host, port) = a.rsplit_once(':').ok_or_else(err)?;
        if host.is_empty() || port.parse::<u16>().map_err(|_| err())? == 0 {
            return Err(err());
        }
        return Ok(StreamAddr::Tcp(a.to_string()));
    }
    Err(err())
}

/// Parses `A.B.C.D/PREFIX` or `auto` (which derives the X100 address from a
/// `micN` tap name).
pub fn parse_host_ip(s: &str, tap: &str) -> Result<HostIp, ConfigError> {
    if s == "auto" {
        let n: u8 = tap
            .strip_prefix("mic")
            .and_then(|n| n.parse().ok())
            .filter(|n| *n < 255)
            .ok_or_else(|| ConfigError::AutoHostIp(tap.to_string()))?;
        return Ok(HostIp {
            addr: Ipv4Addr::new(172, 31, n + 1, 254),
            prefix: 24,
        });
    }
    let err = || ConfigError::HostIp(s.to_string());
    let (a, p) = s.split_once('/').unwrap_or((s, "24"));
    let addr: Ipv4Addr = a.parse().map_err(|_| err())?;
    let prefix: u8 = p.parse().map_err(|_| err())?;
    if prefix > 32 {
        return Err(err());
    }
    Ok(HostIp { addr, prefix })
}

fn check_tap_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.chars().any(|c| c.is_whitespace() || c == '\0')
    {
        return Err(ConfigError::TapName(name.to_string()));
    }
    Ok(())
}

/// A random locally administered unicast MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0x52, 0x54, 0x00, 0, 0, 0];
    let mut rnd = [0u8; 3];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
    if n != rnd.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        rnd.copy_from_slice(&t.to_le_bytes()[..3]);
    }
    mac[3..].copy_from_slice(&rnd);
    mac
}

impl NetConfig {
    /// Validates the raw arguments.
    pub fn from_args(args: NetArgs) -> Result<Self, ConfigError> {
        args.socket.validate().map_err(ConfigError::Socket)?;
        let mac = match &args.mac {
            Some(m) => parse_mac(m)?,
            None => random_mac(),
        };
        if args.mtu < 68 {
            return Err(ConfigError::Mtu(args.mtu));
        }
        if args.num_queue_pairs == 0 || args.num_queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(args.num_queue_pairs));
        }
        if args.queue_size < 2 || !args.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        let transport = match (&args.tap, &args.stream) {
            (Some(name), None) => {
                if args.listen {
                    return Err(ConfigError::ListenWithoutStream);
                }
                check_tap_name(name)?;
                let host_ip = args
                    .host_ip
                    .as_deref()
                    .map(|s| parse_host_ip(s, name))
                    .transpose()?;
                NetTransport::Tap {
                    name: name.clone(),
                    host_ip,
                }
            }
            (None, Some(s)) => {
                if args.num_queue_pairs != 1 {
                    return Err(ConfigError::StreamQueuePairs);
                }
                NetTransport::Stream {
                    addr: parse_stream_addr(s)?,
                    listen: args.listen,
                }
            }
            // clap enforces exactly one of the two.
            _ => unreachable!("clap enforces --tap xor --stream"),
        };
        Ok(NetConfig {
            socket: args.socket,
            transport,
            mac,
            mtu: args.mtu,
            queue_pairs: args.num_queue_pairs,
            queue_size: args.queue_size,
            sandbox: args.sandbox.sandbox,
            limits: args.limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<NetConfig, String> {
        let mut v = vec!["mic-net"];
        v.extend_from_slice(args);
        let a = NetArgs::try_parse_from(v).map_err(|e| e.to_string())?;
        NetConfig::from_args(a).map_err(|e| e.to_string())
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:56:78").is_err());
        assert!(parse_mac("01:00:00:00:00:00").is_err());
        assert!(parse_mac("zz:54:00:12:34:56").is_err());
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 1, 2, 0xab]),
            "52:54:00:01:02:ab"
        );
        let r = random_mac();
        assert_eq!(r[0] & 1, 0);
        assert_eq!(r[0] & 2, 2);
    }

    #[test]
    fn stream_addr_parsing() {
        assert_eq!(
            parse_stream_addr("unix:/tmp/x").unwrap(),
            StreamAddr::Unix("/tmp/x".into())
        );
        assert_eq!(
            parse_stream_addr("tcp:127.0.0.1:5555").unwrap(),
            StreamAddr::Tcp("127.0.0.1:5555".into())
        );
        assert_eq!(
            parse_stream_addr("tcp:[::1]:5555").unwrap(),
            StreamAddr::Tcp("[::1]:5555".into())
        );
        assert!(parse_stream_addr("tcp:host").is_err());
        assert!(parse_stream_addr("tcp:host:0").is_err());
        assert!(parse_stream_addr("udp:x:1").is_err());
        assert!(parse_stream_addr("unix:").is_err());
    }

    #[test]
    fn host_ip_parsing() {
        assert_eq!(
            parse_host_ip("auto", "mic0").unwrap(),
            HostIp {
                addr: Ipv4Addr::new(172, 31, 1, 254),
                prefix: 24
            }
        );
        assert_eq!(
            parse_host_ip("auto", "mic3").unwrap().addr,
            Ipv4Addr::new(172, 31, 4, 254)
        );
        assert!(parse_host_ip("auto", "tap0").is_err());
        assert_eq!(
            parse_host_ip("10.0.0.1/8", "x").unwrap(),
            HostIp {
                addr: Ipv4Addr::new(10, 0, 0, 1),
                prefix: 8
            }
        );
        assert!(parse_host_ip("10.0.0.1/33", "x").is_err());
        assert!(parse_host_ip("10.0.0/8", "x").is_err());
    }

    #[test]
    fn full_command_lines() {
        let c = parse(&[
            "--socket-path",
            "/tmp/s",
            "--tap",
            "mic0",
            "--host-ip",
            "auto",
            "--num-queue-pairs",
            "2",
            "--mac",
            "52:54:00:00:00:01",
        ])
        .unwrap();
        assert_eq!(c.queue_pairs, 2);
        assert_eq!(c.mac, [0x52, 0x54, 0, 0, 0, 1]);
        assert!(
            matches!(c.transport, NetTransport::Tap { ref name, host_ip: Some(_) } if name == "mic0")
        );

        let c = parse(&[
            "--socket-path",
            "/tmp/s",
            "--stream",
            "unix:/tmp/p",
            "--listen",
        ])
        .unwrap();
        assert_eq!(
            c.transport,
            NetTransport::Stream {
                addr: StreamAddr::Unix("/tmp/p".into()),
                listen: true
            }
        );
        assert_eq!(c.mtu, 1500);
        assert!(!c.socket.client);
    }

    #[test]
    fn bad_command_lines() {
        assert!(parse(&["--socket-path", "/tmp/s"]).is_err());
        assert!(parse(&["--tap", "mic0"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--tap", "a", "--stream", "unix:/x"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--tap", "a", "--listen"]).is_err());
        assert!(parse(&[
            "--socket-path",
            "/s",
            "--stream",
            "unix:/x",
            "--num-queue-pairs",
            "2"
        ])
        .is_err());
        assert!(parse(&[
            "--socket-path",
            "/s",
            "--tap",
            "a",
            "--num-queue-pairs",
            "0"
        ])
        .is_err());
        assert!(parse(&["--socket-path", "/s", "--tap", "a", "--queue-size", "100"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--tap", "a", "--mtu", "10"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--tap", "0123456789abcdef"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--stream", "foo"]).is_err());
    }
}
