//! A hostile device against the real `VirtIOIommu` (on the fake device of `common`): a config
//! generation that never settles, a reset that never completes, an eventq flooded with malformed
//! reports, completions that write nothing, and used elements for requests that are not in
//! flight. Every case must end in bounded time with a typed error or the documented result:
//! the cases that used to hang run on a watchdog thread.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{dma_live_pages, Behaviour, FakeDevice, FakeHal, FakeTransport};
use virtio_drivers::transport::DeviceStatus;
use virtio_iommu_driver::wire::{Features, MapFlags, Status};
use virtio_iommu_driver::{
    FaultReason, IommuError, IommuOptions, ProbeProperty, ResvMemKind, VirtIOIommu, WaitPolicy,
    EVENTQ_SIZE, WRITABLE_FILL,
};

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
const G: u64 = 0x1000;

type Driver = VirtIOIommu<FakeHal, FakeTransport>;

/// Runs `f` on another thread and fails the test if it has not returned within 20 s (the
/// defects these tests catch made the driver spin forever).
fn within_20s<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}: still running after 20 s (unbounded loop)"))
}

fn options(max_polls: u64) -> IommuOptions {
    IommuOptions {
        wait: WaitPolicy {
            max_polls,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    }
}

/// A device and a driver with endpoint 16 attached to domain 1.
fn setup() -> (FakeDevice, Driver) {
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    drv.attach(1, 16).unwrap();
    (dev, drv)
}

/// A well-formed 24-byte `struct virtio_iommu_fault`: MAPPING fault, read, with address.
fn fault_report(endpoint: u32, address: u64) -> [u8; 24] {
    let mut r = [0u8; 24];
    r[0] = 2; // VIRTIO_IOMMU_FAULT_R_MAPPING
    r[4..8].copy_from_slice(&(1u32 | 1 << 8).to_le_bytes()); // F_READ | F_ADDRESS
    r[8..12].copy_from_slice(&endpoint.to_le_bytes());
    r[16..24].copy_from_slice(&address.to_le_bytes());
    r
}

// --- Config generation (virtio §2.5.1, §4.2.2.2: read the generation before and after). ---

/// `Transport::read_consistent` loops until two generation reads agree: a device whose
/// generation changes on every read made `VirtIOIommu::new` spin forever.
#[test]
fn a_config_generation_that_never_settles_fails_new() {
    let dev = FakeDevice::new();
    dev.state().generation_changes = u64::MAX;
    let t = dev.transport();
    let r = within_20s("VirtIOIommu::new", move || {
        VirtIOIommu::<FakeHal, _>::new(t, options(1000)).err()
    });
    assert_eq!(r, Some(IommuError::ConfigUnstable));
    assert_ne!(
        dev.state().status & DeviceStatus::FAILED.bits(),
        0,
        "FAILED set"
    );
}

/// The bound is exactly `WaitPolicy::config_attempts` consistent-read attempts, each reading
/// the generation twice.
#[test]
fn config_reads_retry_up_to_config_attempts() {
    let with_attempts = |attempts| IommuOptions {
        wait: WaitPolicy {
            max_polls: 1000,
            config_attempts: attempts,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    };
    // 5 changing reads: attempts 1 (gen 1, 2) and 2 (3, 4) fail, attempt 3 reads (5, 5).
    let dev = FakeDevice::new();
    dev.state().generation_changes = 5;
    let drv = dev
        .driver_with(with_attempts(3))
        .expect("settles on the third attempt");
    assert_eq!(drv.config().domain_range, (1, 1000));
    drop(drv);
    let dev = FakeDevice::new();
    dev.state().generation_changes = 6;
    assert_eq!(
        dev.driver_with(with_attempts(3)).err(),
        Some(IommuError::ConfigUnstable)
    );
    // 0 attempts still makes one.
    let dev = FakeDevice::new();
    assert!(dev.driver_with(with_attempts(0)).is_ok());
}

/// `read_raw_config` read its 10 words with no generation check at all, and `bypass()` read
/// `bypass` the same way: both now read consistently, bounded.
#[test]
fn raw_config_and_bypass_reads_are_generation_checked() {
    let (dev, drv) = setup();
    assert_eq!(drv.bypass(), Some(true));
    dev.state().generation_changes = u64::MAX;
    assert_eq!(
        drv.read_raw_config().err(),
        Some(IommuError::ConfigUnstable)
    );
    assert_eq!(drv.try_bypass(), Err(IommuError::ConfigUnstable));
    assert_eq!(drv.bypass(), None, "unknown, not a guess");
    // A single change during the read is retried.
    dev.state().generation_changes = 1;
    let raw = drv.read_raw_config().expect("retried");
    assert_eq!(raw.domain_range.end.get(), 1000);
    dev.state().generation_changes = 1;
    assert_eq!(drv.try_bypass(), Ok(Some(true)));
    assert!(!drv.is_broken(), "config reads do not break the driver");
}

// --- Reset (virtio §2.4.2, §4.1.4.3.2: wait until device status reads 0). ---

/// `new` wrote 0 to the status register and went on without waiting for it to read 0.
#[test]
fn new_fails_when_the_reset_never_reads_0() {
    let dev = FakeDevice::new();
    {
        let mut s = dev.state();
        s.status = DeviceStatus::ACKNOWLEDGE.bits();
        s.reset_stuck = true;
    }
    let t = dev.transport();
    let r = within_20s("VirtIOIommu::new", move || {
        VirtIOIommu::<FakeHal, _>::new(t, options(1000)).err()
    });
    assert_eq!(r, Some(IommuError::ResetTimeout));
    assert_ne!(
        dev.state().status & DeviceStatus::FAILED.bits(),
        0,
        "FAILED set"
    );
    // A device that does reset is fine.
    dev.state().reset_stuck = false;
    assert!(dev.driver_with(options(1000)).is_ok());
}

/// `Drop` freed the rings and buffers right after writing 0, even when the device never read
/// back 0 (so may still use them). It now leaks them in that case, and frees them otherwise.
#[test]
fn drop_leaks_the_rings_when_the_reset_never_completes() {
    let before = dma_live_pages();
    let (_dev, drv) = setup();
    assert!(dma_live_pages() > before);
    drop(drv);
    assert_eq!(
        dma_live_pages(),
        before,
        "a reset device gets its memory freed"
    );

    let (dev, drv) = setup();
    let live = dma_live_pages();
    dev.state().reset_stuck = true;
    drop(drv);
    assert_eq!(
        dma_live_pages(),
        live,
        "nothing the device may still use is freed"
    );
    assert_ne!(dev.state().status, 0);
}

/// virtio-drivers' transports wait without bound too: modern `MmioTransport::queue_unset`
/// until QueueReady reads 0, `PciTransport::drop` until the status reads 0. `Drop` called
/// `queue_unset` and then dropped the transport, so a device that never finishes its reset hung
/// it. The driver no longer calls `queue_unset` (the completed reset clears the queues) and
/// leaks the transport with the rings when the reset does not complete.
#[test]
fn drop_returns_on_transports_that_wait_for_the_reset() {
    // A compliant device: the driver can be dropped and created again on it.
    let dev = FakeDevice::new();
    dev.state().reset_on_drop = true;
    drop(dev.driver());
    drop(dev.driver());
    let d = dev.clone();
    within_20s("drop", move || {
        let drv = d.driver();
        {
            let mut s = d.state();
            s.reset_stuck = true;
            s.queue_ready_stuck = true;
        }
        drop(drv);
    });
    let dev = FakeDevice::new();
    {
        let mut s = dev.state();
        s.status = DeviceStatus::ACKNOWLEDGE.bits();
        s.reset_stuck = true;
        s.reset_on_drop = true;
    }
    let t = dev.transport();
    let r = within_20s("VirtIOIommu::new", move || {
        VirtIOIommu::<FakeHal, _>::new(t, options(1000)).err()
    });
    assert_eq!(r, Some(IommuError::ResetTimeout));
}

/// Every failed `new` after the first reset dropped the transport, and virtio-drivers'
/// `PciTransport::drop` spins until the status reads 0: a device that completed the first
/// reset and then stuck hung `new`. `new` now resets it itself, bounded, and never runs the
/// transport's destructor.
#[test]
fn a_failing_new_on_a_device_that_sticks_at_the_second_reset_returns() {
    let dev = FakeDevice::new();
    {
        let mut s = dev.state();
        s.offered = Features::VERSION_1.bits();
        s.resets_left = Some(1);
        s.reset_on_drop = true;
    }
    let t = dev.transport();
    let r = within_20s("VirtIOIommu::new", move || {
        VirtIOIommu::<FakeHal, _>::new(t, options(1000)).err()
    });
    assert_eq!(r, Some(IommuError::MissingFeatures(Features::MAP_UNMAP)));
    assert_ne!(dev.state().status & DeviceStatus::FAILED.bits(), 0);

    // Queue setup fails (max_queue_size too small): the same.
    let dev = FakeDevice::new();
    {
        let mut s = dev.state();
        s.max_queue_size = 16;
        s.resets_left = Some(1);
        s.reset_on_drop = true;
    }
    let t = dev.transport();
    let r = within_20s("VirtIOIommu::new", move || {
        VirtIOIommu::<FakeHal, _>::new(t, options(1000)).err()
    });
    assert!(matches!(r, Some(IommuError::InvalidConfig(_))), "{r:?}");
}

/// `Drop` reset the device (bounded) and then dropped the transport, whose `Drop` (like
/// `PciTransport`'s) resets again and spins until the status reads 0: a device that completed
/// the driver's reset (read 0) and then failed again for good hung `Drop`. The transport's destructor no
/// longer runs; the rings are freed after the driver's own reset read 0.
#[test]
fn drop_does_not_run_the_transports_destructor() {
    let dev = FakeDevice::new();
    let d = dev.clone();
    // DMA pages are counted per thread: count on the watchdog's.
    let (before, after) = within_20s("drop", move || {
        let before = dma_live_pages();
        let drv = d.driver();
        {
            let mut s = d.state();
            s.resets_left = Some(1);
            s.fails_after_last_reset = true;
            s.reset_on_drop = true;
        }
        drop(drv);
        (before, dma_live_pages())
    });
    assert_eq!(
        dev.state().status,
        DeviceStatus::DEVICE_NEEDS_RESET.bits(),
        "the driver's reset read 0, then the device failed again"
    );
    assert_eq!(after, before, "and the rings were freed after it");
}

// --- eventq (§5.13.6.9). ---

/// `poll_event` ("never blocks") kept looping while the device returned malformed reports: a
/// device that completes every re-posted buffer at once with a short length kept it forever.
#[test]
fn poll_event_makes_at_most_one_pass_over_a_flooding_eventq() {
    let dev = FakeDevice::new();
    let d = dev.clone();
    let (first, second, stats, after) = within_20s("poll_event", move || {
        let mut drv = d.driver();
        d.state().event_flood = Some(8); // shorter than struct virtio_iommu_fault
        d.complete_events();
        let first = drv.poll_event();
        let second = drv.poll_event();
        let stats = drv.event_stats();
        // The flood stops; every buffer was re-posted, so a real report still arrives.
        d.state().event_flood = None;
        let mut after = Ok(None);
        for _ in 0..3 {
            after = drv.poll_event();
            if !matches!(after, Ok(None)) {
                break;
            }
            d.push_event(&fault_report(16, 0x8000), 24);
        }
        (first, second, stats, after)
    });
    assert_eq!(first, Ok(None));
    assert_eq!(second, Ok(None));
    assert_eq!(stats.ignored, 2 * EVENTQ_SIZE as u64, "one pass per call");
    assert_eq!(stats.delivered, 0);
    let ev = after.unwrap().expect("a report after the flood");
    assert_eq!((ev.reason, ev.endpoint), (FaultReason::Mapping, 16));
    assert_eq!(ev.address, Some(0x8000));
}

/// Malformed reports before a good one in the same pass are skipped (counted) and the good one
/// is returned by the same call.
#[test]
fn a_report_behind_malformed_ones_is_returned() {
    let (dev, mut drv) = setup();
    for _ in 0..10 {
        dev.push_event(&[0u8; 24], 8).unwrap();
    }
    let mut bad_reserved = fault_report(8, 0x1000);
    bad_reserved[1] = 1;
    dev.push_event(&bad_reserved, 24).unwrap();
    dev.push_event(&fault_report(24, 0x2000), 24).unwrap();
    let ev = drv.poll_event().unwrap().expect("the good report");
    assert_eq!((ev.endpoint, ev.address), (24, Some(0x2000)));
    assert_eq!(drv.event_stats().ignored, 11);
    assert_eq!(drv.event_stats().delivered, 1);
    assert_eq!(drv.poll_event(), Ok(None));
}

/// A used element naming an eventq buffer again (after the driver re-posted it) used to read the
/// re-posted, zero-filled buffer as a fault report of endpoint 0 at reason UNKNOWN. Buffers are
/// now posted filled with `WRITABLE_FILL`, whose `reserved` bytes make such a report ignored.
#[test]
fn a_repeated_eventq_completion_is_not_a_phantom_fault() {
    let (dev, mut drv) = setup();
    let id = dev.push_event(&fault_report(16, 0x8000), 24).unwrap();
    assert!(drv.poll_event().unwrap().is_some());
    dev.inject_used(1, id, 24);
    assert_eq!(drv.poll_event(), Ok(None), "not a fault report");
    assert_eq!(drv.event_stats().ignored, 1);
    assert!(!drv.is_broken());
}

#[test]
fn an_eventq_used_id_that_was_never_posted_is_a_protocol_error() {
    let (dev, mut drv) = setup();
    dev.inject_used(1, 1000, 24);
    assert_eq!(drv.poll_event(), Err(IommuError::DeviceProtocol));
    assert!(drv.is_broken());
}

// --- Device-writable parts the device did not write. ---

/// Tails were pre-filled with 0 = S_OK: a device reporting used length 4 without writing read
/// as success. They are now pre-filled with `WRITABLE_FILL`, which no device writes. An
/// unwritten tail is fatal (the used element may be stale, the request still available to the
/// device): the driver is broken after it, on the synchronous path and after a batch round.
#[test]
fn a_tail_the_device_did_not_write_is_not_s_ok() {
    assert!(
        Status::from_u8(WRITABLE_FILL).is_none(),
        "outside the spec's statuses"
    );
    type Op = fn(&mut Driver) -> Result<(), IommuError>;
    let ops: [Op; 3] = [
        |d| d.attach(2, 8),
        |d| d.map(1, G, 2 * G - 1, 0x8000_0000, RW),
        |d| d.unmap(1, G, 2 * G - 1),
    ];
    for op in ops {
        let (dev, mut drv) = setup();
        dev.state().behaviour = Behaviour::NoWrite;
        assert_eq!(op(&mut drv), Err(IommuError::NotWritten));
        assert!(drv.is_broken(), "an unwritten tail is fatal");
        dev.state().behaviour = Behaviour::InOrder;
        assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(IommuError::Broken));
    }
    let (dev, mut drv) = setup();
    dev.state().behaviour = Behaviour::NoWrite;
    let mut b = drv.batch();
    for k in 0..5u64 {
        b.map(1, G * (k + 1), G * (k + 2) - 1, 0, RW).unwrap();
    }
    assert_eq!(b.submit().err(), Some(IommuError::NotWritten));
    assert!(
        drv.is_broken(),
        "a batch round with an unwritten tail is fatal"
    );
    // A device that writes its tails is fine: statuses get through, the driver stays usable.
    let (_dev, mut drv) = setup();
    let far = 0x100 * G;
    drv.map(1, far, far + G - 1, 0x8000_0000, RW).unwrap();
    assert_eq!(
        drv.map(1, far, far + G - 1, 0x8000_0000, RW),
        Err(IommuError::Status(Status::Inval))
    );
    let mut b = drv.batch();
    b.unmap(1, far, far + G - 1).unwrap();
    b.unmap(7, far, far + G - 1).unwrap();
    let r = b.submit().unwrap();
    assert_eq!(r.get(0), Some(Ok(())));
    assert_eq!(r.get(1), Some(Err(IommuError::Status(Status::NoEnt))));
    assert!(!drv.is_broken());
}

/// A device that advances the used index without writing a used element: the driver finds the
/// element an earlier request left in that ring slot (its own descriptor id, used length 4) and
/// takes it for this request's completion. The tail it then reads was never written: with the
/// old zero pre-fill a MAP the device never saw returned Ok.
#[test]
fn a_used_index_advanced_without_an_element_is_not_s_ok() {
    let (dev, mut drv) = setup();
    // Fill every used ring slot with (0, 4): one ring's worth of synchronous requests.
    for _ in 0..drv.requestq_size() {
        drv.unmap(1, G, 2 * G - 1).unwrap();
    }
    dev.state().behaviour = Behaviour::IdxOnly;
    assert_eq!(
        drv.map(1, G, 2 * G - 1, 0x8000_0000, RW),
        Err(IommuError::NotWritten)
    );
    assert!(
        dev.state().mappings.is_empty(),
        "the device never saw the MAP"
    );
    // The MAP may still be available to the device: its buffer must not be reused.
    assert!(drv.is_broken(), "a stale used element is fatal");
    dev.state().behaviour = Behaviour::InOrder;
    assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(IommuError::Broken));
}

/// PROBE's writable part was zero-filled: a device writing nothing read as S_OK with no
/// properties (no reserved regions, silently).
#[test]
fn a_probe_reply_the_device_did_not_write_is_an_error() {
    let dev = FakeDevice::with_probe(64);
    let mut drv = dev.driver();
    let regions = drv.probe_reserved_regions(16).unwrap();
    assert_eq!(regions.len(), 1);
    assert_eq!(regions[0].kind, ResvMemKind::Msi);
    assert_eq!(
        (regions[0].start, regions[0].end),
        (0x0800_0000, 0x080f_ffff)
    );
    assert_eq!(drv.probe(5, |_| ()), Err(IommuError::Status(Status::NoEnt)));
    // Properties written but not the tail: fatal, like any unwritten tail.
    dev.state().behaviour = Behaviour::NoWrite;
    let mut seen = 0;
    assert_eq!(drv.probe(16, |_| seen += 1), Err(IommuError::NotWritten));
    assert!(drv.is_broken());
    // The tail written but not the properties: the device did return this request, so a
    // per-request failure.
    let mut drv = dev.driver();
    dev.state().behaviour = Behaviour::StatusOnly;
    assert_eq!(drv.probe(16, |_| seen += 1), Err(IommuError::NotWritten));
    assert_eq!(seen, 0, "no property delivered from unwritten memory");
    assert!(!drv.is_broken());
    dev.state().behaviour = Behaviour::InOrder;
    let mut props = Vec::new();
    drv.probe(16, |p| props.push(p)).unwrap();
    assert!(matches!(props[..], [ProbeProperty::ResvMem(_)]));
}

/// A device that reset itself while a request was in flight (status 0, DRIVER_OK gone) was
/// only caught by the timeout; the periodic status check now reports it.
#[test]
fn a_device_that_resets_itself_is_a_device_reset_error() {
    let dev = FakeDevice::new();
    let mut drv = dev.driver_with(options(1_000_000)).unwrap();
    drv.attach(1, 16).unwrap();
    dev.state().behaviour = Behaviour::Hold;
    dev.state().status = 0;
    assert_eq!(
        drv.map(1, G, 2 * G - 1, 0x8000_0000, RW),
        Err(IommuError::DeviceReset)
    );
    assert!(drv.is_broken());
    assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(IommuError::Broken));
    assert_eq!(
        IommuError::DeviceReset.to_string(),
        "device reset itself (DRIVER_OK cleared)"
    );
}

// --- Used elements for requests that are not in flight. ---

/// A used element left over in the used ring (stale, repeated, or invented) was taken as the
/// completion of the next request, which read its not-yet-written tail as the result: an
/// UNMAP the device never processed returned Ok. The used ring must be empty when nothing is
/// in flight.
#[test]
fn a_used_element_with_nothing_in_flight_is_a_protocol_error() {
    let (dev, mut drv) = setup();
    drv.map(1, G, 2 * G - 1, 0x8000_0000, RW).unwrap();
    // The next request gets descriptor 0 again (the free list restarts there).
    dev.inject_used(0, 0, 4);
    dev.state().behaviour = Behaviour::Hold;
    assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(IommuError::DeviceProtocol));
    assert!(drv.is_broken());
    assert_eq!(dev.state().mappings.len(), 1, "the UNMAP was not processed");
}

/// The same between batch rounds (and before a batch).
#[test]
fn a_used_element_before_a_batch_round_is_a_protocol_error() {
    let (dev, mut drv) = setup();
    let mut b = drv.batch();
    b.map(1, G, 2 * G - 1, 0x8000_0000, RW).unwrap();
    assert_eq!(b.submit().unwrap().get(0), Some(Ok(())));
    dev.inject_used(0, 0, 4);
    dev.state().behaviour = Behaviour::Hold;
    let mut b = drv.batch();
    b.unmap(1, G, 2 * G - 1).unwrap();
    assert_eq!(b.submit().err(), Some(IommuError::DeviceProtocol));
    assert!(drv.is_broken());
    assert_eq!(dev.state().mappings.len(), 1);
}

/// A synchronous request whose used element is repeated: the request itself completes, the
/// repeat is refused before the next request is posted.
#[test]
fn a_repeated_used_element_fails_the_next_request() {
    let (dev, mut drv) = setup();
    dev.state().behaviour = Behaviour::Duplicate;
    assert_eq!(drv.map(1, G, 2 * G - 1, 0x8000_0000, RW), Ok(()));
    assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(IommuError::DeviceProtocol));
    assert_eq!(dev.state().mappings.len(), 1, "the UNMAP was not sent");
}

#[test]
fn synchronous_used_lengths_and_ids_are_checked() {
    for (behaviour, want) in [
        (Behaviour::UsedLen(0), IommuError::NoResponse),
        (
            Behaviour::UsedLen(2),
            IommuError::BadUsedLength {
                used: 2,
                expected: 4,
            },
        ),
        (
            Behaviour::UsedLen(8),
            IommuError::BadUsedLength {
                used: 8,
                expected: 4,
            },
        ),
        (
            Behaviour::UsedLen(u32::MAX),
            IommuError::BadUsedLength {
                used: u32::MAX,
                expected: 4,
            },
        ),
    ] {
        let (dev, mut drv) = setup();
        dev.state().behaviour = behaviour;
        assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(want), "{behaviour:?}");
        assert!(!drv.is_broken());
    }
    let (dev, mut drv) = setup();
    dev.state().behaviour = Behaviour::WrongId;
    assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(IommuError::DeviceProtocol));
    assert!(drv.is_broken());
    // A used id far outside the ring, with nothing in flight.
    let (dev, mut drv) = setup();
    dev.inject_used(0, 60_000, 4);
    assert_eq!(drv.unmap(1, G, 2 * G - 1), Err(IommuError::DeviceProtocol));
}

/// A PROBE whose used length is not `probe_size + 4` is refused without reading the reply.
#[test]
fn probe_used_length_is_checked() {
    let dev = FakeDevice::with_probe(64);
    let mut drv = dev.driver();
    for used in [4, 67, 69, 1 << 20] {
        dev.state().behaviour = Behaviour::UsedLen(used);
        let r = drv.probe(16, |_| ());
        assert!(
            matches!(r, Err(IommuError::BadUsedLength { .. })),
            "used {used}: {r:?}"
        );
    }
}
