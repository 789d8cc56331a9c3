//! Fuzz-target bodies for what the card or a peer feeds the bridge
//! (`docs/fuzzing.md`): the device-protocol stream, the device page the card
//! writes, the network control queue the card fills, the control socket,
//! and the configuration files.
//!
//! Each body is an ordinary function: the libFuzzer harnesses in
//! `vop-bridge/fuzz/fuzz_targets/` call it, and the unit tests below replay
//! the saved corpus (`vop-bridge/fuzz/corpus/TARGET/`) in the ordinary test
//! suite. A body panics only on a broken promise of the code it drives.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use mic_backend_common::fuzz::Input;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::abi::{self, BootParam, DeviceDesc};
use crate::control::{ClientRead, ControlRequest, ControlServer, MAX_REQUEST_LINE};
use crate::device_protocol::{Aperture, DeviceLink, DeviceMessage};
use crate::page::DevicePage;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// This crate's targets, by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("device_protocol", device_protocol),
    ("device_page", device_page),
    ("net_control", net_control),
    ("control", control),
    ("config", config),
];

/// A memfd of `size` bytes.
fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned
    // descriptor is checked and then owned by the `File`.
    let fd = unsafe { libc::memfd_create(c"mic-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("memfd size");
    f
}

/// Fuzz target `device_protocol`: the device (QEMU) sends `data` as its byte
/// stream, with up to three memfds on its first bytes. The host decodes
/// messages until the stream ends or a message is refused; optionally it
/// first performs the attach handshake (mapping the aperture and the RAM
/// table the messages describe) or a `SYNC`.
///
/// Input: one mode byte (bits 0-1: descriptors; bit 2: `SYNC` first; bit 3:
/// attach first), then the stream.
pub fn device_protocol(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let stream = input.rest();
    let (host, device) = UnixStream::pair().expect("socketpair");
    let fds: Vec<File> = (0..mode & 3).map(|_| memfd(64 << 10)).collect();
    let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    if !stream.is_empty() {
        sent = device.send_with_fds(&[stream], &raw).expect("send");
    }
    (&device).write_all(&stream[sent..]).expect("stream");
    device
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    drop(fds);

    let mut link = DeviceLink::from_stream(host);
    if mode & 8 != 0 {
        if let Ok(a) = link.attach() {
            // The page the scratchpads point at, as the bridge adopts it.
            if let Some(off) = a.hello.device_page_offset() {
                let _ = DevicePage::adopt(&a.aperture, off);
            }
        }
    } else if mode & 4 != 0 {
        let _ = link.sync();
    }
    // Each message takes at least a header of the stream, or was queued.
    for _ in 0..=stream.len() / crate::device_protocol::HEADER_SIZE + 1 {
        match link.recv() {
            Ok(DeviceMessage::Hello(h, _)) => {
                let _ = h.device_page_offset();
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
    assert!(
        !link.has_pending(),
        "more messages than the stream can hold"
    );
}

/// Guest memory of the `net_control` target: the ring at 0, buffers after.
const NET_CONTROL_MEMORY: u64 = 64 << 10;

/// Where `net_control`'s ring of `size` entries lies (virtio 1.2, 2.7: the
/// split ring's legacy layout, the used ring at the next 4 KiB).
fn net_control_ring(size: u16) -> crate::net_control::RingOffsets {
    let avail = 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
    crate::net_control::RingOffsets {
        desc: 0,
        avail,
        used,
    }
}

/// Fuzz target `net_control`: the card filled its network control queue's
/// ring and buffers with `data` and kicked it three times; the bridge
/// serves it (`net_control.rs`, `docs/vop-abi.md` 5.8). Each kick answers
/// at most one ring of chains, never more malformed ones than answered, and
/// never fails for a reason other than the ring's own state.
///
/// Input: the ring size (`1 << (byte % 9)`), a flags byte (bit 0: EVENT_IDX;
/// bits 1-3: whether the device accepts each kick's commands), then guest
/// memory from address 0 (descriptor table, available ring, used ring at
/// the next 4 KiB, buffers).
pub fn net_control(data: &[u8]) {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let flags = input.u8();
    let bytes = input.rest();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), NET_CONTROL_MEMORY as usize)])
        .expect("fuzz memory");
    let n = bytes.len().min(NET_CONTROL_MEMORY as usize);
    mem.write_slice(&bytes[..n], GuestAddress(0))
        .expect("guest bytes");
    let mut q =
        crate::net_control::ControlQueue::new(2, size, net_control_ring(size), flags & 1 != 0, 0);
    for kick in 0..3 {
        let accept = flags >> (kick + 1) & 1 != 0;
        let mut seen = 0;
        match q.serve(&mem, 0, |_| {
            seen += 1;
            accept
        }) {
            Ok(s) => {
                assert!(s.commands <= usize::from(size), "more than a ring per kick");
                assert!(s.malformed <= s.commands);
                assert_eq!(
                    seen + s.malformed,
                    s.commands,
                    "a chain neither applied nor refused"
                );
            }
            Err(crate::net_control::ControlQueueError::Queue(_)) => {}
        }
    }
}

/// Size of the fuzz aperture: the page and a few rings.
const APERTURE: u64 = 64 << 10;

thread_local! {
    static FUZZ_APERTURE: RefCell<Option<Aperture>> = const { RefCell::new(None) };
}

/// Fuzz target `device_page`: the card wrote `data` into the aperture and
/// pointed SPAD14/15 at it; the host adopts the page and reads every field
/// the card owns. Adoption must accept only pages whose structure keeps
/// every later access inside the page and the aperture (`docs/vop-abi.md`
/// 5), and then every such access must succeed.
///
/// Input: an offset selector (0: page at 0; 1: at 4 KiB; 2: a `u16`; 3: a
/// `u64`), then the bytes written at the page's offset (the page, then
/// rings).
pub fn device_page(data: &[u8]) {
    FUZZ_APERTURE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let ap = cell.get_or_insert_with(|| {
            Aperture::map(memfd(APERTURE), APERTURE).expect("fuzz aperture")
        });
        page_body(ap, data);
    });
}

fn page_body(ap: &Aperture, data: &[u8]) {
    let mut input = Input::new(data);
    let offset = match input.u8() % 4 {
        0 => 0,
        1 => 4096,
        2 => u64::from(input.u16()),
        _ => input.u64(),
    };
    let bytes = input.rest();
    ap.write(0, &vec![0u8; APERTURE as usize]).expect("clear");
    let at = if offset < APERTURE { offset } else { 0 };
    let n = bytes.len().min((APERTURE - at) as usize);
    ap.write(at, &bytes[..n]).expect("page bytes");

    let Ok(page) = DevicePage::adopt(ap, offset) else {
        return;
    };
    // Structure: inside the page and the aperture, one doorbell each.
    assert!(offset + abi::DP_SIZE as u64 <= ap.size());
    let mut doorbells = Vec::new();
    let mut end = std::mem::size_of::<BootParam>();
    for s in page.slots().iter().flatten() {
        assert!(s.desc_offset >= end, "descriptors overlap");
        assert!(s.desc_offset + std::mem::size_of::<DeviceDesc>() <= abi::DP_SIZE);
        assert!(s.desc_offset + s.layout.total_size() <= abi::DP_SIZE);
        end = s.desc_offset + s.layout.total_size();
        assert!(u32::from(s.c2h_db) < abi::NUM_DOORBELLS);
        assert!(!doorbells.contains(&s.c2h_db), "a doorbell owned twice");
        doorbells.push(s.c2h_db);
        assert_eq!(s.rings.len(), usize::from(s.layout.num_vq));
        for r in &s.rings {
            assert!(r.offset >= offset + abi::DP_SIZE as u64);
            assert!(r.offset + abi::ring_alloc_size(r.num) <= ap.size());
        }
    }
    // Every card-owned field the bridge reads, at offsets it computed.
    page.h2c_config_db(ap).expect("h2c_config_db");
    for (i, s) in page.slots().iter().enumerate() {
        let Some(s) = s else { continue };
        page.status(ap, i).expect("status");
        page.acked_features(ap, i).expect("acked features");
        let config = page.config(ap, i).expect("config");
        assert_eq!(config.len(), usize::from(s.layout.config_len));
        page.ctrl(ap, i).expect("ctrl");
        page.h2c_vdev_db(ap, i).expect("h2c_vdev_db");
        let _ = crate::page::unused_fields(ap, &page, i);
        for q in 0..s.rings.len() {
            page.used_idx(ap, i, q).expect("used index");
        }
        page.write_config(ap, i, &config).expect("write config");
        page.reset_rings(ap, i).expect("reset rings");
    }
}

/// A control socket in a directory of its own, kept for a fuzz run.
struct ControlSocket {
    server: ControlServer,
    path: std::path::PathBuf,
    // Last: removed after the server (which removes its socket).
    _dir: vmm_sys_util::tempdir::TempDir,
}

thread_local! {
    static FUZZ_CONTROL: RefCell<Option<ControlSocket>> = const { RefCell::new(None) };
}

/// Fuzz target `control`: a client of the control socket sends `data` in
/// pieces; the bridge reads it without blocking. The request it acts on
/// must be the first line, parsed, and only when that line is complete and
/// within [`MAX_REQUEST_LINE`].
///
/// Input: one byte (the piece length, 1 to 256), then the bytes sent.
pub fn control(data: &[u8]) {
    let mut input = Input::new(data);
    let piece = usize::from(input.u8()) + 1;
    let sent = input.rest();
    // The parser alone, on the whole input.
    let _ = ControlRequest::parse(&String::from_utf8_lossy(sent));

    FUZZ_CONTROL.with(|cell| {
        let mut cell = cell.borrow_mut();
        let sock = cell.get_or_insert_with(|| {
            let prefix = std::env::temp_dir().join("mic-fuzz-control-");
            let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).expect("temp dir");
            let path = dir.as_path().join("control.sock");
            let server = ControlServer::bind(&path).expect("bind");
            ControlSocket {
                server,
                path,
                _dir: dir,
            }
        });
        let client = UnixStream::connect(&sock.path).expect("connect");
        let mut conn = sock.server.accept_client().expect("accepted");
        let mut outcome = None;
        for chunk in sent.chunks(piece) {
            (&client).write_all(chunk).expect("send");
            match conn.read() {
                ClientRead::Pending => {}
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let outcome = outcome.unwrap_or_else(|| conn.read());
        let first_line = sent
            .iter()
            .position(|&b| b == b'\n')
            .filter(|&n| n < MAX_REQUEST_LINE)
            .map(|n| String::from_utf8_lossy(&sent[..n]).into_owned());
        match outcome {
            ClientRead::Request(r, reply) => {
                let line = first_line.expect("a request without a complete line");
                assert_eq!(Some(r), ControlRequest::parse(&line));
                reply.reply("ok\n");
            }
            ClientRead::Done => {
                if let Some(line) = first_line {
                    assert_eq!(ControlRequest::parse(&line), None, "request {line:?} lost");
                }
            }
            ClientRead::Pending => panic!("pending after the client closed"),
        }
    });
}

/// Fuzz target `config`: the bridge's config file, micd's config file, and
/// `micctl config KEY=VALUE` lines are parsed and validated; a
/// configuration that validates must validate again after a round of
/// `set` with its own values.
///
/// Input: one selector byte (0: bridge TOML; 1: micd TOML; 2: `KEY=VALUE`
/// lines), then the text.
pub fn config(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.u8() % 3;
    let text = String::from_utf8_lossy(input.rest());
    let path = Path::new("fuzz.toml");
    match which {
        0 => {
            if let Ok(c) = crate::config::BridgeConfig::from_toml(&text, path) {
                let _ = c.validate();
            }
        }
        1 => {
            if let Ok(c) = crate::micd::config::MicdConfig::from_toml(&text, path) {
                for card in c.cards.values() {
                    card.validate().expect("a loaded card validates");
                }
                let _ = c.with_cards(4);
            }
        }
        _ => {
            let mut card = crate::micd::config::CardConfig::default();
            for line in text.lines() {
                let (key, value) = line.split_once('=').unwrap_or((line, ""));
                let _ = crate::micd::config::needs_ready(key);
                let _ = crate::micd::config::card_index(key);
                let before = card.clone();
                if card.set(key, value).is_err() {
                    assert_eq!(card, before, "a refused setting changed the card");
                }
                card.validate().expect("a set card validates");
            }
        }
    }
}

/// Seed inputs of this crate's targets, built with the code that builds
/// the real thing (the device page, the device's `HELLO`): `(target, name,
/// input)`. `cargo test -p vop-bridge --release --lib -- --ignored
/// write_seeds` writes them into the corpus.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use crate::device_protocol::{msg, DeviceHello, VERSION};
    use crate::page::DeviceSpec;

    let message = |ty: u32, payload: &[u8]| {
        let mut m = ty.to_le_bytes().to_vec();
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    };
    let words = |w: &[u32]| w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let mut spads = [0u32; abi::NUM_SPADS as usize];
    spads[abi::SPAD_DP_LO as usize] = 0x1000;
    let hello = DeviceHello {
        version: VERSION,
        node_id: 1,
        aperture_size: 64 << 10,
        num_spads: abi::NUM_SPADS,
        num_doorbells: abi::NUM_DOORBELLS,
        num_vectors: abi::NUM_VECTORS,
        running: true,
        card_state: 2,
        shutdown_status: 0,
        host_request: 0,
        spads,
    };
    let mut table = words(&[1, 0]);
    table.extend([0u64, 64 << 10, 0].iter().flat_map(|v| v.to_le_bytes()));
    let others = [
        message(msg::REG_WRITE, &words(&[0x138, 0x1000])),
        message(msg::DOORBELL, &words(&[3, 1])),
        message(msg::CARD_EVENT, &words(&[1])),
        message(msg::SYNC, &1u64.to_le_bytes()),
        message(
            msg::ERROR,
            &[&words(&[6, 22])[..], b"no such doorbell\0"].concat(),
        ),
        message(99, b"future"),
    ]
    .concat();
    let mut attach = vec![0x0a];
    attach.extend(message(msg::HELLO, &hello.encode()));
    attach.extend(message(msg::MEM_TABLE, &table));
    attach.extend(&others);
    let mut sync = vec![0x04];
    sync.extend(message(msg::DOORBELL, &words(&[3, 1])));
    sync.extend(message(msg::DOORBELL, &words(&[3, 1])));
    sync.extend(message(msg::DOORBELL, &words(&[4, 1])));
    sync.extend(message(msg::SYNC, &1u64.to_le_bytes()));
    let mut plain = vec![0x00];
    plain.extend(&others);

    // Device pages as the bridge builds them, at offset 0.
    let page = |specs: &[DeviceSpec]| {
        let ap = Aperture::map(memfd(APERTURE), APERTURE).expect("aperture");
        let mut page = DevicePage::build(&ap, 0, 1).expect("page");
        for s in specs {
            page.add(&ap, s).expect("device");
        }
        // The page alone: adoption reads no ring contents, and the target
        // zeroes what the input leaves out.
        let mut bytes = vec![0u8; abi::DP_SIZE];
        ap.read(0, &mut bytes).expect("read");
        [&[0u8][..], &bytes].concat()
    };
    let blk = DeviceSpec {
        device_type: 2,
        queue_sizes: vec![8],
        features: 1 << 32 | 1 << 9,
        config: (0..60).collect(),
    };
    let console = DeviceSpec {
        device_type: 3,
        queue_sizes: vec![8, 8],
        features: 1 << 32 | 1,
        config: vec![80, 0, 25, 0, 1, 0, 0, 0, 0, 0, 0, 0],
    };
    let net = DeviceSpec {
        device_type: 1,
        queue_sizes: vec![8, 8],
        features: 1 << 32 | 1 << 5,
        config: vec![2, 0, 0, 0, 0, 1, 1, 0, 0xdc, 5],
    };

    // A network control queue of 8 entries with one VQ_PAIRS_SET (2 pairs):
    // header, data and status buffers at 8 KiB.
    let net_control_seed = {
        let ring = net_control_ring(8);
        let mut m = vec![0u8; 0x2110];
        let desc = |m: &mut Vec<u8>, i: usize, addr: u64, len: u32, flags: u16, next: u16| {
            let d = &mut m[16 * i..16 * i + 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        };
        desc(&mut m, 0, 0x2000, 2, 1, 1);
        desc(&mut m, 1, 0x2002, 2, 1, 2);
        desc(&mut m, 2, 0x2100, 1, 2, 0);
        let avail = ring.avail as usize;
        m[avail + 2..avail + 4].copy_from_slice(&1u16.to_le_bytes());
        m[0x2000..0x2004].copy_from_slice(&[4, 0, 2, 0]);
        [&[3u8, 0b1110][..], &m].concat()
    };

    let bridge_toml = "device_socket = \"/run/mic0.sock\"\nqueue_size = 128\n\n[[device]]\ntype = \"blk\"\nsocket = \"/run/blk.sock\"\nqueue_size = 64\n\n[[device]]\ntype = \"console\"\nsocket = \"/run/con.sock\"\n";
    let micd_toml =
        "[mic0]\nmemory = 1024\ncpus = 2\naccel = \"tcg\"\n\n[mic1]\nautoboot = false\n";
    let set = "memory=2048\ncpus=4\naccel=kvm\nautoboot=yes\npolicy=stay-down\ncmdline=console=hvc0\nshutdown_timeout=0\nmic3\n";
    vec![
        ("device_protocol", "attach", attach),
        ("device_protocol", "sync", sync),
        ("device_protocol", "messages", plain),
        ("device_page", "blk", page(std::slice::from_ref(&blk))),
        ("device_page", "three", page(&[console, blk, net])),
        ("net_control", "pairs", net_control_seed),
        ("control", "status", b"\x00status\n".to_vec()),
        (
            "control",
            "add",
            b"\x03add blk /run/mic/blk.sock\n".to_vec(),
        ),
        ("control", "remove", b"\x00remove 1\nstatus\n".to_vec()),
        ("control", "unknown", b"\x01bogus\n".to_vec()),
        (
            "config",
            "bridge",
            [b"\x00", bridge_toml.as_bytes()].concat(),
        ),
        ("config", "micd", [b"\x01", micd_toml.as_bytes()].concat()),
        ("config", "set", [b"\x02", set.as_bytes()].concat()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mic_backend_common::fuzz::{corpus_dir, replay};

    #[test]
    fn seeds_run() {
        for (target, _, input) in seeds() {
            let body = TARGETS.iter().find(|t| t.0 == target).expect("target").1;
            body(&input);
        }
    }

    #[test]
    fn page_seeds_are_adopted() {
        let ap = Aperture::map(memfd(APERTURE), APERTURE).unwrap();
        for (target, name, input) in seeds() {
            if target == "device_page" {
                ap.write(0, &input[1..]).unwrap();
                let page = DevicePage::adopt(&ap, 0).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(!page.slots().is_empty());
            }
        }
    }

    #[test]
    fn the_net_control_seed_sets_two_pairs() {
        let (_, _, input) = seeds().into_iter().find(|s| s.0 == "net_control").unwrap();
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
        mem.write_slice(&input[2..], GuestAddress(0)).unwrap();
        let mut q = crate::net_control::ControlQueue::new(2, 8, net_control_ring(8), false, 0);
        let mut cmds = Vec::new();
        let served = q
            .serve(&mem, 0, |c| {
                cmds.push(c);
                true
            })
            .unwrap();
        assert_eq!(cmds, vec![crate::net_control::Command::SetQueuePairs(2)]);
        assert_eq!(served.commands, 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2100)).unwrap(), 0);
    }

    #[test]
    #[ignore = "writes the seed inputs into the saved corpus"]
    fn write_seeds() {
        for (target, name, input) in seeds() {
            let dir = corpus_dir(env!("CARGO_MANIFEST_DIR"), target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
        }
    }

    #[test]
    fn saved_corpora_replay() {
        for (name, body) in TARGETS {
            let n = replay(env!("CARGO_MANIFEST_DIR"), name, body);
            assert!(n > 0, "{name}");
        }
    }
}
