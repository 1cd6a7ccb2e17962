//! The part of QEMU's ACPI linker/loader script (fw_cfg `etc/table-loader`) this firmware
//! needs: its ADD_CHECKSUM commands.
//!
//! QEMU builds `etc/acpi/tables` with every table's checksum byte left 0 and pointer fields
//! holding offsets into the pointee file; the guest firmware is meant to allocate the files,
//! add each file's address to the pointers (ADD_POINTER) and only then compute the checksums
//! (ADD_CHECKSUM). This firmware keeps the blob where it is and the pointers as offsets (as if
//! every file were loaded at address 0: ADD_POINTER adds 0) and runs the ADD_CHECKSUM
//! commands on that, so every table of the blob checksums correctly — with its pointers as
//! offsets. Tables without pointers (VIOT, MCFG) get exactly the checksum the loader would
//! give them at any address.
//!
//! Commands are 128-byte entries (QEMU `hw/acpi/bios-linker-loader.c`): `u32` command
//! (little-endian), then for ADD_CHECKSUM (3) a 56-byte NUL-padded file name and the `u32`
//! offset of the checksum byte, `u32` start and `u32` length of the summed range. Other
//! commands are skipped. Every offset is bounds-checked against the blob.

use alloc::format;
use alloc::string::String;

/// Size of one loader command in bytes.
const ENTRY_SIZE: usize = 128;
/// Command number of ADD_CHECKSUM.
const ADD_CHECKSUM: u32 = 3;
/// Length of a file name field in bytes.
const FILE_LEN: usize = 56;

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Runs the ADD_CHECKSUM commands of `loader` that name `file` on `blob` (the contents of
/// that file). Returns how many were applied.
///
/// # Errors
///
/// A script that is not a whole number of 128-byte commands, or an ADD_CHECKSUM whose byte or
/// range lies outside `blob`.
pub fn apply_checksums(loader: &[u8], file: &str, blob: &mut [u8]) -> Result<usize, String> {
    if !loader.len().is_multiple_of(ENTRY_SIZE) {
        return Err(format!(
            "etc/table-loader is {} bytes, not whole commands",
            loader.len()
        ));
    }
    let mut applied = 0;
    for entry in loader.chunks_exact(ENTRY_SIZE) {
        if le32(entry, 0) != ADD_CHECKSUM {
            continue;
        }
        let name = &entry[4..4 + FILE_LEN];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(FILE_LEN)];
        if name != file.as_bytes() {
            continue;
        }
        let at = le32(entry, 4 + FILE_LEN) as usize;
        let start = le32(entry, 8 + FILE_LEN) as usize;
        let length = le32(entry, 12 + FILE_LEN) as usize;
        let range = start
            .checked_add(length)
            .and_then(|end| blob.get(start..end))
            .ok_or_else(|| format!("ADD_CHECKSUM range {start:#x}+{length:#x} outside {file}"))?;
        let sum = range.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        let byte = blob
            .get_mut(at)
            .ok_or_else(|| format!("ADD_CHECKSUM byte {at:#x} outside {file}"))?;
        *byte = byte.wrapping_sub(sum);
        applied += 1;
    }
    Ok(applied)
}
