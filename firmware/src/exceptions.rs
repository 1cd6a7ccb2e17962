//! Exception vectors (from aarch64-rt) and the panic handler.
//!
//! Every exception is unexpected: it is reported with its vector, ESR_EL1, ELR_EL1 and FAR_EL1 and
//! the run ends with status 3. A panic prints its message and location and ends with status 2.

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
        // Expected only once `gic::init` ran (the `irq-*` cases).
        if !crate::gic::handle_irq() {
            unexpected("IRQ, current EL", &state)
        }
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
