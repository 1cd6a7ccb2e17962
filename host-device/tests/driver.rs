//! The project's guest driver (`virtio_iommu_driver::VirtIOIommu`, virtio-drivers 0.13) driving
//! this device through the in-process virtio-mmio transport, with DMA endpoints observing
//! translations and faults.

use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::inprocess::TestBed;
use virtio_iommu_device::{DeviceConfig, DmaError};
use virtio_iommu_driver::wire::{self, Features, MapFlags, Status};
use virtio_iommu_driver::{
    FaultEvent, FaultReason, IommuError, IommuOptions, ReservedRegion, ResvMemKind, WaitPolicy,
    WRITABLE_FILL,
};
use zerocopy::IntoBytes;

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
const MSI: (u64, u64) = (0x0802_0000, 0x0802_0fff);

fn qemu_like() -> DeviceConfig {
    DeviceConfig::builder()
        .endpoints([8, 16, 24])
        .resv_region(16, ResvRegion::msi(MSI.0, MSI.1))
        .resv_region(24, ResvRegion::msi(MSI.0, MSI.1))
        .build()
        .unwrap()
}

fn status(e: Result<(), IommuError>) -> Status {
    match e {
        Ok(()) => Status::Ok,
        Err(IommuError::Status(s)) => s,
        Err(other) => panic!("not a device status: {other:?}"),
    }
}

fn fault(ev: Option<FaultEvent>) -> FaultEvent {
    ev.expect("a fault event")
}

#[test]
fn init_negotiates_features_and_reads_the_config() {
    let bed = TestBed::new(qemu_like());
    let drv = bed.driver().unwrap();
    assert_eq!(
        drv.features(),
        Features::INPUT_RANGE
            | Features::DOMAIN_RANGE
            | Features::MAP_UNMAP
            | Features::PROBE
            | Features::MMIO
            | Features::BYPASS_CONFIG
            | Features::VERSION_1
    );
    assert!(drv
        .offered_features()
        .contains(Features::RING_INDIRECT_DESC));
    let c = drv.config();
    assert_eq!(c.page_size_mask, 0xffff_ffff_ffff_f000);
    assert_eq!(c.granule, 4096);
    assert_eq!(c.input_range, (0, 0xffff_ffff_ffff));
    assert_eq!(c.domain_range, (0, u32::MAX));
    assert_eq!(c.probe_size, 512);
    assert_eq!(drv.bypass(), Some(false));
    let dev = bed.device();
    assert_eq!(dev.negotiated_features(), drv.features());
    assert_eq!(dev.status(), 0xf, "ACK | DRIVER | FEATURES_OK | DRIVER_OK");
    drop(dev);

    let custom = DeviceConfig::builder()
        .endpoint(1)
        .page_size_mask(0xffff_0000)
        .input_range(0x10000, 0xffff_ffff)
        .domain_range(10, 20)
        .probe_size(1024)
        .boot_bypass(true)
        .build()
        .unwrap();
    let bed = TestBed::new(custom);
    let mut drv = bed.driver().unwrap();
    let c = *drv.config();
    assert_eq!(
        (c.granule, c.input_range, c.domain_range, c.probe_size),
        (0x10000, (0x10000, 0xffff_ffff), (10, 20), 1024)
    );
    assert_eq!(drv.bypass(), Some(true));
    assert_eq!(drv.probe_reserved_regions(1).unwrap(), vec![]);
}

#[test]
fn attach_map_dma_unmap_detach() {
    let bed = TestBed::new(qemu_like());
    let mut drv = bed.driver().unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let buf = bed.alloc(0x2000).unwrap();
    drv.attach(1, 8).unwrap();
    drv.map(1, 0x1_0000, 0x1_1fff, buf, RW).unwrap();
    ep.write(0x1_0ffc, b"spans two pages").unwrap();
    let mut got = [0u8; 15];
    bed.read_phys(buf + 0xffc, &mut got).unwrap();
    assert_eq!(&got, b"spans two pages");
    bed.write_phys(buf + 0x1000, b"from memory").unwrap();
    let mut back = [0u8; 11];
    ep.read(0x1_1000, &mut back).unwrap();
    assert_eq!(&back, b"from memory");
    assert!(drv.poll_event().unwrap().is_none(), "no fault so far");

    // Endpoint 16, not attached, bypass 0: blocked (D9), fault R_DOMAIN.
    let other = bed.dma_endpoint(16).unwrap();
    assert!(matches!(
        other.read(buf, &mut back),
        Err(DmaError::Fault(_))
    ));
    let ev = fault(drv.poll_event().unwrap());
    assert_eq!(
        ev,
        FaultEvent {
            reason: FaultReason::Domain,
            read: true,
            write: false,
            endpoint: 16,
            address: Some(buf),
            raw_flags: wire::FAULT_F_READ | wire::FAULT_F_ADDRESS
        }
    );

    // UNMAP: the next access faults with R_MAPPING, WRITE and the address.
    drv.unmap(1, 0x1_0000, 0x1_1fff).unwrap();
    assert!(ep.write(0x1_0010, b"x").is_err());
    let ev = fault(drv.poll_event().unwrap());
    assert_eq!(
        (ev.reason, ev.write, ev.read, ev.endpoint, ev.address),
        (FaultReason::Mapping, true, false, 8, Some(0x1_0010))
    );

    // DETACH the only endpoint: the domain disappears (MAP ⇒ S_NOENT), DMA ⇒ R_DOMAIN.
    drv.map(1, 0x1_0000, 0x1_0fff, buf, RW).unwrap();
    drv.detach(1, 8).unwrap();
    assert_eq!(
        status(drv.map(1, 0x2_0000, 0x2_0fff, buf, RW)),
        Status::NoEnt
    );
    assert!(ep.read(0x1_0000, &mut back).is_err(), "D21");
    assert_eq!(fault(drv.poll_event().unwrap()).reason, FaultReason::Domain);
    assert_eq!(bed.device().state().mapping_count(), 0);
    assert_eq!(drv.event_stats().delivered, 3);
}

#[test]
fn permissions_are_enforced_per_direction() {
    let bed = TestBed::new(qemu_like());
    let mut drv = bed.driver().unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let buf = bed.alloc(0x3000).unwrap();
    drv.attach(2, 8).unwrap();
    drv.map(2, 0x1000, 0x1fff, buf, MapFlags::READ).unwrap();
    drv.map(2, 0x2000, 0x2fff, buf + 0x1000, MapFlags::WRITE)
        .unwrap();
    drv.map(2, 0x3000, 0x3fff, buf + 0x2000, MapFlags::empty())
        .unwrap();
    let mut b = [0u8; 4];
    ep.read(0x1000, &mut b).unwrap();
    assert!(
        ep.write(0x1000, &b).is_err(),
        "D27: no write to a READ mapping"
    );
    let ev = fault(drv.poll_event().unwrap());
    assert_eq!((ev.write, ev.read, ev.raw_flags), (true, false, 0x102));
    ep.write(0x2000, &b).unwrap();
    assert!(
        ep.read(0x2000, &mut b).is_err(),
        "WRITE-only: reads refused"
    );
    assert_eq!(fault(drv.poll_event().unwrap()).raw_flags, 0x101);
    assert!(ep.read(0x3000, &mut b).is_err());
    assert!(ep.write(0x3000, &b).is_err());
    assert_eq!(drv.event_stats().delivered, 1 + 1);
    assert!(drv.poll_event().unwrap().is_some());
    assert!(drv.poll_event().unwrap().is_some());
    assert!(drv.poll_event().unwrap().is_none());
}

#[test]
fn every_status_the_device_uses() {
    let cfg = DeviceConfig::builder()
        .endpoints([8, 16, 24, 32])
        .resv_region(16, ResvRegion::msi(MSI.0, MSI.1))
        .max_domains(3)
        .max_mappings(3)
        .build()
        .unwrap();
    let bed = TestBed::new(cfg);
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    assert_eq!(status(drv.attach(1, 99)), Status::NoEnt, "D12");
    drv.attach(1, 8).unwrap();
    assert_eq!(status(drv.attach_bypass(1, 24)), Status::Inval, "D14");
    assert_eq!(
        bed.device().state().endpoint_domain(24),
        None,
        "no side effect (QEMU detaches the endpoint from its old domain first, observed)"
    );
    drv.map(1, 0x1000, 0x1fff, pa, RW).unwrap();
    assert_eq!(
        status(drv.map(1, 0x1000, 0x1fff, pa, RW)),
        Status::Inval,
        "D23"
    );
    assert_eq!(
        status(drv.map(1, MSI.0, MSI.1, pa, RW)),
        Status::Ok,
        "endpoint 8 has no MSI region"
    );
    assert_eq!(
        status(drv.attach(1, 16)),
        Status::Unsupp,
        "D16: 16's MSI region is mapped in domain 1"
    );
    drv.unmap(1, MSI.0, MSI.1).unwrap();
    drv.attach(1, 16).unwrap();
    assert_eq!(
        status(drv.map(1, MSI.0, MSI.1, pa, RW)),
        Status::Inval,
        "D44"
    );
    drv.map(1, 0x2000, 0x3fff, pa, RW).unwrap();
    assert_eq!(status(drv.unmap(1, 0x1000, 0x2fff)), Status::Range, "D31");
    assert_eq!(bed.device().state().mapping_count(), 2, "nothing removed");
    drv.map(1, 0x4000, 0x4fff, pa, RW).unwrap();
    assert_eq!(
        status(drv.map(1, 0x5000, 0x5fff, pa, RW)),
        Status::NoMem,
        "max_mappings"
    );
    drv.attach_bypass(2, 24).unwrap();
    assert_eq!(
        status(drv.map(2, 0x1000, 0x1fff, pa, RW)),
        Status::Inval,
        "D26"
    );
    assert_eq!(status(drv.unmap(2, 0x1000, 0x1fff)), Status::Inval, "D30");
    drv.attach(3, 32).unwrap();
    drv.detach(2, 24).unwrap();
    drv.attach(4, 24).unwrap();
    assert_eq!(
        status(drv.attach(5, 24)),
        Status::Ok,
        "moving the only endpoint frees its domain"
    );
    assert_eq!(
        status(drv.attach(6, 8)),
        Status::NoMem,
        "16 stays in domain 1: a 4th domain"
    );
    assert_eq!(
        bed.device().state().endpoint_domain(8),
        Some(1),
        "no side effect"
    );
    drv.detach(1, 16).unwrap();
    assert_eq!(
        status(drv.attach(6, 8)),
        Status::Ok,
        "8 was the last of domain 1"
    );
    assert!(bed.device().state().domain(1).is_none());
}

#[test]
fn detach_and_unmap_errors() {
    let bed = TestBed::new(qemu_like());
    let mut drv = bed.driver().unwrap();
    assert_eq!(status(drv.detach(1, 99)), Status::NoEnt, "D19");
    assert_eq!(
        status(drv.detach(1, 8)),
        Status::Inval,
        "D20: never attached (QEMU 10 says NOENT)"
    );
    drv.attach(1, 8).unwrap();
    assert_eq!(status(drv.detach(2, 8)), Status::Inval, "D20: other domain");
    assert_eq!(status(drv.unmap(9, 0x1000, 0x1fff)), Status::NoEnt, "D29");
    assert_eq!(
        status(drv.unmap(1, 0x1000, 0x1fff)),
        Status::Ok,
        "D32: nothing to unmap"
    );
    drv.detach(1, 8).unwrap();
    assert_eq!(status(drv.detach(1, 8)), Status::Inval);
}

#[test]
fn raw_requests_through_the_driver() {
    let bed = TestBed::new(qemu_like());
    let mut drv = bed.driver().unwrap();
    drv.attach(1, 8).unwrap();
    // Unknown type: returned with used length 0 (D7), nothing written.
    let mut bad = wire::ReqDetach::default();
    bad.head.type_ = 0x42;
    let mut tail = [0u8; 4];
    assert_eq!(drv.request_raw(&[bad.as_bytes()], &[4], &mut tail), Ok(0));
    assert_eq!(tail, [WRITABLE_FILL; 4], "the driver's fill, untouched");
    // Unaligned MAP, which the driver itself refuses to send: S_RANGE (D22).
    let req = wire::ReqMap {
        head: wire::ReqHead::new(wire::RequestType::Map),
        domain: 1.into(),
        virt_start: 0x1010.into(),
        virt_end: 0x200f.into(),
        phys_start: 0x4000_0000.into(),
        flags: 3.into(),
    };
    assert_eq!(drv.request_raw(&[req.as_bytes()], &[4], &mut tail), Ok(4));
    assert_eq!(tail, [Status::Range as u8, 0, 0, 0]);
    // ATTACH with reserved bytes set: S_INVAL (D10).
    let mut a = wire::ReqAttach {
        head: wire::ReqHead::new(wire::RequestType::Attach),
        domain: 2.into(),
        endpoint: 16.into(),
        ..Default::default()
    };
    a.reserved = [9, 0, 0, 0];
    assert_eq!(drv.request_raw(&[a.as_bytes()], &[4], &mut tail), Ok(4));
    assert_eq!(tail[0], Status::Inval as u8);
    // A longer writable part: the tail is at its end.
    let mut long = [0xffu8; 8];
    a.reserved = [0; 4];
    assert_eq!(drv.request_raw(&[a.as_bytes()], &[8], &mut long), Ok(8));
    assert_eq!(long, [0, 0, 0, 0, Status::Ok as u8, 0, 0, 0]);
    // Short tail and short head: used length 0.
    let mut three = [0u8; 3];
    assert_eq!(drv.request_raw(&[a.as_bytes()], &[3], &mut three), Ok(0));
    assert_eq!(
        drv.request_raw(&[&a.as_bytes()[..3]], &[4], &mut tail),
        Ok(0)
    );
    // The driver still works.
    drv.detach(2, 16).unwrap();
    assert!(!drv.is_broken());
}

#[test]
fn requests_split_by_the_driver_over_many_descriptors() {
    let bed = TestBed::new(qemu_like());
    let mut drv = bed.driver().unwrap();
    drv.attach(1, 8).unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    let mut n = 0u64;
    for parts in 1..=16usize {
        for w_parts in 1..=4usize {
            let iova = 0x10_0000 + n * 0x1000;
            n += 1;
            let req = wire::ReqMap {
                head: wire::ReqHead::new(wire::RequestType::Map),
                domain: 1.into(),
                virt_start: iova.into(),
                virt_end: (iova + 0xfff).into(),
                phys_start: pa.into(),
                flags: 3.into(),
            };
            let bytes = req.as_bytes();
            // `parts` pieces of the 36 readable bytes, the last taking the remainder.
            let step = bytes.len() / parts;
            let mut pieces: Vec<&[u8]> = (0..parts - 1)
                .map(|i| &bytes[i * step..(i + 1) * step])
                .collect();
            pieces.push(&bytes[(parts - 1) * step..]);
            let mut lens = vec![1usize; w_parts - 1];
            lens.push(4 - (w_parts - 1));
            let mut tail = [0xffu8; 4];
            assert_eq!(
                drv.request_raw(&pieces, &lens, &mut tail),
                Ok(4),
                "{parts}/{w_parts}"
            );
            assert_eq!(tail, [0, 0, 0, 0], "S_OK");
        }
    }
    assert_eq!(bed.device().state().mapping_count(), 64);
    // PROBE with the properties split in two and the tail in its own descriptor.
    let p = wire::ReqProbe {
        endpoint: 16.into(),
        ..Default::default()
    };
    let mut reply = vec![0u8; 516];
    assert_eq!(
        drv.request_raw(
            &[&p.as_bytes()[..40], &p.as_bytes()[40..]],
            &[100, 412, 4],
            &mut reply
        ),
        Ok(516)
    );
    assert_eq!(&reply[..4], &[1, 0, 20, 0]);
    assert_eq!(reply[512], 0);
}

#[test]
fn probe_reports_reserved_regions() {
    let cfg = DeviceConfig::builder()
        .endpoints([8, 16])
        .resv_region(16, ResvRegion::msi(MSI.0, MSI.1))
        .resv_region(16, ResvRegion::reserved(0xfee0_0000, 0xfeef_ffff))
        .build()
        .unwrap();
    // RAM covering the MSI doorbell, so that identity accesses to it reach memory.
    let bed = TestBed::with_ram(cfg, 0x0800_0000, 16 << 20).unwrap();
    let mut drv = bed.driver().unwrap();
    assert_eq!(
        drv.probe_reserved_regions(16).unwrap(),
        vec![
            ReservedRegion {
                kind: ResvMemKind::Msi,
                start: MSI.0,
                end: MSI.1
            },
            ReservedRegion {
                kind: ResvMemKind::Reserved,
                start: 0xfee0_0000,
                end: 0xfeef_ffff
            },
        ]
    );
    assert_eq!(drv.probe_reserved_regions(8).unwrap(), vec![]);
    assert_eq!(
        drv.probe_reserved_regions(7),
        Err(IommuError::Status(Status::NoEnt)),
        "D34"
    );
    // MSI is identity-mapped for the endpoint whatever its attachment; RESERVED always faults.
    let ep = bed.dma_endpoint(16).unwrap();
    ep.write(MSI.0 + 0x40, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    bed.read_phys(MSI.0 + 0x40, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    drv.attach(1, 16).unwrap();
    ep.write(MSI.0, &[5]).unwrap();
    assert!(drv.poll_event().unwrap().is_none());
    let other = bed.dma_endpoint(8).unwrap();
    assert!(
        other.write(MSI.0, &[5]).is_err(),
        "the region is endpoint 16's only"
    );
    assert!(drv.poll_event().unwrap().is_some());
    drv.set_bypass(true).unwrap();
    assert!(
        ep.read(0xfee0_0000, &mut b).is_err(),
        "RESERVED even in bypass"
    );
    let ev = fault(drv.poll_event().unwrap());
    assert_eq!(
        (ev.reason, ev.address),
        (FaultReason::Mapping, Some(0xfee0_0000))
    );
}

#[test]
fn bypass_config_and_bypass_domains() {
    let bed = TestBed::new(qemu_like());
    let mut drv = bed.driver().unwrap();
    let pa = bed.alloc(0x1000).unwrap();
    bed.write_phys(pa, b"identity").unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let mut b = [0u8; 8];
    assert!(ep.read(pa, &mut b).is_err(), "bypass 0: blocked");
    drv.set_bypass(true).unwrap();
    assert_eq!(drv.bypass(), Some(true));
    ep.read(pa, &mut b).unwrap();
    assert_eq!(&b, b"identity");
    // Attached to a normal domain: translated regardless of bypass.
    drv.attach(1, 8).unwrap();
    assert!(ep.read(pa, &mut b).is_err());
    drv.detach(1, 8).unwrap();
    ep.read(pa, &mut b).unwrap();
    drv.set_bypass(false).unwrap();
    assert!(ep.read(pa, &mut b).is_err());
    // A bypass domain (ATTACH_F_BYPASS).
    drv.attach_bypass(5, 8).unwrap();
    ep.write(pa, b"BYPASSED").unwrap();
    bed.read_phys(pa, &mut b).unwrap();
    assert_eq!(&b, b"BYPASSED");
    assert!(bed.device().state().is_bypass(8));
    assert_eq!(
        bed.device().config_generation(),
        2,
        "generation follows bypass writes"
    );
}

#[test]
fn device_reset_detaches_everything_and_keeps_bypass() {
    let cfg = DeviceConfig::builder()
        .endpoints([8])
        .boot_bypass(true)
        .build()
        .unwrap();
    let bed = TestBed::new(cfg);
    let pa = bed.alloc(0x1000).unwrap();
    {
        let mut drv = bed.driver().unwrap();
        drv.set_bypass(false).unwrap();
        drv.attach(1, 8).unwrap();
        drv.map(1, 0x1000, 0x1fff, pa, RW).unwrap();
    } // drop: the driver resets the device (status 0)
    assert_eq!(bed.device().state().domain_count(), 0);
    let mut drv = bed.driver().unwrap();
    assert_eq!(drv.bypass(), Some(false), "D4: not changed by device reset");
    assert_eq!(
        status(drv.detach(1, 8)),
        Status::Inval,
        "endpoints detached on reset"
    );
    let ep = bed.dma_endpoint(8).unwrap();
    let mut b = [0u8; 4];
    assert!(ep.read(0x1000, &mut b).is_err());
    assert_eq!(fault(drv.poll_event().unwrap()).reason, FaultReason::Domain);
    drop(drv);
    bed.device().system_reset();
    let drv = bed.driver().unwrap();
    assert_eq!(drv.bypass(), Some(true), "D4: restored on system reset");
}

#[test]
fn legacy_bypass_feature_when_offered_and_accepted() {
    let cfg = DeviceConfig::builder()
        .endpoints([8])
        .feature(Features::BYPASS_CONFIG, false)
        .feature(Features::BYPASS, true)
        .build()
        .unwrap();
    let bed = TestBed::new(cfg);
    let pa = bed.alloc(0x1000).unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let mut b = [0u8; 4];
    {
        let drv = bed.driver().unwrap();
        assert!(!drv.features().contains(Features::BYPASS));
        assert!(ep.read(pa, &mut b).is_err(), "not negotiated: blocked");
    }
    let opts = IommuOptions {
        accept_legacy_bypass: true,
        ..IommuOptions::default()
    };
    let mut drv = bed.driver_with(opts).unwrap();
    assert!(drv.features().contains(Features::BYPASS));
    ep.read(pa, &mut b).unwrap();
    assert_eq!(drv.bypass(), None);
    assert!(matches!(
        drv.attach_bypass(1, 8),
        Err(IommuError::NotNegotiated(_))
    ));
}

#[test]
fn invalid_config_write_sets_needs_reset_and_the_driver_sees_it() {
    let bed = TestBed::new(qemu_like());
    let opts = IommuOptions {
        wait: WaitPolicy {
            max_polls: 10_000,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    };
    let mut drv = bed.driver_with(opts).unwrap();
    // R2: the driver MUST NOT write other fields; the device goes NEEDS_RESET.
    drv.transport_mut()
        .write_config_space(wire::config_offset::PROBE_SIZE, 4096u32)
        .unwrap();
    assert!(drv
        .transport_mut()
        .get_status()
        .contains(DeviceStatus::DEVICE_NEEDS_RESET));
    assert_eq!(bed.device().config().probe_size(), 512);
    assert_eq!(drv.attach(1, 8), Err(IommuError::DeviceNeedsReset));
    assert!(drv.is_broken());
    drop(drv);
    // A new driver resets the device and works again.
    let mut drv = bed.driver().unwrap();
    drv.attach(1, 8).unwrap();
    drv.transport_mut()
        .write_config_space(wire::config_offset::BYPASS, 2u8)
        .unwrap();
    assert!(bed.device().needs_reset(), "R3: bypass must be 0 or 1");
}

#[test]
fn faults_wait_for_buffers_and_overflow_is_counted() {
    let cfg = DeviceConfig::builder()
        .endpoints([8])
        .max_pending_faults(8)
        .build()
        .unwrap();
    let bed = TestBed::new(cfg);
    let mut drv = bed.driver().unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    let mut b = [0u8; 1];
    // The driver keeps 64 buffers posted; 64 + 8 faults fill them and the pending queue.
    for i in 0..80u64 {
        assert!(ep.read(0x1000 + i, &mut b).is_err());
    }
    {
        let dev = bed.device();
        assert_eq!(dev.counters().faults_delivered, 64);
        assert_eq!(dev.pending_faults(), 8);
        assert_eq!(dev.counters().faults_dropped, 8);
    }
    let mut addresses = Vec::new();
    while let Some(ev) = drv.poll_event().unwrap() {
        addresses.push(ev.address.unwrap());
    }
    // Each poll re-posts a buffer and notifies: the pending faults follow, in order.
    assert_eq!(addresses, (0..72).map(|i| 0x1000 + i).collect::<Vec<_>>());
    assert_eq!(bed.device().pending_faults(), 0);
}

#[test]
fn tests_in_parallel_threads_have_their_own_memory() {
    let handles: Vec<_> = (0..4u32)
        .map(|t| {
            std::thread::spawn(move || {
                let bed = TestBed::new(qemu_like());
                let mut drv = bed.driver().unwrap();
                let ep = bed.dma_endpoint(8).unwrap();
                let pa = bed.alloc(0x1000).unwrap();
                for i in 0..50u64 {
                    let iova = 0x10_0000 + i * 0x1000;
                    drv.attach(t + 1, 8).unwrap();
                    drv.map(t + 1, iova, iova + 0xfff, pa, RW).unwrap();
                    ep.write(iova + 8, &t.to_le_bytes()).unwrap();
                    drv.unmap(t + 1, iova, iova + 0xfff).unwrap();
                }
                let mut b = [0u8; 4];
                bed.read_phys(pa + 8, &mut b).unwrap();
                assert_eq!(u32::from_le_bytes(b), t);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Regression (defect 1): with `max_requests_per_notify` 4, a batch of 8 MAPs posted with one
/// notification used to get only 4 answers; the driver polls and never notifies again, so it
/// timed out. Every chain available at a notification is now processed, in rounds of 4.
#[test]
fn a_batch_larger_than_the_per_round_cap_completes() {
    let config = DeviceConfig::builder()
        .endpoints([8])
        .max_requests_per_notify(4)
        .build()
        .unwrap();
    let bed = TestBed::new(config);
    let options = IommuOptions {
        wait: WaitPolicy {
            max_polls: 100_000,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    };
    let mut drv = bed.driver_with(options).unwrap();
    drv.attach(1, 8).unwrap();
    let buf = bed.alloc(8 * 4096).unwrap();
    let mut batch = drv.batch();
    for i in 0..8u64 {
        batch
            .map(
                1,
                0x10_0000 + i * 0x1000,
                0x10_0fff + i * 0x1000,
                buf + i * 4096,
                RW,
            )
            .unwrap();
    }
    let result = batch.submit().expect("every MAP of the batch is answered");
    assert_eq!(result.len(), 8);
    assert_eq!(result.failures(), 0);
    assert_eq!(
        result.notifications(),
        1,
        "one notification for the whole batch"
    );
    assert_eq!(bed.device().state().mapping_count(), 8);
    assert_eq!(
        bed.device().counters().requests_deferred,
        1,
        "two rounds of 4"
    );
    assert!(!bed.device().requestq_pending());
}
