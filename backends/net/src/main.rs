//! `mic-net`: vhost-user virtio-net backend for the MIC X100 card.
//!
//! The host side is a tap device (with offloads and multiqueue) or a QEMU
//! `-netdev stream` socket (rootless networking through passt, or a link to
//! another card or VM). See `backends/README.md`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use mic_backend_common::{init_logging, Endpoint, Shutdown, SocketArgs};
use std::os::unix::io::AsRawFd;

mod backend;
mod compat;
mod config;
mod stream;
mod tap;

use backend::{HostPort, NetBackend};
use config::{format_mac, NetArgs, NetConfig, NetTransport};

const NAME: &str = "mic-net";

/// Prints one error line and returns the failure exit code.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{NAME}: error: {msg}");
    ExitCode::FAILURE
}

fn parse_args() -> Result<NetConfig, ExitCode> {
    let args = match NetArgs::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            return Err(fail(line.trim_start_matches("error: ")));
        }
    };
    NetConfig::from_args(args).map_err(fail)
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

fn main() -> ExitCode {
    init_logging();
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Everything that can fail because of the configuration happens before
    // the vhost-user socket is created.
    let ports = match open_ports(&cfg) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let backend = match NetBackend::new(ports, cfg.mac, cfg.mtu, cfg.queue_size) {
        Ok(b) => Arc::new(b),
        Err(e) => return fail(e),
    };
    let shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let endpoint = match Endpoint::new(&SocketArgs {
        socket_path: cfg.socket_path.clone(),
        client: cfg.client,
    }) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    info!(
        "mac {} mtu {} queue pairs {} queue size {}",
        format_mac(&cfg.mac),
        cfg.mtu,
        cfg.queue_pairs,
        cfg.queue_size
    );
    let factory_backend = backend.clone();
    let result = compat::serve(
        NAME,
        endpoint,
        &shutdown,
        move || {
            // The host side (tap, stream peer) lives as long as the process;
            // the device state is reset for every new frontend.
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
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            fail(e)
        }
    }
}
