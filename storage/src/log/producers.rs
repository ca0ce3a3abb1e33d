//! Idempotent producers: per (topic, partition, producer id) the producer's
//! epoch and its last batches' sequence numbers, so a batch a producer sends
//! again (its answer was lost, it reconnected, the node restarted) is stored
//! once and answered with the offset it got the first time.
//!
//! - The committer checks and updates this table as it writes a cycle, in
//!   the order appends were queued: a batch continues its producer's
//!   sequence, repeats one of its last [`RECENT`] batches (a duplicate: not
//!   written, answered with the first offset it was given), or is refused
//!   ([`Error::OutOfOrderSequence`], [`Error::ProducerFenced`],
//!   [`Error::UnknownProducer`]). A duplicate of a batch in a cycle not yet
//!   durable is answered only after a later sync, so never before the
//!   original is durable.
//! - Durable with the batch: the entry is written to the metadata space
//!   [`SPACE`] in the same write cycle, before the batch itself, and the
//!   cycle's one sync covers both; the engine recovers a prefix of its
//!   writes, so a recovered batch always has its entry. An entry can be
//!   ahead of the batches (the crash came between the two): at recovery its
//!   batches past the partition's recovered end are dropped, so a retry of
//!   a batch that was lost is written, not taken for a duplicate.
//! - Bounded: at most `LogConfig::max_producer_states` entries across the
//!   node; past that the least recently used are forgotten (their producers
//!   get [`Error::UnknownProducer`] on their next batch and start a new
//!   sequence, as Kafka clients do when a broker expired their id).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Metadata space of the producer entries.
pub(super) const SPACE: &str = "__producers";
/// Metadata space of the producer id allocator.
pub(super) const ID_SPACE: &str = "__producer_ids";

/// The stored end of the last block of producer ids (`next` in
/// [`ID_SPACE`]): 8 bytes, then in a cluster the 8-byte index of the
/// replicated op that reserved it.
pub(super) fn id_block(stored: Option<&[u8]>) -> (i64, Option<u64>) {
    let Some(v) = stored else { return (0, None) };
    let end = v
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i64::from_be_bytes);
    let by = v
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    (end, by)
}
/// Batches remembered per producer and partition (Kafka's in-flight limit
/// for idempotent producers is 5).
pub(super) const RECENT: usize = 5;

/// Who sent a batch, as an idempotent producer names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerBatch {
    /// The id the node handed out ([`crate::Log::allocate_producer_id`]).
    pub producer_id: i64,
    /// The producer's epoch: a higher one fences the lower.
    pub epoch: i16,
    /// Sequence number of the batch's first record (per partition, from 0).
    pub first_sequence: i32,
}

/// One batch remembered: its sequence range and first offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Sent {
    pub first: i32,
    pub last: i32,
    pub base: u64,
    pub count: u32,
}

/// A producer's state in one partition (also its stored form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Entry {
    pub epoch: i16,
    /// Oldest first, at most [`RECENT`].
    pub recent: Vec<Sent>,
    /// The largest timestamp of its last batch, or the time of its last
    /// transaction marker (ms); -1 when not known (an entry stored before
    /// this field).
    pub last_timestamp: i64,
    /// The coordinator epoch of its last transaction marker, -1 before one.
    pub coordinator_epoch: i32,
    /// When it was last used: the table's clock then, which in a cluster
    /// is the replicated entry's index (0 in an entry stored before this
    /// field). Stored: a node that restarts, applies entries again or
    /// restores a snapshot forgets the same producers as one that did not,
    /// so the nodes of a cluster keep answering a batch alike.
    pub used: u64,
}

/// The stored form of an [`Entry`] written before it had `used`.
#[derive(Deserialize)]
struct EntryV2 {
    epoch: i16,
    recent: Vec<Sent>,
    last_timestamp: i64,
    coordinator_epoch: i32,
}

/// The stored form of an [`Entry`] written before it had
/// `last_timestamp` and `coordinator_epoch` (postcard is not
/// self-describing: the two are missing at its end).
#[derive(Deserialize)]
struct EntryV1 {
    epoch: i16,
    recent: Vec<Sent>,
}

/// A stored entry, in any of its forms (postcard reads a prefix: the
/// newest form is tried first, and an older one ends before its next field).
pub(super) fn decode(v: &[u8]) -> Option<Entry> {
    if let Ok(e) = postcard::from_bytes::<Entry>(v) {
        return Some(e);
    }
    if let Ok(old) = postcard::from_bytes::<EntryV2>(v) {
        return Some(Entry {
            epoch: old.epoch,
            recent: old.recent,
            last_timestamp: old.last_timestamp,
            coordinator_epoch: old.coordinator_epoch,
            used: 0,
        });
    }
    let old = postcard::from_bytes::<EntryV1>(v).ok()?;
    Some(Entry {
        epoch: old.epoch,
        recent: old.recent,
        last_timestamp: -1,
        coordinator_epoch: -1,
        used: 0,
    })
}

/// A producer's state in a partition as DescribeProducers shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerState {
    /// Its id.
    pub producer_id: i64,
    /// Its epoch.
    pub epoch: i16,
    /// The sequence number of its last record.
    pub last_sequence: i32,
    /// The largest timestamp of its last batch, or the time of its last
    /// transaction marker (ms); -1 when not known.
    pub last_timestamp: i64,
    /// The coordinator epoch of its last transaction marker, -1 before one.
    pub coordinator_epoch: i32,
    /// The first offset of its open transaction, if one is open.
    pub transaction_start: Option<u64>,
}

/// What the committer does with a batch.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// New: write it.
    Append,
    /// Sent before: answer with this first offset, write nothing.
    Duplicate(u64),
}

/// The last sequence of a batch of `count` records from `first` (sequences
/// wrap from `i32::MAX` to 0, as Kafka's do).
pub(super) fn last_sequence(first: i32, count: u32) -> i32 {
    let last = i64::from(first) + i64::from(count) - 1;
    (last % (i64::from(i32::MAX) + 1)) as i32
}

fn next_sequence(last: i32) -> i32 {
    if last == i32::MAX {
        0
    } else {
        last + 1
    }
}

/// Kafka's rules for a batch of `count` records from `b`.
pub(super) fn check(entry: Option<&Entry>, b: &ProducerBatch, count: u32) -> Result<Verdict> {
    let last = last_sequence(b.first_sequence, count);
    let Some(e) = entry else {
        return if b.first_sequence == 0 {
            Ok(Verdict::Append)
        } else {
            Err(Error::UnknownProducer {
                producer_id: b.producer_id,
            })
        };
    };
    if b.epoch < e.epoch {
        return Err(Error::ProducerFenced {
            producer_id: b.producer_id,
            epoch: b.epoch,
            current: e.epoch,
        });
    }
    if b.epoch > e.epoch {
        // A new epoch starts its sequences again.
        return if b.first_sequence == 0 {
            Ok(Verdict::Append)
        } else {
            Err(Error::OutOfOrderSequence {
                producer_id: b.producer_id,
                expected: 0,
                got: b.first_sequence,
            })
        };
    }
    if let Some(s) = e
        .recent
        .iter()
        .find(|s| s.first == b.first_sequence && s.last == last)
    {
        return Ok(Verdict::Duplicate(s.base));
    }
    let expected = e.recent.last().map_or(0, |s| next_sequence(s.last));
    if b.first_sequence == expected {
        Ok(Verdict::Append)
    } else {
        Err(Error::OutOfOrderSequence {
            producer_id: b.producer_id,
            expected,
            got: b.first_sequence,
        })
    }
}

/// The entry after `b` was appended at `base`.
pub(super) fn after(
    entry: Option<&Entry>,
    b: &ProducerBatch,
    count: u32,
    base: u64,
    timestamp: i64,
) -> Entry {
    let sent = Sent {
        first: b.first_sequence,
        last: last_sequence(b.first_sequence, count),
        base,
        count,
    };
    match entry {
        Some(e) if e.epoch == b.epoch => {
            let mut recent = e.recent.clone();
            if recent.len() == RECENT {
                recent.remove(0);
            }
            recent.push(sent);
            Entry {
                epoch: b.epoch,
                recent,
                last_timestamp: timestamp,
                coordinator_epoch: e.coordinator_epoch,
                used: 0,
            }
        }
        _ => Entry {
            epoch: b.epoch,
            recent: vec![sent],
            last_timestamp: timestamp,
            coordinator_epoch: entry.map_or(-1, |e| e.coordinator_epoch),
            used: 0,
        },
    }
}

/// The key of an entry in [`SPACE`]: topic, NUL, partition, producer id.
pub(super) fn key(topic: &str, partition: u32, producer_id: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 13);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&producer_id.to_be_bytes());
    k
}

/// The parts of a key in [`SPACE`].
pub(super) fn parse_key(k: &[u8]) -> Option<(String, u32, i64)> {
    let nul = k.iter().position(|&b| b == 0)?;
    let (topic, rest) = k.split_at(nul);
    let rest = &rest[1..];
    if rest.len() != 12 {
        return None;
    }
    let partition = u32::from_be_bytes(rest[..4].try_into().ok()?);
    let id = i64::from_be_bytes(rest[4..].try_into().ok()?);
    Some((String::from_utf8(topic.to_vec()).ok()?, partition, id))
}

/// Forgets every producer state of a deleted topic, in memory and (durable
/// with the next sync) on disk. Called once no append to it can be
/// written any more.
pub(super) fn forget_topic(shared: &super::state::Shared, topic: &str) -> Result<()> {
    crate::util::lock(&shared.producers)
        .entries
        .retain(|(t, _, _), _| t != topic);
    for k in shared.store.meta_keys(SPACE)? {
        if parse_key(&k).is_some_and(|(t, _, _)| t == topic) {
            shared.store.put_meta(SPACE, &k, None)?;
        }
    }
    Ok(())
}

/// The node's producer table: (topic, partition, producer id) → entry.
/// Only the committer thread changes it (recovery fills it before), but
/// for a deleted topic's entries ([`forget_topic`]).
#[derive(Debug, Default)]
pub(super) struct Table {
    pub entries: HashMap<(String, u32, i64), Entry>,
    /// Ticks on every use: the least recently used go first.
    pub clock: u64,
}

impl Table {
    /// Keys to forget so one more entry fits in `max`: the least recently
    /// used sixteenth (at least what is needed), so a full table is not
    /// scanned on every new producer. The same on every node that applied
    /// the same appends: ties (entries stored before `used` was) go by key.
    pub fn evictions(&self, max: usize) -> Vec<(String, u32, i64)> {
        if self.entries.len() < max {
            return Vec::new();
        }
        let n = (self.entries.len() - max + 1).max(max / 16).max(1);
        let mut by_use: Vec<(&(String, u32, i64), u64)> =
            self.entries.iter().map(|(k, e)| (k, e.used)).collect();
        by_use.sort_unstable_by(|(ka, ua), (kb, ub)| ua.cmp(ub).then_with(|| ka.cmp(kb)));
        by_use.into_iter().take(n).map(|(k, _)| k.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(epoch: i16, first: i32) -> ProducerBatch {
        ProducerBatch {
            producer_id: 7,
            epoch,
            first_sequence: first,
        }
    }

    #[test]
    fn sequences_continue_repeat_or_are_refused_as_kafka_says() {
        assert_eq!(check(None, &b(0, 0), 3).ok(), Some(Verdict::Append));
        assert!(matches!(
            check(None, &b(0, 5), 3),
            Err(Error::UnknownProducer { .. })
        ));
        let e = after(None, &b(0, 0), 3, 100, 1);
        let e = after(Some(&e), &b(0, 3), 2, 103, 2);
        assert_eq!(check(Some(&e), &b(0, 5), 1).ok(), Some(Verdict::Append));
        assert_eq!(
            check(Some(&e), &b(0, 0), 3).ok(),
            Some(Verdict::Duplicate(100))
        );
        assert_eq!(
            check(Some(&e), &b(0, 3), 2).ok(),
            Some(Verdict::Duplicate(103))
        );
        assert!(matches!(
            check(Some(&e), &b(0, 9), 1),
            Err(Error::OutOfOrderSequence { expected: 5, .. })
        ));
        assert!(matches!(
            check(Some(&e), &b(-1, 5), 1),
            Err(Error::ProducerFenced { .. })
        ));
        assert_eq!(check(Some(&e), &b(1, 0), 1).ok(), Some(Verdict::Append));
        assert!(matches!(
            check(Some(&e), &b(1, 4), 1),
            Err(Error::OutOfOrderSequence { .. })
        ));
        // Only the last RECENT batches are remembered.
        let mut e = e;
        for i in 0..RECENT as u64 {
            let first = 5 + i as i32;
            e = after(Some(&e), &b(0, first), 1, 105 + i, 3);
        }
        assert_eq!(e.recent.len(), RECENT);
        assert!(matches!(
            check(Some(&e), &b(0, 0), 3),
            Err(Error::OutOfOrderSequence { .. })
        ));
    }

    #[test]
    fn sequences_wrap_and_keys_round_trip() {
        assert_eq!(last_sequence(i32::MAX, 1), i32::MAX);
        assert_eq!(last_sequence(i32::MAX, 3), 1);
        let e = after(None, &b(0, i32::MAX - 1), 2, 0, 4);
        assert_eq!(check(Some(&e), &b(0, 0), 1).ok(), Some(Verdict::Append));
        let k = key("t\u{e9}", 3, -9);
        assert_eq!(parse_key(&k), Some(("t\u{e9}".to_owned(), 3, -9)));
        assert_eq!(parse_key(b"t\0\0"), None);
    }

    #[test]
    fn an_entry_stored_before_its_timestamp_field_still_reads() {
        #[derive(Serialize)]
        struct Old {
            epoch: i16,
            recent: Vec<Sent>,
        }
        let recent = vec![Sent {
            first: 0,
            last: 2,
            base: 10,
            count: 3,
        }];
        let old = postcard::to_allocvec(&Old {
            epoch: 4,
            recent: recent.clone(),
        })
        .expect("encode");
        let e = decode(&old).expect("old form");
        assert_eq!((e.epoch, &e.recent), (4, &recent));
        assert_eq!((e.last_timestamp, e.coordinator_epoch), (-1, -1));
        let new = after(Some(&e), &b(4, 3), 1, 13, 99);
        let back = decode(&postcard::to_allocvec(&new).expect("encode")).expect("new form");
        assert_eq!(back, new);
        assert_eq!((back.last_timestamp, back.recent.len()), (99, 2));
        assert!(decode(&[0xff]).is_none());
    }

    #[test]
    fn an_entry_stored_before_its_use_was_stored_still_reads() {
        let mut e = after(None, &b(2, 0), 3, 10, 77);
        e.coordinator_epoch = 5;
        let old =
            postcard::to_allocvec(&(e.epoch, &e.recent, e.last_timestamp, 5i32)).expect("encode");
        assert_eq!(decode(&old), Some(e.clone()), "read with used 0");
        e.used = 1 << 40;
        let stored = postcard::to_allocvec(&e).expect("encode");
        assert_eq!(decode(&stored), Some(e));
    }
}
