//! Request framing limits (request.rs module docs, README "Request processing"): the shortest
//! head and tail that are answered, and the writable slack: a writable part up to
//! `MAX_WRITABLE_SLACK` (4096) bytes longer than the request's (4, or `probe_size + 4`) is
//! answered with the tail in its last 4 bytes; one byte more is returned unwritten.

mod common;

use common::{attach, bytes, mem, probe, Harness, POISON};
use virtio_iommu_device::request::MAX_WRITABLE_SLACK;
use virtio_iommu_device::DeviceConfig;
use virtio_iommu_driver::wire::Status;

fn config() -> DeviceConfig {
    DeviceConfig::builder()
        .endpoint(1)
        .probe_size(64)
        .build()
        .unwrap()
}

#[test]
fn writable_slack_of_4096_bytes_is_answered_one_more_is_not() {
    assert_eq!(MAX_WRITABLE_SLACK, 4096);
    let m = mem();
    let mut h = Harness::new(&m, config());
    let req = bytes(&attach(1, 1, 0));
    let r = h.request(&req, 4 + 4096);
    assert_eq!(r.used, 4 + 4096);
    assert_eq!(r.status(), Status::Ok as u8);
    assert!(
        r.written[..4096].iter().all(|&b| b == 0),
        "zeroes before the tail"
    );
    assert_eq!(&r.written[4097..], &[0, 0, 0]);
    let r = h.request(&req, 4 + 4096 + 1);
    assert_eq!(r.used, 0);
    assert!(r.written.iter().all(|&b| b == POISON));
    // PROBE: the request's writable size is probe_size + 4.
    let p = bytes(&probe(1));
    let r = h.request(&p, 64 + 4 + 4096);
    assert_eq!(r.used, 64 + 4 + 4096);
    assert_eq!(r.status(), Status::Ok as u8);
    let r = h.request(&p, 64 + 4 + 4097);
    assert_eq!(r.used, 0);
    assert!(r.written.iter().all(|&b| b == POISON));
    // Exactly the request's size.
    let r = h.request(&p, 68);
    assert_eq!(r.used, 68);
    assert_eq!(r.status(), Status::Ok as u8);
    assert_eq!(h.dev.counters().requests_malformed, 2);
}

#[test]
fn a_4_byte_head_and_a_4_byte_tail_are_enough_to_answer() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    let req = bytes(&attach(1, 1, 0));
    // Head only: the body is missing, S_INVAL (not a framing error).
    let r = h.request(&req[..4], 4);
    assert_eq!((r.used, r.status()), (4, Status::Inval as u8));
    // 3 bytes: no head, returned unwritten.
    let r = h.request(&req[..3], 4);
    assert_eq!(r.used, 0);
    // Tail of exactly 4 bytes: answered; 3: returned unwritten.
    let r = h.request(&req, 4);
    assert_eq!((r.used, r.status()), (4, Status::Ok as u8));
    let r = h.request(&req, 3);
    assert_eq!(r.used, 0);
    assert!(r.written.iter().all(|&b| b == POISON));
}

#[test]
fn the_tail_goes_in_the_last_four_bytes_of_a_split_writable_part() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    let req = bytes(&attach(1, 7, 0)); // unknown endpoint: S_NOENT
                                       // 10 writable bytes in descriptors of 3, 5 and 2 bytes: the tail spans the last two.
    let r = h.request_split(&req, &[], 10, &[3, 8]);
    assert_eq!(r.used, 10);
    assert_eq!(r.written, [0, 0, 0, 0, 0, 0, Status::NoEnt as u8, 0, 0, 0]);
}
