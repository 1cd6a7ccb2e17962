//! Boots the firmware in QEMU in several configurations and checks its results.
//!
//! Nothing is skipped when QEMU is missing: the runner installs it (root) or the test fails.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use virtio_iommu_runner::{
    firmware_elf, parse_tap, problems, reported_disk_sha256, run, sha256_file, summary, QemuChoice,
    RunConfig, RunOutcome, TapLine,
};

/// Cases every boot must report as `ok` (by name prefix): the whole end-to-end path.
const REQUIRED_CASES: &[&str] = &[
    "virtio-iommu found through the devicetree",
    "driver bring-up (new + ATTACH + MAP + PROBE) within 8 KiB of stack",
    "virtio-iommu initialised",
    "PROBE every endpoint",
    "IOMMU and endpoints found through ACPI VIOT agree with the devicetree",
    "virtio-blk: attached to a domain",
    "virtio-blk: read the entire disk through IOVAs",
    "virtio-blk: write and read back a scratch region",
    "virtio-blk: every buffer unmapped again",
    "edu: DMA RAM -> device -> RAM",
    "edu: DMA from an unmapped IOVA faults",
    "edu: device write into a read-only mapping faults",
    "re-ATTACH to another domain",
    "DETACH: the endpoint leaves its domain",
    "bypass=0 blocks an unattached endpoint",
    "bypass domain (ATTACH_F_BYPASS)",
    "ATTACH of an endpoint that does not exist -> S_NOENT",
    "ATTACH with an undefined flag bit -> S_INVAL",
    "MAP overlapping an existing mapping -> S_INVAL",
    "MAP into a domain that does not exist -> S_NOENT",
    "MAP with an undefined flag bit -> S_INVAL",
    "UNMAP that would split a mapping -> S_RANGE",
    "UNMAP of a range without mappings -> S_OK",
    "UNMAP in a domain that does not exist -> S_NOENT",
    "MAP and UNMAP on a bypass domain -> S_INVAL",
    "DETACH from a domain the endpoint is not in -> S_INVAL",
    "DETACH of an endpoint that does not exist -> S_NOENT",
    "DETACH, then DETACH again",
    "MAP after the last endpoint left",
    "PROBE of an endpoint that does not exist -> S_NOENT",
    "unknown request type",
    "driver refuses unaligned, inverted and out-of-range requests",
    "conformance suite against QEMU's device",
    "irq: GIC set up",
    "irq: ATTACH, MAP and UNMAP sent non-blocking, completed in the handler",
    "irq: PROBE sent non-blocking, completed in the handler",
    "irq: an edu DMA fault reported on eventq is taken in the handler",
    "irq: a wait for an interrupt that never comes ends",
    "irq: the handler never found the driver's lock held",
    "reserved regions: PROBE merged with the software MSI window and /reserved-memory",
    "topology: no alias groups",
    "shared domain: virtio-blk and edu DMA through one IOVA space",
    "shared domain: after DETACH of edu its DMA faults",
];

/// The firmware ELF, built once for all tests of this binary (or `$VIOMMU_FIRMWARE_ELF`).
fn firmware() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| firmware_elf().unwrap_or_else(|e| panic!("building the firmware: {e}")))
}

/// Boots with `config` and asserts every pass criterion; returns the run for further checks.
/// A required case counts only as a plain `ok`: no `SKIP` or `TODO` directive.
fn boot(name: &str, config: RunConfig) -> RunOutcome {
    let outcome =
        run(&config, firmware()).unwrap_or_else(|e| panic!("{name}: running QEMU failed: {e}"));
    let found = problems(&outcome, true);
    // The individual checks, spelled out (`problems` covers them too, with one message).
    let (passed, failed) = summary(&outcome.output).unwrap_or((0, 0));
    let tap = parse_tap(&outcome.output);
    assert!(
        found.is_empty(),
        "{name}: {found:#?}\n(exit {}, {passed} passed, {failed} failed, {} TAP lines)\n--- stderr ---\n{}",
        outcome.exit_code,
        tap.len(),
        outcome.stderr
    );
    assert_eq!(outcome.exit_code, 0, "{name}: exit status");
    assert!(
        passed > 0 && failed == 0,
        "{name}: {passed} passed, {failed} failed"
    );
    assert!(tap.iter().all(|l| l.ok), "{name}: a TAP line is `not ok`");
    assert_eq!(
        reported_disk_sha256(&outcome.output).as_deref(),
        Some(outcome.disk_sha256.as_str()),
        "{name}: disk SHA-256 reported by the firmware vs host"
    );
    for required in REQUIRED_CASES {
        assert!(
            tap.iter().any(|l| l.ok
                && !directive_is(l, "skip")
                && !directive_is(l, "todo")
                && l.name.starts_with(required)),
            "{name}: case `{required}` missing, failed or skipped"
        );
    }
    eprintln!(
        "{name}: {passed} passed in {:.2} s (QEMU {})",
        outcome.duration.as_secs_f64(),
        outcome.qemu.display()
    );
    outcome
}

/// Whether `line` carries the TAP directive `word` (`# SKIP …`, `# TODO …`: case-insensitive;
/// other text after ` # ` is a comment).
fn directive_is(line: &TapLine, word: &str) -> bool {
    line.directive
        .as_deref()
        .and_then(|d| d.get(..word.len()))
        .is_some_and(|d| d.eq_ignore_ascii_case(word))
}

/// A configuration with the given extra QEMU arguments.
fn with_args(args: &[&str]) -> RunConfig {
    RunConfig {
        extra_args: args.iter().map(|s| s.to_string()).collect(),
        ..RunConfig::default()
    }
}

#[test]
fn default_qemu_from_path() {
    boot("default", RunConfig::default());
}

#[test]
fn qemu_11_1_from_trixie_backports() {
    boot(
        "qemu-11.1",
        RunConfig {
            qemu: QemuChoice::Debian111,
            ..RunConfig::default()
        },
    );
}

#[test]
fn qemu_7_2_from_debian() {
    boot(
        "qemu-7.2",
        RunConfig {
            qemu: QemuChoice::Debian72,
            ..RunConfig::default()
        },
    );
}

#[test]
fn qemu_7_2_highmem_off_other_slots() {
    boot(
        "qemu-7.2 highmem=off, other slots",
        RunConfig {
            qemu: QemuChoice::Debian72,
            extra_args: vec!["-M".into(), "virt,highmem=off".into()],
            iommu_addr: Some("0x7".into()),
            blk_addr: Some("0x2".into()),
            edu_addr: Some("0x11".into()),
            ..RunConfig::default()
        },
    );
}

#[test]
fn granule_16k_highmem_off() {
    boot(
        "granule=16k highmem=off",
        with_args(&[
            "-M",
            "virt,highmem=off",
            "-global",
            "virtio-iommu-pci.granule=16k",
        ]),
    );
}

#[test]
fn highmem_off() {
    // A second `-M` is merged into the runner's `-M virt` by QEMU (later values win).
    boot("highmem=off", with_args(&["-M", "virt,highmem=off"]));
}

#[test]
fn granule_64k() {
    boot(
        "granule=64k",
        with_args(&["-global", "virtio-iommu-pci.granule=64k"]),
    );
}

#[test]
fn aw_bits_39() {
    boot(
        "aw-bits=39",
        with_args(&["-global", "virtio-iommu-pci.aw-bits=39"]),
    );
}

#[test]
fn boot_bypass_off() {
    // `bypass` reads 0 from power-on: unattached endpoints are blocked until the firmware
    // attaches them, and the cases must take the starting value from the config, not assume 1.
    boot(
        "boot-bypass=off",
        with_args(&["-global", "virtio-iommu-pci.boot-bypass=off"]),
    );
}

#[test]
fn qemu_7_2_boot_bypass_off() {
    // 7.2 differs after DETACH (R_DOMAIN, endpoint kept) and on virtio reset.
    boot(
        "qemu-7.2 boot-bypass=off",
        RunConfig {
            qemu: QemuChoice::Debian72,
            extra_args: vec!["-global".into(), "virtio-iommu-pci.boot-bypass=off".into()],
            ..RunConfig::default()
        },
    );
}

#[test]
fn gic_v3_its_two_cpus() {
    // The MSI doorbell PROBE reports is the ITS's 64 KiB GITS_TRANSLATER frame (GICv2m's 4 KiB
    // frame otherwise): a different reserved region for the IOVA allocators to avoid.
    boot(
        "gic-version=3 -smp 2",
        with_args(&["-M", "virt,gic-version=3", "-smp", "2"]),
    );
}

#[test]
fn small_machine_aw_bits_32() {
    // The smallest input_range QEMU allows (4 GiB of IOVA) and a 128 MiB guest (the heap is
    // smaller than its 256 MiB maximum).
    boot(
        "aw-bits=32 -m 128M",
        with_args(&["-global", "virtio-iommu-pci.aw-bits=32", "-m", "128M"]),
    );
}

#[test]
fn el2_entry_virtualization_on() {
    // `virtualization=on` starts the firmware at EL2; it leaves EL2 for EL1 first thing and
    // then passes every required case, the interrupt-driven ones included. With GICv3 too,
    // whose system-register interface EL2 must leave to EL1.
    for (name, machine) in [
        ("virtualization=on", "virt,virtualization=on"),
        (
            "virtualization=on gic-version=3",
            "virt,virtualization=on,gic-version=3",
        ),
    ] {
        let outcome = boot(name, with_args(&["-M", machine]));
        assert!(
            outcome
                .output
                .lines()
                .any(|l| l.starts_with("firmware: EL1 (entered at EL2 and left it),")),
            "{name}: the firmware did not report leaving EL2"
        );
    }
}

#[test]
fn devices_in_other_slots() {
    boot(
        "other slots",
        RunConfig {
            iommu_addr: Some("0x5".into()),
            blk_addr: Some("0x1e".into()),
            edu_addr: Some("0x3".into()),
            ..RunConfig::default()
        },
    );
}

#[test]
fn other_disk_image() {
    // 1 MiB + 512 bytes of a deterministic pattern (not a power of two, not the default size).
    let dir = std::env::temp_dir().join(format!("viommu-runner-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("pattern.img");
    let data: Vec<u8> = (0..(1u32 << 20) + 512)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i >> 9) as u8)
        .collect();
    std::fs::write(&path, &data).expect("write disk image");
    let host_sha = sha256_file(&path).expect("hash");
    boot(
        "other disk",
        RunConfig {
            disk: Some(path.clone()),
            ..RunConfig::default()
        },
    );
    assert_eq!(
        sha256_file(&path).expect("hash"),
        host_sha,
        "the image was modified"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_disk_is_refused() {
    let dir = std::env::temp_dir().join(format!("viommu-runner-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("short.img");
    std::fs::write(&path, vec![0u8; (1 << 20) + 100]).expect("write");
    let result = run(
        &RunConfig {
            disk: Some(path),
            ..RunConfig::default()
        },
        firmware(),
    );
    assert!(
        matches!(result, Err(virtio_iommu_runner::Error::InvalidDisk { .. })),
        "a disk of 1 MiB + 100 bytes must be refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
