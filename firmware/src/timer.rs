//! Time from the ARM generic timer (`CNTPCT_EL0` counting at `CNTFRQ_EL0` Hz).

use crate::arch;

/// The current value of the physical counter.
pub fn now_ticks() -> u64 {
    arch::cntpct_el0()
}

/// Counter frequency in Hz (62.5 MHz on QEMU `-M virt`; never reported as 0).
pub fn ticks_per_second() -> u64 {
    arch::cntfrq_el0().max(1)
}

/// Converts milliseconds to counter ticks (saturating).
pub fn ms_to_ticks(ms: u64) -> u64 {
    let ticks = u128::from(ms) * u128::from(ticks_per_second()) / 1000;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// Converts counter ticks to whole microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(ticks_per_second())) as u64
}

/// A point in time after which [`Deadline::expired`] returns true.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Deadline {
    at_tick: u64,
}

impl Deadline {
    /// A deadline `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Deadline {
        Deadline {
            at_tick: now_ticks().saturating_add(ms_to_ticks(ms)),
        }
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        now_ticks() >= self.at_tick
    }
}

/// Busy-waits for `ms` milliseconds.
pub fn delay_ms(ms: u64) {
    let deadline = Deadline::after_ms(ms);
    while !deadline.expired() {
        core::hint::spin_loop();
    }
}
