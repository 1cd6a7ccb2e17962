//! [`PhysRange`] and the private helpers on sorted, disjoint lists of inclusive ranges.

use alloc::vec::Vec;

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

/// The union of `ranges` (inclusive ends), sorted and merged (adjacent ranges too).
pub(crate) fn sorted_union(ranges: impl Iterator<Item = PhysRange>) -> Vec<PhysRange> {
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
pub(crate) fn subtract(r: PhysRange, holes: &[PhysRange], out: &mut Vec<PhysRange>) {
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
pub(crate) fn inside_one(ranges: &[PhysRange], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.start <= start);
    i > 0 && ranges[i - 1].end >= end
}

/// Whether `start..=end` intersects a range of `ranges` (sorted, disjoint). O(log n).
pub(crate) fn overlaps_any(ranges: &[PhysRange], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.start <= end);
    i > 0 && ranges[i - 1].end >= start
}

/// The largest granule-aligned range of `[g, 2^64)` (`g` a power of two, in bytes) that
/// intersects no range of `taken` (sorted, disjoint), shrunk inward to whole granules; `None`
/// when no whole granule is free. Address 0 (the first granule) is never part of it.
pub(crate) fn largest_gap(taken: &[PhysRange], g: u64) -> Option<PhysRange> {
    let mut best: Option<PhysRange> = None;
    let mut consider = |start: u64, end: u64| {
        // Inward to whole granules, without overflow: `end` may be u64::MAX.
        let Some(start) = start.max(g).checked_next_multiple_of(g) else {
            return;
        };
        let end = match end.checked_add(1) {
            Some(e) => match (e & !(g - 1)).checked_sub(1) {
                Some(end) => end,
                None => return,
            },
            None => u64::MAX,
        };
        if end < start || end - start < g - 1 {
            return;
        }
        // Sizes compared as `end - start` (size - 1): no overflow for a 2^64-byte range.
        if best.is_none_or(|b| end - start > b.end - b.start) {
            best = Some(PhysRange { start, end });
        }
    };
    let mut next = Some(0u64);
    for t in taken {
        if let Some(from) = next {
            if t.start > from {
                consider(from, t.start - 1);
            }
        }
        next = next.and_then(|n| n.max(t.end).checked_add(1));
    }
    if let Some(from) = next {
        consider(from, u64::MAX);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn largest_gap_and_sizes_without_overflow() {
        let r = |start, end| PhysRange { start, end };
        let g = 0x1000;
        // Nothing taken: everything but the first granule.
        assert_eq!(largest_gap(&[], g), Some(r(g, u64::MAX)));
        // Everything taken.
        assert_eq!(largest_gap(&[r(0, u64::MAX)], g), None);
        assert_eq!(largest_gap(&[r(g, u64::MAX)], g), None);
        // Unaligned gaps shrink inward; the largest wins.
        let taken = [
            r(0, 0x1fff),
            r(0x3800, 0x8fff),
            r(0x1_0000, u64::MAX - 0x2800),
        ];
        assert_eq!(largest_gap(&taken, g), Some(r(0x9000, 0xffff)));
        assert_eq!(largest_gap(&[r(0, u64::MAX - 0x800)], g), None);
        assert_eq!(
            largest_gap(&[r(0, u64::MAX - 0x1000)], 0x1000 / 2),
            Some(r(u64::MAX - 0xfff, u64::MAX))
        );
    }
}
