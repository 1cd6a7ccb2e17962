//! An editable flattened devicetree: QEMU's own tree dumped with `-machine dumpdtb=FILE`
//! ([`dump`]), parsed into an owned tree ([`DeviceTree::parse`]), edited (find a node by path or
//! `compatible`, set and remove properties, add children, allocate phandles), and written back
//! as a blob for `-dtb` ([`DeviceTree::to_dtb`]).
//!
//! Parsing uses the `fdt` crate after the driver's `remove_nops` (QEMU's trees may hold
//! `FDT_NOP` tokens, which `fdt` 0.1.5 mishandles) and `validated_fdt` (so that `fdt` cannot
//! panic); writing uses `vm-fdt` (there is no `dtc` on the project's machines). Property values
//! stay raw bytes (big-endian cells, NUL-terminated strings, Devicetree Specification v0.4
//! §2.2.4); [`cells`], [`string_list`] and [`Node::u32_cells`] convert them.
//!
//! Nothing here knows about IOMMUs: the virtio-iommu nodes are added by the callers (see
//! `ours`).

#[allow(unused_imports)]
use crate::*;

/// One property: its name and raw value (Devicetree Specification v0.4 §2.2.4).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Property {
    /// The name, e.g. `#address-cells`.
    pub name: String,
    /// The raw value (big-endian cells, NUL-terminated strings, or bytes).
    pub value: Vec<u8>,
}

/// One node: its name (with `@unit-address`), properties and children, both in blob order.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Node {
    /// The node name, e.g. `pcie@10000000`; empty for the root.
    pub name: String,
    /// The properties, in order.
    pub properties: Vec<Property>,
    /// The child nodes, in order.
    pub children: Vec<Node>,
}

/// A whole devicetree: the root node plus the header fields that are not structure.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct DeviceTree {
    /// The root node (name empty).
    pub root: Node,
    /// The memory reservation block: `(address, size)` pairs in bytes.
    pub reservations: Vec<(u64, u64)>,
    /// The header's `boot_cpuid_phys`.
    pub boot_cpuid_phys: u32,
}

/// Big-endian 32-bit cells as a property value.
pub fn cells(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// NUL-terminated strings as a property value (a `stringlist`, §2.2.4.1).
pub fn string_list(values: &[&str]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for value in values {
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    bytes
}

/// A devicetree error (parsing, editing or writing).
fn dt_error(reason: impl Into<String>) -> Error {
    Error::Devicetree {
        reason: reason.into(),
    }
}

impl Node {
    /// A node with this name and no properties or children.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// The raw value of the property `name`.
    pub fn property(&self, name: &str) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_slice())
    }

    /// The property `name` as big-endian 32-bit cells; `None` when it is missing or its length
    /// is not a multiple of 4 bytes.
    pub fn u32_cells(&self, name: &str) -> Option<Vec<u32>> {
        let value = self.property(name)?;
        if value.len() % 4 != 0 {
            return None;
        }
        Some(
            value
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    /// The strings of the `compatible` property (empty when there is none).
    pub fn compatible(&self) -> Vec<&str> {
        self.property("compatible")
            .map(|v| {
                v.split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| std::str::from_utf8(s).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `compatible` lists `compatible`.
    pub fn is_compatible(&self, compatible: &str) -> bool {
        self.compatible().contains(&compatible)
    }

    /// Sets the property `name` to `value`: replaces its value in place if it exists, else
    /// appends it.
    pub fn set_property(&mut self, name: &str, value: Vec<u8>) {
        match self.properties.iter_mut().find(|p| p.name == name) {
            Some(property) => property.value = value,
            None => self.properties.push(Property {
                name: name.to_string(),
                value,
            }),
        }
    }

    /// Removes the property `name` and returns its value (`None` if it did not exist).
    pub fn remove_property(&mut self, name: &str) -> Option<Vec<u8>> {
        let index = self.properties.iter().position(|p| p.name == name)?;
        Some(self.properties.remove(index).value)
    }

    /// The child with exactly this name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The child with exactly this name, mutably.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// Appends `child` after the existing children and returns it.
    ///
    /// # Errors
    ///
    /// [`Error::Devicetree`] if a child of that name exists already (node names are unique
    /// among siblings, §2.2.1).
    pub fn add_child(&mut self, child: Node) -> Result<&mut Node> {
        if self.child(&child.name).is_some() {
            return Err(dt_error(format!(
                "node `{}` already has a child `{}`",
                self.name, child.name
            )));
        }
        self.children.push(child);
        let last = self.children.len() - 1;
        Ok(&mut self.children[last])
    }

    /// Removes the child `name` and returns it.
    pub fn remove_child(&mut self, name: &str) -> Option<Node> {
        let index = self.children.iter().position(|c| c.name == name)?;
        Some(self.children.remove(index))
    }

    /// Calls `visit` with every node of this subtree (this one first, depth first, in order)
    /// and its path.
    fn walk<'a>(&'a self, path: &str, visit: &mut dyn FnMut(&str, &'a Node)) {
        visit(path, self);
        for child in &self.children {
            let child_path = if path == "/" {
                format!("/{}", child.name)
            } else {
                format!("{path}/{}", child.name)
            };
            child.walk(&child_path, visit);
        }
    }
}

impl DeviceTree {
    /// Parses a flattened devicetree blob (Devicetree Specification v0.4 §5). `FDT_NOP` tokens
    /// are removed first (on a copy; `dtb` is not changed).
    ///
    /// # Errors
    ///
    /// [`Error::Devicetree`] when the blob is not a valid devicetree, or a node or property
    /// name is not UTF-8.
    pub fn parse(dtb: &[u8]) -> Result<Self> {
        let mut blob = dtb.to_vec();
        virtio_iommu_driver::topology::remove_nops(&mut blob)
            .map_err(|e| dt_error(format!("removing FDT_NOPs: {e:?}")))?;
        let fdt = virtio_iommu_driver::topology::validated_fdt(&blob)
            .map_err(|e| dt_error(format!("invalid devicetree: {e:?}")))?;
        let root = fdt
            .find_node("/")
            .ok_or_else(|| dt_error("devicetree without a root node"))?;
        let mut root = Self::convert(root, 0)?;
        root.name.clear();
        let boot_cpuid_phys = blob
            .get(28..32)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        let reservations = fdt
            .memory_reservations()
            .map(|r| (r.address() as usize as u64, r.size() as u64))
            .collect();
        Ok(Self {
            root,
            reservations,
            boot_cpuid_phys,
        })
    }

    /// Deepest nesting [`parse`](Self::parse) accepts (vm-fdt's limit is larger; QEMU's trees
    /// are 4 deep).
    const MAX_DEPTH: usize = 64;

    /// One `fdt` node and its subtree as an owned [`Node`].
    fn convert(node: fdt::node::FdtNode<'_, '_>, depth: usize) -> Result<Node> {
        if depth > Self::MAX_DEPTH {
            return Err(dt_error(format!(
                "devicetree nested deeper than {}",
                Self::MAX_DEPTH
            )));
        }
        let properties = node
            .properties()
            .map(|p| Property {
                name: p.name.to_string(),
                value: p.value.to_vec(),
            })
            .collect();
        let children = node
            .children()
            .map(|c| Self::convert(c, depth + 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(Node {
            name: node.name.to_string(),
            properties,
            children,
        })
    }

    /// The tree as a flattened devicetree blob (version 17), via `vm-fdt`.
    ///
    /// # Errors
    ///
    /// [`Error::Devicetree`] when `vm-fdt` refuses it: an invalid node or property name, two
    /// nodes with the same `phandle`, overlapping reservations, or a blob over 4 GiB.
    pub fn to_dtb(&self) -> Result<Vec<u8>> {
        let reservations = self
            .reservations
            .iter()
            .map(|&(address, size)| vm_fdt::FdtReserveEntry::new(address, size))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| dt_error(format!("memory reservation: {e}")))?;
        let mut writer = vm_fdt::FdtWriter::new_with_mem_reserv(&reservations)
            .map_err(|e| dt_error(format!("memory reservations: {e}")))?;
        writer.set_boot_cpuid_phys(self.boot_cpuid_phys);
        Self::write_node(&mut writer, &self.root, "/")?;
        writer
            .finish()
            .map_err(|e| dt_error(format!("finishing the blob: {e}")))
    }

    /// Writes `node` and its subtree.
    fn write_node(writer: &mut vm_fdt::FdtWriter, node: &Node, path: &str) -> Result<()> {
        let context = |what: &str, e: vm_fdt::Error| dt_error(format!("{path}: {what}: {e}"));
        let handle = writer
            .begin_node(&node.name)
            .map_err(|e| context("node name", e))?;
        for property in &node.properties {
            if property.name == "phandle" {
                // Through property_phandle, so that vm-fdt checks uniqueness.
                let cells = node
                    .u32_cells("phandle")
                    .filter(|c| c.len() == 1)
                    .ok_or_else(|| dt_error(format!("{path}: phandle is not one cell")))?;
                writer
                    .property_phandle(cells[0])
                    .map_err(|e| context("phandle", e))?;
            } else {
                writer
                    .property(&property.name, &property.value)
                    .map_err(|e| context(&format!("property `{}`", property.name), e))?;
            }
        }
        for child in &node.children {
            let child_path = if path == "/" {
                format!("/{}", child.name)
            } else {
                format!("{path}/{}", child.name)
            };
            Self::write_node(writer, child, &child_path)?;
        }
        writer
            .end_node(handle)
            .map_err(|e| context("end of node", e))
    }

    /// The node at `path` (`/`, `/pcie@10000000`, …; exact names, with unit address).
    pub fn node(&self, path: &str) -> Option<&Node> {
        let mut node = &self.root;
        for component in path.strip_prefix('/')?.split('/').filter(|c| !c.is_empty()) {
            node = node.child(component)?;
        }
        Some(node)
    }

    /// The node at `path`, mutably.
    pub fn node_mut(&mut self, path: &str) -> Option<&mut Node> {
        let mut node = &mut self.root;
        for component in path.strip_prefix('/')?.split('/').filter(|c| !c.is_empty()) {
            node = node.child_mut(component)?;
        }
        Some(node)
    }

    /// The paths of every node whose `compatible` lists `compatible`, in depth-first order.
    pub fn find_compatible(&self, compatible: &str) -> Vec<String> {
        let mut found = Vec::new();
        self.root.walk("/", &mut |path, node| {
            if node.is_compatible(compatible) {
                found.push(path.to_string());
            }
        });
        found
    }

    /// Every `phandle` (and legacy `linux,phandle`) value in the tree.
    pub fn phandles(&self) -> Vec<u32> {
        let mut found = Vec::new();
        self.root.walk("/", &mut |_, node| {
            for name in ["phandle", "linux,phandle"] {
                if let Some([value]) = node.u32_cells(name).as_deref() {
                    found.push(*value);
                }
            }
        });
        found
    }

    /// A phandle no node has: one above the largest in use (at least 1; 0 and 0xffffffff are
    /// not valid phandles, §2.3.3).
    ///
    /// # Errors
    ///
    /// [`Error::Devicetree`] when the largest phandle in use is 0xfffffffe.
    pub fn allocate_phandle(&self) -> Result<u32> {
        let max = self.phandles().into_iter().max().unwrap_or(0);
        max.checked_add(1)
            .filter(|&p| p != u32::MAX)
            .ok_or_else(|| dt_error("no phandle left above the largest in use"))
    }
}

/// How long [`dump`] waits for QEMU.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(60);

/// QEMU's own devicetree for the machine `args` describe: runs `qemu` with `args` plus
/// `-machine dumpdtb=FILE` (QEMU writes the tree and exits without running the guest) and
/// returns the blob.
///
/// `args` are a full command line as for a boot (machine, CPU, memory, devices); devices that
/// need a peer (such as `vfio-user-pci`, which connects at realize) must be left out.
///
/// # Errors
///
/// [`Error::CommandFailed`] with QEMU's stderr when it fails or runs longer than
/// [`DUMP_TIMEOUT`] (it is killed then); [`Error::Io`] when the file cannot be read or QEMU
/// cannot run.
pub fn dump(qemu: &Path, args: &[String]) -> Result<Vec<u8>> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let file = std::env::temp_dir().join(format!(
        "viommu-dumpdtb-{}-{}.dtb",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&file);
    let mut command = Command::new(qemu);
    command
        .args(args)
        .arg("-machine")
        .arg(format!(
            "dumpdtb={}",
            boot::qemu_option_value(&file.to_string_lossy())
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let display = format!("{command:?}");
    let result = run_bounded(&mut command, DUMP_TIMEOUT)
        .and_then(|(status, stderr)| match status {
            Some(status) if status.success() => Ok(()),
            status => Err(Error::CommandFailed {
                command: display,
                status: status.map_or_else(
                    || format!("killed after {} s", DUMP_TIMEOUT.as_secs()),
                    |s| s.to_string(),
                ),
                stderr,
            }),
        })
        .and_then(|()| {
            io_context(fs::read(&file), || {
                format!("cannot read {}", file.display())
            })
        });
    let _ = fs::remove_file(&file);
    result
}

/// Runs `command` (stderr piped) for at most `timeout`; returns its status (`None` when it was
/// killed at the timeout) and stderr.
fn run_bounded(command: &mut Command, timeout: Duration) -> Result<(Option<ExitStatus>, String)> {
    let display = format!("{command:?}");
    let mut guard = boot::ChildGuard(Some(io_context(boot::spawn(command), || {
        format!("cannot run `{display}`")
    })?));
    let reader = guard.child().and_then(|c| c.stderr.take()).map(|mut pipe| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        let Some(child) = guard.child() else {
            break None;
        };
        match io_context(child.try_wait(), || format!("waiting for `{display}`"))? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => break None,
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    drop(guard);
    let stderr = reader
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    Ok((status, stderr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceTree {
        let mut root = Node::new("");
        root.set_property("#address-cells", cells(&[2]));
        root.set_property("compatible", string_list(&["linux,dummy-virt"]));
        let mut pcie = Node::new("pcie@10000000");
        pcie.set_property(
            "compatible",
            string_list(&["pci-host-ecam-generic", "other"]),
        );
        pcie.set_property("phandle", cells(&[0x8003]));
        let mut intc = Node::new("intc@8000000");
        intc.set_property("phandle", cells(&[0x8001]));
        intc.set_property("interrupt-controller", Vec::new());
        root.children.push(intc);
        root.children.push(pcie);
        DeviceTree {
            root,
            reservations: vec![(0x4800_0000, 0x1000)],
            boot_cpuid_phys: 0,
        }
    }

    #[test]
    fn round_trip_keeps_everything() {
        let tree = sample();
        let dtb = tree.to_dtb().expect("serialize");
        let parsed = DeviceTree::parse(&dtb).expect("parse");
        assert_eq!(parsed, tree);
    }

    #[test]
    fn find_and_edit() {
        let mut tree = sample();
        assert_eq!(tree.find_compatible("other"), ["/pcie@10000000"]);
        assert!(tree.find_compatible("nothing").is_empty());
        assert_eq!(tree.allocate_phandle().unwrap(), 0x8004);
        let pcie = tree.node_mut("/pcie@10000000").unwrap();
        pcie.set_property("iommu-map", cells(&[0, 1, 0, 8]));
        pcie.set_property("phandle", cells(&[0x8003]));
        assert_eq!(pcie.u32_cells("iommu-map").unwrap(), [0, 1, 0, 8]);
        assert_eq!(pcie.properties.len(), 3, "set on an existing name replaces");
        let mut child = Node::new("virtio_iommu@1,0");
        child.set_property("phandle", cells(&[0x8004]));
        pcie.add_child(child.clone()).unwrap();
        assert!(pcie.add_child(child).is_err(), "duplicate child name");
        assert_eq!(tree.allocate_phandle().unwrap(), 0x8005);
        let parsed = DeviceTree::parse(&tree.to_dtb().unwrap()).unwrap();
        assert_eq!(parsed, tree);
        assert!(parsed
            .node("/pcie@10000000/virtio_iommu@1,0")
            .is_some_and(|n| n.u32_cells("phandle") == Some(vec![0x8004])));
        let pcie = tree.node_mut("/pcie@10000000").unwrap();
        assert_eq!(
            pcie.remove_property("iommu-map"),
            Some(cells(&[0, 1, 0, 8]))
        );
        assert_eq!(pcie.remove_property("iommu-map"), None);
        assert!(pcie.remove_child("virtio_iommu@1,0").is_some());
        assert_eq!(tree, sample());
    }

    #[test]
    fn duplicate_phandles_are_refused() {
        let mut tree = sample();
        tree.node_mut("/intc@8000000")
            .unwrap()
            .set_property("phandle", cells(&[0x8003]));
        assert!(matches!(tree.to_dtb(), Err(Error::Devicetree { .. })));
    }

    #[test]
    fn nops_are_removed_before_parsing() {
        let tree = sample();
        let dtb = tree.to_dtb().unwrap();
        // Insert an FDT_NOP before the second child's FDT_BEGIN_NODE ("pcie@...") and one
        // between two properties of the root, fixing up the header.
        let off = u32::from_be_bytes(dtb[8..12].try_into().unwrap()) as usize;
        let find = |needle: &[u8]| {
            dtb.windows(needle.len())
                .position(|w| w == needle)
                .expect("needle")
        };
        let begin_pcie = find(b"pcie@10000000") - 4;
        let mut with_nops = dtb[..begin_pcie].to_vec();
        with_nops.extend_from_slice(&4u32.to_be_bytes());
        with_nops.extend_from_slice(&dtb[begin_pcie..]);
        // Second NOP: right after the root's FDT_BEGIN_NODE (token + empty name padded to 4).
        let first_prop = off + 8;
        with_nops.splice(first_prop..first_prop, 4u32.to_be_bytes());
        let grow = |blob: &mut Vec<u8>, field: usize, by: u32| {
            let v = u32::from_be_bytes(blob[field..field + 4].try_into().unwrap()) + by;
            blob[field..field + 4].copy_from_slice(&v.to_be_bytes());
        };
        grow(&mut with_nops, 4, 8); // totalsize
        grow(&mut with_nops, 12, 8); // off_dt_strings
        grow(&mut with_nops, 36, 8); // size_dt_struct
        assert_eq!(DeviceTree::parse(&with_nops).expect("parse"), tree);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            DeviceTree::parse(b"not a devicetree at all, no magic here....."),
            Err(Error::Devicetree { .. })
        ));
        let mut dtb = sample().to_dtb().unwrap();
        dtb.truncate(dtb.len() - 8);
        assert!(DeviceTree::parse(&dtb).is_err(), "truncated blob");
    }
}
