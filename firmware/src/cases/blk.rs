//! virtio-blk behind the IOMMU: virtio-drivers' unmodified `VirtIOBlk` on `IommuHal`, so its
//! rings and every data buffer are reached through IOVAs mapped by our driver.

use alloc::format;
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::pci::PciTransport;
use virtio_iommu_driver::dma::{AccessPlatform, DmaSpace, IommuHal};

use super::env::{with_iommu, BlkDma, BLK_DMA};
use super::{Env, Tap};
use crate::pci::PciBus;

type Blk = VirtIOBlk<IommuHal<BlkDma>, AccessPlatform<PciTransport>>;

pub fn run(tap: &mut Tap, pci: &mut PciBus, env: &mut Env) {
    let Some(dev) = env.endpoint_of(0x1af4, &[0x1042, 0x1001]) else {
        tap.case("virtio-blk behind the IOMMU", || {
            Err("no virtio-blk endpoint found".into())
        });
        return;
    };
    let mut blk: Option<Blk> = None;
    let mut mappings_after_init = 0;
    tap.case("virtio-blk: attached to a domain, initialised with rings at IOVAs", || {
        let domain = env.domain()?;
        with_iommu(|i| i.attach(domain, dev.endpoint))
            .map_err(|e| format!("ATTACH endpoint {:#x} to domain {domain}: {e}", dev.endpoint))?;
        let space = DmaSpace::new(domain, env.iova_allocator(dev.endpoint)?);
        *BLK_DMA.lock() = Some(space.map_err(|e| format!("DmaSpace: {e}"))?);
        let root = &mut pci.roots[dev.function.host_bridge];
        let transport = PciTransport::new::<IommuHal<BlkDma>, _>(root, dev.function.device_function)
            .map_err(|e| format!("PCI transport: {e:?}"))?;
        let b = Blk::new(AccessPlatform::new(transport)).map_err(|e| format!("VirtIOBlk: {e}"))?;
        let space = BLK_DMA.lock();
        let space = space.as_ref().ok_or("no DMA state")?;
        mappings_after_init = space.live_mappings();
        println!(
            "# virtio-blk endpoint {:#x} in domain {domain}: {} sectors, {} live mapping(s) after init",
            dev.endpoint,
            b.capacity(),
            mappings_after_init
        );
        if space.failures != 0 || mappings_after_init == 0 {
            return Err(format!("{} MAP failures, {mappings_after_init} mappings", space.failures));
        }
        blk = Some(b);
        Ok(())
    });
    let Some(mut blk) = blk else {
        tap.skipped_by_failure(
            "virtio-blk: read the entire disk through IOVAs",
            "no virtio-blk",
        );
        tap.skipped_by_failure(
            "virtio-blk: write and read back a scratch region through IOVAs",
            "no virtio-blk",
        );
        return;
    };

    tap.case("virtio-blk: read the entire disk through IOVAs", || {
        let hex = crate::blkio::disk_sha256(&mut blk)?;
        println!("# read {} bytes", blk.capacity() * SECTOR_SIZE as u64);
        println!("disk-sha256: {hex}");
        Ok(())
    });

    tap.case(
        "virtio-blk: write and read back a scratch region through IOVAs",
        || {
            let (len, sector) = crate::blkio::scratch_round_trip(&mut blk)?;
            println!("# wrote, verified and restored {len} bytes at sector {sector}");
            Ok(())
        },
    );

    tap.case(
        "virtio-blk: every buffer unmapped again, no failed MAP/UNMAP",
        || {
            let space = BLK_DMA.lock();
            let space = space.as_ref().ok_or("no DMA state")?;
            println!(
                "# virtio-blk DMA: {} MAP, {} UNMAP, {} failures, {} live",
                space.maps,
                space.unmaps,
                space.failures,
                space.live_mappings()
            );
            if space.failures != 0 || space.live_mappings() != mappings_after_init {
                return Err(format!(
                    "{} live mappings, {} failures",
                    space.live_mappings(),
                    space.failures
                ));
            }
            if space.maps < 3 * 2 {
                return Err("data buffers were not mapped".into());
            }
            Ok(())
        },
    );
    // Keep the device (and its mappings) alive: later cases rely on its domain staying intact.
    core::mem::forget(blk);
}
