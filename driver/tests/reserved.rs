//! Reserved regions from every source (`topology::reserved`, #10 item 6): the merge with its
//! precedence and the software MSI window, `/reserved-memory` and `iommu-addresses` from
//! hand-made DTBs (vm-fdt), typed errors for malformed nodes.

use virtio_iommu_driver::dma::PhysRange;
use virtio_iommu_driver::topology::reserved::{
    devicetree_regions, merge, reserved_memory, software_msi, usable_ram, ReservedMemory,
    MSI_IOVA_BASE, MSI_IOVA_LENGTH,
};
use virtio_iommu_driver::topology::{Devicetree, TopologyError};
use virtio_iommu_driver::{ReservedRegion, ResvMemKind};
use vm_fdt::FdtWriter;

fn region(kind: ResvMemKind, start: u64, end: u64) -> ReservedRegion {
    ReservedRegion { kind, start, end }
}

use ResvMemKind::{Direct, Msi, Reserved, SoftwareMsi, Unknown};

#[test]
fn software_msi_window_only_without_a_probe_msi_region() {
    assert_eq!(
        software_msi(),
        region(SoftwareMsi, 0x800_0000, 0x80f_ffff),
        "Linux's MSI_IOVA_BASE and MSI_IOVA_LENGTH"
    );
    assert_eq!((MSI_IOVA_BASE, MSI_IOVA_LENGTH), (0x800_0000, 0x10_0000));
    assert_eq!(merge(&[], &[]), [software_msi()]);
    let msi = region(Msi, 0x0802_0000, 0x0802_0fff);
    assert_eq!(merge(&[msi], &[]), [msi]);
    // A devicetree region is no PROBE MSI region: the window stays.
    let dt = region(Reserved, 0x1000, 0x1fff);
    assert_eq!(merge(&[], &[dt]), [dt, software_msi()]);
}

#[test]
fn merge_sorts_joins_and_resolves_overlaps_by_precedence() {
    let msi = region(Msi, 0x0802_0000, 0x0802_0fff);
    let probe = [
        region(Reserved, 0x9000, 0x9fff),
        msi,
        // Adjacent to the first, same kind: joined.
        region(Reserved, 0xa000, 0xafff),
        // Inverted: dropped.
        region(Reserved, 0x5000, 0x4000),
        region(Unknown(7), 0xff00_0000, u64::MAX),
    ];
    let dt = [
        // Direct overlapping the reserved pair: only its outer parts stay Direct.
        region(Direct, 0x8000, 0xbfff),
        // Direct over the MSI region: MSI wins.
        region(Direct, 0x0801_0000, 0x0802_ffff),
        // Reserved inside Unknown: Reserved wins in its bytes.
        region(Reserved, 0xff10_0000, 0xff10_0fff),
    ];
    assert_eq!(
        merge(&probe, &dt),
        [
            region(Direct, 0x8000, 0x8fff),
            region(Reserved, 0x9000, 0xafff),
            region(Direct, 0xb000, 0xbfff),
            region(Direct, 0x0801_0000, 0x0801_ffff),
            msi,
            region(Direct, 0x0802_1000, 0x0802_ffff),
            region(Unknown(7), 0xff00_0000, 0xff0f_ffff),
            region(Reserved, 0xff10_0000, 0xff10_0fff),
            region(Unknown(7), 0xff10_1000, u64::MAX),
        ]
    );
    // The software window yields to everything else.
    let over = region(Direct, 0x80f_0000, 0x810_ffff);
    assert_eq!(
        merge(&[], &[over]),
        [region(SoftwareMsi, 0x800_0000, 0x80e_ffff), over]
    );
}

/// Writes a DTB: root with 2/2 cells, a `/soc` bus with 1/1 cells holding a DMA device with
/// phandle 0x11, `/reserved-memory` (cells given), and `/virtio_mmio@a000000` with phandle
/// 0x10 and the given `memory-region`.
/// Properties of a node: name and raw value.
type Props = Vec<(&'static str, Vec<u8>)>;

struct Tree {
    resv_cells: (u32, u32),
    children: Vec<(&'static str, Props)>,
    memory_region: Option<Vec<u8>>,
}

fn cells(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|c| c.to_be_bytes()).collect()
}

fn build(t: &Tree) -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    let soc = w.begin_node("soc").unwrap();
    w.property_u32("#address-cells", 1).unwrap();
    w.property_u32("#size-cells", 1).unwrap();
    let dma = w.begin_node("dma@9000000").unwrap();
    w.property_array_u32("reg", &[0x900_0000, 0x1000]).unwrap();
    w.property_u32("phandle", 0x11).unwrap();
    w.end_node(dma).unwrap();
    w.end_node(soc).unwrap();
    let rm = w.begin_node("reserved-memory").unwrap();
    w.property_u32("#address-cells", t.resv_cells.0).unwrap();
    w.property_u32("#size-cells", t.resv_cells.1).unwrap();
    w.property_null("ranges").unwrap();
    for (name, props) in &t.children {
        let n = w.begin_node(name).unwrap();
        for (p, v) in props {
            w.property(p, v).unwrap();
        }
        w.end_node(n).unwrap();
    }
    w.end_node(rm).unwrap();
    let dev = w.begin_node("virtio_mmio@a000000").unwrap();
    w.property_string("compatible", "virtio,mmio").unwrap();
    w.property_array_u32("reg", &[0, 0xa00_0000, 0, 0x200])
        .unwrap();
    w.property_u32("phandle", 0x10).unwrap();
    if let Some(mr) = &t.memory_region {
        w.property("memory-region", mr).unwrap();
    }
    w.end_node(dev).unwrap();
    let plain = w.begin_node("virtio_mmio@a000200").unwrap();
    w.property_string("compatible", "virtio,mmio").unwrap();
    w.end_node(plain).unwrap();
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

fn good_tree() -> Tree {
    Tree {
        resv_cells: (2, 2),
        children: vec![
            // Firmware: no-map, not for any device.
            (
                "fw@48000000",
                vec![
                    ("reg", cells(&[0, 0x4800_0000, 0, 0x10_0000])),
                    ("no-map", vec![]),
                ],
            ),
            // A frame buffer the device must reach 1:1.
            (
                "fb@60000000",
                vec![
                    ("reg", cells(&[0, 0x6000_0000, 0, 0x1_0000])),
                    ("phandle", cells(&[0x20])),
                    (
                        "iommu-addresses",
                        cells(&[0x10, 0, 0x6000_0000, 0, 0x1_0000]),
                    ),
                ],
            ),
            // An IOVA carve-out (no reg) for two devices: /soc/dma (1/1 cells) and ours.
            (
                "carveout",
                vec![
                    ("phandle", cells(&[0x21])),
                    (
                        "iommu-addresses",
                        cells(&[
                            0x11,
                            0x1000,
                            0x1000, //
                            0x10,
                            0,
                            0x8000_0000,
                            0,
                            0x20_0000, //
                            0x10,
                            0,
                            0x9000_0000,
                            0,
                            0, // size 0: skipped
                        ]),
                    ),
                ],
            ),
            // IOVA != reg: a reservation, not a direct mapping.
            (
                "moved@70000000",
                vec![
                    ("reg", cells(&[0, 0x7000_0000, 0, 0x1000])),
                    ("phandle", cells(&[0x22])),
                    ("iommu-addresses", cells(&[0x10, 0, 0x7100_0000, 0, 0x1000])),
                ],
            ),
            // A dynamically placed pool: no reg.
            (
                "pool",
                vec![("size", cells(&[0, 0x40_0000])), ("reusable", vec![])],
            ),
        ],
        memory_region: Some(cells(&[0x20, 0x21, 0x22])),
    }
}

#[test]
fn reserved_memory_nodes_and_usable_ram() {
    let dtb = build(&good_tree());
    let dt = Devicetree::new(&dtb).unwrap();
    let nodes = reserved_memory(&dt).unwrap();
    let summary: Vec<_> = nodes
        .iter()
        .map(|n| (n.path.as_str(), n.phandle, n.range, n.no_map))
        .collect();
    let r = |start, size| PhysRange::from_start_size(start, size);
    assert_eq!(
        summary,
        [
            (
                "/reserved-memory/fw@48000000",
                0,
                r(0x4800_0000, 0x10_0000),
                true
            ),
            (
                "/reserved-memory/fb@60000000",
                0x20,
                r(0x6000_0000, 0x1_0000),
                false
            ),
            ("/reserved-memory/carveout", 0x21, None, false),
            (
                "/reserved-memory/moved@70000000",
                0x22,
                r(0x7000_0000, 0x1000),
                false
            ),
            ("/reserved-memory/pool", 0, None, false),
        ]
    );
    // RAM 0x4000_0000..0x8000_0000 minus the no-map firmware only.
    let ram = [r(0x4000_0000, 0x4000_0000).unwrap()];
    assert_eq!(
        usable_ram(&ram, &nodes),
        [
            PhysRange {
                start: 0x4000_0000,
                end: 0x47ff_ffff
            },
            PhysRange {
                start: 0x4810_0000,
                end: 0x7fff_ffff
            },
        ]
    );
    // No /reserved-memory: nothing.
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.end_node(root).unwrap();
    let empty = w.finish().unwrap();
    let empty = Devicetree::new(&empty).unwrap();
    assert_eq!(
        reserved_memory(&empty).unwrap(),
        Vec::<ReservedMemory>::new()
    );
}

#[test]
fn iommu_addresses_give_direct_and_reserved_regions() {
    let dtb = build(&good_tree());
    let dt = Devicetree::new(&dtb).unwrap();
    let got = devicetree_regions(&dt, "/virtio_mmio@a000000").unwrap();
    assert_eq!(
        got,
        [
            region(Direct, 0x6000_0000, 0x6000_ffff),
            region(Reserved, 0x8000_0000, 0x801f_ffff),
            region(Reserved, 0x7100_0000, 0x7100_0fff),
        ]
    );
    // Merged with a PROBE list without MSI: sorted, with the software window.
    let merged = merge(&[], &got);
    assert_eq!(merged.len(), 4);
    assert_eq!(merged[0], software_msi());
    assert!(merged.windows(2).all(|w| w[0].end < w[1].start));
    // A device without memory-region, and one that does not exist.
    assert_eq!(devicetree_regions(&dt, "/virtio_mmio@a000200").unwrap(), []);
    assert_eq!(
        devicetree_regions(&dt, "/nothing"),
        Err(TopologyError::NoSuchNode)
    );
    // /soc/dma (no memory-region of its own) gets nothing either.
    assert_eq!(devicetree_regions(&dt, "/soc/dma@9000000").unwrap(), []);
}

fn error_of(t: Tree) -> TopologyError {
    let dtb = build(&t);
    let dt = Devicetree::new(&dtb).unwrap();
    reserved_memory(&dt)
        .and_then(|_| devicetree_regions(&dt, "/virtio_mmio@a000000"))
        .unwrap_err()
}

#[test]
fn malformed_nodes_give_typed_errors() {
    let with = |name: &'static str, props: Props| Tree {
        resv_cells: (2, 2),
        children: vec![(name, props)],
        memory_region: Some(cells(&[0x30])),
    };
    let malformed = |property| TopologyError::MalformedProperty { property };
    // reg not whole entries.
    assert_eq!(
        error_of(with("a", vec![("reg", cells(&[0, 0x1000, 0]))])),
        malformed("reg")
    );
    // reg passing 2^64.
    assert_eq!(
        error_of(with(
            "a",
            vec![("reg", cells(&[0xffff_ffff, 0xffff_f000, 0, 0x2000]))]
        )),
        malformed("reg")
    );
    // memory-region naming no node.
    assert_eq!(
        error_of(with("a", vec![("phandle", cells(&[0x31]))])),
        TopologyError::UnknownMemoryRegion(0x30)
    );
    // iommu-addresses cut short, naming an unknown device, or passing 2^64.
    let node = |maps: Vec<u8>| {
        with(
            "a",
            vec![("phandle", cells(&[0x30])), ("iommu-addresses", maps)],
        )
    };
    assert_eq!(
        error_of(node(cells(&[0x10, 0, 0x1000, 0]))),
        malformed("iommu-addresses")
    );
    assert_eq!(
        error_of(node(cells(&[0x99, 0, 0x1000, 0, 0x1000]))),
        TopologyError::UnknownMemoryRegion(0x99)
    );
    assert_eq!(
        error_of(node(cells(&[0x10, 0xffff_ffff, 0xffff_f000, 0, 0x2000]))),
        malformed("iommu-addresses")
    );
    // Cells above 2.
    let mut t = with("a", vec![]);
    t.resv_cells = (3, 2);
    assert_eq!(
        error_of(t),
        TopologyError::UnsupportedCells {
            property: "#address-cells",
            value: 3
        }
    );
    // memory-region not whole cells.
    let mut t = with("a", vec![("phandle", cells(&[0x30]))]);
    t.memory_region = Some(vec![0, 0, 0x30]);
    assert_eq!(error_of(t), malformed("memory-region"));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn rank(k: ResvMemKind) -> u8 {
        match k {
            Reserved => 4,
            Unknown(_) => 3,
            Msi => 2,
            Direct => 1,
            SoftwareMsi => 0,
        }
    }

    fn kind() -> impl Strategy<Value = ResvMemKind> {
        prop_oneof![
            Just(Reserved),
            Just(Msi),
            Just(Direct),
            (3u8..255).prop_map(Unknown),
        ]
    }

    fn regions() -> impl Strategy<Value = Vec<ReservedRegion>> {
        let addr = prop_oneof![
            4 => 0u64..0x1000_0000,
            1 => (0u64..0x1000).prop_map(|d| u64::MAX - d),
            1 => Just(0u64),
        ];
        proptest::collection::vec(
            (kind(), addr, 0u64..0x200_0000).prop_map(|(kind, start, len)| ReservedRegion {
                kind,
                start,
                end: start.saturating_add(len),
            }),
            0..8,
        )
    }

    proptest! {
        /// The merged list is sorted and disjoint, adjacent pieces of one kind are joined,
        /// and every address gets exactly the highest-precedence kind of the inputs covering
        /// it (the software window only when PROBE has no MSI region), nothing elsewhere.
        #[test]
        fn merge_is_the_precedence_union(
            probe in regions(),
            dt in regions(),
            probes in proptest::collection::vec(any::<u64>(), 0..32),
        ) {
            let out = merge(&probe, &dt);
            for w in out.windows(2) {
                prop_assert!(w[0].start <= w[0].end && w[0].end < w[1].start);
                prop_assert!(!(w[0].kind == w[1].kind && w[0].end + 1 == w[1].start));
            }
            let sw = (!probe.iter().any(|r| r.kind == Msi)).then(software_msi);
            let all: Vec<_> = probe.iter().chain(&dt).copied().chain(sw).collect();
            // Addresses to check: every input boundary and its neighbours, plus random ones.
            let mut points = probes;
            for r in &all {
                points.extend([r.start, r.end, r.start.wrapping_sub(1), r.end.wrapping_add(1)]);
            }
            for a in points {
                let want = all
                    .iter()
                    .filter(|r| r.start <= a && a <= r.end)
                    .map(|r| r.kind)
                    .max_by_key(|&k| rank(k));
                let got: Vec<_> = out.iter().filter(|r| r.start <= a && a <= r.end).collect();
                prop_assert!(got.len() <= 1);
                let got = got.first().map(|r| r.kind);
                // Equal ranks (two Unknown subtypes) may pick either.
                prop_assert_eq!(got.map(rank), want.map(rank), "at {:#x}", a);
            }
        }
    }
}
