//! The devicetree description of a virtio-iommu on PCI: a `virtio,pci-iommu` child of the PCIe
//! host bridge and the bridge's `iommu-map` sending every other requester ID through it — the
//! form QEMU writes for its own `virtio-iommu-pci` (Linux
//! `Documentation/devicetree/bindings/virtio/iommu.yaml`, `pci-iommu.yaml`).

use crate::devicetree::{cells, string_list, DeviceTree, Node};
use crate::{Error, Result};

/// `compatible` of the generic ECAM host bridge QEMU's `-M virt` describes.
pub const PCI_HOST_COMPATIBLE: &str = "pci-host-ecam-generic";

/// Number of requester IDs an `iommu-map` of a single-segment host bridge covers (bus 0–255,
/// 8 bits of devfn).
const RID_SPACE: u32 = 0x1_0000;

/// The path of the one PCIe host bridge in `tree`.
///
/// # Errors
///
/// [`Error::Devicetree`] when there is no node compatible with [`PCI_HOST_COMPATIBLE`] or more
/// than one.
pub fn pci_host_bridge(tree: &DeviceTree) -> Result<String> {
    let mut bridges = tree.find_compatible(PCI_HOST_COMPATIBLE);
    match bridges.len() {
        1 => Ok(bridges.remove(0)),
        0 => Err(Error::Devicetree {
            reason: format!("no `{PCI_HOST_COMPATIBLE}` node"),
        }),
        n => Err(Error::Devicetree {
            reason: format!("{n} `{PCI_HOST_COMPATIBLE}` nodes ({bridges:?}); expected one"),
        }),
    }
}

/// The `iommu-map` cells of a host bridge whose IOMMU (phandle `iommu`) has requester ID
/// `iommu_rid`: every requester ID except the IOMMU's own is translated, with the output ID
/// (the endpoint ID) equal to the input, in at most two entries `<rid-base iommu id-base
/// length>`; entries of length 0 are left out.
pub fn iommu_map_cells(iommu: u32, iommu_rid: u16) -> Vec<u32> {
    let rid = u32::from(iommu_rid);
    let mut map = Vec::with_capacity(8);
    if rid > 0 {
        map.extend([0, iommu, 0, rid]);
    }
    let after = rid + 1;
    if after < RID_SPACE {
        map.extend([after, iommu, after, RID_SPACE - after]);
    }
    map
}

/// Adds a virtio-iommu at bus 0, `devfn` (slot << 3 | function) to `tree` as QEMU describes its
/// own `virtio-iommu-pci`: under the PCIe host bridge a child
/// `virtio_iommu@<slot>,<function> { compatible = "virtio,pci-iommu", "pci1af4,1057";
/// reg = <(devfn << 8) 0 0 0 0>; #iommu-cells = <1>; phandle = <new>; }`, and on the bridge
/// `iommu-map` from [`iommu_map_cells`] (endpoint ID = requester ID). Returns the new node's
/// phandle.
///
/// # Errors
///
/// [`Error::Devicetree`] when the tree has no single host bridge, the bridge already has an
/// `iommu-map` or `iommu-map-mask`, a child of that name exists, or no phandle is left.
pub fn add_pci_iommu(tree: &mut DeviceTree, devfn: u8) -> Result<u32> {
    let bridge_path = pci_host_bridge(tree)?;
    let phandle = tree.allocate_phandle()?;
    let bridge = tree
        .node_mut(&bridge_path)
        .ok_or_else(|| Error::Devicetree {
            reason: format!("{bridge_path} vanished"),
        })?;
    for property in ["iommu-map", "iommu-map-mask"] {
        if bridge.property(property).is_some() {
            return Err(Error::Devicetree {
                reason: format!("{bridge_path} already has `{property}`"),
            });
        }
    }
    let mut node = Node::new(format!("virtio_iommu@{:x},{:x}", devfn >> 3, devfn & 7));
    // In QEMU's order (hw/arm/virt.c writes them so).
    node.set_property("phandle", cells(&[phandle]));
    node.set_property("#iommu-cells", cells(&[1]));
    node.set_property("reg", cells(&[u32::from(devfn) << 8, 0, 0, 0, 0]));
    node.set_property(
        "compatible",
        string_list(&["virtio,pci-iommu", "pci1af4,1057"]),
    );
    bridge.add_child(node)?;
    bridge.set_property(
        "iommu-map",
        cells(&iommu_map_cells(phandle, u16::from(devfn))),
    );
    Ok(phandle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> DeviceTree {
        let mut root = Node::new("");
        let mut pcie = Node::new("pcie@10000000");
        pcie.set_property("compatible", string_list(&[PCI_HOST_COMPATIBLE]));
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
    fn map_like_qemus() {
        // QEMU 11.1, virtio-iommu-pci at 00:01.0: <0x0 0x9000 0x0 0x8 0x9 0x9000 0x9 0xfff7>.
        assert_eq!(
            iommu_map_cells(0x9000, 8),
            [0, 0x9000, 0, 8, 9, 0x9000, 9, 0xfff7]
        );
        assert_eq!(iommu_map_cells(7, 0), [1, 7, 1, 0xffff]);
        assert_eq!(iommu_map_cells(7, 0xffff), [0, 7, 0, 0xffff]);
    }

    #[test]
    fn node_and_map_added() {
        let mut t = tree();
        let phandle = add_pci_iommu(&mut t, 0x0d).unwrap();
        assert_eq!(phandle, 0x8003);
        let bridge = t.node("/pcie@10000000").unwrap();
        assert_eq!(
            bridge.u32_cells("iommu-map").unwrap(),
            [0, phandle, 0, 0x0d, 0x0e, phandle, 0x0e, 0x10000 - 0x0e]
        );
        let node = bridge
            .child("virtio_iommu@1,5")
            .expect("node name slot,function");
        assert_eq!(node.compatible(), ["virtio,pci-iommu", "pci1af4,1057"]);
        assert_eq!(node.u32_cells("reg").unwrap(), [0x0d00, 0, 0, 0, 0]);
        assert_eq!(node.u32_cells("#iommu-cells").unwrap(), [1]);
        // Serializable (phandles unique) and a second IOMMU is refused.
        t.to_dtb().unwrap();
        assert!(add_pci_iommu(&mut t, 0x10).is_err());
    }

    #[test]
    fn bridge_required_once() {
        let mut t = DeviceTree::default();
        assert!(add_pci_iommu(&mut t, 8).is_err());
        let mut t = tree();
        let mut second = Node::new("pcie@20000000");
        second.set_property("compatible", string_list(&[PCI_HOST_COMPATIBLE]));
        t.root.children.push(second);
        assert!(add_pci_iommu(&mut t, 8).is_err());
    }
}
