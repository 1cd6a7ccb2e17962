//! PCI addresses of the vfio-user devices on bus 0: QEMU's `addr=` syntax (`slot[.function]`,
//! hexadecimal, as `VIOMMU_IOMMU_ADDR` and friends give it) and the requester ID a device at
//! that address has (PCIe Base Specification §2.2.6.2: bus << 8 | device << 3 | function), which
//! is also its endpoint ID in the `iommu-map` the runner writes.

use std::fmt;

/// A device/function on PCI bus 0.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct PciAddr {
    /// Device (slot) number, 0–0x1f.
    pub slot: u8,
    /// Function number, 0–7.
    pub function: u8,
}

impl PciAddr {
    /// `slot.function`, both below their limits (slot ≤ 0x1f, function ≤ 7).
    pub fn new(slot: u8, function: u8) -> Option<Self> {
        (slot <= 0x1f && function <= 7).then_some(Self { slot, function })
    }

    /// Parses QEMU's `addr=` syntax as QEMU's `pci-devfn` property does: a hexadecimal slot
    /// (an optional `0x` prefix, as C's `strtoul(…, 16)` accepts) and an optional
    /// `.function`, also hexadecimal. `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = |s: &str| {
            let digits = s
                .strip_prefix("0x")
                .or_else(|| s.strip_prefix("0X"))
                .unwrap_or(s);
            if digits.is_empty() || digits.len() > 4 {
                return None;
            }
            u8::from_str_radix(digits, 16).ok()
        };
        let text = text.trim();
        let (slot, function) = match text.split_once('.') {
            Some((slot, function)) => (hex(slot)?, hex(function)?),
            None => (hex(text)?, 0),
        };
        Self::new(slot, function)
    }

    /// devfn: slot << 3 | function.
    pub fn devfn(self) -> u8 {
        self.slot << 3 | self.function
    }

    /// The requester ID on bus 0 (= devfn), which the runner also uses as endpoint ID.
    pub fn requester_id(self) -> u16 {
        u16::from(self.devfn())
    }

    /// The `addr` value for QEMU: `SS.F`.
    pub fn qemu_addr(self) -> String {
        format!("{:02x}.{:x}", self.slot, self.function)
    }
}

impl fmt::Display for PciAddr {
    /// `00:SS.F` (bus 0), as the firmware prints PCI functions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00:{:02x}.{:x}", self.slot, self.function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_syntax() {
        assert_eq!(PciAddr::parse("0x1"), PciAddr::new(1, 0));
        assert_eq!(PciAddr::parse("01.0"), PciAddr::new(1, 0));
        assert_eq!(PciAddr::parse("0x1e"), PciAddr::new(0x1e, 0));
        assert_eq!(
            PciAddr::parse("11"),
            PciAddr::new(0x11, 0),
            "hex, like QEMU"
        );
        assert_eq!(PciAddr::parse("3.7"), PciAddr::new(3, 7));
        for bad in [
            "", "0x", "20", "1.8", "x", "1.", ".1", "1.0.0", "-1", "0x100",
        ] {
            assert_eq!(PciAddr::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ids() {
        let blk = PciAddr::parse("2").unwrap();
        assert_eq!(blk.requester_id(), 0x10);
        assert_eq!(PciAddr::parse("3").unwrap().requester_id(), 0x18);
        let odd = PciAddr::new(0x1f, 7).unwrap();
        assert_eq!(odd.devfn(), 0xff);
        assert_eq!(odd.qemu_addr(), "1f.7");
        assert_eq!(odd.to_string(), "00:1f.7");
    }
}
