//! `virtio-iommu-driver`: a `#![no_std]` guest driver for the virtio-iommu device (virtio v1.3
//! §5.13) on top of `virtio-drivers`.
//!
//! - [`wire`]: the wire format, shared with the device model.
//! - [`VirtIOIommu`]: the device driver (feature negotiation, config, ATTACH/DETACH/MAP/UNMAP/
//!   PROBE, event queue) on any virtio-drivers `Transport` and `Hal`.
//! - [`parse`]: decoding of PROBE properties and fault events.
//! - [`topology`] (feature `alloc`): which IOMMU and endpoint ID serve a PCI requester or a
//!   platform device, from the devicetree or the ACPI VIOT.
//! - [`dma`] (feature `alloc`): run virtio-drivers device drivers behind the IOMMU (`Hal`
//!   adapter; strict, isolated strict and identity modes).
//! - [`iova`] (feature `alloc`): the O(log n), allocation-free IOVA allocator.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod device;
mod error;
pub mod parse;
pub mod wire;

#[cfg(feature = "alloc")]
pub mod dma;
#[cfg(feature = "alloc")]
pub mod iova;
#[cfg(feature = "alloc")]
pub mod topology;

pub use device::{
    Batch, BatchOp, BatchResult, EventStats, IommuConfig, IommuOptions, RequestStats, VirtIOIommu,
    WaitPolicy, BATCH_CAPACITY, EVENTQ_SIZE, EVENT_BUFFER_SIZE, MAX_PROBE_SIZE, REQUESTQ_MIN_SIZE,
    REQUESTQ_SIZE, WRITABLE_FILL,
};
pub use error::IommuError;
pub use parse::{FaultEvent, FaultReason, ProbeProperty, ReservedRegion, ResvMemKind};
