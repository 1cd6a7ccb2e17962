//! Where the virtio-iommu is and how to open it: a PCI function (`virtio,pci-iommu`, opened with
//! virtio-drivers' [`PciTransport`]) or a virtio-mmio register window (a `virtio,mmio` node with
//! `#iommu-cells`, opened with [`MmioTransport`]; virtio v1.3 §4.2 "Virtio Over MMIO"). Both
//! come out as one [`IommuTransport`], so the cases and the bench modes drive either through
//! the same code.
//!
//! The devicetree is believed only as far as it can be checked: a PCI IOMMU must be a
//! 1af4:1057 function at the requester ID its node's `reg` gives, a virtio-mmio IOMMU a window
//! in the firmware's device memory whose registers say "virtio" (magic), version 2 and DeviceID
//! 23 (virtio v1.3 §5 "Device Types": 23 is the IOMMU device).

use alloc::format;
use alloc::string::String;
use core::ptr::NonNull;
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};
use virtio_iommu_driver::topology::IommuLocation;

use crate::hal::IdentityHal;
use crate::mmu::{memory_type, MemoryType};
use crate::pci::{PciBus, PciFunction};

/// The virtio-iommu's transport, whichever it is (`'static`: a virtio-mmio window is device
/// memory of the identity map for the whole run).
pub type IommuTransport = SomeTransport<'static>;

/// virtio DeviceID of the IOMMU device (virtio v1.3 §5).
pub const IOMMU_DEVICE_ID: u32 = 23;

/// `MagicValue`: "virt" read as a little-endian u32 (virtio v1.3 §4.2.2).
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Byte offset of `MagicValue` (§4.2.2).
const MAGIC_OFFSET: u64 = 0x0;
/// Byte offset of `Version` (§4.2.2: 2 for the modern transport, 1 for legacy).
const VERSION_OFFSET: u64 = 0x4;
/// Byte offset of `DeviceID` (§4.2.2; 0 for an empty slot).
const DEVICE_ID_OFFSET: u64 = 0x8;

/// Smallest virtio-mmio window: the register header, 0x100 bytes (virtio v1.3 §4.2.2; the
/// device-specific configuration starts at 0x100).
const MMIO_HEADER_SIZE: u64 = 0x100;

/// How the firmware reaches one virtio-iommu.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum IommuDevice {
    /// A virtio-pci function (its own requester ID is not one of its endpoints).
    Pci(PciFunction),
    /// A virtio-mmio device: registers at `base` (CPU physical = virtual address), `size` bytes.
    Mmio {
        /// First byte of the register window.
        base: u64,
        /// Window size in bytes (≥ 0x100).
        size: u64,
    },
}

/// A virtio-iommu of the devicetree that passed the checks of [`find`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct FoundIommu {
    /// Index into `topology.iommus` (what [`Endpoint::iommu`] refers to).
    ///
    /// [`Endpoint::iommu`]: virtio_iommu_driver::topology::Endpoint::iommu
    pub index: usize,
    /// Where it is.
    pub device: IommuDevice,
}

/// Checks every IOMMU node of `pci.topology` and returns the first, printing one `#` line per
/// node.
///
/// # Errors
/// A message naming the node when there is none, or when a node's device is not what the
/// devicetree says: no 1af4:1057 function at a `virtio,pci-iommu` node's requester ID, or a
/// virtio-mmio window outside device memory, too small, without the virtio magic, of legacy
/// version 1, or holding another DeviceID than 23.
pub fn find(pci: &mut PciBus) -> Result<FoundIommu, String> {
    if pci.topology.iommus.is_empty() {
        return Err("no virtio,pci-iommu or virtio,mmio IOMMU node".into());
    }
    let mut found = None;
    for index in 0..pci.topology.iommus.len() {
        let Some(node) = pci.topology.iommus.get(index).cloned() else {
            break;
        };
        println!(
            "# iommu {index}: {} phandle {:#x} {:?}",
            node.path, node.phandle, node.location
        );
        let device = match node.location {
            IommuLocation::Pci {
                host_bridge,
                requester_id,
            } => {
                let Some(f) = pci.by_requester_id(host_bridge, requester_id) else {
                    return Err(format!(
                        "{}: no PCI function at requester ID {requester_id:#x}",
                        node.path
                    ));
                };
                if (f.vendor_id, f.device_id) != (0x1af4, 0x1057) {
                    return Err(format!(
                        "{}: {:04x}:{:04x} is not a virtio-iommu",
                        node.path, f.vendor_id, f.device_id
                    ));
                }
                IommuDevice::Pci(f.clone())
            }
            IommuLocation::Mmio { base, size } => {
                let device = IommuDevice::Mmio { base, size };
                // Opening reads magic, DeviceID and version before anything is written;
                // dropping the transport resets the IOMMU, which the driver does anyway.
                let transport = device
                    .open(pci)
                    .map_err(|e| format!("{}: {e}", node.path))?;
                println!(
                    "# {}: virtio-mmio version 2, DeviceID {IOMMU_DEVICE_ID} (IOMMU) at {base:#x}+{size:#x}",
                    node.path
                );
                drop(transport);
                device
            }
        };
        found.get_or_insert(FoundIommu { index, device });
    }
    found.ok_or_else(|| "no usable virtio-iommu".into())
}

impl IommuDevice {
    /// Opens the transport (no register is written: the driver resets the device).
    ///
    /// Only one transport of a device may be alive at a time: the caller drops the previous
    /// one (or the driver that owns it) first.
    ///
    /// # Errors
    /// For PCI, virtio-drivers' refusal of the capabilities. For virtio-mmio, a window outside
    /// the firmware's device memory or smaller than the 0x100-byte header, no virtio magic,
    /// legacy version 1 (QEMU's default: `-global virtio-mmio.force-legacy=false` gives
    /// version 2), or a DeviceID other than 23 (0: an empty slot).
    pub fn open(&self, pci: &mut PciBus) -> Result<IommuTransport, String> {
        match self {
            Self::Pci(f) => {
                let root = pci
                    .roots
                    .get_mut(f.host_bridge)
                    .ok_or_else(|| format!("no host bridge {}", f.host_bridge))?;
                PciTransport::new::<IdentityHal, _>(root, f.device_function)
                    .map(SomeTransport::from)
                    .map_err(|e| format!("PCI transport: {e:?}"))
            }
            &Self::Mmio { base, size } => open_mmio(base, size).map(SomeTransport::from),
        }
    }

    /// Whether `f` is this IOMMU itself (a PCI IOMMU's own function, which is not its
    /// endpoint); never for a virtio-mmio IOMMU.
    pub fn is_function(&self, f: &PciFunction) -> bool {
        matches!(self, Self::Pci(i) if i.host_bridge == f.host_bridge && i.requester_id == f.requester_id)
    }

    /// Whether functions under host bridge `host_bridge` may be this IOMMU's endpoints: a PCI
    /// IOMMU serves its own host bridge, a virtio-mmio one any (`iommu-map` decides).
    pub fn may_serve(&self, host_bridge: usize) -> bool {
        match self {
            Self::Pci(i) => i.host_bridge == host_bridge,
            Self::Mmio { .. } => true,
        }
    }

    /// Host bridge index and bus whose empty device slots may serve as an absent endpoint: a
    /// PCI IOMMU's own bus; for virtio-mmio, the first bus of each host bridge.
    pub fn buses(&self, pci: &PciBus) -> alloc::vec::Vec<(usize, u8)> {
        match self {
            Self::Pci(i) => alloc::vec![(i.host_bridge, i.device_function.bus)],
            Self::Mmio { .. } => pci
                .topology
                .host_bridges
                .iter()
                .enumerate()
                .map(|(index, hb)| (index, hb.bus_start))
                .collect(),
        }
    }

    /// A short name: `pci 00:01.0` or `mmio 0xa003e00`.
    pub fn describe(&self) -> String {
        match self {
            Self::Pci(f) => format!(
                "pci {:02x}:{:02x}.{}",
                f.device_function.bus, f.device_function.device, f.device_function.function
            ),
            Self::Mmio { base, .. } => format!("mmio {base:#x}"),
        }
    }
}

/// Opens the virtio-mmio window `[base, base + size)` as the IOMMU's transport.
fn open_mmio(base: u64, size: u64) -> Result<MmioTransport<'static>, String> {
    if size < MMIO_HEADER_SIZE {
        return Err(format!(
            "virtio-mmio window {base:#x}+{size:#x} is smaller than the {MMIO_HEADER_SIZE:#x}-byte header"
        ));
    }
    if memory_type(base, size) != Some(MemoryType::Device) {
        return Err(format!(
            "virtio-mmio window {base:#x}+{size:#x} is not device memory of the identity map"
        ));
    }
    if !base.is_multiple_of(4) {
        return Err(format!(
            "virtio-mmio window {base:#x} is not 4-byte aligned"
        ));
    }
    // Identify the device with reads only: a transport of a device that is not ours would reset
    // it when dropped.
    let [magic, version, device_id] = [MAGIC_OFFSET, VERSION_OFFSET, DEVICE_ID_OFFSET].map(|o| {
        // SAFETY: `[base, base + size)` is device memory of the identity map for the whole run
        // (checked above), at least 0x100 bytes, and `base` is 4-byte aligned, so each of
        // these 32-bit registers (virtio v1.3 §4.2.2: offsets 0x0, 0x4, 0x8) is in bounds and
        // aligned; reading them has no side effect.
        unsafe { core::ptr::read_volatile((base + o) as usize as *const u32) }
    });
    if magic != MMIO_MAGIC {
        return Err(format!(
            "virtio-mmio at {base:#x}: magic {magic:#010x}, not \"virt\" ({MMIO_MAGIC:#010x})"
        ));
    }
    if device_id != IOMMU_DEVICE_ID {
        return Err(format!(
            "virtio-mmio at {base:#x} holds DeviceID {device_id}, not {IOMMU_DEVICE_ID} \
             (virtio-iommu){}",
            if device_id == 0 {
                ": an empty slot"
            } else {
                ""
            }
        ));
    }
    if version != 2 {
        return Err(format!(
            "virtio-mmio at {base:#x} is version {version}, not 2: a legacy transport cannot \
             offer VERSION_1 (QEMU: -global virtio-mmio.force-legacy=false)"
        ));
    }
    let len = usize::try_from(size).map_err(|_| format!("window size {size:#x}"))?;
    let header = NonNull::new(base as usize as *mut VirtIOHeader)
        .ok_or_else(|| String::from("virtio-mmio window at address 0"))?;
    // SAFETY: `[base, base + size)` is mapped as device memory for the whole run (checked
    // above), is aligned for the header's 32-bit registers, and holds a virtio-mmio IOMMU (its
    // registers say so). Callers keep at most one transport of it alive (see
    // `IommuDevice::open`), so the pointer is unique while it lives.
    let transport = unsafe { MmioTransport::new(header, len) }
        .map_err(|e| format!("virtio-mmio at {base:#x}: {e}"))?;
    if transport.device_type() != DeviceType::IOMMU || transport.version() != MmioVersion::Modern {
        // Not reachable after the checks above; kept so a change there cannot slip through.
        return Err(format!(
            "virtio-mmio at {base:#x}: {:?} version {:?}",
            transport.device_type(),
            transport.version()
        ));
    }
    Ok(transport)
}
