//! The modern virtio-pci transport (`transport::pci`, virtio v1.3 §4.1) through its
//! `PciFunction` registers only, as a driver (and QEMU's PCI core) would use it: IDs and the
//! capability chain, BAR sizing and programming, the common configuration, a full bring-up of
//! the virtio-iommu with an ATTACH on requestq, MSI-X delivery, masking and the PBA, INTx and
//! the read-clearing ISR, the PCI_CFG access window, and hostile accesses.

mod common;

use std::sync::{Arc, Mutex};

use common::{attach, bytes, mem, Mem};
use proptest::prelude::*;
use virtio_iommu_device::device::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use virtio_iommu_device::function::{InterruptSink, PciFunction, CONFIG_SPACE_SIZE};
use virtio_iommu_device::transport::pci::{
    cap, common_cfg as cc, reg, region, VirtioPciFunction, MODERN_BAR, MSIX_BAR, NO_VECTOR,
};
use virtio_iommu_device::transport::VirtioCore;
use virtio_iommu_device::{DeviceConfig, IommuDevice, SharedDevice};
use virtio_iommu_driver::wire::Status;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Irq {
    Msix(u16),
    Intx(bool),
}

#[derive(Default)]
struct Rec(Mutex<Vec<Irq>>);

impl InterruptSink for Rec {
    fn msix(&self, vector: u16) {
        self.0.lock().unwrap().push(Irq::Msix(vector));
    }
    fn intx(&self, asserted: bool) {
        self.0.lock().unwrap().push(Irq::Intx(asserted));
    }
}

impl Rec {
    fn take(&self) -> Vec<Irq> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const QSIZE: u16 = 8;
/// Rings of queue q at RING + q * 0x3000: descriptors, then available, then used ring.
const RING: u64 = 0x1000;
const REQ: u64 = 0x10000;
const STATUS_BUF: u64 = 0x11000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Pci {
    f: VirtioPciFunction<SharedDevice<Mem>>,
    dev: SharedDevice<Mem>,
    mem: Mem,
    sink: Arc<Rec>,
    avail_idx: u16,
}

impl Pci {
    fn new() -> Self {
        Self::with(VirtioPciFunction::new)
    }

    fn with(make: impl FnOnce(SharedDevice<Mem>) -> VirtioPciFunction<SharedDevice<Mem>>) -> Self {
        let mem = mem();
        let config = DeviceConfig::builder().endpoint(1).build().unwrap();
        let dev = IommuDevice::new_shared(config, mem.clone()).unwrap();
        let mut f = make(dev.clone());
        let sink = Arc::new(Rec::default());
        f.set_interrupt_sink(Some(sink.clone()));
        sink.take();
        Self {
            f,
            dev,
            mem,
            sink,
            avail_idx: 0,
        }
    }

    fn cfg_r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.f.config_read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn cfg_w(&mut self, off: u64, len: usize, v: u64) {
        self.f.config_write(off, &v.to_le_bytes()[..len]);
    }
    fn bar_r(&mut self, bar: u8, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.f.bar_read(bar, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn bar_w(&mut self, bar: u8, off: u64, len: usize, v: u64) {
        self.f.bar_write(bar, off, &v.to_le_bytes()[..len]);
    }
    /// Common configuration field at `off`, of `len` bytes.
    fn cr(&mut self, off: u64, len: usize) -> u64 {
        self.bar_r(MODERN_BAR, region::COMMON.0 + off, len)
    }
    fn cw(&mut self, off: u64, len: usize, v: u64) {
        self.bar_w(MODERN_BAR, region::COMMON.0 + off, len, v);
    }
    fn status(&mut self) -> u8 {
        self.cr(cc::DEVICE_STATUS, 1) as u8
    }
    fn isr(&mut self) -> u8 {
        self.bar_r(MODERN_BAR, region::ISR.0, 1) as u8
    }

    /// MSI-X Message Control written through config space.
    fn msix_control(&mut self, v: u16) {
        self.cfg_w(cap::MSIX as u64 + 2, 2, u64::from(v));
    }
    /// Vector control (mask bit) of MSI-X table entry `v`.
    fn mask_vector(&mut self, v: u16, masked: bool) {
        self.bar_w(MSIX_BAR, u64::from(v) * 16 + 12, 4, u64::from(masked));
    }
    fn pba(&mut self) -> u64 {
        self.bar_r(MSIX_BAR, 0x800, 8)
    }

    /// Features negotiated and both queues set up in guest memory, through the registers;
    /// queue q gets vector q + 1, configuration changes vector 0.
    fn bring_up(&mut self) {
        self.cfg_w(reg::COMMAND as u64, 2, 0x6);
        self.cw(cc::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
        let mut features = 0u64;
        for sel in 0..2 {
            self.cw(cc::DEVICE_FEATURE_SELECT, 4, sel);
            features |= self.cr(cc::DEVICE_FEATURE, 4) << (32 * sel);
        }
        assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1 offered");
        for sel in 0..2 {
            self.cw(cc::DRIVER_FEATURE_SELECT, 4, sel);
            self.cw(
                cc::DRIVER_FEATURE,
                4,
                (features >> (32 * sel)) & 0xffff_ffff,
            );
        }
        self.cw(
            cc::DEVICE_STATUS,
            1,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
        );
        assert_ne!(self.status() & FEATURES_OK, 0, "FEATURES_OK kept");
        self.cw(cc::CONFIG_MSIX_VECTOR, 2, 0);
        for q in 0..2u16 {
            let base = RING + u64::from(q) * 0x3000;
            self.cw(cc::QUEUE_SELECT, 2, u64::from(q));
            assert_eq!(self.cr(cc::QUEUE_NOTIFY_OFF, 2), u64::from(q));
            self.cw(cc::QUEUE_SIZE, 2, u64::from(QSIZE));
            self.cw(cc::QUEUE_MSIX_VECTOR, 2, u64::from(q + 1));
            self.cw(cc::QUEUE_DESC, 8, base);
            self.cw(cc::QUEUE_DRIVER, 4, base + 0x1000);
            self.cw(cc::QUEUE_DRIVER + 4, 4, 0);
            self.cw(cc::QUEUE_DEVICE, 8, base + 0x2000);
            self.cw(cc::QUEUE_ENABLE, 2, 1);
            assert_eq!(self.cr(cc::QUEUE_ENABLE, 2), 1, "queue {q} enabled");
        }
        self.cw(
            cc::DEVICE_STATUS,
            1,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
        );
        assert_eq!(self.status() & DRIVER_OK, DRIVER_OK);
    }

    fn w16(&self, addr: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }
    fn r16(&self, addr: u64) -> u16 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
    fn r32(&self, addr: u64) -> u32 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Puts an ATTACH(domain 1, endpoint 1) on requestq as a two-descriptor chain (request,
    /// then a 4-byte writable tail at `STATUS_BUF + 16 * slot`), without notifying.
    fn push_attach(&mut self) {
        let req = bytes(&attach(1, 1, 0));
        let slot = u64::from(self.avail_idx % (QSIZE / 2));
        let status = STATUS_BUF + 16 * slot;
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0xaa; 4], GuestAddress(status))
            .unwrap();
        let (d0, d1) = (slot * 2, slot * 2 + 1);
        for (d, addr, len, flags, next) in [
            (d0, REQ, req.len() as u32, F_NEXT, d1 as u16),
            (d1, status, 4, F_WRITE, 0),
        ] {
            let at = RING + d * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.w16(at + 12, flags);
            self.w16(at + 14, next);
        }
        let avail = RING + 0x1000;
        self.w16(avail + 4 + 2 * u64::from(self.avail_idx % QSIZE), d0 as u16);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.w16(avail + 2, self.avail_idx);
    }

    /// Notifies queue `q`: a 16-bit write of its index at notify_off * multiplier.
    fn notify(&mut self, q: u16) {
        self.cw(cc::QUEUE_SELECT, 2, u64::from(q));
        let off = self.cr(cc::QUEUE_NOTIFY_OFF, 2) * 4;
        self.bar_w(MODERN_BAR, region::NOTIFY.0 + off, 2, u64::from(q));
    }

    /// Runs the rounds the function owes; returns how many `poll` calls did work.
    fn drain(&mut self) -> usize {
        let mut rounds = 0;
        while self.f.poll() {
            rounds += 1;
            assert!(rounds < 100, "poll keeps owing work");
        }
        rounds
    }

    fn used_idx(&self) -> u16 {
        self.r16(RING + 0x2002)
    }

    /// [`Self::push_attach`], notify, drain; returns the status byte and the used element
    /// (head, length).
    fn attach(&mut self) -> (u8, u32, u32) {
        self.push_attach();
        self.notify(0);
        self.drain();
        assert_eq!(self.used_idx(), self.avail_idx, "used index advanced");
        let last = self.avail_idx.wrapping_sub(1);
        let elem = RING + 0x2000 + 4 + 8 * u64::from(last % QSIZE);
        let slot = u64::from(last % (QSIZE / 2));
        let status: u8 = self
            .mem
            .read_obj(GuestAddress(STATUS_BUF + 16 * slot))
            .unwrap();
        (status, self.r32(elem), self.r32(elem + 4))
    }
}

#[test]
fn ids_and_header_as_qemu() {
    let mut p = Pci::new();
    assert_eq!(
        p.cfg_r(0, 4),
        0x1057_1af4,
        "vendor 0x1af4, device 0x1040 + 23"
    );
    assert_eq!(
        p.cfg_r(8, 4),
        0x00ff_0001,
        "class 0x00ff00, revision 1 (QEMU 11.1)"
    );
    assert_eq!(p.cfg_r(0x2c, 4), 0x1100_1af4, "subsystem 0x1af4:0x1100");
    assert_eq!(p.cfg_r(0x0e, 1), 0, "header type 0");
    assert_eq!(p.cfg_r(reg::STATUS as u64, 2), 0x10, "capability list");
    assert_eq!(p.cfg_r(reg::INTERRUPT_PIN as u64, 1), 1, "INTA");
    assert_eq!(p.cfg_r(reg::CAPABILITIES as u64, 1), cap::MSIX as u64);
    // Past the 256-byte header: zeros, up to the 4 KiB of configuration space.
    assert_eq!(p.cfg_r(0x100, 4), 0);
    assert_eq!(p.cfg_r(CONFIG_SPACE_SIZE - 4, 4), 0);
    assert_eq!(p.f.core().device_id(), 23);
    assert_eq!(p.f.core().pci_class(), 0x00_ff_00);
}

/// One capability as a driver parses it: (offset, id, cfg_type, bar, offset, length).
type Cap = (u64, u8, u8, u8, u32, u32);

fn walk(p: &mut Pci) -> Vec<Cap> {
    let mut caps = Vec::new();
    let mut at = p.cfg_r(reg::CAPABILITIES as u64, 1) & 0xfc;
    while at != 0 {
        assert!(caps.len() < 48, "capability list loops");
        assert!((0x40..0x100).contains(&at), "capability at {at:#x}");
        let id = p.cfg_r(at, 1) as u8;
        let next = p.cfg_r(at + 1, 1) & 0xfc;
        caps.push((
            at,
            id,
            p.cfg_r(at + 3, 1) as u8,
            p.cfg_r(at + 4, 1) as u8,
            p.cfg_r(at + 8, 4) as u32,
            p.cfg_r(at + 12, 4) as u32,
        ));
        at = next;
    }
    caps
}

#[test]
fn capability_chain_as_qemu_lays_it_out() {
    let mut p = Pci::new();
    let caps = walk(&mut p);
    let order: Vec<(u64, u8)> = caps.iter().map(|c| (c.0, c.1)).collect();
    assert_eq!(
        order,
        [
            (0x98, 0x11),
            (0x84, 0x09),
            (0x70, 0x09),
            (0x60, 0x09),
            (0x50, 0x09),
            (0x40, 0x09)
        ]
    );
    let modern = p.f.bar(MODERN_BAR).unwrap();
    for &(at, id, cfg_type, bar, offset, length) in &caps[1..] {
        assert_eq!(id, 0x09);
        let cap_len = p.cfg_r(at + 2, 1);
        if cfg_type == cap::TYPE_PCI_CFG {
            assert_eq!(cap_len, 20);
            continue;
        }
        assert_eq!(bar, MODERN_BAR, "cap at {at:#x}");
        let size = p.f.bar(bar).unwrap().size;
        assert!(
            u64::from(offset) + u64::from(length) <= size,
            "cap {at:#x} inside its BAR"
        );
        let expected = match cfg_type {
            cap::TYPE_COMMON => region::COMMON,
            cap::TYPE_ISR => region::ISR,
            cap::TYPE_DEVICE => region::DEVICE,
            cap::TYPE_NOTIFY => region::NOTIFY,
            t => panic!("cfg_type {t}"),
        };
        assert_eq!((u64::from(offset), u64::from(length)), expected);
        if cfg_type == cap::TYPE_NOTIFY {
            assert_eq!(cap_len, 20);
            assert_eq!(p.cfg_r(at + 16, 4), 4, "notify_off_multiplier");
        } else {
            assert_eq!(cap_len, 16);
        }
    }
    assert_eq!(modern.size, 0x4000);
    assert!(modern.is_64bit && modern.prefetchable);
    // MSI-X: 3 vectors (2 queues + config), table at BAR1 + 0, PBA at BAR1 + 0x800.
    assert_eq!(p.cfg_r(0x98 + 2, 2), 2, "table size - 1");
    assert_eq!(p.cfg_r(0x98 + 4, 4), 0x1);
    assert_eq!(p.cfg_r(0x98 + 8, 4), 0x801);
    assert_eq!(p.f.msix_vectors(), 3);
    let msix = p.f.bar(MSIX_BAR).unwrap();
    assert_eq!(
        (msix.size, msix.is_64bit, msix.prefetchable),
        (4096, false, false)
    );
    assert!(3 * 16 <= 0x800 && 0x800 + 8 <= msix.size);
    for b in [0, 2, 3, 5] {
        assert_eq!(p.f.bar(b), None, "BAR{b}");
    }
}

#[test]
fn without_msix_the_list_starts_at_pci_cfg_as_qemus_virtio_iommu_pci() {
    let mut p = Pci::with(|d| VirtioPciFunction::with_msix_vectors(d, 0));
    assert_eq!(p.cfg_r(reg::CAPABILITIES as u64, 1), 0x84);
    let ids: Vec<u64> = walk(&mut p).iter().map(|c| c.0).collect();
    assert_eq!(ids, [0x84, 0x70, 0x60, 0x50, 0x40]);
    assert_eq!(p.f.bar(MSIX_BAR), None);
    assert_eq!(p.f.msix_vectors(), 0);
    // Without MSI-X, no vector can be assigned.
    p.cw(cc::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(p.cr(cc::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
}

#[test]
fn bar_sizing_programming_and_read_only_bits() {
    let mut p = Pci::new();
    let bar = |n: u64| 0x10 + 4 * n;
    for n in 0..6 {
        p.cfg_w(bar(n), 4, 0xffff_ffff);
    }
    let sizes: Vec<u64> = (0..6).map(|n| p.cfg_r(bar(n), 4)).collect();
    // QEMU 11.1's virtio-blk-pci answers the same: BAR1 fffff000, BAR4 ffffc00c, BAR5 ffffffff.
    assert_eq!(
        sizes,
        [0, 0xffff_f000, 0, 0, 0xffff_c00c, 0xffff_ffff],
        "size masks"
    );
    p.cfg_w(bar(4), 4, 0x1234_5673);
    p.cfg_w(bar(5), 4, 0x80);
    assert_eq!(
        p.cfg_r(bar(4), 4),
        0x1234_400c,
        "address latched, type bits read-only"
    );
    assert_eq!(
        p.cfg_r(bar(4), 8),
        0x80_1234_400c,
        "64-bit read of the pair"
    );
    // Byte-wise programming.
    p.cfg_w(bar(1), 4, 0);
    p.cfg_w(bar(1) + 3, 1, 0xfe);
    p.cfg_w(bar(1) + 1, 1, 0xff);
    assert_eq!(p.cfg_r(bar(1), 4), 0xfe00_f000);
    // Command: memory, bus master and INTx disable are writable; status is not.
    p.cfg_w(reg::COMMAND as u64, 2, 0xffff);
    assert_eq!(p.cfg_r(reg::COMMAND as u64, 2), 0x0406);
    p.cfg_w(reg::STATUS as u64, 2, 0xffff);
    assert_eq!(p.cfg_r(reg::STATUS as u64, 2), 0x10);
    // IDs are read-only.
    p.cfg_w(0, 4, 0);
    p.cfg_w(8, 4, 0);
    assert_eq!(p.cfg_r(0, 4), 0x1057_1af4);
    assert_eq!(p.cfg_r(8, 4), 0x00ff_0001);
    // Function-level reset: addresses and command back to 0.
    p.f.reset();
    assert_eq!(p.cfg_r(bar(4), 4), 0xc);
    assert_eq!(p.cfg_r(bar(1), 4), 0);
    assert_eq!(p.cfg_r(reg::COMMAND as u64, 2), 0);
}

#[test]
fn common_cfg_registers() {
    let mut p = Pci::new();
    let max = p.dev.lock().unwrap().config().queue_size();
    assert_eq!(p.cr(cc::NUM_QUEUES, 2), 2);
    assert_eq!(
        p.cr(cc::QUEUE_SIZE, 2),
        u64::from(max),
        "size reads the maximum after reset"
    );
    assert_eq!(p.cr(cc::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(p.cr(cc::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // Device features, both words, and an unknown selector.
    let offered = VirtioCore::device_features(&p.dev);
    p.cw(cc::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(p.cr(cc::DEVICE_FEATURE_SELECT, 4), 1);
    assert_eq!(p.cr(cc::DEVICE_FEATURE, 4), offered >> 32);
    p.cw(cc::DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(p.cr(cc::DEVICE_FEATURE, 4), offered & 0xffff_ffff);
    p.cw(cc::DEVICE_FEATURE_SELECT, 4, 7);
    assert_eq!(p.cr(cc::DEVICE_FEATURE, 4), 0);
    // Driver features reach the core.
    p.cw(cc::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
    p.cw(cc::DRIVER_FEATURE_SELECT, 4, 1);
    p.cw(cc::DRIVER_FEATURE, 4, 1);
    assert_eq!(VirtioCore::driver_features(&p.dev), 1 << 32);
    assert_eq!(p.cr(cc::DRIVER_FEATURE, 4), 1);
    // Vectors: in range kept, out of range read back NO_VECTOR (§4.1.5.1.2).
    p.cw(cc::CONFIG_MSIX_VECTOR, 2, 2);
    assert_eq!(p.cr(cc::CONFIG_MSIX_VECTOR, 2), 2);
    p.cw(cc::CONFIG_MSIX_VECTOR, 2, 3);
    assert_eq!(p.cr(cc::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    p.cw(cc::QUEUE_SELECT, 2, 1);
    p.cw(cc::QUEUE_MSIX_VECTOR, 2, 1);
    assert_eq!(p.cr(cc::QUEUE_MSIX_VECTOR, 2), 1);
    p.cw(cc::QUEUE_MSIX_VECTOR, 2, 0x1234);
    assert_eq!(p.cr(cc::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // 64-bit address registers: one 8-byte access, or halves in any order.
    p.cw(cc::QUEUE_DESC, 8, 0x1122_3344_5566_7780);
    assert_eq!(p.cr(cc::QUEUE_DESC, 8), 0x1122_3344_5566_7780);
    p.cw(cc::QUEUE_DRIVER + 4, 4, 0xaabb_ccdd);
    p.cw(cc::QUEUE_DRIVER, 4, 0x1000);
    assert_eq!(p.cr(cc::QUEUE_DRIVER + 4, 4), 0xaabb_ccdd);
    assert_eq!(p.cr(cc::QUEUE_DRIVER, 4), 0x1000);
    // A queue that does not exist: size 0, not enabled; writes ignored.
    p.cw(cc::QUEUE_SELECT, 2, 2);
    assert_eq!(p.cr(cc::QUEUE_SELECT, 2), 2);
    assert_eq!(p.cr(cc::QUEUE_SIZE, 2), 0);
    p.cw(cc::QUEUE_SIZE, 2, 8);
    p.cw(cc::QUEUE_ENABLE, 2, 1);
    assert_eq!((p.cr(cc::QUEUE_SIZE, 2), p.cr(cc::QUEUE_ENABLE, 2)), (0, 0));
    // Fields of features never offered read 0.
    assert_eq!(p.cr(cc::QUEUE_NOTIFY_DATA, 2), 0);
    assert_eq!(p.cr(cc::QUEUE_RESET, 2), 0);
    // Odd accesses: misaligned start and odd widths read 0.
    assert_eq!(p.cr(cc::NUM_QUEUES + 1, 1), 0);
    let mut three = [0xffu8; 3];
    p.f.bar_read(MODERN_BAR, cc::NUM_QUEUES, &mut three);
    assert_eq!(three, [0; 3]);
    // Device status 0 resets the transport's queue registers and the vectors.
    p.cw(cc::DEVICE_STATUS, 1, 0);
    assert_eq!(p.status(), 0);
    assert_eq!(VirtioCore::driver_features(&p.dev), 0);
    assert_eq!(p.cr(cc::QUEUE_SELECT, 2), 0);
    p.cw(cc::QUEUE_SELECT, 2, 1);
    assert_eq!(p.cr(cc::QUEUE_SIZE, 2), u64::from(max));
    assert_eq!(p.cr(cc::QUEUE_DESC, 8), 0);
    assert_eq!(p.cr(cc::QUEUE_DRIVER, 8), 0);
    assert_eq!(p.cr(cc::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(p.cr(cc::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
}

#[test]
fn queue_sizes_and_addresses_the_device_refuses_leave_it_disabled() {
    let mut p = Pci::new();
    let max = p.dev.lock().unwrap().config().queue_size();
    p.cw(cc::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
    let good = |p: &mut Pci| {
        p.cw(cc::QUEUE_DESC, 8, RING);
        p.cw(cc::QUEUE_DRIVER, 8, RING + 0x1000);
        p.cw(cc::QUEUE_DEVICE, 8, RING + 0x2000);
    };
    good(&mut p);
    for size in [0, 3, 6, max.wrapping_mul(2), u16::MAX] {
        p.cw(cc::QUEUE_SIZE, 2, u64::from(size));
        p.cw(cc::QUEUE_ENABLE, 2, 1);
        assert_eq!(p.cr(cc::QUEUE_ENABLE, 2), 0, "size {size}");
        assert!(!p.dev.lock().unwrap().queue(0).unwrap().ready_flag());
    }
    p.cw(cc::QUEUE_SIZE, 2, u64::from(QSIZE));
    // Rings outside guest RAM (16 MiB), or wrapping past 2^64, or misaligned.
    for (desc, driver, device) in [
        (0x1_0000_0000, RING + 0x1000, RING + 0x2000),
        (RING, u64::MAX - 1, RING + 0x2000),
        (RING, RING + 0x1000, (16 << 20) - 4),
        (RING + 8, RING + 0x1000, RING + 0x2000),
    ] {
        p.cw(cc::QUEUE_DESC, 8, desc);
        p.cw(cc::QUEUE_DRIVER, 8, driver);
        p.cw(cc::QUEUE_DEVICE, 8, device);
        p.cw(cc::QUEUE_ENABLE, 2, 1);
        assert_eq!(
            p.cr(cc::QUEUE_ENABLE, 2),
            0,
            "{desc:#x} {driver:#x} {device:#x}"
        );
        assert!(!p.f.queue_enabled(0));
    }
    // The same queue with good values is accepted, and its registers are then read-only.
    good(&mut p);
    p.cw(cc::QUEUE_ENABLE, 2, 1);
    assert_eq!(p.cr(cc::QUEUE_ENABLE, 2), 1);
    p.cw(cc::QUEUE_DESC, 8, 0x8000);
    p.cw(cc::QUEUE_SIZE, 2, 4);
    assert_eq!(p.cr(cc::QUEUE_DESC, 8), RING);
    assert_eq!(p.cr(cc::QUEUE_SIZE, 2), u64::from(QSIZE));
    // A guest memory without the rings: enabling fails cleanly.
    p.cw(cc::DEVICE_STATUS, 1, 0);
    p.f.set_guest_memory(GuestMemoryMmap::new());
    p.cw(cc::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
    good(&mut p);
    p.cw(cc::QUEUE_SIZE, 2, u64::from(QSIZE));
    p.cw(cc::QUEUE_ENABLE, 2, 1);
    assert_eq!(p.cr(cc::QUEUE_ENABLE, 2), 0);
}

trait ReadyFlag {
    fn ready_flag(&self) -> bool;
}
impl ReadyFlag for virtio_queue::Queue {
    fn ready_flag(&self) -> bool {
        virtio_queue::QueueT::ready(self)
    }
}

#[test]
fn bring_up_and_attach_through_the_pci_registers_with_msix() {
    let mut p = Pci::new();
    p.msix_control(0x8000);
    for v in 0..3 {
        p.mask_vector(v, false);
    }
    p.bring_up();
    assert!(p.f.queue_enabled(0) && p.f.queue_enabled(1));
    let (status, id, len) = p.attach();
    assert_eq!(status, Status::Ok as u8);
    assert_eq!((id, len), (0, 4), "used element: head 0, 4 bytes written");
    // The endpoint is attached in the device's state.
    assert_eq!(p.dev.lock().unwrap().state().endpoint_domain(1), Some(1));
    assert_eq!(p.sink.take(), [Irq::Msix(1)], "requestq's vector, no INTx");
    // The ISR bit is set as QEMU sets it, without INTx while MSI-X is enabled.
    assert_eq!(p.isr(), 1);
    assert_eq!(p.isr(), 0);
    assert_eq!(p.sink.take(), []);
    // A second request goes the same way.
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), [Irq::Msix(1)]);
    assert_eq!(p.isr(), 1);
    // A configuration interrupt (DEVICE_NEEDS_RESET) takes the config vector.
    p.dev.lock().unwrap().set_needs_reset();
    assert_eq!(p.sink.take(), [Irq::Msix(0)]);
    assert_eq!(p.isr(), 2);
}

#[test]
fn msix_masking_holds_vectors_in_the_pba() {
    let mut p = Pci::new();
    p.msix_control(0x8000);
    p.bring_up();
    // Every vector starts masked: the interrupt is held.
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), []);
    assert_eq!(p.pba(), 0b010);
    // Unmasking the vector delivers it and clears its pending bit.
    p.mask_vector(1, false);
    assert_eq!(p.sink.take(), [Irq::Msix(1)]);
    assert_eq!(p.pba(), 0);
    // The function mask holds every vector; clearing it delivers.
    p.msix_control(0xc000);
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), []);
    assert_eq!(p.pba(), 0b010);
    p.msix_control(0x8000);
    assert_eq!(p.sink.take(), [Irq::Msix(1)]);
    assert_eq!(p.pba(), 0);
    // The PBA is read-only.
    p.bar_w(MSIX_BAR, 0x800, 8, u64::MAX);
    assert_eq!(p.pba(), 0);
    // A queue without a vector signals nothing.
    p.cw(cc::QUEUE_SELECT, 2, 0);
    p.cw(cc::QUEUE_MSIX_VECTOR, 2, u64::from(NO_VECTOR));
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), []);
    assert_eq!(p.pba(), 0);
}

#[test]
fn a_client_emulating_the_table_leaves_per_vector_masks_to_it() {
    let mut p = Pci::new();
    p.f.set_msix_table_in_client(true);
    p.msix_control(0x8000);
    p.bring_up();
    // Our own table's entries are all masked, but they do not count.
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), [Irq::Msix(1)]);
    // The function mask still does.
    p.msix_control(0xc000);
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), []);
    p.msix_control(0x8000);
    assert_eq!(p.sink.take(), [Irq::Msix(1)]);
}

#[test]
fn msix_table_reads_back_and_resets_masked() {
    let mut p = Pci::new();
    p.bar_w(MSIX_BAR, 16, 8, 0x1_fee0_1000);
    p.bar_w(MSIX_BAR, 24, 4, 0x41);
    p.bar_w(MSIX_BAR, 28, 4, 0xffff_fffe);
    assert_eq!(p.bar_r(MSIX_BAR, 16, 4), 0xfee0_1000);
    assert_eq!(p.bar_r(MSIX_BAR, 20, 4), 1);
    assert_eq!(p.bar_r(MSIX_BAR, 24, 4), 0x41);
    assert_eq!(p.bar_r(MSIX_BAR, 28, 4), 0, "only the mask bit is defined");
    assert_eq!(p.bar_r(MSIX_BAR, 12, 4), 1, "entry 0 masked at power-on");
    // Odd widths and misaligned accesses: zeros, ignored.
    assert_eq!(p.bar_r(MSIX_BAR, 16, 2), 0);
    assert_eq!(p.bar_r(MSIX_BAR, 18, 4), 0);
    p.bar_w(MSIX_BAR, 16, 1, 0);
    assert_eq!(p.bar_r(MSIX_BAR, 16, 4), 0xfee0_1000);
    p.msix_control(0xc000);
    assert_eq!(p.cfg_r(cap::MSIX as u64 + 2, 2), 0xc002);
    // The table size bits are read-only.
    p.msix_control(0x3fff);
    assert_eq!(p.cfg_r(cap::MSIX as u64 + 2, 2), 0x0002);
    p.msix_control(0xc000);
    p.f.reset();
    assert_eq!(p.bar_r(MSIX_BAR, 16, 4), 0);
    assert_eq!(p.bar_r(MSIX_BAR, 28, 4), 1);
    assert_eq!(p.cfg_r(cap::MSIX as u64 + 2, 2), 0x0002);
}

#[test]
fn intx_follows_the_isr_and_its_read_clears_it() {
    let mut p = Pci::new();
    p.bring_up();
    // MSI-X not enabled: the queue interrupt asserts INTx and sets status bit 3.
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), [Irq::Intx(true)]);
    assert_eq!(p.cfg_r(reg::STATUS as u64, 2), 0x18);
    assert_eq!(p.isr(), 1, "ISR bit 0: queue");
    assert_eq!(p.sink.take(), [Irq::Intx(false)]);
    assert_eq!(p.cfg_r(reg::STATUS as u64, 2), 0x10);
    assert_eq!(p.isr(), 0);
    // INTx disable: the level shows in the status register, the pin stays low.
    p.cfg_w(reg::COMMAND as u64, 2, 0x406);
    p.dev.lock().unwrap().set_needs_reset();
    assert_eq!(p.sink.take(), []);
    assert_eq!(p.cfg_r(reg::STATUS as u64, 2), 0x18);
    p.cfg_w(reg::COMMAND as u64, 2, 0x6);
    assert_eq!(p.sink.take(), [Irq::Intx(true)]);
    // Enabling MSI-X takes the function off INTx.
    p.msix_control(0x8000);
    assert_eq!(p.sink.take(), [Irq::Intx(false)]);
    assert_eq!(p.isr(), 2, "ISR bit 1: configuration");
}

#[test]
fn device_reset_clears_a_pending_isr_and_lowers_intx() {
    let mut p = Pci::new();
    p.bring_up();
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), [Irq::Intx(true)]);
    p.cw(cc::DEVICE_STATUS, 1, 0);
    assert_eq!(p.sink.take(), [Irq::Intx(false)]);
    assert_eq!(p.isr(), 0);
    assert_eq!(p.cfg_r(reg::STATUS as u64, 2), 0x10);
}

#[test]
fn the_pci_cfg_window_reaches_the_bars() {
    let mut p = Pci::new();
    let (bar, off, len, data) = (
        cap::PCI_CFG as u64 + 4,
        cap::PCI_CFG as u64 + 8,
        cap::PCI_CFG as u64 + 12,
        cap::PCI_CFG_DATA as u64,
    );
    // num_queues through the window.
    p.cfg_w(bar, 1, u64::from(MODERN_BAR));
    p.cfg_w(off, 4, cc::NUM_QUEUES);
    p.cfg_w(len, 4, 2);
    assert_eq!(p.cfg_r(bar, 1), u64::from(MODERN_BAR));
    assert_eq!(p.cfg_r(data, 4), 2);
    // queue_select written through the window.
    p.cfg_w(off, 4, cc::QUEUE_SELECT);
    p.cfg_w(data, 2, 1);
    assert_eq!(p.cr(cc::QUEUE_SELECT, 2), 1);
    // The device configuration: the same bytes as through BAR4.
    p.cfg_w(off, 4, region::DEVICE.0);
    p.cfg_w(len, 4, 4);
    assert_eq!(p.cfg_r(data, 4), p.bar_r(MODERN_BAR, region::DEVICE.0, 4));
    // The MSI-X table: entry 0's vector control (masked).
    p.cfg_w(bar, 1, u64::from(MSIX_BAR));
    p.cfg_w(off, 4, 12);
    assert_eq!(p.cfg_r(data, 4), 1);
    p.cfg_w(data, 4, 0);
    assert_eq!(p.bar_r(MSIX_BAR, 12, 4), 0, "unmasked through the window");
    // Lengths other than 1, 2, 4 and misaligned offsets access nothing.
    p.cfg_w(bar, 1, u64::from(MODERN_BAR));
    p.cfg_w(off, 4, cc::QUEUE_SELECT);
    p.cfg_w(len, 4, 3);
    p.cfg_w(data, 4, 0);
    assert_eq!(p.cr(cc::QUEUE_SELECT, 2), 1);
    p.cfg_w(off, 4, cc::QUEUE_SELECT + 1);
    p.cfg_w(len, 4, 2);
    p.cfg_w(data, 4, 0);
    assert_eq!(p.cr(cc::QUEUE_SELECT, 2), 1);
    // A BAR that does not exist.
    p.cfg_w(bar, 1, 3);
    p.cfg_w(off, 4, 0);
    assert_eq!(p.cfg_r(data, 4), 0);
}

#[test]
fn device_config_window_is_the_cores() {
    let mut p = Pci::new();
    let mut want = [0u8; 8];
    VirtioCore::read_config(&p.dev, 8, &mut want);
    for len in [1usize, 2, 4, 8] {
        let mut got = [0u8; 8];
        p.f.bar_read(MODERN_BAR, region::DEVICE.0 + 8, &mut got[..len]);
        assert_eq!(got[..len], want[..len], "{len}-byte read");
    }
    let gen = VirtioCore::config_generation(&p.dev);
    assert_eq!(p.cr(cc::CONFIG_GENERATION, 1), u64::from(gen & 0xff));
}

#[test]
fn function_level_reset_returns_to_power_on() {
    let mut p = Pci::new();
    p.msix_control(0x8000);
    p.bring_up();
    p.f.reset();
    assert_eq!(p.status(), 0);
    assert_eq!(VirtioCore::status(&p.dev), 0);
    assert_eq!(p.cr(cc::QUEUE_ENABLE, 2), 0);
    assert!(!p.f.queue_enabled(0));
    assert_eq!(p.cfg_r(cap::MSIX as u64 + 2, 2), 2, "MSI-X disabled");
    assert_eq!(p.cr(cc::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // And it comes up again.
    p.avail_idx = 0;
    for q in 0..2 {
        p.mem
            .write_slice(&[0; 0x3000], GuestAddress(RING + q * 0x3000))
            .unwrap();
    }
    p.bring_up();
    assert_eq!(p.attach().0, Status::Ok as u8);
}

#[test]
fn a_notification_runs_one_round_and_poll_the_rounds_it_owes() {
    let mut p = Pci::with(VirtioPciFunction::new);
    let config = DeviceConfig::builder()
        .endpoint(1)
        .max_requests_per_notify(1)
        .build()
        .unwrap();
    let dev = IommuDevice::new_shared(config, p.mem.clone()).unwrap();
    p.f = VirtioPciFunction::new(dev.clone());
    p.f.set_interrupt_sink(Some(p.sink.clone()));
    p.dev = dev;
    p.bring_up();
    for _ in 0..3 {
        p.push_attach();
    }
    // eventq's slot does not touch requestq.
    p.notify(1);
    assert_eq!(p.used_idx(), 0);
    assert!(!p.f.poll());
    p.notify(0);
    assert_eq!(p.used_idx(), 1, "the notification's first round");
    assert_eq!(p.drain(), 1, "one more poll owes work after the first");
    assert_eq!(
        p.used_idx(),
        3,
        "every chain available at the notification used"
    );
    assert!(!p.f.poll());
    // A notification slot past the last queue is ignored.
    p.push_attach();
    p.bar_w(MODERN_BAR, region::NOTIFY.0 + 4 * 2, 2, 2);
    p.bar_w(MODERN_BAR, region::NOTIFY.0 + region::NOTIFY.1 - 2, 2, 0);
    assert_eq!(p.used_idx(), 3);
    assert!(!p.f.poll());
}

/// Every offset up to 64 bytes past the end and every width, read and write, of config space
/// and every BAR: no panic, and reads of nothing give zeros.
#[test]
fn hostile_accesses_at_every_offset_and_width() {
    let mut p = Pci::new();
    p.bring_up();
    let widths = [0usize, 1, 2, 3, 4, 5, 8, 16];
    let mut buf = [0u8; 16];
    for off in 0..CONFIG_SPACE_SIZE + 64 {
        for &w in &widths {
            p.f.config_read(off, &mut buf[..w]);
            if off >= 0x100 {
                assert!(buf[..w].iter().all(|&b| b == 0), "config {off:#x}+{w}");
            }
        }
    }
    for bar in 0..7u8 {
        let size = p.f.bar(bar).map_or(64, |b| b.size);
        for off in (0..size + 64).chain([u64::MAX - 3, u64::MAX]) {
            for &w in &widths {
                buf = [0xa5; 16];
                p.f.bar_read(bar, off, &mut buf[..w]);
                if off >= size {
                    assert!(buf[..w].iter().all(|&b| b == 0), "BAR{bar} {off:#x}+{w}");
                }
                p.f.bar_write(bar, off, &[0xff; 16][..w]);
            }
        }
    }
    for off in (0..CONFIG_SPACE_SIZE + 64).chain([u64::MAX - 1]) {
        for &w in &widths {
            p.f.config_write(off, &[0xff; 16][..w]);
        }
    }
    let mut rounds = 0;
    while p.f.poll() {
        rounds += 1;
        assert!(rounds < 1000);
    }
    // Identity survives everything.
    assert_eq!(p.cfg_r(0, 4), 0x1057_1af4);
}

#[derive(Clone, Debug)]
enum Op {
    Cfg(u16, u8, u64, bool),
    Bar(u8, u16, u8, u64, bool),
    Poll,
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u16..0x120, 0u8..9, any::<u64>(), any::<bool>())
            .prop_map(|(o, w, v, wr)| Op::Cfg(o, w, v, wr)),
        (0u8..6, 0u16..0x4040, 0u8..9, any::<u64>(), any::<bool>())
            .prop_map(|(b, o, w, v, wr)| Op::Bar(b, o, w, v, wr)),
        // Offsets near the interesting registers, more often.
        (0u16..0x40, 0u8..9, 0u64..4, any::<bool>())
            .prop_map(|(o, w, v, wr)| Op::Bar(MODERN_BAR, o, w, v, wr)),
        Just(Op::Poll),
        Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_register_traffic_never_panics(ops in proptest::collection::vec(op(), 1..64)) {
        let mut p = Pci::new();
        for op in ops {
            match op {
                Op::Cfg(o, w, v, wr) => {
                    let w = usize::from(w);
                    if wr {
                        p.f.config_write(u64::from(o), &v.to_le_bytes()[..w]);
                    } else {
                        let mut b = [0u8; 8];
                        p.f.config_read(u64::from(o), &mut b[..w]);
                    }
                }
                Op::Bar(b, o, w, v, wr) => {
                    let w = usize::from(w);
                    if wr {
                        p.f.bar_write(b, u64::from(o), &v.to_le_bytes()[..w]);
                    } else {
                        let mut d = [0u8; 8];
                        p.f.bar_read(b, u64::from(o), &mut d[..w]);
                    }
                }
                Op::Poll => {
                    for _ in 0..1000 {
                        if !p.f.poll() {
                            break;
                        }
                    }
                }
                Op::Reset => p.f.reset(),
            }
        }
        prop_assert_eq!(p.cfg_r(0, 4), 0x1057_1af4);
        // Vectors read back are always in range or NO_VECTOR.
        let v = p.cr(cc::CONFIG_MSIX_VECTOR, 2);
        prop_assert!(v < 3 || v == u64::from(NO_VECTOR));
    }
}

#[test]
fn dropping_the_function_uninstalls_its_interrupt_handler() {
    let p = Pci::new();
    let (dev, sink) = (p.dev.clone(), p.sink.clone());
    // While installed, a core interrupt reaches the sink (INTx: MSI-X is off).
    dev.lock().unwrap().set_needs_reset();
    assert_eq!(sink.take(), [Irq::Intx(true)]);
    drop(p);
    VirtioCore::write_status(&mut dev.clone(), 0);
    dev.lock().unwrap().set_needs_reset();
    assert_eq!(sink.take(), []);
}

#[test]
fn function_level_reset_lowers_an_asserted_intx() {
    let mut p = Pci::new();
    p.bring_up();
    assert_eq!(p.attach().0, Status::Ok as u8);
    assert_eq!(p.sink.take(), [Irq::Intx(true)]);
    p.f.reset();
    assert_eq!(p.sink.take(), [Irq::Intx(false)]);
    assert_eq!(p.cfg_r(reg::STATUS as u64, 2), 0x10);
    assert_eq!(p.isr(), 0);
}

/// An owned (unshared) core: its interrupt handler runs inside the core's own methods, while the
/// transport holds `&mut core`; the routing must not need the core.
#[test]
fn an_owned_core_routes_its_interrupts_too() {
    let config = DeviceConfig::builder().endpoint(1).build().unwrap();
    let core = IommuDevice::new(config, mem()).unwrap();
    let mut f = VirtioPciFunction::new(core);
    let sink = Arc::new(Rec::default());
    f.set_interrupt_sink(Some(sink.clone()));
    sink.take();
    let mut id = [0u8; 4];
    f.config_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1057_1af4);
    f.core_mut().set_needs_reset();
    assert_eq!(sink.take(), [Irq::Intx(true)]);
    let mut isr = [0u8; 1];
    f.bar_read(MODERN_BAR, region::ISR.0, &mut isr);
    assert_eq!(isr, [2]);
    assert_eq!(sink.take(), [Irq::Intx(false)]);
    assert_eq!(
        f.core().interrupt_status(),
        0,
        "the ISR read acknowledged the core"
    );
}

/// A hostile guest that never reads its used ring and keeps re-posting the same descriptors:
/// every notification is answered in a bounded number of rounds, the used index follows the
/// available index through many wraps of the 16-bit counters, and each request still succeeds.
#[test]
fn a_guest_that_never_reads_its_used_ring_costs_bounded_work_per_notification() {
    let mut p = Pci::new();
    p.bring_up();
    for i in 0..70_000u32 {
        p.push_attach();
        p.notify(0);
        let rounds = p.drain();
        assert!(
            rounds <= 1,
            "request {i}: {rounds} owed rounds for one chain"
        );
        assert_eq!(p.used_idx(), p.avail_idx, "request {i} answered");
    }
    let last = p.avail_idx.wrapping_sub(1);
    let slot = u64::from(last % (QSIZE / 2));
    let status: u8 = p
        .mem
        .read_obj(GuestAddress(STATUS_BUF + 16 * slot))
        .unwrap();
    assert_eq!(
        status,
        Status::Ok as u8,
        "the last ATTACH after 70 000 succeeded"
    );
    assert_eq!(p.status() & 0x40, 0, "no DEVICE_NEEDS_RESET");
}

/// An available index far ahead of what the queue can hold (more entries than descriptors):
/// the device processes nothing it cannot trust, sets DEVICE_NEEDS_RESET rather than spinning,
/// and owes no endless rounds.
#[test]
fn an_available_index_beyond_the_queue_size_is_refused_not_spun_on() {
    let mut p = Pci::new();
    p.bring_up();
    p.push_attach();
    // Claim 1000 entries on an 8-entry queue.
    p.w16(RING + 0x1000 + 2, 1000);
    p.notify(0);
    let rounds = p.drain();
    assert!(rounds <= 1, "{rounds} owed rounds");
    assert!(
        p.used_idx() <= QSIZE,
        "at most one queue's worth used, got {}",
        p.used_idx()
    );
    assert_ne!(p.status() & 0x40, 0, "DEVICE_NEEDS_RESET set");
    // Further notifications change nothing and cost nothing.
    let used = p.used_idx();
    for _ in 0..100 {
        p.notify(0);
        assert!(p.drain() <= 1);
    }
    assert_eq!(p.used_idx(), used);
}
