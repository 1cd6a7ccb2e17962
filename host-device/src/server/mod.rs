//! A vfio-user server (QEMU `docs/interop/vfio-user.rst`) for any [`PciFunction`]: QEMU's
//! `vfio-user-pci` device forwards the function's configuration space and BAR accesses over a
//! UNIX socket and hands over guest RAM as file descriptors (DMA_MAP).
//!
//! - [`backend`]: [`FunctionBackend`], the function with its region list, DMA mappings and
//!   interrupts;
//! - [`memory`]: DMA_MAP / DMA_UNMAP into a `GuestMemoryMmap` over the client's memfds;
//! - [`irqs`]: DEVICE_SET_IRQS eventfds as the function's `InterruptSink`;
//! - [`counters`]: what the server saw;
//! - [`wire`]: the message layouts;
//! - `session` (private): one connection, message by message.
//!
//! # Why not `vfio_user::Server`
//!
//! The rust-vmm `vfio_user` crate (0.1.7) has a server, [`vfio_user::Server`], but a hostile
//! client can crash or hang it, and its structure leaves no place to fix that from outside:
//! - `Server::run` accepts the connection itself and reads with no timeout: a client that sends
//!   half a message blocks it forever;
//! - it trusts `message_size` and `count`: a REGION_READ of 4 GiB allocates 4 GiB; a VERSION
//!   whose `message_size` is below 20 underflows (a panic in debug builds), and a capabilities
//!   string without NUL panics (`unwrap`);
//! - a refused or unknown command leaves its payload unread, so the stream loses framing, and a
//!   short first `recvmsg` is taken as a whole header;
//! - its message structs are private, and `ServerBackend::set_irqs` drops DATA_BOOL payloads.
//!
//! A `[patch]` of the crate would mean maintaining a fork of its whole server. This module
//! accepts the connection itself and runs its own bounded framing loop instead, and reuses from
//! the crate what is public: [`vfio_user::Command`] (command numbers) and
//! [`vfio_user::DmaMapFlags`] / [`vfio_user::DmaUnmapFlags`]; the region, IRQ and flag
//! constants come from `vfio-bindings` (the version the crate pins). The bounds:
//! - a message is at most [`Limits::max_message`] bytes (header checked before any
//!   allocation); a bad size gets an error reply and ends the connection (the stream cannot be
//!   resynchronised);
//! - the server waits without limit for the *first* byte of a message (QEMU can be idle for
//!   minutes), then at most [`Limits::part_timeout`] for each further read of that message; a
//!   stalled or truncated message ends the connection;
//! - replies are written with the same timeout, so a client that stops reading cannot block it;
//! - at most [`MAX_FDS`] descriptors per message; descriptors a command does not take are
//!   refused (and closed);
//! - a DMA_MAP file must be sealed against shrinking or sealable (a memfd; the server adds
//!   `F_SEAL_SHRINK`), else it is refused: a client truncating a mapped file would otherwise
//!   turn the next DMA into a SIGBUS ([`memory::DmaError::Unsealed`]);
//! - every other malformed or refused command (short payload, unknown command, region access
//!   at any offset or width outside the region, overlapping DMA map, bad SET_IRQS) gets an error
//!   reply with an errno and the connection goes on.
//!
//! The server offers no mmap of regions and no DMA_READ/DMA_WRITE: guest RAM must be shared
//! (`memory-backend-memfd,share=on`), and every access to BARs and configuration space is a
//! message. QEMU emulates the MSI-X table and PBA writes itself (PBA reads reach the function);
//! see [`irqs`].

pub mod backend;
pub mod counters;
pub mod irqs;
pub mod memory;
mod session;
pub mod wire;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use backend::FunctionBackend;
pub use counters::{CounterValues, ServerCounters};
pub use irqs::Irqs;
pub use memory::DmaMappings;

use crate::function::PciFunction;

/// Most file descriptors accepted with one message (the capabilities' `max_msg_fds`).
pub const MAX_FDS: usize = 8;
/// Largest REGION_READ / REGION_WRITE data in bytes (the capabilities' `max_data_xfer_size`).
pub const MAX_DATA_XFER: usize = 1 << 20;

/// Bounds on what a client can make the server do.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Limits {
    /// Largest message in bytes, header included.
    pub max_message: usize,
    /// Longest wait for the rest of a message once its first byte arrived, and for a reply
    /// write.
    pub part_timeout: Duration,
}

impl Default for Limits {
    /// Messages up to [`MAX_DATA_XFER`] plus 4 KiB; 5 s per message part (QEMU's own reply
    /// timeout, `x-msg-timeout`, is 5 s).
    fn default() -> Self {
        Limits {
            max_message: MAX_DATA_XFER + 4096,
            part_timeout: Duration::from_secs(5),
        }
    }
}

/// Why serving a connection ended other than by a clean disconnect.
#[derive(Debug)]
pub enum ServeError {
    /// A header's `message_size` was below 16 or above [`Limits::max_message`].
    BadSize(u32),
    /// The client closed the connection in the middle of a message.
    Truncated,
    /// The rest of a message (or room for a reply) did not come within
    /// [`Limits::part_timeout`].
    Stalled,
    /// A socket error.
    Io(io::Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::BadSize(s) => write!(f, "message size {s} out of bounds"),
            ServeError::Truncated => write!(f, "client closed the connection mid-message"),
            ServeError::Stalled => write!(f, "client stalled mid-message"),
            ServeError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

/// A listening vfio-user socket; the socket file is removed on drop.
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds `path`, first removing a stale socket left there by an earlier run.
    ///
    /// # Errors
    /// The path exists and is not a socket ([`io::ErrorKind::AlreadyExists`]), or the bind
    /// fails.
    pub fn bind(path: &Path) -> io::Result<Listener> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(_) => {}
        }
        Ok(Listener {
            listener: UnixListener::bind(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Waits for a client.
    ///
    /// # Errors
    /// As `accept(2)`.
    pub fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().map(|(s, _)| s)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A [`PciFunction`] served over vfio-user, one client at a time.
#[derive(Debug)]
pub struct FunctionServer<F: PciFunction> {
    backend: FunctionBackend<F>,
    counters: Arc<ServerCounters>,
    limits: Limits,
}

impl<F: PciFunction> FunctionServer<F> {
    /// Serves `function` with the default [`Limits`].
    pub fn new(function: F) -> Self {
        Self::with_limits(function, Limits::default())
    }

    /// Serves `function` with `limits`.
    pub fn with_limits(function: F, limits: Limits) -> Self {
        let counters = Arc::new(ServerCounters::default());
        FunctionServer {
            backend: FunctionBackend::new(function, counters.clone()),
            counters,
            limits,
        }
    }

    /// The server's counters (shareable with other threads).
    pub fn counters(&self) -> &Arc<ServerCounters> {
        &self.counters
    }

    /// The served function.
    pub fn function(&mut self) -> &mut F {
        self.backend.function()
    }

    /// Unwraps the function.
    pub fn into_function(self) -> F {
        self.backend.into_function()
    }

    /// Serves one connected client until it disconnects. Its DMA mappings and eventfds are
    /// dropped at the end, whatever the outcome.
    ///
    /// # Errors
    /// [`ServeError`] when the client broke the framing, stalled, or the socket failed; the
    /// connection is closed then. A disconnect between messages is `Ok`.
    pub fn serve(&mut self, mut stream: UnixStream) -> Result<(), ServeError> {
        self.counters.bump(counters::Counter::Connection);
        let r = session::run(&mut stream, &mut self.backend, &self.limits);
        self.backend.disconnected();
        r
    }

    /// Accepts one client on `listener` and serves it ([`FunctionServer::serve`]).
    ///
    /// # Errors
    /// As [`FunctionServer::serve`]; `accept` failures as [`ServeError::Io`].
    pub fn run(&mut self, listener: &Listener) -> Result<(), ServeError> {
        let stream = listener.accept().map_err(ServeError::Io)?;
        self.serve(stream)
    }
}
