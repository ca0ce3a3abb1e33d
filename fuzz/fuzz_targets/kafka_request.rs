//! Kafka requests as the broker reads them: the header, the body at its API
//! and version (the vendored protocol crate, whose allocation caps this
//! exercises), and every produce payload's record batches (CRC, format,
//! the capped decompressors).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tributary_kafka::{codec, parse, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = parse(Bytes::copy_from_slice(data)) {
        if let Request::Produce(req) = parsed.request {
            for topic in req.topic_data {
                for p in topic.partition_data {
                    if let Some(records) = p.records {
                        let _ = codec::events_of(&records, 0);
                    }
                }
            }
        }
    }
    // The same bytes as a produce payload on their own.
    let _ = codec::events_of(&Bytes::copy_from_slice(data), 0);
});
