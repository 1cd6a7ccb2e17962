//! Feature negotiation (virtio §2.2, §3.1.1) on the device API: `DeviceFeatures` are the
//! offered bits, the driver writes its bits 32 at a time, FEATURES_OK is kept only for a subset
//! of the offered features that includes VERSION_1, features are frozen after it, and only then
//! do they count as negotiated (README "Status").

mod common;

use common::{mem, Harness};
use virtio_iommu_device::device::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use virtio_iommu_device::{DeviceConfig, IommuDevice};
use virtio_iommu_driver::wire::Features;

fn device() -> IommuDevice<common::Mem> {
    IommuDevice::new(DeviceConfig::builder().endpoint(1).build().unwrap(), mem()).unwrap()
}

fn write_features(dev: &mut IommuDevice<common::Mem>, f: u64) {
    dev.write_driver_features(0, f as u32);
    dev.write_driver_features(1, (f >> 32) as u32);
}

#[test]
fn device_features_are_the_offered_bits_in_both_words() {
    let dev = device();
    let offered = dev.config().offered().bits();
    assert_eq!(dev.device_features(), offered);
    assert_ne!(offered >> 32, 0, "VERSION_1 is bit 32, in the high word");
    assert_eq!(
        dev.device_features() & Features::VERSION_1.bits(),
        Features::VERSION_1.bits()
    );
    assert_eq!(
        dev.device_features() & 0xffff_ffff,
        offered & 0xffff_ffff,
        "low word"
    );
}

#[test]
fn driver_features_are_written_one_word_at_a_time() {
    let mut dev = device();
    assert_eq!(dev.driver_features(), 0);
    dev.write_driver_features(0, 0x8000_0005);
    assert_eq!(dev.driver_features(), 0x8000_0005);
    dev.write_driver_features(1, 0x8000_0001);
    assert_eq!(dev.driver_features(), 0x8000_0001_8000_0005);
    // Rewriting one word keeps the other.
    dev.write_driver_features(0, 0x10);
    assert_eq!(dev.driver_features(), 0x8000_0001_0000_0010);
    dev.write_driver_features(1, 0x2);
    assert_eq!(dev.driver_features(), 0x0000_0002_0000_0010);
    dev.write_driver_features(0, 0);
    assert_eq!(dev.driver_features(), 0x0000_0002_0000_0000);
    // Other selector values are ignored.
    dev.write_driver_features(2, 0xffff_ffff);
    dev.write_driver_features(u32::MAX, 0xffff_ffff);
    assert_eq!(dev.driver_features(), 0x0000_0002_0000_0000);
}

#[test]
fn features_ok_is_kept_for_a_subset_with_version_1_and_they_become_negotiated() {
    let mut dev = device();
    let wanted = Features::VERSION_1 | Features::MAP_UNMAP | Features::PROBE;
    dev.write_status(ACKNOWLEDGE | DRIVER);
    write_features(&mut dev, wanted.bits());
    // Not negotiated before FEATURES_OK, even after other status writes.
    dev.write_status(ACKNOWLEDGE | DRIVER);
    assert_eq!(dev.negotiated_features(), Features::empty());
    assert_eq!(dev.state().negotiated(), Features::empty());
    dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(dev.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(dev.negotiated_features(), wanted);
    // VERSION_1 alone is a valid subset.
    let mut dev = device();
    write_features(&mut dev, Features::VERSION_1.bits());
    dev.write_status(FEATURES_OK);
    assert_eq!(dev.status(), FEATURES_OK);
    assert_eq!(dev.negotiated_features(), Features::VERSION_1);
    // Everything offered.
    let mut dev = device();
    let all = dev.device_features();
    write_features(&mut dev, all);
    dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(dev.status() & FEATURES_OK, 0);
    assert_eq!(dev.negotiated_features().bits(), all);
}

#[test]
fn features_ok_is_refused_without_version_1_or_with_a_bit_not_offered() {
    let not_offered = [
        Features::VERSION_1 | Features::RING_EVENT_IDX,
        Features::VERSION_1 | Features::BYPASS, // legacy bypass is not offered by default
        Features::VERSION_1 | Features::ACCESS_PLATFORM,
        Features::VERSION_1 | Features::from_bits_retain(1 << 63),
    ];
    for bad in not_offered
        .into_iter()
        .chain([Features::MAP_UNMAP, Features::empty()])
    {
        let mut dev = device();
        dev.write_status(ACKNOWLEDGE | DRIVER);
        write_features(&mut dev, bad.bits());
        dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            dev.status(),
            ACKNOWLEDGE | DRIVER,
            "{bad:?}: FEATURES_OK dropped"
        );
        assert_eq!(dev.negotiated_features(), Features::empty(), "{bad:?}");
        // Not frozen: the driver may offer an acceptable set and try again.
        write_features(&mut dev, Features::VERSION_1.bits());
        assert_eq!(dev.driver_features(), Features::VERSION_1.bits());
        dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(dev.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK, "{bad:?}");
        assert_eq!(dev.negotiated_features(), Features::VERSION_1);
    }
}

#[test]
fn driver_features_are_frozen_after_features_ok() {
    let mut dev = device();
    let wanted = Features::VERSION_1 | Features::MAP_UNMAP;
    write_features(&mut dev, wanted.bits());
    dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    dev.write_driver_features(0, 0xffff_ffff);
    dev.write_driver_features(1, 0xffff_ffff);
    assert_eq!(dev.driver_features(), wanted.bits());
    assert_eq!(dev.negotiated_features(), wanted);
    // Writing FEATURES_OK again (with DRIVER_OK) does not renegotiate.
    dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(dev.negotiated_features(), wanted);
    assert_eq!(dev.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn reset_forgets_driver_and_negotiated_features() {
    let mut dev = device();
    write_features(&mut dev, (Features::VERSION_1 | Features::PROBE).bits());
    dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    dev.write_status(0);
    assert_eq!(dev.status(), 0);
    assert_eq!(dev.driver_features(), 0);
    assert_eq!(dev.negotiated_features(), Features::empty());
    // Writable again after the reset.
    dev.write_driver_features(0, 4);
    assert_eq!(dev.driver_features(), 4);
}

#[test]
fn legacy_bypass_counts_only_once_negotiated() {
    // §5.13.6 "Device operations": with legacy BYPASS negotiated, unattached endpoints bypass.
    let config = DeviceConfig::builder()
        .endpoint(1)
        .feature(Features::BYPASS_CONFIG, false)
        .feature(Features::BYPASS, true)
        .build()
        .unwrap();
    let m = mem();
    let mut h = Harness::idle(&m, config);
    assert!(!h.dev.state().unattached_bypass());
    assert!(h
        .dev
        .translate(1, 0x1000, 4, virtio_iommu_device::Access::READ)
        .is_err());
    write_features(&mut h.dev, (Features::VERSION_1 | Features::BYPASS).bits());
    assert!(
        !h.dev.state().unattached_bypass(),
        "written but not negotiated"
    );
    h.dev.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert!(h.dev.state().unattached_bypass());
    assert!(h.dev.state().is_bypass(1));
    let pieces = h
        .dev
        .translate(1, 0x1000, 4, virtio_iommu_device::Access::READ)
        .unwrap();
    assert_eq!(
        (pieces[0].iova, pieces[0].phys, pieces[0].len),
        (0x1000, 0x1000, 4)
    );
    h.dev.write_status(0);
    assert!(!h.dev.state().unattached_bypass(), "reset forgets it");
}
