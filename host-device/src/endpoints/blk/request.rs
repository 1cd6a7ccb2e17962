//! Parsing, executing and answering one virtio-blk request chain (virtio v1.3 §5.2.6), whatever
//! its descriptor layout, with every buffer access translated by the memory it is given (an
//! [`vm_memory::IommuMemory`] in [`super::BlkCore`]).
//!
//! The device-readable descriptors form one byte stream, the device-writable ones another;
//! the header (16 bytes), the data and the status byte may be split over descriptors at any
//! byte boundary. The header is the first 16 readable bytes; the status is the last writable
//! byte; IN and GET_ID data is the writable bytes before it, OUT data the readable bytes after
//! the header. Bytes in the other direction (readable bytes after an IN header, writable bytes
//! before an OUT status) are ignored, as QEMU does.
//!
//! Rules, in order:
//! 1. a chain longer than the queue size (§2.7.5.3.1), or cut short by virtio-queue (a loop, a
//!    `next` index outside the table, an unreadable descriptor) ⇒ returned with used length 0,
//!    nothing written: its end, where the status would be, is unknown;
//! 2. no device-writable byte ⇒ used length 0, nothing done ([`Unanswered::NoStatus`]);
//! 3. the status byte does not translate for writing (a fault is reported by the IOMMU) ⇒ used
//!    length 0, nothing done ([`Unanswered::StatusUnreachable`]): no disk write happens whose
//!    outcome the driver could not learn;
//! 4. a device-readable descriptor after a device-writable one (§2.7.4.2), or a readable
//!    part shorter than the header, or a header that does not translate ⇒ `S_IOERR`;
//! 5. by type: IN, OUT, FLUSH (with `VIRTIO_BLK_F_FLUSH` negotiated), GET_ID are executed;
//!    any other type ⇒ `S_UNSUPP`;
//! 6. IN/OUT: data length not a multiple of 512, above the request limit, or sectors beyond the
//!    capacity ⇒ `S_IOERR`; OUT on a read-only device ⇒ `S_IOERR`, nothing written (§5.2.6.1);
//!    any data byte that does not translate with the needed permission ⇒ `S_IOERR`, and no
//!    data moves: every data range is translated (faults reported) before the first byte is
//!    copied (a mapping removed by another thread in between can still cut a transfer short:
//!    `S_IOERR`, with the data undefined as for any failed request);
//! 7. a disk error ⇒ `S_IOERR`;
//! 8. without `VIRTIO_BLK_F_FLUSH` negotiated the cache is writethrough (§5.2.5): an OUT is
//!    synced (`fdatasync`) before its status is written.
//!
//! Used length: the number of bytes written from the start of the writable part (§2.7.8.2
//! "the device MUST write at least len bytes ... beginning at the first device-writable
//! buffer"): the whole writable part for a successful IN (data and status), `min(20, data)`
//! for GET_ID (`+ 1` when the status directly follows), 1 for a status-only writable part,
//! and 0 when the status is preceded by bytes the device did not write (QEMU reports the whole
//! writable length in every case; Linux ignores the value).

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use zerocopy::FromBytes;

use super::wire::{req, status, ReqHeader, HEADER_SIZE, ID_BYTES, SECTOR_SIZE};

/// Bytes copied per disk access (the bounce buffer's size).
pub const CHUNK: usize = 64 << 10;

/// Why a chain was returned with used length 0 and no status.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum Unanswered {
    /// More descriptors than the queue size.
    TooLong,
    /// virtio-queue stopped following the chain on a descriptor with the NEXT flag (a loop, a
    /// `next` index outside the table, a descriptor or indirect table that does not
    /// translate).
    Truncated,
    /// No device-writable byte to hold the status.
    NoStatus,
    /// The status byte does not translate for writing (the IOMMU reported the fault).
    StatusUnreachable,
    /// Writing the status failed after it had translated (the mapping changed meanwhile).
    StatusLost,
}

/// What happened to one chain.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum Outcome {
    /// A status byte was written.
    Completed {
        /// Request type (any value the driver wrote; `None` if the header was unreadable).
        request: Option<u32>,
        /// Status written ([`status`]).
        status: u8,
        /// Whether a data range failed to translate (the IOMMU reported a fault, or the
        /// translated range is not RAM).
        dma_error: bool,
    },
    /// Nothing written.
    Unanswered(Unanswered),
}

/// Result of [`handle_request`].
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct Handled {
    /// Used length in bytes for the used ring (see the module documentation).
    pub used_len: u32,
    /// What happened.
    pub outcome: Outcome,
    /// Bytes read from the disk into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the disk.
    pub bytes_written: u64,
    /// Whether the disk was synced (`fdatasync`): a FLUSH, or an OUT in writethrough mode.
    pub flushed: bool,
}

impl Handled {
    fn unanswered(why: Unanswered) -> Self {
        Self {
            used_len: 0,
            outcome: Outcome::Unanswered(why),
            bytes_read: 0,
            bytes_written: 0,
            flushed: false,
        }
    }
}

/// The disk and the device's settings a request runs against.
#[derive(Debug)]
pub struct Disk<'a> {
    /// The backing file.
    pub file: &'a File,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether OUT is refused (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Whether `VIRTIO_BLK_F_FLUSH` was negotiated: the cache is writeback and FLUSH is
    /// executed. Else FLUSH is `S_UNSUPP` and the cache is writethrough (§5.2.5: writeback
    /// after reset if and only if FLUSH is negotiated): every OUT is made durable
    /// (`fdatasync`) before its status is written.
    pub flush: bool,
    /// The GET_ID string, NUL-padded.
    pub serial: &'a [u8; ID_BYTES],
    /// Largest data length in bytes of one IN or OUT.
    pub max_request_bytes: u64,
    /// Bounce buffer (grown to [`CHUNK`] bytes on first use).
    pub bounce: &'a mut Vec<u8>,
}

/// One descriptor's buffer: IOVA and length in bytes.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u32,
}

/// The descriptors of one direction, as a byte stream.
#[derive(Debug, Default)]
struct Stream {
    segs: Vec<Seg>,
    total: u64,
}

impl Stream {
    fn push(&mut self, addr: u64, len: u32) {
        if len > 0 {
            self.segs.push(Seg { addr, len });
            self.total += u64::from(len);
        }
    }

    /// The IOVA pieces `(addr, len)` of stream bytes `[offset, offset + len)`; `None` if a
    /// piece's IOVA range passes 2^64 or the range passes the stream's end.
    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<(u64, usize)>> {
        let end = offset.checked_add(len)?;
        if end > self.total {
            return None;
        }
        let mut out = Vec::new();
        let mut pos = 0u64;
        for s in &self.segs {
            let s_end = pos + u64::from(s.len);
            let lo = offset.max(pos);
            let hi = end.min(s_end);
            if lo < hi {
                let addr = s.addr.checked_add(lo - pos)?;
                addr.checked_add(hi - lo - 1)?;
                out.push((addr, usize::try_from(hi - lo).ok()?));
            }
            pos = s_end;
            if pos >= end {
                break;
            }
        }
        Some(out)
    }
}

/// Splits a chain into its readable and writable streams; the third value is `false` when a
/// readable descriptor follows a writable one.
fn collect<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    max_descriptors: usize,
) -> Result<(Stream, Stream, bool), Unanswered> {
    let mut readable = Stream::default();
    let mut writable = Stream::default();
    let mut ordered = true;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > max_descriptors {
            return Err(Unanswered::TooLong);
        }
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            writable.push(desc.addr().0, desc.len());
        } else {
            if !writable.segs.is_empty() {
                ordered = false;
            }
            readable.push(desc.addr().0, desc.len());
        }
    }
    if last_has_next {
        return Err(Unanswered::Truncated);
    }
    Ok((readable, writable, ordered))
}

/// Translates every piece for `perm` (faults are reported by the memory's IOMMU); `false` if
/// any fails or is not RAM.
fn reachable<M: GuestMemory>(mem: &M, pieces: &[(u64, usize)], perm: Permissions) -> bool {
    pieces
        .iter()
        .all(|&(a, l)| mem.check_range(GuestAddress(a), l, perm))
}

/// Reads stream bytes `[offset, offset + buf.len())`.
fn gather<M: GuestMemory>(mem: &M, s: &Stream, offset: u64, buf: &mut [u8]) -> bool {
    let Some(pieces) = s.pieces(offset, buf.len() as u64) else {
        return false;
    };
    let mut at = 0usize;
    for (a, l) in pieces {
        let Some(dst) = buf.get_mut(at..at + l) else {
            return false;
        };
        if mem.read_slice(dst, GuestAddress(a)).is_err() {
            return false;
        }
        at += l;
    }
    true
}

/// Writes `data` at stream offset 0.
fn scatter<M: GuestMemory>(mem: &M, pieces: &[(u64, usize)], data: &[u8]) -> bool {
    let mut at = 0usize;
    for &(a, l) in pieces {
        let Some(src) = data.get(at..at + l) else {
            return false;
        };
        if mem.write_slice(src, GuestAddress(a)).is_err() {
            return false;
        }
        at += l;
    }
    true
}

/// Result of an IN or OUT before the status is written.
struct Transfer {
    status: u8,
    dma_error: bool,
    bytes: u64,
}

impl Transfer {
    fn fail(dma_error: bool) -> Self {
        Self {
            status: status::IOERR,
            dma_error,
            bytes: 0,
        }
    }
}

/// Checks an IN/OUT's data length and sector range; the byte offset on the disk.
fn disk_range(disk: &Disk<'_>, sector: u64, len: u64) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE) || len > disk.max_request_bytes {
        return None;
    }
    let end = sector.checked_add(len / SECTOR_SIZE)?;
    (end <= disk.capacity).then_some(sector * SECTOR_SIZE)
}

/// IN: disk bytes at `offset` into the writable pieces.
fn read_in<M: GuestMemory>(
    mem: &M,
    disk: &mut Disk<'_>,
    pieces: &[(u64, usize)],
    offset: u64,
) -> Transfer {
    if !reachable(mem, pieces, Permissions::Write) {
        return Transfer::fail(true);
    }
    disk.bounce.resize(CHUNK, 0);
    let mut pos = offset;
    for &(addr, len) in pieces {
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            let Some(buf) = disk.bounce.get_mut(..n) else {
                return Transfer::fail(false);
            };
            if disk.file.read_exact_at(buf, pos).is_err() {
                return Transfer::fail(false);
            }
            // `addr + len - 1` does not pass 2^64 (checked by `Stream::pieces`).
            if mem
                .write_slice(buf, GuestAddress(addr + done as u64))
                .is_err()
            {
                return Transfer::fail(true);
            }
            done += n;
            pos += n as u64;
        }
    }
    Transfer {
        status: status::OK,
        dma_error: false,
        bytes: pos - offset,
    }
}

/// OUT: the readable pieces to disk bytes at `offset`.
fn write_out<M: GuestMemory>(
    mem: &M,
    disk: &mut Disk<'_>,
    pieces: &[(u64, usize)],
    offset: u64,
) -> Transfer {
    if !reachable(mem, pieces, Permissions::Read) {
        return Transfer::fail(true);
    }
    disk.bounce.resize(CHUNK, 0);
    let mut pos = offset;
    for &(addr, len) in pieces {
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            let Some(buf) = disk.bounce.get_mut(..n) else {
                return Transfer::fail(false);
            };
            if mem
                .read_slice(buf, GuestAddress(addr + done as u64))
                .is_err()
            {
                return Transfer::fail(true);
            }
            if disk.file.write_all_at(buf, pos).is_err() {
                return Transfer::fail(false);
            }
            done += n;
            pos += n as u64;
        }
    }
    Transfer {
        status: status::OK,
        dma_error: false,
        bytes: pos - offset,
    }
}

/// Parses, executes and answers the request in `chain` (descriptor addresses are addresses
/// of `mem`); a chain of more than `max_descriptors` descriptors is refused. Never panics,
/// whatever the chain holds. See the module documentation for the rules.
pub fn handle_request<'a, M: GuestMemory>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
    max_descriptors: usize,
    disk: &mut Disk<'_>,
) -> Handled {
    let (readable, writable, ordered) = match collect(chain, max_descriptors) {
        Ok(c) => c,
        Err(why) => return Handled::unanswered(why),
    };
    let Some(w_data) = writable.total.checked_sub(1) else {
        return Handled::unanswered(Unanswered::NoStatus);
    };
    let Some(status_piece) = writable.pieces(w_data, 1) else {
        return Handled::unanswered(Unanswered::StatusUnreachable);
    };
    if !reachable(mem, &status_piece, Permissions::Write) {
        return Handled::unanswered(Unanswered::StatusUnreachable);
    }
    // Used length when only the status is written.
    let status_only = u32::from(w_data == 0);
    let mut done = Handled {
        used_len: status_only,
        outcome: Outcome::Completed {
            request: None,
            status: status::IOERR,
            dma_error: false,
        },
        bytes_read: 0,
        bytes_written: 0,
        flushed: false,
    };
    let mut header = [0u8; HEADER_SIZE];
    let header_ok =
        ordered && readable.total >= HEADER_SIZE as u64 && gather(mem, &readable, 0, &mut header);
    if header_ok {
        // `HEADER_SIZE` bytes always parse.
        let h = ReqHeader::read_from_bytes(&header).unwrap_or_default();
        let ty = h.type_.get();
        let sector = h.sector.get();
        let (status, dma_error) = match ty {
            req::IN => {
                let t = match (disk_range(disk, sector, w_data), writable.pieces(0, w_data)) {
                    (Some(off), Some(p)) => read_in(mem, disk, &p, off),
                    _ => Transfer::fail(false),
                };
                if t.status == status::OK {
                    done.bytes_read = t.bytes;
                    done.used_len = u32::try_from(writable.total).unwrap_or(0);
                }
                (t.status, t.dma_error)
            }
            req::OUT => {
                let len = readable.total - HEADER_SIZE as u64;
                let t = if disk.read_only {
                    Transfer::fail(false)
                } else {
                    match (
                        disk_range(disk, sector, len),
                        readable.pieces(HEADER_SIZE as u64, len),
                    ) {
                        (Some(off), Some(p)) => write_out(mem, disk, &p, off),
                        _ => Transfer::fail(false),
                    }
                };
                let t = if t.status == status::OK && !disk.flush {
                    done.flushed = true;
                    match disk.file.sync_data() {
                        Ok(()) => t,
                        Err(_) => Transfer::fail(false),
                    }
                } else {
                    t
                };
                done.bytes_written = t.bytes;
                (t.status, t.dma_error)
            }
            req::FLUSH if disk.flush => {
                done.flushed = true;
                match disk.file.sync_data() {
                    Ok(()) => (status::OK, false),
                    Err(_) => (status::IOERR, false),
                }
            }
            req::GET_ID => {
                let n = w_data.min(ID_BYTES as u64);
                match writable.pieces(0, n) {
                    Some(p) if reachable(mem, &p, Permissions::Write) => {
                        let id = disk.serial.get(..n as usize).unwrap_or(&[]);
                        if scatter(mem, &p, id) {
                            // The status directly follows the ID when the data is at most 20 bytes.
                            done.used_len =
                                u32::try_from(if n == w_data { n + 1 } else { n }).unwrap_or(0);
                            (status::OK, false)
                        } else {
                            (status::IOERR, true)
                        }
                    }
                    _ => (status::IOERR, true),
                }
            }
            _ => (status::UNSUPP, false),
        };
        done.outcome = Outcome::Completed {
            request: Some(ty),
            status,
            dma_error,
        };
    } else if ordered && readable.total >= HEADER_SIZE as u64 {
        // The header did not translate.
        done.outcome = Outcome::Completed {
            request: None,
            status: status::IOERR,
            dma_error: true,
        };
    }
    let status = match done.outcome {
        Outcome::Completed { status, .. } => status,
        Outcome::Unanswered(_) => status::IOERR,
    };
    if !scatter(mem, &status_piece, &[status]) {
        return Handled {
            used_len: 0,
            outcome: Outcome::Unanswered(Unanswered::StatusLost),
            ..done
        };
    }
    done
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::TooLong => "the chain has more descriptors than the queue size",
            Self::Truncated => "the chain ends on a descriptor with the NEXT flag",
            Self::NoStatus => "the chain has no device-writable byte for the status",
            Self::StatusUnreachable => "the status byte does not translate for writing",
            Self::StatusLost => "writing the status byte failed",
        })
    }
}
