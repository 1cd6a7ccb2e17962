//! Stack use of bringing the guest driver up: `VirtIOIommu::new`, ATTACH, MAP, PROBE, UNMAP and
//! drop, against the in-process device (whose request processing runs inside `notify`, on the
//! same stack, so its frames are counted too).
//!
//! - `the_driver_comes_up_on_a_16_kib_stack`: the bring-up on a thread of 16 KiB of stack. A
//!   stack overflow hits the thread's guard page and aborts the test binary. Release only (see
//!   the test).
//! - `driver_bring_up_stack_use_is_measured`: the bring-up's peak stack use in bytes, measured
//!   by painting (see [`measure`]) on a large thread, printed and bounded. The figures are in
//!   BENCHMARKS.md ("Stack use of the driver").

use std::hint::black_box;
use std::mem::size_of;
use std::thread;

use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::DeviceConfig;
use virtio_iommu_driver::wire::MapFlags;
use virtio_iommu_driver::{ProbeProperty, VirtIOIommu};

const KIB: usize = 1024;

fn bench() -> TestBed {
    TestBed::new(
        DeviceConfig::builder()
            .endpoints([8, 16])
            .resv_region(16, ResvRegion::msi(0x0802_0000, 0x0802_0fff))
            .build()
            .unwrap(),
    )
}

/// `new` + ATTACH + MAP + PROBE + UNMAP + drop; checks every outcome.
#[inline(never)]
fn bring_up(bed: &TestBed) {
    bed.make_current();
    let mut drv = bed.driver().expect("VirtIOIommu::new");
    drv.attach(1, 16).expect("ATTACH");
    let page = bed.alloc(4096).expect("a RAM page");
    drv.map(
        1,
        0x10_0000,
        0x10_0fff,
        page,
        MapFlags::READ | MapFlags::WRITE,
    )
    .expect("MAP");
    let mut regions = 0;
    drv.probe(16, |p| {
        if let ProbeProperty::ResvMem(r) = p {
            assert_eq!((r.start, r.end), (0x0802_0000, 0x0802_0fff));
            regions += 1;
        }
    })
    .expect("PROBE");
    assert_eq!(regions, 1, "PROBE reported the MSI region");
    drv.unmap(1, 0x10_0000, 0x10_0fff).expect("UNMAP");
    drop(black_box(drv));
}

const PATTERN: u64 = 0x5a5a_c3c3_a5a5_3c3c;
/// Bytes painted below the caller's frame; the thread running [`measure`] has more than this.
const PAINT: usize = 512 * KIB;
/// Bytes just below the painting function's own frame left unpainted (that frame, and the
/// x86-64 red zone of 128 bytes).
const SKIP: usize = 4 * KIB;

/// The address of a local of the caller's frame: its stack pointer, within a few hundred bytes.
#[inline(never)]
fn stack_pointer() -> usize {
    let marker = 0u64;
    black_box(&marker) as *const u64 as usize
}

/// Writes [`PATTERN`] over the `PAINT` bytes below `top - SKIP`.
#[inline(never)]
fn paint(top: usize) {
    let (low, high) = (top - PAINT, top - SKIP);
    for at in (low..high).step_by(8) {
        // SAFETY: `low..high` lies in this thread's stack (the thread has more than `PAINT`
        // bytes of it, and `top` is near the caller's stack pointer), below every live frame
        // (this function's own frame is above `high`): memory no Rust object occupies now.
        // Volatile, so the writes are not removed.
        unsafe { std::ptr::write_volatile(at as *mut u64, PATTERN) };
    }
}

/// The lowest address in `top - PAINT .. top - SKIP` that no longer holds [`PATTERN`].
#[inline(never)]
fn lowest_touched(top: usize) -> Option<usize> {
    let (low, high) = (top - PAINT, top - SKIP);
    (low..high).step_by(8).find(|&at| {
        // SAFETY: as in `paint`: stack memory of this thread below every live frame.
        unsafe { std::ptr::read_volatile(at as *const u64) != PATTERN }
    })
}

/// Peak stack use of `f` in bytes: the stack is painted below the caller's frame, `f` runs,
/// and the distance from the caller's stack pointer to the lowest overwritten word is the
/// result. Exact to a word for frames deeper than `SKIP`; `None` when `f` used less than that.
fn measure(f: impl FnOnce()) -> Option<usize> {
    let top = stack_pointer();
    paint(top);
    f();
    lowest_touched(top).map(|low| top - low)
}

// Unoptimised, virtio-drivers' `VirtQueue::<_, 256>::new` alone takes 34 KiB of stack (its
// temporaries are not merged; it is generic, so it is compiled in the caller's profile): the
// 16 KiB bound holds for optimised builds. `cargo test --release -p virtio-iommu-device --test
// stack` runs it.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "debug builds need about 40 KiB (virtio-drivers' VirtQueue::new); run with --release"
)]
fn the_driver_comes_up_on_a_16_kib_stack() {
    let bed = bench();
    thread::scope(|s| {
        thread::Builder::new()
            .name("16-KiB-stack".into())
            .stack_size(16 * KIB)
            .spawn_scoped(s, || bring_up(&bed))
            .expect("spawn")
            .join()
            .expect("bring-up on 16 KiB of stack");
    });
}

#[test]
fn driver_bring_up_stack_use_is_measured() {
    let bed = bench();
    let used = thread::scope(|s| {
        thread::Builder::new()
            .stack_size(PAINT + 256 * KIB)
            .spawn_scoped(s, || measure(|| bring_up(&bed)))
            .expect("spawn")
            .join()
            .expect("bring-up")
    })
    .expect("the bring-up used more than SKIP bytes of stack");
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "# stack: driver bring-up used {used} bytes ({profile}, host, with the in-process \
         device); size_of::<VirtIOIommu<TestHal, InProcessTransport>>() = {} bytes",
        size_of::<VirtIOIommu<TestHal, InProcessTransport>>()
    );
    // Release: the 16 KiB with room to spare. Debug: a regression bound only (it was
    // 186 KiB before the driver's state moved to the heap).
    let limit = if cfg!(debug_assertions) { 64 } else { 12 } * KIB;
    assert!(used <= limit, "{used} bytes of stack, more than {limit}");
}
