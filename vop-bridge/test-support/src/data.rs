//! Test data: random numbers, checksums, images and log tails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A non-cryptographic random number (seeding test data and names).
pub fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_ne_bytes(b)
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// sha256 of a file's first `len` bytes (all of it for `None`), via the
/// system's sha256sum.
pub fn sha256_file(path: &Path, len: Option<u64>) -> String {
    let script = match len {
        Some(l) => format!("head -c {l} '{}' | sha256sum", path.display()),
        None => format!("sha256sum < '{}'", path.display()),
    };
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// sha256 of `len` bytes at `offset` of a file.
pub fn sha256_range(path: &Path, offset: u64, len: u64) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    let tmp = std::env::temp_dir().join(format!("mic-range-{}", rand_u64()));
    std::fs::write(&tmp, &buf).unwrap();
    let s = sha256_file(&tmp, None);
    std::fs::remove_file(&tmp).unwrap();
    s
}

/// The first word of the last line of `out` that looks like a sha256 sum.
pub fn sum_in(out: &str) -> String {
    out.lines()
        .rev()
        .filter_map(|l| l.split_whitespace().next())
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no sha256 in {out:?}"))
        .to_string()
}

/// Creates a sparse image file of `size` bytes.
pub fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_of_files_and_ranges() {
        let d = crate::TempDir::new("data-test");
        let f = d.join("f");
        std::fs::write(&f, b"abc").unwrap();
        // sha256("abc"), FIPS 180-2 appendix B.1.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&f, None), abc);
        std::fs::write(&f, b"xxabcyy").unwrap();
        assert_eq!(sha256_range(&f, 2, 3), abc);
        assert_eq!(sum_in(&format!("noise\n{abc}  -\n")), abc);
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        let img = image(d.path(), "img", 4096);
        assert_eq!(std::fs::metadata(img).unwrap().len(), 4096);
    }
}
