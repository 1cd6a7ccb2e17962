//! The conformance suite (`virtio-iommu-conformance`) run against the PCI virtio-iommu the
//! firmware finds — QEMU's device, or ours under QEMU 11.1 through vfio-user (`cargo
//! qemu-ours`): the driver in the [`IOMMU`] static, `edu` as the DMA endpoint, heap pages as
//! guest RAM.
//!
//! Prints one `conformance: <case> <result>[: <detail>]` line per case (the host turns them into
//! the table in `CONFORMANCE.md`) and one TAP line: the suite ran with no harness error.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_iommu_conformance::{
    result_line, run_all, Endpoints, Harness, Hazard, RawReply, DMA_BUFFER_SIZE,
};
use virtio_iommu_driver::wire::{Config, Features, MapFlags, Status};
use virtio_iommu_driver::{
    FaultEvent, IommuConfig, IommuError, IommuOptions, ProbeProperty, VirtIOIommu, WaitPolicy,
};

use super::edu::{self, Edu, MmioRegs};
use super::env::{now_ns, with_iommu, DmaPage, Iommu, IOMMU};
use super::{Env, Tap};
use crate::hal::IdentityHal;
use crate::iommu_dev::IommuDevice;
use crate::pci::PciBus;

struct Qemu<'a> {
    edu: Edu<MmioRegs>,
    /// For [`Harness::reset`]: the bus (a PCI IOMMU's configuration space) and the IOMMU.
    pci: &'a mut PciBus,
    iommu: IommuDevice,
    endpoints: Endpoints,
    config: IommuConfig,
    granule: u64,
    /// Pages handed out, with their size in bytes.
    pages: Vec<(DmaPage, u64)>,
    short_probe_kills_qemu: bool,
    /// CPU accesses to memory outside the pages handed out (a case bug).
    misuse: u32,
    /// Every endpoint the firmware probed at setup: PROBEd again after a reset (R5).
    probed: Vec<u32>,
}

fn options() -> IommuOptions {
    IommuOptions {
        wait: WaitPolicy {
            clock: Some(now_ns),
            timeout_ns: 5_000_000_000,
            ..WaitPolicy::default()
        },
        ..IommuOptions::default()
    }
}

impl Qemu<'_> {
    fn iommu<R>(
        &self,
        f: impl FnOnce(&mut Iommu) -> Result<R, IommuError>,
    ) -> Result<R, IommuError> {
        with_iommu(f)
    }
}

impl Harness for Qemu<'_> {
    fn features(&self) -> Features {
        self.iommu(|i| Ok(i.features())).unwrap_or_default()
    }
    fn offered(&self) -> Features {
        self.iommu(|i| Ok(i.offered_features())).unwrap_or_default()
    }
    fn config(&self) -> IommuConfig {
        self.config
    }
    fn attach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        with_iommu(|i| i.attach(domain, endpoint))
    }
    fn attach_bypass(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        with_iommu(|i| i.attach_bypass(domain, endpoint))
    }
    fn detach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        with_iommu(|i| i.detach(domain, endpoint))
    }
    fn map(&mut self, domain: u32, s: u64, e: u64, p: u64, flags: u32) -> Result<(), IommuError> {
        with_iommu(|i| i.map(domain, s, e, p, MapFlags::from_bits_retain(flags)))
    }
    fn unmap(&mut self, domain: u32, s: u64, e: u64) -> Result<(), IommuError> {
        with_iommu(|i| i.unmap(domain, s, e))
    }
    fn probe(&mut self, endpoint: u32) -> Result<Vec<ProbeProperty>, IommuError> {
        with_iommu(|i| {
            let mut v = Vec::new();
            i.probe(endpoint, |p| v.push(p))?;
            Ok(v)
        })
    }
    fn raw_config(&mut self) -> Result<Config, IommuError> {
        with_iommu(|i| i.read_raw_config())
    }
    fn bypass(&mut self) -> Option<bool> {
        with_iommu(|i| Ok(i.bypass())).ok().flatten()
    }
    fn set_bypass(&mut self, on: bool) -> Result<(), IommuError> {
        with_iommu(|i| i.set_bypass(on))
    }
    fn raw(
        &mut self,
        readable: &[&[u8]],
        writable_lens: &[usize],
    ) -> Option<Result<RawReply, IommuError>> {
        let mut writable = vec![0u8; writable_lens.iter().sum()];
        let r = with_iommu(|i| i.request_raw(readable, writable_lens, &mut writable));
        Some(r.map(|used| RawReply { used, writable }))
    }
    fn faults(&mut self) -> Result<Vec<FaultEvent>, IommuError> {
        super::env::drain_faults()
    }
    fn ignored_events(&mut self) -> u64 {
        with_iommu(|i| Ok(i.event_stats().ignored)).unwrap_or(0)
    }
    fn endpoints(&self) -> Endpoints {
        self.endpoints
    }
    fn alloc_pages(&mut self, granules: u64) -> Option<u64> {
        let len = granules.checked_mul(self.granule)?;
        let page = DmaPage::new(len, self.granule)?;
        let phys = page.phys();
        self.pages.push((page, len));
        Some(phys)
    }
    fn write_phys(&mut self, phys: u64, data: &[u8]) {
        if let Some((p, size)) = self
            .pages
            .iter_mut()
            .find(|(p, size)| phys >= p.phys() && phys - p.phys() < *size)
        {
            let off = (phys - p.phys()) as usize;
            if off + data.len() <= *size as usize {
                p.write(off, data);
                return;
            }
        }
        // A case touched memory it did not allocate: a bug in the case, reported at the end.
        self.misuse += 1;
    }
    fn read_phys(&mut self, phys: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        if let Some((p, size)) = self
            .pages
            .iter()
            .find(|(p, size)| phys >= p.phys() && phys - p.phys() < *size)
        {
            let off = (phys - p.phys()) as usize;
            if off + len <= *size as usize {
                p.read(off, &mut v);
                return v;
            }
        }
        self.misuse += 1;
        v
    }
    fn dma_in(&mut self, iova: u64, len: u64) {
        if let Err(e) = self.edu.dma_from_ram(iova, 0, len.min(DMA_BUFFER_SIZE)) {
            println!("# edu: {e}");
        }
    }
    fn dma_out(&mut self, iova: u64, len: u64) {
        if let Err(e) = self.edu.dma_to_ram(0, iova, len.min(DMA_BUFFER_SIZE)) {
            println!("# edu: {e}");
        }
    }
    fn reset(&mut self) -> Option<Result<(), IommuError>> {
        // Dropping the driver writes status 0 (virtio reset); then initialise it again.
        let mut slot = IOMMU.lock();
        *slot = None;
        let transport = match self.iommu.open(self.pci) {
            Ok(t) => t,
            Err(_) => return Some(Err(IommuError::WrongDeviceType)),
        };
        // A reset forgets what was probed: PROBE each endpoint again before anything attaches
        // it (R5), as setup did (later cases, `shared.rs`, attach virtio-blk too).
        Some(
            VirtIOIommu::<IdentityHal, _>::new(transport, options()).and_then(|i| {
                // Kept even if a PROBE fails: the following cases still have a driver.
                let i = slot.insert(i);
                if i.features().contains(Features::PROBE) {
                    for &ep in &self.probed {
                        i.probe(ep, |_| {})?;
                    }
                }
                Ok(())
            }),
        )
    }
    fn needs_reset(&mut self) -> bool {
        with_iommu(|i| {
            Ok(i.transport_mut()
                .get_status()
                .contains(DeviceStatus::DEVICE_NEEDS_RESET))
        })
        .unwrap_or(true)
    }
    fn hazard(&self, hazard: Hazard) -> Option<&'static str> {
        match hazard {
            Hazard::ShortProbeBuffer if self.short_probe_kills_qemu => {
                Some("QEMU < 9.1 aborts on a short PROBE buffer")
            }
            _ => None,
        }
    }
}

pub fn run(tap: &mut Tap, pci: &mut PciBus, env: &mut Env) {
    let name = "conformance suite against QEMU's device: every case ran without harness error";
    let Some(dev) = env.endpoint_of(edu::VENDOR_ID, &[edu::DEVICE_ID]) else {
        tap.case(name, || Err("no edu endpoint".into()));
        return;
    };
    let Some(bar) = dev.function.bars[0] else {
        tap.case(name, || Err("edu BAR0 not assigned".into()));
        return;
    };
    // SAFETY: edu's BAR0, assigned by PCI enumeration in a device-memory window; the earlier
    // cases are done with it.
    let regs = unsafe { MmioRegs::new(bar.cpu_address, bar.size) };
    let edu = match Edu::new(regs) {
        Ok(e) => e,
        Err(e) => {
            tap.case(name, || Err(format!("edu: {e}")));
            return;
        }
    };
    // A second endpoint that nobody uses: not edu, not the virtio-blk device.
    let other = env
        .endpoints
        .iter()
        .map(|(d, _)| d)
        .find(|d| d.endpoint != dev.endpoint && d.function.vendor_id != 0x1af4)
        .map(|d| d.endpoint);
    let config = match with_iommu(|i| Ok(*i.config())) {
        Ok(c) => c,
        Err(e) => {
            tap.case(name, || Err(format!("{e}")));
            return;
        }
    };
    // QEMU < 9.1 aborts on a short PROBE buffer: its PROBE handler writes a fixed
    // probe_size + 4 bytes whatever the buffer and asserts they fit. Two safe tests tell it:
    // 1. a fixed-size PROBE writer: a PROBE with a writable part 4 bytes longer than
    //    probe_size + 4 comes back with used length probe_size + 4 (QEMU at every version;
    //    a device sizing its answer by the buffer, as ours does, writes it all);
    // 2. the release: QEMU < 9.1 answers a second DETACH with S_INVAL (9.1 removed the
    //    endpoint on detach, giving S_NOENT; the fix of the abort came in the same release).
    // Only both together name the hazard.
    let probe_ep = other.unwrap_or(dev.endpoint);
    let domain = env.domain().unwrap_or(u32::MAX);
    let fixed_probe_writer = fixed_size_probe_writer(probe_ep, config.probe_size);
    let old_qemu = fixed_probe_writer
        && with_iommu(|i| {
            i.attach(domain, probe_ep)?;
            i.detach(domain, probe_ep)?;
            Ok(i.detach(domain, probe_ep) == Err(IommuError::Status(Status::Inval)))
        })
        .unwrap_or(true);
    println!(
        "# conformance: fixed-size PROBE writer: {fixed_probe_writer}, QEMU < 9.1: {old_qemu}"
    );
    let mut h = Qemu {
        edu,
        pci,
        iommu: env.iommu.clone(),
        endpoints: Endpoints {
            dma: dev.endpoint,
            other,
            absent: env.absent_endpoint,
        },
        config,
        granule: env.granule,
        pages: Vec::new(),
        short_probe_kills_qemu: old_qemu,
        misuse: 0,
        probed: env.endpoints.iter().map(|(d, _)| d.endpoint).collect(),
    };
    let mut errors = Vec::new();
    let summary = run_all(&mut h, |case, outcome| {
        println!("{}", result_line(case, outcome));
        // What the case broke on purpose, for our device's driver checker.
        let not_run = matches!(outcome, virtio_iommu_conformance::Outcome::NotRun(_));
        for code in case.violates {
            let tail = if not_run { " not-run" } else { "" };
            println!("checker-expect: {code} {}{tail}", case.id);
        }
        if let virtio_iommu_conformance::Outcome::Error(e) = outcome {
            errors.push(format!("{}: {e}", case.id));
        }
    });
    println!(
        "# conformance: {} pass, {} diverge, {} not run, {} error",
        summary.pass, summary.diverges, summary.not_run, summary.error
    );
    if h.misuse != 0 {
        errors.push(format!(
            "{} harness access(es) outside the allocated pages",
            h.misuse
        ));
    }
    tap.case(name, || {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    });
}

/// Whether the device answers a PROBE of `endpoint` whose writable part is 4 bytes longer than
/// `probe_size + 4` with used length `probe_size + 4` — a writer of a fixed-size answer, as
/// QEMU's (whose versions before 9.1 abort when the buffer is shorter instead). Safe on
/// every QEMU: the longer buffer holds the whole answer. `true` (the safe guess) when the
/// PROBE cannot be sent; `false` when PROBE is not offered (no short PROBE is ever sent).
fn fixed_size_probe_writer(endpoint: u32, probe_size: u32) -> bool {
    use virtio_iommu_driver::wire::{ReqHead, ReqProbe, RequestType};
    use zerocopy::IntoBytes;
    if !with_iommu(|i| Ok(i.offered_features().contains(Features::PROBE))).unwrap_or(true) {
        return false;
    }
    let req = ReqProbe {
        head: ReqHead::new(RequestType::Probe),
        endpoint: endpoint.into(),
        reserved: [0; 64],
    };
    let answer = probe_size as usize + 4;
    let lens = [answer + 4];
    // Properties 4 bytes longer than probe_size, on purpose.
    super::checker_expect(&["R24"], "conformance-probe-writer-test");
    let mut writable = vec![0u8; lens[0]];
    match with_iommu(|i| i.request_raw(&[req.as_bytes()], &lens, &mut writable)) {
        Ok(used) => used as usize == answer,
        Err(_) => true,
    }
}
