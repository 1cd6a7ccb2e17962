//! Shared domains: further endpoints in a [`DmaSpace`]'s domain (one domain, one IOVA space,
//! several endpoints; virtio v1.3 §5.13.6.3 lets any number of endpoints attach to a domain),
//! and IOVA ranges taken from the space for MAPs the embedder makes by hand.
//!
//! Without this, a second endpoint in the domain of a strict space, or a manual MAP there,
//! meets `S_INVAL`: MAP refuses a range that overlaps an existing mapping (§5.13.6.5; D23 of
//! the device model), so a second allocator over the same domain, or the space's allocator
//! after a manual MAP, hands out IOVAs that are already mapped; and MAP refuses ranges that
//! overlap a reserved region of *any* endpoint of the domain (D44), which the space's
//! allocator did not keep out when it knew only its first endpoint's regions.

use super::{DmaSpace, Mode, NO_CONTEXT_ADDRESS};
use crate::device::VirtIOIommu;
use crate::dma::mapper::IommuMapper;
use crate::dma::ranges::{inside_one, overlaps_any, sorted_union, PhysRange};
use crate::error::IommuError;
use crate::iova::AvlPool;
use crate::parse::{ReservedRegion, ResvMemKind};
use crate::wire::MapFlags;
use alloc::vec::Vec;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

/// Whether `r` intersects one of `ranges` (any order).
fn overlaps_unsorted(ranges: &[PhysRange], r: PhysRange) -> bool {
    ranges.iter().any(|c| c.start <= r.end && r.start <= c.end)
}

/// Whether `r` intersects a live buffer mapping. Mappings are disjoint, so the one with the
/// greatest start at or below `r.end` is the only candidate.
fn overlaps_live<V: Copy + crate::iova::Weight>(
    live: &AvlPool<V>,
    r: PhysRange,
    len: impl Fn(&V) -> u64,
) -> bool {
    live.floor(r.end)
        .is_some_and(|(base, m)| base.saturating_add(len(&m) - 1) >= r.start)
}

impl DmaSpace {
    /// The endpoints attached through this space ([`Self::attach_strict`],
    /// [`Self::attach_isolated`], [`Self::attach_identity`], [`Self::attach_endpoint`]), in
    /// attach order; empty for a space built on an endpoint attached by the caller
    /// ([`Self::new`] and the other plain constructors).
    pub fn endpoints(&self) -> &[u32] {
        &self.endpoints
    }

    /// Attaches `endpoint` to this space's domain (ATTACH, §5.13.6.3; with ATTACH_F_BYPASS for
    /// an identity-bypass space), so that it translates through the same IOVA space as the
    /// endpoints already there: every buffer of the space is reachable by all of them, at the
    /// same device address. `reserved` are the new endpoint's reserved regions (PROBE's, or
    /// the merged list of [`crate::topology::reserved::merge`]); the space then honours the union of
    /// its endpoints' regions. Attaching an endpoint already listed in [`Self::endpoints`]
    /// does nothing.
    ///
    /// - Strict modes: each region (widened to whole granules) is kept out of the IOVA
    ///   allocator; a [`ResvMemKind::Direct`] region is also MAPped 1:1 (READ|WRITE) after the
    ///   ATTACH, unless an earlier endpoint's identical region already is.
    /// - Identity-mapped: a region must not overlap the identity mappings (they would have to
    ///   be split), except a `Direct` one inside them (already 1:1); a `Direct` region outside
    ///   them is MAPped 1:1.
    /// - Identity-bypass: the regions join those buffers must avoid.
    ///
    /// On error nothing is changed: the allocator is restored, new 1:1 mappings are UNMAPped
    /// and the endpoint is DETACHed again (best effort after a fatal error).
    ///
    /// # Errors
    ///
    /// [`IommuError::IovaInUse`] when a region overlaps a live buffer mapping, an IOVA range
    /// of [`Self::reserve_iova`], a 1:1 mapping of another `Direct` region (partly), the
    /// identity mappings (identity-mapped), or — for a `Direct` region — the fault window;
    /// [`IommuError::InvalidRange`] for a region overlapping the fault window of a bypass
    /// space; [`IommuError::DmaAlloc`] when the allocator's node pool cannot hold the
    /// regions; the errors of [`VirtIOIommu::attach`] (resp. `attach_bypass`) and
    /// [`VirtIOIommu::map`].
    pub fn attach_endpoint<H: Hal, T: Transport>(
        &mut self,
        iommu: &mut VirtIOIommu<H, T>,
        endpoint: u32,
        reserved: &[ReservedRegion],
    ) -> Result<(), IommuError> {
        if self.endpoints.contains(&endpoint) {
            return Ok(());
        }
        let g = IommuMapper::granule(iommu);
        if !g.is_power_of_two() {
            return Err(IommuError::InvalidRange);
        }
        let widen = |r: &ReservedRegion| PhysRange {
            start: r.start & !(g - 1),
            end: r.end | (g - 1),
        };
        let in_use = |r: PhysRange| IommuError::IovaInUse {
            start: r.start,
            end: r.end,
        };
        let domain = self.domain;
        let fault = self.fault;
        // The new 1:1 mappings: sorted, disjoint.
        let mut new_direct = Vec::new();
        for r in reserved {
            let w = widen(r);
            if overlaps_unsorted(&self.claims, w) {
                return Err(in_use(w));
            }
            let direct = r.kind == ResvMemKind::Direct;
            match &self.mode {
                Mode::Strict { live, .. } => {
                    if overlaps_live(live, w, |m| m.len) {
                        return Err(in_use(w));
                    }
                    let done = inside_one(&self.direct, w.start, w.end);
                    if direct && !done {
                        if overlaps_any(&self.direct, w.start, w.end)
                            || overlaps_any(&[fault], w.start, w.end)
                        {
                            return Err(in_use(w));
                        }
                        new_direct.push(w);
                    } else if !direct && overlaps_any(&self.direct, w.start, w.end) {
                        return Err(in_use(w));
                    }
                }
                Mode::Identity {
                    bypass: false,
                    ranges,
                } => {
                    if direct && inside_one(ranges, w.start, w.end) {
                        continue;
                    }
                    if overlaps_any(ranges, w.start, w.end)
                        || (direct && overlaps_any(&[fault], w.start, w.end))
                    {
                        return Err(in_use(w));
                    }
                    if direct {
                        new_direct.push(w);
                    }
                }
                Mode::Identity { bypass: true, .. } => {
                    if !direct && overlaps_any(&[fault], r.start, r.end) {
                        return Err(IommuError::InvalidRange);
                    }
                }
            }
        }
        let new_direct = sorted_union(new_direct.into_iter());
        // Keep the regions out of the allocator (strict); undone on any later error.
        let saved = match &mut self.mode {
            Mode::Strict { iova, .. } => {
                let saved = iova.clone();
                for r in reserved {
                    if let Err(e) = iova.try_reserve(r.start, r.end) {
                        *iova = saved;
                        return Err(e);
                    }
                }
                Some(saved)
            }
            Mode::Identity { .. } => None,
        };
        let restore = |space: &mut Self, saved: Option<crate::iova::IovaAllocator>| {
            if let (Mode::Strict { iova, .. }, Some(saved)) = (&mut space.mode, saved) {
                *iova = saved;
            }
        };
        let bypass = matches!(self.mode, Mode::Identity { bypass: true, .. });
        let attached = if bypass {
            iommu.attach_bypass(domain, endpoint)
        } else {
            iommu.attach(domain, endpoint)
        };
        if let Err(e) = attached {
            restore(self, saved);
            return Err(e);
        }
        let rw = MapFlags::READ | MapFlags::WRITE;
        for (i, d) in new_direct.iter().enumerate() {
            self.maps += 1;
            if let Err(e) = IommuMapper::map(iommu, domain, d.start, d.end, d.start, rw) {
                self.failures += 1;
                for done in &new_direct[..i] {
                    self.unmaps += 1;
                    let _ = IommuMapper::unmap(iommu, domain, done.start, done.end);
                }
                let _ = iommu.detach(domain, endpoint);
                restore(self, saved);
                return Err(e);
            }
        }
        match &mut self.mode {
            Mode::Strict { .. } => {
                self.direct = sorted_union(self.direct.iter().chain(&new_direct).copied());
            }
            Mode::Identity {
                bypass: false,
                ranges,
            } => {
                // Not merged with adjacent ranges: each range is one mapping, UNMAPped whole.
                ranges.extend_from_slice(&new_direct);
                ranges.sort_unstable_by_key(|r| r.start);
            }
            Mode::Identity {
                bypass: true,
                ranges,
            } => {
                let add = reserved
                    .iter()
                    .filter(|r| r.kind != ResvMemKind::Direct)
                    .map(|r| PhysRange {
                        start: r.start,
                        end: r.end,
                    });
                *ranges = sorted_union(ranges.iter().copied().chain(add));
            }
        }
        self.endpoints.push(endpoint);
        Ok(())
    }

    /// DETACHes `endpoint` (§5.13.6.4), one of [`Self::endpoints`], from the space's domain:
    /// it no longer reaches any mapping of the space (its DMA faults), while the other
    /// endpoints keep working through the same mappings. The endpoint's reserved regions stay
    /// kept out of the allocator (the space does not know which regions another endpoint
    /// shares).
    ///
    /// # Errors
    ///
    /// [`IommuError::NotSupported`] when `endpoint` is not in [`Self::endpoints`], or is the
    /// last one: DETACH of a domain's last endpoint destroys the domain and its mappings on
    /// the device (§5.13.6.4), under the space's live buffers — [`Self::unmap_all`] first,
    /// then [`VirtIOIommu::detach`] it directly; the errors of [`VirtIOIommu::detach`] (the
    /// endpoint then stays listed).
    pub fn detach_endpoint<H: Hal, T: Transport>(
        &mut self,
        iommu: &mut VirtIOIommu<H, T>,
        endpoint: u32,
    ) -> Result<(), IommuError> {
        let Some(i) = self.endpoints.iter().position(|&e| e == endpoint) else {
            return Err(IommuError::NotSupported(
                "endpoint not attached through this DmaSpace",
            ));
        };
        if self.endpoints.len() == 1 {
            return Err(IommuError::NotSupported(
                "detaching the last endpoint destroys the domain under the DmaSpace",
            ));
        }
        iommu.detach(self.domain, endpoint)?;
        self.endpoints.remove(i);
        Ok(())
    }

    /// Takes the IOVAs `start..=end` (inclusive, widened outward to `iommu`'s granule) from
    /// the space for MAPs the embedder sends by hand ([`VirtIOIommu::map`] in
    /// [`Self::domain`]): no buffer of the space is ever given an IOVA there, so the manual
    /// MAPs and the space's own never overlap. Returns the widened range. Strict modes take
    /// it from the allocator ([`IovaAllocator::claim`](crate::iova::IovaAllocator::claim));
    /// identity-mapped mode checks it against its identity mappings. The embedder UNMAPs its
    /// own mappings there ([`Self::unmap_all`] does not) before [`Self::release_iova`].
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when `start > end`; [`IommuError::IovaInUse`] when the
    /// range is not free: strict — allocated to a buffer, reserved (a reserved region, the
    /// fault window), a 1:1 `Direct` mapping, taken already, or outside the allocator's range;
    /// identity-mapped — overlapping an identity mapping, a reserved range already taken,
    /// the fault window, the first granule, the granule of [`NO_CONTEXT_ADDRESS`], or outside
    /// `input_range`; [`IommuError::NotSupported`] for a bypass space (a bypass domain takes
    /// no MAP); [`IommuError::DmaAlloc`] when the allocator's node pool is full.
    pub fn reserve_iova(
        &mut self,
        iommu: &dyn IommuMapper,
        start: u64,
        end: u64,
    ) -> Result<PhysRange, IommuError> {
        if start > end {
            return Err(IommuError::InvalidRange);
        }
        let g = iommu.granule();
        if !g.is_power_of_two() {
            return Err(IommuError::InvalidRange);
        }
        let w = PhysRange {
            start: start & !(g - 1),
            end: end | (g - 1),
        };
        let in_use = IommuError::IovaInUse {
            start: w.start,
            end: w.end,
        };
        match &mut self.mode {
            Mode::Strict { iova, .. } => {
                if g != iova.granule() {
                    return Err(IommuError::Unaligned {
                        value: g,
                        granule: iova.granule(),
                    });
                }
                // Claims, the fault window and 1:1 mappings are not free in the allocator.
                iova.claim(w.start, w.end)?;
            }
            Mode::Identity {
                bypass: false,
                ranges,
            } => {
                let (lo, hi) = iommu.input_range();
                let nc = NO_CONTEXT_ADDRESS & !(g - 1);
                if w.start < lo.max(g)
                    || w.end > hi
                    || overlaps_any(ranges, w.start, w.end)
                    || overlaps_any(&[self.fault], w.start, w.end)
                    || (w.start..=w.end).contains(&nc)
                    || overlaps_unsorted(&self.claims, w)
                {
                    return Err(in_use);
                }
            }
            Mode::Identity { bypass: true, .. } => {
                return Err(IommuError::NotSupported("a bypass domain takes no MAP"));
            }
        }
        self.claims.push(w);
        Ok(w)
    }

    /// The IOVA ranges taken with [`Self::reserve_iova`] and not yet released, in the order
    /// taken (inclusive ends, whole granules).
    pub fn reserved_iovas(&self) -> &[PhysRange] {
        &self.claims
    }

    /// Gives back a range [`Self::reserve_iova`] returned (exactly), so the space may hand its
    /// IOVAs to buffers again. The embedder must have UNMAPped its manual mappings there.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when `range` is not one of [`Self::reserved_iovas`].
    pub fn release_iova(&mut self, range: PhysRange) -> Result<(), IommuError> {
        let i = self
            .claims
            .iter()
            .position(|&c| c == range)
            .ok_or(IommuError::InvalidRange)?;
        if let Mode::Strict { iova, .. } = &mut self.mode {
            // Never 2^64 bytes: IOVA 0 is never in an allocator.
            iova.free(range.start, range.end - range.start + 1)?;
        }
        self.claims.remove(i);
        Ok(())
    }
}
