//! [`IommuMapper`]: what the DMA glue needs from the virtio-iommu driver (MAP/UNMAP, alone or
//! batched, granule and `input_range`), implemented by [`VirtIOIommu`].

use crate::device::{BatchOp, VirtIOIommu};
use crate::error::IommuError;
use crate::wire::MapFlags;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

/// What [`IommuHal`](super::IommuHal) and [`DmaSpace`](super::DmaSpace) need from the virtio-iommu driver: MAP and UNMAP in one
/// domain, alone or batched, and the granule. Object-safe so that statics can hold any
/// `VirtIOIommu<H, T>` (or a test double).
pub trait IommuMapper {
    /// Granule in bytes (lowest set bit of `page_size_mask`, §5.13.4).
    fn granule(&self) -> u64;

    /// Translatable IOVAs, `(start, end)` inclusive (`input_range`, §5.13.4). The default is
    /// the whole 64-bit space.
    fn input_range(&self) -> (u64, u64) {
        (0, u64::MAX)
    }

    /// MAP `virt_start..=virt_end` (inclusive IOVAs) to `phys_start`; see [`VirtIOIommu::map`].
    ///
    /// # Errors
    ///
    /// Those of [`VirtIOIommu::map`].
    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Result<(), IommuError>;

    /// UNMAP `virt_start..=virt_end` (inclusive IOVAs); see [`VirtIOIommu::unmap`].
    ///
    /// # Errors
    ///
    /// Those of [`VirtIOIommu::unmap`].
    fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuError>;

    /// Sends every request of `ops` and stores each one's outcome in `results` (same index):
    /// validation errors, device statuses and bad used lengths are per request and do not
    /// stop the others. `VirtIOIommu` sends them as [`crate::Batch`]es (one notification per
    /// ring-sized round); the default sends them one by one with [`Self::map`] and
    /// [`Self::unmap`].
    ///
    /// # Errors
    ///
    /// Of the whole call (`results` then only partly written): [`IommuError::BufferSize`]
    /// when `results.len() != ops.len()`; the fatal errors of [`crate::Batch::submit`].
    fn submit_batch(
        &mut self,
        ops: &[BatchOp],
        results: &mut [Result<(), IommuError>],
    ) -> Result<(), IommuError> {
        if ops.len() != results.len() {
            return Err(IommuError::BufferSize);
        }
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            *result = match *op {
                BatchOp::Map {
                    domain,
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                } => self.map(domain, virt_start, virt_end, phys_start, flags),
                BatchOp::Unmap {
                    domain,
                    virt_start,
                    virt_end,
                } => self.unmap(domain, virt_start, virt_end),
            };
        }
        Ok(())
    }
}

impl<H: Hal, T: Transport> IommuMapper for VirtIOIommu<H, T> {
    fn granule(&self) -> u64 {
        self.config().granule
    }
    fn input_range(&self) -> (u64, u64) {
        self.config().input_range
    }
    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Result<(), IommuError> {
        VirtIOIommu::map(self, domain, virt_start, virt_end, phys_start, flags)
    }
    fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuError> {
        VirtIOIommu::unmap(self, domain, virt_start, virt_end)
    }
    fn submit_batch(
        &mut self,
        ops: &[BatchOp],
        results: &mut [Result<(), IommuError>],
    ) -> Result<(), IommuError> {
        if ops.len() != results.len() {
            return Err(IommuError::BufferSize);
        }
        for (ops, results) in ops
            .chunks(crate::BATCH_CAPACITY)
            .zip(results.chunks_mut(crate::BATCH_CAPACITY))
        {
            // `queued[k]` = index in `ops` of the batch's request `k`.
            let mut queued = [0u16; crate::BATCH_CAPACITY];
            let mut batch = self.batch();
            for (i, op) in ops.iter().enumerate() {
                match batch.push(*op) {
                    Ok(k) => queued[k] = i as u16,
                    Err(e) => results[i] = Err(e),
                }
            }
            let outcome = batch.submit()?;
            for (k, r) in outcome.iter().enumerate() {
                results[usize::from(queued[k])] = r;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::fake::FakeIommu;
    use crate::wire::Status;

    #[test]
    fn default_submit_batch_is_per_request() {
        let mut iommu = FakeIommu::new();
        let rw = MapFlags::READ | MapFlags::WRITE;
        let ops = [
            BatchOp::Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0,
                flags: rw,
            },
            BatchOp::Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0,
                flags: rw,
            },
            BatchOp::Unmap {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
            },
        ];
        let mut results = [Ok(()); 3];
        iommu.submit_batch(&ops, &mut results).unwrap();
        assert_eq!(
            results,
            [Ok(()), Err(IommuError::Status(Status::Inval)), Ok(())]
        );
        assert_eq!(
            iommu.submit_batch(&ops, &mut results[..2]),
            Err(IommuError::BufferSize)
        );
    }
}
