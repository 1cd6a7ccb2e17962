//! The driver checker: a strict mode of the device that records every driver requirement a
//! driver breaks, as far as a device can observe it. Turn it on with
//! [`crate::DeviceConfigBuilder::driver_checker`]; read it with
//! [`crate::IommuDevice::checker_report`].
//!
//! The checker only records: with it on, the device answers every request, config access and
//! event buffer exactly as with it off (a checker that changed the answers would hide what a
//! real device does). Memory is bounded: one [`Violation`] per [`Statement`] (a count and the
//! first offender, at most [`MAX_RECORDED_BYTES`] bytes of it), plus the set of endpoints
//! probed since the last reset (only endpoints the configuration has).
//!
//! # What is checked
//!
//! Statement numbers R1..R36 are the driver requirements of virtio v1.3 §5.13 as the project
//! numbers them, each listed with its section in the "Statement index" of `CONFORMANCE.md`.
//! Each request is checked against the device state *before* it runs.
//!
//! | statement | observed when |
//! |---|---|
//! | R1 | FEATURES_OK written without accepting an offered INPUT_RANGE, DOMAIN_RANGE or PROBE |
//! | R2 | a config write other than one byte at `bypass`, or to `bypass` without BYPASS_CONFIG negotiated |
//! | R3 | a value other than 0 or 1 written to `bypass` |
//! | R5 | ATTACH of an endpoint not probed since reset, PROBE negotiated |
//! | R6 | `req_head.reserved` not zero |
//! | R8 | MAP/UNMAP range outside `input_range`, INPUT_RANGE negotiated |
//! | R9 | ATTACH/DETACH/MAP/UNMAP `domain` outside `domain_range`, DOMAIN_RANGE negotiated |
//! | R10 | ATTACH `reserved` not zero |
//! | R12 | ATTACH_F_BYPASS without BYPASS_CONFIG negotiated, or not matching an existing domain |
//! | R13 | DETACH `reserved` not zero |
//! | R14 | MAP `flags` with undefined bits |
//! | R15 | MAP on a bypass domain |
//! | R16 | MAP with `virt_end <= virt_start` |
//! | R19 | MAP_F_MMIO without F_MMIO negotiated |
//! | R20 | UNMAP `reserved` not zero |
//! | R21 | UNMAP whose range covers no mapping of an existing, translated domain |
//! | R22 | UNMAP whose first or last address falls inside a mapping without being its edge |
//! | R23 | UNMAP on a bypass domain |
//! | R24 | PROBE whose `properties` are not exactly `probe_size` bytes |
//! | R25 | PROBE `reserved` not zero |
//! | R30 | MAP overlapping a RESV_MEM region (RESERVED or MSI) of an endpoint of the domain |
//! | V1 | virtio §3.1.1: a queue notification before DRIVER_OK ("the driver MUST NOT send any buffer available notifications to the device before setting DRIVER_OK") |
//! | V2 | virtio §2.7: a malformed chain (device-readable descriptor after a device-writable one, longer than the queue, cut short, outside memory) |
//! | I1 | §5.13.6: a request not shaped as its type defines (undefined type, readable part not the request's size, writable part not the 4-byte tail, undefined ATTACH flags, inverted UNMAP range) |
//! | I2 | §5.13.6: a request of a feature not negotiated (MAP/UNMAP without MAP_UNMAP, PROBE without PROBE) |
//! | I3 | §5.13.6 `page_size_mask` granule: MAP `virt_start`, `phys_start` or `virt_end + 1`, UNMAP `virt_start` or `virt_end + 1`, not aligned to the granule (the driver side of D22) |
//! | I4 | §5.13.6.9: an eventq buffer that cannot hold a 24-byte fault report (or has device-readable descriptors) |
//!
//! MAP/UNMAP without MAP_UNMAP negotiated is I2, not R4: R4 forbids *negotiating* MAP_UNMAP
//! when the driver cannot send MAP/UNMAP, which no device can tell.
//!
//! # What is not checked, and why
//!
//! - R4: whether the driver *can* send MAP/UNMAP is the driver's intent.
//! - R7, R26..R29, R31..R36: how the driver treats what the device wrote (used length 0,
//!   PROBE properties, fault reports) never reaches the device.
//! - R11: which endpoints are isolatable from each other is known to the platform, not to
//!   the IOMMU.
//! - R17, R18: whether a physical range holds device registers, and which accesses the
//!   driver wants to allow, is the driver's knowledge.
//! - The R3 "SHOULD ignore bits 1-7 on read" half, and R6's "MUST ignore
//!   `req_tail.reserved`": driver-side reading.
//!
//! # Output
//!
//! [`CheckerReport`]'s `Display` prints one line per broken statement, in statement order:
//! `checker: R<n> <count> <first offending request as hex> (<explanation>)`, or
//! `checker: no violations` (`checker: off` when the checker is off). [`Saw`] prints what the
//! device saw: `device saw: ATTACH a DETACH d MAP m UNMAP u PROBE p faults f`.

mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub(crate) use rules::{check_config_write, check_event_buffer, check_features_ok, check_request};

/// At most this many bytes of an offending request are recorded (PROBE's readable part, the
/// longest, is 72 bytes).
pub const MAX_RECORDED_BYTES: usize = 80;

/// A statement the checker can find broken: a numbered driver requirement (R1..R36), or a
/// rule of virtio core or §5.13 that is not one of them (see the module documentation).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub enum Statement {
    /// Driver requirement R`n` (1..=36; the "Statement index" of `CONFORMANCE.md`).
    R(u8),
    /// V1: a queue notification before DRIVER_OK (virtio §3.1.1).
    NotifyBeforeDriverOk,
    /// V2: a malformed descriptor chain (virtio §2.7).
    MalformedChain,
    /// I1: a request not shaped as its type defines (§5.13.6).
    RequestShape,
    /// I2: a request of a feature not negotiated (§5.13.6).
    FeatureNotNegotiated,
    /// I3: MAP/UNMAP addresses not aligned to the granule (§5.13.6, D22).
    Unaligned,
    /// I4: an eventq buffer that cannot hold a fault report (§5.13.6.9).
    ShortEventBuffer,
}

impl Statement {
    /// Every statement the checker records, in report order.
    pub const CHECKED: &'static [Statement] = &[
        Self::R(1),
        Self::R(2),
        Self::R(3),
        Self::R(5),
        Self::R(6),
        Self::R(8),
        Self::R(9),
        Self::R(10),
        Self::R(12),
        Self::R(13),
        Self::R(14),
        Self::R(15),
        Self::R(16),
        Self::R(19),
        Self::R(20),
        Self::R(21),
        Self::R(22),
        Self::R(23),
        Self::R(24),
        Self::R(25),
        Self::R(30),
        Self::NotifyBeforeDriverOk,
        Self::MalformedChain,
        Self::RequestShape,
        Self::FeatureNotNegotiated,
        Self::Unaligned,
        Self::ShortEventBuffer,
    ];

    /// The statement in a few words (the spec's wording, condensed); empty for an
    /// R number the checker does not record.
    pub fn summary(self) -> &'static str {
        match self {
            Self::R(1) => "SHOULD accept INPUT_RANGE, DOMAIN_RANGE, PROBE if offered",
            Self::R(2) => "MAY write bypass only with BYPASS_CONFIG; MUST NOT write other config fields",
            Self::R(3) => "MUST NOT write a bypass value other than 0 or 1",
            Self::R(5) => "SHOULD PROBE each endpoint before attaching it (PROBE negotiated)",
            Self::R(6) => "SHOULD zero req_head.reserved",
            Self::R(8) => "MUST NOT send virt_start/virt_end outside input_range (INPUT_RANGE negotiated)",
            Self::R(9) => "MUST NOT send a domain outside domain_range (DOMAIN_RANGE negotiated)",
            Self::R(10) => "ATTACH: SHOULD zero reserved",
            Self::R(12) => "ATTACH: set ATTACH_F_BYPASS iff the existing domain is a bypass domain (needs BYPASS_CONFIG)",
            Self::R(13) => "DETACH: SHOULD zero reserved",
            Self::R(14) => "MAP: SHOULD zero undefined flags",
            Self::R(15) => "SHOULD NOT MAP on a bypass domain",
            Self::R(16) => "MAP: virt_end MUST be strictly greater than virt_start",
            Self::R(19) => "MUST NOT use MAP_F_MMIO unless F_MMIO negotiated",
            Self::R(20) => "UNMAP: SHOULD zero reserved",
            Self::R(21) => "UNMAP: range SHOULD cover one or more contiguous mappings",
            Self::R(22) => "UNMAP: first/last address MUST be a mapping's first/last address or outside any mapping",
            Self::R(23) => "SHOULD NOT UNMAP on a bypass domain",
            Self::R(24) => "PROBE: properties MUST be exactly probe_size bytes",
            Self::R(25) => "PROBE: SHOULD zero reserved",
            Self::R(30) => "SHOULD NOT map addresses in RESERVED or MSI regions",
            Self::R(_) => "",
            Self::NotifyBeforeDriverOk => {
                "virtio 3.1.1: MUST NOT send buffer available notifications before DRIVER_OK"
            }
            Self::MalformedChain => {
                "virtio 2.7: device-writable descriptors after device-readable ones, chains within the queue size, in memory"
            }
            Self::RequestShape => {
                "5.13.6: a defined type, the request's readable size, a 4-byte writable tail, defined ATTACH flags, virt_start <= virt_end"
            }
            Self::FeatureNotNegotiated => {
                "5.13.6: MAP/UNMAP need MAP_UNMAP, PROBE needs PROBE negotiated"
            }
            Self::Unaligned => "5.13.6: MAP/UNMAP addresses aligned to the page_size_mask granule (D22)",
            Self::ShortEventBuffer => {
                "5.13.6.9: eventq buffers device-writable and large enough for a 24-byte fault report"
            }
        }
    }
}

impl fmt::Display for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::R(n) => write!(f, "R{n}"),
            Self::NotifyBeforeDriverOk => f.write_str("V1"),
            Self::MalformedChain => f.write_str("V2"),
            Self::RequestShape => f.write_str("I1"),
            Self::FeatureNotNegotiated => f.write_str("I2"),
            Self::Unaligned => f.write_str("I3"),
            Self::ShortEventBuffer => f.write_str("I4"),
        }
    }
}

/// The first offender of a statement: what the driver sent, and why it breaks the statement.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Offender {
    /// The first bytes (at most [`MAX_RECORDED_BYTES`]) of the offending request's
    /// device-readable part, or of a config write's data, or the driver features (le64) for
    /// R1; empty when nothing was sent but descriptors (V1, V2, I4).
    pub bytes: Vec<u8>,
    /// Total length in bytes of what `bytes` was cut from.
    pub len: usize,
    /// A short explanation, with the values involved.
    pub why: String,
}

/// One broken statement: how many times, and the first offender.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Violation {
    /// The statement.
    pub statement: Statement,
    /// Number of offending requests (or config writes, notifications, buffers).
    pub count: u64,
    /// The first of them.
    pub first: Offender,
}

/// What the device saw: requests answered with a status, by type, and translation faults
/// raised (issue #9 item 4). Cumulative, not reset by a device reset; counted with the
/// checker on or off.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Saw {
    /// ATTACH requests answered.
    pub attach: u64,
    /// DETACH requests answered.
    pub detach: u64,
    /// MAP requests answered.
    pub map: u64,
    /// UNMAP requests answered.
    pub unmap: u64,
    /// PROBE requests answered.
    pub probe: u64,
    /// Translation faults raised (delivered, pending or dropped).
    pub faults: u64,
}

impl fmt::Display for Saw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device saw: ATTACH {} DETACH {} MAP {} UNMAP {} PROBE {} faults {}",
            self.attach, self.detach, self.map, self.unmap, self.probe, self.faults
        )
    }
}

/// The checker's findings ([`crate::IommuDevice::checker_report`]).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct CheckerReport {
    /// Whether the checker was on; when off, `violations` is empty.
    pub enabled: bool,
    /// Broken statements, in statement order (R1..R36, then V1, V2, I1..I4).
    pub violations: Vec<Violation>,
    /// What the device saw.
    pub saw: Saw,
}

impl CheckerReport {
    /// The violation of `statement`, if it was broken.
    pub fn get(&self, statement: Statement) -> Option<&Violation> {
        self.violations.iter().find(|v| v.statement == statement)
    }

    /// Whether no statement was broken.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Hex of `bytes` in 4-byte groups (`03000000 01000000 ...`), `-` when empty, `...` appended
/// when `len` says bytes were cut.
fn hex(f: &mut fmt::Formatter<'_>, bytes: &[u8], len: usize) -> fmt::Result {
    if bytes.is_empty() {
        f.write_str("-")?;
    }
    for (i, chunk) in bytes.chunks(4).enumerate() {
        if i > 0 {
            f.write_str(" ")?;
        }
        for b in chunk {
            write!(f, "{b:02x}")?;
        }
    }
    if len > bytes.len() {
        f.write_str(" ...")?;
    }
    Ok(())
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "checker: {} {} ", self.statement, self.count)?;
        hex(f, &self.first.bytes, self.first.len)?;
        write!(f, " ({})", self.first.why)
    }
}

impl fmt::Display for CheckerReport {
    /// One line per broken statement (`checker: R<n> <count> <hex> (<why>)`), or
    /// `checker: no violations`, or `checker: off`; lines separated by `\n`, no final newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.enabled {
            return f.write_str("checker: off");
        }
        if self.violations.is_empty() {
            return f.write_str("checker: no violations");
        }
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// The checker's state inside an [`crate::IommuDevice`].
#[derive(Debug, Default)]
pub(crate) struct Checker {
    enabled: bool,
    violations: BTreeMap<Statement, Violation>,
    /// Endpoints (of the configuration) probed since the last reset, for R5.
    probed: BTreeSet<u32>,
    /// eventq available-ring position up to which buffers were checked (I4).
    pub(crate) eq_checked: u16,
}

impl Checker {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records one breach of `statement`; `bytes` are cut to [`MAX_RECORDED_BYTES`] and `why`
    /// is built only for the first.
    pub(crate) fn record(
        &mut self,
        statement: Statement,
        bytes: &[u8],
        why: impl FnOnce() -> String,
    ) {
        self.record_len(statement, bytes, bytes.len(), why);
    }

    /// As [`Self::record`], `bytes` being the first bytes of `len`.
    pub(crate) fn record_len(
        &mut self,
        statement: Statement,
        bytes: &[u8],
        len: usize,
        why: impl FnOnce() -> String,
    ) {
        if !self.enabled {
            return;
        }
        self.violations
            .entry(statement)
            .and_modify(|v| v.count = v.count.saturating_add(1))
            .or_insert_with(|| Violation {
                statement,
                count: 1,
                first: Offender {
                    bytes: bytes.get(..MAX_RECORDED_BYTES).unwrap_or(bytes).to_vec(),
                    len: len.max(bytes.len()),
                    why: why(),
                },
            });
    }

    /// Device reset: endpoints are no longer probed, eventq positions start again.
    pub(crate) fn reset(&mut self) {
        self.probed.clear();
        self.eq_checked = 0;
    }

    pub(crate) fn probed(&self, endpoint: u32) -> bool {
        self.probed.contains(&endpoint)
    }

    pub(crate) fn mark_probed(&mut self, endpoint: u32) {
        self.probed.insert(endpoint);
    }

    pub(crate) fn report(&self, saw: Saw) -> CheckerReport {
        CheckerReport {
            enabled: self.enabled,
            violations: self.violations.values().cloned().collect(),
            saw,
        }
    }
}
