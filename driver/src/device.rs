//! The virtio-iommu device driver (virtio v1.3 §5.13) on virtio-drivers' `Transport`, `Hal` and
//! `VirtQueue`.

use crate::error::IommuError;
use crate::parse::{parse_fault, parse_probe_properties, FaultEvent, ProbeProperty};
use crate::wire::{
    config_offset, Features, MapFlags, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqProbe, ReqTail,
    ReqUnmap, RequestType, Status, ATTACH_F_BYPASS, EVENTQ, REQUESTQ,
};
use core::marker::PhantomData;
use core::ptr::NonNull;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::IntoBytes;

/// Number of descriptors of `requestq` (each synchronous request uses 2).
pub const REQUESTQ_SIZE: usize = 64;
/// Number of descriptors of `eventq`; this many event buffers are kept posted.
pub const EVENTQ_SIZE: usize = 64;
/// Size in bytes of each event buffer: room for `struct virtio_iommu_fault` (24 bytes) and
/// for a longer future format.
pub const EVENT_BUFFER_SIZE: usize = 64;
/// Largest `probe_size` (bytes) this driver accepts; a larger value is
/// [`IommuError::InvalidConfig`].
pub const MAX_PROBE_SIZE: u32 = 1 << 20;

const TAIL: usize = size_of::<ReqTail>();
/// Most descriptors per direction in [`VirtIOIommu::request_raw`].
const MAX_RAW_PARTS: usize = 16;
const PROBE_HEAD: usize = size_of::<ReqProbe>();

/// How long the driver waits for the device to complete a request.
///
/// The wait is a poll loop over the used ring. It ends with [`IommuError::Timeout`] after
/// `max_polls` polls, or — when `clock` is given — once `clock()` has advanced by `timeout_ns`.
/// Every 256 polls the device status is read, and DEVICE_NEEDS_RESET ends the wait with
/// [`IommuError::DeviceNeedsReset`].
#[derive(Clone, Copy, Debug)]
pub struct WaitPolicy {
    /// Upper bound on used-ring polls per request.
    pub max_polls: u64,
    /// Optional monotonic clock in nanoseconds.
    pub clock: Option<fn() -> u64>,
    /// Time budget in nanoseconds when `clock` is set.
    pub timeout_ns: u64,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self {
            max_polls: 100_000_000,
            clock: None,
            timeout_ns: 2_000_000_000,
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
    /// Reports ignored as the spec requires (used length < 24 bytes, non-zero `reserved`).
    pub ignored: u64,
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
/// status. Arguments are validated against the negotiated features and configuration *before*
/// anything is sent. The IOMMU's own queues use `H`, which must give addresses the device can
/// use directly (the IOMMU's own DMA is not translated by itself).
///
/// Fatal conditions (timeout, DEVICE_NEEDS_RESET, a used buffer that was never posted) leave
/// the driver [`IommuError::Broken`]; buffers the device may still own are kept until drop,
/// which resets the device first.
pub struct VirtIOIommu<H: Hal, T: Transport> {
    transport: T,
    requestq: VirtQueue<H, REQUESTQ_SIZE>,
    eventq: VirtQueue<H, EVENTQ_SIZE>,
    request_buffer: DmaBuffer<H>,
    event_buffer: DmaBuffer<H>,
    /// `event_slot_of_token[token]` = slot index + 1 of the event buffer posted with `token`.
    event_slot_of_token: [u16; EVENTQ_SIZE],
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
    /// Resets and initialises the device (virtio §3.1.1): negotiates `VERSION_1` and `MAP_UNMAP`
    /// (required), plus `INPUT_RANGE`, `DOMAIN_RANGE`, `PROBE`, `MMIO`, `BYPASS_CONFIG` and
    /// `ACCESS_PLATFORM` when offered (§5.13.3); reads and checks the configuration (§5.13.4);
    /// sets up `requestq` and `eventq` and fills `eventq` with [`EVENTQ_SIZE`] buffers.
    ///
    /// Errors: [`IommuError::WrongDeviceType`], [`IommuError::MissingFeatures`],
    /// [`IommuError::FeaturesRejected`], [`IommuError::InvalidConfig`],
    /// [`IommuError::DmaAlloc`], [`IommuError::Transport`] (queue setup). On error the device
    /// is left with FAILED set.
    pub fn new(mut transport: T, options: IommuOptions) -> Result<Self, IommuError> {
        if transport.device_type() != DeviceType::IOMMU {
            return Err(IommuError::WrongDeviceType);
        }
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = Features::from_bits_retain(transport.read_device_features());
        let fail = |t: &mut T, e| {
            let s = t.get_status();
            t.set_status(s | DeviceStatus::FAILED);
            e
        };
        if !offered.contains(REQUIRED) {
            return Err(fail(
                &mut transport,
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
            return Err(fail(&mut transport, IommuError::FeaturesRejected));
        }
        let config = match read_config(&transport, features) {
            Ok(c) => c,
            Err(e) => return Err(fail(&mut transport, e)),
        };
        let request_bytes = PROBE_HEAD + config.probe_size as usize + TAIL;
        let setup = (|| {
            let requestq = VirtQueue::new(&mut transport, REQUESTQ, false, false)?;
            let eventq = VirtQueue::new(&mut transport, EVENTQ, false, false)?;
            Ok::<_, IommuError>((requestq, eventq))
        })();
        let (requestq, eventq) = match setup {
            Ok(q) => q,
            Err(e) => return Err(fail(&mut transport, e)),
        };
        let buffers = DmaBuffer::new(request_bytes.max(PAGE_SIZE))
            .and_then(|r| Ok((r, DmaBuffer::new(EVENTQ_SIZE * EVENT_BUFFER_SIZE)?)));
        let (request_buffer, event_buffer) = match buffers {
            Ok(b) => b,
            Err(e) => return Err(fail(&mut transport, e)),
        };
        transport.finish_init();
        let mut iommu = Self {
            transport,
            requestq,
            eventq,
            request_buffer,
            event_buffer,
            event_slot_of_token: [0; EVENTQ_SIZE],
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

    /// Whether a fatal error made the driver unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The transport, for callers that need device status or config access.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Reads the `bypass` config field (§5.13.4): `Some(true)` when unattached endpoints bypass
    /// translation. Bits 1-7 are ignored as the spec requires. `None` without BYPASS_CONFIG.
    pub fn bypass(&self) -> Option<bool> {
        if !self.features.contains(Features::BYPASS_CONFIG) {
            return None;
        }
        let v: u8 = self
            .transport
            .read_config_space(config_offset::BYPASS)
            .ok()?;
        Some(v & 1 == 1)
    }

    /// Writes the `bypass` config field (§5.13.4): `false` blocks the DMA of unattached
    /// endpoints. Needs BYPASS_CONFIG ([`IommuError::NotNegotiated`]); the device setting
    /// DEVICE_NEEDS_RESET in response is [`IommuError::DeviceNeedsReset`].
    pub fn set_bypass(&mut self, bypass: bool) -> Result<(), IommuError> {
        self.usable()?;
        self.need(Features::BYPASS_CONFIG)?;
        self.transport
            .write_config_space(config_offset::BYPASS, u8::from(bypass))?;
        self.check_needs_reset()
    }

    /// ATTACH (§5.13.6.1): attaches `endpoint` to `domain`, creating the domain if it does not
    /// exist. An endpoint attached elsewhere is moved (the device detaches it first).
    ///
    /// Errors: [`IommuError::DomainOutOfRange`]; device statuses such as `S_NOENT` (unknown
    /// endpoint), `S_INVAL` (the domain is a bypass domain), `S_UNSUPP`; and the transport
    /// errors of every request.
    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        self.attach_with_flags(domain, endpoint, 0)
    }

    /// ATTACH with `VIRTIO_IOMMU_ATTACH_F_BYPASS` (§5.13.6.1): `domain` is an identity
    /// (bypass) domain, for endpoints that need no isolation. Needs BYPASS_CONFIG.
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

    /// DETACH (§5.13.6.2): detaches `endpoint` from `domain`. The domain ceases to exist when
    /// its last endpoint leaves.
    ///
    /// Errors: [`IommuError::DomainOutOfRange`]; `S_NOENT` (unknown endpoint, and on QEMU ≥ 9.1
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

    /// MAP (§5.13.6.3): maps IOVAs `virt_start..=virt_end` (inclusive) of `domain` to
    /// guest-physical addresses from `phys_start`, with permissions `flags`.
    ///
    /// Checked before sending: `virt_end > virt_start`; the range inside `input_range`;
    /// `virt_start`, `phys_start` and `virt_end + 1` multiples of the granule;
    /// `phys_start + (virt_end - virt_start)` does not overflow; `flags` only READ, WRITE and
    /// (with F_MMIO) MMIO; `domain` inside `domain_range`.
    ///
    /// Errors: [`IommuError::InvalidRange`], [`IommuError::IovaOutOfRange`],
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
        let req = ReqMap {
            head: ReqHead::new(RequestType::Map),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            phys_start: phys_start.into(),
            flags: flags.bits().into(),
        };
        self.request(req.as_bytes())
    }

    /// UNMAP (§5.13.6.4): removes every mapping of `domain` inside `virt_start..=virt_end`
    /// (inclusive). The range may cover unmapped space; it must not split a mapping.
    ///
    /// Checked before sending: as for [`Self::map`] (range, alignment, `input_range`, domain).
    ///
    /// Errors: those checks; device statuses `S_RANGE` (the range would split a mapping;
    /// nothing is removed), `S_NOENT` (no such domain), `S_INVAL` (bypass domain).
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuError> {
        self.check_domain(domain)?;
        self.check_iova_range(virt_start, virt_end)?;
        let req = ReqUnmap {
            head: ReqHead::new(RequestType::Unmap),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            reserved: [0; 4],
        };
        self.request(req.as_bytes())
    }

    /// PROBE (§5.13.6.5): asks for `endpoint`'s properties and calls `f` with each one, in
    /// order (reserved memory regions, and unknown properties which the caller may ignore).
    ///
    /// Errors: [`IommuError::NotNegotiated`] without F_PROBE; device status `S_NOENT` (unknown
    /// endpoint), `S_INVAL`; [`IommuError::BadUsedLength`] unless the device used exactly
    /// `probe_size + 4` bytes; [`IommuError::MalformedProbe`].
    pub fn probe(&mut self, endpoint: u32, f: impl FnMut(ProbeProperty)) -> Result<(), IommuError> {
        self.need(Features::PROBE)?;
        let req = ReqProbe {
            endpoint: endpoint.into(),
            ..ReqProbe::default()
        };
        let probe_size = self.config.probe_size as usize;
        let writable = probe_size + TAIL;
        let used = self.submit(req.as_bytes(), writable)?;
        if used as usize != writable {
            return Err(IommuError::BadUsedLength {
                used,
                expected: writable as u32,
            });
        }
        let reply = &self.request_buffer.bytes()[PROBE_HEAD..PROBE_HEAD + writable];
        status_of(reply[probe_size])?;
        parse_probe_properties(&reply[..probe_size], f)
    }

    /// PROBE returning the reserved regions only (see [`Self::probe`]).
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
    /// device-writable descriptor of that many bytes (zeroed), so a request can be split over
    /// descriptors at any byte. The device-writable bytes are copied back into `writable`
    /// (which must be exactly their total size). Returns the used length in bytes as the device
    /// reported it — 0 included, and not compared with the posted size. For conformance tests
    /// and diagnostics: the caller checks the reply.
    ///
    /// Errors: [`IommuError::BufferSize`] for an empty part, more than 16 parts per
    /// direction, no part at all, `writable.len()` not the sum of `writable_lens`, or more
    /// bytes than the request buffer (`max(4096, 72 + probe_size + 4)` bytes); the transport
    /// errors.
    pub fn request_raw(
        &mut self,
        readable: &[&[u8]],
        writable_lens: &[usize],
        writable: &mut [u8],
    ) -> Result<u32, IommuError> {
        if writable.len() != writable_lens.iter().sum::<usize>() {
            return Err(IommuError::BufferSize);
        }
        let used = self.submit_parts(readable, writable_lens)?;
        let start: usize = readable.iter().map(|p| p.len()).sum();
        let n = writable.len();
        writable.copy_from_slice(&self.request_buffer.bytes()[start..start + n]);
        Ok(used)
    }

    /// Takes the next fault report from `eventq`, if any, and posts its buffer again
    /// (§5.13.6.7). Reports the spec says to ignore are counted in [`EventStats::ignored`] and
    /// skipped. Never blocks.
    ///
    /// Errors: [`IommuError::DeviceProtocol`] if the device used a buffer that was not posted
    /// (the driver is then broken); transport errors while re-posting.
    pub fn poll_event(&mut self) -> Result<Option<FaultEvent>, IommuError> {
        self.usable()?;
        loop {
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
            self.post_event_buffer(slot)?;
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
    }

    fn post_event_buffer(&mut self, slot: usize) -> Result<(), IommuError> {
        let range = slot * EVENT_BUFFER_SIZE..(slot + 1) * EVENT_BUFFER_SIZE;
        let buf = &mut self.event_buffer.bytes()[range];
        buf.fill(0);
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
        status_of(self.request_buffer.bytes()[start])
    }

    /// Posts `readable` followed by `writable_len` device-writable bytes (zeroed) from the
    /// request buffer, notifies and waits. Returns the used length, which is checked to be
    /// non-zero and at most `writable_len`.
    fn submit(&mut self, readable: &[u8], writable_len: usize) -> Result<u32, IommuError> {
        if readable.is_empty() || writable_len == 0 {
            return Err(IommuError::BufferSize);
        }
        let used = self.submit_parts(&[readable], &[writable_len])?;
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
    /// one zeroed device-writable descriptor per entry of `writable_lens`, right after them;
    /// notifies and waits. Returns the used length as the device reported it, unchecked.
    fn submit_parts(
        &mut self,
        readable: &[&[u8]],
        writable_lens: &[usize],
    ) -> Result<u32, IommuError> {
        self.usable()?;
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
        buf[at..at + w_total].fill(0);
        let token = {
            let (ins, mut outs) = split_parts(self.request_buffer.bytes(), readable, writable_lens);
            let (ins, outs) = (&ins[..readable.len()], &mut outs[..writable_lens.len()]);
            // SAFETY: every slice belongs to `self.request_buffer`, which outlives any use by
            // the device (on timeout the driver is marked broken and the buffer is only freed
            // after the device reset in `drop`). They are not accessed until `pop_used` below.
            unsafe { self.requestq.add(ins, outs) }?
        };
        if self.requestq.should_notify() {
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

    fn wait_used(&mut self) -> Result<(), IommuError> {
        let wait = self.options.wait;
        let start = wait.clock.map(|c| c());
        let mut polls = 0u64;
        while !self.requestq.can_pop() {
            polls += 1;
            if polls.is_multiple_of(256) {
                self.check_needs_reset()?;
                if let (Some(clock), Some(t0)) = (wait.clock, start) {
                    if clock().wrapping_sub(t0) > wait.timeout_ns {
                        self.broken = true;
                        return Err(IommuError::Timeout);
                    }
                }
            }
            if polls >= wait.max_polls {
                self.broken = true;
                return Err(IommuError::Timeout);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    fn check_needs_reset(&mut self) -> Result<(), IommuError> {
        if self
            .transport
            .get_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
        {
            self.broken = true;
            return Err(IommuError::DeviceNeedsReset);
        }
        Ok(())
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
        // Reset first so the device stops using the queues and buffers freed after this.
        self.transport.set_status(DeviceStatus::empty());
        self.transport.queue_unset(REQUESTQ);
        self.transport.queue_unset(EVENTQ);
    }
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

fn status_of(byte: u8) -> Result<(), IommuError> {
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

/// Reads the configuration (consistently, via the generation counter) and checks it.
fn read_config<T: Transport>(t: &T, features: Features) -> Result<IommuConfig, IommuError> {
    let raw = t.read_consistent(|| {
        let page_size_mask = read_u64(t, config_offset::PAGE_SIZE_MASK).map_err(to_vd)?;
        let input_range = if features.contains(Features::INPUT_RANGE) {
            (
                read_u64(t, config_offset::INPUT_RANGE_START).map_err(to_vd)?,
                read_u64(t, config_offset::INPUT_RANGE_END).map_err(to_vd)?,
            )
        } else {
            (0, u64::MAX)
        };
        let domain_range = if features.contains(Features::DOMAIN_RANGE) {
            (
                read_u32(t, config_offset::DOMAIN_RANGE_START).map_err(to_vd)?,
                read_u32(t, config_offset::DOMAIN_RANGE_END).map_err(to_vd)?,
            )
        } else {
            (0, u32::MAX)
        };
        let probe_size = if features.contains(Features::PROBE) {
            read_u32(t, config_offset::PROBE_SIZE).map_err(to_vd)?
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

fn to_vd(e: IommuError) -> virtio_drivers::Error {
    match e {
        IommuError::Transport(e) => e,
        _ => virtio_drivers::Error::IoError,
    }
}
