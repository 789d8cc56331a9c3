//! Pseudo-terminals for `micctl exec -t` ([`Message::ExecPty`];
//! `docs/vsock.md`, "The agent protocol"): a command runs in a session of
//! its own with the pty's slave as its controlling terminal and as stdin,
//! stdout and stderr; the agent relays the master.
//!
//! [`Message::ExecPty`]: crate::protocol::Message::ExecPty
//!
//! No crate in `Cargo.lock` opens ptys (vmm-sys-util's `terminal` only
//! switches modes), so this calls `openpty(3)` directly.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// Both ends of a new pseudo-terminal.
pub struct Pty {
    /// The agent's end: what the command writes is read here, what is
    /// written here is the command's input.
    pub master: File,
    /// The command's end (`/dev/pts/N`).
    pub slave: File,
}

impl Pty {
    /// Opens a pty with this window size (0 rows or columns: left unset).
    pub fn open(rows: u16, cols: u16) -> io::Result<Pty> {
        let (mut master, mut slave) = (-1, -1);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let wsp = if rows > 0 && cols > 0 {
            &ws as *const libc::winsize
        } else {
            std::ptr::null()
        };
        // SAFETY: openpty(3) writes two fds into the two ints; the name
        // and termios pointers may be null, the winsize one points at `ws`
        // (or is null), which lives across the call.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                wsp,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openpty succeeded, so both are open fds that nothing else
        // owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        Ok(Pty {
            master: master.into(),
            slave: slave.into(),
        })
    }

    /// Starts `cmd` on the slave: stdin, stdout and stderr, in a new
    /// session whose controlling terminal it is (so the command and its
    /// children see a terminal, and get SIGHUP when it goes). The slave is
    /// closed here, `cmd` with it (it holds copies): the master reads the
    /// end of the output once the command's side closed it; the master
    /// stays with the caller.
    pub fn spawn(self, mut cmd: Command) -> io::Result<(Child, File)> {
        let Pty { master, slave } = self;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: between fork and exec the closure calls only setsid(2)
        // and ioctl(2), which are async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // fd 0 is the slave (dup2'ed before pre_exec runs).
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok((child, master))
    }
}

/// Reads the master; the end of the output is EIO on Linux (every slave fd
/// closed), read here as the end of the stream.
pub struct MasterReader(pub File);

impl Read for MasterReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn output_of(rows: u16, cols: u16, script: &str, input: &[u8]) -> (String, i32) {
        let pty = Pty::open(rows, cols).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let (mut child, master) = pty.spawn(cmd).unwrap();
        let mut w = master.try_clone().unwrap();
        w.write_all(input).unwrap();
        let mut out = Vec::new();
        MasterReader(master).read_to_end(&mut out).unwrap();
        let status = child.wait().unwrap().code().unwrap();
        (String::from_utf8_lossy(&out).into_owned(), status)
    }

    #[test]
    fn the_command_has_a_controlling_terminal_of_this_size() {
        let (out, status) = output_of(
            33,
            101,
            "tty; test -t 0 && test -t 1 && test -t 2 && stty size </dev/tty; exit 4",
            b"",
        );
        assert_eq!(status, 4);
        let lines: Vec<_> = out.lines().map(str::trim_end).collect();
        assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
        assert_eq!(lines[1], "33 101");
    }

    #[test]
    fn input_goes_through_the_line_discipline() {
        // Canonical mode: a line is read at its newline, and echoed;
        // Ctrl-D on an empty line is the end of input.
        let (out, status) = output_of(0, 0, "read l; echo got:$l; cat; echo end", b"abc\n\x04");
        assert_eq!(status, 0);
        assert!(out.contains("got:abc\r\n"), "{out:?}");
        assert!(out.ends_with("end\r\n"), "{out:?}");
    }
}
