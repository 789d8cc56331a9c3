//! Command-line parsing and validation for `mic-console`.

use std::path::PathBuf;

use clap::Parser;
use mic_backend_common::sandbox::{SandboxArgs, SandboxMode};
use mic_backend_common::SocketArgs;

use crate::logfile::MIN_MAX_SIZE;

/// Largest virtqueue size accepted on the command line.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Raw command line of `mic-console`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "mic-console",
    version,
    about = "vhost-user virtio-console backend for the MIC X100 card (pty, unix socket or stdio)"
)]
pub struct ConsoleArgs {
    /// vhost-user socket options shared by all backends (--socket-path or
    /// --fd, --client, --print-capabilities).
    #[command(flatten)]
    pub socket: SocketArgs,

    /// Put the console on a new pseudo-terminal (its path is printed on stdout).
    #[arg(long, conflicts_with_all = ["unix", "stdio"], required_unless_present_any = ["unix", "stdio"])]
    pub pty: bool,

    /// Put the console on a unix socket at PATH (one client at a time).
    #[arg(long, value_name = "PATH", conflicts_with = "stdio")]
    pub unix: Option<PathBuf>,

    /// Put the console on this process's stdin/stdout (raw terminal mode).
    #[arg(long)]
    pub stdio: bool,

    /// Also append everything the card writes to FILE.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// Rotate the --log file to FILE.1 when it reaches SIZE bytes (suffix
    /// K, M or G: binary units; 0: never rotate).
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
    pub log_max_size: u64,

    /// Do not offer VIRTIO_CONSOLE_F_MULTIPORT (plain 2-queue device).
    #[arg(long)]
    pub no_multiport: bool,

    /// Maximum size of each virtqueue (the frontend picks the actual size).
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,

    /// `--sandbox` (shared by all backends).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// Where the console goes on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// A new pseudo-terminal.
    Pty,
    /// A listening unix socket.
    Unix(PathBuf),
    /// stdin/stdout.
    Stdio,
}

/// Validated configuration of `mic-console`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// vhost-user socket options.
    pub socket: SocketArgs,
    /// Host side of the console.
    pub target: ConsoleTarget,
    /// Optional log file.
    pub log: Option<PathBuf>,
    /// Size at which the log file is rotated; `None`: never.
    pub log_max_size: Option<u64>,
    /// Offer the multiport feature (and its 4 queues).
    pub multiport: bool,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Whether the daemon confines itself (`src/sandbox.rs`).
    pub sandbox: SandboxMode,
}

/// A configuration error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Queue size not a power of two in range.
    #[error("invalid queue size {0} (power of two, 2..={MAX_QUEUE_SIZE})")]
    QueueSize(u16),
    /// The console socket and the vhost-user socket are the same path.
    #[error("--unix and --socket-path must differ")]
    SamePath,
    /// A log size limit too small to be useful.
    #[error("--log-max-size {0} is below the minimum of {MIN_MAX_SIZE} bytes")]
    LogMaxSize(u64),
    /// `--socket-path`/`--fd` unusable (see `SocketArgs::validate`).
    #[error("{0}")]
    Socket(&'static str),
}

/// Parses a size: a number of bytes, optionally followed by `K`, `M` or `G`
/// (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?} (bytes, or a number with K, M or G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} too large"))
}

impl ConsoleConfig {
    /// Validates the raw arguments.
    pub fn from_args(a: ConsoleArgs) -> Result<Self, ConfigError> {
        a.socket.validate().map_err(ConfigError::Socket)?;
        if a.queue_size < 2 || !a.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        let target = if let Some(p) = a.unix {
            if a.socket.socket_path.as_ref() == Some(&p) {
                return Err(ConfigError::SamePath);
            }
            ConsoleTarget::Unix(p)
        } else if a.stdio {
            ConsoleTarget::Stdio
        } else {
            ConsoleTarget::Pty
        };
        let log_max_size = match a.log_max_size {
            0 => None,
            n if n < MIN_MAX_SIZE => return Err(ConfigError::LogMaxSize(n)),
            n => Some(n),
        };
        Ok(ConsoleConfig {
            socket: a.socket,
            target,
            log: a.log,
            log_max_size,
            multiport: !a.no_multiport,
            queue_size: a.queue_size,
            sandbox: a.sandbox.sandbox,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ConsoleConfig, String> {
        let mut v = vec!["mic-console"];
        v.extend_from_slice(args);
        let a = ConsoleArgs::try_parse_from(v).map_err(|e| e.to_string())?;
        ConsoleConfig::from_args(a).map_err(|e| e.to_string())
    }

    #[test]
    fn good_command_lines() {
        let c = parse(&["--socket-path", "/s", "--pty"]).unwrap();
        assert_eq!(c.target, ConsoleTarget::Pty);
        assert!(c.multiport);
        let c = parse(&[
            "--socket-path",
            "/s",
            "--unix",
            "/c",
            "--log",
            "/l",
            "--no-multiport",
        ])
        .unwrap();
        assert_eq!(c.target, ConsoleTarget::Unix("/c".into()));
        assert_eq!(c.log, Some("/l".into()));
        assert_eq!(c.log_max_size, Some(16 << 20), "default");
        assert!(!c.multiport);
        let c = parse(&["--socket-path", "/s", "--stdio", "--client"]).unwrap();
        assert_eq!(c.target, ConsoleTarget::Stdio);
        assert!(c.socket.client);
    }

    #[test]
    fn log_max_size() {
        let size = |v: &str| {
            parse(&["--socket-path", "/s", "--pty", "--log-max-size", v]).map(|c| c.log_max_size)
        };
        assert_eq!(size("4096"), Ok(Some(4096)));
        assert_eq!(size("64K"), Ok(Some(64 << 10)));
        assert_eq!(size("2m"), Ok(Some(2 << 20)));
        assert_eq!(size("1G"), Ok(Some(1 << 30)));
        assert_eq!(size("0"), Ok(None), "0: never rotate");
        assert!(size("100").is_err(), "below the minimum");
        assert!(size("12X").is_err());
        assert!(size("K").is_err());
        assert!(size("99999999999G").is_err());
    }

    #[test]
    fn bad_command_lines() {
        assert!(parse(&["--socket-path", "/s"]).is_err());
        assert!(parse(&["--pty"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--pty", "--stdio"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--unix", "/c", "--stdio"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--unix", "/s"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--pty", "--queue-size", "3"]).is_err());
    }
}
