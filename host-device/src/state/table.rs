//! The mapping table of a domain: [`Mapping`]s keyed by first IOVA in a two-level sorted table
//! (leaves of at most 128 mappings and an index of each leaf's first IOVA), and [`Domain`].
//! The rules that change it (MAP, UNMAP, ATTACH) are in the parent module.

use super::*;

/// One mapping of a domain: IOVAs `virt_start..=virt_end` (the `virt_start` is the key in
/// [`Domain::mappings`]) to guest-physical addresses from `phys_start`, created by one MAP.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Mapping {
    /// Last IOVA of the mapping (inclusive).
    pub virt_end: u64,
    /// Guest-physical address of the first byte.
    pub phys_start: u64,
    /// Permissions and memory type (`READ`, `WRITE`, `MMIO`).
    pub flags: MapFlags,
}

/// A domain: an IOVA address space shared by the endpoints attached to it (§5.13.6.3).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Domain {
    pub(super) bypass: bool,
    pub(super) endpoints: BTreeSet<u32>,
    pub(super) mappings: MappingTable,
}

/// Most mappings in one leaf of a [`MappingTable`] (a power of two: see [`Leaf::count_le`]).
pub(super) const LEAF_MAX: usize = 128;
// `Leaf::count_le` is unrolled for this size.
const _: () = assert!(LEAF_MAX == 128);
/// After an UNMAP, a leaf with fewer mappings than this is merged with a neighbour...
pub(super) const LEAF_MIN: usize = LEAF_MAX / 4;
/// ...if together they hold at most this many (leaving room for MAPs before the next split).
pub(super) const LEAF_MERGED_MAX: usize = LEAF_MAX * 3 / 4;

/// Number of elements of the sorted `keys` that are `<= key`, for a `keys` whose length is zero
/// or a power of two: a fixed number of halvings, each one comparison and no branch, indexes
/// masked into range (the mask changes no index: they are all below the length).
#[inline]
fn count_le_pow2(keys: &[u64], key: u64) -> usize {
    let Some(mask) = keys.len().checked_sub(1) else {
        return 0;
    };
    // `base` is the last index whose key is `<= key` (or 0 if there is none) within the
    // `step * 2` keys from `base`; `base + step < keys.len()` at each comparison.
    let mut base = 0;
    let mut step = keys.len();
    loop {
        step >>= 1;
        if step == 0 {
            break;
        }
        let i = (base + step) & mask;
        base = std::hint::select_unpredictable(keys[i] <= key, i, base);
    }
    base + usize::from(keys[base & mask] <= key)
}

/// One leaf of a [`MappingTable`]: 1..=[`LEAF_MAX`] mappings sorted by first IOVA. Always
/// boxed, so that the table's vector of leaves moves 8 bytes per leaf when a leaf is inserted
/// or removed.
#[derive(Clone)]
pub(super) struct Leaf {
    /// `keys[i]` is the first IOVA of `maps[i]`; `keys[maps.len()..]` are `u64::MAX`. A fixed,
    /// padded array makes the in-leaf search a fixed sequence of steps with no bounds check.
    pub(super) keys: [u64; LEAF_MAX],
    pub(super) maps: Vec<Mapping>,
}

impl Leaf {
    pub(super) fn empty() -> Box<Self> {
        Box::new(Self {
            keys: [u64::MAX; LEAF_MAX],
            maps: Vec::new(),
        })
    }

    pub(super) fn single(start: u64, mapping: Mapping) -> Box<Self> {
        let mut leaf = Self::empty();
        leaf.keys[0] = start;
        leaf.maps.push(mapping);
        leaf
    }

    pub(super) fn len(&self) -> usize {
        self.maps.len()
    }

    /// The first IOVAs, in increasing order.
    pub(super) fn starts(&self) -> &[u64] {
        self.keys.get(..self.maps.len()).unwrap_or(&[])
    }

    pub(super) fn first(&self) -> Option<u64> {
        self.starts().first().copied()
    }

    /// Number of mappings whose first IOVA is `<= key`: seven branch-free halvings over the
    /// padded keys (indexes masked into range; the mask changes none of them).
    #[inline]
    pub(super) fn count_le(&self, key: u64) -> usize {
        const M: usize = LEAF_MAX - 1;
        let k = &self.keys;
        let mut base = usize::from(k[63] <= key) * 64;
        base += usize::from(k[(base + 31) & M] <= key) * 32;
        base += usize::from(k[(base + 15) & M] <= key) * 16;
        base += usize::from(k[(base + 7) & M] <= key) * 8;
        base += usize::from(k[(base + 3) & M] <= key) * 4;
        base += usize::from(k[(base + 1) & M] <= key) * 2;
        base += usize::from(k[base & M] <= key);
        base += usize::from(k[base & M] <= key);
        // Padding keys are `u64::MAX`, counted only when `key == u64::MAX`.
        base.min(self.len())
    }

    /// Number of mappings whose first IOVA is `< key`.
    pub(super) fn count_lt(&self, key: u64) -> usize {
        key.checked_sub(1).map_or(0, |k| self.count_le(k))
    }

    /// Inserts at `pos` (`<= len() < LEAF_MAX`).
    pub(super) fn insert(&mut self, pos: usize, start: u64, mapping: Mapping) {
        let len = self.len();
        self.keys.copy_within(pos..len, pos + 1);
        self.keys[pos] = start;
        self.maps.insert(pos, mapping);
    }

    /// Removes the mappings at `a..b` (`a <= b <= len()`).
    pub(super) fn remove(&mut self, a: usize, b: usize) {
        let len = self.len();
        self.keys.copy_within(b..len, a);
        self.keys[len - (b - a)..len].fill(u64::MAX);
        self.maps.drain(a..b);
    }

    /// Moves the mappings from `at` on (`at <= len()`) into a new leaf.
    pub(super) fn split_off(&mut self, at: usize) -> Box<Leaf> {
        let len = self.len();
        let mut right = Self::empty();
        right.keys[..len - at].copy_from_slice(&self.keys[at..len]);
        right.maps = self.maps.split_off(at);
        self.keys[at..len].fill(u64::MAX);
        right
    }

    /// Appends `other`'s mappings (`len() + other.len() <= LEAF_MAX`, all after ours).
    pub(super) fn append(&mut self, other: Box<Leaf>) {
        let (len, n) = (self.len(), other.len());
        self.keys[len..len + n].copy_from_slice(&other.keys[..n]);
        self.maps.extend(other.maps);
    }
}

/// The mappings of a domain, ordered by first IOVA (`virt_start`): an ordered map
/// `virt_start -> Mapping` specialised for the translation lookup "the mapping with the
/// greatest `virt_start <= iova`".
///
/// Two levels: `leaves`, each holding 1..=[`LEAF_MAX`] mappings in increasing `virt_start`
/// order, all of leaf `i` before all of leaf `i + 1`; and `firsts[i]`, the first `virt_start` of
/// leaf `i`, padded with `u64::MAX` to a power-of-two length (for [`count_le_pow2`]). A lookup
/// is a binary search in `firsts` then one in the leaf's keys (keys in their own arrays, so the
/// searches touch only keys), branch-free and without allocation. An insertion moves at most
/// `LEAF_MAX` entries of one leaf, and on a split 16 bytes per leaf (`firsts` and `leaves`).
/// Equality and `Debug` are those of the ordered map, whatever the leaf boundaries.
#[derive(Clone, Default)]
pub(super) struct MappingTable {
    pub(super) firsts: Vec<u64>,
    // Boxed on purpose: a leaf is over 1 KiB, and inserting or removing one moves the rest.
    #[allow(clippy::vec_box)]
    pub(super) leaves: Vec<Box<Leaf>>,
    pub(super) len: usize,
}

impl MappingTable {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &Mapping)> + '_ {
        self.leaves
            .iter()
            .flat_map(|l| l.starts().iter().copied().zip(l.maps.iter()))
    }

    /// Number of leaves whose first `virt_start` is `<= key`.
    #[inline]
    pub(super) fn leaves_le(&self, key: u64) -> usize {
        // Padding is `u64::MAX`, counted only when `key == u64::MAX`.
        count_le_pow2(&self.firsts, key).min(self.leaves.len())
    }

    /// Index of the leaf holding the greatest `virt_start <= key`, if any.
    #[inline]
    pub(super) fn leaf_of(&self, key: u64) -> Option<usize> {
        self.leaves_le(key).checked_sub(1)
    }

    /// Inserts a new leaf at `at` (`<= leaves.len()`), with its first start.
    pub(super) fn insert_leaf(&mut self, at: usize, leaf: Box<Leaf>, first: u64) {
        let live = self.leaves.len();
        if live == self.firsts.len() {
            self.firsts.resize((live + 1).next_power_of_two(), u64::MAX);
        }
        self.firsts.copy_within(at..live, at + 1);
        self.firsts[at] = first;
        self.leaves.insert(at, leaf);
    }

    /// Removes the leaves `at..at + count` (`at + count <= leaves.len()`) and their first
    /// starts; returns the first removed leaf.
    pub(super) fn remove_leaves(&mut self, at: usize, count: usize) -> Option<Box<Leaf>> {
        let live = self.leaves.len();
        self.firsts.copy_within(at + count..live, at);
        let now = live - count;
        self.firsts[now..live].fill(u64::MAX);
        // Shrink the padding when three quarters of it are unused.
        if now <= self.firsts.len() / 4 {
            self.firsts
                .truncate(now.next_power_of_two().min(self.firsts.len()));
            if now == 0 {
                self.firsts.clear();
            }
        }
        let mut drained = self.leaves.drain(at..at + count);
        let first = drained.next();
        drop(drained);
        first
    }

    /// The mapping with the greatest `virt_start <= key`.
    #[inline]
    pub(super) fn floor(&self, key: u64) -> Option<(u64, &Mapping)> {
        let leaf = self.leaves.get(self.leaf_of(key)?)?;
        // The leaf's first start is `<= key`, so the count is at least 1.
        let i = leaf.count_le(key).checked_sub(1)?;
        Some((*leaf.keys.get(i)?, leaf.maps.get(i)?))
    }

    /// Inserts the mapping starting at `start`, which the caller checked overlaps none (so
    /// `start` is not a key yet).
    ///
    /// A full leaf is split in two halves, except at the ends of the table: a MAP after every
    /// mapping (or before every mapping) moves only a quarter of the last (first) leaf into a
    /// new one, so MAPs in increasing (decreasing) IOVA order leave leaves three quarters
    /// full: fewer leaves than half-full ones, and room for later MAPs between them before a
    /// split.
    pub(super) fn insert(&mut self, start: u64, mapping: Mapping) {
        const QUARTER: usize = LEAF_MAX / 4;
        self.len += 1;
        let Some(li) = self.leaf_of(start) else {
            // Before every mapping.
            match (self.leaves.first_mut(), self.firsts.first_mut()) {
                (Some(leaf), Some(first)) => {
                    let rest = (leaf.len() == LEAF_MAX).then(|| leaf.split_off(QUARTER));
                    leaf.insert(0, start, mapping);
                    *first = start;
                    if let Some(rest) = rest {
                        if let Some(rest_first) = rest.first() {
                            self.insert_leaf(1, rest, rest_first);
                        }
                    }
                }
                _ => self.insert_leaf(0, Leaf::single(start, mapping), start),
            }
            return;
        };
        let is_last = li + 1 == self.leaves.len();
        let Some(leaf) = self.leaves.get_mut(li) else {
            return; // unreachable: `leaf_of` returns an index below `leaves.len()`
        };
        let pos = leaf.count_lt(start);
        if leaf.len() < LEAF_MAX {
            leaf.insert(pos, start, mapping);
            return;
        }
        // `pos >= 1` (the leaf's first start is below `start`), so the left part keeps its
        // first start.
        let mid = if is_last && pos == LEAF_MAX {
            LEAF_MAX - QUARTER
        } else {
            LEAF_MAX / 2
        };
        let mut right = leaf.split_off(mid);
        if pos <= mid {
            leaf.insert(pos, start, mapping);
        } else {
            right.insert(pos - mid, start, mapping);
        }
        let Some(right_first) = right.first() else {
            return; // unreachable: `right` holds `LEAF_MAX - mid` or more mappings
        };
        self.insert_leaf(li + 1, right, right_first);
    }

    /// Removes every mapping whose `virt_start` is in `start..=end`; returns how many.
    pub(super) fn remove_range(&mut self, start: u64, end: u64) -> usize {
        // Leaves `first..stop` may hold such mappings: from the one holding the greatest
        // `virt_start <= start` (or the first) to the last whose first start is `<= end`.
        let first = self.leaf_of(start).unwrap_or(0);
        let stop = self.leaves_le(end);
        if first >= stop {
            return 0;
        }
        let mut removed = 0;
        for leaf in self.leaves.get_mut(first..stop).unwrap_or_default() {
            let a = leaf.count_lt(start);
            let b = leaf.count_le(end);
            if a < b {
                leaf.remove(a, b);
                removed += b - a;
            }
        }
        if removed == 0 {
            return 0;
        }
        self.len -= removed;
        // Leaves strictly between the first and the last of them start after `start` and end
        // before the next leaf's first start `<= end`: they are empty now. Drop them at once.
        let last = stop - 1;
        if last > first + 1 {
            self.remove_leaves(first + 1, last - first - 1);
        }
        // The two boundary leaves, now at `first` and `first + 1` (the same one if
        // `last == first`): drop them if empty, else refresh their first start; the higher
        // index first, so the other stays valid. Then merge what became small.
        if last > first {
            self.refresh_leaf(first + 1);
        }
        self.refresh_leaf(first);
        self.merge_small(first + 1);
        self.merge_small(first);
        removed
    }

    /// Drops leaf `li` if it became empty, else sets `firsts[li]` to its first start.
    pub(super) fn refresh_leaf(&mut self, li: usize) {
        let Some(leaf) = self.leaves.get(li) else {
            return;
        };
        match leaf.first() {
            None => {
                self.remove_leaves(li, 1);
            }
            Some(f) => {
                if let Some(slot) = self.firsts.get_mut(li) {
                    *slot = f;
                }
            }
        }
    }

    /// Merges leaf `li` with a neighbour if it holds fewer than [`LEAF_MIN`] mappings and both
    /// fit in [`LEAF_MERGED_MAX`] (bounds the number of leaves after UNMAPs).
    pub(super) fn merge_small(&mut self, li: usize) {
        let Some(len) = self.leaves.get(li).map(|l| l.len()) else {
            return;
        };
        if len >= LEAF_MIN {
            return;
        }
        let next = self.leaves.get(li + 1).map(|l| l.len());
        let prev = li
            .checked_sub(1)
            .and_then(|p| self.leaves.get(p))
            .map(|l| l.len());
        // Merge leaf `into + 1` into leaf `into`.
        let into = if next.is_some_and(|n| len + n <= LEAF_MERGED_MAX) {
            li
        } else if prev.is_some_and(|p| len + p <= LEAF_MERGED_MAX) {
            li - 1
        } else {
            return;
        };
        if let Some(other) = self.remove_leaves(into + 1, 1) {
            if let Some(leaf) = self.leaves.get_mut(into) {
                leaf.append(other);
            }
        }
    }
}

impl PartialEq for MappingTable {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for MappingTable {}

impl std::fmt::Debug for MappingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Domain {
    /// Whether it was created with `VIRTIO_IOMMU_ATTACH_F_BYPASS`: its endpoints' accesses are
    /// translated with the identity function, and it has no mappings.
    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// The attached endpoint IDs (never empty: a domain ceases to exist with its last endpoint).
    pub fn endpoints(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.iter().copied()
    }

    /// Mappings in increasing IOVA order, as `(virt_start, mapping)`.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, &Mapping)> + '_ {
        self.mappings.iter()
    }

    /// Number of mappings.
    pub fn mapping_count(&self) -> usize {
        self.mappings.len()
    }

    /// The mapping containing IOVA `iova`, as `(virt_start, mapping)`. O(log n).
    pub fn mapping_at(&self, iova: u64) -> Option<(u64, &Mapping)> {
        self.mappings
            .floor(iova)
            .filter(|(_, m)| m.virt_end >= iova)
    }

    /// Whether any mapping intersects the inclusive IOVA range `start..=end`. O(log n): the
    /// mapping with the greatest `virt_start <= end` is the only candidate, as mappings do not
    /// overlap.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.mappings
            .floor(end)
            .is_some_and(|(_, m)| m.virt_end >= start)
    }
}
