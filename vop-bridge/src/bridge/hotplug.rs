//! Hot add and hot removal of devices (`docs/vop-abi.md` 7.4, 7.5).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::attached::Attached;
use super::device::{DeviceState, RemoveRefused};
use super::requests::ControlError;
use super::Event;
use super::{Bridge, Device, Report};
use crate::backend::Backend;
use crate::config::{DeviceConfig, DeviceKind};
use crate::event_loop::EventLoop;

/// How long a hot-added backend may take to accept the connection.
const HOT_ADD_CONNECT: Duration = Duration::from_secs(5);

impl Bridge {
    /// Hot add (`docs/vop-abi.md` 7.4): the page gets the descriptor, the
    /// card is told through `h2c_config_db`. Returns the new index.
    pub(super) fn hot_add(
        &mut self,
        ev: &EventLoop,
        a: &mut Attached,
        kind: DeviceKind,
        socket: PathBuf,
    ) -> Result<usize, ControlError> {
        let backend = Backend::connect(kind, &socket, HOT_ADD_CONNECT)?;
        let queue_size = self.cfg.queue_size;
        let spec = backend.spec(queue_size);
        let slot = a
            .page
            .add(&a.att.aperture, &spec)
            .map_err(super::BridgeError::from)?;
        let i = self.devices.len();
        let mut state = DeviceState::new(true);
        state.apply(super::device::DeviceEvent::Placed(slot));
        self.devices.push(Device {
            cfg: DeviceConfig {
                kind,
                socket,
                queue_size: None,
            },
            queue_size,
            backend: Some(backend),
            wiring: None,
            inflight: None,
            net_control: None,
            net_pairs: 0,
            last_config: spec.config,
            state,
            reconnects: 0,
        });
        self.watch_backend(ev, i)?;
        a.notify_config()?;
        info!("device {i} ({}) hot-added", kind.name());
        Ok(i)
    }

    /// Hot removal, first half (`docs/vop-abi.md` 7.5): ask the card; the
    /// tick finishes it once the card acknowledged or the wait timed out.
    pub(super) fn hot_remove(
        &mut self,
        ev: &EventLoop,
        a: &mut Attached,
        i: usize,
    ) -> Result<(), ControlError> {
        let d = self.devices.get_mut(i).ok_or(ControlError::NoDevice(i))?;
        let actions = d
            .state
            .request_removal(Instant::now())
            .map_err(|r| match r {
                RemoveRefused::Removed => ControlError::NoDevice(i),
                RemoveRefused::Pending => ControlError::RemovalPending(i),
                RemoveRefused::NotPlaced => ControlError::NotPlaced(i),
            })?;
        self.perform(ev, Some(a), i, &actions)?;
        info!("removing device {i}; waiting for the card");
        Ok(())
    }

    /// Hot removal, second half: the card let go of `slot` (or did not
    /// answer in time); mark it removed in the page.
    pub(super) fn clear_slot(&mut self, a: &mut Attached, i: usize, slot: usize, acked: bool) {
        if !acked {
            warn!("the card did not acknowledge removing device {i}; removing it anyway");
        }
        if let Err(e) = a.remove_slot(slot) {
            error!("marking device {i} removed: {}", Report(&e));
        }
        info!("device {i} ({}) removed", self.devices[i].name());
        self.history.push(Event::Removed { index: i, acked });
    }
}
