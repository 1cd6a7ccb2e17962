//! The driver's error type.

use crate::wire::{Features, Status};
use core::fmt;

/// Everything that can go wrong talking to a virtio-iommu. No variant is ever produced by a
/// panic: every device response, used length and property is checked and mapped here.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum IommuError {
    /// The device completed the request with an error status (§5.13.6): `S_IOERR`, `S_UNSUPP`,
    /// `S_DEVERR`, `S_INVAL`, `S_RANGE`, `S_NOENT`, `S_FAULT` or `S_NOMEM`. Never `Status::Ok`.
    Status(Status),
    /// The device wrote a status value the spec does not define (9..=254; 255 is
    /// [`IommuError::NotWritten`]).
    UnknownStatus(u8),
    /// The device returned the request with used length 0: per §5.13.6 (driver requirement
    /// "SHOULD treat as failure") the request failed without a status — what a device does for
    /// a request type it does not know.
    NoResponse,
    /// The used length is impossible for this request: larger than the writable part, or too
    /// short to hold the tail. `used` and `expected` are in bytes.
    BadUsedLength {
        /// Used length reported by the device.
        used: u32,
        /// Length of the device-writable part the driver posted.
        expected: u32,
    },
    /// The device used a buffer the driver had not posted: an id that names no request in
    /// flight (never posted, already completed, a repeated used element, or a used element
    /// found in the used ring while no request was in flight). Fatal: the driver is broken.
    DeviceProtocol,
    /// The device returned the request with a used length that covers its device-writable part
    /// but did not write it: the tail's status byte (or, for PROBE, the first property header)
    /// still holds the driver's fill value [`crate::WRITABLE_FILL`] (0xff, no status of
    /// §5.13.6).
    ///
    /// An unwritten tail (status byte) is fatal: the driver is broken. The used element may be
    /// stale (a device that advanced the used index without writing one), so the request may
    /// still be available to the device; reusing its buffer could make the device later run the
    /// next request's bytes, or apply a MAP the driver reported as failed. This holds for a
    /// [`crate::Batch`] too (slots are matched by token, but tokens are descriptor indices the
    /// driver reuses, so a stale element can name a request in flight): the batch fails as a
    /// whole after its round. A PROBE whose tail was written but whose first property header
    /// was not is a per-request failure (the device did return that request); the driver stays
    /// usable.
    NotWritten,
    /// The config generation (virtio §2.5.1) changed during each of
    /// [`crate::WaitPolicy::config_attempts`] attempts to read the configuration (§5.13.4), so
    /// no consistent value could be read. From [`crate::VirtIOIommu::new`] (the device is then
    /// left with FAILED set), `read_raw_config` and `try_bypass`; the driver stays usable after
    /// the latter two.
    ConfigUnstable,
    /// After the driver wrote 0 to the device status (reset), the status did not read back 0
    /// within the [`crate::WaitPolicy`] (virtio §2.4.2, §4.1.4.3.2). From
    /// [`crate::VirtIOIommu::new`]; the device is left with FAILED set.
    ResetTimeout,
    /// The device did not complete the request within the wait budget ([`crate::WaitPolicy`]).
    /// The driver is then unusable until re-created: the buffers stay owned by it.
    Timeout,
    /// The device set DEVICE_NEEDS_RESET (virtio §2.1); the driver is unusable until reset.
    DeviceNeedsReset,
    /// The device status no longer has DRIVER_OK (virtio §2.1; it reads 0 after a device
    /// reset itself): the device dropped its queues and the requests in flight. Found by the
    /// status check made every 256 polls while waiting for a request (see
    /// [`crate::WaitPolicy`]). Fatal: the driver is broken; re-create it.
    DeviceReset,
    /// An earlier fatal error (timeout, protocol error, needs-reset, device reset, an unwritten
    /// tail, a failed eventq re-post) left the driver unusable. Per-request failures (a status,
    /// [`IommuError::NoResponse`], [`IommuError::BadUsedLength`]) do not.
    Broken,
    /// The transport does not present a virtio-iommu (device type other than 23).
    WrongDeviceType,
    /// The device does not offer features the driver requires (`VERSION_1`, `MAP_UNMAP`).
    MissingFeatures(Features),
    /// The device did not keep FEATURES_OK after the driver wrote its features.
    FeaturesRejected,
    /// The device configuration is unusable: `page_size_mask` 0 (D3), an inverted
    /// `input_range` or `domain_range`, or a `probe_size` above [`crate::MAX_PROBE_SIZE`].
    InvalidConfig(&'static str),
    /// The request needs a feature that was not negotiated (e.g. PROBE, BYPASS_CONFIG, MMIO).
    NotNegotiated(Features),
    /// The domain ID is outside the negotiated `domain_range` (§5.13.6 driver requirement).
    DomainOutOfRange(u32),
    /// The IOVA range is not inside the negotiated `input_range` (§5.13.6 driver requirement).
    IovaOutOfRange {
        /// First IOVA of the request.
        start: u64,
        /// Last IOVA of the request (inclusive).
        end: u64,
    },
    /// IOVAs that are not free in the IOVA space: allocated to a buffer, claimed for manual
    /// MAPs, reserved (a reserved region, the fault window) or outside the allocator's range
    /// (`IovaAllocator::claim`, `DmaSpace::reserve_iova` and `DmaSpace::attach_endpoint`, with
    /// feature `alloc`). Inclusive ends, widened to whole granules.
    IovaInUse {
        /// First IOVA of the range asked for.
        start: u64,
        /// Last IOVA of the range asked for (inclusive).
        end: u64,
    },
    /// The operation does not apply here; the text says why (for example a MAP by hand in a
    /// bypass domain, or detaching the last endpoint of a `DmaSpace`'s domain).
    NotSupported(&'static str),
    /// `virt_end` is not strictly greater than `virt_start` (§5.13.6.5 driver requirement), or a
    /// size is zero or overflows the 64-bit IOVA space.
    InvalidRange,
    /// An address or size is not a multiple of the granule (lowest set bit of
    /// `page_size_mask`), §5.13.6.5.
    Unaligned {
        /// The offending value (an address, or `virt_end + 1`).
        value: u64,
        /// Granule in bytes.
        granule: u64,
    },
    /// Flag bits the spec does not define, or a flag whose feature was not negotiated.
    InvalidFlags(u32),
    /// A PROBE property list the driver cannot walk: a property that runs past `probe_size`,
    /// or a RESV_MEM shorter than its fields or with `start > end`. `offset` is in bytes from
    /// the start of `properties`.
    MalformedProbe {
        /// Byte offset of the offending property header.
        offset: usize,
    },
    /// The caller's buffer is too small or too large for the request.
    BufferSize,
    /// DMA memory could not be allocated through the `Hal`.
    DmaAlloc,
    /// An error from the virtio-drivers transport or virtqueue.
    Transport(virtio_drivers::Error),
    /// The request cannot be sent now: every non-blocking slot is taken
    /// ([`crate::NB_SLOTS`]), `requestq` has no room for more non-blocking requests (2
    /// descriptors each), another non-blocking PROBE is in flight or not collected, or a
    /// synchronous request or [`crate::Batch`] was asked for while non-blocking requests are in
    /// flight (they share `requestq`), or a synchronous request while a non-blocking PROBE's
    /// reply is not collected (it holds the request buffer); complete or discard them first.
    /// Not fatal: nothing was sent.
    Busy,
    /// A [`crate::NbToken`] that names no request of this driver: already completed and
    /// collected, discarded, or from another driver; or a PROBE's token given to `poll_nb`,
    /// another request's to `poll_probe_nb` (that token stays valid for the right call). Not
    /// fatal.
    UnknownToken,
    /// A bounded wait for a non-blocking request ended before the device completed it
    /// ([`crate::VirtIOIommu::wait_nb`]). Not fatal: the request stays in flight, its buffers
    /// owned by the driver, and its token stays valid.
    Pending,
}

impl fmt::Display for IommuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(s) => write!(f, "device returned {}", s.name()),
            Self::UnknownStatus(s) => write!(f, "device returned undefined status {s}"),
            Self::NoResponse => write!(f, "device returned the request with used length 0"),
            Self::BadUsedLength { used, expected } => {
                write!(f, "used length {used} for a {expected}-byte writable part")
            }
            Self::DeviceProtocol => write!(f, "device used a buffer that was not posted"),
            Self::NotWritten => write!(f, "device returned the request without writing it"),
            Self::ConfigUnstable => write!(f, "config generation changed on every read"),
            Self::ResetTimeout => write!(f, "device status did not read 0 after reset"),
            Self::Timeout => write!(f, "request timed out"),
            Self::DeviceNeedsReset => write!(f, "device needs reset"),
            Self::DeviceReset => write!(f, "device reset itself (DRIVER_OK cleared)"),
            Self::Broken => write!(f, "driver unusable after an earlier fatal error"),
            Self::WrongDeviceType => write!(f, "not a virtio-iommu"),
            Self::MissingFeatures(m) => write!(f, "device lacks required features {m:?}"),
            Self::FeaturesRejected => write!(f, "device rejected the negotiated features"),
            Self::InvalidConfig(why) => write!(f, "invalid device config: {why}"),
            Self::NotNegotiated(m) => write!(f, "feature {m:?} not negotiated"),
            Self::DomainOutOfRange(d) => write!(f, "domain {d} outside domain_range"),
            Self::IovaOutOfRange { start, end } => {
                write!(f, "IOVA range {start:#x}..={end:#x} outside input_range")
            }
            Self::IovaInUse { start, end } => {
                write!(f, "IOVA range {start:#x}..={end:#x} is not free")
            }
            Self::NotSupported(why) => write!(f, "not supported: {why}"),
            Self::InvalidRange => write!(f, "empty, inverted or overflowing range"),
            Self::Unaligned { value, granule } => {
                write!(f, "{value:#x} not aligned to the {granule:#x}-byte granule")
            }
            Self::InvalidFlags(fl) => write!(f, "invalid flags {fl:#x}"),
            Self::MalformedProbe { offset } => {
                write!(
                    f,
                    "malformed PROBE property at byte {offset} of the properties"
                )
            }
            Self::BufferSize => write!(f, "buffer size does not fit the request"),
            Self::DmaAlloc => write!(f, "DMA allocation failed"),
            Self::Transport(e) => write!(f, "transport: {e}"),
            Self::Busy => write!(f, "requestq busy with non-blocking requests"),
            Self::UnknownToken => write!(f, "token names no request in flight or completed"),
            Self::Pending => write!(f, "request still in flight after the wait"),
        }
    }
}

impl From<virtio_drivers::Error> for IommuError {
    fn from(e: virtio_drivers::Error) -> Self {
        Self::Transport(e)
    }
}

impl core::error::Error for IommuError {}
