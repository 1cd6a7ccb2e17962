//! The checks: one function per thing the driver hands the device (a requestq chain, a config
//! write, the features at FEATURES_OK, an eventq buffer). Each only reads guest memory and
//! the device state, and records into the [`Checker`].

use std::io::Read;

use virtio_iommu_driver::wire::{
    self, Features, MapFlags, ReqAttach, ReqDetach, ReqMap, ReqProbe, ReqUnmap, RequestType,
    ATTACH_F_BYPASS,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemory;
use zerocopy::FromBytes;

use super::{Checker, Statement, MAX_RECORDED_BYTES};
use crate::config::DeviceConfig;
use crate::device::FAULT_SIZE;
use crate::request::{validate_chain, HEAD_SIZE, TAIL_SIZE};
use crate::state::IommuState;

const R: fn(u8) -> Statement = Statement::R;

/// Checks one requestq chain against `state` as it is before the request runs; `negotiated`
/// are the features the driver negotiated (which a fault plan may make differ from the ones
/// the device acts on: the driver is held to its own).
pub(crate) fn check_request<M: GuestMemory>(
    checker: &mut Checker,
    state: &IommuState,
    negotiated: Features,
    mem: &M,
    chain: &DescriptorChain<&M>,
    max_descriptors: usize,
) {
    if !checker.enabled() {
        return;
    }
    if let Err(m) = validate_chain(chain, max_descriptors) {
        checker.record(Statement::MalformedChain, &[], || m.to_string());
        return;
    }
    let (Ok(mut reader), Ok(writer)) = (
        Reader::new(mem, chain.clone()),
        Writer::new(mem, chain.clone()),
    ) else {
        checker.record(Statement::MalformedChain, &[], || {
            "a descriptor points outside guest memory".into()
        });
        return;
    };
    let readable = reader.available_bytes();
    let writable = writer.available_bytes();
    let mut buf = [0u8; MAX_RECORDED_BYTES];
    let n = readable.min(MAX_RECORDED_BYTES);
    if reader.read_exact(&mut buf[..n]).is_err() {
        checker.record(Statement::MalformedChain, &[], || {
            "the device-readable part cannot be read".into()
        });
        return;
    }
    let bytes = &buf[..n];
    let c = Ctx {
        checker,
        state,
        config: state.config(),
        negotiated,
        bytes,
        readable,
    };
    c.request(writable);
}

struct Ctx<'a> {
    checker: &'a mut Checker,
    state: &'a IommuState,
    config: &'a DeviceConfig,
    negotiated: Features,
    /// The first bytes of the readable part.
    bytes: &'a [u8],
    /// Total readable length.
    readable: usize,
}

impl Ctx<'_> {
    fn record(&mut self, s: Statement, why: impl FnOnce() -> String) {
        let len = self.readable;
        let bytes = self.bytes;
        // `record` cuts at MAX_RECORDED_BYTES; the total length is kept for the "..." marker.
        self.checker.record_len(s, bytes, len, why);
    }

    fn request(mut self, writable: usize) {
        if self.readable < HEAD_SIZE || writable < TAIL_SIZE {
            let r = self.readable;
            self.record(Statement::RequestShape, || {
                format!("request too small: {r} readable, {writable} writable bytes")
            });
            return;
        }
        let head = [self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]];
        let Some(t) = RequestType::from_u8(head[0]) else {
            self.record(Statement::RequestShape, || {
                format!("undefined request type {}", head[0])
            });
            return;
        };
        if head[1..] != [0, 0, 0] {
            self.record(R(6), || {
                format!(
                    "req_head.reserved = {:02x} {:02x} {:02x}",
                    head[1], head[2], head[3]
                )
            });
        }
        let want = match t {
            RequestType::Attach => size_of::<ReqAttach>(),
            RequestType::Detach => size_of::<ReqDetach>(),
            RequestType::Map => size_of::<ReqMap>(),
            RequestType::Unmap => size_of::<ReqUnmap>(),
            RequestType::Probe => size_of::<ReqProbe>(),
        };
        let name = type_name(t);
        if self.readable != want {
            let r = self.readable;
            self.record(Statement::RequestShape, || {
                format!("{name} device-readable part is {r} bytes, not {want}")
            });
        }
        if t == RequestType::Probe {
            // Without PROBE negotiated `probe_size` means nothing; I2 records the request.
            if self.negotiated.contains(Features::PROBE) {
                self.probe_size(writable);
            }
        } else if writable != TAIL_SIZE {
            self.record(Statement::RequestShape, || {
                format!("{name} device-writable part is {writable} bytes, not the 4-byte tail")
            });
        }
        if self.readable < want {
            return;
        }
        let bytes = self.bytes;
        match t {
            RequestType::Attach => {
                if let Ok((r, _)) = ReqAttach::read_from_prefix(bytes) {
                    self.attach(&r);
                }
            }
            RequestType::Detach => {
                if let Ok((r, _)) = ReqDetach::read_from_prefix(bytes) {
                    self.detach(&r);
                }
            }
            RequestType::Map => {
                if let Ok((r, _)) = ReqMap::read_from_prefix(bytes) {
                    self.map(&r);
                }
            }
            RequestType::Unmap => {
                if let Ok((r, _)) = ReqUnmap::read_from_prefix(bytes) {
                    self.unmap(&r);
                }
            }
            RequestType::Probe => {
                if let Ok((r, _)) = ReqProbe::read_from_prefix(bytes) {
                    self.probe(&r);
                }
            }
        }
    }

    /// R24: the writable part is `probe_size` bytes of properties and the 4-byte tail.
    fn probe_size(&mut self, writable: usize) {
        let props = writable.saturating_sub(TAIL_SIZE);
        let probe_size = self.config.probe_size();
        if u64::try_from(props).map_or(true, |p| p != u64::from(probe_size)) {
            self.record(R(24), || {
                format!("PROBE properties are {props} bytes, probe_size is {probe_size}")
            });
        }
    }

    /// R9: `domain` inside `domain_range` when DOMAIN_RANGE is negotiated.
    fn domain_range(&mut self, name: &str, domain: u32) {
        let (lo, hi) = self.config.domain_range();
        if self.negotiated.contains(Features::DOMAIN_RANGE) && !(lo..=hi).contains(&domain) {
            self.record(R(9), || {
                format!("{name} domain {domain} outside domain_range {lo}..={hi}")
            });
        }
    }

    /// R8: `start..=end` inside `input_range` when INPUT_RANGE is negotiated.
    fn input_range(&mut self, name: &str, start: u64, end: u64) {
        let (lo, hi) = self.config.input_range();
        if self.negotiated.contains(Features::INPUT_RANGE) && (start < lo || end > hi) {
            self.record(R(8), || {
                format!("{name} {start:#x}..={end:#x} outside input_range {lo:#x}..={hi:#x}")
            });
        }
    }

    /// I2: MAP/UNMAP need MAP_UNMAP negotiated.
    fn map_unmap_negotiated(&mut self, name: &str) {
        if !self.negotiated.contains(Features::MAP_UNMAP) {
            self.record(Statement::FeatureNotNegotiated, || {
                format!("{name} without VIRTIO_IOMMU_F_MAP_UNMAP negotiated")
            });
        }
    }

    /// I3: the given addresses are multiples of the granule.
    fn aligned(&mut self, name: &str, what: &[(&str, u64)]) {
        let granule = self.config.granule();
        let mask = granule.wrapping_sub(1);
        if let Some(&(field, v)) = what.iter().find(|(_, v)| v & mask != 0) {
            self.record(Statement::Unaligned, || {
                format!("{name} {field} = {v:#x} not aligned to the granule {granule:#x}")
            });
        }
    }

    fn attach(&mut self, r: &ReqAttach) {
        let (domain, endpoint, flags) = (r.domain.get(), r.endpoint.get(), r.flags.get());
        if r.reserved != [0; 4] {
            let res = r.reserved;
            self.record(R(10), || format!("ATTACH reserved = {res:02x?}"));
        }
        if flags & !ATTACH_F_BYPASS != 0 {
            self.record(Statement::RequestShape, || {
                format!("ATTACH flags {flags:#x} has undefined bits")
            });
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if bypass && !self.negotiated.contains(Features::BYPASS_CONFIG) {
            self.record(R(12), || {
                "ATTACH_F_BYPASS without VIRTIO_IOMMU_F_BYPASS_CONFIG negotiated".into()
            });
        } else if let Some(d) = self.state.domain(domain) {
            if d.is_bypass() != bypass {
                let is = if d.is_bypass() {
                    "a bypass"
                } else {
                    "a translated"
                };
                self.record(R(12), || {
                    format!("ATTACH_F_BYPASS = {bypass} but domain {domain} is {is} domain")
                });
            }
        }
        self.domain_range("ATTACH", domain);
        if self.negotiated.contains(Features::PROBE)
            && self.config.has_endpoint(endpoint)
            && !self.checker.probed(endpoint)
        {
            self.record(R(5), || {
                format!("ATTACH of endpoint {endpoint}, not probed since reset")
            });
        }
    }

    fn detach(&mut self, r: &ReqDetach) {
        if r.reserved != [0; 8] {
            let res = r.reserved;
            self.record(R(13), || format!("DETACH reserved = {res:02x?}"));
        }
        self.domain_range("DETACH", r.domain.get());
    }

    fn map(&mut self, r: &ReqMap) {
        let domain = r.domain.get();
        let (start, end, phys, flags) = (
            r.virt_start.get(),
            r.virt_end.get(),
            r.phys_start.get(),
            r.flags.get(),
        );
        self.map_unmap_negotiated("MAP");
        if flags & !MapFlags::all().bits() != 0 {
            self.record(R(14), || format!("MAP flags {flags:#x} has undefined bits"));
        }
        if flags & MapFlags::MMIO.bits() != 0 && !self.negotiated.contains(Features::MMIO) {
            self.record(R(19), || {
                "MAP_F_MMIO without VIRTIO_IOMMU_F_MMIO negotiated".into()
            });
        }
        if end <= start {
            self.record(R(16), || {
                format!("MAP virt_end {end:#x} not above virt_start {start:#x}")
            });
        }
        self.domain_range("MAP", domain);
        self.input_range("MAP", start, end);
        self.aligned(
            "MAP",
            &[
                ("virt_start", start),
                ("phys_start", phys),
                ("virt_end + 1", end.wrapping_add(1)),
            ],
        );
        let Some(d) = self.state.domain(domain) else {
            return;
        };
        if d.is_bypass() {
            self.record(R(15), || format!("MAP on bypass domain {domain}"));
            return;
        }
        if end < start {
            return;
        }
        let config = self.config;
        let hit = d.endpoints().find_map(|e| {
            config
                .resv_regions(e)
                .unwrap_or(&[])
                .iter()
                .find(|reg| reg.overlaps(start, end))
                .map(|reg| (e, *reg))
        });
        if let Some((e, reg)) = hit {
            self.record(R(30), || {
                format!(
                    "MAP {start:#x}..={end:#x} overlaps endpoint {e}'s {:?} region {:#x}..={:#x}",
                    reg.kind, reg.start, reg.end
                )
            });
        }
    }

    fn unmap(&mut self, r: &ReqUnmap) {
        let domain = r.domain.get();
        let (start, end) = (r.virt_start.get(), r.virt_end.get());
        self.map_unmap_negotiated("UNMAP");
        if r.reserved != [0; 4] {
            let res = r.reserved;
            self.record(R(20), || format!("UNMAP reserved = {res:02x?}"));
        }
        if end < start {
            self.record(Statement::RequestShape, || {
                format!("UNMAP virt_end {end:#x} below virt_start {start:#x}")
            });
        }
        self.domain_range("UNMAP", domain);
        self.input_range("UNMAP", start, end);
        self.aligned(
            "UNMAP",
            &[("virt_start", start), ("virt_end + 1", end.wrapping_add(1))],
        );
        let Some(d) = self.state.domain(domain) else {
            return;
        };
        if d.is_bypass() {
            self.record(R(23), || format!("UNMAP on bypass domain {domain}"));
            return;
        }
        if end < start {
            return;
        }
        let first = d.mapping_at(start).filter(|&(s, _)| s != start);
        let last = d.mapping_at(end).filter(|&(_, m)| m.virt_end != end);
        if let Some((s, m)) = first.or(last) {
            let e = m.virt_end;
            self.record(R(22), || {
                format!("UNMAP {start:#x}..={end:#x} splits mapping {s:#x}..={e:#x}")
            });
        } else if !d.overlaps(start, end) {
            self.record(R(21), || {
                format!("UNMAP {start:#x}..={end:#x} covers no mapping of domain {domain}")
            });
        }
    }

    fn probe(&mut self, r: &ReqProbe) {
        let endpoint = r.endpoint.get();
        if !self.negotiated.contains(Features::PROBE) {
            self.record(Statement::FeatureNotNegotiated, || {
                "PROBE without VIRTIO_IOMMU_F_PROBE negotiated".into()
            });
        }
        if r.reserved.iter().any(|&b| b != 0) {
            self.record(R(25), || "PROBE reserved not zero".into());
        }
        if self.config.has_endpoint(endpoint) {
            self.checker.mark_probed(endpoint);
        }
    }
}

fn type_name(t: RequestType) -> &'static str {
    match t {
        RequestType::Attach => "ATTACH",
        RequestType::Detach => "DETACH",
        RequestType::Map => "MAP",
        RequestType::Unmap => "UNMAP",
        RequestType::Probe => "PROBE",
    }
}

/// R2, R3: a driver write of `data` at config offset `offset`.
pub(crate) fn check_config_write(
    checker: &mut Checker,
    negotiated: Features,
    offset: u64,
    data: &[u8],
) {
    if !checker.enabled() {
        return;
    }
    let bypass = wire::config_offset::BYPASS as u64;
    if offset != bypass || data.len() != 1 {
        let n = data.len();
        checker.record(R(2), data, || {
            format!("config write of {n} bytes at offset {offset:#x}: only the 1-byte bypass field (0x24) is writable")
        });
        return;
    }
    if !negotiated.contains(Features::BYPASS_CONFIG) {
        checker.record(R(2), data, || {
            if negotiated.is_empty() {
                "bypass written before FEATURES_OK (nothing negotiated yet)".into()
            } else {
                "bypass written without VIRTIO_IOMMU_F_BYPASS_CONFIG negotiated".into()
            }
        });
    }
    if data[0] > 1 {
        let v = data[0];
        checker.record(R(3), data, || {
            format!("bypass written with {v}, not 0 or 1")
        });
    }
}

/// R1: the driver features as FEATURES_OK is written.
pub(crate) fn check_features_ok(checker: &mut Checker, offered: Features, driver: u64) {
    if !checker.enabled() {
        return;
    }
    let should = offered & (Features::INPUT_RANGE | Features::DOMAIN_RANGE | Features::PROBE);
    let missing = should - Features::from_bits_retain(driver);
    if !missing.is_empty() {
        checker.record(R(1), &driver.to_le_bytes(), || {
            format!("FEATURES_OK without accepting offered {missing:?}")
        });
    }
}

/// I4: one eventq chain, whatever the device then does with it.
pub(crate) fn check_event_buffer<M: GuestMemory>(
    checker: &mut Checker,
    mem: &M,
    chain: &DescriptorChain<&M>,
    max_descriptors: usize,
) {
    if !checker.enabled() {
        return;
    }
    let layout = match validate_chain(chain, max_descriptors) {
        Ok(l) => l,
        Err(m) => {
            checker.record(Statement::MalformedChain, &[], || format!("eventq: {m}"));
            return;
        }
    };
    let writable = Writer::new(mem, chain.clone()).map(|w| w.available_bytes());
    match writable {
        Err(_) => checker.record(Statement::MalformedChain, &[], || {
            "eventq: a descriptor points outside guest memory".into()
        }),
        Ok(w) if w < FAULT_SIZE || layout.readable > 0 => {
            let r = layout.readable;
            checker.record(Statement::ShortEventBuffer, &[], || {
                format!("eventq buffer of {w} writable bytes ({r} readable descriptors); a fault report is {FAULT_SIZE}")
            });
        }
        Ok(_) => {}
    }
}
