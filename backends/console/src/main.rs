//! `mic-console`: vhost-user virtio-console backend for the MIC X100 card.
//!
//! The card's console goes to a pseudo-terminal, a unix socket or stdio,
//! and optionally to a log file. See `backends/README.md`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use log::info;
use mic_backend_common::capabilities::{self, BackendType, Capabilities};
use mic_backend_common::{
    exit_status, init_logging, open_endpoint, parse_cli, sandbox, serve_persistent,
};

use mic_console::backend::ConsoleBackend;
use mic_console::config::ConsoleConfig;
use mic_console::host::Host;

const NAME: &str = "mic-console";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    mic_backend_common::fail(NAME, msg)
}

/// `--print-capabilities`: vhost-user.json defines no features for
/// `console`.
fn capabilities() -> Capabilities {
    Capabilities::new(BackendType::Console, &[])
}

fn main() -> ExitCode {
    if let Some(code) = capabilities::print_if_requested(NAME, &capabilities()) {
        return code;
    }
    init_logging();
    let cfg = match parse_cli(NAME, ConsoleConfig::from_args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let host = match Host::open(&cfg.target, cfg.log.as_deref(), cfg.log_max_size) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    if let Some(p) = host.pty_path() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{NAME}: console on {}", p.display());
        let _ = out.flush();
    }
    let policy = mic_console::sandbox::policy(&cfg, host.pty_path());
    let backend = Arc::new(ConsoleBackend::new(host, cfg.multiport, cfg.queue_size));
    // The host side is open: confine the daemon before its socket appears.
    let sandbox = match sandbox::apply(cfg.sandbox, &policy) {
        Ok(r) => r,
        Err(e) => {
            backend.host().restore();
            return fail(e);
        }
    };
    let (shutdown, endpoint) = match open_endpoint(&cfg.socket) {
        Ok(x) => x,
        Err(e) => {
            backend.host().restore();
            return fail(e);
        }
    };
    sandbox.log();
    info!(
        "console: {:?}, multiport {}, queue size {}",
        cfg.target, cfg.multiport, cfg.queue_size
    );
    // The host side (terminal, socket, log) lives as long as the process;
    // the device state is reset for every new frontend.
    let result = serve_persistent(NAME, endpoint, &shutdown, &backend);
    backend.host().restore();
    exit_status(NAME, result)
}
