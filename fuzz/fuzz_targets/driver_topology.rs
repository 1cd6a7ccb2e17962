//! Devicetree topology discovery on arbitrary bytes: `Topology::from_dtb` (which checks the
//! blob with `validated_fdt` before the `fdt` crate walks it), then the lookups on what it
//! found: `pci_endpoint` for a few requester IDs on every host bridge, `ecam_offset`, and
//! `platform_endpoints` on the `validated_fdt` of the same bytes for every node path (the
//! `Fdt` from `validated_fdt` is the only one safe to walk on untrusted bytes). Never panics;
//! and what is returned is consistent (indexes in range, ECAM offsets inside the region,
//! requester IDs mapped by the first covering `iommu-map` entry).
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_iommu_driver::topology::{validated_fdt, IommuLocation, Topology, TopologyError};

/// Full paths of the tree's nodes, depth first, at most `limit` of them. A node whose name
/// contains `/` (and its subtree) is left out: no path can name it.
fn node_paths(fdt: &fdt::Fdt<'_>, limit: usize) -> Vec<String> {
    fn walk(node: fdt::node::FdtNode<'_, '_>, path: &str, out: &mut Vec<String>, limit: usize) {
        for child in node.children() {
            if out.len() >= limit {
                return;
            }
            if child.name.contains('/') {
                continue;
            }
            let p = if path == "/" {
                format!("/{}", child.name)
            } else {
                format!("{path}/{}", child.name)
            };
            out.push(p.clone());
            walk(child, &p, out, limit);
        }
    }
    let mut out = vec!["/".to_string()];
    if let Some(root) = fdt.find_node("/") {
        walk(root, "/", &mut out, limit);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if std::env::var_os("FUZZ_STATS").is_some() {
        let r = Topology::from_dtb(data);
        let v = validated_fdt(data).is_ok();
        match &r {
            Ok(t) => eprintln!(
                "stats: ok valid={v} iommus={} bridges={}",
                t.iommus.len(),
                t.host_bridges.len()
            ),
            Err(e) => eprintln!("stats: err valid={v} {e:?}"),
        }
    }
    let topo = match Topology::from_dtb(data) {
        Ok(t) => t,
        Err(TopologyError::InvalidFdt) => {
            // Validation already bounds the depth and requires a root, so InvalidFdt only
            // comes from it.
            assert!(
                validated_fdt(data).is_err(),
                "InvalidFdt from a validated blob"
            );
            return;
        }
        Err(_) => {
            // The blob is structurally valid: the Fdt can be walked.
            let fdt = validated_fdt(data).expect("from_dtb passed validation");
            let _ = node_paths(&fdt, 64);
            return;
        }
    };
    let fdt = validated_fdt(data).expect("from_dtb succeeded, validation must too");

    for iommu in &topo.iommus {
        if let IommuLocation::Pci { host_bridge, .. } = iommu.location {
            assert!(host_bridge < topo.host_bridges.len());
        }
        if iommu.phandle != 0 {
            let i = topo.iommu_by_phandle(iommu.phandle).unwrap();
            assert_eq!(topo.iommus[i].phandle, iommu.phandle);
        }
    }
    let mut rids = vec![0u16, 8, 0x10, 0x18, 0x100, 0xffff];
    if let Some(tail) = data.get(data.len().saturating_sub(2)..) {
        if tail.len() == 2 {
            rids.push(u16::from_be_bytes([tail[0], tail[1]]));
        }
    }
    for (b, bridge) in topo.host_bridges.iter().enumerate() {
        assert!(bridge.bus_start <= bridge.bus_end);
        assert!(bridge.ecam_size >= 1 << 20);
        for &rid in &rids {
            let found = topo.pci_endpoint(b, rid);
            let mapped = bridge.map_requester_id(rid);
            match found {
                Ok(Some(ep)) => {
                    assert!(ep.iommu < topo.iommus.len());
                    let (ph, id) = mapped.expect("endpoint without a mapping");
                    assert_eq!(topo.iommus[ep.iommu].phandle, ph);
                    assert_eq!(ep.endpoint_id, id);
                }
                Ok(None) => assert!(mapped.is_none()),
                Err(TopologyError::UnknownPhandle(p)) => {
                    assert_eq!(mapped.map(|m| m.0), Some(p));
                    assert!(topo.iommu_by_phandle(p).is_none());
                }
                Err(e) => panic!("pci_endpoint: unexpected {e:?}"),
            }
            if let Some((_, id)) = mapped {
                // The first entry covering the masked RID is the one used.
                let masked = u32::from(rid) & bridge.iommu_map_mask;
                let e = bridge
                    .iommu_map
                    .iter()
                    .find(|e| {
                        masked >= e.rid_base
                            && u64::from(masked) < u64::from(e.rid_base) + u64::from(e.length)
                    })
                    .expect("mapped by no entry");
                assert_eq!(
                    u64::from(id),
                    u64::from(e.endpoint_base) + u64::from(masked - e.rid_base)
                );
            }
            let (bus, dev, func) = ((rid >> 8) as u8, ((rid >> 3) & 0x1f) as u8, (rid & 7) as u8);
            if let Some(off) = bridge.ecam_offset(bus, dev, func) {
                assert!(
                    off + 4096 <= bridge.ecam_size,
                    "ECAM offset past the region"
                );
            }
        }
        assert_eq!(
            topo.pci_endpoint(topo.host_bridges.len(), 0),
            Err(TopologyError::NoSuchHostBridge(topo.host_bridges.len()))
        );
    }
    let existing = node_paths(&fdt, 64);
    for path in existing.iter().map(String::as_str).chain([
        "/",
        "",
        "//",
        "/nonexistent",
        "/a/b/c",
        "/pcie",
        "/pcie@10000000/virtio_iommu@1,0",
    ]) {
        match topo.platform_endpoints(&fdt, path) {
            Ok(eps) => {
                for ep in eps {
                    assert!(ep.iommu < topo.iommus.len());
                }
            }
            Err(TopologyError::UnknownPhandle(p)) => assert!(topo.iommu_by_phandle(p).is_none()),
            Err(TopologyError::MalformedProperty { property: "iommus" }) => {}
            // Only a path that names no node; every path of the tree exists.
            Err(TopologyError::NoSuchNode) => assert!(!existing.iter().any(|p| p == path)),
            Err(e) => panic!("platform_endpoints({path}): unexpected {e:?}"),
        }
    }
});
