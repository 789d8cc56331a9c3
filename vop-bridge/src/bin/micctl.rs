//! `micctl`: the admin's tool for emulated X100 cards, in the spirit of
//! the X100's `micctrl` (`docs/micd.md`, "micctl").
//!
//! It talks to `micd` (cards by name, several at once, or `all`), or, when
//! `-s` names a `vop-bridge` control socket, to that one bridge as before
//! (`status`, `shutdown`, `devices`, `add`, `remove`, `wait STATE`).
//! `exec` and `cp` talk to the card agent through the card's vsock backend,
//! whose UNIX socket (`uds-path`) `-s` names (`docs/vsock.md`).
//!
//! Exit codes: 0 done; 1 failed (or micd unreachable); 2 usage or an
//! invalid value; 3 a transition the card's state does not allow; 4 no
//! such card; 5 `wait` timed out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[path = "micctl/agent.rs"]
mod agent;
#[path = "micctl/stats.rs"]
mod stats;

use vop_bridge::control::request;
use vop_bridge::micd::console::{self, Ended};
use vop_bridge::micd::layout::default_control_socket;
use vop_bridge::micd::protocol::{call, CardStatus, ClientError, Request, Response};

/// Exit code of a `wait` that timed out.
const EXIT_TIMEOUT: i32 = 5;
/// How long micd may take to answer (it may be starting a card).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Parser)]
#[command(
    name = "micctl",
    version,
    about = "Control emulated X100 cards through micd (or one card through its vop-bridge)"
)]
struct Cli {
    /// micd's control socket, or a vop-bridge control socket (default:
    /// $MIC_SOCKET, else micd.sock in micd's default state directory); for
    /// `exec` and `cp`, the card's vsock backend's UNIX socket.
    #[arg(long, short = 's', value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show cards (all when none is named).
    Status {
        /// Card names (mic0, mic1, ...) or `all`.
        cards: Vec<String>,
        /// Print the status as JSON (`docs/micd.md`, "Status JSON").
        #[arg(long)]
        json: bool,
    },
    /// Boot cards that are ready.
    Boot {
        /// Card names or `all`.
        #[arg(required = true)]
        cards: Vec<String>,
    },
    /// Shut online cards down (with a bridge socket: its card).
    Shutdown {
        /// Card names or `all`.
        cards: Vec<String>,
    },
    /// Reset cards (any state but ready).
    Reset {
        /// Card names or `all`.
        #[arg(required = true)]
        cards: Vec<String>,
    },
    /// Wait until every card named is in STATE (ready, booting, online,
    /// shutting_down, resetting, reset_failed).
    Wait {
        /// CARD... STATE (with a bridge socket: STATE alone).
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Change a card's settings (memory, cpus, firmware, ramdisk, bios,
    /// cmdline, overlay, accel while ready; autoboot, policy, shutdown_timeout,
    /// heartbeat, heartbeat_timeout, agent at any time).
    Config {
        /// The card.
        card: String,
        /// key=value settings.
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Attach this terminal to the card's console; Ctrl-] detaches and
    /// leaves the card running.
    Console {
        /// The card.
        card: String,
        /// Wait for the card's console, stay through reboots and crash
        /// recoveries, and end once the card stays down (`ready` or
        /// `reset_failed` for 3 s), as a serial console would.
        #[arg(long)]
        follow: bool,
    },
    /// Print the card's serial (kernel) and console history.
    Log {
        /// The card.
        card: String,
    },
    /// List a card's devices: index, type, backend socket, state.
    Devices {
        /// The card (not with a bridge socket).
        card: Option<String>,
    },
    /// A card's bridge's recent events, oldest first: attached (page
    /// adopted or published), detached, state changes, backends lost and
    /// back, devices removed.
    History {
        /// The card (not with a bridge socket).
        card: Option<String>,
    },
    /// Hot-add a device: [CARD] console|blk|net|vsock SOCKET.
    Add {
        /// [CARD] TYPE SOCKET.
        #[arg(required = true, num_args = 2..=3)]
        args: Vec<String>,
    },
    /// Hot-remove a device: [CARD] INDEX (the card acknowledges within 15 s).
    Remove {
        /// [CARD] INDEX.
        #[arg(required = true, num_args = 1..=2)]
        args: Vec<String>,
    },
    /// Per-queue stats of the card's mic-blk and mic-net backends:
    /// requests, bytes, errors, latency percentiles and rate limits.
    Stats {
        /// The card.
        card: String,
        /// Print `{"card": ..., "backends": {NAME: STATS}}` (each STATS as
        /// the backend's stats socket answers; backends/README.md, "Stats").
        #[arg(long)]
        json: bool,
    },
    /// Change the rate limits of one of the card's backends at run time:
    /// CARD BACKEND KEY=N... (blk0: iops, bps; net, link: rx_bps, rx_pps,
    /// tx_bps, tx_pps; each also KEY_burst; 0 is unlimited).
    Limit {
        /// The card.
        card: String,
        /// The backend (`blk0`, `net`...).
        backend: String,
        /// KEY=N settings.
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Run a command on the card through its agent; exits with its status.
    Exec(agent::ExecArgs),
    /// Copy a file to (`HOST CARD:PATH`) or from (`CARD:PATH HOST`) the card.
    Cp(agent::CpArgs),
}

fn fail(code: i32, msg: &str) -> ! {
    eprintln!("micctl: {msg}");
    std::process::exit(code);
}

fn main() {
    // SAFETY: signal(2) restores the default action for SIGPIPE before any
    // thread exists, so `micctl ... | head` ends quietly like other tools.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(default_control_socket);
    match cli.cmd {
        Cmd::Exec(a) => agent::exec(&agent_socket(&socket, a.card.as_deref()), a),
        Cmd::Cp(a) => agent::cp(&agent_socket(&socket, a.card()), a),
        _ => {}
    }
    let Some(req) = micd_request(&cli.cmd) else {
        // Only a bridge understands this form.
        std::process::exit(bridge(&socket, &cli.cmd));
    };
    match call(&socket, &req, ANSWER_TIMEOUT) {
        Ok(resp) => std::process::exit(micd(&socket, &cli.cmd, resp)),
        // A vop-bridge answers micd's JSON with its own error line.
        Err(ClientError::NotMicd(_)) => std::process::exit(bridge(&socket, &cli.cmd)),
        Err(e) => fail(1, &format!("{e}: {}", cause(&e))),
    }
}

/// Where the card agent of `card` is reached: through micd, the card's
/// vsock socket from its status; otherwise `socket` names that vsock socket
/// itself.
fn agent_socket(socket: &Path, card: Option<&str>) -> PathBuf {
    let Some(card) = card else {
        return socket.to_path_buf();
    };
    let req = Request::Status {
        cards: vec![card.to_string()],
    };
    match call(socket, &req, ANSWER_TIMEOUT) {
        Ok(resp) if !resp.ok => std::process::exit(errors(&resp).max(1)),
        Ok(resp) => match resp.cards.first() {
            Some(CardStatus {
                vsock_socket: Some(s),
                ..
            }) => PathBuf::from(s),
            Some(c) => fail(
                3,
                &format!("{card} is {}: its agent is not reachable", c.state),
            ),
            None => fail(4, &format!("no card {card}")),
        },
        // Not micd: the card's vsock socket itself.
        Err(_) => socket.to_path_buf(),
    }
}

fn cause(e: &dyn std::error::Error) -> String {
    e.source().map_or_else(String::new, |s| s.to_string())
}

/// The micd request for a command; `None` for forms only a bridge takes.
fn micd_request(cmd: &Cmd) -> Option<Request> {
    Some(match cmd {
        Cmd::Status { cards, .. } => Request::Status {
            cards: cards.clone(),
        },
        Cmd::Boot { cards } => Request::Boot {
            cards: cards.clone(),
        },
        Cmd::Shutdown { cards } if !cards.is_empty() => Request::Shutdown {
            cards: cards.clone(),
        },
        Cmd::Reset { cards } => Request::Reset {
            cards: cards.clone(),
        },
        Cmd::Wait { args, .. } if args.len() >= 2 => Request::Status {
            cards: args[..args.len() - 1].to_vec(),
        },
        Cmd::Config { card, settings } => Request::Config {
            card: card.clone(),
            settings: settings.clone(),
        },
        Cmd::Log { card } => Request::Log { card: card.clone() },
        Cmd::Stats { card, .. } | Cmd::Limit { card, .. } => Request::Status {
            cards: vec![card.clone()],
        },
        Cmd::Console { card, .. } => Request::Status {
            cards: vec![card.clone()],
        },
        Cmd::Devices { card: Some(card) } => Request::Bridge {
            card: card.clone(),
            line: "devices".into(),
        },
        Cmd::History { card: Some(card) } => Request::Bridge {
            card: card.clone(),
            line: "history".into(),
        },
        Cmd::Add { args } if args.len() == 3 => Request::Bridge {
            card: args[0].clone(),
            line: format!("add {} {}", args[1], args[2]),
        },
        Cmd::Remove { args } if args.len() == 2 => Request::Bridge {
            card: args[0].clone(),
            line: format!("remove {}", args[1]),
        },
        _ => return None,
    })
}

/// Prints micd's errors; the exit code of the first.
fn errors(resp: &Response) -> i32 {
    for e in &resp.errors {
        eprintln!("micctl: {}", e.message);
    }
    resp.errors.first().map_or(0, |e| e.kind.exit_code())
}

fn micd(socket: &Path, cmd: &Cmd, resp: Response) -> i32 {
    if !resp.ok {
        return errors(&resp).max(1);
    }
    match cmd {
        Cmd::Status { json: true, .. } => {
            /// The documented shape: `{"cards": [...]}`, fields in order.
            #[derive(serde::Serialize)]
            struct Out<'a> {
                cards: &'a [CardStatus],
            }
            let out = Out { cards: &resp.cards };
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Cmd::Status { .. } => resp.cards.iter().for_each(print_card),
        Cmd::Boot { .. } | Cmd::Shutdown { .. } | Cmd::Reset { .. } => {
            for c in &resp.cards {
                println!("{}: {}", c.name, c.state);
            }
        }
        Cmd::Wait { args, timeout } => {
            let (cards, state) = args.split_at(args.len() - 1);
            return wait_micd(socket, cards, &state[0], *timeout, resp);
        }
        Cmd::Config { .. } => {}
        Cmd::Console { card, follow } => return console(socket, card, *follow, &resp),
        Cmd::Stats { card, json } => {
            return match resp.cards.first() {
                Some(c) => stats::show(c, *json),
                None => fail(4, &format!("no card {card}")),
            }
        }
        Cmd::Limit {
            card,
            backend,
            settings,
        } => {
            return match resp.cards.first() {
                Some(c) => stats::limit(c, backend, settings),
                None => fail(4, &format!("no card {card}")),
            }
        }
        _ => {
            let text = resp.text.unwrap_or_default();
            print!("{text}");
            if !text.is_empty() && !text.ends_with('\n') {
                println!();
            }
        }
    }
    0
}

fn wait_micd(socket: &Path, cards: &[String], state: &str, timeout: u64, first: Response) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut resp = first;
    loop {
        let behind: Vec<&CardStatus> = resp.cards.iter().filter(|c| c.state != state).collect();
        if behind.is_empty() {
            return 0;
        }
        if Instant::now() >= deadline {
            let s: Vec<_> = behind
                .iter()
                .map(|c| format!("{} is {}", c.name, c.state))
                .collect();
            eprintln!("micctl: timed out waiting for {state}: {}", s.join(", "));
            return EXIT_TIMEOUT;
        }
        std::thread::sleep(Duration::from_millis(200));
        let req = Request::Status {
            cards: cards.to_vec(),
        };
        match call(socket, &req, ANSWER_TIMEOUT) {
            Ok(r) if r.ok => resp = r,
            Ok(r) => return errors(&r).max(1),
            Err(e) => fail(1, &format!("{e}: {}", cause(&e))),
        }
    }
}

/// How long a card must stay down before `console --follow` ends.
const FOLLOW_DOWN: Duration = Duration::from_secs(3);

/// Relays this terminal to the card's console until Ctrl-]; with `follow`,
/// across the card's reboots until it stays down.
fn console(socket: &Path, card: &str, follow: bool, first: &Response) -> i32 {
    use mic_backend_common::terminal::RawTerminal;
    use std::io::IsTerminal;

    let tty = std::io::stdin().is_terminal();
    // Raw until this function returns, then exactly as it was.
    let _raw = tty.then(|| RawTerminal::new(libc::STDIN_FILENO).ok());
    let code = if follow {
        follow_console(socket, card, first)
    } else {
        match first
            .cards
            .first()
            .map(|c| (c, c.console_socket.as_deref()))
        {
            Some((_, Some(path))) => match attach(card, path, tty) {
                Attached::Ended(code) => code,
                Attached::Closed => 1,
                Attached::Refused(e) => {
                    eprintln!("micctl: {path}: {e} (is another console attached?)\r");
                    1
                }
            },
            Some((c, None)) => {
                eprintln!("micctl: {card} is {}: it has no console now\r", c.state);
                3
            }
            None => 1,
        }
    };
    code
}

/// How one attachment to a console ended.
enum Attached {
    /// Detached, or the input ended: micctl's exit code.
    Ended(i32),
    /// The console closed: the card stopped.
    Closed,
    /// The console could not be reached.
    Refused(std::io::Error),
}

fn attach(card: &str, path: &str, tty: bool) -> Attached {
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => return Attached::Refused(e),
    };
    if tty {
        eprintln!("micctl: attached to {card}; Ctrl-] detaches\r");
    }
    match console::relay(stream, std::io::stdin(), std::io::stdout()) {
        Ok(Ended::ConsoleClosed) => {
            eprintln!("\r\nmicctl: {card}'s console closed\r");
            Attached::Closed
        }
        Ok(_) => {
            if tty {
                eprintln!("\r\nmicctl: detached from {card}; it keeps running\r");
            }
            Attached::Ended(0)
        }
        Err(e) => {
            eprintln!("micctl: {card}'s console: {e}\r");
            Attached::Ended(1)
        }
    }
}

/// `console --follow`: attaches whenever the card has a console and ends
/// on a detach, or once the card has been down for [`FOLLOW_DOWN`].
fn follow_console(socket: &Path, card: &str, first: &Response) -> i32 {
    use std::io::IsTerminal;
    let tty = std::io::stdin().is_terminal();
    let mut status = first.cards.first().cloned();
    let mut down_since: Option<Instant> = None;
    // micd busy (starting its shared processes, a loaded machine): ask
    // again for a while before giving up.
    let mut unanswered_since: Option<Instant> = None;
    loop {
        let Some(c) = status.take() else {
            return 1;
        };
        match c.console_socket.as_deref() {
            Some(path) if c.state == "booting" || c.state == "online" => {
                down_since = None;
                // Refused: its backend is still starting; closed: the card
                // stopped. Either way, look again.
                if let Attached::Ended(code) = attach(card, path, tty) {
                    return code;
                }
            }
            _ if c.state == "ready" || c.state == "reset_failed" => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= FOLLOW_DOWN {
                    return 0;
                }
            }
            _ => down_since = None,
        }
        std::thread::sleep(Duration::from_millis(100));
        let req = Request::Status {
            cards: vec![card.to_string()],
        };
        match call(socket, &req, ANSWER_TIMEOUT) {
            Ok(r) if r.ok => {
                unanswered_since = None;
                status = r.cards.into_iter().next();
            }
            Ok(r) => return errors(&r).max(1),
            Err(_)
                if unanswered_since.get_or_insert_with(Instant::now).elapsed()
                    < FOLLOW_DOWN * 10 =>
            {
                status = Some(c);
                down_since = None;
            }
            // micd went away: nothing more will come.
            Err(_) => return 1,
        }
    }
}

fn print_card(c: &CardStatus) {
    let last = if c.last_shutdown_status != "nop" {
        format!(", last {}", c.last_shutdown_status)
    } else {
        String::new()
    };
    println!(
        "{}: {} (shutdown_status {}{last}) family {} {} node {} up {} s, {} boot(s), policy {}",
        c.name,
        c.state,
        c.shutdown_status,
        c.family,
        c.stepping,
        c.node,
        c.uptime_s,
        c.boots,
        c.policy
    );
    println!("  memory {} MiB, {} cpu(s)", c.memory, c.cpus);
    println!("  firmware {}", c.firmware);
    println!("  ramdisk  {}", c.ramdisk);
    if let Some(o) = &c.overlay {
        println!("  overlay  {o}");
    }
    println!("  cmdline  {}", c.cmdline);
    for d in &c.devices {
        let pid = d.pid.map_or("-".to_string(), |p| p.to_string());
        let image = d
            .image
            .as_deref()
            .map_or(String::new(), |i| format!(" {i}"));
        println!("  device {} by {} (pid {pid}){image}", d.kind, d.backend);
    }
    match (&c.network.card_ip, &c.network.host_ip) {
        (Some(ip), Some(host)) => {
            println!("  network {ip}, host {host} ({})", c.network.mode)
        }
        _ => println!("  network none"),
    }
    let hb = &c.heartbeat;
    let timeout = if hb.enabled {
        format!("timeout {} s", hb.timeout_s)
    } else {
        "not watched".to_string()
    };
    match (hb.count, hb.age_ms, hb.period_ms) {
        (Some(n), Some(age), Some(period)) => {
            println!("  heartbeat {n}, {age} ms ago, every {period} ms ({timeout})")
        }
        _ => println!("  heartbeat none yet ({timeout})"),
    }
    if let Some(e) = &c.last_error {
        println!("  last error: {e}");
    }
}

/// The commands of one vop-bridge's control socket (`vop_bridge::control`).
fn bridge(socket: &Path, cmd: &Cmd) -> i32 {
    let one = |line: &str| request(socket, line);
    let result = match cmd {
        Cmd::Status { cards, .. } if cards.is_empty() => one("status"),
        Cmd::Shutdown { cards } if cards.is_empty() => one("shutdown"),
        Cmd::Devices { card: None } => one("devices"),
        Cmd::History { card: None } => one("history"),
        Cmd::Add { args } if args.len() == 2 => one(&format!("add {} {}", args[0], args[1])),
        Cmd::Remove { args } if args.len() == 1 => one(&format!("remove {}", args[0])),
        Cmd::Wait { args, timeout } if args.len() == 1 => {
            let state = &args[0];
            let want = format!("state={state} ");
            let deadline = Instant::now() + Duration::from_secs(*timeout);
            loop {
                match one("status") {
                    Ok(s) if s.starts_with(&want) => break Ok(s),
                    Ok(_) | Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Ok(s) => {
                        eprintln!("micctl: timed out waiting for {state}; last: {s}");
                        return EXIT_TIMEOUT;
                    }
                    Err(e) => break Err(e),
                }
            }
        }
        _ => fail(
            2,
            &format!(
                "{} is not micd's socket, and a bridge takes: status, shutdown, devices, \
                 history, add TYPE SOCKET, remove INDEX, wait STATE",
                socket.display()
            ),
        ),
    };
    match result {
        Ok(s) if s.starts_with('{') => fail(
            2,
            &format!("{} is micd's socket: name the card(s)", socket.display()),
        ),
        Ok(s) if s.starts_with("error") => {
            eprintln!("micctl: {s}");
            1
        }
        Ok(s) => {
            println!("{s}");
            0
        }
        Err(e) => fail(1, &format!("{}: {e}", socket.display())),
    }
}
