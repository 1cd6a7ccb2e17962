//! A fake virtio-iommu for host tests of the real `VirtIOIommu`: a virtio-drivers `Transport`
//! whose `notify` runs a small device model over the driver's split rings (in this process's
//! memory: `FakeHal`'s physical address = the host pointer), with knobs to misbehave (complete
//! out of order, return unknown tokens, bad used lengths, never complete, need a reset, complete
//! without writing, change the config generation on every read, never finish a reset, flood the
//! eventq with malformed reports, inject used elements).
//!
//! The model allocates nothing while processing requests (fixed arrays, a `Vec` with reserved
//! capacity), so the allocation-counting test can count the driver alone.

#![allow(dead_code)]

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use virtio_iommu_driver::wire::{Features, MapFlags, Status};
use virtio_iommu_driver::{IommuOptions, VirtIOIommu, WaitPolicy};
use zerocopy::{FromBytes, Immutable, IntoBytes};

thread_local! {
    /// > 0 while allocations of this thread are not the driver's (see `uncounted`).
    static PAUSED: Cell<u32> = const { Cell::new(0) };
    /// Pages currently allocated by `FakeHal::dma_alloc` on this thread and not freed.
    static DMA_LIVE_PAGES: Cell<usize> = const { Cell::new(0) };
}

/// Pages of DMA memory this thread allocated through `FakeHal` and has not freed yet.
pub fn dma_live_pages() -> usize {
    DMA_LIVE_PAGES.with(Cell::get)
}

/// Runs `f` with this thread's allocations excluded from the counting allocator of
/// `tests/no_alloc.rs` (used for the fake `Hal`'s memory, which stands for the embedder's).
pub fn uncounted<R>(f: impl FnOnce() -> R) -> R {
    PAUSED.with(|p| p.set(p.get() + 1));
    let r = f();
    PAUSED.with(|p| p.set(p.get() - 1));
    r
}

/// Whether this thread's allocations are excluded right now.
pub fn counting_paused() -> bool {
    PAUSED.try_with(|p| p.get() > 0).unwrap_or(true)
}

/// A `Hal` over the host heap: physical address = host address.
#[derive(Debug)]
pub struct FakeHal;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).unwrap()
}

// SAFETY: `dma_alloc` returns fresh zeroed page-aligned heap memory owned by the caller until
// `dma_dealloc`; `share` gives the buffer's own address, valid while the caller keeps it.
unsafe impl Hal for FakeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size.
        let p = uncounted(|| unsafe { std::alloc::alloc_zeroed(layout(pages)) });
        let p = NonNull::new(p).expect("out of memory");
        DMA_LIVE_PAGES.with(|c| c.set(c.get() + pages.max(1)));
        (p.as_ptr() as PhysAddr, p)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: allocated by `dma_alloc` with this layout.
        uncounted(|| unsafe { std::alloc::dealloc(vaddr.as_ptr(), layout(pages)) });
        DMA_LIVE_PAGES.with(|c| c.set(c.get() - pages.max(1)));
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// How the fake device completes requests.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Behaviour {
    /// In ring order, like QEMU.
    InOrder,
    /// All requests of one notification in reverse order.
    Reverse,
    /// Never (the requests stay in flight).
    Hold,
    /// In order, but with used element ids shifted by 1 (tokens the driver never posted, or
    /// the middle of a chain).
    WrongId,
    /// In order, with this used length for every request (the tail is written if it is >= 4).
    UsedLen(u32),
    /// In order, every used element twice.
    Duplicate,
    /// Sets DEVICE_NEEDS_RESET instead of completing.
    NeedsReset,
    /// In order, with the correct used length (4, or `probe_size + 4` for PROBE), but writes
    /// nothing into the device-writable part.
    NoWrite,
    /// In order, with the correct used length; writes the status but (PROBE) not the
    /// properties.
    StatusOnly,
    /// Does not process requests; advances the used index by one per request without writing
    /// a used element (the driver finds whatever the ring slot held before).
    IdxOnly,
}

#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
    ready: bool,
    last_avail: u16,
    used_idx: u16,
}

/// A mapping of the model: domain, first and last IOVA.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Mapping {
    /// Domain ID.
    pub domain: u32,
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Physical address of `start`.
    pub phys: u64,
    /// MAP flags.
    pub flags: u32,
}

/// The device state, shared between the transport (owned by the driver) and the test.
#[derive(Debug)]
pub struct State {
    /// Offered features.
    pub offered: u64,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// Device status register.
    pub status: u32,
    /// `max_queue_size` of both queues.
    pub max_queue_size: u32,
    /// `struct virtio_iommu_config`.
    pub config: [u8; 40],
    queues: [Queue; 2],
    /// How requests complete.
    pub behaviour: Behaviour,
    /// `notify(0)` calls.
    pub notifications: u64,
    /// Requests processed.
    pub requests: u64,
    /// Live mappings (capacity reserved up front).
    pub mappings: Vec<Mapping>,
    /// `(endpoint, domain)` attachments.
    pub attached: Vec<(u32, u32)>,
    /// Domains that exist.
    pub domains: Vec<u32>,
    /// Config generation (`read_config_generation`).
    pub generation: u32,
    /// Number of upcoming `read_config_generation` calls that advance the generation first
    /// (`u64::MAX`: every one, a config that never reads consistently).
    pub generation_changes: u64,
    /// A write of 0 to the status register is ignored (the device never finishes a reset).
    pub reset_stuck: bool,
    /// `Some(n)`: the device completes the next `n` resets (writes of 0 to the status), then
    /// ignores every later one, as with `reset_stuck` (a device that sticks mid-life).
    pub resets_left: Option<u32>,
    /// With `resets_left` at `Some(0)`: once the last completed reset has been read back as 0,
    /// the device sets DEVICE_NEEDS_RESET (it failed again, and will not reset any more).
    pub fails_after_last_reset: bool,
    /// `queue_unset` behaves like virtio-drivers 0.13's modern `MmioTransport::queue_unset`
    /// on a device whose QueueReady never reads 0: it spins forever.
    pub queue_ready_stuck: bool,
    /// Dropping the transport behaves like virtio-drivers 0.13's `PciTransport::drop`: writes
    /// 0 to the status and spins until it reads 0.
    pub reset_on_drop: bool,
    /// When set, every available eventq buffer is completed at once (on each eventq
    /// notification and on [`FakeDevice::complete_events`]) with this used length, writing
    /// nothing (a malformed report for lengths below 24, or one the driver did not see written).
    pub event_flood: Option<u32>,
    /// eventq buffers completed so far.
    pub events_completed: u64,
    /// Requests completed with the PROBE type.
    pub probes: u64,
}

/// The transport handed to the driver; [`FakeDevice::state`] reaches the same state.
#[derive(Clone, Debug)]
pub struct FakeTransport(Arc<Mutex<State>>);

/// Builds fake devices.
#[derive(Clone, Debug)]
pub struct FakeDevice(Arc<Mutex<State>>);

/// Endpoint IDs the fake device knows.
pub const ENDPOINTS: [u32; 4] = [8, 16, 24, 32];

impl FakeDevice {
    /// A device with granule 4 KiB, input range 0..=2^48-1, domains 1..=1000, BYPASS_CONFIG, no
    /// PROBE, queues of 256.
    pub fn new() -> Self {
        let mut config = [0u8; 40];
        config[0..8].copy_from_slice(&0xffff_ffff_ffff_f000u64.to_le_bytes());
        config[8..16].copy_from_slice(&0u64.to_le_bytes());
        config[16..24].copy_from_slice(&0xffff_ffff_ffffu64.to_le_bytes());
        config[24..28].copy_from_slice(&1u32.to_le_bytes());
        config[28..32].copy_from_slice(&1000u32.to_le_bytes());
        config[36] = 1;
        let offered = Features::VERSION_1
            | Features::MAP_UNMAP
            | Features::INPUT_RANGE
            | Features::DOMAIN_RANGE
            | Features::BYPASS_CONFIG;
        Self(Arc::new(Mutex::new(State {
            offered: offered.bits(),
            driver_features: 0,
            status: 0,
            max_queue_size: 256,
            config,
            queues: [Queue::default(); 2],
            behaviour: Behaviour::InOrder,
            notifications: 0,
            requests: 0,
            mappings: Vec::with_capacity(1 << 16),
            attached: Vec::with_capacity(64),
            domains: Vec::with_capacity(1024),
            generation: 0,
            generation_changes: 0,
            reset_stuck: false,
            resets_left: None,
            fails_after_last_reset: false,
            queue_ready_stuck: false,
            reset_on_drop: false,
            event_flood: None,
            events_completed: 0,
            probes: 0,
        })))
    }

    /// The same device offering F_PROBE with `probe_size` bytes of properties. PROBE of a known
    /// endpoint answers one RESV_MEM MSI region `0x0800_0000..=0x080f_ffff`, zero-filled after.
    pub fn with_probe(probe_size: u32) -> Self {
        let dev = Self::new();
        {
            let mut s = dev.state();
            s.offered |= Features::PROBE.bits();
            s.config[32..36].copy_from_slice(&probe_size.to_le_bytes());
        }
        dev
    }

    /// Completes every available eventq buffer per [`State::event_flood`] (nothing without it).
    pub fn complete_events(&self) {
        self.state().process_eventq();
    }

    /// Writes `report` into the next available eventq buffer and completes it with used length
    /// `used`. Returns the buffer's descriptor id, `None` when no buffer is available.
    pub fn push_event(&self, report: &[u8], used: u32) -> Option<u32> {
        self.state().push_event(report, used)
    }

    /// Appends a used element `(id, len)` to queue `queue`'s used ring without any request
    /// behind it (a stale, duplicate or invented completion).
    pub fn inject_used(&self, queue: usize, id: u32, len: u32) {
        self.state().push_used_on(queue, id, len);
    }

    /// A driver with these options.
    pub fn driver_with(
        &self,
        options: IommuOptions,
    ) -> Result<VirtIOIommu<FakeHal, FakeTransport>, virtio_iommu_driver::IommuError> {
        VirtIOIommu::new(self.transport(), options)
    }

    /// The shared state.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A transport for the driver.
    pub fn transport(&self) -> FakeTransport {
        FakeTransport(self.0.clone())
    }

    /// A driver on this device, waiting at most 10 000 polls per request.
    pub fn driver(&self) -> VirtIOIommu<FakeHal, FakeTransport> {
        let options = IommuOptions {
            wait: WaitPolicy {
                max_polls: 10_000,
                ..WaitPolicy::default()
            },
            ..IommuOptions::default()
        };
        VirtIOIommu::new(self.transport(), options).expect("driver init")
    }
}

impl Default for FakeDevice {
    fn default() -> Self {
        Self::new()
    }
}

// --- Guest memory access (physical address = host address, see `FakeHal`). ---

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: the driver gave these addresses (rings and buffers from `FakeHal`), which stay
    // allocated while requests are in flight; unaligned reads are allowed.
    unsafe { std::ptr::read_volatile(addr as *const T) }
}

fn wr<T: Copy>(addr: u64, v: T) {
    // SAFETY: as for `rd`; the driver posted these bytes as device-writable (used ring, tails).
    unsafe { std::ptr::write_volatile(addr as *mut T, v) }
}

impl State {
    /// The `flags` of queue `queue`'s available ring (bit 0: VIRTQ_AVAIL_F_NO_INTERRUPT).
    pub fn avail_flags(&self, queue: usize) -> u16 {
        rd(self.queues[queue].avail)
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.config[off..off + 4].try_into().unwrap())
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.config[off..off + 8].try_into().unwrap())
    }

    /// Processes every available request of `requestq` and completes them per `behaviour`.
    fn process_requestq(&mut self) {
        let q = self.queues[0];
        if !q.ready || q.size == 0 {
            return;
        }
        if self.behaviour == Behaviour::NeedsReset {
            self.status |= DeviceStatus::DEVICE_NEEDS_RESET.bits();
            return;
        }
        if self.behaviour == Behaviour::Hold {
            return;
        }
        if self.behaviour == Behaviour::IdxOnly {
            let avail_idx: u16 = rd(q.avail + 2);
            let n = avail_idx.wrapping_sub(q.last_avail);
            let q = &mut self.queues[0];
            q.last_avail = avail_idx;
            q.used_idx = q.used_idx.wrapping_add(n);
            wr(q.used + 2, q.used_idx);
            return;
        }
        let size = q.size as u16;
        let avail_idx: u16 = rd(q.avail + 2);
        let mut done = [(0u32, 0u32); 256];
        let mut n = 0;
        let mut last = q.last_avail;
        while last != avail_idx && n < done.len() {
            let head: u16 = rd(q.avail + 4 + 2 * u64::from(last % size));
            last = last.wrapping_add(1);
            let used = self.process_chain(q.desc, head, size);
            done[n] = (u32::from(head), used);
            n += 1;
        }
        self.queues[0].last_avail = last;
        let done = &mut done[..n];
        if self.behaviour == Behaviour::Reverse {
            done.reverse();
        }
        for &(id, len) in done.iter() {
            match self.behaviour {
                Behaviour::WrongId => self.push_used(id + 1, len),
                Behaviour::Duplicate => {
                    self.push_used(id, len);
                    self.push_used(id, len);
                }
                _ => self.push_used(id, len),
            }
        }
    }

    fn push_used(&mut self, id: u32, len: u32) {
        self.push_used_on(0, id, len);
    }

    fn push_used_on(&mut self, queue: usize, id: u32, len: u32) {
        let q = &mut self.queues[queue];
        let slot = u64::from(q.used_idx % q.size as u16);
        wr(q.used + 4 + 8 * slot, id);
        wr(q.used + 8 + 8 * slot, len);
        q.used_idx = q.used_idx.wrapping_add(1);
        wr(q.used + 2, q.used_idx);
    }

    /// Reads one descriptor chain, handles the request, writes the tail; returns the used
    /// length.
    fn process_chain(&mut self, desc: u64, head: u16, size: u16) -> u32 {
        let mut req = [0u8; 128];
        let mut req_len = 0;
        let mut writable = (0u64, 0u32);
        let mut i = head;
        for _ in 0..size {
            let d = desc + 16 * u64::from(i);
            let (addr, len, flags, next): (u64, u32, u16, u16) =
                (rd(d), rd(d + 8), rd(d + 12), rd(d + 14));
            if flags & 2 != 0 {
                if writable.1 == 0 {
                    writable = (addr, len);
                }
            } else {
                for k in 0..len as usize {
                    if req_len < req.len() {
                        req[req_len] = rd(addr + k as u64);
                        req_len += 1;
                    }
                }
            }
            if flags & 1 == 0 {
                break;
            }
            i = next;
        }
        self.requests += 1;
        let req = &req[..req_len];
        if req.first() == Some(&5) && req_len >= 72 {
            return self.probe(req, writable);
        }
        let status = self.handle(req);
        let used = match self.behaviour {
            Behaviour::UsedLen(n) => n,
            _ => 4,
        };
        if status.is_some() && used >= 4 && writable.1 >= 4 && self.behaviour != Behaviour::NoWrite
        {
            wr(writable.0, status.unwrap_or(Status::Ok) as u8);
        }
        match status {
            None => 0,
            Some(_) => used,
        }
    }

    /// PROBE (§5.13.6.7) into the writable part `(addr, len)`: one RESV_MEM MSI property,
    /// zeroes, the status at `probe_size`. Returns the used length.
    fn probe(&mut self, req: &[u8], writable: (u64, u32)) -> u32 {
        self.probes += 1;
        let probe_size = self.u32_at(32);
        let writable_needed = probe_size + 4;
        if writable.1 < writable_needed {
            return 0;
        }
        let endpoint = u32::from_le_bytes(req[4..8].try_into().unwrap());
        let status = if ENDPOINTS.contains(&endpoint) {
            Status::Ok
        } else {
            Status::NoEnt
        };
        let write_props = !matches!(self.behaviour, Behaviour::NoWrite | Behaviour::StatusOnly)
            && status == Status::Ok;
        if write_props {
            let mut prop = [0u8; 24];
            prop[0..2].copy_from_slice(&1u16.to_le_bytes()); // RESV_MEM
            prop[2..4].copy_from_slice(&20u16.to_le_bytes());
            prop[4] = 1; // MSI
            prop[8..16].copy_from_slice(&0x0800_0000u64.to_le_bytes());
            prop[16..24].copy_from_slice(&0x080f_ffffu64.to_le_bytes());
            for k in 0..probe_size as usize {
                wr(writable.0 + k as u64, prop.get(k).copied().unwrap_or(0));
            }
        }
        if self.behaviour != Behaviour::NoWrite {
            wr(writable.0 + u64::from(probe_size), status as u8);
        }
        match self.behaviour {
            Behaviour::UsedLen(n) => n,
            _ => writable_needed,
        }
    }

    /// Completes every available eventq buffer per `event_flood`.
    fn process_eventq(&mut self) {
        let Some(used) = self.event_flood else {
            return;
        };
        while let Some((id, _, _)) = self.next_event_buffer() {
            self.push_used_on(1, id, used);
            self.events_completed += 1;
        }
    }

    /// Takes the next available eventq buffer: `(head, address, length)`.
    fn next_event_buffer(&mut self) -> Option<(u32, u64, u32)> {
        let q = self.queues[1];
        if !q.ready || q.size == 0 {
            return None;
        }
        let avail_idx: u16 = rd(q.avail + 2);
        if q.last_avail == avail_idx {
            return None;
        }
        let head: u16 = rd(q.avail + 4 + 2 * u64::from(q.last_avail % q.size as u16));
        self.queues[1].last_avail = q.last_avail.wrapping_add(1);
        let d = q.desc + 16 * u64::from(head);
        Some((u32::from(head), rd(d), rd(d + 8)))
    }

    fn push_event(&mut self, report: &[u8], used: u32) -> Option<u32> {
        let (id, addr, len) = self.next_event_buffer()?;
        for (k, &b) in report.iter().take(len as usize).enumerate() {
            wr(addr + k as u64, b);
        }
        self.push_used_on(1, id, used);
        self.events_completed += 1;
        Some(id)
    }

    /// The request's status; `None` for an unknown type (used length 0).
    fn handle(&mut self, r: &[u8]) -> Option<Status> {
        let u32_ = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
        let u64_ = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
        let ty = *r.first()?;
        Some(match ty {
            1 if r.len() >= 20 => {
                let (domain, ep, flags) = (u32_(4), u32_(8), u32_(12));
                if !ENDPOINTS.contains(&ep) {
                    Status::NoEnt
                } else if flags & !1 != 0 {
                    Status::Inval
                } else {
                    self.attached.retain(|a| a.0 != ep);
                    self.attached.push((ep, domain));
                    if !self.domains.contains(&domain) {
                        self.domains.push(domain);
                    }
                    Status::Ok
                }
            }
            2 if r.len() >= 20 => {
                let (domain, ep) = (u32_(4), u32_(8));
                match self.attached.iter().position(|&a| a == (ep, domain)) {
                    Some(i) => {
                        self.attached.remove(i);
                        Status::Ok
                    }
                    None => Status::Inval,
                }
            }
            3 if r.len() >= 36 => {
                let m = Mapping {
                    domain: u32_(4),
                    start: u64_(8),
                    end: u64_(16),
                    phys: u64_(24),
                    flags: u32_(32),
                };
                if !self.domains.contains(&m.domain) {
                    Status::NoEnt
                } else if m.flags & !MapFlags::all().bits() != 0
                    || self
                        .mappings
                        .iter()
                        .any(|x| x.domain == m.domain && x.start <= m.end && m.start <= x.end)
                {
                    Status::Inval
                } else if self.mappings.len() == self.mappings.capacity() {
                    Status::NoMem
                } else {
                    self.mappings.push(m);
                    Status::Ok
                }
            }
            4 if r.len() >= 28 => {
                let (domain, start, end) = (u32_(4), u64_(8), u64_(16));
                if !self.domains.contains(&domain) {
                    Status::NoEnt
                } else if self.mappings.iter().any(|x| {
                    x.domain == domain
                        && x.start <= end
                        && start <= x.end
                        && (x.start < start || x.end > end)
                }) {
                    Status::Range
                } else {
                    self.mappings
                        .retain(|x| !(x.domain == domain && start <= x.start && x.end <= end));
                    Status::Ok
                }
            }
            1..=5 => Status::Inval,
            _ => return None,
        })
    }
}

impl FakeTransport {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeTransport {
    fn drop(&mut self) {
        if self.state().reset_on_drop {
            self.set_status(DeviceStatus::empty());
            while !self.get_status().is_empty() {
                std::hint::spin_loop();
            }
        }
    }
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::IOMMU
    }
    fn read_device_features(&mut self) -> u64 {
        self.state().offered
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.state().driver_features = driver_features;
    }
    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.state().max_queue_size
    }
    fn notify(&mut self, queue: u16) {
        let mut s = self.state();
        if queue == 0 {
            s.notifications += 1;
            s.process_requestq();
        } else if queue == 1 {
            s.process_eventq();
        }
    }
    fn get_status(&self) -> DeviceStatus {
        let mut s = self.state();
        let status = s.status;
        if status == 0 && s.resets_left == Some(0) && s.fails_after_last_reset {
            s.status = DeviceStatus::DEVICE_NEEDS_RESET.bits();
        }
        DeviceStatus::from_bits_retain(status)
    }
    fn set_status(&mut self, status: DeviceStatus) {
        let mut s = self.state();
        if status.is_empty() && s.reset_stuck {
            return;
        }
        if status.is_empty() {
            match &mut s.resets_left {
                Some(0) => return,
                Some(n) => *n -= 1,
                None => {}
            }
        }
        s.status = status.bits();
        if status.is_empty() {
            s.queues = [Queue::default(); 2];
        }
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
        if let Some(q) = self.state().queues.get_mut(usize::from(queue)) {
            *q = Queue {
                size,
                desc: descriptors,
                avail: driver_area,
                used: device_area,
                ready: true,
                last_avail: 0,
                used_idx: 0,
            };
        }
    }
    fn queue_unset(&mut self, queue: u16) {
        while self.state().queue_ready_stuck {
            std::hint::spin_loop();
        }
        if let Some(q) = self.state().queues.get_mut(usize::from(queue)) {
            *q = Queue::default();
        }
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.state()
            .queues
            .get(usize::from(queue))
            .is_some_and(|q| q.ready)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        let mut s = self.state();
        if s.generation_changes > 0 {
            s.generation = s.generation.wrapping_add(1);
            if s.generation_changes != u64::MAX {
                s.generation_changes -= 1;
            }
        }
        s.generation
    }
    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        let s = self.state();
        let bytes = s
            .config
            .get(offset..offset + size_of::<V>())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        V::read_from_bytes(bytes).map_err(|_| virtio_drivers::Error::IoError)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        let mut s = self.state();
        let bytes = value.as_bytes();
        let target = s
            .config
            .get_mut(offset..offset + bytes.len())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        target.copy_from_slice(bytes);
        Ok(())
    }
}

impl State {
    /// `page_size_mask`.
    pub fn page_size_mask(&self) -> u64 {
        self.u64_at(0)
    }
    /// `domain_range.end`.
    pub fn domain_end(&self) -> u32 {
        self.u32_at(28)
    }
}
