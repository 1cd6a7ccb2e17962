//! `blk-bench`: virtio-blk read throughput behind the IOMMU, through virtio-drivers'
//! unmodified `VirtIOBlk` over the driver crate's `Hal` adapter, in three modes in one run:
//!
//! - **strict**: one MAP per buffer at `share`, one synchronous UNMAP at `unshare`;
//! - **lazy**: strict MAPs, UNMAPs deferred into the flush queue ([`UnmapPolicy::Lazy`],
//!   [`LAZY_MAX_PENDING`] ranges or [`LAZY_MAX_AGE_NS`]), sent as one batch; its clock is a
//!   tick counter ([`crate::tick`], every [`TICK_US`] µs, IRQs unmasked during the bench),
//!   or the generic timer's counter with `blk-bench-clock=counter`;
//! - **identity**: identity mappings of all RAM made once (identity-mapped mode): no request
//!   per buffer — the baseline.
//!
//! Three virtio-blk devices on the same image (the runner's `--blk-devices 3`), each an
//! endpoint in its own domain, run one mode each, and the modes interleave in small batches
//! ([`SEQ_BATCH`] sequential 64 KiB reads, [`RAND_BATCH`] random 4 KiB reads: about a
//! millisecond each), so a slow phase of the shared host hits every mode alike. The modes
//! rotate over the devices each round, and the order of the modes in a batch goes through all
//! six permutations ([`ORDERS`]), so no mode always follows the same one. Per round each
//! mode reads the disk (at most its first [`MAX_DISK`] bytes) once sequentially and [`RANDOM_READS`] times at random 4 KiB-aligned
//! offsets (the same offsets in every mode and round), one request in flight (virtio-drivers'
//! `VirtIOBlk` as `blkio::io` drives it). Only the reads are timed (the checksum of the data
//! is not).
//!
//! Per mode it prints MiB/s, IOPS, MAP/UNMAP requests and IOMMU notifications per I/O, one
//! `blk-bench-result:` line per mode; then strict/identity and lazy/identity — the median of
//! the per-batch ratios and the ratio of the total times, judged against the goal
//! (strict ≥ 90 %, lazy ≥ 98 %: met when both meet it) — one `blk-bench-ratio:` line each; then where the time goes
//! (inside the `Hal` adapter, inside IOMMU requests) and the bookkeeping profile
//! ([`super::bookkeeping`]). The data read must be the same in every mode (a checksum). TAP
//! cases: set-up, each mode's reads, data equal; the goal itself is reported, not a case (see
//! BENCHMARKS.md for the measured outcome). `blk-bench-calibrate=<mode>` on the command line
//! runs every device in one mode under the three roles: an A/A run whose ratios show how far
//! the bench itself is from 100 %. `blk-bench-rounds=N` (a multiple of 3, default [`ROUNDS`])
//! runs more rounds: one run's error shrinks with the square root of its length.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Devices under test: one per mode.
const SLOTS: usize = 3;

/// DMA state of each virtio-blk device under test.
static SPACES: [Mutex<Option<DmaSpace>>; SLOTS] = [const { Mutex::new(None) }; SLOTS];

/// Per device: generic-timer ticks spent inside the `Hal` adapter's state (MAP/UNMAP requests
/// and the space's bookkeeping), the number of entries, and of those ticks the ones in IOMMU
/// requests (MAP, UNMAP, batches): the rest is the adapter's own bookkeeping (IOVA allocator,
/// live mappings, locks).
static HAL_TICKS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static HAL_CALLS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static REQ_TICKS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

/// An [`IommuMapper`] that times the requests of the one it wraps into `REQ_TICKS[slot]`.
struct Timed<'a> {
    inner: &'a mut dyn IommuMapper,
    slot: usize,
}

impl Timed<'_> {
    fn time<R>(&mut self, f: impl FnOnce(&mut dyn IommuMapper) -> R) -> R {
        let start = timer::now_ticks();
        let r = f(&mut *self.inner);
        REQ_TICKS[self.slot].fetch_add(timer::now_ticks().wrapping_sub(start), Ordering::Relaxed);
        r
    }
}

impl IommuMapper for Timed<'_> {
    fn granule(&self) -> u64 {
        self.inner.granule()
    }
    fn input_range(&self) -> (u64, u64) {
        self.inner.input_range()
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

/// `IommuHal<BenchDma<S>>`: the buffers of device `S`, through [`IOMMU`] and `SPACES[S]`
/// ([`with_locked`], as `dma_context!` writes it), timed.
pub struct BenchDma<const S: usize>;

impl<const S: usize> DmaContext for BenchDma<S> {
    type Inner = IdentityHal;
    fn with<R>(
        f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
    ) -> Result<R, IommuError> {
        let start = timer::now_ticks();
        let r = with_locked(&IOMMU, &SPACES[S], |iommu, space| {
            f(
                &mut Timed {
                    inner: iommu,
                    slot: S,
                },
                space,
            )
        });
        HAL_TICKS[S].fetch_add(timer::now_ticks().wrapping_sub(start), Ordering::Relaxed);
        HAL_CALLS[S].fetch_add(1, Ordering::Relaxed);
        r
    }
}

type Blk<const S: usize> = VirtIOBlk<IommuHal<BenchDma<S>>, AccessPlatform<PciTransport>>;

/// A device under test, whatever its slot.
trait Reader {
    /// Capacity in sectors.
    fn capacity(&self) -> u64;
    /// One read of `len` bytes at `sector` into `buf` ([`crate::blkio::io`]).
    fn read(&mut self, sector: u64, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, String>;
}

impl<const S: usize> Reader for Blk<S> {
    fn capacity(&self) -> u64 {
        VirtIOBlk::capacity(self)
    }
    fn read(&mut self, sector: u64, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, String> {
        crate::blkio::io(self, sector, buf, len, false)
    }
}

/// Size bound of the lazy flush queue (ranges), unless `lazy-max-pending=N` is on the kernel
/// command line; capped at half the request queue so that a flush is one notification.
pub const LAZY_MAX_PENDING: usize = 32;

/// `blk-bench-calibrate=<mode>` on the kernel command line: every device runs that mode while
/// the report keeps the three roles (strict, lazy, identity), so the ratios show the bench's
/// own bias and noise (an A/A run); 0 = off, else 1 + the mode's index.
static CALIBRATE: AtomicU64 = AtomicU64::new(0);

/// The mode device role `role` really runs (see [`CALIBRATE`]).
fn effective(role: Bench) -> Bench {
    match CALIBRATE.load(Ordering::Relaxed) {
        0 => role,
        n => Bench::ALL[(n as usize - 1) % SLOTS],
    }
}

/// The lazy devices' clock: the tick counter ([`crate::tick`], a timer interrupt every
/// [`TICK_US`] µs, as a kernel's `jiffies`), unless `blk-bench-clock=counter` on the kernel
/// command line selects the generic timer's counter, read at every check ([`GenericTimer`]).
static COUNTER_CLOCK: AtomicBool = AtomicBool::new(false);
/// Period of the tick clock asked for: 1 ms (the 10 ms time bound is then good to 1 ms).
pub const TICK_US: u64 = 1000;

/// The lazy flush queue's clock in use (see [`COUNTER_CLOCK`]).
fn lazy_clock() -> &'static dyn Clock {
    match COUNTER_CLOCK.load(Ordering::Relaxed) {
        true => &TIMER,
        false => &crate::tick::TICK_CLOCK,
    }
}

fn clock_name() -> &'static str {
    match COUNTER_CLOCK.load(Ordering::Relaxed) {
        true => "counter",
        false => "tick",
    }
}

/// The lazy size bound in use (see [`LAZY_MAX_PENDING`]; capped in `prepare`).
static MAX_PENDING: AtomicU64 = AtomicU64::new(LAZY_MAX_PENDING as u64);
/// Time bound of the lazy flush queue: 10 ms.
pub const LAZY_MAX_AGE_NS: u64 = 10_000_000;
/// Sequential request size in bytes.
const SEQ: usize = 64 * 1024;
/// Random request size in bytes.
const RANDOM: usize = 4096;
/// Bytes of the disk the bench reads at most (the sequential pass; the random offsets lie in
/// them too), whatever capacity the devices report: 64 MiB.
const MAX_DISK: u64 = 64 << 20;
/// Random reads per mode and round.
const RANDOM_READS: usize = 256;
/// Sequential reads per mode and batch.
const SEQ_BATCH: usize = 4;
/// Random reads per mode and batch.
const RAND_BATCH: usize = 16;
/// Rounds, unless `blk-bench-rounds=N` is on the kernel command line (a multiple of [`SLOTS`]
/// up to [`MAX_ROUNDS`]: more rounds, a longer run, a steadier result); the modes rotate over
/// the devices each round, so every mode runs on every device equally often.
pub const ROUNDS: usize = 6;
/// The largest `blk-bench-rounds` accepted: about 100 s of reads on a host where 6 rounds take
/// 1 s (TCG; raise `VIOMMU_TIMEOUT_SECS`, 300 s by default, on slower ones).
pub const MAX_ROUNDS: usize = 600;
/// The rounds in use (see [`ROUNDS`]).
static ROUNDS_IN_USE: AtomicU64 = AtomicU64::new(ROUNDS as u64);
/// The orders of the roles (indices into [`Bench::ALL`]) in a batch, used in turn: all six.
const ORDERS: [[usize; SLOTS]; 6] = [
    [0, 1, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
    [1, 0, 2],
    [0, 2, 1],
];

/// The generic timer as the flush queue's clock. It is read on `unshare` while UNMAPs are
/// pending, so it avoids the 128-bit division of `now_ns` (a library call, about a
/// microsecond under TCG) when the counter period is a whole number of nanoseconds (16 ns at
/// QEMU's 62.5 MHz).
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
    fn index(self) -> usize {
        self as usize
    }
    /// The mode of device `slot` in round `round`.
    fn of(slot: usize, round: usize) -> Bench {
        Bench::ALL[(slot + round) % SLOTS]
    }
}

/// What one mode measured, summed over the rounds.
#[derive(Clone, Debug, Default)]
struct Sums {
    seq_bytes: u64,
    seq_ios: u64,
    /// Ticks of the sequential and random reads alone.
    seq_ticks: u64,
    rand_ios: u64,
    rand_ticks: u64,
    /// Each batch's ticks, in batch order (the batches of all modes line up).
    seq_batches: Vec<u64>,
    rand_batches: Vec<u64>,
    maps: u64,
    unmaps: u64,
    notifications: u64,
    flushes: u64,
    /// Ticks inside the `Hal` adapter's state during the reads, its entries, and of those
    /// ticks the ones in IOMMU requests.
    hal_ticks: u64,
    hal_calls: u64,
    req_ticks: u64,
    /// Checksums of the sequential and random data of the first round (equal in every mode
    /// and round).
    seq_sum: u64,
    rand_sum: u64,
}

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn ratio_pct(a: u64, b: u64) -> u64 {
    a.saturating_mul(100).checked_div(b).unwrap_or(0)
}

/// Reads the bench's options from the kernel command line into the statics above
/// (`lazy-max-pending`, `blk-bench-calibrate`, `blk-bench-rounds`, `blk-bench-clock`).
///
/// # Errors
///
/// The TAP case name and the reason for the first value it does not take (then no bench
/// runs: a default in its place would measure something else than asked).
fn options(dtb: &[u8]) -> Result<(), (&'static str, String)> {
    if let Some(v) = super::bootarg(dtb, "lazy-max-pending") {
        match v.parse::<u64>() {
            Ok(n) if n > 0 => MAX_PENDING.store(n, Ordering::Relaxed),
            _ => {
                return Err((
                    "blk-bench: lazy-max-pending is a positive number",
                    format!("`{v}`: not a number of ranges above 0"),
                ))
            }
        }
    }
    if let Some(v) = super::bootarg(dtb, "blk-bench-calibrate") {
        match Bench::ALL.iter().position(|m| m.name() == v) {
            Some(i) => CALIBRATE.store(i as u64 + 1, Ordering::Relaxed),
            None => {
                return Err((
                    "blk-bench: blk-bench-calibrate names a mode",
                    format!("`{v}`: not strict, lazy or identity"),
                ))
            }
        }
    }
    if let Some(v) = super::bootarg(dtb, "blk-bench-rounds") {
        match v.parse::<usize>() {
            Ok(r) if r > 0 && r % SLOTS == 0 && r <= MAX_ROUNDS => {
                ROUNDS_IN_USE.store(r as u64, Ordering::Relaxed)
            }
            _ => {
                return Err((
                    "blk-bench: blk-bench-rounds is a multiple of 3 up to 600",
                    format!("`{v}`: not a multiple of {SLOTS} in 3..={MAX_ROUNDS}"),
                ))
            }
        }
    }
    match super::bootarg(dtb, "blk-bench-clock") {
        None | Some("tick") => Ok(()),
        Some("counter") => {
            COUNTER_CLOCK.store(true, Ordering::Relaxed);
            Ok(())
        }
        Some(v) => Err((
            "blk-bench: blk-bench-clock names a clock",
            format!("`{v}`: not tick or counter"),
        )),
    }
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
    if let Err((name, e)) = options(dtb) {
        case(name, Err(e));
        println!("1..{n}");
        return (n - failed, failed);
    }
    let rounds = ROUNDS_IN_USE.load(Ordering::Relaxed) as usize;
    let prepared = prepare(dtb, pci).and_then(|p| match COUNTER_CLOCK.load(Ordering::Relaxed) {
        true => Ok(p),
        false => crate::tick::start(dtb, TICK_US)
            .map(|_| p)
            .map_err(|e| format!("tick clock: {e}")),
    });
    let (ram, eps, first_domain, last_domain) = match prepared {
        Ok(p) => p,
        Err(e) => {
            case("blk-bench: virtio-iommu and 3 virtio-blk endpoints", Err(e));
            println!("1..{n}");
            return (n - failed, failed);
        }
    };
    case("blk-bench: virtio-iommu and 3 virtio-blk endpoints", Ok(()));
    let mut sums: [Sums; 3] = Default::default();
    let mut errors: [Option<String>; 3] = [None, None, None];
    let mut batches = 0;
    let mut domains = Domains {
        next: Some(first_domain),
        last: last_domain,
    };
    for round in 0..rounds {
        let r = run_round(
            pci,
            &ram,
            &eps,
            &mut domains,
            round,
            &mut batches,
            &mut sums,
        );
        if let Err((mode, e)) = r {
            for m in Bench::ALL {
                errors[m.index()] = Some(match m == mode {
                    true => format!("round {round}: {e}"),
                    false => format!("stopped in round {round}: {} failed", mode.name()),
                });
            }
            break;
        }
    }
    for mode in Bench::ALL {
        case(
            &format!(
                "blk-bench {}: sequential 64 KiB and random 4 KiB reads",
                mode.name()
            ),
            errors[mode.index()].clone().map_or(Ok(()), Err),
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
        super::bookkeeping::run(lazy_clock(), MAX_PENDING.load(Ordering::Relaxed) as usize);
    }
    if !COUNTER_CLOCK.load(Ordering::Relaxed) {
        let ticks = crate::tick::stop();
        let ns = crate::tick::period_ns();
        println!("# blk-bench: tick clock: {ticks} ticks of {ns} ns");
    }
    println!("1..{n}");
    (n - failed, failed)
}

type Prepared = (Vec<PhysRange>, Vec<Endpoint>, u32, u32);

/// The domain IDs still free for the rounds' attachments: `next..=last` (`None`: none left,
/// also after `u32::MAX`).
struct Domains {
    next: Option<u32>,
    last: u32,
}

fn prepare(dtb: &'static [u8], pci: &mut PciBus) -> Result<Prepared, String> {
    let (_, endpoints) = setup(pci)?;
    let eps: Vec<Endpoint> = endpoints
        .into_iter()
        .filter(|e| {
            e.function.vendor_id == 0x1af4 && [0x1042, 0x1001].contains(&e.function.device_id)
        })
        .take(SLOTS)
        .collect();
    if eps.len() < SLOTS {
        return Err(format!(
            "{} virtio-blk behind the IOMMU, 3 needed (one per mode: the runner's --blk-devices 3, as `cargo qemu-blk-bench` passes)",
            eps.len()
        ));
    }
    let fdt = fdt::Fdt::new(dtb).map_err(|_| "devicetree")?;
    let ram: Vec<PhysRange> = crate::heap::ram_regions(&fdt)
        .filter_map(|(start, size)| PhysRange::from_start_size(start, size))
        .collect();
    let guard = IOMMU.lock();
    let iommu = guard.as_ref().ok_or("no IOMMU")?;
    let c = *iommu.config();
    // The size bound in use, capped at half the request queue (one notification per flush):
    // what the lazy devices, the report and the profile all use.
    let want = MAX_PENDING.load(Ordering::Relaxed) as usize;
    let max_pending = want.min(iommu.requestq_size() / 2).max(1);
    MAX_PENDING.store(max_pending as u64, Ordering::Relaxed);
    let ids: Vec<String> = eps.iter().map(|e| format!("{:#x}", e.id)).collect();
    println!(
        "# blk-bench: endpoints {}, granule {:#x}, requestq {} descriptors, features {:?}",
        ids.join(" "),
        c.granule,
        iommu.requestq_size(),
        iommu.features()
    );
    Ok((ram, eps, c.domain_range.0, c.domain_range.1))
}

/// Attaches device `slot`'s endpoint to a fresh `domain` in role `mode` (its [`effective`]
/// mode) and installs its space.
fn install(
    slot: usize,
    mode: Bench,
    domain: u32,
    ep: &Endpoint,
    ram: &[PhysRange],
) -> Result<(), String> {
    let mode = effective(mode);
    let mut guard = IOMMU.lock();
    let iommu = guard.as_mut().ok_or("no IOMMU")?;
    let mut space = match mode {
        Bench::Strict | Bench::Lazy => DmaSpace::attach_strict(iommu, domain, ep.id, &ep.reserved),
        Bench::Identity => iommu
            .attach(domain, ep.id)
            .and_then(|()| DmaSpace::identity_mapped(iommu, domain, ram, &ep.reserved)),
    }
    .map_err(|e| format!("set-up: {e}"))?;
    if mode == Bench::Lazy {
        let max_pending = MAX_PENDING.load(Ordering::Relaxed) as usize;
        space
            .set_unmap_policy(UnmapPolicy::Lazy {
                max_pending,
                max_age_ns: LAZY_MAX_AGE_NS,
                clock: lazy_clock(),
            })
            .map_err(|e| format!("lazy policy: {e}"))?;
    }
    *SPACES[slot].lock() = Some(space);
    Ok(())
}

fn open_slot<const S: usize>(pci: &mut PciBus, ep: &Endpoint) -> Result<Box<dyn Reader>, String> {
    let root = &mut pci.roots[ep.function.host_bridge];
    let transport =
        PciTransport::new::<IommuHal<BenchDma<S>>, _>(root, ep.function.device_function)
            .map_err(|e| format!("PCI transport: {e:?}"))?;
    let blk: Blk<S> =
        VirtIOBlk::new(AccessPlatform::new(transport)).map_err(|e| format!("VirtIOBlk: {e}"))?;
    Ok(Box::new(blk))
}

/// Creates device `slot`'s `VirtIOBlk` over its installed space.
fn open(slot: usize, pci: &mut PciBus, ep: &Endpoint) -> Result<Box<dyn Reader>, String> {
    match slot {
        0 => open_slot::<0>(pci, ep),
        1 => open_slot::<1>(pci, ep),
        _ => open_slot::<2>(pci, ep),
    }
}

/// Flushes, checks and removes device `slot`'s space (expected in role `mode`'s
/// [`effective`] mode), then detaches its
/// endpoint; returns the flushes the space made before the teardown (during the reads).
fn teardown(slot: usize, mode: Bench, ep: &Endpoint) -> Result<u64, String> {
    let mut space = SPACES[slot].lock().take().ok_or("no DMA state")?;
    // The reads' flushes, counted like the reads' requests (not the teardown's one below).
    let flushes = space.flush_stats().flushes;
    let mut guard = IOMMU.lock();
    let iommu = guard.as_mut().ok_or("no IOMMU")?;
    space.flush(iommu).map_err(|e| format!("flush: {e}"))?;
    if space.failures != 0 || space.leaked != 0 || space.live_mappings() != 0 {
        return Err(format!(
            "{} failures, {} kept after a failed UNMAP, {} live mappings",
            space.failures,
            space.leaked,
            space.live_mappings()
        ));
    }
    let expect = match effective(mode) {
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
        .map_err(|e| format!("DETACH: {e}"))?;
    Ok(flushes)
}

/// Device `slot`'s counters: MAPs, UNMAPs, adapter ticks, adapter entries, request ticks.
fn counters(slot: usize) -> [u64; 5] {
    let s = SPACES[slot].lock();
    let (m, u) = s.as_ref().map_or((0, 0), |s| (s.maps, s.unmaps));
    [
        m,
        u,
        HAL_TICKS[slot].load(Ordering::Relaxed),
        HAL_CALLS[slot].load(Ordering::Relaxed),
        REQ_TICKS[slot].load(Ordering::Relaxed),
    ]
}

fn notifications() -> u64 {
    IOMMU
        .lock()
        .as_ref()
        .map_or(0, |i| i.request_stats().notifications)
}

/// One round: every device in its mode of the round ([`Bench::of`]), created, read in
/// interleaved batches, dropped, checked and torn down. An error names the mode it hit.
fn run_round(
    pci: &mut PciBus,
    ram: &[PhysRange],
    eps: &[Endpoint],
    domains: &mut Domains,
    round: usize,
    batches: &mut usize,
    sums: &mut [Sums; 3],
) -> Result<(), (Bench, String)> {
    let modes: [Bench; SLOTS] = core::array::from_fn(|slot| Bench::of(slot, round));
    for (slot, (&mode, ep)) in modes.iter().zip(eps).enumerate() {
        let Some(domain) = domains.next.filter(|&d| d <= domains.last) else {
            return Err((mode, "domain_range exhausted".into()));
        };
        install(slot, mode, domain, ep, ram).map_err(|e| (mode, e))?;
        domains.next = domain.checked_add(1);
    }
    let mut devs: Vec<Box<dyn Reader>> = Vec::with_capacity(SLOTS);
    for (slot, (&mode, ep)) in modes.iter().zip(eps).enumerate() {
        devs.push(open(slot, pci, ep).map_err(|e| (mode, e))?);
    }
    // Each round starts one further through the orders, whatever the number of batches in a
    // round (with the 8 MiB disk 48, a multiple of 6, so that every round would otherwise run
    // the same sequence of orders).
    *batches += 1;
    let before: [[u64; 5]; SLOTS] = core::array::from_fn(counters);
    if let Err(e) = reads(&mut devs, &modes, batches, sums) {
        // The devices may still own buffers: keep everything.
        core::mem::forget(devs);
        return Err(e);
    }
    for (slot, &mode) in modes.iter().enumerate() {
        let after = counters(slot);
        let s = &mut sums[mode.index()];
        let d = |k: usize| after[k].wrapping_sub(before[slot][k]);
        s.maps += d(0);
        s.unmaps += d(1);
        s.hal_ticks += d(2);
        s.hal_calls += d(3);
        s.req_ticks += d(4);
    }
    drop(devs);
    for (slot, (&mode, ep)) in modes.iter().zip(eps).enumerate() {
        sums[mode.index()].flushes += teardown(slot, mode, ep).map_err(|e| (mode, e))?;
    }
    Ok(())
}

/// The reads of one round: the disk sequentially in batches of [`SEQ_BATCH`] 64 KiB reads,
/// then [`RANDOM_READS`] random 4 KiB reads in batches of [`RAND_BATCH`], each batch read by
/// every device in turn (in the next of [`ORDERS`]; `batches` counts the batches of the whole
/// run), only the reads timed.
fn reads(
    devs: &mut [Box<dyn Reader>],
    modes: &[Bench; SLOTS],
    batches: &mut usize,
    sums: &mut [Sums; 3],
) -> Result<(), (Bench, String)> {
    let capacity = devs[0].capacity();
    if let Some(i) = devs.iter().position(|d| d.capacity() != capacity) {
        return Err((modes[i], "the devices' capacities differ".into()));
    }
    // The device's word for its size bounds nothing: read at most the first MAX_DISK bytes.
    let sectors = capacity.min(MAX_DISK / SECTOR_SIZE as u64);
    let bytes = sectors * SECTOR_SIZE as u64;
    if bytes < SEQ as u64 {
        return Err((modes[0], format!("disk of {bytes} bytes is too small")));
    }
    let mut bufs: Vec<Box<[u8]>> = (0..SLOTS)
        .map(|_| vec![0u8; SEQ].into_boxed_slice())
        .collect();
    let mut seq_sum = [FNV_START; SLOTS];
    let mut rand_sum = [FNV_START; SLOTS];
    // The device of each role, and the order of the roles in a batch: every permutation in
    // turn, so each role runs first, second and last, and after each other role, equally often
    // (a fixed cyclic order made lazy always follow strict, whose requests leave the host's
    // caches colder: an A/A run showed the follower about 3 % slower).
    let slot_of: [usize; SLOTS] =
        core::array::from_fn(|role| modes.iter().position(|m| m.index() == role).unwrap_or(role));
    let mut order = || {
        let o = ORDERS[*batches % ORDERS.len()].map(|role| slot_of[role]);
        *batches += 1;
        o
    };
    let mut first = 0u64;
    while first < sectors {
        let mut next = first;
        for slot in order() {
            let mode = modes[slot];
            let n0 = notifications();
            let (mut sector, mut ticks) = (first, 0u64);
            for _ in 0..SEQ_BATCH {
                if sector >= sectors {
                    break;
                }
                let n = (sectors - sector).min((SEQ / SECTOR_SIZE) as u64) as usize * SECTOR_SIZE;
                let buf = core::mem::take(&mut bufs[slot]);
                let t0 = timer::now_ticks();
                bufs[slot] = devs[slot].read(sector, buf, n).map_err(|e| (mode, e))?;
                ticks += timer::now_ticks().wrapping_sub(t0);
                seq_sum[slot] = fnv(seq_sum[slot], &bufs[slot][..n]);
                let s = &mut sums[mode.index()];
                s.seq_bytes += n as u64;
                s.seq_ios += 1;
                sector += (n / SECTOR_SIZE) as u64;
            }
            let s = &mut sums[mode.index()];
            s.seq_ticks += ticks;
            s.seq_batches.push(ticks);
            s.notifications += notifications().wrapping_sub(n0);
            next = sector;
        }
        first = next;
    }
    // Random 4 KiB-aligned offsets from a fixed xorshift sequence: the same in every mode and
    // round.
    let blocks = bytes / RANDOM as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in (0..RANDOM_READS).step_by(RAND_BATCH) {
        let offsets: [u64; RAND_BATCH] = core::array::from_fn(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * (RANDOM / SECTOR_SIZE) as u64
        });
        for slot in order() {
            let mode = modes[slot];
            let n0 = notifications();
            let mut ticks = 0u64;
            for &sector in &offsets {
                let buf = core::mem::take(&mut bufs[slot]);
                let t0 = timer::now_ticks();
                bufs[slot] = devs[slot]
                    .read(sector, buf, RANDOM)
                    .map_err(|e| (mode, e))?;
                ticks += timer::now_ticks().wrapping_sub(t0);
                rand_sum[slot] = fnv(rand_sum[slot], &bufs[slot][..RANDOM]);
            }
            let s = &mut sums[mode.index()];
            s.rand_ios += RAND_BATCH as u64;
            s.rand_ticks += ticks;
            s.rand_batches.push(ticks);
            s.notifications += notifications().wrapping_sub(n0);
        }
    }
    // Equal across rounds too: keep the first round's, and fail on a difference.
    for (slot, &mode) in modes.iter().enumerate() {
        let s = &mut sums[mode.index()];
        for (kept, now) in [
            (&mut s.seq_sum, seq_sum[slot]),
            (&mut s.rand_sum, rand_sum[slot]),
        ] {
            if *kept == 0 {
                *kept = now;
            } else if *kept != now {
                return Err((mode, "data differs between rounds".into()));
            }
        }
    }
    Ok(())
}

/// The median over the batches of identity's ticks over the mode's (the mode's throughput in
/// percent of identity's, batch by batch); the lower median for an even count.
fn median_ratio(mode: &[u64], identity: &[u64]) -> u64 {
    let mut r: Vec<u64> = mode
        .iter()
        .zip(identity)
        .map(|(&m, &id)| ratio_pct(id, m))
        .collect();
    r.sort_unstable();
    r.get(r.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

/// MiB/s ×100 and IOPS of `s` over all rounds.
fn rates(s: &Sums) -> (u64, u64) {
    let hz = u128::from(timer::ticks_per_second());
    let mibps_x100 =
        (u128::from(s.seq_bytes) * 100 * hz / (u128::from(s.seq_ticks.max(1)) << 20)) as u64;
    let iops = (u128::from(s.rand_ios) * hz / u128::from(s.rand_ticks.max(1))) as u64;
    (mibps_x100, iops)
}

fn report(sums: &[Sums; 3]) {
    let ios = |s: &Sums| (s.seq_ios + s.rand_ios).max(1);
    let us = timer::ticks_to_us;
    println!(
        "# blk-bench: 3 virtio-blk devices, one per mode (rotated each round), {} rounds x (1 sequential pass of 64 KiB reads + {RANDOM_READS} random 4 KiB reads) per mode, interleaved in batches of {SEQ_BATCH} / {RAND_BATCH} reads, the reads alone timed; lazy: max_pending {}, max_age {} ms, clock {}",
        ROUNDS_IN_USE.load(Ordering::Relaxed),
        MAX_PENDING.load(Ordering::Relaxed),
        LAZY_MAX_AGE_NS / 1_000_000,
        match COUNTER_CLOCK.load(Ordering::Relaxed) {
            true => String::from("the generic timer's counter (read at every check)"),
            false => format!(
                "a tick counter (physical timer interrupt every {} ns)",
                crate::tick::period_ns()
            ),
        }
    );
    if CALIBRATE.load(Ordering::Relaxed) != 0 {
        println!(
            "# blk-bench: CALIBRATION (A/A): every device runs {} mode; the rows and ratios are the roles' and show the bench's own bias and noise",
            effective(Bench::Strict).name()
        );
    }
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
            "blk-bench-result: mode={} seq_mibps_x100={mibps} rand_iops={iops} seq_ios={} rand_ios={} seq_us={} rand_us={} maps={} unmaps={} iommu_notifications={} flushes={}",
            mode.name(),
            s.seq_ios,
            s.rand_ios,
            us(s.seq_ticks),
            us(s.rand_ticks),
            s.maps,
            s.unmaps,
            s.notifications,
            s.flushes
        );
    }
    let id = &sums[Bench::Identity.index()];
    for (mode, goal) in [(Bench::Strict, 90u64), (Bench::Lazy, 98)] {
        let s = &sums[mode.index()];
        let (ts, tr) = (
            ratio_pct(id.seq_ticks, s.seq_ticks),
            ratio_pct(id.rand_ticks, s.rand_ticks),
        );
        let (ms, mr) = (
            median_ratio(&s.seq_batches, &id.seq_batches),
            median_ratio(&s.rand_batches, &id.rand_batches),
        );
        // Met only when both measures meet it: the medians are the steadier (in A/A runs,
        // `blk-bench-calibrate`, they stay within a few points of 100 % where the totals swing
        // several times as much, BENCHMARKS.md), but they leave out the few batches that carry
        // lazy's flushes and fresh MAPs, which the totals count.
        let verdict = if ms >= goal && mr >= goal && ts >= goal && tr >= goal {
            "met"
        } else {
            "missed"
        };
        println!(
            "# blk-bench: {}/identity: median of the {} / {} per-batch ratios: sequential {ms} %, random {mr} %; ratio of the total times: sequential {ts} %, random {tr} % (goal >= {goal} % by both, rounded down): {verdict}",
            mode.name(),
            s.seq_batches.len(),
            s.rand_batches.len(),
        );
        println!(
            "blk-bench-ratio: mode={} seq_pct={ts} rand_pct={tr} median_seq_pct={ms} median_rand_pct={mr} goal_pct={goal} verdict={verdict} lazy_clock={}",
            mode.name(),
            clock_name()
        );
    }
    for (s, mode) in sums.iter().zip(Bench::ALL) {
        let total = us(s.seq_ticks + s.rand_ticks).max(1);
        let (hal, req) = (us(s.hal_ticks), us(s.req_ticks));
        println!(
            "# blk-bench: {}: {hal} us of {total} us ({} %) inside the Hal adapter's state ({} entries, {} ns each), of which {req} us in {} IOMMU requests ({} ns each, {} ns per notification)",
            mode.name(),
            hal * 100 / total,
            s.hal_calls,
            hal * 1000 / s.hal_calls.max(1),
            s.maps + s.unmaps,
            req * 1000 / (s.maps + s.unmaps).max(1),
            req * 1000 / s.notifications.max(1),
        );
    }
    // Where the time goes: the extra time per I/O over identity, and inside the adapter.
    for mode in [Bench::Strict, Bench::Lazy] {
        let s = &sums[mode.index()];
        // Signed: a mode may come out faster than identity within the bench's noise.
        let diff = |a: u64, b: u64| i128::from(us(a)) - i128::from(us(b));
        let extra = diff(s.seq_ticks + s.rand_ticks, id.seq_ticks + id.rand_ticks);
        let extra_hal = diff(s.hal_ticks, id.hal_ticks);
        let n = i128::from(ios(s));
        println!(
            "# blk-bench: {}: {extra} us more than identity over {} I/Os ({} ns per I/O), of which {extra_hal} us inside the Hal adapter ({} ns per I/O); {} MAP/UNMAP requests, {} IOMMU notifications",
            mode.name(),
            ios(s),
            extra * 1000 / n,
            extra_hal * 1000 / n,
            s.maps + s.unmaps,
            s.notifications,
        );
    }
}
