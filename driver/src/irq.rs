//! Interrupts: masking them around the driver's locks, and what an interrupt handler may call.
//!
//! # The rule
//!
//! A spin lock taken by an interrupt handler must be taken everywhere else **with interrupts
//! masked on this CPU**: otherwise the handler can interrupt the lock's holder on the same CPU
//! and spin forever on a lock that will never be released. This concerns the lock around the
//! IOMMU driver (the `IOMMU` static of `dma_context!`), and every
//! `DmaSpace` lock when a device driver's interrupt handler shares or unshares buffers
//! (`IommuHal::share`/`unshare` lock the IOMMU and the space).
//!
//! - Mask with an [`InterruptControl`] the embedder implements (or one of the ready ones, each
//!   built only on its own architecture: `Aarch64Daif`, `Riscv64Sie`, `X86If`); [`IrqGuard`]
//!   masks for its lifetime and restores the previous state on drop, so guards nest.
//! - `IrqMutex` (feature `alloc`) is a spin lock that masks while held, and
//!   `dma_context!` takes `irq: Type` to mask around the DMA locks
//!   (`dma::with_locked_irq`).
//! - Lock order stays: IOMMU, then a space; mask before taking the first.
//!
//! # What a handler may call
//!
//! Allocation-free, bounded, never waiting for the device — may run in an interrupt handler:
//! [`VirtIOIommu::handle_interrupt`](crate::VirtIOIommu::handle_interrupt),
//! [`ack_interrupt`](crate::VirtIOIommu::ack_interrupt),
//! [`process_completions`](crate::VirtIOIommu::process_completions),
//! [`poll_nb`](crate::VirtIOIommu::poll_nb),
//! [`poll_probe_nb`](crate::VirtIOIommu::poll_probe_nb),
//! [`discard_nb`](crate::VirtIOIommu::discard_nb),
//! [`poll_event`](crate::VirtIOIommu::poll_event),
//! [`set_interrupts`](crate::VirtIOIommu::set_interrupts), the getters.
//!
//! Not from a handler: every method that waits for the device — the synchronous requests
//! (`attach`, `map`, `unmap`, `probe`, `request_raw`, …), [`crate::Batch::submit`],
//! [`wait_nb`](crate::VirtIOIommu::wait_nb),
//! [`wait_probe_nb`](crate::VirtIOIommu::wait_probe_nb) — because they spin for up to the
//! [`crate::WaitPolicy`]'s budget (and, with interrupts masked, nothing else runs on that CPU
//! meanwhile); `VirtIOIommu::new` and drop (they allocate or free and reset the device);
//! `probe_reserved_regions` (allocates). `submit_nb` (and `submit_probe_nb`) never waits and
//! does not allocate, but it validates and posts: call it from a handler only if the embedder accepts a notification
//! (one register write) there. Through the DMA glue, a device driver's `share`/`unshare` in a
//! handler sends a synchronous MAP/UNMAP, which waits: avoid it (or accept the wait) — and
//! then every other taker of those locks must mask.

use core::marker::PhantomData;

/// Masks and restores this CPU's interrupts. Implemented by the embedder (or use a ready one:
/// `Aarch64Daif`, `Riscv64Sie`, `X86If`; [`NoInterruptControl`] where no handler takes
/// the driver's locks).
///
/// `mask` must return the state before masking, and `restore` must put exactly that state
/// back, so that nested guards restore correctly.
pub trait InterruptControl {
    /// What [`Self::mask`] saw, for [`Self::restore`].
    type Saved: Copy;
    /// Masks the interrupts of this CPU that can run a handler taking the driver's locks;
    /// returns the previous state.
    fn mask() -> Self::Saved;
    /// Puts back the state `saved` returned by [`Self::mask`].
    fn restore(saved: Self::Saved);
}

/// Masks nothing: for embedders whose interrupt handlers never take the driver's locks (or that
/// poll, as the driver does by default), and for host tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoInterruptControl;

impl InterruptControl for NoInterruptControl {
    type Saved = ();
    fn mask() {}
    fn restore(_: ()) {}
}

/// Masks interrupts while alive (through `I`), restores the earlier state on drop.
#[must_use = "interrupts are restored as soon as the guard is dropped"]
pub struct IrqGuard<I: InterruptControl> {
    saved: I::Saved,
    // Not Send: the state is this CPU's.
    _cpu: PhantomData<*const ()>,
}

impl<I: InterruptControl> IrqGuard<I> {
    /// Masks interrupts until the guard is dropped.
    pub fn new() -> Self {
        Self {
            saved: I::mask(),
            _cpu: PhantomData,
        }
    }
}

impl<I: InterruptControl> Default for IrqGuard<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I: InterruptControl> Drop for IrqGuard<I> {
    fn drop(&mut self) {
        I::restore(self.saved);
    }
}

/// Runs `f` with interrupts masked through `I`.
pub fn without_interrupts<I: InterruptControl, R>(f: impl FnOnce() -> R) -> R {
    let _guard = IrqGuard::<I>::new();
    f()
}

/// AArch64: masks IRQ and FIQ (`PSTATE.I`, `PSTATE.F` through DAIFSet); restores DAIF.
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Aarch64Daif;

#[cfg(target_arch = "aarch64")]
impl InterruptControl for Aarch64Daif {
    type Saved = u64;
    fn mask() -> u64 {
        let daif: u64;
        // SAFETY: reads DAIF and sets its I and F bits; touches no memory (the asm is also a
        // compiler barrier, so memory accesses of the critical section stay after it).
        unsafe {
            core::arch::asm!("mrs {0}, daif", "msr daifset, #3", out(reg) daif, options(nostack));
        }
        daif
    }
    fn restore(saved: u64) {
        // SAFETY: writes back a DAIF value read by `mask`; touches no memory.
        unsafe {
            core::arch::asm!("msr daif, {0}", in(reg) saved, options(nostack));
        }
    }
}

/// RISC-V (S-mode): clears `sstatus.SIE`; restores it if it was set.
#[cfg(target_arch = "riscv64")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Riscv64Sie;

#[cfg(target_arch = "riscv64")]
impl InterruptControl for Riscv64Sie {
    type Saved = bool;
    fn mask() -> bool {
        let old: usize;
        // SAFETY: atomically clears sstatus.SIE (bit 1) and reads the old value; no memory.
        unsafe {
            core::arch::asm!("csrrci {0}, sstatus, 2", out(reg) old, options(nostack));
        }
        old & 2 != 0
    }
    fn restore(was_enabled: bool) {
        if was_enabled {
            // SAFETY: sets sstatus.SIE, which `mask` found set; no memory.
            unsafe {
                core::arch::asm!("csrsi sstatus, 2", options(nostack));
            }
        }
    }
}

/// x86-64: `cli`; restores `RFLAGS.IF` (`sti`) if it was set.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, Default)]
pub struct X86If;

#[cfg(target_arch = "x86_64")]
impl InterruptControl for X86If {
    type Saved = bool;
    fn mask() -> bool {
        let flags: u64;
        // SAFETY: pushes RFLAGS on the stack, pops it into a register, clears IF (ring 0; the
        // embedder runs the driver in the kernel).
        unsafe {
            core::arch::asm!("pushfq", "pop {0}", "cli", out(reg) flags);
        }
        flags & (1 << 9) != 0
    }
    fn restore(was_enabled: bool) {
        if was_enabled {
            // SAFETY: sets IF, which `mask` found set.
            unsafe {
                core::arch::asm!("sti", options(nostack));
            }
        }
    }
}

/// A spin lock that masks interrupts (through `I`) while held, for state an interrupt handler
/// shares: the handler can never find it held by the code it interrupted on the same CPU.
/// Spins while another CPU holds it.
#[cfg(feature = "alloc")]
pub struct IrqMutex<T, I: InterruptControl> {
    inner: spin::Mutex<T>,
    _irq: PhantomData<fn() -> I>,
}

#[cfg(feature = "alloc")]
impl<T, I: InterruptControl> IrqMutex<T, I> {
    /// A lock around `value`.
    pub const fn new(value: T) -> Self {
        Self {
            inner: spin::Mutex::new(value),
            _irq: PhantomData,
        }
    }

    /// Masks interrupts, then takes the lock; both are undone when the guard is dropped (the
    /// lock first).
    pub fn lock(&self) -> IrqMutexGuard<'_, T, I> {
        let irq = IrqGuard::new();
        IrqMutexGuard {
            guard: self.inner.lock(),
            _irq: irq,
        }
    }

    /// Masks interrupts and takes the lock if it is free (`None`, interrupts restored, if
    /// not): for a handler on a machine where another CPU may hold it.
    pub fn try_lock(&self) -> Option<IrqMutexGuard<'_, T, I>> {
        let irq = IrqGuard::new();
        self.inner
            .try_lock()
            .map(|guard| IrqMutexGuard { guard, _irq: irq })
    }

    /// The lock itself, for APIs that take a `spin::Mutex` (such as
    /// `dma::with_locked_irq`, which masks through its own `I`). Locking it directly
    /// does not mask.
    pub fn as_spin(&self) -> &spin::Mutex<T> {
        &self.inner
    }
}

/// The guard of an [`IrqMutex`]: the lock, and interrupts masked.
#[cfg(feature = "alloc")]
pub struct IrqMutexGuard<'a, T, I: InterruptControl> {
    // Field order: the lock is released before interrupts are restored.
    guard: spin::MutexGuard<'a, T>,
    _irq: IrqGuard<I>,
}

#[cfg(feature = "alloc")]
impl<T, I: InterruptControl> core::ops::Deref for IrqMutexGuard<'_, T, I> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

#[cfg(feature = "alloc")]
impl<T, I: InterruptControl> core::ops::DerefMut for IrqMutexGuard<'_, T, I> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::cell::Cell;

    std::thread_local! {
        static MASKED: Cell<bool> = const { Cell::new(false) };
        static MASKS: Cell<u32> = const { Cell::new(0) };
    }

    /// A fake CPU flag.
    struct Fake;
    impl InterruptControl for Fake {
        type Saved = bool;
        fn mask() -> bool {
            MASKS.with(|m| m.set(m.get() + 1));
            MASKED.with(|m| m.replace(true))
        }
        fn restore(saved: bool) {
            MASKED.with(|m| m.set(saved));
        }
    }

    fn masked() -> bool {
        MASKED.with(Cell::get)
    }

    #[test]
    fn guards_nest_and_restore_the_outer_state() {
        assert!(!masked());
        {
            let _a = IrqGuard::<Fake>::new();
            assert!(masked());
            {
                let _b = IrqGuard::<Fake>::new();
                assert!(masked());
            }
            assert!(
                masked(),
                "the inner guard must restore 'masked', not unmask"
            );
        }
        assert!(!masked());
    }

    #[test]
    fn irq_mutex_masks_while_held_and_not_after() {
        let m: IrqMutex<u32, Fake> = IrqMutex::new(1);
        {
            let mut g = m.lock();
            *g += 1;
            assert!(masked());
            assert!(m.try_lock().is_none(), "held: try_lock fails");
            assert!(masked(), "a failed try_lock restores the state it found");
        }
        assert!(!masked());
        assert_eq!(*m.lock(), 2);
        assert!(!masked());
        let before = MASKS.with(Cell::get);
        without_interrupts::<Fake, _>(|| assert!(masked()));
        assert_eq!(MASKS.with(Cell::get), before + 1);
        assert!(!masked());
    }
}
