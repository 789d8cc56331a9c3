//! The Rust mirrors of the VOP ABI (`vop_bridge::abi`) and of the device
//! protocol (`vop_bridge::device_protocol`) against their code definition,
//! the C header `guest-images/driver/mic_x100_vop.h`.
//!
//! The test reads the header's object-like `#define`s and its structs and
//! fields, generates a C program that prints each constant, `sizeof` and
//! `offsetof` as the C compiler sees them, compiles it with `cc` and compares
//! every line with the Rust side. A constant, struct or field added to the
//! header without a mirror here fails the test, as does any value, size or
//! offset that differs. The split ring layout (`abi::vring_size`,
//! `abi::vring_used_offset`) is compared with `<linux/virtio_ring.h>`'s
//! `vring_size`/`vring_init`, and `abi::DescLayout` with the header's
//! `mic_desc_size`/`mic_total_desc_size`.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use vmm_sys_util::tempdir::TempDir;
use vop_bridge::abi::{
    self, reg, BootParam, CardState, DescLayout, DeviceCtrl, DeviceDesc, Heartbeat, ShutdownStatus,
    VqConfig, VringInfo,
};
use vop_bridge::device_protocol::{self as dp, event, msg, wire};

fn header_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/driver/mic_x100_vop.h")
}

/// Object-like macros of the header that are not integer constants.
const NOT_VALUES: &[&str] = &["MIC_PACKED"];

/// The header parsed just enough to generate the C program.
struct Header {
    /// Names of the integer `#define`s, in order.
    defines: Vec<String>,
    /// Struct name to its fields (name, is a flexible array member).
    structs: BTreeMap<String, Vec<(String, bool)>>,
}

fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find("*/").expect("unterminated comment") + i + 2;
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn parse_header(text: &str) -> Header {
    let text = strip_comments(text);
    let mut defines = Vec::new();
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, Vec<(String, bool)>)> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("#define ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let function_like = rest[name.len()..].starts_with('(');
            let has_value = !rest[name.len()..].trim().is_empty();
            if name.starts_with("MIC_")
                && !function_like
                && has_value
                && !NOT_VALUES.contains(&name.as_str())
                && !name.ends_with("_H")
            {
                defines.push(name);
            }
            continue;
        }
        if let Some((name, fields)) = current.as_mut() {
            if line.starts_with('}') {
                structs.insert(name.clone(), std::mem::take(fields));
                current = None;
                continue;
            }
            if let Some(decl) = line.strip_suffix(';') {
                let last = decl.split_whitespace().last().expect("field declaration");
                let flexible = last.ends_with("[]");
                let field = last.split('[').next().unwrap().to_string();
                fields.push((field, flexible));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("struct ") {
            if let Some(name) = rest.strip_suffix(" {") {
                current = Some((name.to_string(), Vec::new()));
            }
        }
    }
    assert!(current.is_none(), "unterminated struct in the header");
    Header { defines, structs }
}

/// Layouts the test checks for `DescLayout`: (num_vq, feature_len, config_len).
const DESC_SHAPES: &[(u8, u8, u8)] = &[(1, 8, 60), (2, 4, 0), (3, 8, 12), (16, 32, 255)];
/// Ring sizes the test checks the split ring layout for.
const RING_SIZES: &[u16] = &[1, 2, 64, 128, 256, 1024];

fn c_program(h: &Header) -> String {
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n\
         #include <linux/virtio_ring.h>\n#include \"mic_x100_vop.h\"\n\
         static char ring[65536] __attribute__((aligned(4096)));\n\
         int main(void)\n{\n\tstruct vring vr;\n\n",
    );
    for d in &h.defines {
        c += &format!("\tprintf(\"define {d} %lld\\n\", (long long)({d}));\n");
    }
    for (s, fields) in &h.structs {
        c += &format!("\tprintf(\"sizeof {s} %zu\\n\", sizeof(struct {s}));\n");
        for (f, _) in fields {
            c += &format!("\tprintf(\"offsetof {s}.{f} %zu\\n\", offsetof(struct {s}, {f}));\n");
        }
    }
    for &(n, f, l) in DESC_SHAPES {
        c += &format!(
            "\tprintf(\"desc_size {n},{f},{l} %u %u\\n\", mic_desc_size({n}, {f}, {l}), \
             mic_total_desc_size({n}, {f}, {l}));\n"
        );
    }
    for &n in RING_SIZES {
        c += &format!(
            "\tvring_init(&vr, {n}, ring, MIC_VIRTIO_RING_ALIGN);\n\
             \tprintf(\"vring {n} %u %zu\\n\", vring_size({n}, MIC_VIRTIO_RING_ALIGN), \
             (size_t)((char *)vr.used - ring));\n"
        );
    }
    c += "\treturn 0;\n}\n";
    c
}

/// Compiles and runs the program; returns its output lines.
fn run_c(program: &str) -> Vec<String> {
    let dir = TempDir::new_with_prefix("/tmp/abi-header-").unwrap();
    let src = dir.as_path().join("abi.c");
    let exe = dir.as_path().join("abi");
    std::fs::write(&src, program).unwrap();
    let include = header_path().parent().unwrap().to_path_buf();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&include)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e} (a C compiler is needed)"));
    assert!(
        out.status.success(),
        "the header does not compile as user-space C:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// Every integer constant of the header and its Rust mirror.
fn rust_constants() -> BTreeMap<&'static str, i128> {
    let v = |x: i128| x;
    BTreeMap::from([
        // docs/vop-abi.md section 1
        ("MIC_X100_PCI_VENDOR", v(abi::PCI_VENDOR_ID.into())),
        ("MIC_X100_PCI_DEVICE_2250", v(abi::PCI_DEVICE_ID.into())),
        ("MIC_X100_PCI_CLASS", v(abi::PCI_CLASS.into())),
        ("MIC_BAR_REGS", v(abi::BAR_REGS.into())),
        ("MIC_BAR_APERTURE", v(abi::BAR_APERTURE.into())),
        ("MIC_BAR_MSIX", v(abi::BAR_MSIX.into())),
        ("MIC_REGS_SIZE", v(abi::REGS_SIZE.into())),
        // section 2
        ("MIC_REG_MAGIC", v(reg::MAGIC.into())),
        ("MIC_REG_ABI_VERSION", v(reg::ABI_VERSION.into())),
        ("MIC_REG_FAMILY", v(reg::FAMILY.into())),
        ("MIC_REG_STEPPING", v(reg::STEPPING.into())),
        ("MIC_REG_NODE_ID", v(reg::NODE_ID.into())),
        ("MIC_REG_NUM_SPADS", v(reg::NUM_SPADS.into())),
        ("MIC_REG_NUM_DOORBELLS", v(reg::NUM_DOORBELLS.into())),
        ("MIC_REG_NUM_VECTORS", v(reg::NUM_VECTORS.into())),
        ("MIC_REG_APERTURE_LO", v(reg::APERTURE_SIZE_LO.into())),
        ("MIC_REG_APERTURE_HI", v(reg::APERTURE_SIZE_HI.into())),
        ("MIC_REG_CARD_STATE", v(reg::CARD_STATE.into())),
        ("MIC_REG_SHUTDOWN_STATUS", v(reg::SHUTDOWN_STATUS.into())),
        ("MIC_REG_HOST_REQUEST", v(reg::HOST_REQUEST.into())),
        ("MIC_REG_SPAD_BASE", v(reg::SPAD_BASE.into())),
        ("MIC_REG_DOORBELL_BASE", v(reg::DOORBELL_BASE.into())),
        ("MIC_REGS_MAGIC", v(reg::MAGIC_VALUE.into())),
        (
            "MIC_ABI_VERSION_MAJOR",
            v((reg::ABI_VERSION_VALUE >> 16).into()),
        ),
        (
            "MIC_ABI_VERSION_MINOR",
            v((reg::ABI_VERSION_VALUE & 0xffff).into()),
        ),
        ("MIC_ABI_VERSION", v(reg::ABI_VERSION_VALUE.into())),
        ("MIC_FAMILY_X100", v(reg::FAMILY_X100.into())),
        ("MIC_STEPPING_A0", v(reg::STEPPING_A0.into())),
        ("MIC_STEPPING_B0", v(reg::STEPPING_B0.into())),
        ("MIC_STEPPING_B1", v(reg::STEPPING_B1.into())),
        ("MIC_STEPPING_C0", v(reg::STEPPING_C0.into())),
        ("MIC_NUM_SPADS", v(abi::NUM_SPADS.into())),
        ("MIC_NUM_DOORBELLS", v(abi::NUM_DOORBELLS.into())),
        ("MIC_NUM_VECTORS", v(abi::NUM_VECTORS.into())),
        ("MIC_DPLO_SPAD", v(abi::SPAD_DP_LO.into())),
        ("MIC_DPHI_SPAD", v(abi::SPAD_DP_HI.into())),
        // sections 3 and 4
        ("MIC_CTRL_VECTOR", v(abi::CONTROL_VECTOR.into())),
        ("MIC_DB_KICK_MAX", v(abi::DOORBELL_KICK_MAX.into())),
        ("MIC_DB_CONTROL", v(abi::DOORBELL_CONTROL.into())),
        ("MIC_HOST_REQ_NONE", v(reg::HOST_REQUEST_NONE.into())),
        (
            "MIC_HOST_REQ_SHUTDOWN",
            v(reg::HOST_REQUEST_SHUTDOWN.into()),
        ),
        // section 6
        ("MIC_STATE_READY", v(CardState::Ready as i128)),
        ("MIC_STATE_BOOTING", v(CardState::Booting as i128)),
        ("MIC_STATE_ONLINE", v(CardState::Online as i128)),
        (
            "MIC_STATE_SHUTTING_DOWN",
            v(CardState::ShuttingDown as i128),
        ),
        ("MIC_STATE_RESETTING", v(CardState::Resetting as i128)),
        ("MIC_STATE_RESET_FAILED", v(CardState::ResetFailed as i128)),
        ("MIC_STATUS_NOP", v(ShutdownStatus::Nop as i128)),
        ("MIC_STATUS_CRASHED", v(ShutdownStatus::Crashed as i128)),
        ("MIC_STATUS_HALTED", v(ShutdownStatus::Halted as i128)),
        ("MIC_STATUS_POWER_OFF", v(ShutdownStatus::PowerOff as i128)),
        ("MIC_STATUS_RESTART", v(ShutdownStatus::Restart as i128)),
        // section 5
        ("MIC_MAGIC", v(abi::MIC_MAGIC.into())),
        ("MIC_DP_SIZE", v(abi::DP_SIZE as i128)),
        ("MIC_DP_DEFAULT_OFFSET", v(abi::DP_DEFAULT_OFFSET.into())),
        ("MIC_VIRTIO_RING_ALIGN", v(abi::RING_ALIGN.into())),
        ("MIC_TYPE_END", v(abi::TYPE_END.into())),
        ("MIC_TYPE_REMOVED", v(abi::TYPE_REMOVED.into())),
        (
            "MIC_VIRTIO_PARAM_DEV_REMOVE",
            v(abi::CONFIG_CHANGE_REMOVE.into()),
        ),
        (
            "MIC_VIRTIO_PARAM_CONFIG_CHANGED",
            v(abi::CONFIG_CHANGE_CONFIG.into()),
        ),
        ("MIC_MAX_VQS", v(abi::MAX_VQS as i128)),
        ("MIC_MAX_VRING_ENTRIES", v(abi::MAX_RING_ENTRIES.into())),
        ("MIC_MAX_DESC_SIZE", v(abi::MAX_DESC_SIZE as i128)),
        ("MIC_MIN_FEATURE_LEN", v(abi::MIN_FEATURE_LEN.into())),
        ("MIC_MAX_FEATURE_LEN", v(abi::MAX_FEATURE_LEN.into())),
        ("MIC_HOST_FEATURE_LEN", v(abi::FEATURE_LEN.into())),
        ("MIC_HEARTBEAT_OFFSET", v(abi::HEARTBEAT_OFFSET as i128)),
        ("MIC_HEARTBEAT_MAGIC", v(abi::HEARTBEAT_MAGIC.into())),
        // docs/device-protocol.md
        ("MIC_PROTO_VERSION_MAJOR", v((dp::VERSION >> 16).into())),
        ("MIC_PROTO_VERSION_MINOR", v((dp::VERSION & 0xffff).into())),
        ("MIC_PROTO_VERSION", v(dp::VERSION.into())),
        ("MIC_MSG_MAX_PAYLOAD", v(dp::MAX_PAYLOAD as i128)),
        ("MIC_MSG_MAX_FDS", v(dp::MAX_FDS as i128)),
        ("MIC_MSG_HELLO", v(msg::HELLO.into())),
        ("MIC_MSG_MEM_TABLE", v(msg::MEM_TABLE.into())),
        ("MIC_MSG_REG_WRITE", v(msg::REG_WRITE.into())),
        ("MIC_MSG_DOORBELL", v(msg::DOORBELL.into())),
        ("MIC_MSG_CARD_EVENT", v(msg::CARD_EVENT.into())),
        ("MIC_MSG_SET_DOORBELL_FD", v(msg::SET_DOORBELL_FD.into())),
        ("MIC_MSG_SET_VECTOR_FD", v(msg::SET_VECTOR_FD.into())),
        ("MIC_MSG_RAISE_VECTOR", v(msg::RAISE_VECTOR.into())),
        ("MIC_MSG_SYNC", v(msg::SYNC.into())),
        ("MIC_MSG_ERROR", v(msg::ERROR.into())),
        ("MIC_CARD_EVENT_RESET", v(event::RESET.into())),
        ("MIC_CARD_EVENT_POWEROFF", v(event::POWEROFF.into())),
        ("MIC_CARD_EVENT_RUN", v(event::RUN.into())),
        ("MIC_CARD_EVENT_STOP", v(event::STOP.into())),
        ("MIC_HELLO_FLAG_RUNNING", v(dp::HELLO_FLAG_RUNNING.into())),
        ("MIC_MAX_MEM_REGIONS", v(dp::MAX_MEM_REGIONS as i128)),
        ("MIC_ERROR_TEXT_MAX", v(dp::ERROR_TEXT_MAX as i128)),
    ])
}

/// A struct's size and its fields' offsets, by the C names.
struct Mirror {
    size: usize,
    fields: BTreeMap<&'static str, usize>,
}

macro_rules! mirror {
    ($ty:ty { $($c:ident => $r:ident),* $(,)? }) => {
        Mirror {
            size: size_of::<$ty>(),
            fields: BTreeMap::from([$((stringify!($c), offset_of!($ty, $r))),*]),
        }
    };
}

/// Every struct of the header and its Rust mirror. Flexible array members
/// have no Rust field; they must start at the end of the struct.
fn rust_structs() -> BTreeMap<&'static str, Mirror> {
    BTreeMap::from([
        (
            "mic_bootparam",
            mirror!(BootParam {
                magic => magic,
                h2c_config_db => h2c_config_db,
                node_id => node_id,
                h2c_scif_db => h2c_scif_db,
                c2h_scif_db => c2h_scif_db,
                scif_host_dma_addr => scif_host_dma_addr,
                scif_card_dma_addr => scif_card_dma_addr,
            }),
        ),
        (
            "mic_heartbeat",
            mirror!(Heartbeat {
                magic => magic,
                period_ms => period_ms,
                count => count,
                pad => pad,
            }),
        ),
        (
            "mic_device_desc",
            mirror!(DeviceDesc {
                type => type_,
                num_vq => num_vq,
                feature_len => feature_len,
                config_len => config_len,
                status => status,
                pad => pad,
            }),
        ),
        (
            "mic_vqconfig",
            mirror!(VqConfig {
                address => address,
                used_address => used_address,
                num => num,
                h2c_vq_db => h2c_vq_db,
                pad => pad,
            }),
        ),
        (
            "mic_device_ctrl",
            mirror!(DeviceCtrl {
                vdev => vdev,
                config_change => config_change,
                vdev_reset => vdev_reset,
                guest_ack => guest_ack,
                host_ack => host_ack,
                used_address_updated => used_address_updated,
                c2h_vdev_db => c2h_vdev_db,
                h2c_vdev_db => h2c_vdev_db,
                pad => pad,
            }),
        ),
        (
            "mic_vring_info",
            mirror!(VringInfo {
                avail_idx => avail_idx,
                pad => pad,
                magic => magic,
            }),
        ),
        (
            "mic_msg_hdr",
            mirror!(wire::MsgHeader { type => type_, size => size }),
        ),
        (
            "mic_msg_device_hello",
            mirror!(wire::DeviceHello {
                version => version,
                node_id => node_id,
                aperture_size => aperture_size,
                num_spads => num_spads,
                num_doorbells => num_doorbells,
                num_vectors => num_vectors,
                flags => flags,
                card_state => card_state,
                shutdown_status => shutdown_status,
                host_request => host_request,
                pad => pad,
                spads => spads,
            }),
        ),
        (
            "mic_msg_host_hello",
            mirror!(wire::HostHello { version => version }),
        ),
        (
            "mic_msg_mem_region",
            mirror!(wire::MemRegion {
                gpa => gpa,
                size => size,
                fd_offset => fd_offset,
            }),
        ),
        (
            "mic_msg_mem_table",
            mirror!(wire::MemTable { count => count, pad => pad }),
        ),
        (
            "mic_msg_reg_write",
            mirror!(wire::RegWrite { offset => offset, value => value }),
        ),
        (
            "mic_msg_doorbell",
            mirror!(wire::Doorbell { doorbell => doorbell, value => value }),
        ),
        (
            "mic_msg_card_event",
            mirror!(wire::CardEvent { event => event }),
        ),
        (
            "mic_msg_set_doorbell_fd",
            mirror!(wire::SetDoorbellFd { doorbell => doorbell, value => value }),
        ),
        (
            "mic_msg_set_vector_fd",
            mirror!(wire::SetVectorFd { vector => vector, pad => pad }),
        ),
        (
            "mic_msg_raise_vector",
            mirror!(wire::RaiseVector { vector => vector }),
        ),
        ("mic_msg_sync", mirror!(wire::Sync { token => token })),
        (
            "mic_msg_error",
            mirror!(wire::Error { request_type => request_type, error => error }),
        ),
    ])
}

/// The program's output, split into its kinds of line.
#[derive(Default)]
struct CFacts {
    defines: BTreeMap<String, i128>,
    sizes: BTreeMap<String, usize>,
    offsets: BTreeMap<(String, String), usize>,
    desc_sizes: BTreeMap<String, (usize, usize)>,
    rings: BTreeMap<u16, (u64, u64)>,
}

fn c_facts() -> (Header, CFacts) {
    let text = std::fs::read_to_string(header_path()).unwrap();
    let header = parse_header(&text);
    let mut facts = CFacts::default();
    for line in run_c(&c_program(&header)) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[0] {
            "define" => {
                facts.defines.insert(w[1].into(), w[2].parse().unwrap());
            }
            "sizeof" => {
                facts.sizes.insert(w[1].into(), w[2].parse().unwrap());
            }
            "offsetof" => {
                let (s, f) = w[1].split_once('.').unwrap();
                facts
                    .offsets
                    .insert((s.into(), f.into()), w[2].parse().unwrap());
            }
            "desc_size" => {
                facts
                    .desc_sizes
                    .insert(w[1].into(), (w[2].parse().unwrap(), w[3].parse().unwrap()));
            }
            "vring" => {
                facts.rings.insert(
                    w[1].parse().unwrap(),
                    (w[2].parse().unwrap(), w[3].parse().unwrap()),
                );
            }
            other => panic!("unexpected line kind {other}"),
        }
    }
    (header, facts)
}

#[test]
fn header_parser_sees_defines_structs_and_flexible_members() {
    let h = parse_header(
        "/* c */\n#define MIC_A 1 /* x */\n#define MIC_F(x) (x)\n#define MIC_PACKED __attribute__((packed))\n\
         struct mic_s {\n\t__le32 a; /* y */\n\t__u8 b[3];\n\tchar t[];\n} MIC_PACKED;\n",
    );
    assert_eq!(h.defines, vec!["MIC_A".to_string()]);
    assert_eq!(
        h.structs["mic_s"],
        vec![
            ("a".to_string(), false),
            ("b".to_string(), false),
            ("t".to_string(), true)
        ]
    );
}

#[test]
fn every_constant_matches_the_header() {
    let (header, facts) = c_facts();
    let rust = rust_constants();
    let c_names: BTreeSet<&str> = header.defines.iter().map(String::as_str).collect();
    let rust_names: BTreeSet<&str> = rust.keys().copied().collect();
    assert_eq!(
        c_names.difference(&rust_names).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "constants of the header without a Rust mirror"
    );
    assert_eq!(
        rust_names.difference(&c_names).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "Rust mirrors of constants the header does not have"
    );
    for (name, value) in &rust {
        assert_eq!(facts.defines[*name], *value, "{name}: header vs Rust");
    }
}

#[test]
fn every_struct_size_and_offset_matches_the_header() {
    let (header, facts) = c_facts();
    let rust = rust_structs();
    assert_eq!(
        header
            .structs
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        rust.keys().copied().collect::<Vec<_>>(),
        "structs of the header vs their Rust mirrors"
    );
    for (name, fields) in &header.structs {
        let m = &rust[name.as_str()];
        assert_eq!(facts.sizes[name], m.size, "sizeof {name}: header vs Rust");
        let mut mirrored = BTreeSet::new();
        for (field, flexible) in fields {
            let c_off = facts.offsets[&(name.clone(), field.clone())];
            if *flexible {
                assert_eq!(c_off, m.size, "{name}.{field} must follow the struct");
                continue;
            }
            let r_off = m
                .fields
                .get(field.as_str())
                .unwrap_or_else(|| panic!("{name}.{field} has no Rust mirror"));
            assert_eq!(c_off, *r_off, "offsetof {name}.{field}: header vs Rust");
            mirrored.insert(field.as_str());
        }
        let extra: Vec<_> = m.fields.keys().filter(|f| !mirrored.contains(*f)).collect();
        assert!(
            extra.is_empty(),
            "{name}: Rust fields {extra:?} not in the header"
        );
    }
    assert_eq!(dp::HEADER_SIZE, facts.sizes["mic_msg_hdr"]);
    assert_eq!(dp::DEVICE_HELLO_SIZE, facts.sizes["mic_msg_device_hello"]);
}

#[test]
fn descriptor_and_ring_layouts_match_c() {
    let (_, facts) = c_facts();
    for &(num_vq, feature_len, config_len) in DESC_SHAPES {
        let l = DescLayout {
            num_vq,
            feature_len,
            config_len,
        };
        let key = format!("{num_vq},{feature_len},{config_len}");
        assert_eq!(
            facts.desc_sizes[&key],
            (l.desc_size(), l.total_size()),
            "descriptor {key}"
        );
    }
    for &num in RING_SIZES {
        assert_eq!(
            facts.rings[&num],
            (
                abi::vring_size(num, abi::RING_ALIGN),
                abi::vring_used_offset(num, abi::RING_ALIGN)
            ),
            "split ring of {num} entries"
        );
    }
}
