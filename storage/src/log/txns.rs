//! Transactions in a partition: which producers have a transaction open
//! (and from which offset: the least of them is the last stable offset, past
//! which committed readers do not go), and which transactions were aborted
//! (their records are never read by committed readers).
//!
//! - The committer opens a producer's transaction with its first
//!   transactional batch in the partition and closes it with a marker
//!   (`Log::write_marker`); both write their metadata in the same cycle as
//!   the batch, before it (the engine recovers a prefix of its writes, so a
//!   recovered batch always has its entry; an entry past the recovered end
//!   is removed at recovery).
//! - A transaction counts as open for readers until its marker is durable
//!   (the partition's durable end has passed it): committed records become
//!   readable only once their commit cannot be lost.
//! - Open transactions are held in memory (one entry per producer with a
//!   transaction open in the partition: bounded by the transactional ids
//!   the coordinator keeps). Aborted ones are looked up in the metadata
//!   (one ordered lookup per transactional batch read), so their number
//!   costs disk, not memory; they are removed once retention has removed
//!   their marker, or a compaction pass the records themselves.
//! - Metadata: [`OPEN`] (`topic NUL partition producer first` → epoch) and
//!   [`ABORTED`] (`topic NUL partition producer marker` → first offset).

use std::collections::BTreeMap;

use crate::batch::decode_header;
use crate::error::Result;
use crate::store::{PartitionStore, Store};

/// Metadata space of open transactions.
pub(super) const OPEN: &str = "__txn_open";
/// Metadata space of aborted transactions.
pub(super) const ABORTED: &str = "__txn_aborted";

/// One transaction of a producer in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Txn {
    pub(super) epoch: i16,
    /// The offset of its marker, once written (durable when the partition's
    /// end has passed it).
    pub(super) closing: Option<u64>,
}

/// A partition's transactions.
#[derive(Debug, Default)]
pub(super) struct Txns {
    /// (producer, first offset) → its transaction.
    pub(super) open: BTreeMap<(i64, u64), Txn>,
    /// How many aborted transactions the metadata holds for the partition
    /// (none: reads skip the lookup).
    pub(super) aborted: u64,
}

impl Txns {
    /// The first offset of `producer`'s transaction still open (no marker
    /// written yet), if any.
    pub(super) fn open_of(&self, producer: i64) -> Option<u64> {
        self.open
            .range((producer, 0)..=(producer, u64::MAX))
            .find(|(_, t)| t.closing.is_none())
            .map(|(&(_, first), _)| first)
    }

    /// The last stable offset given the durable `end`: the first offset of
    /// the oldest transaction whose marker is not durable, or `end`.
    pub(super) fn last_stable(&mut self, end: u64) -> u64 {
        // Transactions whose marker is durable are done.
        self.open
            .retain(|_, t| t.closing.is_none_or(|marker| marker >= end));
        self.open
            .keys()
            .map(|&(_, first)| first)
            .min()
            .unwrap_or(end)
            .min(end)
    }
}

/// One partition's aborted transactions, looked up in the metadata.
pub(super) struct Aborted<'a> {
    pub(super) store: &'a dyn Store,
    pub(super) topic: &'a str,
    pub(super) partition: u32,
}

impl Aborted<'_> {
    /// Is a transactional record of `producer` at `offset` in an aborted
    /// transaction whose marker is below `end`? `any`: the partition has
    /// aborted transactions at all ([`Txns::aborted`] > 0).
    pub(super) fn at(&self, any: bool, producer: i64, offset: u64, end: u64) -> Result<bool> {
        if !any {
            return Ok(false);
        }
        // The producer's first abort marker after `offset`: its transaction
        // holds `offset` when it began at or before it.
        let from = aborted_key(
            self.topic,
            self.partition,
            producer,
            offset.saturating_add(1),
        );
        let mut to = aborted_key(self.topic, self.partition, producer, u64::MAX);
        to.push(0);
        let found = self.store.meta_range(ABORTED, &from, &to, 1)?;
        Ok(found.first().is_some_and(|(k, v)| {
            let marker = parse(k).map(|(_, _, _, marker)| marker);
            let first = v
                .get(..8)
                .and_then(|f| f.try_into().ok())
                .map(u64::from_be_bytes);
            matches!((marker, first), (Some(m), Some(f)) if f <= offset && m < end)
        }))
    }

    /// Removes the aborted transactions whose marker is below `offset`
    /// (retention removed them, or a compaction pass their records);
    /// returns how many.
    pub(super) fn forget_below(&self, offset: u64) -> Result<u64> {
        let (from, to) = partition_range(self.topic, self.partition);
        let mut removed = 0;
        for (k, _) in self.store.meta_range(ABORTED, &from, &to, usize::MAX)? {
            if parse(&k).is_none_or(|(_, _, _, marker)| marker < offset) {
                self.store.put_meta(ABORTED, &k, None)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The key of an [`OPEN`] entry.
pub(super) fn open_key(topic: &str, partition: u32, producer: i64, first: u64) -> Vec<u8> {
    key(topic, partition, producer, first)
}

/// The key of an [`ABORTED`] entry.
pub(super) fn aborted_key(topic: &str, partition: u32, producer: i64, marker: u64) -> Vec<u8> {
    key(topic, partition, producer, marker)
}

fn key(topic: &str, partition: u32, producer: i64, offset: u64) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    // Ordered as unsigned (producer ids are never negative).
    k.extend_from_slice(&producer.to_be_bytes());
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The key range of one partition's entries (in either space).
fn partition_range(topic: &str, partition: u32) -> (Vec<u8>, Vec<u8>) {
    let mut from = topic.as_bytes().to_vec();
    from.push(0);
    from.extend_from_slice(&partition.to_be_bytes());
    let mut to = from.clone();
    to.extend_from_slice(&[0xFF; 17]);
    (from, to)
}

/// (topic, partition, producer, offset) of a key built by [`key`].
fn parse(k: &[u8]) -> Option<(String, u32, i64, u64)> {
    let nul = k.iter().position(|&b| b == 0)?;
    let (topic, rest) = k.split_at(nul);
    let rest = rest.get(1..)?;
    if rest.len() != 20 {
        return None;
    }
    Some((
        String::from_utf8(topic.to_vec()).ok()?,
        u32::from_be_bytes(rest[..4].try_into().ok()?),
        i64::from_be_bytes(rest[4..12].try_into().ok()?),
        u64::from_be_bytes(rest[12..20].try_into().ok()?),
    ))
}

/// A partition's transactions as stored, less what its recovered `end`
/// does not hold (a crash came between an entry and its batch: such
/// entries are removed).
pub(super) fn recover(
    store: &dyn Store,
    batches: &dyn PartitionStore,
    topic: &str,
    partition: u32,
    end: u64,
) -> Result<Txns> {
    let mut txns = Txns::default();
    let (from, to) = partition_range(topic, partition);
    for (k, v) in store.meta_range(OPEN, &from, &to, usize::MAX)? {
        match parse(&k) {
            // Its marker is in the log: the crash came before the entry's
            // removal, the marker's last write.
            Some((_, _, producer, first))
                if first < end && marker_after(batches, producer, first)? =>
            {
                store.put_meta(OPEN, &k, None)?;
            }
            Some((_, _, producer, first)) if first < end => {
                let epoch = v
                    .get(..2)
                    .and_then(|e| e.try_into().ok())
                    .map_or(0, i16::from_be_bytes);
                txns.open.insert(
                    (producer, first),
                    Txn {
                        epoch,
                        closing: None,
                    },
                );
            }
            _ => store.put_meta(OPEN, &k, None)?,
        }
    }
    for (k, _) in store.meta_range(ABORTED, &from, &to, usize::MAX)? {
        match parse(&k) {
            Some((_, _, _, marker)) if marker < end => txns.aborted += 1,
            _ => store.put_meta(ABORTED, &k, None)?,
        }
    }
    Ok(txns)
}

/// Is there a marker of `producer` in the partition at or after `first`?
/// Read at recovery only, for the transactions left open (few).
fn marker_after(batches: &dyn PartitionStore, producer: i64, first: u64) -> Result<bool> {
    let mut found = batches.read(first, 1 << 20)?;
    while let Some(&(last, _)) = found.last() {
        for (base, value) in &found {
            let Ok(h) = decode_header(value) else {
                continue;
            };
            if *base >= first
                && h.txn
                    .is_some_and(|t| t.control && t.producer_id == producer)
            {
                return Ok(true);
            }
        }
        found = batches.read_after(last, 1 << 20)?;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn the_last_stable_offset_waits_for_durable_markers_and_aborts_hide_their_records() {
        let mut t = Txns::default();
        t.open.insert(
            (7, 10),
            Txn {
                epoch: 0,
                closing: None,
            },
        );
        t.open.insert(
            (9, 12),
            Txn {
                epoch: 0,
                closing: None,
            },
        );
        assert_eq!(t.last_stable(20), 10);
        assert_eq!(t.open_of(7), Some(10));
        // 7's marker at 15, not yet durable at end 15, durable at 16.
        if let Some(x) = t.open.get_mut(&(7, 10)) {
            x.closing = Some(15);
        }
        assert_eq!(t.open_of(7), None);
        assert_eq!(t.last_stable(15), 10);
        assert_eq!(t.last_stable(16), 12);

        let store = MemStore::new();
        let put = |topic: &str, p: u32, producer: i64, marker: u64, first: u64| {
            store
                .put_meta(
                    ABORTED,
                    &aborted_key(topic, p, producer, marker),
                    Some(&first.to_be_bytes()),
                )
                .expect("put");
        };
        put("t", 0, 9, 30, 12);
        put("t", 0, 9, 50, 40);
        put("t", 1, 9, 20, 0);
        put("u", 0, 9, 20, 0);
        let a = Aborted {
            store: &store,
            topic: "t",
            partition: 0,
        };
        assert!(
            !a.at(false, 9, 13, 31).expect("at"),
            "none in the partition"
        );
        assert!(
            !a.at(true, 9, 13, 30).expect("at"),
            "marker not durable yet"
        );
        assert!(a.at(true, 9, 13, 31).expect("at"));
        assert!(a.at(true, 9, 12, 31).expect("at"), "its first record");
        assert!(
            !a.at(true, 9, 11, 31).expect("at"),
            "before the transaction"
        );
        assert!(!a.at(true, 9, 31, 40).expect("at"), "between two");
        assert!(a.at(true, 9, 45, 51).expect("at"), "the second");
        assert!(!a.at(true, 9, 51, 60).expect("at"), "after the last");
        assert!(!a.at(true, 7, 13, 31).expect("at"), "another producer");
        assert!(!a.at(true, 8, 13, 31).expect("at"), "a producer below");
        assert_eq!(a.forget_below(31).expect("forget"), 1);
        assert!(!a.at(true, 9, 13, 31).expect("at"), "forgotten");
        assert!(a.at(true, 9, 45, 51).expect("at"), "kept");
        let r =
            recover(&store, &*store.partition("t", 0).expect("p"), "t", 0, 45).expect("recover");
        assert_eq!(r.aborted, 0, "its marker is past the recovered end");
        assert!(!a.at(true, 9, 45, 51).expect("at"), "removed at recovery");
        let r =
            recover(&store, &*store.partition("t", 1).expect("p"), "t", 1, 45).expect("recover");
        assert_eq!(r.aborted, 1, "another partition untouched");
        let k = aborted_key("t\u{e9}", 3, 9, 30);
        assert_eq!(parse(&k), Some(("t\u{e9}".to_owned(), 3, 9, 30)));
    }
}
