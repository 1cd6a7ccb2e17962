//! Where our three devices sit on PCI bus 0 (`VIOMMU_IOMMU_ADDR`, `VIOMMU_BLK_ADDR`,
//! `VIOMMU_EDU_ADDR`; defaults 00:01.0, 00:02.0, 00:03.0) and what else may be on that bus
//! when booting against our device.

#[allow(unused_imports)]
use crate::*;

use super::PciAddr;

/// Requester ID of the host bridge function 00:00.0 of `-M virt` (QEMU's `gpex-root`).
pub const HOST_BRIDGE_RID: u16 = 0;

/// Where our three devices sit on PCI bus 0.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Layout {
    /// The virtio-iommu (default 00:01.0).
    pub iommu: PciAddr,
    /// virtio-blk (default 00:02.0, endpoint 0x10).
    pub blk: PciAddr,
    /// edu (default 00:03.0, endpoint 0x18).
    pub edu: PciAddr,
}

impl Layout {
    /// From `config.{iommu,blk,edu}_addr` (QEMU's `addr=` syntax), defaults 1, 2 and 3.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEnv`] naming the variable when an address does not parse, when two
    /// devices share one, or when `config.blk_devices` is not 1.
    pub fn from_config(config: &RunConfig) -> Result<Self> {
        if config.blk_devices != 1 {
            return Err(Error::InvalidEnv {
                name: "VIOMMU_BLK_DEVICES",
                reason: format!(
                    "{} (VIOMMU_BLK_DEVICES or --blk-devices): our device serves one virtio-blk (its endpoint table is fixed)",
                    config.blk_devices
                ),
            });
        }
        let parse = |value: Option<&String>, name: &'static str, default: u8| {
            match value {
            None => Ok(PciAddr {
                slot: default,
                function: 0,
            }),
            Some(text) => PciAddr::parse(text).ok_or_else(|| Error::InvalidEnv {
                name,
                reason: format!("`{text}` is not a PCI address (slot[.function], hexadecimal, slot ≤ 1f, function ≤ 7)"),
            }),
        }
        };
        let layout = Self {
            iommu: parse(config.iommu_addr.as_ref(), "VIOMMU_IOMMU_ADDR", 1)?,
            blk: parse(config.blk_addr.as_ref(), "VIOMMU_BLK_ADDR", 2)?,
            edu: parse(config.edu_addr.as_ref(), "VIOMMU_EDU_ADDR", 3)?,
        };
        let clash = |a: PciAddr, b: PciAddr, name: &'static str, other: &str| {
            if a == b {
                Err(Error::InvalidEnv {
                    name,
                    reason: format!("{a} is also the {other}'s address"),
                })
            } else {
                Ok(())
            }
        };
        clash(layout.blk, layout.iommu, "VIOMMU_BLK_ADDR", "virtio-iommu")?;
        clash(layout.edu, layout.iommu, "VIOMMU_EDU_ADDR", "virtio-iommu")?;
        clash(layout.edu, layout.blk, "VIOMMU_EDU_ADDR", "virtio-blk")?;
        for (addr, name) in [
            (layout.iommu, "VIOMMU_IOMMU_ADDR"),
            (layout.blk, "VIOMMU_BLK_ADDR"),
            (layout.edu, "VIOMMU_EDU_ADDR"),
        ] {
            if addr.slot == 0 {
                return Err(Error::InvalidEnv {
                    name,
                    reason: "slot 0 is the host bridge's".into(),
                });
            }
        }
        Ok(layout)
    }
}

/// Refuses QEMU PCI devices in the extra arguments (`-device <driver>-pci…` or `edu`): our
/// IOMMU does not know them, yet the `iommu-map` would put them behind it (the firmware PROBEs
/// every function behind it and gets S_NOENT), their DMA would not be translated, and QEMU
/// places a device without `addr=` in slot 1 before the vfio-user devices are realized (seen
/// with `cargo qemu-dma-modes`' `virtio-rng-pci`: "slot 1 function 0 not available for
/// vfio-user-pci").
///
/// # Errors
///
/// [`Error::InvalidEnv`] (`VIOMMU_DEVICE`) naming the device.
pub fn check_no_qemu_pci_devices(extra_args: &[String]) -> Result<()> {
    let mut args = extra_args.iter();
    while let Some(arg) = args.next() {
        if arg != "-device" && arg != "--device" {
            continue;
        }
        let Some(device) = args.next() else { break };
        let driver = device.split(',').next().unwrap_or_default();
        if driver.ends_with("-pci") || driver == "edu" {
            return Err(Error::InvalidEnv {
                name: "VIOMMU_DEVICE",
                reason: format!(
                    "`ours` cannot boot with QEMU's PCI device `-device {device}`: our IOMMU \
                     does not know it and does not translate its DMA (for dma-modes against \
                     our device use `cargo qemu-ours-dma-modes`, which has no virtio-rng)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let default = Layout::from_config(&RunConfig::default()).unwrap();
        assert_eq!(default.iommu.requester_id(), 0x08);
        assert_eq!(default.blk.requester_id(), 0x10);
        assert_eq!(default.edu.requester_id(), 0x18);
        let moved = Layout::from_config(&RunConfig {
            iommu_addr: Some("0x5".into()),
            blk_addr: Some("0x1e".into()),
            edu_addr: Some("3.1".into()),
            ..RunConfig::default()
        })
        .unwrap();
        assert_eq!(
            (moved.iommu.devfn(), moved.blk.devfn(), moved.edu.devfn()),
            (0x28, 0xf0, 0x19)
        );
        for (iommu, blk, edu, variable) in [
            (Some("0x20"), None, None, "VIOMMU_IOMMU_ADDR"),
            (None, Some("1"), None, "VIOMMU_BLK_ADDR"),
            (None, None, Some("02.0"), "VIOMMU_EDU_ADDR"),
            (Some("0"), None, None, "VIOMMU_IOMMU_ADDR"),
        ] {
            let config = RunConfig {
                iommu_addr: iommu.map(String::from),
                blk_addr: blk.map(String::from),
                edu_addr: edu.map(String::from),
                ..RunConfig::default()
            };
            match Layout::from_config(&config) {
                Err(Error::InvalidEnv { name, .. }) => assert_eq!(name, variable),
                other => panic!("{iommu:?} {blk:?} {edu:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn qemu_pci_devices_are_refused() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_no_qemu_pci_devices(&args(&["-append", "bench", "-smp", "2"])).is_ok());
        assert!(check_no_qemu_pci_devices(&args(&["-device", "loader,addr=0x1"])).is_ok());
        for bad in ["virtio-rng-pci,iommu_platform=on", "edu", "e1000e-pci"] {
            match check_no_qemu_pci_devices(&args(&["-m", "1G", "-device", bad])) {
                Err(Error::InvalidEnv { name, reason }) => {
                    assert_eq!(name, "VIOMMU_DEVICE");
                    assert!(reason.contains(bad), "{reason}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
