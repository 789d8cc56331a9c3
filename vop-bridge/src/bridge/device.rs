//! Where one configured device stands: its slot in the device page, whether
//! its backend is connected, whether its rings run, and whether it is being
//! hot-removed. Like [`crate::card`], this is pure: the bridge feeds it
//! [`DeviceEvent`]s and carries out the [`DeviceAction`]s it returns.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;

/// How long the card has to acknowledge a removal (upstream waited 15 s).
pub const REMOVAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the card's status byte has `DRIVER_OK` (virtio 1.2, 2.1).
pub fn driver_ok(status: u8) -> bool {
    u32::from(status) & VIRTIO_CONFIG_S_DRIVER_OK != 0
}

/// Progress of a hot removal (`docs/vop-abi.md` 7.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Not being removed.
    No,
    /// The card was asked to let go at this time.
    Pending(Instant),
    /// Removed; the device keeps its index until the next card reset.
    Done,
}

/// Something that happened to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The device got a slot in the device page (built, adopted, hot-added).
    Placed(usize),
    /// Attached to a card that already uses the page; `driver_ok` from its
    /// status byte.
    Resumed {
        /// The card's driver runs the device.
        driver_ok: bool,
    },
    /// The backend (re)connected; `driver_ok` from the device's status byte.
    BackendConnected {
        /// The card's driver runs the device.
        driver_ok: bool,
    },
    /// The backend's socket hung up.
    BackendLost,
    /// The rings were handed to the backend and wired.
    Started,
    /// The card rang the device's control doorbell with this status byte.
    Status(u8),
    /// The card rang the control doorbell asking for a device reset.
    VdevReset,
    /// The card powered off.
    PowerOff,
    /// The link to the device went away; the page is gone with it.
    Detached,
    /// The card was reset (or is attached again): it forgot the page, and the
    /// backend is replaced by a fresh connection.
    CardReset,
    /// The periodic tick. `removal_acked` is the card's `guest_ack`.
    Tick {
        /// Now.
        now: Instant,
        /// The card acknowledged a pending removal.
        removal_acked: bool,
        /// The bridge is attached to the device.
        attached: bool,
    },
}

/// Something the bridge must do for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAction {
    /// Hand the rings to the backend and wire the eventfds (`docs/vop-abi.md`
    /// 7.2 step 3); `resume` continues from the rings' used indices.
    Start {
        /// Resume instead of starting fresh.
        resume: bool,
    },
    /// Stop the backend's rings; `unwire` also tells the device to forget
    /// the eventfds (not needed when the device forgot them already).
    Stop {
        /// Tell the device.
        unwire: bool,
    },
    /// The backend is gone: tell the device to forget its eventfds.
    Unwire,
    /// Close the backend connection (and drop any wiring with it).
    DropBackend,
    /// Acknowledge the card's device reset in the page (`docs/vop-abi.md` 7.3).
    AckReset,
    /// Ask the card to let go of the device (`docs/vop-abi.md` 7.5).
    AskRemoval,
    /// Mark the slot removed in the page; `acked` says whether the card
    /// acknowledged or the wait timed out.
    ClearSlot {
        /// The slot.
        slot: usize,
        /// The card acknowledged.
        acked: bool,
    },
    /// Try to connect the backend again.
    Reconnect,
}

/// Why a removal request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RemoveRefused {
    /// Removed already.
    #[error("no such device")]
    Removed,
    /// Asked already.
    #[error("being removed already")]
    Pending,
    /// Not in the device page.
    #[error("not in the device page")]
    NotPlaced,
}

/// One device's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceState {
    slot: Option<usize>,
    backend: bool,
    running: bool,
    removal: Removal,
}

/// Up to three actions (no event needs more).
pub type Actions = Vec<DeviceAction>;

impl DeviceState {
    /// A device whose backend is (or is not) connected, not in a page yet.
    pub fn new(backend_connected: bool) -> Self {
        DeviceState {
            slot: None,
            backend: backend_connected,
            running: false,
            removal: Removal::No,
        }
    }

    /// Its slot in the device page.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    /// Whether the backend is connected.
    pub fn has_backend(&self) -> bool {
        self.backend
    }

    /// Whether the rings run (the eventfds are wired).
    pub fn running(&self) -> bool {
        self.running
    }

    /// Removal progress.
    pub fn removal(&self) -> Removal {
        self.removal
    }

    /// Whether the device was hot-removed.
    pub fn removed(&self) -> bool {
        self.removal == Removal::Done
    }

    /// What the control socket's `devices` shows (`None`: not listed).
    pub fn describe(&self) -> Option<&'static str> {
        Some(match self.removal {
            Removal::Done => return None,
            Removal::Pending(_) => "removing",
            Removal::No if self.running => "running",
            Removal::No => "stopped",
        })
    }

    /// Stops the rings if they run.
    fn stop(&mut self, unwire: bool, out: &mut Actions) {
        if std::mem::take(&mut self.running) {
            out.push(DeviceAction::Stop { unwire });
        }
    }

    /// Starts the rings if the driver runs the device and nothing is missing.
    fn start_if(&mut self, driver_ok: bool, resume: bool, out: &mut Actions) {
        if driver_ok && self.backend && self.slot.is_some() && !self.running {
            out.push(DeviceAction::Start { resume });
        }
    }

    /// Applies an event; returns what the bridge must do, in order.
    pub fn apply(&mut self, ev: DeviceEvent) -> Actions {
        let mut out = Vec::new();
        if self.removed() && !matches!(ev, DeviceEvent::CardReset) {
            return out;
        }
        match ev {
            DeviceEvent::Placed(slot) => self.slot = Some(slot),
            DeviceEvent::Resumed { driver_ok } => self.start_if(driver_ok, true, &mut out),
            DeviceEvent::BackendConnected { driver_ok } => {
                self.backend = true;
                self.start_if(driver_ok, true, &mut out);
            }
            DeviceEvent::BackendLost => {
                // Its rings are gone with it; unwire so kicks come to us meanwhile.
                if std::mem::take(&mut self.running) {
                    out.push(DeviceAction::Unwire);
                }
                if std::mem::take(&mut self.backend) {
                    out.push(DeviceAction::DropBackend);
                }
            }
            DeviceEvent::Started => self.running = true,
            DeviceEvent::Status(status) => {
                if status == 0 {
                    self.stop(true, &mut out);
                } else {
                    self.start_if(driver_ok(status), false, &mut out);
                }
            }
            DeviceEvent::VdevReset => {
                self.stop(true, &mut out);
                out.push(DeviceAction::AckReset);
            }
            DeviceEvent::PowerOff => self.stop(false, &mut out),
            DeviceEvent::Detached => {
                self.stop(false, &mut out);
                self.slot = None;
            }
            DeviceEvent::CardReset => {
                // The device forgot the eventfds; the backend is replaced.
                if self.backend || self.running {
                    out.push(DeviceAction::DropBackend);
                }
                *self = DeviceState::new(false);
            }
            DeviceEvent::Tick {
                now,
                removal_acked,
                attached,
            } => {
                if let Removal::Pending(since) = self.removal {
                    if removal_acked || now.saturating_duration_since(since) >= REMOVAL_TIMEOUT {
                        self.stop(true, &mut out);
                        if let Some(slot) = self.slot {
                            out.push(DeviceAction::ClearSlot {
                                slot,
                                acked: removal_acked,
                            });
                        }
                        if std::mem::take(&mut self.backend) {
                            out.push(DeviceAction::DropBackend);
                        }
                        self.slot = None;
                        self.removal = Removal::Done;
                        return out;
                    }
                }
                if !self.backend && (self.slot.is_some() || !attached) {
                    out.push(DeviceAction::Reconnect);
                }
            }
        }
        out
    }

    /// Hot removal, first half: the card is asked to let go.
    pub fn request_removal(&mut self, now: Instant) -> Result<Actions, RemoveRefused> {
        match self.removal {
            Removal::Done => Err(RemoveRefused::Removed),
            Removal::Pending(_) => Err(RemoveRefused::Pending),
            Removal::No if self.slot.is_none() => Err(RemoveRefused::NotPlaced),
            Removal::No => {
                self.removal = Removal::Pending(now);
                Ok(vec![DeviceAction::AskRemoval])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceAction::*;
    use DeviceEvent::*;

    fn placed_running() -> DeviceState {
        let mut d = DeviceState::new(true);
        assert!(d.apply(Placed(3)).is_empty());
        assert_eq!(d.apply(Status(7)), [Start { resume: false }]);
        assert!(!d.running(), "running only once started");
        d.apply(Started);
        assert!(d.running());
        d
    }

    fn tick(now: Instant, acked: bool) -> DeviceEvent {
        Tick {
            now,
            removal_acked: acked,
            attached: true,
        }
    }

    #[test]
    fn driver_ok_starts_and_status_zero_stops() {
        let mut d = placed_running();
        assert_eq!(d.slot(), Some(3));
        assert_eq!(d.describe(), Some("running"));
        // Running already: DRIVER_OK again does nothing.
        assert!(d.apply(Status(0x0f)).is_empty());
        assert_eq!(d.apply(Status(0)), [Stop { unwire: true }]);
        assert_eq!(d.describe(), Some("stopped"));
        // Status without DRIVER_OK (negotiating) does nothing.
        assert!(d.apply(Status(3)).is_empty());
        assert!(d.apply(Status(0)).is_empty());
    }

    #[test]
    fn no_start_without_slot_or_backend() {
        let mut d = DeviceState::new(true);
        assert!(d.apply(Status(4)).is_empty());
        let mut d = DeviceState::new(false);
        d.apply(Placed(0));
        assert!(d.apply(Status(4)).is_empty());
        assert!(d.apply(Resumed { driver_ok: true }).is_empty());
        // The backend comes back while the card runs the device: resume.
        assert_eq!(
            d.apply(BackendConnected { driver_ok: true }),
            [Start { resume: true }]
        );
    }

    #[test]
    fn reattach_resumes_running_devices_only() {
        let mut d = DeviceState::new(true);
        d.apply(Placed(1));
        assert!(d.apply(Resumed { driver_ok: false }).is_empty());
        assert_eq!(
            d.apply(Resumed { driver_ok: true }),
            [Start { resume: true }]
        );
    }

    #[test]
    fn vdev_reset_stops_and_acknowledges() {
        let mut d = placed_running();
        assert_eq!(d.apply(VdevReset), [Stop { unwire: true }, AckReset]);
        assert_eq!(d.apply(VdevReset), [AckReset]);
        assert_eq!(d.slot(), Some(3));
    }

    #[test]
    fn backend_loss_unwires_and_reconnects_on_tick() {
        let mut d = placed_running();
        let now = Instant::now();
        assert_eq!(d.apply(BackendLost), [Unwire, DropBackend]);
        assert!(!d.has_backend() && !d.running());
        assert_eq!(d.apply(tick(now, false)), [Reconnect]);
        assert!(d.apply(BackendLost).is_empty());
        assert_eq!(
            d.apply(BackendConnected { driver_ok: true }),
            [Start { resume: true }]
        );
        assert!(d.apply(tick(now, false)).is_empty());
    }

    #[test]
    fn detached_devices_reconnect_without_a_slot() {
        let mut d = placed_running();
        assert_eq!(d.apply(Detached), [Stop { unwire: false }]);
        assert_eq!(d.slot(), None);
        d.apply(BackendLost);
        let detached = Tick {
            now: Instant::now(),
            removal_acked: false,
            attached: false,
        };
        assert_eq!(d.apply(detached), [Reconnect]);
        // Attached but never placed: wait for the next page instead.
        assert!(d.apply(tick(Instant::now(), false)).is_empty());
    }

    #[test]
    fn power_off_and_card_reset() {
        let mut d = placed_running();
        assert_eq!(d.apply(PowerOff), [Stop { unwire: false }]);
        assert_eq!(d.slot(), Some(3));
        assert_eq!(d.apply(CardReset), [DropBackend]);
        assert_eq!(d, DeviceState::new(false));
        assert!(d.apply(CardReset).is_empty());
    }

    #[test]
    fn removal_acknowledged() {
        let mut d = placed_running();
        let t0 = Instant::now();
        assert_eq!(d.request_removal(t0), Ok(vec![AskRemoval]));
        assert_eq!(d.describe(), Some("removing"));
        assert_eq!(d.request_removal(t0), Err(RemoveRefused::Pending));
        assert!(d.apply(tick(t0 + Duration::from_secs(1), false)).is_empty());
        assert_eq!(
            d.apply(tick(t0 + Duration::from_secs(2), true)),
            [
                Stop { unwire: true },
                ClearSlot {
                    slot: 3,
                    acked: true
                },
                DropBackend
            ]
        );
        assert!(d.removed());
        assert_eq!(d.describe(), None);
        assert_eq!(d.slot(), None);
        assert_eq!(d.request_removal(t0), Err(RemoveRefused::Removed));
        // A removed device ignores everything but a card reset.
        assert!(d.apply(tick(t0, false)).is_empty());
        assert!(d.apply(Status(4)).is_empty());
        d.apply(CardReset);
        assert!(!d.removed());
    }

    #[test]
    fn removal_times_out() {
        let mut d = DeviceState::new(true);
        d.apply(Placed(0));
        let t0 = Instant::now();
        d.request_removal(t0).unwrap();
        assert!(d
            .apply(tick(t0 + REMOVAL_TIMEOUT - Duration::from_millis(1), false))
            .is_empty());
        assert_eq!(
            d.apply(tick(t0 + REMOVAL_TIMEOUT, false)),
            [
                ClearSlot {
                    slot: 0,
                    acked: false
                },
                DropBackend
            ]
        );
        assert!(d.removed());
    }

    #[test]
    fn removal_needs_a_slot() {
        let mut d = DeviceState::new(true);
        assert_eq!(
            d.request_removal(Instant::now()),
            Err(RemoveRefused::NotPlaced)
        );
    }
}
