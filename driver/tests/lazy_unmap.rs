//! Lazy unmapping (`UnmapPolicy::Lazy`, the flush queue of a strict `DmaSpace`) against the
//! in-process device: deferred UNMAPs leave in one batch with one notification, nothing stays
//! mapped after the flush, an IOVA is never handed out again before its UNMAP returned S_OK
//! (also when the device fails it: FaultPlan), the time bound (fake clock), the strict policy
//! unchanged, the `Hal` adapter's `unshare` deferring, and the revival of a pending mapping by
//! a new buffer on the same granules with the same permissions (no MAP, same IOVA).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_drivers::{BufferDirection, Hal};
use virtio_iommu_device::fault::{FaultPlan, Misbehaviour, When};
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::DeviceConfig;
use virtio_iommu_driver::dma::{
    spin::Mutex, Clock, DmaSpace, FlushError, FlushStats, IommuHal, UnmapPolicy,
};
use virtio_iommu_driver::wire::{MapFlags, RequestType, Status};
use virtio_iommu_driver::{IommuError, VirtIOIommu};

const EP: u32 = 8;
const DOMAIN: u32 = 1;
const G: u64 = 0x1000;

type Iommu = VirtIOIommu<TestHal, InProcessTransport>;

/// A clock the test sets by hand (nanoseconds).
struct FakeClock(AtomicU64);

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A clock that never advances: only the size bound and explicit flushes apply.
static FROZEN: FakeClock = FakeClock(AtomicU64::new(0));

fn lazy(max_pending: usize, max_age_ns: u64, clock: &'static dyn Clock) -> UnmapPolicy {
    UnmapPolicy::Lazy {
        max_pending,
        max_age_ns,
        clock,
    }
}

fn bed_with(plan: FaultPlan) -> TestBed {
    TestBed::new(
        DeviceConfig::builder()
            .endpoints([EP])
            .input_range(0, 0xffff_ffff_ffff)
            .fault_injection(plan)
            .build()
            .unwrap(),
    )
}

/// Driver and a strict space for `EP` in `DOMAIN`, with `policy`.
fn setup(bed: &TestBed, policy: UnmapPolicy) -> (Iommu, DmaSpace) {
    let mut drv = bed.driver().unwrap();
    let mut space = DmaSpace::attach_strict(&mut drv, DOMAIN, EP, &[]).unwrap();
    space.set_unmap_policy(policy).unwrap();
    (drv, space)
}

fn notifications(drv: &Iommu) -> u64 {
    drv.request_stats().notifications
}

/// Whether the endpoint can read one byte at `iova`.
fn reachable(bed: &TestBed, iova: u64) -> bool {
    let mut b = [0u8];
    bed.dma_endpoint(EP).unwrap().read(iova, &mut b).is_ok()
}

/// Maps `n` one-granule buffers (READ|WRITE); returns their IOVAs.
fn map_n(bed: &TestBed, drv: &mut Iommu, space: &mut DmaSpace, n: usize) -> Vec<u64> {
    let phys = bed.alloc(n * G as usize).unwrap();
    (0..n as u64)
        .map(|i| {
            space
                .map_buffer(drv, phys + i * G, G, MapFlags::READ | MapFlags::WRITE)
                .unwrap()
        })
        .collect()
}

fn overlaps(a: u64, b: u64) -> bool {
    a < b + G && b < a + G
}

#[test]
fn deferred_unmaps_leave_as_one_batch_with_one_notification() {
    let bed = bed_with(FaultPlan::new());
    let (mut drv, mut space) = setup(&bed, lazy(8, u64::MAX, &FROZEN));
    let iovas = map_n(&bed, &mut drv, &mut space, 8);
    let before = notifications(&drv);
    for &iova in &iovas[..7] {
        space.unmap_buffer(&mut drv, iova).unwrap();
    }
    assert_eq!(
        notifications(&drv),
        before,
        "no request for deferred UNMAPs"
    );
    assert_eq!((space.pending_unmaps(), space.unmaps), (7, 0));
    // The documented trade-off: the device still reaches the unshared buffers.
    assert!(iovas[..7].iter().all(|&i| reachable(&bed, i)));
    assert_eq!(space.live_mappings(), 8, "deferred ranges stay allocated");
    // The 8th fills the queue: one batch, one notification.
    space.unmap_buffer(&mut drv, iovas[7]).unwrap();
    assert_eq!(notifications(&drv), before + 1);
    assert_eq!((space.pending_unmaps(), space.unmaps), (0, 8));
    assert!(iovas.iter().all(|&i| !reachable(&bed, i)), "nothing mapped");
    assert_eq!(space.live_mappings(), 0);
    assert_eq!(space.iova_allocator().unwrap().live_allocations(), 0);
    assert_eq!(
        space.flush_stats(),
        FlushStats {
            deferred: 8,
            flushes: 1,
            by_size: 1,
            by_age: 0,
            failed_unmaps: 0,
            revived: 0,
        }
    );
    // A second unshare of a deferred buffer is refused, not queued twice.
    let a = map_n(&bed, &mut drv, &mut space, 1)[0];
    space.unmap_buffer(&mut drv, a).unwrap();
    assert_eq!(
        space.unmap_buffer(&mut drv, a),
        Err(IommuError::InvalidRange)
    );
    assert_eq!(space.pending_unmaps(), 1);
    // Explicit flush: one notification, device loses access.
    let n = notifications(&drv);
    assert_eq!(space.flush(&mut drv), Ok(1));
    assert_eq!(notifications(&drv), n + 1);
    assert!(!reachable(&bed, a));
    assert_eq!(space.flush(&mut drv), Ok(0), "empty queue: nothing sent");
    assert_eq!(notifications(&drv), n + 1);
    assert_eq!((space.failures, space.leaked), (1, 0));
}

#[test]
fn an_iova_is_handed_out_again_only_after_its_unmap_completed() {
    let bed = bed_with(FaultPlan::new());
    let (mut drv, mut space) = setup(&bed, lazy(64, u64::MAX, &FROZEN));
    let a = map_n(&bed, &mut drv, &mut space, 1)[0];
    space.unmap_buffer(&mut drv, a).unwrap();
    let others = map_n(&bed, &mut drv, &mut space, 40);
    assert!(
        others.iter().all(|&o| !overlaps(o, a)),
        "pending: not reused"
    );
    // A space with room for exactly one buffer: the second needs the first one's IOVAs, so
    // the deferred UNMAP is flushed (and completed) before they are handed out again.
    let bed = bed_with(FaultPlan::new());
    let mut drv = bed.driver().unwrap();
    drv.attach(DOMAIN, EP).unwrap();
    let tiny = virtio_iommu_driver::dma::IovaAllocator::new(0x1000, 0x2fff, G).unwrap();
    let mut space = DmaSpace::new(DOMAIN, tiny).unwrap();
    space.set_unmap_policy(lazy(64, u64::MAX, &FROZEN)).unwrap();
    let phys = bed.alloc(2 * G as usize).unwrap();
    let a = space.map_buffer(&mut drv, phys, G, MapFlags::READ).unwrap();
    space.unmap_buffer(&mut drv, a).unwrap();
    assert_eq!(space.pending_unmaps(), 1);
    // The MAP of the same IOVAs succeeds: the device (which refuses overlapping MAPs with
    // S_INVAL) had completed the UNMAP first.
    let b = space
        .map_buffer(&mut drv, phys + G, G, MapFlags::READ)
        .unwrap();
    assert_eq!(b, a);
    assert_eq!(
        (space.pending_unmaps(), space.flush_stats().flushes),
        (0, 1)
    );
    bed.write_phys(phys + G, b"second").unwrap();
    let mut got = [0u8; 6];
    bed.dma_endpoint(EP).unwrap().read(b, &mut got).unwrap();
    assert_eq!(&got, b"second", "the new mapping, not the old one");
    assert_eq!(space.failures, 0);
}

#[test]
fn a_failed_deferred_unmap_keeps_its_range_and_reports_the_error() {
    // The 2nd UNMAP is answered S_INVAL (executed, but reported failed).
    let plan = FaultPlan::new().with(
        Misbehaviour::Status(Status::Inval as u8),
        When::nth(2).on(RequestType::Unmap),
    );
    let bed = bed_with(plan);
    let (mut drv, mut space) = setup(&bed, lazy(16, u64::MAX, &FROZEN));
    let iovas = map_n(&bed, &mut drv, &mut space, 3);
    for &i in &iovas {
        space.unmap_buffer(&mut drv, i).unwrap();
    }
    assert_eq!(
        space.flush(&mut drv),
        Err(FlushError {
            failed: 1,
            first: IommuError::Status(Status::Inval)
        })
    );
    assert_eq!((space.leaked, space.failures), (1, 1));
    assert_eq!(space.flush_stats().failed_unmaps, 1);
    assert_eq!(space.live_mappings(), 1, "the failed one is kept");
    assert_eq!(space.iova_allocator().unwrap().live_allocations(), 1);
    // Its IOVAs are never handed out, however many buffers follow.
    let more = map_n(&bed, &mut drv, &mut space, 40);
    assert!(more.iter().all(|&m| !overlaps(m, iovas[1])));
    assert!(!more.iter().any(|m| iovas[1] == *m));
    for m in more {
        space.unmap_buffer(&mut drv, m).unwrap();
    }
    // unmap_all flushes what is pending and retries the kept range.
    space.unmap_all(&mut drv).unwrap();
    assert_eq!((space.leaked, space.live_mappings()), (0, 0));
    assert_eq!(space.iova_allocator().unwrap().live_allocations(), 0);
}

#[test]
fn an_unexecuted_deferred_unmap_leaves_the_device_mapping_and_the_range_reserved() {
    // The 1st UNMAP comes back unwritten and unexecuted: the device keeps the mapping.
    let plan = FaultPlan::new().with(
        Misbehaviour::TailNotWritten,
        When::nth(1).on(RequestType::Unmap),
    );
    let bed = bed_with(plan);
    let (mut drv, mut space) = setup(&bed, lazy(2, u64::MAX, &FROZEN));
    let iovas = map_n(&bed, &mut drv, &mut space, 2);
    // The size bound flushes inside the second unmap_buffer, which cannot report it: the
    // error is kept for take_flush_error. An unwritten tail is fatal to the batch (the
    // outcome of every request of the round is unknown, the driver is broken): both ranges
    // stay reserved, although the device did execute the second UNMAP.
    space.unmap_buffer(&mut drv, iovas[0]).unwrap();
    space.unmap_buffer(&mut drv, iovas[1]).unwrap();
    let e = space.take_flush_error().expect("the failure surfaces");
    assert_eq!((e.failed, e.first), (2, IommuError::NotWritten));
    assert_eq!(space.take_flush_error(), None, "taken once");
    assert!(reachable(&bed, iovas[0]), "still mapped in the device");
    assert!(!reachable(&bed, iovas[1]));
    assert_eq!((space.leaked, space.live_mappings()), (2, 2));
    assert_eq!(space.iova_allocator().unwrap().live_allocations(), 2);
    assert_eq!(space.flush_stats().failed_unmaps, 2);
    assert!(drv.is_broken());
    // Nothing new is mapped (least of all over the kept ranges).
    let phys = bed.alloc(G as usize).unwrap();
    assert!(space.map_buffer(&mut drv, phys, G, MapFlags::READ).is_err());
    assert_eq!(space.live_mappings(), 2);
}

#[test]
fn the_time_bound_flushes_at_the_next_activity() {
    static CLOCK: FakeClock = FakeClock(AtomicU64::new(5_000));
    let bed = bed_with(FaultPlan::new());
    let (mut drv, mut space) = setup(&bed, lazy(64, 1_000, &CLOCK));
    let iovas = map_n(&bed, &mut drv, &mut space, 2);
    space.unmap_buffer(&mut drv, iovas[0]).unwrap();
    CLOCK.0.store(5_999, Ordering::SeqCst);
    space.flush_if_due(&mut drv);
    space.unmap_buffer(&mut drv, iovas[1]).unwrap();
    assert_eq!(space.pending_unmaps(), 2, "younger than max_age");
    assert!(reachable(&bed, iovas[0]));
    CLOCK.0.store(6_000, Ordering::SeqCst);
    // The next share checks the age first.
    let n = notifications(&drv);
    let c = map_n(&bed, &mut drv, &mut space, 1)[0];
    assert_eq!(space.pending_unmaps(), 0);
    assert_eq!(
        notifications(&drv),
        n + 2,
        "one for the flush, one for the MAP"
    );
    // Both UNMAPped (their IOVAs may be `c`'s now: freed after S_OK).
    assert_eq!(space.live_mappings(), 1);
    for i in &iovas {
        assert!(overlaps(*i, c) || !reachable(&bed, *i));
    }
    let s = space.flush_stats();
    assert_eq!((s.flushes, s.by_age, s.by_size), (1, 1, 0));
    // The age counts from the oldest pending entry: a new one starts a new window.
    space.unmap_buffer(&mut drv, c).unwrap();
    CLOCK.0.store(6_999, Ordering::SeqCst);
    space.flush_if_due(&mut drv);
    assert_eq!(space.pending_unmaps(), 1);
    CLOCK.0.store(7_000, Ordering::SeqCst);
    space.flush_if_due(&mut drv);
    assert_eq!((space.pending_unmaps(), space.flush_stats().by_age), (0, 2));
    assert!(!reachable(&bed, c));
}

#[test]
fn strict_stays_the_default_and_unchanged() {
    let bed = bed_with(FaultPlan::new());
    let mut drv = bed.driver().unwrap();
    let mut space = DmaSpace::attach_strict(&mut drv, DOMAIN, EP, &[]).unwrap();
    assert!(!space.is_lazy());
    let iovas = map_n(&bed, &mut drv, &mut space, 3);
    for &i in &iovas {
        let n = notifications(&drv);
        space.unmap_buffer(&mut drv, i).unwrap();
        assert_eq!(notifications(&drv), n + 1, "one UNMAP per buffer");
        assert!(!reachable(&bed, i), "gone before unmap_buffer returns");
    }
    assert_eq!(space.flush(&mut drv), Ok(0));
    assert_eq!(space.flush_stats(), FlushStats::default());
    assert_eq!(
        (space.maps, space.unmaps, space.pending_unmaps()),
        (3, 3, 0)
    );
    // Bounds are checked; a policy change with UNMAPs pending is refused.
    assert_eq!(
        space.set_unmap_policy(lazy(0, 1, &FROZEN)),
        Err(IommuError::InvalidRange)
    );
    assert_eq!(
        space.set_unmap_policy(lazy(virtio_iommu_driver::dma::MAX_PENDING + 1, 1, &FROZEN)),
        Err(IommuError::InvalidRange)
    );
    space.set_unmap_policy(lazy(4, u64::MAX, &FROZEN)).unwrap();
    let a = map_n(&bed, &mut drv, &mut space, 1)[0];
    space.unmap_buffer(&mut drv, a).unwrap();
    assert_eq!(
        space.set_unmap_policy(UnmapPolicy::Strict),
        Err(IommuError::InvalidRange)
    );
    space.flush(&mut drv).unwrap();
    space.set_unmap_policy(UnmapPolicy::Strict).unwrap();
    assert!(!space.is_lazy());
}

static HAL_IOMMU: Mutex<Option<Iommu>> = Mutex::new(None);
static HAL_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
virtio_iommu_driver::dma_context! {
    /// The context of the `Hal` test.
    struct LazyDma { inner: TestHal, iommu: HAL_IOMMU, space: HAL_DMA }
}

#[test]
fn the_hal_adapter_defers_unshare_but_not_dma_dealloc() {
    let bed = bed_with(FaultPlan::new());
    let (drv, space) = setup(&bed, lazy(3, u64::MAX, &FROZEN));
    *HAL_IOMMU.lock() = Some(drv);
    *HAL_DMA.lock() = Some(space);
    type H = IommuHal<LazyDma>;
    let mut bufs = [[0u8; 64]; 3];
    let mut addrs = Vec::new();
    for b in &mut bufs {
        // SAFETY: `b` lives and is untouched until its `unshare` below.
        addrs.push(unsafe { H::share(NonNull::from(&mut b[..]), BufferDirection::DeviceToDriver) });
    }
    let dma = bed.dma_endpoint(EP).unwrap();
    for &a in &addrs {
        dma.write(a, b"from the device").unwrap();
    }
    for (b, &a) in bufs.iter_mut().zip(&addrs).take(2) {
        // SAFETY: the address `share` returned for `b`.
        unsafe {
            H::unshare(
                a,
                NonNull::from(&mut b[..]),
                BufferDirection::DeviceToDriver,
            )
        };
    }
    assert_eq!(&bufs[0][..15], b"from the device", "copied back at unshare");
    assert_eq!(HAL_DMA.lock().as_ref().unwrap().pending_unmaps(), 2);
    assert!(
        dma.write(addrs[0], b"x").is_ok(),
        "reachable until the flush"
    );
    // SAFETY: as above.
    unsafe {
        H::unshare(
            addrs[2],
            NonNull::from(&mut bufs[2][..]),
            BufferDirection::DeviceToDriver,
        )
    };
    assert!(addrs.iter().all(|&a| dma.write(a, b"x").is_err()));
    // dma_alloc/dma_dealloc: UNMAPped at once, nothing queued.
    let (iova, vaddr) = H::dma_alloc(1, BufferDirection::Both);
    assert_ne!(iova, 0);
    dma.write(iova, b"ring").unwrap();
    // SAFETY: what `dma_alloc` returned.
    assert_eq!(unsafe { H::dma_dealloc(iova, vaddr, 1) }, 0);
    assert!(dma.write(iova, b"ring").is_err());
    let space = HAL_DMA.lock().take().unwrap();
    assert_eq!((space.pending_unmaps(), space.live_mappings()), (0, 0));
    assert_eq!((space.failures, space.leaked), (0, 0));
    assert_eq!(space.flush_stats().flushes, 1);
    HAL_IOMMU.lock().take();
}

fn requests(drv: &Iommu) -> u64 {
    drv.request_stats().requests
}

#[test]
fn a_buffer_on_pending_granules_revives_their_mapping_without_a_map() {
    let bed = bed_with(FaultPlan::new());
    let (mut drv, mut space) = setup(&bed, lazy(8, u64::MAX, &FROZEN));
    let rw = MapFlags::READ | MapFlags::WRITE;
    let phys = bed.alloc(2 * G as usize).unwrap();
    let a = space.map_buffer(&mut drv, phys + 0x10, 0x100, rw).unwrap();
    space.unmap_buffer(&mut drv, a).unwrap();
    assert_eq!(space.pending_unmaps(), 1);
    let (maps, reqs, notes) = (space.maps, requests(&drv), notifications(&drv));
    // Another buffer in the same granule, same permissions: the pending mapping comes back.
    let b = space.map_buffer(&mut drv, phys + 0x200, 0x80, rw).unwrap();
    assert_eq!(b, a - 0x10 + 0x200, "same IOVA, the new buffer's offset");
    assert_eq!(
        (space.maps, requests(&drv), notifications(&drv)),
        (maps, reqs, notes),
        "no MAP sent"
    );
    assert_eq!(space.pending_unmaps(), 0, "taken out of the flush queue");
    assert_eq!(space.flush_stats().revived, 1);
    assert_eq!(space.live_mappings(), 1);
    let dma = bed.dma_endpoint(EP).unwrap();
    dma.write(b, b"revived").unwrap();
    let mut back = [0u8; 7];
    dma.read(b, &mut back).unwrap();
    assert_eq!(&back, b"revived");
    // Nothing pending: a flush sends nothing and the device keeps the live buffer.
    assert_eq!(space.flush(&mut drv), Ok(0));
    assert!(reachable(&bed, b));
    // Its unshare queues it again; after the flush the device has lost it.
    assert_eq!(space.unmap_buffer(&mut drv, b), Ok(phys + 0x200));
    assert_eq!(space.pending_unmaps(), 1);
    assert_eq!(space.flush(&mut drv), Ok(1));
    assert!(!reachable(&bed, b));
    assert_eq!(space.live_mappings(), 0);
    assert_eq!(space.iova_allocator().unwrap().live_allocations(), 0);
    assert_eq!((space.maps, space.unmaps, space.failures), (1, 1, 0));
}

#[test]
fn other_permissions_or_granules_get_a_new_map() {
    let bed = bed_with(FaultPlan::new());
    let (mut drv, mut space) = setup(&bed, lazy(8, u64::MAX, &FROZEN));
    let rw = MapFlags::READ | MapFlags::WRITE;
    let phys = bed.alloc(2 * G as usize).unwrap();
    let a = space.map_buffer(&mut drv, phys, G, rw).unwrap();
    space.unmap_buffer(&mut drv, a).unwrap();
    // Read-only: a new MAP at another IOVA, the pending one stays queued.
    let r = space.map_buffer(&mut drv, phys, G, MapFlags::READ).unwrap();
    assert_ne!(r, a);
    assert_eq!((space.maps, space.pending_unmaps()), (2, 1));
    let dma = bed.dma_endpoint(EP).unwrap();
    assert!(dma.write(r, b"x").is_err(), "read-only as asked");
    // Two granules (a superset of the pending one): a new MAP too.
    let two = space.map_buffer(&mut drv, phys, 2 * G, rw).unwrap();
    assert!(!overlaps(two, a) && !overlaps(two, r));
    assert_eq!((space.maps, space.pending_unmaps()), (3, 1));
    // A live (not unshared) mapping is never shared out twice: same buffer again, new MAP.
    let again = space.map_buffer(&mut drv, phys, G, MapFlags::READ).unwrap();
    assert_ne!(again, r);
    assert_eq!(space.maps, 4);
    assert_eq!(space.flush_stats().revived, 0);
    assert_eq!(space.flush(&mut drv), Ok(1));
    assert!(!reachable(&bed, a));
}

#[test]
fn strict_never_revives() {
    let bed = bed_with(FaultPlan::new());
    let mut drv = bed.driver().unwrap();
    let mut space = DmaSpace::attach_strict(&mut drv, DOMAIN, EP, &[]).unwrap();
    let rw = MapFlags::READ | MapFlags::WRITE;
    let phys = bed.alloc(G as usize).unwrap();
    for round in 1..=3u64 {
        let n = notifications(&drv);
        let a = space.map_buffer(&mut drv, phys, G, rw).unwrap();
        assert_eq!(notifications(&drv), n + 1, "one MAP per buffer");
        space.unmap_buffer(&mut drv, a).unwrap();
        assert!(!reachable(&bed, a));
        assert_eq!((space.maps, space.unmaps), (round, round));
    }
    assert_eq!(space.flush_stats(), FlushStats::default());
}

#[test]
fn the_flush_batch_leaves_out_the_revived_range() {
    let bed = bed_with(FaultPlan::new());
    let (mut drv, mut space) = setup(&bed, lazy(8, u64::MAX, &FROZEN));
    let rw = MapFlags::READ | MapFlags::WRITE;
    let phys = bed.alloc(3 * G as usize).unwrap();
    let iovas: Vec<u64> = (0..3)
        .map(|i| space.map_buffer(&mut drv, phys + i * G, G, rw).unwrap())
        .collect();
    for &i in &iovas {
        space.unmap_buffer(&mut drv, i).unwrap();
    }
    assert_eq!(space.pending_unmaps(), 3);
    // The middle granule again: revived, out of the queue.
    let b = space.map_buffer(&mut drv, phys + G, G, rw).unwrap();
    assert_eq!(b, iovas[1]);
    assert_eq!((space.maps, space.pending_unmaps()), (3, 2));
    let (reqs, notes) = (requests(&drv), notifications(&drv));
    assert_eq!(space.flush(&mut drv), Ok(2), "two UNMAPs in the batch");
    assert_eq!((requests(&drv), notifications(&drv)), (reqs + 2, notes + 1));
    assert_eq!(space.unmaps, 2);
    assert!(!reachable(&bed, iovas[0]) && !reachable(&bed, iovas[2]));
    assert!(reachable(&bed, b), "the revived buffer stays mapped");
    assert_eq!(space.live_mappings(), 1);
    space.unmap_buffer(&mut drv, b).unwrap();
    assert_eq!(space.flush(&mut drv), Ok(1));
    assert!(!reachable(&bed, b));
    assert_eq!(space.iova_allocator().unwrap().live_allocations(), 0);
}

static REV_IOMMU: Mutex<Option<Iommu>> = Mutex::new(None);
static REV_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
virtio_iommu_driver::dma_context! {
    /// The context of the `Hal` revival test.
    struct ReviveDma { inner: TestHal, iommu: REV_IOMMU, space: REV_DMA }
}

#[test]
fn the_hal_adapter_revives_a_reshared_buffer_of_the_same_direction() {
    let bed = bed_with(FaultPlan::new());
    let (drv, space) = setup(&bed, lazy(8, u64::MAX, &FROZEN));
    *REV_IOMMU.lock() = Some(drv);
    *REV_DMA.lock() = Some(space);
    type H = IommuHal<ReviveDma>;
    let reqs = || REV_IOMMU.lock().as_ref().map_or(0, requests);
    let mut buf = [0u8; 64];
    let d2d = BufferDirection::DeviceToDriver;
    // SAFETY: (every share/unshare below) `buf` lives and is untouched while shared, and
    // each unshare passes the address its share returned.
    let a = unsafe { H::share(NonNull::from(&mut buf[..]), d2d) };
    // SAFETY: as above.
    unsafe { H::unshare(a, NonNull::from(&mut buf[..]), d2d) };
    let before = reqs();
    // SAFETY: as above.
    let b = unsafe { H::share(NonNull::from(&mut buf[..]), d2d) };
    assert_eq!((b, reqs()), (a, before), "same address, no request");
    let dma = bed.dma_endpoint(EP).unwrap();
    dma.write(b, b"again").unwrap();
    // SAFETY: as above.
    unsafe { H::unshare(b, NonNull::from(&mut buf[..]), d2d) };
    assert_eq!(&buf[..5], b"again", "copied back");
    // Another direction means other permissions: a new MAP.
    let c = unsafe { H::share(NonNull::from(&mut buf[..]), BufferDirection::DriverToDevice) };
    assert_ne!(c, a);
    assert_eq!(reqs(), before + 1);
    // SAFETY: as above.
    unsafe {
        H::unshare(
            c,
            NonNull::from(&mut buf[..]),
            BufferDirection::DriverToDevice,
        )
    };
    let mut space = REV_DMA.lock().take().unwrap();
    let mut drv = REV_IOMMU.lock().take().unwrap();
    assert_eq!(space.flush_stats().revived, 1);
    assert_eq!(space.flush(&mut drv), Ok(2));
    assert!(!reachable(&bed, a) && !reachable(&bed, c));
    assert_eq!((space.live_mappings(), space.failures), (0, 0));
}

/// A clock the test sets by hand that counts its reads.
struct CountingClock {
    now: AtomicU64,
    reads: AtomicU64,
}

impl Clock for CountingClock {
    fn now_ns(&self) -> u64 {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.now.load(Ordering::SeqCst)
    }
}

#[test]
fn a_revived_share_reads_no_clock_and_the_next_unshare_applies_the_time_bound() {
    static CLOCK: CountingClock = CountingClock {
        now: AtomicU64::new(0),
        reads: AtomicU64::new(0),
    };
    let bed = bed_with(FaultPlan::new());
    let (mut drv, mut space) = setup(&bed, lazy(8, 1_000, &CLOCK));
    let rw = MapFlags::READ | MapFlags::WRITE;
    let phys = bed.alloc(2 * G as usize).unwrap();
    let a = space.map_buffer(&mut drv, phys, G, rw).unwrap();
    let b = space.map_buffer(&mut drv, phys + G, G, rw).unwrap();
    space.unmap_buffer(&mut drv, a).unwrap();
    space.unmap_buffer(&mut drv, b).unwrap();
    assert_eq!(space.pending_unmaps(), 2);
    // Past the time bound, but the share revives `a`: no clock read, no request, `b` still
    // pending (the bound is checked at the next unshare, share that MAPs, or flush_if_due).
    CLOCK.now.store(5_000, Ordering::SeqCst);
    let (reads, reqs) = (CLOCK.reads.load(Ordering::SeqCst), requests(&drv));
    assert_eq!(space.map_buffer(&mut drv, phys, G, rw), Ok(a));
    assert_eq!(
        CLOCK.reads.load(Ordering::SeqCst),
        reads,
        "a revival reads no clock"
    );
    assert_eq!(requests(&drv), reqs, "and sends nothing");
    assert_eq!(space.pending_unmaps(), 1);
    assert!(reachable(&bed, b), "b's UNMAP is still deferred");
    // The next unshare sees the age bound passed and flushes both.
    space.unmap_buffer(&mut drv, a).unwrap();
    assert!(
        CLOCK.reads.load(Ordering::SeqCst) > reads,
        "the unshare reads the clock"
    );
    assert_eq!(space.pending_unmaps(), 0);
    assert!(!reachable(&bed, a) && !reachable(&bed, b));
    assert_eq!(space.live_mappings(), 0);
}

#[test]
fn an_unshare_that_starts_the_queue_still_honours_a_full_queue_or_a_zero_time_bound() {
    let rw = MapFlags::READ | MapFlags::WRITE;
    // max_pending 1, and max_age_ns 0 with a clock that never advances: either bound is due
    // at the very unshare that starts the queue, which reads no second clock value.
    for policy in [lazy(1, u64::MAX, &FROZEN), lazy(8, 0, &FROZEN)] {
        let bed = bed_with(FaultPlan::new());
        let (mut drv, mut space) = setup(&bed, policy);
        let phys = bed.alloc(G as usize).unwrap();
        for round in 0..3 {
            // The same buffer again and again: nothing is pending at its share, so it is
            // MAPped afresh, and its UNMAP leaves at its unshare.
            let a = space.map_buffer(&mut drv, phys, G, rw).unwrap();
            assert!(reachable(&bed, a));
            space.unmap_buffer(&mut drv, a).unwrap();
            assert_eq!(space.pending_unmaps(), 0, "{policy:?} round {round}");
            assert!(!reachable(&bed, a), "{policy:?} round {round}");
        }
        assert_eq!(space.flush_stats().revived, 0);
        assert_eq!((space.maps, space.unmaps), (3, 3), "{policy:?}");
        assert_eq!(space.live_mappings(), 0);
    }
}
