//! Decoding of what the device writes: PROBE properties (§5.13.6.7–8) and fault events
//! (§5.13.6.9). Pure functions over bytes, so they are tested on the host with hostile input.

use crate::error::IommuError;
use crate::wire::{
    Fault, ProbePropertyHeader, ProbeResvMem, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE,
    FAULT_R_DOMAIN, FAULT_R_MAPPING, PROBE_T_MASK, PROBE_T_NONE, PROBE_T_RESV_MEM, RESV_MEM_T_MSI,
    RESV_MEM_T_RESERVED,
};
use zerocopy::FromBytes;

/// Kind of a reserved memory region: the `subtype` of a PROBE RESV_MEM property (§5.13.6.8.1),
/// or one of the kinds the driver adds when it merges other sources
/// (`topology::reserved::merge`, feature `alloc`): [`ResvMemKind::SoftwareMsi`],
/// [`ResvMemKind::Direct`].
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum ResvMemKind {
    /// `RESV_MEM_T_RESERVED`: the endpoint must not access the region; never map it.
    Reserved,
    /// `RESV_MEM_T_MSI`: an MSI doorbell, translated by the device as identity; never map it.
    Msi,
    /// A subtype the spec does not define; treated as [`ResvMemKind::Reserved`] (driver
    /// requirement "SHOULD treat unknown subtypes as RESERVED"). Holds the raw value.
    Unknown(u8),
    /// Not from PROBE: the software MSI window the driver adds when PROBE reports no
    /// `RESV_MEM_T_MSI` region (as Linux's `IOMMU_RESV_SW_MSI`): IOVAs kept out of the
    /// allocator so that buffers never land where the embedder maps MSI doorbells by hand.
    SoftwareMsi,
    /// Not from PROBE: a devicetree `/reserved-memory` region whose `iommu-addresses` give the
    /// endpoint the same IOVA range as the region's `reg` (Linux's `IOMMU_RESV_DIRECT`): the
    /// range is kept out of the allocator and mapped 1:1 (IOVA = physical address, READ|WRITE).
    Direct,
}

/// A reserved region: `start..=end` (inclusive) in the endpoint's IOVA space, from a RESV_MEM
/// property (where IOVA equals guest-physical address) or from a merged list
/// (`topology::reserved::merge`, feature `alloc`).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct ReservedRegion {
    /// Region kind.
    pub kind: ResvMemKind,
    /// First address.
    pub start: u64,
    /// Last address (inclusive); `start <= end` always holds.
    pub end: u64,
}

impl ReservedRegion {
    /// Whether `start..=end` (inclusive) intersects the region.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start <= self.end && self.start <= end
    }
}

/// One property of a PROBE response.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ProbeProperty {
    /// `VIRTIO_IOMMU_PROBE_T_RESV_MEM`.
    ResvMem(ReservedRegion),
    /// A property type this driver does not know (skipped, §5.13.6.7 "SHOULD ignore unknown
    /// property types"): raw type and value length in bytes.
    Unknown {
        /// Type (bits 0-11 of the header).
        type_: u16,
        /// Value length in bytes, excluding the 4-byte header.
        length: u16,
    },
    /// A property whose reserved header bits (12-15) were set: ignored as the driver
    /// requirement says, parsing continued after it.
    IgnoredReservedBits {
        /// Raw 16-bit type field.
        raw_type: u16,
    },
}

/// Walks the `properties` buffer of a PROBE response (exactly `probe_size` bytes) and calls `f`
/// for each property, in order, until the `PROBE_T_NONE` terminator or the end of the buffer.
///
/// # Errors
///
/// [`IommuError::MalformedProbe`] (with the property's byte offset) when a property's
/// declared length runs past the buffer, or a RESV_MEM value is shorter than 20 bytes or has
/// `start > end`. Properties already passed to `f` stay delivered.
pub fn parse_probe_properties(
    properties: &[u8],
    mut f: impl FnMut(ProbeProperty),
) -> Result<(), IommuError> {
    const HDR: usize = size_of::<ProbePropertyHeader>();
    let mut offset = 0usize;
    while let Some(hdr_bytes) = properties.get(offset..offset + HDR) {
        let Ok(hdr) = ProbePropertyHeader::read_from_bytes(hdr_bytes) else {
            return Err(IommuError::MalformedProbe { offset });
        };
        let raw_type = hdr.type_.get();
        let length = usize::from(hdr.length.get());
        if raw_type & PROBE_T_MASK == PROBE_T_NONE && raw_type & !PROBE_T_MASK == 0 {
            return Ok(());
        }
        let value_end = offset + HDR + length;
        if value_end > properties.len() {
            return Err(IommuError::MalformedProbe { offset });
        }
        if raw_type & !PROBE_T_MASK != 0 {
            f(ProbeProperty::IgnoredReservedBits { raw_type });
        } else if raw_type == PROBE_T_RESV_MEM {
            // The length comes from the header, never from the type: a longer value is
            // accepted and its tail ignored.
            if length < size_of::<ProbeResvMem>() - HDR {
                return Err(IommuError::MalformedProbe { offset });
            }
            let Ok(resv) = ProbeResvMem::read_from_prefix(&properties[offset..]).map(|(r, _)| r)
            else {
                return Err(IommuError::MalformedProbe { offset });
            };
            let (start, end) = (resv.start.get(), resv.end.get());
            if start > end {
                return Err(IommuError::MalformedProbe { offset });
            }
            let kind = match resv.subtype {
                RESV_MEM_T_RESERVED => ResvMemKind::Reserved,
                RESV_MEM_T_MSI => ResvMemKind::Msi,
                other => ResvMemKind::Unknown(other),
            };
            f(ProbeProperty::ResvMem(ReservedRegion { kind, start, end }));
        } else {
            f(ProbeProperty::Unknown {
                type_: raw_type,
                length: hdr.length.get(),
            });
        }
        offset = value_end;
    }
    Ok(())
}

/// Fault reason (§5.13.6.9).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum FaultReason {
    /// `VIRTIO_IOMMU_FAULT_R_UNKNOWN`, and any reason the spec does not define (driver
    /// requirement "SHOULD treat as UNKNOWN"); the raw byte is kept.
    Unknown(u8),
    /// `VIRTIO_IOMMU_FAULT_R_DOMAIN`: access by an endpoint not attached to a domain.
    Domain,
    /// `VIRTIO_IOMMU_FAULT_R_MAPPING`: no mapping for the address, or the access lacked
    /// permission.
    Mapping,
}

/// A decoded fault report from the event queue (§5.13.6.9).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct FaultEvent {
    /// Why the access faulted.
    pub reason: FaultReason,
    /// The access was a read (`FAULT_F_READ`).
    pub read: bool,
    /// The access was a write (`FAULT_F_WRITE`).
    pub write: bool,
    /// Endpoint ID of the faulting endpoint.
    pub endpoint: u32,
    /// Faulting IOVA, when the device reported it (`FAULT_F_ADDRESS`).
    pub address: Option<u64>,
    /// The raw `flags` field, undefined bits included (they carry no meaning).
    pub raw_flags: u32,
}

/// Decodes one event buffer of `used_len` bytes.
///
/// Returns `None` when the report must be ignored: used length shorter than the 24-byte
/// `struct virtio_iommu_fault`, or non-zero `reserved` bytes (driver requirement "MUST ignore
/// the report"). `reserved1` and undefined flag bits are ignored as required.
pub fn parse_fault(buffer: &[u8], used_len: u32) -> Option<FaultEvent> {
    let used = usize::try_from(used_len).ok()?;
    if used < size_of::<Fault>() {
        return None;
    }
    let (fault, _) = Fault::read_from_prefix(buffer).ok()?;
    if fault.reserved != [0; 3] {
        return None;
    }
    let flags = fault.flags.get();
    let reason = match fault.reason {
        FAULT_R_DOMAIN => FaultReason::Domain,
        FAULT_R_MAPPING => FaultReason::Mapping,
        other => FaultReason::Unknown(other),
    };
    Some(FaultEvent {
        reason,
        read: flags & FAULT_F_READ != 0,
        write: flags & FAULT_F_WRITE != 0,
        endpoint: fault.endpoint.get(),
        address: (flags & FAULT_F_ADDRESS != 0).then(|| fault.address.get()),
        raw_flags: flags,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn resv(subtype: u8, start: u64, end: u64) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..2].copy_from_slice(&1u16.to_le_bytes());
        b[2..4].copy_from_slice(&20u16.to_le_bytes());
        b[4] = subtype;
        b[8..16].copy_from_slice(&start.to_le_bytes());
        b[16..24].copy_from_slice(&end.to_le_bytes());
        b
    }

    fn collect(buf: &[u8]) -> Result<Vec<ProbeProperty>, IommuError> {
        let mut v = Vec::new();
        parse_probe_properties(buf, |p| v.push(p)).map(|()| v)
    }

    #[test]
    fn qemu_msi_region_then_terminator() {
        let mut buf = [0u8; 512];
        buf[..24].copy_from_slice(&resv(1, 0x0802_0000, 0x0802_0fff));
        let props = collect(&buf).unwrap();
        assert_eq!(
            props,
            [ProbeProperty::ResvMem(ReservedRegion {
                kind: ResvMemKind::Msi,
                start: 0x0802_0000,
                end: 0x0802_0fff
            })]
        );
    }

    #[test]
    fn unknown_types_reserved_bits_and_longer_values_are_skipped_by_length() {
        let mut buf = Vec::new();
        // Unknown type 7 with 6 bytes of value.
        buf.extend_from_slice(&7u16.to_le_bytes());
        buf.extend_from_slice(&6u16.to_le_bytes());
        buf.extend_from_slice(&[0xaa; 6]);
        // RESV_MEM with reserved header bit 12 set: must be ignored.
        let mut r = resv(0, 0x1000, 0x1fff);
        r[1] |= 0x10;
        buf.extend_from_slice(&r);
        // RESV_MEM with a 28-byte value (4 extra bytes), unknown subtype 9.
        let mut long = resv(9, 0x5000, 0x5fff).to_vec();
        long[2..4].copy_from_slice(&24u16.to_le_bytes());
        long.extend_from_slice(&[0xee; 4]);
        buf.extend_from_slice(&long);
        buf.extend_from_slice(&[0; 16]);
        let props = collect(&buf).unwrap();
        assert_eq!(props.len(), 3);
        assert_eq!(
            props[0],
            ProbeProperty::Unknown {
                type_: 7,
                length: 6
            }
        );
        assert_eq!(
            props[1],
            ProbeProperty::IgnoredReservedBits { raw_type: 0x1001 }
        );
        assert_eq!(
            props[2],
            ProbeProperty::ResvMem(ReservedRegion {
                kind: ResvMemKind::Unknown(9),
                start: 0x5000,
                end: 0x5fff
            })
        );
    }

    #[test]
    fn malformed_lists_are_errors_with_offsets() {
        // Length running past the buffer.
        let mut buf = [0u8; 32];
        buf[..24].copy_from_slice(&resv(1, 0, 0xfff));
        buf[24..26].copy_from_slice(&1u16.to_le_bytes());
        buf[26..28].copy_from_slice(&100u16.to_le_bytes());
        assert_eq!(
            collect(&buf),
            Err(IommuError::MalformedProbe { offset: 24 })
        );
        // RESV_MEM too short for its fields.
        let mut short = [0u8; 64];
        short[0..2].copy_from_slice(&1u16.to_le_bytes());
        short[2..4].copy_from_slice(&8u16.to_le_bytes());
        assert_eq!(
            collect(&short),
            Err(IommuError::MalformedProbe { offset: 0 })
        );
        // start > end.
        let mut inv = [0u8; 24];
        inv.copy_from_slice(&resv(0, 0x2000, 0x1000));
        assert_eq!(collect(&inv), Err(IommuError::MalformedProbe { offset: 0 }));
    }

    #[test]
    fn a_property_filling_the_buffer_exactly_and_empty_buffers_parse() {
        assert_eq!(collect(&resv(1, 0, 0)).unwrap().len(), 1);
        assert_eq!(collect(&[]).unwrap().len(), 0);
        assert_eq!(
            collect(&[1, 0]).unwrap().len(),
            0,
            "a partial header ends the list"
        );
    }

    #[test]
    fn every_two_byte_prefix_of_random_lists_terminates_without_panic() {
        let mut state = 0x1234_5678_u32;
        for _ in 0..20_000 {
            let mut buf = [0u8; 64];
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *b = (state & 0xff) as u8;
            }
            // Keep lengths small sometimes so parsing goes deep.
            buf[3] &= 0x00;
            let mut count = 0;
            let _ = parse_probe_properties(&buf, |_| count += 1);
            assert!(count <= 16, "each property consumes at least 4 bytes");
        }
    }

    #[test]
    fn fault_decoding_follows_the_driver_rules() {
        let mut b = [0u8; 24];
        b[0] = 2;
        b[4..8].copy_from_slice(&(0x101u32 | 0x4).to_le_bytes()); // READ, ADDRESS, undefined EXEC
        b[8..12].copy_from_slice(&0x10u32.to_le_bytes());
        b[12..16].copy_from_slice(&0xffff_ffffu32.to_le_bytes()); // reserved1: ignored
        b[16..24].copy_from_slice(&0x4_2000u64.to_le_bytes());
        let f = parse_fault(&b, 24).unwrap();
        assert_eq!(f.reason, FaultReason::Mapping);
        assert!(f.read && !f.write);
        assert_eq!(f.endpoint, 0x10);
        assert_eq!(f.address, Some(0x4_2000));

        let mut no_addr = b;
        no_addr[4..8].copy_from_slice(&2u32.to_le_bytes());
        no_addr[0] = 0x77;
        let f = parse_fault(&no_addr, 24).unwrap();
        assert_eq!(f.reason, FaultReason::Unknown(0x77));
        assert_eq!(f.address, None);
        assert!(f.write);

        let mut reserved = b;
        reserved[2] = 1;
        assert_eq!(
            parse_fault(&reserved, 24),
            None,
            "reserved != 0 must be ignored"
        );
        assert_eq!(parse_fault(&b, 23), None, "short used length");
        assert_eq!(parse_fault(&b[..10], 24), None, "short buffer");
    }
}
