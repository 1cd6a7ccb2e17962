//! The cases. Statement numbers are the project's numbering of virtio v1.3 §5.13's normative
//! statements (D device, R driver requirements), each listed with its spec section in the
//! "Statement index" of `CONFORMANCE.md`; each `statement` string starts with the number and
//! says in a few words what must hold.

use crate::{Case, Ctx, Fail, Harness, Hazard, RawReply, DMA_BUFFER_SIZE};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use virtio_iommu_driver::wire::{
    Features, MapFlags, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqProbe, ReqUnmap, RequestType,
    Status, ATTACH_F_BYPASS,
};
use virtio_iommu_driver::{
    FaultEvent, FaultReason, IommuError, ProbeProperty, ResvMemKind, WRITABLE_FILL,
};
use zerocopy::IntoBytes;

type R = Result<(), Fail>;

const RD: u32 = MapFlags::READ.bits();
const WR: u32 = MapFlags::WRITE.bits();
/// Bytes moved by data-checking DMAs.
const L: u64 = 256;
/// Bytes moved by DMAs expected to fault (QEMU reports one event per 4-byte access).
const SHORT: u64 = 16;

const _: () = assert!(L <= DMA_BUFFER_SIZE);

// ---------------------------------------------------------------- helpers

fn diverges<T>(what: String) -> Result<T, Fail> {
    Err(Fail::Diverges(what))
}

fn not_run<T>(why: &str) -> Result<T, Fail> {
    Err(Fail::NotRun(why.into()))
}

/// The status a request completed with, or a harness error for anything that is not a status.
fn status(r: Result<(), IommuError>) -> Result<Status, Fail> {
    match r {
        Ok(()) => Ok(Status::Ok),
        Err(IommuError::Status(s)) => Ok(s),
        Err(e) => Err(Fail::Error(format!("{e}"))),
    }
}

fn expect(r: Result<(), IommuError>, want: Status, what: &str) -> R {
    match r {
        Err(IommuError::UnknownStatus(b)) => diverges(format!("{what}: undefined status {b}")),
        Err(IommuError::NoResponse) => diverges(format!("{what}: used length 0")),
        other => {
            let got = status(other)?;
            if got == want {
                Ok(())
            } else {
                diverges(format!("{what}: {}", got.name()))
            }
        }
    }
}

fn ok(r: Result<(), IommuError>, what: &str) -> R {
    expect(r, Status::Ok, what)
}

/// Raw request with one readable part and a 4-byte tail; `NotRun` if the backend can't.
fn raw(h: &mut dyn Harness, readable: &[u8]) -> Result<RawReply, Fail> {
    raw_parts(h, &[readable], &[4])
}

fn raw_parts(
    h: &mut dyn Harness,
    readable: &[&[u8]],
    writable: &[usize],
) -> Result<RawReply, Fail> {
    match h.raw(readable, writable) {
        None => not_run("backend cannot send raw requests"),
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(Fail::Error(format!("{e}"))),
    }
}

/// The tail status of a raw reply: the last 4 writable bytes must be the tail, used length =
/// posted writable size. Raw writable parts are posted filled with [`WRITABLE_FILL`] (no
/// status), so a status byte still holding it was not written by the device.
fn raw_status(reply: &RawReply, what: &str) -> Result<Status, Fail> {
    let n = reply.writable.len();
    if reply.used as usize != n {
        return diverges(format!(
            "{what}: used length {} for a {n}-byte writable part",
            reply.used
        ));
    }
    let b = reply.writable[n - 4];
    if b == WRITABLE_FILL {
        return diverges(format!(
            "{what}: status not written (used length {})",
            reply.used
        ));
    }
    Status::from_u8(b).ok_or_else(|| Fail::Diverges(format!("{what}: undefined status {b}")))
}

/// Whether every byte of `b` still holds the fill the driver posted it with (not written).
fn unwritten(b: &[u8]) -> bool {
    b.iter().all(|&x| x == WRITABLE_FILL)
}

fn expect_raw(reply: &RawReply, want: Status, what: &str) -> R {
    let got = raw_status(reply, what)?;
    if got == want {
        Ok(())
    } else {
        diverges(format!("{what}: {}", got.name()))
    }
}

fn attach_req(domain: u32, endpoint: u32, flags: u32, reserved: [u8; 4]) -> ReqAttach {
    ReqAttach {
        head: ReqHead::new(RequestType::Attach),
        domain: domain.into(),
        endpoint: endpoint.into(),
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

fn probe_req(endpoint: u32, reserved: [u8; 64]) -> ReqProbe {
    ReqProbe {
        head: ReqHead::new(RequestType::Probe),
        endpoint: endpoint.into(),
        reserved,
    }
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len as usize)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn page(h: &mut dyn Harness) -> Result<u64, Fail> {
    h.alloc_page()
        .ok_or_else(|| Fail::Error("out of DMA pages".into()))
}

fn need(h: &dyn Harness, f: Features, what: &str) -> R {
    if h.features().contains(f) {
        Ok(())
    } else {
        not_run(&format!("{what} not negotiated"))
    }
}

/// A fresh domain with the DMA endpoint attached to it.
fn attached(h: &mut dyn Harness, ctx: &mut Ctx) -> Result<u32, Fail> {
    let d = ctx.domain()?;
    let ep = h.endpoints().dma;
    ok(h.attach(d, ep), "ATTACH")?;
    Ok(d)
}

/// Leaves the DMA endpoint unattached (attach to a fresh domain, then detach).
fn unattached(h: &mut dyn Harness, ctx: &mut Ctx) -> R {
    let d = attached(h, ctx)?;
    let ep_ = h.endpoints().dma;
    ok(h.detach(d, ep_), "DETACH")
}

/// Loads the endpoint's buffer with `data` through a temporary READ mapping in `dom` (the
/// endpoint must be attached to `dom`).
fn load(h: &mut dyn Harness, ctx: &mut Ctx, dom: u32, data: &[u8]) -> R {
    let g = ctx.granule;
    let src = page(h)?;
    h.write_phys(src, data);
    let iova = ctx.iova(1);
    ok(h.map(dom, iova, iova + g - 1, src, RD), "MAP (load)")?;
    h.dma_in(iova, data.len() as u64);
    ok(h.unmap(dom, iova, iova + g - 1), "UNMAP (load)")
}

/// Loads the endpoint's buffer with `data` through identity translation (bypass).
fn load_identity(h: &mut dyn Harness, data: &[u8]) -> R {
    let src = page(h)?;
    h.write_phys(src, data);
    h.dma_in(src, data.len() as u64);
    Ok(())
}

/// Reads back what the endpoint's buffer holds, through a temporary WRITE mapping in `dom`.
fn unload(h: &mut dyn Harness, ctx: &mut Ctx, dom: u32, len: u64) -> Result<Vec<u8>, Fail> {
    let g = ctx.granule;
    let dst = page(h)?;
    let iova = ctx.iova(1);
    ok(h.map(dom, iova, iova + g - 1, dst, WR), "MAP (unload)")?;
    h.dma_out(iova, len);
    ok(h.unmap(dom, iova, iova + g - 1), "UNMAP (unload)")?;
    Ok(h.read_phys(dst, len as usize))
}

/// Drains faults; `Ok(events)`.
fn faults(h: &mut dyn Harness) -> Result<Vec<FaultEvent>, Fail> {
    h.faults().map_err(Fail::from)
}

/// At least one fault; all from `ep`, with a reason in `reasons`, address (when given) inside
/// `start..start + len`.
fn expect_faults(
    h: &mut dyn Harness,
    ep: u32,
    start: u64,
    len: u64,
    reasons: &[FaultReason],
) -> Result<Vec<FaultEvent>, Fail> {
    let events = faults(h)?;
    if events.is_empty() {
        return diverges("no fault event".into());
    }
    for f in &events {
        if f.endpoint != ep {
            return diverges(format!(
                "fault names endpoint {:#x}, not {ep:#x}",
                f.endpoint
            ));
        }
        if !reasons.contains(&f.reason) {
            return diverges(format!("fault reason {:?}", f.reason));
        }
        if let Some(a) = f.address {
            if a < start || a - start >= len {
                return diverges(format!("fault address {a:#x} outside {start:#x}+{len:#x}"));
            }
        }
    }
    Ok(events)
}

fn no_faults(h: &mut dyn Harness) -> R {
    let events = faults(h)?;
    match events.first() {
        None => Ok(()),
        Some(f) => diverges(format!(
            "unexpected fault {:?} at {:?}",
            f.reason, f.address
        )),
    }
}

/// Runs `f` with `bypass` set to `on`, restoring the previous value afterwards.
fn with_bypass(h: &mut dyn Harness, on: bool, f: impl FnOnce(&mut dyn Harness) -> R) -> R {
    need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
    let before = h.bypass().unwrap_or(true);
    ok(h.set_bypass(on), "write bypass")?;
    let r = f(h);
    ok(h.set_bypass(before), "restore bypass")?;
    r
}

/// Whether DMA through `iova` in the endpoint's current domain reads `phys`'s content.
fn translates_read(
    h: &mut dyn Harness,
    ctx: &mut Ctx,
    dom: u32,
    iova: u64,
    phys: u64,
) -> Result<bool, Fail> {
    // A fresh pattern: a read that fails and leaves the endpoint's buffer as it was must not
    // pass for a translated one.
    let data = pattern(ctx.seed(), L);
    h.write_phys(phys, &data);
    h.dma_in(iova, L);
    let got = unload(h, ctx, dom, L)?;
    Ok(got == data)
}

// ---------------------------------------------------------------- cases

/// `"id", "statement", body;` or, for a case that breaks driver statements on purpose,
/// `"id", "statement" violates ["R6", ...], body;` (see [`Case::violates`]).
macro_rules! cases {
    ($($id:literal, $stmt:literal $(violates [$($v:literal),* $(,)?])?, $f:expr;)*) => {
        /// Every case, in run order.
        pub static CASES: &[Case] = &[$(Case {
            id: $id,
            statement: $stmt,
            violates: &[$($($v),*)?],
            run: $f,
        }),*];
    };
}

cases! {
    // Feature bits and configuration (§5.13.3, §5.13.4)
    "feat-version-1", "§6.1 VERSION_1 offered and negotiated", |h, _| {
        if h.features().contains(Features::VERSION_1) { Ok(()) } else { diverges("not negotiated".into()) }
    };
    "feat-map-unmap", "D1 device SHOULD offer MAP_UNMAP", |h, _| {
        if h.offered().contains(Features::MAP_UNMAP) { Ok(()) } else { diverges("not offered".into()) }
    };
    "feat-no-legacy-bypass", "D2 SHOULD NOT offer F_BYPASS (superseded by BYPASS_CONFIG)", |h, _| {
        if h.offered().contains(Features::BYPASS) { diverges("F_BYPASS offered".into()) } else { Ok(()) }
    };
    "cfg-page-size-mask", "D3 page_size_mask has at least one bit set", |h, _| {
        let m = h.raw_config()?.page_size_mask.get();
        if m != 0 { Ok(()) } else { diverges("page_size_mask = 0".into()) }
    };
    "cfg-bypass-value", "D5 bypass reads 0 or 1", |h, _| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        // The driver ignores bits 1-7 (R3); the device must not set them.
        match h.raw_config()?.bypass { 0 | 1 => Ok(()), v => diverges(format!("bypass = {v}")) }
    };
    "cfg-input-range", "§5.13.6 input_range start <= end and wide enough for one granule", |h, _| {
        need(h, Features::INPUT_RANGE, "INPUT_RANGE")?;
        let c = h.raw_config()?;
        let (s, e) = (c.input_range.start.get(), c.input_range.end.get());
        let g = h.config().granule;
        if s <= e && e - s >= g - 1 { Ok(()) } else { diverges(format!("{s:#x}..={e:#x}")) }
    };
    "cfg-domain-range", "§5.13.6 domain_range start <= end", |h, _| {
        need(h, Features::DOMAIN_RANGE, "DOMAIN_RANGE")?;
        let c = h.raw_config()?;
        let (s, e) = (c.domain_range.start.get(), c.domain_range.end.get());
        if s <= e { Ok(()) } else { diverges(format!("{s}..={e}")) }
    };
    "cfg-probe-size", "§5.13.4 probe_size holds at least one RESV_MEM property when PROBE is offered", |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let p = h.raw_config()?.probe_size.get();
        if p >= 24 { Ok(()) } else { diverges(format!("probe_size {p}")) }
    };

    // Request framing (§5.13.6)
    "req-ok-status", "D6 a successful request returns S_OK with used length 4", |h, ctx| {
        let d = ctx.domain()?;
        let ep = h.endpoints().dma;
        let r = raw(h, attach_req(d, ep, 0, [0; 4]).as_bytes())?;
        expect_raw(&r, Status::Ok, "ATTACH")
    };
    "req-tail-reserved", "D8 device SHOULD write tail.reserved as 0", |h, ctx| {
        let d = ctx.domain()?;
        let ep = h.endpoints().dma;
        let r = raw(h, attach_req(d, ep, 0, [0; 4]).as_bytes())?;
        expect_raw(&r, Status::Ok, "ATTACH")?;
        // Posted as WRITABLE_FILL: zeros here were written by the device.
        let reserved = &r.writable[1..4];
        if reserved == [0, 0, 0] { Ok(()) }
        else if reserved.contains(&WRITABLE_FILL) { diverges(format!("tail.reserved not written: {reserved:?}")) }
        else { diverges(format!("tail.reserved {reserved:?}")) }
    };
    "req-head-reserved", "D8 device MUST ignore head.reserved" violates ["R6"], |h, ctx| {
        let d = ctx.domain()?;
        let mut req = attach_req(d, h.endpoints().dma, 0, [0; 4]);
        req.head.reserved = [0xff; 3];
        let r = raw(h, req.as_bytes())?;
        expect_raw(&r, Status::Ok, "ATTACH with head.reserved set")
    };
    "req-unknown-type", "D7 unknown request type: buffer not written, used length 0" violates ["I1"], |h, _| {
        let mut req = [0u8; 20];
        req[0] = 0x7f;
        let r = raw(h, &req)?;
        if r.used == 0 && unwritten(&r.writable) { Ok(()) } else {
            diverges(format!("used length {}, tail status {}", r.used, r.writable[0]))
        }
    };
    "req-type-zero", "D7 request type 0 is undefined: used length 0" violates ["I1"], |h, _| {
        let req = [0u8; 20];
        let r = raw(h, &req)?;
        if r.used == 0 { Ok(()) } else { diverges(format!("used length {}, status {}", r.used, r.writable[0])) }
    };
    "req-split-descriptors", "§5.13.6 / §2.7 a request split over many descriptors is the same request", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        let req = map_req(d, iova, iova + g - 1, p, RD);
        let b = req.as_bytes();
        // 36 readable bytes in 7 pieces (cut inside fields), the tail in 2 pieces.
        let parts: [&[u8]; 7] = [&b[..1], &b[1..5], &b[5..11], &b[11..20], &b[20..21], &b[21..33], &b[33..]];
        let r = raw_parts(h, &parts, &[3, 1])?;
        expect_raw(&r, Status::Ok, "split MAP")?;
        // The mapping really exists: a second MAP of the range overlaps.
        expect(h.map(d, iova, iova + g - 1, p, RD), Status::Inval, "MAP again")
    };
    "req-short-readable", "§5.13.6 a readable part shorter than the request is rejected (S_INVAL), nothing done" violates ["I1"], |h, ctx| {
        let d = ctx.domain()?;
        let ep = h.endpoints().dma;
        let req = attach_req(d, ep, 0, [0; 4]);
        // Domain and endpoint present, flags and reserved missing: a device that pads the
        // request would attach the endpoint.
        let r = raw(h, &req.as_bytes()[..12])?;
        // Returned unwritten (used length 0) is a refusal too; either way nothing is done.
        if r.used != 0 { expect_raw(&r, Status::Inval, "ATTACH with 12 readable bytes")?; }
        // Not attached: DETACH says so.
        match status(h.detach(d, ep))? {
            Status::Ok => diverges(format!("the truncated ATTACH attached the endpoint (used length {})", r.used)),
            _ => Ok(()),
        }
    };
    "req-no-tail", "§5.13.6 a request without room for the tail is returned unwritten (used length 0)" violates ["I1"], |h, ctx| {
        if let Some(why) = h.hazard(Hazard::NoTail) { return not_run(why); }
        let d = ctx.domain()?;
        let req = attach_req(d, h.endpoints().dma, 0, [0; 4]);
        let r = match h.raw(&[req.as_bytes()], &[2]) {
            None => return not_run("backend cannot send raw requests"),
            Some(Err(IommuError::DeviceNeedsReset)) => return diverges("device set DEVICE_NEEDS_RESET, request never returned".into()),
            Some(r) => r?,
        };
        if h.needs_reset() { return diverges("device set DEVICE_NEEDS_RESET".into()); }
        if r.used == 0 { Ok(()) } else { diverges(format!("used length {}", r.used)) }
    };

    // ATTACH (§5.13.6.3)
    "attach-ok", "D17 ATTACH of an existing endpoint to a new domain succeeds", |h, ctx| {
        let d = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        ok(h.attach(d, ep_), "ATTACH")
    };
    "attach-reserved", "D10 ATTACH with reserved != 0: S_INVAL" violates ["R10"], |h, ctx| {
        let d = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        let r = raw(h, attach_req(d, ep_, 0, [1, 0, 0, 0]).as_bytes())?;
        expect_raw(&r, Status::Inval, "ATTACH reserved=1")
    };
    "attach-unknown-flag", "D11 ATTACH with an undefined flag bit: S_INVAL" violates ["I1"], |h, ctx| {
        let d = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        let r = raw(h, attach_req(d, ep_, 1 << 7, [0; 4]).as_bytes())?;
        expect_raw(&r, Status::Inval, "ATTACH flags=0x80")
    };
    "attach-unknown-endpoint", "D12 ATTACH of an endpoint that does not exist: S_NOENT", |h, ctx| {
        let Some(absent) = h.endpoints().absent else { return not_run("no absent endpoint ID"); };
        let d = ctx.domain()?;
        expect(h.attach(d, absent), Status::NoEnt, "ATTACH")
    };
    "attach-shared-domain", "D13 a second endpoint MAY join a domain, else S_UNSUPP", |h, ctx| {
        let Some(other) = h.endpoints().other else { return not_run("no second endpoint"); };
        let d = attached(h, ctx)?;
        match status(h.attach(d, other))? {
            Status::Ok => { ok(h.detach(d, other), "DETACH other") }
            Status::Unsupp => Ok(()),
            s => diverges(format!("second ATTACH: {}", s.name())),
        }
    };
    "attach-move", "D15 ATTACH of an endpoint attached elsewhere moves it: DMA uses the new domain", |h, ctx| {
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let a = attached(h, ctx)?;
        let data = pattern(ctx.seed(), L);
        load(h, ctx, a, &data)?;
        let b = ctx.domain()?;
        ok(h.attach(b, ep), "ATTACH to the second domain")?;
        let (pa, pb) = (page(h)?, page(h)?);
        let iova = ctx.iova(1);
        ok(h.map(b, iova, iova + g - 1, pb, WR), "MAP in the second domain")?;
        // The same IOVA in the first domain would go elsewhere; it no longer applies.
        let _ = h.map(a, iova, iova + g - 1, pa, WR);
        h.dma_out(iova, L);
        no_faults(h)?;
        if h.read_phys(pb, L as usize) != data { return diverges("DMA did not reach the new domain's page".into()); }
        if h.read_phys(pa, L as usize).iter().any(|&b| b != 0) { return diverges("DMA reached the old domain's page".into()); }
        Ok(())
    };
    "attach-move-old-unreachable", "D15/D21 after moving, the old domain's mappings are unreachable", |h, ctx| {
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let a = attached(h, ctx)?;
        let p = page(h)?;
        let iova = ctx.iova(1);
        ok(h.map(a, iova, iova + g - 1, p, RD), "MAP")?;
        let b = ctx.domain()?;
        ok(h.attach(b, ep), "ATTACH elsewhere")?;
        h.dma_in(iova, SHORT);
        expect_faults(h, ep, iova, SHORT, &[FaultReason::Mapping]).map(|_| ())
    };
    "attach-bypass-inconsistent", "D14 ATTACH whose ATTACH_F_BYPASS differs from the domain's: S_INVAL" violates ["R12"], |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let Some(other) = h.endpoints().other else { return not_run("no second endpoint"); };
        let d = attached(h, ctx)?;
        expect(h.attach_bypass(d, other), Status::Inval, "ATTACH_F_BYPASS to a translated domain")
    };
    "attach-rejected-no-effect", "D14 a rejected ATTACH leaves the endpoint in its domain" violates ["R12"], |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let Some(other) = h.endpoints().other else { return not_run("no second endpoint"); };
        // A bypass domain holding `other`, and `ep` in a translated domain with a mapping.
        let byp = ctx.domain()?;
        ok(h.attach_bypass(byp, other), "ATTACH_F_BYPASS other")?;
        let d = attached(h, ctx)?;
        let p = page(h)?;
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        expect(h.attach(byp, ep), Status::Inval, "ATTACH without F_BYPASS to a bypass domain")?;
        let _ = h.detach(byp, other);
        if !translates_read(h, ctx, d, iova, p).unwrap_or(false) {
            return diverges("the endpoint lost its domain and mappings after the rejected ATTACH".into());
        }
        ok(h.detach(d, ep), "DETACH from its domain after the rejected ATTACH")
    };
    "attach-domain-range", "R9 driver never sends a domain outside domain_range", |h, _| {
        let (s, e) = h.config().domain_range;
        let out = if e < u32::MAX { e + 1 } else if s > 0 { s - 1 } else { return not_run("domain_range is all of u32"); };
        let ep_ = h.endpoints().dma;
        match h.attach(out, ep_) {
            Err(IommuError::DomainOutOfRange(_)) => Ok(()),
            other => diverges(format!("driver sent it: {other:?}")),
        }
    };

    // DETACH (§5.13.6.4)
    "detach-ok", "D6 DETACH of an attached endpoint: S_OK", |h, ctx| {
        let d = attached(h, ctx)?;
        let ep_ = h.endpoints().dma;
        ok(h.detach(d, ep_), "DETACH")
    };
    "detach-reserved", "D18 DETACH ignores reserved" violates ["R13"], |h, ctx| {
        let d = attached(h, ctx)?;
        let req = ReqDetach { head: ReqHead::new(RequestType::Detach), domain: d.into(), endpoint: h.endpoints().dma.into(), reserved: [0xaa; 8] };
        let r = raw(h, req.as_bytes())?;
        expect_raw(&r, Status::Ok, "DETACH reserved set")
    };
    "detach-unknown-endpoint", "D19 DETACH of an endpoint that does not exist: S_NOENT", |h, ctx| {
        let Some(absent) = h.endpoints().absent else { return not_run("no absent endpoint ID"); };
        let d = attached(h, ctx)?;
        expect(h.detach(d, absent), Status::NoEnt, "DETACH")
    };
    "detach-wrong-domain", "D20 DETACH from a domain the endpoint is not in: S_INVAL", |h, ctx| {
        let _d = attached(h, ctx)?;
        let other = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        expect(h.detach(other, ep_), Status::Inval, "DETACH")
    };
    "detach-not-attached", "D20 DETACH of an existing endpoint that is not attached: S_INVAL", |h, ctx| {
        unattached(h, ctx)?;
        let d = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        expect(h.detach(d, ep_), Status::Inval, "DETACH")
    };
    "detach-twice", "D20 the second of two DETACHes: S_INVAL (the endpoint exists, it is not attached)", |h, ctx| {
        let d = attached(h, ctx)?;
        let ep = h.endpoints().dma;
        ok(h.detach(d, ep), "first DETACH")?;
        expect(h.detach(d, ep), Status::Inval, "second DETACH")
    };
    "detach-blocks-dma", "D21/D9 after DETACH (bypass=0) the domain's mappings are unreachable", |h, ctx| {
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let d = attached(h, ctx)?;
        let p = page(h)?;
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        ok(h.detach(d, ep), "DETACH")?;
        with_bypass(h, false, |h| {
            let _ = h.faults();
            h.dma_in(iova, SHORT);
            let ev = h.faults()?;
            if ev.is_empty() { return diverges("DMA after DETACH raised no fault".into()); }
            if ev.iter().any(|f| f.endpoint != ep) { return diverges("fault for another endpoint".into()); }
            Ok(())
        })
    };
    "detach-last-destroys-domain", "§5.13.6.4 the domain ceases to exist with its last endpoint: MAP gets S_NOENT", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let ep_ = h.endpoints().dma;
        ok(h.detach(d, ep_), "DETACH")?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        expect(h.map(d, iova, iova + g - 1, p, RD), Status::NoEnt, "MAP")
    };
    "detach-domain-id-reuse", "§5.13.6.4 a freed domain ID is reused as a new, empty domain", |h, ctx| {
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let d = attached(h, ctx)?;
        let p = page(h)?;
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        ok(h.detach(d, ep), "DETACH")?;
        ok(h.attach(d, ep), "ATTACH again")?;
        h.dma_in(iova, SHORT);
        expect_faults(h, ep, iova, SHORT, &[FaultReason::Mapping]).map(|_| ())
    };

    // MAP (§5.13.6.5)
    "map-read", "D6 MAP READ: the endpoint reads the mapped memory", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let p = page(h)?;
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        let r = translates_read(h, ctx, d, iova, p)?;
        no_faults(h)?;
        if r { Ok(()) } else { diverges("data differs".into()) }
    };
    "map-write", "D6 MAP WRITE: the endpoint writes the mapped memory, at the right offset", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let data = pattern(ctx.seed(), L);
        load(h, ctx, d, &data)?;
        let p = page(h)?;
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, WR), "MAP")?;
        h.dma_out(iova + 512, L);
        no_faults(h)?;
        let got = h.read_phys(p, 512 + L as usize);
        if got[512..] == data[..] && got[..512].iter().all(|&b| b == 0) { Ok(()) } else { diverges("data differs".into()) }
    };
    "map-multi-granule", "D6 a multi-granule mapping translates every granule", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        // One MAP of three physically contiguous granules; each granule must reach its own
        // physical granule (a device that maps only the first, or repeats it, diverges).
        let p = h.alloc_pages(3).ok_or_else(|| Fail::Error("out of DMA pages".into()))?;
        let iova = ctx.iova(3);
        ok(h.map(d, iova, iova + 3 * g - 1, p, RD), "MAP 3 granules")?;
        for k in [2, 1, 0] {
            if !translates_read(h, ctx, d, iova + k * g, p + k * g)? {
                return diverges(format!("granule {k} of 3 does not reach its physical granule"));
            }
        }
        no_faults(h)
    };
    "map-unaligned-virt-start", "D22 MAP with virt_start not granule-aligned: S_RANGE" violates ["I3"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(2);
        let p = page(h)?;
        let r = raw(h, map_req(d, iova + 0x10, iova + g - 1, p, RD).as_bytes())?;
        expect_raw(&r, Status::Range, "MAP")
    };
    "map-unaligned-phys", "D22 MAP with phys_start not granule-aligned: S_RANGE" violates ["I3"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        let r = raw(h, map_req(d, iova, iova + g - 1, p + 0x10, RD).as_bytes())?;
        expect_raw(&r, Status::Range, "MAP")
    };
    "map-unaligned-end", "D22 MAP with virt_end + 1 not granule-aligned: S_RANGE" violates ["I3"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        let r = raw(h, map_req(d, iova, iova + g - 2, p, RD).as_bytes())?;
        expect_raw(&r, Status::Range, "MAP")
    };
    "map-overlap-identical", "D23 MAP of an already mapped range: S_INVAL", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        expect(h.map(d, iova, iova + g - 1, p, RD), Status::Inval, "MAP again")
    };
    "map-overlap-partial", "D23 MAP partly overlapping a mapping: S_INVAL, the mapping unchanged", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(3);
        let (p, q) = (page(h)?, page(h)?);
        ok(h.map(d, iova + g, iova + 2 * g - 1, p, RD), "MAP middle")?;
        expect(h.map(d, iova, iova + 3 * g - 1, q, RD), Status::Inval, "MAP around it")?;
        if translates_read(h, ctx, d, iova + g, p)? { Ok(()) } else { diverges("existing mapping changed".into()) }
    };
    "map-unknown-flag", "D24 MAP with an undefined flag bit: S_INVAL" violates ["R14"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        let r = raw(h, map_req(d, iova, iova + g - 1, p, RD | 1 << 3).as_bytes())?;
        expect_raw(&r, Status::Inval, "MAP flags=0x9")
    };
    "map-no-domain", "D25 MAP into a domain that does not exist: S_NOENT", |h, ctx| {
        let g = ctx.granule;
        let d = ctx.domain()?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        expect(h.map(d, iova, iova + g - 1, p, RD), Status::NoEnt, "MAP")
    };
    "map-bypass-domain", "D26 MAP on a bypass domain: S_INVAL" violates ["R15"], |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let g = ctx.granule;
        let d = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        ok(h.attach_bypass(d, ep_), "ATTACH_F_BYPASS")?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        expect(h.map(d, iova, iova + g - 1, p, RD), Status::Inval, "MAP")
    };
    "map-read-only", "D27 no writes to a range mapped without WRITE: fault, memory unchanged", |h, ctx| {
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let d = attached(h, ctx)?;
        let data = pattern(ctx.seed(), SHORT);
        load(h, ctx, d, &data)?;
        let p = page(h)?;
        h.write_phys(p, &[0xa5; 64]);
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP READ")?;
        h.dma_out(iova, SHORT);
        if h.read_phys(p, 64) != [0xa5; 64] { return diverges("read-only memory was written".into()); }
        let ev = expect_faults(h, ep, iova, SHORT, &[FaultReason::Mapping])?;
        if ev.iter().all(|f| f.write && !f.read) { Ok(()) } else { diverges("fault flags do not say WRITE".into()) }
    };
    "map-no-permission", "D27/§5.13.6.5 flags 0: the endpoint can neither read nor write", |h, ctx| {
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let d = attached(h, ctx)?;
        let p = page(h)?;
        h.write_phys(p, &pattern(ctx.seed(), SHORT));
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, 0), "MAP flags=0")?;
        h.dma_in(iova, SHORT);
        let ev = expect_faults(h, ep, iova, SHORT, &[FaultReason::Mapping])?;
        if ev.iter().all(|f| f.read && !f.write) { Ok(()) } else { diverges("fault flags do not say READ".into()) }
    };
    "map-outside-input-range", "§5.13.6 a MAP outside input_range fails" violates ["R8"], |h, ctx| {
        need(h, Features::INPUT_RANGE, "INPUT_RANGE")?;
        let g = ctx.granule;
        let (_, end) = h.config().input_range;
        let Some(start) = end.checked_add(1) else { return not_run("input_range reaches 2^64 - 1"); };
        let d = attached(h, ctx)?;
        let p = page(h)?;
        let r = raw(h, map_req(d, start, start + g - 1, p, RD).as_bytes())?;
        match raw_status(&r, "MAP")? {
            Status::Ok => { let _ = raw(h, unmap_req(d, start, start + g - 1, [0; 4]).as_bytes()); diverges("S_OK".into()) }
            _ => Ok(()),
        }
    };
    "map-inverted", "R16/§5.13.6.5 MAP with virt_end < virt_start is refused, the device unharmed" violates ["R16", "I3"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(2);
        let p = page(h)?;
        let r = raw(h, map_req(d, iova + g, iova, p, RD).as_bytes())?;
        let s = raw_status(&r, "MAP")?;
        // The device still works.
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP after")?;
        if s == Status::Ok { diverges("S_OK".into()) } else { Ok(()) }
    };
    "map-u64-max", "robustness: MAP ending at 2^64 - 1 is handled (no overflow), then removable" violates ["R8", "R21"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let p = page(h)?;
        let start = 0u64.wrapping_sub(g);
        let r = raw(h, map_req(d, start, u64::MAX, p, RD).as_bytes())?;
        let s = raw_status(&r, "MAP [2^64-g, 2^64-1]")?;
        let r2 = raw(h, unmap_req(d, start, u64::MAX, [0; 4]).as_bytes())?;
        let s2 = raw_status(&r2, "UNMAP")?;
        if h.needs_reset() { return diverges("DEVICE_NEEDS_RESET".into()); }
        let beyond_input = h.features().contains(Features::INPUT_RANGE) && h.config().input_range.1 < u64::MAX;
        match (s, s2, beyond_input) {
            (Status::Ok, Status::Ok, false) => Ok(()),
            (Status::Ok, _, true) => diverges("MAP outside input_range accepted".into()),
            (Status::Ok, s2, false) => diverges(format!("UNMAP: {}", s2.name())),
            (_, _, true) => Ok(()),
            (s, _, false) => diverges(format!("MAP inside input_range: {}", s.name())),
        }
    };
    "map-resv-mem", "D44 MAP overlapping a RESV_MEM region is rejected" violates ["R30"], |h, ctx| {
        need(h, Features::PROBE, "PROBE")?;
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let region = h.probe(ep)?.into_iter().find_map(|p| match p {
            ProbeProperty::ResvMem(r) => Some(r),
            _ => None,
        });
        let Some(region) = region else { return not_run("no RESV_MEM region for the endpoint"); };
        let d = attached(h, ctx)?;
        let start = region.start & !(g - 1);
        let r = h.map(d, start, start + g - 1, start, RD);
        match status(r)? {
            Status::Ok => { let _ = h.unmap(d, start, start + g - 1); diverges(format!("S_OK for {start:#x} in {:?} {:#x}..={:#x}", region.kind, region.start, region.end)) }
            _ => Ok(()),
        }
    };
    "map-mmio-flag", "§5.13.3/§5.13.6.5 F_MMIO negotiated makes MAP_F_MMIO available: a MAP with it succeeds", |h, ctx| {
        need(h, Features::MMIO, "MMIO")?;
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        ok(h.map(d, iova, iova + g - 1, p, RD | MapFlags::MMIO.bits()), "MAP MMIO")
    };

    // UNMAP (§5.13.6.6)
    "unmap-exact", "D32 UNMAP of exactly one mapping: S_OK and the mapping is gone", |h, ctx| {
        let g = ctx.granule;
        let ep = h.endpoints().dma;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        ok(h.unmap(d, iova, iova + g - 1), "UNMAP")?;
        h.dma_in(iova, SHORT);
        expect_faults(h, ep, iova, SHORT, &[FaultReason::Mapping]).map(|_| ())
    };
    "unmap-split", "D31 UNMAP that would split a mapping: S_RANGE" violates ["R22"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(2);
        let p = page(h)?;
        ok(h.map(d, iova, iova + 2 * g - 1, p, RD), "MAP")?;
        expect(h.unmap(d, iova, iova + g - 1), Status::Range, "UNMAP half")
    };
    "unmap-split-keeps-all", "D31 an UNMAP that splits one mapping removes none, not even fully covered ones" violates ["R22"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(4);
        let (pa, pb, pc) = (page(h)?, page(h)?, page(h)?);
        ok(h.map(d, iova, iova + g - 1, pa, RD), "MAP A")?;
        ok(h.map(d, iova + g, iova + 2 * g - 1, pb, RD), "MAP B")?;
        ok(h.map(d, iova + 2 * g, iova + 4 * g - 1, pc, RD), "MAP C (2 granules)")?;
        expect(h.unmap(d, iova, iova + 3 * g - 1), Status::Range, "UNMAP A, B and half of C")?;
        for (i, (o, p)) in [(0, pa), (g, pb), (2 * g, pc)].into_iter().enumerate() {
            if !translates_read(h, ctx, d, iova + o, p)? {
                return diverges(format!("mapping {} was removed", ["A", "B", "C"][i]));
            }
        }
        Ok(())
    };
    "unmap-reserved", "D28 UNMAP with reserved != 0: S_OK, or S_INVAL (and MAY unmap)" violates ["R20"], |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        let r = raw(h, unmap_req(d, iova, iova + g - 1, [1, 0, 0, 0]).as_bytes())?;
        match raw_status(&r, "UNMAP")? {
            Status::Ok | Status::Inval => Ok(()),
            s => diverges(format!("UNMAP: {}", s.name())),
        }
    };
    "unmap-no-domain", "D29 UNMAP in a domain that does not exist: S_NOENT", |h, ctx| {
        let g = ctx.granule;
        let d = ctx.domain()?;
        let iova = ctx.iova(1);
        expect(h.unmap(d, iova, iova + g - 1), Status::NoEnt, "UNMAP")
    };
    "unmap-bypass-domain", "D30 UNMAP on a bypass domain: S_INVAL" violates ["R23"], |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let g = ctx.granule;
        let d = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        ok(h.attach_bypass(d, ep_), "ATTACH_F_BYPASS")?;
        let iova = ctx.iova(1);
        expect(h.unmap(d, iova, iova + g - 1), Status::Inval, "UNMAP")
    };
    "unmap-example-1", "D32 spec example (1): unmap(0,4) of nothing succeeds" violates ["R21"], |h, ctx| unmap_example(h, ctx, &[], (0, 4), Status::Ok, &[]);
    "unmap-example-2", "D32 spec example (2): map(0,9); unmap(0,9) removes it", |h, ctx| unmap_example(h, ctx, &[(0, 9)], (0, 9), Status::Ok, &[false]);
    "unmap-example-3", "D32 spec example (3): map(0,4), map(5,9); unmap(0,9) removes both", |h, ctx| unmap_example(h, ctx, &[(0, 4), (5, 9)], (0, 9), Status::Ok, &[false, false]);
    "unmap-example-4", "D31 spec example (4): map(0,9); unmap(0,4) fails, removes nothing" violates ["R22"], |h, ctx| unmap_example(h, ctx, &[(0, 9)], (0, 4), Status::Range, &[true]);
    "unmap-example-5", "D32 spec example (5): map(0,4), map(5,9); unmap(0,4) removes the first only", |h, ctx| unmap_example(h, ctx, &[(0, 4), (5, 9)], (0, 4), Status::Ok, &[false, true]);
    "unmap-example-6", "D32 spec example (6): map(0,4); unmap(0,9) removes it", |h, ctx| unmap_example(h, ctx, &[(0, 4)], (0, 9), Status::Ok, &[false]);
    "unmap-example-7", "D32 spec example (7): map(0,4), map(10,14); unmap(0,14) removes both", |h, ctx| unmap_example(h, ctx, &[(0, 4), (10, 14)], (0, 14), Status::Ok, &[false, false]);

    // PROBE (§5.13.6.7, §5.13.6.8)
    "probe-ok", "D6 PROBE of an endpoint: S_OK, used length probe_size + 4", |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let n = h.config().probe_size as usize;
        let req = probe_req(h.endpoints().dma, [0; 64]);
        let r = raw_parts(h, &[req.as_bytes()], &[n + 4])?;
        expect_raw(&r, Status::Ok, "PROBE")
    };
    "probe-unknown-endpoint", "D34 PROBE of an endpoint that does not exist: S_NOENT", |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let Some(absent) = h.endpoints().absent else { return not_run("no absent endpoint ID"); };
        match h.probe(absent) {
            Err(IommuError::Status(Status::NoEnt)) => Ok(()),
            Err(IommuError::Status(s)) => diverges(s.name().into()),
            Ok(_) => diverges("S_OK".into()),
            Err(e) => Err(e.into()),
        }
    };
    "probe-reserved-ignored", "D33 PROBE ignores the request's reserved bytes" violates ["R25"], |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let n = h.config().probe_size as usize;
        let req = probe_req(h.endpoints().dma, [0x5a; 64]);
        let r = raw_parts(h, &[req.as_bytes()], &[n + 4])?;
        expect_raw(&r, Status::Ok, "PROBE")?;
        let plain = probe_req(h.endpoints().dma, [0; 64]);
        let r2 = raw_parts(h, &[plain.as_bytes()], &[n + 4])?;
        if r.writable == r2.writable { Ok(()) } else { diverges("properties differ".into()) }
    };
    "probe-properties-well-formed", "D36/D37/D41 property headers and RESV_MEM reserved are 0, RESV_MEM length 20", |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let n = h.config().probe_size as usize;
        let req = probe_req(h.endpoints().dma, [0; 64]);
        let r = raw_parts(h, &[req.as_bytes()], &[n + 4])?;
        expect_raw(&r, Status::Ok, "PROBE")?;
        let props = &r.writable[..n];
        let mut at = 0;
        while at + 4 <= n {
            let t = u16::from_le_bytes([props[at], props[at + 1]]);
            let len = u16::from_le_bytes([props[at + 2], props[at + 3]]) as usize;
            if t == 0 { break; }
            if t & 0xf000 != 0 { return diverges(format!("reserved header bits at {at}")); }
            if at + 4 + len > n { return diverges(format!("property at {at} runs past probe_size")); }
            if t == 1 {
                if len != 20 { return diverges(format!("RESV_MEM length {len}")); }
                if props[at + 5..at + 8] != [0, 0, 0] { return diverges("RESV_MEM reserved not 0".into()); }
            }
            at += 4 + len;
        }
        Ok(())
    };
    "probe-zero-fill", "D40 bytes after the last property are zero", |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let n = h.config().probe_size as usize;
        let req = probe_req(h.endpoints().dma, [0; 64]);
        let r = raw_parts(h, &[req.as_bytes()], &[n + 4])?;
        expect_raw(&r, Status::Ok, "PROBE")?;
        let props = &r.writable[..n];
        let mut at = 0;
        while at + 4 <= n {
            let t = u16::from_le_bytes([props[at], props[at + 1]]);
            if t == 0 { break; }
            at += 4 + u16::from_le_bytes([props[at + 2], props[at + 3]]) as usize;
        }
        // A walk that leaves the buffer (an unwritten header reads length 0xffff) has no end to
        // check after.
        if at > n { return diverges(format!("property list runs past probe_size ({at} > {n})")); }
        // Posted as WRITABLE_FILL: zeros here were written by the device.
        let rest = &props[at..];
        if rest.iter().all(|&b| b == 0) { Ok(()) }
        else if rest.contains(&WRITABLE_FILL) {
            let k = rest.iter().filter(|&&b| b == WRITABLE_FILL).count();
            diverges(format!("{k} of the {} bytes after the list not written", rest.len()))
        }
        else { diverges("non-zero bytes after the list".into()) }
    };
    "probe-one-msi", "D42 at most one RESV_MEM_T_MSI per endpoint", |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let props = h.probe(h.endpoints().dma)?;
        let n = props.iter().filter(|p| matches!(p, ProbeProperty::ResvMem(r) if r.kind == ResvMemKind::Msi)).count();
        if n <= 1 { Ok(()) } else { diverges(format!("{n} MSI regions")) }
    };
    "probe-no-overlap", "D43 RESV_MEM regions of one endpoint do not overlap", |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        let regions: Vec<_> = h.probe(h.endpoints().dma)?.into_iter().filter_map(|p| match p {
            ProbeProperty::ResvMem(r) => Some(r),
            _ => None,
        }).collect();
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                if a.overlaps(b.start, b.end) { return diverges(format!("{:#x}..={:#x} overlaps {:#x}..={:#x}", a.start, a.end, b.start, b.end)); }
            }
        }
        Ok(())
    };
    "probe-short-buffer", "D39 properties buffer smaller than probe_size: no property written, S_INVAL" violates ["R24"], |h, _| {
        need(h, Features::PROBE, "PROBE")?;
        if let Some(why) = h.hazard(Hazard::ShortProbeBuffer) { return not_run(why); }
        let n = h.config().probe_size as usize;
        if n < 8 { return not_run("probe_size too small to shorten"); }
        let req = probe_req(h.endpoints().dma, [0; 64]);
        let short = n / 2;
        let r = raw_parts(h, &[req.as_bytes()], &[short + 4])?;
        if h.needs_reset() { return diverges("DEVICE_NEEDS_RESET".into()); }
        let s = raw_status(&r, "short PROBE")?;
        if s != Status::Inval { return diverges(format!("short PROBE: {}", s.name())); }
        // Posted as WRITABLE_FILL; left so, or zeroed, no property was written.
        let props = &r.writable[..short];
        if !unwritten(props) && props.iter().any(|&b| b != 0) { return diverges("properties written".into()); }
        Ok(())
    };
    "probe-not-offered", "D35 PROBE without F_PROBE offered: buffer not written, used length 0" violates ["I2"], |h, _| {
        if h.offered().contains(Features::PROBE) { return not_run("device offers PROBE"); }
        let req = probe_req(h.endpoints().dma, [0; 64]);
        let r = raw_parts(h, &[req.as_bytes()], &[512 + 4])?;
        if r.used == 0 { Ok(()) } else { diverges(format!("used length {}", r.used)) }
    };

    // Bypass (§5.13.4 bypass, "Device operations")
    "bypass-1-identity", "§5.13.6 bypass=1: an unattached endpoint's DMA is identity-mapped", |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        unattached(h, ctx)?;
        with_bypass(h, true, |h| {
            let data = pattern(ctx.seed(), L);
            load_identity(h, &data)?;
            let p = page(h)?;
            h.dma_out(p, L);
            no_faults(h)?;
            if h.read_phys(p, L as usize) == data { Ok(()) } else { diverges("identity DMA did not land".into()) }
        })
    };
    "bypass-0-blocks", "D9 bypass=0: an unattached endpoint cannot access memory", |h, ctx| {
        let ep = h.endpoints().dma;
        unattached(h, ctx)?;
        with_bypass(h, false, |h| {
            let p = page(h)?;
            h.write_phys(p, &[0x33; 64]);
            let _ = h.faults();
            h.dma_out(p, SHORT);
            if h.read_phys(p, 64) != [0x33; 64] { return diverges("memory written".into()); }
            expect_faults(h, ep, p, SHORT, &[FaultReason::Domain, FaultReason::Unknown(0)]).map(|_| ())
        })
    };
    "bypass-0-fault-reason", "§5.13.6.9 an unattached endpoint's access faults with R_DOMAIN", |h, ctx| {
        let ep = h.endpoints().dma;
        unattached(h, ctx)?;
        with_bypass(h, false, |h| {
            let p = page(h)?;
            h.dma_in(p, SHORT);
            let ev = expect_faults(h, ep, p, SHORT, &[FaultReason::Domain, FaultReason::Unknown(0)])?;
            if ev.iter().all(|f| f.reason == FaultReason::Domain) { Ok(()) } else { diverges(format!("reason {:?}", ev[0].reason)) }
        })
    };
    "bypass-domain-identity", "§5.13.6.3 ATTACH_F_BYPASS: identity DMA, even with bypass=0", |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let d = ctx.domain()?;
        let ep = h.endpoints().dma;
        with_bypass(h, false, |h| {
            ok(h.attach_bypass(d, ep), "ATTACH_F_BYPASS")?;
            let data = pattern(ctx.seed(), L);
            load_identity(h, &data)?;
            let p = page(h)?;
            h.dma_out(p, L);
            no_faults(h)?;
            let got = h.read_phys(p, L as usize);
            ok(h.detach(d, ep), "DETACH")?;
            if got == data { Ok(()) } else { diverges("DMA did not land".into()) }
        })
    };
    "bypass-attached-translated", "§5.13.6 an endpoint in a translated domain is translated even with bypass=1", |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let ep = h.endpoints().dma;
        let d = attached(h, ctx)?;
        with_bypass(h, true, |h| {
            let p = page(h)?;
            h.write_phys(p, &[0x44; 64]);
            let data = pattern(ctx.seed(), SHORT);
            load(h, ctx, d, &data)?;
            h.dma_out(p, SHORT);
            if h.read_phys(p, 64) != [0x44; 64] { return diverges("identity access allowed".into()); }
            expect_faults(h, ep, p, SHORT, &[FaultReason::Mapping]).map(|_| ())
        })
    };
    "bypass-attach-flag-unknown-domain", "§5.13.6.3 ATTACH_F_BYPASS creates a bypass domain (MAP then refused)" violates ["R15"], |h, ctx| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let g = ctx.granule;
        let d = ctx.domain()?;
        let ep_ = h.endpoints().dma;
        let r = raw(h, attach_req(d, ep_, ATTACH_F_BYPASS, [0; 4]).as_bytes())?;
        expect_raw(&r, Status::Ok, "ATTACH_F_BYPASS")?;
        let iova = ctx.iova(1);
        let p = page(h)?;
        expect(h.map(d, iova, iova + g - 1, p, RD), Status::Inval, "MAP")
    };

    // Faults (§5.13.6.9)
    "fault-unmapped", "§5.13.6.9 access to an unmapped IOVA: R_MAPPING, endpoint and address", |h, ctx| {
        let ep = h.endpoints().dma;
        let _d = attached(h, ctx)?;
        let iova = ctx.iova(1);
        h.dma_in(iova + 0x40, SHORT);
        let ev = expect_faults(h, ep, iova + 0x40, SHORT, &[FaultReason::Mapping])?;
        if ev.iter().all(|f| f.address.is_some()) { Ok(()) } else { diverges("no address".into()) }
    };
    "fault-reserved-zero", "D46/D47 fault reports have reserved fields and undefined flags zero", |h, ctx| {
        let ep = h.endpoints().dma;
        let _d = attached(h, ctx)?;
        let before = h.ignored_events();
        let iova = ctx.iova(1);
        h.dma_in(iova, SHORT);
        let ev = expect_faults(h, ep, iova, SHORT, &[FaultReason::Mapping])?;
        if h.ignored_events() != before { return diverges("reports with reserved bytes set (ignored by the driver)".into()); }
        let undefined: u32 = !(1 | 2 | 0x100);
        if ev.iter().any(|f| f.raw_flags & undefined != 0) { return diverges(format!("flags {:#x}", ev[0].raw_flags)); }
        Ok(())
    };
    "fault-no-data-moved", "D21/D9 a faulting read delivers no memory content to the endpoint", |h, ctx| {
        let d = attached(h, ctx)?;
        let secret = page(h)?;
        let secret_data = pattern(ctx.seed(), SHORT);
        h.write_phys(secret, &secret_data);
        // IOVA = the secret's physical address, unmapped: identity would leak it.
        h.dma_in(secret, SHORT);
        let got = unload(h, ctx, d, SHORT)?;
        if got == secret_data { diverges("secret reached the endpoint".into()) } else { Ok(()) }
    };

    // Reset (§5.13.5 "Device initialization", D4)
    "reset-detaches", "§5.13.5 after a device reset no endpoint is attached", |h, ctx| {
        let ep = h.endpoints().dma;
        let d = attached(h, ctx)?;
        match h.reset() { None => return not_run("backend cannot reset"), Some(r) => r? }
        match status(h.detach(d, ep))? {
            Status::Ok => diverges("DETACH after reset: S_OK (still attached)".into()),
            _ => Ok(()),
        }
    };
    "reset-removes-mappings", "§5.13.5 after a device reset the old domains and mappings are gone", |h, ctx| {
        let g = ctx.granule;
        let d = attached(h, ctx)?;
        let p = page(h)?;
        let iova = ctx.iova(1);
        ok(h.map(d, iova, iova + g - 1, p, RD), "MAP")?;
        if !translates_read(h, ctx, d, iova, p)? { return diverges("the mapping did not translate before the reset".into()); }
        match h.reset() { None => return not_run("backend cannot reset"), Some(r) => r? }
        // Nothing is attached again before looking: re-attaching could itself discard the
        // old domain and hide that it survived. The endpoint reads the old IOVA (its buffer
        // must not get the page's content), then a fresh domain carries the buffer out.
        let data = pattern(ctx.seed(), L);
        h.write_phys(p, &data);
        h.dma_in(iova, L);
        // The old domain ID no longer exists: MAP into it is refused with S_NOENT.
        let q = page(h)?;
        let iova2 = ctx.iova(1);
        let old_domain = status(h.map(d, iova2, iova2 + g - 1, q, RD))?;
        let e = attached(h, ctx)?;
        let got = unload(h, ctx, e, L)?;
        let _ = h.faults();
        if got == data { return diverges("the old mapping still translated after the reset".into()); }
        if old_domain != Status::NoEnt { return diverges(format!("MAP into the old domain after reset: {} (the domain survived)", old_domain.name())); }
        Ok(())
    };
    "reset-keeps-bypass", "D4 bypass does not change on device reset", |h, _| {
        need(h, Features::BYPASS_CONFIG, "BYPASS_CONFIG")?;
        let Some(start) = h.bypass() else { return Err(Fail::Error("bypass unreadable".into())); };
        // The value read now is taken as the boot value: its opposite first, so a device that
        // restores the boot value on reset diverges; then the value itself, so one that sets
        // a fixed value does too. `start` is restored at the end either way.
        for v in [!start, start] {
            ok(h.set_bypass(v), "write bypass")?;
            let r = match h.reset() {
                None => { let _ = h.set_bypass(start); return not_run("backend cannot reset"); }
                Some(r) => r,
            };
            r?;
            let after = h.bypass();
            if after != Some(v) {
                let _ = h.set_bypass(start);
                return diverges(format!("bypass {} before the reset, {} after", u8::from(v), after.map_or("unreadable".into(), |b| format!("{}", u8::from(b)))));
            }
        }
        Ok(())
    };
}

/// Runs one of the spec's UNMAP examples, in granules: maps `maps` (inclusive granule ranges),
/// unmaps `unmap`, expects `want`, then checks which mappings still translate.
fn unmap_example(
    h: &mut dyn Harness,
    ctx: &mut Ctx,
    maps: &[(u64, u64)],
    unmap: (u64, u64),
    want: Status,
    kept: &[bool],
) -> R {
    let g = ctx.granule;
    let d = attached(h, ctx)?;
    let base = ctx.iova(16);
    let mut pages = vec![];
    for &(s, e) in maps {
        let p = page(h)?;
        // Only the first granule of each mapping is backed by `p`; the rest maps onward RAM
        // that is never accessed.
        ok(h.map(d, base + s * g, base + (e + 1) * g - 1, p, RD), "MAP")?;
        pages.push(p);
    }
    expect(
        h.unmap(d, base + unmap.0 * g, base + (unmap.1 + 1) * g - 1),
        want,
        "UNMAP",
    )?;
    for (i, (&(s, _), &p)) in maps.iter().zip(&pages).enumerate() {
        let present = translates_read(h, ctx, d, base + s * g, p)?;
        let _ = h.faults();
        if present != kept[i] {
            return diverges(format!(
                "mapping {i} {}",
                if present { "kept" } else { "removed" }
            ));
        }
    }
    Ok(())
}
