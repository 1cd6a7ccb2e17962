//! Heap held per mapping (README "State": about 43 bytes per mapping; `MappingTable::insert`:
//! MAPs in increasing or decreasing IOVA order leave leaves three quarters full; UNMAP merges
//! small leaves, which bounds the number of leaves). Measured with a counting allocator that
//! counts the live bytes of the calling thread only, so other test threads do not disturb it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use common::{attach, map, unmap, RW};
use virtio_iommu_device::{DeviceConfig, IommuState};
use virtio_iommu_driver::wire::Status;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn add(n: isize) {
    // `try_with`: nothing is counted while the thread-local is being destroyed.
    let _ = LIVE.try_with(|l| l.set(l.get() + n));
}

// SAFETY: every call is forwarded to the system allocator with the same arguments; the
// bookkeeping touches only a const-initialised thread-local `Cell` (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.with(Cell::get)
}

const N: u64 = 24_000;
const PAGE: u64 = 0x1000;

fn state() -> IommuState {
    let config = DeviceConfig::builder()
        .endpoint(1)
        .max_mappings(1 << 20)
        .build()
        .unwrap();
    let mut s = IommuState::new(Arc::new(config));
    s.set_negotiated(s.config().offered());
    assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
    s
}

fn map_page(s: &mut IommuState, n: u64) {
    let a = n * PAGE;
    assert_eq!(s.map(&map(1, a, a + PAGE - 1, a, RW)), Status::Ok);
}

/// Live heap bytes per mapping after `fill` maps into a fresh state.
fn bytes_per_mapping(fill: impl FnOnce(&mut IommuState)) -> f64 {
    let mut s = state();
    let before = live();
    fill(&mut s);
    let per = (live() - before) as f64 / s.mapping_count() as f64;
    drop(s);
    per
}

#[test]
fn maps_in_increasing_or_decreasing_order_leave_leaves_three_quarters_full() {
    let up = bytes_per_mapping(|s| (0..N).for_each(|n| map_page(s, n)));
    let down = bytes_per_mapping(|s| (0..N).rev().for_each(|n| map_page(s, n)));
    // Three-quarter-full leaves: 8 key bytes + 24 mapping bytes per mapping, divided by 3/4,
    // plus the leaf index: 43 bytes (README); half-full leaves would need over 60.
    assert!(up <= 48.0, "increasing: {up:.1} bytes per mapping");
    assert!(down <= 48.0, "decreasing: {down:.1} bytes per mapping");
}

#[test]
fn unmap_merges_small_leaves_so_memory_follows_the_mappings_left() {
    let mut s = state();
    let before = live();
    (0..N).for_each(|n| map_page(&mut s, n));
    let full = live() - before;
    // Keep one page in 16: each UNMAP removes the 15 pages after a kept one.
    for k in 0..N / 16 {
        let a = (k * 16 + 1) * PAGE;
        assert_eq!(s.unmap(&unmap(1, a, a + 15 * PAGE - 1)), Status::Ok);
    }
    assert_eq!(s.mapping_count() as u64, N / 16);
    let per = (live() - before) as f64 / s.mapping_count() as f64;
    // Without merging every leaf would stay allocated for its 6 remaining mappings (over 600
    // bytes per mapping); merged leaves hold several times more.
    assert!(per <= 200.0, "{per:.1} bytes per mapping left");
    assert_eq!(s.unmap(&unmap(1, 0, u64::MAX >> 16)), Status::Ok);
    assert_eq!(s.mapping_count(), 0);
    // Removing everything frees the leaves (what is left is vector capacity, not leaves).
    let left = live() - before;
    assert!(left * 100 <= full, "{left} of {full} bytes left");
}
