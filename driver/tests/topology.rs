//! Host tests of devicetree topology discovery (`virtio_iommu_driver::topology`), on DTBs built
//! with `vm-fdt` (plus a few hand-assembled blobs for structure errors).

use virtio_iommu_driver::topology::{
    remove_nops, validated_fdt, Devicetree, Endpoint, IommuLocation, IommuMapEntry, PciHostBridge,
    PciSpace, PciWindow, Topology, TopologyError, VirtioIommuNode,
};
use vm_fdt::FdtWriter;

/// Phandle of the QEMU-like tree's virtio-iommu.
const PH: u32 = 0x8001;

fn be_cells(cells: &[u32]) -> Vec<u8> {
    cells.iter().flat_map(|c| c.to_be_bytes()).collect()
}

/// A `virtio,pci-iommu` child of a host bridge.
#[derive(Clone)]
struct PciIommu {
    name: String,
    reg: Vec<u32>,
    iommu_cells: Option<u32>,
    phandle: Option<u32>,
}

/// A `pci-host-ecam-generic` node; property values are raw so they can be malformed.
#[derive(Clone)]
struct Bridge {
    name: String,
    reg: Vec<u8>,
    bus_range: Option<Vec<u32>>,
    ranges: Vec<u32>,
    iommu_map: Option<Vec<u8>>,
    iommu_map_mask: Option<Vec<u8>>,
    iommu: Option<PciIommu>,
}

/// The `pcie@10000000` node of QEMU `virt` (highmem ECAM) with a virtio-iommu at 00:01.0.
fn qemu_bridge() -> Bridge {
    Bridge {
        name: "pcie@10000000".into(),
        reg: be_cells(&[0x40, 0x1000_0000, 0x0, 0x1000_0000]),
        bus_range: Some(vec![0, 0xff]),
        ranges: vec![
            0x0100_0000,
            0,
            0,
            /**/ 0,
            0x3eff_0000,
            /**/ 0,
            0x1_0000, //
            0x0200_0000,
            0,
            0x1000_0000,
            /**/ 0,
            0x1000_0000,
            /**/ 0,
            0x2eff_0000, //
            0x0300_0000,
            0x80,
            0,
            /**/ 0x80,
            0,
            /**/ 0x80,
            0,
        ],
        iommu_map: Some(be_cells(&[0x0, PH, 0x0, 0x8, 0x9, PH, 0x9, 0xfff7])),
        iommu_map_mask: None,
        iommu: Some(PciIommu {
            name: "virtio_iommu@1,0".into(),
            reg: vec![0x800, 0, 0, 0, 0],
            iommu_cells: Some(1),
            phandle: Some(PH),
        }),
    }
}

fn write_bridge(w: &mut FdtWriter, b: &Bridge) {
    let node = w.begin_node(&b.name).unwrap();
    w.property_string_list("compatible", vec!["pci-host-ecam-generic".into()])
        .unwrap();
    w.property_string("device_type", "pci").unwrap();
    w.property("reg", &b.reg).unwrap();
    if let Some(bus_range) = &b.bus_range {
        w.property_array_u32("bus-range", bus_range).unwrap();
    }
    w.property_u32("#address-cells", 3).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_array_u32("ranges", &b.ranges).unwrap();
    if let Some(map) = &b.iommu_map {
        w.property("iommu-map", map).unwrap();
    }
    if let Some(mask) = &b.iommu_map_mask {
        w.property("iommu-map-mask", mask).unwrap();
    }
    if let Some(iommu) = &b.iommu {
        let child = w.begin_node(&iommu.name).unwrap();
        w.property_string_list(
            "compatible",
            vec!["virtio,pci-iommu".into(), "pci1af4,1057".into()],
        )
        .unwrap();
        w.property_array_u32("reg", &iommu.reg).unwrap();
        if let Some(cells) = iommu.iommu_cells {
            w.property_u32("#iommu-cells", cells).unwrap();
        }
        if let Some(phandle) = iommu.phandle {
            w.property_u32("phandle", phandle).unwrap();
        }
        w.end_node(child).unwrap();
    }
    w.end_node(node).unwrap();
}

/// A `virtio,mmio` node; with `iommu_cells` it is a virtio-iommu.
fn write_virtio_mmio(w: &mut FdtWriter, base: u32, iommu_cells: Option<u32>, phandle: Option<u32>) {
    let node = w.begin_node(&format!("virtio_mmio@{base:x}")).unwrap();
    w.property_string("compatible", "virtio,mmio").unwrap();
    w.property_array_u32("reg", &[0, base, 0, 0x200]).unwrap();
    if let Some(cells) = iommu_cells {
        w.property_u32("#iommu-cells", cells).unwrap();
    }
    if let Some(phandle) = phandle {
        w.property_u32("phandle", phandle).unwrap();
    }
    w.end_node(node).unwrap();
}

/// Root with `#address-cells = <2>`, `#size-cells = <2>`, the given bridges, then `extra`.
fn build(bridges: &[Bridge], extra: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_string("compatible", "linux,dummy-virt").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    for b in bridges {
        write_bridge(&mut w, b);
    }
    extra(&mut w);
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

fn qemu_dtb() -> Vec<u8> {
    build(&[qemu_bridge()], |_| {})
}

fn malformed(property: &'static str) -> TopologyError {
    TopologyError::MalformedProperty { property }
}

fn endpoint(iommu: usize, endpoint_id: u32) -> Option<Endpoint> {
    Some(Endpoint { iommu, endpoint_id })
}

#[test]
fn qemu_virt_pci_iommu() {
    let dtb = qemu_dtb();
    let topo = Topology::from_dtb(&dtb).unwrap();

    assert_eq!(
        topo.iommus,
        vec![VirtioIommuNode {
            path: "/pcie@10000000/virtio_iommu@1,0".into(),
            phandle: PH,
            location: IommuLocation::Pci {
                host_bridge: 0,
                requester_id: 8
            },
        }]
    );
    assert_eq!(topo.host_bridges.len(), 1);
    let hb = &topo.host_bridges[0];
    assert_eq!(hb.path, "/pcie@10000000");
    assert_eq!(hb.ecam_base, 0x40_1000_0000);
    assert_eq!(hb.ecam_size, 0x1000_0000);
    assert_eq!((hb.bus_start, hb.bus_end), (0, 255));
    assert_eq!(
        hb.windows,
        vec![
            PciWindow {
                space: PciSpace::Io,
                prefetchable: false,
                pci_address: 0,
                cpu_address: 0x3eff_0000,
                size: 0x1_0000,
            },
            PciWindow {
                space: PciSpace::Memory32,
                prefetchable: false,
                pci_address: 0x1000_0000,
                cpu_address: 0x1000_0000,
                size: 0x2eff_0000,
            },
            PciWindow {
                space: PciSpace::Memory64,
                prefetchable: false,
                pci_address: 0x80_0000_0000,
                cpu_address: 0x80_0000_0000,
                size: 0x80_0000_0000,
            },
        ]
    );
    assert_eq!(
        hb.window(PciSpace::Memory32).map(|w| w.cpu_address),
        Some(0x1000_0000)
    );
    assert_eq!(
        hb.window(PciSpace::Io).map(|w| w.cpu_address),
        Some(0x3eff_0000)
    );
    assert_eq!(hb.window(PciSpace::Config), None);
    assert_eq!(
        hb.iommu_map,
        vec![
            IommuMapEntry {
                rid_base: 0,
                iommu_phandle: PH,
                endpoint_base: 0,
                length: 8
            },
            IommuMapEntry {
                rid_base: 9,
                iommu_phandle: PH,
                endpoint_base: 9,
                length: 0xfff7
            },
        ]
    );
    assert_eq!(hb.iommu_map_mask, 0xffff_ffff);
    assert_eq!(hb.ecam_offset(0, 1, 0), Some(1 << 15));
    assert_eq!(hb.ecam_offset(255, 31, 7), Some(0x0fff_f000));

    assert_eq!(topo.pci_endpoint(0, 0x10), Ok(endpoint(0, 0x10)));
    assert_eq!(topo.pci_endpoint(0, 0x0), Ok(endpoint(0, 0)));
    assert_eq!(topo.pci_endpoint(0, 0x7), Ok(endpoint(0, 7)));
    // The IOMMU's own requester ID is the hole in the map: not translated.
    assert_eq!(topo.pci_endpoint(0, 0x8), Ok(None));
    assert_eq!(topo.pci_endpoint(0, 0x9), Ok(endpoint(0, 9)));
    assert_eq!(topo.pci_endpoint(0, 0xffff), Ok(endpoint(0, 0xffff)));
    assert_eq!(hb.map_requester_id(0x10), Some((PH, 0x10)));
    assert_eq!(hb.map_requester_id(0x8), None);
    // No such host bridge: an error, not "not behind an IOMMU".
    assert_eq!(
        topo.pci_endpoint(1, 0x10),
        Err(TopologyError::NoSuchHostBridge(1))
    );

    assert_eq!(topo.iommu_by_phandle(PH), Some(0));
    assert_eq!(topo.iommu_by_phandle(PH + 1), None);
    assert_eq!(topo.iommu_by_phandle(0), None);
    assert_eq!(topo.host_bridge_of(0), Some(0));
    assert_eq!(topo.host_bridge_of(1), None);

    // from_fdt on a validated Fdt gives the same result.
    let fdt = validated_fdt(&dtb).unwrap();
    assert_eq!(Topology::from_fdt(&fdt), Ok(topo));
}

#[test]
fn highmem_off_small_ecam() {
    let mut b = qemu_bridge();
    b.name = "pcie@3f000000".into();
    b.reg = be_cells(&[0, 0x3f00_0000, 0, 0x100_0000]);
    b.bus_range = Some(vec![0, 0xf]);
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    let hb = &topo.host_bridges[0];
    assert_eq!(hb.path, "/pcie@3f000000");
    assert_eq!((hb.ecam_base, hb.ecam_size), (0x3f00_0000, 0x100_0000));
    assert_eq!((hb.bus_start, hb.bus_end), (0, 15));
    assert_eq!(hb.ecam_offset(16, 0, 0), None);
    assert_eq!(
        hb.ecam_offset(1, 2, 3),
        Some((1 << 20) | (2 << 15) | (3 << 12))
    );
    assert_eq!(hb.ecam_offset(15, 31, 7), Some(0xff_f000));
    assert_eq!(hb.ecam_offset(0, 32, 0), None);
    assert_eq!(hb.ecam_offset(0, 0, 8), None);
}

#[test]
fn bus_range_clamped_to_ecam_size() {
    // 16 MiB of ECAM covers 16 buses, whatever bus-range claims.
    let mut b = qemu_bridge();
    b.reg = be_cells(&[0, 0x3f00_0000, 0, 0x100_0000]);
    b.bus_range = Some(vec![0, 0xff]);
    let topo = Topology::from_dtb(&build(&[b.clone()], |_| {})).unwrap();
    assert_eq!(
        (topo.host_bridges[0].bus_start, topo.host_bridges[0].bus_end),
        (0, 15)
    );

    // Absent bus-range defaults to 0..=255, then is clamped the same way.
    b.bus_range = None;
    let topo = Topology::from_dtb(&build(&[b.clone()], |_| {})).unwrap();
    assert_eq!(
        (topo.host_bridges[0].bus_start, topo.host_bridges[0].bus_end),
        (0, 15)
    );

    // A bus range not starting at 0: ECAM offsets are relative to bus_start.
    b.bus_range = Some(vec![0x10, 0xff]);
    let topo = Topology::from_dtb(&build(&[b.clone()], |_| {})).unwrap();
    let hb = &topo.host_bridges[0];
    assert_eq!((hb.bus_start, hb.bus_end), (0x10, 0x1f));
    assert_eq!(hb.ecam_offset(0x0f, 0, 0), None);
    assert_eq!(hb.ecam_offset(0x10, 0, 0), Some(0));
    assert_eq!(hb.ecam_offset(0x1f, 0, 1), Some((15 << 20) | (1 << 12)));
    assert_eq!(hb.ecam_offset(0x20, 0, 0), None);

    // A 1.5 MiB region covers one whole bus.
    b.reg = be_cells(&[0, 0x3f00_0000, 0, 0x18_0000]);
    b.bus_range = Some(vec![3, 9]);
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    assert_eq!(
        (topo.host_bridges[0].bus_start, topo.host_bridges[0].bus_end),
        (3, 3)
    );
}

#[test]
fn iommu_map_mask_drops_function_bits() {
    let mut b = qemu_bridge();
    b.iommu_map = Some(be_cells(&[0, PH, 0, 0x1_0000]));
    b.iommu_map_mask = Some(be_cells(&[0xfff8]));
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    assert_eq!(topo.host_bridges[0].iommu_map_mask, 0xfff8);
    assert_eq!(topo.pci_endpoint(0, 0x11), Ok(endpoint(0, 0x10)));
    assert_eq!(topo.pci_endpoint(0, 0x17), Ok(endpoint(0, 0x10)));
    assert_eq!(topo.pci_endpoint(0, 0x18), Ok(endpoint(0, 0x18)));
}

#[test]
fn iommu_map_with_offset() {
    let mut b = qemu_bridge();
    b.iommu_map = Some(be_cells(&[0x100, PH, 0x2000, 0x100]));
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    assert_eq!(topo.pci_endpoint(0, 0x105), Ok(endpoint(0, 0x2005)));
    assert_eq!(topo.pci_endpoint(0, 0x100), Ok(endpoint(0, 0x2000)));
    assert_eq!(topo.pci_endpoint(0, 0x1ff), Ok(endpoint(0, 0x20ff)));
    assert_eq!(topo.pci_endpoint(0, 0x200), Ok(None));
    assert_eq!(topo.pci_endpoint(0, 0xff), Ok(None));
}

#[test]
fn no_iommu_map_means_no_translation() {
    let mut b = qemu_bridge();
    b.iommu_map = None;
    let topo = Topology::from_dtb(&build(&[b.clone()], |_| {})).unwrap();
    assert!(topo.host_bridges[0].iommu_map.is_empty());
    assert_eq!(topo.pci_endpoint(0, 0x10), Ok(None));
    // An empty iommu-map is the same.
    b.iommu_map = Some(Vec::new());
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    assert_eq!(topo.pci_endpoint(0, 0x10), Ok(None));
}

/// QEMU-like tree without PCI, with a virtio-mmio virtio-iommu, an ordinary virtio-mmio
/// device, and platform devices with and without `iommus`.
fn mmio_dtb(iommus: &[u8]) -> Vec<u8> {
    build(&[], |w| {
        write_virtio_mmio(w, 0xa00_0000, Some(1), Some(0x30));
        write_virtio_mmio(w, 0xa00_0200, None, None);
        let soc = w.begin_node("soc").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_null("ranges").unwrap();
        let dma = w.begin_node("dma@9000000").unwrap();
        w.property_string("compatible", "arm,pl330").unwrap();
        w.property_array_u32("reg", &[0, 0x900_0000, 0, 0x1000])
            .unwrap();
        w.property("iommus", iommus).unwrap();
        w.end_node(dma).unwrap();
        w.end_node(soc).unwrap();
        let uart = w.begin_node("pl011@9010000").unwrap();
        w.property_string("compatible", "arm,pl011").unwrap();
        w.end_node(uart).unwrap();
    })
}

#[test]
fn virtio_mmio_iommu_and_platform_endpoints() {
    let dtb = mmio_dtb(&be_cells(&[0x30, 0x42, 0x30, 0x43]));
    let topo = Topology::from_dtb(&dtb).unwrap();
    assert!(topo.host_bridges.is_empty());
    assert_eq!(
        topo.iommus,
        vec![VirtioIommuNode {
            path: "/virtio_mmio@a000000".into(),
            phandle: 0x30,
            location: IommuLocation::Mmio {
                base: 0xa00_0000,
                size: 0x200
            },
        }]
    );
    assert_eq!(topo.host_bridge_of(0), None);
    assert_eq!(topo.iommu_by_phandle(0x30), Some(0));

    let fdt = validated_fdt(&dtb).unwrap();
    let expected = vec![
        Endpoint {
            iommu: 0,
            endpoint_id: 0x42,
        },
        Endpoint {
            iommu: 0,
            endpoint_id: 0x43,
        },
    ];
    assert_eq!(
        topo.platform_endpoints(&fdt, "/soc/dma@9000000"),
        Ok(expected.clone())
    );
    // Without the unit address, the first node of that name.
    assert_eq!(topo.platform_endpoints(&fdt, "/soc/dma"), Ok(expected));
    assert_eq!(topo.platform_endpoints(&fdt, "/pl011@9010000"), Ok(vec![]));
    assert_eq!(
        topo.platform_endpoints(&fdt, "/virtio_mmio@a000200"),
        Ok(vec![])
    );
    // A path that does not exist is an error, distinct from a node without `iommus`.
    assert_eq!(
        topo.platform_endpoints(&fdt, "/soc/nothing@0"),
        Err(TopologyError::NoSuchNode)
    );
    assert_eq!(
        topo.platform_endpoints(&fdt, "/soc/nothing"),
        Err(TopologyError::NoSuchNode)
    );
    assert_eq!(
        topo.platform_endpoints(&fdt, "not-a-path"),
        Err(TopologyError::NoSuchNode)
    );
    // The root exists and has no `iommus`.
    assert_eq!(topo.platform_endpoints(&fdt, "/"), Ok(vec![]));
}

/// The blob is checked once: a `Devicetree` builds the topology and serves the virtio-mmio
/// (platform) lookups afterwards, with the same results as `from_dtb` + `validated_fdt`.
#[test]
fn one_devicetree_serves_topology_and_platform_lookups() {
    let dtb = mmio_dtb(&be_cells(&[0x30, 0x42]));
    let devicetree = Devicetree::new(&dtb).unwrap();
    let topo = Topology::from_devicetree(&devicetree).unwrap();
    assert_eq!(Topology::from_dtb(&dtb), Ok(topo.clone()));
    // `&Devicetree` is accepted where `&Fdt` is expected (Deref).
    assert_eq!(
        topo.platform_endpoints(&devicetree, "/soc/dma@9000000"),
        Ok(vec![Endpoint {
            iommu: 0,
            endpoint_id: 0x42
        }])
    );
    assert_eq!(
        topo.platform_endpoints(devicetree.fdt(), "/soc/dma@9000001"),
        Err(TopologyError::NoSuchNode)
    );
    // A blob `validated_fdt` refuses is refused by `Devicetree::new` too.
    let mut bad = dtb.clone();
    bad[0] ^= 0xff;
    assert!(matches!(
        Devicetree::new(&bad),
        Err(TopologyError::InvalidFdt)
    ));
}

#[test]
fn topology_errors_display_what_and_which_value() {
    let cases: [(TopologyError, &str); 6] = [
        (TopologyError::InvalidFdt, "invalid header or structure"),
        (malformed("iommu-map"), "`iommu-map`"),
        (TopologyError::UnknownPhandle(0x8001), "0x8001"),
        (
            TopologyError::UnsupportedCells {
                property: "#iommu-cells",
                value: 2,
            },
            "`#iommu-cells` = <2>",
        ),
        (TopologyError::NoSuchNode, "no devicetree node"),
        (TopologyError::NoSuchHostBridge(3), "index 3"),
    ];
    for (error, needle) in cases {
        let text = error.to_string();
        assert!(text.contains(needle), "{error:?} displays {text:?}");
        let _: &dyn std::error::Error = &error;
    }
}

#[test]
fn two_pci_iommus_and_one_mmio() {
    let a = qemu_bridge(); // IOMMU phandle PH at 00:01.0, maps all RIDs but 8 to PH
    let mut b = qemu_bridge();
    b.name = "pcie@30000000".into();
    b.reg = be_cells(&[0, 0x3000_0000, 0, 0x200_0000]);
    b.bus_range = Some(vec![0, 1]);
    // 00:00.0-00:01.7 to its own IOMMU (at 00:02.0, RID 0x10), bus 1 to the MMIO IOMMU.
    b.iommu_map = Some(be_cells(&[0, 0x20, 0x1000, 0x10, 0x100, 0x30, 0x0, 0x100]));
    b.iommu = Some(PciIommu {
        name: "virtio_iommu@2,0".into(),
        reg: vec![0x1000, 0, 0, 0, 0],
        iommu_cells: Some(1),
        phandle: Some(0x20),
    });
    let dtb = build(&[a, b], |w| {
        write_virtio_mmio(w, 0xa00_0000, Some(1), Some(0x30))
    });
    let topo = Topology::from_dtb(&dtb).unwrap();

    assert_eq!(topo.host_bridges.len(), 2);
    assert_eq!(topo.host_bridges[1].path, "/pcie@30000000");
    assert_eq!(topo.iommus.len(), 3);
    assert_eq!(
        topo.iommus[0].location,
        IommuLocation::Pci {
            host_bridge: 0,
            requester_id: 8
        }
    );
    assert_eq!(
        topo.iommus[1].location,
        IommuLocation::Pci {
            host_bridge: 1,
            requester_id: 0x10
        }
    );
    assert_eq!(topo.iommus[1].path, "/pcie@30000000/virtio_iommu@2,0");
    assert_eq!(topo.iommus[2].path, "/virtio_mmio@a000000");
    assert_eq!(
        (
            topo.iommu_by_phandle(PH),
            topo.iommu_by_phandle(0x20),
            topo.iommu_by_phandle(0x30)
        ),
        (Some(0), Some(1), Some(2))
    );
    assert_eq!(
        (
            topo.host_bridge_of(0),
            topo.host_bridge_of(1),
            topo.host_bridge_of(2)
        ),
        (Some(0), Some(1), None)
    );

    assert_eq!(topo.pci_endpoint(0, 0x0f), Ok(endpoint(0, 0x0f)));
    assert_eq!(topo.pci_endpoint(1, 0x0f), Ok(endpoint(1, 0x100f)));
    assert_eq!(topo.pci_endpoint(1, 0x10), Ok(None));
    assert_eq!(topo.pci_endpoint(1, 0x105), Ok(endpoint(2, 0x5)));
    assert_eq!(topo.pci_endpoint(1, 0x200), Ok(None));

    // The host bridge index from what an embedder knows: the ECAM base or the node path.
    assert_eq!(topo.host_bridge_at(0x40_1000_0000), Some(0));
    assert_eq!(topo.host_bridge_at(0x3000_0000), Some(1));
    assert_eq!(topo.host_bridge_at(0x3000_1000), None);
    assert_eq!(topo.host_bridge_by_path("/pcie@10000000"), Some(0));
    assert_eq!(topo.host_bridge_by_path("/pcie@30000000"), Some(1));
    assert_eq!(topo.host_bridge_by_path("/pcie"), None);
    let second = topo.host_bridge_at(0x3000_0000).unwrap();
    assert_eq!(topo.pci_endpoint(second, 0x105), Ok(endpoint(2, 0x5)));
    assert_eq!(
        topo.pci_endpoint(2, 0x0f),
        Err(TopologyError::NoSuchHostBridge(2))
    );
}

#[test]
fn iommu_without_phandle_is_listed_but_unreachable() {
    let mut b = qemu_bridge();
    b.iommu.as_mut().unwrap().phandle = None;
    b.iommu_map = Some(be_cells(&[0, 0, 0, 0x1_0000]));
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    assert_eq!(topo.iommus.len(), 1);
    assert_eq!(topo.iommus[0].phandle, 0);
    assert_eq!(
        topo.pci_endpoint(0, 0x10),
        Err(TopologyError::UnknownPhandle(0))
    );
}

#[test]
fn pci_iommu_outside_a_host_bridge_is_ignored() {
    let dtb = build(&[], |w| {
        let node = w.begin_node("virtio_iommu@0").unwrap();
        w.property_string("compatible", "virtio,pci-iommu").unwrap();
        w.property_array_u32("reg", &[0, 0]).unwrap();
        w.property_u32("#iommu-cells", 1).unwrap();
        w.end_node(node).unwrap();
    });
    assert_eq!(Topology::from_dtb(&dtb), Ok(Topology::default()));
}

#[test]
fn malformed_properties() {
    // iommu-map of 12 bytes.
    let mut b = qemu_bridge();
    b.iommu_map = Some(be_cells(&[0, PH, 0]));
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("iommu-map"))
    );

    // iommus of 6 bytes.
    let dtb = mmio_dtb(&[0, 0, 0, 0x30, 0, 0x42]);
    let topo = Topology::from_dtb(&dtb).unwrap();
    let fdt = validated_fdt(&dtb).unwrap();
    assert_eq!(
        topo.platform_endpoints(&fdt, "/soc/dma@9000000"),
        Err(malformed("iommus"))
    );

    // iommus naming something that is not a virtio-iommu.
    let dtb = mmio_dtb(&be_cells(&[0x30, 1, 0x31, 2]));
    let topo = Topology::from_dtb(&dtb).unwrap();
    let fdt = validated_fdt(&dtb).unwrap();
    assert_eq!(
        topo.platform_endpoints(&fdt, "/soc/dma@9000000"),
        Err(TopologyError::UnknownPhandle(0x31))
    );

    // iommu-map naming an unknown phandle: found when the RID is looked up.
    let mut b = qemu_bridge();
    b.iommu_map = Some(be_cells(&[0, 0x9999, 0, 0x1_0000]));
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    assert_eq!(
        topo.pci_endpoint(0, 0x10),
        Err(TopologyError::UnknownPhandle(0x9999))
    );

    // #iommu-cells = <2>, on a PCI and on an MMIO virtio-iommu.
    let mut b = qemu_bridge();
    b.iommu.as_mut().unwrap().iommu_cells = Some(2);
    let unsupported = Err(TopologyError::UnsupportedCells {
        property: "#iommu-cells",
        value: 2,
    });
    assert_eq!(Topology::from_dtb(&build(&[b], |_| {})), unsupported);
    let dtb = build(&[], |w| {
        write_virtio_mmio(w, 0xa00_0000, Some(2), Some(0x30))
    });
    assert_eq!(Topology::from_dtb(&dtb), unsupported);

    // #iommu-cells missing on a virtio,pci-iommu.
    let mut b = qemu_bridge();
    b.iommu.as_mut().unwrap().iommu_cells = None;
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("#iommu-cells"))
    );

    // Truncated reg: on the bridge, and on the PCI virtio-iommu.
    let mut b = qemu_bridge();
    b.reg = be_cells(&[0x40, 0x1000_0000, 0]);
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("reg"))
    );
    let mut b = qemu_bridge();
    b.iommu.as_mut().unwrap().reg = vec![0x800, 0, 0];
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("reg"))
    );

    // ECAM smaller than one bus.
    let mut b = qemu_bridge();
    b.reg = be_cells(&[0, 0x3f00_0000, 0, 0x8_0000]);
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("reg"))
    );

    // ECAM wrapping around the address space.
    let mut b = qemu_bridge();
    b.reg = be_cells(&[0xffff_ffff, 0xfff0_0000, 0, 0x20_0000]);
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("reg"))
    );

    // bus-range backwards, too large, wrong length.
    for bus_range in [vec![5, 4], vec![0, 0x100], vec![0]] {
        let mut b = qemu_bridge();
        b.bus_range = Some(bus_range);
        assert_eq!(
            Topology::from_dtb(&build(&[b], |_| {})),
            Err(malformed("bus-range"))
        );
    }

    // iommu-map-mask of 2 bytes.
    let mut b = qemu_bridge();
    b.iommu_map_mask = Some(vec![0xff, 0xf8]);
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("iommu-map-mask"))
    );

    // ranges not a whole number of 7-cell entries.
    let mut b = qemu_bridge();
    b.ranges.pop();
    assert_eq!(
        Topology::from_dtb(&build(&[b], |_| {})),
        Err(malformed("ranges"))
    );
}

#[test]
fn iommu_map_overflow_does_not_panic() {
    let mut b = qemu_bridge();
    b.iommu_map = Some(be_cells(&[
        0xffff_fff0,
        PH,
        0,
        0x100, // rid_base + length overflows u32
        0,
        PH,
        0xffff_fff0,
        0x1_0000, // endpoint_base + offset overflows for offset >= 0x10
    ]));
    let topo = Topology::from_dtb(&build(&[b], |_| {})).unwrap();
    assert_eq!(topo.pci_endpoint(0, 0x5), Ok(endpoint(0, 0xffff_fff5)));
    assert_eq!(topo.pci_endpoint(0, 0xf), Ok(endpoint(0, 0xffff_ffff)));
    assert_eq!(topo.pci_endpoint(0, 0x10), Ok(None));
    assert_eq!(topo.pci_endpoint(0, 0xffff), Ok(None));

    let hb = PciHostBridge {
        path: "/pcie".into(),
        ecam_base: 0,
        ecam_size: 1 << 28,
        bus_start: 0,
        bus_end: 255,
        windows: vec![],
        iommu_map: vec![IommuMapEntry {
            rid_base: 0xfff0,
            iommu_phandle: 1,
            endpoint_base: 0x10,
            length: u32::MAX,
        }],
        iommu_map_mask: u32::MAX,
    };
    assert_eq!(hb.map_requester_id(0xffff), Some((1, 0x1f)));
    assert_eq!(hb.map_requester_id(0xffef), None);
}

#[test]
fn garbage_is_invalid_fdt() {
    assert_eq!(Topology::from_dtb(&[]), Err(TopologyError::InvalidFdt));
    assert_eq!(
        Topology::from_dtb(b"this is not a devicetree"),
        Err(TopologyError::InvalidFdt)
    );
    let mut rng = Rng(7);
    let noise: Vec<u8> = (0..256).map(|_| rng.next() as u8).collect();
    assert_eq!(Topology::from_dtb(&noise), Err(TopologyError::InvalidFdt));
    // Right magic, everything else garbage.
    let mut noise = noise;
    noise[..4].copy_from_slice(&0xd00d_feed_u32.to_be_bytes());
    assert_eq!(Topology::from_dtb(&noise), Err(TopologyError::InvalidFdt));
    // Truncated blob.
    let dtb = qemu_dtb();
    assert_eq!(
        Topology::from_dtb(&dtb[..dtb.len() - 8]),
        Err(TopologyError::InvalidFdt)
    );
}

/// Offsets and sizes of the structure and strings blocks of a well-formed blob.
fn blocks(dtb: &[u8]) -> (usize, usize, usize, usize) {
    let field = |i: usize| u32::from_be_bytes(dtb[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
    (field(2), field(9), field(3), field(8))
}

/// Structure-block offsets (absolute) of every FDT_PROP token and the value range it covers.
fn properties(dtb: &[u8]) -> Vec<(usize, std::ops::Range<usize>)> {
    let (off, size, _, _) = blocks(dtb);
    let word = |i: usize| u32::from_be_bytes(dtb[i..i + 4].try_into().unwrap());
    let mut props = Vec::new();
    let mut pos = off;
    while pos < off + size {
        match word(pos) {
            1 => {
                let name_end = dtb[pos + 4..].iter().position(|&b| b == 0).unwrap();
                pos += 4 + (name_end + 1).next_multiple_of(4);
            }
            3 => {
                let len = word(pos + 4) as usize;
                props.push((pos, pos + 12..pos + 12 + len));
                pos += 12 + len.next_multiple_of(4);
            }
            _ => pos += 4,
        }
    }
    props
}

#[test]
fn structure_errors_that_would_panic_fdt_are_invalid_fdt() {
    let dtb = qemu_dtb();
    let (prop, _) = properties(&dtb)[3];

    // Property length running past the structure block (fdt 0.1.5 slices it unchecked).
    let mut bad = dtb.clone();
    bad[prop + 4..prop + 8].copy_from_slice(&0xffff_0000_u32.to_be_bytes());
    assert_eq!(Topology::from_dtb(&bad), Err(TopologyError::InvalidFdt));

    // Name offset outside the strings block (fdt indexes and `expect`s it).
    let mut bad = dtb.clone();
    bad[prop + 8..prop + 12].copy_from_slice(&0x10_0000_u32.to_be_bytes());
    assert_eq!(Topology::from_dtb(&bad), Err(TopologyError::InvalidFdt));

    // Non-UTF-8 property name (fdt `expect`s UTF-8).
    let (_, _, strings, _) = blocks(&dtb);
    let mut bad = dtb.clone();
    bad[strings] = 0xff;
    assert_eq!(Topology::from_dtb(&bad), Err(TopologyError::InvalidFdt));

    // A property token replaced by FDT_NOP, leaving properties after a NOP (fdt's node
    // skipping asserts FDT_END_NODE there).
    let mut bad = dtb.clone();
    bad[prop..prop + 4].copy_from_slice(&4u32.to_be_bytes());
    assert_eq!(Topology::from_dtb(&bad), Err(TopologyError::InvalidFdt));

    // Structure block size pointing past the blob.
    let mut bad = dtb.clone();
    bad[36..40].copy_from_slice(&0x7fff_ffff_u32.to_be_bytes());
    assert_eq!(Topology::from_dtb(&bad), Err(TopologyError::InvalidFdt));
}

/// Minimal DTB assembler for structures vm-fdt refuses to write.
struct RawDtb {
    structure: Vec<u8>,
    strings: Vec<u8>,
}

impl RawDtb {
    fn new() -> Self {
        RawDtb {
            structure: Vec::new(),
            strings: Vec::new(),
        }
    }
    fn pad(&mut self) {
        self.structure
            .resize(self.structure.len().next_multiple_of(4), 0);
    }
    fn token(&mut self, token: u32) -> &mut Self {
        self.structure.extend(token.to_be_bytes());
        self
    }
    fn begin(&mut self, name: &str) -> &mut Self {
        self.token(1);
        self.structure.extend(name.as_bytes());
        self.structure.push(0);
        self.pad();
        self
    }
    fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let name_offset = self.strings.len() as u32;
        self.strings.extend(name.as_bytes());
        self.strings.push(0);
        self.token(3).token(value.len() as u32).token(name_offset);
        self.structure.extend(value);
        self.pad();
        self
    }
    fn finish(&mut self) -> Vec<u8> {
        self.token(9);
        let off_rsv = 40u32;
        let off_struct = off_rsv + 16;
        let off_strings = off_struct + self.structure.len() as u32;
        let total = off_strings + self.strings.len() as u32;
        let header = [
            0xd00d_feed,
            total,
            off_struct,
            off_strings,
            off_rsv,
            17,
            16,
            0,
            self.strings.len() as u32,
            self.structure.len() as u32,
        ];
        let mut dtb = be_cells(&header);
        dtb.extend([0; 16]);
        dtb.extend(&self.structure);
        dtb.extend(&self.strings);
        dtb
    }
}

#[test]
fn nesting_depth_is_bounded() {
    let nested = |levels: usize| {
        let mut raw = RawDtb::new();
        raw.begin("");
        for _ in 1..levels {
            raw.begin("n");
        }
        for _ in 0..levels {
            raw.token(2);
        }
        raw.finish()
    };
    assert_eq!(Topology::from_dtb(&nested(64)), Ok(Topology::default()));
    assert_eq!(
        Topology::from_dtb(&nested(65)),
        Err(TopologyError::InvalidFdt)
    );
    assert_eq!(
        Topology::from_dtb(&nested(10_000)),
        Err(TopologyError::InvalidFdt)
    );
}

#[test]
fn nop_placement() {
    let mmio = |raw: &mut RawDtb| {
        raw.begin("virtio_mmio@a000000")
            .prop("compatible", b"virtio,mmio\0")
            .prop("reg", &be_cells(&[0, 0xa00_0000, 0, 0x200]))
            .prop("#iommu-cells", &be_cells(&[1]));
    };
    // NOPs before the root, before an FDT_END_NODE and before FDT_END are accepted.
    let mut raw = RawDtb::new();
    raw.token(4)
        .begin("")
        .prop("#address-cells", &be_cells(&[2]))
        .prop("#size-cells", &be_cells(&[2]));
    mmio(&mut raw);
    raw.token(4).token(2).token(4).token(2).token(4);
    let topo = Topology::from_dtb(&raw.finish()).unwrap();
    assert_eq!(
        topo.iommus[0].location,
        IommuLocation::Mmio {
            base: 0xa00_0000,
            size: 0x200
        }
    );

    // A NOP between two properties is refused.
    let mut raw = RawDtb::new();
    raw.begin("")
        .prop("#address-cells", &be_cells(&[2]))
        .token(4);
    raw.prop("#size-cells", &be_cells(&[2]));
    mmio(&mut raw);
    raw.token(2).token(2);
    assert_eq!(
        Topology::from_dtb(&raw.finish()),
        Err(TopologyError::InvalidFdt)
    );

    // A property after a child node is refused.
    let mut raw = RawDtb::new();
    raw.begin("");
    mmio(&mut raw);
    raw.token(2).prop("#size-cells", &be_cells(&[2])).token(2);
    assert_eq!(
        Topology::from_dtb(&raw.finish()),
        Err(TopologyError::InvalidFdt)
    );

    // Two root nodes are refused.
    let mut raw = RawDtb::new();
    raw.begin("").token(2).begin("").token(2);
    assert_eq!(
        Topology::from_dtb(&raw.finish()),
        Err(TopologyError::InvalidFdt)
    );
}

/// xorshift64: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A tree with every kind of node this module reads.
fn rich_dtb() -> Vec<u8> {
    let mut b = qemu_bridge();
    b.name = "pcie@30000000".into();
    b.reg = be_cells(&[0, 0x3000_0000, 0, 0x200_0000]);
    b.iommu_map = Some(be_cells(&[0, 0x20, 0x1000, 0x10, 0x100, 0x30, 0x0, 0x100]));
    b.iommu_map_mask = Some(be_cells(&[0xfff8]));
    b.iommu = Some(PciIommu {
        name: "virtio_iommu@2,0".into(),
        reg: vec![0x1000, 0, 0, 0, 0],
        iommu_cells: Some(1),
        phandle: Some(0x20),
    });
    build(&[qemu_bridge(), b], |w| {
        write_virtio_mmio(w, 0xa00_0000, Some(1), Some(0x30));
        let dma = w.begin_node("dma@9000000").unwrap();
        w.property_array_u32("iommus", &[0x30, 0x42, PH, 0x43])
            .unwrap();
        w.end_node(dma).unwrap();
    })
}

/// Everything a driver would call on a topology; must not panic.
fn exercise(dtb: &[u8]) -> bool {
    let Ok(topo) = Topology::from_dtb(dtb) else {
        return false;
    };
    for bridge in 0..topo.host_bridges.len() + 1 {
        for rid in [0, 7, 8, 0x10, 0x11, 0x105, 0xffff] {
            let _ = topo.pci_endpoint(bridge, rid);
        }
        if let Some(hb) = topo.host_bridges.get(bridge) {
            let _ = hb.ecam_offset(hb.bus_end, 31, 7);
            let _ = hb.window(PciSpace::Memory64);
        }
    }
    for iommu in 0..topo.iommus.len() + 1 {
        let _ = topo.host_bridge_of(iommu);
    }
    let fdt = validated_fdt(dtb).expect("from_dtb accepted it");
    let _ = topo.platform_endpoints(&fdt, "/dma@9000000");
    let _ = topo.platform_endpoints(&fdt, "/pcie@30000000/virtio_iommu@2,0");
    true
}

#[test]
fn corrupted_property_values_do_not_panic() {
    let dtb = rich_dtb();
    assert!(exercise(&dtb));
    let values: Vec<_> = properties(&dtb)
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
        .collect();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..5000 {
        let mut bad = dtb.clone();
        for _ in 0..1 + rng.below(4) {
            let value = &values[rng.below(values.len())];
            let at = value.start + rng.below(value.len());
            bad[at] = match rng.below(4) {
                0 => bad[at] ^ (1 << rng.below(8)),
                1 => 0xff,
                2 => 0,
                _ => rng.next() as u8,
            };
        }
        if exercise(&bad) {
            ok += 1;
        } else {
            err += 1;
        }
    }
    // Both outcomes must occur, or the corruption is not reaching what is parsed.
    eprintln!("{ok} corrupted blobs accepted, {err} refused");
    assert!(ok > 100 && err > 100, "ok {ok}, err {err}");
}

#[test]
fn corrupted_blobs_do_not_panic() {
    let dtb = rich_dtb();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let (mut ok, mut err) = (0, 0);
    for i in 0..5000 {
        let mut bad = dtb.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bad.len());
            bad[at] = match rng.below(3) {
                0 => bad[at] ^ (1 << rng.below(8)),
                1 => [0, 1, 2, 3, 4, 9, 0xff][rng.below(7)],
                _ => rng.next() as u8,
            };
        }
        if i % 10 == 0 {
            let keep = rng.below(bad.len());
            bad.truncate(keep);
        }
        if exercise(&bad) {
            ok += 1;
        } else {
            err += 1;
        }
    }
    eprintln!("{ok} corrupted blobs accepted, {err} refused");
    assert!(ok > 100 && err > 100, "ok {ok}, err {err}");
}

/// A tree with a virtio-mmio IOMMU and a PCI host bridge whose `iommu-map` points at it, with
/// `FDT_NOP` after every token when `nops` (the Devicetree Specification allows them anywhere;
/// QEMU's `-dtb` path leaves dozens between the root's children).
fn tree_with_nops(nops: bool) -> Vec<u8> {
    let mut raw = RawDtb::new();
    let nop = |raw: &mut RawDtb| {
        if nops {
            raw.token(4).token(4);
        }
    };
    nop(&mut raw);
    raw.begin("");
    nop(&mut raw);
    raw.prop("#address-cells", &be_cells(&[2]));
    nop(&mut raw);
    raw.prop("#size-cells", &be_cells(&[2]));
    nop(&mut raw);
    raw.begin("virtio_mmio@a000000");
    nop(&mut raw);
    raw.prop("compatible", b"virtio,mmio\0");
    nop(&mut raw);
    raw.prop("reg", &be_cells(&[0, 0xa00_0000, 0, 0x200]));
    nop(&mut raw);
    raw.prop("#iommu-cells", &be_cells(&[1]));
    nop(&mut raw);
    raw.prop("phandle", &be_cells(&[0x9000]));
    nop(&mut raw);
    raw.token(2);
    nop(&mut raw);
    raw.begin("pcie@10000000");
    nop(&mut raw);
    raw.prop("compatible", b"pci-host-ecam-generic\0");
    nop(&mut raw);
    raw.prop("device_type", b"pci\0");
    nop(&mut raw);
    raw.prop("#address-cells", &be_cells(&[3]));
    nop(&mut raw);
    raw.prop("#size-cells", &be_cells(&[2]));
    nop(&mut raw);
    raw.prop("reg", &be_cells(&[0x40, 0x1000_0000, 0, 0x1000_0000]));
    nop(&mut raw);
    raw.prop("bus-range", &be_cells(&[0, 0xff]));
    nop(&mut raw);
    raw.prop("iommu-map", &be_cells(&[0, 0x9000, 0, 0x10000]));
    nop(&mut raw);
    raw.begin("child@0");
    nop(&mut raw);
    raw.token(2);
    nop(&mut raw);
    raw.token(2);
    nop(&mut raw);
    raw.token(2);
    nop(&mut raw);
    raw.finish()
}

#[test]
fn nops_anywhere_are_removed() {
    let clean = tree_with_nops(false);
    let expected = Topology::from_dtb(&clean).unwrap();
    assert_eq!(expected.iommus.len(), 1);
    assert_eq!(expected.host_bridges.len(), 1);
    assert_eq!(expected.pci_endpoint(0, 0x18), Ok(endpoint(0, 0x18)));

    let mut dtb = tree_with_nops(true);
    // fdt 0.1.5 would misparse this tree (NOPs between properties): the validator refuses it.
    assert_eq!(Topology::from_dtb(&dtb), Err(TopologyError::InvalidFdt));
    let total = dtb.len();
    // Two NOPs at each of the 22 places: before the root and after every token but FDT_END.
    assert_eq!(remove_nops(&mut dtb), Ok(44));
    assert_eq!(dtb.len(), total);
    assert_eq!(Topology::from_dtb(&dtb), Ok(expected));
    // The compacted structure block is token for token the clean one.
    let (clean_off, clean_size) = (blocks(&clean).0, blocks(&clean).1);
    let (off, size) = (blocks(&dtb).0, blocks(&dtb).1);
    assert_eq!(size, clean_size);
    assert_eq!(
        dtb[off..off + size],
        clean[clean_off..clean_off + clean_size]
    );
    // A second pass finds nothing, and a clean tree is left as it is.
    assert_eq!(remove_nops(&mut dtb), Ok(0));
    let mut again = clean.clone();
    assert_eq!(remove_nops(&mut again), Ok(0));
    assert_eq!(again, clean);
}

#[test]
fn remove_nops_refuses_malformed_blobs() {
    assert_eq!(remove_nops(&mut []), Err(TopologyError::InvalidFdt));
    assert_eq!(remove_nops(&mut [0u8; 64]), Err(TopologyError::InvalidFdt));
    // A property whose length runs past the structure block, and an unknown token.
    for bad in [[3u32, 0xffff_fff0, 0], [7, 0, 0]] {
        let mut raw = RawDtb::new();
        raw.begin("");
        for t in bad {
            raw.token(t);
        }
        let mut dtb = raw.finish();
        assert_eq!(remove_nops(&mut dtb), Err(TopologyError::InvalidFdt));
    }
    // A structure block that ends without FDT_END.
    let mut dtb = tree_with_nops(true);
    let size_at = 36;
    let size = u32::from_be_bytes(dtb[size_at..size_at + 4].try_into().unwrap());
    dtb[size_at..size_at + 4].copy_from_slice(&(size - 4).to_be_bytes());
    assert_eq!(remove_nops(&mut dtb), Err(TopologyError::InvalidFdt));
}
