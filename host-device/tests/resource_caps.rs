//! The resource caps on what a guest can make the device allocate (README "Threat model",
//! "Configuration knobs"): at most `max_domains` live domains (a new one beyond ⇒ S_NOMEM,
//! counting a domain that the same ATTACH empties), at most `max_mappings` mappings over all
//! domains (MAP beyond ⇒ S_NOMEM), and a rejected request changes nothing.

mod common;

use std::sync::Arc;

use common::{attach, detach, map, unmap, RW};
use virtio_iommu_device::{DeviceConfig, IommuState};
use virtio_iommu_driver::wire::Status;

fn state(b: virtio_iommu_device::DeviceConfigBuilder) -> IommuState {
    let mut s = IommuState::new(Arc::new(b.build().unwrap()));
    s.set_negotiated(s.config().offered());
    s
}

const PAGE: u64 = 0x1000;

fn page(n: u64) -> (u64, u64) {
    (n * PAGE, n * PAGE + PAGE - 1)
}

#[test]
fn max_domains_live_domains_and_no_more() {
    let mut s = state(
        DeviceConfig::builder()
            .endpoints([1, 2, 3, 4])
            .max_domains(2),
    );
    assert_eq!(s.attach(&attach(10, 1, 0)), Status::Ok);
    assert_eq!(s.attach(&attach(20, 2, 0)), Status::Ok);
    assert_eq!(s.domain_count(), 2);
    // A third domain: refused, no side effect.
    assert_eq!(s.attach(&attach(30, 3, 0)), Status::NoMem);
    assert_eq!(s.domain_count(), 2);
    assert_eq!(s.endpoint_domain(3), None);
    assert!(s.domain(30).is_none());
    // Joining an existing domain needs no new one.
    assert_eq!(s.attach(&attach(10, 3, 0)), Status::Ok);
    assert_eq!(
        s.domain(10).unwrap().endpoints().collect::<Vec<_>>(),
        [1, 3]
    );
    // Moving the only endpoint of domain 20 to a new domain: 20 goes away, so it fits (D15).
    assert_eq!(s.attach(&attach(40, 2, 0)), Status::Ok);
    assert!(s.domain(20).is_none());
    assert_eq!(s.endpoint_domain(2), Some(40));
    assert_eq!(s.domain_count(), 2);
    // Moving endpoint 1 out of domain 10 (which keeps endpoint 3) to a new domain: too many.
    assert_eq!(s.attach(&attach(50, 1, 0)), Status::NoMem);
    assert_eq!(
        s.endpoint_domain(1),
        Some(10),
        "a rejected ATTACH leaves it where it was"
    );
    assert_eq!(s.domain_count(), 2);
    // Freed by DETACH: a new domain fits again.
    assert_eq!(s.detach(&detach(40, 2)), Status::Ok);
    assert_eq!(s.domain_count(), 1);
    assert_eq!(s.attach(&attach(60, 4, 0)), Status::Ok);
    assert_eq!(s.domain_count(), 2);
}

#[test]
fn max_domains_of_one() {
    let mut s = state(DeviceConfig::builder().endpoints([1, 2]).max_domains(1));
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    assert_eq!(s.attach(&attach(2, 2, 0)), Status::NoMem);
    // The single endpoint may move from domain to domain.
    assert_eq!(s.attach(&attach(2, 1, 0)), Status::Ok);
    assert_eq!(s.endpoint_domain(1), Some(2));
    assert_eq!(s.domain_count(), 1);
}

#[test]
fn max_mappings_over_all_domains_and_no_more() {
    let mut s = state(DeviceConfig::builder().endpoints([1, 2]).max_mappings(3));
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    assert_eq!(s.attach(&attach(2, 2, 0)), Status::Ok);
    for (d, n) in [(1, 0), (1, 1), (2, 0)] {
        let (a, b) = page(n);
        assert_eq!(
            s.map(&map(d, a, b, a, RW)),
            Status::Ok,
            "domain {d} page {n}"
        );
    }
    assert_eq!(s.mapping_count(), 3);
    let (a, b) = page(5);
    assert_eq!(s.map(&map(1, a, b, a, RW)), Status::NoMem);
    assert_eq!(
        s.map(&map(2, a, b, a, RW)),
        Status::NoMem,
        "the cap is over all domains"
    );
    assert_eq!(s.mapping_count(), 3);
    assert!(s.domain(1).unwrap().mapping_at(a).is_none());
    // UNMAP frees one slot.
    let (u, v) = page(1);
    assert_eq!(s.unmap(&unmap(1, u, v)), Status::Ok);
    assert_eq!(s.mapping_count(), 2);
    assert_eq!(s.map(&map(2, a, b, a, RW)), Status::Ok);
    assert_eq!(s.mapping_count(), 3);
    // A domain destroyed with its mappings (last endpoint detached) frees its slots.
    assert_eq!(s.detach(&detach(2, 2)), Status::Ok);
    assert_eq!(s.mapping_count(), 1);
    assert_eq!(s.attach(&attach(3, 2, 0)), Status::Ok);
    for n in [7, 8] {
        let (a, b) = page(n);
        assert_eq!(s.map(&map(3, a, b, a, RW)), Status::Ok);
    }
    assert_eq!(s.mapping_count(), 3);
    // Moving the last endpoint of a domain elsewhere destroys it with its mappings (D15).
    assert_eq!(s.attach(&attach(1, 2, 0)), Status::Ok);
    assert!(s.domain(3).is_none());
    assert_eq!(s.mapping_count(), 1);
    assert_eq!(s.domain(1).unwrap().mapping_count(), 1);
}

#[test]
fn mapping_count_follows_map_unmap_and_reset() {
    let mut s = state(DeviceConfig::builder().endpoint(1));
    assert_eq!(s.mapping_count(), 0);
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    for n in 0..10 {
        let (a, b) = page(n);
        assert_eq!(s.map(&map(1, a, b, a, RW)), Status::Ok);
        assert_eq!(s.mapping_count(), n as usize + 1);
        assert_eq!(s.domain(1).unwrap().mapping_count(), n as usize + 1);
    }
    // A rejected MAP (overlap, D23) counts nothing.
    assert_eq!(s.map(&map(1, 0, PAGE - 1, 0, RW)), Status::Inval);
    assert_eq!(s.mapping_count(), 10);
    // UNMAP of pages 2..=4 removes three.
    assert_eq!(s.unmap(&unmap(1, 2 * PAGE, 5 * PAGE - 1)), Status::Ok);
    assert_eq!(s.mapping_count(), 7);
    // UNMAP of an empty range removes none.
    assert_eq!(s.unmap(&unmap(1, 2 * PAGE, 5 * PAGE - 1)), Status::Ok);
    assert_eq!(s.mapping_count(), 7);
    s.reset();
    assert_eq!(s.mapping_count(), 0);
    assert_eq!(s.domain_count(), 0);
}
