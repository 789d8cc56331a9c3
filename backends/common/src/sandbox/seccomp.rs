//! The seccomp part of the sandbox: the system calls a daemon may make,
//! compiled with `seccompiler` into one BPF filter that every thread of
//! the process runs (`SECCOMP_FILTER_FLAG_TSYNC`; threads started later
//! inherit it).
//!
//! The lists were taken from what the daemons really call: `strace -f` over
//! their integration tests (`cargo test -p mic-blk -p mic-net -p
//! mic-console`), counting the calls made from the point where the sandbox
//! is applied (just before the vhost-user socket is created) on. What a
//! daemon does only at startup (opening the image, the tap, the pty) is not
//! in them. [`BASE`] is what every daemon needs: the Rust runtime and the
//! allocator, threads, the shutdown eventfd and signal handling, the
//! vhost-user connection and its relay (`relay.rs`: a private socket in a
//! new temporary directory per frontend), guest memory mappings and the
//! worker threads' epoll loops; and what a panic's backtrace needs (a
//! panic must stay a panic). Each daemon adds its own (see its
//! `sandbox.rs`).
//!
//! A call outside the list is not executed: the kernel sends `SIGSYS`
//! (`SECCOMP_RET_TRAP`), whose handler writes one line naming the call to
//! stderr (`write(2)`, async-signal-safe) and ends the process with that
//! signal: the daemon's exit status is "killed by signal 31 (SIGSYS)". A
//! daemon that is not dumpable (see `mod.rs`) leaves no core file.
//!
//! Only x86_64 is described (the numbers are the `libc` crate's).

use std::collections::BTreeMap;
use std::io;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::syscall_names;

/// One entry of a daemon's system call list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// The call, whatever its arguments.
    Call(libc::c_long),
    /// `ioctl(fd, request, ...)` with this request (its low 32 bits, which
    /// is all the kernel looks at).
    Ioctl(libc::c_ulong),
    /// `socket(domain, ...)` for this address family.
    Socket(libc::c_int),
    /// `kill(pid, ...)` and `tgkill(pid, ...)` for the daemon's own process.
    SignalSelf,
    /// `clone(flags, ...)` with `CLONE_THREAD` in `flags`: threads only.
    /// (`clone3` passes its flags in memory, where a filter cannot look;
    /// it is in [`BASE`] as a plain call.)
    CloneThread,
    /// `prctl(option, ...)` for this option (`PR_SET_NAME`: naming
    /// threads).
    Prctl(libc::c_int),
    /// `seccomp(SECCOMP_SET_MODE_FILTER, ...)`: a thread adding a filter
    /// of its own (filters only ever narrow what a thread may do), with
    /// `prctl(PR_SET_NO_NEW_PRIVS)`, which `seccompiler` calls first.
    AddFilter,
}

use Allow::{Call, Ioctl, Socket};

/// What every daemon needs once it is sandboxed.
pub const BASE: &[Allow] = &[
    // Memory: the allocator, thread stacks, guest memory regions.
    Call(libc::SYS_brk),
    Call(libc::SYS_mmap),
    Call(libc::SYS_munmap),
    Call(libc::SYS_mremap),
    Call(libc::SYS_mprotect),
    Call(libc::SYS_madvise),
    // Threads: the relay's and vhost-user-backend's per-connection threads.
    Call(libc::SYS_clone3),
    Allow::CloneThread,
    Call(libc::SYS_set_robust_list),
    Call(libc::SYS_rseq),
    Call(libc::SYS_futex),
    Call(libc::SYS_sched_getaffinity),
    Call(libc::SYS_sched_yield),
    Call(libc::SYS_gettid),
    Call(libc::SYS_getpid),
    Call(libc::SYS_getrandom),
    Allow::Prctl(libc::PR_SET_NAME),
    Call(libc::SYS_exit),
    Call(libc::SYS_exit_group),
    // Signals: SIGINT/SIGTERM handling, the alternate stack of new threads,
    // and the process ending itself (abort, the SIGSYS handler).
    Call(libc::SYS_rt_sigaction),
    Call(libc::SYS_rt_sigprocmask),
    Call(libc::SYS_rt_sigreturn),
    Call(libc::SYS_sigaltstack),
    Call(libc::SYS_restart_syscall),
    Allow::SignalSelf,
    // Threads narrowing their own filter (`threads.rs`).
    Allow::AddFilter,
    // Time and waiting.
    Call(libc::SYS_clock_gettime),
    Call(libc::SYS_clock_nanosleep),
    Call(libc::SYS_nanosleep),
    Call(libc::SYS_poll),
    Call(libc::SYS_ppoll),
    Call(libc::SYS_epoll_create1),
    Call(libc::SYS_epoll_ctl),
    Call(libc::SYS_epoll_wait),
    Call(libc::SYS_epoll_pwait),
    Call(libc::SYS_eventfd2),
    // Descriptors.
    Call(libc::SYS_read),
    Call(libc::SYS_readv),
    Call(libc::SYS_write),
    Call(libc::SYS_writev),
    Call(libc::SYS_close),
    Call(libc::SYS_fcntl),
    Call(libc::SYS_lseek),
    Ioctl(libc::FIONBIO),
    // The file system: the socket file and the relay's private directory
    // (`mkdtemp`, bind, chmod, remove), stat of the socket path. Landlock
    // limits where.
    Call(libc::SYS_openat),
    Call(libc::SYS_newfstatat),
    Call(libc::SYS_statx),
    Call(libc::SYS_getdents64),
    Call(libc::SYS_mkdir),
    Call(libc::SYS_rmdir),
    Call(libc::SYS_unlink),
    Call(libc::SYS_unlinkat),
    Call(libc::SYS_chmod),
    Call(libc::SYS_umask),
    // A panic's backtrace: the executable's path and the working directory
    // (no file is opened that Landlock does not allow).
    Call(libc::SYS_getcwd),
    Call(libc::SYS_readlink),
    Call(libc::SYS_readlinkat),
    // UNIX sockets: the vhost-user socket, the relay, descriptor passing.
    Socket(libc::AF_UNIX),
    Call(libc::SYS_bind),
    Call(libc::SYS_listen),
    Call(libc::SYS_accept4),
    Call(libc::SYS_connect),
    Call(libc::SYS_shutdown),
    Call(libc::SYS_getsockopt),
    Call(libc::SYS_setsockopt),
    Call(libc::SYS_sendmsg),
    Call(libc::SYS_sendto),
    Call(libc::SYS_recvmsg),
    Call(libc::SYS_recvfrom),
];

/// What any thread of a daemon needs, whatever it does: memory, locks,
/// signals, ending itself or the process, waiting, its descriptors, and a
/// panic's backtrace. The lists of the thread kinds (`threads.rs`) start
/// from it.
pub const THREAD_BASE: &[Allow] = &[
    Call(libc::SYS_brk),
    Call(libc::SYS_mmap),
    Call(libc::SYS_munmap),
    Call(libc::SYS_mremap),
    Call(libc::SYS_mprotect),
    Call(libc::SYS_madvise),
    Call(libc::SYS_futex),
    Call(libc::SYS_sched_getaffinity),
    Call(libc::SYS_sched_yield),
    Call(libc::SYS_gettid),
    Call(libc::SYS_getpid),
    Call(libc::SYS_getrandom),
    Allow::Prctl(libc::PR_SET_NAME),
    Call(libc::SYS_exit),
    Call(libc::SYS_exit_group),
    Call(libc::SYS_rt_sigprocmask),
    Call(libc::SYS_rt_sigreturn),
    Call(libc::SYS_sigaltstack),
    Call(libc::SYS_restart_syscall),
    Allow::SignalSelf,
    Call(libc::SYS_clock_gettime),
    Call(libc::SYS_clock_nanosleep),
    Call(libc::SYS_nanosleep),
    Call(libc::SYS_poll),
    Call(libc::SYS_ppoll),
    Call(libc::SYS_read),
    Call(libc::SYS_readv),
    Call(libc::SYS_write),
    Call(libc::SYS_writev),
    Call(libc::SYS_close),
    Call(libc::SYS_fcntl),
    Call(libc::SYS_getcwd),
    Call(libc::SYS_readlink),
    Call(libc::SYS_readlinkat),
    // Refused with EACCES for kinds that open nothing (`threads.rs`).
    Call(libc::SYS_openat),
    Call(libc::SYS_newfstatat),
    Call(libc::SYS_statx),
    Call(libc::SYS_lseek),
];

/// A vring worker thread (`vhost-user-backend`'s `VringEpollHandler`):
/// [`THREAD_BASE`] and its epoll loop over kick eventfds and the device's
/// own descriptors. Each daemon adds its device's calls.
pub const WORKER_BASE: &[Allow] = &[
    Call(libc::SYS_epoll_wait),
    Call(libc::SYS_epoll_pwait),
    Call(libc::SYS_epoll_ctl),
];

/// A relay thread (`relay.rs`): [`THREAD_BASE`] and messages with
/// descriptors on its two UNIX sockets, their timeouts, and shutting them
/// down.
pub const RELAY: &[Allow] = &[
    Call(libc::SYS_recvmsg),
    Call(libc::SYS_recvfrom),
    Call(libc::SYS_sendmsg),
    Call(libc::SYS_sendto),
    Call(libc::SYS_setsockopt),
    Call(libc::SYS_getsockopt),
    Call(libc::SYS_shutdown),
];

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `seccompiler` refused the rules.
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[source] seccompiler::BackendError),
    /// `seccompiler` could not install the filter.
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[source] seccompiler::Error),
    /// The `SIGSYS` handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] io::Error),
}

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Argument indices 0..=5 are valid; these are constants below.
    SeccompCondition::new(arg, len, op, value).expect("valid seccomp condition")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule with conditions")
}

/// The rules of `allow` (on top of nothing: pass [`BASE`] too), keyed by
/// system call: an empty rule list allows the call whatever its arguments.
pub fn rules(allow: &[Allow]) -> BTreeMap<i64, Vec<SeccompRule>> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    let pid = std::process::id() as u64;
    let mut unconditional = std::collections::BTreeSet::new();
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in allow {
        let (nr, rules): (i64, Vec<SeccompRule>) = match *a {
            Call(nr) => {
                unconditional.insert(nr);
                (nr, vec![])
            }
            Ioctl(req) => (
                libc::SYS_ioctl,
                vec![rule(vec![cond(1, Dword, Eq, req & 0xffff_ffff)])],
            ),
            Socket(domain) => (
                libc::SYS_socket,
                vec![rule(vec![cond(0, Dword, Eq, domain as u64)])],
            ),
            Allow::SignalSelf => {
                map.entry(libc::SYS_kill)
                    .or_default()
                    .push(rule(vec![cond(0, Dword, Eq, pid)]));
                (libc::SYS_tgkill, vec![rule(vec![cond(0, Dword, Eq, pid)])])
            }
            Allow::CloneThread => {
                let t = libc::CLONE_THREAD as u64;
                (
                    libc::SYS_clone,
                    vec![rule(vec![cond(0, Qword, MaskedEq(t), t)])],
                )
            }
            Allow::Prctl(option) => (
                libc::SYS_prctl,
                vec![rule(vec![cond(0, Dword, Eq, option as u64)])],
            ),
            Allow::AddFilter => {
                map.entry(libc::SYS_prctl).or_default().push(rule(vec![cond(
                    0,
                    Dword,
                    Eq,
                    libc::PR_SET_NO_NEW_PRIVS as u64,
                )]));
                (
                    libc::SYS_seccomp,
                    vec![rule(vec![cond(
                        0,
                        Dword,
                        Eq,
                        u64::from(libc::SECCOMP_SET_MODE_FILTER),
                    )])],
                )
            }
        };
        map.entry(nr).or_default().extend(rules);
    }
    for nr in unconditional {
        map.insert(nr, vec![]);
    }
    map
}

/// Compiles `allow` into a filter: allowed calls run, every other call
/// raises `SIGSYS`; a call made through another architecture's entry (the
/// 32-bit one) kills the process.
pub fn compile(allow: &[Allow]) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules(allow),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(Error::Build)?;
    filter.try_into().map_err(Error::Build)
}

/// A filter under which the calls `calls` fail with `errno` and every
/// other call is left to the thread's other filters.
pub fn compile_refusal(calls: &[libc::c_long], errno: i32) -> Result<BpfProgram, Error> {
    let rules = calls.iter().map(|nr| (*nr, vec![])).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )
    .map_err(Error::Build)?;
    filter.try_into().map_err(Error::Build)
}

/// The daemon's name for the `SIGSYS` line.
static DAEMON: OnceLock<String> = OnceLock::new();

/// Installs the `SIGSYS` handler, then `allow` as the filter of every
/// thread of the process. Irreversible.
pub fn install(name: &str, allow: &[Allow]) -> Result<(), Error> {
    let program = compile(allow)?;
    let _ = DAEMON.set(name.to_string());
    install_sigsys_handler().map_err(Error::Handler)?;
    seccompiler::apply_filter_all_threads(&program).map_err(Error::Install)
}

fn install_sigsys_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the fields set below are the
    // handler (an `extern "C"` function of the right signature, which
    // `SA_SIGINFO` selects) and the flags. No old action is read back.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in `siginfo_t` on 64-bit Linux
/// (`include/uapi/asm-generic/siginfo.h`: three `int`s padded to 16
/// bytes, then the `_sigsys` member of the union: `_call_addr` (a
/// pointer), `_syscall` (an `int`), `_arch`). The `libc` crate has no
/// accessor for it.
const SI_SYSCALL_OFFSET: usize = 24;

/// Writes `n` in decimal into `buf`; returns the digits' part.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The line written for a stopped call: `NAME: sandbox: system call
/// CALL (NR) is not allowed; exiting`. Fills `out`, returns its length;
/// no allocation (the `SIGSYS` handler calls it).
fn blocked_line(daemon: &str, nr: i64, out: &mut [u8; 160]) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(out.len() - len);
        out[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    let mut digits = [0; 20];
    put(daemon.as_bytes());
    put(b": sandbox: system call ");
    put(syscall_names::name(nr).unwrap_or("?").as_bytes());
    put(b" (");
    put(decimal(nr as u64, &mut digits));
    put(b") is not allowed; exiting\n");
    len
}

/// `SIGSYS` handler: one line on stderr, then the process ends by the same
/// signal with the default action. Only async-signal-safe calls:
/// `write(2)`, `sigaction(2)`, `getpid(2)`, `gettid(2)`, `tgkill(2)`.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler;
    // for a seccomp SIGSYS its `_sigsys` member is the one filled in, and
    // `si_syscall` lies within the 128-byte structure.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let daemon = DAEMON.get().map(String::as_str).unwrap_or("daemon");
    let mut line = [0u8; 160];
    let len = blocked_line(daemon, i64::from(nr), &mut line);
    // SAFETY: writes `len` initialised bytes of `line` to stderr; resets
    // SIGSYS to its default action (a zeroed sigaction is SIG_DFL) and sends
    // it to this thread: it is blocked while the handler runs and is
    // delivered, ending the process, as soon as the handler returns.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len);
        let dfl: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSYS, &dfl, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_names_the_call() {
        let mut out = [0; 160];
        let n = blocked_line("mic-x", libc::SYS_getppid, &mut out);
        assert_eq!(
            &out[..n],
            b"mic-x: sandbox: system call getppid (110) is not allowed; exiting\n"
        );
        let n = blocked_line("mic-x", 100_000, &mut out);
        assert!(out[..n].starts_with(b"mic-x: sandbox: system call ? (100000)"));
        let long = "x".repeat(300);
        assert_eq!(blocked_line(&long, 1, &mut out), 160);
    }

    #[test]
    fn conditions_and_plain_calls() {
        let r = rules(&[
            Ioctl(libc::FIONBIO),
            Call(libc::SYS_read),
            Socket(libc::AF_UNIX),
        ]);
        assert_eq!(r[&libc::SYS_ioctl].len(), 1);
        assert!(r[&libc::SYS_read].is_empty());
        assert_eq!(r[&libc::SYS_socket].len(), 1);
        // A plain call wins over conditions on the same call.
        let r = rules(&[Ioctl(libc::FIONBIO), Call(libc::SYS_ioctl)]);
        assert!(r[&libc::SYS_ioctl].is_empty());
        assert!(compile(BASE).is_ok());
    }

    /// In a child process (this test binary, run again for
    /// `seccomp_child`): a filter of [`BASE`] lets the process run and
    /// kills it with SIGSYS at the first call outside the list.
    #[test]
    fn blocked_call_kills_with_sigsys() {
        use std::os::unix::process::ExitStatusExt;
        let status = super::super::tests::run_child("seccomp_child", &[]);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    }

    #[test]
    fn seccomp_child() {
        if !super::super::tests::in_child("seccomp_child") {
            return;
        }
        install("seccomp-child", BASE).unwrap();
        // Allowed: memory, threads, files.
        let v: Vec<u8> = vec![1; 1 << 20];
        std::thread::spawn(move || drop(v)).join().unwrap();
        // Not allowed: ends the process.
        // SAFETY: getppid has no arguments and no side effects.
        unsafe { libc::syscall(libc::SYS_getppid) };
        // Not reached; a clean exit would fail the parent's assertion.
        std::process::exit(0);
    }
}
