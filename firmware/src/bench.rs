//! Modes other than the test cases, chosen by the kernel command line (QEMU `-append`, which
//! QEMU puts into the devicetree's `/chosen/bootargs`):
//!
//! - `bench` ([`run_bench`]): MAP+UNMAP throughput of our driver against QEMU's virtio-iommu, one
//!   request per notification versus [`Batch`]es of 8, 64 and 256, on a real endpoint; prints a
//!   table and one machine-readable `bench-result:` line per row, checks the criteria
//!   (≥ 64 requests per notification at 256; ≥ [`TARGET_SPEEDUP_X100`]/100 times the ops/s of
//!   one request per notification, or `min-speedup=N` from the command line) and exits
//!   non-zero when they do not hold. Under QEMU TCG the 8× does not hold (see BENCHMARKS.md).
//! - `dma-modes` ([`dma_modes::run`]): unmodified virtio-drivers devices (virtio-blk, and
//!   virtio-rng when QEMU has one with `iommu_platform=on`) behind the IOMMU through
//!   [`IommuHal`](virtio_iommu_driver::dma::IommuHal), in strict, isolated strict,
//!   identity-bypass and identity-mapped mode, data verified; TAP output like the cases.
//! - `blk-bench` ([`blk_throughput::run`]): virtio-blk read throughput (sequential 64 KiB,
//!   random 4 KiB) in strict, lazy-unmap and identity mode in one run, one virtio-blk device
//!   per mode, with the ratios to identity and the bookkeeping profile ([`bookkeeping`]); TAP
//!   output.

pub mod blk_throughput;
pub mod bookkeeping;
pub mod dma_modes;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use spin::Mutex;
use virtio_iommu_driver::dma::IovaAllocator;
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{Batch, IommuOptions, ReservedRegion, VirtIOIommu, WaitPolicy};

use crate::hal::IdentityHal;
use crate::iommu_dev::{FoundIommu, IommuTransport};
use crate::pci::{PciBus, PciFunction};
use crate::timer;

/// The virtio-iommu driver of the bench modes. Its own DMA is not translated, so its queues use
/// [`IdentityHal`].
pub type Iommu = VirtIOIommu<IdentityHal, IommuTransport>;

/// The driver, shared with the `IommuHal` contexts of [`dma_modes`].
pub static IOMMU: Mutex<Option<Iommu>> = Mutex::new(None);

/// What the kernel command line asks for.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Mode {
    /// No recognised word: the end-to-end test cases.
    Cases,
    /// `bench`: [`run_bench`].
    Bench,
    /// `dma-modes`: [`dma_modes::run`].
    DmaModes,
    /// `blk-bench`: [`blk_throughput::run`].
    BlkBench,
}

/// The kernel command line (`/chosen/bootargs`, NUL-terminated string), empty if absent.
pub fn bootargs(dtb: &[u8]) -> &str {
    let Ok(fdt) = fdt::Fdt::new(dtb) else {
        return "";
    };
    let Some(value) = fdt
        .find_node("/chosen")
        .and_then(|c| c.property("bootargs"))
        .map(|p| p.value)
    else {
        return "";
    };
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    core::str::from_utf8(&value[..end]).unwrap_or("")
}

/// The mode named by the kernel command line (whitespace-separated words; the first known one
/// wins).
pub fn mode(dtb: &[u8]) -> Mode {
    for word in bootargs(dtb).split_whitespace() {
        match word {
            "bench" => return Mode::Bench,
            "dma-modes" => return Mode::DmaModes,
            "blk-bench" => return Mode::BlkBench,
            _ => {}
        }
    }
    Mode::Cases
}

/// The value of `key=value` on the kernel command line.
fn bootarg<'a>(dtb: &'a [u8], key: &str) -> Option<&'a str> {
    bootargs(dtb)
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A PCI function behind the IOMMU with its endpoint ID and PROBEd reserved regions.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The function.
    pub function: PciFunction,
    /// Endpoint ID (from `iommu-map`).
    pub id: u32,
    /// Reserved regions from PROBE (empty without F_PROBE).
    pub reserved: Vec<ReservedRegion>,
}

/// Monotonic time in nanoseconds (the driver's wait budget).
fn now_ns() -> u64 {
    timer::ticks_to_us(timer::now_ticks()).saturating_mul(1000)
}

/// Finds the first virtio-iommu of the devicetree (PCI or virtio-mmio), initialises it into
/// [`IOMMU`], PROBEs every function behind it. Returns the IOMMU and its endpoints.
pub fn setup(pci: &mut PciBus) -> Result<(FoundIommu, Vec<Endpoint>), String> {
    let found = crate::iommu_dev::find(pci)?;
    let transport = found.device.open(pci)?;
    let options = IommuOptions {
        wait: WaitPolicy {
            clock: Some(now_ns),
            timeout_ns: 5_000_000_000,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    };
    let mut iommu = Iommu::new(transport, options).map_err(|e| format!("init: {e}"))?;
    let mut endpoints = Vec::new();
    for f in &pci.functions {
        if !found.device.may_serve(f.host_bridge) || found.device.is_function(f) {
            continue;
        }
        let ep = pci
            .topology
            .pci_endpoint(f.host_bridge, f.requester_id)
            .map_err(|e| format!("iommu-map: {e:?}"))?;
        let Some(ep) = ep.filter(|e| e.iommu == found.index) else {
            continue;
        };
        let reserved = if iommu
            .features()
            .contains(virtio_iommu_driver::wire::Features::PROBE)
        {
            iommu
                .probe_reserved_regions(ep.endpoint_id)
                .map_err(|e| format!("PROBE {:#x}: {e}", ep.endpoint_id))?
        } else {
            Vec::new()
        };
        endpoints.push(Endpoint {
            function: f.clone(),
            id: ep.endpoint_id,
            reserved,
        });
    }
    *IOMMU.lock() = Some(iommu);
    Ok((found, endpoints))
}

/// Batch sizes measured. Size 1 is measured twice: through the synchronous `map`/`unmap` (the
/// driver without batching) and through a [`Batch`] of one.
pub const BATCH_SIZES: [usize; 4] = [1, 8, 64, 256];
/// MAP+UNMAP pairs per row.
const PAIRS: usize = 8192;
/// The rows are measured in this many interleaved rounds of `PAIRS / ROUNDS` pairs each, so a
/// slow phase of the host (other processes) affects every row alike.
const ROUNDS: usize = 8;
/// The target: MAP+UNMAP ops/s at batch size 256 at least this many times those of one
/// request per notification (the faster of the two size-1 rows). `min-speedup=N` on the kernel
/// command line (N may have a fraction, e.g. `1.5`) replaces it.
pub const TARGET_SPEEDUP_X100: u64 = 800;
/// The target: at least this many requests per notification at batch size 256.
pub const MIN_REQ_PER_NOTIFY_256: u64 = 64;

/// One measured row.
#[derive(Clone, Copy, Debug)]
struct Row {
    /// Requests per batch; `None` = synchronous `map`/`unmap`.
    batch: Option<usize>,
    /// MAP and UNMAP requests sent.
    ops: u64,
    /// Notifications sent.
    notifications: u64,
    /// Elapsed counter ticks.
    ticks: u64,
}

impl Row {
    fn ops_per_s(&self) -> u64 {
        let per_s = u128::from(self.ops) * u128::from(timer::ticks_per_second())
            / u128::from(self.ticks.max(1));
        u64::try_from(per_s).unwrap_or(u64::MAX)
    }
    /// Requests per notification ×100.
    fn req_per_notify_x100(&self) -> u64 {
        self.ops * 100 / self.notifications.max(1)
    }
    fn size(&self) -> usize {
        self.batch.unwrap_or(1)
    }
    fn api(&self) -> &'static str {
        match self.batch {
            None => "sync",
            Some(_) => "batch",
        }
    }
}

/// `N` or `N.NN` as ×100, e.g. `1.5` → 150.
fn parse_x100(text: &str) -> Option<u64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let mut x100 = whole.parse::<u64>().ok()?.checked_mul(100)?;
    let digits: u64 = match frac.len() {
        0 => 0,
        1 => frac.parse::<u64>().ok()? * 10,
        2 => frac.parse().ok()?,
        _ => return None,
    };
    x100 = x100.checked_add(digits)?;
    Some(x100)
}

/// `bench` mode. Returns the exit status: 0 when every row ran and both checks hold.
pub fn run_bench(dtb: &[u8], pci: &mut PciBus) -> i32 {
    let min_speedup_x100 = match bootarg(dtb, "min-speedup") {
        None => TARGET_SPEEDUP_X100,
        Some(v) => match parse_x100(v) {
            Some(x) => x,
            None => {
                println!("bench: bad min-speedup={v}");
                return 1;
            }
        },
    };
    let (_, endpoints) = match setup(pci) {
        Ok(s) => s,
        Err(e) => {
            println!("bench: setup failed: {e}");
            return 1;
        }
    };
    // edu if present (a plain DMA engine), else the first endpoint behind the IOMMU.
    let Some(ep) = endpoints
        .iter()
        .find(|e| (e.function.vendor_id, e.function.device_id) == (0x1234, 0x11e8))
        .or_else(|| endpoints.first())
        .cloned()
    else {
        println!("bench: no endpoint behind the IOMMU");
        return 1;
    };
    let status = match bench_endpoint(&ep, min_speedup_x100) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            println!("bench: failed: {e}");
            1
        }
    };
    match IOMMU.lock().as_mut() {
        Some(iommu) => register_access(iommu),
        None => println!("bench: no IOMMU for the register accesses"),
    }
    status
}

/// Register accesses timed per kind by [`register_access`].
const REG_ACCESSES: u64 = 2000;

/// Times [`REG_ACCESSES`] single accesses of each kind to the IOMMU's BARs, one after the
/// other (the time of a trap to the device model: under TCG QEMU's own MMIO dispatch, with a
/// vfio-user device a message to the server and, for a read, its reply). Prints one
/// `bench-reg: access=<kind> count=N total_us=T ns_per_access=A` line per kind:
///
/// - `common-read`: a read of the common configuration's `device_status` (u8, §4.1.4.3);
/// - `device-cfg-read`: a 32-bit read of the device configuration's first word (the low half of
///   `page_size_mask`, §5.13.4);
/// - `notify-write`: a write of the requestq's notification register (§4.1.4.4) with nothing
///   new on the ring, so the device looks at the available ring and finds no request.
///
/// The loop's own cost (a counter read per kind, the call) is included; it is well under
/// 0.1 µs per access under TCG.
fn register_access(iommu: &mut Iommu) {
    use virtio_drivers::transport::Transport;
    let kinds: [&str; 3] = ["common-read", "device-cfg-read", "notify-write"];
    for (k, kind) in kinds.iter().enumerate() {
        let transport = iommu.transport_mut();
        let mut sink = 0u64;
        let start = timer::now_ticks();
        for _ in 0..REG_ACCESSES {
            match k {
                0 => sink = sink.wrapping_add(u64::from(transport.get_status().bits())),
                1 => {
                    sink = sink.wrapping_add(u64::from(
                        transport.read_config_space::<u32>(0).unwrap_or(0),
                    ))
                }
                _ => transport.notify(0),
            }
        }
        let ticks = timer::now_ticks().wrapping_sub(start);
        core::hint::black_box(sink);
        let ns = u128::from(ticks) * 1_000_000_000 / u128::from(timer::ticks_per_second().max(1));
        println!(
            "bench-reg: access={kind} count={REG_ACCESSES} total_us={} ns_per_access={}",
            ns / 1000,
            ns / u128::from(REG_ACCESSES)
        );
    }
}

/// `x100` as `N.NN`.
fn fixed2(x100: u64) -> String {
    format!("{}.{:02}", x100 / 100, x100 % 100)
}

fn bench_endpoint(ep: &Endpoint, min_speedup_x100: u64) -> Result<bool, String> {
    let mut guard = IOMMU.lock();
    let iommu = guard.as_mut().ok_or("no IOMMU")?;
    let config = *iommu.config();
    let g = config.granule;
    let domain = config.domain_range.0;
    iommu
        .attach(domain, ep.id)
        .map_err(|e| format!("ATTACH {:#x} to {domain}: {e}", ep.id))?;
    let mut iova = IovaAllocator::for_endpoint(config.input_range, g, &ep.reserved)
        .map_err(|e| format!("IOVA allocator: {e}"))?;
    let max_batch = BATCH_SIZES[BATCH_SIZES.len() - 1];
    let iova_base = iova
        .alloc(g * max_batch as u64)
        .map_err(|e| format!("IOVA: {e}"))?;
    // One granule of RAM that every IOVA maps to.
    let page = leak_page(g).ok_or("no memory for the target page")?;
    println!(
        "bench: endpoint {:#x} ({:04x}:{:04x}) in domain {domain}, granule {g:#x}, requestq {} descriptors, {PAIRS} MAP+UNMAP pairs per row in {ROUNDS} interleaved rounds",
        ep.id,
        ep.function.vendor_id,
        ep.function.device_id,
        iommu.requestq_size()
    );
    let configs: Vec<Option<usize>> = core::iter::once(None)
        .chain(BATCH_SIZES.iter().map(|&b| Some(b)))
        .collect();
    let mut rows: Vec<Row> = configs
        .iter()
        .map(|&batch| Row {
            batch,
            ops: 0,
            notifications: 0,
            ticks: 0,
        })
        .collect();
    for _ in 0..ROUNDS {
        for row in rows.iter_mut() {
            let part = measure(iommu, domain, iova_base, page, g, row.batch, PAIRS / ROUNDS)?;
            row.ops += part.ops;
            row.notifications += part.notifications;
            row.ticks += part.ticks;
        }
    }
    iommu
        .detach(domain, ep.id)
        .map_err(|e| format!("DETACH: {e}"))?;
    println!("bench: | batch | API   | requests | notifications | req/notify | time (us) | MAP+UNMAP ops/s |");
    println!("bench: |------:|-------|---------:|--------------:|-----------:|----------:|----------------:|");
    for r in &rows {
        println!(
            "bench: | {:>5} | {:<5} | {:>8} | {:>13} | {:>10} | {:>9} | {:>15} |",
            r.size(),
            r.api(),
            r.ops,
            r.notifications,
            fixed2(r.req_per_notify_x100()),
            timer::ticks_to_us(r.ticks),
            r.ops_per_s()
        );
    }
    for r in &rows {
        println!(
            "bench-result: batch={} api={} ops={} notifications={} req_per_notify={} time_us={} ops_per_s={}",
            r.size(),
            r.api(),
            r.ops,
            r.notifications,
            fixed2(r.req_per_notify_x100()),
            timer::ticks_to_us(r.ticks),
            r.ops_per_s()
        );
    }
    // Baseline: the faster of the two one-request-per-notification rows.
    let single = rows
        .iter()
        .filter(|r| r.size() == 1)
        .map(Row::ops_per_s)
        .max()
        .unwrap_or(0);
    let best = rows
        .iter()
        .find(|r| r.batch == Some(max_batch))
        .ok_or("no row")?;
    let speedup_x100 =
        u64::try_from(u128::from(best.ops_per_s()) * 100 / u128::from(single.max(1)))
            .unwrap_or(u64::MAX);
    let speedup_ok = speedup_x100 >= min_speedup_x100;
    let rpn_ok = best.req_per_notify_x100() >= MIN_REQ_PER_NOTIFY_256 * 100;
    println!(
        "bench-check: speedup_at_{max_batch}={} min={} {}",
        fixed2(speedup_x100),
        fixed2(min_speedup_x100),
        if speedup_ok { "ok" } else { "FAIL" }
    );
    println!(
        "bench-check: req_per_notify_at_{max_batch}={} min={MIN_REQ_PER_NOTIFY_256} {}",
        fixed2(best.req_per_notify_x100()),
        if rpn_ok { "ok" } else { "FAIL" }
    );
    Ok(speedup_ok && rpn_ok)
}

/// MAP then UNMAP `pairs` granules at `iova_base + k * g` (all to `phys`), `batch` at a time
/// (`None`: synchronous requests, one at a time). Every request must succeed.
fn measure(
    iommu: &mut Iommu,
    domain: u32,
    iova_base: u64,
    phys: u64,
    g: u64,
    batch: Option<usize>,
    pairs: usize,
) -> Result<Row, String> {
    let rw = MapFlags::READ | MapFlags::WRITE;
    let before = iommu.request_stats();
    let start = timer::now_ticks();
    let mut done = 0;
    while done < pairs {
        match batch {
            None => {
                iommu
                    .map(domain, iova_base, iova_base + g - 1, phys, rw)
                    .map_err(|e| format!("MAP: {e}"))?;
                iommu
                    .unmap(domain, iova_base, iova_base + g - 1)
                    .map_err(|e| format!("UNMAP: {e}"))?;
                done += 1;
            }
            Some(size) => {
                let n = size.min(pairs - done);
                let mut b = iommu.batch();
                for k in 0..n as u64 {
                    let at = iova_base + k * g;
                    b.map(domain, at, at + g - 1, phys, rw)
                        .map_err(|e| format!("queue MAP: {e}"))?;
                }
                check(b)?;
                let mut b = iommu.batch();
                for k in 0..n as u64 {
                    let at = iova_base + k * g;
                    b.unmap(domain, at, at + g - 1)
                        .map_err(|e| format!("queue UNMAP: {e}"))?;
                }
                check(b)?;
                done += n;
            }
        }
    }
    let ticks = timer::now_ticks().wrapping_sub(start);
    let after = iommu.request_stats();
    Ok(Row {
        batch,
        ops: after.requests - before.requests,
        notifications: after.notifications - before.notifications,
        ticks,
    })
}

/// Submits `batch` and requires every request to have succeeded.
fn check(batch: Batch<'_, IdentityHal, IommuTransport>) -> Result<(), String> {
    let result = batch.submit().map_err(|e| format!("submit: {e}"))?;
    match result.first_error() {
        None => Ok(()),
        Some((i, e)) => Err(format!("request {i} of the batch: {e}")),
    }
}

/// A zeroed, `g`-aligned heap allocation of `g` bytes that is never freed (mappings may point at
/// it until the end of the run). Returns its physical (= virtual) address.
pub fn leak_page(g: u64) -> Option<u64> {
    let size = usize::try_from(g).ok()?;
    let layout = core::alloc::Layout::from_size_align(size, size).ok()?;
    // SAFETY: `layout` has a non-zero size (the granule is at least 1 byte, a power of two).
    let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
    (!ptr.is_null()).then_some(ptr as u64)
}
