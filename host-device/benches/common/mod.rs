//! Setups shared by the benchmarks: a state or a device holding `n` one-page mappings in one
//! domain, fixed pseudo-random IOVA sequences, and requestq chains built with virtio-queue's
//! `MockSplitQueue`.
//!
//! Layout: endpoint 1 attached to domain 1, with QEMU's GICv2m MSI doorbell as its RESV_MEM
//! region (as on the `virt` machine). Mapping `i` covers the 4 KiB page at IOVA
//! `IOVA_BASE + 2 * i * 4096` (every other page, so MAP benchmarks can insert between existing
//! mappings) and points to one of the `DMA_PAGES` pages of guest RAM at `DMA_BASE`, read-write.
#![allow(dead_code)]

use std::sync::Arc;

use virtio_iommu_device::device::{lock, status, QueueSetup};
use virtio_iommu_device::{DeviceConfig, IommuDevice, IommuState, ResvRegion, SharedDevice};
use virtio_iommu_driver::wire::{
    MapFlags, ReqAttach, ReqHead, ReqMap, ReqUnmap, RequestType, Status,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

pub type Mem = GuestMemoryMmap<()>;

pub const PAGE: u64 = 4096;
pub const ENDPOINT: u32 = 1;
pub const DOMAIN: u32 = 1;
/// First mapped IOVA (4 GiB; 1M mappings of every other page end below 12 GiB).
pub const IOVA_BASE: u64 = 1 << 32;
/// Guest RAM: `RAM_SIZE` bytes at 0. Queues at 0, request buffers from `REQ_BASE`, DMA target
/// pages from `DMA_BASE`.
pub const RAM_SIZE: usize = 8 << 20;
pub const REQ_BASE: u64 = 1 << 20;
pub const DMA_BASE: u64 = 4 << 20;
pub const DMA_PAGES: u64 = 1024;
/// Queue size of the benchmark queues (chains of 2 descriptors: `QSIZE / 2` requests per batch).
pub const QSIZE: u16 = 4096;
/// Bytes of request buffer per chain: the request (at most 36 bytes) then the 4-byte tail.
const REQ_STRIDE: u64 = 64;

/// 1K and 1M mappings.
pub const N_1K: u64 = 1 << 10;
pub const N_1M: u64 = 1 << 20;

pub fn config(mappings: u64) -> DeviceConfig {
    DeviceConfig::builder()
        .endpoint(ENDPOINT)
        .resv_region(ENDPOINT, ResvRegion::msi(0x0802_0000, 0x0802_0fff))
        .max_mappings(usize::try_from(2 * mappings + 4096).unwrap())
        .queue_size(QSIZE)
        .max_requests_per_notify(usize::from(QSIZE))
        .build()
        .unwrap()
}

/// IOVA of the page of mapping slot `slot` (even slots are mapped by the setups).
pub fn slot_iova(slot: u64) -> u64 {
    IOVA_BASE + slot * PAGE
}

pub fn slot_phys(slot: u64) -> u64 {
    DMA_BASE + (slot % DMA_PAGES) * PAGE
}

pub fn req_map(slot: u64) -> ReqMap {
    let iova = slot_iova(slot);
    ReqMap {
        head: ReqHead::new(RequestType::Map),
        domain: DOMAIN.into(),
        virt_start: iova.into(),
        virt_end: (iova + PAGE - 1).into(),
        phys_start: slot_phys(slot).into(),
        flags: (MapFlags::READ | MapFlags::WRITE).bits().into(),
    }
}

pub fn req_unmap(slot: u64) -> ReqUnmap {
    let iova = slot_iova(slot);
    ReqUnmap {
        head: ReqHead::new(RequestType::Unmap),
        domain: DOMAIN.into(),
        virt_start: iova.into(),
        virt_end: (iova + PAGE - 1).into(),
        reserved: [0; 4],
    }
}

pub fn req_attach() -> ReqAttach {
    ReqAttach {
        head: ReqHead::new(RequestType::Attach),
        domain: DOMAIN.into(),
        endpoint: ENDPOINT.into(),
        flags: 0.into(),
        reserved: [0; 4],
    }
}

/// A state with every offered feature negotiated, endpoint 1 in domain 1, and `n` mappings at
/// the even slots `0, 2, .., 2n - 2`.
pub fn state_with(n: u64) -> IommuState {
    let config = Arc::new(config(n));
    let mut s = IommuState::new(config.clone());
    s.set_negotiated(config.offered());
    assert_eq!(s.attach(&req_attach()), Status::Ok);
    for i in 0..n {
        assert_eq!(s.map(&req_map(2 * i)), Status::Ok);
    }
    assert_eq!(s.mapping_count() as u64, n);
    s
}

/// splitmix64: a fixed pseudo-random sequence (same on every run and machine).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` for benchmarks (`n` much smaller than 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Number of translations per translate benchmark run (the figure per call is the total
/// divided by it).
pub const LOOKUPS: usize = 1024;
/// Length of each translated access (a 64-byte DMA burst, inside one page).
pub const ACCESS_LEN: u64 = 64;

/// `LOOKUPS` IOVAs, each inside a random one of the `n` mappings at a random 64-byte aligned
/// offset, so consecutive lookups share nothing (no locality, and no IOTLB in the device).
pub fn random_iovas(n: u64) -> Vec<u64> {
    let mut rng = Rng::new(0x5eed_0000 ^ n);
    (0..LOOKUPS)
        .map(|_| slot_iova(2 * rng.below(n)) + rng.below(PAGE / ACCESS_LEN) * ACCESS_LEN)
        .collect()
}

/// Number of MAP or UNMAP requests per MAP/UNMAP benchmark run.
pub const OPS: u64 = 256;

/// `OPS` distinct indexes in `0..n` (`n` a power of two, at least `OPS`) in a scattered order:
/// `(k * stride + offset) mod n` with an odd stride is a permutation of `0..n`.
pub fn scattered(n: u64) -> Vec<u64> {
    assert!(n.is_power_of_two() && n >= OPS);
    let stride = ((n / OPS) * 0x9e37) | 1;
    (0..OPS).map(|k| (k * stride + n / 3) & (n - 1)).collect()
}

/// MAP targets: free odd slots between existing mappings, scattered over the whole range.
pub fn map_slots(n: u64) -> Vec<u64> {
    scattered(n).into_iter().map(|i| 2 * i + 1).collect()
}

/// MAP targets: the `OPS` free odd slots after slot `n` (the middle of the mapped range), in
/// increasing order: many MAPs into the same few leaves, so leaf splits are included.
pub fn map_slots_clustered(n: u64) -> Vec<u64> {
    (0..OPS).map(|k| n + 2 * k + 1).collect()
}

/// UNMAP targets: existing mappings (even slots), scattered over the whole range.
pub fn unmap_slots(n: u64) -> Vec<u64> {
    scattered(n).into_iter().map(|i| 2 * i).collect()
}

pub fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap()
}

/// Writes `reqs` (each an ATTACH, MAP or UNMAP) as chains of two descriptors (request, 4-byte
/// writable tail) into the descriptor table from index 0, and makes them available in order.
/// At most `QSIZE / 2` requests; the previous batch must have been consumed.
pub fn post_batch(mem: &Mem, mock: &MockSplitQueue<'_, Mem>, reqs: &[&[u8]]) {
    assert!(reqs.len() <= usize::from(QSIZE / 2));
    let avail = mock.avail_addr();
    let mut idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
    for (j, req) in reqs.iter().enumerate() {
        let j16 = u16::try_from(j).unwrap();
        let buf = REQ_BASE + j as u64 * REQ_STRIDE;
        mem.write_slice(req, GuestAddress(buf)).unwrap();
        let head = 2 * j16;
        let d0 = Descriptor::new(buf, req.len() as u32, 1, head + 1);
        let d1 = Descriptor::new(buf + REQ_STRIDE - 4, 4, 2, 0);
        mock.desc_table()
            .store(head, RawDescriptor::from(d0))
            .unwrap();
        mock.desc_table()
            .store(head + 1, RawDescriptor::from(d1))
            .unwrap();
        mem.write_obj(head, avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        idx = idx.wrapping_add(1);
    }
    mem.write_obj(idx, avail.unchecked_add(2)).unwrap();
}

/// A bare virtio-queue `Queue` on `mock`'s rings (for [`virtio_iommu_device::request`]).
pub fn queue(mock: &MockSplitQueue<'_, Mem>) -> Queue {
    mock.create_queue::<Queue>().unwrap()
}

/// Where the device's queues live (requestq at 0, eventq after it).
pub fn mock_queues(mem: &Mem) -> (MockSplitQueue<'_, Mem>, MockSplitQueue<'_, Mem>) {
    let rq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
    let eq_base = rq.end().unchecked_align_up(4096);
    let eq = MockSplitQueue::create(mem, eq_base, QSIZE);
    assert!(eq.end().0 <= REQ_BASE);
    (rq, eq)
}

/// An `IommuDevice` driven to DRIVER_OK (every offered feature negotiated) whose requestq is
/// `rq`, with endpoint 1 attached to domain 1 and `n` mappings at the even slots, all created
/// through the requestq.
pub fn device_with(
    mem: &Mem,
    rq: &MockSplitQueue<'_, Mem>,
    eq: &MockSplitQueue<'_, Mem>,
    n: u64,
) -> SharedDevice<Mem> {
    let config = config(n);
    let features = config.offered();
    let dev = IommuDevice::new_shared(config, mem.clone()).unwrap();
    {
        let mut d = lock(&dev);
        d.write_status(status::ACKNOWLEDGE | status::DRIVER);
        d.write_driver_features(0, features.bits() as u32);
        d.write_driver_features(1, (features.bits() >> 32) as u32);
        d.write_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        for (i, q) in [(0u16, rq), (1u16, eq)] {
            d.activate_queue(
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
        d.write_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(d.negotiated_features(), features);
    }
    let attach = req_attach();
    run_batch(&dev, mem, rq, &[attach.as_bytes()]);
    let batch = u64::from(QSIZE / 2);
    let mut i = 0;
    while i < n {
        let reqs: Vec<ReqMap> = (i..n.min(i + batch)).map(|k| req_map(2 * k)).collect();
        let bytes: Vec<&[u8]> = reqs.iter().map(|r| r.as_bytes()).collect();
        run_batch(&dev, mem, rq, &bytes);
        i += batch;
    }
    let d = lock(&dev);
    assert_eq!(d.state().mapping_count() as u64, n);
    assert_eq!(d.counters().requests_failed, 0);
    drop(d);
    dev
}

fn run_batch(dev: &SharedDevice<Mem>, mem: &Mem, rq: &MockSplitQueue<'_, Mem>, reqs: &[&[u8]]) {
    post_batch(mem, rq, reqs);
    let done = lock(dev).process_requestq();
    assert_eq!(done, reqs.len());
}

/// Status byte written in the tail of request `j` of the last batch.
pub fn tail_status(mem: &Mem, j: usize) -> u8 {
    mem.read_obj(GuestAddress(
        REQ_BASE + j as u64 * REQ_STRIDE + REQ_STRIDE - 4,
    ))
    .unwrap()
}

/// Callgrind arguments of every benchmark: instrumentation starts off, so the setups (up to 1M
/// MAP requests through a virtqueue) run several times faster under Valgrind; each setup turns
/// it on as its last step ([`start_instrumentation`]), before the measured function is entered.
/// Instruction counts of the measured function are unaffected (the default entry point still
/// limits collection to it).
pub const CALLGRIND_ARGS: [&str; 1] = ["--instr-atstart=no"];

/// `CALLGRIND_START_INSTRUMENTATION` (valgrind/callgrind.h), as Valgrind's client-request
/// sequence for x86_64; a no-op on a real CPU, and on other architectures (where the setups
/// then simply run instrumented, slower, with the same counts if `--instr-atstart=no` is left
/// out).
pub fn start_instrumentation() {
    #[cfg(target_arch = "x86_64")]
    {
        // VG_USERREQ_TOOL_BASE('C', 'T') + 4: VG_USERREQ__START_INSTRUMENTATION.
        const START_INSTRUMENTATION: usize = ((b'C' as usize) << 24 | (b'T' as usize) << 16) + 4;
        let args: [usize; 6] = [START_INSTRUMENTATION, 0, 0, 0, 0, 0];
        // SAFETY: Valgrind's "special instruction preamble": `rdi` is rotated by 3 + 13 + 61 +
        // 51 = 128 bits (unchanged) and `xchg rbx, rbx` exchanges a register with itself, so a
        // real CPU changes nothing but flags; Valgrind recognises the sequence, reads the six
        // words at `rax` (a live local array) and puts its answer in `rdx`.
        unsafe {
            std::arch::asm!(
                "rol rdi, 3",
                "rol rdi, 13",
                "rol rdi, 61",
                "rol rdi, 51",
                "xchg rbx, rbx",
                in("rax") args.as_ptr(),
                inlateout("rdx") 0usize => _,
                options(nostack),
            );
        }
    }
}
