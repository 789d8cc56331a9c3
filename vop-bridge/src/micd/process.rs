//! A card's processes (QEMU, the bridge, the backends, passt), started in
//! sessions of their own so they outlive micd, with a pid file each so a
//! new micd can adopt them.
//!
//! `std::process::Child` covers our own children; an adopted process is
//! known by its pid alone and checked through `/proc` (neither vmm-sys-util
//! nor std adopts a process that is not a child, hence the few libc calls).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use log::{debug, warn};

/// How to start one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcSpec {
    /// Short name (`qemu`, `bridge`, `console`, `blk0`, `net`, `passt`).
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Where its stdout and stderr go (appended).
    pub log: PathBuf,
    /// Its pid file.
    pub pidfile: PathBuf,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// Starting a process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The log file could not be opened.
    #[error("cannot open {path}")]
    Log {
        /// The log.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running (or once running) process of a card.
#[derive(Debug)]
pub struct Proc {
    spec: ProcSpec,
    pid: u32,
    child: Option<Child>,
    /// How many times micd started it again after it died.
    pub restarts: u32,
}

impl ProcSpec {
    /// Starts the process in a new session with every signal unblocked and
    /// writes its pid file.
    pub fn spawn(&self) -> Result<Proc, ProcError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| ProcError::Log {
                path: self.log.clone(),
                source,
            })?;
        let err = log.try_clone().map_err(|source| ProcError::Log {
            path: self.log.clone(),
            source,
        })?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (setsid, sigemptyset,
        // sigprocmask) on its own stack.
        unsafe {
            cmd.pre_exec(|| {
                // Its own session: signals aimed at micd's terminal or
                // process group do not reach the card.
                libc::setsid();
                // micd blocks SIGINT/SIGTERM for its signalfd; children
                // must not inherit that mask.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ProcError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let pid = child.id();
        if let Err(e) = std::fs::write(&self.pidfile, format!("{pid}\n")) {
            warn!("cannot write {}: {e}", self.pidfile.display());
        }
        debug!("started {} (pid {pid})", self.name);
        Ok(Proc {
            spec: self.clone(),
            pid,
            child: Some(child),
            restarts: 0,
        })
    }

    /// Adopts the process its pid file names if it is alive, runs this
    /// spec's program and names the card's directory in its arguments (so
    /// a reused pid is never taken for it, while a card started with
    /// other settings is still found).
    pub fn adopt(&self) -> Option<Proc> {
        let pid: u32 = std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let p = Proc {
            spec: self.clone(),
            pid,
            child: None,
            restarts: 0,
        };
        p.adopted_alive().then_some(p)
    }
}

/// The command line of a live, non-zombie process.
fn proc_argv(pid: u32) -> Option<Vec<OsString>> {
    use std::os::unix::ffi::OsStringExt;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args: Vec<OsString> = raw
        .split(|b| *b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    if raw.last() == Some(&0) {
        args.pop();
    }
    (!args.is_empty()).then_some(args)
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it was started.
    pub fn spec(&self) -> &ProcSpec {
        &self.spec
    }

    fn adopted_alive(&self) -> bool {
        let Some(argv) = proc_argv(self.pid) else {
            return false;
        };
        let dir = self.spec.pidfile.parent().unwrap_or(Path::new("/"));
        let dir = dir.as_os_str().as_encoded_bytes();
        let program = |p: &Path| p.file_name().map(|n| n.to_owned());
        program(Path::new(&argv[0])) == program(&self.spec.program)
            && argv[1..]
                .iter()
                .any(|a| a.as_encoded_bytes().windows(dir.len()).any(|w| w == dir))
    }

    /// Whether it still runs (reaps it if it is our child and exited).
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self.adopted_alive(),
        }
    }

    /// Signals the process's whole process group (its session: whatever
    /// it started goes too).
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the group of a pid we started with setsid or
        // verified through /proc; no memory is involved.
        unsafe { libc::kill(-(self.pid as libc::pid_t), sig) };
    }

    /// Waits up to `timeout` for it to exit.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`. Returns whether it is
    /// gone (a process stuck in the kernel may not be).
    pub fn stop(&mut self, grace: Duration) -> bool {
        if self.alive() {
            self.signal(libc::SIGTERM);
            if !self.wait_exit(grace) {
                warn!(
                    "{} (pid {}) ignored SIGTERM; killing it",
                    self.spec.name, self.pid
                );
                self.signal(libc::SIGKILL);
                if !self.wait_exit(Duration::from_secs(5)) {
                    return false;
                }
            }
        }
        let _ = std::fs::remove_file(&self.spec.pidfile);
        true
    }

    /// Starts it again with the same spec (after it died).
    pub fn respawn(&mut self) -> Result<(), ProcError> {
        let mut fresh = self.spec.spawn()?;
        fresh.restarts = self.restarts + 1;
        *self = fresh;
        Ok(())
    }
}

/// Removes a file that may not exist.
pub fn remove_stale(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("cannot remove {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell that sleeps `secs` and names `dir` in its arguments, as a
    /// card's processes name their directory.
    fn spec(dir: &Path, secs: &str) -> ProcSpec {
        let script = format!("sleep {secs}; :");
        ProcSpec {
            name: "sleep".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into(), dir.join("marker").into()],
            log: dir.join("sleep.log"),
            pidfile: dir.join("sleep.pid"),
            env: vec![],
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("micd-proc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn spawn_adopt_stop() {
        let d = tmp("a");
        let s = spec(&d, "30");
        let mut p = s.spawn().unwrap();
        assert!(p.alive());
        let pid: u32 = std::fs::read_to_string(&s.pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, p.pid());
        // Another micd finds it by its pid file and arguments...
        let mut adopted = s.adopt().expect("adopted");
        assert_eq!(adopted.pid(), p.pid());
        assert!(adopted.alive());
        // ...even with other settings, but not for another directory (a
        // reused pid).
        assert!(spec(&d, "31").adopt().is_some());
        let other = tmp("other");
        let elsewhere = spec(&other, "30");
        std::fs::write(&elsewhere.pidfile, format!("{}\n", p.pid())).unwrap();
        assert!(elsewhere.adopt().is_none());
        // Its own session.
        // SAFETY: getsid(2) on a pid, no memory involved.
        let sid = unsafe { libc::getsid(p.pid() as libc::pid_t) };
        assert_eq!(sid as u32, p.pid());
        assert!(p.stop(Duration::from_secs(5)));
        assert!(!p.alive());
        assert!(!adopted.alive());
        assert!(!s.pidfile.exists());
        assert!(s.adopt().is_none());
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn respawn_counts() {
        let d = tmp("r");
        let s = spec(&d, "0.05");
        let mut p = s.spawn().unwrap();
        let first = p.pid();
        assert!(p.wait_exit(Duration::from_secs(5)));
        p.respawn().unwrap();
        assert_eq!(p.restarts, 1);
        assert_ne!(p.pid(), first);
        p.stop(Duration::from_secs(1));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
