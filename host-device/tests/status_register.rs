//! The device status byte and what it gates (virtio §2.1, §3.1.1; README "Status"): bits are
//! only added by driver writes, the driver cannot set DEVICE_NEEDS_RESET, 0 resets the device,
//! and requests/events are processed only with FEATURES_OK and DRIVER_OK set and neither
//! DEVICE_NEEDS_RESET nor FAILED. Also DEVICE_NEEDS_RESET's configuration-change interrupt
//! (§2.1.2) and reset's effects (§5.13.5, D4).

mod common;

use std::sync::{Arc, Mutex};

use common::{mem, Harness};
use virtio_iommu_device::device::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use virtio_iommu_device::device::{INT_CONFIG, INT_VRING};
use virtio_iommu_device::{Access, DeviceConfig, FaultRecord};
use virtio_iommu_driver::wire::{Features, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_R_DOMAIN};

const RUNNING: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

fn config() -> DeviceConfig {
    DeviceConfig::builder().endpoints([1, 2]).build().unwrap()
}

/// A device with its queues ready, the offered features written, but no status written.
fn idle(m: &common::Mem) -> Harness<'_> {
    let mut h = Harness::idle(m, config());
    let f = h.dev.device_features();
    h.dev.write_driver_features(0, f as u32);
    h.dev.write_driver_features(1, (f >> 32) as u32);
    h
}

/// Posts one ATTACH, notifies requestq; returns whether it was answered.
fn one_request_answered(h: &mut Harness<'_>) -> bool {
    let before = h.rq_used_idx();
    h.post_attach(1);
    h.dev.notify(0);
    h.rq_used_idx() != before
}

fn fault(endpoint: u32, address: u64) -> FaultRecord {
    FaultRecord {
        reason: FAULT_R_DOMAIN,
        flags: FAULT_F_READ | FAULT_F_ADDRESS,
        endpoint,
        address,
    }
}

#[test]
fn status_bits_are_only_added_by_driver_writes() {
    let m = mem();
    let mut h = idle(&m);
    assert_eq!(h.dev.status(), 0);
    h.dev.write_status(ACKNOWLEDGE);
    assert_eq!(h.dev.status(), ACKNOWLEDGE);
    h.dev.write_status(ACKNOWLEDGE);
    assert_eq!(h.dev.status(), ACKNOWLEDGE, "rewriting a bit keeps it");
    h.dev.write_status(DRIVER);
    assert_eq!(
        h.dev.status(),
        ACKNOWLEDGE | DRIVER,
        "a cleared bit is ignored"
    );
    h.dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    h.dev.write_status(ACKNOWLEDGE);
    assert_eq!(h.dev.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    h.dev.write_status(RUNNING);
    assert_eq!(h.dev.status(), RUNNING);
    h.dev.write_status(DRIVER_OK);
    assert_eq!(h.dev.status(), RUNNING);
}

#[test]
fn the_driver_cannot_set_device_needs_reset() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(ACKNOWLEDGE | DEVICE_NEEDS_RESET);
    assert_eq!(h.dev.status(), ACKNOWLEDGE);
    assert!(!h.dev.needs_reset());
    h.dev.write_status(0xff);
    assert_eq!(h.dev.status() & DEVICE_NEEDS_RESET, 0);
    assert!(!h.dev.needs_reset());
    assert_eq!(h.dev.counters().needs_reset, 0);
}

#[test]
fn requests_are_processed_only_when_running() {
    let m = mem();
    // Every prefix of the initialisation sequence: nothing processed.
    for s in [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | DRIVER_OK,
    ] {
        let mut h = idle(&m);
        if s != 0 {
            h.dev.write_status(s);
        }
        assert_eq!(h.dev.status(), s);
        assert!(!one_request_answered(&mut h), "status {s:#x}");
        assert_eq!(h.dev.process_requestq(), 0, "status {s:#x}");
        assert_eq!(h.dev.state().domain_count(), 0);
    }
    // DRIVER_OK with FEATURES_OK refused (VERSION_1 missing): still nothing.
    let mut h = Harness::idle(&m, config());
    h.dev
        .write_driver_features(0, Features::MAP_UNMAP.bits() as u32);
    h.dev.write_status(RUNNING);
    assert_eq!(h.dev.status(), ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert!(!one_request_answered(&mut h));
    // Running: processed, and the chains posted earlier are processed with it.
    let mut h = idle(&m);
    h.post_attach(2);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 0);
    h.dev.write_status(RUNNING);
    assert!(one_request_answered(&mut h));
    assert_eq!(h.rq_used_idx(), 2);
    assert_eq!(h.dev.state().endpoint_domain(1), Some(1));
    assert_eq!(h.dev.state().endpoint_domain(2), Some(1));
}

#[test]
fn failed_stops_processing() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(RUNNING);
    assert!(one_request_answered(&mut h));
    h.dev.write_status(RUNNING | FAILED);
    assert_eq!(h.dev.status(), RUNNING | FAILED);
    assert!(!one_request_answered(&mut h));
    // Events stop too.
    h.post_event_buffer(64);
    h.dev.report_fault(fault(1, 0x1000));
    assert_eq!(h.eq_used_idx(), 0);
    assert_eq!(h.dev.pending_faults(), 1);
}

#[test]
fn device_needs_reset_stops_processing_until_reset() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(RUNNING);
    assert!(one_request_answered(&mut h));
    assert!(!h.dev.needs_reset());
    h.dev.set_needs_reset();
    assert!(h.dev.needs_reset());
    assert_eq!(h.dev.status(), RUNNING | DEVICE_NEEDS_RESET);
    assert!(!one_request_answered(&mut h));
    h.post_event_buffer(64);
    h.dev.report_fault(fault(1, 0x1000));
    assert_eq!(h.eq_used_idx(), 0, "no event delivered");
    // Reset clears it.
    h.dev.write_status(0);
    assert!(!h.dev.needs_reset());
    assert_eq!(h.dev.status(), 0);
}

#[test]
fn device_needs_reset_raises_one_configuration_change_interrupt() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(RUNNING);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    h.dev
        .set_irq_handler(Some(Box::new(move |bits| s.lock().unwrap().push(bits))));
    h.dev.set_needs_reset();
    h.dev.set_needs_reset();
    assert_eq!(h.dev.counters().needs_reset, 1, "counted once");
    assert_eq!(h.dev.interrupt_status(), INT_CONFIG);
    assert_eq!(*seen.lock().unwrap(), [INT_CONFIG]);
    assert_eq!(
        h.dev.status(),
        RUNNING | DEVICE_NEEDS_RESET,
        "other bits kept"
    );
    // After a reset it can be set (and counted) again.
    h.dev.write_status(0);
    h.dev.set_needs_reset();
    assert_eq!(h.dev.counters().needs_reset, 2);
    assert_eq!(*seen.lock().unwrap(), [INT_CONFIG, INT_CONFIG]);
}

#[test]
fn used_buffers_raise_the_vring_interrupt_and_ack_clears_only_the_given_bits() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(RUNNING);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    h.dev
        .set_irq_handler(Some(Box::new(move |bits| s.lock().unwrap().push(bits))));
    assert_eq!(h.dev.interrupt_status(), 0);
    assert!(one_request_answered(&mut h));
    assert_eq!(h.dev.interrupt_status(), INT_VRING);
    assert_eq!(h.dev.counters().interrupts, 1);
    assert!(one_request_answered(&mut h));
    assert_eq!(h.dev.counters().interrupts, 2);
    assert_eq!(*seen.lock().unwrap(), [INT_VRING, INT_VRING]);
    h.dev.set_needs_reset();
    assert_eq!(h.dev.interrupt_status(), INT_VRING | INT_CONFIG);
    h.dev.ack_interrupt(INT_VRING);
    assert_eq!(h.dev.interrupt_status(), INT_CONFIG);
    h.dev.ack_interrupt(0);
    assert_eq!(h.dev.interrupt_status(), INT_CONFIG);
    h.dev.ack_interrupt(INT_CONFIG);
    assert_eq!(h.dev.interrupt_status(), 0);
    // Removing the handler: interrupts still latch in the status.
    h.dev.set_irq_handler(None);
    h.dev.write_status(0);
    assert_eq!(h.dev.interrupt_status(), 0);
}

#[test]
fn a_notification_with_nothing_available_uses_nothing_and_raises_no_interrupt() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(RUNNING);
    assert_eq!(h.dev.process_requestq(), 0);
    h.dev.notify(0);
    h.dev.notify(1);
    assert_eq!(h.dev.interrupt_status(), 0);
    assert_eq!(h.dev.counters().interrupts, 0);
    assert_eq!(h.rq_used_idx(), 0);
    // Other queue indexes are ignored.
    h.post_attach(1);
    h.dev.notify(2);
    h.dev.notify(u16::MAX);
    assert_eq!(h.rq_used_idx(), 0);
    h.dev.notify(1);
    assert_eq!(
        h.rq_used_idx(),
        0,
        "an eventq notification does not process requests"
    );
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 1);
}

#[test]
fn driver_ok_delivers_pending_faults() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let a = h.post_event_buffer(24);
    // D9: an unattached endpoint's access faults even before the driver is ready.
    assert!(h.dev.translate(1, 0x5000, 4, Access::READ).is_err());
    h.dev.notify(1);
    assert_eq!(h.eq_used_idx(), 0, "not running: kept");
    assert_eq!(h.dev.pending_faults(), 1);
    h.dev.write_status(RUNNING);
    assert_eq!(h.eq_used_idx(), 1, "delivered when DRIVER_OK is set");
    assert_eq!(h.eq_used(0).1, 24);
    assert_eq!(h.dev.pending_faults(), 0);
    let mut rec = [0u8; 24];
    vm_memory::Bytes::read_slice(&m, &mut rec, vm_memory::GuestAddress(a)).unwrap();
    assert_eq!(rec[0], FAULT_R_DOMAIN);
    assert_eq!(
        u32::from_le_bytes(rec[4..8].try_into().unwrap()),
        FAULT_F_READ | FAULT_F_ADDRESS
    );
    assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), 1);
    assert_eq!(u64::from_le_bytes(rec[16..24].try_into().unwrap()), 0x5000);
    assert_eq!(h.dev.counters().faults_delivered, 1);
}

#[test]
fn status_zero_resets_the_device_and_keeps_bypass_and_counters() {
    let m = mem();
    let config = DeviceConfig::builder()
        .endpoints([1, 2])
        .max_pending_faults(4)
        .build()
        .unwrap();
    let mut h = Harness::new(&m, config);
    assert_eq!(h.dev.status(), RUNNING);
    // bypass = 1, a domain with endpoint 1, a pending fault (no event buffer), an interrupt.
    h.dev.write_config(36, &[1]);
    assert!(h.dev.state().bypass());
    assert!(one_request_answered(&mut h));
    h.dev.report_fault(fault(2, 0));
    assert_eq!(h.dev.pending_faults(), 1);
    assert_ne!(h.dev.interrupt_status(), 0);
    let counters = h.dev.counters();
    let generation = h.dev.config_generation();
    h.dev.write_status(0);
    assert_eq!(h.dev.status(), 0);
    assert_eq!(h.dev.driver_features(), 0);
    assert_eq!(h.dev.negotiated_features(), Features::empty());
    assert_eq!(
        h.dev.state().domain_count(),
        0,
        "§5.13.5: every domain destroyed"
    );
    assert_eq!(h.dev.state().endpoint_domain(1), None);
    assert_eq!(h.dev.pending_faults(), 0);
    assert_eq!(h.dev.interrupt_status(), 0);
    assert!(
        h.dev.state().bypass(),
        "D4: bypass kept across device reset"
    );
    assert_eq!(h.dev.config_generation(), generation);
    assert_eq!(h.dev.counters(), counters, "counters are never reset");
    for q in 0..2 {
        assert!(
            !virtio_queue::QueueT::ready(h.dev.queue(q).unwrap()),
            "queue {q}"
        );
    }
}

#[test]
fn system_reset_restores_boot_bypass_and_bumps_the_generation_only_on_change() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    assert!(!h.dev.state().bypass(), "boot value 0");
    assert_eq!(h.dev.config_generation(), 0);
    h.dev.write_config(36, &[1]);
    assert_eq!(h.dev.config_generation(), 1);
    h.dev.system_reset();
    assert_eq!(h.dev.status(), 0);
    assert!(!h.dev.state().bypass(), "D4: restored on system reset");
    assert_eq!(h.dev.config_generation(), 2, "bypass changed");
    h.dev.system_reset();
    assert!(!h.dev.state().bypass());
    assert_eq!(
        h.dev.config_generation(),
        2,
        "unchanged bypass, same generation"
    );
    // A device booting with bypass = 1.
    let config = DeviceConfig::builder()
        .endpoint(1)
        .boot_bypass(true)
        .build()
        .unwrap();
    let mut h = Harness::new(&m, config);
    assert!(h.dev.state().bypass());
    h.dev.write_config(36, &[0]);
    assert!(!h.dev.state().bypass());
    h.dev.write_status(0);
    assert!(!h.dev.state().bypass(), "device reset keeps it");
    h.dev.system_reset();
    assert!(h.dev.state().bypass());
}

#[test]
fn debug_output_shows_the_status_and_counters() {
    let m = mem();
    let mut h = idle(&m);
    h.dev.write_status(RUNNING);
    let d = format!("{:?}", h.dev);
    assert!(d.contains("IommuDevice"), "{d}");
    assert!(d.contains(&format!("status: {RUNNING}")), "{d}");
    assert!(d.contains("counters"), "{d}");
}
