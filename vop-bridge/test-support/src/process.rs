//! Processes a test starts: killed when the test ends, however it ends.
//!
//! [`Process`] is any child (QEMU, a bridge, a backend) with its log; a
//! [`Daemon`] is a backend whose socket is waited for. Both stop their
//! process on drop: SIGTERM first, so daemons remove their sockets and
//! taps, then SIGKILL after a grace period.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::frontend::{Error, Result};

/// How long a process gets after SIGTERM before SIGKILL on drop.
const GRACE: Duration = Duration::from_secs(5);

/// A child process of the test, stopped on drop.
pub struct Process {
    child: Option<Child>,
}

impl Process {
    /// Starts `cmd` with stdin closed and stdout and stderr to `log`;
    /// panics (failing the test) if it cannot.
    pub fn spawn(cmd: &mut Command, log: &Path) -> Process {
        let f = File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Process { child: Some(child) }
    }

    /// Wraps a child started otherwise.
    pub fn from_child(child: Child) -> Process {
        Process { child: Some(child) }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its exit status once it has exited on its own within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_exit(self.child.as_mut().expect("a process"), timeout)
    }

    /// Sends `sig` and waits up to `timeout` for the exit.
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Result<ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, sig) };
        self.wait_exit(timeout)
    }

    /// Kills it at once (SIGKILL), as a crash or a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let _ = wait_exit(&mut c, grace);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(GRACE);
    }
}

/// A backend daemon process spawned for a test; killed on drop.
pub struct Daemon {
    /// The child process.
    pub child: Child,
    /// Its socket path.
    pub socket: PathBuf,
}

impl Daemon {
    /// Spawn `bin` with `args` and wait (up to 10 s) until `socket` accepts
    /// connections. Fails early if the process exits first.
    ///
    /// Waiting uses a connect() probe; backends treat the probe as a frontend
    /// that disconnects at once.
    pub fn spawn(bin: &Path, args: &[&str], socket: &Path) -> Result<Daemon> {
        let child = Command::new(bin).args(args).stdin(Stdio::null()).spawn()?;
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
        };
        d.wait_ready(Duration::from_secs(10))?;
        Ok(d)
    }

    /// [`Daemon::spawn`] with the daemon's log (stderr) written to
    /// `stderr` (see [`log_lines`]).
    pub fn spawn_logged(bin: &Path, args: &[&str], socket: &Path, stderr: &Path) -> Result<Daemon> {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stderr(File::create(stderr)?)
            .spawn()?;
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
        };
        d.wait_ready(Duration::from_secs(10))?;
        Ok(d)
    }

    /// Wait until the socket file exists and is listening.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.socket.exists() && UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                return Err(Error::Io(io::Error::other(format!(
                    "daemon exited before its socket was ready: {st}"
                ))));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout("the daemon socket"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send a signal and wait (up to `timeout`) for the process to exit.
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Result<ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        wait_exit(&mut self.child, timeout)
    }
}

/// CPU time (user + system, in clock ticks) a process has used so far,
/// from `/proc/PID/stat` (fields 14 and 15, see proc(5)). Tests compare two
/// readings to tell a busy loop from a sleeping daemon.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/PID/stat");
    // The command name (field 2) may contain spaces: start after its ')'.
    let after = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .ok_or_else(bad)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let field =
        |i: usize| -> io::Result<u64> { f.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad) };
    Ok(field(11)? + field(12)?)
}

/// Most CPU ticks (1/100 s) a daemon with nothing to do may use in one
/// second. A spinning worker uses 100, and still well over 20 on a loaded
/// two-core machine; an idle daemon uses 0 or 1.
pub const IDLE_TICKS: u64 = 10;

/// CPU ticks process `pid` uses in the next second.
pub fn ticks_in_one_second(pid: u32) -> u64 {
    let t0 = cpu_ticks(pid).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = cpu_ticks(pid).unwrap() - t0;
    eprintln!("process {pid} used {used} ticks in 1 s");
    used
}

/// Wait for a child to exit, with a timeout.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout("process exit"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How many lines a daemon's log file (see [`Daemon::spawn_logged`]) has
/// so far. Tests compare two counts to check that repeated actions leave a
/// bounded number of lines.
pub fn log_lines(path: &Path) -> io::Result<usize> {
    Ok(std::fs::read(path)?.split(|b| *b == b'\n').count() - 1)
}
