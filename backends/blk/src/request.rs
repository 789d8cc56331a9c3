//! Parsing and execution of virtio-blk requests.
//!
//! A request is a descriptor chain: device-readable buffers (16-byte header,
//! then data for writes/discard/write-zeroes) followed by device-writable
//! buffers (data for reads/GET_ID, then one status byte). Framing is not
//! assumed: the readable and writable parts are treated as byte streams.
//!
//! Every guest-controlled value is checked before any I/O: direction order,
//! descriptor addresses and lengths against guest memory, sector ranges
//! against the image. A bad request gets `VIRTIO_BLK_S_IOERR` (or
//! `VIRTIO_BLK_S_UNSUPP` for unknown types/flags) and nothing is written;
//! a chain without a writable byte for the status is completed with length 0.

use std::io;

use log::debug;
use mic_backend_common::limited;
use mic_backend_common::ratelimit::{per_minute, LogLimiter};
use virtio_bindings::virtio_blk::{
    self, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::disk::{AlignedBuf, Disk, SECTOR_SIZE};

// Status bytes (a `u8` in the request's last descriptor).
const VIRTIO_BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
const VIRTIO_BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const VIRTIO_BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Largest number of segments in one discard/write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Largest number of sectors in one discard/write-zeroes segment.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

/// Failed I/O lines: once the image fails, every request the driver sends
/// would log one.
static IO_ERROR_LINES: LogLimiter = per_minute();

const HEADER_LEN: u64 = 16;
const BOUNCE_CHUNK: usize = 1 << 20;

/// A guest buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes (non-zero).
    pub len: u32,
}

/// Per-worker reusable buffers, so steady-state requests do not allocate.
pub struct Scratch {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    iovecs: Vec<libc::iovec>,
    bounce: AlignedBuf,
    /// Data bytes moved by the last request processed (0 for non-I/O).
    pub last_bytes: u64,
    /// Whether the last request was a write (its bytes went to the disk).
    pub last_write: bool,
    /// Whether the last request completed with `VIRTIO_BLK_S_OK`.
    pub last_ok: bool,
}

// SAFETY: the iovecs only hold pointers during one request (they are
// cleared before use); the rest is owned data.
unsafe impl Send for Scratch {}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            readable: Vec::with_capacity(64),
            writable: Vec::with_capacity(64),
            iovecs: Vec::with_capacity(256),
            bounce: AlignedBuf::empty(),
            last_bytes: 0,
            last_write: false,
            last_ok: false,
        }
    }
}

/// What a request executes against.
pub struct Context<'a> {
    /// The image.
    pub disk: &'a Disk,
    /// GET_ID answer.
    pub serial: &'a [u8; 20],
    /// Sync after every write (write cache disabled).
    pub writethrough: bool,
}

/// Sum of segment lengths.
fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Whether `seg` lies entirely inside guest memory.
fn seg_in_memory<M: GuestMemoryBackend + ?Sized>(mem: &M, seg: &Segment) -> bool {
    let mut n = 0usize;
    for s in mem.get_slices(GuestAddress(seg.addr), seg.len as usize) {
        match s {
            Ok(s) => n += s.len(),
            Err(_) => return false,
        }
    }
    n == seg.len as usize
}

/// Calls `f(guest_addr, len)` for the stream range `[skip, skip + len)` of `segs`.
fn for_range(
    segs: &[Segment],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(u64, usize) -> bool,
) -> bool {
    for s in segs {
        if len == 0 {
            break;
        }
        let sl = u64::from(s.len);
        if skip >= sl {
            skip -= sl;
            continue;
        }
        let n = (sl - skip).min(len);
        if !f(s.addr + skip, n as usize) {
            return false;
        }
        len -= n;
        skip = 0;
    }
    len == 0
}

/// Copy the stream range starting at `skip` into `out`.
fn gather<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> bool {
    let mut pos = 0usize;
    for_range(segs, skip, out.len() as u64, |addr, n| {
        let ok = mem
            .read_slice(&mut out[pos..pos + n], GuestAddress(addr))
            .is_ok();
        pos += n;
        ok
    })
}

/// Copy `data` into the stream range starting at `skip`.
fn scatter<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    data: &[u8],
) -> bool {
    let mut pos = 0usize;
    for_range(segs, skip, data.len() as u64, |addr, n| {
        let ok = mem
            .write_slice(&data[pos..pos + n], GuestAddress(addr))
            .is_ok();
        pos += n;
        ok
    })
}

/// Append host iovecs for the stream range to `out`.
fn iovecs<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> bool {
    for_range(segs, skip, len, |addr, n| {
        for s in mem.get_slices(GuestAddress(addr), n) {
            let Ok(s) = s else { return false };
            out.push(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            });
        }
        true
    })
}

/// Outcome of one request: status byte and bytes written to the guest
/// (excluding the status byte).
type Outcome = (u8, u32);

/// Parse and execute one descriptor chain; returns the used length to
/// report (data bytes written to the guest plus the status byte, or 0 when
/// there was nowhere to put a status).
pub fn process<M, I>(mem: &M, descs: I, ctx: &Context, s: &mut Scratch) -> u32
where
    M: GuestMemoryBackend + ?Sized,
    I: Iterator<Item = Descriptor>,
{
    s.readable.clear();
    s.writable.clear();
    s.last_bytes = 0;
    s.last_write = false;
    s.last_ok = false;
    let mut malformed = false;
    let mut last_has_next = false;
    for d in descs {
        last_has_next = d.has_next();
        if d.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: d.addr().0,
            len: d.len(),
        };
        if d.is_write_only() {
            s.writable.push(seg);
        } else {
            if !s.writable.is_empty() {
                // Readable after writable: wrong direction order.
                malformed = true;
            }
            s.readable.push(seg);
        }
    }
    // The chain ended on a descriptor that claims a successor: a loop, an
    // index beyond the table or an unreadable/invalid indirect table.
    if last_has_next {
        malformed = true;
    }

    // The status byte is the last byte of the writable stream.
    let Some(last) = s.writable.last().copied() else {
        debug!("request without a writable status byte");
        return 0;
    };
    let status_addr = last.addr.wrapping_add(u64::from(last.len) - 1);
    if mem.get_slice(GuestAddress(status_addr), 1).is_err() {
        debug!("status byte outside guest memory");
        return 0;
    }
    // Shrink the writable stream to its data part.
    if last.len == 1 {
        s.writable.pop();
    } else {
        s.writable.last_mut().unwrap().len -= 1;
    }

    if !malformed
        && !s
            .readable
            .iter()
            .chain(s.writable.iter())
            .all(|seg| seg_in_memory(mem, seg))
    {
        debug!("descriptor outside guest memory");
        malformed = true;
    }

    let (status, written) = if malformed {
        (VIRTIO_BLK_S_IOERR, 0)
    } else {
        execute(mem, ctx, s)
    };
    if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
        return 0;
    }
    s.last_ok = status == VIRTIO_BLK_S_OK;
    written + 1
}

fn execute<M: GuestMemoryBackend + ?Sized>(mem: &M, ctx: &Context, s: &mut Scratch) -> Outcome {
    let rlen = total(&s.readable);
    let wlen = total(&s.writable);
    if rlen < HEADER_LEN {
        debug!("request header too short ({rlen} bytes)");
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if !gather(mem, &s.readable, 0, &mut hdr) {
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let rtype = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let out_data = rlen - HEADER_LEN;

    match rtype {
        VIRTIO_BLK_T_IN => {
            // The used length (data plus the status byte) is a `u32`.
            let Some(done) = u32::try_from(wlen).ok().filter(|&n| n < u32::MAX) else {
                debug!("read of {wlen} bytes: more than a used length can report");
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            if out_data != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            match rw(mem, ctx, s, sector, wlen, false) {
                Ok(()) => (VIRTIO_BLK_S_OK, done),
                Err(st) => (st, 0),
            }
        }
        VIRTIO_BLK_T_OUT => {
            if wlen != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            if ctx.disk.readonly() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            match rw(mem, ctx, s, sector, out_data, true) {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(st) => (st, 0),
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if out_data != 0 || wlen != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            match ctx.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    limited!(IO_ERROR_LINES, warn, "flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_data != 0 || wlen == 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let n = (wlen as usize).min(ctx.serial.len());
            if !scatter(mem, &s.writable, 0, &ctx.serial[..n]) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            (VIRTIO_BLK_S_OK, n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if ctx.disk.readonly() {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            (discard_or_zero(mem, ctx, s, rtype, out_data, wlen), 0)
        }
        other => {
            debug!("unsupported request type {other}");
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    }
}

/// Read (`write == false`: file -> writable stream) or write (readable
/// stream after the header -> file) `len` bytes at `sector`.
fn rw<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    ctx: &Context,
    s: &mut Scratch,
    sector: u64,
    len: u64,
    write: bool,
) -> Result<(), u8> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        debug!("data length {len} is not a multiple of the sector size");
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
        return Err(VIRTIO_BLK_S_IOERR);
    };
    if !ctx.disk.check_range(offset, len) {
        debug!("request beyond the end of the image (sector {sector}, {len} bytes)");
        return Err(VIRTIO_BLK_S_IOERR);
    }
    if len == 0 {
        return Ok(());
    }
    s.last_bytes = len;
    s.last_write = write;
    let (segs, skip) = if write {
        (&s.readable, HEADER_LEN)
    } else {
        (&s.writable, 0)
    };
    s.iovecs.clear();
    if !iovecs(mem, segs, skip, len, &mut s.iovecs) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let res = if ctx.disk.needs_bounce(offset, len, &s.iovecs) {
        bounce(mem, ctx.disk, segs, skip, &mut s.bounce, offset, len, write)
    } else if write {
        ctx.disk.write_vectored_at(&mut s.iovecs, offset)
    } else {
        ctx.disk.read_vectored_at(&mut s.iovecs, offset)
    };
    let res = res.and_then(|()| {
        if write && ctx.writethrough {
            ctx.disk.flush()
        } else {
            Ok(())
        }
    });
    res.map_err(|e| {
        limited!(
            IO_ERROR_LINES,
            warn,
            "{} of {len} bytes at sector {sector} failed: {e}",
            if write { "write" } else { "read" }
        );
        VIRTIO_BLK_S_IOERR
    })
}

/// O_DIRECT transfer of an aligned file range through an aligned buffer.
#[allow(clippy::too_many_arguments)]
fn bounce<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    disk: &Disk,
    segs: &[Segment],
    skip: u64,
    buf: &mut AlignedBuf,
    offset: u64,
    len: u64,
    write: bool,
) -> io::Result<()> {
    let align = disk.align() as usize;
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(BOUNCE_CHUNK);
        let b = buf.get(n, align);
        let mut iov = [libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: n,
        }];
        if write {
            if !gather(mem, segs, skip + done, b) {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            disk.write_vectored_at(&mut iov, offset + done)?;
        } else {
            disk.read_vectored_at(&mut iov, offset + done)?;
            if !scatter(mem, segs, skip + done, b) {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
        }
        done += n as u64;
    }
    Ok(())
}

fn discard_or_zero<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    ctx: &Context,
    s: &Scratch,
    rtype: u32,
    data_len: u64,
    wlen: u64,
) -> u8 {
    if wlen != 0
        || data_len == 0
        || !data_len.is_multiple_of(16)
        || data_len / 16 > u64::from(MAX_DISCARD_SEG)
    {
        return VIRTIO_BLK_S_IOERR;
    }
    let count = (data_len / 16) as usize;
    let mut ranges = [(0u64, 0u64, false); MAX_DISCARD_SEG as usize];
    // Validate every segment before touching the file.
    for (i, r) in ranges.iter_mut().enumerate().take(count) {
        let mut seg = [0u8; 16];
        if !gather(mem, &s.readable, HEADER_LEN + 16 * i as u64, &mut seg) {
            return VIRTIO_BLK_S_IOERR;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
        let allowed = if rtype == VIRTIO_BLK_T_WRITE_ZEROES {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return VIRTIO_BLK_S_UNSUPP;
        }
        if num > MAX_DISCARD_SECTORS {
            return VIRTIO_BLK_S_IOERR;
        }
        let Some(off) = sector.checked_mul(SECTOR_SIZE) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let len = u64::from(num) * SECTOR_SIZE;
        if !ctx.disk.check_range(off, len) {
            return VIRTIO_BLK_S_IOERR;
        }
        *r = (off, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0);
    }
    for &(off, len, unmap) in &ranges[..count] {
        if len == 0 {
            continue;
        }
        let res = if rtype == VIRTIO_BLK_T_DISCARD {
            match ctx.disk.punch_hole(off, len) {
                // Discard is a hint; a filesystem without hole punching
                // simply keeps the data.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP)) => Ok(()),
                r => r,
            }
        } else if unmap {
            ctx.disk.zero_unmap(off, len)
        } else {
            ctx.disk.zero_range(off, len)
        };
        if let Err(e) = res {
            limited!(
                IO_ERROR_LINES,
                warn,
                "discard/write-zeroes at byte {off} (+{len}) failed: {e}"
            );
            return VIRTIO_BLK_S_IOERR;
        }
    }
    if ctx.writethrough {
        if let Err(e) = ctx.disk.flush() {
            limited!(IO_ERROR_LINES, warn, "flush failed: {e}");
            return VIRTIO_BLK_S_IOERR;
        }
    }
    VIRTIO_BLK_S_OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = 2;
    const N: u16 = 1;

    fn setup() -> (GuestMemoryMmap, Disk, vmm_sys_util::tempdir::TempDir) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let prefix = std::env::temp_dir().join("mic-blk-req-");
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap();
        let p = dir.as_path().join("img");
        std::fs::write(&p, vec![0xeeu8; 64 * 512]).unwrap();
        let disk = Disk::open(&p, false, false).unwrap();
        (mem, disk, dir)
    }

    fn hdr(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn run(mem: &GuestMemoryMmap, disk: &Disk, descs: Vec<Descriptor>) -> u32 {
        let serial = *b"serial-0123456789abc";
        let ctx = Context {
            disk,
            serial: &serial,
            writethrough: false,
        };
        let mut s = Scratch::default();
        process(mem, descs.into_iter(), &ctx, &mut s)
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A read whose writable buffers add up to more than a used length
    /// can report (a `u32`, virtio 1.2, 2.7.8) fails instead of completing
    /// with a truncated length. The buffers overlap, so the guest needs only
    /// 64 KiB; the image is a sparse tmpfs file (reading its holes costs no
    /// memory).
    #[test]
    fn reads_beyond_the_used_length_range_fail() {
        let (mem, _, _dir) = setup();
        let prefix = std::path::Path::new("/dev/shm").join("mic-blk-req-big-");
        let shm = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap();
        let p = shm.as_path().join("img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len((4 << 30) + (1 << 20)).unwrap();
        let disk = Disk::open(&p, false, false).unwrap();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let seg = 64 << 10;
        let count = (u32::MAX as u64 / seg as u64) + 2;
        let mut descs = vec![Descriptor::new(0x1000, 16, N, 0)];
        descs.extend((0..count).map(|_| Descriptor::new(0x10000, seg, W | N, 0)));
        descs.push(Descriptor::new(0x3000, 1, W, 0));
        let used = run(&mem, &disk, descs);
        assert_eq!(status(&mem, 0x3000), VIRTIO_BLK_S_IOERR);
        assert_eq!(used, 1, "only the status byte");
    }

    #[test]
    fn write_then_read_split_header() {
        let (mem, disk, dir) = setup();
        // Header split over two descriptors, data over two.
        hdr(&mem, 0x1000, VIRTIO_BLK_T_OUT, 2);
        mem.write_slice(&[7u8; 1024], GuestAddress(0x2000)).unwrap();
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 10, N, 0),
                Descriptor::new(0x100a, 6, N, 0),
                Descriptor::new(0x2000, 100, N, 0),
                Descriptor::new(0x2064, 924, N, 0),
                Descriptor::new(0x3000, 1, W, 0),
            ],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&mem, 0x3000), VIRTIO_BLK_S_OK);
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 2);
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 16, N, 0),
                Descriptor::new(0x4000, 1024, W | N, 0),
                Descriptor::new(0x5000, 513, W, 0),
            ],
        );
        assert_eq!(used, 1024 + 512 + 1);
        assert_eq!(status(&mem, 0x5200), VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        let mut tail = vec![0u8; 512];
        mem.read_slice(&mut tail, GuestAddress(0x5000)).unwrap();
        assert!(tail.iter().all(|&b| b == 0xee));
        drop(dir);
    }

    #[test]
    fn malformed_requests() {
        let (mem, disk, dir) = setup();
        hdr(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        // Readable after writable.
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 16, N, 0),
                Descriptor::new(0x3000, 1, W | N, 0),
                Descriptor::new(0x2000, 512, N, 0),
                Descriptor::new(0x3001, 1, W, 0),
            ],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&mem, 0x3001), VIRTIO_BLK_S_IOERR);
        // Data outside guest memory.
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 16, N, 0),
                Descriptor::new((1 << 20) - 256, 512, N, 0),
                Descriptor::new(0x3000, 1, W, 0),
            ],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&mem, 0x3000), VIRTIO_BLK_S_IOERR);
        // Beyond the end of the image.
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, 63);
        mem.write_obj(0xffu8, GuestAddress(0x3000)).unwrap();
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 16, N, 0),
                Descriptor::new(0x2000, 1024, W | N, 0),
                Descriptor::new(0x3000, 1, W, 0),
            ],
        );
        assert_eq!((used, status(&mem, 0x3000)), (1, VIRTIO_BLK_S_IOERR));
        // Sector overflow.
        hdr(&mem, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 16, N, 0),
                Descriptor::new(0x2000, 512, W | N, 0),
                Descriptor::new(0x3000, 1, W, 0),
            ],
        );
        assert_eq!((used, status(&mem, 0x3000)), (1, VIRTIO_BLK_S_IOERR));
        // Unknown type.
        hdr(&mem, 0x1000, 99, 0);
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 16, N, 0),
                Descriptor::new(0x3000, 1, W, 0),
            ],
        );
        assert_eq!((used, status(&mem, 0x3000)), (1, VIRTIO_BLK_S_UNSUPP));
        // No writable byte at all: nothing to report.
        assert_eq!(run(&mem, &disk, vec![Descriptor::new(0x1000, 16, 0, 0)]), 0);
        // Status outside memory.
        assert_eq!(
            run(
                &mem,
                &disk,
                vec![
                    Descriptor::new(0x1000, 16, N, 0),
                    Descriptor::new(2 << 20, 1, W, 0)
                ]
            ),
            0
        );
        // Truncated chain (last descriptor claims a successor).
        let used = run(
            &mem,
            &disk,
            vec![
                Descriptor::new(0x1000, 16, N, 0),
                Descriptor::new(0x3000, 1, W | N, 5),
            ],
        );
        assert_eq!((used, status(&mem, 0x3000)), (1, VIRTIO_BLK_S_IOERR));
        // Image untouched.
        let mut f = vec![0u8; 64 * 512];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(dir.as_path().join("img")).unwrap(),
            &mut f,
            0,
        )
        .unwrap();
        assert!(f.iter().all(|&b| b == 0xee));
        drop(dir);
    }
}
