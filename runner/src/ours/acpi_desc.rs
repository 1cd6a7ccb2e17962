//! The ACPI description of our PCI virtio-iommu, for the guest's `etc/acpi/tables`: QEMU builds
//! a VIOT only for its own virtio-iommu, so against our device the runner turns QEMU's ACPI off
//! (`-machine acpi=off`) and gives the guest an MCFG and a VIOT of its own through `-fw_cfg`,
//! describing the same host bridge and IOMMU as the devicetree (QEMU's layout: the IOMMU node
//! first, then one PCI range per host bridge with endpoint ID = BDF).

use crate::acpi::{self, AcpiBlob, McfgEntry, ViotNode};
use crate::devicetree::DeviceTree;
use crate::{Error, Result};

use super::iommu_node::{pci_host_bridge, Coverage};

/// A devicetree error.
fn dt_error(reason: String) -> Error {
    Error::Devicetree { reason }
}

/// The ECAM window, segment and bus range of the tree's one PCIe host bridge (its `reg` in the
/// root's `#address-cells`/`#size-cells`, `linux,pci-domain`, `bus-range`).
///
/// # Errors
///
/// [`Error::Devicetree`] when there is no single host bridge or its properties are malformed.
pub fn host_bridge_ecam(tree: &DeviceTree) -> Result<McfgEntry> {
    let path = pci_host_bridge(tree)?;
    let bridge = tree
        .node(&path)
        .ok_or_else(|| dt_error(format!("{path} vanished")))?;
    let cells = |name: &str, default: usize| {
        tree.root
            .u32_cells(name)
            .and_then(|c| c.first().copied())
            .map_or(Ok(default), |c| {
                usize::try_from(c)
                    .ok()
                    .filter(|&c| c == 1 || c == 2)
                    .ok_or_else(|| dt_error(format!("/{name} = {c}: not 1 or 2")))
            })
    };
    let (address_cells, size_cells) = (cells("#address-cells", 2)?, cells("#size-cells", 1)?);
    let reg = bridge
        .u32_cells("reg")
        .filter(|r| r.len() >= address_cells + size_cells)
        .ok_or_else(|| dt_error(format!("{path}: no usable reg")))?;
    let base = reg[..address_cells]
        .iter()
        .fold(0u64, |v, &c| v << 32 | u64::from(c));
    let (bus_start, bus_end) = match bridge.u32_cells("bus-range").as_deref() {
        None => (0, 255),
        Some([start, end]) if start <= end && *end <= 255 => (*start as u8, *end as u8),
        Some(other) => return Err(dt_error(format!("{path}: bus-range {other:?}"))),
    };
    let segment = match bridge.u32_cells("linux,pci-domain").as_deref() {
        None => 0,
        Some([domain]) => u16::try_from(*domain)
            .map_err(|_| dt_error(format!("{path}: linux,pci-domain {domain}")))?,
        Some(other) => return Err(dt_error(format!("{path}: linux,pci-domain {other:?}"))),
    };
    Ok(McfgEntry {
        base,
        segment,
        bus_start,
        bus_end,
    })
}

/// MCFG and VIOT (and the XSDT) for a virtio-iommu at `devfn` on the first bus of the tree's
/// host bridge, translating the BDFs `coverage` names with endpoint ID = BDF, as the
/// `iommu-map` of [`super::add_pci_iommu`]: one PCI range node per run of requester IDs within
/// the bridge's bus range. `AllExcept(vec![])` gives QEMU's single range over the whole bus
/// range, which includes the IOMMU's own BDF (the guest excludes it, VIOT §5.2.32.3);
/// otherwise the IOMMU's BDF is left out as in the `iommu-map`.
///
/// # Errors
///
/// Those of [`host_bridge_ecam`]; [`Error::Devicetree`] when the VIOT would exceed 64 KiB.
pub fn pci_iommu_acpi(tree: &DeviceTree, devfn: u8, coverage: &Coverage) -> Result<AcpiBlob> {
    let ecam = host_bridge_ecam(tree)?;
    let first = u32::from(ecam.bus_start) << 8;
    let end = (u32::from(ecam.bus_end) << 8 | 0xff) + 1;
    let iommu_bdf = (first as u16) | u16::from(devfn);
    let range = |start: u32, last: u32| ViotNode::PciRange {
        endpoint_start: start,
        segment_start: ecam.segment,
        segment_end: ecam.segment,
        bdf_start: start as u16,
        bdf_end: last as u16,
        output: 0,
    };
    let mut nodes = vec![ViotNode::VirtioPciIommu {
        segment: ecam.segment,
        bdf: iommu_bdf,
    }];
    if *coverage == Coverage::AllExcept(Vec::new()) {
        nodes.push(range(first, end - 1));
    } else {
        for (start, count) in coverage.runs(iommu_bdf) {
            // Clipped to the bridge's buses (both ends within 0..=0xffff).
            let (lo, hi) = (
                u32::from(start).max(first),
                (u32::from(start) + count).min(end),
            );
            if lo < hi {
                nodes.push(range(lo, hi - 1));
            }
        }
    }
    let viot = acpi::viot(&nodes).map_err(dt_error)?;
    Ok(acpi::blob(&[acpi::mcfg(&[ecam]), viot]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devicetree::{cells, string_list, Node};

    fn tree(reg: &[u32], bus_range: Option<&[u32]>) -> DeviceTree {
        let mut root = Node::new("");
        root.set_property("#address-cells", cells(&[2]));
        root.set_property("#size-cells", cells(&[2]));
        let mut pcie = Node::new("pcie@10000000");
        pcie.set_property("compatible", string_list(&["pci-host-ecam-generic"]));
        pcie.set_property("reg", cells(reg));
        if let Some(range) = bus_range {
            pcie.set_property("bus-range", cells(range));
        }
        pcie.set_property("linux,pci-domain", cells(&[0]));
        root.children.push(pcie);
        DeviceTree {
            root,
            ..DeviceTree::default()
        }
    }

    #[test]
    fn ecam_from_the_tree() {
        let t = tree(&[0x40, 0x1000_0000, 0, 0x1000_0000], Some(&[0, 255]));
        assert_eq!(
            host_bridge_ecam(&t).unwrap(),
            McfgEntry {
                base: 0x40_1000_0000,
                segment: 0,
                bus_start: 0,
                bus_end: 255
            }
        );
        let low = tree(&[0, 0x3f00_0000, 0, 0x100_0000], Some(&[0, 15]));
        assert_eq!(host_bridge_ecam(&low).unwrap().base, 0x3f00_0000);
        assert!(host_bridge_ecam(&tree(&[0x40], None)).is_err(), "short reg");
        assert!(host_bridge_ecam(&tree(&[0, 0, 0, 0], Some(&[3, 1]))).is_err());
    }

    #[test]
    fn viot_names_our_iommu() {
        use virtio_iommu_driver::topology::{IommuLocation, Topology};
        let t = tree(&[0x40, 0x1000_0000, 0, 0x1000_0000], Some(&[0, 255]));
        let blob = pci_iommu_acpi(&t, 0x28, &Coverage::AllExcept(vec![])).unwrap();
        let topology = Topology::from_acpi_tables(&blob.tables).unwrap();
        assert_eq!(
            topology.iommus[0].location,
            IommuLocation::Pci {
                host_bridge: 0,
                requester_id: 0x28
            }
        );
        let blk = topology.pci_endpoint(0, 0x10).unwrap().unwrap();
        assert_eq!(blk.endpoint_id, 0x10);
        let far = topology.pci_endpoint(0, 0x3f18).unwrap().unwrap();
        assert_eq!(far.endpoint_id, 0x3f18, "every bus of the bridge");
        // All but the host bridge: 0 untranslated, empty slots covered.
        let blob = pci_iommu_acpi(&t, 0x28, &Coverage::AllExcept(vec![0])).unwrap();
        let topology = Topology::from_acpi_tables(&blob.tables).unwrap();
        for (rid, expected) in [(0, None), (1, Some(1)), (0x28, None), (0x29, Some(0x29))] {
            let ep = topology.pci_endpoint(0, rid).unwrap();
            assert_eq!(ep.map(|e| e.endpoint_id), expected, "rid {rid:#x}");
        }
        // Only our endpoints: the host bridge (0) and anything else stay untranslated.
        let only = Coverage::Only(vec![0x18, 0x10]);
        let blob = pci_iommu_acpi(&t, 0x28, &only).unwrap();
        let topology = Topology::from_acpi_tables(&blob.tables).unwrap();
        for (rid, expected) in [
            (0x10, Some(0x10)),
            (0x18, Some(0x18)),
            (0, None),
            (0x11, None),
        ] {
            let ep = topology.pci_endpoint(0, rid).unwrap();
            assert_eq!(ep.map(|e| e.endpoint_id), expected, "rid {rid:#x}");
        }
    }
}
