//! The global allocator: a `linked_list_allocator` heap in RAM after the image.
//!
//! The heap starts at the end of the image (`dma_region`, provided by aarch64-rt's `image.ld`,
//! 4 KiB aligned, after `.bss` and the boot stack) and extends to the end of the `/memory` region
//! holding the image, at most [`MAX_SIZE`] bytes. The devicetree blob is kept out of it.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use linked_list_allocator::LockedHeap;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

/// Upper bound of the heap size.
pub const MAX_SIZE: u64 = 256 << 20;
/// Minimum acceptable heap size.
pub const MIN_SIZE: u64 = 1 << 20;

unsafe extern "C" {
    /// First byte after the image (linker-script symbol; only its address is used).
    static dma_region: u8;
}

static HEAP_START: AtomicUsize = AtomicUsize::new(0);
/// Set by the first [`init`] call.
static INITIALISING: AtomicBool = AtomicBool::new(false);
static HEAP_END: AtomicUsize = AtomicUsize::new(0);

/// Why the heap could not be set up.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum HeapError {
    /// No `/memory` region contains the end of the image.
    NoMemoryRegion,
    /// Less than [`MIN_SIZE`] bytes of RAM available after the image.
    TooSmall {
        /// Start of the candidate region.
        start: u64,
        /// End (exclusive) of the candidate region.
        end: u64,
    },
    /// [`init`] was called twice.
    AlreadyInitialised,
}

/// First byte after the loaded image (bss and boot stack included).
pub fn image_end() -> u64 {
    (&raw const dma_region) as u64
}

/// The RAM regions of the devicetree's `memory` nodes (`device_type = "memory"`).
pub fn ram_regions<'b>(fdt: &'b fdt::Fdt<'_>) -> impl Iterator<Item = (u64, u64)> + 'b {
    fdt.all_nodes()
        .filter(|n| {
            n.property("device_type")
                .and_then(|p| p.as_str())
                .is_some_and(|t| t == "memory")
        })
        .filter_map(|n| n.reg())
        .flatten()
        .filter_map(|r| Some((r.starting_address as u64, r.size? as u64)))
}

/// Sets up the heap from the devicetree. Returns `(start, end)` of the heap.
pub fn init(dtb: &[u8]) -> Result<(u64, u64), HeapError> {
    if INITIALISING.swap(true, Ordering::SeqCst) {
        return Err(HeapError::AlreadyInitialised);
    }
    let fdt = fdt::Fdt::new(dtb).map_err(|_| HeapError::NoMemoryRegion)?;
    let image_end = image_end();
    let (ram_start, ram_size) = ram_regions(&fdt)
        .find(|&(start, size)| start <= image_end && image_end < start.saturating_add(size))
        .ok_or(HeapError::NoMemoryRegion)?;
    let ram_end = ram_start
        .saturating_add(ram_size)
        .min(crate::mmu::NORMAL_END);
    let mut start = image_end;
    let mut end = ram_end.min(start.saturating_add(MAX_SIZE));
    // Keep the devicetree blob out of the heap: use the larger part on either side of it.
    let dtb_start = dtb.as_ptr() as u64;
    let dtb_end = dtb_start + dtb.len() as u64;
    if dtb_start < end && dtb_end > start {
        let below = dtb_start.saturating_sub(start);
        let above_start = dtb_end.next_multiple_of(4096);
        let above = ram_end.saturating_sub(above_start).min(MAX_SIZE);
        if above >= below {
            start = above_start;
            end = above_start + above;
        } else {
            end = dtb_start;
        }
    }
    end &= !0xfff;
    if end <= start || end - start < MIN_SIZE {
        return Err(HeapError::TooSmall { start, end });
    }
    // SAFETY: `[start, end)` is RAM from the devicetree, mapped Normal by the identity map, after
    // the image (so no code, data, bss or stack is there), excluding the devicetree blob, and not
    // used by anything else; the allocator is initialised only once (`INITIALISING` above).
    unsafe {
        ALLOCATOR
            .lock()
            .init(start as *mut u8, (end - start) as usize);
    }
    HEAP_START.store(start as usize, Ordering::SeqCst);
    HEAP_END.store(end as usize, Ordering::SeqCst);
    Ok((start, end))
}

/// `(start, end)` of the heap, once initialised.
pub fn region() -> Option<(u64, u64)> {
    match HEAP_END.load(Ordering::SeqCst) {
        0 => None,
        end => Some((HEAP_START.load(Ordering::SeqCst) as u64, end as u64)),
    }
}

/// Bytes currently free in the heap.
pub fn free_bytes() -> usize {
    ALLOCATOR.lock().free()
}
