//! Each fault-injection misbehaviour (`src/fault.rs`) observed at the ring and register level,
//! with hand-built descriptors: the plan does exactly what it documents, and nothing when
//! its `When` does not cover the opportunity. (`tests/hostile.rs` runs the driver against
//! them.)

mod common;

use common::*;
use virtio_iommu_device::device::{status, INT_CONFIG};
use virtio_iommu_device::mmio::reg;
use virtio_iommu_device::{DeviceConfig, FaultPlan, IommuDevice, Misbehaviour, MmioDevice, When};
use virtio_iommu_driver::wire::{Features, RequestType};
use vm_memory::{Bytes, GuestAddress};

fn config(plan: FaultPlan) -> DeviceConfig {
    DeviceConfig::builder()
        .endpoints([8, 16])
        .fault_injection(plan)
        .build()
        .unwrap()
}

/// Posts an ATTACH (domain, endpoint 8) with a poisoned 4-byte tail; returns (head, tail).
fn post_attach(h: &mut Harness<'_>, domain: u32) -> (u16, u64) {
    let req = bytes(&attach(domain, 8, 0));
    let rd = h.buffer(req.len(), 0);
    h.mem.write_slice(&req, GuestAddress(rd)).unwrap();
    let wr = h.buffer(4, POISON);
    let head = h.post_request(&[
        D {
            addr: rd,
            len: req.len() as u32,
            flags: 0,
        },
        D {
            addr: wr,
            len: 4,
            flags: F_WRITE,
        },
    ]);
    (head, wr)
}

fn tail(h: &Harness<'_>, wr: u64) -> [u8; 4] {
    h.mem.read_obj(GuestAddress(wr)).unwrap()
}

#[test]
fn reorder_returns_a_round_in_reverse_order() {
    let mem = common::mem();
    let mut h = Harness::new(&mem, config(FaultPlan::new().always(Misbehaviour::Reorder)));
    let heads: Vec<u16> = (1..=3).map(|d| post_attach(&mut h, d).0).collect();
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 3);
    let ids: Vec<u32> = (0..3).map(|i| h.rq_used(i).0).collect();
    assert_eq!(
        ids,
        heads
            .iter()
            .rev()
            .map(|&x| u32::from(x))
            .collect::<Vec<_>>()
    );
    // Executed in order: the endpoint ends in the last domain.
    assert_eq!(h.dev.state().endpoint_domain(8), Some(3));
    assert_eq!(h.dev.counters().faults_injected, 3);
}

#[test]
fn used_id_out_of_range_and_used_twice() {
    let mem = common::mem();
    let plan = FaultPlan::new()
        .with(Misbehaviour::UsedIdOutOfRange, When::nth(1))
        .with(Misbehaviour::UsedTwice, When::nth(2));
    let mut h = Harness::new(&mem, config(plan));
    let (a, _) = post_attach(&mut h, 1);
    let (b, _) = post_attach(&mut h, 2);
    let (c, _) = post_attach(&mut h, 3);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 4);
    assert_eq!(h.rq_used(0), (u32::from(a) + u32::from(QSIZE), 4));
    assert_eq!(h.rq_used(1), (u32::from(b), 4));
    assert_eq!(h.rq_used(2), (u32::from(b), 4));
    assert_eq!(h.rq_used(3), (u32::from(c), 4));
    // The device's own ring position follows what it wrote: the next completion goes after.
    post_attach(&mut h, 4);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 5);
}

#[test]
fn never_complete_needs_reset_and_reset_self_return_nothing() {
    let mem = common::mem();
    let plan = FaultPlan::new().with(Misbehaviour::NeverComplete, When::nth(1));
    let mut h = Harness::new(&mem, config(plan));
    let (_, wr) = post_attach(&mut h, 1);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 0);
    assert_eq!(tail(&h, wr), [POISON; 4], "nothing written");
    assert_eq!(h.dev.state().domain_count(), 0, "nothing executed");
    // Only the first: the next chain is answered.
    assert_eq!(h.status(&bytes(&attach(1, 8, 0))), 0);

    let mem = common::mem();
    let plan = FaultPlan::new().always(Misbehaviour::NeedsReset);
    let mut h = Harness::new(&mem, config(plan));
    post_attach(&mut h, 1);
    post_attach(&mut h, 2);
    h.dev.ack_interrupt(u32::MAX);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 0);
    assert!(h.dev.needs_reset());
    assert_ne!(h.dev.interrupt_status() & INT_CONFIG, 0);
    assert_eq!(h.dev.state().domain_count(), 0);
    assert!(!h.dev.requestq_pending(), "a broken device owes nothing");

    let mem = common::mem();
    let plan = FaultPlan::new().with(Misbehaviour::ResetSelf, When::nth(2));
    let mut h = Harness::new(&mem, config(plan));
    post_attach(&mut h, 1);
    post_attach(&mut h, 2);
    h.dev.notify(0);
    assert_eq!(
        h.rq_used_idx(),
        1,
        "the first was answered before the reset"
    );
    assert_eq!(h.dev.status(), 0);
    assert_eq!(h.dev.state().domain_count(), 0);
}

#[test]
fn tail_not_written_status_and_used_len() {
    let mem = common::mem();
    let plan = FaultPlan::new()
        .with(Misbehaviour::TailNotWritten, When::nth(1))
        .with(Misbehaviour::Status(0xee), When::nth(2))
        .with(Misbehaviour::UsedLen(77), When::nth(3));
    let mut h = Harness::new(&mem, config(plan));
    let (_, w1) = post_attach(&mut h, 1);
    let (_, w2) = post_attach(&mut h, 2);
    let (_, w3) = post_attach(&mut h, 3);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 3);
    assert_eq!(h.rq_used(0).1, 4, "normal used length");
    assert_eq!(tail(&h, w1), [POISON; 4], "tail never written");
    assert_eq!(tail(&h, w2), [0xee, 0, 0, 0]);
    assert_eq!(h.rq_used(2).1, 77);
    assert_eq!(tail(&h, w3), [0, 0, 0, 0], "executed: S_OK written");
    // The first was not executed, the second and third were.
    assert_eq!(h.dev.state().endpoint_domain(8), Some(3));
    assert!(h.dev.state().domain(1).is_none());
}

#[test]
fn request_filter_leaves_other_types_alone() {
    let mem = common::mem();
    let plan = FaultPlan::new().with(Misbehaviour::Status(9), When::ALWAYS.on(RequestType::Map));
    let mut h = Harness::new(&mem, config(plan));
    assert_eq!(h.status(&bytes(&attach(1, 8, 0))), 0);
    assert_eq!(h.status(&bytes(&map(1, 0, 0xfff, 0x1000, RW))), 9);
    assert_eq!(h.status(&bytes(&unmap(1, 0, 0xfff))), 0);
    assert_eq!(h.dev.counters().faults_injected, 1);
}

fn probe_reply(misbehaviour: Misbehaviour) -> Vec<u8> {
    let mem = common::mem();
    let mut h = Harness::new(&mem, config(FaultPlan::new().always(misbehaviour)));
    let r = h.request(&bytes(&probe(8)), 512 + 4);
    assert_eq!(r.used, 516);
    assert_eq!(&r.written[512..], &[0, 0, 0, 0], "S_OK tail");
    r.written[..512].to_vec()
}

fn resv(raw_type: u16, subtype: u8, start: u64, end: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&raw_type.to_le_bytes());
    p.extend_from_slice(&20u16.to_le_bytes());
    p.extend_from_slice(&[subtype, 0, 0, 0]);
    p.extend_from_slice(&start.to_le_bytes());
    p.extend_from_slice(&end.to_le_bytes());
    p
}

#[test]
fn probe_misbehaviours_write_the_documented_properties() {
    let got = probe_reply(Misbehaviour::ProbeOverlap);
    let mut want = resv(1, 0, 0x1000, 0x2fff);
    want.extend(resv(1, 0, 0x2000, 0x3fff));
    want.resize(512, 0);
    assert_eq!(got, want);

    let got = probe_reply(Misbehaviour::ProbeOverrun);
    assert_eq!(&got[..4], &[1, 0, 0, 2], "type 1, length 512");

    let got = probe_reply(Misbehaviour::ProbeReservedBits);
    let mut want = resv(0x1001, 0, 0x5000, 0x5fff);
    want.resize(512, 0);
    assert_eq!(got, want, "endpoint 8 has no region of its own");

    let got = probe_reply(Misbehaviour::ProbeProperties(vec![7; 600]));
    assert_eq!(got, vec![7; 512], "cut to probe_size");

    // PROBE misbehaviours leave other requests alone.
    let mem = common::mem();
    let mut h = Harness::new(
        &mem,
        config(FaultPlan::new().always(Misbehaviour::ProbeOverrun)),
    );
    assert_eq!(h.status(&bytes(&attach(1, 8, 0))), 0);
    assert_eq!(h.dev.counters().faults_injected, 0);
}

fn post_event_buffer(h: &mut Harness<'_>) -> u64 {
    let a = h.buffer(64, POISON);
    h.post_event(&[D {
        addr: a,
        len: 64,
        flags: F_WRITE,
    }]);
    a
}

#[test]
fn event_used_len_and_flood() {
    let mem = common::mem();
    let plan = FaultPlan::new().with(Misbehaviour::EventUsedLen(3), When::nth(1));
    let mut h = Harness::new(&mem, config(plan));
    post_event_buffer(&mut h);
    post_event_buffer(&mut h);
    h.dev.notify(1);
    for _ in 0..2 {
        // Endpoint 8 unattached, bypass 0: a fault.
        assert!(h
            .dev
            .translate(8, 0x1000, 4, virtio_iommu_device::Access::READ)
            .is_err());
    }
    assert_eq!(h.eq_used_idx(), 2);
    assert_eq!(h.eq_used(0).1, 3, "the lie");
    assert_eq!(h.eq_used(1).1, 24);
    assert_eq!(h.dev.pending_faults(), 0);
    // The lied-about report counts as delivered (the driver was told of it), and as injected.
    let c = h.dev.counters();
    assert_eq!((c.faults_delivered, c.faults_injected), (2, 1));

    let mem = common::mem();
    let plan = FaultPlan::new().with(
        Misbehaviour::EventFlood { used_len: 9 },
        When::ALWAYS.times(1),
    );
    let mut h = Harness::new(&mem, config(plan));
    let bufs: Vec<u64> = (0..5).map(|_| post_event_buffer(&mut h)).collect();
    h.dev.notify(1);
    assert_eq!(
        h.eq_used_idx(),
        5,
        "every available buffer filled in one pass"
    );
    for i in 0..5 {
        assert_eq!(h.eq_used(i).1, 9);
    }
    let first: [u8; 4] = mem.read_obj(GuestAddress(bufs[0])).unwrap();
    assert_eq!(first[0], 0, "reason UNKNOWN");
    // `times(1)`: the next pass is a normal one (no fault pending: nothing used).
    post_event_buffer(&mut h);
    h.dev.notify(1);
    assert_eq!(h.eq_used_idx(), 5);
}

#[test]
fn features_ok_refused_and_features_changed_after_features_ok() {
    let mem = common::mem();
    let mut dev = IommuDevice::new(
        config(FaultPlan::new().with(Misbehaviour::FeaturesOkRefused, When::nth(1))),
        mem.clone(),
    )
    .unwrap();
    let f = dev.device_features();
    let negotiate = |dev: &mut IommuDevice<Mem>| {
        dev.write_status(0);
        dev.write_status(status::ACKNOWLEDGE | status::DRIVER);
        dev.write_driver_features(0, f as u32);
        dev.write_driver_features(1, (f >> 32) as u32);
        dev.write_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        dev.status() & status::FEATURES_OK != 0
    };
    assert!(!negotiate(&mut dev), "refused once");
    assert_eq!(dev.counters().faults_injected, 1, "the refusal is counted");
    assert!(negotiate(&mut dev), "then accepted");
    assert_eq!(
        dev.counters().faults_injected,
        1,
        "an accepted FEATURES_OK is not a fault"
    );

    let offered = (Features::VERSION_1 | Features::PROBE).bits();
    let cfg =
        config(FaultPlan::new().always(Misbehaviour::FeaturesChangeAfterFeaturesOk { offered }));
    let shared = IommuDevice::new_shared(cfg, mem.clone()).unwrap();
    let mut regs = MmioDevice::new(shared.clone());
    let r32 = |regs: &mut MmioDevice<Mem>, off: u64| {
        let mut b = [0u8; 4];
        regs.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let w32 = |regs: &mut MmioDevice<Mem>, off: u64, v: u32| regs.write(off, &v.to_le_bytes());
    w32(&mut regs, reg::DEVICE_FEATURES_SEL, 0);
    let before = r32(&mut regs, reg::DEVICE_FEATURES);
    assert_eq!(
        u64::from(before),
        f & 0xffff_ffff,
        "the real offer before FEATURES_OK"
    );
    w32(
        &mut regs,
        reg::STATUS,
        u32::from(status::ACKNOWLEDGE | status::DRIVER),
    );
    w32(&mut regs, reg::DRIVER_FEATURES_SEL, 0);
    w32(&mut regs, reg::DRIVER_FEATURES, f as u32);
    w32(&mut regs, reg::DRIVER_FEATURES_SEL, 1);
    w32(&mut regs, reg::DRIVER_FEATURES, (f >> 32) as u32);
    w32(
        &mut regs,
        reg::STATUS,
        u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
    );
    w32(&mut regs, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        u64::from(r32(&mut regs, reg::DEVICE_FEATURES)),
        offered & 0xffff_ffff
    );
    w32(&mut regs, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        u64::from(r32(&mut regs, reg::DEVICE_FEATURES)),
        offered >> 32
    );
    let negotiated = virtio_iommu_device::device::lock(&shared).negotiated_features();
    assert_eq!(negotiated, Features::VERSION_1 | Features::PROBE);
}

#[test]
fn register_misbehaviours() {
    let mem = common::mem();
    let plan = FaultPlan::new()
        .with(
            Misbehaviour::ConfigGenerationUnstable,
            When::ALWAYS.times(3),
        )
        .always(Misbehaviour::QueueNumMax(5))
        .always(Misbehaviour::ConfigBytes {
            offset: 36,
            bytes: vec![2],
        });
    let shared = IommuDevice::new_shared(config(plan), mem).unwrap();
    let mut regs = MmioDevice::new(shared);
    let mut r32 = |off: u64| {
        let mut b = [0u8; 4];
        regs.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let g: Vec<u32> = (0..5).map(|_| r32(reg::CONFIG_GENERATION)).collect();
    assert_eq!(g, vec![1, 2, 3, 3, 3], "changes 3 times, then settles");
    assert_eq!(r32(reg::QUEUE_NUM_MAX), 5);
    // `bypass` (byte 36) reads 2; the bytes before it are untouched.
    assert_eq!(r32(reg::CONFIG + 36), 2);
    assert_eq!(r32(reg::CONFIG + 32), 512, "probe_size");

    // A reset that takes two reads to complete.
    let plan = FaultPlan::new().with(Misbehaviour::StatusAfterReset(3), When::ALWAYS.times(2));
    let shared = IommuDevice::new_shared(config(plan), common::mem()).unwrap();
    let mut regs = MmioDevice::new(shared);
    let mut r32 = |off: u64| {
        let mut b = [0u8; 4];
        regs.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let s: Vec<u32> = (0..3).map(|_| r32(reg::STATUS)).collect();
    assert_eq!(s, vec![3, 3, 0]);
}

#[test]
fn used_len_also_overrides_a_reply_the_device_did_not_write() {
    // An unknown request type is returned with used length 0 (D7); `UsedLen` reports its own
    // value for it too, so a driver sees a used length with nothing written behind it.
    let mem = common::mem();
    let plan = FaultPlan::new().with(Misbehaviour::UsedLen(4), When::nth(2));
    let mut h = Harness::new(&mem, config(plan));
    let unknown = [0x7f, 0, 0, 0];
    assert_eq!(
        h.request(&unknown, 4).used,
        0,
        "no fault on the first request"
    );
    assert_eq!(h.request(&unknown, 4).used, 4, "UsedLen(4) on the second");
    assert_eq!(h.dev.counters().faults_injected, 1);
}
