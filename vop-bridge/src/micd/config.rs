//! micd's configuration: a TOML file with one table per card (`[mic0]`,
//! `[mic1]`, ...), or `--cards N` cards with defaults (`docs/micd.md`,
//! "Configuration").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lifecycle::Policy;
use crate::config::DeviceKind;

/// How a card reaches the host's network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// `mic-net --stream` to a per-card passt (no root needed).
    #[default]
    Passt,
    /// `mic-net --tap micN` with the host at .254 (root only).
    Tap,
    /// No network device.
    None,
}

impl NetMode {
    /// Name as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            NetMode::Passt => "passt",
            NetMode::Tap => "tap",
            NetMode::None => "none",
        }
    }
}

/// One disk of a card, served by `mic-blk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image (default: `diskN.img` in the card's state directory).
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// Size of an image micd creates (sparse), in MiB.
    #[serde(default = "default_disk_mib")]
    pub size_mib: u64,
}

fn default_disk_mib() -> u64 {
    1024
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            image: None,
            size_mib: default_disk_mib(),
        }
    }
}

/// A device whose vhost-user backend the user runs (qemu-storage-daemon,
/// cloud-hypervisor's `vhost_user_net`, a daemon of ours started by hand):
/// micd starts no process for it and the bridge connects to `socket`
/// (`[[micN.device]]`; `docs/micd.md`, "Configuration").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalDevice {
    /// Kind of device.
    #[serde(rename = "type")]
    pub kind: DeviceKind,
    /// The backend's vhost-user socket; it must exist when the card boots.
    pub socket: PathBuf,
}

/// One card's configuration (a `[micN]` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CardConfig {
    /// Card memory in MiB.
    pub memory: u32,
    /// Card CPUs.
    pub cpus: u32,
    /// The card's kernel (default: `vmlinux` of the card image directory).
    pub firmware: Option<PathBuf>,
    /// The card's initramfs (default: `initrd.img` of the card image directory).
    pub ramdisk: Option<PathBuf>,
    /// Firmware QEMU starts the kernel with (default: qboot, which enters
    /// the uncompressed kernel through PVH); `""` for QEMU's own BIOS.
    pub bios: Option<PathBuf>,
    /// Kernel command line added after the image's `cmdline` and micd's
    /// own parameters.
    pub cmdline: String,
    /// The user's files added to the initramfs at each boot: a directory or
    /// a cpio archive (`overlay.rs`; `docs/micd.md`, "Overlays").
    pub overlay: Option<PathBuf>,
    /// A virtio console (`mic-console`).
    pub console: bool,
    /// virtio-vsock (`vhost-device-vsock`, CID = node + 2 = N + 3 for micN;
    /// `docs/vsock.md`), which the card agent (`micctl exec`, `cp`) uses.
    pub vsock: bool,
    /// With `vsock`: the card is `online` only once its agent answers, as
    /// COSM waited for the card's SCIF client to connect back; `false`
    /// takes the driver's word (a ramdisk without the agent).
    pub agent: bool,
    /// With `vsock`: reach the other cards that have it set by their CIDs,
    /// in micd's vsock group (`vsock_group.rs`).
    pub vsock_peers: bool,
    /// Disks (`[[micN.disk]]`); one default disk unless set.
    #[serde(rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Network.
    pub net: NetMode,
    /// Join the card-to-card link that micd runs for cards on passt when
    /// two or more of them have this set (`link.rs`).
    pub link: bool,
    /// Devices served by the user's own backends, after micd's own in the
    /// device page.
    #[serde(rename = "device")]
    pub external: Vec<ExternalDevice>,
    /// Arguments added to the end of the card's QEMU command line.
    pub qemu_args: Vec<String>,
    /// Boot when micd starts.
    pub autoboot: bool,
    /// What happens after a crash.
    pub policy: Policy,
    /// QEMU accelerator (`tcg` or `kvm`).
    pub accel: String,
    /// Seconds a card may stay `shutting_down` before micd resets it
    /// (mpssd waited 60 s).
    pub shutdown_timeout: u64,
    /// Declare the card crashed when its heartbeat stops (COSM's
    /// `heartbeat_enable`, default on).
    pub heartbeat: bool,
    /// Seconds without a beat after which the card counts as crashed
    /// (COSM: 40 s for a 30 s beat; ours beats every second).
    pub heartbeat_timeout: u64,
}

impl Default for CardConfig {
    fn default() -> Self {
        CardConfig {
            memory: 1024,
            cpus: 1,
            firmware: None,
            ramdisk: None,
            bios: None,
            cmdline: String::new(),
            overlay: None,
            console: true,
            vsock: true,
            agent: true,
            disks: vec![DiskConfig::default()],
            net: NetMode::default(),
            link: true,
            vsock_peers: true,
            external: Vec::new(),
            qemu_args: Vec::new(),
            autoboot: true,
            policy: Policy::default(),
            accel: "tcg".into(),
            shutdown_timeout: 60,
            heartbeat: true,
            heartbeat_timeout: 30,
        }
    }
}

/// Keys `micctl config` may set, and whether the card must be `ready`.
pub const SETTABLE: [(&str, bool); 14] = [
    ("memory", true),
    ("cpus", true),
    ("firmware", true),
    ("ramdisk", true),
    ("bios", true),
    ("cmdline", true),
    ("overlay", true),
    ("accel", true),
    ("autoboot", false),
    ("policy", false),
    ("shutdown_timeout", false),
    ("heartbeat", false),
    ("heartbeat_timeout", false),
    ("agent", false),
];

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for micd.
    #[error("{path}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or a name is not `micN`.
    #[error("{0}")]
    Invalid(String),
}

impl CardConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(64..=65536).contains(&self.memory) {
            return Err(ConfigError::Invalid(format!(
                "memory {} MiB is not between 64 and 65536",
                self.memory
            )));
        }
        if !(1..=64).contains(&self.cpus) {
            return Err(ConfigError::Invalid(format!(
                "cpus {} is not between 1 and 64",
                self.cpus
            )));
        }
        if !matches!(self.accel.as_str(), "tcg" | "kvm") {
            return Err(ConfigError::Invalid(format!(
                "accel {:?} is not tcg or kvm",
                self.accel
            )));
        }
        if self.shutdown_timeout == 0 {
            return Err(ConfigError::Invalid(
                "shutdown_timeout must be at least 1 s".into(),
            ));
        }
        if self.heartbeat_timeout == 0 {
            return Err(ConfigError::Invalid(
                "heartbeat_timeout must be at least 1 s".into(),
            ));
        }
        if self.disks.len() > 4 {
            return Err(ConfigError::Invalid(format!(
                "{} disks; at most 4",
                self.disks.len()
            )));
        }
        if self.external.len() > 4 {
            return Err(ConfigError::Invalid(format!(
                "{} devices with their own backends; at most 4",
                self.external.len()
            )));
        }
        Ok(())
    }

    /// Sets one `key=value` as `micctl config` sends it (keys: [`SETTABLE`]);
    /// on error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let mut next = self.clone();
        next.assign(key, value)?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    fn assign(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = |what: &str| ConfigError::Invalid(format!("{key}={value}: {what}"));
        let path = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
        match key {
            "memory" => self.memory = value.parse().map_err(|_| bad("not a number of MiB"))?,
            "cpus" => self.cpus = value.parse().map_err(|_| bad("not a number"))?,
            "firmware" => self.firmware = path(value),
            "ramdisk" => self.ramdisk = path(value),
            "bios" => self.bios = Some(PathBuf::from(value)),
            "cmdline" => self.cmdline = value.into(),
            "overlay" => self.overlay = path(value),
            "accel" => self.accel = value.into(),
            "shutdown_timeout" => {
                self.shutdown_timeout = value.parse().map_err(|_| bad("not a number of seconds"))?
            }
            "heartbeat_timeout" => {
                self.heartbeat_timeout =
                    value.parse().map_err(|_| bad("not a number of seconds"))?
            }
            "autoboot" => self.autoboot = parse_bool(value).ok_or_else(|| bad("not a boolean"))?,
            "heartbeat" => {
                self.heartbeat = parse_bool(value).ok_or_else(|| bad("not a boolean"))?
            }
            "agent" => self.agent = parse_bool(value).ok_or_else(|| bad("not a boolean"))?,
            "policy" => {
                self.policy = Policy::parse(value).ok_or_else(|| bad("not reboot or stay-down"))?
            }
            _ => {
                let keys: Vec<_> = SETTABLE.iter().map(|(k, _)| *k).collect();
                return Err(bad(&format!("unknown key (one of {})", keys.join(", "))));
            }
        }
        Ok(())
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Whether `key` may only change while the card is `ready`.
pub fn needs_ready(key: &str) -> bool {
    SETTABLE.iter().any(|(k, r)| *k == key && *r)
}

/// The number in a card name `micN`.
pub fn card_index(name: &str) -> Option<u16> {
    let n = name.strip_prefix("mic")?;
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok().filter(|n| *n < 255)
}

/// Every card micd manages, by index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MicdConfig {
    /// Cards in index order.
    pub cards: BTreeMap<u16, CardConfig>,
}

impl MicdConfig {
    /// Parses a config file's text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let tables: BTreeMap<String, CardConfig> =
            toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.into(),
                source: Box::new(e),
            })?;
        let mut cards = BTreeMap::new();
        for (name, card) in tables {
            let index = card_index(&name).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "{}: table [{name}] is not a card name (mic0 .. mic254)",
                    path.display()
                ))
            })?;
            card.validate()
                .map_err(|e| ConfigError::Invalid(format!("{}: [{name}]: {e}", path.display())))?;
            cards.insert(index, card);
        }
        Ok(MicdConfig { cards })
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Adds cards with defaults so that `mic0 .. mic(n-1)` all exist.
    pub fn with_cards(mut self, n: u16) -> Self {
        for i in 0..n {
            self.cards.entry(i).or_default();
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_per_card() {
        let c = MicdConfig::from_toml(
            r#"
[mic0]
memory = 512
cmdline = "loglevel=4"
overlay = "/ci/overlay.cpio"
policy = "stay-down"
net = "none"

[mic1]
autoboot = false
[[mic1.disk]]
image = "/srv/mic1.img"
size_mib = 64
[[mic1.disk]]
"#,
            Path::new("micd.toml"),
        )
        .unwrap();
        let m0 = &c.cards[&0];
        assert_eq!(m0.memory, 512);
        assert_eq!(m0.policy, Policy::StayDown);
        assert_eq!(m0.net, NetMode::None);
        assert_eq!(m0.disks.len(), 1);
        assert_eq!(m0.overlay.as_deref(), Some(Path::new("/ci/overlay.cpio")));
        let m1 = &c.cards[&1];
        assert!(!m1.autoboot);
        assert_eq!(m1.memory, 1024);
        assert_eq!(
            m1.disks[0].image.as_deref(),
            Some(Path::new("/srv/mic1.img"))
        );
        assert_eq!(m1.disks[1], DiskConfig::default());
    }

    #[test]
    fn devices_with_their_own_backends_and_qemu_arguments() {
        let c = MicdConfig::from_toml(
            r#"
[mic0]
qemu_args = ["-d", "guest_errors"]
[[mic0.device]]
type = "blk"
socket = "/run/qsd/blk0.sock"
[[mic0.device]]
type = "net"
socket = "/run/ch/net.sock"
"#,
            Path::new("m"),
        )
        .unwrap();
        let m0 = &c.cards[&0];
        assert_eq!(m0.qemu_args, ["-d", "guest_errors"]);
        assert_eq!(
            m0.external,
            [
                ExternalDevice {
                    kind: DeviceKind::Blk,
                    socket: "/run/qsd/blk0.sock".into()
                },
                ExternalDevice {
                    kind: DeviceKind::Net,
                    socket: "/run/ch/net.sock".into()
                }
            ]
        );
        let p = Path::new("m");
        assert!(
            MicdConfig::from_toml("[[mic0.device]]\ntype = \"gpu\"\nsocket = \"/s\"\n", p).is_err()
        );
        assert!(MicdConfig::from_toml("[[mic0.device]]\ntype = \"blk\"\n", p).is_err());
    }

    #[test]
    fn bad_files_are_refused() {
        let p = Path::new("m.toml");
        assert!(MicdConfig::from_toml("[card0]\n", p).is_err());
        assert!(MicdConfig::from_toml("[mic01]\n", p).is_err());
        assert!(MicdConfig::from_toml("[mic0]\nmemory = 1\n", p).is_err());
        assert!(MicdConfig::from_toml("[mic0]\nspeed = 1\n", p).is_err());
        assert!(MicdConfig::from_toml("[mic0]\nnet = \"wifi\"\n", p).is_err());
    }

    #[test]
    fn cards_option_fills_in_defaults() {
        let c = MicdConfig::from_toml("[mic1]\nmemory = 256\n", Path::new("m"))
            .unwrap()
            .with_cards(3);
        assert_eq!(c.cards.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(c.cards[&1].memory, 256);
        assert_eq!(c.cards[&2], CardConfig::default());
    }

    #[test]
    fn set_keys() {
        let mut c = CardConfig::default();
        c.set("memory", "768").unwrap();
        c.set("cmdline", "a=b c").unwrap();
        c.set("policy", "stay-down").unwrap();
        c.set("autoboot", "off").unwrap();
        c.set("firmware", "/k").unwrap();
        c.set("shutdown_timeout", "5").unwrap();
        assert_eq!(c.shutdown_timeout, 5);
        assert!(c.set("shutdown_timeout", "0").is_err());
        assert_eq!(
            (c.memory, c.cmdline.as_str(), c.policy, c.autoboot),
            (768, "a=b c", Policy::StayDown, false)
        );
        assert_eq!(c.firmware.as_deref(), Some(Path::new("/k")));
        c.set("firmware", "").unwrap();
        assert_eq!(c.firmware, None);
        c.set("overlay", "/ci/overlay").unwrap();
        assert_eq!(c.overlay.as_deref(), Some(Path::new("/ci/overlay")));
        assert!(needs_ready("overlay"));
        c.set("overlay", "").unwrap();
        assert_eq!(c.overlay, None);
        assert!(c.set("memory", "lots").is_err());
        assert!(c.set("cpus", "0").is_err());
        assert_eq!((c.cpus, c.shutdown_timeout), (1, 5));
        assert!(c.set("colour", "red").is_err());
        assert!(needs_ready("memory") && !needs_ready("policy"));
    }

    #[test]
    fn heartbeat_settings() {
        let d = CardConfig::default();
        assert_eq!((d.heartbeat, d.heartbeat_timeout), (true, 30));
        let c = MicdConfig::from_toml(
            "[mic0]\nheartbeat = false\nheartbeat_timeout = 5\n",
            Path::new("m"),
        )
        .unwrap();
        assert_eq!(
            (c.cards[&0].heartbeat, c.cards[&0].heartbeat_timeout),
            (false, 5)
        );
        let p = Path::new("m");
        assert!(MicdConfig::from_toml("[mic0]\nheartbeat_timeout = 0\n", p).is_err());
        let mut c = CardConfig::default();
        c.set("heartbeat", "off").unwrap();
        c.set("heartbeat_timeout", "8").unwrap();
        assert_eq!((c.heartbeat, c.heartbeat_timeout), (false, 8));
        assert!(c.set("heartbeat", "maybe").is_err());
        assert!(c.set("heartbeat_timeout", "0").is_err());
        assert_eq!(c.heartbeat_timeout, 8);
        assert!(!needs_ready("heartbeat") && !needs_ready("heartbeat_timeout"));
    }

    #[test]
    fn card_names() {
        assert_eq!(card_index("mic0"), Some(0));
        assert_eq!(card_index("mic12"), Some(12));
        assert_eq!(card_index("mic"), None);
        assert_eq!(card_index("mic012"), None);
        assert_eq!(card_index("mic255"), None);
        assert_eq!(card_index("eth0"), None);
    }
}
