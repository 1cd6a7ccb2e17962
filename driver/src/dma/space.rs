//! [`DmaSpace`]: the per-endpoint DMA state of [`IommuHal`](super::IommuHal) — its domain,
//! its [`DmaMode`], the IOVA allocator and live mappings (strict modes), the bounce granules
//! (isolated strict), the identity ranges (identity modes) and the fault window that failed
//! buffers get.

use super::bounce::BouncePool;
use super::flush::{FlushError, FlushQueue, FlushStats, Trigger, UnmapPolicy};
use super::mapper::IommuMapper;
use super::ranges::{inside_one, largest_gap, overlaps_any, sorted_union, subtract, PhysRange};
use crate::device::{BatchOp, VirtIOIommu};
use crate::error::IommuError;
use crate::iova::{AvlPool, IovaAllocator, Weight};
use crate::parse::{ReservedRegion, ResvMemKind};
use crate::wire::{Features, MapFlags};
use alloc::vec::Vec;
use core::ptr::NonNull;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

mod shared;

/// How a [`DmaSpace`] gives device addresses, and so what the device can reach (see the
/// [module documentation](super) for the exact exposure of each).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum DmaMode {
    /// One MAP per buffer at a fresh IOVA, of the whole granules the buffer touches; UNMAPped
    /// when the buffer is freed or unshared. The default ([`DmaSpace::new`]).
    Strict,
    /// Strict, but the granules a buffer only partly covers are bounced through dedicated
    /// granules ([`DmaSpace::isolated`]): the device reaches only the buffer's own bytes.
    IsolatedStrict,
    /// Identity through a bypass domain (ATTACH_F_BYPASS): no mappings at all.
    IdentityBypass,
    /// Identity mappings of the RAM ranges, set up once.
    IdentityMapped,
}

/// Default number of live mappings of a strict [`DmaSpace`] ([`DmaSpace::new`]).
pub const DEFAULT_MAX_MAPPINGS: usize = 1024;

/// Largest fault window (bytes) a strict [`DmaSpace`] reserves from its IOVA allocator: 1 TiB.
pub const FAULT_WINDOW_MAX: u64 = 1 << 40;

/// The device address a failed `IommuHal::share` returns when no [`DmaSpace`] is installed
/// (the embedder's [`DmaContext::with`](super::DmaContext::with) fails, so no mode is known):
/// `2^64 - FAULT_WINDOW_MAX`. No space ever hands it out: strict modes reserve its granule
/// from their allocator (with a 64-bit `input_range` it is the start of the usual fault
/// window; with a smaller one, as QEMU ≥ 9.0's 48 bits, it is outside `input_range`, never
/// mapped), identity-mapped mode leaves its granule unmapped, and bypass mode refuses buffers
/// there; as a physical address it lies far above the physical address space of any Arm or x86
/// CPU (52 bits at most), so it reaches nothing in a bypass domain either.
pub const NO_CONTEXT_ADDRESS: u64 = u64::MAX - (FAULT_WINDOW_MAX - 1);

/// "No bounce granule".
const NO_SLOT: u32 = u32::MAX;

/// One live mapping of a strict [`DmaSpace`], keyed by its first IOVA.
#[derive(Clone, Copy, Debug)]
struct LiveMapping {
    /// Physical address of the buffer's first granule (granule-aligned).
    phys_base: u64,
    /// Bytes (whole granules) of IOVA space.
    len: u64,
    /// The permissions it was mapped with.
    flags: MapFlags,
    /// Bounce granules of the first and the last granule (isolated strict), or `NO_SLOT`.
    head: u32,
    tail: u32,
    /// The buffer: offset of its first byte in the first granule, and its length in bytes.
    offset: u64,
    buf_len: u64,
    /// The inner `Hal` allocation behind an isolated `dma_alloc` (physical address, virtual
    /// address, pages); `alloc_pages == 0` when the caller's own values are the allocation.
    alloc_phys: u64,
    alloc_vaddr: usize,
    alloc_pages: usize,
    /// The UNMAP failed: the IOVAs (and bounce granules) stay allocated until a later UNMAP
    /// succeeds ([`DmaSpace::unmap_all`]).
    stale: bool,
    /// UNMAPped by [`DmaSpace::unmap_all`] while the buffer is still held: its IOVAs and
    /// bounce granules stay allocated until the buffer's `unshare`/`dma_dealloc`, which then
    /// sends no request but still copies back and frees.
    unmapped: bool,
    /// Released by the driver, its UNMAP deferred in the flush queue (lazy policy): IOVAs,
    /// slot and bounce granules stay allocated until the flush's UNMAP returns `S_OK`.
    deferred: bool,
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
        /// Isolated strict: the bounce granules.
        bounce: Option<BouncePool>,
    },
    /// `ranges`: sorted, disjoint. Bypass: the reserved regions (buffers must avoid them);
    /// mapped: the identity-mapped ranges (buffers must lie inside one).
    Identity {
        bypass: bool,
        ranges: Vec<PhysRange>,
    },
}

/// What taking a buffer back ([`DmaSpace::take`]) found.
#[derive(Debug)]
pub(super) struct Taken {
    /// The physical address the device address stood for.
    pub(super) phys: u64,
    /// Key of the live mapping (strict modes), `None` in identity modes.
    key: Option<u64>,
    /// Outcome of the UNMAP (`Ok` in identity modes).
    pub(super) unmapped: Result<(), IommuError>,
    /// The inner allocation behind an isolated `dma_alloc`: `(phys, vaddr, pages)`.
    pub(super) alloc: Option<(u64, usize, usize)>,
    /// The UNMAP was deferred into the flush queue: [`DmaSpace::release`] keeps everything.
    deferred: bool,
    /// The deferred UNMAP started an empty flush queue (whose age is then 0): only its size
    /// bound, or a time bound of 0, can be due ([`DmaSpace::flush_after`]).
    fresh: bool,
}

/// Per-endpoint DMA state of [`IommuHal`](super::IommuHal): the domain the endpoint is
/// attached to and how device addresses are given ([`DmaMode`]): for the strict modes the IOVA
/// allocator and live mappings (fixed capacity, no allocation after construction) and, isolated,
/// the bounce granules; for the identity modes the ranges a buffer may be in. Every mode has a
/// [fault window](Self::fault_window): device addresses that reach nothing, given to buffers
/// that could not be mapped.
///
/// A domain may serve several endpoints (devices the host cannot isolate from each other, or
/// that the embedder chooses to group): the space is then the one IOVA space of all of them
/// ([`Self::attach_endpoint`], [`Self::detach_endpoint`]), and its IOVA allocator keeps out
/// the union of their reserved regions. MAPs made in the domain by hand must use IOVAs taken
/// from the space first ([`Self::reserve_iova`]); nothing else may map IOVAs in the domain.
#[derive(Debug)]
pub struct DmaSpace {
    domain: u32,
    mode: Mode,
    /// Endpoints attached through this space, in attach order.
    endpoints: Vec<u32>,
    /// IOVA ranges taken for manual MAPs ([`Self::reserve_iova`]), inclusive, whole granules.
    claims: Vec<PhysRange>,
    /// Strict modes: the 1:1 mappings of `Direct` reserved regions (inclusive, whole
    /// granules), sorted, disjoint.
    direct: Vec<PhysRange>,
    /// Device addresses that reach no memory (inclusive ends).
    fault: PhysRange,
    /// Number of MAP requests sent for buffers (identity setup and [`Self::unmap_all`]
    /// included).
    pub maps: u64,
    /// Number of UNMAP requests sent.
    pub unmaps: u64,
    /// Number of failed MAP/UNMAP requests and of buffers refused (exhausted IOVAs, mapping
    /// slots or bounce granules, identity buffers outside the mapped RAM). The `Hal` cannot
    /// return errors: they are counted here and logged, and the failed `share` returns the
    /// start of the [fault window](Self::fault_window).
    pub failures: u64,
    /// Number of mappings kept after a failed UNMAP (strict modes): their IOVAs and bounce
    /// granules stay allocated, so neither is handed out again while the device may still
    /// reach it; [`Self::unmap_all`] retries them. The buffer memory behind such a mapping has
    /// gone back to its owner (the `Hal` contract gives no way to keep it), so while this is
    /// non-zero the endpoint may still reach that memory: stop the endpoint (reset it, clear
    /// its bus mastering) before the memory is reused.
    pub leaked: u64,
    /// Number of buffers whose head or tail went through a bounce granule (isolated strict).
    pub bounced: u64,
    /// The flush queue of the lazy [`UnmapPolicy`]; `None` under the strict one.
    flush: Option<FlushQueue>,
}

impl DmaSpace {
    /// Strict mode for an endpoint already attached to `domain`, allocating IOVAs from `iova`,
    /// with room for [`DEFAULT_MAX_MAPPINGS`] live mappings. This is the default mode.
    ///
    /// # Errors
    ///
    /// Those of [`Self::strict`].
    pub fn new(domain: u32, iova: IovaAllocator) -> Result<Self, IommuError> {
        Self::strict(domain, iova, DEFAULT_MAX_MAPPINGS)
    }

    /// Strict mode with room for `max_mappings` live mappings (allocated now). The fault window
    /// is reserved from `iova` now: the top `min(FAULT_WINDOW_MAX, half)` bytes (whole
    /// granules, at least one) of its largest free range, never allocated nor mapped.
    ///
    /// # Errors
    ///
    /// [`IommuError::DmaAlloc`] when `iova` has no free granule for the fault window.
    pub fn strict(
        domain: u32,
        iova: IovaAllocator,
        max_mappings: usize,
    ) -> Result<Self, IommuError> {
        Self::strict_with(domain, iova, max_mappings, None)
    }

    /// Isolated strict mode (see [`DmaMode::IsolatedStrict`]): as [`Self::strict`], plus
    /// `bounce_granules` granule-sized, granule-aligned bounce pages allocated now from
    /// `B::dma_alloc` (use the context's inner `Hal`) and owned by the space (freed when it is
    /// dropped; those still in use by a mapping whose UNMAP failed are leaked). A buffer needs
    /// at most two (head and tail), so at most `bounce_granules / 2` buffers with unaligned
    /// ends are in flight; beyond that `share` fails ([`IommuError::DmaAlloc`], fault window).
    /// [`DEFAULT_BOUNCE_GRANULES`](super::DEFAULT_BOUNCE_GRANULES) is a start.
    ///
    /// # Errors
    ///
    /// Those of [`Self::strict`]; [`IommuError::DmaAlloc`] when `B::dma_alloc` fails.
    pub fn isolated<B: Hal>(
        domain: u32,
        iova: IovaAllocator,
        max_mappings: usize,
        bounce_granules: usize,
    ) -> Result<Self, IommuError> {
        let pool = BouncePool::new::<B>(iova.granule(), bounce_granules)?;
        Self::strict_with(domain, iova, max_mappings, Some(pool))
    }

    fn strict_with(
        domain: u32,
        mut iova: IovaAllocator,
        max_mappings: usize,
        bounce: Option<BouncePool>,
    ) -> Result<Self, IommuError> {
        let g = iova.granule();
        // The largest free range; `e - s` is its size minus 1 (no overflow).
        let (s, e) = iova
            .iter_free()
            .max_by_key(|&(s, e)| e - s)
            .ok_or(IommuError::DmaAlloc)?;
        // Free ranges start at IOVA `g` or above, so the size fits in a u64.
        let size = e - s + 1;
        let window = ((size / 2) & !(g - 1)).clamp(g, FAULT_WINDOW_MAX.max(g));
        let start = e - (window - 1);
        // The tail of a free range: needs no new node, cannot fail for lack of one.
        iova.try_reserve(start, e)?;
        // Never hand out `NO_CONTEXT_ADDRESS` (usually inside the window, or outside the
        // allocator's range; `reserve` cannot fail, at worst it drops a small remainder).
        iova.reserve(NO_CONTEXT_ADDRESS, NO_CONTEXT_ADDRESS);
        Ok(Self::with_mode(
            domain,
            Mode::Strict {
                iova,
                live: AvlPool::with_capacity(max_mappings),
                bounce,
            },
            PhysRange { start, end: e },
        ))
    }

    /// Identity mode for an endpoint already attached to `domain` with ATTACH_F_BYPASS
    /// (§5.13.6.3): device address = physical address. A bypass domain translates nothing, so
    /// no address faults: the embedder names `unbacked`, a guest-physical range (inclusive
    /// ends) that no RAM and no device decodes (e.g. above the platform's physical address
    /// size), which becomes the fault window. Buffers overlapping a `reserved` region (which the
    /// device does not pass through as RAM), the window, or physical address 0 are refused.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when `unbacked` is inverted, contains address 0, or
    /// overlaps `ram` (guest-physical RAM ranges, inclusive) or a `reserved` region.
    pub fn identity_bypass(
        domain: u32,
        ram: &[PhysRange],
        reserved: &[ReservedRegion],
        unbacked: PhysRange,
    ) -> Result<Self, IommuError> {
        let ranges = sorted_union(
            reserved
                .iter()
                .filter(|r| r.kind != ResvMemKind::Direct)
                .map(|r| PhysRange {
                    start: r.start,
                    end: r.end,
                }),
        );
        let ram = sorted_union(ram.iter().copied());
        if unbacked.start == 0
            || unbacked.start > unbacked.end
            || overlaps_any(&ranges, unbacked.start, unbacked.end)
            || overlaps_any(&ram, unbacked.start, unbacked.end)
        {
            return Err(IommuError::InvalidRange);
        }
        Ok(Self::with_mode(
            domain,
            Mode::Identity {
                bypass: true,
                ranges,
            },
            unbacked,
        ))
    }

    /// Identity mode by mappings, for an endpoint already attached to the (new, empty) domain
    /// `domain`: MAPs every range of `ram` (guest-physical, inclusive ends) at IOVA = physical
    /// address with READ|WRITE, in batches ([`IommuMapper::submit_batch`]), after clipping each
    /// to `input_range`, shrinking it to whole granules, leaving out the first granule (device
    /// address 0 is never handed out) and the granule of [`NO_CONTEXT_ADDRESS`], and cutting out
    /// every `reserved` region (widened to whole granules; R30) except
    /// [`ResvMemKind::Direct`] ones, which are mapped 1:1 like RAM (widened outward to whole
    /// granules). Overlapping RAM ranges are merged first. The fault window is the largest
    /// granule-aligned range of IOVAs that is neither mapped nor reserved (accesses there fault).
    ///
    /// # Errors
    ///
    /// The first failed MAP (every MAP that succeeded is UNMAPped again);
    /// [`IommuError::InvalidRange`] when nothing of `ram` remains to map, or when the mappings
    /// and reserved regions leave no whole granule unmapped for the fault window (nothing
    /// is sent then).
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
        let widen = |start: u64, end: u64| PhysRange {
            start: start & !(g - 1),
            end: end | (g - 1),
        };
        let reserved_holes = sorted_union(
            reserved
                .iter()
                .filter(|r| r.kind != ResvMemKind::Direct)
                .map(|r| widen(r.start, r.end)),
        );
        // `Direct` regions are mapped 1:1 like RAM (widened outward to whole granules).
        let direct = reserved
            .iter()
            .filter(|r| r.kind == ResvMemKind::Direct)
            .map(|r| widen(r.start, r.end));
        // Not mapped either: the granule of `NO_CONTEXT_ADDRESS` (it may be in the window).
        let no_context = widen(NO_CONTEXT_ADDRESS, NO_CONTEXT_ADDRESS);
        let holes = sorted_union(reserved_holes.iter().copied().chain([no_context]));
        let mut ranges = Vec::new();
        for r in sorted_union(ram.iter().copied().chain(direct)) {
            let Some(start) = r.start.max(lo).max(g).checked_next_multiple_of(g) else {
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
        let taken = sorted_union(ranges.iter().chain(&reserved_holes).copied());
        let fault = largest_gap(&taken, g).ok_or(IommuError::InvalidRange)?;
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
            fault,
        );
        space.maps = ops.len() as u64;
        Ok(space)
    }

    /// Strict mode, set up on the driver: an IOVA allocator over `input_range` minus
    /// `reserved` ([`IovaAllocator::for_endpoint`]; PROBE's regions or the merged list of
    /// [`crate::topology::reserved::merge`]), the space ([`Self::new`]), then ATTACH of
    /// `endpoint` to `domain` (§5.13.6.3) and 1:1 MAPs of its [`ResvMemKind::Direct`] regions
    /// ([`Self::attach_endpoint`]). Further endpoints join with [`Self::attach_endpoint`].
    ///
    /// # Errors
    ///
    /// Those of [`IovaAllocator::for_endpoint`], [`Self::new`] and
    /// [`Self::attach_endpoint`].
    pub fn attach_strict<H: Hal, T: Transport>(
        iommu: &mut VirtIOIommu<H, T>,
        domain: u32,
        endpoint: u32,
        reserved: &[ReservedRegion],
    ) -> Result<Self, IommuError> {
        let c = *iommu.config();
        let iova = IovaAllocator::for_endpoint(c.input_range, c.granule, reserved)?;
        let mut space = Self::new(domain, iova)?;
        space.attach_endpoint(iommu, endpoint, reserved)?;
        Ok(space)
    }

    /// Isolated strict mode, set up on the driver: as [`Self::attach_strict`], with
    /// `bounce_granules` bounce granules from `B` ([`Self::isolated`], [`DEFAULT_MAX_MAPPINGS`]
    /// live mappings).
    ///
    /// # Errors
    ///
    /// Those of [`IovaAllocator::for_endpoint`], [`Self::isolated`] and
    /// [`Self::attach_endpoint`].
    pub fn attach_isolated<B: Hal, H: Hal, T: Transport>(
        iommu: &mut VirtIOIommu<H, T>,
        domain: u32,
        endpoint: u32,
        reserved: &[ReservedRegion],
        bounce_granules: usize,
    ) -> Result<Self, IommuError> {
        let c = *iommu.config();
        let iova = IovaAllocator::for_endpoint(c.input_range, c.granule, reserved)?;
        let mut space = Self::isolated::<B>(domain, iova, DEFAULT_MAX_MAPPINGS, bounce_granules)?;
        space.attach_endpoint(iommu, endpoint, reserved)?;
        Ok(space)
    }

    /// Identity mode, set up on the driver: with `VIRTIO_IOMMU_F_BYPASS_CONFIG` negotiated and
    /// a `bypass_unbacked` range given ([`Self::identity_bypass`]), ATTACH of `endpoint` to
    /// `domain` with ATTACH_F_BYPASS; otherwise a plain ATTACH and identity mappings of `ram`
    /// minus `reserved` ([`Self::identity_mapped`]; on failure the endpoint is DETACHed again).
    /// Without `bypass_unbacked` no bypass domain is used: a bypass domain has no address that
    /// faults, so a failed buffer would have no safe device address. `domain` must not exist
    /// yet (or be a bypass domain, resp. an empty one).
    ///
    /// # Errors
    ///
    /// Those of [`Self::identity_bypass`], [`VirtIOIommu::attach_bypass`],
    /// [`VirtIOIommu::attach`] and [`Self::identity_mapped`].
    pub fn attach_identity<H: Hal, T: Transport>(
        iommu: &mut VirtIOIommu<H, T>,
        domain: u32,
        endpoint: u32,
        ram: &[PhysRange],
        reserved: &[ReservedRegion],
        bypass_unbacked: Option<PhysRange>,
    ) -> Result<Self, IommuError> {
        if let Some(unbacked) = bypass_unbacked {
            if iommu.features().contains(Features::BYPASS_CONFIG) {
                let mut space = Self::identity_bypass(domain, ram, reserved, unbacked)?;
                iommu.attach_bypass(domain, endpoint)?;
                space.endpoints.push(endpoint);
                return Ok(space);
            }
        }
        iommu.attach(domain, endpoint)?;
        let mut space = Self::identity_mapped(iommu, domain, ram, reserved).inspect_err(|_| {
            let _ = iommu.detach(domain, endpoint);
        })?;
        space.endpoints.push(endpoint);
        Ok(space)
    }

    fn with_mode(domain: u32, mode: Mode, fault: PhysRange) -> Self {
        Self {
            domain,
            mode,
            endpoints: Vec::new(),
            claims: Vec::new(),
            direct: Vec::new(),
            fault,
            maps: 0,
            unmaps: 0,
            failures: 0,
            leaked: 0,
            bounced: 0,
            flush: None,
        }
    }

    /// The domain.
    pub fn domain(&self) -> u32 {
        self.domain
    }

    /// The mode.
    pub fn mode(&self) -> DmaMode {
        match self.mode {
            Mode::Strict { bounce: None, .. } => DmaMode::Strict,
            Mode::Strict {
                bounce: Some(_), ..
            } => DmaMode::IsolatedStrict,
            Mode::Identity { bypass: true, .. } => DmaMode::IdentityBypass,
            Mode::Identity { bypass: false, .. } => DmaMode::IdentityMapped,
        }
    }

    /// The fault window: device addresses (IOVAs, or physical addresses for a bypass domain),
    /// inclusive ends, that reach no memory — strict modes: IOVAs reserved from the allocator,
    /// never mapped; identity-mapped: IOVAs neither mapped nor reserved; bypass: the embedder's
    /// unbacked range. A failed `share` returns its start; a failed buffer is reached only
    /// within the window if it is no longer than the window (strict: at least
    /// `min(FAULT_WINDOW_MAX, half the largest free IOVA range)` bytes, placed at the top of
    /// that range).
    pub fn fault_window(&self) -> PhysRange {
        self.fault
    }

    /// Whether `addr` lies in the [fault window](Self::fault_window).
    pub fn is_fault_address(&self, addr: u64) -> bool {
        (self.fault.start..=self.fault.end).contains(&addr)
    }

    /// Number of live per-buffer mappings, including those kept after a failed UNMAP and those
    /// UNMAPped by [`Self::unmap_all`] but not yet released by the driver (0 in identity mode).
    pub fn live_mappings(&self) -> usize {
        match &self.mode {
            Mode::Strict { live, .. } => live.len(),
            Mode::Identity { .. } => 0,
        }
    }

    /// Bounce granules in use, and in the pool (isolated strict; `(0, 0)` otherwise).
    pub fn bounce_granules(&self) -> (usize, usize) {
        match &self.mode {
            Mode::Strict {
                bounce: Some(b), ..
            } => (b.in_use(), b.capacity()),
            _ => (0, 0),
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

    /// The strict modes' IOVA allocator.
    pub fn iova_allocator(&self) -> Option<&IovaAllocator> {
        match &self.mode {
            Mode::Strict { iova, .. } => Some(iova),
            Mode::Identity { .. } => None,
        }
    }

    /// Gives the device an address for the physical buffer `phys..phys + len` (exclusive end,
    /// bytes; `len` 0 counts as 1) and returns the device address of `phys`. No heap allocation.
    /// Never returns 0 nor an address in the fault window.
    ///
    /// Strict: the buffer, widened to whole granules, is MAPped with `flags` at a fresh IOVA
    /// range — under the lazy [`UnmapPolicy`], a pending (unshared, not yet UNMAPped) direct
    /// map of exactly these granules with these `flags` is revived instead: same IOVA, no
    /// request (see [`super::flush`]). Isolated strict: the same, but only for buffers made of
    /// whole granules (this method has no buffer to bounce; `IommuHal::share` bounces). Identity: returns `phys`
    /// after checking the buffer lies inside one identity-mapped range (resp. outside every
    /// reserved region, the fault window and address 0); no request is sent.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when the buffer passes 2^64;
    /// [`IommuError::Unaligned`] when the IOMMU's granule differs from the allocator's (not
    /// checked for a buffer that revives a pending mapping: no request is sent then), or
    /// (isolated strict) the buffer does not start and end on granule boundaries;
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
        self.map_counted(iommu, phys, len, flags, None, None)
    }

    /// [`Self::map_buffer`] of a shared buffer: in isolated strict mode the sub-granule head
    /// and tail of the buffer go through bounce granules, filled from `buffer` now (every
    /// direction: a device that writes only part of the buffer then leaves the rest as it was).
    ///
    /// # Safety
    ///
    /// `buffer` is valid for reads of `buffer.len()` bytes; `phys` is its physical address.
    pub(super) unsafe fn share_buffer(
        &mut self,
        iommu: &mut dyn IommuMapper,
        phys: u64,
        buffer: NonNull<[u8]>,
        flags: MapFlags,
    ) -> Result<u64, IommuError> {
        let src = buffer.as_ptr() as *const u8;
        self.map_counted(iommu, phys, buffer.len() as u64, flags, Some(src), None)
    }

    /// [`Self::map_buffer`] of an isolated `dma_alloc`: `phys..phys + len` are whole granules
    /// inside the inner allocation `alloc` (`(phys, vaddr, pages)`), which [`Self::take`]
    /// returns again.
    pub(super) fn map_alloc(
        &mut self,
        iommu: &mut dyn IommuMapper,
        phys: u64,
        len: u64,
        alloc: (u64, usize, usize),
    ) -> Result<u64, IommuError> {
        let rw = MapFlags::READ | MapFlags::WRITE;
        self.map_counted(iommu, phys, len, rw, None, Some(alloc))
    }

    /// The alignment (bytes) `dma_alloc` memory needs so that its mapping exposes nothing else:
    /// the granule in isolated strict mode, `None` otherwise.
    pub(super) fn alloc_alignment(&self) -> Option<u64> {
        match &self.mode {
            Mode::Strict {
                iova,
                bounce: Some(_),
                ..
            } => Some(iova.granule()),
            _ => None,
        }
    }

    fn map_counted(
        &mut self,
        iommu: &mut dyn IommuMapper,
        phys: u64,
        len: u64,
        flags: MapFlags,
        src: Option<*const u8>,
        alloc: Option<(u64, usize, usize)>,
    ) -> Result<u64, IommuError> {
        if alloc.is_none() {
            if let Some(at) = self.revive(phys, len, flags) {
                return Ok(at);
            }
        }
        self.flush_if_due(iommu);
        let mut result = self.map_inner(iommu, phys, len, flags, src, alloc);
        if result == Err(IommuError::DmaAlloc) && self.pending_unmaps() > 0 {
            // IOVAs or slots held by deferred UNMAPs: flush them, then try once more.
            let _ = self.flush(iommu);
            result = self.map_inner(iommu, phys, len, flags, src, alloc);
        }
        if result.is_err() {
            self.failures += 1;
        }
        result
    }

    /// The lazy policy's fast path of a `share`/[`Self::map_buffer`] (see `super::flush`): a
    /// pending UNMAP of a direct map of exactly the granules of `phys..phys + len` (bytes,
    /// granules of the space's IOVA allocator) with `flags` is taken out of the queue and its
    /// mapping is live again; returns the buffer's device address. `None` — nothing changed — under the strict
    /// policy, in identity modes, with nothing pending or nothing matching, and for a buffer
    /// that would need bounce granules (isolated strict); the caller then maps as usual. One
    /// live-mapping lookup per candidate, no clock read, no request.
    fn revive(&mut self, phys: u64, len: u64, flags: MapFlags) -> Option<u64> {
        let queue = self.flush.as_mut().filter(|q| q.len() > 0)?;
        let Mode::Strict { iova, live, bounce } = &mut self.mode else {
            return None;
        };
        let g = iova.granule();
        let last = phys.checked_add(len.max(1) - 1)?;
        let phys_base = phys & !(g - 1);
        let offset = phys - phys_base;
        // A buffer ending on the last byte of the address space is never revived: its span
        // does not fit in u64 (`map_inner` handles it).
        let span = (last | (g - 1)).checked_add(1)? - phys_base;
        if bounce.is_some() && (offset != 0 || last & (g - 1) != g - 1) {
            // Isolated strict: a partial head or tail granule goes through a bounce granule.
            return None;
        }
        let at = queue.revive(phys_base, span, flags, |key, node| {
            let m = match live.at_mut(node, key) {
                Some(m) => Some(m),
                None => live.get_mut(key),
            };
            m.is_some_and(|m| {
                // The same memory too: a pending entry's key names its mapping, so this
                // only guards against a bookkeeping slip reviving another one.
                let fits = m.deferred
                    && m.phys_base == phys_base
                    && m.len == span
                    && !m.stale
                    && !m.unmapped
                    && m.flags == flags
                    && m.head == NO_SLOT
                    && m.tail == NO_SLOT
                    && m.alloc_pages == 0;
                if fits {
                    m.deferred = false;
                    m.offset = offset;
                    m.buf_len = len;
                }
                fits
            })
        })?;
        Some(at + offset)
    }

    fn map_inner(
        &mut self,
        iommu: &mut dyn IommuMapper,
        phys: u64,
        len: u64,
        flags: MapFlags,
        src: Option<*const u8>,
        alloc: Option<(u64, usize, usize)>,
    ) -> Result<u64, IommuError> {
        let last = phys
            .checked_add(len.max(1) - 1)
            .ok_or(IommuError::InvalidRange)?;
        let (iova, live, bounce) = match &mut self.mode {
            Mode::Identity { bypass, ranges } => {
                let reachable = if *bypass {
                    phys != 0
                        && !(phys..=last).contains(&NO_CONTEXT_ADDRESS)
                        && !overlaps_any(ranges, phys, last)
                        && !overlaps_any(&[self.fault], phys, last)
                } else {
                    // Identity ranges never contain address 0 nor the fault window.
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
            Mode::Strict { iova, live, bounce } => (iova, live, bounce),
        };
        let g = iommu.granule();
        if g != iova.granule() {
            return Err(IommuError::Unaligned {
                value: g,
                granule: iova.granule(),
            });
        }
        let phys_base = phys & !(g - 1);
        let offset = phys - phys_base;
        let span = (last | (g - 1))
            .checked_add(1)
            .map_or(0u64.wrapping_sub(phys_base), |end| end - phys_base);
        if span == 0 {
            return Err(IommuError::InvalidRange);
        }
        let granules = span / g;
        // Isolated: bounce the first granule unless the buffer covers it whole, and the last
        // one (when distinct) unless the buffer ends on its last byte.
        let (head, tail) = match bounce {
            Some(_) => (
                offset != 0 || last - phys_base < g - 1,
                granules > 1 && last & (g - 1) != g - 1,
            ),
            None => (false, false),
        };
        if (head || tail) && src.is_none() {
            return Err(IommuError::Unaligned {
                value: phys,
                granule: g,
            });
        }
        let mut head_slot = None;
        let mut tail_slot = None;
        if let Some(pool) = bounce.as_mut() {
            if head {
                head_slot = Some(pool.take().ok_or(IommuError::DmaAlloc)?);
            }
            if tail {
                match pool.take() {
                    Some(s) => tail_slot = Some(s),
                    None => {
                        if let Some((i, _)) = head_slot {
                            pool.give_back(i);
                        }
                        return Err(IommuError::DmaAlloc);
                    }
                }
            }
        }
        let give_back = |bounce: &mut Option<BouncePool>| {
            if let Some(pool) = bounce.as_mut() {
                for (i, _) in [head_slot, tail_slot].into_iter().flatten() {
                    pool.give_back(i);
                }
            }
        };
        let at = match iova.alloc(span) {
            Ok(at) if at == phys_base => {
                // Never hand out the identity address: a device that wrongly bypassed
                // translation would then still work, hiding exactly what strict mode is there
                // to show.
                let other = iova.alloc(span);
                let _ = iova.free(at, span);
                other
            }
            other => other,
        };
        let at = match at {
            Ok(at) => at,
            Err(e) => {
                give_back(bounce);
                return Err(e);
            }
        };
        let (alloc_phys, alloc_vaddr, alloc_pages) = alloc.unwrap_or((0, 0, 0));
        let entry = LiveMapping {
            phys_base,
            len: span,
            flags,
            head: head_slot.map_or(NO_SLOT, |(i, _)| i),
            tail: tail_slot.map_or(NO_SLOT, |(i, _)| i),
            offset,
            buf_len: len,
            alloc_phys,
            alloc_vaddr,
            alloc_pages,
            stale: false,
            unmapped: false,
            deferred: false,
        };
        if let Err(e) = live.insert(at, entry) {
            let _ = iova.free(at, span);
            give_back(bounce);
            return Err(e);
        }
        if let (Some(pool), Some(src)) = (bounce.as_ref(), src) {
            // Fill the bounce granules with the buffer's bytes at their offsets.
            if let Some((i, _)) = head_slot {
                let n = len.min(g - offset);
                // SAFETY: `src` is valid for `len` bytes (the caller's guarantee), and
                // `offset + n <= g`; the granule is taken.
                unsafe { pool.copy_in(i, offset, src, n as usize) };
            }
            if let Some((i, _)) = tail_slot {
                let tail_base = last & !(g - 1);
                let skip = tail_base - phys;
                // SAFETY: bytes `skip..len` of the buffer, `len - skip < g`; granule taken.
                unsafe { pool.copy_in(i, 0, src.add(skip as usize), (len - skip) as usize) };
            }
        }
        // The MAPs: bounce head granule, the whole granules in between, bounce tail granule.
        let first_direct = u64::from(head);
        let end_direct = if tail { granules - 1 } else { granules };
        let mut pieces: [Option<(u64, u64, u64)>; 3] = [None; 3];
        if let Some((_, p)) = head_slot {
            pieces[0] = Some((at, at + (g - 1), p));
        }
        if end_direct > first_direct {
            pieces[1] = Some((
                at + first_direct * g,
                at + (end_direct * g - 1),
                phys_base + first_direct * g,
            ));
        }
        if let Some((_, p)) = tail_slot {
            let s = at + (granules - 1) * g;
            pieces[2] = Some((s, s + (g - 1), p));
        }
        let mut mapped_any = false;
        for (s, e, p) in pieces.into_iter().flatten() {
            self.maps += 1;
            if let Err(e) = iommu.map(self.domain, s, e, p, flags) {
                if mapped_any {
                    // One UNMAP over the whole IOVA range removes every piece (R21).
                    self.unmaps += 1;
                    if iommu.unmap(self.domain, at, at + (span - 1)).is_err() {
                        self.failures += 1;
                        self.leaked += 1;
                        if let Some(m) = live.get_mut(at) {
                            m.stale = true;
                        }
                        return Err(e);
                    }
                }
                live.remove(at);
                let _ = iova.free(at, span);
                give_back(bounce);
                return Err(e);
            }
            mapped_any = true;
        }
        if head || tail {
            self.bounced += 1;
        }
        Ok(at + offset)
    }

    /// Takes back the device address `addr` (any address inside a buffer of
    /// [`Self::map_buffer`]): strict modes UNMAP its whole mapping — or, with `defer` under the
    /// lazy [`UnmapPolicy`], queue its UNMAP in the flush queue (then call
    /// [`Self::flush_if_due`] after [`Self::release`]); nothing is released yet (see
    /// [`Self::release`]). Identity: `addr` itself, no request.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when `addr` is not in a live mapping (strict), or in one
    /// whose UNMAP is already pending.
    pub(super) fn take(
        &mut self,
        iommu: &mut dyn IommuMapper,
        addr: u64,
        defer: bool,
    ) -> Result<Taken, IommuError> {
        let live = match &mut self.mode {
            Mode::Identity { .. } => {
                return Ok(Taken {
                    phys: addr,
                    key: None,
                    unmapped: Ok(()),
                    alloc: None,
                    deferred: false,
                    fresh: false,
                })
            }
            Mode::Strict { live, .. } => live,
        };
        let Some((node, base, entry)) = live
            .floor_handle_mut(addr)
            .filter(|(_, b, m)| addr - *b < m.len)
        else {
            self.failures += 1;
            return Err(IommuError::InvalidRange);
        };
        if entry.deferred {
            // Released already: a second unshare of the same buffer.
            self.failures += 1;
            return Err(IommuError::InvalidRange);
        }
        // A full queue (not flushed by the caller) falls back to a strict UNMAP.
        let queued = match (&mut self.flush, defer && !entry.unmapped) {
            (Some(q), true) => q.push(base, entry.len, entry.phys_base, entry.flags, node),
            _ => None,
        };
        if let Some(fresh) = queued {
            entry.deferred = true;
            let m = *entry;
            return Ok(Taken {
                phys: m.phys_base + (addr - base),
                key: Some(base),
                unmapped: Ok(()),
                alloc: (m.alloc_pages != 0).then_some((m.alloc_phys, m.alloc_vaddr, m.alloc_pages)),
                deferred: true,
                fresh,
            });
        }
        let m = *entry;
        let unmapped = if m.unmapped {
            // Already UNMAPped by `unmap_all`.
            Ok(())
        } else {
            self.unmaps += 1;
            iommu.unmap(self.domain, base, base + (m.len - 1))
        };
        if unmapped.is_err() {
            self.failures += 1;
        }
        Ok(Taken {
            phys: m.phys_base + (addr - base),
            key: Some(base),
            unmapped,
            alloc: (m.alloc_pages != 0).then_some((m.alloc_phys, m.alloc_vaddr, m.alloc_pages)),
            deferred: false,
            fresh: false,
        })
    }

    /// Copies the bounced head and tail of the buffer of `taken` back to `dst` (isolated
    /// strict; nothing otherwise).
    ///
    /// # Safety
    ///
    /// `dst` is valid for writes of the buffer's length (as shared) and is that buffer.
    pub(super) unsafe fn copy_back(&self, taken: &Taken, dst: *mut u8) {
        let (
            Mode::Strict {
                live,
                bounce: Some(pool),
                iova,
            },
            Some(key),
        ) = (&self.mode, taken.key)
        else {
            return;
        };
        let Some((_, m)) = live.floor(key).filter(|&(b, _)| b == key) else {
            return;
        };
        let g = iova.granule();
        if m.head != NO_SLOT {
            let n = m.buf_len.min(g - m.offset);
            // SAFETY: the caller's guarantee for `dst`; `offset + n <= g`.
            unsafe { pool.copy_out(m.head, m.offset, dst, n as usize) };
        }
        if m.tail != NO_SLOT {
            let phys = m.phys_base + m.offset;
            let last = phys + (m.buf_len - 1);
            let skip = (last & !(g - 1)) - phys;
            // SAFETY: bytes `skip..buf_len` of `dst`, fewer than `g`.
            unsafe {
                pool.copy_out(
                    m.tail,
                    0,
                    dst.add(skip as usize),
                    (m.buf_len - skip) as usize,
                )
            };
        }
    }

    /// Finishes [`Self::take`]: after a successful UNMAP frees the mapping's IOVAs, bounce
    /// granules and slot; after a failed one keeps them all (marked stale, counted in
    /// [`Self::leaked`]) so no IOVA or bounce granule is reused while the device may still
    /// reach it (the buffer's memory itself is the caller's: see [`Self::leaked`]).
    pub(super) fn release(&mut self, taken: &Taken) {
        let (Mode::Strict { iova, live, bounce }, Some(key)) = (&mut self.mode, taken.key) else {
            return;
        };
        if taken.deferred {
            // Freed by the flush, once its UNMAP returned S_OK.
            return;
        }
        if taken.unmapped.is_err() {
            if let Some(m) = live.get_mut(key) {
                if !m.stale {
                    m.stale = true;
                    self.leaked += 1;
                }
            }
            return;
        }
        let Some(m) = live.remove(key) else {
            return;
        };
        if m.stale {
            self.leaked = self.leaked.saturating_sub(1);
        }
        Self::free_resources(iova, bounce, key, &m, &mut self.failures);
    }

    fn free_resources(
        iova: &mut IovaAllocator,
        bounce: &mut Option<BouncePool>,
        key: u64,
        m: &LiveMapping,
        failures: &mut u64,
    ) {
        if let Some(pool) = bounce.as_mut() {
            for i in [m.head, m.tail] {
                if i != NO_SLOT {
                    pool.give_back(i);
                }
            }
        }
        if let Err(e) = iova.free(key, m.len) {
            // Not reachable for ranges `alloc` returned; the IOVAs are lost, nothing else.
            log::error!("virtio-iommu: IOVA {key:#x}+{:#x} not freed: {e}", m.len);
            *failures += 1;
        }
    }

    /// Takes back the device address `addr` of a buffer given by [`Self::map_buffer`] (any
    /// address inside it) and returns the physical address it stands for. No heap allocation.
    ///
    /// Strict modes: UNMAPs the whole mapping containing `addr` and frees its IOVAs — under
    /// the lazy [`UnmapPolicy`] ([`Self::set_unmap_policy`]) the UNMAP is queued instead and
    /// sent, and the IOVAs freed, by a later flush (this call then flushes when a bound is
    /// reached; the device keeps access until then). Identity: returns `addr`; no request is
    /// sent.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when `addr` is not in a live mapping (strict), or its
    /// UNMAP is already pending (lazy); the UNMAP request's errors (strict policy; a deferred
    /// UNMAP's are reported by the flush: [`Self::flush`], [`Self::take_flush_error`]) — the mapping is then kept (counted in [`Self::leaked`]), so
    /// its IOVAs are not reused while it may still be mapped; the buffer's memory is the
    /// caller's again and may still be reachable (see [`Self::leaked`]).
    pub fn unmap_buffer(
        &mut self,
        iommu: &mut dyn IommuMapper,
        addr: u64,
    ) -> Result<u64, IommuError> {
        let taken = self.take(iommu, addr, true)?;
        self.release(&taken);
        self.flush_after(iommu, &taken);
        taken.unmapped.map(|()| taken.phys)
    }

    /// UNMAPs everything this space mapped — after a [flush](Self::flush) of the UNMAPs the
    /// lazy policy deferred — every live buffer mapping, including those kept after a failed
    /// UNMAP, and the 1:1 mappings of `Direct` reserved regions (strict modes),
    /// or every identity mapping (identity-mapped) — but not the manual MAPs in ranges from
    /// [`Self::reserve_iova`] (the embedder's) — in
    /// batches ([`IommuMapper::submit_batch`]), e.g. before DETACH or when the device is gone.
    /// Mappings whose UNMAP fails are kept. Returns the number of mappings removed. Allocates
    /// one small batch buffer.
    ///
    /// After this, buffers still held by a device driver are unreachable for the device; their
    /// record (IOVAs, bounce granules, slot) stays until the driver's `unshare`/`dma_dealloc`,
    /// which sends no request but still copies back (inner `unshare`) and frees, so
    /// [`Self::live_mappings`] counts them until then. Identity-mapped mode then refuses new
    /// buffers.
    ///
    /// # Errors
    ///
    /// The fatal errors of [`IommuMapper::submit_batch`].
    pub fn unmap_all(&mut self, iommu: &mut dyn IommuMapper) -> Result<usize, IommuError> {
        const CHUNK: usize = 64;
        let domain = self.domain;
        // Inclusive ends throughout: a range may cover all 2^64 bytes.
        let unmap = |virt_start: u64, virt_end: u64| BatchOp::Unmap {
            domain,
            virt_start,
            virt_end,
        };
        // Deferred UNMAPs first: a failed one leaves its range stale, retried below.
        let _ = self.flush(iommu);
        let mut removed = 0;
        match &mut self.mode {
            Mode::Identity { bypass: true, .. } => {}
            Mode::Identity {
                bypass: false,
                ranges,
            } => {
                let ops: Vec<BatchOp> = ranges.iter().map(|r| unmap(r.start, r.end)).collect();
                let mut results = alloc::vec![Ok(()); ops.len()];
                iommu.submit_batch(&ops, &mut results)?;
                self.unmaps += ops.len() as u64;
                let mut keep = results.iter().map(Result::is_err);
                ranges.retain(|_| keep.next().unwrap_or(true));
                removed = ops.len() - ranges.len();
                self.failures += ranges.len() as u64;
            }
            Mode::Strict { iova, live, bounce } => {
                if !self.direct.is_empty() {
                    let ops: Vec<BatchOp> =
                        self.direct.iter().map(|r| unmap(r.start, r.end)).collect();
                    let mut results = alloc::vec![Ok(()); ops.len()];
                    iommu.submit_batch(&ops, &mut results)?;
                    self.unmaps += ops.len() as u64;
                    let before = self.direct.len();
                    let mut keep = results.iter().map(Result::is_err);
                    self.direct.retain(|_| keep.next().unwrap_or(true));
                    removed += before - self.direct.len();
                    self.failures += self.direct.len() as u64;
                }
                let mut cursor = Some(0u64);
                while let Some(from) = cursor {
                    let mut ops = [unmap(0, 0); CHUNK];
                    let mut n = 0;
                    let mut next = Some(from);
                    while let Some((base, m)) = next.and_then(|k| live.ceil(k)) {
                        if n == CHUNK {
                            break;
                        }
                        next = base.checked_add(1);
                        if m.unmapped {
                            continue;
                        }
                        ops[n] = unmap(base, base + (m.len - 1));
                        n += 1;
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
                        let Some(m) = live.get_mut(virt_start) else {
                            continue;
                        };
                        removed += 1;
                        if !m.stale {
                            // Still held by the device driver: kept until it is released.
                            m.unmapped = true;
                            continue;
                        }
                        // Released already (its UNMAP had failed): free it now.
                        if let Some(m) = live.remove(virt_start) {
                            self.leaked = self.leaked.saturating_sub(1);
                            Self::free_resources(iova, bounce, virt_start, &m, &mut self.failures);
                        }
                    }
                }
            }
        }
        Ok(removed)
    }

    /// The physical ranges `(start, end)` (inclusive) of every bounce granule (tests).
    #[cfg(test)]
    pub(super) fn bounce_pool_granules(&self) -> Vec<(u64, u64)> {
        match &self.mode {
            Mode::Strict {
                bounce: Some(b), ..
            } => b.granules().collect(),
            _ => Vec::new(),
        }
    }

    /// Test-only constructor of an identity-mapped space over `ranges` (no request sent).
    #[cfg(test)]
    pub(super) fn identity_mapped_unchecked(
        domain: u32,
        ranges: Vec<PhysRange>,
        fault: PhysRange,
    ) -> Self {
        Self::with_mode(
            domain,
            Mode::Identity {
                bypass: false,
                ranges,
            },
            fault,
        )
    }
}

/// Lazy unmapping ([`UnmapPolicy`], the flush queue; see [`super::flush`]).
impl DmaSpace {
    /// Chooses when `unshare` (and [`Self::unmap_buffer`]) sends its UNMAP:
    /// [`UnmapPolicy::Strict`] (the default) at once, [`UnmapPolicy::Lazy`] deferred into a
    /// flush queue sent as one batch — the device keeps access to unshared buffers until the
    /// flush (the security trade-off in [`super::flush`]). Allocates the queue (`max_pending`
    /// entries) now; nothing later. Identity modes send no per-buffer UNMAP: the policy changes
    /// nothing there. `dma_dealloc` always UNMAPs at once.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when `max_pending` is 0 or above
    /// [`MAX_PENDING`](super::MAX_PENDING), or when UNMAPs are still pending (call
    /// [`Self::flush`] first); the policy is then unchanged.
    pub fn set_unmap_policy(&mut self, policy: UnmapPolicy) -> Result<(), IommuError> {
        if self.pending_unmaps() > 0 {
            return Err(IommuError::InvalidRange);
        }
        self.flush = FlushQueue::new(policy)?;
        Ok(())
    }

    /// Whether the lazy [`UnmapPolicy`] is in force.
    pub fn is_lazy(&self) -> bool {
        self.flush.is_some()
    }

    /// Number of unshared buffers whose UNMAP is deferred (lazy policy; 0 otherwise). Their
    /// IOVAs stay allocated and are counted in [`Self::live_mappings`].
    pub fn pending_unmaps(&self) -> usize {
        self.flush.as_ref().map_or(0, FlushQueue::len)
    }

    /// Counters of the flush queue (all zero under the strict policy).
    pub fn flush_stats(&self) -> FlushStats {
        self.flush.as_ref().map(|q| q.stats).unwrap_or_default()
    }

    /// The error of the last failed flush not taken yet — flushes that ran inside `share`/
    /// `unshare` cannot report it otherwise — and forgets it.
    pub fn take_flush_error(&mut self) -> Option<FlushError> {
        self.flush.as_mut().and_then(|q| q.last_error.take())
    }

    /// Sends every deferred UNMAP as one batch ([`IommuMapper::submit_batch`]: one
    /// notification when at most half the request queue) and frees the IOVAs, mapping slots and
    /// bounce granules of those that returned `S_OK`. Returns how many were sent (0 under the
    /// strict policy or with nothing pending). No allocation.
    ///
    /// # Errors
    ///
    /// [`FlushError`] when UNMAPs failed (a status, or the batch's fatal error for all): their
    /// ranges stay allocated and are handled as after a failed strict UNMAP (marked stale,
    /// counted in [`Self::leaked`] and [`Self::failures`], retried by [`Self::unmap_all`]).
    pub fn flush(&mut self, iommu: &mut dyn IommuMapper) -> Result<usize, FlushError> {
        self.flush_with(iommu, Trigger::Explicit)
    }

    /// [`Self::flush`] when the size or time bound of the lazy policy is reached; otherwise
    /// nothing. `share` and `unshare` call it; an embedder may call it from a timer so that
    /// the time bound holds without DMA activity. Errors are kept for
    /// [`Self::take_flush_error`] and counted.
    pub fn flush_if_due(&mut self, iommu: &mut dyn IommuMapper) {
        if let Some(trigger) = self.flush.as_ref().and_then(FlushQueue::due) {
            let _ = self.flush_with(iommu, trigger);
        }
    }

    /// [`Self::flush_if_due`] after [`Self::take`] and [`Self::release`] of `taken`: when its
    /// UNMAP started an empty queue the age was read as 0 just now, so only the size bound and
    /// a time bound of 0 are checked (no second clock read).
    pub(super) fn flush_after(&mut self, iommu: &mut dyn IommuMapper, taken: &Taken) {
        if !taken.fresh {
            return self.flush_if_due(iommu);
        }
        if let Some(trigger) = self.flush.as_ref().and_then(FlushQueue::due_after_start) {
            let _ = self.flush_with(iommu, trigger);
        }
    }

    fn flush_with(
        &mut self,
        iommu: &mut dyn IommuMapper,
        trigger: Trigger,
    ) -> Result<usize, FlushError> {
        let (Some(queue), Mode::Strict { iova, live, bounce }) = (&mut self.flush, &mut self.mode)
        else {
            return Ok(0);
        };
        let before = queue.stats.failed_unmaps;
        let (failures, leaked) = (&mut self.failures, &mut self.leaked);
        let sent = queue.send(iommu, self.domain, trigger, |key, outcome| match outcome {
            Ok(()) => {
                if let Some(m) = live.remove(key) {
                    Self::free_resources(iova, bounce, key, &m, failures);
                }
            }
            Err(_) => {
                // As after a failed strict UNMAP: kept, never reused, retried by `unmap_all`.
                if let Some(m) = live.get_mut(key) {
                    m.deferred = false;
                    m.stale = true;
                    *leaked += 1;
                    *failures += 1;
                }
            }
        });
        self.unmaps += sent as u64;
        if queue.stats.failed_unmaps == before {
            Ok(sent)
        } else {
            Err(queue.last_error.unwrap_or(FlushError {
                failed: (queue.stats.failed_unmaps - before) as usize,
                first: IommuError::Broken,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::dma::fake::FakeIommu;
    use crate::parse::ResvMemKind;
    use crate::wire::Status;

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
        let mut space = DmaSpace::new(3, iova).unwrap();
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
        let mut space =
            DmaSpace::new(7, IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap()).unwrap();
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
        iommu.set_fail(true);
        assert!(space
            .map_buffer(&mut iommu, 0x4000_0000, 1, MapFlags::WRITE)
            .is_err());
        assert_eq!(space.failures, 2);
        assert_eq!(space.live_mappings(), 0);
        let a = space.iova_allocator().unwrap();
        assert_eq!(a.live_allocations(), 0, "IOVAs of failed MAPs are freed");
        // A buffer ending at the top of the physical space.
        iommu.set_fail(false);
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
        let mut space = DmaSpace::strict(3, iova, 2).unwrap();
        let a = space
            .map_buffer(&mut iommu, 0x1000, 0x1000, MapFlags::READ)
            .unwrap();
        let b = space
            .map_buffer(&mut iommu, 0x8000, 0x3000, MapFlags::WRITE)
            .unwrap();
        assert_eq!(
            space.map_buffer(&mut iommu, 0x20000, 1, MapFlags::READ),
            Err(IommuError::DmaAlloc)
        );
        assert_eq!(iommu.maps.len(), 2, "nothing sent for the refused buffer");
        space.unmap_buffer(&mut iommu, a).unwrap();
        let c = space
            .map_buffer(&mut iommu, 0x10_0000, 0x1000, MapFlags::READ)
            .unwrap();
        assert_eq!(space.unmap_all(&mut iommu).unwrap(), 2);
        assert!(iommu.maps.is_empty());
        // Still held: kept until released, which sends nothing more and gives the physical
        // address back.
        assert_eq!(space.live_mappings(), 2);
        assert_eq!(space.unmap_all(&mut iommu).unwrap(), 0);
        let unmaps = space.unmaps;
        assert_eq!(space.unmap_buffer(&mut iommu, b + 0x10), Ok(0x8010));
        assert_eq!(space.unmap_buffer(&mut iommu, c), Ok(0x10_0000));
        assert_eq!(space.unmaps, unmaps);
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
        let unbacked = PhysRange {
            start: 1 << 60,
            end: u64::MAX,
        };
        let mut space =
            DmaSpace::identity_bypass(4, &[], &[msi(0x0802_0000, 0x0802_0fff)], unbacked).unwrap();
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
    fn strict_reserves_a_fault_window_that_is_never_handed_out() {
        let mut iommu = FakeIommu::new();
        let iova = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        let mut space = DmaSpace::new(1, iova).unwrap();
        // The top half (whole granules) of the only free range, 0x1000..=0xffff_ffff.
        let w = space.fault_window();
        assert_eq!((w.start, w.end), (0x8000_1000, 0xffff_ffff));
        assert!(space.is_fault_address(0x8000_1000) && !space.is_fault_address(0x8000_0fff));
        let a = space.iova_allocator().unwrap();
        assert!(a.iter_free().all(|(s, e)| e < w.start || s > w.end));
        // Exhaust the rest: no allocation reaches the window.
        let mut n = 0;
        while let Ok(addr) = space.map_buffer(&mut iommu, 0x4000_0000, 0x1000_0000, MapFlags::READ)
        {
            assert!(addr + 0x0fff_ffff < w.start);
            n += 1;
        }
        assert_eq!(n, 8);
        assert!(!iommu.any_mapped(1, w.start, w.end));
        // A tiny allocator: one granule for the window, one for buffers.
        let tiny = IovaAllocator::new(0x1000, 0x2fff, 0x1000).unwrap();
        let space = DmaSpace::new(1, tiny).unwrap();
        assert_eq!(
            space.fault_window(),
            PhysRange {
                start: 0x2000,
                end: 0x2fff
            }
        );
        // No free granule at all: refused.
        let mut full = IovaAllocator::new(0x1000, 0x1fff, 0x1000).unwrap();
        full.reserve(0x1000, 0x1fff);
        assert_eq!(DmaSpace::new(1, full).err(), Some(IommuError::DmaAlloc));
        // Capped at FAULT_WINDOW_MAX in a large space.
        let big = IovaAllocator::new(0, u64::MAX, 0x1000).unwrap();
        let w = DmaSpace::new(1, big).unwrap().fault_window();
        assert_eq!(
            (w.start, w.end),
            (u64::MAX - (FAULT_WINDOW_MAX - 1), u64::MAX)
        );
    }

    #[test]
    fn no_mode_hands_out_the_no_context_address() {
        let nc = NO_CONTEXT_ADDRESS;
        // Strict, with the largest free range elsewhere so the window does not cover it.
        let mut iova = IovaAllocator::new(0, u64::MAX, 0x1000).unwrap();
        iova.reserve(1 << 63, nc - (1 << 40));
        let space = DmaSpace::new(1, iova).unwrap();
        assert!(!space.is_fault_address(nc));
        let free = space.iova_allocator().unwrap();
        assert!(free.iter_free().all(|(s, e)| !(s..=e).contains(&nc)));
        // Identity-mapped over RAM that contains it.
        let mut iommu = FakeIommu::new();
        let ram = [PhysRange {
            start: nc - 0x10_0000,
            end: nc + 0x10_0000,
        }];
        let mut space = DmaSpace::identity_mapped(&mut iommu, 2, &ram, &[]).unwrap();
        assert!(!iommu.any_mapped(2, nc, nc));
        assert!(space.map_buffer(&mut iommu, nc, 1, MapFlags::READ).is_err());
        // Bypass.
        let unbacked = PhysRange {
            start: 1,
            end: 0xfff,
        };
        let mut space = DmaSpace::identity_bypass(3, &[], &[], unbacked).unwrap();
        assert!(space
            .map_buffer(&mut iommu, nc - 1, 2, MapFlags::READ)
            .is_err());
        assert!(space
            .map_buffer(&mut iommu, nc + 1, 2, MapFlags::READ)
            .is_ok());
    }

    #[test]
    fn unmap_all_of_an_identity_range_covering_all_2_64_bytes() {
        let mut iommu = FakeIommu::new();
        let rw = MapFlags::READ | MapFlags::WRITE;
        iommu.maps.push((9, 0, u64::MAX, 0, rw));
        let all = PhysRange {
            start: 0,
            end: u64::MAX,
        };
        let fault = PhysRange { start: 1, end: 1 };
        let mut space = DmaSpace::identity_mapped_unchecked(9, alloc::vec![all], fault);
        assert_eq!(space.unmap_all(&mut iommu), Ok(1));
        assert!(iommu.maps.is_empty());
        assert!(space.identity_ranges().is_empty());
    }

    #[test]
    fn identity_mapped_fault_window_is_unmapped_and_required() {
        let mut iommu = FakeIommu::new();
        // RAM covering everything: only the granule of NO_CONTEXT_ADDRESS stays unmapped
        // (and the first one, never part of a window); that is the window.
        let all = [PhysRange {
            start: 0,
            end: u64::MAX,
        }];
        let space = DmaSpace::identity_mapped(&mut iommu, 9, &all, &[]).unwrap();
        let nc = NO_CONTEXT_ADDRESS;
        assert_eq!(
            space.fault_window(),
            PhysRange {
                start: nc,
                end: nc + 0xfff
            }
        );
        assert!(!iommu.any_mapped(9, nc, nc + 0xfff));
        iommu.maps.clear();
        // ... and when a reserved region covers that too, no IOVA faults: refused, nothing
        // sent.
        let reserved = [msi(nc, nc + 0xfff)];
        assert_eq!(
            DmaSpace::identity_mapped(&mut iommu, 9, &all, &reserved).err(),
            Some(IommuError::InvalidRange)
        );
        assert!(iommu.maps.is_empty());
        // With a gap: the largest one, neither mapped nor reserved; the first granule of RAM
        // at 0 is left out (device address 0 is never handed out).
        iommu.input_range = (0, 0xffff_ffff);
        let ram = [
            PhysRange::from_start_size(0, 0x4000_0000).unwrap(),
            PhysRange::from_start_size(0x8000_0000, 0x1000_0000).unwrap(),
        ];
        let reserved = [msi(0x4000_0000, 0x4fff_ffff)];
        let mut space = DmaSpace::identity_mapped(&mut iommu, 9, &ram, &reserved).unwrap();
        assert_eq!(space.identity_ranges()[0].start, 0x1000);
        let w = space.fault_window();
        assert_eq!((w.start, w.end), (0x9000_0000, u64::MAX));
        assert!(!iommu.any_mapped(9, w.start, w.end));
        assert!(space
            .map_buffer(&mut iommu, 0, 0x10, MapFlags::READ)
            .is_err());
        assert!(space
            .map_buffer(&mut iommu, 0x9000_0000, 0x10, MapFlags::READ)
            .is_err());
    }

    #[test]
    fn identity_bypass_needs_an_unbacked_window() {
        let ram = [PhysRange::from_start_size(0x4000_0000, 0x4000_0000).unwrap()];
        let reserved = [msi(0x0800_0000, 0x080f_ffff)];
        let r = |start, end| PhysRange { start, end };
        for bad in [
            r(0x7fff_0000, 0x9000_0000),
            r(0x0800_1000, 0x0800_1fff),
            r(0, 0xfff),
            r(0x2000, 0x1000),
        ] {
            assert_eq!(
                DmaSpace::identity_bypass(1, &ram, &reserved, bad).err(),
                Some(IommuError::InvalidRange),
                "{bad:x?}"
            );
        }
        let mut space =
            DmaSpace::identity_bypass(1, &ram, &reserved, r(1 << 60, u64::MAX)).unwrap();
        let mut iommu = FakeIommu::new();
        assert!(space
            .map_buffer(&mut iommu, 1 << 60, 1, MapFlags::READ)
            .is_err());
        assert!(space.map_buffer(&mut iommu, 0, 1, MapFlags::READ).is_err());
        assert_eq!(
            space.map_buffer(&mut iommu, 0x4000_0000, 1, MapFlags::READ),
            Ok(0x4000_0000)
        );
    }

    #[test]
    fn a_failed_unmap_keeps_the_mapping_and_its_iovas() {
        let mut iommu = FakeIommu::new();
        let iova = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        let mut space = DmaSpace::new(1, iova).unwrap();
        let a = space
            .map_buffer(&mut iommu, 0x4000_0000, 0x2000, MapFlags::WRITE)
            .unwrap();
        iommu.fail_unmap = true;
        assert!(space.unmap_buffer(&mut iommu, a).is_err());
        assert_eq!((space.leaked, space.live_mappings()), (1, 1));
        assert_eq!(space.iova_allocator().unwrap().live_allocations(), 1);
        iommu.fail_unmap = false;
        let b = space
            .map_buffer(&mut iommu, 0x4000_0000, 0x2000, MapFlags::WRITE)
            .unwrap();
        assert!(
            b >= a + 0x2000 || b + 0x2000 <= a,
            "the kept IOVAs are not reused"
        );
        space.unmap_buffer(&mut iommu, b).unwrap();
        // unmap_all retries the kept one.
        assert_eq!(space.unmap_all(&mut iommu), Ok(1));
        assert_eq!((space.leaked, space.live_mappings()), (0, 0));
        assert!(iommu.maps.is_empty());
        assert_eq!(space.iova_allocator().unwrap().live_allocations(), 0);
    }
}
