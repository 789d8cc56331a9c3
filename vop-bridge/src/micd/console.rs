//! Attaching a terminal to a card's console (`micctl console`). Bytes go
//! both ways between the terminal and the card's `mic-console --unix`
//! socket until one of these happens:
//! - Ctrl-] is typed (detach: the card keeps running);
//! - the input ends;
//! - the console closes (the card stopped).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The byte that detaches (Ctrl-], as telnet and `scripts/run-card`).
pub const DETACH: u8 = 0x1d;

/// How long output is still shown after the input ended.
const LINGER: Duration = Duration::from_millis(500);

/// Why the relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Ctrl-] was typed.
    Detached,
    /// The input ended.
    InputClosed,
    /// The console went away.
    ConsoleClosed,
}

/// Waits until `fd` is readable or `closed` is set. Epoll (through
/// vmm-sys-util) rather than a blocking read, so that a console closing
/// is noticed while the user types nothing. An input epoll cannot watch
/// (a regular file) is always readable.
struct InputWait {
    epoll: Option<Epoll>,
}

impl InputWait {
    fn new(fd: i32) -> Self {
        let epoll = Epoll::new().ok().filter(|e| {
            e.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
                .is_ok()
        });
        InputWait { epoll }
    }

    /// True when the input is readable, false when the console closed.
    fn wait(&self, closed: &AtomicBool) -> bool {
        let Some(epoll) = &self.epoll else {
            return !closed.load(Ordering::Acquire);
        };
        let mut ev = [EpollEvent::default(); 1];
        loop {
            if closed.load(Ordering::Acquire) {
                return false;
            }
            if let Ok(n) = epoll.wait(200, &mut ev) {
                if n > 0 {
                    return true;
                }
            }
        }
    }
}

/// Relays between `input`/`output` and the console `stream`.
pub fn relay<I, O>(stream: UnixStream, mut input: I, mut output: O) -> io::Result<Ended>
where
    I: Read + AsRawFd,
    O: Write + Send + 'static,
{
    let mut reader = stream.try_clone()?;
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    let shown = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || output.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = output.flush();
        }
        flag.store(true, Ordering::Release);
    });
    let waiter = InputWait::new(input.as_raw_fd());
    let mut writer = &stream;
    let mut buf = [0u8; 1024];
    let ended = loop {
        if !waiter.wait(&closed) {
            break Ended::ConsoleClosed;
        }
        let n = match input.read(&mut buf) {
            Ok(0) => break Ended::InputClosed,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (data, detach) = match buf[..n].iter().position(|b| *b == DETACH) {
            Some(i) => (&buf[..i], true),
            None => (&buf[..n], false),
        };
        if writer.write_all(data).is_err() {
            break Ended::ConsoleClosed;
        }
        if detach {
            break Ended::Detached;
        }
    };
    if ended == Ended::InputClosed {
        std::thread::sleep(LINGER);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = shown.join();
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Output collected by the relay.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A console that answers each line in capitals; returns what it got.
    fn console(mut card: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok(n) = card.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let _ = card.write_all(&buf[..n].to_ascii_uppercase());
            }
            got
        })
    }

    #[test]
    fn detach_and_input_end() {
        let (ours, card) = UnixStream::pair().unwrap();
        let got = console(card);
        let (mut keys, input) = UnixStream::pair().unwrap();
        keys.write_all(b"ls\n").unwrap();
        keys.write_all(&[b'x', DETACH, b'y']).unwrap();
        let sink = Sink::default();
        assert_eq!(relay(ours, input, sink.clone()).unwrap(), Ended::Detached);
        // Everything before Ctrl-] reached the card, nothing after it.
        assert_eq!(got.join().unwrap(), b"ls\nx");

        let (ours, card) = UnixStream::pair().unwrap();
        let got = console(card);
        let (mut keys, input) = UnixStream::pair().unwrap();
        keys.write_all(b"pwd\n").unwrap();
        drop(keys);
        let sink = Sink::default();
        assert_eq!(
            relay(ours, input, sink.clone()).unwrap(),
            Ended::InputClosed
        );
        assert_eq!(got.join().unwrap(), b"pwd\n");
        assert_eq!(&*sink.0.lock().unwrap(), b"PWD\n");
    }

    #[test]
    fn console_that_goes_away() {
        let (ours, card) = UnixStream::pair().unwrap();
        let (_keys, input) = UnixStream::pair().unwrap();
        drop(card);
        assert_eq!(
            relay(ours, input, Sink::default()).unwrap(),
            Ended::ConsoleClosed
        );
    }
}
