//! `micctl exec` and `micctl cp`: the card agent's commands
//! (`vop_bridge::agent_client`; `docs/vsock.md`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use mic_backend_common::terminal::{window_size, RawTerminal};
use vop_bridge::agent_client::{copy_from_card, copy_to_card, AgentClient};

/// `micctl exec [-t] [CARD] -- CMD ARGS...`
#[derive(Args)]
pub struct ExecArgs {
    /// Run the command on a pseudo-terminal in the card (stdout and stderr
    /// both come through it); this terminal is raw meanwhile.
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// The card (through micd); without it, `-s` names the card's vsock
    /// socket.
    pub card: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    argv: Vec<String>,
}

/// `micctl cp SRC DST`, one of them `CARD:PATH`.
#[derive(Args)]
pub struct CpArgs {
    /// Source: a host path or CARD:PATH.
    src: String,
    /// Destination: a host path or CARD:PATH.
    dst: String,
}

/// How long `exec` and `cp` wait for an agent that is not listening yet (a
/// card just online is still starting it).
const AGENT_START_WAIT: Duration = Duration::from_secs(10);

fn fail(what: &str, e: &dyn std::error::Error) -> ! {
    let mut text = format!("micctl: {what}: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    eprintln!("{text}");
    // 255, as ssh does, so that it cannot be mistaken for the command's.
    std::process::exit(255)
}

impl CpArgs {
    /// The card named by the `CARD:PATH` argument.
    pub fn card(&self) -> Option<&str> {
        [&self.src, &self.dst]
            .into_iter()
            .find(|a| card_path(a).is_some())
            .and_then(|a| a.split_once(':'))
            .map(|(card, _)| card)
    }
}

/// Runs the command; exits with its status (128 + N for signal N).
pub fn exec(socket: &Path, a: ExecArgs) -> ! {
    let client =
        AgentClient::connect_when_up(socket, AGENT_START_WAIT).unwrap_or_else(|e| fail("exec", &e));
    let status = if a.tty {
        use std::io::IsTerminal;
        use std::os::fd::AsRawFd;
        let stdin = std::io::stdin();
        let fd = stdin.as_raw_fd();
        let size = window_size(if stdin.is_terminal() { fd } else { 1 });
        // Raw only when stdin is a terminal; restored (drop) before exit.
        let raw = stdin
            .is_terminal()
            .then(|| RawTerminal::new(fd))
            .transpose()
            .unwrap_or_else(|e| fail("exec -t", &e));
        let r = client.exec_tty(&a.argv, size, stdin, &mut std::io::stdout().lock());
        drop(raw);
        r
    } else {
        client.exec(
            &a.argv,
            std::io::stdin(),
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
    };
    let status = status.unwrap_or_else(|e| fail("exec", &e));
    std::process::exit(status.shell_status())
}

/// The card path of a `CARD:PATH` argument (`CARD` is any name without a
/// slash, e.g. `mic0`).
fn card_path(arg: &str) -> Option<&str> {
    let (card, path) = arg.split_once(':')?;
    (!card.is_empty() && !card.contains('/')).then_some(path)
}

/// Copies one file; exits 0 or 255.
pub fn cp(socket: &Path, a: CpArgs) -> ! {
    if let Err(e) = AgentClient::connect_when_up(socket, AGENT_START_WAIT) {
        fail("cp", &e);
    }
    let result = match (card_path(&a.src), card_path(&a.dst)) {
        (None, Some(remote)) => copy_to_card(socket, Path::new(&a.src), remote),
        (Some(remote), None) => copy_from_card(socket, remote, &PathBuf::from(&a.dst)),
        _ => {
            eprintln!("micctl: cp: exactly one of SRC and DST is CARD:PATH");
            std::process::exit(2)
        }
    };
    if let Err(e) = result {
        fail("cp", &e);
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::card_path;

    #[test]
    fn card_paths() {
        assert_eq!(card_path("mic0:/tmp/x"), Some("/tmp/x"));
        assert_eq!(card_path("card:rel"), Some("rel"));
        assert_eq!(card_path("/host/a:b"), None);
        assert_eq!(card_path(":/x"), None);
        assert_eq!(card_path("plain"), None);
    }
}
