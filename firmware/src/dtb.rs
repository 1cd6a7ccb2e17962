//! Locating and validating the flattened devicetree QEMU hands over.
//!
//! QEMU's `-kernel` ELF boot path leaves `x0 = 0` and puts the DTB at the start of RAM; the Linux
//! `Image` path passes its address in `x0`. The rule: `x0` if non-zero, else [`DEFAULT_ADDRESS`].

use core::sync::atomic::{AtomicU64, Ordering};

/// Where QEMU `-M virt` puts the DTB for ELF images: the start of RAM.
pub const DEFAULT_ADDRESS: u64 = 0x4000_0000;
/// Largest `totalsize` accepted (QEMU's blob is 1 MiB).
pub const MAX_SIZE: usize = 2 << 20;
/// FDT header magic (big-endian in memory).
const FDT_MAGIC: u32 = 0xd00d_feed;
/// Size of the FDT header (version 17).
const HEADER_SIZE: usize = 40;

/// `x0` as received at entry, recorded by [`set_boot_argument`].
static BOOT_X0: AtomicU64 = AtomicU64::new(0);
/// The validated blob.
static DTB: spin::Once<&'static [u8]> = spin::Once::new();

/// Why no devicetree could be found.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum DtbError {
    /// The address is not 8-byte aligned or not inside mapped RAM.
    BadAddress(u64),
    /// No FDT magic at the address (the value found instead).
    BadMagic(u64, u32),
    /// `totalsize` is smaller than the header or larger than [`MAX_SIZE`].
    BadSize(u64, u32),
    /// The `fdt` crate refused the blob.
    Unparsable(u64),
}

impl core::fmt::Display for DtbError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadAddress(a) => write!(f, "DTB address {a:#x} is not aligned RAM"),
            Self::BadMagic(a, m) => write!(f, "no FDT magic at {a:#x} (found {m:#010x})"),
            Self::BadSize(a, s) => write!(f, "FDT at {a:#x} has implausible totalsize {s:#x}"),
            Self::Unparsable(a) => write!(f, "FDT at {a:#x} cannot be parsed"),
        }
    }
}

/// Records the `x0` register the firmware was entered with. Call once, first thing in `main`.
pub fn set_boot_argument(x0: u64) {
    BOOT_X0.store(x0, Ordering::Relaxed);
}

/// The address the DTB is expected at: the recorded `x0` if non-zero, else [`DEFAULT_ADDRESS`].
pub fn address() -> u64 {
    match BOOT_X0.load(Ordering::Relaxed) {
        0 => DEFAULT_ADDRESS,
        x0 => x0,
    }
}

/// Validates the DTB at `address` (after removing its `FDT_NOP` tokens in place) and returns it
/// as a slice of exactly `totalsize` bytes. Called once, by [`dtb`].
fn locate(address: u64) -> Result<&'static [u8], DtbError> {
    if address & 7 != 0
        || crate::mmu::memory_type(address, HEADER_SIZE as u64)
            != Some(crate::mmu::MemoryType::Normal)
    {
        return Err(DtbError::BadAddress(address));
    }
    let header = address as *const u32;
    // SAFETY: `address` is 8-byte aligned and lies in the Normal-memory (RAM) part of the identity
    // map, so reading the two header words is a valid (if possibly garbage) read.
    let (magic, total_size) = unsafe {
        (
            u32::from_be(header.read_volatile()),
            u32::from_be(header.add(1).read_volatile()),
        )
    };
    if magic != FDT_MAGIC {
        return Err(DtbError::BadMagic(address, magic));
    }
    let size = total_size as usize;
    if !(HEADER_SIZE..=MAX_SIZE).contains(&size)
        || crate::mmu::memory_type(address, size as u64) != Some(crate::mmu::MemoryType::Normal)
    {
        return Err(DtbError::BadSize(address, total_size));
    }
    // SAFETY: the whole blob lies in mapped RAM (checked above). No other code owns or
    // references that memory: the heap is placed so that it excludes the blob (see
    // `heap::init`), and `locate` (private) runs only inside `dtb()`'s `Once`, so this is the
    // only reference to it. It is written only here, by
    // `remove_nops`, before being shared read-only.
    let blob = unsafe { core::slice::from_raw_parts_mut(address as *mut u8, size) };
    // QEMU's `-dtb` path leaves FDT_NOP tokens between nodes, which `fdt` 0.1.5 misparses and
    // the driver's validator refuses: take them out first (the tree is otherwise unchanged).
    virtio_iommu_driver::topology::remove_nops(blob).map_err(|_| DtbError::Unparsable(address))?;
    let blob: &'static [u8] = blob;
    virtio_iommu_driver::topology::validated_fdt(blob)
        .map_err(|_| DtbError::Unparsable(address))?;
    Ok(blob)
}

/// The devicetree blob (validated once, then cached). If there is none, prints an error and
/// exits with status 4.
pub fn dtb() -> &'static [u8] {
    DTB.call_once(|| match locate(address()) {
        Ok(blob) => blob,
        Err(e) => {
            crate::console::emergency_print(format_args!("dtb: {e}\n"));
            crate::exit::exit(4)
        }
    })
}

/// The parsed devicetree (cannot fail: [`dtb`] already validated it).
pub fn fdt() -> fdt::Fdt<'static> {
    fdt::Fdt::new(dtb()).unwrap_or_else(|_| crate::exit::exit(4))
}
