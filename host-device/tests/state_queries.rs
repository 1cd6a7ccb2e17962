//! What `IommuState` and `Domain` report (the `state` module docs): the domains and their endpoints and
//! mappings in order, inclusive mapping bounds, bypass mode of unattached endpoints (§5.13.6
//! "Device operations": BYPASS_CONFIG offered and `bypass == 1`, or legacy BYPASS negotiated),
//! the generation counter that changes with every change that can alter a translation (and a
//! rejected request changes nothing), fault flags and the wire form of a fault (D46, D47, D49).

mod common;

use std::sync::Arc;

use common::{attach, detach, map, unmap, RW};
use virtio_iommu_device::{Access, DeviceConfig, FaultRecord, IommuState, Mapping, ResvRegion};
use virtio_iommu_driver::wire::{
    Features, MapFlags, Status, ATTACH_F_BYPASS, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE,
    FAULT_R_DOMAIN, FAULT_R_MAPPING,
};
use zerocopy::IntoBytes;

fn state(b: virtio_iommu_device::DeviceConfigBuilder) -> IommuState {
    let mut s = IommuState::new(Arc::new(b.build().unwrap()));
    s.set_negotiated(s.config().offered());
    s
}

#[test]
fn domains_endpoints_and_mappings_are_listed_in_order() {
    let mut s = state(DeviceConfig::builder().endpoints([1, 2, 3, 4]));
    assert_eq!(s.domains().count(), 0);
    assert_eq!(s.attach(&attach(9, 3, 0)), Status::Ok);
    assert_eq!(s.attach(&attach(9, 1, 0)), Status::Ok);
    assert_eq!(s.attach(&attach(2, 4, ATTACH_F_BYPASS)), Status::Ok);
    let ids: Vec<u32> = s.domains().map(|(id, _)| id).collect();
    assert_eq!(ids, [2, 9]);
    assert_eq!(s.domain_count(), 2);
    let d9 = s.domain(9).unwrap();
    assert_eq!(d9.endpoints().collect::<Vec<_>>(), [1, 3]);
    assert!(!d9.is_bypass());
    let d2 = s.domain(2).unwrap();
    assert_eq!(d2.endpoints().collect::<Vec<_>>(), [4]);
    assert!(d2.is_bypass());
    assert_eq!(s.domains().find(|&(id, _)| id == 2).unwrap().1, d2);
    assert!(s.domain(1).is_none() && s.domain(3).is_none());
    assert_eq!(s.endpoint_domain(1), Some(9));
    assert_eq!(s.endpoint_domain(3), Some(9));
    assert_eq!(s.endpoint_domain(4), Some(2));
    assert_eq!(s.endpoint_domain(2), None);
    // Mappings in increasing IOVA order whatever the MAP order.
    for (a, p, f) in [
        (0x5000u64, 0x10_0000u64, MapFlags::READ),
        (0x1000, 0x20_0000, RW),
        (0x3000, 0x30_0000, MapFlags::WRITE),
    ] {
        assert_eq!(s.map(&map(9, a, a + 0xfff, p, f)), Status::Ok);
    }
    let got: Vec<(u64, Mapping)> = s
        .domain(9)
        .unwrap()
        .mappings()
        .map(|(a, m)| (a, *m))
        .collect();
    assert_eq!(
        got,
        [
            (
                0x1000,
                Mapping {
                    virt_end: 0x1fff,
                    phys_start: 0x20_0000,
                    flags: RW
                }
            ),
            (
                0x3000,
                Mapping {
                    virt_end: 0x3fff,
                    phys_start: 0x30_0000,
                    flags: MapFlags::WRITE
                }
            ),
            (
                0x5000,
                Mapping {
                    virt_end: 0x5fff,
                    phys_start: 0x10_0000,
                    flags: MapFlags::READ
                }
            ),
        ]
    );
    assert_eq!(s.domain(9).unwrap().mapping_count(), 3);
    assert_eq!(s.domain(2).unwrap().mapping_count(), 0);
}

#[test]
fn a_mapping_covers_exactly_virt_start_to_virt_end() {
    let mut s = state(DeviceConfig::builder().endpoint(1));
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    assert_eq!(s.map(&map(1, 0x4000, 0x5fff, 0x9000, RW)), Status::Ok);
    assert_eq!(s.map(&map(1, 0x8000, 0x8fff, 0x1000, RW)), Status::Ok);
    let d = s.domain(1).unwrap();
    for iova in [0x4000u64, 0x4001, 0x5000, 0x5fff] {
        let (start, m) = d.mapping_at(iova).unwrap();
        assert_eq!(
            (start, m.virt_end, m.phys_start),
            (0x4000, 0x5fff, 0x9000),
            "{iova:#x}"
        );
    }
    for iova in [0u64, 0x3fff, 0x6000, 0x7fff, 0x9000, u64::MAX] {
        assert!(d.mapping_at(iova).is_none(), "{iova:#x}");
    }
    assert_eq!(d.mapping_at(0x8fff).unwrap().0, 0x8000);
    // overlaps(start, end): inclusive ranges.
    assert!(d.overlaps(0x5fff, 0x6000), "last byte");
    assert!(d.overlaps(0x3000, 0x4000), "first byte");
    assert!(d.overlaps(0, u64::MAX));
    assert!(d.overlaps(0x4800, 0x4900));
    assert!(!d.overlaps(0x6000, 0x7fff), "the gap");
    assert!(!d.overlaps(0, 0x3fff));
    assert!(!d.overlaps(0x9000, u64::MAX));
    // Translation agrees (no off-by-one at either end).
    assert_eq!(
        s.translate(1, 0x5fff, 1, Access::READ).unwrap()[0].phys,
        0xafff
    );
    assert!(s.translate(1, 0x3fff, 1, Access::READ).is_err());
    assert!(s.translate(1, 0x6000, 1, Access::READ).is_err());
}

#[test]
fn unattached_bypass_needs_bypass_config_offered_and_bypass_1_or_legacy_bypass_negotiated() {
    let mut s = state(DeviceConfig::builder().endpoint(1));
    assert!(!s.unattached_bypass());
    assert!(!s.is_bypass(1));
    s.set_bypass(true);
    assert!(s.bypass());
    assert!(s.unattached_bypass());
    assert!(s.is_bypass(1));
    assert!(!s.is_bypass(2), "unknown endpoint: never bypass");
    // Offered is enough (negotiation is not required for the config field's meaning).
    s.set_negotiated(Features::VERSION_1);
    assert!(s.unattached_bypass());
    // An attached endpoint follows its domain.
    s.set_negotiated(s.config().offered());
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    assert!(!s.is_bypass(1));
    assert_eq!(s.attach(&attach(2, 1, ATTACH_F_BYPASS)), Status::Ok);
    assert!(s.is_bypass(1));
    s.set_bypass(false);
    assert!(s.is_bypass(1), "bypass domain, whatever the config field");

    // Without BYPASS_CONFIG offered the field means nothing.
    let mut s = state(
        DeviceConfig::builder()
            .endpoint(1)
            .feature(Features::BYPASS_CONFIG, false),
    );
    s.set_bypass(true);
    assert!(!s.unattached_bypass());
    assert!(s.translate(1, 0, 1, Access::READ).is_err());
    // Legacy BYPASS: only when negotiated.
    let mut s = IommuState::new(Arc::new(
        DeviceConfig::builder()
            .endpoint(1)
            .feature(Features::BYPASS_CONFIG, false)
            .feature(Features::BYPASS, true)
            .build()
            .unwrap(),
    ));
    assert!(!s.unattached_bypass());
    s.set_negotiated(Features::VERSION_1 | Features::BYPASS);
    assert!(s.unattached_bypass());
    assert!(s.is_bypass(1));
    assert_eq!(
        s.translate(1, 0x77, 1, Access::WRITE).unwrap()[0].phys,
        0x77
    );
}

#[test]
fn generation_changes_with_every_change_that_can_alter_a_translation() {
    let mut s = IommuState::new(Arc::new(
        DeviceConfig::builder().endpoints([1, 2]).build().unwrap(),
    ));
    let mut g = s.generation();
    let mut changed = |s: &IommuState, what: &str| {
        assert!(s.generation() != g, "{what}: generation unchanged");
        g = s.generation();
    };
    s.set_negotiated(s.config().offered());
    changed(&s, "negotiation");
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    changed(&s, "attach");
    assert_eq!(s.map(&map(1, 0, 0xfff, 0x1000, RW)), Status::Ok);
    changed(&s, "map");
    assert_eq!(s.unmap(&unmap(1, 0, 0xfff)), Status::Ok);
    changed(&s, "unmap");
    s.set_bypass(true);
    changed(&s, "bypass");
    assert_eq!(s.attach(&attach(2, 1, 0)), Status::Ok);
    changed(&s, "move");
    assert_eq!(s.detach(&detach(2, 1)), Status::Ok);
    changed(&s, "detach");
    s.reset();
    changed(&s, "reset");
}

#[test]
fn rejected_and_no_op_requests_leave_the_generation_alone() {
    let mut s = state(DeviceConfig::builder().endpoints([1, 2]));
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    assert_eq!(s.map(&map(1, 0, 0xfff, 0x1000, RW)), Status::Ok);
    let g = s.generation();
    assert_eq!(s.attach(&attach(1, 7, 0)), Status::NoEnt);
    assert_eq!(s.attach(&attach(1, 1, ATTACH_F_BYPASS)), Status::Inval);
    assert_eq!(s.detach(&detach(1, 2)), Status::Inval);
    assert_eq!(s.map(&map(1, 0, 0xfff, 0x1000, RW)), Status::Inval);
    assert_eq!(s.unmap(&unmap(1, 0, 0x7ff)), Status::Range);
    assert_eq!(
        s.unmap(&unmap(1, 0x5000, 0x5fff)),
        Status::Ok,
        "nothing there"
    );
    assert_eq!(
        s.attach(&attach(1, 1, 0)),
        Status::Ok,
        "already attached (D17)"
    );
    s.set_bypass(false);
    s.set_negotiated(s.config().offered());
    assert_eq!(s.generation(), g);
    assert_eq!(
        s.domain(1).unwrap().mapping_count(),
        1,
        "D17: mappings kept"
    );
}

#[test]
fn fault_flags_name_the_access_kind_and_always_the_address() {
    let mut s = state(
        DeviceConfig::builder()
            .endpoints([1, 2])
            .resv_region(2, ResvRegion::reserved(0x9000, 0x9fff)),
    );
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    // A mapping with flags 0: every access needing a permission faults (D27).
    assert_eq!(
        s.map(&map(1, 0, 0xfff, 0x1000, MapFlags::empty())),
        Status::Ok
    );
    for (access, flags) in [
        (Access::READ, FAULT_F_READ | FAULT_F_ADDRESS),
        (Access::WRITE, FAULT_F_WRITE | FAULT_F_ADDRESS),
        (
            Access::READ_WRITE,
            FAULT_F_READ | FAULT_F_WRITE | FAULT_F_ADDRESS,
        ),
    ] {
        let e = s.translate(1, 0x10, 4, access).unwrap_err();
        assert_eq!(
            e,
            virtio_iommu_device::TranslateError::Fault(FaultRecord {
                reason: FAULT_R_MAPPING,
                flags,
                endpoint: 1,
                address: 0x10,
            }),
            "{access:?}"
        );
    }
    // An access needing no permission is translated.
    assert_eq!(
        s.translate(1, 0x10, 4, Access::NONE).unwrap()[0].phys,
        0x1010
    );
    // Unattached: R_DOMAIN; RESERVED region: R_MAPPING, for an access with no permission too.
    let e = s.translate(2, 0x100, 1, Access::NONE).unwrap_err();
    assert_eq!(
        e,
        virtio_iommu_device::TranslateError::Fault(FaultRecord {
            reason: FAULT_R_DOMAIN,
            flags: FAULT_F_ADDRESS,
            endpoint: 2,
            address: 0x100,
        })
    );
    s.set_bypass(true);
    let e = s.translate(2, 0x8ff0, 0x20, Access::WRITE).unwrap_err();
    assert_eq!(
        e,
        virtio_iommu_device::TranslateError::Fault(FaultRecord {
            reason: FAULT_R_MAPPING,
            flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
            endpoint: 2,
            address: 0x9000,
        }),
        "D45: RESERVED faults even in bypass mode, at its first byte"
    );
}

#[test]
fn read_and_write_permissions_are_independent_d27() {
    let mut s = state(DeviceConfig::builder().endpoint(1));
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    assert_eq!(
        s.map(&map(1, 0x0000, 0x0fff, 0x10_0000, MapFlags::READ)),
        Status::Ok
    );
    assert_eq!(
        s.map(&map(1, 0x1000, 0x1fff, 0x20_0000, MapFlags::WRITE)),
        Status::Ok
    );
    assert_eq!(s.map(&map(1, 0x2000, 0x2fff, 0x30_0000, RW)), Status::Ok);
    let ok = |s: &IommuState, iova, a| s.translate(1, iova, 1, a).is_ok();
    assert!(ok(&s, 0x0, Access::READ));
    assert!(!ok(&s, 0x0, Access::WRITE), "no write without WRITE");
    assert!(!ok(&s, 0x0, Access::READ_WRITE));
    assert!(ok(&s, 0x1000, Access::WRITE));
    assert!(!ok(&s, 0x1000, Access::READ), "no read of write-only");
    assert!(!ok(&s, 0x1000, Access::READ_WRITE));
    assert!(ok(&s, 0x2000, Access::READ));
    assert!(ok(&s, 0x2000, Access::WRITE));
    assert!(ok(&s, 0x2000, Access::READ_WRITE));
    // The pieces say what the mapping allows.
    let p = s.translate(1, 0x0, 1, Access::NONE).unwrap()[0];
    assert_eq!(p.allowed, Access::READ);
    let p = s.translate(1, 0x1000, 1, Access::NONE).unwrap()[0];
    assert_eq!(p.allowed, Access::WRITE);
    let p = s.translate(1, 0x2000, 1, Access::NONE).unwrap()[0];
    assert_eq!(p.allowed, Access::READ_WRITE);
}

#[test]
fn the_wire_fault_has_reserved_fields_zero_d46() {
    let f = FaultRecord {
        reason: FAULT_R_MAPPING,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: 0x0102_0304,
        address: 0x1122_3344_5566_7788,
    };
    let w = f.to_wire();
    let b = w.as_bytes();
    assert_eq!(b.len(), 24);
    assert_eq!(b[0], FAULT_R_MAPPING);
    assert_eq!(&b[1..4], &[0, 0, 0]);
    assert_eq!(&b[4..8], &(FAULT_F_WRITE | FAULT_F_ADDRESS).to_le_bytes());
    assert_eq!(&b[8..12], &0x0102_0304u32.to_le_bytes());
    assert_eq!(&b[12..16], &[0, 0, 0, 0]);
    assert_eq!(&b[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
}

#[test]
fn debug_output_shows_the_domains_and_their_mappings() {
    let mut s = state(DeviceConfig::builder().endpoint(1));
    assert_eq!(s.attach(&attach(7, 1, 0)), Status::Ok);
    assert_eq!(s.map(&map(7, 0xabc000, 0xabcfff, 0x1000, RW)), Status::Ok);
    let d = format!("{:?}", s.domain(7).unwrap());
    assert!(d.contains(&format!("{}", 0xabc000u64)), "{d}");
    assert!(d.contains(&format!("{}", 0xabcfffu64)), "{d}");
    let all = format!("{s:?}");
    assert!(all.contains(&format!("{}", 0xabc000u64)), "{all}");
    // Equal mapping sets compare equal, different ones do not.
    let mut t = state(DeviceConfig::builder().endpoint(1));
    assert_eq!(t.attach(&attach(7, 1, 0)), Status::Ok);
    assert_ne!(t.domain(7), s.domain(7));
    assert_eq!(t.map(&map(7, 0xabc000, 0xabcfff, 0x1000, RW)), Status::Ok);
    assert_eq!(t.domain(7), s.domain(7));
    assert_eq!(t.map(&map(7, 0, 0xfff, 0x1000, RW)), Status::Ok);
    assert_ne!(t.domain(7), s.domain(7));
    // Same number of mappings, different ones: not equal.
    let mut u = state(DeviceConfig::builder().endpoint(1));
    assert_eq!(u.attach(&attach(7, 1, 0)), Status::Ok);
    assert_eq!(u.map(&map(7, 0xabc000, 0xabcfff, 0x2000, RW)), Status::Ok);
    assert_ne!(u.domain(7), s.domain(7));
}
