//! Boot tests of virtio-vsock on VOP and the card agent (`docs/vsock.md`):
//! real QEMU, card OS, vhost-device-vsock and bridge. `micctl exec` and
//! `micctl cp` reach the card's `mic-agent` through the backend's hybrid
//! UNIX socket; a card program reaches a host service at `<uds>_<port>`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mic_agent::protocol::{read_message, write_message, ErrorCode, Message, VERSION};
use mic_test_support::{sha256_file, sum_in, wait_for, Card, CardOptions, BOOT_TIMEOUT};
use vop_bridge::agent_client::{self, AgentClient, AgentError, AGENT_PORT};

const MIB: usize = 1 << 20;
/// One command or transfer under TCG on a loaded machine.
const CMD: Duration = Duration::from_secs(300);

fn vsock_card() -> Card {
    let card = Card::boot(CardOptions {
        vsock: true,
        ..Default::default()
    });
    wait_agent(&card);
    card
}

/// Waits until the agent answers its hello (the device may bind after the
/// card reports online).
fn wait_agent(card: &Card) {
    wait_for(BOOT_TIMEOUT, "the card agent", || {
        AgentClient::connect(&card.vsock_uds()).ok().map(|_| ())
    });
}

/// `micctl -s <uds> ARGS`, with `stdin`, killed after [`CMD`].
fn micctl(card: &Card, args: &[&str], stdin: Vec<u8>) -> Output {
    let mut child = Command::new(mic_test_support::bin("micctl"))
        .arg("-s")
        .arg(card.vsock_uds())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CMD) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("micctl {args:?} timed out");
        }
    }
}

/// Runs `sh -c script` on the card through micctl; returns stdout, stderr
/// and micctl's exit status.
fn sh(card: &Card, script: &str) -> (String, String, i32) {
    let out = micctl(card, &["exec", "--", "sh", "-c", script], Vec::new());
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

#[test]
fn exec_returns_status_streams_stdin_and_binary_output() {
    let card = vsock_card();
    assert_eq!(
        micctl(&card, &["exec", "--", "true"], vec![]).status.code(),
        Some(0)
    );
    // The device's config space reached the card: card 0 has CID 3.
    let cid = micctl(&card, &["exec", "--", "mic-agent", "cid"], vec![]);
    assert_eq!(
        cid.stdout,
        format!("{}\n", mic_test_support::VSOCK_CID).into_bytes()
    );

    let (out, err, code) = sh(&card, "echo out; echo err >&2; exit 3");
    assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 3));

    let (_, _, code) = sh(&card, "kill -9 $$");
    assert_eq!(code, 137);

    let up = micctl(
        &card,
        &["exec", "--", "tr", "a-z", "A-Z"],
        b"hello card".to_vec(),
    );
    assert_eq!(up.stdout, b"HELLO CARD");
    assert_eq!(up.status.code(), Some(0));

    let (out, _, code) = sh(&card, "seq 1 10000");
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 10_000);
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, l)| *l == (i + 1).to_string()));

    // Binary data both ways: every byte value, through stdin and stdout.
    let data = random(2 * MIB);
    let echoed = micctl(&card, &["exec", "--", "cat"], data.clone());
    assert_eq!(echoed.status.code(), Some(0));
    assert!(echoed.stdout == data, "binary data changed on its way");

    // A command that does not exist: an error, not a status of its own.
    let missing = micctl(&card, &["exec", "--", "/nonexistent"], vec![]);
    assert_eq!(missing.status.code(), Some(255));
}

/// `micctl exec -t`: the command runs on a pseudo-terminal in the card and
/// its status still comes back.
#[test]
fn exec_t_gives_the_command_a_terminal() {
    let card = vsock_card();
    let tty = micctl(&card, &["exec", "-t", "--", "tty"], vec![]);
    assert_eq!(tty.status.code(), Some(0));
    let name = String::from_utf8_lossy(&tty.stdout).into_owned();
    let n = name
        .trim_end()
        .strip_prefix("/dev/pts/")
        .unwrap_or_else(|| panic!("not a pty: {name:?}"));
    assert!(n.parse::<u32>().is_ok(), "{name:?}");
    let on_tty = |args: &[&str]| micctl(&card, args, vec![]).status.code();
    assert_eq!(
        on_tty(&["exec", "-t", "--", "sh", "-c", "test -t 0"]),
        Some(0)
    );
    // Without -t, stdin is a pipe.
    assert_eq!(on_tty(&["exec", "--", "sh", "-c", "test -t 0"]), Some(1));
    assert_eq!(on_tty(&["exec", "-t", "--", "sh", "-c", "exit 3"]), Some(3));
    assert_eq!(
        on_tty(&["exec", "-t", "--", "sh", "-c", "kill -9 $$"]),
        Some(137)
    );
    // Input goes through the card's terminal, and its end is Ctrl-D.
    let typed = micctl(
        &card,
        &["exec", "-t", "--", "sh", "-c", "read l; echo got:$l"],
        b"abc\n".to_vec(),
    );
    assert_eq!(typed.status.code(), Some(0));
    let out = String::from_utf8_lossy(&typed.stdout).into_owned();
    assert!(out.contains("got:abc\r\n"), "{out:?}");

    // From a terminal: its size reaches the card, it is raw while the
    // command runs and as it was afterwards.
    let (master, slave) = mic_backend_common::terminal::open_pty(31, 97).unwrap();
    let before = termios_of(&slave);
    let out = Command::new(mic_test_support::bin("micctl"))
        .arg("-s")
        .arg(card.vsock_uds())
        .args(["exec", "-t", "--", "stty", "size"])
        .stdin(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "31 97\r\n");
    let after = termios_of(&slave);
    assert_eq!(
        (after.c_iflag, after.c_oflag, after.c_lflag),
        (before.c_iflag, before.c_oflag, before.c_lflag)
    );
    drop(master);
}

fn termios_of(tty: &std::fs::File) -> libc::termios {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) }, 0);
    t
}

#[test]
fn cp_round_trips_64_mib_with_its_mode() {
    let card = vsock_card();
    let src = card.path("big");
    std::fs::write(&src, random(64 * MIB)).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    let sum = sha256_file(&src, None);

    let to = micctl(
        &card,
        &["cp", src.to_str().unwrap(), "mic0:/tmp/big"],
        vec![],
    );
    assert_eq!(
        to.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&to.stderr)
    );
    let (out, _, code) = sh(&card, "sha256sum /tmp/big; stat -c %a /tmp/big");
    assert_eq!(code, 0);
    assert_eq!(sum_in(&out), sum);
    assert_eq!(out.lines().last(), Some("750"));

    let back = card.path("back");
    let from = micctl(
        &card,
        &["cp", "mic0:/tmp/big", back.to_str().unwrap()],
        vec![],
    );
    assert_eq!(
        from.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&from.stderr)
    );
    assert_eq!(sha256_file(&back, None), sum);
    let mode = std::fs::metadata(&back).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750);

    // A file that is not there: an error and no host file.
    let missing = card.path("missing");
    let out = micctl(
        &card,
        &["cp", "mic0:/nonexistent", missing.to_str().unwrap()],
        vec![],
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(!missing.exists());
}

/// A host service at `<uds>_<port>`: reads `len` bytes, answers with `len`
/// random bytes, closes. Returns the sha256 of what it read and of what it
/// sent.
fn host_service(uds: &Path, port: u32, len: usize) -> mpsc::Receiver<(String, String)> {
    let path = format!("{}_{port}", uds.display());
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = vec![0u8; len];
        s.read_exact(&mut got).unwrap();
        let reply = random(len);
        s.write_all(&reply).unwrap();
        drop(s);
        let _ = tx.send((sha256_bytes(&got), sha256_bytes(&reply)));
    });
    rx
}

fn sha256_bytes(b: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = c.stdin.take().unwrap();
    let data = b.to_vec();
    let w = std::thread::spawn(move || i.write_all(&data).unwrap());
    let out = c.wait_with_output().unwrap();
    w.join().unwrap();
    sum_in(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn card_exchanges_16_mib_both_ways_with_a_host_service() {
    let card = vsock_card();
    let port = 7001;
    let service = host_service(&card.vsock_uds(), port, 16 * MIB);
    let (out, err, code) = sh(
        &card,
        &format!(
            "head -c {} /dev/urandom >/tmp/up && sha256sum /tmp/up && \
             mic-agent connect 2 {port} </tmp/up >/tmp/down && sha256sum /tmp/down && \
             wc -c </tmp/down",
            16 * MIB
        ),
    );
    assert_eq!(code, 0, "{out}{err}");
    let (host_got, host_sent) = service.recv_timeout(CMD).unwrap();
    let sums: Vec<String> = out.lines().filter(|l| l.len() > 64).map(sum_in).collect();
    assert_eq!(sums, [host_got, host_sent], "{out}");
    assert_eq!(out.lines().last(), Some((16 * MIB).to_string().as_str()));
}

#[test]
fn host_program_reaches_a_card_service() {
    let card = vsock_card();
    let (_, _, code) = sh(
        &card,
        "mic-agent listen 4000 </dev/null >/tmp/got 2>/tmp/listen.err &",
    );
    assert_eq!(code, 0);
    let data = random(4 * MIB);
    let mut s = wait_for(Duration::from_secs(60), "the card's listener", || {
        agent_client::connect_port(&card.vsock_uds(), 4000).ok()
    });
    s.write_all(&data).unwrap();
    drop(s);
    let sum = sha256_bytes(&data);
    wait_for(CMD, "the card to have the data", || {
        let (out, _, _) = sh(&card, "pidof mic-agent | wc -w; sha256sum /tmp/got");
        // Only the agent itself left: the listener has exited.
        (out.starts_with("1\n") && sum_in(&out) == sum).then_some(())
    });
}

#[test]
fn agent_survives_garbage_and_hosts_that_leave_mid_transfer() {
    let card = vsock_card();
    let uds = card.vsock_uds();

    // Garbage: an error message back, then the connection ends.
    let mut s = agent_client::connect_port(&uds, AGENT_PORT).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(matches!(
        read_message(&mut s),
        Ok(Message::Error(ErrorCode::Malformed, _))
    ));
    // A frame that announces 2 GiB.
    let mut s = agent_client::connect_port(&uds, AGENT_PORT).unwrap();
    s.write_all(&[b'M', b'A', 9, 0, 0, 0, 0, 0x80]).unwrap();
    assert!(matches!(
        read_message(&mut s),
        Ok(Message::Error(ErrorCode::Malformed, _))
    ));

    // A put cut short: the host goes away after 4 MiB of 32.
    let mut s = agent_client::connect_port(&uds, AGENT_PORT).unwrap();
    write_message(&mut s, &Message::Hello(VERSION)).unwrap();
    assert_eq!(read_message(&mut s).unwrap(), Message::Hello(VERSION));
    let put = Message::Put {
        mode: 0o644,
        path: b"/tmp/cut".to_vec(),
    };
    write_message(&mut s, &put).unwrap();
    for _ in 0..64 {
        write_message(&mut s, &Message::Data(vec![0x5a; 64 * 1024])).unwrap();
    }
    drop(s);

    // An exec the host leaves: the command is killed.
    let mut s = agent_client::connect_port(&uds, AGENT_PORT).unwrap();
    write_message(&mut s, &Message::Hello(VERSION)).unwrap();
    assert_eq!(read_message(&mut s).unwrap(), Message::Hello(VERSION));
    let argv = ["sleep", "4242"].map(|a| a.as_bytes().to_vec()).to_vec();
    write_message(&mut s, &Message::Exec(argv)).unwrap();
    wait_for(Duration::from_secs(60), "the command to run", || {
        let (out, _, _) = sh(&card, "ps -o args | grep -c '^sleep 4242'");
        (out.trim() == "1").then_some(())
    });
    drop(s);

    // The agent still serves, nothing of the cut put is left, and the
    // abandoned command is gone.
    wait_for(
        Duration::from_secs(60),
        "the abandoned command to end",
        || {
            let (out, _, _) = sh(&card, "ps -o args | grep -c '^sleep 4242'");
            (out.trim() == "0").then_some(())
        },
    );
    let (out, _, code) = sh(&card, "ls -a /tmp");
    assert_eq!(code, 0);
    assert!(!out.contains("cut"), "a partial file is left: {out}");
    assert_eq!(sh(&card, "echo alive").0, "alive\n");
}

#[test]
fn vsock_works_after_a_backend_restart_and_a_card_reboot() {
    let mut card = vsock_card();
    let boot_id = sh(&card, "cat /proc/sys/kernel/random/boot_id").0;

    card.restart_vsock();
    wait_agent(&card);
    // The bridge reconnects the restarted backend and restarts the device,
    // which resets the card's connections of that moment: wait until a
    // command runs to its end (same boot, so the same boot id).
    let after = wait_for(
        BOOT_TIMEOUT,
        "a command through the restarted backend",
        || {
            let (out, _, code) = sh(&card, "cat /proc/sys/kernel/random/boot_id");
            (code == 0 && !out.is_empty()).then_some(out)
        },
    );
    assert_eq!(after, boot_id);
    let data = random(MIB);
    assert!(micctl(&card, &["exec", "--", "cat"], data.clone()).stdout == data);

    card.type_text("reboot\n");
    wait_for(BOOT_TIMEOUT, "a second boot", || {
        (card.serial().matches("mic-card: online").count() >= 2).then_some(())
    });
    card.wait_state("online", BOOT_TIMEOUT);
    wait_for(BOOT_TIMEOUT, "the agent of the second boot", || {
        let (id, _, code) = sh(&card, "cat /proc/sys/kernel/random/boot_id");
        (code == 0 && id != boot_id).then_some(())
    });
    assert!(micctl(&card, &["exec", "--", "cat"], data.clone()).stdout == data);
}

#[test]
fn vsock_device_hot_add_and_removal() {
    // No vsock at boot: the test adds it.
    let card = Card::boot(CardOptions {
        vsock: false,
        ..Default::default()
    });
    let sock = card.path("hot-vsock.sock");
    let uds = card.path("hot-vsock.uds");
    let mut backend = Command::new(mic_test_support::vsock_backend())
        .arg("--vm")
        .arg(format!(
            "guest-cid={},socket={},uds-path={}",
            mic_test_support::VSOCK_CID,
            sock.display(),
            uds.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(20), "vhost-device-vsock", || {
        sock.exists().then_some(())
    });
    let ctl = card.path("ctl.sock");
    let reply = vop_bridge::control::request(&ctl, &format!("add vsock {}", sock.display()));
    assert_eq!(reply.unwrap(), "added device 1");
    wait_for(BOOT_TIMEOUT, "the agent over the hot-added device", || {
        AgentClient::connect(&uds).ok().map(|_| ())
    });
    let mut out = Vec::new();
    let exit = AgentClient::connect(&uds)
        .unwrap()
        .exec(
            &["echo", "hot"],
            std::io::empty(),
            &mut out,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!((out.as_slice(), exit.shell_status()), (&b"hot\n"[..], 0));

    assert_eq!(
        vop_bridge::control::request(&ctl, "remove 1").unwrap(),
        "removing device 1"
    );
    wait_for(Duration::from_secs(60), "the removal", || {
        let list = vop_bridge::control::request(&ctl, "devices").ok()?;
        (!list.contains("\n1 ")).then_some(())
    });
    // With the device gone the card no longer answers on the port.
    wait_for(
        Duration::from_secs(30),
        "the agent to be unreachable",
        || {
            matches!(
                AgentClient::connect(&uds),
                Err(AgentError::Refused { .. } | AgentError::Connect { .. })
            )
            .then_some(())
        },
    );
    let _ = backend.kill();
    let _ = backend.wait();
}
