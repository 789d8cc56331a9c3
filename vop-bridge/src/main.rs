//! `vop-bridge`: the host side of virtio-over-PCIe for one emulated X100 card.

use clap::Parser;
use log::error;

use vop_bridge::bridge::Bridge;
use vop_bridge::config::{BridgeConfig, Cli};

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
    let result = Bridge::new(cfg).and_then(|mut b| b.run());
    if let Err(e) = result {
        error!("{e}");
        std::process::exit(1);
    }
}
