//! `virtio-iommu-driver`: a `#![no_std]` guest driver for the virtio-iommu device (virtio v1.3
//! §5.13) on top of `virtio-drivers`.
//!
//! - [`wire`]: the wire format, shared with the device model.
//! - [`VirtIOIommu`]: the device driver (feature negotiation, config, ATTACH/DETACH/MAP/UNMAP/
//!   PROBE, event queue) on any virtio-drivers `Transport` and `Hal`.
//! - [`parse`]: decoding of PROBE properties and fault events.
//!
//! With feature `alloc` (default):
//!
#![cfg_attr(
    feature = "alloc",
    doc = "- [`topology`]: which IOMMU and endpoint ID serve a PCI requester or a platform device,
  from the devicetree or the ACPI VIOT and MCFG.
- [`dma`]: run virtio-drivers device drivers behind the IOMMU (`Hal` adapter; strict,
  isolated strict and identity modes).
- [`iova`]: the O(log n), allocation-free IOVA allocator.
- [`embedding`]: how to embed the driver in an OS, for a virtio-iommu on PCI and on
  virtio-mmio: feature flags, what the embedder provides, stack and heap."
)]
#![cfg_attr(
    not(feature = "alloc"),
    doc = "- `topology`, `dma`, `iova` and the `embedding` walkthrough (not built here: this
  documentation was built without `alloc`)."
)]
#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod device;
mod error;
mod held;
pub mod irq;
pub mod parse;
pub mod wire;

#[cfg(feature = "alloc")]
pub mod dma;
#[cfg(feature = "alloc")]
pub mod iova;
#[cfg(feature = "alloc")]
pub mod topology;

#[cfg(feature = "alloc")]
#[doc = include_str!("embedding.md")]
pub mod embedding {}

pub use device::{
    Batch, BatchOp, BatchResult, EventStats, InterruptReport, IommuConfig, IommuOptions, NbRequest,
    NbToken, RequestStats, VirtIOIommu, WaitPolicy, BATCH_CAPACITY, EVENTQ_SIZE, EVENT_BUFFER_SIZE,
    MAX_PROBE_SIZE, NB_SLOTS, REQUESTQ_MIN_SIZE, REQUESTQ_SIZE, WRITABLE_FILL,
};
pub use error::IommuError;
pub use parse::{FaultEvent, FaultReason, ProbeProperty, ReservedRegion, ResvMemKind};
