//! `Counters` (device.rs): each counter counts exactly the events its documentation names, one
//! per event, and none is ever reset (not even by a device reset).

mod common;

use common::{attach, bytes, map, mem, probe, Harness, D, F_WRITE, POISON, RW};
use virtio_iommu_device::{Access, Counters, DeviceConfig};
use virtio_iommu_driver::wire::{Features, Status};
use vm_memory::{Bytes, GuestAddress};

fn config() -> DeviceConfig {
    DeviceConfig::builder()
        .endpoints([1, 2])
        .max_pending_faults(2)
        .build()
        .unwrap()
}

#[test]
fn request_counters_count_each_outcome_once() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    assert_eq!(h.dev.counters(), Counters::default());
    // Two successes, one failure.
    assert_eq!(h.status(&bytes(&attach(1, 1, 0))), Status::Ok as u8);
    assert_eq!(
        h.status(&bytes(&map(1, 0, 0xfff, 0x1000, RW))),
        Status::Ok as u8
    );
    assert_eq!(h.status(&bytes(&attach(1, 9, 0))), Status::NoEnt as u8);
    let c = h.dev.counters();
    assert_eq!(c.requests_completed, 3);
    assert_eq!(c.requests_failed, 1);
    assert_eq!(c.requests_unknown_type, 0);
    assert_eq!(c.requests_malformed, 0);
    // Unknown type (D7): returned unwritten, counted as such.
    let mut unknown = bytes(&attach(1, 1, 0));
    unknown[0] = 0x42;
    assert_eq!(h.request(&unknown, 4).used, 0);
    // Malformed: 2-byte readable part (no head).
    assert_eq!(h.request(&[1, 0], 4).used, 0);
    // Malformed: writable part shorter than the tail.
    assert_eq!(h.request(&bytes(&attach(1, 1, 0)), 3).used, 0);
    let c = h.dev.counters();
    assert_eq!(c.requests_completed, 3);
    assert_eq!(c.requests_failed, 1);
    assert_eq!(c.requests_unknown_type, 1);
    assert_eq!(c.requests_malformed, 2);
    // Every request produced one used buffer and one interrupt.
    assert_eq!(c.interrupts, 6);
    assert_eq!(c.requests_deferred, 0);
    assert_eq!(c.needs_reset, 0);
}

#[test]
fn probe_not_offered_counts_as_unknown_type_d35() {
    let m = mem();
    let config = DeviceConfig::builder()
        .endpoint(1)
        .feature(Features::PROBE, false)
        .build()
        .unwrap();
    let mut h = Harness::new(&m, config);
    let r = h.request(&bytes(&probe(1)), 512 + 4);
    assert_eq!(r.used, 0);
    assert!(r.written.iter().all(|&b| b == POISON), "nothing written");
    let c = h.dev.counters();
    assert_eq!(c.requests_unknown_type, 1);
    assert_eq!(c.requests_completed, 0);
}

#[test]
fn translation_counters_count_faults_and_unreported_refusals() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    // Unattached, bypass 0: a fault, kept pending (no event buffer).
    assert!(h.dev.translate(1, 0x1000, 8, Access::READ).is_err());
    assert_eq!(h.dev.counters().faults_raised, 1);
    assert_eq!(h.dev.pending_faults(), 1);
    // Unknown endpoint: refused, not reported (D48).
    assert!(h.dev.translate(7, 0x1000, 8, Access::READ).is_err());
    // Wrapping past 2^64: refused, not reported.
    assert!(h.dev.translate(1, u64::MAX, 2, Access::READ).is_err());
    let c = h.dev.counters();
    assert_eq!(c.faults_raised, 1);
    assert_eq!(c.accesses_refused_unreported, 2);
    assert_eq!(h.dev.pending_faults(), 1);
    // A successful translation counts nothing.
    h.dev.write_config(36, &[1]);
    let pieces = h.dev.translate(1, 0x1000, 8, Access::READ).unwrap();
    assert_eq!(pieces.len(), 1);
    assert_eq!(
        (pieces[0].iova, pieces[0].phys, pieces[0].len),
        (0x1000, 0x1000, 8)
    );
    assert_eq!(h.dev.counters(), c);
    // Two more faults: the pending queue (2) is full, the second one is dropped.
    h.dev.write_config(36, &[0]);
    assert!(h.dev.translate(2, 0x2000, 1, Access::WRITE).is_err());
    assert!(h.dev.translate(2, 0x3000, 1, Access::WRITE).is_err());
    let c = h.dev.counters();
    assert_eq!(c.faults_raised, 3);
    assert_eq!(c.faults_dropped, 1);
    assert_eq!(h.dev.pending_faults(), 2);
    assert_eq!(c.faults_delivered, 0);
}

#[test]
fn event_counters_count_delivered_reports_and_skipped_buffers() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    let small = h.buffer(23, POISON);
    h.post_event(&[D {
        addr: small,
        len: 23,
        flags: F_WRITE,
    }]);
    h.post_event_buffer(24);
    h.post_event_buffer(24);
    assert!(h.dev.translate(1, 0x1000, 1, Access::READ).is_err());
    let c = h.dev.counters();
    assert_eq!(c.event_buffers_skipped, 1, "23 bytes cannot hold a report");
    assert_eq!(c.faults_delivered, 1);
    assert_eq!(c.interrupts, 1, "one notification for the batch");
    assert!(h.dev.translate(1, 0x2000, 1, Access::READ).is_err());
    let c = h.dev.counters();
    assert_eq!(c.faults_delivered, 2);
    assert_eq!(c.event_buffers_skipped, 1);
    assert_eq!(c.interrupts, 2);
    assert_eq!(h.eq_used_idx(), 3);
    assert_eq!(
        [h.eq_used(0).1, h.eq_used(1).1, h.eq_used(2).1],
        [0, 24, 24]
    );
}

#[test]
fn counters_survive_device_reset() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    assert_eq!(h.status(&bytes(&attach(1, 1, 0))), Status::Ok as u8);
    assert!(h.dev.translate(2, 0, 1, Access::READ).is_err());
    h.dev.set_needs_reset();
    let before = h.dev.counters();
    assert_eq!(before.requests_completed, 1);
    assert_eq!(before.faults_raised, 1);
    assert_eq!(before.needs_reset, 1);
    h.dev.write_status(0);
    assert_eq!(h.dev.counters(), before);
    h.dev.system_reset();
    assert_eq!(h.dev.counters(), before);
}

#[test]
fn per_notification_cap_defers_only_when_chains_are_left() {
    let m = mem();
    let config = DeviceConfig::builder()
        .endpoint(1)
        .max_requests_per_notify(3)
        .build()
        .unwrap();
    let mut h = Harness::new(&m, config);
    // Exactly the cap: all processed, nothing deferred.
    for _ in 0..3 {
        h.post_attach(1);
    }
    assert_eq!(h.dev.process_requestq(), 3);
    assert_eq!(h.rq_used_idx(), 3);
    assert_eq!(h.dev.counters().requests_deferred, 0);
    // Fewer than the cap.
    h.post_attach(1);
    assert_eq!(h.dev.process_requestq(), 1);
    assert_eq!(h.dev.counters().requests_deferred, 0);
    // One more than the cap, announced by a notification: one round of 3, one chain owed
    // (counted once), then `service` runs the owed round.
    for _ in 0..4 {
        h.post_attach(1);
    }
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 7);
    assert_eq!(h.dev.counters().requests_deferred, 1);
    assert!(h.dev.requestq_pending());
    assert_eq!(h.dev.service(), 1);
    assert_eq!(h.rq_used_idx(), 8);
    assert_eq!(h.dev.counters().requests_deferred, 1);
    assert!(!h.dev.requestq_pending());
    assert_eq!(h.dev.service(), 0);
    assert_eq!(h.dev.process_requestq(), 0);
    assert_eq!(h.dev.counters().requests_completed, 8);
}

#[test]
fn owed_rounds_end_with_a_requestq_reset_only() {
    // Chains owed to a requestq notification stay owed when the *eventq* is reset, and are
    // dropped (never processed) when the requestq itself is reset.
    let m = mem();
    let config = DeviceConfig::builder()
        .endpoint(1)
        .max_requests_per_notify(1)
        .build()
        .unwrap();
    let mut h = Harness::new(&m, config);
    for _ in 0..3 {
        h.post_attach(1);
    }
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 1);
    assert!(h.dev.requestq_pending());
    h.dev.deactivate_queue(1);
    assert!(
        h.dev.requestq_pending(),
        "an eventq reset leaves requestq rounds owed"
    );
    assert_eq!(h.dev.service(), 1);
    assert_eq!(h.rq_used_idx(), 2);
    h.dev.deactivate_queue(0);
    assert!(!h.dev.requestq_pending());
    assert_eq!(h.dev.service(), 0);
}

#[test]
fn available_index_may_claim_a_full_queue_but_not_more() {
    // virtio §2.7.6: at most queue-size chains can be outstanding. Every available entry points
    // at the same ATTACH chain (head 0); the answers go to the same buffer.
    let m = mem();
    let config = DeviceConfig::builder()
        .endpoint(1)
        .max_requests_per_notify(1024)
        .build()
        .unwrap();
    let mut h = Harness::new(&m, config);
    let w = h.post_attach(1);
    let avail = h.rq.avail_addr().0;
    let qsize = common::QSIZE;
    for i in 0..qsize {
        m.write_obj(0u16, GuestAddress(avail + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    m.write_obj(qsize, GuestAddress(avail + 2)).unwrap();
    assert_eq!(h.dev.process_requestq(), usize::from(qsize));
    assert!(!h.dev.needs_reset());
    assert_eq!(h.rq_used_idx(), qsize);
    assert_eq!(m.read_obj::<u8>(GuestAddress(w)).unwrap(), Status::Ok as u8);
    // Now one more than a full queue beyond what was consumed.
    m.write_obj(
        qsize.wrapping_mul(2).wrapping_add(1),
        GuestAddress(avail + 2),
    )
    .unwrap();
    assert_eq!(h.dev.process_requestq(), 0);
    assert!(h.dev.needs_reset());
    assert_eq!(h.rq_used_idx(), qsize, "nothing processed");
}
