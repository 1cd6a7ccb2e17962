//! PCI requester IDs the IOMMU cannot tell apart ([`Topology::alias_groups`],
//! [`Topology::endpoints_sharing`]).
//!
//! Binding rules (`pci/pci-iommu.txt`): a host bridge's `iommu-map = <rid-base iommu
//! iommu-base length>*` sends a requester ID `r` in `[rid-base, rid-base + length)` (exclusive
//! end) to endpoint ID `iommu-base + (r - rid-base)` of `iommu`, after `r` is ANDed with
//! `iommu-map-mask` (all ones when absent); the first entry that covers the masked ID
//! applies. So several requester IDs reach one endpoint ID when the mask folds them
//! together (e.g. `iommu-map-mask = <0xfff8>` makes the eight functions of a device one
//! endpoint) or when entries send different IDs to one endpoint ID (of one or of several host
//! bridges). The IOMMU then sees their DMA as one endpoint's: they share one domain and one
//! IOVA space whatever the OS wants — an IOMMU group. A domain serving such a group is a
//! shared domain ([`DmaSpace::attach_endpoint`](crate::dma::DmaSpace::attach_endpoint) is how a
//! space serves several endpoint IDs; a group is one endpoint ID, attached once).
//!
//! Only requester IDs on the bridge's buses (`bus-range`) are considered. Not visible in the
//! devicetree, so not reported: aliases a PCIe-to-PCI bridge creates (every device behind it
//! uses the bridge's requester ID) and devices that use several requester IDs.

use super::{Topology, TopologyError};
use alloc::vec::Vec;

/// Requester IDs `first..=last` (inclusive, `bus << 8 | device << 3 | function`) of host
/// bridge `host_bridge` (an index into [`Topology::host_bridges`]).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RequesterIds {
    /// Index into [`Topology::host_bridges`].
    pub host_bridge: usize,
    /// First requester ID.
    pub first: u16,
    /// Last requester ID (inclusive).
    pub last: u16,
}

/// Requester IDs that reach one endpoint ID of one IOMMU: DMA from any of them is
/// translated by the same domain.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct AliasGroup {
    /// Phandle of the IOMMU the `iommu-map` names.
    pub iommu_phandle: u32,
    /// Index into [`Topology::iommus`] of that IOMMU; `None` when it is not a virtio-iommu
    /// of the topology.
    pub iommu: Option<usize>,
    /// The endpoint ID they all reach.
    pub endpoint_id: u32,
    /// The requester IDs, as maximal runs, by host bridge then ID.
    pub requester_ids: Vec<RequesterIds>,
}

impl AliasGroup {
    /// Number of requester IDs in the group.
    pub fn len(&self) -> usize {
        self.requester_ids
            .iter()
            .map(|r| usize::from(r.last.saturating_sub(r.first)) + 1)
            .sum()
    }

    /// Whether the group has no requester ID (never for a group [`Topology::alias_groups`]
    /// returns).
    pub fn is_empty(&self) -> bool {
        self.requester_ids.is_empty()
    }

    /// Whether requester ID `rid` of host bridge `host_bridge` is in the group.
    pub fn contains(&self, host_bridge: usize, rid: u16) -> bool {
        self.requester_ids
            .iter()
            .any(|r| r.host_bridge == host_bridge && (r.first..=r.last).contains(&rid))
    }
}

/// Requester IDs `first..=last` of one host bridge that reach endpoint IDs of one IOMMU in
/// step: `ep_first + (rid - first)` (`step_one`), or `ep_first` for all of them.
#[derive(Clone, Copy, Debug)]
struct Segment {
    host_bridge: usize,
    first: u16,
    last: u16,
    phandle: u32,
    ep_first: u32,
    step_one: bool,
}

impl Segment {
    /// Last endpoint ID reached (inclusive).
    fn ep_last(&self) -> u32 {
        if self.step_one {
            // `map_requester_id` produced every value, so no overflow.
            self.ep_first + u32::from(self.last - self.first)
        } else {
            self.ep_first
        }
    }

    /// Requester IDs reaching `ep`, if any.
    fn rids_for(&self, ep: u32) -> Option<(u16, u16)> {
        if ep < self.ep_first || ep > self.ep_last() {
            return None;
        }
        if self.step_one {
            // `ep - ep_first <= last - first`, a u16.
            let rid = self.first + (ep - self.ep_first) as u16;
            Some((rid, rid))
        } else {
            Some((self.first, self.last))
        }
    }

    /// Number of requester IDs per endpoint ID reached.
    fn multiplicity(&self) -> usize {
        if self.step_one {
            1
        } else {
            usize::from(self.last - self.first) + 1
        }
    }
}

impl Topology {
    /// Every requester ID of every host bridge's bus range that `iommu-map` translates, as
    /// segments (few: one per `iommu-map` entry without a mask; no allocation per ID).
    fn segments(&self) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        for (host_bridge, bridge) in self.host_bridges.iter().enumerate() {
            if bridge.iommu_map.is_empty() {
                continue;
            }
            let first = u16::from(bridge.bus_start) << 8;
            let last = u16::from(bridge.bus_end) << 8 | 0xff;
            let mut current: Option<Segment> = None;
            for rid in first..=last {
                let Some((phandle, ep)) = bridge.map_requester_id(rid) else {
                    out.extend(current.take());
                    continue;
                };
                if let Some(seg) = current.as_mut() {
                    let single = seg.first == seg.last;
                    let next = seg.ep_last().checked_add(1) == Some(ep);
                    let same = seg.ep_last() == ep;
                    // A single ID starts a run in step (next ID) or constant (same ID).
                    let extends = if single {
                        next || same
                    } else if seg.step_one {
                        next
                    } else {
                        same
                    };
                    if extends && seg.phandle == phandle && seg.last.wrapping_add(1) == rid {
                        if single {
                            seg.step_one = next;
                        }
                        seg.last = rid;
                        continue;
                    }
                }
                out.extend(current.take());
                current = Some(Segment {
                    host_bridge,
                    first: rid,
                    last: rid,
                    phandle,
                    ep_first: ep,
                    step_one: true,
                });
            }
            out.extend(current);
        }
        out
    }

    /// The group of `(phandle, ep)` from `segments`.
    fn group(&self, segments: &[Segment], phandle: u32, ep: u32) -> AliasGroup {
        let mut requester_ids: Vec<RequesterIds> = Vec::new();
        let mut runs: Vec<RequesterIds> = segments
            .iter()
            .filter(|s| s.phandle == phandle)
            .filter_map(|s| {
                s.rids_for(ep).map(|(first, last)| RequesterIds {
                    host_bridge: s.host_bridge,
                    first,
                    last,
                })
            })
            .collect();
        runs.sort_unstable_by_key(|r| (r.host_bridge, r.first));
        for r in runs {
            match requester_ids.last_mut() {
                Some(l)
                    if l.host_bridge == r.host_bridge && l.last.checked_add(1) == Some(r.first) =>
                {
                    l.last = r.last;
                }
                _ => requester_ids.push(r),
            }
        }
        AliasGroup {
            iommu_phandle: phandle,
            iommu: self.iommu_by_phandle(phandle),
            endpoint_id: ep,
            requester_ids,
        }
    }

    /// The alias groups: every set of at least two PCI requester IDs (over all host bridges)
    /// that `iommu-map`/`iommu-map-mask` send to the same endpoint ID of the same IOMMU (see
    /// the [module documentation](super::alias) for the binding rules), ordered by IOMMU phandle then
    /// endpoint ID. Such requesters cannot be isolated from each other: they share a domain.
    /// Walks every requester ID of every bridge's bus range (at most 65 536 per bridge)
    /// through its `iommu-map` (O(65 536 × entries) time per bridge), keeping runs of
    /// requester IDs, not one record per ID.
    pub fn alias_groups(&self) -> Vec<AliasGroup> {
        let segments = self.segments();
        // Per IOMMU, a sweep over the endpoint-ID intervals the segments cover, counting how
        // many requester IDs reach each endpoint ID (as u64: `ep_last + 1` may be 2^32).
        let mut events: Vec<(u32, u64, isize)> = Vec::with_capacity(segments.len() * 2);
        for s in &segments {
            // At most 65 536 requester IDs per segment: fits an isize.
            let m = s.multiplicity() as isize;
            events.push((s.phandle, u64::from(s.ep_first), m));
            events.push((s.phandle, u64::from(s.ep_last()) + 1, -m));
        }
        events.sort_unstable();
        let mut groups = Vec::new();
        let mut count = 0isize;
        for (i, &(ph, at, delta)) in events.iter().enumerate() {
            count += delta;
            let Some(&(next_ph, next_at, _)) = events.get(i + 1) else {
                break;
            };
            if next_ph != ph {
                // Every interval of this IOMMU has closed: `count` is back at 0.
                count = 0;
                continue;
            }
            if count < 2 {
                continue;
            }
            // Endpoint IDs `at..next_at` are reached `count` times; both bounds fit u32 or
            // are 2^32 (an exclusive end).
            for ep in at..next_at {
                if let Ok(ep) = u32::try_from(ep) {
                    groups.push(self.group(&segments, ph, ep));
                }
            }
        }
        groups
    }

    /// The requester IDs that share the endpoint of `requester_id` under host bridge
    /// `host_bridge` (index into [`Topology::host_bridges`]) — its alias group, itself
    /// included — or `None` when the requester is not behind an IOMMU. A requester that
    /// shares with nobody gets a group of one.
    ///
    /// # Errors
    ///
    /// [`TopologyError::NoSuchHostBridge`] when `host_bridge >= host_bridges.len()`.
    pub fn endpoints_sharing(
        &self,
        host_bridge: usize,
        requester_id: u16,
    ) -> Result<Option<AliasGroup>, TopologyError> {
        let bridge = self
            .host_bridges
            .get(host_bridge)
            .ok_or(TopologyError::NoSuchHostBridge(host_bridge))?;
        let Some((phandle, ep)) = bridge.map_requester_id(requester_id) else {
            return Ok(None);
        };
        let mut group = self.group(&self.segments(), phandle, ep);
        if group.requester_ids.is_empty() {
            // Outside the bridge's bus range: alone.
            group.requester_ids.push(RequesterIds {
                host_bridge,
                first: requester_id,
                last: requester_id,
            });
        }
        Ok(Some(group))
    }
}
