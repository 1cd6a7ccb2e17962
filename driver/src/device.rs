//! The virtio-iommu device driver (virtio v1.3 §5.13) on virtio-drivers' `Transport`, `Hal` and
//! `VirtQueue`.

use crate::error::IommuError;
use crate::held::{held, held_array, Held, HeldQueue};
use crate::parse::{parse_fault, parse_probe_properties, FaultEvent, ProbeProperty};
use crate::wire::{
    config_offset, Features, MapFlags, ProbePropertyHeader, ReqAttach, ReqDetach, ReqHead, ReqMap,
    ReqProbe, ReqTail, ReqUnmap, RequestType, Status, ATTACH_F_BYPASS, EVENTQ, REQUESTQ,
};
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::IntoBytes;

mod nb;
pub use nb::{InterruptReport, NbRequest, NbToken, NB_SLOTS};

/// Number of descriptors of `requestq` when the device allows it (QEMU offers 256). Every
/// request uses 2 descriptors (device-readable part, device-writable part), so at most
/// `REQUESTQ_SIZE / 2` = 64 requests are in flight at once. Not 256: virtio-drivers'
/// `VirtQueue::new` assembles the queue (16 bytes per descriptor) and its descriptor shadow (16
/// more) in its own stack frame, 8 KiB for 256 descriptors, which alone would exceed the
/// driver's 8 KiB stack budget (BENCHMARKS.md, "Stack use of the driver"); in the firmware's
/// bench, batches with 64 requests per notification were as fast as with 128, within the
/// run-to-run noise. When the device's `max_queue_size`
/// is smaller, the driver falls back to [`REQUESTQ_MIN_SIZE`]; see
/// [`VirtIOIommu::requestq_size`].
pub const REQUESTQ_SIZE: usize = 128;
/// Number of descriptors of `requestq` when the device's `max_queue_size` is below
/// [`REQUESTQ_SIZE`] (32 requests in flight). A device that cannot take even this many is
/// refused with [`IommuError::InvalidConfig`].
pub const REQUESTQ_MIN_SIZE: usize = 64;
/// Most requests in one [`Batch`]. Each has its own 64-byte slot, for the whole batch, in a DMA
/// area of `BATCH_CAPACITY * 64` bytes (32 KiB) allocated by [`VirtIOIommu::new`].
pub const BATCH_CAPACITY: usize = 512;
/// Number of descriptors of `eventq`; this many event buffers are kept posted.
pub const EVENTQ_SIZE: usize = 64;
/// Size in bytes of each event buffer: room for `struct virtio_iommu_fault` (24 bytes) and
/// for a longer future format.
pub const EVENT_BUFFER_SIZE: usize = 64;
/// Largest `probe_size` (bytes) this driver accepts; a larger value is
/// [`IommuError::InvalidConfig`].
pub const MAX_PROBE_SIZE: u32 = 1 << 20;
/// The byte the driver fills every device-writable part with before posting it: request tails
/// (synchronous and batched), PROBE's `properties` and tail, and eventq buffers. 0xff is no
/// status of §5.13.6 (those are 0..=8), so a tail that still holds it after the device returned
/// the request was not written: [`IommuError::NotWritten`], never read as a status. An eventq
/// buffer that still holds it has non-zero `reserved` bytes, so it is ignored as a fault report
/// (§5.13.6.9). [`VirtIOIommu::request_raw`] fills its writable parts with it too.
pub const WRITABLE_FILL: u8 = 0xff;

const TAIL: usize = size_of::<ReqTail>();
/// Bytes per batch slot: the device-readable part (MAP: 36 bytes, UNMAP: 28) at offset 0, the
/// 4-byte device-writable tail at [`BATCH_TAIL_AT`].
const BATCH_SLOT: usize = 64;
const BATCH_TAIL_AT: usize = 48;
/// Most descriptors per direction in [`VirtIOIommu::request_raw`].
const MAX_RAW_PARTS: usize = 16;
const PROBE_HEAD: usize = size_of::<ReqProbe>();

/// How long the driver waits for the device: for a request to complete, for a reset to finish,
/// and for the configuration to read consistently.
///
/// A request wait is a poll loop over the used ring. It ends with [`IommuError::Timeout`] after
/// `max_polls` polls, or — when `clock` is given — once `clock()` has advanced by `timeout_ns`
/// (measured from the 256th poll: the clock is not read for requests that complete sooner).
/// Every 256 polls the device status is read: DEVICE_NEEDS_RESET ends the wait with
/// [`IommuError::DeviceNeedsReset`], DRIVER_OK gone (the device reset itself) with
/// [`IommuError::DeviceReset`]. A [`Batch`] waits this long for each of its requests.
///
/// After writing 0 to the device status (reset, in [`VirtIOIommu::new`] and on drop), the
/// driver reads the status until it reads 0 (virtio §2.4.2, §4.1.4.3.2), bounded the same way:
/// at most `max_polls` status reads, or `timeout_ns` of `clock` from the 256th read.
/// Without a clock a device that never finishes its reset costs the full `max_polls` status
/// reads (default 10^8), each a trapped MMIO access on real hardware or under a hypervisor
/// (microseconds each: minutes in total); set `clock` so that waits end after `timeout_ns`.
///
/// Every configuration read (§5.13.4) is a consistent read (virtio §2.5.1: the config
/// generation is read before and after, and the fields read again if it changed), with at most
/// `config_attempts` attempts (two generation reads each; 0 counts as 1).
#[derive(Clone, Copy, Debug)]
pub struct WaitPolicy {
    /// Upper bound on used-ring polls per request, and on status reads per reset.
    pub max_polls: u64,
    /// Optional monotonic clock in nanoseconds.
    pub clock: Option<fn() -> u64>,
    /// Time budget in nanoseconds when `clock` is set.
    pub timeout_ns: u64,
    /// Upper bound on attempts per consistent configuration read (default 64); when the config
    /// generation changed during every one, the read fails with [`IommuError::ConfigUnstable`].
    pub config_attempts: u32,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self {
            max_polls: 100_000_000,
            clock: None,
            timeout_ns: 2_000_000_000,
            config_attempts: 64,
        }
    }
}

/// Options for [`VirtIOIommu::new`].
#[derive(Clone, Copy, Debug, Default)]
pub struct IommuOptions {
    /// Request completion wait policy.
    pub wait: WaitPolicy,
    /// Accept the legacy `VIRTIO_IOMMU_F_BYPASS` when offered (unattached endpoints then bypass
    /// translation with no way to turn it off). Off by default.
    pub accept_legacy_bypass: bool,
}

/// The device configuration as read at initialisation (§5.13.4), with the defaults the spec
/// gives for fields whose feature was not negotiated.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct IommuConfig {
    /// Page sizes the device supports (bit n: 2^n bytes). Never 0.
    pub page_size_mask: u64,
    /// Smallest page size in bytes (lowest set bit of `page_size_mask`): every MAP address and
    /// size is a multiple of it.
    pub granule: u64,
    /// Translatable IOVAs, `(start, end)` inclusive; `(0, u64::MAX)` without INPUT_RANGE.
    pub input_range: (u64, u64),
    /// Usable domain IDs, `(start, end)` inclusive; `(0, u32::MAX)` without DOMAIN_RANGE.
    pub domain_range: (u32, u32),
    /// Size in bytes of PROBE's `properties` buffer; 0 without PROBE.
    pub probe_size: u32,
}

/// Counters of what the driver saw on the event queue.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct EventStats {
    /// Fault reports delivered to the caller.
    pub delivered: u64,
    /// Reports ignored as the spec requires (used length < 24 bytes, non-zero `reserved` —
    /// which includes a buffer the device returned without writing it, see [`WRITABLE_FILL`])
    /// or with a used length above [`EVENT_BUFFER_SIZE`]. Each one's buffer is posted again.
    pub ignored: u64,
}

/// Counters of what the driver sent on `requestq`.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct RequestStats {
    /// Requests posted (synchronous, raw and batched).
    pub requests: u64,
    /// Notifications (`Transport::notify` of `requestq`) sent. A synchronous request costs one;
    /// a [`Batch`] costs one per round of up to `requestq_size / 2` requests.
    pub notifications: u64,
}

/// One MAP or UNMAP request, as queued in a [`Batch`] or given to
/// `dma::IommuMapper::submit_batch` (feature `alloc`). IOVA ends are inclusive.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum BatchOp {
    /// MAP (§5.13.6.5), see [`VirtIOIommu::map`].
    Map {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// Guest-physical address `virt_start` maps to.
        phys_start: u64,
        /// Permissions.
        flags: MapFlags,
    },
    /// UNMAP (§5.13.6.6), see [`VirtIOIommu::unmap`].
    Unmap {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
    },
}

/// The `requestq`: [`REQUESTQ_SIZE`] descriptors, or [`REQUESTQ_MIN_SIZE`] when the device's
/// maximum is smaller (the size is a const parameter of `VirtQueue`). The queue is held (on
/// the heap with `alloc`, see [`crate::held`]).
#[cfg_attr(not(feature = "alloc"), allow(clippy::large_enum_variant))]
enum RequestQueue<H: Hal> {
    Full(HeldQueue<H, REQUESTQ_SIZE>),
    Small(HeldQueue<H, REQUESTQ_MIN_SIZE>),
}

/// Runs `$body` with `$q` bound to the `VirtQueue` inside a `RequestQueue`.
macro_rules! with_rq {
    ($queue:expr, $q:ident => $body:expr) => {
        match $queue {
            RequestQueue::Full($q) => $body,
            RequestQueue::Small($q) => $body,
        }
    };
}

impl<H: Hal> RequestQueue<H> {
    fn new<T: Transport>(transport: &mut T) -> Result<Self, IommuError> {
        let max = transport.max_queue_size(REQUESTQ);
        if max >= REQUESTQ_SIZE as u32 {
            Ok(Self::Full(HeldQueue::new(transport, REQUESTQ)?))
        } else if max >= REQUESTQ_MIN_SIZE as u32 {
            Ok(Self::Small(HeldQueue::new(transport, REQUESTQ)?))
        } else {
            Err(IommuError::InvalidConfig(
                "requestq max_queue_size below 64 descriptors",
            ))
        }
    }

    fn set_dev_notify(&mut self, enable: bool) {
        with_rq!(self, q => q.set_dev_notify(enable))
    }

    fn size(&self) -> usize {
        match self {
            Self::Full(_) => REQUESTQ_SIZE,
            Self::Small(_) => REQUESTQ_MIN_SIZE,
        }
    }

    /// # Safety
    /// As `VirtQueue::add`.
    unsafe fn add<'a, 'b>(
        &mut self,
        inputs: &'a [&'b [u8]],
        outputs: &'a mut [&'b mut [u8]],
    ) -> virtio_drivers::Result<u16> {
        // SAFETY: forwarded with the caller's guarantees.
        with_rq!(self, q => unsafe { q.add(inputs, outputs) })
    }

    /// # Safety
    /// As `VirtQueue::pop_used`.
    unsafe fn pop_used<'a>(
        &mut self,
        token: u16,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> virtio_drivers::Result<u32> {
        // SAFETY: forwarded with the caller's guarantees.
        with_rq!(self, q => unsafe { q.pop_used(token, inputs, outputs) })
    }

    fn should_notify(&self) -> bool {
        with_rq!(self, q => q.should_notify())
    }

    fn can_pop(&self) -> bool {
        with_rq!(self, q => q.can_pop())
    }

    fn peek_used(&self) -> Option<u16> {
        with_rq!(self, q => q.peek_used())
    }
}

/// Per-request state of a batch slot (driver memory, never seen by the device).
#[derive(Clone, Copy, Debug, Default)]
struct SlotMeta {
    /// Length in bytes of the device-readable part in the slot.
    readable: u8,
    /// Whether the device returned the request.
    done: bool,
    /// The status byte read back (valid when `done` and `used == 4`); [`WRITABLE_FILL`] when
    /// the device did not write it.
    status: u8,
    /// Used length the device reported, bytes.
    used: u32,
}

impl SlotMeta {
    fn result(&self) -> Result<(), IommuError> {
        if !self.done {
            // Only reachable for a batch that failed as a whole, whose result is not returned.
            return Err(IommuError::NoResponse);
        }
        match self.used as usize {
            0 => Err(IommuError::NoResponse),
            TAIL => status_of(self.status),
            _ => Err(IommuError::BadUsedLength {
                used: self.used,
                expected: TAIL as u32,
            }),
        }
    }
}

/// A batch of MAP and UNMAP requests for [`VirtIOIommu`], from [`VirtIOIommu::batch`].
///
/// The adders ([`Self::map`], [`Self::unmap`], [`Self::push`]) validate each request exactly as
/// the synchronous [`VirtIOIommu::map`] and [`VirtIOIommu::unmap`] do and write it into its own
/// slot of a DMA area allocated once by [`VirtIOIommu::new`]: nothing is allocated per request
/// and nothing is sent before [`Self::submit`]. A batch holds at most [`BATCH_CAPACITY`]
/// requests. Dropping a batch without submitting it discards it.
///
/// [`Self::submit`] posts the requests in rounds of up to `requestq_size / 2` (the ring holds
/// that many 2-descriptor requests), notifies the device once per round, and waits (bounded, as
/// for synchronous requests) for every request of the round before starting the next. The
/// device may complete the requests of a round in any order: each used buffer is matched to its
/// request by its token. Requests are independent: a failed request does not stop the others
/// (the device processes them in ring order, so a later request sees the effect of an earlier
/// one).
pub struct Batch<'a, H: Hal, T: Transport> {
    iommu: &'a mut VirtIOIommu<H, T>,
    len: usize,
}

impl<'a, H: Hal, T: Transport> Batch<'a, H, T> {
    /// Queues a MAP of IOVAs `virt_start..=virt_end` (inclusive) of `domain` to guest-physical
    /// addresses from `phys_start` (§5.13.6.5). Returns the request's index in the batch (and in
    /// the [`BatchResult`]).
    ///
    /// # Errors
    ///
    /// Nothing is queued on error. The validation errors of [`VirtIOIommu::map`];
    /// [`IommuError::BufferSize`] when the batch already holds [`BATCH_CAPACITY`] requests.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Result<usize, IommuError> {
        self.room()?;
        let req = self
            .iommu
            .encode_map(domain, virt_start, virt_end, phys_start, flags)?;
        Ok(self.stage(req.as_bytes()))
    }

    /// Queues an UNMAP of IOVAs `virt_start..=virt_end` (inclusive) of `domain` (§5.13.6.6).
    /// Returns the request's index in the batch.
    ///
    /// # Errors
    ///
    /// Nothing is queued on error. The validation errors of [`VirtIOIommu::unmap`];
    /// [`IommuError::BufferSize`] when the batch is full.
    pub fn unmap(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    ) -> Result<usize, IommuError> {
        self.room()?;
        let req = self.iommu.encode_unmap(domain, virt_start, virt_end)?;
        Ok(self.stage(req.as_bytes()))
    }

    /// Queues `op` (see [`Self::map`] and [`Self::unmap`]).
    ///
    /// # Errors
    ///
    /// Those of [`Self::map`] or [`Self::unmap`] for the operation (nothing is queued).
    pub fn push(&mut self, op: BatchOp) -> Result<usize, IommuError> {
        match op {
            BatchOp::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => self.map(domain, virt_start, virt_end, phys_start, flags),
            BatchOp::Unmap {
                domain,
                virt_start,
                virt_end,
            } => self.unmap(domain, virt_start, virt_end),
        }
    }

    /// Number of requests queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no request is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of requests that can still be queued.
    pub fn remaining(&self) -> usize {
        BATCH_CAPACITY - self.len
    }

    /// Sends every queued request and waits for all of them; see the type documentation.
    /// Returns each request's outcome, in the order they were queued. An empty batch sends
    /// nothing.
    ///
    /// Per-request outcomes (in the [`BatchResult`]): `Ok(())` for S_OK; the device status
    /// ([`IommuError::Status`], [`IommuError::UnknownStatus`]); [`IommuError::NotWritten`] when
    /// the device reported used length 4 but did not write the tail; [`IommuError::NoResponse`]
    /// for used length 0; [`IommuError::BadUsedLength`] for any used length other than 4.
    ///
    /// # Errors
    ///
    /// Of the batch as a whole, after which no result is available: [`IommuError::Broken`]
    /// (an earlier fatal error); [`IommuError::Timeout`], [`IommuError::DeviceNeedsReset`] and
    /// [`IommuError::DeviceReset`] while waiting; [`IommuError::NotWritten`] after a round in
    /// which the device left a tail unwritten (the used element may be stale); [`IommuError::DeviceProtocol`] when the device returns a buffer that is
    /// not an outstanding request of this round (an unknown id, a repeated one, or a used
    /// element already in the used ring before the round was posted); [`IommuError::Transport`]
    /// from the queue. All but `Broken` leave the driver broken (requests of the batch may or
    /// may not have been processed).
    pub fn submit(self) -> Result<BatchResult<'a>, IommuError> {
        let Batch { iommu, len } = self;
        let notifications = iommu.run_batch(len)?;
        let iommu: &'a VirtIOIommu<H, T> = iommu;
        Ok(BatchResult {
            slots: &iommu.batch_slots[..len],
            notifications,
        })
    }

    fn room(&self) -> Result<(), IommuError> {
        if self.len >= BATCH_CAPACITY {
            Err(IommuError::BufferSize)
        } else {
            Ok(())
        }
    }

    /// Writes `readable` into the next slot; returns its index.
    fn stage(&mut self, readable: &[u8]) -> usize {
        let index = self.len;
        let at = index * BATCH_SLOT;
        self.iommu.batch_buffer.bytes()[at..at + readable.len()].copy_from_slice(readable);
        self.iommu.batch_slots[index] = SlotMeta {
            readable: readable.len() as u8,
            ..SlotMeta::default()
        };
        self.len += 1;
        index
    }
}

/// The outcome of a submitted [`Batch`]: one `Result` per request, in the order they were
/// queued. Borrows the driver until dropped.
#[derive(Clone, Copy, Debug)]
pub struct BatchResult<'a> {
    slots: &'a [SlotMeta],
    notifications: u32,
}

impl<'a> BatchResult<'a> {
    /// Number of requests.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the batch was empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The outcome of request `index` (as returned by the adder), `None` past the end.
    pub fn get(&self, index: usize) -> Option<Result<(), IommuError>> {
        self.slots.get(index).map(SlotMeta::result)
    }

    /// Every request's outcome, in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(), IommuError>> + 'a {
        self.slots.iter().map(SlotMeta::result)
    }

    /// Number of requests that did not succeed.
    pub fn failures(&self) -> usize {
        self.iter().filter(Result::is_err).count()
    }

    /// The first request that did not succeed: its index and error.
    pub fn first_error(&self) -> Option<(usize, IommuError)> {
        self.iter()
            .enumerate()
            .find_map(|(i, r)| r.err().map(|e| (i, e)))
    }

    /// Notifications sent for the batch (one per round, fewer if the device suppressed them).
    pub fn notifications(&self) -> u32 {
        self.notifications
    }
}

/// A DMA allocation from `H`, freed on drop.
struct DmaBuffer<H: Hal> {
    paddr: PhysAddr,
    vaddr: NonNull<u8>,
    pages: usize,
    _hal: PhantomData<H>,
}

// SAFETY: the buffer is exclusively owned memory (like a `Box<[u8]>`); the raw pointer is only
// dereferenced through `&mut self`.
unsafe impl<H: Hal> Send for DmaBuffer<H> {}
// SAFETY: no `&self` method dereferences the pointer.
unsafe impl<H: Hal> Sync for DmaBuffer<H> {}

impl<H: Hal> DmaBuffer<H> {
    fn new(bytes: usize) -> Result<Self, IommuError> {
        let pages = bytes.div_ceil(PAGE_SIZE).max(1);
        let (paddr, vaddr) = H::dma_alloc(pages, BufferDirection::Both);
        if paddr == 0 {
            return Err(IommuError::DmaAlloc);
        }
        Ok(Self {
            paddr,
            vaddr,
            pages,
            _hal: PhantomData,
        })
    }

    fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// The whole buffer. The returned slice borrows `self` mutably, so no other access exists.
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `vaddr` points to `pages * PAGE_SIZE` bytes that `H::dma_alloc` gave us and
        // that only this struct owns; the `&mut self` borrow makes the slice unique.
        unsafe { core::slice::from_raw_parts_mut(self.vaddr.as_ptr(), self.len()) }
    }
}

impl<H: Hal> Drop for DmaBuffer<H> {
    fn drop(&mut self) {
        // SAFETY: the region came from `H::dma_alloc` with these values and is not used after.
        unsafe {
            H::dma_dealloc(self.paddr, self.vaddr, self.pages);
        }
    }
}

/// Driver for one virtio-iommu device.
///
/// Requests are synchronous: each call posts one request on `requestq`, notifies, and waits
/// (bounded, see [`WaitPolicy`]) for its completion, then checks the used length and the tail
/// status. Many MAP/UNMAP requests can instead be sent with one notification per ring-sized
/// round through a [`Batch`] ([`Self::batch`]), each still checked. Arguments are validated
/// against the negotiated features and configuration *before* anything is sent. The IOMMU's
/// own queues use `H`, which must give addresses the device can use directly (the IOMMU's own
/// DMA is not translated by itself). Completions are polled: the device is asked not to
/// interrupt for `requestq`.
///
/// Memory: besides the two virtqueues, one request buffer (`max(4096, 76 + probe_size)`
/// bytes), [`EVENTQ_SIZE`] event buffers and the batch area (`BATCH_CAPACITY * 64` bytes), all
/// allocated through `H` by [`Self::new`]; no request allocates. With feature `alloc`, the
/// driver-side state of the two queues (virtio-drivers keeps 16 bytes per descriptor, 32 with
/// its own `alloc` feature) and the batch and token tables (4.5 KiB) are five allocations of
/// the global allocator, made by [`Self::new`]: `VirtIOIommu` itself is a few hundred bytes, and
/// `new` + ATTACH + MAP + PROBE need under 6 KiB of stack in release on aarch64 (BENCHMARKS.md,
/// "Stack use of the driver"). Without `alloc` they are inline (about 8 KiB).
///
/// Every request checks the device's answer. Errors any request can return, besides its own:
/// [`IommuError::Broken`], [`IommuError::Timeout`], [`IommuError::DeviceNeedsReset`],
/// [`IommuError::DeviceReset`] (DRIVER_OK gone), [`IommuError::DeviceProtocol`] (a used id that names no request in flight, or a used element
/// present while none was), [`IommuError::NoResponse`] (used length 0),
/// [`IommuError::BadUsedLength`], [`IommuError::NotWritten`] (the device-writable part was
/// pre-filled with [`WRITABLE_FILL`] and the device left it so), [`IommuError::UnknownStatus`]
/// and [`IommuError::Transport`].
///
/// Fatal conditions (timeout, DEVICE_NEEDS_RESET, DRIVER_OK gone, a used buffer that was never
/// posted, an unwritten tail, a failed eventq re-post) leave
/// the driver [`IommuError::Broken`]; buffers the device may still own are kept until drop.
///
/// Drop resets the device (writes 0 to the device status) and waits, bounded by the
/// [`WaitPolicy`], until the status reads 0 (virtio §2.4.2, §4.1.4.3.2); only then are the
/// rings and buffers freed. If the status never reads 0, the device may still be using them:
/// they are leaked (never returned to `H`) and a warning is logged. The driver never runs the
/// transport's destructor; it resets the device itself, bounded (virtio-drivers 0.13's
/// `PciTransport::drop` reads the status until it reads 0 without bound; `PciTransport` and
/// `MmioTransport` hold only MMIO pointers, so not dropping them leaks no memory). Drop does not call `Transport::queue_unset` (the completed reset already
/// clears the queues, and virtio-drivers' MMIO `queue_unset` waits for QueueReady to read 0
/// without bound).
pub struct VirtIOIommu<H: Hal, T: Transport> {
    // Dropped by `Drop` only after the device read back reset (see above).
    transport: ManuallyDrop<T>,
    // The device-visible memory: dropped by `Drop` only after the device read back reset.
    requestq: ManuallyDrop<RequestQueue<H>>,
    eventq: ManuallyDrop<HeldQueue<H, EVENTQ_SIZE>>,
    request_buffer: ManuallyDrop<DmaBuffer<H>>,
    event_buffer: ManuallyDrop<DmaBuffer<H>>,
    /// [`BATCH_CAPACITY`] slots of [`BATCH_SLOT`] bytes for batched requests.
    batch_buffer: ManuallyDrop<DmaBuffer<H>>,
    batch_slots: Held<[SlotMeta; BATCH_CAPACITY]>,
    /// `batch_slot_of_token[token]` = slot index + 1 of the batched request posted with `token`.
    batch_slot_of_token: Held<[u16; REQUESTQ_SIZE]>,
    /// [`NB_SLOTS`] slots of [`BATCH_SLOT`] bytes for non-blocking requests.
    nb_buffer: ManuallyDrop<DmaBuffer<H>>,
    /// The non-blocking slots' driver-side table.
    nb: Held<nb::NbTable>,
    request_stats: RequestStats,
    /// `event_slot_of_token[token]` = slot index + 1 of the event buffer posted with `token`.
    event_slot_of_token: Held<[u16; EVENTQ_SIZE]>,
    features: Features,
    offered: Features,
    config: IommuConfig,
    options: IommuOptions,
    broken: bool,
    event_stats: EventStats,
}

/// Features the driver negotiates when offered, besides the required ones.
const OPTIONAL: Features = Features::INPUT_RANGE
    .union(Features::DOMAIN_RANGE)
    .union(Features::PROBE)
    .union(Features::MMIO)
    .union(Features::BYPASS_CONFIG)
    .union(Features::ACCESS_PLATFORM);
/// Features without which the driver refuses the device.
const REQUIRED: Features = Features::VERSION_1.union(Features::MAP_UNMAP);

impl<H: Hal, T: Transport> VirtIOIommu<H, T> {
    /// Resets the device and waits until its status reads 0 (virtio §2.4.2, §4.1.4.3.2;
    /// bounded by `options.wait`, see [`WaitPolicy`]), then initialises it (virtio §3.1.1):
    /// negotiates `VERSION_1` and `MAP_UNMAP`
    /// (required), plus `INPUT_RANGE`, `DOMAIN_RANGE`, `PROBE`, `MMIO`, `BYPASS_CONFIG` and
    /// `ACCESS_PLATFORM` when offered (§5.13.3); reads and checks the configuration (§5.13.4);
    /// sets up `requestq` and `eventq` and fills `eventq` with [`EVENTQ_SIZE`] buffers.
    ///
    /// `requestq` gets [`REQUESTQ_SIZE`] descriptors, or [`REQUESTQ_MIN_SIZE`] when the
    /// device's `max_queue_size` is smaller.
    ///
    /// # Errors
    ///
    /// [`IommuError::WrongDeviceType`], [`IommuError::ResetTimeout`] (the status did
    /// not read 0 after the reset), [`IommuError::MissingFeatures`],
    /// [`IommuError::FeaturesRejected`], [`IommuError::ConfigUnstable`] (the config generation
    /// changed during each of `options.wait.config_attempts` reads),
    /// [`IommuError::InvalidConfig`] (also for a `requestq` whose `max_queue_size` is below
    /// [`REQUESTQ_MIN_SIZE`]), [`IommuError::DmaAlloc`], [`IommuError::Transport`] (config
    /// access, queue setup). With feature `alloc`, a failed global allocation (about 8 KiB in
    /// five blocks) aborts, as for `Box::new`.
    ///
    /// On error the device is reset again (bounded, except after [`IommuError::ResetTimeout`]),
    /// the rings it was given are freed only if that reset read 0 (else leaked), and FAILED is
    /// set. The driver never runs the transport's destructor, on error or on drop; it resets
    /// the device itself, bounded: `transport` is forgotten (virtio-drivers 0.13's
    /// `PciTransport::drop` reads the status until it reads 0 without bound; its `PciTransport`
    /// and `MmioTransport` hold only MMIO pointers, so forgetting them leaks no memory).
    pub fn new(mut transport: T, options: IommuOptions) -> Result<Self, IommuError> {
        if transport.device_type() != DeviceType::IOMMU {
            return Err(IommuError::WrongDeviceType);
        }
        let wait = options.wait;
        if !reset(&mut transport, &wait) {
            let s = transport.get_status();
            transport.set_status(s | DeviceStatus::FAILED);
            // Never the transport's destructor: see `abandon`.
            core::mem::forget(transport);
            return Err(IommuError::ResetTimeout);
        }
        let fail = |t: T, e| abandon(t, &wait, (), e);
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = Features::from_bits_retain(transport.read_device_features());
        if !offered.contains(REQUIRED) {
            return Err(fail(
                transport,
                IommuError::MissingFeatures(REQUIRED - offered),
            ));
        }
        let mut wanted = REQUIRED | OPTIONAL;
        if options.accept_legacy_bypass {
            wanted |= Features::BYPASS;
        }
        let features = offered & wanted;
        transport.write_driver_features(features.bits());
        transport.set_status(
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK,
        );
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(fail(transport, IommuError::FeaturesRejected));
        }
        let config = match read_config(&transport, features, options.wait.config_attempts) {
            Ok(c) => c,
            Err(e) => return Err(fail(transport, e)),
        };
        let request_bytes = PROBE_HEAD + config.probe_size as usize + TAIL;
        // From here on the device knows ring addresses: they are freed only after a reset
        // that read 0 (`abandon`), never before it.
        let mut requestq = match RequestQueue::<H>::new(&mut transport) {
            Ok(q) => q,
            Err(e) => return Err(fail(transport, e)),
        };
        let eventq = match HeldQueue::<H, EVENTQ_SIZE>::new(&mut transport, EVENTQ) {
            Ok(q) => q,
            Err(e) => return Err(abandon(transport, &wait, requestq, e.into())),
        };
        // Completions are polled: ask the device not to interrupt for `requestq`
        // (VIRTQ_AVAIL_F_NO_INTERRUPT, virtio §2.7.7), which saves it work per request.
        requestq.set_dev_notify(false);
        let buffers = DmaBuffer::new(request_bytes.max(PAGE_SIZE)).and_then(|r| {
            Ok((
                r,
                DmaBuffer::new(EVENTQ_SIZE * EVENT_BUFFER_SIZE)?,
                DmaBuffer::new(BATCH_CAPACITY * BATCH_SLOT)?,
                DmaBuffer::new(NB_SLOTS * BATCH_SLOT)?,
            ))
        });
        let (request_buffer, event_buffer, batch_buffer, nb_buffer) = match buffers {
            Ok(b) => b,
            Err(e) => return Err(abandon(transport, &wait, (requestq, eventq), e)),
        };
        transport.finish_init();
        let mut iommu = Self {
            transport: ManuallyDrop::new(transport),
            requestq: ManuallyDrop::new(requestq),
            eventq: ManuallyDrop::new(eventq),
            request_buffer: ManuallyDrop::new(request_buffer),
            event_buffer: ManuallyDrop::new(event_buffer),
            batch_buffer: ManuallyDrop::new(batch_buffer),
            batch_slots: held_array(SlotMeta::default()),
            batch_slot_of_token: held_array(0),
            nb_buffer: ManuallyDrop::new(nb_buffer),
            nb: held(nb::NbTable::new()),
            request_stats: RequestStats::default(),
            event_slot_of_token: held_array(0),
            features,
            offered,
            config,
            options,
            broken: false,
            event_stats: EventStats::default(),
        };
        for slot in 0..EVENTQ_SIZE {
            iommu.post_event_buffer(slot)?;
        }
        if iommu.eventq.should_notify() {
            iommu.transport.notify(EVENTQ);
        }
        Ok(iommu)
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The features the device offered.
    pub fn offered_features(&self) -> Features {
        self.offered
    }

    /// The configuration read at initialisation.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    /// Counters of the event queue.
    pub fn event_stats(&self) -> EventStats {
        self.event_stats
    }

    /// Counters of requests and notifications sent on `requestq`.
    pub fn request_stats(&self) -> RequestStats {
        self.request_stats
    }

    /// Number of descriptors of `requestq`: [`REQUESTQ_SIZE`], or [`REQUESTQ_MIN_SIZE`] when
    /// the device's `max_queue_size` is smaller. A [`Batch`] round holds half as many requests.
    pub fn requestq_size(&self) -> usize {
        self.requestq.size()
    }

    /// Starts a batch of MAP and UNMAP requests, sent together by [`Batch::submit`] with one
    /// notification per ring-sized round instead of one per request. No allocation.
    pub fn batch(&mut self) -> Batch<'_, H, T> {
        Batch {
            iommu: self,
            len: 0,
        }
    }

    /// Whether a fatal error made the driver unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The transport, for callers that need device status or config access.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Reads the whole device configuration space (`struct virtio_iommu_config`, §5.13.4, 40
    /// bytes) exactly as the device presents it now, without the checks and defaults of
    /// [`Self::config`]: fields of features that were not negotiated are included as read. For
    /// diagnostics and conformance checks (e.g. D5, `bypass` only 0 or 1).
    ///
    /// The read is consistent (all 40 bytes from one config generation, virtio §2.5.1), with at
    /// most [`WaitPolicy::config_attempts`] attempts.
    ///
    /// # Errors
    ///
    /// [`IommuError::Transport`] when the config space is missing or smaller than 40
    /// bytes; [`IommuError::ConfigUnstable`] when the generation changed during every attempt.
    pub fn read_raw_config(&self) -> Result<crate::wire::Config, IommuError> {
        use zerocopy::FromBytes;
        let t: &T = &self.transport;
        let bytes = read_consistent(t, self.options.wait.config_attempts, || {
            let mut bytes = [0u8; size_of::<crate::wire::Config>()];
            for (i, word) in bytes.chunks_exact_mut(4).enumerate() {
                word.copy_from_slice(&read_u32(t, i * 4)?.to_le_bytes());
            }
            Ok(bytes)
        })?;
        crate::wire::Config::read_from_bytes(&bytes[..]).map_err(|_| IommuError::BufferSize)
    }

    /// Reads the `bypass` config field (§5.13.4): `Ok(Some(true))` when unattached endpoints
    /// bypass translation. Bits 1-7 are ignored as the spec requires. `Ok(None)` without
    /// BYPASS_CONFIG. A consistent read (virtio §2.5.1), as [`Self::read_raw_config`].
    ///
    /// # Errors
    ///
    /// [`IommuError::Transport`] when the field cannot be read;
    /// [`IommuError::ConfigUnstable`] when the config generation changed during each of
    /// [`WaitPolicy::config_attempts`] attempts.
    pub fn try_bypass(&self) -> Result<Option<bool>, IommuError> {
        if !self.features.contains(Features::BYPASS_CONFIG) {
            return Ok(None);
        }
        let t: &T = &self.transport;
        let v: u8 = read_consistent(t, self.options.wait.config_attempts, || {
            Ok(t.read_config_space::<u8>(config_offset::BYPASS)?)
        })?;
        Ok(Some(v & 1 == 1))
    }

    /// [`Self::try_bypass`] with every error as `None`: `Some(true)` when unattached endpoints
    /// bypass translation; `None` without BYPASS_CONFIG, or when the field could not be read
    /// (consistently).
    pub fn bypass(&self) -> Option<bool> {
        self.try_bypass().ok().flatten()
    }

    /// Writes the `bypass` config field (§5.13.4): `false` blocks the DMA of unattached
    /// endpoints.
    ///
    /// # Errors
    ///
    /// [`IommuError::Broken`] after an earlier fatal error; [`IommuError::NotNegotiated`]
    /// without BYPASS_CONFIG; [`IommuError::Transport`] from the config write;
    /// [`IommuError::DeviceNeedsReset`] when the device sets DEVICE_NEEDS_RESET in response.
    pub fn set_bypass(&mut self, bypass: bool) -> Result<(), IommuError> {
        self.usable()?;
        self.need(Features::BYPASS_CONFIG)?;
        self.transport
            .write_config_space(config_offset::BYPASS, u8::from(bypass))?;
        self.check_needs_reset()
    }

    /// ATTACH (§5.13.6.3): attaches `endpoint` to `domain`, creating the domain if it does not
    /// exist. An endpoint attached elsewhere is moved (the device detaches it first).
    ///
    /// # Errors
    ///
    /// [`IommuError::DomainOutOfRange`]; device statuses such as `S_NOENT` (unknown
    /// endpoint), `S_INVAL` (the domain is a bypass domain), `S_UNSUPP`; and the transport
    /// errors of every request.
    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        self.attach_with_flags(domain, endpoint, 0)
    }

    /// ATTACH with `VIRTIO_IOMMU_ATTACH_F_BYPASS` (§5.13.6.3): `domain` is an identity
    /// (bypass) domain, for endpoints that need no isolation. Needs BYPASS_CONFIG.
    ///
    /// # Errors
    ///
    /// [`IommuError::NotNegotiated`] without BYPASS_CONFIG; otherwise those of
    /// [`Self::attach`].
    pub fn attach_bypass(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        self.need(Features::BYPASS_CONFIG)?;
        self.attach_with_flags(domain, endpoint, ATTACH_F_BYPASS)
    }

    fn attach_with_flags(
        &mut self,
        domain: u32,
        endpoint: u32,
        flags: u32,
    ) -> Result<(), IommuError> {
        self.check_domain(domain)?;
        let req = ReqAttach {
            head: ReqHead::new(RequestType::Attach),
            domain: domain.into(),
            endpoint: endpoint.into(),
            flags: flags.into(),
            reserved: [0; 4],
        };
        self.request(req.as_bytes())
    }

    /// DETACH (§5.13.6.4): detaches `endpoint` from `domain`. The domain ceases to exist when
    /// its last endpoint leaves.
    ///
    /// # Errors
    ///
    /// [`IommuError::DomainOutOfRange`]; `S_NOENT` (unknown endpoint, and on QEMU ≥ 9.1
    /// an endpoint that is not attached), `S_INVAL` (not attached to that domain).
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        self.check_domain(domain)?;
        let req = ReqDetach {
            head: ReqHead::new(RequestType::Detach),
            domain: domain.into(),
            endpoint: endpoint.into(),
            reserved: [0; 8],
        };
        self.request(req.as_bytes())
    }

    /// MAP (§5.13.6.5): maps IOVAs `virt_start..=virt_end` (inclusive) of `domain` to
    /// guest-physical addresses from `phys_start`, with permissions `flags`.
    ///
    /// Checked before sending: `virt_end > virt_start`; the range inside `input_range`;
    /// `virt_start`, `phys_start` and `virt_end + 1` multiples of the granule;
    /// `phys_start + (virt_end - virt_start)` does not overflow; `flags` only READ, WRITE and
    /// (with F_MMIO) MMIO; `domain` inside `domain_range`.
    ///
    /// # Errors
    ///
    /// [`IommuError::InvalidRange`], [`IommuError::IovaOutOfRange`],
    /// [`IommuError::Unaligned`], [`IommuError::InvalidFlags`],
    /// [`IommuError::DomainOutOfRange`]; device statuses `S_NOENT` (no such domain), `S_INVAL`
    /// (overlap, bypass domain), `S_RANGE`, `S_NOMEM`.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Result<(), IommuError> {
        let req = self.encode_map(domain, virt_start, virt_end, phys_start, flags)?;
        self.request(req.as_bytes())
    }

    /// The checks of [`Self::map`], then the request.
    fn encode_map(
        &self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Result<ReqMap, IommuError> {
        self.check_domain(domain)?;
        self.check_iova_range(virt_start, virt_end)?;
        phys_start
            .checked_add(virt_end - virt_start)
            .ok_or(IommuError::InvalidRange)?;
        self.check_aligned(phys_start)?;
        let allowed = if self.features.contains(Features::MMIO) {
            MapFlags::all()
        } else {
            MapFlags::READ | MapFlags::WRITE
        };
        if !allowed.contains(flags) {
            return Err(IommuError::InvalidFlags(flags.bits()));
        }
        Ok(ReqMap {
            head: ReqHead::new(RequestType::Map),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            phys_start: phys_start.into(),
            flags: flags.bits().into(),
        })
    }

    /// UNMAP (§5.13.6.6): removes every mapping of `domain` inside `virt_start..=virt_end`
    /// (inclusive). The range may cover unmapped space; it must not split a mapping.
    ///
    /// Checked before sending: as for [`Self::map`] (range, alignment, `input_range`, domain).
    ///
    /// # Errors
    ///
    /// Those checks; device statuses `S_RANGE` (the range would split a mapping;
    /// nothing is removed), `S_NOENT` (no such domain), `S_INVAL` (bypass domain).
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuError> {
        let req = self.encode_unmap(domain, virt_start, virt_end)?;
        self.request(req.as_bytes())
    }

    /// The checks of [`Self::unmap`], then the request.
    fn encode_unmap(
        &self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    ) -> Result<ReqUnmap, IommuError> {
        self.check_domain(domain)?;
        self.check_iova_range(virt_start, virt_end)?;
        Ok(ReqUnmap {
            head: ReqHead::new(RequestType::Unmap),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            reserved: [0; 4],
        })
    }

    /// PROBE (§5.13.6.7): asks for `endpoint`'s properties and calls `f` with each one, in
    /// order (reserved memory regions, and unknown properties which the caller may ignore).
    ///
    /// # Errors
    ///
    /// [`IommuError::NotNegotiated`] without F_PROBE; device status `S_NOENT` (unknown
    /// endpoint), `S_INVAL`; [`IommuError::BadUsedLength`] unless the device used exactly
    /// `probe_size + 4` bytes; [`IommuError::NotWritten`] when the device did not write the
    /// tail, or (with `probe_size >= 4`) left the first property header unwritten;
    /// [`IommuError::MalformedProbe`].
    pub fn probe(&mut self, endpoint: u32, f: impl FnMut(ProbeProperty)) -> Result<(), IommuError> {
        self.need(Features::PROBE)?;
        let req = ReqProbe {
            endpoint: endpoint.into(),
            ..ReqProbe::default()
        };
        let writable = self.config.probe_size as usize + TAIL;
        let used = self.submit(req.as_bytes(), writable)?;
        self.probe_reply(used, f)
    }

    /// Checks the PROBE reply in the request buffer (`used` bytes written by the device) and
    /// calls `f` with each property: the checks of [`Self::probe`], shared with
    /// [`Self::poll_probe_nb`].
    fn probe_reply(&mut self, used: u32, f: impl FnMut(ProbeProperty)) -> Result<(), IommuError> {
        let probe_size = self.config.probe_size as usize;
        let writable = probe_size + TAIL;
        if used == 0 {
            return Err(IommuError::NoResponse);
        }
        if used as usize != writable {
            return Err(IommuError::BadUsedLength {
                used,
                expected: writable as u32,
            });
        }
        let status = status_of(self.request_buffer.bytes()[PROBE_HEAD + probe_size]);
        self.fatal_if_unwritten(status)?;
        let reply = &self.request_buffer.bytes()[PROBE_HEAD..PROBE_HEAD + writable];
        // A property header of all-WRITABLE_FILL bytes (type 0xffff: reserved bits set, length
        // 0xffff) is what an unwritten `properties` reads as; no device writes it at offset 0.
        let properties = &reply[..probe_size];
        let first_header = properties.get(..size_of::<ProbePropertyHeader>());
        if first_header.is_some_and(|h| h.iter().all(|&b| b == WRITABLE_FILL)) {
            return Err(IommuError::NotWritten);
        }
        parse_probe_properties(properties, f)
    }

    /// PROBE returning the reserved regions only (see [`Self::probe`]), in the order the
    /// device listed them; `start..=end` inclusive IOVAs.
    ///
    /// # Errors
    ///
    /// Those of [`Self::probe`].
    #[cfg(feature = "alloc")]
    pub fn probe_reserved_regions(
        &mut self,
        endpoint: u32,
    ) -> Result<alloc::vec::Vec<crate::parse::ReservedRegion>, IommuError> {
        let mut v = alloc::vec::Vec::new();
        self.probe(endpoint, |p| {
            if let ProbeProperty::ResvMem(r) = p {
                v.push(r)
            }
        })?;
        Ok(v)
    }

    /// Sends a request exactly as given, with no validation: each entry of `readable` becomes
    /// one device-readable descriptor (in order), and each entry of `writable_lens` one
    /// device-writable descriptor of that many bytes, filled with [`WRITABLE_FILL`] (so a byte
    /// the device did not write reads 0xff, whatever used length it reported), so a request can
    /// be split over descriptors at any byte. The device-writable bytes are copied back into
    /// `writable` (which must be exactly their total size). Returns the used length in bytes as
    /// the device reported it — 0 included, and not compared with the posted size. For
    /// conformance tests and diagnostics: the caller checks the reply.
    ///
    /// # Errors
    ///
    /// [`IommuError::BufferSize`] for an empty part, more than 16 parts per
    /// direction, no part at all, `writable.len()` not the sum of `writable_lens`, or more
    /// bytes than the request buffer (`max(4096, 72 + probe_size + 4)` bytes); the transport
    /// errors; [`IommuError::Broken`], [`IommuError::Timeout`], [`IommuError::DeviceNeedsReset`],
    /// [`IommuError::DeviceReset`] and [`IommuError::DeviceProtocol`] as for every request.
    pub fn request_raw(
        &mut self,
        readable: &[&[u8]],
        writable_lens: &[usize],
        writable: &mut [u8],
    ) -> Result<u32, IommuError> {
        if writable.len() != writable_lens.iter().sum::<usize>() {
            return Err(IommuError::BufferSize);
        }
        let used = self.submit_parts(readable, writable_lens, WRITABLE_FILL)?;
        let start: usize = readable.iter().map(|p| p.len()).sum();
        let n = writable.len();
        writable.copy_from_slice(&self.request_buffer.bytes()[start..start + n]);
        Ok(used)
    }

    /// Takes the next fault report from `eventq`, if any, and posts its buffer again
    /// (§5.13.6.9). Reports the spec says to ignore are counted in [`EventStats::ignored`],
    /// re-posted and skipped. Never blocks: one call takes at most [`EVENTQ_SIZE`] used
    /// buffers (one pass over the queue), so a device that keeps returning malformed reports
    /// cannot hold it.
    ///
    /// Returns `Ok(Some(report))` for the first well-formed report; `Ok(None)` when no used
    /// buffer is left, or after [`EVENTQ_SIZE`] ignored ones (more may be waiting: call again).
    ///
    /// # Errors
    ///
    /// [`IommuError::DeviceProtocol`] if the device used a buffer that was not posted
    /// (the driver is then broken); transport errors while re-posting (the buffer could not be
    /// given back to the device: the driver is then broken, and the report read before is lost).
    pub fn poll_event(&mut self) -> Result<Option<FaultEvent>, IommuError> {
        self.usable()?;
        for _ in 0..EVENTQ_SIZE {
            let Some(token) = self.eventq.peek_used() else {
                return Ok(None);
            };
            let slot = match self.event_slot_of_token.get(usize::from(token)) {
                Some(&s) if s != 0 => usize::from(s - 1),
                _ => {
                    self.broken = true;
                    return Err(IommuError::DeviceProtocol);
                }
            };
            let range = slot * EVENT_BUFFER_SIZE..(slot + 1) * EVENT_BUFFER_SIZE;
            let buf = &mut self.event_buffer.bytes()[range];
            // SAFETY: `buf` is the buffer posted with `token` (from `event_slot_of_token`), it
            // is owned by `self.event_buffer` and was not touched while posted.
            let used = unsafe { self.eventq.pop_used(token, &[], &mut [buf]) };
            let used = match used {
                Ok(u) => u,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            };
            self.event_slot_of_token[usize::from(token)] = 0;
            let range = slot * EVENT_BUFFER_SIZE..(slot + 1) * EVENT_BUFFER_SIZE;
            let event = if used as usize > EVENT_BUFFER_SIZE {
                None
            } else {
                parse_fault(&self.event_buffer.bytes()[range], used)
            };
            if let Err(e) = self.post_event_buffer(slot) {
                // The buffer is lost to the eventq: fatal rather than silently fewer buffers.
                self.broken = true;
                return Err(e);
            }
            if self.eventq.should_notify() {
                self.transport.notify(EVENTQ);
            }
            match event {
                Some(e) => {
                    self.event_stats.delivered += 1;
                    return Ok(Some(e));
                }
                None => self.event_stats.ignored += 1,
            }
        }
        Ok(None)
    }

    fn post_event_buffer(&mut self, slot: usize) -> Result<(), IommuError> {
        let range = slot * EVENT_BUFFER_SIZE..(slot + 1) * EVENT_BUFFER_SIZE;
        let buf = &mut self.event_buffer.bytes()[range];
        // Unwritten bytes read as non-zero `reserved`: a buffer returned without a report
        // written into it is ignored, not delivered as a fault of endpoint 0.
        buf.fill(WRITABLE_FILL);
        // SAFETY: the slot's bytes belong to `self.event_buffer`, which lives until after the
        // device is reset in `drop`; the driver does not touch them until `pop_used`.
        let token = unsafe { self.eventq.add(&[], &mut [buf]) }?;
        let entry = self
            .event_slot_of_token
            .get_mut(usize::from(token))
            .ok_or(IommuError::DeviceProtocol)?;
        *entry = slot as u16 + 1;
        Ok(())
    }

    fn request(&mut self, readable: &[u8]) -> Result<(), IommuError> {
        let used = self.submit(readable, TAIL)?;
        if used as usize != TAIL {
            return Err(IommuError::BadUsedLength {
                used,
                expected: TAIL as u32,
            });
        }
        let start = readable.len();
        let status = status_of(self.request_buffer.bytes()[start]);
        self.fatal_if_unwritten(status)
    }

    /// An unwritten tail is fatal (see [`IommuError::NotWritten`]): the used element may be
    /// stale and the request still available to the device.
    fn fatal_if_unwritten(&mut self, r: Result<(), IommuError>) -> Result<(), IommuError> {
        if r == Err(IommuError::NotWritten) {
            self.broken = true;
        }
        r
    }

    /// Posts `readable` followed by `writable_len` device-writable bytes (filled with
    /// [`WRITABLE_FILL`]) from the request buffer, notifies and waits. Returns the used length,
    /// which is checked to be non-zero and at most `writable_len`.
    fn submit(&mut self, readable: &[u8], writable_len: usize) -> Result<u32, IommuError> {
        if readable.is_empty() || writable_len == 0 {
            return Err(IommuError::BufferSize);
        }
        let used = self.submit_parts(&[readable], &[writable_len], WRITABLE_FILL)?;
        if used == 0 {
            return Err(IommuError::NoResponse);
        }
        if used as usize > writable_len {
            return Err(IommuError::BadUsedLength {
                used,
                expected: writable_len as u32,
            });
        }
        Ok(used)
    }

    /// Posts one descriptor per readable part (copied, in order, into the request buffer) and
    /// one device-writable descriptor filled with `fill` per entry of `writable_lens`, right
    /// after them; notifies and waits. Returns the used length as the device reported it,
    /// unchecked.
    fn submit_parts(
        &mut self,
        readable: &[&[u8]],
        writable_lens: &[usize],
        fill: u8,
    ) -> Result<u32, IommuError> {
        self.usable()?;
        self.nb_idle()?;
        if self.nb.probe_reply_waiting() {
            // A non-blocking PROBE's reply waits in the request buffer to be collected.
            return Err(IommuError::Busy);
        }
        let r_total: usize = readable.iter().map(|p| p.len()).sum();
        let w_total: usize = writable_lens.iter().sum();
        if readable.len() > MAX_RAW_PARTS
            || writable_lens.len() > MAX_RAW_PARTS
            || readable.len() + writable_lens.len() == 0
            || readable.iter().any(|p| p.is_empty())
            || writable_lens.contains(&0)
            || r_total + w_total > self.request_buffer.len()
        {
            return Err(IommuError::BufferSize);
        }
        let buf = self.request_buffer.bytes();
        let mut at = 0;
        for part in readable {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        buf[at..at + w_total].fill(fill);
        self.check_nothing_used()?;
        let token = {
            let (ins, mut outs) = split_parts(self.request_buffer.bytes(), readable, writable_lens);
            let (ins, outs) = (&ins[..readable.len()], &mut outs[..writable_lens.len()]);
            // SAFETY: every slice belongs to `self.request_buffer`, which outlives any use by
            // the device (on timeout the driver is marked broken and the buffer is only freed
            // after the device reset in `drop`). They are not accessed until `pop_used` below.
            unsafe { self.requestq.add(ins, outs) }?
        };
        self.request_stats.requests += 1;
        if self.requestq.should_notify() {
            self.request_stats.notifications += 1;
            self.transport.notify(REQUESTQ);
        }
        self.wait_used()?;
        let (ins, mut outs) = split_parts(self.request_buffer.bytes(), readable, writable_lens);
        let (ins, outs) = (&ins[..readable.len()], &mut outs[..writable_lens.len()]);
        // SAFETY: the same buffers as passed to `add` with this token.
        match unsafe { self.requestq.pop_used(token, ins, outs) } {
            Ok(u) => Ok(u),
            Err(virtio_drivers::Error::WrongToken) => {
                self.broken = true;
                Err(IommuError::DeviceProtocol)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends the first `len` staged batch slots in ring-sized rounds; see [`Batch::submit`].
    /// Returns the number of notifications sent.
    fn run_batch(&mut self, len: usize) -> Result<u32, IommuError> {
        self.usable()?;
        self.nb_idle()?;
        let per_round = self.requestq.size() / 2;
        let mut notifications = 0u32;
        let mut next = 0;
        while next < len {
            let end = len.min(next + per_round);
            self.check_nothing_used()?;
            for slot in next..end {
                self.post_batch_slot(slot)?;
            }
            self.request_stats.requests += (end - next) as u64;
            if self.requestq.should_notify() {
                self.request_stats.notifications += 1;
                notifications += 1;
                self.transport.notify(REQUESTQ);
            }
            for _ in next..end {
                self.wait_used()?;
                self.complete_batch_slot()?;
            }
            // An unwritten tail: the used element may be stale (see `IommuError::NotWritten`),
            // so a request of this round may still be available to the device.
            let unwritten = self.batch_slots[next..end]
                .iter()
                .any(|m| m.used as usize == TAIL && m.status == WRITABLE_FILL);
            if unwritten {
                self.broken = true;
                return Err(IommuError::NotWritten);
            }
            next = end;
        }
        Ok(notifications)
    }

    /// Posts batch slot `slot` (its readable part and a 4-byte tail filled with
    /// [`WRITABLE_FILL`]) on `requestq`.
    fn post_batch_slot(&mut self, slot: usize) -> Result<(), IommuError> {
        let readable = usize::from(self.batch_slots[slot].readable);
        let (ins, outs) = batch_slot_parts(self.batch_buffer.bytes(), slot, readable);
        outs.fill(WRITABLE_FILL);
        let token = {
            // SAFETY: both slices belong to `self.batch_buffer`, which outlives any use by the
            // device (on a fatal error the driver is broken and the buffer is only freed after
            // the device reset in `drop`); they are not accessed until `pop_used`.
            let added = unsafe { self.requestq.add(&[ins], &mut [outs]) };
            match added {
                Ok(t) => t,
                Err(e) => {
                    // Requests of this round are already posted: the driver cannot continue.
                    self.broken = true;
                    return Err(e.into());
                }
            }
        };
        match self.batch_slot_of_token.get_mut(usize::from(token)) {
            Some(entry) => *entry = slot as u16 + 1,
            None => {
                self.broken = true;
                return Err(IommuError::DeviceProtocol);
            }
        }
        Ok(())
    }

    /// Pops the next used buffer (the caller checked one is there), matches it to its batch
    /// slot by token and records the used length and status.
    fn complete_batch_slot(&mut self) -> Result<(), IommuError> {
        let Some(token) = self.requestq.peek_used() else {
            self.broken = true;
            return Err(IommuError::DeviceProtocol);
        };
        let slot = match self.batch_slot_of_token.get(usize::from(token)) {
            Some(&s) if s != 0 => usize::from(s - 1),
            _ => {
                self.broken = true;
                return Err(IommuError::DeviceProtocol);
            }
        };
        let readable = usize::from(self.batch_slots[slot].readable);
        let (ins, outs) = batch_slot_parts(self.batch_buffer.bytes(), slot, readable);
        // SAFETY: the same buffers as posted with `token` (from `batch_slot_of_token`).
        let used = unsafe { self.requestq.pop_used(token, &[ins], &mut [outs]) };
        let used = match used {
            Ok(u) => u,
            Err(e) => {
                self.broken = true;
                return Err(match e {
                    virtio_drivers::Error::WrongToken => IommuError::DeviceProtocol,
                    e => e.into(),
                });
            }
        };
        self.batch_slot_of_token[usize::from(token)] = 0;
        let status = self.batch_buffer.bytes()[slot * BATCH_SLOT + BATCH_TAIL_AT];
        let meta = &mut self.batch_slots[slot];
        meta.done = true;
        meta.used = used;
        meta.status = status;
        Ok(())
    }

    fn wait_used(&mut self) -> Result<(), IommuError> {
        let wait = self.options.wait;
        let done = bounded_poll(&wait, |polls| {
            if self.requestq.can_pop() {
                return Ok(true);
            }
            if polls > 0 && polls.is_multiple_of(256) {
                self.check_needs_reset()?;
            }
            Ok(false)
        })?;
        if !done {
            self.broken = true;
            return Err(IommuError::Timeout);
        }
        Ok(())
    }

    /// Before posting: nothing is in flight on `requestq`, so its used ring must be empty. A
    /// used element there names a request that was never posted or already completed (stale,
    /// repeated, invented); taking it for the next request's completion would read that
    /// request's result before the device wrote it. Fatal: [`IommuError::DeviceProtocol`].
    fn check_nothing_used(&mut self) -> Result<(), IommuError> {
        if self.requestq.can_pop() {
            self.broken = true;
            return Err(IommuError::DeviceProtocol);
        }
        Ok(())
    }

    /// The periodic status check while waiting: DEVICE_NEEDS_RESET set, or DRIVER_OK gone (the
    /// device reset itself), is fatal.
    fn check_needs_reset(&mut self) -> Result<(), IommuError> {
        let status = self.transport.get_status();
        if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            self.broken = true;
            return Err(IommuError::DeviceNeedsReset);
        }
        if !status.contains(DeviceStatus::DRIVER_OK) {
            self.broken = true;
            return Err(IommuError::DeviceReset);
        }
        Ok(())
    }

    /// Synchronous requests and batches share `requestq` with the non-blocking ones: refused
    /// with [`IommuError::Busy`] while one is in flight.
    fn nb_idle(&self) -> Result<(), IommuError> {
        if self.nb.in_flight() > 0 {
            Err(IommuError::Busy)
        } else {
            Ok(())
        }
    }

    fn usable(&self) -> Result<(), IommuError> {
        if self.broken {
            Err(IommuError::Broken)
        } else {
            Ok(())
        }
    }

    fn need(&self, f: Features) -> Result<(), IommuError> {
        if self.features.contains(f) {
            Ok(())
        } else {
            Err(IommuError::NotNegotiated(f))
        }
    }

    fn check_domain(&self, domain: u32) -> Result<(), IommuError> {
        let (lo, hi) = self.config.domain_range;
        if domain < lo || domain > hi {
            return Err(IommuError::DomainOutOfRange(domain));
        }
        Ok(())
    }

    fn check_aligned(&self, value: u64) -> Result<(), IommuError> {
        let granule = self.config.granule;
        if value & (granule - 1) != 0 {
            return Err(IommuError::Unaligned { value, granule });
        }
        Ok(())
    }

    fn check_iova_range(&self, start: u64, end: u64) -> Result<(), IommuError> {
        if end <= start {
            return Err(IommuError::InvalidRange);
        }
        let (lo, hi) = self.config.input_range;
        if start < lo || end > hi {
            return Err(IommuError::IovaOutOfRange { start, end });
        }
        self.check_aligned(start)?;
        // `end + 1` wraps to 0 for `end == u64::MAX`, which is aligned: 2^64 is a multiple of
        // every granule.
        self.check_aligned(end.wrapping_add(1))
    }
}

impl<H: Hal, T: Transport> Drop for VirtIOIommu<H, T> {
    fn drop(&mut self) {
        // Reset first so the device stops using the queues and buffers freed after this; the
        // reset is only done once the status reads 0 (virtio §2.4.2).
        // No `queue_unset`: the completed reset clears the queues, and virtio-drivers' MMIO
        // `queue_unset` spins until QueueReady reads 0.
        if !reset(&mut *self.transport, &self.options.wait) {
            log::warn!(
                "virtio-iommu: device status did not read 0 after reset; leaking its rings \
                 and buffers"
            );
            return;
        }
        // `self.transport` is never dropped (it is in a `ManuallyDrop`): see `abandon`.
        // SAFETY: each field is dropped exactly once, here, and never used again (this is the
        // driver's `drop`). The device has completed its reset, so it no longer accesses the
        // rings or buffers.
        unsafe {
            ManuallyDrop::drop(&mut self.requestq);
            ManuallyDrop::drop(&mut self.eventq);
            ManuallyDrop::drop(&mut self.request_buffer);
            ManuallyDrop::drop(&mut self.event_buffer);
            ManuallyDrop::drop(&mut self.batch_buffer);
            ManuallyDrop::drop(&mut self.nb_buffer);
        }
    }
}

/// Polls `poll` (called with the number of earlier calls) until it returns true: at most
/// `max(wait.max_polls, 1)` calls, and — with `wait.clock` — until `wait.timeout_ns` have passed
/// since the 256th. Returns whether `poll` returned true; its errors end the wait.
fn bounded_poll(
    wait: &WaitPolicy,
    mut poll: impl FnMut(u64) -> Result<bool, IommuError>,
) -> Result<bool, IommuError> {
    // The clock is read from the first check on (256 polls in), not before: most waits end
    // sooner, and reading a clock can cost more than the request.
    let mut start = None;
    let mut polls = 0u64;
    while !poll(polls)? {
        polls += 1;
        if polls.is_multiple_of(256) {
            if let Some(clock) = wait.clock {
                let t0 = *start.get_or_insert_with(clock);
                if clock().wrapping_sub(t0) > wait.timeout_ns {
                    return Ok(false);
                }
            }
        }
        if polls >= wait.max_polls {
            return Ok(false);
        }
        core::hint::spin_loop();
    }
    Ok(true)
}

/// Ends a failed [`VirtIOIommu::new`] after its first reset: resets the device again (bounded by
/// `wait`); frees `rings` (the virtqueues the device was told about, or `()`) only if the status
/// read 0, else leaks them; sets FAILED (virtio §3.1.1) and returns `e`.
///
/// The transport is forgotten, never dropped: virtio-drivers 0.13's `PciTransport::drop`
/// writes 0 to the status and then reads it until it reads 0 without bound, which hangs on a
/// device that does not finish its reset. Forgetting it leaks nothing: `PciTransport` and
/// `MmioTransport` hold only MMIO pointers (no allocation, no DMA memory), and their `Drop`
/// only resets the device, which the driver does itself, bounded.
fn abandon<T: Transport, R>(
    mut transport: T,
    wait: &WaitPolicy,
    rings: R,
    e: IommuError,
) -> IommuError {
    if reset(&mut transport, wait) {
        drop(rings);
    } else {
        log::warn!("virtio-iommu: device status did not read 0 after reset; leaking its rings");
        core::mem::forget(rings);
    }
    let s = transport.get_status();
    transport.set_status(s | DeviceStatus::FAILED);
    core::mem::forget(transport);
    e
}

/// Writes 0 to the device status (reset) and reads it until it reads 0, bounded by `wait`.
/// Returns whether it did.
fn reset<T: Transport>(t: &mut T, wait: &WaitPolicy) -> bool {
    t.set_status(DeviceStatus::empty());
    bounded_poll(wait, |_| Ok(t.get_status().is_empty())).unwrap_or(false)
}

/// The device-readable part (`readable` bytes) and the 4-byte tail of batch slot `slot`.
fn batch_slot_parts(buf: &mut [u8], slot: usize, readable: usize) -> (&[u8], &mut [u8]) {
    let at = slot * BATCH_SLOT;
    let (head, tail) = buf[at..at + BATCH_SLOT].split_at_mut(BATCH_TAIL_AT);
    (&head[..readable], &mut tail[..TAIL])
}

/// Cuts `buf` into the readable parts (sizes of `readable`) followed by the writable parts.
fn split_parts<'a>(
    buf: &'a mut [u8],
    readable: &[&[u8]],
    writable_lens: &[usize],
) -> ([&'a [u8]; MAX_RAW_PARTS], [&'a mut [u8]; MAX_RAW_PARTS]) {
    let mut ins: [&[u8]; MAX_RAW_PARTS] = [&[]; MAX_RAW_PARTS];
    let mut outs: [&mut [u8]; MAX_RAW_PARTS] = Default::default();
    let mut rest = buf;
    for (slot, part) in ins.iter_mut().zip(readable) {
        let (head, tail) = core::mem::take(&mut rest).split_at_mut(part.len());
        *slot = head;
        rest = tail;
    }
    for (slot, &len) in outs.iter_mut().zip(writable_lens) {
        let (head, tail) = core::mem::take(&mut rest).split_at_mut(len);
        *slot = head;
        rest = tail;
    }
    (ins, outs)
}

/// The outcome of a tail's status byte: [`IommuError::NotWritten`] for [`WRITABLE_FILL`] (the
/// device did not write it), else the status.
fn status_of(byte: u8) -> Result<(), IommuError> {
    if byte == WRITABLE_FILL {
        return Err(IommuError::NotWritten);
    }
    match Status::from_u8(byte) {
        Some(Status::Ok) => Ok(()),
        Some(s) => Err(IommuError::Status(s)),
        None => Err(IommuError::UnknownStatus(byte)),
    }
}

fn read_u32<T: Transport>(t: &T, offset: usize) -> Result<u32, IommuError> {
    Ok(t.read_config_space::<u32>(offset)?)
}

fn read_u64<T: Transport>(t: &T, offset: usize) -> Result<u64, IommuError> {
    // virtio-drivers only allows 4-byte aligned config accesses: read two halves.
    let lo = read_u32(t, offset)?;
    let hi = read_u32(t, offset + 4)?;
    Ok(u64::from(lo) | u64::from(hi) << 32)
}

/// Runs `read` between two reads of the config generation (virtio §2.5.1) until both agree, at
/// most `attempts` times (at least once): virtio-drivers' `Transport::read_consistent` retries
/// without bound. An error of `read` ends it at once.
///
/// # Errors
///
/// Those of `read`; [`IommuError::ConfigUnstable`] when the generation changed during
/// every attempt.
fn read_consistent<T: Transport, R>(
    t: &T,
    attempts: u32,
    mut read: impl FnMut() -> Result<R, IommuError>,
) -> Result<R, IommuError> {
    for _ in 0..attempts.max(1) {
        let before = t.read_config_generation();
        let value = read()?;
        if t.read_config_generation() == before {
            return Ok(value);
        }
    }
    Err(IommuError::ConfigUnstable)
}

/// Reads the configuration (consistently, at most `attempts` times, see [`read_consistent`])
/// and checks it.
fn read_config<T: Transport>(
    t: &T,
    features: Features,
    attempts: u32,
) -> Result<IommuConfig, IommuError> {
    let raw = read_consistent(t, attempts, || {
        let page_size_mask = read_u64(t, config_offset::PAGE_SIZE_MASK)?;
        let input_range = if features.contains(Features::INPUT_RANGE) {
            (
                read_u64(t, config_offset::INPUT_RANGE_START)?,
                read_u64(t, config_offset::INPUT_RANGE_END)?,
            )
        } else {
            (0, u64::MAX)
        };
        let domain_range = if features.contains(Features::DOMAIN_RANGE) {
            (
                read_u32(t, config_offset::DOMAIN_RANGE_START)?,
                read_u32(t, config_offset::DOMAIN_RANGE_END)?,
            )
        } else {
            (0, u32::MAX)
        };
        let probe_size = if features.contains(Features::PROBE) {
            read_u32(t, config_offset::PROBE_SIZE)?
        } else {
            0
        };
        Ok((page_size_mask, input_range, domain_range, probe_size))
    })?;
    let (page_size_mask, input_range, domain_range, probe_size) = raw;
    if page_size_mask == 0 {
        return Err(IommuError::InvalidConfig("page_size_mask is 0"));
    }
    if input_range.0 > input_range.1 {
        return Err(IommuError::InvalidConfig("input_range start > end"));
    }
    if domain_range.0 > domain_range.1 {
        return Err(IommuError::InvalidConfig("domain_range start > end"));
    }
    if probe_size > MAX_PROBE_SIZE {
        return Err(IommuError::InvalidConfig("probe_size too large"));
    }
    Ok(IommuConfig {
        page_size_mask,
        granule: 1 << page_size_mask.trailing_zeros(),
        input_range,
        domain_range,
        probe_size,
    })
}
