//! How the request misbehaviours of a [`super::FaultPlan`] change an executed request's reply
//! (status byte, PROBE properties, used length), and the request-type peek their filter uses.
//! Called by [`crate::IommuDevice`]'s request processing.

use virtio_iommu_driver::wire;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemory;

use super::Misbehaviour;
use crate::config::DeviceConfig;

/// The first byte of the chain's readable part (the request type), if any.
pub(crate) fn peek_type<M: GuestMemory>(mem: &M, chain: &DescriptorChain<&M>) -> Option<u8> {
    let mut r = Reader::new(mem, chain.clone()).ok()?;
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut r, &mut b).ok()?;
    Some(b[0])
}

/// One RESV_MEM property (§5.13.6.8.1) with a raw `type` value.
fn resv_mem_property(raw_type: u16, subtype: u8, start: u64, end: u64) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[0..2].copy_from_slice(&raw_type.to_le_bytes());
    p[2..4].copy_from_slice(&20u16.to_le_bytes());
    p[4] = subtype;
    p[8..16].copy_from_slice(&start.to_le_bytes());
    p[16..24].copy_from_slice(&end.to_le_bytes());
    p
}

/// The properties part a PROBE misbehaviour presents for the request in `chain`, exactly
/// `probe_size` bytes.
fn probe_bytes<M: GuestMemory>(
    mem: &M,
    chain: &DescriptorChain<&M>,
    what: &Misbehaviour,
    config: &DeviceConfig,
) -> Vec<u8> {
    let size = config.probe_size() as usize;
    let mut out: Vec<u8> = match what {
        Misbehaviour::ProbeOverlap => [
            resv_mem_property(
                wire::PROBE_T_RESV_MEM,
                wire::RESV_MEM_T_RESERVED,
                0x1000,
                0x2fff,
            ),
            resv_mem_property(
                wire::PROBE_T_RESV_MEM,
                wire::RESV_MEM_T_RESERVED,
                0x2000,
                0x3fff,
            ),
        ]
        .concat(),
        Misbehaviour::ProbeOverrun => {
            let len = u16::try_from(size).unwrap_or(u16::MAX);
            let mut p = resv_mem_property(wire::PROBE_T_RESV_MEM, 0, 0x1000, 0x1fff);
            p[2..4].copy_from_slice(&len.to_le_bytes());
            p.to_vec()
        }
        Misbehaviour::ProbeReservedBits => {
            // The endpoint ID is bytes 4..8 of the readable part.
            let mut req = [0u8; 8];
            let endpoint = Reader::new(mem, chain.clone())
                .ok()
                .and_then(|mut r| std::io::Read::read_exact(&mut r, &mut req).ok())
                .map(|()| u32::from_le_bytes([req[4], req[5], req[6], req[7]]));
            let bogus = wire::PROBE_T_RESV_MEM | 0x1000;
            let mut v =
                resv_mem_property(bogus, wire::RESV_MEM_T_RESERVED, 0x5000, 0x5fff).to_vec();
            for r in endpoint
                .and_then(|e| config.resv_regions(e))
                .unwrap_or_default()
            {
                v.extend_from_slice(&resv_mem_property(
                    wire::PROBE_T_RESV_MEM,
                    r.kind.subtype(),
                    r.start,
                    r.end,
                ));
            }
            v
        }
        Misbehaviour::ProbeProperties(bytes) => bytes.clone(),
        _ => Vec::new(),
    };
    out.resize(size, 0);
    out
}

/// Applies a misbehaviour that changes an executed request's reply (status byte, PROBE
/// properties, used length); returns the used length to report.
pub(crate) fn corrupt_reply<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    what: &Misbehaviour,
    config: &DeviceConfig,
    used_len: u32,
) -> u32 {
    let writable = Writer::new(mem, chain.clone()).map_or(0, |w| w.available_bytes());
    if used_len == 0 || writable < 4 {
        // Not a completed request: nothing to corrupt but the used length.
        return match what {
            Misbehaviour::UsedLen(n) => *n,
            _ => used_len,
        };
    }
    match what {
        Misbehaviour::UsedLen(n) => *n,
        Misbehaviour::Status(byte) => {
            if let Ok(mut w) = Writer::new(mem, chain) {
                if let Ok(mut tail) = w.split_at(writable - 4) {
                    let _ = std::io::Write::write_all(&mut tail, &[*byte]);
                }
            }
            used_len
        }
        m if m.is_probe() => {
            let bytes = probe_bytes(mem, &chain, m, config);
            if writable >= bytes.len() + 4 {
                if let Ok(mut w) = Writer::new(mem, chain) {
                    let _ = std::io::Write::write_all(&mut w, &bytes);
                }
            }
            used_len
        }
        _ => used_len,
    }
}
