//! virtio-blk behind the IOMMU: virtio-drivers' unmodified `VirtIOBlk` on `IommuHal`, so its
//! rings and every data buffer are reached through IOVAs mapped by our driver.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use sha2::{Digest, Sha256};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::pci::PciTransport;
use virtio_iommu_driver::dma::{AccessPlatform, DmaSpace, IommuHal};

use super::env::{pattern, with_iommu, BlkDma, BLK_DMA};
use super::{Env, Tap};
use crate::pci::PciBus;
use crate::timer::Deadline;

type Blk = VirtIOBlk<IommuHal<BlkDma>, AccessPlatform<PciTransport>>;

/// Bytes per request when reading the whole disk.
const CHUNK: usize = 64 * 1024;
/// Size of the scratch region written and restored at the end of the disk.
const SCRATCH: usize = 64 * 1024;

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
        *BLK_DMA.lock() = Some(DmaSpace::new(domain, env.iova_allocator(dev.endpoint)?));
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
        let sectors = blk.capacity();
        let bytes = sectors
            .checked_mul(SECTOR_SIZE as u64)
            .ok_or("capacity overflows")?;
        let mut hasher = Sha256::new();
        let mut sector = 0u64;
        let mut buf = vec![0u8; CHUNK].into_boxed_slice();
        while sector < sectors {
            let n = ((sectors - sector) as usize * SECTOR_SIZE).min(CHUNK);
            buf = io(&mut blk, sector, buf, n, false)?;
            hasher.update(&buf[..n]);
            sector += (n / SECTOR_SIZE) as u64;
        }
        let digest = hasher.finalize();
        let mut hex = String::new();
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        println!("# read {bytes} bytes");
        println!("disk-sha256: {hex}");
        Ok(())
    });

    tap.case(
        "virtio-blk: write and read back a scratch region through IOVAs",
        || {
            let bytes = (blk.capacity() as usize).saturating_mul(SECTOR_SIZE);
            let len = SCRATCH.min(bytes);
            let sector = ((bytes - len) / SECTOR_SIZE) as u64;
            let original = io(
                &mut blk,
                sector,
                vec![0u8; len].into_boxed_slice(),
                len,
                false,
            )?;
            let data = pattern(0x5a, len).into_boxed_slice();
            let expected = data.clone();
            io(&mut blk, sector, data, len, true)?;
            let back = io(
                &mut blk,
                sector,
                vec![0u8; len].into_boxed_slice(),
                len,
                false,
            )?;
            // Put the disk back as it was, so the image the host hashed is unchanged.
            let restore = original.clone();
            io(&mut blk, sector, restore, len, true)?;
            let again = io(
                &mut blk,
                sector,
                vec![0u8; len].into_boxed_slice(),
                len,
                false,
            )?;
            if back != expected {
                return Err("pattern read back differs".into());
            }
            if again != original {
                return Err("restored contents differ".into());
            }
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

/// One read or write of `len` bytes at `sector`, waiting at most 10 s. The buffer is owned here
/// so that on a timeout it can be leaked instead of freed while the device may still use it.
fn io(
    blk: &mut Blk,
    sector: u64,
    mut buf: Box<[u8]>,
    len: usize,
    write: bool,
) -> Result<Box<[u8]>, String> {
    let mut req = Box::new(BlkReq::default());
    let mut resp = Box::new(BlkResp::default());
    let data = &mut buf[..len];
    // SAFETY: `req`, `data` and `resp` are not touched until the request completes; on timeout
    // they are leaked, so the device can never write into freed memory.
    let token = unsafe {
        if write {
            blk.write_blocks_nb(sector as usize, &mut req, data, &mut resp)
        } else {
            blk.read_blocks_nb(sector as usize, &mut req, data, &mut resp)
        }
    }
    .map_err(|e| format!("submit at sector {sector}: {e}"))?;
    let deadline = Deadline::after_ms(10_000);
    while blk.peek_used() != Some(token) {
        if deadline.expired() {
            Box::leak(req);
            Box::leak(resp);
            Box::leak(buf);
            return Err(format!("request at sector {sector} did not complete"));
        }
        core::hint::spin_loop();
    }
    // SAFETY: the same buffers as submitted with `token`.
    let done = unsafe {
        if write {
            blk.complete_write_blocks(token, &req, data, &mut resp)
        } else {
            blk.complete_read_blocks(token, &req, data, &mut resp)
        }
    };
    done.map_err(|e| {
        format!(
            "{} at sector {sector}: {e}",
            if write { "write" } else { "read" }
        )
    })?;
    Ok(buf)
}
