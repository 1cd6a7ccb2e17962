//! Translation for other device models: vm-memory's [`Iommu`] trait (feature `iommu`)
//! implemented for one endpoint of a [`SharedDevice`], so that any device model using
//! [`vm_memory::IommuMemory`] (for example a virtio-queue based device) has its DMA translated,
//! permission-checked and fault-reported by this virtio-iommu.
//!
//! Each [`Iommu::translate`] call asks the device's current state and builds a private
//! [`Iotlb`] holding exactly the translated pieces of that access, so no stale translation can
//! survive an UNMAP, DETACH, ATTACH, `bypass` change or reset (D21 holds from the moment the
//! request completes). vm-memory's `Iotlb` computes `iova + length` unchecked, so an access
//! whose last byte is IOVA `u64::MAX` (its exclusive end would be 2^64) is never handed to it:
//! it is refused with [`vm_memory::iommu::Error::CannotResolve`] (and reported as a fault only
//! if the translation itself faults).

use std::fmt;
use std::sync::Mutex;

use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, Iommu, Iotlb, Permissions};

use crate::device::{lock, SharedDevice};
use crate::state::{Access, FaultRecord, TranslateError};

/// Why the last translation of an [`EndpointIommu`] failed.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TranslationFailure {
    /// A translation fault, reported on the event queue.
    Fault(FaultRecord),
    /// Refused without a report (unknown endpoint, or an access wrapping past 2^64).
    Refused(TranslateError),
    /// The access ends at IOVA 2^64 - 1, which vm-memory's `Iotlb` cannot represent.
    Unrepresentable,
}

/// Converts a vm-memory access mode to this crate's [`Access`].
pub fn access_of(p: Permissions) -> Access {
    match p {
        Permissions::No => Access::NONE,
        Permissions::Read => Access::READ,
        Permissions::Write => Access::WRITE,
        Permissions::ReadWrite => Access::READ_WRITE,
    }
}

fn permissions_of(a: Access) -> Permissions {
    match (a.read, a.write) {
        (false, false) => Permissions::No,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (true, true) => Permissions::ReadWrite,
    }
}

/// The IOMMU as seen by one endpoint: implements vm-memory's [`Iommu`].
pub struct EndpointIommu<M: GuestMemoryBackend> {
    device: SharedDevice<M>,
    endpoint: u32,
    last_failure: Mutex<Option<TranslationFailure>>,
}

impl<M: GuestMemoryBackend> fmt::Debug for EndpointIommu<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointIommu")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemoryBackend> EndpointIommu<M> {
    /// The IOMMU of `endpoint` (an endpoint ID of `device`; any other ID has every access
    /// refused, unreported).
    pub fn new(device: SharedDevice<M>, endpoint: u32) -> Self {
        Self {
            device,
            endpoint,
            last_failure: Mutex::new(None),
        }
    }

    /// The endpoint ID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The device.
    pub fn device(&self) -> &SharedDevice<M> {
        &self.device
    }

    /// Takes the record of the last failed translation (`None` if none failed since the last
    /// call). With several threads translating for the same endpoint, "last" is whichever
    /// failed last.
    pub fn take_last_failure(&self) -> Option<TranslationFailure> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn fail(&self, f: TranslationFailure, iova: GuestAddress, length: usize) -> IommuError {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: format!("virtio-iommu endpoint {}: {f:?}", self.endpoint),
        }
    }
}

impl<M: GuestMemoryBackend + Send> Iommu for EndpointIommu<M> {
    type IotlbGuard<'a>
        = Box<Iotlb>
    where
        Self: 'a;

    /// Translates `length` bytes at `iova` for `access` through the device (see
    /// [`crate::IommuState::translate`]), reporting faults on its event queue.
    ///
    /// # Errors
    ///
    /// [`IommuError::CannotResolve`] for a fault, a refused access, or an access ending
    /// at 2^64 - 1; the cause is kept for [`Self::take_last_failure`].
    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let len = length as u64;
        let mut device = lock(&self.device);
        if iova.0.checked_add(len).is_some() {
            // Fast path: the pieces go straight into the `Iotlb`, without an intermediate
            // vector. Anything but a success takes the path below, which translates again
            // under the same lock (so with the same result) and reports the fault.
            enum Stop {
                Unrepresentable,
                Iotlb(IommuError),
            }
            let mut iotlb = Iotlb::new();
            let mut stop = None;
            let translated =
                device
                    .state()
                    .translate_each(self.endpoint, iova.0, len, access_of(access), |p| {
                        if stop.is_some() {
                            return;
                        }
                        // Each piece lies inside `iova..iova + len`, which does not reach 2^64.
                        let Ok(plen) = usize::try_from(p.len) else {
                            stop = Some(Stop::Unrepresentable);
                            return;
                        };
                        if let Err(e) = iotlb.set_mapping(
                            GuestAddress(p.iova),
                            GuestAddress(p.phys),
                            plen,
                            permissions_of(p.allowed),
                        ) {
                            stop = Some(Stop::Iotlb(e));
                        }
                    });
            if translated.is_ok() {
                drop(device);
                return match stop {
                    None => Iotlb::lookup(Box::new(iotlb), iova, length, access)
                        .map_err(|_| self.fail(TranslationFailure::Unrepresentable, iova, length)),
                    Some(Stop::Unrepresentable) => {
                        Err(self.fail(TranslationFailure::Unrepresentable, iova, length))
                    }
                    Some(Stop::Iotlb(e)) => Err(e),
                };
            }
        }
        let pieces = device.translate(self.endpoint, iova.0, len, access_of(access));
        drop(device);
        let pieces = match pieces {
            Ok(p) => p,
            Err(TranslateError::Fault(f)) => {
                return Err(self.fail(TranslationFailure::Fault(f), iova, length))
            }
            Err(e) => return Err(self.fail(TranslationFailure::Refused(e), iova, length)),
        };
        if iova.0.checked_add(len).is_none() {
            return Err(self.fail(TranslationFailure::Unrepresentable, iova, length));
        }
        let mut iotlb = Iotlb::new();
        for p in &pieces {
            // Each piece lies inside `iova..iova + len`, which does not reach 2^64.
            let Ok(plen) = usize::try_from(p.len) else {
                return Err(self.fail(TranslationFailure::Unrepresentable, iova, length));
            };
            iotlb.set_mapping(
                GuestAddress(p.iova),
                GuestAddress(p.phys),
                plen,
                permissions_of(p.allowed),
            )?;
        }
        Iotlb::lookup(Box::new(iotlb), iova, length, access)
            .map_err(|_| self.fail(TranslationFailure::Unrepresentable, iova, length))
    }
}

impl fmt::Display for TranslationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fault(record) => write!(f, "translation fault: {record}"),
            Self::Refused(error) => write!(f, "access refused: {error}"),
            Self::Unrepresentable => write!(
                f,
                "access ends at IOVA 2^64 - 1, which vm-memory's Iotlb cannot represent"
            ),
        }
    }
}

impl std::error::Error for TranslationFailure {}
