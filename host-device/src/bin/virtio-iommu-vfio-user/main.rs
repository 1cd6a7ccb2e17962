//! `virtio-iommu-vfio-user`: serves the device model to QEMU 11.1's `vfio-user-pci`, one UNIX
//! socket and one thread per PCI function (crate feature `vfio-user`).
//!
//! ```text
//! virtio-iommu-vfio-user --iommu SOCK [--blk SOCK --disk PATH --blk-endpoint ID]
//!                        [--edu SOCK --edu-endpoint ID] [--checker]
//!                        [--log-level error|warn|info|debug|trace]
//! ```
//!
//! Binds every socket (a stale socket file is removed first), prints
//! `virtio-iommu-vfio-user: listening` on stdout, serves one client per socket, and once every
//! client has disconnected prints `virtio-iommu-vfio-user: requests=N notifications=N faults=N`
//! (requestq requests the IOMMU took, queue notifications received by all functions, faults the
//! IOMMU raised) and exits 0 — 1 if a client broke the protocol, 2 on bad arguments or setup
//! failures.
//!
//! `--checker` turns on the IOMMU's driver checker
//! ([`virtio_iommu_device::DeviceConfigBuilder::driver_checker`]): the device answers exactly
//! as without it, and at exit, before the counts line, prints the checker's report (one
//! `checker: <statement> <count> <first offending request as hex> (<why>)` line per driver
//! statement broken, or `checker: no violations`) and then
//! `device saw: ATTACH a DETACH d MAP m UNMAP u PROBE p faults f`, all on stdout.
//!
//! The functions: the virtio-iommu as a modern virtio-pci function
//! ([`virtio_iommu_device::transport::pci::VirtioPciFunction`] over one shared
//! [`IommuDevice`]), a virtio-blk device over the disk image and QEMU's `edu`, both endpoints
//! of that IOMMU. The IOMMU is configured as QEMU 11.1's `virtio-iommu-pci` on `-M virt` with its
//! default GICv2m: 4 KiB granule, 48-bit input range, 32-bit domain range, boot bypass on,
//! PROBE reporting the MSI doorbell page 0x0802_0000..=0x0802_0fff for each endpoint; the
//! endpoints are the IDs given (requester IDs: bus << 8 | slot << 3 | function) and the host
//! bridge's, 0 (QEMU's device takes every function of its bus as an endpoint, and the
//! devicetree's `iommu-map` covers the host bridge).

mod args;
mod notify;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::thread::JoinHandle;

use log::{Log, Metadata, Record};
use virtio_iommu_device::config::{DeviceConfig, ResvRegion};
use virtio_iommu_device::device::{lock, SharedDevice};
use virtio_iommu_device::endpoints::blk::BlkCore;
use virtio_iommu_device::endpoints::edu::Edu;
use virtio_iommu_device::function::PciFunction;
use virtio_iommu_device::server::{FunctionServer, Listener};
use virtio_iommu_device::transport::pci::VirtioPciFunction;
use virtio_iommu_device::IommuDevice;
use vm_memory::GuestMemoryMmap;

const NAME: &str = "virtio-iommu-vfio-user";
/// QEMU `-M virt`: the GICv2m MSI_SETSPI_NS frame (hw/arm/virt.c `VIRT_GIC_V2M`), which QEMU's
/// virtio-iommu-pci reports as a RESV_MEM MSI region of every endpoint.
const GICV2M_FIRST: u64 = 0x0802_0000;
const GICV2M_LAST: u64 = 0x0802_0fff;

/// Requester ID of `-M virt`'s PCIe host bridge, 00:00.0.
const HOST_BRIDGE: u32 = 0;

/// Log records on stderr, one line each.
struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(std::io::stderr(), "{NAME}: {}: {}", r.level(), r.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// QEMU 11.1's virtio-iommu-pci defaults on `-M virt` (GICv2m), with `endpoints`, and the
/// driver checker on if `checker`.
fn iommu_config(endpoints: &[u32], checker: bool) -> Result<DeviceConfig, String> {
    let mut b = DeviceConfig::builder()
        .driver_checker(checker)
        .page_size_mask(0xffff_ffff_ffff_f000)
        .input_range(0, (1 << 48) - 1)
        .domain_range(0, u32::MAX)
        .boot_bypass(true)
        .endpoints(endpoints.iter().copied());
    for &e in endpoints {
        b = b.resv_region(e, ResvRegion::msi(GICV2M_FIRST, GICV2M_LAST));
    }
    b.build().map_err(|e| format!("IOMMU configuration: {e}"))
}

/// What a server thread hands back: whether its client ended cleanly, and the function's
/// notification count.
type Outcome = (bool, u64);

fn spawn<F: PciFunction + 'static>(
    name: &'static str,
    listener: Listener,
    function: F,
) -> Result<JoinHandle<Outcome>, String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut server = FunctionServer::new(notify::Notifications::new(function));
            let clean = match server.run(&listener) {
                Ok(()) => {
                    log::info!("{name}: client disconnected");
                    true
                }
                Err(e) => {
                    log::error!("{name}: connection ended: {e}");
                    false
                }
            };
            log::info!("{name}: {:?}", server.counters().get());
            (clean, server.function().notifications())
        })
        .map_err(|e| format!("thread: {e}"))
}

fn bind(path: &Path) -> Result<Listener, String> {
    Listener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

fn run(args: args::Args) -> Result<bool, String> {
    // The host bridge (00:00.0, requester ID 0) is an endpoint too, as on QEMU's device, which
    // takes every function of its bus (the devicetree's iommu-map covers it).
    let mut endpoints: Vec<u32> = [
        Some(HOST_BRIDGE),
        args.blk.as_ref().map(|b| b.2),
        args.edu.as_ref().map(|e| e.1),
    ]
    .into_iter()
    .flatten()
    .collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    let iommu: SharedDevice<GuestMemoryMmap> = IommuDevice::new_shared(
        iommu_config(&endpoints, args.checker)?,
        GuestMemoryMmap::new(),
    )
    .map_err(|e| format!("IOMMU device: {e}"))?;

    // Every socket is bound (and the disk opened) before "listening" is printed.
    let iommu_listener = bind(&args.iommu)?;
    let blk = match &args.blk {
        Some((sock, disk, ep)) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(disk)
                .map_err(|e| format!("cannot open disk {}: {e}", disk.display()))?;
            let core =
                BlkCore::new(file, iommu.clone(), *ep).map_err(|e| format!("virtio-blk: {e}"))?;
            Some((bind(sock)?, core))
        }
        None => None,
    };
    let edu = match &args.edu {
        Some((sock, ep)) => Some((bind(sock)?, Edu::new(iommu.clone(), *ep))),
        None => None,
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{NAME}: listening");
    let _ = out.flush();

    let mut threads = vec![spawn(
        "virtio-iommu",
        iommu_listener,
        VirtioPciFunction::new(iommu.clone()),
    )?];
    if let Some((listener, core)) = blk {
        threads.push(spawn("virtio-blk", listener, VirtioPciFunction::new(core))?);
    }
    if let Some((listener, edu)) = edu {
        threads.push(spawn("edu", listener, edu)?);
    }
    let mut clean = true;
    let mut notifications = 0;
    for t in threads {
        match t.join() {
            Ok((c, n)) => {
                clean &= c;
                notifications += n;
            }
            Err(_) => clean = false,
        }
    }
    let (c, report) = {
        let device = lock(&iommu);
        (device.counters(), device.checker_report())
    };
    if args.checker {
        let _ = writeln!(out, "{report}\n{}", report.saw);
    }
    let requests = c.requests_completed + c.requests_unknown_type + c.requests_malformed;
    let _ = writeln!(
        out,
        "{NAME}: requests={requests} notifications={notifications} faults={}",
        c.faults_raised
    );
    let _ = out.flush();
    Ok(clean)
}

fn main() -> ExitCode {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{NAME}: {e}\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(args.level);
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("{NAME}: {e}");
            ExitCode::from(2)
        }
    }
}
