//! Boot tests of micd and micctl: real QEMU, the real card OS, the real
//! bridge and backends, all started by micd in a temporary state directory.
//! At most two cards run at a time; run with `--test-threads=1` on a
//! two-core machine.
//!
//! Everything asserted is state that can be queried: `micctl status
//! --json`, exit codes, data read on the card and checksums of disk images.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use mic_test_support::{
    bin, sha256_range, sum_in, tail, wait_for, Qmp, Shell, TempDir, BOOT_TIMEOUT,
};
use vop_bridge::micd::launch::VSOCK_GROUP;
use vop_bridge::micd::protocol::CardStatus;

const MIB: u64 = 1 << 20;
const CMD: Duration = Duration::from_secs(120);

/// A micd on a temporary state directory, with the cards it started.
struct Micd {
    dir: TempDir,
    args: Vec<std::ffi::OsString>,
    /// A command micd runs under (`ip netns exec NS`), which execs it.
    wrap: Vec<String>,
    /// micd itself.
    program: PathBuf,
    /// Where micd finds QEMU, the card image and vhost-device-vsock.
    env: Vec<(&'static str, PathBuf)>,
    process: Option<Child>,
}

impl Micd {
    /// Writes `config` and starts micd on it.
    fn start(config: &str) -> Micd {
        let dir = TempDir::new("micd");
        let file = dir.join("micd.toml");
        std::fs::write(&file, config).unwrap();
        Micd::start_args(dir, vec!["--config".into(), file.into()])
    }

    /// Writes `config` and starts micd on it inside network namespace `ns`.
    fn start_in(ns: &str, config: &str) -> Micd {
        let dir = TempDir::new("micd");
        let file = dir.join("micd.toml");
        std::fs::write(&file, config).unwrap();
        let mut m = Micd {
            dir,
            args: vec!["--config".into(), file.into()],
            wrap: ["ip", "netns", "exec", ns].map(String::from).to_vec(),
            program: bin("micd"),
            env: Micd::tools(),
            process: None,
        };
        m.spawn();
        m
    }

    /// Writes `config` and starts micd on it as an ordinary user: as
    /// `nobody` when the test runs as root, from hard links to the programs
    /// and the card image (root's build cache is not `nobody`'s to read).
    fn start_unprivileged(config: &str) -> Micd {
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Micd::start(config);
        }
        let dir = TempDir::new("micd-nobody");
        let file = dir.join("micd.toml");
        std::fs::write(&file, config).unwrap();
        let tools = dir.join("tools");
        std::fs::create_dir(&tools).unwrap();
        let link = |from: &Path, to: &str| {
            let from = from.canonicalize().unwrap();
            let st = Command::new("cp")
                .arg("-al")
                .arg(&from)
                .arg(tools.join(to))
                .status()
                .unwrap();
            assert!(st.success(), "cp -al {}", from.display());
            tools.join(to)
        };
        let qemu = mic_test_support::qemu().canonicalize().unwrap();
        let prefix = link(qemu.parent().unwrap().parent().unwrap(), "qemu");
        let card_dir = link(&mic_test_support::card_dir(), "card");
        let vsock = link(&mic_test_support::vsock_backend(), "vhost-device-vsock");
        std::fs::create_dir(tools.join("bin")).unwrap();
        for b in ["micd", "vop-bridge", "mic-blk", "mic-net", "mic-console"] {
            link(&bin(b), &format!("bin/{b}"));
        }
        let nobody = c"nobody";
        // SAFETY: getpwnam(3) with a NUL-terminated name; the result is
        // read at once, before any other passwd call.
        let (uid, gid) = unsafe {
            let pw = libc::getpwnam(nobody.as_ptr());
            assert!(!pw.is_null(), "no user nobody");
            ((*pw).pw_uid, (*pw).pw_gid)
        };
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let mut m = Micd {
            args: vec!["--config".into(), file.into()],
            // setpriv execs micd (runuser would fork and stay between).
            wrap: vec![
                "setpriv".into(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ],
            program: tools.join("bin/micd"),
            env: vec![
                (
                    "MIC_QEMU",
                    prefix.join("bin").join(qemu.file_name().unwrap()),
                ),
                ("MIC_CARD_DIR", card_dir),
                ("MIC_VSOCK", vsock),
            ],
            dir,
            process: None,
        };
        m.spawn();
        m
    }

    /// Where micd finds QEMU and the card image (and vhost-device-vsock
    /// beside the workspace's build).
    fn tools() -> Vec<(&'static str, PathBuf)> {
        vec![
            ("MIC_QEMU", mic_test_support::qemu()),
            ("MIC_CARD_DIR", mic_test_support::card_dir()),
        ]
    }

    /// Starts micd with these arguments (and a state directory).
    fn start_args(dir: TempDir, args: Vec<std::ffi::OsString>) -> Micd {
        let mut m = Micd {
            dir,
            args,
            wrap: Vec::new(),
            program: bin("micd"),
            env: Micd::tools(),
            process: None,
        };
        m.spawn();
        m
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn socket(&self) -> PathBuf {
        self.state().join("micd.sock")
    }

    /// Starts (another) micd on the same config and state directory.
    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("micd.log"))
            .unwrap();
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        let child = cmd
            .args(&self.args)
            .arg("--state-dir")
            .arg(self.state())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.process = Some(child);
        let sock = self.socket();
        wait_for(Duration::from_secs(20), "micd's socket", || {
            sock.exists().then_some(())
        });
    }

    /// Kills micd hard (SIGKILL); its cards keep running.
    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Runs micctl against this micd.
    fn micctl(&self, args: &[&str]) -> Output {
        Command::new(bin("micctl"))
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs micctl and requires success; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.micctl(args);
        assert!(
            out.status.success(),
            "micctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every card, from `micctl status --json`.
    fn status(&self) -> Vec<CardStatus> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        serde_json::from_value(v["cards"].clone()).unwrap()
    }

    fn card(&self, name: &str) -> CardStatus {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["status", name, "--json"])).unwrap();
        let mut cards: Vec<CardStatus> = serde_json::from_value(v["cards"].clone()).unwrap();
        assert_eq!(cards.len(), 1);
        cards.remove(0)
    }

    /// Waits until `f` holds for the card's status.
    fn wait_card(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        f: impl Fn(&CardStatus) -> bool,
    ) -> CardStatus {
        wait_for(timeout, &format!("{name}: {what}"), || {
            let c = self.card(name);
            f(&c).then_some(c)
        })
    }

    /// Waits for a state with `micctl wait`.
    fn wait_state(&self, cards: &[&str], state: &str) {
        let mut args = vec!["wait"];
        args.extend(cards);
        args.extend([state, "--timeout", "240"]);
        self.ok(&args);
    }

    /// A shell on the card's console (its `mic-console --unix` socket).
    fn console(&self, name: &str) -> Console {
        let sock = self.state().join(name).join("console.sock");
        let stream = wait_for(Duration::from_secs(30), "the console socket", || {
            UnixStream::connect(&sock).ok()
        });
        let mut shell = Shell::new(
            Box::new(stream.try_clone().unwrap()),
            Box::new(stream.try_clone().unwrap()),
        );
        shell.wait_ready();
        Console { shell, stream }
    }
}

impl Drop for Micd {
    fn drop(&mut self) {
        self.kill();
        // The cards' processes run in sessions of their own: stop them by
        // their pid files, checking each still belongs to this directory.
        let state = self.state();
        let dirs = std::fs::read_dir(&state)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .chain([state.clone()]);
        for dir in dirs {
            for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if f.path().extension().is_none_or(|e| e != "pid") {
                    continue;
                }
                let Some(pid) = std::fs::read_to_string(f.path())
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(state.to_str().unwrap()) {
                    // SAFETY: kill(2) on a pid whose command line names our
                    // state directory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("micd.log")).unwrap_or_default();
            eprintln!("--- micd ---\n{}", tail(&log, 40));
            for n in ["mic0", "mic1"] {
                let s =
                    std::fs::read_to_string(state.join(n).join("serial.log")).unwrap_or_default();
                eprintln!("--- {n} serial ---\n{}", tail(&s, 30));
            }
        }
    }
}

/// A card's console with a shell on it; hangs up on drop (the console
/// takes one client at a time).
struct Console {
    shell: Shell,
    stream: UnixStream,
}

impl Console {
    fn run(&mut self, cmd: &str) -> String {
        self.shell.run(cmd, CMD)
    }

    fn type_text(&mut self, text: &str) {
        self.shell.type_text(text);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Two cards with passt networks; mic0 also has a disk.
const TWO_CARDS: &str = r#"
[mic0]
memory = 512
[[mic0.disk]]
size_mib = 64

[mic1]
memory = 512
disk = []
"#;

#[test]
fn two_cards_come_online_and_follow_the_lifecycle() {
    let m = Micd::start(TWO_CARDS);
    m.wait_state(&["mic0", "mic1"], "online");
    let cards = m.status();
    assert_eq!(cards.len(), 2);
    for (i, c) in cards.iter().enumerate() {
        let n = i + 1;
        assert_eq!(c.name, format!("mic{i}"));
        assert_eq!(
            (c.state.as_str(), c.shutdown_status.as_str()),
            ("online", "nop")
        );
        assert_eq!(c.node as usize, n);
        assert_eq!(
            c.network.card_ip.as_deref(),
            Some(&*format!("172.31.{n}.1/24"))
        );
        assert_eq!(
            c.network.host_ip.as_deref(),
            Some(&*format!("172.31.{n}.254"))
        );
        assert!(c.qemu_pid.is_some() && c.bridge_pid.is_some());
        assert!(c.devices.iter().all(|d| d.pid.is_some()));
    }
    let kinds: Vec<_> = cards[0]
        .devices
        .iter()
        .map(|d| (d.kind.as_str(), d.backend.as_str()))
        .collect();
    // Two cards on passt: the second network device is the card-to-card
    // link; two cards with vsock: the vsock group serves both.
    assert_eq!(
        kinds,
        [
            ("console", "console"),
            ("blk", "blk0"),
            ("net", "net"),
            ("net", "link"),
            ("vsock", VSOCK_GROUP)
        ]
    );
    // Each card's agent answers by card name through micd; micN is CID N + 3.
    for (i, c) in cards.iter().enumerate() {
        assert_eq!(c.vsock_cid, Some(i as u32 + 3));
    }
    // Right after `online` (which comes from the driver, before the card's
    // init starts the agent): micctl waits for the agent to listen.
    let out = m.micctl(&["exec", "mic1", "--", "sh", "-c", "mic-agent cid; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "4\n");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (there, back) = (m.dir.join("to-card"), m.dir.join("from-card"));
    std::fs::write(&there, &data).unwrap();
    m.ok(&["cp", there.to_str().unwrap(), "mic0:/tmp/data"]);
    m.ok(&["cp", "mic0:/tmp/data", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data, "cp changed the data");
    // The card has the address micd gave it, and reaches the host through
    // its passt: the gateway .254 is the host's loopback.
    let mut con = m.console("mic1");
    let addr = con.run("ip -4 -o addr show eth0");
    assert!(addr.contains("inet 172.31.2.1/24"), "{addr}");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut s, &mut got).unwrap();
        got
    });
    con.run(&format!(
        "echo from-mic1-$((6 * 7)) | nc 172.31.2.254 {port}"
    ));
    assert_eq!(host.join().unwrap().trim(), "from-mic1-42");
    drop(con);

    // Transitions the state does not allow: one line, exit code 3.
    let out = m.micctl(&["boot", "mic0"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        stderr(&out),
        "micctl: mic0 is online: shut it down or reset it first\n"
    );
    let out = m.micctl(&["boot", "mic9"]);
    assert_eq!(out.status.code(), Some(4));
    let out = m.micctl(&["config", "mic0", "memory=256"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));

    // Shutdown: mic0 powers off, mic1 is untouched. (The card takes a
    // shutdown request once its init runs, i.e. once its shell answers.)
    drop(m.console("mic0"));
    let mic1_qemu = m.card("mic1").qemu_pid;
    m.ok(&["shutdown", "mic0"]);
    m.wait_state(&["mic0"], "ready");
    let c = m.card("mic0");
    assert_eq!(c.shutdown_status, "poweroff");
    assert_eq!(c.qemu_pid, None);
    assert_eq!(m.card("mic1").state, "online");
    assert_eq!(m.card("mic1").qemu_pid, mic1_qemu);
    for (cmd, line) in [
        ("shutdown", "micctl: mic0 is ready: boot it first\n"),
        (
            "reset",
            "micctl: mic0 is ready: there is nothing to reset\n",
        ),
    ] {
        let out = m.micctl(&[cmd, "mic0"]);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(stderr(&out), line);
    }

    // Settings while ready reach the next boot.
    m.ok(&["config", "mic0", "cmdline=mic.test=42", "policy=stay-down"]);
    m.ok(&["boot", "mic0"]);
    m.wait_state(&["mic0"], "online");
    let c = m.card("mic0");
    assert_eq!((c.shutdown_status.as_str(), c.boots), ("nop", 2));
    assert_eq!(c.policy, "stay-down");
    let cmdline = m.console("mic0").run("cat /proc/cmdline");
    assert!(cmdline.contains("mic.test=42"), "{cmdline}");

    // Reset from online.
    m.ok(&["reset", "mic1"]);
    m.wait_state(&["mic1"], "ready");
    let c = m.card("mic1");
    assert_eq!((c.shutdown_status.as_str(), c.qemu_pid), ("nop", None));
    assert!(c.devices.iter().all(|d| d.pid.is_none()));

    // Reset from booting: the boot answer comes while the card boots.
    m.ok(&["boot", "mic1"]);
    assert_eq!(m.card("mic1").state, "booting");
    m.ok(&["reset", "mic1"]);
    m.wait_state(&["mic1"], "ready");
    assert_eq!(m.card("mic1").boots, 2);

    // Both at once, by `all`.
    m.ok(&["boot", "mic1"]);
    m.wait_state(&["mic1"], "online");
    drop(m.console("mic1"));
    m.ok(&["shutdown", "all"]);
    m.wait_state(&["all"], "ready");
    assert!(m.status().iter().all(|c| c.shutdown_status == "poweroff"));
}

/// One card with a console only.
const ONE_CARD: &str = "[mic0]\nmemory = 512\nnet = \"none\"\ndisk = []\nshutdown_timeout = 5\n";

#[test]
fn reboot_and_crash_follow_the_policy() {
    let m = Micd::start(ONE_CARD);
    m.wait_state(&["mic0"], "online");
    let first = m.console("mic0").run("cat /proc/sys/kernel/random/boot_id");

    // `micctl console`: a command through it, then Ctrl-] detaches and the
    // card keeps running.
    let mut attached = Command::new(bin("micctl"))
        .arg("-s")
        .arg(m.socket())
        .args(["console", "mic0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut shell = Shell::new(
        Box::new(attached.stdout.take().unwrap()),
        Box::new(attached.stdin.take().unwrap()),
    );
    assert_eq!(shell.run("echo through-micctl", CMD), "through-micctl");
    shell.type_text("\x1d");
    let exit = wait_for(Duration::from_secs(10), "micctl console to detach", || {
        attached.try_wait().unwrap()
    });
    assert!(exit.success());
    assert_eq!(m.card("mic0").state, "online");

    // `poweroff` in a card online for longer than the shutdown timeout:
    // the timeout counts from shutting_down, so the card powers off.
    let c = m.card("mic0");
    if c.uptime_s < 7 {
        std::thread::sleep(Duration::from_secs(7 - c.uptime_s));
    }
    let mut con = m.console("mic0");
    con.type_text("poweroff\n");
    m.wait_state(&["mic0"], "ready");
    let c = m.card("mic0");
    assert_eq!((c.shutdown_status.as_str(), c.boots), ("poweroff", 1));
    drop(con);
    m.ok(&["boot", "mic0"]);
    m.wait_state(&["mic0"], "online");

    // `reboot` in the card: restart, and micd boots it again by itself.
    let mut con = m.console("mic0");
    con.type_text("reboot\n");
    let c = m.wait_card("mic0", "a boot after the restart", BOOT_TIMEOUT, |c| {
        c.boots == 3 && c.state == "online"
    });
    assert_eq!(c.last_shutdown_status, "restart");
    assert_eq!(c.shutdown_status, "nop");
    let second = m.console("mic0").run("cat /proc/sys/kernel/random/boot_id");
    assert_ne!(first, second);

    // A crash under the reboot policy: reset, then boot again.
    let mut con = m.console("mic0");
    con.type_text("echo c > /proc/sysrq-trigger\n");
    let c = m.wait_card("mic0", "a boot after the crash", BOOT_TIMEOUT, |c| {
        c.boots == 4 && c.state == "online"
    });
    assert_eq!(c.last_shutdown_status, "crashed");
    let log = m.ok(&["log", "mic0"]);
    assert!(
        log.contains("Kernel panic - not syncing: sysrq triggered crash"),
        "{}",
        tail(&log, 20)
    );

    // Under stay-down the card stays ready after a crash.
    m.ok(&["config", "mic0", "policy=stay-down"]);
    let mut con = m.console("mic0");
    con.type_text("echo c > /proc/sysrq-trigger\n");
    m.wait_state(&["mic0"], "ready");
    std::thread::sleep(Duration::from_secs(3));
    let c = m.card("mic0");
    assert_eq!(
        (c.state.as_str(), c.shutdown_status.as_str(), c.boots),
        ("ready", "nop", 4)
    );
    assert_eq!(c.last_shutdown_status, "crashed");
    drop(con);

    // `halt` in the card: micd stops the halted machine.
    m.ok(&["boot", "mic0"]);
    m.wait_state(&["mic0"], "online");
    let mut con = m.console("mic0");
    con.type_text("halt\n");
    m.wait_state(&["mic0"], "ready");
    let c = m.card("mic0");
    assert_eq!((c.shutdown_status.as_str(), c.qemu_pid), ("halted", None));
    drop(con);
}

/// Writes 1 MiB of fresh random data at `mib` MiB of the card's disk;
/// checks the image holds exactly it.
fn write_disk(con: &mut Console, img: &Path, mib: u64) -> String {
    let out = con.run(&format!(
        "dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null && sha256sum /tmp/p && \
         dd if=/tmp/p of=/dev/vda bs=1M seek={mib} oflag=direct 2>/dev/null"
    ));
    let sum = sum_in(&out);
    assert_eq!(sha256_range(img, mib * MIB, MIB), sum);
    sum
}

/// Reads 1 MiB at `mib` MiB of the card's disk, past the page cache.
fn read_disk(con: &mut Console, mib: u64) -> String {
    sum_in(&con.run(&format!(
        "dd if=/dev/vda bs=1M skip={mib} count=1 iflag=direct 2>/dev/null | sha256sum"
    )))
}

#[test]
fn killed_backend_and_bridge_are_restarted_and_the_disk_keeps_its_data() {
    let m = Micd::start("[mic0]\nmemory = 512\nnet = \"none\"\n[[mic0.disk]]\nsize_mib = 32\n");
    m.wait_state(&["mic0"], "online");
    let img = m.state().join("mic0/disk0.img");
    let mut con = m.console("mic0");
    let boot_id = con.run("cat /proc/sys/kernel/random/boot_id");
    let sum = write_disk(&mut con, &img, 1);

    let blk = m.card("mic0").devices[1].clone();
    assert_eq!(blk.backend, "blk0");
    // SAFETY: kill(2) on the pid micd reports for the card's mic-blk.
    unsafe { libc::kill(blk.pid.unwrap() as i32, libc::SIGKILL) };
    let c = m.wait_card("mic0", "mic-blk restarted", Duration::from_secs(30), |c| {
        c.devices[1].restarts == 1 && c.devices[1].pid.is_some()
    });
    assert_ne!(c.devices[1].pid, blk.pid);
    assert_eq!(read_disk(&mut con, 1), sum);
    write_disk(&mut con, &img, 2);

    let bridge = c.bridge_pid.unwrap();
    // SAFETY: kill(2) on the pid micd reports for the card's bridge.
    unsafe { libc::kill(bridge as i32, libc::SIGKILL) };
    let c = m.wait_card(
        "mic0",
        "the bridge restarted",
        Duration::from_secs(30),
        |c| c.bridge_restarts == 1 && c.bridge_pid.is_some(),
    );
    assert_ne!(c.bridge_pid, Some(bridge));
    assert_eq!(c.state, "online");
    assert_eq!(read_disk(&mut con, 2), sha256_range(&img, 2 * MIB, MIB));
    write_disk(&mut con, &img, 3);
    // Same boot throughout.
    assert_eq!(con.run("cat /proc/sys/kernel/random/boot_id"), boot_id);
    assert_eq!(m.card("mic0").boots, 1);
}

/// `micctl stats` reads the stats sockets micd gives the card's mic-blk
/// (`backends/README.md`, "Stats"); `micctl limit` changes its limits.
#[test]
fn micctl_shows_backend_stats_and_changes_limits() {
    let m = Micd::start("[mic0]\nmemory = 512\nnet = \"none\"\n[[mic0.disk]]\nsize_mib = 32\n");
    m.wait_state(&["mic0"], "online");
    let img = m.state().join("mic0/disk0.img");
    let mut con = m.console("mic0");
    write_disk(&mut con, &img, 1);
    let v: serde_json::Value = serde_json::from_str(&m.ok(&["stats", "mic0", "--json"])).unwrap();
    assert_eq!(v["card"], "mic0");
    let blk = &v["backends"]["blk0"];
    assert_eq!(blk["device"], "mic-blk");
    let written: u64 = blk["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["bytes_written"].as_u64().unwrap())
        .sum();
    assert!(written >= MIB, "{v}");
    assert_eq!(blk["limits"]["iops"], 0);
    // The text form: a line for the backend, one per queue.
    let text = m.ok(&["stats", "mic0"]);
    assert!(text.lines().count() > 1, "{text}");

    m.ok(&["limit", "mic0", "blk0", "iops=2000", "bps=100Mi"]);
    let v: serde_json::Value = serde_json::from_str(&m.ok(&["stats", "mic0", "--json"])).unwrap();
    assert_eq!(v["backends"]["blk0"]["limits"]["iops"], 2000);
    assert_eq!(v["backends"]["blk0"]["limits"]["bps"], 100 << 20);
    // The card's disk still works under the limits.
    write_disk(&mut con, &img, 2);
    assert_eq!(
        m.micctl(&["limit", "mic0", "blk0", "bogus=1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        m.micctl(&["limit", "mic0", "net", "rx_bps=1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(m.micctl(&["stats", "mic9"]).status.code(), Some(4));
}

#[test]
fn restarted_micd_adopts_running_cards() {
    // Two cards with every default: 1 GiB, a (sparse) disk, passt.
    let mut m = Micd::start_args(TempDir::new("micd"), vec!["--cards".into(), "2".into()]);
    m.wait_state(&["mic0", "mic1"], "online");
    let boot_ids: Vec<String> = ["mic0", "mic1"]
        .iter()
        .map(|c| m.console(c).run("cat /proc/sys/kernel/random/boot_id"))
        .collect();
    let before = m.status();

    m.kill();
    assert!(!m.micctl(&["status"]).status.success());
    m.spawn();
    let after = m.status();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.state, "online", "{}", a.name);
        assert_eq!(
            (a.qemu_pid, a.bridge_pid, a.boots),
            (b.qemu_pid, b.bridge_pid, b.boots)
        );
        let pids = |c: &CardStatus| c.devices.iter().map(|d| d.pid).collect::<Vec<_>>();
        assert_eq!(pids(a), pids(b));
    }
    for (c, id) in ["mic0", "mic1"].iter().zip(&boot_ids) {
        assert_eq!(&m.console(c).run("cat /proc/sys/kernel/random/boot_id"), id);
    }
    // The new micd drives them.
    m.ok(&["shutdown", "mic0"]);
    m.wait_state(&["mic0"], "ready");
    assert_eq!(m.card("mic0").shutdown_status, "poweroff");
    assert_eq!(m.card("mic1").state, "online");
    let mut con = m.console("mic1");
    con.type_text("poweroff\n");
    m.wait_state(&["mic1"], "ready");
    assert_eq!(m.card("mic1").shutdown_status, "poweroff");
    drop(con);
}

/// A card beating every 500 ms, watched with a 4 s timeout.
const BEATING_CARD: &str = "[mic0]\nmemory = 512\nnet = \"none\"\ndisk = []\nvsock = false\n\
     cmdline = \"mic_x100_vop.heartbeat_ms=500\"\nheartbeat_timeout = 4\n";

#[test]
fn heartbeat_catches_a_frozen_card_and_spares_a_beating_one() {
    let timeout = Duration::from_secs(4);
    let m = Micd::start(BEATING_CARD);
    m.wait_state(&["mic0"], "online");
    let qmp = || Qmp::connect(&m.state().join("mic0/qmp.sock"));
    let c = m.wait_card("mic0", "its first beats", Duration::from_secs(30), |c| {
        c.heartbeat.count.is_some_and(|n| n >= 2)
    });
    assert_eq!(c.heartbeat.period_ms, Some(500));
    assert_eq!((c.heartbeat.enabled, c.heartbeat.timeout_s), (true, 4));
    let first_count = c.heartbeat.count.unwrap();

    // A card that keeps beating is never declared crashed: four timeouts
    // long, it stays online in the same boot, its last beat always recent.
    let until = std::time::Instant::now() + 4 * timeout;
    while std::time::Instant::now() < until {
        let c = m.card("mic0");
        assert_eq!(
            (c.state.as_str(), c.last_shutdown_status.as_str(), c.boots),
            ("online", "nop", 1)
        );
        let age = c.heartbeat.age_ms.expect("a beat");
        assert!(age < 4000, "last beat {age} ms ago");
        std::thread::sleep(Duration::from_millis(500));
    }
    let beats = m.card("mic0").heartbeat.count.unwrap() - first_count;
    assert!(beats >= 16, "{beats} beats in 16 s");

    // Unloading the card driver for longer than the timeout is no hang: the
    // driver sets the count back to "no beat yet", and beats again when
    // loaded.
    let mut con = m.console("mic0");
    con.type_text(
        "(sleep 1; rmmod mic_x100_vop; sleep 6; modprobe mic_x100_vop) >/dev/null 2>&1 &\n",
    );
    drop(con);
    m.wait_card(
        "mic0",
        "no beat while unloaded",
        Duration::from_secs(30),
        |c| c.heartbeat.count.is_none(),
    );
    let c = m.wait_card(
        "mic0",
        "beats after the reload",
        Duration::from_secs(60),
        |c| c.heartbeat.age_ms.is_some_and(|a| a < 2000),
    );
    assert_eq!(
        (c.state.as_str(), c.last_shutdown_status.as_str(), c.boots),
        ("online", "nop", 1)
    );

    // With the heartbeat off, a frozen card is reported silent but left
    // alone; it beats again when it runs again.
    m.ok(&["config", "mic0", "heartbeat=off"]);
    let mut q = qmp();
    q.execute("stop");
    assert!(q.execute("query-status").contains("\"running\": false"));
    let c = m.wait_card("mic0", "a silent card", Duration::from_secs(30), |c| {
        c.heartbeat.age_ms.is_some_and(|a| a > 6000)
    });
    assert_eq!((c.state.as_str(), c.boots), ("online", 1));
    assert!(!c.heartbeat.enabled);
    q.execute("cont");
    drop(q);
    m.wait_card("mic0", "beats again", Duration::from_secs(30), |c| {
        c.heartbeat.age_ms.is_some_and(|a| a < 2000)
    });

    // With it on, a frozen card is crashed after the timeout, reset, and
    // booted again under the reboot policy.
    m.ok(&["config", "mic0", "heartbeat=on"]);
    let qemu_pid = m.card("mic0").qemu_pid;
    qmp().execute("stop");
    let frozen = std::time::Instant::now();
    let c = m.wait_card("mic0", "crashed", Duration::from_secs(60), |c| {
        c.last_shutdown_status == "crashed"
    });
    // The timeout runs from the last beat, up to a period (and a sample)
    // before the machine stopped.
    let after = frozen.elapsed();
    assert!(
        after >= timeout - Duration::from_secs(1),
        "declared crashed after {after:?}"
    );
    assert!(c.state != "online" || c.boots == 2, "{c:?}");
    let c = m.wait_card("mic0", "online again", BOOT_TIMEOUT, |c| {
        c.boots == 2 && c.state == "online"
    });
    assert_eq!(c.last_shutdown_status, "crashed");
    assert_ne!(c.qemu_pid, qemu_pid);
    let c = m.wait_card("mic0", "beating again", Duration::from_secs(30), |c| {
        c.heartbeat.count.is_some()
    });
    assert!(c.heartbeat.age_ms.unwrap() < 4000);
}

#[test]
fn micctl_still_drives_a_single_bridge() {
    // A bridge with no card yet: `-s` names its control socket.
    let dir = TempDir::new("micctl-bridge");
    let ctl = dir.join("ctl.sock");
    let mut bridge = Command::new(bin("vop-bridge"))
        .arg("--device-socket")
        .arg(dir.join("dev.sock"))
        .arg("--control-socket")
        .arg(&ctl)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(20), "the bridge's socket", || {
        ctl.exists().then_some(())
    });
    let micctl = |args: &[&str]| {
        Command::new(bin("micctl"))
            .arg("-s")
            .arg(&ctl)
            .args(args)
            .output()
            .unwrap()
    };
    let out = micctl(&["status"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "state=ready shutdown_status=nop\n"
    );
    assert!(micctl(&["wait", "ready", "--timeout", "5"])
        .status
        .success());
    assert_eq!(
        micctl(&["wait", "online", "--timeout", "1"]).status.code(),
        Some(5)
    );
    assert_eq!(micctl(&["devices"]).status.code(), Some(0));
    // Not attached to a card: the bridge refuses, micctl fails.
    assert_eq!(micctl(&["shutdown"]).status.code(), Some(1));
    // micd's forms make no sense for a bridge.
    assert_eq!(micctl(&["boot", "mic0"]).status.code(), Some(2));
    let _ = bridge.kill();
    let _ = bridge.wait();
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("micd-{:08x}", mic_test_support::rand_u64() as u32);
        let ns = Netns(name.clone());
        for args in [
            vec!["netns", "add", &name],
            vec!["netns", "exec", &name, "ip", "link", "set", "lo", "up"],
            // Card-to-card traffic is routed by the host (docs/micd.md).
            vec![
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?} (this test needs root): {}",
                stderr(&out)
            );
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn cards_reach_each_other_through_the_host_on_taps() {
    let ns = Netns::new();
    let m = Micd::start_in(
        &ns.0,
        "[mic0]\nmemory = 512\nnet = \"tap\"\ndisk = []\n\
         [mic1]\nmemory = 512\nnet = \"tap\"\ndisk = []\n",
    );
    m.wait_state(&["mic0", "mic1"], "online");
    let c = m.card("mic1");
    assert_eq!(c.network.mode, "tap");
    assert_eq!(c.network.card_ip.as_deref(), Some("172.31.2.1/24"));
    // mic0 -> host (mic0 tap) -> host (mic1 tap) -> mic1, and back.
    ping_and_send_16_mib(&m);
}

#[test]
fn cards_on_passt_reach_each_other_over_the_link() {
    // No taps, no routing on the host: what works without root, as an
    // ordinary user.
    let m = Micd::start_unprivileged(
        "[mic0]\nmemory = 512\ndisk = []\n[mic1]\nmemory = 512\ndisk = []\n",
    );
    m.wait_state(&["mic0", "mic1"], "online");
    let c = m.card("mic0");
    assert_eq!(c.network.mode, "passt");
    let links: Vec<_> = c.devices.iter().filter(|d| d.backend == "link").collect();
    assert_eq!(links.len(), 1, "{:?}", c.devices);
    // Nothing of the card runs as root.
    let pids = [c.qemu_pid, c.bridge_pid, links[0].pid];
    for pid in pids.into_iter().flatten() {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = st.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            !uid.split_whitespace().any(|u| u == "0"),
            "pid {pid}: {uid}"
        );
    }
    ping_and_send_16_mib(&m);
    // Each card still reaches the host through its own passt, not the link.
    let mut con = m.console("mic1");
    let out = con.run(
        "for i in /sys/class/net/eth*; do read -r a <$i/address; echo ${i##*/} $a; done; \
         ip route get 172.31.2.254",
    );
    let link_if = out
        .lines()
        .find_map(|l| l.trim().strip_suffix(" 02:6d:69:63:00:01"))
        .unwrap_or_else(|| panic!("no link interface: {out}"))
        .to_string();
    let host_route = out
        .lines()
        .find(|l| l.contains("172.31.2.254 dev "))
        .unwrap();
    assert!(!host_route.contains(&format!("dev {link_if} ")), "{out}");

    // The link's hub dies; micd starts it again and the cards' mic-net
    // reconnect: mic0 reaches mic1 again.
    let pidfile = m.state().join("link.pid");
    let hub: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the pid of the hub micd started.
    unsafe { libc::kill(hub, libc::SIGKILL) };
    wait_for(Duration::from_secs(30), "a new hub", || {
        let now = std::fs::read_to_string(&pidfile).ok()?;
        (now.trim().parse::<i32>().ok()? != hub).then_some(())
    });
    m.console("mic0").run(
        "i=0; until ping -c 1 -W 1 172.31.2.1 >/dev/null; do \
             i=$((i+1)); [ $i -lt 20 ] || break; done; ping -c 1 -W 2 172.31.2.1",
    );
}

#[test]
fn cards_reach_each_other_by_vsock_cid() {
    let m = Micd::start(
        "[mic0]\nmemory = 512\ndisk = []\nnet = \"none\"\n\
         [mic1]\nmemory = 512\ndisk = []\nnet = \"none\"\n",
    );
    m.wait_state(&["mic0", "mic1"], "online");
    // Both cards' vsock devices are served by the group's one process.
    for name in ["mic0", "mic1"] {
        let c = m.card(name);
        let vsock: Vec<_> = c.devices.iter().filter(|d| d.kind == "vsock").collect();
        assert_eq!(vsock.len(), 1, "{name}: {:?}", c.devices);
        assert_eq!(vsock[0].backend, VSOCK_GROUP, "{name}");
    }
    exchange_8_mib_each_way_over_vsock(&m);

    // The group's process dies; micd starts it again, the bridges
    // reconnect, and the cards reach each other (and the agents) again.
    let pidfile = m.state().join("vsock-group.pid");
    let group: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the pid of the process micd started.
    unsafe { libc::kill(group, libc::SIGKILL) };
    wait_for(Duration::from_secs(30), "a new vsock group", || {
        let now = std::fs::read_to_string(&pidfile).ok()?;
        (now.trim().parse::<i32>().ok()? != group).then_some(())
    });
    wait_for(Duration::from_secs(60), "the agents again", || {
        ["mic0", "mic1"]
            .iter()
            .all(|c| m.micctl(&["exec", c, "--", "true"]).status.success())
            .then_some(())
    });
    exchange_8_mib_each_way_over_vsock(&m);
}

/// mic1 listens on vsock port 7000 and mic0 connects to it at CID 4; each
/// sends the other 8 MiB at once: the same checksums on both sides.
fn exchange_8_mib_each_way_over_vsock(m: &Micd) {
    let sent1 = m.ok(&[
        "exec",
        "mic1",
        "--",
        "sh",
        "-c",
        "rm -f /tmp/got /tmp/rc; head -c 8388608 /dev/urandom >/tmp/out && sha256sum /tmp/out; \
         (timeout 300 mic-agent listen 7000 </tmp/out >/tmp/got; echo $? >/tmp/rc) \
             </dev/null >/dev/null 2>&1 &",
    ]);
    // The listener binds at once, but not before exec returns: mic0 tries
    // again while the port is refused.
    let mic0 = m.ok(&[
        "exec",
        "mic0",
        "--",
        "sh",
        "-c",
        "head -c 8388608 /dev/urandom >/tmp/out && sha256sum /tmp/out >&2; i=0; \
         until timeout 300 mic-agent connect 4 7000 </tmp/out >/tmp/got 2>/dev/null; do \
             i=$((i+1)); [ $i -lt 50 ] || exit 9; sleep 0.2; done; \
         wc -c </tmp/got; sha256sum </tmp/got",
    ]);
    let got1 = m.ok(&[
        "exec",
        "mic1",
        "--",
        "sh",
        "-c",
        "while [ ! -s /tmp/rc ]; do sleep 0.2; done; cat /tmp/rc; wc -c </tmp/got; \
         sha256sum </tmp/got",
    ]);
    let lines: Vec<&str> = got1.lines().map(str::trim).collect();
    assert_eq!(lines[..2], ["0", &*(8 * MIB).to_string()], "{got1}");
    assert_eq!(
        mic0.lines().next().map(str::trim),
        Some(&*(8 * MIB).to_string())
    );
    // mic0 received what mic1 sent.
    assert_eq!(sum_in(&mic0), sum_in(&sent1));
    // mic1 received what mic0 sent: its checksum went to stderr, which
    // `ok` does not return, so compare through a second read.
    let sent0 = m.ok(&["exec", "mic0", "--", "sha256sum", "/tmp/out"]);
    assert_eq!(sum_in(&got1), sum_in(&sent0));
}

/// mic0 pings mic1 and back, then sends it 16 MiB: the same checksum on
/// both sides.
fn ping_and_send_16_mib(m: &Micd) {
    let mut mic0 = m.console("mic0");
    let mut mic1 = m.console("mic1");
    mic0.run("ping -c 3 -W 5 172.31.2.1");
    mic1.run("ping -c 1 -W 5 172.31.1.1");

    // 16 MiB from mic0 to mic1, same checksum on both sides.
    // busybox nc leaves as soon as its peer closes: the receiver keeps its
    // side open (sleep) so that the sender writes everything first.
    mic1.run(
        "rm -f /tmp/in /tmp/nc.rc; \
         (sleep 600 | (nc -l -p 5000 >/tmp/in 2>/tmp/nc.err; echo $? >/tmp/nc.rc)) & echo listening",
    );
    let sent = mic0.run(
        "dd if=/dev/urandom of=/tmp/out bs=1M count=16 2>/dev/null && sha256sum /tmp/out && \
         nc 172.31.2.1 5000 </tmp/out",
    );
    let received = mic1.shell.run(
        "while [ ! -s /tmp/nc.rc ]; do sleep 0.5; done; cat /tmp/nc.rc; wc -c </tmp/in; \
         sha256sum /tmp/in",
        Duration::from_secs(600),
    );
    let lines: Vec<&str> = received.lines().map(str::trim).collect();
    assert_eq!(lines[..2], ["0", &*(16 * MIB).to_string()], "{received}");
    assert_eq!(sum_in(&received), sum_in(&sent));
}

/// A process the test started itself, killed at the end.
struct Own(Child);

impl Drop for Own {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_backend_the_user_runs_serves_a_card_device() {
    // The user's own vhost-user-blk daemon (here a mic-blk started by hand)
    // on a socket they name; micd starts no disk backend of its own.
    let own = TempDir::new("micd-own-backend");
    let img = mic_test_support::image(own.path(), "own.img", 16 * MIB);
    let sock = own.join("own-blk.sock");
    let _blk = Own(Command::new(bin("mic-blk"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    wait_for(Duration::from_secs(10), "the user's backend", || {
        sock.exists().then_some(())
    });
    let m = Micd::start(&format!(
        "[mic0]\nmemory = 512\nnet = \"none\"\ndisk = []\n\
         [[mic0.device]]\ntype = \"blk\"\nsocket = \"{}\"\n\
         [mic1]\nmemory = 512\nnet = \"none\"\ndisk = []\nautoboot = false\n\
         [[mic1.device]]\ntype = \"blk\"\nsocket = \"{}\"\n",
        sock.display(),
        own.join("nobody-listens.sock").display()
    ));
    m.wait_state(&["mic0"], "online");
    let c = m.card("mic0");
    let kinds: Vec<_> = c
        .devices
        .iter()
        .map(|d| (d.kind.as_str(), d.backend.as_str(), d.pid.is_some()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("console", "console", true),
            ("vsock", VSOCK_GROUP, true),
            ("blk", "external", false)
        ]
    );
    let mut con = m.console("mic0");
    assert_eq!(
        con.run("cat /sys/block/vda/size").trim(),
        (16 * MIB / 512).to_string()
    );
    write_disk(&mut con, &img, 3);
    // The socket is the user's: micd never removes it, not even when the
    // card stops.
    con.type_text("poweroff\n");
    m.wait_state(&["mic0"], "ready");
    assert!(sock.exists(), "micd removed the user's socket");

    // A card whose named socket has no backend does not start, says why,
    // and stays ready.
    let out = m.micctl(&["boot", "mic1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c = m.wait_card("mic1", "the failed start", Duration::from_secs(30), |c| {
        c.last_error.is_some() && c.state != "booting" && c.state != "resetting"
    });
    assert_eq!(c.state, "ready");
    assert!(c
        .last_error
        .as_deref()
        .unwrap()
        .contains("nobody-listens.sock"));
    assert_eq!(c.qemu_pid, None);
}

#[test]
fn a_card_that_fails_before_online_is_booted_again_ever_more_slowly() {
    // A ramdisk that is no archive: the kernel panics at every boot, and
    // panic=-1 ends the machine, long before the card could be online.
    let own = TempDir::new("micd-bad-ramdisk");
    let bad = own.join("not-a-cpio.img");
    std::fs::write(&bad, vec![0u8; 4096]).unwrap();
    let m = Micd::start(&format!(
        "[mic0]\nmemory = 256\nnet = \"none\"\ndisk = []\nvsock = false\n\
         ramdisk = \"{}\"\n",
        bad.display()
    ));
    let t0 = std::time::Instant::now();
    // While it waits, micd says how long, and the card stays booting.
    let c = m.wait_card("mic0", "a wait before the next boot", BOOT_TIMEOUT, |c| {
        c.next_boot_in_s.is_some()
    });
    assert_eq!(c.state, "booting");
    assert!(c.failed_boots >= 1);
    let c = m.wait_card("mic0", "three failed boots", BOOT_TIMEOUT, |c| {
        c.failed_boots >= 3
    });
    // 1 s and then 2 s of waiting at the least between the boots.
    assert!(t0.elapsed() >= Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(c.last_shutdown_status, "crashed");
    // A reset ends it: ready, and no boot follows.
    m.ok(&["reset", "mic0"]);
    m.wait_state(&["mic0"], "ready");
    let boots = m.card("mic0").boots;
    std::thread::sleep(Duration::from_secs(5));
    let c = m.card("mic0");
    assert_eq!((c.state.as_str(), c.boots), ("ready", boots));
    assert_eq!(c.next_boot_in_s, None);
}
