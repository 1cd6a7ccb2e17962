//! Boots the virtio-iommu test firmware in `qemu-system-aarch64 -M virt` and reads its results.
//!
//! Used as the cargo runner for `aarch64-unknown-none` (the `virtio-iommu-runner` binary) and by
//! the host tests in `tests/boot.rs`.
//!
//! Environment (read by [`RunConfig::from_env`]):
//!
//! | variable | meaning |
//! |---|---|
//! | `VIOMMU_QEMU` | path of a `qemu-system-aarch64`, or `7.2` for Debian bookworm's QEMU 7.2 fetched into `target/qemu-7.2`, or `11.1` for Debian trixie-backports' QEMU 11.1 fetched into `target/qemu-11.1` ([`QemuChoice`]); default: `qemu-system-aarch64` from `PATH` (installed from bookworm-backports when missing and running as root) |
//! | `VIOMMU_DISK` | raw disk image for virtio-blk (multiple of 512 bytes, ≥ 1 MiB); default: `target/viommu-disk.img`, 8 MiB of random bytes, generated once |
//! | `VIOMMU_QEMU_ARGS` | extra QEMU arguments, split on whitespace, appended last (a later `-M virt,...` is merged into the first by QEMU) |
//! | `VIOMMU_IOMMU_ADDR`, `VIOMMU_BLK_ADDR`, `VIOMMU_EDU_ADDR` | PCI `addr=` (slot\[.function\]) of the virtio-iommu, virtio-blk and edu devices |
//! | `VIOMMU_TIMEOUT_SECS` | wall-clock limit for one QEMU run (default 300); QEMU is killed after it |
//! | `VIOMMU_FIRMWARE_ELF` | (tests, [`firmware_elf`]) use this prebuilt firmware instead of building it |

use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

mod qemu_111;
mod toolchain;
pub use qemu_111::{fetch_debian_qemu_111, QEMU_111_DEB_VERSION};
pub use toolchain::ensure_target;

/// Debian package version of the QEMU 7.2 build used with [`QemuChoice::Debian72`].
pub const QEMU_72_DEB_VERSION: &str = "1:7.2+dfsg-7+deb12u18+b3";
/// Size of the generated default disk image.
pub const DEFAULT_DISK_SIZE: u64 = 8 << 20;
/// Default wall-clock limit for one QEMU run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The Rust target the firmware is built for.
pub const FIRMWARE_TARGET: &str = "aarch64-unknown-none";
/// The firmware package.
pub const FIRMWARE_PACKAGE: &str = "virtio-iommu-firmware";

/// Errors of the runner.
#[derive(Debug)]
pub enum Error {
    /// An I/O operation failed.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A helper command (cargo, apt-get, dpkg) failed.
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its captured stderr (possibly empty).
        stderr: String,
    },
    /// No usable QEMU; the message says how to get one.
    QemuUnavailable(String),
    /// The firmware's Rust target is missing and cannot be installed; the message says how to
    /// get it.
    TargetUnavailable(String),
    /// The disk image is unusable.
    InvalidDisk {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An environment variable has an unusable value.
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// QEMU ran longer than the timeout and was killed.
    Timeout {
        /// The timeout in seconds.
        seconds: u64,
        /// Console output up to the kill.
        output: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { context, source } => write!(f, "{context}: {source}"),
            Self::CommandFailed {
                command,
                status,
                stderr,
            } => {
                write!(f, "`{command}` failed ({status})")?;
                if !stderr.trim().is_empty() {
                    write!(f, ":\n{}", stderr.trim_end())?;
                }
                Ok(())
            }
            Self::QemuUnavailable(message) | Self::TargetUnavailable(message) => {
                f.write_str(message)
            }
            Self::InvalidDisk { path, reason } => {
                write!(f, "disk image {}: {reason}", path.display())
            }
            Self::InvalidEnv { name, reason } => write!(f, "${name}: {reason}"),
            Self::Timeout { seconds, .. } => write!(
                f,
                "QEMU did not finish within {seconds} s (VIOMMU_TIMEOUT_SECS) and was killed"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result type of the runner.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an I/O error with context.
pub(crate) fn io_context<T>(result: io::Result<T>, context: impl FnOnce() -> String) -> Result<T> {
    result.map_err(|source| Error::Io {
        context: context(),
        source,
    })
}

/// Which QEMU binary to run.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub enum QemuChoice {
    /// `qemu-system-aarch64` from `PATH`; when missing and running as root, installed from
    /// bookworm-backports (QEMU 10.0 on this project's machines).
    #[default]
    System,
    /// This binary.
    Binary(PathBuf),
    /// Debian bookworm's QEMU 7.2 ([`QEMU_72_DEB_VERSION`]), downloaded with
    /// `apt-get download` and unpacked with `dpkg -x` into `target/qemu-7.2` (no root needed).
    Debian72,
    /// Debian trixie-backports' QEMU 11.1 ([`QEMU_111_DEB_VERSION`]) with its library closure,
    /// unpacked into `target/qemu-11.1` and run through trixie's dynamic loader
    /// ([`fetch_debian_qemu_111`]; no change to the system's apt or dpkg state).
    Debian111,
}

impl QemuChoice {
    /// From `VIOMMU_QEMU`: unset or empty ⇒ [`System`](Self::System), `7.2` ⇒
    /// [`Debian72`](Self::Debian72), `11.1` ⇒ [`Debian111`](Self::Debian111), anything else is
    /// a binary path.
    pub fn from_env() -> Self {
        match std::env::var_os("VIOMMU_QEMU") {
            None => Self::System,
            Some(v) if v.is_empty() => Self::System,
            Some(v) if v == "7.2" => Self::Debian72,
            Some(v) if v == "11.1" => Self::Debian111,
            Some(v) => Self::Binary(PathBuf::from(v)),
        }
    }
}

/// How to run the firmware.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RunConfig {
    /// QEMU to use.
    pub qemu: QemuChoice,
    /// Disk image; `None` ⇒ the generated `target/viommu-disk.img`.
    pub disk: Option<PathBuf>,
    /// Extra QEMU arguments, appended after the runner's own.
    pub extra_args: Vec<String>,
    /// PCI `addr=` of the virtio-iommu (e.g. `0x5`), `None` ⇒ QEMU's choice.
    pub iommu_addr: Option<String>,
    /// PCI `addr=` of the virtio-blk device.
    pub blk_addr: Option<String>,
    /// PCI `addr=` of the edu device.
    pub edu_addr: Option<String>,
    /// Wall-clock limit for the QEMU run.
    pub timeout: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            qemu: QemuChoice::System,
            disk: None,
            extra_args: Vec::new(),
            iommu_addr: None,
            blk_addr: None,
            edu_addr: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A non-empty environment variable.
fn env_string(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl RunConfig {
    /// The configuration described by the `VIOMMU_*` environment variables (see the crate
    /// documentation).
    pub fn from_env() -> Result<Self> {
        let timeout = match env_string("VIOMMU_TIMEOUT_SECS") {
            None => DEFAULT_TIMEOUT,
            Some(v) => Duration::from_secs(v.trim().parse().map_err(|_| Error::InvalidEnv {
                name: "VIOMMU_TIMEOUT_SECS",
                reason: format!("`{v}` is not a whole number of seconds"),
            })?),
        };
        Ok(Self {
            qemu: QemuChoice::from_env(),
            disk: std::env::var_os("VIOMMU_DISK")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            extra_args: env_string("VIOMMU_QEMU_ARGS")
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            iommu_addr: env_string("VIOMMU_IOMMU_ADDR"),
            blk_addr: env_string("VIOMMU_BLK_ADDR"),
            edu_addr: env_string("VIOMMU_EDU_ADDR"),
            timeout,
        })
    }
}

/// What a QEMU run produced.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// QEMU's exit status (the firmware's exit code via semihosting); 128 + signal if killed.
    pub exit_code: i32,
    /// Everything QEMU wrote to stdout (the firmware's console).
    pub output: String,
    /// Everything QEMU wrote to stderr (QEMU's own warnings, semihosting error output).
    pub stderr: String,
    /// Host SHA-256 (lowercase hex) of the disk image given to virtio-blk.
    pub disk_sha256: String,
    /// The disk image.
    pub disk: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// QEMU's arguments.
    pub args: Vec<String>,
    /// Wall time from spawning QEMU to its exit.
    pub duration: Duration,
}

/// The workspace root (parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `<workspace>/target`.
fn target_dir() -> PathBuf {
    workspace_root().join("target")
}

/// The `cargo` to use for nested builds: `$CARGO` (set by cargo for what it runs), else `cargo`.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Runs a command, capturing its output; fails on a non-zero status.
pub(crate) fn run_captured(command: &mut Command) -> Result<std::process::Output> {
    let display = format!("{command:?}");
    let output = io_context(command.output(), || format!("cannot run `{display}`"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::CommandFailed {
            command: display,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Where the firmware build's own output (cargo's progress and diagnostics) goes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum BuildOutput {
    /// Captured; shown only in the error when the build fails (tests).
    Captured,
    /// Inherited: cargo writes to our stderr as it goes (`cargo qemu`).
    Inherited,
}

/// Builds the firmware (`cargo build -p virtio-iommu-firmware --target aarch64-unknown-none
/// --release`) with `CARGO_TARGET_DIR=<workspace>/target/firmware` (so that it never waits for
/// the lock of an outer cargo) and returns the ELF's path. Cargo's output is captured.
///
/// Installs the `aarch64-unknown-none` target first if the toolchain lacks it
/// ([`ensure_target`]).
///
/// # Errors
///
/// Those of [`ensure_target`]; [`Error::CommandFailed`] with cargo's stderr when the build
/// fails; [`Error::Io`] when cargo cannot run or produced no ELF.
pub fn build_firmware() -> Result<PathBuf> {
    build_firmware_with(BuildOutput::Captured)
}

/// [`build_firmware`] with cargo's output going where `output` says.
///
/// # Errors
///
/// As [`build_firmware`].
pub fn build_firmware_with(output: BuildOutput) -> Result<PathBuf> {
    ensure_target(FIRMWARE_TARGET)?;
    let root = workspace_root();
    let target_dir = root.join("target").join("firmware");
    let mut command = Command::new(cargo());
    command
        .current_dir(&root)
        .args([
            "build",
            "-p",
            FIRMWARE_PACKAGE,
            "--target",
            FIRMWARE_TARGET,
            "--release",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .stdin(Stdio::null());
    match output {
        BuildOutput::Captured => {
            run_captured(&mut command)?;
        }
        BuildOutput::Inherited => {
            let display = format!("{command:?}");
            let status = io_context(command.status(), || format!("cannot run `{display}`"))?;
            if !status.success() {
                return Err(Error::CommandFailed {
                    command: display,
                    status: status.to_string(),
                    stderr: String::new(),
                });
            }
        }
    }
    let elf = target_dir
        .join(FIRMWARE_TARGET)
        .join("release")
        .join(FIRMWARE_PACKAGE);
    if elf.is_file() {
        Ok(elf)
    } else {
        Err(Error::Io {
            context: format!("firmware build produced no {}", elf.display()),
            source: io::ErrorKind::NotFound.into(),
        })
    }
}

/// The firmware ELF for tests: `$VIOMMU_FIRMWARE_ELF` if set (a prebuilt image, e.g. from CI),
/// else [`build_firmware`].
pub fn firmware_elf() -> Result<PathBuf> {
    match std::env::var_os("VIOMMU_FIRMWARE_ELF").filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::InvalidEnv {
                    name: "VIOMMU_FIRMWARE_ELF",
                    reason: format!("{} is not a file", path.display()),
                })
            }
        }
        None => build_firmware(),
    }
}

/// `name` looked up in `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
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
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";

/// The deb822 stanza for bookworm-backports.
fn backports_stanza() -> String {
    format!(
        "Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        debian_archive_uri()
    )
}

/// Whether this process runs as root.
fn is_root() -> bool {
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
fn install_system_qemu() -> Result<()> {
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
fn check_disk(path: &Path) -> Result<u64> {
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
fn create_random_disk(path: &Path) -> Result<()> {
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

/// Escapes a value for a QEMU `-drive`/`-device` option list (`,` ⇒ `,,`).
fn qemu_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// `device` with `,addr=<addr>` if `addr` is given.
fn with_addr(device: &str, addr: Option<&String>) -> String {
    match addr {
        Some(addr) => format!("{device},addr={}", qemu_option_value(addr)),
        None => device.to_string(),
    }
}

/// QEMU's arguments for booting `elf` with `disk`.
///
/// The drive is opened with `snapshot=on`: the firmware's writes go to a temporary overlay, so
/// the image (shared by runs in parallel) stays exactly what the host hashed.
pub fn qemu_args(config: &RunConfig, elf: &Path, disk: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "virt",
        "-cpu",
        "cortex-a57",
        "-m",
        "512M",
        "-nographic",
        "-semihosting",
        "-nic",
        "none",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(elf.to_string_lossy().into_owned());
    args.push("-device".into());
    args.push(with_addr("virtio-iommu-pci", config.iommu_addr.as_ref()));
    args.push("-drive".into());
    args.push(format!(
        "if=none,id=disk0,format=raw,snapshot=on,file={}",
        qemu_option_value(&disk.to_string_lossy())
    ));
    args.push("-device".into());
    args.push(with_addr(
        "virtio-blk-pci,drive=disk0,iommu_platform=on,disable-legacy=on",
        config.blk_addr.as_ref(),
    ));
    args.push("-device".into());
    args.push(with_addr(
        "edu,dma_mask=0xffffffffffffffff",
        config.edu_addr.as_ref(),
    ));
    args.extend(config.extra_args.iter().cloned());
    args
}

/// A command line for display (arguments with spaces quoted).
fn display_command(program: &Path, args: &[String]) -> String {
    std::iter::once(program.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| {
            if a.contains(char::is_whitespace) || a.is_empty() {
                format!("'{a}'")
            } else {
                a.clone()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Copies a pipe line by line to our stdout or stderr (through `print!`/`eprint!`, so test
/// harnesses capture it) and returns everything read.
fn pump(pipe: impl Read + Send + 'static, to_stderr: bool) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut all = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    if to_stderr {
                        eprint!("{text}");
                    } else {
                        print!("{text}");
                        let _ = io::stdout().flush();
                    }
                    all.extend_from_slice(&line);
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// Exit code of a finished process (128 + signal number when killed by a signal).
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Boots `elf` in QEMU as `config` says, streaming the console to stdout while keeping it.
///
/// Prints `runner: disk <path> <size> bytes sha256 <hex>` and the QEMU command line first.
/// Returns the outcome whatever the exit status; [`Error::Timeout`] if QEMU had to be killed.
pub fn run(config: &RunConfig, elf: &Path) -> Result<RunOutcome> {
    if !elf.is_file() {
        return Err(Error::Io {
            context: format!("firmware ELF {}", elf.display()),
            source: io::ErrorKind::NotFound.into(),
        });
    }
    let qemu = resolve_qemu(&config.qemu)?;
    let disk = prepare_disk(config.disk.as_deref())?;
    println!(
        "runner: disk {} {} bytes sha256 {}",
        disk.path.display(),
        disk.size,
        disk.sha256
    );
    let args = qemu_args(config, elf, &disk.path);
    println!("runner: {}", display_command(&qemu, &args));
    let started = Instant::now();
    let mut child = io_context(
        Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn(),
        || format!("cannot start {}", qemu.display()),
    )?;
    let stdout = child.stdout.take().map(|pipe| pump(pipe, false));
    let stderr = child.stderr.take().map(|pipe| pump(pipe, true));
    let deadline = started + config.timeout;
    let status = loop {
        match io_context(child.try_wait(), || "waiting for QEMU".into())? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let duration = started.elapsed();
    let output = stdout
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let stderr = stderr
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let Some(status) = status else {
        eprintln!(
            "runner: TIMEOUT: QEMU still running after {} s; killed it",
            config.timeout.as_secs()
        );
        return Err(Error::Timeout {
            seconds: config.timeout.as_secs(),
            output,
        });
    };
    Ok(RunOutcome {
        exit_code: exit_code(status),
        output,
        stderr,
        disk_sha256: disk.sha256,
        disk: disk.path,
        qemu,
        args,
        duration,
    })
}

/// One TAP test line: `ok 3 - name # directive` or `not ok 4 - name`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TapLine {
    /// `ok` (true) or `not ok` (false).
    pub ok: bool,
    /// The test number.
    pub number: u32,
    /// The description (without a leading `- ` and without the directive).
    pub name: String,
    /// The text after ` # `, if any (e.g. `SKIP reason`).
    pub directive: Option<String>,
}

/// Parses one line as a TAP test line.
fn parse_tap_line(line: &str) -> Option<TapLine> {
    let line = line.trim_end();
    let (ok, rest) = if let Some(rest) = line.strip_prefix("ok ") {
        (true, rest)
    } else {
        (false, line.strip_prefix("not ok ")?)
    };
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let number = rest[..digits].parse().ok()?;
    let rest = rest[digits..].trim_start();
    let rest = rest.strip_prefix("- ").unwrap_or(rest);
    let (name, directive) = match rest.split_once(" # ") {
        Some((name, directive)) => (name, Some(directive.trim().to_string())),
        None => match rest.strip_prefix("# ") {
            Some(directive) => ("", Some(directive.trim().to_string())),
            None => (rest, None),
        },
    };
    Some(TapLine {
        ok,
        number,
        name: name.trim().to_string(),
        directive,
    })
}

/// Every TAP test line (`ok N ...` / `not ok N ...`) in the output, in order.
pub fn parse_tap(output: &str) -> Vec<TapLine> {
    output.lines().filter_map(parse_tap_line).collect()
}

/// The TAP plan (`1..N`), if the output has one (the last one wins).
pub fn tap_plan(output: &str) -> Option<u32> {
    output
        .lines()
        .filter_map(|line| line.trim_end().strip_prefix("1.."))
        .filter_map(|n| n.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// The firmware's `firmware: N passed, M failed` line (the last one) as `(N, M)`.
pub fn summary(output: &str) -> Option<(u32, u32)> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.trim_end().strip_prefix("firmware: ")?;
            let (passed, failed) = rest.split_once(" passed, ")?;
            let failed = failed.strip_suffix(" failed")?;
            Some((passed.parse().ok()?, failed.parse().ok()?))
        })
        .next_back()
}

/// The SHA-256 the firmware reported for the disk (`disk-sha256: <64 hex>`, last one),
/// lowercase.
pub fn reported_disk_sha256(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|line| {
            let hex = line.trim().strip_prefix("disk-sha256:")?.trim();
            (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| hex.to_ascii_lowercase())
        })
        .next_back()
}

/// Everything wrong with a run, by the project's pass criteria: exit status 0; a summary line
/// with N > 0 passed and 0 failed; no `not ok`; every TAP number 1..=plan present (plan from
/// the `1..N` line, else passed + failed); and, if `check_disk_sha256`, the firmware's
/// `disk-sha256` equal to the host's. Empty when the run passed.
pub fn problems(outcome: &RunOutcome, check_disk_sha256: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if outcome.exit_code != 0 {
        problems.push(format!("exit status {} (expected 0)", outcome.exit_code));
    }
    let summary = summary(&outcome.output);
    match summary {
        None => problems.push("no `firmware: N passed, M failed` line".into()),
        Some((passed, failed)) => {
            if passed == 0 {
                problems.push("no case passed".into());
            }
            if failed != 0 {
                problems.push(format!("{failed} case(s) failed"));
            }
        }
    }
    let tap = parse_tap(&outcome.output);
    for line in tap.iter().filter(|l| !l.ok) {
        problems.push(format!("not ok {} - {}", line.number, line.name));
    }
    let expected = tap_plan(&outcome.output).or_else(|| summary.map(|(p, f)| p + f));
    match expected {
        None => problems.push("no TAP plan".into()),
        Some(n) => {
            let missing: Vec<u32> = (1..=n)
                .filter(|i| !tap.iter().any(|l| l.number == *i))
                .collect();
            if !missing.is_empty() {
                problems.push(format!("TAP numbers missing from 1..={n}: {missing:?}"));
            }
        }
    }
    if check_disk_sha256 {
        match reported_disk_sha256(&outcome.output) {
            None => problems.push("firmware reported no disk-sha256".into()),
            Some(reported) if reported != outcome.disk_sha256 => problems.push(format!(
                "disk-sha256 mismatch: firmware {reported}, host {}",
                outcome.disk_sha256
            )),
            Some(_) => {}
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "pci: 00:01.0 1af4:1057\r\n\
        ok 1 - first case\n\
        not ok 2 - second # reason here\n\
        ok 3 # SKIP not relevant\n\
        ok 4 plain name\n\
        okay 5 - not tap\n\
        disk-sha256: ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\n\
        1..4\n\
        firmware: 3 passed, 1 failed\n";

    #[test]
    fn tap_lines() {
        let tap = parse_tap(SAMPLE);
        assert_eq!(tap.len(), 4);
        assert_eq!(
            tap[0],
            TapLine {
                ok: true,
                number: 1,
                name: "first case".into(),
                directive: None
            }
        );
        assert_eq!(
            tap[1],
            TapLine {
                ok: false,
                number: 2,
                name: "second".into(),
                directive: Some("reason here".into())
            }
        );
        assert_eq!(tap[2].directive.as_deref(), Some("SKIP not relevant"));
        assert_eq!(tap[2].name, "");
        assert_eq!(tap[3].name, "plain name");
        assert_eq!(tap_plan(SAMPLE), Some(4));
    }

    #[test]
    fn summary_and_sha() {
        assert_eq!(summary(SAMPLE), Some((3, 1)));
        assert_eq!(summary("firmware: EL1\n"), None);
        assert_eq!(
            reported_disk_sha256(SAMPLE).as_deref(),
            Some("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789")
        );
        assert_eq!(reported_disk_sha256("disk-sha256: 1234\n"), None);
    }

    #[test]
    fn problems_found() {
        let outcome = RunOutcome {
            exit_code: 1,
            output: SAMPLE.into(),
            stderr: String::new(),
            disk_sha256: "00".repeat(32),
            disk: PathBuf::new(),
            qemu: PathBuf::new(),
            args: Vec::new(),
            duration: Duration::ZERO,
        };
        let p = problems(&outcome, true);
        assert_eq!(p.len(), 4, "{p:#?}");
    }

    #[test]
    fn command_line() {
        let config = RunConfig {
            iommu_addr: Some("0x5".into()),
            extra_args: vec!["-M".into(), "virt,highmem=off".into()],
            ..RunConfig::default()
        };
        let args = qemu_args(&config, Path::new("/fw.elf"), Path::new("/tmp/a,b.img"));
        let joined = args.join(" ");
        assert!(joined.starts_with(
            "-M virt -cpu cortex-a57 -m 512M -nographic -semihosting -nic none -kernel /fw.elf"
        ));
        assert!(joined.contains("-device virtio-iommu-pci,addr=0x5 "));
        assert!(joined.contains("file=/tmp/a,,b.img "));
        assert!(joined.contains(
            "-device virtio-blk-pci,drive=disk0,iommu_platform=on,disable-legacy=on -device edu,"
        ));
        assert!(joined.ends_with("-M virt,highmem=off"));
    }

    #[test]
    fn backports_source() {
        let stanza = backports_stanza();
        assert!(stanza.contains("Suites: bookworm-backports\n"));
        assert!(stanza.starts_with("Types: deb\nURIs: http"));
    }
}
