//! A socket on which a daemon reports its counters.
//!
//! Every connection to the socket gets one JSON object, one line, and is
//! closed: `socat - UNIX-CONNECT:PATH` (or any program) reads the daemon's
//! counters at that moment. The socket is created like the vhost-user one
//! ([`Endpoint::listen`]: mode 0600, a stale file replaced, a live
//! daemon's refused) and removed when the [`StatsSocket`] is dropped.
//! `mic-blk` reports the requests it resubmitted after a restart
//! (`--stats-socket`, see `backends/README.md`).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::{Endpoint, Error, Result};

/// The listening stats socket; removed on drop.
pub struct StatsSocket {
    _endpoint: Endpoint,
}

impl StatsSocket {
    /// Listens at `path` and answers every connection with `report()` on
    /// a thread of its own.
    pub fn serve(
        path: &Path,
        report: impl Fn() -> serde_json::Value + Send + 'static,
    ) -> Result<StatsSocket> {
        let endpoint = Endpoint::listen(path)?;
        let Endpoint::Listen { listener, .. } = &endpoint else {
            unreachable!("Endpoint::listen makes a listening endpoint");
        };
        let fd =
            dup_listener(listener.as_raw_fd()).map_err(|e| Error::Listen(path.to_path_buf(), e))?;
        std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                for conn in fd.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(1)));
                    let _ = writeln!(conn, "{}", report());
                }
            })
            .map_err(Error::Shutdown)?;
        Ok(StatsSocket {
            _endpoint: endpoint,
        })
    }
}

/// A listener on a duplicate of `fd` (close-on-exec).
fn dup_listener(fd: std::os::fd::RawFd) -> std::io::Result<UnixListener> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, or fails; `fd` is
    // the endpoint's open listener.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a new descriptor that nothing else owns.
    Ok(unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn every_connection_gets_the_report_and_the_socket_goes_away() {
        let prefix = std::env::temp_dir().join("mic-stats-test-");
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap();
        let p = dir.as_path().join("stats.sock");
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = n.clone();
        let s = StatsSocket::serve(
            &p,
            move || serde_json::json!({"n": m.fetch_add(1, std::sync::atomic::Ordering::SeqCst)}),
        )
        .unwrap();
        for want in 0..2 {
            let mut out = String::new();
            UnixStream::connect(&p)
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["n"], want);
        }
        drop(s);
        assert!(!p.exists());
    }
}
