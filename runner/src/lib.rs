//! Boots the virtio-iommu test firmware in `qemu-system-aarch64 -M virt` and reads its results.
//!
//! Used as the cargo runner for `aarch64-unknown-none` (the `virtio-iommu-runner` binary) and by
//! the host tests in `tests/boot.rs`.
//!
//! Modules (all re-exported here): `fetch` (finding, installing and fetching QEMU 10.0 and 7.2),
//! `qemu_111` (trixie-backports' QEMU 11.1 under a private apt state, `apt`), `linux` (the
//! Linux guest of `cargo qemu-linux`), `disk` (the virtio-blk
//! image), `boot` (QEMU's command line and the run), `tap` (reading the console: TAP, summary,
//! `disk-sha256`, pass criteria), `toolchain` (the firmware's Rust target), `devicetree` (an
//! editable devicetree: QEMU's dumped tree, parsed, edited, written back), `acpi` (MCFG, VIOT
//! and XSDT for `-fw_cfg`), `ours` (booting against our device). This file keeps the
//! errors, the run configuration and building the firmware.
//!
//! Environment (read by [`RunConfig::from_env`]):
//!
//! | variable | meaning |
//! |---|---|
//! | `VIOMMU_QEMU` | path of a `qemu-system-aarch64`, or `7.2` for Debian bookworm's QEMU 7.2 fetched into `target/qemu-7.2`, or `11.1` for Debian trixie-backports' QEMU 11.1 fetched into `target/qemu-11.1` ([`QemuChoice`]); default: `qemu-system-aarch64` from `PATH` (installed from bookworm-backports when missing and running as root) |
//! | `VIOMMU_DISK` | raw disk image for virtio-blk (multiple of 512 bytes, ≥ 1 MiB); default: `target/viommu-disk.img`, 8 MiB of random bytes, generated once |
//! | `VIOMMU_QEMU_ARGS` | extra QEMU arguments, split on whitespace, appended last (a later `-M virt,...` is merged into the first by QEMU) |
//! | `VIOMMU_IOMMU` | `pci` (default): QEMU's `virtio-iommu-pci`; `mmio`: its virtio-mmio `virtio-iommu-device` described in a `-dtb` tree ([`IommuKind`], needs QEMU 11.1: an unset `VIOMMU_QEMU` becomes `11.1`) |
//! | `VIOMMU_IOMMU_ADDR`, `VIOMMU_BLK_ADDR`, `VIOMMU_EDU_ADDR` | PCI `addr=` (slot\[.function\]) of the virtio-iommu, virtio-blk and edu devices |
//! | `VIOMMU_BLK_DEVICES` | virtio-blk devices on the disk, 1 (default) to 8, each with its own temporary overlay; the further ones after edu, in QEMU's choice of slots (`qemu --blk-devices N` sets it too; QEMU's devices only) |
//! | `VIOMMU_TIMEOUT_SECS` | wall-clock limit for one QEMU run (default 300); QEMU is killed after it (with `ours`: devicetree dump, server and QEMU together, both killed) |
//! | `VIOMMU_DEVICE` | `qemu` (default): QEMU's virtio-iommu-pci, virtio-blk-pci and edu; `ours`: our device through our vfio-user server and QEMU 11.1's `vfio-user-pci` ([`DeviceChoice`], [`ours`]) |
//! | `VIOMMU_SERVER` | (`ours`) a prebuilt `virtio-iommu-vfio-user` instead of building it |
//! | `VIOMMU_SERVER_LOG` | (`ours`) the server's `--log-level` |
//! | `VIOMMU_FIRMWARE_ELF` | (tests, [`firmware_elf`]) use this prebuilt firmware instead of building it |

use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

pub mod acpi;
mod apt;
mod boot;
pub mod devicetree;
mod disk;
mod fetch;
pub mod linux;
mod mmio_iommu;
pub mod ours;
mod qemu_111;
mod tap;
mod toolchain;
pub use boot::*;
pub use devicetree::{DeviceTree, Node, Property};
pub use disk::*;
pub use fetch::*;
pub use linux::{run_linux, LinuxConfig, LinuxOutcome};
pub use mmio_iommu::*;
pub use ours::{run_ours, DeviceChoice, ServerCounts, ServerReport};
pub use qemu_111::{fetch_debian_qemu_111, QEMU_111_DEB_VERSION};
pub use tap::*;
pub use toolchain::ensure_target;

/// Debian package version of the QEMU 7.2 build used with [`QemuChoice::Debian72`].
pub const QEMU_72_DEB_VERSION: &str = "1:7.2+dfsg-7+deb12u18+b3";
/// Size of the generated default disk image.
pub const DEFAULT_DISK_SIZE: u64 = 8 << 20;
/// Guest RAM (`-m`) unless the extra arguments say otherwise.
pub const DEFAULT_MEMORY: &str = "512M";
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
    /// A devicetree could not be parsed, edited or written ([`devicetree`]).
    Devicetree {
        /// Why.
        reason: String,
    },
    /// A package or file the run needs could not be fetched or unpacked ([`linux`]).
    Fetch {
        /// What was being fetched (e.g. the package).
        what: String,
        /// Why it failed (e.g. apt's error).
        reason: String,
    },
    /// The Linux guest's initramfs could not be built (a module, busybox or kernel option
    /// missing, a module not decompressible; [`linux`]).
    Initramfs(String),
    /// Our vfio-user server failed to start listening ([`ours`]).
    Server {
        /// What happened.
        reason: String,
        /// Its stderr up to then.
        stderr: String,
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
            Self::Devicetree { reason } => write!(f, "devicetree: {reason}"),
            Self::Fetch { what, reason } => write!(f, "cannot fetch {what}: {reason}"),
            Self::Initramfs(reason) => write!(f, "initramfs: {reason}"),
            Self::Server { reason, stderr } => {
                write!(f, "vfio-user server: {reason}")?;
                if !stderr.trim().is_empty() {
                    write!(f, "; its stderr:\n{}", stderr.trim_end())?;
                }
                Ok(())
            }
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
    /// The IOMMU's transport (`VIOMMU_IOMMU`): QEMU's `virtio-iommu-pci` or its virtio-mmio
    /// `virtio-iommu-device` described in a `-dtb` tree ([`mmio_boot_args`]).
    pub iommu: IommuKind,
    /// PCI `addr=` of the virtio-iommu (e.g. `0x5`), `None` ⇒ QEMU's choice.
    pub iommu_addr: Option<String>,
    /// PCI `addr=` of the virtio-blk device.
    pub blk_addr: Option<String>,
    /// PCI `addr=` of the edu device.
    pub edu_addr: Option<String>,
    /// virtio-blk devices on the disk (`VIOMMU_BLK_DEVICES`, `qemu --blk-devices N`; default
    /// 1): each its own drive on the same image with its own temporary overlay (`snapshot=on`,
    /// as `disk0`), the further ones after edu, all behind the IOMMU (`cargo qemu-blk-bench` uses 3:
    /// one per mode, so the modes interleave). Firmware boots with [`DeviceChoice::Qemu`] only
    /// (`ours` refuses another number); the Linux guest always has one.
    pub blk_devices: usize,
    /// Wall-clock limit for the QEMU run (with [`DeviceChoice::Ours`]: for devicetree,
    /// server and QEMU together).
    pub timeout: Duration,
    /// QEMU's devices or ours (`VIOMMU_DEVICE`).
    pub device: DeviceChoice,
    /// A prebuilt `virtio-iommu-vfio-user` (`VIOMMU_SERVER`); `None` ⇒ built
    /// ([`ours::build_server`]). Only with [`DeviceChoice::Ours`].
    pub server: Option<PathBuf>,
    /// The server's `--log-level` (`VIOMMU_SERVER_LOG`); `None` ⇒ the server's default.
    pub server_log_level: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            qemu: QemuChoice::System,
            disk: None,
            extra_args: Vec::new(),
            iommu: IommuKind::Pci,
            iommu_addr: None,
            blk_addr: None,
            edu_addr: None,
            blk_devices: 1,
            timeout: DEFAULT_TIMEOUT,
            device: DeviceChoice::Qemu,
            server: None,
            server_log_level: None,
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
        let iommu = IommuKind::from_env()?;
        let blk_devices = match env_string("VIOMMU_BLK_DEVICES") {
            None => 1,
            Some(v) => parse_blk_devices(&v).map_err(|reason| Error::InvalidEnv {
                name: "VIOMMU_BLK_DEVICES",
                reason,
            })?,
        };
        Ok(Self {
            qemu: iommu.qemu_choice(QemuChoice::from_env()),
            disk: std::env::var_os("VIOMMU_DISK")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            extra_args: env_string("VIOMMU_QEMU_ARGS")
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            iommu,
            iommu_addr: env_string("VIOMMU_IOMMU_ADDR"),
            blk_addr: env_string("VIOMMU_BLK_ADDR"),
            edu_addr: env_string("VIOMMU_EDU_ADDR"),
            blk_devices,
            timeout,
            device: DeviceChoice::from_env()?,
            server: std::env::var_os("VIOMMU_SERVER")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            server_log_level: env_string("VIOMMU_SERVER_LOG"),
        })
    }
}

/// The number of virtio-blk devices in `text` (1 to 8).
///
/// # Errors
///
/// Why it is not one, for the caller's error.
pub fn parse_blk_devices(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n @ 1..=8) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a number of virtio-blk devices from 1 to 8"
        )),
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
    /// Wall time from spawning QEMU to its exit (with [`DeviceChoice::Ours`]: from the
    /// devicetree dump to the server's exit).
    pub duration: Duration,
    /// How our vfio-user server ended ([`DeviceChoice::Ours`]); `None` with QEMU's devices.
    pub server: Option<ServerReport>,
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

/// Runs a build command with its output going where `output` says; fails on a non-zero status
/// (with the captured stderr when [`BuildOutput::Captured`]).
pub(crate) fn run_build(command: &mut Command, output: BuildOutput) -> Result<()> {
    match output {
        BuildOutput::Captured => {
            run_captured(command)?;
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
    Ok(())
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
    run_build(&mut command, output)?;
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
            server: None,
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
        assert!(!joined.contains("disk1"));
        let three = RunConfig {
            blk_devices: 3,
            ..RunConfig::default()
        };
        let joined = qemu_args(&three, Path::new("/fw.elf"), Path::new("/d.img")).join(" ");
        for i in 1..3 {
            assert!(joined.contains(&format!(
                "-drive if=none,id=disk{i},format=raw,snapshot=on,file=/d.img \
                 -device virtio-blk-pci,drive=disk{i},iommu_platform=on,disable-legacy=on"
            )));
        }
        assert!(!joined.contains("disk3"));
        // After edu, so they never take a slot VIOMMU_EDU_ADDR names.
        assert!(
            joined.find("-device edu") < joined.find("id=disk1"),
            "{joined}"
        );
        assert_eq!(parse_blk_devices(" 3 "), Ok(3));
        assert!(parse_blk_devices("0").is_err() && parse_blk_devices("9").is_err());
    }

    #[test]
    fn backports_source() {
        let stanza = backports_stanza();
        assert!(stanza.contains("Suites: bookworm-backports\n"));
        assert!(stanza.starts_with("Types: deb\nURIs: http"));
    }
}
