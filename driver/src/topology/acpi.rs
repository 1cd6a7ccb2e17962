//! ACPI static tables as bytes: the common table header, finding a table in a blob of
//! concatenated tables, and the MCFG (PCI ECAM regions).
//!
//! Layouts (ACPI Specification 6.5 §5.2.6 "System Description Table Header"; PCI Firmware
//! Specification 3.3 §4.1.2 "MCFG Table Description") are `zerocopy` structs of little-endian
//! fields with alignment 1, read from byte slices: nothing here dereferences a physical address
//! or trusts a length, and every error is an [`AcpiError`].
//!
//! # Why not the `acpi` crate
//!
//! rust-osdev's `acpi` (7.0.0-pre1 at the time of writing) has no VIOT, and its table walking
//! starts from a *physical address* of the RSDP/XSDT through an `unsafe` handler that must map
//! any address it is given and has no way to fail (so a bad pointer or length in an untrusted
//! table can only panic or read out of bounds). The tables this driver needs arrive as bytes
//! (QEMU's fw_cfg `etc/acpi/tables`, a buffer an OS has mapped), so this module walks them as
//! slices instead.
//!
//! # Finding a table: [`find_table`]
//!
//! QEMU's fw_cfg file `etc/acpi/tables` is every table except the RSDP laid end to end, each
//! starting where the previous one's `length` ends, possibly followed by zero padding; the
//! XSDT's pointers in it are only *offsets* until the guest firmware runs the
//! `etc/table-loader` script (which allocates the files and patches the pointers). Walking the
//! headers (signature, length) from offset 0 finds every table without running the loader:
//! that is what [`tables`] does. It stops at the end of the blob or where only zero bytes are
//! left, and reports anything else that is not a plausible header (a length shorter than the
//! header or past the end of the blob) as an error rather than guessing.

use alloc::vec::Vec;
use core::fmt;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The System Description Table Header every ACPI table except the RSDP and FACS starts with
/// (ACPI 6.5 §5.2.6), 36 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SdtHeader {
    /// Four ASCII characters naming the table (`b"VIOT"`, `b"MCFG"`, ...).
    pub signature: [u8; 4],
    /// Length of the whole table, header included, in bytes.
    pub length: U32,
    /// Table revision.
    pub revision: u8,
    /// The whole table's bytes sum to 0 modulo 256.
    pub checksum: u8,
    /// OEM ID.
    pub oem_id: [u8; 6],
    /// OEM table ID.
    pub oem_table_id: [u8; 8],
    /// OEM revision.
    pub oem_revision: U32,
    /// Vendor ID of the tool that created the table.
    pub creator_id: [u8; 4],
    /// Revision of that tool.
    pub creator_revision: U32,
}

/// Size of [`SdtHeader`] in bytes.
pub const SDT_HEADER_SIZE: usize = core::mem::size_of::<SdtHeader>();

/// The fixed part of the MCFG after its header: 8 reserved bytes (PCI Firmware 3.3 §4.1.2).
const MCFG_RESERVED: usize = 8;

/// One MCFG "Configuration Space Base Address Allocation Structure", 16 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct McfgAllocation {
    /// Physical address of the ECAM region **of bus 0** of this segment, even when
    /// `start_bus` is not 0 (bus `n` is at `base_address + (n << 20)`).
    pub base_address: U64,
    /// PCI segment group number.
    pub segment: U16,
    /// First bus decoded by this host bridge.
    pub start_bus: u8,
    /// Last bus decoded, inclusive.
    pub end_bus: u8,
    /// Reserved.
    pub reserved: [u8; 4],
}

/// An ECAM region of the MCFG, as checked by [`mcfg_entries`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct McfgEntry {
    /// PCI segment group number.
    pub segment: u16,
    /// Physical address of bus `bus_start`'s configuration space (bytes): the MCFG's base
    /// address plus `bus_start << 20`.
    pub ecam_base: u64,
    /// First bus number.
    pub bus_start: u8,
    /// Last bus number, inclusive.
    pub bus_end: u8,
}

/// Why ACPI tables (VIOT, MCFG, or a blob of tables) could not be read as a topology.
///
/// Offsets are in bytes from the start of the table named (for VIOT node errors, from the
/// start of the VIOT; for [`AcpiError::BadTableHeader`], from the start of the blob).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum AcpiError {
    /// The bytes are shorter than the table's header (36 bytes, 48 for the VIOT) or than the
    /// `length` its header gives, or `length` is smaller than that header.
    BadLength {
        /// The table's expected signature.
        signature: [u8; 4],
        /// The header's `length` field (0 when even the header is missing).
        length: u32,
        /// Bytes available.
        available: usize,
    },
    /// The header's signature is not the one asked for.
    BadSignature {
        /// The signature asked for.
        expected: [u8; 4],
        /// The one found.
        found: [u8; 4],
    },
    /// The table's `length` bytes do not sum to 0 modulo 256 (ACPI 6.5 §5.2.6).
    BadChecksum {
        /// The table's signature.
        signature: [u8; 4],
        /// Their sum modulo 256.
        sum: u8,
    },
    /// In a blob of concatenated tables, the header at `offset` is not a table: its length is
    /// shorter than a header or runs past the end of the blob, and the rest is not zero padding.
    BadTableHeader {
        /// Offset of the header in the blob (bytes).
        offset: usize,
    },
    /// No table with this signature in the blob.
    TableNotFound([u8; 4]),
    /// The MCFG's allocation structures are not a whole number of 16-byte entries, or one has
    /// `start_bus > end_bus` or a base address for which bus `start_bus` overflows 64 bits.
    BadMcfgEntry {
        /// Index of the entry (the one cut short, for a bad length).
        index: usize,
    },
    /// A VIOT node's header or body runs past the end of the table, `node_offset` points
    /// into the VIOT header, or a virtio-iommu node starts past offset 65535 (where no 16-bit
    /// `output_node` can name it).
    NodeOutOfBounds {
        /// Offset of the node (bytes from the start of the VIOT).
        offset: usize,
    },
    /// A VIOT node's `length` is shorter than its type's structure (4 bytes for a node of an
    /// unknown type, which is skipped).
    BadNodeLength {
        /// Offset of the node.
        offset: usize,
        /// Its type.
        node_type: u8,
        /// Its `length` field (bytes).
        length: u16,
    },
    /// The VIOT declares more nodes than this parser accepts ([`MAX_VIOT_NODES`]).
    ///
    /// [`MAX_VIOT_NODES`]: super::viot::MAX_VIOT_NODES
    TooManyNodes(u16),
    /// An endpoint node's `output_node` is not the offset of any node of the VIOT.
    UnknownOutputNode {
        /// Offset of the endpoint node.
        offset: usize,
        /// Its `output_node` field.
        output_node: u16,
    },
    /// An endpoint node's `output_node` is a node that is not a virtio-iommu (a PCI range or
    /// MMIO endpoint node, or a node of an unknown type).
    OutputNotIommu {
        /// Offset of the endpoint node.
        offset: usize,
        /// Its `output_node` field.
        output_node: u16,
    },
    /// A PCI range node with `segment_start > segment_end` or `bdf_start > bdf_end`.
    InvertedRange {
        /// Offset of the node.
        offset: usize,
    },
    /// A PCI range node whose last endpoint ID
    /// (`endpoint_start + ((segment_end - segment_start) << 16) + bdf_end - bdf_start`)
    /// does not fit in 32 bits.
    EndpointOverflow {
        /// Offset of the node.
        offset: usize,
    },
    /// Two endpoint nodes claim the same requester: PCI range nodes whose segment and BDF
    /// ranges both intersect, or MMIO endpoint nodes with the same base address.
    OverlappingEndpoints {
        /// Offset of the first node.
        first: usize,
        /// Offset of the second node.
        second: usize,
    },
    /// Two virtio-iommu nodes at the same place (same segment and BDF, or same base address).
    DuplicateIommu {
        /// Offset of the first node.
        first: usize,
        /// Offset of the second node.
        second: usize,
    },
    /// A virtio-pci IOMMU node whose segment and bus no MCFG entry covers, so it cannot be
    /// given a host bridge (and without an MCFG no PCI IOMMU can).
    NoHostBridge {
        /// Offset of the node.
        offset: usize,
        /// Its PCI segment.
        segment: u16,
        /// Its BDF (`bus << 8 | device << 3 | function`).
        bdf: u16,
    },
}

/// Four signature bytes as text, non-printable bytes as `?`.
struct Sig([u8; 4]);

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            let c = if b.is_ascii_graphic() { b as char } else { '?' };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadLength {
                signature,
                length,
                available,
            } => write!(
                f,
                "{}: table length {length} is shorter than its header or than the {available} bytes available allow",
                Sig(signature)
            ),
            Self::BadSignature { expected, found } => {
                write!(f, "expected table {}, found {}", Sig(expected), Sig(found))
            }
            Self::BadChecksum { signature, sum } => {
                write!(f, "{}: bytes sum to {sum:#04x}, not 0", Sig(signature))
            }
            Self::BadTableHeader { offset } => {
                write!(f, "no valid table header at offset {offset:#x} of the tables blob")
            }
            Self::TableNotFound(signature) => write!(f, "no {} table", Sig(signature)),
            Self::BadMcfgEntry { index } => write!(f, "MCFG entry {index} is malformed"),
            Self::NodeOutOfBounds { offset } => {
                write!(f, "VIOT node at offset {offset:#x} runs past the table")
            }
            Self::BadNodeLength {
                offset,
                node_type,
                length,
            } => write!(
                f,
                "VIOT node at offset {offset:#x} (type {node_type}) has length {length}, too short"
            ),
            Self::TooManyNodes(count) => write!(f, "VIOT declares {count} nodes, too many"),
            Self::UnknownOutputNode {
                offset,
                output_node,
            } => write!(
                f,
                "VIOT node at offset {offset:#x}: output node {output_node:#x} is not a node"
            ),
            Self::OutputNotIommu {
                offset,
                output_node,
            } => write!(
                f,
                "VIOT node at offset {offset:#x}: output node {output_node:#x} is not a virtio-iommu"
            ),
            Self::InvertedRange { offset } => {
                write!(f, "VIOT PCI range at offset {offset:#x} has start > end")
            }
            Self::EndpointOverflow { offset } => write!(
                f,
                "VIOT PCI range at offset {offset:#x}: endpoint IDs overflow 32 bits"
            ),
            Self::OverlappingEndpoints { first, second } => write!(
                f,
                "VIOT nodes at offsets {first:#x} and {second:#x} claim the same endpoints"
            ),
            Self::DuplicateIommu { first, second } => write!(
                f,
                "VIOT virtio-iommu nodes at offsets {first:#x} and {second:#x} are the same device"
            ),
            Self::NoHostBridge {
                offset,
                segment,
                bdf,
            } => write!(
                f,
                "VIOT virtio-iommu at offset {offset:#x} ({segment:04x}:{:02x}:{:02x}.{}) is on no MCFG host bridge",
                bdf >> 8,
                (bdf >> 3) & 0x1f,
                bdf & 7
            ),
        }
    }
}

impl core::error::Error for AcpiError {}

/// Checks that `bytes` starts with a whole, correctly checksummed ACPI table with this
/// `signature`, at least `min_length` bytes long (its header plus fixed fields), and returns
/// exactly its `length` bytes (anything after them is ignored).
///
/// # Errors
///
/// - [`AcpiError::BadLength`]: fewer than `max(36, min_length)` bytes, or a `length` field
///   below `min_length` or above `bytes.len()`.
/// - [`AcpiError::BadSignature`]: another signature.
/// - [`AcpiError::BadChecksum`]: the `length` bytes do not sum to 0 modulo 256.
pub fn checked_table(
    bytes: &[u8],
    signature: [u8; 4],
    min_length: usize,
) -> Result<&[u8], AcpiError> {
    let min_length = min_length.max(SDT_HEADER_SIZE);
    let Ok((header, _)) = SdtHeader::ref_from_prefix(bytes) else {
        return Err(AcpiError::BadLength {
            signature,
            length: 0,
            available: bytes.len(),
        });
    };
    if header.signature != signature {
        return Err(AcpiError::BadSignature {
            expected: signature,
            found: header.signature,
        });
    }
    let length = header.length.get();
    let bad_length = AcpiError::BadLength {
        signature,
        length,
        available: bytes.len(),
    };
    let table = usize::try_from(length)
        .ok()
        .filter(|&len| len >= min_length)
        .and_then(|len| bytes.get(..len))
        .ok_or(bad_length)?;
    let sum = table.iter().fold(0u8, |sum, &b| sum.wrapping_add(b));
    if sum != 0 {
        return Err(AcpiError::BadChecksum { signature, sum });
    }
    Ok(table)
}

/// One table found by [`tables`]: where it starts in the blob, its signature and its bytes
/// (exactly `length` of them; not checksum-checked).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct BlobTable<'a> {
    /// Offset of the table in the blob (bytes).
    pub offset: usize,
    /// Its signature.
    pub signature: [u8; 4],
    /// Its bytes, header included.
    pub bytes: &'a [u8],
}

/// Iterator of [`tables`].
#[derive(Clone, Debug)]
pub struct Tables<'a> {
    blob: &'a [u8],
    offset: usize,
    done: bool,
}

impl<'a> Iterator for Tables<'a> {
    type Item = Result<BlobTable<'a>, AcpiError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = self.blob.get(self.offset..).unwrap_or_default();
        if rest.iter().all(|&b| b == 0) {
            self.done = true;
            return None;
        }
        // Signature and length are the first 8 bytes of every table but the RSDP, FACS
        // included (whose header is otherwise different), so only they are read here.
        let length = rest
            .get(4..8)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .and_then(|len| usize::try_from(len).ok())
            .filter(|&len| len >= SDT_HEADER_SIZE);
        let Some(bytes) = length.and_then(|len| rest.get(..len)) else {
            self.done = true;
            return Some(Err(AcpiError::BadTableHeader {
                offset: self.offset,
            }));
        };
        let mut signature = [0u8; 4];
        signature.copy_from_slice(&bytes[..4]);
        let table = BlobTable {
            offset: self.offset,
            signature,
            bytes,
        };
        // `bytes.len() <= rest.len()`, so this stays within the blob.
        self.offset = self.offset.saturating_add(bytes.len());
        Some(Ok(table))
    }
}

/// The tables of a blob of ACPI tables laid end to end (such as QEMU's fw_cfg
/// `etc/acpi/tables`), in order, from offset 0: each table's `length` (at least 36 bytes) gives
/// where the next starts. Iteration ends at the end of the blob or where only zero bytes are
/// left (padding); a header that is neither yields one [`AcpiError::BadTableHeader`] and ends
/// the iteration. Checksums are not checked here (see [`find_table`]).
pub fn tables(blob: &[u8]) -> Tables<'_> {
    Tables {
        blob,
        offset: 0,
        done: false,
    }
}

/// The first table with `signature` in a blob of concatenated tables (see [`tables`]),
/// checked with [`checked_table`] (`min_length`: the table's fixed part, header included).
///
/// # Errors
///
/// [`AcpiError::BadTableHeader`] if the walk meets a bad header before finding the table,
/// [`AcpiError::TableNotFound`] if it ends without finding it, else those of
/// [`checked_table`] for the table found.
pub fn find_table(blob: &[u8], signature: [u8; 4], min_length: usize) -> Result<&[u8], AcpiError> {
    for table in tables(blob) {
        let table = table?;
        if table.signature == signature {
            return checked_table(table.bytes, signature, min_length);
        }
    }
    Err(AcpiError::TableNotFound(signature))
}

/// MCFG signature.
pub const MCFG_SIGNATURE: [u8; 4] = *b"MCFG";

/// Size of the MCFG's fixed part (header and reserved bytes), in bytes.
pub const MCFG_FIXED_SIZE: usize = SDT_HEADER_SIZE + MCFG_RESERVED;

/// The ECAM regions of an MCFG table (PCI Firmware Specification 3.3 §4.1.2), in table order.
///
/// `mcfg` is checked with [`checked_table`] first. Each entry's `ecam_base` is the region of
/// bus `start_bus` (the MCFG's base address is that of bus 0).
///
/// # Errors
///
/// Those of [`checked_table`], and [`AcpiError::BadMcfgEntry`] for a table whose entries are
/// not a whole number of 16 bytes, an entry with `start_bus > end_bus`, or one whose bus
/// `start_bus` address (or last byte of bus `end_bus`) overflows 64 bits.
pub fn mcfg_entries(mcfg: &[u8]) -> Result<Vec<McfgEntry>, AcpiError> {
    let table = checked_table(mcfg, MCFG_SIGNATURE, MCFG_FIXED_SIZE)?;
    let body = table.get(MCFG_FIXED_SIZE..).unwrap_or_default();
    let entry_size = core::mem::size_of::<McfgAllocation>();
    let count = body.len() / entry_size;
    let Ok(entries) = <[McfgAllocation]>::ref_from_bytes(body) else {
        return Err(AcpiError::BadMcfgEntry { index: count });
    };
    let mut out = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let bad = AcpiError::BadMcfgEntry { index };
        if entry.start_bus > entry.end_bus {
            return Err(bad);
        }
        let base = entry.base_address.get();
        let ecam_base = base
            .checked_add(u64::from(entry.start_bus) << 20)
            .ok_or(bad)?;
        // The last byte of the last bus must be addressable too.
        base.checked_add((u64::from(entry.end_bus) << 20) | 0xf_ffff)
            .ok_or(bad)?;
        out.push(McfgEntry {
            segment: entry.segment.get(),
            ecam_base,
            bus_start: entry.start_bus,
            bus_end: entry.end_bus,
        });
    }
    Ok(out)
}
