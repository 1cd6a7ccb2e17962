//! ACPI topology discovery on arbitrary bytes: `Viot::parse`, `Topology::from_viot` (with a
//! fixed QEMU `virt`-like MCFG, or two segments) and `Topology::from_acpi_tables` (the bytes as
//! a blob of concatenated tables). Never panics; and what is returned agrees with the checked
//! `Viot` and with a naive reading of the bytes.
//!
//! Input: byte 0 is a mode, the rest the table (or blob). Mode bit 0: fix the VIOT checksum
//! first (so mutations get past it); bit 1: blob mode; bit 2: the two-segment MCFG.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_iommu_driver::topology::acpi::{AcpiError, SdtHeader};
use virtio_iommu_driver::topology::viot::{Viot, ViotIommuLocation};
use virtio_iommu_driver::topology::{IommuLocation, Topology};

/// An MCFG with `(bus-0 base, segment, start bus, end bus)` entries, checksummed.
fn mcfg(entries: &[(u64, u16, u8, u8)]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(b"MCFG");
    t.extend_from_slice(&((44 + 16 * entries.len()) as u32).to_le_bytes());
    t.extend_from_slice(&[1, 0]);
    // OEM ID, OEM table ID, OEM revision, creator ID, creator revision; 8 reserved bytes.
    t.extend_from_slice(&[0; 26]);
    t.extend_from_slice(&[0; 8]);
    for &(base, segment, start, end) in entries {
        t.extend_from_slice(&base.to_le_bytes());
        t.extend_from_slice(&segment.to_le_bytes());
        t.extend_from_slice(&[start, end, 0, 0, 0, 0]);
    }
    fix_checksum(&mut t);
    t
}

fn fix_checksum(t: &mut [u8]) {
    if t.len() < 10 {
        return;
    }
    t[9] = 0;
    let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
}

/// Bytes `0..length` of a table if its header's length fits, else `None`.
fn declared(t: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(t.get(4..8)?.try_into().ok()?) as usize;
    t.get(..len)
}

/// Checks a topology built from `viot` (already parsed successfully) against it.
fn check(t: &Topology, viot: &Viot, segments: &[(u16, u8, u8)]) {
    assert_eq!(t.iommus.len(), viot.iommus.len());
    assert_eq!(t.host_bridges.len(), segments.len());
    for (node, iommu) in t.iommus.iter().zip(&viot.iommus) {
        assert_eq!(node.phandle, u32::from(iommu.offset));
        assert!(iommu.offset >= 48);
        match (node.location, iommu.location) {
            (
                IommuLocation::Pci {
                    host_bridge,
                    requester_id,
                },
                ViotIommuLocation::Pci { segment, bdf },
            ) => {
                assert_eq!(requester_id, bdf);
                let (s, start, end) = segments[host_bridge];
                assert_eq!(s, segment);
                assert!((start..=end).contains(&((bdf >> 8) as u8)));
            }
            (IommuLocation::Mmio { base, size }, ViotIommuLocation::Mmio { base: b }) => {
                assert_eq!((base, size), (b, 0));
            }
            other => panic!("location kinds differ: {other:?}"),
        }
    }
    // Ranges never overlap, so each covered RID has exactly one answer: that of its range, or
    // none for the translating IOMMU's own BDF.
    for range in &viot.pci_ranges {
        assert!(range.segment_start <= range.segment_end && range.bdf_start <= range.bdf_end);
        assert!(range.iommu < viot.iommus.len());
        for (index, &(segment, _, _)) in segments.iter().enumerate() {
            for bdf in [
                range.bdf_start,
                range.bdf_end,
                range.bdf_start.wrapping_add(1).min(range.bdf_end),
                range.bdf_start / 2 + range.bdf_end / 2,
            ] {
                let got = t
                    .pci_endpoint(index, bdf)
                    .expect("phandles are VIOT offsets");
                let Some(want) = range.endpoint_id(segment, bdf) else {
                    continue;
                };
                let own =
                    viot.iommus[range.iommu].location == ViotIommuLocation::Pci { segment, bdf };
                if own {
                    assert_eq!(got, None, "an IOMMU translates itself");
                } else {
                    let got = got.expect("covered RID without an endpoint");
                    assert_eq!((got.iommu, got.endpoint_id), (range.iommu, want));
                }
            }
        }
    }
    assert_eq!(t.mmio_endpoints.len(), viot.mmio_endpoints.len());
    for e in &viot.mmio_endpoints {
        let got = t.mmio_endpoint(e.base).expect("listed MMIO endpoint");
        assert_eq!((got.iommu, got.endpoint_id), (e.iommu, e.endpoint_id));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 2 != 0 {
        // Blob mode: walk, then build from whatever VIOT/MCFG is found.
        for table in virtio_iommu_driver::topology::acpi::tables(&bytes) {
            match table {
                Ok(t) => {
                    assert!(t.bytes.len() >= 36);
                    assert_eq!(&t.bytes[..4], &t.signature);
                    assert_eq!(declared(&bytes[t.offset..]), Some(t.bytes));
                }
                Err(AcpiError::BadTableHeader { offset }) => assert!(offset < bytes.len()),
                Err(e) => panic!("tables() yielded {e:?}"),
            }
        }
        if let Ok(t) = Topology::from_acpi_tables(&bytes) {
            for node in &t.iommus {
                if let IommuLocation::Pci { host_bridge, .. } = node.location {
                    assert!(host_bridge < t.host_bridges.len());
                }
            }
        }
        return;
    }
    if mode & 1 != 0 {
        fix_checksum(&mut bytes);
    }
    let segments: &[(u16, u8, u8)] = if mode & 4 != 0 {
        &[(0, 0, 0x0f), (1, 0x10, 0xff)]
    } else {
        &[(0, 0, 0xff)]
    };
    let entries: Vec<(u64, u16, u8, u8)> = segments
        .iter()
        .map(|&(s, start, end)| (0x4000_0000 * (u64::from(s) + 1), s, start, end))
        .collect();
    let mcfg = mcfg(&entries);

    let parsed = Viot::parse(&bytes);
    if std::env::var_os("FUZZ_STATS").is_some() {
        match &parsed {
            Ok(v) => eprintln!(
                "stats: ok iommus={} ranges={} mmio={}",
                v.iommus.len(),
                v.pci_ranges.len(),
                v.mmio_endpoints.len()
            ),
            Err(e) => eprintln!("stats: err {e:?}"),
        }
    }
    let topology = Topology::from_viot(&bytes, Some(&mcfg));
    match parsed {
        Ok(viot) => {
            // A parse implies a whole, checksummed VIOT table at the start.
            let table = declared(&bytes).expect("parsed table length fits");
            assert!(table.len() >= 48 && &table[..4] == b"VIOT");
            assert_eq!(table.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
            assert!(zerocopy::FromBytes::ref_from_prefix(table)
                .map(|(h, _): (&SdtHeader, _)| h.length.get() as usize == table.len())
                .unwrap_or(false));
            match topology {
                Ok(t) => check(&t, &viot, segments),
                // The MCFG is valid, so the only thing left to fail is placing a PCI IOMMU.
                Err(AcpiError::NoHostBridge { segment, bdf, .. }) => {
                    assert!(viot
                        .iommus
                        .iter()
                        .any(|i| i.location == ViotIommuLocation::Pci { segment, bdf }));
                    assert!(!segments.iter().any(|&(s, start, end)| s == segment
                        && (start..=end).contains(&((bdf >> 8) as u8))));
                }
                Err(e) => panic!("Viot::parse succeeded but from_viot failed: {e:?}"),
            }
        }
        Err(e) => {
            assert_eq!(topology, Err(e));
            if let Some(table) = declared(&bytes) {
                let sum = table.iter().fold(0u8, |s, &b| s.wrapping_add(b));
                if sum != 0 && table.len() >= 48 && &table[..4] == b"VIOT" {
                    assert_eq!(
                        e,
                        AcpiError::BadChecksum {
                            signature: *b"VIOT",
                            sum
                        }
                    );
                }
            }
        }
    }
});
