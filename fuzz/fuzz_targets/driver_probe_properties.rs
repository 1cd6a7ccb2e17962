//! `parse_probe_properties` on arbitrary bytes (a PROBE response's `properties` part, written
//! by a possibly hostile device). Never panics, and is checked against a naive walk of the
//! same bytes: every property delivered is the one at the walk's offset and lies inside the
//! buffer, a RESV_MEM has `start <= end` and the values found in the bytes, and an error names
//! the offset of the property that is malformed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_iommu_driver::parse::{parse_probe_properties, ProbeProperty, ResvMemKind};
use virtio_iommu_driver::IommuError;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let mut offset = 0usize;
    let mut delivered = 0usize;
    let result = parse_probe_properties(data, |p| {
        // The property the parser delivers starts at `offset`: its header is in the buffer...
        assert!(offset + 4 <= data.len(), "header outside the buffer");
        let raw_type = u16_at(data, offset);
        let length = usize::from(u16_at(data, offset + 2));
        // ...and so is its whole value.
        let end = offset + 4 + length;
        assert!(end <= data.len(), "property value runs past the buffer");
        match p {
            ProbeProperty::IgnoredReservedBits { raw_type: t } => {
                assert_eq!(t, raw_type);
                assert_ne!(t & 0xf000, 0);
            }
            ProbeProperty::Unknown { type_, length: l } => {
                assert_eq!((type_, usize::from(l)), (raw_type, length));
                assert!(type_ != 0 && type_ != 1 && type_ & 0xf000 == 0);
            }
            ProbeProperty::ResvMem(r) => {
                assert_eq!(raw_type, 1);
                assert!(length >= 20, "RESV_MEM shorter than its fields");
                assert!(r.start <= r.end, "RESV_MEM start > end delivered");
                assert_eq!(r.start, u64_at(data, offset + 8));
                assert_eq!(r.end, u64_at(data, offset + 16));
                let kind = match data[offset + 4] {
                    0 => ResvMemKind::Reserved,
                    1 => ResvMemKind::Msi,
                    k => ResvMemKind::Unknown(k),
                };
                assert_eq!(r.kind, kind);
                assert!(r.overlaps(r.start, r.start) && r.overlaps(r.end, r.end));
            }
        }
        offset = end;
        delivered += 1;
    });
    // Each property takes at least 4 bytes.
    assert!(delivered <= data.len() / 4);
    // Where the walk stopped, according to the spec's rules.
    match result {
        Ok(()) => {
            // End of buffer (less than a header left) or the NONE terminator (type 0, no
            // reserved bits).
            assert!(offset + 4 > data.len() || u16_at(data, offset) == 0);
        }
        Err(IommuError::MalformedProbe { offset: at }) => {
            assert_eq!(at, offset, "error offset is the next property's");
            assert!(at + 4 <= data.len());
            let raw_type = u16_at(data, at);
            let length = usize::from(u16_at(data, at + 2));
            let overruns = at + 4 + length > data.len();
            let bad_resv = !overruns
                && raw_type == 1
                && (length < 20 || u64_at(data, at + 8) > u64_at(data, at + 16));
            assert!(overruns || bad_resv, "error on a well-formed property");
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
});
