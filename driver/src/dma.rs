//! DMA glue: run virtio-drivers device drivers (`VirtIOBlk`, …) behind a virtio-iommu.
//!
//! - [`AccessPlatform`] wraps a device's `Transport` so that it negotiates
//!   `VIRTIO_F_ACCESS_PLATFORM` (bit 33) when offered. virtio-drivers' device drivers do not ask
//!   for it, and QEMU refuses FEATURES_OK to a device with `iommu_platform=on` without it.
//! - [`IommuHal`] is a `Hal` whose `dma_alloc` and `share` hand out IOVAs — never equal to the
//!   physical address by construction, never 0 — and MAP them in the device's domain through
//!   the virtio-iommu driver; `dma_dealloc` and `unshare` UNMAP them and free the IOVAs.
//!
//! `Hal` methods take no `self`, so the state lives in the embedder's statics, reached through
//! [`DmaContext::with`]: typically a `spin::Mutex` around the [`VirtIOIommu`] shared by all
//! devices, and one around each device's [`DmaSpace`]. `with` must not be called while the
//! caller already holds those locks (do not hold the IOMMU lock across a block-device call).

use crate::device::VirtIOIommu;
use crate::error::IommuError;
use crate::wire::{Features, MapFlags};
use alloc::collections::BTreeMap;
use core::marker::PhantomData;
use core::ptr::NonNull;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A `Transport` wrapper that adds `VIRTIO_F_ACCESS_PLATFORM` to the driver features whenever
/// the device offers it (virtio §6.1). Everything else is passed through unchanged.
pub struct AccessPlatform<T: Transport> {
    inner: T,
    offered: u64,
}

impl<T: Transport> AccessPlatform<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self { inner, offered: 0 }
    }

    /// The wrapped transport.
    pub fn inner(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: Transport> Transport for AccessPlatform<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.offered = self.inner.read_device_features();
        self.offered
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        let extra = self.offered & Features::ACCESS_PLATFORM.bits();
        self.inner.write_driver_features(driver_features | extra);
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

/// What [`IommuHal`] needs from the virtio-iommu driver: MAP and UNMAP in one domain, and the
/// granule. Object-safe so that statics can hold any `VirtIOIommu<H, T>`.
pub trait IommuMapper {
    /// Granule in bytes (lowest set bit of `page_size_mask`).
    fn granule(&self) -> u64;
    /// MAP `virt_start..=virt_end` (inclusive IOVAs) to `phys_start`; see [`VirtIOIommu::map`].
    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Result<(), IommuError>;
    /// UNMAP `virt_start..=virt_end` (inclusive IOVAs); see [`VirtIOIommu::unmap`].
    fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuError>;
}

impl<H: Hal, T: Transport> IommuMapper for VirtIOIommu<H, T> {
    fn granule(&self) -> u64 {
        self.config().granule
    }
    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Result<(), IommuError> {
        VirtIOIommu::map(self, domain, virt_start, virt_end, phys_start, flags)
    }
    fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuError> {
        VirtIOIommu::unmap(self, domain, virt_start, virt_end)
    }
}

/// A first-fit IOVA allocator over a set of free, granule-aligned ranges (inclusive ends).
///
/// Allocation walks the free ranges (O(number of free ranges)); freeing merges neighbours in
/// O(log n). IOVA 0 is never handed out (virtio-drivers reads DMA address 0 as failure).
#[derive(Clone, Debug)]
pub struct IovaAllocator {
    /// Free ranges: start → end (inclusive).
    free: BTreeMap<u64, u64>,
    granule: u64,
}

impl IovaAllocator {
    /// An allocator over `start..=end` (inclusive IOVAs, typically `input_range`), trimmed to
    /// whole granules and to exclude IOVA 0. `granule` must be a power of two.
    ///
    /// Errors: [`IommuError::InvalidRange`] when no whole granule remains or `granule` is not a
    /// power of two.
    pub fn new(start: u64, end: u64, granule: u64) -> Result<Self, IommuError> {
        if !granule.is_power_of_two() {
            return Err(IommuError::InvalidRange);
        }
        let first = start
            .max(granule)
            .checked_next_multiple_of(granule)
            .ok_or(IommuError::InvalidRange)?;
        // Last address of the last whole granule inside the range.
        let last = match end.checked_add(1) {
            Some(e) => (e & !(granule - 1))
                .checked_sub(1)
                .ok_or(IommuError::InvalidRange)?,
            None => u64::MAX,
        };
        if last < first || last - first + 1 < granule {
            return Err(IommuError::InvalidRange);
        }
        let mut free = BTreeMap::new();
        free.insert(first, last);
        Ok(Self { free, granule })
    }

    /// Granule in bytes.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Removes `start..=end` (inclusive, widened to whole granules) from the free space, e.g. a
    /// PROBE reserved region, so it is never allocated.
    pub fn reserve(&mut self, start: u64, end: u64) {
        let g = self.granule;
        let start = start & !(g - 1);
        let end = end | (g - 1);
        let overlapping: alloc::vec::Vec<(u64, u64)> = self
            .free
            .range(..=end)
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.free.remove(&s);
            if s < start {
                self.free.insert(s, start - 1);
            }
            if e > end {
                self.free.insert(end + 1, e);
            }
        }
    }

    /// Allocates `size` bytes (rounded up to the granule), aligned to the granule. Returns the
    /// first IOVA. Errors: [`IommuError::InvalidRange`] for size 0 or one that overflows,
    /// [`IommuError::Status`]`(S_NOMEM)`-like exhaustion is reported as
    /// [`IommuError::DmaAlloc`].
    pub fn alloc(&mut self, size: u64) -> Result<u64, IommuError> {
        if size == 0 {
            return Err(IommuError::InvalidRange);
        }
        let size = size
            .checked_next_multiple_of(self.granule)
            .ok_or(IommuError::InvalidRange)?;
        let (&s, &e) = self
            .free
            .iter()
            .find(|(&s, &e)| e - s >= size - 1)
            .ok_or(IommuError::DmaAlloc)?;
        self.free.remove(&s);
        if e - s > size - 1 {
            self.free.insert(s + size, e);
        }
        Ok(s)
    }

    /// Returns `start..start + size` (exclusive end; `size` rounded up to the granule) to the
    /// free space, merging with neighbours. Freeing space that is already free is ignored.
    pub fn free(&mut self, start: u64, size: u64) {
        let Some(size) = size.max(1).checked_next_multiple_of(self.granule) else {
            return;
        };
        let Some(mut end) = start.checked_add(size - 1) else {
            return;
        };
        let mut start = start;
        if let Some((&ps, &pe)) = self.free.range(..=end).next_back() {
            if pe >= start {
                return; // Overlaps free space: double free, ignore.
            }
            if pe.checked_add(1) == Some(start) {
                self.free.remove(&ps);
                start = ps;
            }
        }
        if let Some(next) = end.checked_add(1) {
            if let Some(ne) = self.free.remove(&next) {
                end = ne;
            }
        }
        self.free.insert(start, end);
    }

    /// Total free bytes (saturating).
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().fold(0u64, |acc, (&s, &e)| {
            acc.saturating_add(e - s).saturating_add(1)
        })
    }
}

/// One live mapping made by [`IommuHal`].
#[derive(Clone, Copy, Debug)]
struct LiveMapping {
    phys_base: u64,
    len: u64,
}

/// Per-device DMA state of [`IommuHal`]: the domain its endpoint is attached to, its IOVA
/// allocator, and its live mappings.
#[derive(Debug)]
pub struct DmaSpace {
    domain: u32,
    iova: IovaAllocator,
    live: BTreeMap<u64, LiveMapping>,
    /// Number of MAP requests sent.
    pub maps: u64,
    /// Number of UNMAP requests sent.
    pub unmaps: u64,
    /// Number of MAP/UNMAP failures (the `Hal` cannot return them; they are counted here and
    /// logged, and the failed `share` returns IOVA 0, which faults).
    pub failures: u64,
}

impl DmaSpace {
    /// State for a device whose endpoint is attached to `domain`, allocating IOVAs from `iova`.
    pub fn new(domain: u32, iova: IovaAllocator) -> Self {
        Self {
            domain,
            iova,
            live: BTreeMap::new(),
            maps: 0,
            unmaps: 0,
            failures: 0,
        }
    }

    /// The domain.
    pub fn domain(&self) -> u32 {
        self.domain
    }

    /// Number of live mappings.
    pub fn live_mappings(&self) -> usize {
        self.live.len()
    }

    /// Maps the physical buffer `phys..phys + len` (exclusive end), widened to whole granules,
    /// at a fresh IOVA. Returns the IOVA of `phys`.
    pub fn map_buffer(
        &mut self,
        iommu: &mut dyn IommuMapper,
        phys: u64,
        len: u64,
        flags: MapFlags,
    ) -> Result<u64, IommuError> {
        let g = iommu.granule();
        if g != self.iova.granule() {
            return Err(IommuError::Unaligned {
                value: g,
                granule: self.iova.granule(),
            });
        }
        let phys_base = phys & !(g - 1);
        let phys_end = phys
            .checked_add(len.max(1))
            .ok_or(IommuError::InvalidRange)?;
        let span = phys_end
            .checked_next_multiple_of(g)
            .ok_or(IommuError::InvalidRange)?
            - phys_base;
        let iova = self.iova.alloc(span)?;
        self.maps += 1;
        if let Err(e) = iommu.map(self.domain, iova, iova + (span - 1), phys_base, flags) {
            self.iova.free(iova, span);
            self.failures += 1;
            return Err(e);
        }
        self.live.insert(
            iova,
            LiveMapping {
                phys_base,
                len: span,
            },
        );
        Ok(iova + (phys - phys_base))
    }

    /// Unmaps the mapping that contains `iova` (as returned by [`Self::map_buffer`]) and frees
    /// its IOVAs. Returns the physical address `iova` stood for.
    ///
    /// Errors: [`IommuError::InvalidRange`] when `iova` is not in a live mapping; the UNMAP
    /// request's errors (the mapping is then kept, so nothing is reused while still mapped).
    pub fn unmap_buffer(
        &mut self,
        iommu: &mut dyn IommuMapper,
        iova: u64,
    ) -> Result<u64, IommuError> {
        let (&base, &m) = self
            .live
            .range(..=iova)
            .next_back()
            .ok_or(IommuError::InvalidRange)?;
        if iova - base >= m.len {
            return Err(IommuError::InvalidRange);
        }
        self.unmaps += 1;
        if let Err(e) = iommu.unmap(self.domain, base, base + (m.len - 1)) {
            self.failures += 1;
            return Err(e);
        }
        self.live.remove(&base);
        self.iova.free(base, m.len);
        Ok(m.phys_base + (iova - base))
    }
}

/// Where [`IommuHal`] finds its state. Implemented by the embedder on a zero-sized type.
pub trait DmaContext: 'static {
    /// The `Hal` that allocates memory and gives physical addresses (and, for `share`, may
    /// bounce). Its addresses are what the IOVAs map to.
    type Inner: Hal;
    /// Runs `f` with exclusive access to the IOMMU driver and this device's [`DmaSpace`].
    /// Returns `Err(IommuError::Broken)` (or another error) when the state is not set up.
    fn with<R>(
        f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
    ) -> Result<R, IommuError>;
}

/// A `Hal` for a device behind a virtio-iommu: every DMA buffer is mapped at an IOVA in the
/// device's domain (strict mode: one mapping per allocation or shared buffer, removed when it is
/// freed or unshared). Mapping permissions follow the buffer direction: driver-to-device buffers
/// are READ-only, device-to-driver WRITE-only, `Both` READ|WRITE.
///
/// A MAP that fails inside `share` cannot be reported through the `Hal` interface: it is
/// logged, counted in [`DmaSpace::failures`], and `share` returns IOVA 0, which is never
/// mapped, so the device's access faults instead of reaching memory.
pub struct IommuHal<C: DmaContext>(PhantomData<C>);

fn flags_for(direction: BufferDirection) -> MapFlags {
    match direction {
        BufferDirection::DriverToDevice => MapFlags::READ,
        BufferDirection::DeviceToDriver => MapFlags::WRITE,
        BufferDirection::Both => MapFlags::READ | MapFlags::WRITE,
    }
}

// SAFETY: addresses returned by `dma_alloc`/`share` are IOVAs mapped (through the IOMMU) to the
// memory `C::Inner` allocated or shared, which stays valid until `dma_dealloc`/`unshare`; the
// virtual addresses are `C::Inner`'s own.
unsafe impl<C: DmaContext> Hal for IommuHal<C> {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let (phys, vaddr) = C::Inner::dma_alloc(pages, direction);
        if phys == 0 {
            return (0, vaddr);
        }
        let len = (pages * PAGE_SIZE) as u64;
        let rw = MapFlags::READ | MapFlags::WRITE;
        match C::with(|iommu, space| space.map_buffer(iommu, phys, len, rw)) {
            Ok(iova) => (iova, vaddr),
            Err(e) => {
                log::error!("virtio-iommu: dma_alloc of {pages} pages: MAP failed: {e}");
                // SAFETY: allocated just above with these values, never handed out.
                unsafe { C::Inner::dma_dealloc(phys, vaddr, pages) };
                (0, NonNull::dangling())
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match C::with(|iommu, space| space.unmap_buffer(iommu, paddr)) {
            // SAFETY: the caller passes what `dma_alloc` returned; `phys` is the address
            // `C::Inner::dma_alloc` gave for `vaddr`, now unmapped.
            Ok(phys) => unsafe { C::Inner::dma_dealloc(phys, vaddr, pages) },
            Err(e) => {
                // Still mapped (or unknown): leak the memory rather than let the device reach
                // memory that gets reused.
                log::error!("virtio-iommu: dma_dealloc of IOVA {paddr:#x}: UNMAP failed: {e}");
                -1
            }
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { C::Inner::mmio_phys_to_virt(paddr, size) }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        // SAFETY: forwarded with the caller's guarantees.
        let phys = unsafe { C::Inner::share(buffer, direction) };
        let len = buffer.len() as u64;
        match C::with(|iommu, space| space.map_buffer(iommu, phys, len, flags_for(direction))) {
            Ok(iova) => iova,
            Err(e) => {
                log::error!("virtio-iommu: share of {len} bytes at {phys:#x}: MAP failed: {e}");
                0
            }
        }
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        match C::with(|iommu, space| space.unmap_buffer(iommu, paddr)) {
            // SAFETY: `phys` is what `C::Inner::share` returned for this buffer.
            Ok(phys) => unsafe { C::Inner::unshare(phys, buffer, direction) },
            Err(e) => log::error!("virtio-iommu: unshare of IOVA {paddr:#x}: UNMAP failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn allocator_never_returns_zero_and_honours_range_and_granule() {
        let mut a = IovaAllocator::new(0, 0xf_ffff, 0x1000).unwrap();
        let first = a.alloc(1).unwrap();
        assert_eq!(first, 0x1000);
        let second = a.alloc(0x1001).unwrap();
        assert_eq!(second, 0x2000);
        assert_eq!(a.alloc(0x1000).unwrap(), 0x4000);
        a.free(second, 0x1001);
        assert_eq!(a.alloc(0x2000).unwrap(), 0x2000, "freed range is reused");
        assert_eq!(a.free_bytes(), 0x10_0000 - 0x5000);
        let mut big = IovaAllocator::new(0, u64::MAX, 0x10000).unwrap();
        assert_eq!(big.alloc(1).unwrap(), 0x10000);
        assert!(
            IovaAllocator::new(0, 0xfff, 0x1000).is_err(),
            "only IOVA 0's granule"
        );
    }

    #[test]
    fn allocator_skips_reserved_regions_and_reports_exhaustion() {
        let mut a = IovaAllocator::new(0x1000, 0x8fff, 0x1000).unwrap();
        a.reserve(0x3000, 0x3fff);
        a.reserve(0x5800, 0x6000); // widened to 0x5000..=0x6fff
        let got: Vec<u64> = (0..4).map(|_| a.alloc(0x1000).unwrap()).collect();
        assert_eq!(got, [0x1000, 0x2000, 0x4000, 0x7000]);
        assert_eq!(a.alloc(0x1000).unwrap(), 0x8000);
        assert_eq!(a.alloc(0x1000), Err(IommuError::DmaAlloc));
        for g in got {
            a.free(g, 0x1000);
        }
        a.free(0x8000, 0x1000);
        a.free(0x8000, 0x1000); // double free ignored
        assert_eq!(a.free_bytes(), 0x5000);
        assert_eq!(a.alloc(0x2000).unwrap(), 0x1000, "neighbours merged");
    }

    struct FakeIommu {
        maps: Vec<(u32, u64, u64, u64, MapFlags)>,
        fail: bool,
    }
    impl IommuMapper for FakeIommu {
        fn granule(&self) -> u64 {
            0x1000
        }
        fn map(&mut self, d: u32, s: u64, e: u64, p: u64, f: MapFlags) -> Result<(), IommuError> {
            if self.fail {
                return Err(IommuError::Status(crate::wire::Status::NoMem));
            }
            self.maps.push((d, s, e, p, f));
            Ok(())
        }
        fn unmap(&mut self, d: u32, s: u64, e: u64) -> Result<(), IommuError> {
            let i = self
                .maps
                .iter()
                .position(|m| m.0 == d && m.1 == s && m.2 == e);
            self.maps
                .remove(i.ok_or(IommuError::Status(crate::wire::Status::Range))?);
            Ok(())
        }
    }

    #[test]
    fn dma_space_maps_whole_granules_and_returns_offsets() {
        let mut iommu = FakeIommu {
            maps: Vec::new(),
            fail: false,
        };
        let mut space = DmaSpace::new(7, IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap());
        let iova = space
            .map_buffer(&mut iommu, 0x4000_0ff0, 0x20, MapFlags::READ)
            .unwrap();
        assert_eq!(iova & 0xfff, 0xff0);
        assert_ne!(iova, 0x4000_0ff0);
        assert_eq!(
            iommu.maps,
            [(7, 0x1000, 0x2fff, 0x4000_0000, MapFlags::READ)]
        );
        assert_eq!(
            space.unmap_buffer(&mut iommu, iova + 0x10).unwrap(),
            0x4000_1000
        );
        assert!(iommu.maps.is_empty());
        assert_eq!(
            space.unmap_buffer(&mut iommu, iova),
            Err(IommuError::InvalidRange)
        );
        iommu.fail = true;
        assert!(space
            .map_buffer(&mut iommu, 0x4000_0000, 1, MapFlags::WRITE)
            .is_err());
        assert_eq!(space.failures, 1);
        assert_eq!(space.live_mappings(), 0);
    }
}
