//! The virtio-mmio version 2 register model (virtio v1.3 §4.2.2), register by register: the
//! 64-bit queue addresses written as two 32-bit halves in any order, the queue selector, the
//! feature selectors, the latching of queue registers at `QueueReady = 1` (ignored while the
//! queue is ready), the reset values after a device reset, and the access-size rules of the
//! register block and of the configuration space (module documentation of `mmio`).

use virtio_iommu_device::device::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, FEATURES_OK};
use virtio_iommu_device::device::{INT_CONFIG, INT_VRING};
use virtio_iommu_device::mmio::{reg, MAGIC_VALUE, VENDOR_ID, VERSION};
use virtio_iommu_device::{DeviceConfig, IommuDevice, MmioDevice, SharedDevice};
use virtio_iommu_driver::wire::{Features, VIRTIO_ID_IOMMU};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

/// RAM at 0 (1 MiB) and at 4 GiB + 1 MiB (64 KiB), so queue addresses may need both halves.
const HIGH: u64 = 0x1_0010_0000;

struct Regs {
    mmio: MmioDevice<Mem>,
    dev: SharedDevice<Mem>,
}

impl Regs {
    fn new() -> Self {
        Self::with(DeviceConfig::builder().endpoint(8).build().unwrap())
    }

    fn with(config: DeviceConfig) -> Self {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(HIGH), 0x1_0000)])
            .unwrap();
        let dev = IommuDevice::new_shared(config, mem).unwrap();
        Self {
            mmio: MmioDevice::new(dev.clone()),
            dev,
        }
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.mmio.write(off, &v.to_le_bytes());
    }

    fn status(&mut self) -> u8 {
        self.r32(reg::STATUS) as u8
    }

    fn queue(&self, q: u16) -> (bool, u16, u64, u64, u64) {
        let d = self.dev.lock().unwrap();
        let q = d.queue(q).unwrap();
        (
            q.ready(),
            q.size(),
            q.desc_table(),
            q.avail_ring(),
            q.used_ring(),
        )
    }
}

#[test]
fn identification_registers_read_their_values() {
    let mut r = Regs::new();
    assert_eq!(r.r32(reg::MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(MAGIC_VALUE, 0x7472_6976);
    assert_eq!(r.r32(reg::VERSION), VERSION);
    assert_eq!(VERSION, 2);
    assert_eq!(r.r32(reg::DEVICE_ID), VIRTIO_ID_IOMMU);
    assert_eq!(r.r32(reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(VENDOR_ID, 0x554d_4551);
    for shm in [
        reg::SHM_LEN_LOW,
        reg::SHM_LEN_HIGH,
        reg::SHM_BASE_LOW,
        reg::SHM_BASE_HIGH,
    ] {
        assert_eq!(r.r32(shm), u32::MAX, "no shared memory region at {shm:#x}");
    }
    assert_eq!(r.r32(reg::QUEUE_RESET), 0);
    // Write-only and unknown registers read 0.
    for off in [
        reg::DEVICE_FEATURES_SEL,
        reg::DRIVER_FEATURES,
        reg::QUEUE_NUM,
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_ACK,
        reg::QUEUE_DESC_LOW,
        0x0f8,
    ] {
        assert_eq!(r.r32(off), 0, "{off:#x}");
    }
}

#[test]
fn device_features_are_read_through_the_selector() {
    let mut r = Regs::new();
    let offered = r.dev.lock().unwrap().device_features();
    assert_eq!(
        r.r32(reg::DEVICE_FEATURES),
        offered as u32,
        "selector 0 at reset"
    );
    r.w32(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.r32(reg::DEVICE_FEATURES), (offered >> 32) as u32);
    assert_eq!(r.r32(reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    r.w32(reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r.r32(reg::DEVICE_FEATURES), offered as u32);
    assert_ne!(offered as u32, 0);
    for sel in [2, 3, u32::MAX] {
        r.w32(reg::DEVICE_FEATURES_SEL, sel);
        assert_eq!(r.r32(reg::DEVICE_FEATURES), 0, "selector {sel}");
    }
}

#[test]
fn driver_features_are_written_through_the_selector() {
    let mut r = Regs::new();
    r.w32(reg::STATUS, u32::from(ACKNOWLEDGE | DRIVER));
    r.w32(reg::DRIVER_FEATURES, Features::MAP_UNMAP.bits() as u32);
    r.w32(reg::DRIVER_FEATURES_SEL, 1);
    r.w32(reg::DRIVER_FEATURES, 1);
    let want = (Features::VERSION_1 | Features::MAP_UNMAP).bits();
    assert_eq!(r.dev.lock().unwrap().driver_features(), want);
    // A selector other than 0 and 1 writes nothing.
    r.w32(reg::DRIVER_FEATURES_SEL, 2);
    r.w32(reg::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(r.dev.lock().unwrap().driver_features(), want);
    r.w32(reg::STATUS, u32::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
    assert_eq!(r.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(
        r.dev.lock().unwrap().negotiated_features().bits(),
        want,
        "negotiated"
    );
}

#[test]
fn queue_selector_selects_one_of_two_queues() {
    let mut r = Regs::new();
    for q in [0, 1] {
        r.w32(reg::QUEUE_SEL, q);
        assert_eq!(r.r32(reg::QUEUE_NUM_MAX), 256, "queue {q}");
    }
    for q in [2, 3, 0x1_0000, u32::MAX] {
        r.w32(reg::QUEUE_SEL, q);
        assert_eq!(r.r32(reg::QUEUE_NUM_MAX), 0, "no queue {q}");
        assert_eq!(r.r32(reg::QUEUE_READY), 0);
        // Queue registers of a missing queue are ignored, READY = 1 too.
        r.w32(reg::QUEUE_NUM, 16);
        r.w32(reg::QUEUE_READY, 1);
        assert_eq!(r.r32(reg::QUEUE_READY), 0);
        assert_eq!(r.status() & DEVICE_NEEDS_RESET, 0);
    }
    // Queue 1 configured: only queue 1 reads ready.
    r.w32(reg::QUEUE_SEL, 1);
    r.w32(reg::QUEUE_NUM, 16);
    r.w32(reg::QUEUE_DESC_LOW, 0x1000);
    r.w32(reg::QUEUE_DRIVER_LOW, 0x2000);
    r.w32(reg::QUEUE_DEVICE_LOW, 0x3000);
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.r32(reg::QUEUE_READY), 1);
    r.w32(reg::QUEUE_SEL, 0);
    assert_eq!(r.r32(reg::QUEUE_READY), 0);
    assert_eq!(r.queue(1), (true, 16, 0x1000, 0x2000, 0x3000));
    assert!(!r.queue(0).0);
    // A smaller QueueNumMax is reported as configured.
    let mut r = Regs::with(
        DeviceConfig::builder()
            .endpoint(8)
            .queue_size(64)
            .build()
            .unwrap(),
    );
    r.w32(reg::QUEUE_SEL, 1);
    assert_eq!(r.r32(reg::QUEUE_NUM_MAX), 64);
}

#[test]
fn queue_addresses_take_both_halves_in_any_order() {
    let desc = HIGH + 0x1000;
    let avail = HIGH + 0x2000;
    let used = HIGH + 0x3000;
    // Low halves first, then high halves; each half written twice, the last value counts.
    let mut r = Regs::new();
    r.w32(reg::QUEUE_SEL, 0);
    r.w32(reg::QUEUE_NUM, 32);
    for (lo, hi, a) in [
        (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
        (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
        (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
    ] {
        r.w32(lo, 0xffff_fff0);
        r.w32(lo, a as u32);
        r.w32(hi, 0xffff_ffff);
        r.w32(hi, (a >> 32) as u32);
    }
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(r.queue(0), (true, 32, desc, avail, used));
    // High halves first, then low halves.
    let mut r = Regs::new();
    r.w32(reg::QUEUE_SEL, 1);
    r.w32(reg::QUEUE_NUM, 32);
    for (lo, hi, a) in [
        (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
        (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
        (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
    ] {
        r.w32(hi, (a >> 32) as u32);
        r.w32(lo, 0xffff_fff0);
        r.w32(lo, a as u32);
    }
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(r.queue(1), (true, 32, desc, avail, used));
    // A high half put back to 0 moves the ring back below 4 GiB.
    let mut r = Regs::new();
    r.w32(reg::QUEUE_NUM, 32);
    for (lo, hi, a) in [
        (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, 0x1000u64),
        (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, 0x2000),
        (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, 0x3000),
    ] {
        r.w32(hi, 1);
        r.w32(lo, a as u32);
        r.w32(hi, 0);
    }
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.queue(0), (true, 32, 0x1000, 0x2000, 0x3000));
}

#[test]
fn each_queue_address_register_matters() {
    // Leaving out one of the six address writes puts that ring elsewhere (here: outside RAM or
    // misaligned), which the device refuses with DEVICE_NEEDS_RESET.
    let regs = [
        (reg::QUEUE_DESC_LOW, (HIGH + 0x1000) as u32),
        (reg::QUEUE_DESC_HIGH, ((HIGH + 0x1000) >> 32) as u32),
        (reg::QUEUE_DRIVER_LOW, (HIGH + 0x2002) as u32),
        (reg::QUEUE_DRIVER_HIGH, ((HIGH + 0x2002) >> 32) as u32),
        (reg::QUEUE_DEVICE_LOW, (HIGH + 0x3004) as u32),
        (reg::QUEUE_DEVICE_HIGH, ((HIGH + 0x3004) >> 32) as u32),
    ];
    for skip in 0..regs.len() {
        let mut r = Regs::new();
        r.w32(reg::QUEUE_NUM, 8);
        for (i, &(off, v)) in regs.iter().enumerate() {
            if i != skip {
                r.w32(off, v);
            }
        }
        r.w32(reg::QUEUE_READY, 1);
        assert_eq!(
            r.r32(reg::QUEUE_READY),
            0,
            "without register {:#x}",
            regs[skip].0
        );
        assert_ne!(r.status() & DEVICE_NEEDS_RESET, 0);
    }
    let mut r = Regs::new();
    r.w32(reg::QUEUE_NUM, 8);
    for &(off, v) in &regs {
        r.w32(off, v);
    }
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(
        r.queue(0),
        (true, 8, HIGH + 0x1000, HIGH + 0x2002, HIGH + 0x3004)
    );
}

fn program(r: &mut Regs, q: u32, num: u32) {
    r.w32(reg::QUEUE_SEL, q);
    r.w32(reg::QUEUE_NUM, num);
    r.w32(reg::QUEUE_DESC_LOW, 0x1000);
    r.w32(reg::QUEUE_DRIVER_LOW, 0x2000);
    r.w32(reg::QUEUE_DEVICE_LOW, 0x3000);
}

#[test]
fn queue_registers_are_latched_at_ready_and_ignored_while_ready() {
    let mut r = Regs::new();
    program(&mut r, 0, 64);
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.queue(0), (true, 64, 0x1000, 0x2000, 0x3000));
    // §4.2.2.2: writes while ready are ignored (kept neither by the queue nor for later).
    r.w32(reg::QUEUE_NUM, 3);
    r.w32(reg::QUEUE_DESC_LOW, 0x1008);
    r.w32(reg::QUEUE_DRIVER_LOW, 0x2001);
    r.w32(reg::QUEUE_DEVICE_LOW, 0x3002);
    r.w32(reg::QUEUE_DESC_HIGH, 7);
    assert_eq!(r.queue(0), (true, 64, 0x1000, 0x2000, 0x3000));
    // A second READY = 1 while ready changes nothing.
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.queue(0), (true, 64, 0x1000, 0x2000, 0x3000));
    // READY = 0 stops the queue; READY = 1 again uses the latched registers.
    r.w32(reg::QUEUE_READY, 0);
    assert!(!r.queue(0).0);
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(r.queue(0), (true, 64, 0x1000, 0x2000, 0x3000));
    // While not ready the registers are written.
    r.w32(reg::QUEUE_READY, 0);
    r.w32(reg::QUEUE_NUM, 16);
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.queue(0), (true, 16, 0x1000, 0x2000, 0x3000));
    // Each queue has its own registers.
    r.w32(reg::QUEUE_SEL, 1);
    r.w32(reg::QUEUE_NUM, 32);
    r.w32(reg::QUEUE_DESC_LOW, 0x4000);
    r.w32(reg::QUEUE_DRIVER_LOW, 0x5000);
    r.w32(reg::QUEUE_DEVICE_LOW, 0x6000);
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.queue(1), (true, 32, 0x4000, 0x5000, 0x6000));
    assert_eq!(r.queue(0), (true, 16, 0x1000, 0x2000, 0x3000));
}

#[test]
fn device_reset_returns_selectors_and_queue_registers_to_their_reset_values() {
    let mut r = Regs::new();
    program(&mut r, 1, 64);
    r.w32(reg::QUEUE_READY, 1);
    r.w32(reg::DEVICE_FEATURES_SEL, 1);
    r.w32(reg::STATUS, 0);
    assert!(!r.queue(1).0, "reset: queue not ready");
    // The selectors are back to 0: queue 0, feature word 0.
    let offered = r.dev.lock().unwrap().device_features();
    assert_eq!(r.r32(reg::DEVICE_FEATURES), offered as u32);
    r.w32(reg::QUEUE_NUM, 16); // selects queue 0
    r.w32(reg::QUEUE_SEL, 1);
    // Queue 1's registers were cleared: READY = 1 without programming them is refused.
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.r32(reg::QUEUE_READY), 0);
    assert_ne!(r.status() & DEVICE_NEEDS_RESET, 0);
    // A status write other than 0 keeps the registers.
    let mut r = Regs::new();
    program(&mut r, 0, 64);
    r.w32(reg::STATUS, u32::from(ACKNOWLEDGE));
    r.w32(reg::STATUS, u32::from(ACKNOWLEDGE | DRIVER));
    r.w32(reg::QUEUE_READY, 1);
    assert_eq!(r.queue(0), (true, 64, 0x1000, 0x2000, 0x3000));
}

#[test]
fn status_register_takes_the_low_byte() {
    let mut r = Regs::new();
    r.w32(reg::STATUS, 0x100 | u32::from(ACKNOWLEDGE));
    assert_eq!(r.r32(reg::STATUS), u32::from(ACKNOWLEDGE));
    r.w32(reg::STATUS, 0xff00 | u32::from(DRIVER));
    assert_eq!(r.r32(reg::STATUS), u32::from(ACKNOWLEDGE | DRIVER));
    // 0x100: low byte 0, a reset.
    r.w32(reg::STATUS, 0x100);
    assert_eq!(r.r32(reg::STATUS), 0);
}

#[test]
fn interrupt_status_and_ack_through_registers() {
    let mut r = Regs::new();
    r.dev.lock().unwrap().set_needs_reset();
    assert_eq!(r.r32(reg::INTERRUPT_STATUS), INT_CONFIG);
    r.w32(reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(
        r.r32(reg::INTERRUPT_STATUS),
        INT_CONFIG,
        "acks only the written bits"
    );
    r.w32(reg::INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(r.r32(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn config_generation_register_follows_bypass_changes() {
    let mut r = Regs::new();
    assert_eq!(r.r32(reg::CONFIG_GENERATION), 0);
    r.w32(reg::STATUS, u32::from(ACKNOWLEDGE | DRIVER));
    r.w32(reg::DRIVER_FEATURES_SEL, 0);
    r.w32(reg::DRIVER_FEATURES, Features::BYPASS_CONFIG.bits() as u32);
    r.w32(reg::DRIVER_FEATURES_SEL, 1);
    r.w32(reg::DRIVER_FEATURES, 1);
    r.w32(reg::STATUS, u32::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
    r.mmio.write(reg::CONFIG + 36, &[1]);
    assert_eq!(r.r32(reg::CONFIG_GENERATION), 1);
    r.mmio.write(reg::CONFIG + 36, &[0]);
    assert_eq!(r.r32(reg::CONFIG_GENERATION), 2);
    assert_eq!(
        r.r32(reg::CONFIG_GENERATION),
        r.dev.lock().unwrap().config_generation()
    );
}

#[test]
fn config_space_accesses_of_1_2_4_8_bytes_naturally_aligned() {
    let mut r = Regs::with(
        DeviceConfig::builder()
            .endpoint(8)
            .page_size_mask(0x0807_0605_0403_1000)
            .build()
            .unwrap(),
    );
    let mask = 0x0807_0605_0403_1000u64.to_le_bytes();
    for (off, len) in [
        (0u64, 8usize),
        (0, 4),
        (4, 4),
        (0, 2),
        (2, 2),
        (6, 2),
        (1, 1),
        (7, 1),
    ] {
        let mut b = vec![0xee; len];
        r.mmio.read(reg::CONFIG + off, &mut b);
        assert_eq!(
            b,
            &mask[off as usize..off as usize + len],
            "{len} bytes at {off}"
        );
    }
    // Misaligned or odd sizes read zeroes.
    for (off, len) in [
        (1u64, 2usize),
        (2, 4),
        (4, 8),
        (1, 4),
        (0, 3),
        (0, 16),
        (0, 0),
    ] {
        let mut b = vec![0xee; len];
        r.mmio.read(reg::CONFIG + off, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{len} bytes at {off}");
    }
    // Misaligned or odd-sized writes are ignored (even ones that would be invalid writes).
    for (off, data) in [
        (37u64, &[1u8, 0][..]),
        (38, &[1, 0, 0, 0][..]),
        (36, &[1, 0, 0][..]),
        (36, &[][..]),
        (33, &[1, 0, 0, 0, 0, 0, 0, 0][..]),
    ] {
        r.mmio.write(reg::CONFIG + off, data);
        assert_eq!(r.status() & DEVICE_NEEDS_RESET, 0, "{data:?} at {off}");
    }
    // An aligned invalid write reaches the device.
    r.mmio.write(reg::CONFIG + 36, &[1, 0]);
    assert_ne!(r.status() & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn register_accesses_must_be_4_bytes_and_aligned() {
    let mut r = Regs::new();
    for (off, len) in [(0u64, 1usize), (0, 2), (0, 8), (1, 4), (2, 4), (0x70, 2)] {
        let mut b = vec![0xee; len];
        r.mmio.read(off, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{len} bytes at {off:#x}");
    }
    r.mmio.write(reg::STATUS, &[1, 0]);
    r.mmio.write(reg::STATUS + 1, &[1, 0, 0, 0]);
    r.mmio.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.status(), 0);
    r.mmio.write(reg::STATUS, &[1, 0, 0, 0]);
    assert_eq!(r.status(), ACKNOWLEDGE);
    // The window's last register below the config space.
    assert_eq!(r.r32(reg::CONFIG - 4), 0);
}
