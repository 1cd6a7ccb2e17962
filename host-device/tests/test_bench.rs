//! The in-process test bench (`inprocess`, feature `test-utils`) as documented: `GuestRam`'s
//! page allocator (page-aligned zeroed pages, first fit, freed runs merged, bad frees ignored),
//! `TestHal` (DMA pages from the thread's current RAM, `share` without copying for buffers in
//! RAM and through bounce pages otherwise), `InProcessTransport` as a virtio-drivers
//! `Transport` on the register window, and `TestBed`'s accessors.

use std::ptr::NonNull;
use std::sync::Arc;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE};
use virtio_iommu_device::inprocess::{
    set_current_ram, GuestRam, TestBed, TestBedError, TestHal, DEFAULT_RAM_BASE, DEFAULT_RAM_SIZE,
};
use virtio_iommu_device::mmio::{reg, MAGIC_VALUE};
use virtio_iommu_device::{DeviceConfig, DmaError};
use virtio_iommu_driver::wire::Features;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const PAGE: u64 = PAGE_SIZE as u64;
const BASE: u64 = 0x8000_0000;

fn ram(pages: usize) -> GuestRam {
    GuestRam::new(BASE, pages * PAGE_SIZE).unwrap()
}

fn config() -> DeviceConfig {
    DeviceConfig::builder().endpoints([1, 2]).build().unwrap()
}

#[test]
fn guest_ram_needs_a_page_aligned_non_empty_range_not_at_0() {
    for (base, size) in [
        (0u64, 4096usize),
        (0x1000 + 1, 4096),
        (0x1000, 4095),
        (0x1000, 4097),
        (0x1000, 0),
        (u64::MAX - 0xfff, 0x2000),
    ] {
        assert!(
            matches!(GuestRam::new(base, size), Err(TestBedError::BadRam)),
            "{base:#x} + {size:#x}"
        );
    }
    let r = ram(4);
    assert_eq!(r.range(), (BASE, 4 * PAGE));
    let m = r.memory();
    assert_eq!(m.num_regions(), 1);
    assert!(m.address_in_range(GuestAddress(BASE)));
    assert!(m.address_in_range(GuestAddress(BASE + 4 * PAGE - 1)));
    assert!(!m.address_in_range(GuestAddress(BASE + 4 * PAGE)));
    assert!(!m.address_in_range(GuestAddress(BASE - 1)));
    assert!(format!("{r:?}").contains(&format!("{BASE}")));
    assert!(!TestBedError::BadRam.to_string().is_empty());
    assert!(TestBedError::Mmap("boom".into())
        .to_string()
        .contains("boom"));
}

#[test]
fn alloc_pages_hands_out_distinct_aligned_zeroed_pages_first_fit() {
    let r = ram(8);
    assert_eq!(r.alloc_pages(0), None, "no page asked");
    let a = r.alloc_pages(1).unwrap();
    let b = r.alloc_pages(2).unwrap();
    let c = r.alloc_pages(1).unwrap();
    assert_eq!(
        (a, b, c),
        (BASE, BASE + PAGE, BASE + 3 * PAGE),
        "first fit, in order"
    );
    // Dirty them, free them, allocate again: zeroed.
    for p in [a, b, b + PAGE, c] {
        r.memory()
            .write_slice(&[0x5a; PAGE_SIZE], GuestAddress(p))
            .unwrap();
    }
    r.free_pages(b, 2);
    let again = r.alloc_pages(2).unwrap();
    assert_eq!(again, b, "the freed run is reused");
    let mut buf = vec![0xffu8; 2 * PAGE_SIZE];
    r.memory()
        .read_slice(&mut buf, GuestAddress(again))
        .unwrap();
    assert!(buf.iter().all(|&x| x == 0), "zeroed");
    // The rest: 4 pages left; 5 do not fit, 4 do, then nothing.
    assert_eq!(r.alloc_pages(5), None);
    assert_eq!(r.alloc_pages(4), Some(BASE + 4 * PAGE));
    assert_eq!(r.alloc_pages(1), None, "full");
    let mut page = vec![0xffu8; 4 * PAGE_SIZE];
    r.memory()
        .read_slice(&mut page, GuestAddress(BASE + 4 * PAGE))
        .unwrap();
    assert!(page.iter().all(|&x| x == 0));
}

#[test]
fn free_pages_merges_neighbouring_runs() {
    let r = ram(4);
    let p: Vec<u64> = (0..4).map(|_| r.alloc_pages(1).unwrap()).collect();
    assert_eq!(p, [BASE, BASE + PAGE, BASE + 2 * PAGE, BASE + 3 * PAGE]);
    // Free pages 1 and 2 (in that order, then 2 then 1 below): one run of 2.
    r.free_pages(p[1], 1);
    r.free_pages(p[2], 1);
    assert_eq!(r.alloc_pages(2), Some(p[1]), "merged with the next run");
    r.free_pages(p[2], 1);
    r.free_pages(p[1], 1);
    assert_eq!(r.alloc_pages(2), Some(p[1]), "merged with the previous run");
    // Free everything in a scattered order: one run of 4 again.
    r.free_pages(p[0], 1);
    r.free_pages(p[3], 1);
    r.free_pages(p[1], 2);
    assert_eq!(r.alloc_pages(4), Some(BASE));
    // A run freed in one call.
    r.free_pages(BASE, 4);
    assert_eq!(r.alloc_pages(3), Some(BASE));
    assert_eq!(r.alloc_pages(1), Some(BASE + 3 * PAGE));
}

#[test]
fn free_pages_ignores_addresses_it_did_not_hand_out() {
    let r = ram(4);
    let all = r.alloc_pages(4).unwrap();
    assert_eq!(all, BASE);
    for (paddr, pages) in [
        (BASE - PAGE, 1u64), // below the RAM
        (0, 1),
        (BASE + 1, 1), // not page aligned
        (BASE, 0),     // no page
        (BASE, 5),     // beyond the end
        (BASE + 3 * PAGE, 2),
        (BASE + 4 * PAGE, 1),
        (BASE + 2 * PAGE, u64::MAX / PAGE),
    ] {
        r.free_pages(paddr, pages);
        assert_eq!(r.alloc_pages(1), None, "free({paddr:#x}, {pages}) ignored");
    }
    // Up to the very end is fine.
    r.free_pages(BASE + 3 * PAGE, 1);
    assert_eq!(r.alloc_pages(1), Some(BASE + 3 * PAGE));
    r.free_pages(BASE + 2 * PAGE, 2);
    assert_eq!(r.alloc_pages(2), Some(BASE + 2 * PAGE));
}

#[test]
fn test_hal_allocates_from_the_current_ram() {
    let r = Arc::new(ram(16));
    set_current_ram(&r);
    let (paddr, vaddr) = TestHal::dma_alloc(2, BufferDirection::Both);
    assert_eq!(paddr, BASE);
    // SAFETY: `vaddr` points to the 2 pages just allocated for this test only.
    unsafe { vaddr.as_ptr().write_bytes(0x77, 2 * PAGE_SIZE) };
    let mut check = [0u8; 2];
    r.memory()
        .read_slice(&mut check, GuestAddress(paddr + 2 * PAGE - 2))
        .unwrap();
    assert_eq!(check, [0x77, 0x77], "the host pointer is the same memory");
    let (next, _) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert_eq!(next, BASE + 2 * PAGE);
    // SAFETY: `paddr`/`vaddr` come from `dma_alloc(2)` above and are not used afterwards.
    assert_eq!(unsafe { TestHal::dma_dealloc(paddr, vaddr, 2) }, 0);
    let (again, v2) = TestHal::dma_alloc(2, BufferDirection::Both);
    assert_eq!((again, v2), (paddr, vaddr), "freed pages reused");
    let mut zero = vec![0xffu8; 2 * PAGE_SIZE];
    r.memory()
        .read_slice(&mut zero, GuestAddress(again))
        .unwrap();
    assert!(zero.iter().all(|&x| x == 0));
    // SAFETY: the pointer is into this RAM; `mmio_phys_to_virt` only computes it.
    let p = unsafe { TestHal::mmio_phys_to_virt(BASE + PAGE, 16) };
    assert_eq!(p.as_ptr() as usize, vaddr.as_ptr() as usize + PAGE_SIZE);
}

#[test]
fn test_hal_share_uses_ram_buffers_in_place_and_bounces_others() {
    let r = Arc::new(ram(16));
    set_current_ram(&r);
    // A buffer inside the RAM: its own guest-physical address, no copy.
    let (paddr, vaddr) = TestHal::dma_alloc(1, BufferDirection::Both);
    let inside = NonNull::slice_from_raw_parts(
        // SAFETY: 100 bytes into a page we own.
        unsafe { NonNull::new_unchecked(vaddr.as_ptr().add(100)) },
        32,
    );
    // SAFETY: `inside` is valid for the duration of the share.
    let shared = unsafe { TestHal::share(inside, BufferDirection::DeviceToDriver) };
    assert_eq!(shared, paddr + 100);
    // SAFETY: matches the `share` above.
    unsafe { TestHal::unshare(shared, inside, BufferDirection::DeviceToDriver) };

    // A host buffer: copied into a bounce page...
    let mut host = vec![0x11u8; 40];
    let buf = NonNull::from(host.as_mut_slice());
    // SAFETY: `host` outlives the share and is not touched meanwhile.
    let bounce = unsafe { TestHal::share(buf, BufferDirection::Both) };
    assert_eq!(bounce % PAGE, 0);
    assert!((BASE..BASE + 16 * PAGE).contains(&bounce));
    assert_ne!(bounce, paddr);
    let mut seen = [0u8; 40];
    r.memory()
        .read_slice(&mut seen, GuestAddress(bounce))
        .unwrap();
    assert_eq!(seen, [0x11; 40], "copied in");
    // ... and copied back on unshare for a device-writable direction.
    r.memory()
        .write_slice(&[0x22; 40], GuestAddress(bounce))
        .unwrap();
    // SAFETY: matches the `share` above.
    unsafe { TestHal::unshare(bounce, buf, BufferDirection::Both) };
    assert_eq!(host, [0x22; 40]);
    // The bounce page was freed: the next page allocation gets it back.
    let (reused, _) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert_eq!(reused, bounce);

    // Driver-to-device: not copied back.
    let mut out = vec![0x33u8; 8];
    let buf = NonNull::from(out.as_mut_slice());
    // SAFETY: as above.
    let b = unsafe { TestHal::share(buf, BufferDirection::DriverToDevice) };
    r.memory().write_slice(&[0x44; 8], GuestAddress(b)).unwrap();
    // SAFETY: matches the `share` above.
    unsafe { TestHal::unshare(b, buf, BufferDirection::DriverToDevice) };
    assert_eq!(out, [0x33; 8]);
}

#[test]
fn the_transport_is_a_virtio_mmio_device_of_type_iommu() {
    let bed = TestBed::new(config());
    let mut t = bed.transport();
    assert_eq!(t.device_type(), DeviceType::IOMMU);
    assert!(!t.requires_legacy_layout());
    let offered = bed.device().device_features();
    assert_eq!(t.read_device_features(), offered);
    assert_eq!(t.max_queue_size(0), 256);
    assert_eq!(t.max_queue_size(1), 256);
    assert_eq!(t.max_queue_size(2), 0);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    assert_eq!(
        t.get_status(),
        DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER
    );
    let want = (Features::VERSION_1 | Features::MAP_UNMAP | Features::BYPASS_CONFIG).bits();
    t.write_driver_features(want);
    assert_eq!(bed.device().driver_features(), want);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    assert!(t.get_status().contains(DeviceStatus::FEATURES_OK));
    // Queue 1 at addresses above 4 GiB would be outside RAM: use RAM pages.
    let q = bed.alloc(3 * PAGE_SIZE).unwrap();
    assert!(!t.queue_used(1));
    t.queue_set(1, 16, q, q + PAGE, q + 2 * PAGE);
    assert!(t.queue_used(1));
    assert!(!t.queue_used(0));
    {
        let dev = bed.device();
        let queue = dev.queue(1).unwrap();
        use virtio_queue::QueueT;
        assert_eq!(
            (
                queue.size(),
                queue.desc_table(),
                queue.avail_ring(),
                queue.used_ring()
            ),
            (16, q, q + PAGE, q + 2 * PAGE)
        );
    }
    t.queue_unset(1);
    assert!(!t.queue_used(1));
    // Interrupts: read and acknowledged in one go.
    assert_eq!(t.ack_interrupt().bits(), 0);
    bed.device().set_needs_reset();
    assert_eq!(
        t.ack_interrupt().bits(),
        InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT.bits()
    );
    assert_eq!(bed.device().interrupt_status(), 0);
    assert_eq!(t.ack_interrupt().bits(), 0);
    // Notify reaches the device (nothing posted: no interrupt).
    t.notify(0);
    assert_eq!(bed.device().counters().interrupts, 0);
}

#[test]
fn the_transport_config_space_accessors_check_bounds_and_alignment() {
    let cfg = DeviceConfig::builder()
        .endpoint(1)
        .probe_size(0x1234)
        .build()
        .unwrap();
    let bed = TestBed::new(cfg);
    let mut t = bed.transport();
    assert_eq!(t.read_config_space::<u32>(32).unwrap(), 0x1234);
    assert_eq!(t.read_config_space::<u32>(36).unwrap(), 0, "last word");
    assert_eq!(t.read_config_space::<u8>(39).unwrap(), 0, "last byte");
    assert_eq!(t.read_config_space::<u16>(32).unwrap(), 0x1234);
    assert_eq!(t.read_config_space::<u32>(0).unwrap(), 0xffff_f000);
    assert_eq!(
        t.read_config_space::<u8>(40),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    );
    assert_eq!(
        t.read_config_space::<u32>(40),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    );
    assert_eq!(
        t.read_config_space::<u32>(usize::MAX - 3),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    );
    assert_eq!(
        t.read_config_space::<u32>(2),
        Err(virtio_drivers::Error::InvalidParam)
    );
    assert_eq!(
        t.read_config_space::<u64>(0),
        Err(virtio_drivers::Error::InvalidParam),
        "alignment above 4"
    );
    // Writes: the bypass byte after negotiating BYPASS_CONFIG.
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features((Features::VERSION_1 | Features::BYPASS_CONFIG).bits());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    assert_eq!(t.write_config_space::<u8>(36, 1), Ok(()));
    assert!(bed.device().state().bypass());
    assert_eq!(t.read_config_space::<u8>(36).unwrap(), 1);
    assert_eq!(t.read_config_generation(), 1);
    assert_eq!(
        t.write_config_space::<u8>(40, 1),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    );
    assert_eq!(
        t.write_config_space::<u32>(38, 0),
        Err(virtio_drivers::Error::InvalidParam)
    );
    assert_eq!(
        t.write_config_space::<u32>(usize::MAX - 3, 0),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    );
    assert!(
        !bed.device().needs_reset(),
        "refused writes never reached the device"
    );
    // The last word is writable (and invalid: wider than the bypass byte).
    assert_eq!(t.write_config_space::<u32>(36, 0), Ok(()));
    assert!(bed.device().needs_reset());
}

#[test]
fn test_bed_accessors() {
    let bed = TestBed::new(config());
    assert_eq!(
        bed.ram().range(),
        (DEFAULT_RAM_BASE, DEFAULT_RAM_SIZE as u64)
    );
    assert_eq!(DEFAULT_RAM_SIZE, 16 << 20);
    assert!(bed
        .memory()
        .address_in_range(GuestAddress(DEFAULT_RAM_BASE + (16 << 20) - 1)));
    // device(), shared_device() and mmio() are the same device.
    bed.device().set_needs_reset();
    assert!(bed.shared_device().lock().unwrap().needs_reset());
    let mut m = [0u8; 4];
    bed.mmio().read(reg::MAGIC_VALUE, &mut m);
    assert_eq!(u32::from_le_bytes(m), MAGIC_VALUE);
    bed.mmio().read(reg::STATUS, &mut m);
    assert_eq!(m[0], 64, "DEVICE_NEEDS_RESET seen through the registers");
    // alloc rounds up to pages, at least one.
    let a = bed.alloc(1).unwrap();
    let b = bed.alloc(PAGE_SIZE + 1).unwrap();
    let c = bed.alloc(0).unwrap();
    assert_eq!(a % PAGE, 0);
    assert_eq!(b, a + PAGE);
    assert_eq!(c, b + 2 * PAGE);
    assert_eq!(bed.alloc(DEFAULT_RAM_SIZE), None, "more than is left");
    // Physical accesses.
    bed.write_phys(a, b"hello").unwrap();
    let mut back = [0u8; 5];
    bed.read_phys(a, &mut back).unwrap();
    assert_eq!(&back, b"hello");
    assert!(bed.read_phys(0, &mut back).is_err());
    assert!(bed.write_phys(DEFAULT_RAM_BASE - 2, b"xyz").is_err());
    assert!(bed
        .read_phys(DEFAULT_RAM_BASE + DEFAULT_RAM_SIZE as u64 - 2, &mut back)
        .is_err());
    // DMA endpoints: only configured IDs.
    assert_eq!(bed.dma_endpoint(2).unwrap().endpoint(), 2);
    assert_eq!(bed.dma_endpoint(1).unwrap().endpoint(), 1);
    assert!(matches!(
        bed.dma_endpoint(3),
        Err(DmaError::UnknownEndpoint(3))
    ));
}

#[test]
fn test_bed_with_its_own_ram_and_make_current() {
    let cfg = config();
    let bed = TestBed::with_ram(cfg.clone(), 0x1000_0000, 1 << 20).unwrap();
    assert_eq!(bed.ram().range(), (0x1000_0000, 1 << 20));
    assert!(matches!(
        TestBed::with_ram(cfg.clone(), 0, 1 << 20),
        Err(TestBedError::BadRam)
    ));
    assert!(TestBed::try_new(cfg.clone()).is_ok());
    // The last bench made is current; make_current switches back.
    let other = TestBed::with_ram(cfg, 0x2000_0000, 1 << 20).unwrap();
    let (p, _) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert!((0x2000_0000..0x2010_0000).contains(&p), "{p:#x}");
    bed.make_current();
    let (p, _) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert!((0x1000_0000..0x1010_0000).contains(&p), "{p:#x}");
    other.make_current();
    let (p, _) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert!((0x2000_0000..0x2010_0000).contains(&p), "{p:#x}");
    // A driver made from a bench allocates from that bench.
    let drv = bed.driver().unwrap();
    drop(drv);
    let (p, _) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert!((0x1000_0000..0x1010_0000).contains(&p), "{p:#x}");
}

#[test]
fn the_driver_initialises_on_the_bench() {
    let bed = TestBed::new(config());
    let mut drv = bed.driver().unwrap();
    assert!(bed.device().status() & 4 != 0, "DRIVER_OK");
    drv.attach(1, 1).unwrap();
    assert_eq!(bed.device().state().endpoint_domain(1), Some(1));
    let opts = virtio_iommu_driver::IommuOptions::default();
    let bed2 = TestBed::new(config());
    let drv2 = bed2.driver_with(opts).unwrap();
    assert!(bed2.device().status() & 4 != 0);
    drop(drv2);
}

#[test]
fn test_hal_pages_stay_mapped_after_their_bench_is_dropped() {
    // Module docs: a RAM stays mapped while the driver may still hold pointers into it, even
    // once its bench is gone and other benches were made on the thread.
    let bed = TestBed::with_ram(config(), 0x3000_0000, 1 << 20).unwrap();
    let (paddr, vaddr) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert!((0x3000_0000..0x3010_0000).contains(&paddr));
    drop(bed);
    let other = TestBed::with_ram(config(), 0x5000_0000, 1 << 20).unwrap();
    let (p2, _) = TestHal::dma_alloc(1, BufferDirection::Both);
    assert!(
        (0x5000_0000..0x5010_0000).contains(&p2),
        "the new bench is current"
    );
    // SAFETY: `vaddr` is the page allocated above, still outstanding, so still mapped.
    unsafe { vaddr.as_ptr().write_bytes(0x5c, PAGE_SIZE) };
    // SAFETY: as above.
    assert_eq!(unsafe { vaddr.as_ptr().add(PAGE_SIZE - 1).read() }, 0x5c);
    // SAFETY: returns the page; nothing uses `vaddr` afterwards.
    assert_eq!(unsafe { TestHal::dma_dealloc(paddr, vaddr, 1) }, 0);
    drop(other);
}

#[test]
fn the_driver_runs_on_ram_above_4_gib() {
    // Queue addresses then need both 32-bit halves of every queue register.
    let base = 0x1_2000_0000;
    let bed = TestBed::with_ram(config(), base, 2 << 20).unwrap();
    let mut drv = bed.driver().unwrap();
    {
        let dev = bed.device();
        use virtio_queue::QueueT;
        for q in 0..2 {
            let queue = dev.queue(q).unwrap();
            assert!(queue.ready(), "queue {q}");
            assert!(queue.desc_table() >= base && queue.used_ring() >= base);
        }
    }
    drv.attach(3, 2).unwrap();
    assert_eq!(bed.device().state().endpoint_domain(2), Some(3));
    assert!(!bed.device().needs_reset());
}
