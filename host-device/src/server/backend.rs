//! One [`PciFunction`] as a vfio-user device: its regions (BAR0..5, ROM, configuration space),
//! region accesses, DMA mappings into guest memory, reset, and interrupts.

use std::fs::File;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_ROM_REGION_INDEX, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags};

use super::counters::{Counter, ServerCounters};
use super::irqs::{IrqData, IrqError, Irqs};
use super::memory::{DmaError, DmaMappings};
use crate::function::{PciFunction, CONFIG_SPACE_SIZE};

/// Number of regions offered: BAR0..5, ROM (6) and configuration space (7).
pub const NUM_REGIONS: u32 = VFIO_PCI_CONFIG_REGION_INDEX + 1;
/// Number of IRQ indices offered: INTx (0), MSI (1, no interrupts), MSI-X (2).
pub const NUM_IRQS: u32 = VFIO_PCI_MSIX_IRQ_INDEX + 1;
/// Most rounds of deferred work ([`PciFunction::poll`]) run right after one region write; the
/// rest runs between later messages.
pub const POLLS_PER_WRITE: usize = 64;

/// A refused command; the error reply carries the errno value.
#[derive(Debug)]
pub enum BackendError {
    /// A region index, offset or width the function does not have.
    BadAccess {
        /// Region index.
        region: u32,
        /// Byte offset.
        offset: u64,
        /// Width in bytes.
        len: usize,
    },
    /// DMA_MAP / DMA_UNMAP refused.
    Dma(DmaError),
    /// SET_IRQS refused.
    Irq(IrqError),
}

impl BackendError {
    /// The errno value for the reply.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::BadAccess {
                region,
                offset,
                len,
            } => write!(
                f,
                "access to region {region} at {offset:#x} width {len} refused"
            ),
            BackendError::Dma(e) => write!(f, "{e}"),
            BackendError::Irq(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// A [`PciFunction`] with the server-side state around it: DMA mappings and interrupts.
pub struct FunctionBackend<F: PciFunction> {
    function: F,
    mappings: DmaMappings,
    irqs: Arc<Irqs>,
    counters: Arc<ServerCounters>,
    pending: bool,
}

impl<F: PciFunction> std::fmt::Debug for FunctionBackend<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionBackend")
            .field("mappings", &self.mappings)
            .field("irqs", &self.irqs)
            .finish_non_exhaustive()
    }
}

/// Whether `len` bytes at `offset` fit in `size` bytes.
fn fits(offset: u64, len: usize, size: u64) -> bool {
    offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= size)
}

impl<F: PciFunction> FunctionBackend<F> {
    /// Wraps `function`: installs the interrupt sink and tells it that the client emulates the
    /// MSI-X table ([`PciFunction::set_msix_table_in_client`]).
    pub fn new(mut function: F, counters: Arc<ServerCounters>) -> Self {
        let irqs = Arc::new(Irqs::new(function.msix_vectors(), counters.clone()));
        function.set_interrupt_sink(Some(irqs.clone()));
        function.set_msix_table_in_client(true);
        FunctionBackend {
            function,
            mappings: DmaMappings::new(),
            irqs,
            counters,
            pending: false,
        }
    }

    /// The served function.
    pub fn function(&mut self) -> &mut F {
        &mut self.function
    }

    /// The counters this backend bumps.
    pub fn counters(&self) -> &Arc<ServerCounters> {
        &self.counters
    }

    /// The interrupt state.
    pub fn irqs(&self) -> &Arc<Irqs> {
        &self.irqs
    }

    /// Unwraps the function (its interrupt sink removed).
    pub fn into_function(mut self) -> F {
        self.function.set_interrupt_sink(None);
        self.function
    }

    /// Size in bytes of region `index` (0 for regions the function lacks, the ROM, and the
    /// upper half of a 64-bit BAR).
    pub fn region_size(&self, index: u32) -> u64 {
        match index {
            0..=5 => self.function.bar(index as u8).map_or(0, |b| b.size),
            VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SPACE_SIZE,
            _ => 0,
        }
    }

    /// `VFIO_REGION_INFO_FLAG_*` of region `index`: READ|WRITE when it has a size, else 0.
    pub fn region_flags(&self, index: u32) -> u32 {
        if self.region_size(index) > 0 {
            VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
        } else {
            0
        }
    }

    /// `(flags, count)` of IRQ index `index`, or `None` if not offered.
    pub fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        match index {
            VFIO_PCI_INTX_IRQ_INDEX => Some((
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                1,
            )),
            VFIO_PCI_MSI_IRQ_INDEX => Some((VFIO_IRQ_INFO_EVENTFD, 0)),
            VFIO_PCI_MSIX_IRQ_INDEX => Some((
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE,
                self.irqs.count(index),
            )),
            _ => None,
        }
    }

    fn check(&self, region: u32, offset: u64, len: usize) -> Result<(), BackendError> {
        let bad = BackendError::BadAccess {
            region,
            offset,
            len,
        };
        if region == VFIO_PCI_ROM_REGION_INDEX || !fits(offset, len, self.region_size(region)) {
            return Err(bad);
        }
        // BAR accesses keep the client's width: 1, 2, 4 or 8 bytes. Configuration space
        // accesses of any length are split below.
        if region != VFIO_PCI_CONFIG_REGION_INDEX && !matches!(len, 1 | 2 | 4 | 8) {
            return Err(bad);
        }
        if len == 0 {
            return Err(bad);
        }
        Ok(())
    }

    /// REGION_READ: `data.len()` bytes of region `region` at byte `offset`.
    ///
    /// # Errors
    /// [`BackendError::BadAccess`] outside the region, on the ROM, or with a BAR width other
    /// than 1, 2, 4 or 8.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), BackendError> {
        self.check(region, offset, data.len())?;
        self.counters.bump(Counter::RegionRead);
        if region == VFIO_PCI_CONFIG_REGION_INDEX {
            let mut off = offset;
            for chunk in config_chunks(offset, data) {
                let n = chunk.len() as u64;
                self.function.config_read(off, chunk);
                off += n;
            }
        } else {
            self.function.bar_read(region as u8, offset, data);
        }
        log::debug!("read  region {region} {offset:#x} {:02x?}", Head(data));
        Ok(())
    }

    /// REGION_WRITE, then the deferred work it caused (at most [`POLLS_PER_WRITE`] rounds).
    ///
    /// # Errors
    /// As [`FunctionBackend::region_read`].
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        self.check(region, offset, data.len())?;
        self.counters.bump(Counter::RegionWrite);
        log::debug!("write region {region} {offset:#x} {:02x?}", Head(data));
        if region == VFIO_PCI_CONFIG_REGION_INDEX {
            let mut buf = data.to_vec();
            let mut off = offset;
            for chunk in config_chunks(offset, &mut buf) {
                let n = chunk.len() as u64;
                self.function.config_write(off, chunk);
                off += n;
            }
        } else {
            self.function.bar_write(region as u8, offset, data);
        }
        self.pending = true;
        for _ in 0..POLLS_PER_WRITE {
            if !self.poll() {
                break;
            }
        }
        Ok(())
    }

    /// Whether deferred work remains ([`FunctionBackend::poll`] has more to do).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Runs one round of deferred work; returns whether more remains.
    pub fn poll(&mut self) -> bool {
        self.pending = self.function.poll();
        self.pending
    }

    /// DMA_MAP, then hands the new guest memory to the function.
    ///
    /// # Errors
    /// [`BackendError::Dma`].
    pub fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        file: Option<File>,
    ) -> Result<(), BackendError> {
        self.mappings
            .map(flags, offset, address, size, file)
            .map_err(BackendError::Dma)?;
        self.counters.bump(Counter::DmaMap);
        self.function.set_guest_memory(self.mappings.guest_memory());
        Ok(())
    }

    /// DMA_UNMAP, then hands the new guest memory to the function.
    ///
    /// # Errors
    /// [`BackendError::Dma`].
    pub fn dma_unmap(
        &mut self,
        flags: DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        self.mappings
            .unmap(flags, address, size)
            .map_err(BackendError::Dma)?;
        self.counters.bump(Counter::DmaUnmap);
        self.function.set_guest_memory(self.mappings.guest_memory());
        Ok(())
    }

    /// DEVICE_RESET: function-level reset; DMA mappings and eventfds stay (they belong to the
    /// client, as with vfio-pci).
    pub fn reset(&mut self) {
        self.function.reset();
        self.pending = false;
    }

    /// DEVICE_SET_IRQS.
    ///
    /// # Errors
    /// [`BackendError::Irq`].
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData<'_>,
    ) -> Result<(), BackendError> {
        self.irqs
            .set_irqs(index, flags, start, count, data)
            .map_err(BackendError::Irq)
    }

    /// The client went away: mappings and eventfds are dropped, guest memory emptied.
    pub fn disconnected(&mut self) {
        self.mappings = DmaMappings::new();
        self.function.set_guest_memory(self.mappings.guest_memory());
        self.irqs.clear();
        self.pending = false;
    }
}

/// The first 16 bytes of an access, for the debug log.
struct Head<'a>(&'a [u8]);

impl std::fmt::Debug for Head<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len().min(16);
        write!(f, "{:02x?}", &self.0[..n])?;
        if self.0.len() > n {
            write!(f, "+{} bytes", self.0.len() - n)?;
        }
        Ok(())
    }
}

/// Splits a configuration-space access into naturally aligned pieces of 4, 2 or 1 bytes.
fn config_chunks(offset: u64, data: &mut [u8]) -> impl Iterator<Item = &mut [u8]> {
    let mut rest = data;
    let mut off = offset;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let w = [4usize, 2, 1]
            .into_iter()
            .find(|&w| off.is_multiple_of(w as u64) && w <= rest.len())
            .unwrap_or(1);
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(w);
        rest = tail;
        off += w as u64;
        Some(head)
    })
}
