//! The virtio-blk disk image: checking a given one, or generating `target/viommu-disk.img`
//! once, and hashing it (the firmware reports the SHA-256 it read).

#[allow(unused_imports)]
use crate::*;

/// A disk image ready for virtio-blk.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DiskImage {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// Checks that a disk image is usable: a multiple of 512 bytes and at least 1 MiB.
pub(crate) fn check_disk(path: &Path) -> Result<u64> {
    let metadata = io_context(fs::metadata(path), || {
        format!("disk image {}", path.display())
    })?;
    let size = metadata.len();
    let reason = if !metadata.is_file() {
        Some("not a regular file".to_string())
    } else if size % 512 != 0 {
        Some(format!("size {size} is not a multiple of 512 bytes"))
    } else if size < 1 << 20 {
        Some(format!("size {size} is below 1 MiB"))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidDisk {
            path: path.to_path_buf(),
            reason,
        }),
        None => Ok(size),
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = io_context(fs::File::open(path), || {
        format!("cannot open {}", path.display())
    })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = io_context(file.read(&mut buffer), || {
            format!("cannot read {}", path.display())
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Creates `path` with [`DEFAULT_DISK_SIZE`] random bytes unless it exists. The file appears
/// atomically (written aside, then hard-linked), so concurrent runs never see a partial image
/// and never replace one another's.
pub(crate) fn create_random_disk(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    io_context(fs::create_dir_all(parent), || {
        format!("cannot create {}", parent.display())
    })?;
    let staging = parent.join(format!(
        ".{}.{}.{:?}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("disk"),
        std::process::id(),
        thread::current().id()
    ));
    let mut random = vec![0u8; DEFAULT_DISK_SIZE as usize];
    io_context(
        fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)),
        || "cannot read /dev/urandom".into(),
    )?;
    io_context(fs::write(&staging, &random), || {
        format!("cannot write {}", staging.display())
    })?;
    let linked = fs::hard_link(&staging, path);
    let _ = fs::remove_file(&staging);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Io {
            context: format!("cannot create {}", path.display()),
            source: e,
        }),
    }
}

/// The disk image to use: `disk` (validated), or `target/viommu-disk.img` (generated once with
/// random content, then reused), with its size and SHA-256.
pub fn prepare_disk(disk: Option<&Path>) -> Result<DiskImage> {
    let path = match disk {
        Some(path) => path.to_path_buf(),
        None => {
            let path = target_dir().join("viommu-disk.img");
            create_random_disk(&path)?;
            path
        }
    };
    let size = check_disk(&path)?;
    let sha256 = sha256_file(&path)?;
    Ok(DiskImage { path, size, sha256 })
}
