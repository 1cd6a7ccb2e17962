//! Virtio transports (virtio v1.3 §4) in front of a transport-independent device core.
//!
//! A transport turns register accesses into calls on a [`VirtioCore`]: feature words, device
//! status, queue setup, notifications, the device-specific configuration space and the interrupt
//! status. The same core runs behind any transport; a device model (the virtio-iommu in
//! [`crate::device`], the virtio-blk endpoint in `crate::endpoints`) implements the trait once.
//!
//! - [`crate::mmio`]: virtio-mmio version 2 (§4.2).
//! - [`pci`]: modern virtio-pci (§4.1), [`pci::VirtioPciFunction`], a
//!   [`crate::function::PciFunction`] laid out as QEMU's virtio-pci devices.

pub mod pci;

use crate::device::{QueueError, QueueSetup};

/// Why a device core asks for an interrupt (virtio §2.3, §4.1.4.5, §4.2.2 `InterruptStatus`).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum InterruptCause {
    /// A used buffer was added to virtqueue `index` (virtio-mmio `InterruptStatus` bit 0; the
    /// queue's MSI-X vector on virtio-pci).
    Queue(u16),
    /// The device configuration changed, or DEVICE_NEEDS_RESET was set (bit 1; the config
    /// MSI-X vector on virtio-pci).
    Config,
}

/// Callback through which a core raises interrupts; the transport routes them (interrupt status
/// and an INTx line, or an MSI-X vector).
pub type InterruptHandler = Box<dyn FnMut(InterruptCause) + Send>;

/// The transport-independent part of a virtio device, as a transport drives it.
///
/// Every method must accept any argument without panicking: the values come from the guest.
pub trait VirtioCore: Send {
    /// The guest memory the core reaches (its rings, and its buffers unless translated).
    type Memory;
    /// Virtio device ID (§5: 2 = block, 23 = IOMMU).
    fn device_id(&self) -> u32;
    /// 24-bit PCI class code (base class, subclass, programming interface) a virtio-pci
    /// transport reports for this device type.
    fn pci_class(&self) -> u32;
    /// Replaces the guest memory (a vfio-user client's DMA mappings changed); queue
    /// configurations are kept and re-checked against it at their next use.
    fn set_memory(&mut self, mem: Self::Memory);
    /// Number of virtqueues.
    fn num_queues(&self) -> u16;
    /// Largest size (in descriptors) of virtqueue `index`; 0 if it does not exist.
    fn queue_max_size(&self, index: u16) -> u16;
    /// Offered feature bits.
    fn device_features(&self) -> u64;
    /// Feature bits written by the driver so far.
    fn driver_features(&self) -> u64;
    /// Writes 32 bits of driver features: `select` 0 is bits 0..32, 1 is bits 32..64; other
    /// selectors are ignored, as are writes after FEATURES_OK.
    fn write_driver_features(&mut self, select: u32, value: u32);
    /// Device status byte (§2.1).
    fn status(&self) -> u8;
    /// Writes the device status; 0 resets the device (§2.1.2).
    fn write_status(&mut self, value: u8);
    /// Interrupt status bits (bit 0: used buffer, bit 1: configuration change).
    fn interrupt_status(&self) -> u32;
    /// Clears the given interrupt status bits.
    fn ack_interrupt(&mut self, bits: u32);
    /// Configuration generation counter.
    fn config_generation(&self) -> u32;
    /// Reads `data.len()` bytes of the device-specific configuration space at byte `offset`;
    /// bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Hands the device a queue configuration (the driver enabled the queue).
    ///
    /// # Errors
    /// [`QueueError`] when the index, size or addresses are not acceptable; the queue stays
    /// disabled.
    fn activate_queue(&mut self, index: u16, setup: QueueSetup) -> Result<(), QueueError>;
    /// Disables a queue.
    fn deactivate_queue(&mut self, index: u16);
    /// The driver notified virtqueue `index` (§2.9). Runs at most one bounded round of work.
    fn notify(&mut self, index: u16);
    /// Whether a notification still owes work (another round of [`VirtioCore::service`]).
    fn pending(&self) -> bool;
    /// Runs one owed round; returns the number of chains processed.
    fn service(&mut self) -> usize;
    /// Installs (or removes) the interrupt callback.
    fn set_interrupt_handler(&mut self, handler: Option<InterruptHandler>);
}

/// A shared core (such as a [`crate::SharedDevice`]) behind a transport: every call locks the
/// mutex, recovering it if a holder panicked.
impl<C: VirtioCore> VirtioCore for std::sync::Arc<std::sync::Mutex<C>> {
    type Memory = C::Memory;
    fn device_id(&self) -> u32 {
        lock(self).device_id()
    }
    fn pci_class(&self) -> u32 {
        lock(self).pci_class()
    }
    fn set_memory(&mut self, mem: Self::Memory) {
        lock(self).set_memory(mem);
    }
    fn num_queues(&self) -> u16 {
        lock(self).num_queues()
    }
    fn queue_max_size(&self, index: u16) -> u16 {
        lock(self).queue_max_size(index)
    }
    fn device_features(&self) -> u64 {
        lock(self).device_features()
    }
    fn driver_features(&self) -> u64 {
        lock(self).driver_features()
    }
    fn write_driver_features(&mut self, select: u32, value: u32) {
        lock(self).write_driver_features(select, value);
    }
    fn status(&self) -> u8 {
        lock(self).status()
    }
    fn write_status(&mut self, value: u8) {
        lock(self).write_status(value);
    }
    fn interrupt_status(&self) -> u32 {
        lock(self).interrupt_status()
    }
    fn ack_interrupt(&mut self, bits: u32) {
        lock(self).ack_interrupt(bits);
    }
    fn config_generation(&self) -> u32 {
        lock(self).config_generation()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(self).read_config(offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(self).write_config(offset, data);
    }
    fn activate_queue(&mut self, index: u16, setup: QueueSetup) -> Result<(), QueueError> {
        lock(self).activate_queue(index, setup)
    }
    fn deactivate_queue(&mut self, index: u16) {
        lock(self).deactivate_queue(index);
    }
    fn notify(&mut self, index: u16) {
        lock(self).notify(index);
    }
    fn pending(&self) -> bool {
        lock(self).pending()
    }
    fn service(&mut self) -> usize {
        lock(self).service()
    }
    fn set_interrupt_handler(&mut self, handler: Option<InterruptHandler>) {
        lock(self).set_interrupt_handler(handler);
    }
}

fn lock<C>(m: &std::sync::Mutex<C>) -> std::sync::MutexGuard<'_, C> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
