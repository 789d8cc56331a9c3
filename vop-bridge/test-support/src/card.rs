//! Boot-test harness: one emulated card with the real QEMU (TCG), the real
//! card OS, the real backends and the real bridge, in a temporary directory.
//!
//! The card's console is `mic-console --unix` (or, with [`ConsoleMode::Pty`],
//! `mic-console --pty --no-multiport`); the harness attaches to it, types
//! commands and reads their output. The card's state comes from the bridge's
//! control socket.

use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vop_bridge::agent_client::AgentClient;

use crate::data::{rand_u64, tail};
use crate::paths::{bin, card_dir, qemu, vsock_backend};
use crate::process::Process;
use crate::shell::Shell;
use crate::temp::TempDir;
use crate::wait::wait_for;

/// How long a boot may take under TCG on a loaded two-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The firmware cards boot with: qboot, the minimal firmware QEMU's data
/// package ships, which hands over to the kernel's PVH entry at once.
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// QEMU arguments that boot the card OS the fast way: the uncompressed
/// kernel through its PVH entry with qboot, the image's initramfs, and its
/// command line (`cmdline` in the image) followed by `extra`.
pub fn card_boot_args(extra: &str) -> Vec<std::ffi::OsString> {
    let card = card_dir();
    let base = std::fs::read_to_string(card.join("cmdline")).unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["-bios".into(), QBOOT.into(), "-kernel".into()];
    args.push(card.join("vmlinux").into());
    args.push("-initrd".into());
    args.push(card.join("initrd.img").into());
    args.push("-append".into());
    args.push(format!("{} quiet {extra}", base.trim()).into());
    args
}

/// A shell on the serial console that a VM (stock QEMU booting the card OS
/// with [`card_boot_args`]) serves on the unix socket `sock`, once the card
/// OS says it is online.
pub fn serial_shell_online(sock: &Path) -> Shell {
    wait_for(Duration::from_secs(20), "QEMU's serial socket", || {
        sock.exists().then_some(())
    });
    let serial = UnixStream::connect(sock).unwrap();
    let shell = Shell::new(Box::new(serial.try_clone().unwrap()), Box::new(serial));
    wait_for(BOOT_TIMEOUT, "the VM to come up", || {
        shell
            .output()
            .contains("mic-card: online devices=")
            .then_some(())
    });
    shell
}

/// The block backend of a card.
#[allow(clippy::enum_variant_names)] // MicBlk names the daemon.
pub enum Blk {
    /// No disk.
    None,
    /// `mic-blk` on this image.
    MicBlk(PathBuf),
    /// qemu-storage-daemon's vhost-user-blk export of this image.
    Qsd(PathBuf),
}

/// The network backend of a card.
pub enum Net {
    /// No network.
    None,
    /// `mic-net` in stream mode, connecting to this unix socket.
    Stream(PathBuf),
    /// `mic-net` on tap `name`, host address 172.31.1.254/24, started inside
    /// network namespace `netns`.
    Tap {
        /// Tap device name.
        name: String,
        /// Network namespace (`ip netns`) the tap lives in.
        netns: String,
    },
}

/// How the card's console reaches the harness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsoleMode {
    /// `mic-console --unix` (multiport), attached through its unix socket.
    #[default]
    Unix,
    /// `mic-console --pty --no-multiport` (2 queues, size in config space):
    /// the harness opens the pty's slave in raw mode.
    Pty,
}

/// What a test card gets.
pub struct CardOptions {
    /// The console backend.
    pub console: ConsoleMode,
    /// Disk.
    pub blk: Blk,
    /// More arguments for `mic-blk` ([`Blk::MicBlk`]).
    pub blk_args: Vec<String>,
    /// Network.
    pub net: Net,
    /// More arguments for `mic-net`.
    pub net_args: Vec<String>,
    /// Card CPUs.
    pub smp: u32,
    /// Card memory in MiB.
    pub memory_mib: u32,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Devices that make the card print its `online` marker.
    pub expect: &'static str,
    /// A virtio-vsock device served by `vhost-device-vsock` (guest CID
    /// [`VSOCK_CID`], host socket [`Card::vsock_uds`]). With it (the
    /// default) [`Card::run`] goes through the card agent; without it,
    /// through the console.
    pub vsock: bool,
}

/// The guest CID of the test card (card 0: CID 3, `docs/vsock.md`).
pub const VSOCK_CID: u32 = 3;

impl Default for CardOptions {
    fn default() -> Self {
        CardOptions {
            console: ConsoleMode::Unix,
            blk: Blk::None,
            blk_args: Vec::new(),
            net: Net::None,
            net_args: Vec::new(),
            smp: 1,
            memory_mib: 512,
            cmdline: String::new(),
            expect: "console",
            vsock: true,
        }
    }
}

/// A running emulated card.
pub struct Card {
    /// Working directory (sockets, logs).
    pub dir: TempDir,
    backends: Vec<Process>,
    blk: Option<Process>,
    vsock: Option<Process>,
    bridge: Option<Process>,
    qemu: Option<Process>,
    shell: Option<Shell>,
    /// The console's shell has answered once.
    shell_ready: bool,
    /// The pty's slave in [`ConsoleMode::Pty`].
    pty: Option<std::fs::File>,
    options: CardOptions,
}

fn wait_socket(p: &Path, what: &str) {
    wait_for(Duration::from_secs(20), what, || p.exists().then_some(()));
}

impl Card {
    /// Starts backends, QEMU and the bridge; returns once the card's console
    /// has a shell and the bridge reports the card online.
    pub fn boot(options: CardOptions) -> Card {
        let dir = TempDir::new("card");
        let mut card = Card {
            dir,
            backends: Vec::new(),
            blk: None,
            vsock: None,
            bridge: None,
            qemu: None,
            shell: None,
            shell_ready: false,
            pty: None,
            options,
        };
        card.start_backends();
        card.start_qemu();
        card.start_bridge();
        card.attach_console();
        card.wait_online();
        card
    }

    /// Path of a file in the card's working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn blk_command(&self) -> Option<Command> {
        let sock = self.path("blk.sock");
        match &self.options.blk {
            Blk::None => None,
            Blk::MicBlk(img) => {
                let mut c = Command::new(bin("mic-blk"));
                c.arg("--socket-path").arg(&sock).arg("--image").arg(img);
                c.args(&self.options.blk_args);
                c.env("RUST_LOG", "info");
                Some(c)
            }
            Blk::Qsd(img) => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=disk,filename={},cache.direct=off",
                        img.display()
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                        sock.display()
                    ));
                Some(c)
            }
        }
    }

    /// The block backend's pid while it runs.
    pub fn blk_pid(&self) -> Option<u32> {
        self.blk.as_ref().map(Process::pid)
    }

    /// Kills the block backend hard (SIGKILL) and starts a new one on the same
    /// socket once `down_for` has passed.
    pub fn restart_blk(&mut self, down_for: Duration) {
        if let Some(mut b) = self.blk.take() {
            b.kill();
        }
        std::thread::sleep(down_for);
        let mut cmd = self.blk_command().expect("a block backend");
        let log = self.path("blk-restarted.log");
        self.blk = Some(Process::spawn(&mut cmd, &log));
    }

    /// vhost-device-vsock's host-side UNIX socket (its `uds-path`).
    pub fn vsock_uds(&self) -> PathBuf {
        self.path("vsock.uds")
    }

    fn start_vsock(&mut self, log: &str) {
        let arg = format!(
            "guest-cid={VSOCK_CID},socket={},uds-path={}",
            self.path("vsock.sock").display(),
            self.vsock_uds().display()
        );
        let mut cmd = Command::new(vsock_backend());
        cmd.args(["--vm", &arg]).env("RUST_LOG", "info");
        let log = self.path(log);
        self.vsock = Some(Process::spawn(&mut cmd, &log));
    }

    /// Kills vhost-device-vsock hard (SIGKILL) and starts a new one on the
    /// same sockets.
    pub fn restart_vsock(&mut self) {
        if let Some(mut v) = self.vsock.take() {
            v.kill();
        }
        let _ = std::fs::remove_file(self.path("vsock.sock"));
        self.start_vsock("vsock-restarted.log");
        wait_socket(&self.path("vsock.sock"), "vhost-device-vsock's socket");
    }

    fn start_backends(&mut self) {
        let d = self.dir.path().to_path_buf();
        let s = |n: &str| d.join(n).to_str().unwrap().to_string();
        let console: &[&str] = match self.options.console {
            ConsoleMode::Unix => &["--unix", &s("con.sock")],
            ConsoleMode::Pty => &["--pty", "--no-multiport"],
        };
        self.backends.push(Process::spawn(
            Command::new(bin("mic-console"))
                .args(["--socket-path", &s("console.sock")])
                .args(console)
                .args(["--log", &s("console.log")])
                .env("RUST_LOG", "info"),
            &d.join("mic-console.log"),
        ));
        if let Some(mut cmd) = self.blk_command() {
            let log = d.join("blk.log");
            self.blk = Some(Process::spawn(&mut cmd, &log));
        }
        match &self.options.net {
            Net::None => {}
            Net::Stream(peer) => self.backends.push(Process::spawn(
                Command::new(bin("mic-net"))
                    .args(["--socket-path", &s("net.sock"), "--stream"])
                    .arg(format!("unix:{}", peer.display()))
                    .args(&self.options.net_args)
                    .env("RUST_LOG", "info"),
                &d.join("mic-net.log"),
            )),
            Net::Tap { name, netns } => self.backends.push(Process::spawn(
                Command::new("ip")
                    .args(["netns", "exec", netns])
                    .arg(bin("mic-net"))
                    .args(["--socket-path", &s("net.sock"), "--tap", name])
                    .args(["--host-ip", "172.31.1.254/24"])
                    .args(&self.options.net_args)
                    .env("RUST_LOG", "info"),
                &d.join("mic-net.log"),
            )),
        }
        wait_socket(&d.join("console.sock"), "mic-console's socket");
        if !matches!(self.options.blk, Blk::None) {
            wait_socket(&d.join("blk.sock"), "the block backend's socket");
        }
        if !matches!(self.options.net, Net::None) {
            wait_socket(&d.join("net.sock"), "mic-net's socket");
        }
        if self.options.vsock {
            self.start_vsock("vsock.log");
            wait_socket(&d.join("vsock.sock"), "vhost-device-vsock's socket");
        }
    }

    /// Starts QEMU with the card (the bridge may come later).
    pub fn start_qemu(&mut self) {
        let d = self.dir.path();
        let mem = self.options.memory_mib;
        let smp = self.options.smp.to_string();
        let append = format!(
            "mic.expect={} {}",
            self.options.expect, self.options.cmdline
        );
        let mut cmd = Command::new(qemu());
        cmd.args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            &smp,
            "-m",
            &mem.to_string(),
            "-nodefaults",
            "-no-user-config",
        ])
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
        .args(["-machine", "q35,memory-backend=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=mic0,path={},server=on,wait=off",
            d.join("dev.sock").display()
        ))
        .args(["-device", "mic-x100,chardev=mic0"])
        .args(card_boot_args(&append))
        .arg("-serial")
        .arg(format!("file:{}", d.join("serial.log").display()))
        .args(["-display", "none", "-monitor", "none"]);
        let _ = std::fs::remove_file(d.join("dev.sock"));
        self.qemu = Some(Process::spawn(&mut cmd, &d.join("qemu.log")));
        wait_socket(&d.join("dev.sock"), "QEMU's device socket");
    }

    /// Starts (or restarts) the bridge.
    pub fn start_bridge(&mut self) {
        let d = self.dir.path().to_path_buf();
        let mut cmd = Command::new(bin("vop-bridge"));
        cmd.arg("--device-socket")
            .arg(d.join("dev.sock"))
            .arg("--control-socket")
            .arg(d.join("ctl.sock"))
            .arg("--console")
            .arg(d.join("console.sock"));
        if !matches!(self.options.blk, Blk::None) {
            cmd.arg("--blk").arg(d.join("blk.sock"));
        }
        if !matches!(self.options.net, Net::None) {
            cmd.arg("--net").arg(d.join("net.sock"));
        }
        if self.options.vsock {
            cmd.arg("--vsock").arg(d.join("vsock.sock"));
        }
        cmd.env("RUST_LOG", "info");
        let log = d.join(format!("bridge-{}.log", rand_u64() % 100000));
        self.bridge = Some(Process::spawn(&mut cmd, &log));
        wait_socket(&d.join("ctl.sock"), "the bridge's control socket");
    }

    /// Kills the bridge (SIGKILL: no clean-up of any kind).
    pub fn kill_bridge(&mut self) {
        if let Some(mut b) = self.bridge.take() {
            b.kill();
        }
        let _ = std::fs::remove_file(self.path("ctl.sock"));
    }

    fn attach_console(&mut self) {
        let (r, w): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match self.options.console {
            ConsoleMode::Unix => {
                let p = self.path("con.sock");
                wait_socket(&p, "mic-console's unix socket");
                let s = UnixStream::connect(&p).unwrap();
                (Box::new(s.try_clone().unwrap()), Box::new(s))
            }
            ConsoleMode::Pty => {
                let tty = open_raw(&self.pty_path());
                let pair: (Box<dyn Read + Send>, Box<dyn Write + Send>) = (
                    Box::new(tty.try_clone().unwrap()),
                    Box::new(tty.try_clone().unwrap()),
                );
                self.pty = Some(tty);
                pair
            }
        };
        self.shell = Some(Shell::new(r, w));
    }

    /// The pty mic-console announced in its log ([`ConsoleMode::Pty`]).
    fn pty_path(&self) -> PathBuf {
        let log = self.path("mic-console.log");
        wait_for(Duration::from_secs(20), "mic-console's pty", || {
            let f = std::fs::File::open(&log).ok()?;
            std::io::BufReader::new(f)
                .lines()
                .map_while(|l| l.ok())
                .find_map(|l| {
                    l.strip_prefix("mic-console: console on ")
                        .map(|p| PathBuf::from(p.trim()))
                })
        })
    }

    /// Sets the console's window size on the pty ([`ConsoleMode::Pty`]).
    pub fn set_console_size(&self, rows: u16, cols: u16) {
        let tty = self.pty.as_ref().expect("a pty console");
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a valid winsize on a tty we opened.
        let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// The card's state line from the bridge (`state=... shutdown_status=...`).
    pub fn status(&self) -> Option<String> {
        vop_bridge::control::request(&self.path("ctl.sock"), "status").ok()
    }

    /// The bridge's device list, a line per device (`<index> <type>
    /// <socket> <running|stopped|removing> reconnects=<n>`).
    pub fn devices(&self) -> Vec<String> {
        vop_bridge::control::request(&self.path("ctl.sock"), "devices")
            .map(|l| l.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The bridge's recent events, oldest first (`history` on its control
    /// socket: `attached adopted`, `state resetting nop`, `backend 1 lost`,
    /// ...).
    pub fn history(&self) -> Vec<String> {
        vop_bridge::control::request(&self.path("ctl.sock"), "history")
            .map(|l| l.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Waits until the bridge's history has `event`, or an event that
    /// starts with `event` and a space (`state resetting` matches `state
    /// resetting restart`); returns the history.
    pub fn wait_event(&self, event: &str, timeout: Duration) -> Vec<String> {
        wait_for(timeout, &format!("the bridge's event `{event}`"), || {
            let h = self.history();
            h.iter().any(|e| event_is(e, event)).then_some(h)
        })
    }

    /// Waits until the bridge reports `state` (e.g. "online").
    pub fn wait_state(&self, state: &str, timeout: Duration) -> String {
        let want = format!("state={state} ");
        wait_for(timeout, &format!("card state {state}"), || {
            self.status().filter(|s| s.starts_with(&want))
        })
    }

    /// Waits for the card to be online: the bridge says so, the card
    /// printed its marker, and its agent answers (or, without vsock, the
    /// shell on its console does).
    pub fn wait_online(&mut self) {
        self.wait_state("online", BOOT_TIMEOUT);
        wait_for(BOOT_TIMEOUT, "the card's online marker", || {
            self.serial().contains("mic-card: online").then_some(())
        });
        if self.options.vsock {
            self.wait_agent();
        } else {
            self.wait_shell();
        }
    }

    /// Waits until the card agent answers on vsock.
    pub fn wait_agent(&self) {
        let uds = self.vsock_uds();
        wait_for(BOOT_TIMEOUT, "the card agent", || {
            AgentClient::connect(&uds).ok().map(drop)
        });
    }

    /// Waits until the shell on the card's console answers (it may start
    /// after the online marker): [`Shell::wait_ready`].
    pub fn wait_shell(&mut self) {
        self.shell().wait_ready();
        self.shell_ready = true;
    }

    /// Everything the card printed on its serial port.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }

    fn shell(&mut self) -> &mut Shell {
        self.shell.as_mut().expect("console attached")
    }

    /// The console's shell, once it answers.
    fn console(&mut self) -> &mut Shell {
        if !self.shell_ready {
            self.wait_shell();
        }
        self.shell()
    }

    /// Everything read from the virtio console so far.
    pub fn console_output(&self) -> String {
        self.shell.as_ref().map(Shell::output).unwrap_or_default()
    }

    /// Types `text` on the card's console, once its shell answers.
    pub fn type_text(&mut self, text: &str) {
        self.console().type_text(text);
    }

    /// Runs a shell command on the card, through the agent (with vsock) or
    /// the console; returns its output (stdout, then stderr, trimmed of
    /// surrounding newlines) and exit code.
    pub fn run_status(&mut self, cmd: &str, timeout: Duration) -> (String, i32) {
        if !self.options.vsock {
            return self.console_run_status(cmd, timeout);
        }
        let uds = self.vsock_uds();
        let cmd = cmd.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        let what = cmd.clone();
        std::thread::spawn(move || {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let r = AgentClient::connect_when_up(&uds, Duration::from_secs(10))
                .and_then(|c| c.exec(&["sh", "-c", &cmd], std::io::empty(), &mut out, &mut err));
            let _ = tx.send(r.map(|e| (out, err, e.shell_status())));
        });
        let (mut out, err, code) = match rx.recv_timeout(timeout) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("`{what}` through the card agent: {e}"),
            Err(_) => panic!("timed out waiting for `{what}` on the card"),
        };
        out.extend_from_slice(&err);
        let text = String::from_utf8_lossy(&out).replace('\r', "");
        (text.trim_matches('\n').to_string(), code)
    }

    /// Runs a command that must succeed; returns its output.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> String {
        let (out, code) = self.run_status(cmd, timeout);
        assert_eq!(code, 0, "`{cmd}` failed on the card: {out}");
        out
    }

    /// Runs a shell command typed on the card's console; returns its
    /// output and exit code (for tests about the console itself).
    pub fn console_run_status(&mut self, cmd: &str, timeout: Duration) -> (String, i32) {
        self.console().run_status(cmd, timeout)
    }

    /// [`Card::console_run_status`] for a command that must succeed.
    pub fn console_run(&mut self, cmd: &str, timeout: Duration) -> String {
        self.console().run(cmd, timeout)
    }

    /// Waits for QEMU to exit on its own.
    pub fn wait_qemu_exit(&mut self, timeout: Duration) {
        let q = self.qemu.as_mut().expect("qemu running");
        wait_for(timeout, "QEMU to exit", || (!q.alive()).then_some(()));
        self.qemu = None;
    }

    /// Kills QEMU hard (SIGKILL), as a power cut would.
    pub fn kill_qemu(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            q.kill();
        }
    }

    /// Everything the bridge logged (all of its runs).
    pub fn bridge_log(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("bridge-") {
                all += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        all
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        self.kill_qemu();
        self.kill_bridge();
        // SIGTERM (then SIGKILL) so daemons remove their sockets and taps.
        self.blk.take();
        self.vsock.take();
        self.backends.clear();
        if std::thread::panicking() {
            eprintln!("--- serial ---\n{}", tail(&self.serial(), 60));
            eprintln!("--- bridge ---\n{}", tail(&self.bridge_log(), 40));
            eprintln!("--- console ---\n{}", tail(&self.console_output(), 40));
        }
    }
}

/// Whether history line `line` is `event`, or `event` with more words.
pub fn event_is(line: &str, event: &str) -> bool {
    line.strip_prefix(event)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
}

/// Opens a pty's slave (without making it the controlling terminal) in raw
/// mode.
fn open_raw(path: &Path) -> std::fs::File {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    mic_backend_common::terminal::make_raw(tty.as_raw_fd())
        .unwrap_or_else(|e| panic!("raw mode on {}: {e}", path.display()));
    tty
}
