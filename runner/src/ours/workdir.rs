//! The run's temporary directory (sockets, devicetree, ACPI tables, the private disk copy),
//! removed with its contents when dropped, on every exit path.

#[allow(unused_imports)]
use crate::*;

/// A fresh directory under the system's temporary directory, removed with its contents on drop.
#[derive(Debug)]
pub struct WorkDir {
    /// The directory.
    path: PathBuf,
}

impl WorkDir {
    /// Creates `<tmp>/viommu-ours-<pid>-<n>` (the first `n` not taken).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when no directory can be created.
    pub fn new() -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        loop {
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("viommu-ours-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => continue,
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("cannot create {}", path.display()),
                        source: e,
                    })
                }
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dir_is_removed() {
        let dir = WorkDir::new().unwrap();
        let path = dir.path().to_path_buf();
        fs::write(path.join("blk.sock"), b"x").unwrap();
        let other = WorkDir::new().unwrap();
        assert_ne!(other.path(), path);
        drop(dir);
        assert!(!path.exists());
    }
}
