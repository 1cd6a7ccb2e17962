//! Modern (non-transitional) virtio-pci transport (virtio v1.3 §4.1) in front of a
//! [`VirtioCore`], as a [`PciFunction`] a vfio-user server serves.
//!
//! The function is laid out as QEMU lays out its modern virtio-pci devices
//! (`hw/virtio/virtio-pci.c`; checked against QEMU 11.1's `virtio-iommu-pci` and
//! `virtio-blk-pci` config space):
//!
//! - IDs: vendor 0x1af4, device 0x1040 + virtio device ID, revision 1, subsystem
//!   0x1af4:0x1100 (QEMU's default), class from [`VirtioCore::pci_class`], interrupt pin INTA.
//! - BAR1: the MSI-X table (offset 0) and PBA (offset 2048), 32-bit memory, 4 KiB for up to
//!   128 vectors ([`MsixLayout`]); absent without MSI-X.
//! - BAR4 (+5): 64-bit prefetchable memory, 16 KiB: common configuration at 0x0000, ISR at
//!   0x1000, device configuration at 0x2000, notifications at 0x3000 (multiplier 4, queue
//!   `i` at 0x3000 + 4·i), each region 4 KiB (so at most QEMU's 1024 queues have a slot).
//! - Capabilities (list at 0x34): MSI-X at 0x98 → PCI_CFG at 0x84 → NOTIFY at 0x70 →
//!   DEVICE at 0x60 → ISR at 0x50 → COMMON at 0x40 (without MSI-X the list starts at 0x84).
//!
//! Register semantics: [`common_cfg`] for the common configuration; the ISR byte reads and
//! clears (§4.1.4.5); a write anywhere in notification slot `i` notifies queue `i` (one
//! processing round; [`PciFunction::poll`] runs the rounds it owes); the device configuration
//! window goes to [`VirtioCore::read_config`]/[`VirtioCore::write_config`] (1, 2, 4 or 8-byte
//! accesses). Accesses of other widths, or straddling a region's end, read zeros and are
//! ignored. Interrupts: a queue's used buffer sets ISR bit 0, a configuration change bit 1;
//! with MSI-X enabled the queue's or the config vector is signalled (held in the PBA while
//! masked), otherwise INTx follows the ISR.
//!
//! Locking: the core's interrupt handler (installed by [`VirtioPciFunction::new`]) only locks
//! the transport's interrupt state, never the core, and the transport never calls the core
//! while holding that state; so interrupts raised from any thread (a shared core used by
//! endpoints translating elsewhere) are routed at once, without deadlock. The
//! [`InterruptSink`] is called with that state locked: it must not call back into the function.
//!
//! Differences from QEMU: QEMU's `virtio-iommu-pci` has no MSI-X capability (it sets no
//! `vectors` default); [`VirtioPciFunction::new`] gives one with `num_queues + 1` vectors, as
//! QEMU's `virtio-blk-pci` does, and [`VirtioPciFunction::with_msix_vectors`] with 0 gives
//! QEMU's INTx-only layout. No PCI Express, power-management or legacy I/O BAR. Clearing bus
//! master does not stop the device (QEMU clears DRIVER_OK); a refused `queue_enable` leaves
//! the queue disabled without setting DEVICE_NEEDS_RESET.

mod common;
mod config_space;
mod msix;

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::function::{Bar, InterruptSink, PciFunction};
use crate::transport::VirtioCore;

pub use common::common_cfg;
pub use msix::{MsixLayout, ISR_CONFIG, ISR_QUEUE, MSIX_ENTRY_SIZE};

use common::CommonCfg;
use config_space::{ConfigSpace, COMMAND_INTX_DISABLE};
use msix::{lock, Interrupts};

/// PCI vendor ID (Red Hat / Qumranet), and the subsystem vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a modern virtio device with virtio device ID 0: add the device ID.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// PCI revision ID of a modern device (§4.1.2.1: 1 or higher).
pub const REVISION: u8 = 1;
/// Subsystem vendor ID (QEMU's `pci_default_sub_vendor_id`).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Subsystem ID (QEMU's `PCI_SUBDEVICE_ID_QEMU`).
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;
/// BAR holding the virtio structures (64-bit: BAR5 is its upper half).
pub const MODERN_BAR: u8 = 4;
/// Size in bytes of [`MODERN_BAR`].
pub const MODERN_BAR_SIZE: u64 = 0x4000;
/// `notify_off_multiplier`: bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// "No vector" for `config_msix_vector` and `queue_msix_vector` (§4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// Regions of [`MODERN_BAR`]: (byte offset, length in bytes).
pub mod region {
    /// Common configuration.
    pub const COMMON: (u64, u64) = (0x0000, 0x1000);
    /// ISR status.
    pub const ISR: (u64, u64) = (0x1000, 0x1000);
    /// Device-specific configuration.
    pub const DEVICE: (u64, u64) = (0x2000, 0x1000);
    /// Notifications: 4 bytes for each of QEMU's 1024 possible queues.
    pub const NOTIFY: (u64, u64) = (0x3000, 0x1000);
}

/// Capability offsets in configuration space and virtio `cfg_type` values (§4.1.4).
pub mod cap {
    /// VIRTIO_PCI_CAP_COMMON_CFG capability.
    pub const COMMON: usize = 0x40;
    /// VIRTIO_PCI_CAP_ISR_CFG capability.
    pub const ISR: usize = 0x50;
    /// VIRTIO_PCI_CAP_DEVICE_CFG capability.
    pub const DEVICE: usize = 0x60;
    /// VIRTIO_PCI_CAP_NOTIFY_CFG capability (20 bytes: with the multiplier).
    pub const NOTIFY: usize = 0x70;
    /// VIRTIO_PCI_CAP_PCI_CFG capability (20 bytes: with the data window).
    pub const PCI_CFG: usize = 0x84;
    /// The PCI_CFG capability's `pci_cfg_data` (4 bytes).
    pub const PCI_CFG_DATA: usize = PCI_CFG + 16;
    /// MSI-X capability (12 bytes), when present.
    pub const MSIX: usize = 0x98;
    /// `cfg_type` of the common configuration.
    pub const TYPE_COMMON: u8 = 1;
    /// `cfg_type` of the notifications.
    pub const TYPE_NOTIFY: u8 = 2;
    /// `cfg_type` of the ISR status.
    pub const TYPE_ISR: u8 = 3;
    /// `cfg_type` of the device configuration.
    pub const TYPE_DEVICE: u8 = 4;
    /// `cfg_type` of the PCI configuration access window.
    pub const TYPE_PCI_CFG: u8 = 5;
}

/// Type 0 header register offsets (PCI Local Bus 3.0 §6.1).
pub mod reg {
    /// u16 vendor ID.
    pub const VENDOR_ID: usize = 0x00;
    /// u16 device ID.
    pub const DEVICE_ID: usize = 0x02;
    /// u16 command.
    pub const COMMAND: usize = 0x04;
    /// u16 status.
    pub const STATUS: usize = 0x06;
    /// u8 revision ID.
    pub const REVISION: usize = 0x08;
    /// 3 bytes: programming interface, subclass, base class.
    pub const CLASS: usize = 0x09;
    /// u8 cache line size.
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    /// u32 BAR0 (BARn at BAR0 + 4n).
    pub const BAR0: usize = 0x10;
    /// u16 subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// u16 subsystem ID.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// u8 capabilities pointer.
    pub const CAPABILITIES: usize = 0x34;
    /// u8 interrupt line.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// u8 interrupt pin (1 = INTA).
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// A virtio device core behind a modern virtio-pci function.
pub struct VirtioPciFunction<C: VirtioCore> {
    core: C,
    config: ConfigSpace,
    common: CommonCfg,
    irq: Arc<Mutex<Interrupts>>,
}

impl<C: VirtioCore> std::fmt::Debug for VirtioPciFunction<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciFunction")
            .field("device_id", &self.core.device_id())
            .finish_non_exhaustive()
    }
}

/// The regions of [`MODERN_BAR`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Region {
    Common,
    Isr,
    Device,
    Notify,
}

impl Region {
    /// The region an access of `len` (1, 2, 4 or 8) bytes at BAR offset `offset` falls in
    /// entirely, and the offset within it; `None` for other widths or straddling accesses.
    fn locate(offset: u64, len: usize) -> Option<(Region, u64)> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return None;
        }
        [
            (Region::Common, region::COMMON),
            (Region::Isr, region::ISR),
            (Region::Device, region::DEVICE),
            (Region::Notify, region::NOTIFY),
        ]
        .into_iter()
        .find(|&(_, (base, size))| {
            offset >= base && offset.saturating_add(len as u64) <= base + size
        })
        .map(|(r, (base, _))| (r, offset - base))
    }
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

impl<C: VirtioCore> VirtioPciFunction<C> {
    /// `core` behind a function with an MSI-X table of `num_queues + 1` vectors (one per
    /// queue and one for configuration changes). Installs the core's interrupt handler.
    pub fn new(core: C) -> Self {
        let vectors = core.num_queues().saturating_add(1);
        Self::with_msix_vectors(core, vectors)
    }

    /// `core` behind a function with `vectors` MSI-X vectors (clamped to 2048); 0 gives no
    /// MSI-X capability and no BAR1 (QEMU's `virtio-iommu-pci` layout: INTx only).
    pub fn with_msix_vectors(mut core: C, vectors: u16) -> Self {
        let layout = MsixLayout::new(vectors.min(2048));
        let irq = Arc::new(Mutex::new(Interrupts::new(layout, core.num_queues())));
        let handler_irq = irq.clone();
        core.set_interrupt_handler(Some(Box::new(move |cause| {
            lock(&handler_irq).raise(cause);
        })));
        Self {
            config: ConfigSpace::new(core.device_id(), core.pci_class(), layout),
            common: CommonCfg::new(&core),
            core,
            irq,
        }
    }

    /// The device core.
    pub fn core(&self) -> &C {
        &self.core
    }

    /// The device core, mutably (calls bypass the transport's registers: queue state the
    /// transport shadows is not updated).
    pub fn core_mut(&mut self) -> &mut C {
        &mut self.core
    }

    /// Whether the driver enabled queue `index` and the core accepted it.
    pub fn queue_enabled(&self, index: u16) -> bool {
        self.common.queue_enabled(index)
    }

    fn modern_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((region, off)) = Region::locate(offset, data.len()) else {
            return;
        };
        match region {
            Region::Common => {
                // 8-byte accesses are two 4-byte ones, as QEMU splits them.
                let step = data.len().min(4);
                for (i, chunk) in data.chunks_mut(step).enumerate() {
                    let v = self
                        .common
                        .read(&self.core, &self.irq, off + (i * step) as u64);
                    chunk.copy_from_slice(&v.to_le_bytes()[..step]);
                }
            }
            Region::Isr => {
                // Any read of the ISR region returns and clears the ISR byte, as QEMU's.
                let isr = lock(&self.irq).take_isr();
                self.core.ack_interrupt(u32::from(isr));
                data[0] = isr;
            }
            Region::Device => self.core.read_config(off, data),
            Region::Notify => {}
        }
    }

    fn modern_write(&mut self, offset: u64, data: &[u8]) {
        let Some((region, off)) = Region::locate(offset, data.len()) else {
            return;
        };
        match region {
            Region::Common => {
                let step = data.len().min(4);
                for (i, chunk) in data.chunks(step).enumerate() {
                    let v = le(chunk) as u32;
                    self.common
                        .write(&mut self.core, &self.irq, off + (i * step) as u64, v);
                }
            }
            Region::Isr => {}
            Region::Device => self.core.write_config(off, data),
            Region::Notify => {
                // Whatever the value written: the slot names the queue.
                let q = off / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Ok(q) = u16::try_from(q) {
                    if q < self.core.num_queues() {
                        self.core.notify(q);
                    }
                }
            }
        }
    }

    /// The BAR access behind the PCI_CFG window (§4.1.4.9): `length` 1, 2 or 4 bytes at
    /// `offset` of BAR `bar`, `offset` a multiple of `length`; `None` otherwise.
    fn pci_cfg_window(&self) -> Option<(u8, u64, usize)> {
        let (bar, offset, length) = self.config.pci_cfg();
        (matches!(length, 1 | 2 | 4) && offset.is_multiple_of(length)).then_some((
            bar,
            u64::from(offset),
            length as usize,
        ))
    }

    fn apply_command(&mut self) {
        let disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
        lock(&self.irq).set_intx_disabled(disabled);
    }

    fn apply_msix_control(&mut self) {
        let (enabled, masked) = self.config.msix_control();
        lock(&self.irq).set_control(enabled, masked);
    }
}

impl<C: VirtioCore> Drop for VirtioPciFunction<C> {
    fn drop(&mut self) {
        self.core.set_interrupt_handler(None);
    }
}

impl<C: VirtioCore<Memory = GuestMemoryMmap>> PciFunction for VirtioPciFunction<C> {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        if ConfigSpace::overlaps_pci_cfg_data(offset, data.len()) {
            if let Some((bar, off, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.bar_read(bar, off, &mut buf[..len]);
                self.config.set_pci_cfg_data(&buf);
            }
        }
        let level = lock(&self.irq).intx_level();
        self.config.read(offset, data, level);
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let touched = self.config.write(offset, data);
        if touched.command {
            self.apply_command();
        }
        if touched.msix_control {
            self.apply_msix_control();
        }
        if touched.pci_cfg_data {
            if let Some((bar, off, len)) = self.pci_cfg_window() {
                let buf = self.config.pci_cfg_data();
                self.bar_write(bar, off, &buf[..len]);
            }
        }
    }

    fn bar(&self, index: u8) -> Option<Bar> {
        match index {
            MSIX_BAR => self.msix_layout().map(|l| Bar {
                size: l.bar_size,
                is_64bit: false,
                prefetchable: false,
            }),
            MODERN_BAR => Some(Bar {
                size: MODERN_BAR_SIZE,
                is_64bit: true,
                prefetchable: true,
            }),
            _ => None,
        }
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        match index {
            MSIX_BAR => lock(&self.irq).bar_read(offset, data),
            MODERN_BAR => self.modern_read(offset, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        match index {
            MSIX_BAR => lock(&self.irq).bar_write(offset, data),
            MODERN_BAR => self.modern_write(offset, data),
            _ => {}
        }
    }

    fn msix_vectors(&self) -> u16 {
        lock(&self.irq).vectors()
    }

    fn set_interrupt_sink(&mut self, sink: Option<Arc<dyn InterruptSink>>) {
        lock(&self.irq).set_sink(sink);
    }

    fn set_guest_memory(&mut self, mem: GuestMemoryMmap) {
        self.core.set_memory(mem);
    }

    fn reset(&mut self) {
        self.core.write_status(0);
        self.common.device_reset(&self.core, &self.irq);
        let layout = self.msix_layout();
        self.config = ConfigSpace::new(self.core.device_id(), self.core.pci_class(), layout);
        lock(&self.irq).power_on();
    }

    fn set_msix_table_in_client(&mut self, in_client: bool) {
        lock(&self.irq).set_table_in_client(in_client);
    }

    fn poll(&mut self) -> bool {
        if self.core.pending() {
            self.core.service();
        }
        self.core.pending()
    }
}

impl<C: VirtioCore> VirtioPciFunction<C> {
    fn msix_layout(&self) -> Option<MsixLayout> {
        MsixLayout::new(lock(&self.irq).vectors())
    }
}
