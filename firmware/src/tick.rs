//! A tick counter driven by the EL1 physical timer's interrupt: the cheap clock a kernel has
//! (Linux's `jiffies`), for the flush queue's time bound in `blk-bench`.
//!
//! Reading it is two memory loads and a multiplication. Reading the generic timer's counter
//! instead costs about 0.3 µs under TCG: QEMU ends the translated block at a counter read (an I/O register) and
//! goes back through its main loop. The time it gives is a multiple of the period, so a time
//! bound checked against it is good to one period (it may fire up to one period early or late).
//!
//! Only one user at a time (the bench); the IRQ lock rule of `gic.rs` applies.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use virtio_iommu_driver::dma::Clock;

/// Ticks since [`start`].
static TICKS: AtomicU64 = AtomicU64::new(0);
/// The period in counter ticks and in nanoseconds (0: not started).
static PERIOD_COUNTS: AtomicU64 = AtomicU64::new(0);
static PERIOD_NS: AtomicU64 = AtomicU64::new(0);
/// The counter value of the next tick.
static NEXT: AtomicU64 = AtomicU64::new(0);
/// The physical timer's INTID, from the devicetree at [`start`] (0: not started).
static INTID: AtomicU32 = AtomicU32::new(0);

/// The tick counter as a [`Clock`]: nanoseconds, in steps of the period.
#[derive(Clone, Copy, Debug)]
pub struct TickClock;

impl Clock for TickClock {
    fn now_ns(&self) -> u64 {
        TICKS
            .load(Ordering::Relaxed)
            .saturating_mul(PERIOD_NS.load(Ordering::Relaxed))
    }
}

/// The period in use, nanoseconds (whole counter ticks; 0 before [`start`]).
pub fn period_ns() -> u64 {
    PERIOD_NS.load(Ordering::Relaxed)
}

/// The tick clock's instance for `&'static dyn Clock` users.
pub static TICK_CLOCK: TickClock = TickClock;

/// Sets up the GIC (from the devicetree), starts ticking every `period_us` microseconds and
/// unmasks IRQs. Returns the period actually used, in nanoseconds (whole counter ticks).
///
/// # Errors
///
/// The firmware does not run at EL1 (at EL3 with `secure=on`, which `main` does not leave, no
/// IRQ would be taken and the clock would stand still); the GIC is not found or cannot take the
/// timer's interrupt; the devicetree does not give the timer's interrupts
/// ([`crate::arch_timer::intids`]); `period_us` is 0 or below one counter tick. Nothing is left
/// running then.
pub fn start(dtb: &[u8], period_us: u64) -> Result<u64, &'static str> {
    if crate::arch::current_el() != 1 {
        return Err(
            "the firmware does not run at EL1 (above it IRQs are not taken; use blk-bench-clock=counter)",
        );
    }
    let hz = crate::timer::ticks_per_second();
    let counts = u64::try_from(u128::from(period_us) * u128::from(hz) / 1_000_000)
        .map_err(|_| "tick period too long")?;
    if counts == 0 {
        return Err("tick period below one counter tick");
    }
    let period_ns = u64::try_from(u128::from(counts) * 1_000_000_000 / u128::from(hz))
        .map_err(|_| "tick period too long")?;
    crate::gic::init(dtb)?;
    let intid = crate::arch_timer::intids(dtb)?.el1_physical;
    TICKS.store(0, Ordering::Relaxed);
    PERIOD_COUNTS.store(counts, Ordering::Relaxed);
    PERIOD_NS.store(period_ns, Ordering::Relaxed);
    let next = crate::timer::now_ticks().saturating_add(counts);
    NEXT.store(next, Ordering::Relaxed);
    crate::arch::set_cntp_cval(next);
    crate::arch::set_cntp_ctl(1);
    if let Err(e) = crate::gic::set_handler(intid, Some(tick_irq)) {
        crate::arch::set_cntp_ctl(0);
        return Err(e);
    }
    INTID.store(intid, Ordering::Relaxed);
    crate::arch::unmask_irqs();
    Ok(period_ns)
}

/// Masks IRQs, stops the timer and drops its handler. Returns the ticks counted.
pub fn stop() -> u64 {
    crate::arch::mask_irqs();
    crate::arch::set_cntp_ctl(0);
    let intid = INTID.swap(0, Ordering::Relaxed);
    if intid != 0 {
        let _ = crate::gic::set_handler(intid, None);
    }
    TICKS.load(Ordering::Relaxed)
}

/// The timer's handler: one tick, the next one period after the previous deadline (no drift;
/// ticks missed while IRQs were masked are counted at once).
fn tick_irq() {
    let counts = PERIOD_COUNTS.load(Ordering::Relaxed).max(1);
    let now = crate::timer::now_ticks();
    let mut next = NEXT.load(Ordering::Relaxed);
    if next <= now {
        let ticks = (now - next) / counts + 1;
        TICKS.fetch_add(ticks, Ordering::Relaxed);
        next = next.saturating_add(ticks.saturating_mul(counts));
    }
    NEXT.store(next, Ordering::Relaxed);
    // A compare value in the future lowers the timer's level before the interrupt ends.
    crate::arch::set_cntp_cval(next);
}
