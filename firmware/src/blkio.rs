//! Block I/O helpers shared by the cases and the DMA-mode checks: bounded-wait reads and
//! writes with virtio-drivers' unmodified `VirtIOBlk`, the whole-disk SHA-256, and a
//! write/verify/restore round trip on a scratch region.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use sha2::{Digest, Sha256};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

use crate::timer::Deadline;

/// Bytes per request when reading the whole disk.
pub const CHUNK: usize = 64 * 1024;
/// Size in bytes of the scratch region at the end of the disk.
pub const SCRATCH: usize = 64 * 1024;

/// One read or write of `len` bytes at `sector`, waiting at most 10 s. The buffer is owned here
/// so that on a timeout it can be leaked instead of freed while the device may still use it
/// (QEMU 7.2 never completes a request whose buffers fault).
pub fn io<H: Hal, T: Transport>(
    blk: &mut VirtIOBlk<H, T>,
    sector: u64,
    mut buf: Box<[u8]>,
    len: usize,
    write: bool,
) -> Result<Box<[u8]>, String> {
    let mut req = Box::new(BlkReq::default());
    let mut resp = Box::new(BlkResp::default());
    let data = &mut buf[..len];
    // SAFETY: `req`, `data` and `resp` are not touched until the request completes; on timeout
    // they are leaked, so the device can never write into freed memory.
    let token = unsafe {
        if write {
            blk.write_blocks_nb(sector as usize, &mut req, data, &mut resp)
        } else {
            blk.read_blocks_nb(sector as usize, &mut req, data, &mut resp)
        }
    }
    .map_err(|e| format!("submit at sector {sector}: {e}"))?;
    let deadline = Deadline::after_ms(10_000);
    while blk.peek_used() != Some(token) {
        if deadline.expired() {
            Box::leak(req);
            Box::leak(resp);
            Box::leak(buf);
            return Err(format!("request at sector {sector} did not complete"));
        }
        core::hint::spin_loop();
    }
    // SAFETY: the same buffers as submitted with `token`.
    let done = unsafe {
        if write {
            blk.complete_write_blocks(token, &req, data, &mut resp)
        } else {
            blk.complete_read_blocks(token, &req, data, &mut resp)
        }
    };
    let what = if write { "write" } else { "read" };
    done.map_err(|e| format!("{what} at sector {sector}: {e}"))?;
    Ok(buf)
}

/// Reads the whole disk in [`CHUNK`]-byte requests; returns its SHA-256 as lowercase hex.
pub fn disk_sha256<H: Hal, T: Transport>(blk: &mut VirtIOBlk<H, T>) -> Result<String, String> {
    let sectors = blk.capacity();
    let mut hasher = Sha256::new();
    let mut sector = 0u64;
    let mut buf = vec![0u8; CHUNK].into_boxed_slice();
    while sector < sectors {
        // In u64 first: a device reporting an enormous capacity must not wrap `n` to 0.
        let n = (sectors - sector).min((CHUNK / SECTOR_SIZE) as u64) as usize * SECTOR_SIZE;
        buf = io(blk, sector, buf, n, false)?;
        hasher.update(&buf[..n]);
        sector += (n / SECTOR_SIZE) as u64;
    }
    let mut hex = String::new();
    for b in hasher.finalize() {
        hex.push_str(&format!("{b:02x}"));
    }
    Ok(hex)
}

/// Writes a pattern over the last [`SCRATCH`] bytes of the disk, reads it back, restores the
/// original contents and reads them back, so the image is unchanged afterwards. Returns the
/// scratch length and first sector.
pub fn scratch_round_trip<H: Hal, T: Transport>(
    blk: &mut VirtIOBlk<H, T>,
) -> Result<(usize, u64), String> {
    let bytes = (blk.capacity() as usize).saturating_mul(SECTOR_SIZE);
    let len = SCRATCH.min(bytes);
    let sector = ((bytes - len) / SECTOR_SIZE) as u64;
    let original = io(blk, sector, vec![0u8; len].into_boxed_slice(), len, false)?;
    let data: Box<[u8]> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ 0x5a)
        .collect();
    let expected = data.clone();
    io(blk, sector, data, len, true)?;
    let back = io(blk, sector, vec![0u8; len].into_boxed_slice(), len, false)?;
    io(blk, sector, original.clone(), len, true)?;
    let again = io(blk, sector, vec![0u8; len].into_boxed_slice(), len, false)?;
    if back != expected {
        return Err("pattern read back differs".into());
    }
    if again != original {
        return Err("restored contents differ".into());
    }
    Ok((len, sector))
}
