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
use alloc::collections::BTreeMap;
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
            .map(|r| usize::from(r.last - r.first) + 1)
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

impl Topology {
    /// Every requester ID → endpoint translation of every host bridge, grouped by
    /// `(IOMMU phandle, endpoint ID)`, in key order.
    fn translations(&self) -> BTreeMap<(u32, u32), Vec<RequesterIds>> {
        let mut groups: BTreeMap<(u32, u32), Vec<RequesterIds>> = BTreeMap::new();
        for (host_bridge, bridge) in self.host_bridges.iter().enumerate() {
            if bridge.iommu_map.is_empty() {
                continue;
            }
            let first = u16::from(bridge.bus_start) << 8;
            let last = u16::from(bridge.bus_end) << 8 | 0xff;
            for rid in first..=last {
                let Some(key) = bridge.map_requester_id(rid) else {
                    continue;
                };
                let runs = groups.entry(key).or_default();
                match runs.last_mut() {
                    Some(run)
                        if run.host_bridge == host_bridge && run.last.wrapping_add(1) == rid =>
                    {
                        run.last = rid;
                    }
                    _ => runs.push(RequesterIds {
                        host_bridge,
                        first: rid,
                        last: rid,
                    }),
                }
            }
        }
        groups
    }

    /// The alias groups: every set of at least two PCI requester IDs (over all host bridges)
    /// that `iommu-map`/`iommu-map-mask` send to the same endpoint ID of the same IOMMU (see
    /// the [module documentation](super::alias) for the binding rules), ordered by IOMMU phandle then
    /// endpoint ID. Such requesters cannot be isolated from each other: they share a domain.
    /// Walks every requester ID of every bridge's bus range (at most 65 536 per bridge)
    /// through its `iommu-map`.
    pub fn alias_groups(&self) -> Vec<AliasGroup> {
        self.translations()
            .into_iter()
            .map(|((iommu_phandle, endpoint_id), requester_ids)| AliasGroup {
                iommu_phandle,
                iommu: self.iommu_by_phandle(iommu_phandle),
                endpoint_id,
                requester_ids,
            })
            .filter(|g| g.len() > 1)
            .collect()
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
        let Some(key) = bridge.map_requester_id(requester_id) else {
            return Ok(None);
        };
        let mut requester_ids = self.translations().remove(&key).unwrap_or_default();
        if requester_ids.is_empty() {
            // Outside the bridge's bus range: alone.
            requester_ids.push(RequesterIds {
                host_bridge,
                first: requester_id,
                last: requester_id,
            });
        }
        Ok(Some(AliasGroup {
            iommu_phandle: key.0,
            iommu: self.iommu_by_phandle(key.0),
            endpoint_id: key.1,
            requester_ids,
        }))
    }
}
