//! The device core through the transport interface (`transport::VirtioCore`), directly and
//! behind a shared `Arc<Mutex<_>>`: the IDs a transport reports, and interrupts raised with
//! their cause (the virtqueue for a used buffer, Config for DEVICE_NEEDS_RESET) — what a
//! virtio-pci transport needs to pick the MSI-X vector.

mod common;

use std::sync::{Arc, Mutex};

use common::{bytes, mem, Harness};
use virtio_iommu_device::transport::{InterruptCause, VirtioCore};
use virtio_iommu_device::{DeviceConfig, IommuDevice};
use virtio_iommu_driver::wire::{Status, REQUESTQ};

type Causes = Arc<Mutex<Vec<InterruptCause>>>;

fn recorder(causes: &Causes) -> virtio_iommu_device::transport::InterruptHandler {
    let causes = causes.clone();
    Box::new(move |cause| causes.lock().unwrap().push(cause))
}

#[test]
fn ids_and_queues_through_a_shared_core() {
    let config = DeviceConfig::builder().endpoint(1).build().unwrap();
    let size = config.queue_size();
    let shared = Arc::new(Mutex::new(IommuDevice::new(config, mem()).unwrap()));
    let mut core = shared.clone();
    assert_eq!(VirtioCore::device_id(&core), 23);
    assert_eq!(VirtioCore::pci_class(&core), 0x00_ff_00);
    assert_eq!(VirtioCore::num_queues(&core), 2);
    assert_eq!(VirtioCore::queue_max_size(&core, 0), size);
    assert_eq!(VirtioCore::queue_max_size(&core, 1), size);
    assert_eq!(VirtioCore::queue_max_size(&core, 2), 0);
    assert_eq!(VirtioCore::queue_max_size(&core, u16::MAX), 0);
    // A status write through the shared core reaches the device.
    VirtioCore::write_status(&mut core, 1);
    assert_eq!(shared.lock().unwrap().status(), 1);

    let causes = Causes::default();
    VirtioCore::set_interrupt_handler(&mut core, Some(recorder(&causes)));
    shared.lock().unwrap().set_needs_reset();
    assert_eq!(*causes.lock().unwrap(), [InterruptCause::Config]);
}

#[test]
fn a_used_request_interrupts_with_its_queue() {
    let m = mem();
    let mut h = Harness::new(&m, DeviceConfig::builder().endpoint(1).build().unwrap());
    let causes = Causes::default();
    VirtioCore::set_interrupt_handler(&mut h.dev, Some(recorder(&causes)));
    assert_eq!(h.status(&bytes(&common::attach(1, 1, 0))), Status::Ok as u8);
    assert_eq!(*causes.lock().unwrap(), [InterruptCause::Queue(REQUESTQ)]);
}
