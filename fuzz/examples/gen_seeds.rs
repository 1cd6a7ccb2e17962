//! Writes the hand-made seed inputs of the driver targets into `fuzz/corpus/<target>/`:
//! PROBE property lists, fault records, and devicetrees built with `vm-fdt` (QEMU `virt`-like:
//! an ECAM host bridge with a `virtio,pci-iommu` and an `iommu-map`; a `virtio,mmio`
//! virtio-iommu with a platform device using `iommus`).
//!
//! ```sh
//! cd fuzz
//! qemu-system-aarch64 -M virt -machine dumpdtb=/tmp/virt.dtb -device virtio-iommu-pci \
//!     -nographic -nodefaults
//! cargo +nightly run --example gen_seeds -- /tmp/virt.dtb
//! ```
//!
//! With a path argument, that QEMU DTB is also written (packed: `totalsize` cut to the end of
//! its strings block, as `dtc -I dtb -O dtb` would, instead of QEMU's 1 MiB buffer).

use std::fs;
use std::path::Path;

use vm_fdt::FdtWriter;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn resv(subtype: u8, start: u64, end: u64) -> Vec<u8> {
    let mut b = vec![0u8; 24];
    b[0..2].copy_from_slice(&1u16.to_le_bytes());
    b[2..4].copy_from_slice(&20u16.to_le_bytes());
    b[4] = subtype;
    b[8..16].copy_from_slice(&start.to_le_bytes());
    b[16..24].copy_from_slice(&end.to_le_bytes());
    b
}

fn probe_seeds() {
    let t = "driver_probe_properties";
    // QEMU's MSI doorbell, then zeroes (terminator).
    let mut b = resv(1, 0x0802_0000, 0x0802_0fff);
    b.resize(64, 0);
    write(t, "qemu-msi", &b);
    // Two regions back to back, exactly filling the buffer.
    let mut b = resv(0, 0x1000, 0x1fff);
    b.extend(resv(1, 0x0802_0000, 0x0802_0fff));
    write(t, "two-regions-exact", &b);
    // Unknown type, reserved header bits, a longer RESV_MEM with an unknown subtype.
    let mut b = Vec::new();
    b.extend_from_slice(&7u16.to_le_bytes());
    b.extend_from_slice(&6u16.to_le_bytes());
    b.extend_from_slice(&[0xaa; 6]);
    let mut r = resv(0, 0x1000, 0x1fff);
    r[1] |= 0x10;
    b.extend(r);
    let mut long = resv(9, 0x5000, 0x5fff);
    long[2..4].copy_from_slice(&24u16.to_le_bytes());
    long.extend_from_slice(&[0xee; 4]);
    b.extend(long);
    b.extend_from_slice(&[0; 8]);
    write(t, "unknown-reserved-long", &b);
    // Malformed: length past the end; RESV_MEM too short; start > end; top of the space.
    let mut b = resv(1, 0, 0xfff);
    b.extend_from_slice(&[1, 0, 100, 0, 0, 0, 0, 0]);
    write(t, "overrun", &b);
    let mut b = vec![1, 0, 8, 0];
    b.resize(32, 0);
    write(t, "short-resv", &b);
    write(t, "inverted", &resv(0, 0x2000, 0x1000));
    write(t, "top", &resv(0, u64::MAX - 0xfff, u64::MAX));
}

fn fault(reason: u8, flags: u32, endpoint: u32, address: u64) -> Vec<u8> {
    let mut b = vec![0u8; 24];
    b[0] = reason;
    b[4..8].copy_from_slice(&flags.to_le_bytes());
    b[8..12].copy_from_slice(&endpoint.to_le_bytes());
    b[16..24].copy_from_slice(&address.to_le_bytes());
    b
}

fn fault_seeds() {
    let t = "driver_fault_event";
    // Input layout: used length (u32, little endian) then the buffer.
    let seed = |used: u32, buf: &[u8]| {
        let mut v = used.to_le_bytes().to_vec();
        v.extend_from_slice(buf);
        v
    };
    write(
        t,
        "mapping-read",
        &seed(24, &fault(2, 0x101, 0x18, 0x4020_0000)),
    );
    write(t, "domain-write", &seed(24, &fault(1, 0x102, 0x10, 0)));
    write(
        t,
        "no-address",
        &seed(24, &fault(0x77, 0x6, u32::MAX, u64::MAX)),
    );
    let mut reserved = fault(2, 0x101, 8, 0x1000);
    reserved[2] = 1;
    write(t, "reserved-set", &seed(24, &reserved));
    write(t, "short-used", &seed(23, &fault(2, 0x101, 8, 0x1000)));
    write(
        t,
        "short-buffer",
        &seed(24, &fault(2, 0x101, 8, 0x1000)[..12]),
    );
    write(t, "long-used", &seed(u32::MAX, &fault(2, 0x103, 8, 0x1000)));
}

fn be_cells(cells: &[u32]) -> Vec<u8> {
    cells.iter().flat_map(|c| c.to_be_bytes()).collect()
}

const PH: u32 = 0x8001;

/// QEMU `virt`-like: GIC-less root with an ECAM bridge holding a virtio-iommu at 00:01.0,
/// `iommu-map` around its own RID, optionally a mask, plus extra nodes from `extra`.
fn qemu_like(mask: Option<u32>, extra: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_string("compatible", "linux,dummy-virt").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    let pcie = w.begin_node("pcie@10000000").unwrap();
    w.property_string_list("compatible", vec!["pci-host-ecam-generic".into()])
        .unwrap();
    w.property_string("device_type", "pci").unwrap();
    w.property("reg", &be_cells(&[0x40, 0x1000_0000, 0, 0x1000_0000]))
        .unwrap();
    w.property_array_u32("bus-range", &[0, 0xff]).unwrap();
    w.property_u32("#address-cells", 3).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_array_u32(
        "ranges",
        &[
            0x0100_0000,
            0,
            0,
            0,
            0x3eff_0000,
            0,
            0x1_0000, //
            0x0200_0000,
            0,
            0x1000_0000,
            0,
            0x1000_0000,
            0,
            0x2eff_0000, //
            0x0300_0000,
            0x80,
            0,
            0x80,
            0,
            0x80,
            0,
        ],
    )
    .unwrap();
    w.property(
        "iommu-map",
        &be_cells(&[0x0, PH, 0x0, 0x8, 0x9, PH, 0x9, 0xfff7]),
    )
    .unwrap();
    if let Some(m) = mask {
        w.property_u32("iommu-map-mask", m).unwrap();
    }
    let iommu = w.begin_node("virtio_iommu@1,0").unwrap();
    w.property_string_list(
        "compatible",
        vec!["virtio,pci-iommu".into(), "pci1af4,1057".into()],
    )
    .unwrap();
    w.property_array_u32("reg", &[0x800, 0, 0, 0, 0]).unwrap();
    w.property_u32("#iommu-cells", 1).unwrap();
    w.property_u32("phandle", PH).unwrap();
    w.end_node(iommu).unwrap();
    w.end_node(pcie).unwrap();
    extra(&mut w);
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

fn topology_seeds(qemu_dtb: Option<&str>) {
    let t = "driver_topology";
    write(t, "vmfdt-qemu-like", &qemu_like(None, |_| {}));
    write(t, "vmfdt-mask", &qemu_like(Some(0xff), |_| {}));
    // An MMIO virtio-iommu and a platform device behind it (`iommus`), under /soc.
    let mmio = qemu_like(None, |w| {
        let soc = w.begin_node("soc").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        let v = w.begin_node("virtio_mmio@a000000").unwrap();
        w.property_string("compatible", "virtio,mmio").unwrap();
        w.property_array_u32("reg", &[0, 0x0a00_0000, 0, 0x200])
            .unwrap();
        w.property_u32("#iommu-cells", 1).unwrap();
        w.property_u32("phandle", 0x9001).unwrap();
        w.end_node(v).unwrap();
        let dma = w.begin_node("dma@9000000").unwrap();
        w.property_string("compatible", "arm,pl330").unwrap();
        w.property_array_u32("iommus", &[0x9001, 0x20, PH, 0x21])
            .unwrap();
        w.end_node(dma).unwrap();
        w.end_node(soc).unwrap();
    });
    write(t, "vmfdt-mmio-platform", &mmio);
    if let Some(path) = qemu_dtb {
        let b = fs::read(path).unwrap();
        let be = |i: usize| u32::from_be_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
        let (off_struct, off_strings, size_strings, size_struct) = (be(2), be(3), be(8), be(9));
        let end = (off_struct + size_struct).max(off_strings + size_strings);
        let mut packed = b[..end].to_vec();
        packed[4..8].copy_from_slice(&(end as u32).to_be_bytes());
        write(t, "qemu10-virt-virtio-iommu-pci", &packed);
    }
}

/// An ACPI table with `signature` and `body`, checksummed.
fn acpi_table(signature: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(b"BOCHS BXPC    \x01\0\0\0BXPC\x01\0\0\0");
    t.extend_from_slice(body);
    let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

/// A VIOT node: type, length, then `fields` (padded with zeros to `length`).
fn viot_node(node_type: u8, length: u16, fields: &[u8]) -> Vec<u8> {
    let mut n = vec![node_type, 0];
    n.extend_from_slice(&length.to_le_bytes());
    n.extend_from_slice(fields);
    n.resize(usize::from(length), 0);
    n
}

fn viot_table(nodes: &[Vec<u8>]) -> Vec<u8> {
    let mut body = (nodes.len() as u16).to_le_bytes().to_vec();
    body.extend_from_slice(&48u16.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    for n in nodes {
        body.extend_from_slice(n);
    }
    acpi_table(b"VIOT", &body)
}

/// PCI range: endpoint start, segment start/end, BDF start/end, output node.
fn viot_range(ep: u32, seg: (u16, u16), bdf: (u16, u16), out: u16) -> Vec<u8> {
    let mut f = ep.to_le_bytes().to_vec();
    for v in [seg.0, seg.1, bdf.0, bdf.1, out] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    viot_node(1, 24, &f)
}

fn viot_seeds() {
    let t = "driver_viot";
    let pci_iommu = |seg: u16, bdf: u16| {
        let mut f = seg.to_le_bytes().to_vec();
        f.extend_from_slice(&bdf.to_le_bytes());
        viot_node(3, 16, &f)
    };
    let mmio_iommu = |base: u64| {
        let mut f = vec![0; 4];
        f.extend_from_slice(&base.to_le_bytes());
        viot_node(4, 16, &f)
    };
    let mmio_ep = |ep: u32, base: u64, out: u16| {
        let mut f = ep.to_le_bytes().to_vec();
        f.extend_from_slice(&base.to_le_bytes());
        f.extend_from_slice(&out.to_le_bytes());
        viot_node(2, 24, &f)
    };
    // Mode byte first (bit 0: fix checksum, bit 1: blob, bit 2: two segments).
    let with_mode = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    let qemu = viot_table(&[pci_iommu(0, 8), viot_range(0, (0, 0), (0, 0xffff), 48)]);
    write(t, "qemu-virt", &with_mode(1, &qemu));
    let highmem_off = viot_table(&[pci_iommu(0, 8), viot_range(0, (0, 0), (0, 0x0fff), 48)]);
    write(t, "qemu-virt-highmem-off", &with_mode(0, &highmem_off));
    let mmio = viot_table(&[
        mmio_iommu(0x0a00_3e00),
        pci_iommu(1, 0x1008),
        mmio_ep(7, 0x0a00_0000, 48),
        mmio_ep(9, 0x0a00_0200, 64),
        viot_range(0x100, (0, 1), (0x0100, 0x01ff), 48),
        viot_range(0x10_0000, (1, 1), (0x1000, 0x10ff), 64),
    ]);
    write(t, "mmio-and-two-segments", &with_mode(5, &mmio));
    let mut facs = vec![0u8; 64];
    facs[..4].copy_from_slice(b"FACS");
    facs[4] = 64;
    let mut mcfg_body = vec![0u8; 8];
    mcfg_body.extend_from_slice(&0x40_1000_0000u64.to_le_bytes());
    mcfg_body.extend_from_slice(&[0, 0, 0, 0xff, 0, 0, 0, 0]);
    let blob = [
        facs,
        acpi_table(b"DSDT", &[0x10; 9]),
        acpi_table(b"MCFG", &mcfg_body),
        qemu.clone(),
        vec![0; 16],
    ]
    .concat();
    write(t, "tables-blob", &with_mode(3, &blob));
    // The VIOT QEMU 7.2 and 10.0.2 generate for `-M virt -device virtio-iommu-pci`, as the
    // firmware prints it (checksum computed by etc/table-loader): its range covers bus 0 only.
    let qemu_hex = "56494f54580000000066424f434853204258504320202020010000004258504301000000020030000000000000000000030010000000080000000000000000000100180000000000000000000000ff003000000000000000";
    let qemu_real: Vec<u8> = (0..qemu_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&qemu_hex[i..i + 2], 16).unwrap())
        .collect();
    write(t, "qemu-generated-viot", &with_mode(0, &qemu_real));
}

fn main() {
    let qemu_dtb = std::env::args().nth(1);
    probe_seeds();
    fault_seeds();
    topology_seeds(qemu_dtb.as_deref());
    viot_seeds();
    println!("seeds written under fuzz/corpus/");
}
