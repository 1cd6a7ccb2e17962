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

/// QEMU 11.1's own tree for `config`'s boot (its `-dumpdtb`), parsed.
fn qemu_tree(config: &RunConfig) -> DeviceTree {
    let disk = prepare_disk(None).expect("disk");
    let blob = dump(&qemu_111(), &qemu_args(config, firmware(), &disk.path)).expect("dumpdtb");
    DeviceTree::parse(&blob).expect("parse")
}

/// Boots the firmware as `config` says with `tree` given as `-dtb`; the run must show no
/// problem (every case passing, disk SHA-256 equal).
fn boot_with_tree(
    config: RunConfig,
    tree: &DeviceTree,
    what: &str,
) -> virtio_iommu_runner::RunOutcome {
    let dir = std::env::temp_dir().join(format!("viommu-dt-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let dtb = dir.join("virt.dtb");
    std::fs::write(&dtb, tree.to_dtb().expect("serialize")).expect("write dtb");
    let mut extra_args = config.extra_args.clone();
    extra_args.extend(["-dtb".into(), dtb.to_string_lossy().into_owned()]);
    let outcome = run(
        &RunConfig {
            extra_args,
            ..config
        },
        firmware(),
    )
    .expect("boot");
    let _ = std::fs::remove_dir_all(&dir);
    let found = problems(&outcome, true);
    assert!(
        found.is_empty(),
        "{what}: {found:#?}\n--- output ---\n{}\n--- stderr ---\n{}",
        outcome.output,
        outcome.stderr
    );
    outcome
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
    let config = RunConfig {
        qemu: QemuChoice::Debian111,
        ..RunConfig::default()
    };
    let tree = qemu_tree(&config);
    assert!(
        !tree.find_compatible("virtio,pci-iommu").is_empty(),
        "QEMU describes its virtio-iommu-pci"
    );
    let outcome = boot_with_tree(config, &tree, "rewritten");
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

#[test]
fn our_iommu_node_matches_qemus_own() {
    // QEMU's tree with its virtio-iommu-pci at 00:01.0 versus QEMU's tree without it plus
    // add_pci_iommu(devfn 0x08): the same host bridge node, up to the phandle's value.
    use virtio_iommu_runner::ours::{add_pci_iommu, pci_host_bridge, Coverage};
    let qemu = qemu_111();
    let theirs = DeviceTree::parse(
        &dump(&qemu, &machine(&["-device", "virtio-iommu-pci,addr=01.0"])).unwrap(),
    )
    .unwrap();
    let mut ours = DeviceTree::parse(&dump(&qemu, &machine(&[])).unwrap()).unwrap();
    let bridge = pci_host_bridge(&ours).unwrap();
    assert!(ours.node(&bridge).unwrap().property("iommu-map").is_none());
    let phandle = add_pci_iommu(&mut ours, 0x08, &Coverage::AllExcept(vec![])).unwrap();
    let theirs_bridge = theirs.node(&bridge).expect("same bridge path");
    let theirs_phandle = theirs_bridge
        .children
        .last()
        .unwrap()
        .u32_cells("phandle")
        .unwrap()[0];
    // Our phandle in QEMU's place, then the whole bridge node must be equal (the bridge's
    // property order aside: ours appends iommu-map at the end; the child's is QEMU's).
    let normalize = |node: &virtio_iommu_runner::Node, from: u32| {
        let mut node = node.clone();
        let fix = |value: &mut Vec<u8>| {
            for chunk in value.chunks_exact_mut(4) {
                if chunk == from.to_be_bytes() {
                    chunk.copy_from_slice(&0xabcd_u32.to_be_bytes());
                }
            }
        };
        for p in node.properties.iter_mut().filter(|p| p.name == "iommu-map") {
            fix(&mut p.value);
        }
        for c in node.children.iter_mut() {
            for p in c.properties.iter_mut().filter(|p| p.name == "phandle") {
                fix(&mut p.value);
            }
        }
        node.properties.sort_by(|a, b| a.name.cmp(&b.name));
        node
    };
    assert_eq!(
        normalize(ours.node(&bridge).unwrap(), phandle),
        normalize(theirs_bridge, theirs_phandle)
    );
    ours.to_dtb().expect("serializable");
}

#[test]
fn qemu_11_1_own_iommu_with_our_acpi_tables() {
    // QEMU's own virtio-iommu-pci at 00:01.0 with QEMU's ACPI off and our MCFG + VIOT given
    // through fw_cfg (what `VIOMMU_DEVICE=ours` does): the firmware's VIOT case must pass.
    use virtio_iommu_runner::ours::{pci_iommu_acpi, Coverage};
    let qemu = qemu_111();
    let config = RunConfig {
        qemu: QemuChoice::Debian111,
        iommu_addr: Some("01.0".into()),
        extra_args: vec!["-machine".into(), "acpi=off".into()],
        ..RunConfig::default()
    };
    let disk = prepare_disk(None).expect("disk");
    let blob = dump(&qemu, &qemu_args(&config, firmware(), &disk.path)).expect("dumpdtb");
    let tree = DeviceTree::parse(&blob).expect("parse");
    let acpi = pci_iommu_acpi(&tree, 0x08, &Coverage::AllExcept(vec![])).expect("ACPI tables");
    let dir = std::env::temp_dir().join(format!("viommu-acpi-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (tables, loader) = (dir.join("tables"), dir.join("loader"));
    std::fs::write(&tables, &acpi.tables).unwrap();
    std::fs::write(&loader, &acpi.loader).unwrap();
    let mut extra = config.extra_args.clone();
    for (name, path) in [("etc/acpi/tables", &tables), ("etc/table-loader", &loader)] {
        extra.push("-fw_cfg".into());
        extra.push(format!("name={name},file={}", path.display()));
    }
    let outcome = run(
        &RunConfig {
            extra_args: extra,
            ..config
        },
        firmware(),
    )
    .expect("boot");
    let _ = std::fs::remove_dir_all(&dir);
    let found = problems(&outcome, true);
    assert!(
        found.is_empty(),
        "our ACPI tables: {found:#?}\n--- stderr ---\n{}",
        outcome.stderr
    );
    assert!(
        outcome.output.lines().any(|l| l.starts_with("ok ")
            && l.contains("IOMMU and endpoints found through ACPI VIOT agree with the devicetree")),
        "the VIOT case ran and passed"
    );
    assert!(
        outcome
            .output
            .contains("MCFG@0x0+0x3c VIOT@0x3c+0x58 XSDT@0x94"),
        "the firmware read our blob, not QEMU's"
    );
}

#[test]
fn failed_dump_names_qemus_complaint() {
    let qemu = qemu_111();
    match dump(&qemu, &machine(&["-device", "no-such-device"])) {
        Err(virtio_iommu_runner::Error::CommandFailed { stderr, .. }) => {
            assert!(stderr.contains("no-such-device"), "{stderr}")
        }
        other => panic!("{other:?}"),
    }
}

/// A `/reserved-memory` node (Devicetree Specification v0.4 §3.5) added to QEMU's tree reaches
/// the firmware: its reserved-region case (issue #10 item 6) reads both children, `no-map` and
/// a plain pool, from the tree QEMU hands over, and every case still passes (both regions lie
/// above the firmware's heap).
#[test]
fn reserved_memory_nodes_reach_the_firmware() {
    use virtio_iommu_runner::devicetree::{cells, Node};
    let config = RunConfig {
        qemu: QemuChoice::Debian111,
        ..RunConfig::default()
    };
    let mut tree = qemu_tree(&config);
    let mut reserved = Node::new("reserved-memory");
    reserved.set_property("#address-cells", cells(&[2]));
    reserved.set_property("#size-cells", cells(&[2]));
    reserved.set_property("ranges", Vec::new());
    let mut firmware_area = Node::new("firmware@5f000000");
    firmware_area.set_property("reg", cells(&[0, 0x5f00_0000, 0, 0x10_0000]));
    firmware_area.set_property("no-map", Vec::new());
    reserved.add_child(firmware_area).expect("child");
    let mut pool = Node::new("pool@5e000000");
    pool.set_property("reg", cells(&[0, 0x5e00_0000, 0, 0x20_0000]));
    reserved.add_child(pool).expect("child");
    tree.root.add_child(reserved).expect("/reserved-memory");
    let outcome = boot_with_tree(config, &tree, "reserved-memory");
    let lines: Vec<&str> = outcome.output.lines().map(str::trim_end).collect();
    assert!(
        lines.contains(&"# /reserved-memory: 2 region(s)"),
        "{}",
        outcome.output
    );
    let node = |path: &str, no_map: bool| {
        lines
            .iter()
            .any(|l| l.contains(path) && l.ends_with(&format!("no-map {no_map}")))
    };
    assert!(
        node("/reserved-memory/firmware@5f000000", true),
        "{}",
        outcome.output
    );
    assert!(
        node("/reserved-memory/pool@5e000000", false),
        "{}",
        outcome.output
    );
}
