//! QEMU's command line against our device: the machine of [`machine_args`], guest RAM as a
//! shared memfd (so that the server can map it from the DMA_MAP file descriptors), one
//! `vfio-user-pci` per device (QEMU accepts its `socket` only in JSON form) and `-dtb`.

#[allow(unused_imports)]
use crate::*;

use super::PciAddr;

/// The guest RAM size QEMU will use: the value of the last `-m` in `extra_args` (QEMU's syntax
/// `[size=]N[suffix][,slots=…,maxmem=…]`; a plain number is MiB), else [`DEFAULT_MEMORY`],
/// as a size with a unit suffix (so that the memory backend, whose plain numbers are bytes,
/// reads the same size).
///
/// # Errors
///
/// [`Error::InvalidEnv`] (`VIOMMU_QEMU_ARGS`) when `-m` has no value.
pub fn memory_size(extra_args: &[String]) -> Result<String> {
    let mut size = DEFAULT_MEMORY.to_string();
    let mut args = extra_args.iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-m" | "--m" => args.next().ok_or_else(|| Error::InvalidEnv {
                name: "VIOMMU_QEMU_ARGS",
                reason: "`-m` without a value".into(),
            })?,
            _ => continue,
        };
        let first = value.split(',').next().unwrap_or_default();
        let first = first.strip_prefix("size=").unwrap_or(first).trim();
        size = if !first.is_empty() && first.chars().all(|c| c.is_ascii_digit()) {
            format!("{first}M")
        } else {
            first.to_string()
        };
    }
    Ok(size)
}

/// `value` as a JSON string literal (quotes, backslashes and control characters escaped).
pub fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `-device` value of one vfio-user device:
/// `{"driver":"vfio-user-pci","socket":{"path":"…","type":"unix"},"addr":"SS.F"}`.
pub fn vfio_user_device(socket: &Path, addr: PciAddr) -> String {
    format!(
        "{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":{},\"type\":\"unix\"}},\"addr\":{}}}",
        json_string(&socket.to_string_lossy()),
        json_string(&addr.qemu_addr())
    )
}

/// The files the runner writes for the guest: its devicetree and ACPI tables.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct FirmwareFiles {
    /// The devicetree blob (`-dtb`).
    pub dtb: PathBuf,
    /// fw_cfg `etc/acpi/tables` ([`crate::acpi::AcpiBlob::tables`]).
    pub acpi_tables: PathBuf,
    /// fw_cfg `etc/table-loader` ([`crate::acpi::AcpiBlob::loader`]).
    pub acpi_loader: PathBuf,
}

/// `-fw_cfg name=<name>,file=<path>`.
fn fw_cfg(name: &str, path: &Path) -> [String; 2] {
    [
        "-fw_cfg".into(),
        format!(
            "name={name},file={}",
            boot::qemu_option_value(&path.to_string_lossy())
        ),
    ]
}

/// RAM as a shared memfd of `size`: `-object memory-backend-memfd,id=mem,size=S,share=on
/// -machine memory-backend=mem`.
pub fn memfd_args(size: &str) -> Vec<String> {
    vec![
        "-object".into(),
        format!(
            "memory-backend-memfd,id=mem,size={},share=on",
            boot::qemu_option_value(size)
        ),
        "-machine".into(),
        "memory-backend=mem".into(),
    ]
}

/// The machine without devices, for `dumpdtb`: [`machine_args`], `-machine acpi=off`,
/// [`memfd_args`], then `config.extra_args` (which shape the tree: `-M virt,…`, `-smp`,
/// `-append`).
///
/// # Errors
///
/// Those of [`memory_size`].
pub fn dump_args(config: &RunConfig, elf: &Path) -> Result<Vec<String>> {
    let mut args = machine_args(elf);
    args.extend(["-machine".into(), "acpi=off".into()]);
    args.extend(memfd_args(&memory_size(&config.extra_args)?));
    args.extend(config.extra_args.iter().cloned());
    Ok(args)
}

/// The boot: [`machine_args`], `-machine acpi=off`, [`memfd_args`], one [`vfio_user_device`]
/// per `(socket, addr)`, `-dtb`, the ACPI files as fw_cfg `etc/acpi/tables` and
/// `etc/table-loader`, then `config.extra_args`. No QEMU virtio-iommu, virtio-blk or edu.
///
/// # Errors
///
/// Those of [`memory_size`].
pub fn ours_qemu_args(
    config: &RunConfig,
    elf: &Path,
    devices: &[(PathBuf, PciAddr)],
    files: &FirmwareFiles,
) -> Result<Vec<String>> {
    let mut args = machine_args(elf);
    args.extend(["-machine".into(), "acpi=off".into()]);
    args.extend(memfd_args(&memory_size(&config.extra_args)?));
    for (socket, addr) in devices {
        args.push("-device".into());
        args.push(vfio_user_device(socket, *addr));
    }
    args.push("-dtb".into());
    args.push(files.dtb.to_string_lossy().into_owned());
    args.extend(fw_cfg(crate::acpi::TABLES_FILE, &files.acpi_tables));
    args.extend(fw_cfg(crate::acpi::LOADER_FILE, &files.acpi_loader));
    args.extend(config.extra_args.iter().cloned());
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn memory_follows_the_last_m() {
        assert_eq!(memory_size(&[]).unwrap(), "512M");
        assert_eq!(memory_size(&strings(&["-m", "128M"])).unwrap(), "128M");
        assert_eq!(
            memory_size(&strings(&["-m", "1G", "-smp", "2", "-m", "256"])).unwrap(),
            "256M",
            "plain number = MiB"
        );
        assert_eq!(
            memory_size(&strings(&["-m", "size=2G,slots=2,maxmem=4G"])).unwrap(),
            "2G"
        );
        assert!(memory_size(&strings(&["-m"])).is_err());
    }

    #[test]
    fn device_json() {
        let addr = PciAddr::new(2, 0).unwrap();
        assert_eq!(
            vfio_user_device(Path::new("/tmp/x\"y/blk.sock"), addr),
            r#"{"driver":"vfio-user-pci","socket":{"path":"/tmp/x\"y/blk.sock","type":"unix"},"addr":"02.0"}"#
        );
        assert_eq!(json_string("a\\b\n"), r#""a\\b\u000a""#);
    }

    #[test]
    fn boot_command_line() {
        let config = RunConfig {
            extra_args: strings(&["-m", "128M", "-append", "bench"]),
            ..RunConfig::default()
        };
        let devices = [
            (PathBuf::from("/d/iommu.sock"), PciAddr::new(1, 0).unwrap()),
            (PathBuf::from("/d/blk.sock"), PciAddr::new(2, 0).unwrap()),
        ];
        let files = FirmwareFiles {
            dtb: "/d/v.dtb".into(),
            acpi_tables: "/d/t,a".into(),
            acpi_loader: "/d/l".into(),
        };
        let args = ours_qemu_args(&config, Path::new("/fw.elf"), &devices, &files).unwrap();
        let joined = args.join(" ");
        assert!(
            joined.starts_with("-M virt -cpu cortex-a57 -m 512M "),
            "{joined}"
        );
        assert!(joined.contains(
            " -kernel /fw.elf -machine acpi=off -object memory-backend-memfd,id=mem,size=128M,share=on -machine memory-backend=mem -device {"
        ), "{joined}");
        assert!(joined.contains(r#""path":"/d/blk.sock","type":"unix"},"addr":"02.0"}"#));
        assert!(
            joined.ends_with(
                " -dtb /d/v.dtb -fw_cfg name=etc/acpi/tables,file=/d/t,,a \
                 -fw_cfg name=etc/table-loader,file=/d/l -m 128M -append bench"
            ),
            "{joined}"
        );
        for qemu_device in ["virtio-iommu-pci", "virtio-blk-pci", "edu", "-drive"] {
            assert!(
                !args.iter().any(|a| a.starts_with(qemu_device)),
                "{qemu_device} in {joined}"
            );
        }
        let dump = dump_args(&config, Path::new("/fw.elf")).unwrap();
        assert!(!dump.iter().any(|a| a.contains("vfio-user") || a == "-dtb"));
        assert!(dump.join(" ").ends_with("-m 128M -append bench"));
    }
}
