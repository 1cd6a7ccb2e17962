//! Every public error type of the device crate is a `std::error::Error` whose message names
//! what was wrong and with which value.

use std::error::Error;

use virtio_iommu_device::request::Malformed;
use virtio_iommu_device::{
    ConfigError, DmaError, FaultRecord, QueueError, TranslateError, TranslationFailure,
};
use virtio_iommu_driver::wire::{
    FAULT_F_ADDRESS, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING, FAULT_R_UNKNOWN,
};

fn text(error: &dyn Error) -> String {
    error.to_string()
}

#[test]
fn messages_name_the_value_at_fault() {
    let record = FaultRecord {
        reason: FAULT_R_MAPPING,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: 0x10,
        address: 0x2_0000,
    };
    let cases: Vec<(Box<dyn Error>, &[&str])> = vec![
        (
            Box::new(TranslateError::Wraps {
                iova: 0xffff_ffff_ffff_f000,
                len: 0x2000,
            }),
            &["0xfffffffffffff000", "8192 bytes", "wraps"],
        ),
        (
            Box::new(TranslateError::UnknownEndpoint(0x42)),
            &["0x42", "not managed"],
        ),
        (
            Box::new(TranslateError::Fault(record)),
            &["mapping fault", "endpoint 0x10", "IOVA 0x20000"],
        ),
        (
            Box::new(TranslationFailure::Refused(
                TranslateError::UnknownEndpoint(7),
            )),
            &["refused", "0x7"],
        ),
        (Box::new(TranslationFailure::Unrepresentable), &["2^64 - 1"]),
        (
            Box::new(DmaError::Fault(record)),
            &["mapping fault", "IOVA 0x20000"],
        ),
        (
            Box::new(Malformed::ShortTail),
            &["writable part", "4-byte tail"],
        ),
        (Box::new(Malformed::TooLong), &["queue size"]),
        (Box::new(ConfigError::ProbeSizeTooLarge(9999)), &["9999"]),
        (Box::new(QueueError::InvalidSize(3)), &["3"]),
    ];
    for (error, needles) in &cases {
        let message = text(error.as_ref());
        for needle in *needles {
            assert!(
                message.contains(needle),
                "{error:?} displays {message:?}, without {needle:?}"
            );
        }
    }
}

#[test]
fn fault_records_name_their_reason() {
    // §5.13.6.9: the three reasons a fault report can carry.
    for (reason, word) in [
        (FAULT_R_DOMAIN, "domain fault"),
        (FAULT_R_MAPPING, "mapping fault"),
        (FAULT_R_UNKNOWN, "unknown fault"),
    ] {
        let record = FaultRecord {
            reason,
            flags: 0,
            endpoint: 1,
            address: 0,
        };
        let text = record.to_string();
        assert!(text.starts_with(word), "{reason}: {text}");
        assert!(text.contains(&format!("(reason {reason})")), "{text}");
    }
}
