//! The guest driver's interrupt side against this device through the in-process virtio-mmio
//! transport: which requests raise a used-buffer interrupt (VIRTQ_AVAIL_F_NO_INTERRUPT, virtio
//! §2.7.7), what `ack_interrupt` reports and clears (InterruptStatus / InterruptACK, §4.2.2),
//! and `handle_interrupt` collecting non-blocking completions and fault reports.

use virtio_iommu_device::device::INT_VRING;
use virtio_iommu_device::inprocess::TestBed;
use virtio_iommu_device::{DeviceConfig, DmaError};
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{BatchOp, FaultReason, NbRequest};

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);

fn bed() -> TestBed {
    TestBed::new(DeviceConfig::builder().endpoints([8, 16]).build().unwrap())
}

#[test]
fn ack_reads_the_used_buffer_interrupt_once_and_clears_it() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    let r = drv.handle_interrupt(|_| panic!("no fault")).unwrap();
    assert!(
        !r.queue_interrupt && !r.config_changed && r.completed == 0,
        "nothing pending: not this device's interrupt: {r:?}"
    );
    drv.enable_interrupts();
    let before = bed.device().counters().interrupts;
    drv.attach(1, 8).unwrap();
    assert_eq!(bed.device().counters().interrupts, before + 1);
    assert_ne!(bed.device().interrupt_status() & INT_VRING, 0);
    assert!(drv.ack_interrupt().bits() & 1 != 0, "QUEUE_INTERRUPT read");
    assert_eq!(bed.device().interrupt_status(), 0, "and acknowledged");
    assert_eq!(drv.ack_interrupt().bits(), 0, "nothing left after the ack");
    // With interrupts disabled (VIRTQ_AVAIL_F_NO_INTERRUPT) the device does not interrupt
    // (§2.7.7 SHOULD NOT), and the request completes all the same.
    drv.disable_interrupts();
    let page = bed.alloc(4096).unwrap();
    let before = bed.device().counters().interrupts;
    drv.map(1, 0x10_0000, 0x10_0fff, page, RW).unwrap();
    assert_eq!(
        bed.device().counters().interrupts,
        before,
        "no interrupt raised"
    );
    assert_eq!(bed.device().interrupt_status(), 0);
    assert_eq!(drv.ack_interrupt().bits(), 0);
    // Enabled again: the next request interrupts.
    drv.enable_interrupts();
    drv.unmap(1, 0x10_0000, 0x10_0fff).unwrap();
    assert_eq!(bed.device().counters().interrupts, before + 1);
}

#[test]
fn handle_interrupt_collects_non_blocking_completions() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    drv.enable_interrupts();
    let page = bed.alloc(4096).unwrap();
    let reqs = [
        NbRequest::Attach {
            domain: 1,
            endpoint: 8,
        },
        NbRequest::Op(BatchOp::Map {
            domain: 1,
            virt_start: 0x20_0000,
            virt_end: 0x20_0fff,
            phys_start: page,
            flags: RW,
        }),
    ];
    let mut tokens = [None; 2];
    drv.submit_nb_many(&reqs, &mut tokens).unwrap();
    // The in-process device completes them on the notification and interrupts.
    assert_ne!(bed.device().interrupt_status() & INT_VRING, 0);
    let r = drv.handle_interrupt(|_| panic!("no fault")).unwrap();
    assert!(r.queue_interrupt);
    assert_eq!(r.completed, 2);
    assert_eq!(drv.nb_in_flight(), 0);
    assert_eq!(bed.device().interrupt_status(), 0);
    for t in tokens {
        assert_eq!(drv.poll_nb(&t.unwrap()), Some(Ok(())));
    }
    // The MAP took effect.
    let ep = bed.dma_endpoint(8).unwrap();
    ep.write(0x20_0010, b"irq").unwrap();
    let mut got = [0u8; 3];
    bed.read_phys(page + 0x10, &mut got).unwrap();
    assert_eq!(&got, b"irq");
}

#[test]
fn a_fault_interrupts_and_handle_interrupt_hands_the_report_over() {
    let bed = bed();
    let mut drv = bed.driver().unwrap();
    drv.attach(1, 8).unwrap();
    let ep = bed.dma_endpoint(8).unwrap();
    // eventq interrupts are on from new().
    let before = bed.device().counters().interrupts;
    assert!(matches!(
        ep.read(0x40_0000, &mut [0u8; 4]),
        Err(DmaError::Fault(_))
    ));
    assert_eq!(bed.device().counters().interrupts, before + 1);
    let mut faults = Vec::new();
    let r = drv.handle_interrupt(|f| faults.push(f)).unwrap();
    assert!(r.queue_interrupt);
    assert_eq!((r.completed, r.faults), (0, 1));
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].reason, FaultReason::Mapping);
    assert_eq!(faults[0].endpoint, 8);
    assert_eq!(faults[0].address, Some(0x40_0000));

    assert_eq!(
        bed.device().interrupt_status(),
        0,
        "acknowledged by the handler"
    );
    // With eventq's interrupts off the report still arrives, found by polling.
    drv.disable_interrupts();
    assert!(ep.read(0x40_0000, &mut [0u8; 4]).is_err());
    assert_eq!(
        drv.poll_event().unwrap().map(|f| f.reason),
        Some(FaultReason::Mapping)
    );
}

#[test]
fn a_non_blocking_probe_completes_in_the_interrupt_handler_with_this_devices_regions() {
    use virtio_iommu_device::config::ResvRegion;
    use virtio_iommu_driver::parse::{ProbeProperty, ReservedRegion, ResvMemKind};
    let config = DeviceConfig::builder()
        .endpoints([8, 16])
        .resv_region(16, ResvRegion::msi(0x0800_0000, 0x0800_ffff))
        .resv_region(16, ResvRegion::reserved(0x1_0000_0000, 0x1_0000_0fff))
        .build()
        .unwrap();
    let bed = TestBed::new(config);
    let mut drv = bed.driver().unwrap();
    drv.enable_interrupts();
    let before = bed.device().counters().interrupts;
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(bed.device().counters().interrupts, before + 1);
    let r = drv.handle_interrupt(|_| panic!("no fault")).unwrap();
    assert!(r.queue_interrupt && r.completed == 1, "{r:?}");
    let mut regions = Vec::new();
    let outcome = drv.poll_probe_nb(&t, |p| {
        if let ProbeProperty::ResvMem(r) = p {
            regions.push(r)
        }
    });
    assert_eq!(outcome, Some(Ok(())));
    assert_eq!(
        regions,
        [
            ReservedRegion {
                kind: ResvMemKind::Msi,
                start: 0x0800_0000,
                end: 0x0800_ffff
            },
            ReservedRegion {
                kind: ResvMemKind::Reserved,
                start: 0x1_0000_0000,
                end: 0x1_0000_0fff
            },
        ]
    );
    // The same as the blocking PROBE.
    assert_eq!(drv.probe_reserved_regions(16).unwrap(), regions);
    // An endpoint the device does not manage: its S_NOENT, for this token only.
    let t = drv.submit_probe_nb(99).unwrap();
    drv.handle_interrupt(|_| {}).unwrap();
    assert_eq!(
        drv.poll_probe_nb(&t, |_| panic!("no properties")),
        Some(Err(virtio_iommu_driver::IommuError::Status(
            virtio_iommu_driver::wire::Status::NoEnt
        )))
    );
    assert!(!drv.is_broken());
}
