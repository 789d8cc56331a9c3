//! The state directory: micd's socket and one directory per card with its
//! sockets, pid files, logs and created disk images (`docs/micd.md`,
//! "State directory"). Directories are 0700, sockets 0600.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// micd's default state directory: `$XDG_RUNTIME_DIR/micd`, or
/// `/run/micd` for root (or when `XDG_RUNTIME_DIR` is unset).
pub fn default_state_dir() -> PathBuf {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !root && !d.is_empty() => PathBuf::from(d).join("micd"),
        _ => PathBuf::from("/run/micd"),
    }
}

/// micd's control socket in a state directory.
pub fn control_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("micd.sock")
}

/// The default control socket `micctl` uses: `MIC_SOCKET`, else the one in
/// [`default_state_dir`].
pub fn default_control_socket() -> PathBuf {
    std::env::var_os("MIC_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| control_socket(&default_state_dir()))
}

/// Creates `dir` (and its parents) with mode 0700, and makes it 0700 if it
/// exists.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Restricts a socket file to its owner.
pub fn private_socket(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// The file name of a backend's stats socket in its card's directory,
/// beside its vhost-user socket (`micctl stats` finds it there).
pub fn stats_socket_name(backend: &str) -> String {
    format!("stats-{backend}.sock")
}

/// The files of one card, in `<state-dir>/micN/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardDir {
    dir: PathBuf,
}

impl CardDir {
    /// The directory of card `name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> Self {
        CardDir {
            dir: state_dir.join(name),
        }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// QEMU's `mic-x100` chardev socket.
    pub fn device_socket(&self) -> PathBuf {
        self.file("dev.sock")
    }

    /// QEMU's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.file("qmp.sock")
    }

    /// The initramfs a card with an overlay boots: the image's with the
    /// overlay appended, written at each boot (`overlay.rs`).
    pub fn overlay_initrd(&self) -> PathBuf {
        self.file("initrd-overlay.img")
    }

    /// The bridge's control socket.
    pub fn bridge_socket(&self) -> PathBuf {
        self.file("bridge.sock")
    }

    /// The vhost-user socket of a backend (`console`, `blk0`, `net`).
    pub fn vhost_socket(&self, backend: &str) -> PathBuf {
        self.file(&format!("vhost-{backend}.sock"))
    }

    /// The stats socket of a backend (`blk0`, `net`, `link`): per-queue
    /// stats and run-time rate limits (`backends/README.md`, "Stats").
    pub fn stats_socket(&self, backend: &str) -> PathBuf {
        self.file(&stats_socket_name(backend))
    }

    /// The card's console as a unix socket (`mic-console --unix`).
    pub fn console_socket(&self) -> PathBuf {
        self.file("console.sock")
    }

    /// The vsock backend's host-side socket (`uds-path`): host programs
    /// connect to card ports through it (`CONNECT <port>`), and card
    /// programs reach host services listening at `<it>_<port>`.
    pub fn vsock_uds(&self) -> PathBuf {
        self.file("vsock.uds")
    }

    /// The card's end of the card-to-card link (created by micd's link hub,
    /// `link.rs`).
    pub fn link_socket(&self) -> PathBuf {
        self.file("link.sock")
    }

    /// passt's socket.
    pub fn passt_socket(&self) -> PathBuf {
        self.file("passt.sock")
    }

    /// Everything the card wrote on its serial port, across boots.
    pub fn serial_log(&self) -> PathBuf {
        self.file("serial.log")
    }

    /// Everything the card wrote on its virtio console, across boots.
    pub fn console_log(&self) -> PathBuf {
        self.file("console.log")
    }

    /// A process's log.
    pub fn log(&self, process: &str) -> PathBuf {
        self.file(&format!("{process}.log"))
    }

    /// A process's pid file.
    pub fn pidfile(&self, process: &str) -> PathBuf {
        self.file(&format!("{process}.pid"))
    }

    /// A disk image micd creates.
    pub fn disk_image(&self, index: usize) -> PathBuf {
        self.file(&format!("disk{index}.img"))
    }

    /// What micd remembers about a running card (its config and boot).
    pub fn record(&self) -> PathBuf {
        self.file("card.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_files() {
        let c = CardDir::new(Path::new("/run/micd"), "mic1");
        assert_eq!(c.device_socket(), Path::new("/run/micd/mic1/dev.sock"));
        assert_eq!(
            c.vhost_socket("blk0"),
            Path::new("/run/micd/mic1/vhost-blk0.sock")
        );
        assert_eq!(c.pidfile("qemu"), Path::new("/run/micd/mic1/qemu.pid"));
        assert_eq!(control_socket(Path::new("/s")), Path::new("/s/micd.sock"));
    }

    #[test]
    fn private_dirs() {
        let d = std::env::temp_dir().join(format!("micd-layout-{}", std::process::id()));
        let inner = d.join("a/b");
        private_dir(&inner).unwrap();
        let mode = std::fs::metadata(&inner).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&inner).unwrap();
        let mode = std::fs::metadata(&inner).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
