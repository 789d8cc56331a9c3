//! What the supervisor tells the rest of micd: the status snapshot it
//! publishes, and the record a new micd adopts the card from.

use super::*;
use crate::micd::launch::VSOCK_GROUP;
use crate::micd::vsock_group;

impl Supervisor {
    pub(super) fn save_record(&self) {
        let r = Record {
            config: self.cfg.clone(),
            boots: self.boots,
            booted_at: self.booted_at,
            last_shutdown_status: self.machine.last_shutdown_status().name().into(),
        };
        if let Err(e) = r.save(&self.dir.record()) {
            warn!(
                "{}: cannot write {}: {e}",
                self.name,
                self.dir.record().display()
            );
        }
    }

    pub(super) fn snapshot(&self) -> CardStatus {
        let plan = match &self.running {
            Some(c) => c.plan().clone(),
            None => self.make_plan(),
        };
        let running = self.machine.is_running();
        let pid_of = |name: &str| self.running.as_ref().and_then(|c| c.backend(name));
        let bridge = self.running.as_ref().and_then(RunningCard::bridge);
        let devices = plan
            .devices
            .iter()
            .map(|d| {
                let pr = match d.backend.as_str() {
                    // Shown while the card runs, as its own processes are.
                    VSOCK_GROUP => self
                        .running
                        .as_ref()
                        .and(self.dir.dir().parent())
                        .and_then(|state| vsock_group::pid(&self.tools.vsock, state))
                        .map(|pid| (pid, 0)),
                    name => pid_of(name),
                };
                let image = (d.kind == "blk")
                    .then(|| d.backend.trim_start_matches("blk").parse::<usize>().ok())
                    .flatten()
                    .and_then(|n| plan.disks.get(n))
                    .map(|(img, _)| img.display().to_string());
                DeviceStatus {
                    kind: d.kind.into(),
                    backend: d.backend.clone(),
                    socket: d.socket.display().to_string(),
                    pid: pr.map(|p| p.0),
                    restarts: pr.map_or(0, |p| p.1),
                    image,
                }
            })
            .collect();
        let uptime_s = match (running, self.booted_at) {
            (true, Some(t)) => now_unix().saturating_sub(t),
            _ => 0,
        };
        CardStatus {
            name: self.name.clone(),
            state: self.machine.state().name().into(),
            shutdown_status: self.machine.shutdown_status().name().into(),
            last_shutdown_status: self.machine.last_shutdown_status().name().into(),
            policy: self.machine.policy().name().into(),
            autoboot: self.cfg.autoboot,
            family: "x100".into(),
            stepping: "C0".into(),
            node: self.index + 1,
            boots: self.boots,
            failed_boots: self.backoff.failures(),
            next_boot_in_s: self
                .start_at
                .map(|t| t.saturating_duration_since(Instant::now()).as_secs()),
            uptime_s,
            memory: self.cfg.memory,
            cpus: self.cfg.cpus,
            firmware: plan.firmware.display().to_string(),
            ramdisk: plan.ramdisk.display().to_string(),
            overlay: plan
                .overlay
                .as_ref()
                .map(|o| o.source.display().to_string()),
            cmdline: plan.cmdline.clone(),
            devices,
            network: NetStatus {
                mode: self.cfg.net.name().into(),
                card_ip: plan.net.map(|n| n.card_cidr()),
                host_ip: plan.net.map(|n| n.host.to_string()),
            },
            qemu_pid: self.running.as_ref().and_then(RunningCard::qemu_pid),
            bridge_pid: bridge.map(|b| b.0),
            bridge_restarts: bridge.map_or(0, |b| b.1),
            dir: self.dir.dir().display().to_string(),
            console_socket: (running && self.cfg.console)
                .then(|| self.dir.console_socket().display().to_string()),
            vsock_cid: self.cfg.vsock.then(|| vsock_cid(self.index)),
            vsock_socket: (running && self.cfg.vsock)
                .then(|| self.dir.vsock_uds().display().to_string()),
            last_error: self.last_error.clone(),
            heartbeat: self.heartbeat_check().status(self.heartbeat.as_ref()),
        }
    }

    pub(super) fn publish(&self) {
        let s = self.snapshot();
        match self.status.lock() {
            Ok(mut g) => *g = s,
            Err(e) => *e.into_inner() = s,
        }
    }
}
