//! One card's COSM lifecycle as micd drives it from the host
//! (`docs/micd.md`, "Lifecycle"; the states and shutdown statuses are those
//! of `docs/vop-abi.md` section 6 and Linux's COSM sysfs `state`).
//!
//! In micd a card is `ready` when its QEMU is not running: `boot` starts
//! the card's machine, a reset powers it off. QEMU runs with `-no-reboot`,
//! so a reboot or a crash in the card ends the machine and this state
//! machine decides, as mpssd did, whether the card boots again.
//!
//! Pure: inputs in, [`Action`]s out; the supervisor performs them.

use serde::{Deserialize, Serialize};

pub use crate::abi::{CardState, ShutdownStatus};

/// What micd does after a crash (mpssd's policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Reset the card and boot it again.
    #[default]
    Reboot,
    /// Reset the card and leave it `ready`.
    StayDown,
}

impl Policy {
    /// Parses `reboot` or `stay-down`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reboot" => Some(Policy::Reboot),
            "stay-down" => Some(Policy::StayDown),
            _ => None,
        }
    }

    /// Name as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Reboot => "reboot",
            Policy::StayDown => "stay-down",
        }
    }
}

/// A host command (`micctl boot`, `shutdown`, `reset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Start the card from `ready`.
    Boot,
    /// Ask an `online` card to power off.
    Shutdown,
    /// Power the card's machine off from any state but `ready`.
    Reset,
}

impl Op {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Boot => "boot",
            Op::Shutdown => "shutdown",
            Op::Reset => "reset",
        }
    }
}

/// Something that moves the card's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// A host command.
    Host(Op),
    /// The card's bridge reported this state and shutdown status.
    Reported(CardState, ShutdownStatus),
    /// The card's QEMU exited; the bridge's last shutdown status.
    MachineGone(ShutdownStatus),
    /// Starting the card's processes failed.
    StartFailed,
    /// Every process of the card has stopped (after [`Action::StopCard`]).
    Stopped,
    /// The card's QEMU did not stop in time.
    StopFailed,
    /// The card stayed `shutting_down` for too long.
    ShutdownTimedOut,
    /// The card's heartbeat was not heard for the timeout
    /// ([`super::heartbeat::HeartbeatCheck`]).
    HeartbeatMissed,
}

/// What the supervisor must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the backends, QEMU and the bridge with the current config.
    StartCard,
    /// Ask the card to power off (through its bridge).
    RequestShutdown,
    /// Stop QEMU (SIGTERM, then SIGKILL), then the bridge and backends;
    /// answer with [`Input::Stopped`] or [`Input::StopFailed`].
    StopCard,
}

/// A host command the current state does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("is {state}: {hint}")]
pub struct Refused {
    /// The refused command.
    pub op: Op,
    /// The state it was refused in.
    pub state: CardState,
    /// What to do instead.
    pub hint: &'static str,
}

/// The card's state, shutdown status and policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    state: CardState,
    status: ShutdownStatus,
    last_status: ShutdownStatus,
    policy: Policy,
    boot_after_reset: bool,
}

impl Lifecycle {
    /// A card that is not running.
    pub fn new(policy: Policy) -> Self {
        Lifecycle {
            state: CardState::Ready,
            status: ShutdownStatus::Nop,
            last_status: ShutdownStatus::Nop,
            policy,
            boot_after_reset: false,
        }
    }

    /// A running card found when micd starts, in the state its bridge
    /// reports (`booting` when the bridge does not answer yet).
    pub fn adopted(policy: Policy, reported: Option<(CardState, ShutdownStatus)>) -> Self {
        let mut l = Lifecycle::new(policy);
        let (state, status) = reported.unwrap_or((CardState::Booting, ShutdownStatus::Nop));
        l.state = match state {
            CardState::Online | CardState::ShuttingDown => state,
            _ => CardState::Booting,
        };
        l.note(status, state);
        l
    }

    /// Current state.
    pub fn state(&self) -> CardState {
        self.state
    }

    /// Shutdown status (COSM's: back to `nop` after a reset or a boot).
    pub fn shutdown_status(&self) -> ShutdownStatus {
        self.status
    }

    /// The last status other than `nop` (kept across resets).
    pub fn last_shutdown_status(&self) -> ShutdownStatus {
        self.last_status
    }

    /// Restores the last status other than nop (from micd's record).
    pub fn restore_last_status(&mut self, status: ShutdownStatus) {
        self.last_status = status;
    }

    /// Current policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Changes the policy (allowed in any state).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Whether the card's processes should be running.
    pub fn is_running(&self) -> bool {
        matches!(
            self.state,
            CardState::Booting | CardState::Online | CardState::ShuttingDown
        )
    }

    fn note(&mut self, status: ShutdownStatus, state: CardState) {
        if status != ShutdownStatus::Nop {
            self.status = status;
            self.last_status = status;
        } else if state == CardState::Online {
            // Online again, the card cleared its status.
            self.status = ShutdownStatus::Nop;
        }
    }

    fn refuse(&self, op: Op) -> Refused {
        let hint = match (op, self.state) {
            (Op::Reset, _) => "there is nothing to reset",
            (Op::Shutdown, CardState::Ready) => "boot it first",
            (Op::Shutdown, CardState::Booting) => "wait for online or reset it",
            (Op::Boot, CardState::Online) => "shut it down or reset it first",
            (_, CardState::ShuttingDown | CardState::Resetting) => "wait for ready or reset it",
            (_, CardState::ResetFailed) => "reset it first",
            _ => "reset it first",
        };
        Refused {
            op,
            state: self.state,
            hint,
        }
    }

    fn boot(&mut self) -> Vec<Action> {
        self.state = CardState::Booting;
        self.status = ShutdownStatus::Nop;
        self.boot_after_reset = false;
        vec![Action::StartCard]
    }

    fn reset(&mut self, boot_after: bool) -> Vec<Action> {
        self.state = CardState::Resetting;
        self.boot_after_reset = boot_after;
        vec![Action::StopCard]
    }

    /// Whether a card that ended with `status` boots again.
    fn boots_again(&self, status: ShutdownStatus) -> bool {
        match status {
            ShutdownStatus::Restart => true,
            ShutdownStatus::Crashed => self.policy == Policy::Reboot,
            _ => false,
        }
    }

    /// Applies a host command; the actions to perform, or why not.
    pub fn command(&mut self, op: Op) -> Result<Vec<Action>, Refused> {
        match (op, self.state) {
            (Op::Boot, CardState::Ready) => Ok(self.boot()),
            (Op::Shutdown, CardState::Online) => {
                self.state = CardState::ShuttingDown;
                Ok(vec![Action::RequestShutdown])
            }
            (Op::Reset, s) if s != CardState::Ready => Ok(self.reset(false)),
            _ => Err(self.refuse(op)),
        }
    }

    /// Applies any input; returns the actions to perform (a refused host
    /// command yields none: use [`Lifecycle::command`] to learn why).
    pub fn apply(&mut self, input: Input) -> Vec<Action> {
        use CardState as S;
        match input {
            Input::Host(op) => self.command(op).unwrap_or_default(),
            Input::Reported(state, status) => {
                if !self.is_running() {
                    return vec![];
                }
                self.note(status, state);
                match (self.state, state) {
                    (S::Booting, S::Online) => self.state = S::Online,
                    (S::Booting | S::Online, S::ShuttingDown) => self.state = S::ShuttingDown,
                    _ => {}
                }
                // A halted card stays in QEMU with its CPUs stopped.
                if self.state == S::ShuttingDown && status == ShutdownStatus::Halted {
                    return vec![Action::StopCard];
                }
                vec![]
            }
            Input::MachineGone(status) => {
                match self.state {
                    S::Resetting => return self.apply(Input::Stopped),
                    S::Ready | S::ResetFailed => return vec![],
                    _ => {}
                }
                self.note(status, S::Ready);
                match self.status {
                    ShutdownStatus::PowerOff | ShutdownStatus::Halted => {
                        // Its own power-off: tear down what is left.
                        self.state = S::ShuttingDown;
                        vec![Action::StopCard]
                    }
                    ShutdownStatus::Restart => self.reset(true),
                    _ => {
                        // Gone without a word (QEMU killed or crashed) is a crash.
                        self.note(ShutdownStatus::Crashed, S::Ready);
                        let again = self.boots_again(ShutdownStatus::Crashed);
                        self.reset(again)
                    }
                }
            }
            Input::StartFailed => {
                if self.state == S::Booting {
                    self.reset(false)
                } else {
                    vec![]
                }
            }
            Input::Stopped => match self.state {
                S::Resetting => {
                    self.state = S::Ready;
                    self.status = ShutdownStatus::Nop;
                    if self.boot_after_reset {
                        self.boot()
                    } else {
                        vec![]
                    }
                }
                S::ShuttingDown => {
                    self.state = S::Ready;
                    vec![]
                }
                _ => vec![],
            },
            Input::StopFailed => {
                if matches!(self.state, S::Resetting | S::ShuttingDown) {
                    self.state = S::ResetFailed;
                    self.boot_after_reset = false;
                }
                vec![]
            }
            Input::ShutdownTimedOut => {
                if self.state == S::ShuttingDown {
                    let again = self.boots_again(self.status);
                    self.reset(again)
                } else {
                    vec![]
                }
            }
            Input::HeartbeatMissed => {
                if matches!(self.state, S::Booting | S::Online) {
                    self.note(ShutdownStatus::Crashed, S::Ready);
                    let again = self.boots_again(ShutdownStatus::Crashed);
                    self.reset(again)
                } else {
                    vec![]
                }
            }
        }
    }
}

/// Parses a state name (`online`, `shutting_down`, ...).
pub fn parse_state(s: &str) -> Option<CardState> {
    (0..=5)
        .filter_map(|v| CardState::try_from(v).ok())
        .find(|st| st.name() == s)
}

/// Parses a shutdown status name (`nop`, `crashed`, ...).
pub fn parse_status(s: &str) -> Option<ShutdownStatus> {
    (0..=4)
        .filter_map(|v| ShutdownStatus::try_from(v).ok())
        .find(|st| st.name() == s)
}

/// Parses a bridge's status line (`state=online shutdown_status=nop`).
pub fn parse_bridge_status(line: &str) -> Option<(CardState, ShutdownStatus)> {
    let mut state = None;
    let mut status = None;
    for word in line.split_whitespace() {
        match word.split_once('=') {
            Some(("state", v)) => state = parse_state(v),
            Some(("shutdown_status", v)) => status = parse_status(v),
            _ => {}
        }
    }
    Some((state?, status?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use CardState as S;
    use ShutdownStatus as St;

    fn online() -> Lifecycle {
        let mut l = Lifecycle::new(Policy::Reboot);
        assert_eq!(l.command(Op::Boot), Ok(vec![Action::StartCard]));
        assert_eq!(l.apply(Input::Reported(S::Online, St::Nop)), vec![]);
        assert_eq!(l.state(), S::Online);
        l
    }

    #[test]
    fn boot_shutdown_boot() {
        let mut l = Lifecycle::new(Policy::Reboot);
        assert!(!l.is_running());
        assert_eq!(l.apply(Input::Host(Op::Boot)), vec![Action::StartCard]);
        assert_eq!(l.state(), S::Booting);
        l.apply(Input::Reported(S::Booting, St::Nop));
        assert_eq!(l.state(), S::Booting);
        l.apply(Input::Reported(S::Online, St::Nop));
        assert_eq!(l.state(), S::Online);
        assert_eq!(l.command(Op::Shutdown), Ok(vec![Action::RequestShutdown]));
        assert_eq!(l.state(), S::ShuttingDown);
        // The card still says online until it acts; the host's word stands.
        l.apply(Input::Reported(S::Online, St::Nop));
        assert_eq!(l.state(), S::ShuttingDown);
        l.apply(Input::Reported(S::ShuttingDown, St::PowerOff));
        assert_eq!(
            l.apply(Input::MachineGone(St::PowerOff)),
            vec![Action::StopCard]
        );
        assert_eq!(l.apply(Input::Stopped), vec![]);
        assert_eq!((l.state(), l.shutdown_status()), (S::Ready, St::PowerOff));
        assert_eq!(l.command(Op::Boot), Ok(vec![Action::StartCard]));
        assert_eq!(l.shutdown_status(), St::Nop);
        assert_eq!(l.last_shutdown_status(), St::PowerOff);
    }

    #[test]
    fn refusals() {
        let mut l = Lifecycle::new(Policy::Reboot);
        let r = l.command(Op::Shutdown).unwrap_err();
        assert_eq!((r.state, r.hint), (S::Ready, "boot it first"));
        assert_eq!(l.command(Op::Reset).unwrap_err().state, S::Ready);
        let mut l = online();
        let r = l.command(Op::Boot).unwrap_err();
        assert_eq!(r.to_string(), "is online: shut it down or reset it first");
        assert_eq!(l.apply(Input::Host(Op::Boot)), vec![]);
        assert_eq!(l.state(), S::Online);
        l.command(Op::Shutdown).unwrap();
        assert!(l.command(Op::Shutdown).is_err());
        assert!(l.command(Op::Boot).is_err());
    }

    #[test]
    fn reset_from_online_and_booting() {
        let mut l = online();
        assert_eq!(l.command(Op::Reset), Ok(vec![Action::StopCard]));
        assert_eq!(l.state(), S::Resetting);
        // The machine going away while resetting is the reset completing.
        assert_eq!(l.apply(Input::MachineGone(St::Nop)), vec![]);
        assert_eq!((l.state(), l.shutdown_status()), (S::Ready, St::Nop));
        let mut l = Lifecycle::new(Policy::Reboot);
        l.command(Op::Boot).unwrap();
        assert_eq!(l.command(Op::Reset), Ok(vec![Action::StopCard]));
        assert_eq!(l.apply(Input::Stopped), vec![]);
        assert_eq!(l.state(), S::Ready);
    }

    #[test]
    fn restart_boots_again() {
        let mut l = online();
        l.apply(Input::Reported(S::ShuttingDown, St::Restart));
        assert_eq!(l.state(), S::ShuttingDown);
        assert_eq!(
            l.apply(Input::MachineGone(St::Restart)),
            vec![Action::StopCard]
        );
        assert_eq!(
            (l.state(), l.shutdown_status()),
            (S::Resetting, St::Restart)
        );
        assert_eq!(l.apply(Input::Stopped), vec![Action::StartCard]);
        assert_eq!((l.state(), l.shutdown_status()), (S::Booting, St::Nop));
        assert_eq!(l.last_shutdown_status(), St::Restart);
        // Even under stay-down: a restart is what the card asked for.
        let mut l = online();
        l.set_policy(Policy::StayDown);
        l.apply(Input::MachineGone(St::Restart));
        assert_eq!(l.apply(Input::Stopped), vec![Action::StartCard]);
    }

    #[test]
    fn crash_under_each_policy() {
        let mut l = online();
        l.apply(Input::Reported(S::ShuttingDown, St::Crashed));
        l.apply(Input::MachineGone(St::Crashed));
        assert_eq!(l.state(), S::Resetting);
        assert_eq!(l.apply(Input::Stopped), vec![Action::StartCard]);
        assert_eq!(l.last_shutdown_status(), St::Crashed);

        let mut l = online();
        l.set_policy(Policy::StayDown);
        // The machine vanished without a status (killed): a crash.
        assert_eq!(l.apply(Input::MachineGone(St::Nop)), vec![Action::StopCard]);
        assert_eq!(l.shutdown_status(), St::Crashed);
        assert_eq!(l.apply(Input::Stopped), vec![]);
        assert_eq!((l.state(), l.shutdown_status()), (S::Ready, St::Nop));
        assert_eq!(l.last_shutdown_status(), St::Crashed);
    }

    #[test]
    fn halted_card_is_stopped() {
        let mut l = online();
        assert_eq!(
            l.apply(Input::Reported(S::ShuttingDown, St::Halted)),
            vec![Action::StopCard]
        );
        l.apply(Input::Stopped);
        assert_eq!((l.state(), l.shutdown_status()), (S::Ready, St::Halted));
    }

    #[test]
    fn timeouts_and_failures() {
        let mut l = online();
        l.command(Op::Shutdown).unwrap();
        assert_eq!(l.apply(Input::ShutdownTimedOut), vec![Action::StopCard]);
        assert_eq!(l.apply(Input::StopFailed), vec![]);
        assert_eq!(l.state(), S::ResetFailed);
        assert!(l.command(Op::Boot).is_err());
        assert_eq!(l.command(Op::Reset), Ok(vec![Action::StopCard]));
        l.apply(Input::Stopped);
        assert_eq!(l.state(), S::Ready);

        let mut l = Lifecycle::new(Policy::Reboot);
        l.command(Op::Boot).unwrap();
        assert_eq!(l.apply(Input::StartFailed), vec![Action::StopCard]);
        assert_eq!(l.apply(Input::Stopped), vec![]);
        assert_eq!(l.state(), S::Ready);
    }

    #[test]
    fn heartbeat_missed_is_a_crash() {
        let mut l = online();
        assert_eq!(l.apply(Input::HeartbeatMissed), vec![Action::StopCard]);
        assert_eq!(l.shutdown_status(), St::Crashed);
        assert_eq!(l.apply(Input::Stopped), vec![Action::StartCard]);
        let mut l = Lifecycle::new(Policy::Reboot);
        assert_eq!(l.apply(Input::HeartbeatMissed), vec![]);
    }

    #[test]
    fn adoption_and_reports_while_down() {
        let l = Lifecycle::adopted(Policy::Reboot, Some((S::Online, St::Nop)));
        assert_eq!(l.state(), S::Online);
        let l = Lifecycle::adopted(Policy::Reboot, None);
        assert_eq!(l.state(), S::Booting);
        let l = Lifecycle::adopted(Policy::Reboot, Some((S::Resetting, St::Nop)));
        assert_eq!(l.state(), S::Booting);
        let mut l = Lifecycle::new(Policy::Reboot);
        l.apply(Input::Reported(S::Online, St::Crashed));
        assert_eq!((l.state(), l.shutdown_status()), (S::Ready, St::Nop));
    }

    #[test]
    fn bridge_status_lines() {
        assert_eq!(
            parse_bridge_status("state=shutting_down shutdown_status=restart"),
            Some((S::ShuttingDown, St::Restart))
        );
        assert_eq!(parse_bridge_status("state=online"), None);
        assert_eq!(parse_bridge_status("error: x"), None);
        assert_eq!(parse_state("reset_failed"), Some(S::ResetFailed));
        assert_eq!(parse_status("poweroff"), Some(St::PowerOff));
    }
}
