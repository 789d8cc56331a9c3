//! The vhost-user backend program conventions, from the test's side (QEMU
//! `docs/interop/vhost-user.rst`, "Backend program conventions", and the
//! schema `docs/interop/vhost-user.json`, QEMU 10.0):
//!
//! - [`check_capabilities`]: a `--print-capabilities` output checked
//!   against the schema, independently of the daemons' own code;
//! - [`check_descriptor`]: an installed `@VhostUserBackend` descriptor file;
//! - [`spawn_with_fd`]: a daemon started on a listening socket the test
//!   bound, passed as descriptor N (`--fd N`), as libvirt starts it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::process::Process;

/// `@VHostUserBackendType`: every type the schema defines.
pub const SPEC_TYPES: &[&str] = &[
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];

/// The features the schema defines per type: `@VHostUserBackendBlockFeature`,
/// `...InputFeature`, `...GPUFeature`. A type not listed has none, and its
/// capabilities carry no `features` member.
pub fn spec_features(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "block" => Some(&["read-only", "blk-file"]),
        "input" => Some(&["evdev-path", "no-grab"]),
        "gpu" => Some(&["render-node", "virgl"]),
        _ => None,
    }
}

/// A `--print-capabilities` output that passed [`check_capabilities`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// `type`.
    pub kind: String,
    /// `features` (empty when absent).
    pub features: Vec<String>,
}

/// Checks `stdout` of `--print-capabilities` against
/// `@VHostUserBackendCapabilities`: one JSON object (and nothing else);
/// `type` is one of [`SPEC_TYPES`]; `features`, only for a type with
/// features of its own, is a list of distinct names from that type's list;
/// no other member.
pub fn check_capabilities(stdout: &[u8]) -> Result<Capabilities, String> {
    let v: Value = serde_json::from_slice(stdout).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let kind = obj
        .get("type")
        .ok_or("no \"type\"")?
        .as_str()
        .ok_or("\"type\" is not a string")?;
    if !SPEC_TYPES.contains(&kind) {
        return Err(format!("type {kind:?} is not a VHostUserBackendType"));
    }
    let allowed = spec_features(kind);
    for key in obj.keys() {
        let known = key == "type" || key == "features" && allowed.is_some();
        if !known {
            return Err(format!("unknown member {key:?} for type {kind:?}"));
        }
    }
    let mut features = Vec::new();
    if let (Some(list), Some(allowed)) = (obj.get("features"), allowed) {
        for f in list.as_array().ok_or("\"features\" is not a list")? {
            let f = f.as_str().ok_or("a feature is not a string")?;
            if !allowed.contains(&f) {
                return Err(format!("{f:?} is not a {kind} feature"));
            }
            if features.iter().any(|g| g == f) {
                return Err(format!("{f:?} listed twice"));
            }
            features.push(f.to_string());
        }
    }
    Ok(Capabilities {
        kind: kind.to_string(),
        features,
    })
}

/// A descriptor file that passed [`check_descriptor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `description`.
    pub description: String,
    /// `type`.
    pub kind: String,
    /// `binary`.
    pub binary: PathBuf,
    /// `tags` (empty when absent).
    pub tags: Vec<String>,
}

/// Checks the file at `path` against `@VhostUserBackend`: a JSON object with
/// the strings `description`, `type` (one of [`SPEC_TYPES`]) and `binary`
/// (an absolute path to an existing executable file), optionally `tags` (a
/// list of strings), and no other member.
pub fn check_descriptor(path: &Path) -> Result<Descriptor, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    for key in obj.keys() {
        if !["description", "type", "binary", "tags"].contains(&key.as_str()) {
            return Err(format!("unknown member {key:?}"));
        }
    }
    let string = |k: &str| -> Result<String, String> {
        obj.get(k)
            .ok_or(format!("no {k:?}"))?
            .as_str()
            .map(str::to_string)
            .ok_or(format!("{k:?} is not a string"))
    };
    let kind = string("type")?;
    if !SPEC_TYPES.contains(&kind.as_str()) {
        return Err(format!("type {kind:?} is not a VHostUserBackendType"));
    }
    let binary = PathBuf::from(string("binary")?);
    if !binary.is_absolute() {
        return Err(format!("binary {} is not absolute", binary.display()));
    }
    let meta = std::fs::metadata(&binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("binary {} is not an executable", binary.display()));
    }
    let tags = match obj.get("tags") {
        None => Vec::new(),
        Some(t) => t
            .as_array()
            .ok_or("\"tags\" is not a list")?
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or("a tag is not a string")
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Descriptor {
        description: string("description")?,
        kind,
        binary,
        tags,
    })
}

/// Runs `bin --print-capabilities` plus `extra` arguments and checks it
/// exits 0; returns its stdout.
pub fn print_capabilities(bin: &Path, extra: &[&str]) -> Vec<u8> {
    let out = Command::new(bin)
        .arg("--print-capabilities")
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} --print-capabilities: {}",
        bin.display(),
        out.status
    );
    out.stdout
}

/// Starts `bin` with `args` followed by `--fd N`, descriptor `N` being
/// `listener` (stdout and stderr to `log`). The listener stays open in the
/// test too, as it would in a management process.
pub fn spawn_with_fd(
    bin: &Path,
    args: &[&str],
    listener: &UnixListener,
    n: RawFd,
    log: &Path,
) -> Process {
    let src = listener.as_raw_fd();
    let mut cmd = Command::new(bin);
    cmd.args(args).arg("--fd").arg(n.to_string());
    // SAFETY: the closure only calls dup2 and fcntl, which are
    // async-signal-safe, on descriptors the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            if src == n {
                // dup2 onto itself keeps FD_CLOEXEC: clear it instead.
                if libc::fcntl(n, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(src, n) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Process::spawn(&mut cmd, log)
}

/// Runs `scripts/install-vhost-user-descriptors` with a temporary prefix,
/// copying the daemons from `bin`'s directory, and checks the descriptor of
/// `bin` it wrote (`share/qemu/vhost-user/50-NAME.json`): valid
/// ([`check_descriptor`]), its binary the installed copy under the prefix,
/// and that copy's `--print-capabilities` of the descriptor's type.
pub fn install_and_check(bin: &Path) -> Descriptor {
    let prefix = crate::temp::TempDir::new("install");
    let script = crate::paths::workspace().join("scripts/install-vhost-user-descriptors");
    let out = Command::new(&script)
        .arg("--prefix")
        .arg(prefix.path())
        .arg("--from")
        .arg(bin.parent().expect("a directory"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "install script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = bin.file_name().unwrap().to_str().unwrap();
    let file = prefix.join(format!("share/qemu/vhost-user/50-{name}.json"));
    let d = check_descriptor(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert_eq!(d.binary, prefix.join(format!("libexec/mic-emu/{name}")));
    let caps = check_capabilities(&print_capabilities(&d.binary, &[])).unwrap();
    assert_eq!(caps.kind, d.kind, "descriptor and capabilities agree");
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_rules() {
        let ok = check_capabilities(br#"{"type":"block","features":["read-only"]}"#).unwrap();
        assert_eq!(ok.kind, "block");
        assert_eq!(ok.features, ["read-only"]);
        assert!(check_capabilities(br#"{"type":"net"}"#).is_ok());
        for bad in [
            &br#"{"type":"block-device"}"#[..],
            br#"{"type":"net","features":[]}"#,
            br#"{"type":"block","features":["discard"]}"#,
            br#"{"type":"block","features":["blk-file","blk-file"]}"#,
            br#"{"type":"block","extra":1}"#,
            br#"{"features":[]}"#,
            br#"["type"]"#,
            br#"{"type":"net"} x"#,
        ] {
            assert!(
                check_capabilities(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn descriptor_rules() {
        let d = crate::temp::TempDir::new("descriptor");
        let bin = "/bin/sh";
        let plain = d.join("plain");
        std::fs::write(&plain, b"not a program").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let write = |text: String| {
            let p = d.join("50-x.json");
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = write(format!(
            r#"{{"description":"d","type":"block","binary":"{bin}","tags":["t"]}}"#
        ));
        let ok = check_descriptor(&good).unwrap();
        assert_eq!(ok.binary, PathBuf::from(bin));
        assert_eq!(ok.tags, ["t"]);
        for bad in [
            r#"{"description":"d","type":"block","binary":"sh"}"#.to_string(),
            r#"{"description":"d","type":"block","binary":"/nonexistent/x"}"#.to_string(),
            format!(r#"{{"description":"d","type":"disk","binary":"{bin}"}}"#),
            format!(r#"{{"type":"block","binary":"{bin}"}}"#),
            format!(r#"{{"description":"d","type":"block","binary":"{bin}","x":1}}"#),
            format!(
                r#"{{"description":"d","type":"block","binary":"{}"}}"#,
                plain.display()
            ),
        ] {
            let p = write(bad.clone());
            assert!(check_descriptor(&p).is_err(), "{bad}");
        }
    }
}
