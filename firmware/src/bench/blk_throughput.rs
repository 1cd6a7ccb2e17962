//! `blk-bench`: virtio-blk read throughput behind the IOMMU, through virtio-drivers'
//! unmodified `VirtIOBlk` over the driver crate's `Hal` adapter, in three modes in one run:
//!
//! - **strict**: one MAP per buffer at `share`, one synchronous UNMAP at `unshare`;
//! - **lazy**: strict MAPs, UNMAPs deferred into the flush queue ([`UnmapPolicy::Lazy`],
//!   [`LAZY_MAX_PENDING`] ranges or [`LAZY_MAX_AGE_NS`]), sent as one batch;
//! - **identity**: identity mappings of all RAM made once (identity-mapped mode): no request
//!   per buffer — the baseline.
//!
//! Each mode reads the disk sequentially in 64 KiB requests ([`SEQ_PASSES`] passes) and at
//! random 4 KiB-aligned offsets ([`RANDOM_READS`] reads, the same offsets in every mode), one
//! request in flight (virtio-drivers' `VirtIOBlk` as `blkio::io` drives it). The modes run in
//! [`ROUNDS`] interleaved rounds so a slow phase of the host affects all alike; rates are
//! those of each mode's fastest round (the host is shared), totals are over all rounds. Per mode it
//! prints MiB/s, IOPS, MAP/UNMAP requests and IOMMU notifications per I/O, one
//! `blk-bench-result:` line per mode; then the ratios strict/identity and lazy/identity, each
//! the median over the rounds of that round's ratio (the modes of a round ran back to back)
//! and, for reference, the ratio of the fastest rounds, judged against the goal
//! (strict ≥ 90 %, lazy ≥ 98 %) by the medians, one `blk-bench-ratio:` line per mode; the data read must be the same in every mode (a
//! checksum). TAP cases: set-up, each mode's reads, data equal; the goal itself is reported,
//! not a case (see BENCHMARKS.md for the measured outcome).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::pci::PciTransport;
use virtio_iommu_driver::dma::{
    with_locked, AccessPlatform, Clock, DmaContext, DmaMode, DmaSpace, IommuHal, IommuMapper,
    PhysRange, UnmapPolicy,
};
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{BatchOp, IommuError};

use super::{now_ns, setup, Endpoint, IOMMU};
use crate::hal::IdentityHal;
use crate::pci::PciBus;
use crate::timer;

/// DMA state of the virtio-blk device under test.
static BENCH_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);

/// Generic-timer ticks spent inside the `Hal` adapter's state (MAP/UNMAP requests and the
/// space's bookkeeping), and the number of entries: where the time of an I/O goes.
static HAL_TICKS: AtomicU64 = AtomicU64::new(0);
static HAL_CALLS: AtomicU64 = AtomicU64::new(0);
/// Ticks of those spent in IOMMU requests (MAP, UNMAP, batches): the rest is the adapter's
/// own bookkeeping (IOVA allocator, live mappings, locks).
static REQ_TICKS: AtomicU64 = AtomicU64::new(0);

/// An [`IommuMapper`] that times the requests of the one it wraps into [`REQ_TICKS`].
struct Timed<'a>(&'a mut dyn IommuMapper);

impl Timed<'_> {
    fn time<R>(&mut self, f: impl FnOnce(&mut dyn IommuMapper) -> R) -> R {
        let start = timer::now_ticks();
        let r = f(&mut *self.0);
        REQ_TICKS.fetch_add(timer::now_ticks().wrapping_sub(start), Ordering::Relaxed);
        r
    }
}

impl IommuMapper for Timed<'_> {
    fn granule(&self) -> u64 {
        self.0.granule()
    }
    fn input_range(&self) -> (u64, u64) {
        self.0.input_range()
    }
    fn map(&mut self, d: u32, s: u64, e: u64, p: u64, f: MapFlags) -> Result<(), IommuError> {
        self.time(|i| i.map(d, s, e, p, f))
    }
    fn unmap(&mut self, d: u32, s: u64, e: u64) -> Result<(), IommuError> {
        self.time(|i| i.unmap(d, s, e))
    }
    fn submit_batch(
        &mut self,
        ops: &[BatchOp],
        results: &mut [Result<(), IommuError>],
    ) -> Result<(), IommuError> {
        self.time(|i| i.submit_batch(ops, results))
    }
}

/// `IommuHal<BenchDma>`: the benchmarked virtio-blk device's buffers, through [`IOMMU`] and
/// [`BENCH_DMA`] ([`with_locked`], as `dma_context!` writes it), timed.
pub struct BenchDma;

impl DmaContext for BenchDma {
    type Inner = IdentityHal;
    fn with<R>(
        f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
    ) -> Result<R, IommuError> {
        let start = timer::now_ticks();
        let r = with_locked(&IOMMU, &BENCH_DMA, |iommu, space| {
            f(&mut Timed(iommu), space)
        });
        HAL_TICKS.fetch_add(timer::now_ticks().wrapping_sub(start), Ordering::Relaxed);
        HAL_CALLS.fetch_add(1, Ordering::Relaxed);
        r
    }
}

type Blk = VirtIOBlk<IommuHal<BenchDma>, AccessPlatform<PciTransport>>;

/// Size bound of the lazy flush queue (ranges), unless `lazy-max-pending=N` is on the kernel
/// command line; capped at half the request queue so that a flush is one notification.
pub const LAZY_MAX_PENDING: usize = 32;

/// The lazy size bound in use (see [`LAZY_MAX_PENDING`]).
static MAX_PENDING: AtomicU64 = AtomicU64::new(LAZY_MAX_PENDING as u64);
/// Time bound of the lazy flush queue: 10 ms.
pub const LAZY_MAX_AGE_NS: u64 = 10_000_000;
/// Sequential request size in bytes.
const SEQ: usize = 64 * 1024;
/// Random request size in bytes.
const RANDOM: usize = 4096;
/// Whole-disk sequential passes per mode and round.
const SEQ_PASSES: usize = 1;
/// Random reads per mode and round.
const RANDOM_READS: usize = 256;
/// Interleaved rounds.
const ROUNDS: usize = 16;

/// The generic timer as the flush queue's clock. It is read on every `share` and `unshare`
/// while UNMAPs are pending, so it avoids the 128-bit division of `now_ns` (a library call,
/// about a microsecond under TCG) when the counter period is a whole number of nanoseconds
/// (16 ns at QEMU's 62.5 MHz).
struct GenericTimer;

/// Nanoseconds per counter tick when whole (0: not known yet; `u64::MAX`: not whole).
static NS_PER_TICK: AtomicU64 = AtomicU64::new(0);

impl Clock for GenericTimer {
    fn now_ns(&self) -> u64 {
        let mut per_tick = NS_PER_TICK.load(Ordering::Relaxed);
        if per_tick == 0 {
            let hz = timer::ticks_per_second();
            per_tick = match 1_000_000_000 % hz {
                0 => 1_000_000_000 / hz,
                _ => u64::MAX,
            };
            NS_PER_TICK.store(per_tick, Ordering::Relaxed);
        }
        match per_tick {
            u64::MAX => now_ns(),
            n => timer::now_ticks().saturating_mul(n),
        }
    }
}

static TIMER: GenericTimer = GenericTimer;

/// A clock that reads no counter (always 0): the profile's lazy run without clock reads.
struct Frozen;

impl Clock for Frozen {
    fn now_ns(&self) -> u64 {
        0
    }
}

static FROZEN: Frozen = Frozen;

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Bench {
    Strict,
    Lazy,
    Identity,
}

impl Bench {
    const ALL: [Bench; 3] = [Bench::Strict, Bench::Lazy, Bench::Identity];
    fn name(self) -> &'static str {
        match self {
            Bench::Strict => "strict",
            Bench::Lazy => "lazy",
            Bench::Identity => "identity",
        }
    }
}

/// What one mode measured, summed over the rounds.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    seq_bytes: u64,
    seq_us: u64,
    /// The fastest round's sequential and random times (the machine is shared: the best
    /// round is the least disturbed one).
    best_seq_us: u64,
    best_rand_us: u64,
    /// Each round's sequential and random times, in round order.
    round_seq_us: [u64; ROUNDS],
    round_rand_us: [u64; ROUNDS],
    rounds: u64,
    seq_ios: u64,
    rand_ios: u64,
    rand_us: u64,
    maps: u64,
    unmaps: u64,
    notifications: u64,
    flushes: u64,
    /// Microseconds inside the `Hal` adapter's state during the reads, and its entries.
    hal_us: u64,
    hal_calls: u64,
    /// Of `hal_us`, microseconds in IOMMU requests.
    req_us: u64,
    /// Checksums of the sequential and random data (equal across modes).
    seq_sum: u64,
    rand_sum: u64,
}

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn ratio_pct(a: u64, b: u64) -> u64 {
    a.saturating_mul(100).checked_div(b).unwrap_or(0)
}

/// Runs the bench; returns `(passed, failed)` TAP cases.
pub fn run(dtb: &'static [u8], pci: &mut PciBus) -> (u32, u32) {
    let mut n = 0;
    let mut failed = 0;
    let mut case = |name: &str, r: Result<(), String>| {
        n += 1;
        match r {
            Ok(()) => println!("ok {n} - {name}"),
            Err(e) => {
                failed += 1;
                println!("not ok {n} - {name} # {e}");
            }
        }
    };
    if let Some(n) = super::bootarg(dtb, "lazy-max-pending").and_then(|v| v.parse().ok()) {
        MAX_PENDING.store(n, Ordering::Relaxed);
    }
    let prepared = prepare(dtb, pci);
    let (ram, ep, mut domain, last_domain) = match prepared {
        Ok(p) => p,
        Err(e) => {
            case("blk-bench: virtio-iommu and a virtio-blk endpoint", Err(e));
            println!("1..{n}");
            return (n - failed, failed);
        }
    };
    case("blk-bench: virtio-iommu and a virtio-blk endpoint", Ok(()));
    let mut sums = [Sums::default(); 3];
    let mut errors: [Option<String>; 3] = [None, None, None];
    for round in 0..ROUNDS {
        for (i, mode) in Bench::ALL.into_iter().enumerate() {
            if errors[i].is_some() {
                continue;
            }
            if domain > last_domain {
                errors[i] = Some("domain_range exhausted".into());
                continue;
            }
            let r = measure(pci, &ram, &ep, domain, mode, &mut sums[i]);
            domain += 1;
            if let Err(e) = r {
                errors[i] = Some(format!("round {round}: {e}"));
            }
        }
    }
    for (i, mode) in Bench::ALL.into_iter().enumerate() {
        case(
            &format!(
                "blk-bench {}: sequential 64 KiB and random 4 KiB reads",
                mode.name()
            ),
            errors[i].clone().map_or(Ok(()), Err),
        );
    }
    let all_ok = errors.iter().all(Option::is_none);
    let same = sums
        .windows(2)
        .all(|w| w[0].seq_sum == w[1].seq_sum && w[0].rand_sum == w[1].rand_sum);
    case(
        "blk-bench: the same data read in every mode",
        match (all_ok, same) {
            (true, true) => Ok(()),
            (false, _) => Err("not every mode ran".into()),
            (true, false) => Err("checksums differ between modes".into()),
        },
    );
    if all_ok {
        report(&sums);
        bookkeeping_profile();
    }
    println!("1..{n}");
    (n - failed, failed)
}

type Prepared = (Vec<PhysRange>, Endpoint, u32, u32);

fn prepare(dtb: &'static [u8], pci: &mut PciBus) -> Result<Prepared, String> {
    let (_, endpoints) = setup(pci)?;
    let ep = endpoints
        .iter()
        .find(|e| {
            e.function.vendor_id == 0x1af4 && [0x1042, 0x1001].contains(&e.function.device_id)
        })
        .cloned()
        .ok_or("no virtio-blk behind the IOMMU")?;
    let fdt = fdt::Fdt::new(dtb).map_err(|_| "devicetree")?;
    let ram: Vec<PhysRange> = crate::heap::ram_regions(&fdt)
        .filter_map(|(start, size)| PhysRange::from_start_size(start, size))
        .collect();
    let guard = IOMMU.lock();
    let iommu = guard.as_ref().ok_or("no IOMMU")?;
    let c = *iommu.config();
    println!(
        "# blk-bench: endpoint {:#x}, granule {:#x}, requestq {} descriptors, features {:?}",
        ep.id,
        c.granule,
        iommu.requestq_size(),
        iommu.features()
    );
    Ok((ram, ep, c.domain_range.0, c.domain_range.1))
}

/// One mode, one round: attach, create the device, read, drop, check, tear down.
fn measure(
    pci: &mut PciBus,
    ram: &[PhysRange],
    ep: &Endpoint,
    domain: u32,
    mode: Bench,
    sums: &mut Sums,
) -> Result<(), String> {
    {
        let mut guard = IOMMU.lock();
        let iommu = guard.as_mut().ok_or("no IOMMU")?;
        let mut space = match mode {
            Bench::Strict | Bench::Lazy => {
                DmaSpace::attach_strict(iommu, domain, ep.id, &ep.reserved)
            }
            Bench::Identity => iommu
                .attach(domain, ep.id)
                .and_then(|()| DmaSpace::identity_mapped(iommu, domain, ram, &ep.reserved)),
        }
        .map_err(|e| format!("set-up: {e}"))?;
        if mode == Bench::Lazy {
            let want = MAX_PENDING.load(Ordering::Relaxed) as usize;
            let max_pending = want.min(iommu.requestq_size() / 2).max(1);
            space
                .set_unmap_policy(UnmapPolicy::Lazy {
                    max_pending,
                    max_age_ns: LAZY_MAX_AGE_NS,
                    clock: &TIMER,
                })
                .map_err(|e| format!("lazy policy: {e}"))?;
        }
        *BENCH_DMA.lock() = Some(space);
    }
    let root = &mut pci.roots[ep.function.host_bridge];
    let transport = PciTransport::new::<IommuHal<BenchDma>, _>(root, ep.function.device_function)
        .map_err(|e| format!("PCI transport: {e:?}"))?;
    let mut blk =
        Blk::new(AccessPlatform::new(transport)).map_err(|e| format!("VirtIOBlk: {e}"))?;
    let counts = || {
        let n = IOMMU
            .lock()
            .as_ref()
            .map_or(0, |i| i.request_stats().notifications);
        let s = BENCH_DMA.lock();
        let (m, u) = s.as_ref().map_or((0, 0), |s| (s.maps, s.unmaps));
        let t = HAL_TICKS.load(Ordering::Relaxed);
        let q = REQ_TICKS.load(Ordering::Relaxed);
        (m, u, n, t, HAL_CALLS.load(Ordering::Relaxed), q)
    };
    let before = counts();
    let r = reads(&mut blk, sums);
    let after = counts();
    if let Err(e) = r {
        // The device may still own buffers: keep everything.
        core::mem::forget(blk);
        return Err(e);
    }
    sums.maps += after.0 - before.0;
    sums.unmaps += after.1 - before.1;
    sums.notifications += after.2 - before.2;
    sums.hal_us += timer::ticks_to_us(after.3.wrapping_sub(before.3));
    sums.hal_calls += after.4 - before.4;
    sums.req_us += timer::ticks_to_us(after.5.wrapping_sub(before.5));
    drop(blk);
    let mut space = BENCH_DMA.lock().take().ok_or("no DMA state")?;
    let mut guard = IOMMU.lock();
    let iommu = guard.as_mut().ok_or("no IOMMU")?;
    space.flush(iommu).map_err(|e| format!("flush: {e}"))?;
    sums.flushes += space.flush_stats().flushes;
    if space.failures != 0 || space.leaked != 0 || space.live_mappings() != 0 {
        return Err(format!(
            "{} failures, {} kept after a failed UNMAP, {} live mappings",
            space.failures,
            space.leaked,
            space.live_mappings()
        ));
    }
    let expect = match mode {
        Bench::Identity => DmaMode::IdentityMapped,
        _ => DmaMode::Strict,
    };
    if space.mode() != expect {
        return Err(format!("mode {:?}", space.mode()));
    }
    space
        .unmap_all(iommu)
        .map_err(|e| format!("unmap_all: {e}"))?;
    iommu
        .detach(space.domain(), ep.id)
        .map_err(|e| format!("DETACH: {e}"))
}

/// The sequential passes and the random reads.
fn reads(blk: &mut Blk, sums: &mut Sums) -> Result<(), String> {
    let sectors = blk.capacity();
    let bytes = sectors.saturating_mul(SECTOR_SIZE as u64);
    if bytes < SEQ as u64 {
        return Err(format!("disk of {bytes} bytes is too small"));
    }
    let mut buf = vec![0u8; SEQ].into_boxed_slice();
    let mut seq_sum = 0xcbf2_9ce4_8422_2325;
    let start = timer::now_ticks();
    for _ in 0..SEQ_PASSES {
        let mut sector = 0u64;
        while sector < sectors {
            let n = ((sectors - sector) as usize * SECTOR_SIZE).min(SEQ);
            buf = crate::blkio::io(blk, sector, buf, n, false)?;
            seq_sum = fnv(seq_sum, &buf[..n]);
            sums.seq_bytes += n as u64;
            sums.seq_ios += 1;
            sector += (n / SECTOR_SIZE) as u64;
        }
    }
    let seq_us = timer::ticks_to_us(timer::now_ticks().wrapping_sub(start));
    // Random 4 KiB-aligned offsets from a fixed xorshift sequence: the same in every mode.
    let blocks = bytes / RANDOM as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand_sum = 0xcbf2_9ce4_8422_2325;
    let mut small = vec![0u8; RANDOM].into_boxed_slice();
    let start = timer::now_ticks();
    for _ in 0..RANDOM_READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sector = (x % blocks) * (RANDOM / SECTOR_SIZE) as u64;
        small = crate::blkio::io(blk, sector, small, RANDOM, false)?;
        rand_sum = fnv(rand_sum, &small);
        sums.rand_ios += 1;
    }
    let rand_us = timer::ticks_to_us(timer::now_ticks().wrapping_sub(start));
    sums.seq_us += seq_us;
    sums.rand_us += rand_us;
    let best = |b: &mut u64, t: u64| {
        *b = if *b == 0 {
            t.max(1)
        } else {
            (*b).min(t.max(1))
        }
    };
    best(&mut sums.best_seq_us, seq_us);
    best(&mut sums.best_rand_us, rand_us);
    if let Some(r) = usize::try_from(sums.rounds).ok().filter(|&r| r < ROUNDS) {
        sums.round_seq_us[r] = seq_us.max(1);
        sums.round_rand_us[r] = rand_us.max(1);
    }
    sums.rounds += 1;
    // Equal across rounds too: keep the first round's, and fail on a difference.
    for (kept, now) in [(&mut sums.seq_sum, seq_sum), (&mut sums.rand_sum, rand_sum)] {
        if *kept == 0 {
            *kept = now;
        } else if *kept != now {
            return Err("data differs between rounds".into());
        }
    }
    Ok(())
}

/// The median over the rounds of identity's time over the mode's time (the mode's throughput
/// in percent of identity's, round by round: the modes of a round ran back to back, so a slow
/// phase of the host hits both sides of each ratio); the lower median for an even count.
fn median_ratio(mode_us: &[u64; ROUNDS], identity_us: &[u64; ROUNDS]) -> u64 {
    let mut r = [0u64; ROUNDS];
    for (out, (&m, &id)) in r.iter_mut().zip(mode_us.iter().zip(identity_us)) {
        *out = ratio_pct(id, m);
    }
    r.sort_unstable();
    r[(ROUNDS - 1) / 2]
}

/// MiB/s ×100 and IOPS of `s`'s fastest round.
fn rates(s: &Sums) -> (u64, u64) {
    let rounds = s.rounds.max(1);
    let (bytes, ios) = (s.seq_bytes / rounds, s.rand_ios / rounds);
    let mibps_x100 =
        (u128::from(bytes) * 100 * 1_000_000 / (u128::from(s.best_seq_us.max(1)) << 20)) as u64;
    let iops = (u128::from(ios) * 1_000_000 / u128::from(s.best_rand_us.max(1))) as u64;
    (mibps_x100, iops)
}

fn report(sums: &[Sums; 3]) {
    let ios = |s: &Sums| (s.seq_ios + s.rand_ios).max(1);
    println!(
        "# blk-bench: {ROUNDS} rounds x ({SEQ_PASSES} sequential passes of 64 KiB reads + {RANDOM_READS} random 4 KiB reads) per mode, rates of each mode's fastest round; lazy: max_pending {}, max_age {} ms",
        MAX_PENDING.load(Ordering::Relaxed),
        LAZY_MAX_AGE_NS / 1_000_000
    );
    println!("# | mode | seq 64 KiB MiB/s | rand 4 KiB IOPS | MAP/IO | UNMAP/IO | IOMMU notifications/IO | flushes |");
    for (s, mode) in sums.iter().zip(Bench::ALL) {
        let (mibps, iops) = rates(s);
        let per = |x: u64| x * 100 / ios(s);
        println!(
            "# | {} | {}.{:02} | {} | {}.{:02} | {}.{:02} | {}.{:02} | {} |",
            mode.name(),
            mibps / 100,
            mibps % 100,
            iops,
            per(s.maps) / 100,
            per(s.maps) % 100,
            per(s.unmaps) / 100,
            per(s.unmaps) % 100,
            per(s.notifications) / 100,
            per(s.notifications) % 100,
            s.flushes
        );
        println!(
            "blk-bench-result: mode={} seq_mibps_x100={mibps} rand_iops={iops} seq_ios={} rand_ios={} seq_us={} rand_us={} best_seq_us={} best_rand_us={} maps={} unmaps={} iommu_notifications={} flushes={}",
            mode.name(),
            s.seq_ios,
            s.rand_ios,
            s.seq_us,
            s.rand_us,
            s.best_seq_us,
            s.best_rand_us,
            s.maps,
            s.unmaps,
            s.notifications,
            s.flushes
        );
    }
    let (id_seq, id_rand) = rates(&sums[2]);
    for (i, goal) in [(0usize, 90u64), (1, 98)] {
        let (seq, rand) = rates(&sums[i]);
        let (ps, pr) = (ratio_pct(seq, id_seq), ratio_pct(rand, id_rand));
        let (ms, mr) = (
            median_ratio(&sums[i].round_seq_us, &sums[2].round_seq_us),
            median_ratio(&sums[i].round_rand_us, &sums[2].round_rand_us),
        );
        let verdict = if ms >= goal && mr >= goal {
            "met"
        } else {
            "missed"
        };
        println!(
            "# blk-bench: {}/identity: median of the {ROUNDS} per-round ratios: sequential {ms} %, random {mr} % (goal >= {goal} %): {verdict}; fastest rounds: sequential {ps} %, random {pr} %",
            Bench::ALL[i].name()
        );
        println!(
            "blk-bench-ratio: mode={} median_seq_pct={ms} median_rand_pct={mr} fastest_seq_pct={ps} fastest_rand_pct={pr} goal_pct={goal} verdict={verdict}",
            Bench::ALL[i].name()
        );
    }
    for (s, mode) in sums.iter().zip(Bench::ALL) {
        let total = (s.seq_us + s.rand_us).max(1);
        println!(
            "# blk-bench: {}: {} us of {total} us ({} %) inside the Hal adapter's state ({} entries, {} ns each), of which {} us in {} IOMMU requests ({} ns each, {} ns per notification)",
            mode.name(),
            s.hal_us,
            s.hal_us * 100 / total,
            s.hal_calls,
            s.hal_us * 1000 / s.hal_calls.max(1),
            s.req_us,
            s.maps + s.unmaps,
            s.req_us * 1000 / (s.maps + s.unmaps).max(1),
            s.req_us * 1000 / s.notifications.max(1),
        );
    }
    // Where the time goes: the extra time per IOMMU request over identity.
    for i in 0..2 {
        let s = &sums[i];
        let id = &sums[2];
        let extra_us = (s.seq_us + s.rand_us).saturating_sub(id.seq_us + id.rand_us);
        let reqs = (s.maps + s.unmaps).max(1);
        println!(
            "# blk-bench: {}: {} us more than identity over {} MAP/UNMAP requests and {} IOMMU notifications: {} ns per request, {} ns per notification",
            Bench::ALL[i].name(),
            extra_us,
            s.maps + s.unmaps,
            s.notifications,
            extra_us * 1000 / reqs,
            extra_us * 1000 / s.notifications.max(1)
        );
    }
}

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

/// Map+unmap pairs per profile run.
const PAIRS: u64 = 3000;
/// Profile runs per variant, interleaved; the fastest counts (the host is shared).
const PROFILE_RUNS: usize = 7;

/// `PAIRS` alloc + free pairs of the IOVA allocator alone (sizes of a virtio-blk request's
/// buffers); nanoseconds per pair.
fn iova_pairs() -> Option<u64> {
    let granule = 0x1000;
    let mut iova = virtio_iommu_driver::dma::IovaAllocator::new(0, (1 << 48) - 1, granule).ok()?;
    let sizes = [0x1000u64, 0x1_1000, 0x1000];
    let start = timer::now_ticks();
    for _ in 0..PAIRS / 3 {
        let mut at = [0u64; 3];
        for (slot, len) in at.iter_mut().zip(sizes) {
            *slot = iova.alloc(len).ok()?;
        }
        for (a, len) in at.into_iter().zip(sizes) {
            iova.free(a, len).ok()?;
        }
    }
    Some(timer::ticks_to_us(timer::now_ticks().wrapping_sub(start)) * 1000 / PAIRS)
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

/// `PAIRS` `map_buffer` + `unmap_buffer` pairs of a space ([`Profile`]) on a mapper that
/// sends nothing, with the 3 buffers of a virtio-blk request (16 bytes, 64 KiB, 1 byte);
/// nanoseconds per pair.
fn space_pairs(profile: Profile) -> Option<u64> {
    let granule = 0x1000;
    let mut m = Accept(granule);
    let (mut space, clock, places) = match profile {
        Profile::Identity => {
            let ram = [PhysRange::from_start_size(0x4000_0000, 0x1000_0000)?];
            let space = DmaSpace::identity_mapped(&mut m, 1, &ram, &[]).ok()?;
            (space, None, 1)
        }
        Profile::Strict(clock) => {
            let iova =
                virtio_iommu_driver::dma::IovaAllocator::new(0, (1 << 48) - 1, granule).ok()?;
            (DmaSpace::new(1, iova).ok()?, clock, 64)
        }
        Profile::Recurring(clock) => {
            let iova =
                virtio_iommu_driver::dma::IovaAllocator::new(0, (1 << 48) - 1, granule).ok()?;
            (DmaSpace::new(1, iova).ok()?, Some(clock), 1)
        }
    };
    if let Some(clock) = clock {
        let policy = UnmapPolicy::Lazy {
            max_pending: MAX_PENDING.load(Ordering::Relaxed) as usize,
            max_age_ns: LAZY_MAX_AGE_NS,
            clock,
        };
        space.set_unmap_policy(policy).ok()?;
    }
    let rw = MapFlags::READ | MapFlags::WRITE;
    let start = timer::now_ticks();
    for i in 0..PAIRS / 3 {
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
    Some(timer::ticks_to_us(timer::now_ticks().wrapping_sub(start)) * 1000 / PAIRS)
}

/// The cost of the bookkeeping alone, without requests, locks or the `Hal`: the IOVA
/// allocator, and a strict space's `map_buffer` + `unmap_buffer` (IOVA allocator and
/// live-mapping tree) under the strict and the lazy policy (the latter also with a clock that
/// reads no counter), each the fastest of [`PROFILE_RUNS`] interleaved runs.
fn bookkeeping_profile() {
    let variants: [(&str, Option<Profile>); 7] = [
        ("IovaAllocator alloc + free", None),
        ("strict map_buffer + unmap_buffer", Some(Profile::Strict(None))),
        (
            "lazy map_buffer + unmap_buffer",
            Some(Profile::Strict(Some(&TIMER))),
        ),
        (
            "lazy map_buffer + unmap_buffer, clock not read",
            Some(Profile::Strict(Some(&FROZEN))),
        ),
        (
            "lazy map_buffer + unmap_buffer, recurring buffers (revived)",
            Some(Profile::Recurring(&TIMER)),
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
                Some(p) => space_pairs(*p),
            };
            *b = (*b).min(ns.unwrap_or(u64::MAX));
        }
    }
    for (b, (name, _)) in best.iter().zip(&variants) {
        println!("# blk-bench: bookkeeping alone, no requests: {name}: {b} ns per pair (fastest of {PROFILE_RUNS})");
    }
}
