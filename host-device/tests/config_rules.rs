//! `DeviceConfigBuilder`: the documented defaults, that every knob is applied, and the exact
//! boundaries of each validation rule (README "Configuration knobs"; D2, D3, D42, D43 of the
//! "Statement index" in `CONFORMANCE.md`; §5.13.4 for the config-space fields and their
//! availability).

use virtio_iommu_device::config::{
    MAX_PROBE_SIZE, MAX_QUEUE_SIZE, RESV_MEM_PROPERTY_SIZE, SUPPORTED_FEATURES,
};
use virtio_iommu_device::{Caps, ConfigError, DeviceConfig, ResvKind, ResvRegion};
use virtio_iommu_driver::wire::{Features, RESV_MEM_T_MSI, RESV_MEM_T_RESERVED};

fn ep() -> virtio_iommu_device::DeviceConfigBuilder {
    DeviceConfig::builder().endpoint(1)
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = DeviceConfig::builder().build().unwrap();
    assert_eq!(
        c.offered(),
        Features::INPUT_RANGE
            | Features::DOMAIN_RANGE
            | Features::MAP_UNMAP
            | Features::PROBE
            | Features::MMIO
            | Features::BYPASS_CONFIG
            | Features::RING_INDIRECT_DESC
            | Features::VERSION_1
    );
    assert_eq!(c.page_size_mask(), 0xffff_ffff_ffff_f000);
    assert_eq!(c.granule(), 4096);
    assert_eq!(c.input_range(), (0, (1 << 48) - 1));
    assert_eq!(c.effective_input_range(), (0, (1 << 48) - 1));
    assert_eq!(c.domain_range(), (0, u32::MAX));
    assert_eq!(c.effective_domain_range(), (0, u32::MAX));
    assert_eq!(c.probe_size(), 512);
    assert!(!c.boot_bypass(), "boot bypass is 0 (D9, closed default)");
    assert_eq!(c.endpoints().count(), 0);
    assert_eq!(c.queue_size(), 256);
    assert_eq!(
        c.caps(),
        Caps {
            max_domains: 1024,
            max_mappings: 65536,
            max_requests_per_notify: 256,
            max_pending_faults: 64,
        }
    );
    assert_eq!(c.caps(), Caps::default());
    assert_eq!(
        DeviceConfig::default(),
        c,
        "Default is the builder's defaults"
    );
}

#[test]
fn every_knob_is_applied() {
    let caps = Caps {
        max_domains: 3,
        max_mappings: 5,
        max_requests_per_notify: 7,
        max_pending_faults: 9,
    };
    let c = DeviceConfig::builder()
        .page_size_mask(0x20_1000)
        .input_range(0x1000, 0x7fff_ffff)
        .domain_range(4, 40)
        .probe_size(48)
        .boot_bypass(true)
        .endpoints([9, 3])
        .endpoint(5)
        .caps(caps)
        .queue_size(64)
        .build()
        .unwrap();
    assert_eq!(c.page_size_mask(), 0x20_1000);
    assert_eq!(c.granule(), 0x1000, "the lowest set bit of page_size_mask");
    assert_eq!(c.input_range(), (0x1000, 0x7fff_ffff));
    assert_eq!(c.effective_input_range(), (0x1000, 0x7fff_ffff));
    assert_eq!(c.domain_range(), (4, 40));
    assert_eq!(c.effective_domain_range(), (4, 40));
    assert_eq!(c.probe_size(), 48);
    assert!(c.boot_bypass());
    assert_eq!(
        c.endpoints().collect::<Vec<_>>(),
        [3, 5, 9],
        "increasing order"
    );
    assert!(c.has_endpoint(3) && c.has_endpoint(5) && c.has_endpoint(9));
    assert!(!c.has_endpoint(4) && !c.has_endpoint(0));
    assert_eq!(c.caps(), caps);
    assert_eq!(c.queue_size(), 64);

    let c = DeviceConfig::builder()
        .max_domains(2)
        .max_mappings(3)
        .max_requests_per_notify(4)
        .max_pending_faults(6)
        .build()
        .unwrap();
    assert_eq!(
        c.caps(),
        Caps {
            max_domains: 2,
            max_mappings: 3,
            max_requests_per_notify: 4,
            max_pending_faults: 6,
        }
    );
}

#[test]
fn granule_is_the_lowest_set_bit_of_page_size_mask() {
    for (mask, granule) in [
        (1u64, 1u64),
        (0b110, 2),
        (0x1000, 0x1000),
        (0xffff_ffff_ffff_0000, 0x1_0000),
        (1 << 63, 1 << 63),
    ] {
        let c = DeviceConfig::builder()
            .page_size_mask(mask)
            .build()
            .unwrap();
        assert_eq!(c.page_size_mask(), mask);
        assert_eq!(c.granule(), granule, "mask {mask:#x}");
    }
}

#[test]
fn feature_knobs_offer_and_withdraw_bits_and_version_1_is_always_offered() {
    let c = DeviceConfig::builder()
        .feature(Features::MMIO | Features::PROBE, false)
        .build()
        .unwrap();
    assert!(!c.offered().intersects(Features::MMIO | Features::PROBE));
    assert!(c
        .offered()
        .contains(Features::MAP_UNMAP | Features::VERSION_1));
    let c = DeviceConfig::builder()
        .features(Features::MAP_UNMAP)
        .build()
        .unwrap();
    assert_eq!(c.offered(), Features::MAP_UNMAP | Features::VERSION_1);
    // Asking for VERSION_1 explicitly keeps it too.
    let c = DeviceConfig::builder()
        .features(Features::MAP_UNMAP | Features::VERSION_1)
        .build()
        .unwrap();
    assert_eq!(c.offered(), Features::MAP_UNMAP | Features::VERSION_1);
    let c = DeviceConfig::builder()
        .features(Features::empty())
        .build()
        .unwrap();
    assert_eq!(c.offered(), Features::VERSION_1);
    // Every supported bit can be offered (except both bypass features together, D2).
    let c = DeviceConfig::builder()
        .features(SUPPORTED_FEATURES - Features::BYPASS)
        .build()
        .unwrap();
    assert_eq!(c.offered(), SUPPORTED_FEATURES - Features::BYPASS);
}

#[test]
fn unsupported_features_are_named_exactly() {
    for bad in [
        Features::RING_EVENT_IDX,
        Features::ACCESS_PLATFORM,
        Features::RING_PACKED,
        Features::RING_RESET,
    ] {
        assert_eq!(
            ep().feature(bad, true).build(),
            Err(ConfigError::UnsupportedFeatures(bad))
        );
    }
    assert_eq!(
        ep().feature(Features::RING_EVENT_IDX | Features::RING_RESET, true)
            .build(),
        Err(ConfigError::UnsupportedFeatures(
            Features::RING_EVENT_IDX | Features::RING_RESET
        ))
    );
}

#[test]
fn d2_legacy_bypass_alone_is_accepted_both_bypass_features_are_not() {
    let c = ep()
        .feature(Features::BYPASS_CONFIG, false)
        .feature(Features::BYPASS, true)
        .build()
        .unwrap();
    assert!(c.offered().contains(Features::BYPASS));
    assert!(!c.offered().contains(Features::BYPASS_CONFIG));
    assert_eq!(
        ep().feature(Features::BYPASS, true).build(),
        Err(ConfigError::BothBypassFeatures)
    );
}

#[test]
fn boot_bypass_needs_bypass_config_offered() {
    assert!(ep().boot_bypass(true).build().unwrap().boot_bypass());
    assert_eq!(
        ep().feature(Features::BYPASS_CONFIG, false)
            .boot_bypass(true)
            .build(),
        Err(ConfigError::BypassWithoutBypassConfig)
    );
    // Boot bypass 0 needs nothing.
    let c = ep()
        .feature(Features::BYPASS_CONFIG, false)
        .boot_bypass(false)
        .build()
        .unwrap();
    assert!(!c.boot_bypass());
}

#[test]
fn d3_page_size_mask_must_not_be_zero() {
    assert_eq!(
        ep().page_size_mask(0).build(),
        Err(ConfigError::PageSizeMaskZero)
    );
    assert!(ep().page_size_mask(1).build().is_ok());
}

#[test]
fn ranges_may_hold_a_single_value_but_not_be_inverted() {
    let c = ep().input_range(0x5000, 0x5000).build().unwrap();
    assert_eq!(c.input_range(), (0x5000, 0x5000));
    assert_eq!(
        ep().input_range(0x5001, 0x5000).build(),
        Err(ConfigError::InputRangeInverted)
    );
    let c = ep().domain_range(7, 7).build().unwrap();
    assert_eq!(c.domain_range(), (7, 7));
    assert_eq!(
        ep().domain_range(8, 7).build(),
        Err(ConfigError::DomainRangeInverted)
    );
    let c = ep().input_range(0, u64::MAX).domain_range(0, u32::MAX);
    assert!(c.build().is_ok());
}

#[test]
fn effective_ranges_are_the_configured_ones_only_when_offered() {
    // §5.13.6: without INPUT_RANGE mappings span the whole 64-bit space; without DOMAIN_RANGE
    // any domain value is valid. The config space still presents the configured values.
    let c = ep()
        .input_range(0x1000, 0x1fff)
        .domain_range(10, 20)
        .feature(Features::INPUT_RANGE, false)
        .build()
        .unwrap();
    assert_eq!(c.input_range(), (0x1000, 0x1fff));
    assert_eq!(c.effective_input_range(), (0, u64::MAX));
    assert_eq!(c.effective_domain_range(), (10, 20));
    let c = ep()
        .input_range(0x1000, 0x1fff)
        .domain_range(10, 20)
        .feature(Features::DOMAIN_RANGE, false)
        .build()
        .unwrap();
    assert_eq!(c.effective_input_range(), (0x1000, 0x1fff));
    assert_eq!(c.domain_range(), (10, 20));
    assert_eq!(c.effective_domain_range(), (0, u32::MAX));
}

#[test]
fn probe_size_up_to_the_maximum_is_accepted() {
    assert_eq!(MAX_PROBE_SIZE, 1 << 20, "README: at most 1 MiB");
    let c = ep().probe_size(MAX_PROBE_SIZE).build().unwrap();
    assert_eq!(c.probe_size(), MAX_PROBE_SIZE);
    assert_eq!(
        ep().probe_size(MAX_PROBE_SIZE + 1).build(),
        Err(ConfigError::ProbeSizeTooLarge(MAX_PROBE_SIZE + 1))
    );
    assert_eq!(ep().probe_size(0).build().unwrap().probe_size(), 0);
}

#[test]
fn resv_mem_properties_must_fit_probe_size_exactly_or_better() {
    assert_eq!(RESV_MEM_PROPERTY_SIZE, 24);
    // One region needs 24 bytes: 24 fits, 23 does not.
    let one = |size| {
        ep().probe_size(size)
            .resv_region(1, ResvRegion::msi(0x8000, 0x8fff))
            .build()
    };
    assert_eq!(one(24).unwrap().probe_size(), 24);
    assert_eq!(
        one(23),
        Err(ConfigError::ProbeSizeTooSmall {
            endpoint: 1,
            needed: 24
        })
    );
    // Two regions need 48 bytes.
    let two = |size| {
        ep().probe_size(size)
            .resv_region(1, ResvRegion::msi(0x8000, 0x8fff))
            .resv_region(1, ResvRegion::reserved(0x9000, 0x9fff))
            .build()
    };
    assert!(two(48).is_ok());
    assert_eq!(
        two(47),
        Err(ConfigError::ProbeSizeTooSmall {
            endpoint: 1,
            needed: 48
        })
    );
    // Three regions, on the second endpoint.
    let three = |size| {
        DeviceConfig::builder()
            .endpoints([1, 2])
            .probe_size(size)
            .resv_region(2, ResvRegion::reserved(0x1000, 0x1fff))
            .resv_region(2, ResvRegion::reserved(0x3000, 0x3fff))
            .resv_region(2, ResvRegion::msi(0x5000, 0x5fff))
            .build()
    };
    assert!(three(72).is_ok());
    assert_eq!(
        three(71),
        Err(ConfigError::ProbeSizeTooSmall {
            endpoint: 2,
            needed: 72
        })
    );
    // Without PROBE offered nothing has to fit.
    let c = ep()
        .probe_size(0)
        .feature(Features::PROBE, false)
        .resv_region(1, ResvRegion::msi(0x8000, 0x8fff))
        .build()
        .unwrap();
    assert_eq!(c.resv_regions(1).unwrap().len(), 1);
}

#[test]
fn each_zero_cap_is_refused_by_name() {
    assert_eq!(
        ep().max_domains(0).build(),
        Err(ConfigError::ZeroCap("max_domains"))
    );
    assert_eq!(
        ep().max_mappings(0).build(),
        Err(ConfigError::ZeroCap("max_mappings"))
    );
    assert_eq!(
        ep().max_requests_per_notify(0).build(),
        Err(ConfigError::ZeroCap("max_requests_per_notify"))
    );
    assert_eq!(
        ep().max_pending_faults(0).build(),
        Err(ConfigError::ZeroCap("max_pending_faults"))
    );
    let one = Caps {
        max_domains: 1,
        max_mappings: 1,
        max_requests_per_notify: 1,
        max_pending_faults: 1,
    };
    assert_eq!(ep().caps(one).build().unwrap().caps(), one);
}

#[test]
fn queue_size_is_a_power_of_two_up_to_32768() {
    assert_eq!(MAX_QUEUE_SIZE, 32768);
    for ok in [1u16, 2, 4, 256, 32768] {
        assert_eq!(ep().queue_size(ok).build().unwrap().queue_size(), ok);
    }
    for bad in [0u16, 3, 6, 255, 257, 32767, 65535] {
        assert_eq!(
            ep().queue_size(bad).build(),
            Err(ConfigError::InvalidQueueSize(bad))
        );
    }
}

#[test]
fn resv_region_constructors_and_subtypes() {
    let r = ResvRegion::reserved(0x1000, 0x1fff);
    assert_eq!(
        r,
        ResvRegion {
            kind: ResvKind::Reserved,
            start: 0x1000,
            end: 0x1fff
        }
    );
    let m = ResvRegion::msi(0x0802_0000, 0x0802_0fff);
    assert_eq!(
        m,
        ResvRegion {
            kind: ResvKind::Msi,
            start: 0x0802_0000,
            end: 0x0802_0fff
        }
    );
    // §5.13.6.8.1 subtypes.
    assert_eq!(ResvKind::Reserved.subtype(), RESV_MEM_T_RESERVED);
    assert_eq!(ResvKind::Msi.subtype(), RESV_MEM_T_MSI);
    assert_eq!((RESV_MEM_T_RESERVED, RESV_MEM_T_MSI), (0, 1));
}

#[test]
fn resv_region_bounds_are_inclusive() {
    let r = ResvRegion::reserved(0x1000, 0x1fff);
    assert!(r.contains(0x1000) && r.contains(0x1800) && r.contains(0x1fff));
    assert!(!r.contains(0xfff) && !r.contains(0x2000) && !r.contains(0));
    assert!(!r.contains(u64::MAX));
    // overlaps(start, end): the inclusive ranges intersect.
    assert!(r.overlaps(0x1000, 0x1fff));
    assert!(r.overlaps(0, 0x1000), "touches the first byte");
    assert!(r.overlaps(0x1fff, u64::MAX), "touches the last byte");
    assert!(r.overlaps(0x1100, 0x1200), "inside");
    assert!(r.overlaps(0, u64::MAX), "around");
    assert!(!r.overlaps(0, 0xfff), "ends just before");
    assert!(!r.overlaps(0x2000, 0x2fff), "starts just after");
    let byte = ResvRegion::msi(7, 7);
    assert!(byte.contains(7) && !byte.contains(6) && !byte.contains(8));
    assert!(byte.overlaps(7, 7) && !byte.overlaps(8, 9) && !byte.overlaps(5, 6));
}

#[test]
fn resv_regions_one_byte_and_adjacent_are_accepted_overlapping_are_not() {
    // A region with start == end is one byte: accepted.
    let c = ep()
        .resv_region(1, ResvRegion::reserved(0x3000, 0x3000))
        .build()
        .unwrap();
    assert_eq!(
        c.resv_regions(1).unwrap(),
        &[ResvRegion::reserved(0x3000, 0x3000)]
    );
    let inverted = ResvRegion::reserved(0x3001, 0x3000);
    assert_eq!(
        ep().resv_region(1, inverted).build(),
        Err(ConfigError::ResvInverted {
            endpoint: 1,
            region: inverted
        })
    );
    // Adjacent (end + 1 == next start): no overlap (D43).
    let c = ep()
        .resv_region(1, ResvRegion::reserved(0x2000, 0x2fff))
        .resv_region(1, ResvRegion::msi(0x1000, 0x1fff))
        .build()
        .unwrap();
    assert_eq!(
        c.resv_regions(1).unwrap(),
        &[
            ResvRegion::msi(0x1000, 0x1fff),
            ResvRegion::reserved(0x2000, 0x2fff)
        ],
        "sorted by start"
    );
    // One shared byte is an overlap.
    assert_eq!(
        ep().resv_region(1, ResvRegion::reserved(0x1000, 0x2000))
            .resv_region(1, ResvRegion::reserved(0x2000, 0x2fff))
            .build(),
        Err(ConfigError::ResvOverlap { endpoint: 1 })
    );
    // Regions of different endpoints may overlap.
    let c = DeviceConfig::builder()
        .endpoints([1, 2])
        .resv_region(1, ResvRegion::msi(0x1000, 0x1fff))
        .resv_region(2, ResvRegion::msi(0x1000, 0x1fff))
        .build()
        .unwrap();
    assert_eq!(c.resv_regions(2).unwrap(), c.resv_regions(1).unwrap());
}

#[test]
fn d42_one_msi_region_per_endpoint() {
    let c = ep()
        .resv_region(1, ResvRegion::msi(0x1000, 0x1fff))
        .resv_region(1, ResvRegion::reserved(0x3000, 0x3fff))
        .resv_region(1, ResvRegion::reserved(0x5000, 0x5fff))
        .build()
        .unwrap();
    assert_eq!(c.resv_regions(1).unwrap().len(), 3);
    assert_eq!(
        ep().resv_region(1, ResvRegion::msi(0x1000, 0x1fff))
            .resv_region(1, ResvRegion::msi(0x3000, 0x3fff))
            .build(),
        Err(ConfigError::MultipleMsi { endpoint: 1 })
    );
    // One MSI region on each of two endpoints is fine.
    assert!(DeviceConfig::builder()
        .endpoints([1, 2])
        .resv_region(1, ResvRegion::msi(0x1000, 0x1fff))
        .resv_region(2, ResvRegion::msi(0x3000, 0x3fff))
        .build()
        .is_ok());
}

#[test]
fn resv_regions_are_known_per_declared_endpoint() {
    let c = DeviceConfig::builder()
        .endpoints([1, 2])
        .resv_region(2, ResvRegion::reserved(0x9000, 0x9fff))
        .build()
        .unwrap();
    assert_eq!(c.resv_regions(1), Some(&[][..]), "declared, no region");
    assert_eq!(
        c.resv_regions(2),
        Some(&[ResvRegion::reserved(0x9000, 0x9fff)][..])
    );
    assert_eq!(c.resv_regions(3), None, "not managed");
    assert_eq!(
        DeviceConfig::builder()
            .endpoint(1)
            .resv_region(2, ResvRegion::msi(0, 0xfff))
            .build(),
        Err(ConfigError::UnknownEndpoint(2))
    );
}

#[test]
fn config_errors_have_a_message() {
    let errors = [
        ConfigError::PageSizeMaskZero,
        ConfigError::InputRangeInverted,
        ConfigError::DomainRangeInverted,
        ConfigError::UnsupportedFeatures(Features::RING_EVENT_IDX),
        ConfigError::BothBypassFeatures,
        ConfigError::BypassWithoutBypassConfig,
        ConfigError::ProbeSizeTooLarge(7),
        ConfigError::ProbeSizeTooSmall {
            endpoint: 1,
            needed: 24,
        },
        ConfigError::UnknownEndpoint(3),
        ConfigError::ResvInverted {
            endpoint: 1,
            region: ResvRegion::msi(2, 1),
        },
        ConfigError::ResvOverlap { endpoint: 1 },
        ConfigError::MultipleMsi { endpoint: 1 },
        ConfigError::ZeroCap("max_domains"),
        ConfigError::InvalidQueueSize(3),
    ];
    for e in errors {
        assert!(!e.to_string().is_empty(), "{e:?}");
    }
    assert!(ConfigError::ZeroCap("max_domains")
        .to_string()
        .contains("max_domains"));
    assert!(ConfigError::InvalidQueueSize(3).to_string().contains('3'));
}
