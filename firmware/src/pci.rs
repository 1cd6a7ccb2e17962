//! PCI enumeration and BAR assignment for the ECAM host bridges of the devicetree.
//!
//! Nothing is hard-coded: host bridges, ECAM regions, bus ranges and MMIO windows come from
//! [`Topology::from_dtb`]; devices and BAR sizes from configuration space.
//!
//! Limits: every bus number in each bridge's `bus-range` is scanned directly (PCI-PCI bridges
//! are listed but not configured, so functions behind them are only found if firmware before us
//! configured the bridge — QEMU does not); I/O BARs are not assigned; prefetchable and
//! non-prefetchable windows are treated alike (fine without bridges).

use alloc::vec::Vec;
use core::fmt;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, DeviceFunction, HeaderType, MemoryBarType, MmioCam, PciRoot,
};
use virtio_iommu_driver::topology::{PciHostBridge, PciSpace, PciWindow, Topology, TopologyError};

use crate::mmu::{memory_type, MemoryType};

/// Size of the configuration space of one bus under ECAM.
const ECAM_BUS_SIZE: u64 = 1 << 20;

/// A memory BAR after assignment.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct AssignedBar {
    /// CPU physical (= virtual, identity map) address of the BAR.
    pub cpu_address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Whether it is a 64-bit BAR (occupying this and the next BAR slot).
    pub is_64bit: bool,
}

/// A PCI function found by [`enumerate`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PciFunction {
    /// Index into [`Topology::host_bridges`] (and [`PciBus::roots`]).
    pub host_bridge: usize,
    /// Bus, device and function numbers.
    pub device_function: DeviceFunction,
    /// `bus << 8 | device << 3 | function`.
    pub requester_id: u16,
    /// Vendor ID from configuration space.
    pub vendor_id: u16,
    /// Device ID from configuration space.
    pub device_id: u16,
    /// Base class code.
    pub class: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Assigned memory BARs, by BAR index (the upper half of a 64-bit BAR is `None`; so are
    /// I/O BARs, unimplemented BARs and BARs that did not fit in any window).
    pub bars: [Option<AssignedBar>; 6],
}

/// All PCI functions of all ECAM host bridges.
pub struct PciBus {
    /// The topology the bus was enumerated from (host bridges, virtio-iommus, `iommu-map`).
    pub topology: Topology,
    /// Configuration access, one per entry of `topology.host_bridges`.
    pub roots: Vec<PciRoot<MmioCam<'static>>>,
    /// Every function found, in bridge, bus, device, function order.
    pub functions: Vec<PciFunction>,
}

impl PciBus {
    /// The first function with this vendor and device ID.
    pub fn find(&self, vendor_id: u16, device_id: u16) -> Option<&PciFunction> {
        self.functions
            .iter()
            .find(|f| f.vendor_id == vendor_id && f.device_id == device_id)
    }

    /// The function with this requester ID on host bridge `host_bridge`.
    pub fn by_requester_id(&self, host_bridge: usize, requester_id: u16) -> Option<&PciFunction> {
        self.functions
            .iter()
            .find(|f| f.host_bridge == host_bridge && f.requester_id == requester_id)
    }
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciBus")
            .field("topology", &self.topology)
            .field("roots", &self.roots.len())
            .field("functions", &self.functions)
            .finish()
    }
}

/// Why enumeration failed.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum PciError {
    /// The devicetree could not be read as a topology.
    Topology(TopologyError),
    /// The ECAM region of host bridge `host_bridge` is not device memory in the identity map.
    EcamNotMapped {
        /// Index of the host bridge.
        host_bridge: usize,
        /// ECAM base address.
        base: u64,
        /// ECAM size.
        size: u64,
    },
    /// `bus-range` starts above 0 and the ECAM base is too low to be rebased to bus 0 (which
    /// `MmioCam` indexes from).
    UnsupportedBusRange {
        /// Index of the host bridge.
        host_bridge: usize,
        /// First bus number.
        bus_start: u8,
    },
    /// Sizing a BAR failed (the device reported an invalid BAR type).
    Bar {
        /// The function.
        device_function: DeviceFunction,
        /// The BAR index.
        bar: u8,
    },
}

impl From<TopologyError> for PciError {
    fn from(e: TopologyError) -> Self {
        Self::Topology(e)
    }
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Topology(e) => write!(f, "devicetree topology: {e:?}"),
            Self::EcamNotMapped { host_bridge, base, size } => write!(
                f,
                "host bridge {host_bridge}: ECAM {base:#x}+{size:#x} is not device-mapped"
            ),
            Self::UnsupportedBusRange { host_bridge, bus_start } => write!(
                f,
                "host bridge {host_bridge}: bus-range starting at {bus_start} below an ECAM base that cannot be rebased"
            ),
            Self::Bar { device_function, bar } => {
                write!(f, "{device_function}: BAR{bar} has an invalid type")
            }
        }
    }
}

/// Bump allocator over one MMIO window, in PCI bus addresses.
struct WindowAllocator {
    window: PciWindow,
    next: u64,
}

impl WindowAllocator {
    /// Allocates `size` bytes aligned to `size`; `below_4g` restricts the PCI address range.
    fn allocate(&mut self, size: u64, below_4g: bool) -> Option<u64> {
        let start = self.next.checked_next_multiple_of(size)?;
        let end = start.checked_add(size)?;
        let window_end = self.window.pci_address.checked_add(self.window.size)?;
        if end > window_end || (below_4g && end > 1 << 32) {
            return None;
        }
        self.next = end;
        Some(start)
    }

    /// CPU address of a PCI address inside this window.
    fn to_cpu(&self, pci_address: u64) -> u64 {
        pci_address - self.window.pci_address + self.window.cpu_address
    }
}

/// The memory windows of `bridge` usable for BARs (device-mapped in the identity map).
fn window_allocators(bridge: &PciHostBridge) -> Vec<WindowAllocator> {
    bridge
        .windows
        .iter()
        .filter(|w| matches!(w.space, PciSpace::Memory32 | PciSpace::Memory64) && w.size > 0)
        .filter(|w| {
            let mapped = memory_type(w.cpu_address, w.size) == Some(MemoryType::Device);
            if !mapped {
                log::warn!(
                    "pci: window {:#x}+{:#x} is not device-mapped; not used",
                    w.cpu_address,
                    w.size
                );
            }
            mapped
        })
        .map(|&window| WindowAllocator {
            window,
            // Never hand out PCI address 0 (it reads as "unassigned").
            next: window.pci_address.max(1),
        })
        .collect()
}

/// Picks a window for a BAR and allocates it: 64-bit BARs prefer `Memory64` windows and fall
/// back to `Memory32` (below 4 GiB); 32-bit BARs use `Memory32` windows (and any 64-bit window
/// part below 4 GiB). Returns `(pci_address, cpu_address)`.
fn allocate_bar(windows: &mut [WindowAllocator], size: u64, is_64bit: bool) -> Option<(u64, u64)> {
    let order: [PciSpace; 2] = if is_64bit {
        [PciSpace::Memory64, PciSpace::Memory32]
    } else {
        [PciSpace::Memory32, PciSpace::Memory64]
    };
    for space in order {
        for window in windows.iter_mut().filter(|w| w.window.space == space) {
            if let Some(pci) = window.allocate(size, !is_64bit) {
                return Some((pci, window.to_cpu(pci)));
            }
        }
    }
    None
}

/// Configuration access for `bridge`, rebased so that `MmioCam`'s bus numbers index correctly.
fn root_for(index: usize, bridge: &PciHostBridge) -> Result<PciRoot<MmioCam<'static>>, PciError> {
    if memory_type(bridge.ecam_base, bridge.ecam_size) != Some(MemoryType::Device) {
        return Err(PciError::EcamNotMapped {
            host_bridge: index,
            base: bridge.ecam_base,
            size: bridge.ecam_size,
        });
    }
    // MmioCam computes `bus << 20 | ...` from its base; the ECAM region starts at `bus_start`.
    let base = bridge
        .ecam_base
        .checked_sub(u64::from(bridge.bus_start) * ECAM_BUS_SIZE)
        .filter(|&b| b != 0 || bridge.bus_start == 0)
        .ok_or(PciError::UnsupportedBusRange {
            host_bridge: index,
            bus_start: bridge.bus_start,
        })?;
    // SAFETY: `MmioCam` nominally covers 256 MiB from `base` (`Cam::Ecam`), but it is only ever
    // used with bus numbers in `bus_start..=bus_end`, whose configuration spaces lie inside
    // `[ecam_base, ecam_base + ecam_size)` (Topology clamps `bus_end` to the region): that region
    // is device-mapped MMIO (checked above), used by nothing else, for the program's lifetime.
    // With `highmem=off` the ECAM is only 16 MiB, so the nominal 256 MiB overlaps RAM, which is
    // never accessed through it.
    let cam = unsafe { MmioCam::new(base as *mut u8, Cam::Ecam) };
    Ok(PciRoot::new(cam))
}

/// Sizes and assigns the memory BARs of a type-0 function, then enables memory decoding and bus
/// mastering (only if every memory BAR could be assigned).
fn assign_bars(
    root: &mut PciRoot<MmioCam<'static>>,
    device_function: DeviceFunction,
    windows: &mut [WindowAllocator],
) -> Result<[Option<AssignedBar>; 6], PciError> {
    let (_, command) = root.get_status_command(device_function);
    root.set_command(
        device_function,
        command & !(Command::MEMORY_SPACE | Command::IO_SPACE | Command::BUS_MASTER),
    );
    let mut assigned = [None; 6];
    let mut all_assigned = true;
    let mut index = 0u8;
    while index < 6 {
        let info = root
            .bar_info(device_function, index)
            .map_err(|_| PciError::Bar {
                device_function,
                bar: index,
            })?;
        let slot = index;
        index += if info.as_ref().is_some_and(BarInfo::takes_two_entries) {
            2
        } else {
            1
        };
        let Some(BarInfo::Memory {
            address_type, size, ..
        }) = info
        else {
            continue; // unimplemented or I/O BAR
        };
        let is_64bit = match address_type {
            MemoryBarType::Width32 => false,
            MemoryBarType::Width64 => true,
            MemoryBarType::Below1MiB => {
                log::warn!("pci: {device_function} BAR{slot}: below-1MiB BARs are not supported");
                all_assigned = false;
                continue;
            }
        };
        if size == 0 || !size.is_power_of_two() {
            log::warn!("pci: {device_function} BAR{slot}: bad size {size:#x}");
            all_assigned = false;
            continue;
        }
        match allocate_bar(windows, size, is_64bit) {
            Some((pci_address, cpu_address)) => {
                if is_64bit {
                    root.set_bar_64(device_function, slot, pci_address);
                } else {
                    // `allocate_bar` keeps 32-bit BARs below 4 GiB.
                    root.set_bar_32(device_function, slot, pci_address as u32);
                }
                assigned[usize::from(slot)] = Some(AssignedBar {
                    cpu_address,
                    size,
                    is_64bit,
                });
            }
            None => {
                log::warn!("pci: {device_function} BAR{slot}: no window space for {size:#x} bytes");
                all_assigned = false;
            }
        }
    }
    if all_assigned {
        root.set_command(
            device_function,
            command | Command::MEMORY_SPACE | Command::BUS_MASTER,
        );
    }
    Ok(assigned)
}

/// Reads the devicetree topology, scans every host bridge's bus range, assigns memory BARs from
/// the bridge's windows, enables MEMORY_SPACE | BUS_MASTER, and prints one line per function.
pub fn enumerate(dtb: &[u8]) -> Result<PciBus, PciError> {
    let topology = Topology::from_dtb(dtb)?;
    let mut roots = Vec::with_capacity(topology.host_bridges.len());
    let mut functions = Vec::new();
    for (index, bridge) in topology.host_bridges.iter().enumerate() {
        let mut root = root_for(index, bridge)?;
        let mut windows = window_allocators(bridge);
        println!(
            "pci: host bridge {index} {} ECAM {:#x}+{:#x} buses {}..={}",
            bridge.path, bridge.ecam_base, bridge.ecam_size, bridge.bus_start, bridge.bus_end
        );
        for bus in bridge.bus_start..=bridge.bus_end {
            let found: Vec<_> = root.enumerate_bus(bus).collect();
            for (device_function, info) in found {
                let bars = match info.header_type {
                    HeaderType::Standard => assign_bars(&mut root, device_function, &mut windows)?,
                    other => {
                        println!("pci: {device_function} {:?}: not configured", other);
                        [None; 6]
                    }
                };
                let function = PciFunction {
                    host_bridge: index,
                    device_function,
                    requester_id: u16::from(device_function.bus) << 8
                        | u16::from(device_function.device) << 3
                        | u16::from(device_function.function),
                    vendor_id: info.vendor_id,
                    device_id: info.device_id,
                    class: info.class,
                    subclass: info.subclass,
                    bars,
                };
                print_function(&function);
                functions.push(function);
            }
        }
        roots.push(root);
    }
    Ok(PciBus {
        topology,
        roots,
        functions,
    })
}

/// One line: `pci: 00:02.0 1af4:1042 class 01.00 rid 0x0010 BAR1 0x10000000+0x1000 BAR4 ...`.
fn print_function(function: &PciFunction) {
    print!(
        "pci: {} {:04x}:{:04x} class {:02x}.{:02x} rid {:#06x}",
        function.device_function,
        function.vendor_id,
        function.device_id,
        function.class,
        function.subclass,
        function.requester_id
    );
    for (index, bar) in function.bars.iter().enumerate() {
        if let Some(bar) = bar {
            print!(
                " BAR{index} {:#x}+{:#x}{}",
                bar.cpu_address,
                bar.size,
                if bar.is_64bit { " (64-bit)" } else { "" }
            );
        }
    }
    println!();
}
