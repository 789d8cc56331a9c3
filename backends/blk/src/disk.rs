//! The raw image file: positioned vectored I/O, flush, discard and
//! write-zeroes, with O_DIRECT support.
//!
//! All I/O goes through `preadv`/`pwritev` on caller-provided iovecs (guest
//! memory, zero copy). With `--direct`, requests whose file offset/length or
//! memory buffers are not aligned to the O_DIRECT alignment go through an
//! aligned bounce buffer or, for unaligned file ranges, a second buffered
//! file descriptor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Virtio sector size.
pub const SECTOR_SIZE: u64 = 512;

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    /// Main descriptor (O_DIRECT when requested).
    file: File,
    /// Buffered descriptor for unaligned ranges when `file` is O_DIRECT.
    buffered: Option<File>,
    /// Size in bytes, rounded down to whole sectors.
    size: u64,
    readonly: bool,
    /// Required alignment of O_DIRECT offsets, lengths and buffers (1 when
    /// not direct).
    align: u64,
}

/// Alignment information of an O_DIRECT file from statx(STATX_DIOALIGN);
/// falls back to 512 bytes.
fn dio_alignment(file: &File) -> (u64, u64) {
    // SAFETY: zeroed statx is a valid out-parameter.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid out pointer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        (
            u64::from(stx.stx_dio_offset_align),
            u64::from(stx.stx_dio_mem_align.max(1)),
        )
    } else {
        (SECTOR_SIZE, SECTOR_SIZE)
    }
}

impl Disk {
    /// Open `path` (a regular file or block device).
    pub fn open(path: &Path, readonly: bool, direct: bool) -> io::Result<Disk> {
        let meta = std::fs::metadata(path)?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        let buffered_file = opts.open(path)?;
        let lock = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(buffered_file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "image is locked by another process",
                ));
            }
            return Err(e);
        }
        let (file, buffered, align) = if direct {
            let direct_file = opts
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("O_DIRECT open failed ({e})")))?;
            let (off_align, mem_align) = dio_alignment(&direct_file);
            (
                direct_file,
                Some(buffered_file),
                off_align.max(mem_align).max(SECTOR_SIZE),
            )
        } else {
            (buffered_file, None, 1)
        };
        let len = {
            use std::io::{Seek, SeekFrom};
            let mut f = &file;
            f.seek(SeekFrom::End(0))?
        };
        Ok(Disk {
            file,
            buffered,
            size: len / SECTOR_SIZE * SECTOR_SIZE,
            readonly,
            align,
        })
    }

    /// Size in bytes (whole sectors).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether the image is read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// O_DIRECT alignment (1 when not using O_DIRECT).
    pub fn align(&self) -> u64 {
        self.align
    }

    /// Logical block size to advertise (`VIRTIO_BLK_F_BLK_SIZE`).
    pub fn block_size(&self) -> u32 {
        self.align.clamp(SECTOR_SIZE, 4096) as u32
    }

    /// Check that `[offset, offset + len)` lies inside the image.
    pub fn check_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Whether an O_DIRECT transfer of this file range is possible.
    fn range_aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.align) && len.is_multiple_of(self.align)
    }

    /// Whether `iovs` can be handed to O_DIRECT as they are.
    pub fn iovecs_aligned(&self, iovs: &[libc::iovec]) -> bool {
        self.align == 1
            || iovs.iter().all(|v| {
                (v.iov_base as u64).is_multiple_of(self.align)
                    && (v.iov_len as u64).is_multiple_of(self.align)
            })
    }

    /// Which fd to use for a file range, and whether it is O_DIRECT.
    fn fd_for(&self, offset: u64, len: u64) -> (&File, bool) {
        match &self.buffered {
            Some(b) if !self.range_aligned(offset, len) => (b, false),
            Some(_) => (&self.file, true),
            None => (&self.file, false),
        }
    }

    /// Whether a transfer at this range must be bounced (direct, aligned
    /// range, but unaligned memory).
    pub fn needs_bounce(&self, offset: u64, len: u64, iovs: &[libc::iovec]) -> bool {
        let (_, direct) = self.fd_for(offset, len);
        direct && !self.iovecs_aligned(iovs)
    }

    /// Read exactly the iovecs' total length at `offset`.
    /// The caller has checked the range. `iovs` is consumed (modified).
    pub fn read_vectored_at(&self, iovs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        let total: u64 = iovs.iter().map(|v| v.iov_len as u64).sum();
        let (f, _) = self.fd_for(offset, total);
        rw_all(f, iovs, offset, false)
    }

    /// Write all of the iovecs at `offset`. `iovs` is consumed (modified).
    pub fn write_vectored_at(&self, iovs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let total: u64 = iovs.iter().map(|v| v.iov_len as u64).sum();
        let (f, _) = self.fd_for(offset, total);
        rw_all(f, iovs, offset, true)
    }

    /// Make completed writes durable (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocate a range (punch a hole); reads return zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zero a range, keeping it allocated when the filesystem can.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => self.write_zeroes_slow(offset, len),
            Err(e) => Err(e),
        }
    }

    /// Zero a range by unmapping it when possible (punch hole), otherwise
    /// zeroing it.
    pub fn zero_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => self.zero_range(offset, len),
            Err(e) => Err(e),
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        // fallocate on the buffered fd keeps page cache handling simple.
        let f = self.buffered.as_ref().unwrap_or(&self.file);
        loop {
            // SAFETY: fallocate on a valid fd with checked, non-negative values.
            let r = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn write_zeroes_slow(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let f = self.buffered.as_ref().unwrap_or(&self.file);
        let zeros = vec![0u8; 1 << 20];
        let end = offset + len;
        while offset < end {
            let n = ((end - offset) as usize).min(zeros.len());
            std::os::unix::fs::FileExt::write_all_at(f, &zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// preadv/pwritev until every iovec is done; short transfers are resumed,
/// end of file is an error.
fn rw_all(f: &File, mut iovs: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
    while !iovs.is_empty() {
        if iovs[0].iov_len == 0 {
            iovs = &mut iovs[1..];
            continue;
        }
        let cnt = iovs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the iovecs point into guest memory or bounce buffers that
        // stay mapped for the duration of the call; fd is valid.
        let r = unsafe {
            if write {
                libc::pwritev(f.as_raw_fd(), iovs.as_ptr(), cnt, offset as libc::off_t)
            } else {
                libc::preadv(f.as_raw_fd(), iovs.as_ptr(), cnt, offset as libc::off_t)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut n = r as usize;
        offset += n as u64;
        while n > 0 {
            let v = &mut iovs[0];
            if n >= v.iov_len {
                n -= v.iov_len;
                iovs = &mut iovs[1..];
            } else {
                v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    align: usize,
}

// SAFETY: the buffer is plain owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer.
    pub const fn empty() -> AlignedBuf {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
            align: 1,
        }
    }

    /// Make sure the buffer holds at least `len` bytes aligned to `align`;
    /// returns the buffer as a mutable slice of exactly `len` bytes.
    pub fn get(&mut self, len: usize, align: usize) -> &mut [u8] {
        if len > self.len || align > self.align {
            self.free();
            let cap = len.next_power_of_two().max(4096);
            let layout = std::alloc::Layout::from_size_align(cap, align.max(4096)).unwrap();
            // SAFETY: non-zero size layout.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = p;
            self.len = cap;
            self.align = align.max(4096);
        }
        // SAFETY: ptr is valid for self.len >= len bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            let layout = std::alloc::Layout::from_size_align(self.len, self.align).unwrap();
            // SAFETY: allocated with this layout.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.len = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }
    }

    #[test]
    fn vectored_roundtrip_and_ranges() {
        let prefix = std::env::temp_dir().join("mic-blk-disk-");
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap();
        let p = dir.as_path().join("img");
        std::fs::write(&p, vec![0u8; 8192 + 100]).unwrap();
        let d = Disk::open(&p, false, false).unwrap();
        assert_eq!(d.size(), 8192);
        assert_eq!(d.sectors(), 16);
        assert!(d.check_range(4096, 4096));
        assert!(!d.check_range(4096, 4097));
        assert!(!d.check_range(u64::MAX, 2));
        let mut a = vec![1u8; 300];
        let mut b = vec![2u8; 212];
        d.write_vectored_at(&mut [iov(&mut a), iov(&mut b)], 512)
            .unwrap();
        let mut r = vec![0u8; 512];
        d.read_vectored_at(&mut [iov(&mut r)], 512).unwrap();
        assert_eq!(&r[..300], &a[..]);
        assert_eq!(&r[300..], &b[..]);
        d.zero_unmap(512, 512).unwrap();
        d.read_vectored_at(&mut [iov(&mut r)], 512).unwrap();
        assert!(r.iter().all(|&x| x == 0));
        // Locked while open.
        assert!(Disk::open(&p, false, false).is_err());
        drop(d);
        let ro = Disk::open(&p, true, false).unwrap();
        assert!(ro.write_vectored_at(&mut [iov(&mut a)], 0).is_err());
        drop(dir);
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut b = AlignedBuf::empty();
        let s = b.get(10000, 4096);
        assert_eq!(s.len(), 10000);
        assert_eq!(s.as_ptr() as usize % 4096, 0);
    }
}
