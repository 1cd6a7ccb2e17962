//! The conformance suite against our device model, in-process: every case must pass.

mod common;

use common::{run_ours, OursConfig};
use virtio_iommu_conformance::{Outcome, CASES};

#[test]
fn every_case_passes_against_our_device() {
    // The full-featured configuration runs nearly every case; the second one (no PROBE, no
    // BYPASS_CONFIG) runs the cases about features not being offered.
    let full = run_ours(OursConfig::Full);
    let minimal = run_ours(OursConfig::Minimal);
    let mut failures = Vec::new();
    for (case, (a, b)) in CASES.iter().zip(full.iter().zip(&minimal)) {
        for (cfg, o) in [("full", a), ("minimal", b)] {
            if matches!(o, Outcome::Diverges(_) | Outcome::Error(_)) {
                failures.push(format!("{} [{cfg}]: {} {}", case.id, o.word(), o.detail()));
            }
        }
        if a != &Outcome::Pass && b != &Outcome::Pass {
            failures.push(format!(
                "{}: passed in no configuration ({} / {})",
                case.id,
                a.detail(),
                b.detail()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(CASES.len() >= 60, "the suite has {} cases", CASES.len());
}
