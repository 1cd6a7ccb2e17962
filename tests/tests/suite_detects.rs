//! The suite must be able to fail: run it against our device seen through deliberately broken
//! harnesses (mutants) and check that the cases about the broken behaviour report a divergence.

mod common;

use common::{Ours, OursConfig};
use virtio_iommu_conformance::{run_all, Endpoints, Harness, Hazard, Outcome, RawReply, CASES};
use virtio_iommu_driver::wire::{Config, Features};
use virtio_iommu_driver::{FaultEvent, IommuConfig, IommuError, ProbeProperty};

#[derive(Clone, Copy, PartialEq)]
enum Mutation {
    /// MAP always reports success, whatever the device said.
    MapAlwaysOk,
    /// The endpoint's writes never reach memory.
    DmaOutLost,
    /// Fault events are never delivered.
    NoFaults,
    /// Raw requests come back with used length 4 and S_UNSUPP for unknown types (QEMU-like).
    UnknownTypeWritten,
    /// The device presents `bypass = 2` (bits the driver masks away).
    BypassTwo,
}

struct Mutant {
    inner: Ours,
    m: Mutation,
}

impl Harness for Mutant {
    fn features(&self) -> Features {
        self.inner.features()
    }
    fn offered(&self) -> Features {
        self.inner.offered()
    }
    fn config(&self) -> IommuConfig {
        self.inner.config()
    }
    fn attach(&mut self, d: u32, e: u32) -> Result<(), IommuError> {
        self.inner.attach(d, e)
    }
    fn attach_bypass(&mut self, d: u32, e: u32) -> Result<(), IommuError> {
        self.inner.attach_bypass(d, e)
    }
    fn detach(&mut self, d: u32, e: u32) -> Result<(), IommuError> {
        self.inner.detach(d, e)
    }
    fn map(&mut self, d: u32, s: u64, e: u64, p: u64, f: u32) -> Result<(), IommuError> {
        let r = self.inner.map(d, s, e, p, f);
        if self.m == Mutation::MapAlwaysOk {
            Ok(())
        } else {
            r
        }
    }
    fn unmap(&mut self, d: u32, s: u64, e: u64) -> Result<(), IommuError> {
        self.inner.unmap(d, s, e)
    }
    fn probe(&mut self, e: u32) -> Result<Vec<ProbeProperty>, IommuError> {
        self.inner.probe(e)
    }
    fn raw_config(&mut self) -> Result<Config, IommuError> {
        let mut c = self.inner.raw_config()?;
        if self.m == Mutation::BypassTwo {
            c.bypass = 2;
        }
        Ok(c)
    }
    fn bypass(&mut self) -> Option<bool> {
        self.inner.bypass()
    }
    fn set_bypass(&mut self, on: bool) -> Result<(), IommuError> {
        self.inner.set_bypass(on)
    }
    fn raw(&mut self, r: &[&[u8]], w: &[usize]) -> Option<Result<RawReply, IommuError>> {
        let unknown = r
            .first()
            .and_then(|p| p.first())
            .is_some_and(|&t| t == 0 || t > 5);
        if self.m == Mutation::UnknownTypeWritten && unknown {
            let mut writable = vec![0u8; w.iter().sum()];
            writable[0] = 2;
            return Some(Ok(RawReply { used: 4, writable }));
        }
        self.inner.raw(r, w)
    }
    fn faults(&mut self) -> Result<Vec<FaultEvent>, IommuError> {
        let f = self.inner.faults()?;
        Ok(if self.m == Mutation::NoFaults {
            Vec::new()
        } else {
            f
        })
    }
    fn ignored_events(&mut self) -> u64 {
        self.inner.ignored_events()
    }
    fn endpoints(&self) -> Endpoints {
        self.inner.endpoints()
    }
    fn alloc_page(&mut self) -> Option<u64> {
        self.inner.alloc_page()
    }
    fn write_phys(&mut self, p: u64, d: &[u8]) {
        self.inner.write_phys(p, d)
    }
    fn read_phys(&mut self, p: u64, l: usize) -> Vec<u8> {
        self.inner.read_phys(p, l)
    }
    fn dma_in(&mut self, i: u64, l: u64) {
        self.inner.dma_in(i, l)
    }
    fn dma_out(&mut self, i: u64, l: u64) {
        if self.m != Mutation::DmaOutLost {
            self.inner.dma_out(i, l)
        }
    }
    fn reset(&mut self) -> Option<Result<(), IommuError>> {
        self.inner.reset()
    }
    fn needs_reset(&mut self) -> bool {
        self.inner.needs_reset()
    }
    fn hazard(&self, h: Hazard) -> Option<&'static str> {
        self.inner.hazard(h)
    }
}

fn diverging(m: Mutation) -> Vec<&'static str> {
    let mut h = Mutant {
        inner: Ours::new(OursConfig::Full),
        m,
    };
    let mut ids = Vec::new();
    run_all(&mut h, |case, o| {
        if matches!(o, Outcome::Diverges(_)) {
            ids.push(case.id);
        }
    });
    ids
}

#[test]
fn broken_behaviour_is_reported_as_divergence() {
    let expect = [
        (
            Mutation::MapAlwaysOk,
            &[
                "map-overlap-identical",
                "map-overlap-partial",
                "map-no-domain",
                "map-bypass-domain",
            ][..],
        ),
        (
            Mutation::DmaOutLost,
            &[
                "map-write",
                "attach-move",
                "bypass-1-identity",
                "bypass-domain-identity",
            ][..],
        ),
        (
            Mutation::NoFaults,
            &[
                "fault-unmapped",
                "map-read-only",
                "unmap-exact",
                "bypass-0-blocks",
            ][..],
        ),
        (
            Mutation::UnknownTypeWritten,
            &["req-unknown-type", "req-type-zero"][..],
        ),
    ];
    for (m, cases) in expect {
        let got = diverging(m);
        for id in cases {
            assert!(CASES.iter().any(|c| c.id == *id), "no case {id}");
            assert!(
                got.contains(id),
                "mutation did not make `{id}` diverge; diverging: {got:?}"
            );
        }
    }
}
