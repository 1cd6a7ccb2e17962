//! The `edu` endpoint model: registers, and DMA through the virtio-iommu's translation.

use virtio_iommu_device::config::DeviceConfig;
use virtio_iommu_device::endpoints::edu::{Edu, DMA_SIZE, DMA_START, IDENT};
use virtio_iommu_device::function::PciFunction;
use virtio_iommu_device::inprocess::TestBed;
use virtio_iommu_driver::wire::MapFlags;

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);

fn bed() -> TestBed {
    TestBed::new(
        DeviceConfig::builder()
            .endpoints([8])
            .input_range(0, u64::MAX)
            .build()
            .unwrap(),
    )
}

fn edu(bed: &TestBed) -> Edu {
    let mut e = Edu::new(bed.shared_device().clone(), 8);
    e.set_guest_memory(bed.memory().clone());
    e
}

fn r32(e: &mut Edu, off: u64) -> u32 {
    let mut b = [0u8; 4];
    e.bar_read(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn w64(e: &mut Edu, off: u64, v: u64) {
    e.bar_write(0, off, &v.to_le_bytes());
}

fn w32(e: &mut Edu, off: u64, v: u32) {
    e.bar_write(0, off, &v.to_le_bytes());
}

#[test]
fn registers_and_ids() {
    let bed = bed();
    let mut e = edu(&bed);
    let mut id = [0u8; 4];
    e.config_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x11e8_1234);
    assert_eq!(r32(&mut e, 0), IDENT);
    w32(&mut e, 4, 0x1234_5678);
    assert_eq!(r32(&mut e, 4), !0x1234_5678);
    w32(&mut e, 8, 5);
    assert_eq!(r32(&mut e, 8), 120);
    // 12! is the largest that fits in 32 bits; from 34! on the product is 0 modulo 2^32 (the
    // model stops there, so u32::MAX costs 34 steps), and 13! wraps as u32 arithmetic does.
    w32(&mut e, 8, 12);
    assert_eq!(r32(&mut e, 8), 479_001_600);
    w32(&mut e, 8, 13);
    assert_eq!(r32(&mut e, 8), (1..=13u32).fold(1, u32::wrapping_mul));
    w32(&mut e, 8, u32::MAX);
    assert_eq!(r32(&mut e, 8), 0);
    w32(&mut e, 8, 0);
    assert_eq!(r32(&mut e, 8), 1);
    w32(&mut e, 0x60, 0x30);
    assert_eq!(r32(&mut e, 0x24), 0x30);
    w32(&mut e, 0x64, 0x10);
    assert_eq!(r32(&mut e, 0x24), 0x20);
}

#[test]
fn register_accesses_of_another_size_are_ignored() {
    // edu.rst: 4-byte accesses below 0x80, 4- or 8-byte ones from 0x80 on.
    let bed = bed();
    let mut e = edu(&bed);
    w32(&mut e, 4, 1);
    e.bar_write(0, 4, &0xffffu16.to_le_bytes());
    assert_eq!(r32(&mut e, 4), !1, "2-byte write to the liveness register");
    w64(&mut e, 4, 0x55);
    assert_eq!(r32(&mut e, 4), !1, "8-byte write below 0x80");
    w32(&mut e, 8, 5);
    w64(&mut e, 8, 3);
    assert_eq!(
        r32(&mut e, 8),
        120,
        "8-byte write to the factorial register"
    );
    // From 0x80 on, 8 bytes are fine.
    w64(&mut e, 0x80, 0x1234_5678_9abc);
    let mut b = [0u8; 8];
    e.bar_read(0, 0x80, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678_9abc);
}

#[test]
fn dma_through_a_mapping_and_faults() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let page = bed.alloc(0x1000).unwrap();
    let ro = bed.alloc(0x1000).unwrap();
    drv.attach(1, 8).unwrap();
    drv.map(1, 0x10_0000, 0x10_0fff, page, RW).unwrap();
    drv.map(1, 0x20_0000, 0x20_0fff, ro, MapFlags::READ)
        .unwrap();
    let mut e = edu(&bed);
    bed.write_phys(page + 0x10, b"hello edu").unwrap();
    // RAM to buffer.
    w64(&mut e, 0x80, 0x10_0010);
    w64(&mut e, 0x88, DMA_START);
    w64(&mut e, 0x90, 9);
    w64(&mut e, 0x98, 1);
    assert_eq!(r32(&mut e, 0x98) & 1, 0);
    // Buffer to RAM at another offset.
    w64(&mut e, 0x80, DMA_START);
    w64(&mut e, 0x88, 0x10_0800);
    w64(&mut e, 0x98, 3);
    let mut got = [0u8; 9];
    bed.read_phys(page + 0x800, &mut got).unwrap();
    assert_eq!(&got, b"hello edu");
    // Write to a read-only mapping: fault, no data.
    w64(&mut e, 0x88, 0x20_0000);
    w64(&mut e, 0x98, 3);
    bed.read_phys(ro, &mut got).unwrap();
    assert_eq!(got, [0; 9]);
    let ev = drv.poll_event().unwrap().unwrap();
    assert_eq!(ev.endpoint, 8);
    assert_eq!(ev.address, Some(0x20_0000));
    // Unmapped IOVA.
    w64(&mut e, 0x88, 0x30_0000);
    w64(&mut e, 0x98, 3);
    let ev = drv.poll_event().unwrap().unwrap();
    assert_eq!(ev.address, Some(0x30_0000));
    // Out-of-buffer DMA (one byte past the 4 KiB buffer, which starts with "hello edu") is
    // refused, not an abort: page+0 (still zero) would receive "hello edu" if it ran.
    w64(&mut e, 0x80, DMA_START);
    w64(&mut e, 0x88, 0x10_0000);
    w64(&mut e, 0x90, DMA_SIZE + 1);
    w64(&mut e, 0x98, 3);
    bed.read_phys(page, &mut got).unwrap();
    assert_eq!(got, [0; 9]);
    // The same DMA within the buffer does land there: the refusal above was the range check.
    w64(&mut e, 0x90, 9);
    w64(&mut e, 0x98, 3);
    bed.read_phys(page, &mut got).unwrap();
    assert_eq!(&got, b"hello edu");
}
