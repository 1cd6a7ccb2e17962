//! Raw-descriptor harness: the driver side of the virtqueues written by hand with
//! virtio-queue's `MockSplitQueue`, so tests control every descriptor.
#![allow(dead_code)]

use virtio_iommu_device::device::{status, QueueSetup};
use virtio_iommu_device::{DeviceConfig, IommuDevice};
use virtio_iommu_driver::wire::{
    Features, MapFlags, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqProbe, ReqUnmap, RequestType,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

pub type Mem = GuestMemoryMmap<()>;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const QSIZE: u16 = 256;
pub const MEM_SIZE: usize = 16 << 20;
const RQ_BASE: u64 = 0;
const EQ_BASE: u64 = 0x4000;
const DATA_BASE: u64 = 0x10_0000;
/// Poison written into writable buffers before a request: bytes the device did not write keep it.
pub const POISON: u8 = 0xaa;

pub fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One descriptor: guest address, length, flags (NEXT is managed by the harness).
#[derive(Clone, Copy, Debug)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

/// Result of one request: used length, and the bytes of the writable descriptors, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub used: u32,
    pub written: Vec<u8>,
}

impl Reply {
    /// Status byte at the end of the writable part.
    pub fn status(&self) -> u8 {
        self.written[self.written.len() - 4]
    }
}

pub struct Harness<'a> {
    pub mem: &'a Mem,
    pub rq: MockSplitQueue<'a, Mem>,
    pub eq: MockSplitQueue<'a, Mem>,
    pub dev: IommuDevice<Mem>,
    rq_slot: u16,
    eq_slot: u16,
    data: u64,
}

impl<'a> Harness<'a> {
    /// A device driven to DRIVER_OK with every offered feature negotiated.
    pub fn new(mem: &'a Mem, config: DeviceConfig) -> Self {
        let features = config.offered();
        Self::with_features(mem, config, features)
    }

    /// A device driven to DRIVER_OK with `features` written as driver features.
    pub fn with_features(mem: &'a Mem, config: DeviceConfig, features: Features) -> Self {
        let rq = MockSplitQueue::create(mem, GuestAddress(RQ_BASE), QSIZE);
        let eq = MockSplitQueue::create(mem, GuestAddress(EQ_BASE), QSIZE);
        let mut dev = IommuDevice::new(config, mem.clone()).unwrap();
        dev.write_status(status::ACKNOWLEDGE | status::DRIVER);
        dev.write_driver_features(0, features.bits() as u32);
        dev.write_driver_features(1, (features.bits() >> 32) as u32);
        dev.write_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(dev.status() & status::FEATURES_OK, 0, "features refused");
        for (i, q) in [(0u16, &rq), (1u16, &eq)] {
            dev.activate_queue(
                i,
                QueueSetup {
                    size: QSIZE,
                    desc_table: q.desc_table_addr().0,
                    avail_ring: q.avail_addr().0,
                    used_ring: q.used_addr().0,
                },
            )
            .unwrap();
        }
        dev.write_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        Self {
            mem,
            rq,
            eq,
            dev,
            rq_slot: 0,
            eq_slot: 0,
            data: DATA_BASE,
        }
    }

    /// A device whose two queues are configured and ready but whose status was never written
    /// (status 0, no driver feature): tests drive the status and features themselves.
    pub fn idle(mem: &'a Mem, config: DeviceConfig) -> Self {
        let rq = MockSplitQueue::create(mem, GuestAddress(RQ_BASE), QSIZE);
        let eq = MockSplitQueue::create(mem, GuestAddress(EQ_BASE), QSIZE);
        let mut dev = IommuDevice::new(config, mem.clone()).unwrap();
        for (i, q) in [(0u16, &rq), (1u16, &eq)] {
            dev.activate_queue(i, Self::setup_of(q)).unwrap();
        }
        Self {
            mem,
            rq,
            eq,
            dev,
            rq_slot: 0,
            eq_slot: 0,
            data: DATA_BASE,
        }
    }

    /// The `QueueSetup` describing `q` (size [`QSIZE`]).
    pub fn setup_of(q: &MockSplitQueue<'a, Mem>) -> QueueSetup {
        QueueSetup {
            size: QSIZE,
            desc_table: q.desc_table_addr().0,
            avail_ring: q.avail_addr().0,
            used_ring: q.used_addr().0,
        }
    }

    /// Posts one device-writable eventq buffer of `len` bytes (poisoned), without notifying;
    /// returns its guest address.
    pub fn post_event_buffer(&mut self, len: u32) -> u64 {
        let a = self.buffer(len as usize, POISON);
        self.post_event(&[D {
            addr: a,
            len,
            flags: F_WRITE,
        }]);
        a
    }

    /// Posts an ATTACH(domain 1, `endpoint`) request with a 4-byte writable part, without
    /// notifying; returns the address of the writable part.
    pub fn post_attach(&mut self, endpoint: u32) -> u64 {
        let req = bytes(&attach(1, endpoint, 0));
        let r = self.buffer(req.len(), 0);
        self.mem.write_slice(&req, GuestAddress(r)).unwrap();
        let w = self.buffer(4, POISON);
        self.post_request(&[
            D {
                addr: r,
                len: req.len() as u32,
                flags: 0,
            },
            D {
                addr: w,
                len: 4,
                flags: F_WRITE,
            },
        ]);
        w
    }

    /// A fresh data buffer of `len` bytes filled with `fill`, 64-byte aligned.
    pub fn buffer(&mut self, len: usize, fill: u8) -> u64 {
        let len64 = (len as u64).max(1).next_multiple_of(64);
        if self.data + len64 > MEM_SIZE as u64 {
            self.data = DATA_BASE;
        }
        let a = self.data;
        self.data += len64 + 64;
        self.mem
            .write_slice(&vec![fill; len], GuestAddress(a))
            .unwrap();
        a
    }

    fn post(mem: &Mem, queue: &MockSplitQueue<'a, Mem>, slot: &mut u16, descs: &[D]) -> u16 {
        let n = descs.len() as u16;
        assert!(n > 0 && n <= QSIZE);
        if *slot + n > QSIZE {
            *slot = 0;
        }
        let head = *slot;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags & !F_NEXT
                } else {
                    d.flags | F_NEXT
                };
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(d.addr, d.len, flags, next))
            })
            .collect();
        for (i, d) in raw.into_iter().enumerate() {
            queue.desc_table().store(head + i as u16, d).unwrap();
        }
        // `MockSplitQueue::add_desc_chains` does not wrap the ring position at the queue size:
        // write the available ring here.
        let avail = queue.avail_addr();
        let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
        mem.write_obj(head, avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        *slot += n;
        head
    }

    /// Posts raw descriptors on requestq without notifying; returns the head index.
    pub fn post_request(&mut self, descs: &[D]) -> u16 {
        Self::post(self.mem, &self.rq, &mut self.rq_slot, descs)
    }

    /// Posts raw descriptors on eventq without notifying.
    pub fn post_event(&mut self, descs: &[D]) -> u16 {
        Self::post(self.mem, &self.eq, &mut self.eq_slot, descs)
    }

    pub fn rq_used_idx(&self) -> u16 {
        self.rq.used().idx().load()
    }

    pub fn eq_used_idx(&self) -> u16 {
        self.eq.used().idx().load()
    }

    /// Used element `i` (ring position, modulo the size) of requestq: (id, len).
    pub fn rq_used(&self, i: u16) -> (u32, u32) {
        let e = self
            .rq
            .used()
            .ring()
            .ref_at(usize::from(i % QSIZE))
            .unwrap()
            .load();
        (e.id(), e.len())
    }

    pub fn eq_used(&self, i: u16) -> (u32, u32) {
        let e = self
            .eq
            .used()
            .ring()
            .ref_at(usize::from(i % QSIZE))
            .unwrap()
            .load();
        (e.id(), e.len())
    }

    /// Sends `readable` split at `r_cuts` (increasing offsets strictly inside it) and a writable
    /// part of `w_len` bytes split at `w_cuts`; returns the used length and the writable bytes.
    pub fn request_split(
        &mut self,
        readable: &[u8],
        r_cuts: &[usize],
        w_len: usize,
        w_cuts: &[usize],
    ) -> Reply {
        let mut descs = Vec::new();
        let mut wbufs = Vec::new();
        let mut prev = 0;
        for &c in r_cuts.iter().chain(std::iter::once(&readable.len())) {
            if c == prev && !readable.is_empty() {
                continue;
            }
            let piece = &readable[prev..c];
            let a = self.buffer(piece.len(), 0);
            self.mem.write_slice(piece, GuestAddress(a)).unwrap();
            if !piece.is_empty() {
                descs.push(D {
                    addr: a,
                    len: piece.len() as u32,
                    flags: 0,
                });
            }
            prev = c;
        }
        let mut prev = 0;
        for &c in w_cuts.iter().chain(std::iter::once(&w_len)) {
            let len = c - prev;
            if len == 0 {
                continue;
            }
            let a = self.buffer(len, POISON);
            descs.push(D {
                addr: a,
                len: len as u32,
                flags: F_WRITE,
            });
            wbufs.push((a, len));
            prev = c;
        }
        self.submit(&descs, &wbufs)
    }

    /// Posts `descs`, notifies requestq and returns the reply; `wbufs` are the (addr, len) of
    /// the writable buffers to read back.
    pub fn submit(&mut self, descs: &[D], wbufs: &[(u64, usize)]) -> Reply {
        let before = self.rq_used_idx();
        let head = self.post_request(descs);
        self.dev.notify(0);
        let after = self.rq_used_idx();
        assert_eq!(after, before.wrapping_add(1), "exactly one chain used");
        let (id, used) = self.rq_used(before);
        assert_eq!(id, u32::from(head));
        let mut written = Vec::new();
        for &(a, len) in wbufs {
            let mut b = vec![0; len];
            self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            written.extend_from_slice(&b);
        }
        Reply { used, written }
    }

    /// A request in two descriptors (readable, writable of `w_len` bytes).
    pub fn request(&mut self, readable: &[u8], w_len: usize) -> Reply {
        self.request_split(readable, &[], w_len, &[])
    }

    /// Status of a request with a 4-byte writable part, checking the used length is 4.
    pub fn status(&mut self, readable: &[u8]) -> u8 {
        let r = self.request(readable, 4);
        assert_eq!(r.used, 4, "used length");
        assert_eq!(&r.written[1..], &[0, 0, 0], "tail reserved bytes zero (D8)");
        r.written[0]
    }
}

pub fn attach(domain: u32, endpoint: u32, flags: u32) -> ReqAttach {
    ReqAttach {
        head: ReqHead::new(RequestType::Attach),
        domain: domain.into(),
        endpoint: endpoint.into(),
        flags: flags.into(),
        reserved: [0; 4],
    }
}

pub fn detach(domain: u32, endpoint: u32) -> ReqDetach {
    ReqDetach {
        head: ReqHead::new(RequestType::Detach),
        domain: domain.into(),
        endpoint: endpoint.into(),
        reserved: [0; 8],
    }
}

pub fn map(domain: u32, start: u64, end: u64, phys: u64, flags: MapFlags) -> ReqMap {
    ReqMap {
        head: ReqHead::new(RequestType::Map),
        domain: domain.into(),
        virt_start: start.into(),
        virt_end: end.into(),
        phys_start: phys.into(),
        flags: flags.bits().into(),
    }
}

pub fn unmap(domain: u32, start: u64, end: u64) -> ReqUnmap {
    ReqUnmap {
        head: ReqHead::new(RequestType::Unmap),
        domain: domain.into(),
        virt_start: start.into(),
        virt_end: end.into(),
        reserved: [0; 4],
    }
}

pub fn probe(endpoint: u32) -> ReqProbe {
    ReqProbe {
        endpoint: endpoint.into(),
        ..ReqProbe::default()
    }
}

pub fn bytes<T: IntoBytes + zerocopy::Immutable>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

pub const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);
