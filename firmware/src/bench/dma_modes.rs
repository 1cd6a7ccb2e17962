//! `dma-modes`: unmodified virtio-drivers device drivers behind the IOMMU through the driver
//! crate's `Hal` adapter ([`IommuHal`]), in each [`DmaMode`], with their data verified:
//!
//! - virtio-blk (`VirtIOBlk`): the whole disk read (its SHA-256 printed as `disk-sha256:` for
//!   the host to compare, and equal across modes), a scratch region written, read back and
//!   restored;
//! - virtio-rng (`VirtIORng`, when QEMU has a `virtio-rng-pci,iommu_platform=on` device; add it
//!   with `VIOMMU_QEMU_ARGS` or `cargo qemu-dma-modes`): entropy requests that must fill the
//!   buffer with fresh bytes.
//!
//! Modes: strict (one mapping per buffer, every one removed again when the device is dropped),
//! isolated strict (the same, with the sub-granule head and tail of each buffer bounced through
//! dedicated granules), identity through a bypass domain (ATTACH_F_BYPASS; no request per
//! buffer; its fault window is [`UNBACKED`]) and identity mappings of all RAM made in one batch
//! (no request per buffer either).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use spin::Mutex;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::pci::PciTransport;
use virtio_iommu_driver::dma::{
    AccessPlatform, DmaMode, DmaSpace, IommuHal, PhysRange, DEFAULT_BOUNCE_GRANULES,
};
use virtio_iommu_driver::wire::Features;

use super::{setup, Endpoint, IOMMU};
use crate::hal::IdentityHal;
use crate::pci::PciBus;

/// DMA state of the virtio-blk device.
static BLK_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
/// DMA state of the virtio-rng device.
static RNG_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);

virtio_iommu_driver::dma_context! {
    /// `IommuHal<BlkDma>`: the virtio-blk device's buffers, through [`IOMMU`] and [`BLK_DMA`].
    pub struct BlkDma { inner: IdentityHal, iommu: IOMMU, space: BLK_DMA }
}
virtio_iommu_driver::dma_context! {
    /// `IommuHal<RngDma>`: the virtio-rng device's buffers, through [`IOMMU`] and [`RNG_DMA`].
    pub struct RngDma { inner: IdentityHal, iommu: IOMMU, space: RNG_DMA }
}

type Blk = VirtIOBlk<IommuHal<BlkDma>, AccessPlatform<PciTransport>>;
type Rng = VirtIORng<IommuHal<RngDma>, AccessPlatform<PciTransport>>;

/// Physical addresses no RAM or device decodes on QEMU's virt machine (above the 52-bit
/// physical address space of any Arm CPU): DMA there reaches nothing (QEMU: unassigned memory).
/// The fault window of the bypass mode, whose domain translates nothing.
const UNBACKED: PhysRange = PhysRange {
    start: 1 << 56,
    end: u64::MAX,
};

/// Bytes of entropy per request.
const ENTROPY: usize = 2048;

/// Counts and prints TAP lines.
struct Tap {
    n: u32,
    passed: u32,
    failed: u32,
}

impl Tap {
    fn case(&mut self, name: &str, f: impl FnOnce() -> Result<Option<String>, String>) -> bool {
        self.n += 1;
        match f() {
            Ok(None) => {
                self.passed += 1;
                println!("ok {} - {name}", self.n);
                true
            }
            Ok(Some(skip)) => {
                self.passed += 1;
                println!("ok {} - {name} # SKIP {skip}", self.n);
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("not ok {} - {name} # {why}", self.n);
                false
            }
        }
    }
}

/// Everything the modes share.
struct Env {
    ram: Vec<PhysRange>,
    blk: Option<Endpoint>,
    rng: Option<Endpoint>,
    next_domain: u32,
    last_domain: u32,
    bypass_config: bool,
}

impl Env {
    fn domain(&mut self) -> Result<u32, String> {
        if self.next_domain > self.last_domain {
            return Err("domain_range exhausted".into());
        }
        self.next_domain += 1;
        Ok(self.next_domain - 1)
    }
}

/// Runs the cases; returns `(passed, failed)`.
pub fn run(dtb: &'static [u8], pci: &mut PciBus) -> (u32, u32) {
    let mut tap = Tap {
        n: 0,
        passed: 0,
        failed: 0,
    };
    let mut env = None;
    tap.case(
        "dma-modes: virtio-iommu initialised, endpoints PROBEd",
        || {
            let (_, endpoints) = setup(pci)?;
            let find = |device_ids: &[u16]| {
                endpoints
                    .iter()
                    .find(|e| {
                        e.function.vendor_id == 0x1af4 && device_ids.contains(&e.function.device_id)
                    })
                    .cloned()
            };
            let fdt = fdt::Fdt::new(dtb).map_err(|_| "devicetree")?;
            let ram: Vec<PhysRange> = crate::heap::ram_regions(&fdt)
                .filter_map(|(start, size)| PhysRange::from_start_size(start, size))
                .collect();
            let guard = IOMMU.lock();
            let iommu = guard.as_ref().ok_or("no IOMMU")?;
            let c = *iommu.config();
            println!(
                "# RAM {:x?}; features {:?}; endpoints {:x?}",
                ram,
                iommu.features(),
                endpoints.iter().map(|e| e.id).collect::<Vec<_>>()
            );
            env = Some(Env {
                ram,
                // virtio-blk: 0x1042 modern, 0x1001 transitional; virtio-rng: 0x1044, 0x1005.
                blk: find(&[0x1042, 0x1001]),
                rng: find(&[0x1044, 0x1005]),
                next_domain: c.domain_range.0,
                last_domain: c.domain_range.1,
                bypass_config: iommu.features().contains(Features::BYPASS_CONFIG),
            });
            Ok(None)
        },
    );
    let Some(mut env) = env else {
        println!("1..{}", tap.n);
        return (tap.passed, tap.failed);
    };
    let mut hashes = Vec::new();
    for mode in [
        DmaMode::Strict,
        DmaMode::IsolatedStrict,
        DmaMode::IdentityBypass,
        DmaMode::IdentityMapped,
    ] {
        let label = match mode {
            DmaMode::Strict => "strict",
            DmaMode::IsolatedStrict => "isolated strict (head/tail bounced)",
            DmaMode::IdentityBypass => "identity (bypass domain)",
            DmaMode::IdentityMapped => "identity (RAM mapped in one batch)",
        };
        let skip = (mode == DmaMode::IdentityBypass && !env.bypass_config)
            .then(|| String::from("BYPASS_CONFIG not negotiated"));
        let blk_ok = tap.case(
            &format!("virtio-blk, {label}: whole disk read, scratch written and restored"),
            || {
                if let Some(why) = skip.clone() {
                    return Ok(Some(why));
                }
                let ep = env.blk.clone().ok_or("no virtio-blk behind the IOMMU")?;
                let hash = blk_case(pci, &mut env, &ep, mode)?;
                hashes.push(hash);
                Ok(None)
            },
        );
        tap.case(
            &format!("virtio-rng, {label}: entropy written through the IOMMU"),
            || {
                if let Some(why) = skip.clone() {
                    return Ok(Some(why));
                }
                let Some(ep) = env.rng.clone() else {
                    return Ok(Some(
                        "no virtio-rng-pci,iommu_platform=on,disable-legacy=on device".into(),
                    ));
                };
                if !blk_ok {
                    // VirtIORng waits without a bound: do not risk it where virtio-blk failed.
                    return Err("not run: the virtio-blk case of this mode failed".into());
                }
                rng_case(pci, &mut env, &ep, mode)?;
                Ok(None)
            },
        );
    }
    tap.case(
        "virtio-blk: the same disk contents in every mode",
        || match hashes.windows(2).all(|w| w[0] == w[1]) {
            true if hashes.len() >= 2 => Ok(None),
            true => Err(format!("only {} mode(s) read the disk", hashes.len())),
            false => Err("the SHA-256 differs between modes".into()),
        },
    );
    tap.case("no fault reported while the devices ran", || {
        let mut guard = IOMMU.lock();
        let iommu = guard.as_mut().ok_or("no IOMMU")?;
        let mut faults = 0;
        while let Some(f) = iommu.poll_event().map_err(|e| format!("eventq: {e}"))? {
            println!("# fault: {f:?}");
            faults += 1;
            if faults > 1000 {
                break;
            }
        }
        match faults {
            0 => Ok(None),
            n => Err(format!("{n} fault report(s)")),
        }
    });
    println!("1..{}", tap.n);
    (tap.passed, tap.failed)
}

/// Attaches `ep` to a fresh domain in `mode` and installs its `DmaSpace` in `slot`.
fn attach(
    env: &mut Env,
    ep: &Endpoint,
    mode: DmaMode,
    slot: &Mutex<Option<DmaSpace>>,
) -> Result<u32, String> {
    let domain = env.domain()?;
    let mut guard = IOMMU.lock();
    let iommu = guard.as_mut().ok_or("no IOMMU")?;
    let space = match mode {
        DmaMode::Strict => DmaSpace::attach_strict(iommu, domain, ep.id, &ep.reserved),
        DmaMode::IsolatedStrict => DmaSpace::attach_isolated::<IdentityHal, _, _>(
            iommu,
            domain,
            ep.id,
            &ep.reserved,
            DEFAULT_BOUNCE_GRANULES,
        ),
        DmaMode::IdentityBypass => {
            DmaSpace::attach_identity(iommu, domain, ep.id, &env.ram, &ep.reserved, Some(UNBACKED))
        }
        DmaMode::IdentityMapped => iommu
            .attach(domain, ep.id)
            .and_then(|()| DmaSpace::identity_mapped(iommu, domain, &env.ram, &ep.reserved)),
    }
    .map_err(|e| {
        format!(
            "{mode:?} set-up of endpoint {:#x} in domain {domain}: {e}",
            ep.id
        )
    })?;
    if space.mode() != mode {
        return Err(format!("asked for {mode:?}, got {:?}", space.mode()));
    }
    println!(
        "# endpoint {:#x}: domain {domain}, {:?}, {} MAP(s) for set-up, identity ranges {:x?}",
        ep.id,
        space.mode(),
        space.maps,
        space.identity_ranges()
    );
    *slot.lock() = Some(space);
    Ok(domain)
}

/// After the device was dropped: every mapping it made is gone again (strict), no per-buffer
/// request was sent (identity), no failure; then the space is torn down (identity mappings
/// removed in one batch) and the endpoint DETACHed.
fn finish(
    slot: &Mutex<Option<DmaSpace>>,
    ep: &Endpoint,
    mode: DmaMode,
    setup_maps: u64,
) -> Result<(), String> {
    let mut space = slot.lock().take().ok_or("no DMA state")?;
    println!(
        "# endpoint {:#x} {mode:?}: {} MAP, {} UNMAP, {} failures, {} live, {} buffers bounced, bounce granules {:?}",
        ep.id,
        space.maps,
        space.unmaps,
        space.failures,
        space.live_mappings(),
        space.bounced,
        space.bounce_granules()
    );
    if space.failures != 0 || space.leaked != 0 || space.bounce_granules().0 != 0 {
        return Err(format!(
            "{} DMA failures, {} mappings kept after a failed UNMAP, {:?} bounce granules in use",
            space.failures,
            space.leaked,
            space.bounce_granules()
        ));
    }
    match mode {
        DmaMode::Strict | DmaMode::IsolatedStrict => {
            // Isolated strict sends up to 3 MAPs (bounce head, direct middle, bounce tail) and
            // one UNMAP per buffer; strict one of each.
            let maps_ok = match mode {
                DmaMode::Strict => space.maps == space.unmaps,
                _ => space.unmaps <= space.maps && space.maps <= 3 * space.unmaps,
            };
            if space.live_mappings() != 0 || !maps_ok || space.maps < 3 {
                return Err(format!(
                    "strict: {} MAP, {} UNMAP, {} live",
                    space.maps,
                    space.unmaps,
                    space.live_mappings()
                ));
            }
        }
        DmaMode::IdentityBypass | DmaMode::IdentityMapped => {
            if space.maps != setup_maps || space.unmaps != 0 {
                return Err(format!(
                    "identity: {} MAP, {} UNMAP for buffers",
                    space.maps - setup_maps,
                    space.unmaps
                ));
            }
        }
    }
    let mut guard = IOMMU.lock();
    let iommu = guard.as_mut().ok_or("no IOMMU")?;
    let ranges = space.identity_ranges().len();
    let removed = space
        .unmap_all(iommu)
        .map_err(|e| format!("unmap_all: {e}"))?;
    if mode == DmaMode::IdentityMapped && removed != ranges {
        return Err(format!(
            "unmap_all removed {removed} of {ranges} identity mappings"
        ));
    }
    iommu
        .detach(space.domain(), ep.id)
        .map_err(|e| format!("DETACH: {e}"))
}

/// The setup MAPs a space made (identity-mapped mode).
fn setup_maps(slot: &Mutex<Option<DmaSpace>>) -> u64 {
    slot.lock().as_ref().map_or(0, |s| s.maps)
}

fn blk_case(
    pci: &mut PciBus,
    env: &mut Env,
    ep: &Endpoint,
    mode: DmaMode,
) -> Result<String, String> {
    attach(env, ep, mode, &BLK_DMA)?;
    let before = setup_maps(&BLK_DMA);
    let root = &mut pci.roots[ep.function.host_bridge];
    let transport = PciTransport::new::<IommuHal<BlkDma>, _>(root, ep.function.device_function)
        .map_err(|e| format!("PCI transport: {e:?}"))?;
    let mut blk =
        Blk::new(AccessPlatform::new(transport)).map_err(|e| format!("VirtIOBlk: {e}"))?;
    let start = crate::timer::now_ticks();
    let result = blk_io(&mut blk);
    let us = crate::timer::ticks_to_us(crate::timer::now_ticks().wrapping_sub(start));
    println!("# virtio-blk {mode:?}: whole-disk read + scratch round trip in {us} us");
    if result.is_err() {
        // The device may still own buffers: keep everything.
        core::mem::forget(blk);
        return result;
    }
    drop(blk);
    finish(&BLK_DMA, ep, mode, before)?;
    result
}

/// Reads the whole disk (hash printed and returned), then writes, verifies and restores a
/// scratch region.
fn blk_io(blk: &mut Blk) -> Result<String, String> {
    let hex = crate::blkio::disk_sha256(blk)?;
    println!("disk-sha256: {hex}");
    crate::blkio::scratch_round_trip(blk)?;
    Ok(hex)
}

fn rng_case(pci: &mut PciBus, env: &mut Env, ep: &Endpoint, mode: DmaMode) -> Result<(), String> {
    attach(env, ep, mode, &RNG_DMA)?;
    let before = setup_maps(&RNG_DMA);
    let root = &mut pci.roots[ep.function.host_bridge];
    let transport = PciTransport::new::<IommuHal<RngDma>, _>(root, ep.function.device_function)
        .map_err(|e| format!("PCI transport: {e:?}"))?;
    let mut rng =
        Rng::new(AccessPlatform::new(transport)).map_err(|e| format!("VirtIORng: {e}"))?;
    let mut first = vec![0x5au8; ENTROPY];
    let mut second = vec![0x5au8; ENTROPY];
    let n1 = rng
        .request_entropy(&mut first)
        .map_err(|e| format!("entropy: {e}"))?;
    let n2 = rng
        .request_entropy(&mut second)
        .map_err(|e| format!("entropy: {e}"))?;
    drop(rng);
    // Random bytes equal the 0x5a canary at about 1 position in 256; require most changed.
    let fresh =
        |b: &[u8], n: usize| n == b.len() && b.iter().filter(|&&x| x != 0x5a).count() > n * 9 / 10;
    println!(
        "# virtio-rng {mode:?}: {n1} + {n2} bytes, first bytes {:02x?}",
        &first[..8]
    );
    if !fresh(&first, n1) || !fresh(&second, n2) || first == second {
        return Err(format!("entropy not written: {n1} and {n2} bytes"));
    }
    finish(&RNG_DMA, ep, mode, before)
}
