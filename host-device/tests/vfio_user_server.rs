//! The vfio-user server against a raw client written here from the protocol specification
//! (QEMU `docs/interop/vfio-user.rst`), not from the server's own message structs: an edu
//! function served over a UNIX socket, well-behaved and hostile messages.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_iommu_device::config::DeviceConfig;
use virtio_iommu_device::endpoints::edu::{Edu, BAR0_SIZE, DMA_START, IDENT};
use virtio_iommu_device::server::{FunctionServer, Limits, Listener, ServeError};
use virtio_iommu_device::IommuDevice;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

// Commands (vfio-user.rst "Commands").
const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const GET_INFO: u16 = 4;
const GET_REGION_INFO: u16 = 5;
const GET_IRQ_INFO: u16 = 7;
const SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const DEVICE_RESET: u16 = 13;

const REPLY: u32 = 1;
const ERROR: u32 = 1 << 5;
const EINVAL: u32 = 22;
const ENOTSUP: u32 = 95;

const CONFIG: u32 = 7;
const GPA: u64 = 0x4000_0000;
const RAM: u64 = 2 << 20;

/// A reply: flags, errno, payload.
#[derive(Debug)]
struct Reply {
    id: u16,
    command: u16,
    flags: u32,
    error: u32,
    payload: Vec<u8>,
}

impl Reply {
    fn ok(&self) -> bool {
        self.flags & ERROR == 0
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.payload[off..off + 4].try_into().unwrap())
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.payload[off..off + 8].try_into().unwrap())
    }
}

struct Client {
    s: UnixStream,
    id: u16,
}

fn header(id: u16, command: u16, size: u32, flags: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&command.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn le32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Client {
    fn connect(path: &PathBuf) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s, id: 0 }
    }

    fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd]) {
        if fds.is_empty() {
            self.s.write_all(bytes).unwrap();
        } else {
            let n = self.s.send_with_fds(&[bytes], fds).unwrap();
            self.s.write_all(&bytes[n..]).unwrap();
        }
    }

    fn send(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> u16 {
        self.id = self.id.wrapping_add(1);
        let mut m = header(self.id, command, 16 + payload.len() as u32, 0);
        m.extend_from_slice(payload);
        self.send_raw(&m, fds);
        self.id
    }

    fn recv(&mut self) -> Reply {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        assert!(size >= 16, "reply size {size}");
        let mut payload = vec![0u8; size - 16];
        self.s.read_exact(&mut payload).unwrap();
        Reply {
            id: u16::from_le_bytes(h[0..2].try_into().unwrap()),
            command: u16::from_le_bytes(h[2..4].try_into().unwrap()),
            flags: u32::from_le_bytes(h[8..12].try_into().unwrap()),
            error: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            payload,
        }
    }

    fn call_fds(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.send(command, payload, fds);
        let r = self.recv();
        assert_eq!(
            (r.id, r.command),
            (id, command),
            "reply matches the command"
        );
        assert_eq!(r.flags & 0xf, REPLY);
        r
    }

    fn call(&mut self, command: u16, payload: &[u8]) -> Reply {
        self.call_fds(command, payload, &[])
    }

    fn version(&mut self) -> Reply {
        let mut p = vec![0, 0, 1, 0];
        p.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":8}}\0");
        self.call(VERSION, &p)
    }

    fn access(region: u32, offset: u64, count: u32) -> Vec<u8> {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(&region.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
        p
    }

    fn read(&mut self, region: u32, offset: u64, count: u32) -> Reply {
        self.call(REGION_READ, &Self::access(region, offset, count))
    }

    fn read_ok(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
        let r = self.read(region, offset, count);
        assert!(r.ok(), "read {region} {offset:#x} {count}: {r:?}");
        assert_eq!(r.payload.len(), 16 + count as usize);
        assert_eq!(r.u32_at(12), count);
        r.payload[16..].to_vec()
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Reply {
        let mut p = Self::access(region, offset, data.len() as u32);
        p.extend_from_slice(data);
        self.call(REGION_WRITE, &p)
    }

    fn bar_w(&mut self, offset: u64, data: &[u8]) {
        let r = self.write(0, offset, data);
        assert!(r.ok(), "{r:?}");
    }

    fn bar_r32(&mut self, offset: u64) -> u32 {
        u32::from_le_bytes(self.read_ok(0, offset, 4).try_into().unwrap())
    }

    fn dma_map(&mut self, offset: u64, address: u64, size: u64, fds: &[RawFd]) -> Reply {
        let mut p = le32(&[32, 3]);
        for v in [offset, address, size] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        self.call_fds(DMA_MAP, &p, fds)
    }

    fn dma_unmap(&mut self, address: u64, size: u64) -> Reply {
        let mut p = le32(&[24, 0]);
        p.extend_from_slice(&address.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        self.call(DMA_UNMAP, &p)
    }

    fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        extra: &[u8],
        fds: &[RawFd],
    ) -> Reply {
        let mut p = le32(&[20 + extra.len() as u32, flags, index, start, count]);
        p.extend_from_slice(extra);
        self.call_fds(SET_IRQS, &p, fds)
    }

    /// Whether the server has closed the connection (EOF within a second).
    fn closed(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

struct Served {
    path: PathBuf,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "viommu-vfio-user-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// An edu (endpoint 8) behind an IOMMU in boot bypass, served on a fresh socket.
fn serve_edu(limits: Limits) -> Served {
    let dir = temp_dir();
    let path = dir.0.join("edu.sock");
    let listener = Listener::bind(&path).unwrap();
    let config = DeviceConfig::builder()
        .endpoints([8])
        .input_range(0, u64::MAX)
        .boot_bypass(true)
        .build()
        .unwrap();
    let iommu = IommuDevice::new_shared(config, GuestMemoryMmap::new()).unwrap();
    let edu = Edu::new(iommu, 8);
    let thread = std::thread::spawn(move || {
        let mut server = FunctionServer::with_limits(edu, limits);
        server.run(&listener)
    });
    Served {
        path,
        thread: Some(thread),
        _dir: dir,
    }
}

impl Served {
    /// Waits (at most 10 s) for the server thread to return.
    fn join(&mut self) -> Result<(), ServeError> {
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "server did not return");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap()
    }
}

/// Guest RAM as QEMU's `memory-backend-memfd` makes it: a memfd that can be sealed.
fn memfd(size: u64) -> File {
    memfd_with_flags(size, libc::MFD_ALLOW_SEALING)
}

fn memfd_with_flags(size: u64, flags: libc::c_uint) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the returned descriptor (checked below)
    // is owned by the File from here on.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

#[test]
fn the_server_counts_what_it_serves() {
    let dir = temp_dir();
    let path = dir.0.join("edu.sock");
    let listener = Listener::bind(&path).unwrap();
    let config = DeviceConfig::builder()
        .endpoints([8])
        .boot_bypass(true)
        .build()
        .unwrap();
    let iommu = IommuDevice::new_shared(config, GuestMemoryMmap::new()).unwrap();
    let mut server = FunctionServer::with_limits(Edu::new(iommu, 8), Limits::default());
    let counters = server.counters().clone();
    let thread = std::thread::spawn(move || server.run(&listener));
    let mut srv = Served {
        path,
        thread: Some(thread),
        _dir: dir,
    };
    let mut c = Client::connect(&srv.path);
    assert!(c.version().ok());
    assert_eq!(c.read_ok(0, 0, 4), IDENT.to_le_bytes());
    assert_eq!(c.read_ok(0, 4, 4).len(), 4);
    c.bar_w(0x04, &7u32.to_le_bytes());
    let ram = memfd(RAM);
    assert!(c.dma_map(0, GPA, RAM, &[ram.as_raw_fd()]).ok());
    assert!(c.dma_unmap(GPA, RAM).ok());
    assert!(!c.call(0x7f, &[]).ok(), "an unknown command is refused");
    drop(c);
    srv.join().unwrap();
    let v = counters.get();
    assert_eq!(
        (
            v.messages,
            v.region_reads,
            v.region_writes,
            v.dma_maps,
            v.dma_unmaps,
            v.error_replies,
            v.connections
        ),
        (7, 2, 1, 1, 1, 1, 1),
        "{v:?}"
    );
}

#[test]
fn version_device_region_and_irq_info() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let v = c.version();
    assert!(v.ok());
    assert_eq!((v.payload[0], v.payload[2]), (0, 0), "version 0.0");
    let caps = String::from_utf8_lossy(&v.payload[4..]).to_string();
    assert!(caps.ends_with('\0'), "{caps}");
    assert!(caps.contains("\"max_msg_fds\":8"), "{caps}");
    assert!(caps.contains("\"max_data_xfer_size\":1048576"), "{caps}");

    let info = c.call(GET_INFO, &le32(&[16, 0, 0, 0]));
    assert!(info.ok());
    // argsz, flags (PCI | RESET), 8 regions, 3 IRQ indices.
    assert_eq!(
        (
            info.u32_at(0),
            info.u32_at(4),
            info.u32_at(8),
            info.u32_at(12)
        ),
        (16, 3, 8, 3)
    );

    let mut sizes = Vec::new();
    for index in 0..8 {
        let r = c.call(GET_REGION_INFO, &le32(&[32, 0, index, 0, 0, 0, 0, 0]));
        assert!(r.ok());
        assert_eq!(r.u32_at(8), index);
        assert_eq!(r.u32_at(12), 0, "no capabilities");
        sizes.push((r.u64_at(16), r.u32_at(4)));
    }
    let mut expect = vec![(BAR0_SIZE, 3)];
    expect.extend([(0, 0); 6]);
    expect.push((4096, 3));
    assert_eq!(sizes, expect);
    let bad = c.call(GET_REGION_INFO, &le32(&[32, 0, 8, 0, 0, 0, 0, 0]));
    assert_eq!((bad.flags & ERROR, bad.error), (ERROR, EINVAL));

    let intx = c.call(GET_IRQ_INFO, &le32(&[16, 0, 0, 0]));
    assert_eq!((intx.u32_at(8), intx.u32_at(12)), (0, 1));
    assert_eq!(intx.u32_at(4) & 1, 1, "EVENTFD");
    let msix = c.call(GET_IRQ_INFO, &le32(&[16, 0, 2, 0]));
    assert_eq!(msix.u32_at(12), 0, "edu has no MSI-X vectors");
    assert!(
        !c.call(GET_IRQ_INFO, &le32(&[16, 0, 3, 0])).ok(),
        "no ERR IRQ"
    );

    drop(c);
    srv.join().unwrap();
}

#[test]
fn config_space_gives_edu_ids_and_bar_round_trips() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let id = c.read_ok(CONFIG, 0, 4);
    assert_eq!(u32::from_le_bytes(id.try_into().unwrap()), 0x11e8_1234);
    // QEMU reads the first 256 bytes at once at realize: same bytes as 4-byte reads.
    let all = c.read_ok(CONFIG, 0, 256);
    assert_eq!(&all[0..4], &[0x34, 0x12, 0xe8, 0x11]);
    assert_eq!(&all[9..12], &[0, 0, 0xff], "class 0xff0000");
    assert_eq!(all[0x3d], 1, "INTA#");
    // Unaligned odd-sized config read, split by the server.
    assert_eq!(c.read_ok(CONFIG, 1, 3), vec![0x12, 0xe8, 0x11]);
    // BAR0 sizing through config space.
    assert!(c.write(CONFIG, 0x10, &[0xff; 4]).ok());
    let bar = c.read_ok(CONFIG, 0x10, 4);
    assert_eq!(
        u32::from_le_bytes(bar.try_into().unwrap()),
        !(BAR0_SIZE as u32 - 1)
    );

    assert_eq!(c.bar_r32(0), IDENT);
    c.bar_w(4, &0x1234_5678u32.to_le_bytes());
    assert_eq!(c.bar_r32(4), !0x1234_5678);
    c.bar_w(8, &5u32.to_le_bytes());
    assert_eq!(c.bar_r32(8), 120);
    // 8-byte register.
    c.bar_w(0x80, &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(
        c.read_ok(0, 0x80, 8),
        0x1122_3344_5566_7788u64.to_le_bytes()
    );
    // A write with NO_REPLY gets no reply; the next command's reply comes next.
    let mut m = header(500, REGION_WRITE, 16 + 16 + 4, 1 << 4);
    m.extend_from_slice(&Client::access(0, 4, 4));
    m.extend_from_slice(&7u32.to_le_bytes());
    c.send_raw(&m, &[]);
    assert_eq!(c.bar_r32(4), !7);
    // A refused command with NO_REPLY (a write to a region that does not exist) gets no reply
    // either, not even an error one: the next reply is the next command's.
    let mut m = header(501, REGION_WRITE, 16 + 16 + 4, 1 << 4);
    m.extend_from_slice(&Client::access(99, 0, 4));
    m.extend_from_slice(&7u32.to_le_bytes());
    c.send_raw(&m, &[]);
    assert_eq!(c.bar_r32(4), !7);
    // Reset brings the power-on state back.
    assert!(c.call(DEVICE_RESET, &[]).ok());
    assert_eq!(c.bar_r32(4), 0);
    drop(c);
    srv.join().unwrap();
}

#[test]
fn dma_map_of_a_memfd_then_edu_dma_both_ways() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let ram = memfd(RAM);
    ram.write_all_at(b"through the memfd", 0x1000).unwrap();
    assert!(c.dma_map(0, GPA, RAM, &[ram.as_raw_fd()]).ok());
    // RAM -> edu buffer (direction bit 1 clear), then buffer -> RAM elsewhere.
    c.bar_w(0x80, &(GPA + 0x1000).to_le_bytes());
    c.bar_w(0x88, &DMA_START.to_le_bytes());
    c.bar_w(0x90, &17u64.to_le_bytes());
    c.bar_w(0x98, &1u64.to_le_bytes());
    c.bar_w(0x80, &DMA_START.to_le_bytes());
    c.bar_w(0x88, &(GPA + 0x2000).to_le_bytes());
    c.bar_w(0x98, &3u64.to_le_bytes());
    let mut got = [0u8; 17];
    ram.read_exact_at(&mut got, 0x2000).unwrap();
    assert_eq!(&got, b"through the memfd");

    // After the unmap the DMA reaches nothing: RAM keeps its old bytes.
    assert!(c.dma_unmap(GPA, RAM).ok());
    ram.write_all_at(b"XXXXXXXXXXXXXXXXX", 0x2000).unwrap();
    c.bar_w(0x98, &3u64.to_le_bytes());
    ram.read_exact_at(&mut got, 0x2000).unwrap();
    assert_eq!(&got, b"XXXXXXXXXXXXXXXXX");
    drop(c);
    srv.join().unwrap();
}

#[test]
fn absurd_dma_maps_get_error_replies() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let ram = memfd(RAM);
    let fd = [ram.as_raw_fd()];
    assert!(c.dma_map(0, GPA, RAM, &fd).ok());
    let refused = |r: Reply| r.flags & ERROR != 0 && r.error == EINVAL;
    assert!(
        refused(c.dma_map(0, GPA + 0x1000, 0x1000, &fd)),
        "overlap inside"
    );
    assert!(
        refused(c.dma_map(0, GPA - 0x1000, 0x2000, &fd)),
        "overlap below"
    );
    assert!(refused(c.dma_map(0, GPA, RAM, &fd)), "identical");
    assert!(refused(c.dma_map(0, 0, 0, &fd)), "size 0");
    assert!(
        refused(c.dma_map(0, u64::MAX - 0xfff, 0x2000, &fd)),
        "wraps"
    );
    assert!(refused(c.dma_map(0, 0, 1 << 50, &fd)), "1 PiB");
    assert!(
        refused(c.dma_map(0, 0, RAM * 2, &fd)),
        "past the end of the file"
    );
    assert!(
        refused(c.dma_map(u64::MAX - 0xfff, 0, 0x2000, &fd)),
        "offset wraps"
    );
    assert!(
        refused(c.dma_map(0x10, 0, 0x1000, &fd)),
        "unaligned offset (mmap fails)"
    );
    let (r, w) = pipe();
    assert!(
        refused(c.dma_map(0, 0, 0x1000, &[r.as_raw_fd()])),
        "a pipe cannot be mapped"
    );
    assert!(
        refused(c.dma_map(0, 0, 0x1000, &[fd[0], w.as_raw_fd()])),
        "two fds"
    );
    // Without a descriptor: accepted (QEMU without share=on) but unreachable.
    assert!(c.dma_map(0, 0x1_0000_0000, 0x1000, &[]).ok());
    assert!(
        refused(c.dma_map(0, 0x1_0000_0000, 0x1000, &fd)),
        "overlaps the fd-less map"
    );
    assert!(refused(c.dma_unmap(GPA, 0x1000)), "part of a mapping");
    assert!(refused(c.dma_unmap(0x5000_0000, 0x1000)), "no mapping");
    assert!(c.dma_unmap(0x1_0000_0000, 0x1000).ok());
    assert!(c.dma_unmap(GPA, RAM).ok());
    drop(c);
    srv.join().unwrap();
}

fn pipe() -> (File, File) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors owned by nothing else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

#[test]
fn malformed_messages_get_error_replies_and_the_server_goes_on() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let alive = |c: &mut Client| assert_eq!(c.bar_r32(0), IDENT);

    let r = c.call(99, &[1, 2, 3]);
    assert_eq!(
        (r.flags & ERROR, r.error),
        (ERROR, ENOTSUP),
        "unknown command"
    );
    alive(&mut c);
    let r = c.call(0, &[]);
    assert_eq!(r.error, ENOTSUP, "command 0");
    alive(&mut c);
    // Commands the server does not implement.
    for cmd in [6, 11, 12, 14] {
        assert_eq!(c.call(cmd, &[0; 32]).error, ENOTSUP, "command {cmd}");
    }
    alive(&mut c);
    // Short payloads.
    for cmd in [
        VERSION,
        DMA_MAP,
        DMA_UNMAP,
        GET_INFO,
        GET_REGION_INFO,
        GET_IRQ_INFO,
        SET_IRQS,
        REGION_READ,
        REGION_WRITE,
    ] {
        let r = c.call(cmd, &[0; 3]);
        assert_eq!(
            (r.flags & ERROR, r.error),
            (ERROR, EINVAL),
            "short payload of {cmd}"
        );
        alive(&mut c);
    }
    // A write whose count exceeds the data sent.
    let mut p = Client::access(0, 4, 8);
    p.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(c.call(REGION_WRITE, &p).error, EINVAL);
    // Capabilities without their NUL.
    assert_eq!(c.call(VERSION, b"\0\0\0\0{}").error, EINVAL);
    // Descriptors with commands that take none, too many, or of the wrong kind.
    let (pr, _pw) = pipe();
    let r = c.call_fds(REGION_READ, &Client::access(0, 0, 4), &[pr.as_raw_fd()]);
    assert_eq!(r.error, EINVAL, "fd with REGION_READ");
    let e1 = EventFd::new(EFD_NONBLOCK).unwrap();
    let r = c.set_irqs(0x20 | 0x4, 0, 0, 1, &[], &[e1.as_raw_fd(), e1.as_raw_fd()]);
    assert_eq!(r.error, EINVAL, "two eventfds for one interrupt");
    let r = c.set_irqs(0x20 | 0x1, 0, 0, 1, &[], &[e1.as_raw_fd()]);
    assert_eq!(r.error, EINVAL, "fd with DATA_NONE");
    let nine: Vec<RawFd> = (0..9).map(|_| e1.as_raw_fd()).collect();
    let r = c.set_irqs(0x20 | 0x4, 0, 0, 9, &[], &nine);
    assert!(!r.ok(), "more fds than max_msg_fds");
    alive(&mut c);
    // A reply sent to the server.
    let mut m = header(7, REGION_READ, 16, REPLY);
    m.truncate(16);
    c.send_raw(&m, &[]);
    assert!(!c.recv().ok());
    alive(&mut c);
    drop(c);
    srv.join().unwrap();
}

#[test]
fn bad_message_sizes_end_the_connection_without_allocating() {
    for size in [0u32, 15, u32::MAX, (64 << 20) as u32] {
        let mut srv = serve_edu(Limits::default());
        let mut c = Client::connect(&srv.path);
        c.send_raw(&header(1, REGION_READ, size, 0), &[]);
        let r = c.recv();
        assert_eq!((r.flags & ERROR, r.error), (ERROR, EINVAL), "size {size}");
        assert!(c.closed(), "size {size}: connection closed");
        assert!(matches!(srv.join(), Err(ServeError::BadSize(s)) if s == size));
    }
}

#[test]
fn region_access_at_any_offset_and_width_never_breaks_the_server() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let offsets = [
        0,
        1,
        3,
        4,
        0x98,
        0xffc,
        0xfff,
        0x1000,
        BAR0_SIZE - 8,
        BAR0_SIZE - 4,
        BAR0_SIZE - 1,
        BAR0_SIZE,
        1 << 63,
        u64::MAX - 3,
        u64::MAX,
    ];
    let widths = [0u32, 1, 2, 3, 4, 5, 7, 8, 16, 4096];
    let mut ok = 0;
    for region in 0..10u32 {
        for &off in &offsets {
            for &w in &widths {
                let size = match region {
                    0 => BAR0_SIZE,
                    7 => 4096,
                    _ => 0,
                };
                let fits = w > 0 && off.checked_add(u64::from(w)).is_some_and(|e| e <= size);
                let width_ok = region == 7 || matches!(w, 1 | 2 | 4 | 8);
                let expect = fits && width_ok;
                let r = c.read(region, off, w);
                assert_eq!(
                    r.ok(),
                    expect,
                    "read region {region} {off:#x} width {w}: {r:?}"
                );
                if !expect {
                    assert_eq!(r.error, EINVAL);
                }
                let r = c.write(region, off, &vec![0xa5; w as usize]);
                assert_eq!(r.ok(), expect, "write region {region} {off:#x} width {w}");
                ok += usize::from(expect);
            }
        }
    }
    assert!(ok > 20);
    // More than max_data_xfer_size.
    assert_eq!(c.read(CONFIG, 0, 2 << 20).error, EINVAL);
    assert_eq!(c.bar_r32(0), IDENT, "still serving");
    drop(c);
    srv.join().unwrap();
}

#[test]
fn half_sent_message_then_disconnect_returns() {
    // Half a header.
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    c.send_raw(&header(1, REGION_READ, 32, 0)[..8], &[]);
    drop(c);
    assert!(matches!(srv.join(), Err(ServeError::Truncated)));
    // A header and half its payload.
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let mut m = header(1, REGION_READ, 32, 0);
    m.extend_from_slice(&[0; 7]);
    c.send_raw(&m, &[]);
    drop(c);
    assert!(matches!(srv.join(), Err(ServeError::Truncated)));
}

#[test]
fn stalled_message_times_out_but_an_idle_client_does_not() {
    let limits = Limits {
        part_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let mut srv = serve_edu(limits);
    let mut c = Client::connect(&srv.path);
    // Idle between messages for longer than the timeout: still served.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(c.bar_r32(0), IDENT);
    // Stalled inside a message: the server gives up on the connection.
    let t = Instant::now();
    c.send_raw(&header(1, REGION_READ, 32, 0)[..10], &[]);
    assert!(matches!(srv.join(), Err(ServeError::Stalled)));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(c.closed());
}

#[test]
fn disconnect_mid_request_and_between_requests_return_cleanly() {
    // Between requests: Ok.
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    assert!(c.version().ok());
    drop(c);
    srv.join().unwrap();
    // A request whose reply is never read: the server returns (Ok, or the write fails).
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    c.send(REGION_READ, &Client::access(CONFIG, 0, 4096), &[]);
    c.s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    match srv.join() {
        Ok(()) | Err(ServeError::Io(_)) => {}
        Err(e) => panic!("{e}"),
    }
}

fn fired(e: &EventFd) -> u64 {
    e.read().unwrap_or(0)
}

#[test]
fn intx_eventfd_signalled_by_edu_raise_interrupt() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let e = EventFd::new(EFD_NONBLOCK).unwrap();
    // ACTION_TRIGGER | DATA_EVENTFD on INTx.
    assert!(c.set_irqs(0x20 | 0x4, 0, 0, 1, &[], &[e.as_raw_fd()]).ok());
    assert_eq!(fired(&e), 0, "no interrupt yet");
    c.bar_w(0x60, &1u32.to_le_bytes());
    assert_eq!(fired(&e), 1, "raise -> eventfd");
    // Level already high and automasked: no second signal.
    c.bar_w(0x60, &2u32.to_le_bytes());
    assert_eq!(fired(&e), 0);
    // UNMASK (QEMU's EOI) while still asserted: signalled again.
    assert!(c.set_irqs(0x10 | 0x1, 0, 0, 1, &[], &[]).ok());
    assert_eq!(fired(&e), 1);
    // Acknowledge everything, unmask, raise again: a new edge.
    c.bar_w(0x64, &3u32.to_le_bytes());
    assert!(c.set_irqs(0x10 | 0x1, 0, 0, 1, &[], &[]).ok());
    assert_eq!(fired(&e), 0);
    c.bar_w(0x60, &1u32.to_le_bytes());
    assert_eq!(fired(&e), 1);
    c.bar_w(0x64, &1u32.to_le_bytes());
    // MASK, then raise: nothing until UNMASK.
    assert!(c.set_irqs(0x10 | 0x1, 0, 0, 1, &[], &[]).ok());
    assert!(c.set_irqs(0x08 | 0x1, 0, 0, 1, &[], &[]).ok());
    c.bar_w(0x60, &1u32.to_le_bytes());
    assert_eq!(fired(&e), 0, "masked");
    assert!(
        c.set_irqs(0x10 | 0x2, 0, 0, 1, &[1], &[]).ok(),
        "UNMASK with DATA_BOOL"
    );
    assert_eq!(fired(&e), 1);
    // Loopback trigger with DATA_BOOL and DATA_NONE.
    assert!(c.set_irqs(0x20 | 0x2, 0, 0, 1, &[1], &[]).ok());
    assert_eq!(fired(&e), 1);
    assert!(c.set_irqs(0x20 | 0x1, 0, 0, 1, &[], &[]).ok());
    assert_eq!(fired(&e), 1);
    // Disable (DATA_NONE, count 0): no more signals.
    assert!(c.set_irqs(0x20 | 0x1, 0, 0, 0, &[], &[]).ok());
    c.bar_w(0x64, &u32::MAX.to_le_bytes());
    c.bar_w(0x60, &1u32.to_le_bytes());
    assert_eq!(fired(&e), 0);
    // Refused: MSI-X on a function without vectors, MSI, out of range, bad flag mixes.
    let r = |c: &mut Client, flags, index, start, count| {
        c.set_irqs(flags, index, start, count, &[], &[]).error
    };
    assert_eq!(r(&mut c, 0x20 | 0x1, 2, 0, 1), EINVAL);
    assert_eq!(r(&mut c, 0x20 | 0x1, 1, 0, 1), EINVAL);
    assert_eq!(r(&mut c, 0x20 | 0x1, 0, 1, 1), EINVAL);
    assert_eq!(r(&mut c, 0x20 | 0x1, 0, u32::MAX, 2), EINVAL);
    assert_eq!(r(&mut c, 0x20 | 0x3, 0, 0, 1), EINVAL);
    assert_eq!(r(&mut c, 0x30 | 0x1, 0, 0, 1), EINVAL);
    assert_eq!(r(&mut c, 0x08 | 0x4, 0, 0, 1), EINVAL);
    assert_eq!(
        r(&mut c, 0x20 | 0x2, 0, 0, 1),
        EINVAL,
        "DATA_BOOL without its byte"
    );
    assert_eq!(r(&mut c, 0x1 | 0x40, 0, 0, 1), EINVAL);
    drop(c);
    srv.join().unwrap();
}

const BIN: &str = env!("CARGO_BIN_EXE_virtio-iommu-vfio-user");

#[test]
fn binary_listens_serves_the_iommu_and_edu_and_exits_with_its_summary() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = temp_dir();
    let iommu = dir.0.join("iommu.sock");
    let edu = dir.0.join("edu.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&edu).unwrap());
    let mut child = Command::new(BIN)
        .args(["--iommu", iommu.to_str().unwrap()])
        .args(["--edu", edu.to_str().unwrap(), "--edu-endpoint", "0x18"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "virtio-iommu-vfio-user: listening\n");
    let mut i = Client::connect(&iommu);
    assert!(i.version().ok());
    // virtio-iommu as a modern virtio-pci function: 1af4:1057.
    assert_eq!(i.read_ok(CONFIG, 0, 4), vec![0xf4, 0x1a, 0x57, 0x10]);
    let mut e = Client::connect(&edu);
    assert!(e.version().ok());
    assert_eq!(e.read_ok(CONFIG, 0, 4), vec![0x34, 0x12, 0xe8, 0x11]);
    drop(e);
    // One client left: the server keeps running.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with a client still connected"
    );
    drop(i);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        rest,
        "virtio-iommu-vfio-user: requests=0 notifications=0 faults=0\n"
    );
    assert!(!iommu.exists() && !edu.exists(), "socket files removed");
}

#[test]
fn binary_with_checker_prints_its_report_and_what_it_saw_before_the_counts() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = temp_dir();
    let iommu = dir.0.join("iommu.sock");
    let mut child = Command::new(BIN)
        .args(["--iommu", iommu.to_str().unwrap(), "--checker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "virtio-iommu-vfio-user: listening\n");
    let mut i = Client::connect(&iommu);
    assert!(i.version().ok());
    assert_eq!(i.read_ok(CONFIG, 0, 4), vec![0xf4, 0x1a, 0x57, 0x10]);
    drop(i);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        rest,
        "checker: no violations\n\
         device saw: ATTACH 0 DETACH 0 MAP 0 UNMAP 0 PROBE 0 faults 0\n\
         virtio-iommu-vfio-user: requests=0 notifications=0 faults=0\n"
    );
}

#[test]
fn binary_refuses_bad_arguments() {
    use std::process::Command;
    for args in [
        &[][..],
        &["--edu", "/nonexistent/x.sock"],
        &["--edu", "/tmp/x.sock", "--edu-endpoint", "8"],
        &[
            "--iommu",
            "/tmp/i.sock",
            "--blk",
            "/tmp/b.sock",
            "--disk",
            "/nonexistent.img",
            "--blk-endpoint",
            "16",
        ],
        &["--iommu", "/nonexistent/dir/i.sock"],
        &["--edu", "/tmp/x.sock", "--edu-endpoint", "nope"],
        &[
            "--edu",
            "/tmp/x.sock",
            "--edu-endpoint",
            "8",
            "--log-level",
            "loud",
        ],
        &["--edu", "/tmp/x.sock", "--edu-endpoint", "8", "--bogus"],
        &["--iommu", "/tmp/i.sock", "--blk", "/tmp/b.sock"],
        &["--edu", "/nonexistent/dir/x.sock", "--edu-endpoint", "8"],
    ] {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("virtio-iommu-vfio-user: "),
            "{args:?}"
        );
    }
}

/// A function with 4 MSI-X vectors: a BAR0 write of value v at offset 0 fires vector v; a
/// write at offset 8 owes v rounds of deferred work, counted at offset 16.
struct Fake {
    sink: Option<std::sync::Arc<dyn virtio_iommu_device::function::InterruptSink>>,
    table_in_client: std::sync::Arc<std::sync::atomic::AtomicBool>,
    owed: u64,
    done: u64,
}

impl virtio_iommu_device::function::PciFunction for Fake {
    fn config_read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn config_write(&mut self, _: u64, _: &[u8]) {}
    fn bar(&self, index: u8) -> Option<virtio_iommu_device::function::Bar> {
        (index == 0).then_some(virtio_iommu_device::function::Bar {
            size: 4096,
            is_64bit: false,
            prefetchable: false,
        })
    }
    fn bar_read(&mut self, _: u8, offset: u64, data: &mut [u8]) {
        let v = if offset == 16 { self.done } else { 0 };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }
    fn bar_write(&mut self, _: u8, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        match offset {
            0 => {
                if let Some(s) = &self.sink {
                    s.msix(v as u16);
                }
            }
            8 => self.owed = v,
            _ => {}
        }
    }
    fn msix_vectors(&self) -> u16 {
        4
    }
    fn set_interrupt_sink(
        &mut self,
        sink: Option<std::sync::Arc<dyn virtio_iommu_device::function::InterruptSink>>,
    ) {
        self.sink = sink;
    }
    fn set_guest_memory(&mut self, _: GuestMemoryMmap) {}
    fn reset(&mut self) {}
    fn set_msix_table_in_client(&mut self, in_client: bool) {
        self.table_in_client
            .store(in_client, std::sync::atomic::Ordering::Relaxed);
    }
    fn poll(&mut self) -> bool {
        if self.owed > 0 {
            self.owed -= 1;
            self.done += 1;
        }
        self.owed > 0
    }
}

fn serve_fake() -> (Served, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let dir = temp_dir();
    let path = dir.0.join("fake.sock");
    let listener = Listener::bind(&path).unwrap();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fake = Fake {
        sink: None,
        table_in_client: flag.clone(),
        owed: 0,
        done: 0,
    };
    let thread = std::thread::spawn(move || FunctionServer::new(fake).run(&listener));
    (
        Served {
            path,
            thread: Some(thread),
            _dir: dir,
        },
        flag,
    )
}

#[test]
fn msix_eventfds_masks_and_pending_vectors() {
    let (mut srv, table_in_client) = serve_fake();
    let mut c = Client::connect(&srv.path);
    assert!(c.version().ok());
    assert!(
        table_in_client.load(std::sync::atomic::Ordering::Relaxed),
        "the server tells the function that QEMU emulates the MSI-X table"
    );
    let info = c.call(GET_IRQ_INFO, &le32(&[16, 0, 2, 0]));
    assert_eq!(info.u32_at(12), 4, "4 MSI-X vectors");
    let e: Vec<EventFd> = (0..4)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    // QEMU's MSI-X enable: vector 0 with fd -1 (no descriptor), count 1.
    assert!(c.set_irqs(0x20 | 0x4, 2, 0, 1, &[], &[]).ok());
    // Vector 1 fires before it has an eventfd: pending, delivered once assigned.
    c.bar_w(0, &1u32.to_le_bytes());
    assert!(c
        .set_irqs(0x20 | 0x4, 2, 1, 1, &[], &[e[1].as_raw_fd()])
        .ok());
    assert_eq!(fired(&e[1]), 1, "pending vector delivered at assignment");
    // Assign 0..4 at once; each vector signals its own eventfd.
    let fds: Vec<RawFd> = e.iter().map(|x| x.as_raw_fd()).collect();
    assert!(c.set_irqs(0x20 | 0x4, 2, 0, 4, &[], &fds).ok());
    for v in 0..4u32 {
        c.bar_w(0, &v.to_le_bytes());
        for (i, x) in e.iter().enumerate() {
            assert_eq!(
                fired(x),
                u64::from(i as u32 == v),
                "vector {v}, eventfd {i}"
            );
        }
    }
    // Out-of-range vector from the function: ignored.
    c.bar_w(0, &9u32.to_le_bytes());
    assert!(e.iter().all(|x| fired(x) == 0));
    // Per-vector MASK: the interrupt becomes pending, UNMASK delivers it once.
    assert!(c.set_irqs(0x08 | 0x1, 2, 2, 1, &[], &[]).ok());
    c.bar_w(0, &2u32.to_le_bytes());
    c.bar_w(0, &2u32.to_le_bytes());
    assert_eq!(fired(&e[2]), 0, "masked");
    assert!(c.set_irqs(0x10 | 0x1, 2, 2, 1, &[], &[]).ok());
    assert_eq!(fired(&e[2]), 1, "delivered on unmask");
    assert!(c.set_irqs(0x10 | 0x1, 2, 2, 1, &[], &[]).ok());
    assert_eq!(fired(&e[2]), 0, "only once");
    // DATA_BOOL mask of vectors 0 and 3 only.
    assert!(c.set_irqs(0x08 | 0x2, 2, 0, 4, &[1, 0, 0, 1], &[]).ok());
    for v in 0..4u32 {
        c.bar_w(0, &v.to_le_bytes());
    }
    let got: Vec<u64> = e.iter().map(fired).collect();
    assert_eq!(got, vec![0, 1, 1, 0]);
    // Unassign vector 1 (no descriptors): its interrupt stays pending, not lost.
    assert!(c.set_irqs(0x20 | 0x4, 2, 1, 1, &[], &[]).ok());
    c.bar_w(0, &1u32.to_le_bytes());
    assert_eq!(fired(&e[1]), 0);
    // Disable the index: no more signals.
    assert!(c.set_irqs(0x20 | 0x1, 2, 0, 0, &[], &[]).ok());
    assert!(c.set_irqs(0x10 | 0x2, 2, 0, 4, &[1, 1, 1, 1], &[]).ok());
    for v in 0..4u32 {
        c.bar_w(0, &v.to_le_bytes());
    }
    assert!(e.iter().all(|x| fired(x) == 0));
    // Range past the vectors.
    assert_eq!(c.set_irqs(0x20 | 0x1, 2, 3, 2, &[], &[]).error, EINVAL);
    drop(c);
    srv.join().unwrap();
}

#[test]
fn deferred_work_is_bounded_per_write_and_finished_between_messages() {
    let (mut srv, _) = serve_fake();
    let mut c = Client::connect(&srv.path);
    // 10 rounds: all done right after the write.
    c.bar_w(8, &10u64.to_le_bytes());
    assert_eq!(c.read_ok(0, 16, 8), 10u64.to_le_bytes());
    // A million rounds: the write is answered after a bounded number of them...
    c.bar_w(8, &1_000_000u64.to_le_bytes());
    let first = u64::from_le_bytes(c.read_ok(0, 16, 8).try_into().unwrap());
    assert!(
        first < 10 + 1_000_000,
        "not all rounds before the next reply"
    );
    // ...and the rest runs while the client is quiet.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let done = u64::from_le_bytes(c.read_ok(0, 16, 8).try_into().unwrap());
        if done == 10 + 1_000_000 {
            break;
        }
        assert!(Instant::now() < deadline, "deferred work stuck at {done}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    srv.join().unwrap();
}

#[test]
fn a_client_that_never_reads_its_replies_cannot_block_the_server() {
    let limits = Limits {
        part_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let mut srv = serve_edu(limits);
    let c = Client::connect(&srv.path);
    let mut s = c.s.try_clone().unwrap();
    // 4 KiB config reads, never read back: the replies fill the socket buffers.
    let sender = std::thread::spawn(move || {
        let mut m = header(1, REGION_READ, 32, 0);
        m.extend_from_slice(&Client::access(CONFIG, 0, 4096));
        for _ in 0..10_000 {
            if s.write_all(&m).is_err() {
                return true;
            }
        }
        false
    });
    assert!(matches!(srv.join(), Err(ServeError::Stalled)));
    assert!(sender.join().unwrap(), "the server closed the connection");
    drop(c);
}

/// A client that shrinks its guest-RAM file after DMA_MAP must not be able to kill the server
/// (SIGBUS on the next DMA into the vanished pages). A memfd that can be sealed gets
/// `F_SEAL_SHRINK` from the server (the truncation fails); one that cannot (created without
/// `MFD_ALLOW_SEALING`) is refused at DMA_MAP. Run against the binary, so that a SIGBUS shows as
/// the child's death, not the test's. Before the fix the server accepted the unsealed memfd
/// (with a warning) and died of SIGBUS at the edu DMA.
#[test]
fn truncating_a_dma_file_cannot_kill_the_server() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let dir = temp_dir();
    let iommu = dir.0.join("iommu.sock");
    let edu = dir.0.join("edu.sock");
    let mut child = Command::new(BIN)
        .args(["--iommu", iommu.to_str().unwrap()])
        .args(["--edu", edu.to_str().unwrap(), "--edu-endpoint", "0x18"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "virtio-iommu-vfio-user: listening\n");
    let mut i = Client::connect(&iommu);
    assert!(i.version().ok());
    let mut e = Client::connect(&edu);
    assert!(e.version().ok());

    // Cannot be sealed: refused, nothing mapped.
    let unsealable = memfd_with_flags(RAM, 0);
    let r = e.dma_map(0, GPA, RAM, &[unsealable.as_raw_fd()]);
    assert!(!r.ok() && r.error == EINVAL, "{r:?}");

    // Sealable: mapped and sealed, so the client's truncation fails.
    let ram = memfd(RAM);
    assert!(e.dma_map(0, GPA, RAM, &[ram.as_raw_fd()]).ok());
    assert!(ram.set_len(0).is_err(), "the server sealed the file");
    // Also try the refused one truncated: the server has no mapping of it.
    unsealable.set_len(0).unwrap();

    // edu DMA RAM -> buffer (boot bypass: IOVA = GPA), sent without waiting for the reply: a
    // dead server gives none.
    e.bar_w(0x80, &(GPA + 0x1000).to_le_bytes());
    e.bar_w(0x88, &DMA_START.to_le_bytes());
    e.bar_w(0x90, &16u64.to_le_bytes());
    let mut start = Client::access(0, 0x98, 8);
    start.extend_from_slice(&1u64.to_le_bytes());
    e.send(REGION_WRITE, &start, &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(child.try_wait().unwrap(), None, "server died");
    assert!(e.recv().ok());
    drop(e);
    drop(i);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), None, "server killed by a signal");
    assert!(status.success(), "{status:?}");
}

/// DMA_MAP flags: a mapping the client grants READ only must not be written by the device
/// (vfio-user DMA_MAP `VFIO_USER_F_DMA_REGION_WRITE` clear): the server keeps it out of reach,
/// so edu's buffer -> RAM DMA into it moves nothing.
#[test]
fn a_read_only_dma_mapping_is_not_written() {
    let mut srv = serve_edu(Limits::default());
    let mut c = Client::connect(&srv.path);
    let ram = memfd(RAM);
    ram.write_all_at(b"read-only guest RAM", 0x2000).unwrap();
    // flags 1: READ only.
    let mut p = le32(&[32, 1]);
    for v in [0u64, GPA, RAM] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    let mapped = c.call_fds(DMA_MAP, &p, &[ram.as_raw_fd()]).ok();
    // edu buffer -> RAM (direction bit 1 set): a device write into the READ-only mapping.
    c.bar_w(0x80, &DMA_START.to_le_bytes());
    c.bar_w(0x88, &(GPA + 0x2000).to_le_bytes());
    c.bar_w(0x90, &19u64.to_le_bytes());
    c.bar_w(0x98, &3u64.to_le_bytes());
    let mut got = [0u8; 19];
    ram.read_exact_at(&mut got, 0x2000).unwrap();
    assert_eq!(
        &got, b"read-only guest RAM",
        "the device wrote into a READ-only DMA mapping (DMA_MAP accepted: {mapped})"
    );
    drop(c);
    srv.join().unwrap();
}
