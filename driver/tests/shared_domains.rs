//! Shared domains against the in-process device model: one `DmaSpace`, one domain, several
//! endpoints (`attach_endpoint`/`detach_endpoint`), manual MAPs beside the allocator
//! (`reserve_iova`), 1:1 `Direct` regions and the merged reserved regions feeding the
//! allocator (#10 items 4 and 6).

use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::{DeviceConfig, DmaError};
use virtio_iommu_driver::dma::{DmaSpace, PhysRange};
use virtio_iommu_driver::topology::reserved::{self, MSI_IOVA_BASE, MSI_IOVA_LENGTH};
use virtio_iommu_driver::wire::{MapFlags, Status};
use virtio_iommu_driver::{FaultReason, IommuError, ReservedRegion, ResvMemKind, VirtIOIommu};

type Driver = VirtIOIommu<TestHal, InProcessTransport>;

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
/// Endpoint 16's reserved region: low, where first-fit allocation lands first.
const RESV16: (u64, u64) = (0x3000, 0x3fff);

fn bed() -> TestBed {
    TestBed::new(
        DeviceConfig::builder()
            .endpoints([8, 16, 24])
            .input_range(0, 0xffff_ffff)
            .resv_region(16, ResvRegion::reserved(RESV16.0, RESV16.1))
            .build()
            .unwrap(),
    )
}

fn regions(drv: &mut Driver, endpoint: u32) -> Vec<ReservedRegion> {
    drv.probe_reserved_regions(endpoint).unwrap()
}

fn read(bed: &TestBed, endpoint: u32, iova: u64, len: usize) -> Result<Vec<u8>, DmaError> {
    let mut buf = vec![0; len];
    bed.dma_endpoint(endpoint).unwrap().read(iova, &mut buf)?;
    Ok(buf)
}

/// What breaks without a shared space: a second strict space in the same domain has its own
/// allocator, hands out the IOVA the first one mapped, and the device refuses the
/// overlapping MAP with S_INVAL.
#[test]
fn two_spaces_in_one_domain_collide_with_s_inval() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    let r8 = regions(&mut drv, 8);
    let mut first = DmaSpace::attach_strict(&mut drv, 1, 8, &r8).unwrap();
    let mut second = DmaSpace::attach_strict(&mut drv, 1, 24, &r8).unwrap();
    first.map_buffer(&mut drv, pa, 0x1000, RW).unwrap();
    assert_eq!(
        second.map_buffer(&mut drv, pa, 0x1000, RW),
        Err(IommuError::Status(Status::Inval))
    );
}

/// Both endpoints translate through the same mappings, and the allocator keeps out the
/// second endpoint's reserved region (the device refuses a MAP over any reserved region of
/// any endpoint of the domain: without the union the second buffer's MAP fails).
#[test]
fn two_endpoints_translate_through_one_iova_space() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let r8 = regions(&mut drv, 8);
    let r16 = regions(&mut drv, 16);
    assert_eq!(r16.len(), 1);
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &r8).unwrap();
    space.attach_endpoint(&mut drv, 16, &r16).unwrap();
    assert_eq!(space.endpoints(), [8, 16]);
    // Attaching again changes nothing.
    space.attach_endpoint(&mut drv, 16, &r16).unwrap();
    assert_eq!(space.endpoints(), [8, 16]);

    let mut iovas = Vec::new();
    for i in 0..4u8 {
        let pa = bed.alloc(0x1000).unwrap();
        bed.write_phys(pa, &[i; 16]).unwrap();
        let iova = space.map_buffer(&mut drv, pa, 0x1000, RW).unwrap();
        assert!(
            iova + 0xfff < RESV16.0 || iova > RESV16.1,
            "{iova:#x} in endpoint 16's reserved region"
        );
        iovas.push(iova);
    }
    assert!(iovas.contains(&0x4000), "first fit skipped only the region");
    for (i, &iova) in iovas.iter().enumerate() {
        let want = vec![i as u8; 16];
        assert_eq!(read(&bed, 8, iova, 16).unwrap(), want);
        assert_eq!(read(&bed, 16, iova, 16).unwrap(), want);
    }
    // A write by one endpoint is seen by the other at the same IOVA.
    bed.dma_endpoint(16)
        .unwrap()
        .write(iovas[2], b"from 16")
        .unwrap();
    assert_eq!(read(&bed, 8, iovas[2], 7).unwrap(), b"from 16");
    // Endpoint 24 is in no domain of ours.
    assert!(read(&bed, 24, iovas[0], 1).is_err());
}

/// Detaching one endpoint: its DMA faults (one fault event, naming it), the other's still
/// translates; the last endpoint is not detached under the space.
#[test]
fn detaching_one_endpoint_faults_only_for_that_one() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let r8 = regions(&mut drv, 8);
    let r16 = regions(&mut drv, 16);
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &r8).unwrap();
    space.attach_endpoint(&mut drv, 16, &r16).unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    bed.write_phys(pa, b"shared").unwrap();
    let iova = space.map_buffer(&mut drv, pa, 0x1000, RW).unwrap();
    assert_eq!(read(&bed, 16, iova, 6).unwrap(), b"shared");
    while drv.poll_event().unwrap().is_some() {}

    space.detach_endpoint(&mut drv, 16).unwrap();
    assert_eq!(space.endpoints(), [8]);
    assert!(read(&bed, 16, iova, 6).is_err(), "detached: faults");
    assert_eq!(read(&bed, 8, iova, 6).unwrap(), b"shared");
    let ev = drv.poll_event().unwrap().expect("one fault event");
    assert_eq!(ev.endpoint, 16);
    assert_eq!(ev.reason, FaultReason::Domain);
    assert!(
        drv.poll_event().unwrap().is_none(),
        "nothing for endpoint 8"
    );
    // New buffers still reach endpoint 8.
    let pb = bed.alloc(0x1000).unwrap();
    bed.write_phys(pb, b"later").unwrap();
    let jova = space.map_buffer(&mut drv, pb, 0x1000, RW).unwrap();
    assert_eq!(read(&bed, 8, jova, 5).unwrap(), b"later");

    assert!(matches!(
        space.detach_endpoint(&mut drv, 8),
        Err(IommuError::NotSupported(_))
    ));
    assert!(matches!(
        space.detach_endpoint(&mut drv, 16),
        Err(IommuError::NotSupported(_))
    ));
    assert_eq!(read(&bed, 8, iova, 6).unwrap(), b"shared");
}

/// A further endpoint whose reserved region covers a live buffer is refused before any
/// request (the device would refuse the ATTACH with S_UNSUPP anyway), and nothing changes.
#[test]
fn attach_endpoint_refuses_regions_over_live_buffers() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &[]).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let pa = bed.alloc(0x1000).unwrap();
        held.push(space.map_buffer(&mut drv, pa, 0x1000, RW).unwrap());
    }
    assert!(held.contains(&0x3000));
    let before: Vec<_> = space.iova_allocator().unwrap().iter_free().collect();
    let r16 = regions(&mut drv, 16);
    assert_eq!(
        space.attach_endpoint(&mut drv, 16, &r16),
        Err(IommuError::IovaInUse {
            start: RESV16.0,
            end: RESV16.1
        })
    );
    assert_eq!(space.endpoints(), [8]);
    assert!(read(&bed, 16, 0x3000, 1).is_err(), "not attached");
    let after: Vec<_> = space.iova_allocator().unwrap().iter_free().collect();
    assert_eq!(before, after);
    // Once the buffer is gone, it attaches.
    space.unmap_buffer(&mut drv, 0x3000).unwrap();
    space.attach_endpoint(&mut drv, 16, &r16).unwrap();
    assert_eq!(read(&bed, 16, held[0], 1).unwrap().len(), 1);
}

/// Manual MAPs in a reserved IOVA range coexist with the allocator: its buffers never land
/// there (their MAPs would fail with S_INVAL), overlapping reservations are refused, and a
/// released range is handed out again.
#[test]
fn manual_maps_coexist_with_the_allocator() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &[]).unwrap();
    let live = space
        .map_buffer(&mut drv, bed.alloc(0x1000).unwrap(), 0x1000, RW)
        .unwrap();
    assert_eq!(live, 0x1000);
    // Over the live buffer: refused.
    assert_eq!(
        space.reserve_iova(&drv, 0x1800, 0x2000),
        Err(IommuError::IovaInUse {
            start: 0x1000,
            end: 0x2fff
        })
    );
    // Over the fault window: refused.
    let w = space.fault_window();
    assert!(matches!(
        space.reserve_iova(&drv, w.start, w.start),
        Err(IommuError::IovaInUse { .. })
    ));
    // Widened to whole granules.
    let manual = space.reserve_iova(&drv, 0x2010, 0x5fff).unwrap();
    assert_eq!(
        manual,
        PhysRange {
            start: 0x2000,
            end: 0x5fff
        }
    );
    assert_eq!(space.reserved_iovas(), [manual]);
    assert!(matches!(
        space.reserve_iova(&drv, 0x5000, 0x6fff),
        Err(IommuError::IovaInUse { .. })
    ));
    let pm = bed.alloc(0x4000).unwrap();
    bed.write_phys(pm, b"manual").unwrap();
    drv.map(1, manual.start, manual.end, pm, MapFlags::READ)
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..8 {
        let pa = bed.alloc(0x1000).unwrap();
        let iova = space.map_buffer(&mut drv, pa, 0x1000, RW).unwrap();
        assert!(iova > manual.end || iova + 0xfff < manual.start);
        got.push(iova);
    }
    assert_eq!(got[0], 0x6000);
    assert_eq!(read(&bed, 8, 0x2000, 6).unwrap(), b"manual");
    // unmap_all leaves the manual mapping alone.
    space.unmap_all(&mut drv).unwrap();
    assert_eq!(read(&bed, 8, 0x2000, 6).unwrap(), b"manual");
    for iova in got.into_iter().chain([live]) {
        space.unmap_buffer(&mut drv, iova).unwrap();
    }
    // Released (after the embedder's UNMAP): first fit hands it out again.
    drv.unmap(1, manual.start, manual.end).unwrap();
    assert_eq!(
        space.release_iova(PhysRange {
            start: 0x2000,
            end: 0x2fff
        }),
        Err(IommuError::InvalidRange)
    );
    space.release_iova(manual).unwrap();
    assert!(space.reserved_iovas().is_empty());
    let again = space
        .map_buffer(&mut drv, bed.alloc(0x6000).unwrap(), 0x6000, RW)
        .unwrap();
    assert_eq!(again, 0x1000);
}

/// A `Direct` region is mapped 1:1 for every endpoint of the space, kept out of the
/// allocator, and UNMAPped by `unmap_all`.
#[test]
fn direct_regions_are_mapped_one_to_one() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x2000).unwrap();
    bed.write_phys(pa, b"firmware table").unwrap();
    let direct = ReservedRegion {
        kind: ResvMemKind::Direct,
        start: pa,
        end: pa + 0x1fff,
    };
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &[direct]).unwrap();
    assert_eq!(read(&bed, 8, pa, 14).unwrap(), b"firmware table");
    let r16 = regions(&mut drv, 16);
    space
        .attach_endpoint(&mut drv, 16, &[r16[0], direct])
        .unwrap();
    assert_eq!(read(&bed, 16, pa, 14).unwrap(), b"firmware table");
    assert_eq!(space.maps, 1, "the identical region is mapped once");
    let a = space.iova_allocator().unwrap();
    assert!(a.iter_free().all(|(s, e)| e < pa || s > pa + 0x1fff));
    // A manual range over it is refused.
    assert!(space.reserve_iova(&drv, pa, pa).is_err());
    assert_eq!(space.unmap_all(&mut drv), Ok(1));
    assert!(read(&bed, 8, pa, 1).is_err());
}

/// Identity-mapped shared: a further endpoint whose reserved region lies outside the RAM
/// joins; one inside the identity mappings is refused.
#[test]
fn identity_mapped_space_shared() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let (base, size) = bed.ram().range();
    let ram = [PhysRange::from_start_size(base, size).unwrap()];
    let mut space = DmaSpace::attach_identity(&mut drv, 1, 8, &ram, &[], None).unwrap();
    let r16 = regions(&mut drv, 16);
    space.attach_endpoint(&mut drv, 16, &r16).unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    bed.write_phys(pa, b"identity").unwrap();
    assert_eq!(read(&bed, 16, pa, 8).unwrap(), b"identity");
    assert_eq!(read(&bed, 8, pa, 8).unwrap(), b"identity");
    let inside = ReservedRegion {
        kind: ResvMemKind::Reserved,
        start: pa,
        end: pa + 0xfff,
    };
    assert!(matches!(
        space.attach_endpoint(&mut drv, 24, &[inside]),
        Err(IommuError::IovaInUse { .. })
    ));
    assert!(read(&bed, 24, pa, 1).is_err());
    // A manual range outside RAM is fine, inside refused.
    assert!(space.reserve_iova(&drv, 0x10_0000, 0x10_ffff).is_ok());
    assert!(space.reserve_iova(&drv, pa, pa).is_err());
}

/// The merged list (PROBE's regions plus the software MSI window) feeds the allocator: no
/// buffer ever gets an IOVA in the window, and the embedder's doorbell MAP there succeeds.
#[test]
fn merged_regions_keep_the_software_msi_window_free() {
    let bed = TestBed::new(
        DeviceConfig::builder()
            .endpoints([8])
            .input_range(0, 0x0fff_ffff)
            .build()
            .unwrap(),
    );
    let mut drv = bed.driver().unwrap();
    let merged = reserved::merge(&regions(&mut drv, 8), &[]);
    assert_eq!(merged, [reserved::software_msi()]);
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &merged).unwrap();
    let pa = bed.alloc(0x10_0000).unwrap();
    let window_end = MSI_IOVA_BASE + MSI_IOVA_LENGTH - 1;
    let mut n = 0;
    while let Ok(iova) = space.map_buffer(&mut drv, pa, 0x10_0000, RW) {
        assert!(
            iova > window_end || iova + 0xf_ffff < MSI_IOVA_BASE,
            "{iova:#x}"
        );
        n += 1;
    }
    assert!(n > 100, "{n} buffers");
    let doorbell = bed.alloc(0x1000).unwrap();
    drv.map(
        1,
        MSI_IOVA_BASE,
        MSI_IOVA_BASE + 0xfff,
        doorbell,
        MapFlags::WRITE,
    )
    .unwrap();
}

/// Identity-bypass shared: the further endpoint is attached with ATTACH_F_BYPASS and reaches
/// RAM at its physical address; buffers in its reserved region are refused from then on.
#[test]
fn identity_bypass_space_shared() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let (base, size) = bed.ram().range();
    let ram = [PhysRange::from_start_size(base, size).unwrap()];
    let unbacked = PhysRange {
        start: 1 << 60,
        end: u64::MAX,
    };
    let mut space = DmaSpace::attach_identity(&mut drv, 1, 8, &ram, &[], Some(unbacked)).unwrap();
    assert_eq!(
        space.mode(),
        virtio_iommu_driver::dma::DmaMode::IdentityBypass
    );
    assert!(space.map_buffer(&mut drv, RESV16.0, 0x10, RW).is_ok());
    let r16 = regions(&mut drv, 16);
    space.attach_endpoint(&mut drv, 16, &r16).unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    bed.write_phys(pa, b"bypass").unwrap();
    assert_eq!(read(&bed, 16, pa, 6).unwrap(), b"bypass");
    assert_eq!(read(&bed, 8, pa, 6).unwrap(), b"bypass");
    assert!(space.map_buffer(&mut drv, RESV16.0, 0x10, RW).is_err());
    assert!(matches!(
        space.reserve_iova(&drv, 0x10_0000, 0x10_0fff),
        Err(IommuError::NotSupported(_))
    ));
}
