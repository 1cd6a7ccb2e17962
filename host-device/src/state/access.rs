//! What a translation is asked and answers: [`Access`] kinds, translated [`Piece`]s, and the
//! [`FaultRecord`] / [`TranslateError`] of a refused access (virtio v1.3 §5.13.6.9 fault reports).

use super::*;

/// The kind of a memory access, for translation and fault flags.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Hash)]
pub struct Access {
    /// The access reads memory (needs `MAP_F_READ`).
    pub read: bool,
    /// The access writes memory (needs `MAP_F_WRITE`).
    pub write: bool,
}

impl Access {
    /// A read.
    pub const READ: Self = Self {
        read: true,
        write: false,
    };
    /// A write.
    pub const WRITE: Self = Self {
        read: false,
        write: true,
    };
    /// A read-modify-write.
    pub const READ_WRITE: Self = Self {
        read: true,
        write: true,
    };
    /// An access that needs no permission (only a translation).
    pub const NONE: Self = Self {
        read: false,
        write: false,
    };

    pub(super) fn fault_flags(self) -> u32 {
        let mut f = FAULT_F_ADDRESS;
        if self.read {
            f |= FAULT_F_READ;
        }
        if self.write {
            f |= FAULT_F_WRITE;
        }
        f
    }

    pub(super) fn allowed_by(self, flags: MapFlags) -> bool {
        (!self.read || flags.contains(MapFlags::READ))
            && (!self.write || flags.contains(MapFlags::WRITE))
    }
}

/// One contiguous piece of a successful translation: IOVAs `iova..iova + len` go to
/// guest-physical addresses `phys..phys + len`. `len` is in bytes and never 0.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Piece {
    /// First IOVA.
    pub iova: u64,
    /// Guest-physical address of the first byte.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the translation allows for these bytes (a superset of the requested access).
    pub allowed: Access,
}

/// A fault to report on the event queue (§5.13.6.9), in the device's terms.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct FaultRecord {
    /// `FAULT_R_DOMAIN` or `FAULT_R_MAPPING` (`FAULT_R_UNKNOWN` only for embedder-reported
    /// faults).
    pub reason: u8,
    /// `FAULT_F_READ`/`FAULT_F_WRITE` for the access kind, and `FAULT_F_ADDRESS`; no undefined
    /// bit (D47).
    pub flags: u32,
    /// Endpoint ID: always one the device manages (D48).
    pub endpoint: u32,
    /// First faulting IOVA (valid as `FAULT_F_ADDRESS` is set).
    pub address: u64,
}

impl FaultRecord {
    /// The 24-byte wire record, with `reserved` and `reserved1` zero (D46).
    pub fn to_wire(&self) -> Fault {
        Fault {
            reason: self.reason,
            reserved: [0; 3],
            flags: self.flags.into(),
            endpoint: self.endpoint.into(),
            reserved1: [0; 4],
            address: self.address.into(),
        }
    }
}

/// Why [`IommuState::translate`] refused an access.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TranslateError {
    /// A translation fault, to be reported on the event queue.
    Fault(FaultRecord),
    /// The endpoint is not managed by this device: the access is refused and no fault is
    /// reported (a report must name a valid endpoint, D48).
    UnknownEndpoint(u32),
    /// `iova + len - 1` is beyond `u64::MAX`: the access wraps around the IOVA space. Refused, not
    /// reported (it is a bug of the DMA-issuing model, not a guest-visible fault).
    Wraps {
        /// First IOVA.
        iova: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl std::fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reason = match self.reason {
            FAULT_R_DOMAIN => "domain",
            FAULT_R_MAPPING => "mapping",
            _ => "unknown",
        };
        write!(
            f,
            "{reason} fault (reason {}) of endpoint {:#x} at IOVA {:#x}, flags {:#x}",
            self.reason, self.endpoint, self.address, self.flags
        )
    }
}

impl std::fmt::Display for TranslateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fault(record) => write!(f, "translation fault: {record}"),
            Self::UnknownEndpoint(endpoint) => {
                write!(f, "endpoint {endpoint:#x} is not managed by this device")
            }
            Self::Wraps { iova, len } => write!(
                f,
                "access of {len} bytes at IOVA {iova:#x} wraps past the end of the IOVA space"
            ),
        }
    }
}

impl std::error::Error for TranslateError {}
