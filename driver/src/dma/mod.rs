//! DMA glue: run virtio-drivers device drivers (`VirtIOBlk`, `VirtIORng`, `VirtIONet`, …) behind
//! a virtio-iommu without changing them.
//!
//! - [`AccessPlatform`] wraps a device's `Transport` so that it negotiates
//!   `VIRTIO_F_ACCESS_PLATFORM` (bit 33) when offered. virtio-drivers' device drivers do not ask
//!   for it, and QEMU refuses FEATURES_OK to a device with `iommu_platform=on` without it.
//! - [`IommuHal<C>`] is a `Hal` wrapping the embedder's own `Hal` ([`DmaContext::Inner`]): memory
//!   comes from the inner `Hal`, and the addresses handed to the device are device addresses in
//!   the device's domain, per the endpoint's [`DmaSpace`] mode ([`DmaMode`]).
//!
//! The mode is chosen per domain: each device has its own `DmaSpace`, or several endpoints
//! share one domain and one `DmaSpace` (see "Shared domains" below).
//!
//! # Modes, and what each exposes to the device
//!
//! "Exposes" is what the device can reach while a buffer is shared or allocated; a granule is
//! the IOMMU's page (lowest bit of `page_size_mask`, §5.13.4).
//!
//! - **Strict** — the default ([`DmaSpace::new`], [`DmaSpace::attach_strict`]): every
//!   `dma_alloc` and `share` allocates a fresh IOVA range ([`IovaAllocator`]: never 0, never
//!   equal to the physical address) and MAPs it with the direction's permissions;
//!   `dma_dealloc` and `unshare` UNMAP it. Exposes each live buffer **widened to whole
//!   granules**: a 1-byte device-writable buffer exposes the rest of its granule (4 KiB, or
//!   64 KiB with a 64 KiB granule) to reads and writes — neighbouring heap data. Nothing else.
//! - **Isolated strict** ([`DmaSpace::isolated`], [`DmaSpace::attach_isolated`]; what Linux
//!   does for untrusted devices with its swiotlb bounce): as strict, but a granule the buffer
//!   only partly covers (its head and tail) is not mapped; a dedicated bounce granule from a
//!   fixed pool (allocated once from the inner `Hal`'s `dma_alloc`, owned by the space, at most
//!   `bounce_granules` in use, two per buffer at most) is mapped in its place, filled from the
//!   buffer on `share` and copied back to it on `unshare` for device-writable directions. Whole
//!   granules inside the buffer are mapped directly. `dma_alloc` memory is allocated
//!   granule-aligned in whole granules. Exposes **only the buffer's own bytes and bytes of
//!   bounce granules** (zeroed when taken, so nothing of an earlier buffer), as long as the
//!   IOMMU carries out the UNMAPs (see [`DmaSpace::leaked`]). Costs a copy of up to two
//!   granules per buffer and up to three MAPs.
//! - **Lazy unmapping** (a policy of the two strict modes, opt-in:
//!   [`DmaSpace::set_unmap_policy`]`(`[`UnmapPolicy::Lazy`]`{ max_pending, max_age_ns, clock })`;
//!   see [`flush`]): `share` MAPs as in strict mode, but `unshare` defers the UNMAP into a
//!   bounded flush queue sent as one batch (one notification) when it holds `max_pending`
//!   ranges, when its oldest entry is `max_age_ns` old (checked at every `share`/`unshare` and
//!   [`DmaSpace::flush_if_due`]), or on [`DmaSpace::flush`]. The IOVAs stay allocated until
//!   their UNMAP returned S_OK, so none is handed out for other memory; a `share` of exactly
//!   the granules of a pending direct map with the same permissions revives it instead of a
//!   MAP (same IOVA, taken out of the queue, no request). Exposes, **on top of strict, every
//!   buffer unshared since the last flush** — memory that is the driver's again and may hold
//!   other data by then — as Linux's `iommu.strict=0`: a device that keeps using addresses it
//!   was given can corrupt or read reused memory until the flush. `dma_dealloc` stays strict.
//! - **Identity-mapped** ([`DmaSpace::identity_mapped`], or [`DmaSpace::attach_identity`]
//!   without a bypass range): device address = physical address; the RAM ranges the embedder
//!   lists are identity-mapped up front, in batches, minus PROBE's reserved regions, the
//!   first granule and the granule of [`NO_CONTEXT_ADDRESS`]; `share`/`dma_alloc` send no
//!   request. Exposes **all the listed RAM, all the
//!   time**, READ|WRITE.
//! - **Identity-bypass** ([`DmaSpace::identity_bypass`], or [`DmaSpace::attach_identity`] with
//!   a bypass range and `VIRTIO_IOMMU_F_BYPASS_CONFIG`): the endpoint is attached to a bypass
//!   domain (ATTACH_F_BYPASS, §5.13.6.3); no request at all. Exposes **the whole physical
//!   address space** — RAM, MMIO, everything — as if there were no IOMMU.
//!
//! # Shared domains
//!
//! A domain may serve several endpoints (§5.13.6.3), and must when the host cannot isolate
//! them ([`Topology::alias_groups`](crate::topology::Topology::alias_groups)). Attach each
//! further endpoint through the domain's space ([`DmaSpace::attach_endpoint`], with its
//! reserved regions: the allocator keeps out the union over all endpoints, since the device
//! refuses a MAP over any endpoint's region); every buffer is then reachable by all of them at
//! the same IOVA. [`DmaSpace::detach_endpoint`] removes one and leaves the others working. The
//! space must be the only one in its domain: MAPs made by hand take their IOVAs from it first
//! ([`DmaSpace::reserve_iova`], [`DmaSpace::release_iova`]); a second space or an unannounced
//! MAP would overlap the space's own MAPs, which the device refuses with `S_INVAL`.
//!
//! Reserved regions of kind [`ResvMemKind::Direct`](crate::ResvMemKind::Direct) (devicetree
//! `iommu-addresses`, [`crate::topology::reserved`]) are MAPped 1:1 by every mode that maps,
//! and kept out of the allocator; [`ResvMemKind::SoftwareMsi`](crate::ResvMemKind::SoftwareMsi)
//! only kept out.
//!
//! # Failed buffers
//!
//! The `Hal` cannot return an error from `share`, and virtio-drivers puts whatever it returns in
//! a descriptor. A failed `share` therefore returns the start of the space's fault window
//! ([`DmaSpace::fault_window`]), device addresses that reach no memory, chosen per mode:
//! strict modes reserve IOVAs from the allocator that are never mapped (the top
//! `min(FAULT_WINDOW_MAX, half)` of its largest free range); identity-mapped uses the largest
//! range of IOVAs that is neither mapped nor reserved (construction fails when there is none);
//! a bypass domain translates nothing, so the embedder must name a physical range that no RAM
//! or device decodes, and [`DmaSpace::attach_identity`] falls back to identity-mapped without
//! one. The inner `Hal`'s share is undone at once. Without an installed space (an embedder
//! error) `share` returns [`NO_CONTEXT_ADDRESS`], which no mode hands out.
//!
//! # Shared state and locking
//!
//! `Hal` methods take no `self`, so the state lives in the embedder's statics, reached through
//! [`DmaContext::with`] on a zero-sized type: one [`spin::Mutex`] around the IOMMU driver shared
//! by every device, and one per device around its `DmaSpace`. [`with_locked`] locks them in that
//! order (IOMMU, then space) and [`dma_context!`](crate::dma_context) writes the whole context
//! type:
//!
//! ```
//! # use virtio_iommu_device::inprocess::{InProcessTransport as PciTransport, TestBed, TestHal as MyHal};
//! # use virtio_iommu_device::DeviceConfig;
//! # use virtio_iommu_driver::VirtIOIommu;
//! # use virtio_drivers::device::blk::VirtIOBlk;
//! # use virtio_drivers::{transport::Transport, BufferDirection, Hal};
//! use virtio_iommu_driver::dma::{spin::Mutex, AccessPlatform, DmaSpace, IommuHal};
//!
//! static IOMMU: Mutex<Option<VirtIOIommu<MyHal, PciTransport>>> = Mutex::new(None);
//! static BLK_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
//! virtio_iommu_driver::dma_context! {
//!     /// DMA context of the disk.
//!     pub struct BlkDma { inner: MyHal, iommu: IOMMU, space: BLK_DMA }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let bed = TestBed::new(DeviceConfig::builder().endpoints([0x10]).build()?);
//! # *IOMMU.lock() = Some(bed.driver()?);
//! # let (domain, endpoint) = (1, 0x10);
//! # let reserved_regions = IOMMU.lock().as_mut().unwrap().probe_reserved_regions(endpoint)?;
//! let mut guard = IOMMU.lock();
//! let iommu = guard.as_mut().unwrap();
//! let space = DmaSpace::attach_strict(iommu, domain, endpoint, &reserved_regions)?;
//! // or: DmaSpace::attach_isolated::<MyHal, _, _>(iommu, domain, endpoint, &reserved_regions,
//! //                                              DEFAULT_BOUNCE_GRANULES)?;
//! drop(guard);
//! *BLK_DMA.lock() = Some(space);
//! # // What the disk driver's allocations get: IOVAs the endpoint reaches, nothing else.
//! # let (iova, _vaddr) = IommuHal::<BlkDma>::dma_alloc(1, BufferDirection::Both);
//! # let dma = bed.dma_endpoint(endpoint)?;
//! # dma.write(iova, b"ring")?;
//! # assert!(dma.write(iova + 0x1000, b"ring").is_err(), "one page was allocated");
//! # Ok(())
//! # }
//! # fn make_blk<T: Transport>(
//! #     transport: T,
//! # ) -> virtio_drivers::Result<VirtIOBlk<IommuHal<BlkDma>, AccessPlatform<T>>> {
//! let blk = VirtIOBlk::<IommuHal<BlkDma>, _>::new(AccessPlatform::new(transport))?;
//! # Ok(blk)
//! # }
//! ```
//!
//! Rules: install the space before creating the device driver and keep it until the driver is
//! dropped; never call a device driver (which calls the `Hal`) while holding `IOMMU` or a space
//! lock — a spin lock is not re-entrant and that deadlocks; and take `IOMMU` before any space
//! lock everywhere else too. On several CPUs the locks serialise DMA mapping of all devices on
//! the IOMMU lock, which is what the single request queue does anyway.
//!
//! # Allocation
//!
//! After the `DmaSpace` is built, `share`, `unshare`, and the mapping part of `dma_alloc` and
//! `dma_dealloc` do not allocate heap memory: IOVA ranges, live mappings and bounce granules
//! live in pools whose size is fixed at construction ([`DEFAULT_IOVA_CAPACITY`],
//! [`DEFAULT_MAX_MAPPINGS`], [`DEFAULT_BOUNCE_GRANULES`]; exhaustion is
//! [`IommuError::DmaAlloc`](crate::IommuError::DmaAlloc)), and the IOMMU driver's requests use
//! DMA buffers it allocated once.

mod bounce;
pub mod flush;
mod hal;
mod mapper;
pub(crate) mod ranges;
mod space;
mod transport;

#[cfg(test)]
mod fake;

pub use crate::iova::{IovaAllocator, DEFAULT_IOVA_CAPACITY};
pub use bounce::DEFAULT_BOUNCE_GRANULES;
pub use flush::{Clock, FlushError, FlushStats, FnClock, UnmapPolicy, MAX_PENDING};
pub use hal::{with_locked, with_locked_irq, DmaContext, IommuHal};
pub use mapper::IommuMapper;
pub use ranges::PhysRange;
pub use space::{DmaMode, DmaSpace, DEFAULT_MAX_MAPPINGS, FAULT_WINDOW_MAX, NO_CONTEXT_ADDRESS};
/// The `spin` crate the locking helpers use ([`with_locked`], [`dma_context!`](crate::dma_context)),
/// so that embedders name the same `spin::Mutex`.
pub use spin;
pub use transport::AccessPlatform;
