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
//!    `virt.dtb`; the map covers every requester ID but the IOMMU's, QEMU's own form
//!    (`Coverage::AllExcept(vec![])`): the server serves the host bridge 00:00.0 as an
//!    endpoint, as QEMU's device does, and empty slots stay covered so that the firmware finds
//!    endpoint IDs the IOMMU does not know (its S_NOENT cases). QEMU PCI devices in the extra
//!    arguments are refused ([`check_no_qemu_pci_devices`]);
//!    QEMU builds a VIOT only for its own virtio-iommu, so QEMU's ACPI is turned off and an
//!    MCFG and VIOT describing the same bridge and IOMMU ([`pci_iommu_acpi`]) go to the guest
//!    as fw_cfg `etc/acpi/tables` and `etc/table-loader` (QEMU warns that such names should
//!    start with `opt/`);
//! 4. the server, started and waited for until it listens ([`ServerProcess::start`]);
//! 5. QEMU with shared memfd RAM, `-dtb` and one `vfio-user-pci` per device
//!    ([`ours_qemu_args`]);
//! 6. the server, waited for after QEMU quit ([`EXIT_TIMEOUT`], [`FAILED_EXIT_TIMEOUT`] when
//!    QEMU failed) and killed if it does not exit ([`ServerProcess::stop`]); its report lands
//!    in [`RunOutcome::server`], with the driver checker's findings (the server runs with
//!    `--checker`; [`checker`] compares them with the firmware's announcements).
//!
//! `VIOMMU_TIMEOUT_SECS` bounds steps 3–6 together (the builds of step 1 are not counted),
//! except that step 3's `dumpdtb` run is cut only by its own bound
//! ([`crate::devicetree::DUMP_TIMEOUT`]): its time counts against the deadline, but it may
//! overrun it.
//! The temporary directory, the server and QEMU are removed or killed on every exit path.
//!
//! Modules: `pci_addr` (device addresses and requester IDs), `layout` (where our devices sit,
//! what else may be on the bus), `workdir` (the temporary directory), `args` (QEMU's command
//! line), `iommu_node` (the devicetree additions), `acpi_desc` (the ACPI tables), `server`
//! (the server process).

#[allow(unused_imports)]
use crate::*;

mod acpi_desc;
mod args;
pub mod checker;
mod iommu_node;
mod layout;
mod pci_addr;
mod server;
mod workdir;

pub use acpi_desc::{host_bridge_ecam, pci_iommu_acpi};
pub use args::{
    dump_args, json_string, memfd_args, memory_size, ours_qemu_args, vfio_user_device,
    FirmwareFiles,
};
pub use checker::{
    parse_checker, parse_expects, parse_saw, CheckerExpect, CheckerFindings, CheckerViolation,
};
pub use iommu_node::{
    add_pci_iommu, iommu_map_cells, pci_host_bridge, Coverage, PCI_HOST_COMPATIBLE,
};
pub use layout::{check_no_qemu_pci_devices, Layout, HOST_BRIDGE_RID};
pub use pci_addr::PciAddr;
pub use server::{
    build_server, parse_counts, ServerCounts, ServerProcess, ServerReport, ServerSpec,
    COUNTS_PREFIX, EXIT_TIMEOUT, FAILED_EXIT_TIMEOUT, LISTENING_LINE, LISTEN_TIMEOUT, SERVER_BIN,
    SERVER_FEATURE, SERVER_PACKAGE,
};
pub use workdir::WorkDir;

use crate::devicetree::{dump, DeviceTree};

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

/// Writes the guest's devicetree and ACPI tables into `dir`: QEMU's own tree for this machine
/// ([`dump`] of [`dump_args`]) plus our IOMMU ([`add_pci_iommu`]), and the MCFG + VIOT
/// describing the same ([`pci_iommu_acpi`]); both cover every requester ID but the IOMMU's, in
/// QEMU's own form (the server knows the host bridge, [`HOST_BRIDGE_RID`], as an endpoint, as
/// QEMU's device does; see [`Coverage`]).
///
/// # Errors
///
/// Those of [`dump`], [`DeviceTree::parse`], [`add_pci_iommu`], [`pci_iommu_acpi`];
/// [`Error::Io`] when a file cannot be written.
pub fn write_firmware_files(
    config: &RunConfig,
    elf: &Path,
    qemu: &Path,
    layout: &Layout,
    dir: &Path,
) -> Result<FirmwareFiles> {
    let coverage = Coverage::AllExcept(vec![]);
    let mut tree = DeviceTree::parse(&dump(qemu, &dump_args(config, elf)?)?)?;
    add_pci_iommu(&mut tree, layout.iommu.devfn(), &coverage)?;
    let acpi = pci_iommu_acpi(&tree, layout.iommu.devfn(), &coverage)?;
    let files = FirmwareFiles {
        dtb: dir.join("virt.dtb"),
        acpi_tables: dir.join("acpi-tables"),
        acpi_loader: dir.join("table-loader"),
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
    Ok(files)
}

/// Prints one line per vfio-user device: name, address, socket, endpoint ID (and disk).
fn print_devices(layout: &Layout, spec: &ServerSpec) {
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
        spec.disk.display()
    );
    println!(
        "runner: vfio-user device edu at {} socket {} endpoint {:#x}",
        layout.edu,
        spec.edu_socket.display(),
        spec.edu_endpoint
    );
}

/// After the server's own `checker:` and `device saw:` lines (forwarded as it printed them):
/// the violations the guest did not announce ([`checker::unannounced`]: a driver bug of our
/// firmware, which [`problems`] fails; for another guest, e.g. Linux, what it breaks), the
/// checker gaps ([`checker::gaps`], as warnings), and a one-line verdict.
fn print_checker(report: &ServerReport, output: &str) {
    let Some(findings) = &report.checker else {
        eprintln!("runner: the server printed no driver checker report");
        return;
    };
    let unannounced = checker::unannounced(Some(findings), output);
    for problem in &unannounced {
        eprintln!("runner: {problem}");
    }
    for gap in checker::gaps(Some(findings), output) {
        eprintln!("runner: warning: {gap}");
    }
    let announced = checker::parse_expects(output).len();
    println!(
        "runner: driver checker: {} statement(s) broken, {} not announced ({announced} \
         announcement(s) by the guest)",
        findings.violations.len(),
        unannounced.len()
    );
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

/// Checks, without building or starting anything, that `config` can run against our device:
/// the layout of its devices, no QEMU PCI device among the extra arguments, a QEMU that has
/// `vfio-user-pci`. Returns the layout. [`run_ours`] checks the same first; the runner calls
/// this before it builds the server, so a refused configuration costs no server build.
///
/// # Errors
///
/// Those of [`Layout::from_config`], [`check_no_qemu_pci_devices`] and [`qemu_for_ours`].
pub fn check_config(config: &RunConfig) -> Result<Layout> {
    let layout = Layout::from_config(config)?;
    check_no_qemu_pci_devices(&config.extra_args)?;
    qemu_for_ours(&config.qemu)?;
    Ok(layout)
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
    let layout = check_config(config)?;
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

    let files = write_firmware_files(config, elf, &qemu, &layout, work.path())?;

    let spec = ServerSpec {
        iommu_socket: work.path().join("iommu.sock"),
        blk_socket: work.path().join("blk.sock"),
        disk: private_disk.clone(),
        blk_endpoint: u32::from(layout.blk.requester_id()),
        edu_socket: work.path().join("edu.sock"),
        edu_endpoint: u32::from(layout.edu.requester_id()),
        log_level: config.server_log_level.clone(),
        // The driver checker is on in every run against ours (issue #9 item 3); it changes
        // no answer of the device.
        checker: true,
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
    print_devices(&layout, &spec);
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
        return Ok(ran.outcome(128 + 9, disk, qemu, args, started.elapsed(), Some(report)));
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
    let exit_timeout = if status.success() {
        EXIT_TIMEOUT
    } else {
        FAILED_EXIT_TIMEOUT
    };
    let report = server.stop(exit_timeout);
    match (&report.counts, report.killed) {
        (_, true) => eprintln!(
            "runner: server did not exit within {} s after QEMU quit; killed it",
            exit_timeout.as_secs()
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
    print_checker(&report, &ran.output);
    drop(work);
    Ok(ran.outcome(
        exit_code(status),
        disk,
        qemu,
        args,
        started.elapsed(),
        Some(report),
    ))
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
}
