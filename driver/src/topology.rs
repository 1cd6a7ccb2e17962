//! Topology discovery from the devicetree: which virtio-iommu translates which DMA requester.
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

// NOTE: skeleton written first so the driver and firmware can be built against it in parallel.

use alloc::vec::Vec;
use fdt::Fdt;

/// Why the devicetree could not be read as a topology.
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
    /// A phandle in `iommu-map` or `iommus` names no node.
    UnknownPhandle(u32),
    /// `#address-cells`/`#size-cells`/`#iommu-cells` have a value this code does not handle
    /// (for example `#iommu-cells` other than 1 on a virtio-iommu).
    UnsupportedCells {
        /// The property's name.
        property: &'static str,
        /// Its value.
        value: u32,
    },
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

/// Every virtio-iommu and PCI host bridge of a devicetree.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Topology {
    /// The virtio-iommus, in devicetree order.
    pub iommus: Vec<VirtioIommuNode>,
    /// The ECAM PCI host bridges, in devicetree order.
    pub host_bridges: Vec<PciHostBridge>,
}
