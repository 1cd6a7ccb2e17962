//! Bare-metal aarch64 test firmware for the virtio-iommu driver on QEMU `-M virt`.
//!
//! Boot: aarch64-rt's entry point enables the MMU with the static identity map of [`mmu`],
//! enables FP/SIMD (CPACR_EL1.FPEN) before any Rust code, zeroes `.bss`, sets up the boot stack
//! and the exception vector, then calls [`main`]. `main` sets up the console (from the DT), the
//! heap, enumerates PCI and runs [`cases::run`] — or, when the kernel command line (QEMU
//! `-append`, `/chosen/bootargs`) says `bench` or `dma-modes`, [`bench::run_bench`] or
//! [`bench::dma_modes::run`].
//!
//! Exit status (through semihosting): 0 all cases passed, 1 a case failed (or none ran) or PCI
//! enumeration failed, 2 panic, 3 unexpected exception, 4 no usable devicetree/console/heap.

#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

#[macro_use]
pub mod console;
pub mod arch;
pub mod arch_timer;
pub mod blkio;
pub mod dtb;
pub mod exceptions;
pub mod exit;
pub mod fwcfg;
pub mod gic;
pub mod hal;
pub mod heap;
pub mod iommu_dev;
pub mod mmu;
pub mod pci;
pub mod stack;
pub mod table_loader;
pub mod tick;
pub mod timer;

pub mod bench;
pub mod cases;

use aarch64_rt::entry;

/// Boot stack size in 4 KiB pages (512 KiB).
const BOOT_STACK_PAGES: usize = 128;

entry!(main, BOOT_STACK_PAGES);

/// Exit status for platform set-up failures (no DTB, console or heap).
const SETUP_FAILURE: i32 = 4;

fn main(x0: u64, _x1: u64, _x2: u64, _x3: u64) -> ! {
    // SAFETY: first thing in `main`: aarch64-rt's `el1` entry code set up EL1's identity map
    // (`mmu`) and VBAR_EL1, and nothing here depends on the exception level yet.
    let entered_el = unsafe { arch::leave_el2() };
    let start = timer::now_ticks();
    dtb::set_boot_argument(x0);
    let dtb = dtb::dtb();
    if let Err(e) = console::init(dtb) {
        console::emergency_print(format_args!("console: no usable PL011 ({e:?})\n"));
        exit::exit(SETUP_FAILURE);
    }
    if exit::init(dtb).is_none() {
        log::warn!("no /psci method: exit falls back to wfi if semihosting is unavailable");
    }
    println!(
        "firmware: EL{}{}, MMU {}, DTB at {:#x} ({} bytes), counter {} Hz",
        arch::current_el(),
        if entered_el == 2 {
            " (entered at EL2 and left it)"
        } else {
            ""
        },
        if mmu::is_enabled() {
            "on (40-bit identity map)"
        } else {
            "OFF"
        },
        dtb.as_ptr() as u64,
        dtb.len(),
        timer::ticks_per_second()
    );
    match heap::init(dtb) {
        Ok((heap_start, heap_end)) => println!(
            "firmware: image end {:#x}, heap {heap_start:#x}..{heap_end:#x} ({} MiB)",
            heap::image_end(),
            (heap_end - heap_start) >> 20
        ),
        Err(e) => {
            println!("firmware: heap: {e:?}");
            exit::exit(SETUP_FAILURE);
        }
    }
    let mut pci_bus = match pci::enumerate(dtb) {
        Ok(bus) => bus,
        Err(e) => {
            println!("firmware: PCI enumeration failed: {e}");
            exit::exit(1);
        }
    };
    println!(
        "firmware: platform ready after {} us",
        timer::ticks_to_us(timer::now_ticks().wrapping_sub(start))
    );
    let (passed, failed) = match bench::mode(dtb) {
        bench::Mode::Cases => cases::run(dtb, &mut pci_bus),
        bench::Mode::Bench => exit::exit(bench::run_bench(dtb, &mut pci_bus)),
        bench::Mode::DmaModes => bench::dma_modes::run(dtb, &mut pci_bus),
        bench::Mode::BlkBench => bench::blk_throughput::run(dtb, &mut pci_bus),
    };
    println!("firmware: {passed} passed, {failed} failed");
    exit::exit(if failed == 0 && passed > 0 { 0 } else { 1 })
}
