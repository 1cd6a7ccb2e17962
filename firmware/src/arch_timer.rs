//! The generic timer's interrupts as the devicetree describes them.
//!
//! The `arm,armv8-timer` (or `arm,armv7-timer`) node's `interrupts` lists, in the order of the
//! `arm,arch_timer` binding, the secure physical, non-secure physical, virtual and hypervisor
//! physical timers (and optionally the hypervisor virtual one). Each entry is a GIC specifier of
//! the interrupt parent's `#interrupt-cells` cells: type (1 = PPI), number, flags; a PPI's INTID
//! is 16 + number. QEMU `-M virt` gives PPIs 13, 14, 11, 10 (INTIDs 29, 30, 27, 26).

/// INTIDs of the two timers the firmware uses (both PPIs, so 16..=31).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct TimerIntids {
    /// The EL1 (non-secure) physical timer, `CNTP_*` (drives `crate::tick`).
    pub el1_physical: u32,
    /// The EL1 virtual timer, `CNTV_*` (bounds `crate::gic::wait_for`).
    pub el1_virtual: u32,
}

/// The INTIDs found by the first successful [`intids`].
static FOUND: spin::Once<TimerIntids> = spin::Once::new();

/// The timers' INTIDs from the devicetree `dtb` (read once, then remembered).
///
/// # Errors
///
/// The blob does not parse; there is no `arm,armv8-timer`/`arm,armv7-timer` node, or it has
/// fewer than 3 `interrupts` entries; its interrupt parent (its own `interrupt-parent`, else the
/// root's) is missing, is not an interrupt controller or has fewer than 3 `#interrupt-cells`;
/// an entry used is not a PPI or its number is above 15.
pub fn intids(dtb: &[u8]) -> Result<TimerIntids, &'static str> {
    if let Some(found) = FOUND.get() {
        return Ok(*found);
    }
    let found = read(dtb)?;
    Ok(*FOUND.call_once(|| found))
}

fn read(dtb: &[u8]) -> Result<TimerIntids, &'static str> {
    let fdt = fdt::Fdt::new(dtb).map_err(|_| "devicetree does not parse")?;
    let timer = fdt
        .find_compatible(&["arm,armv8-timer", "arm,armv7-timer"])
        .ok_or("no arm,armv8-timer node")?;
    let phandle = |node: fdt::node::FdtNode<'_, '_>| {
        node.property("interrupt-parent")
            .and_then(|p| p.value.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let parent = phandle(timer)
        .or_else(|| fdt.find_node("/").and_then(phandle))
        .ok_or("timer: no interrupt-parent")?;
    let gic = fdt
        .find_phandle(parent)
        .ok_or("timer: interrupt-parent names no node")?;
    if gic.property("interrupt-controller").is_none() {
        return Err("timer: interrupt-parent is not an interrupt controller");
    }
    let cells = gic.interrupt_cells().ok_or("timer: no #interrupt-cells")?;
    if cells < 3 {
        return Err("timer: fewer than 3 #interrupt-cells (not a GIC specifier)");
    }
    let value = timer
        .property("interrupts")
        .ok_or("timer: no interrupts")?
        .value;
    let entry = |i: usize| -> Result<u32, &'static str> {
        let at = i * cells * 4;
        let cell = |c: usize| {
            value
                .get(at + c * 4..at + c * 4 + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or("timer: fewer than 3 interrupts entries")
        };
        cell(2)?; // the flags cell: the entry must be whole
        match (cell(0)?, cell(1)?) {
            (1, n @ 0..=15) => Ok(16 + n),
            (1, _) => Err("timer: PPI number above 15"),
            _ => Err("timer: interrupt is not a PPI"),
        }
    };
    Ok(TimerIntids {
        el1_physical: entry(1)?,
        el1_virtual: entry(2)?,
    })
}
