//! The end-to-end cases: QEMU's virtio-iommu driven by our driver, with real DMA from a
//! virtio-blk device and an `edu` DMA engine behind it. Each case prints one TAP line.
//!
//! Everything is found at run time: the IOMMU and endpoint IDs from the devicetree, devices and
//! BARs from PCI enumeration, granule / input range / domain range from the device config. The
//! IOMMU may be a PCI function or a virtio-mmio device ([`crate::iommu_dev`]): the cases are the
//! same; only the ACPI one reports `SKIP` for a virtio-mmio IOMMU, which QEMU's ACPI tables do
//! not describe.
//! Domain IDs are never reused (QEMU 10.0 keeps domains across a virtio reset).

mod blk;
mod conformance;
mod edu;
mod env;
mod errors;
mod irq;
mod isolation;
mod shared;
mod stack;
mod viot;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_iommu_driver::dma::IovaAllocator;
use virtio_iommu_driver::{IommuOptions, ReservedRegion, VirtIOIommu, WaitPolicy};

use crate::hal::IdentityHal;
use crate::iommu_dev::{FoundIommu, IommuDevice};
use crate::pci::{PciBus, PciFunction};
use env::{with_iommu, Domains, IOMMU};

/// Announces that `who` (a case ID, no spaces) breaks the driver statements `codes` (`"R6"`,
/// `"I1"`, … as our device's driver checker names them) on purpose: one
/// `checker-expect: <code> <who>` line each. Against our device the runner fails a run whose
/// checker recorded a statement no line announced (issue #9 item 3).
pub fn checker_expect(codes: &[&str], who: &str) {
    for code in codes {
        println!("checker-expect: {code} {who}");
    }
}

/// The outcome of one case: `Err` carries the reason printed after `#`.
pub type CaseResult = Result<(), String>;

/// Counts and prints TAP lines.
pub struct Tap {
    n: u32,
    passed: u32,
    failed: u32,
}

impl Tap {
    fn new() -> Self {
        Self {
            n: 0,
            passed: 0,
            failed: 0,
        }
    }

    /// Runs one case and prints `ok N - name` or `not ok N - name # reason`.
    pub fn case(&mut self, name: &str, f: impl FnOnce() -> CaseResult) -> bool {
        let ok = self.case_quiet(name, f);
        if ok {
            println!("ok {} - {}", self.n, name);
        }
        ok
    }

    /// Runs one case that may not apply: `Ok(Some(reason))` prints `ok N - name # SKIP reason`
    /// (TAP's directive for a case that does not apply here; it counts as passed), `Ok(None)`
    /// and `Err` as [`Tap::case`].
    pub fn case_or_skip(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<Option<String>, String>,
    ) -> bool {
        let mut skipped = None;
        let n = self.n + 1;
        let ok = self.case_quiet(name, || {
            skipped = f()?;
            Ok(())
        });
        if ok {
            match skipped {
                Some(reason) => println!("ok {n} - {name} # SKIP {reason}"),
                None => println!("ok {n} - {name}"),
            }
        }
        ok
    }

    /// [`Tap::case`] that prints only a failure.
    fn case_quiet(&mut self, name: &str, f: impl FnOnce() -> CaseResult) -> bool {
        self.n += 1;
        match f() {
            Ok(()) => {
                self.passed += 1;
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("not ok {} - {} # {}", self.n, name, why);
                false
            }
        }
    }

    /// Records a case that could not run because an earlier one failed.
    pub fn skipped_by_failure(&mut self, name: &str, because: &str) {
        self.case(name, || Err(format!("not run: {because}")));
    }
}

/// A DMA-capable endpoint behind the IOMMU.
#[derive(Clone, Debug)]
pub struct EndpointDev {
    /// The PCI function.
    pub function: PciFunction,
    /// Endpoint ID from `iommu-map`.
    pub endpoint: u32,
}

/// What the cases share: the IOMMU's parameters and its endpoints.
pub struct Env {
    /// Smallest page size, bytes.
    pub granule: u64,
    /// `input_range`, inclusive.
    pub input_range: (u64, u64),
    /// Fresh domain IDs.
    pub domains: Domains,
    /// Every endpoint behind this IOMMU, with its reserved regions from PROBE.
    pub endpoints: Vec<(EndpointDev, Vec<ReservedRegion>)>,
    /// Endpoint IDs that map to this IOMMU but have no PCI function (for S_NOENT cases).
    pub absent_endpoint: Option<u32>,
    /// Where the IOMMU is (its own PCI function, or its virtio-mmio window).
    pub iommu: IommuDevice,
}

impl Env {
    /// An IOVA allocator over `input_range` minus the reserved regions of `endpoint`.
    pub fn iova_allocator(&self, endpoint: u32) -> Result<IovaAllocator, String> {
        let mut a = IovaAllocator::new(self.input_range.0, self.input_range.1, self.granule)
            .map_err(|e| format!("IOVA allocator: {e}"))?;
        for (dev, regions) in &self.endpoints {
            if dev.endpoint == endpoint {
                for r in regions {
                    a.reserve(r.start, r.end);
                }
            }
        }
        Ok(a)
    }

    /// The endpoint of the first function with this vendor and one of these device IDs.
    pub fn endpoint_of(&self, vendor: u16, devices: &[u16]) -> Option<EndpointDev> {
        self.endpoints
            .iter()
            .map(|(d, _)| d)
            .find(|d| d.function.vendor_id == vendor && devices.contains(&d.function.device_id))
            .cloned()
    }

    /// A fresh domain ID, or an error when `domain_range` is used up.
    pub fn domain(&mut self) -> Result<u32, String> {
        self.domains
            .fresh()
            .ok_or_else(|| String::from("domain_range exhausted"))
    }
}

/// Runs every case; returns `(passed, failed)`.
pub fn run(dtb: &'static [u8], pci: &mut PciBus) -> (u32, u32) {
    let mut tap = Tap::new();
    let env = setup(&mut tap, pci);
    viot::run(&mut tap, dtb, pci);
    if let Some(mut env) = env {
        blk::run(&mut tap, pci, &mut env);
        isolation::run(&mut tap, pci, &mut env);
        errors::run(&mut tap, &mut env);
        conformance::run(&mut tap, pci, &mut env);
        // Last: the same driver once more, interrupt-driven.
        irq::run(&mut tap, dtb, pci, &mut env);
        shared::run(&mut tap, dtb, pci, &mut env);
    }
    // Ends with every fault reported on the way accounted for.
    if let Ok(stats) = with_iommu(|i| Ok(i.event_stats())) {
        println!(
            "# events: {} delivered, {} ignored",
            stats.delivered, stats.ignored
        );
    }
    println!("1..{}", tap.n);
    (tap.passed, tap.failed)
}

/// Finds the virtio-iommu through the devicetree, initialises it, PROBEs every endpoint.
fn setup(tap: &mut Tap, pci: &mut PciBus) -> Option<Env> {
    let mut found = None;
    tap.case("virtio-iommu found through the devicetree", || {
        let f = crate::iommu_dev::find(pci)?;
        println!("# using iommu {} ({})", f.index, f.device.describe());
        found = Some(f);
        Ok(())
    });
    let FoundIommu {
        index: iommu_index,
        device: iommu_dev,
    } = found?;
    stack::run(tap, pci, iommu_index, &iommu_dev);

    let mut env = None;
    tap.case("virtio-iommu initialised: features and config", || {
        let transport = iommu_dev.open(pci)?;
        let options = IommuOptions {
            wait: WaitPolicy { clock: Some(env::now_ns), timeout_ns: 5_000_000_000, ..WaitPolicy::default() },
            ..IommuOptions::default()
        };
        let iommu = VirtIOIommu::<IdentityHal, _>::new(transport, options).map_err(|e| format!("init: {e}"))?;
        let c = *iommu.config();
        println!("# offered features: {:#x} {:?}", iommu.offered_features().bits(), iommu.offered_features());
        println!("# negotiated features: {:#x} {:?}", iommu.features().bits(), iommu.features());
        println!(
            "# config: page_size_mask {:#x} (granule {:#x}), input_range {:#x}..={:#x}, domain_range {}..={}, probe_size {}, bypass {:?}",
            c.page_size_mask, c.granule, c.input_range.0, c.input_range.1, c.domain_range.0,
            c.domain_range.1, c.probe_size, iommu.bypass()
        );
        *IOMMU.lock() = Some(iommu);
        env = Some(Env {
            granule: c.granule,
            input_range: c.input_range,
            domains: Domains::new(c.domain_range.0, c.domain_range.1),
            endpoints: Vec::new(),
            absent_endpoint: None,
            iommu: iommu_dev.clone(),
        });
        Ok(())
    });
    let mut env = env?;

    tap.case("PROBE every endpoint: reserved regions", || {
        let topo = &pci.topology;
        for f in &pci.functions {
            if !iommu_dev.may_serve(f.host_bridge) || iommu_dev.is_function(f) {
                continue;
            }
            let ep = topo
                .pci_endpoint(f.host_bridge, f.requester_id)
                .map_err(|e| format!("iommu-map: {e:?}"))?;
            let Some(ep) = ep.filter(|e| e.iommu == iommu_index) else {
                println!(
                    "# {:02x}:{:02x}.{} not behind this IOMMU",
                    f.device_function.bus, f.device_function.device, f.device_function.function
                );
                continue;
            };
            let regions = with_iommu(|i| i.probe_reserved_regions(ep.endpoint_id))
                .map_err(|e| format!("PROBE endpoint {:#x}: {e}", ep.endpoint_id))?;
            println!(
                "# endpoint {:#x} ({:04x}:{:04x}): {} reserved region(s)",
                ep.endpoint_id,
                f.vendor_id,
                f.device_id,
                regions.len()
            );
            for r in &regions {
                println!("#   {:?} {:#x}..={:#x}", r.kind, r.start, r.end);
            }
            env.endpoints.push((
                EndpointDev {
                    function: f.clone(),
                    endpoint: ep.endpoint_id,
                },
                regions,
            ));
        }
        if env.endpoints.is_empty() {
            return Err("no endpoint behind the IOMMU".into());
        }
        // An endpoint ID that iommu-map gives this IOMMU but no device answers to: the
        // first empty device slot on the IOMMU's bus (any host bridge's first bus for a
        // virtio-mmio IOMMU).
        'search: for (host_bridge, bus) in iommu_dev.buses(pci) {
            for dev in 0..32u16 {
                let rid = (u16::from(bus) << 8) | (dev << 3);
                if pci.by_requester_id(host_bridge, rid).is_some() {
                    continue;
                }
                if let Ok(Some(ep)) = topo.pci_endpoint(host_bridge, rid) {
                    if ep.iommu == iommu_index {
                        env.absent_endpoint = Some(ep.endpoint_id);
                        break 'search;
                    }
                }
            }
        }
        Ok(())
    });
    Some(env)
}
