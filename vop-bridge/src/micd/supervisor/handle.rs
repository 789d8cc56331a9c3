//! How other threads reach one card's supervisor: commands over a channel,
//! answered with a timeout, and the last published status.

use super::*;

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The state does not allow it.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// A setting is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A setting that may change only while the card is `ready`.
    #[error("{0}")]
    NotReady(String),
    /// The supervisor did not answer in time.
    #[error("the card's supervisor did not answer")]
    NoAnswer,
}

pub(super) enum Command {
    Op(Op, Sender<Result<(), CommandError>>),
    Config(Vec<String>, Sender<Result<(), CommandError>>),
}

/// How other threads reach one card's supervisor.
pub struct CardHandle {
    name: String,
    dir: CardDir,
    tx: Mutex<Sender<Command>>,
    status: Arc<Mutex<CardStatus>>,
}

impl CardHandle {
    /// Starts the supervisor of card `index`: adopts the card if it is
    /// still running from an earlier micd, else boots it if `autoboot`.
    /// `shared`: what the card shares with other cards.
    pub fn start(
        index: u16,
        cfg: CardConfig,
        state_dir: &Path,
        tools: Tools,
        shared: Shared,
    ) -> std::io::Result<Self> {
        let name = format!("mic{index}");
        let dir = CardDir::new(state_dir, &name);
        let mut sup = Supervisor::new(index, cfg, dir.clone(), tools, shared);
        let status = Arc::new(Mutex::new(sup.snapshot()));
        sup.status = status.clone();
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || sup.run(rx))?;
        Ok(CardHandle {
            name,
            dir,
            tx: Mutex::new(tx),
            status,
        })
    }

    /// The card's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The card's directory.
    pub fn dir(&self) -> &CardDir {
        &self.dir
    }

    /// The last published status.
    pub fn status(&self) -> CardStatus {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn send(
        &self,
        make: impl FnOnce(Sender<Result<(), CommandError>>) -> Command,
        timeout: Duration,
    ) -> Result<(), CommandError> {
        let (tx, rx) = channel();
        self.tx
            .lock()
            .map_err(|_| CommandError::NoAnswer)?
            .send(make(tx))
            .map_err(|_| CommandError::NoAnswer)?;
        rx.recv_timeout(timeout)
            .map_err(|_| CommandError::NoAnswer)?
    }

    /// Boots, shuts down or resets the card.
    pub fn op(&self, op: Op, timeout: Duration) -> Result<(), CommandError> {
        self.send(|tx| Command::Op(op, tx), timeout)
    }

    /// Applies `key=value` settings.
    pub fn config(&self, settings: Vec<String>, timeout: Duration) -> Result<(), CommandError> {
        self.send(|tx| Command::Config(settings, tx), timeout)
    }
}
