//! Where the tests find the project's programs, our QEMU, the card image
//! and vhost-device-vsock: one lookup for each.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace root above vop-bridge/test-support")
        .into()
}

/// A binary of the workspace from the same target directory and profile as
/// the running test or tool (`target/<profile>/<name>`). Panics, failing
/// the test, with what to build when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running test's path");
    // Tests live in <profile>/deps, tools in <profile>.
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build the workspace first (cargo build --workspace)",
            exe.display()
        )
    })
}

/// Our QEMU with the `mic-x100` device: `MIC_QEMU`, else
/// `build/qemu/bin/qemu-system-x86_64` in the workspace.
pub fn qemu() -> PathBuf {
    let p = std::env::var_os("MIC_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("build/qemu/bin/qemu-system-x86_64"));
    assert!(
        p.is_file(),
        "QEMU with the mic-x100 device is missing at {}: run scripts/build-qemu \
         (or set MIC_QEMU to its last output line)",
        p.display()
    );
    p
}

/// The card OS image: `MIC_CARD_DIR`, else `build/card`.
pub fn card_dir() -> PathBuf {
    let p = std::env::var_os("MIC_CARD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("build/card"));
    assert!(
        ["vmlinux", "vmlinuz", "initrd.img", "cmdline"]
            .iter()
            .all(|f| p.join(f).exists()),
        "{} has no card image: run scripts/build-card-image",
        p.display()
    );
    p
}

/// rust-vmm's vhost-device-vsock: `MIC_VSOCK`, else `build/vsock`, which
/// scripts/build-vsock installs.
pub fn vsock_backend() -> PathBuf {
    let p = std::env::var_os("MIC_VSOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("build/vsock/bin/vhost-device-vsock"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-vsock",
        p.display()
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_holds_the_workspace_manifest() {
        let m = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
        assert!(m.contains("[workspace]"));
    }
}
