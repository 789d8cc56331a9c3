//! `mic-blk`: vhost-user-blk backend daemon serving a raw image file.
//!
//! Thin entry point: parse and validate the command line, open the image,
//! then hand over to the shared daemon loop. Every startup error is reported
//! as one line on stderr with a non-zero exit status, before the socket is
//! created.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::info;
use mic_backend_common::capabilities::{self, BackendType, Capabilities};
use mic_backend_common::control::StatsServer;
use mic_backend_common::worker::Worker;
use mic_backend_common::{init_logging, open_endpoint, sandbox, serve_tracking};

use mic_blk::backend::{BlkBackend, BlkParams};
use mic_blk::config::{BlkConfig, Cli};
use mic_blk::disk::Disk;
use mic_blk::limits::Accounting;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mic-blk: {msg}");
    ExitCode::FAILURE
}

/// `--print-capabilities`: both features vhost-user.json defines for
/// `block`, the options `--read-only` and `--blk-file` (aliases of
/// `--readonly` and `--image`).
fn capabilities() -> Capabilities {
    Capabilities::new(BackendType::Block, &["read-only", "blk-file"])
}

fn main() -> ExitCode {
    if let Some(code) = capabilities::print_if_requested("mic-blk", &capabilities()) {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line without its "error: " prefix.
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("mic-blk: {line} (see --help)");
            return ExitCode::from(2);
        }
    };
    let cfg = match BlkConfig::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mic-blk: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();

    let disk = match Disk::open(&cfg.image, cfg.readonly, cfg.direct) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            return fail(format_args!(
                "cannot open image {}: {e}",
                cfg.image.display()
            ))
        }
    };
    if disk.sectors() == 0 {
        return fail(format_args!(
            "image {} is smaller than one sector",
            cfg.image.display()
        ));
    }
    // Rate limits and counters live as long as the daemon (their timers are
    // created before the sandbox).
    let acct = match Accounting::new(cfg.num_queues, cfg.limits.limits()) {
        Ok(a) => Arc::new(a),
        Err(e) => return fail(format_args!("cannot create the throttle timers: {e}")),
    };
    // Everything the daemon serves is open: confine it before its socket
    // appears.
    let sandbox = match sandbox::apply(cfg.sandbox, &mic_blk::sandbox::policy(&cfg)) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // Before any other thread starts (SIGUSR1 is blocked in all of them).
    let stats = match StatsServer::start(cfg.limits.stats_socket.as_deref(), acct.served()) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let (shutdown, endpoint) = match open_endpoint(&cfg.socket) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    sandbox.log();
    info!(
        "serving {} ({} bytes, {} sectors{}{}), {} queue(s) of up to {} entries",
        cfg.image.display(),
        disk.size(),
        disk.sectors(),
        if cfg.readonly { ", read-only" } else { "" },
        if cfg.direct { ", O_DIRECT" } else { "" },
        cfg.num_queues,
        cfg.queue_size
    );
    let params = BlkParams {
        serial: cfg.serial,
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        io_threads: cfg.io_threads,
        poll: cfg.poll,
    };
    let result = serve_tracking(
        "mic-blk",
        endpoint,
        &shutdown,
        || BlkBackend::with_accounting(disk.clone(), params.clone(), acct.clone()),
        |daemon| {
            let workers: Vec<Worker> = daemon
                .get_epoll_handlers()
                .into_iter()
                .map(|h| h as Worker)
                .collect();
            acct.attach(&workers)
        },
    );
    drop(stats);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
