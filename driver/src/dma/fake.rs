//! Test doubles of the DMA glue: an IOMMU that records mappings ([`FakeIommu`]) and an inner
//! `Hal` whose `share` bounces through its own copy ([`BounceHal`]), so that a missed `unshare`
//! shows as data not copied back.

extern crate std;

use super::IommuMapper;
use crate::error::IommuError;
use crate::wire::{MapFlags, Status};
use core::ptr::NonNull;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::RefCell;
use std::vec::Vec;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// One mapping: domain, first IOVA, last IOVA (inclusive), physical address, flags.
pub(super) type Mapping = (u32, u64, u64, u64, MapFlags);

/// An IOMMU double: records mappings, fails on demand, rejects overlapping MAPs like QEMU, and
/// UNMAPs every mapping inside the range (an UNMAP that would split one fails, R22).
pub(super) struct FakeIommu {
    pub(super) maps: Vec<Mapping>,
    pub(super) fail_map: bool,
    pub(super) fail_unmap: bool,
    pub(super) input_range: (u64, u64),
    pub(super) granule: u64,
}

impl FakeIommu {
    pub(super) fn new() -> Self {
        Self::with_granule(0x1000)
    }

    pub(super) fn with_granule(granule: u64) -> Self {
        Self {
            maps: Vec::new(),
            fail_map: false,
            fail_unmap: false,
            input_range: (0, u64::MAX),
            granule,
        }
    }

    /// Makes every request fail (or succeed again).
    pub(super) fn set_fail(&mut self, fail: bool) {
        self.fail_map = fail;
        self.fail_unmap = fail;
    }

    /// Translates `iova` in `domain`: the physical address and flags, if mapped.
    pub(super) fn translate(&self, domain: u32, iova: u64) -> Option<(u64, MapFlags)> {
        self.maps
            .iter()
            .find(|m| m.0 == domain && m.1 <= iova && iova <= m.2)
            .map(|m| (m.3 + (iova - m.1), m.4))
    }

    /// Whether any byte of `start..=end` is mapped in `domain`.
    pub(super) fn any_mapped(&self, domain: u32, start: u64, end: u64) -> bool {
        self.maps
            .iter()
            .any(|m| m.0 == domain && m.1 <= end && start <= m.2)
    }

    /// The device writes `data` at `iova` (needs WRITE on every byte). The physical address is
    /// a host address (identity `Hal`s of the tests).
    pub(super) fn device_write(&self, domain: u32, iova: u64, data: &[u8]) -> Result<(), u64> {
        for (i, &b) in data.iter().enumerate() {
            let at = iova + i as u64;
            match self.translate(domain, at) {
                // SAFETY: the test mapped this host memory for the device and keeps it alive.
                Some((p, f)) if f.contains(MapFlags::WRITE) => unsafe {
                    core::ptr::write_volatile(p as *mut u8, b)
                },
                _ => return Err(at),
            }
        }
        Ok(())
    }

    /// The device reads `out.len()` bytes at `iova` (needs READ on every byte).
    pub(super) fn device_read(&self, domain: u32, iova: u64, out: &mut [u8]) -> Result<(), u64> {
        for (i, b) in out.iter_mut().enumerate() {
            let at = iova + i as u64;
            match self.translate(domain, at) {
                // SAFETY: as in `device_write`.
                Some((p, f)) if f.contains(MapFlags::READ) => unsafe {
                    *b = core::ptr::read_volatile(p as *const u8)
                },
                _ => return Err(at),
            }
        }
        Ok(())
    }
}

impl IommuMapper for FakeIommu {
    fn granule(&self) -> u64 {
        self.granule
    }
    fn input_range(&self) -> (u64, u64) {
        self.input_range
    }
    fn map(&mut self, d: u32, s: u64, e: u64, p: u64, f: MapFlags) -> Result<(), IommuError> {
        if self.fail_map {
            return Err(IommuError::Status(Status::NoMem));
        }
        if self.any_mapped(d, s, e) {
            return Err(IommuError::Status(Status::Inval));
        }
        self.maps.push((d, s, e, p, f));
        Ok(())
    }
    fn unmap(&mut self, d: u32, s: u64, e: u64) -> Result<(), IommuError> {
        if self.fail_unmap {
            return Err(IommuError::Status(Status::DevErr));
        }
        let split = |m: &Mapping| m.0 == d && m.1 <= e && s <= m.2 && (m.1 < s || m.2 > e);
        if self.maps.iter().any(split) {
            return Err(IommuError::Status(Status::Range));
        }
        let before = self.maps.len();
        self.maps.retain(|m| !(m.0 == d && s <= m.1 && m.2 <= e));
        if self.maps.len() == before {
            return Err(IommuError::Status(Status::Range));
        }
        Ok(())
    }
}

std::thread_local! {
    /// Live shares of [`BounceHal`]: (bounce address, length).
    static SHARES: RefCell<Vec<(u64, usize)>> = const { RefCell::new(Vec::new()) };
    /// Live allocations of [`BounceHal`]: (address, pages).
    static ALLOCS: RefCell<Vec<(u64, usize)>> = const { RefCell::new(Vec::new()) };
}

/// An identity `Hal` (physical = host address) whose `share` copies the buffer into a bounce
/// allocation of its own and whose `unshare` copies it back for device-writable directions.
pub(super) struct BounceHal;

impl BounceHal {
    /// Number of shares not yet unshared, and of allocations not yet freed (this thread).
    pub(super) fn live() -> (usize, usize) {
        (
            SHARES.with(|s| s.borrow().len()),
            ALLOCS.with(|a| a.borrow().len()),
        )
    }

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes.max(1), PAGE_SIZE).unwrap()
    }
}

// SAFETY: test double: memory comes from the global allocator, page-aligned, zeroed, owned
// until freed; physical = virtual.
unsafe impl Hal for BounceHal {
    fn dma_alloc(pages: usize, _: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(Self::layout(pages * PAGE_SIZE)) };
        let p = NonNull::new(p).unwrap();
        ALLOCS.with(|a| a.borrow_mut().push((p.as_ptr() as u64, pages)));
        (p.as_ptr() as u64, p)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let known = ALLOCS.with(|a| {
            let mut a = a.borrow_mut();
            let i = a.iter().position(|&x| x == (paddr, pages));
            i.map(|i| a.remove(i))
        });
        assert!(
            known.is_some(),
            "dma_dealloc of {paddr:#x}+{pages} pages not allocated"
        );
        assert_eq!(paddr, vaddr.as_ptr() as u64);
        // SAFETY: allocated in `dma_alloc` with this layout.
        unsafe { dealloc(vaddr.as_ptr(), Self::layout(pages * PAGE_SIZE)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap()
    }

    unsafe fn share(buffer: NonNull<[u8]>, _: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(Self::layout(len)) };
        // SAFETY: `buffer` is valid for `len` bytes; `p` is a fresh allocation of `len`.
        unsafe { core::ptr::copy_nonoverlapping(buffer.as_ptr() as *const u8, p, len) };
        SHARES.with(|s| s.borrow_mut().push((p as u64, len)));
        p as u64
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let len = buffer.len();
        let known = SHARES.with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().position(|&x| x == (paddr, len));
            i.map(|i| s.remove(i))
        });
        assert!(known.is_some(), "unshare of {paddr:#x}+{len} not shared");
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: the bounce copy made in `share`; `buffer` is writable (the caller's).
            unsafe {
                core::ptr::copy_nonoverlapping(paddr as *const u8, buffer.as_ptr() as *mut u8, len)
            };
        }
        // SAFETY: allocated in `share` with this layout.
        unsafe { dealloc(paddr as *mut u8, Self::layout(len)) };
    }
}

/// An identity `Hal` that shares in place (physical = host address of the buffer itself), so
/// that tests can check which physical bytes a mapping reaches.
pub(super) struct InPlaceHal;

// SAFETY: as `BounceHal`; `share` hands out the buffer's own address.
unsafe impl Hal for InPlaceHal {
    fn dma_alloc(pages: usize, d: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        BounceHal::dma_alloc(pages, d)
    }
    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: forwarded.
        unsafe { BounceHal::dma_dealloc(paddr, vaddr, pages) }
    }
    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap()
    }
    unsafe fn share(buffer: NonNull<[u8]>, _: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *const u8 as u64
    }
    unsafe fn unshare(_: PhysAddr, _: NonNull<[u8]>, _: BufferDirection) {}
}
