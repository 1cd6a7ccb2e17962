//! The bounce granules of an isolated strict [`DmaSpace`](super::DmaSpace): a fixed pool of
//! granule-sized, granule-aligned pages allocated once from the embedder's `Hal`, owned by the
//! space, through which the sub-granule head and tail of a shared buffer are copied, so that
//! the device never reaches the bytes that share a granule with the buffer (the idea of Linux's
//! swiotlb bounce for untrusted devices; no code from it).

use crate::error::IommuError;
use alloc::vec::Vec;
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Default number of bounce granules of [`DmaSpace::isolated`](super::DmaSpace::isolated): each
/// buffer in flight needs at most 2 (its head and its tail granule), so 64 buffers.
pub const DEFAULT_BOUNCE_GRANULES: usize = 128;

/// The inner `Hal`'s `dma_dealloc`, kept to free the pool's pages on drop.
type Dealloc = unsafe fn(PhysAddr, NonNull<u8>, usize) -> i32;

/// One bounce granule: the granule-aligned granule inside one inner `dma_alloc` allocation.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Physical address of the granule (granule-aligned).
    phys: u64,
    /// Virtual address of the granule.
    vaddr: usize,
    /// The inner allocation holding it: physical and virtual address, pages.
    alloc_phys: u64,
    alloc_vaddr: usize,
    alloc_pages: usize,
}

/// A fixed pool of bounce granules. No allocation after [`BouncePool::new`]; at most
/// `capacity` granules in use at once. Sendable: addresses are kept as integers.
#[derive(Debug)]
pub(super) struct BouncePool {
    granule: u64,
    slots: Vec<Slot>,
    /// Indices of free slots (a stack; its capacity is the pool's, so pushes never allocate).
    free: Vec<u32>,
    dealloc: Dealloc,
}

impl BouncePool {
    /// Allocates `count` granules of `granule` bytes (a power of two) from `H::dma_alloc`,
    /// each aligned to the granule: `granule / PAGE_SIZE` pages when that is a whole number of
    /// pages and the allocation happens to be aligned, else enough pages to contain one aligned
    /// granule (the rest of the allocation is padding no one uses).
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] for a granule that is not a power of two or a
    /// `count` above `u32::MAX`; [`IommuError::DmaAlloc`] when `H::dma_alloc` fails (what was
    /// allocated is freed again).
    pub(super) fn new<H: Hal>(granule: u64, count: usize) -> Result<Self, IommuError> {
        if !granule.is_power_of_two() || u32::try_from(count).is_err() {
            return Err(IommuError::InvalidRange);
        }
        let g = usize::try_from(granule).map_err(|_| IommuError::InvalidRange)?;
        // Pages that always contain one aligned granule: g bytes plus up to g - PAGE_SIZE of
        // misalignment (the inner `Hal` aligns to PAGE_SIZE).
        let pages = if g <= PAGE_SIZE {
            1
        } else {
            g.checked_mul(2).ok_or(IommuError::InvalidRange)? / PAGE_SIZE - 1
        };
        let mut pool = Self {
            granule,
            slots: Vec::with_capacity(count),
            free: Vec::with_capacity(count),
            dealloc: H::dma_dealloc,
        };
        for i in 0..count {
            let (phys, vaddr) = H::dma_alloc(pages, BufferDirection::Both);
            let aligned = phys.checked_next_multiple_of(granule);
            let Some(aligned) = aligned.filter(|_| phys != 0) else {
                if phys != 0 {
                    // SAFETY: allocated just above with these values, never handed out.
                    unsafe { H::dma_dealloc(phys, vaddr, pages) };
                }
                return Err(IommuError::DmaAlloc);
            };
            let offset = aligned - phys;
            if offset.saturating_add(granule) > pages.saturating_mul(PAGE_SIZE) as u64 {
                // Not possible for page-aligned memory; refuse rather than overrun.
                // SAFETY: allocated just above with these values, never handed out.
                unsafe { H::dma_dealloc(phys, vaddr, pages) };
                return Err(IommuError::DmaAlloc);
            }
            let offset = offset as usize;
            pool.slots.push(Slot {
                phys: aligned,
                vaddr: vaddr.as_ptr() as usize + offset,
                alloc_phys: phys,
                alloc_vaddr: vaddr.as_ptr() as usize,
                alloc_pages: pages,
            });
            pool.free.push(i as u32);
        }
        Ok(pool)
    }

    /// Granules in the pool.
    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Granules in use (by live mappings, or kept by mappings whose UNMAP failed).
    pub(super) fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes a granule, zeroed (no byte of an earlier buffer reaches the device); returns its
    /// index and physical address. `None` when all are in use.
    pub(super) fn take(&mut self) -> Option<(u32, u64)> {
        let i = self.free.pop()?;
        let s = self.slots[i as usize];
        // SAFETY: `s.vaddr` is the start of a granule of `self.granule` bytes inside an
        // allocation the pool owns, not in use by anyone else (it was free).
        unsafe { core::ptr::write_bytes(s.vaddr as *mut u8, 0, self.granule as usize) };
        Some((i, s.phys))
    }

    /// Gives back granule `i` (taken by [`Self::take`]). An index not taken is ignored.
    pub(super) fn give_back(&mut self, i: u32) {
        if (i as usize) < self.slots.len() && !self.free.contains(&i) {
            // Within capacity: `free` never holds more than `slots.len()` indices.
            self.free.push(i);
        }
    }

    /// Copies `len` bytes from `src` to offset `offset` of granule `i`.
    ///
    /// # Safety
    ///
    /// `src` is valid for reads of `len` bytes; `offset + len <= granule`; `i` is taken.
    pub(super) unsafe fn copy_in(&self, i: u32, offset: u64, src: *const u8, len: usize) {
        let dst = self.slots[i as usize].vaddr + offset as usize;
        // SAFETY: the caller's guarantees; the granule is the pool's own memory, distinct from
        // any caller buffer.
        unsafe { core::ptr::copy_nonoverlapping(src, dst as *mut u8, len) };
    }

    /// Copies `len` bytes at offset `offset` of granule `i` to `dst`.
    ///
    /// # Safety
    ///
    /// `dst` is valid for writes of `len` bytes; `offset + len <= granule`; `i` is taken.
    pub(super) unsafe fn copy_out(&self, i: u32, offset: u64, dst: *mut u8, len: usize) {
        let src = self.slots[i as usize].vaddr + offset as usize;
        // SAFETY: the caller's guarantees; the granule is the pool's own memory.
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst, len) };
    }

    /// Physical ranges `(start, end)` inclusive of every granule of the pool.
    #[cfg(test)]
    pub(super) fn granules(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots
            .iter()
            .map(|s| (s.phys, s.phys + (self.granule - 1)))
    }
}

impl Drop for BouncePool {
    /// Frees the free granules' allocations. Granules still in use (by a mapping whose UNMAP
    /// failed, or a space dropped with live mappings) are leaked: the device may still reach
    /// them.
    fn drop(&mut self) {
        for &i in &self.free {
            let s = self.slots[i as usize];
            if let Some(vaddr) = NonNull::new(s.alloc_vaddr as *mut u8) {
                // SAFETY: `alloc_phys`, `alloc_vaddr` and `alloc_pages` are what the inner
                // `Hal`'s `dma_alloc` returned and was given; freed once (each free slot is in
                // `free` once), and no mapping uses it.
                unsafe { (self.dealloc)(s.alloc_phys, vaddr, s.alloc_pages) };
            }
        }
    }
}
