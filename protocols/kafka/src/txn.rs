//! The transaction coordinator (Kafka's transaction protocol V1, as
//! librdkafka and the Java client without `transaction.version` 2 speak
//! it): transactional ids → producer id, epoch and the state of their
//! current transaction, durable in the log's metadata.
//!
//! - A transaction's state is written (and durable) before anything acts on
//!   it: `PrepareCommit`/`PrepareAbort` before its markers, `Complete*`
//!   after. At start, a transaction found prepared is completed (its commit
//!   was, or could have been, acknowledged: the markers are written again,
//!   which the log makes harmless), one found `Ongoing` is aborted with the
//!   epoch bumped (its producer is fenced, as a timeout fences it).
//! - Offsets committed in a transaction are kept with it and written as
//!   the group's offsets when it commits; an abort drops them.
//! - One lock serializes the coordinator: each request holds it while its
//!   state is written, as Kafka's coordinator handles one request of a
//!   transactional id at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_storage::util::now_ms;
use tributary_storage::{Error as LogError, GroupOffset, Guard, Log, Marker, TxnEvent};

/// Metadata space of the transactional ids.
const SPACE: &str = "__transactions";
/// Kafka's `transaction.max.timeout.ms` default.
pub(crate) const MAX_TIMEOUT_MS: i32 = 900_000;

/// Kafka's transaction states (`DescribeTransactions` spells them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum State {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
    PrepareEpochFence,
}

impl State {
    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::Ongoing => "Ongoing",
            State::PrepareCommit => "PrepareCommit",
            State::PrepareAbort => "PrepareAbort",
            State::CompleteCommit => "CompleteCommit",
            State::CompleteAbort => "CompleteAbort",
            State::PrepareEpochFence => "PrepareEpochFence",
        }
    }
}

/// One transactional id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Txn {
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    /// The epoch before the last bump (a retried InitProducerId gets the
    /// current one back); -1 after a fence.
    pub(crate) last_epoch: i16,
    pub(crate) state: State,
    pub(crate) timeout_ms: i32,
    /// When the current transaction began, or the last one (ms); -1 when
    /// none began since the producer was initialised.
    pub(crate) started_ms: i64,
    pub(crate) partitions: BTreeSet<(String, u32)>,
    pub(crate) groups: BTreeSet<String>,
    /// Offsets committed in the transaction: (group, topic, partition, offset).
    pub(crate) offsets: Vec<(String, String, u32, u64)>,
    /// Each offset's commit metadata, in the same order (empty: none).
    pub(crate) offset_metadata: Vec<String>,
}

/// A transactional id's state as stored before commit metadata was kept
/// (the same fields but the last): read, then carried on without metadata.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct TxnWithoutMetadata {
    producer_id: i64,
    epoch: i16,
    last_epoch: i16,
    state: State,
    timeout_ms: i32,
    started_ms: i64,
    partitions: BTreeSet<(String, u32)>,
    groups: BTreeSet<String>,
    offsets: Vec<(String, String, u32, u64)>,
}

impl Txn {
    /// A stored state, in this version's form or the one before it (an
    /// older one lacks the last field, so it never reads as this one).
    fn decode(bytes: &[u8]) -> Option<Txn> {
        if let Ok(t) = postcard::from_bytes::<Txn>(bytes) {
            return Some(t);
        }
        let t = postcard::from_bytes::<TxnWithoutMetadata>(bytes).ok()?;
        Some(Txn {
            offset_metadata: vec![String::new(); t.offsets.len()],
            producer_id: t.producer_id,
            epoch: t.epoch,
            last_epoch: t.last_epoch,
            state: t.state,
            timeout_ms: t.timeout_ms,
            started_ms: t.started_ms,
            partitions: t.partitions,
            groups: t.groups,
            offsets: t.offsets,
        })
    }

    fn clear_offsets(&mut self) {
        self.offsets.clear();
        self.offset_metadata.clear();
    }
}

/// Why a transactional request is refused (each is a Kafka error code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// CONCURRENT_TRANSACTIONS (51): a transaction is completing; retry.
    Concurrent,
    /// PRODUCER_FENCED (90) / INVALID_PRODUCER_EPOCH (47) on old versions.
    Fenced,
    /// INVALID_PRODUCER_ID_MAPPING (49).
    Mapping,
    /// INVALID_TXN_STATE (48).
    State,
    /// INVALID_TRANSACTION_TIMEOUT (50).
    Timeout,
    /// THROTTLING_QUOTA_EXCEEDED (89): `kafka.max_transactional_ids` are
    /// kept already; a new one waits until idle ones expire.
    TooMany,
    /// The log could not write (KAFKA_STORAGE_ERROR 56, retriable).
    Storage(String),
    /// NOT_COORDINATOR (16): on a cluster, the leader coordinates
    /// transactions, and this node is not it.
    NotCoordinator,
    /// COORDINATOR_NOT_AVAILABLE (15): a cluster without a leader now, or
    /// a coordinator still loading.
    NotAvailable,
}

impl From<LogError> for Refused {
    fn from(e: LogError) -> Self {
        match e {
            // Another leader's coordinator took over since.
            LogError::Superseded(_) => Refused::NotCoordinator,
            e => Refused::Storage(e.to_string()),
        }
    }
}

#[derive(Default)]
struct Table {
    txns: BTreeMap<String, Txn>,
    by_producer: HashMap<i64, String>,
    /// When each id was last used (ms; in memory: a restart starts every
    /// id's idle time again).
    used_ms: HashMap<String, i64>,
}

impl Table {
    fn touch(&mut self, id: &str) {
        let now = now_ms();
        match self.used_ms.get_mut(id) {
            Some(t) => *t = now,
            None => {
                self.used_ms.insert(id.to_owned(), now);
            }
        }
    }
}

/// The coordinator's bounds (`[kafka]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Transactional ids kept at most.
    pub(crate) max_ids: usize,
    /// An idle id is forgotten after this long (ms).
    pub(crate) expiration_ms: u64,
}

/// The node's transaction coordinator (on a cluster, the leader's, for one
/// term).
pub(crate) struct Coordinator {
    log: Log,
    limits: Limits,
    /// On a cluster: the claim every state write carries, taken when this
    /// coordinator started; a newer leader's coordinator replaces it, and
    /// this one's writes are refused from then on, wherever they were made.
    guard: Option<Guard>,
    /// The term it coordinates for (0 on a single node).
    pub(crate) term: u64,
    /// Set once another coordinator replaced it: its timer stops.
    retired: std::sync::atomic::AtomicBool,
    table: tokio::sync::Mutex<Table>,
    /// (group, topic, partition) of offsets open transactions hold, and
    /// how many hold each (OffsetFetch's `require_stable` reads it without
    /// waiting for the table).
    pending: std::sync::Mutex<HashMap<(String, String, u32), usize>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Loads the transactional ids, completes what a stop left prepared,
    /// aborts what it left open, and starts the timeout check.
    ///
    /// On a cluster (`claim`: this leader's claim, for `term`) it first
    /// takes the claim, so that it loads every state written before and the
    /// coordinator it replaces writes nothing after; transactions left
    /// open stay open (their producers go on with this coordinator) until
    /// they end or time out.
    pub(crate) async fn start(
        log: Log,
        limits: Limits,
        claim: Option<(Guard, u64)>,
    ) -> Result<Arc<Coordinator>, LogError> {
        let (guard, term) = match claim {
            Some((g, term)) => {
                log.claim(&g).await?;
                (Some(g), term)
            }
            None => (None, 0),
        };
        let takeover = guard.is_some();
        // Its offset commits too are made under the claim.
        let log = match &guard {
            Some(g) => log.guarded(g.clone()),
            None => log,
        };
        let mut table = Table::default();
        for (k, v) in log.meta(SPACE)? {
            let (Ok(id), Some(txn)) = (String::from_utf8(k), Txn::decode(&v)) else {
                tracing::warn!("unreadable transactional id state dropped");
                continue;
            };
            table.by_producer.insert(txn.producer_id, id.clone());
            table.touch(&id);
            table.txns.insert(id, txn);
        }
        let c = Arc::new(Coordinator {
            log,
            limits,
            guard,
            term,
            retired: std::sync::atomic::AtomicBool::new(false),
            table: tokio::sync::Mutex::new(table),
            pending: std::sync::Mutex::new(HashMap::new()),
        });
        {
            let mut t = c.table.lock().await;
            let ids: Vec<String> = t.txns.keys().cloned().collect();
            for id in ids {
                match t.txns.get(&id).map(|x| x.state) {
                    Some(State::PrepareCommit) => c.complete(&mut t, &id, true).await?,
                    Some(State::PrepareAbort | State::PrepareEpochFence) => {
                        c.complete(&mut t, &id, false).await?
                    }
                    Some(State::Ongoing) if !takeover => c.fence(&mut t, &id).await?,
                    Some(State::Ongoing) => {
                        if let Some(x) = t.txns.get(&id) {
                            let mut pending = c.pending();
                            for (group, topic, partition, _) in &x.offsets {
                                *pending
                                    .entry((group.clone(), topic.clone(), *partition))
                                    .or_insert(0) += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let weak = Arc::downgrade(&c);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(c) = weak.upgrade() else { return };
                if c.retired.load(std::sync::atomic::Ordering::Relaxed) || !c.still_leads() {
                    return;
                }
                if let Err(e) = c.abort_timed_out().await {
                    tracing::warn!(error = %e, "aborting timed-out transactions failed");
                }
                if let Err(e) = c.expire_idle().await {
                    tracing::warn!(error = %e, "forgetting idle transactional ids failed");
                }
            }
        });
        Ok(c)
    }

    /// Stops its timer: another coordinator took over.
    pub(crate) fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the node still leads the term this coordinator started for
    /// (always on a single node).
    fn still_leads(&self) -> bool {
        self.log.leadership().is_none_or(|l| {
            let l = l.borrow();
            l.leads() && l.term == self.term
        })
    }

    async fn store(&self, id: &str, txn: &Txn) -> Result<(), LogError> {
        let v = postcard::to_allocvec(txn).map_err(|e| LogError::Config(e.to_string()))?;
        self.log
            .put_meta_guarded(
                SPACE,
                vec![(id.as_bytes().to_vec(), Some(v))],
                self.guard.as_ref(),
            )
            .await
    }

    /// Writes the markers of `id`'s transaction (prepared), its offsets on a
    /// commit, then `Complete*`.
    async fn complete(&self, t: &mut Table, id: &str, commit: bool) -> Result<(), LogError> {
        let Some(txn) = t.txns.get_mut(id) else {
            return Ok(());
        };
        let marker = if commit {
            Marker::Commit
        } else {
            Marker::Abort
        };
        for (topic, p) in &txn.partitions {
            match self
                .log
                .write_marker(topic, *p, txn.producer_id, txn.epoch, marker, 0)
                .await
            {
                Ok(_) | Err(LogError::UnknownTopic(_) | LogError::UnknownPartition { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if commit {
            type Positions = (Vec<GroupOffset>, Vec<String>);
            let mut by_group: BTreeMap<&str, Positions> = BTreeMap::new();
            for (i, (group, topic, partition, offset)) in txn.offsets.iter().enumerate() {
                let (offsets, metadata) = by_group.entry(group).or_default();
                offsets.push(GroupOffset {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                });
                metadata.push(txn.offset_metadata.get(i).cloned().unwrap_or_default());
            }
            for (group, (offsets, metadata)) in by_group {
                match self
                    .log
                    .commit_offsets_with(group, offsets.clone(), metadata.clone())
                    .await
                {
                    Err(
                        LogError::OffsetOutOfRange { .. }
                        | LogError::UnknownTopic(_)
                        | LogError::UnknownPartition { .. },
                    ) => {
                        // A topic deleted since TxnOffsetCommit checked it:
                        // the rest are committed, one at a time.
                        for (o, m) in offsets.into_iter().zip(metadata) {
                            match self.log.commit_offsets_with(group, vec![o], vec![m]).await {
                                Ok(())
                                | Err(
                                    LogError::OffsetOutOfRange { .. }
                                    | LogError::UnknownTopic(_)
                                    | LogError::UnknownPartition { .. },
                                ) => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    other => other?,
                }
            }
        }
        txn.state = if commit {
            State::CompleteCommit
        } else {
            State::CompleteAbort
        };
        self.log.count_transaction(if commit {
            TxnEvent::Committed
        } else {
            TxnEvent::Aborted
        });
        self.unpend(&txn.offsets);
        txn.partitions.clear();
        txn.groups.clear();
        txn.clear_offsets();
        // The start time stays, as Kafka's does: DescribeTransactions of a
        // completed transaction answers when it began (and ListTransactions
        // filters by it), until the next one begins or the producer is
        // initialised again.
        let txn = txn.clone();
        self.store(id, &txn).await
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, u32), usize>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A transaction's offsets are no longer pending.
    fn unpend(&self, offsets: &[(String, String, u32, u64)]) {
        let mut pending = self.pending();
        for (group, topic, partition, _) in offsets {
            let k = (group.clone(), topic.clone(), *partition);
            if let Some(n) = pending.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    pending.remove(&k);
                }
            }
        }
    }

    /// Whether an open transaction holds offsets of `group` for
    /// `topic`/`partition`.
    pub(crate) fn offsets_pending(&self, group: &str, topic: &str, partition: i32) -> bool {
        let Ok(partition) = u32::try_from(partition) else {
            return false;
        };
        self.pending()
            .contains_key(&(group.to_owned(), topic.to_owned(), partition))
    }

    /// Aborts `id`'s open transaction with the epoch bumped: its producer
    /// is fenced.
    async fn fence(&self, t: &mut Table, id: &str) -> Result<(), LogError> {
        let Some(txn) = t.txns.get_mut(id) else {
            return Ok(());
        };
        txn.epoch = txn.epoch.saturating_add(1);
        txn.last_epoch = -1;
        txn.state = State::PrepareEpochFence;
        let txn = txn.clone();
        self.store(id, &txn).await?;
        self.complete(t, id, false).await
    }

    async fn abort_timed_out(&self) -> Result<(), LogError> {
        let mut t = self.table.lock().await;
        let now = now_ms();
        let expired: Vec<String> = t
            .txns
            .iter()
            .filter(|(_, x)| {
                x.state == State::Ongoing && x.started_ms + i64::from(x.timeout_ms) < now
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::info!(transactional_id = %id, "transaction timed out: aborted");
            self.log.count_transaction(TxnEvent::TimedOut);
            self.fence(&mut t, &id).await?;
        }
        Ok(())
    }

    /// Forgets the ids idle (no transaction open) for longer than
    /// `expiration_ms`, as Kafka does after `transactional.id.expiration.ms`.
    async fn expire_idle(&self) -> Result<(), LogError> {
        let mut t = self.table.lock().await;
        let cutoff =
            now_ms().saturating_sub(i64::try_from(self.limits.expiration_ms).unwrap_or(i64::MAX));
        let idle: Vec<String> = t
            .txns
            .iter()
            .filter(|(id, x)| {
                matches!(
                    x.state,
                    State::Empty | State::CompleteCommit | State::CompleteAbort
                ) && t.used_ms.get(*id).is_none_or(|&used| used < cutoff)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            self.log
                .put_meta_guarded(
                    SPACE,
                    vec![(id.as_bytes().to_vec(), None)],
                    self.guard.as_ref(),
                )
                .await?;
            if let Some(x) = t.txns.remove(&id) {
                t.by_producer.remove(&x.producer_id);
            }
            t.used_ms.remove(&id);
            tracing::debug!(transactional_id = %id, "idle transactional id forgotten");
        }
        Ok(())
    }

    /// InitProducerId with a transactional id: the producer id and the
    /// epoch it is to use (bumped: an older instance is fenced).
    pub(crate) async fn init(
        &self,
        id: &str,
        timeout_ms: i32,
        given: Option<(i64, i16)>,
    ) -> Result<(i64, i16), Refused> {
        if timeout_ms <= 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(Refused::Timeout);
        }
        let mut t = self.table.lock().await;
        if !t.txns.contains_key(id) {
            if t.txns.len() >= self.limits.max_ids {
                tracing::warn!(
                    transactional_id = %id,
                    kept = t.txns.len(),
                    "a new transactional id refused: kafka.max_transactional_ids are kept"
                );
                return Err(Refused::TooMany);
            }
            let producer_id = self.log.allocate_producer_id().await?;
            let txn = Txn {
                producer_id,
                epoch: -1,
                last_epoch: -1,
                state: State::Empty,
                timeout_ms,
                started_ms: -1,
                partitions: BTreeSet::new(),
                groups: BTreeSet::new(),
                offsets: Vec::new(),
                offset_metadata: Vec::new(),
            };
            t.by_producer.insert(producer_id, id.to_owned());
            t.txns.insert(id.to_owned(), txn);
        }
        t.touch(id);
        let state = t.txns.get(id).map(|x| x.state);
        match state {
            Some(State::PrepareCommit | State::PrepareAbort | State::PrepareEpochFence) => {
                return Err(Refused::Concurrent)
            }
            Some(State::Ongoing) => {
                // The old instance's transaction is aborted; the caller
                // retries and gets the epoch after.
                self.fence(&mut t, id).await?;
                return Err(Refused::Concurrent);
            }
            _ => {}
        }
        let Some(txn) = t.txns.get_mut(id) else {
            return Err(Refused::Mapping);
        };
        if let Some((pid, epoch)) = given {
            if pid != txn.producer_id {
                return Err(self.fenced());
            }
            if epoch == txn.last_epoch && epoch >= 0 {
                return Ok((txn.producer_id, txn.epoch));
            }
            if epoch != txn.epoch {
                return Err(self.fenced());
            }
        }
        let old = (txn.producer_id, txn.epoch);
        if txn.epoch >= i16::MAX - 1 {
            let fresh = self.log.allocate_producer_id().await?;
            txn.producer_id = fresh;
            txn.epoch = 0;
            txn.last_epoch = -1;
        } else {
            txn.last_epoch = txn.epoch;
            txn.epoch += 1;
        }
        txn.state = State::Empty;
        txn.timeout_ms = timeout_ms;
        txn.started_ms = -1;
        txn.partitions.clear();
        txn.groups.clear();
        txn.clear_offsets();
        let txn = txn.clone();
        if old.0 != txn.producer_id {
            t.by_producer.remove(&old.0);
            t.by_producer.insert(txn.producer_id, id.to_owned());
        }
        self.store(id, &txn).await?;
        Ok((txn.producer_id, txn.epoch))
    }

    /// PRODUCER_FENCED, counted.
    fn fenced(&self) -> Refused {
        self.log.count_transaction(TxnEvent::Fenced);
        Refused::Fenced
    }

    /// The transaction `id` names, checked against the caller's producer
    /// id and epoch, and not completing.
    fn current<'a>(
        &self,
        t: &'a mut Table,
        id: &str,
        producer_id: i64,
        epoch: i16,
    ) -> Result<&'a mut Txn, Refused> {
        if t.txns.contains_key(id) {
            t.touch(id);
        }
        let txn = t.txns.get_mut(id).ok_or(Refused::Mapping)?;
        if txn.producer_id != producer_id {
            return Err(Refused::Mapping);
        }
        if txn.epoch != epoch {
            return Err(self.fenced());
        }
        if matches!(
            txn.state,
            State::PrepareCommit | State::PrepareAbort | State::PrepareEpochFence
        ) {
            return Err(Refused::Concurrent);
        }
        Ok(txn)
    }

    fn begin(&self, txn: &mut Txn) {
        if txn.state != State::Ongoing {
            txn.state = State::Ongoing;
            txn.started_ms = now_ms();
            self.log.count_transaction(TxnEvent::Begun);
        }
    }

    /// AddPartitionsToTxn: the partitions join the transaction (which
    /// begins with the first).
    pub(crate) async fn add_partitions(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, u32)],
    ) -> Result<(), Refused> {
        let mut t = self.table.lock().await;
        let txn = self.current(&mut t, id, producer_id, epoch)?;
        if txn.state == State::Ongoing && partitions.iter().all(|p| txn.partitions.contains(p)) {
            return Ok(());
        }
        self.begin(txn);
        txn.partitions.extend(partitions.iter().cloned());
        let txn = txn.clone();
        self.store(id, &txn).await?;
        Ok(())
    }

    /// AddOffsetsToTxn: the group's offsets will be committed with it.
    pub(crate) async fn add_group(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        group: &str,
    ) -> Result<(), Refused> {
        let mut t = self.table.lock().await;
        let txn = self.current(&mut t, id, producer_id, epoch)?;
        self.begin(txn);
        txn.groups.insert(group.to_owned());
        let txn = txn.clone();
        self.store(id, &txn).await?;
        Ok(())
    }

    /// TxnOffsetCommit: offsets kept with the transaction until it ends.
    pub(crate) async fn offsets(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        group: &str,
        offsets: &[(String, u32, u64, String)],
    ) -> Result<(), Refused> {
        let mut t = self.table.lock().await;
        let txn = self.current(&mut t, id, producer_id, epoch)?;
        if txn.state != State::Ongoing || !txn.groups.contains(group) {
            return Err(Refused::State);
        }
        // (A state read from an older version has no metadata yet.)
        txn.offset_metadata.resize(txn.offsets.len(), String::new());
        for (topic, partition, offset, metadata) in offsets {
            let at = txn
                .offsets
                .iter()
                .position(|(g, tp, p, _)| g == group && tp == topic && p == partition);
            match at {
                Some(i) => {
                    txn.offsets[i].3 = *offset;
                    txn.offset_metadata[i] = metadata.clone();
                }
                None => {
                    txn.offsets
                        .push((group.to_owned(), topic.clone(), *partition, *offset));
                    txn.offset_metadata.push(metadata.clone());
                    *self
                        .pending()
                        .entry((group.to_owned(), topic.clone(), *partition))
                        .or_insert(0) += 1;
                }
            }
        }
        let txn = txn.clone();
        self.store(id, &txn).await?;
        Ok(())
    }

    /// EndTxn: commits or aborts; done (markers durable) when answered.
    pub(crate) async fn end(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<(), Refused> {
        let mut t = self.table.lock().await;
        let txn = self.current(&mut t, id, producer_id, epoch)?;
        match (txn.state, commit) {
            (State::CompleteCommit, true) | (State::CompleteAbort, false) => return Ok(()),
            (State::Ongoing, _) => {}
            _ => return Err(Refused::State),
        }
        txn.state = if commit {
            State::PrepareCommit
        } else {
            State::PrepareAbort
        };
        let txn = txn.clone();
        self.store(id, &txn).await?;
        self.complete(&mut t, id, commit).await?;
        Ok(())
    }

    /// Whether a transactional produce of `producer_id` at `epoch` to a
    /// partition may be written: its transaction is ongoing and holds it.
    pub(crate) async fn may_produce(
        &self,
        producer_id: i64,
        epoch: i16,
        topic: &str,
        partition: u32,
    ) -> Result<(), Refused> {
        let t = self.table.lock().await;
        let id = t.by_producer.get(&producer_id).ok_or(Refused::Mapping)?;
        let txn = t.txns.get(id).ok_or(Refused::Mapping)?;
        if txn.epoch != epoch {
            return Err(self.fenced());
        }
        if txn.state != State::Ongoing || !txn.partitions.contains(&(topic.to_owned(), partition)) {
            return Err(Refused::State);
        }
        Ok(())
    }

    /// Every transactional id with its state (ListTransactions,
    /// DescribeTransactions).
    pub(crate) async fn snapshot(&self) -> Vec<(String, Txn)> {
        let t = self.table.lock().await;
        t.txns.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The Kafka requests of the coordinator.
pub(crate) mod api {
    use kafka_protocol::messages::add_partitions_to_txn_response::{
        AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
    };
    use kafka_protocol::messages::txn_offset_commit_response::{
        TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
    };
    use kafka_protocol::messages::{
        AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
        AddPartitionsToTxnResponse, EndTxnRequest, EndTxnResponse, TxnOffsetCommitRequest,
        TxnOffsetCommitResponse,
    };
    use kafka_protocol::ResponseError;

    use super::Refused;
    use crate::conn::Session;

    /// Kafka's code for a refusal at a request's `version`; PRODUCER_FENCED
    /// exists from `fenced_from` on (INVALID_PRODUCER_EPOCH before).
    pub(crate) fn code(r: &Refused, version: i16, fenced_from: i16) -> i16 {
        match r {
            Refused::Concurrent => ResponseError::ConcurrentTransactions.code(),
            Refused::Fenced if version >= fenced_from => ResponseError::ProducerFenced.code(),
            Refused::Fenced => ResponseError::InvalidProducerEpoch.code(),
            Refused::Mapping => ResponseError::InvalidProducerIdMapping.code(),
            Refused::State => ResponseError::InvalidTxnState.code(),
            Refused::Timeout => ResponseError::InvalidTransactionTimeout.code(),
            Refused::TooMany => ResponseError::ThrottlingQuotaExceeded.code(),
            Refused::Storage(_) => ResponseError::KafkaStorageError.code(),
            Refused::NotCoordinator => ResponseError::NotCoordinator.code(),
            Refused::NotAvailable => ResponseError::CoordinatorNotAvailable.code(),
        }
    }

    fn outcome(r: Result<(), Refused>, version: i16) -> i16 {
        r.err().map_or(0, |e| code(&e, version, 2))
    }

    /// AddPartitionsToTxn v0–3 (the clients' form).
    pub(crate) async fn add_partitions(
        s: &Session,
        req: AddPartitionsToTxnRequest,
        version: i16,
    ) -> AddPartitionsToTxnResponse {
        let log = &s.server.cx.log;
        let mut wanted = Vec::new();
        let mut unknown = Vec::new();
        for t in &req.v3_and_below_topics {
            let name = t.name.0.to_string();
            let partitions = log.topic(&name).map(|i| i.config.partitions).unwrap_or(0);
            for &p in &t.partitions {
                match u32::try_from(p) {
                    Ok(p) if p < partitions => wanted.push((name.clone(), p)),
                    _ => unknown.push((name.clone(), p)),
                }
            }
        }
        let code = if !unknown.is_empty() {
            None
        } else {
            let result = match s.server.coordinator().await {
                Ok(c) => {
                    c.add_partitions(
                        &req.v3_and_below_transactional_id.0,
                        req.v3_and_below_producer_id.0,
                        req.v3_and_below_producer_epoch,
                        &wanted,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            Some(outcome(result, version))
        };
        let results = req
            .v3_and_below_topics
            .iter()
            .map(|t| {
                let name = t.name.0.to_string();
                AddPartitionsToTxnTopicResult::default()
                    .with_name(t.name.clone())
                    .with_results_by_partition(
                        t.partitions
                            .iter()
                            .map(|&p| {
                                let c = match code {
                                    Some(c) => c,
                                    None if unknown.contains(&(name.clone(), p)) => {
                                        ResponseError::UnknownTopicOrPartition.code()
                                    }
                                    None => ResponseError::OperationNotAttempted.code(),
                                };
                                AddPartitionsToTxnPartitionResult::default()
                                    .with_partition_index(p)
                                    .with_partition_error_code(c)
                            })
                            .collect(),
                    )
            })
            .collect();
        AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results)
    }

    /// AddOffsetsToTxn.
    pub(crate) async fn add_offsets(
        s: &Session,
        req: AddOffsetsToTxnRequest,
        version: i16,
    ) -> AddOffsetsToTxnResponse {
        let result = match s.server.coordinator().await {
            Ok(c) => {
                c.add_group(
                    &req.transactional_id.0,
                    req.producer_id.0,
                    req.producer_epoch,
                    &req.group_id.0,
                )
                .await
            }
            Err(e) => Err(e),
        };
        AddOffsetsToTxnResponse::default().with_error_code(outcome(result, version))
    }

    /// TxnOffsetCommit.
    pub(crate) async fn offset_commit(
        s: &Session,
        req: TxnOffsetCommitRequest,
        version: i16,
    ) -> TxnOffsetCommitResponse {
        // Each offset checked as OffsetCommit checks it; the valid ones are
        // kept with the transaction.
        let log = &s.server.cx.log;
        let mut offsets: Vec<(String, u32, u64, String)> = Vec::new();
        let mut refused: Vec<(String, i32, i16)> = Vec::new();
        for t in &req.topics {
            let name = t.name.0.to_string();
            for p in &t.partitions {
                let at = u32::try_from(p.partition_index)
                    .ok()
                    .and_then(|i| log.offsets(&name, i).ok().map(|o| (i, o)));
                match (at, u64::try_from(p.committed_offset)) {
                    (None, _) => refused.push((
                        name.clone(),
                        p.partition_index,
                        ResponseError::UnknownTopicOrPartition.code(),
                    )),
                    (Some((i, (_, end))), Ok(o)) if o <= end => {
                        let metadata = p
                            .committed_metadata
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_default();
                        if metadata.len() > tributary_storage::MAX_COMMIT_METADATA {
                            refused.push((
                                name.clone(),
                                p.partition_index,
                                ResponseError::OffsetMetadataTooLarge.code(),
                            ));
                        } else {
                            offsets.push((name.clone(), i, o, metadata));
                        }
                    }
                    _ => refused.push((
                        name.clone(),
                        p.partition_index,
                        ResponseError::OffsetOutOfRange.code(),
                    )),
                }
            }
        }
        // v3+ names the consumer's member and generation: a member a
        // rebalance fenced is refused, as by OffsetCommit (an unnamed
        // member, generation -1, is not checked, as Kafka does not).
        if version >= 3 && (!req.member_id.is_empty() || req.generation_id >= 0) {
            if let Err(e) = s.server.cx.groups.may_commit(
                &req.group_id.0,
                req.generation_id,
                &req.member_id,
                req.group_instance_id.as_deref(),
            ) {
                return offset_commit_answer(&req, crate::groups::group_code(&e));
            }
        }
        let result = match s.server.coordinator().await {
            Ok(_) if offsets.is_empty() => Ok(()),
            Ok(c) => {
                c.offsets(
                    &req.transactional_id.0,
                    req.producer_id.0,
                    req.producer_epoch,
                    &req.group_id.0,
                    &offsets,
                )
                .await
            }
            Err(e) => Err(e),
        };
        // TxnOffsetCommit knows PRODUCER_FENCED from v0 in Kafka's schema;
        // librdkafka and Java read 47 and 90 alike here.
        let mut answer =
            offset_commit_answer(&req, result.err().map_or(0, |e| code(&e, version, 0)));
        for t in &mut answer.topics {
            for p in &mut t.partitions {
                if let Some((_, _, c)) = refused
                    .iter()
                    .find(|(n, i, _)| *n == t.name.0.as_str() && *i == p.partition_index)
                {
                    p.error_code = *c;
                }
            }
        }
        answer
    }

    /// TxnOffsetCommit's answer: `code` for every partition.
    fn offset_commit_answer(req: &TxnOffsetCommitRequest, code: i16) -> TxnOffsetCommitResponse {
        let topics = req
            .topics
            .iter()
            .map(|t| {
                TxnOffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                TxnOffsetCommitResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(code)
                            })
                            .collect(),
                    )
            })
            .collect();
        TxnOffsetCommitResponse::default().with_topics(topics)
    }

    /// DescribeTransactions v0.
    pub(crate) async fn describe(
        s: &Session,
        req: kafka_protocol::messages::DescribeTransactionsRequest,
    ) -> kafka_protocol::messages::DescribeTransactionsResponse {
        use kafka_protocol::messages::describe_transactions_response::{
            TopicData, TransactionState,
        };
        let all = match s.server.coordinator().await {
            Ok(c) => c.snapshot().await,
            Err(_) => Vec::new(),
        };
        let states = req
            .transactional_ids
            .iter()
            .map(|id| {
                let answer = TransactionState::default().with_transactional_id(id.clone());
                let Some((_, txn)) = all.iter().find(|(k, _)| **k == *id.0) else {
                    return answer
                        .with_error_code(ResponseError::TransactionalIdNotFound.code())
                        .with_producer_id(kafka_protocol::messages::ProducerId(-1))
                        .with_producer_epoch(-1)
                        .with_transaction_start_time_ms(-1);
                };
                let mut topics: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
                for (t, p) in &txn.partitions {
                    topics.entry(t).or_default().push(*p as i32);
                }
                answer
                    .with_transaction_state(crate::admin::st(txn.state.name()))
                    .with_transaction_timeout_ms(txn.timeout_ms)
                    .with_transaction_start_time_ms(txn.started_ms)
                    .with_producer_id(kafka_protocol::messages::ProducerId(txn.producer_id))
                    .with_producer_epoch(txn.epoch)
                    .with_topics(
                        topics
                            .into_iter()
                            .map(|(t, ps)| {
                                TopicData::default()
                                    .with_topic(kafka_protocol::messages::TopicName(
                                        crate::admin::st(t),
                                    ))
                                    .with_partitions(ps)
                            })
                            .collect(),
                    )
            })
            .collect();
        kafka_protocol::messages::DescribeTransactionsResponse::default()
            .with_transaction_states(states)
    }

    /// ListTransactions v0–2 (a pattern is matched as the literal id, `.*` as all).
    pub(crate) async fn list(
        s: &Session,
        req: kafka_protocol::messages::ListTransactionsRequest,
    ) -> kafka_protocol::messages::ListTransactionsResponse {
        use kafka_protocol::messages::list_transactions_response::TransactionState;
        let all = match s.server.coordinator().await {
            Ok(c) => c.snapshot().await,
            Err(_) => Vec::new(),
        };
        const STATES: [&str; 7] = [
            "Empty",
            "Ongoing",
            "PrepareCommit",
            "PrepareAbort",
            "CompleteCommit",
            "CompleteAbort",
            "PrepareEpochFence",
        ];
        let unknown: Vec<_> = req
            .state_filters
            .iter()
            .filter(|f| !STATES.contains(&f.as_str()))
            .cloned()
            .collect();
        let now = tributary_storage::util::now_ms();
        let states = all
            .into_iter()
            .filter(|(_, t)| {
                req.state_filters.is_empty()
                    || req
                        .state_filters
                        .iter()
                        .any(|f| f.as_str() == t.state.name())
            })
            .filter(|(_, t)| {
                req.producer_id_filters.is_empty()
                    || req.producer_id_filters.iter().any(|p| p.0 == t.producer_id)
            })
            .filter(|(_, t)| {
                req.duration_filter < 0
                    || (t.started_ms >= 0 && now - t.started_ms >= req.duration_filter)
            })
            .filter(|(id, _)| match req.transactional_id_pattern.as_deref() {
                None | Some(".*") | Some("") => true,
                Some(p) => p == id.as_str(),
            })
            .map(|(id, t)| {
                TransactionState::default()
                    .with_transactional_id(kafka_protocol::messages::TransactionalId(
                        crate::admin::st(id),
                    ))
                    .with_producer_id(kafka_protocol::messages::ProducerId(t.producer_id))
                    .with_transaction_state(crate::admin::st(t.state.name()))
            })
            .collect();
        kafka_protocol::messages::ListTransactionsResponse::default()
            .with_unknown_state_filters(unknown)
            .with_transaction_states(states)
    }

    /// EndTxn: answered once the markers (and a commit's offsets) are durable.
    pub(crate) async fn end(s: &Session, req: EndTxnRequest, version: i16) -> EndTxnResponse {
        let result = match s.server.coordinator().await {
            Ok(c) => {
                c.end(
                    &req.transactional_id.0,
                    req.producer_id.0,
                    req.producer_epoch,
                    req.committed,
                )
                .await
            }
            Err(e) => Err(e),
        };
        EndTxnResponse::default()
            .with_error_code(outcome(result, version))
            .with_producer_id(req.producer_id)
            .with_producer_epoch(req.producer_epoch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A state stored by the version before commit metadata was kept reads
    /// as one without metadata; this version's reads back as written; bytes
    /// of neither are refused.
    #[test]
    fn a_state_stored_before_commit_metadata_still_reads() {
        let offsets = vec![("g".to_owned(), "t".to_owned(), 0, 7)];
        let old = TxnWithoutMetadata {
            producer_id: 4,
            epoch: 2,
            last_epoch: 1,
            state: State::Ongoing,
            timeout_ms: 60_000,
            started_ms: 1_000,
            partitions: BTreeSet::from([("t".to_owned(), 0)]),
            groups: BTreeSet::from(["g".to_owned()]),
            offsets: offsets.clone(),
        };
        let read = Txn::decode(&postcard::to_allocvec(&old).expect("encode")).expect("read");
        assert_eq!(read.producer_id, 4);
        assert_eq!(read.state, State::Ongoing);
        assert_eq!(read.offsets, offsets);
        assert_eq!(read.offset_metadata, vec![String::new()]);
        let mut now = read.clone();
        now.offset_metadata = vec!["m".to_owned()];
        let again = Txn::decode(&postcard::to_allocvec(&now).expect("encode")).expect("read");
        assert_eq!(again, now);
        assert_eq!(Txn::decode(&[0xff, 0xff, 0xff]), None);
    }
}
