//! Property test: random ATTACH/DETACH/MAP/UNMAP/translate/bypass/reset sequences applied to
//! `IommuState` and to a plain reference model written naively (vectors, linear scans,
//! byte-by-byte translation, 128-bit arithmetic) give the same statuses, the same state and the
//! same translations.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::{Access, DeviceConfig, FaultRecord, IommuState, TranslateError};
use virtio_iommu_driver::wire::{
    Features, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqUnmap, RequestType, Status,
};

const ENDPOINTS: [u32; 4] = [1, 2, 3, 4];
const DOMAIN_RANGE: (u32, u32) = (0, 5);
const MAX_DOMAINS: usize = 3;
const MAX_MAPPINGS: usize = 6;

/// (domain, bypass, endpoints, mappings as (start, end, phys, flags)), sorted.
type Snapshot = Vec<(u32, bool, Vec<u32>, Vec<(u64, u64, u64, u32)>)>;

#[derive(Clone, Copy, Debug)]
struct Setup {
    granule: u64,
    full_input: bool,
    legacy: bool,
    negotiate_all: bool,
    boot_bypass: bool,
}

/// (endpoint, is_msi, start, end)
fn resv() -> Vec<(u32, bool, u64, u64)> {
    vec![
        (2, true, 32, 39),
        (3, false, 48, 55),
        (3, true, u64::MAX - 15, u64::MAX - 8),
    ]
}

fn build(setup: Setup, max_mappings: usize) -> (IommuState, Model) {
    let input = if setup.full_input {
        (0, u64::MAX)
    } else {
        (0, (1 << 48) - 1)
    };
    let mut b = DeviceConfig::builder()
        .endpoints(ENDPOINTS)
        .page_size_mask(!(setup.granule - 1))
        .input_range(input.0, input.1)
        .domain_range(DOMAIN_RANGE.0, DOMAIN_RANGE.1)
        .max_domains(MAX_DOMAINS)
        .max_mappings(max_mappings);
    for (e, msi, s, t) in resv() {
        b = b.resv_region(
            e,
            if msi {
                ResvRegion::msi(s, t)
            } else {
                ResvRegion::reserved(s, t)
            },
        );
    }
    if setup.legacy {
        b = b
            .feature(Features::BYPASS_CONFIG, false)
            .feature(Features::BYPASS, true);
    } else {
        b = b.boot_bypass(setup.boot_bypass);
    }
    let config = b.build().unwrap();
    let offered = config.offered();
    let negotiated = if setup.negotiate_all {
        offered
    } else {
        offered - Features::BYPASS_CONFIG - Features::MMIO - Features::BYPASS
    };
    let mut state = IommuState::new(Arc::new(config));
    state.set_negotiated(negotiated);
    let model = Model {
        max_mappings,
        granule: setup.granule,
        input,
        bypass_config_offered: !setup.legacy,
        neg_bypass_config: negotiated.contains(Features::BYPASS_CONFIG),
        neg_mmio: negotiated.contains(Features::MMIO),
        neg_legacy: negotiated.contains(Features::BYPASS),
        bypass: setup.boot_bypass && !setup.legacy,
        attached: Vec::new(),
        domains: Vec::new(),
        maps: Vec::new(),
    };
    (state, model)
}

/// The reference: the spec's rules (in the order the device documents its checks), written
/// as plainly as possible.
#[derive(Debug)]
struct Model {
    max_mappings: usize,
    granule: u64,
    input: (u64, u64),
    bypass_config_offered: bool,
    neg_bypass_config: bool,
    neg_mmio: bool,
    neg_legacy: bool,
    bypass: bool,
    attached: Vec<(u32, u32)>,
    domains: Vec<(u32, bool)>,
    maps: Vec<(u32, u64, u64, u64, u32)>,
}

fn overlap(a: u64, b: u64, c: u64, d: u64) -> bool {
    !(b < c || d < a)
}

impl Model {
    fn known(&self, ep: u32) -> bool {
        ENDPOINTS.contains(&ep)
    }
    fn in_range(&self, d: u32) -> bool {
        d >= DOMAIN_RANGE.0 && d <= DOMAIN_RANGE.1
    }
    fn domain_of(&self, ep: u32) -> Option<u32> {
        self.attached.iter().find(|a| a.0 == ep).map(|a| a.1)
    }
    fn domain(&self, d: u32) -> Option<bool> {
        self.domains.iter().find(|x| x.0 == d).map(|x| x.1)
    }
    fn members(&self, d: u32) -> usize {
        self.attached.iter().filter(|a| a.1 == d).count()
    }
    fn resv_overlaps(&self, ep: u32, s: u64, e: u64) -> bool {
        resv().iter().any(|r| r.0 == ep && overlap(r.2, r.3, s, e))
    }
    fn leave(&mut self, ep: u32) {
        if let Some(d) = self.domain_of(ep) {
            self.attached.retain(|a| a.0 != ep);
            if self.members(d) == 0 {
                self.domains.retain(|x| x.0 != d);
                self.maps.retain(|m| m.0 != d);
            }
        }
    }

    fn attach(&mut self, d: u32, ep: u32, flags: u32, reserved: bool) -> Status {
        if reserved || flags & !1 != 0 {
            return Status::Inval;
        }
        let bypass = flags & 1 != 0;
        if bypass && !self.neg_bypass_config {
            return Status::Inval;
        }
        if !self.known(ep) {
            return Status::NoEnt;
        }
        if !self.in_range(d) {
            return Status::Range;
        }
        let cur = self.domain_of(ep);
        match self.domain(d) {
            Some(b) => {
                if b != bypass {
                    return Status::Inval;
                }
                if cur == Some(d) {
                    return Status::Ok;
                }
                let conflict = self
                    .maps
                    .iter()
                    .filter(|m| m.0 == d)
                    .any(|m| self.resv_overlaps(ep, m.1, m.2));
                if conflict {
                    return Status::Unsupp;
                }
            }
            None => {
                let freed = cur.is_some_and(|c| self.members(c) == 1);
                if self.domains.len() + 1 - usize::from(freed) > MAX_DOMAINS {
                    return Status::NoMem;
                }
            }
        }
        self.leave(ep);
        if self.domain(d).is_none() {
            self.domains.push((d, bypass));
        }
        self.attached.push((ep, d));
        Status::Ok
    }

    fn detach(&mut self, d: u32, ep: u32) -> Status {
        if !self.known(ep) {
            return Status::NoEnt;
        }
        if !self.in_range(d) {
            return Status::Range;
        }
        if self.domain_of(ep) != Some(d) {
            return Status::Inval;
        }
        self.leave(ep);
        Status::Ok
    }

    fn map(&mut self, d: u32, s: u64, e: u64, p: u64, flags: u32) -> Status {
        if flags & !7 != 0 || (flags & 4 != 0 && !self.neg_mmio) || e < s {
            return Status::Inval;
        }
        if !self.in_range(d) {
            return Status::Range;
        }
        match self.domain(d) {
            None => return Status::NoEnt,
            Some(true) => return Status::Inval,
            Some(false) => {}
        }
        if s < self.input.0 || e > self.input.1 {
            return Status::Range;
        }
        let g = u128::from(self.granule);
        if u128::from(s) % g != 0 || u128::from(p) % g != 0 || (u128::from(e) + 1) % g != 0 {
            return Status::Range;
        }
        if u128::from(p) + u128::from(e - s) > u128::from(u64::MAX) {
            return Status::Range;
        }
        if self
            .maps
            .iter()
            .any(|m| m.0 == d && overlap(m.1, m.2, s, e))
        {
            return Status::Inval;
        }
        let eps: Vec<u32> = self
            .attached
            .iter()
            .filter(|a| a.1 == d)
            .map(|a| a.0)
            .collect();
        if eps.iter().any(|&ep| self.resv_overlaps(ep, s, e)) {
            return Status::Inval;
        }
        if self.maps.len() >= self.max_mappings {
            return Status::NoMem;
        }
        self.maps.push((d, s, e, p, flags));
        Status::Ok
    }

    fn unmap(&mut self, d: u32, s: u64, e: u64, reserved: bool) -> Status {
        if reserved || e < s {
            return Status::Inval;
        }
        if !self.in_range(d) {
            return Status::Range;
        }
        match self.domain(d) {
            None => return Status::NoEnt,
            Some(true) => return Status::Inval,
            Some(false) => {}
        }
        if s < self.input.0 || e > self.input.1 {
            return Status::Range;
        }
        let split = self
            .maps
            .iter()
            .any(|m| m.0 == d && overlap(m.1, m.2, s, e) && !(s <= m.1 && m.2 <= e));
        if split {
            return Status::Range;
        }
        self.maps.retain(|m| !(m.0 == d && s <= m.1 && m.2 <= e));
        Status::Ok
    }

    /// Byte by byte: `(iova, phys, allowed)` for each byte, or the first fault.
    fn translate(
        &self,
        ep: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<(u64, u64, Access)>, TranslateError> {
        if !self.known(ep) {
            return Err(TranslateError::UnknownEndpoint(ep));
        }
        if len == 0 {
            return Ok(vec![]);
        }
        let last = u128::from(iova) + u128::from(len) - 1;
        if last > u128::from(u64::MAX) {
            return Err(TranslateError::Wraps { iova, len });
        }
        let mut flags = 1 << 8;
        if access.read {
            flags |= 1;
        }
        if access.write {
            flags |= 2;
        }
        let fault = |reason, address| {
            Err(TranslateError::Fault(FaultRecord {
                reason,
                flags,
                endpoint: ep,
                address,
            }))
        };
        let mut out = Vec::new();
        for b in u128::from(iova)..=last {
            let b = b as u64;
            if let Some(r) = resv()
                .into_iter()
                .find(|r| r.0 == ep && r.2 <= b && b <= r.3)
            {
                if r.1 {
                    out.push((b, b, Access::READ_WRITE));
                    continue;
                }
                return fault(2, b);
            }
            match self.domain_of(ep) {
                None => {
                    if (self.bypass_config_offered && self.bypass) || self.neg_legacy {
                        out.push((b, b, Access::READ_WRITE));
                    } else {
                        return fault(1, b);
                    }
                }
                Some(d) => {
                    if self.domain(d) == Some(true) {
                        out.push((b, b, Access::READ_WRITE));
                        continue;
                    }
                    let Some(m) = self.maps.iter().find(|m| m.0 == d && m.1 <= b && b <= m.2)
                    else {
                        return fault(2, b);
                    };
                    let (r, w) = (m.4 & 1 != 0, m.4 & 2 != 0);
                    if (access.read && !r) || (access.write && !w) {
                        return fault(2, b);
                    }
                    out.push((b, m.3 + (b - m.1), Access { read: r, write: w }));
                }
            }
        }
        Ok(out)
    }

    /// (domain, bypass, endpoints, mappings) sorted.
    fn snapshot(&self) -> Snapshot {
        let mut v: Vec<_> = self
            .domains
            .iter()
            .map(|&(d, b)| {
                let mut eps: Vec<u32> = self
                    .attached
                    .iter()
                    .filter(|a| a.1 == d)
                    .map(|a| a.0)
                    .collect();
                eps.sort();
                let mut ms: Vec<_> = self
                    .maps
                    .iter()
                    .filter(|m| m.0 == d)
                    .map(|m| (m.1, m.2, m.3, m.4))
                    .collect();
                ms.sort();
                (d, b, eps, ms)
            })
            .collect();
        v.sort();
        v
    }
}

fn snapshot(s: &IommuState) -> Snapshot {
    s.domains()
        .map(|(id, d)| {
            let ms = d
                .mappings()
                .map(|(start, m)| (start, m.virt_end, m.phys_start, m.flags.bits()))
                .collect();
            (id, d.is_bypass(), d.endpoints().collect(), ms)
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Attach {
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved: bool,
    },
    Detach {
        domain: u32,
        endpoint: u32,
        reserved: bool,
    },
    Map {
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        start: u64,
        end: u64,
        reserved: bool,
    },
    Translate {
        endpoint: u32,
        iova: u64,
        len: u64,
        read: bool,
        write: bool,
    },
    SetBypass(bool),
    Reset,
    SystemReset,
}

fn addr() -> impl Strategy<Value = u64> {
    let raw = prop_oneof![
        5 => 0u64..=96,
        2 => (u64::MAX - 95)..=u64::MAX,
        1 => ((1u64 << 48) - 48)..=((1u64 << 48) + 16),
    ];
    prop_oneof![raw.clone(), raw.prop_map(|a| a & !3)]
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (
        addr(),
        prop_oneof![1u64..=40, (1u64..=10).prop_map(|n| n * 4)],
        prop::bool::weighted(0.8),
        addr(),
    )
        .prop_map(|(s, len, rel, other)| {
            if rel {
                (s, s.wrapping_add(len - 1))
            } else {
                (s, other)
            }
        })
}

fn endpoint() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 1u32..=4, 1 => Just(0u32), 1 => Just(9u32)]
}

fn op() -> impl Strategy<Value = Op> {
    let domain = prop_oneof![8 => 0u32..=2, 1 => 3u32..=6];
    let reserved = prop::bool::weighted(0.1);
    prop_oneof![
        4 => (domain.clone(), endpoint(), prop_oneof![6 => Just(0u32), 2 => Just(1u32), 1 => Just(2u32)], reserved)
            .prop_map(|(domain, endpoint, flags, reserved)| Op::Attach { domain, endpoint, flags, reserved }),
        2 => (domain.clone(), endpoint(), reserved)
            .prop_map(|(domain, endpoint, reserved)| Op::Detach { domain, endpoint, reserved }),
        6 => (domain.clone(), range(), prop_oneof![3 => (0u64..=0x100).prop_map(|p| p & !3), 1 => 0u64..=0x100, 1 => (u64::MAX - 64)..=u64::MAX], prop_oneof![6 => 0u32..=7, 1 => Just(8u32)])
            .prop_map(|(domain, (start, end), phys, flags)| Op::Map { domain, start, end, phys, flags }),
        3 => (domain, range(), reserved)
            .prop_map(|(domain, (start, end), reserved)| Op::Unmap { domain, start, end, reserved }),
        6 => (endpoint(), addr(), 0u64..=48, any::<bool>(), any::<bool>())
            .prop_map(|(endpoint, iova, len, read, write)| Op::Translate { endpoint, iova, len, read, write }),
        1 => any::<bool>().prop_map(Op::SetBypass),
        1 => Just(Op::Reset),
        1 => Just(Op::SystemReset),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(1u64), Just(4u64)],
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.8),
        any::<bool>(),
    )
        .prop_map(
            |(granule, full_input, legacy, negotiate_all, boot_bypass)| Setup {
                granule,
                full_input,
                legacy,
                negotiate_all,
                boot_bypass,
            },
        )
}

fn head(t: RequestType) -> ReqHead {
    ReqHead::new(t)
}

fn expand(pieces: &[virtio_iommu_device::Piece]) -> Vec<(u64, u64, Access)> {
    pieces
        .iter()
        .flat_map(|p| (0..p.len).map(move |i| (p.iova + i, p.phys.wrapping_add(i), p.allowed)))
        .collect()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    // 256 cases (about 2.5 s in a debug build): these tests run under cargo-mutants, once per
    // mutant. `PROPTEST_CASES=N` runs more.
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn state_matches_the_reference_model(setup in setup(), ops in prop::collection::vec(op(), 1..80)) {
        let (mut state, mut model) = build(setup, MAX_MAPPINGS);
        let negotiated = state.negotiated();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Attach { domain, endpoint, flags, reserved } => {
                    let req = ReqAttach {
                        head: head(RequestType::Attach),
                        domain: domain.into(),
                        endpoint: endpoint.into(),
                        flags: flags.into(),
                        reserved: [0, u8::from(reserved), 0, 0],
                    };
                    prop_assert_eq!(state.attach(&req), model.attach(domain, endpoint, flags, reserved), "op {} {:?}", i, op);
                }
                Op::Detach { domain, endpoint, reserved } => {
                    let req = ReqDetach {
                        head: head(RequestType::Detach),
                        domain: domain.into(),
                        endpoint: endpoint.into(),
                        reserved: [u8::from(reserved); 8],
                    };
                    prop_assert_eq!(state.detach(&req), model.detach(domain, endpoint), "op {} {:?}", i, op);
                }
                Op::Map { domain, start, end, phys, flags } => {
                    let req = ReqMap {
                        head: head(RequestType::Map),
                        domain: domain.into(),
                        virt_start: start.into(),
                        virt_end: end.into(),
                        phys_start: phys.into(),
                        flags: flags.into(),
                    };
                    prop_assert_eq!(state.map(&req), model.map(domain, start, end, phys, flags), "op {} {:?}", i, op);
                }
                Op::Unmap { domain, start, end, reserved } => {
                    let req = ReqUnmap {
                        head: head(RequestType::Unmap),
                        domain: domain.into(),
                        virt_start: start.into(),
                        virt_end: end.into(),
                        reserved: [0, 0, 0, u8::from(reserved)],
                    };
                    prop_assert_eq!(state.unmap(&req), model.unmap(domain, start, end, reserved), "op {} {:?}", i, op);
                }
                Op::Translate { endpoint, iova, len, read, write } => {
                    let access = Access { read, write };
                    let got = state.translate(endpoint, iova, len, access).map(|p| expand(&p));
                    let want = model.translate(endpoint, iova, len, access);
                    prop_assert_eq!(got, want, "op {} {:?}", i, op);
                }
                Op::SetBypass(b) => {
                    state.set_bypass(b);
                    model.bypass = b;
                }
                Op::Reset => {
                    state.reset();
                    state.set_negotiated(negotiated);
                    model.attached.clear();
                    model.domains.clear();
                    model.maps.clear();
                }
                Op::SystemReset => {
                    state.system_reset();
                    state.set_negotiated(negotiated);
                    model.attached.clear();
                    model.domains.clear();
                    model.maps.clear();
                    model.bypass = setup.boot_bypass && !setup.legacy;
                }
            }
            prop_assert_eq!(snapshot(&state), model.snapshot(), "state after op {} {:?}", i, op);
            prop_assert_eq!(state.mapping_count(), model.maps.len());
            prop_assert_eq!(state.bypass(), model.bypass);
            for ep in ENDPOINTS {
                prop_assert_eq!(state.endpoint_domain(ep), model.domain_of(ep));
            }
        }
    }
}

/// A deterministic long run with a larger address mix, checking the O(log n) paths on many
/// mappings against the same model.
#[test]
fn many_mappings_agree_with_the_model() {
    let (mut state, mut model) = build(
        Setup {
            granule: 1,
            full_input: true,
            legacy: false,
            negotiate_all: true,
            boot_bypass: false,
        },
        100_000,
    );
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let attach = ReqAttach {
        head: head(RequestType::Attach),
        domain: 1.into(),
        endpoint: 1.into(),
        flags: 0.into(),
        reserved: [0; 4],
    };
    assert_eq!(state.attach(&attach), model.attach(1, 1, 0, false));
    let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
    for _ in 0..3000 {
        let s = rnd() % 200;
        let e = s + rnd() % 12;
        let st = if rnd() % 3 == 0 {
            let req = ReqUnmap {
                head: head(RequestType::Unmap),
                domain: 1.into(),
                virt_start: s.into(),
                virt_end: e.into(),
                reserved: [0; 4],
            };
            let got = state.unmap(&req);
            assert_eq!(got, model.unmap(1, s, e, false));
            got
        } else {
            let req = ReqMap {
                head: head(RequestType::Map),
                domain: 1.into(),
                virt_start: s.into(),
                virt_end: e.into(),
                phys_start: (s * 7).into(),
                flags: 3.into(),
            };
            let got = state.map(&req);
            assert_eq!(got, model.map(1, s, e, s * 7, 3));
            got
        };
        *counts.entry(st as u8).or_default() += 1;
        let iova = rnd() % 220;
        assert_eq!(
            state
                .translate(1, iova, 8, Access::READ)
                .map(|p| expand(&p)),
            model.translate(1, iova, 8, Access::READ)
        );
    }
    assert!(counts.len() >= 3, "several outcomes exercised: {counts:?}");
}
