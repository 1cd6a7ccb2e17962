//! The project's guest driver against a hostile device: one scripted misbehaviour
//! ([`FaultPlan`], see `src/fault.rs`) per test, through the in-process virtio-mmio transport.
//!
//! Every scenario asserts
//! - the driver's answer: a specific typed error (the variant is matched), or the spec's
//!   behaviour when the misbehaviour is one the driver must tolerate;
//! - no panic and no hang: each runs on its own thread under a watchdog ([`hostile`]), with a
//!   small wait budget ([`options`]);
//! - nothing mapped that was not asked for: every mapping in the device model was requested by
//!   the driver, and every mapping the driver was told succeeded is there ([`Ledger`]).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::device::status;
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::{DeviceConfig, FaultPlan, Misbehaviour, When};
use virtio_iommu_driver::wire::{config_offset, Features, MapFlags, RequestType, Status};
use virtio_iommu_driver::{
    IommuError, IommuOptions, ReservedRegion, ResvMemKind, VirtIOIommu, WaitPolicy, EVENTQ_SIZE,
};

type Driver = VirtIOIommu<TestHal, InProcessTransport>;

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
const MSI: (u64, u64) = (0x0802_0000, 0x0802_0fff);
/// Longest a scenario may take before it counts as a hang.
const WATCHDOG: Duration = Duration::from_secs(10);

/// Runs `scenario` on its own thread; fails if it panics or does not finish within
/// [`WATCHDOG`] (the thread is then abandoned).
fn hostile(scenario: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        scenario();
        let _ = tx.send(());
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(()) => handle.join().expect("scenario thread"),
        Err(RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the scenario sends before it returns"),
        },
        Err(RecvTimeoutError::Timeout) => panic!("hang: no result within {WATCHDOG:?}"),
    }
}

/// Small wait budget: a request that is not answered fails in milliseconds.
fn options() -> IommuOptions {
    IommuOptions {
        wait: WaitPolicy {
            max_polls: 20_000,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    }
}

/// Endpoints 8 (no reserved region) and 16 (an MSI doorbell), misbehaving as `plan` says.
fn bed(plan: FaultPlan) -> TestBed {
    bed_with(DeviceConfig::builder(), plan)
}

fn bed_with(builder: virtio_iommu_device::DeviceConfigBuilder, plan: FaultPlan) -> TestBed {
    TestBed::new(
        builder
            .endpoints([8, 16])
            .resv_region(16, ResvRegion::msi(MSI.0, MSI.1))
            .fault_injection(plan)
            .build()
            .unwrap(),
    )
}

fn driver(bed: &TestBed) -> Driver {
    bed.driver_with(options()).expect("driver initialisation")
}

/// What the driver asked to map, and what it was told was mapped:
/// `(domain, virt_start, virt_end, phys_start)`.
#[derive(Default)]
struct Ledger {
    requested: Vec<(u32, u64, u64, u64)>,
    acknowledged: Vec<(u32, u64, u64, u64)>,
}

impl Ledger {
    /// MAP through the driver, recorded.
    fn map(
        &mut self,
        drv: &mut Driver,
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
    ) -> Result<(), IommuError> {
        let m = (domain, start, end, phys);
        self.requested.push(m);
        let r = drv.map(domain, start, end, phys, RW);
        if r.is_ok() {
            self.acknowledged.push(m);
        }
        r
    }

    /// Every mapping present was requested; every acknowledged one is present (unless
    /// `device_was_reset`, when none may be).
    fn check(&self, bed: &TestBed, device_was_reset: bool) {
        let dev = bed.device();
        let mut present = Vec::new();
        for (domain, d) in dev.state().domains() {
            for (start, m) in d.mappings() {
                present.push((domain, start, m.virt_end, m.phys_start));
            }
        }
        for p in &present {
            assert!(
                self.requested.contains(p),
                "mapping {p:x?} present in the device but never requested"
            );
        }
        if device_was_reset {
            assert!(
                present.is_empty(),
                "mappings survived a reset: {present:x?}"
            );
            return;
        }
        for a in &self.acknowledged {
            assert!(
                present.contains(a),
                "the driver reported {a:x?} mapped but the device does not have it"
            );
        }
    }
}

/// Attaches endpoint 8 to domain 1 and returns a 4-page guest buffer.
fn setup(bed: &TestBed, drv: &mut Driver) -> u64 {
    drv.attach(1, 8).unwrap();
    bed.alloc(4 * 4096).unwrap()
}

/// The `i`-th MAP of the batches below: IOVA page `i + 1` to buffer page `i`, as a ledger
/// entry.
fn batch_map(buf: u64, i: u64) -> (u32, u64, u64, u64) {
    (
        1,
        0x1000 * (i + 1),
        0x1000 * (i + 1) + 0xfff,
        buf + 0x1000 * i,
    )
}

fn on_map(what: Misbehaviour) -> FaultPlan {
    FaultPlan::new().with(what, When::ALWAYS.on(RequestType::Map))
}

// ---- configuration, features, status ----

/// Hung before the hard-driver fix (virtio-drivers' `read_consistent` retries forever).
#[test]
fn config_generation_that_never_settles() {
    hostile(|| {
        let bed = bed(FaultPlan::new().always(Misbehaviour::ConfigGenerationUnstable));
        let r = bed.driver_with(options());
        assert_eq!(r.err(), Some(IommuError::ConfigUnstable));
        let s = bed.device().status();
        assert_ne!(s & status::FAILED, 0, "the driver sets FAILED");
        assert_eq!(s & status::DRIVER_OK, 0);
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn config_generation_that_settles_after_a_few_reads() {
    hostile(|| {
        let plan = FaultPlan::new().with(
            Misbehaviour::ConfigGenerationUnstable,
            When::ALWAYS.times(3),
        );
        let bed = bed(plan);
        let mut drv = driver(&bed);
        assert_eq!(drv.config().probe_size, 512);
        let mut ledger = Ledger::default();
        let buf = setup(&bed, &mut drv);
        ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf).unwrap();
        ledger.check(&bed, false);
        assert!(bed.device().counters().faults_injected >= 3);
    });
}

#[test]
fn features_that_change_after_features_ok() {
    hostile(|| {
        // After FEATURES_OK the device presents (and acts on) features without MAP_UNMAP.
        let offered = (DeviceConfig::default().offered() - Features::MAP_UNMAP).bits();
        let bed =
            bed(FaultPlan::new().always(Misbehaviour::FeaturesChangeAfterFeaturesOk { offered }));
        let mut drv = driver(&bed);
        assert!(
            drv.features().contains(Features::MAP_UNMAP),
            "features fixed at FEATURES_OK"
        );
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::Status(Status::Unsupp))
        );
        ledger.check(&bed, false);
        assert_eq!(bed.device().state().mapping_count(), 0);
        // The device's registers now lie about the offer; the driver does not re-read them.
        let now = drv.transport_mut().read_device_features();
        assert_eq!(now, offered);
        assert!(drv.offered_features().contains(Features::MAP_UNMAP));
    });
}

#[test]
fn features_ok_refused() {
    hostile(|| {
        let bed = bed(FaultPlan::new().always(Misbehaviour::FeaturesOkRefused));
        assert_eq!(
            bed.driver_with(options()).err(),
            Some(IommuError::FeaturesRejected)
        );
        let s = bed.device().status();
        assert_ne!(s & status::FAILED, 0, "FAILED set");
        assert_eq!(s & status::DRIVER_OK, 0);
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn reset_that_never_completes() {
    hostile(|| {
        let plan = FaultPlan::new().always(Misbehaviour::StatusAfterReset(
            status::ACKNOWLEDGE | status::DRIVER,
        ));
        let bed = bed(plan);
        assert_eq!(
            bed.driver_with(options()).err(),
            Some(IommuError::ResetTimeout)
        );
        assert_eq!(bed.device().status() & status::DRIVER_OK, 0);
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn reset_that_completes_late() {
    hostile(|| {
        let plan =
            FaultPlan::new().with(Misbehaviour::StatusAfterReset(1), When::ALWAYS.times(100));
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf).unwrap();
        ledger.check(&bed, false);
    });
}

#[test]
fn queue_num_max_too_small() {
    hostile(|| {
        let bed = bed(FaultPlan::new().always(Misbehaviour::QueueNumMax(16)));
        assert!(matches!(
            bed.driver_with(options()).err(),
            Some(IommuError::InvalidConfig(_))
        ));
        assert_ne!(bed.device().status() & status::FAILED, 0);
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn config_page_size_mask_zero() {
    hostile(|| {
        let plan = FaultPlan::new().always(Misbehaviour::ConfigBytes {
            offset: config_offset::PAGE_SIZE_MASK as u8,
            bytes: vec![0; 8],
        });
        let bed = bed(plan);
        assert_eq!(
            bed.driver_with(options()).err(),
            Some(IommuError::InvalidConfig("page_size_mask is 0"))
        );
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn config_input_range_inverted() {
    hostile(|| {
        let plan = FaultPlan::new().always(Misbehaviour::ConfigBytes {
            offset: config_offset::INPUT_RANGE_START as u8,
            bytes: u64::MAX.to_le_bytes().to_vec(),
        });
        let bed = bed(plan);
        assert_eq!(
            bed.driver_with(options()).err(),
            Some(IommuError::InvalidConfig("input_range start > end"))
        );
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn config_probe_size_huge() {
    hostile(|| {
        let plan = FaultPlan::new().always(Misbehaviour::ConfigBytes {
            offset: config_offset::PROBE_SIZE as u8,
            bytes: u32::MAX.to_le_bytes().to_vec(),
        });
        let bed = bed(plan);
        assert_eq!(
            bed.driver_with(options()).err(),
            Some(IommuError::InvalidConfig("probe_size too large"))
        );
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn config_bypass_reads_two() {
    hostile(|| {
        // §5.13.4: the driver ignores bits 1-7 of `bypass`.
        let plan = FaultPlan::new().always(Misbehaviour::ConfigBytes {
            offset: config_offset::BYPASS as u8,
            bytes: vec![2],
        });
        let bed = bed(plan);
        let drv = driver(&bed);
        assert_eq!(drv.bypass(), Some(false));
        assert_eq!(drv.read_raw_config().unwrap().bypass, 2);
        Ledger::default().check(&bed, false);
    });
}

// ---- used length ----

#[test]
fn used_length_zero() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::UsedLen(0)));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::NoResponse)
        );
        ledger.check(&bed, false);
        // Not fatal: the next request works.
        drv.detach(1, 8).unwrap();
    });
}

#[test]
fn used_length_short() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::UsedLen(2)));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::BadUsedLength {
                used: 2,
                expected: 4
            })
        );
        ledger.check(&bed, false);
    });
}

#[test]
fn used_length_too_long() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::UsedLen(4096)));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::BadUsedLength {
                used: 4096,
                expected: 4
            })
        );
        ledger.check(&bed, false);
    });
}

#[test]
fn used_length_short_for_probe() {
    hostile(|| {
        let plan = FaultPlan::new().with(
            Misbehaviour::UsedLen(8),
            When::ALWAYS.on(RequestType::Probe),
        );
        let bed = bed(plan);
        let mut drv = driver(&bed);
        assert_eq!(
            drv.probe_reserved_regions(16).err(),
            Some(IommuError::BadUsedLength {
                used: 8,
                expected: 516
            })
        );
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn used_length_wrong_in_a_batch() {
    hostile(|| {
        // The 3rd MAP of the batch gets used length 0, the 4th 9: each is its own failure.
        let plan = FaultPlan::new()
            .with(Misbehaviour::UsedLen(0), When::nth(3).on(RequestType::Map))
            .with(Misbehaviour::UsedLen(9), When::nth(4).on(RequestType::Map));
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut b = drv.batch();
        for i in 0..4u64 {
            b.map(
                1,
                0x1000 * (i + 1),
                0x1000 * (i + 1) + 0xfff,
                buf + 0x1000 * i,
                RW,
            )
            .unwrap();
        }
        let r = b.submit().unwrap();
        assert_eq!(r.get(0), Some(Ok(())));
        assert_eq!(r.get(1), Some(Ok(())));
        assert_eq!(r.get(2), Some(Err(IommuError::NoResponse)));
        assert_eq!(
            r.get(3),
            Some(Err(IommuError::BadUsedLength {
                used: 9,
                expected: 4
            }))
        );
        // The device did execute all four (it only lied about the length): none unrequested.
        let ledger = Ledger {
            requested: (0..4u64)
                .map(|i| {
                    (
                        1,
                        0x1000 * (i + 1),
                        0x1000 * (i + 1) + 0xfff,
                        buf + 0x1000 * i,
                    )
                })
                .collect(),
            acknowledged: (0..2u64)
                .map(|i| {
                    (
                        1,
                        0x1000 * (i + 1),
                        0x1000 * (i + 1) + 0xfff,
                        buf + 0x1000 * i,
                    )
                })
                .collect(),
        };
        ledger.check(&bed, false);
    });
}

// ---- used id ----

#[test]
fn used_id_out_of_range() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::UsedIdOutOfRange));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::DeviceProtocol)
        );
        assert!(drv.is_broken());
        assert_eq!(drv.detach(1, 8), Err(IommuError::Broken));
        ledger.check(&bed, false);
    });
}

#[test]
fn used_id_repeated_in_a_batch() {
    hostile(|| {
        let plan =
            FaultPlan::new().with(Misbehaviour::UsedTwice, When::nth(1).on(RequestType::Map));
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut b = drv.batch();
        for i in 0..4u64 {
            b.map(
                1,
                0x1000 * (i + 1),
                0x1000 * (i + 1) + 0xfff,
                buf + 0x1000 * i,
                RW,
            )
            .unwrap();
        }
        assert_eq!(b.submit().err(), Some(IommuError::DeviceProtocol));
        assert!(drv.is_broken());
        let ledger = Ledger {
            requested: (0..4u64)
                .map(|i| {
                    (
                        1,
                        0x1000 * (i + 1),
                        0x1000 * (i + 1) + 0xfff,
                        buf + 0x1000 * i,
                    )
                })
                .collect(),
            acknowledged: Vec::new(),
        };
        ledger.check(&bed, false);
    });
}

/// Found a driver bug (fixed on hard-driver, "refuse used elements with nothing in flight"): a
/// used element left over after a request completed (the device answered the ATTACH twice)
/// was taken for the next request's completion: virtio-drivers reuses the same head
/// descriptor, so the token matched, and the driver read a tail the device never wrote (the
/// MAP below is never even executed) and reported success.
#[test]
fn used_id_repeated_for_a_single_request() {
    hostile(|| {
        let plan = FaultPlan::new()
            .with(
                Misbehaviour::UsedTwice,
                When::nth(1).on(RequestType::Attach),
            )
            .with(
                Misbehaviour::NeverComplete,
                When::ALWAYS.on(RequestType::Map),
            );
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        let r = ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf);
        ledger.check(&bed, false);
        assert_eq!(r, Err(IommuError::DeviceProtocol));
    });
}

// ---- statuses ----

#[test]
fn status_outside_the_spec() {
    hostile(|| {
        let plan = FaultPlan::new()
            .with(Misbehaviour::Status(9), When::nth(1).on(RequestType::Map))
            .with(
                Misbehaviour::Status(254),
                When::nth(1).on(RequestType::Detach),
            );
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::UnknownStatus(9))
        );
        assert_eq!(drv.detach(1, 8), Err(IommuError::UnknownStatus(254)));
        ledger.check(&bed, false);
    });
}

#[test]
fn status_outside_the_spec_in_a_batch() {
    hostile(|| {
        let plan =
            FaultPlan::new().with(Misbehaviour::Status(200), When::nth(2).on(RequestType::Map));
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut b = drv.batch();
        for i in 0..3u64 {
            b.map(
                1,
                0x1000 * (i + 1),
                0x1000 * (i + 1) + 0xfff,
                buf + 0x1000 * i,
                RW,
            )
            .unwrap();
        }
        let r = b.submit().unwrap();
        assert_eq!(r.get(1), Some(Err(IommuError::UnknownStatus(200))));
        assert_eq!(r.failures(), 1);
        // The device executed all three (it only lied about the second's status).
        Ledger {
            requested: (0..3).map(|i| batch_map(buf, i)).collect(),
            acknowledged: vec![batch_map(buf, 0), batch_map(buf, 2)],
        }
        .check(&bed, false);
    });
}

/// Reported S_OK before the hard-driver fix (tails were pre-filled with 0 = S_OK).
#[test]
fn tail_never_written() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::TailNotWritten));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::NotWritten)
        );
        // The device did nothing: nothing mapped, and the driver does not claim otherwise.
        ledger.check(&bed, false);
        assert_eq!(bed.device().state().mapping_count(), 0);
        // Fatal (the used element may be stale, the request still available to the device).
        assert!(drv.is_broken());
        assert_eq!(drv.detach(1, 8), Err(IommuError::Broken));
    });
}

#[test]
fn tail_never_written_in_a_batch_and_for_probe() {
    hostile(|| {
        let plan = FaultPlan::new().with(
            Misbehaviour::TailNotWritten,
            When::nth(1).on(RequestType::Probe),
        );
        let bed = bed(plan);
        let mut drv = driver(&bed);
        assert_eq!(
            drv.probe_reserved_regions(16).err(),
            Some(IommuError::NotWritten)
        );
        assert!(drv.is_broken(), "an unwritten tail is fatal");
        let plan = FaultPlan::new().with(
            Misbehaviour::TailNotWritten,
            When::nth(2).on(RequestType::Map),
        );
        let bed = self::bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut b = drv.batch();
        for i in 0..3u64 {
            b.map(
                1,
                0x1000 * (i + 1),
                0x1000 * (i + 1) + 0xfff,
                buf + 0x1000 * i,
                RW,
            )
            .unwrap();
        }
        // The batch fails as a whole after its round, and the driver is broken.
        assert_eq!(b.submit().err(), Some(IommuError::NotWritten));
        assert!(drv.is_broken());
        let m = |i: u64| {
            (
                1,
                0x1000 * (i + 1),
                0x1000 * (i + 1) + 0xfff,
                buf + 0x1000 * i,
            )
        };
        Ledger {
            requested: (0..3).map(m).collect(),
            acknowledged: Vec::new(),
        }
        .check(&bed, false);
        assert_eq!(bed.device().state().mapping_count(), 2);
    });
}

// ---- requests that never complete, resets ----

#[test]
fn needs_reset_in_the_middle_of_a_request() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::NeedsReset));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::DeviceNeedsReset)
        );
        assert_eq!(drv.attach(2, 16), Err(IommuError::Broken));
        ledger.check(&bed, false);
        assert_ne!(
            drv.transport_mut().get_status() & DeviceStatus::DEVICE_NEEDS_RESET,
            DeviceStatus::empty()
        );
    });
}

#[test]
fn request_never_completed() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::NeverComplete));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf),
            Err(IommuError::Timeout)
        );
        assert_eq!(drv.detach(1, 8), Err(IommuError::Broken));
        ledger.check(&bed, false);
        assert_eq!(bed.device().state().mapping_count(), 0);
    });
}

#[test]
fn request_in_a_batch_never_completed() {
    hostile(|| {
        let plan = FaultPlan::new().with(
            Misbehaviour::NeverComplete,
            When::nth(3).on(RequestType::Map),
        );
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut b = drv.batch();
        for i in 0..4u64 {
            b.map(
                1,
                0x1000 * (i + 1),
                0x1000 * (i + 1) + 0xfff,
                buf + 0x1000 * i,
                RW,
            )
            .unwrap();
        }
        assert_eq!(b.submit().err(), Some(IommuError::Timeout));
        assert!(drv.is_broken());
        // The device executed 1, 2 and 4, never 3.
        {
            let dev = bed.device();
            let d = dev.state().domain(1).unwrap();
            assert!(d.mapping_at(0x3000).is_none());
            assert_eq!(d.mapping_count(), 3);
        }
        Ledger {
            requested: (0..4).map(|i| batch_map(buf, i)).collect(),
            acknowledged: Vec::new(),
        }
        .check(&bed, false);
    });
}

#[test]
fn device_resets_itself() {
    hostile(|| {
        let plan =
            FaultPlan::new().with(Misbehaviour::ResetSelf, When::nth(2).on(RequestType::Map));
        let bed = bed(plan);
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf).unwrap();
        let r = ledger.map(&mut drv, 1, 0x2000, 0x2fff, buf + 0x1000);
        assert_eq!(
            r,
            Err(IommuError::DeviceReset),
            "a device that reset itself"
        );
        assert!(drv.is_broken());
        assert_eq!(bed.device().status(), 0);
        ledger.check(&bed, true);
    });
}

// ---- completion order ----

#[test]
fn completions_out_of_order_in_a_batch() {
    hostile(|| {
        let bed = bed(on_map(Misbehaviour::Reorder));
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut b = drv.batch();
        let mut requested = Vec::new();
        for i in 0..8u64 {
            // The 6th overlaps the 1st: S_INVAL, whatever order the answers come in.
            let start = if i == 5 {
                0x1_0000
            } else {
                0x1_0000 + 0x1000 * i
            };
            b.map(1, start, start + 0xfff, buf, RW).unwrap();
            requested.push((1, start, start + 0xfff, buf));
        }
        let r = b.submit().unwrap();
        for i in 0..8 {
            let want = if i == 5 {
                Err(IommuError::Status(Status::Inval))
            } else {
                Ok(())
            };
            assert_eq!(r.get(i), Some(want), "request {i}");
        }
        let acknowledged = requested
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 5)
            .map(|(_, m)| *m)
            .collect();
        Ledger {
            requested,
            acknowledged,
        }
        .check(&bed, false);
        assert_eq!(bed.device().state().mapping_count(), 7);
        assert!(bed.device().counters().faults_injected >= 8);
    });
}

// ---- PROBE ----

#[test]
fn probe_properties_that_overlap() {
    hostile(|| {
        let plan = FaultPlan::new().always(Misbehaviour::ProbeOverlap);
        let bed = bed(plan);
        let mut drv = driver(&bed);
        // D43 forbids it; the driver reports both regions so a user keeps the union reserved.
        let regions = drv.probe_reserved_regions(8).unwrap();
        assert_eq!(
            regions,
            vec![
                ReservedRegion {
                    kind: ResvMemKind::Reserved,
                    start: 0x1000,
                    end: 0x2fff
                },
                ReservedRegion {
                    kind: ResvMemKind::Reserved,
                    start: 0x2000,
                    end: 0x3fff
                },
            ]
        );
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn probe_property_overruns_probe_size() {
    hostile(|| {
        let bed = bed(FaultPlan::new().always(Misbehaviour::ProbeOverrun));
        let mut drv = driver(&bed);
        assert_eq!(
            drv.probe_reserved_regions(16).err(),
            Some(IommuError::MalformedProbe { offset: 0 })
        );
        // Not fatal.
        drv.attach(1, 16).unwrap();
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn probe_property_with_reserved_type_bits() {
    hostile(|| {
        let bed = bed(FaultPlan::new().always(Misbehaviour::ProbeReservedBits));
        let mut drv = driver(&bed);
        // R28: the property with reserved bits is ignored; R29: the MSI region after it is not.
        let regions = drv.probe_reserved_regions(16).unwrap();
        assert_eq!(
            regions,
            vec![ReservedRegion {
                kind: ResvMemKind::Msi,
                start: MSI.0,
                end: MSI.1
            }]
        );
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn probe_property_list_scripted_short_resv_mem() {
    hostile(|| {
        // A RESV_MEM whose length (8) cannot hold its fields.
        let mut bytes = vec![1, 0, 8, 0];
        bytes.extend_from_slice(&[0; 8]);
        let bed = bed(FaultPlan::new().always(Misbehaviour::ProbeProperties(bytes)));
        let mut drv = driver(&bed);
        assert_eq!(
            drv.probe_reserved_regions(8).err(),
            Some(IommuError::MalformedProbe { offset: 0 })
        );
        Ledger::default().check(&bed, false);
    });
}

// ---- eventq ----

/// Raises one translation fault (endpoint 8 is not attached, bypass is 0).
fn raise_fault(bed: &TestBed) {
    let mut b = [0u8; 4];
    assert!(bed.dma_endpoint(8).unwrap().read(0x1000, &mut b).is_err());
}

#[test]
fn event_of_bad_length() {
    hostile(|| {
        let plan = FaultPlan::new()
            .with(Misbehaviour::EventUsedLen(0), When::nth(1))
            .with(Misbehaviour::EventUsedLen(8), When::nth(2))
            .with(Misbehaviour::EventUsedLen(1000), When::nth(3));
        let bed = bed(plan);
        let mut drv = driver(&bed);
        for _ in 0..4 {
            raise_fault(&bed);
        }
        // The three bad ones are ignored (§5.13.6.9: used length < 24; beyond the buffer),
        // the fourth is delivered.
        let ev = drv.poll_event().unwrap().expect("the well-formed report");
        assert_eq!(ev.endpoint, 8);
        assert_eq!(drv.poll_event().unwrap(), None);
        assert_eq!(drv.event_stats().ignored, 3);
        assert_eq!(drv.event_stats().delivered, 1);
        Ledger::default().check(&bed, false);
    });
}

#[test]
fn event_flood_of_valid_reports() {
    hostile(|| {
        let bed = bed(FaultPlan::new().always(Misbehaviour::EventFlood { used_len: 24 }));
        let mut drv = driver(&bed);
        // Every poll returns one report; the driver stays usable.
        for _ in 0..1000 {
            assert!(drv.poll_event().unwrap().is_some());
        }
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf).unwrap();
        ledger.check(&bed, false);
    });
}

/// Hung before the hard-driver fix: each re-posted buffer was refilled at once and
/// `poll_event` never returned.
#[test]
fn event_flood_of_ignorable_reports() {
    hostile(|| {
        let bed = bed(FaultPlan::new().always(Misbehaviour::EventFlood { used_len: 8 }));
        let mut drv = driver(&bed);
        for call in 1..=10u64 {
            assert_eq!(drv.poll_event(), Ok(None), "each poll returns, bounded");
            assert_eq!(drv.event_stats().ignored, call * EVENTQ_SIZE as u64);
        }
        assert_eq!(drv.event_stats().delivered, 0);
        // The driver stays usable.
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        ledger.map(&mut drv, 1, 0x1000, 0x1fff, buf).unwrap();
        ledger.check(&bed, false);
    });
}

// ---- fault plans behave ----

#[test]
fn an_empty_plan_is_a_well_behaved_device() {
    hostile(|| {
        let bed = bed_with(
            DeviceConfig::builder().max_requests_per_notify(3),
            FaultPlan::new(),
        );
        let mut drv = driver(&bed);
        let buf = setup(&bed, &mut drv);
        let mut ledger = Ledger::default();
        for i in 0..4u64 {
            ledger
                .map(&mut drv, 1, 0x1000 * (i + 1), 0x1000 * (i + 1) + 0xfff, buf)
                .unwrap();
        }
        ledger.check(&bed, false);
        assert_eq!(bed.device().counters().faults_injected, 0);
    });
}
