//! Endpoint device models whose every DMA goes through the virtio-iommu's translation
//! ([`crate::translate::EndpointIommu`]), served as PCI functions or virtio device cores.
//!
//! - [`edu`]: [`edu::Edu`], QEMU's `edu` DMA engine (PCI 1234:11e8).
//! - [`blk`]: [`blk::BlkCore`], a virtio-blk device core (virtio v1.3 §5.2) over a disk file,
//!   rings and buffers translated (`VIRTIO_F_ACCESS_PLATFORM`), for a virtio transport.

pub mod blk;
pub mod edu;
