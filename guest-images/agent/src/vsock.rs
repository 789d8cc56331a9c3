//! AF_VSOCK stream sockets on the card (virtio-vsock; `docs/vsock.md`).
//!
//! Written with `libc` directly: no crate in the workspace's `Cargo.lock`
//! wraps AF_VSOCK (vmm-sys-util's sockets are UNIX ones), and a listener,
//! a connect and an accept are three system calls.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::session::Conn;

/// `VMADDR_CID_HOST`: the host, as every guest sees it.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

// linux/vm_sockets.h: `IOCTL_VM_SOCKETS_GET_LOCAL_CID _IO(7, 0xb9)` on
// /dev/vsock (libc does not define it).
vmm_sys_util::ioctl_io_nr!(IOCTL_VM_SOCKETS_GET_LOCAL_CID, 7, 0xb9);

/// This machine's CID: the `guest_cid` of its virtio-vsock device's config
/// space (`docs/vsock.md`, section 3).
pub fn local_cid() -> io::Result<u32> {
    let dev = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 through a valid reference to ours;
    // the result is checked.
    let r = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&dev, IOCTL_VM_SOCKETS_GET_LOCAL_CID(), &mut cid)
    };
    cvt(r)?;
    Ok(cid)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening vsock socket.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port` of every CID of this machine.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let a = addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `a` is a valid sockaddr_vm of the size passed.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &a as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on our socket.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(VsockListener(fd))
    }

    /// Waits for a connection; returns it and the peer's CID.
    pub fn accept(&self) -> io::Result<(VsockStream, u32)> {
        let mut a = addr(0, 0);
        let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `a` and `len` describe a writable sockaddr_vm.
        let fd = cvt(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                &mut a as *mut libc::sockaddr_vm as *mut libc::sockaddr,
                &mut len,
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let s = VsockStream(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok((s, a.svm_cid))
    }
}

/// A connected vsock stream.
pub struct VsockStream(OwnedFd);

impl VsockStream {
    /// Connects to `port` at `cid`.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let a = addr(cid, port);
        // SAFETY: `a` is a valid sockaddr_vm of the size passed.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &a as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        Ok(VsockStream(fd))
    }

    /// Shuts down one or both directions (`libc::SHUT_*`).
    pub fn shutdown_how(&self, how: libc::c_int) -> io::Result<()> {
        // SAFETY: shutdown(2) on our socket.
        cvt(unsafe { libc::shutdown(self.0.as_raw_fd(), how) }).map(|_| ())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for reads of buf.len() bytes. MSG_NOSIGNAL:
        // a peer that went away is an error, not a SIGPIPE.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream(self.0.try_clone()?))
    }

    fn shutdown(&self) -> io::Result<()> {
        self.shutdown_how(libc::SHUT_RDWR)
    }
}
