//! The in-process backend: our device model (`virtio-iommu-device`) driven by the project's
//! driver through the in-process virtio-mmio transport.

#![allow(dead_code)]

pub mod mutants;

use virtio_iommu_conformance::{
    probe_endpoints, run_all, Endpoints, Harness, Hazard, Outcome, RawReply, DMA_BUFFER_SIZE,
};
use virtio_iommu_device::config::{DeviceConfig, ResvRegion};
use virtio_iommu_device::endpoint::DmaEndpoint;
use virtio_iommu_device::inprocess::GuestMem;
use virtio_iommu_device::inprocess::{InProcessTransport, TestBed, TestHal};
use virtio_iommu_device::CheckerReport;
use virtio_iommu_driver::wire::{Config, Features, MapFlags};
use virtio_iommu_driver::{FaultEvent, IommuConfig, IommuError, ProbeProperty, VirtIOIommu};

/// Endpoint the DMA model uses.
pub const DMA_EP: u32 = 0x18;
/// A second endpoint.
pub const OTHER_EP: u32 = 0x10;
/// An endpoint ID the device does not know.
pub const ABSENT_EP: u32 = 0x99;

/// Which device configuration to test.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum OursConfig {
    /// Every feature offered, an MSI region per endpoint, a bounded domain range.
    Full,
    /// No PROBE, no BYPASS_CONFIG, no INPUT_RANGE.
    Minimal,
}

fn config(which: OursConfig) -> DeviceConfig {
    // The driver checker on: it changes no answer, and `checker_declared.rs` holds the suite
    // to the driver statements each case declares it breaks.
    let b = DeviceConfig::builder()
        .driver_checker(true)
        .endpoints([OTHER_EP, DMA_EP])
        .domain_range(0, 4095)
        .resv_region(DMA_EP, ResvRegion::msi(0x0802_0000, 0x0802_0fff))
        .resv_region(OTHER_EP, ResvRegion::msi(0x0802_0000, 0x0802_0fff));
    let b = match which {
        OursConfig::Full => b,
        OursConfig::Minimal => b
            .feature(Features::PROBE, false)
            .feature(Features::BYPASS_CONFIG, false)
            .feature(Features::INPUT_RANGE, false),
    };
    b.build().expect("valid device config")
}

pub struct Ours {
    bed: TestBed,
    driver: Option<VirtIOIommu<TestHal, InProcessTransport>>,
    ep: DmaEndpoint<GuestMem>,
    buffer: Vec<u8>,
    config: IommuConfig,
    ignored: u64,
}

impl Ours {
    pub fn new(which: OursConfig) -> Self {
        let bed = TestBed::with_ram(config(which), 0x4000_0000, 64 << 20).expect("test bed");
        let driver = bed.driver().expect("driver initialises on our device");
        let config = *driver.config();
        let ep = bed.dma_endpoint(DMA_EP).expect("endpoint");
        let mut ours = Self {
            bed,
            driver: Some(driver),
            ep,
            buffer: vec![0; DMA_BUFFER_SIZE as usize],
            config,
            ignored: 0,
        };
        probe_endpoints(&mut ours).expect("PROBE of the endpoints");
        ours
    }

    /// The device's driver checker report so far.
    pub fn checker_report(&self) -> CheckerReport {
        self.bed.device().checker_report()
    }

    /// The DMA endpoint's internal buffer.
    pub fn buffer(&self) -> &[u8] {
        &self.buffer
    }

    /// The DMA endpoint's internal buffer, for mutants that change what it received.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.buffer
    }

    /// Reads guest RAM; `None` outside it.
    pub fn try_read_phys(&self, phys: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = vec![0; len];
        self.bed.read_phys(phys, &mut v).ok().map(|()| v)
    }

    /// Writes guest RAM; `false` outside it.
    pub fn try_write_phys(&self, phys: u64, data: &[u8]) -> bool {
        self.bed.write_phys(phys, data).is_ok()
    }

    fn drv(&mut self) -> Result<&mut VirtIOIommu<TestHal, InProcessTransport>, IommuError> {
        self.driver.as_mut().ok_or(IommuError::Broken)
    }
}

impl Harness for Ours {
    fn features(&self) -> Features {
        self.driver
            .as_ref()
            .map(|d| d.features())
            .unwrap_or_default()
    }
    fn offered(&self) -> Features {
        self.driver
            .as_ref()
            .map(|d| d.offered_features())
            .unwrap_or_default()
    }
    fn config(&self) -> IommuConfig {
        self.config
    }
    fn attach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        self.drv()?.attach(domain, endpoint)
    }
    fn attach_bypass(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        self.drv()?.attach_bypass(domain, endpoint)
    }
    fn detach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuError> {
        self.drv()?.detach(domain, endpoint)
    }
    fn map(&mut self, domain: u32, s: u64, e: u64, p: u64, flags: u32) -> Result<(), IommuError> {
        self.drv()?
            .map(domain, s, e, p, MapFlags::from_bits_retain(flags))
    }
    fn unmap(&mut self, domain: u32, s: u64, e: u64) -> Result<(), IommuError> {
        self.drv()?.unmap(domain, s, e)
    }
    fn probe(&mut self, endpoint: u32) -> Result<Vec<ProbeProperty>, IommuError> {
        let mut v = Vec::new();
        self.drv()?.probe(endpoint, |p| v.push(p))?;
        Ok(v)
    }
    fn raw_config(&mut self) -> Result<Config, IommuError> {
        self.drv()?.read_raw_config()
    }
    fn bypass(&mut self) -> Option<bool> {
        self.driver.as_ref()?.bypass()
    }
    fn set_bypass(&mut self, on: bool) -> Result<(), IommuError> {
        self.drv()?.set_bypass(on)
    }
    fn raw(
        &mut self,
        readable: &[&[u8]],
        writable_lens: &[usize],
    ) -> Option<Result<RawReply, IommuError>> {
        let mut writable = vec![0u8; writable_lens.iter().sum()];
        let r = self
            .drv()
            .and_then(|d| d.request_raw(readable, writable_lens, &mut writable));
        Some(r.map(|used| RawReply { used, writable }))
    }
    fn faults(&mut self) -> Result<Vec<FaultEvent>, IommuError> {
        let d = self.drv()?;
        let mut v = Vec::new();
        while let Some(f) = d.poll_event()? {
            v.push(f);
        }
        self.ignored = d.event_stats().ignored;
        Ok(v)
    }
    fn ignored_events(&mut self) -> u64 {
        self.driver
            .as_ref()
            .map(|d| d.event_stats().ignored)
            .unwrap_or(self.ignored)
    }
    fn endpoints(&self) -> Endpoints {
        Endpoints {
            dma: DMA_EP,
            other: Some(OTHER_EP),
            absent: Some(ABSENT_EP),
        }
    }
    fn alloc_pages(&mut self, granules: u64) -> Option<u64> {
        let g = self.config.granule;
        // RAM pages are 4 KiB aligned; over-allocate to align larger granules.
        let p = self.bed.alloc(((granules + 1) * g) as usize)?;
        Some(p.next_multiple_of(g))
    }
    fn write_phys(&mut self, phys: u64, data: &[u8]) {
        self.bed
            .write_phys(phys, data)
            .expect("write inside guest RAM");
    }
    fn read_phys(&mut self, phys: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.bed
            .read_phys(phys, &mut v)
            .expect("read inside guest RAM");
        v
    }
    fn dma_in(&mut self, iova: u64, len: u64) {
        let len = len.min(DMA_BUFFER_SIZE) as usize;
        let mut tmp = vec![0u8; len];
        // Like edu, a failed read leaves the buffer with what the failed access returned.
        if self.ep.read(iova, &mut tmp).is_err() {
            tmp.fill(0xff);
        }
        self.buffer[..len].copy_from_slice(&tmp);
    }
    fn dma_out(&mut self, iova: u64, len: u64) {
        let len = len.min(DMA_BUFFER_SIZE) as usize;
        let _ = self.ep.write(iova, &self.buffer[..len]);
    }
    fn reset(&mut self) -> Option<Result<(), IommuError>> {
        // Dropping the driver resets the device (status 0); then initialise again.
        self.driver = None;
        Some(
            self.bed
                .driver()
                .map(|d| {
                    self.driver = Some(d);
                })
                .and_then(|()| probe_endpoints(self)),
        )
    }
    fn needs_reset(&mut self) -> bool {
        use virtio_drivers::transport::{DeviceStatus, Transport};
        self.driver.as_mut().is_some_and(|d| {
            d.transport_mut()
                .get_status()
                .contains(DeviceStatus::DEVICE_NEEDS_RESET)
        })
    }
    fn hazard(&self, _hazard: Hazard) -> Option<&'static str> {
        None
    }
}

/// Runs the whole suite against our device in `which` configuration; one outcome per case.
pub fn run_ours(which: OursConfig) -> Vec<Outcome> {
    let mut h = Ours::new(which);
    let mut out = Vec::new();
    run_all(&mut h, |_, o| out.push(o.clone()));
    out
}
