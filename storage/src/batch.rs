//! The on-disk record batch: the value stored under each sled key.
//!
//! A partition is one sled tree. Each key is the batch's base offset as a
//! big-endian `u64` (so sled's byte order is offset order); each value is:
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0x54 ('T')
//! 1       1     format version (2; 1 is still read; 3: compacted, below)
//! 2       4     CRC-32 (IEEE, little-endian) of bytes 6..end
//! 6       4     record count (LE u32, ≥ 1)
//! 10      8     min timestamp (LE i64, ms)
//! 18      8     max timestamp (LE i64, ms)
//! 26      8     end position (LE u64): bytes of batch values appended to this
//!               partition up to and including this batch; size = last.end - first.start
//! 34      ..    records, back to back
//! ```
//!
//! A record is a varint-framed struct in postcard's wire style (LEB128 varints,
//! zig-zag for signed), written by hand so byte slices are copied, not iterated:
//!
//! ```text
//! varint  body length
//! zigzag  timestamp (i64)
//! varint  key length + 1 (0 = no key), key bytes
//! varint  value length + 1 (0 = null value), value bytes
//!         (version 1: value length, value bytes; no null values)
//! varint  header count, then per header: varint name length, name (UTF-8),
//!         varint value length, value bytes
//! ```
//! Record `i` has offset `base + i`: offsets are dense and implicit.
//!
//! ## Version 3: compacted batches
//! Only the cleaner writes them (`log/compaction`): a compacted batch holds
//! the records of one or more original batches that compaction kept, so its
//! offsets have gaps. The header is 8 bytes longer, and records carry their
//! offsets:
//!
//! ```text
//! 6       4     record count (may be 0: every record of the range was removed)
//! 34      8     span (LE u64): the batch covers offsets base..base+span,
//!               whether or not a record is left at each
//! 42      ..    records
//! ```
//!
//! ## Version 4: a transactional producer's batch
//! The committer writes a transactional producer's records, and each
//! transaction marker, as batches of their own (never packed with other
//! producers' records), 11 bytes longer than version 2:
//!
//! ```text
//! 34      8     producer id (LE i64)
//! 42      2     producer epoch (LE i16)
//! 44      1     flags: 0x01 transactional (always), 0x02 control (a marker)
//! 45      ..    records, as in version 2
//! ```
//!
//! A control batch holds one record in Kafka's marker layout: key = version
//! (i16 0) and type (i16: 0 abort, 1 commit), value = version (i16 0) and
//! the coordinator epoch (i32), big-endian.
//!
//! The CRC of a compacted batch also covers its version byte (the CRC
//! field follows it): a flipped bit there must not turn another version's
//! batch into one read as compacted.
//!
//! Each record's body starts with a varint offset delta (from the base;
//! strictly increasing, below the span), and a null value is followed by a
//! varint delete horizon (ms since the epoch; 0 = not set): the first pass
//! that keeps a tombstone stamps when a later pass may remove it.

use crate::error::{Error, Result};
use crate::event::{Event, Record};

/// Header length in bytes.
pub const HEADER_LEN: usize = 34;
const MAGIC: u8 = 0x54;
/// The version written.
const VERSION: u8 = 2;
/// The first version, still read: values are never null.
const VERSION_1: u8 = 1;
/// Compacted batches (written by the cleaner only).
const VERSION_3: u8 = 3;
/// Header length of a compacted batch (with its span).
pub const HEADER_LEN_V3: usize = HEADER_LEN + 8;
/// A transactional producer's batches and markers.
const VERSION_4: u8 = 4;
/// Header length of a transactional batch (with its producer).
pub const HEADER_LEN_V4: usize = HEADER_LEN + 11;
const FLAG_TRANSACTIONAL: u8 = 0x01;
const FLAG_CONTROL: u8 = 0x02;

/// Who wrote a transactional batch (version 4), and whether it is a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnBatch {
    /// The transactional producer's id.
    pub producer_id: i64,
    /// Its epoch when it wrote the batch.
    pub epoch: i16,
    /// A commit or abort marker (one control record), not data.
    pub control: bool,
}

/// What a transaction marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Marker {
    /// The producer's transaction was aborted: its records before this are not to be read.
    Abort,
    /// It was committed.
    Commit,
}

impl Marker {
    /// The control record's key and value, as Kafka lays them out.
    pub fn record(self, coordinator_epoch: i32) -> (Vec<u8>, Vec<u8>) {
        let kind: i16 = match self {
            Marker::Abort => 0,
            Marker::Commit => 1,
        };
        let mut key = 0i16.to_be_bytes().to_vec();
        key.extend_from_slice(&kind.to_be_bytes());
        let mut value = 0i16.to_be_bytes().to_vec();
        value.extend_from_slice(&coordinator_epoch.to_be_bytes());
        (key, value)
    }

    /// The marker a control record's key names, if it is one.
    pub fn of_key(key: &[u8]) -> Option<Marker> {
        match key {
            [0, 0, 0, 0] => Some(Marker::Abort),
            [0, 0, 0, 1] => Some(Marker::Commit),
            _ => None,
        }
    }
}

/// Summary of a batch read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Number of records.
    pub count: u32,
    /// Offsets the batch covers from its base (records may be missing from
    /// a compacted batch; equal to `count` in the others).
    pub span: u64,
    /// Smallest record timestamp.
    pub min_ts: i64,
    /// Largest record timestamp.
    pub max_ts: i64,
    /// Cumulative partition bytes after this batch.
    pub end_position: u64,
    /// A transactional producer's batch or marker (version 4).
    pub txn: Option<TxnBatch>,
}

/// Builds one batch value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BatchBuilder {
    #[serde(with = "as_bytes")]
    buf: Vec<u8>,
    count: u32,
    min_ts: i64,
    max_ts: i64,
}

impl BatchBuilder {
    /// A builder with room for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_LEN));
        buf.resize(HEADER_LEN, 0);
        BatchBuilder {
            buf,
            count: 0,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
        }
    }

    /// Records so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The largest timestamp so far (`i64::MIN` while empty).
    pub fn max_timestamp(&self) -> i64 {
        self.max_ts
    }

    /// Bytes so far, header included.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends every record of `other` (a memcpy: its records are already encoded).
    pub fn append(&mut self, other: &BatchBuilder) {
        self.buf.extend_from_slice(&other.buf[HEADER_LEN..]);
        self.count += other.count;
        self.min_ts = self.min_ts.min(other.min_ts);
        self.max_ts = self.max_ts.max(other.max_ts);
    }

    /// Appends one event stamped with `timestamp`.
    pub fn push(&mut self, event: &Event, timestamp: i64) {
        let body_len = encoded_body_len(event, timestamp);
        let buf = &mut self.buf;
        buf.reserve(body_len + 10);
        put_varint(buf, body_len as u64);
        put_varint(buf, zigzag(timestamp));
        match &event.key {
            Some(k) => {
                put_varint(buf, k.len() as u64 + 1);
                buf.extend_from_slice(k);
            }
            None => put_varint(buf, 0),
        }
        match &event.value {
            Some(v) => {
                put_varint(buf, v.len() as u64 + 1);
                buf.extend_from_slice(v);
            }
            None => put_varint(buf, 0),
        }
        put_varint(buf, event.headers.len() as u64);
        for (name, value) in &event.headers {
            put_varint(buf, name.len() as u64);
            buf.extend_from_slice(name.as_bytes());
            put_varint(buf, value.len() as u64);
            buf.extend_from_slice(value);
        }
        self.count += 1;
        self.min_ts = self.min_ts.min(timestamp);
        self.max_ts = self.max_ts.max(timestamp);
    }

    /// Seals the batch: writes the header given the partition's position before
    /// it, and returns the value and the new end position.
    pub fn finish(mut self, start_position: u64) -> (Vec<u8>, u64) {
        let end_position = start_position + self.buf.len() as u64;
        self.buf[0] = MAGIC;
        self.buf[1] = VERSION;
        self.buf[6..10].copy_from_slice(&self.count.to_le_bytes());
        self.buf[10..18].copy_from_slice(&self.min_ts.to_le_bytes());
        self.buf[18..26].copy_from_slice(&self.max_ts.to_le_bytes());
        self.buf[26..34].copy_from_slice(&end_position.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[6..]);
        self.buf[2..6].copy_from_slice(&crc.to_le_bytes());
        (self.buf, end_position)
    }

    /// Seals the batch as a transactional producer's (version 4).
    pub fn finish_transactional(mut self, start_position: u64, txn: TxnBatch) -> (Vec<u8>, u64) {
        let mut producer = Vec::with_capacity(11);
        producer.extend_from_slice(&txn.producer_id.to_le_bytes());
        producer.extend_from_slice(&txn.epoch.to_le_bytes());
        producer.push(FLAG_TRANSACTIONAL | if txn.control { FLAG_CONTROL } else { 0 });
        self.buf.splice(HEADER_LEN..HEADER_LEN, producer);
        let end_position = start_position + self.buf.len() as u64;
        self.buf[0] = MAGIC;
        self.buf[1] = VERSION_4;
        self.buf[6..10].copy_from_slice(&self.count.to_le_bytes());
        self.buf[10..18].copy_from_slice(&self.min_ts.to_le_bytes());
        self.buf[18..26].copy_from_slice(&self.max_ts.to_le_bytes());
        self.buf[26..34].copy_from_slice(&end_position.to_le_bytes());
        let crc = compacted_crc(&self.buf);
        self.buf[2..6].copy_from_slice(&crc.to_le_bytes());
        (self.buf, end_position)
    }

    /// A transaction marker: one control record stamped `timestamp`.
    pub fn marker(
        marker: Marker,
        coordinator_epoch: i32,
        timestamp: i64,
        producer_id: i64,
        epoch: i16,
        start_position: u64,
    ) -> (Vec<u8>, u64) {
        let (key, value) = marker.record(coordinator_epoch);
        let mut b = BatchBuilder::with_capacity(64);
        b.push(&Event::new(value).with_key(key), timestamp);
        b.finish_transactional(
            start_position,
            TxnBatch {
                producer_id,
                epoch,
                control: true,
            },
        )
    }
}

/// Builds one compacted (version 3) batch from records the cleaner keeps.
#[derive(Debug)]
pub(crate) struct CompactBuilder {
    buf: Vec<u8>,
    base: u64,
    count: u32,
    min_ts: i64,
    max_ts: i64,
}

impl CompactBuilder {
    /// A batch whose offsets start at `base`.
    pub(crate) fn new(base: u64, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_LEN_V3));
        buf.resize(HEADER_LEN_V3, 0);
        CompactBuilder {
            buf,
            base,
            count: 0,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
        }
    }

    /// Bytes so far, header included.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Bytes `r` would add.
    pub(crate) fn record_len(&self, r: &Record, horizon: Option<i64>) -> usize {
        let body = self.body_len(r, horizon);
        varint_len(body as u64) + body
    }

    fn body_len(&self, r: &Record, horizon: Option<i64>) -> usize {
        let mut n = varint_len(r.offset - self.base) + varint_len(zigzag(r.timestamp));
        n += r
            .key
            .as_ref()
            .map_or(1, |k| varint_len(k.len() as u64 + 1) + k.len());
        n += match &r.value {
            Some(v) => varint_len(v.len() as u64 + 1) + v.len(),
            None => 1 + varint_len(horizon.map_or(0, |h| h.max(1) as u64)),
        };
        n += varint_len(r.headers.len() as u64);
        for (name, value) in &r.headers {
            n += varint_len(name.len() as u64)
                + name.len()
                + varint_len(value.len() as u64)
                + value.len();
        }
        n
    }

    /// Appends a record (offsets must grow, from the base on); a tombstone
    /// carries its delete horizon.
    pub(crate) fn push(&mut self, r: &Record, horizon: Option<i64>) {
        let body_len = self.body_len(r, horizon);
        let buf = &mut self.buf;
        put_varint(buf, body_len as u64);
        put_varint(buf, r.offset - self.base);
        put_varint(buf, zigzag(r.timestamp));
        match &r.key {
            Some(k) => {
                put_varint(buf, k.len() as u64 + 1);
                buf.extend_from_slice(k);
            }
            None => put_varint(buf, 0),
        }
        match &r.value {
            Some(v) => {
                put_varint(buf, v.len() as u64 + 1);
                buf.extend_from_slice(v);
            }
            None => {
                put_varint(buf, 0);
                put_varint(buf, horizon.map_or(0, |h| h.max(1) as u64));
            }
        }
        put_varint(buf, r.headers.len() as u64);
        for (name, value) in &r.headers {
            put_varint(buf, name.len() as u64);
            buf.extend_from_slice(name.as_bytes());
            put_varint(buf, value.len() as u64);
            buf.extend_from_slice(value);
        }
        self.count += 1;
        self.min_ts = self.min_ts.min(r.timestamp);
        self.max_ts = self.max_ts.max(r.timestamp);
    }

    /// Seals the batch: it covers `base..base + span` and ends at partition
    /// position `end_position`.
    pub(crate) fn finish(mut self, span: u64, end_position: u64) -> Vec<u8> {
        if self.count == 0 {
            (self.min_ts, self.max_ts) = (i64::MIN, i64::MIN);
        }
        self.buf[0] = MAGIC;
        self.buf[1] = VERSION_3;
        self.buf[6..10].copy_from_slice(&self.count.to_le_bytes());
        self.buf[10..18].copy_from_slice(&self.min_ts.to_le_bytes());
        self.buf[18..26].copy_from_slice(&self.max_ts.to_le_bytes());
        self.buf[26..34].copy_from_slice(&end_position.to_le_bytes());
        self.buf[34..42].copy_from_slice(&span.to_le_bytes());
        let crc = compacted_crc(&self.buf);
        self.buf[2..6].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// A compacted or transactional batch's CRC: over its version byte, then bytes 6.. .
pub fn compacted_crc(value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&value[1..2]);
    h.update(&value[6..]);
    h.finalize()
}

fn encoded_body_len(event: &Event, timestamp: i64) -> usize {
    let mut n = varint_len(zigzag(timestamp));
    n += match &event.key {
        Some(k) => varint_len(k.len() as u64 + 1) + k.len(),
        None => 1,
    };
    n += match &event.value {
        Some(v) => varint_len(v.len() as u64 + 1) + v.len(),
        None => 1,
    };
    n += varint_len(event.headers.len() as u64);
    for (name, value) in &event.headers {
        n += varint_len(name.len() as u64)
            + name.len()
            + varint_len(value.len() as u64)
            + value.len();
    }
    n
}

/// Upper bound of the bytes one event adds to a batch.
pub fn encoded_len(event: &Event) -> usize {
    let body = encoded_body_len(event, i64::MIN);
    body + varint_len(body as u64)
}

/// Reads and checks the header (magic, version, CRC over the whole value);
/// a failure is an [`Error::BadBatch`] saying what is wrong.
pub fn decode_header(value: &[u8]) -> Result<BatchHeader> {
    if value.len() < HEADER_LEN {
        return Err(bad(format!(
            "batch of {} bytes is shorter than its header",
            value.len()
        )));
    }
    if value[0] != MAGIC {
        return Err(bad(format!("bad magic byte {:#04x}", value[0])));
    }
    if !matches!(value[1], VERSION | VERSION_1 | VERSION_3 | VERSION_4) {
        return Err(bad(format!("unknown batch format version {}", value[1])));
    }
    let compacted = value[1] == VERSION_3;
    if compacted && value.len() < HEADER_LEN_V3 {
        return Err(bad("compacted batch shorter than its header"));
    }
    let transactional = value[1] == VERSION_4;
    if transactional && value.len() < HEADER_LEN_V4 {
        return Err(bad("transactional batch shorter than its header"));
    }
    let stored = u32::from_le_bytes(arr4(&value[2..6]));
    let actual = if compacted || transactional {
        compacted_crc(value)
    } else {
        crc32fast::hash(&value[6..])
    };
    if stored != actual {
        return Err(bad(format!(
            "checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"
        )));
    }
    let count = u32::from_le_bytes(arr4(&value[6..10]));
    let span = if compacted {
        u64::from_le_bytes(arr8(&value[34..42]))
    } else {
        u64::from(count)
    };
    if count == 0 && !compacted {
        return Err(bad("batch with zero records"));
    }
    // A span beyond 2^48 offsets is no batch this log wrote (and would
    // overflow offset arithmetic).
    if span == 0 || span < u64::from(count) || span > 1 << 48 {
        return Err(bad(format!(
            "batch of {count} records spans {span} offsets"
        )));
    }
    let txn = if transactional {
        let flags = value[44];
        if flags & FLAG_TRANSACTIONAL == 0 || flags & !(FLAG_TRANSACTIONAL | FLAG_CONTROL) != 0 {
            return Err(bad(format!("transactional batch with flags {flags:#04x}")));
        }
        Some(TxnBatch {
            producer_id: i64::from_le_bytes(arr8(&value[34..42])),
            epoch: i16::from_le_bytes([value[42], value[43]]),
            control: flags & FLAG_CONTROL != 0,
        })
    } else {
        None
    };
    Ok(BatchHeader {
        txn,
        count,
        span,
        min_ts: i64::from_le_bytes(arr8(&value[10..18])),
        max_ts: i64::from_le_bytes(arr8(&value[18..26])),
        end_position: u64::from_le_bytes(arr8(&value[26..34])),
    })
}

/// Decodes records of a checked batch whose offsets fall in `[from, until)`,
/// calling `each` until it returns false.
/// A failure is an [`Error::BadBatch`] saying what is wrong.
pub fn decode_records(
    value: &[u8],
    base: u64,
    partition: u32,
    from: u64,
    until: u64,
    mut each: impl FnMut(Record) -> bool,
) -> Result<()> {
    walk(value, base, partition, from, until, |r, _| each(r)).map(drop)
}

/// Like [`decode_records`], with each tombstone's delete horizon (ms since
/// the epoch; `None` when no pass stamped it yet); answers the header.
pub(crate) fn walk(
    value: &[u8],
    base: u64,
    partition: u32,
    from: u64,
    until: u64,
    mut each: impl FnMut(Record, Option<i64>) -> bool,
) -> Result<BatchHeader> {
    let mut failed = None;
    let header = walk_refs(value, base, from, until, |r, horizon| {
        match r.to_record(partition) {
            Ok(record) => each(record, horizon),
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(header),
    }
}

/// A stored record read in place: its fields borrow the batch's bytes.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Offset within the partition.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<&'a [u8]>,
    /// Payload; `None` is a null value.
    pub value: Option<&'a [u8]>,
    /// How many headers.
    pub header_count: usize,
    /// The headers as stored: per header, varint name length, name, varint
    /// value length, value ([`RecordRef::headers`] reads them).
    pub raw_headers: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// The headers, in order: (name, value). The batch was checked when it
    /// was read (every length within it), so this reads what it found.
    pub fn headers(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut cur = Cursor {
            buf: self.raw_headers,
            pos: 0,
        };
        (0..self.header_count).map_while(move |_| {
            let n = cur.varint().ok()? as usize;
            let name = cur.bytes(n).ok()?;
            let n = cur.varint().ok()? as usize;
            Some((name, cur.bytes(n).ok()?))
        })
    }

    /// The payload's bytes plus the key's: what read limits count.
    pub fn size(&self) -> usize {
        self.value.map_or(0, <[u8]>::len) + self.key.map_or(0, <[u8]>::len)
    }

    /// An owned [`Record`] of it (header names must be UTF-8).
    pub fn to_record(&self, partition: u32) -> Result<Record> {
        let mut headers = Vec::with_capacity(self.header_count.min(64));
        for (name, value) in self.headers() {
            let name = String::from_utf8(name.to_vec()).map_err(|_| {
                bad(format!(
                    "record {} has a header name that is not UTF-8",
                    self.offset
                ))
            })?;
            headers.push((name, value.to_vec()));
        }
        Ok(Record {
            partition,
            offset: self.offset,
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            timestamp: self.timestamp,
            headers,
        })
    }
}

/// [`walk`] without copying: each record borrows the batch's bytes.
pub(crate) fn walk_refs<'a>(
    value: &'a [u8],
    base: u64,
    from: u64,
    until: u64,
    mut each: impl FnMut(RecordRef<'a>, Option<i64>) -> bool,
) -> Result<BatchHeader> {
    let header = decode_header(value)?;
    let nullable = value[1] != VERSION_1;
    let compacted = value[1] == VERSION_3;
    let mut cur = Cursor {
        buf: value,
        pos: match value[1] {
            VERSION_3 => HEADER_LEN_V3,
            VERSION_4 => HEADER_LEN_V4,
            _ => HEADER_LEN,
        },
    };
    let mut next_offset = base;
    for i in 0..u64::from(header.count) {
        let body_len = cur.varint()? as usize;
        let body_end = cur.pos.checked_add(body_len).filter(|&e| e <= value.len());
        let Some(body_end) = body_end else {
            return Err(bad(format!("record {} runs past the batch end", base + i)));
        };
        let offset = if compacted {
            let delta = cur.varint()?;
            let offset = base.checked_add(delta).filter(|&o| o >= next_offset);
            match offset {
                Some(o) if delta < header.span => o,
                _ => {
                    return Err(bad(format!(
                        "record offset delta {delta} out of order or span"
                    )))
                }
            }
        } else {
            base + i
        };
        next_offset = offset + 1;
        if offset >= until {
            return Ok(header);
        }
        if offset < from {
            cur.pos = body_end;
            continue;
        }
        let timestamp = unzigzag(cur.varint()?);
        let key = match cur.varint()? {
            0 => None,
            n => Some(cur.bytes(n as usize - 1)?),
        };
        let value_bytes = match (nullable, cur.varint()?) {
            (true, 0) => None,
            (true, n) => Some(cur.bytes(n as usize - 1)?),
            (false, n) => Some(cur.bytes(n as usize)?),
        };
        let horizon = match (compacted, &value_bytes) {
            (true, None) => match cur.varint()? {
                0 => None,
                h => Some(i64::try_from(h).map_err(|_| bad("delete horizon overflows"))?),
            },
            _ => None,
        };
        let header_count = cur.varint()? as usize;
        let headers_from = cur.pos;
        for _ in 0..header_count {
            let nlen = cur.varint()? as usize;
            cur.bytes(nlen)?;
            let hlen = cur.varint()? as usize;
            cur.bytes(hlen)?;
        }
        if cur.pos != body_end {
            return Err(bad(format!(
                "record {offset} length does not match its fields"
            )));
        }
        let record = RecordRef {
            offset,
            timestamp,
            key,
            value: value_bytes,
            header_count,
            raw_headers: &value[headers_from..body_end],
        };
        if !each(record, horizon) {
            return Ok(header);
        }
    }
    if cur.pos != value.len() {
        return Err(bad("trailing bytes after the last record"));
    }
    Ok(header)
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut out = 0u64;
        for shift in (0..70).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(bad("truncated varint"));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(bad("varint overflows u64"));
            }
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(bad("varint too long"))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| bad("truncated field"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
}

/// A decoding failure, as [`Error::BadBatch`].
fn bad(what: impl Into<String>) -> Error {
    Error::BadBatch(what.into())
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn arr4(s: &[u8]) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(s);
    a
}

fn arr8(s: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(s);
    a
}

/// A batch's bytes as serde bytes: postcard writes them as one slice where
/// a `Vec<u8>` goes byte by byte as a sequence, in the same layout (a
/// length, then the bytes), so what was stored as a sequence reads back.
/// An op is encoded for the Raft log and for each follower and decoded on
/// each node, so this is on a cluster's write path.
mod as_bytes {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // A self-describing format (JSON) gives a list of numbers.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u8) -> Event {
        Event::new(vec![i; i as usize * 3])
            .with_key(format!("k{i}"))
            .with_header("h", vec![i])
            .with_header("ünïcode", Vec::new())
    }

    /// The layout a builder had when its bytes were a plain `Vec<u8>`.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct AsSequence {
        buf: Vec<u8>,
        count: u32,
        min_ts: i64,
        max_ts: i64,
    }

    #[test]
    fn a_builder_encodes_as_it_did_when_its_bytes_were_a_sequence() {
        let mut b = BatchBuilder::with_capacity(1024);
        for i in 0..10u8 {
            b.push(&sample(i), i64::from(i) * 7);
        }
        let old = AsSequence {
            buf: b.buf.clone(),
            count: b.count,
            min_ts: b.min_ts,
            max_ts: b.max_ts,
        };
        let stored = postcard::to_allocvec(&old).expect("encode");
        assert_eq!(postcard::to_allocvec(&b).expect("encode"), stored);
        let back: BatchBuilder = postcard::from_bytes(&stored).expect("decode");
        assert_eq!(
            (back.buf, back.count, back.min_ts, back.max_ts),
            (b.buf.clone(), b.count, b.min_ts, b.max_ts)
        );
        let json = serde_json::to_string(&old).expect("json");
        assert_eq!(serde_json::to_string(&b).expect("json"), json);
        let back: BatchBuilder = serde_json::from_str(&json).expect("json");
        assert_eq!(back.buf, b.buf);
        // Cut short: an error, not a panic.
        assert!(postcard::from_bytes::<BatchBuilder>(&stored[..stored.len() / 2]).is_err());
    }

    #[test]
    fn round_trip() {
        let mut b = BatchBuilder::with_capacity(1024);
        for i in 0..10u8 {
            b.push(&sample(i), -5 + i64::from(i) * 1_000_000_000_000);
        }
        b.push(&Event::new(Vec::new()), 0);
        let (value, end) = b.finish(100);
        assert_eq!(end, 100 + value.len() as u64);
        let h = decode_header(&value).expect("header");
        assert_eq!(h.count, 11);
        assert_eq!(h.min_ts, -5);
        let mut got = Vec::new();
        decode_records(&value, 40, 3, 0, u64::MAX, |r| {
            got.push(r);
            true
        })
        .expect("decode");
        assert_eq!(got.len(), 11);
        for (i, r) in got.iter().take(10).enumerate() {
            let e = sample(i as u8);
            assert_eq!(r.offset, 40 + i as u64);
            assert_eq!(r.partition, 3);
            assert_eq!(r.key, e.key);
            assert_eq!(r.value, e.value);
            assert_eq!(r.headers, e.headers);
        }
        assert_eq!(got[10].key, None);
        assert_eq!(got[10].value, Some(Vec::new()), "empty, not null");
    }

    #[test]
    fn a_null_value_stays_null_and_version_1_batches_still_read() {
        let mut b = BatchBuilder::with_capacity(64);
        b.push(&Event::null().with_key("gone"), 7);
        b.push(&Event::new(Vec::new()).with_key("empty"), 8);
        let (value, _) = b.finish(0);
        let mut got = Vec::new();
        decode_records(&value, 0, 0, 0, u64::MAX, |r| {
            got.push(r);
            true
        })
        .expect("decode");
        assert_eq!(got[0].value, None);
        assert_eq!(got[1].value, Some(Vec::new()));
        // A batch as version 1 wrote it (value length, no null): 2 records.
        let mut v1 = vec![0u8; HEADER_LEN];
        for (key, val) in [(&b"a"[..], &b"xy"[..]), (&b""[..], &b""[..])] {
            let mut body = Vec::new();
            put_varint(&mut body, zigzag(5));
            put_varint(&mut body, key.len() as u64 + 1);
            body.extend_from_slice(key);
            put_varint(&mut body, val.len() as u64);
            body.extend_from_slice(val);
            put_varint(&mut body, 0);
            put_varint(&mut v1, body.len() as u64);
            v1.extend_from_slice(&body);
        }
        v1[0] = MAGIC;
        v1[1] = VERSION_1;
        v1[6..10].copy_from_slice(&2u32.to_le_bytes());
        let end = v1.len() as u64;
        v1[26..34].copy_from_slice(&end.to_le_bytes());
        let crc = crc32fast::hash(&v1[6..]);
        v1[2..6].copy_from_slice(&crc.to_le_bytes());
        let mut old = Vec::new();
        decode_records(&v1, 0, 0, 0, u64::MAX, |r| {
            old.push(r);
            true
        })
        .expect("a version 1 batch decodes");
        assert_eq!(old[0].value.as_deref(), Some(&b"xy"[..]));
        assert_eq!(old[1].value, Some(Vec::new()), "version 1 has no null");
        v1[1] = 4;
        assert!(decode_header(&v1).is_err(), "unknown versions are refused");
    }

    #[test]
    fn a_transactional_batch_carries_its_producer_and_a_marker_its_kind() {
        let mut b = BatchBuilder::with_capacity(64);
        b.push(&sample(1), 10);
        b.push(&sample(2), 11);
        let txn = TxnBatch {
            producer_id: 4_000_000_007,
            epoch: 3,
            control: false,
        };
        let (value, end) = b.finish_transactional(500, txn);
        assert_eq!(end, 500 + value.len() as u64);
        let h = decode_header(&value).expect("header");
        assert_eq!((h.count, h.span, h.txn), (2, 2, Some(txn)));
        let mut got = Vec::new();
        decode_records(&value, 20, 0, 0, u64::MAX, |r| {
            got.push((r.offset, r.key));
            true
        })
        .expect("records");
        assert_eq!(got, vec![(20, sample(1).key), (21, sample(2).key)]);
        for i in 0..value.len() {
            for bit in 0..8 {
                let mut bad = value.clone();
                bad[i] ^= 1 << bit;
                assert!(decode_header(&bad).is_err(), "flip of bit {bit} at {i}");
            }
        }
        let (marker, _) = BatchBuilder::marker(Marker::Commit, 9, 1_000, 77, 2, 0);
        let h = decode_header(&marker).expect("marker header");
        assert_eq!(
            h.txn,
            Some(TxnBatch {
                producer_id: 77,
                epoch: 2,
                control: true
            })
        );
        let mut record = None;
        decode_records(&marker, 5, 0, 0, u64::MAX, |r| {
            record = Some(r);
            true
        })
        .expect("marker record");
        let record = record.expect("one record");
        assert_eq!(
            Marker::of_key(record.key.as_deref().unwrap_or_default()),
            Some(Marker::Commit)
        );
        assert_eq!(record.value.as_deref(), Some(&[0, 0, 0, 0, 0, 9][..]));
        assert_eq!(
            Marker::of_key(&Marker::Abort.record(0).0),
            Some(Marker::Abort)
        );
        assert_eq!(Marker::of_key(b"\0\0\0\x02"), None);
    }

    #[test]
    fn a_compacted_batch_keeps_offsets_gaps_and_tombstone_horizons() {
        let rec = |offset, key: &str, value: Option<&[u8]>| Record {
            partition: 2,
            offset,
            key: Some(key.as_bytes().to_vec()),
            value: value.map(<[u8]>::to_vec),
            timestamp: 1_000 + offset as i64,
            headers: vec![("h".into(), vec![offset as u8])],
        };
        let mut b = CompactBuilder::new(100, 64);
        let kept = [
            (rec(100, "a", Some(b"x")), None),
            (rec(103, "b", None), Some(9_999)),
            (rec(150, "c", Some(b"")), None),
        ];
        let mut expected_len = b.len();
        for (r, h) in &kept {
            expected_len += b.record_len(r, *h);
            b.push(r, *h);
        }
        assert_eq!(b.len(), expected_len, "record_len is exact");
        let value = b.finish(60, 5_000);
        let h = decode_header(&value).expect("header");
        assert_eq!((h.count, h.span, h.end_position), (3, 60, 5_000));
        let mut got = Vec::new();
        walk(&value, 100, 2, 0, u64::MAX, |r, horizon| {
            got.push((r, horizon));
            true
        })
        .expect("decode");
        assert_eq!(got, kept.to_vec());
        // A window over the gaps: only offsets in it.
        let mut offsets = Vec::new();
        decode_records(&value, 100, 2, 101, 150, |r| {
            offsets.push(r.offset);
            true
        })
        .expect("decode");
        assert_eq!(offsets, vec![103]);
        // Every flipped bit is caught, the version byte's too.
        for i in 0..value.len() {
            for bit in 0..8 {
                let mut bad = value.clone();
                bad[i] ^= 1 << bit;
                assert!(decode_header(&bad).is_err(), "flip of bit {bit} at {i}");
            }
        }
        // Empty (every record of the range removed) is a valid batch.
        let empty = CompactBuilder::new(7, 64).finish(3, 10);
        let h = decode_header(&empty).expect("an empty compacted batch");
        assert_eq!((h.count, h.span), (0, 3));
        // Offsets out of order or past the span are refused.
        for (span, second) in [(60, 100), (3, 103), (60, 130)] {
            let mut bad = CompactBuilder::new(100, 64);
            bad.push(&rec(100, "a", Some(b"x")), None);
            bad.push(&rec(second, "b", Some(b"y")), None);
            let v = bad.finish(span, 10);
            let ok = walk(&v, 100, 0, 0, u64::MAX, |_, _| true).is_ok();
            assert_eq!(
                ok,
                second > 100 && second < 100 + span,
                "span {span}, second {second}"
            );
        }
    }

    #[test]
    fn window_selects_offsets() {
        let mut b = BatchBuilder::with_capacity(64);
        for i in 0..5u8 {
            b.push(&sample(i), 1);
        }
        let (value, _) = b.finish(0);
        let mut offsets = Vec::new();
        decode_records(&value, 10, 0, 12, 14, |r| {
            offsets.push(r.offset);
            true
        })
        .expect("decode");
        assert_eq!(offsets, vec![12, 13]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let mut b = BatchBuilder::with_capacity(64);
        b.push(&sample(7), 1);
        b.push(&sample(8), 2);
        let (value, _) = b.finish(0);
        for i in 0..value.len() {
            for bit in 0..8 {
                let mut bad = value.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode_header(&bad).is_err(),
                    "flip of bit {bit} at byte {i} went unnoticed"
                );
            }
        }
        for cut in 0..value.len() {
            assert!(decode_records(&value[..cut], 0, 0, 0, u64::MAX, |_| true).is_err());
        }
    }

    #[test]
    fn encoded_len_bounds_the_real_size() {
        for i in 0..20u8 {
            let e = sample(i);
            let mut b = BatchBuilder::with_capacity(64);
            b.push(&e, i64::MAX);
            assert!(b.len() - HEADER_LEN <= encoded_len(&e));
        }
    }
}
