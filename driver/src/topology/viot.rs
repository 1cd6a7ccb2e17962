//! The ACPI Virtual I/O Translation Table (VIOT, ACPI Specification 6.5 §5.2.32): which
//! virtio-iommu translates which PCI requester or MMIO device, on machines booted with ACPI.
//!
//! [`Viot::parse`] checks a VIOT completely (header, checksum, every node's bounds and length,
//! references between nodes, ranges, overlaps) into plain data; [`Topology::from_viot`] turns it,
//! with the MCFG's ECAM regions, into the same [`Topology`] the devicetree gives
//! ([`Topology::from_dtb`]), so the rest of a driver does not care where the topology came from.
//! [`Topology::from_acpi_tables`] does both from a blob of concatenated tables (QEMU's fw_cfg
//! `etc/acpi/tables`). Nothing here panics on any input; errors are [`AcpiError`]s.
//!
//! Node layouts (ACPI 6.5 Tables 5.162-5.168; all little-endian, no padding):
//!
//! | type | node | length | fields after the 4-byte node header |
//! |---|---|---|---|
//! | 1 | PCI range | 24 | endpoint start u32, segment start u16, segment end u16, BDF start u16, BDF end u16, output node u16, 6 reserved |
//! | 2 | MMIO endpoint | 24 | endpoint ID u32, base address u64, output node u16, 6 reserved |
//! | 3 | virtio-pci IOMMU | 16 | segment u16, BDF u16, 8 reserved |
//! | 4 | virtio-mmio IOMMU | 16 | 4 reserved, base address u64 |
//!
//! A PCI range node gives the requester `(segment, bdf)` with `segment_start <= segment <=
//! segment_end` and `bdf_start <= bdf <= bdf_end` (inclusive ends) the endpoint ID
//! `endpoint_start + ((segment - segment_start) << 16) + (bdf - bdf_start)`, the rule Linux's
//! `drivers/acpi/viot.c` applies. `output_node` is the byte offset, from the start of the VIOT,
//! of the virtio-iommu node that translates it.

use super::acpi::{checked_table, find_table, mcfg_entries, AcpiError, McfgEntry, SdtHeader};
use super::acpi::{MCFG_FIXED_SIZE, MCFG_SIGNATURE};
use super::{Endpoint, IommuLocation, IommuMapEntry, MmioEndpoint, PciHostBridge, Topology};
use super::{VirtioIommuNode, ECAM_BUS_SIZE};
use alloc::format;
use alloc::vec::Vec;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// VIOT signature.
pub const VIOT_SIGNATURE: [u8; 4] = *b"VIOT";

/// Most nodes [`Viot::parse`] accepts (a real VIOT has one per virtio-iommu, PCI host bridge
/// and MMIO endpoint); more ⇒ [`AcpiError::TooManyNodes`]. Bounds the quadratic overlap check.
pub const MAX_VIOT_NODES: u16 = 4096;

/// The VIOT's fixed part: table header, node count, offset of the first node, 8 reserved
/// bytes (48 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ViotHeader {
    /// Table header, signature `VIOT`.
    pub header: SdtHeader,
    /// Number of nodes.
    pub node_count: U16,
    /// Offset of the first node from the start of the table (bytes).
    pub node_offset: U16,
    /// Reserved.
    pub reserved: [u8; 8],
}

/// Every VIOT node starts with this (4 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NodeHeader {
    /// Node type: [`NODE_PCI_RANGE`], [`NODE_MMIO_ENDPOINT`], [`NODE_VIRTIO_PCI_IOMMU`],
    /// [`NODE_VIRTIO_MMIO_IOMMU`]; others are reserved.
    pub node_type: u8,
    /// Reserved.
    pub reserved: u8,
    /// Length of the node in bytes, header included.
    pub length: U16,
}

/// Node type of a PCI range node.
pub const NODE_PCI_RANGE: u8 = 1;
/// Node type of an MMIO endpoint node.
pub const NODE_MMIO_ENDPOINT: u8 = 2;
/// Node type of a virtio-pci IOMMU node.
pub const NODE_VIRTIO_PCI_IOMMU: u8 = 3;
/// Node type of a virtio-mmio IOMMU node.
pub const NODE_VIRTIO_MMIO_IOMMU: u8 = 4;

/// PCI range node (type 1, 24 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PciRangeNode {
    /// Node header.
    pub header: NodeHeader,
    /// Endpoint ID of `(segment_start, bdf_start)`.
    pub endpoint_start: U32,
    /// First PCI segment covered.
    pub segment_start: U16,
    /// Last PCI segment covered, inclusive.
    pub segment_end: U16,
    /// First BDF (`bus << 8 | device << 3 | function`) covered in each segment.
    pub bdf_start: U16,
    /// Last BDF covered, inclusive.
    pub bdf_end: U16,
    /// Offset of the virtio-iommu node that translates these requesters.
    pub output_node: U16,
    /// Reserved.
    pub reserved: [u8; 6],
}

/// MMIO endpoint node (type 2, 24 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MmioEndpointNode {
    /// Node header.
    pub header: NodeHeader,
    /// Endpoint ID of the device.
    pub endpoint_id: U32,
    /// Physical base address of the device's registers (bytes).
    pub base_address: U64,
    /// Offset of the virtio-iommu node that translates it.
    pub output_node: U16,
    /// Reserved.
    pub reserved: [u8; 6],
}

/// virtio-pci IOMMU node (type 3, 16 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VirtioPciIommuNode {
    /// Node header.
    pub header: NodeHeader,
    /// PCI segment of the virtio-iommu function.
    pub segment: U16,
    /// Its BDF.
    pub bdf: U16,
    /// Reserved.
    pub reserved: [u8; 8],
}

/// virtio-mmio IOMMU node (type 4, 16 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VirtioMmioIommuNode {
    /// Node header.
    pub header: NodeHeader,
    /// Reserved.
    pub reserved: [u8; 4],
    /// Physical base address of the virtio-mmio registers (bytes).
    pub base_address: U64,
}

/// Where a virtio-iommu of the VIOT is.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ViotIommuLocation {
    /// A virtio-pci function.
    Pci {
        /// PCI segment.
        segment: u16,
        /// BDF (`bus << 8 | device << 3 | function`).
        bdf: u16,
    },
    /// A virtio-mmio device with its registers at `base` (physical address, bytes).
    Mmio {
        /// Register base.
        base: u64,
    },
}

/// A virtio-iommu node.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ViotIommu {
    /// Offset of the node in the VIOT (what `output_node` fields refer to; never 0).
    pub offset: u16,
    /// Where the device is.
    pub location: ViotIommuLocation,
}

/// A PCI range node, checked: `segment_start <= segment_end`, `bdf_start <= bdf_end`, the
/// last endpoint ID fits in 32 bits.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ViotPciRange {
    /// Offset of the node in the VIOT.
    pub offset: usize,
    /// Endpoint ID of `(segment_start, bdf_start)`.
    pub endpoint_start: u32,
    /// First segment, inclusive.
    pub segment_start: u16,
    /// Last segment, inclusive.
    pub segment_end: u16,
    /// First BDF, inclusive.
    pub bdf_start: u16,
    /// Last BDF, inclusive.
    pub bdf_end: u16,
    /// Index into [`Viot::iommus`] of the translating virtio-iommu.
    pub iommu: usize,
}

impl ViotPciRange {
    /// Endpoint ID of requester `(segment, bdf)`, `None` when the range does not cover it.
    pub fn endpoint_id(&self, segment: u16, bdf: u16) -> Option<u32> {
        if !(self.segment_start..=self.segment_end).contains(&segment)
            || !(self.bdf_start..=self.bdf_end).contains(&bdf)
        {
            return None;
        }
        let segments = u32::from(segment - self.segment_start) << 16;
        self.endpoint_start
            .checked_add(segments)?
            .checked_add(u32::from(bdf - self.bdf_start))
    }
}

/// An MMIO endpoint node.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ViotMmioEndpoint {
    /// Offset of the node in the VIOT.
    pub offset: usize,
    /// Physical base address of the device's registers (bytes).
    pub base: u64,
    /// Its endpoint ID.
    pub endpoint_id: u32,
    /// Index into [`Viot::iommus`] of the translating virtio-iommu.
    pub iommu: usize,
}

/// A checked VIOT, nodes of each kind in table order.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Viot {
    /// The virtio-pci and virtio-mmio IOMMU nodes.
    pub iommus: Vec<ViotIommu>,
    /// The PCI range nodes.
    pub pci_ranges: Vec<ViotPciRange>,
    /// The MMIO endpoint nodes.
    pub mmio_endpoints: Vec<ViotMmioEndpoint>,
}

/// A node as first read, before references are resolved.
enum RawNode {
    Iommu(ViotLocationAt),
    PciRange(PciRangeNode),
    Mmio(MmioEndpointNode),
    Unknown,
}

/// An IOMMU node's location, with the index it gets in [`Viot::iommus`].
struct ViotLocationAt {
    location: ViotIommuLocation,
    index: usize,
}

/// Reads a node structure `T` at `offset` whose header says `length` bytes.
fn node_at<T: FromBytes + KnownLayout + Immutable>(
    table: &[u8],
    offset: usize,
    node_type: u8,
    length: u16,
) -> Result<T, AcpiError> {
    if usize::from(length) < core::mem::size_of::<T>() {
        return Err(AcpiError::BadNodeLength {
            offset,
            node_type,
            length,
        });
    }
    let bytes = table
        .get(offset..)
        .ok_or(AcpiError::NodeOutOfBounds { offset })?;
    T::read_from_prefix(bytes)
        .map(|(node, _)| node)
        .map_err(|_| AcpiError::NodeOutOfBounds { offset })
}

/// Whether the inclusive ranges `a` and `b` intersect.
fn intersect(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl Viot {
    /// Checks a VIOT (ACPI 6.5 §5.2.32) and returns its nodes.
    ///
    /// `viot` starts with the table; bytes after its `length` are ignored. Checked, in this
    /// order: the table ([`checked_table`]: signature `VIOT`, `length` between 48 and
    /// `viot.len()`, checksum); `node_count` ≤ [`MAX_VIOT_NODES`]; with `node_count > 0`,
    /// `node_offset` ≥ 48; each of the `node_count` nodes, which follow one another from
    /// `node_offset`, lies inside the table and has a `length` of at least its type's structure
    /// (4 bytes for reserved types, which are skipped); then every `output_node` is the offset
    /// of a virtio-iommu node; PCI ranges are not inverted, their endpoint IDs fit in 32 bits and
    /// no two overlap; no two MMIO endpoint nodes have the same base address; no two
    /// virtio-iommu nodes are the same device; no virtio-iommu node starts past offset 65535
    /// (where no `output_node` could name it). Reserved fields are not checked (ACPI gives them
    /// no meaning), nor is the table revision (0 in ACPI 6.5 and in QEMU).
    ///
    /// # Errors
    ///
    /// Those of [`checked_table`]; [`AcpiError::TooManyNodes`],
    /// [`AcpiError::NodeOutOfBounds`], [`AcpiError::BadNodeLength`],
    /// [`AcpiError::UnknownOutputNode`], [`AcpiError::OutputNotIommu`],
    /// [`AcpiError::InvertedRange`], [`AcpiError::EndpointOverflow`],
    /// [`AcpiError::OverlappingEndpoints`], [`AcpiError::DuplicateIommu`] as described above.
    pub fn parse(viot: &[u8]) -> Result<Viot, AcpiError> {
        let table = checked_table(viot, VIOT_SIGNATURE, core::mem::size_of::<ViotHeader>())?;
        // `checked_table` guarantees at least the header's 48 bytes.
        let (header, _) =
            ViotHeader::read_from_prefix(table).map_err(|_| AcpiError::BadLength {
                signature: VIOT_SIGNATURE,
                length: 0,
                available: table.len(),
            })?;
        let count = header.node_count.get();
        if count > MAX_VIOT_NODES {
            return Err(AcpiError::TooManyNodes(count));
        }

        // Pass 1: read every node and its offset.
        let mut nodes: Vec<(usize, RawNode)> = Vec::with_capacity(usize::from(count));
        let mut iommu_count = 0usize;
        let mut offset = usize::from(header.node_offset.get());
        if count > 0 && offset < core::mem::size_of::<ViotHeader>() {
            return Err(AcpiError::NodeOutOfBounds { offset });
        }
        for _ in 0..count {
            let (node_header, _) = table
                .get(offset..)
                .and_then(|bytes| NodeHeader::read_from_prefix(bytes).ok())
                .ok_or(AcpiError::NodeOutOfBounds { offset })?;
            let node_type = node_header.node_type;
            let length = node_header.length.get();
            if usize::from(length) < core::mem::size_of::<NodeHeader>() {
                return Err(AcpiError::BadNodeLength {
                    offset,
                    node_type,
                    length,
                });
            }
            let end = offset
                .checked_add(usize::from(length))
                .filter(|&end| end <= table.len())
                .ok_or(AcpiError::NodeOutOfBounds { offset })?;
            let node = match node_type {
                NODE_PCI_RANGE => RawNode::PciRange(node_at(table, offset, node_type, length)?),
                NODE_MMIO_ENDPOINT => RawNode::Mmio(node_at(table, offset, node_type, length)?),
                NODE_VIRTIO_PCI_IOMMU => {
                    let node: VirtioPciIommuNode = node_at(table, offset, node_type, length)?;
                    iommu_count += 1;
                    RawNode::Iommu(ViotLocationAt {
                        location: ViotIommuLocation::Pci {
                            segment: node.segment.get(),
                            bdf: node.bdf.get(),
                        },
                        index: iommu_count - 1,
                    })
                }
                NODE_VIRTIO_MMIO_IOMMU => {
                    let node: VirtioMmioIommuNode = node_at(table, offset, node_type, length)?;
                    iommu_count += 1;
                    RawNode::Iommu(ViotLocationAt {
                        location: ViotIommuLocation::Mmio {
                            base: node.base_address.get(),
                        },
                        index: iommu_count - 1,
                    })
                }
                other => {
                    log::debug!("VIOT: node of reserved type {other} at {offset:#x} skipped");
                    RawNode::Unknown
                }
            };
            nodes.push((offset, node));
            offset = end;
        }

        // Pass 2: resolve references and check ranges.
        let mut viot = Viot::default();
        let resolve = |from: usize, output_node: u16| -> Result<usize, AcpiError> {
            let target = usize::from(output_node);
            match nodes.iter().find(|(at, _)| *at == target) {
                Some((_, RawNode::Iommu(iommu))) => Ok(iommu.index),
                Some(_) => Err(AcpiError::OutputNotIommu {
                    offset: from,
                    output_node,
                }),
                None => Err(AcpiError::UnknownOutputNode {
                    offset: from,
                    output_node,
                }),
            }
        };
        for (offset, node) in &nodes {
            let offset = *offset;
            match node {
                RawNode::Iommu(iommu) => {
                    // Offsets of IOMMU nodes are what u16 `output_node` fields can name; one
                    // past 64 KiB is kept (with an offset nothing can refer to) only if it
                    // cannot be named, so report it as out of bounds instead.
                    let at =
                        u16::try_from(offset).map_err(|_| AcpiError::NodeOutOfBounds { offset })?;
                    if let Some(first) = viot
                        .iommus
                        .iter()
                        .find(|other| other.location == iommu.location)
                    {
                        return Err(AcpiError::DuplicateIommu {
                            first: usize::from(first.offset),
                            second: offset,
                        });
                    }
                    viot.iommus.push(ViotIommu {
                        offset: at,
                        location: iommu.location,
                    });
                }
                RawNode::PciRange(node) => {
                    let range = ViotPciRange {
                        offset,
                        endpoint_start: node.endpoint_start.get(),
                        segment_start: node.segment_start.get(),
                        segment_end: node.segment_end.get(),
                        bdf_start: node.bdf_start.get(),
                        bdf_end: node.bdf_end.get(),
                        iommu: resolve(offset, node.output_node.get())?,
                    };
                    if range.segment_start > range.segment_end || range.bdf_start > range.bdf_end {
                        return Err(AcpiError::InvertedRange { offset });
                    }
                    if range
                        .endpoint_id(range.segment_end, range.bdf_end)
                        .is_none()
                    {
                        return Err(AcpiError::EndpointOverflow { offset });
                    }
                    if let Some(first) = viot.pci_ranges.iter().find(|other| {
                        intersect(
                            (other.segment_start, other.segment_end),
                            (range.segment_start, range.segment_end),
                        ) && intersect(
                            (other.bdf_start, other.bdf_end),
                            (range.bdf_start, range.bdf_end),
                        )
                    }) {
                        return Err(AcpiError::OverlappingEndpoints {
                            first: first.offset,
                            second: offset,
                        });
                    }
                    viot.pci_ranges.push(range);
                }
                RawNode::Mmio(node) => {
                    let endpoint = ViotMmioEndpoint {
                        offset,
                        base: node.base_address.get(),
                        endpoint_id: node.endpoint_id.get(),
                        iommu: resolve(offset, node.output_node.get())?,
                    };
                    if let Some(first) = viot
                        .mmio_endpoints
                        .iter()
                        .find(|other| other.base == endpoint.base)
                    {
                        return Err(AcpiError::OverlappingEndpoints {
                            first: first.offset,
                            second: offset,
                        });
                    }
                    viot.mmio_endpoints.push(endpoint);
                }
                RawNode::Unknown => {}
            }
        }
        Ok(viot)
    }
}

/// The `iommu-map` entries of a host bridge in PCI segment `segment`, from the VIOT's PCI
/// ranges covering that segment: one entry per range, split around the RID of a virtio-pci
/// IOMMU that the range would have translate itself (a virtio-iommu does not translate its own
/// DMA; Linux's `viot.c` skips that case too, and QEMU's devicetree `iommu-map` leaves the
/// IOMMU's RID out the same way).
fn iommu_map_for_segment(viot: &Viot, segment: u16) -> Vec<IommuMapEntry> {
    let mut map = Vec::new();
    for range in &viot.pci_ranges {
        // Validated: inside the range and without overflow.
        let Some(endpoint_base) = range.endpoint_id(segment, range.bdf_start) else {
            continue;
        };
        let Some(iommu) = viot.iommus.get(range.iommu) else {
            continue;
        };
        let phandle = u32::from(iommu.offset);
        let own_rid = match iommu.location {
            ViotIommuLocation::Pci { segment: s, bdf }
                if s == segment && (range.bdf_start..=range.bdf_end).contains(&bdf) =>
            {
                Some(bdf)
            }
            _ => None,
        };
        let mut push = |first: u16, last: u16| {
            // `first..=last` lies inside the range, so neither subtraction nor the endpoint
            // addition can overflow (checked anyway).
            let length = u32::from(last - first) + 1;
            if let Some(base) = endpoint_base.checked_add(u32::from(first - range.bdf_start)) {
                map.push(IommuMapEntry {
                    rid_base: u32::from(first),
                    iommu_phandle: phandle,
                    endpoint_base: base,
                    length,
                });
            }
        };
        match own_rid {
            None => push(range.bdf_start, range.bdf_end),
            Some(own) => {
                if own > range.bdf_start {
                    push(range.bdf_start, own - 1);
                }
                if own < range.bdf_end {
                    push(own + 1, range.bdf_end);
                }
            }
        }
    }
    map
}

impl Topology {
    /// The topology an ACPI machine describes in its VIOT, with the PCI host bridges of its
    /// MCFG: the same [`Topology`] [`Topology::from_dtb`] builds from the devicetree of the
    /// same machine, so that [`Topology::pci_endpoint`] gives the same answers.
    ///
    /// - **Host bridges**: one per MCFG entry, in MCFG order (none when `mcfg` is `None`).
    ///   `ecam_base` is the region of bus `bus_start` (bytes), `ecam_size` is
    ///   `(bus_end - bus_start + 1)` MiB, `windows` is empty (ACPI gives them in the DSDT's
    ///   AML `_CRS`, which this driver does not interpret), `path` is `MCFG[index]`.
    ///   `iommu_map` has one entry per VIOT PCI range covering the entry's segment (endpoint
    ///   IDs of that segment, `rid_base` = BDF start, `length` = number of BDFs), except that
    ///   a virtio-pci IOMMU's own BDF is cut out of a range that points at it, as in QEMU's
    ///   devicetree. `iommu_map_mask` is `0xffff_ffff`.
    /// - **virtio-iommus**: the VIOT's IOMMU nodes in table order. The "phandle" of each is its
    ///   node's offset in the VIOT (what VIOT nodes refer to it by; never 0), and its `path`
    ///   is `VIOT@<offset>`. A virtio-pci IOMMU's location is
    ///   [`IommuLocation::Pci`] with the first MCFG entry of its segment whose bus range holds
    ///   its bus, and its BDF as requester ID. A virtio-mmio IOMMU's is
    ///   [`IommuLocation::Mmio`] with its base address and **size 0**: the VIOT gives no size.
    /// - **MMIO endpoints** ([`Topology::mmio_endpoints`]): the VIOT's MMIO endpoint nodes.
    ///
    /// # Errors
    ///
    /// Those of [`Viot::parse`] and, for the MCFG, of [`mcfg_entries`];
    /// [`AcpiError::NoHostBridge`] for a virtio-pci IOMMU no MCFG entry covers.
    pub fn from_viot(viot: &[u8], mcfg: Option<&[u8]>) -> Result<Topology, AcpiError> {
        let viot = Viot::parse(viot)?;
        let mcfg: Vec<McfgEntry> = match mcfg {
            Some(mcfg) => mcfg_entries(mcfg)?,
            None => Vec::new(),
        };
        let mut topology = Topology::default();
        for (index, entry) in mcfg.iter().enumerate() {
            let buses = u64::from(entry.bus_end - entry.bus_start) + 1;
            topology.host_bridges.push(PciHostBridge {
                path: format!("MCFG[{index}]"),
                ecam_base: entry.ecam_base,
                ecam_size: buses * ECAM_BUS_SIZE,
                bus_start: entry.bus_start,
                bus_end: entry.bus_end,
                windows: Vec::new(),
                iommu_map: iommu_map_for_segment(&viot, entry.segment),
                iommu_map_mask: u32::MAX,
            });
        }
        for iommu in &viot.iommus {
            let location = match iommu.location {
                ViotIommuLocation::Pci { segment, bdf } => {
                    let bus = (bdf >> 8) as u8;
                    let host_bridge = mcfg
                        .iter()
                        .position(|entry| {
                            entry.segment == segment
                                && (entry.bus_start..=entry.bus_end).contains(&bus)
                        })
                        .ok_or(AcpiError::NoHostBridge {
                            offset: usize::from(iommu.offset),
                            segment,
                            bdf,
                        })?;
                    IommuLocation::Pci {
                        host_bridge,
                        requester_id: bdf,
                    }
                }
                ViotIommuLocation::Mmio { base } => IommuLocation::Mmio { base, size: 0 },
            };
            topology.iommus.push(VirtioIommuNode {
                path: format!("VIOT@{:#x}", iommu.offset),
                phandle: u32::from(iommu.offset),
                location,
            });
        }
        topology.mmio_endpoints = viot
            .mmio_endpoints
            .iter()
            .map(|endpoint| MmioEndpoint {
                base: endpoint.base,
                endpoint: Endpoint {
                    iommu: endpoint.iommu,
                    endpoint_id: endpoint.endpoint_id,
                },
            })
            .collect();
        Ok(topology)
    }

    /// [`Topology::from_viot`] on the VIOT and MCFG of a blob of concatenated ACPI tables
    /// (QEMU's fw_cfg `etc/acpi/tables`; see [`super::acpi::tables`] for how it is walked).
    /// A blob without an MCFG gives a topology without host bridges.
    ///
    /// # Errors
    ///
    /// [`AcpiError::TableNotFound`] without a VIOT, those of [`super::acpi::find_table`] for
    /// either table, then those of [`Topology::from_viot`].
    pub fn from_acpi_tables(blob: &[u8]) -> Result<Topology, AcpiError> {
        let viot = find_table(blob, VIOT_SIGNATURE, core::mem::size_of::<ViotHeader>())?;
        let mcfg = match find_table(blob, MCFG_SIGNATURE, MCFG_FIXED_SIZE) {
            Ok(mcfg) => Some(mcfg),
            Err(AcpiError::TableNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        Self::from_viot(viot, mcfg)
    }
}
