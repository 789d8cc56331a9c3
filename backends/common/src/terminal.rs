//! A local terminal in raw mode, for the console passthrough of
//! `mic-console --stdio` and for `micctl console` and `micctl exec -t`.
//!
//! Not `vmm_sys_util::terminal::Terminal::set_raw_mode`: that only clears
//! `ICANON | ECHO | ISIG` (output processing, `IXON` flow control and 7-bit
//! input stay), and its `set_canon_mode` does not give back the settings
//! the terminal had. A passthrough needs `cfmakeraw` and the exact settings
//! back.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};

/// Puts terminal `fd` in raw mode (`cfmakeraw`); returns the settings it
/// had.
pub fn make_raw(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid termios pointer; a bad fd is an error return.
    if unsafe { libc::tcgetattr(fd, &mut t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let saved = t;
    // SAFETY: a valid termios pointer.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: a valid termios pointer; a bad fd is an error return.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(saved)
}

/// A terminal in raw mode until dropped, then as it was.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Makes `fd` (a terminal) raw.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        Ok(RawTerminal {
            fd,
            saved: make_raw(fd)?,
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: the settings tcgetattr read from this fd. TCSADRAIN: the
        // last output is written in raw mode before the switch.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
    }
}

/// A new pseudo-terminal pair (master, slave) of this window size.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds; the name and termios pointers may be
    // null, and `ws` outlives the call.
    if unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh fds that nothing else owns.
    Ok(unsafe { (File::from_raw_fd(m), File::from_raw_fd(s)) })
}

/// The window size (rows, columns) of terminal `fd`; (0, 0) when unknown.
pub fn window_size(fd: RawFd) -> (u16, u16) {
    // SAFETY: winsize is plain data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a struct winsize; a bad fd is an error return.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
        return (0, 0);
    }
    (ws.ws_row, ws.ws_col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn lflag(fd: RawFd) -> libc::tcflag_t {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        t.c_lflag
    }

    #[test]
    fn raw_while_held_then_restored() {
        let (_m, s) = open_pty(24, 80).unwrap();
        let fd = s.as_raw_fd();
        let before = lflag(fd);
        assert_ne!(before & libc::ICANON, 0);
        let raw = RawTerminal::new(fd).unwrap();
        assert_eq!(lflag(fd) & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        drop(raw);
        assert_eq!(lflag(fd), before);
        assert_eq!(window_size(fd), (24, 80));
    }

    #[test]
    fn not_a_terminal() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(RawTerminal::new(f.as_raw_fd()).is_err());
        assert_eq!(window_size(f.as_raw_fd()), (0, 0));
    }
}
