//! Serving a network device's control queue on the card's kicks
//! (`net_control.rs` has the queue; `docs/vop-abi.md` 5.8).

use log::{debug, warn};

use super::attached::Attached;
use super::{Bridge, BridgeError, Report};
use crate::device_protocol::HostMessage;
use crate::net_control::Command;

impl Bridge {
    /// The card kicked queue `q` of device `i`, and no eventfd took it: the
    /// network control queue, or a queue that has not started yet.
    pub(super) fn device_kick(&mut self, a: &mut Attached, i: usize, q: u16) {
        let is_control = self.devices[i]
            .net_control
            .as_ref()
            .is_some_and(|c| c.index == usize::from(q));
        if !is_control {
            debug!("kick of queue {q} of device {i} before it started");
            return;
        }
        if let Err(e) = self.serve_net_control(a, i) {
            crate::limited!(
                self.card_lines,
                ("network control queue", i as u32),
                warn,
                "device {i} ({}): {}",
                self.devices[i].name(),
                Report(&e)
            );
        }
    }

    fn serve_net_control(&mut self, a: &mut Attached, i: usize) -> Result<(), BridgeError> {
        let slot = self.slot(i)?;
        let base = a.aperture_gpa().ok_or(BridgeError::ApertureUnmapped)?;
        let dev = &mut self.devices[i];
        let (Some(ctrl), Some(backend)) = (dev.net_control.as_mut(), dev.backend.as_mut()) else {
            return Ok(());
        };
        let max_pairs = backend.num_queues() / 2;
        let pairs = &mut dev.net_pairs;
        let mut failed = None;
        let served = ctrl.serve(a.att.ram.memory(), base, |cmd| match cmd {
            Command::SetQueuePairs(n) if (1..=max_pairs).contains(&usize::from(n)) => {
                let on = 2 * usize::from(n);
                let r = backend
                    .enable_rings(0..on, true)
                    .and_then(|()| backend.enable_rings(on..2 * max_pairs, false));
                match r {
                    Ok(()) => {
                        *pairs = n;
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            }
            Command::SetQueuePairs(n) => {
                debug!("device {i}: {n} queue pairs asked, {max_pairs} offered");
                false
            }
            Command::Unsupported { class, command } => {
                debug!("device {i}: control command {class}/{command} not offered");
                false
            }
        })?;
        let index = ctrl.index;
        if let Some(e) = failed {
            warn!("device {i}: enabling queue pairs: {}", Report(&e));
        }
        if served.malformed > 0 {
            crate::limited!(
                self.card_lines,
                ("malformed control command", i as u32),
                warn,
                "device {i}: {} malformed network control command(s) refused",
                served.malformed
            );
        }
        if served.notify {
            let vector = a
                .page
                .queue_vectors(&a.att.aperture, slot)?
                .and_then(|v| v.get(index).copied());
            if let Some(v) = vector {
                a.link.send(&HostMessage::RaiseVector(v))?;
            }
        }
        Ok(())
    }
}
