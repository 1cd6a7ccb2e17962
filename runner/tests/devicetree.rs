//! The runner's devicetree module against QEMU 11.1's own trees: a dumped tree survives
//! parse → serialize → parse unchanged, and the firmware passes every case when booted with
//! `-dtb` on a tree re-serialized by the module (QEMU's `-dtb` path leaves FDT_NOP tokens in the
//! tree the guest sees, issue #8 item 4).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use virtio_iommu_runner::devicetree::{dump, DeviceTree};
use virtio_iommu_runner::{
    firmware_elf, prepare_disk, problems, qemu_args, resolve_qemu, run, summary, QemuChoice,
    RunConfig,
};

fn qemu_111() -> PathBuf {
    resolve_qemu(&QemuChoice::Debian111).unwrap_or_else(|e| panic!("QEMU 11.1: {e}"))
}

fn firmware() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| firmware_elf().unwrap_or_else(|e| panic!("building the firmware: {e}")))
}

/// The machine options of a boot, without `-kernel` (the dump needs no firmware).
fn machine(extra: &[&str]) -> Vec<String> {
    [
        "-M",
        "virt",
        "-cpu",
        "cortex-a57",
        "-m",
        "512M",
        "-nographic",
        "-nic",
        "none",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn dumped_trees_round_trip() {
    let qemu = qemu_111();
    for extra in [
        &["-device", "virtio-iommu-pci"][..],
        &["-M", "virt,highmem=off,gic-version=3", "-smp", "2"][..],
    ] {
        let blob = dump(&qemu, &machine(extra)).expect("dumpdtb");
        let tree = DeviceTree::parse(&blob).expect("parse QEMU's tree");
        let written = tree.to_dtb().expect("serialize");
        assert!(
            written.len() < blob.len() / 8,
            "compact: {} bytes from QEMU's {}",
            written.len(),
            blob.len()
        );
        let again = DeviceTree::parse(&written).expect("parse our blob");
        assert_eq!(again, tree, "{extra:?}: parse → serialize → parse");
        assert_eq!(again.to_dtb().unwrap(), written, "serialization is stable");
        // Real content, not an empty tree that trivially round-trips.
        let bridges = tree.find_compatible("pci-host-ecam-generic");
        assert_eq!(bridges.len(), 1, "{extra:?}: one PCIe host bridge");
        assert!(tree.node("/chosen").is_some() && tree.node("/memory@40000000").is_some());
        assert!(tree.phandles().len() >= 3, "{extra:?}: phandles");
    }
}

#[test]
fn qemu_11_1_own_iommu_with_rewritten_dtb() {
    let qemu = qemu_111();
    let config = RunConfig {
        qemu: QemuChoice::Debian111,
        ..RunConfig::default()
    };
    let disk = prepare_disk(None).expect("disk");
    let blob = dump(&qemu, &qemu_args(&config, firmware(), &disk.path)).expect("dumpdtb");
    let tree = DeviceTree::parse(&blob).expect("parse");
    assert!(
        !tree.find_compatible("virtio,pci-iommu").is_empty(),
        "QEMU describes its virtio-iommu-pci"
    );
    let dir = std::env::temp_dir().join(format!("viommu-dt-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let dtb = dir.join("virt.dtb");
    std::fs::write(&dtb, tree.to_dtb().expect("serialize")).expect("write dtb");
    let outcome = run(
        &RunConfig {
            extra_args: vec!["-dtb".into(), dtb.to_string_lossy().into_owned()],
            ..config
        },
        firmware(),
    )
    .expect("boot");
    let _ = std::fs::remove_dir_all(&dir);
    let found = problems(&outcome, true);
    assert!(
        found.is_empty(),
        "-dtb boot: {found:#?}\n--- stderr ---\n{}",
        outcome.stderr
    );
    let (passed, failed) = summary(&outcome.output).expect("summary");
    assert!(
        passed > 30 && failed == 0,
        "{passed} passed, {failed} failed"
    );
    assert!(
        outcome.output.lines().any(
            |l| l.starts_with("ok ") && l.contains("virtio-iommu found through the devicetree")
        ),
        "the IOMMU was found through our devicetree"
    );
}
