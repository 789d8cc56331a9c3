//! Host-side descriptors (a tap, a stream socket, a terminal, a timer) in
//! the epoll sets of `vhost-user-backend`'s worker threads.
//!
//! A [`PersistentBackend`](crate::PersistentBackend) gets one
//! [`WorkerEpoll`] per worker thread and registers its descriptors there,
//! through `VringEpollHandler::register_listener`: the worker then calls
//! `VhostUserBackend::handle_event` with the registered id. Ids up to the
//! number of queues belong to the queues and the exit event; the crate
//! refuses them.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vmm_sys_util::epoll::EventSet;

/// One worker thread's epoll set.
pub trait WorkerEpoll: Send + Sync {
    /// Adds `fd`, reported to the backend as event `id` when `events` occur.
    fn register(&self, fd: RawFd, events: EventSet, id: u64) -> io::Result<()>;
}

impl<T> WorkerEpoll for VringEpollHandler<T>
where
    T: VhostUserBackend,
    VringEpollHandler<T>: Send + Sync,
{
    fn register(&self, fd: RawFd, events: EventSet, id: u64) -> io::Result<()> {
        self.register_listener(fd, events, id)
    }
}

/// A worker's epoll set as the devices keep it.
pub type Worker = Arc<dyn WorkerEpoll>;
