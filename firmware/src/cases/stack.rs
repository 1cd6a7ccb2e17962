//! The stack the driver needs to come up: `VirtIOIommu::new`, ATTACH, MAP, PROBE (then UNMAP,
//! DETACH and drop) on QEMU's device, measured by painting the boot stack
//! ([`crate::stack::measure`]) from the call site, so the firmware's own frames and the printing
//! are not counted. The bound, [`LIMIT`], is the issue's: 8 KiB in release.

use alloc::format;
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{IommuError, IommuOptions, VirtIOIommu, WaitPolicy};

use super::env::{now_ns, DmaPage};
use super::Tap;
use crate::hal::IdentityHal;
use crate::iommu_dev::{IommuDevice, IommuTransport};
use crate::pci::PciBus;

/// Most bytes of stack the bring-up may use.
pub const LIMIT: usize = 8192;

/// The TAP case name.
pub const NAME: &str = "driver bring-up (new + ATTACH + MAP + PROBE) within 8 KiB of stack";

/// Runs the case on the IOMMU `iommu` (index `iommu_index` in the topology), with the first
/// endpoint behind it. Leaves the device reset, with no domain and no mapping.
pub fn run(tap: &mut Tap, pci: &mut PciBus, iommu_index: usize, iommu: &IommuDevice) {
    tap.case(NAME, || {
        let endpoint = first_endpoint(pci, iommu_index, iommu)?;
        let transport = iommu.open(pci)?;
        let options = IommuOptions {
            wait: WaitPolicy {
                clock: Some(now_ns),
                timeout_ns: 5_000_000_000,
                ..WaitPolicy::default()
            },
            ..IommuOptions::default()
        };
        // 64 KiB: a page of every granule QEMU offers.
        let page = DmaPage::new(0x1_0000, 0x1_0000).ok_or("no heap for the page")?;
        let phys = page.phys();
        let (outcome, used) =
            crate::stack::measure(|| bring_up(transport, options, endpoint, phys));
        let properties = outcome.map_err(|e| format!("bring-up: {e}"))?;
        let used = used.ok_or("the boot stack is too small to measure")?;
        println!(
            "# stack: driver bring-up used {used} bytes (endpoint {endpoint:#x}, {properties} \
             PROBE properties; size_of::<VirtIOIommu<_, IommuTransport>>() = {} bytes)",
            size_of::<VirtIOIommu<IdentityHal, IommuTransport>>()
        );
        if used > LIMIT {
            return Err(format!("{used} bytes of stack, more than {LIMIT}"));
        }
        Ok(())
    });
}

/// `new`, PROBE, ATTACH to the last domain ID of `domain_range` (the cases'
/// [`super::env::Domains`] hand IDs out from the first), MAP one granule at the first
/// granule-aligned IOVA from 1 MiB to `phys`, UNMAP, DETACH, drop. Returns the number of PROBE properties.
#[inline(never)]
fn bring_up(
    transport: IommuTransport,
    options: IommuOptions,
    endpoint: u32,
    phys: u64,
) -> Result<usize, IommuError> {
    let mut iommu = VirtIOIommu::<IdentityHal, _>::new(transport, options)?;
    let c = *iommu.config();
    let domain = c.domain_range.1;
    let iova = c.input_range.0.max(0x10_0000).next_multiple_of(c.granule);
    let last = iova + (c.granule - 1);
    // PROBE before ATTACH (R5: a driver that negotiated PROBE SHOULD probe each endpoint
    // before attaching it; the device's driver checker flags the other order).
    let mut properties = 0;
    iommu.probe(endpoint, |_| properties += 1)?;
    iommu.attach(domain, endpoint)?;
    iommu.map(domain, iova, last, phys, MapFlags::READ | MapFlags::WRITE)?;
    iommu.unmap(domain, iova, last)?;
    iommu.detach(domain, endpoint)?;
    drop(iommu);
    Ok(properties)
}

/// The endpoint ID of the first PCI function behind this IOMMU (other than the IOMMU).
fn first_endpoint(
    pci: &PciBus,
    iommu_index: usize,
    iommu: &IommuDevice,
) -> Result<u32, &'static str> {
    for f in &pci.functions {
        if !iommu.may_serve(f.host_bridge) || iommu.is_function(f) {
            continue;
        }
        if let Ok(Some(ep)) = pci.topology.pci_endpoint(f.host_bridge, f.requester_id) {
            if ep.iommu == iommu_index {
                return Ok(ep.endpoint_id);
            }
        }
    }
    Err("no endpoint behind the IOMMU")
}
