//! `--print-capabilities`, one of the vhost-user backend program
//! conventions (QEMU `docs/interop/vhost-user.rst`, "Backend program
//! conventions"; the JSON is `@VHostUserBackendCapabilities` of
//! `docs/interop/vhost-user.json`).
//!
//! The option prints the daemon's type and the spec's features it supports
//! as one JSON object on stdout and exits 0. "Other options and arguments
//! should be ignored", so it is looked for before the command line is
//! parsed ([`print_if_requested`]): `mic-blk --print-capabilities` works
//! without `--image`.
//!
//! The schema is a union on `type`: only the types with a branch of their
//! own (`block`, `input`, `gpu` in QEMU 10.0) carry a `features` list; for
//! any other type (`net`, `console`) the object has `type` alone, as QEMU's
//! own `vhost-user-scsi` prints it.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;

/// `@VHostUserBackendType` of `vhost-user.json`: the types our daemons are
/// (the schema has more; only these are used here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendType {
    /// `block`: virtio block (`mic-blk`).
    Block,
    /// `net`: virtio net (`mic-net`).
    Net,
    /// `console`: virtio console (`mic-console`).
    Console,
}

impl BackendType {
    /// The features `vhost-user.json` defines for this type
    /// (`@VHostUserBackendBlockFeature`); `None` for a type whose
    /// capabilities have no `features` member.
    pub fn spec_features(self) -> Option<&'static [&'static str]> {
        match self {
            BackendType::Block => Some(&["read-only", "blk-file"]),
            BackendType::Net | BackendType::Console => None,
        }
    }
}

/// What a daemon prints for `--print-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// The backend's type.
    #[serde(rename = "type")]
    kind: BackendType,
    /// The spec's features of `kind` the daemon supports (its command line
    /// options of those names); absent for types without features.
    #[serde(skip_serializing_if = "Option::is_none")]
    features: Option<Vec<&'static str>>,
}

impl Capabilities {
    /// The capabilities of a daemon of type `kind` supporting `features`.
    ///
    /// # Panics
    /// If a feature is not one the spec lists for `kind`: that is a bug in
    /// the daemon, caught by its tests.
    pub fn new(kind: BackendType, features: &[&'static str]) -> Capabilities {
        let features = match kind.spec_features() {
            Some(spec) => {
                for f in features {
                    assert!(spec.contains(f), "{f:?} is not a {kind:?} feature");
                }
                Some(features.to_vec())
            }
            None => {
                assert!(features.is_empty(), "{kind:?} has no features");
                None
            }
        };
        Capabilities { kind, features }
    }

    /// The backend's type.
    pub fn kind(&self) -> BackendType {
        self.kind
    }

    /// The JSON text (pretty-printed, ending in a newline).
    pub fn to_json(&self) -> String {
        // Serialising a struct of strings cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Whether the command line `args` (without the program name) asks for
/// `--print-capabilities`. Arguments after `--` do not count.
pub fn requested<I>(args: I) -> bool
where
    I: IntoIterator<Item = OsString>,
{
    args.into_iter()
        .take_while(|a| a != "--")
        .any(|a| a == "--print-capabilities")
}

/// If this process's command line asks for `--print-capabilities`, prints
/// `caps` on stdout and returns the exit status (0, or failure when stdout
/// cannot be written); otherwise `None` and the daemon goes on. Call it
/// first thing in `main`, before parsing the command line.
pub fn print_if_requested(name: &str, caps: &Capabilities) -> Option<ExitCode> {
    if !requested(std::env::args_os().skip(1)) {
        return None;
    }
    let mut out = std::io::stdout().lock();
    Some(
        match out
            .write_all(caps.to_json().as_bytes())
            .and_then(|()| out.flush())
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => crate::fail(name, format_args!("cannot write the capabilities: {e}")),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn block_has_features() {
        let c = Capabilities::new(BackendType::Block, &["read-only", "blk-file"]);
        let v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "block", "features": ["read-only", "blk-file"]})
        );
    }

    #[test]
    fn net_and_console_have_only_a_type() {
        for (k, name) in [(BackendType::Net, "net"), (BackendType::Console, "console")] {
            let v: serde_json::Value =
                serde_json::from_str(&Capabilities::new(k, &[]).to_json()).unwrap();
            assert_eq!(v, serde_json::json!({ "type": name }));
        }
    }

    #[test]
    #[should_panic(expected = "not a Block feature")]
    fn unknown_feature_is_a_bug() {
        Capabilities::new(BackendType::Block, &["discard"]);
    }

    #[test]
    #[should_panic(expected = "has no features")]
    fn features_for_a_type_without_is_a_bug() {
        Capabilities::new(BackendType::Net, &["read-only"]);
    }

    #[test]
    fn requested_anywhere_before_double_dash() {
        assert!(requested(os(&["--print-capabilities"])));
        assert!(requested(os(&["--image", "x", "--print-capabilities"])));
        assert!(!requested(os(&["--image", "x"])));
        assert!(!requested(os(&["--", "--print-capabilities"])));
        assert!(!requested(os(&["--print-capabilities=1"])));
    }
}
