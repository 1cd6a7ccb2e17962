//! `VirtIOIommu::batch`: per-request results in order, ring-sized rounds with one notification
//! each, out-of-order completion, and every way a device can misbehave (on the fake device of
//! `common`).

mod common;

use common::{Behaviour, FakeDevice};
use virtio_iommu_driver::dma::IommuMapper;
use virtio_iommu_driver::wire::{MapFlags, Status};
use virtio_iommu_driver::{BatchOp, IommuError, BATCH_CAPACITY, REQUESTQ_MIN_SIZE, REQUESTQ_SIZE};

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
const G: u64 = 0x1000;

fn inval() -> IommuError {
    IommuError::Status(Status::Inval)
}

/// A device and a driver with endpoint 16 attached to domain 1.
fn setup() -> (
    FakeDevice,
    virtio_iommu_driver::VirtIOIommu<common::FakeHal, common::FakeTransport>,
) {
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    drv.attach(1, 16).unwrap();
    (dev, drv)
}

#[test]
fn results_come_back_in_order_with_one_notification() {
    let (dev, mut drv) = setup();
    assert_eq!(drv.requestq_size(), REQUESTQ_SIZE);
    let notes = dev.state().notifications;
    let mut b = drv.batch();
    assert_eq!(b.map(1, 0x1000, 0x1fff, 0x8000_0000, RW), Ok(0));
    assert_eq!(b.map(1, 0x1000, 0x1fff, 0x8000_0000, RW), Ok(1)); // overlaps: S_INVAL
    assert_eq!(b.map(1, 0x2000, 0x3fff, 0x8000_0000, MapFlags::READ), Ok(2));
    assert_eq!(b.unmap(1, 0x1000, 0x1fff), Ok(3));
    assert_eq!(b.map(7, 0x1000, 0x1fff, 0, RW), Ok(4)); // no such domain: S_NOENT
    assert_eq!(b.unmap(1, 0x2000, 0x2fff), Ok(5)); // splits a mapping: S_RANGE
    assert_eq!(b.len(), 6);
    assert_eq!(b.remaining(), BATCH_CAPACITY - 6);
    let r = b.submit().unwrap();
    let got: Vec<_> = r.iter().collect();
    assert_eq!(
        got,
        [
            Ok(()),
            Err(inval()),
            Ok(()),
            Ok(()),
            Err(IommuError::Status(Status::NoEnt)),
            Err(IommuError::Status(Status::Range)),
        ]
    );
    assert_eq!(r.len(), 6);
    assert_eq!(r.get(1), Some(Err(inval())));
    assert_eq!(r.get(6), None);
    assert_eq!(r.failures(), 3);
    assert_eq!(r.first_error(), Some((1, inval())));
    assert_eq!(r.notifications(), 1);
    assert_eq!(dev.state().notifications, notes + 1);
    let m = dev.state().mappings.clone();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].start, m[0].end), (0x2000, 0x3fff));
    let stats = drv.request_stats();
    assert_eq!((stats.requests, stats.notifications), (7, 2), "ATTACH + 6");
}

#[test]
fn batches_larger_than_the_ring_go_in_rounds() {
    let (dev, mut drv) = setup();
    let n = 300;
    let mut b = drv.batch();
    for k in 0..n {
        b.map(1, G * (k + 1), G * (k + 2) - 1, 0x4000_0000, RW)
            .unwrap();
    }
    let r = b.submit().unwrap();
    assert_eq!(r.failures(), 0);
    let rounds = (n as usize).div_ceil(REQUESTQ_SIZE / 2);
    assert_eq!(r.notifications() as usize, rounds);
    assert_eq!(dev.state().mappings.len(), n as usize);
    // The same with a device that takes fewer than REQUESTQ_SIZE descriptors.
    let small = FakeDevice::new();
    small.state().max_queue_size = REQUESTQ_SIZE as u32 / 2;
    let mut drv = small.driver();
    assert_eq!(drv.requestq_size(), REQUESTQ_MIN_SIZE);
    drv.attach(1, 8).unwrap();
    let mut b = drv.batch();
    for k in 0..n {
        b.map(1, G * (k + 1), G * (k + 2) - 1, 0x4000_0000, RW)
            .unwrap();
    }
    let r = b.submit().unwrap();
    assert_eq!(r.failures(), 0);
    assert_eq!(
        r.notifications() as usize,
        (n as usize).div_ceil(REQUESTQ_MIN_SIZE / 2)
    );
}

#[test]
fn a_queue_below_64_descriptors_is_refused() {
    let dev = FakeDevice::new();
    dev.state().max_queue_size = 32;
    let r = virtio_iommu_driver::VirtIOIommu::<common::FakeHal, _>::new(
        dev.transport(),
        Default::default(),
    );
    assert!(matches!(r, Err(IommuError::InvalidConfig(_))));
}

#[test]
fn out_of_order_completions_are_matched_by_token() {
    let (dev, mut drv) = setup();
    dev.state().behaviour = Behaviour::Reverse;
    let mut b = drv.batch();
    // Even indexes succeed, odd ones overlap the previous one.
    for k in 0..200u64 {
        let at = G * (k / 2 * 4 + 1);
        b.map(1, at, at + G - 1, 0x4000_0000, RW).unwrap();
    }
    let r = b.submit().unwrap();
    for (i, res) in r.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(res, Ok(()), "request {i}");
        } else {
            assert_eq!(res, Err(inval()), "request {i}");
        }
    }
    // The driver still works for synchronous requests.
    drv.unmap(1, G, G * 2 - 1).unwrap();
}

#[test]
fn unknown_tokens_are_a_protocol_error_not_a_panic() {
    for behaviour in [Behaviour::WrongId, Behaviour::Duplicate] {
        let (dev, mut drv) = setup();
        dev.state().behaviour = behaviour;
        let mut b = drv.batch();
        for k in 0..4u64 {
            b.map(1, G * (k + 1), G * (k + 2) - 1, 0, RW).unwrap();
        }
        // WrongId: the first used element names no posted request. Duplicate: the second one
        // names a request already completed.
        assert_eq!(
            b.submit().err(),
            Some(IommuError::DeviceProtocol),
            "{behaviour:?}"
        );
        assert!(drv.is_broken());
        assert_eq!(drv.map(1, G, G * 2 - 1, 0, RW), Err(IommuError::Broken));
        assert_eq!(drv.batch().submit().err(), Some(IommuError::Broken));
    }
}

#[test]
fn used_lengths_are_checked_per_request() {
    let (dev, mut drv) = setup();
    dev.state().behaviour = Behaviour::UsedLen(0);
    let mut b = drv.batch();
    b.map(1, G, 2 * G - 1, 0, RW).unwrap();
    b.unmap(1, G, 2 * G - 1).unwrap();
    let r = b.submit().unwrap();
    assert!(r.iter().all(|x| x == Err(IommuError::NoResponse)));
    for used in [2, 8] {
        dev.state().behaviour = Behaviour::UsedLen(used);
        let mut b = drv.batch();
        b.unmap(1, G, 2 * G - 1).unwrap();
        let r = b.submit().unwrap();
        assert_eq!(
            r.get(0),
            Some(Err(IommuError::BadUsedLength { used, expected: 4 }))
        );
    }
    assert!(!drv.is_broken(), "per-request errors are not fatal");
}

#[test]
fn a_device_that_never_answers_times_out() {
    let (dev, mut drv) = setup();
    dev.state().behaviour = Behaviour::Hold;
    let mut b = drv.batch();
    b.map(1, G, 2 * G - 1, 0, RW).unwrap();
    assert_eq!(b.submit().err(), Some(IommuError::Timeout));
    assert!(drv.is_broken());
    let (dev, mut drv) = setup();
    dev.state().behaviour = Behaviour::NeedsReset;
    let mut b = drv.batch();
    b.map(1, G, 2 * G - 1, 0, RW).unwrap();
    assert_eq!(b.submit().err(), Some(IommuError::DeviceNeedsReset));
}

#[test]
fn adders_validate_like_the_synchronous_requests() {
    let (dev, mut drv) = setup();
    let notes = dev.state().notifications;
    let mut b = drv.batch();
    assert_eq!(
        b.map(0, G, 2 * G - 1, 0, RW),
        Err(IommuError::DomainOutOfRange(0))
    );
    assert!(matches!(
        b.map(1, G + 1, 2 * G - 1, 0, RW),
        Err(IommuError::Unaligned { .. })
    ));
    assert_eq!(b.map(1, G, G, 0, RW), Err(IommuError::InvalidRange));
    assert_eq!(
        b.map(1, G, 2 * G - 1, 0, MapFlags::MMIO),
        Err(IommuError::InvalidFlags(MapFlags::MMIO.bits()))
    );
    assert!(matches!(
        b.unmap(1, 1 << 48, (1 << 49) - 1),
        Err(IommuError::IovaOutOfRange { .. })
    ));
    assert!(b.is_empty());
    for k in 0..BATCH_CAPACITY as u64 {
        b.push(BatchOp::Unmap {
            domain: 1,
            virt_start: G * (k + 1),
            virt_end: G * (k + 2) - 1,
        })
        .unwrap();
    }
    assert_eq!(b.unmap(1, G, 2 * G - 1), Err(IommuError::BufferSize));
    // `b` is discarded (goes out of use) without `submit`: nothing is sent.
    let empty = drv.batch().submit().unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.notifications(), 0);
    assert_eq!(dev.state().notifications, notes);
}

#[test]
fn submit_batch_of_the_mapper_trait_keeps_op_order() {
    let (dev, mut drv) = setup();
    let mut ops = Vec::new();
    for k in 0..(BATCH_CAPACITY as u64 + 10) {
        ops.push(BatchOp::Map {
            domain: 1,
            virt_start: G * (k + 1),
            virt_end: G * (k + 2) - 1,
            phys_start: 0x4000_0000,
            flags: RW,
        });
    }
    // An invalid one (refused before sending) and a device error in the middle.
    ops[3] = BatchOp::Map {
        domain: 1,
        virt_start: G + 5,
        virt_end: 2 * G - 1,
        phys_start: 0,
        flags: RW,
    };
    ops[7] = ops[6];
    let mut results = vec![Ok(()); ops.len()];
    IommuMapper::submit_batch(&mut drv, &ops, &mut results).unwrap();
    for (i, r) in results.iter().enumerate() {
        match i {
            3 => assert!(matches!(r, Err(IommuError::Unaligned { .. }))),
            7 => assert_eq!(*r, Err(inval())),
            _ => assert_eq!(*r, Ok(()), "op {i}"),
        }
    }
    assert_eq!(dev.state().mappings.len(), ops.len() - 2);
    assert_eq!(
        IommuMapper::submit_batch(&mut drv, &ops, &mut results[1..]),
        Err(IommuError::BufferSize)
    );
}
