//! The driver checker (`DeviceConfigBuilder::driver_checker`): every statement it implements is
//! recorded, with its number, count and the first offending request's bytes, for a request
//! that breaks it, and not for a compliant one; with the checker on, the device answers
//! exactly as with it off.

mod common;

use common::*;
use virtio_iommu_device::checker::MAX_RECORDED_BYTES;
use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::device::status;
use virtio_iommu_device::{CheckerReport, DeviceConfig, DeviceConfigBuilder, Statement};
use virtio_iommu_driver::wire::{Features, MapFlags, Status, ATTACH_F_BYPASS};

const OK: u8 = Status::Ok as u8;
const MSI: (u64, u64) = (0x0802_0000, 0x0802_0fff);

fn builder() -> DeviceConfigBuilder {
    DeviceConfig::builder()
        .endpoints([8, 16])
        .resv_region(16, ResvRegion::msi(MSI.0, MSI.1))
        .input_range(0, (1 << 40) - 1)
        .domain_range(1, 100)
        .driver_checker(true)
}

fn config() -> DeviceConfig {
    builder().build().unwrap()
}

fn report(h: &Harness) -> CheckerReport {
    h.dev.checker_report()
}

/// The statements broken so far, in report order.
fn broken(h: &Harness) -> Vec<Statement> {
    report(h).violations.iter().map(|v| v.statement).collect()
}

/// Asserts that exactly `s` was broken, once, by a request whose readable part is `req`.
fn only(h: &Harness, s: Statement, req: &[u8]) {
    let r = report(h);
    assert_eq!(broken(h), vec![s], "{r}");
    let v = r.get(s).unwrap();
    assert_eq!(v.count, 1, "{r}");
    assert_eq!(v.first.bytes, req, "{r}");
    assert_eq!(v.first.len, req.len());
    assert!(!v.first.why.is_empty());
}

/// Probes `ep` and attaches it to `domain` (compliant: R5 wants the PROBE first).
fn probe_attach(h: &mut Harness, domain: u32, ep: u32) {
    let r = h.request(&bytes(&probe(ep)), 512 + 4);
    assert_eq!(r.status(), OK);
    assert_eq!(h.status(&bytes(&attach(domain, ep, 0))), OK);
}

#[test]
fn a_compliant_session_breaks_nothing_and_is_counted() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    h.post_event_buffer(24);
    h.dev.notify(1);
    probe_attach(&mut h, 1, 8);
    probe_attach(&mut h, 2, 16);
    assert_eq!(
        h.status(&bytes(&map(1, 0x10000, 0x1ffff, 0x40_0000, RW))),
        OK
    );
    assert_eq!(
        h.status(&bytes(&map(1, 0x20000, 0x20fff, 0x50_0000, RW))),
        OK
    );
    // One UNMAP covering two mappings and spilling over unmapped space (R21 allows it).
    assert_eq!(h.status(&bytes(&unmap(1, 0x0, 0x2ffff))), OK);
    assert_eq!(h.status(&bytes(&detach(1, 8))), OK);
    assert_eq!(h.status(&bytes(&detach(2, 16))), OK);
    h.dev.write_config(36, &[1]);
    h.dev.write_config(36, &[0]);
    let r = report(&h);
    assert!(r.enabled && r.is_clean(), "{r}");
    assert_eq!(r.to_string(), "checker: no violations");
    assert_eq!(
        (
            r.saw.attach,
            r.saw.detach,
            r.saw.map,
            r.saw.unmap,
            r.saw.probe
        ),
        (2, 2, 2, 1, 2)
    );
    assert_eq!(
        r.saw.to_string(),
        "device saw: ATTACH 2 DETACH 2 MAP 2 UNMAP 1 PROBE 2 faults 0"
    );
}

#[test]
fn reserved_fields_r6_r10_r13_r20_r25() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let mut a = attach(1, 8, 0);
    a.head.reserved = [0, 1, 0];
    // R5 is kept out of the way by probing first.
    assert_eq!(h.request(&bytes(&probe(8)), 516).status(), OK);
    assert_eq!(h.status(&bytes(&a)), OK, "the device ignores head.reserved");
    only(&h, Statement::R(6), &bytes(&a));

    let mut h = Harness::new(&mem, config());
    assert_eq!(h.request(&bytes(&probe(8)), 516).status(), OK);
    let mut a = attach(1, 8, 0);
    a.reserved = [0, 0, 0, 7];
    h.status(&bytes(&a));
    only(&h, Statement::R(10), &bytes(&a));

    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    let mut d = detach(1, 8);
    d.reserved[7] = 1;
    assert_eq!(h.status(&bytes(&d)), OK, "DETACH reserved is ignored (D18)");
    only(&h, Statement::R(13), &bytes(&d));

    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    h.status(&bytes(&map(1, 0, 0xfff, 0, RW)));
    let mut u = unmap(1, 0, 0xfff);
    u.reserved[0] = 1;
    h.status(&bytes(&u));
    only(&h, Statement::R(20), &bytes(&u));

    let mut h = Harness::new(&mem, config());
    let mut p = probe(8);
    p.reserved[63] = 1;
    assert_eq!(h.request(&bytes(&p), 516).status(), OK);
    only(&h, Statement::R(25), &bytes(&p));
}

#[test]
fn map_flags_r14_r19_and_inverted_ranges_r16() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    let mut m = map(1, 0, 0xfff, 0, RW);
    m.flags = 0x9.into();
    h.status(&bytes(&m));
    only(&h, Statement::R(14), &bytes(&m));

    let offered = config().offered();
    let mut h = Harness::with_features(&mem, config(), offered - Features::MMIO);
    probe_attach(&mut h, 1, 8);
    // Without F_MMIO negotiated a MAP without MAP_F_MMIO breaks nothing.
    assert_eq!(h.status(&bytes(&map(1, 0x10_0000, 0x10_0fff, 0, RW))), OK);
    assert!(report(&h).is_clean(), "{}", report(&h));
    let m = map(1, 0, 0xfff, 0, MapFlags::READ | MapFlags::MMIO);
    h.status(&bytes(&m));
    only(&h, Statement::R(19), &bytes(&m));
    // With F_MMIO negotiated the same MAP is fine.
    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    assert_eq!(h.status(&bytes(&m)), OK);
    assert!(report(&h).is_clean());

    // R16: virt_end must be strictly greater than virt_start (equal breaks it too).
    let mut h = Harness::with_features(&mem, builder().page_size_mask(1).build().unwrap(), offered);
    probe_attach(&mut h, 1, 8);
    let m = map(1, 0x5000, 0x5000, 0, RW);
    h.status(&bytes(&m));
    only(&h, Statement::R(16), &bytes(&m));
}

#[test]
fn ranges_r8_r9() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    let m = map(1, 1 << 40, (1 << 40) + 0xfff, 0, RW);
    h.status(&bytes(&m));
    only(&h, Statement::R(8), &bytes(&m));
    let u = unmap(1, 0, (1 << 40) + 0xfff);
    h.status(&bytes(&u));
    assert_eq!(report(&h).get(Statement::R(8)).unwrap().count, 2);

    let mut h = Harness::new(&mem, config());
    assert_eq!(h.request(&bytes(&probe(8)), 516).status(), OK);
    let a = attach(101, 8, 0);
    h.status(&bytes(&a));
    only(&h, Statement::R(9), &bytes(&a));
    h.status(&bytes(&attach(0, 8, 0)));
    h.status(&bytes(&attach(100, 8, 0)));
    assert_eq!(
        report(&h).get(Statement::R(9)).unwrap().count,
        2,
        "0 yes, 100 no"
    );

    // Without INPUT_RANGE / DOMAIN_RANGE negotiated the ranges do not bind the driver (R8, R9
    // apply "with ... negotiated"); R1 is then broken instead, once, at FEATURES_OK.
    let offered = config().offered();
    let mut h = Harness::with_features(
        &mem,
        config(),
        offered - Features::INPUT_RANGE - Features::DOMAIN_RANGE,
    );
    assert_eq!(h.request(&bytes(&probe(8)), 516).status(), OK);
    h.status(&bytes(&attach(101, 8, 0)));
    h.status(&bytes(&map(101, 1 << 40, (1 << 40) + 0xfff, 0, RW)));
    assert_eq!(broken(&h), vec![Statement::R(1)]);
}

#[test]
fn alignment_i3() {
    let mem = mem();
    for (m, field) in [
        (map(1, 0x10800, 0x11fff, 0, RW), "virt_start"),
        (map(1, 0x10000, 0x10fff, 0x800, RW), "phys_start"),
        (map(1, 0x10000, 0x10ffe, 0, RW), "virt_end + 1"),
    ] {
        let mut h = Harness::new(&mem, config());
        probe_attach(&mut h, 1, 8);
        assert_eq!(h.status(&bytes(&m)), Status::Range as u8);
        only(&h, Statement::Unaligned, &bytes(&m));
        let why = &report(&h).violations[0].first.why;
        assert!(why.contains(field), "{why}");
    }
    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    let u = unmap(1, 0x10000, 0x107ff);
    h.status(&bytes(&u));
    let r = report(&h);
    let v = r.get(Statement::Unaligned).unwrap();
    assert_eq!((v.count, &v.first.bytes), (1, &bytes(&u)), "{r}");
}

#[test]
fn bypass_domains_r12_r15_r23() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    assert_eq!(h.request(&bytes(&probe(8)), 516).status(), OK);
    assert_eq!(h.status(&bytes(&attach(2, 8, ATTACH_F_BYPASS))), OK);
    assert!(report(&h).is_clean(), "{}", report(&h));
    let m = map(2, 0, 0xfff, 0, RW);
    h.status(&bytes(&m));
    only(&h, Statement::R(15), &bytes(&m));
    let u = unmap(2, 0, 0xfff);
    h.status(&bytes(&u));
    assert_eq!(broken(&h), vec![Statement::R(15), Statement::R(23)]);
    assert_eq!(
        report(&h).get(Statement::R(23)).unwrap().first.bytes,
        bytes(&u)
    );

    // R12: a translated ATTACH to the existing bypass domain.
    assert_eq!(h.request(&bytes(&probe(16)), 516).status(), OK);
    let a = attach(2, 16, 0);
    h.status(&bytes(&a));
    assert_eq!(
        report(&h).get(Statement::R(12)).unwrap().first.bytes,
        bytes(&a)
    );

    // R12: ATTACH_F_BYPASS without BYPASS_CONFIG negotiated.
    let offered = config().offered();
    let mut h = Harness::with_features(&mem, config(), offered - Features::BYPASS_CONFIG);
    assert_eq!(h.request(&bytes(&probe(8)), 516).status(), OK);
    let a = attach(3, 8, ATTACH_F_BYPASS);
    h.status(&bytes(&a));
    only(&h, Statement::R(12), &bytes(&a));
}

#[test]
fn unmap_coverage_r21_r22() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    assert_eq!(h.status(&bytes(&map(1, 0x10000, 0x1ffff, 0, RW))), OK);
    for u in [
        unmap(1, 0x10000, 0x10fff),
        unmap(1, 0x11000, 0x2ffff),
        unmap(1, 0x11000, 0x11fff),
    ] {
        assert_eq!(h.status(&bytes(&u)), Status::Range as u8, "D31");
    }
    let r = report(&h);
    assert_eq!(broken(&h), vec![Statement::R(22)], "{r}");
    assert_eq!(r.get(Statement::R(22)).unwrap().count, 3);
    assert_eq!(
        r.get(Statement::R(22)).unwrap().first.bytes,
        bytes(&unmap(1, 0x10000, 0x10fff))
    );
    // Exactly the mapping, and then again: nothing left to cover (R21).
    assert_eq!(h.status(&bytes(&unmap(1, 0x10000, 0x1ffff))), OK);
    assert_eq!(broken(&h), vec![Statement::R(22)]);
    let u = unmap(1, 0x10000, 0x1ffff);
    assert_eq!(h.status(&bytes(&u)), OK, "D32: unmapping nothing is OK");
    assert_eq!(
        report(&h).get(Statement::R(21)).unwrap().first.bytes,
        bytes(&u)
    );
}

#[test]
fn map_over_reserved_regions_r30() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 16);
    let m = map(1, 0x0800_0000, 0x08ff_ffff, 0, RW);
    assert_ne!(h.status(&bytes(&m)), OK, "D44");
    only(&h, Statement::R(30), &bytes(&m));
    // Next to the region is fine.
    assert_eq!(
        h.status(&bytes(&map(1, 0x0802_1000, 0x0802_1fff, 0, RW))),
        OK
    );
    assert_eq!(report(&h).get(Statement::R(30)).unwrap().count, 1);
}

#[test]
fn probe_size_r24_and_probe_before_attach_r5() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let p = bytes(&probe(8));
    for w in [512 + 4 + 8, 256 + 4] {
        h.request(&p, w);
    }
    let r = report(&h);
    assert_eq!(broken(&h), vec![Statement::R(24)], "{r}");
    assert_eq!(r.get(Statement::R(24)).unwrap().count, 2);
    assert!(r.violations[0].first.why.contains("520"), "{r}");

    let mut h = Harness::new(&mem, config());
    let a = attach(1, 8, 0);
    h.status(&bytes(&a));
    only(&h, Statement::R(5), &bytes(&a));
    // Probed: fine; after a device reset it must be probed again.
    assert_eq!(h.request(&p, 516).status(), OK);
    h.status(&bytes(&a));
    assert_eq!(report(&h).get(Statement::R(5)).unwrap().count, 1);
    // An unknown endpoint has no PROBE to miss (its ATTACH fails with S_NOENT anyway).
    h.status(&bytes(&attach(1, 99, 0)));
    assert_eq!(report(&h).get(Statement::R(5)).unwrap().count, 1);
    // Without PROBE negotiated, R5 does not apply.
    let offered = config().offered();
    let mut h = Harness::with_features(&mem, config(), offered - Features::PROBE);
    h.status(&bytes(&attach(1, 8, 0)));
    assert_eq!(broken(&h), vec![Statement::R(1)]);
}

#[test]
fn features_not_negotiated_i2() {
    let mem = mem();
    let offered = config().offered();
    let mut h = Harness::with_features(&mem, config(), offered - Features::MAP_UNMAP);
    probe_attach(&mut h, 1, 8);
    let m = map(1, 0, 0xfff, 0, RW);
    assert_eq!(h.status(&bytes(&m)), Status::Unsupp as u8);
    only(&h, Statement::FeatureNotNegotiated, &bytes(&m));
    h.status(&bytes(&unmap(1, 0, 0xfff)));
    assert_eq!(
        report(&h)
            .get(Statement::FeatureNotNegotiated)
            .unwrap()
            .count,
        2
    );

    let mut h = Harness::with_features(&mem, config(), offered - Features::PROBE);
    let p = bytes(&probe(8));
    // Any properties size: probe_size does not apply without PROBE negotiated (no R24).
    h.request(&p, 524);
    assert_eq!(
        broken(&h),
        vec![Statement::R(1), Statement::FeatureNotNegotiated]
    );
    assert_eq!(
        report(&h)
            .get(Statement::FeatureNotNegotiated)
            .unwrap()
            .first
            .bytes,
        p
    );
}

#[test]
fn request_shapes_i1_and_malformed_chains_v2() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let mut bad = bytes(&attach(1, 8, 0));
    bad[0] = 9;
    h.request(&bad, 4);
    only(&h, Statement::RequestShape, &bad);
    // A short ATTACH, an ATTACH with 8 writable bytes, undefined ATTACH flags: I1 each.
    h.request(&bytes(&attach(1, 8, 0))[..12], 4);
    h.request(&bytes(&detach(1, 8)), 8);
    h.status(&bytes(&attach(1, 8, 2)));
    assert_eq!(report(&h).get(Statement::RequestShape).unwrap().count, 4);

    // A readable descriptor after a writable one.
    let mut h = Harness::new(&mem, config());
    let req = bytes(&detach(1, 8));
    let r = h.buffer(req.len(), 0);
    vm_memory::Bytes::write_slice(&mem, &req, vm_memory::GuestAddress(r)).unwrap();
    let w = h.buffer(4, POISON);
    let reply = h.submit(
        &[
            D {
                addr: w,
                len: 4,
                flags: F_WRITE,
            },
            D {
                addr: r,
                len: req.len() as u32,
                flags: 0,
            },
        ],
        &[(w, 4)],
    );
    assert_eq!(reply.used, 0);
    assert_eq!(broken(&h), vec![Statement::MalformedChain]);
}

#[test]
fn notification_before_driver_ok_v1_and_features_r1() {
    let mem = mem();
    let mut h = Harness::idle(&mem, config());
    h.dev.write_status(status::ACKNOWLEDGE | status::DRIVER);
    let f = config().offered() - Features::PROBE;
    h.dev.write_driver_features(0, f.bits() as u32);
    h.dev.write_driver_features(1, (f.bits() >> 32) as u32);
    h.dev
        .write_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    h.post_attach(8);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 0, "nothing processed before DRIVER_OK");
    let r = report(&h);
    assert_eq!(
        broken(&h),
        vec![Statement::R(1), Statement::NotifyBeforeDriverOk],
        "{r}"
    );
    assert_eq!(
        r.get(Statement::R(1)).unwrap().first.bytes,
        f.bits().to_le_bytes()
    );
    assert!(r.violations[0].first.why.contains("PROBE"), "{r}");
    // After DRIVER_OK, notifications are fine.
    h.dev.write_status(
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 1);
    assert_eq!(
        report(&h)
            .get(Statement::NotifyBeforeDriverOk)
            .unwrap()
            .count,
        1
    );
}

#[test]
fn config_writes_r2_r3() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    h.dev.write_config(0, &[0; 8]);
    only(&h, Statement::R(2), &[0; 8]);
    assert!(
        h.dev.needs_reset(),
        "the device still answers as without the checker"
    );

    let mut h = Harness::new(&mem, config());
    h.dev.write_config(36, &[2]);
    only(&h, Statement::R(3), &[2]);

    let offered = config().offered();
    let mut h = Harness::with_features(&mem, config(), offered - Features::BYPASS_CONFIG);
    h.dev.write_config(36, &[1]);
    only(&h, Statement::R(2), &[1]);

    let mut h = Harness::new(&mem, config());
    h.dev.write_config(36, &[1]);
    h.dev.write_config(36, &[0]);
    assert!(report(&h).is_clean());
}

#[test]
fn short_event_buffers_i4() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    h.post_event_buffer(24);
    h.post_event_buffer(16);
    h.dev.notify(1);
    // Seen once, even when looked at again (a later notification, a fault delivery).
    h.post_event_buffer(64);
    h.dev.notify(1);
    let r = report(&h);
    assert_eq!(broken(&h), vec![Statement::ShortEventBuffer], "{r}");
    assert_eq!(r.get(Statement::ShortEventBuffer).unwrap().count, 1);
    assert!(r.violations[0].first.why.contains("16"), "{r}");
    assert_eq!(h.eq_used_idx(), 0, "the checker consumes no buffer");
}

#[test]
fn event_buffers_posted_before_driver_ok_are_checked_at_driver_ok_i4() {
    let mem = mem();
    let mut h = Harness::idle(&mem, config());
    h.post_event_buffer(8);
    let f = config().offered();
    h.dev.write_status(status::ACKNOWLEDGE | status::DRIVER);
    h.dev.write_driver_features(0, f.bits() as u32);
    h.dev.write_driver_features(1, (f.bits() >> 32) as u32);
    h.dev
        .write_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert!(report(&h).is_clean(), "{}", report(&h));
    h.dev.write_status(
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(broken(&h), vec![Statement::ShortEventBuffer]);
    assert_eq!(h.eq_used_idx(), 0);
}

#[test]
fn report_format_counts_and_bounded_first_offender() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    probe_attach(&mut h, 1, 8);
    let mut first = map(1, 0, 0xfff, 0, RW);
    first.flags = 0x10.into();
    h.status(&bytes(&first));
    for i in 1..1000u64 {
        let mut m = map(1, i << 12, (i << 12) | 0xfff, 0, RW);
        m.flags = 0x10.into();
        h.status(&bytes(&m));
    }
    let r = report(&h);
    let v = r.get(Statement::R(14)).unwrap();
    assert_eq!(v.count, 1000);
    assert_eq!(v.first.bytes, bytes(&first));
    assert_eq!(
        r.to_string(),
        "checker: R14 1000 03000000 01000000 00000000 00000000 ff0f0000 00000000 \
         00000000 00000000 10000000 (MAP flags 0x10 has undefined bits)"
    );
    // Statement order: R before V before I, numbers numerically.
    let mut h = Harness::new(&mem, config());
    h.status(&bytes(&attach(101, 8, 0)));
    h.dev.write_config(0, &[1]);
    assert_eq!(
        broken(&h),
        vec![Statement::R(2), Statement::R(5), Statement::R(9)]
    );
    let text = report(&h).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("checker: R2 1 01 ("), "{text}");
    assert!(
        lines[2].starts_with("checker: R9 1 01000000 65000000 08000000"),
        "{text}"
    );
}

#[test]
fn a_first_offender_longer_than_recorded_is_cut_and_marked() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    // An ATTACH with 100 readable bytes (I1): 80 of them kept, the line says so with `...`.
    let mut long = bytes(&attach(1, 8, 0));
    long.resize(100, 0xab);
    h.request(&long, 4);
    let r = report(&h);
    let v = r
        .get(Statement::RequestShape)
        .expect("an over-long ATTACH breaks I1");
    assert_eq!(v.first.len, 100);
    assert_eq!(v.first.bytes, long[..MAX_RECORDED_BYTES]);
    assert_eq!(
        v.first.why,
        "ATTACH device-readable part is 100 bytes, not 20"
    );
    let text = r.to_string();
    assert!(text.contains(" abababab ... ("), "{text}");
    // Within the bound: no mark.
    let mut h = Harness::new(&mem, config());
    let mut bad = bytes(&attach(1, 8, 0));
    bad[0] = 9;
    h.request(&bad, 4);
    let text = report(&h).to_string();
    assert!(!text.contains("..."), "{text}");
}

#[test]
fn checker_off_reports_off_and_still_counts() {
    let mem = mem();
    let mut h = Harness::new(&mem, builder().driver_checker(false).build().unwrap());
    h.status(&bytes(&attach(101, 8, 0)));
    h.status(&bytes(&attach(1, 8, 0)));
    let r = report(&h);
    assert!(!r.enabled && r.is_clean());
    assert_eq!(r.to_string(), "checker: off");
    assert_eq!(r.saw.attach, 2);
}

mod our_driver {
    //! The project's guest driver (`virtio_iommu_driver`) against the in-process device with
    //! the checker on: a compliant session breaks nothing.
    use super::*;
    use virtio_iommu_device::inprocess::TestBed;
    use virtio_iommu_driver::BatchOp;

    fn bed() -> TestBed {
        TestBed::new(
            DeviceConfig::builder()
                .endpoints([8, 16, 24])
                .resv_region(16, ResvRegion::msi(MSI.0, MSI.1))
                .driver_checker(true)
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn attach_map_dma_unmap_probe_detach_bypass_events_break_nothing() {
        let bed = bed();
        let mut drv = bed.driver().unwrap();
        let ep = bed.dma_endpoint(8).unwrap();
        let buf = bed.alloc(0x4000).unwrap();
        for e in [8, 16, 24] {
            drv.probe_reserved_regions(e).unwrap();
        }
        drv.attach(1, 8).unwrap();
        drv.map(1, 0x1_0000, 0x1_1fff, buf, RW).unwrap();
        ep.write(0x1_0000, b"through the IOMMU").unwrap();
        // A fault (unmapped IOVA), delivered on the eventq and read back by the driver.
        assert!(ep.read(0x9_0000, &mut [0u8; 4]).is_err());
        assert!(drv.poll_event().unwrap().is_some());
        drv.unmap(1, 0x1_0000, 0x1_1fff).unwrap();
        // A batch of MAPs and UNMAPs in one notification.
        let mut b = drv.batch();
        for i in 0..4u64 {
            b.push(BatchOp::Map {
                domain: 1,
                virt_start: 0x10_0000 + (i << 12),
                virt_end: 0x10_0fff + (i << 12),
                phys_start: buf + (i << 12),
                flags: RW,
            })
            .unwrap();
        }
        b.push(BatchOp::Unmap {
            domain: 1,
            virt_start: 0x10_0000,
            virt_end: 0x10_3fff,
        })
        .unwrap();
        assert_eq!(b.submit().unwrap().failures(), 0);
        // Endpoint 16 shares domain 1; the mapping avoids its MSI region.
        drv.attach(1, 16).unwrap();
        drv.map(1, 0x2_0000, 0x2_0fff, buf, MapFlags::READ).unwrap();
        drv.detach(1, 16).unwrap();
        drv.detach(1, 8).unwrap();
        // Bypass: the config field, and a bypass domain.
        drv.set_bypass(true).unwrap();
        drv.set_bypass(false).unwrap();
        drv.attach_bypass(5, 24).unwrap();
        drv.detach(5, 24).unwrap();
        let dev = bed.device();
        let r = dev.checker_report();
        assert!(r.enabled && r.is_clean(), "{r}");
        assert_eq!(r.to_string(), "checker: no violations");
        let s = r.saw;
        assert_eq!(
            (s.attach, s.detach, s.map, s.unmap, s.probe, s.faults),
            (3, 3, 6, 2, 3, 1),
            "{s}"
        );
    }

    #[test]
    fn attach_without_probe_is_r5_and_a_new_driver_must_probe_again() {
        let bed = bed();
        let mut drv = bed.driver().unwrap();
        drv.probe_reserved_regions(8).unwrap();
        drv.attach(1, 8).unwrap();
        assert!(bed.device().checker_report().is_clean());
        drop(drv);
        // A new driver resets the device: endpoint 8 must be probed again.
        let mut drv = bed.driver().unwrap();
        drv.attach(1, 8).unwrap();
        let r = bed.device().checker_report();
        assert_eq!(
            r.violations.iter().map(|v| v.statement).collect::<Vec<_>>(),
            vec![Statement::R(5)],
            "{r}"
        );
        assert_eq!(r.violations[0].first.bytes, bytes(&attach(1, 8, 0)));
    }
}

mod same_answers {
    //! Arbitrary traffic: the checker never panics, and the device answers it identically with
    //! the checker on and off.
    use super::*;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Debug)]
    enum Op {
        /// A request: readable bytes (possibly cut), writable length.
        Request(Vec<u8>, usize),
        /// A config write at (offset, data).
        Config(u8, Vec<u8>),
        /// An eventq buffer of this many bytes, then an eventq notification.
        Event(u32),
        /// A DMA access by an endpoint (a fault when not mapped).
        Dma(u32, u64),
    }

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..16).prop_map(|p| p << 12),
            (0u64..16).prop_map(|p| (p << 12) | 0xfff),
            (0u64..32).prop_map(|p| p << 11),
            Just(MSI.0),
            Just(u64::MAX),
            Just(1u64 << 40),
        ]
    }

    fn request() -> impl Strategy<Value = Vec<u8>> {
        let domain = prop_oneof![0u32..4, Just(101u32)];
        let ep = prop_oneof![Just(8u32), Just(16u32), Just(99u32)];
        let reserved = prop_oneof![4 => Just(0u8), 1 => any::<u8>()];
        prop_oneof![
            (domain.clone(), ep.clone(), 0u32..4, reserved.clone()).prop_map(|(d, e, f, r)| {
                let mut a = attach(d, e, f);
                a.reserved[3] = r;
                bytes(&a)
            }),
            (domain.clone(), ep.clone(), reserved.clone()).prop_map(|(d, e, r)| {
                let mut x = detach(d, e);
                x.reserved[0] = r;
                bytes(&x)
            }),
            (domain.clone(), addr(), addr(), addr(), 0u32..16).prop_map(|(d, s, e, p, f)| {
                let mut m = map(d, s, e, p, RW);
                m.flags = f.into();
                bytes(&m)
            }),
            (domain, addr(), addr(), reserved.clone()).prop_map(|(d, s, e, r)| {
                let mut u = unmap(d, s, e);
                u.reserved[1] = r;
                bytes(&u)
            }),
            (ep, reserved).prop_map(|(e, r)| {
                let mut p = probe(e);
                p.reserved[5] = r;
                bytes(&p)
            }),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (request(), prop_oneof![Just(4usize), Just(516), 0usize..12, Just(520)], 0usize..4, any::<u8>())
                .prop_map(|(mut r, w, cut, head_res)| {
                    if cut == 0 && r.len() > 4 {
                        r.truncate(r.len() / 2);
                    }
                    if cut == 1 && r.len() > 1 {
                        r[1] = head_res;
                    }
                    Op::Request(r, w)
                }),
            1 => (prop_oneof![Just(36u8), 0u8..44], proptest::collection::vec(prop_oneof![0u8..3, any::<u8>()], 0..3))
                .prop_map(|(o, d)| Op::Config(o, d)),
            1 => prop_oneof![Just(24u32), 0u32..32].prop_map(Op::Event),
            1 => (prop_oneof![Just(8u32), Just(16u32)], addr()).prop_map(|(e, a)| Op::Dma(e, a)),
        ]
    }

    /// What the driver can observe of one step: the requestq and eventq used rings and the
    /// bytes of the writable buffers.
    fn step(h: &mut Harness, op: &Op) -> Vec<u8> {
        let mut seen = Vec::new();
        match op {
            Op::Request(r, w) => {
                let mut descs = Vec::new();
                if !r.is_empty() {
                    let a = h.buffer(r.len(), 0);
                    h.mem.write_slice(r, GuestAddress(a)).unwrap();
                    descs.push(D {
                        addr: a,
                        len: r.len() as u32,
                        flags: 0,
                    });
                }
                let wa = h.buffer((*w).max(1), POISON);
                if *w > 0 {
                    descs.push(D {
                        addr: wa,
                        len: *w as u32,
                        flags: F_WRITE,
                    });
                }
                if descs.is_empty() {
                    return seen;
                }
                let before = h.rq_used_idx();
                h.post_request(&descs);
                h.dev.notify(0);
                let after = h.rq_used_idx();
                seen.extend_from_slice(&after.to_le_bytes());
                if after != before {
                    let (id, len) = h.rq_used(before);
                    seen.extend_from_slice(&id.to_le_bytes());
                    seen.extend_from_slice(&len.to_le_bytes());
                }
                let mut b = vec![0; *w];
                h.mem.read_slice(&mut b, GuestAddress(wa)).unwrap();
                seen.extend_from_slice(&b);
            }
            Op::Config(o, d) => {
                h.dev.write_config(u64::from(*o), d);
                let mut b = [0u8; 40];
                h.dev.read_config(0, &mut b);
                seen.extend_from_slice(&b);
            }
            Op::Event(len) => {
                if *len > 0 {
                    h.post_event_buffer(*len);
                }
                h.dev.notify(1);
            }
            Op::Dma(e, a) => {
                let r = h
                    .dev
                    .translate(*e, *a, 4, virtio_iommu_device::Access::READ);
                seen.extend_from_slice(format!("{r:?}").as_bytes());
            }
        }
        let eq = h.eq_used_idx();
        seen.extend_from_slice(&eq.to_le_bytes());
        if eq > 0 {
            let (id, len) = h.eq_used(eq - 1);
            seen.extend_from_slice(&id.to_le_bytes());
            seen.extend_from_slice(&len.to_le_bytes());
        }
        seen.push(h.dev.status());
        seen
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn checker_on_and_off_answer_alike(ops in proptest::collection::vec(op(), 1..48)) {
            let (m_on, m_off) = (mem(), mem());
            let mut on = Harness::new(&m_on, config());
            let mut off = Harness::new(&m_off, builder().driver_checker(false).build().unwrap());
            for (i, op) in ops.iter().enumerate() {
                let a = step(&mut on, op);
                let b = step(&mut off, op);
                prop_assert_eq!(a, b, "step {} {:?}", i, op);
                let report = on.dev.checker_report();
                let _ = report.to_string();
                prop_assert!(report.violations.len() <= 36 + 6);
                prop_assert!(report.violations.iter().all(|v| v.first.bytes.len() <= 80 && v.count > 0));
            }
            let doms = |h: &Harness| h.dev.state().domains().map(|(id, d)| (id, d.clone())).collect::<Vec<_>>();
            prop_assert_eq!(doms(&on), doms(&off));
            prop_assert_eq!(on.dev.counters(), off.dev.counters());
            prop_assert_eq!(on.dev.pending_faults(), off.dev.pending_faults());
            prop_assert_eq!(on.dev.state().bypass(), off.dev.state().bypass());
            prop_assert_eq!(on.dev.checker_report().saw, off.dev.checker_report().saw);
            prop_assert!(!off.dev.checker_report().enabled);
        }
    }
}

#[test]
fn every_checked_statement_has_a_summary_and_the_list_is_in_report_order() {
    for s in Statement::CHECKED {
        assert!(!s.summary().is_empty(), "{s}");
    }
    assert!(Statement::CHECKED.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(Statement::R(4).summary(), "", "R4 is not observable");
    assert_eq!(Statement::CHECKED.len(), 27);
}

#[test]
fn the_driver_is_held_to_the_features_it_negotiated_not_to_a_faulty_device_s() {
    // The device (fault injection) acts as if F_MMIO had not been negotiated: it refuses the
    // MAP, but the driver did negotiate F_MMIO, so R19 is not the driver's.
    let plan = virtio_iommu_device::FaultPlan::new().always(
        virtio_iommu_device::Misbehaviour::FeaturesChangeAfterFeaturesOk {
            offered: (config().offered() - Features::MMIO).bits(),
        },
    );
    let mem = mem();
    let mut h = Harness::new(&mem, builder().fault_injection(plan).build().unwrap());
    probe_attach(&mut h, 1, 8);
    let m = map(1, 0, 0xfff, 0, MapFlags::READ | MapFlags::MMIO);
    assert_eq!(h.status(&bytes(&m)), Status::Inval as u8);
    assert!(report(&h).is_clean(), "{}", report(&h));
}
