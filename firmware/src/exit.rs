//! Ending the run: semihosting `SYS_EXIT` (QEMU runs with `-semihosting`, the code becomes QEMU's
//! exit status), else PSCI `SYSTEM_OFF` via the conduit named by `/psci` `method` (exit status 0,
//! the code is lost), else parking the CPU in `wfi`.
//!
//! A semihosting or PSCI call that is not available traps (UNDEFINED); the exception handler
//! calls [`continue_after_trap`], which moves on to the next method.

use core::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use smccc::{Hvc, Smc};

/// Conduit for PSCI calls, from the devicetree.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PsciConduit {
    /// `method = "hvc"`.
    Hvc,
    /// `method = "smc"`.
    Smc,
}

/// 0: unknown, 1: hvc, 2: smc.
static CONDUIT: AtomicU8 = AtomicU8::new(0);
/// 0: running; 1: trying semihosting; 2: trying PSCI; 3: parked.
static STAGE: AtomicU8 = AtomicU8::new(0);
/// The code passed to the first [`exit`] call.
static CODE: AtomicI32 = AtomicI32::new(0);

/// Reads the PSCI conduit from `/psci` (`compatible` `arm,psci*`, property `method`).
pub fn init(dtb: &[u8]) -> Option<PsciConduit> {
    let fdt = fdt::Fdt::new(dtb).ok()?;
    let node = fdt.find_node("/psci").or_else(|| {
        fdt.all_nodes().find(|n| {
            n.compatible()
                .is_some_and(|c| c.all().any(|s| s.starts_with("arm,psci")))
        })
    })?;
    let conduit = match node.property("method")?.as_str()? {
        "hvc" => PsciConduit::Hvc,
        "smc" => PsciConduit::Smc,
        _ => return None,
    };
    CONDUIT.store(
        match conduit {
            PsciConduit::Hvc => 1,
            PsciConduit::Smc => 2,
        },
        Ordering::Relaxed,
    );
    Some(conduit)
}

/// Ends the run with `code` as QEMU's exit status.
pub fn exit(code: i32) -> ! {
    if STAGE
        .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        CODE.store(code, Ordering::SeqCst);
        crate::console::flush();
        semihosting::process::exit(code)
    }
    // Called again while exiting (e.g. a panic in the exit path): carry on with the fallbacks.
    continue_after_trap()
}

/// Whether [`exit`] has been called.
pub fn in_progress() -> bool {
    STAGE.load(Ordering::SeqCst) != 0
}

/// Continues an exit whose current method trapped or returned: PSCI `SYSTEM_OFF`, then `wfi`.
pub fn continue_after_trap() -> ! {
    if STAGE.fetch_max(2, Ordering::SeqCst) < 2 {
        crate::console::emergency_print(format_args!(
            "exit: semihosting unavailable; PSCI SYSTEM_OFF (exit code {} is lost)\n",
            CODE.load(Ordering::SeqCst)
        ));
        crate::console::flush();
        let _ = match CONDUIT.load(Ordering::Relaxed) {
            1 => smccc::psci::system_off::<Hvc>(),
            2 => smccc::psci::system_off::<Smc>(),
            _ => Ok(()),
        };
    }
    STAGE.store(3, Ordering::SeqCst);
    crate::console::emergency_print(format_args!("exit: cannot power off, parking the CPU\n"));
    loop {
        crate::arch::wfi();
    }
}
