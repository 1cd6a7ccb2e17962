//! `Topology::alias_groups` / `endpoints_sharing` (#10 item 4): PCI requester IDs that
//! `iommu-map` and `iommu-map-mask` send to one endpoint ID (`pci/pci-iommu.txt`), on DTBs
//! built with vm-fdt.

use virtio_iommu_driver::topology::{AliasGroup, RequesterIds, Topology, TopologyError};
use vm_fdt::FdtWriter;

const PH: u32 = 0x8001;

/// A tree with a virtio-iommu (phandle `PH`) on the first bridge and one bridge per
/// `(name, iommu-map, iommu-map-mask, bus-range)`.
/// A host bridge: node name, `iommu-map` cells, `iommu-map-mask`, `bus-range`.
type BridgeSpec<'a> = (&'a str, Vec<u32>, Option<u32>, (u32, u32));

fn tree(bridges: &[BridgeSpec<'_>]) -> Topology {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    for (i, (name, map, mask, buses)) in bridges.iter().enumerate() {
        let n = w.begin_node(name).unwrap();
        w.property_string("compatible", "pci-host-ecam-generic")
            .unwrap();
        w.property_array_u32("reg", &[0x40 + i as u32, 0, 0, 0x1000_0000])
            .unwrap();
        w.property_array_u32("bus-range", &[buses.0, buses.1])
            .unwrap();
        w.property_u32("#address-cells", 3).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_array_u32("iommu-map", map).unwrap();
        if let Some(mask) = mask {
            w.property_u32("iommu-map-mask", *mask).unwrap();
        }
        if i == 0 {
            let c = w.begin_node("virtio_iommu@1,0").unwrap();
            w.property_string("compatible", "virtio,pci-iommu").unwrap();
            w.property_array_u32("reg", &[0x800, 0, 0, 0, 0]).unwrap();
            w.property_u32("#iommu-cells", 1).unwrap();
            w.property_u32("phandle", PH).unwrap();
            w.end_node(c).unwrap();
        }
        w.end_node(n).unwrap();
    }
    w.end_node(root).unwrap();
    Topology::from_dtb(&w.finish().unwrap()).unwrap()
}

fn ids(host_bridge: usize, first: u16, last: u16) -> RequesterIds {
    RequesterIds {
        host_bridge,
        first,
        last,
    }
}

/// QEMU `virt`'s map (every RID but the IOMMU's own, one to one): nobody shares.
#[test]
fn one_to_one_map_has_no_aliases() {
    let t = tree(&[(
        "pcie@10000000",
        vec![0, PH, 0, 8, 9, PH, 9, 0xfff7],
        None,
        (0, 0xff),
    )]);
    assert_eq!(t.alias_groups(), []);
    let alone = t.endpoints_sharing(0, 0x10).unwrap().unwrap();
    assert_eq!(alone.requester_ids, [ids(0, 0x10, 0x10)]);
    assert_eq!(
        (alone.endpoint_id, alone.iommu, alone.len()),
        (0x10, Some(0), 1)
    );
    // The IOMMU's own RID is not behind it.
    assert_eq!(t.endpoints_sharing(0, 8).unwrap(), None);
    assert_eq!(
        t.endpoints_sharing(1, 8),
        Err(TopologyError::NoSuchHostBridge(1))
    );
}

/// `iommu-map-mask = <0xfff8>`: the eight functions of each device are one endpoint.
#[test]
fn a_mask_folds_functions_together() {
    let t = tree(&[(
        "pcie@10000000",
        vec![0, PH, 0, 0x1_0000],
        Some(0xfff8),
        (0, 1),
    )]);
    let groups = t.alias_groups();
    // Buses 0 and 1: 2 × 32 devices.
    assert_eq!(groups.len(), 64);
    assert!(groups.iter().all(|g| g.len() == 8 && g.iommu == Some(0)));
    let g = t.endpoints_sharing(0, 0x0113).unwrap().unwrap();
    assert_eq!(
        g,
        AliasGroup {
            iommu_phandle: PH,
            iommu: Some(0),
            endpoint_id: 0x0110,
            requester_ids: vec![ids(0, 0x0110, 0x0117)],
        }
    );
    assert!(g.contains(0, 0x0110) && !g.contains(0, 0x0118) && !g.contains(1, 0x0111));
    // Bus 2 is outside bus-range: not counted.
    assert!(groups.iter().all(|g| !g.contains(0, 0x0200)));
}

/// A mask dropping the bus number makes RIDs of different buses one endpoint (strided runs),
/// and entries of two bridges naming the same endpoint ID make a cross-bridge group.
#[test]
fn strided_and_cross_bridge_aliases() {
    let t = tree(&[
        ("pcie@10000000", vec![0, PH, 0, 0x100], Some(0x00ff), (0, 2)),
        ("pcie@20000000", vec![0x28, PH, 0x28, 1], None, (0, 0)),
    ]);
    let g = t.endpoints_sharing(0, 0x0228).unwrap().unwrap();
    assert_eq!(g.endpoint_id, 0x28);
    assert_eq!(
        g.requester_ids,
        [
            ids(0, 0x0028, 0x0028),
            ids(0, 0x0128, 0x0128),
            ids(0, 0x0228, 0x0228),
            ids(1, 0x0028, 0x0028),
        ]
    );
    assert_eq!(g.len(), 4);
    let groups = t.alias_groups();
    assert_eq!(groups.len(), 0x100);
    assert_eq!(groups.iter().map(AliasGroup::len).sum::<usize>(), 0x300 + 1);
}
