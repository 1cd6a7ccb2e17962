//! Guest RAM from the client's DMA mappings (vfio-user DMA_MAP / DMA_UNMAP): each mapping with
//! a file descriptor becomes a shared `mmap` of that file ([`MmapRegion::from_file`]); the
//! whole set is rebuilt into a [`GuestMemoryMmap`] after every change. The file must carry (or
//! accept) `F_SEAL_SHRINK`, so that the client cannot shrink it under the mapping.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use vfio_user::{DmaMapFlags, DmaUnmapFlags};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Most mappings a client may hold at once (QEMU sends one per RAM section: a handful).
pub const MAX_MAPPINGS: usize = 256;
/// Largest single mapping, in bytes (1 TiB).
pub const MAX_MAPPING_SIZE: u64 = 1 << 40;

/// Why a DMA_MAP or DMA_UNMAP was refused (the reply carries `EINVAL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaError {
    /// Size 0, larger than [`MAX_MAPPING_SIZE`], or `address + size` / `offset + size` past
    /// 2^64.
    BadRange,
    /// The range overlaps a mapping already present.
    Overlap,
    /// [`MAX_MAPPINGS`] mappings are already present.
    TooMany,
    /// `offset + size` is past the end of the file (accessing it would raise SIGBUS).
    BeyondFile,
    /// The file is not sealed against shrinking (`F_SEAL_SHRINK`) and cannot be sealed (not a
    /// memfd, or created without `MFD_ALLOW_SEALING`, or already `F_SEAL_SEAL`ed): the client
    /// could truncate it under the mapping and the next DMA would kill the server (SIGBUS).
    Unsealed,
    /// `mmap` failed.
    Mmap(String),
    /// DMA_UNMAP does not name exactly one mapping (vfio-user unmaps whole mappings only).
    NoSuchMapping,
}

impl std::fmt::Display for DmaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DmaError::BadRange => write!(f, "empty, oversized or wrapping DMA range"),
            DmaError::Overlap => write!(f, "DMA range overlaps an existing mapping"),
            DmaError::TooMany => write!(f, "more than {MAX_MAPPINGS} DMA mappings"),
            DmaError::BeyondFile => write!(f, "DMA mapping extends past the end of its file"),
            DmaError::Unsealed => write!(
                f,
                "DMA file cannot be sealed against shrinking (use memory-backend-memfd)"
            ),
            DmaError::Mmap(e) => write!(f, "mmap of the DMA file failed: {e}"),
            DmaError::NoSuchMapping => write!(f, "DMA_UNMAP range is not one mapping"),
        }
    }
}

impl std::error::Error for DmaError {}

impl From<DmaError> for io::Error {
    fn from(e: DmaError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

struct Mapping {
    size: u64,
    /// `None`: a mapping without file descriptor (kept to track overlaps; not reachable).
    region: Option<Arc<GuestRegionMmap>>,
}

/// Makes sure `file` cannot shrink under a mapping: `true` if it carries `F_SEAL_SHRINK`
/// (QEMU's `memory-backend-memfd` seals its memfds by default, `seal=on`) or the seal could be
/// added now (a memfd created with `MFD_ALLOW_SEALING`: QEMU never shrinks guest RAM, so the
/// seal costs the client nothing). Files that cannot be sealed (regular files, tmpfs/hugetlbfs
/// files of `memory-backend-file`) give `false`.
fn seal_against_shrinking(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(F_GET_SEALS) on a descriptor this process owns; integer arguments only.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return true;
    }
    // SAFETY: as above, fcntl(F_ADD_SEALS) with an integer argument.
    seals >= 0 && unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0
}

/// The client's DMA mappings, by guest physical start address.
#[derive(Default)]
pub struct DmaMappings {
    maps: BTreeMap<u64, Mapping>,
}

impl std::fmt::Debug for DmaMappings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.maps
                    .iter()
                    .map(|(a, m)| (a, (m.size, m.region.is_some()))),
            )
            .finish()
    }
}

impl DmaMappings {
    /// No mapping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings (with or without file descriptor).
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether there is no mapping.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Adds the mapping of guest physical `[address, address + size)` to `file` at byte
    /// `offset`. Without `file` the range is recorded (for overlap checks) but stays out of
    /// reach, with a warning: the client's RAM is not shareable (QEMU without `share=on`).
    /// A mapping whose `flags` are not both READ and WRITE is recorded the same way, out of
    /// reach: the device could otherwise write where the client allowed only reads.
    ///
    /// A file that is not sealed against shrinking gets `F_SEAL_SHRINK` added (see
    /// [`DmaError::Unsealed`]), so a client cannot turn a later DMA into a SIGBUS.
    ///
    /// # Errors
    /// [`DmaError`]; nothing changes then (except a seal added to the file).
    pub fn map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        file: Option<File>,
    ) -> Result<(), DmaError> {
        if size == 0 || size > MAX_MAPPING_SIZE {
            return Err(DmaError::BadRange);
        }
        let last = address.checked_add(size - 1).ok_or(DmaError::BadRange)?;
        let file_end = offset.checked_add(size).ok_or(DmaError::BadRange)?;
        if self.maps.len() >= MAX_MAPPINGS {
            return Err(DmaError::TooMany);
        }
        if self.overlaps(address, last) {
            return Err(DmaError::Overlap);
        }
        let region = match file {
            // The device's DMA both reads and writes guest memory, and vm-memory cannot map a
            // region for reads only without turning a device write into SIGSEGV; a mapping the
            // client does not grant both is therefore kept out of reach too (QEMU maps RAM
            // read-write; what it maps read-only, ROM, it maps without a descriptor).
            Some(_) if !flags.contains(DmaMapFlags::READ_WRITE) => {
                log::warn!(
                    "DMA_MAP {address:#x}+{size:#x} with flags {:#x} (not READ|WRITE) kept out \
                     of the device's reach",
                    flags.bits()
                );
                None
            }
            None => {
                log::warn!(
                    "DMA_MAP {address:#x}+{size:#x} without file descriptor ignored: guest RAM \
                     must be shared (memory-backend-memfd,share=on)"
                );
                None
            }
            Some(file) => {
                // Sealed before the size check, so the size checked is the size kept.
                if !seal_against_shrinking(&file) {
                    return Err(DmaError::Unsealed);
                }
                let len = file
                    .metadata()
                    .map_err(|e| DmaError::Mmap(e.to_string()))?
                    .len();
                if file_end > len {
                    return Err(DmaError::BeyondFile);
                }
                let len = usize::try_from(size).map_err(|_| DmaError::BadRange)?;
                let mmap = MmapRegion::from_file(FileOffset::new(file, offset), len)
                    .map_err(|e| DmaError::Mmap(e.to_string()))?;
                let region =
                    GuestRegionMmap::new(mmap, GuestAddress(address)).ok_or(DmaError::BadRange)?;
                Some(Arc::new(region))
            }
        };
        log::debug!(
            "DMA_MAP {address:#x}+{size:#x} offset {offset:#x} flags {:#x} fd {}",
            flags.bits(),
            region.is_some()
        );
        self.maps.insert(address, Mapping { size, region });
        Ok(())
    }

    fn overlaps(&self, first: u64, last: u64) -> bool {
        // The mapping starting at or below `last` with the highest start is the only candidate
        // besides those starting inside [first, last].
        self.maps
            .range(..=last)
            .next_back()
            .is_some_and(|(&a, m)| a.saturating_add(m.size - 1) >= first)
    }

    /// Removes the mapping that starts at `address` and is `size` bytes long; with
    /// `UNMAP_ALL` in `flags`, removes every mapping.
    ///
    /// # Errors
    /// [`DmaError::NoSuchMapping`] when no mapping matches exactly.
    pub fn unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> Result<(), DmaError> {
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            self.maps.clear();
            return Ok(());
        }
        match self.maps.get(&address) {
            Some(m) if m.size == size => {
                self.maps.remove(&address);
                Ok(())
            }
            _ => Err(DmaError::NoSuchMapping),
        }
    }

    /// The guest memory made of the mappings that have a file descriptor (empty when none).
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        let regions: Vec<_> = self
            .maps
            .values()
            .filter_map(|m| m.region.clone())
            .collect();
        if regions.is_empty() {
            return GuestMemoryMmap::new();
        }
        // Sorted by address (BTreeMap order) and disjoint (checked in `map`).
        GuestMemoryMmap::from_arc_regions(regions).unwrap_or_else(|e| {
            log::error!("DMA mappings inconsistent ({e}); guest memory left empty");
            GuestMemoryMmap::new()
        })
    }
}
