//! ACPI tables for devices QEMU does not describe: an `etc/acpi/tables` blob (MCFG, VIOT and
//! an XSDT listing them) and its `etc/table-loader` script, given to the guest through
//! `-fw_cfg` on a `-M virt,acpi=off` machine (QEMU's `-acpitable` is not supported on aarch64).
//!
//! The blob follows QEMU's conventions, which the firmware's ACPI case reads: tables end to end
//! from offset 0, the XSDT's entries holding the tables' *offsets* in the blob (QEMU's loader
//! would turn them into addresses with ADD_POINTER), and one ADD_CHECKSUM command per table
//! (QEMU `hw/acpi/bios-linker-loader.c`: 128-byte little-endian commands). The checksums are
//! also computed here, so the blob is valid as it stands (an ADD_CHECKSUM over a correct table
//! subtracts 0).
//!
//! Layouts: ACPI 6.4 §5.2.6 (system description table header), §5.2.8 (XSDT), PCI Firmware
//! Specification 3.2 §4.1.2 (MCFG), ACPI 6.4 §5.2.32 (VIOT). The OEM fields are QEMU's
//! (`BOCHS `, `BXPC    `), so a table built here for the same machine is byte for byte the one
//! QEMU builds.

/// Size of the system description table header in bytes.
pub const SDT_HEADER_SIZE: usize = 36;
/// fw_cfg file name of the tables blob.
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// fw_cfg file name of the loader script.
pub const LOADER_FILE: &str = "etc/table-loader";
/// Size of one loader command in bytes.
const LOADER_ENTRY_SIZE: usize = 128;
/// Loader command number of ADD_CHECKSUM.
const ADD_CHECKSUM: u32 = 3;
/// Length of a loader command's file name field in bytes.
const LOADER_FILE_LEN: usize = 56;
/// Offset of the checksum byte in the header.
const CHECKSUM_OFFSET: usize = 9;

/// A whole table: the 36-byte header (`signature`, length, `revision`, checksum, QEMU's OEM
/// fields) followed by `body`.
///
/// # Panics
///
/// Never for tables under 4 GiB (the length is a `u32`); larger bodies are a caller bug.
pub fn table(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let length = u32::try_from(SDT_HEADER_SIZE + body.len()).expect("ACPI table under 4 GiB");
    let mut t = Vec::with_capacity(SDT_HEADER_SIZE + body.len());
    t.extend_from_slice(&signature);
    t.extend_from_slice(&length.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(b"BOCHS ");
    t.extend_from_slice(b"BXPC    ");
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"BXPC"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    t[CHECKSUM_OFFSET] = 0u8.wrapping_sub(sum);
    t
}

/// One MCFG allocation: an ECAM window.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct McfgEntry {
    /// Physical base address of the ECAM window (bus 0's configuration space).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub bus_start: u8,
    /// Last bus decoded (inclusive).
    pub bus_end: u8,
}

/// The MCFG table (revision 1) with these allocations.
pub fn mcfg(entries: &[McfgEntry]) -> Vec<u8> {
    let mut body = vec![0u8; 8]; // reserved
    for e in entries {
        body.extend_from_slice(&e.base.to_le_bytes());
        body.extend_from_slice(&e.segment.to_le_bytes());
        body.push(e.bus_start);
        body.push(e.bus_end);
        body.extend_from_slice(&[0; 4]);
    }
    table(*b"MCFG", 1, &body)
}

/// One VIOT node (ACPI 6.4 §5.2.32.2–5.2.32.5). `output` fields are indices into the node list
/// given to [`viot`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ViotNode {
    /// Type 1: PCI endpoints `bdf_start..=bdf_end` of segments `segment_start..=segment_end`,
    /// endpoint IDs from `endpoint_start`, behind IOMMU node `output`.
    PciRange {
        /// Endpoint ID of the first BDF.
        endpoint_start: u32,
        /// First PCI segment.
        segment_start: u16,
        /// Last PCI segment (inclusive).
        segment_end: u16,
        /// First BDF (bus << 8 | devfn).
        bdf_start: u16,
        /// Last BDF (inclusive).
        bdf_end: u16,
        /// Index of the IOMMU node.
        output: usize,
    },
    /// Type 2: one virtio-mmio (or other MMIO) endpoint at `base_address`.
    MmioEndpoint {
        /// Its endpoint ID.
        endpoint_id: u32,
        /// Base address of its MMIO region.
        base_address: u64,
        /// Index of the IOMMU node.
        output: usize,
    },
    /// Type 3: a virtio-iommu on PCI at `segment`, `bdf`.
    VirtioPciIommu {
        /// Its PCI segment.
        segment: u16,
        /// Its BDF.
        bdf: u16,
    },
    /// Type 4: a virtio-iommu on virtio-mmio at `base_address`.
    VirtioMmioIommu {
        /// Base address of its virtio-mmio window.
        base_address: u64,
    },
}

impl ViotNode {
    /// The node's length in bytes.
    fn len(&self) -> usize {
        match self {
            Self::PciRange { .. } | Self::MmioEndpoint { .. } => 24,
            Self::VirtioPciIommu { .. } | Self::VirtioMmioIommu { .. } => 16,
        }
    }
}

/// The VIOT (revision 0) with these nodes, in order, from offset 48.
///
/// # Errors
///
/// A message when an `output` index does not name an IOMMU node in `nodes`, or there are more
/// nodes than fit in the table's 16-bit offsets.
pub fn viot(nodes: &[ViotNode]) -> Result<Vec<u8>, String> {
    const HEADER: usize = SDT_HEADER_SIZE + 12;
    let mut offsets = Vec::with_capacity(nodes.len());
    let mut at = HEADER;
    for node in nodes {
        offsets.push(u16::try_from(at).map_err(|_| "VIOT over 64 KiB".to_string())?);
        at += node.len();
    }
    let output = |index: usize| -> Result<u16, String> {
        match nodes.get(index) {
            Some(ViotNode::VirtioPciIommu { .. } | ViotNode::VirtioMmioIommu { .. }) => {
                Ok(offsets[index])
            }
            _ => Err(format!("VIOT output node {index} is not an IOMMU node")),
        }
    };
    let count = u16::try_from(nodes.len()).map_err(|_| "too many VIOT nodes".to_string())?;
    let mut body = Vec::with_capacity(at - SDT_HEADER_SIZE);
    body.extend_from_slice(&count.to_le_bytes());
    body.extend_from_slice(
        &(if nodes.is_empty() {
            0u16
        } else {
            HEADER as u16
        })
        .to_le_bytes(),
    );
    body.extend_from_slice(&[0; 8]);
    for node in nodes {
        let (kind, len) = match node {
            ViotNode::PciRange { .. } => (1u8, 24u16),
            ViotNode::MmioEndpoint { .. } => (2, 24),
            ViotNode::VirtioPciIommu { .. } => (3, 16),
            ViotNode::VirtioMmioIommu { .. } => (4, 16),
        };
        body.push(kind);
        body.push(0);
        body.extend_from_slice(&len.to_le_bytes());
        match *node {
            ViotNode::PciRange {
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
                output: out,
            } => {
                body.extend_from_slice(&endpoint_start.to_le_bytes());
                body.extend_from_slice(&segment_start.to_le_bytes());
                body.extend_from_slice(&segment_end.to_le_bytes());
                body.extend_from_slice(&bdf_start.to_le_bytes());
                body.extend_from_slice(&bdf_end.to_le_bytes());
                body.extend_from_slice(&output(out)?.to_le_bytes());
                body.extend_from_slice(&[0; 6]);
            }
            ViotNode::MmioEndpoint {
                endpoint_id,
                base_address,
                output: out,
            } => {
                body.extend_from_slice(&endpoint_id.to_le_bytes());
                body.extend_from_slice(&base_address.to_le_bytes());
                body.extend_from_slice(&output(out)?.to_le_bytes());
                body.extend_from_slice(&[0; 6]);
            }
            ViotNode::VirtioPciIommu { segment, bdf } => {
                body.extend_from_slice(&segment.to_le_bytes());
                body.extend_from_slice(&bdf.to_le_bytes());
                body.extend_from_slice(&[0; 8]);
            }
            ViotNode::VirtioMmioIommu { base_address } => {
                body.extend_from_slice(&[0; 4]);
                body.extend_from_slice(&base_address.to_le_bytes());
            }
        }
    }
    Ok(table(*b"VIOT", 0, &body))
}

/// The `etc/acpi/tables` blob and its `etc/table-loader` script.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct AcpiBlob {
    /// The tables end to end, then the XSDT.
    pub tables: Vec<u8>,
    /// One ADD_CHECKSUM command per table (XSDT included).
    pub loader: Vec<u8>,
}

/// `tables` end to end, followed by an XSDT (revision 1) whose entries are their offsets in
/// the blob, and the loader script.
///
/// # Panics
///
/// Never for blobs under 4 GiB.
pub fn blob(tables: &[Vec<u8>]) -> AcpiBlob {
    let mut blob = Vec::new();
    let mut spans = Vec::new();
    let mut entries = Vec::new();
    for t in tables {
        entries.extend_from_slice(&(blob.len() as u64).to_le_bytes());
        spans.push((blob.len(), t.len()));
        blob.extend_from_slice(t);
    }
    let xsdt = table(*b"XSDT", 1, &entries);
    spans.push((blob.len(), xsdt.len()));
    blob.extend_from_slice(&xsdt);
    let mut loader = Vec::with_capacity(spans.len() * LOADER_ENTRY_SIZE);
    for (start, len) in spans {
        let mut entry = [0u8; LOADER_ENTRY_SIZE];
        entry[..4].copy_from_slice(&ADD_CHECKSUM.to_le_bytes());
        entry[4..4 + TABLES_FILE.len()].copy_from_slice(TABLES_FILE.as_bytes());
        let fields = 4 + LOADER_FILE_LEN;
        let word = |v: usize| u32::try_from(v).expect("blob under 4 GiB").to_le_bytes();
        entry[fields..fields + 4].copy_from_slice(&word(start + CHECKSUM_OFFSET));
        entry[fields + 4..fields + 8].copy_from_slice(&word(start));
        entry[fields + 8..fields + 12].copy_from_slice(&word(len));
        loader.extend_from_slice(&entry);
    }
    AcpiBlob {
        tables: blob,
        loader,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_iommu_driver::topology::{Endpoint, IommuLocation, Topology};

    /// QEMU 11.1's VIOT for `-M virt -device virtio-iommu-pci` (at 00:01.0), as the firmware
    /// printed it.
    const QEMU_VIOT: &str =
        "56494f54580000000066424f434853204258504320202020010000004258504301000000\
        020030000000000000000000030010000000080000000000000000000100180000000000000000000000\
        ff003000000000000000";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// QEMU's nodes: its range covers the buses in use (bus 0 only: BDF 0..=0xff).
    fn qemu_like() -> Vec<ViotNode> {
        vec![
            ViotNode::VirtioPciIommu { segment: 0, bdf: 8 },
            ViotNode::PciRange {
                endpoint_start: 0,
                segment_start: 0,
                segment_end: 0,
                bdf_start: 0,
                bdf_end: 0xff,
                output: 0,
            },
        ]
    }

    #[test]
    fn viot_is_qemus_byte_for_byte() {
        assert_eq!(hex(&viot(&qemu_like()).unwrap()), QEMU_VIOT);
    }

    #[test]
    fn mcfg_layout() {
        let t = mcfg(&[McfgEntry {
            base: 0x40_1000_0000,
            segment: 0,
            bus_start: 0,
            bus_end: 255,
        }]);
        assert_eq!(t.len(), 0x3c, "QEMU's MCFG length");
        assert_eq!(&t[44..52], &0x40_1000_0000u64.to_le_bytes());
        assert_eq!(t[55], 255);
        assert_eq!(t.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
    }

    #[test]
    fn bad_output_is_refused() {
        let mut nodes = qemu_like();
        nodes.push(ViotNode::MmioEndpoint {
            endpoint_id: 1,
            base_address: 0xa000000,
            output: 1, // a PCI range, not an IOMMU
        });
        assert!(viot(&nodes).is_err());
        assert!(viot(&[ViotNode::MmioEndpoint {
            endpoint_id: 1,
            base_address: 0,
            output: 5
        }])
        .is_err());
    }

    #[test]
    fn the_drivers_parser_reads_the_blob() {
        let b = blob(&[
            mcfg(&[McfgEntry {
                base: 0x40_1000_0000,
                segment: 0,
                bus_start: 0,
                bus_end: 255,
            }]),
            viot(&qemu_like()).unwrap(),
        ]);
        assert_eq!(b.loader.len(), 3 * 128);
        // Every table checksums to 0 and the XSDT lists the others' offsets.
        let tables: Vec<_> = virtio_iommu_driver::topology::acpi::tables(&b.tables)
            .map(|t| t.expect("table"))
            .collect();
        let names: Vec<_> = tables.iter().map(|t| t.signature).collect();
        assert_eq!(names, [*b"MCFG", *b"VIOT", *b"XSDT"]);
        let xsdt = tables[2].bytes;
        assert_eq!(&xsdt[36..44], &(tables[0].offset as u64).to_le_bytes());
        assert_eq!(&xsdt[44..52], &(tables[1].offset as u64).to_le_bytes());
        let topology = Topology::from_acpi_tables(&b.tables).expect("VIOT and MCFG");
        assert_eq!(topology.iommus.len(), 1);
        assert_eq!(
            topology.iommus[0].location,
            IommuLocation::Pci {
                host_bridge: 0,
                requester_id: 8
            }
        );
        assert!(matches!(
            topology.pci_endpoint(0, 0x10),
            Ok(Some(Endpoint {
                iommu: 0,
                endpoint_id: 0x10,
                ..
            }))
        ));
        // The loader's commands sum exactly the tables (applying them changes nothing).
        for (i, entry) in b.loader.chunks_exact(128).enumerate() {
            assert_eq!(u32::from_le_bytes(entry[..4].try_into().unwrap()), 3);
            assert!(entry[4..].starts_with(b"etc/acpi/tables\0"));
            let word = |at: usize| u32::from_le_bytes(entry[at..at + 4].try_into().unwrap());
            assert_eq!(word(60) as usize, tables[i].offset + 9);
            assert_eq!(word(64) as usize, tables[i].offset);
            assert_eq!(word(68) as usize, tables[i].bytes.len());
        }
    }
}
