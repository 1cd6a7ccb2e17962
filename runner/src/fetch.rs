//! Finding, installing and fetching QEMU: `qemu-system-aarch64` on `PATH` (installed from
//! bookworm-backports when missing, as root), bookworm's QEMU 7.2 unpacked into
//! `target/qemu-7.2`, and (in [`crate::qemu_111`]) trixie-backports' QEMU 11.1.

#[allow(unused_imports)]
use crate::*;

/// `name` looked up in `PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Serialises QEMU downloads and installs within this process (tests run in parallel).
pub(crate) static QEMU_SETUP: Mutex<()> = Mutex::new(());

/// The QEMU binary for `choice`, fetching or installing it first if needed.
pub fn resolve_qemu(choice: &QemuChoice) -> Result<PathBuf> {
    match choice {
        QemuChoice::Binary(path) => {
            let found = if path.components().count() == 1 {
                find_in_path(&path.to_string_lossy())
                    .or_else(|| path.is_file().then(|| path.clone()))
            } else {
                path.is_file().then(|| path.clone())
            };
            found.ok_or_else(|| {
                Error::QemuUnavailable(format!("VIOMMU_QEMU={}: no such file", path.display()))
            })
        }
        QemuChoice::Debian72 => fetch_debian_qemu_72(&target_dir().join("qemu-7.2")),
        QemuChoice::Debian111 => fetch_debian_qemu_111(&target_dir().join("qemu-11.1")),
        QemuChoice::System => {
            if let Some(path) = find_in_path("qemu-system-aarch64") {
                return Ok(path);
            }
            let _guard = QEMU_SETUP.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(path) = find_in_path("qemu-system-aarch64") {
                return Ok(path);
            }
            install_system_qemu()?;
            find_in_path("qemu-system-aarch64").ok_or_else(|| {
                Error::QemuUnavailable(
                    "qemu-system-arm was installed but qemu-system-aarch64 is not in PATH".into(),
                )
            })
        }
    }
}

/// Downloads Debian's QEMU 7.2 package and unpacks it into `dir` (atomically: unpacked next to
/// it, then renamed). Returns `dir/usr/bin/qemu-system-aarch64`.
pub fn fetch_debian_qemu_72(dir: &Path) -> Result<PathBuf> {
    let binary = dir.join("usr/bin/qemu-system-aarch64");
    if binary.is_file() {
        return Ok(binary);
    }
    let _guard = QEMU_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if binary.is_file() {
        return Ok(binary);
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let staging = parent.join(format!(
        "{}.partial-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("qemu"),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staging);
    let download = staging.join("download");
    io_context(fs::create_dir_all(&download), || {
        format!("cannot create {}", download.display())
    })?;
    eprintln!(
        "runner: fetching QEMU 7.2 (qemu-system-arm={QEMU_72_DEB_VERSION}) into {}",
        dir.display()
    );
    let exact = format!("qemu-system-arm={QEMU_72_DEB_VERSION}");
    let fetched = run_captured(
        Command::new("apt-get")
            .current_dir(&download)
            .args(["download", &exact]),
    )
    .or_else(|e| {
        eprintln!("runner: {e}\nrunner: falling back to qemu-system-arm/bookworm");
        run_captured(
            Command::new("apt-get")
                .current_dir(&download)
                .args(["download", "qemu-system-arm/bookworm"]),
        )
    })
    .or_else(|e| {
        // A fresh machine has no package lists yet: update them (as root) and try once more.
        if !is_root() {
            return Err(e);
        }
        eprintln!("runner: {e}\nrunner: running apt-get update and retrying");
        run_captured(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=300", "update"]))?;
        run_captured(
            Command::new("apt-get")
                .current_dir(&download)
                .args(["download", &exact]),
        )
    });
    let result = fetched.and_then(|_| {
        let deb = io_context(fs::read_dir(&download), || {
            format!("cannot read {}", download.display())
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::QemuUnavailable("apt-get download produced no .deb".into()))?;
        let root = staging.join("root");
        run_captured(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        match fs::rename(&root, dir) {
            Ok(()) => Ok(()),
            // Another process finished first.
            Err(_) if binary.is_file() => Ok(()),
            Err(e) => Err(Error::Io {
                context: format!("cannot move QEMU 7.2 to {}", dir.display()),
                source: e,
            }),
        }
    });
    let _ = fs::remove_dir_all(&staging);
    result?;
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(Error::QemuUnavailable(format!(
            "{} missing after unpacking",
            binary.display()
        )))
    }
}

/// The Debian archive URI of `/etc/apt/sources.list.d/debian.sources` (so backports come from
/// the same host), else `http://deb.debian.org/debian`.
pub(crate) fn debian_archive_uri() -> String {
    fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|line| line.trim().strip_prefix("URIs:"))
                .flat_map(str::split_whitespace)
                .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
                .map(String::from)
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// Path of the apt source added for bookworm-backports.
pub(crate) const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";

/// The deb822 stanza for bookworm-backports.
pub(crate) fn backports_stanza() -> String {
    format!(
        "Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        debian_archive_uri()
    )
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Installs qemu-system-arm from bookworm-backports (root only); otherwise explains how.
pub(crate) fn install_system_qemu() -> Result<()> {
    let install = [
        "apt-get",
        "-o",
        "DPkg::Lock::Timeout=300",
        "install",
        "-y",
        "-t",
        "bookworm-backports",
        "--no-install-recommends",
        "qemu-system-arm",
    ];
    if !is_root() {
        return Err(Error::QemuUnavailable(format!(
            "qemu-system-aarch64 is not in PATH. Install QEMU from bookworm-backports as root \
             (bookworm's 7.2 conflicts with the installed backports qemu-utils):\n\
             cat > {BACKPORTS_SOURCES} <<'EOF'\n{}EOF\n\
             apt-get update\n{}\n\
             or set VIOMMU_QEMU to a qemu-system-aarch64 binary (VIOMMU_QEMU=7.2 fetches Debian's 7.2 without root).",
            backports_stanza(),
            install.join(" ")
        )));
    }
    eprintln!(
        "runner: qemu-system-aarch64 not found; installing qemu-system-arm from bookworm-backports"
    );
    if !Path::new(BACKPORTS_SOURCES).exists() {
        io_context(fs::write(BACKPORTS_SOURCES, backports_stanza()), || {
            format!("cannot write {BACKPORTS_SOURCES}")
        })?;
    }
    run_captured(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=300", "update"]))?;
    run_captured(
        Command::new(install[0])
            .args(&install[1..])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}
