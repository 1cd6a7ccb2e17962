//! The other direction of the conformance table (issue #9 item 3): driver × statement. Rows
//! are the statements our device's driver checker records (`Statement::CHECKED`), columns the
//! drivers that drove our device under QEMU 11.1 with the checker on: our firmware (the run of
//! [`super::ours_under_qemu`]) and Linux in three modes (strict, `iommu.strict=0`,
//! `iommu.passthrough=1`), booted here by [`linux_columns`]; each cell the checker's evidence.

use std::path::Path;
use virtio_iommu_device::Statement;
use virtio_iommu_runner::linux::{linux_problems, run_linux, LinuxConfig};
use virtio_iommu_runner::ours::{parse_expects, CheckerFindings, CheckerViolation};
use virtio_iommu_runner::{DeviceChoice, QemuChoice, RunConfig, RunOutcome};

/// The driver requirements (R numbers of the statement index) a device cannot observe, and why
/// (the checker's module documentation, "What is not checked, and why"): with
/// `Statement::CHECKED`, every R1..=R36.
pub const NOT_OBSERVABLE: &[(&[u8], &str)] = &[
    (
        &[4],
        "whether the driver *can* send MAP/UNMAP is its intent",
    ),
    (
        &[7, 26, 27, 28, 29, 31, 32, 33, 34, 35, 36],
        "how the driver treats what the device wrote (used length, PROBE properties, fault \
         reports) never reaches the device",
    ),
    (
        &[11],
        "which endpoints are isolatable from each other is known to the platform, not the IOMMU",
    ),
    (
        &[17, 18],
        "whether a physical range holds device registers, and which accesses the driver wants \
         to allow, is the driver's knowledge",
    ),
];

/// One driver's column: its header, the checker's findings, its `device saw:` line, and the
/// statements it announced breaking on purpose (empty for Linux).
pub struct DriverColumn {
    /// The column header.
    pub header: String,
    /// What the server's checker printed.
    pub findings: CheckerFindings,
    /// The server's `device saw: …` line.
    pub saw: String,
    /// Whether the guest announces its deliberate violations (our firmware).
    pub announces: bool,
    /// Statement codes the guest announced (`checker-expect:`) breaking deliberately.
    pub announced: Vec<String>,
}

impl DriverColumn {
    /// The column of a run against our device: `announce` when the guest's `checker-expect:`
    /// lines count (our firmware). Panics (a test failure) when the server printed no checker
    /// report or no `device saw:` line.
    pub fn from_run(header: String, run: &RunOutcome, announce: bool) -> Self {
        let server = run.server.as_ref().expect("a run against our server");
        let findings = server
            .checker
            .clone()
            .unwrap_or_else(|| panic!("{header}: the server printed no checker report"));
        let saw = server
            .saw
            .clone()
            .unwrap_or_else(|| panic!("{header}: the server printed no `device saw:` line"));
        let announced = if announce {
            parse_expects(&run.output)
                .into_iter()
                .map(|e| e.statement)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            header,
            findings,
            saw,
            announces: announce,
            announced,
        }
    }

    /// The cell of statement `code`.
    fn cell(&self, code: &str) -> String {
        let Some(v) = self
            .findings
            .violations
            .iter()
            .find(|v| v.statement == code)
        else {
            return "no violation".into();
        };
        if !self.announces {
            return format!("**{}**: {}", v.count, evidence(v));
        }
        if self.announced.iter().any(|a| a == code) {
            format!("announced (deliberate): {}", v.count)
        } else {
            format!("**UNANNOUNCED {}**: {}", v.count, evidence(v))
        }
    }
}

/// A violation's first offending bytes and why, from its server line
/// (`checker: <statement> <count> <hex…> (<why>)`), the bytes as code.
fn evidence(v: &CheckerViolation) -> String {
    let rest = v.line.strip_prefix("checker: ").unwrap_or(&v.line);
    let rest = rest.splitn(3, ' ').nth(2).unwrap_or("").trim();
    let (bytes, why) = match rest.find(" (") {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let bytes = if bytes.is_empty() {
        "(no bytes)".to_string()
    } else {
        format!("`{bytes}`")
    };
    format!("{bytes}{why}").replace('|', "\\|")
}

/// The Linux runs against our device, in parallel: (header, kernel arguments, whether the
/// disk's DMA is translated: thousands of MAP/UNMAP, or none in an identity domain).
const LINUX_MODES: [(&str, &[&str], bool); 3] = [
    ("strict", &[], true),
    ("`iommu.strict=0`", &["iommu.strict=0"], true),
    ("`iommu.passthrough=1`", &["iommu.passthrough=1"], false),
];

/// The count after `word` in a `device saw: ATTACH a DETACH d MAP m …` line.
fn saw_count(saw: &str, word: &str) -> Option<u64> {
    let mut words = saw.split_whitespace();
    words.find(|w| *w == word)?;
    words.next()?.parse().ok()
}

/// `text` with the MAP and UNMAP counts of the Linux columns' `device saw:` lines replaced by
/// `…`: they vary by a few from boot to boot (the kernel's own timing), so the comparison of
/// the committed table leaves them out; [`linux_columns`] asserts their order of magnitude.
pub fn mask_varying(text: &str) -> String {
    text.lines()
        .map(|line| {
            if !(line.starts_with("- Linux ") && line.contains(": device saw: ")) {
                return line.to_string();
            }
            let mut words: Vec<String> = line.split(' ').map(String::from).collect();
            for i in 1..words.len() {
                if matches!(words[i - 1].as_str(), "MAP" | "UNMAP") {
                    words[i] = "…".into();
                }
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Boots Debian's Linux (trixie's kernel, `cargo qemu-linux`'s guest) against our device under
/// QEMU 11.1 with `server`, in each of [`LINUX_MODES`], in parallel threads; every run must
/// pass (`linux_problems` empty), with one ATTACH, no fault, and over 1000 MAP and UNMAP
/// each (DMA domain) or none (identity domain). One column each, headed with the kernel
/// release.
pub fn linux_columns(server: &Path) -> Vec<DriverColumn> {
    std::thread::scope(|s| {
        let threads: Vec<_> = LINUX_MODES
            .iter()
            .map(|(name, args, translated)| {
                s.spawn(move || {
                    let config = LinuxConfig {
                        run: RunConfig {
                            qemu: QemuChoice::Debian111,
                            device: DeviceChoice::Ours,
                            server: Some(server.to_path_buf()),
                            timeout: std::time::Duration::from_secs(240),
                            ..RunConfig::default()
                        },
                        kernel_deb: None,
                        kernel_args: args.iter().map(|a| a.to_string()).collect(),
                    };
                    let outcome =
                        run_linux(&config).unwrap_or_else(|e| panic!("Linux {name}: {e}"));
                    let problems = linux_problems(&outcome.run, &config.kernel_args);
                    assert!(
                        problems.is_empty(),
                        "Linux {name}: {problems:#?}\n--- stderr ---\n{}",
                        outcome.run.stderr
                    );
                    // Headed by the kernel's version series (`6.12`), not its full release
                    // (`6.12.118+deb13-arm64`): trixie's kernel package moves on with every
                    // point release, and the committed table would go stale with it.
                    let series: Vec<&str> = outcome.guest.release.splitn(3, '.').take(2).collect();
                    let column = DriverColumn::from_run(
                        format!("Linux {} {name}", series.join(".")),
                        &outcome.run,
                        false,
                    );
                    let count = |word| saw_count(&column.saw, word);
                    assert_eq!(count("ATTACH"), Some(1), "Linux {name}: {}", column.saw);
                    assert_eq!(count("faults"), Some(0), "Linux {name}: {}", column.saw);
                    for word in ["MAP", "UNMAP"] {
                        let n = count(word).unwrap_or_else(|| panic!("{name}: {}", column.saw));
                        assert!(
                            if *translated { n > 1000 } else { n == 0 },
                            "Linux {name}: {word} {n} ({})",
                            column.saw
                        );
                    }
                    column
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("Linux column"))
            .collect()
    })
}

/// The section: one row per checked statement (and any other statement a column shows), a
/// `device saw:` line per column, and the statements no device can observe.
pub fn section(columns: &[DriverColumn]) -> String {
    let mut out =
        String::from("\n## Drivers × statements: what our device's driver checker saw\n\n");
    for line in [
        "The other direction of the table: the drivers that drove our device under QEMU 11.1",
        "(vfio-user, the server with `--checker`), and every driver statement the checker records",
        "(`host-device/src/checker/`), with the evidence: how many requests (config writes,",
        "notifications, buffers) broke it and the first offender's bytes with why. Our firmware",
        "breaks some statements **on purpose** (conformance and error cases testing what a device",
        "does with a bad request) and announces each (`checker-expect:`): `announced (deliberate)`;",
        "a statement it broke unannounced is a driver bug and shown as **UNANNOUNCED**. Linux is",
        "`cargo qemu-linux`'s guest (Debian's kernel, its virtio-iommu and virtio_blk modules,",
        "the whole disk read and a scratch region written), booted here once per mode.",
        "",
    ] {
        out.push_str(line);
        out.push('\n');
    }
    let headers: Vec<&str> = columns.iter().map(|c| c.header.as_str()).collect();
    out.push_str(&format!(
        "| statement | what the driver must do | {} |\n|---|---|{}\n",
        headers.join(" | "),
        "---|".repeat(columns.len())
    ));
    let mut rows: Vec<(String, String)> = Statement::CHECKED
        .iter()
        .map(|s| (s.to_string(), s.summary().to_string()))
        .collect();
    for c in columns {
        for v in &c.findings.violations {
            if !rows.iter().any(|(code, _)| *code == v.statement) {
                rows.push((v.statement.clone(), "(not in `Statement::CHECKED`)".into()));
            }
        }
    }
    for (code, summary) in &rows {
        let cells: Vec<String> = columns.iter().map(|c| c.cell(code)).collect();
        out.push_str(&format!(
            "| {code} | {} | {} |\n",
            summary.replace('|', "\\|"),
            cells.join(" | ")
        ));
    }
    out.push('\n');
    for c in columns {
        out.push_str(&format!("- {}: {}\n", c.header, c.saw));
    }
    out.push_str(
        "\n(The Linux columns' MAP and UNMAP counts vary by a few from boot to boot and are not \
         compared with the committed file; the test requires over 1000 of each with a DMA \
         domain, none with passthrough.)\n",
    );
    out.push_str(
        "\nNot checked, because a device cannot observe them (the checker's module \
         documentation):\n\n",
    );
    for (numbers, why) in NOT_OBSERVABLE {
        let codes: Vec<String> = numbers.iter().map(|n| format!("R{n}")).collect();
        out.push_str(&format!(
            "- {}: {}.\n",
            codes.join(", "),
            why.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
    out
}

/// Every driver requirement R1..=R36 is either checked or listed in [`NOT_OBSERVABLE`], not
/// both.
pub fn assert_statements_accounted_for() {
    for n in 1..=36u8 {
        let checked = Statement::CHECKED.contains(&Statement::R(n));
        let listed = NOT_OBSERVABLE.iter().any(|(ns, _)| ns.contains(&n));
        assert!(
            checked != listed,
            "R{n}: checked {checked}, listed as not observable {listed}"
        );
    }
}

/// Only the Linux columns' MAP and UNMAP counts are masked: a changed ATTACH, PROBE or fault
/// count, or any count of our firmware, still fails the comparison.
#[test]
fn only_linux_map_counts_are_masked() {
    let a = "x\n- Linux 6.12 strict: device saw: ATTACH 1 DETACH 0 MAP 2791 UNMAP 2790 PROBE 1 faults 0";
    let b = "x\n- Linux 6.12 strict: device saw: ATTACH 1 DETACH 0 MAP 2808 UNMAP 2807 PROBE 1 faults 0";
    assert_eq!(mask_varying(a), mask_varying(b));
    assert_ne!(
        mask_varying(a),
        mask_varying(&a.replace("PROBE 1", "PROBE 2"))
    );
    assert_ne!(
        mask_varying(a),
        mask_varying(&a.replace("faults 0", "faults 1"))
    );
    let fw = "- our firmware: device saw: ATTACH 85 DETACH 28 MAP 528 UNMAP 482 PROBE 28 faults 26";
    assert_eq!(mask_varying(fw), fw);
}
