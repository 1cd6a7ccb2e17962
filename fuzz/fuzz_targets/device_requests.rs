//! The device model (`IommuDevice`) driven through its virtqueues with arbitrary descriptor
//! chains: descriptor counts, lengths, flags, `next` indexes and addresses (gaps between
//! memory regions, past the end of memory, into the rings themselves, the top of the 64-bit
//! space), readable/writable orders that are wrong, loops, indirect tables (well-formed or
//! not), bogus available rings and head indexes; request contents from well-formed
//! ATTACH/DETACH/MAP/UNMAP/PROBE (truncated, extended, retyped) to raw bytes. Interleaved with
//! endpoint accesses that fault (delivered into arbitrary eventq buffers), config-space
//! writes, device resets and renegotiation.
//!
//! Checked after every step:
//! - no panic;
//! - each used element names the head the driver posted and has a used length that is 0 or
//!   exactly the chain's writable bytes (so never more), as virtio-queue's own chain walk
//!   counts them; eventq used lengths are 0 or 24, and 24 only for an all-writable chain of at
//!   least 24 bytes;
//! - guest memory changed only in the used rings and in the writable buffers of chains
//!   returned with a non-zero used length ("nothing written" otherwise);
//! - the `IommuState` invariants (`virtio_iommu_fuzz::check_invariants`);
//! - the counters add up to the chains returned.
#![no_main]

use std::num::Wrapping;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_iommu_device::device::status;
use virtio_iommu_device::{DeviceConfig, IommuDevice, QueueSetup};
use virtio_iommu_driver::wire::{
    Features, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqProbe, ReqUnmap, RequestType,
};
use virtio_iommu_fuzz::{access, check_invariants, Addr, CfgSpec, Dom, End, Ep, MapFlagSel};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

type Mem = GuestMemoryMmap<()>;

/// Guest memory: region A (rings and buffers), a gap, then a small region B.
const A_BASE: u64 = 0;
const A_SIZE: u64 = 0x8000;
const B_BASE: u64 = 0x2_0000;
const B_SIZE: u64 = 0x1000;
/// Rings of each queue (at most 16 descriptors): table, available ring, used ring.
const RQ_BASE: u64 = 0x100; // the available ring must not be at address 0 (virtio-queue)
const EQ_BASE: u64 = 0x500;
const AVAIL_OFF: u64 = 0x100;
const USED_OFF: u64 = 0x200;
const RINGS_END: u64 = 0x900;
/// Buffers and indirect tables are allocated from here to the end of region A.
const DATA_BASE: u64 = 0x1000;
const POISON: u8 = 0xaa;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Arbitrary, Debug)]
struct Input {
    cfg: CfgSpec,
    /// Start with endpoints 0, 8, 16 attached to domains 1, 2, 3 (well-formed ATTACHes through
    /// the queue), so that MAP/UNMAP/PROBE/translate have something to work on.
    prelude: bool,
    /// Offered features not negotiated at the first initialisation (bits 0..=6, 28); `None`:
    /// all.
    not_negotiated: Option<u8>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Post chains on requestq, then notify it.
    Requests {
        chains: Vec<ChainSpec>,
        /// Extra available-ring entries with arbitrary head indexes.
        extra_heads: Vec<u16>,
        /// Overwrite the available index with this (usually breaking the queue).
        bogus_avail: Option<u16>,
    },
    /// One more processing round (`process_requestq()`, whether or not a round is owed: chains
    /// beyond `max_requests_per_notify` stay owed until `service()` or this runs them).
    Process,
    /// Post event buffers, then notify eventq.
    Events(Vec<EventBuf>),
    /// An endpoint access (faults are reported on eventq).
    Translate {
        ep: Ep,
        iova: Addr,
        len: u16,
        access: u8,
    },
    WriteConfig {
        offset: u8,
        data: Vec<u8>,
    },
    /// Device reset, rings cleared, initialised again.
    Reinit {
        not_negotiated: Option<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct ChainSpec {
    payload: Payload,
    /// Replace the type byte.
    retype: Option<u8>,
    /// Keep only this many request bytes.
    truncate: Option<u8>,
    /// Append this many 0xff bytes.
    extend: u8,
    /// Lengths of the readable descriptors (the rest goes in one more).
    read_split: Vec<u8>,
    write_lens: Vec<WLen>,
    /// Put the chain in an indirect table.
    indirect: Option<IndirectSpec>,
    /// Swap descriptors before linking them (e.g. writable before readable).
    swaps: Vec<(u8, u8)>,
    /// Applied after linking.
    corrupt: Vec<Corrupt>,
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Attach {
        domain: Dom,
        ep: Ep,
        bypass: bool,
        bad_flags: Option<u32>,
        reserved: Option<u8>,
    },
    Detach {
        domain: Dom,
        ep: Ep,
    },
    Map {
        domain: Dom,
        start: Addr,
        end: End,
        phys: Addr,
        flags: MapFlagSel,
    },
    Unmap {
        domain: Dom,
        start: Addr,
        end: End,
    },
    Probe {
        ep: Ep,
    },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum WLen {
    /// What the request needs: 4, or `probe_size + 4` for PROBE.
    Exact,
    Small(u8),
    Big(u16),
}

#[derive(Arbitrary, Debug)]
struct IndirectSpec {
    /// Added to the table length in the head descriptor (16 bytes per entry).
    len_delta: i8,
    head_flags_xor: u16,
}

#[derive(Arbitrary, Debug)]
enum Corrupt {
    Addr { i: u8, to: AddrSel },
    Len { i: u8, len: u32 },
    FlagsXor { i: u8, x: u16 },
    Next { i: u8, next: u16 },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum AddrSel {
    /// Between the two regions.
    Gap(u16),
    /// Near the end of region B (the buffer may run past it).
    EndOfB(u16),
    /// Into the rings.
    Ring(u16),
    Top(u16),
    Raw(u64),
}

impl AddrSel {
    fn get(self) -> u64 {
        match self {
            AddrSel::Gap(x) => A_BASE + A_SIZE + u64::from(x) % (B_BASE - A_SIZE),
            AddrSel::EndOfB(x) => B_BASE + B_SIZE - u64::from(x % 0x1000),
            AddrSel::Ring(x) => u64::from(x) % RINGS_END,
            AddrSel::Top(x) => u64::MAX - u64::from(x),
            AddrSel::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct EventBuf {
    descs: Vec<(EvLen, bool)>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum EvLen {
    Exact,
    Small(u8),
    Big(u8),
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One chain as virtio-queue will walk it: its head and its writable buffers.
struct ShadowChain {
    head: u16,
    writable: Vec<(u64, u64)>,
    writable_bytes: u64,
    all_writable: bool,
}

/// Whether a writable buffer of `c` overlaps another of its own or one of another chain
/// (whose writes could then be the ones seen).
fn shares_memory(c: &ShadowChain, rq: &[ShadowChain], eq: &[ShadowChain]) -> bool {
    let overlap =
        |(a, l): (u64, u64), (b, m): (u64, u64)| a < b.saturating_add(m) && b < a.saturating_add(l);
    c.writable.iter().enumerate().any(|(i, &r)| {
        c.writable
            .iter()
            .enumerate()
            .any(|(j, &q)| i != j && overlap(r, q))
            || rq
                .iter()
                .chain(eq)
                .filter(|o| !std::ptr::eq(*o, c))
                .any(|o| o.writable.iter().any(|&q| overlap(r, q)))
    })
}

struct Harness {
    mem: Mem,
    dev: IommuDevice<Mem>,
    qsize: u16,
    rq_slot: u16,
    eq_slot: u16,
    rq_avail: Wrapping<u16>,
    eq_avail: Wrapping<u16>,
    data: u64,
    /// Descriptor tables written since the last check (indirect tables), for the "device
    /// overwrote a descriptor" escape hatch.
    tables: Vec<(u64, u64)>,
    /// requestq used elements seen in total.
    rq_used_total: u64,
    /// A step was not checked strictly (a device-writable buffer over the rings): the used
    /// element count is unknown from then on.
    tainted: bool,
}

fn ring_addr(base: u64) -> (u64, u64, u64) {
    (base, base + AVAIL_OFF, base + USED_OFF)
}

impl Harness {
    fn new(cfg: DeviceConfig, not_negotiated: Option<u8>) -> Self {
        let mem = Mem::from_ranges(&[
            (GuestAddress(A_BASE), A_SIZE as usize),
            (GuestAddress(B_BASE), B_SIZE as usize),
        ])
        .unwrap();
        let qsize = cfg.queue_size();
        let dev = IommuDevice::new(cfg, mem.clone()).unwrap();
        let mut h = Harness {
            mem,
            dev,
            qsize,
            rq_slot: 0,
            eq_slot: 0,
            rq_avail: Wrapping(0),
            eq_avail: Wrapping(0),
            data: DATA_BASE,
            tables: Vec::new(),
            rq_used_total: 0,
            tainted: false,
        };
        h.init(not_negotiated);
        h
    }

    fn init(&mut self, not_negotiated: Option<u8>) {
        let not_negotiated = not_negotiated.unwrap_or(0);
        self.dev.write_status(0);
        self.mem
            .write_slice(&vec![0u8; RINGS_END as usize], GuestAddress(0))
            .unwrap();
        self.rq_slot = 0;
        self.eq_slot = 0;
        self.rq_avail = Wrapping(0);
        self.eq_avail = Wrapping(0);
        let drop = Features::from_bits_truncate(
            u64::from(not_negotiated & 0x7f) | (u64::from(not_negotiated >> 7) << 28),
        );
        let features = Features::from_bits_retain(self.dev.device_features()) - drop;
        self.dev.write_status(status::ACKNOWLEDGE | status::DRIVER);
        self.dev.write_driver_features(0, features.bits() as u32);
        self.dev
            .write_driver_features(1, (features.bits() >> 32) as u32);
        self.dev
            .write_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(self.dev.status() & status::FEATURES_OK, 0);
        for (i, base) in [(0u16, RQ_BASE), (1u16, EQ_BASE)] {
            let (d, a, u) = ring_addr(base);
            self.dev
                .activate_queue(
                    i,
                    QueueSetup {
                        size: self.qsize,
                        desc_table: d,
                        avail_ring: a,
                        used_ring: u,
                    },
                )
                .unwrap();
        }
        self.dev.write_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// A buffer of `len` bytes in region A filled with `fill`, 16-byte aligned; wraps around
    /// the data area (older buffers get reused).
    fn alloc(&mut self, len: u64, fill: u8) -> u64 {
        let len = len.min(A_SIZE - DATA_BASE);
        let rounded = (len + 15) & !15;
        if self.data + rounded > A_SIZE {
            self.data = DATA_BASE;
        }
        let a = self.data;
        self.data += rounded.max(16);
        self.mem
            .write_slice(&vec![fill; len as usize], GuestAddress(a))
            .unwrap();
        a
    }

    fn write_desc(&self, table: u64, index: u16, d: Desc) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&raw, GuestAddress(table + 16 * u64::from(index)));
    }

    fn push_avail(&mut self, base: u64, head: u16) {
        let (_, avail, _) = ring_addr(base);
        let idx = if base == RQ_BASE {
            &mut self.rq_avail
        } else {
            &mut self.eq_avail
        };
        let slot = u64::from(idx.0 % self.qsize);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        *idx += 1;
        let v = idx.0;
        self.mem.write_obj(v, GuestAddress(avail + 2)).unwrap();
    }

    fn request_bytes(&self, c: &ChainSpec, granule: u64) -> Vec<u8> {
        let mut b = match &c.payload {
            Payload::Attach {
                domain,
                ep,
                bypass,
                bad_flags,
                reserved,
            } => ReqAttach {
                head: ReqHead::new(RequestType::Attach),
                domain: domain.get().into(),
                endpoint: ep.get().into(),
                flags: (u32::from(*bypass) | bad_flags.unwrap_or(0)).into(),
                reserved: [0, 0, 0, reserved.unwrap_or(0)],
            }
            .as_bytes()
            .to_vec(),
            Payload::Detach { domain, ep } => ReqDetach {
                head: ReqHead::new(RequestType::Detach),
                domain: domain.get().into(),
                endpoint: ep.get().into(),
                reserved: [0; 8],
            }
            .as_bytes()
            .to_vec(),
            Payload::Map {
                domain,
                start,
                end,
                phys,
                flags,
            } => {
                let s = start.get(granule);
                ReqMap {
                    head: ReqHead::new(RequestType::Map),
                    domain: domain.get().into(),
                    virt_start: s.into(),
                    virt_end: end.get(s, granule).into(),
                    phys_start: phys.get(granule).into(),
                    flags: flags.get().into(),
                }
                .as_bytes()
                .to_vec()
            }
            Payload::Unmap { domain, start, end } => {
                let s = start.get(granule);
                ReqUnmap {
                    head: ReqHead::new(RequestType::Unmap),
                    domain: domain.get().into(),
                    virt_start: s.into(),
                    virt_end: end.get(s, granule).into(),
                    reserved: [0; 4],
                }
                .as_bytes()
                .to_vec()
            }
            Payload::Probe { ep } => ReqProbe {
                endpoint: ep.get().into(),
                ..ReqProbe::default()
            }
            .as_bytes()
            .to_vec(),
            Payload::Raw(v) => v.iter().copied().take(96).collect(),
        };
        if let (Some(t), Some(first)) = (c.retype, b.first_mut()) {
            *first = t;
        }
        if let Some(n) = c.truncate {
            b.truncate(usize::from(n));
        }
        b.extend(std::iter::repeat_n(0xff, usize::from(c.extend % 64)));
        b
    }

    /// Writes one chain's descriptors and buffers; returns its head index.
    fn post_chain(&mut self, c: &ChainSpec) -> u16 {
        let cfg = self.dev.config().clone();
        let granule = cfg.granule();
        let req = self.request_bytes(c, granule);
        let is_probe = matches!(c.payload, Payload::Probe { .. })
            || req.first() == Some(&(RequestType::Probe as u8));
        let exact = if is_probe {
            u64::from(cfg.probe_size()) + 4
        } else {
            4
        };
        let mut descs = Vec::new();
        // Readable part.
        let mut rest: &[u8] = &req;
        for &n in c.read_split.iter().take(6) {
            let n = usize::from(n).min(rest.len());
            let (piece, r) = rest.split_at(n);
            rest = r;
            let a = self.alloc(piece.len() as u64, 0);
            self.mem.write_slice(piece, GuestAddress(a)).unwrap();
            descs.push(Desc {
                addr: a,
                len: piece.len() as u32,
                flags: 0,
                next: 0,
            });
        }
        if !rest.is_empty() || descs.is_empty() {
            let a = self.alloc(rest.len() as u64, 0);
            self.mem.write_slice(rest, GuestAddress(a)).unwrap();
            descs.push(Desc {
                addr: a,
                len: rest.len() as u32,
                flags: 0,
                next: 0,
            });
        }
        // Writable part.
        let wl: Vec<WLen> = if c.write_lens.is_empty() {
            vec![WLen::Exact]
        } else {
            c.write_lens.iter().copied().take(6).collect()
        };
        for w in wl {
            let len = match w {
                WLen::Exact => exact,
                WLen::Small(n) => u64::from(n % 16),
                WLen::Big(n) => u64::from(n) % 3000,
            };
            let a = self.alloc(len, POISON);
            descs.push(Desc {
                addr: a,
                len: len as u32,
                flags: F_WRITE,
                next: 0,
            });
        }
        let n = descs.len();
        for &(a, b) in c.swaps.iter().take(4) {
            descs.swap(usize::from(a) % n, usize::from(b) % n);
        }
        let qs = self.qsize;
        let (table, first_index, head) = if c.indirect.is_some() {
            let t = self.alloc(16 * n as u64, 0);
            self.tables.push((t, 16 * n as u64));
            (t, 0u16, None)
        } else {
            let n = n.min(usize::from(qs)) as u16;
            if self.rq_slot + n > qs {
                self.rq_slot = 0;
            }
            let first = self.rq_slot;
            self.rq_slot += n;
            let (d, _, _) = ring_addr(RQ_BASE);
            (d, first, Some(first))
        };
        let count = if head.is_some() {
            n.min(usize::from(qs))
        } else {
            n
        };
        descs.truncate(count);
        for (i, d) in descs.iter_mut().enumerate() {
            if i + 1 == count {
                d.flags &= !F_NEXT;
            } else {
                d.flags |= F_NEXT;
                d.next = first_index + i as u16 + 1;
            }
        }
        for c in c.corrupt.iter().take(4) {
            let idx = |i: &u8| usize::from(*i) % count;
            match c {
                Corrupt::Addr { i, to } => descs[idx(i)].addr = to.get(),
                Corrupt::Len { i, len } => descs[idx(i)].len = *len,
                Corrupt::FlagsXor { i, x } => descs[idx(i)].flags ^= *x,
                Corrupt::Next { i, next } => descs[idx(i)].next = *next,
            }
        }
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(table, first_index + i as u16, *d);
        }
        match (head, &c.indirect) {
            (Some(h), _) => h,
            (None, Some(ind)) => {
                if self.rq_slot + 1 > qs {
                    self.rq_slot = 0;
                }
                let h = self.rq_slot;
                self.rq_slot += 1;
                let len = (16 * count as i64 + i64::from(ind.len_delta)).max(0) as u32;
                let (d, _, _) = ring_addr(RQ_BASE);
                self.write_desc(
                    d,
                    h,
                    Desc {
                        addr: table,
                        len,
                        flags: F_INDIRECT ^ ind.head_flags_xor,
                        next: 0,
                    },
                );
                h
            }
            (None, None) => unreachable!(),
        }
    }

    fn post_event(&mut self, e: &EventBuf) {
        let descs: Vec<(EvLen, bool)> = if e.descs.is_empty() {
            vec![(EvLen::Exact, true)]
        } else {
            e.descs.iter().copied().take(4).collect()
        };
        let qs = self.qsize;
        let n = descs.len().min(usize::from(qs)) as u16;
        if self.eq_slot + n > qs {
            self.eq_slot = 0;
        }
        let first = self.eq_slot;
        self.eq_slot += n;
        let (table, _, _) = ring_addr(EQ_BASE);
        for i in 0..n {
            let (len, writable) = descs[usize::from(i)];
            let len = match len {
                EvLen::Exact => 24,
                EvLen::Small(n) => u64::from(n % 24),
                EvLen::Big(n) => u64::from(n),
            };
            let a = self.alloc(len, POISON);
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= F_NEXT;
            }
            self.write_desc(
                table,
                first + i,
                Desc {
                    addr: a,
                    len: len as u32,
                    flags,
                    next: first + i + 1,
                },
            );
        }
        self.push_avail(EQ_BASE, first);
    }

    /// The chains the device will pop from queue `base` (at most `max`), walked by
    /// virtio-queue itself.
    fn shadow(&self, index: u16, base: u64, max: usize) -> Vec<ShadowChain> {
        let Some(dq) = self.dev.queue(index) else {
            return Vec::new();
        };
        let mut q = Queue::new(self.dev.config().queue_size()).unwrap();
        let (d, a, u) = ring_addr(base);
        if q.try_set_size(self.qsize).is_err()
            || q.try_set_desc_table_address(GuestAddress(d)).is_err()
            || q.try_set_avail_ring_address(GuestAddress(a)).is_err()
            || q.try_set_used_ring_address(GuestAddress(u)).is_err()
        {
            return Vec::new();
        }
        q.set_ready(true);
        q.set_next_avail(dq.next_avail());
        let mut out = Vec::new();
        let Ok(iter) = q.iter(&self.mem) else {
            return out;
        };
        for chain in iter.take(max) {
            let head = chain.head_index();
            let mut writable = Vec::new();
            let mut bytes = 0u64;
            let mut all_writable = true;
            for d in chain {
                if d.is_write_only() {
                    writable.push((d.addr().0, u64::from(d.len())));
                    bytes += u64::from(d.len());
                } else {
                    all_writable = false;
                }
            }
            out.push(ShadowChain {
                head,
                writable,
                writable_bytes: bytes,
                all_writable,
            });
        }
        out
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut a = vec![0u8; (A_SIZE + B_SIZE) as usize];
        let (x, y) = a.split_at_mut(A_SIZE as usize);
        self.mem.read_slice(x, GuestAddress(A_BASE)).unwrap();
        self.mem.read_slice(y, GuestAddress(B_BASE)).unwrap();
        a
    }

    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, l) in ranges {
            let mut b = vec![0u8; l as usize];
            self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            out.extend(b);
        }
        out
    }

    fn used_idx(&self, base: u64) -> u16 {
        let (_, _, u) = ring_addr(base);
        self.mem.read_obj(GuestAddress(u + 2)).unwrap()
    }

    /// Used elements `from..from + n` (ring positions) of queue `base`: (id, len).
    fn used_entries(&self, base: u64, from: u16, n: u16) -> Vec<(u32, u32)> {
        let (_, _, u) = ring_addr(base);
        (0..n)
            .map(|k| {
                let e = u + 4 + 8 * u64::from(from.wrapping_add(k) % self.qsize);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    /// Runs `post` (the driver writing descriptors and rings), then `step` (the device
    /// acting), and checks what the device did to both queues and to guest memory.
    fn checked(&mut self, post: impl FnOnce(&mut Self), step: impl FnOnce(&mut Self)) {
        post(self);
        let max_req = self.dev.config().caps().max_requests_per_notify;
        let rq_shadow = self.shadow(0, RQ_BASE, max_req);
        // Every queued fault may consume buffers; skipped buffers do not consume faults.
        let eq_shadow = self.shadow(1, EQ_BASE, usize::from(self.qsize));
        let rq_before = self.used_idx(RQ_BASE);
        let eq_before = self.used_idx(EQ_BASE);
        let before = self.snapshot();
        step(self);
        let after = self.snapshot();

        // A writable buffer over a descriptor table or an available ring lets one chain's
        // response rewrite the next chain's descriptors after the shadow walk: then only
        // "no panic" and the state invariants are checked.
        // The same for a buffer over a used ring (the device's response then rewrites the
        // used index the checks read).
        let mut meta: Vec<(u64, u64)> = vec![(RQ_BASE, RINGS_END - RQ_BASE)];
        meta.extend(self.tables.iter().copied());
        let hits_meta = |ranges: &[(u64, u64)]| {
            ranges.iter().any(|&(a, l)| {
                meta.iter()
                    .any(|&(m, ml)| a < m + ml && m < a.saturating_add(l))
            })
        };
        let strict = !rq_shadow.iter().any(|c| hits_meta(&c.writable))
            && !eq_shadow.iter().any(|c| hits_meta(&c.writable));

        let mut allowed: Vec<(u64, u64)> = vec![
            (RQ_BASE + USED_OFF, 4 + 8 * u64::from(self.qsize) + 2),
            (EQ_BASE + USED_OFF, 4 + 8 * u64::from(self.qsize) + 2),
        ];
        for (base, before_idx, shadow, is_rq) in [
            (RQ_BASE, rq_before, &rq_shadow, true),
            (EQ_BASE, eq_before, &eq_shadow, false),
        ] {
            if !strict {
                self.tainted = true;
                continue;
            }
            let n = self.used_idx(base).wrapping_sub(before_idx);
            if is_rq {
                self.rq_used_total += u64::from(n);
            }
            assert!(
                usize::from(n) <= shadow.len(),
                "more used elements ({n}) than chains posted ({})",
                shadow.len()
            );
            for (k, (id, len)) in self
                .used_entries(base, before_idx, n)
                .into_iter()
                .enumerate()
            {
                let c = &shadow[k];
                assert_eq!(id, u32::from(c.head), "used element {k}: wrong head");
                assert!(
                    u64::from(len) <= c.writable_bytes,
                    "used length {len} > writable bytes {}",
                    c.writable_bytes
                );
                if is_rq {
                    assert!(
                        len == 0 || u64::from(len) == c.writable_bytes,
                        "used length {len} is neither 0 nor the writable length {}",
                        c.writable_bytes
                    );
                } else {
                    assert!(len == 0 || len == 24, "eventq used length {len}");
                    if len == 24 {
                        assert!(c.all_writable && c.writable_bytes >= 24);
                    }
                }
                if len > 0 {
                    allowed.extend(c.writable.iter().copied());
                    if is_rq && !shares_memory(c, &rq_shadow, &eq_shadow) {
                        // The response really is there: the tail in the last 4 writable bytes
                        // (a status the spec defines, reserved bytes zero, D8), where the
                        // buffer held poison before.
                        let bytes = self.read_ranges(&c.writable);
                        assert!(
                            bytes.len() >= 4,
                            "used length {len} without room for a tail"
                        );
                        let tail = &bytes[bytes.len() - 4..];
                        assert!(
                            tail[0] <= 8 && tail[1..] == [0, 0, 0],
                            "used length {len} but tail {tail:?}"
                        );
                    }
                }
            }
        }
        if strict {
            let changed = before
                .chunks(64)
                .zip(after.chunks(64))
                .enumerate()
                .filter(|(_, (b, a))| b != a)
                .flat_map(|(c, (b, a))| {
                    b.iter()
                        .zip(a.iter())
                        .enumerate()
                        .filter(|(_, (x, y))| x != y)
                        .map(move |(i, _)| c * 64 + i)
                });
            for i in changed {
                let addr = if (i as u64) < A_SIZE {
                    A_BASE + i as u64
                } else {
                    B_BASE + (i as u64 - A_SIZE)
                };
                assert!(
                    allowed.iter().any(|&(s, l)| s <= addr && addr - s < l),
                    "guest memory at {addr:#x} changed outside any used writable buffer"
                );
            }
        }
        // Tables of chains still queued stay relevant; old ones only make checks laxer.
        if self.tables.len() > 64 {
            self.tables.drain(..32);
        }
        check_invariants(self.dev.state());
        let c = self.dev.counters();
        // Every chain handled is counted once; it reaches the used ring unless returning it
        // failed (a head index outside the table), which sets DEVICE_NEEDS_RESET.
        let handled = c.requests_completed + c.requests_unknown_type + c.requests_malformed;
        assert!(
            self.tainted
                || handled >= self.rq_used_total && handled - self.rq_used_total <= c.needs_reset,
            "requestq counters: {handled} handled, {} used, {} resets",
            self.rq_used_total,
            c.needs_reset
        );
    }
}

fuzz_target!(|input: Input| {
    let Some(cfg) = input.cfg.build() else {
        return;
    };
    let granule = cfg.granule();
    let mut h = Harness::new(cfg, input.not_negotiated);
    if input.prelude {
        for (i, ep) in [0u32, 8, 16].into_iter().enumerate() {
            let c = ChainSpec {
                payload: Payload::Attach {
                    domain: Dom::Small(i as u8),
                    ep: Ep::Raw(ep),
                    bypass: false,
                    bad_flags: None,
                    reserved: None,
                },
                retype: None,
                truncate: None,
                extend: 0,
                read_split: vec![],
                write_lens: vec![],
                indirect: None,
                swaps: vec![],
                corrupt: vec![],
            };
            h.checked(
                |h| {
                    let head = h.post_chain(&c);
                    h.push_avail(RQ_BASE, head);
                },
                |h| h.dev.notify(0),
            );
        }
    }
    for op in input.ops.iter().take(48) {
        if std::env::var_os("FUZZ_TRACE").is_some() {
            eprintln!("op {op:?}");
        }
        match op {
            Op::Requests {
                chains,
                extra_heads,
                bogus_avail,
            } => h.checked(
                |h| {
                    for c in chains.iter().take(usize::from(h.qsize)) {
                        let head = h.post_chain(c);
                        h.push_avail(RQ_BASE, head);
                    }
                    for &x in extra_heads.iter().take(4) {
                        h.push_avail(RQ_BASE, x);
                    }
                    if let Some(v) = bogus_avail {
                        let (_, a, _) = ring_addr(RQ_BASE);
                        h.mem.write_obj(*v, GuestAddress(a + 2)).unwrap();
                        h.rq_avail = Wrapping(*v);
                    }
                },
                |h| h.dev.notify(0),
            ),
            Op::Process => h.checked(
                |_| {},
                |h| {
                    h.dev.process_requestq();
                },
            ),
            Op::Events(bufs) => h.checked(
                |h| {
                    for b in bufs.iter().take(usize::from(h.qsize)) {
                        h.post_event(b);
                    }
                },
                |h| h.dev.notify(1),
            ),
            Op::Translate {
                ep,
                iova,
                len,
                access: a,
            } => h.checked(
                |_| {},
                |h| {
                    let _ =
                        h.dev
                            .translate(ep.get(), iova.get(granule), u64::from(*len), access(*a));
                },
            ),
            Op::WriteConfig { offset, data } => h.checked(
                |_| {},
                |h| {
                    let d: Vec<u8> = data.iter().copied().take(8).collect();
                    h.dev.write_config(u64::from(*offset % 48), &d);
                },
            ),
            Op::Reinit { not_negotiated } => {
                h.init(*not_negotiated);
                h.tables.clear();
                check_invariants(h.dev.state());
            }
        }
    }
    if std::env::var_os("FUZZ_STATS").is_some() {
        eprintln!(
            "stats: {:?} domains {} mappings {}",
            h.dev.counters(),
            h.dev.state().domain_count(),
            h.dev.state().mapping_count()
        );
    }
});
