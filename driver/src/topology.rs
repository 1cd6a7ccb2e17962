//! Topology discovery: which virtio-iommu translates which DMA requester, from the devicetree
//! (this module) or from the ACPI VIOT and MCFG ([`viot`], on the table helpers of [`acpi`]);
//! both give the same [`Topology`].
//!
//! Bindings implemented (Linux `Documentation/devicetree/bindings/`):
//! - `virtio/iommu.yaml`: a virtio-iommu that is a PCI function has a node with
//!   `compatible = "virtio,pci-iommu"` under its PCI host bridge, `reg` in PCI address form
//!   (`phys.hi` = BDF << 8) and `#iommu-cells = <1>`. A virtio-mmio virtio-iommu is a
//!   `virtio,mmio` node with `#iommu-cells = <1>`.
//! - `pci/pci-iommu.txt`: a host bridge's `iommu-map = <rid-base iommu-phandle iommu-base length>*`
//!   and `iommu-map-mask` turn a PCI requester ID into (IOMMU, endpoint ID).
//! - `iommu/iommu.txt`: a platform device's `iommus = <phandle endpoint-id>*`.
//!
//! Nothing here panics on a malformed devicetree: every property is length-checked and
//! errors are reported as [`TopologyError`].
//!
//! # Untrusted DTBs and the `fdt` crate
//!
//! `fdt` 0.1.5 itself panics (slice indexing, `unwrap`, `assert_eq!`) while walking a
//! *structurally* malformed blob: a property length running past the structure block, a name
//! offset outside the strings block, a non-UTF-8 node or property name, unbalanced
//! `FDT_BEGIN_NODE`/`FDT_END_NODE`, an `FDT_NOP` between properties, and so on. It only checks
//! the magic and `totalsize` in [`Fdt::new`]. So [`Devicetree::new`] (and [`validated_fdt`],
//! used by [`Topology::from_dtb`]) first checks the whole structure block itself and only then
//! hands the blob to `fdt`. Functions that take an already-built [`Fdt`] ([`Topology::from_fdt`],
//! [`Topology::platform_endpoints`]) cannot re-check it (`Fdt` does not expose its bytes):
//! build that `Fdt` with [`Devicetree::new`] or [`validated_fdt`] when the blob is not trusted.
//!
//! `FDT_NOP` tokens are allowed anywhere by the specification, but `fdt` 0.1.5 loses nodes when
//! one sits between properties or between nested `FDT_END_NODE`s, so the check accepts them only
//! before an `FDT_END_NODE`, `FDT_END` or the root. A tree that may hold others (QEMU's `-dtb`
//! path leaves dozens) goes through [`remove_nops`] first, which compacts it in place.
//!
//! # Validate once, look up many times
//!
//! PCI lookups ([`Topology::pci_endpoint`]) need only the [`Topology`]. Platform (virtio-mmio)
//! devices are looked up in the devicetree itself ([`Topology::platform_endpoints`]), so keep
//! the checked tree: [`Devicetree::new`] validates the blob once, [`Topology::from_devicetree`]
//! builds the topology from it, and the same [`Devicetree`] serves every later lookup.
//!
//! # Which host bridge
//!
//! [`Topology::pci_endpoint`] takes the host bridge as an index into
//! [`Topology::host_bridges`], which lists the ECAM host bridges in devicetree order (the
//! first `pci-host-ecam-generic` node found depth-first is 0). An embedder that knows its
//! bridge by the ECAM base address it enumerates through, or by its node path, gets the index
//! from [`Topology::host_bridge_at`] or [`Topology::host_bridge_by_path`].

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use fdt::node::FdtNode;
use fdt::Fdt;

pub use alias::{AliasGroup, RequesterIds};

pub mod acpi;
pub mod alias;
pub mod reserved;
pub mod viot;

/// Why the devicetree could not be read as a topology, or a lookup in it failed.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TopologyError {
    /// The DTB header or structure is invalid (the `fdt` crate refused it).
    InvalidFdt,
    /// A property has a length that is not a whole number of its entries, or is missing a
    /// required cell. `property` names it (for example `"iommu-map"`).
    MalformedProperty {
        /// The property's name.
        property: &'static str,
    },
    /// A phandle in `iommu-map` or `iommus` names no virtio-iommu of the [`Topology`] (no node
    /// at all, or a node that is not a virtio-iommu).
    UnknownPhandle(u32),
    /// `#address-cells`/`#size-cells`/`#iommu-cells` have a value this code does not handle
    /// (for example `#iommu-cells` other than 1 on a virtio-iommu).
    UnsupportedCells {
        /// The property's name.
        property: &'static str,
        /// Its value.
        value: u32,
    },
    /// [`Topology::platform_endpoints`]: no node has the given path (distinct from a node
    /// that exists but has no `iommus`, which is `Ok` with no endpoints).
    NoSuchNode,
    /// [`Topology::pci_endpoint`]: the host bridge index is not below
    /// `host_bridges.len()`; the value is the index given.
    NoSuchHostBridge(usize),
    /// A `memory-region` or `iommu-addresses` phandle names no node
    /// ([`reserved::devicetree_regions`]).
    UnknownMemoryRegion(u32),
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidFdt => write!(f, "devicetree blob has an invalid header or structure"),
            Self::MalformedProperty { property } => {
                write!(
                    f,
                    "devicetree property `{property}` is missing or has a bad length or value"
                )
            }
            Self::UnknownPhandle(phandle) => {
                write!(
                    f,
                    "phandle {phandle:#x} names no virtio-iommu of the devicetree"
                )
            }
            Self::UnsupportedCells { property, value } => {
                write!(f, "unsupported `{property}` = <{value}>")
            }
            Self::NoSuchNode => write!(f, "no devicetree node has that path"),
            Self::NoSuchHostBridge(index) => {
                write!(f, "no ECAM PCI host bridge with index {index}")
            }
            Self::UnknownMemoryRegion(phandle) => {
                write!(f, "reserved-memory phandle {phandle:#x} names no node")
            }
        }
    }
}

impl core::error::Error for TopologyError {}

/// A devicetree blob checked once by [`validated_fdt`], safe for `fdt` 0.1.5 to walk.
///
/// Dereferences to the parsed [`Fdt`], so it can be passed wherever an `&Fdt` is expected
/// ([`Topology::from_fdt`], [`Topology::platform_endpoints`]) without checking the blob again.
#[derive(Clone, Copy, Debug)]
pub struct Devicetree<'a> {
    fdt: Fdt<'a>,
}

impl<'a> Devicetree<'a> {
    /// Checks `dtb` (a flattened devicetree blob, Devicetree Specification v0.4 §5) with
    /// [`validated_fdt`] and keeps the parsed tree. The blob is borrowed, not copied.
    ///
    /// # Errors
    ///
    /// [`TopologyError::InvalidFdt`] for any header or structure problem.
    pub fn new(dtb: &'a [u8]) -> Result<Self, TopologyError> {
        Ok(Self {
            fdt: validated_fdt(dtb)?,
        })
    }

    /// The parsed tree.
    pub fn fdt(&self) -> &Fdt<'a> {
        &self.fdt
    }
}

impl<'a> core::ops::Deref for Devicetree<'a> {
    type Target = Fdt<'a>;

    fn deref(&self) -> &Fdt<'a> {
        &self.fdt
    }
}

/// Kind of a PCI address window from a host bridge's `ranges` (PCI binding `phys.hi` bits 24-25).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PciSpace {
    /// Configuration space (`ss = 0b00`), not normally in `ranges`.
    Config,
    /// I/O space (`ss = 0b01`).
    Io,
    /// 32-bit memory space (`ss = 0b10`).
    Memory32,
    /// 64-bit memory space (`ss = 0b11`).
    Memory64,
}

/// One entry of a host bridge's `ranges`: a window of PCI bus addresses and where the CPU sees it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct PciWindow {
    /// Address space of the window.
    pub space: PciSpace,
    /// `phys.hi` bit 30: prefetchable.
    pub prefetchable: bool,
    /// First PCI bus address of the window (bytes).
    pub pci_address: u64,
    /// CPU physical address that `pci_address` appears at (bytes).
    pub cpu_address: u64,
    /// Size of the window in bytes.
    pub size: u64,
}

/// One `iommu-map` entry: requester IDs `rid_base..rid_base + length` (exclusive end) map to
/// endpoint IDs `endpoint_base..endpoint_base + length` of the IOMMU `iommu_phandle`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct IommuMapEntry {
    /// First requester ID (after masking with `iommu-map-mask`) covered by the entry.
    pub rid_base: u32,
    /// Phandle of the IOMMU node.
    pub iommu_phandle: u32,
    /// Endpoint ID that `rid_base` translates to.
    pub endpoint_base: u32,
    /// Number of requester IDs covered.
    pub length: u32,
}

/// A PCI host bridge with ECAM (`pci-host-ecam-generic`), as described in the devicetree.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PciHostBridge {
    /// Full path of the node, for messages (for example `/pcie@10000000`).
    pub path: alloc::string::String,
    /// CPU physical address of the ECAM region (bytes), from `reg`.
    pub ecam_base: u64,
    /// Size of the ECAM region in bytes, from `reg`.
    pub ecam_size: u64,
    /// First bus number, from `bus-range` (0 when absent).
    pub bus_start: u8,
    /// Last bus number, inclusive, from `bus-range` (clamped to what `ecam_size` covers).
    pub bus_end: u8,
    /// The `ranges` windows.
    pub windows: Vec<PciWindow>,
    /// The `iommu-map` entries, in devicetree order (empty when the property is absent).
    pub iommu_map: Vec<IommuMapEntry>,
    /// `iommu-map-mask`, or `0xffff_ffff` when absent.
    pub iommu_map_mask: u32,
}

/// Where a virtio-iommu sits.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum IommuLocation {
    /// A PCI function (`virtio,pci-iommu`) under host bridge `host_bridge` (an index into
    /// [`Topology::host_bridges`]) with this requester ID (`bus << 8 | device << 3 | function`,
    /// from `reg`'s `phys.hi` bits 8-23).
    Pci {
        /// Index into [`Topology::host_bridges`].
        host_bridge: usize,
        /// PCI requester ID of the IOMMU function.
        requester_id: u16,
    },
    /// A virtio-mmio device at `base` (CPU physical address, bytes) of `size` bytes.
    Mmio {
        /// Register base.
        base: u64,
        /// Register window size in bytes.
        size: u64,
    },
}

/// A virtio-iommu found in the devicetree.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct VirtioIommuNode {
    /// Full path of the node.
    pub path: alloc::string::String,
    /// The node's phandle (what `iommu-map` and `iommus` refer to).
    pub phandle: u32,
    /// Where the device is.
    pub location: IommuLocation,
}

/// An endpoint: the IOMMU that translates a requester's DMA and the endpoint ID it knows it by.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Endpoint {
    /// Index into [`Topology::iommus`].
    pub iommu: usize,
    /// Endpoint ID as used in ATTACH/DETACH/PROBE requests and fault events.
    pub endpoint_id: u32,
}

/// A platform (MMIO) device behind a virtio-iommu, as the ACPI VIOT lists them.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct MmioEndpoint {
    /// Physical base address of the device's registers (bytes).
    pub base: u64,
    /// Its IOMMU and endpoint ID.
    pub endpoint: Endpoint,
}

/// Every virtio-iommu and PCI host bridge of a devicetree ([`Topology::from_dtb`]) or of the
/// ACPI VIOT and MCFG ([`Topology::from_viot`]).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Topology {
    /// The virtio-iommus, in devicetree (or VIOT) order.
    pub iommus: Vec<VirtioIommuNode>,
    /// The ECAM PCI host bridges, in devicetree (or MCFG) order.
    pub host_bridges: Vec<PciHostBridge>,
    /// The MMIO endpoints of the VIOT (ACPI 6.5 §5.2.32.3), in table order. Always empty for a
    /// devicetree: there a platform device names its IOMMU in its own node, read with
    /// [`Topology::platform_endpoints`].
    pub mmio_endpoints: Vec<MmioEndpoint>,
}

/// Deepest node nesting accepted, counting the root as depth 1. Bounds the recursion of this
/// module's walk and of `fdt`'s own subtree skipping (which recurses once per level).
const MAX_DEPTH: usize = 64;

/// Bytes of ECAM configuration space per bus number: 32 devices × 8 functions × 4 KiB
/// (PCI Express Base Specification, "Enhanced Configuration Access Mechanism").
const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Flattened devicetree magic and structure-block tokens (Devicetree Specification v0.4 §5).
const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_HEADER_SIZE: usize = 40;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Cursor over a property value made of big-endian 32-bit cells.
///
/// Every read is length-checked: running out of data gives
/// [`TopologyError::MalformedProperty`] naming `property`.
struct Cells<'a> {
    bytes: &'a [u8],
    property: &'static str,
}

impl<'a> Cells<'a> {
    fn new(bytes: &'a [u8], property: &'static str) -> Self {
        Self { bytes, property }
    }

    fn malformed(&self) -> TopologyError {
        TopologyError::MalformedProperty {
            property: self.property,
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Next cell.
    fn u32(&mut self) -> Result<u32, TopologyError> {
        let bytes: &'a [u8] = self.bytes;
        let (cell, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| self.malformed())?;
        self.bytes = rest;
        Ok(u32::from_be_bytes(*cell))
    }

    /// Next `count` cells as one number, most significant cell first. `count` is at most 2
    /// (callers check `#address-cells`/`#size-cells` first); a larger `count` is reported as
    /// malformed rather than silently truncated.
    fn number(&mut self, count: u32) -> Result<u64, TopologyError> {
        if count > 2 {
            return Err(self.malformed());
        }
        let mut value = 0u64;
        for _ in 0..count {
            value = (value << 32) | u64::from(self.u32()?);
        }
        Ok(value)
    }
}

/// A property that holds exactly one cell (`#address-cells`, `phandle`, ...): `Ok(None)` when
/// absent, `MalformedProperty` when its length is not 4 bytes.
fn single_cell(node: FdtNode<'_, '_>, name: &'static str) -> Result<Option<u32>, TopologyError> {
    match node.property(name) {
        None => Ok(None),
        Some(prop) if prop.value.len() == 4 => Cells::new(prop.value, name).u32().map(Some),
        Some(_) => Err(TopologyError::MalformedProperty { property: name }),
    }
}

/// `(#address-cells, #size-cells)` that `node` declares for its children, with the
/// Devicetree Specification defaults (2 and 1) for absent properties.
fn child_cells(node: FdtNode<'_, '_>) -> Result<(u32, u32), TopologyError> {
    Ok((
        single_cell(node, "#address-cells")?.unwrap_or(2),
        single_cell(node, "#size-cells")?.unwrap_or(1),
    ))
}

/// Like [`child_cells`], for a node whose children's addresses are CPU physical addresses:
/// both counts must be at most 2 (64 bits), else `UnsupportedCells`.
fn cpu_cells(node: FdtNode<'_, '_>) -> Result<(u32, u32), TopologyError> {
    let (address, size) = child_cells(node)?;
    if address > 2 {
        return Err(TopologyError::UnsupportedCells {
            property: "#address-cells",
            value: address,
        });
    }
    if size > 2 {
        return Err(TopologyError::UnsupportedCells {
            property: "#size-cells",
            value: size,
        });
    }
    Ok((address, size))
}

/// Whether one of the NUL-separated strings of `node`'s `compatible` is exactly `want`.
/// Compared as bytes, so a non-UTF-8 `compatible` is simply not matched.
fn is_compatible(node: FdtNode<'_, '_>, want: &str) -> bool {
    node.property("compatible")
        .is_some_and(|prop| prop.value.split(|&b| b == 0).any(|s| s == want.as_bytes()))
}

/// `phandle` (or the legacy `linux,phandle`) of `node`, 0 when it has neither.
fn phandle_of(node: FdtNode<'_, '_>) -> Result<u32, TopologyError> {
    match single_cell(node, "phandle")? {
        Some(phandle) => Ok(phandle),
        None => Ok(single_cell(node, "linux,phandle")?.unwrap_or(0)),
    }
}

/// Checks a virtio-iommu's `#iommu-cells`: required, and must be 1 (`virtio/iommu.yaml`).
fn check_iommu_cells(node: FdtNode<'_, '_>) -> Result<(), TopologyError> {
    match single_cell(node, "#iommu-cells")? {
        Some(1) => Ok(()),
        Some(value) => Err(TopologyError::UnsupportedCells {
            property: "#iommu-cells",
            value,
        }),
        None => Err(TopologyError::MalformedProperty {
            property: "#iommu-cells",
        }),
    }
}

/// First `(address, size)` entry of `node`'s `reg`, in `parent`'s CPU address cells.
/// Further entries are ignored. Missing or truncated `reg` ⇒ `MalformedProperty("reg")`.
fn first_reg(node: FdtNode<'_, '_>, parent: FdtNode<'_, '_>) -> Result<(u64, u64), TopologyError> {
    let (address_cells, size_cells) = cpu_cells(parent)?;
    let reg = node
        .property("reg")
        .ok_or(TopologyError::MalformedProperty { property: "reg" })?;
    let mut cells = Cells::new(reg.value, "reg");
    let address = cells.number(address_cells)?;
    let size = cells.number(size_cells)?;
    Ok((address, size))
}

/// Parses a `pci-host-ecam-generic` node (`pci/host-generic-pci.yaml`, `pci/pci-iommu.txt`).
fn parse_host_bridge(
    node: FdtNode<'_, '_>,
    parent: FdtNode<'_, '_>,
    path: &str,
) -> Result<PciHostBridge, TopologyError> {
    let malformed = |property| TopologyError::MalformedProperty { property };

    let (ecam_base, ecam_size) = first_reg(node, parent)?;
    // The region must not wrap around the address space and must hold at least one bus.
    if ecam_size
        .checked_sub(1)
        .is_some_and(|last| ecam_base.checked_add(last).is_none())
    {
        return Err(malformed("reg"));
    }
    let buses = ecam_size / ECAM_BUS_SIZE;
    if buses == 0 {
        return Err(malformed("reg"));
    }

    let (bus_start, bus_end) = match node.property("bus-range") {
        None => (0u8, u8::MAX),
        Some(prop) => {
            if prop.value.len() != 8 {
                return Err(malformed("bus-range"));
            }
            let mut cells = Cells::new(prop.value, "bus-range");
            let start = u8::try_from(cells.u32()?).map_err(|_| malformed("bus-range"))?;
            let end = u8::try_from(cells.u32()?).map_err(|_| malformed("bus-range"))?;
            if start > end {
                return Err(malformed("bus-range"));
            }
            (start, end)
        }
    };
    // Last bus the ECAM region covers; `buses` >= 1 and < 2^44, so this cannot overflow.
    let last_covered = u64::from(bus_start).saturating_add(buses - 1);
    let bus_end = if u64::from(bus_end) > last_covered {
        u8::try_from(last_covered).map_err(|_| malformed("bus-range"))?
    } else {
        bus_end
    };

    let mut windows = Vec::new();
    if let Some(prop) = node.property("ranges") {
        let (child_address_cells, child_size_cells) = child_cells(node)?;
        if child_address_cells != 3 {
            return Err(TopologyError::UnsupportedCells {
                property: "#address-cells",
                value: child_address_cells,
            });
        }
        if child_size_cells > 2 {
            return Err(TopologyError::UnsupportedCells {
                property: "#size-cells",
                value: child_size_cells,
            });
        }
        let (parent_address_cells, _) = cpu_cells(parent)?;
        // At most 3 + 2 + 2 cells, so no overflow.
        let entry_bytes = (3 + parent_address_cells + child_size_cells) as usize * 4;
        if prop.value.len() % entry_bytes != 0 {
            return Err(malformed("ranges"));
        }
        let mut cells = Cells::new(prop.value, "ranges");
        while !cells.is_empty() {
            let phys_hi = cells.u32()?;
            let pci_address = cells.number(2)?;
            let cpu_address = cells.number(parent_address_cells)?;
            let size = cells.number(child_size_cells)?;
            let space = match (phys_hi >> 24) & 0b11 {
                0 => PciSpace::Config,
                1 => PciSpace::Io,
                2 => PciSpace::Memory32,
                _ => PciSpace::Memory64,
            };
            windows.push(PciWindow {
                space,
                prefetchable: phys_hi & (1 << 30) != 0,
                pci_address,
                cpu_address,
                size,
            });
        }
    }

    let mut iommu_map = Vec::new();
    if let Some(prop) = node.property("iommu-map") {
        if prop.value.len() % 16 != 0 {
            return Err(malformed("iommu-map"));
        }
        let mut cells = Cells::new(prop.value, "iommu-map");
        while !cells.is_empty() {
            iommu_map.push(IommuMapEntry {
                rid_base: cells.u32()?,
                iommu_phandle: cells.u32()?,
                endpoint_base: cells.u32()?,
                length: cells.u32()?,
            });
        }
    }
    let iommu_map_mask = single_cell(node, "iommu-map-mask")?.unwrap_or(u32::MAX);

    Ok(PciHostBridge {
        path: String::from(path),
        ecam_base,
        ecam_size,
        bus_start,
        bus_end,
        windows,
        iommu_map,
        iommu_map_mask,
    })
}

/// Requester ID of a `virtio,pci-iommu` node: `reg`'s `phys.hi` bits 8..=23
/// (`bus << 8 | device << 3 | function`), with `parent`'s cells (3 address cells required).
fn pci_iommu_requester_id(
    node: FdtNode<'_, '_>,
    parent: FdtNode<'_, '_>,
) -> Result<u16, TopologyError> {
    let (address_cells, size_cells) = child_cells(parent)?;
    if address_cells != 3 {
        return Err(TopologyError::UnsupportedCells {
            property: "#address-cells",
            value: address_cells,
        });
    }
    if size_cells > 2 {
        return Err(TopologyError::UnsupportedCells {
            property: "#size-cells",
            value: size_cells,
        });
    }
    let reg = node
        .property("reg")
        .ok_or(TopologyError::MalformedProperty { property: "reg" })?;
    let mut cells = Cells::new(reg.value, "reg");
    let phys_hi = cells.u32()?;
    // The whole first entry must be present even though only phys.hi is used.
    cells.number(2)?;
    cells.number(size_cells)?;
    // Truncation to bits 8..=23 is the point.
    Ok((phys_hi >> 8) as u16)
}

/// Depth-first walk that fills a [`Topology`] and keeps the current node's path.
struct Walker {
    topology: Topology,
    path: String,
}

impl Walker {
    /// Visits `node` (at `depth`, root = 1) and its subtree. `bridge` is the index of the
    /// nearest enclosing ECAM host bridge, if any.
    fn walk(
        &mut self,
        node: FdtNode<'_, '_>,
        parent: Option<FdtNode<'_, '_>>,
        depth: usize,
        bridge: Option<usize>,
    ) -> Result<(), TopologyError> {
        if depth > MAX_DEPTH {
            return Err(TopologyError::InvalidFdt);
        }
        let mut child_bridge = bridge;
        // The root describes the machine, not a device: never classified.
        if let Some(parent) = parent {
            if is_compatible(node, "pci-host-ecam-generic") {
                let host_bridge = parse_host_bridge(node, parent, &self.path)?;
                child_bridge = Some(self.topology.host_bridges.len());
                self.topology.host_bridges.push(host_bridge);
            } else if is_compatible(node, "virtio,pci-iommu") {
                if let Some(host_bridge) = bridge {
                    check_iommu_cells(node)?;
                    let requester_id = pci_iommu_requester_id(node, parent)?;
                    self.push_iommu(
                        node,
                        IommuLocation::Pci {
                            host_bridge,
                            requester_id,
                        },
                    )?;
                } else {
                    log::warn!(
                        "{}: virtio,pci-iommu outside any ECAM PCI host bridge, ignored",
                        self.path
                    );
                }
            } else if is_compatible(node, "virtio,mmio") && node.property("#iommu-cells").is_some()
            {
                check_iommu_cells(node)?;
                let (base, size) = first_reg(node, parent)?;
                self.push_iommu(node, IommuLocation::Mmio { base, size })?;
            }
        }

        for child in node.children() {
            let parent_len = self.path.len();
            if parent_len > 1 {
                self.path.push('/');
            }
            self.path.push_str(child.name);
            self.walk(child, Some(node), depth.saturating_add(1), child_bridge)?;
            self.path.truncate(parent_len);
        }
        Ok(())
    }

    fn push_iommu(
        &mut self,
        node: FdtNode<'_, '_>,
        location: IommuLocation,
    ) -> Result<(), TopologyError> {
        let phandle = phandle_of(node)?;
        self.topology.iommus.push(VirtioIommuNode {
            path: self.path.clone(),
            phandle,
            location,
        });
        Ok(())
    }
}

/// Reads the big-endian `u32` at byte `offset` of `bytes`, `None` past the end.
fn be_u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let chunk = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes(chunk.try_into().ok()?))
}

/// `len` rounded up to a multiple of 4 (FDT structure-block padding).
fn align4(len: usize) -> Option<usize> {
    Some(len.checked_add(3)? & !3)
}

/// Cursor over the structure block for [`check_structure`]; every failure is `InvalidFdt`.
struct StructCursor<'a> {
    rest: &'a [u8],
}

impl<'a> StructCursor<'a> {
    fn peek(&self) -> Result<u32, TopologyError> {
        be_u32_at(self.rest, 0).ok_or(TopologyError::InvalidFdt)
    }

    fn skip(&mut self, len: usize) -> Result<(), TopologyError> {
        self.rest = self.rest.get(len..).ok_or(TopologyError::InvalidFdt)?;
        Ok(())
    }

    /// Consumes an `FDT_BEGIN_NODE` token, its NUL-terminated name (UTF-8 required: `fdt`
    /// unwraps it) and the padding; returns the name's length in bytes.
    fn begin_node(&mut self) -> Result<usize, TopologyError> {
        self.skip(4)?;
        let name_len = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(TopologyError::InvalidFdt)?;
        let name = self.rest.get(..name_len).ok_or(TopologyError::InvalidFdt)?;
        core::str::from_utf8(name).map_err(|_| TopologyError::InvalidFdt)?;
        let padded = name_len
            .checked_add(1)
            .and_then(align4)
            .ok_or(TopologyError::InvalidFdt)?;
        self.skip(padded)?;
        Ok(name_len)
    }

    /// Consumes an `FDT_PROP` token, its header and padded value, checking that the value
    /// lies in the block and that the name offset gives a NUL-terminated UTF-8 string in
    /// `strings` (`fdt` slices and unwraps both).
    fn property(&mut self, strings: &[u8]) -> Result<(), TopologyError> {
        let len = be_u32_at(self.rest, 4).ok_or(TopologyError::InvalidFdt)?;
        let name_offset = be_u32_at(self.rest, 8).ok_or(TopologyError::InvalidFdt)?;
        self.skip(12)?;
        let len = usize::try_from(len).map_err(|_| TopologyError::InvalidFdt)?;
        self.skip(align4(len).ok_or(TopologyError::InvalidFdt)?)?;
        let name_offset = usize::try_from(name_offset).map_err(|_| TopologyError::InvalidFdt)?;
        let name = strings
            .get(name_offset..)
            .ok_or(TopologyError::InvalidFdt)?;
        let name_len = name
            .iter()
            .position(|&b| b == 0)
            .ok_or(TopologyError::InvalidFdt)?;
        let name = name.get(..name_len).ok_or(TopologyError::InvalidFdt)?;
        core::str::from_utf8(name).map_err(|_| TopologyError::InvalidFdt)?;
        Ok(())
    }
}

/// Where in a node the structure-block check is.
#[derive(Clone, Copy, Eq, PartialEq)]
enum Phase {
    /// After the name: properties, child nodes, `FDT_NOP` or the end may follow.
    Properties,
    /// After a child node: more children, `FDT_NOP` or the end may follow.
    Children,
    /// After an `FDT_NOP`: only more `FDT_NOP`s and the end may follow.
    Closing,
}

/// Checks a structure block so that `fdt` 0.1.5 can walk it without panicking: one root node
/// named `""`, every token known, properties before child nodes, `FDT_NOP` only before an
/// `FDT_END_NODE`/`FDT_END` or the root (where `fdt`'s node skipping tolerates it), nesting
/// at most [`MAX_DEPTH`], and `FDT_END` after the root.
fn check_structure(structs: &[u8], strings: &[u8]) -> Result<(), TopologyError> {
    let mut cursor = StructCursor { rest: structs };
    while cursor.peek()? == FDT_NOP {
        cursor.skip(4)?;
    }
    if cursor.peek()? != FDT_BEGIN_NODE || cursor.begin_node()? != 0 {
        return Err(TopologyError::InvalidFdt);
    }
    let mut depth = 1usize;
    let mut phase = Phase::Properties;
    while depth > 0 {
        match cursor.peek()? {
            FDT_PROP if phase == Phase::Properties => cursor.property(strings)?,
            FDT_BEGIN_NODE if phase != Phase::Closing => {
                depth = depth.checked_add(1).ok_or(TopologyError::InvalidFdt)?;
                if depth > MAX_DEPTH {
                    return Err(TopologyError::InvalidFdt);
                }
                cursor.begin_node()?;
                phase = Phase::Properties;
            }
            FDT_NOP => {
                cursor.skip(4)?;
                phase = Phase::Closing;
            }
            FDT_END_NODE => {
                cursor.skip(4)?;
                depth = depth.checked_sub(1).ok_or(TopologyError::InvalidFdt)?;
                phase = Phase::Children;
            }
            _ => return Err(TopologyError::InvalidFdt),
        }
    }
    loop {
        match cursor.peek()? {
            FDT_NOP => cursor.skip(4)?,
            FDT_END => return Ok(()),
            _ => return Err(TopologyError::InvalidFdt),
        }
    }
}

/// Checks a flattened devicetree blob (Devicetree Specification v0.4 §5) thoroughly enough
/// that `fdt` 0.1.5 cannot panic on it, and returns it parsed.
///
/// Checked: the header (magic, `totalsize` ≤ `dtb.len()`, structure and strings blocks inside
/// `totalsize`) and the whole structure block (see the module documentation). Property
/// *values* are not interpreted here; the topology functions check the ones they read.
/// The returned [`Fdt`] covers `dtb[..totalsize]`.
///
/// # Errors
///
/// [`TopologyError::InvalidFdt`] for any header or structure problem.
pub fn validated_fdt(dtb: &[u8]) -> Result<Fdt<'_>, TopologyError> {
    let field = |index: usize| {
        let offset = index.checked_mul(4).ok_or(TopologyError::InvalidFdt)?;
        let value = be_u32_at(dtb, offset).ok_or(TopologyError::InvalidFdt)?;
        usize::try_from(value).map_err(|_| TopologyError::InvalidFdt)
    };
    // Header fields: magic, totalsize, off_dt_struct, off_dt_strings, off_mem_rsvmap,
    // version, last_comp_version, boot_cpuid_phys, size_dt_strings, size_dt_struct.
    if be_u32_at(dtb, 0) != Some(FDT_MAGIC) {
        return Err(TopologyError::InvalidFdt);
    }
    let total_size = field(1)?;
    if total_size < FDT_HEADER_SIZE {
        return Err(TopologyError::InvalidFdt);
    }
    let blob = dtb.get(..total_size).ok_or(TopologyError::InvalidFdt)?;
    let block = |offset: usize, size: usize| {
        let end = offset.checked_add(size).ok_or(TopologyError::InvalidFdt)?;
        blob.get(offset..end).ok_or(TopologyError::InvalidFdt)
    };
    let structs = block(field(2)?, field(9)?)?;
    let strings = block(field(3)?, field(8)?)?;
    check_structure(structs, strings)?;
    Fdt::new(blob).map_err(|_| TopologyError::InvalidFdt)
}

/// Removes every `FDT_NOP` token from the structure block of `dtb`, in place, and returns how
/// many were removed (Devicetree Specification v0.4 §5.4.1: `FDT_NOP` may appear anywhere
/// between tokens and is ignored).
///
/// `fdt` 0.1.5 misparses a tree with `FDT_NOP` between properties or between nested
/// `FDT_END_NODE`s (it silently loses nodes), and [`validated_fdt`] refuses such trees; QEMU's
/// `-dtb` path leaves dozens of them between the root's children. Call this first on a blob
/// that may hold them, then [`validated_fdt`] / [`Devicetree::new`] / [`Topology::from_dtb`]
/// on the result. The tokens after each removed `FDT_NOP` move towards the start of the
/// structure block; `size_dt_struct` in the header shrinks by 4 bytes per token; the bytes
/// freed at the end of the block are zeroed; nothing outside the structure block changes. The
/// blob keeps its `totalsize`. Nothing else is checked here: validate the result.
///
/// # Errors
///
/// [`TopologyError::InvalidFdt`] when the header is not a devicetree's, the structure block
/// lies outside `totalsize` or `dtb`, or a token (or a name or property value) runs past the
/// block or is unknown. On error `dtb` may hold a partly compacted structure block that is no
/// longer a valid devicetree (an unknown token stops the walk midway): do not use it.
pub fn remove_nops(dtb: &mut [u8]) -> Result<usize, TopologyError> {
    let field = |dtb: &[u8], index: usize| {
        be_u32_at(dtb, index * 4)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or(TopologyError::InvalidFdt)
    };
    if be_u32_at(dtb, 0) != Some(FDT_MAGIC) {
        return Err(TopologyError::InvalidFdt);
    }
    let total_size = field(dtb, 1)?;
    if total_size < FDT_HEADER_SIZE || total_size > dtb.len() {
        return Err(TopologyError::InvalidFdt);
    }
    let (offset, size) = (field(dtb, 2)?, field(dtb, 9)?);
    let end = offset.checked_add(size).ok_or(TopologyError::InvalidFdt)?;
    if offset < FDT_HEADER_SIZE || end > total_size {
        return Err(TopologyError::InvalidFdt);
    }
    let structs = &mut dtb[offset..end];
    let (mut read, mut write, mut removed) = (0usize, 0usize, 0usize);
    loop {
        let token = be_u32_at(structs, read).ok_or(TopologyError::InvalidFdt)?;
        let len = match token {
            FDT_NOP => {
                read += 4;
                removed += 1;
                continue;
            }
            FDT_BEGIN_NODE => {
                let name = structs.get(read + 4..).ok_or(TopologyError::InvalidFdt)?;
                let name_len = name
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(TopologyError::InvalidFdt)?;
                name_len
                    .checked_add(1)
                    .and_then(align4)
                    .and_then(|n| n.checked_add(4))
                    .ok_or(TopologyError::InvalidFdt)?
            }
            FDT_PROP => {
                let value = be_u32_at(structs, read + 4).ok_or(TopologyError::InvalidFdt)?;
                usize::try_from(value)
                    .ok()
                    .and_then(align4)
                    .and_then(|n| n.checked_add(12))
                    .ok_or(TopologyError::InvalidFdt)?
            }
            FDT_END_NODE | FDT_END => 4,
            _ => return Err(TopologyError::InvalidFdt),
        };
        let token_end = read.checked_add(len).ok_or(TopologyError::InvalidFdt)?;
        if token_end > structs.len() {
            return Err(TopologyError::InvalidFdt);
        }
        structs.copy_within(read..token_end, write);
        write += len;
        read = token_end;
        if token == FDT_END {
            break;
        }
    }
    structs[write..read].fill(0);
    if removed > 0 {
        let new_size = u32::try_from(size - removed * 4).map_err(|_| TopologyError::InvalidFdt)?;
        dtb[36..40].copy_from_slice(&new_size.to_be_bytes());
    }
    Ok(removed)
}

/// The node at `path` (`/`-separated from the root; a component without `@unit-address`
/// matches the first child with that base name when no child has that exact name).
/// Aliases are deliberately not resolved: `fdt`'s alias fallback can recurse without bound on
/// an alias that names itself.
fn find_path<'b, 'a>(fdt: &'b Fdt<'a>, path: &str) -> Option<FdtNode<'b, 'a>> {
    let mut node = fdt.find_node("/")?;
    for component in path.strip_prefix('/')?.split('/').filter(|c| !c.is_empty()) {
        let exact = node.children().find(|child| child.name == component);
        node = match exact {
            Some(child) => child,
            None if !component.contains('@') => node
                .children()
                .find(|child| child.name.split('@').next() == Some(component))?,
            None => return None,
        };
    }
    Some(node)
}

impl PciHostBridge {
    /// Translates a PCI requester ID (`bus << 8 | device << 3 | function`) through this
    /// bridge's `iommu-map` (`pci/pci-iommu.txt`).
    ///
    /// The ID is first ANDed with [`iommu_map_mask`](Self::iommu_map_mask); the first entry
    /// with `rid_base <= masked < rid_base + length` (exclusive end, computed without overflow)
    /// gives `(iommu_phandle, endpoint_base + (masked - rid_base))`.
    ///
    /// Returns `None` — the requester is not behind an IOMMU — when the bridge has no
    /// `iommu-map` or no entry covers the ID, and also when the resulting endpoint ID would
    /// not fit in 32 bits (a malformed entry).
    pub fn map_requester_id(&self, rid: u16) -> Option<(u32, u32)> {
        let masked = u32::from(rid) & self.iommu_map_mask;
        let entry = self.iommu_map.iter().find(|entry| {
            masked
                .checked_sub(entry.rid_base)
                .is_some_and(|offset| offset < entry.length)
        })?;
        // `masked >= rid_base` holds for the entry found.
        let offset = masked.checked_sub(entry.rid_base)?;
        let endpoint_id = entry.endpoint_base.checked_add(offset)?;
        Some((entry.iommu_phandle, endpoint_id))
    }

    /// The first window of `ranges` in address space `space`, `None` if there is none.
    pub fn window(&self, space: PciSpace) -> Option<&PciWindow> {
        self.windows.iter().find(|window| window.space == space)
    }

    /// Byte offset, from [`ecam_base`](Self::ecam_base), of the 4 KiB configuration space of
    /// `bus:device.function`: `(bus - bus_start) << 20 | device << 15 | function << 12`
    /// (the ECAM region starts at bus `bus_start`, as for Linux's generic ECAM host).
    ///
    /// `None` when `bus` is outside `bus_start..=bus_end` (inclusive), `device > 31` or
    /// `function > 7`. Since `bus_end` is clamped to the region, a `Some` offset plus 4 KiB
    /// never exceeds [`ecam_size`](Self::ecam_size).
    pub fn ecam_offset(&self, bus: u8, device: u8, function: u8) -> Option<u64> {
        if !(self.bus_start..=self.bus_end).contains(&bus) || device > 31 || function > 7 {
            return None;
        }
        let bus_index = u64::from(bus.checked_sub(self.bus_start)?);
        Some(bus_index << 20 | u64::from(device) << 15 | u64::from(function) << 12)
    }
}

impl Topology {
    /// Discovers the virtio-iommus and ECAM PCI host bridges of a devicetree blob.
    ///
    /// The blob is checked with [`validated_fdt`] first, so any input is safe; then this is
    /// [`Topology::from_fdt`].
    ///
    /// # Errors
    ///
    /// [`TopologyError::InvalidFdt`] if the blob is not a well-formed DTB, otherwise those of
    /// [`Topology::from_fdt`].
    pub fn from_dtb(dtb: &[u8]) -> Result<Topology, TopologyError> {
        Self::from_fdt(&validated_fdt(dtb)?)
    }

    /// [`Topology::from_fdt`] on a [`Devicetree`] (already checked): keep the `Devicetree` for
    /// [`Topology::platform_endpoints`] so the blob is checked only once.
    ///
    /// # Errors
    ///
    /// Those of [`Topology::from_fdt`].
    pub fn from_devicetree(devicetree: &Devicetree<'_>) -> Result<Topology, TopologyError> {
        Self::from_fdt(devicetree.fdt())
    }

    /// Discovers the virtio-iommus and ECAM PCI host bridges of a parsed devicetree.
    ///
    /// Walks the tree depth-first from `/` (nodes nested deeper than 64 levels ⇒
    /// `InvalidFdt`) and collects, in devicetree order:
    ///
    /// - **Host bridges**: nodes whose `compatible` contains `pci-host-ecam-generic`
    ///   (`pci/host-generic-pci.yaml`). `reg`'s first entry, read with the parent's
    ///   `#address-cells`/`#size-cells` (defaults 2/1, each at most 2), is the ECAM region
    ///   (bytes). `bus-range = <start end>` (inclusive, default `<0 255>`), with `end` clamped so
    ///   that `(end - start + 1)` MiB fit in the region. `ranges` entries are
    ///   `<phys.hi phys.mid phys.lo  cpu-address  size>` with the node's own `#address-cells`
    ///   (must be 3) and `#size-cells`, and the parent's address cells. `iommu-map` entries
    ///   are `<rid-base iommu-phandle iommu-base length>` (the IOMMU's `#iommu-cells` is
    ///   taken to be 1); `iommu-map-mask` defaults to `0xffff_ffff` (`pci/pci-iommu.txt`).
    /// - **PCI virtio-iommus**: `virtio,pci-iommu` nodes inside a host bridge found above
    ///   (`virtio/iommu.yaml`). Requester ID from `reg`'s `phys.hi` bits 8-23 (the parent must
    ///   have `#address-cells = <3>`). One outside any ECAM host bridge is logged and ignored.
    /// - **MMIO virtio-iommus**: `virtio,mmio` nodes that have `#iommu-cells`; base and size
    ///   (bytes) from `reg`'s first entry with the parent's cells.
    ///
    /// A virtio-iommu's `#iommu-cells` must be `<1>`. Its phandle is `phandle` or
    /// `linux,phandle`; without either it is listed with phandle 0, which nothing can refer
    /// to ([`Topology::iommu_by_phandle`] never matches 0).
    ///
    /// `fdt` 0.1.5 panics on structurally malformed blobs; pass an [`Fdt`] from
    /// [`validated_fdt`] unless the blob is trusted (see the module documentation).
    ///
    /// # Errors
    ///
    /// - `InvalidFdt`: no root node, or nesting deeper than 64.
    /// - `MalformedProperty`: a property of a bridge or virtio-iommu that is missing when
    ///   required (`reg`, `#iommu-cells`) or has a bad length (`iommu-map` not a multiple of
    ///   16 bytes, `ranges` not a multiple of its entry size, `bus-range` not 8 bytes, one-cell
    ///   properties not 4 bytes, truncated `reg`), a `bus-range` outside 0..=255 or with
    ///   start > end, or an ECAM region that wraps or holds less than one bus (1 MiB).
    /// - `UnsupportedCells`: `#iommu-cells` other than 1, CPU address/size cells above 2, or
    ///   PCI address cells other than 3.
    pub fn from_fdt(fdt: &Fdt<'_>) -> Result<Topology, TopologyError> {
        let root = fdt.find_node("/").ok_or(TopologyError::InvalidFdt)?;
        let mut walker = Walker {
            topology: Topology::default(),
            path: String::from("/"),
        };
        walker.walk(root, None, 1, None)?;
        Ok(walker.topology)
    }

    /// Index into [`iommus`](Self::iommus) of the first virtio-iommu with this phandle.
    /// `None` for phandle 0 (the value used for virtio-iommus without a phandle) and for a
    /// phandle that is not a known virtio-iommu.
    pub fn iommu_by_phandle(&self, phandle: u32) -> Option<usize> {
        if phandle == 0 {
            return None;
        }
        self.iommus
            .iter()
            .position(|iommu| iommu.phandle == phandle)
    }

    /// The endpoint of the MMIO device whose registers start at `base` (physical address,
    /// bytes), from [`mmio_endpoints`](Self::mmio_endpoints); `None` when it is not listed.
    pub fn mmio_endpoint(&self, base: u64) -> Option<Endpoint> {
        self.mmio_endpoints
            .iter()
            .find(|endpoint| endpoint.base == base)
            .map(|endpoint| endpoint.endpoint)
    }

    /// Index into [`host_bridges`](Self::host_bridges) of the bridge that virtio-iommu
    /// `iommu` (an index into [`iommus`](Self::iommus)) is a PCI function of; `None` for an
    /// MMIO virtio-iommu or an index out of range.
    pub fn host_bridge_of(&self, iommu: usize) -> Option<usize> {
        match self.iommus.get(iommu)?.location {
            IommuLocation::Pci { host_bridge, .. } => Some(host_bridge),
            IommuLocation::Mmio { .. } => None,
        }
    }

    /// Index into [`host_bridges`](Self::host_bridges) of the ECAM host bridge whose ECAM
    /// region starts at CPU physical address `ecam_base` (bytes; the address the embedder
    /// enumerates PCI configuration space through), `None` if no bridge has that base.
    pub fn host_bridge_at(&self, ecam_base: u64) -> Option<usize> {
        self.host_bridges
            .iter()
            .position(|bridge| bridge.ecam_base == ecam_base)
    }

    /// Index into [`host_bridges`](Self::host_bridges) of the host bridge whose node has this
    /// full path (for example `/pcie@10000000`, compared exactly, unit address included),
    /// `None` if no bridge has it.
    pub fn host_bridge_by_path(&self, path: &str) -> Option<usize> {
        self.host_bridges
            .iter()
            .position(|bridge| bridge.path == path)
    }

    /// The endpoint of PCI requester `requester_id` (`bus << 8 | device << 3 | function`)
    /// under host bridge `host_bridge`, via [`PciHostBridge::map_requester_id`].
    ///
    /// `host_bridge` is an index into [`host_bridges`](Self::host_bridges) (ECAM host bridges
    /// in devicetree order); [`host_bridge_at`](Self::host_bridge_at) finds it from the ECAM
    /// base address, [`host_bridge_by_path`](Self::host_bridge_by_path) from the node path.
    ///
    /// `Ok(None)`: the requester is not behind an IOMMU (the bridge has no `iommu-map`, or no
    /// entry covers the requester ID).
    ///
    /// # Errors
    ///
    /// - [`TopologyError::NoSuchHostBridge`] when `host_bridge >= host_bridges.len()`.
    /// - [`TopologyError::UnknownPhandle`] when the matching `iommu-map` entry names a phandle
    ///   that is not one of [`iommus`](Self::iommus) (possibly another kind of IOMMU).
    pub fn pci_endpoint(
        &self,
        host_bridge: usize,
        requester_id: u16,
    ) -> Result<Option<Endpoint>, TopologyError> {
        let bridge = self
            .host_bridges
            .get(host_bridge)
            .ok_or(TopologyError::NoSuchHostBridge(host_bridge))?;
        let Some((phandle, endpoint_id)) = bridge.map_requester_id(requester_id) else {
            return Ok(None);
        };
        let iommu = self
            .iommu_by_phandle(phandle)
            .ok_or(TopologyError::UnknownPhandle(phandle))?;
        Ok(Some(Endpoint { iommu, endpoint_id }))
    }

    /// The endpoints of the platform device at `node_path` (for example
    /// `/soc/dma@9000000`), from its `iommus = <phandle endpoint-id>*` (`iommu/iommu.txt`;
    /// a virtio-iommu has `#iommu-cells = <1>`, so each specifier is one cell), in order.
    ///
    /// An empty `Vec` when the node exists but has no `iommus` (not behind an IOMMU). A
    /// component without `@unit-address` matches the first child of that base name when no
    /// child has that exact name; aliases are not resolved. `fdt` should be the devicetree
    /// this topology was built from: pass the [`Devicetree`] given to
    /// [`Topology::from_devicetree`] (it dereferences to [`Fdt`]), or, for a trusted blob, any
    /// [`Fdt`] of it.
    ///
    /// # Errors
    ///
    /// - [`TopologyError::NoSuchNode`]: no node has that path (or it does not start with `/`).
    /// - `MalformedProperty("iommus")`: length not a multiple of 8 bytes.
    /// - `UnknownPhandle`: a phandle that is not one of [`iommus`](Self::iommus).
    pub fn platform_endpoints(
        &self,
        fdt: &Fdt<'_>,
        node_path: &str,
    ) -> Result<Vec<Endpoint>, TopologyError> {
        let node = find_path(fdt, node_path).ok_or(TopologyError::NoSuchNode)?;
        let Some(prop) = node.property("iommus") else {
            return Ok(Vec::new());
        };
        if prop.value.len() % 8 != 0 {
            return Err(TopologyError::MalformedProperty { property: "iommus" });
        }
        let mut cells = Cells::new(prop.value, "iommus");
        let mut endpoints = Vec::new();
        while !cells.is_empty() {
            let phandle = cells.u32()?;
            let endpoint_id = cells.u32()?;
            let iommu = self
                .iommu_by_phandle(phandle)
                .ok_or(TopologyError::UnknownPhandle(phandle))?;
            endpoints.push(Endpoint { iommu, endpoint_id });
        }
        Ok(endpoints)
    }
}
