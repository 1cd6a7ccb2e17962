//! Endpoint device models whose every DMA goes through the virtio-iommu's translation
//! ([`crate::translate::EndpointIommu`]), served as PCI functions.
//!
//! - [`edu`]: [`edu::Edu`], QEMU's `edu` DMA engine (PCI 1234:11e8).

pub mod edu;
