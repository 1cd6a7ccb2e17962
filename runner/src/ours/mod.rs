//! Booting the firmware against our device ([`DeviceChoice::Ours`], `VIOMMU_DEVICE=ours`,
//! `cargo qemu-ours`): our vfio-user server serves the virtio-iommu, virtio-blk and edu devices
//! and QEMU 11.1 reaches them through `vfio-user-pci` (issue #8 item 3).
//!
//! [`run_ours`], step by step:
//! 1. QEMU 11.1 ([`qemu_for_ours`]), the server binary (`VIOMMU_SERVER`, else
//!    [`build_server`]) and the device addresses ([`Layout`]);
//! 2. a fresh temporary directory ([`WorkDir`]) for the sockets (`iommu.sock`, `blk.sock`,
//!    `edu.sock`), the devicetree and a private copy of the disk image: QEMU's `snapshot=on`
//!    kept the firmware's writes away from the image, our server writes its file directly, so
//!    it gets the copy while `disk-sha256:` is checked against the original's hash;
//! 3. QEMU's own tree for the machine without devices ([`dump`], [`dump_args`]) plus a
//!    `virtio,pci-iommu` node and the host bridge's `iommu-map` ([`add_pci_iommu`]), written to
//!    `virt.dtb`; the map covers every requester ID but the IOMMU's and the host bridge's
//!    (`Coverage::AllExcept([0])`): the host bridge 00:00.0 is QEMU's and unknown to our
//!    IOMMU, while empty slots stay covered so that the firmware finds endpoint IDs the IOMMU
//!    does not know (its S_NOENT cases). QEMU PCI devices in the extra arguments are refused
//!    ([`check_no_qemu_pci_devices`]);
//!    QEMU builds a VIOT only for its own virtio-iommu, so QEMU's ACPI is turned off and an
//!    MCFG and VIOT describing the same bridge and IOMMU ([`pci_iommu_acpi`]) go to the guest
//!    as fw_cfg `etc/acpi/tables` and `etc/table-loader` (QEMU warns that such names should
//!    start with `opt/`);
//! 4. the server, started and waited for until it listens ([`ServerProcess::start`]);
//! 5. QEMU with shared memfd RAM, `-dtb` and one `vfio-user-pci` per device
//!    ([`ours_qemu_args`]);
//! 6. the server, waited for after QEMU quit and killed if it does not exit
//!    ([`ServerProcess::stop`]); its report lands in [`RunOutcome::server`].
//!
//! `VIOMMU_TIMEOUT_SECS` bounds steps 3–6 together (the builds of step 1 are not counted).
//! The temporary directory, the server and QEMU are removed or killed on every exit path.
//!
//! Modules: `pci_addr` (device addresses and requester IDs), `args` (QEMU's command line),
//! `iommu_node` (the devicetree additions), `server` (the server process).

#[allow(unused_imports)]
use crate::*;

mod acpi_desc;
mod args;
mod iommu_node;
mod pci_addr;
mod server;

pub use acpi_desc::{host_bridge_ecam, pci_iommu_acpi};
pub use args::{
    dump_args, json_string, memfd_args, memory_size, ours_qemu_args, vfio_user_device,
    FirmwareFiles,
};
pub use iommu_node::{
    add_pci_iommu, iommu_map_cells, pci_host_bridge, Coverage, PCI_HOST_COMPATIBLE,
};
pub use pci_addr::PciAddr;
pub use server::{
    build_server, parse_counts, ServerCounts, ServerProcess, ServerReport, ServerSpec,
    COUNTS_PREFIX, EXIT_TIMEOUT, LISTENING_LINE, LISTEN_TIMEOUT, SERVER_BIN, SERVER_FEATURE,
    SERVER_PACKAGE,
};

use crate::devicetree::{dump, DeviceTree};

/// Requester ID of the host bridge function 00:00.0 of `-M virt` (QEMU's `gpex-root`).
pub const HOST_BRIDGE_RID: u16 = 0;

/// Which virtio-iommu (and endpoints) the firmware runs against.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum DeviceChoice {
    /// QEMU's own `virtio-iommu-pci`, `virtio-blk-pci` and `edu`.
    #[default]
    Qemu,
    /// Ours, through our vfio-user server and QEMU 11.1's `vfio-user-pci`.
    Ours,
}

impl DeviceChoice {
    /// From a `VIOMMU_DEVICE` value: unset, empty or `qemu` ⇒ [`Qemu`](Self::Qemu), `ours` ⇒
    /// [`Ours`](Self::Ours).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEnv`] for anything else.
    pub fn parse(value: Option<&str>) -> Result<Self> {
        match value.map(str::trim) {
            None | Some("") | Some("qemu") => Ok(Self::Qemu),
            Some("ours") => Ok(Self::Ours),
            Some(other) => Err(Error::InvalidEnv {
                name: "VIOMMU_DEVICE",
                reason: format!("`{other}` is neither `qemu` nor `ours`"),
            }),
        }
    }

    /// From `VIOMMU_DEVICE` ([`parse`](Self::parse)).
    ///
    /// # Errors
    ///
    /// As [`parse`](Self::parse); also when the value is not UTF-8.
    pub fn from_env() -> Result<Self> {
        match std::env::var("VIOMMU_DEVICE") {
            Ok(value) => Self::parse(Some(&value)),
            Err(std::env::VarError::NotPresent) => Ok(Self::Qemu),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::InvalidEnv {
                name: "VIOMMU_DEVICE",
                reason: "not UTF-8".into(),
            }),
        }
    }
}

/// The QEMU to run against our device: `vfio-user-pci` needs QEMU ≥ 10.1, so the default
/// ([`QemuChoice::System`], 10.0 here) becomes [`QemuChoice::Debian111`]; a binary named in
/// `VIOMMU_QEMU` is used as given.
///
/// # Errors
///
/// [`Error::InvalidEnv`] for [`QemuChoice::Debian72`] (no `vfio-user-pci`).
pub fn qemu_for_ours(choice: &QemuChoice) -> Result<QemuChoice> {
    match choice {
        QemuChoice::System | QemuChoice::Debian111 => Ok(QemuChoice::Debian111),
        QemuChoice::Binary(path) => Ok(QemuChoice::Binary(path.clone())),
        QemuChoice::Debian72 => Err(Error::InvalidEnv {
            name: "VIOMMU_QEMU",
            reason: "QEMU 7.2 has no vfio-user-pci; VIOMMU_DEVICE=ours needs QEMU 11.1 \
                     (unset VIOMMU_QEMU, set it to 11.1, or to a QEMU ≥ 10.1 binary)"
                .into(),
        }),
    }
}

/// Where our three devices sit on PCI bus 0.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Layout {
    /// The virtio-iommu (default 00:01.0).
    pub iommu: PciAddr,
    /// virtio-blk (default 00:02.0, endpoint 0x10).
    pub blk: PciAddr,
    /// edu (default 00:03.0, endpoint 0x18).
    pub edu: PciAddr,
}

impl Layout {
    /// From `config.{iommu,blk,edu}_addr` (QEMU's `addr=` syntax), defaults 1, 2 and 3.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEnv`] naming the variable when an address does not parse, or when two
    /// devices share one.
    pub fn from_config(config: &RunConfig) -> Result<Self> {
        let parse = |value: Option<&String>, name: &'static str, default: u8| {
            match value {
            None => Ok(PciAddr {
                slot: default,
                function: 0,
            }),
            Some(text) => PciAddr::parse(text).ok_or_else(|| Error::InvalidEnv {
                name,
                reason: format!("`{text}` is not a PCI address (slot[.function], hexadecimal, slot ≤ 1f, function ≤ 7)"),
            }),
        }
        };
        let layout = Self {
            iommu: parse(config.iommu_addr.as_ref(), "VIOMMU_IOMMU_ADDR", 1)?,
            blk: parse(config.blk_addr.as_ref(), "VIOMMU_BLK_ADDR", 2)?,
            edu: parse(config.edu_addr.as_ref(), "VIOMMU_EDU_ADDR", 3)?,
        };
        let clash = |a: PciAddr, b: PciAddr, name: &'static str, other: &str| {
            if a == b {
                Err(Error::InvalidEnv {
                    name,
                    reason: format!("{a} is also the {other}'s address"),
                })
            } else {
                Ok(())
            }
        };
        clash(layout.blk, layout.iommu, "VIOMMU_BLK_ADDR", "virtio-iommu")?;
        clash(layout.edu, layout.iommu, "VIOMMU_EDU_ADDR", "virtio-iommu")?;
        clash(layout.edu, layout.blk, "VIOMMU_EDU_ADDR", "virtio-blk")?;
        for (addr, name) in [
            (layout.iommu, "VIOMMU_IOMMU_ADDR"),
            (layout.blk, "VIOMMU_BLK_ADDR"),
            (layout.edu, "VIOMMU_EDU_ADDR"),
        ] {
            if addr.slot == 0 {
                return Err(Error::InvalidEnv {
                    name,
                    reason: "slot 0 is the host bridge's".into(),
                });
            }
        }
        Ok(layout)
    }
}

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

/// The server binary for `config`: `config.server` if set, else [`build_server`] (captured
/// output: cargo's errors come back in the error).
///
/// # Errors
///
/// [`Error::InvalidEnv`] (`VIOMMU_SERVER`) when the given binary is not a file; those of
/// [`build_server`].
pub fn server_binary(config: &RunConfig) -> Result<PathBuf> {
    match &config.server {
        Some(path) if path.is_file() => Ok(path.clone()),
        Some(path) => Err(Error::InvalidEnv {
            name: "VIOMMU_SERVER",
            reason: format!("{} is not a file", path.display()),
        }),
        None => build_server(BuildOutput::Captured),
    }
}

/// Time left until `deadline`, or [`Error::Timeout`] when it passed.
fn remaining(deadline: Instant, config: &RunConfig, output: &str) -> Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Error::Timeout {
            seconds: config.timeout.as_secs(),
            output: output.to_string(),
        })
}

/// Boots `elf` against our device (see the module documentation) and returns the outcome,
/// whatever the firmware's exit status, with [`RunOutcome::server`] set.
///
/// Prints the disk (original and private copy), the vfio-user devices with their addresses,
/// sockets and endpoint IDs, QEMU's command line, the server's own output (its `listening` and
/// counts lines) and how the server ended.
///
/// # Errors
///
/// [`Error::Timeout`] when the whole run exceeds `config.timeout`; [`Error::Server`] when the
/// server does not start listening; [`Error::Devicetree`] when the tree cannot be built;
/// those of [`qemu_for_ours`], [`Layout::from_config`], [`server_binary`], [`resolve_qemu`],
/// [`prepare_disk`]; [`Error::Io`] for file and process failures.
pub fn run_ours(config: &RunConfig, elf: &Path) -> Result<RunOutcome> {
    let layout = Layout::from_config(config)?;
    check_no_qemu_pci_devices(&config.extra_args)?;
    let qemu = resolve_qemu(&qemu_for_ours(&config.qemu)?)?;
    let program = server_binary(config)?;
    let disk = prepare_disk(config.disk.as_deref())?;
    let started = Instant::now();
    let deadline = started + config.timeout;
    let work = WorkDir::new()?;
    let private_disk = work.path().join("disk.img");
    io_context(fs::copy(&disk.path, &private_disk), || {
        format!(
            "cannot copy {} to {}",
            disk.path.display(),
            private_disk.display()
        )
    })?;
    println!(
        "runner: disk {} {} bytes sha256 {} (the server writes a private copy, {})",
        disk.path.display(),
        disk.size,
        disk.sha256,
        private_disk.display()
    );

    // The devicetree: QEMU's own for this machine, plus our IOMMU.
    // Every requester ID but the IOMMU's and the host bridge's (see `Coverage`).
    let coverage = Coverage::AllExcept(vec![HOST_BRIDGE_RID]);
    let mut tree = DeviceTree::parse(&dump(&qemu, &dump_args(config, elf)?)?)?;
    add_pci_iommu(&mut tree, layout.iommu.devfn(), &coverage)?;
    let acpi = pci_iommu_acpi(&tree, layout.iommu.devfn(), &coverage)?;
    let files = FirmwareFiles {
        dtb: work.path().join("virt.dtb"),
        acpi_tables: work.path().join("acpi-tables"),
        acpi_loader: work.path().join("table-loader"),
    };
    for (path, bytes) in [
        (&files.dtb, tree.to_dtb()?),
        (&files.acpi_tables, acpi.tables),
        (&files.acpi_loader, acpi.loader),
    ] {
        io_context(fs::write(path, bytes), || {
            format!("cannot write {}", path.display())
        })?;
    }

    let spec = ServerSpec {
        iommu_socket: work.path().join("iommu.sock"),
        blk_socket: work.path().join("blk.sock"),
        disk: private_disk.clone(),
        blk_endpoint: u32::from(layout.blk.requester_id()),
        edu_socket: work.path().join("edu.sock"),
        edu_endpoint: u32::from(layout.edu.requester_id()),
        log_level: config.server_log_level.clone(),
    };
    let listen = remaining(deadline, config, "")?.min(LISTEN_TIMEOUT);
    println!(
        "runner: server {} {}",
        program.display(),
        spec.args()
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut server = ServerProcess::start(&program, &spec, listen)?;
    println!(
        "runner: vfio-user device virtio-iommu at {} socket {}",
        layout.iommu,
        spec.iommu_socket.display()
    );
    println!(
        "runner: vfio-user device virtio-blk at {} socket {} endpoint {:#x} disk {}",
        layout.blk,
        spec.blk_socket.display(),
        spec.blk_endpoint,
        private_disk.display()
    );
    println!(
        "runner: vfio-user device edu at {} socket {} endpoint {:#x}",
        layout.edu,
        spec.edu_socket.display(),
        spec.edu_endpoint
    );
    let devices = [
        (spec.iommu_socket.clone(), layout.iommu),
        (spec.blk_socket.clone(), layout.blk),
        (spec.edu_socket.clone(), layout.edu),
    ];
    let args = ours_qemu_args(config, elf, &devices, &files)?;
    println!("runner: {}", display_command(&qemu, &args));
    let ran = run_qemu_watched(&qemu, &args, deadline, &mut || server.has_exited())?;
    if ran.cut_short {
        let report = server.stop(Duration::ZERO);
        eprintln!(
            "runner: the server exited during the run (status {}); QEMU did not exit within {} s \
             after it and was killed",
            report.exit_code,
            WATCH_GRACE.as_secs()
        );
        return Ok(RunOutcome {
            exit_code: 128 + 9,
            output: ran.output,
            stderr: ran.stderr,
            disk_sha256: disk.sha256,
            disk: disk.path,
            qemu,
            args,
            duration: started.elapsed(),
            server: Some(report),
        });
    }
    let Some(status) = ran.status else {
        let report = server.kill();
        eprintln!(
            "runner: TIMEOUT: QEMU still running after {} s; killed it and the server (server status {})",
            config.timeout.as_secs(),
            report.exit_code
        );
        return Err(Error::Timeout {
            seconds: config.timeout.as_secs(),
            output: ran.output,
        });
    };
    let report = server.stop(EXIT_TIMEOUT);
    match (&report.counts, report.killed) {
        (_, true) => eprintln!(
            "runner: server did not exit within {} s after QEMU quit; killed it",
            EXIT_TIMEOUT.as_secs()
        ),
        (Some(c), false) => println!(
            "runner: server exited with status {}: requests={} notifications={} faults={}",
            report.exit_code, c.requests, c.notifications, c.faults
        ),
        (None, false) => eprintln!(
            "runner: server exited with status {} without its counts line",
            report.exit_code
        ),
    }
    drop(work);
    Ok(RunOutcome {
        exit_code: exit_code(status),
        output: ran.output,
        stderr: ran.stderr,
        disk_sha256: disk.sha256,
        disk: disk.path,
        qemu,
        args,
        duration: started.elapsed(),
        server: Some(report),
    })
}

/// Refuses QEMU PCI devices in the extra arguments (`-device <driver>-pci…` or `edu`): our
/// IOMMU does not know them, yet the `iommu-map` would put them behind it (the firmware PROBEs
/// every function behind it and gets S_NOENT), their DMA would not be translated, and QEMU
/// places a device without `addr=` in slot 1 before the vfio-user devices are realized (seen
/// with `cargo qemu-dma-modes`' `virtio-rng-pci`: "slot 1 function 0 not available for
/// vfio-user-pci").
///
/// # Errors
///
/// [`Error::InvalidEnv`] (`VIOMMU_DEVICE`) naming the device.
pub fn check_no_qemu_pci_devices(extra_args: &[String]) -> Result<()> {
    let mut args = extra_args.iter();
    while let Some(arg) = args.next() {
        if arg != "-device" && arg != "--device" {
            continue;
        }
        let Some(device) = args.next() else { break };
        let driver = device.split(',').next().unwrap_or_default();
        if driver.ends_with("-pci") || driver == "edu" {
            return Err(Error::InvalidEnv {
                name: "VIOMMU_DEVICE",
                reason: format!(
                    "`ours` cannot boot with QEMU's PCI device `-device {device}`: our IOMMU \
                     does not know it and does not translate its DMA (for dma-modes against \
                     our device use `cargo qemu-ours-dma-modes`, which has no virtio-rng)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice() {
        assert_eq!(DeviceChoice::parse(None).unwrap(), DeviceChoice::Qemu);
        assert_eq!(DeviceChoice::parse(Some("")).unwrap(), DeviceChoice::Qemu);
        assert_eq!(
            DeviceChoice::parse(Some("qemu")).unwrap(),
            DeviceChoice::Qemu
        );
        assert_eq!(
            DeviceChoice::parse(Some("ours")).unwrap(),
            DeviceChoice::Ours
        );
        assert!(matches!(
            DeviceChoice::parse(Some("Ours")),
            Err(Error::InvalidEnv {
                name: "VIOMMU_DEVICE",
                ..
            })
        ));
    }

    #[test]
    fn qemu_is_forced_to_11_1() {
        assert_eq!(
            qemu_for_ours(&QemuChoice::System).unwrap(),
            QemuChoice::Debian111
        );
        assert_eq!(
            qemu_for_ours(&QemuChoice::Debian111).unwrap(),
            QemuChoice::Debian111
        );
        let bin = QemuChoice::Binary("/opt/q".into());
        assert_eq!(qemu_for_ours(&bin).unwrap(), bin);
        assert!(matches!(
            qemu_for_ours(&QemuChoice::Debian72),
            Err(Error::InvalidEnv {
                name: "VIOMMU_QEMU",
                ..
            })
        ));
    }

    #[test]
    fn layout() {
        let default = Layout::from_config(&RunConfig::default()).unwrap();
        assert_eq!(default.iommu.requester_id(), 0x08);
        assert_eq!(default.blk.requester_id(), 0x10);
        assert_eq!(default.edu.requester_id(), 0x18);
        let moved = Layout::from_config(&RunConfig {
            iommu_addr: Some("0x5".into()),
            blk_addr: Some("0x1e".into()),
            edu_addr: Some("3.1".into()),
            ..RunConfig::default()
        })
        .unwrap();
        assert_eq!(
            (moved.iommu.devfn(), moved.blk.devfn(), moved.edu.devfn()),
            (0x28, 0xf0, 0x19)
        );
        for (iommu, blk, edu, variable) in [
            (Some("0x20"), None, None, "VIOMMU_IOMMU_ADDR"),
            (None, Some("1"), None, "VIOMMU_BLK_ADDR"),
            (None, None, Some("02.0"), "VIOMMU_EDU_ADDR"),
            (Some("0"), None, None, "VIOMMU_IOMMU_ADDR"),
        ] {
            let config = RunConfig {
                iommu_addr: iommu.map(String::from),
                blk_addr: blk.map(String::from),
                edu_addr: edu.map(String::from),
                ..RunConfig::default()
            };
            match Layout::from_config(&config) {
                Err(Error::InvalidEnv { name, .. }) => assert_eq!(name, variable),
                other => panic!("{iommu:?} {blk:?} {edu:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn qemu_pci_devices_are_refused() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_no_qemu_pci_devices(&args(&["-append", "bench", "-smp", "2"])).is_ok());
        assert!(check_no_qemu_pci_devices(&args(&["-device", "loader,addr=0x1"])).is_ok());
        for bad in ["virtio-rng-pci,iommu_platform=on", "edu", "e1000e-pci"] {
            match check_no_qemu_pci_devices(&args(&["-m", "1G", "-device", bad])) {
                Err(Error::InvalidEnv { name, reason }) => {
                    assert_eq!(name, "VIOMMU_DEVICE");
                    assert!(reason.contains(bad), "{reason}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

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
