//! The local terminal during `micctl exec -t`: raw while the card's
//! pseudo-terminal does the line editing and echo, restored after.

use std::io;
use std::os::fd::RawFd;

/// A terminal in raw mode (`cfmakeraw`) until dropped, then as it was. Not
/// `vmm_sys_util::terminal::Terminal::set_raw_mode`: that only clears
/// `ICANON | ECHO | ISIG` (output processing and `IXON` stay on) and its
/// `set_canon_mode` does not give back the settings the terminal had.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Makes `fd` (a terminal) raw.
    pub fn new(fd: RawFd) -> io::Result<Self> {
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
        Ok(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: the settings tcgetattr read from this fd. TCSADRAIN: the
        // command's last output is written in raw mode before the switch.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
    }
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

    /// A pty pair of this size, for the tests.
    fn pty(rows: u16, cols: u16) -> (std::fs::File, std::fs::File) {
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds; name and termios may be null.
        let r =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: two fresh fds owned by nothing else.
        unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
    }

    fn lflag(fd: RawFd) -> libc::tcflag_t {
        // SAFETY: as in RawTerminal::new.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        t.c_lflag
    }

    #[test]
    fn raw_while_held_then_restored() {
        let (_m, s) = pty(24, 80);
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
