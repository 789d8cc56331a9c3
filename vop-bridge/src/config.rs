//! Configuration of `vop-bridge`: command line and config file.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;
use virtio_bindings::virtio_ids;

use crate::abi;

/// Kinds of device the bridge serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// virtio-console (`mic-console`).
    Console,
    /// virtio-blk (`mic-blk`, qemu-storage-daemon, ...).
    Blk,
    /// virtio-net (`mic-net`).
    Net,
    /// virtio-vsock (rust-vmm's `vhost-device-vsock`; `docs/vsock.md`).
    Vsock,
}

impl DeviceKind {
    /// Virtio device id (virtio-bindings' `VIRTIO_ID_*`; they all fit the
    /// page's one-byte `type`).
    pub fn virtio_id(self) -> u8 {
        let id = match self {
            DeviceKind::Net => virtio_ids::VIRTIO_ID_NET,
            DeviceKind::Blk => virtio_ids::VIRTIO_ID_BLOCK,
            DeviceKind::Console => virtio_ids::VIRTIO_ID_CONSOLE,
            DeviceKind::Vsock => virtio_ids::VIRTIO_ID_VSOCK,
        };
        id as u8
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Console => "console",
            DeviceKind::Blk => "blk",
            DeviceKind::Net => "net",
            DeviceKind::Vsock => "vsock",
        }
    }
}

/// One device: its kind and its backend's vhost-user socket.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Kind of device.
    #[serde(rename = "type")]
    pub kind: DeviceKind,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Ring size for this device (default: the bridge's `queue_size`).
    #[serde(default)]
    pub queue_size: Option<u16>,
}

/// The bridge's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The `mic-x100` device socket (QEMU's chardev).
    pub device_socket: PathBuf,
    /// Devices, in the order they appear in the device page.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Default ring size.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Control socket for `micctl`.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Exit once the card has powered off.
    #[serde(default)]
    pub exit_on_poweroff: bool,
    /// Seconds to wait for QEMU's socket and each backend's socket.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
}

fn default_queue_size() -> u16 {
    256
}

fn default_connect_timeout() -> u64 {
    30
}

/// Command line of `vop-bridge`.
#[derive(Parser, Debug)]
#[command(
    name = "vop-bridge",
    version,
    about = "Host side of virtio-over-PCIe for an emulated MIC X100 card: builds the \
             device page and drives each device's vhost-user backend"
)]
pub struct Cli {
    /// The mic-x100 device socket (QEMU: -chardev socket,server=on,...).
    #[arg(long, value_name = "PATH")]
    pub device_socket: Option<PathBuf>,
    /// A console backend's vhost-user socket (repeatable).
    #[arg(long, value_name = "SOCKET")]
    pub console: Vec<PathBuf>,
    /// A block backend's vhost-user socket (repeatable).
    #[arg(long, value_name = "SOCKET")]
    pub blk: Vec<PathBuf>,
    /// A network backend's vhost-user socket (repeatable).
    #[arg(long, value_name = "SOCKET")]
    pub net: Vec<PathBuf>,
    /// A vsock backend's vhost-user socket (`vhost-device-vsock --vm
    /// socket=...`; repeatable).
    #[arg(long, value_name = "SOCKET")]
    pub vsock: Vec<PathBuf>,
    /// A TOML config file; command-line devices are added after its devices.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Ring size offered to the card (power of two, 1..=1024).
    #[arg(long, value_name = "N")]
    pub queue_size: Option<u16>,
    /// Listen for `micctl` on this socket.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Exit once the card has powered off.
    #[arg(long)]
    pub exit_on_poweroff: bool,
    /// Seconds to wait for the device socket and each backend.
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<u64>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read {path}: {err}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The config file is not valid.
    #[error("{path}: {err}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        err: Box<toml::de::Error>,
    },
    /// Something is missing or out of range.
    #[error("{0}")]
    Invalid(String),
}

impl BridgeConfig {
    /// Parses a TOML config file's text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.into(),
            err: Box::new(err),
        })
    }

    /// Builds the configuration from the command line (and its config file).
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let mut cfg = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
                    path: path.clone(),
                    err,
                })?;
                Self::from_toml(&text, path)?
            }
            None => BridgeConfig {
                device_socket: cli
                    .device_socket
                    .clone()
                    .ok_or_else(|| ConfigError::Invalid("--device-socket is required".into()))?,
                devices: Vec::new(),
                queue_size: default_queue_size(),
                control_socket: None,
                exit_on_poweroff: false,
                connect_timeout: default_connect_timeout(),
            },
        };
        if let Some(p) = cli.device_socket {
            cfg.device_socket = p;
        }
        let listed = [
            (DeviceKind::Console, cli.console),
            (DeviceKind::Blk, cli.blk),
            (DeviceKind::Net, cli.net),
            (DeviceKind::Vsock, cli.vsock),
        ];
        for (kind, sockets) in listed {
            cfg.devices
                .extend(sockets.into_iter().map(|socket| DeviceConfig {
                    kind,
                    socket,
                    queue_size: None,
                }));
        }
        if let Some(q) = cli.queue_size {
            cfg.queue_size = q;
        }
        if cli.control_socket.is_some() {
            cfg.control_socket = cli.control_socket;
        }
        cfg.exit_on_poweroff |= cli.exit_on_poweroff;
        if let Some(t) = cli.connect_timeout {
            cfg.connect_timeout = t;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check_q = |q: u16| {
            abi::check_ring_size(q).map_err(|_| {
                ConfigError::Invalid(format!(
                    "queue size {q} is not a power of two between 1 and {}",
                    abi::MAX_RING_ENTRIES
                ))
            })
        };
        check_q(self.queue_size)?;
        for d in &self.devices {
            if let Some(q) = d.queue_size {
                check_q(q)?;
            }
        }
        if self.devices.len() > abi::NUM_DOORBELLS as usize {
            return Err(ConfigError::Invalid(format!(
                "{} devices; the card has {} doorbells",
                self.devices.len(),
                abi::NUM_DOORBELLS
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BridgeConfig, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("vop-bridge").chain(args.iter().copied()))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        BridgeConfig::from_cli(cli)
    }

    #[test]
    fn command_line_devices_in_kind_order() {
        let c = parse(&[
            "--device-socket",
            "/run/mic0",
            "--net",
            "n.sock",
            "--console",
            "c.sock",
            "--blk",
            "b0",
            "--blk",
            "b1",
            "--vsock",
            "v.sock",
            "--queue-size",
            "512",
        ])
        .unwrap();
        assert_eq!(c.device_socket, PathBuf::from("/run/mic0"));
        let kinds: Vec<_> = c.devices.iter().map(|d| d.kind).collect();
        assert_eq!(
            kinds,
            [
                DeviceKind::Console,
                DeviceKind::Blk,
                DeviceKind::Blk,
                DeviceKind::Net,
                DeviceKind::Vsock
            ]
        );
        assert_eq!(c.devices[2].socket, PathBuf::from("b1"));
        assert_eq!(c.devices[4].socket, PathBuf::from("v.sock"));
        assert_eq!(c.queue_size, 512);
        assert_eq!(c.connect_timeout, 30);
    }

    #[test]
    fn virtio_ids() {
        assert_eq!(DeviceKind::Net.virtio_id(), 1);
        assert_eq!(DeviceKind::Blk.virtio_id(), 2);
        assert_eq!(DeviceKind::Console.virtio_id(), 3);
        assert_eq!(DeviceKind::Vsock.virtio_id(), 19);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["--console", "c"]).is_err());
        assert!(parse(&["--device-socket", "d", "--queue-size", "300"]).is_err());
        assert!(parse(&["--device-socket", "d", "--queue-size", "2048"]).is_err());
        assert!(parse(&["--device-socket", "d", "--queue-size", "x"]).is_err());
    }

    #[test]
    fn config_file() {
        let c = BridgeConfig::from_toml(
            r#"
device_socket = "/run/mic/mic0.sock"
control_socket = "/run/mic/mic0.ctl"
queue_size = 128
exit_on_poweroff = true

[[device]]
type = "console"
socket = "/run/mic/console.sock"

[[device]]
type = "blk"
socket = "/run/mic/blk.sock"
queue_size = 1024

[[device]]
type = "vsock"
socket = "/run/mic/vsock.sock"
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.devices.len(), 3);
        assert_eq!(c.devices[2].kind, DeviceKind::Vsock);
        assert_eq!(c.devices[1].kind, DeviceKind::Blk);
        assert_eq!(c.devices[1].queue_size, Some(1024));
        assert!(c.exit_on_poweroff);
        c.validate().unwrap();
        let e = BridgeConfig::from_toml(
            "device_socket = \"x\"\n[[device]]\ntype = \"gpu\"\nsocket = \"s\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("t.toml"), "{e}");
        assert!(BridgeConfig::from_toml("device_socket = 1", Path::new("t")).is_err());
    }
}
