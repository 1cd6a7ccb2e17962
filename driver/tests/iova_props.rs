//! Property tests of `IovaAllocator`: for any range, granule, capacity, reserved regions and
//! sequence of alloc/free/reserve — garbage and `u64::MAX` ends included — nothing panics,
//! allocations are granule-aligned, non-zero, inside the range, disjoint from each other and
//! from every reserved region, the free-space bookkeeping is exact, and freeing everything
//! restores the free space.

use proptest::prelude::*;
use virtio_iommu_driver::dma::IovaAllocator;

#[derive(Clone, Debug)]
enum Op {
    /// Allocate this many bytes.
    Alloc(u64),
    /// Free the live allocation at this index (modulo the count), exactly.
    Free(usize),
    /// Free an arbitrary range (usually rejected).
    FreeGarbage(u64, u64),
    /// Reserve `start..=end` (infallible version when the flag is set).
    Reserve(u64, u64, bool),
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => any::<u64>(),
        2 => 0u64..0x10_0000,
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => (0u64..0x1000).prop_map(|d| u64::MAX - d),
    ]
}

fn op(granule: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..40)
            .prop_map(move |n| Op::Alloc(n.saturating_mul(granule) - (n % 3).min(granule - 1))),
        1 => edge_u64().prop_map(Op::Alloc),
        5 => any::<usize>().prop_map(Op::Free),
        1 => (edge_u64(), edge_u64()).prop_map(|(s, n)| Op::FreeGarbage(s, n)),
        1 => (edge_u64(), 0u64..0x8000, any::<bool>())
            .prop_map(|(s, len, f)| Op::Reserve(s, s.saturating_add(len), f)),
        1 => (edge_u64(), edge_u64(), any::<bool>()).prop_map(|(s, e, f)| Op::Reserve(s, e, f)),
    ]
}

fn setup() -> impl Strategy<Value = (u64, u64, u64, usize, Vec<Op>)> {
    prop_oneof![
        3 => Just(12u32),
        1 => 0u32..=20,
        1 => 0u32..=63,
    ]
    .prop_flat_map(|shift| {
        let g = 1u64 << shift;
        (
            Just(g),
            edge_u64(),
            edge_u64(),
            prop_oneof![Just(1usize), Just(2), 3usize..64, Just(1024)],
            proptest::collection::vec(op(g), 0..120),
        )
    })
    .prop_map(|(g, a, b, cap, ops)| (g, a.min(b), a.max(b), cap, ops))
}

/// `(start, last)` inclusive ranges overlap.
fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Checks every invariant against the model (`live`: exact allocations, `reserved`: widened
/// reserved regions that were applied).
fn check(a: &IovaAllocator, lo: u64, hi: u64, live: &[(u64, u64)], reserved: &[(u64, u64)]) {
    let g = a.granule();
    let free: Vec<(u64, u64)> = a.iter_free().collect();
    let mut total = 0u64;
    for (i, &(s, e)) in free.iter().enumerate() {
        assert!(s <= e && s != 0, "free range {s:#x}..={e:#x}");
        assert!(s >= lo && e <= hi, "free range outside the range");
        assert_eq!(s % g, 0);
        assert_eq!(e.wrapping_add(1) % g, 0);
        if i > 0 {
            assert!(
                free[i - 1].1.checked_add(1).unwrap() < s,
                "unsorted or unmerged"
            );
        }
        total += e - s + 1;
        for &r in reserved {
            assert!(!overlap((s, e), r), "free space in a reserved region");
        }
    }
    assert_eq!(a.free_bytes(), total);
    assert_eq!(a.free_ranges(), free.len());
    assert!(a.free_ranges() + a.live_allocations() <= a.capacity());
    for (i, &(s, size)) in live.iter().enumerate() {
        let e = s + (size - 1);
        assert!(
            s != 0 && s >= lo && e <= hi,
            "allocation {s:#x}+{size:#x} outside"
        );
        assert_eq!(s % g, 0, "unaligned allocation");
        assert_eq!(size % g, 0);
        for &r in reserved {
            assert!(!overlap((s, e), r), "allocation {s:#x} in reserved {r:x?}");
        }
        for &f in &free {
            assert!(!overlap((s, e), f), "allocation {s:#x} is also free");
        }
        for &(t, tsize) in &live[i + 1..] {
            assert!(
                !overlap((s, e), (t, t + (tsize - 1))),
                "overlapping allocations"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn allocations_are_disjoint_aligned_inside_and_free_restores(
        (g, start, end, cap, ops) in setup()
    ) {
        let Ok(mut a) = IovaAllocator::with_capacity(start, end, g, cap) else {
            // Refused only when no whole granule above 0 fits.
            let first = start.max(g).checked_next_multiple_of(g);
            let fits = first.is_some_and(|f| f.checked_add(g - 1).is_some_and(|l| l <= end));
            prop_assert!(!fits, "refused a usable range {start:#x}..={end:#x} granule {g:#x}");
            return Ok(());
        };
        let (lo, hi) = a.range();
        prop_assert!(lo >= start && hi <= end && lo != 0);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut reserved: Vec<(u64, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(size) => {
                    let before = a.free_bytes();
                    match a.alloc(size) {
                        Ok(s) => {
                            let rounded = size.next_multiple_of(g);
                            live.push((s, rounded));
                            prop_assert_eq!(a.free_bytes(), before - rounded);
                        }
                        Err(_) => prop_assert_eq!(a.free_bytes(), before),
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let (s, size) = live.swap_remove(i % live.len());
                    prop_assert_eq!(a.free(s, size), Ok(()), "exact free of a live allocation");
                }
                Op::Free(_) => {}
                Op::FreeGarbage(s, size) => {
                    // Only ranges that must be refused (the model stays exact): size 0,
                    // unaligned, overflowing, outside the range, or overlapping free space.
                    let e = size
                        .max(1)
                        .checked_next_multiple_of(g)
                        .and_then(|n| s.checked_add(n - 1));
                    let must_refuse = size == 0
                        || size.checked_next_multiple_of(g).is_none()
                        || s % g != 0
                        || e.is_none_or(|e| {
                            s < lo || e > hi || a.iter_free().any(|f| overlap((s, e), f))
                        });
                    if must_refuse {
                        let before: Vec<_> = a.iter_free().collect();
                        prop_assert!(a.free(s, size).is_err(), "free({s:#x}, {size:#x}) accepted");
                        prop_assert_eq!(a.iter_free().collect::<Vec<_>>(), before);
                    }
                }
                Op::Reserve(s, e, infallible) => {
                    let (ws, we) = (s & !(g - 1), e | (g - 1));
                    if live.iter().any(|&(t, n)| overlap((ws, we), (t, t + (n - 1)))) {
                        // The caller reserves before allocating; skip overlapping live ones.
                        continue;
                    }
                    if infallible {
                        a.reserve(s, e);
                        if s <= e {
                            reserved.push((ws, we));
                        }
                    } else {
                        if a.try_reserve(s, e).is_ok() {
                            reserved.push((ws, we));
                        }
                    }
                }
            }
            check(&a, lo, hi, &live, &reserved);
        }
        // Free everything: the free space is what it was with nothing allocated, if no reserve
        // happened in between (reserves change it).
        let snapshot_reserves = reserved.len();
        for (s, size) in live.drain(..).rev() {
            prop_assert_eq!(a.free(s, size), Ok(()));
        }
        check(&a, lo, hi, &live, &reserved);
        prop_assert_eq!(a.live_allocations(), 0);
        if snapshot_reserves == 0 {
            prop_assert_eq!(a.iter_free().collect::<Vec<_>>(), vec![(lo, hi)]);
            prop_assert_eq!(a.free_bytes(), hi - lo + 1);
        }
    }

    #[test]
    fn free_restores_exactly(
        sizes in proptest::collection::vec(1u64..0x40_000, 1..200),
        order in proptest::collection::vec(any::<usize>(), 200),
        resv in proptest::collection::vec((0u64..0x1_0000_0000, 0u64..0x10_0000), 0..8),
    ) {
        let mut a = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        for (s, len) in resv {
            a.try_reserve(s, s + len).unwrap();
        }
        let initial: Vec<_> = a.iter_free().collect();
        let bytes = a.free_bytes();
        let mut live: Vec<(u64, u64)> = sizes.iter().filter_map(|&n| a.alloc(n).ok().map(|s| (s, n))).collect();
        for o in order {
            if live.is_empty() {
                break;
            }
            let (s, n) = live.swap_remove(o % live.len());
            a.free(s, n).unwrap();
        }
        for (s, n) in live {
            a.free(s, n).unwrap();
        }
        prop_assert_eq!(a.iter_free().collect::<Vec<_>>(), initial);
        prop_assert_eq!(a.free_bytes(), bytes);
    }
}
