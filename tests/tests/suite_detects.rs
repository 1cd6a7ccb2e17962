//! The suite must be able to fail: run it against our device seen through deliberately broken
//! harnesses (mutants, `common/mutants.rs`) and check that the cases about the broken behaviour
//! report a divergence — and that every case is named by at least one mutant.

mod common;

use common::mutants::{Mutant, Mutation, MUTANTS};
use common::OursConfig;
use std::collections::BTreeSet;
use virtio_iommu_conformance::{run_all, run_case, Ctx, Harness, Outcome, CASES};

/// Runs the whole suite against `m`; the outcome of every case.
fn outcomes(config: OursConfig, m: Mutation) -> Vec<(&'static str, Outcome)> {
    let mut h = Mutant::new(config, m);
    let mut out = Vec::new();
    run_all(&mut h, |case, o| out.push((case.id, o.clone())));
    out
}

/// Runs one case alone against a fresh `m`.
fn alone(config: OursConfig, m: Mutation, id: &str) -> Outcome {
    let mut h = Mutant::new(config, m);
    let mut ctx = Ctx::new(&h.config());
    let case = CASES.iter().find(|c| c.id == id).expect("case exists");
    run_case(&mut h, &mut ctx, case)
}

/// Each mutant makes each of its cases diverge, both in a whole run (after the other cases, as
/// on QEMU) and run alone on a fresh device (so the case itself, not what an earlier case left
/// behind, detects the mutant).
#[test]
fn every_mutant_makes_its_cases_diverge() {
    let mut missed = Vec::new();
    for e in MUTANTS {
        let got = outcomes(e.config, e.m);
        for id in e.cases {
            assert!(CASES.iter().any(|c| c.id == *id), "no case {id}");
            let (_, o) = got.iter().find(|(c, _)| c == id).expect("ran");
            let a = alone(e.config, e.m, id);
            for (how, o) in [("in the run", o), ("alone", &a)] {
                if !matches!(o, Outcome::Diverges(_)) {
                    missed.push(format!(
                        "{:?} ({}): `{id}` {how}: {} {}",
                        e.m,
                        e.m.describe(),
                        o.word(),
                        o.detail()
                    ));
                }
            }
        }
    }
    assert!(
        missed.is_empty(),
        "{} case(s) did not diverge under their mutant:\n{}",
        missed.len(),
        missed.join("\n")
    );
}

#[test]
fn every_case_has_a_mutant() {
    let named: BTreeSet<&str> = MUTANTS
        .iter()
        .flat_map(|e| e.cases.iter().copied())
        .collect();
    let orphans: Vec<&str> = CASES
        .iter()
        .map(|c| c.id)
        .filter(|id| !named.contains(id))
        .collect();
    assert!(orphans.is_empty(), "cases no mutant breaks: {orphans:?}");
}

/// A mutant's harness without the mutation passes every case: the mutant machinery (shadow
/// state, request log) changes nothing by itself.
#[test]
fn benign_endpoint_passes_every_case() {
    // A faulting read that leaves the endpoint's buffer as it was is not a device defect (edu
    // keeps whatever the failed access returned): no case may report a divergence for it.
    for m in [Mutation::FailedReadKeepsBuffer] {
        for config in [OursConfig::Full, OursConfig::Minimal] {
            let bad: Vec<String> = outcomes(config, m)
                .into_iter()
                .filter(|(_, o)| matches!(o, Outcome::Diverges(_) | Outcome::Error(_)))
                .map(|(id, o)| format!("{id}: {} {}", o.word(), o.detail()))
                .collect();
            assert!(bad.is_empty(), "{m:?} [{config:?}]: {bad:?}");
        }
    }
}
