//! Kafka record batches ↔ the log's records.
//!
//! Produce: every batch's CRC and format are checked, compressed batches
//! (gzip, snappy — raw or the Java client's xerial framing —, lz4 frames,
//! zstd) are decompressed by our own decoders, each stopping at
//! [`MAX_DECOMPRESSED`] so a small batch cannot claim gigabytes, and each
//! Kafka record becomes an event byte for byte: key, value, headers, and its
//! CreateTime timestamp. Fetch: stored records go back as one uncompressed
//! v2 batch per read (consumers accept any codec, and none saves CPU here).
//!
//! Null values (tombstones) stay null, headers keep their order and a name
//! may repeat (both ways). One thing Kafka has that the log's records do
//! not: a null header value (stored as an empty one).

use std::io::Read;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record as KafkaRecord, RecordBatchDecoder, RecordBatchEncoder,
    RecordEncodeOptions, TimestampType,
};
use tributary_storage::{AppendRecord, Event, ProducerBatch, Record, RecordRef};

use crate::Error;

/// A produce batch may decompress to this much at most.
pub const MAX_DECOMPRESSED: usize = 32 << 20;

/// The events of one partition's produce payload, in order, the
/// idempotent producer that sent them (one batch only, as Kafka requires),
/// and whether the batch is transactional.
pub fn events_of(
    records: &Bytes,
    partition: u32,
) -> Result<(Vec<AppendRecord>, Option<ProducerBatch>, bool), Error> {
    let infos = RecordBatchDecoder::decode_batch_info(&mut records.clone())
        .map_err(|e| Error::CorruptBatch(e.to_string()))?;
    if infos.is_empty() && !records.is_empty() {
        return Err(Error::CorruptBatch(
            "no record batch of format v2 (magic 2)".to_owned(),
        ));
    }
    // Markers are the coordinator's, never a client's.
    if infos.iter().any(|i| i.control) {
        return Err(Error::Transactional);
    }
    let transactional = infos.iter().any(|i| i.transactional);
    if transactional && !infos.iter().all(|i| i.transactional && i.producer_id >= 0) {
        return Err(Error::CorruptBatch(
            "a transactional batch names its producer".to_owned(),
        ));
    }
    let producer = match infos.as_slice() {
        [one] if one.producer_id >= 0 => Some(ProducerBatch {
            producer_id: one.producer_id,
            epoch: one.producer_epoch,
            first_sequence: one.base_sequence,
        }),
        many if many.iter().any(|i| i.producer_id >= 0) => {
            return Err(Error::CorruptBatch(
                "an idempotent producer sends one batch per partition".to_owned(),
            ))
        }
        _ => None,
    };
    let mut out = Vec::new();
    let mut buf = records.clone();
    while buf.has_remaining() {
        let set = RecordBatchDecoder::decode_with_custom_compression(&mut buf, Some(decompress))
            .map_err(|e| match e.downcast_ref::<Error>() {
                Some(Error::BatchTooLarge) => Error::BatchTooLarge,
                _ => Error::CorruptBatch(e.to_string()),
            })?;
        out.extend(set.records.into_iter().map(|r| AppendRecord {
            partition: Some(partition),
            event: event_of(r),
        }));
    }
    Ok((out, producer, transactional))
}

fn event_of(r: KafkaRecord) -> Event {
    Event {
        key: r.key.map(|k| k.to_vec()),
        value: r.value.map(|v| v.to_vec()),
        // -1: the producer set none; the log stamps its append time.
        timestamp: (r.timestamp >= 0).then_some(r.timestamp),
        headers: r
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.map(|v| v.to_vec()).unwrap_or_default()))
            .collect(),
    }
}

/// One partition's part of a Fetch answer, written as the log reads it
/// ([`tributary_storage::Log::fetch_into`]): the records of each stored
/// batch as one uncompressed v2 batch, straight from the stored bytes, and
/// every transaction marker as a control batch of its own (consumers skip
/// it and move past it).
#[derive(Default)]
pub struct FetchBatches {
    /// The batches so far.
    pub out: BytesMut,
    /// An encoding failure: the answer is not sent (the rest of the read
    /// is not written either).
    pub failed: Option<Error>,
}

impl tributary_storage::ReadSink for FetchBatches {
    fn records(
        &mut self,
        _partition: u32,
        records: &[RecordRef<'_>],
    ) -> tributary_storage::Result<()> {
        if self.failed.is_none() {
            self.failed = put_batch(&mut self.out, records).err();
        }
        Ok(())
    }

    fn marker(
        &mut self,
        offset: u64,
        producer_id: i64,
        epoch: i16,
        marker: tributary_storage::Marker,
    ) -> tributary_storage::Result<()> {
        if self.failed.is_none() {
            self.failed = put_marker(&mut self.out, offset, producer_id, epoch, marker).err();
        }
        Ok(())
    }
}

/// A transaction marker as a control batch of its own.
fn put_marker(
    out: &mut BytesMut,
    offset: u64,
    producer_id: i64,
    epoch: i16,
    marker: tributary_storage::Marker,
) -> Result<(), Error> {
    let (key, value) = marker.record(0);
    let control = KafkaRecord {
        transactional: true,
        control: true,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id,
        producer_epoch: epoch,
        timestamp_type: TimestampType::Creation,
        offset: offset as i64,
        sequence: -1,
        timestamp: tributary_storage::util::now_ms(),
        key: Some(Bytes::from(key)),
        value: Some(Bytes::from(value)),
        headers: Default::default(),
    };
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(out, &[control], &options).map_err(|e| Error::Encode(e.to_string()))
}

/// What a v2 batch is written from: a stored record, owned or read in place.
trait Stored {
    fn offset(&self) -> u64;
    fn timestamp(&self) -> i64;
    fn key(&self) -> Option<&[u8]>;
    fn value(&self) -> Option<&[u8]>;
    fn header_count(&self) -> usize;
    fn each_header(&self, f: impl FnMut(&[u8], &[u8]));
}

impl Stored for Record {
    fn offset(&self) -> u64 {
        self.offset
    }
    fn timestamp(&self) -> i64 {
        self.timestamp
    }
    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
    fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }
    fn header_count(&self) -> usize {
        self.headers.len()
    }
    fn each_header(&self, mut f: impl FnMut(&[u8], &[u8])) {
        for (k, v) in &self.headers {
            f(k.as_bytes(), v);
        }
    }
}

impl Stored for RecordRef<'_> {
    fn offset(&self) -> u64 {
        self.offset
    }
    fn timestamp(&self) -> i64 {
        self.timestamp
    }
    fn key(&self) -> Option<&[u8]> {
        self.key
    }
    fn value(&self) -> Option<&[u8]> {
        self.value
    }
    fn header_count(&self) -> usize {
        self.header_count
    }
    fn each_header(&self, mut f: impl FnMut(&[u8], &[u8])) {
        for (k, v) in self.headers() {
            f(k, v);
        }
    }
}

/// Stored records as one uncompressed v2 batch, as a broker answers it (no
/// producer, not transactional, base sequence 0), written straight from the
/// records: the same bytes as kafka-protocol's encoder gives for
/// [`kafka_record`]s, without copying each key, value and header first.
pub fn batch_of(records: &[Record]) -> Result<Bytes, Error> {
    let mut out = BytesMut::new();
    put_batch(&mut out, records)?;
    Ok(out.freeze())
}

/// Appends `records` to `out` as one v2 batch (nothing for none).
fn put_batch<R: Stored>(out: &mut BytesMut, records: &[R]) -> Result<(), Error> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(());
    };
    let too_far = || Error::Encode("offsets too far apart for one batch".into());
    let base = i64::try_from(first.offset()).map_err(|_| too_far())?;
    let last_delta = i32::try_from(last.offset() - first.offset()).map_err(|_| too_far())?;
    let count = i32::try_from(records.len()).map_err(|_| too_far())?;
    let (min_ts, max_ts) = records.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| {
        (lo.min(r.timestamp()), hi.max(r.timestamp()))
    });
    let bodies: usize = records
        .iter()
        .map(|r| {
            let b = record_body_len(r, first.offset(), min_ts);
            b + varint_len(b as i64)
        })
        .sum();
    out.reserve(61 + bodies);
    let start = out.len();
    out.put_i64(base);
    out.put_i32(0); // batch length, below
    out.put_i32(0); // partition leader epoch
    out.put_i8(2); // magic
    out.put_u32(0); // CRC, below
    let crc_from = out.len();
    out.put_i16(0); // attributes: uncompressed, create time
    out.put_i32(last_delta);
    out.put_i64(min_ts);
    out.put_i64(max_ts);
    out.put_i64(-1); // producer id
    out.put_i16(-1); // producer epoch
    out.put_i32(0); // base sequence
    out.put_i32(count);
    for r in records {
        let body = record_body_len(r, first.offset(), min_ts);
        put_varint(out, body as i64);
        out.put_i8(0); // attributes
        put_varint(out, r.timestamp().wrapping_sub(min_ts));
        put_varint(out, (r.offset() - first.offset()) as i64);
        put_bytes(out, r.key());
        put_bytes(out, r.value());
        put_varint(out, r.header_count() as i64);
        r.each_header(|k, v| {
            put_bytes(out, Some(k));
            put_bytes(out, Some(v));
        });
    }
    let length = i32::try_from(out.len() - start - 12).map_err(|_| too_far())?;
    out[start + 8..start + 12].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&out[crc_from..]);
    out[start + 17..start + 21].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// A record's bytes after its length field.
fn record_body_len<R: Stored>(r: &R, base: u64, min_ts: i64) -> usize {
    let bytes = |b: Option<&[u8]>| b.map_or(1, |b| varint_len(b.len() as i64) + b.len());
    let mut headers = 0;
    r.each_header(|k, v| headers += bytes(Some(k)) + bytes(Some(v)));
    1 + varint_len(r.timestamp().wrapping_sub(min_ts))
        + varint_len((r.offset() - base) as i64)
        + bytes(r.key())
        + bytes(r.value())
        + varint_len(r.header_count() as i64)
        + headers
}

/// Length-prefixed bytes (−1: null).
fn put_bytes(out: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_varint(out, b.len() as i64);
            out.put_slice(b);
        }
        None => put_varint(out, -1),
    }
}

/// A zigzag varint, as Kafka's record fields are.
fn put_varint(out: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    out.put_u8(z as u8);
}

fn varint_len(v: i64) -> usize {
    let z = ((v << 1) ^ (v >> 63)) as u64;
    (64 - z.leading_zeros() as usize).max(1).div_ceil(7)
}

/// A stored record as a Kafka record — key, value, timestamp and headers
/// byte for byte — at `offset` with `sequence`, as a broker answers it (no
/// producer, not transactional); a producer overrides those fields.
pub fn kafka_record(r: &Record, offset: i64, sequence: i32) -> KafkaRecord {
    KafkaRecord {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset,
        sequence,
        timestamp: r.timestamp,
        key: r.key.as_ref().map(|k| Bytes::copy_from_slice(k)),
        value: r.value.as_deref().map(Bytes::copy_from_slice),
        headers: r
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    StrBytes::from_string(k.clone()),
                    Some(Bytes::copy_from_slice(v)),
                )
            })
            .collect(),
    }
}

/// One batch of a fetch answer, as a client reads it.
#[derive(Debug)]
pub struct FetchedBatch {
    /// Its records (each knows its offset), none for a batch compaction
    /// emptied.
    pub records: Vec<KafkaRecord>,
    /// The offset after the batch (its base offset + last offset delta +
    /// 1), where the next fetch goes even when its last records are gone.
    pub next_offset: i64,
    /// The producer that wrote it (−1: none).
    pub producer_id: i64,
    /// Part of a transaction.
    pub transactional: bool,
    /// A transaction marker.
    pub control: bool,
}

/// The complete v2 batches of a fetch answer's `records`, decompressed
/// (each capped at [`MAX_DECOMPRESSED`]); a batch cut short at the end (a
/// broker may send part of the next batch) is left for the next fetch.
pub fn fetched_batches(records: &Bytes) -> Result<Vec<FetchedBatch>, Error> {
    let mut out = Vec::new();
    let mut rest = records.clone();
    while rest.len() >= 12 {
        let len = i32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(12))
            .filter(|&t| t >= 61)
            .ok_or_else(|| Error::CorruptBatch(format!("a batch length of {len}")))?;
        if rest.len() < total {
            break;
        }
        let batch = rest.split_to(total);
        if batch[16] != 2 {
            return Err(Error::CorruptBatch(format!(
                "a batch of format v{} (magic 2 only)",
                batch[16]
            )));
        }
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&batch[at..at + 8]);
            i64::from_be_bytes(b)
        };
        let base = be64(0);
        let attributes = u16::from_be_bytes([batch[21], batch[22]]);
        let delta = i32::from_be_bytes([batch[23], batch[24], batch[25], batch[26]]);
        let producer_id = be64(43);
        let set = RecordBatchDecoder::decode_with_custom_compression(
            &mut batch.clone(),
            Some(decompress),
        )
        .map_err(|e| match e.downcast_ref::<Error>() {
            Some(Error::BatchTooLarge) => Error::BatchTooLarge,
            _ => Error::CorruptBatch(e.to_string()),
        })?;
        out.push(FetchedBatch {
            records: set.records,
            next_offset: base.saturating_add(i64::from(delta)).saturating_add(1),
            producer_id,
            transactional: attributes & 0x10 != 0,
            control: attributes & 0x20 != 0,
        });
    }
    Ok(out)
}

/// Records as v2 batches for a producer: `producer_id`/`epoch` with
/// sequences from `first_sequence` (−1: none), transactional or not,
/// compressed with `compression` (gzip, lz4 frames, zstd or none).
pub fn produce_batch(records: &[KafkaRecord], compression: Compression) -> Result<Bytes, Error> {
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression,
    };
    RecordBatchEncoder::encode_with_custom_compression(
        &mut buf,
        records.iter(),
        &options,
        Some(compress),
    )
    .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(buf.freeze())
}

fn compress(input: &mut BytesMut, out: &mut BytesMut, c: Compression) -> anyhow::Result<()> {
    use std::io::Write;
    match c {
        Compression::None => out.extend_from_slice(input),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(out.writer(), flate2::Compression::fast());
            e.write_all(input)?;
            e.finish()?;
        }
        Compression::Lz4 => {
            let mut e = lz4_flex::frame::FrameEncoder::new(out.writer());
            e.write_all(input)?;
            e.finish()?;
        }
        Compression::Zstd => {
            let mut e = zstd::stream::write::Encoder::new(out.writer(), 3)?;
            e.write_all(input)?;
            e.finish()?;
        }
        Compression::Snappy => anyhow::bail!("snappy is not offered for producing"),
    }
    Ok(())
}

/// Decompresses one batch's records, stopping past [`MAX_DECOMPRESSED`].
fn decompress(buf: &mut Bytes, c: Compression) -> anyhow::Result<Bytes> {
    let input = buf.split_to(buf.len());
    let capped = |r: &mut dyn Read| -> anyhow::Result<Bytes> {
        let mut out = Vec::new();
        r.take(MAX_DECOMPRESSED as u64 + 1).read_to_end(&mut out)?;
        if out.len() > MAX_DECOMPRESSED {
            return Err(Error::BatchTooLarge.into());
        }
        Ok(Bytes::from(out))
    };
    match c {
        Compression::None => Ok(input),
        Compression::Gzip => capped(&mut flate2::read::GzDecoder::new(input.reader())),
        Compression::Lz4 => capped(&mut lz4_flex::frame::FrameDecoder::new(input.reader())),
        Compression::Zstd => capped(&mut zstd::stream::read::Decoder::new(input.reader())?),
        Compression::Snappy => snappy(&input),
    }
}

/// The xerial framing the Java client writes around snappy blocks.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";

/// Raw snappy, or xerial-framed blocks (header, then `[u32 BE length][raw
/// snappy block]` repeated); each block's declared length is checked before
/// anything is allocated.
fn snappy(input: &[u8]) -> anyhow::Result<Bytes> {
    let mut decoder = snap::raw::Decoder::new();
    let mut out = Vec::new();
    let mut block = |raw: &[u8], out: &mut Vec<u8>| -> anyhow::Result<()> {
        let len = snap::raw::decompress_len(raw)?;
        if out.len() + len > MAX_DECOMPRESSED {
            return Err(Error::BatchTooLarge.into());
        }
        let at = out.len();
        out.resize(at + len, 0);
        decoder.decompress(raw, &mut out[at..])?;
        Ok(())
    };
    if input.len() >= 16 && input.starts_with(XERIAL_MAGIC) {
        let mut rest = &input[16..];
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(Error::CorruptBatch("truncated xerial block".to_owned()).into());
            }
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(raw) = rest.get(4..4 + len) else {
                return Err(Error::CorruptBatch("truncated xerial block".to_owned()).into());
            };
            block(raw, &mut out)?;
            rest = &rest[4 + len..];
        }
    } else {
        block(input, &mut out)?;
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The old way: each record copied into a kafka-protocol record and
    /// encoded by its batch encoder.
    fn batch_by_kafka_protocol(records: &[Record]) -> Bytes {
        let base = records[0].offset;
        let kafka: Vec<KafkaRecord> = records
            .iter()
            .map(|r| kafka_record(r, r.offset as i64, (r.offset - base) as i32))
            .collect();
        let mut buf = BytesMut::new();
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut buf, &kafka, &options).expect("encode");
        buf.freeze()
    }

    #[test]
    fn batches_are_written_byte_for_byte_as_kafka_protocol_writes_them() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let n = 1 + (next() % 40) as usize;
            let mut offset = next() % 1_000_000;
            let mut records = Vec::new();
            for _ in 0..n {
                let bytes = |len: u64| (0..len).map(|i| i as u8).collect::<Vec<u8>>();
                let key = match next() % 3 {
                    0 => None,
                    _ => Some(bytes(next() % 200)),
                };
                let value = match next() % 5 {
                    0 => None,
                    1 => Some(bytes(next() % 70_000)),
                    _ => Some(bytes(next() % 300)),
                };
                let headers = (0..next() % 4)
                    .map(|i| (format!("h{i}-{}", next() % 1000), bytes(next() % 50)))
                    .collect();
                records.push(Record {
                    partition: 0,
                    offset,
                    key,
                    value,
                    // Times out of order too, and far apart.
                    timestamp: 1_700_000_000_000 + (next() % 10_000_000) as i64 - 5_000_000,
                    headers,
                });
                // Gaps, as compaction leaves them.
                offset += 1 + next() % 3;
            }
            let ours = batch_of(&records).expect("encode");
            assert_eq!(ours, batch_by_kafka_protocol(&records), "round {round}");
        }
        assert!(batch_of(&[]).expect("empty").is_empty());
    }

    /// Records of each stored batch as owned records, encoded batch by batch.
    struct Owned {
        out: BytesMut,
        batches: usize,
    }

    impl tributary_storage::ReadSink for Owned {
        fn records(
            &mut self,
            partition: u32,
            records: &[RecordRef<'_>],
        ) -> tributary_storage::Result<()> {
            let owned: Vec<Record> = records
                .iter()
                .map(|r| r.to_record(partition))
                .collect::<tributary_storage::Result<_>>()?;
            put_batch(&mut self.out, &owned).expect("encode");
            self.batches += 1;
            Ok(())
        }

        fn marker(
            &mut self,
            offset: u64,
            producer_id: i64,
            epoch: i16,
            marker: tributary_storage::Marker,
        ) -> tributary_storage::Result<()> {
            put_marker(&mut self.out, offset, producer_id, epoch, marker).expect("encode");
            Ok(())
        }
    }

    #[test]
    fn records_read_in_place_are_written_as_owned_records_are() {
        use std::sync::Arc;
        use tributary_storage::{AppendRecord, Event, Isolation, Log, LogConfig, MemStore};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        runtime.block_on(async {
            let log =
                Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log");
            for _ in 0..60 {
                let n = 1 + (next() % 30) as usize;
                let events: Vec<AppendRecord> = (0..n)
                    .map(|_| {
                        let bytes = |len: u64| (0..len).map(|i| i as u8).collect::<Vec<u8>>();
                        let mut e = Event::new(bytes(next() % 400))
                            .with_timestamp(1_700_000_000_000 + (next() % 100_000) as i64);
                        if next() % 3 > 0 {
                            e = e.with_key(bytes(next() % 40));
                        }
                        if next() % 5 == 0 {
                            e.value = None;
                        }
                        for i in 0..next() % 3 {
                            e = e.with_header(format!("h{i}"), bytes(next() % 20));
                        }
                        AppendRecord {
                            partition: Some(0),
                            event: e,
                        }
                    })
                    .collect();
                log.append("t", events).await.expect("append");
            }
            let (start, end) = log.offsets("t", 0).expect("offsets");
            let mut in_place = FetchBatches::default();
            let mut owned = Owned {
                out: BytesMut::new(),
                batches: 0,
            };
            let limits = (usize::MAX, usize::MAX);
            let a = log
                .read_into("t", 0, start, limits, Isolation::Uncommitted, &mut in_place)
                .expect("read");
            let b = log
                .read_into("t", 0, start, limits, Isolation::Uncommitted, &mut owned)
                .expect("read");
            assert_eq!(a, b);
            assert_eq!(a.next_offset, end);
            assert!(in_place.failed.is_none());
            assert!(owned.batches > 1, "several stored batches");
            assert_eq!(in_place.out, owned.out);
            // And a read from the middle of a batch.
            let mid = start + (end - start) / 2 + 1;
            let mut in_place = FetchBatches::default();
            let mut owned = Owned {
                out: BytesMut::new(),
                batches: 0,
            };
            log.read_into("t", 0, mid, limits, Isolation::Uncommitted, &mut in_place)
                .expect("read");
            log.read_into("t", 0, mid, limits, Isolation::Uncommitted, &mut owned)
                .expect("read");
            assert_eq!(in_place.out, owned.out);
            let first =
                RecordBatchDecoder::decode(&mut in_place.out.clone().freeze()).expect("decode");
            assert_eq!(first.records[0].offset as u64, mid);
        });
    }
}
