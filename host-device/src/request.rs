//! Parsing and answering one requestq descriptor chain (virtio v1.3 §5.13.6), whatever its
//! descriptor layout.
//!
//! The device-readable part (all readable descriptors, which must come before the writable
//! ones) is gathered with virtio-queue's [`Reader`], the device-writable part with its
//! [`Writer`], so the head, the body and the tail may be split over any number of descriptors
//! at any byte boundary.
//!
//! Framing rules, in order:
//! 1. a readable descriptor after a writable one, a descriptor outside guest memory, a chain
//!    longer than the queue size (virtio §2.7.5.3.1) or one that virtio-queue had to cut short
//!    (a loop, a `next` index outside the table, an unreadable indirect table) ⇒
//!    [`Malformed`], used length 0, nothing written;
//! 2. readable part shorter than the 4-byte head, or writable part shorter than the 4-byte tail
//!    ⇒ used length 0, nothing written (§5.13.6 "request too small to find the tail");
//! 3. unknown `type` ⇒ used length 0, nothing written (D7);
//! 4. PROBE while F_PROBE is not offered ⇒ used length 0, nothing written (D35);
//! 5. writable part longer than the request's (4 bytes, or `probe_size + 4` for PROBE) by more
//!    than [`MAX_WRITABLE_SLACK`] ⇒ used length 0, nothing written (bounds the work per
//!    request);
//! 6. MAP/UNMAP without MAP_UNMAP negotiated, PROBE without PROBE negotiated ⇒ `S_UNSUPP`;
//! 7. readable part shorter than the request's fixed size ⇒ `S_INVAL`; extra readable bytes
//!    are ignored;
//! 8. otherwise the request is executed by [`IommuState`].
//!
//! The response fills the whole writable part: the tail (`status`, `reserved` = 0, D8) in its
//! last 4 bytes, and before it PROBE's properties, or zeroes. The used length is the number of
//! bytes written, i.e. the writable length: 4 for a well-formed ATTACH/DETACH/MAP/UNMAP,
//! `probe_size + 4` for a well-formed PROBE.

use std::io::{Read, Write};

use virtio_iommu_driver::wire::{
    Features, ReqAttach, ReqDetach, ReqMap, ReqProbe, ReqUnmap, RequestType, Status,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemory;
use zerocopy::{FromBytes, IntoBytes};

use crate::state::IommuState;

/// Size in bytes of `struct virtio_iommu_req_head`.
pub const HEAD_SIZE: usize = 4;
/// Size in bytes of `struct virtio_iommu_req_tail`.
pub const TAIL_SIZE: usize = 4;
/// How many bytes a writable part may exceed the request's writable size (4, or
/// `probe_size + 4`) and still be answered. Beyond it the chain is returned unwritten, so one
/// request never makes the device fill more than `probe_size + 4 + 4096` bytes.
pub const MAX_WRITABLE_SLACK: usize = 4096;

/// Why a chain was returned with used length 0 before its type was known.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum Malformed {
    /// A device-readable descriptor follows a device-writable one (virtio §2.7.4.2).
    DescriptorOrder,
    /// The chain has more descriptors than the queue size.
    TooLong,
    /// The chain ended on a descriptor with the NEXT flag: virtio-queue stopped following it
    /// (a loop, a `next` index outside the table, an unreadable or nested indirect table).
    Truncated,
    /// A descriptor points outside guest memory (or the chain overflows).
    BadDescriptor,
    /// The readable part is shorter than the 4-byte head.
    ShortHead,
    /// The writable part is shorter than the 4-byte tail.
    ShortTail,
    /// The writable part exceeds the request's by more than [`MAX_WRITABLE_SLACK`] bytes.
    Oversized,
    /// Writing the response into guest memory failed.
    WriteFailed,
}

/// What happened to one chain.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum Outcome {
    /// A status was written in the tail.
    Completed {
        /// Request type.
        request: RequestType,
        /// Status written.
        status: Status,
    },
    /// Unknown `type` byte: nothing written (D7).
    UnknownType(u8),
    /// PROBE while F_PROBE is not offered: nothing written (D35).
    ProbeNotOffered,
    /// Framing error: nothing written.
    Malformed(Malformed),
}

/// Result of [`handle_request`]: the used length to put in the used ring and the outcome.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct Handled {
    /// Used length in bytes (0 when nothing was written).
    pub used_len: u32,
    /// What happened.
    pub outcome: Outcome,
}

fn malformed(m: Malformed) -> Handled {
    Handled {
        used_len: 0,
        outcome: Outcome::Malformed(m),
    }
}

/// Descriptor counts of a well-formed chain.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct ChainLayout {
    /// Number of device-readable descriptors (all before the writable ones).
    pub readable: usize,
    /// Number of device-writable descriptors.
    pub writable: usize,
}

/// Checks the shape of a chain without touching its buffers: at most `max_descriptors`
/// descriptors ([`Malformed::TooLong`]), readable ones first ([`Malformed::DescriptorOrder`]),
/// and not cut short by virtio-queue ([`Malformed::Truncated`]). Indirect tables are followed.
///
/// # Errors
///
/// The first of those problems found, as the [`Malformed`] variant named above.
pub fn validate_chain<M: GuestMemory>(
    chain: &DescriptorChain<&M>,
    max_descriptors: usize,
) -> Result<ChainLayout, Malformed> {
    let mut layout = ChainLayout::default();
    let mut last_has_next = false;
    for desc in chain.clone() {
        if layout.readable + layout.writable >= max_descriptors {
            return Err(Malformed::TooLong);
        }
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            layout.writable += 1;
        } else if layout.writable > 0 {
            return Err(Malformed::DescriptorOrder);
        } else {
            layout.readable += 1;
        }
    }
    if last_has_next {
        return Err(Malformed::Truncated);
    }
    Ok(layout)
}

/// Reads a request's fixed-size device-readable part, whose head was already consumed.
/// `None` when the readable part is too short.
fn read_body<T: FromBytes + IntoBytes>(
    head: &[u8; HEAD_SIZE],
    reader: &mut impl Read,
) -> Option<T> {
    let mut v = T::new_zeroed();
    let bytes = v.as_mut_bytes();
    bytes.get_mut(..HEAD_SIZE)?.copy_from_slice(head);
    reader.read_exact(bytes.get_mut(HEAD_SIZE..)?).ok()?;
    Some(v)
}

/// Parses, executes and answers the request in `chain` (whose buffers are in `mem`) against
/// `state`; a chain of more than `max_descriptors` descriptors is refused. Never panics, whatever the chain holds: every framing error is
/// an [`Outcome`]. See the module documentation for the rules.
pub fn handle_request<'a, M: GuestMemory>(
    state: &mut IommuState,
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
    max_descriptors: usize,
) -> Handled {
    if let Err(m) = validate_chain(&chain, max_descriptors) {
        return malformed(m);
    }
    let Ok(mut reader) = Reader::new(mem, chain.clone()) else {
        return malformed(Malformed::BadDescriptor);
    };
    let Ok(mut writer) = Writer::new(mem, chain) else {
        return malformed(Malformed::BadDescriptor);
    };
    let writable = writer.available_bytes();
    if reader.available_bytes() < HEAD_SIZE {
        return malformed(Malformed::ShortHead);
    }
    if writable < TAIL_SIZE {
        return malformed(Malformed::ShortTail);
    }
    let mut head = [0u8; HEAD_SIZE];
    if reader.read_exact(&mut head).is_err() {
        return malformed(Malformed::BadDescriptor);
    }
    let Some(request) = RequestType::from_u8(head[0]) else {
        return Handled {
            used_len: 0,
            outcome: Outcome::UnknownType(head[0]),
        };
    };
    let config = state.config().clone();
    if request == RequestType::Probe && !config.offered().contains(Features::PROBE) {
        return Handled {
            used_len: 0,
            outcome: Outcome::ProbeNotOffered,
        };
    }
    let expected = match request {
        RequestType::Probe => usize::try_from(config.probe_size())
            .unwrap_or(usize::MAX)
            .saturating_add(TAIL_SIZE),
        _ => TAIL_SIZE,
    };
    if writable > expected.saturating_add(MAX_WRITABLE_SLACK) {
        return malformed(Malformed::Oversized);
    }
    let Ok(used_len) = u32::try_from(writable) else {
        return malformed(Malformed::Oversized);
    };
    let negotiated = state.negotiated();
    // Bytes before the tail: PROBE's properties, or zeroes for the other requests.
    let mut prefix = vec![0u8; writable - TAIL_SIZE];
    let status =
        match request {
            RequestType::Attach => read_body::<ReqAttach>(&head, &mut reader)
                .map_or(Status::Inval, |r| state.attach(&r)),
            RequestType::Detach => read_body::<ReqDetach>(&head, &mut reader)
                .map_or(Status::Inval, |r| state.detach(&r)),
            RequestType::Map | RequestType::Unmap if !negotiated.contains(Features::MAP_UNMAP) => {
                Status::Unsupp
            }
            RequestType::Map => {
                read_body::<ReqMap>(&head, &mut reader).map_or(Status::Inval, |r| state.map(&r))
            }
            RequestType::Unmap => {
                read_body::<ReqUnmap>(&head, &mut reader).map_or(Status::Inval, |r| state.unmap(&r))
            }
            RequestType::Probe if !negotiated.contains(Features::PROBE) => Status::Unsupp,
            RequestType::Probe => match read_body::<ReqProbe>(&head, &mut reader) {
                Some(r) => state.probe(r.endpoint.get(), &mut prefix),
                None => Status::Inval,
            },
        };
    let tail = [status as u8, 0, 0, 0];
    let Ok(mut tail_writer) = writer.split_at(writable - TAIL_SIZE) else {
        return malformed(Malformed::WriteFailed);
    };
    if writer.write_all(&prefix).is_err() || tail_writer.write_all(&tail).is_err() {
        return malformed(Malformed::WriteFailed);
    }
    Handled {
        used_len,
        outcome: Outcome::Completed { request, status },
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DescriptorOrder => "a device-readable descriptor follows a device-writable one",
            Self::TooLong => "the chain has more descriptors than the queue size",
            Self::Truncated => "the chain ends on a descriptor with the NEXT flag",
            Self::BadDescriptor => "a descriptor points outside guest memory",
            Self::ShortHead => "the device-readable part is shorter than the 4-byte head",
            Self::ShortTail => "the device-writable part is shorter than the 4-byte tail",
            Self::Oversized => "the device-writable part is over MAX_WRITABLE_SLACK bytes too long",
            Self::WriteFailed => "writing the response into guest memory failed",
        })
    }
}

impl std::error::Error for Malformed {}
