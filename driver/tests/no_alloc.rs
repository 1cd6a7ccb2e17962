//! No heap allocation on the map/unmap path, proven with a counting `#[global_allocator]`.
//!
//! Counted per thread (the test harness allocates on other threads), after the set-up, which
//! may allocate (node pools, the driver's DMA buffers):
//!
//! - the real `VirtIOIommu` (on the fake device of `common`, whose request processing does not
//!   allocate either): synchronous `map`/`unmap`, a `Batch` of 256 MAPs and 256 UNMAPs, and
//!   `IommuMapper::submit_batch` with caller arrays;
//! - the `Hal` adapter `IommuHal` on that driver, strict mode: `share`/`unshare` of buffers in
//!   every direction, `dma_alloc`/`dma_dealloc` (the inner `Hal`'s own allocation of the memory
//!   is excluded: it is the embedder's, not the adapter's);
//! - `IommuHal` in isolated strict mode (bounce granules for the unaligned head and tail):
//!   `share`/`unshare`;
//! - `IommuHal` in identity mode (bypass and mapped): `share`/`unshare`;
//! - `IovaAllocator` alloc/free churn and `DmaSpace::map_buffer`/`unmap_buffer`;
//! - a lazy `DmaSpace` (`UnmapPolicy::Lazy`) on the real driver: deferred UNMAPs, flushes by the
//!   size and the time bound and explicit ones (the flush queue is allocated by
//!   `set_unmap_policy`, before counting), and revived pending mappings;
//! - the interrupt side: `submit_nb_many`, `handle_interrupt` (ack, completions, fault
//!   reports), `poll_nb`, `poll_event`, `discard_nb`, `poll_probe_nb` — what an interrupt
//!   handler may call — and `submit_probe_nb`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr::NonNull;

use common::{FakeDevice, FakeHal, FakeTransport};
use virtio_drivers::{BufferDirection, Hal};
use virtio_iommu_driver::dma::spin::Mutex;
use virtio_iommu_driver::dma::{
    DmaMode, DmaSpace, IommuHal, IommuMapper, IovaAllocator, PhysRange,
};
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{BatchOp, IommuError, VirtIOIommu};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    if !common::counting_paused() {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's guarantees, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's guarantees, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's guarantees, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's guarantees, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations made by this thread while running `f`.
fn allocations<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let before = ALLOCATIONS.with(Cell::get);
    let r = f();
    (ALLOCATIONS.with(Cell::get) - before, r)
}

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
const G: u64 = 0x1000;

type Driver = VirtIOIommu<FakeHal, FakeTransport>;

#[test]
fn the_counter_counts() {
    let (n, v) = allocations(|| vec![1u8; 10]);
    assert_eq!((n, v.len()), (1, 10));
}

#[test]
fn driver_map_unmap_and_batches_do_not_allocate() {
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    drv.attach(1, 16).unwrap();
    let ops: [BatchOp; 64] = std::array::from_fn(|k| BatchOp::Map {
        domain: 1,
        virt_start: G * (k as u64 + 1),
        virt_end: G * (k as u64 + 2) - 1,
        phys_start: 0x4000_0000,
        flags: RW,
    });
    let unmaps: [BatchOp; 64] = std::array::from_fn(|k| BatchOp::Unmap {
        domain: 1,
        virt_start: G * (k as u64 + 1),
        virt_end: G * (k as u64 + 2) - 1,
    });
    let mut results = [Ok(()); 64];
    let (n, ()) = allocations(|| {
        for k in 0..1000u64 {
            let at = G * (k % 512 + 1);
            drv.map(1, at, at + G - 1, 0x4000_0000, RW).unwrap();
            drv.unmap(1, at, at + G - 1).unwrap();
        }
        for _ in 0..4 {
            let mut b = drv.batch();
            for k in 0..256u64 {
                b.map(1, G * (k + 1), G * (k + 2) - 1, 0x4000_0000, RW)
                    .unwrap();
            }
            assert_eq!(b.submit().unwrap().failures(), 0);
            let mut b = drv.batch();
            for k in 0..256u64 {
                b.unmap(1, G * (k + 1), G * (k + 2) - 1).unwrap();
            }
            assert_eq!(b.submit().unwrap().failures(), 0);
        }
        IommuMapper::submit_batch(&mut drv, &ops, &mut results).unwrap();
        IommuMapper::submit_batch(&mut drv, &unmaps, &mut results).unwrap();
        // Errors too: refused before sending, and by the device.
        assert!(drv.map(1, 1, G, 0, RW).is_err());
        assert!(drv.unmap(9, G, 2 * G - 1).is_err());
    });
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(n, 0, "heap allocations on the driver's map/unmap path");
    assert!(dev.state().mappings.is_empty());
}

// --- The Hal adapter on the real driver. ---

static IOMMU: Mutex<Option<Driver>> = Mutex::new(None);
static STRICT: Mutex<Option<DmaSpace>> = Mutex::new(None);
static ISOLATED: Mutex<Option<DmaSpace>> = Mutex::new(None);
static BYPASS: Mutex<Option<DmaSpace>> = Mutex::new(None);
static MAPPED: Mutex<Option<DmaSpace>> = Mutex::new(None);

virtio_iommu_driver::dma_context! {
    struct StrictCtx { inner: FakeHal, iommu: IOMMU, space: STRICT }
}
virtio_iommu_driver::dma_context! {
    struct IsolatedCtx { inner: FakeHal, iommu: IOMMU, space: ISOLATED }
}
virtio_iommu_driver::dma_context! {
    struct BypassCtx { inner: FakeHal, iommu: IOMMU, space: BYPASS }
}
virtio_iommu_driver::dma_context! {
    struct MappedCtx { inner: FakeHal, iommu: IOMMU, space: MAPPED }
}

/// `share` then `unshare` of `buf` in every direction through `IommuHal<C>`; returns the
/// device addresses.
fn share_unshare<C: virtio_iommu_driver::dma::DmaContext>(buf: &mut [u8]) -> [u64; 3] {
    let ptr = NonNull::from(&mut *buf);
    [
        BufferDirection::DriverToDevice,
        BufferDirection::DeviceToDriver,
        BufferDirection::Both,
    ]
    .map(|dir| {
        // SAFETY: `buf` is valid and not touched until `unshare`.
        let addr = unsafe { IommuHal::<C>::share(ptr, dir) };
        assert_ne!(addr, 0, "share failed");
        // SAFETY: the same buffer and the address `share` returned for it.
        unsafe { IommuHal::<C>::unshare(addr, ptr, dir) };
        addr
    })
}

#[test]
fn hal_adapter_share_unshare_and_dma_alloc_do_not_allocate() {
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    let strict = DmaSpace::attach_strict(&mut drv, 1, 8, &[]).unwrap();
    let isolated = DmaSpace::attach_isolated::<FakeHal, _, _>(&mut drv, 4, 32, &[], 8).unwrap();
    assert_eq!(isolated.mode(), DmaMode::IsolatedStrict);
    let unbacked = PhysRange {
        start: 1 << 63,
        end: u64::MAX,
    };
    let bypass = DmaSpace::attach_identity(&mut drv, 2, 16, &[], &[], Some(unbacked)).unwrap();
    assert_eq!(bypass.mode(), DmaMode::IdentityBypass);
    let mut buf = vec![0u8; 3 * 4096 + 100];
    let ram = [PhysRange::from_start_size(buf.as_ptr() as u64 & !0xfff, 0x10_0000).unwrap()];
    drv.attach(3, 24).unwrap();
    let mapped = DmaSpace::identity_mapped(&mut drv, 3, &ram, &[]).unwrap();
    assert_eq!(mapped.maps, 1);
    *IOMMU.lock() = Some(drv);
    *STRICT.lock() = Some(strict);
    *ISOLATED.lock() = Some(isolated);
    *BYPASS.lock() = Some(bypass);
    *MAPPED.lock() = Some(mapped);
    let mapping_count = dev.state().mappings.len();

    let (n, ()) = allocations(|| {
        for _ in 0..300 {
            let addrs = share_unshare::<StrictCtx>(&mut buf[5..]);
            assert!(addrs.iter().all(|&a| a != buf.as_ptr() as u64 + 5));
            let (iova, vaddr) = IommuHal::<StrictCtx>::dma_alloc(3, BufferDirection::Both);
            assert_ne!(iova, 0);
            // SAFETY: what `dma_alloc` returned, not used afterwards.
            assert_eq!(
                unsafe { IommuHal::<StrictCtx>::dma_dealloc(iova, vaddr, 3) },
                0
            );
            share_unshare::<IsolatedCtx>(&mut buf[5..]);
            for addr in share_unshare::<BypassCtx>(&mut buf[7..]) {
                assert_eq!(addr, buf.as_ptr() as u64 + 7);
            }
            for addr in share_unshare::<MappedCtx>(&mut buf[9..]) {
                assert_eq!(addr, buf.as_ptr() as u64 + 9);
            }
        }
    });
    assert_eq!(
        n, 0,
        "heap allocations in share/unshare/dma_alloc/dma_dealloc"
    );
    assert_eq!(
        dev.state().mappings.len(),
        mapping_count,
        "all unmapped again"
    );
    let strict = STRICT.lock().take().unwrap();
    assert_eq!(
        (strict.maps, strict.unmaps, strict.failures),
        (1200, 1200, 0)
    );
    let isolated = ISOLATED.lock().take().unwrap();
    assert_eq!(
        (
            isolated.failures,
            isolated.leaked,
            isolated.bounce_granules()
        ),
        (0, 0, (0, 8))
    );
    for space in [BYPASS.lock().take(), MAPPED.lock().take()] {
        let space = space.unwrap();
        assert_eq!(
            (space.unmaps, space.failures),
            (0, 0),
            "no request per buffer"
        );
    }
}

/// A mapper that accepts everything (for the allocator-level checks).
struct Accept;

impl IommuMapper for Accept {
    fn granule(&self) -> u64 {
        G
    }
    fn map(&mut self, _: u32, _: u64, _: u64, _: u64, _: MapFlags) -> Result<(), IommuError> {
        Ok(())
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), IommuError> {
        Ok(())
    }
}

#[test]
fn allocator_and_dma_space_do_not_allocate() {
    let mut a = IovaAllocator::with_capacity(0, u64::MAX, G, 4096).unwrap();
    a.reserve(0x0802_0000, 0x0802_0fff);
    let mut space =
        DmaSpace::strict(1, IovaAllocator::new(0, 0xffff_ffff, G).unwrap(), 512).unwrap();
    let mut live = [0u64; 300];
    let (n, ()) = allocations(|| {
        for round in 0..20u64 {
            for (k, slot) in live.iter_mut().enumerate() {
                *slot = a.alloc(G * (1 + (k as u64 + round) % 7)).unwrap();
            }
            for (k, &at) in live.iter().enumerate().rev() {
                if k as u64 % 2 == round % 2 {
                    a.free(at, G * (1 + (k as u64 + round) % 7)).unwrap();
                }
            }
            for (k, &at) in live.iter().enumerate() {
                if k as u64 % 2 != round % 2 {
                    a.free(at, G * (1 + (k as u64 + round) % 7)).unwrap();
                }
            }
            for (k, slot) in live.iter_mut().enumerate() {
                *slot = space
                    .map_buffer(&mut Accept, 0x4000_0000 + 0x123 * k as u64, 0x1800, RW)
                    .unwrap();
            }
            for &at in &live {
                space.unmap_buffer(&mut Accept, at).unwrap();
            }
        }
        assert_eq!(space.unmap_all(&mut Accept).unwrap(), 0);
    });
    assert_eq!(n, 0);
    assert_eq!(a.free_ranges(), 2);
    assert_eq!(space.live_mappings(), 0);
}

/// A clock that advances 1 µs per read.
struct Ticking(std::sync::atomic::AtomicU64);

impl virtio_iommu_driver::dma::Clock for Ticking {
    fn now_ns(&self) -> u64 {
        self.0
            .fetch_add(1_000, std::sync::atomic::Ordering::Relaxed)
    }
}

#[test]
fn lazy_unmapping_and_its_flushes_do_not_allocate() {
    static CLOCK: Ticking = Ticking(std::sync::atomic::AtomicU64::new(0));
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &[]).unwrap();
    space
        .set_unmap_policy(virtio_iommu_driver::dma::UnmapPolicy::Lazy {
            max_pending: 16,
            max_age_ns: 20_000,
            clock: &CLOCK,
        })
        .unwrap();
    let mut live = [0u64; 24];
    let (n, ()) = allocations(|| {
        for round in 0..50u64 {
            for (k, slot) in live.iter_mut().enumerate() {
                *slot = space
                    .map_buffer(
                        &mut drv,
                        0x4000_0000 + 0x1000 * (k as u64 + round),
                        0x800,
                        RW,
                    )
                    .unwrap();
            }
            for &at in &live {
                space.unmap_buffer(&mut drv, at).unwrap();
            }
            if round % 7 == 0 {
                space.flush(&mut drv).unwrap();
            }
        }
        space.flush(&mut drv).unwrap();
    });
    assert_eq!(n, 0, "heap allocations on the lazy path");
    let s = space.flush_stats();
    assert!(s.by_size > 0 && s.by_age > 0, "{s:?}");
    assert_eq!((space.maps, space.unmaps, space.failures), (1200, 1200, 0));
    assert_eq!(space.live_mappings(), 0);
}

/// A clock that stays at 0: only the size bound flushes.
struct Still;

impl virtio_iommu_driver::dma::Clock for Still {
    fn now_ns(&self) -> u64 {
        0
    }
}

#[test]
fn reviving_pending_mappings_does_not_allocate() {
    static CLOCK: Still = Still;
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    let mut space = DmaSpace::attach_strict(&mut drv, 1, 8, &[]).unwrap();
    space
        .set_unmap_policy(virtio_iommu_driver::dma::UnmapPolicy::Lazy {
            max_pending: 8,
            max_age_ns: u64::MAX,
            clock: &CLOCK,
        })
        .unwrap();
    // A virtio-blk-like request: header, data, status, shared again and again.
    let bufs = [
        (0x4000_0010u64, 16u64, MapFlags::READ),
        (0x4000_1000, 0x1_0000, MapFlags::WRITE),
        (0x4000_0100, 1, MapFlags::WRITE),
    ];
    let mut at = [0u64; 3];
    let (n, ()) = allocations(|| {
        for _ in 0..100 {
            for (slot, &(p, len, f)) in at.iter_mut().zip(&bufs) {
                *slot = space.map_buffer(&mut drv, p, len, f).unwrap();
            }
            for &a in &at {
                space.unmap_buffer(&mut drv, a).unwrap();
            }
        }
        space.flush(&mut drv).unwrap();
    });
    assert_eq!(n, 0, "heap allocations while reviving");
    assert_eq!(space.flush_stats().revived, 297);
    assert_eq!((space.maps, space.unmaps, space.failures), (3, 3, 0));
    assert_eq!(space.live_mappings(), 0);
}

#[test]
fn the_interrupt_side_allocates_nothing() {
    let dev = FakeDevice::with_probe(512);
    let mut drv = dev.driver();
    drv.attach(1, 16).unwrap();
    drv.enable_interrupts();
    let reqs: Vec<virtio_iommu_driver::NbRequest> = (0..8u64)
        .map(|i| {
            virtio_iommu_driver::NbRequest::Op(BatchOp::Map {
                domain: 1,
                virt_start: (i + 1) << 12,
                virt_end: ((i + 2) << 12) - 1,
                phys_start: 0x10_0000,
                flags: RW,
            })
        })
        .collect();
    let mut tokens = [None; 8];
    // A well-formed fault report (reason UNKNOWN, endpoint 0) waiting on eventq.
    assert!(dev.push_event(&[0u8; 24], 24).is_some());
    let (n, ()) = allocations(|| {
        drv.submit_nb_many(&reqs, &mut tokens).unwrap();
        let mut faults = 0;
        let r = drv.handle_interrupt(|_| faults += 1).unwrap();
        assert_eq!((r.completed, faults), (8, 1));
        for t in &tokens {
            assert_eq!(drv.poll_nb(t.as_ref().unwrap()), Some(Ok(())));
        }
        let t = drv
            .submit_nb(virtio_iommu_driver::NbRequest::Detach {
                domain: 1,
                endpoint: 16,
            })
            .unwrap();
        assert!(drv.discard_nb(t));
        assert_eq!(drv.poll_event().unwrap(), None);
        let p = drv.submit_probe_nb(16).unwrap();
        let r = drv.handle_interrupt(|_| {}).unwrap();
        assert_eq!(r.completed, 2, "the discarded DETACH and the PROBE");
        let mut regions = 0;
        assert_eq!(drv.poll_probe_nb(&p, |_| regions += 1), Some(Ok(())));
        assert_eq!(regions, 1);
    });
    assert_eq!(n, 0, "the interrupt side allocated {n} times");
}
