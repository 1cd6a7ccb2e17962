//! The fault event queue (§5.13.6.9, D46-D50; README "Faults"): one 24-byte report per buffer
//! (a buffer of 24 bytes is enough, 23 is not: skipped with used length 0, never split), reports
//! wait in a bounded queue while no buffer is available or the device is not running, and an
//! embedder can report its own faults.

mod common;

use common::{mem, Harness, D, F_WRITE, POISON};
use virtio_iommu_device::device::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use virtio_iommu_device::device::INT_VRING;
use virtio_iommu_device::{DeviceConfig, FaultRecord};
use virtio_iommu_driver::wire::{FAULT_F_ADDRESS, FAULT_F_WRITE, FAULT_R_UNKNOWN};
use vm_memory::{Bytes, GuestAddress};

fn config(max_pending: usize) -> DeviceConfig {
    DeviceConfig::builder()
        .endpoints([1, 2])
        .max_pending_faults(max_pending)
        .build()
        .unwrap()
}

fn fault(address: u64) -> FaultRecord {
    FaultRecord {
        reason: FAULT_R_UNKNOWN,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: 2,
        address,
    }
}

fn record(m: &common::Mem, a: u64) -> [u8; 24] {
    let mut r = [0u8; 24];
    m.read_slice(&mut r, GuestAddress(a)).unwrap();
    r
}

#[test]
fn an_embedder_fault_is_delivered_at_once_into_an_available_buffer() {
    let m = mem();
    let mut h = Harness::new(&m, config(4));
    let a = h.post_event_buffer(24);
    h.dev.report_fault(fault(0x1234_5678_9abc));
    assert_eq!(h.eq_used_idx(), 1);
    assert_eq!(h.eq_used(0).1, 24);
    assert_eq!(h.dev.pending_faults(), 0);
    assert_eq!(h.dev.interrupt_status() & INT_VRING, INT_VRING);
    let r = record(&m, a);
    assert_eq!(r[0], FAULT_R_UNKNOWN);
    assert_eq!(&r[4..8], &(FAULT_F_WRITE | FAULT_F_ADDRESS).to_le_bytes());
    assert_eq!(&r[8..12], &2u32.to_le_bytes());
    assert_eq!(&r[16..24], &0x1234_5678_9abcu64.to_le_bytes());
    assert_eq!(h.dev.counters().faults_delivered, 1);
    assert_eq!(
        h.dev.counters().faults_raised,
        0,
        "embedder faults are not translation faults"
    );
}

#[test]
fn a_24_byte_buffer_holds_a_report_a_23_byte_one_is_skipped_d50() {
    let m = mem();
    let mut h = Harness::new(&m, config(4));
    let short = h.post_event_buffer(23);
    let exact = h.post_event_buffer(24);
    h.dev.report_fault(fault(0x1000));
    assert_eq!(h.eq_used_idx(), 2);
    assert_eq!(h.eq_used(0).1, 0, "23 bytes: returned unused");
    assert_eq!(h.eq_used(1).1, 24);
    let mut s = [0u8; 23];
    m.read_slice(&mut s, GuestAddress(short)).unwrap();
    assert!(
        s.iter().all(|&b| b == POISON),
        "nothing written into the short buffer"
    );
    assert_eq!(&record(&m, exact)[16..24], &0x1000u64.to_le_bytes());
    // A 24-byte buffer made of two descriptors (12 + 12) also holds one, not split over two.
    let a = h.buffer(12, POISON);
    let b = h.buffer(12, POISON);
    h.post_event(&[
        D {
            addr: a,
            len: 12,
            flags: F_WRITE,
        },
        D {
            addr: b,
            len: 12,
            flags: F_WRITE,
        },
    ]);
    h.dev.report_fault(fault(0x2000));
    assert_eq!(h.eq_used(2).1, 24);
    let mut hi = [0u8; 12];
    m.read_slice(&mut hi, GuestAddress(b)).unwrap();
    assert_eq!(&hi[4..12], &0x2000u64.to_le_bytes());
    let c = h.dev.counters();
    assert_eq!(c.faults_delivered, 2);
    assert_eq!(c.event_buffers_skipped, 1);
}

#[test]
fn pending_reports_are_bounded_by_max_pending_faults() {
    let m = mem();
    let mut h = Harness::new(&m, config(2));
    h.dev.report_fault(fault(0x1000));
    h.dev.report_fault(fault(0x2000));
    assert_eq!(h.dev.pending_faults(), 2, "exactly the cap is kept");
    assert_eq!(h.dev.counters().faults_dropped, 0);
    h.dev.report_fault(fault(0x3000));
    assert_eq!(h.dev.pending_faults(), 2);
    assert_eq!(h.dev.counters().faults_dropped, 1, "the newest is dropped");
    // Buffers arrive: the two oldest, in order.
    let a = h.post_event_buffer(24);
    let b = h.post_event_buffer(24);
    let c = h.post_event_buffer(24);
    h.dev.notify(1);
    assert_eq!(h.eq_used_idx(), 2, "one buffer left over");
    assert_eq!(&record(&m, a)[16..24], &0x1000u64.to_le_bytes());
    assert_eq!(&record(&m, b)[16..24], &0x2000u64.to_le_bytes());
    assert!(record(&m, c).iter().all(|&x| x == POISON));
    assert_eq!(h.dev.pending_faults(), 0);
    // The left-over buffer takes the next report at once.
    h.dev.report_fault(fault(0x4000));
    assert_eq!(h.eq_used_idx(), 3);
    assert_eq!(&record(&m, c)[16..24], &0x4000u64.to_le_bytes());
}

#[test]
fn reports_wait_while_the_device_is_not_running_or_the_eventq_not_ready() {
    let m = mem();
    let mut h = Harness::idle(&m, config(4));
    let f = h.dev.device_features();
    h.dev.write_driver_features(0, f as u32);
    h.dev.write_driver_features(1, (f >> 32) as u32);
    h.dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    h.post_event_buffer(24);
    h.dev.report_fault(fault(0x1000));
    h.dev.notify(1);
    assert_eq!(h.eq_used_idx(), 0, "no DRIVER_OK yet");
    assert_eq!(h.dev.pending_faults(), 1);
    h.dev.deactivate_queue(1);
    h.dev
        .write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    h.dev.notify(1);
    assert_eq!(h.dev.pending_faults(), 1, "eventq not ready");
    assert_eq!(h.eq_used_idx(), 0);
    // The eventq set up again (same rings): delivered on its next notification.
    let setup = Harness::setup_of(&h.eq);
    h.dev.activate_queue(1, setup).unwrap();
    h.dev.notify(1);
    assert_eq!(h.dev.pending_faults(), 0);
    assert_eq!(h.eq_used_idx(), 1);
    assert_eq!(h.eq_used(0).1, 24);
}

#[test]
fn a_requestq_notification_does_not_deliver_events() {
    let m = mem();
    let mut h = Harness::new(&m, config(4));
    h.dev.report_fault(fault(0x1000));
    h.post_event_buffer(24);
    h.dev.notify(0);
    assert_eq!(h.eq_used_idx(), 0);
    assert_eq!(h.dev.pending_faults(), 1);
    h.dev.deliver_events();
    assert_eq!(h.eq_used_idx(), 1);
    assert_eq!(h.dev.pending_faults(), 0);
}

#[test]
fn an_event_available_index_beyond_the_queue_size_sets_needs_reset() {
    let m = mem();
    let mut h = Harness::new(&m, config(4));
    let avail = h.eq.avail_addr().0;
    m.write_obj(common::QSIZE + 1, GuestAddress(avail + 2))
        .unwrap();
    h.dev.report_fault(fault(0x1000));
    assert!(h.dev.needs_reset());
    assert_eq!(h.eq_used_idx(), 0);
}
