//! `mic-console`: vhost-user virtio-console backend for the MIC X100 card.
//!
//! The card's console goes to a pseudo-terminal, a unix socket or stdio,
//! and optionally to a log file. See `backends/README.md`.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use mic_backend_common::{init_logging, Endpoint, Shutdown, SocketArgs};

mod backend;
// The daemon loop and vhost-user compatibility shim are shared with mic-net.
#[path = "../../net/src/compat.rs"]
mod compat;
mod config;
mod host;

use backend::ConsoleBackend;
use config::{ConsoleArgs, ConsoleConfig};
use host::Host;

const NAME: &str = "mic-console";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{NAME}: error: {msg}");
    ExitCode::FAILURE
}

fn parse_args() -> Result<ConsoleConfig, ExitCode> {
    let args = match ConsoleArgs::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            return Err(fail(line.trim_start_matches("error: ")));
        }
    };
    ConsoleConfig::from_args(args).map_err(fail)
}

fn main() -> ExitCode {
    init_logging();
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let host = match Host::open(&cfg.target, cfg.log.as_deref()) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    if let Some(p) = host.pty_path() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{NAME}: console on {}", p.display());
        let _ = out.flush();
    }
    let backend = Arc::new(ConsoleBackend::new(host, cfg.multiport, cfg.queue_size));
    let shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let endpoint = match Endpoint::new(&SocketArgs {
        socket_path: cfg.socket_path.clone(),
        client: cfg.client,
    }) {
        Ok(e) => e,
        Err(e) => {
            backend.host().restore();
            return fail(e);
        }
    };
    info!(
        "console: {:?}, multiport {}, queue size {}",
        cfg.target, cfg.multiport, cfg.queue_size
    );
    let factory_backend = backend.clone();
    let result = compat::serve(
        NAME,
        endpoint,
        &shutdown,
        move || {
            factory_backend.disconnected();
            Ok(factory_backend.clone())
        },
        |daemon| {
            let fds: Vec<_> = daemon
                .get_epoll_handlers()
                .iter()
                .map(|h| h.as_raw_fd())
                .collect();
            backend.attach_workers(&fds);
            Ok(())
        },
    );
    backend.host().restore();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            fail(e)
        }
    }
}
