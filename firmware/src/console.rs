//! Console output on the PL011 UART named by the devicetree, plus the `log` backend.
//!
//! [`print!`](crate::print) and [`println!`](crate::println) may be used from anywhere; before
//! [`init`] (or if no UART was found) their output is dropped.

use arm_pl011_uart::{PL011Registers, Uart, UniqueMmioPointer};
use core::fmt::{self, Write};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;

/// The UART, once found.
static UART: Mutex<Option<Uart<'static>>> = Mutex::new(None);

/// Why no console UART could be set up.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ConsoleError {
    /// Neither `/chosen/stdout-path` nor any `arm,pl011` node names a usable UART.
    NoUart,
    /// The UART's `reg` is not in device memory of the identity map.
    NotMapped(u64),
}

/// Prints to the console (dropped before [`init`]).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to the console (dropped before [`init`]).
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::_print(::core::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}

/// Finds the console UART in the devicetree: the node `/chosen/stdout-path` names (options after
/// `:` ignored) if it is an `arm,pl011`, else the first `arm,pl011` node. Returns its base address.
pub fn find_uart(fdt: &fdt::Fdt<'_>) -> Result<u64, ConsoleError> {
    let is_pl011 = |node: &fdt::node::FdtNode<'_, '_>| {
        node.compatible()
            .is_some_and(|c| c.all().any(|s| s == "arm,pl011"))
    };
    let from_chosen = fdt
        .find_node("/chosen")
        .and_then(|chosen| chosen.property("stdout-path"))
        .and_then(|p| p.as_str())
        .map(|path| path.split(':').next().unwrap_or(path))
        .and_then(|path| fdt.find_node(path))
        .filter(is_pl011);
    let node = from_chosen
        .or_else(|| fdt.all_nodes().find(is_pl011))
        .ok_or(ConsoleError::NoUart)?;
    let region = node
        .reg()
        .and_then(|mut reg| reg.next())
        .ok_or(ConsoleError::NoUart)?;
    let base = region.starting_address as u64;
    let size = region.size.unwrap_or(0x1000) as u64;
    if crate::mmu::memory_type(base, size) != Some(crate::mmu::MemoryType::Device) {
        return Err(ConsoleError::NotMapped(base));
    }
    Ok(base)
}

/// Sets up the console from the devicetree and installs the `log` logger. Returns the UART base.
pub fn init(dtb: &[u8]) -> Result<u64, ConsoleError> {
    let fdt = fdt::Fdt::new(dtb).map_err(|_| ConsoleError::NoUart)?;
    let base = find_uart(&fdt)?;
    let registers = NonNull::new(base as *mut PL011Registers).ok_or(ConsoleError::NoUart)?;
    // SAFETY: `base` is the PL011 register block from the devicetree, mapped as device memory
    // (checked by `find_uart`), valid for the program's lifetime, and this is the only place that
    // creates a pointer to it (a second `init` replaces the first `Uart`).
    let uart = Uart::new(unsafe { UniqueMmioPointer::new(registers) });
    *UART.lock() = Some(uart);
    init_logger();
    Ok(base)
}

/// Implementation detail of [`print!`](crate::print); not for direct use.
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    if let Some(uart) = UART.lock().as_mut() {
        // Writing to the UART cannot fail.
        let _ = uart.write_fmt(args);
    }
}

/// Prints even if the console lock is held (for panic and exception handlers, which may have
/// interrupted a print on this single CPU). Without a UART, falls back to semihosting SYS_WRITEC.
pub fn emergency_print(args: fmt::Arguments<'_>) {
    if UART.is_locked() {
        // SAFETY: single-CPU firmware with interrupts masked: the holder is the code this panic or
        // exception interrupted, which will never resume; the UART itself has no state to corrupt
        // beyond an interleaved line.
        unsafe { UART.force_unlock() };
    }
    let mut guard = UART.lock();
    match guard.as_mut() {
        Some(uart) => {
            let _ = uart.write_fmt(args);
        }
        None => {
            drop(guard);
            let _ = SemihostingWriter::acquire().map(|mut w| w.write_fmt(args));
        }
    }
}

/// Waits until the UART has sent everything (before the machine is switched off).
pub fn flush() {
    if let Some(uart) = UART.try_lock() {
        if let Some(uart) = uart.as_ref() {
            let deadline = crate::timer::Deadline::after_ms(100);
            while uart.is_busy() && !deadline.expired() {}
        }
    }
}

/// Writes through semihosting `SYS_WRITEC`, one byte at a time; re-entry (a semihosting call that
/// trapped because `-semihosting` is off) drops the output instead of recursing.
struct SemihostingWriter;

/// Set while a semihosting write is in progress.
static SEMIHOSTING_BUSY: AtomicBool = AtomicBool::new(false);

impl SemihostingWriter {
    fn acquire() -> Option<Self> {
        (!SEMIHOSTING_BUSY.swap(true, Ordering::Acquire)).then_some(Self)
    }
}

impl Drop for SemihostingWriter {
    fn drop(&mut self) {
        SEMIHOSTING_BUSY.store(false, Ordering::Release);
    }
}

impl Write for SemihostingWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(semihosting::sys::arm_compat::sys_writec);
        Ok(())
    }
}

/// The `log` backend: `[LEVEL] message` on the console.
struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            println!("[{}] {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger at level `Info` (change with `log::set_max_level`).
fn init_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
