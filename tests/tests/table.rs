//! Generates the conformance table — case × backend (QEMU 11.1, 10.0, 7.2, our device
//! in-process, our device under QEMU 11.1 through vfio-user) — and checks that `CONFORMANCE.md`
//! at the workspace root is up to date with it; checks that our device's two columns agree
//! case by case, but for the differences listed in [`ALLOWED_DIFFERENCES`].
//!
//! QEMU's columns and the vfio-user one come from booting the firmware (which runs the same
//! cases against the IOMMU it finds and prints `conformance: <case> <result>[: <detail>]`),
//! the boots in parallel threads; the in-process column from running the cases in-process.
//!
//! A second section, the other direction (issue #9 item 3), is driver × statement: what our
//! device's driver checker recorded for our firmware (the vfio-user run above) and for Linux
//! booted against our device in three modes ([`driver`]).
//!
//! After a change in a case or a device, regenerate with
//! `VIOMMU_BLESS=1 cargo test -p virtio-iommu-conformance --test table`.

mod common;
#[path = "table/driver.rs"]
mod driver;

use common::mutants::MUTANTS;
use common::{run_ours, OursConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use virtio_iommu_conformance::{Outcome, CASES};
use virtio_iommu_runner::{
    firmware_elf, run, workspace_root, DeviceChoice, QemuChoice, RunConfig, RunOutcome,
};

/// The line of CONFORMANCE.md from which on the text is hand-written and not compared.
const HAND_WRITTEN_MARKER: &str = "<!-- hand-written below: not generated -->";

/// One column: case id → (word, detail).
type Column = HashMap<String, (String, String)>;

/// The firmware ELF, built once for this test binary.
fn firmware() -> &'static PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| firmware_elf().expect("firmware builds"))
}

/// Our vfio-user server binary, built once for this test binary.
fn server() -> &'static PathBuf {
    static SERVER: OnceLock<PathBuf> = OnceLock::new();
    SERVER.get_or_init(|| {
        virtio_iommu_runner::ours::server_binary(&RunConfig {
            server: std::env::var_os("VIOMMU_SERVER").map(PathBuf::from),
            ..RunConfig::default()
        })
        .expect("the vfio-user server builds")
    })
}

/// The run of the firmware against our device under QEMU 11.1 (vfio-user), once for this test
/// binary: both tests use it. QEMU's version line, the column, and the run (with the server's
/// driver checker findings).
fn ours_under_qemu() -> &'static (String, Column, RunOutcome) {
    static COLUMN: OnceLock<(String, Column, RunOutcome)> = OnceLock::new();
    COLUMN.get_or_init(|| {
        qemu_column(RunConfig {
            qemu: QemuChoice::Debian111,
            device: DeviceChoice::Ours,
            server: Some(server().clone()),
            ..RunConfig::default()
        })
    })
}

/// One column from booting the firmware with `config`: QEMU's version line, case id →
/// (word, detail), and the run.
fn qemu_column(config: RunConfig) -> (String, Column, RunOutcome) {
    let outcome = run(&config, firmware()).expect("QEMU runs");
    assert_eq!(
        outcome.exit_code, 0,
        "firmware failed ({:?}, {:?}):\n{}\n--- stderr ---\n{}",
        config.qemu, config.device, outcome.output, outcome.stderr
    );
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
    (version, col, outcome)
}

/// A QEMU column of QEMU's own devices.
fn qemu_devices(choice: QemuChoice) -> (String, Column) {
    let (version, column, _) = qemu_column(RunConfig {
        qemu: choice,
        ..RunConfig::default()
    });
    (version, column)
}

/// The in-process column's cell of each case: the full-featured configuration's outcome, or
/// the minimal one's where only the minimal configuration passes (cases about features not
/// offered). With the configuration used.
fn ours_in_process() -> Vec<(Outcome, OursConfig)> {
    let full = run_ours(OursConfig::Full);
    let minimal = run_ours(OursConfig::Minimal);
    full.into_iter()
        .zip(minimal)
        .map(|(f, m)| {
            if f == Outcome::Pass || m != Outcome::Pass {
                (f, OursConfig::Full)
            } else {
                (m, OursConfig::Minimal)
            }
        })
        .collect()
}

/// A case where our device's in-process cell and its cell under QEMU (vfio-user) may differ,
/// exactly as given, and why.
struct AllowedDifference {
    case: &'static str,
    /// The in-process cell's word, and the configuration it came from.
    in_process: (&'static str, OursConfig),
    /// The cell under QEMU: word and detail.
    under_qemu: (&'static str, &'static str),
    /// Why the difference is legitimate.
    reason: &'static str,
}

/// Every difference allowed between our two columns; any other fails
/// [`ours_in_process_and_under_qemu_agree`], and so does an entry that no longer occurs. The
/// server runs one configuration, QEMU 11.1's `virtio-iommu-pci` defaults on `-M virt`
/// (`host-device/src/bin/virtio-iommu-vfio-user/main.rs`, `iommu_config`): every feature
/// offered, PROBE included, and `domain_range` = all of u32; the in-process column uses a
/// bounded `domain_range` (0..=4095) and, per case, the minimal configuration.
const ALLOWED_DIFFERENCES: &[AllowedDifference] = &[
    AllowedDifference {
        case: "attach-domain-range",
        in_process: ("pass", OursConfig::Full),
        under_qemu: ("not-run", "domain_range is all of u32"),
        reason: "the server offers QEMU's domain_range, all of u32: no domain lies outside it, \
                 so the case has nothing to send; in-process the range is 0..=4095",
    },
    AllowedDifference {
        case: "probe-not-offered",
        in_process: ("pass", OursConfig::Minimal),
        under_qemu: ("not-run", "device offers PROBE"),
        reason: "the case needs a device without F_PROBE; the in-process cell comes from the \
                 minimal configuration, the server offers PROBE as QEMU does",
    },
];

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

/// The allowed differences between our two columns, for the table's text.
fn differences_section() -> String {
    let mut out = String::from(
        "\nWhere our two columns differ (any other difference fails the test):\n\n\
         | case | in-process | vfio-user, QEMU 11.1 | why |\n|---|---|---|---|\n",
    );
    for d in ALLOWED_DIFFERENCES {
        let config = match d.in_process.1 {
            OursConfig::Full => "full configuration",
            OursConfig::Minimal => "minimal configuration",
        };
        out.push_str(&format!(
            "| `{}` | {} ({config}) | {} | {} |\n",
            d.case,
            d.in_process.0,
            cell(d.under_qemu.0, d.under_qemu.1),
            d.reason.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
    out
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
    driver::assert_statements_accounted_for();
    // The firmware boots and the Linux ones in parallel (each mostly waits on its QEMU);
    // in-process meanwhile.
    let (v111, q111, v10, q10, v72, q72, ours, linux) = std::thread::scope(|s| {
        let t111 = s.spawn(|| qemu_devices(QemuChoice::Debian111));
        let t10 = s.spawn(|| qemu_devices(QemuChoice::System));
        let t72 = s.spawn(|| qemu_devices(QemuChoice::Debian72));
        let tours = s.spawn(ours_under_qemu);
        let tlinux = s.spawn(|| driver::linux_columns(server()));
        let ours = ours_in_process();
        let (v111, q111) = t111.join().expect("QEMU 11.1 column");
        let (v10, q10) = t10.join().expect("QEMU 10.0 column");
        let (v72, q72) = t72.join().expect("QEMU 7.2 column");
        tours.join().expect("vfio-user column");
        let linux = tlinux.join().expect("Linux columns");
        (v111, q111, v10, q10, v72, q72, ours, linux)
    });
    let (vours, qours, ours_run) = ours_under_qemu();

    let mut out = String::new();
    out.push_str("# Conformance table (generated)\n\n");
    for line in [
        "virtio v1.3 §5.13 cases of `virtio-iommu-conformance`, run unchanged against QEMU's",
        "virtio-iommu (from the bare-metal firmware under QEMU, `-M virt` defaults) and against our",
        "device model, twice. Statement numbers: D = device, R = driver requirement, each listed with",
        "its spec section in the [statement index](#statement-index) at the end of this file.",
        "**diverges** = the backend departs from the statement; the text is what",
        "it did.",
        "",
        "- **ours (in-process)**: the cases through our driver on an in-process transport, against",
        "  the full-featured configuration, or the minimal one (no PROBE, BYPASS_CONFIG, INPUT_RANGE)",
        "  for cases about features not offered; `domain_range` 0..=4095.",
        "- **ours (vfio-user, QEMU 11.1)**: the firmware under QEMU 11.1 against our device served",
        "  by `virtio-iommu-vfio-user` through `vfio-user-pci` (`cargo qemu-ours`): virtio-pci",
        "  transport, edu and virtio-blk endpoints of the server, guest RAM shared over vfio-user.",
        "  One configuration, QEMU 11.1's defaults on `-M virt`: every feature offered, PROBE",
        "  included, `domain_range` all of u32, a 48-bit `input_range`, the GICv2m MSI doorbell",
        "  reserved. `tests/tests/table.rs` requires both our columns to agree case by case, but for",
        "  the differences listed below the table, each with its reason.",
        "",
        "",
        "After the case table, the other direction: driver × statement, what our device's driver",
        "checker recorded for our firmware and for Linux booted against our device (strict,",
        "`iommu.strict=0`, `iommu.passthrough=1`), with the evidence.",
        "",
        "Regenerate: `VIOMMU_BLESS=1 cargo test -p virtio-iommu-conformance --test table`.",
        "",
    ] {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "- QEMU 11.1: {v111}\n- QEMU 10.0: {v10}\n- QEMU 7.2: {v72}\n- ours (vfio-user): {vours}, \
         our server `virtio-iommu-vfio-user`\n\n"
    ));
    out.push_str(
        "| case | statement | QEMU 11.1 | QEMU 10.0 | QEMU 7.2 | ours (in-process) | ours (vfio-user, QEMU 11.1) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut counts = [[0u32; 3]; 5];
    for (i, case) in CASES.iter().enumerate() {
        let (ours, _) = &ours[i];
        let cols = [
            q111.get(case.id).cloned().unwrap_or_default(),
            q10.get(case.id).cloned().unwrap_or_default(),
            q72.get(case.id).cloned().unwrap_or_default(),
            (ours.word().to_string(), ours.detail().to_string()),
            qours.get(case.id).cloned().unwrap_or_default(),
        ];
        for (c, (w, _)) in cols.iter().enumerate() {
            let k = match w.as_str() {
                "pass" => 0,
                "diverges" => 1,
                _ => 2,
            };
            counts[c][k] += 1;
        }
        let cells: Vec<String> = cols.iter().map(|(w, d)| cell(w, d)).collect();
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            case.id,
            case.statement.replace('|', "\\|"),
            cells.join(" | ")
        ));
    }
    out.push_str(&format!("\n{} cases. ", CASES.len()));
    for (name, c) in [
        "QEMU 11.1",
        "QEMU 10.0",
        "QEMU 7.2",
        "ours (in-process)",
        "ours (vfio-user)",
    ]
    .iter()
    .zip(counts)
    {
        out.push_str(&format!(
            "{name}: {} pass, {} diverge, {} other. ",
            c[0], c[1], c[2]
        ));
    }
    out.push('\n');
    out.push_str(&differences_section());
    let mut drivers = vec![driver::DriverColumn::from_run(
        "our firmware".into(),
        ours_run,
        true,
    )];
    drivers.extend(linux);
    out.push_str(&driver::section(&drivers));
    out.push_str(&can_fail_section());

    // Every case ran on QEMU (none missing, no harness error) and ours passes them all.
    for (name, col) in [
        ("QEMU 11.1", &q111),
        ("QEMU 10.0", &q10),
        ("QEMU 7.2", &q72),
        ("ours (vfio-user)", qours),
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
        "our device must pass every case in-process"
    );
    assert_eq!(
        counts[4][0] as usize + ALLOWED_DIFFERENCES.len(),
        CASES.len(),
        "our device under QEMU must pass every case but the allowed differences"
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
    if driver::mask_varying(committed_generated) != driver::mask_varying(&out) {
        let generated = workspace_root().join("target/CONFORMANCE.generated.md");
        let _ = std::fs::write(&generated, &out);
        panic!(
            "CONFORMANCE.md is out of date (generated version in {}); regenerate with VIOMMU_BLESS=1",
            generated.display()
        );
    }
}

/// Our device in-process and under QEMU 11.1 through vfio-user give the same outcome, word and
/// detail, for every case, but for the differences of [`ALLOWED_DIFFERENCES`], each exactly as
/// listed (in-process word and configuration, word and detail under QEMU); and each listed
/// difference occurs, so the list cannot go stale.
#[test]
fn ours_in_process_and_under_qemu_agree() {
    let ours = ours_in_process();
    let (_, qours, _) = ours_under_qemu();
    let mut unexpected = Vec::new();
    let mut seen = Vec::new();
    for (case, (outcome, config)) in CASES.iter().zip(&ours) {
        let here = (outcome.word(), outcome.detail());
        let (w, d) = qours.get(case.id).cloned().unwrap_or_default();
        let there = (w.as_str(), d.as_str());
        if here == there {
            continue;
        }
        match ALLOWED_DIFFERENCES.iter().find(|a| a.case == case.id) {
            Some(a) if a.in_process == (here.0, *config) && a.under_qemu == there => {
                seen.push(a.case);
            }
            _ => unexpected.push(format!(
                "{}: in-process {here:?} ({config:?}), under QEMU {there:?}",
                case.id
            )),
        }
    }
    assert!(
        unexpected.is_empty(),
        "our two columns differ beyond the allowed differences:\n{}",
        unexpected.join("\n")
    );
    for a in ALLOWED_DIFFERENCES {
        assert!(
            seen.contains(&a.case),
            "allowed difference `{}` no longer occurs: remove it from ALLOWED_DIFFERENCES",
            a.case
        );
    }
}
