//! A PCI function as a register-level model: its configuration space, its BARs and its
//! interrupts. The vfio-user server (`crate::server`, feature `vfio-user`) serves any
//! [`PciFunction`]: the virtio-pci transport over a [`crate::transport::VirtioCore`], or the
//! `edu` DMA engine.

use vm_memory::GuestMemoryMmap;

/// Size in bytes of the configuration space a function models (PCI Express: 4 KiB; the
/// function answers zeros past its 256-byte conventional part unless it has extended
/// capabilities).
pub const CONFIG_SPACE_SIZE: u64 = 4096;

/// One base address register of a function.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Bar {
    /// Size in bytes (a power of two, at least 16).
    pub size: u64,
    /// 64-bit memory BAR (takes this BAR and the next).
    pub is_64bit: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// Where a function's interrupts go (the vfio-user server: eventfds from SET_IRQS).
pub trait InterruptSink: Send + Sync {
    /// Signals MSI-X vector `vector`. The function has already checked that MSI-X is enabled
    /// and the vector neither masked (per-vector or by the function mask bit) nor out of range.
    fn msix(&self, vector: u16);
    /// Sets the level of the function's INTx pin (asserted = `true`).
    fn intx(&self, asserted: bool);
}

/// A PCI function, as seen from the bus.
///
/// Every method must accept any offset, width and value without panicking: the accesses come
/// from the guest (through QEMU). Invalid reads give zeros (or all ones where PCI says so);
/// invalid writes are ignored.
pub trait PciFunction: Send {
    /// Reads `data.len()` (1, 2, 4 or 8) bytes of configuration space at byte `offset`.
    fn config_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes configuration space.
    fn config_write(&mut self, offset: u64, data: &[u8]);
    /// BAR `index` (0..6), or `None` if the function does not implement it (the upper half of
    /// a 64-bit BAR is `None`).
    fn bar(&self, index: u8) -> Option<Bar>;
    /// Reads `data.len()` bytes at byte `offset` of BAR `index`.
    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]);
    /// Writes at byte `offset` of BAR `index`.
    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]);
    /// Number of MSI-X vectors (0: no MSI-X capability).
    fn msix_vectors(&self) -> u16;
    /// Installs the interrupt sink (`None`: interrupts are dropped).
    fn set_interrupt_sink(&mut self, sink: Option<std::sync::Arc<dyn InterruptSink>>);
    /// The guest memory the function reaches, built from the client's DMA mappings; replaces
    /// the previous one (empty until the first DMA_MAP).
    fn set_guest_memory(&mut self, mem: GuestMemoryMmap);
    /// Function-level reset (vfio-user DEVICE_RESET): back to the power-on state.
    fn reset(&mut self);
    /// Told by a server whose client emulates the MSI-X table and PBA itself (a vfio-user
    /// client: QEMU keeps the table in its own memory, so the guest's writes to it never reach
    /// the function, and sends per-vector MASK/UNMASK through SET_IRQS instead). With
    /// `in_client` the function ignores its own table's per-vector mask bits and leaves
    /// per-vector masking to the [`InterruptSink`]; MSI-X enable and the function mask bit in
    /// the capability's Message Control, which the client writes through, still count.
    /// Default: nothing (functions without MSI-X).
    fn set_msix_table_in_client(&mut self, in_client: bool) {
        let _ = in_client;
    }
    /// Queue notifications received so far (virtio-pci notify-region writes), for the server's
    /// summary. Default: 0 (functions without virtqueues).
    fn notifications(&self) -> u64 {
        0
    }
    /// Runs pending work that a register write deferred (owed rounds of queue processing),
    /// returning whether more remains. The server calls it between messages.
    fn poll(&mut self) -> bool {
        false
    }
}
