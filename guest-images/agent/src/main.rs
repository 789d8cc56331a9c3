//! `mic-agent`: serves the agent protocol on its vsock port; its `connect`
//! and `listen` modes give the card's shell scripts a vsock pipe (busybox
//! has no vsock client).
//!
//! ```text
//! mic-agent [--port N]           serve (the card's init starts this)
//! mic-agent connect CID PORT     stdin to the peer, the peer to stdout
//! mic-agent listen PORT          the same for the first peer that connects
//! mic-agent cid                  print this card's CID
//! ```

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mic_agent::protocol::{write_message, ErrorCode, Message, AGENT_PORT};
use mic_agent::session::{self, Conn};
use mic_agent::vsock::{VsockListener, VsockStream};

/// Connections served at once; more are told [`ErrorCode::Busy`].
const MAX_SESSIONS: usize = 32;

fn usage() -> ! {
    eprintln!("usage: mic-agent [--port N] | connect CID PORT | listen PORT | cid");
    std::process::exit(2)
}

fn number(s: Option<&String>) -> u32 {
    s.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None => serve(AGENT_PORT),
        Some("--port") => serve(number(args.get(1))),
        Some("connect") => {
            VsockStream::connect(number(args.get(1)), number(args.get(2))).and_then(pipe)
        }
        Some("listen") => {
            VsockListener::bind(number(args.get(1))).and_then(|l| pipe(l.accept()?.0))
        }
        Some("cid") => mic_agent::vsock::local_cid().map(|c| println!("{c}")),
        Some(_) => usage(),
    };
    if let Err(e) = result {
        eprintln!("mic-agent: {e}");
        std::process::exit(1);
    }
}

/// Accepts connections for ever, each served on a thread of its own.
fn serve(port: u32) -> io::Result<()> {
    let listener = VsockListener::bind(port)?;
    eprintln!("mic-agent: listening on vsock port {port}");
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (mut conn, cid) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("mic-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_SESSIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            let _ = write_message(
                &mut conn,
                &Message::Error(ErrorCode::Busy, "too many connections".into()),
            );
            continue;
        }
        let active = active.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("session-{cid}"))
            .spawn(move || {
                if let Err(e) = session::serve(conn) {
                    eprintln!("mic-agent: peer {cid}: {e}");
                }
                active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            eprintln!("mic-agent: no thread for a session: {e}");
        }
    }
}

/// Copies stdin to the peer (then ends that direction) and the peer to
/// stdout until the peer ends.
fn pipe(conn: VsockStream) -> io::Result<()> {
    let mut tx = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<()> {
        io::copy(&mut io::stdin().lock(), &mut tx)?;
        tx.shutdown_how(libc::SHUT_WR)
    });
    let mut rx = conn;
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rx.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("stdin thread panicked")))
}
