//! DMA glue: run virtio-drivers device drivers (`VirtIOBlk`, `VirtIORng`, `VirtIONet`, …) behind
//! a virtio-iommu without changing them.
//!
//! - [`AccessPlatform`] wraps a device's `Transport` so that it negotiates
//!   `VIRTIO_F_ACCESS_PLATFORM` (bit 33) when offered. virtio-drivers' device drivers do not ask
//!   for it, and QEMU refuses FEATURES_OK to a device with `iommu_platform=on` without it.
//! - [`IommuHal<C>`] is a `Hal` wrapping the embedder's own `Hal` ([`DmaContext::Inner`]): memory
//!   comes from the inner `Hal`, and the addresses handed to the device are device addresses in
//!   the device's domain, per the endpoint's [`DmaSpace`] mode:
//!   - **strict** ([`DmaSpace::new`], [`DmaSpace::attach_strict`]): every `dma_alloc` and
//!     `share` allocates an IOVA range ([`IovaAllocator`], never 0, never equal to the physical
//!     address: an identity coincidence is re-allocated) and MAPs it; `dma_dealloc` and `unshare` UNMAP it and free the
//!     IOVAs. The device reaches nothing else.
//!   - **identity** ([`DmaSpace::attach_identity`]): device address = physical address, and
//!     `share`/`dma_alloc` send no request at all. With `VIRTIO_IOMMU_F_BYPASS_CONFIG` the
//!     endpoint is attached to a bypass domain (ATTACH_F_BYPASS, §5.13.6.1); otherwise the RAM
//!     ranges the embedder lists are identity-mapped up front, in batches, minus PROBE's
//!     reserved regions ([`DmaSpace::identity_mapped`]).
//!
//! The mode is chosen per endpoint: each device has its own `DmaSpace`.
//!
//! # Shared state and locking
//!
//! `Hal` methods take no `self`, so the state lives in the embedder's statics, reached through
//! [`DmaContext::with`] on a zero-sized type: one [`spin::Mutex`] around the IOMMU driver shared
//! by every device, and one per device around its `DmaSpace`. [`with_locked`] locks them in that
//! order (IOMMU, then space) and [`dma_context!`](crate::dma_context) writes the whole context
//! type:
//!
//! ```ignore
//! use virtio_iommu_driver::dma::{spin::Mutex, AccessPlatform, DmaSpace, IommuHal};
//!
//! static IOMMU: Mutex<Option<VirtIOIommu<MyHal, PciTransport>>> = Mutex::new(None);
//! static BLK_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
//! virtio_iommu_driver::dma_context! {
//!     /// DMA context of the disk.
//!     pub struct BlkDma { inner: MyHal, iommu: IOMMU, space: BLK_DMA }
//! }
//!
//! let mut guard = IOMMU.lock();
//! let iommu = guard.as_mut().unwrap();
//! let space = DmaSpace::attach_strict(iommu, domain, endpoint, &reserved_regions)?;
//! drop(guard);
//! *BLK_DMA.lock() = Some(space);
//! let blk = VirtIOBlk::<IommuHal<BlkDma>, _>::new(AccessPlatform::new(transport))?;
//! ```
//!
//! Rules: never call a device driver (which calls the `Hal`) while holding `IOMMU` or a space
//! lock — a spin lock is not re-entrant and that deadlocks; and take `IOMMU` before any space
//! lock everywhere else too. On several CPUs the locks serialise DMA mapping of all devices on
//! the IOMMU lock, which is what the single request queue does anyway.
//!
//! # Allocation
//!
//! After the `DmaSpace` is built, `share`, `unshare`, and the mapping part of `dma_alloc` and
//! `dma_dealloc` do not allocate heap memory: IOVA ranges and live mappings live in node pools
//! whose size is fixed at construction ([`DEFAULT_IOVA_CAPACITY`], [`DEFAULT_MAX_MAPPINGS`];
//! exhaustion is [`IommuError::DmaAlloc`]), and the IOMMU driver's requests use DMA buffers it
//! allocated once.

use crate::device::{BatchOp, VirtIOIommu};
use crate::error::IommuError;
use crate::iova::{AvlPool, Weight};
use crate::parse::ReservedRegion;
use crate::wire::{Features, MapFlags};
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::ptr::NonNull;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

pub use crate::iova::{IovaAllocator, DEFAULT_IOVA_CAPACITY};
/// The `spin` crate the locking helpers use ([`with_locked`], [`dma_context!`](crate::dma_context)),
/// so that embedders name the same `spin::Mutex`.
pub use spin;

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

/// What [`IommuHal`] and [`DmaSpace`] need from the virtio-iommu driver: MAP and UNMAP in one
/// domain, alone or batched, and the granule. Object-safe so that statics can hold any
/// `VirtIOIommu<H, T>` (or a test double).
pub trait IommuMapper {
    /// Granule in bytes (lowest set bit of `page_size_mask`, §5.13.4).
    fn granule(&self) -> u64;

    /// Translatable IOVAs, `(start, end)` inclusive (`input_range`, §5.13.4). The default is
    /// the whole 64-bit space.
    fn input_range(&self) -> (u64, u64) {
        (0, u64::MAX)
    }

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

    /// Sends every request of `ops` and stores each one's outcome in `results` (same index):
    /// validation errors, device statuses and bad used lengths are per request and do not
    /// stop the others. `VirtIOIommu` sends them as [`crate::Batch`]es (one notification per
    /// ring-sized round); the default sends them one by one with [`Self::map`] and
    /// [`Self::unmap`].
    ///
    /// Errors of the whole call (`results` then only partly written): [`IommuError::BufferSize`]
    /// when `results.len() != ops.len()`; the fatal errors of [`crate::Batch::submit`].
    fn submit_batch(
        &mut self,
        ops: &[BatchOp],
        results: &mut [Result<(), IommuError>],
    ) -> Result<(), IommuError> {
        if ops.len() != results.len() {
            return Err(IommuError::BufferSize);
        }
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            *result = match *op {
                BatchOp::Map {
                    domain,
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                } => self.map(domain, virt_start, virt_end, phys_start, flags),
                BatchOp::Unmap {
                    domain,
                    virt_start,
                    virt_end,
                } => self.unmap(domain, virt_start, virt_end),
            };
        }
        Ok(())
    }
}

impl<H: Hal, T: Transport> IommuMapper for VirtIOIommu<H, T> {
    fn granule(&self) -> u64 {
        self.config().granule
    }
    fn input_range(&self) -> (u64, u64) {
        self.config().input_range
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
    fn submit_batch(
        &mut self,
        ops: &[BatchOp],
        results: &mut [Result<(), IommuError>],
    ) -> Result<(), IommuError> {
        if ops.len() != results.len() {
            return Err(IommuError::BufferSize);
        }
        for (ops, results) in ops
            .chunks(crate::BATCH_CAPACITY)
            .zip(results.chunks_mut(crate::BATCH_CAPACITY))
        {
            // `queued[k]` = index in `ops` of the batch's request `k`.
            let mut queued = [0u16; crate::BATCH_CAPACITY];
            let mut batch = self.batch();
            for (i, op) in ops.iter().enumerate() {
                match batch.push(*op) {
                    Ok(k) => queued[k] = i as u16,
                    Err(e) => results[i] = Err(e),
                }
            }
            let outcome = batch.submit()?;
            for (k, r) in outcome.iter().enumerate() {
                results[usize::from(queued[k])] = r;
            }
        }
        Ok(())
    }
}

/// A range of guest-physical memory, `start..=end` (inclusive), e.g. a RAM bank from the
/// devicetree's `/memory` nodes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct PhysRange {
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

impl PhysRange {
    /// `start..start + size` (exclusive end; `size` in bytes), `None` when `size` is 0 or the
    /// range passes 2^64.
    pub fn from_start_size(start: u64, size: u64) -> Option<Self> {
        let end = start.checked_add(size.checked_sub(1)?)?;
        Some(Self { start, end })
    }
}

/// How a [`DmaSpace`] gives device addresses.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum DmaMode {
    /// One MAP per buffer at a fresh IOVA, UNMAPped when the buffer is freed or unshared.
    Strict,
    /// Identity through a bypass domain (ATTACH_F_BYPASS): no mappings at all.
    IdentityBypass,
    /// Identity mappings of the RAM ranges, set up once.
    IdentityMapped,
}

/// Default number of live mappings of a strict [`DmaSpace`] ([`DmaSpace::new`]).
pub const DEFAULT_MAX_MAPPINGS: usize = 1024;

/// One live mapping of a strict [`DmaSpace`], keyed by its first IOVA.
#[derive(Clone, Copy, Debug)]
struct LiveMapping {
    phys_base: u64,
    /// Bytes (whole granules).
    len: u64,
}

impl Weight for LiveMapping {
    fn weight(&self, _: u64) -> u64 {
        0
    }
}

#[derive(Debug)]
enum Mode {
    Strict {
        iova: IovaAllocator,
        live: AvlPool<LiveMapping>,
    },
    /// `ranges`: sorted, disjoint. Bypass: the reserved regions (buffers must avoid them);
    /// mapped: the identity-mapped ranges (buffers must lie inside one).
    Identity {
        bypass: bool,
        ranges: Vec<PhysRange>,
    },
}

/// Per-endpoint DMA state of [`IommuHal`]: the domain the endpoint is attached to and how device
/// addresses are given ([`DmaMode`]): for strict mode its IOVA allocator and live mappings (fixed
/// capacity, no allocation after construction), for identity mode the ranges a buffer may be
/// in.
#[derive(Debug)]
pub struct DmaSpace {
    domain: u32,
    mode: Mode,
    /// Number of MAP requests sent for buffers (identity setup and [`Self::unmap_all`]
    /// included).
    pub maps: u64,
    /// Number of UNMAP requests sent.
    pub unmaps: u64,
    /// Number of failed MAP/UNMAP requests and of buffers refused (exhausted IOVAs or mapping
    /// slots, identity buffers outside the mapped RAM). The `Hal` cannot return errors: they are
    /// counted here and logged, and the failed `share` returns device address 0.
    pub failures: u64,
}

impl DmaSpace {
    /// Strict mode for an endpoint already attached to `domain`, allocating IOVAs from `iova`,
    /// with room for [`DEFAULT_MAX_MAPPINGS`] live mappings.
    pub fn new(domain: u32, iova: IovaAllocator) -> Self {
        Self::strict(domain, iova, DEFAULT_MAX_MAPPINGS)
    }

    /// Strict mode with room for `max_mappings` live mappings (allocated now).
    pub fn strict(domain: u32, iova: IovaAllocator, max_mappings: usize) -> Self {
        Self::with_mode(
            domain,
            Mode::Strict {
                iova,
                live: AvlPool::with_capacity(max_mappings),
            },
        )
    }

    /// Identity mode for an endpoint already attached to `domain` with ATTACH_F_BYPASS
    /// (§5.13.6.1): device address = physical address. Buffers overlapping a `reserved`
    /// region (which the device does not pass through as RAM) are refused.
    pub fn identity_bypass(domain: u32, reserved: &[ReservedRegion]) -> Self {
        let ranges = sorted_union(reserved.iter().map(|r| PhysRange {
            start: r.start,
            end: r.end,
        }));
        Self::with_mode(
            domain,
            Mode::Identity {
                bypass: true,
                ranges,
            },
        )
    }

    /// Identity mode by mappings, for an endpoint already attached to the (new, empty) domain
    /// `domain`: MAPs every range of `ram` (guest-physical, inclusive ends) at IOVA = physical
    /// address with READ|WRITE, in batches ([`IommuMapper::submit_batch`]), after clipping each
    /// to `input_range`, shrinking it to whole granules and cutting out every `reserved` region
    /// (widened to whole granules; R30). Overlapping RAM ranges are merged first.
    ///
    /// Errors: the first failed MAP (every MAP that succeeded is UNMAPped again);
    /// [`IommuError::InvalidRange`] when nothing of `ram` remains to map.
    pub fn identity_mapped(
        iommu: &mut dyn IommuMapper,
        domain: u32,
        ram: &[PhysRange],
        reserved: &[ReservedRegion],
    ) -> Result<Self, IommuError> {
        let g = iommu.granule();
        if !g.is_power_of_two() {
            return Err(IommuError::InvalidRange);
        }
        let (lo, hi) = iommu.input_range();
        let holes = sorted_union(reserved.iter().map(|r| PhysRange {
            start: r.start & !(g - 1),
            end: r.end | (g - 1),
        }));
        let mut ranges = Vec::new();
        for r in sorted_union(ram.iter().copied()) {
            let Some(start) = r.start.max(lo).checked_next_multiple_of(g) else {
                continue;
            };
            // Last byte of the last whole granule.
            let end = match r.end.min(hi).checked_add(1) {
                Some(e) => match (e & !(g - 1)).checked_sub(1) {
                    Some(end) => end,
                    None => continue,
                },
                None => u64::MAX,
            };
            if end < start {
                continue;
            }
            subtract(PhysRange { start, end }, &holes, &mut ranges);
        }
        if ranges.is_empty() {
            return Err(IommuError::InvalidRange);
        }
        let rw = MapFlags::READ | MapFlags::WRITE;
        let ops = ranges.iter().map(|r| BatchOp::Map {
            domain,
            virt_start: r.start,
            virt_end: r.end,
            phys_start: r.start,
            flags: rw,
        });
        let ops: Vec<BatchOp> = ops.collect();
        let mut results = alloc::vec![Ok(()); ops.len()];
        let first_error = match iommu.submit_batch(&ops, &mut results) {
            Err(e) => Some(e),
            Ok(()) => results.iter().find_map(|r| r.err()),
        };
        if let Some(e) = first_error {
            // Undo what was mapped (best effort: the caller gets the MAP error; after a fatal
            // error the UNMAPs fail too, and the driver is broken anyway).
            let undo: Vec<BatchOp> = ops
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|(op, _)| match *op {
                    BatchOp::Map {
                        virt_start,
                        virt_end,
                        ..
                    }
                    | BatchOp::Unmap {
                        virt_start,
                        virt_end,
                        ..
                    } => BatchOp::Unmap {
                        domain,
                        virt_start,
                        virt_end,
                    },
                })
                .collect();
            let mut undone = alloc::vec![Ok(()); undo.len()];
            let _ = iommu.submit_batch(&undo, &mut undone);
            return Err(e);
        }
        let mut space = Self::with_mode(
            domain,
            Mode::Identity {
                bypass: false,
                ranges,
            },
        );
        space.maps = ops.len() as u64;
        Ok(space)
    }

    /// Strict mode, set up on the driver: an IOVA allocator over `input_range` minus
    /// `reserved` ([`IovaAllocator::for_endpoint`]), then ATTACH of `endpoint` to `domain`
    /// (§5.13.6.1).
    ///
    /// Errors: those of [`IovaAllocator::for_endpoint`] and [`VirtIOIommu::attach`].
    pub fn attach_strict<H: Hal, T: Transport>(
        iommu: &mut VirtIOIommu<H, T>,
        domain: u32,
        endpoint: u32,
        reserved: &[ReservedRegion],
    ) -> Result<Self, IommuError> {
        let c = *iommu.config();
        let iova = IovaAllocator::for_endpoint(c.input_range, c.granule, reserved)?;
        iommu.attach(domain, endpoint)?;
        Ok(Self::new(domain, iova))
    }

    /// Identity mode, set up on the driver: with `VIRTIO_IOMMU_F_BYPASS_CONFIG` negotiated,
    /// ATTACH of `endpoint` to `domain` with ATTACH_F_BYPASS ([`Self::identity_bypass`]);
    /// otherwise a plain ATTACH and identity mappings of `ram` minus `reserved`
    /// ([`Self::identity_mapped`]; on failure the endpoint is DETACHed again). `domain` must
    /// not exist yet (or be a bypass domain, resp. an empty one).
    ///
    /// Errors: those of [`VirtIOIommu::attach_bypass`], [`VirtIOIommu::attach`] and
    /// [`Self::identity_mapped`].
    pub fn attach_identity<H: Hal, T: Transport>(
        iommu: &mut VirtIOIommu<H, T>,
        domain: u32,
        endpoint: u32,
        ram: &[PhysRange],
        reserved: &[ReservedRegion],
    ) -> Result<Self, IommuError> {
        if iommu.features().contains(Features::BYPASS_CONFIG) {
            iommu.attach_bypass(domain, endpoint)?;
            return Ok(Self::identity_bypass(domain, reserved));
        }
        iommu.attach(domain, endpoint)?;
        Self::identity_mapped(iommu, domain, ram, reserved).inspect_err(|_| {
            let _ = iommu.detach(domain, endpoint);
        })
    }

    fn with_mode(domain: u32, mode: Mode) -> Self {
        Self {
            domain,
            mode,
            maps: 0,
            unmaps: 0,
            failures: 0,
        }
    }

    /// The domain.
    pub fn domain(&self) -> u32 {
        self.domain
    }

    /// The mode.
    pub fn mode(&self) -> DmaMode {
        match self.mode {
            Mode::Strict { .. } => DmaMode::Strict,
            Mode::Identity { bypass: true, .. } => DmaMode::IdentityBypass,
            Mode::Identity { bypass: false, .. } => DmaMode::IdentityMapped,
        }
    }

    /// Number of live per-buffer mappings (0 in identity mode).
    pub fn live_mappings(&self) -> usize {
        match &self.mode {
            Mode::Strict { live, .. } => live.len(),
            Mode::Identity { .. } => 0,
        }
    }

    /// The identity-mapped ranges (identity-mapped mode), in address order; empty otherwise.
    pub fn identity_ranges(&self) -> &[PhysRange] {
        match &self.mode {
            Mode::Identity {
                bypass: false,
                ranges,
            } => ranges,
            _ => &[],
        }
    }

    /// The strict mode's IOVA allocator.
    pub fn iova_allocator(&self) -> Option<&IovaAllocator> {
        match &self.mode {
            Mode::Strict { iova, .. } => Some(iova),
            Mode::Identity { .. } => None,
        }
    }

    /// Gives the device an address for the physical buffer `phys..phys + len` (exclusive end,
    /// bytes; `len` 0 counts as 1) and returns the device address of `phys`. No heap allocation.
    ///
    /// Strict: the buffer, widened to whole granules, is MAPped with `flags` at a fresh IOVA
    /// range. Identity: returns `phys` after checking the buffer lies inside one identity-mapped
    /// range (resp. outside every reserved region); no request is sent.
    ///
    /// Errors: [`IommuError::InvalidRange`] when the buffer passes 2^64;
    /// [`IommuError::Unaligned`] when the IOMMU's granule differs from the allocator's;
    /// [`IommuError::DmaAlloc`] when IOVAs or mapping slots are exhausted;
    /// [`IommuError::IovaOutOfRange`] (identity) for a buffer the device cannot reach at its
    /// physical address; the MAP request's errors.
    pub fn map_buffer(
        &mut self,
        iommu: &mut dyn IommuMapper,
        phys: u64,
        len: u64,
        flags: MapFlags,
    ) -> Result<u64, IommuError> {
        let result = self.map_buffer_inner(iommu, phys, len, flags);
        if result.is_err() {
            self.failures += 1;
        }
        result
    }

    fn map_buffer_inner(
        &mut self,
        iommu: &mut dyn IommuMapper,
        phys: u64,
        len: u64,
        flags: MapFlags,
    ) -> Result<u64, IommuError> {
        let last = phys
            .checked_add(len.max(1) - 1)
            .ok_or(IommuError::InvalidRange)?;
        let (iova, live) = match &mut self.mode {
            Mode::Identity { bypass, ranges } => {
                let reachable = if *bypass {
                    !overlaps_any(ranges, phys, last)
                } else {
                    inside_one(ranges, phys, last)
                };
                return if reachable {
                    Ok(phys)
                } else {
                    Err(IommuError::IovaOutOfRange {
                        start: phys,
                        end: last,
                    })
                };
            }
            Mode::Strict { iova, live } => (iova, live),
        };
        let g = iommu.granule();
        if g != iova.granule() {
            return Err(IommuError::Unaligned {
                value: g,
                granule: iova.granule(),
            });
        }
        let phys_base = phys & !(g - 1);
        let span = (last | (g - 1))
            .checked_add(1)
            .map_or(0u64.wrapping_sub(phys_base), |end| end - phys_base);
        if span == 0 {
            return Err(IommuError::InvalidRange);
        }
        let mut at = iova.alloc(span)?;
        if at == phys_base {
            // Never hand out the identity address: a device that wrongly bypassed translation
            // would then still work, hiding exactly what strict mode is there to show.
            let other = iova.alloc(span);
            let _ = iova.free(at, span);
            at = other?;
        }
        if let Err(e) = live.insert(
            at,
            LiveMapping {
                phys_base,
                len: span,
            },
        ) {
            let _ = iova.free(at, span);
            return Err(e);
        }
        self.maps += 1;
        if let Err(e) = iommu.map(self.domain, at, at + (span - 1), phys_base, flags) {
            live.remove(at);
            let _ = iova.free(at, span);
            return Err(e);
        }
        Ok(at + (phys - phys_base))
    }

    /// Takes back the device address `addr` of a buffer given by [`Self::map_buffer`] (any
    /// address inside it) and returns the physical address it stands for. No heap allocation.
    ///
    /// Strict: UNMAPs the whole mapping containing `addr` and frees its IOVAs. Identity:
    /// returns `addr`; no request is sent.
    ///
    /// Errors: [`IommuError::InvalidRange`] when `addr` is not in a live mapping (strict); the
    /// UNMAP request's errors — the mapping is then kept, so nothing is reused while it may
    /// still be mapped.
    pub fn unmap_buffer(
        &mut self,
        iommu: &mut dyn IommuMapper,
        addr: u64,
    ) -> Result<u64, IommuError> {
        let (iova, live) = match &mut self.mode {
            Mode::Identity { .. } => return Ok(addr),
            Mode::Strict { iova, live } => (iova, live),
        };
        let Some((base, m)) = live.floor(addr).filter(|(b, m)| addr - b < m.len) else {
            self.failures += 1;
            return Err(IommuError::InvalidRange);
        };
        self.unmaps += 1;
        if let Err(e) = iommu.unmap(self.domain, base, base + (m.len - 1)) {
            self.failures += 1;
            return Err(e);
        }
        live.remove(base);
        if let Err(e) = iova.free(base, m.len) {
            // Not reachable for ranges `alloc` returned; the IOVAs are lost, nothing else.
            log::error!("virtio-iommu: IOVA {base:#x}+{:#x} not freed: {e}", m.len);
            self.failures += 1;
        }
        Ok(m.phys_base + (addr - base))
    }

    /// UNMAPs everything this space mapped — every live buffer mapping (strict) or every
    /// identity mapping (identity-mapped) — in batches ([`IommuMapper::submit_batch`]), e.g.
    /// before DETACH or when the device is gone. Mappings whose UNMAP fails are kept. Returns
    /// the number of mappings removed. Allocates one small batch buffer.
    ///
    /// After this, buffers still held by a device driver are unreachable for the device;
    /// identity-mapped mode then refuses new buffers.
    ///
    /// Errors: the fatal errors of [`IommuMapper::submit_batch`].
    pub fn unmap_all(&mut self, iommu: &mut dyn IommuMapper) -> Result<usize, IommuError> {
        const CHUNK: usize = 64;
        let domain = self.domain;
        let unmap = |start: u64, len: u64| BatchOp::Unmap {
            domain,
            virt_start: start,
            virt_end: start + (len - 1),
        };
        let mut removed = 0;
        match &mut self.mode {
            Mode::Identity { bypass: true, .. } => {}
            Mode::Identity {
                bypass: false,
                ranges,
            } => {
                let ops: Vec<BatchOp> = ranges
                    .iter()
                    .map(|r| unmap(r.start, r.end - r.start + 1))
                    .collect();
                let mut results = alloc::vec![Ok(()); ops.len()];
                iommu.submit_batch(&ops, &mut results)?;
                self.unmaps += ops.len() as u64;
                let mut keep = results.iter().map(Result::is_err);
                ranges.retain(|_| keep.next().unwrap_or(true));
                removed = ops.len() - ranges.len();
                self.failures += ranges.len() as u64;
            }
            Mode::Strict { iova, live } => {
                let mut cursor = Some(0u64);
                while let Some(from) = cursor {
                    let mut ops = [unmap(0, 1); CHUNK];
                    let mut n = 0;
                    let mut next = Some(from);
                    while let Some((base, m)) = next.and_then(|k| live.ceil(k)) {
                        if n == CHUNK {
                            break;
                        }
                        ops[n] = unmap(base, m.len);
                        n += 1;
                        next = base.checked_add(1);
                    }
                    if n == 0 {
                        break;
                    }
                    cursor = next;
                    let mut results = [Ok(()); CHUNK];
                    iommu.submit_batch(&ops[..n], &mut results[..n])?;
                    self.unmaps += n as u64;
                    for (op, r) in ops[..n].iter().zip(&results[..n]) {
                        let BatchOp::Unmap { virt_start, .. } = *op else {
                            continue;
                        };
                        if r.is_err() {
                            self.failures += 1;
                            continue;
                        }
                        if let Some(m) = live.remove(virt_start) {
                            let _ = iova.free(virt_start, m.len);
                            removed += 1;
                        }
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// The union of `ranges` (inclusive ends), sorted and merged (adjacent ranges too).
fn sorted_union(ranges: impl Iterator<Item = PhysRange>) -> Vec<PhysRange> {
    let mut v: Vec<PhysRange> = ranges.filter(|r| r.start <= r.end).collect();
    v.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<PhysRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(1) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Appends `r` minus every range of `holes` (sorted, disjoint) to `out`.
fn subtract(r: PhysRange, holes: &[PhysRange], out: &mut Vec<PhysRange>) {
    let mut start = r.start;
    for h in holes {
        if h.end < start || h.start > r.end {
            continue;
        }
        if h.start > start {
            out.push(PhysRange {
                start,
                end: h.start - 1,
            });
        }
        match h.end.checked_add(1) {
            Some(next) if next <= r.end => start = next,
            _ => return,
        }
    }
    out.push(PhysRange { start, end: r.end });
}

/// Whether `start..=end` lies inside one range of `ranges` (sorted, disjoint). O(log n).
fn inside_one(ranges: &[PhysRange], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.start <= start);
    i > 0 && ranges[i - 1].end >= end
}

/// Whether `start..=end` intersects a range of `ranges` (sorted, disjoint). O(log n).
fn overlaps_any(ranges: &[PhysRange], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.start <= end);
    i > 0 && ranges[i - 1].end >= start
}

/// Where [`IommuHal`] finds its state. Implemented by the embedder on a zero-sized type, one
/// per device (endpoint); [`dma_context!`](crate::dma_context) writes the usual one.
pub trait DmaContext: 'static {
    /// The embedder's `Hal`, which allocates memory and gives physical addresses (and, for
    /// `share`, may bounce). Its physical addresses are what the IOVAs map to.
    type Inner: Hal;
    /// Runs `f` with exclusive access to the IOMMU driver and this device's [`DmaSpace`].
    /// Returns `Err(IommuError::Broken)` (or another error) when the state is not set up.
    fn with<R>(
        f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
    ) -> Result<R, IommuError>;
}

/// The body of a [`DmaContext::with`] over two statics: locks `iommu`, then `space` (always in
/// this order, see the module documentation) and runs `f`; [`IommuError::Broken`] when either
/// is `None`. Spins while another CPU holds a lock.
pub fn with_locked<M: IommuMapper, R>(
    iommu: &spin::Mutex<Option<M>>,
    space: &spin::Mutex<Option<DmaSpace>>,
    f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
) -> Result<R, IommuError> {
    let mut iommu = iommu.lock();
    let mut space = space.lock();
    match (iommu.as_mut(), space.as_mut()) {
        (Some(iommu), Some(space)) => f(iommu, space),
        _ => Err(IommuError::Broken),
    }
}

/// Defines a zero-sized [`DmaContext`](crate::dma::DmaContext) type over two statics, a
/// `spin::Mutex<Option<M>>` holding the IOMMU driver (any [`IommuMapper`](crate::dma::IommuMapper))
/// and a `spin::Mutex<Option<DmaSpace>>` for the device, locked with
/// [`with_locked`](crate::dma::with_locked):
///
/// ```ignore
/// static IOMMU: Mutex<Option<VirtIOIommu<MyHal, PciTransport>>> = Mutex::new(None);
/// static NET_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
/// virtio_iommu_driver::dma_context! {
///     /// DMA context of the network card.
///     pub struct NetDma { inner: MyHal, iommu: IOMMU, space: NET_DMA }
/// }
/// type Net = VirtIONet<IommuHal<NetDma>, AccessPlatform<PciTransport>, 16>;
/// ```
#[macro_export]
macro_rules! dma_context {
    ($(#[$attr:meta])* $vis:vis struct $name:ident {
        inner: $inner:ty,
        iommu: $iommu:path,
        space: $space:path $(,)?
    }) => {
        $(#[$attr])*
        $vis struct $name;

        impl $crate::dma::DmaContext for $name {
            type Inner = $inner;
            fn with<R>(
                f: impl FnOnce(
                    &mut dyn $crate::dma::IommuMapper,
                    &mut $crate::dma::DmaSpace,
                ) -> ::core::result::Result<R, $crate::IommuError>,
            ) -> ::core::result::Result<R, $crate::IommuError> {
                $crate::dma::with_locked(&$iommu, &$space, f)
            }
        }
    };
}

/// A `Hal` for a device behind a virtio-iommu, over the embedder's `Hal` `C::Inner`: memory and
/// physical addresses come from `C::Inner`; the addresses given to the device are device
/// addresses in the device's domain, per its [`DmaSpace`]'s mode (see the module
/// documentation). In strict mode mapping permissions follow the buffer direction:
/// driver-to-device buffers are READ-only, device-to-driver WRITE-only, `Both` and `dma_alloc`
/// READ|WRITE.
///
/// A failure inside `share` or `dma_alloc` cannot be reported through the `Hal` interface: it
/// is logged, counted in [`DmaSpace::failures`], and `share` returns device address 0 (never
/// mapped, so the device's access faults instead of reaching memory; virtio-drivers' `Dma::new`
/// reads a 0 from `dma_alloc` as failure). A failed UNMAP in `dma_dealloc` or `unshare` leaks
/// the memory (still mapped, so never reused) rather than free it.
pub struct IommuHal<C: DmaContext>(PhantomData<C>);

fn flags_for(direction: BufferDirection) -> MapFlags {
    match direction {
        BufferDirection::DriverToDevice => MapFlags::READ,
        BufferDirection::DeviceToDriver => MapFlags::WRITE,
        BufferDirection::Both => MapFlags::READ | MapFlags::WRITE,
    }
}

// SAFETY: addresses returned by `dma_alloc`/`share` are device addresses that the IOMMU
// translates (strict: a mapping made here; identity: the physical address itself) to the memory
// `C::Inner` allocated or shared, which stays valid until `dma_dealloc`/`unshare`; the virtual
// addresses are `C::Inner`'s own, passed through unchanged.
unsafe impl<C: DmaContext> Hal for IommuHal<C> {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let (phys, vaddr) = C::Inner::dma_alloc(pages, direction);
        if phys == 0 {
            return (0, vaddr);
        }
        let len = pages.saturating_mul(PAGE_SIZE) as u64;
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
            // `C::Inner::dma_alloc` gave for `vaddr`, no longer reachable by the device.
            Ok(phys) => unsafe { C::Inner::dma_dealloc(phys, vaddr, pages) },
            Err(e) => {
                // Still mapped (or unknown): leak the memory rather than let the device reach
                // memory that gets reused. Report success: virtio-drivers' `Dma::drop` asserts
                // that `dma_dealloc` returns 0, and there is nothing the caller could do.
                log::error!(
                    "virtio-iommu: dma_dealloc of device address {paddr:#x}: UNMAP failed, {pages} page(s) leaked: {e}"
                );
                0
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
            Err(e) => {
                log::error!("virtio-iommu: unshare of device address {paddr:#x}: UNMAP failed: {e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::parse::ResvMemKind;
    use crate::wire::Status;
    use std::vec::Vec;

    /// An IOMMU double: records mappings, fails on demand, rejects overlaps like QEMU.
    struct FakeIommu {
        maps: Vec<(u32, u64, u64, u64, MapFlags)>,
        fail: bool,
        input_range: (u64, u64),
    }

    impl FakeIommu {
        fn new() -> Self {
            Self {
                maps: Vec::new(),
                fail: false,
                input_range: (0, u64::MAX),
            }
        }
    }

    impl IommuMapper for FakeIommu {
        fn granule(&self) -> u64 {
            0x1000
        }
        fn input_range(&self) -> (u64, u64) {
            self.input_range
        }
        fn map(&mut self, d: u32, s: u64, e: u64, p: u64, f: MapFlags) -> Result<(), IommuError> {
            if self.fail {
                return Err(IommuError::Status(Status::NoMem));
            }
            if self.maps.iter().any(|m| m.0 == d && m.1 <= e && s <= m.2) {
                return Err(IommuError::Status(Status::Inval));
            }
            self.maps.push((d, s, e, p, f));
            Ok(())
        }
        fn unmap(&mut self, d: u32, s: u64, e: u64) -> Result<(), IommuError> {
            if self.fail {
                return Err(IommuError::Status(Status::DevErr));
            }
            let i = self
                .maps
                .iter()
                .position(|m| m.0 == d && m.1 == s && m.2 == e);
            self.maps
                .remove(i.ok_or(IommuError::Status(Status::Range))?);
            Ok(())
        }
    }

    fn msi(start: u64, end: u64) -> ReservedRegion {
        ReservedRegion {
            kind: ResvMemKind::Msi,
            start,
            end,
        }
    }

    #[test]
    fn strict_never_hands_out_the_identity_address() {
        let mut iommu = FakeIommu::new();
        // The IOVA space starts exactly at the buffer's physical address, so the first free
        // IOVA would be the identity one.
        let iova = IovaAllocator::new(0x4000_0000, 0x4fff_ffff, 0x1000).unwrap();
        let mut space = DmaSpace::new(3, iova);
        let addr = space
            .map_buffer(&mut iommu, 0x4000_0000, 0x1000, MapFlags::READ)
            .unwrap();
        assert_ne!(addr, 0x4000_0000);
        assert_eq!(
            iommu.maps,
            [(3, addr, addr + 0xfff, 0x4000_0000, MapFlags::READ)]
        );
        assert_eq!(space.unmap_buffer(&mut iommu, addr).unwrap(), 0x4000_0000);
    }

    #[test]
    fn strict_maps_whole_granules_and_returns_offsets() {
        let mut iommu = FakeIommu::new();
        let mut space = DmaSpace::new(7, IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap());
        assert_eq!(space.mode(), DmaMode::Strict);
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
        assert_eq!(space.failures, 2);
        assert_eq!(space.live_mappings(), 0);
        let a = space.iova_allocator().unwrap();
        assert_eq!(a.live_allocations(), 0, "IOVAs of failed MAPs are freed");
        // A buffer ending at the top of the physical space.
        iommu.fail = false;
        let top = space
            .map_buffer(&mut iommu, u64::MAX - 0x10, 0x11, MapFlags::READ)
            .unwrap();
        assert_eq!(top & 0xfff, 0xfef);
        assert_eq!(iommu.maps[0].3, u64::MAX - 0xfff);
        assert_eq!(
            space.map_buffer(&mut iommu, u64::MAX - 0x10, 0x12, MapFlags::READ),
            Err(IommuError::InvalidRange)
        );
    }

    #[test]
    fn strict_reports_exhausted_mapping_slots_and_unmaps_all() {
        let mut iommu = FakeIommu::new();
        let iova = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        let mut space = DmaSpace::strict(3, iova, 2);
        let a = space
            .map_buffer(&mut iommu, 0x1000, 0x1000, MapFlags::READ)
            .unwrap();
        space
            .map_buffer(&mut iommu, 0x8000, 0x3000, MapFlags::WRITE)
            .unwrap();
        assert_eq!(
            space.map_buffer(&mut iommu, 0x20000, 1, MapFlags::READ),
            Err(IommuError::DmaAlloc)
        );
        assert_eq!(iommu.maps.len(), 2, "nothing sent for the refused buffer");
        space.unmap_buffer(&mut iommu, a).unwrap();
        for k in 0..20u64 {
            if space.live_mappings() == 2 {
                break;
            }
            space
                .map_buffer(&mut iommu, 0x10_0000 * k, 0x1000, MapFlags::READ)
                .unwrap();
        }
        assert_eq!(space.unmap_all(&mut iommu).unwrap(), 2);
        assert!(iommu.maps.is_empty());
        assert_eq!(space.live_mappings(), 0);
        let alloc = space.iova_allocator().unwrap();
        assert_eq!(alloc.free_ranges(), 1);
        assert_eq!(alloc.live_allocations(), 0);
    }

    #[test]
    fn identity_mapped_skips_reserved_regions_and_checks_buffers() {
        let mut iommu = FakeIommu::new();
        iommu.input_range = (0, 0xffff_ffff_ffff);
        let ram = [
            PhysRange::from_start_size(0x4000_0000, 0x100_0000).unwrap(),
            // Overlaps the first: merged.
            PhysRange::from_start_size(0x40f0_0000, 0x20_0000).unwrap(),
            // Unaligned ends: shrunk to whole granules.
            PhysRange {
                start: 0x8000_0800,
                end: 0x8000_57ff,
            },
        ];
        let reserved = [msi(0x4080_0010, 0x4080_0020), msi(0x0802_0000, 0x0802_0fff)];
        let mut space = DmaSpace::identity_mapped(&mut iommu, 9, &ram, &reserved).unwrap();
        assert_eq!(space.mode(), DmaMode::IdentityMapped);
        let rw = MapFlags::READ | MapFlags::WRITE;
        assert_eq!(
            iommu.maps,
            [
                (9, 0x4000_0000, 0x407f_ffff, 0x4000_0000, rw),
                (9, 0x4080_1000, 0x410f_ffff, 0x4080_1000, rw),
                (9, 0x8000_1000, 0x8000_4fff, 0x8000_1000, rw),
            ]
        );
        assert_eq!(space.maps, 3);
        // Buffers: identity inside a mapped range, refused elsewhere, no request either way.
        assert_eq!(
            space.map_buffer(&mut iommu, 0x4000_1234, 0x100, MapFlags::READ),
            Ok(0x4000_1234)
        );
        assert!(space
            .map_buffer(&mut iommu, 0x407f_ff00, 0x200, MapFlags::READ)
            .is_err());
        assert!(space
            .map_buffer(&mut iommu, 0x1000, 0x10, MapFlags::READ)
            .is_err());
        assert_eq!(space.unmap_buffer(&mut iommu, 0x4000_1234), Ok(0x4000_1234));
        assert_eq!(iommu.maps.len(), 3);
        assert_eq!(space.unmap_all(&mut iommu).unwrap(), 3);
        assert!(iommu.maps.is_empty());
        // Input range clipping and a failed MAP: everything undone.
        let mut small = FakeIommu::new();
        small.input_range = (0, 0x8000_ffff);
        small.maps.push((9, 0x8000_3000, 0x8000_3fff, 0, rw)); // makes the last MAP fail
        assert_eq!(
            DmaSpace::identity_mapped(&mut small, 9, &ram, &[]).err(),
            Some(IommuError::Status(Status::Inval))
        );
        assert_eq!(small.maps.len(), 1, "the successful MAP was undone");
        assert!(DmaSpace::identity_mapped(&mut small, 9, &[], &[]).is_err());
        // Clipped to input_range (and to whole granules).
        let mut clip = FakeIommu::new();
        clip.input_range = (0, 0x4040_0fff);
        let space = DmaSpace::identity_mapped(&mut clip, 9, &ram, &[]).unwrap();
        assert_eq!(
            space.identity_ranges(),
            [PhysRange {
                start: 0x4000_0000,
                end: 0x4040_0fff
            }]
        );
        clip.input_range = (0, 0x4000_0ffe);
        assert!(DmaSpace::identity_mapped(&mut clip, 9, &ram, &[]).is_err());
    }

    #[test]
    fn identity_bypass_sends_nothing_and_avoids_reserved_regions() {
        let mut iommu = FakeIommu::new();
        let mut space = DmaSpace::identity_bypass(4, &[msi(0x0802_0000, 0x0802_0fff)]);
        assert_eq!(space.mode(), DmaMode::IdentityBypass);
        assert_eq!(
            space.map_buffer(&mut iommu, 0x4000_0000, 0x1000, MapFlags::READ),
            Ok(0x4000_0000)
        );
        assert!(space
            .map_buffer(&mut iommu, 0x0801_ffff, 2, MapFlags::READ)
            .is_err());
        assert_eq!(space.unmap_all(&mut iommu), Ok(0));
        assert!(iommu.maps.is_empty());
        assert_eq!((space.maps, space.unmaps, space.failures), (0, 0, 1));
    }

    #[test]
    fn default_submit_batch_is_per_request() {
        let mut iommu = FakeIommu::new();
        let rw = MapFlags::READ | MapFlags::WRITE;
        let ops = [
            BatchOp::Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0,
                flags: rw,
            },
            BatchOp::Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0,
                flags: rw,
            },
            BatchOp::Unmap {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
            },
        ];
        let mut results = [Ok(()); 3];
        iommu.submit_batch(&ops, &mut results).unwrap();
        assert_eq!(
            results,
            [Ok(()), Err(IommuError::Status(Status::Inval)), Ok(())]
        );
        assert_eq!(
            iommu.submit_batch(&ops, &mut results[..2]),
            Err(IommuError::BufferSize)
        );
    }

    #[test]
    fn range_helpers() {
        let r = |start, end| PhysRange { start, end };
        assert_eq!(
            sorted_union([r(10, 20), r(0, 5), r(6, 8), r(30, 40), r(21, 22)].into_iter()),
            [r(0, 8), r(10, 22), r(30, 40)]
        );
        let mut out = Vec::new();
        subtract(r(0, 100), &[r(0, 9), r(50, 59), r(95, u64::MAX)], &mut out);
        assert_eq!(out, [r(10, 49), r(60, 94)]);
        out.clear();
        subtract(r(0, u64::MAX), &[r(5, 5)], &mut out);
        assert_eq!(out, [r(0, 4), r(6, u64::MAX)]);
        let ranges = [r(10, 20), r(30, 40)];
        assert!(inside_one(&ranges, 10, 20));
        assert!(!inside_one(&ranges, 15, 30));
        assert!(!inside_one(&ranges, 0, 1));
        assert!(overlaps_any(&ranges, 20, 25));
        assert!(!overlaps_any(&ranges, 21, 29));
        assert!(overlaps_any(&ranges, 0, u64::MAX));
        assert_eq!(PhysRange::from_start_size(1, 0), None);
        assert_eq!(PhysRange::from_start_size(u64::MAX, 2), None);
    }
}
