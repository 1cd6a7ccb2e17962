//! The `irq-*` cases: the driver interrupt-driven. The GIC is set up (`crate::gic`), the
//! virtio-iommu's legacy INTx is found through the host bridge's `interrupt-map` (QEMU's
//! virtio-iommu-pci has no MSI-X; the ISR read in `ack_interrupt` deasserts INTx), and the
//! interrupt handler runs `VirtIOIommu::handle_interrupt`, counting completions and faults.
//! Requests are non-blocking (`submit_nb_many`), and the CPU waits in `wfi` for the interrupt,
//! bounded by the virtual timer.
//!
//! Locking: these cases run with IRQs masked (PSTATE.I) everywhere except the one-instruction
//! window of `gic::wait_for`, where they hold no lock: so the handler's `IOMMU.try_lock()` never
//! finds the lock held by the code it interrupted (the rule of the driver's `irq` module).
//! (`blk-bench`, another boot mode, runs with IRQs unmasked for its tick clock, whose handler
//! takes no lock but the GIC's, under the rule of `crate::gic`.)

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{BatchOp, NbRequest, NbToken};

use super::edu::{self, Edu, MmioRegs};
use super::env::{with_iommu, DmaPage, IOMMU};
use super::{Env, Tap};
use crate::gic;
use crate::iommu_dev::IommuDevice;
use crate::pci::{PciBus, PciFunction};

/// Interrupts the IOMMU handler ran for.
static IRQS: AtomicU32 = AtomicU32::new(0);
/// Non-blocking completions collected in the handler.
static COMPLETED: AtomicU32 = AtomicU32::new(0);
/// Fault reports taken in the handler.
static FAULTS: AtomicU32 = AtomicU32::new(0);
/// Endpoint and address of the last fault taken in the handler.
static LAST_FAULT: AtomicU64 = AtomicU64::new(0);
static LAST_FAULT_EP: AtomicU32 = AtomicU32::new(u32::MAX);
/// Handler runs that found the driver's lock held or the driver failing.
static TROUBLE: AtomicU32 = AtomicU32::new(0);

/// Wait bound for each interrupt, milliseconds.
const WAIT_MS: u64 = 2000;

/// The IOMMU's interrupt handler (IRQ context, IRQs masked).
fn iommu_irq() {
    IRQS.fetch_add(1, Ordering::SeqCst);
    let Some(mut guard) = IOMMU.try_lock() else {
        TROUBLE.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let Some(iommu) = guard.as_mut() else {
        TROUBLE.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let result = iommu.handle_interrupt(|f| {
        FAULTS.fetch_add(1, Ordering::SeqCst);
        LAST_FAULT.store(f.address.unwrap_or(u64::MAX), Ordering::SeqCst);
        LAST_FAULT_EP.store(f.endpoint, Ordering::SeqCst);
    });
    match result {
        Ok(r) => {
            COMPLETED.fetch_add(r.completed, Ordering::SeqCst);
        }
        Err(_) => {
            TROUBLE.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The GIC INTID of `f`'s INTx: its interrupt pin (config byte 0x3d) through the host bridge's
/// `interrupt-map` / `interrupt-map-mask` (devicetree PCI binding; QEMU `-M virt` lists every
/// slot and pin of bus 0, already swizzled).
fn intx_intid(dtb: &[u8], pci: &PciBus, f: &PciFunction) -> Result<(u8, u32), String> {
    let bridge = pci
        .topology
        .host_bridges
        .get(f.host_bridge)
        .ok_or("no host bridge")?;
    let df = f.device_function;
    let bus = df
        .bus
        .checked_sub(bridge.bus_start)
        .ok_or("bus below bus-range")?;
    let off =
        (u64::from(bus) << 20) | (u64::from(df.device) << 15) | (u64::from(df.function) << 12);
    if off + 0x40 > bridge.ecam_size {
        return Err("function outside ECAM".into());
    }
    let reg = (bridge.ecam_base + off + 0x3c) as *const u32;
    // SAFETY: the function's config dword 0x3c inside the host bridge's ECAM region, mapped as
    // device memory; reading it has no side effect.
    let pin = ((unsafe { reg.read_volatile() } >> 8) & 0xff) as u8;
    if !(1..=4).contains(&pin) {
        return Err(format!("interrupt pin {pin}: no INTx"));
    }
    let fdt = fdt::Fdt::new(dtb).map_err(|_| "devicetree")?;
    let node = fdt.find_node(&bridge.path).ok_or("host bridge node")?;
    let cells = |name: &str| -> Result<alloc::vec::Vec<u32>, String> {
        let p = node.property(name).ok_or(format!("no {name}"))?;
        Ok(p.value
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mask = cells("interrupt-map-mask")?;
    let map = cells("interrupt-map")?;
    if mask.len() != 4 {
        return Err("interrupt-map-mask is not 3 + 1 cells".into());
    }
    let hi =
        (u32::from(df.bus) << 16) | (u32::from(df.device) << 11) | (u32::from(df.function) << 8);
    let child = [hi & mask[0], 0, 0, u32::from(pin) & mask[3]];
    let mut at = 0;
    while at + 5 <= map.len() {
        let entry_child = [
            map[at] & mask[0],
            map[at + 1] & mask[1],
            map[at + 2] & mask[2],
            map[at + 3] & mask[3],
        ];
        let phandle = map[at + 4];
        let parent = fdt
            .find_phandle(phandle)
            .ok_or("interrupt-map: unknown phandle")?;
        let cell = |n: &str, d: usize| parent.property(n).and_then(|p| p.as_usize()).unwrap_or(d);
        let (pa, pi) = (cell("#address-cells", 0), cell("#interrupt-cells", 3));
        let spec = at + 5 + pa;
        if spec + pi > map.len() || pi != 3 {
            return Err("interrupt-map entry does not fit a 3-cell GIC specifier".into());
        }
        if entry_child == child {
            let (kind, num) = (map[spec], map[spec + 1]);
            return match kind {
                0 => Ok((pin, 32 + num)),
                1 => Ok((pin, 16 + num)),
                _ => Err(format!("GIC interrupt type {kind}")),
            };
        }
        at = spec + pi;
    }
    Err("no interrupt-map entry for the function".into())
}

/// The GIC INTID of the virtio-mmio node whose registers start at `base` (its `interrupts`,
/// one 3-cell GIC specifier).
fn mmio_intid(dtb: &[u8], base: u64) -> Result<u32, String> {
    let fdt = fdt::Fdt::new(dtb).map_err(|_| "devicetree")?;
    for node in fdt.all_nodes() {
        let is_mmio = node
            .compatible()
            .is_some_and(|c| c.all().any(|s| s == "virtio,mmio"));
        let at = node
            .reg()
            .and_then(|mut r| r.next())
            .map(|r| r.starting_address as u64);
        if !is_mmio || at != Some(base) {
            continue;
        }
        let p = node
            .property("interrupts")
            .ok_or("virtio-mmio node without interrupts")?;
        let c: alloc::vec::Vec<u32> = p
            .value
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        return match c.as_slice() {
            [0, n, _] => Ok(32 + n),
            [1, n, _] => Ok(16 + n),
            _ => Err(format!("interrupts {c:?}: not a GIC specifier")),
        };
    }
    Err(format!("no virtio,mmio node at {base:#x}"))
}

/// Runs the `irq-*` cases.
pub fn run(tap: &mut Tap, dtb: &[u8], pci: &mut PciBus, env: &mut Env) {
    if crate::arch::current_el() != 1 {
        // Entered at EL3 (`secure=on`; `main` leaves EL2, not EL3): with SCR_EL3.IRQ clear a
        // physical IRQ is not taken at EL3, and `wfi` would wait for nothing. The driver side
        // is the same.
        tap.case(
            "irq: interrupt-driven cases # SKIP firmware runs above EL1, where IRQs are not taken",
            || Ok(()),
        );
        return;
    }
    let mut line = None;
    let ok = tap.case(
        "irq: GIC set up, the virtio-iommu's interrupt (PCI INTx or virtio-mmio) found, handler installed",
        || {
            let info = gic::init(dtb)?;
            let intid = match &env.iommu {
                IommuDevice::Pci(f) => {
                    let (pin, intid) = intx_intid(dtb, pci, f)?;
                    println!(
                        "# {info:x?}; virtio-iommu INT{} -> INTID {intid}",
                        char::from(b'A' + pin - 1)
                    );
                    intid
                }
                IommuDevice::Mmio { base, .. } => {
                    let intid = mmio_intid(dtb, *base)?;
                    println!("# {info:x?}; virtio-mmio IOMMU at {base:#x} -> INTID {intid}");
                    intid
                }
            };
            gic::target_cpu0(info, intid);
            gic::set_handler(intid, Some(iommu_irq))?;
            let timer = gic::enable_timer(dtb)?;
            println!("# virtual timer INTID {timer} (devicetree arm,armv8-timer)");
            with_iommu(|i| {
                i.enable_interrupts();
                Ok(())
            })
            .map_err(|e| format!("{e}"))?;
            line = Some(intid);
            Ok(())
        },
    );
    if !ok {
        return;
    }
    let edu_dev = env.endpoint_of(edu::VENDOR_ID, &[edu::DEVICE_ID]);

    tap.case(
        "irq: ATTACH, MAP and UNMAP sent non-blocking, completed in the handler while in wfi",
        || {
            let dev = edu_dev.as_ref().ok_or("no edu endpoint")?;
            let domain = env.domain()?;
            let page = DmaPage::new(env.granule, env.granule).ok_or("heap")?;
            let iova = env
                .iova_allocator(dev.endpoint)?
                .alloc(env.granule)
                .map_err(|e| format!("IOVA: {e}"))?;
            let end = iova + env.granule - 1;
            let rw = MapFlags::READ | MapFlags::WRITE;
            let reqs = [
                NbRequest::Attach { domain, endpoint: dev.endpoint },
                NbRequest::Op(BatchOp::Map { domain, virt_start: iova, virt_end: end, phys_start: page.phys(), flags: rw }),
                NbRequest::Op(BatchOp::Unmap { domain, virt_start: iova, virt_end: end }),
            ];
            let (irqs0, done0) = (IRQS.load(Ordering::SeqCst), COMPLETED.load(Ordering::SeqCst));
            let mut tokens: [Option<NbToken>; 3] = [None; 3];
            with_iommu(|i| i.submit_nb_many(&reqs, &mut tokens)).map_err(|e| format!("submit: {e}"))?;
            // The handler runs on this stack, below the waiting frames: measured together.
            let ((ok, wfis), stack) = crate::stack::measure(|| {
                gic::wait_for(WAIT_MS, || COMPLETED.load(Ordering::SeqCst) >= done0 + 3)
            });
            let irqs = IRQS.load(Ordering::SeqCst) - irqs0;
            println!("# {} interrupt(s), {wfis} wfi(s) for 3 completions", irqs);
            if let Some(bytes) = stack {
                println!(
                    "# stack: the wait and the IRQ path (vector, FP/SIMD save, GIC dispatch, \
                     handle_interrupt collecting completions) used {bytes} bytes"
                );
            }
            if !ok || irqs == 0 || wfis == 0 {
                // Give the requests up, so the later cases' synchronous requests are not Busy.
                let _ = with_iommu(|i| {
                    tokens.iter().flatten().for_each(|t| {
                        i.discard_nb(*t);
                    });
                    Ok(())
                });
            }
            if !ok {
                return Err(format!(
                    "completions not collected by the handler within {WAIT_MS} ms ({} of 3, {irqs} IRQs)",
                    COMPLETED.load(Ordering::SeqCst) - done0
                ));
            }
            if irqs == 0 || wfis == 0 {
                return Err("completed without an interrupt".into());
            }
            for (t, name) in tokens.iter().zip(["ATTACH", "MAP", "UNMAP"]) {
                let t = t.ok_or("no token")?;
                match with_iommu(|i| Ok(i.poll_nb(&t))) {
                    Ok(Some(Ok(()))) => {}
                    other => return Err(format!("{name}: {other:?}")),
                }
            }
            Ok(())
        },
    );

    tap.case(
        "irq: PROBE sent non-blocking, completed in the handler, the same reserved regions as a blocking PROBE",
        || {
            let dev = edu_dev.as_ref().ok_or("no edu endpoint")?;
            let blocking = with_iommu(|i| i.probe_reserved_regions(dev.endpoint))
                .map_err(|e| format!("blocking PROBE: {e}"))?;
            if blocking.is_empty() && matches!(env.iommu, IommuDevice::Pci(_)) {
                // QEMU's virtio-iommu-pci and ours report at least the MSI doorbell (QEMU's
                // virtio-mmio variant reports none: the comparison is then of two empty lists).
                return Err("the blocking PROBE reported no reserved region to compare".into());
            }
            let (irqs0, done0) = (IRQS.load(Ordering::SeqCst), COMPLETED.load(Ordering::SeqCst));
            let token = with_iommu(|i| i.submit_probe_nb(dev.endpoint))
                .map_err(|e| format!("submit: {e}"))?;
            let (ok, wfis) = gic::wait_for(WAIT_MS, || COMPLETED.load(Ordering::SeqCst) > done0);
            let irqs = IRQS.load(Ordering::SeqCst) - irqs0;
            println!("# {irqs} interrupt(s), {wfis} wfi(s) for the PROBE");
            // Collected here (the handler took the completion) or given up: an uncollected
            // reply would keep every later synchronous request Busy.
            let mut found = alloc::vec::Vec::new();
            let outcome = with_iommu(|i| {
                let r = i.poll_probe_nb(&token, |p| {
                    if let virtio_iommu_driver::parse::ProbeProperty::ResvMem(r) = p {
                        found.push(r)
                    }
                });
                if r.is_none() {
                    i.discard_nb(token);
                }
                Ok(r)
            });
            if !ok {
                return Err(format!(
                    "PROBE not collected by the handler within {WAIT_MS} ms ({irqs} IRQs)"
                ));
            }
            if irqs == 0 || wfis == 0 {
                return Err("completed without an interrupt".into());
            }
            match outcome {
                Ok(Some(Ok(()))) => {}
                other => return Err(format!("PROBE: {other:?}")),
            }
            if found != blocking {
                return Err(format!("non-blocking {found:x?}, blocking {blocking:x?}"));
            }
            println!(
                "# {} reserved region(s), as the blocking PROBE{}",
                found.len(),
                if found.is_empty() { " (none to compare: this IOMMU reports none)" } else { "" }
            );
            Ok(())
        },
    );

    tap.case(
        "irq: an edu DMA fault reported on eventq is taken in the handler",
        || {
            let dev = edu_dev.as_ref().ok_or("no edu endpoint")?;
            let bar = dev.function.bars[0].ok_or("edu BAR0 not assigned")?;
            // SAFETY: BAR0 was assigned by PCI enumeration inside a device-memory window; the
            // isolation cases' instance is gone.
            let regs = unsafe { MmioRegs::new(bar.cpu_address, bar.size) };
            let mut e = Edu::new(regs).map_err(|e| format!("{e}"))?;
            let domain = env.domain()?;
            with_iommu(|i| i.attach(domain, dev.endpoint)).map_err(|e| format!("ATTACH: {e}"))?;
            // Nothing is mapped in the fresh domain: any IOVA faults.
            let iova = env
                .iova_allocator(dev.endpoint)?
                .alloc(env.granule)
                .map_err(|e| format!("IOVA: {e}"))?;
            let (irqs0, faults0) = (IRQS.load(Ordering::SeqCst), FAULTS.load(Ordering::SeqCst));
            e.dma_from_ram(iova, 0, 16)
                .map_err(|e| format!("DMA: {e}"))?;
            let ((ok, wfis), stack) = crate::stack::measure(|| {
                gic::wait_for(WAIT_MS, || FAULTS.load(Ordering::SeqCst) > faults0)
            });
            let irqs = IRQS.load(Ordering::SeqCst) - irqs0;
            println!("# {irqs} interrupt(s), {wfis} wfi(s) for the fault");
            if let Some(bytes) = stack {
                println!(
                    "# stack: the wait and the IRQ path (handle_interrupt taking a fault report \
                     off eventq) used {bytes} bytes"
                );
            }
            if !ok {
                return Err(format!(
                    "no fault taken in the handler within {WAIT_MS} ms ({irqs} IRQs)"
                ));
            }
            let (ep, addr) = (
                LAST_FAULT_EP.load(Ordering::SeqCst),
                LAST_FAULT.load(Ordering::SeqCst),
            );
            // edu reads in small pieces: one fault per piece, the last one recorded.
            if ep != dev.endpoint || !(iova..iova + 16).contains(&addr) {
                return Err(format!(
                    "fault of endpoint {ep:#x} at {addr:#x}, expected {:#x} in {iova:#x}..+16",
                    dev.endpoint
                ));
            }
            Ok(())
        },
    );

    tap.case(
        "irq: a wait for an interrupt that never comes ends by the virtual timer",
        || {
            // The guest's clock runs on in host time while the host deschedules QEMU's vCPU
            // thread, so on a loaded host the 20 ms deadline can pass before the first `wfi`:
            // the wait then rightly ends at once, but it shows nothing about the timer. Such an
            // attempt (no `wfi`, the deadline passed) is made again, up to STALL_RETRIES times;
            // any other outcome decides the case.
            const STALL_RETRIES: u32 = 3;
            let mut attempt = 0;
            loop {
                let t0 = crate::timer::now_ticks();
                let (ok, wfis) = gic::wait_for(20, || false);
                let us = crate::timer::ticks_to_us(crate::timer::now_ticks().wrapping_sub(t0));
                println!("# ended after {us} us and {wfis} wfi(s)");
                if !ok && wfis == 0 && us >= 20_000 && attempt < STALL_RETRIES {
                    println!("# the deadline passed before the first wfi (host stall): again");
                    attempt += 1;
                    continue;
                }
                if ok || wfis == 0 || !(15_000..1_000_000).contains(&us) {
                    return Err(format!("done {ok}, {wfis} wfi(s), {us} us"));
                }
                return Ok(());
            }
        },
    );

    // Back to polling: the line off in the GIC, requestq's interrupts off as after `new`.
    if let Some(intid) = line {
        let _ = gic::set_handler(intid, None);
    }
    let _ = with_iommu(|i| {
        i.set_interrupts(false, true);
        Ok(())
    });
    let trouble = TROUBLE.load(Ordering::SeqCst);
    tap.case(
        "irq: the handler never found the driver's lock held or failing",
        || {
            println!(
                "# handler: {} IRQs, {} completions, {} faults; GIC: {} taken, {} unhandled",
                IRQS.load(Ordering::SeqCst),
                COMPLETED.load(Ordering::SeqCst),
                FAULTS.load(Ordering::SeqCst),
                gic::TAKEN.load(Ordering::SeqCst),
                gic::UNHANDLED.load(Ordering::SeqCst)
            );
            if trouble == 0 {
                Ok(())
            } else {
                Err(format!("{trouble} troubled handler runs"))
            }
        },
    );
}
