//! QEMU's firmware configuration device (fw_cfg) on `-M virt`: reading named files such as
//! `etc/acpi/tables` through its MMIO data register (QEMU `docs/specs/fw_cfg.rst`; Linux
//! `Documentation/devicetree/bindings/firmware/qemu,fw-cfg-mmio.yaml`).
//!
//! Registers, from the `qemu,fw-cfg-mmio` node's `reg`: data at +0 (read with any width up to
//! 8 bytes; wider reads return the next bytes in order, so byte reads are used here), selector
//! at +8 (16 bits, **big-endian** on MMIO; writing it rewinds the data offset to 0). The file
//! directory (key `FW_CFG_FILE_DIR` = 0x19) is a big-endian `u32` count followed by that many
//! 64-byte entries: `u32` size (big-endian), `u16` select key (big-endian), `u16` reserved,
//! 56-byte NUL-padded name. The DMA interface is not used.
//!
//! Everything read from the device is bounded: [`MAX_FILES`] directory entries,
//! [`MAX_FILE_SIZE`] bytes per file.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Selector key of the signature (`"QEMU"`).
const FW_CFG_SIGNATURE: u16 = 0x0000;
/// Selector key of the file directory.
const FW_CFG_FILE_DIR: u16 = 0x0019;
/// Offset of the selector register from the base (bytes).
const SELECTOR: u64 = 8;
/// Size of the register block needed: data (8) and selector (2), in bytes.
const MIN_REGION: u64 = 10;
/// Most directory entries read (QEMU has a few dozen).
pub const MAX_FILES: u32 = 4096;
/// Largest file read, in bytes (QEMU pads `etc/acpi/tables` to 128 KiB on `virt`, 2 MiB
/// at most on other machines).
pub const MAX_FILE_SIZE: u32 = 4 << 20;
/// Length of a directory entry's name field in bytes.
const NAME_LEN: usize = 56;

/// The fw_cfg device of the devicetree.
pub struct FwCfg {
    base: u64,
}

impl FwCfg {
    /// Finds the first `qemu,fw-cfg-mmio` node of the devicetree and checks that its register
    /// block (at least 10 bytes) is in the device part of the identity map and that the
    /// signature key reads `"QEMU"`. `Err` says why not.
    pub fn from_dtb(dtb: &[u8]) -> Result<FwCfg, String> {
        let fdt = virtio_iommu_driver::topology::validated_fdt(dtb)
            .map_err(|e| format!("devicetree: {e:?}"))?;
        let node = fdt
            .all_nodes()
            .find(|n| {
                n.compatible()
                    .is_some_and(|c| c.all().any(|s| s == "qemu,fw-cfg-mmio"))
            })
            .ok_or_else(|| String::from("no qemu,fw-cfg-mmio node in the devicetree"))?;
        let region = node
            .reg()
            .and_then(|mut reg| reg.next())
            .ok_or_else(|| String::from("fw-cfg node without reg"))?;
        let base = region.starting_address as u64;
        let size = region.size.unwrap_or(0) as u64;
        if size < MIN_REGION
            || base & 7 != 0
            || crate::mmu::memory_type(base, size) != Some(crate::mmu::MemoryType::Device)
        {
            return Err(format!(
                "fw-cfg registers {base:#x} (+{size:#x}) are not a mapped, aligned device region"
            ));
        }
        let fw_cfg = FwCfg { base };
        let mut signature = [0u8; 4];
        fw_cfg.select(FW_CFG_SIGNATURE);
        fw_cfg.read(&mut signature);
        if &signature != b"QEMU" {
            return Err(format!(
                "fw-cfg signature is {signature:02x?}, not \"QEMU\""
            ));
        }
        Ok(fw_cfg)
    }

    /// Selects item `key` (data offset back to 0).
    fn select(&self, key: u16) {
        let selector = (self.base + SELECTOR) as *mut u16;
        // SAFETY: `base..base + 10` is the fw_cfg register block from the devicetree, mapped as
        // device memory (checked in `from_dtb`); the selector is the aligned 16-bit register
        // at +8, and writing it only changes which item the data register reads.
        unsafe { selector.write_volatile(key.to_be()) };
    }

    /// Reads the next `buf.len()` bytes of the selected item (zeros past its end).
    fn read(&self, buf: &mut [u8]) {
        let data = self.base as *const u8;
        for byte in buf {
            // SAFETY: as in `select`; the data register at +0 is readable with byte width and
            // a read only advances the item's data offset.
            *byte = unsafe { data.read_volatile() };
        }
    }

    /// Finds file `name` in the directory: `(select key, size in bytes)`, `Ok(None)` if absent.
    pub fn find_file(&self, name: &str) -> Result<Option<(u16, u32)>, String> {
        self.select(FW_CFG_FILE_DIR);
        let mut count = [0u8; 4];
        self.read(&mut count);
        let count = u32::from_be_bytes(count);
        if count > MAX_FILES {
            return Err(format!("fw-cfg directory claims {count} files"));
        }
        let mut entry = [0u8; 64];
        for _ in 0..count {
            self.read(&mut entry);
            let name_field = &entry[8..8 + NAME_LEN];
            let len = name_field.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
            if &name_field[..len] == name.as_bytes() {
                let size = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
                let key = u16::from_be_bytes([entry[4], entry[5]]);
                return Ok(Some((key, size)));
            }
        }
        Ok(None)
    }

    /// The contents of file `name`, `Ok(None)` if the directory has no such file.
    ///
    /// `Err` when it is larger than [`MAX_FILE_SIZE`] or the directory is implausible.
    pub fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let Some((key, size)) = self.find_file(name)? else {
            return Ok(None);
        };
        if size > MAX_FILE_SIZE {
            return Err(format!("fw-cfg file {name} claims {size} bytes"));
        }
        let mut contents = vec![0u8; size as usize];
        self.select(key);
        self.read(&mut contents);
        Ok(Some(contents))
    }
}
