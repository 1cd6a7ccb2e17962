//! `virtio_drivers::Hal` for devices whose DMA is *not* translated (the virtio-iommu itself):
//! identity-mapped, cache-coherent RAM from the heap, device address = CPU physical address.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Identity DMA: buffers come from the heap (page-aligned, zeroed); the address a device uses is
/// the buffer's address. QEMU's virtio DMA is cache-coherent under TCG, so no cache maintenance.
#[derive(Debug)]
pub struct IdentityHal;

/// Layout of a `pages`-page DMA allocation, if representable.
fn dma_layout(pages: usize) -> Option<Layout> {
    let size = pages.checked_mul(PAGE_SIZE)?;
    if size == 0 {
        return None;
    }
    Layout::from_size_align(size, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory that nothing else aliases until
// `dma_dealloc`; physical = virtual under the identity map; `mmio_phys_to_virt` is the identity
// too (every MMIO region the PCI code assigns is device-mapped).
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: `layout` has a non-zero size.
        let pointer = unsafe { alloc_zeroed(layout) };
        match NonNull::new(pointer) {
            Some(pointer) => (pointer.as_ptr() as PhysAddr, pointer),
            None => {
                log::warn!("IdentityHal: DMA allocation of {pages} pages failed");
                (0, NonNull::dangling())
            }
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back what `dma_alloc` returned for this `pages`, so `vaddr`
        // was allocated by the global allocator with exactly this layout.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        debug_assert_eq!(
            crate::mmu::memory_type(paddr, size as u64),
            Some(crate::mmu::MemoryType::Device)
        );
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
