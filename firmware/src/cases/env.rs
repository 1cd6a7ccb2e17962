//! Shared state of the cases: the virtio-iommu driver, the DMA state of the virtio-blk device
//! behind it, and helpers (granule-aligned DMA pages, fresh domain IDs, fault draining).

use alloc::alloc::{alloc_zeroed, dealloc};
use alloc::vec::Vec;
use core::alloc::Layout;
use spin::Mutex;
use virtio_iommu_driver::dma::DmaSpace;
use virtio_iommu_driver::{FaultEvent, IommuError, VirtIOIommu};

use crate::hal::IdentityHal;
use crate::iommu_dev::IommuTransport;

/// The virtio-iommu driver, over virtio-pci or virtio-mmio: its own DMA is not translated (a
/// PCI IOMMU's requester ID is outside `iommu-map`; a virtio-mmio one is no PCI requester), so
/// its queues use [`IdentityHal`].
pub type Iommu = VirtIOIommu<IdentityHal, IommuTransport>;

/// The driver, shared by the cases and by [`BlkDma`].
pub static IOMMU: Mutex<Option<Iommu>> = Mutex::new(None);
/// DMA state of the virtio-blk device (its domain, IOVA allocator and live mappings).
pub static BLK_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);

virtio_iommu_driver::dma_context! {
    /// DMA context of the virtio-blk device: `IommuHal<BlkDma>` maps its buffers in
    /// [`BLK_DMA`]'s domain through [`IOMMU`].
    pub struct BlkDma { inner: IdentityHal, iommu: IOMMU, space: BLK_DMA }
}

/// Runs `f` on the driver. Errors with [`IommuError::Broken`] if it was never set up.
pub fn with_iommu<R>(f: impl FnOnce(&mut Iommu) -> Result<R, IommuError>) -> Result<R, IommuError> {
    match IOMMU.lock().as_mut() {
        Some(iommu) => f(iommu),
        None => Err(IommuError::Broken),
    }
}

/// Takes every fault report currently in the event queue.
pub fn drain_faults() -> Result<Vec<FaultEvent>, IommuError> {
    with_iommu(|iommu| {
        let mut events = Vec::new();
        // Bounded: each poll consumes a used buffer; the device cannot produce more than the
        // ring holds between two polls, but cap anyway.
        for _ in 0..100_000 {
            match iommu.poll_event()? {
                Some(e) => events.push(e),
                None => break,
            }
        }
        Ok(events)
    })
}

/// A zeroed, granule-aligned DMA buffer of `len` bytes (rounded up to the granule), freed on
/// drop. Physical = virtual (identity map).
pub struct DmaPage {
    ptr: *mut u8,
    layout: Layout,
}

impl DmaPage {
    /// Allocates; `None` when the heap is exhausted or the granule is not a power of two.
    pub fn new(len: u64, granule: u64) -> Option<Self> {
        let size = usize::try_from(len.max(1).checked_next_multiple_of(granule)?).ok()?;
        let layout = Layout::from_size_align(size, usize::try_from(granule).ok()?).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Self { ptr, layout })
    }

    /// Physical address of the first byte.
    pub fn phys(&self) -> u64 {
        self.ptr as u64
    }

    /// Reads the contents (volatile: a device writes them behind the compiler's back).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            assert!(offset + i < self.layout.size());
            // SAFETY: in bounds of our allocation.
            *b = unsafe { core::ptr::read_volatile(self.ptr.add(offset + i)) };
        }
    }

    /// Writes `data` at `offset` (volatile).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            assert!(offset + i < self.layout.size());
            // SAFETY: in bounds of our allocation.
            unsafe { core::ptr::write_volatile(self.ptr.add(offset + i), b) };
        }
    }

    /// Fills the whole buffer with `byte`.
    pub fn fill(&mut self, byte: u8) {
        for i in 0..self.layout.size() {
            // SAFETY: in bounds of our allocation.
            unsafe { core::ptr::write_volatile(self.ptr.add(i), byte) };
        }
    }
}

impl Drop for DmaPage {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Hands out domain IDs inside `domain_range`, never twice: QEMU 10.0 keeps domains across a
/// virtio reset, so cases must not reuse an ID.
pub struct Domains {
    next: u64,
    end: u64,
}

impl Domains {
    /// IDs from `start..=end` (inclusive).
    pub fn new(start: u32, end: u32) -> Self {
        Self {
            next: u64::from(start),
            end: u64::from(end),
        }
    }

    /// A fresh domain ID.
    pub fn fresh(&mut self) -> Option<u32> {
        if self.next > self.end {
            return None;
        }
        let d = self.next as u32;
        self.next += 1;
        Some(d)
    }
}

/// A pattern that depends on `seed` and the byte index, so misplaced data is detected.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Monotonic time in nanoseconds from the generic timer (for the driver's wait budget).
pub fn now_ns() -> u64 {
    crate::timer::ticks_to_us(crate::timer::now_ticks()).saturating_mul(1000)
}
