//! Lazy unmapping: the flush queue of a strict [`DmaSpace`](super::DmaSpace) under
//! [`UnmapPolicy::Lazy`].
//!
//! Under the lazy policy `unshare` (and [`DmaSpace::unmap_buffer`](super::DmaSpace::unmap_buffer))
//! does not UNMAP at once: the buffer's IOVA range goes into a bounded queue of pending UNMAPs,
//! and the whole queue is sent as ONE batch of UNMAP requests ([`IommuMapper::submit_batch`],
//! one notification when `max_pending` ≤ half the request queue) when
//!
//! - the queue is full (`max_pending` ranges: the size bound),
//! - its oldest entry is older than `max_age_ns` (the time bound, checked on every `unshare`,
//!   every `share` that sends a MAP — a revived `share`, below, takes its range out of the
//!   queue and reads no clock — and [`DmaSpace::flush_if_due`](super::DmaSpace::flush_if_due),
//!   which an embedder may call from a timer: without activity nothing is flushed on its own),
//! - [`DmaSpace::flush`](super::DmaSpace::flush) is called, or a new buffer finds no free IOVA
//!   or mapping slot while UNMAPs are pending (flush, then one retry), or
//!   [`DmaSpace::unmap_all`](super::DmaSpace::unmap_all) runs.
//!
//! A pending range stays allocated (IOVAs, mapping slot, bounce granules) until its UNMAP
//! returned `S_OK`: no IOVA is handed out again for other memory while the device may still
//! reach it (the same memory may revive it: below). A failed
//! UNMAP of a flush keeps its range as after a failed strict UNMAP (counted in
//! [`DmaSpace::leaked`](super::DmaSpace::leaked) and
//! [`DmaSpace::failures`](super::DmaSpace::failures), retried by `unmap_all`), and the flush
//! reports it: [`FlushError`] from an explicit flush, [`DmaSpace::take_flush_error`](super::DmaSpace::take_flush_error)
//! for flushes that ran inside the `Hal` (which cannot return errors), and
//! [`FlushStats::failed_unmaps`].
//!
//! # Reviving a pending mapping
//!
//! A `share` (or [`DmaSpace::map_buffer`](super::DmaSpace::map_buffer)) whose buffer covers
//! exactly the granules of a pending range, with the same permissions, takes that range out of
//! the queue instead of sending a MAP: the buffer gets the same IOVA (plus its own offset in
//! the first granule), its UNMAP is not sent by the next flush, and its `unshare` queues it
//! again with a fresh place in the queue. Recurring buffers (virtio-blk's per-request header
//! and status, a reused data buffer) then cost no request at all. Only direct maps are revived:
//! a range with bounce granules (isolated strict) or of an isolated `dma_alloc` never is, nor
//! is a buffer that needs bounce granules; the strict policy never revives (it has nothing
//! pending). The lookup scans the queue from its end (the newest entries, though a revive
//! moves the last entry into the slot it empties), at most `max_pending`
//! comparisons and one live-mapping lookup per candidate, no allocation and no clock read
//! ([`FlushStats::revived`] counts the hits); it runs before the `share`'s check of the
//! bounds, so a revived `share` costs about what an identity-mode one does. The oldest
//! entry's time is kept when entries are revived: the time bound may then fire early, never
//! late.
//!
//! This does not widen the exposure: a revived range is what the device could reach anyway
//! (pending, so still mapped), and it is live again — the driver has handed the same memory to
//! the device. After its next `unshare` it is bounded by `max_pending` and `max_age_ns` as any
//! pending range.
//!
//! # Security trade-off
//!
//! Between `unshare` and the flush the device can still read and write the buffer (with the
//! permissions it was shared with) although its memory is the driver's again — as Linux's
//! `iommu.strict=0` (deferred IOTLB invalidation through flush queues). A device that
//! misbehaves, or is hostile, can then corrupt or read memory that has been reused: lazy mode
//! protects against stray DMA to addresses never shared, not against a device that keeps using
//! addresses it was given. The window is bounded by `max_pending` unshares and `max_age_ns` of
//! activity. `dma_dealloc` (virtqueues, long-lived DMA memory) stays strict: its memory goes
//! back to the allocator only after its UNMAP completed. Strict is the default.

use super::mapper::IommuMapper;
use crate::device::BatchOp;
use crate::error::IommuError;
use crate::wire::MapFlags;
use alloc::vec::Vec;
use core::fmt;

/// Most pending UNMAPs of a flush queue ([`UnmapPolicy::Lazy::max_pending`]): one
/// [`crate::Batch`] holds at most [`crate::BATCH_CAPACITY`] requests. A flush costs one
/// notification only when `max_pending` is at most half the request queue
/// ([`crate::VirtIOIommu::requestq_size`]` / 2`).
pub const MAX_PENDING: usize = crate::BATCH_CAPACITY;

/// A monotonic time source for the time bound of [`UnmapPolicy::Lazy`].
///
/// It is read at every deferred `unshare` (and by [`DmaSpace::flush_if_due`](super::DmaSpace::flush_if_due)),
/// so it should be cheap: a kernel's tick counter (Linux's `jiffies`) is enough, and the time
/// bound is then good to one tick (it may fire up to one tick early or late). The firmware's
/// `blk-bench` uses a 1 ms tick counter driven by a timer interrupt (reading the generic
/// timer's counter under QEMU's TCG leaves the translated code each time), host tests a fake
/// clock.
pub trait Clock: Sync {
    /// Monotonic time in nanoseconds (any origin; it must not go backwards).
    fn now_ns(&self) -> u64;
}

/// A [`Clock`] from a function returning monotonic nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct FnClock(pub fn() -> u64);

impl Clock for FnClock {
    fn now_ns(&self) -> u64 {
        (self.0)()
    }
}

/// When a strict [`DmaSpace`](super::DmaSpace) sends the UNMAP of an unshared buffer
/// ([`DmaSpace::set_unmap_policy`](super::DmaSpace::set_unmap_policy)). Identity modes send
/// no per-buffer UNMAP, so the policy changes nothing there.
#[derive(Clone, Copy)]
pub enum UnmapPolicy {
    /// At once, one UNMAP request per `unshare`, waited for (the default): the device loses
    /// access to the buffer before `unshare` returns.
    Strict,
    /// Deferred into a flush queue sent as one batch (see the [module documentation](self)).
    ///
    /// **Security trade-off**: until the flush the device can still read and write every
    /// buffer unshared since the last one, although that memory is the driver's again — as
    /// Linux's `iommu.strict=0`. Use it only for devices trusted not to keep using addresses
    /// they were given; the window is at most `max_pending` unshares and `max_age_ns` (while
    /// there is activity or [`DmaSpace::flush_if_due`](super::DmaSpace::flush_if_due) runs).
    Lazy {
        /// Size bound: the queue is flushed when it holds this many ranges, 1 ..=
        /// [`MAX_PENDING`].
        max_pending: usize,
        /// Time bound in nanoseconds: the queue is flushed at the first `unshare`, `share`
        /// that sends a MAP, or [`DmaSpace::flush_if_due`](super::DmaSpace::flush_if_due) that
        /// finds its oldest entry at least this old (a `share` that revives a pending mapping
        /// reads no clock; 0 flushes at every `unshare`: no UNMAP is deferred past it).
        max_age_ns: u64,
        /// Where the time comes from.
        clock: &'static dyn Clock,
    },
}

impl fmt::Debug for UnmapPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Strict => f.write_str("Strict"),
            Self::Lazy {
                max_pending,
                max_age_ns,
                ..
            } => f
                .debug_struct("Lazy")
                .field("max_pending", max_pending)
                .field("max_age_ns", max_age_ns)
                .finish_non_exhaustive(),
        }
    }
}

/// Deferred UNMAPs of a flush that did not return `S_OK`: their ranges stay allocated (see the
/// [module documentation](self)).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct FlushError {
    /// Number of UNMAPs of the flush that failed (all of them after a fatal batch error).
    pub failed: usize,
    /// The first failure: a device status, or the batch's fatal error (timeout, device reset,
    /// ...).
    pub first: IommuError,
}

impl fmt::Display for FlushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} deferred UNMAP(s) failed, first: {}",
            self.failed, self.first
        )
    }
}

impl core::error::Error for FlushError {}

/// Counters of a flush queue ([`DmaSpace::flush_stats`](super::DmaSpace::flush_stats)).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct FlushStats {
    /// UNMAPs deferred (one per lazy `unshare`).
    pub deferred: u64,
    /// Flushes that sent at least one UNMAP.
    pub flushes: u64,
    /// Of those, triggered by the size bound.
    pub by_size: u64,
    /// Of those, triggered by the time bound.
    pub by_age: u64,
    /// Deferred UNMAPs that failed (each also counted in `DmaSpace::failures`).
    pub failed_unmaps: u64,
    /// Pending ranges revived by a `share` of the same granules with the same permissions
    /// (taken out of the queue, no MAP sent; see the [module documentation](self)).
    pub revived: u64,
}

/// Why a flush runs.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(super) enum Trigger {
    Size,
    Age,
    Explicit,
}

/// One pending UNMAP: the range, and what a revival must match.
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// First IOVA.
    start: u64,
    /// Bytes.
    len: u64,
    /// Physical address of the first granule.
    phys: u64,
    /// The mapping's permissions.
    flags: MapFlags,
    /// The live mapping's handle in the space's tree (a hint, checked on use).
    node: u32,
}

/// The pending ranges ([`Pending`]) in no particular order (pushed at the end, a revive
/// moves the last into the slot it empties); never more than `max_pending`, allocated once.
pub(super) struct FlushQueue {
    max_pending: usize,
    max_age_ns: u64,
    clock: &'static dyn Clock,
    pending: Vec<Pending>,
    /// Time of the oldest pending entry (kept when entries are revived: the age bound may then
    /// fire early, never late).
    oldest_ns: u64,
    /// Batch and outcome buffers, `max_pending` each, allocated once.
    ops: Vec<BatchOp>,
    results: Vec<Result<(), IommuError>>,
    pub(super) stats: FlushStats,
    /// The last failed flush not yet taken by `DmaSpace::take_flush_error`.
    pub(super) last_error: Option<FlushError>,
}

impl fmt::Debug for FlushQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlushQueue")
            .field("max_pending", &self.max_pending)
            .field("max_age_ns", &self.max_age_ns)
            .field("pending", &self.pending)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl FlushQueue {
    /// A queue for `policy`; `None` for [`UnmapPolicy::Strict`].
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when `max_pending` is 0 or above [`MAX_PENDING`].
    pub(super) fn new(policy: UnmapPolicy) -> Result<Option<Self>, IommuError> {
        let UnmapPolicy::Lazy {
            max_pending,
            max_age_ns,
            clock,
        } = policy
        else {
            return Ok(None);
        };
        if !(1..=MAX_PENDING).contains(&max_pending) {
            return Err(IommuError::InvalidRange);
        }
        Ok(Some(Self {
            max_pending,
            max_age_ns,
            clock,
            pending: Vec::with_capacity(max_pending),
            oldest_ns: 0,
            ops: Vec::with_capacity(max_pending),
            results: Vec::with_capacity(max_pending),
            stats: FlushStats::default(),
            last_error: None,
        }))
    }

    /// Number of pending ranges.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the queue has room for one more range (a full queue is flushed first).
    pub(super) fn has_room(&self) -> bool {
        self.pending.len() < self.max_pending
    }

    /// Queues the UNMAP of `start..start + len` (IOVAs, `len` bytes > 0) of the mapping of
    /// physical `phys..phys + len` with `flags`, held by node `node` of the space's live
    /// tree (a hint for [`Self::revive`]). Returns `None` (nothing queued) when full,
    /// otherwise whether the queue was empty: its age was then just read as 0, so only the
    /// size bound or a time bound of 0 can be due ([`Self::due_after_start`]).
    pub(super) fn push(
        &mut self,
        start: u64,
        len: u64,
        phys: u64,
        flags: MapFlags,
        node: u32,
    ) -> Option<bool> {
        if !self.has_room() {
            return None;
        }
        let started = self.pending.is_empty();
        if started {
            self.oldest_ns = self.clock.now_ns();
        }
        self.pending.push(Pending {
            start,
            len,
            phys,
            flags,
            node,
        });
        self.stats.deferred += 1;
        Some(started)
    }

    /// Takes out of the queue a pending range mapping physical `phys..phys + len` (`len`
    /// bytes) with `flags` for which `accept(first IOVA, tree handle)` holds — the first found
    /// scanning from the queue's end — and returns its first IOVA; its UNMAP is then not sent.
    /// The queue's last entry takes the emptied slot (constant time; the order of pending
    /// entries carries no meaning). At most `max_pending` comparisons, no allocation.
    pub(super) fn revive(
        &mut self,
        phys: u64,
        len: u64,
        flags: MapFlags,
        mut accept: impl FnMut(u64, u32) -> bool,
    ) -> Option<u64> {
        let i = self.pending.iter().rposition(|e| {
            e.phys == phys && e.len == len && e.flags == flags && accept(e.start, e.node)
        })?;
        let start = self.pending.swap_remove(i).start;
        self.stats.revived += 1;
        Some(start)
    }

    /// Whether a bound is reached just after a push that started the queue: the size bound,
    /// or the time bound when it is 0 (the age, read as 0 at that push, is then already due).
    /// No clock read.
    pub(super) fn due_after_start(&self) -> Option<Trigger> {
        if self.pending.is_empty() {
            None
        } else if self.pending.len() >= self.max_pending {
            Some(Trigger::Size)
        } else if self.max_age_ns == 0 {
            Some(Trigger::Age)
        } else {
            None
        }
    }

    /// Whether a bound is reached: the size bound first.
    pub(super) fn due(&self) -> Option<Trigger> {
        if self.pending.is_empty() {
            None
        } else if self.pending.len() >= self.max_pending {
            Some(Trigger::Size)
        } else if self.clock.now_ns().saturating_sub(self.oldest_ns) >= self.max_age_ns {
            Some(Trigger::Age)
        } else {
            None
        }
    }

    /// Sends every pending UNMAP in `domain` as one batch, empties the queue and calls
    /// `done(first IOVA, outcome)` for each range, in the queue's (arbitrary) order. Returns the number sent.
    pub(super) fn send(
        &mut self,
        iommu: &mut dyn IommuMapper,
        domain: u32,
        trigger: Trigger,
        mut done: impl FnMut(u64, Result<(), IommuError>),
    ) -> usize {
        let n = self.pending.len();
        if n == 0 {
            return 0;
        }
        self.ops.clear();
        self.ops.extend(
            self.pending
                .iter()
                .map(|&Pending { start, len, .. }| BatchOp::Unmap {
                    domain,
                    virt_start: start,
                    virt_end: start + (len - 1),
                }),
        );
        self.results.clear();
        self.results.resize(n, Ok(()));
        if let Err(e) = iommu.submit_batch(&self.ops, &mut self.results) {
            // Outcomes unknown: every range may still be mapped.
            self.results.fill(Err(e));
        }
        self.stats.flushes += 1;
        match trigger {
            Trigger::Size => self.stats.by_size += 1,
            Trigger::Age => self.stats.by_age += 1,
            Trigger::Explicit => {}
        }
        let mut error: Option<FlushError> = None;
        for (&Pending { start, .. }, &r) in self.pending.iter().zip(&self.results) {
            if let Err(e) = r {
                self.stats.failed_unmaps += 1;
                match &mut error {
                    Some(fe) => fe.failed += 1,
                    None => {
                        error = Some(FlushError {
                            failed: 1,
                            first: e,
                        })
                    }
                }
            }
            done(start, r);
        }
        self.pending.clear();
        if let Some(e) = error {
            log::error!("virtio-iommu: flush of {n} deferred UNMAP(s): {e}");
            self.last_error = Some(e);
        }
        n
    }
}
