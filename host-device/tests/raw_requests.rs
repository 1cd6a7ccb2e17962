//! Requests built descriptor by descriptor (virtio-queue's `MockSplitQueue`): framing, any
//! descriptor layout, hostile chains, statuses the guest driver would never send.

mod common;

use common::*;
use virtio_iommu_device::config::ResvRegion;
use virtio_iommu_device::device::status;
use virtio_iommu_device::{Access, DeviceConfig};
use virtio_iommu_driver::wire::{Features, MapFlags, Status, ATTACH_F_BYPASS};
use vm_memory::{Bytes, GuestAddress};

const OK: u8 = Status::Ok as u8;
const INVAL: u8 = Status::Inval as u8;
const RANGE: u8 = Status::Range as u8;
const NOENT: u8 = Status::NoEnt as u8;
const UNSUPP: u8 = Status::Unsupp as u8;

fn config() -> DeviceConfig {
    DeviceConfig::builder()
        .endpoints([8, 16])
        .resv_region(16, ResvRegion::msi(0x0802_0000, 0x0802_0fff))
        .build()
        .unwrap()
}

/// All increasing sequences of `n` cut points strictly inside `1..len`.
fn cuts(len: usize, n: usize) -> Vec<Vec<usize>> {
    fn rec(from: usize, len: usize, n: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if n == 0 {
            out.push(cur.clone());
            return;
        }
        for c in from..len {
            cur.push(c);
            rec(c + 1, len, n - 1, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    rec(1, len, n, &mut Vec::new(), &mut out);
    out
}

#[test]
fn map_split_over_1_to_3_readable_and_1_to_4_writable_descriptors_at_every_boundary() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    assert_eq!(h.status(&bytes(&attach(1, 8, 0))), OK);
    let map_req = bytes(&map(1, 0x10000, 0x10fff, 0x4000_0000, RW));
    let unmap_req = bytes(&unmap(1, 0x10000, 0x10fff));
    let w_splits: Vec<Vec<usize>> = (0..4).flat_map(|n| cuts(4, n)).collect();
    assert_eq!(w_splits.len(), 8);
    let mut cases = 0;
    for n in 0..=2 {
        for rc in cuts(map_req.len(), n) {
            for wc in &w_splits {
                let r = h.request_split(&map_req, &rc, 4, wc);
                assert_eq!(
                    r,
                    Reply {
                        used: 4,
                        written: vec![OK, 0, 0, 0]
                    },
                    "{rc:?} {wc:?}"
                );
                assert_eq!(h.dev.state().mapping_count(), 1);
                // The same request again overlaps: S_INVAL, whatever the layout.
                let r = h.request_split(&map_req, &rc, 4, wc);
                assert_eq!(r.written[0], INVAL);
                let r = h.request_split(
                    &unmap_req,
                    &rc.iter().copied().filter(|&c| c < 28).collect::<Vec<_>>(),
                    4,
                    wc,
                );
                assert_eq!(r.written[0], OK);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, (1 + 35 + 595) * 8);
    // One descriptor per byte, readable and writable.
    let every: Vec<usize> = (1..map_req.len()).collect();
    let r = h.request_split(&map_req, &every, 4, &[1, 2, 3]);
    assert_eq!(
        r,
        Reply {
            used: 4,
            written: vec![OK, 0, 0, 0]
        }
    );
    assert_eq!(h.dev.state().mapping_count(), 1);
}

#[test]
fn probe_split_at_every_boundary_gives_identical_bytes() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let req = bytes(&probe(16));
    let reference = h.request(&req, 516);
    assert_eq!(reference.used, 516);
    assert_eq!(reference.status(), OK);
    assert_eq!(&reference.written[..4], &[1, 0, 20, 0]);
    assert_eq!(reference.written[4], 1, "MSI");
    assert_eq!(&reference.written[8..16], &0x0802_0000u64.to_le_bytes());
    assert_eq!(&reference.written[16..24], &0x0802_0fffu64.to_le_bytes());
    assert!(reference.written[24..512].iter().all(|&b| b == 0), "D40");
    for c in 1..req.len() {
        assert_eq!(
            h.request_split(&req, &[c], 516, &[]),
            reference,
            "readable cut {c}"
        );
    }
    for c in 1..516 {
        assert_eq!(
            h.request_split(&req, &[], 516, &[c]),
            reference,
            "writable cut {c}"
        );
    }
    for c in (1..516).step_by(7) {
        assert_eq!(
            h.request_split(&req, &[1, 2, 3, 4, 5, 71], 516, &[c, c + 1]),
            reference
        );
    }
}

#[test]
fn indirect_descriptors_work_like_direct_ones() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let req = bytes(&attach(3, 8, 0));
    let rd = h.buffer(req.len(), 0);
    mem.write_slice(&req, GuestAddress(rd)).unwrap();
    let wr = h.buffer(4, POISON);
    let table = h.buffer(32, 0);
    // Indirect table of two descriptors: readable (next = 1), writable.
    let mut t = Vec::new();
    t.extend_from_slice(&rd.to_le_bytes());
    t.extend_from_slice(&(req.len() as u32).to_le_bytes());
    t.extend_from_slice(&F_NEXT.to_le_bytes());
    t.extend_from_slice(&1u16.to_le_bytes());
    t.extend_from_slice(&wr.to_le_bytes());
    t.extend_from_slice(&4u32.to_le_bytes());
    t.extend_from_slice(&F_WRITE.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes());
    mem.write_slice(&t, GuestAddress(table)).unwrap();
    let r = h.submit(
        &[D {
            addr: table,
            len: 32,
            flags: F_INDIRECT,
        }],
        &[(wr, 4)],
    );
    assert_eq!(
        r,
        Reply {
            used: 4,
            written: vec![OK, 0, 0, 0]
        }
    );
    assert_eq!(h.dev.state().endpoint_domain(8), Some(3));
}

#[test]
fn short_head_short_tail_and_unknown_types_are_returned_unwritten() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let req = bytes(&attach(1, 8, 0));
    for n in 0..4 {
        let r = h.request_split(&req[..n], &[], 4, &[]);
        assert_eq!(
            r,
            Reply {
                used: 0,
                written: vec![POISON; 4]
            },
            "readable {n} bytes"
        );
    }
    for n in 0..4 {
        let r = h.request_split(&req, &[], n, &[]);
        assert_eq!(r.used, 0, "writable {n} bytes");
        assert!(r.written.iter().all(|&b| b == POISON));
    }
    for t in [0u8, 6, 7, 0x7f, 0x80, 0xff] {
        let mut bad = req.clone();
        bad[0] = t;
        let r = h.request(&bad, 4);
        assert_eq!(
            r,
            Reply {
                used: 0,
                written: vec![POISON; 4]
            },
            "type {t} (D7)"
        );
    }
    assert_eq!(h.dev.state().domain_count(), 0, "nothing executed");
    let c = h.dev.counters();
    assert_eq!(c.requests_malformed, 8);
    assert_eq!(c.requests_unknown_type, 6);
    // Still working afterwards.
    assert_eq!(h.status(&req), OK);
}

#[test]
fn short_body_is_inval_and_extra_readable_bytes_are_ignored() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let req = bytes(&attach(1, 8, 0));
    for n in 4..req.len() {
        assert_eq!(h.status(&req[..n]), INVAL, "{n} readable bytes");
    }
    let mut long = req.clone();
    long.extend_from_slice(&[0xff; 9]);
    assert_eq!(h.status(&long), OK);
    // PROBE with a short readable part: S_INVAL at the end of the 516 writable bytes.
    let p = bytes(&probe(16));
    let r = h.request(&p[..8], 516);
    assert_eq!(r.used, 516);
    assert_eq!(r.status(), INVAL);
    assert!(r.written[..512].iter().all(|&b| b == 0));
}

#[test]
fn reserved_head_bytes_are_ignored_and_tail_reserved_is_zero() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let mut req = bytes(&attach(1, 8, 0));
    req[1..4].copy_from_slice(&[0xff, 0xee, 0xdd]);
    assert_eq!(h.status(&req), OK, "D8");
    let mut p = bytes(&probe(8));
    p[8..72].fill(0x55);
    let r = h.request(&p, 516);
    assert_eq!(r.status(), OK, "D33");
    assert_eq!(&r.written[513..], &[0, 0, 0]);
}

#[test]
fn oversized_writable_part_gets_tail_at_its_end_and_zeroes_before() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let r = h.request(&bytes(&attach(1, 8, 0)), 12);
    assert_eq!(r.used, 12);
    assert_eq!(r.written, vec![0, 0, 0, 0, 0, 0, 0, 0, OK, 0, 0, 0]);
    let r = h.request(&bytes(&probe(16)), 600);
    assert_eq!(r.used, 600);
    assert_eq!(r.written[596], OK);
    assert_eq!(r.written[4], 1);
    assert!(r.written[24..596].iter().all(|&b| b == 0));
    // Beyond the slack: returned unwritten.
    let r = h.request(&bytes(&attach(1, 8, 0)), 4 + 4096 + 1);
    assert_eq!(r.used, 0);
    assert!(r.written.iter().all(|&b| b == POISON));
}

#[test]
fn probe_with_short_properties_is_inval_without_properties_d39() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let r = h.request(&bytes(&probe(16)), 100);
    assert_eq!(r.used, 100);
    assert_eq!(r.status(), INVAL);
    assert!(
        r.written[..96].iter().all(|&b| b == 0),
        "no property written"
    );
    let r = h.request(&bytes(&probe(99)), 516);
    assert_eq!(r.status(), NOENT, "D34");
    assert!(r.written[..512].iter().all(|&b| b == 0));
}

#[test]
fn probe_not_offered_is_unwritten_and_not_negotiated_is_unsupp() {
    let mem = mem();
    let cfg = DeviceConfig::builder()
        .endpoint(8)
        .feature(Features::PROBE, false)
        .build()
        .unwrap();
    let mut h = Harness::new(&mem, cfg);
    let r = h.request(&bytes(&probe(8)), 516);
    assert_eq!(
        r,
        Reply {
            used: 0,
            written: vec![POISON; 516]
        },
        "D35"
    );

    let mem2 = common::mem();
    let cfg = DeviceConfig::builder().endpoint(8).build().unwrap();
    let offered = cfg.offered();
    let mut h = Harness::with_features(&mem2, cfg, offered - Features::PROBE - Features::MAP_UNMAP);
    let r = h.request(&bytes(&probe(8)), 516);
    assert_eq!((r.used, r.status()), (516, UNSUPP));
    assert_eq!(h.status(&bytes(&attach(1, 8, 0))), OK);
    assert_eq!(
        h.status(&bytes(&map(1, 0, 0xfff, 0, RW))),
        UNSUPP,
        "MAP_UNMAP not negotiated"
    );
    assert_eq!(h.status(&bytes(&unmap(1, 0, 0xfff))), UNSUPP);
    assert_eq!(h.dev.state().mapping_count(), 0);
}

#[test]
fn extreme_values_never_panic() {
    let mem = mem();
    let cfg = DeviceConfig::builder()
        .endpoints([0, 8, u32::MAX])
        .input_range(0, u64::MAX)
        .build()
        .unwrap();
    let mut h = Harness::new(&mem, cfg);
    assert_eq!(h.status(&bytes(&attach(u32::MAX, u32::MAX, 0))), OK);
    assert_eq!(h.status(&bytes(&attach(0, 0, 0))), OK);
    let m = u64::MAX;
    let g = 0xfff;
    let cases: &[(u64, u64, u64, u8)] = &[
        (m, m, 0, RANGE),
        (m - g, m, m - g, OK),
        (m - g, m, m - g, INVAL),
        (0, m, 0, INVAL),
        (m, 0, 0, INVAL),
        (0x1000, 0x0fff, 0, INVAL),
        (0x1000, 0x1000, 0, RANGE),
        (0x2000, 0x2fff, m, RANGE),
        (0x2000, 0x3fff, m - g, RANGE),
        (0, m - 0x1000, 0, OK),
    ];
    for &(s, e, p, want) in cases {
        assert_eq!(
            h.status(&bytes(&map(u32::MAX, s, e, p, RW))),
            want,
            "map {s:#x}..={e:#x} -> {p:#x}"
        );
    }
    for &(s, e, want) in &[
        (m, 0, INVAL),
        (1, 0, INVAL),
        (m, m, RANGE),
        (0, m, OK),
        (0, m, OK),
    ] {
        assert_eq!(
            h.status(&bytes(&unmap(u32::MAX, s, e))),
            want,
            "unmap {s:#x}..={e:#x}"
        );
    }
    assert_eq!(h.dev.state().mapping_count(), 0);
    // Translation at the very top.
    assert_eq!(h.status(&bytes(&map(u32::MAX, m - g, m, 0x1000, RW))), OK);
    let p = h.dev.translate(u32::MAX, m - 3, 4, Access::READ).unwrap();
    assert_eq!(p[0].phys, 0x1ffc);
    assert!(h.dev.translate(u32::MAX, m, 2, Access::READ).is_err());
    assert!(h
        .dev
        .translate(u32::MAX, m, u64::MAX, Access::READ)
        .is_err());
    // Domain range edges: every u32 is valid by default.
    assert_eq!(h.status(&bytes(&detach(u32::MAX, u32::MAX))), OK);
}

#[test]
fn descriptor_order_and_bad_addresses_are_malformed() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let req = bytes(&attach(1, 8, 0));
    let rd = h.buffer(req.len(), 0);
    mem.write_slice(&req, GuestAddress(rd)).unwrap();
    let wr = h.buffer(4, POISON);
    // Writable before readable.
    let r = h.submit(
        &[
            D {
                addr: wr,
                len: 4,
                flags: F_WRITE,
            },
            D {
                addr: rd,
                len: 20,
                flags: 0,
            },
        ],
        &[(wr, 4)],
    );
    assert_eq!(
        r,
        Reply {
            used: 0,
            written: vec![POISON; 4]
        }
    );
    // Readable descriptor outside guest memory.
    let r = h.submit(
        &[
            D {
                addr: 0xdead_0000_0000,
                len: 20,
                flags: 0,
            },
            D {
                addr: wr,
                len: 4,
                flags: F_WRITE,
            },
        ],
        &[(wr, 4)],
    );
    assert_eq!(r.used, 0);
    // Writable descriptor running past the end of memory.
    let end = MEM_SIZE as u64 - 2;
    let r = h.submit(
        &[
            D {
                addr: rd,
                len: 20,
                flags: 0,
            },
            D {
                addr: end,
                len: 4,
                flags: F_WRITE,
            },
        ],
        &[],
    );
    assert_eq!(r.used, 0);
    assert_eq!(h.dev.state().domain_count(), 0);
    assert!(!h.dev.needs_reset());
    assert_eq!(h.status(&req), OK);
}

#[test]
fn descriptor_loop_terminates() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let req = bytes(&attach(1, 8, 0));
    let rd = h.buffer(req.len(), 0);
    mem.write_slice(&req, GuestAddress(rd)).unwrap();
    // Two readable descriptors pointing at each other: 0 -> 1 -> 0 -> ...
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    let d0 = RawDescriptor::from(Descriptor::new(rd, 20, F_NEXT, 1));
    let d1 = RawDescriptor::from(Descriptor::new(rd, 20, F_NEXT, 0));
    let before = h.rq_used_idx();
    h.rq.add_desc_chains(&[d0, d1], 0).unwrap();
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), before.wrapping_add(1));
    assert_eq!(h.rq_used(before).1, 0, "cut short by virtio-queue: used 0");
    assert_eq!(h.dev.counters().requests_malformed, 1);
    assert!(!h.dev.needs_reset());
    // A `next` index outside the table: cut short too.
    let wr = h.buffer(4, POISON);
    let d0 = RawDescriptor::from(Descriptor::new(rd, 20, F_NEXT, 1));
    let d1 = RawDescriptor::from(Descriptor::new(wr, 4, F_WRITE | F_NEXT, 999));
    h.rq.add_desc_chains(&[d0, d1], 0).unwrap();
    h.dev.notify(0);
    assert_eq!(h.rq_used(before.wrapping_add(1)).1, 0);
    let mut b = [0u8; 4];
    mem.read_slice(&mut b, GuestAddress(wr)).unwrap();
    assert_eq!(b, [POISON; 4], "not written");
    assert_eq!(h.dev.counters().requests_malformed, 2);
    assert_eq!(h.status(&req), OK, "the device still works");
}

#[test]
fn bogus_avail_ring_sets_needs_reset_without_panic() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    // Head index beyond the queue size.
    let avail = h.rq.avail_addr().0;
    mem.write_obj(1000u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    h.dev.notify(0);
    assert!(h.dev.needs_reset());
    assert_ne!(
        h.dev.interrupt_status() & 2,
        0,
        "config interrupt with NEEDS_RESET"
    );
    // Nothing is processed until reset.
    h.dev.notify(0);
    assert_eq!(h.dev.counters().needs_reset, 1);

    let mem2 = common::mem();
    let mut h = Harness::new(&mem2, config());
    // Available index claiming more chains than the queue holds.
    mem2.write_obj(QSIZE + 1, GuestAddress(h.rq.avail_addr().0 + 2))
        .unwrap();
    h.dev.notify(0);
    assert!(h.dev.needs_reset());
    assert_eq!(h.rq_used_idx(), 0);
}

#[test]
fn per_round_cap_splits_a_notification_into_owed_rounds() {
    let mem = mem();
    let cfg = DeviceConfig::builder()
        .endpoint(8)
        .max_requests_per_notify(2)
        .build()
        .unwrap();
    let mut h = Harness::new(&mem, cfg);
    let req = bytes(&attach(1, 8, 0));
    for _ in 0..5 {
        let rd = h.buffer(req.len(), 0);
        mem.write_slice(&req, GuestAddress(rd)).unwrap();
        let wr = h.buffer(4, POISON);
        h.post_request(&[
            D {
                addr: rd,
                len: 20,
                flags: 0,
            },
            D {
                addr: wr,
                len: 4,
                flags: F_WRITE,
            },
        ]);
    }
    // The notification owes all 5 chains; each call runs one round of at most 2.
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 2);
    assert!(h.dev.requestq_pending());
    assert_eq!(h.dev.counters().requests_deferred, 1);
    assert_eq!(h.dev.service(), 2);
    assert_eq!(h.rq_used_idx(), 4);
    assert!(h.dev.requestq_pending());
    assert_eq!(h.dev.service(), 1);
    assert_eq!(h.rq_used_idx(), 5);
    assert!(!h.dev.requestq_pending());
    assert_eq!(h.dev.service(), 0, "nothing owed: nothing done");
    assert_eq!(h.dev.counters().requests_deferred, 2);
}

#[test]
fn nothing_is_processed_before_driver_ok_or_after_failed() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    h.dev.write_status(status::FAILED);
    let req = bytes(&attach(1, 8, 0));
    let rd = h.buffer(req.len(), 0);
    mem.write_slice(&req, GuestAddress(rd)).unwrap();
    let wr = h.buffer(4, POISON);
    h.post_request(&[
        D {
            addr: rd,
            len: 20,
            flags: 0,
        },
        D {
            addr: wr,
            len: 4,
            flags: F_WRITE,
        },
    ]);
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 0);
    assert_eq!(h.dev.state().domain_count(), 0);
}

#[test]
fn every_request_status_through_raw_requests() {
    let mem = mem();
    let cfg = DeviceConfig::builder()
        .endpoints([8, 16, 24])
        .resv_region(16, ResvRegion::msi(0x0802_0000, 0x0802_0fff))
        .domain_range(1, 100)
        .max_domains(2)
        .max_mappings(2)
        .build()
        .unwrap();
    let mut h = Harness::new(&mem, cfg);
    let nomem = Status::NoMem as u8;
    // ATTACH
    let mut a = attach(1, 8, 0);
    a.reserved = [0, 0, 0, 1];
    assert_eq!(h.status(&bytes(&a)), INVAL, "D10 (QEMU: S_OK, observed)");
    assert_eq!(h.status(&bytes(&attach(1, 8, 0x2))), INVAL, "D11");
    assert_eq!(h.status(&bytes(&attach(1, 9, 0))), NOENT, "D12");
    assert_eq!(h.status(&bytes(&attach(0, 8, 0))), RANGE);
    assert_eq!(h.status(&bytes(&attach(101, 8, 0))), RANGE);
    assert_eq!(h.status(&bytes(&attach(1, 8, 0))), OK);
    assert_eq!(
        h.status(&bytes(&attach(1, 8, ATTACH_F_BYPASS))),
        INVAL,
        "D14"
    );
    assert_eq!(h.status(&bytes(&attach(2, 16, ATTACH_F_BYPASS))), OK);
    assert_eq!(h.status(&bytes(&attach(3, 24, 0))), nomem, "max_domains");
    // MAP
    assert_eq!(
        h.status(&bytes(&map(
            1,
            0x1000,
            0x1fff,
            0x1000,
            MapFlags::from_bits_retain(8)
        ))),
        INVAL,
        "D24"
    );
    assert_eq!(
        h.status(&bytes(&map(9, 0x1000, 0x1fff, 0x1000, RW))),
        NOENT,
        "D25"
    );
    assert_eq!(
        h.status(&bytes(&map(2, 0x1000, 0x1fff, 0x1000, RW))),
        INVAL,
        "D26"
    );
    assert_eq!(
        h.status(&bytes(&map(1, 0x1010, 0x200f, 0x1000, RW))),
        RANGE,
        "D22 (QEMU: S_OK, observed)"
    );
    assert_eq!(
        h.status(&bytes(&map(1, 1 << 50, (1 << 50) + 0xfff, 0, RW))),
        RANGE,
        "input_range (QEMU: S_OK, observed)"
    );
    assert_eq!(h.status(&bytes(&map(1, 0x1000, 0x1fff, 0x1000, RW))), OK);
    assert_eq!(
        h.status(&bytes(&map(1, 0x1000, 0x1fff, 0x5000, RW))),
        INVAL,
        "D23"
    );
    assert_eq!(
        h.status(&bytes(&map(1, 0x2000, 0x2fff, 0x2000, MapFlags::empty()))),
        OK
    );
    assert_eq!(
        h.status(&bytes(&map(1, 0x3000, 0x3fff, 0x3000, RW))),
        nomem,
        "max_mappings"
    );
    // UNMAP
    let mut u = unmap(1, 0x1000, 0x1fff);
    u.reserved = [1, 0, 0, 0];
    assert_eq!(h.status(&bytes(&u)), INVAL, "D28: strict, nothing unmapped");
    assert_eq!(h.dev.state().mapping_count(), 2);
    assert_eq!(h.status(&bytes(&unmap(9, 0x1000, 0x1fff))), NOENT, "D29");
    assert_eq!(h.status(&bytes(&unmap(2, 0x1000, 0x1fff))), INVAL, "D30");
    assert_eq!(h.status(&bytes(&unmap(1, 0x1000, 0x17ff))), RANGE, "D31");
    assert_eq!(h.status(&bytes(&unmap(1, 0x0, 0x2fff))), OK, "D32");
    assert_eq!(h.dev.state().mapping_count(), 0);
    // DETACH
    assert_eq!(h.status(&bytes(&detach(1, 9))), NOENT, "D19");
    assert_eq!(h.status(&bytes(&detach(2, 8))), INVAL, "D20 wrong domain");
    assert_eq!(
        h.status(&bytes(&detach(1, 24))),
        INVAL,
        "D20 not attached (QEMU 10: NOENT)"
    );
    assert_eq!(h.status(&bytes(&detach(1, 8))), OK);
    assert_eq!(h.status(&bytes(&detach(1, 8))), INVAL, "second DETACH");
    // ATTACH that would create a domain whose MSI region overlaps an existing mapping: D16.
    assert_eq!(h.status(&bytes(&attach(5, 8, 0))), OK);
    assert_eq!(
        h.status(&bytes(&map(5, 0x0802_0000, 0x0802_0fff, 0x1000, RW))),
        OK
    );
    assert_eq!(h.status(&bytes(&detach(2, 16))), OK);
    assert_eq!(h.status(&bytes(&attach(5, 16, 0))), UNSUPP, "D16");
    assert_eq!(h.dev.state().endpoint_domain(16), None, "no side effect");
}

#[test]
fn fault_events_fill_buffers_skip_small_ones_and_wait_for_buffers() {
    let mem = mem();
    let cfg = DeviceConfig::builder()
        .endpoints([8])
        .max_pending_faults(3)
        .build()
        .unwrap();
    let mut h = Harness::new(&mem, cfg);
    // No eventq buffer: the fault waits.
    assert!(h.dev.translate(8, 0x1234, 4, Access::WRITE).is_err());
    assert_eq!(h.dev.pending_faults(), 1);
    // A too-small buffer, one with a readable descriptor, then a good one split in two.
    let small = h.buffer(16, POISON);
    h.post_event(&[D {
        addr: small,
        len: 16,
        flags: F_WRITE,
    }]);
    let ro = h.buffer(32, POISON);
    h.post_event(&[D {
        addr: ro,
        len: 32,
        flags: 0,
    }]);
    let a = h.buffer(10, POISON);
    let b = h.buffer(54, POISON);
    h.post_event(&[
        D {
            addr: a,
            len: 10,
            flags: F_WRITE,
        },
        D {
            addr: b,
            len: 54,
            flags: F_WRITE,
        },
    ]);
    h.dev.notify(1);
    assert_eq!(h.eq_used_idx(), 3);
    assert_eq!(h.eq_used(0).1, 0, "too small: skipped, not split (D50)");
    assert_eq!(h.eq_used(1).1, 0, "readable: skipped");
    assert_eq!(h.eq_used(2).1, 24);
    let mut small_bytes = [0u8; 16];
    mem.read_slice(&mut small_bytes, GuestAddress(small))
        .unwrap();
    assert!(small_bytes.iter().all(|&x| x == POISON));
    let mut rec = [0u8; 24];
    mem.read_slice(&mut rec[..10], GuestAddress(a)).unwrap();
    mem.read_slice(&mut rec[10..], GuestAddress(b)).unwrap();
    assert_eq!(rec[0], 1, "R_DOMAIN: unattached, bypass 0");
    assert_eq!(&rec[1..4], &[0, 0, 0], "D46");
    assert_eq!(
        u32::from_le_bytes(rec[4..8].try_into().unwrap()),
        0x102,
        "WRITE|ADDRESS"
    );
    assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), 8);
    assert_eq!(&rec[12..16], &[0, 0, 0, 0], "D46");
    assert_eq!(u64::from_le_bytes(rec[16..24].try_into().unwrap()), 0x1234);
    assert_eq!(h.dev.pending_faults(), 0);
    // Bounded pending queue: 3 kept, the rest dropped and counted.
    for i in 0..5 {
        let _ = h.dev.translate(8, 0x1000 * i, 1, Access::READ);
    }
    assert_eq!(h.dev.pending_faults(), 3);
    assert_eq!(h.dev.counters().faults_dropped, 2);
    for _ in 0..3 {
        let x = h.buffer(24, POISON);
        h.post_event(&[D {
            addr: x,
            len: 24,
            flags: F_WRITE,
        }]);
    }
    h.dev.notify(1);
    assert_eq!(h.eq_used_idx(), 6);
    assert_eq!(h.dev.counters().faults_delivered, 4);
    assert_eq!(h.dev.counters().event_buffers_skipped, 2);
}

#[test]
fn chains_longer_than_the_queue_size_are_refused() {
    let mem = mem();
    let mut h = Harness::new(&mem, config());
    let req = bytes(&attach(1, 8, 0));
    let rd = h.buffer(req.len(), 0);
    mem.write_slice(&req, GuestAddress(rd)).unwrap();
    let wr = h.buffer(4, POISON);
    // An indirect table of QSIZE + 1 descriptors: the 20 request bytes, then zero-length
    // readable descriptors, then the tail.
    let n = usize::from(QSIZE) + 1;
    let table = h.buffer(16 * n, 0);
    let mut t = Vec::new();
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (rd, 20u32, F_NEXT),
            _ if i == n - 1 => (wr, 4, F_WRITE),
            _ => (rd, 0, F_NEXT),
        };
        t.extend_from_slice(&addr.to_le_bytes());
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
        t.extend_from_slice(&((i + 1) as u16).to_le_bytes());
    }
    mem.write_slice(&t, GuestAddress(table)).unwrap();
    let r = h.submit(
        &[D {
            addr: table,
            len: (16 * n) as u32,
            flags: F_INDIRECT,
        }],
        &[(wr, 4)],
    );
    assert_eq!(
        r,
        Reply {
            used: 0,
            written: vec![POISON; 4]
        }
    );
    assert_eq!(h.dev.state().domain_count(), 0);
    // QSIZE descriptors is fine.
    let m = usize::from(QSIZE);
    let mut t = t[..16 * (m - 1)].to_vec();
    t.extend_from_slice(&wr.to_le_bytes());
    t.extend_from_slice(&4u32.to_le_bytes());
    t.extend_from_slice(&F_WRITE.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes());
    mem.write_slice(&t, GuestAddress(table)).unwrap();
    let r = h.submit(
        &[D {
            addr: table,
            len: (16 * m) as u32,
            flags: F_INDIRECT,
        }],
        &[(wr, 4)],
    );
    assert_eq!(
        r,
        Reply {
            used: 4,
            written: vec![OK, 0, 0, 0]
        }
    );
}

#[test]
fn only_chains_available_at_the_notification_are_owed() {
    let mem = mem();
    let cfg = DeviceConfig::builder()
        .endpoint(8)
        .max_requests_per_notify(1)
        .build()
        .unwrap();
    let mut h = Harness::new(&mem, cfg);
    let req = bytes(&attach(1, 8, 0));
    let post = |h: &mut Harness<'_>| {
        let rd = h.buffer(req.len(), 0);
        h.mem.write_slice(&req, GuestAddress(rd)).unwrap();
        let wr = h.buffer(4, POISON);
        h.post_request(&[
            D {
                addr: rd,
                len: 20,
                flags: 0,
            },
            D {
                addr: wr,
                len: 4,
                flags: F_WRITE,
            },
        ]);
    };
    for _ in 0..3 {
        post(&mut h);
    }
    h.dev.notify(0);
    assert_eq!(h.rq_used_idx(), 1);
    // Two more arrive without a notification: they are not owed (their notification will
    // come), so the owed rounds stop after the first three.
    post(&mut h);
    post(&mut h);
    while h.dev.service() > 0 {}
    assert_eq!(h.rq_used_idx(), 3);
    assert!(!h.dev.requestq_pending());
    // Their notification: all of them, in rounds.
    h.dev.notify(0);
    while h.dev.service() > 0 {}
    assert_eq!(h.rq_used_idx(), 5);

    // A device reset cancels what is owed.
    for _ in 0..3 {
        post(&mut h);
    }
    h.dev.notify(0);
    assert!(h.dev.requestq_pending());
    h.dev.write_status(0);
    assert!(!h.dev.requestq_pending());
    assert_eq!(h.dev.service(), 0);
}
