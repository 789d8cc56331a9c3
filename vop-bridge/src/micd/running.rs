//! The processes of one running card: started in order from a
//! [`CardPlan`] (each waited for through the socket it creates), adopted
//! from an earlier micd, restarted when a helper dies, and stopped QEMU
//! first (`docs/micd.md`, "Processes").

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{error, warn};

use super::launch::CardPlan;
use super::layout::private_socket;
use super::overlay::{assemble, OverlayError};
use super::process::{remove_stale, Proc, ProcError, ProcSpec};

/// How long a process's socket may take to appear.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a socket that a backend outside the card's processes creates
/// may be missing at the card's start.
const EXTERNAL_SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU gets to exit after SIGTERM before SIGKILL.
const QEMU_GRACE: Duration = Duration::from_secs(10);
/// How long a backend or the bridge gets after SIGTERM.
const HELPER_GRACE: Duration = Duration::from_secs(3);

/// Starting a card failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A disk image could not be created.
    #[error("cannot create the disk image {path}")]
    Image {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs with the card's overlay could not be made.
    #[error("cannot add the overlay to the initramfs")]
    Overlay(#[source] OverlayError),
    /// A process could not be started.
    #[error("{name}")]
    Spawn {
        /// The process.
        name: String,
        /// Cause.
        #[source]
        source: ProcError,
    },
    /// The socket of a backend the user runs is not there.
    #[error("no vhost-user backend listens at {0} (a [[device]] of the card's config)")]
    NoExternalSocket(PathBuf),
    /// A process exited before creating its socket.
    #[error("{name} exited at start (see {name}.log)")]
    Exited {
        /// The process.
        name: String,
    },
    /// A process did not create its socket in time.
    #[error("{name} did not create {path} in time")]
    NoSocket {
        /// The process.
        name: String,
        /// The socket.
        path: PathBuf,
    },
}

/// A running card's processes and the plan they were started from.
pub struct RunningCard {
    plan: CardPlan,
    backends: Vec<Proc>,
    qemu: Option<Proc>,
    bridge: Option<Proc>,
}

/// Waits until `proc` creates `path`, failing early if it exits.
pub(super) fn wait_socket(path: &Path, proc: &mut Proc) -> Result<(), StartError> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !path.exists() {
        let name = proc.spec().name.clone();
        if !proc.alive() {
            return Err(StartError::Exited { name });
        }
        if Instant::now() > deadline {
            return Err(StartError::NoSocket {
                name,
                path: path.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn spawn(spec: &ProcSpec) -> Result<Proc, StartError> {
    spec.spawn().map_err(|source| StartError::Spawn {
        name: spec.name.clone(),
        source,
    })
}

impl RunningCard {
    /// Starts the card: creates missing disk images and the initramfs with
    /// the overlay (anew at each boot, so changes to the overlay count), then the backends,
    /// QEMU and the bridge, each once the one before has its socket. On
    /// failure what did start is returned too, for the caller to stop.
    pub fn start(plan: CardPlan) -> (Self, Result<(), StartError>) {
        let mut card = RunningCard {
            plan,
            backends: Vec::new(),
            qemu: None,
            bridge: None,
        };
        let r = card.start_all();
        if r.is_ok() {
            card.secure_sockets();
        }
        (card, r)
    }

    fn start_all(&mut self) -> Result<(), StartError> {
        let plan = self.plan.clone();
        for (path, mib) in &plan.disks {
            if !path.exists() {
                let image = |source| StartError::Image {
                    path: path.clone(),
                    source,
                };
                let f = std::fs::File::create(path).map_err(image)?;
                f.set_len(mib << 20).map_err(image)?;
            }
        }
        // A backend serving several cards, or one the user restarts, may be
        // listening again only a moment after the card's last boot let go.
        let deadline = Instant::now() + EXTERNAL_SOCKET_TIMEOUT;
        for s in &plan.external_sockets {
            while !s.metadata().is_ok_and(|m| m.file_type().is_socket()) {
                if Instant::now() > deadline {
                    return Err(StartError::NoExternalSocket(s.clone()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(o) = &plan.overlay {
            assemble(&plan.ramdisk, &o.source, &o.initrd).map_err(StartError::Overlay)?;
        }
        plan.all_sockets().iter().for_each(|s| remove_stale(s));
        for (spec, sock) in plan.backends.iter().zip(&plan.backend_sockets) {
            let mut p = spawn(spec)?;
            let r = wait_socket(sock, &mut p);
            self.backends.push(p);
            r?;
        }
        let mut qemu = spawn(&plan.qemu)?;
        let r = wait_socket(&plan.device_socket, &mut qemu);
        self.qemu = Some(qemu);
        r?;
        let mut bridge = spawn(&plan.bridge)?;
        let r = wait_socket(&plan.bridge_socket, &mut bridge);
        self.bridge = Some(bridge);
        r
    }

    /// Adopts a card an earlier micd started, if its QEMU still runs;
    /// starts helpers that are missing.
    pub fn adopt(plan: CardPlan) -> Option<Self> {
        let qemu = plan.qemu.adopt()?;
        let bridge = plan.bridge.adopt();
        let mut backends = Vec::new();
        for spec in &plan.backends {
            match spec.adopt().map(Ok).unwrap_or_else(|| spawn(spec)) {
                Ok(p) => backends.push(p),
                Err(e) => error!("{}", super::report(&e)),
            }
        }
        Some(RunningCard {
            plan,
            backends,
            qemu: Some(qemu),
            bridge,
        })
    }

    /// Stops what an interrupted stop left of a card whose QEMU is gone.
    pub fn stop_leftovers(plan: &CardPlan) {
        for spec in plan.backends.iter().chain([&plan.bridge]) {
            if let Some(mut p) = spec.adopt() {
                p.stop(HELPER_GRACE);
            }
        }
    }

    /// The plan the card runs with.
    pub fn plan(&self) -> &CardPlan {
        &self.plan
    }

    /// Stops QEMU, then the bridge and the backends. False if QEMU does
    /// not go away (it is kept, for another try).
    pub fn stop(&mut self) -> bool {
        let mut ok = true;
        if let Some(mut q) = self.qemu.take() {
            if !q.stop(QEMU_GRACE) {
                error!("QEMU (pid {}) does not exit", q.pid());
                ok = false;
                self.qemu = Some(q);
            }
        }
        if let Some(mut b) = self.bridge.take() {
            b.stop(HELPER_GRACE);
        }
        while let Some(mut p) = self.backends.pop() {
            p.stop(HELPER_GRACE);
        }
        ok
    }

    /// Whether the card's machine still runs.
    pub fn machine_alive(&mut self) -> bool {
        self.qemu.as_mut().is_some_and(Proc::alive)
    }

    /// Starts every backend and the bridge that died again; returns the
    /// names of those restarted.
    pub fn restart_dead_helpers(&mut self) -> Vec<String> {
        let mut restarted = Vec::new();
        for p in self.backends.iter_mut().chain(self.bridge.as_mut()) {
            if p.alive() {
                continue;
            }
            let name = p.spec().name.clone();
            warn!("{name} (pid {}) died; starting it again", p.pid());
            match p.respawn() {
                Ok(()) => restarted.push(name),
                Err(e) => error!("{name}: {}", super::report(&e)),
            }
        }
        if !restarted.is_empty() {
            self.secure_sockets();
        }
        restarted
    }

    /// Makes the card's sockets 0600 (those that exist).
    pub fn secure_sockets(&self) {
        use std::os::unix::fs::PermissionsExt;
        for s in self.plan.all_sockets() {
            let open = std::fs::metadata(&s).is_ok_and(|m| m.permissions().mode() & 0o177 != 0);
            if open {
                let _ = private_socket(&s);
            }
        }
    }

    /// A backend's pid and restarts.
    pub fn backend(&self, name: &str) -> Option<(u32, u32)> {
        self.backends
            .iter()
            .find(|p| p.spec().name == name)
            .map(|p| (p.pid(), p.restarts))
    }

    /// QEMU's pid.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(Proc::pid)
    }

    /// The bridge's pid and restarts.
    pub fn bridge(&self) -> Option<(u32, u32)> {
        self.bridge.as_ref().map(|p| (p.pid(), p.restarts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::micd::config::{CardConfig, NetMode};
    use crate::micd::launch::{Shared, Tools};
    use crate::micd::layout::CardDir;

    /// A plan for a card with a console and no network whose programs are
    /// shells that create the socket they are waited for and sleep.
    fn fake_plan(state: &std::path::Path, console_exits: bool) -> CardPlan {
        let tools = Tools {
            qemu: "/bin/sh".into(),
            bin_dir: "/nonexistent".into(),
            image_dir: state.into(),
            passt: "passt".into(),
            vsock: "/nonexistent/vsock".into(),
            root: false,
        };
        let cfg = CardConfig {
            net: NetMode::None,
            ..Default::default()
        };
        let dir = CardDir::new(state, "mic0");
        std::fs::create_dir_all(dir.dir()).unwrap();
        let mut plan = CardPlan::new("mic0", 0, &cfg, &dir, &tools, "", Shared::default());
        let fake = |spec: &mut ProcSpec, sock: &PathBuf, exits: bool| {
            let script = if exits {
                "exit 3".to_string()
            } else {
                format!("touch '{}'; sleep 30; :", sock.display())
            };
            spec.program = "/bin/sh".into();
            // The card's directory stays in the arguments (adoption checks it).
            spec.args = vec!["-c".into(), script.into(), dir.dir().into()];
        };
        let socks = plan.backend_sockets.clone();
        for (i, (spec, sock)) in plan.backends.iter_mut().zip(&socks).enumerate() {
            fake(spec, sock, console_exits && i == 0);
        }
        let (d, b) = (plan.device_socket.clone(), plan.bridge_socket.clone());
        fake(&mut plan.qemu, &d, false);
        fake(&mut plan.bridge, &b, false);
        plan
    }

    fn tmp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("micd-running-{tag}-{}", std::process::id()))
    }

    #[test]
    fn start_restart_adopt_stop() {
        let state = tmp("a");
        let plan = fake_plan(&state, false);
        let (mut card, r) = RunningCard::start(plan.clone());
        r.unwrap();
        assert!(card.machine_alive());
        assert_eq!(std::fs::metadata(&plan.disks[0].0).unwrap().len(), 1 << 30);
        let (blk, _) = card.backend("blk0").unwrap();
        // SAFETY: kill(2) on the process group (session) of a shell this
        // test started, so its sleep goes too.
        unsafe { libc::kill(-(blk as i32), libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(card.restart_dead_helpers(), ["blk0"]);
        let (blk2, restarts) = card.backend("blk0").unwrap();
        assert_ne!(blk2, blk);
        assert_eq!(restarts, 1);
        // Another micd finds the same processes.
        let adopted = RunningCard::adopt(plan.clone()).expect("adopted");
        assert_eq!(adopted.qemu_pid(), card.qemu_pid());
        assert_eq!(adopted.backend("blk0").map(|b| b.0), Some(blk2));
        assert!(card.stop());
        assert!(!card.machine_alive());
        assert!(RunningCard::adopt(plan).is_none());
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn the_overlay_is_appended_at_start_and_a_missing_one_starts_nothing() {
        let state = tmp("o");
        let mut plan = fake_plan(&state, false);
        std::fs::write(&plan.ramdisk, b"base").unwrap();
        let overlay = state.join("overlay");
        std::fs::create_dir_all(&overlay).unwrap();
        std::fs::write(overlay.join("hello"), b"hi").unwrap();
        plan.overlay = Some(crate::micd::launch::OverlayPlan {
            source: overlay.clone(),
            initrd: state.join("mic0/initrd-overlay.img"),
        });
        let (mut card, r) = RunningCard::start(plan.clone());
        r.unwrap();
        let initrd = std::fs::read(state.join("mic0/initrd-overlay.img")).unwrap();
        assert_eq!(&initrd[..4], b"base");
        assert_eq!(&initrd[512..518], b"070701");
        assert!(card.stop());

        std::fs::remove_dir_all(&overlay).unwrap();
        let (mut card, r) = RunningCard::start(plan);
        assert!(matches!(r, Err(StartError::Overlay(_))));
        assert_eq!((card.qemu_pid(), card.backend("console")), (None, None));
        assert!(card.stop());
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn a_backend_that_exits_fails_the_start() {
        let state = tmp("b");
        let (mut card, r) = RunningCard::start(fake_plan(&state, true));
        assert!(matches!(r, Err(StartError::Exited { name }) if name == "console"));
        assert_eq!(card.qemu_pid(), None);
        assert!(card.stop());
        std::fs::remove_dir_all(&state).unwrap();
    }
}
