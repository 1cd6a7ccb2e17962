//! Interrupt routing of the virtio-pci transport: the MSI-X table and pending-bit array
//! (PCI Local Bus 3.0 §6.8.2), the virtio vector assignments (virtio v1.3 §4.1.4.3,
//! §4.1.5.1.2), the ISR status byte and the INTx pin (§4.1.4.5).
//!
//! [`Interrupts`] lives behind an `Arc<Mutex<_>>` shared with the interrupt handler installed in
//! the device core: the core calls the handler from inside its own methods (with a shared core:
//! while its lock is held), so the handler only locks this state and never calls the core. The
//! transport, in turn, never calls the core while it holds this lock.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::function::InterruptSink;
use crate::transport::InterruptCause;

use super::NO_VECTOR;

/// Size in bytes of one MSI-X table entry (address low, address high, data, vector control).
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the vector is masked.
const ENTRY_MASKED: u32 = 1;
/// ISR status bit 0: a virtqueue interrupt (§4.1.4.5).
pub const ISR_QUEUE: u8 = 0x1;
/// ISR status bit 1: a configuration change interrupt.
pub const ISR_CONFIG: u8 = 0x2;

/// Where the MSI-X table and PBA sit in their BAR, computed as QEMU's
/// `msix_init_exclusive_bar` does: table at offset 0, PBA at 2048 bytes or right after the
/// table if it is larger, the BAR a power of two of at least 4 KiB.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct MsixLayout {
    /// Number of vectors (table entries), 1..=2048.
    pub vectors: u16,
    /// Byte offset of the pending-bit array in the BAR.
    pub pba_offset: u64,
    /// Size in bytes of the pending-bit array (a multiple of 8).
    pub pba_size: u64,
    /// Size in bytes of the BAR.
    pub bar_size: u64,
}

impl MsixLayout {
    /// The layout for `vectors` vectors (1..=2048; `None` otherwise).
    pub fn new(vectors: u16) -> Option<Self> {
        if vectors == 0 || vectors > 2048 {
            return None;
        }
        let table = u64::from(vectors) * MSIX_ENTRY_SIZE;
        let pba_offset = table.max(2048);
        let pba_size = u64::from(vectors).div_ceil(64) * 8;
        let bar_size = (pba_offset + pba_size).max(4096).next_power_of_two();
        Some(Self {
            vectors,
            pba_offset,
            pba_size,
            bar_size,
        })
    }

    /// Size in bytes of the vector table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }
}

/// The interrupt state of one virtio-pci function.
pub(super) struct Interrupts {
    sink: Option<Arc<dyn InterruptSink>>,
    layout: Option<MsixLayout>,
    /// Table entries: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    /// Pending bits, one per vector.
    pending: Vec<u64>,
    /// Message Control: MSI-X Enable.
    enabled: bool,
    /// Message Control: Function Mask.
    function_masked: bool,
    /// The client emulates the table: its per-vector mask bits do not count here.
    table_in_client: bool,
    /// `config_msix_vector`.
    config_vector: u16,
    /// `queue_msix_vector` of each virtqueue.
    queue_vectors: Vec<u16>,
    /// ISR status byte.
    isr: u8,
    /// Command register bit 10.
    intx_disabled: bool,
    /// The pin level last given to the sink.
    pin: bool,
}

impl Interrupts {
    /// Power-on state for `num_queues` virtqueues and an MSI-X table of `layout` (none: INTx
    /// only).
    pub fn new(layout: Option<MsixLayout>, num_queues: u16) -> Self {
        let vectors = layout.map_or(0, |l| usize::from(l.vectors));
        Self {
            sink: None,
            layout,
            // QEMU's msix_mask_all: every vector starts masked.
            table: vec![[0, 0, 0, ENTRY_MASKED]; vectors],
            pending: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            table_in_client: false,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; usize::from(num_queues)],
            isr: 0,
            intx_disabled: false,
            pin: false,
        }
    }

    /// Back to the power-on state (function-level reset); the sink and the table-in-client
    /// setting are kept.
    pub fn power_on(&mut self) {
        let sink = self.sink.take();
        let (in_client, pin) = (self.table_in_client, self.pin);
        *self = Self::new(self.layout, self.queue_vectors.len() as u16);
        self.sink = sink;
        self.table_in_client = in_client;
        // The sink still has the old level: tell it the new one.
        self.pin = pin;
        self.update_pin();
    }

    /// A device reset (device status 0, §4.1.4.3.1): every vector assignment back to
    /// NO_VECTOR, the ISR and the pending bits cleared.
    pub fn device_reset(&mut self) {
        self.config_vector = NO_VECTOR;
        self.queue_vectors.fill(NO_VECTOR);
        self.pending.fill(0);
        self.isr = 0;
        self.update_pin();
    }

    pub fn vectors(&self) -> u16 {
        self.layout.map_or(0, |l| l.vectors)
    }

    pub fn set_sink(&mut self, sink: Option<Arc<dyn InterruptSink>>) {
        self.sink = sink;
        if let Some(s) = &self.sink {
            s.intx(self.pin);
        }
    }

    pub fn set_table_in_client(&mut self, in_client: bool) {
        self.table_in_client = in_client;
        self.deliver_pending();
    }

    /// A vector number as the device accepts it: out-of-range numbers become NO_VECTOR
    /// (§4.1.5.1.2: the driver reads back NO_VECTOR to learn of the failure).
    fn accept(&self, vector: u16) -> u16 {
        if vector < self.vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector
    }

    pub fn set_config_vector(&mut self, vector: u16) {
        self.config_vector = self.accept(vector);
    }

    /// `queue_msix_vector` of queue `q` (NO_VECTOR for a queue that does not exist).
    pub fn queue_vector(&self, q: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(q))
            .copied()
            .unwrap_or(NO_VECTOR)
    }

    pub fn set_queue_vector(&mut self, q: u16, vector: u16) {
        let v = self.accept(vector);
        if let Some(slot) = self.queue_vectors.get_mut(usize::from(q)) {
            *slot = v;
        }
    }

    /// Message Control bits 15 (enable) and 14 (function mask) as the driver wrote them.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) {
        let enabled = enabled && self.layout.is_some();
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.update_pin();
        self.deliver_pending();
    }

    pub fn set_intx_disabled(&mut self, disabled: bool) {
        self.intx_disabled = disabled;
        self.update_pin();
    }

    /// The function's internal INTx level (status register bit 3): an ISR bit set while
    /// MSI-X is disabled.
    pub fn intx_level(&self) -> bool {
        self.isr != 0 && !self.enabled
    }

    fn update_pin(&mut self) {
        let pin = self.intx_level() && !self.intx_disabled;
        if pin != self.pin {
            self.pin = pin;
            if let Some(s) = &self.sink {
                s.intx(pin);
            }
        }
    }

    /// The core asks for an interrupt.
    pub fn raise(&mut self, cause: InterruptCause) {
        let vector = match cause {
            InterruptCause::Queue(q) => {
                self.isr |= ISR_QUEUE;
                self.queue_vector(q)
            }
            InterruptCause::Config => {
                self.isr |= ISR_CONFIG;
                self.config_vector
            }
        };
        if self.enabled {
            if vector != NO_VECTOR {
                self.signal(vector);
            }
        } else {
            self.update_pin();
        }
    }

    /// Reads and clears the ISR status byte, deasserting INTx (§4.1.4.5).
    pub fn take_isr(&mut self) -> u8 {
        let v = std::mem::take(&mut self.isr);
        self.update_pin();
        v
    }

    fn masked(&self, vector: u16) -> bool {
        let entry_masked = !self.table_in_client
            && self
                .table
                .get(usize::from(vector))
                .is_none_or(|e| e[3] & ENTRY_MASKED != 0);
        self.function_masked || entry_masked
    }

    fn signal(&mut self, vector: u16) {
        if vector >= self.vectors() {
            return;
        }
        if self.masked(vector) {
            self.set_pending(vector, true);
        } else if let Some(s) = &self.sink {
            s.msix(vector);
        }
    }

    fn set_pending(&mut self, vector: u16, on: bool) {
        let (word, bit) = (usize::from(vector / 64), vector % 64);
        if let Some(w) = self.pending.get_mut(word) {
            if on {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    fn is_pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector / 64))
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    /// Signals (and clears) every pending vector that is no longer masked.
    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.vectors() {
            if self.is_pending(v) && !self.masked(v) {
                self.set_pending(v, false);
                if let Some(s) = &self.sink {
                    s.msix(v);
                }
            }
        }
    }

    /// Reads the MSI-X BAR: 4- or 8-byte aligned accesses to the table or the PBA; anything
    /// else reads zeros.
    pub fn bar_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(l) = self.layout else {
            return;
        };
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let v = if at < l.table_size() {
                self.table_dword(at)
            } else if (l.pba_offset..l.pba_offset + l.pba_size).contains(&at) {
                let rel = at - l.pba_offset;
                let word = self.pending.get((rel / 8) as usize).copied().unwrap_or(0);
                (word >> (8 * (rel % 8))) as u32
            } else {
                0
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn table_dword(&self, at: u64) -> u32 {
        let (entry, field) = ((at / MSIX_ENTRY_SIZE) as usize, ((at % 16) / 4) as usize);
        self.table
            .get(entry)
            .and_then(|e| e.get(field))
            .copied()
            .unwrap_or(0)
    }

    /// Writes the MSI-X BAR: 4- or 8-byte aligned accesses to the table (the PBA is read-only);
    /// unmasking a vector with its pending bit set signals it.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let Some(l) = self.layout else {
            return;
        };
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            if at >= l.table_size() {
                continue;
            }
            let Ok(bytes) = <[u8; 4]>::try_from(chunk) else {
                continue;
            };
            let (entry, field) = ((at / MSIX_ENTRY_SIZE) as usize, ((at % 16) / 4) as usize);
            if let Some(slot) = self.table.get_mut(entry).and_then(|e| e.get_mut(field)) {
                // Vector control: only the mask bit is defined (the rest reserved, reads 0).
                let v = u32::from_le_bytes(bytes);
                *slot = if field == 3 { v & ENTRY_MASKED } else { v };
            }
        }
        self.deliver_pending();
    }
}

/// Locks the shared interrupt state, recovering it if a holder panicked.
pub(super) fn lock(irq: &Mutex<Interrupts>) -> MutexGuard<'_, Interrupts> {
    irq.lock().unwrap_or_else(PoisonError::into_inner)
}
