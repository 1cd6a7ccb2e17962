//! Where the driver keeps its large state (the virtqueues' bookkeeping, the batch and event
//! tables): with feature `alloc`, each piece in its own heap allocation, built there without
//! passing through the stack as a whole where possible; without `alloc`, inline.
//!
//! Why: virtio-drivers' `VirtQueue<H, SIZE>` holds a shadow of the descriptor table inline
//! (16 bytes per descriptor, and with virtio-drivers' own `alloc` feature 16 more per
//! descriptor for indirect lists), so a 256-descriptor `requestq` is 4 KiB (8 KiB) by value, and
//! the batch table is 4 KiB. Kept inline, `VirtIOIommu` was over 10 KiB by value, and building
//! it needed several copies of that on the stack (see BENCHMARKS.md, "Stack use of the
//! driver"). Held here, `VirtIOIommu` is a few hundred bytes.

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

#[cfg(feature = "alloc")]
use alloc::boxed::Box;

/// A value of the driver's large state: `Box<T>` with feature `alloc`, `T` inline without.
#[cfg(feature = "alloc")]
pub(crate) type Held<T> = Box<T>;
/// A value of the driver's large state: `Box<T>` with feature `alloc`, `T` inline without.
#[cfg(not(feature = "alloc"))]
pub(crate) type Held<T> = Inline<T>;

/// `T` inline, with the same `Deref` interface as `Box<T>`.
#[cfg(not(feature = "alloc"))]
pub(crate) struct Inline<T>(T);

#[cfg(not(feature = "alloc"))]
impl<T> core::ops::Deref for Inline<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(not(feature = "alloc"))]
impl<T> core::ops::DerefMut for Inline<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// `value`, held (for small values: it passes through the stack).
pub(crate) fn held<T>(value: T) -> Held<T> {
    #[cfg(feature = "alloc")]
    {
        Box::new(value)
    }
    #[cfg(not(feature = "alloc"))]
    {
        Inline(value)
    }
}

/// `[value; N]`, held. With `alloc` it is built on the heap element by element, never on the
/// stack.
pub(crate) fn held_array<T: Copy, const N: usize>(value: T) -> Held<[T; N]> {
    #[cfg(feature = "alloc")]
    {
        let slice: Box<[T]> = alloc::vec![value; N].into_boxed_slice();
        match slice.try_into() {
            Ok(array) => array,
            // `vec![value; N]` has exactly N elements.
            Err(_) => unreachable!("a boxed slice of N elements is a boxed [T; N]"),
        }
    }
    #[cfg(not(feature = "alloc"))]
    {
        Inline([value; N])
    }
}

/// A virtqueue the driver owns, held (see the module documentation). virtio-drivers'
/// `VirtQueue::new` returns the queue inside a `Result`; the whole `Result` is held so that it
/// can be written into its allocation directly, and only an `Ok` one is ever kept.
pub(crate) struct HeldQueue<H: Hal, const SIZE: usize>(
    Held<virtio_drivers::Result<VirtQueue<H, SIZE>>>,
);

impl<H: Hal, const SIZE: usize> HeldQueue<H, SIZE> {
    /// `VirtQueue::new(transport, idx, false, false)`: no indirect descriptors, no event index.
    ///
    /// Errors: those of `VirtQueue::new` (queue already used, `max_queue_size` below `SIZE`,
    /// DMA allocation failure).
    #[inline(never)]
    pub(crate) fn new<T: Transport>(transport: &mut T, idx: u16) -> virtio_drivers::Result<Self> {
        #[cfg(feature = "alloc")]
        let queue = {
            let mut slot = Box::new_uninit();
            new_queue_into(&mut slot, transport, idx);
            // SAFETY: `new_queue_into` initialised `*slot` (it has no other return path).
            unsafe { slot.assume_init() }
        };
        #[cfg(not(feature = "alloc"))]
        let queue = {
            let mut slot = core::mem::MaybeUninit::uninit();
            new_queue_into(&mut slot, transport, idx);
            // SAFETY: `new_queue_into` initialised `slot` (it has no other return path).
            Inline(unsafe { slot.assume_init() })
        };
        if let Err(e) = &*queue {
            return Err(*e);
        }
        Ok(Self(queue))
    }
}

/// Writes `VirtQueue::new(transport, idx, false, false)` into `slot`. Never inlined, and the
/// destination passed in: virtio-drivers assembles the queue in this function's frame (one
/// copy of it, plus its descriptor shadow) and writes it straight into `slot` — the heap
/// allocation. Returning it instead put a second copy in the caller's frame; inlining it put
/// both into `VirtIOIommu::new`'s.
#[inline(never)]
fn new_queue_into<H: Hal, T: Transport, const SIZE: usize>(
    slot: &mut core::mem::MaybeUninit<virtio_drivers::Result<VirtQueue<H, SIZE>>>,
    transport: &mut T,
    idx: u16,
) {
    slot.write(VirtQueue::new(transport, idx, false, false));
}

impl<H: Hal, const SIZE: usize> core::ops::Deref for HeldQueue<H, SIZE> {
    type Target = VirtQueue<H, SIZE>;
    fn deref(&self) -> &VirtQueue<H, SIZE> {
        match &*self.0 {
            Ok(q) => q,
            Err(_) => unreachable!("HeldQueue::new keeps only Ok queues"),
        }
    }
}

impl<H: Hal, const SIZE: usize> core::ops::DerefMut for HeldQueue<H, SIZE> {
    fn deref_mut(&mut self) -> &mut VirtQueue<H, SIZE> {
        match &mut *self.0 {
            Ok(q) => q,
            Err(_) => unreachable!("HeldQueue::new keeps only Ok queues"),
        }
    }
}
