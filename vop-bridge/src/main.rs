//! `vop-bridge`: the host side of virtio-over-PCIe for one emulated X100 card.
//!
//! The process owns the event loop and the stop signals; the card's
//! [`Bridge`] registers its descriptors with the loop.

use clap::Parser;
use log::{error, info};
use vmm_sys_util::epoll::EventSet;

use vop_bridge::bridge::{Bridge, BridgeError, Report};
use vop_bridge::config::{BridgeConfig, Cli};
use vop_bridge::event_loop::{EventHandler, EventLoop, Flow, Token};
use vop_bridge::signals::{StopSignals, StopWatch};
use vop_bridge::watchdog::Watchdog;

/// How long a stop signal leaves the bridge to stop cleanly before the
/// process ends anyway: within a second in every state.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(800);

/// One card's bridge, stopped by SIGINT/SIGTERM.
struct Process {
    signals: StopWatch,
    bridge: Bridge,
}

impl EventHandler for Process {
    type Error = BridgeError;

    fn handle_event(
        &mut self,
        ev: &EventLoop,
        token: Token,
        _events: EventSet,
    ) -> Result<Flow, BridgeError> {
        match token {
            Token::Signal if self.signals.pending() => {
                info!("signal received; stopping");
                Ok(Flow::Stop)
            }
            Token::Signal => Ok(Flow::Continue),
            t => self.bridge.handle_event(ev, t),
        }
    }
}

fn run(cfg: BridgeConfig) -> Result<(), BridgeError> {
    use std::os::fd::AsRawFd;
    // Before any other thread: they inherit the blocked signals.
    let signals = StopSignals::new()?.watch(STOP_GRACE, || Watchdog::global().expire_all())?;
    let ev = EventLoop::new()?;
    ev.add(signals.as_raw_fd(), Token::Signal, EventSet::IN)?;
    let bridge = match Bridge::new(cfg, 0) {
        Ok(b) => b,
        // A signal while connecting the backends cut their handshakes short.
        Err(_) if Watchdog::global().stopping() => {
            info!("signal received while connecting; stopping");
            signals.finished();
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let mut p = Process { signals, bridge };
    if p.bridge.register(&ev)? == Flow::Continue {
        ev.run(&mut p)?;
    }
    p.bridge.stop(&ev);
    p.signals.finished();
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cfg = match BridgeConfig::from_cli(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vop-bridge: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cfg) {
        error!("{}", Report(&e));
        std::process::exit(1);
    }
}
