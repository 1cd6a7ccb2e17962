//! Device configuration: offered features, `struct virtio_iommu_config` values (virtio v1.3
//! §5.13.4), the endpoints the device manages with their reserved regions (§5.13.6.8.1), and the
//! resource caps that bound what a guest can make the device allocate or do.
//!
//! Build a [`DeviceConfig`] with [`DeviceConfig::builder`]; [`DeviceConfigBuilder::build`]
//! validates it, so a `DeviceConfig` always satisfies the device requirements on the
//! configuration (D2, D3, D5, D42, D43; see the "Statement index" of `CONFORMANCE.md`).

use std::collections::BTreeMap;
use std::fmt;

use virtio_iommu_driver::wire::{Features, RESV_MEM_T_MSI, RESV_MEM_T_RESERVED};

use crate::fault::FaultPlan;

/// Size in bytes of one RESV_MEM property in a PROBE response (header included, §5.13.6.8.1).
pub const RESV_MEM_PROPERTY_SIZE: u32 = 24;

/// Largest accepted `probe_size`, in bytes. Bounds the work and memory of one PROBE request.
pub const MAX_PROBE_SIZE: u32 = 1 << 20;

/// Largest accepted virtqueue size (virtio split queues: a power of two up to 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Device-specific feature bits this device implements (§5.13.3).
pub const DEVICE_FEATURES: Features = Features::INPUT_RANGE
    .union(Features::DOMAIN_RANGE)
    .union(Features::MAP_UNMAP)
    .union(Features::BYPASS)
    .union(Features::PROBE)
    .union(Features::MMIO)
    .union(Features::BYPASS_CONFIG);

/// Every feature bit this device can offer: [`DEVICE_FEATURES`], `VIRTIO_F_INDIRECT_DESC`
/// (virtio-queue follows indirect tables transparently) and `VIRTIO_F_VERSION_1` (always
/// offered: the device is modern-only).
pub const SUPPORTED_FEATURES: Features = DEVICE_FEATURES
    .union(Features::RING_INDIRECT_DESC)
    .union(Features::VERSION_1);

/// Kind of a reserved memory region (`subtype` of the RESV_MEM property, §5.13.6.8.1).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum ResvKind {
    /// `VIRTIO_IOMMU_RESV_MEM_T_RESERVED`: the driver cannot MAP these IOVAs, and every access
    /// by the endpoint to them is rejected with a `FAULT_R_MAPPING` fault (even in bypass mode).
    Reserved,
    /// `VIRTIO_IOMMU_RESV_MEM_T_MSI`: an MSI doorbell. The driver cannot MAP these IOVAs; the
    /// device translates accesses to them with the identity function, whatever the endpoint's
    /// attachment.
    Msi,
}

impl ResvKind {
    /// The `subtype` byte written in the RESV_MEM property.
    pub fn subtype(self) -> u8 {
        match self {
            Self::Reserved => RESV_MEM_T_RESERVED,
            Self::Msi => RESV_MEM_T_MSI,
        }
    }
}

/// A reserved region of one endpoint's IOVA space: `start..=end` (inclusive), in IOVAs, which for
/// these regions equal guest-physical addresses.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct ResvRegion {
    /// Region kind.
    pub kind: ResvKind,
    /// First IOVA of the region.
    pub start: u64,
    /// Last IOVA of the region (inclusive). `start <= end` is checked by the builder.
    pub end: u64,
}

impl ResvRegion {
    /// A `Reserved` region `start..=end` (inclusive IOVAs).
    pub fn reserved(start: u64, end: u64) -> Self {
        Self {
            kind: ResvKind::Reserved,
            start,
            end,
        }
    }

    /// An `Msi` doorbell region `start..=end` (inclusive IOVAs).
    pub fn msi(start: u64, end: u64) -> Self {
        Self {
            kind: ResvKind::Msi,
            start,
            end,
        }
    }

    /// Whether the inclusive range `start..=end` intersects the region.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start <= self.end && self.start <= end
    }

    /// Whether `addr` is inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.end
    }
}

/// Resource caps. Every count a guest can grow is bounded by one of these, so the device's
/// memory and the work done per notification are bounded whatever the guest sends.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Caps {
    /// Largest number of domains existing at once. ATTACH creating one more fails with
    /// `S_NOMEM`. (A domain exists only while an endpoint is attached to it, so the number of
    /// configured endpoints bounds it too.) Default 1024.
    pub max_domains: usize,
    /// Largest number of mappings existing at once, over all domains. MAP creating one more
    /// fails with `S_NOMEM`. Default 65536.
    pub max_mappings: usize,
    /// Largest number of requestq descriptor chains processed in one *round* (one call to
    /// [`crate::IommuDevice::process_requestq`]): a fairness bound, not a limit on what gets
    /// processed. Every chain available when the driver notifies is processed, in rounds of at
    /// most this many; the rounds after the first are owed
    /// ([`crate::IommuDevice::requestq_pending`]) and run by the transport
    /// ([`crate::IommuDevice::service`]; [`crate::MmioDevice`] runs them all before the
    /// `QueueNotify` write returns, unlocking the device between rounds). So at most
    /// `queue_size` chains are processed per notification, at most this many per round.
    /// Must be at least 1. Default 256.
    pub max_requests_per_notify: usize,
    /// Largest number of fault reports kept while no eventq buffer is available. Faults beyond
    /// it are dropped and counted ([`crate::Counters::faults_dropped`]). Default 64.
    pub max_pending_faults: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            max_domains: 1024,
            max_mappings: 65536,
            max_requests_per_notify: 256,
            max_pending_faults: 64,
        }
    }
}

/// A validated device configuration. Create it with [`DeviceConfig::builder`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DeviceConfig {
    offered: Features,
    page_size_mask: u64,
    input_range: (u64, u64),
    domain_range: (u32, u32),
    probe_size: u32,
    boot_bypass: bool,
    endpoints: BTreeMap<u32, Vec<ResvRegion>>,
    caps: Caps,
    queue_size: u16,
    fault_plan: FaultPlan,
    driver_checker: bool,
}

impl Default for DeviceConfig {
    /// The builder's defaults (see [`DeviceConfigBuilder`]), with no endpoint.
    fn default() -> Self {
        let b = DeviceConfigBuilder::default();
        Self {
            offered: b.offered | Features::VERSION_1,
            page_size_mask: b.page_size_mask,
            input_range: b.input_range,
            domain_range: b.domain_range,
            probe_size: b.probe_size,
            boot_bypass: b.boot_bypass,
            endpoints: BTreeMap::new(),
            caps: b.caps,
            queue_size: b.queue_size,
            fault_plan: FaultPlan::default(),
            driver_checker: false,
        }
    }
}

impl DeviceConfig {
    /// A builder with the defaults listed on [`DeviceConfigBuilder`].
    pub fn builder() -> DeviceConfigBuilder {
        DeviceConfigBuilder::default()
    }

    /// The features the device offers (always includes `VERSION_1`).
    pub fn offered(&self) -> Features {
        self.offered
    }

    /// `page_size_mask` (§5.13.4): bit n set = pages of 2^n bytes can be mapped. Never 0.
    pub fn page_size_mask(&self) -> u64 {
        self.page_size_mask
    }

    /// The granule in bytes: the lowest set bit of `page_size_mask`. MAP addresses and sizes are
    /// multiples of it (D22).
    pub fn granule(&self) -> u64 {
        // `page_size_mask != 0` is an invariant (D3), so the shift is below 64.
        1u64 << self.page_size_mask.trailing_zeros().min(63)
    }

    /// `input_range` as presented in the config space: `(start, end)`, inclusive IOVAs.
    pub fn input_range(&self) -> (u64, u64) {
        self.input_range
    }

    /// The IOVA range the device enforces: `input_range` when `INPUT_RANGE` is offered, else the
    /// whole 64-bit space (§5.13.6 "If the feature is not offered, virtual mappings span over
    /// the whole 64-bit address space").
    pub fn effective_input_range(&self) -> (u64, u64) {
        if self.offered.contains(Features::INPUT_RANGE) {
            self.input_range
        } else {
            (0, u64::MAX)
        }
    }

    /// `domain_range` as presented in the config space: `(start, end)`, inclusive domain IDs.
    pub fn domain_range(&self) -> (u32, u32) {
        self.domain_range
    }

    /// The domain IDs the device accepts: `domain_range` when `DOMAIN_RANGE` is offered, else
    /// every `u32` (§5.13.6 "If the feature is not offered, any domain value is valid").
    pub fn effective_domain_range(&self) -> (u32, u32) {
        if self.offered.contains(Features::DOMAIN_RANGE) {
            self.domain_range
        } else {
            (0, u32::MAX)
        }
    }

    /// `probe_size` in bytes: size of the `properties` part of a PROBE request (§5.13.6.7).
    pub fn probe_size(&self) -> u32 {
        self.probe_size
    }

    /// Initial value of the `bypass` config field, restored on system reset (D4).
    pub fn boot_bypass(&self) -> bool {
        self.boot_bypass
    }

    /// Whether `endpoint` is an endpoint ID this device manages.
    pub fn has_endpoint(&self, endpoint: u32) -> bool {
        self.endpoints.contains_key(&endpoint)
    }

    /// The managed endpoint IDs, in increasing order.
    pub fn endpoints(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.keys().copied()
    }

    /// The reserved regions of `endpoint`, sorted by `start` and non-overlapping; `None` for an
    /// endpoint the device does not manage.
    pub fn resv_regions(&self, endpoint: u32) -> Option<&[ResvRegion]> {
        self.endpoints.get(&endpoint).map(Vec::as_slice)
    }

    /// The resource caps.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Maximum size (number of descriptors) of each virtqueue, reported in `QueueNumMax`.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The fault-injection plan (empty: the device behaves); see [`crate::fault`].
    pub fn fault_plan(&self) -> &FaultPlan {
        &self.fault_plan
    }

    /// Whether the driver checker is on ([`DeviceConfigBuilder::driver_checker`]).
    pub fn driver_checker(&self) -> bool {
        self.driver_checker
    }
}

/// Why a configuration was refused by [`DeviceConfigBuilder::build`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum ConfigError {
    /// `page_size_mask` is 0 (D3: the device MUST set at least one bit).
    PageSizeMaskZero,
    /// `input_range.start > input_range.end`.
    InputRangeInverted,
    /// `domain_range.start > domain_range.end`.
    DomainRangeInverted,
    /// Feature bits this device does not implement were requested.
    UnsupportedFeatures(Features),
    /// Both `BYPASS` and `BYPASS_CONFIG` offered (D2: SHOULD NOT offer both).
    BothBypassFeatures,
    /// Boot `bypass = 1` without `BYPASS_CONFIG` offered: the field would have no meaning.
    BypassWithoutBypassConfig,
    /// `probe_size` above [`MAX_PROBE_SIZE`].
    ProbeSizeTooLarge(u32),
    /// An endpoint's RESV_MEM properties do not fit in `probe_size` bytes.
    ProbeSizeTooSmall {
        /// Endpoint ID.
        endpoint: u32,
        /// Bytes its properties need.
        needed: u64,
    },
    /// A reserved region names an endpoint that was not declared.
    UnknownEndpoint(u32),
    /// A reserved region has `start > end`.
    ResvInverted {
        /// Endpoint ID.
        endpoint: u32,
        /// The region.
        region: ResvRegion,
    },
    /// Two reserved regions of one endpoint overlap (D43).
    ResvOverlap {
        /// Endpoint ID.
        endpoint: u32,
    },
    /// More than one MSI region for one endpoint (D42).
    MultipleMsi {
        /// Endpoint ID.
        endpoint: u32,
    },
    /// A cap is zero (named field of [`Caps`]).
    ZeroCap(&'static str),
    /// The queue size is not a power of two in `1..=32768`.
    InvalidQueueSize(u16),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PageSizeMaskZero => write!(f, "page_size_mask must not be 0"),
            Self::InputRangeInverted => write!(f, "input_range start > end"),
            Self::DomainRangeInverted => write!(f, "domain_range start > end"),
            Self::UnsupportedFeatures(x) => write!(f, "unsupported features {x:?}"),
            Self::BothBypassFeatures => write!(f, "BYPASS and BYPASS_CONFIG both offered"),
            Self::BypassWithoutBypassConfig => {
                write!(f, "boot bypass = 1 needs BYPASS_CONFIG offered")
            }
            Self::ProbeSizeTooLarge(s) => write!(f, "probe_size {s} > {MAX_PROBE_SIZE}"),
            Self::ProbeSizeTooSmall { endpoint, needed } => write!(
                f,
                "endpoint {endpoint}: RESV_MEM properties need {needed} bytes > probe_size"
            ),
            Self::UnknownEndpoint(e) => write!(f, "reserved region for undeclared endpoint {e}"),
            Self::ResvInverted { endpoint, region } => {
                write!(f, "endpoint {endpoint}: inverted region {region:?}")
            }
            Self::ResvOverlap { endpoint } => {
                write!(f, "endpoint {endpoint}: overlapping reserved regions")
            }
            Self::MultipleMsi { endpoint } => {
                write!(f, "endpoint {endpoint}: more than one MSI region")
            }
            Self::ZeroCap(name) => write!(f, "cap {name} must not be 0"),
            Self::InvalidQueueSize(s) => write!(f, "queue size {s} not a power of two <= 32768"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Builder for [`DeviceConfig`].
///
/// Defaults (close to what QEMU 10.0's `virtio-iommu-pci` presents on `-M virt`, as observed):
/// - offered features: `INPUT_RANGE`, `DOMAIN_RANGE`, `MAP_UNMAP`, `PROBE`, `MMIO`,
///   `BYPASS_CONFIG`, `RING_INDIRECT_DESC`, and always `VERSION_1`; not the legacy `BYPASS` (D2);
/// - `page_size_mask` `0xffff_ffff_ffff_f000` (4 KiB granule);
/// - `input_range` `0..=0xffff_ffff_ffff` (48-bit IOVAs);
/// - `domain_range` `0..=u32::MAX`, with [`Caps::max_domains`] 1024 live domains;
/// - `probe_size` 512 bytes;
/// - boot `bypass` **0**: unattached endpoints cannot DMA until the driver sets `bypass` or
///   attaches them (QEMU boots with 1; this model picks the closed default, D9);
/// - no endpoint; [`Caps::default`]; queues of 256 descriptors.
#[derive(Clone, Debug)]
pub struct DeviceConfigBuilder {
    offered: Features,
    page_size_mask: u64,
    input_range: (u64, u64),
    domain_range: (u32, u32),
    probe_size: u32,
    boot_bypass: bool,
    endpoints: BTreeMap<u32, Vec<ResvRegion>>,
    resv: Vec<(u32, ResvRegion)>,
    caps: Caps,
    queue_size: u16,
    fault_plan: FaultPlan,
    driver_checker: bool,
}

impl Default for DeviceConfigBuilder {
    fn default() -> Self {
        Self {
            offered: Features::INPUT_RANGE
                | Features::DOMAIN_RANGE
                | Features::MAP_UNMAP
                | Features::PROBE
                | Features::MMIO
                | Features::BYPASS_CONFIG
                | Features::RING_INDIRECT_DESC,
            page_size_mask: 0xffff_ffff_ffff_f000,
            input_range: (0, (1 << 48) - 1),
            domain_range: (0, u32::MAX),
            probe_size: 512,
            boot_bypass: false,
            endpoints: BTreeMap::new(),
            resv: Vec::new(),
            caps: Caps::default(),
            queue_size: 256,
            fault_plan: FaultPlan::default(),
            driver_checker: false,
        }
    }
}

impl DeviceConfigBuilder {
    /// Offers (`on = true`) or withdraws the given feature bits. `VERSION_1` is offered
    /// whatever is asked. Bits outside [`SUPPORTED_FEATURES`] make `build` fail.
    pub fn feature(mut self, features: Features, on: bool) -> Self {
        self.offered.set(features, on);
        self
    }

    /// Replaces the whole offered feature set (`VERSION_1` is added by `build`).
    pub fn features(mut self, features: Features) -> Self {
        self.offered = features;
        self
    }

    /// Sets `page_size_mask` (bit n: 2^n-byte pages); must not be 0 (D3).
    pub fn page_size_mask(mut self, mask: u64) -> Self {
        self.page_size_mask = mask;
        self
    }

    /// Sets `input_range` to `start..=end` (inclusive IOVAs).
    pub fn input_range(mut self, start: u64, end: u64) -> Self {
        self.input_range = (start, end);
        self
    }

    /// Sets `domain_range` to `start..=end` (inclusive domain IDs).
    pub fn domain_range(mut self, start: u32, end: u32) -> Self {
        self.domain_range = (start, end);
        self
    }

    /// Sets `probe_size` in bytes (at most [`MAX_PROBE_SIZE`]).
    pub fn probe_size(mut self, bytes: u32) -> Self {
        self.probe_size = bytes;
        self
    }

    /// Sets the boot value of `bypass` (D4/D5: a bool, so only 0 or 1 can be presented).
    pub fn boot_bypass(mut self, bypass: bool) -> Self {
        self.boot_bypass = bypass;
        self
    }

    /// Declares an endpoint ID managed by the device (ATTACH/DETACH/PROBE of any other ID get
    /// `S_NOENT`).
    pub fn endpoint(mut self, endpoint: u32) -> Self {
        self.endpoints.entry(endpoint).or_default();
        self
    }

    /// Declares several endpoint IDs.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = u32>) -> Self {
        for e in endpoints {
            self.endpoints.entry(e).or_default();
        }
        self
    }

    /// Adds a reserved region for a declared endpoint, reported by PROBE and enforced by MAP
    /// (D44) and translation.
    pub fn resv_region(mut self, endpoint: u32, region: ResvRegion) -> Self {
        self.resv.push((endpoint, region));
        self
    }

    /// Replaces all caps.
    pub fn caps(mut self, caps: Caps) -> Self {
        self.caps = caps;
        self
    }

    /// Sets [`Caps::max_domains`].
    pub fn max_domains(mut self, n: usize) -> Self {
        self.caps.max_domains = n;
        self
    }

    /// Sets [`Caps::max_mappings`].
    pub fn max_mappings(mut self, n: usize) -> Self {
        self.caps.max_mappings = n;
        self
    }

    /// Sets [`Caps::max_requests_per_notify`].
    pub fn max_requests_per_notify(mut self, n: usize) -> Self {
        self.caps.max_requests_per_notify = n;
        self
    }

    /// Sets [`Caps::max_pending_faults`].
    pub fn max_pending_faults(mut self, n: usize) -> Self {
        self.caps.max_pending_faults = n;
        self
    }

    /// Sets the maximum size of each virtqueue (a power of two, at most 32768).
    pub fn queue_size(mut self, size: u16) -> Self {
        self.queue_size = size;
        self
    }

    /// Makes the device misbehave as `plan` says (fault injection, to test drivers; see
    /// [`crate::fault`] for every misbehaviour and what a correct driver must do). The default
    /// is an empty plan: a well-behaved device. Not validated against the rest of the
    /// configuration: a plan may well break the device's own guarantees, that is its purpose.
    pub fn fault_injection(mut self, plan: FaultPlan) -> Self {
        self.fault_plan = plan;
        self
    }

    /// Turns the driver checker on or off (default off): the device then records every driver
    /// requirement (R1..R36 of the "Statement index" in `CONFORMANCE.md`, and a few virtio
    /// core rules) that the driver breaks, for [`crate::IommuDevice::checker_report`]. It only
    /// records: the device answers every request exactly as with the checker off. See
    /// [`crate::checker`].
    pub fn driver_checker(mut self, on: bool) -> Self {
        self.driver_checker = on;
        self
    }

    /// Validates and returns the configuration.
    ///
    /// # Errors
    ///
    /// Every [`ConfigError`] variant, one check each: D3 (`page_size_mask != 0`), D2
    /// (not both bypass features), D42 (one MSI region per endpoint), D43 (no overlapping
    /// regions), inverted ranges, properties that do not fit `probe_size`, zero caps, invalid
    /// queue size, unsupported features.
    pub fn build(self) -> Result<DeviceConfig, ConfigError> {
        let offered = self.offered | Features::VERSION_1;
        let unsupported = offered - SUPPORTED_FEATURES;
        if !unsupported.is_empty() {
            return Err(ConfigError::UnsupportedFeatures(unsupported));
        }
        if offered.contains(Features::BYPASS | Features::BYPASS_CONFIG) {
            return Err(ConfigError::BothBypassFeatures);
        }
        if self.boot_bypass && !offered.contains(Features::BYPASS_CONFIG) {
            return Err(ConfigError::BypassWithoutBypassConfig);
        }
        if self.page_size_mask == 0 {
            return Err(ConfigError::PageSizeMaskZero);
        }
        if self.input_range.0 > self.input_range.1 {
            return Err(ConfigError::InputRangeInverted);
        }
        if self.domain_range.0 > self.domain_range.1 {
            return Err(ConfigError::DomainRangeInverted);
        }
        if self.probe_size > MAX_PROBE_SIZE {
            return Err(ConfigError::ProbeSizeTooLarge(self.probe_size));
        }
        let caps = self.caps;
        for (name, v) in [
            ("max_domains", caps.max_domains),
            ("max_mappings", caps.max_mappings),
            ("max_requests_per_notify", caps.max_requests_per_notify),
            ("max_pending_faults", caps.max_pending_faults),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroCap(name));
            }
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(ConfigError::InvalidQueueSize(self.queue_size));
        }
        let mut endpoints = self.endpoints;
        for (endpoint, region) in self.resv {
            if region.start > region.end {
                return Err(ConfigError::ResvInverted { endpoint, region });
            }
            endpoints
                .get_mut(&endpoint)
                .ok_or(ConfigError::UnknownEndpoint(endpoint))?
                .push(region);
        }
        for (&endpoint, regions) in endpoints.iter_mut() {
            regions.sort_by_key(|r| r.start);
            if regions.windows(2).any(|w| w[0].end >= w[1].start) {
                return Err(ConfigError::ResvOverlap { endpoint });
            }
            if regions.iter().filter(|r| r.kind == ResvKind::Msi).count() > 1 {
                return Err(ConfigError::MultipleMsi { endpoint });
            }
            let needed = regions.len() as u64 * u64::from(RESV_MEM_PROPERTY_SIZE);
            if offered.contains(Features::PROBE) && needed > u64::from(self.probe_size) {
                return Err(ConfigError::ProbeSizeTooSmall { endpoint, needed });
            }
        }
        Ok(DeviceConfig {
            offered,
            page_size_mask: self.page_size_mask,
            input_range: self.input_range,
            domain_range: self.domain_range,
            probe_size: self.probe_size,
            boot_bypass: self.boot_bypass,
            endpoints,
            caps,
            queue_size: self.queue_size,
            fault_plan: self.fault_plan,
            driver_checker: self.driver_checker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_qemu_like() {
        let c = DeviceConfig::builder().endpoint(8).build().unwrap();
        assert_eq!(c.granule(), 4096);
        assert_eq!(c.input_range(), (0, 0xffff_ffff_ffff));
        assert_eq!(c.probe_size(), 512);
        assert!(c
            .offered()
            .contains(Features::VERSION_1 | Features::MAP_UNMAP));
        assert!(!c.offered().contains(Features::BYPASS));
        assert_eq!(DeviceConfig::default().granule(), 4096);
    }

    #[test]
    fn validation_rejects_each_bad_field() {
        let b = || DeviceConfig::builder().endpoint(1);
        assert_eq!(
            b().page_size_mask(0).build(),
            Err(ConfigError::PageSizeMaskZero)
        );
        assert_eq!(
            b().input_range(5, 4).build(),
            Err(ConfigError::InputRangeInverted)
        );
        assert_eq!(
            b().domain_range(5, 4).build(),
            Err(ConfigError::DomainRangeInverted)
        );
        assert_eq!(
            b().feature(Features::BYPASS, true).build(),
            Err(ConfigError::BothBypassFeatures)
        );
        assert_eq!(
            b().feature(Features::BYPASS_CONFIG, false)
                .boot_bypass(true)
                .build(),
            Err(ConfigError::BypassWithoutBypassConfig)
        );
        assert!(matches!(
            b().feature(Features::RING_EVENT_IDX, true).build(),
            Err(ConfigError::UnsupportedFeatures(_))
        ));
        assert_eq!(
            b().resv_region(2, ResvRegion::msi(0, 1)).build(),
            Err(ConfigError::UnknownEndpoint(2))
        );
        assert!(matches!(
            b().resv_region(1, ResvRegion::msi(9, 1)).build(),
            Err(ConfigError::ResvInverted { .. })
        ));
        assert_eq!(
            b().resv_region(1, ResvRegion::msi(0, 0xfff))
                .resv_region(1, ResvRegion::reserved(0xfff, 0x1fff))
                .build(),
            Err(ConfigError::ResvOverlap { endpoint: 1 })
        );
        assert_eq!(
            b().resv_region(1, ResvRegion::msi(0, 0xfff))
                .resv_region(1, ResvRegion::msi(0x1000, 0x1fff))
                .build(),
            Err(ConfigError::MultipleMsi { endpoint: 1 })
        );
        assert_eq!(
            b().probe_size(23)
                .resv_region(1, ResvRegion::msi(0, 0xfff))
                .build(),
            Err(ConfigError::ProbeSizeTooSmall {
                endpoint: 1,
                needed: 24
            })
        );
        assert_eq!(
            b().max_mappings(0).build(),
            Err(ConfigError::ZeroCap("max_mappings"))
        );
        // A cap of 0 chains per round would strand every request.
        assert_eq!(
            b().max_requests_per_notify(0).build(),
            Err(ConfigError::ZeroCap("max_requests_per_notify"))
        );
        assert_eq!(
            b().queue_size(3).build(),
            Err(ConfigError::InvalidQueueSize(3))
        );
        assert_eq!(
            b().probe_size(MAX_PROBE_SIZE + 1).build(),
            Err(ConfigError::ProbeSizeTooLarge(MAX_PROBE_SIZE + 1))
        );
    }

    #[test]
    fn effective_ranges_follow_the_offered_features() {
        let c = DeviceConfig::builder()
            .feature(Features::INPUT_RANGE | Features::DOMAIN_RANGE, false)
            .domain_range(4, 5)
            .build()
            .unwrap();
        assert_eq!(c.effective_input_range(), (0, u64::MAX));
        assert_eq!(c.effective_domain_range(), (0, u32::MAX));
        assert_eq!(c.domain_range(), (4, 5));
    }

    #[test]
    fn regions_are_sorted() {
        let c = DeviceConfig::builder()
            .endpoint(3)
            .resv_region(3, ResvRegion::reserved(0x9000, 0x9fff))
            .resv_region(3, ResvRegion::msi(0x1000, 0x1fff))
            .build()
            .unwrap();
        let r = c.resv_regions(3).unwrap();
        assert_eq!(r[0].start, 0x1000);
        assert_eq!(r[1].start, 0x9000);
        assert!(c.resv_regions(4).is_none());
    }
}
