//! Fault injection: a [`FaultPlan`] makes the device (or its transport model) misbehave on
//! purpose, to test that a *driver* survives a hostile or broken device: every misbehaviour
//! below says what a correct driver must do about it.
//!
//! A plan is plain data (no closures, no references; `Clone + Eq + Debug`), set in the
//! [`crate::DeviceConfig`] with [`crate::DeviceConfigBuilder::fault_injection`], so the same
//! plan can drive the in-process bench now and a device server in another process later (one
//! notification or register access per message: nothing here depends on the caller's thread
//! or timing). It has a text form for command lines and files: [`FaultPlan`]'s `Display`
//! writes it and its `FromStr` reads it back (errors: [`ParsePlanError`]):
//!
//! ```text
//! plan  = [fault *(";" fault)]            spaces around tokens are ignored
//! fault = name ["(" args ")"] ["@" when]
//! when  = [type] ["+" after] ["*" times]   type: attach | detach | map | unmap | probe
//! ```
//!
//! Names are the [`Misbehaviour`] variants in kebab case (`never-complete`, `used-len(0)`,
//! `features-after-ok(0x100000000)`, `config-bytes(36, 02)`, `probe-properties(01001400...)`,
//! `event-flood(8)`, ...); integers are decimal or `0x` hex, bytes are hex digits. Example:
//! `never-complete@map+2*1; config-generation-unstable*3` (the 3rd MAP is never completed;
//! the first 3 generation reads change).
//!
//! Each [`Fault`] pairs a [`Misbehaviour`] with a [`When`]: a misbehaviour has *opportunities*
//! (its kind of event: a requestq chain, a fault report, a register read, ...; listed on each
//! variant), numbered from 1 per fault; it applies on opportunities `after + 1 ..= after +
//! times`. Request misbehaviours can be limited to one request type. When several faults of a
//! plan apply to the same opportunity, the first one in the plan wins (every fault still counts
//! the opportunity).
//!
//! Where each misbehaviour is implemented, next to the behaviour it corrupts: register reads
//! (`ConfigGeneration`, `DeviceFeatures`, `Status`, `QueueNumMax`, the config space) in
//! [`crate::mmio::MmioDevice`], the transport model; feature negotiation (the FEATURES_OK
//! write, the features requests are processed with), requests, completions and events in
//! [`crate::IommuDevice`]. Each application is counted in
//! [`crate::Counters::faults_injected`]. An empty plan (the default) changes nothing and costs
//! one branch per chain.

use virtio_iommu_driver::wire::RequestType;

pub(crate) mod reply;
mod text;

pub use text::ParsePlanError;

/// When a [`Fault`] applies, counted in the misbehaviour's opportunities (see the module
/// documentation).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct When {
    /// Opportunities let through unchanged before the first application.
    pub after: u64,
    /// Number of applications; `None` = every opportunity from `after + 1` on.
    pub times: Option<u64>,
    /// Request misbehaviours only: count only chains whose first readable byte is this request
    /// type (`None`: every chain). Ignored by the other misbehaviours.
    pub request: Option<RequestType>,
}

impl When {
    /// Every opportunity.
    pub const ALWAYS: Self = Self {
        after: 0,
        times: None,
        request: None,
    };

    /// Every opportunity after the first `n`.
    pub fn after(n: u64) -> Self {
        Self {
            after: n,
            ..Self::ALWAYS
        }
    }

    /// Only the `n`-th opportunity (1-based).
    pub fn nth(n: u64) -> Self {
        Self {
            after: n.saturating_sub(1),
            times: Some(1),
            request: None,
        }
    }

    /// Only chains of request type `t` count.
    pub fn on(mut self, t: RequestType) -> Self {
        self.request = Some(t);
        self
    }

    /// At most `n` applications.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    /// Whether opportunity number `n` (1-based) is covered.
    fn covers(&self, n: u64) -> bool {
        n > self.after && self.times.is_none_or(|t| n - self.after <= t)
    }
}

impl Default for When {
    fn default() -> Self {
        Self::ALWAYS
    }
}

/// One way of misbehaving. "Chain" is a requestq descriptor chain; "normal used length" is
/// what the device would have reported (the writable length of a well-formed request).
#[derive(Clone, Debug, Eq, PartialEq, Hash)]
pub enum Misbehaviour {
    // ---- transport (register) level, in `MmioDevice` ----
    /// Every read of `ConfigGeneration` returns a new value (virtio §2.5.1 says the value only
    /// changes when the config space changes). Opportunity: a `ConfigGeneration` read.
    /// Driver: bounded retries of the consistent read, then a typed error (never an endless
    /// loop); with `times` small enough it settles and initialisation succeeds.
    ConfigGenerationUnstable,
    /// Once FEATURES_OK is accepted, `DeviceFeatures` reads present `offered`, and requests are
    /// processed as if only `negotiated & offered` had been negotiated (a withdrawn MAP_UNMAP
    /// makes MAP/UNMAP fail with `S_UNSUPP`). Applies from FEATURES_OK on; `When` is ignored.
    /// Driver: features are fixed at FEATURES_OK (virtio §3.1.1), so it keeps its negotiated
    /// set; the device's refusals come back as typed statuses, nothing is mapped.
    FeaturesChangeAfterFeaturesOk {
        /// Feature bits presented after FEATURES_OK.
        offered: u64,
    },
    /// A write setting FEATURES_OK is refused (the bit reads back clear) whatever the driver
    /// features. Opportunity: a status write newly setting FEATURES_OK. Driver: fails
    /// initialisation with a typed error and sets FAILED (virtio §3.1.1 step 6).
    FeaturesOkRefused,
    /// While the device status is 0 (at power-on and after every reset), `Status` reads as this
    /// value: a reset that does not complete. Opportunity: a `Status` read while the status is
    /// 0. Driver: after writing 0 it waits, bounded, for 0 to read back (virtio §2.4.2), then
    /// fails with a typed error; with `times` small enough the reset completes and
    /// initialisation succeeds.
    StatusAfterReset(u8),
    /// `QueueNumMax` reads as this value. Opportunity: a `QueueNumMax` read. Driver: refuses a
    /// queue it cannot use (0, or too small) with a typed error, never a queue larger than the
    /// maximum.
    QueueNumMax(u32),
    /// Config space reads see `bytes` at byte `offset` of `struct virtio_iommu_config`
    /// (e.g. `page_size_mask` 0, an inverted range, a huge `probe_size`, `bypass` 2). Writes
    /// are unaffected. Opportunity: a config space read overlapping the bytes. Driver: checks
    /// every field and refuses an unusable configuration with a typed error.
    ConfigBytes {
        /// Byte offset in the config space.
        offset: u8,
        /// Bytes presented there.
        bytes: Vec<u8>,
    },

    // ---- requestq, in `IommuDevice` (opportunity: a chain, filtered by `When::request`) ----
    /// The chain is executed but returned with this used length (0, shorter or longer than the
    /// writable part). Driver: used length 0 ⇒ the request failed (§5.13.6 "SHOULD treat as
    /// failure"); too short for the tail or longer than posted ⇒ a typed error; never reads
    /// beyond what it posted.
    UsedLen(u32),
    /// The chain is executed but its tail status byte is replaced by this value (e.g. 9..=255,
    /// undefined by §5.13.6). Driver: an undefined status is a typed error, never success.
    Status(u8),
    /// The chain is returned with its normal used length but nothing written and nothing
    /// executed (the tail keeps whatever the driver left in it). Driver: must not take the
    /// unwritten tail for `S_OK` (pre-fill it with a value no device writes).
    TailNotWritten,
    /// The chain is taken from the available ring and never returned, nor executed. Driver: a
    /// bounded wait ending in a timeout error; the buffers stay owned by the driver.
    NeverComplete,
    /// The chain is taken, DEVICE_NEEDS_RESET is set (with a configuration-change interrupt)
    /// and the chain is never returned (virtio §2.1.2). Driver: notices the status bit while
    /// waiting and fails with a typed error instead of waiting out the budget.
    NeedsReset,
    /// The device resets itself instead of completing the chain: every domain and mapping
    /// destroyed, queues reset, status 0. Driver: a bounded wait ending in a typed error
    /// (timeout or a lost-status error); nothing stays mapped.
    ResetSelf,
    /// The chain is executed and returned with a used-ring `id` outside the descriptor table
    /// (`head + queue size`). Driver: a protocol error, never an out-of-bounds access.
    UsedIdOutOfRange,
    /// The chain is executed and returned twice (two used elements with its `id`). Driver: the
    /// second one does not match an outstanding request: a protocol error.
    UsedTwice,
    /// The chains of one processing round are executed in order but returned in reverse
    /// order. Opportunity: a chain (every chain of a round the fault covers is reordered).
    /// Driver: completions may come in any order (VIRTIO_F_IN_ORDER is not negotiated,
    /// virtio §2.7); it matches them by id and every request gets its own result.
    Reorder,
    /// PROBE only: the properties contain two RESV_MEM regions that overlap (D43 forbids it),
    /// `0x1000..=0x2fff` and `0x2000..=0x3fff` (both RESERVED). Driver: no panic; it reports
    /// both (so a user keeps the union out of IOVA space) or refuses the reply.
    ProbeOverlap,
    /// PROBE only: the first property's `length` runs past `probe_size`. Driver: a typed
    /// malformed-PROBE error, no read beyond the buffer.
    ProbeOverrun,
    /// PROBE only: a RESV_MEM property whose `type` has reserved bits 12-15 set, before the
    /// real ones. Driver: ignores that property (R28) and parses the rest (R29).
    ProbeReservedBits,
    /// PROBE only: the properties part is replaced by `bytes` (truncated or zero-filled to
    /// `probe_size`). For scripted property lists.
    ProbeProperties(Vec<u8>),

    // ---- eventq, in `IommuDevice` ----
    /// Fault reports are written whole but returned with this used length (0, below 24, or
    /// beyond the buffer). Opportunity: a fault report written. Driver: ignores reports with
    /// used length below 24 (§5.13.6.9) and never reads beyond its buffer.
    EventUsedLen(u32),
    /// Every available eventq buffer is filled with a synthetic fault report (reason UNKNOWN,
    /// the first configured endpoint, address 0) returned with `used_len`, with no fault
    /// behind it; buffers re-posted are filled again at once. Opportunity: an eventq
    /// processing pass (eventq notification, DRIVER_OK, a fault) that finds a buffer. Driver:
    /// each event poll is bounded (it returns after a bounded number of buffers), however many
    /// reports arrive.
    EventFlood {
        /// Used length of each report.
        used_len: u32,
    },
}

impl Misbehaviour {
    /// Whether the misbehaviour applies to requestq chains (and so honours
    /// [`When::request`]).
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Self::UsedLen(_)
                | Self::Status(_)
                | Self::TailNotWritten
                | Self::NeverComplete
                | Self::NeedsReset
                | Self::ResetSelf
                | Self::UsedIdOutOfRange
                | Self::UsedTwice
                | Self::Reorder
                | Self::ProbeOverlap
                | Self::ProbeOverrun
                | Self::ProbeReservedBits
                | Self::ProbeProperties(_)
        )
    }

    /// Whether the misbehaviour only concerns PROBE requests.
    pub fn is_probe(&self) -> bool {
        matches!(
            self,
            Self::ProbeOverlap
                | Self::ProbeOverrun
                | Self::ProbeReservedBits
                | Self::ProbeProperties(_)
        )
    }
}

/// A misbehaviour and when it applies.
#[derive(Clone, Debug, Eq, PartialEq, Hash)]
pub struct Fault {
    /// What the device does wrong.
    pub what: Misbehaviour,
    /// On which opportunities.
    pub when: When,
}

/// An ordered list of [`Fault`]s. Empty by default: the device behaves.
#[derive(Clone, Debug, Default, Eq, PartialEq, Hash)]
pub struct FaultPlan {
    /// The faults, first match wins.
    pub faults: Vec<Fault>,
}

impl FaultPlan {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plan with `what` added, applying `when`.
    pub fn with(mut self, what: Misbehaviour, when: When) -> Self {
        self.faults.push(Fault { what, when });
        self
    }

    /// The plan with `what` added, applying on every opportunity.
    pub fn always(self, what: Misbehaviour) -> Self {
        self.with(what, When::ALWAYS)
    }

    /// Whether the plan is empty.
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// The `offered` bits of a [`Misbehaviour::FeaturesChangeAfterFeaturesOk`], if any.
    pub fn features_after_ok(&self) -> Option<u64> {
        self.faults.iter().find_map(|f| match f.what {
            Misbehaviour::FeaturesChangeAfterFeaturesOk { offered } => Some(offered),
            _ => None,
        })
    }
}

/// Opportunity counters of one [`FaultPlan`] (one per fault). Kept by whoever implements the
/// misbehaviours (the device, the register model), reset never: a plan describes a device's
/// whole life.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct FaultCounters {
    seen: Vec<u64>,
}

impl FaultCounters {
    /// Counts one opportunity for every fault of `plan` that `matches` (given the fault's
    /// misbehaviour and its `When`), and returns the first of them that applies to it.
    pub fn fire<'p>(
        &mut self,
        plan: &'p FaultPlan,
        mut matches: impl FnMut(&Misbehaviour, &When) -> bool,
    ) -> Option<&'p Misbehaviour> {
        if plan.faults.is_empty() {
            return None;
        }
        if self.seen.len() != plan.faults.len() {
            self.seen.resize(plan.faults.len(), 0);
        }
        let mut hit = None;
        for (fault, seen) in plan.faults.iter().zip(self.seen.iter_mut()) {
            if !matches(&fault.what, &fault.when) {
                continue;
            }
            *seen = seen.saturating_add(1);
            if hit.is_none() && fault.when.covers(*seen) {
                hit = Some(&fault.what);
            }
        }
        hit
    }

    /// [`Self::fire`] for a requestq chain of (raw) type `request_type`: request
    /// misbehaviours whose `When::request` is unset or equal, PROBE ones only for PROBE.
    pub fn fire_request<'p>(
        &mut self,
        plan: &'p FaultPlan,
        request_type: Option<u8>,
    ) -> Option<&'p Misbehaviour> {
        let probe = request_type == Some(RequestType::Probe as u8);
        self.fire(plan, |m, w| {
            m.is_request()
                && (!m.is_probe() || probe)
                && w.request.is_none_or(|t| Some(t as u8) == request_type)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_counts_opportunities_per_fault() {
        let plan = FaultPlan::new()
            .with(Misbehaviour::Status(9), When::nth(2))
            .with(Misbehaviour::UsedLen(0), When::after(1).times(2));
        let mut c = FaultCounters::default();
        let got: Vec<_> = (0..5)
            .map(|_| c.fire_request(&plan, Some(1)).cloned())
            .collect();
        assert_eq!(
            got,
            vec![
                None,
                Some(Misbehaviour::Status(9)),
                Some(Misbehaviour::UsedLen(0)),
                None,
                None
            ]
        );
    }

    #[test]
    fn request_filter_and_probe_only_faults() {
        let plan = FaultPlan::new()
            .with(Misbehaviour::ProbeOverrun, When::ALWAYS)
            .with(
                Misbehaviour::NeverComplete,
                When::ALWAYS.on(RequestType::Map),
            );
        let mut c = FaultCounters::default();
        assert_eq!(c.fire_request(&plan, Some(1)), None);
        assert_eq!(
            c.fire_request(&plan, Some(3)),
            Some(&Misbehaviour::NeverComplete)
        );
        assert_eq!(
            c.fire_request(&plan, Some(5)),
            Some(&Misbehaviour::ProbeOverrun)
        );
        assert_eq!(c.fire_request(&plan, None), None);
        assert!(FaultCounters::default()
            .fire_request(&FaultPlan::new(), Some(3))
            .is_none());
    }
}
