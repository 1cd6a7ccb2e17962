//! The only place with inline assembly: tiny wrappers around the AArch64 system registers and
//! instructions the rest of the firmware needs.

use core::arch::asm;

/// Reads a system register that has no side effects.
macro_rules! read_sysreg {
    ($name:literal) => {{
        let value: u64;
        // SAFETY: reading this system register at EL1 has no side effects and touches no memory.
        unsafe {
            asm!(concat!("mrs {}, ", $name), out(reg) value, options(nomem, nostack, preserves_flags));
        }
        value
    }};
}

/// `CNTPCT_EL0`: the physical count of the generic timer. Preceded by an `isb` so the read is not
/// hoisted above earlier instructions.
pub fn cntpct_el0() -> u64 {
    isb();
    read_sysreg!("cntpct_el0")
}

/// `CNTFRQ_EL0`: the generic timer frequency in Hz, as programmed by the platform.
pub fn cntfrq_el0() -> u64 {
    read_sysreg!("cntfrq_el0")
}

/// `ESR_EL1`: syndrome of the last exception taken to EL1.
pub fn esr_el1() -> u64 {
    read_sysreg!("esr_el1")
}

/// `FAR_EL1`: faulting virtual address of the last abort taken to EL1.
pub fn far_el1() -> u64 {
    read_sysreg!("far_el1")
}

/// `CurrentEL` shifted down: the exception level (0-3).
pub fn current_el() -> u64 {
    (read_sysreg!("CurrentEL") >> 2) & 3
}

/// `SCTLR_EL1`: system control register (MMU/cache enables).
pub fn sctlr_el1() -> u64 {
    read_sysreg!("sctlr_el1")
}

/// `TCR_EL1`: translation control register.
pub fn tcr_el1() -> u64 {
    read_sysreg!("tcr_el1")
}

/// Instruction synchronisation barrier.
pub fn isb() {
    // SAFETY: a barrier has no effect other than ordering.
    unsafe { asm!("isb", options(nostack, preserves_flags)) };
}

/// Waits for an interrupt (used to park the CPU when nothing else is possible).
pub fn wfi() {
    // SAFETY: `wfi` only suspends execution until an interrupt or other wake-up event.
    unsafe { asm!("wfi", options(nomem, nostack, preserves_flags)) };
}

/// The stack pointer of the calling function (inlined into it).
#[inline(always)]
pub fn stack_pointer() -> u64 {
    let sp: u64;
    // SAFETY: copying SP into a register has no side effects and touches no memory.
    unsafe { asm!("mov {}, sp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    sp
}

/// `CNTV_CTL_EL0`: bit 0 ENABLE, bit 1 IMASK of the EL1 virtual timer.
pub fn set_cntv_ctl(value: u64) {
    // SAFETY: writes the virtual timer's control register (EL0/EL1 accessible); no memory.
    unsafe { asm!("msr cntv_ctl_el0, {}", "isb", in(reg) value, options(nomem, nostack)) };
}

/// `CNTV_TVAL_EL0`: the virtual timer fires `ticks` counter ticks from now.
pub fn set_cntv_tval(ticks: u32) {
    // SAFETY: writes the virtual timer's down-counter; no memory.
    unsafe { asm!("msr cntv_tval_el0, {}", in(reg) u64::from(ticks), options(nomem, nostack)) };
}

/// `CNTP_CTL_EL0`: bit 0 ENABLE, bit 1 IMASK of the EL1 physical timer.
pub fn set_cntp_ctl(value: u64) {
    // SAFETY: writes the physical timer's control register, accessible at EL1 (`-M virt`
    // without `virtualization=on` has no EL2; with it the firmware runs at EL2 itself, where
    // the register is accessible too); no memory.
    unsafe { asm!("msr cntp_ctl_el0, {}", "isb", in(reg) value, options(nomem, nostack)) };
}

/// `CNTP_CVAL_EL0`: the physical timer fires when `CNTPCT_EL0` reaches `ticks`. The write
/// has taken effect (the timer's condition re-evaluated) when this returns.
pub fn set_cntp_cval(ticks: u64) {
    // SAFETY: writes the physical timer's compare value (accessible as `set_cntp_ctl`'s
    // register); no memory.
    unsafe { asm!("msr cntp_cval_el0, {}", "isb", in(reg) ticks, options(nomem, nostack)) };
}

/// Unmasks IRQs (PSTATE.I) until [`mask_irqs`]. Not `nomem`: handlers then run and change
/// memory.
pub fn unmask_irqs() {
    // SAFETY: the IRQ path (aarch64-rt's vector, then `exceptions::irq_saving_fp`) saves and
    // restores every general-purpose and FP/SIMD register and FPCR/FPSR of the interrupted
    // code; every lock an IRQ handler takes is taken elsewhere with IRQs masked (gic.rs).
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack)) };
}

/// Masks IRQs (PSTATE.I).
pub fn mask_irqs() {
    // SAFETY: setting PSTATE.I only defers IRQs.
    unsafe { asm!("msr daifset, #2", options(nostack)) };
}

/// Unmasks IRQs (PSTATE.I) for one instruction window, so a pending IRQ is taken here, then
/// masks them again. Not `nomem`: the handler runs in between and changes memory.
pub fn irq_window() {
    // SAFETY: the IRQ path (aarch64-rt's vector, then `exceptions::irq_saving_fp`) saves and
    // restores every general-purpose and FP/SIMD register and FPCR/FPSR of the interrupted code.
    unsafe {
        asm!(
            "msr daifclr, #2",
            "isb",
            "msr daifset, #2",
            options(nostack)
        )
    };
}
