//! What runs for one card: the backends, QEMU with the `mic-x100` device and
//! the bridge, as `scripts/run-card` starts them (`docs/micd.md`,
//! "Processes"). Pure: a [`CardPlan`] from the card's config and paths.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::config::{CardConfig, NetMode};
use super::layout::CardDir;
use super::link::link_mac;
use super::network::CardNet;
use super::process::ProcSpec;

/// The firmware that enters the uncompressed kernel through its PVH entry
/// (QEMU's data package ships it).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// Where the programs and the card image are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tools {
    /// Our QEMU.
    pub qemu: PathBuf,
    /// Directory of `vop-bridge`, `mic-console`, `mic-blk`, `mic-net`.
    pub bin_dir: PathBuf,
    /// The card image (`vmlinux`, `initrd.img`, `cmdline`).
    pub image_dir: PathBuf,
    /// passt.
    pub passt: PathBuf,
    /// vhost-device-vsock (`MIC_VSOCK`, else the workspace's
    /// `build/vsock/bin/vhost-device-vsock`).
    pub vsock: PathBuf,
    /// Whether micd runs as root (passt then keeps root's uid, as the
    /// state directory is private to it).
    pub root: bool,
}

impl Tools {
    /// From the environment: `MIC_QEMU` and `MIC_CARD_DIR`, else the
    /// workspace's `build/` two levels above micd's own directory
    /// (`target/release`); the daemons beside micd.
    pub fn from_env() -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("micd"));
        let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        let workspace = bin_dir
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let env_or = |var: &str, default: PathBuf| {
            std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
        };
        Tools {
            qemu: env_or(
                "MIC_QEMU",
                workspace.join("build/qemu/bin/qemu-system-x86_64"),
            ),
            image_dir: env_or("MIC_CARD_DIR", workspace.join("build/card")),
            vsock: env_or(
                "MIC_VSOCK",
                workspace.join("build/vsock/bin/vhost-device-vsock"),
            ),
            bin_dir,
            passt: PathBuf::from("passt"),
            // SAFETY: geteuid(2) has no arguments and cannot fail.
            root: unsafe { libc::geteuid() } == 0,
        }
    }
}

/// One device of the card and its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    /// `console`, `blk` or `net`.
    pub kind: &'static str,
    /// The backend process's name (`console`, `blk0`, `net`), or
    /// [`EXTERNAL`] for a backend the user runs.
    pub backend: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
}

/// The backend name of a device whose backend the user runs.
pub const EXTERNAL: &str = "external";

/// A card's initramfs with the user's overlay appended (`overlay.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayPlan {
    /// The overlay: a directory or a cpio archive.
    pub source: PathBuf,
    /// The combined initramfs QEMU boots.
    pub initrd: PathBuf,
}

/// Everything one boot of a card runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardPlan {
    /// Helpers and backends, in start order (passt before mic-net).
    pub backends: Vec<ProcSpec>,
    /// Sockets the backends create, waited for before QEMU starts.
    pub backend_sockets: Vec<PathBuf>,
    /// The card's machine.
    pub qemu: ProcSpec,
    /// The bridge.
    pub bridge: ProcSpec,
    /// The devices in page order.
    pub devices: Vec<DevicePlan>,
    /// Disk images and the size (MiB) to create them with when missing.
    pub disks: Vec<(PathBuf, u64)>,
    /// The kernel.
    pub firmware: PathBuf,
    /// The image's initramfs.
    pub ramdisk: PathBuf,
    /// With an overlay: the overlay and the initramfs QEMU boots instead,
    /// [`CardPlan::ramdisk`] with the overlay appended (written at start).
    pub overlay: Option<OverlayPlan>,
    /// The whole kernel command line.
    pub cmdline: String,
    /// The card's network, if it has one.
    pub net: Option<CardNet>,
    /// QEMU's `mic-x100` chardev socket (QEMU is waited for through it).
    pub device_socket: PathBuf,
    /// The bridge's control socket (the bridge is waited for through it).
    pub bridge_socket: PathBuf,
    /// Sockets the card's processes create besides those above.
    pub other_sockets: Vec<PathBuf>,
    /// The sockets of backends the user runs: checked before the card
    /// starts, never removed.
    pub external_sockets: Vec<PathBuf>,
}

/// What a card shares with other cards: processes micd runs for several
/// cards at once (`shared.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shared {
    /// On the card-to-card link (`link.rs`): a second network device on
    /// the hub.
    pub link: bool,
    /// In the vsock group (`vsock_group.rs`): the card's vsock device is
    /// served by the group's process instead of one of its own.
    pub vsock_group: bool,
}

/// The backend name of a vsock device served by the vsock group.
pub const VSOCK_GROUP: &str = "vsock-group";

/// The vsock CID of card `index` (micN): N + 3, SCIF node N + 1 plus two
/// (CIDs 0 to 2 are reserved; `docs/vsock.md`).
pub fn vsock_cid(index: u16) -> u32 {
    u32::from(index) + 3
}

impl CardPlan {
    /// Every socket the card's processes create.
    pub fn all_sockets(&self) -> Vec<PathBuf> {
        let mut all = self.backend_sockets.clone();
        all.push(self.device_socket.clone());
        all.push(self.bridge_socket.clone());
        all.extend(self.other_sockets.iter().cloned());
        all
    }
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn path_arg(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

impl CardPlan {
    /// Plans card `index` (`name`) with `cfg`; `base_cmdline` is the card
    /// image's `cmdline` file; `shared`: what it shares with other cards.
    pub fn new(
        name: &str,
        index: u16,
        cfg: &CardConfig,
        dir: &CardDir,
        tools: &Tools,
        base_cmdline: &str,
        shared: Shared,
    ) -> Self {
        let proc = |pname: &str, program: PathBuf, args: Vec<OsString>| ProcSpec {
            name: pname.into(),
            program,
            args,
            log: dir.log(pname),
            pidfile: dir.pidfile(pname),
            env: vec![("RUST_LOG".into(), "info".into())],
        };
        let mut backends = Vec::new();
        let mut backend_sockets = Vec::new();
        // mic-blk's and mic-net's stats sockets (`micctl stats`).
        let mut stats_sockets = Vec::new();
        let mut stats_arg = |backend: &str, args: &mut Vec<OsString>| {
            let s = dir.stats_socket(backend);
            args.push("--stats-socket".into());
            args.push(path_arg(&s));
            stats_sockets.push(s);
        };
        let mut devices = Vec::new();
        let mut expect = Vec::new();
        if cfg.console {
            let sock = dir.vhost_socket("console");
            let mut args = vec!["--socket-path".into(), path_arg(&sock)];
            args.push("--unix".into());
            args.push(path_arg(&dir.console_socket()));
            args.push("--log".into());
            args.push(path_arg(&dir.console_log()));
            backends.push(proc("console", tools.bin_dir.join("mic-console"), args));
            backend_sockets.push(sock.clone());
            devices.push(DevicePlan {
                kind: "console",
                backend: "console".into(),
                socket: sock,
            });
            expect.push("console");
        }
        let mut disks = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            let image = d.image.clone().unwrap_or_else(|| dir.disk_image(i));
            let name = format!("blk{i}");
            let sock = dir.vhost_socket(&name);
            let mut args = vec![
                "--socket-path".into(),
                path_arg(&sock),
                "--image".into(),
                path_arg(&image),
            ];
            stats_arg(&name, &mut args);
            backends.push(proc(&name, tools.bin_dir.join("mic-blk"), args));
            backend_sockets.push(sock.clone());
            devices.push(DevicePlan {
                kind: "blk",
                backend: name,
                socket: sock,
            });
            disks.push((image, d.size_mib));
        }
        if !cfg.disks.is_empty() {
            expect.push("blk");
        }
        let net = (cfg.net != NetMode::None).then(|| CardNet::for_card(index));
        if let Some(n) = net {
            let sock = dir.vhost_socket("net");
            let mut args = vec!["--socket-path".into(), path_arg(&sock)];
            if cfg.net == NetMode::Passt {
                let passt_sock = dir.passt_socket();
                let mut pargs = os(&["--foreground", "--socket"]);
                pargs.push(path_arg(&passt_sock));
                pargs.extend(os(&["-a", &n.card.to_string(), "-n", "24"]));
                pargs.extend(os(&["-g", &n.host.to_string()]));
                if tools.root {
                    // Keep root: the state directory is 0700.
                    pargs.extend(os(&["--runas", "0"]));
                }
                let mut p = proc("passt", tools.passt.clone(), pargs);
                p.env.clear();
                backends.push(p);
                backend_sockets.push(passt_sock.clone());
                args.push("--stream".into());
                let mut a = OsString::from("unix:");
                a.push(passt_sock.as_os_str());
                args.push(a);
            } else {
                args.extend(os(&["--tap", name, "--host-ip", &n.host_cidr()]));
                // A queue pair per card CPU, as many as the device page
                // holds; the card's driver enables them through the control
                // queue the bridge serves (`docs/vop-abi.md` 5.8).
                let pairs = cfg.cpus.min(u32::from(crate::backend::MAX_NET_PAIRS));
                if pairs > 1 {
                    args.extend(os(&["--num-queue-pairs", &pairs.to_string()]));
                }
            }
            stats_arg("net", &mut args);
            backends.push(proc("net", tools.bin_dir.join("mic-net"), args));
            backend_sockets.push(sock.clone());
            devices.push(DevicePlan {
                kind: "net",
                backend: "net".into(),
                socket: sock,
            });
            expect.push("net");
        }
        let link_mac = shared.link.then(|| link_mac(index));
        if let Some(mac) = &link_mac {
            let sock = dir.vhost_socket("link");
            let mut stream = OsString::from("unix:");
            stream.push(dir.link_socket().as_os_str());
            let mut args = vec![
                "--socket-path".into(),
                path_arg(&sock),
                "--stream".into(),
                stream,
                "--mac".into(),
                mac.into(),
            ];
            stats_arg("link", &mut args);
            backends.push(proc("link", tools.bin_dir.join("mic-net"), args));
            backend_sockets.push(sock.clone());
            devices.push(DevicePlan {
                kind: "net",
                backend: "link".into(),
                socket: sock,
            });
        }
        let mut external_sockets = Vec::new();
        let mut other_sockets = vec![dir.qmp_socket(), dir.console_socket()];
        let vsock_at = devices.len();
        for d in &cfg.external {
            let kind = d.kind.name();
            devices.push(DevicePlan {
                kind,
                backend: EXTERNAL.into(),
                socket: d.socket.clone(),
            });
            external_sockets.push(d.socket.clone());
            if kind != "vsock" && !expect.contains(&kind) {
                expect.push(kind);
            }
        }
        if cfg.vsock && shared.vsock_group {
            // The group's process serves the card; its socket is there
            // before the card starts, as a user's backend's is.
            let sock = dir.vhost_socket("vsock");
            external_sockets.push(sock.clone());
            devices.insert(
                vsock_at,
                DevicePlan {
                    kind: "vsock",
                    backend: VSOCK_GROUP.into(),
                    socket: sock,
                },
            );
        } else if cfg.vsock {
            other_sockets.push(dir.vsock_uds());
            let sock = dir.vhost_socket("vsock");
            let vm = format!(
                "guest-cid={},socket={},uds-path={}",
                vsock_cid(index),
                sock.display(),
                dir.vsock_uds().display()
            );
            let args = vec!["--vm".into(), vm.into()];
            backends.push(proc("vsock", tools.vsock.clone(), args));
            backend_sockets.push(sock.clone());
            // micd's own devices first in the page, the user's after them.
            devices.insert(
                vsock_at,
                DevicePlan {
                    kind: "vsock",
                    backend: "vsock".into(),
                    socket: sock,
                },
            );
        }

        let firmware = cfg
            .firmware
            .clone()
            .unwrap_or_else(|| tools.image_dir.join("vmlinux"));
        let ramdisk = cfg
            .ramdisk
            .clone()
            .unwrap_or_else(|| tools.image_dir.join("initrd.img"));
        let mut cmdline = format!(
            "{} quiet mic.expect={} mic.hostname={name}",
            base_cmdline.trim(),
            if expect.is_empty() {
                "none".to_string()
            } else {
                expect.join(",")
            }
        );
        if let Some(n) = net {
            cmdline += &format!(" {}", n.kernel_params());
        }
        if let Some(mac) = &link_mac {
            cmdline += &format!(" mic.link={mac}");
        }
        if !cfg.cmdline.trim().is_empty() {
            cmdline += &format!(" {}", cfg.cmdline.trim());
        }

        let mem = cfg.memory;
        let mut q = os(&["-accel", &cfg.accel, "-m", &mem.to_string()]);
        q.extend(os(&["-smp", &cfg.cpus.to_string(), "-cpu", "max"]));
        // A reboot or crash in the card ends the machine; micd decides
        // whether it boots again (lifecycle.rs).
        q.extend(os(&["-nodefaults", "-no-user-config", "-no-reboot"]));
        q.extend(os(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-machine",
            "q35,memory-backend=mem",
        ]));
        q.push("-chardev".into());
        q.push(
            format!(
                "socket,id=mic,path={},server=on,wait=off",
                dir.device_socket().display()
            )
            .into(),
        );
        q.push("-device".into());
        q.push(format!("mic-x100,chardev=mic,node-id={}", index + 1).into());
        let bios = cfg.bios.clone().unwrap_or_else(|| PathBuf::from(QBOOT));
        if !bios.as_os_str().is_empty() {
            q.push("-bios".into());
            q.push(path_arg(&bios));
        }
        q.push("-kernel".into());
        q.push(path_arg(&firmware));
        let overlay = cfg.overlay.clone().map(|source| OverlayPlan {
            source,
            initrd: dir.overlay_initrd(),
        });
        q.push("-initrd".into());
        q.push(path_arg(overlay.as_ref().map_or(&ramdisk, |o| &o.initrd)));
        q.push("-append".into());
        q.push(cmdline.clone().into());
        q.push("-chardev".into());
        q.push(
            format!(
                "file,id=serial,path={},append=on",
                dir.serial_log().display()
            )
            .into(),
        );
        q.extend(os(&[
            "-serial",
            "chardev:serial",
            "-display",
            "none",
            "-monitor",
            "none",
        ]));
        q.push("-qmp".into());
        q.push(format!("unix:{},server=on,wait=off", dir.qmp_socket().display()).into());
        q.extend(cfg.qemu_args.iter().map(OsString::from));
        let mut qemu = proc("qemu", tools.qemu.clone(), q);
        qemu.env.clear();

        let mut b = vec![
            "--device-socket".into(),
            path_arg(&dir.device_socket()),
            "--control-socket".into(),
            path_arg(&dir.bridge_socket()),
        ];
        for d in &devices {
            b.push(format!("--{}", d.kind).into());
            b.push(path_arg(&d.socket));
        }
        let bridge = proc("bridge", tools.bin_dir.join("vop-bridge"), b);

        CardPlan {
            backends,
            backend_sockets,
            qemu,
            bridge,
            devices,
            disks,
            firmware,
            ramdisk,
            overlay,
            cmdline,
            net,
            device_socket: dir.device_socket(),
            bridge_socket: dir.bridge_socket(),
            other_sockets: other_sockets.into_iter().chain(stats_sockets).collect(),
            external_sockets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::micd::config::DiskConfig;

    fn tools() -> Tools {
        Tools {
            qemu: "/q/qemu".into(),
            bin_dir: "/b".into(),
            image_dir: "/img".into(),
            passt: "passt".into(),
            vsock: "/v/vhost-device-vsock".into(),
            root: false,
        }
    }

    /// The plan's devices as (kind, backend) pairs, in page order.
    fn devices(p: &CardPlan) -> Vec<(&'static str, &str)> {
        p.devices
            .iter()
            .map(|d| (d.kind, d.backend.as_str()))
            .collect()
    }

    fn has(args: &[OsString], seq: &[&str]) -> bool {
        let seq: Vec<OsString> = os(seq);
        args.windows(seq.len()).any(|w| w == seq.as_slice())
    }

    #[test]
    fn default_card() {
        let dir = CardDir::new(Path::new("/s"), "mic1");
        let p = CardPlan::new(
            "mic1",
            1,
            &CardConfig::default(),
            &dir,
            &tools(),
            "console=ttyS0\n",
            Shared::default(),
        );
        let names: Vec<_> = p.backends.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["console", "blk0", "passt", "net", "vsock"]);
        // mic1 is SCIF node 2 and vsock CID 4.
        let vsock = &p.backends[4];
        assert_eq!(vsock.program, Path::new("/v/vhost-device-vsock"));
        assert!(has(
            &vsock.args,
            &[
                "--vm",
                "guest-cid=4,socket=/s/mic1/vhost-vsock.sock,uds-path=/s/mic1/vsock.uds"
            ]
        ));
        assert_eq!(
            p.cmdline,
            "console=ttyS0 quiet mic.expect=console,blk,net mic.hostname=mic1 \
             mic.ip=172.31.2.1/24 mic.host=172.31.2.254"
        );
        assert_eq!(p.firmware, Path::new("/img/vmlinux"));
        assert_eq!(p.overlay, None);
        assert!(has(&p.qemu.args, &["-initrd", "/img/initrd.img"]));
        assert_eq!(p.disks, [(PathBuf::from("/s/mic1/disk0.img"), 1024)]);
        let q = &p.qemu.args;
        assert!(has(q, &["-no-reboot"]));
        assert!(has(q, &["-device", "mic-x100,chardev=mic,node-id=2"]));
        assert!(has(q, &["-bios", QBOOT, "-kernel", "/img/vmlinux"]));
        assert!(has(
            q,
            &[
                "-chardev",
                "file,id=serial,path=/s/mic1/serial.log,append=on"
            ]
        ));
        assert!(has(
            &p.backends[2].args,
            &["-a", "172.31.2.1", "-n", "24", "-g", "172.31.2.254"]
        ));
        assert!(has(
            &p.backends[3].args,
            &["--stream", "unix:/s/mic1/passt.sock"]
        ));
        assert!(has(
            &p.bridge.args,
            &[
                "--console",
                "/s/mic1/vhost-console.sock",
                "--blk",
                "/s/mic1/vhost-blk0.sock",
                "--net",
                "/s/mic1/vhost-net.sock",
                "--vsock",
                "/s/mic1/vhost-vsock.sock"
            ]
        ));
        assert_eq!(p.backend_sockets.len(), 5);
        // mic-blk and mic-net serve their stats beside their sockets.
        assert!(has(
            &p.backends[1].args,
            &["--stats-socket", "/s/mic1/stats-blk0.sock"]
        ));
        assert!(has(
            &p.backends[3].args,
            &["--stats-socket", "/s/mic1/stats-net.sock"]
        ));
        assert!(p.all_sockets().contains(&dir.stats_socket("blk0")));
        assert!(p.all_sockets().contains(&dir.stats_socket("net")));
    }

    #[test]
    fn no_net_two_disks_own_kernel() {
        let dir = CardDir::new(Path::new("/s"), "mic0");
        let cfg = CardConfig {
            net: NetMode::None,
            disks: vec![
                DiskConfig::default(),
                DiskConfig {
                    image: Some("/d.img".into()),
                    size_mib: 8,
                },
            ],
            firmware: Some("/k/bzImage".into()),
            bios: Some("".into()),
            cmdline: " loglevel=4 ".into(),
            ..Default::default()
        };
        let p = CardPlan::new("mic0", 0, &cfg, &dir, &tools(), "c", Shared::default());
        assert_eq!(p.net, None);
        assert!(p
            .cmdline
            .ends_with("mic.expect=console,blk mic.hostname=mic0 loglevel=4"));
        assert_eq!(p.disks[1], (PathBuf::from("/d.img"), 8));
        assert!(!has(&p.qemu.args, &["-bios"]));
        assert!(has(&p.qemu.args, &["-kernel", "/k/bzImage"]));
        assert!(has(&p.qemu.args, &["-initrd", "/img/initrd.img"]));
        assert_eq!(
            p.devices.iter().map(|d| d.kind).collect::<Vec<_>>(),
            ["console", "blk", "blk", "vsock"]
        );
    }

    #[test]
    fn devices_with_their_own_backends_come_last() {
        use crate::config::DeviceKind;
        use crate::micd::config::ExternalDevice;
        let dir = CardDir::new(Path::new("/s"), "mic0");
        let cfg = CardConfig {
            net: NetMode::None,
            disks: vec![],
            external: vec![
                ExternalDevice {
                    kind: DeviceKind::Blk,
                    socket: "/q/blk.sock".into(),
                },
                ExternalDevice {
                    kind: DeviceKind::Net,
                    socket: "/ch/net.sock".into(),
                },
            ],
            qemu_args: vec!["-d".into(), "guest_errors".into()],
            ..Default::default()
        };
        let p = CardPlan::new("mic0", 0, &cfg, &dir, &tools(), "c", Shared::default());
        assert_eq!(
            devices(&p),
            [
                ("console", "console"),
                ("vsock", "vsock"),
                ("blk", EXTERNAL),
                ("net", EXTERNAL)
            ]
        );
        // No process of micd's for them, and never removed as stale.
        assert_eq!(p.backends.len(), 2);
        assert!(!p.all_sockets().contains(&PathBuf::from("/q/blk.sock")));
        assert_eq!(p.external_sockets.len(), 2);
        assert!(p.cmdline.contains("mic.expect=console,blk,net "));
        assert!(has(
            &p.bridge.args,
            &[
                "--vsock",
                "/s/mic0/vhost-vsock.sock",
                "--blk",
                "/q/blk.sock"
            ]
        ));
        assert!(p.qemu.args.ends_with(&os(&["-d", "guest_errors"])));
    }

    const LINKED: Shared = Shared {
        link: true,
        vsock_group: false,
    };

    #[test]
    fn a_linked_card_has_a_second_network_device_on_the_hub() {
        let dir = CardDir::new(Path::new("/s"), "mic1");
        let p = CardPlan::new(
            "mic1",
            1,
            &CardConfig::default(),
            &dir,
            &tools(),
            "c",
            LINKED,
        );
        let link = p.backends.iter().find(|b| b.name == "link").unwrap();
        assert!(has(
            &link.args,
            &[
                "--socket-path",
                "/s/mic1/vhost-link.sock",
                "--stream",
                "unix:/s/mic1/link.sock",
                "--mac",
                "02:6d:69:63:00:01"
            ]
        ));
        assert_eq!(
            devices(&p),
            [
                ("console", "console"),
                ("blk", "blk0"),
                ("net", "net"),
                ("net", "link"),
                ("vsock", "vsock")
            ]
        );
        assert!(p.cmdline.ends_with(" mic.link=02:6d:69:63:00:01"));
        assert!(has(
            &link.args,
            &["--stats-socket", "/s/mic1/stats-link.sock"]
        ));
        // The hub's socket is not the card's to remove.
        assert!(!p.all_sockets().contains(&dir.link_socket()));
    }

    #[test]
    fn a_card_in_the_vsock_group_runs_no_vsock_backend_of_its_own() {
        let dir = CardDir::new(Path::new("/s"), "mic1");
        let grouped = Shared {
            link: false,
            vsock_group: true,
        };
        let p = CardPlan::new(
            "mic1",
            1,
            &CardConfig::default(),
            &dir,
            &tools(),
            "c",
            grouped,
        );
        assert!(p.backends.iter().all(|b| b.name != "vsock"));
        assert_eq!(
            devices(&p),
            [
                ("console", "console"),
                ("blk", "blk0"),
                ("net", "net"),
                ("vsock", VSOCK_GROUP)
            ]
        );
        // The group's sockets are awaited before the card starts and are
        // not the card's to remove.
        let sock = dir.vhost_socket("vsock");
        assert!(p.external_sockets.contains(&sock));
        assert!(!p.all_sockets().contains(&sock));
        assert!(!p.all_sockets().contains(&dir.vsock_uds()));
        // Without vsock, no device at all.
        let cfg = CardConfig {
            vsock: false,
            ..CardConfig::default()
        };
        let p = CardPlan::new("mic1", 1, &cfg, &dir, &tools(), "c", grouped);
        assert!(devices(&p).iter().all(|d| d.0 != "vsock"));
    }

    #[test]
    fn overlay_boots_the_combined_initramfs() {
        let dir = CardDir::new(Path::new("/s"), "mic2");
        let cfg = CardConfig {
            overlay: Some("/ci/tests".into()),
            ramdisk: Some("/r/initrd.img".into()),
            ..Default::default()
        };
        let p = CardPlan::new("mic2", 2, &cfg, &dir, &tools(), "c", Shared::default());
        assert_eq!(p.ramdisk, Path::new("/r/initrd.img"));
        assert_eq!(
            p.overlay,
            Some(OverlayPlan {
                source: "/ci/tests".into(),
                initrd: "/s/mic2/initrd-overlay.img".into(),
            })
        );
        assert!(has(
            &p.qemu.args,
            &["-initrd", "/s/mic2/initrd-overlay.img"]
        ));
        assert!(!has(&p.qemu.args, &["-initrd", "/r/initrd.img"]));
    }

    #[test]
    fn tap_as_root() {
        let dir = CardDir::new(Path::new("/s"), "mic3");
        let cfg = CardConfig {
            net: NetMode::Tap,
            ..Default::default()
        };
        let p = CardPlan::new("mic3", 3, &cfg, &dir, &tools(), "c", Shared::default());
        let net = p.backends.iter().find(|b| b.name == "net").unwrap();
        assert!(has(
            &net.args,
            &["--tap", "mic3", "--host-ip", "172.31.4.254/24"]
        ));
        assert!(!has(&net.args, &["--num-queue-pairs"]));
    }

    #[test]
    fn a_tap_gets_a_queue_pair_per_card_cpu() {
        let dir = CardDir::new(Path::new("/s"), "mic3");
        let pairs = |cpus| {
            let cfg = CardConfig {
                net: NetMode::Tap,
                cpus,
                ..Default::default()
            };
            let p = CardPlan::new("mic3", 3, &cfg, &dir, &tools(), "c", Shared::default());
            let net = p.backends.iter().find(|b| b.name == "net").unwrap();
            let args: Vec<_> = net.args.iter().map(|a| a.to_str().unwrap()).collect();
            args.iter()
                .position(|a| *a == "--num-queue-pairs")
                .map(|i| args[i + 1].to_string())
        };
        assert_eq!(pairs(1), None);
        assert_eq!(pairs(4).as_deref(), Some("4"));
        // 7 pairs and the control queue fill the page's 16 queues.
        assert_eq!(pairs(32).as_deref(), Some("7"));
    }
}
