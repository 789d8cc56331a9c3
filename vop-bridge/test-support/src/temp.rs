//! Temporary directories for tests: one type for every test of the
//! project.

use std::path::{Path, PathBuf};

/// A private scratch directory, `$TMPDIR/mic-<tag>-<pid>-XXXXXX` (made by
/// `mkdtemp` through vmm-sys-util, mode 0700), removed on drop unless
/// `MIC_KEEP_TEST_DIRS` is set (to look at what a failed test left).
pub struct TempDir(Option<vmm_sys_util::tempdir::TempDir>, PathBuf);

impl TempDir {
    /// Creates a fresh directory named after `tag`; panics (failing the
    /// test) if it cannot.
    pub fn new(tag: &str) -> TempDir {
        let prefix = std::env::temp_dir().join(format!("mic-{tag}-{}-", std::process::id()));
        let d = vmm_sys_util::tempdir::TempDir::new_with_prefix(&prefix)
            .unwrap_or_else(|e| panic!("creating {}*: {e}", prefix.display()));
        let path = d.as_path().to_path_buf();
        TempDir(Some(d), path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.1
    }

    /// A path in the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.1.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("MIC_KEEP_TEST_DIRS").is_some() {
            // Leak the directory on purpose: vmm-sys-util's TempDir removes
            // it on drop.
            std::mem::forget(self.0.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_unique_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let a = TempDir::new("temp-test");
        let b = TempDir::new("temp-test");
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(a.join("f"), b"x").unwrap();
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
    }
}
