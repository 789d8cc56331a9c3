//! The Landlock part of the sandbox: after it, the daemon opens, creates
//! and removes files only below the paths it was given (its image, its
//! socket's directory...), and makes TCP connections only to the ports it
//! was given (Linux `Documentation/userspace-api/landlock.rst`).
//!
//! Best effort: the ruleset asks for the rights of Landlock ABI 7 (Linux
//! 6.15: file system rights up to `IOCTL_DEV`, TCP bind/connect, and the
//! abstract-UNIX-socket and signal scopes); an older kernel enforces what it
//! knows, a kernel without Landlock nothing, and [`restrict`] says which
//! happened. Descriptors opened before the restriction (the image, the tap,
//! the pty) are not affected; nor, up to ABI 7, is connecting to a UNIX
//! socket by path.
//!
//! A rule covers a file, or a directory and everything below it.

use std::fmt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, LandlockStatus, NetPort, PathBeneath, PathFd,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// The newest ABI asked for (and tested, on Linux 6.18).
const TARGET: ABI = ABI::V7;

/// What a daemon may do below one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAccess {
    /// Read a file (or device) again.
    ReadFile,
    /// Read and write a file or device (and its ioctls).
    ReadWriteFile,
    /// Read the files below a directory (name resolution reads `/etc`).
    ReadTree,
    /// Create and remove UNIX sockets in a directory (a listening socket,
    /// removed on exit).
    SocketDir,
    /// Create directories and sockets below a directory, list and remove
    /// them (the relay's private directory of every connection, see
    /// `relay.rs`).
    ScratchDir,
    /// Create, append to and rename files in a directory (a log file and
    /// its rotation).
    LogDir,
}

impl PathAccess {
    fn rights(self) -> BitFlags<AccessFs> {
        use AccessFs::*;
        match self {
            PathAccess::ReadFile => ReadFile.into(),
            PathAccess::ReadWriteFile => ReadFile | WriteFile | Truncate | IoctlDev,
            PathAccess::ReadTree => ReadFile | ReadDir,
            PathAccess::SocketDir => MakeSock | RemoveFile,
            PathAccess::ScratchDir => MakeDir | MakeSock | RemoveDir | RemoveFile | ReadDir,
            PathAccess::LogDir => WriteFile | MakeReg | RemoveFile | Truncate,
        }
    }
}

/// One path rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRule {
    /// A file, or a directory with everything below it. It must exist.
    pub path: PathBuf,
    /// What may be done there.
    pub access: PathAccess,
}

/// One TCP rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpRule {
    /// Connect to this port.
    Connect(u16),
    /// Bind (listen on) this port.
    Bind(u16),
}

/// Errors building or applying the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rule's path cannot be opened.
    #[error("landlock: {0}: {1}")]
    Path(PathBuf, #[source] landlock::PathFdError),
    /// The kernel refused the ruleset.
    #[error("landlock: {0}")]
    Ruleset(#[source] landlock::RulesetError),
}

/// What was enforced, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The ABI the kernel and the crate share (`None`: no Landlock).
    pub abi: Option<i32>,
    /// All of the target ABI's rights (`Full`), some (`Partial`), none.
    pub level: Level,
}

/// How much of the ruleset the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Everything asked for.
    Full,
    /// The part an older kernel knows.
    Partial,
    /// Nothing (no Landlock in this kernel).
    None,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Full => "fully enforced",
            Level::Partial => "partly enforced",
            Level::None => "not enforced",
        };
        match self.abi {
            Some(abi) => write!(f, "landlock ABI {abi}, {level}"),
            None => write!(f, "landlock not available, {level}"),
        }
    }
}

fn applied(status: RestrictionStatus) -> Applied {
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => Some(effective_abi as i32),
        _ => None,
    };
    let level = match status.ruleset {
        RulesetStatus::FullyEnforced => Level::Full,
        RulesetStatus::PartiallyEnforced => Level::Partial,
        RulesetStatus::NotEnforced => Level::None,
    };
    Applied { abi, level }
}

/// Restricts the calling thread, and the threads it starts from now on, to
/// `paths` and `tcp`. Irreversible; sets `no_new_privs`.
pub fn restrict(paths: &[PathRule], tcp: &[TcpRule]) -> Result<Applied, Error> {
    let mut created = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET))
        .map_err(Error::Ruleset)?
        .handle_access(AccessNet::from_all(TARGET))
        .map_err(Error::Ruleset)?
        .scope(Scope::from_all(TARGET))
        .map_err(Error::Ruleset)?
        .create()
        .map_err(Error::Ruleset)?;
    for rule in paths {
        let fd = PathFd::new(&rule.path).map_err(|e| Error::Path(rule.path.clone(), e))?;
        let mut rights = rule.access.rights();
        if !is_dir(&rule.path) {
            // Directory-only rights on a file are an error.
            rights &= AccessFs::from_file(TARGET);
        }
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(Error::Ruleset)?;
    }
    for rule in tcp {
        let (port, access) = match *rule {
            TcpRule::Connect(p) => (p, AccessNet::ConnectTcp),
            TcpRule::Bind(p) => (p, AccessNet::BindTcp),
        };
        created = created
            .add_rule(NetPort::new(port, access))
            .map_err(Error::Ruleset)?;
    }
    created.restrict_self().map(applied).map_err(Error::Ruleset)
}

fn is_dir(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::net::UnixListener;

    #[test]
    fn file_rules_drop_directory_rights() {
        assert!(PathAccess::ReadWriteFile
            .rights()
            .contains(AccessFs::WriteFile));
        assert!(!PathAccess::SocketDir.rights().contains(AccessFs::ReadFile));
        assert_eq!(
            (PathAccess::ScratchDir.rights() & AccessFs::from_file(TARGET)),
            BitFlags::empty()
        );
    }

    /// In a child process: a file outside the rules cannot be opened, the
    /// one given can; sockets appear only in the socket directory.
    #[test]
    fn paths_outside_the_rules_are_refused() {
        let d = super::super::tests::tempdir("landlock");
        let root = d.as_path();
        fs::write(root.join("given"), b"given").unwrap();
        fs::write(root.join("other"), b"other").unwrap();
        fs::create_dir(root.join("sockets")).unwrap();
        let status = super::super::tests::run_child("landlock_child", &[root]);
        assert_eq!(
            status.code(),
            Some(super::super::tests::CHILD_OK),
            "{status:?}"
        );
        // The child's writes: the given file changed, the other did not.
        assert_eq!(fs::read(root.join("given")).unwrap(), b"written");
        assert_eq!(fs::read(root.join("other")).unwrap(), b"other");
        assert!(root.join("sockets/s.sock").exists());
        assert!(!root.join("outside.sock").exists());
    }

    #[test]
    fn landlock_child() {
        if !super::super::tests::in_child("landlock_child") {
            return;
        }
        let root = PathBuf::from(std::env::args().next_back().unwrap());
        let rules = [
            PathRule {
                path: root.join("given"),
                access: PathAccess::ReadWriteFile,
            },
            PathRule {
                path: root.join("sockets"),
                access: PathAccess::SocketDir,
            },
        ];
        let applied = restrict(&rules, &[]).unwrap();
        if applied.level == Level::None {
            // No Landlock in this kernel: nothing to check.
            fs::write(root.join("given"), b"written").unwrap();
            UnixListener::bind(root.join("sockets/s.sock")).unwrap();
            std::process::exit(super::super::tests::CHILD_OK);
        }
        fs::write(root.join("given"), b"written").unwrap();
        let denied = |r: std::io::Result<()>| {
            assert_eq!(
                r.unwrap_err().raw_os_error(),
                Some(libc::EACCES),
                "expected EACCES"
            )
        };
        denied(fs::read(root.join("other")).map(drop));
        denied(fs::write(root.join("other"), b"x"));
        denied(fs::write(root.join("new"), b"x"));
        denied(fs::read_dir(&root).map(drop));
        UnixListener::bind(root.join("sockets/s.sock")).unwrap();
        denied(UnixListener::bind(root.join("outside.sock")).map(drop));
        std::process::exit(super::super::tests::CHILD_OK);
    }
}
