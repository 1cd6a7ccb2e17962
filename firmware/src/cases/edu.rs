//! QEMU's `edu` device (PCI 1234:11e8) as a DMA engine: a 4 KiB internal buffer at device
//! address 0x40000 and a DMA controller that copies between it and a bus address — here an
//! IOVA, since `edu` sits behind the virtio-iommu.
//!
//! Registers (BAR0, QEMU `docs/specs/edu.rst`): 0x00 identification (0x010000ed), 0x80 DMA source,
//! 0x88 DMA destination, 0x90 DMA count (bytes), 0x98 command (bit 0 start/busy, bit 1 direction:
//! 1 = edu buffer to RAM).

use crate::timer::Deadline;

/// PCI vendor ID of `edu`.
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID of `edu`.
pub const DEVICE_ID: u16 = 0x11e8;
/// Device address of edu's internal buffer.
pub const BUFFER: u64 = 0x4_0000;
/// Size in bytes of edu's internal buffer.
pub const BUFFER_SIZE: u64 = 4096;

const REG_IDENT: usize = 0x00;
const REG_SRC: usize = 0x80;
const REG_DST: usize = 0x88;
const REG_COUNT: usize = 0x90;
const REG_CMD: usize = 0x98;
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;

/// Register access, behind a trait so the driver logic does not depend on raw pointers.
pub trait Regs {
    /// Reads a 32-bit register at byte offset `off`.
    fn read32(&self, off: usize) -> u32;
    /// Reads a 64-bit register at byte offset `off`.
    fn read64(&self, off: usize) -> u64;
    /// Writes a 64-bit register at byte offset `off`.
    fn write64(&mut self, off: usize, value: u64);
}

/// BAR0 of an `edu`, mapped as device memory by the identity map.
pub struct MmioRegs {
    base: *mut u8,
    size: usize,
}

impl MmioRegs {
    /// # Safety
    /// `base..base + size` must be the device's BAR0, mapped as device memory, and used by
    /// nothing else.
    pub unsafe fn new(base: u64, size: u64) -> Self {
        Self {
            base: base as *mut u8,
            size: size as usize,
        }
    }

    fn check(&self, off: usize, len: usize) {
        assert!(
            off + len <= self.size && off & (len - 1) == 0,
            "edu register {off:#x} out of BAR"
        );
    }
}

impl Regs for MmioRegs {
    fn read32(&self, off: usize) -> u32 {
        self.check(off, 4);
        // SAFETY: in-bounds, aligned access to the BAR that `new`'s caller vouched for.
        unsafe { core::ptr::read_volatile(self.base.add(off).cast::<u32>()) }
    }
    fn read64(&self, off: usize) -> u64 {
        self.check(off, 8);
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(self.base.add(off).cast::<u64>()) }
    }
    fn write64(&mut self, off: usize, value: u64) {
        self.check(off, 8);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(self.base.add(off).cast::<u64>(), value) }
    }
}

/// Why a DMA did not complete.
#[derive(Debug)]
pub enum EduError {
    /// The identification register does not read 0x010000ed.
    NotEdu(u32),
    /// The DMA is bigger than edu's buffer or outside it.
    TooLarge,
    /// The busy bit did not clear within the deadline.
    Timeout,
}

impl core::fmt::Display for EduError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotEdu(id) => write!(f, "identification register reads {id:#x}"),
            Self::TooLarge => write!(f, "DMA outside edu's 4 KiB buffer"),
            Self::Timeout => write!(f, "DMA did not complete"),
        }
    }
}

/// An `edu` device.
pub struct Edu<R: Regs> {
    regs: R,
}

impl<R: Regs> Edu<R> {
    /// Checks the identification register.
    pub fn new(regs: R) -> Result<Self, EduError> {
        let id = regs.read32(REG_IDENT);
        if id & 0xff != 0xed {
            return Err(EduError::NotEdu(id));
        }
        Ok(Self { regs })
    }

    /// Copies `len` bytes from bus address `iova` into edu's buffer at `offset`.
    pub fn dma_from_ram(&mut self, iova: u64, offset: u64, len: u64) -> Result<(), EduError> {
        self.dma(iova, BUFFER + offset, len, 0, offset)
    }

    /// Copies `len` bytes from edu's buffer at `offset` to bus address `iova`.
    pub fn dma_to_ram(&mut self, offset: u64, iova: u64, len: u64) -> Result<(), EduError> {
        self.dma(BUFFER + offset, iova, len, CMD_TO_RAM, offset)
    }

    fn dma(&mut self, src: u64, dst: u64, len: u64, dir: u64, offset: u64) -> Result<(), EduError> {
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > BUFFER_SIZE) {
            return Err(EduError::TooLarge);
        }
        self.wait_idle()?;
        self.regs.write64(REG_SRC, src);
        self.regs.write64(REG_DST, dst);
        self.regs.write64(REG_COUNT, len);
        self.regs.write64(REG_CMD, CMD_START | dir);
        self.wait_idle()
    }

    fn wait_idle(&mut self) -> Result<(), EduError> {
        // edu completes a DMA 100 ms (virtual time) after the command.
        let deadline = Deadline::after_ms(3000);
        while self.regs.read64(REG_CMD) & CMD_START != 0 {
            if deadline.expired() {
                return Err(EduError::Timeout);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }
}
