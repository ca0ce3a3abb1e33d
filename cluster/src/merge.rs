//! Small writes merged into one Raft entry.
//!
//! openraft 0.9 appends each entry a leader proposes by itself, and our
//! log store syncs every append before openraft goes on: a leader taking
//! many small writes (HTTP requests, MQTT publishes) spent its time in one
//! sync per write, one after the other, while its CPU was two thirds idle.
//! The proposer therefore hands over at most [`IN_FLIGHT`] entries of
//! small writes at a time, and the writes that queue up meanwhile go in the
//! next entry together: appends to the same topic, without a producer or a
//! transaction, in their order, become one [`Op::Append`] whose parts hold
//! each write's records after the ones before it. Its outcome is split
//! back: each write learns its own first offsets.
//!
//! Merging keeps what the log's replicated apply relies on: one op per
//! partition per entry (the partition's mark then never covers part of an
//! entry), and each partition's records in the order they were queued.
//! Any other op (an edge's guarded batch, a producer's, a topic change, an
//! offset commit) is an entry of its own, in its place in the order.

use tributary_storage::batch::BatchBuilder;
use tributary_storage::{Applied, Error, Op, OpPart};

/// Entries of mergeable writes the proposer has handed over and not yet
/// seen answered: what queues behind them is merged. Two keep one entry
/// being synced while the next one waits in Raft's queue; more gave less
/// throughput here (smaller entries), and so did one.
pub const IN_FLIGHT: usize = 2;

/// Bytes of records one merged entry carries at most: each partition's
/// records of an entry are one stored batch, and this keeps it under
/// sled's blob size (a quarter of its default 1 MiB segment), over which a
/// value is a file of its own. More gave no more throughput here.
pub const MERGE_BYTES: usize = 192 * 1024;

/// Writes one merged entry carries at most.
pub const MERGE_WRITES: usize = 1024;

/// One write's parts in a merged op: for each, the merged part it went to
/// and how many records are before it there.
type Share = Vec<(usize, u64)>;

/// An op being built from one write or several.
#[derive(Debug)]
pub struct Merged {
    op: Op,
    /// `op.weight()`, kept as writes come in rather than walked again.
    weight: usize,
    /// `None`: one write, its op as it came.
    shares: Option<Vec<Share>>,
}

/// Splits a merged op's outcome into its writes' outcomes.
#[derive(Debug)]
pub struct Split(Option<Vec<Share>>);

type Outcome = Result<(Applied, u64), Error>;

/// Whether `op` can share an entry with others.
pub fn mergeable(op: &Op) -> bool {
    matches!(
        op,
        Op::Append {
            producer: None,
            transactional: false,
            ..
        }
    )
}

impl Merged {
    /// Starts with one write.
    pub fn new(op: Op) -> Merged {
        Merged {
            weight: op.weight(),
            op,
            shares: None,
        }
    }

    /// Writes in it.
    pub fn writes(&self) -> usize {
        self.shares.as_ref().map_or(1, Vec::len)
    }

    /// Takes `op` in after the writes it holds, or gives it back if it
    /// cannot go in the same entry.
    pub fn absorb(&mut self, op: Op) -> Result<(), Op> {
        if !mergeable(&self.op)
            || !mergeable(&op)
            || self.writes() >= MERGE_WRITES
            || self.weight + op.weight() > MERGE_BYTES
        {
            return Err(op);
        }
        let first_share =
            |parts: &[OpPart]| -> Share { (0..parts.len()).map(|i| (i, 0)).collect() };
        let (
            Op::Append {
                topic, parts: into, ..
            },
            Op::Append {
                topic: other,
                parts,
                ..
            },
        ) = (&mut self.op, &op)
        else {
            return Err(op);
        };
        if topic != other {
            return Err(op);
        }
        // Each partition's count after the write, checked before anything
        // changes.
        let mut after: Vec<(u32, u64)> = into
            .iter()
            .map(|p| (p.partition, u64::from(p.count)))
            .collect();
        for part in parts {
            match after.iter_mut().find(|(p, _)| *p == part.partition) {
                Some((_, n)) => *n += u64::from(part.count),
                None => after.push((part.partition, u64::from(part.count))),
            }
        }
        if after.iter().any(|(_, n)| u32::try_from(*n).is_err()) {
            return Err(op);
        }
        let shares = self.shares.get_or_insert_with(|| vec![first_share(into)]);
        let Op::Append { parts, .. } = op else {
            return Ok(());
        };
        let mut share = Share::with_capacity(parts.len());
        for part in parts {
            self.weight += part.chunks.iter().map(BatchBuilder::len).sum::<usize>();
            let at = match into.iter().position(|p| p.partition == part.partition) {
                Some(at) => at,
                None => {
                    into.push(OpPart {
                        partition: part.partition,
                        count: 0,
                        chunks: Vec::new(),
                    });
                    into.len() - 1
                }
            };
            let merged = &mut into[at];
            share.push((at, u64::from(merged.count)));
            merged.count += part.count;
            merged.chunks.extend(part.chunks);
        }
        shares.push(share);
        Ok(())
    }

    /// The op to propose, and how to split its outcome.
    pub fn finish(self) -> (Op, Split) {
        (self.op, Split(self.shares))
    }
}

impl Split {
    /// Each write's outcome, in the order the writes were taken in.
    pub fn split(self, outcome: Outcome) -> Vec<Outcome> {
        let Some(shares) = self.0 else {
            return vec![outcome];
        };
        match outcome {
            Ok((Applied::Appended { firsts, written }, index)) => shares
                .into_iter()
                .map(|share| {
                    let mine: Option<Vec<u64>> = share
                        .iter()
                        .map(|&(at, before)| firsts.get(at).map(|f| f + before))
                        .collect();
                    match mine {
                        Some(firsts) => Ok((Applied::Appended { firsts, written }, index)),
                        None => Err(Error::Unwritable(format!(
                            "a merged append was answered {} first offsets",
                            firsts.len()
                        ))),
                    }
                })
                .collect(),
            Ok((other, index)) => shares.iter().map(|_| Ok((other.clone(), index))).collect(),
            Err(e) => shares.iter().map(|_| Err(copy(&e))).collect(),
        }
    }
}

/// The same error again (the storage crate's errors are not `Clone`, but
/// they travel between nodes encoded).
fn copy(e: &Error) -> Error {
    postcard::to_allocvec(e)
        .ok()
        .and_then(|b| postcard::from_bytes(&b).ok())
        .unwrap_or_else(|| Error::Unwritable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_storage::{Event, ProducerBatch};

    fn part(partition: u32, values: &[&str]) -> OpPart {
        let mut b = BatchBuilder::with_capacity(64);
        for v in values {
            b.push(&Event::new(v.as_bytes().to_vec()), 0);
        }
        OpPart {
            partition,
            count: values.len() as u32,
            chunks: vec![b],
        }
    }

    fn append(topic: &str, parts: Vec<OpPart>) -> Op {
        Op::Append {
            topic: topic.into(),
            parts,
            producer: None,
            transactional: false,
        }
    }

    #[test]
    fn appends_to_one_topic_become_one_and_each_learns_its_offsets() {
        let mut m = Merged::new(append("t", vec![part(0, &["a", "b"]), part(1, &["c"])]));
        m.absorb(append("t", vec![part(1, &["d", "e"])])).unwrap();
        m.absorb(append("t", vec![part(2, &["f"]), part(0, &["g"])]))
            .unwrap();
        assert_eq!(m.writes(), 3);
        assert_eq!(m.weight, m.op.weight(), "the kept weight is the op's");
        let (op, split) = m.finish();
        let Op::Append { parts, .. } = &op else {
            panic!("{op:?}")
        };
        let counts: Vec<(u32, u32, usize)> = parts
            .iter()
            .map(|p| (p.partition, p.count, p.chunks.len()))
            .collect();
        assert_eq!(counts, vec![(0, 3, 2), (1, 3, 2), (2, 1, 1)]);
        // Applied: partition 0 from 10, 1 from 20, 2 from 30.
        let outcome = Ok((
            Applied::Appended {
                firsts: vec![10, 20, 30],
                written: true,
            },
            7,
        ));
        let firsts: Vec<Vec<u64>> = split
            .split(outcome)
            .into_iter()
            .map(|o| match o {
                Ok((Applied::Appended { firsts, .. }, 7)) => firsts,
                o => panic!("{o:?}"),
            })
            .collect();
        assert_eq!(firsts, vec![vec![10, 20], vec![21], vec![30, 12]]);
    }

    #[test]
    fn other_ops_and_other_topics_are_not_merged() {
        let producer = Op::Append {
            topic: "t".into(),
            parts: vec![part(0, &["p"])],
            producer: Some(ProducerBatch {
                producer_id: 1,
                epoch: 0,
                first_sequence: 0,
            }),
            transactional: false,
        };
        let mut m = Merged::new(append("t", vec![part(0, &["a"])]));
        assert!(m.absorb(append("u", vec![part(0, &["b"])])).is_err());
        assert!(m.absorb(producer.clone()).is_err());
        assert!(m.absorb(Op::DeleteTopic("t".into())).is_err());
        let mut p = Merged::new(producer);
        assert!(p.absorb(append("t", vec![part(0, &["c"])])).is_err());
        assert_eq!(m.writes(), 1);
        // One write: its op and its outcome as they were.
        let (op, split) = m.finish();
        assert!(matches!(&op, Op::Append { parts, .. } if parts.len() == 1 && parts[0].count == 1));
        let out = split.split(Err(Error::UnknownTopic("t".into())));
        assert!(matches!(&out[..], [Err(Error::UnknownTopic(t))] if t == "t"));
    }

    #[test]
    fn a_merged_entry_stays_within_its_budget_and_shares_a_failure() {
        let big = "x".repeat(50_000);
        let one = append("t", vec![part(0, &[&big])]).weight();
        let mut m = Merged::new(append("t", vec![part(0, &[&big])]));
        let mut taken = 1;
        while m.absorb(append("t", vec![part(0, &[&big])])).is_ok() {
            taken += 1;
        }
        // As many as fit, and no more.
        assert!(taken > 1);
        assert_eq!(m.weight, m.op.weight(), "the kept weight is the op's");
        assert!(m.op.weight() <= MERGE_BYTES);
        assert!(m.op.weight() + one > MERGE_BYTES);
        let (_, split) = m.finish();
        let out = split.split(Err(Error::UnknownPartition {
            topic: "t".into(),
            partition: 0,
            partitions: 0,
        }));
        assert_eq!(out.len(), taken);
        assert!(out
            .iter()
            .all(|o| matches!(o, Err(Error::UnknownPartition { partition: 0, .. }))));
    }
}
