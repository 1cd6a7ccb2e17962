//! `IommuDevice::activate_queue` (virtio §2.7, §4.2.2 QueueNum/QueueDesc/QueueDriver/
//! QueueDevice/QueueReady): two queues, a size that is a power of two up to `QueueNumMax`,
//! aligned rings inside guest memory; a refused setup leaves the queue not ready with a typed
//! error (README "Queues").

use virtio_iommu_device::{DeviceConfig, IommuDevice, QueueError, QueueSetup};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

fn device(queue_size: u16) -> IommuDevice<Mem> {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let config = DeviceConfig::builder()
        .endpoint(1)
        .queue_size(queue_size)
        .build()
        .unwrap();
    IommuDevice::new(config, mem).unwrap()
}

fn setup(size: u16) -> QueueSetup {
    QueueSetup {
        size,
        desc_table: 0x1_0000,
        avail_ring: 0x2_0000,
        used_ring: 0x3_0000,
    }
}

fn ready(dev: &IommuDevice<Mem>, q: u16) -> bool {
    dev.queue(q).unwrap().ready()
}

#[test]
fn sizes_up_to_queue_num_max_are_accepted() {
    let mut dev = device(64);
    for size in [1u16, 2, 16, 32, 64] {
        for q in [0, 1] {
            assert_eq!(dev.activate_queue(q, setup(size)), Ok(()), "size {size}");
            assert!(ready(&dev, q));
            assert_eq!(dev.queue(q).unwrap().size(), size);
        }
    }
    let q = dev.queue(1).unwrap();
    assert_eq!(
        (q.desc_table(), q.avail_ring(), q.used_ring()),
        (0x1_0000, 0x2_0000, 0x3_0000)
    );
}

#[test]
fn invalid_sizes_are_refused_and_leave_the_queue_not_ready() {
    let mut dev = device(64);
    for size in [0u16, 3, 48, 63, 65, 128, 256, 32768, u16::MAX] {
        assert!(dev.activate_queue(0, setup(64)).is_ok());
        assert_eq!(
            dev.activate_queue(0, setup(size)),
            Err(QueueError::InvalidSize(size)),
            "size {size}"
        );
        assert!(!ready(&dev, 0), "size {size}");
    }
}

#[test]
fn only_queues_0_and_1_exist() {
    let mut dev = device(256);
    for q in [2u16, 3, u16::MAX] {
        assert_eq!(
            dev.activate_queue(q, setup(8)),
            Err(QueueError::NoSuchQueue(q))
        );
        assert!(dev.queue(q).is_none());
        dev.deactivate_queue(q); // ignored
    }
    assert!(dev.queue(0).is_some() && dev.queue(1).is_some());
    assert!(!ready(&dev, 0) && !ready(&dev, 1), "not ready at reset");
}

#[test]
fn misaligned_rings_are_refused() {
    // virtio §2.7: descriptor table 16, available ring 2, used ring 4 bytes aligned.
    let mut dev = device(256);
    for (desc, avail, used) in [
        (0x1_0008u64, 0x2_0000u64, 0x3_0000u64),
        (0x1_0000, 0x2_0001, 0x3_0000),
        (0x1_0000, 0x2_0000, 0x3_0002),
    ] {
        let s = QueueSetup {
            size: 8,
            desc_table: desc,
            avail_ring: avail,
            used_ring: used,
        };
        assert_eq!(dev.activate_queue(1, s), Err(QueueError::Misaligned));
        assert!(!ready(&dev, 1));
    }
    // The least aligned addresses that are allowed.
    let s = QueueSetup {
        size: 8,
        desc_table: 0x1_0010,
        avail_ring: 0x2_0002,
        used_ring: 0x3_0004,
    };
    assert_eq!(dev.activate_queue(1, s), Ok(()));
    assert!(ready(&dev, 1));
}

#[test]
fn rings_outside_guest_memory_are_refused() {
    let mut dev = device(256);
    let end = 1u64 << 20;
    for (desc, avail, used) in [
        (end - 0x10, 0x2_0000u64, 0x3_0000u64), // table of 8 x 16 bytes crosses the end
        (0x1_0000, end, 0x3_0000),
        (0x1_0000, 0x2_0000, end - 4),
        (1 << 40, 0x2_0000, 0x3_0000),
    ] {
        let s = QueueSetup {
            size: 8,
            desc_table: desc,
            avail_ring: avail,
            used_ring: used,
        };
        assert_eq!(
            dev.activate_queue(0, s),
            Err(QueueError::NotInMemory),
            "{s:?}"
        );
        assert!(!ready(&dev, 0));
    }
    // Rings ending exactly at the end of memory fit.
    let s = QueueSetup {
        size: 8,
        desc_table: end - 8 * 16,
        avail_ring: 0x2_0000,
        used_ring: 0x3_0000,
    };
    assert_eq!(dev.activate_queue(0, s), Ok(()));
}

#[test]
fn deactivate_makes_the_queue_not_ready() {
    let mut dev = device(256);
    dev.activate_queue(0, setup(8)).unwrap();
    dev.activate_queue(1, setup(8)).unwrap();
    dev.deactivate_queue(0);
    assert!(!ready(&dev, 0));
    assert!(ready(&dev, 1), "the other queue is untouched");
}

#[test]
fn queue_errors_have_a_message() {
    for e in [
        QueueError::NoSuchQueue(2),
        QueueError::InvalidSize(3),
        QueueError::Misaligned,
        QueueError::NotInMemory,
    ] {
        assert!(!e.to_string().is_empty(), "{e:?}");
    }
    assert!(QueueError::InvalidSize(3).to_string().contains('3'));
    assert!(QueueError::NoSuchQueue(7).to_string().contains('7'));
}
