//! The virtio-mmio register model (virtio v1.3 §4.2.2, version 2) on its own.

use virtio_iommu_device::device::{status, INT_CONFIG, INT_VRING};
use virtio_iommu_device::mmio::{reg, MAGIC_VALUE};
use virtio_iommu_device::{DeviceConfig, IommuDevice, MmioDevice};
use virtio_iommu_driver::wire::{self, Features};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

struct Regs(MmioDevice<Mem>);

impl Regs {
    fn new(config: DeviceConfig) -> Self {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Regs(MmioDevice::new(
            IommuDevice::new_shared(config, mem).unwrap(),
        ))
    }

    fn default() -> Self {
        Self::new(DeviceConfig::builder().endpoints([8]).build().unwrap())
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.0.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.0.write(off, &v.to_le_bytes());
    }

    fn negotiate(&mut self, features: u64) -> u32 {
        self.w32(reg::STATUS, 0);
        self.w32(reg::STATUS, u32::from(status::ACKNOWLEDGE | status::DRIVER));
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, features as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(
            reg::STATUS,
            u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        self.r32(reg::STATUS)
    }

    fn setup_queue(&mut self, q: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.w32(reg::QUEUE_SEL, q);
        self.w32(reg::QUEUE_NUM, size);
        self.w32(reg::QUEUE_DESC_LOW, desc as u32);
        self.w32(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w32(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.w32(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w32(reg::QUEUE_DEVICE_LOW, used as u32);
        self.w32(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.w32(reg::QUEUE_READY, 1);
    }

    fn needs_reset(&mut self) -> bool {
        self.r32(reg::STATUS) & u32::from(status::DEVICE_NEEDS_RESET) != 0
    }
}

#[test]
fn identification_registers() {
    let mut r = Regs::default();
    assert_eq!(r.r32(reg::MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(r.r32(reg::MAGIC_VALUE).to_le_bytes(), *b"virt");
    assert_eq!(r.r32(reg::VERSION), 2);
    assert_eq!(r.r32(reg::DEVICE_ID), 23);
    assert_ne!(r.r32(reg::VENDOR_ID), 0);
    assert_eq!(r.r32(reg::SHM_LEN_LOW), u32::MAX, "no shared memory region");
    assert_eq!(r.r32(reg::SHM_LEN_HIGH), u32::MAX);
    assert_eq!(r.r32(reg::QUEUE_RESET), 0);
    assert_eq!(r.r32(reg::CONFIG_GENERATION), 0);
}

#[test]
fn wrong_access_sizes_and_alignments_read_zero_and_write_nothing() {
    let mut r = Regs::default();
    let mut two = [0xffu8; 2];
    r.0.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xffu8; 4];
    r.0.read(reg::MAGIC_VALUE + 1, &mut four);
    assert_eq!(four, [0; 4]);
    let mut eight = [0xffu8; 8];
    r.0.read(reg::MAGIC_VALUE, &mut eight);
    assert_eq!(eight, [0; 8]);
    r.0.write(reg::STATUS, &[1]);
    r.0.write(reg::STATUS + 2, &[1, 0, 0, 0]);
    assert_eq!(r.r32(reg::STATUS), 0);
    // Config space: unaligned or odd-sized accesses read zero.
    let mut three = [0xffu8; 3];
    r.0.read(reg::CONFIG, &mut three);
    assert_eq!(three, [0; 3]);
    let mut c = [0u8; 4];
    r.0.read(reg::CONFIG + 2, &mut c);
    assert_eq!(c, [0; 4]);
    // Beyond the 40-byte config: zero.
    r.0.read(reg::CONFIG + 40, &mut c);
    assert_eq!(c, [0; 4]);
}

#[test]
fn random_accesses_never_panic() {
    let mut r = Regs::default();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let off = next() % 0x300;
        let len = (next() % 10) as usize;
        let mut data = vec![0u8; len];
        for b in data.iter_mut() {
            *b = next() as u8;
        }
        if next() % 2 == 0 {
            r.0.write(off, &data);
        } else {
            r.0.read(off, &mut data);
        }
    }
    r.0.read(u64::MAX - 3, &mut [0; 4]);
    r.0.write(u64::MAX - 3, &[1; 4]);
}

#[test]
fn feature_negotiation() {
    let mut r = Regs::default();
    r.w32(reg::DEVICE_FEATURES_SEL, 0);
    let lo = r.r32(reg::DEVICE_FEATURES);
    r.w32(reg::DEVICE_FEATURES_SEL, 1);
    let hi = r.r32(reg::DEVICE_FEATURES);
    r.w32(reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r.r32(reg::DEVICE_FEATURES), 0);
    let offered = u64::from(lo) | (u64::from(hi) << 32);
    assert_eq!(
        offered & Features::VERSION_1.bits(),
        Features::VERSION_1.bits()
    );
    assert_eq!(offered & Features::BYPASS.bits(), 0, "D2");
    assert_ne!(offered & Features::MAP_UNMAP.bits(), 0, "D1");
    let fok = u32::from(status::FEATURES_OK);
    // Not a subset of the offered features: FEATURES_OK not kept.
    assert_eq!(
        r.negotiate(offered | Features::RING_EVENT_IDX.bits()) & fok,
        0
    );
    // Without VERSION_1: refused (modern only).
    assert_eq!(r.negotiate(offered & !Features::VERSION_1.bits()) & fok, 0);
    // A subset with VERSION_1: accepted.
    let want = (Features::VERSION_1 | Features::MAP_UNMAP).bits();
    assert_ne!(r.negotiate(want) & fok, 0);
    // Features are frozen after FEATURES_OK.
    r.w32(reg::DRIVER_FEATURES_SEL, 0);
    r.w32(reg::DRIVER_FEATURES, 0xffff_ffff);
    let dev = r.0.device().lock().unwrap();
    assert_eq!(dev.negotiated_features().bits(), want);
    assert_eq!(dev.driver_features(), want);
}

#[test]
fn queue_registers_and_invalid_queue_setups() {
    let mut r = Regs::default();
    r.negotiate(Features::VERSION_1.bits());
    r.w32(reg::QUEUE_SEL, 0);
    assert_eq!(r.r32(reg::QUEUE_NUM_MAX), 256);
    r.w32(reg::QUEUE_SEL, 1);
    assert_eq!(r.r32(reg::QUEUE_NUM_MAX), 256);
    r.w32(reg::QUEUE_SEL, 2);
    assert_eq!(r.r32(reg::QUEUE_NUM_MAX), 0, "no queue 2");
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.r32(reg::QUEUE_READY), 0);
    assert!(!r.needs_reset());
    // Valid setup.
    r.setup_queue(0, 64, 0x1000, 0x2000, 0x3000);
    assert_eq!(r.r32(reg::QUEUE_READY), 1);
    // Writes while ready are ignored; READY = 0 resets the queue.
    r.w32(reg::QUEUE_NUM, 3);
    r.w32(reg::QUEUE_READY, 0);
    assert_eq!(r.r32(reg::QUEUE_READY), 0);
    assert!(!r.needs_reset());

    for (size, desc, avail, used) in [
        (3u32, 0x1000u64, 0x2000u64, 0x3000u64), // not a power of two
        (512, 0x1000, 0x2000, 0x3000),           // above QueueNumMax
        (0, 0x1000, 0x2000, 0x3000),             // zero
        (64, 0x1008, 0x2000, 0x3000),            // descriptor table misaligned
        (64, 0x1000, 0x2001, 0x3000),            // avail ring misaligned
        (64, 0x1000, 0x2000, 0x3002),            // used ring misaligned
        (64, 0xffe00, 0x2000, 0x3000),           // descriptor table past the end of memory
        (64, 0x1000, 0x2000, 1 << 40),           // used ring outside memory
    ] {
        let mut r = Regs::default();
        r.negotiate(Features::VERSION_1.bits());
        r.setup_queue(1, size, desc, avail, used);
        assert_eq!(
            r.r32(reg::QUEUE_READY),
            0,
            "{size} {desc:#x} {avail:#x} {used:#x}"
        );
        assert!(r.needs_reset());
        assert_ne!(r.r32(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        // Reset clears NEEDS_RESET and the interrupt status.
        r.w32(reg::STATUS, 0);
        assert_eq!(r.r32(reg::STATUS), 0);
        assert_eq!(r.r32(reg::INTERRUPT_STATUS), 0);
    }
}

#[test]
fn requests_through_registers_raise_and_ack_interrupts() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let dev = IommuDevice::new_shared(
        DeviceConfig::builder().endpoints([8]).build().unwrap(),
        mem.clone(),
    )
    .unwrap();
    let mut r = Regs(MmioDevice::new(dev.clone()));
    let f = (Features::VERSION_1 | Features::MAP_UNMAP).bits();
    assert_ne!(r.negotiate(f) & u32::from(status::FEATURES_OK), 0);
    let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
    r.setup_queue(0, 16, desc, avail, used);
    r.w32(reg::STATUS, 0xf);
    // One ATTACH request: readable at 0x10000, writable at 0x10100.
    let req = wire::ReqAttach {
        head: wire::ReqHead::new(wire::RequestType::Attach),
        domain: 3.into(),
        endpoint: 8.into(),
        ..Default::default()
    };
    use zerocopy::IntoBytes;
    mem.write_slice(req.as_bytes(), GuestAddress(0x10000))
        .unwrap();
    let mut d = Vec::new();
    d.extend_from_slice(&0x10000u64.to_le_bytes());
    d.extend_from_slice(&20u32.to_le_bytes());
    d.extend_from_slice(&1u16.to_le_bytes());
    d.extend_from_slice(&1u16.to_le_bytes());
    d.extend_from_slice(&0x10100u64.to_le_bytes());
    d.extend_from_slice(&4u32.to_le_bytes());
    d.extend_from_slice(&2u16.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    mem.write_slice(&d, GuestAddress(desc)).unwrap();
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    r.w32(reg::QUEUE_NOTIFY, 0);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(),
        4,
        "used length"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x10100)).unwrap(),
        0,
        "S_OK"
    );
    assert_eq!(r.r32(reg::INTERRUPT_STATUS), INT_VRING);
    r.w32(reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(r.r32(reg::INTERRUPT_STATUS), 0);
    assert_eq!(dev.lock().unwrap().state().endpoint_domain(8), Some(3));
    // Reset through the status register detaches everything.
    r.w32(reg::STATUS, 0);
    assert_eq!(dev.lock().unwrap().state().endpoint_domain(8), None);
    r.w32(reg::QUEUE_SEL, 0);
    assert_eq!(r.r32(reg::QUEUE_READY), 0);
}

#[test]
fn config_space_reads_and_writes() {
    let cfg = DeviceConfig::builder()
        .endpoints([8])
        .input_range(0x1000, 0xffff_ffff_ffff)
        .domain_range(7, 9)
        .probe_size(256)
        .build()
        .unwrap();
    let mut r = Regs::new(cfg.clone());
    let mut q = [0u8; 8];
    r.0.read(reg::CONFIG, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0xffff_ffff_ffff_f000);
    r.0.read(reg::CONFIG + 8, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0x1000);
    assert_eq!(r.r32(reg::CONFIG + 16), 0xffff_ffff);
    assert_eq!(r.r32(reg::CONFIG + 20), 0xffff);
    assert_eq!(r.r32(reg::CONFIG + 24), 7);
    assert_eq!(r.r32(reg::CONFIG + 28), 9);
    assert_eq!(r.r32(reg::CONFIG + 32), 256);
    let mut b = [9u8; 1];
    r.0.read(reg::CONFIG + 36, &mut b);
    assert_eq!(b, [0]);
    let mut h = [9u8; 2];
    r.0.read(reg::CONFIG + 36, &mut h);
    assert_eq!(h, [0, 0]);

    // Writing bypass before negotiation: NEEDS_RESET (R2).
    r.0.write(reg::CONFIG + 36, &[1]);
    assert!(r.needs_reset());
    // After negotiating BYPASS_CONFIG: accepted, generation bumped.
    r.negotiate((Features::VERSION_1 | Features::BYPASS_CONFIG).bits());
    r.0.write(reg::CONFIG + 36, &[1]);
    assert!(!r.needs_reset());
    r.0.read(reg::CONFIG + 36, &mut b);
    assert_eq!(b, [1]);
    assert_eq!(r.r32(reg::CONFIG_GENERATION), 1);
    r.0.write(reg::CONFIG + 36, &[1]);
    assert_eq!(
        r.r32(reg::CONFIG_GENERATION),
        1,
        "unchanged value: same generation"
    );
    // Device reset keeps bypass (D4).
    r.negotiate((Features::VERSION_1 | Features::BYPASS_CONFIG).bits());
    r.0.read(reg::CONFIG + 36, &mut b);
    assert_eq!(b, [1]);

    for (off, data) in [
        (36u64, vec![2u8]), // R3: only 0 or 1
        (36, vec![1, 0]),   // wider than the field (touches reserved)
        (36, vec![1, 0, 0, 0]),
        (32, vec![0, 1, 0, 0]), // probe_size
        (0, vec![0; 8]),        // page_size_mask
        (37, vec![0]),          // reserved
    ] {
        let mut r = Regs::new(cfg.clone());
        r.negotiate((Features::VERSION_1 | Features::BYPASS_CONFIG).bits());
        r.0.write(reg::CONFIG + off, &data);
        assert!(r.needs_reset(), "write {data:?} at {off}");
        assert_eq!(r.r32(reg::CONFIG + 32), 256, "nothing changed");
    }
    // Writes beyond the structure are ignored.
    let mut r = Regs::new(cfg);
    r.0.write(reg::CONFIG + 40, &[1, 2, 3, 4]);
    assert!(!r.needs_reset());
}
