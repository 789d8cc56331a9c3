//! One card's supervisor: a thread that owns the card's processes and its
//! [`Lifecycle`], performs the lifecycle's actions, restarts a backend or
//! bridge that died, and follows the card through its bridge's control
//! socket (every call with a timeout, so a hung card never hangs micd).
//!
//! Other threads reach it through a [`CardHandle`] (`handle.rs`): commands
//! over a channel, the status as a published snapshot (`status.rs`).

mod handle;
mod status;

use handle::Command;
pub use handle::{CardHandle, CommandError};

use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};

use super::backoff::BootBackoff;
use super::config::{needs_ready, CardConfig};
use super::heartbeat::HeartbeatCheck;
use super::launch::{vsock_cid, CardPlan, Shared, Tools};
use super::layout::CardDir;
use super::lifecycle::{
    parse_bridge_status, parse_status, Action, CardState, Input, Lifecycle, Op, Refused,
    ShutdownStatus,
};
use super::protocol::{CardStatus, DeviceStatus, NetStatus};
use super::record::Record;
use super::running::RunningCard;
use crate::agent_client::AgentClient;
use crate::control::request_timeout;
use crate::heartbeat::HeartbeatReport;

/// How often the supervisor looks at the card.
const POLL: Duration = Duration::from_millis(200);
/// Longest wait for one answer from the card's bridge.
const BRIDGE_TIMEOUT: Duration = Duration::from_secs(2);

struct Supervisor {
    name: String,
    index: u16,
    /// What the card shares with other cards.
    shared: Shared,
    cfg: CardConfig,
    dir: CardDir,
    tools: Tools,
    machine: Lifecycle,
    running: Option<RunningCard>,
    entered: Instant,
    boots: u64,
    booted_at: Option<u64>,
    shutdown_pending: bool,
    last_report: Option<(CardState, ShutdownStatus)>,
    /// The card's agent answered during this boot (`online` waits for it).
    agent_answered: bool,
    /// The card's heartbeat as its bridge last reported it (this boot).
    heartbeat: Option<HeartbeatReport>,
    /// Boots that ended before online, and the wait before the next.
    backoff: BootBackoff,
    /// A boot on the policy's behalf waits until then (`backoff.rs`).
    start_at: Option<Instant>,
    /// The card came online during this boot.
    reached_online: bool,
    /// The next start is one the user asked for: it does not wait.
    user_boot: bool,
    last_error: Option<String>,
    /// The autoboot decided while starting, performed once the thread runs.
    pending_boot: Vec<Action>,
    status: Arc<Mutex<CardStatus>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Supervisor {
    fn new(index: u16, cfg: CardConfig, dir: CardDir, tools: Tools, shared: Shared) -> Self {
        let mut s = Supervisor {
            name: format!("mic{index}"),
            index,
            shared,
            machine: Lifecycle::new(cfg.policy),
            cfg,
            dir,
            tools,
            running: None,
            entered: Instant::now(),
            boots: 0,
            booted_at: None,
            shutdown_pending: false,
            last_report: None,
            heartbeat: None,
            last_error: None,
            pending_boot: Vec::new(),
            agent_answered: false,
            backoff: BootBackoff::default(),
            start_at: None,
            reached_online: false,
            user_boot: false,
            status: Arc::default(),
        };
        if let Err(e) = super::layout::private_dir(s.dir.dir()) {
            s.last_error = Some(format!("cannot create {}: {e}", s.dir.dir().display()));
        }
        s.adopt_or_clean();
        s
    }

    fn plan_for(&self, cfg: &CardConfig) -> CardPlan {
        let base =
            std::fs::read_to_string(self.tools.image_dir.join("cmdline")).unwrap_or_default();
        CardPlan::new(
            &self.name,
            self.index,
            cfg,
            &self.dir,
            &self.tools,
            &base,
            self.shared,
        )
    }

    fn make_plan(&self) -> CardPlan {
        self.plan_for(&self.cfg)
    }

    /// Finds a card an earlier micd left running, or clears what it left.
    fn adopt_or_clean(&mut self) {
        let record = Record::load(&self.dir.record());
        if let Some(r) = &record {
            self.boots = r.boots;
            if let Some(st) = parse_status(&r.last_shutdown_status) {
                self.machine.restore_last_status(st);
            }
        }
        // A running card keeps the configuration it was booted with.
        let adoptable = record.filter(|r| self.plan_for(&r.config).qemu.adopt().is_some());
        if let Some(r) = &adoptable {
            self.cfg = r.config.clone();
        }
        let plan = self.make_plan();
        if let Some(r) = adoptable {
            if let Some(card) = RunningCard::adopt(plan.clone()) {
                info!(
                    "{}: adopting the running card (QEMU pid {:?})",
                    self.name,
                    card.qemu_pid()
                );
                self.running = Some(card);
                self.booted_at = r.booted_at;
                let reported = self.bridge_status();
                let last = self.machine.last_shutdown_status();
                self.machine = Lifecycle::adopted(self.cfg.policy, reported);
                self.machine.restore_last_status(last);
                return;
            }
        }
        RunningCard::stop_leftovers(&plan);
        if self.cfg.autoboot {
            if let Ok(actions) = self.machine.command(Op::Boot) {
                self.pending_boot = actions;
            }
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        let boot = std::mem::take(&mut self.pending_boot);
        self.run_actions(boot);
        loop {
            self.publish();
            match rx.recv_timeout(POLL) {
                Ok(cmd) => self.on_command(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.supervise();
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Op(op, reply) => match self.machine.command(op) {
                Err(r) => {
                    let _ = reply.send(Err(r.into()));
                }
                Ok(actions) => {
                    info!("{}: {}", self.name, op.name());
                    self.user_boot = op == Op::Boot;
                    self.entered = Instant::now();
                    self.save_record();
                    self.publish();
                    let _ = reply.send(Ok(()));
                    self.run_actions(actions);
                }
            },
            Command::Config(settings, reply) => {
                let _ = reply.send(self.configure(&settings));
            }
        }
    }

    fn configure(&mut self, settings: &[String]) -> Result<(), CommandError> {
        let mut next = self.cfg.clone();
        for s in settings {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| CommandError::Invalid(format!("{s}: not key=value")))?;
            if needs_ready(k) && self.machine.state() != CardState::Ready {
                return Err(CommandError::NotReady(format!(
                    "{} is {}: {k} can change only while ready",
                    self.name,
                    self.machine.state()
                )));
            }
            next.set(k, v)
                .map_err(|e| CommandError::Invalid(e.to_string()))?;
        }
        info!("{}: config {}", self.name, settings.join(" "));
        self.cfg = next;
        self.machine.set_policy(self.cfg.policy);
        self.save_record();
        Ok(())
    }

    /// Applies an input and performs the actions it yields, and theirs.
    fn apply(&mut self, input: Input) {
        let before = self.machine.state();
        let actions = self.machine.apply(input);
        self.changed_from(before);
        self.run_actions(actions);
    }

    fn run_actions(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            self.publish();
            if let Some(input) = self.perform(a) {
                let before = self.machine.state();
                queue.extend(self.machine.apply(input));
                self.changed_from(before);
            }
        }
        self.publish();
    }

    /// After the state may have changed from `before`: restarts the
    /// state's clock (the shutdown timeout counts from entering
    /// `shutting_down`), logs and records the change.
    fn changed_from(&mut self, before: CardState) {
        let state = self.machine.state();
        if state == before {
            return;
        }
        self.entered = Instant::now();
        if state == CardState::Online {
            self.reached_online = true;
            self.backoff.online();
        }
        info!(
            "{}: {state} ({})",
            self.name,
            self.machine.shutdown_status()
        );
        self.save_record();
    }

    fn perform(&mut self, action: Action) -> Option<Input> {
        match action {
            Action::StartCard if self.must_wait() => None,
            Action::StartCard => match self.start() {
                Ok(()) => None,
                Err(e) => {
                    error!("{}: cannot start the card: {e}", self.name);
                    self.last_error = Some(e);
                    Some(Input::StartFailed)
                }
            },
            Action::RequestShutdown => {
                self.shutdown_pending = !self.request_shutdown();
                None
            }
            Action::StopCard => Some(if self.stop_all() {
                Input::Stopped
            } else {
                self.last_error = Some("QEMU did not exit after SIGKILL".into());
                Input::StopFailed
            }),
        }
    }

    /// Whether this start waits (`backoff.rs`): the last boot, which did
    /// not come online, ended, and the user did not ask for this one.
    fn must_wait(&mut self) -> bool {
        let user = std::mem::take(&mut self.user_boot);
        if user || self.boots == 0 || self.reached_online {
            return false;
        }
        let wait = self.backoff.failed();
        self.start_at = Some(Instant::now() + wait);
        warn!(
            "{}: {} boot(s) in a row ended before the card came online; booting again in {} s",
            self.name,
            self.backoff.failures(),
            wait.as_secs()
        );
        true
    }

    /// Starts a boot that waited, once its time has come.
    fn start_when_due(&mut self) {
        match self.start_at {
            Some(at) if Instant::now() >= at => {}
            _ => return,
        }
        self.start_at = None;
        if let Err(e) = self.start() {
            error!("{}: cannot start the card: {e}", self.name);
            self.last_error = Some(e);
            self.apply(Input::StartFailed);
        }
    }

    fn request_shutdown(&self) -> bool {
        let sock = self.dir.bridge_socket();
        matches!(request_timeout(&sock, "shutdown", BRIDGE_TIMEOUT), Ok(a) if !a.starts_with("error"))
    }

    /// Starts backends, QEMU and the bridge, as `scripts/run-card` does.
    fn start(&mut self) -> Result<(), String> {
        self.stop_all();
        self.boots += 1;
        self.agent_answered = false;
        self.reached_online = false;
        self.booted_at = Some(now_unix());
        self.last_error = None;
        self.last_report = None;
        self.heartbeat = None;
        self.shutdown_pending = false;
        self.save_record();
        let (card, r) = RunningCard::start(self.make_plan());
        self.running = Some(card);
        r.map_err(|e| super::report(&e))
    }

    /// Stops the card's processes, QEMU first. False if QEMU would not go
    /// away.
    fn stop_all(&mut self) -> bool {
        self.shutdown_pending = false;
        self.start_at = None;
        self.heartbeat = None;
        match self.running.as_mut().map(RunningCard::stop) {
            Some(false) => false,
            _ => {
                self.running = None;
                true
            }
        }
    }

    fn bridge_status(&self) -> Option<(CardState, ShutdownStatus)> {
        request_timeout(&self.dir.bridge_socket(), "status", BRIDGE_TIMEOUT)
            .ok()
            .and_then(|l| parse_bridge_status(&l))
    }

    /// The shutdown status the card left when its QEMU exited: the bridge
    /// has it once it has seen the machine power off.
    fn final_status(&mut self) -> ShutdownStatus {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            match self.bridge_status() {
                Some((CardState::Ready, st)) => return st,
                Some(r) => self.last_report = Some(r),
                None => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.last_report.map_or(ShutdownStatus::Nop, |(_, st)| st)
    }

    /// Follows a running card: its machine, its helpers, its bridge.
    fn supervise(&mut self) {
        if !self.machine.is_running() {
            return;
        }
        if self.start_at.is_some() {
            self.start_when_due();
            return;
        }
        if !self
            .running
            .as_mut()
            .is_some_and(RunningCard::machine_alive)
        {
            let st = self.final_status();
            info!("{}: the card's machine exited ({st})", self.name);
            self.apply(Input::MachineGone(st));
            return;
        }
        if let Some(card) = self.running.as_mut() {
            for p in card.restart_dead_helpers() {
                info!("{}: restarted {p}", self.name);
            }
            card.secure_sockets();
        }
        if let Some(r) = self.bridge_status() {
            self.last_report = Some(r);
            if self.online_allowed(r.0) {
                self.apply(Input::Reported(r.0, r.1));
            }
        }
        self.check_heartbeat();
        if self.machine.state() == CardState::ShuttingDown {
            if self.shutdown_pending {
                self.shutdown_pending = !self.request_shutdown();
            }
            if self.entered.elapsed() > Duration::from_secs(self.cfg.shutdown_timeout) {
                self.apply(Input::ShutdownTimedOut);
            }
        }
    }

    /// Whether a report of `state` may go to the lifecycle now: a booting
    /// card is `online` once its agent answers too, as COSM's was once the
    /// card's SCIF client connected back (`docs/micd.md`, "Lifecycle").
    fn online_allowed(&mut self, state: CardState) -> bool {
        if state != CardState::Online
            || self.agent_answered
            || !(self.cfg.vsock && self.cfg.agent)
            || self.machine.state() != CardState::Booting
        {
            return true;
        }
        match AgentClient::connect(&self.dir.vsock_uds()) {
            Ok(_) => {
                info!("{}: the card's agent answers", self.name);
                self.agent_answered = true;
                true
            }
            Err(_) => false,
        }
    }

    fn heartbeat_check(&self) -> HeartbeatCheck {
        HeartbeatCheck {
            enabled: self.cfg.heartbeat,
            timeout: Duration::from_secs(self.cfg.heartbeat_timeout),
        }
    }

    /// Asks the bridge for the card's heartbeat; a card that stopped
    /// beating is crashed (`docs/micd.md` section 4).
    fn check_heartbeat(&mut self) {
        if !self.machine.is_running() {
            return;
        }
        self.heartbeat = request_timeout(&self.dir.bridge_socket(), "heartbeat", BRIDGE_TIMEOUT)
            .ok()
            .and_then(|l| HeartbeatReport::parse(&l));
        let check = self.heartbeat_check();
        if check.missed(self.machine.state(), self.heartbeat.as_ref()) {
            warn!(
                "{}: no heartbeat for {} s ({}): the card hangs",
                self.name,
                check.timeout.as_secs(),
                self.heartbeat.map_or(String::new(), |h| h.to_string())
            );
            self.apply(Input::HeartbeatMissed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::micd::config::NetMode;

    fn wait_until(h: &CardHandle, f: impl Fn(&CardStatus) -> bool) -> CardStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = h.status();
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out; last {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_card_that_cannot_start_is_ready_again_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("micd-sup-{}", std::process::id()));
        let tools = Tools {
            qemu: "/nonexistent/qemu".into(),
            bin_dir: "/nonexistent".into(),
            image_dir: dir.clone(),
            passt: "passt".into(),
            vsock: "/nonexistent/vsock".into(),
            root: false,
        };
        let cfg = CardConfig {
            console: false,
            vsock: false,
            disks: vec![],
            net: NetMode::None,
            autoboot: false,
            ..Default::default()
        };
        let h = CardHandle::start(3, cfg, &dir, tools, Shared::default()).unwrap();
        let s = h.status();
        assert_eq!(
            (s.name.as_str(), s.state.as_str(), s.node, s.boots),
            ("mic3", "ready", 4, 0)
        );
        assert_eq!(s.firmware, dir.join("vmlinux").display().to_string());
        let t = Duration::from_secs(10);
        assert!(matches!(
            h.op(Op::Shutdown, t),
            Err(CommandError::Refused(_))
        ));
        h.op(Op::Boot, t).unwrap();
        let s = wait_until(&h, |s| s.state == "ready" && s.last_error.is_some());
        assert_eq!(s.boots, 1);
        assert!(s.last_error.unwrap().starts_with("qemu: cannot start"));
        assert_eq!(Record::load(&dir.join("mic3/card.json")).unwrap().boots, 1);
        // Settings while ready; a bad one changes nothing.
        h.config(vec!["memory=256".into(), "policy=stay-down".into()], t)
            .unwrap();
        assert!(matches!(
            h.config(vec!["memory=1".into()], t),
            Err(CommandError::Invalid(_))
        ));
        assert!(matches!(
            h.config(vec!["memory".into()], t),
            Err(CommandError::Invalid(_))
        ));
        let s = h.status();
        assert_eq!((s.memory, s.policy.as_str()), (256, "stay-down"));
        drop(h);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
