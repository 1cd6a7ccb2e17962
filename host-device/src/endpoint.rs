//! A DMA-capable endpoint model: memory accesses by one endpoint go through vm-memory's
//! [`IommuMemory`] over the guest memory, translated by the virtio-iommu ([`EndpointIommu`]).
//! Tests use it the way the project's firmware uses QEMU's `edu` device: program a DMA at an
//! IOVA, observe the data in guest memory, or the fault on the event queue.

use std::fmt;

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, IommuMemory,
};

use crate::device::{lock, SharedDevice};
use crate::state::{FaultRecord, TranslateError};
use crate::translate::{EndpointIommu, TranslationFailure};

/// Why a DMA access failed.
#[derive(Debug)]
pub enum DmaError {
    /// The endpoint ID is not managed by the device (returned by [`DmaEndpoint::new`]).
    UnknownEndpoint(u32),
    /// Translation fault; the same report was queued on the device's event queue.
    Fault(FaultRecord),
    /// The access was refused without a fault report (it wraps past 2^64).
    Refused(TranslateError),
    /// The access ends at IOVA 2^64 - 1, which vm-memory's `Iotlb` cannot represent.
    Unrepresentable,
    /// The translation succeeded but the guest-physical range is not (entirely) backed by
    /// guest memory.
    Memory(GuestMemoryError),
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownEndpoint(e) => write!(f, "unknown endpoint {e}"),
            Self::Fault(r) => write!(f, "IOMMU {r}"),
            Self::Refused(e) => write!(f, "access refused: {e}"),
            Self::Unrepresentable => write!(f, "access ends at the top of the IOVA space"),
            Self::Memory(e) => write!(f, "guest memory: {e}"),
        }
    }
}

impl std::error::Error for DmaError {}

/// One endpoint doing DMA through the virtio-iommu.
pub struct DmaEndpoint<M: GuestMemoryBackend + Send> {
    mem: IommuMemory<M, EndpointIommu<M>>,
    endpoint: u32,
}

impl<M: GuestMemoryBackend + Send> fmt::Debug for DmaEndpoint<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaEndpoint")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl<M> DmaEndpoint<M>
where
    M: GuestMemoryBackend + Clone + Send,
    <M::R as GuestMemoryRegion>::B: Default,
{
    /// Endpoint `endpoint` of `device`, accessing the device's guest memory.
    ///
    /// # Errors
    ///
    /// [`DmaError::UnknownEndpoint`] if the device does not manage `endpoint`.
    pub fn new(device: SharedDevice<M>, endpoint: u32) -> Result<Self, DmaError> {
        let backend = {
            let dev = lock(&device);
            if !dev.config().has_endpoint(endpoint) {
                return Err(DmaError::UnknownEndpoint(endpoint));
            }
            dev.memory().clone()
        };
        let iommu = EndpointIommu::new(device, endpoint);
        Ok(Self {
            mem: IommuMemory::new(backend, iommu, true, Default::default()),
            endpoint,
        })
    }
}

impl<M: GuestMemoryBackend + Send> DmaEndpoint<M> {
    /// The endpoint ID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The endpoint's view of memory (IOVAs), for use with vm-memory's [`Bytes`] or
    /// virtio-queue.
    pub fn memory(&self) -> &IommuMemory<M, EndpointIommu<M>> {
        &self.mem
    }

    fn error(&self, e: GuestMemoryError) -> DmaError {
        match self.mem.iommu().take_last_failure() {
            Some(TranslationFailure::Fault(f)) => DmaError::Fault(f),
            Some(TranslationFailure::Refused(r)) => DmaError::Refused(r),
            Some(TranslationFailure::Unrepresentable) => DmaError::Unrepresentable,
            None => DmaError::Memory(e),
        }
    }

    /// Reads `buf.len()` bytes at IOVA `iova` (a DMA write to the endpoint, i.e. a memory
    /// read; needs `MAP_F_READ`).
    ///
    /// # Errors
    ///
    /// [`DmaError::Fault`] (reported on the event queue), [`DmaError::Refused`],
    /// [`DmaError::Unrepresentable`], [`DmaError::Memory`].
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.mem.iommu().take_last_failure();
        self.mem
            .read_slice(buf, GuestAddress(iova))
            .map_err(|e| self.error(e))
    }

    /// Writes `data` at IOVA `iova` (a memory write; needs `MAP_F_WRITE`).
    ///
    /// # Errors
    ///
    /// As [`Self::read`].
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.mem.iommu().take_last_failure();
        self.mem
            .write_slice(data, GuestAddress(iova))
            .map_err(|e| self.error(e))
    }
}
