//! Regression tests for driver bugs found by running the driver against this device.
//! `IommuHal::dma_dealloc` used to return -1 when its UNMAP failed, and virtio-drivers'
//! `Dma::drop` asserts 0: dropping a queue of a device behind a broken IOMMU panicked (twice,
//! so the process aborted). It now leaks the still-mapped memory and returns 0.

use std::cell::RefCell;

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::DeviceConfig;
use virtio_iommu_driver::dma::{DmaContext, DmaSpace, IommuHal, IommuMapper, IovaAllocator};
use virtio_iommu_driver::wire::config_offset;
use virtio_iommu_driver::{IommuError, IommuOptions, VirtIOIommu, WaitPolicy};
use zerocopy::{FromBytes, Immutable, IntoBytes};

type Driver = VirtIOIommu<TestHal, InProcessTransport>;

thread_local! {
    static CTX: RefCell<Option<(Driver, DmaSpace)>> = const { RefCell::new(None) };
}

struct Ctx;

impl DmaContext for Ctx {
    type Inner = TestHal;
    fn with<R>(
        f: impl FnOnce(&mut dyn IommuMapper, &mut DmaSpace) -> Result<R, IommuError>,
    ) -> Result<R, IommuError> {
        CTX.with(|c| {
            let mut g = c.borrow_mut();
            let (iommu, space) = g.as_mut().ok_or(IommuError::Broken)?;
            f(iommu, space)
        })
    }
}

/// A transport for a device whose queue is only set up, never used.
struct Inert;

impl Transport for Inert {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }
    fn read_device_features(&mut self) -> u64 {
        0
    }
    fn write_driver_features(&mut self, _: u64) {}
    fn max_queue_size(&mut self, _: u16) -> u32 {
        16
    }
    fn notify(&mut self, _: u16) {}
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::empty()
    }
    fn set_status(&mut self, _: DeviceStatus) {}
    fn set_guest_page_size(&mut self, _: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(&mut self, _: u16, _: u32, _: u64, _: u64, _: u64) {}
    fn queue_unset(&mut self, _: u16) {}
    fn queue_used(&mut self, _: u16) -> bool {
        false
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        0
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, _: usize) -> virtio_drivers::Result<T> {
        Err(virtio_drivers::Error::Unsupported)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _: usize,
        _: T,
    ) -> virtio_drivers::Result<()> {
        Ok(())
    }
}

/// `IommuHal::dma_dealloc` (driver/src/dma.rs) returns -1 when the UNMAP fails, meaning to leak
/// the still-mapped memory; but virtio-drivers 0.13's `Dma::drop` asserts that `dma_dealloc`
/// returned 0, so dropping any queue (or other `Dma`) of a device behind a broken IOMMU panics;
/// a modern-layout `VirtQueue` holds two `Dma`s, the second panic happens during unwinding and
/// the process aborts. Expected: the drop leaks quietly.
#[test]
fn dropping_a_queue_behind_a_broken_iommu_does_not_panic() {
    let bed = TestBed::new(DeviceConfig::builder().endpoints([8]).build().unwrap());
    let options = IommuOptions {
        wait: WaitPolicy {
            max_polls: 1000,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    };
    let mut drv = bed.driver_with(options).unwrap();
    drv.attach(1, 8).unwrap();
    let iova = IovaAllocator::new(0, 0xffff_ffff, 4096).unwrap();
    CTX.with(|c| *c.borrow_mut() = Some((drv, DmaSpace::new(1, iova).unwrap())));
    let queue = VirtQueue::<IommuHal<Ctx>, 4>::new(&mut Inert, 0, false, false).unwrap();
    // The IOMMU breaks: an invalid config write sets DEVICE_NEEDS_RESET, so UNMAP fails.
    CTX.with(|c| {
        let mut g = c.borrow_mut();
        let (drv, _) = g.as_mut().unwrap();
        drv.transport_mut()
            .write_config_space(config_offset::PAGE_SIZE_MASK, 0u32)
            .unwrap();
    });
    drop(queue);
}
