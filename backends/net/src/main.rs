//! `mic-net`: vhost-user virtio-net backend for the MIC X100 card.
//!
//! The host side is a tap device (with offloads and multiqueue) or a QEMU
//! `-netdev stream` socket (rootless networking through passt, or a link to
//! another card or VM). See `backends/README.md`.

use std::process::ExitCode;
use std::sync::Arc;

use log::info;
use mic_backend_common::capabilities::{self, BackendType, Capabilities};
use mic_backend_common::control::StatsServer;
use mic_backend_common::{
    exit_status, init_logging, open_endpoint, parse_cli, sandbox, serve_persistent,
};

use mic_net::backend::{HostPort, NetBackend};
use mic_net::config::{format_mac, NetConfig, NetTransport};
use mic_net::limits::Accounting;
use mic_net::{stream, tap};

const NAME: &str = "mic-net";

/// Prints one error line and returns the failure exit code.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    mic_backend_common::fail(NAME, msg)
}

fn open_ports(cfg: &NetConfig) -> std::io::Result<Vec<HostPort>> {
    match &cfg.transport {
        NetTransport::Tap { name, host_ip } => {
            let (queues, ifname) = tap::open_tap(name, cfg.queue_pairs as usize)?;
            if let Err(e) = tap::configure_interface(&ifname, *host_ip, Some(cfg.mtu)) {
                if host_ip.is_some() {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("cannot configure {ifname}: {e}"),
                    ));
                }
                log::warn!("cannot bring {ifname} up: {e}");
            }
            info!(
                "tap {ifname}: {} queue(s){}",
                queues.len(),
                host_ip
                    .map(|h| format!(", host address {}/{}", h.addr, h.prefix))
                    .unwrap_or_default()
            );
            Ok(queues.into_iter().map(HostPort::Tap).collect())
        }
        NetTransport::Stream { addr, listen } => Ok(vec![HostPort::Stream(
            stream::StreamPort::new(addr.clone(), *listen)?,
        )]),
    }
}

/// `--print-capabilities`: vhost-user.json defines no features for `net`.
fn capabilities() -> Capabilities {
    Capabilities::new(BackendType::Net, &[])
}

fn main() -> ExitCode {
    if let Some(code) = capabilities::print_if_requested(NAME, &capabilities()) {
        return code;
    }
    init_logging();
    let cfg = match parse_cli(NAME, NetConfig::from_args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Everything that can fail because of the configuration happens before
    // the vhost-user socket is created.
    let ports = match open_ports(&cfg) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // Rate limits and counters (their timers are created before the
    // sandbox).
    let acct = match Accounting::new(ports.len(), cfg.limits.rx(), cfg.limits.tx()) {
        Ok(a) => Arc::new(a),
        Err(e) => return fail(format_args!("cannot create the throttle timers: {e}")),
    };
    let backend = match NetBackend::new(ports, cfg.mac, cfg.mtu, cfg.queue_size) {
        Ok(b) => Arc::new(b.with_accounting(acct.clone())),
        Err(e) => return fail(e),
    };
    // The host side is open: confine the daemon before its socket appears.
    let sandbox = match sandbox::apply(cfg.sandbox, &mic_net::sandbox::policy(&cfg)) {
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
        "mac {} mtu {} queue pairs {} queue size {}",
        format_mac(&cfg.mac),
        cfg.mtu,
        cfg.queue_pairs,
        cfg.queue_size
    );
    // The host side (tap, stream peer) lives as long as the process; the
    // device state is reset for every new frontend.
    let result = serve_persistent(NAME, endpoint, &shutdown, &backend);
    drop(stats);
    exit_status(NAME, result)
}
