//! Heap bytes per mapping at 1K and 1M mappings (not a Valgrind benchmark: a counting global
//! allocator). Prints, for each size, the bytes requested from the allocator and still live once
//! the mappings exist, divided by the number of mappings, and the peak while building; also the
//! same after 25% of the mappings were removed by scattered UNMAPs.
//!
//! Run: `cargo bench -p virtio-iommu-device --bench memory`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use virtio_iommu_device::Mapping;
use virtio_iommu_driver::wire::{MapFlags, Status};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn measure(n: u64) {
    let empty = state_with(0);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut s = state_with(n);
    let live = LIVE.load(Ordering::Relaxed) - base;
    let peak = PEAK.load(Ordering::Relaxed) - base;
    // Remove every fourth mapping, in a scattered order.
    let mut removed = 0;
    let mut i = n / 3;
    let stride = ((n / 4) * 0x9e37) | 1;
    for _ in 0..n / 4 {
        assert_eq!(s.unmap(&req_unmap(2 * (i & (n - 1)))), Status::Ok);
        removed += 1;
        i = i.wrapping_add(stride);
    }
    let left = n - removed;
    let live_after = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "{n:>8} mappings: {:>6.1} bytes/mapping live, {:>6.1} peak while mapping; \
         after unmapping 25%: {:>6.1} bytes/mapping ({left} left)",
        live as f64 / n as f64,
        peak as f64 / n as f64,
        live_after as f64 / left as f64,
    );
    drop(s);
    drop(empty);
}

/// The same mappings MAPped in a random order (leaves split in halves as they fill).
fn measure_scattered(n: u64) {
    let config = std::sync::Arc::new(config(n));
    let mut s = virtio_iommu_device::IommuState::new(config.clone());
    s.set_negotiated(config.offered());
    assert_eq!(s.attach(&req_attach()), Status::Ok);
    // A pseudo-random permutation of the slots (Fisher-Yates with the fixed `Rng`).
    let mut order: Vec<u64> = (0..n).collect();
    let mut rng = Rng::new(42);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let base = LIVE.load(Ordering::Relaxed);
    for &i in &order {
        assert_eq!(s.map(&req_map(2 * i)), Status::Ok);
    }
    let live = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "{n:>8} mappings MAPped in a random order: {:>6.1} bytes/mapping",
        live as f64 / n as f64
    );
    drop(s);
}

/// The same mappings in a `BTreeMap<u64, Mapping>` (the structure the state used before its
/// mapping table), for comparison.
fn measure_btreemap(n: u64) {
    let base = LIVE.load(Ordering::Relaxed);
    let mut map = BTreeMap::new();
    for i in 0..n {
        let iova = slot_iova(2 * i);
        map.insert(
            iova,
            Mapping {
                virt_end: iova + PAGE - 1,
                phys_start: slot_phys(2 * i),
                flags: MapFlags::READ | MapFlags::WRITE,
            },
        );
    }
    let live = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "{n:>8} mappings in a BTreeMap<u64, Mapping> (for comparison): {:>6.1} bytes/mapping",
        live as f64 / n as f64
    );
    drop(map);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass other flags: only run
    // when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for n in [N_1K, N_1M] {
        measure(n);
    }
    for n in [N_1K, N_1M] {
        measure_scattered(n);
    }
    for n in [N_1K, N_1M] {
        measure_btreemap(n);
    }
}
