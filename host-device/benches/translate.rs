//! Translation cost at 1K and 1M mappings, in instructions under Callgrind (gungraun).
//!
//! Each run translates the same fixed pseudo-random sequence of `LOOKUPS` (1024) IOVAs, each in a
//! random one of the domain's mappings, for a 64-byte read. There is no IOTLB in the device, so
//! every call walks the domain's mapping structure ("uncached"). Figures per call are the
//! benchmark's instruction count divided by 1024; `loop_baseline` is the cost of the loop alone.
//! Setup (building the mappings) is not measured. See `BENCHMARKS.md`.
//!
//! Run: `cargo bench -p virtio-iommu-device --bench translate` (needs `gungraun-runner` 0.20.0
//! and Valgrind).

mod common;

use std::hint::black_box;

use common::*;
use gungraun::prelude::*;
use gungraun::Callgrind;
use virtio_iommu_device::device::lock;
use virtio_iommu_device::{Access, EndpointIommu, IommuState, SharedDevice};
use vm_memory::{Bytes, GuestAddress, Iommu, IommuMemory, Permissions};

type Endpoint = EndpointIommu<Mem>;

fn setup_state(n: u64) -> (IommuState, Vec<u64>) {
    let s = state_with(n);
    let iovas = random_iovas(n);
    // The sequence hits mappings: check once, outside the measurement.
    for &iova in &iovas {
        assert_eq!(
            s.translate(ENDPOINT, iova, ACCESS_LEN, Access::READ)
                .unwrap()
                .len(),
            1
        );
    }
    start_instrumentation();
    (s, iovas)
}

fn device(n: u64) -> (SharedDevice<Mem>, Vec<u64>) {
    let mem = mem();
    let (rq, eq) = mock_queues(&mem);
    let dev = device_with(&mem, &rq, &eq, n);
    (dev, random_iovas(n))
}

fn setup_device(n: u64) -> (SharedDevice<Mem>, Vec<u64>) {
    let r = device(n);
    start_instrumentation();
    r
}

fn setup_endpoint(n: u64) -> (Endpoint, Vec<u64>) {
    let (dev, iovas) = device(n);
    start_instrumentation();
    (EndpointIommu::new(dev, ENDPOINT), iovas)
}

fn setup_iommu_memory(n: u64) -> (IommuMemory<Mem, Endpoint>, Vec<u64>) {
    let (dev, iovas) = device(n);
    let backend = lock(&dev).memory().clone();
    let mem = IommuMemory::new(backend, EndpointIommu::new(dev, ENDPOINT), true, ());
    start_instrumentation();
    (mem, iovas)
}

// The loop of the other benchmarks with nothing in it.
#[library_benchmark]
#[bench::lookups(args = (N_1K), setup = setup_state)]
fn loop_baseline(input: (IommuState, Vec<u64>)) -> (IommuState, Vec<u64>) {
    for &iova in &input.1 {
        black_box(iova);
    }
    input
}

// `IommuState::translate`: the lookup every other path uses (returns a `Vec<Piece>`, freed
// here as a caller would).
#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_state)]
#[bench::mappings_1m(args = (N_1M), setup = setup_state)]
fn state_translate(input: (IommuState, Vec<u64>)) -> (IommuState, Vec<u64>) {
    let (state, iovas) = &input;
    for &iova in iovas {
        let _ = black_box(state.translate(ENDPOINT, black_box(iova), ACCESS_LEN, Access::READ));
    }
    input
}

// `IommuState::translate_each`: the same translation without allocating (each piece goes to a
// closure): the fast path for device models translating every access.
#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_state)]
#[bench::mappings_1m(args = (N_1M), setup = setup_state)]
fn state_translate_each(input: (IommuState, Vec<u64>)) -> (IommuState, Vec<u64>) {
    let (state, iovas) = &input;
    for &iova in iovas {
        let _ = black_box(state.translate_each(
            ENDPOINT,
            black_box(iova),
            ACCESS_LEN,
            Access::READ,
            |p| {
                black_box(p);
            },
        ));
    }
    input
}

// `IommuDevice::translate` on the shared device: lock, translate, fault bookkeeping, unlock.
#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_device)]
#[bench::mappings_1m(args = (N_1M), setup = setup_device)]
fn device_translate(input: (SharedDevice<Mem>, Vec<u64>)) -> (SharedDevice<Mem>, Vec<u64>) {
    let (dev, iovas) = &input;
    for &iova in iovas {
        let _ = black_box(lock(dev).translate(ENDPOINT, black_box(iova), ACCESS_LEN, Access::READ));
    }
    input
}

// vm-memory's `Iommu::translate` on `EndpointIommu`, consuming the returned `MappedRange`s.
#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_endpoint)]
#[bench::mappings_1m(args = (N_1M), setup = setup_endpoint)]
fn endpoint_iommu_translate(input: (Endpoint, Vec<u64>)) -> (Endpoint, Vec<u64>) {
    let (ep, iovas) = &input;
    for &iova in iovas {
        let it = ep
            .translate(
                GuestAddress(black_box(iova)),
                ACCESS_LEN as usize,
                Permissions::Read,
            )
            .unwrap();
        for r in it {
            black_box(r);
        }
    }
    input
}

// A 64-byte DMA read through `IommuMemory` (translation plus the copy), as a device model
// behind the IOMMU does it.
#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_iommu_memory)]
#[bench::mappings_1m(args = (N_1M), setup = setup_iommu_memory)]
fn iommu_memory_read(
    input: (IommuMemory<Mem, Endpoint>, Vec<u64>),
) -> (IommuMemory<Mem, Endpoint>, Vec<u64>) {
    let (mem, iovas) = &input;
    let mut buf = [0u8; ACCESS_LEN as usize];
    for &iova in iovas {
        mem.read_slice(&mut buf, GuestAddress(black_box(iova)))
            .unwrap();
        black_box(&buf);
    }
    input
}

library_benchmark_group!(
    name = translate,
    benchmarks = [
        loop_baseline,
        state_translate,
        state_translate_each,
        device_translate,
        endpoint_iommu_translate,
        iommu_memory_read
    ]
);

main!(
    config = LibraryBenchmarkConfig::default().tool(Callgrind::with_args(CALLGRIND_ARGS)),
    library_benchmark_groups = translate
);
