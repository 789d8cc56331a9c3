//! Linux tap devices opened for virtio-net use.
//!
//! Each queue of a tap is one file descriptor opened on `/dev/net/tun` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (plus `IFF_MULTI_QUEUE` when more
//! than one queue pair is used). The vnet header size and the offloads the
//! kernel may hand us are set once the guest's features are known.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::config::HostIp;

// `linux/if_tun.h`, as the libc crate has it.
use libc::{
    IFF_ATTACH_QUEUE, IFF_DETACH_QUEUE, IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR,
    TUNSETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Tap offload flags (`TUNSETOFFLOAD`): partial checksums, TSO over IPv4
/// and IPv6, TSO with ECN.
pub use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};

#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }

    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn set_ipv4(&mut self, a: Ipv4Addr) {
        // struct sockaddr_in: family, port, address.
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&a.octets());
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// One queue of a tap device.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
}

impl TapQueue {
    /// Opens (creating it if needed) queue `name` of a tap device.
    ///
    /// The file descriptor is non-blocking.
    pub fn open(name: &str, multi_queue: bool) -> io::Result<(Self, String)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        let mut req = IfReq::new(name)?;
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        req.set_short(flags as libc::c_short);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF, &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) => " (needs CAP_NET_ADMIN or a tap owned by this user)",
                Some(libc::EINVAL) if multi_queue => {
                    " (an existing tap must have been created with multi_queue)"
                }
                Some(libc::EINVAL) => " (is it an existing non-tap or multi_queue device?)",
                _ => "",
            };
            return Err(io::Error::new(
                e.kind(),
                format!("cannot attach to tap '{name}': {e}{hint}"),
            ));
        }
        let tap = TapQueue { file };
        // The guest header is at least 10 bytes; the real size is set once
        // features are negotiated. Checking here rejects kernels without
        // vnet header support up front.
        tap.set_vnet_hdr_size(12)?;
        Ok((tap, req.name()))
    }

    /// Sets the size of the virtio-net header the tap reads and writes.
    pub fn set_vnet_hdr_size(&self, size: i32) -> io::Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads an int, which `size` is.
        let ret = unsafe { ioctl_with_ref(&self.file, TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets which offloads the kernel may use for packets it hands us.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let ret = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches the queue to its multi-queue tap, or detaches it: the
    /// kernel steers no packets to a detached queue and drops what it held
    /// (`TUNSETQUEUE`, `Documentation/networking/tuntap.rst`).
    pub fn set_attached(&self, attached: bool) -> io::Result<()> {
        // Only the flags are read; the name is not looked at.
        let mut req = IfReq::new("q")?;
        let flags = if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        req.set_short(flags as libc::c_short);
        // SAFETY: TUNSETQUEUE reads a struct ifreq, which `req` is.
        let ret = unsafe { ioctl_with_ref(&self.file, TUNSETQUEUE, &req) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one packet (vnet header + frame). `Ok(None)` if none is queued.
    pub fn read_packet(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one packet (vnet header + frame).
    pub fn write_packet(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for reads of its length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Opens `queues` queues of the tap device `name`.
///
/// Returns the queues and the kernel's name of the interface.
pub fn open_tap(name: &str, queues: usize) -> io::Result<(Vec<TapQueue>, String)> {
    let mq = queues > 1;
    let mut v = Vec::with_capacity(queues);
    let mut ifname = name.to_string();
    for _ in 0..queues {
        let (q, n) = TapQueue::open(name, mq)?;
        ifname = n;
        v.push(q);
    }
    Ok((v, ifname))
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn if_ioctl(sock: &OwnedFd, req: libc::c_ulong, ifr: &mut IfReq, what: &str) -> io::Result<()> {
    // SAFETY: all requests used here take a struct ifreq.
    let ret = unsafe { ioctl_with_mut_ref(sock, req, ifr) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Assigns `ip` (if given) and `mtu` to interface `name` and brings it up.
pub fn configure_interface(name: &str, ip: Option<HostIp>, mtu: Option<u16>) -> io::Result<()> {
    let sock = inet_socket()?;
    if let Some(mtu) = mtu {
        let mut r = IfReq::new(name)?;
        r.set_int(i32::from(mtu));
        if_ioctl(&sock, libc::SIOCSIFMTU as _, &mut r, "set MTU")?;
    }
    if let Some(ip) = ip {
        let mut r = IfReq::new(name)?;
        r.set_ipv4(ip.addr);
        if_ioctl(&sock, libc::SIOCSIFADDR as _, &mut r, "set address")?;
        let mask = if ip.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(ip.prefix))
        };
        let mut r = IfReq::new(name)?;
        r.set_ipv4(Ipv4Addr::from(mask));
        if_ioctl(&sock, libc::SIOCSIFNETMASK as _, &mut r, "set netmask")?;
    }
    let mut r = IfReq::new(name)?;
    if_ioctl(&sock, libc::SIOCGIFFLAGS as _, &mut r, "get flags")?;
    let flags = r.short() | libc::IFF_UP as libc::c_short;
    r.set_short(flags);
    if_ioctl(&sock, libc::SIOCSIFFLAGS as _, &mut r, "bring up")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let mut r = IfReq::new("mic0").unwrap();
        assert_eq!(r.name(), "mic0");
        r.set_short(0x1234);
        assert_eq!(r.short(), 0x1234);
        r.set_ipv4(Ipv4Addr::new(172, 31, 1, 254));
        assert_eq!(&r.data[4..8], &[172, 31, 1, 254]);
        assert!(IfReq::new("0123456789abcdef").is_err());
    }
}
