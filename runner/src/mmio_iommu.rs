//! The virtio-mmio variant of QEMU's own virtio-iommu (`VIOMMU_IOMMU=mmio`): `-device
//! virtio-iommu-device,primary-bus=pcie.0` instead of `virtio-iommu-pci`, with a devicetree
//! (`-dtb`) that describes it, since `-M virt` does not.
//!
//! What QEMU does (11.1.3, checked): the device sits on one of `-M virt`'s 32 virtio-mmio
//! transports (`0x0a000000 + n * 0x200`); QEMU's own tree lists every transport as a
//! `virtio,mmio` node but gives none `#iommu-cells`, and the host bridge no `iommu-map`. The
//! transport a `-device …-device` lands on follows `hw/arm/virt.c` `create_virtio_devices`:
//! the transports' buses are created in increasing address order and prepended, and
//! `qbus_find_recursive` takes the first free one, so the first virtio-mmio `-device` gets the
//! highest address (`0x0a003e00`). The runner does not rely on that order: it asks QEMU (`info
//! qtree` of a paused run, [`iommu_transport_base`]) and the firmware checks the node it is
//! given holds DeviceID 23. QEMU's virtio-mmio transports are legacy (version 1) unless
//! `virtio-mmio.force-legacy=false`, and a legacy transport cannot offer `VIRTIO_F_VERSION_1`,
//! which the driver requires: [`FORCE_MODERN`] is added.
//!
//! The tree: QEMU's own (`dumpdtb`) for the same command line, with `#iommu-cells = <1>` and a
//! phandle on that transport's node and, on every ECAM host bridge,
//! `iommu-map = <0x0 &iommu 0x0 0x10000>` (requester ID = endpoint ID for all of bus 0..255;
//! Documentation/devicetree/bindings/pci/pci-iommu.txt). QEMU translates the DMA of every
//! device on `primary-bus`; there is no IOMMU function on the bus to exclude.

#[allow(unused_imports)]
use crate::*;

use crate::devicetree::{cells, DeviceTree};

/// The environment variable choosing the IOMMU's transport.
pub const IOMMU_ENV: &str = "VIOMMU_IOMMU";

/// QEMU's virtio-mmio virtio-iommu, attached to the PCIe root bus.
pub const MMIO_IOMMU_DEVICE: &str = "virtio-iommu-device,primary-bus=pcie.0";

/// Makes QEMU's virtio-mmio transports version 2 (modern): `-global` and its value.
pub const FORCE_MODERN: [&str; 2] = ["-global", "virtio-mmio.force-legacy=false"];

/// The oldest QEMU the variant is run with (major, minor): the one it was checked on.
pub const MMIO_IOMMU_MIN_QEMU: (u32, u32) = (11, 1);

/// Which transport QEMU's virtio-iommu uses.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum IommuKind {
    /// `virtio-iommu-pci` (QEMU describes it in its own devicetree).
    #[default]
    Pci,
    /// `virtio-iommu-device` on a virtio-mmio transport, described by the runner's `-dtb`.
    Mmio,
}

impl IommuKind {
    /// From `VIOMMU_IOMMU`: unset, empty or `pci` ⇒ [`Pci`](Self::Pci), `mmio` ⇒
    /// [`Mmio`](Self::Mmio).
    ///
    /// # Errors
    /// [`Error::InvalidEnv`] for any other value.
    pub fn from_env() -> Result<Self> {
        Self::parse(std::env::var(IOMMU_ENV).ok().as_deref())
    }

    /// Parses a `VIOMMU_IOMMU` value (`None` = unset).
    ///
    /// # Errors
    /// [`Error::InvalidEnv`] for anything but unset, empty, `pci` or `mmio`.
    pub fn parse(value: Option<&str>) -> Result<Self> {
        match value.map(str::trim) {
            None | Some("") | Some("pci") => Ok(Self::Pci),
            Some("mmio") => Ok(Self::Mmio),
            Some(other) => Err(Error::InvalidEnv {
                name: IOMMU_ENV,
                reason: format!("`{other}` is neither `pci` nor `mmio`"),
            }),
        }
    }

    /// The QEMU to use when `VIOMMU_QEMU` says `choice`: the mmio variant needs QEMU 11.1, so
    /// an unset `VIOMMU_QEMU` ([`QemuChoice::System`], QEMU 10.0 here) becomes
    /// [`QemuChoice::Debian111`]; an explicit choice stays (its version is checked at boot).
    pub fn qemu_choice(self, choice: QemuChoice) -> QemuChoice {
        match (self, choice) {
            (Self::Mmio, QemuChoice::System) => QemuChoice::Debian111,
            (_, choice) => choice,
        }
    }

    /// The `-device` value of the IOMMU; `addr` (a PCI slot) applies to the PCI one only
    /// ([`mmio_boot_args`] refuses one for the mmio IOMMU).
    pub fn qemu_device(self, addr: Option<&String>) -> String {
        match self {
            Self::Pci => boot::with_addr("virtio-iommu-pci", addr),
            Self::Mmio => MMIO_IOMMU_DEVICE.to_string(),
        }
    }
}

/// The mmio IOMMU as the runner described it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MmioIommuNode {
    /// Path of the transport's node, e.g. `/virtio_mmio@a003e00`.
    pub path: String,
    /// Its phandle (what the host bridges' `iommu-map` names).
    pub phandle: u32,
    /// Register base (CPU physical address).
    pub base: u64,
    /// Paths of the host bridges given an `iommu-map`.
    pub host_bridges: Vec<String>,
}

/// `(major, minor)` from `qemu-system-aarch64 --version` output ("QEMU emulator version
/// 11.1.3 (Debian …)").
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

/// Checks `qemu` is at least [`MMIO_IOMMU_MIN_QEMU`].
///
/// # Errors
/// [`Error::QemuUnavailable`] naming the version found (or that none could be read).
pub fn check_qemu_version(qemu: &Path) -> Result<()> {
    let output = run_captured(Command::new(qemu).arg("--version").stdin(Stdio::null()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (major, minor) = MMIO_IOMMU_MIN_QEMU;
    match parse_qemu_version(&text) {
        Some(found) if found >= MMIO_IOMMU_MIN_QEMU => Ok(()),
        found => Err(Error::QemuUnavailable(format!(
            "{IOMMU_ENV}=mmio needs QEMU {major}.{minor} or later (VIOMMU_QEMU=11.1 or unset), \
             {} is {}",
            qemu.display(),
            found.map_or_else(
                || format!("of unknown version ({})", text.trim()),
                |(a, b)| format!("{a}.{b}")
            )
        ))),
    }
}

/// The base address of the virtio-mmio transport holding the `virtio-iommu-device`, from the
/// text of QEMU's `info qtree`: the `mmio <base>/<size>` line of the nearest `dev: virtio-mmio`
/// before `dev: virtio-iommu-device`. `None` when there is no such device or it does not sit
/// on a virtio-mmio transport.
pub fn iommu_transport_base(qtree: &str) -> Option<u64> {
    let mut in_transport = false;
    let mut base = None;
    for line in qtree.lines().map(str::trim) {
        if let Some(device) = line.strip_prefix("dev: ") {
            let name = device.split(',').next().unwrap_or_default();
            if name == "virtio-iommu-device" {
                return base;
            }
            in_transport = name == "virtio-mmio";
            base = None;
        } else if let Some(region) = line.strip_prefix("mmio ") {
            if in_transport && base.is_none() {
                let hex = region.split('/').next().unwrap_or_default();
                base = u64::from_str_radix(hex, 16).ok();
            }
        }
    }
    None
}

/// How long the paused QEMU of [`query_qtree`] may take to answer and quit.
pub const QTREE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `qemu` with the boot's `args` paused (`-S`), the monitor on stdin/stdout and no
/// console, and returns what `info qtree` printed. QEMU is killed if it has not quit within
/// [`QTREE_TIMEOUT`].
///
/// # Errors
/// [`Error::Io`] when QEMU cannot run; [`Error::CommandFailed`] when it fails or times out.
pub fn query_qtree(qemu: &Path, args: &[String]) -> Result<String> {
    let mut command = Command::new(qemu);
    command
        .args(args.iter().filter(|a| a.as_str() != "-nographic"))
        .args([
            "-S", "-display", "none", "-serial", "none", "-monitor", "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let display = format!("{command:?}");
    let child = io_context(crate::boot::spawn(&mut command), || {
        format!("cannot run `{display}`")
    })?;
    // Killed and reaped on every way out, an error of `try_wait` included.
    let mut guard = crate::boot::ChildGuard(Some(child));
    let Some(child) = guard.child() else {
        unreachable!("the guard was just given the child")
    };
    if let Some(mut stdin) = child.stdin.take() {
        // QEMU reads the commands one after the other; `quit` ends it.
        let _ = stdin.write_all(b"info qtree\nquit\n");
    }
    // Read both pipes on threads so a full pipe cannot stall QEMU while we wait.
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let deadline = Instant::now() + QTREE_TIMEOUT;
    let status = loop {
        match io_context(child.try_wait(), || format!("waiting for `{display}`"))? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(stdout),
        status => Err(Error::CommandFailed {
            command: display,
            status: status.map_or_else(
                || format!("killed after {} s", QTREE_TIMEOUT.as_secs()),
                |s| s.to_string(),
            ),
            stderr,
        }),
    }
}

/// Reads `pipe` to its end on a thread (nothing when `None`); lossy UTF-8.
fn read_all(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The `(address, size)` of a node's first `reg` entry, with `address_cells`/`size_cells` of 1
/// or 2 (its parent's).
fn first_reg(value: &[u32], address_cells: usize, size_cells: usize) -> Option<(u64, u64)> {
    let join = |cells: &[u32]| {
        cells
            .iter()
            .fold(0u64, |acc, &c| (acc << 32) | u64::from(c))
    };
    if !(1..=2).contains(&address_cells) || !(1..=2).contains(&size_cells) {
        return None;
    }
    let address = value.get(..address_cells)?;
    let size = value.get(address_cells..address_cells + size_cells)?;
    Some((join(address), join(size)))
}

/// Describes the virtio-iommu at virtio-mmio transport `base` in QEMU's tree: `#iommu-cells =
/// <1>` and a phandle (its own if it has one) on the `virtio,mmio` node at `base`, and
/// `iommu-map = <0x0 phandle 0x0 0x10000>` on every `pci-host-ecam-generic` node (replacing
/// any `iommu-map` and `iommu-map-mask` there).
///
/// # Errors
/// [`Error::Devicetree`] when no `virtio,mmio` node has `base` as its first `reg` address,
/// when there is no ECAM host bridge, or no phandle is left.
pub fn describe_mmio_iommu(tree: &mut DeviceTree, base: u64) -> Result<MmioIommuNode> {
    let dt_error = |reason: String| Error::Devicetree { reason };
    let root_cells = |name: &str, default: u32| {
        tree.root
            .u32_cells(name)
            .and_then(|v| v.first().copied())
            .unwrap_or(default) as usize
    };
    // QEMU's virtio_mmio nodes are children of the root.
    let (address_cells, size_cells) = (
        root_cells("#address-cells", 2),
        root_cells("#size-cells", 1),
    );
    let path = tree
        .find_compatible("virtio,mmio")
        .into_iter()
        .find(|path| {
            tree.node(path)
                .and_then(|n| n.u32_cells("reg"))
                .and_then(|reg| first_reg(&reg, address_cells, size_cells))
                .is_some_and(|(address, _)| address == base)
        })
        .ok_or_else(|| dt_error(format!("no virtio,mmio node at {base:#x}")))?;
    let phandle = match tree.node(&path).and_then(|n| n.u32_cells("phandle")) {
        Some(v) if v.len() == 1 => v[0],
        _ => tree.allocate_phandle()?,
    };
    let node = tree
        .node_mut(&path)
        .ok_or_else(|| dt_error(format!("{path} vanished")))?;
    node.set_property("phandle", cells(&[phandle]));
    node.set_property("#iommu-cells", cells(&[1]));
    let host_bridges = tree.find_compatible("pci-host-ecam-generic");
    if host_bridges.is_empty() {
        return Err(dt_error("no pci-host-ecam-generic host bridge".into()));
    }
    for bridge in &host_bridges {
        let node = tree
            .node_mut(bridge)
            .ok_or_else(|| dt_error(format!("{bridge} vanished")))?;
        node.set_property("iommu-map", cells(&[0, phandle, 0, 0x1_0000]));
        node.remove_property("iommu-map-mask");
    }
    Ok(MmioIommuNode {
        path,
        phandle,
        base,
        host_bridges,
    })
}

/// Refuses combinations the mmio IOMMU cannot serve: [`IommuKind::Mmio`] is QEMU's own device,
/// so not with `VIOMMU_DEVICE=ours` (our device is a virtio-pci function).
///
/// # Errors
/// [`Error::InvalidEnv`] (`VIOMMU_IOMMU`) for `mmio` with [`DeviceChoice::Ours`].
pub fn check_iommu_kind(config: &RunConfig) -> Result<()> {
    if config.iommu == IommuKind::Mmio && config.device == DeviceChoice::Ours {
        return Err(Error::InvalidEnv {
            name: IOMMU_ENV,
            reason: "`mmio` is QEMU's own virtio-iommu-device; VIOMMU_DEVICE=ours serves our \
                     device as a virtio-pci function"
                .into(),
        });
    }
    Ok(())
}

/// Finishes a boot's command line for [`IommuKind::Mmio`] (`args` from [`qemu_args`] for
/// `config`, which already name [`MMIO_IOMMU_DEVICE`]): refuses a PCI slot for the IOMMU
/// (`config.iommu_addr`), checks the QEMU version, adds [`FORCE_MODERN`], finds
/// the transport the IOMMU took ([`query_qtree`]), dumps QEMU's tree for the same command line,
/// describes the IOMMU in it ([`describe_mmio_iommu`]), writes it to
/// `target/dtb/mmio-iommu-<sha256>.dtb` and appends `-dtb` with that file. Prints one
/// `runner:` line saying what it did. A `-dtb` already in `args` (from `VIOMMU_QEMU_ARGS`) is
/// kept as the only tree: the runner then adds nothing but [`FORCE_MODERN`].
///
/// # Errors
/// [`Error::InvalidEnv`] (`VIOMMU_IOMMU_ADDR`) when `config.iommu_addr` is set; those of the
/// steps; [`Error::Devicetree`] when QEMU's `info qtree` shows no `virtio-iommu-device` on a
/// virtio-mmio transport.
pub fn mmio_boot_args(
    config: &RunConfig,
    qemu: &Path,
    mut args: Vec<String>,
) -> Result<Vec<String>> {
    if let Some(addr) = &config.iommu_addr {
        return Err(Error::InvalidEnv {
            name: "VIOMMU_IOMMU_ADDR",
            reason: format!("`{addr}`: the virtio-mmio IOMMU ({IOMMU_ENV}=mmio) has no PCI slot"),
        });
    }
    check_qemu_version(qemu)?;
    args.extend(FORCE_MODERN.iter().map(|s| s.to_string()));
    if args.iter().any(|a| a == "-dtb") {
        println!(
            "runner: -dtb given (VIOMMU_QEMU_ARGS): the IOMMU's virtio-mmio node is not added"
        );
        return Ok(args);
    }
    let qtree = query_qtree(qemu, &args)?;
    let base = iommu_transport_base(&qtree).ok_or_else(|| Error::Devicetree {
        reason: "QEMU's info qtree shows no virtio-iommu-device on a virtio-mmio transport".into(),
    })?;
    let blob = devicetree::dump(qemu, &args)?;
    let mut tree = DeviceTree::parse(&blob)?;
    let node = describe_mmio_iommu(&mut tree, base)?;
    let dtb = tree.to_dtb()?;
    let dir = target_dir().join("dtb");
    io_context(fs::create_dir_all(&dir), || {
        format!("cannot create {}", dir.display())
    })?;
    let digest = hex(&Sha256::digest(&dtb));
    let file = dir.join(format!("mmio-iommu-{}.dtb", &digest[..16]));
    // Same contents ⇒ same name: parallel runs may write it at once, each through its own
    // temporary file renamed into place.
    let temporary = dir.join(format!(
        "mmio-iommu-{}.{}.tmp",
        &digest[..16],
        std::process::id()
    ));
    io_context(fs::write(&temporary, &dtb), || {
        format!("cannot write {}", temporary.display())
    })?;
    io_context(fs::rename(&temporary, &file), || {
        format!("cannot rename {} into place", temporary.display())
    })?;
    println!(
        "runner: virtio-iommu-device on the virtio-mmio transport at {:#x} (info qtree): {} given \
         #iommu-cells and phandle {:#x}, iommu-map on {}; -dtb {}",
        node.base,
        node.path,
        node.phandle,
        node.host_bridges.join(", "),
        file.display()
    );
    args.push("-dtb".into());
    args.push(file.to_string_lossy().into_owned());
    Ok(args)
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devicetree::{string_list, Node};

    /// The relevant part of QEMU 11.1.3's `info qtree` with `-device virtio-iommu-device,…`.
    const QTREE: &str = r#"bus: main-system-bus
  type System
  dev: virtio-mmio, id ""
    gpio-out "sysbus-irq" 1
    format_transport_address = true
    force-legacy = false
    ioeventfd = true
    mmio 000000000a003e00/0000000000000200
    bus: virtio-mmio-bus.31
      type virtio-mmio-bus
      dev: virtio-iommu-device, id ""
        granule = 4k
  dev: virtio-mmio, id ""
    mmio 000000000a003c00/0000000000000200
    bus: virtio-mmio-bus.30
      type virtio-mmio-bus
"#;

    #[test]
    fn transport_from_qtree() {
        assert_eq!(iommu_transport_base(QTREE), Some(0x0a00_3e00));
        // Another device first: the IOMMU's own transport is the one taken.
        let two = QTREE.replace(
            "dev: virtio-iommu-device",
            "dev: virtio-rng-device, id \"\"\n  dev: virtio-mmio, id \"\"\n    mmio 000000000a003a00/0000000000000200\n      dev: virtio-iommu-device",
        );
        assert_eq!(iommu_transport_base(&two), Some(0x0a00_3a00));
        // virtio-iommu-pci only, or a virtio-iommu-device not on a virtio-mmio transport.
        assert_eq!(
            iommu_transport_base("  dev: virtio-iommu-pci, id \"\"\n"),
            None
        );
        let orphan = "  dev: pl061, id \"\"\n    mmio 0000000009030000/0000000000001000\n  dev: virtio-iommu-device, id \"\"\n";
        assert_eq!(iommu_transport_base(orphan), None);
    }

    #[test]
    fn a_pci_slot_for_the_mmio_iommu_is_refused_before_qemu_runs() {
        let config = RunConfig {
            iommu: IommuKind::Mmio,
            iommu_addr: Some("0x5".into()),
            ..RunConfig::default()
        };
        let args = vec!["-M".to_string(), "virt".to_string()];
        // No QEMU at this path: the refusal comes first.
        match mmio_boot_args(&config, Path::new("/nonexistent/qemu"), args) {
            Err(Error::InvalidEnv { name, reason }) => {
                assert_eq!(name, "VIOMMU_IOMMU_ADDR");
                assert!(reason.contains("0x5"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mmio_is_refused_with_our_device() {
        let mut config = RunConfig {
            iommu: IommuKind::Mmio,
            device: DeviceChoice::Ours,
            ..RunConfig::default()
        };
        assert!(matches!(
            check_iommu_kind(&config),
            Err(Error::InvalidEnv {
                name: IOMMU_ENV,
                ..
            })
        ));
        config.device = DeviceChoice::Qemu;
        assert!(check_iommu_kind(&config).is_ok());
        config.iommu = IommuKind::Pci;
        config.device = DeviceChoice::Ours;
        assert!(check_iommu_kind(&config).is_ok());
    }

    #[test]
    fn versions() {
        let v = "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-2~bpo13+1)\nCopyright";
        assert_eq!(parse_qemu_version(v), Some((11, 1)));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian)"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("no version here"), None);
        assert!(Some((10, 0)) < Some(MMIO_IOMMU_MIN_QEMU));
        assert!((12, 0) >= MMIO_IOMMU_MIN_QEMU);
    }

    #[test]
    fn env_values() {
        assert_eq!(IommuKind::parse(None).unwrap(), IommuKind::Pci);
        assert_eq!(IommuKind::parse(Some("")).unwrap(), IommuKind::Pci);
        assert_eq!(IommuKind::parse(Some("pci")).unwrap(), IommuKind::Pci);
        assert_eq!(IommuKind::parse(Some(" mmio ")).unwrap(), IommuKind::Mmio);
        assert!(matches!(
            IommuKind::parse(Some("virtio-mmio")),
            Err(Error::InvalidEnv {
                name: IOMMU_ENV,
                ..
            })
        ));
        assert_eq!(
            IommuKind::Mmio.qemu_choice(QemuChoice::System),
            QemuChoice::Debian111
        );
        assert_eq!(
            IommuKind::Mmio.qemu_choice(QemuChoice::Debian72),
            QemuChoice::Debian72,
            "an explicit choice is kept (and refused at boot)"
        );
        assert_eq!(
            IommuKind::Pci.qemu_choice(QemuChoice::System),
            QemuChoice::System
        );
        let addr = String::from("0x5");
        assert_eq!(
            IommuKind::Pci.qemu_device(Some(&addr)),
            "virtio-iommu-pci,addr=0x5"
        );
        assert_eq!(IommuKind::Mmio.qemu_device(Some(&addr)), MMIO_IOMMU_DEVICE);
    }

    /// A tree shaped like QEMU's: root with 2/2 cells, two transports, one host bridge.
    fn qemu_like() -> DeviceTree {
        let mut root = Node::new("");
        root.set_property("#address-cells", cells(&[2]));
        root.set_property("#size-cells", cells(&[2]));
        for base in [0x0a00_3c00u32, 0x0a00_3e00] {
            let mut n = Node::new(format!("virtio_mmio@{base:x}"));
            n.set_property("compatible", string_list(&["virtio,mmio"]));
            n.set_property("reg", cells(&[0, base, 0, 0x200]));
            root.children.push(n);
        }
        let mut pcie = Node::new("pcie@10000000");
        pcie.set_property("compatible", string_list(&["pci-host-ecam-generic"]));
        pcie.set_property("device_type", string_list(&["pci"]));
        pcie.set_property("#address-cells", cells(&[3]));
        pcie.set_property("#size-cells", cells(&[2]));
        pcie.set_property("reg", cells(&[0x40, 0, 0, 0x1000_0000]));
        pcie.set_property("bus-range", cells(&[0, 0xff]));
        pcie.set_property("iommu-map-mask", cells(&[0xff]));
        root.children.push(pcie);
        let mut intc = Node::new("intc@8000000");
        intc.set_property("phandle", cells(&[0x8002]));
        root.children.push(intc);
        DeviceTree {
            root,
            ..DeviceTree::default()
        }
    }

    #[test]
    fn describes_the_right_transport() {
        let mut tree = qemu_like();
        let node = describe_mmio_iommu(&mut tree, 0x0a00_3e00).unwrap();
        assert_eq!(node.path, "/virtio_mmio@a003e00");
        assert_eq!(node.phandle, 0x8003, "one above the largest phandle in use");
        assert_eq!(node.host_bridges, ["/pcie@10000000"]);
        let iommu = tree.node("/virtio_mmio@a003e00").unwrap();
        assert_eq!(iommu.u32_cells("#iommu-cells").unwrap(), [1]);
        assert_eq!(iommu.u32_cells("phandle").unwrap(), [0x8003]);
        let other = tree.node("/virtio_mmio@a003c00").unwrap();
        assert!(
            other.property("#iommu-cells").is_none(),
            "only the IOMMU's transport"
        );
        let pcie = tree.node("/pcie@10000000").unwrap();
        assert_eq!(
            pcie.u32_cells("iommu-map").unwrap(),
            [0, 0x8003, 0, 0x1_0000]
        );
        assert!(pcie.property("iommu-map-mask").is_none());
        // The driver's topology reads it back as one virtio-mmio IOMMU serving RID 0x10 as
        // endpoint 0x10.
        let dtb = tree.to_dtb().unwrap();
        let topology = virtio_iommu_driver::topology::Topology::from_dtb(&dtb).unwrap();
        assert_eq!(topology.iommus.len(), 1);
        assert_eq!(
            topology.iommus[0].location,
            virtio_iommu_driver::topology::IommuLocation::Mmio {
                base: 0x0a00_3e00,
                size: 0x200
            }
        );
        let ep = topology.pci_endpoint(0, 0x10).unwrap().unwrap();
        assert_eq!((ep.iommu, ep.endpoint_id), (0, 0x10));
    }

    #[test]
    fn keeps_an_existing_phandle_and_refuses_a_missing_transport() {
        let mut tree = qemu_like();
        tree.node_mut("/virtio_mmio@a003e00")
            .unwrap()
            .set_property("phandle", cells(&[0x42]));
        assert_eq!(
            describe_mmio_iommu(&mut tree, 0x0a00_3e00).unwrap().phandle,
            0x42
        );
        let mut tree = qemu_like();
        assert!(matches!(
            describe_mmio_iommu(&mut tree, 0x0a00_0000),
            Err(Error::Devicetree { .. })
        ));
        let mut tree = qemu_like();
        tree.root.remove_child("pcie@10000000");
        assert!(matches!(
            describe_mmio_iommu(&mut tree, 0x0a00_3e00),
            Err(Error::Devicetree { .. })
        ));
    }
}
