//! MAP and UNMAP processing at 1K and 1M existing mappings, in instructions under Callgrind
//! (gungraun).
//!
//! Each run processes `OPS` (256) requests on one-page mappings scattered over the whole mapped
//! range: MAPs into free pages between existing mappings, UNMAPs of existing mappings (each
//! removing exactly one). Figures per request are the instruction count divided by 256. Three
//! levels:
//! - `state_*`: `IommuState::map` / `unmap` (the semantics alone); `state_map_clustered` maps
//!   256 consecutive free pages instead, so that leaf splits are part of the figure;
//! - `chain_*`: the request path of one chain: pop it from a virtio-queue `Queue`
//!   (`MockSplitQueue` rings), `request::handle_request` (framing, reading the request through
//!   virtio-queue's `Reader`, the state change, writing the tail with its `Writer`), `add_used`;
//! - `device_*`: `IommuDevice::process_requestq` with the 256 chains available (the above plus
//!   the device's counters and interrupt).
//!
//! Setup (building the mappings, writing the chains) is not measured. See `BENCHMARKS.md`.
//!
//! Run: `cargo bench -p virtio-iommu-device --bench requests` (needs `gungraun-runner` 0.20.0
//! and Valgrind).

mod common;

use std::hint::black_box;

use common::*;
use gungraun::prelude::*;
use gungraun::Callgrind;
use virtio_iommu_device::device::lock;
use virtio_iommu_device::request::{handle_request, Outcome};
use virtio_iommu_device::{IommuState, SharedDevice};
use virtio_iommu_driver::wire::{ReqMap, ReqUnmap, Status};
use virtio_queue::{Queue, QueueT};
use zerocopy::IntoBytes;

fn setup_state_map(n: u64) -> (IommuState, Vec<ReqMap>) {
    let r = (
        state_with(n),
        map_slots(n).into_iter().map(req_map).collect(),
    );
    start_instrumentation();
    r
}

fn setup_state_map_clustered(n: u64) -> (IommuState, Vec<ReqMap>) {
    let r = (
        state_with(n),
        map_slots_clustered(n).into_iter().map(req_map).collect(),
    );
    start_instrumentation();
    r
}

fn setup_state_unmap(n: u64) -> (IommuState, Vec<ReqUnmap>) {
    let r = (
        state_with(n),
        unmap_slots(n).into_iter().map(req_unmap).collect(),
    );
    start_instrumentation();
    r
}

#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_state_map)]
#[bench::mappings_1m(args = (N_1M), setup = setup_state_map)]
fn state_map(mut input: (IommuState, Vec<ReqMap>)) -> (IommuState, Vec<ReqMap>) {
    let (state, reqs) = &mut input;
    for r in reqs.iter() {
        assert_eq!(state.map(black_box(r)), Status::Ok);
    }
    input
}

// 256 MAPs of consecutive free pages in the middle of the range: the same few leaves, so the
// figure includes their splits.
#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_state_map_clustered)]
#[bench::mappings_1m(args = (N_1M), setup = setup_state_map_clustered)]
fn state_map_clustered(mut input: (IommuState, Vec<ReqMap>)) -> (IommuState, Vec<ReqMap>) {
    let (state, reqs) = &mut input;
    for r in reqs.iter() {
        assert_eq!(state.map(black_box(r)), Status::Ok);
    }
    input
}

#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_state_unmap)]
#[bench::mappings_1m(args = (N_1M), setup = setup_state_unmap)]
fn state_unmap(mut input: (IommuState, Vec<ReqUnmap>)) -> (IommuState, Vec<ReqUnmap>) {
    let (state, reqs) = &mut input;
    for r in reqs.iter() {
        assert_eq!(state.unmap(black_box(r)), Status::Ok);
    }
    input
}

/// A state with `n` mappings and a queue holding `reqs` as available chains.
struct Chains {
    state: IommuState,
    mem: Mem,
    queue: Queue,
    count: usize,
}

fn chains(n: u64, reqs: &[&[u8]]) -> Chains {
    let mem = mem();
    let queue = {
        let (rq, _) = mock_queues(&mem);
        post_batch(&mem, &rq, reqs);
        queue(&rq)
    };
    let state = state_with(n);
    start_instrumentation();
    Chains {
        state,
        mem,
        queue,
        count: reqs.len(),
    }
}

fn setup_chain_map(n: u64) -> Chains {
    let reqs: Vec<ReqMap> = map_slots(n).into_iter().map(req_map).collect();
    chains(n, &reqs.iter().map(|r| r.as_bytes()).collect::<Vec<_>>())
}

fn setup_chain_unmap(n: u64) -> Chains {
    let reqs: Vec<ReqUnmap> = unmap_slots(n).into_iter().map(req_unmap).collect();
    chains(n, &reqs.iter().map(|r| r.as_bytes()).collect::<Vec<_>>())
}

fn process_chains(mut c: Chains) -> Chains {
    let Chains {
        state, mem, queue, ..
    } = &mut c;
    let mut done = 0;
    while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
        let head = chain.head_index();
        let h = handle_request(state, &*mem, chain, usize::from(QSIZE));
        assert!(matches!(
            h.outcome,
            Outcome::Completed {
                status: Status::Ok,
                ..
            }
        ));
        queue.add_used(&*mem, head, h.used_len).unwrap();
        done += 1;
    }
    assert_eq!(done, c.count);
    c
}

#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_chain_map)]
#[bench::mappings_1m(args = (N_1M), setup = setup_chain_map)]
fn chain_map(c: Chains) -> Chains {
    process_chains(c)
}

#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_chain_unmap)]
#[bench::mappings_1m(args = (N_1M), setup = setup_chain_unmap)]
fn chain_unmap(c: Chains) -> Chains {
    process_chains(c)
}

/// A device with `n` mappings (created through its requestq) and `reqs` available on it.
fn device(n: u64, reqs: &[&[u8]]) -> (SharedDevice<Mem>, Mem) {
    let mem = mem();
    let dev = {
        let (rq, eq) = mock_queues(&mem);
        let dev = device_with(&mem, &rq, &eq, n);
        post_batch(&mem, &rq, reqs);
        dev
    };
    start_instrumentation();
    (dev, mem)
}

fn setup_device_map(n: u64) -> (SharedDevice<Mem>, Mem) {
    let reqs: Vec<ReqMap> = map_slots(n).into_iter().map(req_map).collect();
    device(n, &reqs.iter().map(|r| r.as_bytes()).collect::<Vec<_>>())
}

fn setup_device_unmap(n: u64) -> (SharedDevice<Mem>, Mem) {
    let reqs: Vec<ReqUnmap> = unmap_slots(n).into_iter().map(req_unmap).collect();
    device(n, &reqs.iter().map(|r| r.as_bytes()).collect::<Vec<_>>())
}

fn process_device(input: (SharedDevice<Mem>, Mem)) -> (SharedDevice<Mem>, Mem) {
    let done = lock(&input.0).process_requestq();
    assert_eq!(done as u64, OPS);
    input
}

/// Outside the measurement: every request was answered `S_OK`.
fn check_device(input: (SharedDevice<Mem>, Mem)) {
    let d = lock(&input.0);
    assert_eq!(d.counters().requests_failed, 0);
    for j in 0..OPS as usize {
        assert_eq!(tail_status(&input.1, j), Status::Ok as u8);
    }
}

#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_device_map, teardown = check_device)]
#[bench::mappings_1m(args = (N_1M), setup = setup_device_map, teardown = check_device)]
fn device_map(input: (SharedDevice<Mem>, Mem)) -> (SharedDevice<Mem>, Mem) {
    process_device(input)
}

#[library_benchmark]
#[bench::mappings_1k(args = (N_1K), setup = setup_device_unmap, teardown = check_device)]
#[bench::mappings_1m(args = (N_1M), setup = setup_device_unmap, teardown = check_device)]
fn device_unmap(input: (SharedDevice<Mem>, Mem)) -> (SharedDevice<Mem>, Mem) {
    process_device(input)
}

library_benchmark_group!(
    name = state,
    benchmarks = [state_map, state_map_clustered, state_unmap]
);

library_benchmark_group!(name = chain, benchmarks = [chain_map, chain_unmap]);

library_benchmark_group!(name = device, benchmarks = [device_map, device_unmap]);

main!(
    config = LibraryBenchmarkConfig::default().tool(Callgrind::with_args(CALLGRIND_ARGS)),
    library_benchmark_groups = [state, chain, device]
);
