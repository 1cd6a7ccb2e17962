//! Non-blocking requests and interrupt handling of [`VirtIOIommu`] (virtio v1.3 §2.7.7
//! used-buffer notifications, §4.1.4.5 ISR status, §5.13.6 requests).
//!
//! A non-blocking request is written into one of [`NB_SLOTS`] slots of a DMA area the driver
//! allocated once in [`VirtIOIommu::new`], posted on `requestq` and notified; the call returns
//! an [`NbToken`] at once. Completions are collected by [`VirtIOIommu::process_completions`]
//! (also run by [`VirtIOIommu::poll_nb`], [`VirtIOIommu::wait_nb`] and
//! [`VirtIOIommu::handle_interrupt`]), which matches each used buffer to its slot by the
//! descriptor id, in any order. The slot's buffers belong to the driver until the device
//! returned them: dropping a token dangles nothing (the slot stays taken until
//! [`VirtIOIommu::discard_nb`] or [`VirtIOIommu::reclaim_nb`]), and every token carries a
//! generation, so a stale token is [`IommuError::UnknownToken`], never another request's
//! result.
//!
//! PROBE has a reply of `probe_size` bytes, too large for a slot: one non-blocking PROBE at a
//! time goes out of the driver's request buffer ([`VirtIOIommu::submit_probe_nb`]), and its
//! properties are delivered when it is collected ([`VirtIOIommu::poll_probe_nb`],
//! [`VirtIOIommu::wait_probe_nb`]).
//!
//! Synchronous requests and [`crate::Batch`]es use the same `requestq`: they are refused with
//! [`IommuError::Busy`] while a non-blocking request is in flight — and, since synchronous
//! requests use the request buffer too, while a non-blocking PROBE's reply waits there to be
//! collected. Every non-blocking request takes 2 descriptors until the device returns it: a
//! submission that would not fit in `requestq` is [`IommuError::Busy`] (on a 64-descriptor
//! queue, the PROBE and all [`NB_SLOTS`] slots cannot be in flight at once).

use super::{
    batch_slot_parts, bounded_poll, status_of, VirtIOIommu, BATCH_SLOT, BATCH_TAIL_AT, PROBE_HEAD,
    REQUESTQ_SIZE, TAIL,
};
use crate::error::IommuError;
use crate::parse::{FaultEvent, ProbeProperty};
use crate::wire::{Features, ReqAttach, ReqDetach, ReqHead, ReqProbe, RequestType, REQUESTQ};
use crate::BatchOp;
use virtio_drivers::transport::{InterruptStatus, Transport};
use virtio_drivers::Hal;
use zerocopy::IntoBytes;

/// Most non-blocking requests other than PROBE in flight (or completed and not yet collected)
/// at once: half the smallest `requestq` ([`crate::REQUESTQ_MIN_SIZE`] descriptors, 2 per
/// request); the one non-blocking PROBE comes beside them when `requestq` has room for it.
/// Their slots are `NB_SLOTS * 64` bytes (2 KiB) of DMA memory allocated by
/// [`VirtIOIommu::new`].
pub const NB_SLOTS: usize = 32;

/// The slot of the one non-blocking PROBE (its buffers are the driver's request buffer), after
/// the [`NB_SLOTS`] request slots.
const PROBE_SLOT: usize = NB_SLOTS;

/// A request for [`VirtIOIommu::submit_nb`]: ATTACH, DETACH, MAP or UNMAP, validated as their
/// synchronous forms ([`VirtIOIommu::attach`], [`VirtIOIommu::detach`], [`VirtIOIommu::map`],
/// [`VirtIOIommu::unmap`]) validate them. IOVA ends are inclusive.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum NbRequest {
    /// ATTACH (§5.13.6.3) of `endpoint` to `domain`.
    Attach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
    },
    /// DETACH (§5.13.6.4) of `endpoint` from `domain`.
    Detach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
    },
    /// MAP (§5.13.6.5) or UNMAP (§5.13.6.6).
    Op(BatchOp),
}

impl From<BatchOp> for NbRequest {
    fn from(op: BatchOp) -> Self {
        Self::Op(op)
    }
}

/// Names one non-blocking request of one driver (slot and generation). Collect its outcome
/// with [`VirtIOIommu::poll_nb`] or [`VirtIOIommu::wait_nb`] (a PROBE's with
/// [`VirtIOIommu::poll_probe_nb`] or [`VirtIOIommu::wait_probe_nb`]), or give it up with
/// [`VirtIOIommu::discard_nb`]; once collected or discarded it is
/// [`IommuError::UnknownToken`]. Dropping it without either keeps its slot taken until
/// [`VirtIOIommu::reclaim_nb`] frees it — and a PROBE's token more: until then its reply
/// holds the request buffer, so every synchronous request (the DMA glue's MAP and UNMAP
/// included) is [`IommuError::Busy`].
#[must_use = "a dropped token keeps its slot until discard_nb or reclaim_nb"]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct NbToken {
    slot: u8,
    generation: u32,
}

/// What [`VirtIOIommu::handle_interrupt`] found.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct InterruptReport {
    /// The interrupt status the transport read and acknowledged (virtio-pci ISR, §4.1.4.5;
    /// virtio-mmio InterruptStatus, §4.2.2) had `QUEUE_INTERRUPT`: a used buffer on some
    /// queue. Neither this nor [`Self::config_changed`] for an interrupt that was not this
    /// device's (a shared INTx line); completions are collected anyway.
    pub queue_interrupt: bool,
    /// The status had `DEVICE_CONFIGURATION_INTERRUPT`: the configuration changed.
    pub config_changed: bool,
    /// Non-blocking requests whose completion was collected.
    pub completed: u32,
    /// Fault reports taken from `eventq` and handed to the callback.
    pub faults: u32,
}

#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
enum State {
    #[default]
    Free,
    /// Posted; the device owns the slot's buffers.
    InFlight,
    /// Posted and discarded: freed when the device returns it.
    Abandoned,
    /// Returned by the device; `used` and `status` hold its answer.
    Done,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    state: State,
    generation: u32,
    /// Bytes of the device-readable part.
    readable: u8,
    used: u32,
    status: u8,
}

/// The driver-side table of the non-blocking slots (never seen by the device): the
/// [`NB_SLOTS`] request slots and the PROBE slot ([`PROBE_SLOT`]).
pub(super) struct NbTable {
    slots: [Slot; NB_SLOTS + 1],
    /// `slot_of_desc[desc]` = slot + 1 of the request posted with head descriptor `desc`.
    slot_of_desc: [u8; REQUESTQ_SIZE],
    /// Slots `InFlight` or `Abandoned`.
    in_flight: u16,
}

impl NbTable {
    pub(super) const fn new() -> Self {
        Self {
            slots: [Slot {
                state: State::Free,
                generation: 0,
                readable: 0,
                used: 0,
                status: 0,
            }; NB_SLOTS + 1],
            slot_of_desc: [0; REQUESTQ_SIZE],
            in_flight: 0,
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        usize::from(self.in_flight)
    }

    /// A non-blocking PROBE completed and not collected: its reply is in the request buffer.
    pub(super) fn probe_reply_waiting(&self) -> bool {
        self.slots[PROBE_SLOT].state == State::Done
    }

    /// Whether `n` more requests fit in a `requestq` of `size` descriptors beside those in
    /// flight (2 descriptors each).
    fn room_for(&self, n: usize, size: usize) -> bool {
        2 * (self.in_flight() + n) <= size
    }

    /// Free request slots (the PROBE slot not counted).
    fn free_slots(&self) -> usize {
        self.slots[..NB_SLOTS]
            .iter()
            .filter(|s| s.state == State::Free)
            .count()
    }

    /// The slot `token` names, if it is still this token's.
    fn slot_of(&self, token: &NbToken) -> Option<usize> {
        let i = usize::from(token.slot);
        let s = self.slots.get(i)?;
        let live = matches!(s.state, State::InFlight | State::Done);
        (live && s.generation == token.generation).then_some(i)
    }

    /// Frees slot `i`: its generation moves on, so every token of it becomes unknown.
    fn free(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.state = State::Free;
        s.generation = s.generation.wrapping_add(1);
    }
}

impl<H: Hal, T: Transport> VirtIOIommu<H, T> {
    /// Sends `request` without waiting: writes it into a free slot, posts it on `requestq` and
    /// notifies the device (unless it suppressed notifications). Returns its token; the
    /// outcome comes from [`Self::poll_nb`] or [`Self::wait_nb`]. Allocation-free; not for an
    /// interrupt handler (it may notify, which is a register write, but see the rules in
    /// [`crate::irq`]).
    ///
    /// # Errors
    ///
    /// Nothing is sent on error. The validation errors of the synchronous form;
    /// [`IommuError::Busy`] when all [`NB_SLOTS`] slots are taken or `requestq` has no room
    /// for 2 more descriptors beside the requests in flight; [`IommuError::Broken`];
    /// [`IommuError::DeviceProtocol`] when, with nothing in flight, the used ring holds an
    /// element (fatal, as for synchronous requests); [`IommuError::Transport`] from the queue.
    pub fn submit_nb(&mut self, request: NbRequest) -> Result<NbToken, IommuError> {
        let mut token = None;
        self.submit_nb_many(&[request], core::slice::from_mut(&mut token))?;
        token.ok_or(IommuError::Busy)
    }

    /// Sends every request of `requests` without waiting, with one notification for all:
    /// `tokens[i]` receives request `i`'s token. All are validated and slots found for all
    /// before any is posted.
    ///
    /// # Errors
    ///
    /// Nothing is sent on error: [`IommuError::BufferSize`] when `tokens.len() !=
    /// requests.len()`; the first validation error; [`IommuError::Busy`] when fewer than
    /// `requests.len()` slots are free, or `requestq` has no room for `2 * requests.len()`
    /// more descriptors; otherwise those of [`Self::submit_nb`]. A failure of
    /// the queue after some requests were posted leaves the driver broken.
    pub fn submit_nb_many(
        &mut self,
        requests: &[NbRequest],
        tokens: &mut [Option<NbToken>],
    ) -> Result<(), IommuError> {
        self.usable()?;
        if tokens.len() != requests.len() {
            return Err(IommuError::BufferSize);
        }
        if requests.is_empty() {
            return Ok(());
        }
        if self.nb.free_slots() < requests.len()
            || !self.nb.room_for(requests.len(), self.requestq.size())
        {
            return Err(IommuError::Busy);
        }
        for r in requests {
            self.encode_nb(r, &mut [0u8; BATCH_SLOT])?;
        }
        if self.nb.in_flight() == 0 {
            self.check_nothing_used()?;
        }
        for (request, token) in requests.iter().zip(tokens.iter_mut()) {
            *token = Some(self.post_nb(request)?);
        }
        self.request_stats.requests += requests.len() as u64;
        if self.requestq.should_notify() {
            self.request_stats.notifications += 1;
            self.transport.notify(REQUESTQ);
        }
        Ok(())
    }

    /// Encodes `request` into `out`; returns the length of its device-readable part.
    fn encode_nb(
        &self,
        request: &NbRequest,
        out: &mut [u8; BATCH_SLOT],
    ) -> Result<usize, IommuError> {
        match *request {
            NbRequest::Attach { domain, endpoint } => {
                self.check_domain(domain)?;
                let req = ReqAttach {
                    head: ReqHead::new(RequestType::Attach),
                    domain: domain.into(),
                    endpoint: endpoint.into(),
                    flags: 0.into(),
                    reserved: [0; 4],
                };
                Ok(copy_into(out, req.as_bytes()))
            }
            NbRequest::Detach { domain, endpoint } => {
                self.check_domain(domain)?;
                let req = ReqDetach {
                    head: ReqHead::new(RequestType::Detach),
                    domain: domain.into(),
                    endpoint: endpoint.into(),
                    reserved: [0; 8],
                };
                Ok(copy_into(out, req.as_bytes()))
            }
            NbRequest::Op(BatchOp::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            }) => {
                let req = self.encode_map(domain, virt_start, virt_end, phys_start, flags)?;
                Ok(copy_into(out, req.as_bytes()))
            }
            NbRequest::Op(BatchOp::Unmap {
                domain,
                virt_start,
                virt_end,
            }) => {
                let req = self.encode_unmap(domain, virt_start, virt_end)?;
                Ok(copy_into(out, req.as_bytes()))
            }
        }
    }

    /// Writes `request` (already validated) into a free slot and posts it.
    fn post_nb(&mut self, request: &NbRequest) -> Result<NbToken, IommuError> {
        let Some(slot) = self.nb.slots[..NB_SLOTS]
            .iter()
            .position(|s| s.state == State::Free)
        else {
            return Err(IommuError::Busy);
        };
        let mut staged = [0u8; BATCH_SLOT];
        let readable = self.encode_nb(request, &mut staged)?;
        let buf = self.nb_buffer.bytes();
        buf[slot * BATCH_SLOT..(slot + 1) * BATCH_SLOT].copy_from_slice(&staged);
        let (ins, outs) = batch_slot_parts(buf, slot, readable);
        outs.fill(crate::WRITABLE_FILL);
        // SAFETY: both slices belong to `self.nb_buffer`, which lives until the device was
        // reset in `drop` (or is leaked); the driver does not touch them until `pop_used` in
        // `process_completions` (the slot is InFlight until then).
        let added = unsafe { self.requestq.add(&[ins], &mut [outs]) };
        self.posted(added, slot, readable)
    }

    /// Records the outcome of posting `slot`'s buffers (`readable` device-readable bytes):
    /// the slot is in flight under head descriptor `added`. A failed `add` (earlier requests
    /// of the same call may be posted already) or a head outside the ring leaves the driver
    /// broken.
    fn posted(
        &mut self,
        added: Result<u16, virtio_drivers::Error>,
        slot: usize,
        readable: usize,
    ) -> Result<NbToken, IommuError> {
        let desc = match added {
            Ok(d) => d,
            Err(e) => {
                self.broken = true;
                return Err(e.into());
            }
        };
        let Some(entry) = self.nb.slot_of_desc.get_mut(usize::from(desc)) else {
            self.broken = true;
            return Err(IommuError::DeviceProtocol);
        };
        *entry = slot as u8 + 1;
        let nb = &mut *self.nb;
        nb.in_flight += 1;
        let s = &mut nb.slots[slot];
        s.state = State::InFlight;
        s.readable = readable as u8;
        s.used = 0;
        s.status = crate::WRITABLE_FILL;
        Ok(NbToken {
            slot: slot as u8,
            generation: s.generation,
        })
    }

    /// Collects every used buffer of `requestq` into its non-blocking slot, in whatever order
    /// the device returned them; returns how many. Allocation-free, never waits, at most one
    /// pass over the ring: may be called from an interrupt handler (see [`crate::irq`]).
    ///
    /// # Errors
    ///
    /// Fatal (the driver is broken; completions collected before stay collected):
    /// [`IommuError::DeviceProtocol`] for a used id that names no non-blocking request in
    /// flight; [`IommuError::Transport`] from the queue. [`IommuError::Broken`] after an
    /// earlier fatal error.
    pub fn process_completions(&mut self) -> Result<u32, IommuError> {
        self.usable()?;
        let mut n = 0;
        for _ in 0..self.requestq.size() {
            if self.nb.in_flight == 0 {
                // Nothing of ours in flight: a used element here is left for the check of
                // the next request (`check_nothing_used`), as for synchronous requests.
                break;
            }
            let Some(desc) = self.requestq.peek_used() else {
                break;
            };
            let slot = match self.nb.slot_of_desc.get(usize::from(desc)) {
                Some(&s) if s != 0 => usize::from(s - 1),
                _ => {
                    self.broken = true;
                    return Err(IommuError::DeviceProtocol);
                }
            };
            let readable = usize::from(self.nb.slots[slot].readable);
            let probe_size = self.config.probe_size as usize;
            let (popped, expected) = if slot == PROBE_SLOT {
                let (ins, rest) = self.request_buffer.bytes().split_at_mut(readable);
                let outs = &mut rest[..probe_size + TAIL];
                // SAFETY: the buffers posted with `desc` (from `slot_of_desc`): the PROBE's.
                let popped = unsafe { self.requestq.pop_used(desc, &[ins], &mut [outs]) };
                (popped, probe_size + TAIL)
            } else {
                let (ins, outs) = batch_slot_parts(self.nb_buffer.bytes(), slot, readable);
                // SAFETY: the buffers posted with `desc` (from `slot_of_desc`).
                let popped = unsafe { self.requestq.pop_used(desc, &[ins], &mut [outs]) };
                (popped, TAIL)
            };
            let used = match popped {
                Ok(u) => u,
                Err(e) => {
                    self.broken = true;
                    return Err(match e {
                        virtio_drivers::Error::WrongToken => IommuError::DeviceProtocol,
                        e => e.into(),
                    });
                }
            };
            self.nb.slot_of_desc[usize::from(desc)] = 0;
            self.nb.in_flight -= 1;
            let status = match slot {
                PROBE_SLOT => self.request_buffer.bytes()[PROBE_HEAD + probe_size],
                _ => self.nb_buffer.bytes()[slot * BATCH_SLOT + BATCH_TAIL_AT],
            };
            if used as usize == expected && status == crate::WRITABLE_FILL {
                // An unwritten tail: the used element may be stale (see
                // `IommuError::NotWritten`), fatal as for every request.
                self.broken = true;
            }
            let s = &mut self.nb.slots[slot];
            if s.state == State::Abandoned {
                self.nb.free(slot);
            } else {
                s.state = State::Done;
                s.used = used;
                s.status = status;
            }
            n += 1;
        }
        Ok(n)
    }

    /// The outcome of `token`'s request, without waiting: collects completions first
    /// ([`Self::process_completions`]). `None` while the request is in flight. `Some` frees the
    /// slot: the token is unknown afterwards.
    ///
    /// # Errors
    ///
    /// `Some(Err(..))`: the device status ([`IommuError::Status`],
    /// [`IommuError::UnknownStatus`]); [`IommuError::NoResponse`] (used length 0),
    /// [`IommuError::BadUsedLength`] (not 4), [`IommuError::NotWritten`] (tail unwritten:
    /// fatal); [`IommuError::UnknownToken`] (also for a PROBE's token, which stays valid for
    /// [`Self::poll_probe_nb`]); an error of [`Self::process_completions`] (fatal);
    /// [`IommuError::Broken`] for a request still in flight on a broken driver (its slot stays
    /// taken: the device may still own it).
    pub fn poll_nb(&mut self, token: &NbToken) -> Option<Result<(), IommuError>> {
        let Some(slot) = self.nb.slot_of(token).filter(|&s| s != PROBE_SLOT) else {
            // A PROBE's token is collected by `poll_probe_nb` (it stays valid).
            return Some(Err(IommuError::UnknownToken));
        };
        Some(self.collect(slot)?.and_then(|s| match s.used as usize {
            0 => Err(IommuError::NoResponse),
            TAIL => status_of(s.status),
            _ => Err(IommuError::BadUsedLength {
                used: s.used,
                expected: TAIL as u32,
            }),
        }))
    }

    /// Collects slot `slot` (a slot request's or the PROBE's) for a poll: processes the used
    /// ring unless the driver is broken, then frees the slot and returns what it recorded if
    /// its request completed. `None`: still in flight.
    ///
    /// # Errors
    ///
    /// An error of [`Self::process_completions`] (fatal); [`IommuError::Broken`] for a request
    /// still in flight on a broken driver (its slot stays taken: the device may still own it).
    fn collect(&mut self, slot: usize) -> Option<Result<Slot, IommuError>> {
        if !self.broken {
            if let Err(e) = self.process_completions() {
                return Some(Err(e));
            }
        }
        let s = self.nb.slots[slot];
        match s.state {
            State::Done => {
                self.nb.free(slot);
                Some(Ok(s))
            }
            _ if self.broken => Some(Err(IommuError::Broken)),
            _ => None,
        }
    }

    /// Waits for `token`'s request, bounded by the [`crate::WaitPolicy`] (`max_polls` polls,
    /// or `timeout_ns` of its clock), reading the device status every 256 polls; then as
    /// [`Self::poll_nb`].
    ///
    /// # Errors
    ///
    /// The outcomes of [`Self::poll_nb`]; [`IommuError::Pending`] when the bound was reached
    /// first (not fatal: the request stays in flight, the token valid);
    /// [`IommuError::DeviceNeedsReset`] and [`IommuError::DeviceReset`] (fatal).
    pub fn wait_nb(&mut self, token: &NbToken) -> Result<(), IommuError> {
        self.wait_for_outcome(|d| d.poll_nb(token))
    }

    /// Calls `poll` until it gives an outcome, bounded by the [`crate::WaitPolicy`], reading
    /// the device status every 256 polls.
    ///
    /// # Errors
    ///
    /// The outcome's error; [`IommuError::Pending`] when the bound was reached first;
    /// [`IommuError::DeviceNeedsReset`] and [`IommuError::DeviceReset`] (fatal).
    fn wait_for_outcome(
        &mut self,
        mut poll: impl FnMut(&mut Self) -> Option<Result<(), IommuError>>,
    ) -> Result<(), IommuError> {
        let wait = self.options.wait;
        let mut outcome = None;
        let done = bounded_poll(&wait, |polls| {
            outcome = poll(self);
            if outcome.is_some() {
                return Ok(true);
            }
            if polls > 0 && polls.is_multiple_of(256) {
                self.check_needs_reset()?;
            }
            Ok(false)
        })?;
        match outcome {
            Some(r) if done => r,
            _ => Err(IommuError::Pending),
        }
    }

    /// Sends PROBE (§5.13.6.7) of `endpoint` without waiting: the request and its
    /// `probe_size + 4`-byte reply go in the driver's request buffer (not a slot), posted on
    /// `requestq` and notified (unless the device suppressed notifications). Returns its
    /// token; the properties come with [`Self::poll_probe_nb`] or [`Self::wait_probe_nb`]
    /// ([`Self::poll_nb`] does not take it). One non-blocking PROBE at a time, beside up to
    /// [`NB_SLOTS`] other requests. Allocation-free; not for an interrupt handler (as
    /// [`Self::submit_nb`]).
    ///
    /// # Errors
    ///
    /// Nothing is sent on error: [`IommuError::NotNegotiated`] without F_PROBE;
    /// [`IommuError::Busy`] while another non-blocking PROBE is in flight or not collected, or
    /// when `requestq` has no room for 2 more descriptors beside the requests in flight;
    /// [`IommuError::Broken`]; [`IommuError::DeviceProtocol`] when, with nothing in flight, the
    /// used ring holds an element (fatal); [`IommuError::Transport`] from the queue (fatal).
    pub fn submit_probe_nb(&mut self, endpoint: u32) -> Result<NbToken, IommuError> {
        self.usable()?;
        self.need(Features::PROBE)?;
        if self.nb.slots[PROBE_SLOT].state != State::Free
            || !self.nb.room_for(1, self.requestq.size())
        {
            return Err(IommuError::Busy);
        }
        if self.nb.in_flight() == 0 {
            self.check_nothing_used()?;
        }
        let req = ReqProbe {
            endpoint: endpoint.into(),
            ..ReqProbe::default()
        };
        let writable = self.config.probe_size as usize + TAIL;
        let (ins, rest) = self.request_buffer.bytes().split_at_mut(PROBE_HEAD);
        ins.copy_from_slice(req.as_bytes());
        let outs = &mut rest[..writable];
        outs.fill(crate::WRITABLE_FILL);
        // SAFETY: both slices belong to `self.request_buffer`, which lives until the device was
        // reset in `drop` (or is leaked); no synchronous request touches it until this PROBE
        // is collected, discarded or reclaimed (they are refused: `nb_idle`), nor does the
        // driver until `pop_used` in `process_completions` (the slot is InFlight until then).
        let added = unsafe { self.requestq.add(&[ins], &mut [outs]) };
        let token = self.posted(added, PROBE_SLOT, PROBE_HEAD)?;
        self.request_stats.requests += 1;
        if self.requestq.should_notify() {
            self.request_stats.notifications += 1;
            self.transport.notify(REQUESTQ);
        }
        Ok(token)
    }

    /// The outcome of the non-blocking PROBE of `token` ([`Self::submit_probe_nb`]), without
    /// waiting: collects completions first ([`Self::process_completions`]); `None` while it is
    /// in flight. When it completed, calls `f` with each property in order (as
    /// [`Self::probe`]: reserved memory regions, and unknown properties to ignore) and frees
    /// the PROBE slot: the token is unknown afterwards.
    ///
    /// # Errors
    ///
    /// `Some(Err(..))`: [`IommuError::UnknownToken`] for a token that is not a PROBE's in
    /// flight or completed; the reply's errors as for [`Self::probe`] (device status,
    /// [`IommuError::NoResponse`], [`IommuError::BadUsedLength`] unless `probe_size + 4`
    /// bytes, [`IommuError::NotWritten`] — fatal for an unwritten tail, not for properties
    /// left unwritten under a written status — and [`IommuError::MalformedProbe`]); an error
    /// of [`Self::process_completions`] (fatal); [`IommuError::Broken`] for a PROBE still in
    /// flight on a broken driver (its slot stays taken: the device may still own it).
    pub fn poll_probe_nb(
        &mut self,
        token: &NbToken,
        f: impl FnMut(ProbeProperty),
    ) -> Option<Result<(), IommuError>> {
        if self.nb.slot_of(token) != Some(PROBE_SLOT) {
            return Some(Err(IommuError::UnknownToken));
        }
        Some(
            self.collect(PROBE_SLOT)?
                .and_then(|s| self.probe_reply(s.used, f)),
        )
    }

    /// Waits for the non-blocking PROBE of `token`, bounded as [`Self::wait_nb`]; then as
    /// [`Self::poll_probe_nb`].
    ///
    /// # Errors
    ///
    /// The outcomes of [`Self::poll_probe_nb`]; [`IommuError::Pending`] when the bound was
    /// reached first (not fatal: the PROBE stays in flight, the token valid);
    /// [`IommuError::DeviceNeedsReset`] and [`IommuError::DeviceReset`] (fatal).
    pub fn wait_probe_nb(
        &mut self,
        token: &NbToken,
        mut f: impl FnMut(ProbeProperty),
    ) -> Result<(), IommuError> {
        self.wait_for_outcome(|d| d.poll_probe_nb(token, &mut f))
    }

    /// Gives up `token`: a completed request's slot is freed now, one in flight when the
    /// device returns it (its buffers stay the driver's until then). Returns whether the token
    /// named a request.
    pub fn discard_nb(&mut self, token: NbToken) -> bool {
        let Some(slot) = self.nb.slot_of(&token) else {
            return false;
        };
        match self.nb.slots[slot].state {
            State::Done => self.nb.free(slot),
            State::InFlight => {
                let s = &mut self.nb.slots[slot];
                s.state = State::Abandoned;
                // The token is unknown from now on.
                s.generation = s.generation.wrapping_add(1);
            }
            State::Abandoned | State::Free => {}
        }
        true
    }

    /// Frees every completed request whose outcome was not collected (for a caller that lost
    /// its tokens) and marks every one in flight to be freed on completion; every token issued
    /// so far becomes [`IommuError::UnknownToken`]. Returns how many slots were affected.
    pub fn reclaim_nb(&mut self) -> usize {
        let mut n = 0;
        for slot in 0..=PROBE_SLOT {
            match self.nb.slots[slot].state {
                State::Done => self.nb.free(slot),
                State::InFlight => {
                    let s = &mut self.nb.slots[slot];
                    s.state = State::Abandoned;
                    s.generation = s.generation.wrapping_add(1);
                }
                State::Abandoned | State::Free => continue,
            }
            n += 1;
        }
        n
    }

    /// Number of non-blocking requests the device has not returned yet (discarded ones
    /// included).
    pub fn nb_in_flight(&self) -> usize {
        self.nb.in_flight()
    }

    /// Asks the device for used-buffer notifications (interrupts) on `requestq` and `eventq`
    /// (clears or sets VIRTQ_AVAIL_F_NO_INTERRUPT, virtio §2.7.7; the device may still send
    /// them, or not, as the spec allows: a hint). [`Self::new`] leaves `requestq`'s off (its
    /// completions are polled) and `eventq`'s on. Does not touch the transport's own interrupt
    /// routing (INTx, MSI-X vectors) or the interrupt controller: that is the embedder's.
    pub fn set_interrupts(&mut self, requestq: bool, eventq: bool) {
        self.requestq.set_dev_notify(requestq);
        self.eventq.set_dev_notify(eventq);
    }

    /// [`Self::set_interrupts`] with both on.
    pub fn enable_interrupts(&mut self) {
        self.set_interrupts(true, true);
    }

    /// [`Self::set_interrupts`] with both off: completions and faults are then only found by
    /// polling.
    pub fn disable_interrupts(&mut self) {
        self.set_interrupts(false, false);
    }

    /// Reads and acknowledges the device's interrupt status (virtio-pci: reads ISR, which
    /// clears it and deasserts INTx, §4.1.4.5; virtio-mmio: reads InterruptStatus and writes
    /// InterruptACK, §4.2.2). An empty status means the interrupt was not this device's.
    /// Allocation-free, never waits.
    pub fn ack_interrupt(&mut self) -> InterruptStatus {
        self.transport.ack_interrupt()
    }

    /// The interrupt handler's body: acknowledges the interrupt ([`Self::ack_interrupt`]),
    /// collects non-blocking completions ([`Self::process_completions`]) and takes the fault
    /// reports waiting on `eventq` (at most [`crate::EVENTQ_SIZE`] used buffers, as one
    /// [`Self::poll_event`]), calling `on_fault` with each one. Acknowledging first means a
    /// buffer used after the ack raises a new interrupt rather than being lost.
    ///
    /// Allocation-free and bounded (one pass over each queue): may be called from an
    /// interrupt handler, with the lock rules of [`crate::irq`]. The config-change bit is
    /// only reported (the configuration is read at initialisation).
    ///
    /// # Errors
    ///
    /// Those of [`Self::process_completions`] and [`Self::poll_event`] (fatal ones leave the
    /// driver broken; the interrupt was acknowledged anyway). [`IommuError::Broken`] after an
    /// earlier fatal error, also acknowledged.
    pub fn handle_interrupt(
        &mut self,
        mut on_fault: impl FnMut(FaultEvent),
    ) -> Result<InterruptReport, IommuError> {
        let status = self.ack_interrupt();
        let mut report = InterruptReport {
            queue_interrupt: status.contains(InterruptStatus::QUEUE_INTERRUPT),
            config_changed: status.contains(InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT),
            ..InterruptReport::default()
        };
        report.completed = self.process_completions()?;
        for _ in 0..crate::EVENTQ_SIZE {
            match self.poll_event()? {
                Some(e) => {
                    report.faults += 1;
                    on_fault(e);
                }
                None => break,
            }
        }
        Ok(report)
    }
}

/// Copies `bytes` into the front of `out`; returns their length.
fn copy_into(out: &mut [u8; BATCH_SLOT], bytes: &[u8]) -> usize {
    out[..bytes.len()].copy_from_slice(bytes);
    bytes.len()
}
