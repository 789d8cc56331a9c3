//! The shared daemon loop serves a frontend that enables rings before
//! `SET_FEATURES`, as QEMU's vhost-user net client does.
//!
//! `mic-blk`, `mic-net` and `mic-console` all run this loop; the test uses a
//! minimal device so that it checks the loop itself. `mic-net`'s integration
//! tests (`early_vring_enable_like_qemu`) repeat it against the real daemon.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mic_backend_common::guest::GuestMem;
use mic_backend_common::{
    serve_persistent, Endpoint, PersistentBackend, Shutdown, WorkerExitEvents,
};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;
const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
const SET_OWNER: u32 = FrontendReq::SET_OWNER as u32;
const GET_PROTOCOL_FEATURES: u32 = FrontendReq::GET_PROTOCOL_FEATURES as u32;
const SET_PROTOCOL_FEATURES: u32 = FrontendReq::SET_PROTOCOL_FEATURES as u32;
const GET_QUEUE_NUM: u32 = FrontendReq::GET_QUEUE_NUM as u32;
const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
/// Protocol version 1 in the header's version bits.
const FLAG_VERSION: u32 = 0x1;
const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

/// Two queues, no data path; counts frontends and remembers the features.
#[derive(Default)]
struct Device {
    acked: AtomicU64,
    frontends: AtomicUsize,
    exit: WorkerExitEvents,
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::SeqCst);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.create()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        Ok(())
    }
}

impl PersistentBackend for Device {
    fn new_frontend(&self) {
        self.frontends.fetch_add(1, Ordering::SeqCst);
        self.acked.store(0, Ordering::SeqCst);
        self.exit.close_all();
    }

    fn attach_workers(&self, _workers: &[mic_backend_common::worker::Worker]) {}
}

fn msg(req: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut v = req.to_le_bytes().to_vec();
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Reads a reply carrying a u64 and checks that it answers `req`.
fn reply_u64(s: &mut UnixStream, req: u32) -> u64 {
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), req);
    u64::from_le_bytes(r[12..20].try_into().unwrap())
}

fn connect(path: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[test]
fn ring_enable_before_set_features_is_served() {
    let prefix = std::env::temp_dir().join("mic-common-early-");
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap();
    let path = dir.as_path().join("vu.sock");
    let endpoint = Endpoint::listen(&path).unwrap();
    let shutdown = Shutdown::new().unwrap();
    let device = Arc::new(Device::default());
    let daemon = {
        let (shutdown, device) = (shutdown.clone(), device.clone());
        std::thread::spawn(move || serve_persistent("early-test", endpoint, &shutdown, &device))
    };

    // The order QEMU's vhost-user net client uses.
    let mut c = connect(&path);
    c.write_all(&msg(GET_FEATURES, FLAG_VERSION, &[])).unwrap();
    let feats = reply_u64(&mut c, GET_FEATURES);
    assert_ne!(feats & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    c.write_all(&msg(GET_PROTOCOL_FEATURES, FLAG_VERSION, &[]))
        .unwrap();
    let _ = reply_u64(&mut c, GET_PROTOCOL_FEATURES);
    c.write_all(&msg(
        SET_PROTOCOL_FEATURES,
        FLAG_VERSION,
        &0x9u64.to_le_bytes(),
    ))
    .unwrap(); // MQ | REPLY_ACK
    c.write_all(&msg(SET_OWNER, FLAG_VERSION, &[])).unwrap();
    // SET_VRING_ENABLE(0, 1) and (1, 1), the second asking for a reply.
    c.write_all(&msg(
        SET_VRING_ENABLE,
        FLAG_VERSION,
        &[0, 0, 0, 0, 1, 0, 0, 0],
    ))
    .unwrap();
    c.write_all(&msg(
        SET_VRING_ENABLE,
        FLAG_VERSION | FLAG_NEED_REPLY,
        &[1, 0, 0, 0, 1, 0, 0, 0],
    ))
    .unwrap();
    assert_eq!(
        reply_u64(&mut c, SET_VRING_ENABLE),
        0,
        "enable acknowledged"
    );
    c.write_all(&msg(SET_FEATURES, FLAG_VERSION, &feats.to_le_bytes()))
        .unwrap();
    c.write_all(&msg(GET_QUEUE_NUM, FLAG_VERSION, &[])).unwrap();
    assert_eq!(
        reply_u64(&mut c, GET_QUEUE_NUM),
        2,
        "connection still served"
    );
    assert_eq!(device.acked.load(Ordering::SeqCst), feats);
    drop(c);

    // The next frontend gets a reset device.
    let mut c = connect(&path);
    c.write_all(&msg(GET_FEATURES, FLAG_VERSION, &[])).unwrap();
    assert_eq!(reply_u64(&mut c, GET_FEATURES), feats);
    assert_eq!(device.frontends.load(Ordering::SeqCst), 2);
    assert_eq!(device.acked.load(Ordering::SeqCst), 0);

    // Shutdown with a frontend attached ends the loop and removes the socket.
    shutdown.request();
    daemon.join().unwrap().unwrap();
    drop(c);
    assert!(!path.exists());
}
