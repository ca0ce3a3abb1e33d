//! Structure-aware: sync frames and records blocks built from the fuzzer's
//! input encode and decode to what they were (postcard frames; the records
//! block raw and through zstd), and `encoded_len` is exactly what the
//! encoder writes.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tributary_storage::Record;
use tributary_sync::wire::{self, Frame};

#[derive(Debug, Arbitrary)]
struct Input {
    frame: ArbFrame,
    records: Vec<ArbRecord>,
    zstd: bool,
}

#[derive(Debug, Arbitrary)]
enum ArbFrame {
    Hello(u16, u16, String, u64, Option<String>),
    Welcome(u16, u32, u32),
    Open(String, u32),
    Opened(String, u32, Vec<Vec<(u64, u64)>>),
    Batch(String, u32, u64, u32, bool, u64, bool, u32, Vec<u8>),
    Ack(String, u32, u64, u64),
    Skip(String, u32, u64, u64),
    Error(u16, String, Option<String>, Option<u32>, Option<u64>),
}

#[derive(Debug, Arbitrary)]
struct ArbRecord {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: i64,
    headers: Vec<(String, Vec<u8>)>,
}

fn frame(f: ArbFrame) -> Frame {
    match f {
        ArbFrame::Hello(min_version, max_version, edge_id, instance, token) => {
            Frame::Hello(wire::Hello {
                min_version,
                max_version,
                edge_id,
                instance,
                token,
            })
        }
        ArbFrame::Welcome(version, heartbeat_ms, max_batch_bytes) => {
            Frame::Welcome(wire::Welcome {
                version,
                heartbeat_ms,
                max_batch_bytes,
            })
        }
        ArbFrame::Open(topic, partitions) => Frame::Open(wire::Open { topic, partitions }),
        ArbFrame::Opened(topic, partitions, held) => Frame::Opened(wire::Opened {
            topic,
            partitions,
            held,
        }),
        ArbFrame::Batch(
            topic,
            partition,
            base_offset,
            count,
            new_lane,
            edge_end,
            z,
            raw_len,
            records,
        ) => Frame::Batch(wire::Batch {
            topic,
            partition,
            base_offset,
            count,
            new_lane,
            edge_end,
            compression: if z {
                wire::Compression::Zstd
            } else {
                wire::Compression::None
            },
            raw_len,
            records,
        }),
        ArbFrame::Ack(topic, partition, base_offset, next_offset) => Frame::Ack(wire::Ack {
            topic,
            partition,
            base_offset,
            next_offset,
        }),
        ArbFrame::Skip(topic, partition, from, to) => Frame::Skip(wire::Skip {
            topic,
            partition,
            from,
            to,
        }),
        ArbFrame::Error(code, message, topic, partition, expected) => {
            Frame::Error(wire::ErrorFrame {
                code,
                message,
                topic,
                partition,
                expected,
            })
        }
    }
}

fuzz_target!(|input: Input| {
    let f = frame(input.frame);
    let bytes = f.encode();
    assert_eq!(Frame::decode(&bytes).expect("an encoded frame decodes"), f);

    let records: Vec<Record> = input
        .records
        .into_iter()
        .map(|r| Record {
            partition: 0,
            offset: 0,
            key: r.key,
            value: r.value,
            timestamp: r.timestamp,
            headers: r.headers,
        })
        .collect();
    let mut block = Vec::new();
    wire::encode_records(&records, &mut block, wire::VERSION);
    // Batching sizes blocks by `encoded_len`: it must be exact, or a block
    // sized to the core's limit exceeds it.
    assert_eq!(
        block.len(),
        records
            .iter()
            .map(|r| wire::encoded_len(r, wire::VERSION))
            .sum::<usize>(),
        "encoded_len differs from what the encoder writes"
    );
    let (compression, body) = wire::compress(block.clone(), if input.zstd { 1 } else { 0 });
    let batch = wire::Batch {
        topic: "t".into(),
        partition: 0,
        base_offset: 0,
        count: records.len() as u32,
        new_lane: false,
        edge_end: 0,
        compression,
        raw_len: block.len() as u32,
        records: body,
    };
    let raw = wire::decompress(&batch, block.len().max(1)).expect("decompresses");
    assert_eq!(raw, block);
    let back =
        wire::decode_records(&raw, records.len() as u32, wire::VERSION).expect("decodes");
    assert_eq!(back.len(), records.len());
    for (got, sent) in back.iter().zip(&records) {
        assert_eq!(got.key, sent.key);
        assert_eq!(got.value, sent.value);
        assert_eq!(got.timestamp, sent.timestamp);
        assert_eq!(got.headers, sent.headers);
    }
});
