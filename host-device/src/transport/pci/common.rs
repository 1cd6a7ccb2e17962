//! The common configuration structure (virtio v1.3 §4.1.4.3, `struct virtio_pci_common_cfg`)
//! in front of a [`VirtioCore`].
//!
//! Registers are dispatched on the access's start offset with its value zero-extended, as
//! QEMU's `virtio_pci_common_read/write` do: a driver uses each field's own width, and 64-bit
//! fields (`queue_desc`, `queue_driver`, `queue_device`) may be accessed as one 8-byte access
//! or as two 4-byte halves. Other offsets read 0 and ignore writes. `queue_notify_data`,
//! `queue_reset` and the admin queue fields exist only with features this transport does not
//! offer (VIRTIO_F_NOTIF_CONFIG_DATA, VIRTIO_F_RING_RESET, VIRTIO_F_ADMIN_VQ): they read 0.

use std::sync::Mutex;

use crate::device::QueueSetup;
use crate::transport::VirtioCore;

use super::msix::{lock, Interrupts};

/// Byte offsets of the common configuration fields (§4.1.4.3) within its region.
pub mod common_cfg {
    /// RW u32: device feature word selection.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// R u32: 32 bits of device features selected by `DEVICE_FEATURE_SELECT`.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// RW u32: driver feature word selection.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// RW u32: 32 bits of driver features selected by `DRIVER_FEATURE_SELECT`.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// RW u16: MSI-X vector for configuration changes.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// R u16: number of virtqueues.
    pub const NUM_QUEUES: u64 = 0x12;
    /// RW u8: device status (§2.1); 0 resets the device.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// R u8: configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// RW u16: queue selection.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// RW u16: size (descriptors) of the selected queue; reads its maximum after reset.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// RW u16: MSI-X vector of the selected queue.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// RW u16: 1 enables the selected queue.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// R u16: notification offset of the selected queue, in units of the notify multiplier.
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// RW u64: descriptor table address.
    pub const QUEUE_DESC: u64 = 0x20;
    /// RW u64: driver area (available ring) address.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// RW u64: device area (used ring) address.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// R u16: notification data (VIRTIO_F_NOTIF_CONFIG_DATA only; reads 0 here).
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    /// RW u16: queue reset (VIRTIO_F_RING_RESET only; reads 0, writes ignored here).
    pub const QUEUE_RESET: u64 = 0x3a;
}

use common_cfg as cc;

/// The transport's shadow of one virtqueue's configuration.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// Selectors and per-queue registers of the common configuration.
pub(super) struct CommonCfg {
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    queues: Vec<QueueRegs>,
}

fn set_half(v: &mut u64, high: bool, half: u64) {
    let half = half & 0xffff_ffff;
    *v = if high {
        (*v & 0xffff_ffff) | (half << 32)
    } else {
        (*v & !0xffff_ffff) | half
    };
}

impl CommonCfg {
    /// Reset values for `core`: every queue disabled, its size at the maximum.
    pub fn new<C: VirtioCore>(core: &C) -> Self {
        let n = core.num_queues();
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            queues: (0..n)
                .map(|q| QueueRegs {
                    size: core.queue_max_size(q),
                    ..QueueRegs::default()
                })
                .collect(),
        }
    }

    /// Whether queue `q` was enabled (and accepted by the core).
    pub fn queue_enabled(&self, q: u16) -> bool {
        self.queues.get(usize::from(q)).is_some_and(|r| r.enabled)
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Reads the register at `off` (an access of 1, 2 or 4 bytes), zero-extended.
    pub fn read<C: VirtioCore>(&self, core: &C, irq: &Mutex<Interrupts>, off: u64) -> u32 {
        let q = self.selected();
        let sel = self.queue_select;
        match off {
            cc::DEVICE_FEATURE_SELECT => self.device_feature_select,
            cc::DEVICE_FEATURE => match self.device_feature_select {
                0 => core.device_features() as u32,
                1 => (core.device_features() >> 32) as u32,
                _ => 0,
            },
            cc::DRIVER_FEATURE_SELECT => self.driver_feature_select,
            cc::DRIVER_FEATURE => match self.driver_feature_select {
                0 => core.driver_features() as u32,
                1 => (core.driver_features() >> 32) as u32,
                _ => 0,
            },
            cc::CONFIG_MSIX_VECTOR => u32::from(lock(irq).config_vector()),
            cc::NUM_QUEUES => u32::from(core.num_queues()),
            cc::DEVICE_STATUS => u32::from(core.status()),
            cc::CONFIG_GENERATION => core.config_generation() & 0xff,
            cc::QUEUE_SELECT => u32::from(sel),
            cc::QUEUE_SIZE => q.map_or(0, |r| u32::from(r.size)),
            cc::QUEUE_MSIX_VECTOR => u32::from(lock(irq).queue_vector(sel)),
            cc::QUEUE_ENABLE => q.map_or(0, |r| u32::from(r.enabled)),
            // Queues map to notification slots in order, as QEMU's.
            cc::QUEUE_NOTIFY_OFF => q.map_or(0, |_| u32::from(sel)),
            cc::QUEUE_DESC => q.map_or(0, |r| r.desc as u32),
            0x24 => q.map_or(0, |r| (r.desc >> 32) as u32),
            cc::QUEUE_DRIVER => q.map_or(0, |r| r.driver as u32),
            0x2c => q.map_or(0, |r| (r.driver >> 32) as u32),
            cc::QUEUE_DEVICE => q.map_or(0, |r| r.device as u32),
            0x34 => q.map_or(0, |r| (r.device >> 32) as u32),
            _ => 0,
        }
    }

    /// Writes `val` (an access of 1, 2 or 4 bytes, zero-extended) at `off`.
    pub fn write<C: VirtioCore>(
        &mut self,
        core: &mut C,
        irq: &Mutex<Interrupts>,
        off: u64,
        val: u32,
    ) {
        let sel = self.queue_select;
        match off {
            cc::DEVICE_FEATURE_SELECT => self.device_feature_select = val,
            cc::DRIVER_FEATURE_SELECT => self.driver_feature_select = val,
            cc::DRIVER_FEATURE => core.write_driver_features(self.driver_feature_select, val),
            cc::CONFIG_MSIX_VECTOR => lock(irq).set_config_vector(val as u16),
            cc::DEVICE_STATUS => {
                core.write_status(val as u8);
                if core.status() == 0 {
                    self.device_reset(core, irq);
                }
            }
            cc::QUEUE_SELECT => self.queue_select = val as u16,
            cc::QUEUE_SIZE => {
                if let Some(r) = self.shadow() {
                    r.size = val as u16;
                }
            }
            cc::QUEUE_MSIX_VECTOR => lock(irq).set_queue_vector(sel, val as u16),
            cc::QUEUE_ENABLE if val == 1 => self.enable(core, sel),
            cc::QUEUE_DESC | 0x24 => {
                if let Some(r) = self.shadow() {
                    set_half(&mut r.desc, off == 0x24, u64::from(val));
                }
            }
            cc::QUEUE_DRIVER | 0x2c => {
                if let Some(r) = self.shadow() {
                    set_half(&mut r.driver, off == 0x2c, u64::from(val));
                }
            }
            cc::QUEUE_DEVICE | 0x34 => {
                if let Some(r) = self.shadow() {
                    set_half(&mut r.device, off == 0x34, u64::from(val));
                }
            }
            _ => {}
        }
    }

    /// The selected queue's registers, unless the queue is enabled: they are read-only then
    /// (§4.1.4.3.2: the driver must not change them); its vector stays writable.
    fn shadow(&mut self) -> Option<&mut QueueRegs> {
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|r| !r.enabled)
    }

    /// `queue_enable = 1`: hands the shadow registers to the core. A size that is 0, above
    /// the maximum or not a power of two (split virtqueues, §2.7), or a configuration the core
    /// refuses, leaves the queue disabled (it reads back 0).
    fn enable<C: VirtioCore>(&mut self, core: &mut C, q: u16) {
        let max = core.queue_max_size(q);
        let Some(r) = self.queues.get_mut(usize::from(q)) else {
            return;
        };
        if r.enabled {
            return;
        }
        if r.size == 0 || r.size > max || !r.size.is_power_of_two() {
            log::warn!("virtio-pci: queue {q}: size {} refused", r.size);
            return;
        }
        let setup = QueueSetup {
            size: r.size,
            desc_table: r.desc,
            avail_ring: r.driver,
            used_ring: r.device,
        };
        match core.activate_queue(q, setup) {
            Ok(()) => r.enabled = true,
            Err(e) => log::warn!("virtio-pci: queue {q} not enabled: {e}"),
        }
    }

    /// A device reset (§4.1.4.3.1): selectors 0, every queue disabled with its size back at
    /// the maximum and its addresses 0, every vector NO_VECTOR.
    pub fn device_reset<C: VirtioCore>(&mut self, core: &C, irq: &Mutex<Interrupts>) {
        *self = Self::new(core);
        lock(irq).device_reset();
    }
}
