//! The interrupt controller (GICv2 of default `-M virt`, GICv3 with `gic-version=3`, through
//! the `arm-gic` crate), a small table of interrupt handlers, the IRQ entry point called from
//! the exception vector, and the virtual timer used to bound `wfi` waits (the physical timer
//! drives `crate::tick`).
//!
//! Lock rule (see the driver's `irq` module): the handler table and the GIC are locked by the
//! IRQ handler, so every other taker masks IRQs first (`IrqGuard<Aarch64Daif>`).

use arm_gic::gicv2::GicV2;
use arm_gic::gicv3::{GicCpuInterface, GicV3};
use arm_gic::{IntId, InterruptGroup, UniqueMmioPointer};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use spin::Mutex;
use virtio_iommu_driver::irq::{Aarch64Daif, IrqGuard};

enum Gic {
    V2(GicV2<'static>),
    V3(GicV3<'static>),
}

// SAFETY: the GIC driver only holds MMIO pointers to the one GIC; it is used under `GIC`'s lock.
unsafe impl Send for Gic {}

static GIC: Mutex<Option<Gic>> = Mutex::new(None);
/// A registered handler: INTID and function.
type Handler = Option<(u32, fn())>;
static HANDLERS: Mutex<[Handler; 4]> = Mutex::new([None; 4]);
/// IRQs taken (acknowledged in the GIC, spurious ones excluded).
pub static TAKEN: AtomicU32 = AtomicU32::new(0);
/// IRQs taken with no handler registered (then the line is disabled).
pub static UNHANDLED: AtomicU32 = AtomicU32::new(0);
static TIMER_FIRED: AtomicBool = AtomicBool::new(false);

/// Which GIC was found, with its register bases.
#[derive(Clone, Copy, Debug)]
pub enum GicInfo {
    /// GICv2: distributor and CPU interface.
    V2 {
        /// GICD base.
        gicd: u64,
        /// GICC base.
        gicc: u64,
    },
    /// GICv3: distributor and redistributors.
    V3 {
        /// GICD base.
        gicd: u64,
        /// First GICR frame.
        gicr: u64,
    },
}

/// Finds the GIC in the devicetree and sets it up for CPU 0 (every interrupt disabled, CPU
/// interface on). Idempotent. IRQs stay masked (PSTATE.I) until the caller unmasks them.
pub fn init(dtb: &[u8]) -> Result<GicInfo, &'static str> {
    let fdt = fdt::Fdt::new(dtb).map_err(|_| "devicetree does not parse")?;
    let info = if let Some(n) = fdt.find_compatible(&["arm,gic-v3"]) {
        let mut reg = n.reg().ok_or("GICv3 without reg")?;
        let d = reg.next().ok_or("GICv3 reg: no distributor")?;
        let r = reg.next().ok_or("GICv3 reg: no redistributor")?;
        GicInfo::V3 {
            gicd: d.starting_address as u64,
            gicr: r.starting_address as u64,
        }
    } else if let Some(n) = fdt.find_compatible(&["arm,cortex-a15-gic", "arm,gic-400"]) {
        let mut reg = n.reg().ok_or("GICv2 without reg")?;
        let d = reg.next().ok_or("GICv2 reg: no distributor")?;
        let c = reg.next().ok_or("GICv2 reg: no CPU interface")?;
        GicInfo::V2 {
            gicd: d.starting_address as u64,
            gicc: c.starting_address as u64,
        }
    } else {
        return Err("no arm,gic-v3 or arm,cortex-a15-gic node");
    };
    let _irq = IrqGuard::<Aarch64Daif>::new();
    let mut gic = GIC.lock();
    if gic.is_some() {
        return Ok(info);
    }
    let mut g = match info {
        GicInfo::V2 { gicd, gicc } => {
            // SAFETY: the devicetree's GIC registers, mapped as device memory by `mmu`, used
            // by nothing else (this is the only GIC driver instance: guarded by `GIC`).
            Gic::V2(unsafe { GicV2::new(gicd as *mut _, gicc as *mut _) })
        }
        GicInfo::V3 { gicd, gicr } => {
            let d = NonNull::new(gicd as *mut _).ok_or("GICD at 0")?;
            let r = NonNull::new(gicr as *mut _).ok_or("GICR at 0")?;
            // SAFETY: as above; only CPU 0's redistributor is configured (the firmware runs
            // on CPU 0 only).
            let v3 = unsafe { GicV3::new(UniqueMmioPointer::new(d), r, 1) }
                .map_err(|_| "GICv3 redistributors")?;
            Gic::V3(v3)
        }
    };
    match &mut g {
        Gic::V2(v2) => {
            v2.setup();
            v2.enable_all_interrupts(false);
        }
        Gic::V3(v3) => {
            v3.setup(0);
            v3.enable_all_interrupts(false);
            // ICC_PMR_EL1 resets to 0, which masks every priority: let all through (as
            // `GicV2::setup` does with GICC_PMR).
            GicCpuInterface::set_priority_mask(0xff);
        }
    }
    *gic = Some(g);
    Ok(info)
}

/// Registers `handler` for `intid` and enables it in the GIC (level-sensitive, CPU 0), or,
/// with `handler` `None`, disables it and drops its handler.
pub fn set_handler(intid: u32, handler: Option<fn()>) -> Result<(), &'static str> {
    let _irq = IrqGuard::<Aarch64Daif>::new();
    let mut table = HANDLERS.lock();
    for e in table.iter_mut() {
        if e.is_some_and(|(i, _)| i == intid) {
            *e = None;
        }
    }
    if let Some(h) = handler {
        let free = table
            .iter_mut()
            .find(|e| e.is_none())
            .ok_or("handler table full")?;
        *free = Some((intid, h));
    }
    drop(table);
    enable_line(intid, handler.is_some())
}

fn enable_line(intid: u32, enable: bool) -> Result<(), &'static str> {
    let mut gic = GIC.lock();
    let id = int_id(intid).ok_or("INTID out of range")?;
    match gic.as_mut().ok_or("GIC not set up")? {
        Gic::V2(v2) => v2.enable_interrupt(id, enable).map_err(|_| "GICv2 enable"),
        Gic::V3(v3) => v3
            .enable_interrupt(id, Some(0), enable)
            .map_err(|_| "GICv3 enable"),
    }
}

/// The `IntId` of a raw INTID (SGI, PPI or SPI).
fn int_id(intid: u32) -> Option<IntId> {
    match intid {
        0..16 => Some(IntId::sgi(intid)),
        16..32 => Some(IntId::ppi(intid - 16)),
        32..1020 => Some(IntId::spi(intid - 32)),
        _ => None,
    }
}

/// Routes SPI `intid` to CPU 0 on a GICv2 (`GICD_ITARGETSR`): arm-gic leaves the targets as
/// they are, and an SPI with no target is never delivered.
pub fn target_cpu0(info: GicInfo, intid: u32) {
    if let GicInfo::V2 { gicd, .. } = info {
        if (32..1020).contains(&intid) {
            let reg = (gicd + 0x800 + u64::from(intid)) as *mut u8;
            // SAFETY: GICD_ITARGETSR<n> byte of this SPI inside the distributor's 64 KiB frame,
            // device memory; byte access is allowed for ITARGETSR.
            unsafe { reg.write_volatile(1) };
        }
    }
}

/// The IRQ entry (from the exception vector, IRQs masked): acknowledges the highest pending
/// interrupt, runs its handler, ends it. Returns false when the GIC is not set up.
pub fn handle_irq() -> bool {
    let Some(mut gic) = GIC.try_lock() else {
        return false;
    };
    let Some(g) = gic.as_mut() else {
        return false;
    };
    let (intid, group) = match g {
        Gic::V2(v2) => (
            v2.get_and_acknowledge_interrupt(InterruptGroup::Group0),
            InterruptGroup::Group0,
        ),
        Gic::V3(_) => (
            GicCpuInterface::get_and_acknowledge_interrupt(InterruptGroup::Group1),
            InterruptGroup::Group1,
        ),
    };
    let Some(intid) = intid else {
        // Spurious (1023): nothing to end.
        return true;
    };
    TAKEN.fetch_add(1, Ordering::Relaxed);
    let raw = u32::from(intid);
    let handler = HANDLERS
        .try_lock()
        .and_then(|t| t.iter().flatten().find(|(i, _)| *i == raw).map(|(_, h)| *h));
    match handler {
        Some(h) => h(),
        None => {
            UNHANDLED.fetch_add(1, Ordering::Relaxed);
            let _ = match g {
                Gic::V2(v2) => v2.enable_interrupt(intid, false).map_err(|_| ()),
                Gic::V3(v3) => v3.enable_interrupt(intid, Some(0), false).map_err(|_| ()),
            };
        }
    }
    match g {
        Gic::V2(v2) => v2.end_interrupt(intid, group),
        Gic::V3(_) => GicCpuInterface::end_interrupt(intid, group),
    }
    true
}

/// The virtual timer's handler: stops the timer (which lowers its level) and records that it
/// fired.
fn timer_irq() {
    crate::arch::set_cntv_ctl(0);
    TIMER_FIRED.store(true, Ordering::SeqCst);
}

/// Enables the virtual timer's interrupt (for [`wait_for`]'s bound), its INTID read from the
/// devicetree `dtb` ([`crate::arch_timer`]). Returns that INTID.
///
/// # Errors
///
/// The timer's interrupts are not found in the devicetree ([`crate::arch_timer::intids`]), or
/// [`set_handler`] refuses (no GIC, no free handler entry).
pub fn enable_timer(dtb: &[u8]) -> Result<u32, &'static str> {
    let intid = crate::arch_timer::intids(dtb)?.el1_virtual;
    set_handler(intid, Some(timer_irq))?;
    Ok(intid)
}

/// Waits in `wfi` until `done()` (checked with IRQs masked, so a wake-up is never missed: a
/// pending IRQ wakes `wfi` even while masked, and is taken in the window right after) or `ms`
/// milliseconds have passed (the virtual timer's interrupt wakes the CPU then; enable it with
/// [`enable_timer`]). Returns whether `done()` held, and how many `wfi`s it took.
pub fn wait_for(ms: u64, mut done: impl FnMut() -> bool) -> (bool, u32) {
    use virtio_iommu_driver::irq::InterruptControl;
    let deadline = crate::timer::Deadline::after_ms(ms);
    let saved = Aarch64Daif::mask();
    TIMER_FIRED.store(false, Ordering::SeqCst);
    crate::arch::set_cntv_tval(crate::timer::ms_to_ticks(ms).min(u64::from(u32::MAX >> 1)) as u32);
    crate::arch::set_cntv_ctl(1);
    let mut wfis = 0;
    let ok = loop {
        if done() {
            break true;
        }
        if deadline.expired() || TIMER_FIRED.load(Ordering::SeqCst) {
            break false;
        }
        crate::arch::wfi();
        wfis += 1;
        crate::arch::irq_window();
    };
    crate::arch::set_cntv_ctl(0);
    Aarch64Daif::restore(saved);
    (ok, wfis)
}
