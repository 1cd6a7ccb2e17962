//! QEMU 11.1's own virtio-iommu on virtio-mmio (`virtio-iommu-device,primary-bus=pcie.0`),
//! described by the runner's `-dtb` tree and driven by the firmware through virtio-drivers'
//! `MmioTransport`: every case passes (the ACPI VIOT case as a TAP `SKIP`: QEMU builds no VIOT
//! for it), the disk's SHA-256 matches; a tree naming the wrong transport (empty, or holding
//! virtio-rng) fails case 1 with the DeviceID found; an older QEMU is refused before booting.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use virtio_iommu_runner::{
    describe_mmio_iommu, devicetree, firmware_elf, parse_tap, prepare_disk, problems, qemu_args,
    reported_disk_sha256, resolve_qemu, run, summary, tap_plan, DeviceTree, Error, IommuKind,
    QemuChoice, RunConfig, FORCE_MODERN,
};

/// The firmware ELF, built once for all tests of this binary (or `$VIOMMU_FIRMWARE_ELF`).
fn firmware() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| firmware_elf().unwrap_or_else(|e| panic!("building the firmware: {e}")))
}

/// QEMU 11.1 with the mmio IOMMU.
fn mmio_config() -> RunConfig {
    RunConfig {
        qemu: QemuChoice::Debian111,
        iommu: IommuKind::Mmio,
        ..RunConfig::default()
    }
}

/// Cases that must be `ok` without a directive (name prefixes): the parts of the run that
/// touch the IOMMU's transport or depend on it.
const MUST_PASS: &[&str] = &[
    "virtio-iommu found through the devicetree",
    "driver bring-up (new + ATTACH + MAP + PROBE) within 8 KiB of stack",
    "virtio-iommu initialised",
    "PROBE every endpoint",
    "virtio-blk: read the entire disk through IOVAs",
    "edu: DMA from an unmapped IOVA faults",
    "bypass=0 blocks an unattached endpoint",
    "conformance suite against QEMU's device",
];

/// The one case that does not apply on virtio-mmio.
const VIOT_CASE: &str = "IOMMU and endpoints found through ACPI VIOT agree with the devicetree";

#[test]
fn qemu_11_1_virtio_mmio_iommu_passes_every_case() {
    let outcome = run(&mmio_config(), firmware()).unwrap_or_else(|e| panic!("running QEMU: {e}"));
    let out = &outcome.output;
    let found = problems(&outcome, true);
    assert!(
        found.is_empty(),
        "{found:#?}\n--- stderr ---\n{}",
        outcome.stderr
    );
    assert_eq!(outcome.exit_code, 0, "exit status");
    let args = outcome.args.join(" ");
    assert!(
        args.contains("-device virtio-iommu-device,primary-bus=pcie.0 "),
        "{args}"
    );
    assert!(!args.contains("virtio-iommu-pci"), "{args}");
    assert!(
        args.contains("-global virtio-mmio.force-legacy=false -dtb "),
        "{args}"
    );
    // The firmware took the IOMMU from the runner's node and checked its registers there.
    assert!(
        out.contains("# using iommu 0 (mmio 0xa003e00)"),
        "the IOMMU is not the virtio-mmio node at 0xa003e00"
    );
    assert!(out.contains("virtio-mmio version 2, DeviceID 23 (IOMMU) at 0xa003e00+0x200"));

    let tap = parse_tap(out);
    let (passed, failed) = summary(out).expect("summary line");
    assert_eq!(failed, 0);
    assert_eq!(Some(passed), tap_plan(out), "every planned case passed");
    assert!(passed >= 33, "{passed} cases: some did not run");
    assert!(tap.iter().all(|l| l.ok), "a TAP line is `not ok`");
    for name in MUST_PASS {
        assert!(
            tap.iter()
                .any(|l| l.ok && l.name.starts_with(name) && l.directive.is_none()),
            "case `{name}` missing or not a plain pass"
        );
    }
    // Exactly one case is a SKIP: the VIOT comparison, for the reason QEMU gives no VIOT.
    let skipped: Vec<_> = tap.iter().filter(|l| l.directive.is_some()).collect();
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert_eq!(skipped[0].name, VIOT_CASE);
    let directive = skipped[0].directive.as_deref().unwrap_or_default();
    assert!(
        directive.starts_with("SKIP QEMU builds a VIOT only for virtio-iommu-pci"),
        "{directive}"
    );
    assert!(
        out.contains("# MCFG: ECAM "),
        "the MCFG was checked on the way"
    );
    assert_eq!(
        reported_disk_sha256(out).as_deref(),
        Some(outcome.disk_sha256.as_str()),
        "disk SHA-256 reported by the firmware vs host"
    );
}

/// Boots with a tree whose `#iommu-cells` sits on the transport at 0x0a003c00 (the one below
/// the IOMMU's) and `extra` QEMU arguments; returns the console.
fn boot_with_iommu_node_at_0xa003c00(extra: &[&str]) -> String {
    let config = RunConfig {
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..mmio_config()
    };
    let qemu = resolve_qemu(&config.qemu).expect("QEMU 11.1");
    let disk = prepare_disk(None).expect("disk image");
    let mut args = qemu_args(&config, firmware(), &disk.path);
    args.extend(FORCE_MODERN.iter().map(|s| s.to_string()));
    let mut tree =
        DeviceTree::parse(&devicetree::dump(&qemu, &args).expect("dumpdtb")).expect("QEMU's tree");
    let node = describe_mmio_iommu(&mut tree, 0x0a00_3c00).expect("describe");
    assert_eq!(node.path, "/virtio_mmio@a003c00");
    let file = std::env::temp_dir().join(format!(
        "viommu-wrong-slot-{}-{}.dtb",
        std::process::id(),
        extra.len()
    ));
    std::fs::write(&file, tree.to_dtb().expect("serialize")).expect("write the tree");
    let mut config = config;
    config
        .extra_args
        .extend(["-dtb".into(), file.to_string_lossy().into_owned()]);
    let outcome = run(&config, firmware());
    let _ = std::fs::remove_file(&file);
    let outcome = outcome.unwrap_or_else(|e| panic!("running QEMU: {e}"));
    assert_eq!(outcome.exit_code, 1, "{}", outcome.output);
    outcome.output
}

/// The discovery case's failure line for a node at 0x0a003c00 holding `found`.
fn wrong_device_line(found: &str) -> String {
    format!(
        "not ok 1 - virtio-iommu found through the devicetree # /virtio_mmio@a003c00: \
         virtio-mmio at 0xa003c00 holds DeviceID {found}"
    )
}

/// An empty transport: the firmware refuses it in the discovery case, naming DeviceID 0.
#[test]
fn iommu_node_on_an_empty_transport_fails_discovery() {
    let out = boot_with_iommu_node_at_0xa003c00(&[]);
    let expected = wrong_device_line("0, not 23 (virtio-iommu): an empty slot");
    assert!(
        out.lines().any(|l| l == expected),
        "expected `{expected}` in\n{out}"
    );
}

/// A transport holding another device (virtio-rng, DeviceID 4, which takes the next free
/// transport after the IOMMU): refused the same way.
#[test]
fn iommu_node_on_another_device_fails_discovery() {
    let out = boot_with_iommu_node_at_0xa003c00(&["-device", "virtio-rng-device"]);
    let expected = wrong_device_line("4, not 23 (virtio-iommu)");
    assert!(
        out.lines().any(|l| l == expected),
        "expected `{expected}` in\n{out}"
    );
}

/// QEMU 10.0 is refused before it boots, with the version it has.
#[test]
fn older_qemu_is_refused() {
    let config = RunConfig {
        qemu: QemuChoice::System,
        iommu: IommuKind::Mmio,
        ..RunConfig::default()
    };
    let qemu = resolve_qemu(&config.qemu).expect("system QEMU");
    match run(&config, firmware()) {
        Err(Error::QemuUnavailable(why)) => {
            assert!(why.contains("needs QEMU 11.1 or later"), "{why}");
            assert!(why.contains(&qemu.display().to_string()), "{why}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(outcome) => panic!(
            "QEMU {} booted (exit {}); is the system QEMU 11.1 or later?",
            outcome.qemu.display(),
            outcome.exit_code
        ),
    }
}
