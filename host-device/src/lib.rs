//! `virtio-iommu-device`: a virtio-iommu device model (virtio v1.3 §5.13) for VMMs built on the
//! rust-vmm crates (`virtio-queue`, `vm-memory`).
//!
//! - [`checker`]: the driver checker, a strict mode recording every driver requirement
//!   (R1..R36) a driver breaks ([`IommuDevice::checker_report`]).
//! - [`config`]: [`DeviceConfig`] and its builder: offered features, config-space values,
//!   endpoints and their reserved regions, resource [`Caps`].
//! - [`state`]: [`IommuState`], the pure request semantics (ATTACH, DETACH, MAP, UNMAP,
//!   PROBE) and translation.
//! - [`request`]: parsing and answering one requestq descriptor chain, any descriptor layout.
//! - [`device`]: [`IommuDevice`], the transport-independent device: status, features, queues,
//!   config space, fault event queue, translation with fault reporting.
//! - [`fault`]: [`FaultPlan`], fault injection: scripted device misbehaviours for testing
//!   drivers.
//! - [`mmio`]: [`MmioDevice`], the virtio-mmio (version 2) register model.
//! - [`transport`]: [`transport::VirtioCore`], the interface every virtio transport drives a
//!   device core through (implemented by [`IommuDevice`]), and [`transport::pci::VirtioPciFunction`],
//!   the modern virtio-pci transport (a [`function::PciFunction`]).
//! - [`function`]: [`function::PciFunction`], a PCI function at register level (configuration
//!   space, BARs, interrupts), as a vfio-user server serves it.
//! - [`translate`]: [`EndpointIommu`], vm-memory's `Iommu` for one endpoint.
//! - [`endpoint`]: [`DmaEndpoint`], an endpoint whose DMA goes through the IOMMU.
//! - [`endpoints`]: endpoint models whose DMA goes through the IOMMU: QEMU's `edu`, and a
//!   virtio-blk device core ([`endpoints::blk::BlkCore`], a [`transport::VirtioCore`]).
//! - `server` (feature `vfio-user`): a vfio-user server for any [`function::PciFunction`],
//!   for QEMU's `vfio-user-pci`; the binary `virtio-iommu-vfio-user` serves the device with it.
//! - [`embedding`]: embedding the device in a VMM, and testing against it (doctested).
//! - `inprocess` (feature `test-utils`): a virtio-drivers `Transport` and `Hal` running the
//!   guest driver (`virtio-iommu-driver`) against this device in the same process.
//!
//! The wire format comes from `virtio_iommu_driver::wire`, the project's single definition.
//! Statement numbers such as D31 (virtio v1.3 §5.13 device requirements D1..D50, driver
//! requirements R1..R36) are listed with their spec sections in the "Statement index" of the
//! repository's `CONFORMANCE.md`; see the crate README for the choices made where the spec
//! says MAY or SHOULD.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod checker;
pub mod config;
pub mod device;
#[doc = include_str!("embedding.md")]
pub mod embedding {}
pub mod endpoint;
pub mod endpoints;
pub mod fault;
pub mod function;
pub mod mmio;
pub mod request;
#[cfg(feature = "vfio-user")]
pub mod server;
pub mod state;
pub mod translate;
pub mod transport;

#[cfg(feature = "test-utils")]
pub mod inprocess;

pub use checker::{CheckerReport, Saw, Statement, Violation};
pub use config::{Caps, ConfigError, DeviceConfig, DeviceConfigBuilder, ResvKind, ResvRegion};
pub use device::{Counters, IommuDevice, QueueError, QueueSetup, SharedDevice};
pub use endpoint::{DmaEndpoint, DmaError};
pub use fault::{Fault, FaultPlan, Misbehaviour, When};
pub use mmio::MmioDevice;
pub use state::{Access, Domain, FaultRecord, IommuState, Mapping, Piece, TranslateError};
pub use translate::{EndpointIommu, TranslationFailure};
pub use transport::pci::VirtioPciFunction;
pub use virtio_iommu_driver::wire;
