//! The `blk-bench` bookkeeping profile: what the driver's own data structures cost per
//! virtio-blk request with no request sent, no lock taken and no `Hal` — the IOVA allocator
//! alone, and a [`DmaSpace`]'s `map_buffer` + `unmap_buffer` in strict, lazy (fresh and
//! recurring buffers, with and without clock reads) and identity-mapped mode, on a mapper that
//! accepts everything. Printed as `# blk-bench: bookkeeping alone` lines after the throughput
//! report (see BENCHMARKS.md).

use virtio_iommu_driver::dma::{
    Clock, DmaSpace, IommuMapper, IovaAllocator, PhysRange, UnmapPolicy,
};
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::IommuError;

use crate::timer;

/// A mapper that accepts every request without sending it: what remains is the space's own
/// bookkeeping.
struct Accept(u64);

impl IommuMapper for Accept {
    fn granule(&self) -> u64 {
        self.0
    }
    fn map(&mut self, _: u32, _: u64, _: u64, _: u64, _: MapFlags) -> Result<(), IommuError> {
        Ok(())
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), IommuError> {
        Ok(())
    }
}

/// A clock that reads no counter (always 0): the lazy variants without clock reads.
struct Frozen;

impl Clock for Frozen {
    fn now_ns(&self) -> u64 {
        0
    }
}

static FROZEN: Frozen = Frozen;

/// virtio-blk requests per profile run: 3 buffers each (3 allocs + 3 frees, or 3 maps + 3
/// unmaps).
const REQUESTS: u64 = 1000;
/// Profile runs per variant, interleaved; the fastest counts (the host is shared).
const PROFILE_RUNS: usize = 7;
/// The IOMMU granule of the profile (bytes).
const GRANULE: u64 = 0x1000;

/// [`REQUESTS`] times the allocs and frees of a virtio-blk request's 3 buffers' IOVAs, with
/// the IOVA allocator alone; nanoseconds per request (3 allocs + 3 frees).
fn iova_pairs() -> Option<u64> {
    let mut iova = IovaAllocator::new(0, (1 << 48) - 1, GRANULE).ok()?;
    let sizes = [0x1000u64, 0x1_1000, 0x1000];
    let start = timer::now_ticks();
    for _ in 0..REQUESTS {
        let mut at = [0u64; 3];
        for (slot, len) in at.iter_mut().zip(sizes) {
            *slot = iova.alloc(len).ok()?;
        }
        for (a, len) in at.into_iter().zip(sizes) {
            iova.free(a, len).ok()?;
        }
    }
    Some(timer::ticks_to_us(timer::now_ticks().wrapping_sub(start)) * 1000 / REQUESTS)
}

/// How [`space_pairs`] builds its space and picks its buffers.
#[derive(Clone, Copy)]
enum Profile {
    /// Strict space; strict policy, or lazy with the clock; buffers at 64 places in turn.
    Strict(Option<&'static dyn Clock>),
    /// Lazy space with the clock; the same 3 buffers every time (revived, as virtio-blk's).
    Recurring(&'static dyn Clock),
    /// Identity-mapped space over the buffers' RAM; the same 3 buffers every time.
    Identity,
}

/// [`REQUESTS`] times `map_buffer` + `unmap_buffer` of the 3 buffers of a virtio-blk request
/// (16 bytes, 64 KiB, 1 byte) in a space ([`Profile`]) on a mapper that sends nothing (lazy
/// with `max_pending` and a 10 ms time bound); nanoseconds per request (3 maps + 3 unmaps).
fn space_pairs(profile: Profile, max_pending: usize) -> Option<u64> {
    let mut m = Accept(GRANULE);
    let strict = || DmaSpace::new(1, IovaAllocator::new(0, (1 << 48) - 1, GRANULE).ok()?).ok();
    let (mut space, clock, places) = match profile {
        Profile::Identity => {
            let ram = [PhysRange::from_start_size(0x4000_0000, 0x1000_0000)?];
            let space = DmaSpace::identity_mapped(&mut m, 1, &ram, &[]).ok()?;
            (space, None, 1)
        }
        Profile::Strict(clock) => (strict()?, clock, 64),
        Profile::Recurring(clock) => (strict()?, Some(clock), 1),
    };
    if let Some(clock) = clock {
        let policy = UnmapPolicy::Lazy {
            max_pending,
            max_age_ns: super::blk_throughput::LAZY_MAX_AGE_NS,
            clock,
        };
        space.set_unmap_policy(policy).ok()?;
    }
    let rw = MapFlags::READ | MapFlags::WRITE;
    let start = timer::now_ticks();
    for i in 0..REQUESTS {
        let base = 0x4100_0000 + (i % places) * 0x20000;
        let bufs = [(base, 16), (base + 0x1000, 0x1_0000), (base + 0x1_2000, 1)];
        let mut at = [0u64; 3];
        for (slot, &(p, len)) in at.iter_mut().zip(&bufs) {
            *slot = space.map_buffer(&mut m, p, len, rw).ok()?;
        }
        for a in at {
            space.unmap_buffer(&mut m, a).ok()?;
        }
    }
    space.flush(&mut m).ok()?;
    Some(timer::ticks_to_us(timer::now_ticks().wrapping_sub(start)) * 1000 / REQUESTS)
}

/// Prints the cost of the bookkeeping alone, each variant the fastest of [`PROFILE_RUNS`]
/// interleaved runs, in nanoseconds per virtio-blk request (its 3 buffers); `clock` is the lazy policy's clock
/// (the bench's generic timer), `max_pending` its size bound.
pub fn run(clock: &'static dyn Clock, max_pending: usize) {
    let variants: [(&str, Option<Profile>); 7] = [
        ("IovaAllocator alloc + free", None),
        (
            "strict map_buffer + unmap_buffer",
            Some(Profile::Strict(None)),
        ),
        (
            "lazy map_buffer + unmap_buffer",
            Some(Profile::Strict(Some(clock))),
        ),
        (
            "lazy map_buffer + unmap_buffer, clock not read",
            Some(Profile::Strict(Some(&FROZEN))),
        ),
        (
            "lazy map_buffer + unmap_buffer, recurring buffers (revived)",
            Some(Profile::Recurring(clock)),
        ),
        (
            "lazy map_buffer + unmap_buffer, recurring buffers (revived), clock not read",
            Some(Profile::Recurring(&FROZEN)),
        ),
        (
            "identity-mapped map_buffer + unmap_buffer",
            Some(Profile::Identity),
        ),
    ];
    let mut best = [u64::MAX; 7];
    for _ in 0..PROFILE_RUNS {
        for (b, (_, v)) in best.iter_mut().zip(&variants) {
            let ns = match v {
                None => iova_pairs(),
                Some(p) => space_pairs(*p, max_pending),
            };
            *b = (*b).min(ns.unwrap_or(u64::MAX));
        }
    }
    for (&b, (name, _)) in best.iter().zip(&variants) {
        if b == u64::MAX {
            println!("# blk-bench: bookkeeping alone, no requests: {name}: failed (a map, unmap or set-up returned an error)");
        } else {
            println!("# blk-bench: bookkeeping alone, no requests: {name}: {b} ns per request of 3 buffers (fastest of {PROFILE_RUNS})");
        }
    }
}
