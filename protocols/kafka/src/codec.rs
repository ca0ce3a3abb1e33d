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
use tributary_storage::{AppendRecord, Event, ProducerBatch, Record};

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

/// Stored records and transaction markers, in offset order, as
/// uncompressed v2 batches: runs of records as one batch each, every marker
/// as a control batch of its own (consumers skip it and move past it).
pub fn batches_of(
    records: &[Record],
    markers: &[(u64, i64, i16, tributary_storage::Marker)],
) -> Result<Bytes, Error> {
    if markers.is_empty() {
        return batch_of(records);
    }
    let mut out = BytesMut::new();
    let mut rest = records;
    for &(offset, producer_id, epoch, marker) in markers {
        let cut = rest.partition_point(|r| r.offset < offset);
        out.extend_from_slice(&batch_of(&rest[..cut])?);
        rest = &rest[cut..];
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
        RecordBatchEncoder::encode(&mut out, &[control], &options)
            .map_err(|e| Error::Encode(e.to_string()))?;
    }
    out.extend_from_slice(&batch_of(rest)?);
    Ok(out.freeze())
}

/// Stored records as one uncompressed v2 batch.
pub fn batch_of(records: &[Record]) -> Result<Bytes, Error> {
    let Some(first) = records.first() else {
        return Ok(Bytes::new());
    };
    let base = first.offset;
    let kafka: Vec<KafkaRecord> = records
        .iter()
        // Constant offset − sequence keeps every record in one batch
        // (the encoder starts a new batch when the difference changes).
        .map(|r| kafka_record(r, r.offset as i64, (r.offset - base) as i32))
        .collect();
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, &kafka, &options)
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(buf.freeze())
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
