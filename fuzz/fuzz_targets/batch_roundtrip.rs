//! Structure-aware: events built from the fuzzer's input, sealed into a
//! stored batch and read back (header, checksum, records, an offset window)
//! are what went in; `encoded_len` bounds what each event adds.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tributary_storage::{batch, Event};

#[derive(Debug, Arbitrary)]
struct Input {
    events: Vec<(ArbEvent, i64)>,
    base: u64,
    start_position: u64,
    window: (u8, u8),
}

#[derive(Debug, Arbitrary)]
struct ArbEvent {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    if input.events.is_empty() {
        return;
    }
    let base = input.base >> 1;
    let start_position = input.start_position >> 1;
    let mut builder = batch::BatchBuilder::with_capacity(0);
    let mut events = Vec::new();
    for (e, ts) in input.events {
        let event = Event {
            key: e.key,
            value: e.value,
            timestamp: Some(ts),
            headers: e.headers,
        };
        let before = builder.len();
        builder.push(&event, ts);
        assert!(
            builder.len() - before <= batch::encoded_len(&event),
            "encoded_len is below what push writes"
        );
        events.push((event, ts));
    }
    let (value, end) = builder.finish(start_position);
    assert_eq!(end, start_position + value.len() as u64);
    let header = batch::decode_header(&value).expect("a sealed batch has a good header");
    assert_eq!(header.count as usize, events.len());
    assert_eq!(
        header.min_ts,
        events.iter().map(|e| e.1).min().unwrap_or_default()
    );
    assert_eq!(
        header.max_ts,
        events.iter().map(|e| e.1).max().unwrap_or_default()
    );
    assert_eq!(header.end_position, end);

    let from = base + u64::from(input.window.0.min(input.window.1));
    let until = base + u64::from(input.window.0.max(input.window.1));
    let mut read = Vec::new();
    batch::decode_records(&value, base, 7, from, until, |r| {
        read.push(r);
        true
    })
    .expect("a sealed batch decodes");
    let expected: Vec<_> = (base..)
        .zip(&events)
        .filter(|(offset, _)| (from..until).contains(offset))
        .collect();
    assert_eq!(read.len(), expected.len());
    for (r, (offset, (e, ts))) in read.iter().zip(expected) {
        assert_eq!(r.offset, offset);
        assert_eq!(r.partition, 7);
        assert_eq!(r.timestamp, *ts);
        assert_eq!(r.key, e.key);
        assert_eq!(r.value, e.value);
        assert_eq!(r.headers, e.headers);
    }

    // One flipped bit anywhere is caught by the checksum (or the magic/version check).
    let mut damaged = value.clone();
    let at = (input.window.0 as usize * 31 + input.window.1 as usize) % damaged.len();
    damaged[at] ^= 1 << (input.window.1 % 8);
    assert!(
        batch::decode_header(&damaged).is_err(),
        "a flipped bit at byte {at} went unnoticed"
    );
});
