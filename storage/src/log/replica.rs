//! The log under a replicated log (a core cluster): every write becomes an
//! [`Op`], handed to a [`Replicator`], and each node applies the ops in the
//! replicated log's order with [`Log::apply_all`], so that every node holds
//! the same records at the same offsets.
//!
//! - **The write path stays one.** [`Log::append`], markers, offset commits,
//!   metadata and topic changes build the same thing they queue for the
//!   committer; with a replicator set ([`Log::replicate_with`]) they hand it
//!   over as an [`Op`] instead, and answer with what applying it gave on this
//!   node. Events are encoded (timestamps given) where they were produced, so
//!   applying an op is deterministic: offsets follow from the order alone, a
//!   marker carries its time.
//! - **Applying again is harmless.** After a crash a node applies the ops
//!   after the last index it recorded as applied, some of which its disk may
//!   hold already (the engine keeps a prefix of its writes). Each stored
//!   batch of an applied op carries, in the same atomic write, the partition's
//!   *mark*: the index of the last op whose records in the partition are all
//!   stored (an op's records in one partition go into one stored batch, so a
//!   mark never covers part of them). An op whose partition's mark is at or
//!   past its index is not written again. Everything else an op writes is
//!   idempotent (offset commits and metadata are puts; a producer's state
//!   entry ahead of its batch is dropped at recovery, as for a single node; a
//!   topic created, changed or deleted is checked by name and config;
//!   records deleted again move no start), given that the applier records
//!   its index right after each topic op and each deletion of records (see
//!   [`Op::ends_group`]).
//! - Stored batch boundaries may differ between nodes (a node packs the ops it
//!   applies in one write cycle together); records and offsets do not.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::committer::{Appended, Command, Part};
use super::{GroupOffset, Log, MetaEntry, ProducerBatch};
use crate::batch::{BatchBuilder, Marker, HEADER_LEN};
use crate::error::{Error, Result};
use crate::topic::TopicConfig;

/// One write, as the replicated log carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Records for one topic, encoded, by partition.
    Append {
        /// The topic (it exists when the op is applied: creating it is an
        /// op before this one).
        topic: String,
        /// Each partition's records.
        parts: Vec<OpPart>,
        /// An idempotent producer's batch (one part).
        producer: Option<ProducerBatch>,
        /// Of its producer's open transaction.
        transactional: bool,
    },
    /// A transaction marker.
    Marker {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The producer whose transaction it closes.
        producer_id: i64,
        /// Its epoch.
        epoch: i16,
        /// Commit or abort.
        marker: Marker,
        /// The coordinator's epoch.
        coordinator_epoch: i32,
        /// The marker's time (ms).
        written_at: i64,
    },
    /// A consumer group's positions.
    Commit {
        /// Group.
        group: String,
        /// Positions.
        offsets: Vec<GroupOffset>,
        /// Each position's commit metadata (empty: none for any).
        metadata: Vec<String>,
    },
    /// A group's positions removed (all, or these partitions').
    ForgetGroup {
        /// Group.
        group: String,
        /// `None`: every position of the group.
        partitions: Option<Vec<(String, u32)>>,
    },
    /// Metadata written or removed.
    Meta {
        /// Its space.
        space: String,
        /// Keys and values (`None`: removed).
        entries: Vec<MetaEntry>,
    },
    /// A topic created.
    CreateTopic(TopicConfig),
    /// A topic's settings replaced by these (partitions only grow).
    AlterTopic(TopicConfig),
    /// A topic deleted.
    DeleteTopic(String),
    /// A block of idempotent producer ids reserved: `count` ids from where
    /// the last block ended.
    ReserveProducerIds {
        /// Ids in the block.
        count: i64,
    },
    /// A metadata value written unless the key has one: every node ends up
    /// with the first value written (a key generated once for the cluster).
    PutIfAbsent {
        /// Its space.
        space: String,
        /// Key.
        key: Vec<u8>,
        /// Value, unless there is one.
        value: Vec<u8>,
    },
    /// A claim taken: the metadata value that [`Op::Guarded`] ops check.
    Claim(Guard),
    /// An append, a metadata write or a change to a group's positions
    /// applied only if, when its turn comes
    /// in the log's order, its guard's claim still holds; otherwise it is
    /// answered [`Error::Superseded`] and writes nothing.
    Guarded {
        /// The claim it was made under.
        guard: Guard,
        /// The op ([`Op::Append`], [`Op::Meta`], [`Op::Commit`] or
        /// [`Op::ForgetGroup`]).
        op: Box<Op>,
    },
    /// A partition's records below an offset deleted (Kafka's
    /// DeleteRecords): [`Log::delete_records`].
    DeleteRecords {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The new start (`None`: the end).
        before: Option<u64>,
    },
}

/// A claim on something only one writer may write at a time (an edge's
/// streams at the core): a metadata value that the writer sets with
/// [`Log::claim`] and its writes carry. A write whose claim was replaced
/// by another writer's is not written, wherever in a cluster it was made:
/// the check is made as the write is applied, in the log's one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// The metadata space.
    pub space: String,
    /// The key.
    pub key: Vec<u8>,
    /// The value this writer set.
    pub value: Vec<u8>,
}

/// `op` under `guard`, if any.
pub(super) fn guarded(op: Op, guard: Option<&Guard>) -> Op {
    match guard {
        Some(g) => Op::Guarded {
            guard: g.clone(),
            op: Box::new(op),
        },
        None => op,
    }
}

impl Op {
    /// Creates, changes or deletes a topic: the applier records its index
    /// as applied right after it, before applying the next op (applying such
    /// an op again is safe only against the state it left).
    pub fn is_topic_change(&self) -> bool {
        matches!(
            self,
            Op::CreateTopic(_) | Op::AlterTopic(_) | Op::DeleteTopic(_)
        )
    }

    /// The applier records its index as applied right after it, before
    /// applying the next op: applying it again is safe only against the
    /// state it left. A topic change, and records deleted: DeleteRecords
    /// reads the partition's end (`None` means it, and an offset past it is
    /// refused), which the ops after it move.
    pub fn ends_group(&self) -> bool {
        self.is_topic_change() || matches!(self, Op::DeleteRecords { .. })
    }

    /// About how many bytes it adds to a log (its records, or its
    /// metadata; a small constant for the rest): what a cluster counts to
    /// decide when to take a snapshot.
    pub fn weight(&self) -> usize {
        const SMALL: usize = 64;
        match self {
            Op::Append { parts, .. } => {
                SMALL
                    + parts
                        .iter()
                        .flat_map(|p| &p.chunks)
                        .map(BatchBuilder::len)
                        .sum::<usize>()
            }
            Op::Meta { entries, .. } => {
                SMALL
                    + entries
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                        .sum::<usize>()
            }
            Op::PutIfAbsent { key, value, .. } => SMALL + key.len() + value.len(),
            Op::Guarded { op, .. } => op.weight(),
            _ => SMALL,
        }
    }

    /// Applied alone, after the ops before it are written (it reads what
    /// they wrote).
    fn is_serial(&self) -> bool {
        self.is_topic_change()
            || matches!(
                self,
                Op::ReserveProducerIds { .. }
                    | Op::PutIfAbsent { .. }
                    | Op::Claim(_)
                    | Op::DeleteRecords { .. }
            )
    }
}

/// One partition's records in an [`Op::Append`]: encoded record chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpPart {
    /// Partition.
    pub partition: u32,
    /// Records in `chunks`.
    pub count: u32,
    /// The records, in chunks as the producer's side encoded them.
    pub chunks: Vec<BatchBuilder>,
}

/// What applying an [`Op`] gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// An append: each part's first offset; `written: false` for an
    /// idempotent producer's duplicate.
    Appended {
        /// First offset of each part, in the op's order.
        firsts: Vec<u64>,
        /// Stored now (not a duplicate).
        written: bool,
    },
    /// A marker: its offset, or `None` (no transaction open there).
    Marker(Option<u64>),
    /// Producer ids reserved: the block's first.
    Reserved(i64),
    /// The value a key holds.
    Value(Vec<u8>),
    /// Anything else.
    Done,
    /// Records deleted: the partition's start now.
    Start(u64),
}

/// An op handed over and waiting to be applied here.
pub type Pending = Pin<Box<dyn Future<Output = Result<Applied>> + Send>>;

/// The replicated log a [`Log`] hands its writes to.
pub trait Replicator: Send + Sync + 'static {
    /// Hands `op` over. Resolves once it is queued (ops queued one after the
    /// other are applied in that order), with what resolves once it is
    /// applied on this node: the outcome there, after a majority of the
    /// cluster holds it durably.
    fn submit(&self, op: Op) -> Pin<Box<dyn Future<Output = Result<Pending>> + Send + '_>>;

    /// Who leads the replicated log, as this node knows it, updated as it
    /// changes (`None`: the replicator has no leader, such as a test's).
    fn leadership(&self) -> Option<watch::Receiver<Leadership>> {
        None
    }
}

/// Who leads a replicated log, as one node knows it: what the parts that
/// must run in one place of a cluster (Kafka's coordinators) follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leadership {
    /// This node's id.
    pub node: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// The term that leader leads (each election starts a new one).
    pub term: u64,
    /// The voters.
    pub voters: Vec<u64>,
    /// This node leads but has heard from no majority for longer than an
    /// election takes: cut off, another node may lead by now (it learns
    /// of the new term only once it hears from the others again).
    pub cut_off: bool,
}

impl Leadership {
    /// Whether this node is the leader.
    pub fn leads(&self) -> bool {
        self.leader == Some(self.node)
    }
}

impl From<Part> for OpPart {
    fn from(p: Part) -> OpPart {
        OpPart {
            partition: p.partition,
            count: p.count,
            chunks: p.chunks,
        }
    }
}

impl Log {
    /// From now on, hands every write to `replicator` instead of writing it
    /// here (the cluster applies it on every node, this one included, with
    /// [`Log::apply_all`]). Set once, before the node serves anyone.
    pub fn replicate_with(&self, replicator: Arc<dyn Replicator>) -> Result<()> {
        self.inner
            .replicator
            .set(replicator)
            .map_err(|_| Error::Config("the log has a replicator already".into()))
    }

    /// Whether writes go through a replicated log (a cluster node).
    pub fn is_replicated(&self) -> bool {
        self.replicator().is_some()
    }

    /// Who leads the replicated log, following its changes (`None` on a
    /// single node: it does everything itself).
    pub fn leadership(&self) -> Option<watch::Receiver<Leadership>> {
        self.replicator().and_then(|r| r.leadership())
    }

    /// This node's id in its cluster (0 on a single node).
    pub fn node_id(&self) -> u64 {
        self.leadership().map_or(0, |l| l.borrow().node)
    }

    pub(super) fn replicator(&self) -> Option<&Arc<dyn Replicator>> {
        self.inner.replicator.get()
    }

    /// Hands `op` to the replicator and waits for its outcome here.
    pub(super) async fn replicate(&self, r: &Arc<dyn Replicator>, op: Op) -> Result<Applied> {
        r.submit(op).await?.await
    }

    /// Applies entries of the replicated log, in order: `(index, op)` with
    /// rising indexes. Ops are queued for the committer one after the other
    /// and share its write cycles; a topic change waits for the ops before
    /// it. Answers each op's outcome, in order. An op applied before (its
    /// index at or below the partition's mark) is not written again; its
    /// answer is then [`Error::Closed`] (nobody waits for it).
    pub async fn apply_all(&self, entries: Vec<(u64, Op)>) -> Vec<Result<Applied>> {
        let mut out: Vec<Result<Applied>> = Vec::with_capacity(entries.len());
        let mut waiting: Vec<(usize, Waiting)> = Vec::new();
        for (index, op) in entries {
            let op = match op {
                // Claims change only in serial ops, all applied before this
                // point: the check sees the claim in the log's order.
                Op::Guarded { guard, op } => match self.check_guard(&guard) {
                    Ok(())
                        if matches!(
                            *op,
                            Op::Append { .. }
                                | Op::Meta { .. }
                                | Op::Commit { .. }
                                | Op::ForgetGroup { .. }
                        ) =>
                    {
                        *op
                    }
                    Ok(()) => {
                        out.push(Err(Error::Config(
                            "only appends, metadata and group positions are guarded".into(),
                        )));
                        continue;
                    }
                    Err(e) => {
                        out.push(Err(e));
                        continue;
                    }
                },
                op => op,
            };
            if op.is_serial() {
                for (at, w) in waiting.drain(..) {
                    out[at] = w.outcome().await;
                }
                out.push(self.apply_serial(index, op).await);
                continue;
            }
            out.push(Err(Error::Closed));
            match self.queue_applied(index, op).await {
                Ok(w) => waiting.push((out.len() - 1, w)),
                Err(e) => {
                    if let Some(last) = out.last_mut() {
                        *last = Err(e);
                    }
                }
            }
        }
        for (at, w) in waiting {
            out[at] = w.outcome().await;
        }
        out
    }

    async fn apply_serial(&self, index: u64, op: Op) -> Result<Applied> {
        match op {
            Op::PutIfAbsent { space, key, value } => self
                .put_if_absent_here(&space, key, value)
                .await
                .map(Applied::Value),
            Op::Claim(g) => self.claim_here(g).await.map(|()| Applied::Done),
            Op::ReserveProducerIds { count } => {
                // The block end and the index of the op that set it, in one
                // value: applied again after a crash, the op finds its own
                // index and answers the block it gave.
                let stored = self
                    .shared()
                    .store
                    .get_meta(super::producers::ID_SPACE, b"next")?;
                let (end, by) = super::producers::id_block(stored.as_deref());
                if by.is_some_and(|by| by >= index) {
                    return Ok(Applied::Reserved(end - count));
                }
                let from = end;
                let mut value = from.saturating_add(count).to_be_bytes().to_vec();
                value.extend_from_slice(&index.to_be_bytes());
                let (reply, answer) = oneshot::channel();
                let cmd = Command::Meta {
                    space: super::producers::ID_SPACE.to_owned(),
                    entries: vec![(b"next".to_vec(), Some(value))],
                    reply,
                };
                self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
                answer.await.map_err(|_| Error::Closed)??;
                Ok(Applied::Reserved(from))
            }
            Op::CreateTopic(config) => self.create_topic_here(config).await.map(|_| Applied::Done),
            Op::AlterTopic(config) => {
                let name = config.name.clone();
                self.alter_topic_here(&name, |old| {
                    if config.partitions < old.partitions {
                        return Err(Error::InvalidTopic(format!(
                            "partitions can only be added ({} now)",
                            old.partitions
                        )));
                    }
                    config.validate()?;
                    Ok(config.clone())
                })
                .await
                .map(|_| Applied::Done)
            }
            Op::DeleteTopic(name) => self.delete_topic_here(&name).await.map(|_| Applied::Done),
            Op::DeleteRecords {
                topic,
                partition,
                before,
            } => self
                .delete_records_here(&topic, partition, before)
                .await
                .map(Applied::Start),
            _ => Err(Error::Config("not an op applied alone".into())),
        }
    }

    /// Takes `guard`'s claim: sets its value, so that writes made under an
    /// earlier claim of the same key are no longer written (in a cluster,
    /// those applied after this one, whichever node they came from).
    /// Resolves once applied here: what this node reads then includes every
    /// write ordered before the claim.
    pub async fn claim(&self, guard: &Guard) -> Result<()> {
        super::validate_group(&guard.space)?;
        self.shared().check_writable()?;
        let Some(r) = self.replicator() else {
            return self.claim_here(guard.clone()).await;
        };
        self.replicate(r, Op::Claim(guard.clone())).await.map(drop)
    }

    async fn claim_here(&self, g: Guard) -> Result<()> {
        // Seen at once by every write checked after this point (writes
        // already queued were checked before it); durable with the command.
        self.shared()
            .store
            .put_meta(&g.space, &g.key, Some(&g.value))?;
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Meta {
            space: g.space,
            entries: vec![(g.key, Some(g.value))],
            reply,
        };
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Whether `g`'s claim holds.
    pub(super) fn check_guard(&self, g: &Guard) -> Result<()> {
        match self.shared().store.get_meta(&g.space, &g.key)? {
            Some(v) if v == g.value => Ok(()),
            _ => Err(Error::Superseded(format!(
                "another writer claimed {} in {} since",
                String::from_utf8_lossy(&g.key),
                g.space
            ))),
        }
    }

    /// Writes `value` under `key` unless it has one; answers the value it
    /// holds then. In a cluster every node gets the first value written.
    pub async fn put_meta_if_absent(
        &self,
        space: &str,
        key: &[u8],
        value: Vec<u8>,
    ) -> Result<Vec<u8>> {
        super::validate_group(space)?;
        let Some(r) = self.replicator() else {
            return self.put_if_absent_here(space, key.to_vec(), value).await;
        };
        let op = Op::PutIfAbsent {
            space: space.to_owned(),
            key: key.to_vec(),
            value,
        };
        match self.replicate(r, op).await? {
            Applied::Value(v) => Ok(v),
            other => Err(Error::Unwritable(format!(
                "the replicated log answered {other:?}"
            ))),
        }
    }

    async fn put_if_absent_here(
        &self,
        space: &str,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<Vec<u8>> {
        if let Some(v) = self.shared().store.get_meta(space, &key)? {
            return Ok(v);
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Meta {
            space: space.to_owned(),
            entries: vec![(key, Some(value.clone()))],
            reply,
        };
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)??;
        Ok(value)
    }

    /// Queues an op (not a topic change) for the committer as entry `index`.
    async fn queue_applied(&self, index: u64, op: Op) -> Result<Waiting> {
        let cmd_and_waiting = match op {
            Op::Append {
                topic,
                parts,
                producer,
                transactional,
            } => {
                let t = self.existing(&topic)?;
                let mut bytes = 0usize;
                let mut events = 0u64;
                for p in &parts {
                    t.partition(p.partition)?;
                    let counted: u64 = p.chunks.iter().map(|c| u64::from(c.count())).sum();
                    if p.chunks
                        .iter()
                        .any(|c| c.len() < HEADER_LEN || c.count() == 0)
                        || counted != u64::from(p.count)
                    {
                        return Err(Error::BadBatch(format!(
                            "a replicated append to {topic}/{} is malformed",
                            p.partition
                        )));
                    }
                    bytes += p.chunks.iter().map(BatchBuilder::len).sum::<usize>();
                    events += counted;
                }
                let permits = bytes.clamp(1, self.shared().config.max_pending_bytes) as u32;
                let permit = self
                    .inner
                    .applying
                    .clone()
                    .acquire_many_owned(permits)
                    .await
                    .map_err(|_| Error::Closed)?;
                let (reply, answer) = oneshot::channel();
                let cmd = Command::Append {
                    topic: t.clone(),
                    parts: parts
                        .into_iter()
                        .map(|p| Part {
                            partition: p.partition,
                            count: p.count,
                            chunks: p.chunks,
                        })
                        .collect(),
                    bytes,
                    reply,
                    _permit: permit,
                    _reservation: None,
                    producer,
                    transactional,
                    applied: Some(index),
                };
                let counts = Counts {
                    log: self.clone(),
                    topic: t,
                    bytes: bytes as u64,
                    events,
                };
                (cmd, Waiting::Append(answer, counts))
            }
            Op::Marker {
                topic,
                partition,
                producer_id,
                epoch,
                marker,
                coordinator_epoch,
                written_at,
            } => {
                let t = self.existing(&topic)?;
                t.partition(partition)?;
                let (reply, answer) = oneshot::channel();
                let cmd = Command::Marker {
                    topic: t,
                    partition,
                    producer_id,
                    epoch,
                    marker,
                    coordinator_epoch,
                    written_at: Some(written_at),
                    applied: Some(index),
                    reply,
                };
                (cmd, Waiting::Marker(answer))
            }
            Op::Commit {
                group,
                offsets,
                metadata,
            } => {
                let (reply, answer) = oneshot::channel();
                let cmd = Command::Commit {
                    group,
                    offsets,
                    metadata,
                    reply,
                };
                (cmd, Waiting::Done(answer))
            }
            Op::ForgetGroup { group, partitions } => {
                let (reply, answer) = oneshot::channel();
                let cmd = Command::ForgetGroup {
                    group,
                    partitions,
                    reply,
                };
                (cmd, Waiting::Done(answer))
            }
            Op::Meta { space, entries } => {
                let (reply, answer) = oneshot::channel();
                let cmd = Command::Meta {
                    space,
                    entries,
                    reply,
                };
                (cmd, Waiting::Done(answer))
            }
            Op::CreateTopic(_)
            | Op::AlterTopic(_)
            | Op::DeleteTopic(_)
            | Op::ReserveProducerIds { .. }
            | Op::PutIfAbsent { .. }
            | Op::Claim(_)
            | Op::DeleteRecords { .. }
            | Op::Guarded { .. } => return Err(Error::Config("this op is applied alone".into())),
        };
        let (cmd, waiting) = cmd_and_waiting;
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        Ok(waiting)
    }
}

/// What an applied append adds to its topic's counters once written.
struct Counts {
    log: Log,
    topic: Arc<super::state::TopicState>,
    bytes: u64,
    events: u64,
}

/// An op queued for the committer, waiting for its answer.
enum Waiting {
    Append(oneshot::Receiver<Result<Appended>>, Counts),
    Marker(oneshot::Receiver<Result<Option<u64>>>),
    Done(oneshot::Receiver<Result<()>>),
}

impl Waiting {
    async fn outcome(self) -> Result<Applied> {
        match self {
            Waiting::Append(answer, c) => {
                let Appended { firsts, written } = answer.await.map_err(|_| Error::Closed)??;
                if written {
                    c.topic.live.bytes.fetch_add(c.bytes, Relaxed);
                    c.topic.live.events.fetch_add(c.events, Relaxed);
                    let stats = &c.log.shared().stats;
                    stats.append_bytes.fetch_add(c.bytes, Relaxed);
                }
                Ok(Applied::Appended { firsts, written })
            }
            Waiting::Marker(answer) => {
                Ok(Applied::Marker(answer.await.map_err(|_| Error::Closed)??))
            }
            Waiting::Done(answer) => {
                answer.await.map_err(|_| Error::Closed)??;
                Ok(Applied::Done)
            }
        }
    }
}
