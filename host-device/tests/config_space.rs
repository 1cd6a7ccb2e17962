//! The 40-byte `struct virtio_iommu_config` (§5.13.4) as the device presents it, and the rules
//! for driver writes: only a one-byte write of 0 or 1 to `bypass` with BYPASS_CONFIG negotiated
//! is valid (R2, R3, D5); any other write inside the structure sets DEVICE_NEEDS_RESET and
//! changes nothing; writes wholly beyond it are ignored (README "Choices", D5).

mod common;

use common::{mem, Harness};
use virtio_iommu_device::DeviceConfig;
use virtio_iommu_driver::wire::{config_offset, Features};

const BYPASS: u64 = config_offset::BYPASS as u64;

fn config() -> DeviceConfig {
    DeviceConfig::builder()
        .endpoint(1)
        .page_size_mask(0x0000_0040_2020_1000)
        .input_range(0x1122_3344_5566_7000, 0x1122_ffff_ffff_ffff)
        .domain_range(0x0102_0304, 0x0a0b_0c0d)
        .probe_size(0x0000_0200)
        .build()
        .unwrap()
}

fn read(h: &Harness<'_>, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xee; len];
    h.dev.read_config(offset, &mut b);
    b
}

#[test]
fn every_field_reads_little_endian_at_its_offset() {
    let m = mem();
    let h = Harness::new(&m, config());
    let all = read(&h, 0, 40);
    let u64_at = |o: usize| u64::from_le_bytes(all[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(all[o..o + 4].try_into().unwrap());
    assert_eq!(u64_at(config_offset::PAGE_SIZE_MASK), 0x0000_0040_2020_1000);
    assert_eq!(
        u64_at(config_offset::INPUT_RANGE_START),
        0x1122_3344_5566_7000
    );
    assert_eq!(
        u64_at(config_offset::INPUT_RANGE_END),
        0x1122_ffff_ffff_ffff
    );
    assert_eq!(u32_at(config_offset::DOMAIN_RANGE_START), 0x0102_0304);
    assert_eq!(u32_at(config_offset::DOMAIN_RANGE_END), 0x0a0b_0c0d);
    assert_eq!(u32_at(config_offset::PROBE_SIZE), 0x200);
    assert_eq!(all[36], 0, "bypass boots at 0");
    assert_eq!(&all[37..40], &[0, 0, 0], "reserved");
    // The struct form agrees.
    let c = h.dev.config_space();
    assert_eq!(c.page_size_mask.get(), 0x0000_0040_2020_1000);
    assert_eq!(c.input_range.start.get(), 0x1122_3344_5566_7000);
    assert_eq!(c.domain_range.end.get(), 0x0a0b_0c0d);
    assert_eq!(c.probe_size.get(), 0x200);
    assert_eq!(c.bypass, 0);
    // Partial reads at any offset give the same bytes.
    for off in 0..40u64 {
        assert_eq!(
            read(&h, off, 1),
            &all[off as usize..=off as usize],
            "offset {off}"
        );
    }
    assert_eq!(read(&h, 8, 4), &all[8..12]);
}

#[test]
fn bytes_beyond_the_structure_read_zero() {
    let m = mem();
    let h = Harness::new(&m, config());
    assert_eq!(read(&h, 40, 4), [0; 4]);
    assert_eq!(read(&h, 0x100, 8), [0; 8]);
    assert_eq!(read(&h, u64::MAX, 2), [0; 2]);
    // Straddling the end: the real bytes, then zeroes.
    assert_eq!(read(&h, 36, 8), [0, 0, 0, 0, 0, 0, 0, 0]);
    let mut h = h;
    h.dev.write_config(BYPASS, &[1]);
    assert_eq!(read(&h, 36, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(read(&h, 32, 8), [0, 2, 0, 0, 1, 0, 0, 0]);
}

#[test]
fn d5_bypass_write_of_0_or_1_changes_bypass_and_the_generation() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    assert_eq!(h.dev.config_generation(), 0);
    h.dev.write_config(BYPASS, &[1]);
    assert!(!h.dev.needs_reset());
    assert!(h.dev.state().bypass());
    assert_eq!(h.dev.config_space().bypass, 1);
    assert_eq!(h.dev.config_generation(), 1);
    // Same value again: nothing changes, same generation.
    h.dev.write_config(BYPASS, &[1]);
    assert!(h.dev.state().bypass());
    assert_eq!(h.dev.config_generation(), 1);
    h.dev.write_config(BYPASS, &[0]);
    assert!(!h.dev.state().bypass());
    assert_eq!(read(&h, BYPASS, 1), [0]);
    assert_eq!(h.dev.config_generation(), 2);
    h.dev.write_config(BYPASS, &[0]);
    assert_eq!(h.dev.config_generation(), 2);
    assert!(!h.dev.needs_reset());
}

#[test]
fn any_other_write_inside_the_structure_sets_needs_reset_and_changes_nothing() {
    let m = mem();
    let cases: &[(u64, &[u8])] = &[
        (BYPASS, &[2]),    // D5: not a bool
        (BYPASS, &[0xff]), // D5
        (BYPASS, &[1, 0]), // wider than the field
        (BYPASS, &[1, 0, 0, 0]),
        (BYPASS - 4, &[1, 0, 0, 0, 1, 0, 0, 0]),
        (BYPASS + 1, &[1]), // reserved byte
        (39, &[0]),         // last reserved byte
        (0, &[0]),          // page_size_mask (read-only)
        (config_offset::PROBE_SIZE as u64, &[0, 0, 0, 0]),
        (config_offset::DOMAIN_RANGE_END as u64, &[0]),
    ];
    for &(offset, data) in cases {
        let mut h = Harness::new(&m, config());
        let before = read(&h, 0, 40);
        h.dev.write_config(offset, data);
        assert!(h.dev.needs_reset(), "write {data:?} at {offset}");
        assert_eq!(
            read(&h, 0, 40),
            before,
            "write {data:?} at {offset}: nothing changed"
        );
        assert_eq!(h.dev.config_generation(), 0);
    }
}

#[test]
fn r2_bypass_write_without_bypass_config_negotiated_sets_needs_reset() {
    let m = mem();
    let c = config();
    let offered = c.offered();
    let mut h = Harness::with_features(&m, c, offered - Features::BYPASS_CONFIG);
    h.dev.write_config(BYPASS, &[1]);
    assert!(h.dev.needs_reset());
    assert!(!h.dev.state().bypass());
    assert_eq!(h.dev.config_generation(), 0);
}

#[test]
fn writes_wholly_beyond_the_structure_are_ignored() {
    let m = mem();
    let mut h = Harness::new(&m, config());
    for offset in [40u64, 41, 64, 0x100, u64::MAX] {
        h.dev.write_config(offset, &[1]);
        h.dev.write_config(offset, &[1, 0, 0, 0]);
    }
    assert!(!h.dev.needs_reset());
    assert!(!h.dev.state().bypass());
    assert_eq!(h.dev.status() & 64, 0);
}
