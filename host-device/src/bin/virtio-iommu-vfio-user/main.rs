//! `virtio-iommu-vfio-user`: serves the device model to QEMU 11.1's `vfio-user-pci`, one UNIX
//! socket and one thread per PCI function (crate feature `vfio-user`).
//!
//! ```text
//! virtio-iommu-vfio-user --iommu SOCK [--blk SOCK --disk PATH --blk-endpoint ID]
//!                        [--edu SOCK --edu-endpoint ID] [--log-level error|warn|info|debug]
//! ```
//!
//! Binds every socket (a stale socket file is removed first), prints
//! `virtio-iommu-vfio-user: listening` on stdout, serves one client per socket, and once every
//! client has disconnected prints `virtio-iommu-vfio-user: requests=N notifications=N faults=N`
//! and exits 0 (1 if a client broke the protocol, 2 on bad arguments or setup failures).
//!
//! The IOMMU is configured as QEMU 11.1's `virtio-iommu-pci` on `-M virt` with its default
//! GICv2m: 4 KiB granule, 48-bit input range, 32-bit domain range, boot bypass on, PROBE
//! reporting the MSI doorbell page 0x0802_0000..=0x0802_0fff for each endpoint; the endpoints
//! are the IDs given on the command line (requester IDs: bus << 8 | slot << 3 | function).

mod notify;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread::JoinHandle;

use log::{LevelFilter, Log, Metadata, Record};
use virtio_iommu_device::config::{DeviceConfig, ResvRegion};
use virtio_iommu_device::device::{lock, SharedDevice};
use virtio_iommu_device::endpoints::edu::Edu;
use virtio_iommu_device::function::PciFunction;
use virtio_iommu_device::server::{FunctionServer, Listener};
use virtio_iommu_device::IommuDevice;
use vm_memory::GuestMemoryMmap;

const NAME: &str = "virtio-iommu-vfio-user";
/// QEMU `-M virt`: the GICv2m MSI_SETSPI_NS frame (hw/arm/virt.c `VIRT_GIC_V2M`).
const GICV2M_FIRST: u64 = 0x0802_0000;
const GICV2M_LAST: u64 = 0x0802_0fff;

/// Errors, warnings and more on stderr, one line each.
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

#[derive(Debug, Default)]
struct Args {
    iommu: Option<PathBuf>,
    blk: Option<PathBuf>,
    disk: Option<PathBuf>,
    blk_endpoint: Option<u32>,
    edu: Option<PathBuf>,
    edu_endpoint: Option<u32>,
    level: Option<LevelFilter>,
}

const USAGE: &str = "usage: virtio-iommu-vfio-user --iommu SOCK [--blk SOCK --disk PATH \
--blk-endpoint ID] [--edu SOCK --edu-endpoint ID] [--log-level error|warn|info|debug|trace]";

fn parse_id(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("bad endpoint ID {s:?}"))
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--iommu" => a.iommu = Some(value()?.into()),
            "--blk" => a.blk = Some(value()?.into()),
            "--disk" => a.disk = Some(value()?.into()),
            "--blk-endpoint" => a.blk_endpoint = Some(parse_id(&value()?)?),
            "--edu" => a.edu = Some(value()?.into()),
            "--edu-endpoint" => a.edu_endpoint = Some(parse_id(&value()?)?),
            "--log-level" => {
                a.level = Some(match value()?.as_str() {
                    "error" => LevelFilter::Error,
                    "warn" => LevelFilter::Warn,
                    "info" => LevelFilter::Info,
                    "debug" => LevelFilter::Debug,
                    "trace" => LevelFilter::Trace,
                    other => return Err(format!("bad log level {other:?}")),
                })
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.iommu.is_none() && a.edu.is_none() {
        return Err("--iommu SOCK is required".into());
    }
    if a.blk.is_some() != a.disk.is_some() || a.blk.is_some() != a.blk_endpoint.is_some() {
        return Err("--blk, --disk and --blk-endpoint go together".into());
    }
    if a.edu.is_some() != a.edu_endpoint.is_some() {
        return Err("--edu and --edu-endpoint go together".into());
    }
    if a.blk_endpoint.is_some() && a.blk_endpoint == a.edu_endpoint {
        return Err("blk and edu need different endpoint IDs".into());
    }
    Ok(a)
}

/// QEMU 11.1's virtio-iommu-pci defaults on `-M virt` (GICv2m), with `endpoints`.
fn iommu_config(endpoints: &[u32]) -> Result<DeviceConfig, String> {
    let mut b = DeviceConfig::builder()
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
) -> std::io::Result<JoinHandle<Outcome>> {
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
            let c = server.counters().get();
            log::info!("{name}: {c:?}");
            (clean, server.function().notifications())
        })
}

fn bind(path: &Path) -> Result<Listener, String> {
    Listener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

fn run(args: Args) -> Result<bool, String> {
    let endpoints: Vec<u32> = [args.blk_endpoint, args.edu_endpoint]
        .into_iter()
        .flatten()
        .collect();
    let iommu: SharedDevice<GuestMemoryMmap> =
        IommuDevice::new_shared(iommu_config(&endpoints)?, GuestMemoryMmap::new())
            .map_err(|e| format!("IOMMU device: {e}"))?;

    let mut listeners = Vec::new();
    if let Some(p) = &args.iommu {
        return Err(format!(
            "--iommu {}: the virtio-pci transport is not in this build yet",
            p.display()
        ));
    }
    if let (Some(p), Some(ep)) = (&args.edu, args.edu_endpoint) {
        listeners.push(("edu", bind(p)?, ep));
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{NAME}: listening");
    let _ = out.flush();

    let mut threads = Vec::new();
    for (name, listener, ep) in listeners {
        let edu = Edu::new(iommu.clone(), ep);
        threads.push(spawn(name, listener, edu).map_err(|e| format!("thread: {e}"))?);
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
    let c = lock(&iommu).counters();
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
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{NAME}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(args.level.unwrap_or(LevelFilter::Warn));
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("{NAME}: {e}");
            ExitCode::from(2)
        }
    }
}
