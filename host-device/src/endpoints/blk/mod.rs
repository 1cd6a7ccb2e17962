//! A virtio-blk device core (virtio v1.3 §5.2) whose every memory access — its virtqueue's
//! rings as well as the request buffers — goes through the virtio-iommu's translation for one
//! endpoint, as a modern virtio-pci device with `VIRTIO_F_ACCESS_PLATFORM` carries it behind
//! the IOMMU (§6.1: the device uses the platform's address translation for all its accesses;
//! QEMU's virtio devices with `iommu_platform=on` likewise reach their rings through the
//! device's DMA address space). [`BlkCore`] implements [`VirtioCore`]; a transport serves it.
//!
//! - Device ID 2, PCI class 0x010000 (mass storage, SCSI), QEMU's class for virtio-blk-pci
//!   (`PCI_CLASS_STORAGE_SCSI`).
//! - One requestq of at most [`QUEUE_SIZE`] descriptors. (QEMU's virtio-blk-pci defaults to
//!   one queue per vCPU with `VIRTIO_BLK_F_MQ`; one queue needs no MQ.)
//! - Features offered: `VERSION_1` and `ACCESS_PLATFORM` (both required at FEATURES_OK: the
//!   device has no untranslated path), `SEG_MAX` ([`SEG_MAX`] = queue size − 2, as QEMU's
//!   `seg-max-adjust`), `BLK_SIZE` (512), `FLUSH`, `RO` for a read-only device, and
//!   `VIRTIO_RING_F_INDIRECT_DESC` (virtio-queue follows indirect tables, through the
//!   translation like every other access; a chain still counts at most the queue size in
//!   descriptors). Not offered: event index, `CONFIG_WCE` (the cache mode follows the
//!   negotiation of `FLUSH`, §5.2.5), discard, write zeroes, topology, geometry, multiqueue.
//! - Capacity: the file's length at creation, rounded down to 512-byte sectors (a trailing
//!   partial sector is never read or written); it does not follow later size changes.
//! - Disk I/O: `pread`/`pwrite` ([`std::os::unix::fs::FileExt`]) through a 64 KiB bounce
//!   buffer; FLUSH is `fdatasync` ([`File::sync_data`]). Without `FLUSH` negotiated the cache
//!   is writethrough (§5.2.5): each OUT is synced before it completes. Requests are completed
//!   synchronously, in order.
//! - Requests: see [`request`] for the framing rules and statuses.
//!
//! Unreachable rings: the available index or an available ring entry that does not translate
//! (the IOMMU reports the fault), an available index claiming more chains than the queue
//! holds, a head index outside the descriptor table (it cannot be returned), or a used-ring
//! write that fails ⇒ DEVICE_NEEDS_RESET and a configuration interrupt;
//! the device then processes nothing until reset, so a broken ring costs one fault report in
//! all, never a spin. Why not skip and go on: a request that cannot be fetched cannot be
//! answered, and a used ring that cannot be written cannot answer any; the spec's way to say
//! so is DEVICE_NEEDS_RESET (§2.1.1). A descriptor that does not translate only truncates its
//! chain, which is returned with used length 0; a buffer that does not translate fails its
//! request with `S_IOERR` (see [`request`]), as the status still reaches the driver.
//!
//! Locking: every access translates through the IOMMU ([`crate::translate::EndpointIommu`]
//! locks the [`SharedDevice`] for each one); a translation fault is reported on the IOMMU's
//! event queue from this thread, so the IOMMU's interrupt handler may run while the blk core
//! is in a [`VirtioCore`] call: that handler must not lock the blk core (or a lock held
//! around it).
//!
//! Queue activation checks the size and alignment only: the rings' IOVAs are translated at
//! their first use (as QEMU does), so no fault is reported for a queue a driver enables
//! before mapping it.

pub mod request;
pub mod wire;

use std::fmt;
use std::fs::File;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use crate::device::{lock, status as dev_status, QueueError, QueueSetup, SharedDevice};
use crate::device::{INT_CONFIG, INT_VRING};
use crate::translate::EndpointIommu;
use crate::transport::{InterruptCause, InterruptHandler, VirtioCore};
use request::{handle_request, Disk, Outcome};
use wire::{feature, ID_BYTES, SECTOR_SIZE};

/// Largest (and default) requestq size, in descriptors.
pub const QUEUE_SIZE: u16 = 256;
/// `seg_max`: data descriptors per request (queue size minus the header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Default [`BlkOptions::max_requests_per_notify`].
pub const DEFAULT_MAX_REQUESTS_PER_NOTIFY: usize = 64;
/// Default [`BlkOptions::max_request_bytes`]: 16 MiB, well above Linux's default
/// `max_sectors_kb` (a few MiB at most).
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 16 << 20;

/// The guest memory a [`BlkCore`] reaches: IOVAs of its endpoint, translated by the IOMMU.
pub type BlkMemory = IommuMemory<GuestMemoryMmap, EndpointIommu<GuestMemoryMmap>>;

/// Why a [`BlkCore`] could not be created.
#[derive(Debug)]
pub enum BlkError {
    /// The disk's size could not be read.
    Disk(std::io::Error),
    /// The endpoint ID is not managed by the IOMMU.
    UnknownEndpoint(u32),
    /// The serial is longer than 20 bytes (the GET_ID string).
    SerialTooLong(usize),
    /// An option is out of range (named).
    InvalidOption(&'static str),
    /// virtio-queue refused the queue size (cannot happen with [`QUEUE_SIZE`]).
    Queue(virtio_queue::Error),
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disk(e) => write!(f, "cannot read the disk's size: {e}"),
            Self::UnknownEndpoint(e) => write!(f, "endpoint {e} is not managed by the IOMMU"),
            Self::SerialTooLong(n) => write!(f, "serial of {n} bytes, more than {ID_BYTES}"),
            Self::InvalidOption(o) => write!(f, "invalid option {o}"),
            Self::Queue(e) => write!(f, "cannot create the virtqueue: {e}"),
        }
    }
}

impl std::error::Error for BlkError {}

/// Options of a [`BlkCore`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct BlkOptions {
    /// Offer `VIRTIO_BLK_F_RO` and answer OUT with `S_IOERR` (§5.2.6.1).
    pub read_only: bool,
    /// The GET_ID string, at most 20 bytes (NUL-padded on the wire).
    pub serial: Vec<u8>,
    /// Chains processed per round ([`VirtioCore::notify`], [`VirtioCore::service`]); at least 1.
    pub max_requests_per_notify: usize,
    /// Largest data length in bytes of one IN or OUT; longer ones get `S_IOERR`. At least 512.
    pub max_request_bytes: u64,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            serial: b"virtio-iommu-blk".to_vec(),
            max_requests_per_notify: DEFAULT_MAX_REQUESTS_PER_NOTIFY,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// Cumulative counters (kept across device resets).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct BlkCounters {
    /// Chains taken from the available ring.
    pub requests: u64,
    /// Requests answered `S_OK`.
    pub ok: u64,
    /// Requests answered `S_IOERR`.
    pub ioerr: u64,
    /// Requests answered `S_UNSUPP`.
    pub unsupp: u64,
    /// Chains returned with used length 0 and no status (malformed, or status unreachable).
    pub unanswered: u64,
    /// Requests failed because a data or header range did not translate (each such failure
    /// was reported by the IOMMU as a fault, unless the translated range was not RAM).
    pub dma_errors: u64,
    /// Bytes read from the disk into guest memory (IN).
    pub bytes_read: u64,
    /// Bytes written from guest memory to the disk (OUT).
    pub bytes_written: u64,
    /// Disk syncs (`fdatasync`): FLUSH requests, and OUT requests in writethrough mode
    /// (`VIRTIO_BLK_F_FLUSH` not negotiated).
    pub flushes: u64,
    /// Used-buffer interrupts raised.
    pub interrupts: u64,
    /// Times DEVICE_NEEDS_RESET was set.
    pub needs_reset: u64,
}

impl fmt::Display for BlkCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests {} (ok {}, ioerr {}, unsupp {}, unanswered {}, dma errors {}), \
             read {} B, written {} B, flushes {}, interrupts {}, needs-reset {}",
            self.requests,
            self.ok,
            self.ioerr,
            self.unsupp,
            self.unanswered,
            self.dma_errors,
            self.bytes_read,
            self.bytes_written,
            self.flushes,
            self.interrupts,
            self.needs_reset
        )
    }
}

/// A virtio-blk device core over a disk file, DMA through the virtio-iommu for one endpoint.
pub struct BlkCore {
    disk: File,
    capacity: u64,
    read_only: bool,
    serial: [u8; ID_BYTES],
    max_requests: usize,
    max_request_bytes: u64,
    iommu: SharedDevice<GuestMemoryMmap>,
    endpoint: u32,
    mem: BlkMemory,
    queue: Queue,
    driver_features: u64,
    status: u8,
    interrupt_status: u32,
    /// Chains available at the last notification and not processed yet (at most the queue
    /// size).
    owed: u16,
    irq: Option<InterruptHandler>,
    counters: BlkCounters,
    bounce: Vec<u8>,
}

impl fmt::Debug for BlkCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkCore")
            .field("endpoint", &self.endpoint)
            .field("capacity", &self.capacity)
            .field("status", &self.status)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl BlkCore {
    /// A read-write device over `disk` with [`BlkOptions::default`], as endpoint `endpoint`
    /// of `iommu`; guest memory starts empty ([`VirtioCore::set_memory`]).
    ///
    /// # Errors
    ///
    /// As [`Self::with_options`].
    pub fn new(
        disk: File,
        iommu: SharedDevice<GuestMemoryMmap>,
        endpoint: u32,
    ) -> Result<Self, BlkError> {
        Self::with_options(disk, iommu, endpoint, BlkOptions::default())
    }

    /// A device over `disk` with `options`.
    ///
    /// # Errors
    ///
    /// [`BlkError::Disk`] if the file's size cannot be read, [`BlkError::UnknownEndpoint`],
    /// [`BlkError::SerialTooLong`], [`BlkError::InvalidOption`] (zero requests per round, or
    /// a request limit below 512 bytes).
    pub fn with_options(
        disk: File,
        iommu: SharedDevice<GuestMemoryMmap>,
        endpoint: u32,
        options: BlkOptions,
    ) -> Result<Self, BlkError> {
        let len = disk.metadata().map_err(BlkError::Disk)?.len();
        if !lock(&iommu).config().has_endpoint(endpoint) {
            return Err(BlkError::UnknownEndpoint(endpoint));
        }
        if options.serial.len() > ID_BYTES {
            return Err(BlkError::SerialTooLong(options.serial.len()));
        }
        if options.max_requests_per_notify == 0 {
            return Err(BlkError::InvalidOption("max_requests_per_notify"));
        }
        if options.max_request_bytes < SECTOR_SIZE {
            return Err(BlkError::InvalidOption("max_request_bytes"));
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..options.serial.len()].copy_from_slice(&options.serial);
        let mem = Self::memory(&iommu, endpoint, GuestMemoryMmap::new());
        Ok(Self {
            disk,
            capacity: len / SECTOR_SIZE,
            read_only: options.read_only,
            serial,
            max_requests: options.max_requests_per_notify,
            max_request_bytes: options.max_request_bytes,
            iommu,
            endpoint,
            mem,
            queue: Queue::new(QUEUE_SIZE).map_err(BlkError::Queue)?,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            owed: 0,
            irq: None,
            counters: BlkCounters::default(),
            bounce: Vec::new(),
        })
    }

    fn memory(
        iommu: &SharedDevice<GuestMemoryMmap>,
        endpoint: u32,
        mem: GuestMemoryMmap,
    ) -> BlkMemory {
        IommuMemory::new(mem, EndpointIommu::new(iommu.clone(), endpoint), true, ())
    }

    /// The endpoint ID the accesses are translated for.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Counters.
    pub fn counters(&self) -> BlkCounters {
        self.counters
    }

    /// The device's view of memory (IOVAs).
    pub fn dma_memory(&self) -> &BlkMemory {
        &self.mem
    }

    /// Whether DEVICE_NEEDS_RESET is set.
    pub fn needs_reset(&self) -> bool {
        self.status & dev_status::DEVICE_NEEDS_RESET != 0
    }

    /// The offered features.
    pub fn offered_features(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::ACCESS_PLATFORM
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::RING_INDIRECT_DESC;
        if self.read_only {
            f |= feature::RO;
        }
        f
    }

    /// The configuration space (§5.2.4): capacity, `seg_max`, `blk_size` 512; other fields 0.
    pub fn config_space(&self) -> wire::Config {
        wire::Config {
            capacity: U64::new(self.capacity),
            seg_max: U32::new(SEG_MAX),
            blk_size: U32::new(SECTOR_SIZE as u32),
            ..wire::Config::default()
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.queue.reset();
        self.interrupt_status = 0;
        self.owed = 0;
    }

    fn can_process(&self) -> bool {
        let s = self.status;
        s & dev_status::DRIVER_OK != 0
            && s & dev_status::FEATURES_OK != 0
            && s & (dev_status::DEVICE_NEEDS_RESET | dev_status::FAILED) == 0
            && self.queue.ready()
    }

    fn raise(&mut self, bits: u32, cause: InterruptCause) {
        self.interrupt_status |= bits;
        if let Some(irq) = self.irq.as_mut() {
            irq(cause);
        }
    }

    /// Sets DEVICE_NEEDS_RESET and raises a configuration interrupt (§2.1.2).
    fn set_needs_reset(&mut self) {
        if !self.needs_reset() {
            self.status |= dev_status::DEVICE_NEEDS_RESET;
            self.counters.needs_reset += 1;
            self.raise(INT_CONFIG, InterruptCause::Config);
        }
    }

    /// Chains in the available ring not yet taken; `None` if the index does not translate or
    /// claims more than the queue holds.
    fn available(&self) -> Option<u16> {
        let idx = self.queue.avail_idx(&self.mem, Ordering::Acquire).ok()?;
        let n = (idx - Wrapping(self.queue.next_avail())).0;
        (n <= self.queue.size()).then_some(n)
    }

    /// One round: at most `max_requests_per_notify` chains.
    fn process(&mut self) -> usize {
        if !self.can_process() {
            self.owed = 0;
            return 0;
        }
        let Some(mut avail) = self.available() else {
            self.owed = 0;
            self.set_needs_reset();
            return 0;
        };
        // `can_process` implies FEATURES_OK: the driver features are the negotiated ones.
        let negotiated = self.driver_features;
        let max_descriptors = usize::from(self.queue.size());
        let mut done = 0;
        let mut used = 0;
        while done < self.max_requests {
            if avail == 0 {
                self.owed = 0;
                break;
            }
            let Self {
                queue,
                mem,
                disk,
                bounce,
                ..
            } = self;
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                // The available ring entry did not translate.
                self.owed = 0;
                self.set_needs_reset();
                break;
            };
            avail -= 1;
            done += 1;
            self.owed = self.owed.saturating_sub(1);
            let head = chain.head_index();
            let mut ctx = Disk {
                file: disk,
                capacity: self.capacity,
                read_only: self.read_only,
                flush: negotiated & feature::FLUSH != 0,
                serial: &self.serial,
                max_request_bytes: self.max_request_bytes,
                bounce,
            };
            let handled = handle_request(&*mem, chain, max_descriptors, &mut ctx);
            let c = &mut self.counters;
            c.requests += 1;
            c.bytes_read += handled.bytes_read;
            c.bytes_written += handled.bytes_written;
            c.flushes += u64::from(handled.flushed);
            match handled.outcome {
                Outcome::Completed {
                    status, dma_error, ..
                } => {
                    match status {
                        wire::status::OK => c.ok += 1,
                        wire::status::UNSUPP => c.unsupp += 1,
                        _ => c.ioerr += 1,
                    }
                    c.dma_errors += u64::from(dma_error);
                }
                Outcome::Unanswered(_) => c.unanswered += 1,
            }
            if self
                .queue
                .add_used(&self.mem, head, handled.used_len)
                .is_err()
            {
                self.owed = 0;
                self.set_needs_reset();
                break;
            }
            used += 1;
        }
        if used > 0 {
            self.signal_used();
        }
        done
    }

    /// Raises the queue interrupt unless the driver set `VIRTQ_AVAIL_F_NO_INTERRUPT` (§2.7.10;
    /// event index is not offered). Flags that do not translate count as 0.
    fn signal_used(&mut self) {
        let flags: u16 = self
            .mem
            .load(GuestAddress(self.queue.avail_ring()), Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0);
        if flags & 1 == 0 {
            self.counters.interrupts += 1;
            self.raise(INT_VRING, InterruptCause::Queue(0));
        }
    }
}

/// virtio-blk behind any transport: device ID 2, PCI class 0x010000, one requestq.
impl VirtioCore for BlkCore {
    type Memory = GuestMemoryMmap;
    fn device_id(&self) -> u32 {
        wire::VIRTIO_ID_BLOCK
    }
    fn pci_class(&self) -> u32 {
        0x01_00_00
    }
    fn set_memory(&mut self, mem: GuestMemoryMmap) {
        self.mem = Self::memory(&self.iommu, self.endpoint, mem);
    }
    fn num_queues(&self) -> u16 {
        1
    }
    fn queue_max_size(&self, index: u16) -> u16 {
        if index == 0 {
            QUEUE_SIZE
        } else {
            0
        }
    }
    fn device_features(&self) -> u64 {
        self.offered_features()
    }
    fn driver_features(&self) -> u64 {
        self.driver_features
    }
    fn write_driver_features(&mut self, select: u32, value: u32) {
        if self.status & dev_status::FEATURES_OK != 0 {
            return;
        }
        let v = u64::from(value);
        self.driver_features = match select {
            0 => (self.driver_features & !0xffff_ffff) | v,
            1 => (self.driver_features & 0xffff_ffff) | (v << 32),
            _ => self.driver_features,
        };
    }
    fn status(&self) -> u8 {
        self.status
    }
    /// 0 resets; bits are only added (DEVICE_NEEDS_RESET cannot be set by the driver);
    /// FEATURES_OK is kept only if the driver features are offered ones and include
    /// `VERSION_1` and `ACCESS_PLATFORM`.
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = old | (value & !dev_status::DEVICE_NEEDS_RESET);
        if new & dev_status::FEATURES_OK != 0 && old & dev_status::FEATURES_OK == 0 {
            let wanted = self.driver_features;
            let required = feature::VERSION_1 | feature::ACCESS_PLATFORM;
            if wanted & !self.offered_features() != 0 || wanted & required != required {
                new &= !dev_status::FEATURES_OK;
            }
        }
        self.status = new;
    }
    fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }
    fn ack_interrupt(&mut self, bits: u32) {
        self.interrupt_status &= !bits;
    }
    fn config_generation(&self) -> u32 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_space();
        let bytes = cfg.as_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    /// Every field is read-only (`CONFIG_WCE` is not offered): writes are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Queue 0 only; size a power of two up to [`QUEUE_SIZE`]; descriptor table 16-byte,
    /// available ring 2-byte, used ring 4-byte aligned. The addresses are IOVAs, translated
    /// at use.
    fn activate_queue(&mut self, index: u16, setup: QueueSetup) -> Result<(), QueueError> {
        if index != 0 {
            return Err(QueueError::NoSuchQueue(index));
        }
        let q = &mut self.queue;
        q.reset();
        self.owed = 0;
        if setup.size == 0 || setup.size > QUEUE_SIZE {
            return Err(QueueError::InvalidSize(setup.size));
        }
        q.try_set_size(setup.size)
            .map_err(|_| QueueError::InvalidSize(setup.size))?;
        let set = q
            .try_set_desc_table_address(GuestAddress(setup.desc_table))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(setup.avail_ring)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(setup.used_ring)));
        if set.is_err() {
            q.reset();
            return Err(QueueError::Misaligned);
        }
        q.set_event_idx(false);
        q.set_ready(true);
        Ok(())
    }
    fn deactivate_queue(&mut self, index: u16) {
        if index == 0 {
            self.queue.reset();
            self.owed = 0;
        }
    }
    /// Queue 0: every chain now available is owed, and the first round runs (at most
    /// [`BlkOptions::max_requests_per_notify`] chains); other indexes are ignored.
    fn notify(&mut self, index: u16) {
        if index != 0 || !self.can_process() {
            return;
        }
        match self.available() {
            Some(n) => self.owed = self.owed.max(n),
            None => {
                self.set_needs_reset();
                return;
            }
        }
        self.process();
    }
    fn pending(&self) -> bool {
        self.owed > 0 && self.can_process()
    }
    fn service(&mut self) -> usize {
        if self.pending() {
            self.process()
        } else {
            0
        }
    }
    fn set_interrupt_handler(&mut self, handler: Option<InterruptHandler>) {
        self.irq = handler;
    }
}
