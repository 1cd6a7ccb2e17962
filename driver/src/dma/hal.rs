//! [`IommuHal`]: the `Hal` adapter, and where it finds its state ([`DmaContext`],
//! [`with_locked`], [`dma_context!`](crate::dma_context)).

use super::mapper::IommuMapper;
use super::space::{DmaSpace, NO_CONTEXT_ADDRESS};
use crate::error::IommuError;
use crate::wire::MapFlags;
use core::marker::PhantomData;
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Where [`IommuHal`] finds its state. Implemented by the embedder on a zero-sized type, one
/// per device (endpoint); [`dma_context!`](crate::dma_context) writes the usual one.
pub trait DmaContext: 'static {
    /// The embedder's `Hal`, which allocates memory and gives physical addresses (and, for
    /// `share`, may bounce). Its physical addresses are what the IOVAs map to.
    type Inner: Hal;
    /// Runs `f` with exclusive access to the IOMMU driver and this device's [`DmaSpace`].
    ///
    /// # Errors
    ///
    /// `Err(IommuError::Broken)` (or another error) when the state is not set up; otherwise
    /// what `f` returns.
    fn with<R>(
        f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
    ) -> Result<R, IommuError>;
}

/// The body of a [`DmaContext::with`] over two statics: locks `iommu`, then `space` (always in
/// this order, see the module documentation) and runs `f`; [`IommuError::Broken`] when either
/// is `None`. Spins while another CPU holds a lock.
///
/// # Errors
///
/// [`IommuError::Broken`] when either static holds `None`; otherwise what `f` returns.
pub fn with_locked<M: IommuMapper, R>(
    iommu: &spin::Mutex<Option<M>>,
    space: &spin::Mutex<Option<DmaSpace>>,
    f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
) -> Result<R, IommuError> {
    let mut iommu = iommu.lock();
    let mut space = space.lock();
    match (iommu.as_mut(), space.as_mut()) {
        (Some(iommu), Some(space)) => f(iommu, space),
        _ => Err(IommuError::Broken),
    }
}

/// [`with_locked`] with this CPU's interrupts masked through `I` for the whole time both locks
/// are held (masked before the first is taken, restored after both are released): for DMA
/// contexts whose locks an interrupt handler also takes (see [`crate::irq`]).
///
/// # Errors
///
/// Those of [`with_locked`].
pub fn with_locked_irq<I: crate::irq::InterruptControl, M: IommuMapper, R>(
    iommu: &spin::Mutex<Option<M>>,
    space: &spin::Mutex<Option<DmaSpace>>,
    f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
) -> Result<R, IommuError> {
    let _irq = crate::irq::IrqGuard::<I>::new();
    with_locked(iommu, space, f)
}

/// Defines a zero-sized [`DmaContext`](crate::dma::DmaContext) type over two statics, a
/// `spin::Mutex<Option<M>>` holding the IOMMU driver (any [`IommuMapper`](crate::dma::IommuMapper))
/// and a `spin::Mutex<Option<DmaSpace>>` for the device, locked with
/// [`with_locked`](crate::dma::with_locked):
///
/// ```
/// # use virtio_iommu_device::inprocess::{InProcessTransport as PciTransport, TestHal as MyHal};
/// # use virtio_drivers::device::net::VirtIONetRaw;
/// use virtio_iommu_driver::dma::{spin::Mutex, AccessPlatform, DmaSpace, IommuHal};
/// use virtio_iommu_driver::VirtIOIommu;
///
/// static IOMMU: Mutex<Option<VirtIOIommu<MyHal, PciTransport>>> = Mutex::new(None);
/// static NET_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
/// virtio_iommu_driver::dma_context! {
///     /// DMA context of the network card.
///     pub struct NetDma { inner: MyHal, iommu: IOMMU, space: NET_DMA }
/// }
/// type Net = VirtIONetRaw<IommuHal<NetDma>, AccessPlatform<PciTransport>, 16>;
/// // With `irq: Type` (an `irq::InterruptControl`), interrupts are masked while the locks are
/// // held ([`with_locked_irq`](crate::dma::with_locked_irq)): for locks a handler also takes.
/// static NET2_DMA: Mutex<Option<DmaSpace>> = Mutex::new(None);
/// virtio_iommu_driver::dma_context! {
///     /// A second card, its locks interrupt-safe.
///     pub struct Net2Dma {
///         inner: MyHal, iommu: IOMMU, space: NET2_DMA,
///         irq: virtio_iommu_driver::irq::NoInterruptControl,
///     }
/// }
/// # // Without an installed IOMMU and space, the context reports the driver unusable.
/// # use virtio_iommu_driver::dma::DmaContext;
/// # assert_eq!(
/// #     NetDma::with(|_, _| Ok(())),
/// #     Err(virtio_iommu_driver::IommuError::Broken)
/// # );
/// # let _: Option<Net> = None;
/// ```
#[macro_export]
macro_rules! dma_context {
    ($(#[$attr:meta])* $vis:vis struct $name:ident {
        inner: $inner:ty,
        iommu: $iommu:path,
        space: $space:path $(,)?
    }) => {
        // Without `irq`: the same, masking nothing.
        $crate::dma_context! {
            $(#[$attr])* $vis struct $name {
                inner: $inner,
                iommu: $iommu,
                space: $space,
                irq: $crate::irq::NoInterruptControl,
            }
        }
    };
    ($(#[$attr:meta])* $vis:vis struct $name:ident {
        inner: $inner:ty,
        iommu: $iommu:path,
        space: $space:path,
        irq: $irq:ty $(,)?
    }) => {
        $(#[$attr])*
        $vis struct $name;

        impl $crate::dma::DmaContext for $name {
            type Inner = $inner;
            fn with<R>(
                f: impl FnOnce(
                    &mut dyn $crate::dma::IommuMapper,
                    &mut $crate::dma::DmaSpace,
                ) -> ::core::result::Result<R, $crate::IommuError>,
            ) -> ::core::result::Result<R, $crate::IommuError> {
                $crate::dma::with_locked_irq::<$irq, _, _>(&$iommu, &$space, f)
            }
        }
    };
}

/// A `Hal` for a device behind a virtio-iommu, over the embedder's `Hal` `C::Inner`: memory and
/// physical addresses come from `C::Inner`; the addresses given to the device are device
/// addresses in the device's domain, per its [`DmaSpace`]'s mode (see the module
/// documentation). In the strict modes mapping permissions follow the buffer direction:
/// driver-to-device buffers are READ-only, device-to-driver WRITE-only, `Both` and `dma_alloc`
/// READ|WRITE.
///
/// Failures cannot be reported through the `Hal` interface; they are logged and counted in
/// [`DmaSpace::failures`], and:
///
/// - a failed `share` undoes `C::Inner::share` (its `unshare` runs at once) and returns the start
///   of the space's [fault window](DmaSpace::fault_window), device addresses that reach no
///   memory in that mode; the later `unshare` of that address does nothing. When the context
///   itself is missing ([`DmaContext::with`] fails: the embedder did not install the space
///   before creating the device, which it must), no mode is known and `share` returns
///   [`NO_CONTEXT_ADDRESS`](super::NO_CONTEXT_ADDRESS), which no mode hands out;
/// - a failed `dma_alloc` frees the memory again and returns 0, which virtio-drivers' `Dma::new`
///   reads as failure;
/// - `unshare` always runs `C::Inner::unshare` (so a bounce buffer is copied back) once the
///   mapping is found, even when the UNMAP failed; the mapping's IOVAs (and bounce granules) are
///   then kept, never reused ([`DmaSpace::leaked`]). Under the lazy
///   [`UnmapPolicy`](super::UnmapPolicy) the UNMAP is deferred to a flush (the device keeps
///   access until then, see [`super::flush`]), whose failures are kept for
///   [`DmaSpace::take_flush_error`];
/// - a failed UNMAP in `dma_dealloc` leaks the memory (still mapped, so never reused) and
///   reports success: virtio-drivers 0.13's `Dma::drop` asserts that `dma_dealloc` returns 0.
///
/// No method panics.
pub struct IommuHal<C: DmaContext>(PhantomData<C>);

fn flags_for(direction: BufferDirection) -> MapFlags {
    match direction {
        BufferDirection::DriverToDevice => MapFlags::READ,
        BufferDirection::DeviceToDriver => MapFlags::WRITE,
        BufferDirection::Both => MapFlags::READ | MapFlags::WRITE,
    }
}

impl<C: DmaContext> IommuHal<C> {
    /// `dma_alloc` for isolated strict mode with a granule of `align` bytes above `PAGE_SIZE`:
    /// allocates enough pages to contain `pages` pages rounded up to whole granules, aligned to
    /// the granule, and maps exactly those granules; the rest of the allocation is padding that
    /// no one else uses.
    fn dma_alloc_aligned(pages: usize, align: u64) -> (PhysAddr, NonNull<u8>) {
        let failed = (0, NonNull::dangling());
        let Some(len) = (pages as u64)
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| b.checked_next_multiple_of(align))
        else {
            return failed;
        };
        let inner_bytes = (len - PAGE_SIZE as u64).checked_add(align);
        let Some(inner_pages) = inner_bytes
            .and_then(|b| usize::try_from(b).ok())
            .map(|b| b / PAGE_SIZE)
        else {
            return failed;
        };
        let (phys, vaddr) = C::Inner::dma_alloc(inner_pages, BufferDirection::Both);
        if phys == 0 {
            return failed;
        }
        let offset = phys.checked_next_multiple_of(align).map(|a| a - phys);
        let result = match offset {
            // The aligned granules lie inside the allocation, and the virtual address stays
            // PAGE_SIZE-aligned (the inner `Hal` aligns `vaddr` to PAGE_SIZE).
            Some(off) if off % PAGE_SIZE as u64 == 0 => C::with(|iommu, space| {
                let alloc = (phys, vaddr.as_ptr() as usize, inner_pages);
                space.map_alloc(iommu, phys + off, len, alloc)
            })
            .map(|iova| (iova, off as usize)),
            _ => Err(IommuError::Unaligned {
                value: phys,
                granule: align,
            }),
        };
        match result {
            Ok((iova, off)) => {
                // `off < align <= inner allocation size`: inside the allocation.
                let v = vaddr.as_ptr().wrapping_add(off);
                (iova, NonNull::new(v).unwrap_or(vaddr))
            }
            Err(e) => {
                log::error!("virtio-iommu: dma_alloc of {pages} pages: MAP failed: {e}");
                // SAFETY: allocated just above with these values, never handed out.
                unsafe { C::Inner::dma_dealloc(phys, vaddr, inner_pages) };
                failed
            }
        }
    }
}

// SAFETY: the `Hal` contract, in every mode:
// - `dma_alloc` returns `C::Inner::dma_alloc`'s own virtual address (page-aligned, zeroed, not
//   aliased: the inner `Hal`'s guarantees), or in isolated strict mode a PAGE_SIZE multiple
//   inside that allocation (checked), with a device address through which the device reaches
//   that memory: a mapping made here of its whole granules (strict; isolated strict: exactly
//   the granule-aligned granules handed out), or the physical address itself inside an
//   identity range or a bypass domain (identity modes, where the device reaches other memory
//   too: that is the mode's documented exposure, set up by the embedder, not an address this
//   adapter makes up). The memory is freed only after its mapping is gone (or leaked when the
//   UNMAP fails). On failure it returns 0, which virtio-drivers reads as failure, with nothing
//   mapped and the inner allocation freed.
// - `share` returns a device address that reaches the buffer's memory (`C::Inner::share`'s)
//   until `unshare`'s UNMAP completes (if it fails, the mapping's IOVAs and bounce granules
//   are kept and counted in `DmaSpace::leaked`, but the buffer's memory returns to its owner
//   and may stay reachable by the endpoint: a failed UNMAP means the IOMMU device misbehaves,
//   and it controls every DMA anyway, or timed out; the embedder is told to stop the endpoint
//   while `leaked > 0`; no Rust memory is touched by this adapter after `unshare` returns;
//   under the lazy `UnmapPolicy`, which the embedder opts into, the UNMAP is deferred to the
//   next flush and the device may reach the memory until then: the policy's documented
//   trade-off, as Linux's iommu.strict=0), with the direction's permissions in the strict modes, and in isolated
//   strict mode only the buffer's bytes and bounce granules the space owns. The buffer is only
//   read (copy-in) during `share`, and only written (copy-back) during `unshare` of a
//   device-writable direction — or during a failed `share`, whose undo is the inner `unshare`
//   (which may copy the inner Hal's bounce contents back) — within its bounds, while the caller
//   guarantees exclusive access to it (the `Hal` contract for both calls). On failure
//   it undoes the inner share and returns the start of the fault window, which reaches no
//   memory: strict modes: IOVAs reserved and never mapped; identity-mapped: IOVAs neither
//   mapped nor reserved in a translated domain; bypass: the range the embedder vouched is
//   unbacked (when the context itself is missing: `NO_CONTEXT_ADDRESS`, which no mode hands
//   out and which reaches nothing in any of them).
// - every inner `Hal` call gets back exactly the values it returned (`dma_dealloc` with the
//   recorded allocation, `unshare` with the physical address of the share), once.
unsafe impl<C: DmaContext> Hal for IommuHal<C> {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        if pages == 0 {
            return (0, NonNull::dangling());
        }
        let align = C::with(|_, space| Ok(space.alloc_alignment()))
            .ok()
            .flatten();
        if let Some(align) = align.filter(|&a| a > PAGE_SIZE as u64) {
            return Self::dma_alloc_aligned(pages, align);
        }
        let (phys, vaddr) = C::Inner::dma_alloc(pages, direction);
        if phys == 0 {
            return (0, vaddr);
        }
        let len = pages.saturating_mul(PAGE_SIZE) as u64;
        let rw = MapFlags::READ | MapFlags::WRITE;
        match C::with(|iommu, space| space.map_buffer(iommu, phys, len, rw)) {
            Ok(iova) => (iova, vaddr),
            Err(e) => {
                log::error!("virtio-iommu: dma_alloc of {pages} pages: MAP failed: {e}");
                // SAFETY: allocated just above with these values, never handed out.
                unsafe { C::Inner::dma_dealloc(phys, vaddr, pages) };
                (0, NonNull::dangling())
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let taken = C::with(|iommu, space| {
            // Always strict: the memory goes back to the allocator right after.
            let taken = space.take(iommu, paddr, false)?;
            space.release(&taken);
            Ok(taken)
        });
        match taken {
            Ok(t) if t.unmapped.is_ok() => {
                let (phys, vaddr, pages) = match t.alloc {
                    Some((p, v, n)) => (p, NonNull::new(v as *mut u8).unwrap_or(vaddr), n),
                    None => (t.phys, vaddr, pages),
                };
                // SAFETY: the caller passes what `dma_alloc` returned; `phys`, `vaddr` and
                // `pages` are what `C::Inner::dma_alloc` gave and got (recorded for an
                // isolated allocation), no longer reachable by the device.
                unsafe { C::Inner::dma_dealloc(phys, vaddr, pages) };
                0
            }
            Ok(t) => {
                // Still mapped: leak the memory rather than let the device reach memory that
                // gets reused. Report success: virtio-drivers' `Dma::drop` asserts that
                // `dma_dealloc` returns 0, and there is nothing the caller could do.
                let e = t.unmapped.err();
                log::error!(
                    "virtio-iommu: dma_dealloc of device address {paddr:#x}: UNMAP failed, {pages} page(s) leaked: {e:?}"
                );
                0
            }
            Err(e) => {
                log::error!(
                    "virtio-iommu: dma_dealloc of unknown device address {paddr:#x}, {pages} page(s) leaked: {e}"
                );
                0
            }
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { C::Inner::mmio_phys_to_virt(paddr, size) }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        // SAFETY: forwarded with the caller's guarantees.
        let phys = unsafe { C::Inner::share(buffer, direction) };
        let len = buffer.len();
        let outcome = C::with(|iommu, space| {
            // SAFETY: the caller's guarantee: `buffer` is valid and not accessed by anyone
            // else during this call; `phys` is its physical address from the inner `Hal`.
            let r = unsafe { space.share_buffer(iommu, phys, buffer, flags_for(direction)) };
            Ok(r.map_err(|e| (e, space.fault_window())))
        });
        let (e, fault) = match outcome {
            Ok(Ok(addr)) => return addr,
            Ok(Err((e, w))) => {
                if (len as u64).saturating_sub(1) > w.end - w.start {
                    log::error!(
                        "virtio-iommu: failed buffer of {len} bytes is longer than the fault window {w:x?}"
                    );
                }
                (e, w.start)
            }
            Err(e) => (e, NO_CONTEXT_ADDRESS),
        };
        log::error!(
            "virtio-iommu: share of {len} bytes at {phys:#x} failed ({e}): device address {fault:#x} (reaches nothing)"
        );
        // SAFETY: undoes the share above with the values it returned; the device never got
        // an address for it.
        unsafe { C::Inner::unshare(phys, buffer, direction) };
        fault
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let copy_back = matches!(
            direction,
            BufferDirection::DeviceToDriver | BufferDirection::Both
        );
        let r = C::with(|iommu, space| {
            if paddr == NO_CONTEXT_ADDRESS || space.is_fault_address(paddr) {
                // A failed share: the inner share was undone then.
                return Ok(());
            }
            // Under the lazy policy the UNMAP is deferred (the device keeps access until the
            // flush: the policy's documented trade-off).
            let taken = space.take(iommu, paddr, true)?;
            // SAFETY: `taken.phys` is what `C::Inner::share` returned for this buffer (the
            // caller passes the address `share` returned for it).
            unsafe { C::Inner::unshare(taken.phys, buffer, direction) };
            if copy_back {
                // After the inner unshare, which may have copied its own bounce buffer over
                // the whole buffer. SAFETY: `buffer` is valid for writes (device-writable
                // direction, the caller's guarantee) and is the buffer that was shared.
                unsafe { space.copy_back(&taken, buffer.as_ptr() as *mut u8) };
            }
            space.release(&taken);
            space.flush_after(iommu, &taken);
            taken.unmapped
        });
        if let Err(e) = r {
            log::error!("virtio-iommu: unshare of device address {paddr:#x}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::dma::fake::{BounceHal, FakeIommu, InPlaceHal};
    use crate::dma::{IovaAllocator, PhysRange};
    use crate::parse::{ReservedRegion, ResvMemKind};
    use std::alloc::{alloc_zeroed, dealloc, Layout};
    use std::cell::RefCell;
    use std::vec::Vec;

    std::thread_local! {
        static STATE: RefCell<Option<(FakeIommu, DmaSpace)>> = const { RefCell::new(None) };
    }

    /// A context over [`STATE`] with inner `Hal` `H`.
    struct Ctx<H>(PhantomData<H>);

    impl<H: Hal + 'static> DmaContext for Ctx<H> {
        type Inner = H;
        fn with<R>(
            f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
        ) -> Result<R, IommuError> {
            STATE.with(|s| {
                let mut s = s.borrow_mut();
                let (iommu, space) = s.as_mut().ok_or(IommuError::Broken)?;
                f(iommu, space)
            })
        }
    }

    type Bounce = IommuHal<Ctx<BounceHal>>;
    type InPlace = IommuHal<Ctx<InPlaceHal>>;

    fn install(iommu: FakeIommu, space: DmaSpace) {
        STATE.with(|s| *s.borrow_mut() = Some((iommu, space)));
    }

    fn state<R>(f: impl FnOnce(&mut FakeIommu, &mut DmaSpace) -> R) -> R {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let (iommu, space) = s.as_mut().unwrap();
            f(iommu, space)
        })
    }

    fn uninstall() -> (FakeIommu, DmaSpace) {
        STATE.with(|s| s.borrow_mut().take()).unwrap()
    }

    const DIRS: [BufferDirection; 3] = [
        BufferDirection::DriverToDevice,
        BufferDirection::DeviceToDriver,
        BufferDirection::Both,
    ];

    /// A zeroed host buffer aligned to `align`, freed on drop (physical = host address).
    struct Aligned {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Aligned {
        fn new(size: usize, align: usize) -> Self {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Self { ptr, layout }
        }
        fn addr(&self) -> u64 {
            self.ptr as u64
        }
        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: our allocation, `layout.size()` bytes.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }
        /// `len` bytes at `offset`, as the `Hal` gets them.
        fn slice(&mut self, offset: usize, len: usize) -> NonNull<[u8]> {
            NonNull::from(&mut self.bytes()[offset..offset + len])
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr, self.layout) }
        }
    }

    #[test]
    fn failed_share_reaches_nothing_and_undoes_the_inner_share_in_every_mode() {
        let mut buf = std::vec![7u8; 100];
        let ptr = NonNull::from(buf.as_mut_slice());
        let spaces = [
            {
                // Strict: the MAP fails.
                let mut iommu = FakeIommu::new();
                iommu.fail_map = true;
                let iova = IovaAllocator::new(0, 0xffff_ffff_ffff, 0x1000).unwrap();
                (iommu, DmaSpace::new(1, iova).unwrap())
            },
            {
                // Identity-mapped: the buffer (BounceHal's copy, on the heap) is outside RAM.
                let mut iommu = FakeIommu::new();
                let ram = [PhysRange::from_start_size(1 << 62, 1 << 30).unwrap()];
                let space = DmaSpace::identity_mapped(&mut iommu, 2, &ram, &[]).unwrap();
                (iommu, space)
            },
            {
                // Bypass: every address is reserved (MSI) but the unbacked window.
                let reserved = [ReservedRegion {
                    kind: ResvMemKind::Msi,
                    start: 1,
                    end: (1 << 63) - 1,
                }];
                let unbacked = PhysRange {
                    start: 1 << 63,
                    end: u64::MAX,
                };
                let space = DmaSpace::identity_bypass(3, &[], &reserved, unbacked).unwrap();
                (FakeIommu::new(), space)
            },
        ];
        for (iommu, space) in spaces {
            let mode = space.mode();
            install(iommu, space);
            for dir in DIRS {
                // SAFETY: `buf` is valid and untouched until `unshare`.
                let addr = unsafe { Bounce::share(ptr, dir) };
                assert_ne!(addr, 0, "{mode:?}");
                state(|iommu, space| {
                    let w = space.fault_window();
                    assert!(
                        w.start == addr && w.end - addr >= 99,
                        "{mode:?}: {addr:#x} outside the fault window {w:x?}"
                    );
                    // Nothing mapped there, and (bypass) nothing of RAM either.
                    assert!(
                        !iommu.any_mapped(space.domain(), addr, addr + 99),
                        "{mode:?}"
                    );
                    assert!(space.failures > 0);
                });
                assert_eq!(BounceHal::live().0, 0, "{mode:?}: inner share undone");
                // SAFETY: the address `share` returned for `buf`.
                unsafe { Bounce::unshare(addr, ptr, dir) };
                assert_eq!(BounceHal::live().0, 0);
            }
            let (iommu, space) = uninstall();
            assert!(iommu.maps.iter().all(|m| !space.is_fault_address(m.1)));
        }
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn share_without_a_context_does_not_leak_the_inner_share() {
        let mut buf = [1u8; 8];
        let ptr = NonNull::from(&mut buf[..]);
        // SAFETY: `buf` is valid and untouched until `unshare`.
        let addr = unsafe { Bounce::share(ptr, BufferDirection::Both) };
        assert_eq!(addr, NO_CONTEXT_ADDRESS);
        assert_eq!(BounceHal::live().0, 0);
        // SAFETY: as above.
        unsafe { Bounce::unshare(addr, ptr, BufferDirection::Both) };
        assert_eq!(Bounce::dma_alloc(1, BufferDirection::Both).0, 0);
        assert_eq!(BounceHal::live(), (0, 0));
    }

    #[test]
    fn unshare_copies_back_when_unmap_fails_and_keeps_the_iovas() {
        let iova = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        install(FakeIommu::new(), DmaSpace::new(1, iova).unwrap());
        let mut buf = std::vec![0u8; 64];
        let ptr = NonNull::from(buf.as_mut_slice());
        // SAFETY: `buf` is valid and untouched until `unshare`.
        let addr = unsafe { Bounce::share(ptr, BufferDirection::DeviceToDriver) };
        state(|iommu, _| {
            iommu.device_write(1, addr + 3, b"device data").unwrap();
            iommu.fail_unmap = true;
        });
        // SAFETY: the address `share` returned for `buf`.
        unsafe { Bounce::unshare(addr, ptr, BufferDirection::DeviceToDriver) };
        assert_eq!(
            &buf[3..14],
            b"device data",
            "copied back despite the failed UNMAP"
        );
        assert_eq!(BounceHal::live().0, 0, "inner unshare ran");
        let first = state(|iommu, space| {
            assert_eq!((space.leaked, space.live_mappings()), (1, 1));
            iommu.fail_unmap = false;
            iommu.maps[0]
        });
        // The kept IOVAs are not handed out again.
        // SAFETY: as above.
        let again = unsafe { Bounce::share(ptr, BufferDirection::DeviceToDriver) };
        assert!(again > first.2 || again < first.1);
        // SAFETY: as above.
        unsafe { Bounce::unshare(again, ptr, BufferDirection::DeviceToDriver) };
        let (mut iommu, mut space) = uninstall();
        assert_eq!(space.unmap_all(&mut iommu), Ok(1));
        assert_eq!(space.leaked, 0);
        assert!(iommu.maps.is_empty());
    }

    #[test]
    fn unshare_and_dma_dealloc_after_unmap_all_still_copy_back_and_free() {
        let iova = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        install(FakeIommu::new(), DmaSpace::new(1, iova).unwrap());
        let mut buf = std::vec![0u8; 32];
        let ptr = NonNull::from(buf.as_mut_slice());
        // SAFETY: `buf` is valid and untouched until `unshare`.
        let addr = unsafe { Bounce::share(ptr, BufferDirection::DeviceToDriver) };
        let (dma, vaddr) = Bounce::dma_alloc(1, BufferDirection::Both);
        state(|iommu, space| {
            iommu.device_write(1, addr, b"before the end").unwrap();
            // The device goes away: everything is UNMAPped while the driver holds both.
            assert_eq!(space.unmap_all(iommu), Ok(2));
            assert!(iommu.maps.is_empty());
        });
        // SAFETY: the address `share` returned for `buf`.
        unsafe { Bounce::unshare(addr, ptr, BufferDirection::DeviceToDriver) };
        assert_eq!(&buf[..14], b"before the end", "copied back");
        // SAFETY: what `dma_alloc` returned.
        assert_eq!(unsafe { Bounce::dma_dealloc(dma, vaddr, 1) }, 0);
        assert_eq!(BounceHal::live(), (0, 0), "inner unshare and dealloc ran");
        let (_, space) = uninstall();
        assert_eq!((space.live_mappings(), space.failures), (0, 0));
        assert_eq!(space.iova_allocator().unwrap().live_allocations(), 0);
    }

    /// Every physical range the device can reach through `iommu` lies inside `allowed` (physical
    /// ranges, inclusive).
    fn exposure_ok(iommu: &FakeIommu, allowed: &[(u64, u64)]) -> bool {
        iommu.maps.iter().all(|m| {
            let (s, e) = (m.3, m.3 + (m.2 - m.1));
            allowed.iter().any(|&(a, b)| a <= s && e <= b)
        })
    }

    const G64K: u64 = 0x1_0000;

    fn isolated_space(bounce: usize) -> (FakeIommu, DmaSpace) {
        let iova = IovaAllocator::new(0, 0xffff_ffff_ffff, G64K).unwrap();
        let space = DmaSpace::isolated::<BounceHal>(1, iova, 16, bounce).unwrap();
        (FakeIommu::with_granule(G64K), space)
    }

    #[test]
    fn strict_exposes_the_whole_granule_of_a_one_byte_buffer() {
        // What isolated strict mode is for: plain strict maps the whole 64 KiB granule.
        let mut heap = Aligned::new(3 * G64K as usize, G64K as usize);
        let iova = IovaAllocator::new(0, 0xffff_ffff_ffff, G64K).unwrap();
        install(
            FakeIommu::with_granule(G64K),
            DmaSpace::new(1, iova).unwrap(),
        );
        let byte = heap.addr() + 0x1_2345;
        let ptr = heap.slice(0x1_2345, 1);
        // SAFETY: valid until `unshare`.
        let addr = unsafe { InPlace::share(ptr, BufferDirection::DeviceToDriver) };
        state(|iommu, _| {
            assert!(!exposure_ok(iommu, &[(byte, byte)]));
            // The device can write the neighbour.
            iommu.device_write(1, addr + 1, &[0x55]).unwrap();
        });
        // SAFETY: as above.
        unsafe { InPlace::unshare(addr, ptr, BufferDirection::DeviceToDriver) };
        assert_eq!(heap.bytes()[0x1_2346], 0x55);
        uninstall();
    }

    #[test]
    fn isolated_one_byte_buffer_exposes_no_neighbour() {
        let mut heap = Aligned::new(3 * G64K as usize, G64K as usize);
        heap.bytes().fill(0xaa);
        let (iommu, space) = isolated_space(8);
        let bounce: Vec<(u64, u64)> = space.bounce_pool_granules();
        assert_eq!(bounce.len(), 8);
        assert!(bounce
            .iter()
            .all(|&(s, e)| s % G64K == 0 && e - s == G64K - 1));
        install(iommu, space);
        let off = 0x1_2345;
        let byte = heap.addr() + off as u64;
        for dir in DIRS {
            let ptr = heap.slice(off, 1);
            // SAFETY: valid until `unshare`.
            let addr = unsafe { InPlace::share(ptr, dir) };
            state(|iommu, space| {
                assert!(!space.is_fault_address(addr));
                assert_eq!(iommu.maps.len(), 1);
                assert!(exposure_ok(iommu, &bounce), "{:x?}", iommu.maps);
                assert!(!exposure_ok(iommu, &[(byte, byte)]));
                assert_eq!(space.bounce_granules(), (1, 8));
                assert!(space.bounced > 0);
                let mut b = [0u8];
                if dir != BufferDirection::DeviceToDriver {
                    iommu.device_read(1, addr, &mut b).unwrap();
                    assert_eq!(b, [0xaa], "copied in");
                    // The bounce granule's other bytes are zero, not someone's data.
                    iommu.device_read(1, addr + 1, &mut b).unwrap();
                    assert_eq!(b, [0]);
                }
                if dir != BufferDirection::DriverToDevice {
                    iommu.device_write(1, addr, &[0x42]).unwrap();
                    // Writes next to it land in the bounce granule, not the neighbour.
                    iommu.device_write(1, addr + 1, &[0x66]).unwrap();
                    iommu.device_write(1, addr - 1, &[0x66]).unwrap();
                }
            });
            // SAFETY: as above.
            unsafe { InPlace::unshare(addr, ptr, dir) };
            let b = heap.bytes();
            let want = if dir == BufferDirection::DriverToDevice {
                0xaa
            } else {
                0x42
            };
            assert_eq!(b[off], want, "{dir:?}");
            assert_eq!(
                (b[off - 1], b[off + 1]),
                (0xaa, 0xaa),
                "neighbours untouched"
            );
            b[off] = 0xaa;
            state(|iommu, space| {
                assert!(iommu.maps.is_empty());
                assert_eq!(space.bounce_granules(), (0, 8));
            });
        }
        let (_, space) = uninstall();
        assert_eq!((space.failures, space.leaked), (0, 0));
    }

    #[test]
    fn isolated_round_trips_in_every_direction_and_layout() {
        let mut heap = Aligned::new(6 * G64K as usize, G64K as usize);
        let (iommu, space) = isolated_space(8);
        let bounce = space.bounce_pool_granules();
        install(iommu, space);
        // (offset, length): one partial granule; head + whole + tail; whole granules only;
        // aligned start with a tail; a head ending on a boundary.
        let layouts = [
            (0x1_2345usize, 1usize),
            (0x0ff0, 0x2_0020),
            (0x1_0000, 0x2_0000),
            (0x1_0000, 0x1_0005),
            (0x1_fff0, 0x1_0010),
        ];
        for (off, len) in layouts {
            for dir in DIRS {
                let bytes = heap.bytes();
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = (i % 251) as u8;
                }
                let before = bytes.to_vec();
                let ptr = heap.slice(off, len);
                let buf = (
                    heap.addr() + off as u64,
                    heap.addr() + (off + len - 1) as u64,
                );
                let mut allowed = bounce.clone();
                allowed.push(buf);
                // SAFETY: valid until `unshare`.
                let addr = unsafe { InPlace::share(ptr, dir) };
                let written: Vec<u8> = (0..len).map(|i| (i % 13) as u8 ^ 0xf0).collect();
                state(|iommu, _| {
                    assert!(
                        exposure_ok(iommu, &allowed),
                        "{off:#x}+{len:#x}: {:x?}",
                        iommu.maps
                    );
                    let mut seen = std::vec![0u8; len];
                    let read = iommu.device_read(1, addr, &mut seen);
                    if dir == BufferDirection::DeviceToDriver {
                        assert!(read.is_err(), "WRITE-only");
                    } else {
                        read.unwrap();
                        assert_eq!(seen, before[off..off + len], "{off:#x}+{len:#x} {dir:?}");
                    }
                    let write = iommu.device_write(1, addr, &written);
                    if dir == BufferDirection::DriverToDevice {
                        assert!(write.is_err(), "READ-only");
                    } else {
                        write.unwrap();
                    }
                });
                // SAFETY: as above.
                unsafe { InPlace::unshare(addr, ptr, dir) };
                let after = heap.bytes();
                if dir == BufferDirection::DriverToDevice {
                    assert_eq!(after[..], before[..]);
                } else {
                    assert_eq!(
                        after[off..off + len],
                        written[..],
                        "{off:#x}+{len:#x} {dir:?}"
                    );
                    assert_eq!(after[..off], before[..off]);
                    assert_eq!(after[off + len..], before[off + len..]);
                }
                state(|iommu, space| {
                    assert!(iommu.maps.is_empty());
                    assert_eq!(space.bounce_granules().0, 0);
                });
            }
        }
        let (_, space) = uninstall();
        assert_eq!((space.failures, space.leaked), (0, 0));
    }

    #[test]
    fn lazy_isolated_revives_only_direct_maps_of_whole_granules() {
        fn zero() -> u64 {
            0
        }
        static ZERO: crate::dma::FnClock = crate::dma::FnClock(zero);
        let mut heap = Aligned::new(3 * G64K as usize, G64K as usize);
        let (iommu, mut space) = isolated_space(8);
        let lazy = crate::dma::UnmapPolicy::Lazy {
            max_pending: 8,
            max_age_ns: u64::MAX,
            clock: &ZERO,
        };
        space.set_unmap_policy(lazy).unwrap();
        install(iommu, space);
        let dir = BufferDirection::DeviceToDriver;
        let counts = || state(|_, s| (s.maps, s.bounced, s.pending_unmaps()));
        // A whole granule: a direct map, revived by the same buffer again.
        let whole = heap.slice(G64K as usize, G64K as usize);
        // SAFETY: (every share/unshare below) the slices stay valid while shared, and each
        // unshare passes what its share returned.
        let a = unsafe { InPlace::share(whole, dir) };
        // SAFETY: as above.
        unsafe { InPlace::unshare(a, whole, dir) };
        assert_eq!(counts(), (1, 0, 1));
        // SAFETY: as above.
        let b = unsafe { InPlace::share(whole, dir) };
        assert_eq!((b, counts()), (a, (1, 0, 0)), "revived: same IOVA, no MAP");
        // SAFETY: as above.
        unsafe { InPlace::unshare(b, whole, dir) };
        // A part of that pending granule needs a bounce granule: never revived (that would
        // expose the rest of the granule), a bounced MAP instead.
        let part = heap.slice(G64K as usize + 0x345, 16);
        // SAFETY: as above.
        let c = unsafe { InPlace::share(part, dir) };
        assert_eq!(counts(), (2, 1, 1));
        let part_phys = heap.addr() + G64K + 0x345;
        state(|iommu, _| {
            assert!(iommu.translate(1, c).is_some_and(|(p, _)| p != part_phys));
        });
        // SAFETY: as above.
        unsafe { InPlace::unshare(c, part, dir) };
        // A bounced pending range is never revived either.
        // SAFETY: as above.
        let d = unsafe { InPlace::share(part, dir) };
        assert_eq!(counts(), (3, 2, 2));
        // SAFETY: as above.
        unsafe { InPlace::unshare(d, part, dir) };
        let (mut iommu, mut space) = uninstall();
        assert_eq!(space.flush_stats().revived, 1);
        assert_eq!(space.flush(&mut iommu), Ok(3));
        assert!(iommu.maps.is_empty());
        assert_eq!((space.live_mappings(), space.bounce_granules().0), (0, 0));
    }

    #[test]
    fn isolated_dma_alloc_maps_only_its_own_aligned_granules() {
        let (iommu, space) = isolated_space(2);
        install(iommu, space);
        let allocs_before = BounceHal::live().1;
        let (iova, vaddr) = Bounce::dma_alloc(3, BufferDirection::Both);
        assert_ne!(iova, 0);
        assert_eq!(vaddr.as_ptr() as usize % PAGE_SIZE, 0);
        state(|iommu, _| {
            assert_eq!(iommu.maps.len(), 1);
            let m = iommu.maps[0];
            assert_eq!((m.3 % G64K, m.2 - m.1 + 1), (0, G64K));
            assert_eq!(
                m.3,
                vaddr.as_ptr() as u64,
                "the mapping is the memory handed out"
            );
            iommu.device_write(1, iova + 0xfff0, b"end").unwrap();
        });
        // SAFETY: `vaddr` points to 3 zeroed pages of ours; the device wrote the first.
        let host = unsafe { std::slice::from_raw_parts(vaddr.as_ptr(), 3 * PAGE_SIZE) };
        assert!(host.iter().all(|&b| b == 0));
        assert_eq!(BounceHal::live().1, allocs_before + 1);
        // SAFETY: what `dma_alloc` returned.
        assert_eq!(unsafe { Bounce::dma_dealloc(iova, vaddr, 3) }, 0);
        assert_eq!(
            BounceHal::live().1,
            allocs_before,
            "the inner allocation was freed"
        );
        let (iommu, _) = uninstall();
        assert!(iommu.maps.is_empty());
    }

    #[test]
    fn isolated_bounce_exhaustion_fails_safely() {
        let mut heap = Aligned::new(4 * G64K as usize, G64K as usize);
        let (iommu, space) = isolated_space(2);
        install(iommu, space);
        let a = heap.slice(0x10, 1);
        let b = heap.slice(0x1_0010, 1);
        let c = heap.slice(0x2_0010, 1);
        // SAFETY: valid until `unshare`, disjoint.
        let (ia, ib, ic) = unsafe {
            (
                InPlace::share(a, BufferDirection::Both),
                InPlace::share(b, BufferDirection::Both),
                InPlace::share(c, BufferDirection::Both),
            )
        };
        state(|iommu, space| {
            assert!(!space.is_fault_address(ia) && !space.is_fault_address(ib));
            assert!(
                space.is_fault_address(ic),
                "no bounce granule left: the fault window"
            );
            assert!(!iommu.any_mapped(1, ic, ic));
            assert_eq!(space.bounce_granules(), (2, 2));
        });
        // SAFETY: the addresses `share` returned.
        unsafe {
            InPlace::unshare(ic, c, BufferDirection::Both);
            InPlace::unshare(ib, b, BufferDirection::Both);
            InPlace::unshare(ia, a, BufferDirection::Both);
        }
        let (iommu, space) = uninstall();
        assert!(iommu.maps.is_empty());
        assert_eq!(space.bounce_granules(), (0, 2));
        assert_eq!(space.failures, 1);
    }

    #[test]
    fn dma_alloc_of_zero_pages_maps_nothing() {
        let iova = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        install(FakeIommu::new(), DmaSpace::new(1, iova).unwrap());
        assert_eq!(Bounce::dma_alloc(0, BufferDirection::Both).0, 0);
        let (iommu, _) = uninstall();
        assert!(iommu.maps.is_empty());
    }

    #[test]
    fn unknown_addresses_never_panic() {
        let iova = IovaAllocator::new(0, 0xffff_ffff, 0x1000).unwrap();
        install(FakeIommu::new(), DmaSpace::new(1, iova).unwrap());
        let mut buf = [0u8; 4];
        let ptr = NonNull::from(&mut buf[..]);
        // SAFETY: never shared: the adapter must refuse without touching the inner `Hal`.
        unsafe {
            InPlace::unshare(0x1234_5000, ptr, BufferDirection::Both);
            assert_eq!(Bounce::dma_dealloc(0x1234_5000, NonNull::dangling(), 1), 0);
        }
        let (_, space) = uninstall();
        assert_eq!(space.failures, 2);
    }
}
