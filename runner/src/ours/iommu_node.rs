//! The devicetree description of a virtio-iommu on PCI: a `virtio,pci-iommu` child of the PCIe
//! host bridge and the bridge's `iommu-map` sending requester IDs through it (Linux
//! `Documentation/devicetree/bindings/virtio/iommu.yaml`, `pci-iommu.yaml`): every other
//! requester ID, the form QEMU writes for its own `virtio-iommu-pci` (`AllExcept(vec![])`), all
//! but some ([`Coverage::AllExcept`]), or only some ([`Coverage::Only`]).
//!
//! Against our device the runner uses QEMU's form too: our server serves the host bridge
//! 00:00.0 (QEMU's own function, not a vfio-user device) as an endpoint, as QEMU's device
//! does, and requester IDs without a device stay covered, so the firmware has endpoint IDs that
//! exist in the topology but not in the IOMMU (its S_NOENT cases).

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

/// Which requester IDs of the host bridge go through the IOMMU (endpoint ID = requester ID).
/// The IOMMU's own is never covered.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Coverage {
    /// Every requester ID except these (`AllExcept(vec![])`: QEMU's form for its own
    /// virtio-iommu-pci).
    AllExcept(Vec<u16>),
    /// Only these requester IDs.
    Only(Vec<u16>),
}

impl Coverage {
    /// The covered requester IDs as `(first, count)` runs, ascending, within `0..=0xffff`,
    /// never including `iommu_rid`.
    pub fn runs(&self, iommu_rid: u16) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        match self {
            Self::AllExcept(excluded) => {
                let mut cut: Vec<u32> = excluded.iter().map(|&r| u32::from(r)).collect();
                cut.push(u32::from(iommu_rid));
                cut.sort_unstable();
                cut.dedup();
                let mut start = 0u32;
                for c in cut.into_iter().chain(std::iter::once(RID_SPACE)) {
                    if c > start {
                        out.push((start as u16, c - start));
                    }
                    start = c + 1;
                }
            }
            Self::Only(rids) => {
                let mut rids = rids.clone();
                rids.sort_unstable();
                rids.dedup();
                out.extend(rids.into_iter().filter(|&r| r != iommu_rid).map(|r| (r, 1)));
            }
        }
        out
    }
}

/// The `iommu-map` cells of a host bridge whose IOMMU (phandle `iommu`) has requester ID
/// `iommu_rid`, as `coverage` says, with the output ID (the endpoint ID) equal to the input:
/// one entry `<rid-base iommu id-base length>` per run of [`Coverage::runs`].
pub fn iommu_map_cells(iommu: u32, iommu_rid: u16, coverage: &Coverage) -> Vec<u32> {
    coverage
        .runs(iommu_rid)
        .into_iter()
        .flat_map(|(first, count)| [u32::from(first), iommu, u32::from(first), count])
        .collect()
}

/// Adds a virtio-iommu at bus 0, `devfn` (slot << 3 | function) to `tree` as QEMU describes its
/// own `virtio-iommu-pci`: under the PCIe host bridge a child
/// `virtio_iommu@<slot>,<function> { compatible = "virtio,pci-iommu", "pci1af4,1057";
/// reg = <(devfn << 8) 0 0 0 0>; #iommu-cells = <1>; phandle = <new>; }`, and on the bridge
/// `iommu-map` from [`iommu_map_cells`] for `coverage` (endpoint ID = requester ID). Returns
/// the new node's phandle.
///
/// # Errors
///
/// [`Error::Devicetree`] when the tree has no single host bridge, the bridge already has an
/// `iommu-map` or `iommu-map-mask`, a child of that name exists, or no phandle is left.
pub fn add_pci_iommu(tree: &mut DeviceTree, devfn: u8, coverage: &Coverage) -> Result<u32> {
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
        cells(&iommu_map_cells(phandle, u16::from(devfn), coverage)),
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
        let all = Coverage::AllExcept(vec![]);
        assert_eq!(
            iommu_map_cells(0x9000, 8, &Coverage::AllExcept(vec![0, 8])),
            [1, 0x9000, 1, 7, 9, 0x9000, 9, 0xfff7],
            "the host bridge left out too"
        );
        assert_eq!(
            iommu_map_cells(0x9000, 8, &all),
            [0, 0x9000, 0, 8, 9, 0x9000, 9, 0xfff7]
        );
        assert_eq!(iommu_map_cells(7, 0, &all), [1, 7, 1, 0xffff]);
        assert_eq!(iommu_map_cells(7, 0xffff, &all), [0, 7, 0, 0xffff]);
    }

    #[test]
    fn map_of_given_endpoints() {
        let only = Coverage::Only(vec![0x18, 0x10, 0x18, 0x08]);
        assert_eq!(
            iommu_map_cells(5, 8, &only),
            [0x10, 5, 0x10, 1, 0x18, 5, 0x18, 1],
            "sorted, deduplicated, without the IOMMU's own"
        );
        assert!(iommu_map_cells(5, 8, &Coverage::Only(vec![])).is_empty());
    }

    #[test]
    fn node_and_map_added() {
        let mut t = tree();
        let phandle = add_pci_iommu(&mut t, 0x0d, &Coverage::AllExcept(vec![])).unwrap();
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
        assert!(add_pci_iommu(&mut t, 0x10, &Coverage::AllExcept(vec![])).is_err());
    }

    #[test]
    fn bridge_required_once() {
        let mut t = DeviceTree::default();
        assert!(add_pci_iommu(&mut t, 8, &Coverage::AllExcept(vec![])).is_err());
        let mut t = tree();
        let mut second = Node::new("pcie@20000000");
        second.set_property("compatible", string_list(&[PCI_HOST_COMPATIBLE]));
        t.root.children.push(second);
        assert!(add_pci_iommu(&mut t, 8, &Coverage::AllExcept(vec![])).is_err());
    }
}
