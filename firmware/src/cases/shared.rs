//! A shared domain (#10 item 4): virtio-blk and `edu` attached to one domain through one
//! `DmaSpace` (`attach_strict` + `attach_endpoint`), both doing DMA through its one IOVA
//! space, with the reserved regions merged as Linux does (PROBE's, plus the software MSI
//! window when PROBE reports no MSI region; QEMU's tree has no `/reserved-memory`). Then edu
//! is detached: its DMA faults while virtio-blk keeps working. First, the reserved-region
//! merge is checked on QEMU's tree and PROBE's regions (#10 item 6); hand-made trees with
//! `/reserved-memory` are the host tests' (`driver/tests/reserved.rs`).
//!
//! Runs last: it re-attaches both endpoints and resets virtio-blk (a new `VirtIOBlk` whose
//! rings live in the shared space).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use spin::Mutex;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::pci::PciTransport;
use virtio_iommu_driver::dma::{with_locked, AccessPlatform, DmaSpace, IommuHal, IovaAllocator};
use virtio_iommu_driver::topology::reserved::{self, MSI_IOVA_BASE, MSI_IOVA_LENGTH};
use virtio_iommu_driver::topology::Devicetree;
use virtio_iommu_driver::wire::{Features, MapFlags};
use virtio_iommu_driver::{ReservedRegion, ResvMemKind};

use super::edu::{self, Edu, MmioRegs};
use super::env::{drain_faults, with_iommu, DmaPage, IOMMU};
use super::{Env, Tap};
use crate::hal::IdentityHal;
use crate::pci::PciBus;

/// The shared space of virtio-blk and edu.
static SHARED_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);

virtio_iommu_driver::dma_context! {
    /// DMA context of virtio-blk in the shared domain.
    struct SharedDma { inner: IdentityHal, iommu: IOMMU, space: SHARED_DMA }
}

type Blk = VirtIOBlk<IommuHal<SharedDma>, AccessPlatform<PciTransport>>;

/// Bytes per edu DMA (below the end of its 4 KiB buffer, see `isolation.rs`).
const LEN: usize = 2048;

fn regions_of(env: &Env, endpoint: u32) -> Vec<ReservedRegion> {
    let probe: Vec<ReservedRegion> = env
        .endpoints
        .iter()
        .filter(|(d, _)| d.endpoint == endpoint)
        .flat_map(|(_, r)| r.iter().copied())
        .collect();
    reserved::merge(&probe, &[])
}

fn with_shared<R>(
    f: impl FnOnce(
        &mut dyn virtio_iommu_driver::dma::IommuMapper,
        &mut DmaSpace,
    ) -> Result<R, virtio_iommu_driver::IommuError>,
) -> Result<R, String> {
    with_locked(&IOMMU, &SHARED_DMA, f).map_err(|e| format!("{e}"))
}

/// The merge on QEMU's own tree: no `/reserved-memory` (so nothing from the devicetree), and
/// per endpoint PROBE's regions plus the software MSI window exactly when PROBE reports no MSI
/// region (QEMU `virt` with GICv3 reports the ITS doorbell as one).
fn reserved_regions(tap: &mut Tap, dtb: &[u8], env: &Env) {
    tap.case(
        "reserved regions: PROBE merged with the software MSI window and /reserved-memory",
        || {
            let dt = Devicetree::new(dtb).map_err(|e| format!("devicetree: {e}"))?;
            let nodes = reserved::reserved_memory(&dt).map_err(|e| format!("{e}"))?;
            println!("# /reserved-memory: {} region(s)", nodes.len());
            for n in &nodes {
                println!(
                    "#   {} phandle {:#x} {:x?} no-map {}",
                    n.path, n.phandle, n.range, n.no_map
                );
            }
            for (dev, probe) in &env.endpoints {
                let merged = reserved::merge(probe, &[]);
                let has_msi = probe.iter().any(|r| r.kind == ResvMemKind::Msi);
                let mut want = probe.clone();
                if !has_msi {
                    want.push(reserved::software_msi());
                }
                want.sort_by_key(|r| r.start);
                if merged != want {
                    return Err(format!("endpoint {:#x}: merged {merged:?}", dev.endpoint));
                }
                println!(
                    "# endpoint {:#x}: {} merged region(s), software MSI window {}",
                    dev.endpoint,
                    merged.len(),
                    if has_msi { "not needed" } else { "added" }
                );
                let a = IovaAllocator::for_endpoint(env.input_range, env.granule, &merged)
                    .map_err(|e| format!("allocator: {e}"))?;
                if a.iter_free()
                    .any(|(s, e)| merged.iter().any(|r| r.overlaps(s, e)))
                {
                    return Err("a merged region is free in the allocator".into());
                }
            }
            Ok(())
        },
    );
}

/// QEMU's `iommu-map` sends every requester ID but the IOMMU's own to its own endpoint ID:
/// no requester shares an endpoint.
fn alias_groups(tap: &mut Tap, pci: &PciBus) {
    tap.case("topology: no alias groups in QEMU's iommu-map", || {
        let start = crate::timer::now_ticks();
        let groups = pci.topology.alias_groups();
        let us = crate::timer::ticks_to_us(crate::timer::now_ticks() - start);
        println!("# alias groups: {} (computed in {us} us)", groups.len());
        match groups.first() {
            Some(g) => Err(format!(
                "endpoint {:#x} shared by {} requester IDs",
                g.endpoint_id,
                g.len()
            )),
            None => Ok(()),
        }
    });
}

pub fn run(tap: &mut Tap, dtb: &[u8], pci: &mut PciBus, env: &mut Env) {
    reserved_regions(tap, dtb, env);
    alias_groups(tap, pci);
    let name = "shared domain: virtio-blk and edu DMA through one IOVA space";
    let blk_dev = env.endpoint_of(0x1af4, &[0x1042, 0x1001]);
    let edu_dev = env.endpoint_of(edu::VENDOR_ID, &[edu::DEVICE_ID]);
    let (Some(blk_dev), Some(edu_dev)) = (blk_dev, edu_dev) else {
        tap.case(
            name,
            || Err("needs a virtio-blk and an edu endpoint".into()),
        );
        return;
    };
    let Some(bar) = edu_dev.function.bars[0] else {
        tap.case(name, || Err("edu BAR0 not assigned".into()));
        return;
    };
    // SAFETY: BAR0 was assigned by PCI enumeration inside a device-memory window; the
    // isolation cases that used it are done.
    let regs = unsafe { MmioRegs::new(bar.cpu_address, bar.size) };
    let mut edu = match Edu::new(regs) {
        Ok(e) => e,
        Err(e) => {
            tap.case(name, || Err(format!("{e}")));
            return;
        }
    };
    let (blk_ep, edu_ep) = (blk_dev.endpoint, edu_dev.endpoint);
    let g = env.granule;
    let mut blk: Option<Blk> = None;
    let mut pages: Option<(DmaPage, DmaPage, u64, u64)> = None;

    tap.case(name, || {
        let domain = env.domain()?;
        let blk_regions = regions_of(env, blk_ep);
        let edu_regions = regions_of(env, edu_ep);
        for r in blk_regions.iter().chain(&edu_regions) {
            println!("# merged region {:?} {:#x}..={:#x}", r.kind, r.start, r.end);
        }
        let space = with_iommu(|i| {
            let mut s = DmaSpace::attach_strict(i, domain, blk_ep, &blk_regions)?;
            s.attach_endpoint(i, edu_ep, &edu_regions)?;
            Ok(s)
        })
        .map_err(|e| format!("shared space in domain {domain}: {e}"))?;
        if space.endpoints() != [blk_ep, edu_ep] {
            return Err(format!("endpoints {:?}", space.endpoints()));
        }
        *SHARED_DMA.lock() = Some(space);
        let root = &mut pci.roots[blk_dev.function.host_bridge];
        let transport =
            PciTransport::new::<IommuHal<SharedDma>, _>(root, blk_dev.function.device_function)
                .map_err(|e| format!("PCI transport: {e:?}"))?;
        let mut b =
            Blk::new(AccessPlatform::new(transport)).map_err(|e| format!("VirtIOBlk: {e}"))?;
        // virtio-blk: the first 4 KiB of the disk, DMAed into RAM through the shared space.
        let disk = crate::blkio::io(&mut b, 0, vec![0u8; 4096].into_boxed_slice(), 4096, false)?;
        // edu: that data from RAM (IOVA a, READ) into edu and back to RAM (IOVA b, WRITE),
        // with IOVAs of the same space, while virtio-blk's rings are mapped there too.
        let mut src = DmaPage::new(g, g).ok_or("heap")?;
        let dst = DmaPage::new(g, g).ok_or("heap")?;
        src.write(0, &disk[..LEN]);
        let (a, b_iova) = with_shared(|i, s| {
            let a = s.map_buffer(i, src.phys(), g, MapFlags::READ)?;
            let b = s.map_buffer(i, dst.phys(), g, MapFlags::WRITE)?;
            Ok((a, b))
        })?;
        let in_window = |x: u64| (MSI_IOVA_BASE..MSI_IOVA_BASE + MSI_IOVA_LENGTH).contains(&x);
        if in_window(a) || in_window(b_iova) {
            return Err("an IOVA in the software MSI window".into());
        }
        drain_faults().map_err(|e| format!("{e}"))?;
        edu.dma_from_ram(a, 0, LEN as u64)
            .map_err(|e| format!("edu DMA in: {e}"))?;
        edu.dma_to_ram(0, b_iova, LEN as u64)
            .map_err(|e| format!("edu DMA out: {e}"))?;
        let mut got = vec![0u8; LEN];
        dst.read(0, &mut got);
        if got != disk[..LEN] {
            return Err("edu did not copy the disk data through the shared space".into());
        }
        // virtio-blk again, with edu's mappings live: no IOVA collision (no failed MAP).
        crate::blkio::scratch_round_trip(&mut b)?;
        let faults = drain_faults().map_err(|e| format!("{e}"))?;
        let (live, failures, maps) =
            with_shared(|_, s| Ok((s.live_mappings(), s.failures, s.maps)))?;
        println!(
            "# shared domain {domain}: endpoints {blk_ep:#x} (virtio-blk) and {edu_ep:#x} (edu); \
             edu IOVAs {a:#x} (R), {b_iova:#x} (W); {maps} MAPs, {live} live, {failures} failures"
        );
        if failures != 0 || !faults.is_empty() {
            return Err(format!("{failures} failures, {} faults", faults.len()));
        }
        blk = Some(b);
        pages = Some((src, dst, a, b_iova));
        Ok(())
    });

    let after = "shared domain: after DETACH of edu its DMA faults, virtio-blk still works";
    let (Some(mut b), Some((_src, dst, a, b_iova))) = (blk, pages) else {
        tap.skipped_by_failure(after, "no shared domain");
        return;
    };
    tap.case(after, || {
        let bypass_config = with_iommu(|i| Ok(i.features().contains(Features::BYPASS_CONFIG)))
            .map_err(|e| format!("{e}"))?;
        if !bypass_config {
            return Err("BYPASS_CONFIG not negotiated: unattached DMA may bypass".into());
        }
        let before = with_iommu(|i| Ok(i.bypass())).map_err(|e| format!("{e}"))?;
        with_iommu(|i| i.set_bypass(false)).map_err(|e| format!("bypass=0: {e}"))?;
        let result = (|| {
            with_iommu(|i| {
                let mut slot = SHARED_DMA.lock();
                let s = slot
                    .as_mut()
                    .ok_or(virtio_iommu_driver::IommuError::Broken)?;
                s.detach_endpoint(i, edu_ep)
            })
            .map_err(|e| format!("detach edu: {e}"))?;
            let mut dst = dst;
            dst.fill(0);
            drain_faults().map_err(|e| format!("{e}"))?;
            edu.dma_from_ram(a, 0, 16)
                .map_err(|e| format!("edu DMA in: {e}"))?;
            edu.dma_to_ram(0, b_iova, 16)
                .map_err(|e| format!("edu DMA out: {e}"))?;
            let mut got = [0u8; 16];
            dst.read(0, &mut got);
            if got != [0u8; 16] {
                return Err(String::from("detached edu still wrote RAM"));
            }
            let faults = drain_faults().map_err(|e| format!("{e}"))?;
            if faults.is_empty() || faults.iter().any(|f| f.endpoint != edu_ep) {
                return Err(format!("faults {faults:?}, want only endpoint {edu_ep:#x}"));
            }
            println!(
                "# {} fault(s) for edu after DETACH, first {:?}",
                faults.len(),
                faults[0]
            );
            crate::blkio::scratch_round_trip(&mut b)?;
            let faults = drain_faults().map_err(|e| format!("{e}"))?;
            if !faults.is_empty() {
                return Err(format!("virtio-blk faulted: {:?}", faults[0]));
            }
            Ok(())
        })();
        if let Some(before) = before {
            with_iommu(|i| i.set_bypass(before)).map_err(|e| format!("restore bypass: {e}"))?;
        }
        result
    });
    // edu's buffers go back to the heap only after their UNMAP (virtio-blk is still in the
    // domain); the disk keeps its own mappings: nothing after this uses the domain.
    let _ = with_shared(|i, s| {
        s.unmap_buffer(i, a)?;
        s.unmap_buffer(i, b_iova)
    });
    core::mem::forget(b);
}
