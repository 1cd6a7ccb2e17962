//! IOVA allocation for the DMA glue: [`IovaAllocator`], O(log n) allocation and free over the
//! translatable IOVA range (`input_range`, §5.13.4) minus PROBE's reserved regions (§5.13.6.8.1),
//! in whole granules, with no heap allocation after construction.
//!
//! The free space is a set of disjoint, granule-aligned ranges kept in one AVL tree ordered by
//! address. Each tree node also records the length of the largest free range in its subtree, so
//! the same tree is indexed by size: allocation descends to the lowest-addressed range that is
//! large enough (first fit) in O(log n); freeing finds both neighbours by address and merges in
//! O(log n). Tree nodes come from a pool whose size is fixed at construction; running out is an
//! error ([`IommuError::DmaAlloc`]), never a reallocation.
//!
//! The same pool-based tree (private) holds the live mappings of a strict
//! [`crate::dma::DmaSpace`].

use crate::error::IommuError;
use crate::parse::ReservedRegion;
use alloc::vec::Vec;

/// Index of "no node".
const NIL: u32 = u32::MAX;
/// Largest pool (node indices are `u32`, `NIL` excluded).
const MAX_POOL: usize = 1 << 31;
/// Depth bound of the in-order iterator's stack: an AVL tree of at most 2^31 nodes is at most
/// 1.44 · 33 < 48 levels high.
const MAX_DEPTH: usize = 64;

/// A tree payload: its `weight` (for a free range: its length in bytes) is aggregated per
/// subtree as a maximum.
pub(crate) trait Weight: Copy {
    /// The weight of this entry, whose key is `key`.
    fn weight(&self, key: u64) -> u64;
}

#[derive(Clone, Copy, Debug)]
struct Node<V> {
    key: u64,
    val: V,
    left: u32,
    right: u32,
    height: u8,
    /// Largest `weight` in this node's subtree.
    max_weight: u64,
}

/// An ordered map `u64 → V` (AVL tree) whose nodes live in a pool of fixed capacity: no
/// operation allocates after [`AvlPool::with_capacity`]. Every operation is O(log n) except
/// the iterator.
#[derive(Clone, Debug)]
pub(crate) struct AvlPool<V> {
    /// Nodes; never grows past `capacity` (pushes stay within the reserved capacity).
    nodes: Vec<Node<V>>,
    capacity: usize,
    root: u32,
    /// Free list of node indices, linked through `left`.
    free: u32,
    len: usize,
}

impl<V: Weight> AvlPool<V> {
    /// A pool for at most `capacity` entries (clamped to 2^31), allocated now.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.min(MAX_POOL);
        Self {
            nodes: Vec::with_capacity(capacity),
            capacity,
            root: NIL,
            free: NIL,
            len: 0,
        }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Most entries the pool can hold.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn node(&self, i: u32) -> &Node<V> {
        &self.nodes[i as usize]
    }

    fn node_mut(&mut self, i: u32) -> &mut Node<V> {
        &mut self.nodes[i as usize]
    }

    fn height(&self, i: u32) -> u8 {
        if i == NIL {
            0
        } else {
            self.node(i).height
        }
    }

    fn max_weight(&self, i: u32) -> u64 {
        if i == NIL {
            0
        } else {
            self.node(i).max_weight
        }
    }

    /// Recomputes `height` and `max_weight` of `i` from its children.
    fn update(&mut self, i: u32) {
        let n = *self.node(i);
        let height = 1 + self.height(n.left).max(self.height(n.right));
        let max_weight = n
            .val
            .weight(n.key)
            .max(self.max_weight(n.left))
            .max(self.max_weight(n.right));
        let n = self.node_mut(i);
        n.height = height;
        n.max_weight = max_weight;
    }

    fn rotate_right(&mut self, y: u32) -> u32 {
        let x = self.node(y).left;
        let moved = self.node(x).right;
        self.node_mut(y).left = moved;
        self.node_mut(x).right = y;
        self.update(y);
        self.update(x);
        x
    }

    fn rotate_left(&mut self, x: u32) -> u32 {
        let y = self.node(x).right;
        let moved = self.node(y).left;
        self.node_mut(x).right = moved;
        self.node_mut(y).left = x;
        self.update(x);
        self.update(y);
        y
    }

    /// Restores the AVL balance at `i` (children already balanced); returns the subtree root.
    fn rebalance(&mut self, i: u32) -> u32 {
        self.update(i);
        let (l, r) = (self.node(i).left, self.node(i).right);
        let (hl, hr) = (self.height(l), self.height(r));
        if hl > hr + 1 {
            if self.height(self.node(l).left) < self.height(self.node(l).right) {
                let nl = self.rotate_left(l);
                self.node_mut(i).left = nl;
            }
            self.rotate_right(i)
        } else if hr > hl + 1 {
            if self.height(self.node(r).right) < self.height(self.node(r).left) {
                let nr = self.rotate_right(r);
                self.node_mut(i).right = nr;
            }
            self.rotate_left(i)
        } else {
            i
        }
    }

    fn new_node(&mut self, key: u64, val: V) -> Option<u32> {
        let node = Node {
            key,
            val,
            left: NIL,
            right: NIL,
            height: 1,
            max_weight: val.weight(key),
        };
        if self.free != NIL {
            let i = self.free;
            self.free = self.node(i).left;
            *self.node_mut(i) = node;
            Some(i)
        } else if self.nodes.len() < self.capacity {
            // Within the capacity reserved by `with_capacity`: no reallocation.
            self.nodes.push(node);
            Some((self.nodes.len() - 1) as u32)
        } else {
            None
        }
    }

    fn release_node(&mut self, i: u32) {
        let free = self.free;
        let n = self.node_mut(i);
        n.left = free;
        n.right = NIL;
        // Height 0 marks a free node (every node in the tree has height >= 1), for `at_mut`.
        n.height = 0;
        self.free = i;
    }

    /// Inserts `key → val`. Errors (nothing changed): [`IommuError::DmaAlloc`] when the pool is
    /// full, [`IommuError::InvalidRange`] when `key` is present.
    pub(crate) fn insert(&mut self, key: u64, val: V) -> Result<(), IommuError> {
        let root = self.insert_at(self.root, key, val)?;
        self.root = root;
        self.len += 1;
        Ok(())
    }

    fn insert_at(&mut self, i: u32, key: u64, val: V) -> Result<u32, IommuError> {
        if i == NIL {
            return self.new_node(key, val).ok_or(IommuError::DmaAlloc);
        }
        let k = self.node(i).key;
        if key < k {
            let l = self.insert_at(self.node(i).left, key, val)?;
            self.node_mut(i).left = l;
        } else if key > k {
            let r = self.insert_at(self.node(i).right, key, val)?;
            self.node_mut(i).right = r;
        } else {
            return Err(IommuError::InvalidRange);
        }
        Ok(self.rebalance(i))
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: u64) -> Option<V> {
        let (root, removed) = self.remove_at(self.root, key);
        self.root = root;
        let i = removed?;
        let val = self.node(i).val;
        self.release_node(i);
        self.len -= 1;
        Some(val)
    }

    /// Removes `key` from the subtree at `i`; returns the new subtree root and the detached
    /// node (not yet released).
    fn remove_at(&mut self, i: u32, key: u64) -> (u32, Option<u32>) {
        if i == NIL {
            return (NIL, None);
        }
        let n = *self.node(i);
        if key < n.key {
            let (l, removed) = self.remove_at(n.left, key);
            self.node_mut(i).left = l;
            return (self.rebalance(i), removed);
        }
        if key > n.key {
            let (r, removed) = self.remove_at(n.right, key);
            self.node_mut(i).right = r;
            return (self.rebalance(i), removed);
        }
        if n.left == NIL {
            return (n.right, Some(i));
        }
        if n.right == NIL {
            return (n.left, Some(i));
        }
        // Two children: the successor (minimum of the right subtree) takes `i`'s place.
        let (r, successor) = self.remove_min(n.right);
        let s = self.node_mut(successor);
        s.left = n.left;
        s.right = r;
        (self.rebalance(successor), Some(i))
    }

    /// Detaches the minimum of the (non-empty) subtree at `i`; returns the new subtree root and
    /// the detached node.
    fn remove_min(&mut self, i: u32) -> (u32, u32) {
        let n = *self.node(i);
        if n.left == NIL {
            return (n.right, i);
        }
        let (l, min) = self.remove_min(n.left);
        self.node_mut(i).left = l;
        (self.rebalance(i), min)
    }

    /// Index of the node with the greatest key `<= key`, or `NIL`.
    fn floor_index(&self, key: u64) -> u32 {
        let mut i = self.root;
        let mut best = NIL;
        while i != NIL {
            let n = self.node(i);
            if n.key <= key {
                best = i;
                i = n.right;
            } else {
                i = n.left;
            }
        }
        best
    }

    /// The entry with the greatest key `<= key`.
    pub(crate) fn floor(&self, key: u64) -> Option<(u64, V)> {
        match self.floor_index(key) {
            NIL => None,
            i => Some((self.node(i).key, self.node(i).val)),
        }
    }

    /// The entry with the greatest key `<= key`, its value mutable, and its handle for
    /// [`Self::at_mut`]: `(handle, key, value)`. One descent for a lookup and an update; the
    /// caller must not change the value's weight (as [`Self::get_mut`]).
    pub(crate) fn floor_handle_mut(&mut self, key: u64) -> Option<(u32, u64, &mut V)> {
        match self.floor_index(key) {
            NIL => None,
            i => {
                let n = self.node_mut(i);
                Some((i, n.key, &mut n.val))
            }
        }
    }

    /// The value of `key` through `handle` (from [`Self::floor_handle_mut`]), mutable, without
    /// a descent: `None` when that node no longer holds `key` (removed since, perhaps reused),
    /// and the caller then looks `key` up. A node keeps its handle while its key is in the tree
    /// (removal relinks nodes, never moves entries between them). The weight rule of
    /// [`Self::get_mut`] applies.
    pub(crate) fn at_mut(&mut self, handle: u32, key: u64) -> Option<&mut V> {
        let n = self.nodes.get_mut(handle as usize)?;
        (n.height != 0 && n.key == key).then_some(&mut n.val)
    }

    /// The value of `key`, mutable. The caller must not change its weight (subtree maxima are
    /// not recomputed); meant for payloads of constant weight.
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        let mut i = self.root;
        while i != NIL {
            let n = self.node(i);
            if key == n.key {
                return Some(&mut self.node_mut(i).val);
            }
            i = if key < n.key { n.left } else { n.right };
        }
        None
    }

    /// The entry with the smallest key `>= key`.
    pub(crate) fn ceil(&self, key: u64) -> Option<(u64, V)> {
        let mut i = self.root;
        let mut best = NIL;
        while i != NIL {
            let n = self.node(i);
            if n.key >= key {
                best = i;
                i = n.left;
            } else {
                i = n.right;
            }
        }
        (best != NIL).then(|| (self.node(best).key, self.node(best).val))
    }

    /// The entry with the smallest key whose weight is at least `weight`.
    pub(crate) fn first_fit(&self, weight: u64) -> Option<(u64, V)> {
        let mut i = self.root;
        if self.max_weight(i) < weight {
            return None;
        }
        while i != NIL {
            let n = self.node(i);
            if self.max_weight(n.left) >= weight {
                i = n.left;
            } else if n.val.weight(n.key) >= weight {
                return Some((n.key, n.val));
            } else {
                i = n.right;
            }
        }
        None
    }

    /// Every entry in key order.
    pub(crate) fn iter(&self) -> AvlIter<'_, V> {
        let mut it = AvlIter {
            pool: self,
            stack: [NIL; MAX_DEPTH],
            depth: 0,
        };
        it.push_left(self.root);
        it
    }
}

/// In-order iterator of an [`AvlPool`], with a fixed stack (no allocation).
pub(crate) struct AvlIter<'a, V> {
    pool: &'a AvlPool<V>,
    stack: [u32; MAX_DEPTH],
    depth: usize,
}

impl<V: Weight> AvlIter<'_, V> {
    fn push_left(&mut self, mut i: u32) {
        while i != NIL && self.depth < MAX_DEPTH {
            self.stack[self.depth] = i;
            self.depth += 1;
            i = self.pool.node(i).left;
        }
    }
}

impl<V: Weight> Iterator for AvlIter<'_, V> {
    type Item = (u64, V);

    fn next(&mut self) -> Option<(u64, V)> {
        if self.depth == 0 {
            return None;
        }
        self.depth -= 1;
        let n = *self.pool.node(self.stack[self.depth]);
        self.push_left(n.right);
        Some((n.key, n.val))
    }
}

/// The end (inclusive) of a free range; its key is the start.
#[derive(Clone, Copy, Debug)]
struct FreeEnd(u64);

impl Weight for FreeEnd {
    fn weight(&self, start: u64) -> u64 {
        // Never overflows: every free range starts at 1 or above (IOVA 0 is never free).
        (self.0 - start).saturating_add(1)
    }
}

/// Default capacity of [`IovaAllocator::new`]: free ranges plus live allocations.
pub const DEFAULT_IOVA_CAPACITY: usize = 1024;

/// An IOVA allocator over granule-aligned ranges of one IOVA space (a domain's), with O(log n)
/// [`alloc`](Self::alloc) and [`free`](Self::free) and no heap allocation after construction.
///
/// - Allocations are whole granules, aligned to the granule, inside the range given at
///   construction (typically `input_range`), outside every reserved region, and never contain
///   IOVA 0 (virtio-drivers reads DMA address 0 as failure).
/// - First fit: the lowest-addressed free range that is large enough.
/// - Capacity: the node pool holds `capacity` entries, shared by free ranges and live
///   allocations (`free_ranges + live_allocations <= capacity` is kept as an invariant): an
///   allocation that would break it fails with [`IommuError::DmaAlloc`], so freeing exactly
///   what was allocated never fails for lack of nodes.
#[derive(Clone, Debug)]
pub struct IovaAllocator {
    tree: AvlPool<FreeEnd>,
    granule: u64,
    /// First and last (inclusive) IOVA managed.
    first: u64,
    last: u64,
    /// Allocations not yet freed.
    live: usize,
    /// Total free bytes (at most 2^64 - 1, as IOVA 0 is never free).
    free_bytes: u64,
}

impl IovaAllocator {
    /// An allocator over IOVAs `start..=end` (inclusive, typically `input_range`), trimmed
    /// inward to whole granules and to exclude IOVA 0, with room for
    /// [`DEFAULT_IOVA_CAPACITY`] free ranges and live allocations. `granule` (bytes) must be a
    /// power of two.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] when no whole granule remains or `granule` is not a
    /// power of two.
    pub fn new(start: u64, end: u64, granule: u64) -> Result<Self, IommuError> {
        Self::with_capacity(start, end, granule, DEFAULT_IOVA_CAPACITY)
    }

    /// As [`Self::new`], with a node pool of `capacity` entries (allocated now; at least 2 are
    /// needed for one allocation).
    ///
    /// # Errors
    ///
    /// Those of [`Self::new`].
    pub fn with_capacity(
        start: u64,
        end: u64,
        granule: u64,
        capacity: usize,
    ) -> Result<Self, IommuError> {
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
        let mut tree = AvlPool::with_capacity(capacity.max(1));
        tree.insert(first, FreeEnd(last))?;
        Ok(Self {
            tree,
            granule,
            first,
            last,
            live: 0,
            free_bytes: last - first + 1,
        })
    }

    /// An allocator for one endpoint's domain: `input_range` (inclusive IOVAs, as in
    /// [`crate::IommuConfig::input_range`]) minus every region in `reserved`, whatever its kind
    /// (PROBE's RESV_MEM, §5.13.6.8.1: the driver SHOULD NOT map them, R30; or the merged list
    /// of [`crate::topology::reserved::merge`]), with the default capacity.
    ///
    /// # Errors
    ///
    /// Those of [`Self::new`]; [`IommuError::DmaAlloc`] when the reserved regions need
    /// more nodes than the pool has.
    pub fn for_endpoint(
        input_range: (u64, u64),
        granule: u64,
        reserved: &[ReservedRegion],
    ) -> Result<Self, IommuError> {
        let mut a = Self::new(input_range.0, input_range.1, granule)?;
        for r in reserved {
            a.try_reserve(r.start, r.end)?;
        }
        Ok(a)
    }

    /// Granule in bytes.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The managed IOVAs, `(first, last)` inclusive, after trimming.
    pub fn range(&self) -> (u64, u64) {
        (self.first, self.last)
    }

    /// Number of allocations not yet freed.
    pub fn live_allocations(&self) -> usize {
        self.live
    }

    /// Number of disjoint free ranges.
    pub fn free_ranges(&self) -> usize {
        self.tree.len()
    }

    /// Size of the node pool (free ranges plus live allocations).
    pub fn capacity(&self) -> usize {
        self.tree.capacity()
    }

    /// The free ranges, `(first, last)` inclusive, in address order.
    pub fn iter_free(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.tree.iter().map(|(s, e)| (s, e.0))
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    fn widen(&self, start: u64, end: u64) -> (u64, u64) {
        let g = self.granule;
        (start & !(g - 1), end | (g - 1))
    }

    /// Removes IOVAs `start..=end` (inclusive, widened outward to whole granules) from the free
    /// space, e.g. a PROBE reserved region, so they are never allocated. Never fails: when the
    /// node pool is too full to split a free range in two, the smaller remainder is dropped
    /// from the free space too (never handed out), which is safe but loses those IOVAs; use
    /// [`Self::try_reserve`] to get an error instead. An inverted range is ignored.
    pub fn reserve(&mut self, start: u64, end: u64) {
        let _ = self.reserve_inner(start, end, false);
    }

    /// As [`Self::reserve`], but fails instead of dropping IOVAs.
    ///
    /// # Errors
    ///
    /// Nothing is changed on error. [`IommuError::DmaAlloc`] when the node pool cannot hold
    /// the split; [`IommuError::InvalidRange`] when `start > end`.
    pub fn try_reserve(&mut self, start: u64, end: u64) -> Result<(), IommuError> {
        self.reserve_inner(start, end, true)
    }

    fn reserve_inner(&mut self, start: u64, end: u64, strict: bool) -> Result<(), IommuError> {
        if start > end {
            return Err(IommuError::InvalidRange);
        }
        let (s, e) = self.widen(start, end);
        // The free range containing `s`, if any, else the first one after it.
        let mut cursor = match self.tree.floor(s) {
            Some((fs, fe)) if fe.0 >= s => Some((fs, fe.0)),
            _ => self.tree.ceil(s).map(|(fs, fe)| (fs, fe.0)),
        };
        while let Some((fs, fe)) = cursor {
            if fs > e {
                break;
            }
            let left = (fs < s).then(|| (fs, s - 1));
            let right = (fe > e).then(|| (e + 1, fe));
            let room = self.tree.len() + self.live < self.tree.capacity();
            let (left, right) = match (left, right) {
                (Some(l), Some(r)) if !room => {
                    if strict {
                        return Err(IommuError::DmaAlloc);
                    }
                    // Keep the larger remainder.
                    if l.1 - l.0 >= r.1 - r.0 {
                        (Some(l), None)
                    } else {
                        (None, Some(r))
                    }
                }
                pieces => pieces,
            };
            self.tree.remove(fs);
            self.free_bytes -= fe - fs + 1;
            for (ps, pe) in [left, right].into_iter().flatten() {
                // Cannot fail: a node was just released, and a second one is only needed when
                // `room` said there is one.
                if self.tree.insert(ps, FreeEnd(pe)).is_ok() {
                    self.free_bytes += pe - ps + 1;
                }
            }
            cursor = fe
                .checked_add(1)
                .and_then(|next| self.tree.ceil(next))
                .map(|(ns, ne)| (ns, ne.0));
        }
        Ok(())
    }

    /// Takes the IOVAs `start..=end` (inclusive, widened outward to whole granules) for the
    /// caller, e.g. for MAPs made by hand in a domain whose other IOVAs this allocator hands
    /// out ([`crate::dma::DmaSpace::reserve_iova`]). Unlike [`Self::reserve`], every one of
    /// them must be free: the claim counts as one live allocation, which
    /// [`Self::free`]`(start, size)` of the widened range gives back. O(log n), no heap
    /// allocation.
    ///
    /// # Errors
    ///
    /// Nothing is changed on error. [`IommuError::InvalidRange`] when `start > end`;
    /// [`IommuError::IovaInUse`] (with the widened range) when some of the IOVAs are not free:
    /// outside the managed range, IOVA 0, reserved (a reserved region, a fault window, an
    /// earlier claim) or allocated; [`IommuError::DmaAlloc`] when the node pool cannot hold the
    /// split.
    pub fn claim(&mut self, start: u64, end: u64) -> Result<(), IommuError> {
        if start > end {
            return Err(IommuError::InvalidRange);
        }
        let (s, e) = self.widen(start, end);
        // Free ranges are disjoint and never adjacent (`free` merges, the rest only shrinks),
        // so the range is free exactly when one free range holds all of it.
        let Some((fs, fe)) = self.tree.floor(s).filter(|(_, fe)| fe.0 >= e) else {
            return Err(IommuError::IovaInUse { start: s, end: e });
        };
        let fe = fe.0;
        let left = (fs < s).then(|| (fs, s - 1));
        let right = (fe > e).then(|| (e + 1, fe));
        // Nodes after the claim: this free range becomes up to two, and the claim is live.
        let pieces = usize::from(left.is_some()) + usize::from(right.is_some());
        if self.tree.len() - 1 + pieces + self.live + 1 > self.tree.capacity() {
            return Err(IommuError::DmaAlloc);
        }
        self.tree.remove(fs);
        for (ps, pe) in [left, right].into_iter().flatten() {
            // Cannot fail: room was checked above.
            self.tree.insert(ps, FreeEnd(pe))?;
        }
        self.free_bytes -= e - s + 1;
        self.live += 1;
        Ok(())
    }

    /// Allocates `size` bytes, rounded up to the granule; returns the first IOVA (aligned to
    /// the granule, never 0). O(log n), no heap allocation.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`] for size 0 or a size that overflows when rounded;
    /// [`IommuError::DmaAlloc`] when no free range is large enough or the node pool is full.
    pub fn alloc(&mut self, size: u64) -> Result<u64, IommuError> {
        if size == 0 {
            return Err(IommuError::InvalidRange);
        }
        let size = size
            .checked_next_multiple_of(self.granule)
            .ok_or(IommuError::InvalidRange)?;
        if self.tree.len() + self.live >= self.tree.capacity() {
            return Err(IommuError::DmaAlloc);
        }
        let (s, e) = self.tree.first_fit(size).ok_or(IommuError::DmaAlloc)?;
        self.tree.remove(s);
        if e.0 - s + 1 > size {
            // Cannot fail: the node of the range just removed is free.
            self.tree.insert(s + size, e)?;
        }
        self.free_bytes -= size;
        self.live += 1;
        Ok(s)
    }

    /// Returns IOVAs `start..start + size` (exclusive end; `size` in bytes rounded up to the
    /// granule) to the free space, merging with free neighbours. O(log n), no heap allocation.
    ///
    /// # Errors
    ///
    /// Nothing changed on error. [`IommuError::InvalidRange`] for size 0, a range that
    /// overflows, lies outside the managed range, or overlaps free space (a double free);
    /// [`IommuError::Unaligned`] for a `start` not aligned to the granule;
    /// [`IommuError::DmaAlloc`] when the range needs a new node and the pool is full (only
    /// possible when freeing something other than exactly what [`Self::alloc`] returned).
    pub fn free(&mut self, start: u64, size: u64) -> Result<(), IommuError> {
        let g = self.granule;
        if size == 0 {
            return Err(IommuError::InvalidRange);
        }
        if start & (g - 1) != 0 {
            return Err(IommuError::Unaligned {
                value: start,
                granule: g,
            });
        }
        let size = size
            .checked_next_multiple_of(g)
            .ok_or(IommuError::InvalidRange)?;
        let end = start
            .checked_add(size - 1)
            .ok_or(IommuError::InvalidRange)?;
        if start < self.first || end > self.last {
            return Err(IommuError::InvalidRange);
        }
        let prev = self.tree.floor(end);
        if prev.is_some_and(|(_, pe)| pe.0 >= start) {
            return Err(IommuError::InvalidRange);
        }
        let prev = prev.filter(|(_, pe)| pe.0.checked_add(1) == Some(start));
        let next = end
            .checked_add(1)
            .and_then(|n| self.tree.ceil(n))
            .filter(|&(ns, _)| end.checked_add(1) == Some(ns));
        match (prev, next) {
            (Some((ps, _)), Some((ns, ne))) => {
                self.tree.remove(ns);
                self.tree.remove(ps);
                self.tree.insert(ps, ne)?;
            }
            (Some((ps, _)), None) => {
                self.tree.remove(ps);
                self.tree.insert(ps, FreeEnd(end))?;
            }
            (None, Some((ns, ne))) => {
                self.tree.remove(ns);
                self.tree.insert(start, ne)?;
            }
            (None, None) => self.tree.insert(start, FreeEnd(end))?,
        }
        self.free_bytes += size;
        self.live = self.live.saturating_sub(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[derive(Clone, Copy, Debug)]
    struct W(u64);
    impl Weight for W {
        fn weight(&self, _: u64) -> u64 {
            self.0
        }
    }

    fn check_avl(p: &AvlPool<W>, i: u32) -> (u8, u64) {
        if i == NIL {
            return (0, 0);
        }
        let n = *p.node(i);
        let (hl, wl) = check_avl(p, n.left);
        let (hr, wr) = check_avl(p, n.right);
        assert!(hl.abs_diff(hr) <= 1, "unbalanced at key {}", n.key);
        assert_eq!(n.height, 1 + hl.max(hr));
        let w = n.val.0.max(wl).max(wr);
        assert_eq!(n.max_weight, w);
        if n.left != NIL {
            assert!(p.node(n.left).key < n.key);
        }
        if n.right != NIL {
            assert!(p.node(n.right).key > n.key);
        }
        (n.height, w)
    }

    #[test]
    fn avl_stays_balanced_and_ordered_and_reuses_nodes() {
        let mut p = AvlPool::with_capacity(300);
        let mut keys: Vec<u64> = (0..300u64).map(|k| (k * 7919) % 1009).collect();
        for &k in &keys {
            p.insert(k, W(k % 37)).unwrap();
            check_avl(&p, p.root);
        }
        assert_eq!(p.insert(5000, W(0)), Err(IommuError::DmaAlloc), "full");
        assert_eq!(
            p.insert(keys[0], W(0)),
            Err(IommuError::InvalidRange),
            "present"
        );
        let sorted: Vec<u64> = p.iter().map(|(k, _)| k).collect();
        let mut expect = keys.clone();
        expect.sort_unstable();
        assert_eq!(sorted, expect);
        assert_eq!(p.floor(keys[3]).unwrap().0, keys[3]);
        assert_eq!(p.first_fit(36).map(|(k, _)| k % 37), Some(36));
        assert!(p.first_fit(37).is_none());
        for (n, &k) in keys.clone().iter().enumerate() {
            if n % 2 == 0 {
                assert!(p.remove(k).is_some());
                assert!(p.remove(k).is_none());
                check_avl(&p, p.root);
            }
        }
        keys.retain(|k| p.floor(*k).is_some_and(|(f, _)| f == *k));
        assert_eq!(p.len(), 150);
        for k in 2000..2150 {
            p.insert(k, W(1)).unwrap();
        }
        assert_eq!(p.nodes.len(), 300, "released nodes were reused");
        check_avl(&p, p.root);
    }

    #[test]
    fn handles_survive_rebalancing_and_go_stale_on_removal() {
        let mut p = AvlPool::with_capacity(64);
        for k in 0..64u64 {
            p.insert(k * 16, W(1)).unwrap();
        }
        let handles: Vec<(u32, u64)> = (0..64u64)
            .map(|k| {
                let (h, key, _) = p.floor_handle_mut(k * 16 + 3).unwrap();
                assert_eq!(key, k * 16);
                (h, key)
            })
            .collect();
        // Removing every other key rotates and relinks the rest (two-children removals
        // included): the survivors' handles still reach them.
        for &(_, key) in handles.iter().step_by(2) {
            p.remove(key).unwrap();
            check_avl(&p, p.root);
        }
        for (n, &(h, key)) in handles.iter().enumerate() {
            let found = p.at_mut(h, key).map(|v| v.0);
            if n % 2 == 0 {
                assert_eq!(found, None, "removed key {key} still reachable");
            } else {
                assert_eq!(found, Some(1), "live key {key} lost its handle");
            }
        }
        // A released node reused for another key does not answer for the old one.
        let (h0, k0) = handles[0];
        p.insert(5000, W(2)).unwrap();
        let (h_new, _, _) = p.floor_handle_mut(5000).unwrap();
        assert_eq!(
            h_new, handles[62].0,
            "the last released node is reused first"
        );
        assert!(p.at_mut(handles[62].0, handles[62].1).is_none());
        assert_eq!(p.at_mut(h_new, 5000).map(|v| v.0), Some(2));
        assert!(p.at_mut(h0, k0).is_none());
        assert!(p.at_mut(u32::MAX, 5000).is_none(), "out of bounds");
    }

    #[test]
    fn never_returns_zero_and_honours_range_and_granule() {
        let mut a = IovaAllocator::new(0, 0xf_ffff, 0x1000).unwrap();
        let first = a.alloc(1).unwrap();
        assert_eq!(first, 0x1000);
        let second = a.alloc(0x1001).unwrap();
        assert_eq!(second, 0x2000);
        assert_eq!(a.alloc(0x1000).unwrap(), 0x4000);
        a.free(second, 0x1001).unwrap();
        assert_eq!(a.alloc(0x2000).unwrap(), 0x2000, "freed range is reused");
        assert_eq!(a.free_bytes(), 0x10_0000 - 0x5000);
        let mut big = IovaAllocator::new(0, u64::MAX, 0x10000).unwrap();
        assert_eq!(big.alloc(1).unwrap(), 0x10000);
        assert_eq!(big.range(), (0x10000, u64::MAX));
        assert!(
            IovaAllocator::new(0, 0xfff, 0x1000).is_err(),
            "only IOVA 0's granule"
        );
        assert!(
            IovaAllocator::new(0, 0xffff, 0x3000).is_err(),
            "granule not a power of 2"
        );
        assert_eq!(big.alloc(u64::MAX), Err(IommuError::InvalidRange));
        assert_eq!(big.alloc(0), Err(IommuError::InvalidRange));
    }

    #[test]
    fn skips_reserved_regions_and_reports_exhaustion() {
        let mut a = IovaAllocator::new(0x1000, 0x8fff, 0x1000).unwrap();
        a.reserve(0x3000, 0x3fff);
        a.reserve(0x5800, 0x6000); // widened to 0x5000..=0x6fff
        let got: Vec<u64> = (0..4).map(|_| a.alloc(0x1000).unwrap()).collect();
        assert_eq!(got, [0x1000, 0x2000, 0x4000, 0x7000]);
        assert_eq!(a.alloc(0x1000).unwrap(), 0x8000);
        assert_eq!(a.alloc(0x1000), Err(IommuError::DmaAlloc));
        for g in got {
            a.free(g, 0x1000).unwrap();
        }
        a.free(0x8000, 0x1000).unwrap();
        assert_eq!(
            a.free(0x8000, 0x1000),
            Err(IommuError::InvalidRange),
            "double free"
        );
        assert_eq!(a.free_bytes(), 0x5000);
        assert_eq!(a.alloc(0x2000).unwrap(), 0x1000, "neighbours merged");
    }

    #[test]
    fn capacity_is_an_error_not_a_reallocation() {
        // 3 nodes: one free range + 2 live allocations at most.
        let mut a = IovaAllocator::with_capacity(0, 0xff_ffff, 0x1000, 3).unwrap();
        let x = a.alloc(0x1000).unwrap();
        let y = a.alloc(0x1000).unwrap();
        assert_eq!(a.alloc(0x1000), Err(IommuError::DmaAlloc));
        // Freeing the first (not adjacent to the free range) needs a node: there is one.
        a.free(x, 0x1000).unwrap();
        a.free(y, 0x1000).unwrap();
        assert_eq!(a.free_ranges(), 1);
        assert_eq!(a.free_bytes(), 0xff_f000);
        // try_reserve in the middle needs a split.
        let mut b = IovaAllocator::with_capacity(0, 0xff_ffff, 0x1000, 1).unwrap();
        assert_eq!(b.try_reserve(0x5000, 0x5fff), Err(IommuError::DmaAlloc));
        assert_eq!(b.free_bytes(), 0xff_f000, "unchanged");
        b.reserve(0x5000, 0x5fff); // keeps the larger piece
        assert_eq!(b.iter_free().collect::<Vec<_>>(), [(0x6000, 0xff_ffff)]);
    }

    #[test]
    fn claim_takes_only_free_iovas_and_free_gives_them_back() {
        let mut a = IovaAllocator::with_capacity(0, 0xf_ffff, 0x1000, 5).unwrap();
        let x = a.alloc(0x2000).unwrap();
        assert_eq!(x, 0x1000);
        a.reserve(0x8000, 0x8fff);
        let busy = |start, end| Err(IommuError::IovaInUse { start, end });
        // Over the allocation, the reserved granule, IOVA 0, outside the range: refused.
        assert_eq!(a.claim(0x2000, 0x3fff), busy(0x2000, 0x3fff));
        assert_eq!(a.claim(0x7000, 0x8000), busy(0x7000, 0x8fff));
        assert_eq!(a.claim(0, 0xfff), busy(0, 0xfff));
        assert_eq!(a.claim(0xf_f000, 0x10_0000), busy(0xf_f000, 0x10_0fff));
        assert_eq!(a.claim(2, 1), Err(IommuError::InvalidRange));
        let free = a.free_bytes();
        // Widened outward; splits a free range in two.
        a.claim(0x4800, 0x5001).unwrap();
        assert_eq!(a.free_bytes(), free - 0x2000);
        assert_eq!(a.live_allocations(), 2);
        assert!(a.iter_free().all(|(s, e)| e < 0x4000 || s > 0x5fff));
        // Node pool: 3 free ranges + 2 live = 5; a claim that leaves a piece needs a 6th.
        assert_eq!(a.free_ranges(), 3);
        assert_eq!(a.claim(0x6000, 0x6fff), Err(IommuError::DmaAlloc));
        assert_eq!(a.free_bytes(), free - 0x2000, "unchanged");
        // Taking a whole free range needs no new node.
        a.claim(0x3000, 0x3fff).unwrap();
        a.free(0x3000, 0x1000).unwrap();
        a.free(0x4000, 0x2000).unwrap();
        assert_eq!(a.free_bytes(), free);
        assert_eq!(a.live_allocations(), 1);
        assert_eq!(a.alloc(0x5000).unwrap(), 0x3000, "merged back");
    }
}
