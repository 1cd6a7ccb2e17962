//! Host tests of the ACPI topology path (`topology::viot`, `topology::acpi`) on hand-made VIOT
//! and MCFG tables. The tables are assembled byte by byte here (not with the driver's
//! `zerocopy` structs), so a layout mistake in the driver cannot hide behind the same mistake in
//! the tests.

use proptest::prelude::*;
use virtio_iommu_driver::topology::acpi::{mcfg_entries, tables, AcpiError, McfgEntry};
use virtio_iommu_driver::topology::viot::{Viot, ViotIommuLocation};
use virtio_iommu_driver::topology::{Endpoint, IommuLocation, IommuMapEntry, Topology};
use vm_fdt::FdtWriter;

/// A table with `signature`, a standard header (QEMU's OEM strings) and `body`, checksummed.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, fixed below
    t.extend_from_slice(b"BOCHS ");
    t.extend_from_slice(b"BXPC    ");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"BXPC");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    fix_checksum(&mut t);
    t
}

/// Sets byte 9 so that the whole buffer sums to 0 modulo 256.
fn fix_checksum(t: &mut [u8]) {
    t[9] = 0;
    let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
}

fn le16(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}

/// virtio-pci IOMMU node (type 3, 16 bytes).
fn pci_iommu(segment: u16, bdf: u16) -> Vec<u8> {
    let mut n = vec![3, 0];
    n.extend_from_slice(&le16(16));
    n.extend_from_slice(&le16(segment));
    n.extend_from_slice(&le16(bdf));
    n.extend_from_slice(&[0; 8]);
    n
}

/// virtio-mmio IOMMU node (type 4, 16 bytes).
fn mmio_iommu(base: u64) -> Vec<u8> {
    let mut n = vec![4, 0];
    n.extend_from_slice(&le16(16));
    n.extend_from_slice(&[0; 4]);
    n.extend_from_slice(&base.to_le_bytes());
    n
}

/// PCI range node (type 1, 24 bytes).
fn pci_range(endpoint_start: u32, segments: (u16, u16), bdfs: (u16, u16), output: u16) -> Vec<u8> {
    let mut n = vec![1, 0];
    n.extend_from_slice(&le16(24));
    n.extend_from_slice(&endpoint_start.to_le_bytes());
    n.extend_from_slice(&le16(segments.0));
    n.extend_from_slice(&le16(segments.1));
    n.extend_from_slice(&le16(bdfs.0));
    n.extend_from_slice(&le16(bdfs.1));
    n.extend_from_slice(&le16(output));
    n.extend_from_slice(&[0; 6]);
    n
}

/// MMIO endpoint node (type 2, 24 bytes).
fn mmio_endpoint(endpoint_id: u32, base: u64, output: u16) -> Vec<u8> {
    let mut n = vec![2, 0];
    n.extend_from_slice(&le16(24));
    n.extend_from_slice(&endpoint_id.to_le_bytes());
    n.extend_from_slice(&base.to_le_bytes());
    n.extend_from_slice(&le16(output));
    n.extend_from_slice(&[0; 6]);
    n
}

/// A VIOT with `nodes` back to back from offset 48.
fn viot(nodes: &[Vec<u8>]) -> Vec<u8> {
    viot_with(nodes.len() as u16, 48, nodes)
}

/// A VIOT with the given `node_count` and `node_offset` fields, `nodes` from offset 48.
fn viot_with(count: u16, offset: u16, nodes: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&le16(count));
    body.extend_from_slice(&le16(offset));
    body.extend_from_slice(&[0; 8]);
    for n in nodes {
        body.extend_from_slice(n);
    }
    table(b"VIOT", 0, &body)
}

/// An MCFG with `(base of bus 0, segment, start bus, end bus)` entries.
fn mcfg(entries: &[(u64, u16, u8, u8)]) -> Vec<u8> {
    let mut body = vec![0; 8];
    for &(base, segment, start, end) in entries {
        body.extend_from_slice(&base.to_le_bytes());
        body.extend_from_slice(&le16(segment));
        body.push(start);
        body.push(end);
        body.extend_from_slice(&[0; 4]);
    }
    table(b"MCFG", 1, &body)
}

/// What QEMU builds for `-M virt -device virtio-iommu-pci` (hw/acpi/viot.c): the virtio-pci
/// IOMMU at 0000:00:01.0 first (offset 48), then one PCI range per host bridge, BDFs
/// `min_bus:00.0 ..= max_bus:1f.7` of the buses that exist (`bus_end` here; QEMU gives 0 when
/// there is no PCI bridge, see [`QEMU_72_VIOT`]), endpoint start = BDF start, output node 48.
fn qemu_viot(bus_end: u8) -> Vec<u8> {
    viot(&[
        pci_iommu(0, 0x08),
        pci_range(0, (0, 0), (0, u16::from(bus_end) << 8 | 0xff), 48),
    ])
}

/// QEMU `virt`'s MCFG with highmem ECAM (256 buses at 0x40_1000_0000).
fn qemu_mcfg() -> Vec<u8> {
    mcfg(&[(0x40_1000_0000, 0, 0, 0xff)])
}

/// The devicetree side of the same machine: QEMU `virt`'s `pcie@10000000` with the
/// virtio-iommu at 00:01.0 and `iommu-map` around its RID 8.
fn qemu_dtb() -> Vec<u8> {
    let ph = 0x8001;
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    let pcie = w.begin_node("pcie@10000000").unwrap();
    w.property_string("compatible", "pci-host-ecam-generic")
        .unwrap();
    w.property_array_u32("reg", &[0x40, 0x1000_0000, 0, 0x1000_0000])
        .unwrap();
    w.property_array_u32("bus-range", &[0, 0xff]).unwrap();
    w.property_u32("#address-cells", 3).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_array_u32("iommu-map", &[0, ph, 0, 8, 9, ph, 9, 0xfff7])
        .unwrap();
    let iommu = w.begin_node("virtio_iommu@1,0").unwrap();
    w.property_string("compatible", "virtio,pci-iommu").unwrap();
    w.property_array_u32("reg", &[0x800, 0, 0, 0, 0]).unwrap();
    w.property_u32("#iommu-cells", 1).unwrap();
    w.property_u32("phandle", ph).unwrap();
    w.end_node(iommu).unwrap();
    w.end_node(pcie).unwrap();
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

fn ep(iommu: usize, endpoint_id: u32) -> Option<Endpoint> {
    Some(Endpoint { iommu, endpoint_id })
}

#[test]
fn qemu_viot_agrees_with_the_devicetree() {
    let acpi = Topology::from_viot(&qemu_viot(0xff), Some(&qemu_mcfg())).unwrap();
    let dt = Topology::from_dtb(&qemu_dtb()).unwrap();

    assert_eq!(acpi.iommus.len(), 1);
    assert_eq!(acpi.iommus[0].location, dt.iommus[0].location);
    assert_eq!(
        acpi.iommus[0].location,
        IommuLocation::Pci {
            host_bridge: 0,
            requester_id: 8
        }
    );
    assert_eq!(acpi.iommus[0].phandle, 48);
    assert_eq!(acpi.iommus[0].path, "VIOT@0x30");

    let (a, d) = (&acpi.host_bridges[0], &dt.host_bridges[0]);
    assert_eq!(acpi.host_bridges.len(), 1);
    assert_eq!(a.path, "MCFG[0]");
    assert_eq!((a.ecam_base, a.ecam_size), (d.ecam_base, d.ecam_size));
    assert_eq!((a.bus_start, a.bus_end), (d.bus_start, d.bus_end));
    assert!(a.windows.is_empty());
    assert_eq!(a.iommu_map_mask, u32::MAX);
    // The IOMMU's own RID is cut out of the range, as in QEMU's devicetree.
    assert_eq!(
        a.iommu_map,
        vec![
            IommuMapEntry {
                rid_base: 0,
                iommu_phandle: 48,
                endpoint_base: 0,
                length: 8
            },
            IommuMapEntry {
                rid_base: 9,
                iommu_phandle: 48,
                endpoint_base: 9,
                length: 0xfff7
            },
        ]
    );
    for rid in 0..=u16::MAX {
        assert_eq!(
            acpi.pci_endpoint(0, rid),
            dt.pci_endpoint(0, rid),
            "RID {rid:#x}"
        );
    }
    assert_eq!(acpi.pci_endpoint(0, 8), Ok(None));
    assert_eq!(acpi.pci_endpoint(0, 0x10), Ok(ep(0, 0x10)));
    assert!(acpi.mmio_endpoints.is_empty());
}

#[test]
fn highmem_off_mcfg_has_16_buses() {
    // `-M virt,highmem=off`: 16 buses of ECAM at 0x3f00_0000.
    let acpi =
        Topology::from_viot(&qemu_viot(0x0f), Some(&mcfg(&[(0x3f00_0000, 0, 0, 0x0f)]))).unwrap();
    let hb = &acpi.host_bridges[0];
    assert_eq!((hb.ecam_base, hb.ecam_size), (0x3f00_0000, 0x100_0000));
    assert_eq!((hb.bus_start, hb.bus_end), (0, 0x0f));
    assert_eq!(acpi.pci_endpoint(0, 0x0fff), Ok(ep(0, 0x0fff)));
    assert_eq!(acpi.pci_endpoint(0, 0x1000), Ok(None));
}

#[test]
fn mcfg_base_is_that_of_bus_0() {
    let entries = mcfg_entries(&mcfg(&[(0x3000_0000, 2, 0x10, 0x1f)])).unwrap();
    assert_eq!(
        entries,
        vec![McfgEntry {
            segment: 2,
            ecam_base: 0x3000_0000 + (0x10 << 20),
            bus_start: 0x10,
            bus_end: 0x1f
        }]
    );
}

#[test]
fn mmio_iommu_with_mmio_and_pci_endpoints() {
    // Offsets: mmio IOMMU at 48, PCI IOMMU at 64, then endpoints.
    let table = viot(&[
        mmio_iommu(0x0a00_3e00),
        pci_iommu(0, 0x10),
        mmio_endpoint(7, 0x0a00_0000, 48),
        mmio_endpoint(9, 0x0a00_0200, 64),
        // A PCI range translated by the MMIO IOMMU: no RID is cut out.
        pci_range(0x100, (0, 0), (0x0100, 0x01ff), 48),
    ]);
    let t = Topology::from_viot(&table, Some(&qemu_mcfg())).unwrap();
    assert_eq!(t.iommus.len(), 2);
    assert_eq!(
        t.iommus[0].location,
        IommuLocation::Mmio {
            base: 0x0a00_3e00,
            size: 0
        }
    );
    assert_eq!(t.iommus[0].phandle, 48);
    assert_eq!(t.iommus[1].phandle, 64);
    assert_eq!(t.host_bridge_of(1), Some(0));
    assert_eq!(t.mmio_endpoint(0x0a00_0000), ep(0, 7));
    assert_eq!(t.mmio_endpoint(0x0a00_0200), ep(1, 9));
    assert_eq!(t.mmio_endpoint(0x0a00_0400), None);
    assert_eq!(t.pci_endpoint(0, 0x0100), Ok(ep(0, 0x100)));
    assert_eq!(t.pci_endpoint(0, 0x01ff), Ok(ep(0, 0x1ff)));
    assert_eq!(t.pci_endpoint(0, 0x0200), Ok(None));
    assert_eq!(t.pci_endpoint(0, 0x10), Ok(None));
    assert_eq!(t.host_bridges[0].iommu_map.len(), 1);

    let v = Viot::parse(&table).unwrap();
    assert_eq!(
        v.iommus[1].location,
        ViotIommuLocation::Pci {
            segment: 0,
            bdf: 0x10
        }
    );
    assert_eq!(v.mmio_endpoints[1].offset, 48 + 16 + 16 + 24);
    assert_eq!(v.pci_ranges[0].iommu, 0);
}

#[test]
fn ranges_across_segments() {
    // One range over segments 1..=2, BDFs 0x0000..=0x00ff, endpoints from 0x1000; the IOMMU
    // is on segment 2, so only segment 2's map is split around it.
    let table = viot(&[
        pci_iommu(2, 0x0008),
        pci_range(0x1000, (1, 2), (0, 0xff), 48),
    ]);
    let mcfg = mcfg(&[(0x1000_0000, 1, 0, 0), (0x2000_0000, 2, 0, 0)]);
    let t = Topology::from_viot(&table, Some(&mcfg)).unwrap();
    assert_eq!(
        t.iommus[0].location,
        IommuLocation::Pci {
            host_bridge: 1,
            requester_id: 8
        }
    );
    assert_eq!(t.pci_endpoint(0, 0x08), Ok(ep(0, 0x1008)));
    assert_eq!(t.pci_endpoint(0, 0xff), Ok(ep(0, 0x10ff)));
    assert_eq!(t.pci_endpoint(1, 0x00), Ok(ep(0, 0x1_1000)));
    assert_eq!(t.pci_endpoint(1, 0x08), Ok(None));
    assert_eq!(t.pci_endpoint(1, 0xff), Ok(ep(0, 0x1_10ff)));
    assert_eq!(t.host_bridges[0].iommu_map.len(), 1);
    assert_eq!(t.host_bridges[1].iommu_map.len(), 2);
    let v = Viot::parse(&table).unwrap();
    assert_eq!(v.pci_ranges[0].endpoint_id(2, 0x10), Some(0x1_1010));
    assert_eq!(v.pci_ranges[0].endpoint_id(3, 0x10), None);
    assert_eq!(v.pci_ranges[0].endpoint_id(1, 0x100), None);
}

#[test]
fn iommu_at_range_edges_is_cut_out_cleanly() {
    for (bdf, expected) in [
        (0x0000u16, vec![(1u32, 0xffu32)]),
        (0x00ff, vec![(0, 0xff)]),
    ] {
        let t = Topology::from_viot(
            &viot(&[pci_iommu(0, bdf), pci_range(0, (0, 0), (0, 0xff), 48)]),
            Some(&qemu_mcfg()),
        )
        .unwrap();
        let map: Vec<(u32, u32)> = t.host_bridges[0]
            .iommu_map
            .iter()
            .map(|e| (e.rid_base, e.length))
            .collect();
        assert_eq!(map, expected, "IOMMU at {bdf:#x}");
    }
    // A one-BDF range that is only the IOMMU leaves nothing.
    let t = Topology::from_viot(
        &viot(&[pci_iommu(0, 8), pci_range(0, (0, 0), (8, 8), 48)]),
        Some(&qemu_mcfg()),
    )
    .unwrap();
    assert!(t.host_bridges[0].iommu_map.is_empty());
}

#[test]
fn empty_viot_and_reserved_node_types() {
    let t = Topology::from_viot(&viot(&[]), None).unwrap();
    assert_eq!(t, Topology::default());
    // node_offset 0 is fine without nodes.
    assert_eq!(Viot::parse(&viot_with(0, 0, &[])), Ok(Viot::default()));
    // A reserved type (5, 8 bytes) is skipped; a longer known node is read for its prefix.
    let mut long_iommu = mmio_iommu(0x1000);
    long_iommu[2] = 20;
    long_iommu.extend_from_slice(&[0xee; 4]);
    let v = Viot::parse(&viot(&[vec![5, 0, 8, 0, 1, 2, 3, 4], long_iommu])).unwrap();
    assert_eq!(v.iommus.len(), 1);
    assert_eq!(v.iommus[0].offset, 56);
    // Trailing bytes after the table's length are ignored.
    let mut t = qemu_viot(0xff);
    t.extend_from_slice(&[0xff; 7]);
    assert!(Viot::parse(&t).is_ok());
}

#[test]
fn header_errors() {
    let good = qemu_viot(0xff);
    // Shorter than the header.
    assert_eq!(
        Viot::parse(&good[..20]),
        Err(AcpiError::BadLength {
            signature: *b"VIOT",
            length: 0,
            available: 20
        })
    );
    // length beyond the bytes.
    assert_eq!(
        Viot::parse(&good[..good.len() - 1]),
        Err(AcpiError::BadLength {
            signature: *b"VIOT",
            length: good.len() as u32,
            available: good.len() - 1
        })
    );
    // length shorter than the VIOT header (48).
    let mut short = table(b"VIOT", 0, &[0; 8]);
    assert_eq!(short.len(), 44);
    short.extend_from_slice(&[0; 8]);
    assert_eq!(
        Viot::parse(&short),
        Err(AcpiError::BadLength {
            signature: *b"VIOT",
            length: 44,
            available: 52
        })
    );
    // Signature.
    let mut bad = good.clone();
    bad[0] = b'X';
    fix_checksum(&mut bad);
    assert_eq!(
        Viot::parse(&bad),
        Err(AcpiError::BadSignature {
            expected: *b"VIOT",
            found: *b"XIOT"
        })
    );
    // Checksum.
    let mut bad = good.clone();
    bad[60] ^= 1;
    assert!(matches!(
        Viot::parse(&bad),
        Err(AcpiError::BadChecksum {
            signature: [b'V', b'I', b'O', b'T'],
            sum: 1 | 0xff
        })
    ));
}

#[test]
fn node_walk_errors() {
    // Too many nodes.
    assert_eq!(
        Viot::parse(&viot_with(4097, 48, &[])),
        Err(AcpiError::TooManyNodes(4097))
    );
    // node_offset into the header.
    assert_eq!(
        Viot::parse(&viot_with(1, 40, &[mmio_iommu(0)])),
        Err(AcpiError::NodeOutOfBounds { offset: 40 })
    );
    // More nodes declared than there are.
    assert_eq!(
        Viot::parse(&viot_with(2, 48, &[mmio_iommu(0)])),
        Err(AcpiError::NodeOutOfBounds { offset: 64 })
    );
    // A node header cut short at the end of the table.
    assert_eq!(
        Viot::parse(&viot_with(1, 48, &[vec![4, 0]])),
        Err(AcpiError::NodeOutOfBounds { offset: 48 })
    );
    // A node whose length runs past the end.
    let mut long = mmio_iommu(0);
    long[2] = 17;
    assert_eq!(
        Viot::parse(&viot(&[long])),
        Err(AcpiError::NodeOutOfBounds { offset: 48 })
    );
    // Length 0 (would loop forever) and lengths below the type's structure.
    for (node, node_type, length) in [
        (vec![5, 0, 0, 0], 5, 0),
        (vec![4, 0, 3, 0], 4, 3),
        (mmio_iommu(0)[..12].to_vec(), 4, 12),
        (pci_range(0, (0, 0), (0, 0), 48)[..20].to_vec(), 1, 20),
        (mmio_endpoint(0, 0, 48)[..16].to_vec(), 2, 16),
        (pci_iommu(0, 0)[..8].to_vec(), 3, 8),
    ] {
        let mut node = node;
        node[2] = length as u8;
        assert_eq!(
            Viot::parse(&viot(&[node])),
            Err(AcpiError::BadNodeLength {
                offset: 48,
                node_type,
                length
            })
        );
    }
    // An IOMMU node past 64 KiB cannot be named by any output_node.
    let filler: Vec<Vec<u8>> = (0..2731)
        .map(|_| vec![5, 0, 24, 0].into_iter().chain([0; 20]).collect())
        .collect();
    let mut nodes = filler;
    nodes.push(mmio_iommu(0));
    let offset = 48 + 2731 * 24;
    assert!(offset > 0xffff);
    assert_eq!(
        Viot::parse(&viot(&nodes)),
        Err(AcpiError::NodeOutOfBounds { offset })
    );
}

#[test]
fn reference_errors() {
    // output_node names no node.
    assert_eq!(
        Viot::parse(&viot(&[mmio_iommu(0), mmio_endpoint(1, 0x1000, 50)])),
        Err(AcpiError::UnknownOutputNode {
            offset: 64,
            output_node: 50
        })
    );
    assert_eq!(
        Viot::parse(&viot(&[pci_range(0, (0, 0), (0, 0xff), 0)])),
        Err(AcpiError::UnknownOutputNode {
            offset: 48,
            output_node: 0
        })
    );
    // output_node names an endpoint node, or a node of a reserved type.
    assert_eq!(
        Viot::parse(&viot(&[
            mmio_endpoint(1, 0x1000, 72),
            mmio_endpoint(2, 0x2000, 48),
        ])),
        Err(AcpiError::OutputNotIommu {
            offset: 48,
            output_node: 72
        })
    );
    assert_eq!(
        Viot::parse(&viot(&[vec![9, 0, 4, 0], pci_range(0, (0, 0), (0, 1), 48)])),
        Err(AcpiError::OutputNotIommu {
            offset: 52,
            output_node: 48
        })
    );
}

#[test]
fn range_errors() {
    for (segments, bdfs) in [((1, 0), (0, 0xff)), ((0, 0), (0x10, 0x0f))] {
        assert_eq!(
            Viot::parse(&viot(&[mmio_iommu(0), pci_range(0, segments, bdfs, 48)])),
            Err(AcpiError::InvertedRange { offset: 64 })
        );
    }
    // Last endpoint ID: 0xffff_ff00 + 0xff fits; one more does not. Segments count 2^16 each.
    assert!(Viot::parse(&viot(&[
        mmio_iommu(0),
        pci_range(0xffff_ff00, (0, 0), (0, 0xff), 48)
    ]))
    .is_ok());
    assert_eq!(
        Viot::parse(&viot(&[
            mmio_iommu(0),
            pci_range(0xffff_ff01, (0, 0), (0, 0xff), 48)
        ])),
        Err(AcpiError::EndpointOverflow { offset: 64 })
    );
    assert_eq!(
        Viot::parse(&viot(&[
            mmio_iommu(0),
            pci_range(0xffff_0000, (0, 1), (0, 0), 48)
        ])),
        Err(AcpiError::EndpointOverflow { offset: 64 })
    );
    // Overlaps: same segment, BDF ranges sharing one BDF; and overlapping segment ranges.
    assert_eq!(
        Viot::parse(&viot(&[
            mmio_iommu(0),
            pci_range(0, (0, 0), (0, 0x10), 48),
            pci_range(0x100, (0, 0), (0x10, 0x20), 48),
        ])),
        Err(AcpiError::OverlappingEndpoints {
            first: 64,
            second: 88
        })
    );
    assert_eq!(
        Viot::parse(&viot(&[
            mmio_iommu(0),
            pci_range(0, (0, 3), (0, 0xff), 48),
            pci_range(0, (3, 4), (0x80, 0x80), 48),
        ])),
        Err(AcpiError::OverlappingEndpoints {
            first: 64,
            second: 88
        })
    );
    // Adjacent BDF ranges, or the same BDFs in other segments, do not overlap.
    assert!(Viot::parse(&viot(&[
        mmio_iommu(0),
        pci_range(0, (0, 0), (0, 0x10), 48),
        pci_range(0x100, (0, 0), (0x11, 0x20), 48),
        pci_range(0x200, (1, 1), (0, 0x20), 48),
    ]))
    .is_ok());
    assert_eq!(
        Viot::parse(&viot(&[
            mmio_iommu(0),
            mmio_endpoint(1, 0x1000, 48),
            mmio_endpoint(2, 0x1000, 48),
        ])),
        Err(AcpiError::OverlappingEndpoints {
            first: 64,
            second: 88
        })
    );
}

#[test]
fn duplicate_iommus() {
    assert_eq!(
        Viot::parse(&viot(&[pci_iommu(0, 8), pci_iommu(0, 8)])),
        Err(AcpiError::DuplicateIommu {
            first: 48,
            second: 64
        })
    );
    assert_eq!(
        Viot::parse(&viot(&[
            mmio_iommu(0x1000),
            pci_iommu(0, 8),
            mmio_iommu(0x1000)
        ])),
        Err(AcpiError::DuplicateIommu {
            first: 48,
            second: 80
        })
    );
    // Same BDF on another segment is another device.
    assert!(Viot::parse(&viot(&[pci_iommu(0, 8), pci_iommu(1, 8)])).is_ok());
}

#[test]
fn pci_iommu_needs_a_host_bridge() {
    let no_host = AcpiError::NoHostBridge {
        offset: 48,
        segment: 0,
        bdf: 0x0108,
    };
    let table = viot(&[pci_iommu(0, 0x0108)]);
    assert_eq!(Topology::from_viot(&table, None), Err(no_host));
    assert_eq!(
        Topology::from_viot(&table, Some(&mcfg(&[(0, 1, 0, 0xff)]))),
        Err(no_host)
    );
    assert_eq!(
        Topology::from_viot(&table, Some(&mcfg(&[(0, 0, 0, 0)]))),
        Err(no_host)
    );
    let t = Topology::from_viot(&table, Some(&mcfg(&[(0, 0, 0, 0), (0, 0, 1, 1)]))).unwrap();
    assert_eq!(t.host_bridge_of(0), Some(1));
}

#[test]
fn mcfg_errors() {
    let mut cut = mcfg(&[(0, 0, 0, 0xff)]);
    cut.truncate(cut.len() - 4);
    cut[4] -= 4;
    fix_checksum(&mut cut);
    assert_eq!(
        mcfg_entries(&cut),
        Err(AcpiError::BadMcfgEntry { index: 0 })
    );
    assert_eq!(
        mcfg_entries(&mcfg(&[(0, 0, 0, 0xff), (0, 1, 2, 1)])),
        Err(AcpiError::BadMcfgEntry { index: 1 })
    );
    assert_eq!(
        mcfg_entries(&mcfg(&[(u64::MAX - (1 << 20), 0, 0, 1)])),
        Err(AcpiError::BadMcfgEntry { index: 0 })
    );
    assert_eq!(
        mcfg_entries(&mcfg(&[(u64::MAX - (2 << 20) + 1, 0, 0, 1)])).map(|e| e.len()),
        Ok(1)
    );
    // The MCFG errors reach from_viot.
    assert_eq!(
        Topology::from_viot(&viot(&[]), Some(&mcfg(&[(0, 0, 3, 2)]))),
        Err(AcpiError::BadMcfgEntry { index: 0 })
    );
    assert_eq!(
        Topology::from_viot(&viot(&[]), Some(&qemu_viot(0xff))),
        Err(AcpiError::BadSignature {
            expected: *b"MCFG",
            found: *b"VIOT"
        })
    );
    assert_eq!(mcfg_entries(&mcfg(&[])), Ok(vec![]));
}

/// A QEMU-like `etc/acpi/tables`: a FACS-like table (no standard header past the length), a
/// DSDT, the MCFG, the VIOT, then zero padding.
fn blob() -> Vec<u8> {
    let mut b = Vec::new();
    let mut facs = vec![0u8; 64];
    facs[..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&64u32.to_le_bytes());
    b.extend_from_slice(&facs);
    b.extend_from_slice(&table(b"DSDT", 2, &[0x10; 13]));
    b.extend_from_slice(&qemu_mcfg());
    b.extend_from_slice(&qemu_viot(0xff));
    b.extend_from_slice(&[0; 100]);
    b
}

#[test]
fn tables_blob() {
    let b = blob();
    let found: Vec<(usize, [u8; 4])> = tables(&b)
        .map(|t| t.map(|t| (t.offset, t.signature)))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        found,
        vec![
            (0, *b"FACS"),
            (64, *b"DSDT"),
            (113, *b"MCFG"),
            (173, *b"VIOT")
        ]
    );
    let t = Topology::from_acpi_tables(&b).unwrap();
    assert_eq!(
        t,
        Topology::from_viot(&qemu_viot(0xff), Some(&qemu_mcfg())).unwrap()
    );

    // Without an MCFG the PCI IOMMU has no host bridge; without a VIOT there is nothing.
    let no_mcfg: Vec<u8> = [table(b"DSDT", 2, &[]), qemu_viot(0xff)].concat();
    assert_eq!(
        Topology::from_acpi_tables(&no_mcfg),
        Err(AcpiError::NoHostBridge {
            offset: 48,
            segment: 0,
            bdf: 8
        })
    );
    assert_eq!(
        Topology::from_acpi_tables(&qemu_mcfg()),
        Err(AcpiError::TableNotFound(*b"VIOT"))
    );
    assert_eq!(
        Topology::from_acpi_tables(&[]),
        Err(AcpiError::TableNotFound(*b"VIOT"))
    );

    // A header whose length is below 36 or past the end, before the VIOT, is an error.
    let mut bad = b.clone();
    bad[68..72].copy_from_slice(&35u32.to_le_bytes());
    assert_eq!(
        Topology::from_acpi_tables(&bad),
        Err(AcpiError::BadTableHeader { offset: 64 })
    );
    let mut bad = b.clone();
    bad[68..72].copy_from_slice(&10_000u32.to_le_bytes());
    assert_eq!(
        Topology::from_acpi_tables(&bad),
        Err(AcpiError::BadTableHeader { offset: 64 })
    );
    // Non-zero garbage in the padding is reported once, after the tables.
    let mut bad = b.clone();
    let last = bad.len() - 1;
    bad[last] = 1;
    let results: Vec<_> = tables(&bad).collect();
    assert_eq!(results.len(), 5);
    assert_eq!(
        results[4],
        Err(AcpiError::BadTableHeader {
            offset: 173 + qemu_viot(0xff).len()
        })
    );
    // A bad checksum in the VIOT found in a blob.
    let mut bad = b.clone();
    bad[173 + 50] ^= 0x80;
    assert_eq!(
        Topology::from_acpi_tables(&bad),
        Err(AcpiError::BadChecksum {
            signature: *b"VIOT",
            sum: 0x80
        })
    );
}

#[test]
fn every_error_displays() {
    let errors = [
        AcpiError::BadLength {
            signature: *b"VI\0T",
            length: 1,
            available: 2,
        },
        AcpiError::BadSignature {
            expected: *b"VIOT",
            found: *b"MCFG",
        },
        AcpiError::BadChecksum {
            signature: *b"VIOT",
            sum: 3,
        },
        AcpiError::BadTableHeader { offset: 4 },
        AcpiError::TableNotFound(*b"VIOT"),
        AcpiError::BadMcfgEntry { index: 2 },
        AcpiError::NodeOutOfBounds { offset: 5 },
        AcpiError::BadNodeLength {
            offset: 6,
            node_type: 1,
            length: 2,
        },
        AcpiError::TooManyNodes(5000),
        AcpiError::UnknownOutputNode {
            offset: 7,
            output_node: 8,
        },
        AcpiError::OutputNotIommu {
            offset: 9,
            output_node: 10,
        },
        AcpiError::InvertedRange { offset: 11 },
        AcpiError::EndpointOverflow { offset: 12 },
        AcpiError::OverlappingEndpoints {
            first: 13,
            second: 14,
        },
        AcpiError::DuplicateIommu {
            first: 15,
            second: 16,
        },
        AcpiError::NoHostBridge {
            offset: 17,
            segment: 1,
            bdf: 0x0108,
        },
    ];
    let texts: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert!(texts[0].starts_with("VI?T"), "{}", texts[0]);
    assert!(texts[15].contains("0001:01:01.0"), "{}", texts[15]);
    for (e, text) in errors.iter().zip(&texts) {
        assert!(!text.is_empty(), "{e:?}");
        let _: &dyn core::error::Error = e;
    }
    let mut unique = texts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), texts.len());
}

/// Checks what a successful parse promises: indexes in range, endpoints computable.
fn check_ok(t: &Topology) {
    for iommu in &t.iommus {
        if let IommuLocation::Pci { host_bridge, .. } = iommu.location {
            assert!(host_bridge < t.host_bridges.len());
        }
    }
    for e in &t.mmio_endpoints {
        assert!(e.endpoint.iommu < t.iommus.len());
    }
    for (index, bridge) in t.host_bridges.iter().enumerate() {
        for entry in &bridge.iommu_map {
            assert!(entry.length >= 1);
            assert!(t.iommu_by_phandle(entry.iommu_phandle).is_some());
            for rid in [entry.rid_base, entry.rid_base + entry.length - 1] {
                let found = t.pci_endpoint(index, rid as u16).unwrap().unwrap();
                assert!(found.iommu < t.iommus.len());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Good tables with bytes overwritten (checksum fixed or not) and cut anywhere never
    /// panic, and whatever parses keeps its promises.
    #[test]
    fn mutated_tables_never_panic(
        writes in prop::collection::vec((0usize..200, any::<u8>()), 0..8),
        cut in 0usize..200,
        fix in any::<bool>(),
        which in 0usize..3,
    ) {
        let mut t = match which {
            0 => qemu_viot(0xff),
            1 => viot(&[
                mmio_iommu(0x0a00_3e00),
                pci_iommu(0, 0x10),
                mmio_endpoint(7, 0x0a00_0000, 48),
                pci_range(0x100, (0, 1), (0x0100, 0x01ff), 64),
            ]),
            _ => blob(),
        };
        for (at, value) in writes {
            if let Some(b) = t.get_mut(at) {
                *b = value;
            }
        }
        if fix && which != 2 && t.len() >= 10 {
            fix_checksum(&mut t);
        }
        t.truncate(cut.max(t.len() * usize::from(cut % 4 != 0)));
        let result = if which == 2 {
            Topology::from_acpi_tables(&t)
        } else {
            Topology::from_viot(&t, Some(&qemu_mcfg()))
        };
        if let Ok(topology) = result {
            check_ok(&topology);
        }
        let _ = Viot::parse(&t);
    }

    /// Arbitrary bytes after a valid-looking VIOT header (checksum fixed) never panic.
    #[test]
    fn random_nodes_never_panic(
        count in 0u16..12,
        offset in 40u16..64,
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut t = viot_with(count, offset, &[body]);
        fix_checksum(&mut t);
        if let Ok(topology) = Topology::from_viot(&t, Some(&qemu_mcfg())) {
            check_ok(&topology);
        }
    }
}

/// Decodes a hex string.
fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The VIOT QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18) generates for
/// `-M virt -device virtio-iommu-pci` (IOMMU at 00:01.0, no PCI bridge) — QEMU 10.0.2 gives
/// the same bytes — as the firmware
/// printed it from fw_cfg `etc/acpi/tables` after the `etc/table-loader` checksum. Its PCI range
/// covers bus 0 only (BDFs 0x0000..=0x00ff): QEMU builds it from the buses that exist.
const QEMU_72_VIOT: &str = "56494f54580000000066424f434853204258504320202020010000004258504301000000020030000000000000000000030010000000080000000000000000000100180000000000000000000000ff003000000000000000";

#[test]
fn qemu_7_2_generated_viot() {
    let bytes = unhex(QEMU_72_VIOT);
    assert_eq!(bytes.len(), 0x58);
    let v = Viot::parse(&bytes).unwrap();
    assert_eq!(v.iommus.len(), 1);
    assert_eq!(v.iommus[0].offset, 48);
    assert_eq!(
        v.iommus[0].location,
        ViotIommuLocation::Pci { segment: 0, bdf: 8 }
    );
    assert_eq!(v.pci_ranges.len(), 1);
    let r = v.pci_ranges[0];
    assert_eq!(
        (
            r.endpoint_start,
            r.segment_start,
            r.segment_end,
            r.bdf_start,
            r.bdf_end,
            r.iommu
        ),
        (0, 0, 0, 0, 0xff, 0)
    );
    assert!(v.mmio_endpoints.is_empty());
    // The hand-made equivalent is byte for byte the same apart from the header's OEM fields.
    let hand = viot(&[pci_iommu(0, 8), pci_range(0, (0, 0), (0, 0xff), 48)]);
    assert_eq!(hand[36..], bytes[36..]);
    let t = Topology::from_viot(&bytes, Some(&qemu_mcfg())).unwrap();
    assert_eq!(t.pci_endpoint(0, 0x10), Ok(ep(0, 0x10)));
    assert_eq!(t.pci_endpoint(0, 0x08), Ok(None));
    assert_eq!(t.pci_endpoint(0, 0x100), Ok(None));
}
