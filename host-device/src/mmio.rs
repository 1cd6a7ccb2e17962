//! virtio-mmio register model, version 2 (modern) only (virtio v1.3 §4.2.2), in front of a
//! [`SharedDevice`].
//!
//! Registers below 0x100 are 32-bit: only 4-byte, 4-byte-aligned accesses are honoured; other
//! accesses read as zeroes and writes are ignored. The configuration space at 0x100 accepts
//! 1, 2, 4 and 8-byte naturally aligned accesses (reads of other sizes give zeroes, writes are
//! ignored); see [`crate::IommuDevice::write_config`] for what a write may change. Nothing here can
//! panic, whatever the offsets and values.
//!
//! Queue addresses and sizes are latched in shadow registers and handed to the device when the
//! driver writes `QueueReady = 1`; a configuration the device refuses (bad size, misaligned or
//! outside guest memory) sets DEVICE_NEEDS_RESET and leaves the queue not ready. Writes to a
//! queue's registers while it is ready are ignored (virtio §4.2.2.2 forbids them).
//!
//! A `QueueNotify` write of requestq runs every processing round the notification owes before
//! it returns (see [`crate::IommuDevice::notify`]), unlocking the device between rounds.
//!
//! The register-level misbehaviours of the config's fault plan ([`crate::fault`]:
//! `ConfigGenerationUnstable`, `FeaturesChangeAfterFeaturesOk`'s `DeviceFeatures`,
//! `StatusAfterReset`, `QueueNumMax`, `ConfigBytes`) are implemented here, where those
//! registers are read.

use std::sync::Arc;

use vm_memory::GuestMemoryBackend;

use crate::config::DeviceConfig;

use crate::device::{lock, status, QueueSetup, SharedDevice, NUM_QUEUES};
use crate::fault::{FaultCounters, Misbehaviour};

/// `MagicValue`: "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2, the modern (non-legacy) virtio-mmio interface.
pub const VERSION: u32 = 2;
/// `VendorID` reported by this model: 0x554d4551 ("QEMU" little-endian), as QEMU does.
pub const VENDOR_ID: u32 = 0x554d_4551;
/// Size in bytes of the register window, configuration space included (0x100 + 40 rounded up).
pub const MMIO_SIZE: u64 = 0x200;

/// Register offsets (virtio v1.3 §4.2.2, table "MMIO Device Register Layout").
pub mod reg {
    /// R: magic value.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// R: version.
    pub const VERSION: u64 = 0x004;
    /// R: device ID.
    pub const DEVICE_ID: u64 = 0x008;
    /// R: vendor ID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// R: 32 bits of device features selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// W: device feature word selection.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// W: 32 bits of driver features selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// W: driver feature word selection.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// W: queue selection.
    pub const QUEUE_SEL: u64 = 0x030;
    /// R: maximum queue size of the selected queue (0 if it does not exist).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// W: queue size.
    pub const QUEUE_NUM: u64 = 0x038;
    /// RW: queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// W: queue notifier (value = queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// R: interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// W: interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// RW: device status.
    pub const STATUS: u64 = 0x070;
    /// W: descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// W: descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// W: driver area address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// W: driver area address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// W: device area address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// W: device area address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// W: shared memory region selection.
    pub const SHM_SEL: u64 = 0x0ac;
    /// R: shared memory region length, low 32 bits (all ones: no region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// R: shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// R: shared memory region base, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// R: shared memory region base, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// RW: queue reset (only with VIRTIO_F_RING_RESET, never offered here: reads 0).
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// R: configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    num: u32,
    desc: u64,
    driver: u64,
    device: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// The virtio-mmio register window of one virtio-iommu.
#[derive(Debug)]
pub struct MmioDevice<M: GuestMemoryBackend> {
    device: SharedDevice<M>,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: [QueueRegs; NUM_QUEUES],
    /// The device's configuration (fixed for its life): its fault plan is read here.
    config: Arc<DeviceConfig>,
    /// Opportunity counters of the register-level misbehaviours.
    faults: FaultCounters,
    /// Reads of `ConfigGeneration` that returned an injected value (added to the real one).
    generation_skew: u32,
}

impl<M: GuestMemoryBackend> MmioDevice<M> {
    /// A register window for `device`, all selectors at 0.
    pub fn new(device: SharedDevice<M>) -> Self {
        let config = lock(&device).config().clone();
        Self {
            config,
            device,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: [QueueRegs::default(); NUM_QUEUES],
            faults: FaultCounters::default(),
            generation_skew: 0,
        }
    }

    /// The device behind the registers.
    pub fn device(&self) -> &SharedDevice<M> {
        &self.device
    }

    fn selected_queue(&self) -> Option<u16> {
        u16::try_from(self.queue_sel)
            .ok()
            .filter(|&q| usize::from(q) < NUM_QUEUES)
    }

    fn clear_shadows(&mut self) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queues = [QueueRegs::default(); NUM_QUEUES];
    }

    /// MMIO read of `data.len()` bytes at byte `offset` of the window. Invalid accesses give
    /// zeroes.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            let len = data.len();
            if matches!(len, 1 | 2 | 4 | 8) && offset.is_multiple_of(len as u64) {
                lock(&self.device).read_config(offset - reg::CONFIG, data);
                self.inject_config_bytes(offset - reg::CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// [`Misbehaviour::ConfigBytes`]: overlays the configured bytes on a config read of
    /// `data.len()` bytes at config offset `at`.
    fn inject_config_bytes(&mut self, at: u64, data: &mut [u8]) {
        let plan = self.config.fault_plan();
        if plan.is_empty() {
            return;
        }
        let end = at.saturating_add(data.len() as u64);
        let hit = self.faults.fire(plan, |m, _| match m {
            Misbehaviour::ConfigBytes { offset, bytes } => {
                let (o, e) = (u64::from(*offset), u64::from(*offset) + bytes.len() as u64);
                o < end && at < e
            }
            _ => false,
        });
        if let Some(Misbehaviour::ConfigBytes { offset, bytes }) = hit {
            for (i, b) in bytes.iter().enumerate() {
                let pos = u64::from(*offset) + i as u64;
                if let Some(d) = pos
                    .checked_sub(at)
                    .and_then(|p| usize::try_from(p).ok())
                    .and_then(|p| data.get_mut(p))
                {
                    *d = *b;
                }
            }
            lock(&self.device).note_fault_injected();
        }
    }

    /// A register-level misbehaviour `pick` of the fault plan for this read, if one applies.
    fn inject_reg(&mut self, pick: impl Fn(&Misbehaviour) -> bool) -> Option<Misbehaviour> {
        let plan = self.config.fault_plan();
        if plan.is_empty() {
            return None;
        }
        self.faults.fire(plan, |m, _| pick(m)).cloned()
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let injected = match offset {
            reg::CONFIG_GENERATION => {
                self.inject_reg(|m| matches!(m, Misbehaviour::ConfigGenerationUnstable))
            }
            reg::QUEUE_NUM_MAX => self.inject_reg(|m| matches!(m, Misbehaviour::QueueNumMax(_))),
            reg::STATUS if lock(&self.device).status() == 0 => {
                self.inject_reg(|m| matches!(m, Misbehaviour::StatusAfterReset(_)))
            }
            _ => None,
        };
        let mut dev = lock(&self.device);
        match injected {
            Some(Misbehaviour::QueueNumMax(n)) => {
                dev.note_fault_injected();
                return n;
            }
            Some(Misbehaviour::StatusAfterReset(v)) => {
                dev.note_fault_injected();
                return u32::from(v);
            }
            Some(_) => {
                dev.note_fault_injected();
                self.generation_skew = self.generation_skew.wrapping_add(1);
                return dev.config_generation().wrapping_add(self.generation_skew);
            }
            None => {}
        }
        let features_ok = dev.status() & status::FEATURES_OK != 0;
        let offered = match self.config.fault_plan().features_after_ok() {
            Some(bits) if features_ok => bits,
            _ => dev.device_features(),
        };
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => virtio_iommu_driver::wire::VIRTIO_ID_IOMMU,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => offered as u32,
                1 => (offered >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => match self.selected_queue() {
                Some(_) => u32::from(dev.config().queue_size()),
                None => 0,
            },
            reg::QUEUE_READY => self
                .selected_queue()
                .and_then(|q| dev.queue(q))
                .map_or(0, |q| u32::from(virtio_queue::QueueT::ready(q))),
            reg::INTERRUPT_STATUS => dev.interrupt_status(),
            reg::STATUS => u32::from(dev.status()),
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => dev.config_generation().wrapping_add(self.generation_skew),
            _ => 0,
        }
    }

    /// MMIO write of `data` at byte `offset` of the window. Invalid accesses are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            let len = data.len();
            if matches!(len, 1 | 2 | 4 | 8) && offset.is_multiple_of(len as u64) {
                lock(&self.device).write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let ready = self.selected_queue().is_some_and(|q| {
            lock(&self.device)
                .queue(q)
                .is_some_and(virtio_queue::QueueT::ready)
        });
        let sel = self.selected_queue().map(usize::from);
        let shadow = match sel {
            Some(i) if !ready => self.queues.get_mut(i),
            _ => None,
        };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                lock(&self.device).write_driver_features(self.driver_features_sel, v)
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(s) = shadow {
                    s.num = v;
                }
            }
            reg::QUEUE_DESC_LOW => shadow.into_iter().for_each(|s| set_low(&mut s.desc, v)),
            reg::QUEUE_DESC_HIGH => shadow.into_iter().for_each(|s| set_high(&mut s.desc, v)),
            reg::QUEUE_DRIVER_LOW => shadow.into_iter().for_each(|s| set_low(&mut s.driver, v)),
            reg::QUEUE_DRIVER_HIGH => shadow.into_iter().for_each(|s| set_high(&mut s.driver, v)),
            reg::QUEUE_DEVICE_LOW => shadow.into_iter().for_each(|s| set_low(&mut s.device, v)),
            reg::QUEUE_DEVICE_HIGH => shadow.into_iter().for_each(|s| set_high(&mut s.device, v)),
            reg::QUEUE_READY => self.write_queue_ready(v),
            reg::QUEUE_NOTIFY => {
                if let Ok(q) = u16::try_from(v) {
                    lock(&self.device).notify(q);
                    // The rounds this notification owes (bounded: see `IommuDevice::notify`),
                    // the device unlocked between them.
                    while lock(&self.device).service() > 0 {}
                }
            }
            reg::INTERRUPT_ACK => lock(&self.device).ack_interrupt(v),
            reg::STATUS => {
                let value = (v & 0xff) as u8;
                lock(&self.device).write_status(value);
                if value == 0 {
                    self.clear_shadows();
                }
            }
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        let Some(regs) = self.queues.get(usize::from(q)).copied() else {
            return;
        };
        let mut dev = lock(&self.device);
        if v == 0 {
            dev.deactivate_queue(q);
            return;
        }
        if dev.queue(q).is_some_and(virtio_queue::QueueT::ready) {
            return;
        }
        let setup = QueueSetup {
            size: u16::try_from(regs.num).unwrap_or(0),
            desc_table: regs.desc,
            avail_ring: regs.driver,
            used_ring: regs.device,
        };
        if dev.activate_queue(q, setup).is_err() {
            dev.set_needs_reset();
        }
    }
}
