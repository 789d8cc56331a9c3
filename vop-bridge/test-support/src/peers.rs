//! Peers that connect to a daemon's socket and stall, for the shutdown
//! and bounded-resource tests.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use crate::frontend::Result;
use crate::process::Daemon;

/// Peers that connect to a daemon's socket and stall, each at a different
/// point, for the shutdown and bounded-resource tests: a name and the bytes
/// the peer sends before it stops. The first three never complete a
/// message; the last sends a whole `SET_VRING_ENABLE` (which the daemons'
/// relay holds back until `SET_FEATURES`) and then nothing.
pub const STALLED_PEERS: [(&str, &[u8]); 4] = [
    ("silent", &[]),
    ("half a header", &[1, 0, 0, 0, 1]),
    // GET_FEATURES announcing an 8-byte body that never comes.
    (
        "header without its body",
        &[1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0],
    ),
    (
        "early enable",
        &[18, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    ),
];

/// Connects to `socket`, sends `prelude` (see [`STALLED_PEERS`]) and
/// returns the connection, which then stays silent.
pub fn stalled_peer(socket: &Path, prelude: &[u8]) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    io::Write::write_all(&mut s, prelude)?;
    Ok(s)
}

/// Connects a peer stalled as in `prelude` to the daemon, gives the daemon
/// 200 ms to take it, then sends SIGTERM and waits up to one second for
/// the process to exit.
pub fn sigterm_with_stalled_peer(d: &mut Daemon, prelude: &[u8]) -> Result<ExitStatus> {
    let _peer = stalled_peer(&d.socket, prelude)?;
    std::thread::sleep(Duration::from_millis(200));
    d.signal_and_wait(libc::SIGTERM, Duration::from_secs(1))
}
