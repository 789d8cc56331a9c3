//! The daemons' sandbox, on by default (`--sandbox on`; `--sandbox none`
//! turns it off): once a daemon has opened what it serves and before its
//! vhost-user socket appears, [`apply`] confines it for the rest of its
//! life, in this order:
//!
//! 1. Landlock ([`landlock`]): file access only below the paths of its
//!    [`Policy`], TCP only to its ports; best effort, the ABI applied is
//!    logged ([`Report`]).
//! 2. Capabilities ([`caps`]): every set emptied (a policy may keep one
//!    the daemon needs).
//! 3. The process is made non-dumpable (`PR_SET_DUMPABLE` 0: no core file,
//!    no `ptrace` by other processes of the same user).
//! 4. seccomp ([`seccomp`]): only the system calls of its policy; any other
//!    call ends the daemon with one line on stderr naming the call, killed
//!    by `SIGSYS`. The vring workers and the relay threads narrow their own
//!    lists further when they start work ([`threads`]).
//!
//! Each daemon declares what it needs in one place, its `sandbox.rs`,
//! starting from [`Policy::new`], which holds what every daemon needs (the
//! [`seccomp::BASE`] calls, the relay's temporary directory, the socket's
//! directory). `backends/README.md` ("Sandbox") lists every daemon's
//! allowances and why.
//!
//! All threads are confined: [`apply`] runs while the daemon has only its
//! main thread (the shutdown watcher, the relay and the vhost-user threads
//! start later and inherit everything), and the seccomp filter is installed
//! on every thread anyway.

pub mod caps;
pub mod landlock;
pub mod seccomp;
pub mod syscall_names;
pub mod threads;

use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::SocketArgs;
pub use ::caps::Capability;
pub use landlock::{PathAccess, PathRule, TcpRule};
pub use seccomp::Allow;
pub use threads::{enter, ThreadKind};

/// `--sandbox`: whether the daemon confines itself.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// No sandbox (for debugging, or where seccomp gets in the way).
    None,
    /// Landlock, no capabilities, seccomp (the default).
    #[default]
    On,
}

/// The `--sandbox` option every daemon has; flatten it into its parser.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SandboxArgs {
    /// Confine the daemon once it has opened what it serves: Landlock
    /// limits file access to what it was given, capabilities are dropped,
    /// and seccomp allows only the system calls it needs (a call outside
    /// the list ends it, killed by SIGSYS, with one line naming the call).
    /// See backends/README.md, "Sandbox".
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SandboxMode::On)]
    pub sandbox: SandboxMode,
}

/// What a daemon is allowed once sandboxed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The daemon's name, for the log and the `SIGSYS` line.
    pub name: &'static str,
    /// The system calls (with [`seccomp::BASE`]).
    pub syscalls: Vec<Allow>,
    /// The paths.
    pub paths: Vec<PathRule>,
    /// The TCP ports.
    pub tcp: Vec<TcpRule>,
    /// Capabilities kept (if the daemon has them); all others are dropped.
    pub keep_caps: Vec<::caps::Capability>,
    /// The system calls of its vring worker threads (with
    /// [`seccomp::THREAD_BASE`] and [`seccomp::WORKER_BASE`]), once they
    /// [`enter`] [`ThreadKind::Worker`].
    pub worker_syscalls: Vec<Allow>,
    /// Whether its worker threads open files (otherwise `openat` fails
    /// with `EACCES` in them).
    pub workers_open_files: bool,
}

impl Policy {
    /// What every daemon needs: the [`seccomp::BASE`] calls; the temporary
    /// directory, where the relay creates a private directory and socket
    /// for every frontend (`relay.rs`); and, with `--socket-path` (not
    /// `--client`), the directory of the listening socket, which is
    /// created (a stale one replaced) once the sandbox is on and removed
    /// on exit. A `--client` only connects, and an `--fd` socket belongs
    /// to whoever bound it.
    pub fn new(name: &'static str, socket: &SocketArgs) -> Policy {
        let mut p = Policy {
            name,
            syscalls: seccomp::BASE.to_vec(),
            paths: Vec::new(),
            tcp: Vec::new(),
            keep_caps: Vec::new(),
            worker_syscalls: [seccomp::THREAD_BASE, seccomp::WORKER_BASE].concat(),
            workers_open_files: false,
        };
        p.allow_path(std::env::temp_dir(), PathAccess::ScratchDir);
        if let (Some(path), false) = (&socket.socket_path, socket.client) {
            p.allow_path(parent_dir(path), PathAccess::SocketDir);
        }
        p
    }

    /// Adds system calls.
    pub fn allow_calls(&mut self, calls: &[Allow]) -> &mut Self {
        self.syscalls.extend_from_slice(calls);
        self
    }

    /// Adds a path rule.
    pub fn allow_path(&mut self, path: impl Into<PathBuf>, access: PathAccess) -> &mut Self {
        self.paths.push(PathRule {
            path: path.into(),
            access,
        });
        self
    }

    /// Adds a TCP rule.
    pub fn allow_tcp(&mut self, rule: TcpRule) -> &mut Self {
        self.tcp.push(rule);
        self
    }

    /// Adds system calls for the worker threads.
    pub fn allow_worker_calls(&mut self, calls: &[Allow]) -> &mut Self {
        self.worker_syscalls.extend_from_slice(calls);
        self
    }

    /// Lets the worker threads open files (Landlock still limits which).
    pub fn workers_open_files(&mut self) -> &mut Self {
        self.workers_open_files = true;
        self
    }

    /// Keeps capability `cap`, if the daemon has it.
    pub fn keep_capability(&mut self, cap: ::caps::Capability) -> &mut Self {
        self.keep_caps.push(cap);
        self
    }

    /// Whether the policy has a rule for exactly `path`.
    pub fn has_path(&self, path: &Path, access: PathAccess) -> bool {
        self.paths
            .iter()
            .any(|r| r.path == path && r.access == access)
    }
}

/// The directory a socket or file at `path` lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Errors applying the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Landlock refused the rules (a kernel without Landlock is not an
    /// error).
    #[error(transparent)]
    Landlock(#[from] landlock::Error),
    /// Capabilities could not be dropped.
    #[error(transparent)]
    Caps(#[from] caps::Error),
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
}

/// What [`apply`] did, to be logged once the daemon's startup has
/// succeeded ([`Report::log`]; a startup error stays one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// `--sandbox none`.
    Off,
    /// The sandbox is on.
    On {
        /// What Landlock enforces.
        landlock: landlock::Applied,
        /// Path rules.
        paths: usize,
        /// Capabilities the daemon had (all dropped).
        capabilities: usize,
        /// seccomp list entries.
        syscalls: usize,
    },
}

impl Report {
    /// Logs the report: one line.
    pub fn log(&self) {
        match self {
            Report::Off => warn!("sandbox off (--sandbox none)"),
            Report::On {
                landlock,
                paths,
                capabilities,
                syscalls,
            } => {
                let line = format!(
                    "sandbox on: {landlock} ({paths} path rule(s)), {capabilities} capabilit{} dropped, seccomp list of {syscalls} entries",
                    if *capabilities == 1 { "y" } else { "ies" }
                );
                if landlock.level == landlock::Level::None {
                    warn!("{line}");
                } else {
                    info!("{line}");
                }
            }
        }
    }
}

/// Applies `policy` if `mode` is [`SandboxMode::On`] (see the module
/// documentation). An error means the daemon could not be confined as
/// asked; it should not go on.
pub fn apply(mode: SandboxMode, policy: &Policy) -> Result<Report, Error> {
    if mode == SandboxMode::None {
        return Ok(Report::Off);
    }
    let applied = landlock::restrict(&policy.paths, &policy.tcp)?;
    let had = caps::drop_all(&policy.keep_caps)?;
    // SAFETY: PR_SET_DUMPABLE with 0 only changes this process's flag.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    threads::prepare(&policy.worker_syscalls, policy.workers_open_files)?;
    seccomp::install(policy.name, &policy.syscalls)?;
    Ok(Report::On {
        landlock: applied,
        paths: policy.paths.len(),
        capabilities: had,
        syscalls: policy.syscalls.len(),
    })
}

/// A test-only hook, compiled only with the `test-hooks` feature (which
/// the daemons' integration tests enable, never a default build): with
/// `MIC_TEST_BLOCKED_CALL=N` in its environment, a daemon makes a system
/// call that no policy allows (`getppid`) when its N-th and every later
/// frontend connects (from the daemon loop's thread), so that the tests
/// can check what a blocked call does to a sandboxed daemon, and to the
/// others. Without the sandbox the call is harmless.
#[cfg(feature = "test-hooks")]
pub fn test_blocked_call(connection: u64) {
    let wanted = std::env::var("MIC_TEST_BLOCKED_CALL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if wanted.is_some_and(|n| connection >= n) {
        warn!("test hook: calling getppid");
        // SAFETY: getppid has no arguments and no side effects.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, ExitStatus};

    /// Runs the test `name` of this test binary in a child process, with
    /// `args` after it (the sandbox cannot be undone, so each check runs
    /// in a process of its own).
    pub(crate) fn run_child(name: &str, args: &[&Path]) -> ExitStatus {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "--test-threads=1", "--nocapture", "-q"])
            .arg(format!("sandbox::{}", test_path(name)))
            .args(args)
            .env("MIC_SANDBOX_CHILD", name);
        cmd.status().unwrap()
    }

    fn test_path(name: &str) -> String {
        match name {
            "seccomp_child" => format!("seccomp::tests::{name}"),
            "landlock_child" => format!("landlock::tests::{name}"),
            "caps_child" => format!("caps::tests::{name}"),
            "threads_child" | "threads_socket_child" => format!("threads::tests::{name}"),
            _ => format!("tests::{name}"),
        }
    }

    /// The exit code of a child whose checks passed (a child that ran no
    /// test would exit 0).
    pub(crate) const CHILD_OK: i32 = 42;

    /// Whether this process is the child that [`run_child`] started for
    /// `name` (otherwise the test does nothing).
    pub(crate) fn in_child(name: &str) -> bool {
        std::env::var("MIC_SANDBOX_CHILD").as_deref() == Ok(name)
    }

    pub(crate) fn tempdir(tag: &str) -> vmm_sys_util::tempdir::TempDir {
        let prefix = std::env::temp_dir().join(format!("mic-sandbox-{tag}-"));
        vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap()
    }

    #[test]
    fn policy_has_what_every_daemon_needs() {
        let s = SocketArgs::new(Path::new("/run/mic/blk.sock"), false);
        let p = Policy::new("mic-x", &s);
        assert!(p.has_path(&std::env::temp_dir(), PathAccess::ScratchDir));
        assert!(p.has_path(Path::new("/run/mic"), PathAccess::SocketDir));
        assert_eq!(p.syscalls, seccomp::BASE);
        // A client connects and creates nothing; --fd was bound by others.
        let c = Policy::new("mic-x", &SocketArgs::new(Path::new("/s/x"), true));
        assert_eq!(c.paths.len(), 1);
        assert_eq!(
            Policy::new("mic-x", &SocketArgs::inherited(3)).paths.len(),
            1
        );
        assert_eq!(parent_dir(Path::new("x.sock")), PathBuf::from("."));
    }

    #[test]
    fn option_default_is_on() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sandbox: SandboxArgs,
        }
        let c = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(c.sandbox.sandbox, SandboxMode::On);
        let c = Cli::try_parse_from(["x", "--sandbox", "none"]).unwrap();
        assert_eq!(c.sandbox.sandbox, SandboxMode::None);
        assert!(Cli::try_parse_from(["x", "--sandbox", "off"]).is_err());
    }

    /// The whole sandbox in a child process: it goes on serving itself
    /// (threads, the temporary directory) and a blocked call ends it.
    #[test]
    fn applied_sandbox_allows_the_base_and_stops_the_rest() {
        use std::os::unix::process::ExitStatusExt;
        let status = run_child("apply_child", &[]);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    }

    #[test]
    fn apply_child() {
        if !in_child("apply_child") {
            return;
        }
        let p = Policy::new("mic-x", &SocketArgs::inherited(3));
        apply(SandboxMode::On, &p).unwrap();
        let d = tempdir("apply");
        let l = std::os::unix::net::UnixListener::bind(d.as_path().join("s")).unwrap();
        drop(l);
        drop(d);
        std::thread::spawn(|| ()).join().unwrap();
        // SAFETY: getppid has no arguments and no side effects.
        unsafe { libc::syscall(libc::SYS_getppid) };
        std::process::exit(0);
    }

    /// A panicking thread of a sandboxed daemon (with a backtrace, as the
    /// tests ask for one) is a panic, not a blocked call.
    #[test]
    fn panics_stay_panics() {
        let status = run_child("panic_child", &[]);
        assert_eq!(status.code(), Some(CHILD_OK), "{status:?}");
    }

    #[test]
    fn panic_child() {
        if !in_child("panic_child") {
            return;
        }
        let p = Policy::new("mic-x", &SocketArgs::inherited(3));
        apply(SandboxMode::On, &p).unwrap();
        let t = std::thread::Builder::new()
            .spawn(|| panic!("a test panic"))
            .unwrap();
        assert!(t.join().is_err());
        std::process::exit(CHILD_OK);
    }
}
