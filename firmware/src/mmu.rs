//! The identity map installed before any Rust code runs.
//!
//! aarch64-rt's `initial-pagetable` feature turns the MMU and caches on from its assembly entry
//! point with the page table given to [`aarch64_rt::enable_mmu!`]; we only supply the table and
//! the TCR value. The map is static (no allocation, no run-time page-table code) and follows the
//! fixed memory map of QEMU's `-M virt` board:
//!
//! | VA = PA                          | type             | what lives there                                 |
//! |----------------------------------|------------------|--------------------------------------------------|
//! | `0x0000_0000..0x4000_0000`       | Device-nGnRE, XN | flash, GIC, PL011, RTC, virtio-mmio, PCI MMIO32 window, low ECAM (`highmem=off`) |
//! | `0x4000_0000..0x40_0000_0000`    | Normal WB        | RAM (`-M virt` RAM may go up to 255 GiB)          |
//! | `0x40_0000_0000..0x100_0000_0000`| Device-nGnRE, XN | high GIC redistributors, high ECAM (`0x40_1000_0000`), 64-bit PCI MMIO window (`0x80_0000_0000`, 512 GiB) |
//!
//! 1 GiB blocks at level 1; a level-0 root with two entries gives a 40-bit (1 TiB) VA space
//! (`T0SZ = 24`). [`memory_type`] lets code check that a DT-provided region is covered.

use aarch64_paging::descriptor::El1Attributes as Attr;
use aarch64_paging::mair::{Mair, MairAttribute, NormalMemory};
use aarch64_rt::InitialPagetable;

/// Width of the translated virtual (= physical) address space.
pub const VA_BITS: u32 = 40;
/// One level-1 block.
const GIB: usize = 1 << 30;
/// First byte mapped as Normal memory (start of RAM on `-M virt`).
pub const NORMAL_START: u64 = 0x4000_0000;
/// First byte after the Normal memory area (256 GiB, where `-M virt`'s high device area begins).
pub const NORMAL_END: u64 = 0x40_0000_0000;

/// MAIR index 0: Device-nGnRE; index 1: Normal, inner/outer write-back read/write-allocate.
const MAIR: Mair = Mair::EMPTY
    .with_attribute(0, MairAttribute::DEVICE_NGNRE)
    .with_attribute(
        1,
        MairAttribute::normal(
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
        ),
    );

/// Block descriptor attributes for device memory (never executable).
const DEVICE_BLOCK: usize = Attr::VALID
    .union(Attr::ATTRIBUTE_INDEX_0)
    .union(Attr::ACCESSED)
    .union(Attr::UXN)
    .union(Attr::PXN)
    .bits();
/// Block descriptor attributes for RAM (inner shareable, executable: the image lives there).
const NORMAL_BLOCK: usize = Attr::VALID
    .union(Attr::ATTRIBUTE_INDEX_1)
    .union(Attr::INNER_SHAREABLE)
    .union(Attr::ACCESSED)
    .bits();
/// Low bits of a table descriptor.
const TABLE_DESCRIPTOR: usize = Attr::VALID.union(Attr::TABLE_OR_PAGE).bits();

/// TCR_EL1: aarch64-rt's default (4 KiB granule, TTBR1 walks disabled, inner-shareable WB walks;
/// IPS is filled in from ID_AA64MMFR0_EL1 by aarch64-rt) with `T0SZ = 64 - VA_BITS`.
const TCR: u64 = (aarch64_rt::DEFAULT_TCR_EL1 & !0x3f) | (64 - VA_BITS as u64);

/// Level-1 table `index` (0 or 1) of the identity map: 512 one-GiB blocks.
const fn level1(index: usize) -> InitialPagetable {
    let mut table = [0; 512];
    let mut i = 0;
    while i < 512 {
        let address = (index * 512 + i) * GIB;
        let attributes = if address as u64 >= NORMAL_START && (address as u64) < NORMAL_END {
            NORMAL_BLOCK
        } else {
            DEVICE_BLOCK
        };
        table[i] = address | attributes;
        i += 1;
    }
    InitialPagetable(table)
}

/// VA 0..512 GiB.
static LEVEL1_LOW: InitialPagetable = level1(0);
/// VA 512 GiB..1 TiB (the 64-bit PCI MMIO window).
static LEVEL1_HIGH: InitialPagetable = level1(1);

/// The level-0 root table. Its entries are pointers (table descriptors) so that the linker fills
/// in the level-1 tables' addresses; only entries 0 and 1 are reachable with a 40-bit VA.
#[repr(C, align(4096))]
struct RootTable([*const u8; 512]);

// SAFETY: the table is immutable and only read (by the MMU); the raw pointers are never
// dereferenced by Rust code.
unsafe impl Sync for RootTable {}

static ROOT_TABLE: RootTable = {
    let mut table = [core::ptr::null::<u8>(); 512];
    table[0] = (&raw const LEVEL1_LOW)
        .cast::<u8>()
        .wrapping_add(TABLE_DESCRIPTOR);
    table[1] = (&raw const LEVEL1_HIGH)
        .cast::<u8>()
        .wrapping_add(TABLE_DESCRIPTOR);
    RootTable(table)
};

aarch64_rt::enable_mmu!(ROOT_TABLE, MAIR.0, aarch64_rt::DEFAULT_SCTLR, TCR);

/// Memory type of a mapped region.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum MemoryType {
    /// Normal write-back cacheable memory (RAM).
    Normal,
    /// Device-nGnRE memory (MMIO).
    Device,
}

/// How `[address, address + size)` is mapped, or `None` if it is not entirely mapped with one
/// memory type (or is empty).
pub fn memory_type(address: u64, size: u64) -> Option<MemoryType> {
    let end = address.checked_add(size)?;
    if size == 0 || end > 1 << VA_BITS {
        return None;
    }
    if address >= NORMAL_START && end <= NORMAL_END {
        Some(MemoryType::Normal)
    } else if end <= NORMAL_START || address >= NORMAL_END {
        Some(MemoryType::Device)
    } else {
        None
    }
}

/// Whether this map is in use: the firmware runs at EL1, the MMU is on (SCTLR_EL1.M) and the VA
/// size is what this module configured. Above EL1 (entered at EL3 with `secure=on`) the map is
/// set up but unused: that level's own regime, with its MMU off, translates.
pub fn is_enabled() -> bool {
    crate::arch::current_el() == 1
        && crate::arch::sctlr_el1() & 1 == 1
        && crate::arch::tcr_el1() & 0x3f == 64 - VA_BITS as u64
}
