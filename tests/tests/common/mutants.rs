//! Device mutants: our device seen through a harness that breaks one statement of §5.13 on
//! purpose. `suite_detects.rs` runs the suite against each one and checks that the cases about
//! the broken statement report a divergence; `table.rs` lists them in `CONFORMANCE.md` ("how we
//! know each case can fail").
//!
//! A mutant changes what the driver, the DMA endpoint or the configuration space shows, or
//! what the device does (by sending, skipping or adding requests). It never looks at which case
//! is running.

use super::{Ours, OursConfig, OTHER_EP};
use std::collections::HashMap;
use virtio_iommu_conformance::{Endpoints, Harness, Hazard, RawReply};
use virtio_iommu_driver::wire::{Config, Features, MapFlags, Status};
use virtio_iommu_driver::{
    FaultEvent, FaultReason, IommuConfig, IommuError, ProbeProperty, WRITABLE_FILL,
};

/// Request type bytes (§5.13.6).
pub const ATTACH: u8 = 1;
/// DETACH.
pub const DETACH: u8 = 2;
/// MAP.
pub const MAP: u8 = 3;
/// UNMAP.
pub const UNMAP: u8 = 4;
/// PROBE.
pub const PROBE: u8 = 5;

/// Which requests a status substitution applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Requests sent through the driver's typed calls.
    Driver,
    /// Raw requests (the tail byte of the reply is rewritten).
    Raw,
    /// Both.
    Both,
}

/// One broken behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// VERSION_1 is not negotiated.
    NoVersion1,
    /// MAP_UNMAP is not offered.
    MapUnmapNotOffered,
    /// The legacy F_BYPASS is offered.
    LegacyBypassOffered,
    /// `page_size_mask` reads 0.
    PageSizeMaskZero,
    /// `bypass` reads 2 (bits the driver masks away).
    BypassTwo,
    /// `input_range` reads start > end.
    InputRangeInverted,
    /// `domain_range` reads start > end.
    DomainRangeInverted,
    /// `probe_size` reads 4 (room for no property).
    ProbeSizeTiny,
    /// Requests of type `req` completing with `from` (any status when `None`) report `to`
    /// instead; what the device did is unchanged.
    Status {
        /// Request type byte.
        req: u8,
        /// Status replaced; `None`: any.
        from: Option<Status>,
        /// Status reported.
        to: Status,
        /// Driver calls, raw requests or both.
        path: Path,
    },
    /// `tail.reserved[0]` is written as 1.
    TailReservedSet,
    /// Raw replies report the whole writable size as used length, but no writable byte is
    /// written (they keep what the driver posted).
    RawReplyNotWritten,
    /// `tail.reserved` (3 bytes) of raw replies is not written; the status is.
    TailReservedNotWritten,
    /// The bytes of raw PROBE `properties` after the last property are not written.
    ProbePaddingNotWritten,
    /// Requests of this type with a reserved byte (head or body) set are refused with S_INVAL.
    ReservedChecked(u8),
    /// Unknown request types get S_UNSUPP with used length 4 (what QEMU does).
    UnknownTypeWritten,
    /// Only the first device-readable descriptor of a chain is read.
    SplitChainTruncated,
    /// A request whose readable part is too short is zero-padded and carried out.
    ShortRequestZeroPadded,
    /// A request whose readable part is too short is zero-padded and carried out, and returned
    /// with used length 0 (as if refused).
    ShortRequestDoneSilently,
    /// A request without room for the tail reports the writable size as used length.
    NoTailWritten,
    /// ATTACH of the second endpoint to any domain is refused with S_INVAL (not S_UNSUPP).
    OtherEndpointAttachInval,
    /// ATTACH of an endpoint attached elsewhere says S_OK and leaves it where it was.
    AttachMoveIgnored,
    /// An ATTACH refused with S_INVAL first detaches the endpoint from its domain.
    RejectedAttachDetaches,
    /// The driver's domain_range check is skipped: the ATTACH goes to the device.
    DriverSkipsDomainRange,
    /// ATTACH_F_BYPASS is ignored (the domain is a translated one).
    BypassFlagIgnored,
    /// DETACH says S_OK and does nothing.
    DetachIgnored,
    /// Only the first granule of a MAP is mapped.
    MapFirstGranuleOnly,
    /// MAP translates to `phys_start + granule`.
    MapPhysShifted,
    /// MAP ignores missing READ/WRITE flags (everything is read-write).
    MapFlagsWidened,
    /// MAP with MAP_F_MMIO is refused with S_INVAL.
    MmioFlagRefused,
    /// A MAP refused with S_INVAL removes the mappings in its range.
    MapOverlapClobbers,
    /// UNMAP says S_OK and removes nothing.
    UnmapIgnored,
    /// UNMAP covering several mappings removes only the first.
    UnmapFirstOnly,
    /// An UNMAP refused with S_RANGE still removes the mappings it covers entirely (QEMU).
    SplitUnmapRemovesCovered,
    /// The first RESV_MEM property of raw PROBE replies has `reserved[0]` = 1.
    ProbeResvReservedSet,
    /// The last byte of raw PROBE properties is 0xee.
    ProbeTrailingGarbage,
    /// PROBE returns each property twice.
    ProbeDuplicated,
    /// A PROBE with a short properties buffer gets S_DEVERR at offset 0, used length 4 (QEMU ≥ 9.1).
    ShortProbeWritesTail,
    /// PROBE is answered (S_OK) even when PROBE is not offered.
    ProbeAnswered,
    /// The endpoint's reads never happen (its buffer is unchanged).
    DmaInLost,
    /// The endpoint's writes never reach memory.
    DmaOutLost,
    /// Translation drops the offset inside the granule.
    TranslationDropsOffset,
    /// A faulting access falls back to identity (physical address = IOVA), no fault.
    IdentityOnFault,
    /// With `bypass` = 1, a faulting access of an attached endpoint falls back to identity.
    BypassOverridesDomain,
    /// Writing `bypass` stores the opposite value.
    SetBypassInverted,
    /// Fault events are never delivered.
    NoFaults,
    /// Every fault reason reads R_UNKNOWN.
    FaultReasonUnknown,
    /// Fault addresses are 1 MiB off.
    FaultAddressShifted,
    /// Fault reports carry no address.
    FaultAddressDropped,
    /// Fault reports name endpoint ID ^ 1.
    FaultEndpointWrong,
    /// Fault reports swap READ and WRITE.
    FaultRwSwapped,
    /// Fault reports have the undefined flag bit 2 set.
    FaultUndefinedFlag,
    /// Each batch of fault reports comes with one more report with `reserved` set (the driver
    /// ignores it).
    ExtraMalformedReport,
    /// A device reset keeps domains, attachments and mappings (what QEMU 10.0 does).
    ResetKeepsState,
    /// A device reset restores `bypass` to its boot value.
    ResetRestoresBootBypass,
    /// A device reset sets `bypass` to 1.
    ResetSetsBypassOne,
    /// Not a defect: a faulting read leaves the endpoint's buffer unchanged (instead of filling
    /// it). A correct device behind such an endpoint must still pass every case.
    FailedReadKeepsBuffer,
}

fn req_name(t: u8) -> &'static str {
    match t {
        ATTACH => "ATTACH",
        DETACH => "DETACH",
        MAP => "MAP",
        UNMAP => "UNMAP",
        PROBE => "PROBE",
        _ => "?",
    }
}

impl Mutation {
    /// One line: what the mutant breaks.
    pub fn describe(&self) -> String {
        use Mutation::*;
        match *self {
            Status {
                req,
                from,
                to,
                path,
            } => {
                let from = from.map_or("any status".to_string(), |s| s.name().to_string());
                let path = match path {
                    Path::Driver => "driver calls",
                    Path::Raw => "raw requests",
                    Path::Both => "all requests",
                };
                format!(
                    "{} ({path}): {from} reported as {}",
                    req_name(req),
                    to.name()
                )
            }
            ReservedChecked(t) => format!(
                "{} with a reserved byte set refused with S_INVAL",
                req_name(t)
            ),
            NoVersion1 => "VERSION_1 not negotiated".into(),
            MapUnmapNotOffered => "MAP_UNMAP not offered".into(),
            LegacyBypassOffered => "legacy F_BYPASS offered".into(),
            PageSizeMaskZero => "`page_size_mask` reads 0".into(),
            BypassTwo => "`bypass` reads 2".into(),
            InputRangeInverted => "`input_range` start > end".into(),
            DomainRangeInverted => "`domain_range` start > end".into(),
            ProbeSizeTiny => "`probe_size` reads 4".into(),
            TailReservedSet => "`tail.reserved[0]` written as 1".into(),
            RawReplyNotWritten => "raw replies: used length reported, nothing written".into(),
            TailReservedNotWritten => "raw replies: `tail.reserved` not written".into(),
            ProbePaddingNotWritten => "PROBE: bytes after the last property not written".into(),
            UnknownTypeWritten => "unknown request type: S_UNSUPP written, used length 4".into(),
            SplitChainTruncated => "only the first readable descriptor is read".into(),
            ShortRequestZeroPadded => "a too-short request is zero-padded and carried out".into(),
            ShortRequestDoneSilently => {
                "a too-short request is carried out, returned with used length 0".into()
            }
            NoTailWritten => "no room for the tail: used length = writable size".into(),
            OtherEndpointAttachInval => "ATTACH of the second endpoint: S_INVAL".into(),
            AttachMoveIgnored => "ATTACH of an attached endpoint: S_OK, not moved".into(),
            RejectedAttachDetaches => "a rejected ATTACH detaches the endpoint".into(),
            DriverSkipsDomainRange => "the driver sends domains outside domain_range".into(),
            BypassFlagIgnored => "ATTACH_F_BYPASS ignored".into(),
            DetachIgnored => "DETACH: S_OK, nothing done".into(),
            MapFirstGranuleOnly => "MAP maps its first granule only".into(),
            MapPhysShifted => "MAP translates to phys_start + granule".into(),
            MapFlagsWidened => "MAP permissions ignored (read-write)".into(),
            MmioFlagRefused => "MAP_F_MMIO refused with S_INVAL".into(),
            MapOverlapClobbers => "a refused MAP removes the mappings in its range".into(),
            UnmapIgnored => "UNMAP: S_OK, nothing removed".into(),
            UnmapFirstOnly => "UNMAP removes only the first mapping it covers".into(),
            SplitUnmapRemovesCovered => {
                "UNMAP refused with S_RANGE still removes covered mappings".into()
            }
            ProbeResvReservedSet => "RESV_MEM `reserved` set in PROBE replies".into(),
            ProbeTrailingGarbage => "non-zero byte after the PROBE properties".into(),
            ProbeDuplicated => "PROBE returns every property twice".into(),
            ShortProbeWritesTail => "short PROBE buffer: S_DEVERR at offset 0, used 4".into(),
            ProbeAnswered => "PROBE answered although not offered".into(),
            DmaInLost => "endpoint reads never happen".into(),
            DmaOutLost => "endpoint writes never reach memory".into(),
            TranslationDropsOffset => "translation drops the offset in the granule".into(),
            IdentityOnFault => "a faulting access falls back to identity".into(),
            BypassOverridesDomain => {
                "bypass=1 lets attached endpoints fall back to identity".into()
            }
            SetBypassInverted => "writing `bypass` stores the opposite".into(),
            NoFaults => "fault events never delivered".into(),
            FaultReasonUnknown => "every fault reason is R_UNKNOWN".into(),
            FaultAddressShifted => "fault address 1 MiB off".into(),
            FaultAddressDropped => "fault reports without address".into(),
            FaultEndpointWrong => "fault reports name the wrong endpoint".into(),
            FaultRwSwapped => "fault flags READ/WRITE swapped".into(),
            FaultUndefinedFlag => "fault flags with undefined bit 2 set".into(),
            ExtraMalformedReport => "an extra fault report with `reserved` set".into(),
            ResetKeepsState => "device reset keeps domains, attachments and mappings".into(),
            ResetRestoresBootBypass => "device reset restores `bypass` to its boot value".into(),
            ResetSetsBypassOne => "device reset sets `bypass` to 1".into(),
            FailedReadKeepsBuffer => "(benign) a faulting read leaves the buffer as it was".into(),
        }
    }
}

/// A mutant and the cases that must diverge under it.
pub struct Expect {
    /// The mutation.
    pub m: Mutation,
    /// Our device's configuration it wraps.
    pub config: OursConfig,
    /// Cases that must report a divergence.
    pub cases: &'static [&'static str],
}

const fn st(req: u8, from: Option<Status>, to: Status, path: Path) -> Mutation {
    Mutation::Status {
        req,
        from,
        to,
        path,
    }
}

const fn full(m: Mutation, cases: &'static [&'static str]) -> Expect {
    Expect {
        m,
        config: OursConfig::Full,
        cases,
    }
}

/// Every mutant with the cases that must diverge under it. Together they name every case.
pub static MUTANTS: &[Expect] = &[
    full(Mutation::NoVersion1, &["feat-version-1"]),
    full(Mutation::MapUnmapNotOffered, &["feat-map-unmap"]),
    full(Mutation::LegacyBypassOffered, &["feat-no-legacy-bypass"]),
    full(Mutation::PageSizeMaskZero, &["cfg-page-size-mask"]),
    full(Mutation::BypassTwo, &["cfg-bypass-value"]),
    full(Mutation::InputRangeInverted, &["cfg-input-range"]),
    full(Mutation::DomainRangeInverted, &["cfg-domain-range"]),
    full(Mutation::ProbeSizeTiny, &["cfg-probe-size"]),
    full(
        st(ATTACH, Some(Status::Ok), Status::DevErr, Path::Raw),
        &["req-ok-status", "req-tail-reserved", "req-head-reserved"],
    ),
    full(Mutation::TailReservedSet, &["req-tail-reserved"]),
    full(
        Mutation::RawReplyNotWritten,
        &[
            "req-ok-status",
            "req-tail-reserved",
            "req-head-reserved",
            "req-split-descriptors",
            "attach-reserved",
            "attach-unknown-flag",
            "detach-reserved",
            "map-unaligned-virt-start",
            "map-unaligned-phys",
            "map-unaligned-end",
            "map-unknown-flag",
            "map-outside-input-range",
            "map-inverted",
            "map-u64-max",
            "unmap-reserved",
            "probe-ok",
            "probe-reserved-ignored",
            "probe-properties-well-formed",
            "probe-zero-fill",
            "bypass-attach-flag-unknown-domain",
        ],
    ),
    full(Mutation::TailReservedNotWritten, &["req-tail-reserved"]),
    full(Mutation::ReservedChecked(ATTACH), &["req-head-reserved"]),
    full(
        Mutation::UnknownTypeWritten,
        &["req-unknown-type", "req-type-zero"],
    ),
    full(Mutation::SplitChainTruncated, &["req-split-descriptors"]),
    full(Mutation::ShortRequestZeroPadded, &["req-short-readable"]),
    full(Mutation::ShortRequestDoneSilently, &["req-short-readable"]),
    full(Mutation::NoTailWritten, &["req-no-tail"]),
    full(
        st(ATTACH, Some(Status::Ok), Status::Unsupp, Path::Driver),
        &["attach-ok"],
    ),
    full(
        st(ATTACH, Some(Status::Inval), Status::Ok, Path::Raw),
        &["attach-reserved", "attach-unknown-flag"],
    ),
    full(
        st(ATTACH, Some(Status::NoEnt), Status::Inval, Path::Both),
        &["attach-unknown-endpoint"],
    ),
    full(
        Mutation::OtherEndpointAttachInval,
        &["attach-shared-domain"],
    ),
    full(
        Mutation::AttachMoveIgnored,
        &["attach-move", "attach-move-old-unreachable"],
    ),
    full(
        st(ATTACH, Some(Status::Inval), Status::Ok, Path::Driver),
        &["attach-bypass-inconsistent", "attach-rejected-no-effect"],
    ),
    full(
        Mutation::RejectedAttachDetaches,
        &["attach-rejected-no-effect"],
    ),
    full(Mutation::DriverSkipsDomainRange, &["attach-domain-range"]),
    full(
        st(DETACH, Some(Status::Ok), Status::Inval, Path::Driver),
        &["detach-ok"],
    ),
    full(Mutation::ReservedChecked(DETACH), &["detach-reserved"]),
    full(
        st(DETACH, Some(Status::NoEnt), Status::Inval, Path::Driver),
        &["detach-unknown-endpoint"],
    ),
    full(
        st(DETACH, Some(Status::Inval), Status::NoEnt, Path::Driver),
        &["detach-wrong-domain", "detach-not-attached", "detach-twice"],
    ),
    full(
        Mutation::DetachIgnored,
        &[
            "detach-blocks-dma",
            "detach-last-destroys-domain",
            "detach-domain-id-reuse",
        ],
    ),
    full(Mutation::DmaInLost, &["map-read"]),
    full(
        Mutation::MapPhysShifted,
        &["map-read", "map-write", "map-multi-granule"],
    ),
    full(
        Mutation::DmaOutLost,
        &[
            "map-write",
            "attach-move",
            "bypass-1-identity",
            "bypass-domain-identity",
        ],
    ),
    full(Mutation::TranslationDropsOffset, &["map-write"]),
    full(Mutation::MapFirstGranuleOnly, &["map-multi-granule"]),
    full(
        st(MAP, Some(Status::Range), Status::Ok, Path::Raw),
        &[
            "map-unaligned-virt-start",
            "map-unaligned-phys",
            "map-unaligned-end",
        ],
    ),
    full(
        st(MAP, None, Status::Ok, Path::Driver),
        &[
            "map-overlap-identical",
            "map-overlap-partial",
            "map-no-domain",
            "map-bypass-domain",
            "map-resv-mem",
            "detach-last-destroys-domain",
        ],
    ),
    full(Mutation::MapOverlapClobbers, &["map-overlap-partial"]),
    full(
        st(MAP, Some(Status::Inval), Status::Ok, Path::Raw),
        &["map-unknown-flag"],
    ),
    full(
        Mutation::MapFlagsWidened,
        &["map-read-only", "map-no-permission"],
    ),
    full(
        Mutation::FaultRwSwapped,
        &["map-read-only", "map-no-permission"],
    ),
    full(
        st(MAP, None, Status::Ok, Path::Raw),
        &["map-outside-input-range", "map-inverted", "map-u64-max"],
    ),
    full(Mutation::MmioFlagRefused, &["map-mmio-flag"]),
    full(
        Mutation::UnmapIgnored,
        &[
            "unmap-exact",
            "unmap-example-2",
            "unmap-example-3",
            "unmap-example-5",
            "unmap-example-6",
            "unmap-example-7",
        ],
    ),
    full(
        st(UNMAP, Some(Status::Range), Status::Ok, Path::Driver),
        &["unmap-split", "unmap-example-4"],
    ),
    full(
        Mutation::SplitUnmapRemovesCovered,
        &["unmap-split-keeps-all"],
    ),
    full(
        st(UNMAP, None, Status::Unsupp, Path::Raw),
        &["unmap-reserved"],
    ),
    full(
        st(UNMAP, Some(Status::NoEnt), Status::Ok, Path::Driver),
        &["unmap-no-domain"],
    ),
    full(
        st(UNMAP, Some(Status::Inval), Status::Ok, Path::Driver),
        &["unmap-bypass-domain"],
    ),
    full(
        st(UNMAP, Some(Status::Ok), Status::Range, Path::Driver),
        &["unmap-example-1"],
    ),
    full(
        Mutation::UnmapFirstOnly,
        &["unmap-example-3", "unmap-example-7"],
    ),
    full(
        st(PROBE, Some(Status::Ok), Status::Inval, Path::Raw),
        &[
            "probe-ok",
            "probe-reserved-ignored",
            "probe-properties-well-formed",
            "probe-zero-fill",
        ],
    ),
    full(
        st(PROBE, Some(Status::NoEnt), Status::Ok, Path::Driver),
        &["probe-unknown-endpoint"],
    ),
    full(
        Mutation::ReservedChecked(PROBE),
        &["probe-reserved-ignored"],
    ),
    full(
        Mutation::ProbeResvReservedSet,
        &["probe-properties-well-formed"],
    ),
    full(Mutation::ProbeTrailingGarbage, &["probe-zero-fill"]),
    full(Mutation::ProbePaddingNotWritten, &["probe-zero-fill"]),
    full(
        Mutation::ProbeDuplicated,
        &["probe-one-msi", "probe-no-overlap"],
    ),
    full(Mutation::ShortProbeWritesTail, &["probe-short-buffer"]),
    Expect {
        m: Mutation::ProbeAnswered,
        config: OursConfig::Minimal,
        cases: &["probe-not-offered"],
    },
    full(
        Mutation::SetBypassInverted,
        &["bypass-1-identity", "bypass-0-blocks"],
    ),
    full(
        Mutation::NoFaults,
        &[
            "fault-unmapped",
            "map-read-only",
            "unmap-exact",
            "bypass-0-blocks",
            "detach-blocks-dma",
            "attach-move-old-unreachable",
        ],
    ),
    full(
        Mutation::FaultReasonUnknown,
        &["bypass-0-fault-reason", "fault-unmapped"],
    ),
    full(
        Mutation::BypassFlagIgnored,
        &[
            "bypass-domain-identity",
            "bypass-attach-flag-unknown-domain",
        ],
    ),
    full(
        Mutation::BypassOverridesDomain,
        &["bypass-attached-translated"],
    ),
    full(
        Mutation::IdentityOnFault,
        &["fault-no-data-moved", "bypass-attached-translated"],
    ),
    full(Mutation::FaultAddressShifted, &["fault-unmapped"]),
    full(Mutation::FaultAddressDropped, &["fault-unmapped"]),
    full(
        Mutation::FaultEndpointWrong,
        &["fault-unmapped", "detach-blocks-dma"],
    ),
    full(Mutation::FaultUndefinedFlag, &["fault-reserved-zero"]),
    full(Mutation::ExtraMalformedReport, &["fault-reserved-zero"]),
    full(
        Mutation::ResetKeepsState,
        &["reset-detaches", "reset-removes-mappings"],
    ),
    full(Mutation::ResetRestoresBootBypass, &["reset-keeps-bypass"]),
    full(Mutation::ResetSetsBypassOne, &["reset-keeps-bypass"]),
];

/// A request the mutant sent to the device, for replay by [`Mutation::ResetKeepsState`].
#[derive(Clone, Debug)]
enum Op {
    Attach(u32, u32),
    AttachBypass(u32, u32),
    Detach(u32, u32),
    Map(u32, u64, u64, u64, u32),
    Unmap(u32, u64, u64),
    Raw(Vec<u8>, Vec<usize>),
}

/// What the device holds, as far as the mutant can tell from successful requests.
#[derive(Default)]
struct Shadow {
    /// Endpoint → domain.
    attached: HashMap<u32, u32>,
    /// Domain → mappings, inclusive IOVA ranges.
    maps: HashMap<u32, Vec<(u64, u64)>>,
}

impl Shadow {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Attach(d, e) | Op::AttachBypass(d, e) => {
                self.attached.insert(e, d);
            }
            Op::Detach(_, e) => {
                self.attached.remove(&e);
            }
            Op::Map(d, s, e, ..) => self.maps.entry(d).or_default().push((s, e)),
            Op::Unmap(d, s, e) => {
                if let Some(v) = self.maps.get_mut(&d) {
                    v.retain(|&(ms, me)| !(ms >= s && me <= e));
                }
            }
            Op::Raw(..) => {}
        }
    }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The typed request a raw readable part carries, if complete.
fn parse_raw(b: &[u8]) -> Option<Op> {
    Some(match *b.first()? {
        ATTACH if le32(b, 12)? & 1 == 1 => Op::AttachBypass(le32(b, 4)?, le32(b, 8)?),
        ATTACH => Op::Attach(le32(b, 4)?, le32(b, 8)?),
        DETACH => Op::Detach(le32(b, 4)?, le32(b, 8)?),
        MAP => Op::Map(
            le32(b, 4)?,
            le64(b, 8)?,
            le64(b, 16)?,
            le64(b, 24)?,
            le32(b, 32)?,
        ),
        UNMAP => Op::Unmap(le32(b, 4)?, le64(b, 8)?, le64(b, 16)?),
        _ => return None,
    })
}

/// Size in bytes of the readable part of a request type.
fn readable_size(t: u8) -> Option<usize> {
    Some(match t {
        ATTACH | DETACH => 20,
        MAP => 36,
        UNMAP => 28,
        PROBE => 72,
        _ => return None,
    })
}

/// Whether any reserved byte (head or body) of a request of type `t` is set.
fn reserved_set(t: u8, b: &[u8]) -> bool {
    let body = match t {
        ATTACH => 16..20,
        DETACH => 12..20,
        UNMAP => 24..28,
        PROBE => 8..72,
        _ => 0..0,
    };
    b.get(1..4).is_some_and(|r| r.iter().any(|&x| x != 0))
        || b.get(body).is_some_and(|r| r.iter().any(|&x| x != 0))
}

/// What a writable byte the device did not write reads as: the byte the driver posted it with
/// (`request_raw` fills its writable parts with [`WRITABLE_FILL`]).
const UNTOUCHED: u8 = WRITABLE_FILL;

/// Offset in bytes of the end of the property list in PROBE `properties` (the first header of
/// type 0, or where the walk leaves the buffer), at most `props.len()`.
fn property_list_end(props: &[u8]) -> usize {
    let mut at = 0;
    while at + 4 <= props.len() {
        let t = u16::from_le_bytes([props[at], props[at + 1]]);
        if t == 0 {
            break;
        }
        at += 4 + u16::from_le_bytes([props[at + 2], props[at + 3]]) as usize;
    }
    at.min(props.len())
}

/// A reply whose whole writable part was written, with `status` in the tail.
fn reply(writable_lens: &[usize], status: Status) -> RawReply {
    let n: usize = writable_lens.iter().sum();
    let mut writable = vec![0u8; n];
    if n >= 4 {
        writable[n - 4] = status as u8;
    }
    RawReply {
        used: n as u32,
        writable,
    }
}

/// Our device behind a [`Mutation`].
pub struct Mutant {
    inner: Ours,
    m: Mutation,
    shadow: Shadow,
    log: Vec<Op>,
    pending: Vec<FaultEvent>,
    extra_ignored: u64,
    boot_bypass: Option<bool>,
}

impl Mutant {
    /// Our device in `config` behind `m`.
    pub fn new(config: OursConfig, m: Mutation) -> Self {
        let mut inner = Ours::new(config);
        let boot_bypass = inner.bypass();
        Self {
            inner,
            m,
            shadow: Shadow::default(),
            log: Vec::new(),
            pending: Vec::new(),
            extra_ignored: 0,
            boot_bypass,
        }
    }

    /// Sends a typed request to the device, keeping the log and the shadow.
    fn exec(&mut self, op: Op) -> Result<(), IommuError> {
        let r = match op {
            Op::Attach(d, e) => self.inner.attach(d, e),
            Op::AttachBypass(d, e) => self.inner.attach_bypass(d, e),
            Op::Detach(d, e) => self.inner.detach(d, e),
            Op::Map(d, s, e, p, f) => self.inner.map(d, s, e, p, f),
            Op::Unmap(d, s, e) => self.inner.unmap(d, s, e),
            Op::Raw(..) => unreachable!("raw requests go through exec_raw"),
        };
        if r.is_ok() {
            self.shadow.apply(&op);
        }
        self.log.push(op);
        r
    }

    /// Sends a raw request (readable part in one descriptor per entry of `parts`).
    fn exec_raw(
        &mut self,
        parts: &[Vec<u8>],
        writable_lens: &[usize],
    ) -> Option<Result<RawReply, IommuError>> {
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        let r = self.inner.raw(&refs, writable_lens)?;
        let bytes = parts.concat();
        if let Ok(reply) = &r {
            let n = reply.writable.len();
            if n >= 4 && reply.used as usize == n && reply.writable[n - 4] == 0 {
                if let Some(op) = parse_raw(&bytes) {
                    self.shadow.apply(&op);
                }
            }
        }
        if !self.inner.needs_reset() {
            self.log.push(Op::Raw(bytes, writable_lens.to_vec()));
        }
        Some(r)
    }

    /// Applies a [`Mutation::Status`] to the result of a driver call of type `req`.
    fn subst(&self, req: u8, r: Result<(), IommuError>) -> Result<(), IommuError> {
        let Mutation::Status {
            req: t,
            from,
            to,
            path,
        } = self.m
        else {
            return r;
        };
        if t != req || path == Path::Raw {
            return r;
        }
        let cur = match &r {
            Ok(()) => Status::Ok,
            Err(IommuError::Status(s)) => *s,
            Err(_) => return r,
        };
        if from.is_some_and(|f| f != cur) {
            return r;
        }
        if to == Status::Ok {
            Ok(())
        } else {
            Err(IommuError::Status(to))
        }
    }

    fn granule(&self) -> u64 {
        self.inner.config().granule
    }

    /// Runs a DMA, then applies the identity fallbacks: `Some(events)` of the access.
    fn faults_of_access(&mut self) -> Vec<FaultEvent> {
        self.inner.faults().unwrap_or_default()
    }

    fn identity_fallback(&mut self) -> bool {
        match self.m {
            Mutation::IdentityOnFault => true,
            Mutation::BypassOverridesDomain => self.inner.bypass() == Some(true),
            _ => false,
        }
    }
}

impl Harness for Mutant {
    fn features(&self) -> Features {
        let f = self.inner.features();
        if self.m == Mutation::NoVersion1 {
            f - Features::VERSION_1
        } else {
            f
        }
    }
    fn offered(&self) -> Features {
        let f = self.inner.offered();
        match self.m {
            Mutation::MapUnmapNotOffered => f - Features::MAP_UNMAP,
            Mutation::LegacyBypassOffered => f | Features::BYPASS,
            _ => f,
        }
    }
    fn config(&self) -> IommuConfig {
        self.inner.config()
    }
    fn attach(&mut self, d: u32, e: u32) -> Result<(), IommuError> {
        match self.m {
            Mutation::OtherEndpointAttachInval if e == OTHER_EP => {
                return Err(IommuError::Status(Status::Inval))
            }
            Mutation::AttachMoveIgnored
                if self.shadow.attached.get(&e).is_some_and(|&x| x != d) =>
            {
                return Ok(())
            }
            _ => {}
        }
        let mut r = self.exec(Op::Attach(d, e));
        if self.m == Mutation::DriverSkipsDomainRange
            && matches!(r, Err(IommuError::DomainOutOfRange(_)))
        {
            let mut req = vec![ATTACH, 0, 0, 0];
            req.extend(d.to_le_bytes());
            req.extend(e.to_le_bytes());
            req.extend([0u8; 8]);
            r = match self.exec_raw(&[req], &[4]) {
                Some(Ok(rep)) if rep.used == 4 => match Status::from_u8(rep.writable[0]) {
                    Some(Status::Ok) => Ok(()),
                    Some(s) => Err(IommuError::Status(s)),
                    None => Err(IommuError::UnknownStatus(rep.writable[0])),
                },
                Some(Ok(_)) => Err(IommuError::NoResponse),
                Some(Err(err)) => Err(err),
                None => r,
            };
        }
        if self.m == Mutation::RejectedAttachDetaches
            && matches!(r, Err(IommuError::Status(Status::Inval)))
        {
            if let Some(&x) = self.shadow.attached.get(&e) {
                let _ = self.exec(Op::Detach(x, e));
            }
        }
        self.subst(ATTACH, r)
    }
    fn attach_bypass(&mut self, d: u32, e: u32) -> Result<(), IommuError> {
        let r = if self.m == Mutation::BypassFlagIgnored {
            self.exec(Op::Attach(d, e))
        } else {
            self.exec(Op::AttachBypass(d, e))
        };
        self.subst(ATTACH, r)
    }
    fn detach(&mut self, d: u32, e: u32) -> Result<(), IommuError> {
        if self.m == Mutation::DetachIgnored {
            return Ok(());
        }
        let r = self.exec(Op::Detach(d, e));
        self.subst(DETACH, r)
    }
    fn map(&mut self, d: u32, s: u64, e: u64, p: u64, f: u32) -> Result<(), IommuError> {
        let g = self.granule();
        let (mut e, mut p, mut f) = (e, p, f);
        match self.m {
            Mutation::MapFirstGranuleOnly => e = e.min(s.saturating_add(g - 1)),
            Mutation::MapPhysShifted => p += g,
            Mutation::MapFlagsWidened => f |= (MapFlags::READ | MapFlags::WRITE).bits(),
            Mutation::MmioFlagRefused if f & MapFlags::MMIO.bits() != 0 => {
                return Err(IommuError::Status(Status::Inval))
            }
            _ => {}
        }
        let r = self.exec(Op::Map(d, s, e, p, f));
        if self.m == Mutation::MapOverlapClobbers
            && matches!(r, Err(IommuError::Status(Status::Inval)))
        {
            let _ = self.exec(Op::Unmap(d, s, e));
        }
        self.subst(MAP, r)
    }
    fn unmap(&mut self, d: u32, s: u64, e: u64) -> Result<(), IommuError> {
        let maps = self.shadow.maps.get(&d).cloned().unwrap_or_default();
        let inside: Vec<(u64, u64)> = maps
            .iter()
            .copied()
            .filter(|&(ms, me)| ms >= s && me <= e)
            .collect();
        let split = maps
            .iter()
            .any(|&(ms, me)| ms <= e && me >= s && !(ms >= s && me <= e));
        let r = match self.m {
            Mutation::UnmapIgnored => return Ok(()),
            Mutation::UnmapFirstOnly if !split && inside.len() > 1 => {
                let first = *inside.iter().min().expect("non-empty");
                self.exec(Op::Unmap(d, first.0, first.1))
            }
            Mutation::SplitUnmapRemovesCovered => {
                let r = self.exec(Op::Unmap(d, s, e));
                if matches!(r, Err(IommuError::Status(Status::Range))) {
                    for (ms, me) in inside {
                        let _ = self.exec(Op::Unmap(d, ms, me));
                    }
                }
                r
            }
            _ => self.exec(Op::Unmap(d, s, e)),
        };
        self.subst(UNMAP, r)
    }
    fn probe(&mut self, e: u32) -> Result<Vec<ProbeProperty>, IommuError> {
        let r = self.inner.probe(e);
        let r = match (self.m, r) {
            (Mutation::ProbeDuplicated, Ok(mut v)) => {
                v.extend(v.clone());
                Ok(v)
            }
            (_, r) => r,
        };
        let status = match &r {
            Ok(_) => Ok(()),
            Err(IommuError::Status(s)) => Err(IommuError::Status(*s)),
            Err(_) => return r,
        };
        match self.subst(PROBE, status) {
            s if s == status => r,
            Ok(()) => Ok(Vec::new()),
            Err(err) => Err(err),
        }
    }
    fn raw_config(&mut self) -> Result<Config, IommuError> {
        let mut c = self.inner.raw_config()?;
        match self.m {
            Mutation::PageSizeMaskZero => c.page_size_mask = 0.into(),
            Mutation::BypassTwo => c.bypass = 2,
            Mutation::InputRangeInverted => {
                c.input_range.start = u64::MAX.into();
                c.input_range.end = 0.into();
            }
            Mutation::DomainRangeInverted => {
                c.domain_range.start = u32::MAX.into();
                c.domain_range.end = 0.into();
            }
            Mutation::ProbeSizeTiny => c.probe_size = 4.into(),
            _ => {}
        }
        Ok(c)
    }
    fn bypass(&mut self) -> Option<bool> {
        self.inner.bypass()
    }
    fn set_bypass(&mut self, on: bool) -> Result<(), IommuError> {
        if self.m == Mutation::SetBypassInverted {
            self.inner.set_bypass(!on)
        } else {
            self.inner.set_bypass(on)
        }
    }
    fn raw(&mut self, r: &[&[u8]], w: &[usize]) -> Option<Result<RawReply, IommuError>> {
        let mut parts: Vec<Vec<u8>> = r.iter().map(|p| p.to_vec()).collect();
        let mut bytes = parts.concat();
        let ty = bytes.first().copied().unwrap_or(0);
        let total: usize = w.iter().sum();
        let probe_size = self.inner.config().probe_size as usize;
        match self.m {
            Mutation::UnknownTypeWritten if readable_size(ty).is_none() => {
                // QEMU writes the 4-byte tail at offset 0; the rest is not written.
                let mut rep = reply(w, Status::Unsupp);
                rep.writable.fill(UNTOUCHED);
                let tail = [Status::Unsupp as u8, 0, 0, 0];
                let k = rep.writable.len().min(4);
                rep.writable[..k].copy_from_slice(&tail[..k]);
                rep.used = 4;
                return Some(Ok(rep));
            }
            Mutation::ReservedChecked(t) if ty == t && reserved_set(t, &bytes) => {
                return Some(Ok(reply(w, Status::Inval)))
            }
            Mutation::SplitChainTruncated if parts.len() > 1 => parts.truncate(1),
            Mutation::ShortRequestZeroPadded | Mutation::ShortRequestDoneSilently => {
                if let Some(n) = readable_size(ty).filter(|&n| bytes.len() < n) {
                    bytes.resize(n, 0);
                    parts = vec![bytes.clone()];
                    if self.m == Mutation::ShortRequestDoneSilently {
                        let _ = self.exec_raw(&parts, w)?;
                        return Some(Ok(RawReply {
                            used: 0,
                            writable: vec![UNTOUCHED; total],
                        }));
                    }
                }
            }
            Mutation::BypassFlagIgnored if ty == ATTACH && bytes.len() > 12 => {
                bytes[12] &= !1;
                parts = vec![bytes.clone()];
            }
            Mutation::ShortProbeWritesTail if ty == PROBE && total < probe_size + 4 => {
                // The 4-byte tail at offset 0; the rest is not written.
                let mut writable = vec![UNTOUCHED; total];
                let tail = [Status::DevErr as u8, 0, 0, 0];
                let k = total.min(4);
                writable[..k].copy_from_slice(&tail[..k]);
                return Some(Ok(RawReply { used: 4, writable }));
            }
            Mutation::ProbeAnswered
                if ty == PROBE && !self.inner.offered().contains(Features::PROBE) =>
            {
                return Some(Ok(reply(w, Status::Ok)));
            }
            _ => {}
        }
        let mut out = self.exec_raw(&parts, w)?;
        if let Ok(rep) = &mut out {
            let n = rep.writable.len();
            let complete = n >= 4 && rep.used as usize == n;
            match self.m {
                Mutation::NoTailWritten if n < 4 => rep.used = n as u32,
                Mutation::TailReservedSet if complete => rep.writable[n - 3] = 1,
                Mutation::RawReplyNotWritten if complete => rep.writable.fill(UNTOUCHED),
                Mutation::TailReservedNotWritten if complete => {
                    rep.writable[n - 3..].fill(UNTOUCHED)
                }
                Mutation::ProbePaddingNotWritten
                    if ty == PROBE && complete && n >= probe_size + 4 =>
                {
                    let props = &mut rep.writable[..probe_size];
                    let end = property_list_end(props);
                    props[end..].fill(UNTOUCHED)
                }
                Mutation::ProbeResvReservedSet
                    if ty == PROBE && n >= 8 && rep.writable[..2] == [1, 0] =>
                {
                    rep.writable[5] = 1
                }
                Mutation::ProbeTrailingGarbage
                    if ty == PROBE && complete && n >= probe_size + 4 && probe_size > 0 =>
                {
                    rep.writable[probe_size - 1] = 0xee
                }
                Mutation::Status {
                    req,
                    from,
                    to,
                    path,
                } if req == ty && path != Path::Driver && complete => {
                    let cur = rep.writable[n - 4];
                    if from.is_none_or(|f| f as u8 == cur) {
                        rep.writable[n - 4] = to as u8;
                    }
                }
                _ => {}
            }
        }
        Some(out)
    }
    fn faults(&mut self) -> Result<Vec<FaultEvent>, IommuError> {
        let mut f = std::mem::take(&mut self.pending);
        f.extend(self.inner.faults()?);
        match self.m {
            Mutation::NoFaults => f.clear(),
            Mutation::FaultReasonUnknown => f
                .iter_mut()
                .for_each(|e| e.reason = FaultReason::Unknown(0)),
            Mutation::FaultAddressShifted => f
                .iter_mut()
                .for_each(|e| e.address = e.address.map(|a| a.wrapping_add(1 << 20))),
            Mutation::FaultAddressDropped => f.iter_mut().for_each(|e| {
                e.address = None;
                e.raw_flags &= !0x100;
            }),
            Mutation::FaultEndpointWrong => f.iter_mut().for_each(|e| e.endpoint ^= 1),
            Mutation::FaultRwSwapped => f
                .iter_mut()
                .for_each(|e| std::mem::swap(&mut e.read, &mut e.write)),
            Mutation::FaultUndefinedFlag => f.iter_mut().for_each(|e| e.raw_flags |= 1 << 2),
            Mutation::ExtraMalformedReport if !f.is_empty() => self.extra_ignored += 1,
            _ => {}
        }
        Ok(f)
    }
    fn ignored_events(&mut self) -> u64 {
        self.inner.ignored_events() + self.extra_ignored
    }
    fn endpoints(&self) -> Endpoints {
        self.inner.endpoints()
    }
    fn alloc_pages(&mut self, n: u64) -> Option<u64> {
        self.inner.alloc_pages(n)
    }
    fn write_phys(&mut self, p: u64, d: &[u8]) {
        self.inner.write_phys(p, d)
    }
    fn read_phys(&mut self, p: u64, l: usize) -> Vec<u8> {
        self.inner.read_phys(p, l)
    }
    fn dma_in(&mut self, iova: u64, len: u64) {
        let iova = match self.m {
            Mutation::DmaInLost => return,
            Mutation::TranslationDropsOffset => iova & !(self.granule() - 1),
            _ => iova,
        };
        let watch = matches!(
            self.m,
            Mutation::FailedReadKeepsBuffer
                | Mutation::IdentityOnFault
                | Mutation::BypassOverridesDomain
        );
        if !watch {
            return self.inner.dma_in(iova, len);
        }
        let before = self.inner.buffer().to_vec();
        self.inner.dma_in(iova, len);
        let events = self.faults_of_access();
        if events.is_empty() {
            return;
        }
        let len = len.min(before.len() as u64) as usize;
        if self.identity_fallback() {
            if let Some(data) = self.inner.try_read_phys(iova, len) {
                self.inner.buffer_mut()[..len].copy_from_slice(&data);
                return;
            }
        }
        if self.m == Mutation::FailedReadKeepsBuffer {
            self.inner.buffer_mut().copy_from_slice(&before);
        }
        self.pending.extend(events);
    }
    fn dma_out(&mut self, iova: u64, len: u64) {
        let iova = match self.m {
            Mutation::DmaOutLost => return,
            Mutation::TranslationDropsOffset => iova & !(self.granule() - 1),
            _ => iova,
        };
        if !matches!(
            self.m,
            Mutation::IdentityOnFault | Mutation::BypassOverridesDomain
        ) {
            return self.inner.dma_out(iova, len);
        }
        self.inner.dma_out(iova, len);
        let events = self.faults_of_access();
        if events.is_empty() {
            return;
        }
        if self.identity_fallback() {
            let len = len.min(self.inner.buffer().len() as u64) as usize;
            let data = self.inner.buffer()[..len].to_vec();
            if self.inner.try_write_phys(iova, &data) {
                return;
            }
        }
        self.pending.extend(events);
    }
    fn reset(&mut self) -> Option<Result<(), IommuError>> {
        let r = self.inner.reset()?;
        self.pending.clear();
        if r.is_err() {
            return Some(r);
        }
        match self.m {
            Mutation::ResetKeepsState => {
                for op in self.log.clone() {
                    match op {
                        Op::Attach(d, e) => drop(self.inner.attach(d, e)),
                        Op::AttachBypass(d, e) => drop(self.inner.attach_bypass(d, e)),
                        Op::Detach(d, e) => drop(self.inner.detach(d, e)),
                        Op::Map(d, s, e, p, f) => drop(self.inner.map(d, s, e, p, f)),
                        Op::Unmap(d, s, e) => drop(self.inner.unmap(d, s, e)),
                        Op::Raw(b, w) => drop(self.inner.raw(&[&b], &w)),
                    }
                }
                let _ = self.inner.faults();
                return Some(Ok(()));
            }
            Mutation::ResetRestoresBootBypass => {
                if let Some(b) = self.boot_bypass {
                    let _ = self.inner.set_bypass(b);
                }
            }
            Mutation::ResetSetsBypassOne => {
                let _ = self.inner.set_bypass(true);
            }
            _ => {}
        }
        self.shadow = Shadow::default();
        self.log.clear();
        Some(Ok(()))
    }
    fn needs_reset(&mut self) -> bool {
        self.inner.needs_reset()
    }
    fn hazard(&self, h: Hazard) -> Option<&'static str> {
        self.inner.hazard(h)
    }
}
