//! `parse_fault(buffer, used_len)` on arbitrary bytes and used lengths (an eventq buffer
//! written by a possibly hostile device). Never panics; a report is decoded only when it is
//! complete (used length and buffer at least 24 bytes) with zero `reserved` bytes, and every
//! decoded field is the one in the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_iommu_driver::parse::{parse_fault, FaultReason};

fuzz_target!(|input: (u32, &[u8])| {
    let (used_len, buf) = input;
    let Some(f) = parse_fault(buf, used_len) else {
        return;
    };
    assert!(used_len >= 24 && buf.len() >= 24, "short report decoded");
    assert_eq!(buf[1..4], [0, 0, 0], "reserved bytes must be zero");
    let flags = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    assert_eq!(f.raw_flags, flags);
    assert_eq!(f.read, flags & 1 != 0);
    assert_eq!(f.write, flags & 2 != 0);
    assert_eq!(
        f.endpoint,
        u32::from_le_bytes(buf[8..12].try_into().unwrap())
    );
    let address = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    assert_eq!(f.address, (flags & 0x100 != 0).then_some(address));
    match f.reason {
        FaultReason::Domain => assert_eq!(buf[0], 1),
        FaultReason::Mapping => assert_eq!(buf[0], 2),
        FaultReason::Unknown(r) => {
            assert_eq!(r, buf[0]);
            assert!(r != 1 && r != 2);
        }
    }
});
