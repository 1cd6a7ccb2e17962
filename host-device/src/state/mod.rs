//! The IOMMU's translation state and the semantics of every request (virtio v1.3 §5.13.6), as
//! pure logic: no guest memory, no virtqueue. [`IommuState`] holds the domains, their mappings and
//! the endpoint attachments; each request method validates its arguments, applies the change
//! only if every check passed, and returns the [`Status`] the device writes in the tail.
//!
//! A domain's mappings are kept in a two-level sorted table (`MappingTable`): leaves of at most
//! 128 mappings sorted by first IOVA, and a sorted array of each leaf's first IOVA. A lookup is
//! two binary searches (O(log n), about 20 steps at 1M mappings, no allocation); MAP is
//! O(log n) plus moving at most 128 entries of one leaf (and, once per split, the leaf index);
//! UNMAP is O(log n + k) for k removed mappings, after an O(log n) check that nothing would be
//! split. See `BENCHMARKS.md` for the measured costs.
//!
//! Statement numbers (D*, R*) are listed with their virtio v1.3 §5.13 sections in the
//! "Statement index" of `CONFORMANCE.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use virtio_iommu_driver::wire::{
    Fault, Features, MapFlags, ProbePropertyHeader, ProbeResvMem, ReqAttach, ReqDetach, ReqMap,
    ReqUnmap, Status, ATTACH_F_BYPASS, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE,
    FAULT_R_DOMAIN, FAULT_R_MAPPING, PROBE_T_RESV_MEM,
};
use zerocopy::IntoBytes;

use crate::config::{DeviceConfig, ResvKind, ResvRegion, RESV_MEM_PROPERTY_SIZE};

mod access;
mod table;

pub use access::{Access, FaultRecord, Piece, TranslateError};
pub use table::{Domain, Mapping};

/// How accesses of one endpoint outside RESV_MEM regions are translated.
enum Mode<'a> {
    Identity,
    Blocked,
    Mapped(&'a Domain),
}

/// Domains, mappings and attachments of one virtio-iommu, with the request semantics.
#[derive(Clone, Debug)]
pub struct IommuState {
    config: Arc<DeviceConfig>,
    negotiated: Features,
    bypass: bool,
    domains: BTreeMap<u32, Domain>,
    attachments: BTreeMap<u32, u32>,
    mapping_count: usize,
    generation: u64,
}

impl IommuState {
    /// A state with no domain, `bypass` at its boot value and no feature negotiated.
    pub fn new(config: Arc<DeviceConfig>) -> Self {
        Self {
            bypass: config.boot_bypass(),
            config,
            negotiated: Features::empty(),
            domains: BTreeMap::new(),
            attachments: BTreeMap::new(),
            mapping_count: 0,
            generation: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<DeviceConfig> {
        &self.config
    }

    /// The negotiated features (empty until FEATURES_OK is accepted).
    pub fn negotiated(&self) -> Features {
        self.negotiated
    }

    /// Records the negotiated features (the device calls it when it accepts FEATURES_OK and
    /// with `empty()` on reset). They gate `ATTACH_F_BYPASS`, `MAP_F_MMIO` and legacy bypass.
    pub fn set_negotiated(&mut self, features: Features) {
        if self.negotiated != features {
            self.negotiated = features;
            self.bump();
        }
    }

    /// The `bypass` config field (§5.13.4).
    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// Sets the `bypass` config field. The caller (the config-space write) checks that
    /// BYPASS_CONFIG was negotiated.
    pub fn set_bypass(&mut self, bypass: bool) {
        if self.bypass != bypass {
            self.bypass = bypass;
            self.bump();
        }
    }

    /// A counter incremented by every change that can alter a translation (attachments,
    /// mappings, bypass, negotiated features, reset). Lets a caller cache translations.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Device reset (§5.13.5 "When the device is reset, endpoints are not attached to any
    /// domain"): detaches every endpoint and destroys every domain and mapping, forgets the
    /// negotiated features. `bypass` is kept (D4).
    pub fn reset(&mut self) {
        self.domains.clear();
        self.attachments.clear();
        self.mapping_count = 0;
        self.negotiated = Features::empty();
        self.bump();
    }

    /// System reset: [`Self::reset`], and `bypass` restored to its boot value (D4).
    pub fn system_reset(&mut self) {
        self.reset();
        self.bypass = self.config.boot_bypass();
    }

    /// The domain `id`, if it exists.
    pub fn domain(&self, id: u32) -> Option<&Domain> {
        self.domains.get(&id)
    }

    /// Existing domains in increasing ID order.
    pub fn domains(&self) -> impl Iterator<Item = (u32, &Domain)> + '_ {
        self.domains.iter().map(|(&id, d)| (id, d))
    }

    /// Number of existing domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Number of mappings over all domains.
    pub fn mapping_count(&self) -> usize {
        self.mapping_count
    }

    /// The domain `endpoint` is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.attachments.get(&endpoint).copied()
    }

    /// Whether an unattached endpoint is in bypass mode (§5.13.6 "Device operations"):
    /// BYPASS_CONFIG *offered* and `bypass == 1`, or the legacy BYPASS *negotiated*.
    pub fn unattached_bypass(&self) -> bool {
        (self.config.offered().contains(Features::BYPASS_CONFIG) && self.bypass)
            || self.negotiated.contains(Features::BYPASS)
    }

    /// Whether `endpoint`'s accesses (outside RESV_MEM regions) are currently identity-mapped.
    pub fn is_bypass(&self, endpoint: u32) -> bool {
        matches!(self.mode(endpoint), Some(Mode::Identity))
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn domain_in_range(&self, domain: u32) -> bool {
        let (lo, hi) = self.config.effective_domain_range();
        lo <= domain && domain <= hi
    }

    fn iova_in_range(&self, start: u64, end: u64) -> bool {
        let (lo, hi) = self.config.effective_input_range();
        lo <= start && end <= hi
    }

    fn resv(&self, endpoint: u32) -> &[ResvRegion] {
        self.config.resv_regions(endpoint).unwrap_or(&[])
    }

    fn overlaps_resv(&self, endpoint: u32, start: u64, end: u64) -> bool {
        self.resv(endpoint).iter().any(|r| r.overlaps(start, end))
    }

    /// ATTACH (§5.13.6.3). Checks, in order:
    /// 1. `reserved != 0` ⇒ `S_INVAL` (D10);
    /// 2. a flag other than `ATTACH_F_BYPASS` ⇒ `S_INVAL` (D11); `ATTACH_F_BYPASS` without
    ///    BYPASS_CONFIG *negotiated* ⇒ `S_INVAL` (the flag is only defined then, §5.13.6.3);
    /// 3. unknown endpoint ⇒ `S_NOENT` (D12);
    /// 4. `domain` outside the effective `domain_range` ⇒ `S_RANGE`;
    /// 5. existing domain whose bypass-ness differs from the flag ⇒ `S_INVAL` (D14);
    /// 6. endpoint already in this domain ⇒ `S_OK`, nothing changes (mappings kept);
    /// 7. existing domain with a mapping overlapping one of the endpoint's RESV_MEM regions
    ///    ⇒ `S_UNSUPP` (D16: incompatible properties);
    /// 8. a new domain beyond [`crate::Caps::max_domains`] ⇒ `S_NOMEM`.
    ///
    /// Only then is the endpoint detached from its previous domain (which ceases to exist if it
    /// became empty, D15) and attached (D13, D17). A rejected ATTACH has no side effect.
    pub fn attach(&mut self, req: &ReqAttach) -> Status {
        let domain = req.domain.get();
        let endpoint = req.endpoint.get();
        let flags = req.flags.get();
        if req.reserved != [0; 4] || flags & !ATTACH_F_BYPASS != 0 {
            return Status::Inval;
        }
        let want_bypass = flags & ATTACH_F_BYPASS != 0;
        if want_bypass && !self.negotiated.contains(Features::BYPASS_CONFIG) {
            return Status::Inval;
        }
        if !self.config.has_endpoint(endpoint) {
            return Status::NoEnt;
        }
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        let old = self.attachments.get(&endpoint).copied();
        match self.domains.get(&domain) {
            Some(d) => {
                if d.bypass != want_bypass {
                    return Status::Inval;
                }
                if old == Some(domain) {
                    return Status::Ok;
                }
                let resv = self.resv(endpoint);
                if resv.iter().any(|r| d.overlaps(r.start, r.end)) {
                    return Status::Unsupp;
                }
            }
            None => {
                let old_goes_away = old
                    .and_then(|o| self.domains.get(&o))
                    .is_some_and(|d| d.endpoints.len() == 1);
                let after = self.domains.len() - usize::from(old_goes_away) + 1;
                if after > self.config.caps().max_domains {
                    return Status::NoMem;
                }
            }
        }
        if let Some(o) = old {
            self.remove_from_domain(o, endpoint);
        }
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass: want_bypass,
            ..Domain::default()
        });
        d.endpoints.insert(endpoint);
        self.attachments.insert(endpoint, domain);
        self.bump();
        Status::Ok
    }

    fn remove_from_domain(&mut self, domain: u32, endpoint: u32) {
        self.attachments.remove(&endpoint);
        let empty = match self.domains.get_mut(&domain) {
            Some(d) => {
                d.endpoints.remove(&endpoint);
                d.endpoints.is_empty()
            }
            None => false,
        };
        if empty {
            if let Some(d) = self.domains.remove(&domain) {
                self.mapping_count = self.mapping_count.saturating_sub(d.mappings.len());
            }
        }
    }

    /// DETACH (§5.13.6.4). `reserved` is ignored (D18). Unknown endpoint ⇒ `S_NOENT` (D19);
    /// `domain` outside the effective `domain_range` ⇒ `S_RANGE`; endpoint not attached to
    /// `domain` (including not attached at all, or a domain that does not exist) ⇒ `S_INVAL`
    /// (D20, the strict choice). On success the endpoint leaves the domain and can no longer
    /// reach its mappings (D21); the domain ceases to exist, mappings included, when its last
    /// endpoint leaves.
    pub fn detach(&mut self, req: &ReqDetach) -> Status {
        let domain = req.domain.get();
        let endpoint = req.endpoint.get();
        if !self.config.has_endpoint(endpoint) {
            return Status::NoEnt;
        }
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        if self.attachments.get(&endpoint) != Some(&domain) {
            return Status::Inval;
        }
        self.remove_from_domain(domain, endpoint);
        self.bump();
        Status::Ok
    }

    /// MAP (§5.13.6.5). Checks, in order:
    /// 1. a flag other than READ/WRITE/MMIO ⇒ `S_INVAL` (D24); `MMIO` without F_MMIO
    ///    *negotiated* ⇒ `S_INVAL` (R19 makes it undefined then);
    /// 2. `virt_end < virt_start` ⇒ `S_INVAL` (R16; `virt_end == virt_start` is a one-byte
    ///    mapping, legal only with a 1-byte granule and otherwise caught by 5);
    /// 3. `domain` outside the effective `domain_range` ⇒ `S_RANGE`;
    /// 4. domain does not exist ⇒ `S_NOENT` (D25); bypass domain ⇒ `S_INVAL` (D26);
    /// 5. range outside the effective `input_range` ⇒ `S_RANGE` (§5.13.6 "fails");
    ///    `virt_start`, `phys_start` or `virt_end + 1` not a multiple of the granule ⇒ `S_RANGE`
    ///    (D22; `virt_end = u64::MAX` gives `virt_end + 1 = 2^64`, aligned);
    ///    `phys_start + (virt_end - virt_start)` beyond `u64::MAX` ⇒ `S_RANGE`;
    /// 6. overlap with an existing mapping ⇒ `S_INVAL` (D23);
    /// 7. overlap with a RESV_MEM region of any endpoint of the domain ⇒ `S_INVAL` (D44, status
    ///    unspecified by the spec: INVAL like an overlap with a mapping);
    /// 8. [`crate::Caps::max_mappings`] reached ⇒ `S_NOMEM`.
    ///
    /// A rejected MAP changes nothing. `flags = 0` is accepted (every access then faults).
    pub fn map(&mut self, req: &ReqMap) -> Status {
        let domain = req.domain.get();
        let virt_start = req.virt_start.get();
        let virt_end = req.virt_end.get();
        let phys_start = req.phys_start.get();
        let Some(flags) = MapFlags::from_bits(req.flags.get()) else {
            return Status::Inval;
        };
        if flags.contains(MapFlags::MMIO) && !self.negotiated.contains(Features::MMIO) {
            return Status::Inval;
        }
        if virt_end < virt_start {
            return Status::Inval;
        }
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        if !self.iova_in_range(virt_start, virt_end) {
            return Status::Range;
        }
        let mask = self.config.granule() - 1;
        if virt_start & mask != 0 || phys_start & mask != 0 || virt_end.wrapping_add(1) & mask != 0
        {
            return Status::Range;
        }
        if phys_start.checked_add(virt_end - virt_start).is_none() {
            return Status::Range;
        }
        if d.overlaps(virt_start, virt_end) {
            return Status::Inval;
        }
        if d.endpoints
            .iter()
            .any(|&e| self.overlaps_resv(e, virt_start, virt_end))
        {
            return Status::Inval;
        }
        if self.mapping_count >= self.config.caps().max_mappings {
            return Status::NoMem;
        }
        let mapping = Mapping {
            virt_end,
            phys_start,
            flags,
        };
        if let Some(d) = self.domains.get_mut(&domain) {
            d.mappings.insert(virt_start, mapping);
            self.mapping_count += 1;
            self.bump();
        }
        Status::Ok
    }

    /// UNMAP (§5.13.6.6). Checks, in order:
    /// 1. `reserved != 0` ⇒ `S_INVAL` and nothing is unmapped (D28, the strict option);
    /// 2. `virt_end < virt_start` ⇒ `S_INVAL`;
    /// 3. `domain` outside the effective `domain_range` ⇒ `S_RANGE`;
    /// 4. domain does not exist ⇒ `S_NOENT` (D29); bypass domain ⇒ `S_INVAL` (D30);
    /// 5. range outside the effective `input_range` ⇒ `S_RANGE` (R8);
    /// 6. a mapping only partly inside the range ⇒ `S_RANGE` and nothing is removed (D31);
    ///
    /// then every mapping inside the range is removed, holes are fine, `S_OK` (D32; the spec's
    /// examples (1)-(7) hold).
    pub fn unmap(&mut self, req: &ReqUnmap) -> Status {
        let domain = req.domain.get();
        let start = req.virt_start.get();
        let end = req.virt_end.get();
        if req.reserved != [0; 4] || end < start {
            return Status::Inval;
        }
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        let (lo, hi) = self.config.effective_input_range();
        if start < lo || end > hi {
            return Status::Range;
        }
        // A mapping split at the left edge starts before `start` and reaches it.
        let left_split = start.checked_sub(1).is_some_and(|before| {
            d.mappings
                .floor(before)
                .is_some_and(|(_, m)| m.virt_end >= start)
        });
        // A mapping split at the right edge starts inside the range and ends after it.
        let right_split = d
            .mappings
            .floor(end)
            .is_some_and(|(s, m)| s >= start && m.virt_end > end);
        if left_split || right_split {
            return Status::Range;
        }
        let removed = d.mappings.remove_range(start, end);
        if removed > 0 {
            self.mapping_count = self.mapping_count.saturating_sub(removed);
            self.bump();
        }
        Status::Ok
    }

    /// PROBE (§5.13.6.7) for `endpoint`, filling `properties` (the device-writable bytes before
    /// the tail). The whole buffer is zeroed first (D40). Then:
    /// - `properties.len() < probe_size` ⇒ `S_INVAL`, no property written (D39);
    /// - unknown endpoint ⇒ `S_NOENT` (D34);
    /// - else one 24-byte RESV_MEM property per reserved region of the endpoint, in increasing
    ///   address order, `length = 20` (D37), back to back (D38), reserved bits and bytes zero
    ///   (D36, D41), followed by zeroes, `S_OK`.
    ///
    /// The request's `reserved` field is not an argument: it is ignored (D33).
    pub fn probe(&self, endpoint: u32, properties: &mut [u8]) -> Status {
        properties.fill(0);
        let probe_size = usize::try_from(self.config.probe_size()).unwrap_or(usize::MAX);
        if properties.len() < probe_size {
            return Status::Inval;
        }
        let Some(regions) = self.config.resv_regions(endpoint) else {
            return Status::NoEnt;
        };
        let size = RESV_MEM_PROPERTY_SIZE as usize;
        for (i, r) in regions.iter().enumerate() {
            let prop = ProbeResvMem {
                head: ProbePropertyHeader {
                    type_: PROBE_T_RESV_MEM.into(),
                    length: ((RESV_MEM_PROPERTY_SIZE - 4) as u16).into(),
                },
                subtype: r.kind.subtype(),
                reserved: [0; 3],
                start: r.start.into(),
                end: r.end.into(),
            };
            let Some(dst) = i
                .checked_mul(size)
                .and_then(|off| properties.get_mut(off..off.checked_add(size)?))
            else {
                // Cannot happen: the configuration guarantees the regions fit `probe_size`.
                return Status::DevErr;
            };
            dst.copy_from_slice(prop.as_bytes());
        }
        Status::Ok
    }

    fn mode(&self, endpoint: u32) -> Option<Mode<'_>> {
        if !self.config.has_endpoint(endpoint) {
            return None;
        }
        Some(self.mode_of_known(endpoint))
    }

    /// [`Self::mode`] for an endpoint known to be managed.
    fn mode_of_known(&self, endpoint: u32) -> Mode<'_> {
        match self.attachments.get(&endpoint) {
            None if self.unattached_bypass() => Mode::Identity,
            None => Mode::Blocked,
            Some(d) => match self.domains.get(d) {
                Some(d) if d.bypass => Mode::Identity,
                Some(d) => Mode::Mapped(d),
                None => Mode::Blocked,
            },
        }
    }

    /// Translates an access of `len` bytes at IOVA `iova` by `endpoint`, checking `access`
    /// against the permissions. Returns the guest-physical pieces in IOVA order (an access
    /// spanning adjacent mappings or region boundaries gives several pieces); `len == 0` gives
    /// none. Pure: reporting the fault is the caller's job.
    ///
    /// Byte by byte, the first rule that applies:
    /// 1. inside a RESV_MEM region of the endpoint: `Msi` ⇒ identity; `Reserved` ⇒ fault
    ///    `R_MAPPING` (D45; also in bypass mode);
    /// 2. endpoint unattached: bypass mode ([`Self::unattached_bypass`]) ⇒ identity, else fault
    ///    `R_DOMAIN` (D9);
    /// 3. attached to a bypass domain ⇒ identity;
    /// 4. inside a mapping of its domain whose flags allow `access` ⇒ `phys_start + (iova -
    ///    virt_start)` (D27: WRITE needs `MAP_F_WRITE`, READ needs `MAP_F_READ`);
    /// 5. else fault `R_MAPPING`.
    ///
    /// A fault names the first faulting IOVA (`FAULT_F_ADDRESS`) and the access kind
    /// (`FAULT_F_READ`/`FAULT_F_WRITE`). A mapping covers exactly `virt_start..=virt_end`: the
    /// byte before `virt_start` is not translated (unlike QEMU's off-by-one lookup).
    ///
    /// The returned vector is an allocation per call; [`Self::translate_each`] gives the same
    /// pieces without one.
    ///
    /// # Errors
    ///
    /// [`TranslateError::Fault`], [`TranslateError::UnknownEndpoint`],
    /// [`TranslateError::Wraps`].
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<Piece>, TranslateError> {
        // Most accesses are one piece: allocate exactly one then (no growth path, and no
        // other vector to drop).
        let mut first = None;
        let mut rest: Option<Vec<Piece>> = None;
        self.translate_each(endpoint, iova, len, access, |p| {
            if first.is_none() {
                first = Some(p);
            } else {
                rest.get_or_insert_with(Vec::new).push(p);
            }
        })?;
        Ok(match (first, rest) {
            (None, _) => Vec::new(),
            (Some(p), None) => vec![p],
            (Some(p), Some(mut rest)) => {
                rest.insert(0, p);
                rest
            }
        })
    }

    /// [`Self::translate`] without allocating: the fast path for device models translating
    /// every access. `piece` is called with each piece in IOVA order (the same pieces
    /// [`Self::translate`] returns, usually one), then `Ok(())` is returned; on an error the
    /// pieces already passed must be discarded (the access as a whole is refused). Same rules,
    /// same errors, same faults (reporting them is the caller's job).
    ///
    /// # Errors
    ///
    /// [`TranslateError::Fault`], [`TranslateError::UnknownEndpoint`],
    /// [`TranslateError::Wraps`].
    pub fn translate_each(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        mut piece: impl FnMut(Piece),
    ) -> Result<(), TranslateError> {
        // One lookup tells both whether the endpoint is managed and its RESV_MEM regions.
        let Some(regions) = self.config.resv_regions(endpoint) else {
            return Err(TranslateError::UnknownEndpoint(endpoint));
        };
        let mode = self.mode_of_known(endpoint);
        if len == 0 {
            return Ok(());
        }
        let last = iova
            .checked_add(len - 1)
            .ok_or(TranslateError::Wraps { iova, len })?;
        let fault = |reason, address| {
            TranslateError::Fault(FaultRecord {
                reason,
                flags: access.fault_flags(),
                endpoint,
                address,
            })
        };
        let mut p = iova;
        loop {
            let idx = regions.partition_point(|r| r.start <= p);
            let containing = idx
                .checked_sub(1)
                .and_then(|i| regions.get(i))
                .filter(|r| r.end >= p);
            let (seg_end, phys, allowed) = if let Some(r) = containing {
                match r.kind {
                    ResvKind::Msi => (r.end.min(last), p, Access::READ_WRITE),
                    ResvKind::Reserved => return Err(fault(FAULT_R_MAPPING, p)),
                }
            } else {
                // Up to the next reserved region, which has its own rules.
                let limit = regions
                    .get(idx)
                    .map_or(u64::MAX, |r| r.start.saturating_sub(1))
                    .min(last);
                match mode {
                    Mode::Identity => (limit, p, Access::READ_WRITE),
                    Mode::Blocked => return Err(fault(FAULT_R_DOMAIN, p)),
                    Mode::Mapped(d) => {
                        let Some((start, m)) = d.mapping_at(p) else {
                            return Err(fault(FAULT_R_MAPPING, p));
                        };
                        if !access.allowed_by(m.flags) {
                            return Err(fault(FAULT_R_MAPPING, p));
                        }
                        // `p - start <= virt_end - start`, and MAP checked that
                        // `phys_start + (virt_end - start)` does not overflow.
                        let phys = m.phys_start.wrapping_add(p - start);
                        let allowed = Access {
                            read: m.flags.contains(MapFlags::READ),
                            write: m.flags.contains(MapFlags::WRITE),
                        };
                        (m.virt_end.min(limit), phys, allowed)
                    }
                }
            };
            piece(Piece {
                iova: p,
                phys,
                // `seg_end >= p`, and the piece is at most the access length.
                len: seg_end - p + 1,
                allowed,
            });
            if seg_end >= last {
                return Ok(());
            }
            p = seg_end + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::table::*;
    use super::*;
    use virtio_iommu_driver::wire::{ReqHead, RequestType};

    pub(crate) fn attach(domain: u32, endpoint: u32, flags: u32) -> ReqAttach {
        ReqAttach {
            head: ReqHead::new(RequestType::Attach),
            domain: domain.into(),
            endpoint: endpoint.into(),
            flags: flags.into(),
            reserved: [0; 4],
        }
    }

    fn detach(domain: u32, endpoint: u32) -> ReqDetach {
        ReqDetach {
            head: ReqHead::new(RequestType::Detach),
            domain: domain.into(),
            endpoint: endpoint.into(),
            reserved: [0; 8],
        }
    }

    fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> ReqMap {
        ReqMap {
            head: ReqHead::new(RequestType::Map),
            domain: domain.into(),
            virt_start: start.into(),
            virt_end: end.into(),
            phys_start: phys.into(),
            flags: flags.into(),
        }
    }

    fn unmap(domain: u32, start: u64, end: u64) -> ReqUnmap {
        ReqUnmap {
            head: ReqHead::new(RequestType::Unmap),
            domain: domain.into(),
            virt_start: start.into(),
            virt_end: end.into(),
            reserved: [0; 4],
        }
    }

    fn state(b: crate::config::DeviceConfigBuilder) -> IommuState {
        let mut s = IommuState::new(Arc::new(b.build().unwrap()));
        s.set_negotiated(s.config().offered());
        s
    }

    fn byte_state() -> IommuState {
        state(
            DeviceConfig::builder()
                .page_size_mask(1)
                .feature(Features::INPUT_RANGE, false)
                .endpoints([1, 2]),
        )
    }

    const RW: u32 = 3;

    #[test]
    fn spec_unmap_examples_1_to_7() {
        // Each example starts from a blank address space (§5.13.6.6).
        let run = |maps: &[(u64, u64)], un: (u64, u64)| {
            let mut s = byte_state();
            assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
            for &(a, b) in maps {
                assert_eq!(s.map(&map(1, a, b, 0x1000 + a, RW)), Status::Ok);
            }
            let st = s.unmap(&unmap(1, un.0, un.1));
            let left: Vec<u64> = s.domain(1).unwrap().mappings().map(|(k, _)| k).collect();
            (st, left)
        };
        assert_eq!(run(&[], (0, 4)), (Status::Ok, vec![]));
        assert_eq!(run(&[(0, 9)], (0, 9)), (Status::Ok, vec![]));
        assert_eq!(run(&[(0, 4), (5, 9)], (0, 9)), (Status::Ok, vec![]));
        assert_eq!(run(&[(0, 9)], (0, 4)), (Status::Range, vec![0]));
        assert_eq!(run(&[(0, 4), (5, 9)], (0, 4)), (Status::Ok, vec![5]));
        assert_eq!(run(&[(0, 4)], (0, 9)), (Status::Ok, vec![]));
        assert_eq!(run(&[(0, 4), (10, 14)], (0, 14)), (Status::Ok, vec![]));
    }

    #[test]
    fn unmap_split_removes_nothing_even_after_covered_mappings() {
        // A, B covered, C split ⇒ RANGE and all three kept (QEMU answers S_RANGE too, but has
        // already removed B: observed).
        let mut s = state(DeviceConfig::builder().endpoint(1));
        s.attach(&attach(1, 1, 0));
        for a in [0x100000, 0x101000, 0x102000] {
            assert_eq!(s.map(&map(1, a, a + 0xfff, a, RW)), Status::Ok);
        }
        assert_eq!(s.unmap(&unmap(1, 0x100000, 0x1027ff)), Status::Range);
        assert_eq!(s.domain(1).unwrap().mapping_count(), 3);
        // Left-edge split too.
        assert_eq!(s.unmap(&unmap(1, 0x100800, 0x102fff)), Status::Range);
        assert_eq!(s.mapping_count(), 3);
        assert_eq!(s.unmap(&unmap(1, 0, 0xffff_ffff)), Status::Ok);
        assert_eq!(s.mapping_count(), 0);
    }

    #[test]
    fn unmap_reserved_and_inverted_are_rejected_without_effect() {
        let mut s = state(DeviceConfig::builder().endpoint(1));
        s.attach(&attach(1, 1, 0));
        s.map(&map(1, 0x1000, 0x1fff, 0x1000, RW));
        let mut u = unmap(1, 0x1000, 0x1fff);
        u.reserved = [0, 0, 1, 0];
        assert_eq!(s.unmap(&u), Status::Inval);
        assert_eq!(s.unmap(&unmap(1, 0x1fff, 0x1000)), Status::Inval);
        assert_eq!(s.unmap(&unmap(1, u64::MAX, 0)), Status::Inval);
        assert_eq!(s.mapping_count(), 1);
        assert_eq!(s.unmap(&unmap(2, 0x1000, 0x1fff)), Status::NoEnt);
        // Beyond the 48-bit input range.
        assert_eq!(s.unmap(&unmap(1, 0, u64::MAX)), Status::Range);
    }

    #[test]
    fn map_checks_in_order() {
        let mut s = state(
            DeviceConfig::builder()
                .endpoints([1, 2])
                .resv_region(1, ResvRegion::msi(0x800_0000, 0x800_ffff))
                .domain_range(0, 100)
                .max_mappings(2),
        );
        assert_eq!(s.map(&map(1, 0, 0xfff, 0, RW)), Status::NoEnt);
        s.attach(&attach(1, 1, 0));
        assert_eq!(s.map(&map(1, 0, 0xfff, 0, 8)), Status::Inval, "D24");
        assert_eq!(s.map(&map(1, 0x2000, 0x1fff, 0, RW)), Status::Inval);
        assert_eq!(s.map(&map(101, 0, 0xfff, 0, RW)), Status::Range);
        assert_eq!(s.map(&map(1, 0x10, 0x100f, 0, RW)), Status::Range, "D22");
        assert_eq!(s.map(&map(1, 0x0, 0xfff, 0x10, RW)), Status::Range, "D22");
        assert_eq!(s.map(&map(1, 0x0, 0xffe, 0, RW)), Status::Range, "D22");
        assert_eq!(s.map(&map(1, 0x1000, 0x1000, 0, RW)), Status::Range);
        assert_eq!(
            s.map(&map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW)),
            Status::Range
        );
        assert_eq!(
            s.map(&map(1, 0, 0x1fff, u64::MAX - 0xfff, RW)),
            Status::Range,
            "phys overflow"
        );
        assert_eq!(
            s.map(&map(1, 0x800_0000, 0x800_0fff, 0, RW)),
            Status::Inval,
            "D44"
        );
        assert_eq!(s.map(&map(1, 0, 0xfff, 0, 0)), Status::Ok, "flags 0");
        assert_eq!(s.map(&map(1, 0, 0xfff, 0, RW)), Status::Inval, "D23");
        assert_eq!(
            s.map(&map(1, 0x1000, 0x1fff, 0, 4)),
            Status::Ok,
            "MMIO negotiated"
        );
        assert_eq!(s.map(&map(1, 0x2000, 0x2fff, 0, RW)), Status::NoMem);
        assert_eq!(s.mapping_count(), 2);
    }

    #[test]
    fn map_top_of_address_space_does_not_overflow() {
        let mut s = byte_state();
        s.attach(&attach(1, 1, 0));
        assert_eq!(s.map(&map(1, u64::MAX, u64::MAX, 0, RW)), Status::Ok);
        assert_eq!(s.map(&map(1, 0, u64::MAX, 0, RW)), Status::Inval);
        assert_eq!(s.map(&map(1, u64::MAX - 1, u64::MAX, 5, RW)), Status::Inval);
        assert_eq!(s.map(&map(1, 0, u64::MAX - 1, 2, RW)), Status::Range);
        assert_eq!(s.map(&map(1, 0, u64::MAX - 1, 0, RW)), Status::Ok);
        let p = s.translate(1, u64::MAX, 1, Access::READ).unwrap();
        assert_eq!(
            p,
            vec![Piece {
                iova: u64::MAX,
                phys: 0,
                len: 1,
                allowed: Access::READ_WRITE
            }]
        );
        let p = s.translate(1, u64::MAX - 1, 2, Access::WRITE).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            s.translate(1, u64::MAX, 2, Access::READ),
            Err(TranslateError::Wraps {
                iova: u64::MAX,
                len: 2
            })
        );
        assert_eq!(s.unmap(&unmap(1, 0, u64::MAX)), Status::Ok);
        assert_eq!(s.mapping_count(), 0);
        let mut page = state(DeviceConfig::builder().endpoint(1).input_range(0, u64::MAX));
        page.attach(&attach(1, 1, 0));
        assert_eq!(
            page.map(&map(1, u64::MAX - 0xfff, u64::MAX, 0x1000, RW)),
            Status::Ok
        );
        assert_eq!(page.map(&map(1, 0, u64::MAX, 0, RW)), Status::Inval);
    }

    #[test]
    fn attach_rules() {
        let mut s = state(
            DeviceConfig::builder()
                .endpoints([1, 2, 3])
                .resv_region(3, ResvRegion::reserved(0x5000, 0x5fff))
                .domain_range(0, 10)
                .max_domains(2),
        );
        let mut a = attach(1, 1, 0);
        a.reserved = [1, 0, 0, 0];
        assert_eq!(s.attach(&a), Status::Inval, "D10");
        assert_eq!(s.attach(&attach(1, 1, 2)), Status::Inval, "D11");
        assert_eq!(s.attach(&attach(1, 9, 0)), Status::NoEnt, "D12");
        assert_eq!(s.attach(&attach(11, 1, 0)), Status::Range);
        assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
        s.map(&map(1, 0x5000, 0x5fff, 0, RW));
        assert_eq!(
            s.attach(&attach(1, 1, 0)),
            Status::Ok,
            "re-attach keeps mappings"
        );
        assert_eq!(s.mapping_count(), 1);
        assert_eq!(
            s.attach(&attach(1, 2, ATTACH_F_BYPASS)),
            Status::Inval,
            "D14"
        );
        assert_eq!(s.endpoint_domain(2), None);
        assert_eq!(s.attach(&attach(1, 3, 0)), Status::Unsupp, "D16");
        assert_eq!(s.attach(&attach(2, 2, ATTACH_F_BYPASS)), Status::Ok);
        assert_eq!(s.attach(&attach(3, 3, 0)), Status::NoMem, "cap");
        // Moving the only endpoint of domain 2 to a new domain 3 keeps the count at 2.
        assert_eq!(s.attach(&attach(3, 2, 0)), Status::Ok, "D15");
        assert!(s.domain(2).is_none());
        // D14 with side effects avoided: endpoint 1 stays in domain 1 with its mapping.
        assert_eq!(s.attach(&attach(3, 1, ATTACH_F_BYPASS)), Status::Inval);
        assert_eq!(s.endpoint_domain(1), Some(1));
        assert_eq!(s.mapping_count(), 1);
        // Moving endpoint 1 destroys domain 1 and its mapping.
        assert_eq!(s.attach(&attach(3, 1, 0)), Status::Ok);
        assert!(s.domain(1).is_none());
        assert_eq!(s.mapping_count(), 0);
        assert_eq!(s.domain(3).unwrap().endpoints().count(), 2);
    }

    #[test]
    fn attach_bypass_needs_bypass_config_negotiated() {
        let mut s = state(DeviceConfig::builder().endpoint(1));
        s.set_negotiated(Features::VERSION_1 | Features::MAP_UNMAP);
        assert_eq!(s.attach(&attach(1, 1, ATTACH_F_BYPASS)), Status::Inval);
        s.set_negotiated(Features::VERSION_1 | Features::BYPASS_CONFIG);
        assert_eq!(s.attach(&attach(1, 1, ATTACH_F_BYPASS)), Status::Ok);
        assert!(s.is_bypass(1));
        assert_eq!(s.map(&map(1, 0, 0xfff, 0, RW)), Status::Inval, "D26");
        assert_eq!(s.unmap(&unmap(1, 0, 0xfff)), Status::Inval, "D30");
    }

    #[test]
    fn detach_rules() {
        let mut s = state(DeviceConfig::builder().endpoints([1, 2]).domain_range(0, 5));
        assert_eq!(s.detach(&detach(1, 7)), Status::NoEnt, "D19");
        assert_eq!(s.detach(&detach(1, 1)), Status::Inval, "D20 never attached");
        s.attach(&attach(1, 1, 0));
        s.attach(&attach(1, 2, 0));
        s.map(&map(1, 0, 0xfff, 0, RW));
        assert_eq!(s.detach(&detach(2, 1)), Status::Inval, "D20 wrong domain");
        assert_eq!(s.detach(&detach(6, 1)), Status::Range);
        let mut d = detach(1, 1);
        d.reserved = [0xff; 8];
        assert_eq!(s.detach(&d), Status::Ok, "D18");
        assert_eq!(s.detach(&detach(1, 1)), Status::Inval, "twice");
        assert!(
            matches!(
                s.translate(1, 0, 4, Access::READ),
                Err(TranslateError::Fault(FaultRecord {
                    reason: FAULT_R_DOMAIN,
                    ..
                }))
            ),
            "D21"
        );
        assert_eq!(s.mapping_count(), 1);
        assert_eq!(s.detach(&detach(1, 2)), Status::Ok);
        assert!(s.domain(1).is_none());
        assert_eq!(s.mapping_count(), 0);
        assert_eq!(s.map(&map(1, 0, 0xfff, 0, RW)), Status::NoEnt);
    }

    #[test]
    fn translation_rules() {
        let mut s = state(
            DeviceConfig::builder()
                .endpoints([1, 2])
                .resv_region(1, ResvRegion::msi(0x8000, 0x8fff))
                .resv_region(1, ResvRegion::reserved(0x9000, 0x9fff)),
        );
        // Unattached, bypass = 0.
        let f = s.translate(1, 0x100, 4, Access::WRITE).unwrap_err();
        assert_eq!(
            f,
            TranslateError::Fault(FaultRecord {
                reason: FAULT_R_DOMAIN,
                flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
                endpoint: 1,
                address: 0x100
            })
        );
        // MSI is identity even unattached; RESERVED always faults.
        assert_eq!(
            s.translate(1, 0x8004, 4, Access::WRITE).unwrap()[0].phys,
            0x8004
        );
        assert!(s.translate(1, 0x9000, 1, Access::READ).is_err());
        s.set_bypass(true);
        assert_eq!(
            s.translate(1, 0x100, 4, Access::WRITE).unwrap()[0].phys,
            0x100
        );
        let err = s.translate(1, 0x8ffe, 4, Access::READ).unwrap_err();
        assert!(matches!(
            err,
            TranslateError::Fault(FaultRecord {
                reason: FAULT_R_MAPPING,
                address: 0x9000,
                ..
            })
        ));
        s.attach(&attach(1, 1, 0));
        s.map(&map(1, 0x10000, 0x10fff, 0x40000, 1));
        s.map(&map(1, 0x11000, 0x11fff, 0x90000, 3));
        assert_eq!(
            s.translate(1, 0x10ffe, 4, Access::READ).unwrap(),
            vec![
                Piece {
                    iova: 0x10ffe,
                    phys: 0x40ffe,
                    len: 2,
                    allowed: Access::READ
                },
                Piece {
                    iova: 0x11000,
                    phys: 0x90000,
                    len: 2,
                    allowed: Access::READ_WRITE
                },
            ]
        );
        let e = s.translate(1, 0x10ffe, 4, Access::WRITE).unwrap_err();
        assert_eq!(
            e,
            TranslateError::Fault(FaultRecord {
                reason: FAULT_R_MAPPING,
                flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
                endpoint: 1,
                address: 0x10ffe
            })
        );
        // No off-by-one: the byte before a mapping is not mapped.
        let e = s.translate(1, 0xffff, 1, Access::READ).unwrap_err();
        assert!(
            matches!(e, TranslateError::Fault(FaultRecord { address: 0xffff, flags, .. }) if flags == FAULT_F_READ | FAULT_F_ADDRESS)
        );
        // Past the end.
        assert!(s.translate(1, 0x11fff, 2, Access::READ).is_err());
        assert_eq!(
            s.translate(7, 0, 1, Access::READ),
            Err(TranslateError::UnknownEndpoint(7))
        );
        assert_eq!(s.translate(1, 0xffff, 0, Access::READ), Ok(vec![]));
        // Back to bypass = 0: unattached endpoint 2 is blocked again.
        s.set_bypass(false);
        assert!(s.translate(2, 0, 1, Access::READ).is_err());
    }

    #[test]
    fn probe_contents() {
        let s = state(
            DeviceConfig::builder()
                .endpoints([1, 2])
                .resv_region(1, ResvRegion::reserved(0x9000, 0x9fff))
                .resv_region(1, ResvRegion::msi(0x0802_0000, 0x0802_0fff)),
        );
        let mut buf = vec![0xaa; 512];
        assert_eq!(s.probe(1, &mut buf), Status::Ok);
        // Sorted by address: the RESERVED region first, then QEMU's GICv2m MSI doorbell.
        assert_eq!(&buf[..8], &[1, 0, 20, 0, 0, 0, 0, 0]);
        assert_eq!(
            &buf[8..24],
            &[0, 0x90, 0, 0, 0, 0, 0, 0, 0xff, 0x9f, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            &buf[24..48],
            &[1, 0, 20, 0, 1, 0, 0, 0, 0, 0, 2, 8, 0, 0, 0, 0, 0xff, 0x0f, 2, 8, 0, 0, 0, 0]
        );
        assert!(buf[48..].iter().all(|&b| b == 0));
        let mut buf = vec![0xaa; 512];
        assert_eq!(s.probe(2, &mut buf), Status::Ok);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(s.probe(3, &mut buf), Status::NoEnt);
        let mut short = vec![0xaa; 100];
        assert_eq!(s.probe(1, &mut short), Status::Inval, "D39");
        assert!(short.iter().all(|&b| b == 0));
    }

    #[test]
    fn reset_detaches_everything_and_keeps_bypass() {
        let mut s = state(DeviceConfig::builder().endpoint(1).boot_bypass(true));
        s.set_bypass(false);
        s.attach(&attach(1, 1, 0));
        s.map(&map(1, 0, 0xfff, 0, RW));
        s.reset();
        assert_eq!(s.domain_count(), 0);
        assert_eq!(s.mapping_count(), 0);
        assert_eq!(s.endpoint_domain(1), None);
        assert!(!s.bypass(), "D4: bypass unchanged by device reset");
        s.system_reset();
        assert!(s.bypass(), "D4: restored on system reset");
    }

    /// splitmix64, for the deterministic randomized tests below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn check_table(t: &MappingTable, reference: &BTreeMap<u64, Mapping>) {
        assert!(t.firsts.is_empty() || t.firsts.len().is_power_of_two());
        assert!(t.firsts.len() >= t.leaves.len() && t.firsts.len() < 4 * t.leaves.len().max(1));
        assert!(t.firsts[t.leaves.len()..].iter().all(|&f| f == u64::MAX));
        assert_eq!(t.len(), reference.len());
        let mut count = 0;
        for (leaf, &first) in t.leaves.iter().zip(&t.firsts) {
            assert!(
                (1..=LEAF_MAX).contains(&leaf.len()),
                "leaf size {}",
                leaf.len()
            );
            assert_eq!(leaf.starts()[0], first);
            assert!(leaf.starts().windows(2).all(|w| w[0] < w[1]));
            assert!(leaf.keys[leaf.len()..].iter().all(|&k| k == u64::MAX));
            count += leaf.len();
        }
        assert_eq!(count, t.len());
        assert!(t
            .iter()
            .map(|(s, m)| (s, *m))
            .eq(reference.iter().map(|(&s, &m)| (s, m))));
        assert!(t.firsts[..t.leaves.len()].windows(2).all(|w| w[0] < w[1]));
    }

    fn check_floor(t: &MappingTable, reference: &BTreeMap<u64, Mapping>, key: u64) {
        assert_eq!(
            t.floor(key).map(|(s, m)| (s, *m)),
            reference.range(..=key).next_back().map(|(&s, &m)| (s, m)),
            "floor({key:#x})"
        );
    }

    #[test]
    fn mapping_table_matches_an_ordered_map() {
        // Keys are multiples of 16 in 0..16 * SLOTS: many more mappings than a leaf holds, so
        // leaves split, empty and merge; insertions ascending, descending and scattered,
        // removals of single keys and of ranges covering up to every leaf.
        const SLOTS: u64 = 3000;
        let mapping = |k: u64| Mapping {
            virt_end: k + 15,
            phys_start: k.wrapping_mul(7),
            flags: MapFlags::READ,
        };
        let mut rng = Rng(1);
        for round in 0..12u64 {
            let mut t = MappingTable::default();
            let mut reference = BTreeMap::new();
            let order: Vec<u64> = match round % 3 {
                0 => (0..SLOTS).collect(),
                1 => (0..SLOTS).rev().collect(),
                _ => (0..SLOTS).map(|_| rng.below(SLOTS)).collect(),
            };
            for (i, slot) in order.into_iter().enumerate() {
                let k = slot * 16;
                if let std::collections::btree_map::Entry::Vacant(e) = reference.entry(k) {
                    e.insert(mapping(k));
                    t.insert(k, mapping(k));
                }
                if i % 7 == 0 {
                    // Interleaved removals: mostly one key, sometimes a wide range.
                    let a = rng.below(SLOTS * 16);
                    let b = if rng.below(10) == 0 {
                        a.saturating_add(rng.below(SLOTS * 4))
                    } else {
                        a + rng.below(32)
                    };
                    let expected: Vec<u64> = reference.range(a..=b).map(|(&k, _)| k).collect();
                    for k in &expected {
                        reference.remove(k);
                    }
                    assert_eq!(t.remove_range(a, b), expected.len());
                }
                if i % 101 == 0 {
                    check_table(&t, &reference);
                }
            }
            check_table(&t, &reference);
            for _ in 0..2000 {
                check_floor(&t, &reference, rng.below(SLOTS * 16 + 64));
            }
            for key in [0, 1, 15, 16, u64::MAX] {
                check_floor(&t, &reference, key);
            }
            // Drain it by scattered ranges, checking as it shrinks.
            while !reference.is_empty() {
                let a = rng.below(SLOTS * 16);
                let b = a + rng.below(SLOTS * 2);
                let expected: Vec<u64> = reference.range(a..=b).map(|(&k, _)| k).collect();
                for k in &expected {
                    reference.remove(k);
                }
                assert_eq!(t.remove_range(a, b), expected.len());
                check_table(&t, &reference);
                check_floor(&t, &reference, a);
                check_floor(&t, &reference, b);
            }
            assert_eq!(t.remove_range(0, u64::MAX), 0);
            assert!(t.leaves.is_empty() && t.firsts.is_empty());
        }
    }

    #[test]
    fn many_mappings_map_unmap_translate_like_a_naive_model() {
        // The proptest model (tests/model.rs) uses at most 6 mappings; this drives thousands
        // through the state, against a plain list, so the table's splits and merges are used.
        const PAGES: u64 = 12_000;
        let mut s = state(DeviceConfig::builder().endpoint(1).max_mappings(1 << 20));
        assert_eq!(s.attach(&attach(1, 1, 0)), Status::Ok);
        // (start page, pages, phys page, flags)
        let mut model: Vec<(u64, u64, u64, u32)> = Vec::new();
        let mut rng = Rng(7);
        let mut peak = 0;
        let covering = |model: &[(u64, u64, u64, u32)], page: u64| {
            model
                .iter()
                .copied()
                .find(|&(st, n, _, _)| st <= page && page < st + n)
        };
        for step in 0..20_000u32 {
            let page = rng.below(PAGES);
            let n = 1 + rng.below(4);
            if step % 3 != 2 {
                let flags = 1 + rng.below(3) as u32;
                let phys = rng.below(1 << 20);
                let overlap = model
                    .iter()
                    .any(|&(st, m, _, _)| st < page + n && page < st + m);
                let want = if overlap { Status::Inval } else { Status::Ok };
                let got = s.map(&map(
                    1,
                    page * 4096,
                    (page + n) * 4096 - 1,
                    phys * 4096,
                    flags,
                ));
                assert_eq!(got, want, "map {page} +{n}");
                if got == Status::Ok {
                    model.push((page, n, phys, flags));
                }
            } else {
                let n = if rng.below(20) == 0 {
                    1 + rng.below(400)
                } else {
                    n
                };
                let (a, b) = (page * 4096, (page + n) * 4096 - 1);
                let split = model.iter().any(|&(st, m, _, _)| {
                    let (ms, me) = (st * 4096, (st + m) * 4096 - 1);
                    ms <= b && a <= me && (ms < a || me > b)
                });
                let want = if split { Status::Range } else { Status::Ok };
                assert_eq!(s.unmap(&unmap(1, a, b)), want, "unmap {page} +{n}");
                if !split {
                    model.retain(|&(st, _, _, _)| !(page <= st && st < page + n));
                }
            }
            peak = peak.max(model.len());
            if step % 1000 == 999 {
                let mut sorted = model.clone();
                sorted.sort_unstable();
                let got: Vec<(u64, u64, u64, u32)> = s
                    .domain(1)
                    .unwrap()
                    .mappings()
                    .map(|(st, m)| {
                        (
                            st / 4096,
                            (m.virt_end + 1 - st) / 4096,
                            m.phys_start / 4096,
                            m.flags.bits(),
                        )
                    })
                    .collect();
                assert_eq!(got, sorted);
                assert_eq!(s.mapping_count(), model.len());
            }
            // Translate a random access of up to 3 pages.
            let iova = rng.below(PAGES * 4096);
            let len = 1 + rng.below(3 * 4096);
            let got = s.translate(1, iova, len, Access::READ);
            let mut each = Vec::new();
            let each = s
                .translate_each(1, iova, len, Access::READ, |p| each.push(p))
                .map(|()| each);
            assert_eq!(each, got);
            let mut expected = Vec::new();
            let mut p = iova;
            let last = iova + len - 1;
            let fault = loop {
                match covering(&model, p / 4096) {
                    Some((st, m, phys, flags)) if flags & 1 != 0 => {
                        let end = ((st + m) * 4096 - 1).min(last);
                        expected.push(Piece {
                            iova: p,
                            phys: phys * 4096 + (p - st * 4096),
                            len: end - p + 1,
                            allowed: Access {
                                read: true,
                                write: flags & 2 != 0,
                            },
                        });
                        if end == last {
                            break None;
                        }
                        p = end + 1;
                    }
                    _ => break Some(p),
                }
            };
            match fault {
                None => assert_eq!(got, Ok(expected)),
                Some(address) => assert_eq!(
                    got,
                    Err(TranslateError::Fault(FaultRecord {
                        reason: FAULT_R_MAPPING,
                        flags: FAULT_F_READ | FAULT_F_ADDRESS,
                        endpoint: 1,
                        address,
                    }))
                ),
            }
        }
        assert!(peak > 8 * LEAF_MAX, "only {peak} mappings at most");
        assert!(s.domain(1).unwrap().mappings.leaves.len() > 4);
    }
}
