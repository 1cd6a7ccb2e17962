//! What a server saw, counted (shared with other threads through an `Arc`, never reset).

use std::sync::atomic::{AtomicU64, Ordering};

/// Cumulative counters of one function server.
#[derive(Debug, Default)]
pub struct ServerCounters {
    messages: AtomicU64,
    error_replies: AtomicU64,
    region_reads: AtomicU64,
    region_writes: AtomicU64,
    dma_maps: AtomicU64,
    dma_unmaps: AtomicU64,
    irq_signals: AtomicU64,
    connections: AtomicU64,
}

/// A snapshot of [`ServerCounters`].
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct CounterValues {
    /// Complete messages received (well-formed or not).
    pub messages: u64,
    /// Error replies sent (malformed or refused commands).
    pub error_replies: u64,
    /// REGION_READ commands served.
    pub region_reads: u64,
    /// REGION_WRITE commands served.
    pub region_writes: u64,
    /// DMA_MAP commands accepted.
    pub dma_maps: u64,
    /// DMA_UNMAP commands accepted.
    pub dma_unmaps: u64,
    /// Interrupt eventfds signalled (INTx and MSI-X).
    pub irq_signals: u64,
    /// Client connections served.
    pub connections: u64,
}

/// Which counter to bump.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Counter {
    Message,
    ErrorReply,
    RegionRead,
    RegionWrite,
    DmaMap,
    DmaUnmap,
    IrqSignal,
    Connection,
}

impl ServerCounters {
    fn cell(&self, c: Counter) -> &AtomicU64 {
        match c {
            Counter::Message => &self.messages,
            Counter::ErrorReply => &self.error_replies,
            Counter::RegionRead => &self.region_reads,
            Counter::RegionWrite => &self.region_writes,
            Counter::DmaMap => &self.dma_maps,
            Counter::DmaUnmap => &self.dma_unmaps,
            Counter::IrqSignal => &self.irq_signals,
            Counter::Connection => &self.connections,
        }
    }

    pub(crate) fn bump(&self, c: Counter) {
        self.cell(c).fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn get(&self) -> CounterValues {
        let g = |c| self.cell(c).load(Ordering::Relaxed);
        CounterValues {
            messages: g(Counter::Message),
            error_replies: g(Counter::ErrorReply),
            region_reads: g(Counter::RegionRead),
            region_writes: g(Counter::RegionWrite),
            dma_maps: g(Counter::DmaMap),
            dma_unmaps: g(Counter::DmaUnmap),
            irq_signals: g(Counter::IrqSignal),
            connections: g(Counter::Connection),
        }
    }
}
