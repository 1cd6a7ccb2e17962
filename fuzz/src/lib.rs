//! Shared pieces of the device-model fuzz targets: an `Arbitrary` device configuration,
//! biased value generators, a state snapshot and the invariants every `IommuState` must keep,
//! and a naive byte-by-byte translation model to compare `IommuState::translate` with.

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use virtio_iommu_device::config::{DeviceConfigBuilder, ResvKind};
use virtio_iommu_device::{
    Access, Caps, DeviceConfig, IommuState, Mapping, ResvRegion, TranslateError,
};
use virtio_iommu_driver::wire::{Features, MapFlags, FAULT_R_DOMAIN, FAULT_R_MAPPING};

/// Endpoints every fuzzed configuration manages (index into this with [`Ep::Known`]).
pub const ENDPOINTS: [u32; 4] = [0, 8, 16, u32::MAX];

/// A device configuration chosen by the fuzzer. Every knob has a default (what an empty input
/// decodes to) and a few interesting values rather than the full range; the combination is
/// made valid before building (both bypass features ⇒ legacy BYPASS dropped, boot bypass only
/// with BYPASS_CONFIG, `probe_size` raised to fit the regions), so inputs are not wasted on
/// configuration errors.
#[derive(Arbitrary, Debug, Clone)]
pub struct CfgSpec {
    /// Offered device features (bits 0..=6 of `Features`); `None`: the builder's default set.
    /// VERSION_1 is always added by the builder.
    pub offered: Option<u8>,
    /// Also offer INDIRECT_DESC.
    pub no_indirect: bool,
    /// Granule = `1 << (granule_shift % 17)` (1 byte .. 64 KiB); `None`: 4 KiB.
    pub granule_shift: Option<u8>,
    /// Page sizes above the granule too.
    pub extra_sizes: bool,
    pub input_range: RangeSel,
    pub domain_range: DomRangeSel,
    pub probe_size: ProbeSel,
    pub boot_bypass: bool,
    /// Reserved region of endpoint 8 (start page, pages), plus endpoint 16's MSI doorbell and a
    /// reserved region of endpoint `u32::MAX` at the top of the IOVA space.
    pub resv8: Option<(u16, u8)>,
    pub msi16: bool,
    pub top_resv: bool,
    /// `None`: the defaults (1024 domains, 65536 mappings, 256 requests per notification, 64
    /// pending faults); else small caps.
    pub caps: Option<SmallCaps>,
    /// Queue size = `1 << (queue_shift % 5)` (1..=16); `None`: 16.
    pub queue_shift: Option<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct SmallCaps {
    pub max_domains: u8,
    pub max_mappings: u8,
    pub max_requests_per_notify: u8,
    pub max_pending_faults: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum RangeSel {
    Default,
    Full,
    Small,
    Top,
    Raw(u64, u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum DomRangeSel {
    Full,
    Small,
    Top,
    Raw(u32, u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum ProbeSel {
    Default,
    Zero,
    OneProperty,
    TwoProperties,
    Odd(u8),
}

impl CfgSpec {
    pub fn granule(&self) -> u64 {
        1u64 << (self.granule_shift.unwrap_or(12) % 17)
    }

    pub fn queue_size(&self) -> u16 {
        1u16 << (self.queue_shift.unwrap_or(4) % 5)
    }

    pub fn builder(&self) -> DeviceConfigBuilder {
        let granule = self.granule();
        let mut offered = match self.offered {
            None => {
                Features::INPUT_RANGE
                    | Features::DOMAIN_RANGE
                    | Features::MAP_UNMAP
                    | Features::PROBE
                    | Features::MMIO
                    | Features::BYPASS_CONFIG
            }
            Some(bits) => Features::from_bits_truncate(u64::from(bits & 0x7f)),
        };
        if offered.contains(Features::BYPASS | Features::BYPASS_CONFIG) {
            offered -= Features::BYPASS;
        }
        if !self.no_indirect {
            offered |= Features::RING_INDIRECT_DESC;
        }
        let mask = if self.extra_sizes {
            !(granule - 1)
        } else {
            granule
        };
        let sorted = |a, b| if a <= b { (a, b) } else { (b, a) };
        let (in_lo, in_hi) = match self.input_range {
            RangeSel::Default => (0, (1 << 48) - 1),
            RangeSel::Full => (0, u64::MAX),
            RangeSel::Small => (0x1000, 0xfff_ffff),
            RangeSel::Top => (u64::MAX - 0xf_ffff, u64::MAX),
            RangeSel::Raw(a, b) => sorted(a, b),
        };
        let (d_lo, d_hi) = match self.domain_range {
            DomRangeSel::Full => (0, u32::MAX),
            DomRangeSel::Small => (1, 100),
            DomRangeSel::Top => (u32::MAX - 2, u32::MAX),
            DomRangeSel::Raw(a, b) => {
                let (a, b) = sorted(u64::from(a), u64::from(b));
                (a as u32, b as u32)
            }
        };
        let probe_size = match self.probe_size {
            ProbeSel::Default => 512,
            ProbeSel::Zero => 0,
            ProbeSel::OneProperty => 24,
            ProbeSel::TwoProperties => 48,
            ProbeSel::Odd(n) => u32::from(n),
        };
        let caps = match self.caps {
            None => Caps::default(),
            Some(c) => Caps {
                max_domains: usize::from(c.max_domains % 8) + 1,
                max_mappings: usize::from(c.max_mappings) + 1,
                max_requests_per_notify: usize::from(c.max_requests_per_notify % 20) + 1,
                max_pending_faults: usize::from(c.max_pending_faults % 8) + 1,
            },
        };
        let mut b = DeviceConfig::builder()
            .features(offered)
            .page_size_mask(mask)
            .input_range(in_lo, in_hi)
            .domain_range(d_lo, d_hi)
            // Every endpoint has at most one region here.
            .probe_size(probe_size.max(24))
            .boot_bypass(self.boot_bypass && offered.contains(Features::BYPASS_CONFIG))
            .endpoints(ENDPOINTS)
            .queue_size(self.queue_size())
            .caps(caps);
        if !offered.contains(Features::PROBE) || probe_size >= 24 {
            b = b.probe_size(probe_size);
        }
        if let Some((page, pages)) = self.resv8 {
            let start = u64::from(page) * 0x1000;
            let end = start + u64::from(pages) * 0x1000 + 0xfff;
            b = b.resv_region(8, ResvRegion::reserved(start, end));
        }
        if self.msi16 {
            b = b.resv_region(16, ResvRegion::msi(0x0802_0000, 0x0802_0fff));
        }
        if self.top_resv {
            b = b.resv_region(u32::MAX, ResvRegion::reserved(u64::MAX - 0xfff, u64::MAX));
        }
        b
    }

    pub fn build(&self) -> Option<DeviceConfig> {
        self.builder().build().ok()
    }
}

/// MAP flags: mostly valid ones (READ, WRITE, MMIO), sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum MapFlagSel {
    Valid(u8),
    Raw(u32),
}

impl MapFlagSel {
    pub fn get(self) -> u32 {
        match self {
            MapFlagSel::Valid(b) => u32::from(b & 7),
            MapFlagSel::Raw(v) => v,
        }
    }
}

/// A domain ID: mostly a few small ones (so requests meet), sometimes the range edges.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Dom {
    Small(u8),
    Max,
    Raw(u32),
}

impl Dom {
    pub fn get(self) -> u32 {
        match self {
            Dom::Small(n) => u32::from(n % 4) + 1,
            Dom::Max => u32::MAX,
            Dom::Raw(n) => n,
        }
    }
}

/// An endpoint ID: mostly a managed one.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Ep {
    Known(u8),
    Raw(u32),
}

impl Ep {
    pub fn get(self) -> u32 {
        match self {
            Ep::Known(i) => ENDPOINTS[usize::from(i) % ENDPOINTS.len()],
            Ep::Raw(n) => n,
        }
    }
}

/// An address: granule-aligned small pages, the MSI doorbell, the top of the space, or raw.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Page(u8),
    Msi(u8),
    FromTop(u16),
    Raw(u64),
}

impl Addr {
    pub fn get(self, granule: u64) -> u64 {
        match self {
            Addr::Page(n) => u64::from(n) * granule.max(0x1000),
            Addr::Msi(n) => 0x0802_0000 - 0x2000 + u64::from(n) * 0x100,
            Addr::FromTop(n) => u64::MAX - u64::from(n),
            Addr::Raw(v) => v,
        }
    }
}

/// The last address of a range starting at `start`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum End {
    /// `start + pages * granule - 1` (wrapping, so the top of the space is reachable).
    Pages(u8),
    Max,
    Raw(u64),
}

impl End {
    pub fn get(self, start: u64, granule: u64) -> u64 {
        match self {
            End::Pages(n) => start
                .wrapping_add((u64::from(n) + 1).wrapping_mul(granule.max(0x1000)))
                .wrapping_sub(1),
            End::Max => u64::MAX,
            End::Raw(v) => v,
        }
    }
}

/// Everything observable about an `IommuState`'s domains, mappings and attachments.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Snapshot {
    pub domains: Vec<DomainSnap>,
    pub attachments: Vec<(u32, Option<u32>)>,
    pub mapping_count: usize,
    pub bypass: bool,
}

#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DomainSnap {
    pub id: u32,
    pub bypass: bool,
    pub endpoints: Vec<u32>,
    pub mappings: Vec<(u64, Mapping)>,
}

impl Snapshot {
    pub fn of(s: &IommuState) -> Self {
        Snapshot {
            domains: s
                .domains()
                .map(|(id, d)| DomainSnap {
                    id,
                    bypass: d.is_bypass(),
                    endpoints: d.endpoints().collect(),
                    mappings: d.mappings().map(|(v, m)| (v, *m)).collect(),
                })
                .collect(),
            attachments: s
                .config()
                .endpoints()
                .map(|e| (e, s.endpoint_domain(e)))
                .collect(),
            mapping_count: s.mapping_count(),
            bypass: s.bypass(),
        }
    }

    pub fn domain(&self, id: u32) -> Option<&DomainSnap> {
        self.domains.iter().find(|d| d.id == id)
    }

    pub fn endpoint_domain(&self, ep: u32) -> Option<u32> {
        self.attachments
            .iter()
            .find(|(e, _)| *e == ep)
            .and_then(|(_, d)| *d)
    }
}

/// The invariants of `IommuState` (documented in `host-device/src/state/` and its README):
/// domains are non-empty, attachments agree both ways, mappings of a domain are sorted and
/// disjoint, inside the effective input range, granule-aligned, not wrapping in physical
/// space, clear of every attached endpoint's reserved regions, absent from bypass domains,
/// counted exactly, within the caps; and the O(log n) lookups agree with the list.
pub fn check_invariants(s: &IommuState) {
    let cfg = s.config();
    let caps = cfg.caps();
    let (in_lo, in_hi) = cfg.effective_input_range();
    let (d_lo, d_hi) = cfg.effective_domain_range();
    let mask = cfg.granule() - 1;
    let mut total = 0usize;
    let mut seen = BTreeSet::new();
    assert!(s.domain_count() <= caps.max_domains, "max_domains exceeded");
    for (id, d) in s.domains() {
        assert!(d_lo <= id && id <= d_hi, "domain {id} outside domain_range");
        let eps: Vec<u32> = d.endpoints().collect();
        assert!(!eps.is_empty(), "domain {id} has no endpoint");
        for &e in &eps {
            assert!(cfg.has_endpoint(e), "unknown endpoint {e} attached");
            assert_eq!(s.endpoint_domain(e), Some(id), "attachment of {e}");
            assert!(seen.insert(e), "endpoint {e} in two domains");
        }
        let maps: Vec<(u64, Mapping)> = d.mappings().map(|(v, m)| (v, *m)).collect();
        assert_eq!(maps.len(), d.mapping_count(), "domain {id} mapping_count");
        if d.is_bypass() {
            assert!(maps.is_empty(), "bypass domain {id} has mappings");
        }
        total += maps.len();
        for w in maps.windows(2) {
            assert!(
                w[0].1.virt_end < w[1].0,
                "domain {id}: mappings {:#x?} and {:#x?} overlap or are out of order",
                w[0],
                w[1]
            );
        }
        for (i, (start, m)) in maps.iter().enumerate() {
            let (start, end) = (*start, m.virt_end);
            assert!(start <= end, "inverted mapping");
            assert!(
                in_lo <= start && end <= in_hi,
                "mapping outside input_range"
            );
            assert!(
                start & mask == 0 && m.phys_start & mask == 0 && end.wrapping_add(1) & mask == 0,
                "unaligned mapping"
            );
            assert!(
                m.phys_start.checked_add(end - start).is_some(),
                "physical range wraps"
            );
            for &e in &eps {
                for r in cfg.resv_regions(e).unwrap_or(&[]) {
                    assert!(
                        !r.overlaps(start, end),
                        "mapping {start:#x}..={end:#x} overlaps a RESV_MEM region of {e}"
                    );
                }
            }
            // Lookups: both ends find it; the byte before it does not.
            assert_eq!(d.mapping_at(start), Some((start, m)), "mapping_at(start)");
            assert_eq!(d.mapping_at(end), Some((start, m)), "mapping_at(end)");
            if let Some(before) = start.checked_sub(1) {
                let prev = i.checked_sub(1).map(|p| maps[p]);
                let want = prev.filter(|(_, pm)| pm.virt_end == before);
                assert_eq!(
                    d.mapping_at(before).map(|(v, pm)| (v, *pm)),
                    want,
                    "mapping_at(start - 1)"
                );
            }
            assert!(d.overlaps(start, end));
        }
    }
    assert_eq!(total, s.mapping_count(), "total mapping_count");
    assert!(total <= caps.max_mappings, "max_mappings exceeded");
    for e in cfg.endpoints() {
        if let Some(d) = s.endpoint_domain(e) {
            let dom = s
                .domain(d)
                .expect("attached to a domain that does not exist");
            assert!(dom.endpoints().any(|x| x == e));
        }
    }
}

/// What the naive model says about one byte of an access.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ByteResult {
    Phys(u64),
    Fault(u8),
}

/// Naive translation of the byte at `iova` by `ep` for `access`, from the documented rules
/// (`IommuState::translate`), by a linear search of `snap`.
pub fn naive_byte(
    cfg: &DeviceConfig,
    snap: &Snapshot,
    unattached_bypass: bool,
    ep: u32,
    iova: u64,
    access: Access,
) -> ByteResult {
    if let Some(r) = cfg
        .resv_regions(ep)
        .unwrap_or(&[])
        .iter()
        .find(|r| r.contains(iova))
    {
        return match r.kind {
            ResvKind::Msi => ByteResult::Phys(iova),
            ResvKind::Reserved => ByteResult::Fault(FAULT_R_MAPPING),
        };
    }
    let Some(d) = snap.endpoint_domain(ep) else {
        return if unattached_bypass {
            ByteResult::Phys(iova)
        } else {
            ByteResult::Fault(FAULT_R_DOMAIN)
        };
    };
    let dom = snap.domain(d).expect("attached domain exists");
    if dom.bypass {
        return ByteResult::Phys(iova);
    }
    for (start, m) in &dom.mappings {
        if *start <= iova && iova <= m.virt_end {
            let ok = (!access.read || m.flags.contains(MapFlags::READ))
                && (!access.write || m.flags.contains(MapFlags::WRITE));
            return if ok {
                ByteResult::Phys(m.phys_start + (iova - start))
            } else {
                ByteResult::Fault(FAULT_R_MAPPING)
            };
        }
    }
    ByteResult::Fault(FAULT_R_MAPPING)
}

/// Calls `IommuState::translate` and checks it against [`naive_byte`]: the pieces cover the
/// access exactly, in order; each piece's first and last bytes are where the model says; a
/// fault names an address inside the access, the right endpoint, and a byte the model says
/// faults for that reason; unknown endpoints and wrapping accesses are refused as documented.
pub fn check_translate(s: &IommuState, ep: u32, iova: u64, len: u64, access: Access) {
    let cfg = s.config();
    let snap = Snapshot::of(s);
    let r = s.translate(ep, iova, len, access);
    if !cfg.has_endpoint(ep) {
        assert_eq!(r, Err(TranslateError::UnknownEndpoint(ep)));
        return;
    }
    if len == 0 {
        assert_eq!(r, Ok(vec![]));
        return;
    }
    let Some(last) = iova.checked_add(len - 1) else {
        assert_eq!(r, Err(TranslateError::Wraps { iova, len }));
        return;
    };
    let naive = |a: u64| naive_byte(cfg, &snap, s.unattached_bypass(), ep, a, access);
    match r {
        Ok(pieces) => {
            let mut next = iova;
            for (i, p) in pieces.iter().enumerate() {
                assert!(p.len > 0, "empty piece");
                assert_eq!(p.iova, next, "pieces not contiguous");
                let p_last = p.iova + (p.len - 1);
                assert!(p_last <= last, "piece beyond the access");
                assert_eq!(
                    naive(p.iova),
                    ByteResult::Phys(p.phys),
                    "piece {i} first byte"
                );
                assert_eq!(
                    naive(p_last),
                    ByteResult::Phys(p.phys.checked_add(p.len - 1).expect("phys wraps")),
                    "piece {i} last byte"
                );
                assert!(
                    (!access.read || p.allowed.read) && (!access.write || p.allowed.write),
                    "piece allows less than the access"
                );
                next = p_last.wrapping_add(1);
                if p_last == last {
                    assert_eq!(i + 1, pieces.len(), "pieces after the end");
                }
            }
            assert_eq!(
                pieces.last().map(|p| p.iova + (p.len - 1)),
                Some(last),
                "pieces do not reach the end"
            );
        }
        Err(TranslateError::Fault(f)) => {
            assert_eq!(f.endpoint, ep);
            assert!(
                iova <= f.address && f.address <= last,
                "fault outside access"
            );
            assert_eq!(
                naive(f.address),
                ByteResult::Fault(f.reason),
                "fault reason"
            );
            assert!(f.address == iova || matches!(naive(iova), ByteResult::Phys(_)));
        }
        Err(e) => panic!("unexpected {e:?}"),
    }
}

/// `Access` from two bits.
pub fn access(bits: u8) -> Access {
    Access {
        read: bits & 1 != 0,
        write: bits & 2 != 0,
    }
}
