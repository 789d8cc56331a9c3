//! Plumbing shared by the MIC vhost-user backend daemons (`mic-blk`, `mic-net`,
//! `mic-console`).
//!
//! A daemon built on this crate looks like this:
//!
//! ```ignore
//! init_logging();
//! let args = Cli::parse();              // flattens `SocketArgs`
//! let image = open_image(&args)?;       // validate BEFORE the socket exists
//! // SIGINT/SIGTERM -> clean exit; the socket appears now.
//! let (shutdown, endpoint) = open_endpoint(&args.socket)?;
//! serve("mic-xyz", endpoint, &shutdown, || Ok(MyBackend::new(&image)))?;
//! ```
//!
//! [`run_daemon`] keeps serving across frontend disconnects: every new frontend
//! gets a freshly created backend (from the factory closure) and a fresh
//! [`VhostUserDaemon`], so no vring or feature state leaks from one frontend
//! to the next.  Backends must return an exit event from
//! `VhostUserBackend::exit_event` (use [`WorkerExitEvents`]) so that the
//! worker threads of a finished connection can be joined. A device whose
//! host side outlives its frontends (a tap, a terminal) implements
//! [`PersistentBackend`] and is served with [`serve_persistent`]: one
//! backend, reset for every frontend.
//!
//! Every daemon's control channel passes through a small relay (module
//! `relay`) so that frontends that enable rings before `SET_FEATURES`, as
//! QEMU's vhost-user net client does, are served; see that module.
//!
//! The vhost-user backend program conventions (QEMU
//! `docs/interop/vhost-user.rst`, "Backend program conventions") are
//! shared too: `--print-capabilities` ([`capabilities`]), and `--socket-path`
//! or `--fd` ([`SocketArgs`], [`Endpoint`]).
//!
//! [`sandbox`] confines a daemon (Landlock, capabilities, seccomp) before
//! its socket appears; `--sandbox none` ([`sandbox::SandboxArgs`]) turns
//! it off.
//!
//! [`throttle`] has the rate limits' token buckets and [`timer`] the
//! timer a throttled queue waits on; [`stats`] the per-queue counters,
//! which [`control`] serves on the stats socket and dumps on `SIGUSR1`.
//!
//! [`guest`] has guest-memory and virtqueue helpers for the devices, and
//! [`ring`] the guard every device takes its chains through.
//!
//! A device that tracks in-flight I/O ([`inflight`], vhost-user's
//! `INFLIGHT_SHMFD`) implements [`InflightTracking`] and is served with
//! [`serve_tracking`]; the relay then serves the in-flight messages and
//! hands each connection's region to that connection's backend.

#![deny(missing_docs)]

pub mod capabilities;
pub mod chain;
pub mod control;
#[doc(hidden)]
pub mod fuzz;
pub mod guest;
pub mod inflight;
pub mod ratelimit;
mod relay;
pub mod ring;
pub mod sandbox;
pub mod stats;
pub mod terminal;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod throttle;
pub mod timer;
pub mod worker;

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use log::{debug, error, info, warn};
use relay::{ChannelHook, InflightHook, PrivateSocket, Relay};
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

/// Errors reported by the shared daemon plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another daemon accepts connections on this socket path.
    #[error("socket path {0} is in use by a running daemon")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket; it is left alone.
    #[error("socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Inspecting, removing or binding the socket path failed.
    #[error("cannot listen on socket path {0}: {1}")]
    Listen(PathBuf, #[source] io::Error),
    /// Setting up signal handling or an event fd failed.
    #[error("cannot set up shutdown handling: {0}")]
    Shutdown(#[source] io::Error),
    /// The backend factory or the start hook failed.
    #[error("cannot create the backend: {0}")]
    Backend(#[source] io::Error),
    /// The vhost-user daemon could not be created or started.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    /// The control-channel relay could not be set up.
    #[error("cannot relay the vhost-user connection: {0}")]
    Relay(#[source] io::Error),
    /// `--fd N` is not an inherited, listening UNIX stream socket.
    #[error("--fd {0}: {1}")]
    Fd(RawFd, #[source] io::Error),
    /// Neither or both of `--socket-path` and `--fd` were given.
    #[error("{0}")]
    Args(&'static str),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Command line arguments every backend daemon shares: where frontends come
/// from (QEMU `docs/interop/vhost-user.rst`, "Backend program conventions":
/// `--socket-path` or `--fd`, never both) and `--print-capabilities`.
///
/// Flatten it into the daemon's own clap parser with `#[command(flatten)]`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct SocketArgs {
    /// Path of the vhost-user UNIX socket (listened on, or connected to
    /// with --client).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "fd",
        conflicts_with = "fd"
    )]
    pub socket_path: Option<PathBuf>,
    /// Serve on an inherited, already listening UNIX socket: file
    /// descriptor N (instead of --socket-path).
    #[arg(long, value_name = "N", conflicts_with = "client")]
    pub fd: Option<RawFd>,
    /// Connect to a listening frontend at --socket-path instead of listening.
    #[arg(long)]
    pub client: bool,
    /// Print the backend's capabilities as JSON (QEMU's vhost-user.json)
    /// and exit; all other options are ignored.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// Prints `NAME: error: MSG` on stderr; returns the failure exit code.
pub fn fail(name: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{name}: error: {msg}");
    ExitCode::FAILURE
}

/// Parses the command line of daemon `name` into `A` and validates it with
/// `convert`. `--help` and `--version` print and exit with status 0; an
/// invalid command line or configuration is reported as one line (see
/// [`fail`]) and returned as `Err` with the exit code.
pub fn parse_cli<A, C, E>(
    name: &str,
    convert: impl FnOnce(A) -> std::result::Result<C, E>,
) -> std::result::Result<C, ExitCode>
where
    A: clap::Parser,
    E: std::fmt::Display,
{
    match A::try_parse() {
        Ok(a) => convert(a).map_err(|e| fail(name, e)),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            Err(fail(name, line.trim_start_matches("error: ")))
        }
    }
}

/// The last startup steps of a daemon: route SIGINT and SIGTERM to a new
/// [`Shutdown`] and create the [`Endpoint`] (in listen mode the socket
/// appears now).
pub fn open_endpoint(args: &SocketArgs) -> Result<(Shutdown, Endpoint)> {
    let shutdown = Shutdown::install()?;
    let endpoint = Endpoint::new(args)?;
    Ok((shutdown, endpoint))
}

/// The exit status for the daemon loop's `result`; an error is logged and
/// reported as one line (see [`fail`]).
pub fn exit_status(name: &str, result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            fail(name, e)
        }
    }
}

impl SocketArgs {
    /// The options for `socket_path`, in client mode if `client`.
    pub fn new(socket_path: &Path, client: bool) -> SocketArgs {
        SocketArgs {
            socket_path: Some(socket_path.to_path_buf()),
            fd: None,
            client,
            print_capabilities: false,
        }
    }

    /// The options for an inherited listening socket, descriptor `fd`.
    pub fn inherited(fd: RawFd) -> SocketArgs {
        SocketArgs {
            socket_path: None,
            fd: Some(fd),
            client: false,
            print_capabilities: false,
        }
    }

    /// Checks what clap's rules cannot: the socket path is not empty.
    pub fn validate(&self) -> std::result::Result<(), &'static str> {
        match (&self.socket_path, self.fd) {
            (Some(p), None) if p.as_os_str().is_empty() => Err("--socket-path must not be empty"),
            (Some(_), None) => Ok(()),
            (None, Some(_)) if self.client => Err("--client needs --socket-path, not --fd"),
            (None, Some(_)) => Ok(()),
            _ => Err("exactly one of --socket-path and --fd is needed"),
        }
    }
}

/// Initialise `env_logger`: `RUST_LOG` selects the level, `info` by default.
///
/// Lines at `warn` or `error` from the crates below the daemons
/// (`virtio-queue`, `vhost`, `vhost-user-backend`...) are rate-limited
/// together, since a frontend or a guest can trigger them once per request
/// (an invalid queue size, a broken ring); see [`ratelimit`].
///
/// Safe to call more than once (later calls are ignored).
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let inner = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(LimitedLogger { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// Lines from other crates at `warn` or `error`: 10 a minute.
static CRATE_LINES: ratelimit::LogLimiter =
    ratelimit::LogLimiter::new(10, std::time::Duration::from_secs(60));

/// `env_logger` with the lines of other crates rate-limited (see
/// [`init_logging`]); the daemons' own lines are limited where they are
/// written.
struct LimitedLogger {
    inner: env_logger::Logger,
}

impl log::Log for LimitedLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        let ours = record.target().starts_with("mic_");
        if ours || record.level() > log::Level::Warn {
            return self.inner.log(record);
        }
        match CRATE_LINES.check() {
            None => {}
            Some(0) => self.inner.log(record),
            Some(n) => self.inner.log(
                &log::Record::builder()
                    .args(format_args!(
                        "{} ({n} similar lines left out)",
                        record.args()
                    ))
                    .level(record.level())
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

/// Where frontends come from: a listening socket (default), a listening
/// socket inherited from the parent (`--fd`), or a socket to connect to
/// (`--client`).
pub enum Endpoint {
    /// Listening socket bound at `path` (mode 0600).
    Listen {
        /// The bound listener, reused for every frontend.
        listener: Listener,
        /// Path of the socket, removed again on shutdown.
        path: PathBuf,
        /// Device and inode of the socket we created, to avoid removing
        /// a socket somebody else created after us.
        ident: (u64, u64),
    },
    /// A listening socket the daemon was started with (`--fd N`): the
    /// parent created, bound and will remove it; the daemon only accepts
    /// on it, as on its own.
    Inherited {
        /// The inherited listener, reused for every frontend.
        listener: Listener,
    },
    /// Connect to a frontend listening at `path`, reconnecting after each
    /// disconnect.
    Connect {
        /// Path of the frontend's socket.
        path: PathBuf,
    },
}

impl Endpoint {
    /// Create the endpoint described by `args`.
    ///
    /// In listen mode: a path that a live daemon accepts connections on is an
    /// error ([`Error::SocketInUse`]); a stale socket file (connect() refused)
    /// is replaced; a path that is not a socket is never removed
    /// ([`Error::NotASocket`]). The new socket has mode 0600. With `--fd`
    /// see [`Endpoint::inherited`].
    pub fn new(args: &SocketArgs) -> Result<Endpoint> {
        args.validate().map_err(Error::Args)?;
        match (&args.socket_path, args.fd) {
            (None, Some(fd)) => Self::inherited(fd),
            (Some(path), _) if args.client => Ok(Endpoint::Connect { path: path.clone() }),
            (Some(path), _) => Self::listen(path),
            (None, None) => Err(Error::Args(
                "exactly one of --socket-path and --fd is needed",
            )),
        }
    }

    /// Takes over the listening socket inherited as descriptor `fd`
    /// (`--fd`, vhost-user.rst "Backend program conventions"). It must be
    /// an open UNIX stream socket that `listen()` was called on; anything
    /// else is refused ([`Error::Fd`]) without closing it. The descriptor is
    /// marked close-on-exec and closed when the endpoint is dropped; the
    /// socket file, if any, is left to whoever bound it.
    ///
    /// Call it at most once per descriptor: the endpoint owns `fd`.
    pub fn inherited(fd: RawFd) -> Result<Endpoint> {
        check_listening_unix(fd).map_err(|e| Error::Fd(fd, e))?;
        // SAFETY: `fd` is open (checked above) and an inherited descriptor
        // that nothing else in this process uses; the listener takes it
        // over, as documented.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        info!("listening on inherited descriptor {fd}");
        Ok(Endpoint::Inherited {
            listener: Listener::from(listener),
        })
    }

    /// Bind a listening socket at `path`; see [`Endpoint::new`].
    pub fn listen(path: &Path) -> Result<Endpoint> {
        let path = path.to_path_buf();
        match fs::symlink_metadata(&path) {
            Ok(meta) => {
                if !meta.file_type().is_socket() {
                    return Err(Error::NotASocket(path));
                }
                match UnixStream::connect(&path) {
                    Ok(_) => return Err(Error::SocketInUse(path)),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        info!("replacing stale socket {}", path.display());
                        fs::remove_file(&path).map_err(|e| Error::Listen(path.clone(), e))?;
                    }
                    Err(e) => return Err(Error::Listen(path, e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Listen(path, e)),
        }

        // Create the socket with mode 0600 from the start: no window in
        // which another user could connect.
        // SAFETY: umask only changes the process file mode creation mask.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(&path);
        // SAFETY: as above, restores the previous mask.
        unsafe { libc::umask(old_mask) };
        let listener = bound.map_err(|e| Error::Listen(path.clone(), e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::Listen(path.clone(), e))?;
        let meta = fs::symlink_metadata(&path).map_err(|e| Error::Listen(path.clone(), e))?;
        info!("listening on {}", path.display());
        Ok(Endpoint::Listen {
            listener: Listener::from(listener),
            path,
            ident: (meta.dev(), meta.ino()),
        })
    }
}

/// Reads an `int` socket option of `fd`.
fn sockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes and `len` is `val`'s size;
    // getsockopt only writes within them. A bad `fd` is an error return.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}

/// Checks that `fd` is an open, listening UNIX stream socket and marks it
/// close-on-exec. The error says which of those it is not.
fn check_listening_unix(fd: RawFd) -> io::Result<()> {
    let refuse = |what: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            what.to_string(),
        ))
    };
    if fd < 0 {
        return refuse("not a file descriptor");
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; a bad `fd` fails.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("not an open file descriptor ({e})"),
        ));
    }
    match sockopt_int(fd, libc::SO_DOMAIN) {
        Ok(libc::AF_UNIX) => {}
        Ok(_) => return refuse("not a UNIX socket"),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => return refuse("not a socket"),
        Err(e) => return Err(e),
    }
    if sockopt_int(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return refuse("not a stream socket");
    }
    if sockopt_int(fd, libc::SO_ACCEPTCONN)? == 0 {
        return refuse("not a listening socket");
    }
    // SAFETY: F_SETFD only changes the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Endpoint::Listen { path, ident, .. } = self {
            if let Ok(meta) = fs::symlink_metadata(&*path) {
                if (meta.dev(), meta.ino()) == *ident {
                    let _ = fs::remove_file(&*path);
                }
            }
        }
    }
}

/// The shutdown eventfd (a duplicate, kept for the process's lifetime)
/// that the signal handler writes to.
static SIGNAL_EVENT: OnceLock<EventFd> = OnceLock::new();

/// SIGINT/SIGTERM handler: only an atomic load and write(2), both
/// async-signal-safe.
extern "C" fn on_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    if let Some(ev) = SIGNAL_EVENT.get() {
        let _ = ev.write(1);
    }
}

struct ShutdownInner {
    /// eventfd that becomes (and stays) readable once shutdown is requested.
    event: EventFd,
    requested: AtomicBool,
    /// Handle of the connection being served, if any.
    active: Mutex<Option<ShutdownHandle>>,
}

/// Clean shutdown on SIGINT/SIGTERM (or on [`Shutdown::request`]).
///
/// Once requested, [`run_daemon`] stops accepting frontends, disconnects the
/// current one, joins the worker threads and removes the socket file.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

impl Shutdown {
    /// Create a shutdown trigger without installing signal handlers.
    pub fn new() -> Result<Shutdown> {
        let event =
            EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map_err(Error::Shutdown)?;
        let shutdown = Shutdown {
            inner: Arc::new(ShutdownInner {
                event,
                requested: AtomicBool::new(false),
                active: Mutex::new(None),
            }),
        };
        let watcher = shutdown.clone();
        std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || watcher.watch())
            .map_err(Error::Shutdown)?;
        Ok(shutdown)
    }

    /// Create a shutdown trigger and route SIGINT and SIGTERM to it.
    ///
    /// Only one trigger per process can be installed; a second call fails.
    ///
    /// `vmm-sys-util` installs the handler without `SA_RESTART`: a system
    /// call another thread is blocked in when the signal arrives may fail
    /// with `EINTR`. That only happens as the daemon shuts down, and the
    /// daemon loop's own waits retry.
    pub fn install() -> Result<Shutdown> {
        let shutdown = Shutdown::new()?;
        // The handler writes to a duplicate, so that it stays valid even
        // after every `Shutdown` clone is dropped.
        let dup = shutdown.inner.event.try_clone().map_err(Error::Shutdown)?;
        SIGNAL_EVENT.set(dup).map_err(|_| {
            Error::Shutdown(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "signal handling is already installed",
            ))
        })?;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            register_signal_handler(sig, on_signal)
                .map_err(|e| Error::Shutdown(io::Error::from_raw_os_error(e.errno())))?;
        }
        Ok(shutdown)
    }

    /// Request shutdown (same effect as SIGTERM).
    pub fn request(&self) {
        // Cannot fail short of overflowing the counter (2^64 - 2 requests).
        let _ = self.inner.event.write(1);
    }

    /// Whether shutdown has been requested.
    pub fn requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst) || poll_in(&[self.fd()], 0) == Some(0)
    }

    /// File descriptor that becomes readable once shutdown is requested
    /// (never read it; it is level-triggered for all waiters).
    pub fn fd(&self) -> RawFd {
        self.inner.event.as_raw_fd()
    }

    fn watch(&self) {
        loop {
            if poll_in(&[self.fd()], -1) == Some(0) {
                break;
            }
        }
        info!("shutdown requested");
        let mut active = self.inner.active.lock().unwrap();
        self.inner.requested.store(true, Ordering::SeqCst);
        if let Some(handle) = active.take() {
            handle.shutdown();
        }
    }

    /// Register the connection being served; returns false (and shuts the
    /// connection down) if shutdown was already requested.
    fn set_active(&self, handle: Option<ShutdownHandle>) -> bool {
        let mut active = self.inner.active.lock().unwrap();
        if self.inner.requested.load(Ordering::SeqCst) {
            if let Some(h) = handle {
                h.shutdown();
            }
            return false;
        }
        *active = handle;
        true
    }
}

/// poll() the fds for POLLIN; returns the index of the first readable fd,
/// None on timeout or error (EINTR included).
pub(crate) fn poll_in(fds: &[RawFd], timeout_ms: i32) -> Option<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return None;
    }
    pfds.iter().position(|p| p.revents != 0)
}

/// Per-worker-thread exit events for `VhostUserBackend::exit_event`.
///
/// vhost-user-backend takes ownership of the consumer side and never closes
/// it; this helper remembers those fds and closes them when dropped (that is,
/// when the last clone of the backend that owns it goes away, after all
/// worker threads have been joined).
#[derive(Debug, Default)]
pub struct WorkerExitEvents {
    handed_out: Mutex<Vec<RawFd>>,
}

impl WorkerExitEvents {
    /// Create an empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh exit event pair; return it from `VhostUserBackend::exit_event`.
    pub fn create(&self) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                let fd = consumer.into_raw_fd();
                self.handed_out.lock().unwrap().push(fd);
                // SAFETY: fd was just released from a valid EventConsumer.
                Some((unsafe { EventConsumer::from_raw_fd(fd) }, notifier))
            }
            Err(e) => {
                error!("cannot create worker exit event: {e}");
                None
            }
        }
    }

    /// Closes the consumer fds handed out so far. Call it only once the
    /// worker threads that received them have been joined (a long-lived
    /// backend does so when the next frontend arrives).
    pub fn close_all(&self) {
        for fd in self.handed_out.lock().unwrap().drain(..) {
            // SAFETY: these fds were leaked into the (now joined and dropped)
            // worker epoll handlers, which never close them.
            unsafe { libc::close(fd) };
        }
    }
}

impl Drop for WorkerExitEvents {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// A backend [`run_daemon`] can serve: what `VhostUserDaemon` needs of it.
/// Implemented for every such backend.
pub trait DaemonBackend:
    VhostUserBackend<
        Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
        Vring: Clone + Send + Sync,
    > + Clone
    + 'static
{
}

impl<B> DaemonBackend for B
where
    B: VhostUserBackend + Clone + 'static,
    B::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    B::Vring: Clone + Send + Sync,
{
}

/// Serve frontends until shutdown; see [`run_daemon`]. No start hook.
pub fn serve<B, N>(
    name: &str,
    endpoint: Endpoint,
    shutdown: &Shutdown,
    new_backend: N,
) -> Result<()>
where
    B: DaemonBackend,
    N: FnMut() -> io::Result<B>,
{
    run_daemon(name, endpoint, shutdown, new_backend, |_| Ok(()))
}

/// A device whose host side (tap, stream socket, terminal...) lives as long
/// as the process, shared by all frontends one after the other.
pub trait PersistentBackend {
    /// Forgets the previous frontend: called before every frontend is
    /// served, after the previous frontend's worker threads have been joined.
    fn new_frontend(&self);
    /// Registers the host side's descriptors with the worker threads' epoll
    /// sets (one per worker thread, in thread order). Called for every
    /// frontend, before it is served.
    fn attach_workers(&self, workers: &[worker::Worker]);
    /// The backend request channel the frontend set up with
    /// `SET_BACKEND_REQ_FD`: a duplicate of the socket that
    /// `VhostUserBackend::set_backend_req_fd` receives next (wrapped in a
    /// `vhost::vhost_user::Backend`, which in `vhost` 0.18 cannot send
    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`). A device that announces
    /// config changes keeps it and writes them there. Ignored by default.
    fn backend_channel(&self, _channel: UnixStream) {}
}

/// A device that tracks in-flight I/O in the frontend's shared region
/// (vhost-user `INFLIGHT_SHMFD`, see [`inflight`]), served with
/// [`serve_tracking`].
pub trait InflightTracking {
    /// The region the frontend handed over (`SET_INFLIGHT_FD`), before it
    /// sets up the rings: the device tracks its queues in it from now on,
    /// and recovers each queue from it when the queue starts.
    fn set_inflight_region(&self, region: inflight::InflightRegion);
}

/// Serve frontends until shutdown, like [`run_daemon`] (`on_start` runs
/// for every frontend, before it is served), for a device that tracks
/// in-flight I/O: the protocol feature is offered and every connection's
/// region goes to that connection's backend.
pub fn serve_tracking<B, N, S>(
    name: &str,
    endpoint: Endpoint,
    shutdown: &Shutdown,
    new_backend: N,
    on_start: S,
) -> Result<()>
where
    B: DaemonBackend + InflightTracking + Send + Sync,
    N: FnMut() -> io::Result<B>,
    S: FnMut(&VhostUserDaemon<B>) -> io::Result<()>,
{
    fn hook<B: InflightTracking + Clone + Send + Sync + 'static>(b: &B) -> InflightHook {
        let b = b.clone();
        Arc::new(move |region| b.set_inflight_region(region))
    }
    run_daemon_hooked(
        name,
        endpoint,
        shutdown,
        new_backend,
        on_start,
        None,
        Some(hook::<B>),
    )
}

/// Serve frontends until shutdown with one long-lived backend; see
/// [`run_daemon`] and [`PersistentBackend`].
pub fn serve_persistent<B>(
    name: &str,
    endpoint: Endpoint,
    shutdown: &Shutdown,
    backend: &Arc<B>,
) -> Result<()>
where
    B: PersistentBackend + VhostUserBackend + 'static,
    Arc<B>: DaemonBackend,
{
    let b = backend.clone();
    let hook: ChannelHook = Arc::new(move |channel| b.backend_channel(channel));
    run_daemon_hooked(
        name,
        endpoint,
        shutdown,
        || {
            backend.new_frontend();
            Ok(backend.clone())
        },
        |daemon| {
            let workers: Vec<worker::Worker> = daemon
                .get_epoll_handlers()
                .into_iter()
                .map(|h| h as worker::Worker)
                .collect();
            backend.attach_workers(&workers);
            Ok(())
        },
        Some(hook),
        None,
    )
}

/// Waits for the next frontend connection; `None` on shutdown. In client
/// mode, (re)connects every 100 ms until the frontend's socket accepts.
fn next_frontend(endpoint: &Endpoint, shutdown: &Shutdown) -> Option<UnixStream> {
    loop {
        if shutdown.requested() {
            return None;
        }
        match endpoint {
            Endpoint::Listen { listener, .. } | Endpoint::Inherited { listener } => {
                match poll_in(&[shutdown.fd(), listener.as_raw_fd()], -1) {
                    Some(0) => return None,
                    Some(_) => {}
                    None => continue,
                }
                match listener.accept() {
                    Ok(Some(s)) => return Some(s),
                    Ok(None) => continue,
                    Err(e) => {
                        warn!("accepting a frontend failed: {e}");
                        poll_in(&[shutdown.fd()], 100);
                    }
                }
            }
            Endpoint::Connect { path } => match UnixStream::connect(path) {
                Ok(s) => return Some(s),
                Err(e) => {
                    debug!("connecting to the frontend failed: {e}");
                    poll_in(&[shutdown.fd()], 100);
                }
            },
        }
    }
}

/// Frontend connected/disconnected lines: a peer can reconnect in a loop.
static CONNECTION_LINES: ratelimit::LogLimiter =
    ratelimit::LogLimiter::new(10, std::time::Duration::from_secs(60));

/// The daemon loop: serve one frontend at a time until shutdown.
///
/// For every frontend: `new_backend()` builds (or resets) the backend, a new
/// [`VhostUserDaemon`] is created for it, `on_start(&daemon)` runs (register
/// extra fds with `daemon.get_epoll_handlers()` there), then the connection
/// is served until the frontend disconnects or misbehaves (a protocol error
/// only ends that connection). The daemon is then dropped, which joins its
/// worker threads, and the loop waits for the next frontend. In client mode
/// the loop (re)connects every 100 ms until the frontend's socket accepts.
///
/// The control channel passes through the relay of the `relay` module,
/// which lets frontends that enable rings before `SET_FEATURES` (QEMU's
/// vhost-user net client does) be served; nothing else about the protocol
/// changes.
///
/// Returns `Ok(())` after a requested shutdown; the socket file is removed
/// when `endpoint` is dropped. Errors from `new_backend`/`on_start` are fatal.
pub fn run_daemon<B, N, S>(
    name: &str,
    endpoint: Endpoint,
    shutdown: &Shutdown,
    new_backend: N,
    on_start: S,
) -> Result<()>
where
    B: DaemonBackend,
    N: FnMut() -> io::Result<B>,
    S: FnMut(&VhostUserDaemon<B>) -> io::Result<()>,
{
    run_daemon_hooked(name, endpoint, shutdown, new_backend, on_start, None, None)
}

/// [`run_daemon`], handing the backend request channel of every frontend
/// to `channel_hook` (see [`PersistentBackend::backend_channel`]) and, with
/// `inflight_hook`, every in-flight region to the hook it makes for that
/// frontend's backend (see [`serve_tracking`]).
fn run_daemon_hooked<B, N, S>(
    name: &str,
    endpoint: Endpoint,
    shutdown: &Shutdown,
    mut new_backend: N,
    mut on_start: S,
    channel_hook: Option<ChannelHook>,
    inflight_hook: Option<fn(&B) -> InflightHook>,
) -> Result<()>
where
    B: DaemonBackend,
    N: FnMut() -> io::Result<B>,
    S: FnMut(&VhostUserDaemon<B>) -> io::Result<()>,
{
    let mut connections: u64 = 0;
    while let Some(front) = next_frontend(&endpoint, shutdown) {
        let backend = new_backend().map_err(Error::Backend)?;
        let inflight = inflight_hook.map(|make| make(&backend));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<B::Bitmap>::new());
        let mut daemon = VhostUserDaemon::new(name.to_string(), backend, mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        on_start(&daemon).map_err(Error::Backend)?;
        // A private socket per connection, gone (file and directory) as
        // soon as the daemon is connected: a daemon killed while it serves
        // leaves nothing behind in the temporary directory.
        let back = {
            let private = PrivateSocket::new(name).map_err(Error::Relay)?;
            daemon
                .start_client(private.path())
                .map_err(|e| Error::Daemon(e.to_string()))?;
            private.accept().map_err(Error::Relay)?
        };
        // A frontend we accepted must speak first within a deadline (so a
        // silent peer cannot hold the socket); one we connected to is the
        // one we were told to serve, and may take its time.
        let first_message = match endpoint {
            Endpoint::Listen { .. } | Endpoint::Inherited { .. } => {
                Some(relay::FIRST_MESSAGE_TIMEOUT)
            }
            Endpoint::Connect { .. } => None,
        };
        let relay = Relay::start(
            front,
            back,
            shutdown.fd(),
            channel_hook.clone(),
            first_message,
            inflight,
        )
        .map_err(Error::Relay)?;
        connections += 1;
        limited!(CONNECTION_LINES, info, "frontend {connections} connected");
        #[cfg(feature = "test-hooks")]
        sandbox::test_blocked_call(connections);
        shutdown.set_active(daemon.shutdown_handle());
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => limited!(
                CONNECTION_LINES,
                info,
                "frontend {connections} disconnected"
            ),
            Err(e) => limited!(
                CONNECTION_LINES,
                warn,
                "frontend {connections} dropped: {e}"
            ),
        }
        shutdown.set_active(None);
        // Dropping the daemon stops and joins the worker threads.
        drop(daemon);
        relay.join();
        // Client mode: do not spin on a frontend that keeps closing.
        if matches!(endpoint, Endpoint::Connect { .. }) {
            poll_in(&[shutdown.fd()], 100);
        }
    }
    info!("{name}: shutting down");
    drop(endpoint);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        socket: SocketArgs,
    }

    fn tmpdir(tag: &str) -> vmm_sys_util::tempdir::TempDir {
        let prefix = std::env::temp_dir().join(format!("mic-common-{tag}-"));
        vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap()
    }

    #[test]
    fn socket_args_parse() {
        let c = Cli::try_parse_from(["x", "--socket-path", "/tmp/s", "--client"]).unwrap();
        assert_eq!(c.socket.socket_path, Some(PathBuf::from("/tmp/s")));
        assert!(c.socket.client);
        assert!(Cli::try_parse_from(["x"]).is_err());
    }

    #[test]
    fn listen_mode_0600_stale_replaced_live_refused() {
        let d = tmpdir("listen");
        let p = d.as_path().join("s.sock");
        // Stale socket: bound then dropped listener leaves the file behind.
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        let ep = Endpoint::listen(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Live: a second endpoint on the same path is refused.
        match Endpoint::listen(&p) {
            Err(Error::SocketInUse(_)) => {}
            other => panic!("expected SocketInUse, got {:?}", other.err()),
        }
        drop(ep);
        assert!(!p.exists(), "socket removed on drop");
        // Not a socket: left alone.
        fs::write(&p, b"data").unwrap();
        assert!(matches!(Endpoint::listen(&p), Err(Error::NotASocket(_))));
        assert_eq!(fs::read(&p).unwrap(), b"data");
    }

    #[test]
    fn socket_args_path_or_fd() {
        let c = Cli::try_parse_from(["x", "--fd", "3"]).unwrap();
        assert_eq!(c.socket, SocketArgs::inherited(3));
        assert!(c.socket.validate().is_ok());
        assert!(Cli::try_parse_from(["x", "--fd", "3", "--socket-path", "/s"]).is_err());
        assert!(Cli::try_parse_from(["x", "--fd", "3", "--client"]).is_err());
        assert!(Cli::try_parse_from(["x", "--fd", "x"]).is_err());
        assert!(Cli::try_parse_from(["x", "--socket-path", ""]).is_err());
        assert!(SocketArgs::new(Path::new(""), false).validate().is_err());
        let none = SocketArgs {
            socket_path: None,
            fd: None,
            client: false,
            print_capabilities: false,
        };
        assert!(matches!(Endpoint::new(&none), Err(Error::Args(_))));
    }

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert!(flags >= 0);
        flags & libc::FD_CLOEXEC != 0
    }

    fn clear_cloexec(fd: RawFd) {
        // SAFETY: F_SETFD only changes the descriptor's flags.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    }

    #[test]
    fn inherited_listener_is_served_and_cloexec() {
        let d = tmpdir("inherited");
        let p = d.as_path().join("s.sock");
        let fd = UnixListener::bind(&p).unwrap().into_raw_fd();
        clear_cloexec(fd);
        let ep = Endpoint::new(&SocketArgs::inherited(fd)).unwrap();
        assert!(matches!(ep, Endpoint::Inherited { .. }));
        assert!(cloexec(fd));
        let _client = UnixStream::connect(&p).unwrap();
        let shutdown = Shutdown::new().unwrap();
        assert!(next_frontend(&ep, &shutdown).is_some());
        drop(ep);
        assert!(p.exists(), "an inherited socket's file is left alone");
        // SAFETY: F_GETFD only reads flags; the endpoint closed `fd`.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFD) }, -1);
    }

    #[test]
    fn inherited_refuses_what_is_not_a_listening_unix_socket() {
        let d = tmpdir("refuse");
        let file = fs::File::create(d.as_path().join("f")).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cases = [
            (file.as_raw_fd(), "not a socket"),
            (a.as_raw_fd(), "not a listening socket"),
            (dgram.as_raw_fd(), "not a stream socket"),
            (tcp.as_raw_fd(), "not a UNIX socket"),
            (-1, "not a file descriptor"),
            (1_000_000, "not an open file descriptor"),
        ];
        for (fd, why) in cases {
            match Endpoint::inherited(fd) {
                Err(Error::Fd(n, e)) => {
                    assert_eq!(n, fd);
                    assert!(e.to_string().starts_with(why), "{fd}: {e}");
                }
                Err(e) => panic!("{fd}: unexpected error {e}"),
                Ok(_) => panic!("{fd}: accepted"),
            }
        }
        // Refused descriptors stay open and usable.
        assert!(file.metadata().is_ok());
        assert!(tcp.local_addr().is_ok());
    }

    #[test]
    fn shutdown_request_is_visible() {
        let s = Shutdown::new().unwrap();
        assert!(!s.requested());
        s.request();
        assert!(s.requested());
        assert_eq!(poll_in(&[s.fd()], 1000), Some(0));
    }
}
