//! The ACPI case: the VIOT QEMU generates (read through fw_cfg `etc/acpi/tables`, which
//! `-M virt` provides even with `-kernel`) must describe the same IOMMU and endpoints as the
//! devicetree.
//!
//! The blob is every ACPI table but the RSDP, end to end, as QEMU built it: its pointers are
//! still offsets and its checksums 0 (the `etc/table-loader` script patches both). The
//! firmware runs the script's ADD_CHECKSUM commands ([`crate::table_loader`]), finds the tables
//! by walking their headers ([`virtio_iommu_driver::topology::acpi::tables`]) and, as a check
//! of that walk, requires every XSDT entry — an offset into the blob before patching — to be
//! the offset of a table the walk found. The driver then checks the VIOT and MCFG completely
//! (checksums included).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_iommu_driver::topology::acpi::{
    find_table, mcfg_entries, tables, AcpiError, MCFG_FIXED_SIZE, MCFG_SIGNATURE,
};
use virtio_iommu_driver::topology::{Endpoint, IommuLocation, Topology};

use super::Tap;
use crate::fwcfg::FwCfg;
use crate::pci::PciBus;
use crate::table_loader::apply_checksums;

/// The case's name (the runner's boot test requires it).
pub const CASE: &str = "IOMMU and endpoints found through ACPI VIOT agree with the devicetree";

/// `Endpoint` as a comparable pair.
fn pair(ep: Option<Endpoint>) -> Option<(usize, u32)> {
    ep.map(|e| (e.iommu, e.endpoint_id))
}

/// Signature as text for messages.
fn sig(s: &[u8; 4]) -> String {
    s.iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

/// Checks the XSDT's entries against the walk, prints the tables.
fn check_walk(blob: &[u8]) -> Result<(), String> {
    let mut found = Vec::new();
    for table in tables(blob) {
        let table = table.map_err(|e| format!("etc/acpi/tables: {e}"))?;
        found.push((table.offset, table.signature, table.bytes));
    }
    let list: Vec<String> = found
        .iter()
        .map(|(offset, s, bytes)| format!("{}@{offset:#x}+{:#x}", sig(s), bytes.len()))
        .collect();
    println!("# ACPI tables ({} bytes): {}", blob.len(), list.join(" "));
    let Some((_, _, xsdt)) = found.iter().find(|(_, s, _)| s == b"XSDT") else {
        return Err("no XSDT in etc/acpi/tables".into());
    };
    let entries = xsdt.get(36..).unwrap_or_default();
    if !entries.len().is_multiple_of(8) {
        return Err(format!("XSDT entries are {} bytes", entries.len()));
    }
    for chunk in entries.chunks_exact(8) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let offset = u64::from_le_bytes(bytes);
        if !found.iter().any(|(at, _, _)| *at as u64 == offset) {
            return Err(format!(
                "XSDT entry {offset:#x} is not the offset of a table the header walk found"
            ));
        }
    }
    Ok(())
}

/// Why the case does not apply when QEMU generated no VIOT and every IOMMU of the devicetree
/// is a virtio-mmio one.
pub const MMIO_SKIP: &str =
    "QEMU builds a VIOT only for virtio-iommu-pci (hw/arm/virt-acpi-build.c: \
                             VIOT from the IOMMU's PCI BDF); its ACPI does not describe a \
                             virtio-mmio virtio-iommu";

/// Without a VIOT: the MCFG must still give the devicetree's host bridges (ECAM base and bus
/// range, in order).
fn check_mcfg(blob: &[u8], pci: &PciBus) -> Result<(), String> {
    let mcfg =
        find_table(blob, MCFG_SIGNATURE, MCFG_FIXED_SIZE).map_err(|e| format!("MCFG: {e}"))?;
    let entries = mcfg_entries(mcfg).map_err(|e| format!("MCFG: {e}"))?;
    let dt = &pci.topology.host_bridges;
    if entries.len() != dt.len() {
        return Err(format!(
            "{} MCFG entr(ies), {} host bridge(s) in the devicetree",
            entries.len(),
            dt.len()
        ));
    }
    for (a, d) in entries.iter().zip(dt) {
        println!(
            "# MCFG: ECAM {:#x} buses {}..={}; {}: {:#x} buses {}..={}",
            a.ecam_base, a.bus_start, a.bus_end, d.path, d.ecam_base, d.bus_start, d.bus_end
        );
        if (a.ecam_base, a.bus_start, a.bus_end) != (d.ecam_base, d.bus_start, d.bus_end) {
            return Err(format!("MCFG and {} disagree", d.path));
        }
    }
    Ok(())
}

/// Runs the case. With only virtio-mmio IOMMUs in the devicetree and no VIOT from QEMU it is
/// reported as `SKIP` ([`MMIO_SKIP`]) after checking the table walk and the MCFG; a VIOT, when
/// there is one, is compared in full whatever the IOMMU's transport.
pub fn run(tap: &mut Tap, dtb: &[u8], pci: &PciBus) {
    let only_mmio = !pci.topology.iommus.is_empty()
        && pci
            .topology
            .iommus
            .iter()
            .all(|i| matches!(i.location, IommuLocation::Mmio { .. }));
    tap.case_or_skip(CASE, || {
        let fw_cfg = FwCfg::from_dtb(dtb)?;
        let mut blob = fw_cfg
            .read_file("etc/acpi/tables")?
            .ok_or_else(|| String::from("fw-cfg has no etc/acpi/tables (ACPI disabled?)"))?;
        let loader = fw_cfg
            .read_file("etc/table-loader")?
            .ok_or_else(|| String::from("fw-cfg has no etc/table-loader"))?;
        let checksums = apply_checksums(&loader, "etc/acpi/tables", &mut blob)?;
        println!("# etc/table-loader: {checksums} checksum(s) of etc/acpi/tables computed");
        check_walk(&blob)?;
        let acpi = match Topology::from_acpi_tables(&blob) {
            Ok(t) => t,
            Err(AcpiError::TableNotFound(s)) if &s == b"VIOT" && only_mmio => {
                check_mcfg(&blob, pci)?;
                return Ok(Some(MMIO_SKIP.into()));
            }
            Err(AcpiError::TableNotFound(s)) if &s == b"VIOT" => return Err(
                "QEMU generated no VIOT for this machine: nothing to compare with the devicetree"
                    .into(),
            ),
            Err(e) => return Err(format!("VIOT/MCFG: {e}")),
        };
        if let Ok(viot) = find_table(&blob, *b"VIOT", 48) {
            let hex: String = viot.iter().map(|b| format!("{b:02x}")).collect();
            println!("# VIOT bytes: {hex}");
        }
        let dt = &pci.topology;
        for (index, node) in acpi.iommus.iter().enumerate() {
            println!("# VIOT iommu {index}: {} {:?}", node.path, node.location);
        }
        if acpi.iommus.len() != dt.iommus.len() {
            return Err(format!(
                "{} IOMMU(s) in the VIOT, {} in the devicetree",
                acpi.iommus.len(),
                dt.iommus.len()
            ));
        }
        for (a, d) in acpi.iommus.iter().zip(&dt.iommus) {
            if a.location != d.location {
                return Err(format!(
                    "{} is at {:?}, {} at {:?}",
                    a.path, a.location, d.path, d.location
                ));
            }
        }
        if acpi.host_bridges.len() != dt.host_bridges.len() {
            return Err(format!(
                "{} MCFG host bridge(s), {} in the devicetree",
                acpi.host_bridges.len(),
                dt.host_bridges.len()
            ));
        }
        for (a, d) in acpi.host_bridges.iter().zip(&dt.host_bridges) {
            println!(
                "# {}: ECAM {:#x}+{:#x} buses {}..={}",
                a.path, a.ecam_base, a.ecam_size, a.bus_start, a.bus_end
            );
            if (a.ecam_base, a.ecam_size, a.bus_start, a.bus_end)
                != (d.ecam_base, d.ecam_size, d.bus_start, d.bus_end)
            {
                return Err(format!(
                    "{}: ECAM {:#x}+{:#x} buses {}..={}, {}: {:#x}+{:#x} buses {}..={}",
                    a.path,
                    a.ecam_base,
                    a.ecam_size,
                    a.bus_start,
                    a.bus_end,
                    d.path,
                    d.ecam_base,
                    d.ecam_size,
                    d.bus_start,
                    d.bus_end
                ));
            }
        }
        let mut behind = 0usize;
        for f in &pci.functions {
            let a = acpi
                .pci_endpoint(f.host_bridge, f.requester_id)
                .map_err(|e| format!("VIOT: {e:?}"))?;
            let d = dt
                .pci_endpoint(f.host_bridge, f.requester_id)
                .map_err(|e| format!("iommu-map: {e:?}"))?;
            let df = &f.device_function;
            println!(
                "# {:02x}:{:02x}.{} {:04x}:{:04x}: VIOT {:?}, devicetree {:?}",
                df.bus,
                df.device,
                df.function,
                f.vendor_id,
                f.device_id,
                pair(a),
                pair(d)
            );
            if pair(a) != pair(d) {
                return Err(format!(
                    "{:02x}:{:02x}.{}: VIOT gives {:?}, the devicetree {:?}",
                    df.bus,
                    df.device,
                    df.function,
                    pair(a),
                    pair(d)
                ));
            }
            behind += usize::from(a.is_some());
        }
        if behind == 0 {
            return Err("no enumerated function is behind an IOMMU: nothing compared".into());
        }
        println!("# {behind} endpoint(s) agree");
        Ok(None)
    });
}
