//! Arbitrary sequences of ATTACH / DETACH / MAP / UNMAP / PROBE / translate (and bypass,
//! negotiation and reset changes) on `IommuState`, with arbitrary field values. After every
//! operation the state's invariants are checked (`virtio_iommu_fuzz::check_invariants`), and
//! each operation's documented effect:
//! - a request that does not return `S_OK` changes nothing (D14, D28, D31, "a rejected MAP
//!   changes nothing"), in particular an UNMAP answered `S_RANGE`;
//! - MAP `S_OK` adds exactly that mapping, and translating any byte of it gives
//!   `phys_start + offset`;
//! - UNMAP `S_OK` removes exactly the mappings whose start is in the range, each of which lies
//!   wholly inside it; nothing else changes;
//! - ATTACH/DETACH `S_OK` move the endpoint as documented and touch no other domain's mappings;
//! - PROBE's bytes parse with the driver's parser into the configured regions;
//! - translate agrees with a naive byte-by-byte model (`check_translate`).
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_iommu_device::{Access, IommuState};
use virtio_iommu_driver::parse::{parse_probe_properties, ProbeProperty, ResvMemKind};
use virtio_iommu_driver::wire::{
    Features, MapFlags, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqUnmap, RequestType, Status,
    ATTACH_F_BYPASS,
};
use virtio_iommu_fuzz::{
    access, check_invariants, check_translate, Addr, CfgSpec, Dom, End, Ep, MapFlagSel, Snapshot,
};

#[derive(Arbitrary, Debug)]
struct Input {
    cfg: CfgSpec,
    /// Negotiated = offered minus these bits (bits 0..=6), as the device would accept.
    not_negotiated: Option<u8>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Attach {
        domain: Dom,
        ep: Ep,
        bypass: bool,
        /// Extra flag bits, and a non-zero reserved byte (both must be refused).
        bad_flags: Option<u32>,
        reserved: Option<u8>,
    },
    Detach {
        domain: Dom,
        ep: Ep,
        reserved: u8,
    },
    Map {
        domain: Dom,
        start: Addr,
        end: End,
        phys: Addr,
        flags: MapFlagSel,
    },
    /// Many MAPs at once (so the mapping table's leaves split and merge).
    MapMany {
        domain: Dom,
        start: Addr,
        count: u16,
        stride: u8,
        pages: u8,
        descending: bool,
    },
    Unmap {
        domain: Dom,
        start: Addr,
        end: End,
        reserved: Option<u8>,
    },
    Probe {
        ep: Ep,
        /// Properties buffer size: `probe_size` plus or minus this.
        delta: i8,
    },
    Translate {
        ep: Ep,
        iova: Addr,
        len: Len,
        access: u8,
    },
    /// Translate one byte of an existing mapping (the `n`-th over all domains).
    TranslateMapped {
        n: u16,
        offset: u64,
    },
    SetBypass(bool),
    Negotiate(u8),
    Reset,
    SystemReset,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Small(u8),
    Pages(u8),
    Raw(u64),
}

impl Len {
    fn get(self, granule: u64) -> u64 {
        match self {
            Len::Small(n) => u64::from(n),
            Len::Pages(n) => u64::from(n) * granule.max(0x1000),
            Len::Raw(v) => v,
        }
    }
}

fn attach_req(domain: u32, ep: u32, flags: u32, reserved: [u8; 4]) -> ReqAttach {
    ReqAttach {
        head: ReqHead::new(RequestType::Attach),
        domain: domain.into(),
        endpoint: ep.into(),
        flags: flags.into(),
        reserved,
    }
}

fn map_req(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> ReqMap {
    ReqMap {
        head: ReqHead::new(RequestType::Map),
        domain: domain.into(),
        virt_start: start.into(),
        virt_end: end.into(),
        phys_start: phys.into(),
        flags: flags.into(),
    }
}

fn unmap_req(domain: u32, start: u64, end: u64, reserved: [u8; 4]) -> ReqUnmap {
    ReqUnmap {
        head: ReqHead::new(RequestType::Unmap),
        domain: domain.into(),
        virt_start: start.into(),
        virt_end: end.into(),
        reserved,
    }
}

/// MAP, then check its effect against the snapshot taken before.
fn do_map(s: &mut IommuState, req: &ReqMap) -> Status {
    let before = Snapshot::of(s);
    let st = s.map(req);
    let after = Snapshot::of(s);
    let domain = req.domain.get();
    let (start, end, phys) = (
        req.virt_start.get(),
        req.virt_end.get(),
        req.phys_start.get(),
    );
    if st != Status::Ok {
        assert_eq!(before, after, "MAP {st:?} changed the state");
        if end < start {
            assert_eq!(st, Status::Inval, "inverted MAP");
        }
        return st;
    }
    assert!(start <= end);
    let flags = MapFlags::from_bits(req.flags.get()).expect("MAP accepted unknown flags");
    let mut want = before.clone();
    let d = want
        .domains
        .iter_mut()
        .find(|d| d.id == domain)
        .expect("MAP OK on a missing domain");
    assert!(!d.bypass, "MAP OK on a bypass domain");
    let pos = d.mappings.partition_point(|(v, _)| *v < start);
    d.mappings.insert(
        pos,
        (
            start,
            virtio_iommu_device::Mapping {
                virt_end: end,
                phys_start: phys,
                flags,
            },
        ),
    );
    want.mapping_count += 1;
    assert_eq!(after, want, "MAP OK did not add exactly the mapping");
    // Translation through an endpoint of the domain: both ends and the middle.
    let ep = after.domain(domain).unwrap().endpoints[0];
    for off in [0, (end - start) / 2, end - start] {
        let r = s
            .translate(ep, start + off, 1, Access::NONE)
            .expect("translate of a fresh mapping");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].phys, phys + off, "phys_start + offset");
    }
    st
}

fn do_unmap(s: &mut IommuState, req: &ReqUnmap) -> Status {
    let before = Snapshot::of(s);
    let st = s.unmap(req);
    let after = Snapshot::of(s);
    let (domain, start, end) = (req.domain.get(), req.virt_start.get(), req.virt_end.get());
    if st != Status::Ok {
        assert_eq!(before, after, "UNMAP {st:?} changed the state");
        if st == Status::Range {
            // D31: a split mapping, or outside input_range; either way nothing removed.
        }
        return st;
    }
    assert!(start <= end && req.reserved == [0; 4]);
    let mut want = before.clone();
    let d = want
        .domains
        .iter_mut()
        .find(|d| d.id == domain)
        .expect("UNMAP OK on a missing domain");
    let mut removed = 0;
    d.mappings.retain(|(v, m)| {
        let inside = start <= *v && *v <= end;
        if inside {
            assert!(m.virt_end <= end, "UNMAP OK split a mapping (D31)");
            removed += 1;
        } else {
            assert!(
                m.virt_end < start || *v > end,
                "UNMAP OK left a mapping straddling the range start (D31)"
            );
        }
        !inside
    });
    want.mapping_count -= removed;
    assert_eq!(after, want, "UNMAP OK removed the wrong mappings");
    st
}

fn do_attach(s: &mut IommuState, req: &ReqAttach) -> Status {
    let before = Snapshot::of(s);
    let st = s.attach(req);
    let after = Snapshot::of(s);
    let (domain, ep) = (req.domain.get(), req.endpoint.get());
    if st != Status::Ok {
        assert_eq!(before, after, "ATTACH {st:?} changed the state (D14/D15)");
        return st;
    }
    assert_eq!(after.endpoint_domain(ep), Some(domain));
    let d = after.domain(domain).unwrap();
    assert_eq!(d.bypass, req.flags.get() & ATTACH_F_BYPASS != 0);
    // Mappings of the target domain are kept (D17); other domains only lose `ep` (and an old
    // domain left empty disappears with its mappings).
    if let Some(old) = before.domain(domain) {
        assert_eq!(
            old.mappings, d.mappings,
            "ATTACH changed the domain's mappings"
        );
    } else {
        assert!(d.mappings.is_empty());
    }
    for od in &before.domains {
        if od.id == domain {
            continue;
        }
        match after.domain(od.id) {
            Some(nd) => {
                assert_eq!(od.mappings, nd.mappings);
                let mut eps = od.endpoints.clone();
                eps.retain(|&e| e != ep);
                assert_eq!(nd.endpoints, eps);
            }
            None => assert_eq!(od.endpoints, vec![ep], "a non-empty domain vanished"),
        }
    }
    st
}

fn do_detach(s: &mut IommuState, req: &ReqDetach) -> Status {
    let before = Snapshot::of(s);
    let st = s.detach(req);
    let after = Snapshot::of(s);
    let (domain, ep) = (req.domain.get(), req.endpoint.get());
    if st != Status::Ok {
        assert_eq!(before, after, "DETACH {st:?} changed the state");
        return st;
    }
    assert_eq!(before.endpoint_domain(ep), Some(domain));
    assert_eq!(after.endpoint_domain(ep), None);
    match after.domain(domain) {
        Some(d) => {
            assert!(!d.endpoints.contains(&ep));
            assert_eq!(d.mappings, before.domain(domain).unwrap().mappings);
        }
        None => assert_eq!(before.domain(domain).unwrap().endpoints, vec![ep]),
    }
    st
}

fn do_probe(s: &IommuState, ep: u32, len: usize) {
    let mut buf = vec![0xa5u8; len];
    let st = s.probe(ep, &mut buf);
    assert!(buf.iter().all(|&b| b == 0) || st == Status::Ok, "D40/D39");
    let probe_size = s.config().probe_size() as usize;
    if len < probe_size {
        assert_eq!(st, Status::Inval, "D39");
        return;
    }
    let Some(regions) = s.config().resv_regions(ep) else {
        assert_eq!(st, Status::NoEnt, "D34");
        return;
    };
    if !s.config().offered().contains(Features::PROBE) {
        // The configuration only guarantees that the regions fit `probe_size` when PROBE is
        // offered; the device never calls `probe` otherwise (used length 0, D35). Directly
        // called, it may answer S_DEVERR with nothing written.
        assert!(st == Status::Ok || (st == Status::DevErr && buf.iter().all(|&b| b == 0)));
        return;
    }
    assert_eq!(st, Status::Ok);
    let mut got = Vec::new();
    parse_probe_properties(&buf, |p| got.push(p)).expect("device PROBE bytes parse");
    let want: Vec<ProbeProperty> = regions
        .iter()
        .map(|r| {
            ProbeProperty::ResvMem(virtio_iommu_driver::parse::ReservedRegion {
                kind: match r.kind {
                    virtio_iommu_device::config::ResvKind::Msi => ResvMemKind::Msi,
                    virtio_iommu_device::config::ResvKind::Reserved => ResvMemKind::Reserved,
                },
                start: r.start,
                end: r.end,
            })
        })
        .collect();
    assert_eq!(got, want, "PROBE properties");
}

fuzz_target!(|input: Input| {
    let Some(cfg) = input.cfg.build() else {
        return;
    };
    let granule = cfg.granule();
    let offered = cfg.offered();
    let mut s = IommuState::new(Arc::new(cfg));
    let negotiate = |bits: u8| offered - Features::from_bits_truncate(u64::from(bits & 0x7f));
    s.set_negotiated(negotiate(input.not_negotiated.unwrap_or(0)));
    let mut mapping_budget = 4000usize;
    for op in input.ops.iter().take(256) {
        match *op {
            Op::Attach {
                domain,
                ep,
                bypass,
                bad_flags,
                reserved,
            } => {
                let flags = u32::from(bypass) | bad_flags.unwrap_or(0);
                let reserved = [0, 0, 0, reserved.unwrap_or(0)];
                let req = attach_req(domain.get(), ep.get(), flags, reserved);
                let st = do_attach(&mut s, &req);
                if flags & !ATTACH_F_BYPASS != 0 || reserved != [0; 4] {
                    assert_eq!(st, Status::Inval, "D10/D11");
                }
            }
            Op::Detach {
                domain,
                ep,
                reserved,
            } => {
                let req = ReqDetach {
                    head: ReqHead::new(RequestType::Detach),
                    domain: domain.get().into(),
                    endpoint: ep.get().into(),
                    reserved: [reserved; 8],
                };
                do_detach(&mut s, &req);
            }
            Op::Map {
                domain,
                start,
                end,
                phys,
                flags,
            } => {
                let start = start.get(granule);
                let req = map_req(
                    domain.get(),
                    start,
                    end.get(start, granule),
                    phys.get(granule),
                    flags.get(),
                );
                do_map(&mut s, &req);
            }
            Op::MapMany {
                domain,
                start,
                count,
                stride,
                pages,
                descending,
            } => {
                let count = usize::from(count % 700).min(mapping_budget);
                mapping_budget -= count;
                let g = granule.max(0x1000);
                let size = (u64::from(pages % 4) + 1) * g;
                let step = size + u64::from(stride % 4) * g;
                let base = start.get(granule);
                for i in 0..count as u64 {
                    let k = if descending { count as u64 - 1 - i } else { i };
                    let Some(v) = k.checked_mul(step).and_then(|o| base.checked_add(o)) else {
                        break;
                    };
                    let end = v.wrapping_add(size - 1);
                    let req = map_req(domain.get(), v, end, v & !(g - 1), 3);
                    // Full checks on a sample; the invariants run after the batch anyway.
                    if i % 61 == 0 {
                        do_map(&mut s, &req);
                    } else {
                        s.map(&req);
                    }
                }
            }
            Op::Unmap {
                domain,
                start,
                end,
                reserved,
            } => {
                let start = start.get(granule);
                let req = unmap_req(
                    domain.get(),
                    start,
                    end.get(start, granule),
                    [reserved.unwrap_or(0), 0, 0, 0],
                );
                do_unmap(&mut s, &req);
            }
            Op::Probe { ep, delta } => {
                let len = (s.config().probe_size() as i64 + i64::from(delta)).max(0) as usize;
                do_probe(&s, ep.get(), len);
            }
            Op::Translate {
                ep,
                iova,
                len,
                access: a,
            } => {
                check_translate(&s, ep.get(), iova.get(granule), len.get(granule), access(a));
            }
            Op::TranslateMapped { n, offset } => {
                let snap = Snapshot::of(&s);
                let all: Vec<_> = snap
                    .domains
                    .iter()
                    .flat_map(|d| d.mappings.iter().map(move |m| (d, *m)))
                    .collect();
                if let Some((d, (start, m))) = all.get(usize::from(n) % all.len().max(1)) {
                    let span = m.virt_end - start;
                    let off = match span.checked_add(1) {
                        Some(size) => offset % size,
                        None => offset,
                    };
                    for &ep in &d.endpoints {
                        let r = s.translate(ep, start + off, 1, Access::NONE).unwrap();
                        assert_eq!(r[0].phys, m.phys_start + off, "phys_start + offset");
                        let want_r = m.flags.contains(MapFlags::READ);
                        let want_w = m.flags.contains(MapFlags::WRITE);
                        assert_eq!(
                            s.translate(ep, start + off, 1, Access::READ).is_ok(),
                            want_r,
                            "D27 read"
                        );
                        assert_eq!(
                            s.translate(ep, start + off, 1, Access::WRITE).is_ok(),
                            want_w,
                            "D27 write"
                        );
                        check_translate(&s, ep, start + off, 0x3000, Access::READ);
                    }
                }
            }
            Op::SetBypass(b) => s.set_bypass(b),
            Op::Negotiate(bits) => s.set_negotiated(negotiate(bits)),
            Op::Reset => {
                s.reset();
                assert_eq!(s.domain_count(), 0);
                assert_eq!(s.mapping_count(), 0);
                s.set_negotiated(negotiate(input.not_negotiated.unwrap_or(0)));
            }
            Op::SystemReset => {
                s.system_reset();
                assert_eq!(s.bypass(), s.config().boot_bypass());
                s.set_negotiated(negotiate(input.not_negotiated.unwrap_or(0)));
            }
        }
        check_invariants(&s);
    }
    if std::env::var_os("FUZZ_STATS").is_some() {
        let per_domain = s.domains().map(|(_, d)| d.mapping_count()).max();
        eprintln!(
            "stats: domains {} mappings {} largest {}",
            s.domain_count(),
            s.mapping_count(),
            per_domain.unwrap_or(0)
        );
    }
});
