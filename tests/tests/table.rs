//! Generates the conformance table — case × backend (QEMU 11.1, 10.0, 7.2, our device) — and
//! checks that `CONFORMANCE.md` at the workspace root is up to date with it.
//!
//! QEMU's columns come from booting the firmware (which runs the same cases against QEMU's
//! device and prints `conformance: <case> <result>[: <detail>]`); ours from running the cases
//! in-process. After a change in a case or a device, regenerate with
//! `VIOMMU_BLESS=1 cargo test -p virtio-iommu-conformance --test table`.

mod common;

use common::mutants::MUTANTS;
use common::{run_ours, OursConfig};
use std::collections::HashMap;
use virtio_iommu_conformance::{Outcome, CASES};
use virtio_iommu_runner::{firmware_elf, run, workspace_root, QemuChoice, RunConfig};

/// The line of CONFORMANCE.md from which on the text is hand-written and not compared.
const HAND_WRITTEN_MARKER: &str = "<!-- hand-written below: not generated -->";

/// One QEMU column: case id → (word, detail), and QEMU's version line.
fn qemu_column(choice: QemuChoice) -> (String, HashMap<String, (String, String)>) {
    let elf = firmware_elf().expect("firmware builds");
    let outcome = run(
        &RunConfig {
            qemu: choice,
            ..RunConfig::default()
        },
        &elf,
    )
    .expect("QEMU runs");
    assert_eq!(outcome.exit_code, 0, "firmware failed:\n{}", outcome.output);
    let version = std::process::Command::new(&outcome.qemu)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let mut col = HashMap::new();
    for line in outcome.output.lines() {
        let Some(rest) = line.trim_end().strip_prefix("conformance: ") else {
            continue;
        };
        let (id, result) = rest.split_once(' ').unwrap_or((rest, ""));
        let (word, detail) = result.split_once(": ").unwrap_or((result, ""));
        col.insert(id.to_string(), (word.to_string(), detail.to_string()));
    }
    (version, col)
}

fn cell(word: &str, detail: &str) -> String {
    let detail = detail.replace('|', "\\|");
    match word {
        "pass" => "pass".into(),
        "diverges" => format!("**diverges**: {detail}"),
        "not-run" => format!("not run: {detail}"),
        "" => "missing".into(),
        w => format!("**{w}**: {detail}"),
    }
}

/// The footer: the device mutants of `common/mutants.rs` and the cases each must break.
fn can_fail_section() -> String {
    let mut out = String::new();
    out.push_str("\n## How we know each case can fail\n\n");
    out.push_str(
        "A case that cannot fail proves nothing. `tests/tests/suite_detects.rs` runs the suite\n",
    );
    out.push_str(
        "against our device behind *mutants*: harness wrappers that break one statement (a status\n",
    );
    out.push_str(
        "substituted, a request skipped or added, a fault dropped or altered, data lost, a config\n",
    );
    out.push_str(
        "field changed, state kept across a reset). Each case listed must report **diverges** under\n",
    );
    out.push_str(
        "its mutant, both in a whole run and run alone on a fresh device; every case is listed at\n",
    );
    out.push_str(
        "least once. The same test runs a benign endpoint variation (a faulting read leaves the\n",
    );
    out.push_str(
        "endpoint's buffer as it was) and requires every case to pass under it: data checks use a\n",
    );
    out.push_str("fresh pattern each time, so stale data never passes for a translation.\n\n");
    out.push_str("| mutant | what it breaks | cases that must diverge |\n|---|---|---|\n");
    for e in MUTANTS {
        let name = format!("{:?}", e.m);
        let name = name.split([' ', '(']).next().unwrap_or("").to_string();
        let config = match e.config {
            OursConfig::Full => "",
            OursConfig::Minimal => " (minimal configuration)",
        };
        let cases: Vec<String> = e.cases.iter().map(|c| format!("`{c}`")).collect();
        out.push_str(&format!(
            "| `{name}` | {}{config} | {} |\n",
            e.m.describe().replace('|', "\\|"),
            cases.join(", ")
        ));
    }
    out
}

#[test]
fn conformance_table_is_current() {
    let (v10, q10) = qemu_column(QemuChoice::System);
    let (v72, q72) = qemu_column(QemuChoice::Debian72);
    let (v111, q111) = qemu_column(QemuChoice::Debian111);
    let full = run_ours(OursConfig::Full);
    let minimal = run_ours(OursConfig::Minimal);

    let mut out = String::new();
    out.push_str("# Conformance table (generated)\n\n");
    out.push_str(
        "virtio v1.3 §5.13 cases of `virtio-iommu-conformance`, run unchanged against QEMU's\n",
    );
    out.push_str("virtio-iommu (from the bare-metal firmware under QEMU, `-M virt` defaults) and against our\n");
    out.push_str(
        "device model (in-process). Statement numbers: D = device, R = driver requirement, as\n",
    );
    out.push_str(
        "numbered in the spec checklist. **diverges** = the backend departs from the statement;\n",
    );
    out.push_str("the text is what it did. Our column is the full-featured configuration, or the minimal one\n");
    out.push_str(
        "(no PROBE, BYPASS_CONFIG, INPUT_RANGE) for cases about features not offered.\n\n",
    );
    out.push_str(
        "Regenerate: `VIOMMU_BLESS=1 cargo test -p virtio-iommu-conformance --test table`.\n\n",
    );
    out.push_str(&format!(
        "- QEMU 11.1: {v111}\n- QEMU 10.0: {v10}\n- QEMU 7.2: {v72}\n\n"
    ));
    out.push_str(
        "| case | statement | QEMU 11.1 | QEMU 10.0 | QEMU 7.2 | ours |\n|---|---|---|---|---|---|\n",
    );
    let mut counts = [[0u32; 3]; 4];
    for (i, case) in CASES.iter().enumerate() {
        let ours = if full[i] == Outcome::Pass || minimal[i] != Outcome::Pass {
            &full[i]
        } else {
            &minimal[i]
        };
        let cols = [
            q111.get(case.id).cloned().unwrap_or_default(),
            q10.get(case.id).cloned().unwrap_or_default(),
            q72.get(case.id).cloned().unwrap_or_default(),
            (ours.word().to_string(), ours.detail().to_string()),
        ];
        for (c, (w, _)) in cols.iter().enumerate() {
            let k = match w.as_str() {
                "pass" => 0,
                "diverges" => 1,
                _ => 2,
            };
            counts[c][k] += 1;
        }
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            case.id,
            case.statement.replace('|', "\\|"),
            cell(&cols[0].0, &cols[0].1),
            cell(&cols[1].0, &cols[1].1),
            cell(&cols[2].0, &cols[2].1),
            cell(&cols[3].0, &cols[3].1)
        ));
    }
    out.push_str(&format!("\n{} cases. ", CASES.len()));
    for (name, c) in ["QEMU 11.1", "QEMU 10.0", "QEMU 7.2", "ours"]
        .iter()
        .zip(counts)
    {
        out.push_str(&format!(
            "{name}: {} pass, {} diverge, {} other. ",
            c[0], c[1], c[2]
        ));
    }
    out.push('\n');
    out.push_str(&can_fail_section());

    // Every case ran on QEMU (none missing, no harness error) and ours passes them all.
    for (name, col) in [
        ("QEMU 11.1", &q111),
        ("QEMU 10.0", &q10),
        ("QEMU 7.2", &q72),
    ] {
        for case in CASES {
            let (w, d) = col.get(case.id).cloned().unwrap_or_default();
            assert!(
                matches!(w.as_str(), "pass" | "diverges" | "not-run"),
                "{name} {}: `{w}` {d}",
                case.id
            );
        }
    }
    assert_eq!(
        counts[3][0] as usize,
        CASES.len(),
        "our device must pass every case"
    );

    // Everything from the marker line on is written by hand (measurements that are not
    // regenerated on every run, such as the cargo-mutants score) and kept as it is.
    let path = workspace_root().join("CONFORMANCE.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let (committed_generated, hand_written) = match committed.find(HAND_WRITTEN_MARKER) {
        Some(at) => committed.split_at(at),
        None => (committed.as_str(), ""),
    };
    if std::env::var_os("VIOMMU_BLESS").is_some() {
        std::fs::write(&path, format!("{out}{hand_written}")).expect("write CONFORMANCE.md");
        return;
    }
    if committed_generated != out {
        let generated = workspace_root().join("target/CONFORMANCE.generated.md");
        let _ = std::fs::write(&generated, &out);
        panic!(
            "CONFORMANCE.md is out of date (generated version in {}); regenerate with VIOMMU_BLESS=1",
            generated.display()
        );
    }
}
