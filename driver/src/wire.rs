//! The virtio-iommu wire format: virtio v1.3 §5.13 "IOMMU Device", every structure and constant.
//!
//! This module is the single definition of the format; the device model (`virtio-iommu-device`)
//! and the conformance suite use it too. All multi-byte fields are little-endian
//! (`zerocopy::little_endian` types, alignment 1), so every struct has the exact size and layout of
//! the spec with no padding; a `const` assert per struct checks the size.
//!
//! Requests are framed as one device-readable part followed by one device-writable part
//! (§5.13.6). The `Req*` structs here are the *device-readable* parts (head and body); the
//! device-writable part is [`ReqTail`] (or, for PROBE, `probe_size` bytes of properties followed
//! by [`ReqTail`]).

use bitflags::bitflags;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Virtio device ID of the IOMMU device (§5.13.1).
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Index of the request virtqueue, `requestq` (§5.13.2).
pub const REQUESTQ: u16 = 0;
/// Index of the event virtqueue, `eventq` (§5.13.2).
pub const EVENTQ: u16 = 1;

bitflags! {
    /// Feature bits (§5.13.3 device-specific bits, and the transport bits this crate uses, §6).
    #[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Hash)]
    pub struct Features: u64 {
        /// `VIRTIO_IOMMU_F_INPUT_RANGE` (0): `input_range` is valid.
        const INPUT_RANGE = 1 << 0;
        /// `VIRTIO_IOMMU_F_DOMAIN_RANGE` (1): `domain_range` is valid.
        const DOMAIN_RANGE = 1 << 1;
        /// `VIRTIO_IOMMU_F_MAP_UNMAP` (2): MAP and UNMAP requests are available.
        const MAP_UNMAP = 1 << 2;
        /// `VIRTIO_IOMMU_F_BYPASS` (3): unattached endpoints bypass translation (legacy,
        /// superseded by `BYPASS_CONFIG`).
        const BYPASS = 1 << 3;
        /// `VIRTIO_IOMMU_F_PROBE` (4): PROBE requests are available.
        const PROBE = 1 << 4;
        /// `VIRTIO_IOMMU_F_MMIO` (5): the `VIRTIO_IOMMU_MAP_F_MMIO` flag is available.
        const MMIO = 1 << 5;
        /// `VIRTIO_IOMMU_F_BYPASS_CONFIG` (6): the `bypass` config field and
        /// `VIRTIO_IOMMU_ATTACH_F_BYPASS` are available.
        const BYPASS_CONFIG = 1 << 6;
        /// `VIRTIO_F_INDIRECT_DESC` (28, §6).
        const RING_INDIRECT_DESC = 1 << 28;
        /// `VIRTIO_F_EVENT_IDX` (29, §6).
        const RING_EVENT_IDX = 1 << 29;
        /// `VIRTIO_F_VERSION_1` (32, §6): the device complies with virtio 1.x.
        const VERSION_1 = 1 << 32;
        /// `VIRTIO_F_ACCESS_PLATFORM` (33, §6): the device's DMA goes through the platform's
        /// IOMMU. Devices *behind* a virtio-iommu offer it; QEMU refuses FEATURES_OK without it.
        const ACCESS_PLATFORM = 1 << 33;
        /// `VIRTIO_F_RING_PACKED` (34, §6).
        const RING_PACKED = 1 << 34;
        /// `VIRTIO_F_ORDER_PLATFORM` (36, §6).
        const ORDER_PLATFORM = 1 << 36;
        /// `VIRTIO_F_RING_RESET` (40, §6).
        const RING_RESET = 1 << 40;
    }
}

/// An inclusive 64-bit range, as in `input_range` (§5.13.4).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct Range64 {
    /// First value of the range.
    pub start: U64,
    /// Last value of the range (inclusive).
    pub end: U64,
}

/// An inclusive 32-bit range, as in `domain_range` (§5.13.4).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct Range32 {
    /// First value of the range.
    pub start: U32,
    /// Last value of the range (inclusive).
    pub end: U32,
}

/// `struct virtio_iommu_config` (§5.13.4), 40 bytes.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct Config {
    /// Page sizes the device can map, one bit per size in bytes; the lowest set bit is the
    /// granule. Always valid.
    pub page_size_mask: U64,
    /// IOVAs the device can translate (inclusive), valid with `INPUT_RANGE`.
    pub input_range: Range64,
    /// Domain IDs the device supports (inclusive), valid with `DOMAIN_RANGE`.
    pub domain_range: Range32,
    /// Size in bytes of the `properties` buffer of a PROBE request, valid with `PROBE`.
    pub probe_size: U32,
    /// 1: unattached endpoints bypass translation; 0: their DMA is blocked. Valid with
    /// `BYPASS_CONFIG`; the only field a driver may write.
    pub bypass: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// Byte offsets of the [`Config`] fields in the device configuration space (§5.13.4).
pub mod config_offset {
    /// `page_size_mask`, le64.
    pub const PAGE_SIZE_MASK: usize = 0;
    /// `input_range.start`, le64.
    pub const INPUT_RANGE_START: usize = 8;
    /// `input_range.end`, le64 (inclusive).
    pub const INPUT_RANGE_END: usize = 16;
    /// `domain_range.start`, le32.
    pub const DOMAIN_RANGE_START: usize = 24;
    /// `domain_range.end`, le32 (inclusive).
    pub const DOMAIN_RANGE_END: usize = 28;
    /// `probe_size`, le32.
    pub const PROBE_SIZE: usize = 32;
    /// `bypass`, u8.
    pub const BYPASS: usize = 36;
}

/// Request types (`virtio_iommu_req_head.type`, §5.13.6).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
#[repr(u8)]
pub enum RequestType {
    /// `VIRTIO_IOMMU_T_ATTACH` (§5.13.6.3).
    Attach = 1,
    /// `VIRTIO_IOMMU_T_DETACH` (§5.13.6.4).
    Detach = 2,
    /// `VIRTIO_IOMMU_T_MAP` (§5.13.6.5).
    Map = 3,
    /// `VIRTIO_IOMMU_T_UNMAP` (§5.13.6.6).
    Unmap = 4,
    /// `VIRTIO_IOMMU_T_PROBE` (§5.13.6.7).
    Probe = 5,
}

impl RequestType {
    /// Decodes a `type` byte; `None` for the undefined values 0 and 6..=255.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Attach,
            2 => Self::Detach,
            3 => Self::Map,
            4 => Self::Unmap,
            5 => Self::Probe,
            _ => return None,
        })
    }
}

/// Request status codes (`virtio_iommu_req_tail.status`, §5.13.6).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_IOMMU_S_OK`: the request succeeded.
    Ok = 0,
    /// `VIRTIO_IOMMU_S_IOERR`: I/O error.
    IoErr = 1,
    /// `VIRTIO_IOMMU_S_UNSUPP`: unsupported request.
    Unsupp = 2,
    /// `VIRTIO_IOMMU_S_DEVERR`: internal device error.
    DevErr = 3,
    /// `VIRTIO_IOMMU_S_INVAL`: invalid parameters.
    Inval = 4,
    /// `VIRTIO_IOMMU_S_RANGE`: out-of-range parameters.
    Range = 5,
    /// `VIRTIO_IOMMU_S_NOENT`: entry not found.
    NoEnt = 6,
    /// `VIRTIO_IOMMU_S_FAULT`: bad address.
    Fault = 7,
    /// `VIRTIO_IOMMU_S_NOMEM`: insufficient resources.
    NoMem = 8,
}

impl Status {
    /// Decodes a status byte; `None` for values the spec does not define (9..=255).
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Ok,
            1 => Self::IoErr,
            2 => Self::Unsupp,
            3 => Self::DevErr,
            4 => Self::Inval,
            5 => Self::Range,
            6 => Self::NoEnt,
            7 => Self::Fault,
            8 => Self::NoMem,
            _ => return None,
        })
    }

    /// The spec's name, e.g. `"S_NOENT"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "S_OK",
            Self::IoErr => "S_IOERR",
            Self::Unsupp => "S_UNSUPP",
            Self::DevErr => "S_DEVERR",
            Self::Inval => "S_INVAL",
            Self::Range => "S_RANGE",
            Self::NoEnt => "S_NOENT",
            Self::Fault => "S_FAULT",
            Self::NoMem => "S_NOMEM",
        }
    }
}

/// `struct virtio_iommu_req_head` (§5.13.6), 4 bytes: first bytes of every request's
/// device-readable part.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ReqHead {
    /// Request type, a [`RequestType`] value.
    pub type_: u8,
    /// Reserved: the driver SHOULD write 0, the device MUST ignore it.
    pub reserved: [u8; 3],
}

impl ReqHead {
    /// A head for `type_` with `reserved` zeroed.
    pub const fn new(type_: RequestType) -> Self {
        Self {
            type_: type_ as u8,
            reserved: [0; 3],
        }
    }
}

/// `struct virtio_iommu_req_tail` (§5.13.6), 4 bytes: last bytes of every request's
/// device-writable part.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ReqTail {
    /// A [`Status`] value.
    pub status: u8,
    /// Reserved: the device SHOULD write 0, the driver MUST ignore it.
    pub reserved: [u8; 3],
}

/// `VIRTIO_IOMMU_ATTACH_F_BYPASS` (§5.13.6.3): the domain is a bypass domain.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;

/// Device-readable part of `struct virtio_iommu_req_attach` (§5.13.6.3), 20 bytes; a
/// [`ReqTail`] follows in the device-writable part.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ReqAttach {
    /// `type_` = [`RequestType::Attach`].
    pub head: ReqHead,
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// [`ATTACH_F_BYPASS`] or 0.
    pub flags: U32,
    /// Reserved: the device MUST reject a non-zero value with S_INVAL.
    pub reserved: [u8; 4],
}

/// Device-readable part of `struct virtio_iommu_req_detach` (§5.13.6.4), 20 bytes.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ReqDetach {
    /// `type_` = [`RequestType::Detach`].
    pub head: ReqHead,
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// Reserved: the device MUST ignore it.
    pub reserved: [u8; 8],
}

bitflags! {
    /// MAP flags (`virtio_iommu_req_map.flags`, §5.13.6.5).
    #[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Hash)]
    pub struct MapFlags: u32 {
        /// `VIRTIO_IOMMU_MAP_F_READ`: the endpoint may read the range.
        const READ = 1 << 0;
        /// `VIRTIO_IOMMU_MAP_F_WRITE`: the endpoint may write the range.
        const WRITE = 1 << 1;
        /// `VIRTIO_IOMMU_MAP_F_MMIO`: the range is device memory (needs `VIRTIO_IOMMU_F_MMIO`).
        const MMIO = 1 << 2;
    }
}

/// Device-readable part of `struct virtio_iommu_req_map` (§5.13.6.5), 36 bytes.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ReqMap {
    /// `type_` = [`RequestType::Map`].
    pub head: ReqHead,
    /// Domain ID.
    pub domain: U32,
    /// First IOVA of the range.
    pub virt_start: U64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: U64,
    /// Guest-physical address that `virt_start` maps to.
    pub phys_start: U64,
    /// [`MapFlags`] bits.
    pub flags: U32,
}

/// Device-readable part of `struct virtio_iommu_req_unmap` (§5.13.6.6), 28 bytes.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ReqUnmap {
    /// `type_` = [`RequestType::Unmap`].
    pub head: ReqHead,
    /// Domain ID.
    pub domain: U32,
    /// First IOVA of the range.
    pub virt_start: U64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: U64,
    /// Reserved: the device MAY reject a non-zero value with S_INVAL.
    pub reserved: [u8; 4],
}

/// Device-readable part of `struct virtio_iommu_req_probe` (§5.13.6.7), 72 bytes; the
/// device-writable part is `probe_size` bytes of properties then a [`ReqTail`].
#[derive(
    Clone, Copy, Debug, Eq, PartialEq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct ReqProbe {
    /// `type_` = [`RequestType::Probe`].
    pub head: ReqHead,
    /// Endpoint ID.
    pub endpoint: U32,
    /// Reserved: the device MUST ignore it.
    pub reserved: [u8; 64],
}

impl Default for ReqProbe {
    fn default() -> Self {
        Self {
            head: ReqHead::new(RequestType::Probe),
            endpoint: U32::ZERO,
            reserved: [0; 64],
        }
    }
}

/// `VIRTIO_IOMMU_PROBE_T_NONE` (§5.13.6.7): end of the property list.
pub const PROBE_T_NONE: u16 = 0;
/// `VIRTIO_IOMMU_PROBE_T_RESV_MEM` (§5.13.6.8): a reserved memory region.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// `VIRTIO_IOMMU_PROBE_T_MASK`: the `type` bits of a property header; bits 12-15 are reserved.
pub const PROBE_T_MASK: u16 = 0xfff;

/// `struct virtio_iommu_probe_property` header (§5.13.6.7), 4 bytes.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ProbePropertyHeader {
    /// Bits 0-11: property type; bits 12-15: reserved (a property with these set MUST be
    /// ignored by the driver).
    pub type_: U16,
    /// Size in bytes of the property's value, *excluding* this 4-byte header. The next property
    /// starts `4 + length` bytes after this one.
    pub length: U16,
}

/// `VIRTIO_IOMMU_RESV_MEM_T_RESERVED` (§5.13.6.8.1): accesses to the region are not allowed.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// `VIRTIO_IOMMU_RESV_MEM_T_MSI` (§5.13.6.8.1): the region is an MSI doorbell, identity-mapped.
pub const RESV_MEM_T_MSI: u8 = 1;

/// `struct virtio_iommu_probe_resv_mem` (§5.13.6.8.1), 24 bytes including its header.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ProbeResvMem {
    /// Header with `type_` = [`PROBE_T_RESV_MEM`] and `length` = 20.
    pub head: ProbePropertyHeader,
    /// [`RESV_MEM_T_RESERVED`] or [`RESV_MEM_T_MSI`].
    pub subtype: u8,
    /// Reserved.
    pub reserved: [u8; 3],
    /// First address of the region (IOVA, equal to the guest-physical address).
    pub start: U64,
    /// Last address of the region (inclusive).
    pub end: U64,
}

/// `VIRTIO_IOMMU_FAULT_R_UNKNOWN` (§5.13.6.9).
pub const FAULT_R_UNKNOWN: u8 = 0;
/// `VIRTIO_IOMMU_FAULT_R_DOMAIN` (§5.13.6.9): the endpoint accessed memory while not attached.
pub const FAULT_R_DOMAIN: u8 = 1;
/// `VIRTIO_IOMMU_FAULT_R_MAPPING` (§5.13.6.9): no mapping, or a mapping without the permission.
pub const FAULT_R_MAPPING: u8 = 2;

/// `VIRTIO_IOMMU_FAULT_F_READ`: the faulting access was a read.
pub const FAULT_F_READ: u32 = 1 << 0;
/// `VIRTIO_IOMMU_FAULT_F_WRITE`: the faulting access was a write.
pub const FAULT_F_WRITE: u32 = 1 << 1;
/// `VIRTIO_IOMMU_FAULT_F_ADDRESS`: the `address` field is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// `struct virtio_iommu_fault` (§5.13.6.9), 24 bytes, written by the device into an `eventq`
/// buffer.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Eq,
    PartialEq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct Fault {
    /// `FAULT_R_*` reason.
    pub reason: u8,
    /// Reserved: a driver MUST ignore a report with non-zero reserved bytes.
    pub reserved: [u8; 3],
    /// `FAULT_F_*` flags.
    pub flags: U32,
    /// Endpoint ID of the faulting endpoint.
    pub endpoint: U32,
    /// Reserved: the driver MUST ignore it.
    pub reserved1: [u8; 4],
    /// Faulting address (IOVA), valid if `flags` has [`FAULT_F_ADDRESS`].
    pub address: U64,
}

const _: () = assert!(size_of::<Config>() == 40);
const _: () = assert!(size_of::<ReqHead>() == 4);
const _: () = assert!(size_of::<ReqTail>() == 4);
const _: () = assert!(size_of::<ReqAttach>() == 20);
const _: () = assert!(size_of::<ReqDetach>() == 20);
const _: () = assert!(size_of::<ReqMap>() == 36);
const _: () = assert!(size_of::<ReqUnmap>() == 28);
const _: () = assert!(size_of::<ReqProbe>() == 72);
const _: () = assert!(size_of::<ProbePropertyHeader>() == 4);
const _: () = assert!(size_of::<ProbeResvMem>() == 24);
const _: () = assert!(size_of::<Fault>() == 24);

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn map_request_bytes_match_the_spec_layout() {
        let req = ReqMap {
            head: ReqHead::new(RequestType::Map),
            domain: 0x0102_0304.into(),
            virt_start: 0x1000.into(),
            virt_end: 0x1fff.into(),
            phys_start: 0x4000_0000.into(),
            flags: (MapFlags::READ | MapFlags::WRITE).bits().into(),
        };
        let b = req.as_bytes();
        assert_eq!(b[0], 3);
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(&b[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x1fffu64.to_le_bytes());
        assert_eq!(&b[24..32], &0x4000_0000u64.to_le_bytes());
        assert_eq!(&b[32..36], &3u32.to_le_bytes());
    }

    #[test]
    fn config_offsets_match_the_struct() {
        let cfg = Config {
            page_size_mask: 0x1111.into(),
            input_range: Range64 {
                start: 0.into(),
                end: 0x2222.into(),
            },
            domain_range: Range32 {
                start: 0.into(),
                end: 0x3333.into(),
            },
            probe_size: 0x4444.into(),
            bypass: 1,
            reserved: [0; 3],
        };
        let b = cfg.as_bytes();
        use config_offset::*;
        assert_eq!(
            u64::from_le_bytes(b[PAGE_SIZE_MASK..][..8].try_into().unwrap()),
            0x1111
        );
        assert_eq!(
            u64::from_le_bytes(b[INPUT_RANGE_END..][..8].try_into().unwrap()),
            0x2222
        );
        assert_eq!(
            u32::from_le_bytes(b[DOMAIN_RANGE_END..][..4].try_into().unwrap()),
            0x3333
        );
        assert_eq!(
            u32::from_le_bytes(b[PROBE_SIZE..][..4].try_into().unwrap()),
            0x4444
        );
        assert_eq!(b[BYPASS], 1);
        assert_eq!(INPUT_RANGE_START, 8);
        assert_eq!(DOMAIN_RANGE_START, 24);
    }

    #[test]
    fn fault_and_resv_mem_decode_from_qemu_bytes() {
        // RESV_MEM as QEMU's virt machine emits it for the GICv2m doorbell.
        let bytes = [
            0x01, 0x00, 0x14, 0x00, 0x01, 0, 0, 0, 0x00, 0x00, 0x02, 0x08, 0, 0, 0, 0, 0xff, 0x0f,
            0x02, 0x08, 0, 0, 0, 0,
        ];
        let resv = ProbeResvMem::read_from_bytes(&bytes[..]).unwrap();
        assert_eq!(resv.head.type_.get(), PROBE_T_RESV_MEM);
        assert_eq!(resv.head.length.get(), 20);
        assert_eq!(resv.subtype, RESV_MEM_T_MSI);
        assert_eq!(resv.start.get(), 0x0802_0000);
        assert_eq!(resv.end.get(), 0x0802_0fff);

        let mut f = [0u8; 24];
        f[0] = FAULT_R_MAPPING;
        f[4..8].copy_from_slice(&0x102u32.to_le_bytes());
        f[8..12].copy_from_slice(&0x18u32.to_le_bytes());
        f[16..24].copy_from_slice(&0xdead_b000u64.to_le_bytes());
        let fault = Fault::read_from_bytes(&f[..]).unwrap();
        assert_eq!(fault.reason, FAULT_R_MAPPING);
        assert_eq!(fault.flags.get(), FAULT_F_WRITE | FAULT_F_ADDRESS);
        assert_eq!(fault.endpoint.get(), 0x18);
        assert_eq!(fault.address.get(), 0xdead_b000);
    }

    #[test]
    fn request_types_and_statuses_round_trip_and_reject_undefined_values() {
        for t in 0..=255u8 {
            match RequestType::from_u8(t) {
                Some(rt) => assert_eq!(rt as u8, t),
                None => assert!(t == 0 || t >= 6),
            }
            match Status::from_u8(t) {
                Some(s) => assert_eq!(s as u8, t),
                None => assert!(t >= 9),
            }
        }
        assert_eq!(Status::NoEnt.name(), "S_NOENT");
    }

    #[test]
    fn feature_bits_have_spec_positions() {
        assert_eq!(Features::INPUT_RANGE.bits(), 1);
        assert_eq!(Features::BYPASS_CONFIG.bits(), 64);
        assert_eq!(Features::VERSION_1.bits(), 1 << 32);
        assert_eq!(Features::ACCESS_PLATFORM.bits(), 1 << 33);
        // What QEMU 10.0 offers (observed): 0x101_3000_0077.
        let qemu = Features::from_bits_retain(0x101_3000_0077);
        assert!(qemu.contains(Features::MAP_UNMAP | Features::PROBE | Features::BYPASS_CONFIG));
        assert!(!qemu.contains(Features::BYPASS));
    }
}
