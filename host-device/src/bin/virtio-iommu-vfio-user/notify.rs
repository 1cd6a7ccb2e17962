//! Counting a virtio-pci function's queue notifications from outside it: the notify region is
//! found in the function's own capability list (virtio v1.3 §4.1.4.4, `cfg_type` 2), and every
//! BAR write inside it counts once.

use std::sync::Arc;

use virtio_iommu_device::function::{Bar, InterruptSink, PciFunction};
use vm_memory::GuestMemoryMmap;

/// PCI capability ID of vendor-specific capabilities (the virtio-pci ones).
const CAP_VENDOR: u8 = 0x09;
/// `VIRTIO_PCI_CAP_NOTIFY_CFG`.
const CFG_NOTIFY: u8 = 2;
/// More capabilities than fit in 256 bytes: a longer walk is a loop.
const MAX_CAPS: usize = 64;

/// `(bar, offset, length)` in bytes of the notify region of `f`, if it has one.
fn notify_region(f: &mut dyn PciFunction) -> Option<(u8, u64, u64)> {
    let mut b = [0u8; 1];
    let mut read8 = |f: &mut dyn PciFunction, off: u64| {
        f.config_read(off, &mut b);
        b[0]
    };
    let mut ptr = read8(f, 0x34) & !3;
    for _ in 0..MAX_CAPS {
        if ptr == 0 {
            return None;
        }
        let at = u64::from(ptr);
        if read8(f, at) == CAP_VENDOR && read8(f, at + 3) == CFG_NOTIFY {
            let bar = read8(f, at + 4);
            let mut w = [0u8; 4];
            f.config_read(at + 8, &mut w);
            let offset = u32::from_le_bytes(w);
            f.config_read(at + 12, &mut w);
            let length = u32::from_le_bytes(w);
            return Some((bar, offset.into(), length.into()));
        }
        ptr = read8(f, at + 1) & !3;
    }
    None
}

/// `F` with a count of the writes into its notify region.
pub struct Notifications<F: PciFunction> {
    inner: F,
    region: Option<(u8, u64, u64)>,
    count: u64,
}

impl<F: PciFunction> Notifications<F> {
    /// Wraps `inner`, locating its notify region now (none: nothing is counted).
    pub fn new(mut inner: F) -> Self {
        let region = notify_region(&mut inner);
        Notifications {
            inner,
            region,
            count: 0,
        }
    }
}

impl<F: PciFunction> PciFunction for Notifications<F> {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.inner.config_read(offset, data)
    }
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.inner.config_write(offset, data)
    }
    fn bar(&self, index: u8) -> Option<Bar> {
        self.inner.bar(index)
    }
    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        self.inner.bar_read(index, offset, data)
    }
    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        if let Some((bar, start, len)) = self.region {
            if index == bar && offset >= start && offset - start < len {
                self.count += 1;
            }
        }
        self.inner.bar_write(index, offset, data)
    }
    fn msix_vectors(&self) -> u16 {
        self.inner.msix_vectors()
    }
    fn set_interrupt_sink(&mut self, sink: Option<Arc<dyn InterruptSink>>) {
        self.inner.set_interrupt_sink(sink)
    }
    fn set_guest_memory(&mut self, mem: GuestMemoryMmap) {
        self.inner.set_guest_memory(mem)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn set_msix_table_in_client(&mut self, in_client: bool) {
        self.inner.set_msix_table_in_client(in_client)
    }
    fn notifications(&self) -> u64 {
        self.count + self.inner.notifications()
    }
    fn poll(&mut self) -> bool {
        self.inner.poll()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_iommu_device::config::DeviceConfig;
    use virtio_iommu_device::endpoints::edu::Edu;
    use virtio_iommu_device::transport::pci::VirtioPciFunction;
    use virtio_iommu_device::IommuDevice;

    fn iommu() -> virtio_iommu_device::SharedDevice<GuestMemoryMmap> {
        let config = DeviceConfig::builder().endpoints([8]).build().unwrap();
        IommuDevice::new_shared(config, GuestMemoryMmap::new()).unwrap()
    }

    #[test]
    fn finds_the_notify_region_and_counts_only_writes_into_it() {
        let mut f = Notifications::new(VirtioPciFunction::new(iommu()));
        let (bar, start, len) = f.region.expect("virtio-pci has a notify capability");
        assert!(len >= 8, "two queues' slots");
        f.bar_write(bar, start, &0u16.to_le_bytes());
        f.bar_write(bar, start + 4, &1u16.to_le_bytes());
        assert_eq!(f.notifications(), 2);
        // Outside the region, or in another BAR: not counted.
        f.bar_write(bar, start + len, &[0; 4]);
        f.bar_write(bar, start.wrapping_sub(4), &[0; 4]);
        f.bar_write(bar.wrapping_add(1), start, &[0; 2]);
        assert_eq!(f.notifications(), 2);
    }

    #[test]
    fn a_function_without_capabilities_counts_nothing() {
        let mut f = Notifications::new(Edu::new(iommu(), 8));
        assert_eq!(f.region, None);
        f.bar_write(0, 0x3000, &[0; 4]);
        assert_eq!(f.notifications(), 0);
    }
}
