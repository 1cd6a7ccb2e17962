//! Interrupts through the eventfds of vfio-user DEVICE_SET_IRQS: INTx (IRQ index 0, one
//! interrupt) and MSI-X (index 2, one per vector), as an [`InterruptSink`] for the function.
//!
//! Semantics follow Linux vfio-pci, which QEMU's client is written against:
//! - `ACTION_TRIGGER` with `DATA_EVENTFD` assigns one eventfd per interrupt of
//!   `[start, start + count)`, or unassigns them when the message carries no descriptors (QEMU
//!   sends an fd of -1 that way); with `DATA_NONE` and `count` 0 it unassigns the whole index;
//!   otherwise (`DATA_NONE`, or `DATA_BOOL` with a true byte) it fires the interrupts (loopback).
//! - `ACTION_MASK` / `ACTION_UNMASK` (`DATA_NONE` or `DATA_BOOL`) mask and unmask.
//! - INTx is level-triggered and automasked: a rising level signals the eventfd and masks the
//!   line; the client's UNMASK (QEMU sends it at the guest's EOI, i.e. at its next BAR access)
//!   unmasks it and, if the level is still asserted, signals again.
//! - An MSI-X vector that fires while masked or without an eventfd becomes pending; it is
//!   delivered when unmasked or when an eventfd is assigned.
//!
//! QEMU 11.1 (hw/vfio/pci.c, hw/vfio-user/pci.c) emulates the MSI-X table itself and never
//! sends per-vector MASK/UNMASK for MSI-X: when the guest masks a vector it keeps the eventfd and
//! records the pending bit in its own PBA, and when it unmasks one it sends
//! `ACTION_TRIGGER|DATA_EVENTFD` for that vector. The per-vector mask here serves other clients.
//! Observed with QEMU 11.1.3 (qtest driving the function's config space and BARs): setting
//! MSI-X enable sends INTx `TRIGGER|DATA_NONE` count 0, then MSI-X `TRIGGER|DATA_EVENTFD`
//! start 0 count 1 without descriptor; writes to the MSI-X table and per-vector mask/unmask
//! reach the server only as that vector's `TRIGGER|DATA_EVENTFD` with a descriptor at unmask
//! (nothing at mask); PBA reads arrive as REGION_READs; clearing enable sends MSI-X
//! `TRIGGER|DATA_NONE` count 0 and re-assigns the INTx eventfd. With INTx, after a signal the
//! next BAR access makes QEMU send `UNMASK|DATA_NONE` (its EOI).
//!
//! Eventfds are made non-blocking when assigned, so a descriptor that is not an eventfd (a full
//! pipe) cannot block the server.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};

use super::counters::{Counter, ServerCounters};
use crate::function::InterruptSink;

/// Why a SET_IRQS was refused (the reply carries `EINVAL`).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum IrqError {
    /// The index is neither INTx (0) nor MSI-X (2), or MSI-X has no vectors.
    BadIndex(u32),
    /// `start + count` is past the index's interrupts.
    BadRange,
    /// Not exactly one data type and one action in the flags.
    BadFlags(u32),
    /// The number of descriptors (or of DATA_BOOL bytes) does not match `count`.
    BadData,
    /// A descriptor could not be made non-blocking.
    BadFd,
}

impl std::fmt::Display for IrqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IrqError::BadIndex(i) => write!(f, "IRQ index {i} not offered"),
            IrqError::BadRange => write!(f, "IRQ range past the index's interrupts"),
            IrqError::BadFlags(fl) => write!(f, "SET_IRQS flags {fl:#x} invalid"),
            IrqError::BadData => write!(f, "SET_IRQS data does not match count"),
            IrqError::BadFd => write!(f, "SET_IRQS descriptor unusable"),
        }
    }
}

impl std::error::Error for IrqError {}

#[derive(Debug, Default)]
struct Line {
    fd: Option<File>,
    masked: bool,
    pending: bool,
}

#[derive(Debug, Default)]
struct State {
    intx: Line,
    /// Current INTx level as the function drives it.
    intx_level: bool,
    msix: Vec<Line>,
}

/// The interrupt state of one served function; the function holds it as its
/// [`InterruptSink`] (behind an `Arc`).
#[derive(Debug)]
pub struct Irqs {
    state: Mutex<State>,
    counters: Arc<ServerCounters>,
}

/// What one SET_IRQS carries besides its header fields.
#[derive(Debug)]
pub enum IrqData<'a> {
    /// `VFIO_IRQ_SET_DATA_NONE`.
    None,
    /// `VFIO_IRQ_SET_DATA_BOOL`: one byte per interrupt.
    Bool(&'a [u8]),
    /// `VFIO_IRQ_SET_DATA_EVENTFD`: the descriptors received with the message.
    Eventfds(Vec<File>),
}

fn signal(fd: &File, counters: &ServerCounters) {
    let mut f = fd;
    match f.write_all(&1u64.to_ne_bytes()) {
        Ok(_) => counters.bump(Counter::IrqSignal),
        // A full eventfd counter (or a full pipe a hostile client passed) drops the signal:
        // the interrupt is already pending at the other end.
        Err(e) => log::debug!("interrupt eventfd write failed: {e}"),
    }
}

fn set_nonblocking(fd: &File) -> Result<(), IrqError> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor this process owns (`fd` is alive), with integer arguments
    // only; no memory is passed.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(IrqError::BadFd);
    }
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if r < 0 {
        return Err(IrqError::BadFd);
    }
    Ok(())
}

impl Irqs {
    /// Interrupt state for a function with `msix_vectors` MSI-X vectors; no eventfd assigned,
    /// nothing masked.
    pub fn new(msix_vectors: u16, counters: Arc<ServerCounters>) -> Self {
        let msix = (0..msix_vectors).map(|_| Line::default()).collect();
        Irqs {
            state: Mutex::new(State {
                msix,
                ..State::default()
            }),
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of interrupts of IRQ `index` (0 for indices not offered).
    pub fn count(&self, index: u32) -> u32 {
        match index {
            VFIO_PCI_INTX_IRQ_INDEX => 1,
            VFIO_PCI_MSIX_IRQ_INDEX => self.lock().msix.len() as u32,
            _ => 0,
        }
    }

    /// Whether MSI-X vector `vector` has an eventfd assigned.
    pub fn msix_assigned(&self, vector: u16) -> bool {
        self.lock()
            .msix
            .get(usize::from(vector))
            .is_some_and(|l| l.fd.is_some())
    }

    /// Drops every eventfd and mask (the client disconnected or reset the device).
    pub fn clear(&self) {
        let mut s = self.lock();
        s.intx = Line::default();
        for l in &mut s.msix {
            *l = Line::default();
        }
    }

    /// Applies one DEVICE_SET_IRQS.
    ///
    /// # Errors
    /// [`IrqError`]; nothing changes then.
    pub fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData<'_>,
    ) -> Result<(), IrqError> {
        let total = self.count(index);
        if total == 0 {
            return Err(IrqError::BadIndex(index));
        }
        let end = start.checked_add(count).ok_or(IrqError::BadRange)?;
        let data_type = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if flags & !known != 0
            || !data_type.is_power_of_two()
            || !action.is_power_of_two()
            || (action != VFIO_IRQ_SET_ACTION_TRIGGER && data_type == VFIO_IRQ_SET_DATA_EVENTFD)
        {
            return Err(IrqError::BadFlags(flags));
        }
        let expected = match data_type {
            VFIO_IRQ_SET_DATA_NONE => IrqDataKind::None,
            VFIO_IRQ_SET_DATA_BOOL => IrqDataKind::Bool,
            _ => IrqDataKind::Eventfd,
        };
        if expected != data.kind() {
            return Err(IrqError::BadData);
        }
        if count == 0 {
            // TRIGGER with DATA_NONE (or no eventfd) and count 0 disables the whole index
            // (vfio-pci); any other empty range changes nothing.
            if action == VFIO_IRQ_SET_ACTION_TRIGGER && !matches!(data, IrqData::Bool(_)) {
                self.disable(index);
            }
            return Ok(());
        }
        if end > total {
            return Err(IrqError::BadRange);
        }
        let n = count as usize;
        match data {
            IrqData::Bool(b) if b.len() < n => return Err(IrqError::BadData),
            IrqData::Eventfds(ref f) if !f.is_empty() && f.len() != n => {
                return Err(IrqError::BadData)
            }
            IrqData::Eventfds(ref f) => {
                for fd in f {
                    set_nonblocking(fd)?;
                }
            }
            _ => {}
        }
        let which: Vec<bool> = match &data {
            IrqData::Bool(b) => b.iter().take(n).map(|&x| x != 0).collect(),
            _ => vec![true; n],
        };
        match action {
            VFIO_IRQ_SET_ACTION_MASK => self.mask(index, start, &which, true),
            VFIO_IRQ_SET_ACTION_UNMASK => self.mask(index, start, &which, false),
            _ => match data {
                IrqData::Eventfds(fds) => self.assign(index, start, count, fds),
                _ => self.fire(index, start, &which),
            },
        }
        Ok(())
    }

    fn disable(&self, index: u32) {
        let mut s = self.lock();
        if index == VFIO_PCI_INTX_IRQ_INDEX {
            s.intx = Line::default();
        } else {
            for l in &mut s.msix {
                *l = Line::default();
            }
        }
    }

    fn mask(&self, index: u32, start: u32, which: &[bool], masked: bool) {
        let mut s = self.lock();
        let counters = &self.counters;
        if index == VFIO_PCI_INTX_IRQ_INDEX {
            if which.first() == Some(&true) {
                s.intx.masked = masked;
                if !masked && s.intx_level {
                    let s = &mut *s;
                    Self::deliver_intx(&mut s.intx, counters);
                }
            }
            return;
        }
        for (i, &w) in which.iter().enumerate() {
            if !w {
                continue;
            }
            if let Some(l) = s.msix.get_mut(start as usize + i) {
                l.masked = masked;
                if !masked && l.pending {
                    Self::deliver_msix(l, counters);
                }
            }
        }
    }

    fn assign(&self, index: u32, start: u32, count: u32, fds: Vec<File>) {
        let mut s = self.lock();
        let counters = &self.counters;
        let mut fds = fds.into_iter().map(Some).collect::<Vec<_>>();
        fds.resize_with(count as usize, || None);
        if index == VFIO_PCI_INTX_IRQ_INDEX {
            let s = &mut *s;
            s.intx.fd = fds.pop().flatten();
            s.intx.masked = false;
            if s.intx_level {
                Self::deliver_intx(&mut s.intx, counters);
            }
            return;
        }
        for (i, fd) in fds.into_iter().enumerate() {
            if let Some(l) = s.msix.get_mut(start as usize + i) {
                l.fd = fd;
                if l.pending && !l.masked {
                    Self::deliver_msix(l, counters);
                }
            }
        }
    }

    fn fire(&self, index: u32, start: u32, which: &[bool]) {
        let mut s = self.lock();
        let counters = &self.counters;
        if index == VFIO_PCI_INTX_IRQ_INDEX {
            if which.first() == Some(&true) {
                if let Some(fd) = &s.intx.fd {
                    signal(fd, counters);
                }
            }
            return;
        }
        for (i, &w) in which.iter().enumerate() {
            if let (true, Some(l)) = (w, s.msix.get_mut(start as usize + i)) {
                l.pending = true;
                if !l.masked {
                    Self::deliver_msix(l, counters);
                }
            }
        }
    }

    /// Signals an asserted, unmasked INTx line with an eventfd, then automasks it.
    fn deliver_intx(l: &mut Line, counters: &ServerCounters) {
        if l.masked {
            return;
        }
        if let Some(fd) = &l.fd {
            signal(fd, counters);
            l.masked = true;
        }
    }

    fn deliver_msix(l: &mut Line, counters: &ServerCounters) {
        if let Some(fd) = &l.fd {
            signal(fd, counters);
            l.pending = false;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum IrqDataKind {
    None,
    Bool,
    Eventfd,
}

impl IrqData<'_> {
    fn kind(&self) -> IrqDataKind {
        match self {
            IrqData::None => IrqDataKind::None,
            IrqData::Bool(_) => IrqDataKind::Bool,
            IrqData::Eventfds(_) => IrqDataKind::Eventfd,
        }
    }
}

impl InterruptSink for Irqs {
    fn msix(&self, vector: u16) {
        let mut s = self.lock();
        if let Some(l) = s.msix.get_mut(usize::from(vector)) {
            l.pending = true;
            if !l.masked {
                Self::deliver_msix(l, &self.counters);
            }
        }
    }

    fn intx(&self, asserted: bool) {
        let mut s = self.lock();
        let rising = asserted && !s.intx_level;
        s.intx_level = asserted;
        if rising {
            let s = &mut *s;
            Self::deliver_intx(&mut s.intx, &self.counters);
        }
    }
}
