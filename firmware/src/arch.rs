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

/// Leaves EL2 for EL1 if the firmware was entered at EL2 (`-M virt,virtualization=on`), so that
/// it runs as it does on a machine without EL2. Returns the exception level it was entered at
/// (1: nothing was done; 2: it now runs at EL1).
///
/// What EL1 finds is what aarch64-rt's entry code (feature `el1`) set up before `main`: the
/// EL1&0 translation regime (TTBR0/TCR/MAIR/SCTLR_EL1, the identity map of `crate::mmu`) and
/// VBAR_EL1, which had no effect at EL2; the same stack (SP_EL1 = the current SP); PSTATE.DAIF
/// all masked, as at reset. EL2 stays as a hypervisor that does nothing:
/// - HCR_EL2 = RW only: EL1 is AArch64; no stage 2 (VM clear), no traps; IMO/FMO/AMO and TGE
///   clear, so IRQs, FIQs and SErrors are taken at EL1;
/// - CNTHCTL_EL2 = EL1PCTEN | EL1PCEN: EL1 may use the physical counter and timer
///   (`crate::tick`); CNTVOFF_EL2 = 0: virtual time is physical time (`crate::gic::wait_for`);
/// - CPTR_EL2 = 0x33ff (its RES1 bits on a CPU without SVE/SME; with them, bits 8 and 12 set
///   keep SVE/SME trapped, which the firmware does not use): FP/SIMD not trapped;
/// - VPIDR_EL2/VMPIDR_EL2 = MIDR_EL1/MPIDR_EL1: EL1 reads the real IDs;
/// - with a GICv3 CPU interface (ID_AA64PFR0_EL1.GIC ≠ 0), ICC_SRE_EL2.{SRE, Enable} set: EL1
///   may use the system-register interface (`arm-gic`'s GICv3 driver does).
///
/// Every exception level the firmware can be entered at on `-M virt` is 1, 2 or 3 (QEMU enters
/// an ELF at EL2 with `virtualization=on` and `secure=off`, at EL3 with `secure=on`); at EL3 it
/// does nothing either. VBAR_EL2 is not set: nothing traps to EL2 after this (no HVC is made:
/// QEMU's PSCI conduit is SMC with `virtualization=on`), and a trap would hang until the
/// runner's timeout.
///
/// # Safety
///
/// Called once, first thing in `main`, with aarch64-rt's `el1` entry code having set up the
/// EL1&0 regime (an identity map covering the image and the stack as Normal memory) and
/// VBAR_EL1, and with nothing set up that depends on the exception level. PSTATE.DAIF is all
/// masked afterwards, whatever it was.
pub unsafe fn leave_el2() -> u64 {
    let entered = current_el();
    if entered != 2 {
        return entered;
    }
    // SAFETY: the caller's contract (see `# Safety`) gives EL1 a translation regime and vector
    // that cover this code and its stack. Runs at EL2 (checked above), where every register
    // written is accessible; the ICC_SRE_EL2 access is made only when ID_AA64PFR0_EL1 reports
    // the GICv3 system-register interface (else it would be UNDEFINED). The `eret` continues at label 1 of this block at
    // EL1h with the same general-purpose registers and the same SP value (written to SP_EL1),
    // so to the compiler the block is a plain sequence that clobbers x9; memory is untouched
    // (the stack is not used in between) and the code's mapping does not change: EL2's regime
    // has the MMU off (VA = PA) and EL1's is the identity map of `crate::mmu`, which covers the
    // image and stack as Normal memory. IRQs stay masked throughout (SPSR_EL2.DAIF all set).
    unsafe {
        asm!(
            "mrs x9, id_aa64pfr0_el1",
            "ubfx x9, x9, #24, #4",
            "cbz x9, 2f",
            // ICC_SRE_EL2 (S3_4_C12_C9_5): SRE (bit 0) and Enable (bit 3).
            "mrs x9, s3_4_c12_c9_5",
            "orr x9, x9, #0x1",
            "orr x9, x9, #0x8",
            "msr s3_4_c12_c9_5, x9",
            "isb",
            "2:",
            "mov x9, #(1 << 31)",
            "msr hcr_el2, x9",
            "mov x9, #3",
            "msr cnthctl_el2, x9",
            "msr cntvoff_el2, xzr",
            "mov x9, #0x33ff",
            "msr cptr_el2, x9",
            "mrs x9, midr_el1",
            "msr vpidr_el2, x9",
            "mrs x9, mpidr_el1",
            "msr vmpidr_el2, x9",
            "mov x9, sp",
            "msr sp_el1, x9",
            "adr x9, 1f",
            "msr elr_el2, x9",
            // SPSR_EL2: EL1h (M = 0b0101), D, A, I and F masked.
            "mov x9, #0x3c5",
            "msr spsr_el2, x9",
            "isb",
            "eret",
            "1:",
            out("x9") _,
            options(nostack),
        );
    }
    entered
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
