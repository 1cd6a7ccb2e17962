//! Peak stack use of a piece of code, by painting: the boot stack below the caller's frame is
//! filled with a pattern, the code runs, and the lowest word that no longer holds the pattern
//! is its deepest write. The figure is the distance from the stack pointer at the call site, so
//! the caller's own frames (and the printing of the result) are not counted.
//!
//! Whatever else runs on the boot stack meanwhile is counted: an IRQ taken while the code runs
//! (the `irq:` cases, which measure their handler so) pushes its frames below the code's; any
//! other exception ends the run anyway.

use crate::arch::stack_pointer;

/// Bytes painted below the call site.
pub const PAINT: usize = 64 * 1024;
/// Bytes just below the call site left unpainted: room for the frames of [`paint`] and
/// [`lowest_touched`] (AArch64 has no red zone). Code that uses less than this is reported as
/// using `SKIP` bytes.
const SKIP: usize = 512;
const PATTERN: u64 = 0x5a5a_c3c3_a5a5_3c3c;

unsafe extern "C" {
    /// The boot stack, reserved by `aarch64_rt::entry!` (its lowest address).
    static boot_stack: u8;
}

/// Runs `f` and returns its result and its peak stack use in bytes (a multiple of 8, at least
/// `SKIP`), or `None` for the stack use when the boot stack below the call site is smaller
/// than [`PAINT`] bytes (then `f` runs unmeasured).
#[inline(always)]
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    let top = (stack_pointer() as usize) & !7;
    let bottom = &raw const boot_stack as usize;
    if top.saturating_sub(PAINT) < bottom {
        return (f(), None);
    }
    paint(top);
    let r = f();
    let used = top - lowest_touched(top);
    (r, Some(used))
}

/// Writes [`PATTERN`] over `top - PAINT .. top - SKIP`.
#[inline(never)]
fn paint(top: usize) {
    for at in (top - PAINT..top - SKIP).step_by(8) {
        // SAFETY: `measure` checked that `top - PAINT..top` lies in the boot stack, and `top` is
        // the caller's stack pointer: the range is below every live frame (this function's
        // frame is less than `SKIP` bytes), memory no Rust object occupies. Aligned (`top` is
        // rounded down to 8).
        unsafe { core::ptr::write_volatile(at as *mut u64, PATTERN) };
    }
}

/// The lowest address in `top - PAINT .. top - SKIP` that no longer holds [`PATTERN`], or
/// `top - SKIP` when none.
#[inline(never)]
fn lowest_touched(top: usize) -> usize {
    (top - PAINT..top - SKIP)
        .step_by(8)
        // SAFETY: as in `paint`: boot-stack memory below every live frame, aligned.
        .find(|&at| unsafe { core::ptr::read_volatile(at as *const u64) } != PATTERN)
        .unwrap_or(top - SKIP)
}
