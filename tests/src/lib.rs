//! `virtio-iommu-conformance`: one suite of cases, each traced to a statement of virtio v1.3
//! §5.13 (numbered D1..D50 / R1..R36 as in the "Statement index" of `CONFORMANCE.md`), run
//! unchanged against any virtio-iommu reachable through a [`Harness`]:
//!
//! - QEMU's device, from the bare-metal firmware under QEMU (`firmware/src/cases/conformance.rs`);
//! - our device model (`virtio-iommu-device`), in-process (`tests/tests/our_device.rs`).
//!
//! The harness drives the device with the project's driver (`virtio-iommu-driver`), lets a DMA
//! endpoint read and write IOVAs, collects fault events, and — where the backend can — sends raw
//! requests split over descriptors. A case never adapts its assertion to a backend: a backend
//! that departs from the statement gets [`Outcome::Diverges`] with what it did.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

mod cases;

use alloc::string::String;
use alloc::vec::Vec;
use virtio_iommu_driver::wire::{Config, Features};
use virtio_iommu_driver::{FaultEvent, IommuConfig, IommuError, ProbeProperty};

pub use cases::CASES;

/// What a backend can do to the IOMMU and to one DMA endpoint behind it.
///
/// DMA follows the model of QEMU's `edu`: the endpoint has an internal buffer of
/// [`DMA_BUFFER_SIZE`] bytes; [`Harness::dma_in`] copies from an IOVA into it, and
/// [`Harness::dma_out`] copies from it to an IOVA. Neither reports success: cases observe memory
/// and fault events, the way a driver does.
pub trait Harness {
    /// Negotiated features.
    fn features(&self) -> Features;
    /// Features the device offered.
    fn offered(&self) -> Features;
    /// Configuration as read at initialisation.
    fn config(&self) -> IommuConfig;
    /// ATTACH (§5.13.6.3) through the driver.
    fn attach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError>;
    /// ATTACH with `ATTACH_F_BYPASS` through the driver.
    fn attach_bypass(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError>;
    /// DETACH (§5.13.6.4) through the driver.
    fn detach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError>;
    /// MAP `virt_start..=virt_end` (inclusive IOVAs) to `phys_start` (§5.13.6.5).
    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Result<(), IommuError>;
    /// UNMAP `virt_start..=virt_end` (inclusive IOVAs) (§5.13.6.6).
    fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuError>;
    /// PROBE (§5.13.6.7): the properties in order.
    fn probe(&mut self, endpoint: u32) -> Result<Vec<ProbeProperty>, IommuError>;
    /// The configuration space as the device presents it (`VirtIOIommu::read_raw_config`),
    /// not as the driver cleaned it up.
    fn raw_config(&mut self) -> Result<Config, IommuError>;
    /// The `bypass` config field, when BYPASS_CONFIG was negotiated.
    fn bypass(&mut self) -> Option<bool>;
    /// Writes `bypass` (§5.13.4).
    fn set_bypass(&mut self, on: bool) -> Result<(), IommuError>;
    /// Sends a raw request: one descriptor per `readable` part, one device-writable descriptor
    /// per `writable_lens` entry, posted filled with [`virtio_iommu_driver::WRITABLE_FILL`]
    /// (0xff) as `VirtIOIommu::request_raw` does, so the cases can tell a byte the device did
    /// not write from a 0 it wrote. `None` when the backend cannot craft raw requests.
    fn raw(
        &mut self,
        readable: &[&[u8]],
        writable_lens: &[usize],
    ) -> Option<Result<RawReply, IommuError>>;
    /// Fault reports received since the last call (the event queue drained).
    fn faults(&mut self) -> Result<Vec<FaultEvent>, IommuError>;
    /// Event reports the driver ignored so far because they broke a rule (reserved bytes set,
    /// short used length).
    fn ignored_events(&mut self) -> u64;
    /// Endpoint IDs to use.
    fn endpoints(&self) -> Endpoints;
    /// Allocates a zeroed, granule-aligned region of `granules` × `granule` bytes of
    /// physically contiguous guest RAM that stays valid for the whole run; returns the
    /// guest-physical address of its first byte. `None` when out of memory.
    fn alloc_pages(&mut self, granules: u64) -> Option<u64>;
    /// [`Harness::alloc_pages`] of one granule.
    fn alloc_page(&mut self) -> Option<u64> {
        self.alloc_pages(1)
    }
    /// Writes guest RAM at `phys` (CPU access, not DMA).
    fn write_phys(&mut self, phys: u64, data: &[u8]);
    /// Reads `len` bytes of guest RAM at `phys` (CPU access).
    fn read_phys(&mut self, phys: u64, len: usize) -> Vec<u8>;
    /// The DMA endpoint reads `len` bytes at `iova` into its buffer.
    fn dma_in(&mut self, iova: u64, len: u64);
    /// The DMA endpoint writes the first `len` bytes of its buffer to `iova`.
    fn dma_out(&mut self, iova: u64, len: u64);
    /// Virtio reset of the device (status 0) and a fresh driver initialisation that PROBEs the
    /// endpoints again when PROBE is negotiated, as a driver does before attaching them (R5;
    /// [`probe_endpoints`]). `None` when the backend cannot reset without losing what it needs.
    fn reset(&mut self) -> Option<Result<(), IommuError>>;
    /// Whether the device has set DEVICE_NEEDS_RESET.
    fn needs_reset(&mut self) -> bool;
    /// Whether running a request of this kind is known to take the backend down (e.g. QEMU 7.2
    /// aborts on a short PROBE buffer), so the case is reported as not run.
    fn hazard(&self, hazard: Hazard) -> Option<&'static str>;
}

/// Size in bytes of the DMA endpoint's internal buffer.
pub const DMA_BUFFER_SIZE: u64 = 2048;

/// Requests that some backends do not survive.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Hazard {
    /// A PROBE whose writable part is smaller than `probe_size + 4`.
    ShortProbeBuffer,
    /// A request without a device-writable part, or with fewer than 4 readable bytes.
    NoTail,
}

/// The endpoints a backend provides.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    /// The DMA-capable endpoint used by [`Harness::dma_in`] / [`Harness::dma_out`].
    pub dma: u32,
    /// Another existing endpoint that may be attached and detached freely (no DMA needed).
    pub other: Option<u32>,
    /// An endpoint ID the device does not know.
    pub absent: Option<u32>,
}

/// What came back from a raw request.
#[derive(Clone, Debug)]
pub struct RawReply {
    /// Used length written by the device, in bytes.
    pub used: u32,
    /// The device-writable bytes, all parts concatenated, as the device left them: a byte it
    /// did not write holds [`virtio_iommu_driver::WRITABLE_FILL`].
    pub writable: Vec<u8>,
}

/// The result of one case on one backend.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Outcome {
    /// The backend does what the statement says.
    Pass,
    /// The backend departs from the statement; the string says what it did.
    Diverges(String),
    /// The case could not run on this backend (missing feature, hazard); the string says why.
    NotRun(String),
    /// The harness or transport failed (timeout, device needs reset…).
    Error(String),
}

impl Outcome {
    /// One word: `pass`, `diverges`, `not-run`, `error`.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Diverges(_) => "diverges",
            Self::NotRun(_) => "not-run",
            Self::Error(_) => "error",
        }
    }

    /// The detail string, empty for a pass.
    pub fn detail(&self) -> &str {
        match self {
            Self::Pass => "",
            Self::Diverges(s) | Self::NotRun(s) | Self::Error(s) => s,
        }
    }
}

/// A conformance case.
pub struct Case {
    /// Stable identifier, e.g. `unmap-split`.
    pub id: &'static str,
    /// The statement checked: number and a few words, e.g. `D31 UNMAP split: S_RANGE, nothing
    /// removed`.
    pub statement: &'static str,
    /// The driver statements the case breaks on purpose to see what the device does, as
    /// our device's driver checker names them (`"R6"`, `"I1"`, …; see
    /// `virtio_iommu_device::Statement`): a checker that records one of these during the case
    /// is expected, any other one is a driver bug of the harness. Empty for most cases.
    pub violates: &'static [&'static str],
    /// The case body.
    pub run: fn(&mut dyn Harness, &mut Ctx) -> Result<(), Fail>,
}

/// Why a case did not pass.
#[derive(Clone, Debug)]
pub enum Fail {
    /// See [`Outcome::Diverges`].
    Diverges(String),
    /// See [`Outcome::NotRun`].
    NotRun(String),
    /// See [`Outcome::Error`].
    Error(String),
}

impl From<IommuError> for Fail {
    fn from(e: IommuError) -> Self {
        Fail::Error(alloc::format!("{e}"))
    }
}

/// State shared by the cases of one run: fresh domain IDs (never reused, since a device may
/// keep domains across reset) and IOVAs.
pub struct Ctx {
    next_domain: u64,
    domain_end: u64,
    next_iova: u64,
    next_seed: u8,
    /// Granule in bytes.
    pub granule: u64,
}

impl Ctx {
    /// A context for a device with this configuration.
    pub fn new(config: &IommuConfig) -> Self {
        let (start, end) = config.domain_range;
        Self {
            next_domain: u64::from(start),
            domain_end: u64::from(end),
            // IOVAs from 16 granules up: clear of 0, far below any input_range end in practice.
            next_iova: config
                .input_range
                .0
                .max(config.granule * 16)
                .next_multiple_of(config.granule),
            next_seed: 0,
            granule: config.granule,
        }
    }

    /// A data pattern seed not used by the previous 255 calls, so data found in the
    /// endpoint's buffer or in memory is known to come from this access and not from an
    /// earlier one (a failed DMA read may leave the buffer as it was).
    pub fn seed(&mut self) -> u8 {
        self.next_seed = self.next_seed.wrapping_add(1);
        self.next_seed
    }

    /// A domain ID never used before in this run.
    pub fn domain(&mut self) -> Result<u32, Fail> {
        if self.next_domain > self.domain_end {
            return Err(Fail::NotRun("domain_range exhausted".into()));
        }
        let d = self.next_domain as u32;
        self.next_domain += 1;
        Ok(d)
    }

    /// `granules` fresh granule-aligned IOVA granules; returns the first IOVA. Each call gets
    /// new addresses, with a one-granule gap after, so ranges of different cases never touch.
    pub fn iova(&mut self, granules: u64) -> u64 {
        let v = self.next_iova;
        self.next_iova += (granules + 1) * self.granule;
        v
    }
}

/// PROBEs every endpoint of [`Harness::endpoints`] that exists ([`Endpoints::dma`],
/// [`Endpoints::other`]) when PROBE is negotiated, as a driver does before attaching one
/// (R5: "SHOULD send PROBE for each endpoint before attaching it"); nothing otherwise.
/// Harnesses call it after initialising the driver, including in [`Harness::reset`]: a reset
/// forgets what was probed.
///
/// # Errors
///
/// The first PROBE's error.
pub fn probe_endpoints(h: &mut dyn Harness) -> Result<(), IommuError> {
    if !h.features().contains(Features::PROBE) {
        return Ok(());
    }
    let e = h.endpoints();
    for ep in core::iter::once(e.dma).chain(e.other.filter(|&o| o != e.dma)) {
        h.probe(ep)?;
    }
    Ok(())
}

/// Runs one case against `h` with the run's context `ctx`: drains the event queue first, and
/// resets the device afterwards if the case left it needing a reset (saying so in the outcome
/// when that reset fails).
pub fn run_case(h: &mut dyn Harness, ctx: &mut Ctx, case: &Case) -> Outcome {
    // Start each case with an empty event queue.
    let _ = h.faults();
    let outcome = match (case.run)(h, ctx) {
        Ok(()) => Outcome::Pass,
        Err(Fail::Diverges(s)) => Outcome::Diverges(s),
        Err(Fail::NotRun(s)) => Outcome::NotRun(s),
        Err(Fail::Error(s)) => Outcome::Error(s),
    };
    // A case may leave the device needing a reset (e.g. a malformed request): recover so
    // the following cases run, and say so in the outcome.
    if h.needs_reset() {
        match h.reset() {
            Some(Ok(())) => outcome,
            _ => Outcome::Error(alloc::format!(
                "{} (device needs reset, reset failed)",
                outcome.detail()
            )),
        }
    } else {
        outcome
    }
}

/// Runs every case in [`CASES`] order against `h` ([`run_case`] with one shared [`Ctx`]),
/// calling `report` with each outcome.
pub fn run_all(h: &mut dyn Harness, mut report: impl FnMut(&Case, &Outcome)) -> Summary {
    let mut ctx = Ctx::new(&h.config());
    let mut summary = Summary::default();
    for case in CASES {
        let outcome = run_case(h, &mut ctx, case);
        match outcome {
            Outcome::Pass => summary.pass += 1,
            Outcome::Diverges(_) => summary.diverges += 1,
            Outcome::NotRun(_) => summary.not_run += 1,
            Outcome::Error(_) => summary.error += 1,
        }
        report(case, &outcome);
    }
    summary
}

/// Counts per outcome.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Summary {
    /// Passed.
    pub pass: u32,
    /// Diverged from the statement.
    pub diverges: u32,
    /// Not run.
    pub not_run: u32,
    /// Harness errors.
    pub error: u32,
}

/// Formats one result line, as the firmware prints it and the table generator parses it:
/// `conformance: <id> <word>[: <detail>]`.
pub fn result_line(case: &Case, outcome: &Outcome) -> String {
    let mut s = alloc::format!("conformance: {} {}", case.id, outcome.word());
    if !outcome.detail().is_empty() {
        s.push_str(": ");
        // One line: details never carry newlines.
        s.extend(
            outcome
                .detail()
                .chars()
                .map(|c| if c == '\n' { ' ' } else { c }),
        );
    }
    s
}
