//! `micctl`: asks a running `vop-bridge` for its card's state, requests a
//! shutdown, or waits for a state (in the spirit of the X100's `micctrl`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use vop_bridge::control::request;

#[path = "micctl/agent.rs"]
mod agent;

#[derive(Parser)]
#[command(
    name = "micctl",
    version,
    about = "Control an emulated X100 card through its vop-bridge"
)]
struct Cli {
    /// The bridge's control socket (for `exec` and `cp`: the card's
    /// vhost-device-vsock UNIX socket, its `uds-path`).
    #[arg(long, short = 's', value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print `state=<state> shutdown_status=<status>`.
    Status,
    /// Ask the card to shut down.
    Shutdown,
    /// List the devices: index, type, backend socket, running/stopped/removing.
    Devices,
    /// Hot-add a device served by a vhost-user backend.
    Add {
        /// console, blk, net or vsock.
        #[arg(value_parser = ["console", "blk", "net", "vsock"])]
        kind: String,
        /// The backend's vhost-user socket.
        socket: PathBuf,
    },
    /// Hot-remove a device (the card acknowledges within 15 s).
    Remove {
        /// Index as `devices` shows it.
        index: usize,
    },
    /// Wait until the card reaches STATE (ready, booting, online, shutting_down,
    /// resetting, reset_failed).
    Wait {
        /// The state to wait for.
        state: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Run a command on the card through its agent; exits with its status.
    Exec(agent::ExecArgs),
    /// Copy a file to (`HOST CARD:PATH`) or from (`CARD:PATH HOST`) the card.
    Cp(agent::CpArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Status => request(&cli.socket, "status"),
        Cmd::Shutdown => request(&cli.socket, "shutdown"),
        Cmd::Devices => request(&cli.socket, "devices"),
        Cmd::Add { kind, socket } => {
            request(&cli.socket, &format!("add {kind} {}", socket.display()))
        }
        Cmd::Remove { index } => request(&cli.socket, &format!("remove {index}")),
        Cmd::Exec(a) => agent::exec(&cli.socket, a),
        Cmd::Cp(a) => agent::cp(&cli.socket, a),
        Cmd::Wait { state, timeout } => {
            let want = format!("state={state} ");
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                match request(&cli.socket, "status") {
                    Ok(s) if s.starts_with(&want) => break Ok(s),
                    Ok(_) | Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Ok(s) => {
                        eprintln!("micctl: timed out waiting for {state}; last: {s}");
                        std::process::exit(1);
                    }
                    Err(e) => break Err(e),
                }
            }
        }
    };
    match result {
        Ok(s) if s.starts_with("error") => {
            eprintln!("micctl: {s}");
            std::process::exit(1);
        }
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("micctl: {}: {e}", cli.socket.display());
            std::process::exit(1);
        }
    }
}
