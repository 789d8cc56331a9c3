//! `micd`: runs any number of emulated X100 cards, each with its QEMU,
//! bridge and backends, through the COSM lifecycle (`docs/micd.md`).
//!
//! SIGINT/SIGTERM stop micd and leave the cards running; a new micd on the
//! same state directory adopts them.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use vmm_sys_util::epoll::EventSet;

use vop_bridge::event_loop::{EventHandler, EventLoop, EventLoopError, Flow, Token};
use vop_bridge::micd::config::{MicdConfig, NetMode};
use vop_bridge::micd::launch::{Shared, Tools};
use vop_bridge::micd::layout::{control_socket, default_state_dir, private_dir};
use vop_bridge::micd::report;
use vop_bridge::micd::server::{Cards, ControlSocket};
use vop_bridge::micd::supervisor::CardHandle;
use vop_bridge::micd::{link, vsock_group};
use vop_bridge::signals::StopSignals;

#[derive(Parser)]
#[command(
    name = "micd",
    version,
    about = "Host daemon for emulated MIC X100 cards: boots, supervises and resets each card \
             (QEMU, vop-bridge, backends) and answers micctl"
)]
struct Cli {
    /// A TOML file with one table per card ([mic0], [mic1], ...).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cards mic0 .. mic(N-1), with defaults where the file has none
    /// (default: 1 without a file).
    #[arg(long, value_name = "N")]
    cards: Option<u16>,
    /// Sockets, logs, pid files and created disk images (default:
    /// $XDG_RUNTIME_DIR/micd, or /run/micd as root).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// micd's main loop failed.
#[derive(Debug, thiserror::Error)]
#[error("micd's event loop")]
struct LoopFailed(#[from] EventLoopError);

/// The process: its signals and its control socket.
struct Daemon {
    signals: StopSignals,
    socket: ControlSocket,
    cards: Arc<Cards>,
}

impl EventHandler for Daemon {
    type Error = LoopFailed;

    fn handle_event(
        &mut self,
        _ev: &EventLoop,
        token: Token,
        _events: EventSet,
    ) -> Result<Flow, LoopFailed> {
        match token {
            Token::Signal if self.signals.pending() => {
                info!("signal received; stopping micd, the cards keep running");
                Ok(Flow::Stop)
            }
            Token::Control { .. } => {
                self.socket.accept_all(&self.cards);
                Ok(Flow::Continue)
            }
            _ => Ok(Flow::Continue),
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let mut cfg = match &cli.config {
        Some(p) => MicdConfig::load(p).map_err(|e| report(&e))?,
        None => MicdConfig::default(),
    };
    let default_cards = if cli.config.is_some() { 0 } else { 1 };
    cfg = cfg.with_cards(cli.cards.unwrap_or(default_cards));
    if cfg.cards.is_empty() {
        return Err("no cards configured".into());
    }
    // Logs, images and sockets of micd and the cards' processes are the
    // owner's alone.
    // SAFETY: umask(2) only sets the process's file mode mask.
    unsafe { libc::umask(0o077) };
    let state_dir = cli.state_dir.unwrap_or_else(default_state_dir);
    private_dir(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    // Blocks SIGINT/SIGTERM for every thread started after it.
    let signals = StopSignals::new().map_err(|e| report(&e))?;
    let socket = ControlSocket::bind(&control_socket(&state_dir))
        .map_err(|e| format!("{}: {e}", control_socket(&state_dir).display()))?;
    let tools = Tools::from_env();
    info!(
        "micd: {} card(s), state in {}, QEMU {}, card image {}",
        cfg.cards.len(),
        state_dir.display(),
        tools.qemu.display(),
        tools.image_dir.display()
    );
    // Cards on passt have no path to each other but this link.
    let linked = at_least_two(
        cfg.cards
            .iter()
            .filter(|(_, c)| c.net == NetMode::Passt && c.link)
            .map(|(i, _)| *i),
    );
    link::run(&tools.qemu, &state_dir, &linked).map_err(|e| report(&e))?;
    let grouped = at_least_two(
        cfg.cards
            .iter()
            .filter(|(_, c)| c.vsock && c.vsock_peers)
            .map(|(i, _)| *i),
    );
    vsock_group::run(&tools.vsock, &state_dir, &grouped).map_err(|e| report(&e))?;
    let mut handles = BTreeMap::new();
    for (i, c) in cfg.cards {
        let shared = Shared {
            link: linked.contains(&i),
            vsock_group: grouped.contains(&i),
        };
        let h = CardHandle::start(i, c, &state_dir, tools.clone(), shared)
            .map_err(|e| format!("mic{i}: cannot start its supervisor: {e}"))?;
        handles.insert(i, h);
    }
    let ev = EventLoop::new().map_err(|e| report(&e))?;
    ev.add(signals.as_raw_fd(), Token::Signal, EventSet::IN)
        .map_err(|e| report(&e))?;
    ev.add(socket.as_raw_fd(), Token::Control { card: 0 }, EventSet::IN)
        .map_err(|e| report(&e))?;
    let mut d = Daemon {
        signals,
        socket,
        cards: Arc::new(Cards::new(handles)),
    };
    ev.run(&mut d).map_err(|e| report(&e))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if let Err(e) = run(Cli::parse()) {
        error!("{e}");
        eprintln!("micd: {e}");
        std::process::exit(1);
    }
}

/// The cards of a group of several (`link.rs`, `vsock_group.rs`): none
/// unless there are at least two.
fn at_least_two(cards: impl Iterator<Item = u16>) -> Vec<u16> {
    let cards: Vec<u16> = cards.collect();
    if cards.len() >= 2 {
        cards
    } else {
        Vec::new()
    }
}
