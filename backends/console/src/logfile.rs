//! The console log file (`--log`), bounded by `--log-max-size`.
//!
//! Everything the card writes is appended. With a maximum size, a file
//! that reaches it is renamed to `FILE.1` (replacing an older one) and a new
//! `FILE` is started, so the log never takes more than twice the maximum on
//! disk and always holds the latest output. Output is split across the
//! rotation so that neither file exceeds the maximum.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use log::debug;

/// Smallest accepted maximum size (smaller values would rotate on almost
/// every write).
pub const MIN_MAX_SIZE: u64 = 4096;

/// An append-only log file, optionally rotated at a maximum size.
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Rotation size; `None`: unbounded.
    max: Option<u64>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    /// Opens (creates) `path` for appending; `max` is the rotation size.
    pub fn open(path: &Path, max: Option<u64>) -> io::Result<LogFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            size,
            max,
        })
    }

    /// The previous file's name: `FILE.1`.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Moves the current file to `FILE.1` and starts a new one. If that
    /// fails, the current file is emptied instead: the bound holds.
    fn rotate(&mut self) -> io::Result<()> {
        let renamed = std::fs::rename(&self.path, Self::rotated_path(&self.path));
        match renamed.and_then(|()| open_append(&self.path)) {
            Ok(f) => self.file = f,
            Err(e) => {
                debug!("console log rotation: {e}; truncating instead");
                self.file.set_len(0)?;
            }
        }
        self.size = 0;
        Ok(())
    }

    /// Appends `data`, rotating as needed.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        let Some(max) = self.max else {
            return self.file.write_all(data);
        };
        while !data.is_empty() {
            if self.size >= max {
                self.rotate()?;
            }
            let room = usize::try_from(max - self.size).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(data.len().min(room));
            self.file.write_all(now)?;
            self.size += now.len() as u64;
            data = rest;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> vmm_sys_util::tempdir::TempDir {
        let prefix = std::env::temp_dir().join("mic-console-log-");
        vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap()
    }

    #[test]
    fn unbounded_appends_everything() {
        let d = dir();
        let p = d.as_path().join("log");
        std::fs::write(&p, b"old:").unwrap();
        let mut l = LogFile::open(&p, None).unwrap();
        l.write(&[7u8; 10000]).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 10004);
        assert!(!LogFile::rotated_path(&p).exists());
    }

    #[test]
    fn rotation_keeps_the_latest_output_in_two_files() {
        let d = dir();
        let p = d.as_path().join("log");
        let old = LogFile::rotated_path(&p);
        assert_eq!(old, d.as_path().join("log.1"));
        // An existing file already over the maximum is rotated first.
        std::fs::write(&p, [1u8; 150]).unwrap();
        let mut l = LogFile::open(&p, Some(100)).unwrap();
        let data: Vec<u8> = (0..=255u8).collect();
        l.write(&data[..30]).unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), [1u8; 150]);
        assert_eq!(std::fs::read(&p).unwrap(), &data[..30]);
        // A write across the limit is split over the rotation; one longer
        // than two files keeps its last part.
        l.write(&data[30..]).unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), &data[100..200]);
        assert_eq!(std::fs::read(&p).unwrap(), &data[200..]);
    }
}
