//! Reserved regions of an endpoint's IOVA space from every source, merged as Linux does
//! (`viommu_get_resv_regions` → `iommu_dma_get_resv_regions` → `of_iommu_get_resv_regions`):
//!
//! 1. PROBE's RESV_MEM properties (virtio v1.3 §5.13.6.8.1, [`crate::VirtIOIommu::probe_reserved_regions`]);
//! 2. a **software MSI window** ([`software_msi`]: IOVAs [`MSI_IOVA_BASE`]`..`
//!    [`MSI_IOVA_BASE`]` + `[`MSI_IOVA_LENGTH`], kind [`ResvMemKind::SoftwareMsi`]) when
//!    PROBE reports no `RESV_MEM_T_MSI` region — the device then translates MSI writes like
//!    any DMA, so the doorbell has to be MAPped by software at an IOVA no buffer takes;
//! 3. the devicetree's `/reserved-memory` regions that name the endpoint's node in their
//!    `iommu-addresses` ([`devicetree_regions`]; binding
//!    `reserved-memory/reserved-memory.yaml`): an IOVA range equal to the region's `reg`
//!    is [`ResvMemKind::Direct`] (mapped 1:1), any other is [`ResvMemKind::Reserved`].
//!
//! [`merge`] makes one sorted, disjoint list of them (inclusive ends) for the IOVA allocator
//! of a [`DmaSpace`](crate::dma::DmaSpace) (its constructors and
//! [`DmaSpace::attach_endpoint`](crate::dma::DmaSpace::attach_endpoint) take it wherever they
//! take PROBE's list).
//!
//! `/reserved-memory` regions with `no-map` are memory the OS does not own (firmware,
//! secure carve-outs): an identity-mapped space must not map them, so pass
//! [`usable_ram`] (RAM minus those) as its RAM. Regions without `no-map` stay in the RAM list:
//! the OS maps them and devices may DMA there (`shared-dma-pool`).
//!
//! Not carried over from Linux: `dma-ranges` translation of `iommu-addresses` (the address is
//! taken as an IOVA as written), and Linux's for DMA domains skipping of `IOMMU_RESV_SW_MSI` in
//! the allocator (Linux allocates doorbell IOVAs from the allocator itself; here the window
//! is kept free so an embedder can map doorbells there by hand, as VFIO does).

use super::{cpu_cells, find_path, phandle_of, Cells, TopologyError, MAX_DEPTH};
use crate::dma::PhysRange;
use crate::parse::{ReservedRegion, ResvMemKind};
use alloc::string::String;
use alloc::vec::Vec;
use fdt::node::FdtNode;
use fdt::Fdt;

/// First IOVA of the software MSI window (bytes): Linux's `MSI_IOVA_BASE`, 0x800_0000.
pub const MSI_IOVA_BASE: u64 = 0x800_0000;

/// Size of the software MSI window in bytes: Linux's `MSI_IOVA_LENGTH`, 1 MiB.
pub const MSI_IOVA_LENGTH: u64 = 0x10_0000;

/// The software MSI window: [`MSI_IOVA_BASE`]`..=`[`MSI_IOVA_BASE`]` + `[`MSI_IOVA_LENGTH`]` - 1`
/// (inclusive end), kind [`ResvMemKind::SoftwareMsi`].
pub const fn software_msi() -> ReservedRegion {
    ReservedRegion {
        kind: ResvMemKind::SoftwareMsi,
        start: MSI_IOVA_BASE,
        end: MSI_IOVA_BASE + (MSI_IOVA_LENGTH - 1),
    }
}

/// Precedence of a kind where regions overlap (higher wins).
fn rank(kind: ResvMemKind) -> u8 {
    match kind {
        ResvMemKind::Reserved => 4,
        ResvMemKind::Unknown(_) => 3,
        ResvMemKind::Msi => 2,
        ResvMemKind::Direct => 1,
        ResvMemKind::SoftwareMsi => 0,
    }
}

/// Merges an endpoint's reserved regions: `probe` (PROBE's RESV_MEM regions), the software
/// MSI window when `probe` has no [`ResvMemKind::Msi`] region, and `devicetree` (e.g. from
/// [`devicetree_regions`]). All inclusive ends; regions with `start > end` are dropped.
///
/// The result is sorted by address and disjoint; adjacent or overlapping pieces of one kind
/// are joined. Where regions of different kinds overlap, each overlapped byte takes the kind
/// with the highest precedence: `Reserved` > `Unknown` (treated as reserved, §5.13.6.8.1) >
/// `Msi` > `Direct` > `SoftwareMsi` — the device's word over the devicetree's, "never touch"
/// over "map 1:1", and the software window (the driver's own choice) last, so it only fills
/// what nothing else claims.
pub fn merge(probe: &[ReservedRegion], devicetree: &[ReservedRegion]) -> Vec<ReservedRegion> {
    let has_msi = probe.iter().any(|r| r.kind == ResvMemKind::Msi);
    let sw = (!has_msi).then(software_msi);
    let all: Vec<ReservedRegion> = probe
        .iter()
        .chain(devicetree)
        .copied()
        .chain(sw)
        .filter(|r| r.start <= r.end)
        .collect();
    // Elementary intervals between boundaries (as u128: `end + 1` may be 2^64).
    let mut points: Vec<u128> = all
        .iter()
        .flat_map(|r| [u128::from(r.start), u128::from(r.end) + 1])
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<ReservedRegion> = Vec::new();
    for pair in points.windows(2) {
        let (lo, hi) = (pair[0], pair[1] - 1);
        // Both fit in u64: every point is `start` or `end + 1` of some region, and `lo < hi+1`.
        let (Ok(start), Ok(end)) = (u64::try_from(lo), u64::try_from(hi)) else {
            continue;
        };
        let Some(kind) = all
            .iter()
            .filter(|r| r.start <= start && end <= r.end)
            .map(|r| r.kind)
            .max_by_key(|&k| rank(k))
        else {
            continue;
        };
        match out.last_mut() {
            Some(last) if last.kind == kind && last.end.checked_add(1) == Some(start) => {
                last.end = end;
            }
            _ => out.push(ReservedRegion { kind, start, end }),
        }
    }
    out
}

/// One `reg` entry of a `/reserved-memory` child (Devicetree Specification v0.4 §3.5).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ReservedMemory {
    /// Full path of the node (for example `/reserved-memory/fw@48000000`).
    pub path: String,
    /// The node's phandle (0 when it has none).
    pub phandle: u32,
    /// The physical range of this `reg` entry, inclusive; `None` for a node without `reg`
    /// (dynamically placed by the OS, or a pure IOVA reservation through `iommu-addresses`).
    pub range: Option<PhysRange>,
    /// The node has `no-map`: the OS must not map the range at all.
    pub no_map: bool,
}

/// Every child of `/reserved-memory`, one [`ReservedMemory`] per `reg` entry (one with
/// `range: None` for a child without `reg`), in devicetree order. Empty without
/// `/reserved-memory`. `reg` is read with `/reserved-memory`'s `#address-cells` and
/// `#size-cells` (defaults 2 and 1; at most 2 each); entries of size 0 are skipped.
///
/// # Errors
///
/// [`TopologyError::MalformedProperty`] for a `reg` that is not a whole number of entries, or
/// an entry that passes 2^64 (`"reg"`), or a `phandle` that is not one cell;
/// [`TopologyError::UnsupportedCells`] for address or size cells above 2.
pub fn reserved_memory(fdt: &Fdt<'_>) -> Result<Vec<ReservedMemory>, TopologyError> {
    let mut out = Vec::new();
    let Some(parent) = find_path(fdt, "/reserved-memory") else {
        return Ok(out);
    };
    let (address_cells, size_cells) = cpu_cells(parent)?;
    for child in parent.children() {
        let mut path = String::from("/reserved-memory/");
        path.push_str(child.name);
        let phandle = phandle_of(child)?;
        let no_map = child.property("no-map").is_some();
        let ranges = reg_ranges(child, address_cells, size_cells)?;
        if child.property("reg").is_none() {
            out.push(ReservedMemory {
                path,
                phandle,
                range: None,
                no_map,
            });
            continue;
        }
        for range in ranges {
            out.push(ReservedMemory {
                path: path.clone(),
                phandle,
                range: Some(range),
                no_map,
            });
        }
    }
    Ok(out)
}

/// The `reg` entries of `node` (inclusive ranges; size-0 entries skipped).
fn reg_ranges(
    node: FdtNode<'_, '_>,
    address_cells: u32,
    size_cells: u32,
) -> Result<Vec<PhysRange>, TopologyError> {
    let mut out = Vec::new();
    let Some(reg) = node.property("reg") else {
        return Ok(out);
    };
    let entry = (address_cells + size_cells) as usize * 4;
    if entry == 0 || reg.value.len() % entry != 0 {
        return Err(TopologyError::MalformedProperty { property: "reg" });
    }
    let mut cells = Cells::new(reg.value, "reg");
    while !cells.is_empty() {
        let start = cells.number(address_cells)?;
        let size = cells.number(size_cells)?;
        if size == 0 {
            continue;
        }
        out.push(
            PhysRange::from_start_size(start, size)
                .ok_or(TopologyError::MalformedProperty { property: "reg" })?,
        );
    }
    Ok(out)
}

/// `/memory` RAM `ram` (inclusive ranges) minus every `no-map` range of `reserved` (from
/// [`reserved_memory`]): what an identity-mapped space may map
/// ([`DmaSpace::identity_mapped`](crate::dma::DmaSpace::identity_mapped)). Sorted, disjoint.
pub fn usable_ram(ram: &[PhysRange], reserved: &[ReservedMemory]) -> Vec<PhysRange> {
    let holes = crate::dma::ranges::sorted_union(
        reserved.iter().filter(|r| r.no_map).filter_map(|r| r.range),
    );
    let mut out = Vec::new();
    for r in crate::dma::ranges::sorted_union(ram.iter().copied()) {
        crate::dma::ranges::subtract(r, &holes, &mut out);
    }
    out
}

/// The node with `phandle` (≠ 0) and its parent, depth-first from the root; nesting is
/// bounded like the topology walk.
fn node_by_phandle<'b, 'a>(
    fdt: &'b Fdt<'a>,
    phandle: u32,
) -> Result<Option<(FdtNode<'b, 'a>, FdtNode<'b, 'a>)>, TopologyError> {
    fn walk<'b, 'a>(
        node: FdtNode<'b, 'a>,
        phandle: u32,
        depth: usize,
    ) -> Result<Option<(FdtNode<'b, 'a>, FdtNode<'b, 'a>)>, TopologyError> {
        if depth > MAX_DEPTH {
            return Err(TopologyError::InvalidFdt);
        }
        for child in node.children() {
            if phandle_of(child)? == phandle {
                return Ok(Some((child, node)));
            }
            if let Some(found) = walk(child, phandle, depth + 1)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
    if phandle == 0 {
        return Ok(None);
    }
    let root = fdt.find_node("/").ok_or(TopologyError::InvalidFdt)?;
    walk(root, phandle, 2)
}

/// The reserved regions the devicetree gives the device at `device_path` (for example a
/// virtio-mmio endpoint `/virtio_mmio@a000000`), as Linux's `of_iommu_get_resv_regions`:
/// for each `/reserved-memory` node named by the device's `memory-region` phandles, each
/// `iommu-addresses = <phandle address size>*` entry whose phandle is the device's gives an
/// IOVA range `address..address + size` (exclusive end; `address` and `size` in the cells
/// of the *named device's parent*, `#address-cells`/`#size-cells`, at most 2 each), of kind
/// [`ResvMemKind::Direct`] when it equals the node's first `reg` entry and
/// [`ResvMemKind::Reserved`] otherwise (also when the node has no `reg`). Entries for other
/// devices are skipped using their own parent's cells; entries of size 0 are skipped. A
/// device without a phandle, `memory-region` or matching entries has none (`Ok`, empty).
///
/// # Errors
///
/// [`TopologyError::NoSuchNode`] when no node has `device_path`;
/// [`TopologyError::UnknownMemoryRegion`] for a `memory-region` or `iommu-addresses` phandle
/// that names no node; [`TopologyError::MalformedProperty`] for a `memory-region` that is
/// not whole cells, an `iommu-addresses` entry cut short or passing 2^64, or a bad `reg`;
/// [`TopologyError::UnsupportedCells`] for cells above 2.
pub fn devicetree_regions(
    fdt: &Fdt<'_>,
    device_path: &str,
) -> Result<Vec<ReservedRegion>, TopologyError> {
    let device = find_path(fdt, device_path).ok_or(TopologyError::NoSuchNode)?;
    let mut out = Vec::new();
    let own = phandle_of(device)?;
    let Some(regions) = device.property("memory-region") else {
        return Ok(out);
    };
    if own == 0 {
        return Ok(out);
    }
    if regions.value.len() % 4 != 0 {
        return Err(TopologyError::MalformedProperty {
            property: "memory-region",
        });
    }
    let mut list = Cells::new(regions.value, "memory-region");
    while !list.is_empty() {
        let phandle = list.u32()?;
        let (node, parent) =
            node_by_phandle(fdt, phandle)?.ok_or(TopologyError::UnknownMemoryRegion(phandle))?;
        let (pa, ps) = cpu_cells(parent)?;
        let phys = reg_ranges(node, pa, ps)?.first().copied();
        let Some(maps) = node.property("iommu-addresses") else {
            continue;
        };
        let mut cells = Cells::new(maps.value, "iommu-addresses");
        while !cells.is_empty() {
            let target = cells.u32()?;
            let (_, target_parent) =
                node_by_phandle(fdt, target)?.ok_or(TopologyError::UnknownMemoryRegion(target))?;
            let (na, ns) = cpu_cells(target_parent)?;
            let address = cells.number(na)?;
            let size = cells.number(ns)?;
            if target != own || size == 0 {
                continue;
            }
            let iova = PhysRange::from_start_size(address, size).ok_or(
                TopologyError::MalformedProperty {
                    property: "iommu-addresses",
                },
            )?;
            let kind = if phys == Some(iova) {
                ResvMemKind::Direct
            } else {
                ResvMemKind::Reserved
            };
            out.push(ReservedRegion {
                kind,
                start: iova.start,
                end: iova.end,
            });
        }
    }
    Ok(out)
}
