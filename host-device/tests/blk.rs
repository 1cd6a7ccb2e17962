//! The virtio-blk device core (`endpoints::blk::BlkCore`) driven through `VirtioCore`, with its
//! rings and buffers at IOVAs that the virtio-iommu (driven by the guest driver) maps to other
//! guest-physical addresses: reads and writes reach the disk file, faults are reported by the
//! IOMMU and move no byte, and hostile chains are answered (or returned) without panicking.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use virtio_iommu_device::device::{status as dev, QueueSetup};
use virtio_iommu_device::endpoints::blk::wire::{feature, req, status, CONFIG_SIZE};
use virtio_iommu_device::endpoints::blk::{BlkCore, BlkError, BlkOptions, SEG_MAX};
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::transport::{InterruptCause, VirtioCore};
use virtio_iommu_device::{DeviceConfig, QueueError};
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{FaultEvent, VirtIOIommu};

const EP: u32 = 8;
const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
/// IOVA of the RW window (rings from its start, buffers after).
const IOVA: u64 = 0x1_0000_0000;
const WINDOW: u64 = 4 << 20;
/// IOVA of a read-only window.
const IOVA_RO: u64 = 0x2_0000_0000;
const RO_SIZE: u64 = 64 << 10;
/// IOVA of a write-only window.
const IOVA_WO: u64 = 0x3_0000_0000;
const WO_SIZE: u64 = 64 << 10;
/// Never mapped.
const UNMAPPED: u64 = 0x9_0000_0000;
const QSIZE: u16 = 256;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x4000;
/// Disk: 2048 sectors and 100 trailing bytes (capacity rounds down).
const DISK_LEN: u64 = (1 << 20) + 100;
const POISON: u8 = 0xaa;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

/// A temporary disk file with `pattern` contents, removed on drop.
struct TempDisk {
    path: PathBuf,
}

impl TempDisk {
    fn new() -> Self {
        Self::with_len(DISK_LEN)
    }

    fn with_len(len: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "viommu-blk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let data: Vec<u8> = (0..len).map(pattern).collect();
        std::fs::write(&path, data).unwrap();
        Self { path }
    }

    fn open(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One descriptor: IOVA, length, flags (NEXT and `next` are set by [`Rig::post`] unless
/// [`Rig::post_raw`] is used).
#[derive(Clone, Copy, Debug)]
struct D {
    addr: u64,
    len: u32,
    flags: u16,
}

fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: 0,
    }
}

fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: F_WRITE,
    }
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

type Causes = Arc<Mutex<Vec<InterruptCause>>>;

struct Rig {
    bed: TestBed,
    drv: VirtIOIommu<TestHal, InProcessTransport>,
    blk: BlkCore,
    disk: TempDisk,
    /// Guest-physical address of the RW window.
    phys: u64,
    /// Guest-physical address of the read-only window.
    ro_phys: u64,
    /// Guest-physical address of the write-only window.
    wo_phys: u64,
    slot: u16,
    next: u64,
    causes: Causes,
}

impl Rig {
    fn new() -> Self {
        Self::with(BlkOptions::default(), None)
    }

    /// `features`: driver features to write (default: every offered one).
    fn with(options: BlkOptions, features: Option<u64>) -> Self {
        let rig = Self::idle(options);
        rig.start(features)
    }

    /// Device created, memory set, nothing negotiated.
    fn idle(options: BlkOptions) -> Self {
        Self::idle_with_disk(options, TempDisk::new())
    }

    fn idle_with_disk(options: BlkOptions, disk: TempDisk) -> Self {
        let bed = TestBed::new(
            DeviceConfig::builder()
                .endpoints([EP])
                .input_range(0, u64::MAX)
                .build()
                .unwrap(),
        );
        let mut drv = bed.driver().unwrap();
        let phys = bed.alloc(WINDOW as usize).unwrap();
        let ro_phys = bed.alloc(RO_SIZE as usize).unwrap();
        drv.attach(1, EP).unwrap();
        drv.map(1, IOVA, IOVA + WINDOW - 1, phys, RW).unwrap();
        drv.map(1, IOVA_RO, IOVA_RO + RO_SIZE - 1, ro_phys, MapFlags::READ)
            .unwrap();
        let wo_phys = bed.alloc(WO_SIZE as usize).unwrap();
        drv.map(1, IOVA_WO, IOVA_WO + WO_SIZE - 1, wo_phys, MapFlags::WRITE)
            .unwrap();
        let mut blk =
            BlkCore::with_options(disk.open(), bed.shared_device().clone(), EP, options).unwrap();
        blk.set_memory(bed.memory().clone());
        let causes = Causes::default();
        let c = causes.clone();
        blk.set_interrupt_handler(Some(Box::new(move |cause| c.lock().unwrap().push(cause))));
        Self {
            bed,
            drv,
            blk,
            disk,
            phys,
            ro_phys,
            wo_phys,
            slot: 0,
            next: DATA,
            causes,
        }
    }

    fn setup() -> QueueSetup {
        QueueSetup {
            size: QSIZE,
            desc_table: IOVA + DESC,
            avail_ring: IOVA + AVAIL,
            used_ring: IOVA + USED,
        }
    }

    fn negotiate(&mut self, features: Option<u64>) -> u8 {
        let f = features.unwrap_or_else(|| self.blk.device_features());
        self.blk.write_status(dev::ACKNOWLEDGE | dev::DRIVER);
        self.blk.write_driver_features(0, f as u32);
        self.blk.write_driver_features(1, (f >> 32) as u32);
        self.blk
            .write_status(dev::ACKNOWLEDGE | dev::DRIVER | dev::FEATURES_OK);
        self.blk.status()
    }

    fn start(mut self, features: Option<u64>) -> Self {
        assert_ne!(self.negotiate(features) & dev::FEATURES_OK, 0);
        self.blk.activate_queue(0, Self::setup()).unwrap();
        self.blk
            .write_status(dev::ACKNOWLEDGE | dev::DRIVER | dev::FEATURES_OK | dev::DRIVER_OK);
        self
    }

    fn phys_of(&self, iova: u64) -> u64 {
        assert!((IOVA..IOVA + WINDOW).contains(&iova));
        self.phys + (iova - IOVA)
    }

    /// A fresh buffer of `len` bytes in the RW window filled with `fill`; its IOVA.
    fn buf(&mut self, len: usize, fill: u8) -> u64 {
        let l = (len as u64).max(1).next_multiple_of(64);
        if self.next + l > WINDOW {
            self.next = DATA;
        }
        let iova = IOVA + self.next;
        self.next += l + 64;
        self.write(iova, &vec![fill; len]);
        iova
    }

    fn write(&self, iova: u64, data: &[u8]) {
        self.bed.write_phys(self.phys_of(iova), data).unwrap();
    }

    fn read(&self, iova: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.bed.read_phys(self.phys_of(iova), &mut b).unwrap();
        b
    }

    /// A readable buffer holding `data`.
    fn rbuf(&mut self, data: &[u8]) -> u64 {
        let a = self.buf(data.len(), 0);
        self.write(a, data);
        a
    }

    fn avail_idx(&self) -> u16 {
        let b = self.read(IOVA + AVAIL + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn used_idx(&self) -> u16 {
        let b = self.read(IOVA + USED + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Used element at ring position `i`: (id, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let b = self.read(IOVA + USED + 4 + 8 * u64::from(i % QSIZE), 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.write(IOVA + DESC + 16 * u64::from(index), &d);
    }

    /// Puts `head` in the available ring (no notification).
    fn make_available(&self, head: u16) {
        let idx = self.avail_idx();
        self.write(
            IOVA + AVAIL + 4 + 2 * u64::from(idx % QSIZE),
            &head.to_le_bytes(),
        );
        self.write(IOVA + AVAIL + 2, &idx.wrapping_add(1).to_le_bytes());
    }

    /// Writes `descs` as one chain in consecutive slots and makes it available; its head.
    fn post(&mut self, descs: &[D]) -> u16 {
        let n = descs.len() as u16;
        assert!(n > 0 && n <= QSIZE);
        if self.slot + n > QSIZE {
            self.slot = 0;
        }
        let head = self.slot;
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last { d.flags } else { d.flags | F_NEXT };
            let next = if last { 0 } else { head + i as u16 + 1 };
            self.write_desc(head + i as u16, d.addr, d.len, flags, next);
        }
        self.make_available(head);
        self.slot += n;
        head
    }

    /// Posts, notifies, checks exactly one chain was used (with the head's id); its used len.
    fn submit(&mut self, descs: &[D]) -> u32 {
        let before = self.used_idx();
        let head = self.post(descs);
        self.blk.notify(0);
        assert_eq!(self.used_idx(), before.wrapping_add(1), "one chain used");
        let (id, len) = self.used(before);
        assert_eq!(id, u32::from(head));
        len
    }

    /// IN of `sectors` sectors at `sector` in one data descriptor: (status, data, used len).
    fn read_sectors(&mut self, sector: u64, sectors: usize) -> (u8, Vec<u8>, u32) {
        let h = self.rbuf(&header(req::IN, sector));
        let data = self.buf(sectors * 512, POISON);
        let st = self.buf(1, POISON);
        let used = self.submit(&[r(h, 16), w(data, (sectors * 512) as u32), w(st, 1)]);
        (self.read(st, 1)[0], self.read(data, sectors * 512), used)
    }

    /// OUT of `data` at `sector`: (status, used len).
    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
        let h = self.rbuf(&header(req::OUT, sector));
        let d = self.rbuf(data);
        let st = self.buf(1, POISON);
        let used = self.submit(&[r(h, 16), r(d, data.len() as u32), w(st, 1)]);
        (self.read(st, 1)[0], used)
    }

    /// A request with a 16-byte header and a 1-byte status only: (status, used len).
    fn simple(&mut self, ty: u32, sector: u64) -> (u8, u32) {
        let h = self.rbuf(&header(ty, sector));
        let st = self.buf(1, POISON);
        let used = self.submit(&[r(h, 16), w(st, 1)]);
        (self.read(st, 1)[0], used)
    }

    fn events(&mut self) -> Vec<FaultEvent> {
        let mut v = Vec::new();
        while let Some(e) = self.drv.poll_event().unwrap() {
            v.push(e);
        }
        v
    }

    fn file_sectors(&self, sector: u64, sectors: usize) -> Vec<u8> {
        let s = (sector * 512) as usize;
        self.disk.contents()[s..s + sectors * 512].to_vec()
    }
}

fn expected(sector: u64, sectors: usize) -> Vec<u8> {
    (sector * 512..(sector + sectors as u64) * 512)
        .map(pattern)
        .collect()
}

#[test]
fn identity_features_and_configuration_space() {
    let rig = Rig::idle(BlkOptions::default());
    let b = &rig.blk;
    assert_eq!(b.device_id(), 2);
    assert_eq!(b.pci_class(), 0x01_00_00);
    assert_eq!(b.num_queues(), 1);
    assert_eq!(b.queue_max_size(0), 256);
    assert_eq!(b.queue_max_size(1), 0);
    assert_eq!(b.queue_max_size(u16::MAX), 0);
    let offered = b.device_features();
    assert_eq!(
        offered,
        feature::VERSION_1
            | feature::ACCESS_PLATFORM
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::RING_INDIRECT_DESC
    );
    // Capacity rounds the 100 trailing bytes down.
    assert_eq!(b.capacity(), 2048);
    let mut cfg = [0xffu8; 64];
    b.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), SEG_MAX);
    assert_eq!(SEG_MAX, 254);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    // size_max, geometry, topology, writeback, num_queues and everything past 36 bytes: 0.
    assert!(cfg[8..12].iter().chain(&cfg[16..20]).all(|&x| x == 0));
    assert!(cfg[24..].iter().all(|&x| x == 0));
    // Odd offsets and widths, far offsets.
    let mut two = [0u8; 2];
    b.read_config(1, &mut two);
    assert_eq!(two, [0x08, 0]);
    let mut far = [0xffu8; 4];
    b.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    b.read_config(CONFIG_SIZE as u64 - 2, &mut far);
    assert_eq!(far, [0; 4]);
    // Writes are ignored.
    let mut rig = rig;
    rig.blk.write_config(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let mut cap = [0u8; 8];
    rig.blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    assert_eq!(rig.blk.config_generation(), 0);
}

#[test]
fn read_only_device_offers_ro_and_refuses_writes() {
    let mut rig = Rig::with(
        BlkOptions {
            read_only: true,
            ..BlkOptions::default()
        },
        None,
    );
    assert_ne!(rig.blk.device_features() & feature::RO, 0);
    let before = rig.disk.contents();
    let (st, used) = rig.write_sectors(3, &[0x55; 512]);
    assert_eq!((st, used), (status::IOERR, 1));
    assert_eq!(rig.disk.contents(), before, "nothing written");
    let (st, data, _) = rig.read_sectors(3, 1);
    assert_eq!(st, status::OK);
    assert_eq!(data, expected(3, 1));
    // FLUSH is still answered.
    assert_eq!(rig.simple(req::FLUSH, 0).0, status::OK);
}

#[test]
fn features_ok_needs_version_1_and_access_platform_and_offered_bits_only() {
    let all = feature::VERSION_1
        | feature::ACCESS_PLATFORM
        | feature::SEG_MAX
        | feature::BLK_SIZE
        | feature::FLUSH
        | feature::RING_INDIRECT_DESC;
    for (features, ok) in [
        (all, true),
        (feature::VERSION_1 | feature::ACCESS_PLATFORM, true),
        (all & !feature::ACCESS_PLATFORM, false),
        (all & !feature::VERSION_1, false),
        (all | feature::RO, false),
        (all | feature::RING_EVENT_IDX, false),
        (all | (1 << 63), false),
    ] {
        let mut rig = Rig::idle(BlkOptions::default());
        let s = rig.negotiate(Some(features));
        assert_eq!(s & dev::FEATURES_OK != 0, ok, "features {features:#x}");
        // Features are frozen once FEATURES_OK is set.
        if ok {
            rig.blk.write_driver_features(0, 0);
            assert_eq!(rig.blk.driver_features(), features);
        }
    }
}

#[test]
fn the_driver_features_halves_may_come_in_either_order() {
    let mut rig = Rig::idle(BlkOptions::default());
    rig.blk.write_status(dev::ACKNOWLEDGE | dev::DRIVER);
    rig.blk.write_driver_features(1, 0x3);
    rig.blk.write_driver_features(0, 0x200);
    assert_eq!(rig.blk.driver_features(), (0x3 << 32) | 0x200);
    rig.blk.write_driver_features(1, 0x1);
    assert_eq!(rig.blk.driver_features(), (0x1 << 32) | 0x200);
}

#[test]
fn options_are_checked() {
    let bed = TestBed::new(DeviceConfig::builder().endpoints([EP]).build().unwrap());
    let disk = TempDisk::new();
    let dev = bed.shared_device().clone();
    assert!(matches!(
        BlkCore::new(disk.open(), dev.clone(), EP + 1),
        Err(BlkError::UnknownEndpoint(9))
    ));
    let long = BlkOptions {
        serial: vec![b'x'; 21],
        ..BlkOptions::default()
    };
    assert!(matches!(
        BlkCore::with_options(disk.open(), dev.clone(), EP, long),
        Err(BlkError::SerialTooLong(21))
    ));
    let zero = BlkOptions {
        max_requests_per_notify: 0,
        ..BlkOptions::default()
    };
    assert!(matches!(
        BlkCore::with_options(disk.open(), dev.clone(), EP, zero),
        Err(BlkError::InvalidOption(_))
    ));
    assert!(BlkCore::new(disk.open(), dev, EP).is_ok());
}

#[test]
fn queue_activation_checks_index_size_and_alignment() {
    let mut rig = Rig::idle(BlkOptions::default());
    let s = Rig::setup();
    assert_eq!(
        rig.blk.activate_queue(1, s),
        Err(QueueError::NoSuchQueue(1))
    );
    for size in [0, 3, 512] {
        assert_eq!(
            rig.blk.activate_queue(0, QueueSetup { size, ..s }),
            Err(QueueError::InvalidSize(size))
        );
    }
    assert_eq!(
        rig.blk.activate_queue(
            0,
            QueueSetup {
                desc_table: s.desc_table + 8,
                ..s
            }
        ),
        Err(QueueError::Misaligned)
    );
    // Rings at unmapped IOVAs are accepted (translated at use) and raise no fault yet.
    let faults = rig.bed.device().counters().faults_raised;
    assert_eq!(
        rig.blk.activate_queue(
            0,
            QueueSetup {
                desc_table: UNMAPPED,
                ..s
            }
        ),
        Ok(())
    );
    assert_eq!(rig.bed.device().counters().faults_raised, faults);
}

#[test]
fn reads_return_the_file_contents() {
    let mut rig = Rig::new();
    let (st, data, used) = rig.read_sectors(5, 8);
    assert_eq!(st, status::OK);
    assert_eq!(used, 8 * 512 + 1, "data and status written");
    assert_eq!(data, expected(5, 8));
    // The last sector.
    let (st, data, _) = rig.read_sectors(2047, 1);
    assert_eq!(st, status::OK);
    assert_eq!(data, expected(2047, 1));
    let c = rig.blk.counters();
    assert_eq!((c.requests, c.ok, c.bytes_read), (2, 2, 9 * 512));
    assert!(rig.events().is_empty(), "no fault");
}

#[test]
fn any_descriptor_layout_is_accepted() {
    let mut rig = Rig::new();
    // Header in three pieces, data in four of odd sizes, status alone.
    let hdr = header(req::IN, 10);
    let h: Vec<u64> = [&hdr[0..5], &hdr[5..12], &hdr[12..16]]
        .iter()
        .map(|p| rig.rbuf(p))
        .collect();
    let sizes = [100u32, 412, 1000, 24];
    let bufs: Vec<u64> = sizes.iter().map(|&s| rig.buf(s as usize, POISON)).collect();
    let st = rig.buf(1, POISON);
    let mut descs = vec![r(h[0], 5), r(h[1], 7), r(h[2], 4)];
    descs.extend(bufs.iter().zip(sizes).map(|(&a, s)| w(a, s)));
    descs.push(w(st, 1));
    assert_eq!(rig.submit(&descs), 1537);
    assert_eq!(rig.read(st, 1)[0], status::OK);
    let got: Vec<u8> = bufs
        .iter()
        .zip(sizes)
        .flat_map(|(&a, s)| rig.read(a, s as usize))
        .collect();
    assert_eq!(got, expected(10, 3));
    // Status in the same descriptor as the data; header and the first OUT data bytes share one.
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let mut first = header(req::OUT, 20);
    first.extend_from_slice(&data[..300]);
    let a = rig.rbuf(&first);
    let b = rig.rbuf(&data[300..]);
    let st = rig.buf(1, POISON);
    assert_eq!(rig.submit(&[r(a, 316), r(b, 724), w(st, 1)]), 1);
    assert_eq!(rig.read(st, 1)[0], status::OK);
    assert_eq!(rig.file_sectors(20, 2), data);
    let hd = rig.rbuf(&header(req::IN, 20));
    let both = rig.buf(1025, POISON);
    assert_eq!(rig.submit(&[r(hd, 16), w(both, 1025)]), 1025);
    let back = rig.read(both, 1025);
    assert_eq!(back[..1024], data[..]);
    assert_eq!(back[1024], status::OK);
}

#[test]
fn writes_reach_the_file_and_flush_succeeds() {
    let mut rig = Rig::new();
    let before = rig.disk.contents();
    let data: Vec<u8> = (0..2048u32).map(|i| (i ^ 0x5a) as u8).collect();
    let (st, used) = rig.write_sectors(100, &data);
    assert_eq!((st, used), (status::OK, 1));
    let after = rig.disk.contents();
    assert_eq!(after[100 * 512..104 * 512], data[..]);
    assert_eq!(
        after[..100 * 512],
        before[..100 * 512],
        "nothing else changed"
    );
    assert_eq!(after[104 * 512..], before[104 * 512..]);
    // Read back through the device.
    let (st, back, _) = rig.read_sectors(100, 4);
    assert_eq!(st, status::OK);
    assert_eq!(back, data);
    assert_eq!(rig.simple(req::FLUSH, 0), (status::OK, 1));
    let c = rig.blk.counters();
    assert_eq!((c.bytes_written, c.flushes), (2048, 1));
}

#[test]
fn without_flush_negotiated_flush_is_unsupported_and_writes_are_synced() {
    let mut rig = Rig::with(
        BlkOptions::default(),
        Some(feature::VERSION_1 | feature::ACCESS_PLATFORM),
    );
    assert_eq!(rig.simple(req::FLUSH, 0), (status::UNSUPP, 1));
    assert_eq!(rig.blk.counters().flushes, 0);
    // Writethrough: each successful OUT is synced before it completes; a failed one is not.
    assert_eq!(rig.write_sectors(1, &[9; 1024]).0, status::OK);
    assert_eq!(rig.blk.counters().flushes, 1);
    assert_eq!(rig.write_sectors(4096, &[9; 512]).0, status::IOERR);
    assert_eq!(rig.blk.counters().flushes, 1);
    assert_eq!(rig.file_sectors(1, 2), vec![9; 1024]);
}

#[test]
fn writeback_writes_are_not_synced_until_flush() {
    let mut rig = Rig::new();
    assert_eq!(rig.write_sectors(1, &[9; 512]).0, status::OK);
    assert_eq!(rig.blk.counters().flushes, 0);
    assert_eq!(rig.simple(req::FLUSH, 0).0, status::OK);
    assert_eq!(rig.blk.counters().flushes, 1);
}

#[test]
fn a_head_index_outside_the_table_needs_reset() {
    let mut rig = Rig::new();
    rig.make_available(QSIZE);
    rig.blk.notify(0);
    assert!(rig.blk.needs_reset());
    assert_eq!(rig.used_idx(), 0);
    assert_eq!(rig.blk.counters().unanswered, 1);
}

#[test]
fn get_id_returns_the_serial() {
    let mut rig = Rig::with(
        BlkOptions {
            serial: b"disk-0042".to_vec(),
            ..BlkOptions::default()
        },
        None,
    );
    let h = rig.rbuf(&header(req::GET_ID, 0));
    let id = rig.buf(20, POISON);
    let st = rig.buf(1, POISON);
    assert_eq!(rig.submit(&[r(h, 16), w(id, 20), w(st, 1)]), 21);
    assert_eq!(rig.read(st, 1)[0], status::OK);
    let mut want = b"disk-0042".to_vec();
    want.resize(20, 0);
    assert_eq!(rig.read(id, 20), want);
    // A shorter buffer gets the first bytes.
    let h = rig.rbuf(&header(req::GET_ID, 0));
    let id = rig.buf(4, POISON);
    let st = rig.buf(1, POISON);
    assert_eq!(rig.submit(&[r(h, 16), w(id, 4), w(st, 1)]), 5);
    assert_eq!(rig.read(id, 4), b"disk");
    // A longer one: 20 bytes, the rest untouched; used length counts the 20.
    let h = rig.rbuf(&header(req::GET_ID, 0));
    let id = rig.buf(64, POISON);
    let st = rig.buf(1, POISON);
    assert_eq!(rig.submit(&[r(h, 16), w(id, 64), w(st, 1)]), 20);
    let got = rig.read(id, 64);
    assert_eq!(got[..20], want[..]);
    assert!(got[20..].iter().all(|&b| b == POISON));
    assert_eq!(rig.read(st, 1)[0], status::OK);
}

#[test]
fn unknown_types_are_unsupported() {
    let mut rig = Rig::new();
    for ty in [
        req::DISCARD,
        req::WRITE_ZEROES,
        req::SECURE_ERASE,
        req::GET_LIFETIME,
        2,
        99,
        u32::MAX,
    ] {
        assert_eq!(rig.simple(ty, 0), (status::UNSUPP, 1), "type {ty}");
    }
    assert_eq!(rig.blk.counters().unsupp, 7);
}

#[test]
fn out_of_range_and_misaligned_requests_fail() {
    let mut rig = Rig::new();
    let before = rig.disk.contents();
    // The read ends one sector past the capacity.
    let (st, data, used) = rig.read_sectors(2047, 2);
    assert_eq!(st, status::IOERR);
    assert_eq!(used, 0, "the status follows bytes that were not written");
    assert!(data.iter().all(|&b| b == POISON), "no data moved");
    for sector in [2048, u64::MAX, u64::MAX / 512] {
        assert_eq!(rig.read_sectors(sector, 1).0, status::IOERR);
        assert_eq!(rig.write_sectors(sector, &[1; 512]).0, status::IOERR);
    }
    // Not a multiple of 512.
    let h = rig.rbuf(&header(req::IN, 0));
    let d = rig.buf(511, POISON);
    let st = rig.buf(1, POISON);
    rig.submit(&[r(h, 16), w(d, 511), w(st, 1)]);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    assert!(rig.read(d, 511).iter().all(|&b| b == POISON));
    assert_eq!(rig.write_sectors(0, &[1; 513]).0, status::IOERR);
    assert_eq!(rig.disk.contents(), before);
    // Above the request limit.
    let mut rig = Rig::with(
        BlkOptions {
            max_request_bytes: 1024,
            ..BlkOptions::default()
        },
        None,
    );
    assert_eq!(rig.read_sectors(0, 2).0, status::OK);
    assert_eq!(rig.read_sectors(0, 3).0, status::IOERR);
}

#[test]
fn an_unmapped_buffer_faults_and_moves_nothing() {
    let mut rig = Rig::new();
    let h = rig.rbuf(&header(req::IN, 0));
    let good = rig.buf(512, POISON);
    let st = rig.buf(1, POISON);
    // The first data descriptor is mapped, the second is not: neither receives a byte.
    let used = rig.submit(&[r(h, 16), w(good, 512), w(UNMAPPED, 512), w(st, 1)]);
    assert_eq!(used, 0);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    assert!(rig.read(good, 512).iter().all(|&b| b == POISON));
    let ev = rig.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].endpoint, EP);
    assert_eq!(ev[0].address, Some(UNMAPPED));
    assert!(ev[0].write);
    let c = rig.blk.counters();
    assert_eq!((c.ioerr, c.dma_errors, c.bytes_read), (1, 1, 0));

    // OUT from an unmapped buffer: the file is unchanged, the fault is a read.
    let before = rig.disk.contents();
    let h = rig.rbuf(&header(req::OUT, 0));
    let d = rig.rbuf(&[0x77; 512]);
    let st = rig.buf(1, POISON);
    rig.submit(&[r(h, 16), r(d, 512), r(UNMAPPED + 0x1000, 512), w(st, 1)]);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    assert_eq!(rig.disk.contents(), before);
    let ev = rig.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].address, Some(UNMAPPED + 0x1000));
    assert!(ev[0].read);

    // An unmapped header.
    let st = rig.buf(1, POISON);
    rig.submit(&[r(UNMAPPED, 16), w(st, 1)]);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    assert_eq!(rig.events().len(), 1);
}

#[test]
fn a_read_into_a_read_only_mapping_faults_and_leaves_ram_unchanged() {
    let mut rig = Rig::new();
    rig.bed.write_phys(rig.ro_phys, &[0x33; 4096]).unwrap();
    let h = rig.rbuf(&header(req::IN, 0));
    let st = rig.buf(1, POISON);
    rig.submit(&[r(h, 16), w(IOVA_RO, 4096), w(st, 1)]);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    let mut ram = vec![0u8; 4096];
    rig.bed.read_phys(rig.ro_phys, &mut ram).unwrap();
    assert!(ram.iter().all(|&b| b == 0x33), "RAM unchanged");
    let ev = rig.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].address, Some(IOVA_RO));
    assert!(ev[0].write);
    // The same mapping is fine as an OUT source.
    let h = rig.rbuf(&header(req::OUT, 7));
    let st = rig.buf(1, POISON);
    rig.submit(&[r(h, 16), r(IOVA_RO, 512), w(st, 1)]);
    assert_eq!(rig.read(st, 1)[0], status::OK);
    assert_eq!(rig.file_sectors(7, 1), vec![0x33; 512]);
}

/// Linux maps a request's buffers by DMA direction: the header and OUT data device-readable
/// only (`DMA_TO_DEVICE`), IN data and the status device-writable only (`DMA_FROM_DEVICE`).
/// The device never needs more.
#[test]
fn buffers_mapped_with_their_direction_only_suffice() {
    let mut rig = Rig::new();
    rig.bed
        .write_phys(rig.ro_phys + 0x100, &header(req::IN, 33))
        .unwrap();
    rig.bed.write_phys(rig.wo_phys, &[POISON; 1025]).unwrap();
    let used = rig.submit(&[
        r(IOVA_RO + 0x100, 16),
        w(IOVA_WO, 1024),
        w(IOVA_WO + 1024, 1),
    ]);
    assert_eq!(used, 1025);
    let mut got = vec![0u8; 1025];
    rig.bed.read_phys(rig.wo_phys, &mut got).unwrap();
    assert_eq!(got[..1024], expected(33, 2)[..]);
    assert_eq!(got[1024], status::OK);
    // OUT: header and data read-only, status write-only.
    rig.bed
        .write_phys(rig.ro_phys + 0x200, &header(req::OUT, 50))
        .unwrap();
    rig.bed
        .write_phys(rig.ro_phys + 0x400, &[0x42; 512])
        .unwrap();
    let used = rig.submit(&[
        r(IOVA_RO + 0x200, 16),
        r(IOVA_RO + 0x400, 512),
        w(IOVA_WO + 0x800, 1),
    ]);
    assert_eq!(used, 1);
    assert_eq!(rig.file_sectors(50, 1), vec![0x42; 512]);
    // GET_ID into write-only memory.
    rig.bed
        .write_phys(rig.ro_phys + 0x300, &header(req::GET_ID, 0))
        .unwrap();
    assert_eq!(
        rig.submit(&[
            r(IOVA_RO + 0x300, 16),
            w(IOVA_WO + 0x1000, 20),
            w(IOVA_WO + 0x1014, 1)
        ]),
        21
    );
    assert!(rig.events().is_empty(), "no fault");
    // But a header in write-only memory faults (a read).
    rig.bed
        .write_phys(rig.wo_phys + 0x2000, &header(req::IN, 0))
        .unwrap();
    rig.submit(&[r(IOVA_WO + 0x2000, 16), w(IOVA_WO + 0x3000, 1)]);
    let mut st = [0u8; 1];
    rig.bed.read_phys(rig.wo_phys + 0x3000, &mut st).unwrap();
    assert_eq!(st[0], status::IOERR);
    let ev = rig.events();
    assert_eq!(ev.len(), 1);
    assert!(ev[0].read);
    assert_eq!(ev[0].address, Some(IOVA_WO + 0x2000));
}

#[test]
fn an_unreachable_status_returns_the_chain_unanswered() {
    let mut rig = Rig::new();
    let before = rig.disk.contents();
    let h = rig.rbuf(&header(req::OUT, 0));
    let d = rig.rbuf(&[0x11; 512]);
    assert_eq!(rig.submit(&[r(h, 16), r(d, 512), w(UNMAPPED, 1)]), 0);
    assert_eq!(rig.disk.contents(), before, "no write whose status is lost");
    assert_eq!(rig.events().len(), 1);
    // A status in a read-only mapping: the same.
    assert_eq!(rig.submit(&[r(h, 16), r(d, 512), w(IOVA_RO, 1)]), 0);
    assert_eq!(rig.disk.contents(), before);
    assert_eq!(rig.blk.counters().unanswered, 2);
}

#[test]
fn hostile_chains_are_answered_or_returned() {
    let mut rig = Rig::new();
    // No writable descriptor: no status.
    let h = rig.rbuf(&header(req::IN, 0));
    assert_eq!(rig.submit(&[r(h, 16)]), 0);
    // Header too short.
    let st = rig.buf(1, POISON);
    let short = rig.rbuf(&header(req::IN, 0)[..8]);
    assert_eq!(rig.submit(&[r(short, 8), w(st, 1)]), 1);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    // Only a status byte.
    let st = rig.buf(1, POISON);
    assert_eq!(rig.submit(&[w(st, 1)]), 1);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    // Readable after writable: IOERR in the last byte.
    let d = rig.buf(512, POISON);
    let st = rig.rbuf(&[POISON]);
    let st2 = rig.buf(1, POISON);
    rig.submit(&[r(h, 16), w(d, 512), r(st, 1), w(st2, 1)]);
    assert_eq!(rig.read(st2, 1)[0], status::IOERR);
    assert!(rig.read(d, 512).iter().all(|&b| b == POISON));
    // Huge lengths: almost 4 GiB of data at a mapped IOVA (beyond the disk: IOERR, checked
    // before any translation).
    let big = rig.buf(1, POISON);
    let st = rig.buf(1, POISON);
    let faults = rig.bed.device().counters().faults_raised;
    assert_eq!(
        rig.submit(&[r(h, 16), w(big, u32::MAX - 4096), w(st, 1)]),
        0
    );
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    assert_eq!(rig.bed.device().counters().faults_raised, faults);
    // More than 2^32 bytes in total: virtio-queue stops the chain (§2.7.5.2), returned unwritten.
    let st = rig.buf(1, POISON);
    assert_eq!(
        rig.submit(&[r(h, 16), w(big, u32::MAX), w(big, u32::MAX), w(st, 1)]),
        0
    );
    assert_eq!(rig.read(st, 1)[0], POISON);
    // Descriptors whose IOVA range passes 2^64.
    let st = rig.buf(1, POISON);
    rig.submit(&[r(h, 16), w(u64::MAX - 10, 512), w(st, 1)]);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    let hw = rig.rbuf(&header(req::OUT, 0));
    rig.submit(&[r(hw, 16), r(u64::MAX, 512), w(st, 1)]);
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    // A zero-length data descriptor and a zero-length read.
    let st = rig.buf(1, POISON);
    assert_eq!(rig.submit(&[r(h, 16), w(UNMAPPED, 0), w(st, 1)]), 1);
    assert_eq!(rig.read(st, 1)[0], status::OK);

    // A loop: descriptor 200 -> 201 -> 200.
    let before = rig.used_idx();
    let hd = rig.rbuf(&header(req::IN, 0));
    rig.write_desc(200, hd, 16, F_NEXT, 201);
    rig.write_desc(201, st, 1, F_WRITE | F_NEXT, 200);
    rig.make_available(200);
    rig.blk.notify(0);
    assert_eq!(rig.used_idx(), before.wrapping_add(1));
    assert_eq!(rig.used(before), (200, 0));
    // `next` outside the table.
    rig.write_desc(200, hd, 16, F_NEXT, 999);
    rig.make_available(200);
    rig.blk.notify(0);
    assert_eq!(rig.used(before.wrapping_add(1)), (200, 0));
    // A descriptor at an unmapped IOVA... of the table itself is covered below; a chain
    // whose `next` leads into descriptors pointing nowhere: returned or answered.
    rig.write_desc(200, UNMAPPED, 16, F_NEXT, 201);
    rig.write_desc(201, st, 1, F_WRITE, 0);
    rig.make_available(200);
    rig.blk.notify(0);
    assert_eq!(rig.used(before.wrapping_add(2)), (200, 1));
    assert_eq!(rig.read(st, 1)[0], status::IOERR);
    assert!(!rig.blk.needs_reset());
    let c = rig.blk.counters();
    assert_eq!(c.requests, c.ok + c.ioerr + c.unsupp + c.unanswered);
}

/// Writes `descs` as an indirect table at IOVA `table` (NEXT and `next` set here).
fn indirect_table(rig: &Rig, table: u64, descs: &[D]) {
    for (i, d) in descs.iter().enumerate() {
        let last = i + 1 == descs.len();
        let mut b = Vec::new();
        b.extend_from_slice(&d.addr.to_le_bytes());
        b.extend_from_slice(&d.len.to_le_bytes());
        b.extend_from_slice(&(if last { d.flags } else { d.flags | F_NEXT }).to_le_bytes());
        b.extend_from_slice(&(if last { 0 } else { i as u16 + 1 }).to_le_bytes());
        rig.write(table + 16 * i as u64, &b);
    }
}

const F_INDIRECT: u16 = 4;

#[test]
fn indirect_tables_are_followed_through_the_iommu() {
    let mut rig = Rig::new();
    let h = rig.rbuf(&header(req::IN, 40));
    let bufs: Vec<u64> = (0..3).map(|_| rig.buf(512, POISON)).collect();
    let st = rig.buf(1, POISON);
    let mut descs = vec![r(h, 16)];
    descs.extend(bufs.iter().map(|&b| w(b, 512)));
    descs.push(w(st, 1));
    let table = rig.buf(16 * descs.len(), 0);
    indirect_table(&rig, table, &descs);
    let len = 16 * descs.len() as u32;
    assert_eq!(
        rig.submit(&[D {
            addr: table,
            len,
            flags: F_INDIRECT
        }]),
        3 * 512 + 1
    );
    assert_eq!(rig.read(st, 1)[0], status::OK);
    let got: Vec<u8> = bufs.iter().flat_map(|&b| rig.read(b, 512)).collect();
    assert_eq!(got, expected(40, 3));
    // The same table copied into the read-only window (Linux maps indirect tables
    // device-readable only): still fine.
    let bytes = rig.read(table, len as usize);
    rig.bed.write_phys(rig.ro_phys + 0x8000, &bytes).unwrap();
    assert_eq!(
        rig.submit(&[D {
            addr: IOVA_RO + 0x8000,
            len,
            flags: F_INDIRECT
        }]),
        3 * 512 + 1
    );
    assert!(rig.events().is_empty());
    // A table at an unmapped IOVA: the chain is cut short, returned unwritten, one fault.
    assert_eq!(
        rig.submit(&[D {
            addr: UNMAPPED,
            len,
            flags: F_INDIRECT
        }]),
        0
    );
    let ev = rig.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].address, Some(UNMAPPED));
    // A nested indirect descriptor, and a table length not a multiple of 16: cut short.
    let nested = rig.buf(32, 0);
    indirect_table(
        &rig,
        nested,
        &[
            r(h, 16),
            D {
                addr: table,
                len,
                flags: F_INDIRECT,
            },
        ],
    );
    assert_eq!(
        rig.submit(&[D {
            addr: nested,
            len: 32,
            flags: F_INDIRECT
        }]),
        0
    );
    assert_eq!(
        rig.submit(&[D {
            addr: table,
            len: len - 1,
            flags: F_INDIRECT
        }]),
        0
    );
    assert!(!rig.blk.needs_reset());
}

#[test]
fn a_chain_longer_than_the_queue_is_returned() {
    let mut rig = Rig::new();
    // An indirect table of 300 descriptors: more than the queue size.
    let hd = rig.rbuf(&header(req::IN, 0));
    let st = rig.buf(1, POISON);
    let table = rig.buf(300 * 16, 0);
    for i in 0..300u16 {
        let (addr, len, flags) = match i {
            0 => (hd, 16, 0),
            299 => (st, 1, F_WRITE),
            _ => (st, 0, F_WRITE),
        };
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&(len as u32).to_le_bytes());
        let f = if i < 299 { flags | F_NEXT } else { flags };
        d.extend_from_slice(&f.to_le_bytes());
        d.extend_from_slice(&(i + 1).to_le_bytes());
        rig.write(table + 16 * u64::from(i), &d);
    }
    assert_eq!(
        rig.submit(&[D {
            addr: table,
            len: 300 * 16,
            flags: F_INDIRECT
        }]),
        0
    );
    assert_eq!(rig.read(st, 1)[0], POISON);
}

#[test]
fn unreachable_rings_set_needs_reset_once() {
    for setup in [
        QueueSetup {
            avail_ring: UNMAPPED,
            ..Rig::setup()
        },
        QueueSetup {
            used_ring: UNMAPPED,
            ..Rig::setup()
        },
        // Used ring in the read-only window: reads work, the used-ring write faults.
        QueueSetup {
            used_ring: IOVA_RO,
            ..Rig::setup()
        },
    ] {
        let mut rig = Rig::idle(BlkOptions::default());
        assert_ne!(rig.negotiate(None) & dev::FEATURES_OK, 0);
        rig.blk.activate_queue(0, setup).unwrap();
        rig.blk
            .write_status(dev::ACKNOWLEDGE | dev::DRIVER | dev::FEATURES_OK | dev::DRIVER_OK);
        // Requests in the (mapped) default rings: only reachable when avail is.
        let h = rig.rbuf(&header(req::IN, 0));
        let st = rig.buf(1, POISON);
        rig.post(&[r(h, 16), w(st, 1)]);
        let faults = rig.bed.device().counters().faults_raised;
        rig.blk.notify(0);
        assert!(rig.blk.needs_reset(), "{setup:?}");
        assert_eq!(
            rig.causes.lock().unwrap().last(),
            Some(&InterruptCause::Config)
        );
        assert_ne!(rig.blk.interrupt_status() & 2, 0);
        assert_eq!(rig.bed.device().counters().faults_raised, faults + 1);
        // Further notifications do nothing: no spin, no new fault.
        for _ in 0..10 {
            rig.blk.notify(0);
            assert_eq!(rig.blk.service(), 0);
        }
        assert!(!rig.blk.pending());
        assert_eq!(rig.bed.device().counters().faults_raised, faults + 1);
        assert_eq!(rig.blk.counters().needs_reset, 1);
        // Reset clears it.
        rig.blk.write_status(0);
        assert_eq!(rig.blk.status(), 0);
        assert_eq!(rig.blk.interrupt_status(), 0);
    }
}

#[test]
fn a_descriptor_table_out_of_reach_truncates_the_chain() {
    let mut rig = Rig::idle(BlkOptions::default());
    rig.negotiate(None);
    rig.blk
        .activate_queue(
            0,
            QueueSetup {
                desc_table: UNMAPPED,
                ..Rig::setup()
            },
        )
        .unwrap();
    rig.blk
        .write_status(dev::ACKNOWLEDGE | dev::DRIVER | dev::FEATURES_OK | dev::DRIVER_OK);
    rig.make_available(0);
    rig.blk.notify(0);
    assert!(!rig.blk.needs_reset());
    assert_eq!(rig.used_idx(), 1);
    assert_eq!(rig.used(0), (0, 0));
    assert_eq!(rig.events().len(), 1);
}

#[test]
fn an_available_index_beyond_the_queue_size_needs_reset() {
    let mut rig = Rig::new();
    rig.write(IOVA + AVAIL + 2, &(QSIZE + 1).to_le_bytes());
    rig.blk.notify(0);
    assert!(rig.blk.needs_reset());
    assert_eq!(rig.used_idx(), 0);
}

#[test]
fn work_per_round_is_bounded_and_owed_rounds_finish_it() {
    let mut rig = Rig::with(
        BlkOptions {
            max_requests_per_notify: 4,
            ..BlkOptions::default()
        },
        None,
    );
    for _ in 0..10 {
        let h = rig.rbuf(&header(req::FLUSH, 0));
        let st = rig.buf(1, POISON);
        rig.post(&[r(h, 16), w(st, 1)]);
    }
    rig.blk.notify(0);
    assert_eq!(rig.used_idx(), 4);
    assert!(rig.blk.pending());
    assert_eq!(rig.blk.service(), 4);
    assert!(rig.blk.pending());
    assert_eq!(rig.blk.service(), 2);
    assert!(!rig.blk.pending());
    assert_eq!(rig.blk.service(), 0);
    assert_eq!(rig.used_idx(), 10);
    // One interrupt per round that used buffers.
    assert_eq!(*rig.causes.lock().unwrap(), [InterruptCause::Queue(0); 3]);
    assert_eq!(rig.blk.interrupt_status(), 1);
    rig.blk.ack_interrupt(1);
    assert_eq!(rig.blk.interrupt_status(), 0);
}

#[test]
fn no_interrupt_flag_suppresses_the_interrupt() {
    let mut rig = Rig::new();
    rig.write(IOVA + AVAIL, &1u16.to_le_bytes());
    assert_eq!(rig.simple(req::FLUSH, 0).0, status::OK);
    assert!(rig.causes.lock().unwrap().is_empty());
    assert_eq!(rig.blk.interrupt_status(), 0);
    rig.write(IOVA + AVAIL, &0u16.to_le_bytes());
    assert_eq!(rig.simple(req::FLUSH, 0).0, status::OK);
    assert_eq!(*rig.causes.lock().unwrap(), [InterruptCause::Queue(0)]);
}

#[test]
fn nothing_is_processed_before_driver_ok_or_after_reset() {
    let mut rig = Rig::idle(BlkOptions::default());
    rig.negotiate(None);
    rig.blk.activate_queue(0, Rig::setup()).unwrap();
    let h = rig.rbuf(&header(req::FLUSH, 0));
    let st = rig.buf(1, POISON);
    rig.post(&[r(h, 16), w(st, 1)]);
    rig.blk.notify(0);
    assert_eq!(rig.used_idx(), 0);
    rig.blk
        .write_status(dev::ACKNOWLEDGE | dev::DRIVER | dev::FEATURES_OK | dev::DRIVER_OK);
    // The driver cannot set DEVICE_NEEDS_RESET.
    rig.blk.write_status(dev::DEVICE_NEEDS_RESET);
    assert!(!rig.blk.needs_reset());
    rig.blk.notify(0);
    assert_eq!(rig.used_idx(), 1);
    rig.blk.write_status(0);
    rig.post(&[r(h, 16), w(st, 1)]);
    rig.blk.notify(0);
    assert_eq!(rig.used_idx(), 1, "reset: queue no longer ready");
    assert_eq!(rig.blk.driver_features(), 0);
    // Other queue indexes are ignored.
    rig.blk.notify(1);
    rig.blk.notify(u16::MAX);
}

#[test]
fn a_whole_disk_read_matches_the_file_digest() {
    let mut rig = Rig::new();
    let mut hasher = Sha256::new();
    // 64 KiB per request in 16 descriptors of 4 KiB.
    let per = 64 << 10;
    for req_no in 0..(2048 * 512 / per) as u64 {
        let h = rig.rbuf(&header(req::IN, req_no * (per as u64 / 512)));
        let bufs: Vec<u64> = (0..16).map(|_| rig.buf(4096, POISON)).collect();
        let st = rig.buf(1, POISON);
        let mut descs = vec![r(h, 16)];
        descs.extend(bufs.iter().map(|&b| w(b, 4096)));
        descs.push(w(st, 1));
        assert_eq!(rig.submit(&descs), per as u32 + 1);
        assert_eq!(rig.read(st, 1)[0], status::OK);
        for b in bufs {
            hasher.update(rig.read(b, 4096));
        }
    }
    let file = rig.disk.contents();
    let want = Sha256::digest(&file[..2048 * 512]);
    assert_eq!(hasher.finalize(), want);
    assert_eq!(rig.blk.counters().bytes_read, 2048 * 512);
    assert!(rig.events().is_empty());
}

/// Throughput figure (run with `--release --ignored --nocapture`): a 64 MiB disk read whole
/// in 1 MiB requests of 256 descriptors of 4 KiB, every access translated; the digest must
/// match the file's.
#[test]
#[ignore]
fn throughput_of_a_whole_disk_read() {
    const LEN: u64 = 64 << 20;
    let rig = Rig::idle_with_disk(BlkOptions::default(), TempDisk::with_len(LEN));
    let mut rig = rig.start(None);
    let mut hasher = Sha256::new();
    let per: u64 = 1 << 20;
    // 253 data buffers of 4 KiB and one of 12 KiB (1 MiB, 256 descriptors with the header and
    // the status), reused by every request.
    let bufs: Vec<u64> = (0..253).map(|_| rig.buf(4096, 0)).collect();
    let tail = rig.buf(12288, 0);
    let st = rig.buf(1, POISON);
    let mut elapsed = std::time::Duration::ZERO;
    for n in 0..LEN / per {
        let h = rig.rbuf(&header(req::IN, n * per / 512));
        let mut descs = vec![r(h, 16)];
        descs.extend(bufs.iter().map(|&b| w(b, 4096)));
        descs.push(w(tail, 12288));
        descs.push(w(st, 1));
        let start = std::time::Instant::now();
        assert_eq!(rig.submit(&descs), per as u32 + 1);
        elapsed += start.elapsed();
        for &b in &bufs {
            hasher.update(rig.read(b, 4096));
        }
        hasher.update(rig.read(tail, 12288));
    }
    let want = Sha256::digest(rig.disk.contents());
    assert_eq!(hasher.finalize(), want);
    eprintln!(
        "blk: {} MiB read in {:?} of device time (posting and notifying): {:.0} MiB/s",
        LEN >> 20,
        elapsed,
        (LEN >> 20) as f64 / elapsed.as_secs_f64()
    );
    // 4 KiB reads, one request per notification, three descriptors each.
    let d = bufs[0];
    let n = 20_000u64;
    let start = std::time::Instant::now();
    for i in 0..n {
        let h = rig.rbuf(&header(req::IN, (i * 8 * 7919) % (LEN / 512 - 8)));
        rig.submit(&[r(h, 16), w(d, 4096), w(st, 1)]);
    }
    let t = start.elapsed();
    eprintln!(
        "blk: {n} reads of 4 KiB in {t:?}: {:.0} requests/s ({:.1} µs each, ring and buffer \
         translations included)",
        n as f64 / t.as_secs_f64(),
        t.as_secs_f64() * 1e6 / n as f64
    );
    assert_eq!(rig.blk.counters().ok, LEN / per + n);
}

#[test]
fn through_a_shared_core() {
    let rig = Rig::idle(BlkOptions::default());
    let shared = Arc::new(Mutex::new(rig.blk));
    let core = shared.clone();
    assert_eq!(VirtioCore::device_id(&core), 2);
    assert_eq!(VirtioCore::queue_max_size(&core, 0), 256);
    assert_eq!(shared.lock().unwrap().endpoint(), EP);
}

/// Deterministic pseudo-random chains: random addresses (mapped, read-only, unmapped, near
/// 2^64), lengths, flags and `next` indexes. The device never panics and always either uses
/// every chain or sets DEVICE_NEEDS_RESET.
#[test]
fn random_chains_never_panic() {
    let mut rig = Rig::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let hdrs: Vec<u64> = [req::IN, req::OUT, req::FLUSH, req::GET_ID, 77]
        .iter()
        .map(|&t| rig.rbuf(&header(t, 0)))
        .collect();
    for round in 0..300 {
        let n = (rnd() % 6 + 1) as u16;
        let head = (rnd() % u64::from(QSIZE - 8)) as u16;
        for i in 0..n {
            let addr = match rnd() % 6 {
                0 => hdrs[(rnd() % 5) as usize],
                1 => IOVA + DATA + rnd() % (WINDOW - DATA - 0x1_0000),
                2 => IOVA_RO + rnd() % RO_SIZE,
                3 => UNMAPPED,
                4 => u64::MAX - rnd() % 4096,
                _ => rnd(),
            };
            let len = match rnd() % 4 {
                0 => 16,
                1 => 1,
                2 => (rnd() % 4096) as u32,
                _ => rnd() as u32,
            };
            let flags = (rnd() % 8) as u16 & !4 | if i + 1 < n { F_NEXT } else { 0 };
            let next = if rnd() % 8 == 0 {
                rnd() as u16
            } else {
                head + i + 1
            };
            rig.write_desc(head + i, addr, len, flags, next);
        }
        let before = rig.used_idx();
        rig.make_available(head);
        rig.blk.notify(0);
        while rig.blk.pending() {
            rig.blk.service();
        }
        assert!(
            rig.used_idx() == before.wrapping_add(1) || rig.blk.needs_reset(),
            "round {round}"
        );
        assert!(!rig.blk.needs_reset(), "round {round}: rings are mapped");
        rig.events();
    }
    let c = rig.blk.counters();
    assert_eq!(c.requests, 300);
    assert_eq!(c.requests, c.ok + c.ioerr + c.unsupp + c.unanswered);
}
