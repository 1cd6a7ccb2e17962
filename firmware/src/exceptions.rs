//! Exception vectors (from aarch64-rt) and the panic handler.
//!
//! An IRQ goes to `gic::handle_irq` (with the FP/SIMD state saved: [`irq_saving_fp`]) once
//! `gic::init` ran; every other exception, and an IRQ nobody expects, is reported with its
//! vector, ESR_EL1, ELR_EL1 and FAR_EL1 and the run ends with status 3. A panic prints its
//! message and location and ends with status 2.

use aarch64_rt::{exception_handlers, ExceptionHandlers, RegisterStateRef};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

/// Exit status after an unexpected exception.
pub const EXCEPTION_EXIT_CODE: i32 = 3;
/// Exit status after a panic.
pub const PANIC_EXIT_CODE: i32 = 2;

exception_handlers!(Exceptions);

/// The handlers registered with aarch64-rt.
struct Exceptions;

/// Reports an unexpected exception and ends the run.
fn unexpected(kind: &str, state: &RegisterStateRef<'_>) -> ! {
    if crate::exit::in_progress() {
        // The semihosting or PSCI call of an exit trapped: try the next way out.
        crate::exit::continue_after_trap();
    }
    let esr = crate::arch::esr_el1();
    crate::console::emergency_print(format_args!(
        "\nexception: {kind}: ESR_EL1={esr:#010x} (EC={:#04x}) ELR_EL1={:#x} FAR_EL1={:#x} SPSR_EL1={:#x}\n",
        esr >> 26,
        state.elr,
        crate::arch::far_el1(),
        state.spsr,
    ));
    crate::exit::exit(EXCEPTION_EXIT_CODE)
}

impl ExceptionHandlers for Exceptions {
    extern "C" fn sync_current(state: RegisterStateRef) {
        unexpected("synchronous, current EL", &state)
    }

    extern "C" fn irq_current(state: RegisterStateRef) {
        // Nothing but this call runs outside `irq_saving_fp`: no code of this function can
        // touch an FP/SIMD register before they are saved.
        // SAFETY: called from the IRQ vector with the interrupted code's registers x0–x18,
        // x29, x30, ELR and SPSR saved by aarch64-rt; `irq_saving_fp` is a C-ABI function
        // that saves and restores every FP/SIMD register and FPCR/FPSR around `irq_handler`.
        unsafe { irq_saving_fp(state) }
    }

    extern "C" fn fiq_current(state: RegisterStateRef) {
        unexpected("FIQ, current EL", &state)
    }

    extern "C" fn serror_current(state: RegisterStateRef) {
        unexpected("SError, current EL", &state)
    }

    extern "C" fn sync_lower(state: RegisterStateRef) {
        unexpected("synchronous, lower EL", &state)
    }

    extern "C" fn irq_lower(state: RegisterStateRef) {
        unexpected("IRQ, lower EL", &state)
    }

    extern "C" fn fiq_lower(state: RegisterStateRef) {
        unexpected("FIQ, lower EL", &state)
    }

    extern "C" fn serror_lower(state: RegisterStateRef) {
        unexpected("SError, lower EL", &state)
    }
}

/// The IRQ handler proper. Expected only once `gic::init` ran (the `irq-*` cases, the tick
/// clock of `blk-bench`).
extern "C" fn irq_handler(state: RegisterStateRef) {
    if !crate::gic::handle_irq() {
        unexpected("IRQ, current EL", &state)
    }
}

/// Calls [`irq_handler`] with `state` (x0, passed through) and the interrupted code's FP/SIMD
/// state saved: q0–q31, FPCR and FPSR. aarch64-rt's vector saves only the general-purpose
/// registers, and an IRQ can interrupt code that uses SIMD registers (the target has NEON:
/// copies, sorts and checksums are vectorised), which any Rust code of the handler may clobber.
/// 544 bytes of stack (528 for the registers, 16 for its frame record).
///
/// # Safety
///
/// Called only as `Exceptions::irq_current` does: from the IRQ vector, with interrupts masked
/// (as the exception entry leaves them).
#[unsafe(naked)]
unsafe extern "C" fn irq_saving_fp(state: RegisterStateRef) {
    core::arch::naked_asm!(
        "sub sp, sp, #528",
        "stp q0, q1, [sp, #16]",
        "stp q2, q3, [sp, #48]",
        "stp q4, q5, [sp, #80]",
        "stp q6, q7, [sp, #112]",
        "stp q8, q9, [sp, #144]",
        "stp q10, q11, [sp, #176]",
        "stp q12, q13, [sp, #208]",
        "stp q14, q15, [sp, #240]",
        "stp q16, q17, [sp, #272]",
        "stp q18, q19, [sp, #304]",
        "stp q20, q21, [sp, #336]",
        "stp q22, q23, [sp, #368]",
        "stp q24, q25, [sp, #400]",
        "stp q26, q27, [sp, #432]",
        "stp q28, q29, [sp, #464]",
        "stp q30, q31, [sp, #496]",
        "mrs x9, fpcr",
        "mrs x10, fpsr",
        "stp x9, x10, [sp, #0]",
        "stp x29, x30, [sp, #-16]!",
        "mov x29, sp",
        "bl {handler}",
        "ldp x29, x30, [sp], #16",
        "ldp x9, x10, [sp, #0]",
        "msr fpcr, x9",
        "msr fpsr, x10",
        "ldp q0, q1, [sp, #16]",
        "ldp q2, q3, [sp, #48]",
        "ldp q4, q5, [sp, #80]",
        "ldp q6, q7, [sp, #112]",
        "ldp q8, q9, [sp, #144]",
        "ldp q10, q11, [sp, #176]",
        "ldp q12, q13, [sp, #208]",
        "ldp q14, q15, [sp, #240]",
        "ldp q16, q17, [sp, #272]",
        "ldp q18, q19, [sp, #304]",
        "ldp q20, q21, [sp, #336]",
        "ldp q22, q23, [sp, #368]",
        "ldp q24, q25, [sp, #400]",
        "ldp q26, q27, [sp, #432]",
        "ldp q28, q29, [sp, #464]",
        "ldp q30, q31, [sp, #496]",
        "add sp, sp, #528",
        "ret",
        handler = sym irq_handler,
    )
}

/// Set by the first panic, so a panic while reporting one exits straight away.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if !PANICKING.swap(true, Ordering::SeqCst) {
        match info.location() {
            Some(location) => crate::console::emergency_print(format_args!(
                "\npanic at {}:{}:{}: {}\n",
                location.file(),
                location.line(),
                location.column(),
                info.message()
            )),
            None => crate::console::emergency_print(format_args!("\npanic: {}\n", info.message())),
        }
    }
    crate::exit::exit(PANIC_EXIT_CODE)
}
