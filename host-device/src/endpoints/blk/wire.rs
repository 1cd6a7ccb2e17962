//! The virtio-blk wire format this device uses (virtio v1.3 §5.2): feature bits, request
//! types, status values, the request header and the configuration space. Multi-byte fields are
//! little-endian (`zerocopy::little_endian`, alignment 1), so the structs have the spec's exact
//! layout with no padding.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Virtio device ID of a block device (§5.2.1).
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Size in bytes of a sector: `capacity`, `sector` and data lengths count in these (§5.2.4,
/// §5.2.6), whatever `blk_size` is.
pub const SECTOR_SIZE: u64 = 512;

/// Feature bits (§5.2.3, and the reserved bits of §6 this device offers).
pub mod feature {
    /// `VIRTIO_BLK_F_SIZE_MAX` (1): `size_max` is valid (not offered).
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `VIRTIO_BLK_F_SEG_MAX` (2): `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// `VIRTIO_BLK_F_GEOMETRY` (4) (not offered).
    pub const GEOMETRY: u64 = 1 << 4;
    /// `VIRTIO_BLK_F_RO` (5): the device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `VIRTIO_BLK_F_BLK_SIZE` (6): `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// `VIRTIO_BLK_F_FLUSH` (9): the FLUSH command is available.
    pub const FLUSH: u64 = 1 << 9;
    /// `VIRTIO_BLK_F_TOPOLOGY` (10) (not offered).
    pub const TOPOLOGY: u64 = 1 << 10;
    /// `VIRTIO_BLK_F_CONFIG_WCE` (11) (not offered: the cache mode is fixed, writeback).
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// `VIRTIO_BLK_F_MQ` (12) (not offered: one requestq).
    pub const MQ: u64 = 1 << 12;
    /// `VIRTIO_RING_F_INDIRECT_DESC` (28): descriptors may refer to indirect tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `VIRTIO_RING_F_EVENT_IDX` (29) (not offered).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1` (32): required.
    pub const VERSION_1: u64 = 1 << 32;
    /// `VIRTIO_F_ACCESS_PLATFORM` (33): every access goes through the platform's IOMMU;
    /// required (the device has no untranslated path).
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
}

/// Request types (`type` of `struct virtio_blk_req`, §5.2.6).
pub mod req {
    /// `VIRTIO_BLK_T_IN` (0): read sectors into the device-writable data.
    pub const IN: u32 = 0;
    /// `VIRTIO_BLK_T_OUT` (1): write the device-readable data to sectors.
    pub const OUT: u32 = 1;
    /// `VIRTIO_BLK_T_FLUSH` (4): make completed writes durable.
    pub const FLUSH: u32 = 4;
    /// `VIRTIO_BLK_T_GET_ID` (8): the 20-byte device ID string into the data.
    pub const GET_ID: u32 = 8;
    /// `VIRTIO_BLK_T_GET_LIFETIME` (10) (answered `S_UNSUPP`).
    pub const GET_LIFETIME: u32 = 10;
    /// `VIRTIO_BLK_T_DISCARD` (11) (answered `S_UNSUPP`).
    pub const DISCARD: u32 = 11;
    /// `VIRTIO_BLK_T_WRITE_ZEROES` (13) (answered `S_UNSUPP`).
    pub const WRITE_ZEROES: u32 = 13;
    /// `VIRTIO_BLK_T_SECURE_ERASE` (14) (answered `S_UNSUPP`).
    pub const SECURE_ERASE: u32 = 14;
}

/// Status values (the last device-writable byte of a request, §5.2.6).
pub mod status {
    /// `VIRTIO_BLK_S_OK` (0).
    pub const OK: u8 = 0;
    /// `VIRTIO_BLK_S_IOERR` (1).
    pub const IOERR: u8 = 1;
    /// `VIRTIO_BLK_S_UNSUPP` (2).
    pub const UNSUPP: u8 = 2;
}

/// Length in bytes of the GET_ID device ID string (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// The device-readable header of every request (`type`, `reserved`, `sector` of
/// `struct virtio_blk_req`, §5.2.6), 16 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ReqHeader {
    /// Request type ([`req`]).
    pub type_: U32,
    /// Reserved.
    pub reserved: U32,
    /// First sector (512-byte units) of IN and OUT.
    pub sector: U64,
}

/// Size in bytes of [`ReqHeader`].
pub const HEADER_SIZE: usize = 16;
const _: () = assert!(std::mem::size_of::<ReqHeader>() == HEADER_SIZE);

/// The first 36 bytes of `struct virtio_blk_config` (§5.2.4), up to `num_queues`; the fields
/// after it (discard, write zeroes, secure erase, zoned) belong to features this device does
/// not offer and read as zero.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct Config {
    /// Capacity in 512-byte sectors.
    pub capacity: U64,
    /// Largest segment in bytes (`SIZE_MAX`; 0, not offered).
    pub size_max: U32,
    /// Largest number of data segments in a request (`SEG_MAX`).
    pub seg_max: U32,
    /// Geometry: cylinders (`GEOMETRY`; 0, not offered).
    pub cylinders: U16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors per track.
    pub sectors: u8,
    /// Block size in bytes (`BLK_SIZE`).
    pub blk_size: U32,
    /// Topology: log2 of physical blocks per logical block (`TOPOLOGY`; 0, not offered).
    pub physical_block_exp: u8,
    /// Topology: offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Topology: suggested minimum I/O size in blocks.
    pub min_io_size: U16,
    /// Topology: optimal I/O size in blocks.
    pub opt_io_size: U32,
    /// Cache mode (`CONFIG_WCE`; 0, not offered).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues (`MQ`; 0, not offered).
    pub num_queues: U16,
}

/// Size in bytes of [`Config`].
pub const CONFIG_SIZE: usize = 36;
const _: () = assert!(std::mem::size_of::<Config>() == CONFIG_SIZE);
