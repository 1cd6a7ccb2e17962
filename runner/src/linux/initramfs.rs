//! The guest's initramfs: a gzip'd `newc` cpio archive (the format the kernel unpacks into its
//! rootfs, `Documentation/driver-api/early-userspace/buffer-format.rst`), written with the
//! `cpio` crate and compressed with `flate2`.
//!
//! Contents ([`build_initramfs`]): the directories busybox and `/init` use, `/dev/console`
//! (character device 5:1, so that `/init` has a console before devtmpfs is mounted),
//! `/bin/busybox` with `/bin/sh` linking to it, `/init`, and the kernel modules as
//! `/lib/modules/NN-<name>.ko` (`NN` = load order, from 01).

use std::io::Write;

use cpio::newc::{Builder, ModeFileType};
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::{Error, Result};

/// Directories of the initramfs (parents before children).
const DIRECTORIES: &[&str] = &[
    "bin",
    "dev",
    "etc",
    "lib",
    "lib/modules",
    "proc",
    "sbin",
    "sys",
    "tmp",
    "usr",
    "usr/bin",
    "usr/sbin",
];

/// A kernel module for the initramfs, already decompressed.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct InitramfsModule {
    /// Its name as `modinfo` gives it (e.g. `virtio_iommu`), used in the file name.
    pub name: String,
    /// The ELF relocatable object (`.ko`), uncompressed.
    pub object: Vec<u8>,
}

/// An uncompressed newc archive being written: entries with inode numbers from 1.
struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
}

impl Archive {
    fn entry(&mut self, builder: Builder, content: &[u8]) -> Result<()> {
        let size = u32::try_from(content.len()).map_err(|_| {
            Error::Initramfs(format!(
                "an entry of {} bytes is too large for newc",
                content.len()
            ))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut writer = builder.ino(ino).write(&mut self.bytes, size);
        let written = writer
            .write_all(content)
            .and_then(|()| writer.finish().map(drop));
        written.map_err(|e| Error::Initramfs(format!("writing the cpio archive: {e}")))
    }

    fn directory(&mut self, path: &str) -> Result<()> {
        let builder = Builder::new(path)
            .mode(0o755)
            .nlink(2)
            .set_mode_file_type(ModeFileType::Directory);
        self.entry(builder, &[])
    }

    fn file(&mut self, path: &str, permissions: u32, content: &[u8]) -> Result<()> {
        let builder = Builder::new(path)
            .mode(permissions)
            .set_mode_file_type(ModeFileType::Regular);
        self.entry(builder, content)
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let builder = Builder::new(path)
            .mode(0o777)
            .set_mode_file_type(ModeFileType::Symlink);
        self.entry(builder, target.as_bytes())
    }

    fn char_device(&mut self, path: &str, permissions: u32, major: u32, minor: u32) -> Result<()> {
        let builder = Builder::new(path)
            .mode(permissions)
            .rdev_major(major)
            .rdev_minor(minor)
            .set_mode_file_type(ModeFileType::Char);
        self.entry(builder, &[])
    }

    fn finish(self) -> Result<Vec<u8>> {
        cpio::newc::trailer(self.bytes)
            .map_err(|e| Error::Initramfs(format!("writing the cpio trailer: {e}")))
    }
}

/// The file name of the `index`th module (0-based) in `/lib/modules`: `NN-<name>.ko`, so that a
/// shell glob lists the modules in load order.
pub fn module_file_name(index: usize, name: &str) -> String {
    format!("{:02}-{name}.ko", index + 1)
}

/// The uncompressed newc archive: see the module documentation. `modules` are in load order
/// (dependencies first).
///
/// # Errors
/// [`Error::Initramfs`] when an entry does not fit the newc format (over 4 GiB) or more than
/// 99 modules are given.
pub fn build_cpio(busybox: &[u8], init: &str, modules: &[InitramfsModule]) -> Result<Vec<u8>> {
    if modules.len() > 99 {
        return Err(Error::Initramfs(format!(
            "{} modules: the NN- load-order prefix allows 99",
            modules.len()
        )));
    }
    let mut archive = Archive {
        bytes: Vec::with_capacity(busybox.len() + (1 << 20)),
        next_ino: 1,
    };
    for dir in DIRECTORIES {
        archive.directory(dir)?;
    }
    archive.char_device("dev/console", 0o600, 5, 1)?;
    archive.file("bin/busybox", 0o755, busybox)?;
    archive.symlink("bin/sh", "busybox")?;
    archive.file("init", 0o755, init.as_bytes())?;
    for (index, module) in modules.iter().enumerate() {
        let path = format!("lib/modules/{}", module_file_name(index, &module.name));
        archive.file(&path, 0o644, &module.object)?;
    }
    archive.finish()
}

/// [`build_cpio`], gzip-compressed: the file QEMU's `-initrd` takes.
///
/// # Errors
/// As [`build_cpio`]; [`Error::Initramfs`] when compression fails.
pub fn build_initramfs(busybox: &[u8], init: &str, modules: &[InitramfsModule]) -> Result<Vec<u8>> {
    let cpio = build_cpio(busybox, init, modules)?;
    let mut gz = GzEncoder::new(Vec::with_capacity(cpio.len() / 2), Compression::default());
    gz.write_all(&cpio)
        .and_then(|()| gz.finish())
        .map_err(|e| Error::Initramfs(format!("gzip: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::NewcReader;
    use std::io::Read;

    /// (name, mode, rdev major, rdev minor, content) of every entry, trailer excluded.
    fn entries(gz: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut cpio)
            .expect("gzip");
        let mut rest: &[u8] = &cpio;
        let mut out = Vec::new();
        loop {
            let mut reader = NewcReader::new(rest).expect("newc entry");
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let meta = (
                e.name().to_string(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
            );
            let mut content = Vec::new();
            reader.read_to_end(&mut content).expect("content");
            out.push((meta.0, meta.1, meta.2, meta.3, content));
            rest = reader.finish().expect("next");
        }
        out
    }

    #[test]
    fn archive_has_console_busybox_init_and_ordered_modules() {
        let modules = [
            InitramfsModule {
                name: "virtio_iommu".into(),
                object: b"\x7fELF iommu".to_vec(),
            },
            InitramfsModule {
                name: "virtio_blk".into(),
                object: vec![7; 4099],
            },
        ];
        let gz = build_initramfs(b"BUSYBOX", "#!/bin/sh\necho hi\n", &modules).expect("build");
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        let all = entries(&gz);
        let find = |name: &str| {
            all.iter().find(|e| e.0 == name).unwrap_or_else(|| {
                panic!(
                    "{name} missing: {:?}",
                    all.iter().map(|e| &e.0).collect::<Vec<_>>()
                )
            })
        };
        assert_eq!(find("dev/console").1, 0o020600);
        assert_eq!((find("dev/console").2, find("dev/console").3), (5, 1));
        assert_eq!(find("bin/busybox").1, 0o100755);
        assert_eq!(find("bin/busybox").4, b"BUSYBOX");
        assert_eq!(find("bin/sh").1, 0o120777);
        assert_eq!(find("bin/sh").4, b"busybox");
        assert_eq!(find("init").1, 0o100755);
        assert_eq!(find("init").4, b"#!/bin/sh\necho hi\n");
        assert_eq!(find("proc").1, 0o040755);
        assert_eq!(find("lib/modules/01-virtio_iommu.ko").4, b"\x7fELF iommu");
        assert_eq!(find("lib/modules/02-virtio_blk.ko").4, vec![7; 4099]);
        // Parents come before children, as the kernel's unpacker needs.
        let position = |name: &str| all.iter().position(|e| e.0 == name);
        assert!(position("lib") < position("lib/modules"));
        assert!(position("lib/modules") < position("lib/modules/01-virtio_iommu.ko"));
    }

    #[test]
    fn too_many_modules_refused() {
        let modules = vec![
            InitramfsModule {
                name: "m".into(),
                object: Vec::new(),
            };
            100
        ];
        assert!(matches!(
            build_cpio(b"", "", &modules),
            Err(Error::Initramfs(_))
        ));
    }
}
