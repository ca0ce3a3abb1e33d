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
//!   is dropped at recovery).
//! - A transaction counts as open for readers until its marker is durable
//!   (the partition's durable end has passed it): committed records become
//!   readable only once their commit cannot be lost.
//! - Metadata: [`OPEN`] (`topic NUL partition producer first` → epoch) and
//!   [`ABORTED`] (`topic NUL partition marker producer` → first offset).

use std::collections::BTreeMap;

use crate::error::Result;
use crate::store::Store;

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
    /// (producer, marker offset) → first offset, of aborted transactions.
    pub(super) aborted: BTreeMap<(i64, u64), u64>,
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

    /// Is a transactional record of `producer` at `offset` in an aborted
    /// transaction whose marker is below `end`?
    pub(super) fn aborted_at(&self, producer: i64, offset: u64, end: u64) -> bool {
        self.aborted
            .range((producer, offset + 1)..=(producer, u64::MAX))
            .next()
            .is_some_and(|(&(_, marker), &first)| first <= offset && marker < end)
    }
}

/// The key of an [`OPEN`] entry.
pub(super) fn open_key(topic: &str, partition: u32, producer: i64, first: u64) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&producer.to_be_bytes());
    k.extend_from_slice(&first.to_be_bytes());
    k
}

/// The key of an [`ABORTED`] entry.
pub(super) fn aborted_key(topic: &str, partition: u32, marker: u64, producer: i64) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&marker.to_be_bytes());
    k.extend_from_slice(&producer.to_be_bytes());
    k
}

/// (topic, partition, a, b) of a key built by [`open_key`] or [`aborted_key`].
fn parse(k: &[u8]) -> Option<(String, u32, u64, u64)> {
    let nul = k.iter().position(|&b| b == 0)?;
    let (topic, rest) = k.split_at(nul);
    let rest = rest.get(1..)?;
    if rest.len() != 20 {
        return None;
    }
    Some((
        String::from_utf8(topic.to_vec()).ok()?,
        u32::from_be_bytes(rest[..4].try_into().ok()?),
        u64::from_be_bytes(rest[4..12].try_into().ok()?),
        u64::from_be_bytes(rest[12..20].try_into().ok()?),
    ))
}

/// A partition's transactions as stored, less what its recovered `end`
/// does not hold (a crash came between an entry and its batch).
pub(super) fn recover(store: &dyn Store, topic: &str, partition: u32, end: u64) -> Result<Txns> {
    let mut txns = Txns::default();
    for (k, v) in store.meta(OPEN)? {
        let Some((t, p, producer, first)) = parse(&k) else {
            continue;
        };
        if t == topic && p == partition && first < end {
            let epoch = v
                .get(..2)
                .and_then(|e| e.try_into().ok())
                .map_or(0, i16::from_be_bytes);
            txns.open.insert(
                (producer as i64, first),
                Txn {
                    epoch,
                    closing: None,
                },
            );
        }
    }
    for (k, v) in store.meta(ABORTED)? {
        let Some((t, p, marker, producer)) = parse(&k) else {
            continue;
        };
        let first = v
            .get(..8)
            .and_then(|f| f.try_into().ok())
            .map(u64::from_be_bytes);
        if let (true, Some(first)) = (t == topic && p == partition && marker < end, first) {
            txns.aborted.insert((producer as i64, marker), first);
        }
    }
    Ok(txns)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        t.aborted.insert((9, 30), 12);
        assert!(!t.aborted_at(9, 13, 30), "marker not durable yet");
        assert!(t.aborted_at(9, 13, 31));
        assert!(!t.aborted_at(9, 11, 31), "before the transaction");
        assert!(!t.aborted_at(9, 31, 40), "after its marker");
        assert!(!t.aborted_at(7, 13, 31), "another producer");
        let k = aborted_key("t\u{e9}", 3, 30, 9);
        assert_eq!(parse(&k), Some(("t\u{e9}".to_owned(), 3, 30, 9)));
    }
}
