//! The PCI configuration space of a virtio-pci function (PCI Local Bus 3.0 §6.1, type 0
//! header) and its capability list (virtio v1.3 §4.1.4), laid out as QEMU lays out a
//! modern virtio-pci device on a PCI Express root bus (observed with QEMU 11.1: vendor
//! capabilities COMMON at 0x40, ISR at 0x50, DEVICE at 0x60, NOTIFY at 0x70, PCI_CFG at
//! 0x84, MSI-X at 0x98, the list starting with the last one added).
//!
//! Writes go through a per-byte write mask, as QEMU's `wmask`: BAR size probing (write all
//! ones, read back the size mask and the read-only type bits) falls out of it. Bytes past the
//! 256-byte header read as zero and ignore writes.

use super::msix::MsixLayout;
use super::{cap, reg, MODERN_BAR, MODERN_BAR_SIZE, MSIX_BAR, NOTIFY_OFF_MULTIPLIER};
use super::{region, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID};

/// Size in bytes of the modelled (conventional) configuration space.
const SIZE: usize = 256;

/// Command register bits the driver may set: memory space (1), bus master (2), INTx
/// disable (10).
pub const COMMAND_WRITABLE: u16 = 0x0406;
/// Command bit 10: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 0x0400;
/// Status bit 3: interrupt status (the INTx level).
pub const STATUS_INTERRUPT: u16 = 0x0008;
/// Status bit 4: capability list present.
pub const STATUS_CAP_LIST: u16 = 0x0010;
/// MSI-X Message Control bit 15: enable.
pub const MSIX_ENABLE: u16 = 0x8000;
/// MSI-X Message Control bit 14: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 0x4000;

/// The 256 bytes of configuration space and their write masks.
pub(super) struct ConfigSpace {
    bytes: [u8; SIZE],
    wmask: [u8; SIZE],
    msix: bool,
}

/// What a configuration write touched (side effects for the caller).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Touched {
    pub command: bool,
    pub msix_control: bool,
    pub pci_cfg_data: bool,
}

fn overlaps(offset: u64, len: u64, start: u64, size: u64) -> bool {
    offset < start + size && start < offset.saturating_add(len)
}

impl ConfigSpace {
    /// Power-on configuration space of a function for virtio device `device_id` with PCI class
    /// `class` (24 bits) and an MSI-X table of `msix` (none: no MSI-X capability, no BAR1).
    pub fn new(device_id: u32, class: u32, msix: Option<MsixLayout>) -> Self {
        let mut c = Self {
            bytes: [0; SIZE],
            wmask: [0; SIZE],
            msix: msix.is_some(),
        };
        c.set16(reg::VENDOR_ID, VENDOR_ID);
        c.set16(reg::DEVICE_ID, 0x1040u16.wrapping_add(device_id as u16));
        c.set16(reg::STATUS, STATUS_CAP_LIST);
        c.bytes[reg::REVISION] = super::REVISION;
        c.bytes[reg::CLASS..reg::CLASS + 3].copy_from_slice(&class.to_le_bytes()[..3]);
        c.set16(reg::SUBSYSTEM_VENDOR_ID, SUBSYSTEM_VENDOR_ID);
        c.set16(reg::SUBSYSTEM_ID, SUBSYSTEM_ID);
        c.bytes[reg::INTERRUPT_PIN] = 1;
        c.set16w(reg::COMMAND, COMMAND_WRITABLE);
        c.wmask[reg::CACHE_LINE_SIZE] = 0xff;
        c.wmask[reg::INTERRUPT_LINE] = 0xff;

        // BAR4+5: 64-bit prefetchable memory (type bits 0b1100, read-only).
        let bar4 = reg::BAR0 + 4 * usize::from(MODERN_BAR);
        c.set32(bar4, 0xc);
        c.set32w(bar4, !(MODERN_BAR_SIZE as u32 - 1));
        c.set32w(bar4 + 4, u32::MAX);

        // Virtio vendor capabilities, each pointing to the previous one, as QEMU chains them.
        let mut next = 0u8;
        for (at, cfg_type, (offset, length)) in [
            (cap::COMMON, cap::TYPE_COMMON, region::COMMON),
            (cap::ISR, cap::TYPE_ISR, region::ISR),
            (cap::DEVICE, cap::TYPE_DEVICE, region::DEVICE),
            (cap::NOTIFY, cap::TYPE_NOTIFY, region::NOTIFY),
        ] {
            let len = if cfg_type == cap::TYPE_NOTIFY { 20 } else { 16 };
            c.vendor_cap(at, next, len, cfg_type);
            c.bytes[at + 4] = MODERN_BAR;
            c.set32(at + 8, offset as u32);
            c.set32(at + 12, length as u32);
            next = at as u8;
        }
        c.set32(cap::NOTIFY + 16, NOTIFY_OFF_MULTIPLIER);
        // PCI_CFG (§4.1.4.9): bar, offset, length and data writable.
        c.vendor_cap(cap::PCI_CFG, next, 20, cap::TYPE_PCI_CFG);
        c.wmask[cap::PCI_CFG + 4] = 0xff;
        c.set32w(cap::PCI_CFG + 8, u32::MAX);
        c.set32w(cap::PCI_CFG + 12, u32::MAX);
        c.set32w(cap::PCI_CFG_DATA, u32::MAX);
        next = cap::PCI_CFG as u8;

        if let Some(l) = msix {
            let bar1 = reg::BAR0 + 4 * usize::from(MSIX_BAR);
            // 32-bit, non-prefetchable memory: type bits 0.
            c.set32w(bar1, !(l.bar_size as u32 - 1));
            c.bytes[cap::MSIX] = 0x11;
            c.bytes[cap::MSIX + 1] = next;
            c.set16(cap::MSIX + 2, l.vectors - 1);
            c.wmask[cap::MSIX + 3] = (MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes()[1];
            c.set32(cap::MSIX + 4, u32::from(MSIX_BAR));
            c.set32(cap::MSIX + 8, l.pba_offset as u32 | u32::from(MSIX_BAR));
            next = cap::MSIX as u8;
        }
        c.bytes[reg::CAPABILITIES] = next;
        c
    }

    fn vendor_cap(&mut self, at: usize, next: u8, len: u8, cfg_type: u8) {
        self.bytes[at] = 0x09;
        self.bytes[at + 1] = next;
        self.bytes[at + 2] = len;
        self.bytes[at + 3] = cfg_type;
    }

    fn set16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set16w(&mut self, at: usize, v: u16) {
        self.wmask[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32w(&mut self, at: usize, v: u32) {
        self.wmask[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }
    fn get32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }

    /// Reads `data.len()` bytes at `offset`; the status register's interrupt bit is
    /// `intx_level`. Bytes outside the header read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8], intx_level: bool) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            *b = match at {
                Some(a) if a == reg::STATUS && intx_level => self.bytes[a] | STATUS_INTERRUPT as u8,
                Some(a) => self.bytes.get(a).copied().unwrap_or(0),
                None => 0,
            };
        }
    }

    /// Writes `data` at `offset` through the write masks; returns what was touched.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Touched {
        for (i, &b) in data.iter().enumerate() {
            let Some(a) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
            else {
                break;
            };
            if let (Some(byte), Some(&m)) = (self.bytes.get_mut(a), self.wmask.get(a)) {
                *byte = (*byte & !m) | (b & m);
            }
        }
        let len = data.len() as u64;
        Touched {
            command: overlaps(offset, len, reg::COMMAND as u64, 2),
            msix_control: self.msix && overlaps(offset, len, cap::MSIX as u64 + 2, 2),
            pci_cfg_data: overlaps(offset, len, cap::PCI_CFG_DATA as u64, 4),
        }
    }

    /// Whether an access of `len` bytes at `offset` overlaps the PCI_CFG data window.
    pub fn overlaps_pci_cfg_data(offset: u64, len: usize) -> bool {
        overlaps(offset, len as u64, cap::PCI_CFG_DATA as u64, 4)
    }

    pub fn command(&self) -> u16 {
        self.get16(reg::COMMAND)
    }

    /// MSI-X Message Control: (enabled, function masked).
    pub fn msix_control(&self) -> (bool, bool) {
        if !self.msix {
            return (false, false);
        }
        let c = self.get16(cap::MSIX + 2);
        (c & MSIX_ENABLE != 0, c & MSIX_FUNCTION_MASK != 0)
    }

    /// The PCI_CFG capability's window: (bar, offset, length).
    pub fn pci_cfg(&self) -> (u8, u32, u32) {
        (
            self.bytes[cap::PCI_CFG + 4],
            self.get32(cap::PCI_CFG + 8),
            self.get32(cap::PCI_CFG + 12),
        )
    }

    /// The PCI_CFG data bytes.
    pub fn pci_cfg_data(&self) -> [u8; 4] {
        let d = cap::PCI_CFG_DATA;
        [
            self.bytes[d],
            self.bytes[d + 1],
            self.bytes[d + 2],
            self.bytes[d + 3],
        ]
    }

    /// Stores bytes read through the PCI_CFG window into its data field.
    pub fn set_pci_cfg_data(&mut self, data: &[u8]) {
        for (i, &b) in data.iter().take(4).enumerate() {
            self.bytes[cap::PCI_CFG_DATA + i] = b;
        }
    }
}
