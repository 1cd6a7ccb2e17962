//! Kernel modules of an unpacked `linux-image-*` package: found by name under
//! `…/modules/<release>/kernel/`, decompressed (`.ko.xz` with `lzma-rs`, `.ko.gz` with `flate2`,
//! plain `.ko`), their `depends=` read from the ELF `.modinfo` section (with `object`), and put
//! in load order, dependencies first ([`ModuleTree::load_order`]).
//!
//! The package ships no `modules.dep` (depmod runs at install time), hence `.modinfo`: the
//! NUL-separated `key=value` strings `modinfo` prints, where `depends=` lists the modules that
//! must be loaded before (comma-separated, possibly empty).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use super::initramfs::InitramfsModule;
use crate::{io_context, Error, Result};

/// Module names as the kernel compares them: `-` and `_` are the same.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file name (`virtio-iommu.ko.xz` ⇒ `virtio_iommu`), `None` when it is
/// not a module file.
pub fn module_name(file_name: &str) -> Option<String> {
    let (stem, _compression) = file_name.split_once(".ko")?;
    let rest = &file_name[stem.len() + 3..];
    (rest.is_empty() || rest.starts_with('.')).then(|| normalize_module_name(stem))
}

/// The uncompressed module: `bytes` as read from `path`, decompressed by its extension.
///
/// # Errors
/// [`Error::Initramfs`] naming the file when decompression fails or the compression
/// (e.g. `.zst`) is not supported.
pub fn decompress(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let failed = |e: String| Error::Initramfs(format!("decompressing {}: {e}", path.display()));
    if name.ends_with(".ko") {
        Ok(bytes.to_vec())
    } else if name.ends_with(".ko.xz") {
        let mut out = Vec::with_capacity(bytes.len() * 4);
        lzma_rs::xz_decompress(&mut &bytes[..], &mut out).map_err(|e| failed(format!("{e:?}")))?;
        Ok(out)
    } else if name.ends_with(".ko.gz") {
        let mut out = Vec::with_capacity(bytes.len() * 4);
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| failed(e.to_string()))?;
        Ok(out)
    } else {
        Err(failed(
            "unsupported compression (.ko, .ko.xz and .ko.gz are)".into(),
        ))
    }
}

/// The `key=value` strings of the module's `.modinfo` section, in order.
///
/// # Errors
/// [`Error::Initramfs`] when `object` is not an ELF file or has no `.modinfo` section.
pub fn modinfo(object: &[u8]) -> Result<Vec<(String, String)>> {
    let file = object::File::parse(object)
        .map_err(|e| Error::Initramfs(format!("not an ELF module: {e}")))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| Error::Initramfs("module has no .modinfo section".into()))?;
    let data = section
        .data()
        .map_err(|e| Error::Initramfs(format!("reading .modinfo: {e}")))?;
    Ok(data
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let text = std::str::from_utf8(entry).ok()?;
            let (key, value) = text.split_once('=')?;
            Some((key.to_string(), value.to_string()))
        })
        .collect())
}

/// The modules `object` depends on (its `depends=` entries, normalised).
///
/// # Errors
/// As [`modinfo`].
pub fn dependencies(object: &[u8]) -> Result<Vec<String>> {
    Ok(modinfo(object)?
        .into_iter()
        .filter(|(key, _)| key == "depends")
        .flat_map(|(_, value)| {
            value
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(normalize_module_name)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// The modules of one kernel release: `<modules dir>/kernel/**/<name>.ko[.xz|.gz]` by name.
#[derive(Clone, Debug)]
pub struct ModuleTree {
    /// The kernel release (the directory name, e.g. `6.12.117+deb13-arm64`).
    pub release: String,
    /// Module name (normalised) ⇒ file.
    files: BTreeMap<String, PathBuf>,
}

impl ModuleTree {
    /// Indexes `modules_dir` (`…/lib/modules/<release>`).
    ///
    /// # Errors
    /// [`Error::Io`] when a directory cannot be read.
    pub fn open(modules_dir: &Path) -> Result<Self> {
        let release = modules_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let mut files = BTreeMap::new();
        let mut pending = vec![modules_dir.join("kernel")];
        while let Some(dir) = pending.pop() {
            for entry in io_context(fs::read_dir(&dir), || {
                format!("cannot read {}", dir.display())
            })? {
                let entry = io_context(entry, || format!("cannot read {}", dir.display()))?;
                let path = entry.path();
                let kind = io_context(entry.file_type(), || {
                    format!("cannot stat {}", path.display())
                })?;
                if kind.is_dir() {
                    pending.push(path);
                } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                    files.insert(name, path);
                }
            }
        }
        Ok(Self { release, files })
    }

    /// How many modules the tree has.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the tree has no modules.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The file of module `name` (`-` or `_`), if the kernel has it as a module.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.files
            .get(&normalize_module_name(name))
            .map(PathBuf::as_path)
    }

    /// Module `name`, read and decompressed.
    ///
    /// # Errors
    /// [`Error::Initramfs`] when the kernel has no such module or it cannot be decompressed;
    /// [`Error::Io`] when it cannot be read.
    pub fn load(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path(name).ok_or_else(|| {
            Error::Initramfs(format!(
                "kernel {} has no module {name} (among {} modules)",
                self.release,
                self.files.len()
            ))
        })?;
        let bytes = io_context(fs::read(path), || format!("cannot read {}", path.display()))?;
        decompress(path, &bytes)
    }

    /// `wanted` and everything they depend on, each once, dependencies before their users and
    /// otherwise in `wanted`'s order, decompressed.
    ///
    /// # Errors
    /// Those of [`Self::load`] and [`modinfo`] (naming the module); [`Error::Initramfs`] on a
    /// dependency cycle.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<InitramfsModule>> {
        let mut order: Vec<InitramfsModule> = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            self.visit(
                &normalize_module_name(name),
                &mut Vec::new(),
                &mut done,
                &mut order,
            )?;
        }
        Ok(order)
    }

    /// Depth-first: `name`'s dependencies, then `name`. `path` is the chain being resolved
    /// (cycle detection; its length is bounded by the number of modules).
    fn visit(
        &self,
        name: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<InitramfsModule>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(Error::Initramfs(format!(
                "module dependency cycle: {} -> {name}",
                path.join(" -> ")
            )));
        }
        let object = self.load(name)?;
        let depends =
            dependencies(&object).map_err(|e| Error::Initramfs(format!("module {name}: {e}")))?;
        path.push(name.to_string());
        for dependency in &depends {
            self.visit(dependency, path, done, order)?;
        }
        path.pop();
        done.insert(name.to_string());
        order.push(InitramfsModule {
            name: name.to_string(),
            object,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            module_name("virtio-iommu.ko.xz").as_deref(),
            Some("virtio_iommu")
        );
        assert_eq!(module_name("virtio_blk.ko").as_deref(), Some("virtio_blk"));
        assert_eq!(module_name("a.ko.gz").as_deref(), Some("a"));
        assert_eq!(module_name("modules.order"), None);
        assert_eq!(module_name("x.kobj"), None);
    }

    #[test]
    fn unsupported_compression_is_named() {
        let e = decompress(Path::new("/m/virtio_blk.ko.zst"), b"..").unwrap_err();
        assert!(e.to_string().contains("virtio_blk.ko.zst"), "{e}");
        assert_eq!(decompress(Path::new("a.ko"), b"abc").unwrap(), b"abc");
        assert!(decompress(Path::new("a.ko.xz"), b"not xz").is_err());
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &b"\x7fELF module"[..], &mut xz).unwrap();
        assert_eq!(
            decompress(Path::new("/m/virtio-iommu.ko.xz"), &xz).unwrap(),
            b"\x7fELF module"
        );
    }

    /// An ELF relocatable object with a `.modinfo` section of `info` (`key=value` strings).
    fn module(info: &[&str]) -> Vec<u8> {
        use object::write::Object as Writer;
        use object::{Architecture, BinaryFormat, Endianness, SectionKind};
        let mut elf = Writer::new(BinaryFormat::Elf, Architecture::Aarch64, Endianness::Little);
        let section = elf.add_section(
            Vec::new(),
            b".modinfo".to_vec(),
            SectionKind::ReadOnlyString,
        );
        let mut data = Vec::new();
        for entry in info {
            data.extend_from_slice(entry.as_bytes());
            data.push(0);
        }
        elf.append_section_data(section, &data, 1);
        elf.write().expect("ELF")
    }

    /// A module tree in a fresh directory: (file name under kernel/, modinfo entries).
    fn tree(name: &str, modules: &[(&str, &[&str])]) -> (PathBuf, ModuleTree) {
        let dir =
            std::env::temp_dir().join(format!("viommu-modules-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let release = dir.join("6.0-test");
        for (file, info) in modules {
            let path = release.join("kernel/drivers").join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            let object = module(info);
            if file.ends_with(".gz") {
                use std::io::Write;
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&object).unwrap();
                fs::write(&path, gz.finish().unwrap()).unwrap();
            } else {
                fs::write(&path, object).unwrap();
            }
        }
        let tree = ModuleTree::open(&release).expect("open");
        (dir, tree)
    }

    #[test]
    fn dependencies_come_first_once() {
        let (dir, tree) = tree(
            "order",
            &[
                (
                    "iommu/virtio-iommu.ko",
                    &["license=GPL", "depends=virtio_ring,virtio"],
                ),
                ("virtio/virtio_ring.ko.gz", &["depends=virtio"]),
                ("virtio/virtio.ko", &["depends="]),
                ("block/virtio_blk.ko", &["depends=virtio-ring,virtio"]),
            ],
        );
        assert_eq!(tree.release, "6.0-test");
        assert_eq!(tree.len(), 4);
        let order = tree
            .load_order(&["virtio_iommu", "virtio-blk"])
            .expect("order");
        let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["virtio", "virtio_ring", "virtio_iommu", "virtio_blk"]
        );
        // The objects are the decompressed ELF files.
        assert!(order.iter().all(|m| m.object.starts_with(b"\x7fELF")));
        assert_eq!(
            dependencies(&order[2].object).unwrap(),
            ["virtio_ring", "virtio"]
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn missing_dependency_and_cycle_are_errors() {
        let (dir, tree) = tree(
            "broken",
            &[
                ("a.ko", &["depends=b"]),
                ("b.ko", &["depends=a"]),
                ("c.ko", &["depends=nowhere"]),
            ],
        );
        let cycle = tree.load_order(&["a"]).unwrap_err().to_string();
        assert!(cycle.contains("cycle: a -> b -> a"), "{cycle}");
        let missing = tree.load_order(&["c"]).unwrap_err().to_string();
        assert!(missing.contains("no module nowhere"), "{missing}");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn not_elf_is_an_error() {
        assert!(matches!(modinfo(b"garbage"), Err(Error::Initramfs(_))));
    }
}
