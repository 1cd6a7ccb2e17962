//! Non-blocking requests (`submit_nb`, `poll_nb`, `wait_nb`, `discard_nb`, `reclaim_nb`) on the
//! fake device of `common`: completion in any order, dropped and stale tokens, a device that
//! never answers (bounded, typed), a device that answers wrongly, and the exclusion of
//! synchronous requests while non-blocking ones are in flight.

mod common;

use common::{Behaviour, FakeDevice, Mapping};
use virtio_drivers::transport::Transport;
use virtio_iommu_driver::parse::{ReservedRegion, ResvMemKind};
use virtio_iommu_driver::wire::{MapFlags, Status};
use virtio_iommu_driver::{BatchOp, IommuError, NbRequest, NbToken, NB_SLOTS};

const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
const G: u64 = 0x1000;

fn map(i: u64) -> NbRequest {
    NbRequest::Op(BatchOp::Map {
        domain: 1,
        virt_start: (i + 1) * G,
        virt_end: (i + 2) * G - 1,
        phys_start: 0x10_0000 + i * G,
        flags: RW,
    })
}

/// A device holding every request, and a driver with endpoint 16 attached to domain 1.
fn held() -> (
    FakeDevice,
    virtio_iommu_driver::VirtIOIommu<common::FakeHal, common::FakeTransport>,
) {
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    drv.attach(1, 16).unwrap();
    dev.state().behaviour = Behaviour::Hold;
    (dev, drv)
}

/// Lets the device process what it held, completing per `b`.
fn release(dev: &FakeDevice, b: Behaviour) {
    dev.state().behaviour = b;
    dev.transport().notify(0);
}

#[test]
fn requests_complete_out_of_order_and_each_token_gets_its_own_result() {
    let (dev, mut drv) = held();
    let requests = [
        map(0),
        map(1),
        // Overlaps request 0: S_INVAL, and only for this token.
        NbRequest::Op(BatchOp::Map {
            domain: 1,
            virt_start: G,
            virt_end: 2 * G - 1,
            phys_start: 0,
            flags: RW,
        }),
        NbRequest::Attach {
            domain: 2,
            endpoint: 24,
        },
    ];
    let notes = dev.state().notifications;
    let mut tokens = [None; 4];
    drv.submit_nb_many(&requests, &mut tokens).unwrap();
    assert_eq!(
        dev.state().notifications,
        notes + 1,
        "one notification for all"
    );
    let tokens: Vec<NbToken> = tokens.iter().map(|t| t.unwrap()).collect();
    assert_eq!(drv.nb_in_flight(), 4);
    for t in &tokens {
        assert_eq!(drv.poll_nb(t), None, "in flight: no outcome yet");
    }
    // Synchronous requests and batches share requestq: refused, nothing sent.
    assert_eq!(drv.map(1, 8 * G, 9 * G - 1, 0, RW), Err(IommuError::Busy));
    assert_eq!(drv.batch().submit().err(), Some(IommuError::Busy));
    assert!(!drv.is_broken());

    release(&dev, Behaviour::Reverse);
    // Collected in an order unlike both the posting and the completion order.
    assert_eq!(drv.poll_nb(&tokens[1]), Some(Ok(())));
    assert_eq!(
        drv.poll_nb(&tokens[2]),
        Some(Err(IommuError::Status(Status::Inval)))
    );
    assert_eq!(drv.poll_nb(&tokens[0]), Some(Ok(())));
    assert_eq!(drv.poll_nb(&tokens[3]), Some(Ok(())));
    assert_eq!(drv.nb_in_flight(), 0);
    // Collected: stale.
    assert_eq!(drv.poll_nb(&tokens[0]), Some(Err(IommuError::UnknownToken)));
    let s = dev.state();
    assert!(s.mappings.contains(&Mapping {
        domain: 1,
        start: 2 * G,
        end: 3 * G - 1,
        phys: 0x10_1000,
        flags: RW.bits(),
    }));
    assert!(s.attached.contains(&(24, 2)));
    drop(s);
    // Synchronous requests work again.
    drv.unmap(1, G, 3 * G - 1).unwrap();
}

#[test]
fn a_device_that_never_answers_gives_pending_not_a_hang_and_not_broken() {
    let (dev, mut drv) = held();
    let t = drv.submit_nb(map(0)).unwrap();
    // `common`'s driver waits at most 10 000 polls.
    assert_eq!(drv.wait_nb(&t), Err(IommuError::Pending));
    assert!(
        !drv.is_broken(),
        "a non-blocking wait that ends is not fatal"
    );
    assert_eq!(drv.nb_in_flight(), 1);
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.wait_nb(&t), Ok(()));
    assert_eq!(drv.wait_nb(&t), Err(IommuError::UnknownToken));
}

#[test]
fn slots_are_bounded_and_dropped_tokens_are_reclaimed_without_dangling() {
    let (dev, mut drv) = held();
    for i in 0..NB_SLOTS as u64 {
        // Tokens dropped on purpose: the slots stay the driver's.
        let _ = drv.submit_nb(map(i)).unwrap();
    }
    assert_eq!(drv.submit_nb(map(99)).err(), Some(IommuError::Busy));
    let notes = dev.state().notifications;
    let requests = dev.state().requests;
    let mut one = [None];
    assert_eq!(
        drv.submit_nb_many(&[map(99)], &mut one),
        Err(IommuError::Busy)
    );
    assert_eq!(dev.state().notifications, notes, "Busy sends nothing");
    // Lost tokens: reclaim marks every slot to be freed when the device returns it.
    assert_eq!(drv.reclaim_nb(), NB_SLOTS);
    assert_eq!(
        drv.nb_in_flight(),
        NB_SLOTS,
        "still the device's until returned"
    );
    assert_eq!(drv.submit_nb(map(99)).err(), Some(IommuError::Busy));
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.process_completions(), Ok(NB_SLOTS as u32));
    assert_eq!(drv.nb_in_flight(), 0);
    assert_eq!(dev.state().requests, requests + NB_SLOTS as u64);
    // Every slot is free again.
    let mut tokens = [None; NB_SLOTS];
    let unmaps: Vec<NbRequest> = (0..NB_SLOTS as u64)
        .map(|i| {
            NbRequest::Op(BatchOp::Unmap {
                domain: 1,
                virt_start: (i + 1) * G,
                virt_end: (i + 2) * G - 1,
            })
        })
        .collect();
    drv.submit_nb_many(&unmaps, &mut tokens).unwrap();
    for t in tokens {
        assert_eq!(drv.poll_nb(&t.unwrap()), Some(Ok(())));
    }
    assert!(dev.state().mappings.is_empty());
}

#[test]
fn a_discarded_request_frees_its_slot_when_the_device_returns_it() {
    let (dev, mut drv) = held();
    let a = drv.submit_nb(map(0)).unwrap();
    let b = drv.submit_nb(map(1)).unwrap();
    assert!(drv.discard_nb(a));
    assert!(!drv.discard_nb(a), "discarded: the token is unknown");
    assert_eq!(drv.nb_in_flight(), 2, "still the device's until returned");
    assert_eq!(drv.poll_nb(&a), Some(Err(IommuError::UnknownToken)));
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.poll_nb(&b), Some(Ok(())));
    assert_eq!(drv.nb_in_flight(), 0);
    // A completed, uncollected request can be discarded too.
    let c = drv.submit_nb(map(2)).unwrap();
    assert_eq!(drv.process_completions(), Ok(1));
    assert!(drv.discard_nb(c));
    assert_eq!(drv.poll_nb(&c), Some(Err(IommuError::UnknownToken)));
    // The slot's generation moved on: a token of an earlier use of a slot never reads a later
    // request's result. All 32 slots are taken again, so one of these requests reuses `c`'s
    // slot whatever order the driver picks free slots in, and every one of them must get its
    // own outcome while `c` stays unknown.
    dev.state().behaviour = Behaviour::Hold;
    let fillers: Vec<NbToken> = (0..NB_SLOTS as u64 - 1)
        .map(|i| drv.submit_nb(map(10 + i)).unwrap())
        .collect();
    let d = drv.submit_nb(map(3)).unwrap();
    assert_eq!(drv.nb_in_flight(), NB_SLOTS);
    assert_ne!(c, d);
    assert_eq!(drv.poll_nb(&c), Some(Err(IommuError::UnknownToken)));
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.poll_nb(&c), Some(Err(IommuError::UnknownToken)));
    assert_eq!(drv.poll_nb(&d), Some(Ok(())));
    for t in &fillers {
        assert_eq!(drv.poll_nb(t), Some(Ok(())));
    }
    assert_eq!(drv.nb_in_flight(), 0);
}

#[test]
fn validation_errors_send_nothing() {
    let (dev, mut drv) = held();
    let notes = dev.state().notifications;
    let bad = NbRequest::Op(BatchOp::Map {
        domain: 1,
        virt_start: G + 1,
        virt_end: 2 * G - 1,
        phys_start: 0,
        flags: RW,
    });
    let mut tokens = [None, None];
    assert!(matches!(
        drv.submit_nb_many(&[map(0), bad], &mut tokens),
        Err(IommuError::Unaligned { .. })
    ));
    assert_eq!(tokens, [None, None]);
    assert_eq!(drv.nb_in_flight(), 0);
    assert_eq!(dev.state().notifications, notes);
    assert_eq!(
        drv.submit_nb_many(&[map(0)], &mut tokens),
        Err(IommuError::BufferSize)
    );
}

#[test]
fn a_used_id_of_no_request_is_fatal() {
    let (dev, mut drv) = held();
    let t = drv.submit_nb(map(0)).unwrap();
    release(&dev, Behaviour::WrongId);
    assert_eq!(drv.poll_nb(&t), Some(Err(IommuError::DeviceProtocol)));
    assert!(drv.is_broken());
    assert_eq!(drv.poll_nb(&t), Some(Err(IommuError::Broken)));
    assert_eq!(drv.submit_nb(map(1)).err(), Some(IommuError::Broken));
}

#[test]
fn bad_used_lengths_and_unwritten_tails_are_per_token_outcomes() {
    let (dev, mut drv) = held();
    let t = drv.submit_nb(map(0)).unwrap();
    release(&dev, Behaviour::UsedLen(0));
    assert_eq!(drv.poll_nb(&t), Some(Err(IommuError::NoResponse)));
    assert!(!drv.is_broken());
    dev.state().behaviour = Behaviour::NoWrite;
    let t = drv.submit_nb(map(1)).unwrap();
    assert_eq!(drv.poll_nb(&t), Some(Err(IommuError::NotWritten)));
    assert!(
        drv.is_broken(),
        "an unwritten tail is fatal, as for synchronous requests"
    );
}

fn flags(dev: &FakeDevice) -> (u16, u16) {
    let s = dev.state();
    (s.avail_flags(0), s.avail_flags(1))
}

#[test]
fn interrupt_enable_and_disable_set_the_avail_flags_of_both_queues() {
    let dev = FakeDevice::new();
    let mut drv = dev.driver();
    // After new(): requestq polled (NO_INTERRUPT), eventq interrupting.
    assert_eq!(flags(&dev), (1, 0));
    drv.enable_interrupts();
    assert_eq!(flags(&dev), (0, 0));
    drv.disable_interrupts();
    assert_eq!(flags(&dev), (1, 1));
    drv.set_interrupts(true, false);
    assert_eq!(flags(&dev), (0, 1));
    // Requests still complete either way (they are polled).
    drv.attach(1, 16).unwrap();
}

/// A held PROBE-capable device (probe_size 512) and a driver with endpoint 16 in domain 1.
fn held_with_probe() -> (
    FakeDevice,
    virtio_iommu_driver::VirtIOIommu<common::FakeHal, common::FakeTransport>,
) {
    let dev = FakeDevice::with_probe(512);
    let mut drv = dev.driver();
    drv.attach(1, 16).unwrap();
    dev.state().behaviour = Behaviour::Hold;
    (dev, drv)
}

/// The reserved regions of a non-blocking PROBE's properties.
fn regions(
    out: &mut Vec<ReservedRegion>,
) -> impl FnMut(virtio_iommu_driver::parse::ProbeProperty) + '_ {
    move |p| {
        if let virtio_iommu_driver::parse::ProbeProperty::ResvMem(r) = p {
            out.push(r)
        }
    }
}

#[test]
fn a_non_blocking_probe_runs_beside_other_requests_and_delivers_its_properties() {
    let (dev, mut drv) = held_with_probe();
    let notes = dev.state().notifications;
    let probe = drv.submit_probe_nb(16).unwrap();
    let t = drv.submit_nb(map(0)).unwrap();
    assert_eq!(dev.state().notifications, notes + 2);
    assert_eq!(drv.nb_in_flight(), 2);
    // One PROBE at a time; synchronous requests (which share the request buffer) refused.
    assert_eq!(drv.submit_probe_nb(24).err(), Some(IommuError::Busy));
    assert_eq!(drv.probe(16, |_| {}), Err(IommuError::Busy));
    // Its token is not a slot request's, and stays valid after being refused there.
    assert_eq!(drv.poll_nb(&probe), Some(Err(IommuError::UnknownToken)));
    assert_eq!(
        drv.poll_probe_nb(&t, |_| {}),
        Some(Err(IommuError::UnknownToken))
    );
    let mut found = Vec::new();
    assert_eq!(drv.poll_probe_nb(&probe, regions(&mut found)), None);
    assert!(found.is_empty());
    release(&dev, Behaviour::Reverse);
    assert_eq!(drv.poll_nb(&t), Some(Ok(())));
    assert_eq!(drv.poll_probe_nb(&probe, regions(&mut found)), Some(Ok(())));
    assert_eq!(
        found,
        [ReservedRegion {
            kind: ResvMemKind::Msi,
            start: 0x0800_0000,
            end: 0x080f_ffff,
        }]
    );
    assert_eq!(dev.state().probes, 1);
    // Collected: the token is gone, the slot free again, synchronous requests work.
    assert_eq!(
        drv.poll_probe_nb(&probe, |_| {}),
        Some(Err(IommuError::UnknownToken))
    );
    assert_eq!(drv.nb_in_flight(), 0);
    let again = drv.submit_probe_nb(24).unwrap();
    let mut of_24 = Vec::new();
    assert_eq!(drv.wait_probe_nb(&again, regions(&mut of_24)), Ok(()));
    assert_eq!(of_24.len(), 1);
    drv.map(1, 8 * G, 9 * G - 1, 0, RW).unwrap();
    assert!(!drv.is_broken());
}

#[test]
fn non_blocking_probe_errors_are_its_own_and_typed() {
    // Unknown endpoint: the device's S_NOENT, the driver still usable.
    let dev = FakeDevice::with_probe(512);
    let mut drv = dev.driver();
    let t = drv.submit_probe_nb(999).unwrap();
    assert_eq!(
        drv.wait_probe_nb(&t, |_| panic!("no property of a failed PROBE")),
        Err(IommuError::Status(Status::NoEnt))
    );
    assert!(!drv.is_broken());
    // Without F_PROBE nothing is sent.
    let plain = FakeDevice::new();
    let mut drv2 = plain.driver();
    let notes = plain.state().notifications;
    assert!(matches!(
        drv2.submit_probe_nb(16),
        Err(IommuError::NotNegotiated(_))
    ));
    assert_eq!(plain.state().notifications, notes);
    // A wrong used length: typed, not fatal.
    dev.state().behaviour = Behaviour::UsedLen(4);
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(
        drv.poll_probe_nb(&t, |_| {}),
        Some(Err(IommuError::BadUsedLength {
            used: 4,
            expected: 516
        }))
    );
    assert!(!drv.is_broken());
    // Properties left unwritten under a written status: NotWritten.
    dev.state().behaviour = Behaviour::StatusOnly;
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(
        drv.poll_probe_nb(&t, |_| {}),
        Some(Err(IommuError::NotWritten))
    );
    assert!(
        !drv.is_broken(),
        "a written status: the request did complete"
    );
    // A device that never answers: Pending, bounded, the token still valid; discarding it
    // frees the slot once the device returns it.
    let (dev, mut drv) = held_with_probe();
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(drv.wait_probe_nb(&t, |_| {}), Err(IommuError::Pending));
    assert!(!drv.is_broken());
    assert!(drv.discard_nb(t));
    assert_eq!(drv.submit_probe_nb(16).err(), Some(IommuError::Busy));
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.process_completions(), Ok(1));
    assert_eq!(drv.nb_in_flight(), 0);
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(drv.wait_probe_nb(&t, |_| {}), Ok(()));
    // No used bytes: NoResponse, not fatal.
    dev.state().behaviour = Behaviour::UsedLen(0);
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(
        drv.poll_probe_nb(&t, |_| {}),
        Some(Err(IommuError::NoResponse))
    );
    assert!(!drv.is_broken());
    // An unwritten tail is fatal, as for every request: found when the completion is
    // collected, before (and whether or not) the PROBE itself is polled.
    dev.state().behaviour = Behaviour::NoWrite;
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(drv.process_completions(), Ok(1));
    assert!(drv.is_broken());
    assert_eq!(
        drv.poll_probe_nb(&t, |_| {}),
        Some(Err(IommuError::NotWritten))
    );
    // The same for a discarded PROBE, which is never polled.
    let (dev, mut drv) = held_with_probe();
    let t = drv.submit_probe_nb(16).unwrap();
    assert!(drv.discard_nb(t));
    release(&dev, Behaviour::NoWrite);
    assert_eq!(drv.process_completions(), Ok(1));
    assert!(drv.is_broken());
}

#[test]
fn a_probe_reply_waiting_to_be_collected_keeps_synchronous_requests_out_of_its_buffer() {
    let dev = FakeDevice::with_probe(512);
    let mut drv = dev.driver();
    let t = drv.submit_probe_nb(16).unwrap();
    // Collected by the interrupt side; the main code polls later.
    assert_eq!(drv.process_completions(), Ok(1));
    assert_eq!(drv.nb_in_flight(), 0);
    // The reply is still in the request buffer: synchronous requests would overwrite it.
    assert_eq!(drv.probe(999, |_| {}), Err(IommuError::Busy));
    let mut reply = [0u8; 4];
    assert_eq!(
        drv.request_raw(&[&[1, 0, 0, 0]], &[4], &mut reply),
        Err(IommuError::Busy)
    );
    assert_eq!(drv.attach(1, 16), Err(IommuError::Busy));
    // Batches have their own buffer: not held up.
    assert!(drv.batch().submit().is_ok());
    let probes = dev.state().probes;
    let mut found = Vec::new();
    assert_eq!(drv.poll_probe_nb(&t, regions(&mut found)), Some(Ok(())));
    assert_eq!(found.len(), 1, "endpoint 16's own reply");
    assert_eq!(dev.state().probes, probes, "nothing else was sent");
    drv.attach(1, 16).unwrap();
    // Discarding a completed PROBE frees the buffer as well.
    let t = drv.submit_probe_nb(16).unwrap();
    assert_eq!(drv.process_completions(), Ok(1));
    assert!(drv.discard_nb(t));
    drv.probe(16, |_| {}).unwrap();
}

#[test]
fn the_probe_beside_all_slots_is_busy_when_requestq_has_no_room() {
    let dev = FakeDevice::with_probe(512);
    dev.state().max_queue_size = 64;
    let mut drv = dev.driver();
    drv.attach(1, 16).unwrap();
    dev.state().behaviour = Behaviour::Hold;
    let tokens: Vec<NbToken> = (0..NB_SLOTS as u64)
        .map(|i| drv.submit_nb(map(i)).unwrap())
        .collect();
    // 32 requests fill the 64 descriptors: the PROBE waits, nothing breaks.
    assert_eq!(drv.submit_probe_nb(16).err(), Some(IommuError::Busy));
    assert!(!drv.is_broken());
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.poll_nb(&tokens[0]), Some(Ok(())));
    // The other way round: the PROBE first, then only 31 slot requests fit.
    let (dev, mut drv) = {
        let dev = FakeDevice::with_probe(512);
        dev.state().max_queue_size = 64;
        let mut drv = dev.driver();
        drv.attach(1, 16).unwrap();
        dev.state().behaviour = Behaviour::Hold;
        (dev, drv)
    };
    let p = drv.submit_probe_nb(16).unwrap();
    let reqs: Vec<NbRequest> = (0..NB_SLOTS as u64).map(map).collect();
    let mut all = vec![None; NB_SLOTS];
    assert_eq!(
        drv.submit_nb_many(&reqs, &mut all),
        Err(IommuError::Busy),
        "nothing sent"
    );
    assert_eq!(drv.nb_in_flight(), 1);
    let mut some = vec![None; NB_SLOTS - 1];
    drv.submit_nb_many(&reqs[..NB_SLOTS - 1], &mut some)
        .unwrap();
    assert_eq!(drv.nb_in_flight(), NB_SLOTS);
    assert!(!drv.is_broken());
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.wait_probe_nb(&p, |_| {}), Ok(()));
    for t in some {
        assert_eq!(drv.poll_nb(&t.unwrap()), Some(Ok(())));
    }
}

#[test]
fn probe_tokens_go_stale_and_reclaim_and_broken_drivers_cover_the_probe() {
    let (dev, mut drv) = held_with_probe();
    let first = drv.submit_probe_nb(16).unwrap();
    // Reclaimed while in flight: the token is unknown, the slot freed when the device answers.
    assert_eq!(drv.reclaim_nb(), 1);
    assert_eq!(
        drv.poll_probe_nb(&first, |_| {}),
        Some(Err(IommuError::UnknownToken))
    );
    assert_eq!(drv.submit_probe_nb(16).err(), Some(IommuError::Busy));
    release(&dev, Behaviour::InOrder);
    assert_eq!(drv.process_completions(), Ok(1));
    assert_eq!(drv.nb_in_flight(), 0);
    // A new PROBE takes the slot again; the first token stays unknown.
    let second = drv.submit_probe_nb(16).unwrap();
    assert_eq!(
        drv.poll_probe_nb(&first, |_| {}),
        Some(Err(IommuError::UnknownToken))
    );
    // Completed, then reclaimed before being collected: freed, the buffer usable again.
    assert_eq!(drv.process_completions(), Ok(1));
    assert_eq!(drv.reclaim_nb(), 1);
    assert_eq!(
        drv.poll_probe_nb(&second, |_| {}),
        Some(Err(IommuError::UnknownToken))
    );
    drv.probe(16, |_| {}).unwrap();
    // On a driver broken by another request, a PROBE still in flight is Broken, not pending.
    dev.state().behaviour = Behaviour::Hold;
    let p = drv.submit_probe_nb(16).unwrap();
    let m = drv.submit_nb(map(0)).unwrap();
    release(&dev, Behaviour::WrongId);
    assert_eq!(drv.poll_nb(&m), Some(Err(IommuError::DeviceProtocol)));
    assert!(drv.is_broken());
    assert_eq!(drv.poll_probe_nb(&p, |_| {}), Some(Err(IommuError::Broken)));
}
