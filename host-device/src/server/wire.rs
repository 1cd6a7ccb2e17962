//! Message layouts of the vfio-user protocol (QEMU `docs/interop/vfio-user.rst`, version 0.1),
//! as zerocopy structs: all little-endian on the wire, which is the host order on the machines
//! this runs on (x86_64, aarch64).
//!
//! The `vfio_user` crate (0.1.7) has the same structs but keeps them private; its public
//! [`vfio_user::Command`], [`vfio_user::DmaMapFlags`] and [`vfio_user::DmaUnmapFlags`] and
//! the `vfio-bindings` constants are used for the values inside them.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Message type bits of [`Header::flags`]: a command.
pub const FLAG_COMMAND: u32 = 0;
/// Message type bits of [`Header::flags`]: a reply.
pub const FLAG_REPLY: u32 = 1;
/// Mask of the message type bits.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// The sender wants no reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// The reply reports an error; [`Header::error`] holds an errno value.
pub const FLAG_ERROR: u32 = 1 << 5;

/// The 16-byte header of every message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    /// Chosen by the sender of a command, echoed by the reply.
    pub message_id: u16,
    /// [`vfio_user::Command`] value.
    pub command: u16,
    /// Size in bytes of the whole message, this header included.
    pub message_size: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// errno value of an error reply, else 0.
    pub error: u32,
}

/// Size in bytes of [`Header`].
pub const HEADER_SIZE: usize = core::mem::size_of::<Header>();

/// VERSION payload (then a NUL-terminated JSON capabilities string).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Version {
    /// Protocol major version.
    pub major: u16,
    /// Protocol minor version.
    pub minor: u16,
}

/// DMA_MAP payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DmaMap {
    /// Size of this payload.
    pub argsz: u32,
    /// [`vfio_user::DmaMapFlags`].
    pub flags: u32,
    /// Byte offset of the mapping in the file descriptor sent with the message.
    pub offset: u64,
    /// Guest physical address of the mapping.
    pub address: u64,
    /// Size of the mapping in bytes.
    pub size: u64,
}

/// DMA_UNMAP payload (also its reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DmaUnmap {
    /// Size of this payload.
    pub argsz: u32,
    /// [`vfio_user::DmaUnmapFlags`].
    pub flags: u32,
    /// Guest physical address of the range.
    pub address: u64,
    /// Size of the range in bytes.
    pub size: u64,
}

/// DEVICE_GET_INFO payload and reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeviceInfo {
    /// Size of this payload.
    pub argsz: u32,
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indices.
    pub num_irqs: u32,
}

/// DEVICE_GET_REGION_INFO payload and reply (`struct vfio_region_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegionInfo {
    /// Size of the reply the client can take.
    pub argsz: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability (0: none).
    pub cap_offset: u32,
    /// Size of the region in bytes.
    pub size: u64,
    /// Offset for mmap of the region's file descriptor.
    pub offset: u64,
}

/// DEVICE_GET_IRQ_INFO payload and reply (`struct vfio_irq_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IrqInfo {
    /// Size of this payload.
    pub argsz: u32,
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Number of interrupts of the index.
    pub count: u32,
}

/// DEVICE_SET_IRQS payload (`struct vfio_irq_set`; DATA_BOOL adds one byte per interrupt).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IrqSet {
    /// Size of this payload, data included.
    pub argsz: u32,
    /// `VFIO_IRQ_SET_DATA_*` | `VFIO_IRQ_SET_ACTION_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First interrupt of the range.
    pub start: u32,
    /// Number of interrupts.
    pub count: u32,
}

/// REGION_READ / REGION_WRITE payload (then the data of a write or a read reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegionAccess {
    /// Byte offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Number of bytes.
    pub count: u32,
}
