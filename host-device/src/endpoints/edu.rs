//! QEMU's `edu` device (QEMU `docs/specs/edu.rst`, `hw/misc/edu.c`) as a [`PciFunction`]
//! whose DMA goes through the virtio-iommu's translation for one endpoint.
//!
//! Registers of BAR0 (1 MiB, 32-bit MMIO): 0x00 identification (0x010000ed), 0x04 liveness
//! check (reads the bitwise inverse of the value written), 0x08 factorial, 0x20 status (bit 0
//! computing, bit 7 raise interrupt after factorial), 0x24 interrupt status, 0x60 interrupt
//! raise, 0x64 interrupt acknowledge, 0x80 DMA source, 0x88 DMA destination, 0x90 DMA count
//! (bytes), 0x98 DMA command (bit 0 start, bit 1 direction: 1 = buffer to RAM, bit 2 raise
//! interrupt 0x100 when done). The 4 KiB buffer lives at device address 0x40000. Registers
//! below 0x80 accept 4-byte accesses only; registers from 0x80 accept 4 and 8 bytes.
//!
//! Differences from QEMU: interrupts are INTx only (QEMU's edu also offers MSI); the
//! factorial and the DMA complete synchronously; a DMA outside the buffer is refused and
//! logged instead of aborting.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

use crate::device::SharedDevice;
use crate::function::{Bar, InterruptSink, PciFunction};
use crate::translate::EndpointIommu;

/// PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x11e8;
/// PCI revision ID.
pub const REVISION: u8 = 0x10;
/// PCI class code (base class 0xff "other", subclass 0, prog-if 0), as QEMU's.
pub const CLASS: u32 = 0xff_0000;
/// Size in bytes of BAR0.
pub const BAR0_SIZE: u64 = 1 << 20;
/// Device address of the DMA buffer.
pub const DMA_START: u64 = 0x4_0000;
/// Size in bytes of the DMA buffer.
pub const DMA_SIZE: u64 = 4096;
/// Value of the identification register.
pub const IDENT: u32 = 0x0100_00ed;

const STATUS_COMPUTING: u32 = 0x01;
const STATUS_IRQFACT: u32 = 0x80;
const DMA_RUN: u64 = 0x1;
const DMA_DIR_TO_RAM: u64 = 0x2;
const DMA_IRQ: u64 = 0x4;
const FACT_IRQ: u32 = 0x1;
const DMA_IRQ_VALUE: u32 = 0x100;

/// QEMU's `edu` with `dma_mask=0xffffffffffffffff`, DMA through the virtio-iommu.
pub struct Edu {
    iommu: SharedDevice<GuestMemoryMmap>,
    endpoint: u32,
    raw: GuestMemoryMmap,
    mem: IommuMemory<GuestMemoryMmap, EndpointIommu<GuestMemoryMmap>>,
    sink: Option<Arc<dyn InterruptSink>>,
    config: [u8; 256],
    liveness: u32,
    fact: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_cnt: u64,
    dma_cmd: u64,
    buffer: Box<[u8; DMA_SIZE as usize]>,
}

impl std::fmt::Debug for Edu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edu")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn power_on_config() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
    c[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
    c[8] = REVISION;
    c[9..12].copy_from_slice(&CLASS.to_le_bytes()[..3]);
    // Interrupt pin INTA#.
    c[0x3d] = 1;
    c
}

impl Edu {
    /// `edu` as endpoint `endpoint` of `iommu`; guest memory starts empty (see
    /// [`PciFunction::set_guest_memory`]).
    pub fn new(iommu: SharedDevice<GuestMemoryMmap>, endpoint: u32) -> Edu {
        let mem = Self::memory(&iommu, endpoint, GuestMemoryMmap::new());
        Edu {
            iommu,
            endpoint,
            raw: GuestMemoryMmap::new(),
            mem,
            sink: None,
            config: power_on_config(),
            liveness: 0,
            fact: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_cnt: 0,
            dma_cmd: 0,
            buffer: Box::new([0; DMA_SIZE as usize]),
        }
    }

    fn memory(
        iommu: &SharedDevice<GuestMemoryMmap>,
        endpoint: u32,
        mem: GuestMemoryMmap,
    ) -> IommuMemory<GuestMemoryMmap, EndpointIommu<GuestMemoryMmap>> {
        IommuMemory::new(mem, EndpointIommu::new(iommu.clone(), endpoint), true, ())
    }

    /// The endpoint ID the DMA is translated for.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    fn update_irq(&self) {
        if let Some(s) = &self.sink {
            s.intx(self.irq_status != 0);
        }
    }

    fn raise_irq(&mut self, val: u32) {
        self.irq_status |= val;
        self.update_irq();
    }

    fn lower_irq(&mut self, val: u32) {
        self.irq_status &= !val;
        self.update_irq();
    }

    /// QEMU's `edu_check_range`: `[addr, addr + size)` inside the buffer.
    fn buffer_offset(addr: u64, size: u64) -> Option<usize> {
        let end1 = addr.wrapping_add(size);
        let end2 = DMA_START + DMA_SIZE;
        if DMA_START <= addr && addr < end2 && addr <= end1 && end1 <= end2 {
            Some((addr - DMA_START) as usize)
        } else {
            None
        }
    }

    fn run_dma(&mut self) {
        let cnt = self.dma_cnt;
        if self.dma_cmd & DMA_DIR_TO_RAM != 0 {
            match Self::buffer_offset(self.dma_src, cnt) {
                Some(off) => {
                    let data = &self.buffer[off..off + cnt as usize];
                    if let Err(e) = self.mem.write_slice(data, GuestAddress(self.dma_dst)) {
                        log::warn!("edu: DMA to IOVA {:#x} failed: {e}", self.dma_dst);
                    }
                }
                None => log::warn!(
                    "edu: DMA source {:#x}+{cnt:#x} outside the buffer; refused",
                    self.dma_src
                ),
            }
        } else {
            match Self::buffer_offset(self.dma_dst, cnt) {
                Some(off) => {
                    let mut tmp = vec![0u8; cnt as usize];
                    match self.mem.read_slice(&mut tmp, GuestAddress(self.dma_src)) {
                        Ok(()) => self.buffer[off..off + cnt as usize].copy_from_slice(&tmp),
                        Err(e) => {
                            log::warn!("edu: DMA from IOVA {:#x} failed: {e}", self.dma_src)
                        }
                    }
                }
                None => log::warn!(
                    "edu: DMA destination {:#x}+{cnt:#x} outside the buffer; refused",
                    self.dma_dst
                ),
            }
        }
        self.dma_cmd &= !DMA_RUN;
        if self.dma_cmd & DMA_IRQ != 0 {
            self.raise_irq(DMA_IRQ_VALUE);
        }
    }

    fn reg_read(&self, addr: u64, size: usize) -> u64 {
        if !access_ok(addr, size) {
            return !0;
        }
        match addr {
            0x00 => IDENT.into(),
            0x04 => self.liveness.into(),
            0x08 => self.fact.into(),
            0x20 => self.status.into(),
            0x24 => self.irq_status.into(),
            0x80 => self.dma_src,
            0x88 => self.dma_dst,
            0x90 => self.dma_cnt,
            0x98 => self.dma_cmd,
            _ => !0,
        }
    }

    fn reg_write(&mut self, addr: u64, val: u64, size: usize) {
        if !access_ok(addr, size) {
            return;
        }
        let v32 = val as u32;
        match addr {
            0x04 => self.liveness = !v32,
            0x08 if self.status & STATUS_COMPUTING == 0 => {
                let mut n = v32;
                let mut fact: u32 = 1;
                // Modulo 2^32 the product is 0 once 32 factors of two are in (at most 34
                // steps): stop there, so a guest writing u32::MAX costs 34 steps, not 4e9.
                while n > 0 && fact != 0 {
                    fact = fact.wrapping_mul(n);
                    n -= 1;
                }
                self.fact = fact;
                if self.status & STATUS_IRQFACT != 0 {
                    self.raise_irq(FACT_IRQ);
                }
            }
            0x20 => {
                if v32 & STATUS_IRQFACT != 0 {
                    self.status |= STATUS_IRQFACT;
                } else {
                    self.status &= !STATUS_IRQFACT;
                }
            }
            0x60 => self.raise_irq(v32),
            0x64 => self.lower_irq(v32),
            0x80 => self.dma_src = val,
            0x88 => self.dma_dst = val,
            0x90 => self.dma_cnt = val,
            0x98 if val & DMA_RUN != 0 && self.dma_cmd & DMA_RUN == 0 => {
                self.dma_cmd = val | DMA_RUN;
                self.run_dma();
            }
            _ => {}
        }
    }
}

/// edu.rst: registers below 0x80 take 4-byte accesses, the rest 4- or 8-byte ones.
fn access_ok(addr: u64, size: usize) -> bool {
    size == 4 || (addr >= 0x80 && size == 8)
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl PciFunction for Edu {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.config.get(o as usize).copied())
                .unwrap_or(0);
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                return;
            };
            let o = o as usize;
            match o {
                // Command register (memory space, bus master, INTx disable), status RW1C ignored.
                0x04 => self.config[o] = b & 0x06,
                0x05 => self.config[o] = b & 0x04,
                // BAR0: 1 MiB, 32-bit memory, not prefetchable.
                0x10..=0x13 => {
                    let mut bar =
                        u32::from_le_bytes(self.config[0x10..0x14].try_into().unwrap_or([0; 4]));
                    let shift = (o - 0x10) * 8;
                    bar = (bar & !(0xff << shift)) | (u32::from(b) << shift);
                    bar &= !(BAR0_SIZE as u32 - 1);
                    self.config[0x10..0x14].copy_from_slice(&bar.to_le_bytes());
                }
                0x0c | 0x0d | 0x3c => self.config[o] = b,
                _ => {}
            }
        }
    }

    fn bar(&self, index: u8) -> Option<Bar> {
        (index == 0).then_some(Bar {
            size: BAR0_SIZE,
            is_64bit: false,
            prefetchable: false,
        })
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        let val = if index == 0 && matches!(data.len(), 4 | 8) {
            self.reg_read(offset, data.len())
        } else {
            !0
        };
        let bytes = val.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0xff);
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        if index == 0 && matches!(data.len(), 4 | 8) {
            self.reg_write(offset, le(data), data.len());
        }
    }

    fn msix_vectors(&self) -> u16 {
        0
    }

    fn set_interrupt_sink(&mut self, sink: Option<Arc<dyn InterruptSink>>) {
        self.sink = sink;
        self.update_irq();
    }

    fn set_guest_memory(&mut self, mem: GuestMemoryMmap) {
        self.mem = Self::memory(&self.iommu, self.endpoint, mem.clone());
        self.raw = mem;
    }

    fn reset(&mut self) {
        let sink = self.sink.take();
        let mem = self.raw.clone();
        *self = Edu::new(self.iommu.clone(), self.endpoint);
        self.mem = Self::memory(&self.iommu, self.endpoint, mem.clone());
        self.raw = mem;
        self.sink = sink;
        self.update_irq();
    }
}
