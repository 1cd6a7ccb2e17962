//! One client connection: bounded message framing, dispatch to the [`FunctionBackend`], and
//! replies.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_TYPE_MASK,
};
use vfio_user::{Command, DmaMapFlags, DmaUnmapFlags};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::backend::{FunctionBackend, NUM_IRQS, NUM_REGIONS};
use super::counters::Counter;
use super::irqs::IrqData;
use super::memory::MAX_MAPPINGS;
use super::wire::{self, Header, HEADER_SIZE};
use super::{Limits, ServeError, MAX_DATA_XFER, MAX_FDS};
use crate::function::PciFunction;

/// Protocol version answered to VERSION (QEMU 11.1 accepts major 0, minor ≤ 0... as the
/// `vfio_user` crate answers).
const VERSION_MAJOR: u16 = 0;
const VERSION_MINOR: u16 = 0;

/// A refused command: the errno of the error reply.
struct Refused(i32);

impl From<super::backend::BackendError> for Refused {
    fn from(e: super::backend::BackendError) -> Refused {
        log::warn!("vfio-user: {e}");
        Refused(e.errno())
    }
}

/// Reads a `T` from the start of `payload`.
fn parse<T: FromBytes + KnownLayout + Immutable>(payload: &[u8]) -> Result<T, Refused> {
    T::read_from_prefix(payload)
        .map(|(v, _)| v)
        .map_err(|_| Refused(libc::EINVAL))
}

fn no_fds(fds: &[File]) -> Result<(), Refused> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(Refused(libc::EINVAL))
    }
}

/// Waits up to `timeout_ms` for input on `fd` (0: just looks).
fn input_ready(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is a valid, initialised pollfd and the count is 1.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r != 0
}

/// Linux's limit on descriptors in one SCM_RIGHTS message.
const SCM_MAX_FD: usize = 253;

/// How the header read ended.
enum Received {
    /// A complete header and the descriptors sent with it.
    Header(Header, Vec<File>),
    /// The client closed the connection between messages.
    Closed,
}

/// Serves `stream` until the client disconnects.
pub(super) fn run<F: PciFunction>(
    stream: &mut UnixStream,
    backend: &mut FunctionBackend<F>,
    limits: &Limits,
) -> Result<(), ServeError> {
    stream
        .set_write_timeout(Some(limits.part_timeout))
        .map_err(ServeError::Io)?;
    loop {
        // Deferred work runs while the client is quiet.
        while backend.pending() && !input_ready(stream.as_raw_fd(), 0) {
            backend.poll();
        }
        let (header, fds) = match receive_header(stream, limits)? {
            Received::Closed => return Ok(()),
            Received::Header(h, f) => (h, f),
        };
        if fds.len() > MAX_FDS {
            // Read the message to keep the framing, then refuse it (the descriptors close).
            log::warn!("vfio-user: {} descriptors in one message", fds.len());
        }
        let size = header.message_size as usize;
        if size < HEADER_SIZE || size > limits.max_message {
            // The stream cannot be resynchronised: answer, then drop the connection.
            let _ = send_error(stream, &header, libc::EINVAL);
            return Err(ServeError::BadSize(header.message_size));
        }
        let mut payload = vec![0u8; size - HEADER_SIZE];
        read_part(stream, &mut payload, limits)?;
        backend.counters().bump(Counter::Message);
        if header.flags & wire::FLAG_TYPE_MASK != wire::FLAG_COMMAND {
            // A reply or an unknown type: we sent no command, so nothing waits for it.
            log::warn!(
                "vfio-user: unexpected message type, flags {:#x}",
                header.flags
            );
            send_error(stream, &header, libc::EINVAL)?;
            backend.counters().bump(Counter::ErrorReply);
            continue;
        }
        let outcome = if fds.len() > MAX_FDS {
            Err(Refused(libc::EINVAL))
        } else {
            dispatch(backend, &header, &payload, fds)
        };
        match outcome {
            Ok(reply) => {
                if header.flags & wire::FLAG_NO_REPLY == 0 {
                    send_reply(stream, &header, &reply)?;
                }
            }
            Err(Refused(errno)) => {
                log::debug!(
                    "vfio-user: command {} id {} refused, errno {errno}",
                    header.command,
                    header.message_id
                );
                // A command sent with No_reply (QEMU's posted BAR writes) gets no reply, not
                // even an error one: the client keeps no pending entry to match it with.
                if header.flags & wire::FLAG_NO_REPLY == 0 {
                    backend.counters().bump(Counter::ErrorReply);
                    send_error(stream, &header, errno)?;
                }
            }
        }
    }
}

/// Reads one header: waits without limit for its first bytes (the client may be idle for
/// minutes), then at most `limits.part_timeout` for the rest.
fn receive_header(stream: &mut UnixStream, limits: &Limits) -> Result<Received, ServeError> {
    stream.set_read_timeout(None).map_err(ServeError::Io)?;
    let mut header = Header::default();
    // Room for as many descriptors as Linux passes in one message (SCM_MAX_FD), so the control
    // data is never truncated (the bytes read would be lost with it); more than MAX_FDS are
    // refused after the header.
    let mut raw = [0 as RawFd; SCM_MAX_FD];
    let (got, nfds) = {
        let buf = header.as_mut_bytes();
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        loop {
            // SAFETY: the iovec points at `header`'s bytes, which live across the call and are
            // not otherwise borrowed; `raw` has room for SCM_MAX_FD descriptors.
            match unsafe { stream.recv_with_fds(&mut iov, &mut raw) } {
                Ok(r) => break r,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::ECONNRESET => return Ok(Received::Closed),
                Err(e) => return Err(ServeError::Io(io::Error::from_raw_os_error(e.errno()))),
            }
        }
    };
    let fds: Vec<File> = raw[..nfds.min(SCM_MAX_FD)]
        .iter()
        // SAFETY: the kernel installed these descriptors for this process in recvmsg; nothing
        // else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Ok(Received::Closed);
    }
    if got < HEADER_SIZE {
        read_part(stream, &mut header.as_mut_bytes()[got..], limits)?;
    }
    Ok(Received::Header(header, fds))
}

/// Reads the rest of a message that has begun, within `limits.part_timeout` per read.
fn read_part(stream: &mut UnixStream, buf: &mut [u8], limits: &Limits) -> Result<(), ServeError> {
    if buf.is_empty() {
        return Ok(());
    }
    stream
        .set_read_timeout(Some(limits.part_timeout))
        .map_err(ServeError::Io)?;
    match stream.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == ErrorKind::UnexpectedEof || e.kind() == ErrorKind::ConnectionReset =>
        {
            Err(ServeError::Truncated)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(ServeError::Stalled)
        }
        Err(e) => Err(ServeError::Io(e)),
    }
}

fn reply_header(request: &Header, payload_len: usize, flags: u32, error: u32) -> Header {
    Header {
        message_id: request.message_id,
        command: request.command,
        message_size: (HEADER_SIZE + payload_len) as u32,
        flags: wire::FLAG_REPLY | flags,
        error,
    }
}

fn send_reply(stream: &mut UnixStream, request: &Header, payload: &[u8]) -> Result<(), ServeError> {
    let mut msg = reply_header(request, payload.len(), 0, 0)
        .as_bytes()
        .to_vec();
    msg.extend_from_slice(payload);
    stream.write_all(&msg).map_err(write_error)
}

/// A reply write that did not finish within the write timeout is a stalled client.
fn write_error(e: io::Error) -> ServeError {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        ServeError::Stalled
    } else {
        ServeError::Io(e)
    }
}

fn send_error(stream: &mut UnixStream, request: &Header, errno: i32) -> Result<(), ServeError> {
    let h = reply_header(request, 0, wire::FLAG_ERROR, errno as u32);
    stream.write_all(h.as_bytes()).map_err(write_error)
}

/// The capabilities answered to VERSION (the JSON object of the vfio-user specification):
/// descriptors per message, bytes per transfer, and the number of DMA mappings the server keeps
/// ([`MAX_MAPPINGS`]; the protocol's default would be 65535). No `migration`:
/// the server does not implement it.
fn capabilities() -> String {
    format!(
        "{{\"capabilities\":{{\"max_msg_fds\":{MAX_FDS},\"max_data_xfer_size\":{MAX_DATA_XFER},\
         \"max_dma_maps\":{MAX_MAPPINGS}}}}}"
    )
}

/// Handles one command; `Ok` holds the reply payload.
fn dispatch<F: PciFunction>(
    backend: &mut FunctionBackend<F>,
    header: &Header,
    payload: &[u8],
    fds: Vec<File>,
) -> Result<Vec<u8>, Refused> {
    let Some(command) = Command::n(header.command) else {
        log::warn!("vfio-user: unknown command {}", header.command);
        return Err(Refused(libc::ENOTSUP));
    };
    log::debug!(
        "vfio-user: {command:?} id {} size {} fds {}",
        header.message_id,
        header.message_size,
        fds.len()
    );
    match command {
        Command::Version => {
            no_fds(&fds)?;
            let v: wire::Version = parse(payload)?;
            let caps = payload.get(4..).unwrap_or_default();
            // The client's capabilities: a NUL-terminated JSON string, if any.
            if !caps.is_empty() && caps.last() != Some(&0) {
                return Err(Refused(libc::EINVAL));
            }
            log::info!(
                "vfio-user: client version {}.{} {}",
                v.major,
                v.minor,
                String::from_utf8_lossy(caps.strip_suffix(&[0]).unwrap_or(caps))
            );
            let mut reply = wire::Version {
                major: VERSION_MAJOR,
                minor: VERSION_MINOR,
            }
            .as_bytes()
            .to_vec();
            reply.extend_from_slice(capabilities().as_bytes());
            reply.push(0);
            Ok(reply)
        }
        Command::DmaMap => {
            let m: wire::DmaMap = parse(payload)?;
            if fds.len() > 1 {
                return Err(Refused(libc::EINVAL));
            }
            let file = fds.into_iter().next();
            backend.dma_map(
                DmaMapFlags::from_bits_retain(m.flags),
                m.offset,
                m.address,
                m.size,
                file,
            )?;
            Ok(Vec::new())
        }
        Command::DmaUnmap => {
            no_fds(&fds)?;
            let u: wire::DmaUnmap = parse(payload)?;
            let flags = DmaUnmapFlags::from_bits_retain(u.flags);
            if flags.contains(DmaUnmapFlags::GET_DIRTY_PAGE_INFO) {
                return Err(Refused(libc::ENOTSUP));
            }
            backend.dma_unmap(flags, u.address, u.size)?;
            Ok(u.as_bytes().to_vec())
        }
        Command::DeviceGetInfo => {
            no_fds(&fds)?;
            let _: wire::DeviceInfo = parse(payload)?;
            Ok(wire::DeviceInfo {
                argsz: core::mem::size_of::<wire::DeviceInfo>() as u32,
                flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
                num_regions: NUM_REGIONS,
                num_irqs: NUM_IRQS,
            }
            .as_bytes()
            .to_vec())
        }
        Command::DeviceGetRegionInfo => {
            no_fds(&fds)?;
            let q: wire::RegionInfo = parse(payload)?;
            if q.index >= NUM_REGIONS {
                return Err(Refused(libc::EINVAL));
            }
            Ok(wire::RegionInfo {
                argsz: core::mem::size_of::<wire::RegionInfo>() as u32,
                flags: backend.region_flags(q.index),
                index: q.index,
                cap_offset: 0,
                size: backend.region_size(q.index),
                offset: 0,
            }
            .as_bytes()
            .to_vec())
        }
        Command::GetIrqInfo => {
            no_fds(&fds)?;
            let q: wire::IrqInfo = parse(payload)?;
            let (flags, count) = backend.irq_info(q.index).ok_or(Refused(libc::EINVAL))?;
            Ok(wire::IrqInfo {
                argsz: core::mem::size_of::<wire::IrqInfo>() as u32,
                flags,
                index: q.index,
                count,
            }
            .as_bytes()
            .to_vec())
        }
        Command::SetIrqs => {
            let s: wire::IrqSet = parse(payload)?;
            log::debug!(
                "vfio-user: SET_IRQS index {} flags {:#x} start {} count {}",
                s.index,
                s.flags,
                s.start,
                s.count
            );
            let rest = payload
                .get(core::mem::size_of::<wire::IrqSet>()..)
                .unwrap_or_default();
            let data = match s.flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
                VFIO_IRQ_SET_DATA_EVENTFD => IrqData::Eventfds(fds),
                other => {
                    no_fds(&fds)?;
                    if other == VFIO_IRQ_SET_DATA_BOOL {
                        IrqData::Bool(rest)
                    } else {
                        IrqData::None
                    }
                }
            };
            backend.set_irqs(s.index, s.flags, s.start, s.count, data)?;
            Ok(Vec::new())
        }
        Command::RegionRead => {
            no_fds(&fds)?;
            let a: wire::RegionAccess = parse(payload)?;
            if a.count as usize > MAX_DATA_XFER {
                return Err(Refused(libc::EINVAL));
            }
            let mut data = vec![0u8; a.count as usize];
            backend.region_read(a.region, a.offset, &mut data)?;
            let mut reply = a.as_bytes().to_vec();
            reply.extend_from_slice(&data);
            Ok(reply)
        }
        Command::RegionWrite => {
            no_fds(&fds)?;
            let a: wire::RegionAccess = parse(payload)?;
            let data = payload
                .get(core::mem::size_of::<wire::RegionAccess>()..)
                .and_then(|d| d.get(..a.count as usize))
                .ok_or(Refused(libc::EINVAL))?;
            backend.region_write(a.region, a.offset, data)?;
            Ok(a.as_bytes().to_vec())
        }
        Command::DeviceReset => {
            no_fds(&fds)?;
            backend.reset();
            Ok(Vec::new())
        }
        Command::Unknown
        | Command::GetRegionIoFds
        | Command::DmaRead
        | Command::DmaWrite
        | Command::UserDirtyPages => {
            log::warn!("vfio-user: {command:?} not supported");
            Err(Refused(libc::ENOTSUP))
        }
    }
}
