//! A card's overlay: the user's own files added to the card image's
//! initramfs without rebuilding it (`docs/micd.md`, "Overlays";
//! `guest-images/README.md`, "Overlays").
//!
//! The kernel unpacks every cpio archive it finds one after the other in
//! the initramfs, later files replacing earlier ones
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`: an
//! archive starts at a 4-byte boundary, zero bytes between archives are
//! skipped). So the card boots `base + zero padding + overlay`, written to
//! the card's directory at each boot. The overlay is either a cpio archive
//! the user made (taken as it is) or a directory, packed here as an
//! uncompressed "newc" archive like the image's own.
//!
//! No crate in `Cargo.lock` writes cpio, and "newc" is a 110-byte ASCII
//! header per file, so the writer is here.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Archives in the initramfs start at a multiple of this (the kernel's
/// unpacker reads a new header only at 4-byte offsets; 512 is what cpio
/// tools pad to).
const ARCHIVE_ALIGN: u64 = 512;

/// File type bits of `st_mode` (`<sys/stat.h>`).
const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Building a card's initramfs with an overlay failed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The overlay (or a file in it) could not be read.
    #[error("cannot read the overlay {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The overlay directory holds something a cpio archive for the card
    /// cannot carry (a device node, socket or FIFO).
    #[error("{path}: not a file, directory or symbolic link")]
    Unsupported {
        /// The entry.
        path: PathBuf,
    },
    /// The combined initramfs could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// One entry of a newc archive.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    mtime: u64,
    data: &'a [u8],
}

/// Writes newc ("070701") archives: headers, names and data each padded to
/// 4 bytes, ending with the `TRAILER!!!` entry.
pub struct NewcWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> NewcWriter<W> {
    /// A writer onto `out`.
    pub fn new(out: W) -> Self {
        NewcWriter {
            out,
            ino: 0,
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..n as usize])
    }

    fn entry(&mut self, e: &Entry) -> io::Result<()> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "entry over 4 GiB");
        let size = u32::try_from(e.data.len()).map_err(|_| too_big())?;
        let namesize = u32::try_from(e.name.len() + 1).map_err(|_| too_big())?;
        self.ino += 1;
        // Owned by root: the card runs everything as root, and the host
        // user's ids mean nothing there. One link each: no hard links.
        let nlink = if e.mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let fields = [
            self.ino,
            e.mode,
            0,
            0,
            nlink,
            // newc's mtime is 32 bits; later times wrap, as in cpio(1).
            e.mtime as u32,
            size,
            0,
            0,
            0,
            0,
            namesize,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(e.name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(e.data)?;
        self.pad()
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32, mtime: u64) -> io::Result<()> {
        self.entry(&Entry {
            name,
            mode: S_IFDIR | (perm & 0o7777),
            mtime,
            data: &[],
        })
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, mtime: u64, data: &[u8]) -> io::Result<()> {
        self.entry(&Entry {
            name,
            mode: S_IFREG | (perm & 0o7777),
            mtime,
            data,
        })
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str, mtime: u64) -> io::Result<()> {
        self.entry(&Entry {
            name,
            mode: S_IFLNK | 0o777,
            mtime,
            data: target.as_bytes(),
        })
    }

    /// Writes the trailer; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(&Entry {
            name: "TRAILER!!!",
            mode: 0,
            mtime: 0,
            data: &[],
        })?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Packs the tree under `dir` (not `dir` itself, so the card's `/` keeps
/// its mode) as a newc archive onto `out`: names relative to `dir`,
/// sorted, each directory before what it holds.
pub fn pack_dir<W: Write>(dir: &Path, out: W) -> Result<W, OverlayError> {
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OverlayError::Read { path, source }
    };
    let mut w = NewcWriter::new(out);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut children: Vec<PathBuf> = fs::read_dir(&d)
            .map_err(read(&d))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(read(&d))?;
        // Reverse order onto the stack, so directories come out sorted.
        children.sort();
        let mut subdirs = Vec::new();
        for p in &children {
            let meta = fs::symlink_metadata(p).map_err(read(p))?;
            let name = p
                .strip_prefix(dir)
                .ok()
                .and_then(Path::to_str)
                .ok_or_else(|| OverlayError::Unsupported { path: p.clone() })?;
            let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
            let perm = meta.permissions().mode();
            let ft = meta.file_type();
            let r = if ft.is_dir() {
                subdirs.push(p.clone());
                w.dir(name, perm, mtime)
            } else if ft.is_file() {
                let data = fs::read(p).map_err(read(p))?;
                w.file(name, perm, mtime, &data)
            } else if ft.is_symlink() {
                let target = fs::read_link(p).map_err(read(p))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| OverlayError::Unsupported { path: p.clone() })?;
                w.symlink(name, target, mtime)
            } else {
                return Err(OverlayError::Unsupported { path: p.clone() });
            };
            r.map_err(read(p))?;
        }
        stack.extend(subdirs.into_iter().rev());
    }
    w.finish().map_err(read(dir))
}

/// Writes `out`: the image's initramfs `base`, zeros up to the next
/// [`ARCHIVE_ALIGN`] boundary, then `overlay` (a directory, packed with
/// [`pack_dir`], or an archive, copied as it is).
pub fn assemble(base: &Path, overlay: &Path, out: &Path) -> Result<(), OverlayError> {
    let write = |source| OverlayError::Write {
        path: out.to_path_buf(),
        source,
    };
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OverlayError::Read { path, source }
    };
    // A new file each boot (not truncated in place: a QEMU of the card's
    // previous boot may still be reading the old one).
    let tmp = out.with_extension("tmp");
    let mut w = BufWriter::new(File::create(&tmp).map_err(write)?);
    let mut b = File::open(base).map_err(read(base))?;
    let n = io::copy(&mut b, &mut w).map_err(read(base))?;
    let pad = (ARCHIVE_ALIGN - n % ARCHIVE_ALIGN) % ARCHIVE_ALIGN;
    w.write_all(&vec![0; pad as usize]).map_err(write)?;
    let meta = fs::metadata(overlay).map_err(read(overlay))?;
    let mut w = if meta.is_dir() {
        pack_dir(overlay, w)?
    } else {
        let mut f = File::open(overlay).map_err(read(overlay))?;
        io::copy(&mut f, &mut w).map_err(read(overlay))?;
        w
    };
    w.flush().map_err(write)?;
    drop(w);
    fs::rename(&tmp, out).map_err(write)
}

/// The entries of a newc archive as `(name, mode, data)`, for tests.
#[cfg(test)]
fn parse_newc(mut bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    let align = |n: usize| (4 - n % 4) % 4;
    loop {
        assert_eq!(&bytes[..6], b"070701", "magic at {offset}");
        let field = |i: usize| {
            let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap() as usize
        };
        let (mode, size, namesize) = (field(1), field(6), field(11));
        let name = std::str::from_utf8(&bytes[110..110 + namesize - 1])
            .unwrap()
            .to_string();
        let data_at = 110 + namesize + align(110 + namesize);
        let data = bytes[data_at..data_at + size].to_vec();
        let next = data_at + size + align(size);
        bytes = &bytes[next..];
        offset += next;
        if name == "TRAILER!!!" {
            assert!(bytes.is_empty(), "data after the trailer");
            return out;
        }
        out.push((name, mode as u32, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use vmm_sys_util::tempdir::TempDir;

    fn tree() -> TempDir {
        let t = TempDir::new_with_prefix("/tmp/overlay-test").unwrap();
        let d = t.as_path();
        fs::create_dir_all(d.join("etc/mic/rc.d")).unwrap();
        fs::create_dir_all(d.join("opt/ci")).unwrap();
        fs::write(d.join("etc/mic/rc.d/10-hello"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(
            d.join("etc/mic/rc.d/10-hello"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::write(d.join("opt/ci/data.bin"), [0u8, 1, 2, 3, 4]).unwrap();
        fs::set_permissions(d.join("opt/ci/data.bin"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("data.bin", d.join("opt/ci/link")).unwrap();
        t
    }

    #[test]
    fn packs_a_tree_in_order_with_modes_and_data() {
        let t = tree();
        let bytes = pack_dir(t.as_path(), Vec::new()).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse_newc(&bytes);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "opt",
                "etc/mic",
                "etc/mic/rc.d",
                "etc/mic/rc.d/10-hello",
                "opt/ci",
                "opt/ci/data.bin",
                "opt/ci/link",
            ]
        );
        let by = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(by("etc/mic/rc.d/10-hello").1, S_IFREG | 0o755);
        assert_eq!(by("etc/mic/rc.d/10-hello").2, b"#!/bin/sh\necho hi\n");
        assert_eq!(by("opt/ci/data.bin").1, S_IFREG | 0o600);
        assert_eq!(by("opt/ci/data.bin").2, [0, 1, 2, 3, 4]);
        assert_eq!(by("opt/ci/link").1, S_IFLNK | 0o777);
        assert_eq!(by("opt/ci/link").2, b"data.bin");
        assert_eq!(by("etc").1 & S_IFMT, S_IFDIR);
    }

    #[test]
    fn headers_are_root_owned_newc() {
        let mut w = NewcWriter::new(Vec::new());
        w.file("a", 0o644, 7, b"xyz").unwrap();
        let bytes = w.finish().unwrap();
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        // ino 1, regular 0644, uid 0, gid 0, 1 link, mtime 7, 3 bytes,
        // devices 0, name "a\0" (2), check 0.
        let fields = [
            "00000001", "000081A4", "00000000", "00000000", "00000001", "00000007", "00000003",
            "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
        ];
        assert_eq!(header, format!("070701{}", fields.concat()));
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..115], b"xyz");
    }

    #[test]
    fn assembles_base_padding_and_overlay() {
        let t = tree();
        let work = TempDir::new_with_prefix("/tmp/overlay-out").unwrap();
        let base = work.as_path().join("base.img");
        let mut w = NewcWriter::new(Vec::new());
        w.file("init", 0o755, 0, b"#!/bin/sh\n").unwrap();
        let base_bytes = w.finish().unwrap();
        fs::write(&base, &base_bytes).unwrap();
        let out = work.as_path().join("initrd.img");

        assemble(&base, t.as_path(), &out).unwrap();
        let all = fs::read(&out).unwrap();
        assert_eq!(&all[..base_bytes.len()], base_bytes.as_slice());
        let at = base_bytes.len().next_multiple_of(ARCHIVE_ALIGN as usize);
        assert!(all[base_bytes.len()..at].iter().all(|b| *b == 0));
        assert_eq!(
            &all[at..],
            pack_dir(t.as_path(), Vec::new()).unwrap().as_slice()
        );

        // An archive is appended as it is.
        let cpio = work.as_path().join("user.cpio");
        fs::write(&cpio, b"0707-not-checked").unwrap();
        assemble(&base, &cpio, &out).unwrap();
        let all = fs::read(&out).unwrap();
        assert_eq!(&all[at..], b"0707-not-checked");
    }

    #[test]
    fn a_missing_overlay_is_an_error_naming_it() {
        let work = TempDir::new_with_prefix("/tmp/overlay-out").unwrap();
        let base = work.as_path().join("base.img");
        fs::write(&base, b"x").unwrap();
        let e = assemble(
            &base,
            Path::new("/nonexistent/overlay"),
            &work.as_path().join("o"),
        )
        .unwrap_err();
        assert!(
            matches!(&e, OverlayError::Read { path, .. } if path == Path::new("/nonexistent/overlay"))
        );
    }
}
