//! Topology discovery from the devicetree: which virtio-iommu translates which DMA requester.
//!
//! Bindings implemented (Linux `Documentation/devicetree/bindings/`):
//! - `virtio/iommu.yaml`: a virtio-iommu that is a PCI function has a node with
//!   `compatible = "virtio,pci-iommu"` under its PCI host bridge, `reg` in PCI address form
//!   (`phys.hi` = BDF << 8) and `#iommu-cells = <1>`. A virtio-mmio virtio-iommu is a
//!   `virtio,mmio` node with `#iommu-cells = <1>`.
//! - `pci/pci-iommu.txt`: a host bridge's `iommu-map = <rid-base iommu-phandle iommu-base length>*`
//!   and `iommu-map-mask` turn a PCI requester ID into (IOMMU, endpoint ID).
//! - `iommu/iommu.txt`: a platform device's `iommus = <phandle endpoint-id>*`.
//!
//! Nothing here panics on a malformed devicetree: every property is length-checked and
//! errors are reported as [`TopologyError`].

// NOTE: skeleton written first so the driver and firmware can be built against it in parallel.
