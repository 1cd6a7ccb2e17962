//! In-process test bench (feature `test-utils`): the project's guest driver
//! ([`virtio_iommu_driver::VirtIOIommu`], on virtio-drivers 0.13) drives this device model in
//! the same process, through a virtio-mmio register window.
//!
//! - [`GuestRam`]: guest RAM (a [`GuestMemoryMmap`]) shared by the device and the driver, with a
//!   page allocator. A guest-physical address is what the device sees; the host pointer to the
//!   same byte is what the driver touches.
//! - [`TestHal`]: virtio-drivers' `Hal`. `Hal` methods take no `self`, so the RAM they allocate
//!   from is a thread-local "current" RAM: each test thread has its own, so parallel tests do
//!   not interfere (so use a bench and the drivers made from it on one thread). `dma_alloc`
//!   hands out zeroed pages of it; `share` gives buffers already in
//!   guest RAM their guest-physical address, and copies other buffers into bounce pages that
//!   `unshare` copies back (device-writable directions) and frees.
//! - [`InProcessTransport`]: virtio-drivers' `Transport`, whose register accesses go to a
//!   [`MmioDevice`], exactly as a driver's MMIO accesses would (32-bit registers, config space
//!   accesses of the field's width).
//! - [`TestBed`]: a device, its RAM and its register window; makes drivers, transports and
//!   [`DmaEndpoint`]s.
//!
//! Requests are processed synchronously inside `notify`, so the driver's wait loop finds the
//! used buffer at its first poll.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use virtio_iommu_driver::{IommuError, IommuOptions, VirtIOIommu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::config::DeviceConfig;
use crate::device::{lock, IommuDevice, SharedDevice};
use crate::endpoint::{DmaEndpoint, DmaError};
use crate::mmio::{reg, MmioDevice};

/// The guest memory type of the test bench.
pub type GuestMem = GuestMemoryMmap<()>;

/// Default guest-physical base of the RAM (as QEMU's `-M virt`): never 0, so virtio-drivers
/// never sees DMA address 0.
pub const DEFAULT_RAM_BASE: u64 = 0x4000_0000;
/// Default RAM size in bytes (16 MiB).
pub const DEFAULT_RAM_SIZE: usize = 16 << 20;

const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Debug)]
struct Bounce {
    host: usize,
    len: usize,
    pages: u64,
}

#[derive(Debug, Default)]
struct RamInner {
    /// Free runs of pages: first page index → number of pages.
    free: BTreeMap<u64, u64>,
    /// Bounce buffers by guest-physical address.
    bounces: BTreeMap<u64, Bounce>,
    /// Pages handed out and not yet freed.
    outstanding: u64,
}

/// Guest RAM: one region of `size` bytes at guest-physical `base`, with a page allocator.
pub struct GuestRam {
    mem: GuestMem,
    base: u64,
    size: u64,
    /// Host address of the first byte, as an integer, only compared with the addresses of
    /// buffers given to `share` (the mapping lives as long as `mem`).
    host_base: usize,
    inner: Mutex<RamInner>,
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRam")
            .field("base", &self.base)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Why a [`TestBed`] could not be made.
#[derive(Debug)]
pub enum TestBedError {
    /// The RAM base or size is not page aligned, is empty, or the range overflows.
    BadRam,
    /// vm-memory could not map the RAM.
    Mmap(String),
    /// The device refused its queue size.
    Device(crate::device::DeviceError),
}

impl fmt::Display for TestBedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRam => write!(f, "RAM base/size must be page aligned and non-empty"),
            Self::Mmap(e) => write!(f, "cannot map guest RAM: {e}"),
            Self::Device(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TestBedError {}

impl GuestRam {
    /// Maps `size` bytes of RAM at guest-physical `base` (both page aligned, base not 0).
    ///
    /// # Errors
    ///
    /// [`TestBedError::BadRam`], [`TestBedError::Mmap`].
    pub fn new(base: u64, size: usize) -> Result<Self, TestBedError> {
        let size64 = size as u64;
        if base == 0 || !base.is_multiple_of(PAGE) || !size64.is_multiple_of(PAGE) || size == 0 {
            return Err(TestBedError::BadRam);
        }
        base.checked_add(size64).ok_or(TestBedError::BadRam)?;
        let mem = GuestMem::from_ranges(&[(GuestAddress(base), size)])
            .map_err(|e| TestBedError::Mmap(e.to_string()))?;
        let host_base = mem
            .get_host_address(GuestAddress(base))
            .map_err(|e| TestBedError::Mmap(e.to_string()))? as usize;
        let mut inner = RamInner::default();
        inner.free.insert(0, size64 / PAGE);
        Ok(Self {
            mem,
            base,
            size: size64,
            host_base,
            inner: Mutex::new(inner),
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// `(base, size)` in bytes.
    pub fn range(&self) -> (u64, u64) {
        (self.base, self.size)
    }

    fn inner(&self) -> MutexGuard<'_, RamInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates `pages` zeroed pages; returns their guest-physical address (page aligned).
    pub fn alloc_pages(&self, pages: u64) -> Option<u64> {
        if pages == 0 {
            return None;
        }
        let mut inner = self.inner();
        let (&start, &count) = inner.free.iter().find(|(_, &c)| c >= pages)?;
        inner.free.remove(&start);
        if count > pages {
            inner.free.insert(start + pages, count - pages);
        }
        inner.outstanding += pages;
        drop(inner);
        let paddr = self.base + start * PAGE;
        let zero = [0u8; PAGE_SIZE];
        for i in 0..pages {
            // In range: the pages were just taken from the free list of this RAM.
            let _ = self.mem.write_slice(&zero, GuestAddress(paddr + i * PAGE));
        }
        Some(paddr)
    }

    /// Frees `pages` pages at guest-physical `paddr` (from [`Self::alloc_pages`]). Unknown or
    /// out-of-range addresses are ignored.
    pub fn free_pages(&self, paddr: u64, pages: u64) {
        let Some(off) = paddr.checked_sub(self.base) else {
            return;
        };
        if !off.is_multiple_of(PAGE) || pages == 0 || off / PAGE + pages > self.size / PAGE {
            return;
        }
        let mut start = off / PAGE;
        let mut count = pages;
        let mut inner = self.inner();
        // Merge with the previous and next free runs.
        if let Some((&s, &c)) = inner.free.range(..start).next_back() {
            if s + c == start {
                inner.free.remove(&s);
                start = s;
                count += c;
            }
        }
        if let Some(&c) = inner.free.get(&(start + count)) {
            inner.free.remove(&(start + count));
            count += c;
        }
        inner.free.insert(start, count);
        inner.outstanding = inner.outstanding.saturating_sub(pages);
    }

    /// Host pointer of guest-physical `paddr`, if inside the RAM.
    fn host_of(&self, paddr: u64) -> Option<NonNull<u8>> {
        NonNull::new(self.mem.get_host_address(GuestAddress(paddr)).ok()?)
    }

    /// Guest-physical address of `len` bytes at host address `host`, if all inside the RAM.
    fn guest_of(&self, host: usize, len: usize) -> Option<u64> {
        let off = host.checked_sub(self.host_base)?;
        let end = off.checked_add(len)?;
        (end as u64 <= self.size).then(|| self.base + off as u64)
    }

    fn idle(&self) -> bool {
        let inner = self.inner();
        inner.outstanding == 0 && inner.bounces.is_empty()
    }
}

thread_local! {
    /// RAMs the `TestHal` of this thread knows, the current one last. Strong references: a RAM
    /// stays mapped while the driver may still hold pointers into it; entries nobody else
    /// holds and with nothing allocated are pruned.
    static RAMS: RefCell<Vec<Arc<GuestRam>>> = const { RefCell::new(Vec::new()) };
}

fn with_rams<R>(f: impl FnOnce(&mut Vec<Arc<GuestRam>>) -> R) -> R {
    RAMS.with(|r| {
        let mut rams = r.borrow_mut();
        rams.retain(|ram| Arc::strong_count(ram) > 1 || !ram.idle());
        f(&mut rams)
    })
}

fn current_ram() -> Option<Arc<GuestRam>> {
    with_rams(|rams| rams.last().cloned())
}

/// Makes `ram` the current RAM of this thread's [`TestHal`].
pub fn set_current_ram(ram: &Arc<GuestRam>) {
    with_rams(|rams| {
        rams.retain(|r| !Arc::ptr_eq(r, ram));
        rams.push(ram.clone());
    });
}

/// virtio-drivers `Hal` over the thread's current [`GuestRam`] (see the module documentation).
#[derive(Debug)]
pub struct TestHal;

// SAFETY: `dma_alloc` returns pointers to zeroed, page-aligned pages of an mmap'ed RAM region
// that the allocator hands out once until `dma_dealloc`, so they alias nothing; the RAM stays
// mapped while pages are outstanding (the thread-local registry keeps it alive). `share` returns
// guest-physical addresses of memory the device may access for the buffer's lifetime.
unsafe impl Hal for TestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let alloc = current_ram().and_then(|ram| {
            let paddr = ram.alloc_pages(pages as u64)?;
            Some((paddr, ram.host_of(paddr)?))
        });
        alloc.unwrap_or((0, NonNull::dangling()))
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let host = vaddr.as_ptr() as usize;
        with_rams(|rams| {
            if let Some(ram) = rams
                .iter()
                .find(|r| r.guest_of(host, pages * PAGE_SIZE) == Some(paddr))
            {
                ram.free_pages(paddr, pages as u64);
            }
        });
        0
    }

    /// The in-process transport has no MMIO BARs; this returns the RAM pointer when `paddr..+size`
    /// is RAM and panics otherwise (a test-bench misuse, not guest-controlled).
    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let host = current_ram().and_then(|ram| {
            ram.guest_of(ram.host_of(paddr)?.as_ptr() as usize, size)?;
            ram.host_of(paddr)
        });
        match host {
            Some(p) => p,
            None => panic!(
                "TestHal: no MMIO region at {paddr:#x} (the in-process transport needs none)"
            ),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let Some(ram) = current_ram() else {
            return 0;
        };
        let host = buffer.as_ptr() as *mut u8 as usize;
        let len = buffer.len();
        if let Some(paddr) = ram.guest_of(host, len) {
            return paddr;
        }
        let pages = (len as u64).div_ceil(PAGE).max(1);
        let Some(paddr) = ram.alloc_pages(pages) else {
            return 0;
        };
        // SAFETY: the caller guarantees `buffer` is valid for reads and not accessed by anyone
        // else during this call.
        let src = unsafe { buffer.as_ref() };
        let _ = ram.mem.write_slice(src, GuestAddress(paddr));
        ram.inner()
            .bounces
            .insert(paddr, Bounce { host, len, pages });
        paddr
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let host = buffer.as_ptr() as *mut u8 as usize;
        let len = buffer.len();
        with_rams(|rams| {
            for ram in rams.iter().rev() {
                let bounce = {
                    let mut inner = ram.inner();
                    match inner.bounces.get(&paddr) {
                        Some(b) if b.host == host && b.len == len => inner.bounces.remove(&paddr),
                        _ => None,
                    }
                };
                let Some(b) = bounce else {
                    continue;
                };
                if direction != BufferDirection::DriverToDevice {
                    // SAFETY: the caller guarantees `buffer` is valid for writes and not
                    // accessed by anyone else during this call.
                    let dst = unsafe { &mut *buffer.as_ptr() };
                    let _ = ram.mem.read_slice(dst, GuestAddress(paddr));
                }
                ram.free_pages(paddr, b.pages);
                return;
            }
        });
    }
}

/// virtio-drivers `Transport` whose register accesses go to a [`MmioDevice`] in this process.
#[derive(Debug, Clone)]
pub struct InProcessTransport {
    mmio: Arc<Mutex<MmioDevice<GuestMem>>>,
    _ram: Arc<GuestRam>,
}

impl InProcessTransport {
    fn regs(&self) -> MutexGuard<'_, MmioDevice<GuestMem>> {
        self.mmio.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.regs().read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(&self, offset: u64, v: u32) {
        self.regs().write(offset, &v.to_le_bytes());
    }

    fn config_size(&self) -> usize {
        size_of::<virtio_iommu_driver::wire::Config>()
    }
}

impl Transport for InProcessTransport {
    fn device_type(&self) -> DeviceType {
        // An unknown ID cannot be expressed as a `DeviceType`; report Memory (24), which is not
        // the IOMMU, so the driver refuses it.
        DeviceType::try_from(self.read32(reg::DEVICE_ID)).unwrap_or(DeviceType::Memory)
    }

    fn read_device_features(&mut self) -> u64 {
        self.write32(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read32(reg::DEVICE_FEATURES);
        self.write32(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read32(reg::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.write32(reg::DRIVER_FEATURES_SEL, 0);
        self.write32(reg::DRIVER_FEATURES, driver_features as u32);
        self.write32(reg::DRIVER_FEATURES_SEL, 1);
        self.write32(reg::DRIVER_FEATURES, (driver_features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.write32(reg::QUEUE_SEL, queue.into());
        self.read32(reg::QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.write32(reg::QUEUE_NOTIFY, queue.into());
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.read32(reg::STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.write32(reg::STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.write32(reg::QUEUE_SEL, queue.into());
        self.write32(reg::QUEUE_NUM, size);
        self.write32(reg::QUEUE_DESC_LOW, descriptors as u32);
        self.write32(reg::QUEUE_DESC_HIGH, (descriptors >> 32) as u32);
        self.write32(reg::QUEUE_DRIVER_LOW, driver_area as u32);
        self.write32(reg::QUEUE_DRIVER_HIGH, (driver_area >> 32) as u32);
        self.write32(reg::QUEUE_DEVICE_LOW, device_area as u32);
        self.write32(reg::QUEUE_DEVICE_HIGH, (device_area >> 32) as u32);
        self.write32(reg::QUEUE_READY, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.write32(reg::QUEUE_SEL, queue.into());
        self.write32(reg::QUEUE_READY, 0);
        for r in [
            reg::QUEUE_NUM,
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DESC_HIGH,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
        ] {
            self.write32(r, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write32(reg::QUEUE_SEL, queue.into());
        self.read32(reg::QUEUE_READY) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let s = self.read32(reg::INTERRUPT_STATUS);
        if s != 0 {
            self.write32(reg::INTERRUPT_ACK, s);
        }
        InterruptStatus::from_bits_truncate(s)
    }

    fn read_config_generation(&self) -> u32 {
        self.read32(reg::CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let size = size_of::<T>();
        if align_of::<T>() > 4 || !offset.is_multiple_of(align_of::<T>()) {
            return Err(virtio_drivers::Error::InvalidParam);
        }
        if offset
            .checked_add(size)
            .is_none_or(|end| end > self.config_size())
        {
            return Err(virtio_drivers::Error::ConfigSpaceTooSmall);
        }
        let mut buf = vec![0u8; size];
        self.regs().read(reg::CONFIG + offset as u64, &mut buf);
        T::read_from_bytes(&buf).map_err(|_| virtio_drivers::Error::InvalidParam)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        let size = size_of::<T>();
        if align_of::<T>() > 4 || !offset.is_multiple_of(align_of::<T>()) {
            return Err(virtio_drivers::Error::InvalidParam);
        }
        if offset
            .checked_add(size)
            .is_none_or(|end| end > self.config_size())
        {
            return Err(virtio_drivers::Error::ConfigSpaceTooSmall);
        }
        self.regs()
            .write(reg::CONFIG + offset as u64, value.as_bytes());
        Ok(())
    }
}

/// A virtio-iommu device model with its guest RAM and MMIO window, ready to be driven by the
/// guest driver and used by DMA endpoints.
///
/// Creating a `TestBed` makes its RAM the current RAM of this thread's [`TestHal`]. Drop the
/// drivers made from it before the `TestBed` when possible (their RAM stays mapped anyway
/// while they hold allocations).
#[derive(Debug)]
pub struct TestBed {
    ram: Arc<GuestRam>,
    device: SharedDevice<GuestMem>,
    mmio: Arc<Mutex<MmioDevice<GuestMem>>>,
}

impl TestBed {
    /// A test bench for `config` with [`DEFAULT_RAM_SIZE`] bytes of RAM at
    /// [`DEFAULT_RAM_BASE`].
    ///
    /// # Panics
    ///
    /// If the RAM cannot be mapped (host out of memory); use [`Self::try_new`] to handle it.
    pub fn new(config: DeviceConfig) -> Self {
        match Self::try_new(config) {
            Ok(t) => t,
            Err(e) => panic!("TestBed::new: {e}"),
        }
    }

    /// [`Self::new`] returning errors.
    ///
    /// # Errors
    ///
    /// [`TestBedError`].
    pub fn try_new(config: DeviceConfig) -> Result<Self, TestBedError> {
        Self::with_ram(config, DEFAULT_RAM_BASE, DEFAULT_RAM_SIZE)
    }

    /// A test bench with `size` bytes of RAM at guest-physical `base` (both page aligned).
    ///
    /// # Errors
    ///
    /// [`TestBedError`].
    pub fn with_ram(config: DeviceConfig, base: u64, size: usize) -> Result<Self, TestBedError> {
        let ram = Arc::new(GuestRam::new(base, size)?);
        let device =
            IommuDevice::new_shared(config, ram.memory().clone()).map_err(TestBedError::Device)?;
        let mmio = Arc::new(Mutex::new(MmioDevice::new(device.clone())));
        set_current_ram(&ram);
        Ok(Self { ram, device, mmio })
    }

    /// Makes this bench's RAM the one this thread's [`TestHal`] allocates from (needed only
    /// when a thread uses several benches).
    pub fn make_current(&self) {
        set_current_ram(&self.ram);
    }

    /// A transport on this bench's register window.
    pub fn transport(&self) -> InProcessTransport {
        InProcessTransport {
            mmio: self.mmio.clone(),
            _ram: self.ram.clone(),
        }
    }

    /// Initialises the guest driver on this device with [`IommuOptions::default`].
    ///
    /// # Errors
    ///
    /// Those of [`VirtIOIommu::new`].
    pub fn driver(&self) -> Result<VirtIOIommu<TestHal, InProcessTransport>, IommuError> {
        self.driver_with(IommuOptions::default())
    }

    /// Initialises the guest driver with `options`.
    ///
    /// # Errors
    ///
    /// Those of [`VirtIOIommu::new`].
    pub fn driver_with(
        &self,
        options: IommuOptions,
    ) -> Result<VirtIOIommu<TestHal, InProcessTransport>, IommuError> {
        self.make_current();
        VirtIOIommu::new(self.transport(), options)
    }

    /// A DMA endpoint with ID `endpoint`.
    ///
    /// # Errors
    ///
    /// [`DmaError::UnknownEndpoint`].
    pub fn dma_endpoint(&self, endpoint: u32) -> Result<DmaEndpoint<GuestMem>, DmaError> {
        DmaEndpoint::new(self.device.clone(), endpoint)
    }

    /// The device, locked. Do not hold the guard while calling the driver.
    pub fn device(&self) -> MutexGuard<'_, IommuDevice<GuestMem>> {
        lock(&self.device)
    }

    /// The shared device.
    pub fn shared_device(&self) -> &SharedDevice<GuestMem> {
        &self.device
    }

    /// The register window, locked. Do not hold the guard while calling the driver.
    pub fn mmio(&self) -> MutexGuard<'_, MmioDevice<GuestMem>> {
        self.mmio.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMem {
        self.ram.memory()
    }

    /// Allocates `bytes` (rounded up to pages) of zeroed RAM; returns the guest-physical
    /// address, page aligned. `None` when the RAM is full.
    pub fn alloc(&self, bytes: usize) -> Option<u64> {
        self.ram.alloc_pages((bytes as u64).div_ceil(PAGE).max(1))
    }

    /// Reads guest-physical memory (untranslated).
    ///
    /// # Errors
    ///
    /// The range is not entirely RAM.
    pub fn read_phys(&self, paddr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.memory().read_slice(buf, GuestAddress(paddr))
    }

    /// Writes guest-physical memory (untranslated).
    ///
    /// # Errors
    ///
    /// The range is not entirely RAM.
    pub fn write_phys(&self, paddr: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.memory().write_slice(data, GuestAddress(paddr))
    }
}
