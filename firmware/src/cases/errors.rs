//! Error statuses of each request type, DETACH semantics, and the checks the driver makes
//! before sending. Statement numbers (D12, …) refer to virtio v1.3 §5.13 device requirements
//! as numbered in the "Statement index" of `CONFORMANCE.md`. Cases that break a driver
//! statement on purpose announce it first ([`checker_expect`]).

use alloc::format;
use alloc::string::String;
use virtio_iommu_driver::wire::{
    Features, MapFlags, ReqAttach, ReqHead, ReqMap, RequestType, Status,
};
use virtio_iommu_driver::IommuError;
use zerocopy::IntoBytes;

use super::edu;
use super::env::with_iommu;
use super::{checker_expect, Env, Tap};

fn expect(got: Result<(), IommuError>, want: Status, what: &str) -> Result<(), String> {
    match got {
        Err(IommuError::Status(s)) if s == want => Ok(()),
        other => Err(format!("{what}: got {other:?}, expected {}", want.name())),
    }
}

fn ok(got: Result<(), IommuError>, what: &str) -> Result<(), String> {
    got.map_err(|e| format!("{what}: {e}"))
}

/// Sends raw request bytes with a 4-byte writable tail; returns (used length, status byte).
fn raw(readable: &[u8]) -> Result<(u32, u8), IommuError> {
    let mut tail = [0u8; 4];
    let used = with_iommu(|i| i.request_raw(&[readable], &[4], &mut tail))?;
    Ok((used, tail[0]))
}

pub fn run(tap: &mut Tap, env: &mut Env) {
    // Any endpoint that is not the virtio-blk device (which stays attached) will do; prefer edu.
    let ep = env
        .endpoint_of(edu::VENDOR_ID, &[edu::DEVICE_ID])
        .or_else(|| {
            env.endpoints
                .iter()
                .map(|(d, _)| d)
                .find(|d| d.function.vendor_id != 0x1af4)
                .cloned()
        });
    let Some(ep) = ep.map(|d| d.endpoint) else {
        tap.case("error statuses", || Err("no spare endpoint".into()));
        return;
    };
    let g = env.granule;
    let mut iovas = match env.iova_allocator(ep) {
        Ok(a) => a,
        Err(e) => {
            tap.case("error statuses", || Err(e));
            return;
        }
    };
    let Ok(x) = iovas.alloc(4 * g) else {
        tap.case("error statuses", || Err("no IOVA space".into()));
        return;
    };
    // Any granule-aligned physical address will do for mappings that are never accessed.
    let phys = 0x4000_0000u64.next_multiple_of(g);
    let mut d = 0u32;

    tap.case(
        "ATTACH of an endpoint that does not exist -> S_NOENT (D12)",
        || {
            let absent = env
                .absent_endpoint
                .ok_or("no free endpoint ID in iommu-map")?;
            let dom = env.domain()?;
            expect(
                with_iommu(|i| i.attach(dom, absent)),
                Status::NoEnt,
                &format!("ATTACH {absent:#x}"),
            )
        },
    );

    tap.case("ATTACH with an undefined flag bit -> S_INVAL (D11)", || {
        checker_expect(&["I1"], "errors-attach-undefined-flag");
        let dom = env.domain()?;
        let req = ReqAttach {
            head: ReqHead::new(RequestType::Attach),
            domain: dom.into(),
            endpoint: ep.into(),
            flags: 0x2.into(),
            reserved: [0; 4],
        };
        match raw(req.as_bytes()) {
            Ok((4, s)) if s == Status::Inval as u8 => Ok(()),
            other => Err(format!("got {other:?}, expected used length 4 and S_INVAL")),
        }
    });

    tap.case(
        "MAP overlapping an existing mapping -> S_INVAL (D23)",
        || {
            d = env.domain()?;
            ok(with_iommu(|i| i.attach(d, ep)), "ATTACH")?;
            ok(
                with_iommu(|i| i.map(d, x, x + g - 1, phys, MapFlags::READ)),
                "MAP",
            )?;
            expect(
                with_iommu(|i| i.map(d, x, x + g - 1, phys, MapFlags::READ)),
                Status::Inval,
                "identical MAP",
            )?;
            expect(
                with_iommu(|i| i.map(d, x, x + 2 * g - 1, phys, MapFlags::READ)),
                Status::Inval,
                "partial overlap",
            )?;
            ok(with_iommu(|i| i.unmap(d, x, x + g - 1)), "UNMAP")
        },
    );

    tap.case(
        "MAP into a domain that does not exist -> S_NOENT (D25)",
        || {
            let dom = env.domain()?;
            expect(
                with_iommu(|i| i.map(dom, x, x + g - 1, phys, MapFlags::READ)),
                Status::NoEnt,
                "MAP",
            )
        },
    );

    tap.case("MAP with an undefined flag bit -> S_INVAL (D24)", || {
        checker_expect(&["R14"], "errors-map-undefined-flag");
        let req = ReqMap {
            head: ReqHead::new(RequestType::Map),
            domain: d.into(),
            virt_start: x.into(),
            virt_end: (x + g - 1).into(),
            phys_start: phys.into(),
            flags: (MapFlags::READ.bits() | 0x8).into(),
        };
        match raw(req.as_bytes()) {
            Ok((4, s)) if s == Status::Inval as u8 => Ok(()),
            other => Err(format!("got {other:?}, expected used length 4 and S_INVAL")),
        }
    });

    tap.case(
        "UNMAP that would split a mapping -> S_RANGE and removes nothing (D31)",
        || {
            checker_expect(&["R22"], "errors-unmap-split");
            ok(
                with_iommu(|i| i.map(d, x, x + 2 * g - 1, phys, MapFlags::READ)),
                "MAP 2 granules",
            )?;
            expect(
                with_iommu(|i| i.unmap(d, x, x + g - 1)),
                Status::Range,
                "UNMAP first half",
            )?;
            // Still mapped: mapping it again overlaps.
            expect(
                with_iommu(|i| i.map(d, x, x + 2 * g - 1, phys, MapFlags::READ)),
                Status::Inval,
                "re-MAP",
            )?;
            ok(with_iommu(|i| i.unmap(d, x, x + 2 * g - 1)), "UNMAP whole")?;
            ok(
                with_iommu(|i| i.map(d, x, x + 2 * g - 1, phys, MapFlags::READ)),
                "MAP after UNMAP",
            )?;
            ok(with_iommu(|i| i.unmap(d, x, x + 2 * g - 1)), "UNMAP")
        },
    );

    tap.case("UNMAP of a range without mappings -> S_OK (D32)", || {
        checker_expect(&["R21"], "errors-unmap-nothing");
        ok(with_iommu(|i| i.unmap(d, x, x + 4 * g - 1)), "UNMAP")
    });

    tap.case(
        "UNMAP in a domain that does not exist -> S_NOENT (D29)",
        || {
            let dom = env.domain()?;
            expect(
                with_iommu(|i| i.unmap(dom, x, x + g - 1)),
                Status::NoEnt,
                "UNMAP",
            )
        },
    );

    tap.case(
        "MAP and UNMAP on a bypass domain -> S_INVAL (D26, D30)",
        || {
            if !with_iommu(|i| Ok(i.features().contains(Features::BYPASS_CONFIG))).unwrap_or(false)
            {
                return Err("device does not offer BYPASS_CONFIG".into());
            }
            checker_expect(&["R15", "R23"], "errors-bypass-map-unmap");
            let dom = env.domain()?;
            ok(with_iommu(|i| i.attach_bypass(dom, ep)), "ATTACH_F_BYPASS")?;
            let m = with_iommu(|i| i.map(dom, x, x + g - 1, phys, MapFlags::READ));
            let u = with_iommu(|i| i.unmap(dom, x, x + g - 1));
            // Back to the translated domain for the DETACH cases.
            ok(with_iommu(|i| i.attach(d, ep)), "re-ATTACH")?;
            expect(m, Status::Inval, "MAP")?;
            expect(u, Status::Inval, "UNMAP")
        },
    );

    tap.case(
        "DETACH from a domain the endpoint is not in -> S_INVAL (D20)",
        || {
            let dom = env.domain()?;
            expect(with_iommu(|i| i.detach(dom, ep)), Status::Inval, "DETACH")
        },
    );

    tap.case(
        "DETACH of an endpoint that does not exist -> S_NOENT (D19)",
        || {
            let absent = env
                .absent_endpoint
                .ok_or("no free endpoint ID in iommu-map")?;
            expect(with_iommu(|i| i.detach(d, absent)), Status::NoEnt, "DETACH")
        },
    );

    tap.case(
        "DETACH, then DETACH again -> S_OK, then S_NOENT or S_INVAL (D20)",
        || {
            ok(with_iommu(|i| i.detach(d, ep)), "DETACH")?;
            match with_iommu(|i| i.detach(d, ep)) {
                Err(IommuError::Status(s @ (Status::NoEnt | Status::Inval))) => {
                    println!(
                        "# second DETACH: {} (QEMU >= 9.1: S_NOENT, 7.2: S_INVAL)",
                        s.name()
                    );
                    Ok(())
                }
                other => Err(format!("second DETACH gave {other:?}")),
            }
        },
    );

    tap.case(
        "MAP after the last endpoint left: the domain is gone -> S_NOENT",
        || {
            expect(
                with_iommu(|i| i.map(d, x, x + g - 1, phys, MapFlags::READ)),
                Status::NoEnt,
                "MAP",
            )
        },
    );

    tap.case(
        "PROBE of an endpoint that does not exist -> S_NOENT (D34)",
        || {
            let absent = env
                .absent_endpoint
                .ok_or("no free endpoint ID in iommu-map")?;
            match with_iommu(|i| i.probe(absent, |_| {})) {
                Err(IommuError::Status(Status::NoEnt)) => Ok(()),
                Err(IommuError::NotNegotiated(_)) => Err("PROBE not offered".into()),
                other => Err(format!("got {other:?}, expected S_NOENT")),
            }
        },
    );

    tap.case(
        "unknown request type -> used length 0 (D7), or S_UNSUPP as QEMU does",
        || {
            checker_expect(&["I1"], "errors-unknown-type");
            let mut req = [0u8; 20];
            req[0] = 0x7f;
            match raw(&req) {
                Ok((0, _)) => {
                    println!("# unknown type: buffer returned unwritten (spec D7)");
                    Ok(())
                }
                Ok((4, s)) if s == Status::Unsupp as u8 => {
                    println!(
                        "# unknown type: S_UNSUPP written (QEMU; spec D7 says SHOULD NOT write)"
                    );
                    Ok(())
                }
                other => Err(format!("got {other:?}")),
            }
        },
    );

    tap.case(
        "driver refuses unaligned, inverted and out-of-range requests before sending",
        || {
            let dom = env.domain()?;
            let r = with_iommu(|i| i.map(dom, x + 1, x + g, phys, MapFlags::READ));
            if !matches!(r, Err(IommuError::Unaligned { .. })) {
                return Err(format!("unaligned MAP: {r:?}"));
            }
            let r = with_iommu(|i| i.map(dom, x, x + g - 1, phys + 1, MapFlags::READ));
            if !matches!(r, Err(IommuError::Unaligned { .. })) {
                return Err(format!("unaligned phys_start: {r:?}"));
            }
            let r = with_iommu(|i| i.map(dom, x + g, x, phys, MapFlags::READ));
            if r != Err(IommuError::InvalidRange) {
                return Err(format!("inverted MAP: {r:?}"));
            }
            let r = with_iommu(|i| i.unmap(dom, x, x));
            if r != Err(IommuError::InvalidRange) {
                return Err(format!("empty UNMAP: {r:?}"));
            }
            let (_, end) = env.input_range;
            if let Some(beyond) = end.checked_add(1) {
                let r = with_iommu(|i| i.map(dom, beyond, beyond + g - 1, phys, MapFlags::READ));
                if !matches!(r, Err(IommuError::IovaOutOfRange { .. })) {
                    return Err(format!("MAP beyond input_range: {r:?}"));
                }
            }
            let mut why = String::new();
            if !with_iommu(|i| Ok(i.features().contains(Features::MMIO))).unwrap_or(true) {
                let r = with_iommu(|i| i.map(dom, x, x + g - 1, phys, MapFlags::MMIO));
                if !matches!(r, Err(IommuError::InvalidFlags(_))) {
                    why = format!("MMIO flag without F_MMIO: {r:?}");
                }
            }
            if why.is_empty() {
                Ok(())
            } else {
                Err(why)
            }
        },
    );
}
