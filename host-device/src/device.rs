//! The transport-independent virtio-iommu device: feature negotiation, device status, the two
//! virtqueues (virtio-queue's [`Queue`]), the configuration space, request processing, the
//! fault event queue, and translation on behalf of endpoints.
//!
//! A transport (e.g. [`crate::mmio::MmioDevice`]) maps its registers onto the methods here.
//! Share the device between the transport and the DMA-issuing device models as a
//! [`SharedDevice`].

use std::collections::VecDeque;
use std::fmt;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_iommu_driver::wire::{self, Features, RequestType, EVENTQ, REQUESTQ};
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::IntoBytes;

use crate::checker::{self, Checker, CheckerReport, Saw};
use crate::config::DeviceConfig;
use crate::fault::reply::{corrupt_reply, peek_type};
use crate::fault::{FaultCounters, Misbehaviour};
use crate::request::{handle_request, validate_chain, Outcome};
use crate::state::{Access, FaultRecord, IommuState, Piece, TranslateError};
use crate::transport::{InterruptCause, InterruptHandler, VirtioCore};

/// `VIRTQ_AVAIL_F_NO_INTERRUPT` (virtio §2.7.6): the driver asks not to be interrupted.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Device status bits (virtio §2.1).
pub mod status {
    /// ACKNOWLEDGE (1).
    pub const ACKNOWLEDGE: u8 = 1;
    /// DRIVER (2).
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK (4): requests are processed only with it (and FEATURES_OK) set.
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK (8): kept only if the driver features are acceptable.
    pub const FEATURES_OK: u8 = 8;
    /// DEVICE_NEEDS_RESET (64): set by the device on an unrecoverable error.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// FAILED (128): set by the driver; the device then stops processing.
    pub const FAILED: u8 = 128;
}

/// Interrupt status bit: a used buffer was added (virtio-mmio `InterruptStatus` bit 0).
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed, or DEVICE_NEEDS_RESET was set (bit 1).
pub const INT_CONFIG: u32 = 2;

/// Number of virtqueues: requestq (0) and eventq (1) (§5.13.2).
pub const NUM_QUEUES: usize = 2;

/// Size in bytes of a fault report, `struct virtio_iommu_fault`.
pub const FAULT_SIZE: usize = 24;

/// The device shared between its transport and the endpoints that translate through it.
pub type SharedDevice<M> = Arc<Mutex<IommuDevice<M>>>;

/// Locks a [`SharedDevice`]; a poisoned lock (a panic elsewhere while holding it) is recovered,
/// as the device state is consistent between method calls.
pub fn lock<M: GuestMemoryBackend>(device: &SharedDevice<M>) -> MutexGuard<'_, IommuDevice<M>> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// Cumulative counters (never reset, not even by a device reset).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Counters {
    /// Requests answered with a status.
    pub requests_completed: u64,
    /// Requests answered with a status other than `S_OK`.
    pub requests_failed: u64,
    /// Requests returned unwritten because their type is unknown (D7) or PROBE is not
    /// offered (D35).
    pub requests_unknown_type: u64,
    /// Chains returned unwritten because of a framing error.
    pub requests_malformed: u64,
    /// Processing rounds that ended with chains still owed (available at the last
    /// notification and not yet processed) because of [`crate::Caps::max_requests_per_notify`]:
    /// each needs another round ([`IommuDevice::service`]).
    pub requests_deferred: u64,
    /// Misbehaviours applied by the fault plan ([`crate::fault`]), all kinds together.
    pub faults_injected: u64,
    /// Translation faults raised (delivered, pending or dropped).
    pub faults_raised: u64,
    /// Fault reports written into eventq buffers.
    pub faults_delivered: u64,
    /// Fault reports dropped because [`crate::Caps::max_pending_faults`] were already waiting.
    pub faults_dropped: u64,
    /// eventq buffers returned unused (used length 0) because they could not hold 24 bytes or
    /// had device-readable descriptors.
    pub event_buffers_skipped: u64,
    /// Accesses refused without a report (unknown endpoint, access wrapping past 2^64).
    pub accesses_refused_unreported: u64,
    /// Used-buffer notifications raised (interrupt status bit 0 set).
    pub interrupts: u64,
    /// Times DEVICE_NEEDS_RESET was set.
    pub needs_reset: u64,
    /// ATTACH requests answered with a status.
    pub attach_requests: u64,
    /// DETACH requests answered with a status.
    pub detach_requests: u64,
    /// MAP requests answered with a status.
    pub map_requests: u64,
    /// UNMAP requests answered with a status.
    pub unmap_requests: u64,
    /// PROBE requests answered with a status.
    pub probe_requests: u64,
}

/// Addresses and size of a virtqueue, as the driver configures them (virtio §4.2.2 QueueNum,
/// QueueDesc, QueueDriver, QueueDevice). Addresses are guest-physical.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct QueueSetup {
    /// Number of descriptors (a power of two, at most `QueueNumMax`).
    pub size: u16,
    /// Descriptor table address (16-byte aligned).
    pub desc_table: u64,
    /// Driver area / available ring address (2-byte aligned).
    pub avail_ring: u64,
    /// Device area / used ring address (4-byte aligned).
    pub used_ring: u64,
}

/// Why [`IommuDevice::activate_queue`] refused a queue configuration.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum QueueError {
    /// Queue index other than 0 (requestq) or 1 (eventq).
    NoSuchQueue(u16),
    /// Size 0, not a power of two, or above the maximum.
    InvalidSize(u16),
    /// A ring address breaks its alignment constraint.
    Misaligned,
    /// A ring is not entirely inside guest memory.
    NotInMemory,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchQueue(q) => write!(f, "no queue {q}"),
            Self::InvalidSize(s) => write!(f, "invalid queue size {s}"),
            Self::Misaligned => write!(f, "misaligned ring address"),
            Self::NotInMemory => write!(f, "ring outside guest memory"),
        }
    }
}

impl std::error::Error for QueueError {}

/// Error creating an [`IommuDevice`].
#[derive(Debug)]
pub struct DeviceError(virtio_queue::Error);

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot create the virtqueues: {}", self.0)
    }
}

impl std::error::Error for DeviceError {}

/// A virtio-iommu device over guest memory `M` (where its own virtqueues live; the IOMMU's own
/// accesses are not translated).
pub struct IommuDevice<M: GuestMemoryBackend> {
    config: Arc<DeviceConfig>,
    mem: M,
    state: IommuState,
    driver_features: u64,
    status: u8,
    queues: [Queue; NUM_QUEUES],
    pending: VecDeque<FaultRecord>,
    counters: Counters,
    interrupt_status: u32,
    config_generation: u32,
    irq: Option<Box<dyn FnMut(u32) + Send>>,
    /// The transport's interrupt callback ([`crate::transport::VirtioCore::set_interrupt_handler`]).
    cause_irq: Option<crate::transport::InterruptHandler>,
    /// requestq chains available at the last notification and not processed yet (at most the
    /// queue size): the work still owed for notifications already received.
    requestq_owed: u16,
    /// Opportunity counters of the config's fault plan (device-side misbehaviours).
    faults: FaultCounters,
    /// The driver checker ([`crate::checker`]); records only when the config turns it on.
    checker: Checker,
}

impl<M: GuestMemoryBackend> fmt::Debug for IommuDevice<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuDevice")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("state", &self.state)
            .field("pending_faults", &self.pending.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemoryBackend> IommuDevice<M> {
    /// A device in the reset state, with `bypass` at its boot value.
    ///
    /// # Errors
    ///
    /// [`DeviceError`] if virtio-queue refuses the queue size (cannot happen with a
    /// validated [`DeviceConfig`]).
    pub fn new(config: DeviceConfig, mem: M) -> Result<Self, DeviceError> {
        let size = config.queue_size();
        let queues = [
            Queue::new(size).map_err(DeviceError)?,
            Queue::new(size).map_err(DeviceError)?,
        ];
        let checker = Checker::new(config.driver_checker());
        let config = Arc::new(config);
        Ok(Self {
            checker,
            state: IommuState::new(config.clone()),
            config,
            mem,
            driver_features: 0,
            status: 0,
            queues,
            pending: VecDeque::new(),
            counters: Counters::default(),
            interrupt_status: 0,
            config_generation: 0,
            irq: None,
            cause_irq: None,
            requestq_owed: 0,
            faults: FaultCounters::default(),
        })
    }

    /// [`Self::new`] wrapped for sharing.
    ///
    /// # Errors
    ///
    /// As [`Self::new`].
    pub fn new_shared(config: DeviceConfig, mem: M) -> Result<SharedDevice<M>, DeviceError> {
        Ok(Arc::new(Mutex::new(Self::new(config, mem)?)))
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<DeviceConfig> {
        &self.config
    }

    /// The guest memory the device's queues live in.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The domains, mappings and attachments.
    pub fn state(&self) -> &IommuState {
        &self.state
    }

    /// Counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// What the driver checker found, and what the device saw (request counts by type,
    /// translation faults). With the checker off ([`crate::DeviceConfigBuilder::driver_checker`])
    /// the report has `enabled = false` and no violation, but the counts are there.
    pub fn checker_report(&self) -> CheckerReport {
        let c = &self.counters;
        self.checker.report(Saw {
            attach: c.attach_requests,
            detach: c.detach_requests,
            map: c.map_requests,
            unmap: c.unmap_requests,
            probe: c.probe_requests,
            faults: c.faults_raised,
        })
    }

    /// The features the driver negotiated: its features once FEATURES_OK was accepted, else
    /// none. Equal to [`Self::negotiated_features`] unless a fault plan changes what the device
    /// acts on ([`crate::Misbehaviour::FeaturesChangeAfterFeaturesOk`]); the driver checker
    /// holds the driver to these.
    fn driver_negotiated(&self) -> Features {
        if self.status & status::FEATURES_OK != 0 {
            Features::from_bits_retain(self.driver_features)
        } else {
            Features::empty()
        }
    }

    /// Counts a misbehaviour applied by a transport model (fault injection,
    /// [`Counters::faults_injected`]).
    pub fn note_fault_injected(&mut self) {
        self.counters.faults_injected += 1;
    }

    /// Number of fault reports waiting for an eventq buffer.
    pub fn pending_faults(&self) -> usize {
        self.pending.len()
    }

    /// Installs a callback run (with the interrupt status bits just raised) whenever the device
    /// raises an interrupt: used buffers added (bit 0) or configuration change /
    /// DEVICE_NEEDS_RESET (bit 1). It runs with the device locked: it must not lock it again.
    pub fn set_irq_handler(&mut self, handler: Option<Box<dyn FnMut(u32) + Send>>) {
        self.irq = handler;
    }

    /// The offered feature bits (`DeviceFeatures`).
    pub fn device_features(&self) -> u64 {
        self.config.offered().bits()
    }

    /// The feature bits written by the driver (`DriverFeatures`).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Writes 32 bits of the driver features: `select` 0 for bits 0-31, 1 for bits 32-63 (other
    /// values ignored). Ignored once FEATURES_OK is set (virtio §3.1.1: features are fixed
    /// then).
    pub fn write_driver_features(&mut self, select: u32, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        let v = u64::from(value);
        self.driver_features = match select {
            0 => (self.driver_features & !0xffff_ffff) | v,
            1 => (self.driver_features & 0xffff_ffff) | (v << 32),
            _ => self.driver_features,
        };
    }

    /// The negotiated features: the driver features once FEATURES_OK was accepted, else empty.
    pub fn negotiated_features(&self) -> Features {
        self.state.negotiated()
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether DEVICE_NEEDS_RESET is set.
    pub fn needs_reset(&self) -> bool {
        self.status & status::DEVICE_NEEDS_RESET != 0
    }

    /// Driver write of the device status (virtio §2.1, §3.1.1).
    ///
    /// - 0 resets the device ([`Self::reset`]).
    /// - Bits are only added (the driver must not clear bits; a cleared bit is ignored), and
    ///   the driver cannot set DEVICE_NEEDS_RESET.
    /// - FEATURES_OK is kept only if the driver features are a subset of the offered ones and
    ///   include VERSION_1; they are then the negotiated features.
    /// - Setting DRIVER_OK delivers any pending fault reports.
    pub fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = old | (value & !status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            checker::check_features_ok(
                &mut self.checker,
                self.config.offered(),
                self.driver_features,
            );
            let offered = self.config.offered().bits();
            let wanted = self.driver_features;
            let config = self.config.clone();
            let plan = config.fault_plan();
            let refused = self
                .faults
                .fire(plan, |m, _| matches!(m, Misbehaviour::FeaturesOkRefused))
                .is_some();
            if refused {
                self.counters.faults_injected += 1;
                new &= !status::FEATURES_OK;
            } else if wanted & !offered == 0 && wanted & Features::VERSION_1.bits() != 0 {
                // Fault injection: the device goes on as if only these had been negotiated.
                let kept = plan.features_after_ok().map_or(wanted, |o| wanted & o);
                self.state.set_negotiated(Features::from_bits_retain(kept));
            } else {
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            self.deliver_events();
        }
    }

    /// Device reset (status 0 written): every endpoint detached and every domain destroyed
    /// (§5.13.5), queues reset, negotiated features and pending faults forgotten, interrupt
    /// status cleared. `bypass` is not changed (D4); counters are kept.
    pub fn reset(&mut self) {
        self.state.reset();
        self.status = 0;
        self.driver_features = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.pending.clear();
        self.interrupt_status = 0;
        self.requestq_owed = 0;
        self.checker.reset();
    }

    /// System reset: [`Self::reset`], and `bypass` restored to its boot value (D4).
    pub fn system_reset(&mut self) {
        self.reset();
        let before = self.state.bypass();
        self.state.system_reset();
        if before != self.state.bypass() {
            self.config_generation = self.config_generation.wrapping_add(1);
        }
    }

    /// Sets DEVICE_NEEDS_RESET and raises a configuration-change interrupt (virtio §2.1.2).
    /// The device then processes nothing until reset.
    pub fn set_needs_reset(&mut self) {
        if !self.needs_reset() {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.counters.needs_reset += 1;
            self.raise(INT_CONFIG, InterruptCause::Config);
        }
    }

    fn raise(&mut self, bits: u32, cause: InterruptCause) {
        self.interrupt_status |= bits;
        if let Some(irq) = self.irq.as_mut() {
            irq(bits);
        }
        if let Some(irq) = self.cause_irq.as_mut() {
            irq(cause);
        }
    }

    /// Installs a callback run with the cause of every interrupt the device raises (virtqueue
    /// index for used buffers, [`InterruptCause::Config`] for configuration change /
    /// DEVICE_NEEDS_RESET), alongside [`Self::set_irq_handler`]. It runs with the device
    /// locked: it must not lock it again.
    pub fn set_interrupt_handler(&mut self, handler: Option<crate::transport::InterruptHandler>) {
        self.cause_irq = handler;
    }

    /// Replaces the guest memory the queues live in; queue configurations are kept and
    /// re-checked against the new memory at their next use.
    pub fn set_memory(&mut self, mem: M) {
        self.mem = mem;
    }

    /// Interrupt status bits ([`INT_VRING`], [`INT_CONFIG`]).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Clears the given interrupt status bits (`InterruptACK`).
    pub fn ack_interrupt(&mut self, bits: u32) {
        self.interrupt_status &= !bits;
    }

    /// The configuration generation counter (`ConfigGeneration`), changed whenever `bypass`
    /// changes.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn can_process(&self) -> bool {
        let s = self.status;
        s & status::DRIVER_OK != 0
            && s & status::FEATURES_OK != 0
            && s & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
    }

    /// The queue `index` (0 requestq, 1 eventq).
    pub fn queue(&self, index: u16) -> Option<&Queue> {
        self.queues.get(usize::from(index))
    }

    /// Configures queue `index` from `setup` and marks it ready (`QueueReady = 1`). The rings
    /// must be aligned and inside guest memory.
    ///
    /// # Errors
    ///
    /// [`QueueError`]; the queue is then left not ready.
    pub fn activate_queue(&mut self, index: u16, setup: QueueSetup) -> Result<(), QueueError> {
        let max = self.config.queue_size();
        let q = self
            .queues
            .get_mut(usize::from(index))
            .ok_or(QueueError::NoSuchQueue(index))?;
        q.reset();
        if index == EVENTQ {
            self.checker.eq_checked = 0;
        }
        if setup.size == 0 || setup.size > max {
            return Err(QueueError::InvalidSize(setup.size));
        }
        q.try_set_size(setup.size)
            .map_err(|_| QueueError::InvalidSize(setup.size))?;
        q.try_set_desc_table_address(GuestAddress(setup.desc_table))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(setup.avail_ring)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(setup.used_ring)))
            .map_err(|_| QueueError::Misaligned)?;
        q.set_event_idx(false);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            q.reset();
            return Err(QueueError::NotInMemory);
        }
        Ok(())
    }

    /// Resets queue `index` to not ready (`QueueReady = 0`).
    pub fn deactivate_queue(&mut self, index: u16) {
        if let Some(q) = self.queues.get_mut(usize::from(index)) {
            q.reset();
        }
        if index == REQUESTQ {
            self.requestq_owed = 0;
        }
        if index == EVENTQ {
            self.checker.eq_checked = 0;
        }
    }

    /// A driver notification of queue `index`: requestq ⇒ every chain now available is owed
    /// and the first round runs ([`Self::process_requestq`]); eventq ⇒
    /// [`Self::deliver_events`]; other indexes are ignored.
    ///
    /// Contract (virtio §2.7, split virtqueues: the device eventually uses every available
    /// buffer): the chains available at a notification are all processed, in rounds of at most
    /// [`crate::Caps::max_requests_per_notify`]. This call runs the first round; while
    /// [`Self::requestq_pending`] is true the transport owes the driver more rounds and runs
    /// them with [`Self::service`], one per call, before it considers the notification handled
    /// — without waiting for another notification, which a polling driver never sends. The
    /// in-process [`crate::MmioDevice`] runs them all before the `QueueNotify` write returns,
    /// unlocking the device between rounds so that endpoints translating on other threads
    /// are not starved; a server where one notification is one message should run one round
    /// between messages and all owed rounds before it waits for the next message. Chains the
    /// driver adds later come with their own notification (the device never suppresses
    /// notifications), so the work per notification is bounded by the queue size.
    pub fn notify(&mut self, index: u16) {
        if self.checker.enabled()
            && usize::from(index) < NUM_QUEUES
            && self.status & status::DRIVER_OK == 0
        {
            let st = self.status;
            self.checker
                .record(checker::Statement::NotifyBeforeDriverOk, &[], || {
                    format!("queue {index} notified with device status {st:#04x}")
                });
        }
        match index {
            REQUESTQ => {
                self.owe_available();
                self.process_requestq();
            }
            EVENTQ => self.deliver_events(),
            _ => {}
        }
    }

    /// Records the chains now in the requestq available ring as owed (see [`Self::notify`]).
    fn owe_available(&mut self) {
        let idx = usize::from(REQUESTQ);
        if !self.can_process() || !self.queues[idx].ready() {
            return;
        }
        let q = &self.queues[idx];
        if let Ok(avail) = q.avail_idx(&self.mem, Ordering::Acquire) {
            let n = (avail - Wrapping(q.next_avail())).0;
            // More than the queue holds is a broken queue: `process_requestq` handles it.
            if n <= q.size() {
                self.requestq_owed = self.requestq_owed.max(n);
            }
        }
    }

    /// Whether chains available at an earlier requestq notification are still unprocessed
    /// (only while the device and the queue are running): the transport then owes the driver
    /// [`Self::service`] calls until this is false (see [`Self::notify`]). Becomes false after
    /// at most `queue_size / max_requests_per_notify` (rounded up) rounds.
    pub fn requestq_pending(&self) -> bool {
        self.requestq_owed > 0 && self.can_process() && self.queues[usize::from(REQUESTQ)].ready()
    }

    /// Runs one owed processing round if [`Self::requestq_pending`] (else does nothing);
    /// returns the number of chains processed.
    pub fn service(&mut self) -> usize {
        if self.requestq_pending() {
            self.process_requestq()
        } else {
            0
        }
    }

    /// Checks the available index of queue `index` against the queue size; a driver that
    /// claims more chains than the queue holds breaks the queue (virtio §2.7.6).
    fn avail_sane(&mut self, index: usize) -> bool {
        let Some(q) = self.queues.get(index) else {
            return false;
        };
        match q.avail_idx(&self.mem, Ordering::Acquire) {
            Ok(idx) => (idx - Wrapping(q.next_avail())).0 <= q.size(),
            Err(_) => false,
        }
    }

    fn has_avail(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| {
            q.avail_idx(&self.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != q.next_avail())
        })
    }

    /// One processing round: up to [`crate::Caps::max_requests_per_notify`] requestq chains,
    /// each answered and returned in the used ring (see [`crate::request`]). Does nothing
    /// unless DRIVER_OK and FEATURES_OK are set, DEVICE_NEEDS_RESET and FAILED are not, and the
    /// queue is ready. Returns the number of chains taken from the available ring. Chains left
    /// over and owed to an earlier notification make [`Self::requestq_pending`] true (see
    /// [`Self::notify`] for who runs the next round).
    ///
    /// An available ring claiming more chains than the queue size, or a used ring write that
    /// fails, sets DEVICE_NEEDS_RESET. The config's fault plan ([`crate::fault`]) may change
    /// what happens to each chain.
    pub fn process_requestq(&mut self) -> usize {
        let idx = usize::from(REQUESTQ);
        if !self.can_process() || !self.queues[idx].ready() {
            self.requestq_owed = 0;
            return 0;
        }
        if !self.avail_sane(idx) {
            self.requestq_owed = 0;
            self.set_needs_reset();
            return 0;
        }
        let config = self.config.clone();
        let plan = config.fault_plan();
        let max = config.caps().max_requests_per_notify;
        let mut done = 0;
        let mut reordered: Vec<(u16, u32)> = Vec::new();
        let driver_negotiated = self.driver_negotiated();
        while done < max {
            let Self {
                queues, mem, state, ..
            } = self;
            let Some(chain) = queues[idx].pop_descriptor_chain(&*mem) else {
                // Nothing left: whatever was owed has been taken (or the driver rewound its
                // available index, which owes nothing).
                self.requestq_owed = 0;
                break;
            };
            done += 1;
            self.requestq_owed = self.requestq_owed.saturating_sub(1);
            let head = chain.head_index();
            let size = queues[idx].size();
            checker::check_request(
                &mut self.checker,
                state,
                driver_negotiated,
                &*mem,
                &chain,
                usize::from(size),
            );
            let fault = if plan.is_empty() {
                None
            } else {
                let t = peek_type(&*mem, &chain);
                self.faults.fire_request(plan, t).cloned()
            };
            if fault.is_some() {
                self.counters.faults_injected += 1;
            }
            let used_len = match &fault {
                Some(Misbehaviour::NeverComplete) => continue,
                Some(Misbehaviour::NeedsReset) => {
                    self.set_needs_reset();
                    break;
                }
                Some(Misbehaviour::ResetSelf) => {
                    self.reset();
                    return done;
                }
                Some(Misbehaviour::TailNotWritten) => Writer::new(&*mem, chain)
                    .ok()
                    .and_then(|w| u32::try_from(w.available_bytes()).ok())
                    .unwrap_or(0),
                _ => {
                    let handled = handle_request(state, &*mem, chain.clone(), usize::from(size));
                    log::debug!(
                        "requestq: chain {head}: {:?}, used length {}",
                        handled.outcome,
                        handled.used_len
                    );
                    match handled.outcome {
                        Outcome::Completed { status, request } => {
                            self.counters.requests_completed += 1;
                            let c = &mut self.counters;
                            *match request {
                                RequestType::Attach => &mut c.attach_requests,
                                RequestType::Detach => &mut c.detach_requests,
                                RequestType::Map => &mut c.map_requests,
                                RequestType::Unmap => &mut c.unmap_requests,
                                RequestType::Probe => &mut c.probe_requests,
                            } += 1;
                            if status != wire::Status::Ok {
                                self.counters.requests_failed += 1;
                            }
                        }
                        Outcome::UnknownType(_) | Outcome::ProbeNotOffered => {
                            self.counters.requests_unknown_type += 1;
                        }
                        Outcome::Malformed(_) => self.counters.requests_malformed += 1,
                    }
                    match &fault {
                        Some(m) => corrupt_reply(&*mem, chain, m, &config, handled.used_len),
                        None => handled.used_len,
                    }
                }
            };
            let added = match fault {
                Some(Misbehaviour::UsedIdOutOfRange) => self.add_used_raw(
                    idx,
                    u32::from(head) + u32::from(self.queues[idx].size()),
                    used_len,
                ),
                Some(Misbehaviour::UsedTwice) => self.queues[idx]
                    .add_used(&self.mem, head, used_len)
                    .and_then(|()| self.queues[idx].add_used(&self.mem, head, used_len))
                    .is_ok(),
                Some(Misbehaviour::Reorder) => {
                    reordered.push((head, used_len));
                    true
                }
                _ => self.queues[idx].add_used(&self.mem, head, used_len).is_ok(),
            };
            if !added {
                self.set_needs_reset();
                break;
            }
        }
        if !self.needs_reset() {
            for (head, len) in reordered.into_iter().rev() {
                if self.queues[idx].add_used(&self.mem, head, len).is_err() {
                    self.set_needs_reset();
                    break;
                }
            }
        }
        if self.requestq_pending() {
            self.counters.requests_deferred += 1;
        }
        if done > 0 {
            self.signal_used(idx);
        }
        done
    }

    /// Adds a used element with any `id` (fault injection: virtio-queue refuses ids outside
    /// the table). Returns whether the used ring could be written.
    fn add_used_raw(&mut self, idx: usize, id: u32, len: u32) -> bool {
        let q = &mut self.queues[idx];
        let next = q.next_used();
        let ring = q.used_ring();
        let slot = u64::from(next % q.size().max(1));
        let elem = ring.checked_add(4 + 8 * slot).map(GuestAddress);
        let idx_addr = ring.checked_add(2).map(GuestAddress);
        let (Some(elem), Some(idx_addr)) = (elem, idx_addr) else {
            return false;
        };
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&id.to_le_bytes());
        bytes[4..].copy_from_slice(&len.to_le_bytes());
        let next = next.wrapping_add(1);
        if self.mem.write_slice(&bytes, elem).is_err() {
            return false;
        }
        std::sync::atomic::fence(Ordering::Release);
        if self.mem.write_obj(next.to_le(), idx_addr).is_err() {
            return false;
        }
        q.set_next_used(next);
        true
    }

    /// Raises the queue's interrupt after used buffers were added, unless the driver set
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT` in the available ring's flags (§2.7.7: the device SHOULD
    /// NOT send a notification then; event index is never offered, and virtio-queue's
    /// `needs_notification` ignores the flag without it). Flags that cannot be read count as 0.
    fn signal_used(&mut self, idx: usize) {
        let notify = self.queues.get(idx).is_some_and(|q| {
            let flags: u16 = self
                .mem
                .load(GuestAddress(q.avail_ring()), Ordering::Acquire)
                .map(u16::from_le)
                .unwrap_or(0);
            flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        });
        if notify {
            self.counters.interrupts += 1;
            let index = u16::try_from(idx).unwrap_or(u16::MAX);
            self.raise(INT_VRING, InterruptCause::Queue(index));
        }
    }

    /// Reports a fault on the event queue: delivered at once if an eventq buffer is available,
    /// else kept (at most [`crate::Caps::max_pending_faults`], then dropped and counted) until
    /// buffers arrive. For embedders whose own translation faults; [`Self::translate`] calls
    /// it for its own faults.
    pub fn report_fault(&mut self, fault: FaultRecord) {
        if self.pending.len() >= self.config.caps().max_pending_faults {
            self.counters.faults_dropped += 1;
            return;
        }
        self.pending.push_back(fault);
        self.deliver_events();
    }

    /// Writes pending fault reports into available eventq buffers, one 24-byte report per
    /// buffer, used length 24 (§5.13.6.9). A buffer shorter than 24 bytes, with a
    /// device-readable descriptor, or malformed (see [`crate::request::validate_chain`]), is
    /// returned with used length 0 and the next one is tried:
    /// reports are never split over buffers (D50). Does nothing unless the device is running
    /// (as for [`Self::process_requestq`]) and the eventq is ready.
    pub fn deliver_events(&mut self) {
        let idx = usize::from(EVENTQ);
        if !self.can_process() || !self.queues[idx].ready() {
            return;
        }
        self.check_event_buffers();
        let config = self.config.clone();
        let plan = config.fault_plan();
        if !plan.is_empty() && self.has_avail(idx) {
            let flood = self
                .faults
                .fire(plan, |m, _| matches!(m, Misbehaviour::EventFlood { .. }));
            if let Some(&Misbehaviour::EventFlood { used_len }) = flood {
                self.counters.faults_injected += 1;
                self.flood_events(used_len);
                return;
            }
        }
        if self.pending.is_empty() {
            return;
        }
        if !self.avail_sane(idx) {
            self.set_needs_reset();
            return;
        }
        let mut added = false;
        while let Some(fault) = self.pending.front().copied() {
            let Self { queues, mem, .. } = self;
            let Some(chain) = queues[idx].pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let max = usize::from(queues[idx].size());
            let well_formed = validate_chain(&chain, max).is_ok_and(|l| l.readable == 0);
            let mut used = match Writer::new(&*mem, chain) {
                Ok(mut w) if well_formed && w.available_bytes() >= FAULT_SIZE => {
                    match std::io::Write::write_all(&mut w, fault.to_wire().as_bytes()) {
                        Ok(()) => FAULT_SIZE as u32,
                        Err(_) => 0,
                    }
                }
                _ => 0,
            };
            if used != 0 && !plan.is_empty() {
                let lie = self
                    .faults
                    .fire(plan, |m, _| matches!(m, Misbehaviour::EventUsedLen(_)));
                if let Some(&Misbehaviour::EventUsedLen(n)) = lie {
                    self.counters.faults_injected += 1;
                    // The report is consumed: the driver was told (wrongly) about it.
                    self.pending.pop_front();
                    self.counters.faults_delivered += 1;
                    used = n;
                    added = true;
                    if self.queues[idx].add_used(&self.mem, head, used).is_err() {
                        self.set_needs_reset();
                        break;
                    }
                    continue;
                }
            }
            if used == 0 {
                self.counters.event_buffers_skipped += 1;
            } else {
                self.pending.pop_front();
                self.counters.faults_delivered += 1;
            }
            added = true;
            if self.queues[idx].add_used(&self.mem, head, used).is_err() {
                self.set_needs_reset();
                break;
            }
        }
        if added {
            self.signal_used(idx);
        }
    }

    /// Driver checker (I4): looks at every eventq buffer made available since the last look,
    /// without consuming it (the queue's position is put back), at most one queue size.
    fn check_event_buffers(&mut self) {
        if !self.checker.enabled() {
            return;
        }
        let idx = usize::from(EVENTQ);
        let Self {
            queues,
            mem,
            checker,
            ..
        } = self;
        let q = &mut queues[idx];
        let Ok(avail) = q.avail_idx(&*mem, Ordering::Acquire) else {
            return;
        };
        let next = q.next_avail();
        let size = q.size();
        // Start where the last look ended, unless the device already took buffers past it (or
        // the position is stale): then at the device's own position.
        let ahead = (Wrapping(checker.eq_checked) - Wrapping(next)).0;
        let behind = (avail - Wrapping(checker.eq_checked)).0;
        let mut from = if ahead <= size && behind <= size {
            checker.eq_checked
        } else {
            next
        };
        if (avail - Wrapping(from)).0 > size {
            // A broken available index: `avail_sane` deals with it.
            return;
        }
        q.set_next_avail(from);
        while from != avail.0 {
            let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                break;
            };
            checker::check_event_buffer(checker, &*mem, &chain, usize::from(size));
            from = from.wrapping_add(1);
        }
        checker.eq_checked = from;
        q.set_next_avail(next);
    }

    /// Fault injection ([`Misbehaviour::EventFlood`]): fills every available eventq buffer (at
    /// most one queue size per call) with a synthetic report, returned with `used_len`.
    fn flood_events(&mut self, used_len: u32) {
        let idx = usize::from(EVENTQ);
        if !self.avail_sane(idx) {
            self.set_needs_reset();
            return;
        }
        let record = FaultRecord {
            reason: wire::FAULT_R_UNKNOWN,
            flags: 0,
            endpoint: self.config.endpoints().next().unwrap_or(0),
            address: 0,
        };
        let mut added = false;
        for _ in 0..self.queues[idx].size() {
            let Self { queues, mem, .. } = self;
            let Some(chain) = queues[idx].pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            if let Ok(mut w) = Writer::new(&*mem, chain) {
                if w.available_bytes() >= FAULT_SIZE {
                    let _ = std::io::Write::write_all(&mut w, record.to_wire().as_bytes());
                }
            }
            added = true;
            if self.queues[idx]
                .add_used(&self.mem, head, used_len)
                .is_err()
            {
                self.set_needs_reset();
                break;
            }
        }
        if added {
            self.signal_used(idx);
        }
    }

    /// Translates an access by `endpoint` (see [`IommuState::translate`]); a translation fault
    /// is reported on the event queue ([`Self::report_fault`]) and returned.
    ///
    /// # Errors
    ///
    /// [`TranslateError`].
    pub fn translate(
        &mut self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<Piece>, TranslateError> {
        let r = self.state.translate(endpoint, iova, len, access);
        match &r {
            Err(TranslateError::Fault(f)) => {
                self.counters.faults_raised += 1;
                self.report_fault(*f);
            }
            Err(_) => self.counters.accesses_refused_unreported += 1,
            Ok(_) => {}
        }
        r
    }

    /// The 40-byte `struct virtio_iommu_config` as currently presented (§5.13.4). Fields of
    /// features that are not offered read as their value anyway (a driver ignores them).
    pub fn config_space(&self) -> wire::Config {
        let c = &self.config;
        wire::Config {
            page_size_mask: c.page_size_mask().into(),
            input_range: wire::Range64 {
                start: c.input_range().0.into(),
                end: c.input_range().1.into(),
            },
            domain_range: wire::Range32 {
                start: c.domain_range().0.into(),
                end: c.domain_range().1.into(),
            },
            probe_size: c.probe_size().into(),
            bypass: u8::from(self.state.bypass()),
            reserved: [0; 3],
        }
    }

    /// Reads `data.len()` bytes of the configuration space at byte `offset`. Bytes beyond the
    /// 40-byte structure read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
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

    /// Writes the configuration space at byte `offset` (§5.13.4). Only a one-byte write of 0 or
    /// 1 to `bypass`, with BYPASS_CONFIG negotiated, is valid (R2, R3); it changes `bypass`
    /// (and the generation counter if the value changed). Any other write inside the 40-byte
    /// structure (another field, a wider access, a value above 1, BYPASS_CONFIG not
    /// negotiated) sets DEVICE_NEEDS_RESET and changes nothing. Writes wholly beyond the
    /// structure are ignored.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        let negotiated = self.driver_negotiated();
        checker::check_config_write(&mut self.checker, negotiated, offset, data);
        let size = std::mem::size_of::<wire::Config>() as u64;
        if offset >= size || data.is_empty() {
            return;
        }
        let valid = offset == wire::config_offset::BYPASS as u64
            && data.len() == 1
            && data[0] <= 1
            && self.state.negotiated().contains(Features::BYPASS_CONFIG);
        if !valid {
            self.set_needs_reset();
            return;
        }
        let bypass = data[0] == 1;
        if bypass != self.state.bypass() {
            self.state.set_bypass(bypass);
            self.config_generation = self.config_generation.wrapping_add(1);
        }
    }
}

/// The virtio-iommu (device ID 23, virtio v1.3 §5.13) behind any transport. PCI class
/// 0x00ff00 (base class 0x00, subclass 0xff, prog-if 0): QEMU's virtio-iommu-pci sets the 16-bit
/// `class_id = PCI_CLASS_OTHERS` (0x00ff); QEMU 11.1 reports config dword 8 = 0x00ff0001.
impl<M: GuestMemoryBackend + Send> VirtioCore for IommuDevice<M> {
    type Memory = M;
    fn device_id(&self) -> u32 {
        23
    }
    fn pci_class(&self) -> u32 {
        0x00_ff_00
    }
    fn set_memory(&mut self, mem: M) {
        IommuDevice::set_memory(self, mem);
    }
    fn num_queues(&self) -> u16 {
        NUM_QUEUES as u16
    }
    fn queue_max_size(&self, index: u16) -> u16 {
        if usize::from(index) < NUM_QUEUES {
            self.config.queue_size()
        } else {
            0
        }
    }
    fn device_features(&self) -> u64 {
        IommuDevice::device_features(self)
    }
    fn driver_features(&self) -> u64 {
        IommuDevice::driver_features(self)
    }
    fn write_driver_features(&mut self, select: u32, value: u32) {
        IommuDevice::write_driver_features(self, select, value);
    }
    fn status(&self) -> u8 {
        IommuDevice::status(self)
    }
    fn write_status(&mut self, value: u8) {
        IommuDevice::write_status(self, value);
    }
    fn interrupt_status(&self) -> u32 {
        IommuDevice::interrupt_status(self)
    }
    fn ack_interrupt(&mut self, bits: u32) {
        IommuDevice::ack_interrupt(self, bits);
    }
    fn config_generation(&self) -> u32 {
        IommuDevice::config_generation(self)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        IommuDevice::read_config(self, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        IommuDevice::write_config(self, offset, data);
    }
    fn activate_queue(&mut self, index: u16, setup: QueueSetup) -> Result<(), QueueError> {
        IommuDevice::activate_queue(self, index, setup)
    }
    fn deactivate_queue(&mut self, index: u16) {
        IommuDevice::deactivate_queue(self, index);
    }
    fn notify(&mut self, index: u16) {
        IommuDevice::notify(self, index);
    }
    fn pending(&self) -> bool {
        self.requestq_pending()
    }
    fn service(&mut self) -> usize {
        IommuDevice::service(self)
    }
    fn set_interrupt_handler(&mut self, handler: Option<InterruptHandler>) {
        IommuDevice::set_interrupt_handler(self, handler);
    }
}
