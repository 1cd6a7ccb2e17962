//! `EndpointIommu` (vm-memory's `Iommu` for one endpoint) and `DmaEndpoint` as documented:
//! their endpoint ID and device, the permissions handed to vm-memory per piece, the failure kept
//! for `take_last_failure` (taken once), faults reported on the event queue, and `DmaEndpoint`
//! errors by kind (translate.rs, endpoint.rs).

use std::sync::Arc;

use virtio_iommu_device::inprocess::TestBed;
use virtio_iommu_device::translate::access_of;
use virtio_iommu_device::{
    Access, DeviceConfig, DmaError, EndpointIommu, FaultRecord, TranslateError, TranslationFailure,
};
use virtio_iommu_driver::wire::{
    MapFlags, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING,
};
use vm_memory::{GuestAddress, Iommu, Permissions};

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);

fn bed() -> TestBed {
    TestBed::new(
        DeviceConfig::builder()
            .endpoints([3, 5])
            .input_range(0, u64::MAX)
            .build()
            .unwrap(),
    )
}

#[test]
fn access_modes_convert_one_to_one() {
    assert_eq!(access_of(Permissions::No), Access::NONE);
    assert_eq!(access_of(Permissions::Read), Access::READ);
    assert_eq!(access_of(Permissions::Write), Access::WRITE);
    assert_eq!(access_of(Permissions::ReadWrite), Access::READ_WRITE);
}

#[test]
fn an_endpoint_iommu_knows_its_endpoint_and_device() {
    let bed = bed();
    let iommu = EndpointIommu::new(bed.shared_device().clone(), 5);
    assert_eq!(iommu.endpoint(), 5);
    assert!(Arc::ptr_eq(iommu.device(), bed.shared_device()));
    assert!(format!("{iommu:?}").contains('5'));
    assert_eq!(iommu.take_last_failure(), None, "nothing failed yet");
    let ep = bed.dma_endpoint(3).unwrap();
    assert_eq!(ep.endpoint(), 3);
    assert_eq!(ep.memory().iommu().endpoint(), 3);
    assert!(Arc::ptr_eq(
        ep.memory().iommu().device(),
        bed.shared_device()
    ));
}

#[test]
fn pieces_carry_the_permissions_the_mapping_allows() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x3000).unwrap();
    drv.attach(1, 3).unwrap();
    drv.map(1, 0x1_0000, 0x1_0fff, pa, MapFlags::READ).unwrap();
    drv.map(1, 0x1_1000, 0x1_1fff, pa + 0x1000, MapFlags::WRITE)
        .unwrap();
    drv.map(1, 0x1_2000, 0x1_2fff, pa + 0x2000, RW).unwrap();
    let iommu = EndpointIommu::new(bed.shared_device().clone(), 3);
    let one = |iova: u64, len: usize, p: Permissions| {
        iommu
            .translate(GuestAddress(iova), len, p)
            .map(|it| it.map(|m| (m.base.0, m.length)).collect::<Vec<_>>())
    };
    assert_eq!(
        one(0x1_0010, 8, Permissions::Read).unwrap(),
        [(pa + 0x10, 8)]
    );
    assert!(one(0x1_0010, 8, Permissions::Write).is_err());
    assert_eq!(
        one(0x1_1010, 8, Permissions::Write).unwrap(),
        [(pa + 0x1010, 8)]
    );
    assert!(one(0x1_1010, 8, Permissions::Read).is_err());
    assert_eq!(
        one(0x1_2ff0, 0x10, Permissions::ReadWrite).unwrap(),
        [(pa + 0x2ff0, 0x10)]
    );
    // No permission needed: a translation of any mapping, one piece per mapping.
    assert_eq!(
        one(0x1_0ff8, 0x10, Permissions::No).unwrap(),
        [(pa + 0xff8, 8), (pa + 0x1000, 8)]
    );
    // Across the read-only and write-only mappings: neither reads nor writes work throughout.
    assert!(one(0x1_0ff8, 0x10, Permissions::Read).is_err());
    assert!(one(0x1_0ff8, 0x10, Permissions::Write).is_err());
    // Across write-only and read-write: a write works, in two pieces.
    assert_eq!(
        one(0x1_1ff8, 0x10, Permissions::Write).unwrap(),
        [(pa + 0x1ff8, 8), (pa + 0x2000, 8)]
    );
}

#[test]
fn the_last_failure_is_kept_once_and_faults_are_reported() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    drv.attach(1, 3).unwrap();
    drv.map(1, 0x4000, 0x4fff, pa, MapFlags::READ).unwrap();
    let iommu = EndpointIommu::new(bed.shared_device().clone(), 3);
    assert!(iommu
        .translate(GuestAddress(0x4100), 4, Permissions::Write)
        .is_err());
    let fault = FaultRecord {
        reason: FAULT_R_MAPPING,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: 3,
        address: 0x4100,
    };
    assert_eq!(
        iommu.take_last_failure(),
        Some(TranslationFailure::Fault(fault))
    );
    assert_eq!(iommu.take_last_failure(), None, "taken");
    // A success does not leave a failure behind.
    assert!(iommu
        .translate(GuestAddress(0x4100), 4, Permissions::Read)
        .is_ok());
    assert_eq!(iommu.take_last_failure(), None);
    // Reported on the event queue.
    let ev = drv.poll_event().unwrap().unwrap();
    assert_eq!((ev.endpoint, ev.address), (3, Some(0x4100)));
    assert_eq!(bed.device().counters().faults_raised, 1);
    // An unmanaged endpoint is refused without a report.
    let stranger = EndpointIommu::new(bed.shared_device().clone(), 9);
    assert!(stranger
        .translate(GuestAddress(0x4100), 4, Permissions::Read)
        .is_err());
    assert_eq!(
        stranger.take_last_failure(),
        Some(TranslationFailure::Refused(
            TranslateError::UnknownEndpoint(9)
        ))
    );
    assert!(drv.poll_event().unwrap().is_none());
    assert_eq!(bed.device().counters().faults_raised, 1);
    // The top byte of the IOVA space cannot be handed to vm-memory's Iotlb.
    drv.map(1, u64::MAX - 0xfff, u64::MAX, pa, RW).unwrap();
    assert!(iommu
        .translate(GuestAddress(u64::MAX - 3), 4, Permissions::Read)
        .is_err());
    assert_eq!(
        iommu.take_last_failure(),
        Some(TranslationFailure::Unrepresentable)
    );
}

#[test]
fn dma_errors_say_what_failed() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let ep = bed.dma_endpoint(5).unwrap();
    // Unattached, bypass 0 (D9): a fault, for reads and writes.
    let mut buf = [0u8; 4];
    match ep.read(0x9000, &mut buf) {
        Err(DmaError::Fault(f)) => assert_eq!(
            f,
            FaultRecord {
                reason: FAULT_R_DOMAIN,
                flags: FAULT_F_READ | FAULT_F_ADDRESS,
                endpoint: 5,
                address: 0x9000
            }
        ),
        other => panic!("{other:?}"),
    }
    match ep.write(0x9000, b"abcd") {
        Err(DmaError::Fault(f)) => assert_eq!(f.flags, FAULT_F_WRITE | FAULT_F_ADDRESS),
        other => panic!("{other:?}"),
    }
    // Mapped to guest-physical memory that is not RAM: a memory error, not a fault.
    drv.attach(1, 5).unwrap();
    drv.map(1, 0x9000, 0x9fff, 0x1000, RW).unwrap();
    assert!(matches!(
        ep.write(0x9000, b"abcd"),
        Err(DmaError::Memory(_))
    ));
    assert!(matches!(
        ep.read(0x9000, &mut buf),
        Err(DmaError::Memory(_))
    ));
    // Mapped to RAM: works both ways.
    let pa = bed.alloc(0x1000).unwrap();
    drv.map(1, 0xa000, 0xafff, pa, RW).unwrap();
    ep.write(0xa004, b"wxyz").unwrap();
    let mut back = [0u8; 4];
    bed.read_phys(pa + 4, &mut back).unwrap();
    assert_eq!(&back, b"wxyz");
    ep.read(0xa004, &mut buf).unwrap();
    assert_eq!(&buf, b"wxyz");
    for e in [
        DmaError::UnknownEndpoint(4),
        DmaError::Unrepresentable,
        DmaError::Refused(TranslateError::UnknownEndpoint(4)),
    ] {
        assert!(!e.to_string().is_empty());
    }
    assert!(format!("{ep:?}").contains('5'));
}
