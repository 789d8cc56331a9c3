//! A process micd runs for several cards at once: the card-to-card link's
//! hub (`link.rs`) and the vsock group's backend (`vsock_group.rs`).
//!
//! Such a process serves one socket per card. micd starts it before the
//! cards, or adopts the one an earlier micd left running (its pid file in
//! the state directory), and keeps it running: a thread starts it again
//! when it dies, and each card's side reconnects by itself. It outlives
//! micd, as the cards do.

use std::path::PathBuf;
use std::time::Duration;

use log::{error, info};

use super::layout::{private_dir, private_socket};
use super::process::{remove_stale, Proc, ProcError, ProcSpec};
use super::running::{wait_socket, StartError};

/// How often micd looks whether the process still runs.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// A shared process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// A card directory could not be created.
    #[error("cannot create {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("{what}")]
    Spawn {
        /// What the process is for.
        what: &'static str,
        /// Cause.
        #[source]
        source: ProcError,
    },
    /// The process exited or did not create its sockets in time (see its
    /// log).
    #[error("{what}")]
    Socket {
        /// What the process is for.
        what: &'static str,
        /// Cause.
        #[source]
        source: StartError,
    },
    /// The watcher thread could not be started.
    #[error("cannot start the watcher of {what}")]
    Thread {
        /// What the process is for.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// When a process an earlier micd left running is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopt {
    /// While it runs and all its sockets are there (a server whose sockets
    /// stay while clients are connected: the link's hub).
    WithSockets,
    /// While it runs (a vhost-user backend removes its socket once its
    /// frontend connected, and listens again when the frontend goes).
    Running,
}

/// Starts `spec` (`what` names it in messages), which creates `socks`, or
/// adopts the one an earlier micd left running (`adopt`), and keeps it
/// running.
pub fn keep_running(
    what: &'static str,
    spec: ProcSpec,
    socks: Vec<PathBuf>,
    adopt: Adopt,
) -> Result<(), SharedError> {
    for s in &socks {
        if let Some(dir) = s.parent() {
            private_dir(dir).map_err(|source| SharedError::Dir {
                path: dir.into(),
                source,
            })?;
        }
    }
    let spawn = |spec: &ProcSpec| {
        spec.spawn()
            .map_err(|source| SharedError::Spawn { what, source })
    };
    let mut proc = match spec.adopt() {
        Some(p) if adopt == Adopt::Running => p,
        Some(p) if socks.iter().all(|s| s.exists()) => p,
        adopted => {
            if let Some(mut p) = adopted {
                p.stop(Duration::from_secs(1));
            }
            socks.iter().for_each(|s| remove_stale(s));
            let mut p = spawn(&spec)?;
            wait_sockets(what, &socks, &mut p)?;
            p
        }
    };
    info!("{what}: pid {} for {} cards", proc.pid(), socks.len());
    std::thread::Builder::new()
        .name(spec.name.clone())
        .spawn(move || loop {
            std::thread::sleep(WATCH_PERIOD);
            if proc.alive() {
                continue;
            }
            socks.iter().for_each(|s| remove_stale(s));
            let restarted = proc
                .respawn()
                .map_err(|source| SharedError::Spawn { what, source })
                .and_then(|()| wait_sockets(what, &socks, &mut proc));
            match restarted {
                Ok(()) => info!("{what} restarted (pid {})", proc.pid()),
                Err(e) => error!("{}", super::report(&e)),
            }
        })
        .map_err(|source| SharedError::Thread { what, source })?;
    Ok(())
}

/// Waits for the process's sockets as for a card's processes'
/// (`running.rs`), and makes them the owner's alone.
fn wait_sockets(what: &'static str, socks: &[PathBuf], proc: &mut Proc) -> Result<(), SharedError> {
    for s in socks {
        wait_socket(s, proc).map_err(|source| SharedError::Socket { what, source })?;
        let _ = private_socket(s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mic_test_support::TempDir;
    use std::os::unix::net::UnixStream;

    fn spec(dir: &std::path::Path, script: &str) -> ProcSpec {
        ProcSpec {
            name: "shared-test".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            log: dir.join("shared.log"),
            pidfile: dir.join("shared.pid"),
            env: Vec::new(),
        }
    }

    #[test]
    fn a_process_that_creates_no_socket_is_an_error() {
        let t = TempDir::new("micd-shared");
        let d = t.path();
        let e = keep_running(
            "nothing",
            spec(d, "exit 3"),
            vec![d.join("a/x.sock")],
            Adopt::WithSockets,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            SharedError::Socket {
                what: "nothing",
                ..
            }
        ));
        // The sockets' directories were made private.
        let mode = std::fs::metadata(d.join("a")).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
    }

    #[test]
    fn a_dead_process_is_started_again() {
        let t = TempDir::new("micd-shared");
        let d = t.path();
        let sock = d.join("s.sock");
        // Listens for one connection (for 10 s at most, so that nothing
        // outlives the test), then exits: the watcher must start it again.
        let script = format!(
            "exec python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); \
             s.settimeout(10); s.bind(\"{0}\"); s.listen(); s.accept()'",
            sock.display()
        );
        keep_running(
            "once",
            spec(d, &script),
            vec![sock.clone()],
            Adopt::WithSockets,
        )
        .unwrap();
        let first = std::fs::read_to_string(d.join("shared.pid")).unwrap();
        UnixStream::connect(&sock).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let now = std::fs::read_to_string(d.join("shared.pid")).unwrap_or_default();
            if now != first && !now.is_empty() && UnixStream::connect(&sock).is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "not restarted");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
