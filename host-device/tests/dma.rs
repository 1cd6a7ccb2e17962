//! Translation for other device models: vm-memory's `Iommu` / `IommuMemory` through
//! `EndpointIommu`, virtio-queue running on translated memory, and the driver crate's DMA glue
//! (`IommuHal`) against this device.

use std::cell::RefCell;
use std::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal};
use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::{DeviceConfig, DmaError, EndpointIommu, FaultRecord};
use virtio_iommu_driver::dma::{DmaContext, DmaSpace, IommuHal, IommuMapper, IovaAllocator};
use virtio_iommu_driver::wire::{MapFlags, FAULT_R_MAPPING};
use virtio_iommu_driver::{FaultReason, IommuError, VirtIOIommu};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Iommu, Permissions};

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);

fn bed() -> TestBed {
    TestBed::new(
        DeviceConfig::builder()
            .endpoints([8, 16])
            .input_range(0, u64::MAX)
            .resv_region(16, ResvRegion::msi(0x0802_0000, 0x0802_0fff))
            .build()
            .unwrap(),
    )
}

#[test]
fn fragmented_iova_ranges_come_back_as_pieces() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let a = bed.alloc(0x1000).unwrap();
    let b = bed.alloc(0x3000).unwrap() + 0x2000; // not contiguous with `a`
    drv.attach(1, 8).unwrap();
    drv.map(1, 0x7000, 0x7fff, a, RW).unwrap();
    drv.map(1, 0x8000, 0x8fff, b, MapFlags::READ).unwrap();
    let iommu = EndpointIommu::new(bed.shared_device().clone(), 8);
    let pieces: Vec<_> = iommu
        .translate(GuestAddress(0x7ff0), 0x20, Permissions::Read)
        .unwrap()
        .map(|m| (m.base.0, m.length))
        .collect();
    assert_eq!(pieces, vec![(a + 0xff0, 0x10), (b, 0x10)]);
    assert!(iommu
        .translate(GuestAddress(0x7ff0), 0x20, Permissions::Write)
        .is_err());
    assert!(iommu
        .translate(GuestAddress(0x7000), 0, Permissions::Write)
        .unwrap()
        .next()
        .is_none());

    bed.write_phys(a + 0xff8, b"01234567").unwrap();
    bed.write_phys(b, b"89abcdef").unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let mut got = [0u8; 16];
    ep.read(0x7ff8, &mut got).unwrap();
    assert_eq!(&got, b"0123456789abcdef");
    assert!(ep
        .memory()
        .check_range(GuestAddress(0x7000), 0x2000, Permissions::Read));
    assert!(!ep
        .memory()
        .check_range(GuestAddress(0x7000), 0x2000, Permissions::Write));
    assert!(!ep
        .memory()
        .check_range(GuestAddress(0x7000), 0x2001, Permissions::Read));
    // Each failed check reported a fault.
    // The first faulting byte: 0x8000 (0x7ff0..0x7fff is writable).
    assert_eq!(drv.poll_event().unwrap().unwrap().address, Some(0x8000));
}

#[test]
fn no_stale_translation_after_unmap_detach_or_reset() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let mut b = [0u8; 4];
    drv.attach(1, 8).unwrap();
    drv.map(1, 0x1000, 0x1fff, pa, RW).unwrap();
    ep.read(0x1000, &mut b).unwrap();
    drv.unmap(1, 0x1000, 0x1fff).unwrap();
    assert!(ep.read(0x1000, &mut b).is_err(), "UNMAP effective at once");
    drv.map(1, 0x1000, 0x1fff, pa, RW).unwrap();
    ep.read(0x1000, &mut b).unwrap();
    drv.detach(1, 8).unwrap();
    assert!(ep.read(0x1000, &mut b).is_err(), "D21");
    drv.attach(1, 8).unwrap();
    drv.map(1, 0x1000, 0x1fff, pa, RW).unwrap();
    ep.read(0x1000, &mut b).unwrap();
    drop(drv);
    assert!(ep.read(0x1000, &mut b).is_err(), "device reset detaches");
}

#[test]
fn access_ending_at_the_top_of_the_iova_space_is_refused_not_mistranslated() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    drv.attach(1, 8).unwrap();
    drv.map(1, u64::MAX - 0xfff, u64::MAX, pa, RW).unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    ep.write(u64::MAX - 0xfff, b"top").unwrap();
    let mut b = [0u8; 3];
    ep.read(u64::MAX - 3, &mut b).unwrap();
    // Last byte = u64::MAX: vm-memory's Iotlb cannot represent the exclusive end 2^64.
    let mut b4 = [0u8; 4];
    assert!(matches!(
        ep.read(u64::MAX - 3, &mut b4),
        Err(DmaError::Unrepresentable)
    ));
    assert!(
        drv.poll_event().unwrap().is_none(),
        "not a guest-visible fault"
    );
    // Wrapping past 2^64: refused, unreported.
    let mut b8 = [0u8; 8];
    assert!(matches!(
        ep.read(u64::MAX - 3, &mut b8),
        Err(DmaError::Refused(_))
    ));
    // A real fault at the top is still reported.
    drv.unmap(1, u64::MAX - 0xfff, u64::MAX).unwrap();
    assert!(matches!(
        ep.read(u64::MAX - 3, &mut b4),
        Err(DmaError::Fault(FaultRecord { reason: FAULT_R_MAPPING, address, .. })) if address == u64::MAX - 3
    ));
    assert_eq!(
        drv.poll_event().unwrap().unwrap().reason,
        FaultReason::Mapping
    );
    assert_eq!(bed.device().counters().accesses_refused_unreported, 1);
}

#[test]
fn translated_memory_outside_ram_is_a_memory_error() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    drv.attach(1, 8).unwrap();
    drv.map(1, 0x1000, 0x1fff, 0x1000_0000, RW).unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    assert!(matches!(ep.write(0x1000, &[1]), Err(DmaError::Memory(_))));
    assert!(matches!(
        bed.dma_endpoint(99),
        Err(DmaError::UnknownEndpoint(99))
    ));
}

#[test]
fn a_virtio_queue_device_model_runs_on_translated_memory() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x10000).unwrap();
    drv.attach(1, 8).unwrap();
    // The endpoint's whole world is IOVA 0x10000..0x1ffff.
    drv.map(1, 0x10000, 0x1ffff, pa, RW).unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let mem = ep.memory();
    let vq = MockSplitQueue::create(mem, GuestAddress(0x10000), 16);
    mem.write_slice(b"hello through the IOMMU", GuestAddress(0x18000))
        .unwrap();
    vq.build_desc_chain(&[
        RawDescriptor::from(Descriptor::new(0x18000, 23, 0, 0)),
        RawDescriptor::from(Descriptor::new(0x19000, 8, 2, 0)),
    ])
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(q.is_valid(mem));
    let chain = q.pop_descriptor_chain(mem).unwrap();
    let mut reader = chain.clone().reader(mem).unwrap();
    let mut s = String::new();
    std::io::Read::read_to_string(&mut reader, &mut s).unwrap();
    assert_eq!(s, "hello through the IOMMU");
    let mut writer = chain.writer(mem).unwrap();
    std::io::Write::write_all(&mut writer, b"answered").unwrap();
    let mut phys = [0u8; 8];
    bed.read_phys(pa + 0x9000, &mut phys).unwrap();
    assert_eq!(&phys, b"answered");
    // The same rings become unreachable once unmapped.
    drv.unmap(1, 0x10000, 0x1ffff).unwrap();
    assert!(!q.is_valid(mem));
}

// --- The driver crate's DMA glue (`virtio_iommu_driver::dma::IommuHal`) on this device. ---

type Driver = VirtIOIommu<TestHal, InProcessTransport>;

thread_local! {
    static CTX: RefCell<Option<(Driver, DmaSpace)>> = const { RefCell::new(None) };
}

struct Ctx;

impl DmaContext for Ctx {
    type Inner = TestHal;
    fn with<R>(
        f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
    ) -> Result<R, IommuError> {
        CTX.with(|c| {
            let mut g = c.borrow_mut();
            let (iommu, space) = g.as_mut().ok_or(IommuError::Broken)?;
            f(iommu, space)
        })
    }
}

#[test]
fn driver_iommu_hal_maps_buffers_that_the_endpoint_can_reach() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    drv.attach(7, 16).unwrap();
    let (lo, hi) = drv.config().input_range;
    let mut iova = IovaAllocator::new(lo, hi, drv.config().granule).unwrap();
    for r in drv.probe_reserved_regions(16).unwrap() {
        iova.reserve(r.start, r.end);
    }
    CTX.with(|c| *c.borrow_mut() = Some((drv, DmaSpace::new(7, iova).unwrap())));
    let ep = bed.dma_endpoint(16).unwrap();

    // dma_alloc: READ|WRITE mapping of fresh pages.
    let (iova, vaddr) = IommuHal::<Ctx>::dma_alloc(2, BufferDirection::Both);
    assert_ne!(iova, 0);
    ep.write(iova + 0x1ffc, b"dma!").unwrap();
    // SAFETY: `vaddr` points to the 2 pages just allocated; the endpoint wrote them above and
    // nothing else accesses them now.
    let host = unsafe { std::slice::from_raw_parts(vaddr.as_ptr(), 0x2000) };
    assert_eq!(&host[0x1ffc..], b"dma!");

    // share DeviceToDriver: WRITE-only mapping of a bounce buffer, copied back by unshare.
    let mut out = vec![0u8; 100];
    let out_ptr = NonNull::from(out.as_mut_slice());
    // SAFETY: `out` is valid and untouched until `unshare` below.
    let out_iova = unsafe { IommuHal::<Ctx>::share(out_ptr, BufferDirection::DeviceToDriver) };
    ep.write(out_iova + 50, b"written by the device").unwrap();
    let mut b = [0u8; 4];
    assert!(
        ep.read(out_iova, &mut b).is_err(),
        "device-to-driver buffers are WRITE-only"
    );
    // SAFETY: the same buffer and the IOVA `share` returned for it.
    unsafe { IommuHal::<Ctx>::unshare(out_iova, out_ptr, BufferDirection::DeviceToDriver) };
    assert_eq!(&out[50..71], b"written by the device");
    assert!(
        ep.write(out_iova + 50, b"late").is_err(),
        "unmapped by unshare"
    );

    // share DriverToDevice: READ-only.
    let mut inp = b"driver data".to_vec();
    let in_ptr = NonNull::from(inp.as_mut_slice());
    // SAFETY: `inp` is valid and untouched until `unshare` below.
    let in_iova = unsafe { IommuHal::<Ctx>::share(in_ptr, BufferDirection::DriverToDevice) };
    let mut seen = [0u8; 11];
    ep.read(in_iova, &mut seen).unwrap();
    assert_eq!(&seen, b"driver data");
    assert!(ep.write(in_iova, b"no").is_err());
    // SAFETY: as above.
    unsafe { IommuHal::<Ctx>::unshare(in_iova, in_ptr, BufferDirection::DriverToDevice) };

    // SAFETY: the values `dma_alloc` returned, not used afterwards.
    assert_eq!(unsafe { IommuHal::<Ctx>::dma_dealloc(iova, vaddr, 2) }, 0);
    assert!(ep.read(iova, &mut b).is_err());
    assert_eq!(bed.device().state().mapping_count(), 0);
    let (drv, space) = CTX.with(|c| c.borrow_mut().take()).unwrap();
    assert_eq!((space.maps, space.unmaps, space.failures), (3, 3, 0));
    // Faults: the WRITE-only read, the late write, the READ-only write, the read after free.
    let mut drv = drv;
    let mut n = 0;
    while let Some(ev) = drv.poll_event().unwrap() {
        assert_eq!((ev.endpoint, ev.reason), (16, FaultReason::Mapping));
        n += 1;
    }
    assert_eq!(n, 4);
}

/// Isolated strict mode on this device: a buffer with an unaligned head and tail around whole
/// granules is MAPped in three pieces (bounce, direct, bounce) and UNMAPped with one request
/// over the whole range; the endpoint reaches exactly the buffer's bytes there, and its writes
/// come back.
#[test]
fn driver_isolated_iommu_hal_bounces_head_and_tail_on_this_device() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    drv.attach(7, 8).unwrap();
    let g = drv.config().granule;
    let (lo, hi) = drv.config().input_range;
    let iova = IovaAllocator::new(lo, hi, g).unwrap();
    let space = DmaSpace::isolated::<TestHal>(7, iova, 16, 4).unwrap();
    CTX.with(|c| *c.borrow_mut() = Some((drv, space)));
    let ep = bed.dma_endpoint(8).unwrap();
    // A buffer inside guest RAM (shared in place), from 0x10 into its first granule to 0x10
    // into its fourth.
    let (_, vaddr) = TestHal::dma_alloc(4 * g as usize / 4096, BufferDirection::Both);
    let len = 3 * g as usize;
    // SAFETY: `vaddr` points to 4 granules of zeroed guest RAM owned by this test.
    let whole = unsafe { std::slice::from_raw_parts_mut(vaddr.as_ptr(), 4 * g as usize) };
    for (i, b) in whole.iter_mut().enumerate() {
        *b = i as u8;
    }
    let ptr = NonNull::from(&mut whole[0x10..0x10 + len]);
    // SAFETY: `whole` is not touched until `unshare`.
    let addr = unsafe { IommuHal::<Ctx>::share(ptr, BufferDirection::Both) };
    assert_eq!(bed.device().state().mapping_count(), 3);
    let mut seen = vec![0u8; len];
    ep.read(addr, &mut seen).unwrap();
    assert!(seen.iter().enumerate().all(|(i, &b)| b == (i + 0x10) as u8));
    ep.write(addr, &vec![0xee; len]).unwrap();
    // SAFETY: the same buffer and the address `share` returned for it.
    unsafe { IommuHal::<Ctx>::unshare(addr, ptr, BufferDirection::Both) };
    assert_eq!(
        bed.device().state().mapping_count(),
        0,
        "one UNMAP removed all three"
    );
    assert!(whole[0x10..0x10 + len].iter().all(|&b| b == 0xee));
    assert_eq!((whole[0xf], whole[0x10 + len]), (0xf, (0x10 + len) as u8));
    let (_, space) = CTX.with(|c| c.borrow_mut().take()).unwrap();
    assert_eq!((space.maps, space.unmaps, space.failures), (3, 1, 0));
    assert_eq!((space.bounced, space.bounce_granules()), (1, (0, 4)));
}
